"""Fuzzing the qcow2 driver with damaged images: valid images made by qemu-img (v2 and v3,
several cluster sizes and refcount widths, extended L2, compressed clusters, a backing file)
get random bytes written at random offsets of their header, L1 table, L2 tables, refcount
table or refcount blocks; each is opened in-process (``blockdev_add``) read-write and a few
clusters are read and written (in place and allocating; through the BlockBackend and as
batches through ``batch_io``), then flushed and closed.

Whatever the damage: no crash and no hang (every step has a deadline), opening either works
or fails with one ``BlockDriverError`` line, requests end with 0 or EIO (or EROFS, ENOSPC,
EFBIG for an image whose limits the damage shrank), and the file never grows by more than
what the writes could legitimately allocate — a write never lands far outside the file
through a bad offset.  Several hundred cases in well under a minute.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blocklayer import bdrv
from blocklayer.aio import qemu_get_aio_context
from blocklayer.batch import PENDING, T_READ, T_WRITE, UNSET, Batch
from blocklayer.bdrv import BlockDriverError, bdrv_unref
from blocklayer.block_backend import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_WRITE,
    blk_aio_flush,
    blk_aio_preadv,
    blk_aio_pwritev,
    blk_insert_bs,
    blk_new,
    blk_unref,
)
from blocklayer.blockdev import blockdev_add
from blocklayer.drivers.qcow2 import MAX_LEAKED_BYTES
from blocklayer.io import bdrv_batch
from blocklayer.iov import IOVector
from vhost.ffi import ffi

CASES = int(os.environ.get("PYVHOST_FUZZ_QCOW2_CASES", "400"))
SEED = int(os.environ.get("PYVHOST_FUZZ_QCOW2_SEED", "20240612"))
STEP_TIMEOUT = 10.0  # seconds for one open or one request: far more than any needs
OK_ERRNOS = {0, -errno.EIO, -errno.EROFS, -errno.ENOSPC, -errno.EFBIG}
# Images made by qemu-img: (name, create options, size, qemu-io commands)
IMAGES = [
    ("v3-64k", "cluster_size=64k", "8M",
     ["write -P 0x11 0 256k", "write -P 0x12 3M 64k", "write -z 5M 128k"]),
    ("v2-4k", "cluster_size=4k,compat=0.10", "4M",
     ["write -P 0x21 0 64k", "write -P 0x22 2M 12k"]),
    ("v3-512-rc1", "cluster_size=512,refcount_bits=1", "1M",
     ["write -P 0x31 0 8k", "write -P 0x32 512k 1k"]),
    ("v3-4k-rc64", "cluster_size=4k,refcount_bits=64", "4M",
     ["write -P 0x41 0 32k", "write -P 0x42 1M 8k"]),
    ("ext-l2", "cluster_size=64k,extended_l2=on", "8M",
     ["write -P 0x51 0 100k", "write -P 0x52 4M 6k"]),
]


def rc_bits(data: bytes) -> int:
    version = struct.unpack_from(">I", data, 4)[0]
    return 1 << struct.unpack_from(">I", data, 96)[0] if version >= 3 else 16


class Hang(Exception):
    pass


def _qemu(tool: str, *args: str) -> None:
    exe = shutil.which(tool)
    if exe is None:
        pytest.fail(f"{tool} not found: install QEMU's tools ('apt-get install qemu-utils')")
    subprocess.run([exe, *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, dict]]:
    """name -> (the image's bytes, where its tables are)."""
    d = tmp_path_factory.mktemp("fuzz-qcow2-src")
    out = {}
    for name, opts, size, cmds in IMAGES:
        p = d / f"{name}.qcow2"
        _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, str(p), size)
        args = []
        for c in cmds:
            args += ["-c", c]
        _qemu("qemu-io", "-f", "qcow2", *args, str(p))
        out[name] = (p.read_bytes(), _layout(p.read_bytes()))
    # compressed clusters
    raw = d / "c.raw"
    raw.write_bytes((b"compressible " * 400)[:4096] * 256)
    p = d / "compressed.qcow2"
    _qemu("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(p))
    out["compressed"] = (p.read_bytes(), _layout(p.read_bytes()))
    # a backing file and an overlay (the overlay is fuzzed; the base stays intact)
    base = d / "base.qcow2"
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M")
    _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x71 0 4M", str(base))
    p = d / "overlay.qcow2"
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(p))
    _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x72 1M 64k", str(p))
    out["overlay"] = (p.read_bytes(), _layout(p.read_bytes()))
    return out


