"""file: a raw image in a host file (QEMU's block/file-posix.c, first slice).

Options: ``filename`` (required), ``cache.direct`` (O_DIRECT), ``cache.no-flush``,
``aio=threads|io_uring|native`` (native needs ``cache.direct=on``, as in QEMU: Linux AIO for
reads and writes on the C request path; requests that need Python use io_uring),
``read-only`` (from --blockdev).

Short reads at the end of the file are zero-filled, as file-posix does for raw images whose
size is not a multiple of the sector size.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.batch import T_FLUSH, UNSET, Batch
from blocklayer.bdrv import (
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    DRV_FILE,
    DRV_FILE_LAIO,
    BlockDriver,
    BlockDriverError,
    Completion,
    FastPathInfo,
    bdrv_register,
)
from blocklayer.blockdev_options import enum_of
from blocklayer.file_lock import ImageLock, ImageLockError
from blocklayer.io import bdrv_batch_each
from blocklayer.io_uring import OP_FSYNC, OP_READ, OP_WRITE, luring_get
from blocklayer.iov import IOVector
from blocklayer.qapi import to_str
from blocklayer.thread_pool import thread_pool_submit_aio
from vhost.ffi import ffi, lib

_aio_mode = enum_of("threads", "io_uring", "native")
_locking = enum_of("auto", "on", "off")


@bdrv_register
class FileDriver(BlockDriver):
    format_name = "file"
    options = {
        "filename": to_str,
        "aio": _aio_mode,
        "locking": _locking,
    }

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        if "filename" not in opts:
            raise BlockDriverError("Parameter 'filename' is missing")
        self.filename: str = opts["filename"]
        self.direct = opts.get("cache.direct", False)
        self.no_flush = opts.get("cache.no-flush", False)
        self.aio = opts.get("aio", "threads")
        self.read_only = opts.get("read-only", False)
        if self.aio == "native" and not self.direct:
            raise BlockDriverError(
                "aio=native was specified, but it requires cache.direct=on, "
                "which was not specified."
            )
        flags = os.O_CLOEXEC | (os.O_RDONLY if self.read_only else os.O_RDWR)
        if self.direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(self.filename, flags)
        except OSError as e:
            raise BlockDriverError(f"Could not open '{self.filename}': {e.strerror}") from None
        try:
            # Opening takes no lock: set_perm does, once the node's users are known.
            self.lock = ImageLock(self.fd, self.filename, opts.get("locking", "auto"))
        except ValueError as e:
            os.close(self.fd)
            raise BlockDriverError(str(e)) from None
        self._length = self._query_length()

    def _query_length(self) -> int:
        size = os.lseek(self.fd, 0, os.SEEK_END)
        return (size + 511) & ~511  # QEMU counts whole sectors

    def limits(self) -> tuple[int, int]:
        """Buffered I/O takes anything; O_DIRECT needs what the device/file system needs."""
        if not self.direct:
            return 1, 1
        return probe_alignment(self.fd)

    def getlength(self) -> int:
        return self._length

    def can_write(self) -> bool:
        return not self.read_only

    # -- I/O --------------------------------------------------------------------------------
    def _use_uring(self) -> bool:
        return self.aio != "threads"

    def batch_io(self, b: Batch) -> None:
        """A batch from above (a filter, or the C path switched off): its reads, writes and
        flushes go straight back to the queue's C engine (io_uring, or Linux AIO with
        aio=native), which completes them.  With aio=threads, one by one.  In ``b.ctx``."""
        if self.no_flush:
            types, ret = b.types, b.ret
            for i in range(b.n):
                if types[i] == T_FLUSH and ret[i] == UNSET:
                    ret[i] = 0
        if self.aio == "threads" or lib.pyvu_fastq_submit(
                b.cq, self.fd, int(self.aio == "native"), b.handles, b.offsets, b.ret, b.n) < 0:
            assert self.bs is not None
            bdrv_batch_each(self.bs, b)

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        def done(ret: int) -> None:
            if 0 <= ret < qiov.size:
                qiov.memset(0, ret)  # past EOF reads as zeroes
                ret = qiov.size
            cb(ret if ret < 0 else 0)

        if self._use_uring():
            self._uring_read(ctx, offset, qiov, 0, done)
        else:
            fd = self.fd
            thread_pool_submit_aio(ctx, lambda: _preadv_full(fd, qiov, offset), done)

    def _uring_read(self, ctx: AioContext, offset: int, qiov: IOVector, done_bytes: int,
                    cb: Completion) -> None:
        """Read with io_uring; a short read before EOF is resubmitted for the rest (as QEMU's
        luring_resubmit_short_read), one at EOF ends the request."""
        part = qiov if done_bytes == 0 else qiov.slice_from(done_bytes)

        def got(ret: int) -> None:
            if ret < 0:
                cb(ret)
            elif ret == 0 or done_bytes + ret >= qiov.size:
                cb(done_bytes + ret)
            else:
                self._uring_read(ctx, offset + ret, qiov, done_bytes + ret, cb)

        luring_get(ctx).submit(OP_READ, self.fd, part.iov, part.niov, offset, got, part)

    def aio_pwritev(
        self, ctx: AioContext, offset: int, qiov: IOVector, flags: int, cb: Completion
    ) -> None:
        def done(ret: int) -> None:
            if 0 <= ret < qiov.size:
                ret = -errno.ENOSPC  # a short write: the host ran out of space
            if ret >= 0 and flags & BDRV_REQ_FUA:
                self.aio_flush(ctx, cb)
                return
            cb(ret if ret < 0 else 0)

        if self._use_uring():
            luring_get(ctx).submit(OP_WRITE, self.fd, qiov.iov, qiov.niov, offset, done, qiov)
        else:
            fd = self.fd
            thread_pool_submit_aio(ctx, lambda: _pwritev_full(fd, qiov, offset), done)

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        if self.no_flush:
            cb(0)
            return

        def done(ret: int) -> None:
            cb(ret if ret < 0 else 0)

        if self._use_uring():
            luring_get(ctx).submit(OP_FSYNC, self.fd, None, 0, 0, done)
        else:
            fd = self.fd
            thread_pool_submit_aio(ctx, lambda: os.fdatasync(fd) or 0, done)

    # Worker-thread functions (fd, offset, nbytes[, unmap]) -> 0 or -errno; host_device's differ.
    _discard_fn = staticmethod(lambda fd, offset, nbytes: _punch_hole(fd, offset, nbytes))
    _zeroes_fn = staticmethod(lambda fd, offset, nbytes, unmap: _write_zeroes(fd, offset, nbytes,
                                                                             unmap))

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        fd, discard = self.fd, self._discard_fn
        thread_pool_submit_aio(ctx, lambda: discard(fd, offset, nbytes), cb)

    def aio_pwrite_zeroes(
        self, ctx: AioContext, offset: int, nbytes: int, flags: int, cb: Completion
    ) -> None:
        fd, unmap, zeroes = self.fd, bool(flags & BDRV_REQ_MAY_UNMAP), self._zeroes_fn

        def done(ret: int) -> None:
            if ret >= 0 and flags & BDRV_REQ_FUA:
                self.aio_flush(ctx, cb)
            else:
                cb(ret)

        thread_pool_submit_aio(ctx, lambda: zeroes(fd, offset, nbytes, unmap), done)

    def fast_path_info(self) -> FastPathInfo:
        if self.aio == "threads":
            return FastPathInfo()  # the user chose the thread pool
        kind = DRV_FILE_LAIO if self.aio == "native" else DRV_FILE
        return FastPathInfo(kind, self.fd, no_flush=bool(self.no_flush))

    def set_perm(self, perm: int, shared: int) -> None:
        """Lock the image as QEMU's file-posix does (bytes 100+/200+); PermissionError with
        QEMU's text ('Failed to get "write" lock') when another process conflicts."""
        try:
            self.lock.update(perm, shared)
        except ImageLockError as e:
            raise PermissionError(str(e)) from None

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        self._length = self._query_length()

    def close(self) -> None:
        if self.fd >= 0:
            self.lock.release()
            os.close(self.fd)
            self.fd = -1


