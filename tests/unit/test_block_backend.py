"""BlockBackend: request checks, in-flight accounting, stats, permissions, FUA, drain."""

from __future__ import annotations

import errno
import threading

import pytest

from blocklayer.accounting import BlockAcctType
from blocklayer.aio import AioContext
from blocklayer.bdrv import BDRV_REQ_FUA, BlockDriver, BlockDriverState
from blocklayer.block_backend import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_WRITE,
    INT_MAX,
    blk_aio_flush,
    blk_aio_preadv,
    blk_aio_pwritev,
    blk_all,
    blk_check_byte_request,
    blk_drain,
    blk_get_stats,
    blk_getlength,
    blk_insert_bs,
    blk_is_read_only,
    blk_nb_sectors,
    blk_new,
    blk_set_enable_write_cache,
    blk_unref,
)
from blocklayer.iov import IOVector
from tests.unit.conftest import drain_bhs, run_until

READ, WRITE, FLUSH = BlockAcctType.READ, BlockAcctType.WRITE, BlockAcctType.FLUSH
SIZE = 1 << 20


class HeldDriver(BlockDriver):
    """Records every request and completes it only when the test says so."""

    format_name = "unit-held"

    def __init__(self, node_name="held", opts=None, size=SIZE, hold=True):
        super().__init__(node_name, opts or {})
        self.size = size
        self.hold = hold
        self.requests: list[tuple] = []  # (op, offset, size, flags, ctx, cb)
        self.closed = False

    def getlength(self) -> int:
        return self.size

    def _req(self, op, ctx, offset, size, flags, cb):
        self.requests.append((op, offset, size, flags, ctx, cb))
        if not self.hold:
            cb(0)

    def aio_preadv(self, ctx, offset, qiov, cb):
        self._req("read", ctx, offset, qiov.size, 0, cb)

    def aio_pwritev(self, ctx, offset, qiov, flags, cb):
        self._req("write", ctx, offset, qiov.size, flags, cb)

    def aio_flush(self, ctx, cb):
        self._req("flush", ctx, 0, 0, 0, cb)

    def close(self):
        self.closed = True


def held_bs(hold=True, read_only=False, size=SIZE) -> BlockDriverState:
    return BlockDriverState("held", HeldDriver(size=size, hold=hold), read_only)


def qiov(n: int) -> IOVector:
    return IOVector.from_buffers([bytearray(n)])


class Results:
    def __init__(self):
        self.rets: list[int] = []

    def __call__(self, ret: int) -> None:
        self.rets.append(ret)


# -- blk_check_byte_request -------------------------------------------------------------------
@pytest.mark.parametrize(
    "offset, size, expect",
    [
        (0, 0, 0),
        (0, SIZE, 0),
        (SIZE - 512, 512, 0),
        (SIZE, 0, 0),  # exactly at the end, zero length: fine
        (SIZE - 1, 1, 0),
        (-1, 0, -errno.EIO),
        (-512, 512, -errno.EIO),
        (SIZE + 1, 0, -errno.EIO),  # offset beyond the end
        (SIZE, 1, -errno.EIO),
        (SIZE - 512, 513, -errno.EIO),  # length - offset < size
        (0, SIZE + 1, -errno.EIO),
        (0, INT_MAX + 1, -errno.EIO),  # larger than INT_MAX
    ],
)
def test_check_byte_request(make_blk, offset, size, expect):
    blk = make_blk(held_bs())
    assert blk_check_byte_request(blk, offset, size) == expect


def test_check_byte_request_int_max_even_when_beyond_eof_allowed(make_blk):
    blk = make_blk(held_bs())
    blk.allow_write_beyond_eof = True
    assert blk_check_byte_request(blk, SIZE * 4, 4096) == 0
    assert blk_check_byte_request(blk, 0, INT_MAX + 1) == -errno.EIO
    assert blk_check_byte_request(blk, -1, 0) == -errno.EIO


def test_check_byte_request_no_medium(make_blk):
    blk = make_blk(None)
    assert blk_check_byte_request(blk, 0, 512) == -errno.ENOMEDIUM
    assert blk_check_byte_request(blk, 0, 0) == -errno.ENOMEDIUM
    assert blk_getlength(blk) == -errno.ENOMEDIUM
    assert blk_nb_sectors(blk) == -errno.ENOMEDIUM


def test_nb_sectors_rounds_down(make_blk):
    blk = make_blk(held_bs(size=SIZE + 100))
    assert blk_getlength(blk) == SIZE + 100
    assert blk_nb_sectors(blk) == SIZE // 512


