"""Block drivers (file with threads / io_uring, null-co) and blockdev_add option handling."""

from __future__ import annotations

import os

import pytest

from blocklayer import bdrv
from blocklayer.bdrv import BlockDriverError, bdrv_find_node, bdrv_unref
from blocklayer.block_backend import (
    blk_aio_flush,
    blk_aio_preadv,
    blk_aio_pwritev,
    blk_getlength,
    blk_set_enable_write_cache,
)
from blocklayer.blockdev import blockdev_add, flatten
from blocklayer.iov import IOVector
from pyvhost_blk.keyval import KeyvalError
from tests.unit.conftest import pattern, run_until, unique

AIO_MODES = ["threads", "io_uring"]


class Results:
    def __init__(self):
        self.rets: list[int] = []

    def __call__(self, ret: int) -> None:
        self.rets.append(ret)


def do(blk, op, offset=0, bufs=None, nbytes=None):
    """Run one blk_aio_* request to completion; return (ret, qiov)."""
    res = Results()
    q = IOVector.from_buffers(bufs if bufs is not None else [bytearray(nbytes or 0)])
    if op == "read":
        blk_aio_preadv(blk, offset, q, 0, res)
    elif op == "write":
        blk_aio_pwritev(blk, offset, q, 0, res)
    else:
        blk_aio_flush(blk, res)
    assert res.rets == []  # never synchronous
    run_until(lambda: res.rets)
    assert len(res.rets) == 1
    return res.rets[0], q


# -- file -------------------------------------------------------------------------------------
@pytest.mark.parametrize("aio", AIO_MODES)
def test_file_read_write_round_trip(main_ctx, make_node, make_blk, image, aio):
    data = pattern(64 * 1024)
    path = image(data)
    blk = make_blk(make_node({"driver": "file", "filename": path, "aio": aio}))
    assert blk_getlength(blk) == len(data)

    ret, q = do(blk, "read", 4096, nbytes=8192)
    assert ret == 0
    assert q.to_bytes() == data[4096 : 4096 + 8192]

    payload = [bytearray(pattern(1000, seed=1)), bytearray(pattern(24, seed=2)),
               bytearray(pattern(3072, seed=3))]
    ret, _ = do(blk, "write", 8192, bufs=payload)
    assert ret == 0
    want = b"".join(payload)

    bufs = [bytearray(512), bytearray(1536), bytearray(2048)]
    ret, q = do(blk, "read", 8192, bufs=bufs)
    assert ret == 0
    assert b"".join(bufs) == want

    assert do(blk, "flush")[0] == 0
    with open(path, "rb") as f:
        disk = f.read()
    assert disk[8192 : 8192 + 4096] == want
    assert disk[:8192] == data[:8192]
    assert disk[8192 + 4096 :] == data[8192 + 4096 :]
    s = blk.stats.to_dict()
    assert s["rd_operations"] == 2 and s["wr_operations"] == 1
    assert s["rd_bytes"] == 8192 + 4096 and s["wr_bytes"] == 4096


@pytest.mark.parametrize("aio", AIO_MODES)
def test_file_many_requests_in_flight(main_ctx, make_node, make_blk, image, aio):
    data = pattern(256 * 1024)
    blk = make_blk(make_node({"driver": "file", "filename": image(data), "aio": aio}))
    res = Results()
    bufs = [bytearray(4096) for _ in range(64)]
    for i, b in enumerate(bufs):
        blk_aio_preadv(blk, i * 4096, IOVector.from_buffers([b]), 0, res)
    assert blk.in_flight == 64
    run_until(lambda: len(res.rets) == 64)
    assert res.rets == [0] * 64
    assert b"".join(bufs) == data
    assert blk.in_flight == 0


@pytest.mark.parametrize("aio", AIO_MODES)
def test_file_write_through_uses_fua(main_ctx, make_node, make_blk, image, aio):
    path = image(8192)
    blk = make_blk(make_node({"driver": "file", "filename": path, "aio": aio}))
    blk_set_enable_write_cache(blk, False)
    ret, _ = do(blk, "write", 512, bufs=[bytearray(b"\x5a" * 512)])
    assert ret == 0
    with open(path, "rb") as f:
        assert f.read()[512:1024] == b"\x5a" * 512


