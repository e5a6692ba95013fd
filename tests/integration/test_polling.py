"""The adaptive polling policy (``vhost/csrc/poller.c``), seen through ``x-pyvhost-stats``.

An AioContext polls before sleeping only while polling finds work: on an idle queue (a
frontend connected, no requests) it stops, and the daemon then uses no CPU; under load (the
libblkio client) it polls again and its polls find requests.  Not timed: the assertions are on
counters and on the daemon's CPU time (from /proc), with wide margins.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tests.daemon import DaemonProcess, run_client
from tests.frontend.vhost_user import S_OK, connect

IDLE_S = 2.0


def _args(tmp_path: Path, poll: str = "") -> list[str]:
    return ["--object", f"iothread,id=io0{poll}",
            "--blockdev", "driver=null-co,node-name=disk0,size=128M,read-zeroes=on",
            "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={tmp_path / 'vhost.sock'},writable=on,num-queues=1,iothread=io0"]


def _cpu_s(pid: int) -> float:
    """CPU time of every thread of pid, in seconds (/proc/PID/task/*/schedstat: nanoseconds,
    finer than /proc/PID/stat's clock ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that just ended
    return total / 1e9


def _poll(d: DaemonProcess) -> tuple[dict[str, Any], dict[str, Any]]:
    s = d.stats()
    return s["iothreads"]["io0"], s["main-loop"]


def test_idle_queue_stops_polling_and_load_resumes_it(tmp_path: Path) -> None:
    sock = str(tmp_path / "vhost.sock")
    with DaemonProcess(_args(tmp_path), tmp_path) as d:
        with connect(sock) as fe:
            fe.setup(queue_size=64)
            for _ in range(300):  # one request at a time: short sleeps, the window grows
                assert fe.read(0, 4096)[0] == S_OK
            io0, _main = _poll(d)
            assert io0["poll-max-ns"] > 0 and io0["polls"] > 0, io0
            time.sleep(0.5)  # the first long sleep after the burst shrinks the window

            io0_a, main_a = _poll(d)
            cpu_a = _cpu_s(d.proc.pid)
            time.sleep(IDLE_S)
            cpu_b = _cpu_s(d.proc.pid)
            io0_b, main_b = _poll(d)
            # Idle with a connected frontend: no polling, and (almost) no CPU.
            assert io0_b["polls"] - io0_a["polls"] <= 2, (io0_a, io0_b)
            assert io0_b["poll-ns"] <= io0_a["poll-ns"], (io0_a, io0_b)
            assert main_b["polls"] - main_a["polls"] <= 10, (main_a, main_b)
            used = cpu_b - cpu_a
            assert used / IDLE_S < 0.01, f"idle daemon used {used:.4f} s of CPU in {IDLE_S} s"

            # The frontend is still there: a request is served at once (no kick is lost
            # while its notifications were off).
            assert fe.read(4096, 4096)[0] == S_OK

        # Under load (the libblkio client at QD1, a new frontend), polling resumes and finds
        # requests.
        rc, out, err = run_client(sock, "--mode", "bench", "--iodepth", "1", "--runtime", "1")
        assert rc == 0 and out["errors"] == 0, (out, err)
        io0_c, _ = _poll(d)
        assert io0_c["polls"] - io0_b["polls"] > 100, (io0_b, io0_c)
        assert io0_c["poll-hits"] - io0_b["poll-hits"] > 100, (io0_b, io0_c)
        assert d.terminate() == 0


def test_polling_off(tmp_path: Path) -> None:
    """``poll-max-ns=0``: the context never polls."""
    sock = str(tmp_path / "vhost.sock")
    with DaemonProcess(_args(tmp_path, ",poll-max-ns=0"), tmp_path) as d:
        rc, out, err = run_client(sock, "--mode", "bench", "--iodepth", "1", "--count", "5000")
        assert rc == 0 and out["errors"] == 0, (out, err)
        io0, _ = _poll(d)
        assert io0["poll-max-ns"] == 0 and io0["polls"] == 0 and io0["poll-ns"] == 0, io0
        assert d.stats()["exports"]["exp0"]["queues"][0]["requests"] == 5000
        assert d.terminate() == 0
