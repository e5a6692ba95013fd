"""virtio-blk DISCARD / WRITE_ZEROES, the rerror/werror policies, and the export's stop /
resume, tray and permission behaviour: every request through the real request path (an
in-process vhost-user connection, tests/unit/conftest.py ``export_rig``): parsed and checked by
the C queue loop, served by the node graph in batches, failures through the export's error
policy, retries through C again."""

from __future__ import annotations

import errno
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blocklayer.accounting import BlockAcctType
from blocklayer.aio import AioContext
from blocklayer.bdrv import BDRV_REQ_MAY_UNMAP, BlockDriver, BlockDriverState
from blocklayer.block_backend import (
    BlockDeviceIoStatus,
    BlockdevOnError,
    blk_all,
    blk_dev_change_media_cb,
    blk_dev_eject_request,
    blk_dev_has_tray,
)
from blocklayer.events import set_event_emitter
from blocklayer.iothread import IOThread
from tests.unit.conftest import (
    IOERR,
    OK,
    T_FLUSH,
    T_IN,
    T_OUT,
    UNSUPP,
    drain_bhs,
    outhdr,
    pattern,
    run_until,
    unique,
)
from vhost.ffi import lib
from virtio.blk_export import VhostUserBlkExport
from virtio.constants import VirtioBlkType

T_DISCARD = int(VirtioBlkType.DISCARD)
T_WZ = int(VirtioBlkType.WRITE_ZEROES)
UNMAP_FLAG = lib.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
MAX_DISCARD_SECTORS = lib.VHOST_USER_BLK_MAX_DISCARD_SECTORS
MAX_WRITE_ZEROES_SECTORS = lib.VHOST_USER_BLK_MAX_WRITE_ZEROES_SECTORS
READ, WRITE, UNMAP = BlockAcctType.READ, BlockAcctType.WRITE, BlockAcctType.UNMAP

DISK_SIZE = 1 << 20  # 2048 sectors
DISK = pattern(DISK_SIZE)
SECTORS = DISK_SIZE // 512


