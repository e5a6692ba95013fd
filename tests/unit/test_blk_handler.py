"""VirtioBlkHandler: header parsing, request validation and I/O over a real BlockBackend."""

from __future__ import annotations

import errno

import pytest

from blocklayer.accounting import BlockAcctType
from blocklayer.bdrv import BlockDriver, BlockDriverState
from tests.unit.conftest import Done, Sg, outhdr, pattern, run_until
from virtio.blk_handler import (
    MALFORMED,
    VirtioBlkHandler,
    iov_slice,
    parse_outhdr,
)
from virtio.constants import VIRTIO_BLK_T_BARRIER, VirtioBlkStatus, VirtioBlkType

OK = int(VirtioBlkStatus.OK)
IOERR = int(VirtioBlkStatus.IOERR)
UNSUPP = int(VirtioBlkStatus.UNSUPP)
T_IN = int(VirtioBlkType.IN)
T_OUT = int(VirtioBlkType.OUT)
T_FLUSH = int(VirtioBlkType.FLUSH)
T_GET_ID = int(VirtioBlkType.GET_ID)
READ = BlockAcctType.READ
WRITE = BlockAcctType.WRITE

DISK_SIZE = 64 * 1024  # 128 sectors
DISK = pattern(DISK_SIZE)


@pytest.fixture
def file_blk(make_node, make_blk, image):
    path = image(DISK)
    bs = make_node({"driver": "file", "filename": path, "aio": "threads"})
    return make_blk(bs), path


@pytest.fixture
def null_blk(make_node, make_blk):
    bs = make_node({"driver": "null-co", "size": str(DISK_SIZE), "read-zeroes": "on"})
    return make_blk(bs)


def submit(handler, out: Sg, inp: Sg) -> Done:
    done = Done()
    handler.process_req(out.iov, out.num, inp.iov, inp.num, done)
    return done


def complete(handler, out: Sg, inp: Sg) -> tuple[int, int]:
    """Submit and run the main loop until done; return (status, in_len)."""
    done = submit(handler, out, inp)
    run_until(lambda: done.called)
    return done.result


# -- parse_outhdr / iov_slice -----------------------------------------------------------------
def test_parse_outhdr_single_iovec():
    out = Sg([outhdr(T_OUT, sector=0x1122334455667788, ioprio=7) + b"data"])
    assert parse_outhdr(out.iov, out.num) == (T_OUT, 7, 0x1122334455667788)


@pytest.mark.parametrize("cuts", [[1], [5], [15], [3, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
def test_parse_outhdr_split_across_iovecs(cuts):
    raw = outhdr(0x80000001, sector=0xABCDEF, ioprio=3) + b"xyz"
    edges = [0, *cuts, len(raw)]
    out = Sg([raw[a:b] for a, b in zip(edges, edges[1:], strict=False)])
    assert parse_outhdr(out.iov, out.num) == (0x80000001, 3, 0xABCDEF)


@pytest.mark.parametrize("chunks", [[], [b"x" * 15], [b"x" * 7, b"y" * 8], [b""]])
def test_parse_outhdr_too_short(chunks):
    out = Sg(chunks)
    assert parse_outhdr(out.iov, out.num) is None


def test_iov_slice_skip_and_trim():
    sg = Sg([b"abcd", b"efgh", b"ij"])
    q = iov_slice(sg.iov, sg.num, 3, 1)
    assert q.size == 6
    assert q.to_bytes() == b"defghi"
    assert iov_slice(sg.iov, sg.num, 0, 10).size == 0
    assert iov_slice(sg.iov, sg.num, 5, 6) is None


# -- reads ------------------------------------------------------------------------------------
def test_read_is_completed_asynchronously_with_data(file_blk):
    blk, _ = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=True)
    out = Sg([outhdr(T_IN, sector=3)])
    inp = Sg([1024 + 1])
    done = submit(h, out, inp)
    assert not done.called  # never inside process_req for a valid request
    run_until(lambda: done.called)
    assert done.result == (OK, 1024 + 1)
    data = inp.chunk(0)
    assert data[:1024] == DISK[3 * 512 : 5 * 512]
    assert data[1024:] == b"\xee"  # the status byte is the transport's to write


def test_null_read_completion_is_deferred_too(null_blk):
    h = VirtioBlkHandler(null_blk, "serial", 512, writable=True)
    out = Sg([outhdr(T_IN, sector=0)])
    inp = Sg([512, 1])
    done = submit(h, out, inp)
    assert not done.called
    run_until(lambda: done.called)
    assert done.result == (OK, 513)
    assert inp.chunk(0) == bytes(512)
    assert inp.chunk(1) == b"\xee"


def test_read_header_split_over_two_iovecs(file_blk):
    blk, _ = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=True)
    hdr = outhdr(T_IN, sector=7)
    out = Sg([hdr[:6], hdr[6:]])
    inp = Sg([512, 1])
    assert complete(h, out, inp) == (OK, 513)
    assert inp.chunk(0) == DISK[7 * 512 : 8 * 512]


def test_read_data_scattered_over_several_iovecs(file_blk):
    blk, _ = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=True)
    out = Sg([outhdr(T_IN, sector=10)])
    sizes = [100, 412, 1, 1023, 512, 1]  # 2048 data bytes + status
    inp = Sg(sizes)
    assert complete(h, out, inp) == (OK, 2049)
    assert inp.data()[:2048] == DISK[10 * 512 : 14 * 512]
    assert inp.chunk(len(sizes) - 1) == b"\xee"


