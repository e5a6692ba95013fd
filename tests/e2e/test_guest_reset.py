"""A guest reboot resets the device (QEMU stops the rings and starts them again): the daemon
keeps serving the same connection's successor, data survives, and it leaks no fds."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.daemon import DaemonProcess
from tests.e2e.guest import READY_MARKER, Guest

FIO = ("fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --iodepth=16 "
       "--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _fd_links(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(f"{fd}:{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return sorted(out)


def test_guest_reset_keeps_serving(tmp_path: Path, guest_image) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    sock = tmp_path / "vhost.sock"
    args = ["--object", "iothread,id=io0",
            "--blockdev", f"driver=file,node-name=disk0,filename={img},aio=io_uring",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues=2,iothread=io0"]
    with DaemonProcess(args, tmp_path) as d, \
            Guest(sock, num_queues=2, smp=2, image=guest_image,
                  extra_args=("-action", "reboot=reset")) as g:  # undo -no-reboot
        out = g.run_ok(FIO, timeout=300)
        assert "err= 0" in out
        g.run_ok("echo reset-marker | dd of=/dev/vda bs=512 seek=100000 conv=fsync oflag=direct "
                 "2>/dev/null")
        fds_before = _fds(d.proc.pid)
        links_before = _fd_links(d.proc.pid)
        for _ in range(2):
            mark = g.mark()
            g.qmp("system_reset")  # the guest reboots; QEMU resets the vhost-user device
            g.wait_for(re.escape(READY_MARKER), timeout=120, since=mark)
            assert g.run_ok("dd if=/dev/vda bs=512 skip=100000 count=1 iflag=direct "
                            "2>/dev/null | head -c 12") == "reset-marker"
            out = g.run_ok(FIO, timeout=300)
            assert "err= 0" in out and "verify:" not in out.lower(), out
        # Each reset replaces the inflight region: no fd may pile up.
        assert _fds(d.proc.pid) <= fds_before, (links_before, _fd_links(d.proc.pid))
        e = d.stats()["exports"]["exp0"]
        assert e["connected"] and all(q["requests"] > 0 for q in e["queues"])
        assert g.poweroff() == 0
        assert d.terminate() == 0