# -- helpers ------------------------------------------------------------------------------------
def dwz(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    """struct virtio_blk_discard_write_zeroes (little-endian)."""
    return struct.pack("<QII", sector, num_sectors, flags)


def dwz_req(rig, rtype: int, *segs: bytes) -> tuple[int, int]:
    return rig.complete([outhdr(rtype), *segs])


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


def flaky_node(size: int = DISK_SIZE) -> tuple[BlockDriverState, FlakyDriver]:
    drv = FlakyDriver(size)
    return BlockDriverState(unique("flaky"), drv, False, discard="unmap"), drv


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
def flaky(export_rig):
    """(rig, driver) over a FlakyDriver node (discard=unmap)."""
    bs, drv = flaky_node()
    return export_rig(bs), drv


def stats(rig):
    return rig.exp.blk.stats


# -- 10. DISCARD / WRITE_ZEROES -------------------------------------------------------------------
@pytest.mark.parametrize("discard", [None, "unmap"])
def test_write_zeroes_on_a_file_node_reads_back_zeroes(file_node, export_rig, discard):
    bs, path = file_node(discard)
    rig = export_rig(bs)
    assert dwz_req(rig, T_WZ, dwz(4, 8)) == (OK, 1)
    disk = Path(path).read_bytes()
    assert disk[4 * 512:12 * 512] == bytes(8 * 512)
    assert disk[:4 * 512] == DISK[:4 * 512] and disk[12 * 512:] == DISK[12 * 512:]
    assert stats(rig).nr_ops[WRITE] == 1 and stats(rig).nr_bytes[WRITE] == 8 * 512
    req = rig.submit([outhdr(T_IN, 4)], [8 * 512 + 1])  # and the guest reads zeroes back
    rig.wait(req)
    assert (req.status, req.used_len) == (OK, 8 * 512 + 1)
    assert req.data == bytes(8 * 512)


def test_write_zeroes_with_unmap_flag_reads_back_zeroes(file_node, export_rig):
    bs, path = file_node("unmap")
    rig = export_rig(bs)
    assert dwz_req(rig, T_WZ, dwz(512, 512, UNMAP_FLAG)) == (OK, 1)
    disk = Path(path).read_bytes()
    assert disk[512 * 512:1024 * 512] == bytes(512 * 512)
    assert disk[1024 * 512:] == DISK[1024 * 512:]


def test_write_zeroes_on_a_null_node_succeeds(make_node, export_rig):
    """A driver without an efficient write-zeroes (null-co) still serves WRITE_ZEROES, which
    every export offers: QEMU falls back to writing a zeroed buffer."""
    rig = export_rig(make_node({"driver": "null-co", "size": str(DISK_SIZE),
                                "read-zeroes": "on"}))
    assert dwz_req(rig, T_WZ, dwz(0, 8)) == (OK, 1)


@pytest.mark.parametrize("flag, may_unmap", [(0, False), (UNMAP_FLAG, True)])
def test_write_zeroes_unmap_flag_becomes_may_unmap(flaky, flag, may_unmap):
    rig, drv = flaky  # a discard=unmap node: MAY_UNMAP reaches the driver
    assert dwz_req(rig, T_WZ, dwz(8, 8, flag)) == (OK, 1)
    assert drv.calls[-1][:2] == ("write_zeroes", 8 * 512)
    assert bool(drv.last_flags & BDRV_REQ_MAY_UNMAP) == may_unmap


def test_write_zeroes_is_fua_with_the_write_cache_off(export_rig):
    bs, drv = flaky_node()
    rig = export_rig(bs, writethrough=True)
    assert dwz_req(rig, T_WZ, dwz(8, 8)) == (OK, 1)
    assert drv.last_flags & lib.BDRV_REQ_FUA
    assert not drv.last_flags & lib.PYVU_BATCH_EACH  # C's mark never reaches a driver


def test_discard_with_discard_unmap_deallocates(file_node, export_rig):
    bs, path = file_node("unmap")
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    before = os.stat(path).st_blocks
    rig = export_rig(bs)
    assert dwz_req(rig, T_DISCARD, dwz(512, 512)) == (OK, 1)
    assert os.stat(path).st_blocks < before
    disk = Path(path).read_bytes()
    assert len(disk) == DISK_SIZE
    assert disk[512 * 512:1024 * 512] == bytes(512 * 512)
    assert disk[:512 * 512] == DISK[:512 * 512] and disk[1024 * 512:] == DISK[1024 * 512:]
    assert stats(rig).nr_ops[UNMAP] == 1 and stats(rig).nr_bytes[UNMAP] == 512 * 512


def test_discard_ignored_by_default(file_node, export_rig):
    bs, path = file_node()
    rig = export_rig(bs)
    assert dwz_req(rig, T_DISCARD, dwz(512, 512)) == (OK, 1)
    assert Path(path).read_bytes() == DISK
    assert stats(rig).nr_ops[UNMAP] == 1


def test_segment_split_over_iovecs_and_sharing_the_header_iovec(flaky):
    rig, drv = flaky
    seg = dwz(16, 4)
    assert rig.complete([outhdr(T_DISCARD), seg[:5], seg[5:11], seg[11:]]) == (OK, 1)
    assert rig.complete([outhdr(T_WZ) + seg]) == (OK, 1)
    assert [c[:2] for c in drv.calls] == [("discard", 16 * 512), ("write_zeroes", 16 * 512)]


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
def test_two_segments_are_unsupp(flaky, rtype):
    rig, drv = flaky
    assert dwz_req(rig, rtype, dwz(0, 8), dwz(16, 8)) == (UNSUPP, 1)
    assert dwz_req(rig, rtype, dwz(0, 8) + b"\0") == (UNSUPP, 1)  # anything beyond 16 bytes
    assert drv.calls == []


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
@pytest.mark.parametrize("seg", [dwz(0, 8)[:8], dwz(0, 8)[:15], b""])
def test_short_segment_is_ioerr(flaky, rtype, seg):
    rig, drv = flaky
    out = [outhdr(rtype), seg] if seg else [outhdr(rtype)]
    assert rig.complete(out) == (IOERR, 1)
    assert drv.calls == []


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
@pytest.mark.parametrize("flags", [2, 4, 0x80000000, 3, 0xFFFFFFFF])
def test_unknown_flags_are_unsupp(flaky, rtype, flags):
    rig, drv = flaky
    assert dwz_req(rig, rtype, dwz(0, 8, flags)) == (UNSUPP, 1)
    assert drv.calls == []


def test_unmap_flag_on_discard_is_unsupp(flaky):
    rig, drv = flaky
    assert dwz_req(rig, T_DISCARD, dwz(0, 8, UNMAP_FLAG)) == (UNSUPP, 1)
    assert drv.calls == []


@pytest.mark.parametrize("rtype, limit, kind", [(T_DISCARD, MAX_DISCARD_SECTORS, UNMAP),
                                                (T_WZ, MAX_WRITE_ZEROES_SECTORS, WRITE)])
def test_too_many_sectors_is_ioerr(export_rig, rtype, limit, kind):
    assert limit == 32768
    bs, drv = flaky_node(size=64 << 20)
    rig = export_rig(bs)
    assert dwz_req(rig, rtype, dwz(0, limit)) == (OK, 1)  # exactly the limit is fine
    assert dwz_req(rig, rtype, dwz(0, limit + 1)) == (IOERR, 1)
    assert dwz_req(rig, rtype, dwz(0, 0xFFFFFFFF)) == (IOERR, 1)
    assert len(drv.calls) == 1
    assert stats(rig).invalid_ops[kind] == 2


@pytest.mark.parametrize("rtype, kind", [(T_DISCARD, UNMAP), (T_WZ, WRITE)])
@pytest.mark.parametrize("sector, num", [(SECTORS, 1), (SECTORS - 1, 2), (SECTORS + 1, 0),
                                         (2**64 - 1, 1), (2**55, 8)])
def test_out_of_range_is_ioerr_and_counted_invalid(flaky, rtype, kind, sector, num):
    rig, drv = flaky
    assert dwz_req(rig, rtype, dwz(sector, num)) == (IOERR, 1)
    assert stats(rig).invalid_ops[kind] == 1
    assert stats(rig).nr_ops[kind] == 0 and stats(rig).failed_ops[kind] == 0
    assert drv.calls == [] and rig.exp.blk.in_flight == 0


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
def test_last_sectors_are_in_range(flaky, rtype):
    rig, drv = flaky
    assert dwz_req(rig, rtype, dwz(SECTORS - 8, 8)) == (OK, 1)
    assert dwz_req(rig, rtype, dwz(SECTORS, 0)) == (OK, 1)


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
def test_misaligned_to_logical_block_size_is_ioerr(export_rig, rtype):
    bs, drv = flaky_node()
    rig = export_rig(bs, lbs=4096)
    assert dwz_req(rig, rtype, dwz(3, 8)) == (IOERR, 1)
    assert dwz_req(rig, rtype, dwz(8, 8)) == (OK, 1)
    assert len(drv.calls) == 1


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WZ])
def test_read_only_export_is_ioerr(file_node, export_rig, rtype):
    bs, path = file_node("unmap")
    rig = export_rig(bs, writable=False)
    assert dwz_req(rig, rtype, dwz(0, 8)) == (IOERR, 1)
    assert Path(path).read_bytes() == DISK


