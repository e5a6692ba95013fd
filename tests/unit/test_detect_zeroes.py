"""detect-zeroes: a write of zeroes becomes a write-zeroes (QEMU's behaviour); with
detect-zeroes=unmap (which needs discard=unmap) it may deallocate the range."""

from __future__ import annotations

import os

import pytest

from pyvhost_blk.keyval import KeyvalError
from tests.unit.conftest import pattern
from tests.unit.test_drivers import do

KIB = 1024


def _spy(bs):
    calls: list[tuple[str, int, int, int]] = []
    drv = bs.drv
    zw, wv = drv.aio_pwrite_zeroes, drv.aio_pwritev

    def zeroes(ctx, off, n, flags, cb):
        calls.append(("zeroes", off, n, flags))
        zw(ctx, off, n, flags, cb)

    def writev(ctx, off, q, flags, cb):
        calls.append(("writev", off, q.size, flags))
        wv(ctx, off, q, flags, cb)

    drv.aio_pwrite_zeroes, drv.aio_pwritev = zeroes, writev
    return calls


def test_zero_writes_become_write_zeroes(main_ctx, make_node, make_blk, image) -> None:
    from blocklayer.bdrv import BDRV_REQ_MAY_UNMAP

    bs = make_node({"driver": "file", "filename": image(pattern(64 * KIB)),
                    "detect-zeroes": "on", "aio": "threads"})
    calls = _spy(bs)
    blk = make_blk(bs)
    assert do(blk, "write", 4096, bufs=[bytearray(8192)])[0] == 0
    assert do(blk, "write", 16 * KIB, bufs=[bytearray(pattern(4096))])[0] == 0
    assert [c[0] for c in calls] == ["zeroes", "writev"]
    assert not calls[0][3] & BDRV_REQ_MAY_UNMAP  # 'on' never deallocates
    ret, q = do(blk, "read", 4096, nbytes=8192)
    assert ret == 0 and q.to_bytes() == bytes(8192)


def test_detect_zeroes_unmap_deallocates(main_ctx, make_node, make_blk, image) -> None:
    path = image(pattern(1024 * KIB))
    bs = make_node({"driver": "file", "filename": path, "detect-zeroes": "unmap",
                    "discard": "unmap", "aio": "threads"})
    blk = make_blk(bs)
    before = os.stat(path).st_blocks
    assert do(blk, "write", 0, bufs=[bytearray(512 * KIB)])[0] == 0
    assert os.stat(path).st_blocks < before, "zeroes were written, not deallocated"
    ret, q = do(blk, "read", 0, nbytes=512 * KIB)
    assert ret == 0 and q.to_bytes() == bytes(512 * KIB)
    with open(path, "rb") as f:
        assert f.read()[512 * KIB:] == pattern(1024 * KIB)[512 * KIB:]


def test_detect_zeroes_unmap_needs_discard_unmap(make_node, image) -> None:
    with pytest.raises(KeyvalError, match="setting detect-zeroes to unmap is not allowed "
                                          "without setting discard operation to unmap"):
        make_node({"driver": "file", "filename": image(4096), "detect-zeroes": "unmap"})


def test_detect_zeroes_keeps_requests_off_the_c_path(make_node, make_blk, image) -> None:
    from blocklayer.bdrv import DRV_NONE

    bs = make_node({"driver": "file", "filename": image(4096), "detect-zeroes": "on",
                    "aio": "io_uring"})
    assert make_blk(bs).c.driver == DRV_NONE
