"""driver=rbd against a real one-node Ceph cluster (tests/ceph_cluster.py: ceph-mon, ceph-mgr,
one memstore ceph-osd on 127.0.0.1, auth none), started once per test session.

Through the real daemon with the libblkio client (verify), then ``rbd export`` of the image
read back by a second daemon over the exported file; ``block_resize`` through QMP; discard,
write-zeroes, snapshots and errors at open on the node in-process; the OSD stopped and
restarted under I/O (requests stall, then complete).  Missing Ceph packages or librbd fail the
tests with how to install them (never a skip)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.ceph_cluster import CephCluster
from tests.daemon import DaemonProcess, blkio_client, pyvhost_blk_cmd, run_client

MIB = 1 << 20
IMG_SIZE = 64 * MIB


def _new_image(ceph: CephCluster, size: int = IMG_SIZE) -> str:
    name = f"img-{uuid.uuid4().hex[:8]}"
    ceph.rbd("create", "--size", f"{size // MIB}M", f"{ceph.pool}/{name}")
    return name


def _blockdev(ceph: CephCluster, image: str, extra: str = "") -> str:
    return f"driver=rbd,node-name=n0,pool={ceph.pool},image={image},conf={ceph.conf}{extra}"


def _args(tmp_path: Path, blockdev: str, writable: bool = True) -> list[str]:
    w = "on" if writable else "off"
    return ["--blockdev", blockdev,
            "--export", f"type=vhost-user-blk,id=exp0,node-name=n0,addr.type=unix,"
                        f"addr.path={tmp_path / 'vhost.sock'},writable={w},num-queues=1",
            "--chardev", f"socket,id=m0,path={tmp_path / 'qmp.sock'},server=on,wait=off",
            "--monitor", "chardev=m0"]


def _verify(tmp_path: Path, *args: str, d: DaemonProcess | None = None) -> dict:
    rc, out, err = run_client(str(tmp_path / "vhost.sock"), "--mode", "verify", *args)
    assert rc == 0 and out.get("mismatches") == 0 and not out.get("write_errors") \
        and not out.get("read_errors"), (out, err, d.log() if d else "")
    return out


def test_verify_and_rbd_export(tmp_path: Path, ceph: CephCluster) -> None:
    """Blocks written through ours are in the image: ``rbd export`` of it, served by a
    second daemon from a plain file, reads them back."""
    image = _new_image(ceph)
    with DaemonProcess(_args(tmp_path, _blockdev(ceph, image)), tmp_path) as d:
        out = _verify(tmp_path, "--blocks", "3000", d=d)
        assert out["capacity"] == IMG_SIZE
        assert d.terminate() == 0
    exported = tmp_path / "export.raw"
    ceph.rbd("export", f"{ceph.pool}/{image}", str(exported))
    assert exported.stat().st_size == IMG_SIZE
    bd = f"driver=file,node-name=n0,filename={exported}"
    with DaemonProcess(_args(tmp_path, bd), tmp_path) as d:
        _verify(tmp_path, "--blocks", "3000", "--phase", "read", d=d)
        assert d.terminate() == 0


def test_block_resize_through_qmp(tmp_path: Path, ceph: CephCluster) -> None:
    from qemu.qmp.legacy import QEMUMonitorProtocol

    image = _new_image(ceph)
    with DaemonProcess(_args(tmp_path, _blockdev(ceph, image)), tmp_path) as d:
        _verify(tmp_path, "--blocks", "500", d=d)
        qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
        qmp.connect()
        try:
            r = qmp.cmd_raw("block_resize", {"node-name": "n0", "size": 2 * IMG_SIZE})
            assert "return" in r, r
            nodes = {n["node-name"]: n for n in qmp.cmd_raw("query-named-block-nodes")["return"]}
            assert nodes["n0"]["drv"] == "rbd"
            assert nodes["n0"]["image"]["virtual-size"] == 2 * IMG_SIZE
            assert nodes["n0"]["file"] == f"rbd:{ceph.pool}/{image}"
        finally:
            qmp.close()
        info = json.loads(ceph.rbd("info", "--format=json", f"{ceph.pool}/{image}"))
        assert info["size"] == 2 * IMG_SIZE
        out = _verify(tmp_path, "--blocks", "500", "--seed", "7", d=d)
        assert out["capacity"] == 2 * IMG_SIZE
        assert d.terminate() == 0


def _wait(ctx: object, submit: Callable[[Callable[[int], None]], None],
          timeout: float = 60) -> int:
    res: list[int] = []
    submit(res.append)
    deadline = time.monotonic() + timeout
    while not res:
        assert time.monotonic() < deadline, "request did not complete"
        ctx.aio_poll(True, 0.1)  # type: ignore[attr-defined]
    return res[0]


def _extents(ceph: CephCluster, image: str) -> list[tuple[int, int]]:
    out = json.loads(ceph.rbd("diff", "--format=json", f"{ceph.pool}/{image}"))
    return [(e["offset"], e["length"]) for e in out if e.get("exists", "true") == "true"]


def test_discard_zeroes_and_snapshot_on_the_node(tmp_path: Path, ceph: CephCluster) -> None:
    """In-process: discard deallocates (``rbd diff`` shows no data there), write-zeroes
    reads back zeroes, a snapshot opens read-only and shows the old data; scattered
    buffers are gathered and scattered."""
    from blocklayer.aio import AioContext
    from blocklayer.bdrv import BDRV_REQ_MAY_UNMAP, bdrv_unref
    from blocklayer.blockdev import blockdev_add
    from blocklayer.iov import IOVector

    image = _new_image(ceph)
    ctx = AioContext("test")
    opts = {"driver": "rbd", "pool": ceph.pool, "image": image, "conf": str(ceph.conf)}
    bs = blockdev_add({**opts, "node-name": "rbdtest0", "discard": "unmap"})
    drv = bs.drv
    try:
        pattern = bytes(range(256)) * (8 * MIB // 256)
        parts = [bytearray(pattern[:4096]), bytearray(pattern[4096:])]
        assert _wait(ctx, lambda cb: drv.aio_pwritev(ctx, 0, IOVector.from_buffers(parts),
                                                      0, cb)) == 0
        assert _wait(ctx, lambda cb: drv.aio_flush(ctx, cb)) == 0
        back = [bytearray(12288), bytearray(8 * MIB - 12288)]
        assert _wait(ctx, lambda cb: drv.aio_preadv(ctx, 0, IOVector.from_buffers(back),
                                                     cb)) == 0
        assert b"".join(back) == pattern
        assert sum(n for _, n in _extents(ceph, image)) >= 8 * MIB
        ceph.rbd("snap", "create", f"{ceph.pool}/{image}@s1")
        # Discard the first 4 MiB object: gone from the image.
        assert _wait(ctx, lambda cb: drv.aio_pdiscard(ctx, 0, 4 * MIB, cb)) == 0
        assert all(off >= 4 * MIB for off, _ in _extents(ceph, image)), _extents(ceph, image)
        assert _wait(ctx, lambda cb: drv.aio_pwrite_zeroes(ctx, 5 * MIB, MIB,
                                                           BDRV_REQ_MAY_UNMAP, cb)) == 0
        got = bytearray(8 * MIB)
        assert _wait(ctx, lambda cb: drv.aio_preadv(ctx, 0, IOVector.from_buffers([got]),
                                                     cb)) == 0
        assert got[:4 * MIB] == bytes(4 * MIB)
        assert got[4 * MIB:5 * MIB] == pattern[4 * MIB:5 * MIB]
        assert got[5 * MIB:6 * MIB] == bytes(MIB)
        # The snapshot: read-only, with the data from before the discard.
        snap = blockdev_add({**opts, "node-name": "rbdsnap", "snapshot": "s1",
                             "read-only": True}, from_json=True)
        try:
            assert not snap.drv.can_write() and snap.read_only
            sgot = bytearray(8 * MIB)
            assert _wait(ctx, lambda cb: snap.drv.aio_preadv(
                ctx, 0, IOVector.from_buffers([sgot]), cb)) == 0
            assert sgot == pattern
            with pytest.raises(OSError):
                snap.drv.truncate(2 * IMG_SIZE)
        finally:
            bdrv_unref(snap)
    finally:
        bdrv_unref(bs)
        ctx.close()


def _assert_open_fails(tmp_path: Path, blockdev: str, expect: str) -> None:
    p = subprocess.run(pyvhost_blk_cmd() + _args(tmp_path, blockdev), capture_output=True,
                       text=True, timeout=90)
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and expect in lines[0], (p.returncode, lines)


def test_errors_at_open_are_one_line(tmp_path: Path, ceph: CephCluster) -> None:
    image = _new_image(ceph)
    ceph.rbd("snap", "create", f"{ceph.pool}/{image}@s1")
    _assert_open_fails(tmp_path, _blockdev(ceph, "no-such-image"),
                       "error opening image 'no-such-image' in pool")
    _assert_open_fails(tmp_path, _blockdev(ceph, image, ",snapshot=s1"),
                       "rbd snapshots are always read-only")
    _assert_open_fails(tmp_path, _blockdev(ceph, image, ",key-secret=sec0"),
                       "Parameter 'key-secret' is not supported")
    _assert_open_fails(tmp_path, f"driver=rbd,node-name=n0,pool=nopool,image={image},"
                                 f"conf={ceph.conf}", "error opening image")
    # A snapshot with auto-read-only: served read-only (libblkio refuses a read-only disk,
    # which is the proof that the guest sees it so).
    bd = _blockdev(ceph, image, ",snapshot=s1,auto-read-only=on")
    with DaemonProcess(_args(tmp_path, bd, writable=False), tmp_path) as d:
        rc, out, err = run_client(str(tmp_path / "vhost.sock"), "--mode", "bench",
                                  "--count", "10")
        assert rc != 0 and "Device is read-only" in err, (rc, out, err, d.log())
        assert d.terminate() == 0


def _librbd_counters(ceph: CephCluster) -> dict[str, int]:
    """The running daemon's librbd perf counters (wr, flush, ...), from its admin socket
    (the cluster's conf gives every client.admin one at run/client.admin.asok)."""
    out = subprocess.run(["ceph", "--admin-daemon", str(ceph.dir / "run" / "client.admin.asok"),
                          "perf", "dump"], capture_output=True, text=True, timeout=30)
    dump = json.loads(out.stdout)
    [image] = [v for k, v in dump.items() if k.startswith("librbd")]
    return image


@pytest.mark.parametrize("writethrough", ["on", "off"])
def test_writethrough_export_flushes_each_write(tmp_path: Path, ceph: CephCluster,
                                                writethrough: str) -> None:
    """An export with writethrough=on (write cache off) completes a write only after librbd
    flushed it (librbd has no FUA: write, then flush, in the C engine); with the write cache
    on, writes are not flushed one by one."""
    image = _new_image(ceph)
    args = _args(tmp_path, _blockdev(ceph, image))
    args[3] += f",writethrough={writethrough}"
    with DaemonProcess(args, tmp_path) as d:
        before = _librbd_counters(ceph)
        rc, out, err = run_client(str(tmp_path / "vhost.sock"), "--mode", "bench",
                                  "--rw", "randwrite", "--count", "400")
        assert rc == 0 and not out.get("errors"), (out, err, d.log())
        after = _librbd_counters(ceph)
        writes = after["wr"] - before["wr"]
        flushes = after["flush"] - before["flush"]
        assert writes == 400, (before, after)
        if writethrough == "on":
            assert flushes >= writes, (writes, flushes)
        else:
            assert flushes < 10, (writes, flushes)
        assert d.terminate() == 0


def test_osd_restart_during_io(tmp_path: Path, ceph: CephCluster) -> None:
    """The only OSD stops while the guest writes and comes back: librbd holds the requests
    and they complete; the data reads back.  Runs last: it restarts the cluster's OSD."""
    image = _new_image(ceph)
    with DaemonProcess(_args(tmp_path, _blockdev(ceph, image)), tmp_path) as d:
        sock = str(tmp_path / "vhost.sock")
        client = subprocess.Popen(
            [str(blkio_client()), "--socket", sock, "--mode", "verify", "--blocks", "12000",
             "--phase", "write", "--io-timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        t0 = time.monotonic()
        ceph.stop_osd()
        stopped = time.monotonic() - t0
        time.sleep(2)
        ceph.start_osd()
        ceph.wait_pgs_active()
        back = time.monotonic() - t0
        out, err = client.communicate(timeout=180)
        assert client.returncode == 0, (out, err, d.log())
        res = json.loads(out)
        assert res["write_errors"] == 0 and res["flush_errors"] == 0, res
        print(f"\nOSD stop took {stopped:.1f} s, OSD back after {back:.1f} s, "
              f"client write phase {res['seconds']:.1f} s")
        _verify(tmp_path, "--blocks", "12000", "--phase", "read", d=d)
        assert d.terminate() == 0
