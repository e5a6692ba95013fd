"""The qcow2 driver in-process, against images made and checked by QEMU's own tools: reads of
what qemu-io wrote (several cluster sizes, v2 and v3, backing files, compressed and extended-L2
images), writes that qemu-img check accepts and qemu-io reads back, write-zeroes/discard,
concurrent allocating writes, refcount-table growth, resize, small caches, and bad images
refused at open with one line."""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocklayer import bdrv
from blocklayer.bdrv import BlockDriverError, bdrv_truncate, bdrv_unref
from blocklayer.block_backend import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    blk_aio_pdiscard,
    blk_aio_preadv,
    blk_aio_pwrite_zeroes,
    blk_aio_pwritev,
    blk_getlength,
    blk_insert_bs,
    blk_new,
    blk_unref,
)
from blocklayer.blockdev import blockdev_add
from blocklayer.iov import IOVector
from blocklayer.qcow2.compress import zstd_available
from tests.unit.conftest import run_until, unique

KIB, MIB = 1 << 10, 1 << 20
INSTALL = "install QEMU's tools: 'apt-get install qemu-utils' (qemu-img, qemu-io)"


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} not found: {INSTALL}")
    return exe


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([_tool("qemu-img"), *args], capture_output=True, text=True)
    if check and p.returncode:
        raise AssertionError(f"qemu-img {' '.join(args)}: {p.stdout}{p.stderr}")
    return p


