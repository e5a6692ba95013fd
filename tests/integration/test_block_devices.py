"""Block devices and request alignment, on real loop devices made by the tests.

``driver=host_device`` (qsd's name for LVM volumes, NVMe namespaces, loop devices) with
``cache.direct=on`` on devices with 512-byte and 4 KiB logical sectors, while the guest is shown
512-byte blocks (the default): every request size, on ``aio=native``, ``io_uring`` and
``threads``, lands where it should and reads back (checked against the backing file too).
Requests the device cannot take as they are (a 512-byte write on a 4 KiB device, a guest buffer
at an odd address) are padded or bounced by the block layer (``blocklayer/io.py``); aligned
ones stay on the C request path.  Two sub-sector writes to one 4 KiB sector, in flight
together, both land.  The device's size, growth and QMP ``block_resize`` work as in QEMU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.daemon import DaemonProcess
from tests.frontend.vhost_user import (
    S_OK,
    STATUS_UNSET,
    T_IN,
    T_OUT,
    Request,
    Segment,
    Virtqueue,
    blk_header,
    connect,
)

MIB = 1 << 20
DEV_SIZE = 16 * MIB


def _losetup(*args: str) -> str:
    exe = shutil.which("losetup")
    if exe is None:
        pytest.fail("losetup not found: apt-get install mount (util-linux)")
    r = subprocess.run([exe, *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"losetup {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()} "
                    "(loop devices need root and /dev/loop-control)")
    return r.stdout.strip()


class LoopDevice:
    def __init__(self, tmp: Path, sector_size: int, size: int = DEV_SIZE) -> None:
        self.backing = tmp / f"loop-{sector_size}.img"
        with open(self.backing, "wb") as f:
            f.write(random.Random(sector_size).randbytes(size))
        self.path = _losetup("--find", "--show", "--sector-size", str(sector_size),
                             str(self.backing))
        self.sector_size = sector_size

    def grow(self, size: int) -> None:
        os.truncate(self.backing, size)
        _losetup("--set-capacity", self.path)

    def contents(self, offset: int, n: int) -> bytes:
        with open(self.backing, "rb") as f:
            f.seek(offset)
            return f.read(n)

    def close(self) -> None:
        _losetup("--detach", self.path)


@pytest.fixture(params=[512, 4096], ids=["512", "4k"])
def loop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LoopDevice]:
    dev = LoopDevice(tmp_path, request.param)
    yield dev
    dev.close()


def _daemon(tmp_path: Path, dev: LoopDevice, aio: str) -> DaemonProcess:
    return DaemonProcess([
        "--blockdev", f"driver=host_device,node-name=d,filename={dev.path},cache.direct=on,"
                      f"aio={aio}",
        "--export", f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,"
                    f"addr.path={tmp_path / 'vu.sock'},writable=on,num-queues=2",
        "--chardev", f"socket,id=m0,path={tmp_path / 'qmp.sock'},server=on,wait=off",
        "--monitor", "chardev=m0"], tmp_path)


def _submit(q: Virtqueue, rtype: int, sector: int, data: bytes = b"", nread: int = 0,
            align: int = 4096, skew: int = 0) -> Request:
    """A request whose data buffer starts ``skew`` bytes past an ``align``-aligned address."""
    segs = [Segment(q.buffer(blk_header(rtype, sector)), 16, False)]
    n = len(data) or nread
    if n:
        addr = q.arena.alloc(n + skew, align) + skew
        q.mem.write(addr, data or bytes([0x5A]) * n)
        segs.append(Segment(addr, n, rtype == T_IN))
    status = q.buffer(bytes([STATUS_UNSET]))
    segs.append(Segment(status, 1, True))
    return q.add_chain(segs)


def _do(q: Virtqueue, req: Request) -> Request:
    q.kick()
    q.wait([req], 10)
    return req


def _fast(d: DaemonProcess) -> int:
    return d.stats()["exports"]["e"]["fast-path-requests"]


@pytest.mark.parametrize("aio", ["native", "io_uring", "threads"])
def test_request_sizes_on_each_aio(tmp_path: Path, loop: LoopDevice, aio: str) -> None:
    rng = random.Random(f"{loop.sector_size}-{aio}")
    with _daemon(tmp_path, loop, aio) as d, connect(str(tmp_path / "vu.sock")) as fe:
        fe.setup(queue_size=64, num_queues=1)
        q = fe.queues[0]
        assert fe.config.capacity * 512 == DEV_SIZE
        for size in (512, 4096, 65536):
            for sector in (1, 8, 9, DEV_SIZE // 512 - size // 512):
                data = rng.randbytes(size)
                fast0 = _fast(d)
                assert _do(q, _submit(q, T_OUT, sector, data)).status == S_OK, (size, sector)
                r = _do(q, _submit(q, T_IN, sector, nread=size))
                assert r.status == S_OK and r.data == data, (size, sector)
                assert loop.contents(sector * 512, size) == data, "not on the device"
                aligned = (sector * 512) % loop.sector_size == 0 and size % loop.sector_size == 0
                if aio == "threads" or not aligned:
                    assert _fast(d) == fast0, "served in C though the device cannot take it"
                else:
                    assert _fast(d) == fast0 + 2, "aligned requests left the C path"
        assert fe.flush() == S_OK
        assert d.terminate() == 0


@pytest.mark.parametrize("aio", ["native", "io_uring"])
def test_misaligned_guest_buffers_are_bounced(tmp_path: Path, loop: LoopDevice,
                                              aio: str) -> None:
    rng = random.Random(7)
    with _daemon(tmp_path, loop, aio), connect(str(tmp_path / "vu.sock")) as fe:
        fe.setup(queue_size=64, num_queues=1)
        q = fe.queues[0]
        for skew in (1, 8, 100):
            data = rng.randbytes(8192)
            assert _do(q, _submit(q, T_OUT, 16, data, skew=skew)).status == S_OK
            r = _do(q, _submit(q, T_IN, 16, nread=8192, skew=skew + 3))
            assert r.status == S_OK and r.data == data
            assert loop.contents(16 * 512, 8192) == data


@pytest.mark.parametrize("aio", ["native", "io_uring", "threads"])
def test_concurrent_sub_sector_writes_to_one_sector_all_land(tmp_path: Path, aio: str) -> None:
    dev = LoopDevice(tmp_path, 4096)
    try:
        rng = random.Random(aio)
        with _daemon(tmp_path, dev, aio), connect(str(tmp_path / "vu.sock")) as fe:
            fe.setup(queue_size=64, num_queues=2)
            for block in range(0, 24):
                # All eight 512-byte sectors of one 4 KiB block, over two queues at once.
                datas = [rng.randbytes(512) for _ in range(8)]
                reqs = []
                for i, data in enumerate(datas):
                    q = fe.queues[i % 2]
                    reqs.append((q, _submit(q, T_OUT, block * 8 + i, data)))
                for q in fe.queues:
                    q.kick()
                for q, req in reqs:
                    q.wait([req], 10)
                    assert req.status == S_OK
                assert dev.contents(block * 4096, 4096) == b"".join(datas), f"block {block}"
    finally:
        dev.close()


def test_host_device_size_resize_and_errors(tmp_path: Path) -> None:
    dev = LoopDevice(tmp_path, 512)
    try:
        with _daemon(tmp_path, dev, "io_uring"):
            qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
            qmp.connect()
            try:
                def size() -> int:
                    nodes = qmp.cmd_raw("query-named-block-nodes")["return"]
                    return next(n for n in nodes if n["node-name"] == "d")["image"][
                        "virtual-size"]

                assert size() == DEV_SIZE
                r = qmp.cmd_raw("block_resize", {"node-name": "d", "size": 2 * DEV_SIZE})
                assert r["error"]["desc"] == "Cannot grow device files", r
                dev.grow(2 * DEV_SIZE)  # the device grows underneath (lvextend, losetup -c)
                r = qmp.cmd_raw("block_resize", {"node-name": "d", "size": 2 * DEV_SIZE})
                assert "return" in r, r
                assert size() == 2 * DEV_SIZE
                with connect(str(tmp_path / "vu.sock")) as fe:
                    fe.setup(queue_size=16, num_queues=1)
                    assert fe.config.capacity * 512 == 2 * DEV_SIZE
            finally:
                qmp.close()
        # A regular file is not a host device: one line, exit 1.
        img = tmp_path / "plain.img"
        img.write_bytes(bytes(MIB))
        p = subprocess.run(["pyvhost-blk", "--blockdev",
                            f"driver=host_device,node-name=d,filename={img}"],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 1
        assert p.stderr.strip() == ("pyvhost-blk: --blockdev driver=host_device,node-name=d,"
                                    f"filename={img}: 'host_device' driver expects either a "
                                    "character or block device"), p.stderr
    finally:
        dev.close()


def test_json_stats_name_the_device(tmp_path: Path) -> None:
    """query-named-block-nodes reports the device as the node's file, driver host_device."""
    dev = LoopDevice(tmp_path, 4096)
    try:
        with _daemon(tmp_path, dev, "native") as d:
            qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
            qmp.connect()
            try:
                (node,) = [n for n in qmp.cmd_raw("query-named-block-nodes")["return"]
                           if n["node-name"] == "d"]
            finally:
                qmp.close()
            assert node["drv"] == "host_device" and node["file"] == dev.path
            assert json.dumps(node["cache"]) == json.dumps(
                {"writeback": True, "direct": True, "no-flush": False})
            assert d.terminate() == 0
    finally:
        dev.close()