def test_discard_error_is_ioerr(export_rig):
    bs, drv = flaky_node()
    rig = export_rig(bs, werror=BlockdevOnError.STOP)  # a failed discard never stops
    drv.errors["discard"] = -errno.EIO
    assert dwz_req(rig, T_DISCARD, dwz(0, 8)) == (IOERR, 1)
    assert stats(rig).failed_ops[UNMAP] == 1
    assert not rig.exp.stopped


def test_discard_and_write_zeroes_reach_a_filters_batch_path(make_node, export_rig):
    """A filter above the node sees them (x-count counts what passes), served by the node
    graph from the batch C handed over, not by a Python parser."""
    bs = make_node({"driver": "x-count", "discard": "unmap",
                    "file": {"driver": "x-memory", "size": str(DISK_SIZE)}})
    rig = export_rig(bs)
    assert dwz_req(rig, T_DISCARD, dwz(0, 8)) == (OK, 1)
    assert dwz_req(rig, T_WZ, dwz(8, 8)) == (OK, 1)
    assert rig.complete([outhdr(T_OUT, 16), pattern(512)]) == (OK, 1)
    counts = bs.drv.query_info()["x-count"]
    assert (counts["discard"], counts["write-zeroes"], counts["write"]) == (1, 1, 1)
    s = rig.exp.stats()
    assert s["batch-requests"] == 3 and s["fast-path-requests"] == 0