@pytest.mark.parametrize("aio", AIO_MODES)
def test_file_short_read_at_eof_is_zero_filled(main_ctx, make_node, make_blk, image, aio):
    data = pattern(1000)  # not a multiple of 512
    blk = make_blk(make_node({"driver": "file", "filename": image(data), "aio": aio}))
    assert blk_getlength(blk) == 1024  # whole sectors
    buf = bytearray(b"\xee" * 1024)
    ret, _ = do(blk, "read", 0, bufs=[buf])
    assert ret == 0
    assert bytes(buf[:1000]) == data
    assert bytes(buf[1000:]) == bytes(24)
    # second sector only, split over two buffers
    bufs = [bytearray(b"\xee" * 500), bytearray(b"\xee" * 12)]
    ret, _ = do(blk, "read", 512, bufs=bufs)
    assert ret == 0
    assert bytes(bufs[0]) == data[512:1000] + bytes(12)
    assert bytes(bufs[1]) == bytes(12)


def test_file_read_beyond_length_is_eio(main_ctx, make_node, make_blk, image):
    blk = make_blk(make_node({"driver": "file", "filename": image(4096)}))
    ret, _ = do(blk, "read", 4096, nbytes=512)
    assert ret == -5  # -EIO from blk_check_byte_request


def test_file_read_only_node_opens_read_only(make_node, image):
    path = image(4096)
    os.chmod(path, 0o444)
    bs = make_node({"driver": "file", "filename": path, "read-only": "on"})
    assert bs.read_only and bs.bdrv_is_read_only()
    assert bs.drv.can_write() is False


def test_file_missing(make_node, tmp_path):
    missing = str(tmp_path / "nope.img")
    name = unique("missing")
    with pytest.raises(BlockDriverError) as ei:
        make_node({"driver": "file", "filename": missing}, name=name)
    assert str(ei.value) == f"Could not open '{missing}': No such file or directory"
    assert bdrv_find_node(name) is None  # nothing registered


def test_file_filename_required(make_node):
    with pytest.raises(BlockDriverError, match="Parameter 'filename' is missing"):
        make_node({"driver": "file"})


def test_file_aio_native_needs_cache_direct(make_node, image):
    with pytest.raises(BlockDriverError) as ei:
        make_node({"driver": "file", "filename": image(4096), "aio": "native"})
    assert str(ei.value) == (
        "aio=native was specified, but it requires cache.direct=on, which was not specified."
    )


def test_file_bad_aio_mode(make_node, image):
    with pytest.raises(KeyvalError, match="Parameter 'aio' does not accept value 'posix'"):
        make_node({"driver": "file", "filename": image(4096), "aio": "posix"})


def test_file_nested_cache_option_is_accepted(make_node, image):
    bs = make_node({"driver": "file", "filename": image(4096), "cache": {"no-flush": "on"}})
    assert bs.drv.no_flush is True


def test_file_close_releases_fd(image):
    name = unique("close")
    bs = blockdev_add({"driver": "file", "node-name": name, "filename": image(4096)})
    fd = bs.drv.fd
    os.fstat(fd)
    bdrv_unref(bs)
    assert bdrv_find_node(name) is None
    assert bs.drv.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)


# -- null-co ----------------------------------------------------------------------------------
def test_null_read_zeroes_on(main_ctx, make_node, make_blk):
    blk = make_blk(make_node({"driver": "null-co", "size": "1M", "read-zeroes": "on"}))
    bufs = [bytearray(b"\xab" * 700), bytearray(b"\xcd" * 324)]
    ret, _ = do(blk, "read", 4096, bufs=bufs)
    assert ret == 0
    assert bufs[0] == bytearray(700) and bufs[1] == bytearray(324)


@pytest.mark.parametrize("opts", [{}, {"read-zeroes": "off"}])
def test_null_read_leaves_buffer_untouched(main_ctx, make_node, make_blk, opts):
    blk = make_blk(make_node({"driver": "null-co", "size": "1M", **opts}))
    buf = bytearray(b"\xab" * 1024)
    ret, _ = do(blk, "read", 0, bufs=[buf])
    assert ret == 0
    assert buf == bytearray(b"\xab" * 1024)


