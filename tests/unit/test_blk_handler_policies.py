"""virtio-blk DISCARD / WRITE_ZEROES, the rerror/werror policies through the handler, and the
export's stop / resume, tray and permission behaviour (no vhost-user server attached)."""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest

from blocklayer.accounting import BlockAcctType
from blocklayer.aio import AioContext, current_aio_context
from blocklayer.bdrv import BDRV_REQ_MAY_UNMAP, BlockDriver, BlockDriverState
from blocklayer.block_backend import (
    BlockDeviceIoStatus,
    BlockdevOnError,
    blk_all,
    blk_dev_change_media_cb,
    blk_dev_eject_request,
    blk_dev_has_tray,
    blk_iostatus_enable,
    blk_set_on_error,
)
from blocklayer.events import set_event_emitter
from blocklayer.iothread import IOThread
from tests.unit.conftest import Done, Sg, drain_bhs, outhdr, pattern, run_until, unique
from virtio.blk_export import VhostUserBlkExport
from virtio.blk_handler import (
    MAX_DISCARD_SECTORS,
    MAX_WRITE_ZEROES_SECTORS,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    VirtioBlkHandler,
)
from virtio.constants import VirtioBlkStatus, VirtioBlkType

OK = int(VirtioBlkStatus.OK)
IOERR = int(VirtioBlkStatus.IOERR)
UNSUPP = int(VirtioBlkStatus.UNSUPP)
T_IN = int(VirtioBlkType.IN)
T_OUT = int(VirtioBlkType.OUT)
T_FLUSH = int(VirtioBlkType.FLUSH)
T_DISCARD = int(VirtioBlkType.DISCARD)
T_WZ = int(VirtioBlkType.WRITE_ZEROES)
UNMAP_FLAG = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
READ, WRITE, UNMAP = BlockAcctType.READ, BlockAcctType.WRITE, BlockAcctType.UNMAP

DISK_SIZE = 1 << 20  # 2048 sectors
DISK = pattern(DISK_SIZE)
SECTORS = DISK_SIZE // 512