def test_read_status_byte_shares_last_iovec_with_data(file_blk):
    blk, _ = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=True)
    out = Sg([outhdr(T_IN, sector=1)])
    inp = Sg([300, 212 + 512 + 1])
    assert complete(h, out, inp) == (OK, 1025)
    data = inp.data()
    assert data[:1024] == DISK[512 : 3 * 512]
    assert data[1024:] == b"\xee"


def test_read_last_sector_ok(file_blk):
    blk, _ = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=True)
    last = DISK_SIZE // 512 - 1
    inp = Sg([513])
    assert complete(h, Sg([outhdr(T_IN, sector=last)]), inp) == (OK, 513)
    assert inp.chunk(0)[:512] == DISK[-512:]


def test_barrier_bit_is_ignored(file_blk):
    blk, _ = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=True)
    inp = Sg([513])
    status = complete(h, Sg([outhdr(T_IN | VIRTIO_BLK_T_BARRIER, sector=2)]), inp)
    assert status == (OK, 513)
    assert inp.chunk(0)[:512] == DISK[1024:1536]


def test_ioprio_is_ignored(null_blk):
    h = VirtioBlkHandler(null_blk, "serial", 512, writable=True)
    assert complete(h, Sg([outhdr(T_IN, ioprio=0xFFFFFFFF)]), Sg([513])) == (OK, 513)


def test_read_with_only_status_byte_is_a_zero_length_read(null_blk):
    h = VirtioBlkHandler(null_blk, "serial", 512, writable=True)
    assert complete(h, Sg([outhdr(T_IN, sector=5)]), Sg([1])) == (OK, 1)


# -- writes -----------------------------------------------------------------------------------
def test_write_lands_in_file(file_blk):
    blk, path = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=True)
    payload = pattern(1536, seed=99)
    out = Sg([outhdr(T_OUT, sector=4), payload[:700], payload[700:]])
    inp = Sg([1])
    assert complete(h, out, inp) == (OK, 1)
    with open(path, "rb") as f:
        disk = f.read()
    assert disk[4 * 512 : 7 * 512] == payload
    assert disk[: 4 * 512] == DISK[: 4 * 512]
    assert disk[7 * 512 :] == DISK[7 * 512 :]
    assert blk.stats.nr_bytes[WRITE] == 1536


def test_write_with_header_and_data_in_one_iovec(file_blk):
    blk, path = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=True)
    payload = pattern(512, seed=5)
    out = Sg([outhdr(T_OUT, sector=0) + payload])
    assert complete(h, out, Sg([1])) == (OK, 1)
    with open(path, "rb") as f:
        assert f.read(512) == payload


def test_write_then_read_back(file_blk):
    blk, _ = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=True)
    payload = pattern(1024, seed=42)
    assert complete(h, Sg([outhdr(T_OUT, sector=20), payload]), Sg([1])) == (OK, 1)
    inp = Sg([1025])
    assert complete(h, Sg([outhdr(T_IN, sector=20)]), inp) == (OK, 1025)
    assert inp.chunk(0)[:1024] == payload


