"""``driver=rbd``: a disk that is a Ceph RBD image, through librbd (QEMU's block/rbd.c).

Options (QEMU's names): ``pool`` and ``image`` (required), ``namespace``, ``snapshot`` (opens
the snapshot, read-only), ``conf`` (a ceph.conf; default: librados' search path), ``user``
(the client id, ``admin`` for ``client.admin``; default librados'), ``key-secret`` (refused:
there are no QEMU secret objects here, put the key in a keyring that ``conf`` names), plus the
common ``read-only``, ``auto-read-only`` and ``cache.direct`` (``rbd_cache=false``, as QEMU).
The client libraries are Debian's librbd1/librados2, called through their C API
(``blocklayer/ceph.py``, loaded when a node is opened so the other drivers load without them).

Theory of operation
-------------------
Open (main thread) connects to the cluster (``rados_connect``, bounded by
``CONNECT_TIMEOUT``), opens the pool's I/O context (and namespace) and the image.  These are
blocking calls and happen only at open, resize and close, as in QEMU.

Reads, writes and flushes arrive in batches (``batch_io``) and go straight to the C librbd
engine of the queue's AioContext (``vhost/csrc/rbd_engine.c``): ``rbd_aio_readv``/
``rbd_aio_writev`` on the guest's own buffers (no copy), completed in C on the context's
loop, FUA as write + flush — the way requests on a file reach io_uring.  The rare requests
that do not come in batches (discard, write-zeroes, the virtio handler's, the error policy's
retries) run librbd's blocking calls in a thread pool of the node's own.  librbd keeps a
request and retries it itself when an OSD goes away and comes back, so an OSD restart is a
stall, not an error.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.batch import Batch
from blocklayer.bdrv import (
    BDRV_REQ_FUA,
    BlockDriver,
    BlockDriverError,
    BlockDriverState,
    Completion,
    bdrv_register,
)
from blocklayer.ceph import ENGINE_FUNCTIONS, CephUnavailable, check, load
from blocklayer.iov import IOVector
from blocklayer.qapi import to_str
from blocklayer.thread_pool import ThreadPool
from vhost.ffi import ffi, lib

log = logging.getLogger("pyvhost_blk.rbd")

#: seconds rados_connect may take (librados' default, client_mount_timeout, is 300)
CONNECT_TIMEOUT = 30
#: largest discard / write-zeroes per librbd call (bounds the work behind one call)
MAX_EFFECT_LEN = 1 << 30


@bdrv_register
class RbdDriver(BlockDriver):
    format_name = "rbd"
    options = {
        "pool": to_str,
        "namespace": to_str,
        "image": to_str,
        "conf": to_str,
        "user": to_str,
        "snapshot": to_str,
        "key-secret": to_str,
    }

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        """Main thread: connect, open the image (blocking; one line on failure)."""
        super().__init__(node_name, opts)
        try:
            self.cffi, self.librados, self.librbd = load()
        except CephUnavailable as e:
            raise BlockDriverError(str(e)) from None
        for name in ("pool", "image"):
            if name not in opts:
                raise BlockDriverError(f"Parameter '{name}' is missing")
        if "key-secret" in opts:
            raise BlockDriverError(
                "Parameter 'key-secret' is not supported: put the key in a keyring file "
                "and name it in the 'conf' file (keyring = PATH)")
        self.pool: str = opts["pool"]
        self.namespace: str = opts.get("namespace", "")
        self.image_name: str = opts["image"]
        self.snapshot: str | None = opts.get("snapshot")
        self.read_only = bool(opts.get("read-only", False))
        if self.snapshot is not None and not self.read_only:
            if not opts.get("auto-read-only", False):
                raise BlockDriverError("rbd snapshots are always read-only")
            self.read_only = True
        ns = f"{self.namespace}/" if self.namespace else ""
        snap = f"@{self.snapshot}" if self.snapshot else ""
        self.filename = f"rbd:{self.pool}/{ns}{self.image_name}{snap}"
        self.cluster: Any = None
        self.ioctx: Any = None
        self.image: Any = None
        self._engines: dict[AioContext, tuple[Any, int, int, Any]] = {}
        self._pool = ThreadPool(16)
        c, rados, rbd = self.cffi, self.librados, self.librbd
        try:
            cluster = c.new("rados_t *")
            check(rados.rados_create(cluster, opts["user"].encode() if "user" in opts
                                     else c.NULL), "rados_create")
            self.cluster = cluster[0]
            conf = opts.get("conf")
            check(rados.rados_conf_read_file(self.cluster, conf.encode() if conf else c.NULL),
                  f"reading {conf or 'the default ceph.conf'}")
            for key, value in (("rbd_cache", "false" if opts.get("cache.direct") else "true"),
                               ("client_mount_timeout", str(CONNECT_TIMEOUT))):
                check(rados.rados_conf_set(self.cluster, key.encode(), value.encode()), key)
            check(rados.rados_connect(self.cluster), "rados_connect")
        except OSError as e:
            self._close_all()
            raise BlockDriverError(f"error connecting to the Ceph cluster: {e}") from None
        try:
            ioctx = c.new("rados_ioctx_t *")
            check(rados.rados_ioctx_create(self.cluster, self.pool.encode(), ioctx),
                  "rados_ioctx_create")
            self.ioctx = ioctx[0]
            if self.namespace:
                rados.rados_ioctx_set_namespace(self.ioctx, self.namespace.encode())
            image = c.new("rbd_image_t *")
            opener = rbd.rbd_open_read_only if self.read_only else rbd.rbd_open
            check(opener(self.ioctx, self.image_name.encode(), image,
                         self.snapshot.encode() if self.snapshot else c.NULL), "rbd_open")
            self.image = image[0]
            self.size: int = self._get_size()
        except OSError as e:
            self._close_all()
            if e.errno == errno.ENOENT:
                raise BlockDriverError(
                    f"error opening image '{self.image_name}' in pool '{self.pool}'"
                    f"{f' namespace {self.namespace!r}' if self.namespace else ''}: "
                    "No such file or directory") from None
            raise BlockDriverError(f"error opening image '{self.filename}': {e}") from None
        fns = ffi.new("struct pyvu_rbd_fns *")
        for field, name in ENGINE_FUNCTIONS:  # librbd's entry points, for the C engine
            addr = int(c.cast("uintptr_t", c.addressof(rbd, name)))
            setattr(fns, field, ffi.cast(ffi.typeof(getattr(fns, field)), addr))
        self._fns = fns

    def _get_size(self) -> int:
        size = self.cffi.new("uint64_t *")
        check(self.librbd.rbd_get_size(self.image, size), "rbd_get_size")
        return int(size[0])

    def attach(self, bs: BlockDriverState) -> None:
        super().attach(bs)
        if self.read_only:
            bs.read_only = True  # auto-read-only over a snapshot

    # -- capabilities ------------------------------------------------------------------------
    def getlength(self) -> int:
        return self.size

    def can_write(self) -> bool:
        return not self.read_only

    def limits(self) -> tuple[int, int]:
        return 512, 1

    # -- batches: the C engine of the queue's context --------------------------------------
    def _engine(self, ctx: AioContext) -> Any:
        """The context's librbd engine for this image (created on first use).  In ctx."""
        got = self._engines.get(ctx)
        if got is None:
            e = ffi.new("struct pyvu_rbd *")
            efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            check(lib.pyvu_rbd_init(e, efd, ffi.cast("void *", int(
                self.cffi.cast("uintptr_t", self.image))), self._fns), "rbd engine")
            token = lib.PYVU_TOKEN_C | int(ffi.cast("uintptr_t", e))
            # completions report the queues they finish, never this token
            ctx.add_c_handler(efd, ffi.addressof(e.h), token, lambda: None)
            got = self._engines[ctx] = (e, efd, token, ctx)
        return got[0]

    def batch_io(self, b: Batch) -> None:
        """Reads, writes and flushes to librbd straight from guest memory.  In ``b.ctx``."""
        lib.pyvu_fastq_submit_rbd(b.cq, self._engine(b.ctx), b.handles, b.offsets, b.ret, b.n)

    # -- single requests: librbd's blocking calls in the node's threads ------------------------
    def _run(self, ctx: AioContext, fn: Callable[[], int], cb: Completion) -> None:
        def call() -> int:
            try:
                return fn()
            except OSError as e:
                return -(e.errno or errno.EIO)
        self._pool.submit(ctx, call, cb)

    def _ptr(self, addr: Any) -> Any:
        return self.cffi.cast("char *", int(ffi.cast("uintptr_t", addr)))

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        def read() -> int:
            pos = offset
            for k in range(qiov.niov):
                v = qiov.iov[k]
                n = check(self.librbd.rbd_read(self.image, pos, v.iov_len,
                                               self._ptr(v.iov_base)), "rbd_read")
                if n < v.iov_len:  # past the end reads as zeroes
                    ffi.memmove(ffi.cast("char *", v.iov_base) + n, bytes(v.iov_len - n),
                                v.iov_len - n)
                pos += v.iov_len
            return 0
        self._run(ctx, read, cb)

    def aio_pwritev(
        self, ctx: AioContext, offset: int, qiov: IOVector, flags: int, cb: Completion
    ) -> None:
        def write() -> int:
            pos = offset
            for k in range(qiov.niov):
                v = qiov.iov[k]
                check(self.librbd.rbd_write(self.image, pos, v.iov_len, self._ptr(v.iov_base)),
                      "rbd_write")
                pos += v.iov_len
            if flags & BDRV_REQ_FUA:  # librbd has no FUA: write, then flush
                check(self.librbd.rbd_flush(self.image), "rbd_flush")
            return 0
        self._run(ctx, write, cb)

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        self._run(ctx, lambda: check(self.librbd.rbd_flush(self.image), "rbd_flush"), cb)

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        self._run(ctx, lambda: self._ranges(offset, nbytes, self.librbd.rbd_discard), cb)

    def aio_pwrite_zeroes(
        self, ctx: AioContext, offset: int, nbytes: int, flags: int, cb: Completion
    ) -> None:
        # librbd zeroes by deallocating where it can, whatever MAY_UNMAP says (QEMU does the
        # same); a thin image reads zeroes either way.
        def zero(ofs: int, n: int) -> int:
            return self.librbd.rbd_write_zeroes(self.image, ofs, n, 0, 0)

        def run() -> int:
            self._ranges(offset, nbytes, lambda _img, ofs, n: zero(ofs, n))
            if flags & BDRV_REQ_FUA:
                check(self.librbd.rbd_flush(self.image), "rbd_flush")
            return 0
        self._run(ctx, run, cb)

    def _ranges(self, offset: int, nbytes: int, op: Callable[..., int]) -> int:
        """Worker thread: one librbd call per MAX_EFFECT_LEN bytes."""
        while nbytes > 0:
            n = min(nbytes, MAX_EFFECT_LEN)
            check(op(self.image, offset, n), "rbd")
            offset, nbytes = offset + n, nbytes - n
        return 0

    # -- management (main thread) -------------------------------------------------------------
    def truncate(self, size: int) -> None:
        """Main thread, node drained: resize the image (QMP block_resize)."""
        if self.snapshot is not None:
            raise OSError(errno.EROFS, "Cannot resize a snapshot")
        ret = self.librbd.rbd_resize(self.image, size)
        if ret < 0:
            raise OSError(-ret, f"rbd resize failed: {os.strerror(-ret)}")
        self.size = self._get_size()

    def close(self) -> None:
        """Main thread, node drained."""
        self._close_all()

    def _close_all(self) -> None:
        for e, efd, token, ctx in self._engines.values():
            def drop(e: Any = e, efd: int = efd, token: int = token, ctx: AioContext = ctx
                     ) -> None:
                ctx.remove_c_handler(efd, token)
                os.close(efd)
                lib.pyvu_rbd_destroy(e)
            ctx.schedule(drop)  # in the engine's own context (never run if it has stopped)
        self._engines = {}
        if self.image is not None:
            self.librbd.rbd_close(self.image)
            self.image = None
        if self.ioctx is not None:
            self.librados.rados_ioctx_destroy(self.ioctx)
            self.ioctx = None
        if self.cluster is not None:
            self.librados.rados_shutdown(self.cluster)
            self.cluster = None
