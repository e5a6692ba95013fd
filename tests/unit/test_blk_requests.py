"""virtio-blk requests through the real request path: an in-process vhost-user connection
(tests/unit/conftest.py ``export_rig``), so every request is parsed and checked by the C queue
loop (vhost/csrc/virtio_blk_queue.c) and served in C or by the node graph in batches.  Header
parsing, validation, statuses, in_len and accounting, as QEMU's virtio-blk-handler.c."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blocklayer.accounting import BlockAcctType
from blocklayer.bdrv import BlockDriver, BlockDriverState
from tests.frontend.vhost_user import POISON, STATUS_UNSET
from tests.unit.conftest import (
    IOERR,
    OK,
    T_FLUSH,
    T_IN,
    T_OUT,
    UNSUPP,
    outhdr,
    pattern,
    unique,
)
from virtio.constants import VIRTIO_BLK_T_BARRIER, VirtioBlkType

T_GET_ID = int(VirtioBlkType.GET_ID)
READ = BlockAcctType.READ
WRITE = BlockAcctType.WRITE

DISK_SIZE = 64 * 1024  # 128 sectors
DISK = pattern(DISK_SIZE)
CAPACITY = DISK_SIZE // 512


@pytest.fixture
def file_rig(make_node, image, export_rig):
    """file_rig(writable=True) -> (rig, image path): a file node (thread pool: the batch
    path) over a DISK-pattern image."""

    def make(writable: bool = True):
        path = image(DISK)
        bs = make_node({"driver": "file", "filename": path, "aio": "threads"})
        return export_rig(bs, writable), path

    return make


@pytest.fixture
def null_rig(make_node, export_rig):
    """null_rig(lbs=512, **kw) -> rig over null-co (served by C end to end)."""

    def make(lbs: int = 512, **kw):
        bs = make_node({"driver": "null-co", "size": str(DISK_SIZE), "read-zeroes": "on"})
        return export_rig(bs, lbs=lbs, **kw)

    return make


def run(rig, out: list[bytes], inp: list[int]):
    req = rig.submit(out, inp)
    rig.wait(req)
    return req


def stats(rig):
    return rig.exp.blk.stats


# -- reads ------------------------------------------------------------------------------------
def test_read_data_and_status(file_rig):
    rig, _ = file_rig()
    req = run(rig, [outhdr(T_IN, sector=3)], [1024 + 1])
    assert (req.status, req.used_len) == (OK, 1024 + 1)
    assert req.data == DISK[3 * 512: 5 * 512]


def test_null_read_zeroes(null_rig):
    req = run(null_rig(), [outhdr(T_IN, sector=0)], [512, 1])
    assert (req.status, req.used_len) == (OK, 513)
    assert req.data == bytes(512)


@pytest.mark.parametrize("cuts", [[6], [1], [15], [3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
def test_read_header_split_over_iovecs(file_rig, cuts):
    rig, _ = file_rig()
    hdr = outhdr(T_IN | VIRTIO_BLK_T_BARRIER, sector=7, ioprio=3)
    edges = [0, *cuts, len(hdr)]
    req = run(rig, [hdr[a:b] for a, b in zip(edges, edges[1:], strict=False)], [512, 1])
    assert (req.status, req.used_len) == (OK, 513)
    assert req.data == DISK[7 * 512: 8 * 512]


def test_read_data_scattered_over_several_iovecs(file_rig):
    rig, _ = file_rig()
    sizes = [100, 412, 1, 1023, 512, 1]  # 2048 data bytes + status
    req = run(rig, [outhdr(T_IN, sector=10)], sizes)
    assert (req.status, req.used_len) == (OK, 2049)
    assert req.data == DISK[10 * 512: 14 * 512]


def test_read_status_byte_shares_last_iovec_with_data(file_rig):
    rig, _ = file_rig()
    req = run(rig, [outhdr(T_IN, sector=1)], [300, 212 + 512 + 1])
    assert (req.status, req.used_len) == (OK, 1025)
    assert req.data == DISK[512: 3 * 512]


def test_read_last_sector_ok(file_rig):
    rig, _ = file_rig()
    req = run(rig, [outhdr(T_IN, sector=CAPACITY - 1)], [513])
    assert (req.status, req.used_len) == (OK, 513)
    assert req.data == DISK[-512:]


def test_ioprio_is_ignored(null_rig):
    assert null_rig().complete([outhdr(T_IN, ioprio=0xFFFFFFFF)], [513]) == (OK, 513)


def test_read_with_only_status_byte_is_a_zero_length_read(null_rig):
    assert null_rig().complete([outhdr(T_IN, sector=5)], [1]) == (OK, 1)


# -- writes -----------------------------------------------------------------------------------
def test_write_lands_in_file(file_rig):
    rig, path = file_rig()
    payload = pattern(1536, seed=99)
    assert rig.complete([outhdr(T_OUT, sector=4), payload[:700], payload[700:]]) == (OK, 1)
    disk = Path(path).read_bytes()
    assert disk[4 * 512: 7 * 512] == payload
    assert disk[: 4 * 512] == DISK[: 4 * 512] and disk[7 * 512:] == DISK[7 * 512:]
    assert stats(rig).nr_bytes[WRITE] == 1536


@pytest.mark.parametrize("split", [0, 7, 16 + 100])
def test_write_with_header_and_data_sharing_buffers(file_rig, split):
    """The header and the data in one buffer (or the header cut anywhere): the data starts at
    byte 16 of the chain."""
    rig, path = file_rig()
    payload = pattern(1024, seed=5)
    raw = outhdr(T_OUT, sector=2) + payload
    out = [raw] if not split else [raw[:split], raw[split:]]
    assert rig.complete(out) == (OK, 1)
    assert Path(path).read_bytes()[1024:2048] == payload
    assert stats(rig).nr_bytes[WRITE] == 1024


def test_write_then_read_back(null_rig, make_node, export_rig):
    rig = export_rig(make_node({"driver": "x-memory", "size": str(DISK_SIZE)}))
    payload = pattern(1024, seed=42)
    assert rig.complete([outhdr(T_OUT, sector=20), payload]) == (OK, 1)
    assert run(rig, [outhdr(T_IN, sector=20)], [1025]).data == payload


def test_write_to_read_only_export_is_ioerr(file_rig):
    rig, path = file_rig(writable=False)
    assert rig.complete([outhdr(T_OUT, sector=0), b"\x01" * 512]) == (IOERR, 1)
    assert stats(rig).invalid_ops[WRITE] == 1
    assert Path(path).read_bytes() == DISK
    # reads still work
    assert rig.complete([outhdr(T_IN, sector=0)], [513]) == (OK, 513)


# -- flush / get-id / unsupported ------------------------------------------------------------
def test_flush(file_rig):
    rig, _ = file_rig()
    assert rig.complete([outhdr(T_FLUSH)]) == (OK, 1)
    assert stats(rig).nr_ops[BlockAcctType.FLUSH] == 1


def test_flush_on_null(null_rig):
    assert null_rig().complete([outhdr(T_FLUSH)]) == (OK, 1)


@pytest.mark.parametrize(
    "serial, in_sizes, expect",
    [
        # fits with its NUL terminator
        ("vhost_user_blk", [20 + 1], b"vhost_user_blk\0"),
        ("abc", [64, 1], b"abc\0"),
        # buffer shorter than the serial: truncated, no NUL
        ("vhost_user_blk", [8 + 1], b"vhost_us"),
        ("vhost_user_blk", [3, 2, 1], b"vhost"),
        # longer than VIRTIO_BLK_ID_BYTES: 20 bytes, no NUL
        ("0123456789abcdefghijKLMNO", [64 + 1], b"0123456789abcdefghij"),
        # exactly 20 bytes: the NUL does not fit in the 20-byte id
        ("0123456789abcdefghij", [64 + 1], b"0123456789abcdefghij"),
        # no room at all besides the status byte
        ("vhost_user_blk", [1], b""),
    ],
)
def test_get_id(null_rig, serial, in_sizes, expect):
    req = run(null_rig(serial=serial), [outhdr(T_GET_ID)], in_sizes)
    assert (req.status, req.used_len) == (OK, len(expect) + 1)
    data = req.data
    assert data[: len(expect)] == expect
    assert data[len(expect):] == bytes([POISON]) * (len(data) - len(expect))  # untouched


@pytest.mark.parametrize("rtype", [99, 2, 3, 10, 14, 99 | VIRTIO_BLK_T_BARRIER])
def test_unknown_type_is_unsupp(null_rig, rtype):
    assert null_rig().complete([outhdr(rtype)], [513]) == (UNSUPP, 1)


# -- invalid ranges ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sector, nbytes",
    [
        (CAPACITY, 512),  # starts at the end
        (CAPACITY - 1, 1024),  # runs past the end
        (CAPACITY + 1, 0),  # starts past the end, even with no data
        (2**64 - 1, 512),  # would wrap in 64-bit arithmetic
        (2**55, 512),  # sector << 9 overflows 64 bits
    ],
)
@pytest.mark.parametrize("rtype", [T_IN, T_OUT])
def test_out_of_range_is_ioerr_and_counted_invalid(null_rig, rtype, sector, nbytes):
    rig = null_rig()
    if rtype == T_OUT:
        got = rig.complete([outhdr(rtype, sector), b"\0" * nbytes] if nbytes else
                           [outhdr(rtype, sector)])
    else:
        got = rig.complete([outhdr(rtype, sector)], [nbytes + 1])
    assert got == (IOERR, 1)
    kind = WRITE if rtype == T_OUT else READ
    assert stats(rig).invalid_ops[kind] == 1
    assert stats(rig).nr_ops[kind] == 0
    assert rig.exp.blk.in_flight == 0


def test_zero_length_read_exactly_at_end_is_ok(null_rig):
    assert null_rig().complete([outhdr(T_IN, CAPACITY)], [1]) == (OK, 1)


@pytest.mark.parametrize("nbytes", [1, 511, 513, 1000])
@pytest.mark.parametrize("rtype", [T_IN, T_OUT])
def test_length_not_multiple_of_512_is_ioerr(null_rig, rtype, nbytes):
    rig = null_rig()
    if rtype == T_OUT:
        got = rig.complete([outhdr(rtype, 0), b"\0" * nbytes])
    else:
        got = rig.complete([outhdr(rtype, 0)], [nbytes + 1])
    assert got == (IOERR, 1)
    assert stats(rig).invalid_ops[WRITE if rtype == T_OUT else READ] == 1


@pytest.mark.parametrize("sector", [1, 4, 7, 9, 15])
def test_sector_misaligned_to_logical_block_size_is_ioerr(null_rig, sector):
    rig = null_rig(lbs=4096)
    assert rig.complete([outhdr(T_IN, sector)], [4096 + 1]) == (IOERR, 1)
    assert stats(rig).invalid_ops[READ] == 1


@pytest.mark.parametrize("sector", [0, 8, 16])
def test_sector_aligned_to_logical_block_size_is_ok(null_rig, sector):
    assert null_rig(lbs=4096).complete([outhdr(T_IN, sector)], [4096 + 1]) == (OK, 4097)


# -- driver errors ----------------------------------------------------------------------------
class _FailingDriver(BlockDriver):
    format_name = "unit-failing"

    def getlength(self) -> int:
        return 1 << 20

    def aio_preadv(self, ctx, offset, qiov, cb):
        cb(-errno.EIO)

    def aio_pwritev(self, ctx, offset, qiov, flags, cb):
        cb(-errno.ENOSPC)

    def aio_flush(self, ctx, cb):
        cb(-errno.EIO)


@pytest.fixture
def failing_rig(export_rig):
    return export_rig(BlockDriverState(unique("failing"), _FailingDriver("failing", {}), False))


def test_driver_read_error_is_ioerr(failing_rig):
    assert failing_rig.complete([outhdr(T_IN)], [513])[0] == IOERR
    assert stats(failing_rig).failed_ops[READ] == 1


def test_driver_write_error_is_ioerr(failing_rig):
    assert failing_rig.complete([outhdr(T_OUT), b"\0" * 512])[0] == IOERR
    assert stats(failing_rig).failed_ops[WRITE] == 1


def test_driver_flush_error_is_ioerr(failing_rig):
    assert failing_rig.complete([outhdr(T_FLUSH)]) == (IOERR, 1)


# -- malformed requests -----------------------------------------------------------------------
# (libvhost-user refuses zero-sized buffers and empty chains before the device sees them: the
# connection is closed, tests/reliability/test_hostile_inputs.py)
@pytest.mark.parametrize(
    "out_chunks, in_chunks",
    [
        ([b"\0" * 15], [513]),  # header shorter than 16 bytes
        ([b"\0" * 8, b"\0" * 7], [513]),  # ... even when split
        ([outhdr(T_IN)], []),  # no device-writable buffer
        ([], [513]),  # no driver-readable buffer
        ([outhdr(T_OUT), b"\0" * 512], []),
    ],
)
def test_malformed_requests(null_rig, out_chunks, in_chunks):
    rig = null_rig()
    req = run(rig, out_chunks, in_chunks)
    assert req.used_len == 0
    if in_chunks:
        assert req.in_bytes() == bytes([POISON]) * 512 + bytes([STATUS_UNSET])  # untouched
    assert rig.exp.blk.in_flight == 0
    assert rig.exp.stats()["malformed-requests"] == 1


# -- what C sends to the node graph -----------------------------------------------------------
@pytest.mark.parametrize("fast_path", [True, False])
def test_raw_offset_is_added_once_on_either_path(make_node, image, export_rig, fast_path):
    """C serves a raw node over an io_uring file itself (adding the raw offset for the file);
    with the C path off the batch carries the root node's offsets and raw adds its own."""
    path = image(DISK)
    bs = make_node({"driver": "raw", "offset": "4096",
                    "file": {"driver": "file", "filename": path, "aio": "io_uring"}})
    rig = export_rig(bs, fast_path=fast_path)
    payload = pattern(1024, seed=11)
    assert rig.complete([outhdr(T_OUT, 2), payload]) == (OK, 1)
    req = run(rig, [outhdr(T_IN, 0)], [2048 + 1])
    assert req.data == DISK[4096:5120] + payload
    disk = Path(path).read_bytes()
    assert disk[4096 + 1024:4096 + 2048] == payload
    assert disk[:4096 + 1024] == DISK[:4096 + 1024]
    s = rig.exp.stats()
    assert (s["fast-path-requests"] > 0) == fast_path and (s["batch-requests"] > 0) != fast_path


def test_request_misaligned_for_the_node_is_padded(make_node, export_rig):
    """A 512-byte write on a node that needs 4 KiB: C hands it over marked for the per-request
    path, which pads it (read-modify-write); aligned ones go through the filter's batch_io."""
    bs = make_node({"driver": "x-count", "file": {
        "driver": "blkdebug", "align": "4096",
        "image": {"driver": "x-memory", "size": str(DISK_SIZE)}}})
    rig = export_rig(bs)
    base = pattern(8192, seed=1)
    assert rig.complete([outhdr(T_OUT, 0), base]) == (OK, 1)
    patch = pattern(512, seed=2)
    assert rig.complete([outhdr(T_OUT, 3), patch]) == (OK, 1)
    req = run(rig, [outhdr(T_IN, 0)], [8192 + 1])
    assert req.data == base[:1536] + patch + base[2048:]
    assert bs.drv.query_info()["x-count"]["write"] == 2