def test_no_python_request_parser():
    """Every virtio-blk request is parsed once, in C: the export has no per-request entry
    point and nothing in virtio/ reads a request header."""
    assert not hasattr(VhostUserBlkExport, "handle_request")
    pkg = Path(__file__).resolve().parents[2] / "virtio"
    for path in pkg.glob("*.py"):
        text = path.read_text()
        for name in ("process_req", "parse_outhdr", "sect_range_ok", "iov_slice", "<IIQ"):
            assert name not in text, (path.name, name)


# -- 11. error policy -----------------------------------------------------------------------------
def _expect(policy: str, error: int) -> str:
    if policy == "enospc":
        return "stop" if error == errno.ENOSPC else "ioerr"
    return {"report": "ioerr", "ignore": "ok", "stop": "stop"}[policy]


# op -> (driver op, is_read, (out, in sizes), in_len)
REQUESTS: dict[str, tuple[str, bool, tuple[list[bytes], list[int]], int]] = {
    "read": ("read", True, ([outhdr(T_IN, 8)], [1024 + 1]), 1025),
    "write": ("write", False, ([outhdr(T_OUT, 8), pattern(1024)], [1]), 1),
    "flush": ("flush", False, ([outhdr(T_FLUSH)], [1]), 1),
    "write_zeroes": ("write_zeroes", False, ([outhdr(T_WZ), dwz(8, 2)], [1]), 1),
}
POLICIES = ["report", "ignore", "enospc", "stop"]


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("req", list(REQUESTS))
def test_error_policy(main_ctx, export_rig, events, req, policy, error):
    op, is_read, (out, inp), in_len = REQUESTS[req]
    # the policy under test on this request's direction; the other one would answer otherwise
    other = BlockdevOnError.STOP if policy != "stop" else BlockdevOnError.IGNORE
    pol = BlockdevOnError(policy)
    bs, drv = flaky_node()
    rig = export_rig(bs, id="vd0", rerror=pol if is_read else other,
                     werror=other if is_read else pol)
    exp = rig.exp
    drv.errors[op] = -error
    r = rig.submit(out, inp)
    expect = _expect(policy, error)
    if expect == "stop":
        run_until(lambda: exp._retries)
        drain_bhs(main_ctx)
        rig.q.harvest()
        assert not r.done  # kept, not completed
        assert exp.stopped and len(exp._retries) == 1 and exp._retries[0][0] is main_ctx
        want_io = (BlockDeviceIoStatus.NOSPACE if error == errno.ENOSPC
                   else BlockDeviceIoStatus.FAILED)
        assert exp.blk.iostatus == want_io
        del drv.errors[op]
        exp.resume_after_error()
        rig.wait(r)
        drain_bhs(main_ctx)
        assert (r.status, r.used_len) == (OK, in_len)  # exactly once
        assert drv.count(op) == 2
    else:
        rig.wait(r)
        drain_bhs(main_ctx)
        assert (r.status, r.used_len) == ((OK if expect == "ok" else IOERR), in_len)
        assert exp._retries == [] and not exp.stopped
        assert drv.count(op) == 1
        assert exp.blk.iostatus == BlockDeviceIoStatus.OK
    (name, data), = events
    assert name == "BLOCK_IO_ERROR"
    assert data["device"] == "vd0"
    assert data["operation"] == ("read" if is_read else "write")
    assert data["action"] == {"ok": "ignore", "ioerr": "report", "stop": "stop"}[expect]
    assert data["nospace"] == (error == errno.ENOSPC)
    assert data["reason"] == os.strerror(error)


