"""End to end: a QEMU guest (vhost-user-blk-pci) on a disk that lives on an NBD server --
guest -> pyvhost-blk (``driver=nbd``, libnbd) -> qemu-nbd -> a raw image.

* fio with crc32c verification passes, and what the guest wrote is in the server's image;
* the server is killed (SIGKILL) while fio writes and started again 2 s later: with
  ``reconnect-delay`` the guest's requests wait and complete -- fio passes its verify, the guest
  kernel logs no I/O error, the daemon counts no failed request and logs the reconnect.

A missing qemu-nbd or libnbd fails the test with how to install it (never a skip)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.guest import Guest

IMAGE_SIZE = 128 << 20
PATTERN_OFFSET = 100 << 20
PATTERN_BYTE = 0x3C
FIO_VERIFY = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size={size} --iodepth=16 "
    "--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1"
)
#: how long the server stays away in the restart test (reconnect-delay is far longer)
OUTAGE_S = 2.0


class QemuNbd:
    """qemu-nbd serving ``image`` on a unix socket; can be killed and started again."""

    def __init__(self, image: Path, sock: Path, log: Path) -> None:
        exe = shutil.which("qemu-nbd")
        if exe is None:
            pytest.fail("qemu-nbd not found: install it with 'apt-get install qemu-utils'",
                        pytrace=False)
        try:
            import nbd  # noqa: F401
        except ImportError:
            pytest.fail("libnbd's Python binding is missing: 'apt-get install python3-libnbd' "
                        "(the venv must see system site-packages)", pytrace=False)
        self.cmd = [exe, "--persistent", "--shared=8", "--format=raw", "--cache=writeback",
                    f"--socket={sock}", str(image)]
        self.sock, self.log = sock, log
        self.proc: subprocess.Popen | None = None
        self.start()

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.sock))
                return True
            except OSError:
                return False

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()  # a killed server leaves its socket behind
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._answers():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"qemu-nbd did not listen: {self.log.read_text()}"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def _setup(tmp_path: Path, reconnect_delay: int = 0) -> tuple[Path, QemuNbd, list[str]]:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    srv = QemuNbd(img, tmp_path / "nbd.sock", tmp_path / "qemu-nbd.log")
    vhost = tmp_path / "vhost.sock"
    args = [
        "--blockdev", f"driver=nbd,node-name=nbd0,server.type=unix,server.path={srv.sock},"
                      f"reconnect-delay={reconnect_delay}",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=nbd0,addr.type=unix,"
                    f"addr.path={vhost},writable=on,num-queues=1",
    ]
    return img, srv, args


def _check_fio(status: int, out: str) -> None:
    assert status == 0, out[-6000:]
    assert "err= 0" in out, out[-6000:]
    low = out.lower()
    for bad in ("verify:", "bad magic", "io_u error", "input/output error"):
        assert bad not in low, out[-6000:]


def _stall_report(g: Guest, d: DaemonProcess, srv: QemuNbd) -> str:
    """What the guest, the daemon's queue (vring indices, lists) and the nbd node each say
    while fio is stuck; then a new request is sent (a nudge: its completion also delivers
    anything pushed earlier whose notification was missed) and both are shown again.  Each
    part that fails (a guest whose disk hangs, a daemon that does not answer) says so and
    the rest goes on."""
    def attempt(what: Callable[[], str]) -> str:
        try:
            return what()
        except Exception as e:  # a diagnostic must not hide the others
            return f"({type(e).__name__}: {e})"

    def daemon() -> str:
        st = d.stats()
        nodes = {n["node-name"]: n.get("x-nbd") for n in st["nodes"]}
        return ("--- daemon queues ---\n" + json.dumps(st["exports"]["exp0"].get("queues"),
                                                        indent=1)
                + "\n--- nbd node ---\n" + json.dumps(nodes, indent=1))

    def snapshot(label: str) -> list[str]:
        return [f"=== {label} ===", "--- guest ---", attempt(g.block_diagnostics),
                attempt(daemon), "--- fio ---",
                attempt(lambda: g.run("tail -n 5 /tmp/fio.out", timeout=30)[1])]
    parts = snapshot("stalled")
    time.sleep(2)
    parts += snapshot("stalled, 2 s later")
    parts.append("nudge: " + attempt(lambda: repr(g.run(
        "dd if=/dev/vda of=/dev/null bs=4k count=1 iflag=direct skip=7", timeout=30))))
    time.sleep(2)
    parts += snapshot("after the nudge")
    parts += ["--- daemon log (tail) ---", "\n".join(d.log().splitlines()[-40:]),
              "--- qemu-nbd log ---", srv.log.read_text()[-2000:]]
    return "\n".join(parts)


def _no_guest_io_errors(g: Guest) -> None:
    status, out = g.run("dmesg | grep -iE 'I/O error|blk_update_request|critical medium' "
                        "|| true")
    assert status == 0 and not out.strip(), out


def test_guest_fio_verify_through_nbd(tmp_path: Path, guest_image) -> None:
    img, srv, args = _setup(tmp_path)
    try:
        with DaemonProcess(args, tmp_path) as d:
            with Guest(tmp_path / "vhost.sock", num_queues=1, smp=1, image=guest_image) as g:
                assert g.run_ok("cat /sys/block/vda/size").strip() == str(IMAGE_SIZE // 512)
                status, out = g.run(FIO_VERIFY.format(size="32M"), timeout=600)
                _check_fio(status, out)
                g.run_ok(
                    f"head -c 4096 /dev/zero | tr '\\000' '\\{PATTERN_BYTE:03o}' > /tmp/pat && "
                    f"dd if=/tmp/pat of=/dev/vda bs=4096 seek={PATTERN_OFFSET // 4096} count=1 "
                    "oflag=direct conv=fsync"
                )
                _no_guest_io_errors(g)
                assert g.poweroff() == 0
            e = d.stats()["exports"]["exp0"]["blockstats"]
            assert e["wr_operations"] >= 8192, e  # 32 MiB of 4 KiB writes, then verified
            assert e["failed_rd_operations"] == 0 and e["failed_wr_operations"] == 0, e
            assert "Traceback" not in d.log()
            assert d.terminate() == 0
        with open(img, "rb") as f:  # written through NBD: in the server's image
            f.seek(PATTERN_OFFSET)
            assert f.read(4096) == bytes([PATTERN_BYTE]) * 4096
    finally:
        srv.kill()


def test_guest_io_survives_server_restart(tmp_path: Path, guest_image) -> None:
    """qemu-nbd killed while the guest's fio writes, back OUTAGE_S later: no guest error."""
    _img, srv, args = _setup(tmp_path, reconnect_delay=30)
    try:
        with DaemonProcess(args, tmp_path) as d:
            with Guest(tmp_path / "vhost.sock", num_queues=1, smp=1, image=guest_image) as g:
                fio = FIO_VERIFY.format(size="64M")
                g.run_ok("rm -f /tmp/fio.out /tmp/fio.rc; "
                         f"( {fio} >/tmp/fio.out 2>&1 </dev/null; echo $? >/tmp/fio.rc ) "
                         "</dev/null >/dev/null 2>&1 &")

                def writes() -> int:
                    return d.stats()["exports"]["exp0"]["blockstats"]["wr_operations"]

                deadline = time.monotonic() + 120
                while writes() < 1000:  # fio is really writing
                    assert time.monotonic() < deadline, g.run("cat /tmp/fio.out")[1]
                    time.sleep(0.1)
                srv.kill()
                killed, at_kill = time.monotonic(), writes()
                time.sleep(OUTAGE_S)
                assert writes() - at_kill < 64, "writes completed while the server was away"
                srv.start()
                deadline = time.monotonic() + 180  # it takes ~15 s
                while True:
                    status, rc = g.run("cat /tmp/fio.rc 2>/dev/null || true")
                    if rc.strip():
                        break
                    if time.monotonic() >= deadline:
                        # a stall: the vring indices, the daemon's lists, the guest's view
                        report = _stall_report(g, d, srv)
                        (tmp_path / "stall-report.txt").write_text(report)
                        pytest.fail("fio did not finish\n" + report, pytrace=False)
                    time.sleep(1)
                status, out = g.run("cat /tmp/fio.out", timeout=60)
                _check_fio(int(rc.split()[0]), out)
                assert writes() > at_kill + 1000, "fio wrote on after the restart"
                _no_guest_io_errors(g)
                assert g.poweroff() == 0
            log = d.log()
            m = re.findall(r"reconnected to '[^']*' after ([0-9.]+) s", log)
            assert len(m) == 1, log
            assert OUTAGE_S - 0.1 <= float(m[0]) < OUTAGE_S + 5, (m, time.monotonic() - killed)
            e = d.stats()["exports"]["exp0"]["blockstats"]
            assert e["failed_rd_operations"] == 0 and e["failed_wr_operations"] == 0, e
            assert "Traceback" not in log
            assert d.terminate() == 0
    finally:
        srv.kill()
        if os.path.exists(tmp_path / "nbd.sock"):
            os.unlink(tmp_path / "nbd.sock")