def test_write_to_non_writable_handler_is_ioerr(file_blk):
    blk, path = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=False)
    out = Sg([outhdr(T_OUT, sector=0), b"\x01" * 512])
    assert complete(h, out, Sg([1])) == (IOERR, 1)
    assert blk.stats.invalid_ops[WRITE] == 1
    with open(path, "rb") as f:
        assert f.read() == DISK


def test_reads_still_work_on_non_writable_handler(file_blk):
    blk, _ = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=False)
    assert complete(h, Sg([outhdr(T_IN, sector=0)]), Sg([513])) == (OK, 513)


# -- flush / get-id / unsupported ------------------------------------------------------------
def test_flush(file_blk):
    blk, _ = file_blk
    h = VirtioBlkHandler(blk, "serial", 512, writable=True)
    assert complete(h, Sg([outhdr(T_FLUSH)]), Sg([1])) == (OK, 1)
    assert blk.stats.nr_ops[BlockAcctType.FLUSH] == 1


def test_flush_on_null(null_blk):
    h = VirtioBlkHandler(null_blk, "serial", 512, writable=True)
    assert complete(h, Sg([outhdr(T_FLUSH)]), Sg([1])) == (OK, 1)


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
def test_get_id(null_blk, serial, in_sizes, expect):
    h = VirtioBlkHandler(null_blk, serial, 512, writable=True)
    inp = Sg(in_sizes)
    done = submit(h, Sg([outhdr(T_GET_ID)]), inp)
    run_until(lambda: done.called)
    assert done.result == (OK, len(expect) + 1)
    data = inp.data()
    assert data[: len(expect)] == expect
    assert data[len(expect) :] == b"\xee" * (len(data) - len(expect))  # nothing else touched


@pytest.mark.parametrize("rtype", [99, 2, 3, 10, 14, 99 | VIRTIO_BLK_T_BARRIER])
def test_unknown_type_is_unsupp(null_blk, rtype):
    h = VirtioBlkHandler(null_blk, "serial", 512, writable=True)
    done = submit(h, Sg([outhdr(rtype)]), Sg([513]))
    run_until(lambda: done.called)
    assert done.result == (UNSUPP, 1)


# -- invalid ranges ---------------------------------------------------------------------------
CAPACITY = DISK_SIZE // 512


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
def test_out_of_range_is_ioerr_and_counted_invalid(null_blk, rtype, sector, nbytes):
    h = VirtioBlkHandler(null_blk, "serial", 512, writable=True)
    if rtype == T_OUT:
        out, inp = Sg([outhdr(rtype, sector), b"\0" * nbytes]), Sg([1])
    else:
        out, inp = Sg([outhdr(rtype, sector)]), Sg([nbytes + 1])
    done = submit(h, out, inp)
    run_until(lambda: done.called)
    assert done.result == (IOERR, 1)
    kind = WRITE if rtype == T_OUT else READ
    assert null_blk.stats.invalid_ops[kind] == 1
    assert null_blk.stats.nr_ops[kind] == 0
    assert null_blk.in_flight == 0


def test_zero_length_read_exactly_at_end_is_ok(null_blk):
    h = VirtioBlkHandler(null_blk, "serial", 512, writable=True)
    assert complete(h, Sg([outhdr(T_IN, CAPACITY)]), Sg([1])) == (OK, 1)


@pytest.mark.parametrize("nbytes", [1, 511, 513, 1000])
@pytest.mark.parametrize("rtype", [T_IN, T_OUT])
def test_length_not_multiple_of_512_is_ioerr(null_blk, rtype, nbytes):
    h = VirtioBlkHandler(null_blk, "serial", 512, writable=True)
    if rtype == T_OUT:
        out, inp = Sg([outhdr(rtype, 0), b"\0" * nbytes]), Sg([1])
    else:
        out, inp = Sg([outhdr(rtype, 0)]), Sg([nbytes + 1])
    done = submit(h, out, inp)
    run_until(lambda: done.called)
    assert done.result == (IOERR, 1)
    assert null_blk.stats.invalid_ops[WRITE if rtype == T_OUT else READ] == 1