def test_read_data_arrives_after_a_retried_read(main_ctx, file_node, export_rig):
    """A read kept by 'stop' and retried (through C again) fills the guest's buffer like any
    read."""
    bs, _ = file_node()
    rig = export_rig(bs, rerror=BlockdevOnError.STOP, werror=BlockdevOnError.STOP)
    real = bs.drv.aio_preadv
    fail = [True]

    def preadv(ctx, offset, qiov, cb):
        if fail[0]:
            cb(-errno.EIO)
        else:
            real(ctx, offset, qiov, cb)

    bs.drv.aio_preadv = preadv
    r = rig.submit([outhdr(T_IN, 6)], [1024 + 1])
    run_until(lambda: rig.exp._retries)
    fail[0] = False
    rig.exp.resume_after_error()
    rig.wait(r)
    assert (r.status, r.used_len) == (OK, 1025)
    assert r.data == DISK[6 * 512:8 * 512]
    assert stats(rig).failed_ops[READ] == 1 and stats(rig).nr_ops[READ] == 1


def test_retry_that_fails_again_stops_again(main_ctx, export_rig, events):
    bs, drv = flaky_node()
    rig = export_rig(bs, werror=BlockdevOnError.STOP)
    exp = rig.exp
    drv.errors["write"] = -errno.EIO
    r = rig.submit([outhdr(T_OUT, 0), pattern(512)], [1])
    run_until(lambda: len(exp._retries) == 1)
    exp.resume_after_error()
    run_until(lambda: len(exp._retries) == 1 and drv.count("write") == 2)
    drain_bhs(main_ctx)
    rig.q.harvest()
    assert not r.done and exp.stopped
    drv.errors.clear()
    exp.resume_after_error()
    rig.wait(r)
    drain_bhs(main_ctx)
    assert (r.status, r.used_len) == (OK, 1)
    assert drv.count("write") == 3
    assert [d["action"] for _, d in events] == ["stop", "stop"]


def test_flush_follows_werror_not_rerror(main_ctx, export_rig):
    bs, drv = flaky_node()
    rig = export_rig(bs, rerror=BlockdevOnError.STOP, werror=BlockdevOnError.REPORT)
    drv.errors["flush"] = -errno.EIO
    assert rig.complete([outhdr(T_FLUSH)]) == (IOERR, 1)
    assert rig.exp._retries == []
    rig2 = export_rig(flaky_node()[0], id="exp2", rerror=BlockdevOnError.REPORT,
                      werror=BlockdevOnError.IGNORE)
    rig2.exp.blk.root.drv.errors["flush"] = -errno.EIO
    assert rig2.complete([outhdr(T_FLUSH)]) == (OK, 1)


def test_ignored_read_error_completes_ok(main_ctx, export_rig):
    bs, drv = flaky_node()
    rig = export_rig(bs, rerror=BlockdevOnError.IGNORE)
    drv.errors["read"] = -errno.EIO
    assert rig.complete([outhdr(T_IN, 0)], [513]) == (OK, 513)
    assert stats(rig).failed_ops[READ] == 1  # still accounted as failed


def test_short_read_at_the_end_of_a_file_is_redone_and_zero_filled(main_ctx, image, make_node,
                                                                   export_rig):
    """A file whose size is not a multiple of 512: the C engine's read of the last sector is
    short (-EAGAIN), so C runs it again through the node graph, which zero-fills past EOF."""
    content = pattern(1000, seed=3)
    bs = make_node({"driver": "file", "filename": image(content), "aio": "io_uring"})
    rig = export_rig(bs)
    r = rig.submit([outhdr(T_IN, 1)], [513])
    rig.wait(r)
    assert (r.status, r.used_len) == (OK, 513)
    assert r.data == content[512:] + bytes(24)
    assert stats(rig).nr_ops[READ] == 1 and stats(rig).failed_ops[READ] == 0


