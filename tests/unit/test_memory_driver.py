"""x-memory: the Python driver, on the generic path and through batch_io."""

from __future__ import annotations

import pytest

from blocklayer.batch import UNSET, Batch
from blocklayer.block_backend import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_WRITE,
    blk_aio_pdiscard,
    blk_aio_preadv,
    blk_aio_pwrite_zeroes,
    blk_aio_pwritev,
    blk_insert_bs,
    blk_new,
    blk_unref,
)
from blocklayer.iov import IOVector
from tests.unit.conftest import run_until
from vhost.ffi import ffi


@pytest.fixture
def mem_blk(main_ctx, make_node):
    bs = make_node({"driver": "x-memory", "size": "1M"})
    blk = blk_new(main_ctx, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    yield blk
    blk_unref(blk)


def _io(fn, *args) -> int:
    res: list[int] = []
    fn(*args, res.append)
    run_until(lambda: res)
    return res[0]


def test_generic_path_round_trip(mem_blk):
    data = bytearray(b"pyvhost!" * 512)
    assert _io(blk_aio_pwritev, mem_blk, 8192, IOVector.from_buffers([data]), 0) == 0
    out = bytearray(4096)
    assert _io(blk_aio_preadv, mem_blk, 8192, IOVector.from_buffers([out]), 0) == 0
    assert out == data
    assert _io(blk_aio_pwrite_zeroes, mem_blk, 8192, 512, 0) == 0
    assert _io(blk_aio_preadv, mem_blk, 8192, IOVector.from_buffers([out]), 0) == 0
    assert out[:512] == bytes(512) and out[512:] == data[512:]
    assert mem_blk.root.drv.getlength() == 1 << 20


def test_discard_reaches_the_driver_only_with_unmap(main_ctx, make_node):
    bs = make_node({"driver": "x-memory", "size": "64k", "discard": "unmap"})
    bs.drv.data[0:4] = b"abcd"
    blk = blk_new(main_ctx, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
    blk_insert_bs(blk, bs)
    try:
        assert _io(blk_aio_pdiscard, blk, 0, 4096) == 0
        assert bs.drv.data[0:4] == bytes(4)
    finally:
        blk_unref(blk)


def test_batch_io_reads_and_writes_guest_buffers(make_node):
    drv = make_node({"driver": "x-memory", "size": "64k"}).drv
    b = Batch(None, ffi.NULL, lambda: None)
    src = ffi.new("char[]", b"x" * 1024)
    dst = ffi.new("char[]", 1024)
    iov = ffi.new("struct iovec[2]")
    iov[0].iov_base, iov[0].iov_len = src, 1024
    iov[1].iov_base, iov[1].iov_len = dst, 1024
    b.types[0], b.offsets[0], b.lengths[0], b.iovs[0], b.niovs[0] = 1, 4096, 1024, iov, 1
    b.types[1], b.offsets[1], b.lengths[1], b.iovs[1], b.niovs[1] = 0, 4096, 1024, iov + 1, 1
    b.types[2], b.niovs[2] = 4, 0
    b.n = 3
    for i in range(3):
        b.ret[i] = UNSET  # as take() leaves them
    drv.batch_io(b)
    assert [b.ret[i] for i in range(3)] == [0, 0, 0]
    assert ffi.unpack(dst, 1024) == b"x" * 1024
    assert bytes(drv.data[4096:5120]) == b"x" * 1024


def test_truncate_keeps_data(make_node):
    drv = make_node({"driver": "x-memory", "size": "64k"}).drv
    drv.data[100:104] = b"keep"
    drv.truncate(128 << 10)
    assert drv.getlength() == 128 << 10 and bytes(drv.data[100:104]) == b"keep"
