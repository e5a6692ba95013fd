"""file: a raw image in a host file (QEMU's block/file-posix.c, first slice).

Options: ``filename`` (required), ``cache.direct`` (O_DIRECT), ``cache.no-flush``,
``aio=threads|io_uring|native`` (native needs ``cache.direct=on`` and is served by io_uring
here, since Python has no Linux AIO binding), ``read-only`` (from --blockdev).

Short reads at the end of the file are zero-filled, as file-posix does for raw images whose
size is not a multiple of the sector size.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.bdrv import BDRV_REQ_FUA, BlockDriver, BlockDriverError, Completion, bdrv_register
from blocklayer.blockdev_options import enum_of
from blocklayer.io_uring import OP_FSYNC, OP_READ, OP_WRITE, luring_get
from blocklayer.iov import IOVector
from blocklayer.thread_pool import thread_pool_submit_aio
from pyvhost_blk.keyval import to_str

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
        self._length = self._query_length()

    def _query_length(self) -> int:
        size = os.lseek(self.fd, 0, os.SEEK_END)
        return (size + 511) & ~511  # QEMU counts whole sectors

    def getlength(self) -> int:
        return self._length

    def can_write(self) -> bool:
        return not self.read_only

    # -- I/O --------------------------------------------------------------------------------
    def _use_uring(self) -> bool:
        return self.aio != "threads"

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        def done(ret: int) -> None:
            if 0 <= ret < qiov.size:
                qiov.memset(0, ret)  # past EOF reads as zeroes
                ret = qiov.size
            cb(ret if ret < 0 else 0)

        if self._use_uring():
            luring_get(ctx).submit(OP_READ, self.fd, qiov.iov, qiov.niov, offset, done, qiov)
        else:
            fd = self.fd
            thread_pool_submit_aio(ctx, lambda: _preadv_full(fd, qiov, offset), done)

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

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
