"""``driver=copy-on-read`` through the real daemon and the libblkio client: blocks the client
wrote into a base image are read back through a copy-on-read node over an empty overlay; the
overlay then holds them itself (the daemon serving it with ``backing=null`` reads them all
back), ``qemu-img check`` finds it clean and ``qemu-img compare`` says it equals the base.
Writes through the filter land in the overlay; the base is never written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.daemon import DaemonProcess, run_client
from tests.integration.test_qcow2_interop import check_image, qemu_img

MIB = 1 << 20
SIZE = 64 * MIB
BLOCKS = "1500"


def _args(tmp_path: Path, blockdev: str) -> list[str]:
    return ["--blockdev", blockdev,
            "--export", f"type=vhost-user-blk,id=exp0,node-name=top,addr.type=unix,"
                        f"addr.path={tmp_path / 'vhost.sock'},writable=on,num-queues=2",
            "--chardev", f"socket,id=m0,path={tmp_path / 'qmp.sock'},server=on,wait=off",
            "--monitor", "chardev=m0"]


def _client(tmp_path: Path, d: DaemonProcess, *args: str) -> None:
    rc, out, err = run_client(str(tmp_path / "vhost.sock"), "--mode", "verify", "--queues",
                              "2", "--blocks", BLOCKS, *args)
    assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())


def _cor(top: Path) -> str:
    return (f"driver=copy-on-read,node-name=top,file.driver=qcow2,file.node-name=ov,"
            f"file.file.driver=file,file.file.filename={top}")


def _node(tmp_path: Path, name: str) -> dict:
    qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
    qmp.connect()
    try:
        r = qmp.cmd_raw("query-named-block-nodes")
        assert "return" in r, r
        return {n["node-name"]: n for n in r["return"]}[name]
    finally:
        qmp.close()


def test_reads_through_copy_on_read_fill_the_overlay(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    with DaemonProcess(_args(tmp_path, f"driver=qcow2,node-name=top,file.driver=file,"
                                       f"file.filename={base}"), tmp_path) as d:
        _client(tmp_path, d, "--seed", "5", "--phase", "write")
        assert d.terminate() == 0, d.log()
    check_image(base)
    saved = tmp_path / "base-copy.qcow2"
    shutil.copyfile(base, saved)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))

    # Read everything back through the filter: each read copies its clusters up.
    with DaemonProcess(_args(tmp_path, _cor(top)), tmp_path) as d:
        _client(tmp_path, d, "--seed", "5", "--phase", "read")
        node = _node(tmp_path, "top")
        assert node["drv"] == "copy-on-read"
        assert node["children"] == [{"child": "file", "node-name": "ov"}]
        copied = node["x-copy-on-read"]["copied-bytes"]
        assert copied >= int(BLOCKS) * 4096, node
        # Again: served by the overlay, nothing more to copy.
        _client(tmp_path, d, "--seed", "5", "--phase", "read")
        assert _node(tmp_path, "top")["x-copy-on-read"]["copied-bytes"] == copied
        assert d.terminate() == 0, d.log()
    check_image(top)
    p = qemu_img("compare", str(top), str(base), check=False)
    assert p.returncode == 0 and "Images are identical" in p.stdout, p.stdout + p.stderr
    allocated = sum(e["length"] for e in json.loads(
        qemu_img("map", "--output=json", str(top)).stdout) if e["depth"] == 0)
    assert allocated == copied

    # The overlay alone (no backing file) holds every block the client read.
    alone = f"driver=qcow2,node-name=top,backing=null,file.driver=file,file.filename={top}"
    with DaemonProcess(_args(tmp_path, alone), tmp_path) as d:
        _client(tmp_path, d, "--seed", "5", "--phase", "read")
        assert d.terminate() == 0, d.log()

    # Writes pass through to the overlay; the base is never written.
    with DaemonProcess(_args(tmp_path, _cor(top)), tmp_path) as d:
        _client(tmp_path, d, "--seed", "6")
        assert d.terminate() == 0, d.log()
    with DaemonProcess(_args(tmp_path, alone), tmp_path) as d:
        _client(tmp_path, d, "--seed", "6", "--phase", "read")
        assert d.terminate() == 0, d.log()
    check_image(top)
    check_image(base)
    assert base.read_bytes() == saved.read_bytes()