BLKSSZGET = 0x1268  # logical sector size


def probe_alignment(fd: int) -> tuple[int, int]:
    """QEMU's raw_probe_alignment for an O_DIRECT fd: (request alignment, memory alignment).

    A block device tells its logical sector size (BLKSSZGET); otherwise the smallest of 512,
    1K, 2K, 4K that a read accepts.  The memory alignment is the smallest power of 2 from 512
    a read into a buffer of that alignment accepts (EINVAL means "misaligned").  Not below 512,
    as QEMU: a synchronous read may accept a buffer that Linux AIO then refuses (seen on loop
    devices), and the probe can only try reads."""
    max_align = max(4096, mmap.PAGESIZE)
    req = 0
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        out = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
        req = int.from_bytes(out, "little")
    buf = mmap.mmap(-1, 2 * max_align)
    try:
        with memoryview(buf) as whole:
            def accepts(at: int, length: int) -> bool:
                with whole[at:at + length] as part:
                    try:
                        os.preadv(fd, [part], 0)
                    except OSError as e:
                        return e.errno != errno.EINVAL
                return True

            if not req:
                req = next((a for a in (512, 1024, 2048, 4096) if accepts(0, a)), max_align)
            mem = 512
            while mem < max_align and not accepts(mem, req):
                mem <<= 1
    finally:
        buf.close()
    return req, mem


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = bytes(1 << 20)


