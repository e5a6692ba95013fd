"""Both request paths, and the state they share, through the real daemon and libblkio.

Plain reads/writes/flushes on null-co and io_uring file nodes are served in C
(``vhost/csrc/virtio_blk_queue.c``); ``fast-path=off`` (or QMP ``x-block-export-set-fast-path``)
sends every request to the node graph's Python code, parsed by C and handed over in batches.
Data must verify on both, and the counters users read
(query-blockstats, per-queue requests, in-flight) must be one set of numbers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.daemon import DaemonProcess, run_client

IMG_SIZE = 128 << 20


def _args(tmp_path: Path, backend: str, fast: bool, queues: int = 1) -> list[str]:
    if backend == "null":
        bd = "driver=null-co,node-name=disk0,size=128M,read-zeroes=on"
    elif backend == "memory":
        bd = "driver=x-memory,node-name=disk0,size=128M"
    else:
        img = tmp_path / "disk.img"
        with open(img, "wb") as f:
            f.truncate(IMG_SIZE)
        bd = f"driver=file,node-name=disk0,filename={img},aio={backend}"
        if backend == "native":
            bd += ",cache.direct=on"
    exp = (f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
           f"addr.path={tmp_path / 'vhost.sock'},writable=on,num-queues={queues},"
           f"fast-path={'on' if fast else 'off'}")
    return ["--object", "iothread,id=io0", "--object", "iothread,id=io1",
            "--blockdev", bd, "--export", exp + (",iothread.0=io0,iothread.1=io1" * (queues > 1)),
            "--chardev", f"socket,id=m0,path={tmp_path / 'qmp.sock'},server=on,wait=off",
            "--monitor", "chardev=m0"]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "python"])
@pytest.mark.parametrize("backend", ["io_uring", "native", "threads", "memory"])
@pytest.mark.parametrize("queues", [1, 2])
def test_verify_on_each_path(tmp_path: Path, backend: str, fast: bool, queues: int) -> None:
    sock = str(tmp_path / "vhost.sock")
    with DaemonProcess(_args(tmp_path, backend, fast, queues), tmp_path) as d:
        rc, out, err = run_client(sock, "--mode", "verify", "--blocks", "1500", "--queues",
                                  str(queues))
        assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
        e = d.stats()["exports"]["exp0"]
        reqs = 2 * 1500 + queues + 1  # writes, reads, a flush per queue, the out-of-range read
        assert sum(q["requests"] for q in e["queues"]) == reqs
        bs = e["blockstats"]
        assert bs["wr_operations"] == 1500 and bs["rd_operations"] == 1500
        assert bs["invalid_rd_operations"] == 1
        # io_uring / native: C end to end unless turned off; otherwise (the thread pool,
        # x-memory, the C path off) C parses and the node graph serves them in batches.
        if fast and backend in ("io_uring", "native"):
            assert e["fast-path-requests"] >= 3000 and e["batch-requests"] == 0
        else:
            assert e["fast-path-requests"] == 0 and e["batch-requests"] >= 3000
        assert d.terminate() == 0


def test_null_co_on_each_path(tmp_path: Path) -> None:
    sock = str(tmp_path / "vhost.sock")
    for fast in (True, False):
        with DaemonProcess(_args(tmp_path, "null", fast), tmp_path) as d:
            rc, out, err = run_client(sock, "--mode", "bench", "--count", "20000")
            assert rc == 0 and out["errors"] == 0, (out, err)
            e = d.stats()["exports"]["exp0"]
            assert e["blockstats"]["rd_operations"] == 20000
            assert e["fast-path-requests"] == (20000 if fast else 0)
            assert e["batch-requests"] == (0 if fast else 20000)
            assert d.terminate() == 0


def test_counters_are_shared_between_paths(tmp_path: Path) -> None:
    """Write on the C path, switch the export to Python, read back: the data and one set of
    totals cover both halves."""
    sock = str(tmp_path / "vhost.sock")
    with DaemonProcess(_args(tmp_path, "io_uring", True), tmp_path) as d:
        rc, out, err = run_client(sock, "--mode", "verify", "--phase", "write", "--blocks", "800")
        assert rc == 0, (out, err)
        fast_after_writes = d.stats()["exports"]["exp0"]["fast-path-requests"]
        assert fast_after_writes >= 800
        qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
        qmp.connect()
        assert qmp.cmd_raw("x-block-export-set-fast-path", {"id": "exp0", "enable": False}) \
            == {"return": {}}
        rc, out, err = run_client(sock, "--mode", "verify", "--phase", "read", "--blocks", "800")
        assert rc == 0 and out["mismatches"] == 0, (out, err)
        stats = qmp.cmd_raw("query-blockstats", {})["return"][0]["stats"]
        assert stats["wr_operations"] == 800 and stats["rd_operations"] == 800
        e = d.stats()["exports"]["exp0"]
        assert e["fast-path-requests"] == fast_after_writes  # the reads were all Python's
        qmp.close()
        assert d.terminate() == 0


def test_drain_stops_fast_path_pops_and_waits(tmp_path: Path) -> None:
    """x-blockdev-drain during a fast-path write load: while drained, no request is popped
    (the per-queue counter stands still) and nothing is in flight; afterwards I/O resumes."""
    sock = str(tmp_path / "vhost.sock")
    with DaemonProcess(_args(tmp_path, "io_uring", True, queues=2), tmp_path) as d:
        result: dict = {}
        load = threading.Thread(target=lambda: result.setdefault("r", run_client(
            sock, "--mode", "bench", "--rw", "randwrite", "--queues", "2", "--runtime", "4")))
        load.start()
        time.sleep(1.0)
        qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
        qmp.connect()
        drained = threading.Thread(target=lambda: result.setdefault("drain", qmp.cmd_raw(
            "x-blockdev-drain", {"node-name": "disk0", "hold-ms": 2500})))
        drained.start()

        def popped() -> list[int]:
            return [q["requests"] for q in d.stats()["exports"]["exp0"]["queues"]]

        # Wait until the drained section has begun (the counters stop moving)...
        prev, deadline = popped(), time.monotonic() + 1.5
        while time.monotonic() < deadline:
            time.sleep(0.1)
            cur = popped()
            if cur == prev:
                break
            prev = cur
        s1 = d.stats()["exports"]["exp0"]
        time.sleep(0.5)  # ... and check that they stay still inside it
        s2 = d.stats()["exports"]["exp0"]
        drained.join(10)
        assert result["drain"] == {"return": {}}
        assert [q["requests"] for q in s1["queues"]] == [q["requests"] for q in s2["queues"]]
        assert all(q["in-flight"] == 0 for q in s2["queues"])
        load.join(30)
        rc, out, err = result["r"]
        assert rc == 0 and out["errors"] == 0, (out, err)
        s3 = d.stats()["exports"]["exp0"]
        assert sum(q["requests"] for q in s3["queues"]) > sum(q["requests"] for q in s2["queues"])
        qmp.close()
        assert d.terminate() == 0
