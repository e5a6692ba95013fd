"""BlockBackend contracts (blocklayer/block_backend.py's module docstring), one by one.

Requests go to small fake drivers whose requests complete only when the test says so, so the
timing of drain, queuing and completion is under the test's control.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from blocklayer.accounting import DEFAULT_BOUNDARIES_NS, BlockAcctStats, BlockAcctType
from blocklayer.aio import AioContext, aio_wait_kick, current_aio_context
from blocklayer.bdrv import (
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BlockDriver,
    BlockDriverState,
    bdrv_drain_poll,
    bdrv_drained_begin,
    bdrv_drained_end,
)
from blocklayer.block_backend import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    BlockDeviceIoStatus,
    BlockdevOnError,
    BlockErrorAction,
    blk_aio_flush,
    blk_aio_pdiscard,
    blk_aio_preadv,
    blk_aio_pwrite_zeroes,
    blk_aio_pwritev,
    blk_all,
    blk_attach_dev,
    blk_bs,
    blk_check_byte_request,
    blk_dev_change_media_cb,
    blk_dev_has_removable_media,
    blk_dev_has_tray,
    blk_dev_is_tray_open,
    blk_drain,
    blk_drain_all,
    blk_error_action,
    blk_get_error_action,
    blk_getlength,
    blk_insert_bs,
    blk_iostatus_enable,
    blk_iostatus_is_enabled,
    blk_iostatus_reset,
    blk_is_available,
    blk_is_inserted,
    blk_is_read_only,
    blk_new,
    blk_ref,
    blk_remove_bs,
    blk_set_dev_ops,
    blk_set_disable_request_queuing,
    blk_set_enable_write_cache,
    blk_set_on_error,
    blk_set_perm,
    blk_truncate,
    blk_unref,
)
from blocklayer.dev_ops import BlockDevOps
from blocklayer.events import set_event_emitter
from blocklayer.iothread import IOThread
from blocklayer.iov import IOVector
from tests.unit.conftest import drain_bhs, pattern, run_until, unique

SIZE = 1 << 20
RW = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE
READ, WRITE, FLUSH, UNMAP = (
    BlockAcctType.READ, BlockAcctType.WRITE, BlockAcctType.FLUSH, BlockAcctType.UNMAP,
)


# -- fakes and helpers --------------------------------------------------------------------------
class Req:
    """One request as the driver saw it."""

    def __init__(self, op: str, offset: int, nbytes: int, flags: int, ctx: AioContext,
                 cb: Callable[[int], None]) -> None:
        self.op, self.offset, self.nbytes, self.flags, self.ctx, self.cb = (
            op, offset, nbytes, flags, ctx, cb)

    def complete(self, ret: int = 0) -> None:
        """Complete it the way a driver must: in the context that submitted it."""
        self.ctx.schedule(self.cb, ret)


class FakeDriver(BlockDriver):
    """Records requests and permission changes; completes requests only when told to
    (``hold=True``) or at once with ``rets[op]`` (default 0)."""

    format_name = "unit-fake"

    def __init__(self, size: int = SIZE, hold: bool = True) -> None:
        super().__init__("fake", {})
        self.size = size
        self.hold = hold
        self.rets: dict[str, int] = {}
        self.requests: list[Req] = []
        self.perm_calls: list[tuple[int, int]] = []
        self.closed = False

    def getlength(self) -> int:
        return self.size

    def _req(self, op: str, ctx: AioContext, offset: int, nbytes: int, flags: int,
             cb: Callable[[int], None]) -> None:
        r = Req(op, offset, nbytes, flags, ctx, cb)
        self.requests.append(r)
        if not self.hold:
            cb(self.rets.get(op, 0))

    def aio_preadv(self, ctx, offset, qiov, cb):
        self._req("read", ctx, offset, qiov.size, 0, cb)

    def aio_pwritev(self, ctx, offset, qiov, flags, cb):
        self._req("write", ctx, offset, qiov.size, flags, cb)

    def aio_flush(self, ctx, cb):
        self._req("flush", ctx, 0, 0, 0, cb)

    def aio_pdiscard(self, ctx, offset, nbytes, cb):
        self._req("discard", ctx, offset, nbytes, 0, cb)

    def aio_pwrite_zeroes(self, ctx, offset, nbytes, flags, cb):
        self._req("write_zeroes", ctx, offset, nbytes, flags, cb)

    def set_perm(self, perm: int, shared: int) -> None:
        self.perm_calls.append((perm, shared))

    def truncate(self, size: int) -> None:
        self.size = size

    def close(self) -> None:
        self.closed = True


def fake_bs(hold: bool = True, read_only: bool = False, discard: str = "ignore",
            size: int = SIZE) -> BlockDriverState:
    return BlockDriverState(unique("fake"), FakeDriver(size, hold), read_only, discard=discard)


def qiov(n: int, fill: int = 0) -> IOVector:
    return IOVector.from_buffers([bytearray([fill]) * n])


class Results:
    def __init__(self) -> None:
        self.rets: list[int] = []

    def __call__(self, ret: int) -> None:
        self.rets.append(ret)


class CompletionLog:
    """Completion callbacks by tag, with the context and thread each ran in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[tuple[Any, int, AioContext, int]] = []

    def cb(self, tag: Any) -> Callable[[int], None]:
        def done(ret: int) -> None:
            with self.lock:
                self.entries.append((tag, ret, current_aio_context(), threading.get_ident()))
        return done

    def __len__(self) -> int:
        with self.lock:
            return len(self.entries)

    def tags(self) -> list[Any]:
        with self.lock:
            return [e[0] for e in self.entries]


class DevOps:
    """A device's BlockDevOps that counts what the block layer tells it."""

    def __init__(self, tray: bool = False, removable: bool = False) -> None:
        self.begin = self.end = self.resized = 0
        self.busy = False
        self.tray_open = False
        self.media: list[bool] = []
        self._tray = tray
        self._removable = removable

    def change_media(self, load: bool) -> None:
        self.media.append(load)
        self.tray_open = not load

    def ops(self) -> BlockDevOps:
        def begin() -> None:
            self.begin += 1

        def end() -> None:
            self.end += 1

        def resized() -> None:
            self.resized += 1

        return BlockDevOps(
            change_media_cb=self.change_media if self._removable else None,
            is_tray_open=(lambda: self.tray_open) if self._tray else None,
            resize_cb=resized,
            drained_begin=begin,
            drained_end=end,
            drained_poll=lambda: self.busy,
        )