def _fallocate(fd: int, mode: int, offset: int, nbytes: int) -> int:
    """Worker thread: fallocate(2) with ``mode``; 0 or -errno."""
    if lib.fallocate(fd, mode, offset, nbytes) == 0:
        return 0
    return -ffi.errno


def _punch_hole(fd: int, offset: int, nbytes: int) -> int:
    """Worker thread: deallocate a range (it then reads as zeroes)."""
    ret = _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes)
    return 0 if ret in (-errno.EOPNOTSUPP, -errno.ENOSYS) else ret  # discard is advisory


def _write_zeroes(fd: int, offset: int, nbytes: int, unmap: bool) -> int:
    """Worker thread: zero a range, deallocating it if allowed, else keeping it allocated."""
    if unmap:
        ret = _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes)
        if ret == 0:
            return 0
    ret = _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, nbytes)
    if ret == 0:
        return 0
    if ret not in (-errno.EOPNOTSUPP, -errno.ENOSYS, -errno.EINVAL):
        return ret
    done = 0  # the file system cannot zero a range: write zeroes
    while done < nbytes:
        n = os.pwrite(fd, memoryview(_ZERO_CHUNK)[: min(len(_ZERO_CHUNK), nbytes - done)],
                      offset + done)
        done += n
    return 0


def _preadv_full(fd: int, qiov: IOVector, offset: int) -> int:
    """Worker thread: read until done or EOF; returns bytes read."""
    bufs = qiov.buffers()
    done = 0
    while bufs:
        n = os.preadv(fd, bufs, offset + done)
        if n == 0:
            break
        done += n
        bufs = _advance(bufs, n)
    return done


def _pwritev_full(fd: int, qiov: IOVector, offset: int) -> int:
    """Worker thread: write everything (retrying short writes); returns bytes written."""
    bufs = qiov.buffers()
    done = 0
    while bufs:
        n = os.pwritev(fd, bufs, offset + done)
        if n == 0:
            break
        done += n
        bufs = _advance(bufs, n)
    return done


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    while bufs and n >= len(bufs[0]):
        n -= len(bufs[0])
        bufs = bufs[1:]
    if bufs and n:
        bufs = [bufs[0][n:], *bufs[1:]]
    return bufs
