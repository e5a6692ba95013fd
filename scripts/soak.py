#!/usr/bin/env python3
"""Soak test (not part of CI): a guest runs mixed fio verify for a long time while the disk is
resized and drained periodically; RSS and open fds of the daemon are printed over time.

    python scripts/soak.py [--minutes 30] [--queues 2] [--interval 10]

Exits non-zero if fio reports an error, the daemon dies, or its fd count grows.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu.qmp.legacy import QEMUMonitorProtocol  # noqa: E402

from tests.daemon import DaemonProcess  # noqa: E402
from tests.e2e.guest import Guest, build_guest  # noqa: E402

FIO = ("fio --name=soak --filename=/dev/vda --rw=randrw --rwmixread=50 --bs=4k,64k "
       "--size=64M --iodepth=16 --numjobs=2 --offset_increment=64M --ioengine=libaio "
       "--direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting")


def rss_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    anon = int(fields["RssAnon"].split()[0]) + int(fields["RssFile"].split()[0])
    return anon // 1024, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--queues", type=int, default=2)
    p.add_argument("--interval", type=float, default=10, help="seconds between resize/drain")
    args = p.parse_args()
    rng = random.Random(7)
    image = build_guest()
    with tempfile.TemporaryDirectory(prefix="pyvhost-soak-") as tmp:
        work = Path(tmp)
        img, sock, qmp_sock = work / "disk.img", work / "vhost.sock", work / "qmp.sock"
        size = 256 << 20
        with open(img, "wb") as f:
            f.truncate(size)
        dargs = [
            "--object", "iothread,id=io0", "--object", "iothread,id=io1",
            "--blockdev", f"driver=file,node-name=disk0,filename={img},aio=io_uring",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues={args.queues},"
                        "iothread.0=io0,iothread.1=io1",
            "--chardev", f"socket,id=m0,path={qmp_sock},server=on,wait=off",
            "--monitor", "chardev=m0",
        ]
        with DaemonProcess(dargs, work) as d, \
                Guest(sock, num_queues=args.queues, smp=2, image=image) as g:
            qmp = QEMUMonitorProtocol(str(qmp_sock))
            qmp.connect()
            g.run_ok(f"(while [ ! -e /tmp/stop ]; do if {FIO} > /tmp/fio.out 2>&1; then "
                     "echo >> /tmp/passes; else cp /tmp/fio.out /tmp/fio.fail; break; fi; "
                     "done; touch /tmp/done) &")
            start = time.monotonic()
            first = rss_and_fds(d.proc.pid)
            print(f"{'min':>6} {'RSS MiB':>8} {'fds':>5}  event", flush=True)
            while time.monotonic() - start < args.minutes * 60:
                time.sleep(args.interval)
                if d.proc.poll() is not None:
                    print("daemon died", file=sys.stderr)
                    return 1
                if rng.random() < 0.5:
                    size += 1 << 20
                    r = qmp.cmd_raw("block_resize", {"node-name": "disk0", "size": size})
                    event = f"resize {size >> 20} MiB {r}"
                else:
                    r = qmp.cmd_raw("x-blockdev-drain", {"node-name": "disk0", "hold-ms": 200})
                    event = f"drain {r}"
                rss, fds = rss_and_fds(d.proc.pid)
                print(f"{(time.monotonic() - start) / 60:6.1f} {rss:8d} {fds:5d}  {event}",
                      flush=True)
                if g.run("test -e /tmp/fio.fail")[0] == 0:
                    print(g.run("cat /tmp/fio.fail")[1], file=sys.stderr)
                    return 1
            g.run_ok("touch /tmp/stop")
            while g.run("test -e /tmp/done")[0] != 0:
                time.sleep(2)
            if g.run("test -e /tmp/fio.fail")[0] == 0:
                print(g.run("cat /tmp/fio.fail")[1], file=sys.stderr)
                return 1
            last = rss_and_fds(d.proc.pid)
            passes = g.run("cat /tmp/passes 2>/dev/null | wc -l")[1].strip()
            print(f"fio verify passes: {passes}; RSS {first[0]} -> {last[0]} MiB, "
                  f"fds {first[1]} -> {last[1]}")
            g.poweroff()
            qmp.close()
            d.terminate()
            return 0 if last[1] <= first[1] + 2 else 1


if __name__ == "__main__":
    sys.exit(main())