# -- 12. the export ----------------------------------------------------------------------------
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
    main_ctx, iothread, export_rig, events, error, io_status
):  # the iothread first: it must outlive the connection
    io = iothread.ctx

    class Gated(FlakyDriver):
        """Holds the first two writes until both arrived (each queue pops one before the first
        failure stops the export), then completes each in its own context."""

        held: list[tuple[AioContext, Callable[[], None]]] = []

        def aio_pwritev(self, ctx, offset, qiov, flags, cb):
            if len(self.calls) >= 2:
                return super().aio_pwritev(ctx, offset, qiov, flags, cb)
            with self.lock:
                self.held.append((ctx, lambda: FlakyDriver.aio_pwritev(
                    self, ctx, offset, qiov, flags, cb)))
                both = len(self.held) == 2
            if both:
                for c, go in self.held:
                    c.schedule(go)

    drv = Gated()
    bs = BlockDriverState(unique("flaky"), drv, False, discard="unmap")
    rig = export_rig(bs, werror=BlockdevOnError.STOP, contexts=[main_ctx, io], num_queues=2)
    exp = rig.exp
    info = exp.info()
    assert info["stopped"] is False and info["io-status"] == "ok"
    drv.errors["write"] = -error
    r_main = rig.submit([outhdr(T_OUT, 0), pattern(512)], [1], queue=0)
    r_io = rig.submit([outhdr(T_OUT, 8), pattern(512)], [1], queue=1)
    run_until(lambda: len(exp._retries) == 2)
    drain_bhs(main_ctx)
    run_in(io, lambda: None)
    for q in rig.qs:
        q.harvest()
    assert not r_main.done and not r_io.done  # both kept
    assert exp.stopped
    info = exp.info()
    assert info["stopped"] is True and info["io-status"] == io_status
    assert {id(c) for c, _, _ in exp._retries} == {id(main_ctx), id(io)}
    assert [d["action"] for _, d in events] == ["stop", "stop"]

    drv.errors.clear()
    exp.resume_after_error()
    assert not exp.stopped and exp._retries == []
    assert exp.info()["io-status"] == "ok" and exp.info()["stopped"] is False
    rig.wait(r_main)
    rig.wait(r_io)
    drain_bhs(main_ctx)
    run_in(io, lambda: None)
    exp.resume_after_error()  # nothing kept any more: nothing happens
    drain_bhs(main_ctx)
    run_in(io, lambda: None)
    assert (r_main.status, r_main.used_len) == (OK, 1)
    assert (r_io.status, r_io.used_len) == (OK, 1)
    assert drv.count("write") == 4
    retried = [(off, ctx) for op, off, ctx in drv.calls if op == "write"][2:]
    assert sorted((off, id(ctx)) for off, ctx in retried) == sorted(
        [(0, id(main_ctx)), (8 * 512, id(io))])


def test_export_report_policy_has_no_iostatus(main_ctx, export_rig):
    bs, drv = flaky_node()
    rig = export_rig(bs)
    drv.errors["read"] = -errno.EIO
    assert rig.complete([outhdr(T_IN, 0)], [513]) == (IOERR, 513)
    assert rig.exp.info()["io-status"] == "ok" and rig.exp.info()["stopped"] is False


def test_removable_export_tray(main_ctx, make_node, export_rig, events):
    rig = export_rig(make_node({"driver": "null-co", "size": str(DISK_SIZE),
                                "read-zeroes": "on"}), removable=True)
    exp = rig.exp
    info = exp.info()
    assert info["removable"] is True and info["tray-open"] is False
    assert blk_dev_has_tray(exp.blk)
    assert exp.config().capacity == SECTORS
    blk_dev_change_media_cb(exp.blk, False)  # eject
    assert exp.info()["tray-open"] is True
    assert exp.config().capacity == 0
    assert struct.unpack_from("<Q", exp.get_config(60), 0)[0] == 0
    assert events == [("DEVICE_TRAY_MOVED", {"device": "exp", "id": "exp", "tray-open": True})]
    assert rig.complete([outhdr(T_IN, 0)], [513])[0] == IOERR  # no medium
    assert rig.complete([outhdr(T_FLUSH)]) == (IOERR, 1)
    blk_dev_change_media_cb(exp.blk, True)  # load
    assert exp.info()["tray-open"] is False
    assert exp.config().capacity == SECTORS
    assert events[-1] == ("DEVICE_TRAY_MOVED", {"device": "exp", "id": "exp",
                                                "tray-open": False})
    assert rig.complete([outhdr(T_IN, 0)], [513]) == (OK, 513)
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


def test_two_writable_exports_with_share_rw(main_ctx, export_rig, make_node):
    bs = make_node({"driver": "null-co", "size": str(DISK_SIZE)})
    a = export_rig(bs, id="exp1", share_rw=True)
    b = export_rig(bs, id="exp2", share_rw=True)
    assert bs.parents == [a.exp.blk, b.exp.blk]
    assert b.complete([outhdr(T_OUT, 0), pattern(512)]) == (OK, 1)
