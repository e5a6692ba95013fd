"""BlockBackend: what a device (here, a virtio-blk export) sees of the block layer.

Theory of operation
-------------------
This is QEMU's ``block/block-backend.c`` carried into Python, keeping its names so the two can
be read side by side.  A BlockBackend (``blk``) is created with ``blk_new``, gets its root node
with ``blk_insert_bs``, and serves asynchronous requests:

* ``blk_aio_preadv`` / ``blk_aio_pwritev`` / ``blk_aio_flush`` check the request
  (``blk_check_byte_request``: no medium → -ENOMEDIUM, negative offset, beyond the end or larger
  than INT_MAX → -EIO), count it in flight (``blk_inc_in_flight``), pass it to the root node's
  driver, and call ``cb(ret)`` when it is done.
* Like QEMU, the completion callback never runs inside the ``blk_aio_*`` call itself: a driver
  that finishes synchronously is deferred to a bottom half (``has_returned``).
* Completions run in the AioContext that submitted the request (the caller's, found with
  ``current_aio_context()``): a multiqueue device submits from several iothreads at once.
* ``blk_dec_in_flight`` kicks ``aio_wait`` so that drains waiting for zero make progress.
* With the write cache disabled (``blk_set_enable_write_cache(False)``), writes carry FUA.

Threads: any function may be called from any AioContext's home thread; shared counters are
protected by a lock (``in_flight``) or by BlockAcctStats' own lock.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable

from blocklayer.accounting import BlockAcctStats, BlockAcctType
from blocklayer.aio import AioContext, aio_wait_kick, aio_wait_until, current_aio_context
from blocklayer.bdrv import BDRV_REQ_FUA, BlockDriverState, bdrv_unref
from blocklayer.iov import IOVector

INT_MAX = 2**31 - 1

BLK_PERM_CONSISTENT_READ = 0x01
BLK_PERM_WRITE = 0x02
BLK_PERM_WRITE_UNCHANGED = 0x04
BLK_PERM_RESIZE = 0x08
BLK_PERM_ALL = 0x1F

Completion = Callable[[int], None]

_all_blks: list[BlockBackend] = []


class BlockBackend:
    """A device's handle on the block graph (see the module docstring)."""

    def __init__(self, ctx: AioContext, perm: int, shared_perm: int) -> None:
        self.ctx = ctx
        self.perm = perm
        self.shared_perm = shared_perm
        self.refcnt = 1
        self.root: BlockDriverState | None = None
        self.name = ""
        self.enable_write_cache = True
        self.allow_write_beyond_eof = False
        self.in_flight = 0
        self._in_flight_lock = threading.Lock()
        self.stats = BlockAcctStats()
        self.dev: object | None = None


def blk_new(ctx: AioContext, perm: int, shared_perm: int) -> BlockBackend:
    """A new BlockBackend with no root node, one reference, in ``ctx``."""
    blk = BlockBackend(ctx, perm, shared_perm)
    _all_blks.append(blk)
    return blk


def blk_ref(blk: BlockBackend) -> None:
    blk.refcnt += 1


def blk_unref(blk: BlockBackend) -> None:
    """Drop a reference; the last one drains, detaches the root node and frees the backend."""
    assert blk.refcnt > 0
    blk.refcnt -= 1
    if blk.refcnt == 0:
        blk_remove_bs(blk)
        if blk in _all_blks:
            _all_blks.remove(blk)


def blk_all() -> list[BlockBackend]:
    return list(_all_blks)


def blk_bs(blk: BlockBackend) -> BlockDriverState | None:
    return blk.root


def blk_insert_bs(blk: BlockBackend, bs: BlockDriverState) -> None:
    """Attach ``bs`` as the root node.  Raises PermissionError if the node cannot grant
    the permissions the backend asked for (a writer on a read-only node)."""
    assert blk.root is None
    if blk.perm & BLK_PERM_WRITE and (bs.read_only or not bs.drv.can_write()):
        raise PermissionError(f"Block node '{bs.node_name}' is read-only")
    bs.refcnt += 1
    bs.parents.append(blk)
    blk.root = bs


def blk_remove_bs(blk: BlockBackend) -> None:
    """Detach the root node (if any), dropping the backend's reference on it."""
    bs = blk.root
    if bs is None:
        return
    blk.root = None
    bs.parents.remove(blk)
    bdrv_unref(bs)


def blk_name(blk: BlockBackend) -> str:
    return blk.name


def blk_is_inserted(blk: BlockBackend) -> bool:
    return blk.root is not None


def blk_is_available(blk: BlockBackend) -> bool:
    """A medium is inserted (tray logic arrives with BlockDevOps)."""
    return blk_is_inserted(blk)


def blk_is_read_only(blk: BlockBackend) -> bool:
    bs = blk.root
    return bs.bdrv_is_read_only() if bs is not None else False


def blk_getlength(blk: BlockBackend) -> int:
    """Length in bytes, or -ENOMEDIUM."""
    if not blk_is_available(blk):
        return -errno.ENOMEDIUM
    return blk.root.bdrv_getlength()


