"""External snapshots through QMP (``blockdev-snapshot``) in the real daemon, as a user backs up
a running VM's disk: libblkio writes pattern A to the export's qcow2 image; an overlay is added
(``blockdev-add`` with ``backing: null``) and ``blockdev-snapshot`` puts it on top; then the
client writes pattern B while ``qemu-img convert -U`` copies the base.  The copy equals A, the
export reads A+B, and QEMU's tools agree (``qemu-img check``, ``compare``).  QEMU's refusals,
with its words."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.daemon import DaemonProcess, blkio_client, run_client
from tests.qemu_tools import qemu_img

MIB = 1 << 20
SIZE = 64 * MIB


def _args(tmp_path: Path, blockdev: str) -> list[str]:
    return ["--blockdev", blockdev,
            "--export", f"type=vhost-user-blk,id=exp0,node-name=base0,addr.type=unix,"
                        f"addr.path={tmp_path / 'vhost.sock'},writable=on,num-queues=2",
            "--chardev", f"socket,id=m0,path={tmp_path / 'qmp.sock'},server=on,wait=off",
            "--monitor", "chardev=m0"]


def _write(sock: Path, seed: int, blocks: int = 3000, phase: str = "write") -> list[str]:
    return [str(blkio_client()), "--socket", str(sock), "--mode", "verify", "--queues", "2",
            "--phase", phase, "--seed", str(seed), "--blocks", str(blocks), "--oob", "none"]


def _client(sock: Path, seed: int, phase: str, blocks: int = 3000) -> dict[str, Any]:
    rc, out, err = run_client(str(sock), "--mode", "verify", "--queues", "2", "--phase", phase,
                              "--seed", str(seed), "--blocks", str(blocks), "--oob", "none")
    assert rc == 0 and out.get("mismatches", 0) == 0, (phase, seed, out, err)
    return out


def _expected(tmp_path: Path) -> tuple[Path, Path]:
    """Raw images written the same way: A alone, then A+B (B after A where they overlap)."""
    a, ab = tmp_path / "expect-a.raw", tmp_path / "expect-ab.raw"
    with open(a, "wb") as f:
        f.truncate(SIZE)
    d = tmp_path / "ref"
    d.mkdir()
    args = _args(d, f"driver=file,node-name=base0,filename={a}")
    with DaemonProcess(args, d) as dp:
        _client(d / "vhost.sock", 1, "write")
        assert dp.terminate() == 0, dp.log()
    shutil.copyfile(a, ab)
    args = _args(d, f"driver=file,node-name=base0,filename={ab}")
    with DaemonProcess(args, d) as dp:
        _client(d / "vhost.sock", 2, "write")
        assert dp.terminate() == 0, dp.log()
    return a, ab


def _overwritten(a: Path, ab: Path) -> int:
    """4 KiB blocks written in ``a`` whose contents differ in ``ab``."""
    x, y = a.read_bytes(), ab.read_bytes()
    z = bytes(4096)
    return sum(1 for i in range(0, len(x), 4096)
               if x[i:i + 4096] != z and x[i:i + 4096] != y[i:i + 4096])


def _identical(img: Path, raw: Path, fmt: str = "qcow2") -> None:
    p = qemu_img("compare", "-U", "-f", fmt, "-F", "raw", str(img), str(raw), check=False)
    assert p.returncode == 0 and "Images are identical" in p.stdout, p.stdout + p.stderr


def _check(path: Path) -> None:
    p = qemu_img("check", "--output=json", str(path), check=False)
    r = json.loads(p.stdout) if p.stdout.strip() else {}
    assert p.returncode == 0 and not r.get("corruptions") and not r.get("leaks"), \
        (p.stdout, p.stderr)


def _ok(qmp: QEMUMonitorProtocol, cmd: str, args: dict[str, Any]) -> Any:
    r = qmp.cmd_raw(cmd, args)
    assert "return" in r, (cmd, args, r)
    return r["return"]


def _err(qmp: QEMUMonitorProtocol, cmd: str, args: dict[str, Any]) -> str:
    r = qmp.cmd_raw(cmd, args)
    assert "error" in r, (cmd, args, r)
    assert r["error"]["class"] == "GenericError", r
    return r["error"]["desc"]


@pytest.mark.parametrize("base_fmt,overlay_kind", [("qcow2", "with-header-backing"),
                                                    ("qcow2", "fresh"),
                                                    ("raw", "with-header-backing")])
def test_snapshot_while_the_guest_runs_and_the_base_is_copied(tmp_path: Path, base_fmt: str,
                                                              overlay_kind: str) -> None:
    """base_fmt raw: the export's root is a file node the C path serves by itself (io_uring);
    after the snapshot the overlay's driver must see every request."""
    expect_a, expect_ab = _expected(tmp_path)
    base, ov, copy = tmp_path / f"base.{base_fmt}", tmp_path / "ov.qcow2", tmp_path / "copy.raw"
    if base_fmt == "raw":
        with open(base, "wb") as f:
            f.truncate(SIZE)
        bd = f"driver=file,node-name=base0,filename={base},aio=io_uring"
    else:
        qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
        bd = (f"driver=qcow2,node-name=base0,file.driver=file,file.filename={base},"
              f"file.aio=io_uring")
    sock = tmp_path / "vhost.sock"
    args = _args(tmp_path, bd)
    with DaemonProcess(args, tmp_path) as d:
        _client(sock, 1, "write")  # pattern A, in the base
        if overlay_kind == "fresh":  # no backing file in its header
            qemu_img("create", "-q", "-f", "qcow2", str(ov), str(SIZE))
        else:  # as libvirt makes them (-u: the running daemon holds the base's write lock)
            qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(base), "-F", base_fmt,
                     str(ov), str(SIZE))
        qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
        qmp.connect()
        try:
            _ok(qmp, "blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": None,
                                      "file": {"driver": "file", "filename": str(ov),
                                               "aio": "io_uring"}})
            # The guest reads A back while the snapshot is taken: no error, no other data.
            reader = subprocess.Popen(_write(sock, 1, phase="read"), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            _ok(qmp, "blockdev-snapshot", {"node": "base0", "overlay": "ov"})
            out, err = reader.communicate(timeout=120)
            assert reader.returncode == 0 and json.loads(out)["mismatches"] == 0, \
                (out, err, d.log())
            nodes = {n["node-name"]: n for n in _ok(qmp, "query-named-block-nodes", {})}
            assert {"child": "backing", "node-name": "base0"} in nodes["ov"]["children"]
            assert nodes["base0"]["ro"] is True  # QEMU reopens the old top read-only,
            if base_fmt == "qcow2":
                base_file = nodes["base0"]["children"][0]["node-name"]
                assert nodes[base_file]["ro"] is True  # with its file
            assert _ok(qmp, "query-block-exports", {})[0]["node-name"] == "ov"
            # Pattern B goes to the overlay while the base is copied, more than once.
            writer = subprocess.Popen(_write(sock, 2), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            copies = 0
            while copies < 2 or writer.poll() is None:
                qemu_img("convert", "-U", "-f", base_fmt, "-O", "raw", str(base), str(copy))
                copies += 1
                _identical(copy, expect_a, fmt="raw")  # the base still holds A alone
            out, err = writer.communicate(timeout=120)
            assert writer.returncode == 0, (out, err, d.log())
            _client(sock, 2, "read")  # B through the export
            # A where B did not overwrite it: the blocks of A that B rewrote, and only
            # those, read differently (counted on the raw images written the same way).
            rc, out, err = run_client(str(sock), "--mode", "verify", "--queues", "2",
                                      "--phase", "read", "--seed", "1", "--blocks", "3000",
                                      "--oob", "none")
            assert out.get("mismatches") == _overwritten(expect_a, expect_ab), (out, err)
            # Again: the base is a backing node now (QEMU's op blocker), the overlay in use.
            assert _err(qmp, "blockdev-snapshot", {"node": "base0", "overlay": "ov"}) == \
                "Node 'base0' is busy: node is used as backing hd of 'ov'"
        finally:
            qmp.close()
        assert d.terminate() == 0, d.log()
    if base_fmt == "qcow2":
        _check(base)
    _check(ov)
    _identical(base, expect_a, fmt=base_fmt)
    if overlay_kind == "fresh":  # QEMU does not write the header either: the user does
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(base), "-F", base_fmt, str(ov))
    _identical(ov, expect_ab)


def test_snapshot_refusals_in_qemus_words(tmp_path: Path) -> None:
    """Each message checked against qemu-storage-daemon 7.2 with the same commands."""
    base, ov, raw = tmp_path / "base.qcow2", tmp_path / "ov.qcow2", tmp_path / "r.raw"
    other, ovo = tmp_path / "other.qcow2", tmp_path / "ovo.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", str(other), str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", str(base), "-F", "qcow2", str(ov),
             str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(other), "-F", "qcow2", str(ovo),
             str(SIZE))
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    args = _args(tmp_path, f"driver=qcow2,node-name=base0,file.driver=file,"
                           f"file.filename={base}")
    with DaemonProcess(args, tmp_path) as d:
        qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
        qmp.connect()
        try:
            assert _err(qmp, "blockdev-snapshot", {"node": "nope", "overlay": "x"}) == \
                "Cannot find device='nope' nor node-name='nope'"
            assert _err(qmp, "blockdev-snapshot", {"node": "base0", "overlay": "x"}) == \
                "Cannot find device='x' nor node-name='x'"
            assert _err(qmp, "blockdev-snapshot", {"node": "base0"}) == \
                "Parameter 'overlay' is missing"
            # Opened with its header's backing file: it has one already.
            _ok(qmp, "blockdev-add", {"driver": "qcow2", "node-name": "ovb",
                                      "file": {"driver": "file", "filename": str(ovo)}})
            assert _err(qmp, "blockdev-snapshot", {"node": "base0", "overlay": "ovb"}) == \
                "The overlay already has a backing image"
            _ok(qmp, "blockdev-del", {"node-name": "ovb"})
            _ok(qmp, "blockdev-add", {"driver": "file", "node-name": "rawf",
                                      "filename": str(raw)})
            assert _err(qmp, "blockdev-snapshot", {"node": "base0", "overlay": "rawf"}) == \
                "The overlay does not support backing images"
            assert _err(qmp, "blockdev-snapshot", {"node": "base0", "overlay": "base0"}) == \
                "The overlay is already in use"
            # A read-only overlay cannot take the export's writes: refused, nothing changes.
            _ok(qmp, "blockdev-add", {"driver": "qcow2", "node-name": "ovr", "read-only": True,
                                      "backing": None,
                                      "file": {"driver": "file", "filename": str(ov)}})
            assert _err(qmp, "blockdev-snapshot", {"node": "base0", "overlay": "ovr"}) == \
                "Block node is read-only"
            nodes = {n["node-name"]: n for n in _ok(qmp, "query-named-block-nodes", {})}
            assert nodes["ovr"]["children"] == [{"child": "file",
                                                 "node-name": nodes["ovr"]["children"][0]
                                                 ["node-name"]}]
            assert nodes["base0"]["ro"] is False
            assert _ok(qmp, "query-block-exports", {})[0]["node-name"] == "base0"
            # The export still works after the refusal.
            _client(tmp_path / "vhost.sock", 5, "both", blocks=200)
            _ok(qmp, "blockdev-del", {"node-name": "ovr"})
        finally:
            qmp.close()
        assert d.terminate() == 0, d.log()
    _check(base)