# -- request lifecycle ------------------------------------------------------------------------
def test_in_flight_and_deferred_completion(main_ctx, make_blk):
    bs = held_bs()
    drv: HeldDriver = bs.drv
    blk = make_blk(bs)
    res = Results()
    blk_aio_preadv(blk, 4096, qiov(8192), 0, res)
    assert blk.in_flight == 1
    assert len(drv.requests) == 1
    op, offset, size, _flags, ctx, cb = drv.requests[0]
    assert (op, offset, size) == ("read", 4096, 8192)
    assert ctx is main_ctx  # completions go back to the submitter's context
    drain_bhs(main_ctx)
    assert res.rets == [] and blk.in_flight == 1
    cb(0)  # the driver completes from its context, after blk_aio_preadv returned
    assert res.rets == [0]
    assert blk.in_flight == 0
    s = blk_get_stats(blk)
    assert s.nr_ops[READ] == 1 and s.nr_bytes[READ] == 8192


def test_synchronous_driver_completion_is_deferred_to_a_bh(main_ctx, make_blk):
    blk = make_blk(held_bs(hold=False))
    for submit in (
        lambda cb: blk_aio_preadv(blk, 0, qiov(512), 0, cb),
        lambda cb: blk_aio_pwritev(blk, 0, qiov(512), 0, cb),
        lambda cb: blk_aio_flush(blk, cb),
    ):
        res = Results()
        submit(res)
        assert res.rets == []
        assert blk.in_flight == 1
        run_until(lambda res=res: res.rets)
        assert res.rets == [0]
        assert blk.in_flight == 0


def test_invalid_request_fails_in_a_bh(main_ctx, make_blk):
    bs = held_bs()
    blk = make_blk(bs)
    res = Results()
    blk_aio_preadv(blk, SIZE, qiov(512), 0, res)
    assert res.rets == []
    assert bs.drv.requests == []  # never reached the driver
    run_until(lambda: res.rets)
    assert res.rets == [-errno.EIO]
    assert blk.in_flight == 0
    assert blk.stats.failed_ops[READ] == 1
    assert blk.stats.nr_ops[READ] == 0


def test_stats_count_ops_and_bytes(main_ctx, make_blk):
    blk = make_blk(held_bs(hold=False))
    res = Results()
    blk_aio_preadv(blk, 0, qiov(4096), 0, res)
    blk_aio_preadv(blk, 4096, qiov(512), 0, res)
    blk_aio_pwritev(blk, 0, qiov(1024), 0, res)
    blk_aio_flush(blk, res)
    blk_aio_pwritev(blk, SIZE, qiov(512), 0, res)  # beyond the end: fails
    run_until(lambda: len(res.rets) == 5)
    d = blk.stats.to_dict()
    assert d["rd_operations"] == 2 and d["rd_bytes"] == 4608
    assert d["wr_operations"] == 1 and d["wr_bytes"] == 1024
    assert d["flush_operations"] == 1
    assert d["failed_wr_operations"] == 1
    assert d["failed_rd_operations"] == 0
    assert blk.in_flight == 0


def test_completion_order_matches_driver_order(main_ctx, make_blk):
    bs = held_bs()
    blk = make_blk(bs)
    order = []
    for i in range(4):
        blk_aio_preadv(blk, i * 512, qiov(512), 0, lambda ret, i=i: order.append((i, ret)))
    assert blk.in_flight == 4
    for idx in (2, 0, 3, 1):
        bs.drv.requests[idx][5](0 if idx != 3 else -errno.EIO)
    assert order == [(2, 0), (0, 0), (3, -errno.EIO), (1, 0)]
    assert blk.in_flight == 0
    assert blk.stats.failed_ops[READ] == 1


# -- permissions / read-only ------------------------------------------------------------------
def test_write_to_read_only_node_fails(main_ctx, make_node, make_blk):
    bs = make_node({"driver": "null-co", "size": "1M", "read-only": "on"})
    blk = make_blk(bs, writable=False)
    assert blk_is_read_only(blk)
    res = Results()
    blk_aio_pwritev(blk, 0, qiov(512), 0, res)
    run_until(lambda: res.rets)
    assert res.rets[0] < 0
    assert res.rets == [-errno.EPERM]
    assert blk.stats.failed_ops[WRITE] == 1
    # reads are fine
    blk_aio_preadv(blk, 0, qiov(512), 0, res)
    run_until(lambda: len(res.rets) == 2)
    assert res.rets[1] == 0


