"""Smoke test of the e2e guest harness against qemu-storage-daemon.

Proves that the test guest boots with a vhost-user-blk disk (2 queues), that
fio with verification passes, and that data written in the guest reaches the
image file.  Needs QEMU, qemu-storage-daemon and the guest build tools; their
absence is a failure, not a skip (run scripts/install-deps.sh).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.guest import INSTALL_HINT, Guest, GuestError, build_guest, qemu_binary

IMAGE_SIZE = 256 * 1024 * 1024
PATTERN_OFFSET = 100 * 1024 * 1024  # bytes; 4 KiB aligned
PATTERN_BYTE = 0xA5


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not found; {INSTALL_HINT}", pytrace=False)
    return path


@contextlib.contextmanager
def qsd_export(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A raw image served by qemu-storage-daemon as vhost-user-blk, 2 queues.

    (A context manager called from the test, not a fixture, so that missing
    tools make the test FAIL rather than ERROR in setup.)
    """
    qemu_img = _require("qemu-img")
    qsd = _require("qemu-storage-daemon")
    img = tmp_path / "disk.raw"
    sock = tmp_path / "vhost-user-blk.sock"
    subprocess.run([qemu_img, "create", "-q", "-f", "raw", str(img), str(IMAGE_SIZE)], check=True)
    log = tmp_path / "qsd.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [
                qsd,
                "--blockdev",
                f"driver=file,node-name=disk0,filename={img},cache.direct=off",
                "--export",
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                f"addr.path={sock},writable=on,num-queues=2",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"qemu-storage-daemon exited ({proc.returncode}):\n"
                    f"{log.read_text(errors='replace')}"
                )
            if time.monotonic() > deadline:
                pytest.fail("qemu-storage-daemon did not create its socket within 30 s")
            time.sleep(0.05)
        yield img, sock
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_guest_boots_and_runs_fio_on_qsd(tmp_path: Path) -> None:
    _require("qemu-storage-daemon")
    _require("qemu-img")
    try:
        qemu_binary()
        image = build_guest()
    except GuestError as exc:  # carries the install hint
        pytest.fail(str(exc), pytrace=False)

    with qsd_export(tmp_path) as (img, sock), Guest(sock, num_queues=2, smp=2, image=image) as g:
        status, out = g.run("cat /sys/block/vda/size")
        assert status == 0, out
        assert out.strip() == str(IMAGE_SIZE // 512)

        status, out = g.run("ls /sys/block/vda/mq | wc -l")
        assert status == 0, out
        assert out.strip() == "2"

        status, out = g.run(
            "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=64M "
            "--iodepth=16 --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 "
            "--verify_fatal=1",
            timeout=300,
        )
        assert status == 0, out
        assert "verify" not in out.lower(), out
        assert "err= 0" in out, out

        # 4 KiB of a known pattern at a known offset, bypassing the page cache.
        status, out = g.run(
            f"head -c 4096 /dev/zero | tr '\\000' '\\{PATTERN_BYTE:03o}' > /tmp/pat && "
            f"dd if=/tmp/pat of=/dev/vda bs=4096 seek={PATTERN_OFFSET // 4096} count=1 "
            "oflag=direct conv=fsync && "
            f"dd if=/dev/vda bs=4096 skip={PATTERN_OFFSET // 4096} count=1 iflag=direct "
            "2>/dev/null | cmp - /tmp/pat"
        )
        assert status == 0, out

        assert g.poweroff() == 0

    with open(img, "rb") as f:
        f.seek(PATTERN_OFFSET)
        data = f.read(4096)
    assert data == bytes([PATTERN_BYTE]) * 4096
    assert os.path.getsize(img) == IMAGE_SIZE
