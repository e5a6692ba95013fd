"""ImageLock against the real QEMU 7.2 tools: each side sees the other's locks.

The expected texts are what QEMU 7.2 prints (captured from the installed binaries).  Missing
tools make the tests FAIL, not skip (run scripts/install-deps.sh).  Every subprocess has a
timeout; background QEMU processes are stopped in ``finally``.
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

from blocklayer.file_lock import (
    LOCK_PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_WRITE,
    ImageLock,
    ImageLockError,
)

CR, W, ALL = PERM_CONSISTENT_READ, PERM_WRITE, LOCK_PERM_ALL
NO_W = ALL & ~W
TIMEOUT = 30.0


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not found: run scripts/install-deps.sh", pytrace=False)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_require(args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


@pytest.fixture
def img(tmp_path: Path) -> str:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(16 << 20)
    return str(p)


@contextlib.contextmanager
def our_lock(path: str, perm: int, shared: int, flags: int = os.O_RDWR) -> Iterator[ImageLock]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        lk = ImageLock(fd, path)
        lk.check_and_apply(perm, shared)
        yield lk
    finally:
        os.close(fd)


def _stop(p: subprocess.Popen[str]) -> str:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)
    return p.stderr.read() if p.stderr else ""


@contextlib.contextmanager
def background(args: list[str], ready: Path) -> Iterator[subprocess.Popen[str]]:
    """Run ``args``; wait until ``ready`` exists (or the process exited); stop it at the end."""
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists() and p.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{args[0]} did not get ready: {_stop(p)}")
            time.sleep(0.02)
        yield p
    finally:
        _stop(p)


def qsd_args(tmp_path: Path, img: str, writable: bool = True) -> tuple[list[str], str, Path]:
    """qemu-storage-daemon exporting ``img``; returns (argv, the --export value, pidfile)."""
    export = (f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
              f"addr.path={tmp_path / 'vu.sock'},writable={'on' if writable else 'off'}")
    pidfile = tmp_path / "qsd.pid"
    argv = [_require("qemu-storage-daemon"),
            "--blockdev", f"driver=file,node-name=disk0,filename={img}",
            "--export", export, "--pidfile", str(pidfile)]
    return argv, export, pidfile


@contextlib.contextmanager
def qsd_export(tmp_path: Path, img: str, writable: bool = True) -> Iterator[None]:
    argv, _, pidfile = qsd_args(tmp_path, img, writable)
    with background(argv, pidfile) as p:  # qsd writes the pidfile after creating the export
        assert p.poll() is None, _stop(p)
        yield


def hint(path: str) -> str:
    return f"Is another process using the image [{path}]?\n"


# -- QEMU tools against our lock ------------------------------------------------------------
def test_qemu_io_write_refused_while_we_hold(img: str) -> None:
    with our_lock(img, CR | W, NO_W):  # what a guest device without share-rw holds
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", img)
        assert r.returncode == 1, r
        assert r.stderr == (f"qemu-io: can't open device {img}: Failed to get \"write\" lock\n"
                            + hint(img))
        # a reader sharing everything is welcome
        r = run("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", img)
        assert r.returncode == 0, r
    with open(img, "rb") as f:
        assert f.read(4096) == bytes(4096)  # the refused write did not happen
    r = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", img)  # released: now it can
    assert r.returncode == 0, r


def test_qemu_img_info_while_we_hold(img: str) -> None:
    """On a raw image ``qemu-img info`` asks for no permission at all (BDRV_O_NO_IO: perm 0,
    shares everything), so QEMU takes and checks no lock byte: it works with or without -U."""
    with our_lock(img, CR | W, NO_W):
        for args in (["-U"], []):
            r = run("qemu-img", "info", *args, img)
            assert r.returncode == 0, r
            assert "file format: raw" in r.stdout


def test_qemu_img_info_qcow2_while_we_hold(tmp_path: Path) -> None:
    """A qcow2 node does not share write on its file: without -U qemu-img info then fails."""
    q = str(tmp_path / "disk.qcow2")
    r = run("qemu-img", "create", "-q", "-f", "qcow2", q, "16M")
    assert r.returncode == 0, r
    with our_lock(q, CR | W, ALL):  # a writer, even one sharing everything
        r = run("qemu-img", "info", q)
        assert r.returncode == 1, r
        assert r.stderr == (f"qemu-img: Could not open '{q}': Failed to get shared \"write\" "
                            f"lock\n" + hint(q))
        r = run("qemu-img", "info", "-U", q)
        assert r.returncode == 0 and "file format: qcow2" in r.stdout, r


def test_qsd_refused_while_we_hold(tmp_path: Path, img: str) -> None:
    """qsd reports the error at startup through &error_fatal: the hint line is lost."""
    argv, export, _ = qsd_args(tmp_path, img)
    with our_lock(img, CR | W, NO_W):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                           stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r
    assert r.stderr == f"qemu-storage-daemon: --export {export}: Failed to get \"write\" lock\n"


def test_qsd_next_to_our_share_rw_writer(tmp_path: Path, img: str) -> None:
    with our_lock(img, CR | W, ALL), qsd_export(tmp_path, img):
        pass


# -- our lock against QEMU tools ------------------------------------------------------------
def test_we_are_refused_while_qsd_exports(tmp_path: Path, img: str) -> None:
    """qsd's export holds consistent read + write and shares everything, so wanting write is
    fine -- it is *not sharing* write that conflicts with qsd's byte 101."""
    with qsd_export(tmp_path, img):
        fd = os.open(img, os.O_RDWR | os.O_CLOEXEC)
        try:
            lk = ImageLock(fd, img)
            with pytest.raises(ImageLockError) as ei:
                lk.check_and_apply(CR | W, NO_W)
            assert str(ei.value) == 'Failed to get shared "write" lock'
            assert ei.value.hint + "\n" == hint(img)
            assert lk.held == (0, ALL) and lk.locked == (0, 0)
            # share-rw: two writers that share write coexist, with qsd and with each other
            lk.check_and_apply(CR | W, ALL)
            with our_lock(img, CR | W, ALL):
                pass
        finally:
            os.close(fd)