def test_writer_cannot_attach_to_read_only_node(main_ctx, make_node):
    bs = make_node({"driver": "null-co", "read-only": "on"})
    blk = blk_new(main_ctx, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    try:
        with pytest.raises(PermissionError, match="read-only"):
            blk_insert_bs(blk, bs)
        assert blk.root is None
        assert bs.refcnt == 1 and bs.parents == []
    finally:
        blk_unref(blk)


def test_writer_cannot_attach_to_read_only_file(main_ctx, make_node, image):
    bs = make_node({"driver": "file", "filename": image(4096), "read-only": "on"})
    assert bs.drv.can_write() is False
    blk = blk_new(main_ctx, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    try:
        with pytest.raises(PermissionError):
            blk_insert_bs(blk, bs)
    finally:
        blk_unref(blk)


def test_unref_releases_node_reference(main_ctx, make_node):
    bs = make_node({"driver": "null-co"})
    blk = blk_new(main_ctx, BLK_PERM_CONSISTENT_READ, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    assert bs.refcnt == 2 and blk in blk_all()
    blk_unref(blk)
    assert bs.refcnt == 1 and bs.parents == []
    assert blk not in blk_all()


# -- write cache / FUA ------------------------------------------------------------------------
@pytest.mark.parametrize("wce, fua", [(True, False), (False, True)])
def test_write_cache_controls_fua(main_ctx, make_blk, wce, fua):
    bs = held_bs(hold=False)
    blk = make_blk(bs)
    blk_set_enable_write_cache(blk, wce)
    res = Results()
    blk_aio_pwritev(blk, 0, qiov(512), 0, res)
    blk_aio_preadv(blk, 0, qiov(512), 0, res)
    run_until(lambda: len(res.rets) == 2)
    (w_op, _, _, w_flags, _, _), (r_op, _, _, r_flags, _, _) = bs.drv.requests
    assert w_op == "write" and r_op == "read"
    assert bool(w_flags & BDRV_REQ_FUA) == fua
    assert r_flags == 0


def test_caller_flags_are_passed_through(main_ctx, make_blk):
    bs = held_bs(hold=False)
    blk = make_blk(bs)
    res = Results()
    blk_aio_pwritev(blk, 0, qiov(512), 0x1, res)
    run_until(lambda: res.rets)
    assert bs.drv.requests[0][3] == 0x1


def test_default_write_cache_is_on(make_blk):
    assert make_blk(held_bs()).enable_write_cache is True


# -- no medium --------------------------------------------------------------------------------
def test_requests_without_medium(main_ctx, make_blk):
    blk = make_blk(None)
    res = Results()
    blk_aio_preadv(blk, 0, qiov(512), 0, res)
    blk_aio_pwritev(blk, 0, qiov(512), 0, res)
    blk_aio_flush(blk, res)
    assert res.rets == []
    run_until(lambda: len(res.rets) == 3)
    assert res.rets == [-errno.ENOMEDIUM] * 3
    assert blk.in_flight == 0


# -- drain ------------------------------------------------------------------------------------
def test_drain_waits_for_in_flight_requests(main_ctx, make_blk):
    bs = held_bs()
    blk = make_blk(bs)
    res = Results()
    blk_aio_preadv(blk, 0, qiov(512), 0, res)
    blk_aio_pwritev(blk, 0, qiov(512), 0, res)
    drained = []
    blk_drain(blk, lambda: drained.append(blk.in_flight))
    drain_bhs(main_ctx)
    assert drained == []
    bs.drv.requests[0][5](0)
    drain_bhs(main_ctx)
    assert drained == []  # one request still in flight
    bs.drv.requests[1][5](0)
    run_until(lambda: drained)
    assert drained == [0]
    assert res.rets == [0, 0]
    drain_bhs(main_ctx)
    assert drained == [0]  # exactly once


def test_drain_with_nothing_in_flight_is_immediate(make_blk):
    blk = make_blk(held_bs())
    drained = []
    blk_drain(blk, lambda: drained.append(True))
    assert drained == [True]


def test_drain_with_completion_from_another_thread(main_ctx, make_blk):
    """A request completed in an iothread's context: the main loop's drain still ends."""
    bs = held_bs()
    blk = make_blk(bs)
    other = AioContext("unit-other")
    t = threading.Thread(target=other.run, daemon=True)
    t.start()
    try:
        res = Results()
        submitted = threading.Event()

        def submit_in_other():
            blk_aio_preadv(blk, 0, qiov(512), 0, res)
            submitted.set()

        other.schedule(submit_in_other)
        assert submitted.wait(5)
        assert bs.drv.requests[0][4] is other
        drained = []
        blk_drain(blk, lambda: drained.append(True))
        drain_bhs(main_ctx)
        assert drained == []
        other.schedule(bs.drv.requests[0][5], 0)
        run_until(lambda: drained)
        assert res.rets == [0]
    finally:
        other.stop()
        t.join(5)
        other.close()
    assert not t.is_alive()
