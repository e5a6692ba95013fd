"""End to end: a QEMU guest's fio verify on qcow2 images served by pyvhost-blk over
vhost-user-blk-pci — a new image (every first write allocates) and an overlay whose unwritten
clusters come from a backing file — with the file on Linux AIO + O_DIRECT (io_uring where
O_DIRECT is refused), so the allocated clusters take the C path (the driver's batch_io).
Afterwards ``qemu-img check`` finds no error and no leak, and the backing file is unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.guest import Guest

MIB = 1 << 20
SIZE = 64 * MIB
FIO_VERIFY = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --iodepth=16 "
    "--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1"
)
# A second pass over the same range: every cluster is allocated now, written in place.
FIO_REWRITE = FIO_VERIFY.replace("--name=v ", "--name=w ").replace("randwrite", "randrw")


def qemu_img(*args: str) -> str:
    exe = shutil.which("qemu-img")
    if exe is None:
        pytest.fail("qemu-img not found: apt-get install qemu-utils")
    p = subprocess.run([exe, *args], capture_output=True, text=True)
    assert p.returncode == 0, f"qemu-img {' '.join(args)}: {p.stdout}{p.stderr}"
    return p.stdout


def _direct_ok(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("kind", ["new", "overlay"])
def test_guest_fio_verify_on_qcow2_then_qemu_img_check(tmp_path: Path, guest_image,
                                                       kind: str) -> None:
    img, base = tmp_path / "disk.qcow2", tmp_path / "base.qcow2"
    if kind == "overlay":
        raw = tmp_path / "base.raw"
        raw.write_bytes(random.Random(5).randbytes(SIZE))
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(img))
        base_before = base.read_bytes()
    else:
        qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    aio = "aio=native,file.cache.direct=on" if _direct_ok(img) else "aio=io_uring"
    sock = tmp_path / "vhost.sock"
    args = [
        "--blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={img},"
                      f"file.{aio}",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=disk,addr.type=unix,"
                    f"addr.path={sock},writable=on,num-queues=1",
    ]
    with DaemonProcess(args, tmp_path) as d:
        with Guest(sock, num_queues=1, smp=1, image=guest_image) as g:
            assert g.run_ok("cat /sys/block/vda/size").strip() == str(SIZE // 512)
            if kind == "overlay":  # the guest reads the backing file's data through it
                got = g.run_ok("dd if=/dev/vda bs=4096 skip=16000 count=1 2>/dev/null "
                               "| md5sum").split()[0]
                want = hashlib.md5(raw.read_bytes()[16000 * 4096:16001 * 4096]).hexdigest()
                assert got == want
            for cmd in (FIO_VERIFY, FIO_REWRITE):
                status, out = g.run(cmd, timeout=900)
                assert status == 0, out
                assert "err= 0" in out and "verify:" not in out.lower(), out
            g.run_ok("sync")
            assert g.poweroff() == 0
        e = d.stats()["exports"]["exp0"]
        assert e["blockstats"]["wr_operations"] >= 8192
        assert e["blockstats"]["failed_rd_operations"] == 0
        assert e["blockstats"]["failed_wr_operations"] == 0
        assert "Traceback" not in d.log()
        assert d.terminate() == 0, d.log()
    r = json.loads(qemu_img("check", "--output=json", str(img)))
    assert not r.get("corruptions") and not r.get("leaks") and not r.get("check-errors"), r
    if kind == "overlay":
        assert base.read_bytes() == base_before
        qemu_img("check", str(base))