def test_null_write_and_flush_succeed(main_ctx, make_node, make_blk):
    blk = make_blk(make_node({"driver": "null-co", "size": "1M"}))
    assert do(blk, "write", 0, bufs=[bytearray(4096)])[0] == 0
    assert do(blk, "flush")[0] == 0


@pytest.mark.parametrize(
    "size, length", [("1M", 1 << 20), ("4096", 4096), ("1G", 1 << 30), (None, 1 << 30)]
)
def test_null_size(make_node, size, length):
    opts = {"driver": "null-co"}
    if size is not None:
        opts["size"] = size
    assert make_node(opts).bdrv_getlength() == length


def test_null_size_from_json(make_node):
    name = unique("json")
    bs = blockdev_add({"driver": "null-co", "node-name": name, "size": 8192,
                       "read-zeroes": True}, from_json=True)
    try:
        assert bs.bdrv_getlength() == 8192 and bs.drv.read_zeroes is True
    finally:
        bdrv_unref(bs)


# -- blockdev_add -----------------------------------------------------------------------------
def test_unknown_option(make_node):
    with pytest.raises(KeyvalError) as ei:
        make_node({"driver": "null-co", "bogus": "1"})
    assert str(ei.value) == "Parameter 'bogus' is unexpected"


def test_unknown_nested_option(make_node, image):
    with pytest.raises(KeyvalError, match=r"^Parameter 'cache\.bogus' is unexpected$"):
        make_node({"driver": "file", "filename": image(512), "cache": {"bogus": "on"}})


def test_option_of_other_driver_is_unexpected(make_node):
    with pytest.raises(KeyvalError, match="^Parameter 'filename' is unexpected$"):
        make_node({"driver": "null-co", "filename": "/x"})


def test_unknown_driver(make_node):
    with pytest.raises(KeyvalError, match="^Parameter 'driver' does not accept value 'qcow9'$"):
        make_node({"driver": "qcow9"})


def test_missing_driver_and_node_name():
    with pytest.raises(KeyvalError, match="Parameter 'driver' is missing"):
        blockdev_add({"node-name": unique()})
    with pytest.raises(KeyvalError, match="Parameter 'node-name' is missing"):
        blockdev_add({"driver": "null-co"})


@pytest.mark.parametrize("name", ["1abc", "-x", "a b", "", "a" * 33, "a,b"])
def test_invalid_node_name(name):
    with pytest.raises(KeyvalError, match="Invalid node-name"):
        blockdev_add({"driver": "null-co", "node-name": name})
    assert name not in bdrv._nodes


def test_bad_bool_value(make_node):
    with pytest.raises(KeyvalError, match="Parameter 'read-zeroes' expects 'on' or 'off'"):
        make_node({"driver": "null-co", "read-zeroes": "maybe"})


def test_duplicate_node_name_refused(make_node, image):
    name = unique("dup")
    first = make_node({"driver": "null-co"}, name=name)
    with pytest.raises(BlockDriverError) as ei:
        make_node({"driver": "file", "filename": image(512)}, name=name)
    assert str(ei.value) == f"Duplicate nodes with node-name='{name}'"
    assert bdrv_find_node(name) is first


def test_duplicate_check_does_not_open_the_file(make_node, tmp_path):
    name = unique("dup2")
    make_node({"driver": "null-co"}, name=name)
    with pytest.raises(BlockDriverError, match="Duplicate"):
        make_node({"driver": "file", "filename": str(tmp_path / "missing")}, name=name)


def test_node_registry(make_node):
    name = unique("reg")
    bs = make_node({"driver": "null-co", "size": "64k"}, name=name)
    assert bdrv_find_node(name) is bs
    assert bs in bdrv.bdrv_nodes()
    info = bs.to_dict()
    assert (info["node-name"], info["drv"], info["ro"]) == (name, "null-co", False)
    assert info["image"]["virtual-size"] == 65536


def test_flatten():
    assert flatten({"a": {"b": {"c": 1}, "d": 2}, "e": 3}) == {"a.b.c": 1, "a.d": 2, "e": 3}