def test_we_are_refused_while_qemu_io_writes(img: str) -> None:
    """qemu-io (raw) holds consistent read + write and shares everything, like qsd."""
    p = subprocess.Popen([_require("qemu-io"), "-f", "raw", "-c", "sleep 60000", img],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock_byte(img, 101, p)
        with pytest.raises(ImageLockError, match='^Failed to get shared "write" lock$'):
            with our_lock(img, CR, ALL & ~W, os.O_RDONLY):
                pass
        with our_lock(img, CR | W, ALL):
            pass
    finally:
        _stop(p)


def _wait_for_lock_byte(path: str, byte: int, p: subprocess.Popen[str]) -> None:
    """Wait until process ``p`` holds a lock on ``byte`` of ``path`` (its /proc fdinfo)."""
    ino = os.stat(path).st_ino
    deadline = time.monotonic() + TIMEOUT
    while True:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p.pid}/fdinfo"):
                with open(f"/proc/{p.pid}/fdinfo/{fd}") as f:
                    for line in f:
                        fields = line.split()
                        if (fields[:1] == ["lock:"] and fields[6].endswith(f":{ino}")
                                and int(fields[7]) <= byte <= int(fields[8])):
                            return
        if p.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"lock byte {byte} never taken: {_stop(p)}")
        time.sleep(0.02)


# -- a QEMU guest device, the real neighbour of a vhost-user-blk daemon -----------------------
def _qemu_device(img: str, extra: str) -> list[str]:
    return [_require("qemu-system-x86_64"), "-M", "q35", "-accel", "tcg", "-S", "-display",
            "none", "-nodefaults", "-blockdev", f"driver=file,node-name=d,filename={img}",
            "-device", f"virtio-blk-pci,drive=d{extra}"]


def test_qemu_device_against_our_lock(tmp_path: Path, img: str) -> None:
    """A writable virtio-blk device holds consistent read + write and does not share write
    unless share-rw=on; a device is refused next to our (CR|W, all but W)."""
    with our_lock(img, CR | W, NO_W):
        r = subprocess.run(_qemu_device(img, ",share-rw=on"), capture_output=True, text=True,
                           timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert r.returncode == 1, r
        assert r.stderr == ("qemu-system-x86_64: -device virtio-blk-pci,drive=d,share-rw=on: "
                            "Failed to get \"write\" lock\n" + hint(img))
    with our_lock(img, CR | W, ALL):  # our share-rw writer next to a share-rw device
        p = subprocess.Popen(_qemu_device(img, ",share-rw=on"), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_lock_byte(img, 101, p)
            time.sleep(0.3)
            assert p.poll() is None, _stop(p)
        finally:
            _stop(p)