# -- helpers ------------------------------------------------------------------------------------
def dwz(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    """struct virtio_blk_discard_write_zeroes (little-endian)."""
    return struct.pack("<QII", sector, num_sectors, flags)


def submit(h: VirtioBlkHandler, out: Sg, inp: Sg) -> Done:
    done = Done()
    h.process_req(out.iov, out.num, inp.iov, inp.num, done)
    return done


def complete(h: VirtioBlkHandler, out: Sg, inp: Sg | None = None) -> tuple[int, int]:
    done = submit(h, out, inp or Sg([1]))
    run_until(lambda: done.called)
    drain_bhs()
    return done.result


def dwz_req(h: VirtioBlkHandler, rtype: int, *segs: bytes) -> tuple[int, int]:
    return complete(h, Sg([outhdr(rtype), *segs]))


def file_contents(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def run_in(ctx: AioContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` in ``ctx``'s thread and wait for it."""
    ev = threading.Event()
    out: list[Any] = []

    def call() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as e:
            out.append(("err", e))
        finally:
            ev.set()

    ctx.schedule(call)
    assert ev.wait(5), "the iothread did not run the call"
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


class FlakyDriver(BlockDriver):
    """Fails the operations listed in ``errors`` (op -> negative errno), synchronously, and
    records every call with the context it was made in."""

    format_name = "unit-flaky"

    def __init__(self, size: int = DISK_SIZE) -> None:
        super().__init__("flaky", {})
        self.size = size
        self.errors: dict[str, int] = {}
        self.calls: list[tuple[str, int, AioContext]] = []
        self.lock = threading.Lock()

    def getlength(self) -> int:
        return self.size

    def _do(self, op: str, offset: int, ctx: AioContext, cb: Callable[[int], None],
            flags: int = 0) -> None:
        with self.lock:
            self.calls.append((op, offset, ctx))
            ret = self.errors.get(op, 0)
        self.last_flags = flags
        cb(ret)

    def aio_preadv(self, ctx, offset, qiov, cb):
        self._do("read", offset, ctx, cb)

    def aio_pwritev(self, ctx, offset, qiov, flags, cb):
        self._do("write", offset, ctx, cb, flags)

    def aio_flush(self, ctx, cb):
        self._do("flush", 0, ctx, cb)

    def aio_pdiscard(self, ctx, offset, nbytes, cb):
        self._do("discard", offset, ctx, cb)

    def aio_pwrite_zeroes(self, ctx, offset, nbytes, flags, cb):
        self._do("write_zeroes", offset, ctx, cb, flags)

    def count(self, op: str) -> int:
        with self.lock:
            return sum(1 for c in self.calls if c[0] == op)


class Stops:
    """An ``on_stop(retry, abandon)`` hook that keeps the retries."""

    def __init__(self) -> None:
        self.retries: list[Callable[[], None]] = []
        self.abandons: list[Callable[[], None]] = []
        self.ctxs: list[AioContext] = []

    def __call__(self, retry: Callable[[], None], abandon: Callable[[], None]) -> None:
        self.retries.append(retry)
        self.abandons.append(abandon)
        self.ctxs.append(current_aio_context())


@pytest.fixture
def events():
    got: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def emit(name: str, data: dict[str, Any]) -> None:
        with lock:
            got.append((name, data))

    set_event_emitter(emit)
    yield got
    set_event_emitter(None)


@pytest.fixture
def iothread():
    io = IOThread(unique("io"))
    io.start()
    yield io
    io.stop()
    io.ctx.close()


@pytest.fixture
def file_node(make_node, image):
    """file_node(discard=None) -> (node, path) over a DISK-pattern image."""

    def make(discard: str | None = None):
        path = image(DISK, name=unique("img") + ".img")
        opts = {"driver": "file", "filename": path}
        if discard is not None:
            opts["discard"] = discard
        return make_node(opts), path

    return make


@pytest.fixture
def flaky(make_blk):
    """(blk, driver) over a FlakyDriver node."""
    drv = FlakyDriver()
    blk = make_blk(BlockDriverState(unique("flaky"), drv, False, discard="unmap"))
    return blk, drv


# -- 10. DISCARD / WRITE_ZEROES -------------------------------------------------------------------
@pytest.mark.parametrize("discard", [None, "unmap"])
def test_write_zeroes_on_a_file_node_reads_back_zeroes(file_node, make_blk, discard):
    bs, path = file_node(discard)
    blk = make_blk(bs)
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, T_WZ, dwz(4, 8)) == (OK, 1)
    disk = file_contents(path)
    assert disk[4 * 512:12 * 512] == bytes(8 * 512)
    assert disk[:4 * 512] == DISK[:4 * 512] and disk[12 * 512:] == DISK[12 * 512:]
    assert blk.stats.nr_ops[WRITE] == 1 and blk.stats.nr_bytes[WRITE] == 8 * 512
    inp = Sg([8 * 512 + 1])  # and the guest reads zeroes back
    assert complete(h, Sg([outhdr(T_IN, 4)]), inp) == (OK, 8 * 512 + 1)
    assert inp.chunk(0)[:-1] == bytes(8 * 512)


def test_write_zeroes_with_unmap_flag_reads_back_zeroes(file_node, make_blk):
    bs, path = file_node("unmap")
    h = VirtioBlkHandler(make_blk(bs), "s", 512, writable=True)
    assert dwz_req(h, T_WZ, dwz(512, 512, UNMAP_FLAG)) == (OK, 1)
    disk = file_contents(path)
    assert disk[512 * 512:1024 * 512] == bytes(512 * 512)
    assert disk[1024 * 512:] == DISK[1024 * 512:]


def test_write_zeroes_on_a_null_node_succeeds(make_node, make_blk):
    """A driver without an efficient write-zeroes (null-co) still serves WRITE_ZEROES, which
    every export offers: QEMU falls back to writing a zeroed buffer."""
    bs = make_node({"driver": "null-co", "size": str(DISK_SIZE), "read-zeroes": "on"})
    h = VirtioBlkHandler(make_blk(bs), "s", 512, writable=True)
    assert dwz_req(h, T_WZ, dwz(0, 8)) == (OK, 1)


@pytest.mark.parametrize("flag, may_unmap", [(0, False), (UNMAP_FLAG, True)])
def test_write_zeroes_unmap_flag_becomes_may_unmap(flaky, flag, may_unmap):
    blk, drv = flaky  # a discard=unmap node: MAY_UNMAP reaches the driver
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, T_WZ, dwz(8, 8, flag)) == (OK, 1)
    assert drv.calls[-1][:2] == ("write_zeroes", 8 * 512)
    assert bool(drv.last_flags & BDRV_REQ_MAY_UNMAP) == may_unmap


def test_discard_with_discard_unmap_deallocates(file_node, make_blk):
    bs, path = file_node("unmap")
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    before = os.stat(path).st_blocks
    blk = make_blk(bs)
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, T_DISCARD, dwz(512, 512)) == (OK, 1)
    assert os.stat(path).st_blocks < before
    disk = file_contents(path)
    assert len(disk) == DISK_SIZE
    assert disk[512 * 512:1024 * 512] == bytes(512 * 512)
    assert disk[:512 * 512] == DISK[:512 * 512] and disk[1024 * 512:] == DISK[1024 * 512:]
    assert blk.stats.nr_ops[UNMAP] == 1 and blk.stats.nr_bytes[UNMAP] == 512 * 512


def test_discard_ignored_by_default(file_node, make_blk):
    bs, path = file_node()
    blk = make_blk(bs)
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, T_DISCARD, dwz(512, 512)) == (OK, 1)
    assert file_contents(path) == DISK
    assert blk.stats.nr_ops[UNMAP] == 1


def test_segment_split_over_iovecs_and_sharing_the_header_iovec(flaky):
    blk, drv = flaky
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    seg = dwz(16, 4)
    assert complete(h, Sg([outhdr(T_DISCARD), seg[:5], seg[5:11], seg[11:]])) == (OK, 1)
    assert complete(h, Sg([outhdr(T_WZ) + seg])) == (OK, 1)
    assert [c[:2] for c in drv.calls] == [("discard", 16 * 512), ("write_zeroes", 16 * 512)]


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
def test_two_segments_are_unsupp(flaky, rtype):
    blk, drv = flaky
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, rtype, dwz(0, 8), dwz(16, 8)) == (UNSUPP, 1)
    assert dwz_req(h, rtype, dwz(0, 8) + b"\0") == (UNSUPP, 1)  # anything beyond 16 bytes
    assert drv.calls == []


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
@pytest.mark.parametrize("seg", [dwz(0, 8)[:8], dwz(0, 8)[:15], b""])
def test_short_segment_is_ioerr(flaky, rtype, seg):
    blk, drv = flaky
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    out = Sg([outhdr(rtype), seg]) if seg else Sg([outhdr(rtype)])
    assert complete(h, out) == (IOERR, 1)
    assert drv.calls == []


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
@pytest.mark.parametrize("flags", [2, 4, 0x80000000, 3, 0xFFFFFFFF])
def test_unknown_flags_are_unsupp(flaky, rtype, flags):
    blk, drv = flaky
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, rtype, dwz(0, 8, flags)) == (UNSUPP, 1)
    assert drv.calls == []


def test_unmap_flag_on_discard_is_unsupp(flaky):
    blk, drv = flaky
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, T_DISCARD, dwz(0, 8, UNMAP_FLAG)) == (UNSUPP, 1)
    assert drv.calls == []


@pytest.mark.parametrize("rtype, limit, kind", [(T_DISCARD, MAX_DISCARD_SECTORS, UNMAP),
                                                (T_WZ, MAX_WRITE_ZEROES_SECTORS, WRITE)])
def test_too_many_sectors_is_ioerr(make_blk, rtype, limit, kind):
    assert limit == 32768
    drv = FlakyDriver(size=64 << 20)
    blk = make_blk(BlockDriverState(unique("big"), drv, False, discard="unmap"))
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, rtype, dwz(0, limit)) == (OK, 1)  # exactly the limit is fine
    assert dwz_req(h, rtype, dwz(0, limit + 1)) == (IOERR, 1)
    assert dwz_req(h, rtype, dwz(0, 0xFFFFFFFF)) == (IOERR, 1)
    assert len(drv.calls) == 1
    assert blk.stats.invalid_ops[kind] == 2


@pytest.mark.parametrize("rtype, kind", [(T_DISCARD, UNMAP), (T_WZ, WRITE)])
@pytest.mark.parametrize("sector, num", [(SECTORS, 1), (SECTORS - 1, 2), (SECTORS + 1, 0),
                                         (2**64 - 1, 1), (2**55, 8)])
def test_out_of_range_is_ioerr_and_counted_invalid(flaky, rtype, kind, sector, num):
    blk, drv = flaky
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, rtype, dwz(sector, num)) == (IOERR, 1)
    assert blk.stats.invalid_ops[kind] == 1
    assert blk.stats.nr_ops[kind] == 0 and blk.stats.failed_ops[kind] == 0
    assert drv.calls == [] and blk.in_flight == 0


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
def test_last_sectors_are_in_range(flaky, rtype):
    blk, drv = flaky
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, rtype, dwz(SECTORS - 8, 8)) == (OK, 1)
    assert dwz_req(h, rtype, dwz(SECTORS, 0)) == (OK, 1)


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
def test_misaligned_to_logical_block_size_is_ioerr(flaky, rtype):
    blk, drv = flaky
    h = VirtioBlkHandler(blk, "s", 4096, writable=True)
    assert dwz_req(h, rtype, dwz(3, 8)) == (IOERR, 1)
    assert dwz_req(h, rtype, dwz(8, 8)) == (OK, 1)
    assert len(drv.calls) == 1


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
def test_non_writable_handler_is_ioerr(file_node, make_blk, rtype):
    bs, path = file_node("unmap")
    blk = make_blk(bs)
    h = VirtioBlkHandler(blk, "s", 512, writable=False)
    assert dwz_req(h, rtype, dwz(0, 8)) == (IOERR, 1)
    assert file_contents(path) == DISK


def test_discard_error_is_ioerr(flaky):
    blk, drv = flaky
    drv.errors["discard"] = -errno.EIO
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    assert dwz_req(h, T_DISCARD, dwz(0, 8)) == (IOERR, 1)
    assert blk.stats.failed_ops[UNMAP] == 1


# -- 11. error policy through the handler ---------------------------------------------------------
def _expect(policy: str, error: int) -> str:
    if policy == "enospc":
        return "stop" if error == errno.ENOSPC else "ioerr"
    return {"report": "ioerr", "ignore": "ok", "stop": "stop"}[policy]


# op -> (driver op, is_read, request builder, in_len)
REQUESTS: dict[str, tuple[str, bool, Callable[[], tuple[Sg, Sg]], int]] = {
    "read": ("read", True, lambda: (Sg([outhdr(T_IN, 8)]), Sg([1024 + 1])), 1025),
    "write": ("write", False, lambda: (Sg([outhdr(T_OUT, 8), pattern(1024)]), Sg([1])), 1),
    "flush": ("flush", False, lambda: (Sg([outhdr(T_FLUSH)]), Sg([1])), 1),
    "write_zeroes": ("write_zeroes", False,
                     lambda: (Sg([outhdr(T_WZ), dwz(8, 2)]), Sg([1])), 1),
}
POLICIES = ["report", "ignore", "enospc", "stop"]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("req", list(REQUESTS))
def test_error_policy(main_ctx, flaky, events, req, policy, error):
    blk, drv = flaky
    blk.name = "vd0"
    op, is_read, build, in_len = REQUESTS[req]
    # the policy under test on this request's direction; the other one would answer otherwise
    other = BlockdevOnError.STOP if policy != "stop" else BlockdevOnError.IGNORE
    if is_read:
        blk_set_on_error(blk, BlockdevOnError(policy), other)
    else:
        blk_set_on_error(blk, other, BlockdevOnError(policy))
    blk_iostatus_enable(blk)
    stops = Stops()
    h = VirtioBlkHandler(blk, "s", 512, writable=True, on_stop=stops)
    drv.errors[op] = -error
    out, inp = build()
    done = submit(h, out, inp)
    expect = _expect(policy, error)
    if expect == "stop":
        run_until(lambda: stops.retries)
        drain_bhs(main_ctx)
        assert not done.called  # kept, not completed
        assert len(stops.retries) == 1 and stops.ctxs == [main_ctx]
        want_io = (BlockDeviceIoStatus.NOSPACE if error == errno.ENOSPC
                   else BlockDeviceIoStatus.FAILED)
        assert blk.iostatus == want_io
        del drv.errors[op]
        stops.retries[0]()
        run_until(lambda: done.called)
        drain_bhs(main_ctx)
        assert done.result == (OK, in_len)  # exactly once
        assert drv.count(op) == 2
    else:
        run_until(lambda: done.called)
        drain_bhs(main_ctx)
        assert done.result == ((OK if expect == "ok" else IOERR), in_len)
        assert stops.retries == []
        assert drv.count(op) == 1
        assert blk.iostatus == BlockDeviceIoStatus.OK
    (name, data), = events
    assert name == "BLOCK_IO_ERROR"
    assert data["device"] == "vd0"
    assert data["operation"] == ("read" if is_read else "write")
    assert data["action"] == {"ok": "ignore", "ioerr": "report", "stop": "stop"}[expect]
    assert data["nospace"] == (error == errno.ENOSPC)
    assert data["reason"] == os.strerror(error)


def test_read_data_arrives_after_a_retried_read(main_ctx, file_node, make_blk):
    """A read kept by 'stop' and retried fills the guest's buffer like any read."""
    bs, _ = file_node()
    blk = make_blk(bs)
    blk_set_on_error(blk, BlockdevOnError.STOP, BlockdevOnError.STOP)
    stops = Stops()
    h = VirtioBlkHandler(blk, "s", 512, writable=True, on_stop=stops)
    real = bs.drv.aio_preadv
    fail = [True]

    def preadv(ctx, offset, qiov, cb):
        if fail[0]:
            cb(-errno.EIO)
        else:
            real(ctx, offset, qiov, cb)

    bs.drv.aio_preadv = preadv
    inp = Sg([1024 + 1])
    done = submit(h, Sg([outhdr(T_IN, 6)]), inp)
    run_until(lambda: stops.retries)
    fail[0] = False
    stops.retries[0]()
    run_until(lambda: done.called)
    drain_bhs(main_ctx)
    assert done.result == (OK, 1025)
    assert inp.chunk(0)[:1024] == DISK[6 * 512:8 * 512]


def test_retry_that_fails_again_stops_again(main_ctx, flaky, events):
    blk, drv = flaky
    blk_set_on_error(blk, BlockdevOnError.REPORT, BlockdevOnError.STOP)
    stops = Stops()
    h = VirtioBlkHandler(blk, "s", 512, writable=True, on_stop=stops)
    drv.errors["write"] = -errno.EIO
    done = submit(h, Sg([outhdr(T_OUT, 0), pattern(512)]), Sg([1]))
    run_until(lambda: len(stops.retries) == 1)
    stops.retries[0]()
    run_until(lambda: len(stops.retries) == 2)
    drain_bhs(main_ctx)
    assert not done.called
    drv.errors.clear()
    stops.retries[1]()
    run_until(lambda: done.called)
    drain_bhs(main_ctx)
    assert done.result == (OK, 1)
    assert drv.count("write") == 3
    assert [d["action"] for _, d in events] == ["stop", "stop"]


def test_flush_follows_werror_not_rerror(main_ctx, flaky):
    blk, drv = flaky
    blk_set_on_error(blk, BlockdevOnError.STOP, BlockdevOnError.REPORT)
    stops = Stops()
    h = VirtioBlkHandler(blk, "s", 512, writable=True, on_stop=stops)
    drv.errors["flush"] = -errno.EIO
    assert complete(h, Sg([outhdr(T_FLUSH)])) == (IOERR, 1)
    assert stops.retries == []
    blk_set_on_error(blk, BlockdevOnError.REPORT, BlockdevOnError.IGNORE)
    assert complete(h, Sg([outhdr(T_FLUSH)])) == (OK, 1)


@pytest.mark.parametrize("policy", ["stop", "enospc"])
def test_stop_without_on_stop_hook_degrades_to_report(main_ctx, flaky, events, policy):
    blk, drv = flaky
    blk_set_on_error(blk, BlockdevOnError(policy), BlockdevOnError(policy))
    blk_iostatus_enable(blk)
    h = VirtioBlkHandler(blk, "s", 512, writable=True)  # no on_stop
    drv.errors["write"] = -errno.ENOSPC
    assert complete(h, Sg([outhdr(T_OUT, 0), pattern(512)])) == (IOERR, 1)
    assert events[-1][1]["action"] == "report"
    assert blk.iostatus == BlockDeviceIoStatus.OK
    assert drv.count("write") == 1


def test_ignored_read_error_completes_ok(main_ctx, flaky):
    blk, drv = flaky
    blk_set_on_error(blk, BlockdevOnError.IGNORE, BlockdevOnError.REPORT)
    h = VirtioBlkHandler(blk, "s", 512, writable=True)
    drv.errors["read"] = -errno.EIO
    assert complete(h, Sg([outhdr(T_IN, 0)]), Sg([513])) == (OK, 513)
    assert blk.stats.failed_ops[READ] == 1  # still accounted as failed


# -- 12. the export ----------------------------------------------------------------------------
class FakeQueue:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.completed: list[tuple[Any, int, int]] = []  # (elem, in_len, thread)

    def complete(self, elem: Any, in_len: int) -> None:
        with self.lock:
            self.completed.append((elem, in_len, threading.get_ident()))

    def __len__(self) -> int:
        with self.lock:
            return len(self.completed)


class FakeElem:
    def __init__(self, out: Sg, inp: Sg) -> None:
        self.out, self.inp = out, inp
        self.out_sg, self.out_num = out.iov, out.num
        self.in_sg, self.in_num = inp.iov, inp.num

    def status(self) -> int:
        return self.inp.chunk(self.inp.num - 1)[-1]


@pytest.fixture
def make_export(main_ctx, make_node):
    """make_export(bs=None, id="exp", writable=True, **kw) -> VhostUserBlkExport (no server)."""
    exports: list[VhostUserBlkExport] = []

    def make(bs: BlockDriverState | None = None, id: str = "exp", writable: bool = True,
             **kw) -> VhostUserBlkExport:
        if bs is None:
            bs = make_node({"driver": "null-co", "size": str(DISK_SIZE), "read-zeroes": "on"})
        exp = VhostUserBlkExport(id, bs, writable, 1, 512, [], **kw)
        exports.append(exp)
        return exp

    yield make
    drain_bhs(main_ctx)
    for exp in exports:
        exp.delete()


@pytest.mark.parametrize("error, io_status", [(errno.EIO, "failed"), (errno.ENOSPC, "nospace")])
def test_export_stop_keeps_retries_and_resume_retries_each_once(
    main_ctx, make_export, iothread, events, error, io_status
):
    io = iothread.ctx
    drv = FlakyDriver()
    exp = make_export(BlockDriverState(unique("flaky"), drv, False),
                      werror=BlockdevOnError.STOP)
    info = exp.info()
    assert info["stopped"] is False and info["io-status"] == "ok"
    drv.errors["write"] = -error
    q = FakeQueue()
    e_main = FakeElem(Sg([outhdr(T_OUT, 0), pattern(512)]), Sg([1]))
    e_io = FakeElem(Sg([outhdr(T_OUT, 8), pattern(512)]), Sg([1]))
    exp.handle_request(q, e_main)
    run_in(io, lambda: exp.handle_request(q, e_io))
    run_until(lambda: len(exp._retries) == 2)
    drain_bhs(main_ctx)
    run_in(io, lambda: None)
    assert len(q) == 0  # both kept
    assert exp.stopped
    info = exp.info()
    assert info["stopped"] is True and info["io-status"] == io_status
    assert {id(c) for c, _, _ in exp._retries} == {id(main_ctx), id(io)}
    assert [d["action"] for _, d in events] == ["stop", "stop"]

    drv.errors.clear()
    io_thread = run_in(io, threading.get_ident)
    exp.resume_after_error()
    assert not exp.stopped and exp._retries == []
    assert exp.info()["io-status"] == "ok" and exp.info()["stopped"] is False
    run_until(lambda: len(q) == 2)
    drain_bhs(main_ctx)
    run_in(io, lambda: None)
    exp.resume_after_error()  # nothing kept any more: nothing happens
    drain_bhs(main_ctx)
    run_in(io, lambda: None)
    assert len(q) == 2
    by_elem = {id(e): (in_len, thread) for e, in_len, thread in q.completed}
    assert by_elem == {id(e_main): (1, threading.get_ident()), id(e_io): (1, io_thread)}
    assert e_main.status() == OK and e_io.status() == OK
    retried = [(off, ctx) for op, off, ctx in drv.calls if op == "write"][2:]
    assert sorted((off, id(ctx)) for off, ctx in retried) == sorted(
        [(0, id(main_ctx)), (8 * 512, id(io))])


def test_export_report_policy_has_no_iostatus(main_ctx, make_export):
    drv = FlakyDriver()
    exp = make_export(BlockDriverState(unique("flaky"), drv, False))
    drv.errors["read"] = -errno.EIO
    q = FakeQueue()
    elem = FakeElem(Sg([outhdr(T_IN, 0)]), Sg([513]))
    exp.handle_request(q, elem)
    run_until(lambda: len(q) == 1)
    assert elem.status() == IOERR
    assert exp.info()["io-status"] == "ok" and exp.info()["stopped"] is False


def test_removable_export_tray(main_ctx, make_export, events):
    exp = make_export(removable=True)
    info = exp.info()
    assert info["removable"] is True and info["tray-open"] is False
    assert blk_dev_has_tray(exp.blk)
    assert exp.config().capacity == SECTORS
    blk_dev_change_media_cb(exp.blk, False)  # eject
    assert exp.info()["tray-open"] is True
    assert exp.config().capacity == 0
    assert struct.unpack_from("<Q", exp.get_config(60), 0)[0] == 0
    assert events == [("DEVICE_TRAY_MOVED", {"device": "exp", "id": "exp", "tray-open": True})]
    q = FakeQueue()
    elem = FakeElem(Sg([outhdr(T_IN, 0)]), Sg([513]))
    exp.handle_request(q, elem)
    run_until(lambda: len(q) == 1)
    assert elem.status() == IOERR  # no medium
    blk_dev_change_media_cb(exp.blk, True)  # load
    assert exp.info()["tray-open"] is False
    assert exp.config().capacity == SECTORS
    assert events[-1] == ("DEVICE_TRAY_MOVED", {"device": "exp", "id": "exp",
                                                "tray-open": False})
    blk_dev_eject_request(exp.blk, False)
    assert exp.info()["tray-open"] is True and exp.config().capacity == 0


def test_non_removable_export_has_no_tray(make_export):
    exp = make_export()
    info = exp.info()
    assert "tray-open" not in info and "removable" not in info
    assert not blk_dev_has_tray(exp.blk)


def test_second_writable_export_without_share_rw_refused(make_export, make_node):
    bs = make_node({"driver": "null-co", "size": str(DISK_SIZE)})
    first = make_export(bs, id="exp1")
    n_blks = len(blk_all())
    with pytest.raises(PermissionError, match="Conflicts with use by exp1 as 'root'"):
        make_export(bs, id="exp2")
    assert bs.parents == [first.blk] and bs.refcnt == 2
    assert len(blk_all()) == n_blks  # the refused export's backend is gone


def test_share_rw_on_one_side_is_not_enough(make_export, make_node):
    bs = make_node({"driver": "null-co", "size": str(DISK_SIZE)})
    make_export(bs, id="exp1", share_rw=True)
    with pytest.raises(PermissionError, match="exp1"):
        make_export(bs, id="exp2")  # it would not share 'write' with exp1


def test_two_writable_exports_with_share_rw(main_ctx, make_export, make_node):
    bs = make_node({"driver": "null-co", "size": str(DISK_SIZE)})
    a = make_export(bs, id="exp1", share_rw=True)
    b = make_export(bs, id="exp2", share_rw=True)
    assert bs.parents == [a.blk, b.blk]
    q = FakeQueue()
    elem = FakeElem(Sg([outhdr(T_OUT, 0), pattern(512)]), Sg([1]))
    b.handle_request(q, elem)
    run_until(lambda: len(q) == 1)
    assert elem.status() == OK