def qemu_io(path: str, *cmds: str, fmt: str = "qcow2") -> str:
    args = [_tool("qemu-io"), "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run([*args, path], capture_output=True, text=True)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "Pattern verification failed" not in out and \
        "error" not in out.lower(), out
    return out


def check_clean(path: str) -> None:
    p = qemu_img("check", "--output=json", path, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    import json

    r = json.loads(p.stdout)
    assert r.get("corruptions", 0) == 0 and r.get("leaks", 0) == 0 and \
        r.get("check-errors", 0) == 0, r


def create(path: Path, size: str = "64M", **o: str) -> str:
    opts = ",".join(f"{k.replace('_', '_')}={v}" for k, v in o.items())
    qemu_img("create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), str(path), size)
    return str(path)


@pytest.fixture
def q(main_ctx) -> Iterator:
    """q(path, **opts) -> BlockBackend on a qcow2 node over the file; everything is closed
    (metadata written back) at the end of the test, or by q.close()."""
    blks: list = []
    nodes: list = []

    def open_(path: str, writable: bool = True, **opts):
        tree = {"driver": "qcow2", "node-name": unique("q"),
                "file": {"driver": "file", "filename": path}, **opts}
        if not writable:
            tree["read-only"] = True
        bs = blockdev_add(tree, from_json=True)
        nodes.append(bs)
        perm = BLK_PERM_CONSISTENT_READ | (BLK_PERM_WRITE | BLK_PERM_RESIZE if writable else 0)
        blk = blk_new(main_ctx, perm, BLK_PERM_ALL)
        blk_insert_bs(blk, bs)
        blks.append(blk)
        return blk

    def close() -> None:
        for b in blks:
            while b.refcnt > 0:
                blk_unref(b)
        for bs in reversed(nodes):
            if bdrv._nodes.get(bs.node_name) is bs:
                bdrv_unref(bs)
        blks.clear()
        nodes.clear()

    open_.close = close  # type: ignore[attr-defined]
    yield open_
    close()


def _wait(submit) -> int:
    rets: list[int] = []
    submit(rets.append)
    run_until(lambda: rets, timeout=30)
    return rets[0]


def read(blk, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    assert _wait(lambda cb: blk_aio_preadv(blk, offset, IOVector.from_buffers([buf]), 0,
                                           cb)) == 0
    return bytes(buf)


def write(blk, offset: int, data: bytes, flags: int = 0) -> None:
    buf = bytearray(data)
    assert _wait(lambda cb: blk_aio_pwritev(blk, offset, IOVector.from_buffers([buf]), flags,
                                            cb)) == 0


def flush(blk) -> None:
    from blocklayer.block_backend import blk_aio_flush

    assert _wait(lambda cb: blk_aio_flush(blk, cb)) == 0


# -- reading what QEMU wrote ----------------------------------------------------------------
@pytest.mark.parametrize("cluster", ["512", "4K", "64K", "2M"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_reads_what_qemu_io_wrote(q, tmp_path, cluster, compat) -> None:
    p = create(tmp_path / "a.qcow2", cluster_size=cluster, compat=compat)
    qemu_io(p, "write -P 0x11 0 3k", "write -P 0x22 1M 130k", "write -z 1040k 8k",
            "write -P 0x33 63M 1M")
    blk = q(p, writable=False)
    assert blk_getlength(blk) == 64 * MIB
    assert read(blk, 0, 4096) == b"\x11" * 3072 + bytes(1024)
    got = read(blk, MIB - 512, 140 * KIB)
    want = bytes(512) + b"\x22" * (16 * KIB) + bytes(8 * KIB) + b"\x22" * (106 * KIB) + \
        bytes(140 * KIB - 512 - 130 * KIB)
    assert got == want
    assert read(blk, 63 * MIB - 4096, MIB + 4096) == bytes(4096) + b"\x33" * MIB


@pytest.mark.parametrize("cluster", ["4K", "64K", "1M"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_writes_pass_qemu_img_check_and_read_back_in_qemu_io(q, tmp_path, cluster,
                                                              compat) -> None:
    p = create(tmp_path / "a.qcow2", "32M", cluster_size=cluster, compat=compat)
    qemu_io(p, "write -P 0x5a 0 256k")
    blk = q(p)
    write(blk, 512, b"\xa1" * 1024)  # inside an allocated cluster: in place
    write(blk, 3 * MIB + 512, b"\xa2" * 4096)  # partial new cluster: COW of zeroes
    write(blk, 8 * MIB, b"\xa3" * (3 * MIB))  # many new clusters in one request
    write(blk, 32 * MIB - 4096, b"\xa4" * 4096)  # the last cluster
    flush(blk)
    assert read(blk, 0, 2048) == b"\x5a" * 512 + b"\xa1" * 1024 + b"\x5a" * 512
    q.close()
    check_clean(p)
    qemu_io(p, "read -P 0x5a 0 512", "read -P 0xa1 512 1k", "read -P 0x5a 1536 254k",
            f"read -P 0 {3 * MIB} 512", f"read -P 0xa2 {3 * MIB + 512} 4k",
            f"read -P 0 {3 * MIB + 4608} 4k", f"read -P 0xa3 {8 * MIB} 3M",
            f"read -P 0xa4 {32 * MIB - 4096} 4k")


def test_backing_file_reads_and_cow(q, tmp_path) -> None:
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.write(bytes(range(256)) * (4 * MIB // 256))
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top, "8M")
    blk = q(top)
    base_data = open(base, "rb").read()
    assert read(blk, 1000, 5000) == base_data[1000:6000]
    assert read(blk, 4 * MIB - 100, 200) == base_data[-100:] + bytes(100)  # past the base
    write(blk, 65 * KIB, b"\xee" * 100)  # partial cluster: the rest comes from the base
    flush(blk)
    want = bytearray(base_data[:128 * KIB])
    want[65 * KIB:65 * KIB + 100] = b"\xee" * 100
    assert read(blk, 0, 128 * KIB) == want
    q.close()
    check_clean(top)
    # What QEMU sees: the overlay's data merged with the base.
    out = str(tmp_path / "out.raw")
    qemu_img("convert", "-O", "raw", top, out)
    assert open(out, "rb").read()[:128 * KIB] == want


def test_backing_chain_of_qcow2_images_opened_read_only(q, tmp_path) -> None:
    base = create(tmp_path / "base.qcow2", "8M")
    qemu_io(base, "write -P 0x42 0 1M")
    mid = str(tmp_path / "mid.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qemu_io(mid, "write -P 0x43 512k 64k")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    head = open(top, "rb").read(4096)  # drop the backing-format extension: probe it
    _patch(top, head.index(b"\xe2\x79\x2a\xca"), b"\x12\x34\x56\x78")
    blk = q(top)
    bs = blk.root
    assert read(blk, 0, 4096) == b"\x42" * 4096
    assert read(blk, 512 * KIB, 4096) == b"\x43" * 4096
    write(blk, 512 * KIB + 4096, b"\x44" * 512)
    assert read(blk, 512 * KIB, 8192) == b"\x43" * 4096 + b"\x44" * 512 + b"\x43" * 3584
    if bs is not None:
        mid_bs = bs.children["backing"].bs
        assert mid_bs.read_only and mid_bs.drv.format_name == "qcow2"
        assert mid_bs.children["backing"].bs.read_only
    q.close()
    check_clean(top)
    check_clean(mid)
    qemu_io(base, "read -P 0x42 0 1M")


def test_backing_given_as_a_node(q, tmp_path, main_ctx) -> None:
    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -P 0x61 0 64k")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    other = create(tmp_path / "other.qcow2", "4M")
    qemu_io(other, "write -P 0x62 0 64k")
    name = unique("base")
    node = blockdev_add({"driver": "qcow2", "node-name": name, "read-only": True,
                        "file": {"driver": "file", "filename": other}}, from_json=True)
    try:
        blk = q(top, backing=name)
        assert read(blk, 0, 512) == b"\x62" * 512  # the node, not the header's file
        q.close()
    finally:
        bdrv_unref(node)


def test_backing_null_means_no_backing(q, tmp_path) -> None:
    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -P 0x61 0 64k")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    blk = q(top, backing=None)
    assert read(blk, 0, 512) == bytes(512)


@pytest.mark.parametrize("ctype", ["zlib", "zstd"])
def test_compressed_clusters(q, tmp_path, ctype) -> None:
    if ctype == "zstd" and not zstd_available():
        pytest.fail("libzstd.so.1 missing: apt-get install libzstd1")
    raw = str(tmp_path / "src.raw")
    rng = random.Random(5)
    data = bytearray(4 * MIB)
    for i in range(0, len(data), 4096):  # compressible, but not trivially
        data[i:i + 4096] = bytes([rng.randrange(4)]) * 2048 + rng.randbytes(16) * 128
    open(raw, "wb").write(data)
    img = str(tmp_path / "c.qcow2")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
             f"compression_type={ctype},cluster_size=64k", raw, img)
    blk = q(img)
    assert read(blk, 0, 4 * MIB) == data
    assert read(blk, 12345, 70000) == data[12345:12345 + 70000]
    write(blk, 100 * KIB, b"\xfe" * 1000)  # over a compressed cluster: decompress, COW
    data[100 * KIB:100 * KIB + 1000] = b"\xfe" * 1000
    flush(blk)
    assert read(blk, 64 * KIB, 128 * KIB) == data[64 * KIB:192 * KIB]
    q.close()
    check_clean(img)
    out = str(tmp_path / "out.raw")
    qemu_img("convert", "-O", "raw", img, out)
    assert open(out, "rb").read() == data


def test_extended_l2_subclusters(q, tmp_path) -> None:
    p = create(tmp_path / "e.qcow2", "16M", extended_l2="on", cluster_size="64K")
    qemu_io(p, "write -P 0x71 0 2k", "write -P 0x72 6k 2k", "write -z 8k 2k")
    blk = q(p)
    assert read(blk, 0, 12 * KIB) == b"\x71" * 2048 + bytes(4096) + b"\x72" * 2048 + \
        bytes(4096)
    write(blk, 2048, b"\x73" * 1024)  # an unallocated subcluster: the cluster is rewritten
    write(blk, 5 * MIB, b"\x74" * 512)
    flush(blk)
    q.close()
    check_clean(p)
    qemu_io(p, "read -P 0x71 0 2k", "read -P 0x73 2k 1k", "read -P 0 3k 3k",
            "read -P 0x72 6k 2k", "read -P 0 8k 56k", "read -P 0x74 5M 512")


def test_write_zeroes_and_discard(q, tmp_path) -> None:
    base = create(tmp_path / "base.qcow2", "8M")
    qemu_io(base, "write -P 0x81 0 8M")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 0x82 0 1M")
    blk = q(top, discard="unmap")
    assert _wait(lambda cb: blk_aio_pwrite_zeroes(blk, 64 * KIB, 192 * KIB, 0, cb)) == 0
    assert _wait(lambda cb: blk_aio_pwrite_zeroes(blk, 2 * MIB + 100, 200 * KIB, 0, cb)) == 0
    assert _wait(lambda cb: blk_aio_pdiscard(blk, 512 * KIB, 256 * KIB, cb)) == 0
    flush(blk)
    assert read(blk, 0, 64 * KIB) == b"\x82" * 65536
    assert read(blk, 64 * KIB, 192 * KIB) == bytes(192 * KIB)
    assert read(blk, 2 * MIB, 205000) == b"\x81" * 100 + bytes(200 * KIB) + b"\x81" * 100
    q.close()
    check_clean(top)
    qemu_io(top, "read -P 0x82 0 64k", "read -P 0 64k 192k", "read -P 0x82 256k 256k",
            f"read -P 0 {2 * MIB + 100} 200k", "read -P 0x81 4M 1M")


def test_many_concurrent_allocating_writes(q, tmp_path, main_ctx) -> None:
    p = create(tmp_path / "c.qcow2", "16M", cluster_size="4K")
    blk = q(p)
    model = bytearray(16 * MIB)
    rng = random.Random(1)
    rets: list[int] = []
    keep = []
    for i in range(300):  # overlapping sub-cluster writes, all in flight at once
        off = rng.randrange(0, 16 * MIB - 8192) // 512 * 512
        n = rng.randrange(1, 17) * 512
        data = bytearray(bytes([i % 251 + 1]) * n)
        keep.append(data)
        model[off:off + n] = data  # submitted in order; overlapping ones serialise
        blk_aio_pwritev(blk, off, IOVector.from_buffers([data]), 0, rets.append)
    run_until(lambda: len(rets) == 300, timeout=60)
    assert set(rets) == {0}
    flush(blk)
    got = read(blk, 0, 16 * MIB)
    # Overlapping writes in flight at once may land in either order (as on any disk);
    # where no two writes overlapped, the data is exact.
    covered = bytearray(16 * MIB)
    rng = random.Random(1)
    for _i in range(300):
        off = rng.randrange(0, 16 * MIB - 8192) // 512 * 512
        n = rng.randrange(1, 17) * 512
        for s in range(off // 512, (off + n) // 512):
            covered[s] += 1
    for s in range(16 * MIB // 512):
        if covered[s] <= 1:
            assert got[s * 512:(s + 1) * 512] == model[s * 512:(s + 1) * 512], s
    q.close()
    check_clean(p)


def test_refcount_table_grows(q, tmp_path) -> None:
    # 512-byte clusters: a refcount block covers 128 KiB and the first table 8 MiB.
    p = create(tmp_path / "g.qcow2", "32M", cluster_size="512")
    rt_before = struct.unpack_from(">QI", open(p, "rb").read(64), 48)
    blk = q(p)
    for i in range(0, 32 * MIB, 128 * KIB):
        write(blk, i, bytes([i // (128 * KIB) % 250 + 1]) * (96 * KIB))
    flush(blk)
    q.close()
    rt_after = struct.unpack_from(">QI", open(p, "rb").read(64), 48)
    assert rt_after != rt_before and rt_after[1] > rt_before[1]
    check_clean(p)
    qemu_io(p, "read -P 1 0 96k", f"read -P 6 {5 * 128 * KIB} 96k",
            f"read -P 6 {255 * 128 * KIB} 96k", f"read -P 0 {255 * 128 * KIB + 96 * KIB} 32k")


@pytest.mark.parametrize("bits", ["1", "8", "64"])
def test_refcount_widths(q, tmp_path, bits) -> None:
    p = create(tmp_path / "r.qcow2", "8M", refcount_bits=bits, cluster_size="4K")
    blk = q(p)
    for i in range(40):
        write(blk, i * 200 * KIB, b"\x31" * 6000)
    flush(blk)
    q.close()
    check_clean(p)
    qemu_io(p, "read -P 0x31 0 6000", f"read -P 0x31 {39 * 200 * KIB} 6000")


def test_small_caches_and_options(q, tmp_path) -> None:
    p = create(tmp_path / "s.qcow2", "64M", cluster_size="4K")
    blk = q(p, **{"l2-cache-size": 8192, "refcount-cache-size": 8192,
                  "cache-clean-interval": 1})
    for i in range(64):  # 64 different L2 tables (each covers 2 MiB) through a 2-table cache
        write(blk, i * MIB + 512, bytes([i + 1]) * 1024)
    for i in range(64):
        assert read(blk, i * MIB + 512, 1024) == bytes([i + 1]) * 1024
    flush(blk)
    q.close()
    check_clean(p)
    with pytest.raises(BlockDriverError, match="may not be set at the same time"):
        q(p, **{"cache-size": 1 * MIB, "l2-cache-size": 65536,
                "refcount-cache-size": 65536})


def test_grow_resize(q, tmp_path) -> None:
    p = create(tmp_path / "z.qcow2", "1M", cluster_size="4K")  # one L1 entry covers 2 MiB
    blk = q(p)
    bs = blk.root
    bdrv_truncate(bs, 64 * MIB)
    assert blk_getlength(blk) == 64 * MIB
    write(blk, 60 * MIB, b"\x91" * 4096)
    flush(blk)
    q.close()
    check_clean(p)
    assert '"virtual-size": 67108864' in qemu_img("info", "--output=json", p).stdout
    qemu_io(p, f"read -P 0x91 {60 * MIB} 4k", "read -P 0 0 1M")


# -- bad images -----------------------------------------------------------------------------
def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _refused(q, path: str, match: str, writable: bool = True) -> str:
    before = set(bdrv._nodes)
    with pytest.raises(BlockDriverError) as e:
        q(path, writable=writable)
    msg = str(e.value)
    assert "\n" not in msg and match in msg, msg
    assert set(bdrv._nodes) == before  # nothing left open
    return msg


def test_bad_images_are_refused_with_one_line(q, tmp_path) -> None:
    good = create(tmp_path / "good.qcow2", "64M")
    qemu_io(good, "write -P 1 0 1M")
    data = open(good, "rb").read()

    def variant(name: str, patch=None, truncate: int | None = None) -> str:
        p = str(tmp_path / name)
        open(p, "wb").write(data if truncate is None else data[:truncate])
        if patch:
            _patch(p, *patch)
        return p

    _refused(q, variant("trunc.qcow2", truncate=50), "qcow2 header")
    _refused(q, variant("notq.qcow2", patch=(0, b"XXXX")), "Image is not in qcow2 format")
    _refused(q, variant("ver.qcow2", patch=(4, struct.pack(">I", 7))),
             "Unsupported qcow2 version 7")
    _refused(q, variant("cbits.qcow2", patch=(20, struct.pack(">I", 30))),
             "Unsupported cluster size: 2^30")
    _refused(q, variant("l1far.qcow2", patch=(40, struct.pack(">Q", 1 << 40))),
             "beyond the end of the file")
    _refused(q, variant("l1mis.qcow2", patch=(40, struct.pack(">Q", 65536 * 3 + 512))),
             "Invalid L1 table offset")
    _refused(q, variant("rtmis.qcow2", patch=(48, struct.pack(">Q", 1000))),
             "Invalid reference count table offset")
    _refused(q, variant("rtfar.qcow2", patch=(48, struct.pack(">Q", 1 << 44))),
             "beyond the end of the file")
    _refused(q, variant("huge.qcow2", patch=(24, struct.pack(">Q", 1 << 62))),
             "Image size")
    _refused(q, variant("l1small.qcow2", patch=(24, struct.pack(">Q", 1 << 50))),
             "L1 table is too small")
    # A truncated file: the tables the header names are gone.
    _refused(q, variant("short.qcow2", truncate=4 * 65536), "beyond the end of the file")
    # The refcount table points a block at the L1 table ("loop" in the metadata).
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    rt_off = struct.unpack_from(">Q", data, 48)[0]
    _refused(q, variant("rtloop.qcow2", patch=(rt_off, struct.pack(">Q", l1_off))),
             "overlaps the L1 table")
    _refused(q, variant("l2far.qcow2", patch=(l1_off, struct.pack(">Q", (1 << 63) | 1 << 40))),
             "L2 table 0 offset")


def test_feature_bits(q, tmp_path) -> None:
    p = create(tmp_path / "f.qcow2", "1M")
    _patch(p, 72, struct.pack(">Q", 1 << 40))
    msg = _refused(q, p, "Unsupported qcow2 feature(s): ")
    # QEMU's own words for the same image.
    theirs = qemu_img("info", p, check=False).stderr
    assert msg in theirs, (msg, theirs)
    p = create(tmp_path / "c.qcow2", "1M")
    _patch(p, 72, struct.pack(">Q", 2))  # corrupt bit
    _refused(q, p, "Image is corrupt; cannot be opened read/write")
    blk = q(p, writable=False)  # but it can be read
    assert read(blk, 0, 512) == bytes(512)
    p = create(tmp_path / "d.qcow2", "1M", lazy_refcounts="on")
    _patch(p, 72, struct.pack(">Q", 1))  # dirty bit
    _refused(q, p, "dirty")
    assert read(q(p, writable=False), 0, 512) == bytes(512)


def test_backing_file_naming_itself_or_looping(q, tmp_path) -> None:
    a = str(tmp_path / "a.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", a, "1M")
    _refused(q, a, "is the image itself")
    b, c = str(tmp_path / "b.qcow2"), str(tmp_path / "c.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "c.qcow2", "-F", "qcow2", b, "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", c, "1M")
    _refused(q, b, "loops back")
    missing = str(tmp_path / "m.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "nothere.qcow2", "-F", "qcow2",
             missing, "1M")
    _refused(q, missing, "Could not open backing file 'nothere.qcow2'")


def test_corrupt_l2_entry_fails_the_request_not_the_daemon(q, tmp_path) -> None:
    p = create(tmp_path / "x.qcow2", "8M")
    qemu_io(p, "write -P 3 0 64k")
    data = open(p, "rb").read()
    l1_off = struct.unpack_from(">Q", data, 40)[0]
    l2_off = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    _patch(p, l2_off, struct.pack(">Q", (1 << 63) | 0))  # cluster 0 -> the header
    _patch(p, l2_off, struct.pack(">Q", (1 << 63) | 65536 * 0 + 0))
    _patch(p, l2_off + 8, struct.pack(">Q", (1 << 63) | l1_off))  # cluster 1 -> the L1 table
    blk = q(p)
    buf = bytearray(4096)
    assert _wait(lambda cb: blk_aio_pwritev(blk, 65536, IOVector.from_buffers([buf]), 0,
                                            cb)) == -5
    assert open(p, "rb").read()[l1_off:l1_off + 8] == data[l1_off:l1_off + 8]
    assert os.path.getsize(p) >= len(data)


def test_an_inline_backing_child_is_read_only_unless_it_says_so(q, tmp_path) -> None:
    base = create(tmp_path / "base.qcow2", "4M")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    blk = q(top, backing={"driver": "qcow2", "file": {"driver": "file", "filename": base}})
    backing = blk.root.children["backing"].bs
    assert backing.read_only and backing.children["file"].bs.read_only
    assert not blk.root.read_only


# -- batch_io: allocated clusters straight to the file, the rest per request -----------------
def _batch(main_ctx, reqs):
    """A Batch filled by hand, as Batch.take leaves it (no queue: nobody calls finish()).
    reqs: (type, offset, data bytes or length).  Returns (batch, buffers)."""
    from blocklayer.batch import T_FLUSH, UNSET, Batch
    from vhost.ffi import ffi

    b = Batch(main_ctx, ffi.NULL, lambda: None, size=max(len(reqs), 1))
    bufs = []
    keep = []
    for i, (t, off, data) in enumerate(reqs):
        n = len(data) if isinstance(data, bytes) else data
        buf = ffi.new("char[]", data if isinstance(data, bytes) else max(n, 1))
        iov = ffi.new("struct iovec *")
        iov.iov_base, iov.iov_len = buf, n
        keep += [buf, iov]
        bufs.append(buf)
        b.types[i], b.offsets[i], b.lengths[i] = t, off, n
        b.iovs[i], b.niovs[i] = iov, 0 if t == T_FLUSH else 1
        b.flags[i], b.ret[i] = 0, UNSET
    b.n = len(reqs)
    b._serving = b._gen = 1
    b._keep = keep  # type: ignore[attr-defined]
    return b, bufs


def _serve(bs, b) -> list[int]:
    from blocklayer.batch import PENDING
    from blocklayer.io import bdrv_batch

    bdrv_batch(bs, b)
    run_until(lambda: all(b.ret[i] != PENDING for i in range(b.n)), timeout=30)
    return [b.ret[i] for i in range(b.n)]


def _record(node) -> list[tuple[int, int]]:
    """Record (index, offset) of every request the node's batch_io is given."""
    from blocklayer.batch import UNSET

    seen: list[tuple[int, int]] = []
    orig = node.drv.batch_io

    def rec(b):
        seen.extend((i, b.offsets[i]) for i in range(b.n) if b.ret[i] == UNSET)
        orig(b)

    node.drv.batch_io = rec
    return seen


def _host(path: str, guest: int) -> int:
    """The host offset QEMU maps a guest offset to (qemu-img map)."""
    import json

    for ext in json.loads(qemu_img("map", "--output=json", path).stdout):
        if ext["start"] <= guest < ext["start"] + ext["length"] and ext.get("offset"):
            return ext["offset"] + guest - ext["start"]
    raise AssertionError(f"{guest:#x} not allocated")


def test_batch_io_sends_allocated_clusters_to_the_file(q, tmp_path, main_ctx) -> None:
    from blocklayer.batch import T_FLUSH, T_READ, T_WRITE

    p = create(tmp_path / "b.qcow2", "8M")
    qemu_io(p, "write -P 0x11 0 1M")
    h0, h1 = _host(p, 0), _host(p, 64 * KIB)
    blk = q(p)
    bs = blk.root
    seen = _record(bs.children["file"].bs)
    b, bufs = _batch(main_ctx, [(T_READ, 4096, 4096)])
    assert _serve(bs, b) == [0]
    assert seen == []  # the L2 table was not cached yet: per request (which loads it)
    b, bufs = _batch(main_ctx, [
        (T_READ, 8192, 4096),                     # 0: allocated: the file, at its host offset
        (T_WRITE, 64 * KIB + 512, b"\x22" * 1024),  # 1: allocated, COPIED: in place
        (T_WRITE, 2 * MIB, b"\x33" * 4096),        # 2: unallocated: allocating, per request
        (T_READ, 60 * KIB, 8192),                  # 3: spans two clusters: per request
        (T_READ, 3 * MIB, 4096),                   # 4: unallocated, no backing: zeroes
        (T_FLUSH, 0, 0),                           # 5: metadata, then the file
    ])
    assert _serve(bs, b) == [0] * 6
    assert seen == [(0, h0 + 8192), (1, h1 + 512)]
    from vhost.ffi import ffi
    assert ffi.unpack(bufs[0], 4096) == b"\x11" * 4096
    assert ffi.unpack(bufs[3], 8192) == b"\x11" * 8192
    assert ffi.unpack(bufs[4], 4096) == bytes(4096)
    assert read(blk, 64 * KIB, 2048) == b"\x11" * 512 + b"\x22" * 1024 + b"\x11" * 512
    q.close()
    check_clean(p)
    qemu_io(p, "read -P 0x11 0 64k", f"read -P 0x22 {64 * KIB + 512} 1k",
            f"read -P 0x33 {2 * MIB} 4k", f"read -P 0 {2 * MIB + 4096} 60k")


def test_batch_io_reads_unallocated_clusters_from_the_backing_file(q, tmp_path,
                                                                  main_ctx) -> None:
    from blocklayer.batch import T_READ, T_WRITE
    from vhost.ffi import ffi

    base = create(tmp_path / "base.qcow2", "4M")
    qemu_io(base, "write -P 0x41 0 4M")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
    qemu_io(top, "write -P 0x42 1M 64k")
    blk = q(top)
    bs = blk.root
    bk = bs.children["backing"].bs
    read(blk, 0, 512)
    read(blk, MIB, 512)  # both L2 tables cached
    top_seen, base_seen = _record(bs.children["file"].bs), _record(bk.children["file"].bs)
    b, bufs = _batch(main_ctx, [(T_READ, 64 * KIB, 65536), (T_READ, MIB, 4096),
                                (T_READ, 2 * MIB, 4096), (T_WRITE, 3 * MIB, b"\x43" * 512)])
    assert _serve(bs, b) == [0] * 4
    assert [i for i, _ in top_seen] == [1]
    assert [i for i, _ in base_seen] == [0, 2]  # through the base's own batch_io
    assert ffi.unpack(bufs[0], 65536) == b"\x41" * 65536
    assert ffi.unpack(bufs[1], 4096) == b"\x42" * 4096
    assert ffi.unpack(bufs[2], 4096) == b"\x41" * 4096
    q.close()
    check_clean(top)
    qemu_io(top, f"read -P 0x43 {3 * MIB} 512", f"read -P 0x41 {3 * MIB + 512} 63k")


def test_batch_io_never_races_an_allocating_write(q, tmp_path, main_ctx) -> None:
    """An allocating write in flight holds its guest clusters: a batch write to one of them
    (even one already allocated, that the allocation's range covers) waits behind it on the
    per-request path instead of going to the file; and a cluster being allocated is never
    written in place at a stale or missing host offset."""
    from blocklayer.batch import T_WRITE

    p = create(tmp_path / "r.qcow2", "4M", cluster_size="4K")
    qemu_io(p, "write -P 0x51 44k 4k")  # cluster 11 allocated, 10 not
    blk = q(p)
    bs = blk.root
    read(blk, 0, 512)
    seen = _record(bs.children["file"].bs)
    rets: list[int] = []
    data = bytearray(b"\x52" * 4096)  # second half of cluster 10, first half of 11
    blk_aio_pwritev(blk, 42 * KIB, IOVector.from_buffers([data]), 0, rets.append)
    assert not rets and bs.drv.ranges.busy(10, 12)  # in flight, holding clusters 10-11
    b, _ = _batch(main_ctx, [(T_WRITE, 40 * KIB, b"\x53" * 2048),   # the unallocated 10
                             (T_WRITE, 47 * KIB, b"\x54" * 1024),   # allocated 11, held
                             (T_WRITE, 8 * KIB, b"\x55" * 4096)])   # unallocated elsewhere
    assert _serve(bs, b) == [0, 0, 0]
    run_until(lambda: rets)
    assert rets == [0]
    assert seen == []  # nothing of this batch was written in place behind the allocation
    want = b"\x53" * 2048 + b"\x52" * 4096 + b"\x51" * 1024 + b"\x54" * 1024
    assert read(blk, 40 * KIB, 8192) == want
    # Once allocated, the same clusters are written in place through the file.
    b, _ = _batch(main_ctx, [(T_WRITE, 40 * KIB, b"\x56" * 512)])
    assert _serve(bs, b) == [0]
    assert [i for i, _ in seen] == [0]
    q.close()
    check_clean(p)
    qemu_io(p, "read -P 0x56 40k 512", "read -P 0x53 40.5k 1.5k", "read -P 0x52 42k 4k",
            "read -P 0x51 46k 1k", "read -P 0x54 47k 1k")


def test_batch_io_random_mix_with_allocating_writes(q, tmp_path, main_ctx) -> None:
    """Rounds of batches (reads and writes) interleaved with per-request writes in flight on
    the same clusters (other sectors): every byte ends as the model says, the image checks
    clean and QEMU reads the same data."""
    from blocklayer.batch import T_READ, T_WRITE
    from vhost.ffi import ffi

    size = 2 * MIB
    p = create(tmp_path / "m.qcow2", str(size), cluster_size="4K")
    qemu_io(p, "write -P 0x01 0 512k")
    blk = q(p)
    bs = blk.root
    model = bytearray(b"\x01" * (512 * KIB) + bytes(size - 512 * KIB))
    rng = random.Random(7)
    keep = []
    for rnd in range(40):
        free = list(range(size // 512))
        rng.shuffle(free)
        sectors = free[:48]  # distinct sectors this round: no two requests overlap
        rets: list[int] = []
        for s in sectors[:16]:  # per request (allocating where unallocated)
            d = bytearray(bytes([rnd * 3 % 250 + 2]) * 512)
            keep.append(d)
            model[s * 512:(s + 1) * 512] = d
            blk_aio_pwritev(blk, s * 512, IOVector.from_buffers([d]), 0, rets.append)
        reqs = []
        for k, s in enumerate(sectors[16:]):
            if k % 3 == 0:
                reqs.append((T_READ, s * 512, 512))
            else:
                d = bytes([(rnd * 7 + k) % 250 + 3]) * 512
                model[s * 512:(s + 1) * 512] = d
                reqs.append((T_WRITE, s * 512, d))
        b, bufs = _batch(main_ctx, reqs)
        assert set(_serve(bs, b)) == {0}
        for (t, off, _), buf in zip(reqs, bufs, strict=True):
            if t == T_READ:
                assert ffi.unpack(buf, 512) == bytes(model[off:off + 512]), (rnd, off)
        run_until(lambda r=rets: len(r) == 16, timeout=30)
        assert set(rets) == {0}
    assert read(blk, 0, size) == model
    q.close()
    check_clean(p)
    out = str(tmp_path / "m.raw")
    qemu_img("convert", "-O", "raw", p, out)
    assert open(out, "rb").read() == model


def test_batch_io_allocates_new_clusters_without_a_coroutine(q, tmp_path, main_ctx) -> None:
    """A write inside one unallocated cluster whose old contents read as zeroes is allocated
    in batch_io itself (counted, then mapped) and written through the file; one whose old
    contents come from the backing file, or while the metadata mutex is held, takes the
    per-request path (COW, or waiting its turn)."""
    from blocklayer.batch import PENDING, T_WRITE
    from blocklayer.io import bdrv_batch

    base = create(tmp_path / "base.qcow2", "2M", cluster_size="4K")
    qemu_io(base, "write -P 0x61 0 2M")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4K", "-b", "base.qcow2",
             "-F", "qcow2", top, "4M")
    blk = q(top)
    bs = blk.root
    write(blk, 3 * MIB, b"\x01" * 4096)  # per request: the L2 table and refcount block
    seen = _record(bs.children["file"].bs)
    before = bs.drv.next_free
    b, _ = _batch(main_ctx, [(T_WRITE, 3 * MIB + 4096 + 512, b"\x62" * 1024),  # above 2M
                             (T_WRITE, 3 * MIB + 8192, b"\x63" * 4096),
                             (T_WRITE, 3 * MIB + 4096 + 2048, b"\x64" * 512),  # same cluster
                             (T_WRITE, 4096 + 512, b"\x65" * 512)])  # COW from the base
    assert _serve(bs, b) == [0, 0, 0, 0]
    assert [i for i, _ in seen] == [0, 1, 2]
    assert bs.drv.next_free >= before + 3
    # The mutex held (a write-back, say): allocations wait on the per-request path.
    assert bs.drv.mutex.try_lock()
    seen.clear()
    b, _ = _batch(main_ctx, [(T_WRITE, 3 * MIB + 5 * 4096, b"\x66" * 4096)])
    bdrv_batch(bs, b)
    assert b.ret[0] == PENDING and seen == []
    bs.drv.mutex.unlock()
    run_until(lambda: b.ret[0] != PENDING)
    assert b.ret[0] == 0
    flush(blk)
    q.close()
    check_clean(top)
    qemu_io(top, f"read -P 0 {3 * MIB + 4096} 512", f"read -P 0x62 {3 * MIB + 4608} 1k",
            f"read -P 0 {3 * MIB + 5632} 512", f"read -P 0x64 {3 * MIB + 6144} 512",
            f"read -P 0x63 {3 * MIB + 8192} 4k", f"read -P 0x66 {3 * MIB + 20480} 4k",
            "read -P 0x61 4096 512", "read -P 0x65 4608 512", "read -P 0x61 5120 3k")


def test_cache_clean_interval_drops_idle_tables_on_a_timer(q, tmp_path) -> None:
    p = create(tmp_path / "t.qcow2", "8M")
    qemu_io(p, "write -P 7 0 64k")
    blk = q(p, **{"cache-clean-interval": 1})
    assert read(blk, 0, 512) == b"\x07" * 512
    drv = blk.root.drv
    assert drv.l2_cache.tables  # the L2 table is cached
    run_until(lambda: not drv.l2_cache.tables, timeout=5)  # idle for 1 s: dropped
    assert read(blk, 0, 512) == b"\x07" * 512  # and read again when needed
    assert drv.l2_cache.tables
