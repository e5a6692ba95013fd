"""Crash-restart under a real guest: SIGKILL the daemon three times during fio verify.

QEMU's vhost-user chardev reconnects (``reconnect=1``) when the daemon is back on the same
socket path; the inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) lets the restarted
daemon resubmit the requests that were in flight when it died.  fio must finish with no I/O
error and no verify error.

QEMU rewinds a queue to its used index when the backend dies, so a backend that completes in
order survives even without the tracking.  The second test makes requests complete out of order
on purpose (the test-only ``x-delay`` filter above the file delays every 7th read/write) and
shows both sides: with the tracking fio passes; without it (``x-inflight=off``) a request that
was in flight while later ones completed is lost, and the guest's fio fails or hangs.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.guest import Guest

FIO = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=48M --numjobs=2 "
    "--offset_increment=48M --iodepth=16 --ioengine=libaio --direct=1 --verify=crc32c "
    "--do_verify=1 --verify_fatal=1 --group_reporting --loops=8"
)


def _serving_again(daemon: DaemonProcess, since: float, limit: float = 20.0) -> float:
    """Seconds from ``since`` until QEMU has reconnected and the new daemon served a request."""
    while time.monotonic() - since < limit:
        e = daemon.stats()["exports"]["exp0"]
        if e["connected"] and any(q["requests"] > 0 for q in e["queues"]):
            return time.monotonic() - since
        time.sleep(0.05)
    raise AssertionError(f"QEMU did not reconnect and resume within {limit} s:\n{daemon.log()}")


def _kill_loop(tmp_path: Path, guest_image, delay: bool, export_extra: str,
               expect_survival: bool, fmt: str = "raw") -> None:
    img = tmp_path / "disk.img"
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(256 << 20)],
                       check=True)
        leaf = f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={img}," \
               "file.aio=io_uring"
    else:
        with open(img, "wb") as f:
            f.truncate(256 << 20)
        leaf = f"driver=file,node-name=disk0,filename={img},aio=io_uring"
    sock = tmp_path / "vhost.sock"
    args = [
        "--blockdev", (f"driver=x-delay,node-name=disk0,every=7,delay-us=20000,"
                       f"file.driver=file,file.filename={img},file.aio=io_uring") if delay
                      else leaf,
        "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                    f"addr.path={sock},writable=on,num-queues=2{export_extra}",
    ]
    rng = random.Random(1234)
    daemon = DaemonProcess(args, tmp_path)
    try:
        with Guest(sock, num_queues=2, smp=2, image=guest_image, reconnect=1) as g:
            g.run_ok(f"({FIO} > /tmp/fio.out 2>&1; echo $? > /tmp/fio.rc) &")
            kills = 0
            reconnects: list[float] = []
            for _ in range(3):
                time.sleep(rng.uniform(1.5, 3.0))
                status, _ = g.run("test -e /tmp/fio.rc", timeout=60)
                if status == 0:
                    break  # fio already finished: no more moments to kill at
                daemon.proc.kill()
                daemon.proc.wait()
                daemon.close()
                kills += 1
                restarted = time.monotonic()
                daemon = DaemonProcess(args, tmp_path)  # replaces the stale socket
                if expect_survival:
                    reconnects.append(_serving_again(daemon, restarted))
            deadline = time.monotonic() + (600 if expect_survival else 45)
            while g.run("test -e /tmp/fio.rc", timeout=60)[0] != 0:
                if time.monotonic() > deadline:
                    break
                time.sleep(1)
            finished = g.run("test -e /tmp/fio.rc", timeout=60)[0] == 0
            out = g.run("cat /tmp/fio.out", timeout=60)[1]
            rc = g.run("cat /tmp/fio.rc", timeout=60)[1].strip() if finished else "hung"
            ok = rc == "0" and "err= 0" in out and "verify:" not in out.lower()
            if expect_survival:
                assert ok, (rc, out)
                assert kills == 3, f"fio finished after {kills} kills; make it run longer"
                assert g.poweroff() == 0
                print("restart to first request served again (s):",
                      " ".join(f"{t:.2f}" for t in reconnects))
            else:
                assert kills >= 1
                assert not ok, "fio survived out-of-order completion without inflight tracking"
        if expect_survival:
            assert daemon.terminate() == 0
    finally:
        daemon.close()
    if fmt == "qcow2":
        # Allocating writes were cut three times: leaks are allowed, corruption never.
        for _ in range(100):  # the killed daemons' image locks go with their io_uring
            p = subprocess.run(["qemu-img", "check", "--output=json", str(img)],
                               capture_output=True, text=True)
            if "lock" not in p.stderr:
                break
            time.sleep(0.1)
        assert p.returncode in (0, 3), (p.returncode, p.stdout, p.stderr)
        assert json.loads(p.stdout).get("corruptions", 0) == 0, p.stdout


def test_sigkill_three_times_during_fio_verify(tmp_path: Path, guest_image) -> None:
    """In-order completion: survives three kills (with the tracking on, as by default)."""
    _kill_loop(tmp_path, guest_image, False, "", expect_survival=True)


def test_sigkill_three_times_during_fio_verify_on_qcow2(tmp_path: Path, guest_image) -> None:
    """The same on a fresh qcow2 image, where most writes allocate: the guest's verify passes
    after each reconnect, and qemu-img check finds no corruption afterwards.  As with QEMU, a
    qcow2 node keeps new mappings in its metadata cache until a flush, so a write the guest saw
    complete survives a crash only once flushed: here the disk is write-through (every write
    is FUA), as a VM that must not lose completed writes would run it."""
    _kill_loop(tmp_path, guest_image, False, ",writethrough=on", expect_survival=True,
               fmt="qcow2")


@pytest.mark.parametrize("inflight", [True, False], ids=["tracked", "untracked"])
def test_out_of_order_completion_needs_inflight_tracking(
    tmp_path: Path, guest_image, inflight: bool
) -> None:
    _kill_loop(tmp_path, guest_image, True,
               "" if inflight else ",x-inflight=off", expect_survival=inflight)
