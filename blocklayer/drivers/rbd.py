"""``driver=rbd``: a disk that is a Ceph RBD image, through librbd (QEMU's block/rbd.c).

Options (QEMU's names): ``pool`` and ``image`` (required), ``namespace``, ``snapshot`` (opens
the snapshot, read-only), ``conf`` (a ceph.conf; default: librados' search path), ``user``
(the client id, ``admin`` for ``client.admin``; default librados'), ``key-secret`` (refused:
there are no QEMU secret objects here, put the key in a keyring that ``conf`` names), plus the
common ``read-only``, ``auto-read-only`` and ``cache.direct`` (``rbd_cache=false``, as QEMU).
The client library is Debian's ``python3-rbd``/``python3-rados`` (librbd1/librados2), imported
when a node is opened so that the other drivers load without it.

Theory of operation
-------------------
Open (main thread) connects to the cluster (``rados_connect``, bounded by
``CONNECT_TIMEOUT``), opens the pool's I/O context (and namespace) and the image.  These are
blocking calls and happen only at open, resize and close, as in QEMU.

I/O uses librbd's asynchronous calls (``aio_read``/``aio_write``/``aio_flush``/
``aio_discard``/``aio_write_zeroes``).  librbd runs their completion callbacks on its own
finisher threads; a callback does what needs no context (copying read data into the
request's buffer, which stays valid until ``cb`` runs) and then hands ``cb(ret)`` to the
caller's AioContext with ``ctx.schedule`` — the one thing another thread may do to a context,
as ``blocklayer/thread_pool.py`` does for its workers.  librbd keeps the request and retries it
itself when an OSD goes away and comes back, so an OSD restart is a stall, not an error.

The Python binding copies: a read returns a new ``bytes`` (copied into guest memory with one C
call), a write takes ``bytes`` (gathered from guest memory with one C call).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.bdrv import (
    BDRV_REQ_FUA,
    BlockDriver,
    BlockDriverError,
    BlockDriverState,
    Completion,
    bdrv_register,
)
from blocklayer.iov import IOVector
from blocklayer.qapi import to_str
from vhost.ffi import ffi, lib

log = logging.getLogger("pyvhost_blk.rbd")

#: seconds rados_connect may take (librados' default, client_mount_timeout, is 300)
CONNECT_TIMEOUT = 30
#: largest discard / write-zeroes per librbd call (librbd takes 64-bit lengths; this bounds
#: the work behind a single completion)
MAX_EFFECT_LEN = 1 << 30


def _import_rbd() -> tuple[Any, Any]:
    """Any thread: the librados and librbd bindings, or one line saying how to install."""
    try:
        import rados
        import rbd
    except ImportError:
        raise BlockDriverError(
            "driver 'rbd' needs librbd's Python binding (modules 'rados' and 'rbd'): "
            "install the Debian packages python3-rbd and python3-rados") from None
    return rados, rbd


def _errno_of(e: BaseException) -> int:
    """A positive errno from a rados/rbd exception (they carry it as ``errno``)."""
    n = getattr(e, "errno", None)
    return abs(n) if isinstance(n, int) and n else errno.EIO


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
        self.rados, self.rbd = _import_rbd()
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
        conf = opts.get("conf")
        self.cluster: Any = None
        self.ioctx: Any = None
        self.image: Any = None
        rados, rbd = self.rados, self.rbd
        try:
            kw: dict[str, Any] = {"conf": {
                "rbd_cache": "false" if opts.get("cache.direct") else "true"}}
            kw["conffile"] = conf or ""  # "": librados' default search path
            if "user" in opts:
                kw["rados_id"] = opts["user"]
            self.cluster = rados.Rados(**kw)
            self.cluster.connect(timeout=CONNECT_TIMEOUT)
        except (rados.Error, rbd.Error) as e:
            self._close_all()
            raise BlockDriverError(f"error connecting to the Ceph cluster: {e}") from None
        try:
            self.ioctx = self.cluster.open_ioctx(self.pool)
            if self.namespace:
                self.ioctx.set_namespace(self.namespace)
            self.image = rbd.Image(self.ioctx, self.image_name, snapshot=self.snapshot,
                                   read_only=self.read_only)
            self.size: int = self.image.size()
        except (rados.ObjectNotFound, rbd.ImageNotFound):
            self._close_all()
            raise BlockDriverError(
                f"error opening image '{self.image_name}' in pool '{self.pool}'"
                f"{f' namespace {self.namespace!r}' if self.namespace else ''}: "
                "No such file or directory") from None
        except (rados.Error, rbd.Error) as e:
            self._close_all()
            raise BlockDriverError(f"error opening image '{self.filename}': {e}") from None

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

    # -- I/O: submitted in the caller's context, completed on a librbd thread ----------------
    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        size = qiov.size

        def done(comp: Any, data: bytes | None) -> None:
            # librbd finisher thread: the guest buffer is valid until cb runs in ctx.
            ret = comp.get_return_value()
            if ret >= 0 and data is not None:
                n = len(data)
                lib.pyvu_iov_from_buf(qiov.iov, qiov.niov, ffi.from_buffer(data), n)
                if n < size:
                    qiov.memset(0, n)  # past the end reads as zeroes
                ret = 0
            ctx.schedule(cb, ret if ret < 0 else 0)

        self._call(ctx, cb, self.image.aio_read, offset, size, done)

    def aio_pwritev(
        self, ctx: AioContext, offset: int, qiov: IOVector, flags: int, cb: Completion
    ) -> None:
        if flags & BDRV_REQ_FUA:
            cb = self._then_flush(ctx, cb)  # librbd has no FUA: write, then flush
        data = bytearray(qiov.size)
        lib.pyvu_iov_to_buf(qiov.iov, qiov.niov, ffi.from_buffer(data), qiov.size)
        self._call(ctx, cb, self.image.aio_write, bytes(data), offset, self._done(ctx, cb))

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        self._call(ctx, cb, self.image.aio_flush, self._done(ctx, cb))

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        self._ranges(ctx, offset, nbytes, cb, self.image.aio_discard)

    def aio_pwrite_zeroes(
        self, ctx: AioContext, offset: int, nbytes: int, flags: int, cb: Completion
    ) -> None:
        # librbd zeroes by deallocating where it can, whatever MAY_UNMAP says (QEMU does the
        # same); a thin image reads zeroes either way.
        if flags & BDRV_REQ_FUA:
            cb = self._then_flush(ctx, cb)
        self._ranges(ctx, offset, nbytes, cb, self.image.aio_write_zeroes)

    def _ranges(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion,
                op: Any) -> None:
        """Caller's context: one librbd call per MAX_EFFECT_LEN bytes, one after another."""
        n = min(nbytes, MAX_EFFECT_LEN)

        def next_part(ret: int) -> None:
            if ret < 0 or n >= nbytes:
                cb(ret)
            else:
                self._ranges(ctx, offset + n, nbytes - n, cb, op)

        self._call(ctx, next_part, op, offset, n, self._done(ctx, next_part))

    @staticmethod
    def _done(ctx: AioContext, cb: Completion) -> Any:
        def oncomplete(comp: Any) -> None:
            # librbd finisher thread: only hand the result to the caller's context.
            ret = comp.get_return_value()
            ctx.schedule(cb, ret if ret < 0 else 0)
        return oncomplete

    def _call(self, ctx: AioContext, cb: Completion, fn: Any, *args: Any) -> None:
        """Caller's context: submit; a refusal at submission completes the request at once."""
        try:
            fn(*args)
        except (self.rbd.Error, self.rados.Error, OSError) as e:
            cb(-_errno_of(e))

    def _then_flush(self, ctx: AioContext, cb: Completion) -> Completion:
        def done(ret: int) -> None:
            if ret < 0:
                cb(ret)
            else:
                self.aio_flush(ctx, cb)
        return done

    # -- management (main thread) -------------------------------------------------------------
    def truncate(self, size: int) -> None:
        """Main thread, node drained: resize the image (QMP block_resize)."""
        if self.snapshot is not None:
            raise OSError(errno.EROFS, "Cannot resize a snapshot")
        try:
            self.image.resize(size)
        except (self.rbd.Error, self.rados.Error) as e:
            raise OSError(_errno_of(e), f"rbd resize failed: {e}") from None
        self.size = self.image.size()

    def close(self) -> None:
        """Main thread, node drained."""
        self._close_all()

    def _close_all(self) -> None:
        for name, method in (("image", "close"), ("ioctx", "close"), ("cluster", "shutdown")):
            obj = getattr(self, name, None)
            setattr(self, name, None)
            if obj is not None:
                try:
                    getattr(obj, method)()
                except Exception as e:  # closing must not fail the caller
                    log.warning("rbd node '%s': %s.%s failed: %s", self.node_name, name,
                                method, e)
