"""Batches through the node graph (blocklayer/io.py bdrv_batch): which requests a driver's
batch_io sees, which go one by one through the per-node rules, and how answers come back.

No queue here: the Batch is filled by hand and never handed back to C (finish() is the queue's
business); what is checked is what each request's ``ret`` ends up as."""

from __future__ import annotations

import errno

from blocklayer.batch import PENDING, T_FLUSH, T_READ, T_WRITE, UNSET, Batch
from blocklayer.io import bdrv_batch
from tests.unit.conftest import run_until
from vhost.ffi import ffi


def _batch(main_ctx, reqs):
    """reqs: (type, offset, data bytes or length).  Returns (batch, buffers)."""
    b = Batch(main_ctx, ffi.NULL, lambda: None)
    keep = []
    for i, (t, off, data) in enumerate(reqs):
        n = len(data) if isinstance(data, bytes) else data
        buf = ffi.new("char[]", data if isinstance(data, bytes) else n)
        iov = ffi.new("struct iovec *")
        iov.iov_base, iov.iov_len = buf, n
        keep += [buf, iov]
        b.types[i], b.offsets[i], b.lengths[i] = t, off, n
        b.iovs[i], b.niovs[i] = iov, 0 if t == T_FLUSH else 1
        b.flags[i], b.ret[i] = 0, UNSET
    b.n = len(reqs)
    b._serving = b._gen = 1  # as take() leaves them
    return b, keep


def test_a_batch_driver_answers_every_request_at_once(main_ctx, make_node):
    bs = make_node({"driver": "x-memory", "size": "1M"})
    b, keep = _batch(main_ctx, [(T_WRITE, 4096, b"a" * 512), (T_READ, 4096, 512),
                                (T_FLUSH, 0, 0)])
    bdrv_batch(bs, b)
    assert [b.ret[i] for i in range(3)] == [0, 0, 0]
    assert ffi.unpack(keep[2], 512) == b"a" * 512


def test_a_filter_shifts_and_forwards_the_batch(main_ctx, make_node):
    leaf = make_node({"driver": "x-memory", "size": "2M"})
    top = make_node({"driver": "raw", "offset": "1M", "file": leaf.node_name})
    cnt = make_node({"driver": "x-count", "file": top.node_name})
    b, _ = _batch(main_ctx, [(T_WRITE, 0, b"z" * 512)])
    bdrv_batch(cnt, b)
    assert b.ret[0] == 0 and b.offsets[0] == 1 << 20
    assert bytes(leaf.drv.data[1 << 20:(1 << 20) + 512]) == b"z" * 512
    assert cnt.drv.query_info()["x-count"]["write"] == 1


def test_a_driver_without_batch_io_gets_each_request_through_the_node_rules(main_ctx,
                                                                           make_node):
    # x-delay has no batch_io: its requests complete later, through defer()
    leaf = make_node({"driver": "x-memory", "size": "1M"})
    slow = make_node({"driver": "x-delay", "every": "1", "delay-us": "1000",
                      "file": leaf.node_name})
    b, keep = _batch(main_ctx, [(T_WRITE, 0, b"q" * 512), (T_READ, 0, 512)])
    bdrv_batch(slow, b)
    assert [b.ret[i] for i in range(2)] == [PENDING, PENDING]
    # (still "serving": the answers land in ret instead of going to a queue)
    run_until(lambda: PENDING not in (b.ret[0], b.ret[1]))
    assert [b.ret[i] for i in range(2)] == [0, 0]
    assert ffi.unpack(keep[2], 512) == b"q" * 512


def test_detect_zeroes_sends_writes_through_the_per_request_rules(main_ctx, make_node):
    bs = make_node({"driver": "x-memory", "size": "1M", "detect-zeroes": "on"})
    calls = []
    bs.drv.aio_pwrite_zeroes = lambda ctx, off, n, flags, cb: (calls.append((off, n)), cb(0))
    b, _ = _batch(main_ctx, [(T_WRITE, 8192, bytes(4096))])
    bdrv_batch(bs, b)
    assert b.ret[0] == 0 and calls == [(8192, 4096)]  # became a write-zeroes


def test_unanswered_requests_fail_instead_of_hanging(main_ctx, make_node):
    bs = make_node({"driver": "x-memory", "size": "1M"})
    b, _ = _batch(main_ctx, [(T_READ, 0, 512), (T_READ, 512, 512)])

    def forgetful(batch):
        batch.ret[0] = 0  # answers the first, forgets the second, then breaks

        raise RuntimeError("driver bug")

    bs.drv.batch_io = forgetful
    try:
        bdrv_batch(bs, b)
    except RuntimeError:
        b.fail_unanswered(-errno.EIO)  # what the export does
    assert [b.ret[i] for i in range(2)] == [0, -errno.EIO]


def test_defer_answers_in_place_while_serving_and_late_after(main_ctx):
    b, _ = _batch(main_ctx, [(T_READ, 0, 512), (T_READ, 0, 512)])
    first = b.defer(0)
    assert b.ret[0] == PENDING
    first(-errno.ENOSPC)  # completed inside the serving call: just the answer
    assert b.ret[0] == -errno.ENOSPC
    assert b.ret[1] == UNSET
    run_until(lambda: True)
