"""qcow2 through the real daemon, checked by QEMU's tools: images made by qemu-img (cluster
sizes, compat 0.10 and 1.1, with a backing file, compressed by ``qemu-img convert -c``) are
written by the libblkio client's verify run; afterwards ``qemu-img check`` finds no error and
``qemu-img compare`` says the image equals a raw image the same run wrote.  SIGKILL during
allocating writes leaves images ``qemu-img check`` accepts (leaks allowed).  Bad images make
the daemon refuse to start with one clear line."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess, blkio_client, run_client
from tests.qemu_tools import qemu_img

MIB = 1 << 20
SIZE = 64 * MIB


def check_image(path: Path, leaks_ok: bool = False) -> dict:
    deadline = time.monotonic() + 10
    while True:
        p = qemu_img("check", "--output=json", str(path), check=False)
        # A killed process's io_uring lets go of its files (and their OFD locks) in a kernel
        # worker, a moment after the process is gone.
        if "lock" not in p.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    # 0: clean; 3: leaks only (allowed after a crash); anything else is corruption.
    r = json.loads(p.stdout) if p.stdout.strip() else {}
    assert p.returncode in ((0, 3) if leaks_ok else (0,)), (p.returncode, p.stdout, p.stderr)
    assert r.get("corruptions", 0) == 0 and r.get("check-errors", 0) == 0, r
    return r


def _args(tmp_path: Path, blockdev: str) -> list[str]:
    return ["--blockdev", blockdev,
            "--export", f"type=vhost-user-blk,id=exp0,node-name=top,addr.type=unix,"
                        f"addr.path={tmp_path / 'vhost.sock'},writable=on,num-queues=2"]


def _qcow2(path: Path, aio: str = "threads") -> str:
    """aio=io_uring / native: the driver's batch_io hands allocated clusters to the C engines
    (native: Linux AIO with O_DIRECT)."""
    extra = {"threads": "", "io_uring": ",file.aio=io_uring",
             "native": ",file.aio=native,file.cache.direct=on"}[aio]
    return f"driver=qcow2,node-name=top,file.driver=file,file.filename={path}{extra}"


def _raw(path: Path) -> str:
    return f"driver=file,node-name=top,filename={path}"


def _verify(tmp_path: Path, blockdev: str, seed: int = 3, blocks: int = 1500) -> None:
    with DaemonProcess(_args(tmp_path, blockdev), tmp_path) as d:
        rc, out, err = run_client(str(tmp_path / "vhost.sock"), "--mode", "verify",
                                  "--queues", "2", "--blocks", str(blocks), "--seed",
                                  str(seed))
        assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
        assert d.terminate() == 0, d.log()


def _identical(a: Path, b: Path) -> None:
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(a), str(b), check=False)
    assert p.returncode == 0 and "Images are identical" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize("opts,aio", [("cluster_size=4k,compat=1.1", "threads"),
                                      ("cluster_size=4k,compat=1.1", "io_uring"),
                                      ("cluster_size=64k,compat=0.10", "threads"),
                                      ("cluster_size=64k,compat=0.10", "native"),
                                      ("cluster_size=2M,compat=1.1", "io_uring"),
                                      ("cluster_size=64k,extended_l2=on", "threads"),
                                      ("cluster_size=64k,extended_l2=on", "native")])
def test_written_image_checks_clean_and_equals_raw(tmp_path: Path, opts: str,
                                                   aio: str) -> None:
    img, raw = tmp_path / "d.qcow2", tmp_path / "d.raw"
    qemu_img("create", "-q", "-f", "qcow2", "-o", opts, str(img), str(SIZE))
    with open(raw, "wb") as f:
        f.truncate(SIZE)
    _verify(tmp_path, _qcow2(img, aio))
    _verify(tmp_path, _qcow2(img, aio), seed=4)  # again: now mostly in place
    _verify(tmp_path, _raw(raw))
    _verify(tmp_path, _raw(raw), seed=4)
    check_image(img)
    _identical(img, raw)


@pytest.mark.parametrize("aio", ["threads", "io_uring"])
def test_overlay_on_a_backing_file(tmp_path: Path, aio: str) -> None:
    base, top, raw = tmp_path / "base.qcow2", tmp_path / "top.qcow2", tmp_path / "exp.raw"
    data = random.Random(2).randbytes(8 * MIB) * (SIZE // (8 * MIB))
    (tmp_path / "base.raw").write_bytes(data)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(tmp_path / "base.raw"), str(base))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top))
    raw.write_bytes(data)
    _verify(tmp_path, _qcow2(top, aio))
    _verify(tmp_path, _raw(raw))
    check_image(top)
    check_image(base)
    _identical(top, raw)
    _identical(base, tmp_path / "base.raw")  # the base was never written


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_image(tmp_path: Path, ctype: str) -> None:
    src, img, raw = tmp_path / "src.raw", tmp_path / "c.qcow2", tmp_path / "exp.raw"
    rng = random.Random(4)
    data = b"".join(bytes([rng.randrange(8)]) * 3000 + rng.randbytes(1096)
                    for _ in range(SIZE // 4096))
    src.write_bytes(data)
    raw.write_bytes(data)
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}",
             str(src), str(img))
    _verify(tmp_path, _qcow2(img))
    _verify(tmp_path, _raw(raw))
    check_image(img)
    _identical(img, raw)


@pytest.mark.parametrize("aio", ["threads", "io_uring"])
def test_sigkill_during_allocating_writes_never_corrupts(tmp_path: Path, aio: str) -> None:
    img = tmp_path / "k.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(img), str(SIZE))
    grew = []
    for round_ in range(4):
        d = DaemonProcess(_args(tmp_path, _qcow2(img, aio)), tmp_path)
        client = subprocess.Popen(
            [str(blkio_client()), "--socket", str(tmp_path / "vhost.sock"), "--mode", "bench",
             "--rw", "randwrite", "--queues", "2", "--iodepth", "32", "--runtime", "5",
             "--seed", str(round_ + 1)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        size = img.stat().st_size
        time.sleep(1.0 + 0.3 * round_)
        assert d.proc.poll() is None, d.log()
        d.proc.kill()  # SIGKILL, in the middle of allocating writes
        d.close()
        client.kill()
        client.wait()
        grew.append(img.stat().st_size > size)
        check_image(img, leaks_ok=True)
    assert all(grew), "the daemon was not allocating when it was killed"
    # Still a working image: a full verify run, then a clean check (leaks from the kills
    # remain, and are all qemu-img check may report).
    _verify(tmp_path, _qcow2(img, aio), seed=11, blocks=500)
    check_image(img, leaks_ok=True)


@pytest.mark.parametrize("what,match", [
    ("l1", "L1 table offset"),
    ("magic", "Image is not in qcow2 format"),
    ("feature", "Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000000"),
])
def test_daemon_refuses_bad_images_with_one_line(tmp_path: Path, what: str, match: str) -> None:
    img = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE))
    with open(img, "r+b") as f:
        if what == "l1":
            f.seek(40)
            f.write(struct.pack(">Q", 1 << 40))
        elif what == "magic":
            f.write(b"QFI\0")
        else:
            f.seek(72)
            f.write(struct.pack(">Q", 1 << 40))
    with pytest.raises(RuntimeError) as e:
        DaemonProcess(_args(tmp_path, _qcow2(img)), tmp_path)
    lines = [ln for ln in str(e.value).splitlines()[1:] if ln.strip()]
    assert len(lines) == 1 and match in lines[0], str(e.value)