@pytest.mark.parametrize("sector", [1, 4, 7, 9, 15])
def test_sector_misaligned_to_logical_block_size_is_ioerr(null_blk, sector):
    h = VirtioBlkHandler(null_blk, "serial", 4096, writable=True)
    done = submit(h, Sg([outhdr(T_IN, sector)]), Sg([4096 + 1]))
    run_until(lambda: done.called)
    assert done.result == (IOERR, 1)
    assert null_blk.stats.invalid_ops[READ] == 1


@pytest.mark.parametrize("sector", [0, 8, 16])
def test_sector_aligned_to_logical_block_size_is_ok(null_blk, sector):
    h = VirtioBlkHandler(null_blk, "serial", 4096, writable=True)
    assert complete(h, Sg([outhdr(T_IN, sector)]), Sg([4096 + 1])) == (OK, 4097)


def test_sect_range_ok():
    class Fixed(BlockDriver):
        def getlength(self) -> int:
            return 100 * 512

    from blocklayer.aio import qemu_get_aio_context
    from blocklayer.block_backend import BLK_PERM_ALL, blk_insert_bs, blk_new, blk_unref

    blk = blk_new(qemu_get_aio_context(), 1, BLK_PERM_ALL)
    blk_insert_bs(blk, BlockDriverState("fixed", Fixed("fixed", {}), read_only=False))
    try:
        h = VirtioBlkHandler(blk, "", 512, writable=True)
        assert h.sect_range_ok(0, 100 * 512)
        assert h.sect_range_ok(99, 512)
        assert h.sect_range_ok(100, 0)
        assert not h.sect_range_ok(100, 512)
        assert not h.sect_range_ok(101, 0)
        assert not h.sect_range_ok(0, 100 * 512 + 512)
        assert not h.sect_range_ok(0, 511)
        assert not h.sect_range_ok(0, 2**31)  # more than BDRV_REQUEST_MAX_SECTORS
        h4k = VirtioBlkHandler(blk, "", 4096, writable=True)
        assert h4k.sect_range_ok(8, 512)
        assert not h4k.sect_range_ok(2, 4096)
    finally:
        blk_unref(blk)


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
def failing_blk(make_blk):
    return make_blk(BlockDriverState("failing", _FailingDriver("failing", {}), False))


def test_driver_read_error_is_ioerr(failing_blk):
    h = VirtioBlkHandler(failing_blk, "s", 512, writable=True)
    status, _ = complete(h, Sg([outhdr(T_IN)]), Sg([513]))
    assert status == IOERR
    assert failing_blk.stats.failed_ops[READ] == 1


def test_driver_write_error_is_ioerr(failing_blk):
    h = VirtioBlkHandler(failing_blk, "s", 512, writable=True)
    status, _ = complete(h, Sg([outhdr(T_OUT), b"\0" * 512]), Sg([1]))
    assert status == IOERR
    assert failing_blk.stats.failed_ops[WRITE] == 1


def test_driver_flush_error_is_ioerr(failing_blk):
    h = VirtioBlkHandler(failing_blk, "s", 512, writable=True)
    assert complete(h, Sg([outhdr(T_FLUSH)]), Sg([1])) == (IOERR, 1)


# -- malformed requests -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "out_chunks, in_chunks",
    [
        ([b"\0" * 15], [513]),  # header shorter than 16 bytes
        ([b"\0" * 8, b"\0" * 7], [513]),  # ... even when split
        ([outhdr(T_IN)], []),  # no device-writable buffer
        ([], [513]),  # no driver-readable buffer
        ([outhdr(T_IN)], [512, 0]),  # no room for the status byte
        ([outhdr(T_OUT), b"\0" * 512], [0]),
        ([], []),
    ],
)
def test_malformed_requests(null_blk, out_chunks, in_chunks):
    h = VirtioBlkHandler(null_blk, "serial", 512, writable=True)
    out, inp = Sg(out_chunks), Sg(in_chunks)
    done = Done()
    h.process_req(out.iov, out.num, inp.iov, inp.num, done)  # must not raise
    assert done.result == (MALFORMED, 0)
    assert null_blk.in_flight == 0
