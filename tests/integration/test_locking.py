"""Image locking between pyvhost-blk and QEMU's own tools, through real processes.

A writable pyvhost-blk export takes the permissions a QEMU guest device takes and does not
share WRITE (unless ``share-rw=on``): QEMU's tools, qemu-storage-daemon and a second
pyvhost-blk are refused a writable open, with QEMU's lock messages.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess, qsd_cmd

IMG_SIZE = 64 << 20


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: run scripts/install-deps.sh", pytrace=False)
    return path


def _args(img: Path, sock: Path, extra: str = "") -> list[str]:
    return [
        "--blockdev", f"driver=file,node-name=disk0,filename={img}",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                    f"addr.path={sock},writable=on{extra}",
    ]


@pytest.fixture
def img(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(IMG_SIZE)
    return p


def test_writable_export_refuses_other_writers(tmp_path: Path, img: Path) -> None:
    qemu_io, qemu_img = _tool("qemu-io"), _tool("qemu-img")
    with DaemonProcess(_args(img, tmp_path / "a.sock"), tmp_path) as d:
        r = subprocess.run([qemu_io, "-f", "raw", "-c", "write 0 4k", str(img)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        assert 'Failed to get "write" lock' in r.stderr, r.stderr
        r = subprocess.run([qemu_img, "info", "-U", str(img)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0 and "virtual size: 64 MiB" in r.stdout, r.stderr
        # A second pyvhost-blk, writable, on the same image: one clear line, exit 1.
        second = subprocess.run(["pyvhost-blk", *_args(img, tmp_path / "b.sock")],
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "lock" in lines[0], second.stderr
        assert not (tmp_path / "b.sock").exists()
        # qemu-storage-daemon exporting it writable is refused as well.
        q = subprocess.run(
            [*qsd_cmd(), *_args(img, tmp_path / "q.sock")], capture_output=True, text=True,
            timeout=30,
        )
        assert q.returncode != 0 and "lock" in q.stderr, q.stderr
        assert d.terminate() == 0
    # Once we are gone, the image is free again.
    r = subprocess.run([qemu_io, "-f", "raw", "-c", "write 0 4k", str(img)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_we_refuse_an_image_qsd_exports_writable(tmp_path: Path, img: Path) -> None:
    with DaemonProcess(_args(img, tmp_path / "q.sock"), tmp_path, cmd=qsd_cmd()) as q:
        r = subprocess.run(["pyvhost-blk", *_args(img, tmp_path / "a.sock")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 1
        assert 'Failed to get shared "write" lock' in r.stderr, r.stderr
        q.terminate()


def test_share_rw_lets_two_of_ours_share(tmp_path: Path, img: Path) -> None:
    with DaemonProcess(_args(img, tmp_path / "a.sock", ",share-rw=on"), tmp_path) as a, \
            DaemonProcess(_args(img, tmp_path / "b.sock", ",share-rw=on"), tmp_path) as b:
        assert a.terminate() == 0 and b.terminate() == 0


@pytest.mark.parametrize("share_rw", [False, True])
def test_read_only_export_and_writers(tmp_path: Path, img: Path, share_rw: bool) -> None:
    """Like a read-only QEMU guest device: a read-only export still does not share WRITE
    (its guest caches what it read), unless share-rw=on."""
    qemu_io = _tool("qemu-io")
    args = ["--blockdev", f"driver=file,node-name=disk0,filename={img},read-only=on",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                        f"addr.path={tmp_path / 'a.sock'}" + (",share-rw=on" if share_rw else "")]
    with DaemonProcess(args, tmp_path) as d:
        r = subprocess.run([qemu_io, "-f", "raw", "-c", "write 0 4k", str(img)],
                           capture_output=True, text=True, timeout=30)
        if share_rw:
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, r.stderr
        r = subprocess.run([qemu_io, "-r", "-f", "raw", "-c", "read 0 4k", str(img)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert d.terminate() == 0