def _layout(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of the header and of each table, from the intact image."""
    cb = struct.unpack_from(">I", data, 20)[0]
    cs = 1 << cb
    version = struct.unpack_from(">I", data, 4)[0]
    l1_size, l1_off = struct.unpack_from(">IQ", data, 36)
    rt_off, rt_clusters = struct.unpack_from(">QI", data, 48)
    hlen = struct.unpack_from(">I", data, 100)[0] if version >= 3 else 72
    ext_l2 = version >= 3 and hlen >= 112 and struct.unpack_from(">Q", data, 72)[0] & 16
    l2s = [e & 0x00FFFFFFFFFFFE00 for e in struct.unpack_from(f">{l1_size}Q", data, l1_off)]
    rbs = [e & ~0x1FF & (2**64 - 1) for e in
           struct.unpack_from(f">{rt_clusters * cs // 8}Q", data, rt_off)]
    return {
        "header": [(0, min(cs, 4096))],
        "header-fields": [(0, hlen)],
        "l1": [(l1_off, max(8, l1_size * 8))],
        "l2": [(o, cs) for o in l2s if o] or [(l1_off, 8)],
        "reftable": [(rt_off, 8 * max(1, sum(1 for r in rbs if r)))],
        "refblock": [(o, cs) for o in rbs if o],
        "l2-entries": [(o, 8 * (2 if ext_l2 else 1) * 16) for o in l2s if o] or [(l1_off, 8)],
    }


def _mutate(rng: random.Random, data: bytes, layout: dict) -> tuple[bytes, str]:
    buf = bytearray(data)
    region = rng.choice(["header-fields", "header-fields", "header", "l1", "l2", "l2-entries",
                         "l2-entries", "reftable", "refblock"])
    start, length = rng.choice(layout[region])
    what = []
    for _ in range(rng.choice([1, 1, 2, 3, 8])):
        kind = rng.randrange(5)
        if kind == 4 and length >= 8:  # a plausible-looking but wrong 64-bit entry
            at = start + rng.randrange(length // 8) * 8
            meta = [o for r in ("l1", "reftable", "l2", "refblock") for o, _ in layout[r]]
            v = rng.choice([1 << 63 | rng.randrange(1 << 40) << 9, rng.randrange(1 << 64),
                            1 << 63 | (len(data) + rng.randrange(1, 64) * 512),
                            1 << 62 | rng.randrange(1 << 50), 1, 0, 1 << 63,
                            1 << 63 | rng.choice(meta)])  # a table as data: overlap
            buf[at:at + 8] = struct.pack(">Q", v)
            what.append(f"q@{at:#x}={v:#x}")
            continue
        at = start + rng.randrange(length)
        if kind == 0:
            buf[at] = rng.randrange(256)
        elif kind == 1:
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 2:
            buf[at] = 0xFF
        else:
            buf[at] = 0
        what.append(f"b@{at:#x}={buf[at]:#x}")
    return bytes(buf), f"{region}: {' '.join(what)}"


class _Deadline:
    """SIGALRM after ``secs``: raises Hang in the main thread (which runs the loop)."""

    def __init__(self, secs: float) -> None:
        self.secs = secs

    def __enter__(self) -> None:
        def fire(signum: int, frame: Any) -> None:
            raise Hang(f"no progress within {self.secs} s")

        self.old = signal.signal(signal.SIGALRM, fire)
        signal.setitimer(signal.ITIMER_REAL, self.secs)

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.old)


def _wait(submit) -> int:
    ctx = qemu_get_aio_context()
    rets: list[int] = []
    submit(rets.append)
    deadline = time.monotonic() + STEP_TIMEOUT
    while not rets:
        if time.monotonic() > deadline:
            raise Hang("a request did not complete")
        ctx.aio_poll(blocking=True, timeout=0.05)
    return rets[0]


def _batch(bs: Any, is_write: bool, off: int, buf: bytearray) -> int:
    """One request through bdrv_batch, as the export hands them (no queue behind it)."""
    b = Batch(qemu_get_aio_context(), ffi.NULL, lambda: None)
    cbuf = ffi.from_buffer(buf)
    iov = ffi.new("struct iovec *")
    iov.iov_base, iov.iov_len = cbuf, len(buf)
    b.types[0], b.offsets[0], b.lengths[0] = (T_WRITE if is_write else T_READ), off, len(buf)
    b.iovs[0], b.niovs[0], b.flags[0], b.ret[0] = iov, 1, 0, UNSET
    b.n = 1
    b._serving = b._gen = 1
    bdrv_batch(bs, b)
    deadline = time.monotonic() + STEP_TIMEOUT
    while b.ret[0] in (PENDING, UNSET):
        if b.ret[0] == UNSET:
            raise AssertionError("a batch request was left unanswered")
        if time.monotonic() > deadline:
            raise Hang("a batch request did not complete")
        qemu_get_aio_context().aio_poll(blocking=True, timeout=0.05)
    return b.ret[0]


@pytest.fixture
def opened() -> Iterator[list]:
    """Nodes and backends a case opened, closed whatever happens."""
    things: list = []
    yield things
    for kind, x in reversed(things):
        if kind == "blk":
            while x.refcnt > 0:
                blk_unref(x)
        elif bdrv._nodes.get(x.node_name) is x:
            bdrv_unref(x)


def _one_case(path: Path, rng: random.Random, opened: list) -> str:
    """Open, read, write, flush, close.  Returns what happened (for the summary)."""
    name = f"fz{rng.randrange(1 << 30)}"
    tree = {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": str(path)}}
    try:
        with _Deadline(STEP_TIMEOUT):
            bs = blockdev_add(tree, from_json=True)
    except BlockDriverError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg, msg
        assert name not in bdrv._nodes  # nothing left behind
        return "refused"
    opened.append(("bs", bs))
    blk = blk_new(qemu_get_aio_context(), BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE,
                  BLK_PERM_ALL)
    opened.append(("blk", blk))
    try:
        blk_insert_bs(blk, bs)
    except PermissionError:
        return "read-only"
    size = bs.bdrv_getlength()
    cs = bs.drv.cs
    rets = []
    keep = []
    for _ in range(6):
        off = rng.randrange(0, max(1, size - 8192)) // 512 * 512
        n = min(rng.choice([512, 4096, cs, 8192]), size - off)
        if n <= 0:
            continue
        buf = bytearray(rng.randbytes(n))
        keep.append(buf)
        qiov = IOVector.from_buffers([buf])
        is_write = rng.random() < 0.5
        if rng.random() < 0.5:  # the batch path (batch_io: mappings looked up in a loop)
            r = _batch(bs, is_write, off, buf)
        elif is_write:
            r = _wait(lambda cb, o=off, q=qiov: blk_aio_pwritev(blk, o, q, 0, cb))
        else:
            r = _wait(lambda cb, o=off, q=qiov: blk_aio_preadv(blk, o, q, 0, cb))
        assert r in OK_ERRNOS, (r, off, n)
        rets.append(r)
    r = _wait(lambda cb: blk_aio_flush(blk, cb))
    assert r in OK_ERRNOS, r
    with _Deadline(STEP_TIMEOUT):
        opened.pop()
        while blk.refcnt > 0:
            blk_unref(blk)
        opened.pop()
        bdrv_unref(bs)  # close: metadata written back (or a logged failure)
    return "ok" if all(r == 0 for r in rets) else "eio"


def test_damaged_images_never_crash_hang_or_write_outside(images, tmp_path, opened) -> None:
    rng = random.Random(SEED)
    names = sorted(images)
    t0 = time.monotonic()
    tally: dict[str, int] = {}
    for case in range(CASES):
        name = names[case % len(names)]
        data, layout = images[name]
        bad, what = _mutate(rng, data, layout)
        path = tmp_path / "case.qcow2"  # (the overlay names its base by absolute path)
        path.write_bytes(bad)
        try:
            outcome = _one_case(path, rng, opened)
        except (AssertionError, Hang) as e:
            raise AssertionError(f"case {case} ({name}, {what}): {e!r}") from None
        # Allocations: a few clusters of data, an L2 table each, refcount blocks and a
        # table: a few dozen clusters; plus, for a damaged refcount block that still looks
        # like leaked clusters (refcount 1: with refcount_bits=1 any garbage does), what
        # allocation skips before it calls the image damaged.  A write at a bad offset, or an
        # allocator running off, would show here.
        cs = 1 << struct.unpack_from(">I", data, 20)[0]
        grown = path.stat().st_size - len(bad)
        skip = max(1024, MAX_LEAKED_BYTES // cs) * cs if rc_bits(data) == 1 else 0
        assert grown <= 64 * max(cs, 4096) + (1 << 20) + skip, \
            f"case {case} ({name}, {what}): the file grew by {grown} bytes"
        tally[outcome] = tally.get(outcome, 0) + 1
        opened.clear()
    elapsed = time.monotonic() - t0
    print(f"{CASES} damaged images in {elapsed:.1f} s: {tally}")
    assert elapsed < 60, f"{CASES} cases took {elapsed:.0f} s"
    assert tally.get("refused", 0) and tally.get("ok", 0), tally  # both kinds were reached
