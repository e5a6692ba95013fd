"""The block graph through the real daemon: a raw node over a file, written on the command
line in keyval and in JSON, served to libblkio; QMP shows the graph and refuses to delete
nodes in use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.daemon import DaemonProcess, run_client

MIB = 1 << 20
OFFSET = 1 * MIB
IMG_SIZE = 64 * MIB


def _args(tmp_path: Path, blockdev: str) -> list[str]:
    return ["--blockdev", blockdev,
            "--export", f"type=vhost-user-blk,id=exp0,node-name=top,addr.type=unix,"
                        f"addr.path={tmp_path / 'vhost.sock'},writable=on,num-queues=1",
            "--chardev", f"socket,id=m0,path={tmp_path / 'qmp.sock'},server=on,wait=off",
            "--monitor", "chardev=m0"]


def _image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE + OFFSET)
    return img


@pytest.mark.parametrize("aio,form", [("io_uring", "keyval"), ("native", "json"),
                                      ("threads", "keyval")])
def test_raw_over_file_serves_at_its_offset(tmp_path: Path, aio: str, form: str) -> None:
    img = _image(tmp_path)
    direct = aio == "native"
    if form == "keyval":
        bd = (f"driver=raw,node-name=top,offset=1M,file.driver=file,file.filename={img},"
              f"file.aio={aio}" + (",file.cache.direct=on" * direct))
    else:
        leaf = {"driver": "file", "filename": str(img), "aio": aio}
        if direct:
            leaf["cache"] = {"direct": True}
        bd = json.dumps({"driver": "raw", "node-name": "top", "offset": OFFSET, "file": leaf})
    with DaemonProcess(_args(tmp_path, bd), tmp_path) as d:
        rc, out, err = run_client(str(tmp_path / "vhost.sock"), "--mode", "verify",
                                  "--blocks", "1500")
        assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
        e = d.stats()["exports"]["exp0"]
        # Through raw, a file served by io_uring / Linux AIO stays on the C path.
        if aio == "threads":
            assert e["fast-path-requests"] == 0
        else:
            assert e["fast-path-requests"] >= 3000, e
        assert d.terminate() == 0
    data = img.read_bytes()
    assert data[:OFFSET] == bytes(OFFSET), "a write landed before the raw node's offset"
    assert data[OFFSET:OFFSET + 4 * MIB] != bytes(4 * MIB), "no write landed at the offset"


def test_qmp_shows_the_graph_and_guards_its_nodes(tmp_path: Path) -> None:
    img = _image(tmp_path)
    bd = f"driver=raw,node-name=top,offset=1M,file.driver=file,file.filename={img}"
    with DaemonProcess(_args(tmp_path, bd), tmp_path):
        qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
        qmp.connect()
        try:
            nodes = {n["node-name"]: n for n in qmp.cmd_raw("query-named-block-nodes")["return"]}
            top = nodes["top"]
            assert top["drv"] == "raw" and top["file"] == str(img)
            assert top["image"]["virtual-size"] == IMG_SIZE
            (child,) = top["children"]
            assert child["child"] == "file"
            leaf = nodes[child["node-name"]]
            assert leaf["drv"] == "file" and leaf["image"]["virtual-size"] == IMG_SIZE + OFFSET

            def err(name: str) -> str:
                r = qmp.cmd_raw("blockdev-del", {"node-name": name})
                assert "error" in r, r
                return r["error"]["desc"]

            assert err("top") == "Node top is in use"
            assert err(child["node-name"]) == \
                f"Node {child['node-name']} is not owned by the monitor"
            # A monitor-owned node used by another node: QEMU's words.
            assert "return" in qmp.cmd_raw("blockdev-add", {
                "driver": "file", "node-name": "leaf2", "filename": str(img)})
            assert "return" in qmp.cmd_raw("blockdev-add", {
                "driver": "raw", "node-name": "mid", "file": "leaf2"})
            assert err("leaf2") == "Block device leaf2 is in use"
            assert "return" in qmp.cmd_raw("blockdev-del", {"node-name": "mid"})
            assert "return" in qmp.cmd_raw("blockdev-del", {"node-name": "leaf2"})
        finally:
            qmp.close()


def _qmp_ok(qmp: QEMUMonitorProtocol, cmd: str, args: dict) -> dict:
    r = qmp.cmd_raw(cmd, args)
    assert "return" in r, r
    return r["return"]


def _counts(qmp: QEMUMonitorProtocol, node: str) -> dict[str, int]:
    nodes = {n["node-name"]: n for n in _qmp_ok(qmp, "query-named-block-nodes", {})}
    return nodes[node]["x-count"]


@pytest.mark.parametrize("aio", ["io_uring", "native"])
def test_a_filter_sees_every_request_and_reopen_takes_it_out(tmp_path: Path, aio: str) -> None:
    """A Python filter over a file the C path could serve sees every request (served in
    batches, leaf I/O handed back to C); blockdev-reopen pointing the top node past it brings
    the C path back, and pointing it at the filter again sends requests through it again."""
    img = _image(tmp_path)
    direct = ",cache.direct=on" if aio == "native" else ""
    args = ["--blockdev", f"driver=file,node-name=leaf,filename={img},aio={aio}{direct}",
            "--blockdev", "driver=x-count,node-name=cnt,file=leaf",
            *_args(tmp_path, "driver=raw,node-name=top,file=cnt")]
    sock = str(tmp_path / "vhost.sock")
    with DaemonProcess(args, tmp_path) as d:
        qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
        qmp.connect()
        try:
            rc, out, err = run_client(sock, "--mode", "verify", "--blocks", "1500")
            assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
            e = d.stats()["exports"]["exp0"]
            assert e["fast-path-requests"] == 0
            n = _counts(qmp, "cnt")
            assert n["read"] == 1500 and n["write"] == 1500 and n["flush"] >= 1, n
            assert e["batch-requests"] == 3000 + n["flush"]

            # Take the filter out: the same data, now served by C end to end.
            _qmp_ok(qmp, "blockdev-reopen", {"options": [
                {"driver": "raw", "node-name": "top", "file": "leaf"}]})
            rc, out, err = run_client(sock, "--mode", "verify", "--blocks", "1500")
            assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
            e = d.stats()["exports"]["exp0"]
            assert e["fast-path-requests"] >= 3000
            assert _counts(qmp, "cnt") == n  # nothing went through it

            # And back in.
            _qmp_ok(qmp, "blockdev-reopen", {"options": [
                {"driver": "raw", "node-name": "top", "file": "cnt"}]})
            rc, out, err = run_client(sock, "--mode", "verify", "--blocks", "100")
            assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
            assert _counts(qmp, "cnt")["read"] == 1600
        finally:
            qmp.close()
        assert d.terminate() == 0


def test_reopen_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    img = _image(tmp_path)
    args = ["--blockdev", f"driver=file,node-name=leaf,filename={img}",
            "--blockdev", "driver=x-count,node-name=cnt,file=leaf",
            *_args(tmp_path, "driver=raw,node-name=top,offset=1M,file=cnt")]
    with DaemonProcess(args, tmp_path) as d:
        qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
        qmp.connect()
        try:
            def err(entry: dict) -> str:
                r = qmp.cmd_raw("blockdev-reopen", {"options": [entry]})
                assert "error" in r, r
                return r["error"]["desc"]

            base = {"driver": "raw", "node-name": "top", "offset": OFFSET}
            assert err({**base, "node-name": "nope"}) == \
                "Failed to find node with node-name='nope'"
            assert err({**base, "driver": "x-count"}) == "Cannot change the option 'driver'"
            assert err({**base, "offset": 0}) == "Cannot change the option 'offset'"
            assert err({**base, "file": "nope"}) == \
                "Cannot find device='' nor node-name='nope'"
            assert err({"driver": "x-count", "node-name": "cnt", "file": "top"}) == \
                "Making 'top' a file child of 'cnt' would create a cycle"
            assert "Cannot create a node" in err(
                {**base, "file": {"driver": "file", "filename": str(img)}})
            # Unchanged options are fine, and the graph did not move.
            _qmp_ok(qmp, "blockdev-reopen", {"options": [{**base, "file": "cnt"}]})
            nodes = {n["node-name"]: n for n in _qmp_ok(qmp, "query-named-block-nodes", {})}
            assert nodes["top"]["children"] == [{"child": "file", "node-name": "cnt"}]
        finally:
            qmp.close()
        assert d.terminate() == 0
