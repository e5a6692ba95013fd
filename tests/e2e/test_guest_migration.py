"""Live migration of a guest whose disk is a pyvhost-blk export, while fio writes and verifies.

Two exports of one image (``share-rw=on``, as two QEMU processes must share it during the
switch-over) in one daemon; the guest starts on export A, migrates (QMP ``migrate`` over a unix
socket) to a second QEMU on export B, then back to a third QEMU on export A again, with
``fio --rw=randwrite --verify`` running throughout.  fio must finish with no I/O or verify
error.  This needs the backend to log every guest page it writes while QEMU asks for it
(``VHOST_F_LOG_ALL``: data read into guest buffers, used rings — libvhost-user logs them when
the element is pushed, on both request paths) and to stop cleanly at the switch-over.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.daemon import DaemonProcess
from tests.e2e.guest import Guest

# Job "w" writes and verifies as it goes (writes in flight at every moment); job "r" only reads
# back and verifies a region written before (PREP), so its buffers are written by the backend
# alone: without the dirty log, reads that complete at the switch-over reach the destination
# as stale pages.
_R = ("--name=r --filename=/dev/vda --rw=write --bs=4k --size=16M --offset=64M "
      "--ioengine=libaio --direct=1 --iodepth=8 --verify=crc32c")
PREP = f"fio {_R} --do_verify=0"
FIO = (
    "fio --verify_fatal=1 --group_reporting "
    "--name=w --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --ioengine=libaio "
    "--direct=1 --iodepth=8 --verify=crc32c --do_verify=1 --verify_backlog=32 --loops=4 "
    f"{_R} --verify_only --loops=40"
)


def _migrate(src: Guest, dst: Guest, path: Path, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while not path.exists():  # the destination listens once it has set its devices up
        assert dst.is_running(), f"destination QEMU exited: {dst.qemu_stderr()}"
        assert time.monotonic() < deadline, "destination QEMU never listened for the guest"
        time.sleep(0.1)
    src.qmp("migrate", {"uri": f"unix:{path}"})
    deadline = time.monotonic() + timeout
    while True:
        info = src.qmp("query-migrate")
        if info.get("status") == "completed":
            return info
        if info.get("status") in ("failed", "cancelled"):
            raise AssertionError(f"migration {info.get('status')}: {info}")
        if time.monotonic() > deadline:
            raise AssertionError(f"migration did not complete in {timeout} s: {info}")
        time.sleep(0.2)


def test_live_migration_there_and_back_during_fio_verify(tmp_path: Path, guest_image) -> None:
    _migrate_during_fio(tmp_path, guest_image, log_dirty_pages=True)


def test_migration_without_dirty_logging_corrupts_the_guest(tmp_path: Path,
                                                             guest_image) -> None:
    """The same with the backend's dirty log switched off (test-only): the destination gets
    stale guest pages, and fio fails or hangs.  This is what the first test guards against."""
    _migrate_during_fio(tmp_path, guest_image, log_dirty_pages=False)


def _migrate_during_fio(tmp_path: Path, guest_image, log_dirty_pages: bool) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    socks = {n: tmp_path / f"{n}.sock" for n in ("a", "b")}
    args = ["--object", "iothread,id=io0",
            "--blockdev", f"driver=file,node-name=disk0,filename={img},aio=io_uring"]
    for n, s in socks.items():
        args += ["--export", f"type=vhost-user-blk,id={n},node-name=disk0,addr.type=unix,"
                             f"addr.path={s},writable=on,num-queues=2,share-rw=on,iothread=io0"]
    timings: list[tuple[float, int]] = []
    env = {} if log_dirty_pages else {"PYVHOST_BLK_X_NO_DIRTY_LOG": "1"}
    with DaemonProcess(args, tmp_path, env=env) as d:
        src = Guest(socks["a"], num_queues=2, image=guest_image)
        dst = back = None
        try:
            src.run_ok(PREP, timeout=300)
            src.run_ok(f"({FIO} > /tmp/fio.out 2>&1; echo $? > /tmp/fio.rc) &")
            time.sleep(3)
            dst = Guest(socks["b"], num_queues=2, image=guest_image,
                        incoming=f"unix:{tmp_path / 'mig1'}")
            info = _migrate(src, dst, tmp_path / "mig1")
            timings.append((info["total-time"] / 1000, info.get("downtime", -1)))
            src.kill()
            assert dst.run("test -e /tmp/fio.out", timeout=60)[0] == 0  # the guest lives on
            time.sleep(3)
            back = Guest(socks["a"], num_queues=2, image=guest_image,
                         incoming=f"unix:{tmp_path / 'mig2'}")
            info = _migrate(dst, back, tmp_path / "mig2")
            timings.append((info["total-time"] / 1000, info.get("downtime", -1)))
            dst.kill()
            deadline = time.monotonic() + (600 if log_dirty_pages else 90)
            finished = False
            while time.monotonic() < deadline:
                status, _ = back.run("test -e /tmp/fio.rc", timeout=60)
                if status == 0:
                    finished = True
                    break
                time.sleep(2)
            out = back.run("cat /tmp/fio.out", timeout=60)[1]
            rc = back.run("cat /tmp/fio.rc", timeout=60)[1].strip() if finished else "hung"
            ok = rc == "0" and "err= 0" in out and "verify:" not in out.lower()
            if not log_dirty_pages:
                assert not ok, "fio survived migration without dirty logging: the test is blind"
                return
            assert ok, (rc, out)
            assert back.poweroff() == 0
        finally:
            for g in (src, dst, back):
                if g is not None:
                    g.close()
        print("migrations (total s, downtime ms):",
              ", ".join(f"{t:.1f} s / {dt} ms" for t, dt in timings))
        assert d.terminate() == 0