def run_in(ctx: AioContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` in ``ctx``'s thread and wait for it; returns its result."""
    ev = threading.Event()
    out: list[Any] = []

    def call() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as e:  # re-raised in the test's thread
            out.append(("err", e))
        finally:
            ev.set()

    ctx.schedule(call)
    assert ev.wait(5), "the iothread did not run the call"
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


@pytest.fixture
def iothread():
    io = IOThread(unique("io"))
    io.start()
    yield io
    io.stop()
    io.ctx.close()


@pytest.fixture
def events():
    got: list[tuple[str, dict[str, Any]]] = []
    set_event_emitter(lambda name, data: got.append((name, data)))
    yield got
    set_event_emitter(None)


@pytest.fixture
def new_blk(main_ctx):
    """new_blk(perm, shared) -> BlockBackend without a root, unref'd at teardown."""
    created = []

    def make(perm: int = RW, shared: int = BLK_PERM_ALL, name: str = "") -> Any:
        blk = blk_new(main_ctx, perm, shared)
        blk.name = name
        created.append(blk)
        return blk

    yield make
    drain_bhs(main_ctx)
    for blk in created:
        while blk.refcnt > 0:
            blk_unref(blk)


# -- 1. reference counting ----------------------------------------------------------------------
def test_ref_unref_last_reference_detaches_root(new_blk):
    bs = fake_bs()
    blk = new_blk()
    blk_insert_bs(blk, bs)
    assert bs.refcnt == 2 and bs.parents == [blk]
    blk_ref(blk)
    blk_unref(blk)  # not the last one
    assert blk.refcnt == 1
    assert blk_bs(blk) is bs and bs.refcnt == 2 and blk in blk_all()
    blk_unref(blk)
    assert blk.refcnt == 0
    assert blk_bs(blk) is None
    assert bs.refcnt == 1 and bs.parents == []
    assert blk not in blk_all()
    assert not bs.drv.closed  # the node's own reference keeps it open


def test_unref_of_backend_without_root(new_blk):
    blk = new_blk()
    assert blk in blk_all()
    blk_unref(blk)
    assert blk not in blk_all()


def test_last_unref_of_the_node_closes_the_driver(new_blk):
    bs = fake_bs()
    blk = new_blk()
    blk_insert_bs(blk, bs)
    from blocklayer.bdrv import bdrv_unref

    bdrv_unref(bs)  # the creator's reference: the backend keeps the node alive
    assert not bs.drv.closed and bs.refcnt == 1
    blk_unref(blk)
    assert bs.refcnt == 0 and bs.drv.closed


# -- 2. insert / remove, permissions ------------------------------------------------------------
def test_insert_and_remove_notifiers(new_blk):
    bs = fake_bs(read_only=True)
    blk = new_blk(BLK_PERM_CONSISTENT_READ)
    seen: list[tuple[str, Any]] = []
    blk.insert_bs_notifiers.append(lambda b: seen.append(("insert", blk_bs(b))))
    blk.remove_bs_notifiers.append(lambda b: seen.append(("remove", blk_bs(b))))
    blk_insert_bs(blk, bs)
    assert seen == [("insert", bs)]
    assert blk_is_inserted(blk) and blk_is_read_only(blk)
    blk_remove_bs(blk)
    assert seen == [("insert", bs), ("remove", bs)]  # told while the node is still there
    assert not blk_is_inserted(blk)
    assert blk_is_read_only(blk)  # the root state keeps the node's read-only flag
    assert bs.refcnt == 1 and bs.parents == []
    blk_remove_bs(blk)  # no root: nothing happens
    assert len(seen) == 2


def test_root_state_of_a_writable_node(new_blk):
    bs = fake_bs()
    blk = new_blk()
    blk_insert_bs(blk, bs)
    blk_remove_bs(blk)
    assert blk_is_read_only(blk) is False


@pytest.mark.parametrize("depth", [1, 2])
def test_insert_into_drained_node_drains_the_backend(new_blk, depth):
    bs = fake_bs()
    for _ in range(depth):
        bdrv_drained_begin(bs)
    blk = new_blk()
    dev = DevOps()
    blk_set_dev_ops(blk, dev.ops())
    assert dev.begin == 0
    blk_insert_bs(blk, bs)
    assert dev.begin == 1  # once, however deep the node's section is
    assert blk.quiesce_counter == depth
    res = Results()
    blk_aio_preadv(blk, 0, qiov(512), 0, res)
    assert bs.drv.requests == [] and blk.in_flight == 0  # queued
    for _ in range(depth):
        bdrv_drained_end(bs)
    assert dev.end == 1 and blk.quiesce_counter == 0
    run_until(lambda: bs.drv.requests)
    bs.drv.requests[0].complete(0)
    run_until(lambda: res.rets)
    assert res.rets == [0]


def test_dev_ops_registered_on_a_drained_backend_are_told(new_blk):
    bs = fake_bs()
    blk = new_blk()
    blk_insert_bs(blk, bs)
    bdrv_drained_begin(bs)
    dev = DevOps()
    blk_set_dev_ops(blk, dev.ops())
    assert dev.begin == 1
    bdrv_drained_end(bs)
    assert dev.end == 1


def test_removing_from_a_drained_node_ends_the_backends_section(new_blk):
    bs = fake_bs()
    blk = new_blk()
    blk_insert_bs(blk, bs)
    dev = DevOps()
    blk_set_dev_ops(blk, dev.ops())
    bdrv_drained_begin(bs)
    assert dev.begin == 1
    blk_remove_bs(blk)
    assert dev.end == 1 and blk.quiesce_counter == 0
    bdrv_drained_end(bs)  # the node's section ends without touching the old parent
    assert dev.end == 1
    assert bs.quiesce_counter == 0


def test_second_writer_refused_when_first_does_not_share_write(new_blk):
    bs = fake_bs()
    a = new_blk(RW, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED, name="disk-a")
    blk_insert_bs(a, bs)
    b = new_blk(RW, BLK_PERM_ALL, name="disk-b")
    calls = list(bs.drv.perm_calls)
    with pytest.raises(PermissionError) as ei:
        blk_insert_bs(b, bs)
    assert str(ei.value) == (
        f"Conflicts with use by disk-a as 'root', which does not allow 'write' on {bs.node_name}"
    )
    assert blk_bs(b) is None
    assert bs.parents == [a] and bs.refcnt == 2
    assert bs.drv.perm_calls == calls  # nothing was applied


def test_reader_refused_when_it_does_not_share_write_with_a_writer(new_blk):
    bs = fake_bs()
    a = new_blk(RW, BLK_PERM_ALL, name="disk-a")
    blk_insert_bs(a, bs)
    b = new_blk(BLK_PERM_CONSISTENT_READ, BLK_PERM_CONSISTENT_READ, name="disk-b")
    with pytest.raises(PermissionError, match=r"Conflicts with use by disk-a as 'root', which "
                                              r"uses 'write' on "):
        blk_insert_bs(b, bs)
    assert bs.parents == [a]


def test_conflict_message_names_an_unnamed_backend(new_blk):
    bs = fake_bs()
    a = new_blk(RW, BLK_PERM_CONSISTENT_READ)
    blk_insert_bs(a, bs)
    with pytest.raises(PermissionError, match="Conflicts with use by a block device as 'root'"):
        blk_insert_bs(new_blk(RW), bs)


def test_second_writer_allowed_when_both_share_write(new_blk):
    bs = fake_bs()
    a = new_blk(RW, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, name="a")
    b = new_blk(RW, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, name="b")
    blk_insert_bs(a, bs)
    blk_insert_bs(b, bs)
    assert bs.parents == [a, b] and bs.refcnt == 3
    perm, shared = bs.drv.perm_calls[-1]  # the driver sees the combination
    assert perm == RW
    assert shared == BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE


@pytest.mark.parametrize("perm", [RW, BLK_PERM_CONSISTENT_READ | BLK_PERM_RESIZE])
def test_read_only_node_refuses_writer_and_resizer(new_blk, perm):
    bs = fake_bs(read_only=True)
    blk = new_blk(perm)
    with pytest.raises(PermissionError, match=f"Block node '{bs.node_name}' is read-only"):
        blk_insert_bs(blk, bs)
    assert blk_bs(blk) is None and bs.parents == [] and bs.refcnt == 1
    reader = new_blk(BLK_PERM_CONSISTENT_READ)
    blk_insert_bs(reader, bs)  # reading is fine
    assert bs.parents == [reader]


def test_set_perm_changes_permissions(new_blk):
    bs = fake_bs()
    blk = new_blk(BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    assert bs.drv.perm_calls[-1] == (BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    blk_set_perm(blk, RW, BLK_PERM_CONSISTENT_READ)
    assert (blk.perm, blk.shared_perm) == (RW, BLK_PERM_CONSISTENT_READ)
    assert bs.drv.perm_calls[-1] == (RW, BLK_PERM_CONSISTENT_READ)
    # now a second writer is refused, and a reader sharing everything is not
    with pytest.raises(PermissionError, match="does not allow 'write'"):
        blk_insert_bs(new_blk(RW), bs)
    blk_insert_bs(new_blk(BLK_PERM_CONSISTENT_READ), bs)


def test_set_perm_conflict_changes_nothing(new_blk):
    bs = fake_bs()
    a = new_blk(BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL, name="a")
    b = new_blk(RW, BLK_PERM_ALL, name="b")
    blk_insert_bs(a, bs)
    blk_insert_bs(b, bs)
    calls = list(bs.drv.perm_calls)
    # a may not stop sharing 'write' while b writes ...
    with pytest.raises(PermissionError, match="Conflicts with use by b as 'root', which uses "
                                              "'write'"):
        blk_set_perm(a, BLK_PERM_CONSISTENT_READ, BLK_PERM_CONSISTENT_READ)
    # ... and b may not take 'resize' while a refuses to share it
    blk_set_perm(a, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL & ~BLK_PERM_RESIZE)
    calls = list(bs.drv.perm_calls)
    with pytest.raises(PermissionError, match="which does not allow 'resize'"):
        blk_set_perm(b, RW | BLK_PERM_RESIZE, BLK_PERM_ALL)
    assert (a.perm, a.shared_perm) == (BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL & ~BLK_PERM_RESIZE)
    assert (b.perm, b.shared_perm) == (RW, BLK_PERM_ALL)
    assert bs.drv.perm_calls == calls


def test_set_perm_write_on_read_only_node_changes_nothing(new_blk):
    bs = fake_bs(read_only=True)
    blk = new_blk(BLK_PERM_CONSISTENT_READ)
    blk_insert_bs(blk, bs)
    calls = list(bs.drv.perm_calls)
    with pytest.raises(PermissionError, match="is read-only"):
        blk_set_perm(blk, RW, BLK_PERM_ALL)
    assert blk.perm == BLK_PERM_CONSISTENT_READ
    assert bs.drv.perm_calls == calls


def test_removing_a_writer_gives_its_permissions_back(new_blk):
    bs = fake_bs()
    a = new_blk(BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    b = new_blk(RW, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE)
    blk_insert_bs(a, bs)
    blk_insert_bs(b, bs)
    assert bs.drv.perm_calls[-1] == (RW, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE)
    blk_remove_bs(b)
    assert bs.drv.perm_calls[-1] == (BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    blk_insert_bs(new_blk(RW, BLK_PERM_CONSISTENT_READ), bs)  # no longer conflicts


# -- 3. drain -----------------------------------------------------------------------------------
def test_drained_begin_end_tell_the_device_once(new_blk):
    bs = fake_bs()
    blk = new_blk()
    blk_insert_bs(blk, bs)
    dev = DevOps()
    blk_set_dev_ops(blk, dev.ops())
    bdrv_drained_begin(bs)
    assert (blk.quiesce_counter, dev.begin, dev.end) == (1, 1, 0)
    bdrv_drained_begin(bs)
    assert (blk.quiesce_counter, dev.begin, dev.end) == (2, 1, 0)
    bdrv_drained_end(bs)
    assert (blk.quiesce_counter, dev.begin, dev.end) == (1, 1, 0)
    bdrv_drained_end(bs)
    assert (blk.quiesce_counter, dev.begin, dev.end) == (0, 1, 1)
    bdrv_drained_begin(bs)  # a new section tells it again
    assert dev.begin == 2
    bdrv_drained_end(bs)
    assert dev.end == 2


def test_drained_poll_follows_in_flight_and_the_device(main_ctx, new_blk):
    bs = fake_bs()
    blk = new_blk()
    blk_insert_bs(blk, bs)
    dev = DevOps()
    blk_set_dev_ops(blk, dev.ops())
    assert not blk.root_drained_poll() and not bdrv_drain_poll(bs)
    res = Results()
    blk_aio_preadv(blk, 0, qiov(512), 0, res)
    blk_aio_pwritev(blk, 512, qiov(512), 0, res)
    bdrv_drained_begin(bs)
    assert blk.root_drained_poll() and bdrv_drain_poll(bs)
    bs.drv.requests[0].complete(0)
    run_until(lambda: blk.in_flight == 1)
    assert bdrv_drain_poll(bs)
    bs.drv.requests[1].complete(0)
    run_until(lambda: blk.in_flight == 0)
    assert not bdrv_drain_poll(bs)
    dev.busy = True  # the device's own requests count too
    assert blk.root_drained_poll() and bdrv_drain_poll(bs)
    dev.busy = False
    bdrv_drained_end(bs)
    assert res.rets == [0, 0]


def test_requests_submitted_while_drained_are_queued_and_resumed_once(
    main_ctx, new_blk, iothread
):
    """The heart of blk_wait_while_drained: queued, not counted, resumed exactly once each in
    the context that submitted it, after everything submitted before the section."""
    io = iothread.ctx
    bs = fake_bs()
    drv: FakeDriver = bs.drv
    blk = new_blk()
    blk_insert_bs(blk, bs)
    dev = DevOps()
    blk_set_dev_ops(blk, dev.ops())
    log = CompletionLog()
    main_thread = threading.get_ident()
    io_thread = run_in(io, threading.get_ident)

    def submit(wave: str, where: str, n: int, base: int) -> None:
        for i in range(n):
            tag = (wave, where, i)
            off = (base + i) * 512
            if i % 2:
                blk_aio_pwritev(blk, off, qiov(512), 0, log.cb(tag))
            else:
                blk_aio_preadv(blk, off, qiov(512), 0, log.cb(tag))

    # N = 3 + 3 requests in flight, from the main loop and from the iothread
    submit("first", "main", 3, 0)
    run_in(io, lambda: submit("first", "io", 3, 100))
    assert len(drv.requests) == 6 and blk.in_flight == 6

    bdrv_drained_begin(bs)
    assert dev.begin == 1 and blk.quiesce_counter == 1
    assert bdrv_drain_poll(bs)

    # M = 4 + 3 more while drained: none reaches the driver, none counts in flight
    submit("second", "main", 3, 200)
    blk_aio_flush(blk, log.cb(("second", "main", "flush")))
    run_in(io, lambda: submit("second", "io", 3, 300))
    drain_bhs(main_ctx)
    run_in(io, lambda: None)
    assert len(drv.requests) == 6
    assert blk.in_flight == 6
    assert len(blk.queued_requests) == 7
    assert len(log) == 0

    # the first N complete; the drain poll goes false while the M are still held back
    for r in drv.requests:
        r.complete(0)
    run_until(lambda: blk.in_flight == 0 and len(log) == 6)
    assert not bdrv_drain_poll(bs)
    drain_bhs(main_ctx)
    run_in(io, lambda: None)
    assert len(drv.requests) == 6 and len(log) == 6

    # the section ends: the M run, each once, in their own context
    bdrv_drained_end(bs)
    assert dev.end == 1
    run_until(lambda: len(drv.requests) == 13)
    second = drv.requests[6:]
    want = {("read", 200 * 512, main_ctx), ("write", 201 * 512, main_ctx),
            ("read", 202 * 512, main_ctx), ("flush", 0, main_ctx),
            ("read", 300 * 512, io), ("write", 301 * 512, io), ("read", 302 * 512, io)}
    assert {(r.op, r.offset, r.ctx) for r in second} == want
    assert blk.in_flight == 7 and not blk.queued_requests
    for r in second:
        r.complete(0)
    run_until(lambda: blk.in_flight == 0 and len(log) == 13)
    drain_bhs(main_ctx)
    run_in(io, lambda: None)
    assert len(drv.requests) == 13  # nothing was submitted twice

    tags = log.tags()
    assert len(tags) == len(set(tags)) == 13  # each callback exactly once
    assert all(ret == 0 for _, ret, _, _ in log.entries)
    for (_wave, where, _i), _ret, ctx, thread in log.entries:
        assert ctx is (main_ctx if where == "main" else io)
        assert thread == (main_thread if where == "main" else io_thread)
    last_first = max(i for i, t in enumerate(tags) if t[0] == "first")
    first_second = min(i for i, t in enumerate(tags) if t[0] == "second")
    assert last_first < first_second
    s = blk.stats
    assert s.nr_ops[READ] == 8 and s.nr_ops[WRITE] == 4 and s.nr_ops[FLUSH] == 1


def test_queued_requests_resume_only_at_the_last_end(main_ctx, new_blk):
    bs = fake_bs(hold=False)
    blk = new_blk()
    blk_insert_bs(blk, bs)
    dev = DevOps()
    blk_set_dev_ops(blk, dev.ops())
    bdrv_drained_begin(bs)
    bdrv_drained_begin(bs)
    log = CompletionLog()
    blk_aio_pwritev(blk, 0, qiov(512), 0, log.cb("w"))
    blk_aio_pdiscard(blk, 0, 512, log.cb("d"))
    blk_aio_pwrite_zeroes(blk, 512, 512, 0, log.cb("z"))
    bdrv_drained_end(bs)
    drain_bhs(main_ctx)
    assert bs.drv.requests == [] and len(log) == 0 and dev.end == 0
    assert len(blk.queued_requests) == 3
    bdrv_drained_end(bs)
    assert dev.end == 1
    run_until(lambda: len(log) == 3)
    drain_bhs(main_ctx)
    assert sorted(log.tags()) == ["d", "w", "z"]
    assert [r.op for r in bs.drv.requests] == ["write", "write_zeroes"]  # discard=ignore
    assert blk.in_flight == 0


def test_queued_request_requeued_if_a_new_section_begins_before_it_runs(main_ctx, new_blk):
    bs = fake_bs(hold=False)
    blk = new_blk()
    blk_insert_bs(blk, bs)
    bdrv_drained_begin(bs)
    res = Results()
    blk_aio_preadv(blk, 0, qiov(512), 0, res)
    bdrv_drained_end(bs)  # resumption scheduled ...
    bdrv_drained_begin(bs)  # ... but another section starts first
    drain_bhs(main_ctx)
    assert bs.drv.requests == [] and res.rets == [] and len(blk.queued_requests) == 1
    bdrv_drained_end(bs)
    run_until(lambda: res.rets)
    drain_bhs(main_ctx)
    assert res.rets == [0] and len(bs.drv.requests) == 1


def test_disabled_request_queuing_lets_requests_through(main_ctx, new_blk):
    bs = fake_bs()
    blk = new_blk()
    blk_insert_bs(blk, bs)
    blk_set_disable_request_queuing(blk, True)
    bdrv_drained_begin(bs)
    res = Results()
    blk_aio_preadv(blk, 0, qiov(512), 0, res)
    assert len(bs.drv.requests) == 1 and blk.in_flight == 1
    assert not blk.queued_requests
    assert bdrv_drain_poll(bs)
    bs.drv.requests[0].complete(0)
    run_until(lambda: res.rets)
    assert res.rets == [0] and not bdrv_drain_poll(bs)
    bdrv_drained_end(bs)


def test_blk_drain_calls_then_when_idle_and_ends_its_section(main_ctx, new_blk):
    bs = fake_bs()
    blk = new_blk()
    blk_insert_bs(blk, bs)
    dev = DevOps()
    blk_set_dev_ops(blk, dev.ops())
    res = Results()
    blk_aio_pwritev(blk, 0, qiov(512), 0, res)
    drained: list[tuple[int, int]] = []
    blk_drain(blk, lambda: drained.append((blk.in_flight, bs.quiesce_counter)))
    assert dev.begin == 1 and bs.quiesce_counter == 1
    blk_aio_preadv(blk, 512, qiov(512), 0, res)  # arrives during the drain: held back
    drain_bhs(main_ctx)
    assert drained == [] and len(bs.drv.requests) == 1
    dev.busy = True  # the device still has requests of its own
    bs.drv.requests[0].complete(0)
    run_until(lambda: blk.in_flight == 0)
    drain_bhs(main_ctx)
    assert drained == []
    dev.busy = False
    aio_wait_kick()
    run_until(lambda: drained)
    assert drained == [(0, 0)]  # nothing in flight, section already ended
    assert dev.end == 1 and blk.quiesce_counter == 0
    run_until(lambda: len(bs.drv.requests) == 2)  # the held-back read now runs
    bs.drv.requests[1].complete(0)
    run_until(lambda: len(res.rets) == 2)
    drain_bhs(main_ctx)
    assert res.rets == [0, 0] and drained == [(0, 0)]


def test_blk_drain_all_waits_for_every_backend(main_ctx, new_blk):
    bs1, bs2 = fake_bs(), fake_bs()
    b1, b2 = new_blk(), new_blk()
    blk_insert_bs(b1, bs1)
    blk_insert_bs(b2, bs2)
    d1, d2 = DevOps(), DevOps()
    blk_set_dev_ops(b1, d1.ops())
    blk_set_dev_ops(b2, d2.ops())
    res = Results()
    blk_aio_preadv(b1, 0, qiov(512), 0, res)
    blk_aio_preadv(b2, 0, qiov(512), 0, res)
    done: list[int] = []
    blk_drain_all(lambda: done.append(b1.in_flight + b2.in_flight))
    assert d1.begin == 1 and d2.begin == 1
    bs1.drv.requests[0].complete(0)
    run_until(lambda: b1.in_flight == 0)
    drain_bhs(main_ctx)
    assert done == []
    bs2.drv.requests[0].complete(0)
    run_until(lambda: done)
    drain_bhs(main_ctx)
    assert done == [0]
    assert bs1.quiesce_counter == bs2.quiesce_counter == 0
    assert d1.end == 1 and d2.end == 1


def test_blk_drain_all_keeps_every_backend_quiet_until_then(main_ctx, new_blk):
    """``then`` runs only when nothing is in flight anywhere: a backend that went idle early
    must not be resumed (and take new requests) while another is still draining."""
    bs1, bs2 = fake_bs(), fake_bs()
    b1, b2 = new_blk(), new_blk()
    blk_insert_bs(b1, bs1)
    blk_insert_bs(b2, bs2)
    res = Results()
    blk_aio_preadv(b1, 0, qiov(512), 0, res)
    blk_aio_preadv(b2, 0, qiov(512), 0, res)
    seen: list[tuple[int, int]] = []
    blk_drain_all(lambda: seen.append((b1.in_flight, b2.in_flight)))
    blk_aio_pwritev(b1, 512, qiov(512), 0, res)  # arrives during the drain: must wait
    bs1.drv.requests[0].complete(0)
    run_until(lambda: len(res.rets) == 1)
    drain_bhs(main_ctx)
    started_early = len(bs1.drv.requests) - 1
    bs2.drv.requests[0].complete(0)
    run_until(lambda: seen)
    # clean up before judging: complete whatever b1 got
    run_until(lambda: len(bs1.drv.requests) == 2)
    bs1.drv.requests[1].complete(0)
    run_until(lambda: len(res.rets) == 3)
    assert started_early == 0, "b1 was resumed while the drain of all was still going on"
    assert seen == [(0, 0)]
    assert bs1.quiesce_counter == bs2.quiesce_counter == 0


def test_blk_drain_all_with_nothing_in_flight_is_immediate(new_blk):
    b = new_blk()
    blk_insert_bs(b, fake_bs())
    done: list[bool] = []
    blk_drain_all(lambda: done.append(True))
    assert done == [True]
    assert b.quiesce_counter == 0


# -- 4. write cache / FUA -----------------------------------------------------------------------
@pytest.mark.parametrize("wce", [True, False])
def test_write_cache_off_makes_writes_and_write_zeroes_fua(main_ctx, new_blk, wce):
    bs = fake_bs(hold=False, discard="unmap")
    blk = new_blk()
    blk_insert_bs(blk, bs)
    blk_set_enable_write_cache(blk, wce)
    res = Results()
    blk_aio_pwritev(blk, 0, qiov(512), 0, res)
    blk_aio_pwrite_zeroes(blk, 0, 512, BDRV_REQ_MAY_UNMAP, res)
    blk_aio_preadv(blk, 0, qiov(512), 0, res)
    run_until(lambda: len(res.rets) == 3)
    flags = {r.op: r.flags for r in bs.drv.requests}
    assert bool(flags["write"] & BDRV_REQ_FUA) == (not wce)
    assert bool(flags["write_zeroes"] & BDRV_REQ_FUA) == (not wce)
    assert flags["write_zeroes"] & BDRV_REQ_MAY_UNMAP
    assert flags["read"] == 0


@pytest.mark.parametrize("wce", [True, False])
def test_fua_on_a_file_node_flushes(main_ctx, make_node, new_blk, image, wce):
    bs = make_node({"driver": "file", "filename": image(SIZE)})
    blk = new_blk()
    blk_insert_bs(blk, bs)
    blk_set_enable_write_cache(blk, wce)
    flushes: list[AioContext] = []
    real_flush = bs.drv.aio_flush

    def counting_flush(ctx, cb):
        flushes.append(ctx)
        real_flush(ctx, cb)

    bs.drv.aio_flush = counting_flush
    res = Results()
    blk_aio_pwritev(blk, 0, qiov(4096, 0x5A), 0, res)
    run_until(lambda: res.rets)
    assert len(flushes) == (0 if wce else 1)
    blk_aio_pwrite_zeroes(blk, 8192, 4096, 0, res)
    run_until(lambda: len(res.rets) == 2)
    assert res.rets == [0, 0]
    assert len(flushes) == (0 if wce else 2)
    assert all(c is main_ctx for c in flushes)
    with open(bs.drv.filename, "rb") as f:
        data = f.read()
    assert data[:4096] == b"\x5a" * 4096 and data[8192:12288] == bytes(4096)


# -- 5. error policy and iostatus ---------------------------------------------------------------
def _expected_action(on_err: BlockdevOnError, error: int) -> BlockErrorAction:
    if on_err == BlockdevOnError.ENOSPC:
        return BlockErrorAction.STOP if error == errno.ENOSPC else BlockErrorAction.REPORT
    return {
        BlockdevOnError.STOP: BlockErrorAction.STOP,
        BlockdevOnError.IGNORE: BlockErrorAction.IGNORE,
        BlockdevOnError.REPORT: BlockErrorAction.REPORT,
    }[on_err]


POLICIES = [BlockdevOnError.REPORT, BlockdevOnError.IGNORE, BlockdevOnError.ENOSPC,
            BlockdevOnError.STOP]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("is_read", [True, False])
@pytest.mark.parametrize("on_err", POLICIES)
def test_get_error_action(new_blk, on_err, is_read, error):
    blk = new_blk()
    # the other direction gets a policy that would give a different answer
    other = BlockdevOnError.IGNORE if on_err != BlockdevOnError.IGNORE else BlockdevOnError.STOP
    if is_read:
        blk_set_on_error(blk, on_err, other)
    else:
        blk_set_on_error(blk, other, on_err)
    assert blk_get_error_action(blk, is_read, error) == _expected_action(on_err, error)


def test_default_policies_are_qemus(new_blk):
    blk = new_blk()
    assert blk.on_read_error == BlockdevOnError.REPORT
    assert blk.on_write_error == BlockdevOnError.ENOSPC
    assert blk_get_error_action(blk, False, errno.ENOSPC) == BlockErrorAction.STOP
    assert blk_get_error_action(blk, True, errno.ENOSPC) == BlockErrorAction.REPORT


@pytest.mark.parametrize(
    "rerror, werror, enabled",
    [
        ("report", "report", False),
        ("ignore", "ignore", False),
        ("enospc", "report", False),  # enospc only counts for writes
        ("report", "enospc", True),
        ("report", "stop", True),
        ("stop", "report", True),
        ("stop", "ignore", True),
        ("ignore", "enospc", True),
    ],
)
def test_iostatus_enabled_only_when_some_policy_stops(new_blk, rerror, werror, enabled):
    blk = new_blk()
    blk_set_on_error(blk, BlockdevOnError(rerror), BlockdevOnError(werror))
    assert blk_iostatus_is_enabled(blk) is False  # the device did not enable it
    blk_iostatus_enable(blk)
    assert blk_iostatus_is_enabled(blk) is enabled
    assert blk.iostatus == BlockDeviceIoStatus.OK


def test_error_action_event_without_iostatus(new_blk, events):
    bs = fake_bs()
    blk = new_blk(name="disk0")
    blk_insert_bs(blk, bs)
    blk_set_on_error(blk, BlockdevOnError.REPORT, BlockdevOnError.REPORT)
    blk_error_action(blk, BlockErrorAction.REPORT, True, errno.EIO)
    assert events == [("BLOCK_IO_ERROR", {
        "device": "disk0", "node-name": bs.node_name, "operation": "read",
        "action": "report", "reason": os.strerror(errno.EIO),
    })]
    assert blk.iostatus == BlockDeviceIoStatus.OK


@pytest.mark.parametrize("action", list(BlockErrorAction))
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
def test_error_action_event_with_iostatus(new_blk, events, action, error):
    bs = fake_bs()
    blk = new_blk(name="disk0")
    blk_insert_bs(blk, bs)
    blk_set_on_error(blk, BlockdevOnError.REPORT, BlockdevOnError.ENOSPC)
    blk_iostatus_enable(blk)
    blk_error_action(blk, action, False, error)
    assert events == [("BLOCK_IO_ERROR", {
        "device": "disk0", "node-name": bs.node_name, "operation": "write",
        "action": action.value, "nospace": error == errno.ENOSPC,
        "reason": os.strerror(error),
    })]
    if action == BlockErrorAction.STOP:
        want = (BlockDeviceIoStatus.NOSPACE if error == errno.ENOSPC
                else BlockDeviceIoStatus.FAILED)
    else:
        want = BlockDeviceIoStatus.OK  # only a stop records the error
    assert blk.iostatus == want


def test_error_action_event_without_a_node(new_blk, events):
    blk = new_blk(name="cd0")
    blk_error_action(blk, BlockErrorAction.REPORT, True, errno.ENOMEDIUM)
    (name, data), = events
    assert name == "BLOCK_IO_ERROR"
    assert "node-name" not in data
    assert data["reason"] == os.strerror(errno.ENOMEDIUM)


def test_iostatus_sticky_until_reset(new_blk, events):
    blk = new_blk()
    blk_set_on_error(blk, BlockdevOnError.STOP, BlockdevOnError.STOP)
    blk_iostatus_enable(blk)
    blk_error_action(blk, BlockErrorAction.STOP, False, errno.ENOSPC)
    assert blk.iostatus == BlockDeviceIoStatus.NOSPACE
    blk_error_action(blk, BlockErrorAction.STOP, True, errno.EIO)
    assert blk.iostatus == BlockDeviceIoStatus.NOSPACE  # the first error sticks
    blk_iostatus_reset(blk)
    assert blk.iostatus == BlockDeviceIoStatus.OK
    blk_error_action(blk, BlockErrorAction.STOP, True, errno.EIO)
    assert blk.iostatus == BlockDeviceIoStatus.FAILED
    blk_error_action(blk, BlockErrorAction.STOP, False, errno.ENOSPC)
    assert blk.iostatus == BlockDeviceIoStatus.FAILED
    assert [d["action"] for _, d in events] == ["stop"] * 4


def test_stop_without_iostatus_leaves_it_ok(new_blk, events):
    blk = new_blk()
    blk_set_on_error(blk, BlockdevOnError.STOP, BlockdevOnError.STOP)
    blk_error_action(blk, BlockErrorAction.STOP, False, errno.EIO)  # not enabled
    assert blk.iostatus == BlockDeviceIoStatus.OK
    assert "nospace" not in events[0][1]


# -- 6. accounting ------------------------------------------------------------------------------
QEMU_STATS_KEYS = {
    "rd_bytes", "wr_bytes", "unmap_bytes",
    "rd_operations", "wr_operations", "flush_operations", "unmap_operations",
    "rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns", "unmap_total_time_ns",
    "rd_merged", "wr_merged", "unmap_merged",
    "failed_rd_operations", "failed_wr_operations", "failed_flush_operations",
    "failed_unmap_operations",
    "invalid_rd_operations", "invalid_wr_operations", "invalid_flush_operations",
    "invalid_unmap_operations",
    "idle_time_ns", "account_invalid", "account_failed", "timed_stats",
    "rd_latency_histogram", "wr_latency_histogram", "flush_latency_histogram",
}


def test_stats_dict_has_qemus_names():
    d = BlockAcctStats().to_dict()
    assert set(d) == QEMU_STATS_KEYS
    assert "flush_bytes" not in d
    for p in ("rd", "wr", "flush"):
        h = d[f"{p}_latency_histogram"]
        assert set(h) == {"boundaries", "bins"}
        assert h["boundaries"] == DEFAULT_BOUNDARIES_NS
        assert h["bins"] == [0] * (len(DEFAULT_BOUNDARIES_NS) + 1)
    assert d["account_invalid"] is True and d["account_failed"] is True
    assert d["timed_stats"] == []
    assert isinstance(d["idle_time_ns"], int) and d["idle_time_ns"] >= 0


def test_stats_counts_per_type():
    s = BlockAcctStats(boundaries_ns=[10, 50, 100])
    s.block_acct_done(READ, 4096, 5)
    s.block_acct_done(READ, 512, 10)  # a boundary belongs to the interval above it
    s.block_acct_done(WRITE, 1024, 60)
    s.block_acct_done(FLUSH, 0, 1000)
    s.block_acct_done(UNMAP, 65536, 7)
    s.block_acct_failed(WRITE, 20)
    s.block_acct_failed(UNMAP, 30)
    s.block_acct_invalid(READ)
    s.block_acct_invalid(UNMAP)
    s.block_acct_invalid(UNMAP)
    d = s.to_dict()
    assert (d["rd_operations"], d["rd_bytes"]) == (2, 4608)
    assert (d["wr_operations"], d["wr_bytes"]) == (1, 1024)
    assert d["flush_operations"] == 1
    assert (d["unmap_operations"], d["unmap_bytes"]) == (1, 65536)
    assert d["failed_wr_operations"] == 1 and d["failed_unmap_operations"] == 1
    assert d["failed_rd_operations"] == d["failed_flush_operations"] == 0
    assert d["invalid_rd_operations"] == 1 and d["invalid_unmap_operations"] == 2
    assert d["invalid_wr_operations"] == d["invalid_flush_operations"] == 0
    assert d["rd_total_time_ns"] == 15 and d["wr_total_time_ns"] == 80
    assert d["unmap_total_time_ns"] == 37 and d["flush_total_time_ns"] == 1000
    assert d["rd_latency_histogram"] == {"boundaries": [10, 50, 100], "bins": [1, 1, 0, 0]}
    assert d["flush_latency_histogram"]["bins"] == [0, 0, 0, 1]
    assert d["wr_latency_histogram"]["bins"][2] == 1  # the successful write (60 ns)


def test_idle_time_restarts_with_each_access():
    s = BlockAcctStats()
    s.last_access_ns -= 10**9
    assert s.to_dict()["idle_time_ns"] >= 10**9
    s.block_acct_invalid(READ)  # invalid requests count as an access too
    assert s.to_dict()["idle_time_ns"] < 10**9


def test_backend_requests_are_accounted_by_type(main_ctx, new_blk):
    bs = fake_bs(hold=False, discard="unmap")
    blk = new_blk()
    blk_insert_bs(blk, bs)
    res = Results()
    blk_aio_preadv(blk, 0, qiov(4096), 0, res)
    blk_aio_pwritev(blk, 0, qiov(1024), 0, res)
    blk_aio_pwrite_zeroes(blk, 4096, 8192, 0, res)  # counted as a write
    blk_aio_flush(blk, res)
    blk_aio_pdiscard(blk, 65536, 65536, res)
    blk_aio_pdiscard(blk, SIZE, 512, res)  # beyond the end: fails
    run_until(lambda: len(res.rets) == 6)
    d = blk.stats.to_dict()
    assert d["rd_operations"] == 1 and d["rd_bytes"] == 4096
    assert d["wr_operations"] == 2 and d["wr_bytes"] == 1024 + 8192
    assert d["flush_operations"] == 1
    assert d["unmap_operations"] == 1 and d["unmap_bytes"] == 65536
    assert d["failed_unmap_operations"] == 1
    for p, n in (("rd", 1), ("wr", 2), ("flush", 1)):
        assert sum(d[f"{p}_latency_histogram"]["bins"]) == n
    assert sum(blk.stats.bins[UNMAP]) >= blk.stats.nr_ops[UNMAP]


def test_failed_requests_are_in_the_latency_histogram():
    """QEMU's block_account_one_io() puts every completed request, failed or not, into the
    latency histogram: the bins add up to done + failed operations."""
    s = BlockAcctStats()
    s.block_acct_done(READ, 512, 1000)
    s.block_acct_failed(READ, 2000)
    s.block_acct_failed(WRITE, 2000)
    d = s.to_dict()
    assert sum(d["rd_latency_histogram"]["bins"]) == d["rd_operations"] + d[
        "failed_rd_operations"] == 2
    assert sum(d["wr_latency_histogram"]["bins"]) == 1


# -- 7. truncate, length, no medium / open tray -------------------------------------------------
def test_truncate_needs_the_resize_permission(make_node, new_blk, image):
    bs = make_node({"driver": "file", "filename": image(SIZE)})
    blk = new_blk(RW)
    blk_insert_bs(blk, bs)
    with pytest.raises(PermissionError, match="resize"):
        blk_truncate(blk, 2 * SIZE)
    assert blk_getlength(blk) == SIZE


def test_truncate_resizes_and_tells_every_parent(make_node, new_blk, image):
    path = image(SIZE)
    bs = make_node({"driver": "file", "filename": path})
    resizer = new_blk(RW | BLK_PERM_RESIZE)
    other = new_blk(BLK_PERM_CONSISTENT_READ)
    blk_insert_bs(resizer, bs)
    blk_insert_bs(other, bs)
    d1, d2 = DevOps(), DevOps()
    blk_set_dev_ops(resizer, d1.ops())
    blk_set_dev_ops(other, d2.ops())
    blk_truncate(resizer, 3 * SIZE)
    assert (d1.resized, d2.resized) == (1, 1)
    assert blk_getlength(resizer) == blk_getlength(other) == 3 * SIZE
    assert os.stat(path).st_size == 3 * SIZE
    blk_truncate(resizer, SIZE // 2 + 100)  # QEMU counts whole sectors
    assert (d1.resized, d2.resized) == (2, 2)
    assert blk_getlength(other) == SIZE // 2 + 512
    assert blk_check_byte_request(other, SIZE // 2, 512) == 0
    assert blk_check_byte_request(other, SIZE // 2 + 512, 512) == -errno.EIO


def test_truncate_without_medium(new_blk):
    blk = new_blk(RW | BLK_PERM_RESIZE)
    with pytest.raises(OSError) as ei:
        blk_truncate(blk, SIZE)
    assert ei.value.errno == errno.ENOMEDIUM


def test_open_tray_means_no_medium(main_ctx, new_blk):
    bs = fake_bs(hold=False)
    blk = new_blk()
    blk_insert_bs(blk, bs)
    dev = DevOps(tray=True)
    blk_set_dev_ops(blk, dev.ops())
    assert blk_check_byte_request(blk, 0, 512) == 0
    dev.tray_open = True
    assert blk_check_byte_request(blk, 0, 512) == -errno.ENOMEDIUM
    assert blk_check_byte_request(blk, 0, 0) == -errno.ENOMEDIUM
    assert blk_getlength(blk) == -errno.ENOMEDIUM
    assert blk_is_inserted(blk) and not blk_is_available(blk)
    res = Results()
    blk_aio_preadv(blk, 0, qiov(512), 0, res)
    blk_aio_pwritev(blk, 0, qiov(512), 0, res)
    blk_aio_flush(blk, res)
    blk_aio_pdiscard(blk, 0, 512, res)
    blk_aio_pwrite_zeroes(blk, 0, 512, 0, res)
    run_until(lambda: len(res.rets) == 5)
    assert res.rets == [-errno.ENOMEDIUM] * 5
    assert bs.drv.requests == []
    with pytest.raises(OSError):
        blk_truncate(blk, SIZE)
    dev.tray_open = False
    assert blk_check_byte_request(blk, 0, 512) == 0 and blk_getlength(blk) == SIZE


def test_no_medium_inserted(new_blk):
    blk = new_blk()
    assert blk_check_byte_request(blk, 0, 512) == -errno.ENOMEDIUM
    assert blk_getlength(blk) == -errno.ENOMEDIUM
    assert not blk_is_available(blk)


# -- 8. discard and write-zeroes ----------------------------------------------------------------
def test_discard_ignored_by_default(main_ctx, new_blk):
    bs = fake_bs(hold=False)
    blk = new_blk()
    blk_insert_bs(blk, bs)
    res = Results()
    blk_aio_pdiscard(blk, 4096, 8192, res)
    assert res.rets == []  # still never inside the call
    run_until(lambda: res.rets)
    assert res.rets == [0]
    assert bs.drv.requests == []
    assert blk.stats.nr_ops[UNMAP] == 1 and blk.stats.nr_bytes[UNMAP] == 8192


def test_discard_reaches_driver_with_discard_unmap(main_ctx, new_blk):
    bs = fake_bs(hold=False, discard="unmap")
    blk = new_blk()
    blk_insert_bs(blk, bs)
    res = Results()
    blk_aio_pdiscard(blk, 4096, 8192, res)
    run_until(lambda: res.rets)
    assert res.rets == [0]
    (r,) = bs.drv.requests
    assert (r.op, r.offset, r.nbytes, r.ctx) == ("discard", 4096, 8192, main_ctx)


def test_discard_needs_write_permission_and_a_valid_range(main_ctx, new_blk):
    bs = fake_bs(hold=False, discard="unmap")
    reader = new_blk(BLK_PERM_CONSISTENT_READ)
    blk_insert_bs(reader, bs)
    res = Results()
    blk_aio_pdiscard(reader, 0, 512, res)
    blk_aio_pwrite_zeroes(reader, 0, 512, 0, res)
    run_until(lambda: len(res.rets) == 2)
    assert res.rets == [-errno.EPERM, -errno.EPERM]
    writer = new_blk(RW)
    blk_insert_bs(writer, bs)
    blk_aio_pdiscard(writer, SIZE - 512, 1024, res)
    blk_aio_pwrite_zeroes(writer, -512, 512, 0, res)
    run_until(lambda: len(res.rets) == 4)
    assert res.rets[2:] == [-errno.EIO, -errno.EIO]
    assert bs.drv.requests == []


@pytest.mark.parametrize("discard, kept", [("ignore", False), ("off", False), ("unmap", True),
                                           ("on", True)])
def test_write_zeroes_may_unmap_only_on_unmap_nodes(main_ctx, new_blk, discard, kept):
    bs = fake_bs(hold=False, discard=discard)
    blk = new_blk()
    blk_insert_bs(blk, bs)
    res = Results()
    blk_aio_pwrite_zeroes(blk, 0, 4096, BDRV_REQ_MAY_UNMAP, res)
    blk_aio_pwrite_zeroes(blk, 4096, 4096, 0, res)
    run_until(lambda: len(res.rets) == 2)
    r1, r2 = bs.drv.requests
    assert bool(r1.flags & BDRV_REQ_MAY_UNMAP) == kept
    assert r2.flags == 0


def _file_node(make_node, image, discard: str | None, size: int = SIZE):
    opts = {"driver": "file", "filename": image(size)}
    if discard is not None:
        opts["discard"] = discard
    bs = make_node(opts)
    fd = os.open(bs.drv.filename, os.O_RDONLY)
    try:
        os.fsync(fd)  # allocated for sure, so st_blocks is meaningful
    finally:
        os.close(fd)
    return bs


def _read(blk, offset: int, n: int) -> bytes:
    buf = bytearray(b"\xee" * n)
    res = Results()
    blk_aio_preadv(blk, offset, IOVector.from_buffers([buf]), 0, res)
    run_until(lambda: res.rets)
    assert res.rets == [0]
    return bytes(buf)


OFF, LEN = 256 * 1024, 256 * 1024


def test_file_discard_with_unmap_deallocates(main_ctx, make_node, new_blk, image):
    bs = _file_node(make_node, image, "unmap")
    blk = new_blk()
    blk_insert_bs(blk, bs)
    before = os.stat(bs.drv.filename).st_blocks
    res = Results()
    blk_aio_pdiscard(blk, OFF, LEN, res)
    run_until(lambda: res.rets)
    assert res.rets == [0]
    st = os.stat(bs.drv.filename)
    assert st.st_blocks < before
    assert st.st_size == SIZE
    assert _read(blk, OFF, LEN) == bytes(LEN)
    data = pattern(SIZE)
    assert _read(blk, 0, OFF) == data[:OFF]
    assert _read(blk, OFF + LEN, SIZE - OFF - LEN) == data[OFF + LEN:]


@pytest.mark.parametrize("discard", [None, "ignore"])
def test_file_discard_ignored_by_default(main_ctx, make_node, new_blk, image, discard):
    bs = _file_node(make_node, image, discard)
    blk = new_blk()
    blk_insert_bs(blk, bs)
    before = os.stat(bs.drv.filename).st_blocks
    res = Results()
    blk_aio_pdiscard(blk, OFF, LEN, res)
    run_until(lambda: res.rets)
    assert res.rets == [0]
    assert os.stat(bs.drv.filename).st_blocks == before
    assert _read(blk, 0, SIZE) == pattern(SIZE)


def test_file_write_zeroes_keeps_blocks_allocated(main_ctx, make_node, new_blk, image):
    bs = _file_node(make_node, image, "unmap")
    blk = new_blk()
    blk_insert_bs(blk, bs)
    before = os.stat(bs.drv.filename).st_blocks
    res = Results()
    blk_aio_pwrite_zeroes(blk, OFF, LEN, 0, res)  # no MAY_UNMAP: must stay allocated
    run_until(lambda: res.rets)
    assert res.rets == [0]
    assert _read(blk, OFF, LEN) == bytes(LEN)
    assert os.stat(bs.drv.filename).st_blocks >= before
    assert _read(blk, 0, OFF) == pattern(SIZE)[:OFF]


@pytest.mark.parametrize("discard", ["ignore", "unmap"])
def test_file_write_zeroes_may_unmap(main_ctx, make_node, new_blk, image, discard):
    bs = _file_node(make_node, image, discard)
    blk = new_blk()
    blk_insert_bs(blk, bs)
    before = os.stat(bs.drv.filename).st_blocks
    res = Results()
    blk_aio_pwrite_zeroes(blk, OFF, LEN, BDRV_REQ_MAY_UNMAP, res)
    run_until(lambda: res.rets)
    assert res.rets == [0]
    assert _read(blk, OFF, LEN) == bytes(LEN)
    after = os.stat(bs.drv.filename).st_blocks
    if discard == "ignore":
        assert after >= before  # MAY_UNMAP was dropped: nothing deallocated
    # with discard=unmap deallocating is allowed but not required (file system permitting)


# -- 9. tray and removable media ------------------------------------------------------------------
class Dev:
    id = "dev0"


def test_change_media_sends_tray_moved_only_when_the_tray_moves(new_blk, events):
    blk = new_blk(name="cd0")
    blk_attach_dev(blk, Dev())
    dev = DevOps(tray=True, removable=True)
    blk_set_dev_ops(blk, dev.ops())
    blk_dev_change_media_cb(blk, True)  # closed -> closed
    assert events == []
    blk_dev_change_media_cb(blk, False)  # closed -> open
    assert events == [("DEVICE_TRAY_MOVED", {"device": "cd0", "id": "dev0", "tray-open": True})]
    blk_dev_change_media_cb(blk, False)  # open -> open
    assert len(events) == 1
    blk_dev_change_media_cb(blk, True)  # open -> closed
    assert events[1] == ("DEVICE_TRAY_MOVED", {"device": "cd0", "id": "dev0",
                                               "tray-open": False})
    assert dev.media == [True, False, False, True]


def test_change_media_without_a_callback_does_nothing(new_blk, events):
    blk = new_blk(name="vd0")
    blk_attach_dev(blk, Dev())
    dev = DevOps(tray=True)  # a tray, but no change_media_cb
    blk_set_dev_ops(blk, dev.ops())
    blk_dev_change_media_cb(blk, False)
    assert events == [] and dev.media == []


def test_change_media_without_a_tray_sends_nothing(new_blk, events):
    blk = new_blk(name="vd0")
    blk_attach_dev(blk, Dev())
    dev = DevOps(tray=False, removable=True)
    blk_set_dev_ops(blk, dev.ops())
    blk_dev_change_media_cb(blk, False)
    assert dev.media == [False] and events == []


def test_removable_media_and_tray_follow_the_ops(new_blk):
    blk = new_blk()
    assert blk_dev_has_removable_media(blk)  # no device: removable, as in QEMU
    assert not blk_dev_has_tray(blk) and not blk_dev_is_tray_open(blk)
    blk_attach_dev(blk, Dev())
    assert not blk_dev_has_removable_media(blk)  # a device without media callbacks
    blk_set_dev_ops(blk, DevOps().ops())
    assert not blk_dev_has_removable_media(blk) and not blk_dev_has_tray(blk)
    dev = DevOps(tray=True, removable=True)
    blk_set_dev_ops(blk, dev.ops())
    assert blk_dev_has_removable_media(blk) and blk_dev_has_tray(blk)
    assert not blk_dev_is_tray_open(blk)
    dev.tray_open = True
    assert blk_dev_is_tray_open(blk)