def blk_nb_sectors(blk: BlockBackend) -> int:
    length = blk_getlength(blk)
    return length if length < 0 else length >> 9


def blk_get_aio_context(blk: BlockBackend) -> AioContext:
    return blk.ctx


def blk_enable_write_cache(blk: BlockBackend) -> bool:
    return blk.enable_write_cache


def blk_set_enable_write_cache(blk: BlockBackend, wce: bool) -> None:
    blk.enable_write_cache = wce


def blk_get_stats(blk: BlockBackend) -> BlockAcctStats:
    return blk.stats


def blk_check_byte_request(blk: BlockBackend, offset: int, size: int) -> int:
    """0 if the request may proceed, else the negative errno QEMU returns."""
    if size > INT_MAX:
        return -errno.EIO
    if not blk_is_available(blk):
        return -errno.ENOMEDIUM
    if offset < 0:
        return -errno.EIO
    if not blk.allow_write_beyond_eof:
        length = blk_getlength(blk)
        if length < 0:
            return length
        if offset > length or length - offset < size:
            return -errno.EIO
    return 0


def blk_inc_in_flight(blk: BlockBackend) -> None:
    with blk._in_flight_lock:
        blk.in_flight += 1


def blk_dec_in_flight(blk: BlockBackend) -> None:
    with blk._in_flight_lock:
        blk.in_flight -= 1
        zero = blk.in_flight == 0
    if zero:
        aio_wait_kick()


class _Acb:
    """BlkAioEmAIOCB: one request's bookkeeping."""

    __slots__ = ("blk", "ctx", "cb", "kind", "nbytes", "start", "has_returned", "ret")

    def __init__(self, blk: BlockBackend, cb: Completion, kind: BlockAcctType, nbytes: int):
        self.blk = blk
        self.ctx = current_aio_context()
        self.cb = cb
        self.kind = kind
        self.nbytes = nbytes
        self.start = time.monotonic_ns()
        self.has_returned = False
        self.ret: int | None = None

    def complete(self, ret: int) -> None:
        """Driver completion (in self.ctx).  Defer if the submitting call has not returned."""
        self.ret = ret
        if self.has_returned:
            self._finish()

    def _finish(self) -> None:
        blk, ret = self.blk, self.ret
        latency = time.monotonic_ns() - self.start
        if ret < 0:
            blk.stats.block_acct_failed(self.kind, latency)
        else:
            blk.stats.block_acct_done(self.kind, self.nbytes, latency)
        self.cb(ret)
        blk_dec_in_flight(blk)

    def returned(self) -> None:
        self.has_returned = True
        if self.ret is not None:
            self.ctx.schedule(self._finish)


def _blk_aio_prwv(
    blk: BlockBackend, offset: int, qiov: IOVector, flags: int, cb: Completion, write: bool
) -> None:
    kind = BlockAcctType.WRITE if write else BlockAcctType.READ
    blk_inc_in_flight(blk)
    acb = _Acb(blk, cb, kind, qiov.size)
    ret = blk_check_byte_request(blk, offset, qiov.size)
    if ret == 0 and write and blk_is_read_only(blk):
        ret = -errno.EPERM
    if ret < 0:
        acb.complete(ret)
    else:
        drv = blk.root.drv
        if write:
            if not blk.enable_write_cache:
                flags |= BDRV_REQ_FUA
            drv.aio_pwritev(acb.ctx, offset, qiov, flags, acb.complete)
        else:
            drv.aio_preadv(acb.ctx, offset, qiov, acb.complete)
    acb.returned()


def blk_aio_preadv(
    blk: BlockBackend, offset: int, qiov: IOVector, flags: int, cb: Completion
) -> None:
    """Read ``qiov.size`` bytes at ``offset`` into ``qiov``; ``cb(ret)`` in the caller's
    context, ret 0 or a negative errno."""
    _blk_aio_prwv(blk, offset, qiov, flags, cb, write=False)


def blk_aio_pwritev(
    blk: BlockBackend, offset: int, qiov: IOVector, flags: int, cb: Completion
) -> None:
    """Write ``qiov`` at ``offset``; ``cb(ret)`` in the caller's context."""
    _blk_aio_prwv(blk, offset, qiov, flags, cb, write=True)


def blk_aio_flush(blk: BlockBackend, cb: Completion) -> None:
    """Flush the root node's writes to stable storage; ``cb(ret)`` in the caller's context."""
    blk_inc_in_flight(blk)
    acb = _Acb(blk, cb, BlockAcctType.FLUSH, 0)
    if not blk_is_available(blk):
        acb.complete(-errno.ENOMEDIUM)
    else:
        blk.root.drv.aio_flush(acb.ctx, acb.complete)
    acb.returned()


def blk_drain(blk: BlockBackend, then: Callable[[], None]) -> None:
    """Main thread: call ``then()`` once no request of ``blk`` is in flight."""
    aio_wait_until(lambda: blk.in_flight == 0, then)
