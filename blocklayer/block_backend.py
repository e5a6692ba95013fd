"""BlockBackend: what a device (here, a virtio-blk export) sees of the block layer.

Theory of operation
-------------------
This is QEMU's ``block/block-backend.c`` carried into Python, keeping its names so the two can
be read side by side.  A BlockBackend (``blk``) is created with ``blk_new(ctx, perm, shared)``,
gets its root node with ``blk_insert_bs``, and serves asynchronous requests:

* ``blk_aio_preadv`` / ``blk_aio_pwritev`` / ``blk_aio_flush`` / ``blk_aio_pdiscard`` /
  ``blk_aio_pwrite_zeroes`` check the request (``blk_check_byte_request``: no medium or an open
  tray → -ENOMEDIUM, negative offset, beyond the end or larger than INT_MAX → -EIO), count it in
  flight, pass it to the root node's driver, and call ``cb(ret)`` when it is done (0 or a
  negative errno).  The callback never runs inside the ``blk_aio_*`` call itself.
* Completions run in the AioContext that submitted the request (``current_aio_context()``):
  a multiqueue device submits from several iothreads at once.
* **Drain.**  ``bdrv_drained_begin(node)`` calls ``root_drained_begin`` on every parent: the
  quiesce counter goes up and, on 0 → 1, the device's ``drained_begin`` stops it from submitting.
  ``root_drained_poll`` is true while requests (or the device's own) are in flight.  A request
  that still arrives while the counter is non-zero is *queued* (``blk_wait_while_drained``), not
  counted in flight, and resubmitted in its own context when the section ends — never failed or
  dropped — unless the device disabled queuing (exports do, as QEMU's do: they stop popping
  from their rings instead, and count what they already popped in ``drained_poll``).
* **Error policy.**  ``blk_get_error_action`` maps ``rerror``/``werror`` (report, ignore,
  enospc, stop) and an errno to an action; ``blk_error_action`` updates ``iostatus`` and sends
  BLOCK_IO_ERROR.  Keeping and retrying requests on ``stop`` is the device's job.
* **Permissions.**  A BlockBackend asks for ``perm`` and shares ``shared_perm``; the node
  combines its parents' wishes, refuses conflicts between them, and hands the result to its
  driver (which locks the image file as QEMU does).
* With the write cache disabled (``blk_set_enable_write_cache(False)``), writes carry FUA.

Threads: ``blk_aio_*`` run in any AioContext's home thread; everything else in the main
thread.  State shared between threads (in-flight count, quiesce counter, queued requests) is
changed under ``blk._lock``.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from blocklayer.accounting import BlockAcctStats, BlockAcctType
from blocklayer.aio import AioContext, aio_wait_kick, aio_wait_until, current_aio_context
from blocklayer.bdrv import (
    BDRV_REQ_FUA,
    DRV_NONE,
    BlockDriverState,
    FastPathInfo,
    bdrv_drained_begin,
    bdrv_drained_end,
    bdrv_unref,
)
from blocklayer.dev_ops import BlockDevOps
from blocklayer.events import qapi_event_send
from blocklayer.graph import (  # noqa: F401 - the permission bits are re-exported
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    bdrv_refresh_perms,
)
from blocklayer.io import (
    bdrv_aio_flush,
    bdrv_aio_pdiscard,
    bdrv_aio_preadv,
    bdrv_aio_pwrite_zeroes,
    bdrv_aio_pwritev,
)
from blocklayer.iov import IOVector
from vhost.ffi import ffi, lib

INT_MAX = 2**31 - 1

Completion = Callable[[int], None]


class BlockdevOnError(StrEnum):
    REPORT = "report"
    IGNORE = "ignore"
    ENOSPC = "enospc"
    STOP = "stop"
    AUTO = "auto"


class BlockErrorAction(StrEnum):
    REPORT = "report"
    IGNORE = "ignore"
    STOP = "stop"


class BlockDeviceIoStatus(StrEnum):
    OK = "ok"
    FAILED = "failed"
    NOSPACE = "nospace"


class BlockBackend:
    """A device's handle on the block graph (see the module docstring)."""

    def __init__(self, ctx: AioContext, perm: int, shared_perm: int) -> None:
        self.ctx = ctx
        self.perm = perm
        self.shared_perm = shared_perm
        self.refcnt = 1
        self.root: BlockDriverState | None = None
        self.name = ""
        self.dev: Any = None
        self.dev_ops: BlockDevOps | None = None
        self.root_state_read_only = False
        self.enable_write_cache = True
        self.allow_write_beyond_eof = False
        self.allow_aio_context_change = False
        self.disable_request_queuing = False
        self.iostatus_enabled = False
        self.iostatus = BlockDeviceIoStatus.OK
        self.on_read_error = BlockdevOnError.REPORT
        self.on_write_error = BlockdevOnError.ENOSPC
        self.quiesce_counter = 0
        self.queued_requests: collections.deque[tuple[AioContext, Callable[[], None]]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        #: state shared with the C request path (vhost/csrc/blkstate.c): in-flight count,
        #: accounting, and the flags that decide which path serves a request
        self.c = ffi.new("struct pyvu_blkstate *")
        lib.pyvu_blk_init(self.c)
        self.stats = BlockAcctStats(c=self.c)
        self.insert_bs_notifiers: list[Callable[[BlockBackend], None]] = []
        self.remove_bs_notifiers: list[Callable[[BlockBackend], None]] = []
        self.aio_context_notifiers: list[Callable[[AioContext], None]] = []

    def update_c_state(self) -> None:
        """Main thread: refresh what the C request path reads (length, driver, flags).  Called
        whenever one of them may have changed: medium, size, tray, permissions, cache mode."""
        c, bs = self.c, self.root
        c.length = blk_getlength(self) if blk_is_available(self) else -1
        c.wce = int(self.enable_write_cache)
        c.writable = int(bool(self.perm & BLK_PERM_WRITE) and not blk_is_read_only(self))
        info = bs.drv.fast_path_info() if bs is not None else FastPathInfo()
        kind = info.kind
        if bs is not None and bs.detect_zeroes != "off":
            kind = DRV_NONE  # only Python implements detect-zeroes
        c.driver, c.fd, c.offset = kind, info.fd, info.offset
        # Requests the root cannot take as they are (O_DIRECT alignment) go to the node graph
        # request by request, whose block/io.c layer pads them (blocklayer/io.py).
        c.align_mask = bs.request_alignment - 1 if bs is not None else 0
        c.mem_mask = bs.mem_alignment - 1 if bs is not None else 0
        c.read_zeroes, c.no_flush = int(info.read_zeroes), int(info.no_flush)

    @property
    def in_flight(self) -> int:
        """Requests of this backend in flight, from either path."""
        return self.c.in_flight

    # -- the BdrvChild side: called by the root node (main thread) ------------------------
    role = "root"

    def parent_desc(self) -> str:
        return self.name or "a block device"

    def root_drained_begin(self) -> None:
        with self._lock:
            self.quiesce_counter += 1
            first = self.quiesce_counter == 1
        if first and self.dev_ops and self.dev_ops.drained_begin:
            self.dev_ops.drained_begin()

    def root_drained_poll(self) -> bool:
        busy = self.in_flight > 0
        if self.dev_ops and self.dev_ops.drained_poll:
            busy = self.dev_ops.drained_poll() or busy
        return busy

    def root_drained_end(self) -> None:
        with self._lock:
            assert self.quiesce_counter > 0
            self.quiesce_counter -= 1
            last = self.quiesce_counter == 0
            queued = list(self.queued_requests) if last else []
            if last:
                self.queued_requests.clear()
        if last and self.dev_ops and self.dev_ops.drained_end:
            self.dev_ops.drained_end()
        for ctx, resume in queued:  # restart in the context that submitted them
            ctx.schedule(resume)

    def root_resize(self) -> None:
        self.update_c_state()
        if self.dev_ops and self.dev_ops.resize_cb:
            self.dev_ops.resize_cb()

    def root_change_media(self, load: bool) -> None:
        blk_dev_change_media_cb(self, load)


# -- life cycle (main thread) --------------------------------------------------------------
_all_blks: list[BlockBackend] = []


def blk_new(ctx: AioContext, perm: int, shared_perm: int) -> BlockBackend:
    """A new BlockBackend with no root node, one reference, in ``ctx``."""
    blk = BlockBackend(ctx, perm, shared_perm)
    _all_blks.append(blk)
    return blk


def blk_ref(blk: BlockBackend) -> None:
    blk.refcnt += 1


def blk_unref(blk: BlockBackend) -> None:
    """Drop a reference; the last one detaches the root node and frees the backend.
    The caller must have drained it (no request in flight)."""
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


def blk_name(blk: BlockBackend) -> str:
    return blk.name


def blk_set_perm(blk: BlockBackend, perm: int, shared_perm: int) -> None:
    """Change the permissions the user of ``blk`` needs/shares; raises PermissionError (and
    changes nothing) if a node of the graph below or another user of the image refuses."""
    bs = blk.root
    if bs is not None:
        bdrv_refresh_perms(bs, blk, perm, shared_perm)
    blk.perm, blk.shared_perm = perm, shared_perm
    blk.update_c_state()


def blk_insert_bs(blk: BlockBackend, bs: BlockDriverState) -> None:
    """Attach ``bs`` as the root node.  Raises PermissionError if a node of the graph below,
    another parent, or another process holding an image cannot grant ``blk``'s permissions."""
    assert blk.root is None
    bdrv_refresh_perms(bs, blk, blk.perm, blk.shared_perm)
    bs.refcnt += 1
    bs.parents.append(blk)
    blk.root = bs
    for _ in range(bs.quiesce_counter):  # attaching to a drained node drains us too
        blk.root_drained_begin()
    blk.update_c_state()
    for n in list(blk.insert_bs_notifiers):
        n(blk)


def blk_remove_bs(blk: BlockBackend) -> None:
    """Detach the root node (if any), keeping its read-only flag as the root state.
    The caller must have drained ``blk``."""
    bs = blk.root
    if bs is None:
        return
    for n in list(blk.remove_bs_notifiers):
        n(blk)
    blk.root_state_read_only = bs.read_only
    for _ in range(bs.quiesce_counter):
        blk.root_drained_end()
    blk.root = None
    bs.parents.remove(blk)
    blk.update_c_state()
    try:
        bdrv_refresh_perms(bs)
    except PermissionError:
        pass  # giving up permissions cannot conflict
    bdrv_unref(bs)


# -- device model ----------------------------------------------------------------------------
def blk_attach_dev(blk: BlockBackend, dev: Any) -> None:
    blk.dev = dev
    blk.iostatus_enabled = False
    blk.iostatus = BlockDeviceIoStatus.OK


def blk_set_dev_ops(blk: BlockBackend, ops: BlockDevOps) -> None:
    """Register the device's callbacks; a device attached to a drained node is told so."""
    blk.dev_ops = ops
    if blk.quiesce_counter and ops.drained_begin:
        ops.drained_begin()


def blk_dev_has_removable_media(blk: BlockBackend) -> bool:
    return blk.dev is None or bool(blk.dev_ops and blk.dev_ops.change_media_cb)


def blk_dev_has_tray(blk: BlockBackend) -> bool:
    return bool(blk.dev_ops and blk.dev_ops.is_tray_open)


def blk_dev_is_tray_open(blk: BlockBackend) -> bool:
    if blk_dev_has_tray(blk):
        return blk.dev_ops.is_tray_open()
    return False


def blk_dev_is_medium_locked(blk: BlockBackend) -> bool:
    if blk.dev_ops and blk.dev_ops.is_medium_locked:
        return blk.dev_ops.is_medium_locked()
    return False


def blk_dev_eject_request(blk: BlockBackend, force: bool) -> None:
    if blk.dev_ops and blk.dev_ops.eject_request_cb:
        blk.dev_ops.eject_request_cb(force)


def blk_dev_change_media_cb(blk: BlockBackend, load: bool) -> None:
    """Tell the device a medium was loaded/ejected; sends DEVICE_TRAY_MOVED if its tray moved.
    A refused load raises ValueError."""
    if blk.dev_ops and blk.dev_ops.change_media_cb:
        was_open = blk_dev_is_tray_open(blk)
        blk.dev_ops.change_media_cb(load)
        is_open = blk_dev_is_tray_open(blk)
        blk.update_c_state()
        if was_open != is_open:
            qapi_event_send(
                "DEVICE_TRAY_MOVED",
                {"device": blk.name, "id": getattr(blk.dev, "id", blk.name), "tray-open": is_open},
            )


def blk_dev_resize_cb(blk: BlockBackend) -> None:
    blk.root_resize()


# -- state queries -----------------------------------------------------------------------------
def blk_is_inserted(blk: BlockBackend) -> bool:
    return blk.root is not None


def blk_is_available(blk: BlockBackend) -> bool:
    """A medium is inserted and the tray (if any) is closed."""
    return blk_is_inserted(blk) and not blk_dev_is_tray_open(blk)


def blk_is_read_only(blk: BlockBackend) -> bool:
    bs = blk.root
    return bs.bdrv_is_read_only() if bs is not None else blk.root_state_read_only


def blk_is_writable(blk: BlockBackend) -> bool:
    return bool(blk.perm & BLK_PERM_WRITE)


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


def blk_set_aio_context(blk: BlockBackend, ctx: AioContext) -> None:
    """Main thread, drained: move the backend's home context; notifies the device."""
    blk.ctx = ctx
    for n in list(blk.aio_context_notifiers):
        n(ctx)


def blk_set_allow_aio_context_change(blk: BlockBackend, allow: bool) -> None:
    blk.allow_aio_context_change = allow


def blk_set_disable_request_queuing(blk: BlockBackend, disable: bool) -> None:
    blk.disable_request_queuing = disable


def blk_enable_write_cache(blk: BlockBackend) -> bool:
    return blk.enable_write_cache


def blk_set_enable_write_cache(blk: BlockBackend, wce: bool) -> None:
    blk.enable_write_cache = wce
    blk.c.wce = int(wce)


def blk_get_stats(blk: BlockBackend) -> BlockAcctStats:
    return blk.stats


# -- error policy and iostatus -----------------------------------------------------------------
def blk_set_on_error(blk: BlockBackend, on_read_error: BlockdevOnError,
                     on_write_error: BlockdevOnError) -> None:
    blk.on_read_error = on_read_error
    blk.on_write_error = on_write_error


def blk_get_on_error(blk: BlockBackend, is_read: bool) -> BlockdevOnError:
    return blk.on_read_error if is_read else blk.on_write_error


def blk_get_error_action(blk: BlockBackend, is_read: bool, error: int) -> BlockErrorAction:
    """``error`` is a positive errno."""
    on_err = blk_get_on_error(blk, is_read)
    if on_err == BlockdevOnError.ENOSPC:
        return BlockErrorAction.STOP if error == errno.ENOSPC else BlockErrorAction.REPORT
    if on_err == BlockdevOnError.STOP:
        return BlockErrorAction.STOP
    if on_err == BlockdevOnError.IGNORE:
        return BlockErrorAction.IGNORE
    return BlockErrorAction.REPORT


def blk_iostatus_enable(blk: BlockBackend) -> None:
    blk.iostatus_enabled = True
    blk.iostatus = BlockDeviceIoStatus.OK


def blk_iostatus_is_enabled(blk: BlockBackend) -> bool:
    """Enabled by the device *and* some policy stops on errors."""
    return blk.iostatus_enabled and (
        blk.on_write_error in (BlockdevOnError.ENOSPC, BlockdevOnError.STOP)
        or blk.on_read_error == BlockdevOnError.STOP
    )


def blk_iostatus_reset(blk: BlockBackend) -> None:
    if blk_iostatus_is_enabled(blk):
        blk.iostatus = BlockDeviceIoStatus.OK


def blk_iostatus_set_err(blk: BlockBackend, error: int) -> None:
    if blk.iostatus == BlockDeviceIoStatus.OK:
        blk.iostatus = (
            BlockDeviceIoStatus.NOSPACE if error == errno.ENOSPC else BlockDeviceIoStatus.FAILED
        )


def blk_error_action(blk: BlockBackend, action: BlockErrorAction, is_read: bool,
                     error: int) -> None:
    """Record an I/O error the device is handling with ``action`` (positive errno); sends
    BLOCK_IO_ERROR.  Any thread."""
    if action == BlockErrorAction.STOP and blk_iostatus_is_enabled(blk):
        blk_iostatus_set_err(blk, error)
    bs = blk.root
    data: dict[str, Any] = {
        "device": blk.name,
        "operation": "read" if is_read else "write",
        "action": action.value,
        "reason": os.strerror(error),
    }
    if bs is not None:
        data["node-name"] = bs.node_name
    if blk_iostatus_is_enabled(blk):
        data["nospace"] = error == errno.ENOSPC
    qapi_event_send("BLOCK_IO_ERROR", data)


# -- requests ------------------------------------------------------------------------------
def blk_check_byte_request(blk: BlockBackend, offset: int, size: int) -> int:
    """0 if the request may proceed, else the negative errno QEMU returns."""
    if size > INT_MAX or size < 0:
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
    lib.pyvu_blk_in_flight_add(blk.c, 1)


def blk_dec_in_flight(blk: BlockBackend) -> None:
    if lib.pyvu_blk_in_flight_add(blk.c, -1) == 0:
        aio_wait_kick()


def _blk_start(blk: BlockBackend, ctx: AioContext, start: Callable[[], None]) -> bool:
    """blk_wait_while_drained + blk_inc_in_flight, atomically: True if the request may run
    now (and is counted in flight), False if it was queued until the drained section ends."""
    with blk._lock:
        if blk.quiesce_counter and not blk.disable_request_queuing:
            blk.queued_requests.append((ctx, start))
            return False
        lib.pyvu_blk_in_flight_add(blk.c, 1)
        return True


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
        """Driver completion (in self.ctx).  Deferred if the submitting call has not returned."""
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


def _blk_aio(blk: BlockBackend, kind: BlockAcctType, nbytes: int, cb: Completion,
             check: Callable[[], int], submit: Callable[[_Acb], None]) -> None:
    """The common shape of every blk_aio_*: queue while drained, check, submit, defer."""
    ctx = current_aio_context()

    def start() -> None:
        if not _blk_start(blk, ctx, start):
            return
        acb = _Acb(blk, cb, kind, nbytes)
        ret = check()
        if ret < 0:
            acb.complete(ret)
        else:
            submit(acb)
        acb.returned()

    start()


def _check_write(blk: BlockBackend, offset: int, nbytes: int) -> int:
    ret = blk_check_byte_request(blk, offset, nbytes)
    if ret == 0 and (blk_is_read_only(blk) or not blk.perm & BLK_PERM_WRITE):
        ret = -errno.EPERM
    return ret


def blk_aio_preadv(
    blk: BlockBackend, offset: int, qiov: IOVector, flags: int, cb: Completion
) -> None:
    """Read ``qiov.size`` bytes at ``offset`` into ``qiov``; ``cb(ret)`` in the caller's
    context, ret 0 or a negative errno."""
    _blk_aio(
        blk, BlockAcctType.READ, qiov.size, cb,
        lambda: blk_check_byte_request(blk, offset, qiov.size),
        lambda acb: bdrv_aio_preadv(blk.root, acb.ctx, offset, qiov, acb.complete),
    )


def blk_aio_pwritev(
    blk: BlockBackend, offset: int, qiov: IOVector, flags: int, cb: Completion
) -> None:
    """Write ``qiov`` at ``offset``; ``cb(ret)`` in the caller's context.  With the write
    cache disabled the write is FUA (stable when it completes)."""

    def submit(acb: _Acb) -> None:
        f = flags if blk.enable_write_cache else flags | BDRV_REQ_FUA
        bdrv_aio_pwritev(blk.root, acb.ctx, offset, qiov, f, acb.complete)

    _blk_aio(blk, BlockAcctType.WRITE, qiov.size, cb,
             lambda: _check_write(blk, offset, qiov.size), submit)


def blk_aio_flush(blk: BlockBackend, cb: Completion) -> None:
    """Flush the root node's writes to stable storage; ``cb(ret)`` in the caller's context."""
    _blk_aio(
        blk, BlockAcctType.FLUSH, 0, cb,
        lambda: 0 if blk_is_available(blk) else -errno.ENOMEDIUM,
        lambda acb: bdrv_aio_flush(blk.root, acb.ctx, acb.complete),
    )


def blk_aio_pdiscard(blk: BlockBackend, offset: int, nbytes: int, cb: Completion) -> None:
    """Discard a range.  On a node with ``discard=ignore`` (QEMU's default) this succeeds
    without touching the image."""

    def submit(acb: _Acb) -> None:
        bdrv_aio_pdiscard(blk.root, acb.ctx, offset, nbytes, acb.complete)

    _blk_aio(blk, BlockAcctType.UNMAP, nbytes, cb,
             lambda: _check_write(blk, offset, nbytes), submit)


def blk_aio_pwrite_zeroes(
    blk: BlockBackend, offset: int, nbytes: int, flags: int, cb: Completion
) -> None:
    """Make a range read as zeroes.  BDRV_REQ_MAY_UNMAP lets the driver deallocate it, but
    only on a node with ``discard=unmap``."""

    def submit(acb: _Acb) -> None:
        f = flags if blk.enable_write_cache else flags | BDRV_REQ_FUA
        bdrv_aio_pwrite_zeroes(blk.root, acb.ctx, offset, nbytes, f, acb.complete)

    _blk_aio(blk, BlockAcctType.WRITE, nbytes, cb,
             lambda: _check_write(blk, offset, nbytes), submit)


# -- whole-backend operations (main thread) ---------------------------------------------------
def blk_truncate(blk: BlockBackend, size: int) -> None:
    """Resize the medium.  Needs BLK_PERM_RESIZE; raises OSError / PermissionError."""
    from blocklayer.bdrv import bdrv_truncate

    if not blk_is_available(blk):
        raise OSError(errno.ENOMEDIUM, "No medium inserted")
    if not blk.perm & BLK_PERM_RESIZE:
        raise PermissionError("Resize needs the 'resize' permission")
    bdrv_truncate(blk.root, size)


def blk_drain(blk: BlockBackend, then: Callable[[], None]) -> None:
    """Main thread: call ``then()`` once no request of ``blk`` is in flight (requests keep
    arriving meanwhile are held back by a drained section on the root node)."""
    bs = blk.root
    if bs is not None:
        bdrv_drained_begin(bs)

    def done() -> None:
        if bs is not None:
            bdrv_drained_end(bs)
        then()

    aio_wait_until(lambda: blk.in_flight == 0 and not blk.root_drained_poll(), done)


def blk_drain_all(then: Callable[[], None]) -> None:
    """Main thread: quiesce every BlockBackend at once, call ``then()`` when none has a
    request in flight, and end the drained sections (bdrv_drain_all_begin/end)."""
    blks = list(_all_blks)
    nodes = {id(b.root): b.root for b in blks if b.root is not None}
    for bs in nodes.values():
        bdrv_drained_begin(bs)

    def idle() -> bool:
        return all(b.in_flight == 0 and not b.root_drained_poll() for b in blks)

    def done() -> None:
        then()
        for bs in nodes.values():
            bdrv_drained_end(bs)

    aio_wait_until(idle, done)
