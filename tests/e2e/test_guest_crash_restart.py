"""Crash-restart under a real guest: SIGKILL the daemon three times during fio verify.

QEMU's vhost-user chardev reconnects (``reconnect=1``) when the daemon is back on the same
socket path; the inflight region (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) lets the restarted
daemon resubmit the requests that were in flight when it died.  fio must finish with no I/O
error and no verify error.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from tests.daemon import DaemonProcess
from tests.e2e.guest import Guest

FIO = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=48M --numjobs=2 "
    "--offset_increment=48M --iodepth=16 --ioengine=libaio --direct=1 --verify=crc32c "
    "--do_verify=1 --verify_fatal=1 --group_reporting --loops=8"
)


def test_sigkill_three_times_during_fio_verify(tmp_path: Path, guest_image) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    sock = tmp_path / "vhost.sock"
    args = [
        "--blockdev", f"driver=file,node-name=disk0,filename={img},aio=io_uring",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                    f"addr.path={sock},writable=on,num-queues=2",
    ]
    rng = random.Random(1234)
    daemon = DaemonProcess(args, tmp_path)
    try:
        with Guest(sock, num_queues=2, smp=2, image=guest_image, reconnect=1) as g:
            g.run_ok(f"({FIO} > /tmp/fio.out 2>&1; echo $? > /tmp/fio.rc) &")
            kills = 0
            for _ in range(3):
                time.sleep(rng.uniform(1.5, 3.0))
                status, _ = g.run("test -e /tmp/fio.rc", timeout=60)
                if status == 0:
                    break  # fio already finished: no more moments to kill at
                daemon.proc.kill()
                daemon.proc.wait()
                daemon.close()
                kills += 1
                daemon = DaemonProcess(args, tmp_path)  # replaces the stale socket
            deadline = time.monotonic() + 600
            while g.run("test -e /tmp/fio.rc", timeout=60)[0] != 0:
                assert time.monotonic() < deadline, g.run("cat /tmp/fio.out")[1]
                time.sleep(1)
            rc = g.run_ok("cat /tmp/fio.rc").strip()
            out = g.run_ok("cat /tmp/fio.out")
            assert rc == "0", out
            assert "err= 0" in out and "verify:" not in out.lower(), out
            assert kills == 3, f"fio finished after {kills} kills; make it run longer"
            assert g.poweroff() == 0
        assert daemon.terminate() == 0
    finally:
        daemon.close()
