"""The ``copy-on-read`` filter in-process, over qcow2 overlays made and checked by QEMU's tools:
reads through it leave the data they read in the overlay (``qemu-img map`` shows it allocated
there, qemu-io reads it with no backing file), ``qemu-img check`` stays clean, writes pass
through, a guest write racing a copy-up is never undone by the copy's stale data (both orders,
and a random mix), ``bottom`` limits what is copied, and the qcow2 allocation query agrees with
``qemu-img map``."""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blocklayer import bdrv
from blocklayer.bdrv import BlockDriverError, bdrv_unref
from blocklayer.block_backend import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_WRITE,
    blk_aio_pdiscard,
    blk_aio_preadv,
    blk_aio_pwrite_zeroes,
    blk_aio_pwritev,
    blk_insert_bs,
    blk_new,
    blk_unref,
)
from blocklayer.blockdev import blockdev_add
from blocklayer.drivers.copy_on_read import COPY, WRITE
from blocklayer.graph import BLK_PERM_WRITE_UNCHANGED
from blocklayer.io import bdrv_aio_is_allocated
from blocklayer.iov import IOVector
from tests.unit.conftest import run_until, unique
from tests.unit.test_qcow2 import _tool, _wait, check_clean, create, qemu_img, qemu_io, read

KIB, MIB = 1 << 10, 1 << 20


# -- helpers -----------------------------------------------------------------------------------
def write(blk, offset: int, data: bytes) -> None:
    buf = bytearray(data)
    assert _wait(lambda cb: blk_aio_pwritev(blk, offset, IOVector.from_buffers([buf]), 0,
                                            cb)) == 0


def depths(path: str) -> list[dict[str, Any]]:
    return json.loads(qemu_img("map", "--output=json", path).stdout)


def own(path: str, offset: int, n: int) -> bool:
    """Whether qemu-img map says [offset, offset + n) is all allocated in the image itself."""
    hit = [e for e in depths(path) if e["start"] < offset + n and offset < e["start"] +
           e["length"]]
    assert hit
    return all(e["depth"] == 0 for e in hit)


def none_own(path: str, offset: int, n: int) -> bool:
    hit = [e for e in depths(path) if e["start"] < offset + n and offset < e["start"] +
           e["length"]]
    return all(e["depth"] != 0 for e in hit)


def qemu_io_alone(path: str, *cmds: str) -> str:
    """qemu-io on the image with no backing file (backing: null): only its own data."""
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": path}})
    args = [_tool("qemu-io")]
    for c in cmds:
        args += ["-c", c]
    p = subprocess.run([*args, f"json:{spec}"], capture_output=True, text=True)
    out = p.stdout + p.stderr
    assert p.returncode == 0 and "Pattern verification failed" not in out and \
        "error" not in out.lower(), out
    return out


def raw_of(path: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"{Path(path).stem}.raw"
    qemu_img("convert", "-O", "raw", path, str(out))
    return out.read_bytes()


def base_and_overlay(tmp_path: Path, size: str = "4M", **o: str) -> tuple[str, str]:
    """base: 0xaa in [0, 1M), 0xbb in [2M, 2M + 64k); overlay: its own 0xcc in
    [512k, 576k)."""
    base = create(tmp_path / "base.qcow2", size, **o)
    qemu_io(base, "write -P 0xaa 0 1M", "write -P 0xbb 2M 64k")
    opts = ",".join(f"{k}={v}" for k, v in o.items())
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             *(["-o", opts] if opts else []), top)
    qemu_io(top, "write -P 0xcc 512k 64k")
    return base, top


class Graph:
    """Nodes and BlockBackends of one test, closed (metadata written back) by close()."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.blks: list = []
        self.nodes: list = []

    def node(self, tree: dict[str, Any]):
        bs = blockdev_add(tree, from_json=True)
        self.nodes.append(bs)
        return bs

    def cor(self, top: str, qcow2: dict[str, Any] | None = None, **opts: Any):
        """A copy-on-read node over a qcow2 node over ``top``; returns (blk, cor, overlay)."""
        ov = unique("ov")
        tree = {"driver": "copy-on-read", "node-name": unique("cor"),
                "file": {"driver": "qcow2", "node-name": ov,
                         "file": {"driver": "file", "filename": top}, **(qcow2 or {})},
                **opts}
        bs = self.node(tree)
        blk = blk_new(self.ctx, BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, BLK_PERM_ALL)
        blk_insert_bs(blk, bs)
        self.blks.append(blk)
        return blk, bs, bs.children["file"].bs

    def close(self) -> None:
        for b in self.blks:
            while b.refcnt > 0:
                blk_unref(b)
        for bs in reversed(self.nodes):
            if bdrv._nodes.get(bs.node_name) is bs:
                bdrv_unref(bs)
        self.blks.clear()
        self.nodes.clear()


@pytest.fixture
def g(main_ctx) -> Iterator[Graph]:
    gr = Graph(main_ctx)
    yield gr
    gr.close()


def delayed_base(g: Graph, base: str, delay_us: int, every: int = 1) -> str:
    """A read-only qcow2 node for ``base`` under an x-delay filter; returns the filter's name
    (to give as the overlay's ``backing``)."""
    b = g.node({"driver": "qcow2", "node-name": unique("b"), "read-only": True,
                "file": {"driver": "file", "filename": base}})
    d = g.node({"driver": "x-delay", "node-name": unique("d"), "read-only": True,
                "every": every, "delay-us": delay_us, "file": b.node_name})
    return d.node_name


def submit_read(blk, offset: int, n: int, done: list) -> bytearray:
    buf = bytearray(n)
    blk_aio_preadv(blk, offset, IOVector.from_buffers([buf]), 0,
                   lambda ret: done.append(("read", ret)))
    return buf


def submit_write(blk, offset: int, data: bytes, done: list) -> None:
    buf = bytearray(data)
    blk_aio_pwritev(blk, offset, IOVector.from_buffers([buf]), 0,
                    lambda ret, keep=buf: done.append(("write", ret)))


# -- copy-up -----------------------------------------------------------------------------------
@pytest.mark.parametrize("o", [{"cluster_size": "64k", "compat": "1.1"},
                               {"cluster_size": "64k", "compat": "0.10"},
                               {"cluster_size": "4k", "compat": "1.1"},
                               {"cluster_size": "64k", "extended_l2": "on"}])
def test_reads_leave_the_backing_data_in_the_overlay(g, tmp_path, o) -> None:
    base, top = base_and_overlay(tmp_path, **o)
    base_raw = raw_of(base, tmp_path)
    want = bytearray(base_raw)
    want[512 * KIB:576 * KIB] = b"\xcc" * (64 * KIB)
    blk, cor, ov = g.cor(top)
    assert ov.children["file"].perm & BLK_PERM_WRITE  # (the overlay's own needs)
    assert cor.children["file"].perm & BLK_PERM_WRITE_UNCHANGED
    assert read(blk, 0, MIB) == want[:MIB]
    assert read(blk, 2 * MIB + 1000, 3000) == want[2 * MIB + 1000:2 * MIB + 4000]  # unaligned
    assert read(blk, 3 * MIB, 64 * KIB) == bytes(64 * KIB)  # zeroes in the base
    copied = cor.drv.copied_bytes
    assert copied >= MIB - 64 * KIB + 4 * KIB + 64 * KIB
    # Read again: from the overlay now, nothing more to copy.
    assert read(blk, 0, MIB) == want[:MIB]
    assert read(blk, 2 * MIB, 4 * KIB) == want[2 * MIB:2 * MIB + 4 * KIB]
    assert cor.drv.copied_bytes == copied
    g.close()
    check_clean(top)
    assert own(top, 0, MIB)
    assert own(top, 2 * MIB + 1000, 3000)  # whole clusters were copied, as in QEMU
    assert own(top, 3 * MIB, 64 * KIB)
    assert none_own(top, MIB, MIB)  # never read: still the base's
    assert raw_of(top, tmp_path) == bytes(want)
    # The overlay alone holds what was read.
    qemu_io_alone(top, "read -P 0xaa 0 512k", "read -P 0xcc 512k 64k",
                  "read -P 0xaa 576k 448k", "read -P 0xbb 2M 4k", "read -P 0 3M 64k")
    if o.get("compat") == "1.1" and "extended_l2" not in o:  # zeroes as zero clusters
        z = [e for e in depths(top) if e["start"] <= 3 * MIB < e["start"] + e["length"]]
        assert z[0]["zero"] and not z[0]["data"], z


def test_no_backing_data_past_the_base_and_a_shorter_base(g, tmp_path) -> None:
    base = create(tmp_path / "base.qcow2", "1M")
    qemu_io(base, "write -P 0x5a 0 1M")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "2M")
    blk, cor, ov = g.cor(top)
    assert read(blk, MIB - 4 * KIB, 8 * KIB) == b"\x5a" * (4 * KIB) + bytes(4 * KIB)
    g.close()
    check_clean(top)
    qemu_io_alone(top, "read -P 0x5a 960k 64k", "read -P 0 1M 64k")


def test_writes_zeroes_and_discards_pass_through(g, tmp_path) -> None:
    base, top = base_and_overlay(tmp_path)
    blk, cor, ov = g.cor(top, qcow2={"discard": "unmap"}, discard="unmap")
    write(blk, 100 * KIB, b"\xdd" * (8 * KIB))  # a partial cluster: qcow2's own COW
    assert _wait(lambda cb: blk_aio_pwrite_zeroes(blk, 2 * MIB, 64 * KIB, 0, cb)) == 0
    assert _wait(lambda cb: blk_aio_pdiscard(blk, 512 * KIB, 64 * KIB, cb)) == 0
    assert read(blk, 96 * KIB, 16 * KIB) == b"\xaa" * 4096 + b"\xdd" * 8192 + b"\xaa" * 4096
    assert read(blk, 2 * MIB, 64 * KIB) == bytes(64 * KIB)
    assert cor.drv.copied_bytes == 0  # all of that was the overlay's already
    assert not cor.drv.ranges.busy
    g.close()
    check_clean(top)
    qemu_io(top, "read -P 0xdd 100k 8k", "read -P 0 2M 64k", "read -P 0xaa 64k 36k")
    # The discarded cluster (v3 with a backing file): reads as zeroes, not the base's data.
    qemu_io(top, "read -P 0 512k 64k")


def test_a_write_racing_a_copy_up_wins(g, tmp_path) -> None:
    """The read's copy-up is in flight (its read of the base is slow) when a guest write to
    the same cluster arrives: the write waits, then lands on top of the copied data."""
    base, top = base_and_overlay(tmp_path)
    blk, cor, ov = g.cor(top, qcow2={"backing": delayed_base(g, base, 200_000)})
    done: list = []
    buf = submit_read(blk, 64 * KIB, 64 * KIB, done)
    run_until(lambda: any(k == COPY for k, _s, _e in cor.drv.ranges._held))
    submit_write(blk, 64 * KIB + 4 * KIB, b"\xee" * 4096, done)
    run_until(lambda: cor.drv.ranges._waiting or done)
    assert not done and cor.drv.ranges._waiting  # the write waits for the copy-up
    run_until(lambda: len(done) == 2, timeout=10)
    assert done == [("read", 0), ("write", 0)]
    assert bytes(buf) == b"\xaa" * (64 * KIB)  # the read saw the data before the write
    want = b"\xaa" * 4096 + b"\xee" * 4096 + b"\xaa" * (56 * KIB)
    assert read(blk, 64 * KIB, 64 * KIB) == want
    g.close()
    check_clean(top)
    qemu_io_alone(top, "read -P 0xaa 64k 4k", "read -P 0xee 68k 4k", "read -P 0xaa 72k 56k")


def test_a_copy_up_waits_for_a_write_in_flight(g, tmp_path) -> None:
    """A guest write allocating a cluster is in flight (qcow2 is reading the rest of the
    cluster from the slow base) when a read of that cluster arrives: without the filter's
    range lock, the read's copy would find the cluster unallocated, read the base's old data
    and write it over the guest's once the write completed."""
    base, top = base_and_overlay(tmp_path)
    blk, cor, ov = g.cor(top, qcow2={"backing": delayed_base(g, base, 200_000)})
    done: list = []
    submit_write(blk, 128 * KIB, b"\xee" * 4096, done)
    run_until(lambda: ov.drv.ranges.busy(2, 3))  # qcow2's allocating write holds cluster 2
    buf = submit_read(blk, 128 * KIB, 64 * KIB, done)
    run_until(lambda: cor.drv.ranges._waiting or done)
    assert not done and cor.drv.ranges._waiting  # the copy-up waits for the write
    run_until(lambda: len(done) == 2, timeout=10)
    assert done == [("write", 0), ("read", 0)]
    want = b"\xee" * 4096 + b"\xaa" * (60 * KIB)
    assert bytes(buf) == want
    assert cor.drv.copied_bytes == 0  # the write allocated the whole cluster
    g.close()
    check_clean(top)
    qemu_io_alone(top, "read -P 0xee 128k 4k", "read -P 0xaa 132k 60k")


@pytest.mark.parametrize("seed", [1, 2])
def test_random_concurrent_reads_and_writes(g, tmp_path, seed) -> None:
    """Many reads (copy-ups) and writes to a few clusters in flight at once, the base slow
    now and then: afterwards the overlay holds every write and the base's data elsewhere."""
    rnd = random.Random(seed)
    base = create(tmp_path / "base.qcow2", "1M", cluster_size="4k")
    base_data = rnd.randbytes(MIB)
    (tmp_path / "b.raw").write_bytes(base_data)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k",
             str(tmp_path / "b.raw"), base)
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o",
             "cluster_size=4k", top)
    blk, cor, ov = g.cor(top, qcow2={"backing": delayed_base(g, base, 3000, every=3)})
    want = bytearray(base_data)
    sectors = rnd.sample(range(256), 120)  # in the first 128 KiB: 32 clusters, much overlap
    done: list = []
    keep = []  # the read buffers, alive until the reads complete
    for i, s in enumerate(sectors):
        data = bytes([i + 1]) * 512
        want[s * 512:(s + 1) * 512] = data
        submit_write(blk, s * 512, data, done)
        for _ in range(2):
            off = rnd.randrange(0, 160) * 512
            keep.append(submit_read(blk, off, rnd.choice([512, 4096, 12288]), done))
    run_until(lambda: len(done) == len(sectors) * 3, timeout=60)
    assert all(ret == 0 for _k, ret in done), done
    assert read(blk, 0, 256 * KIB) == want[:256 * KIB]
    assert not cor.drv.ranges.busy
    g.close()
    check_clean(top)
    assert raw_of(top, tmp_path) == bytes(want)


# -- bottom ------------------------------------------------------------------------------------
def _chain(g: Graph, tmp_path: Path) -> tuple[str, Any, Any]:
    """base (0x11 in the first 64k) <- mid (0x22 in the next 64k) <- top, base and mid as
    named read-only nodes."""
    base = create(tmp_path / "base.qcow2", "1M")
    qemu_io(base, "write -P 0x11 0 64k")
    mid = str(tmp_path / "mid.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", mid)
    qemu_io(mid, "write -P 0x22 64k 64k")
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    b = g.node({"driver": "qcow2", "node-name": unique("b"), "read-only": True,
                "file": {"driver": "file", "filename": base}})
    m = g.node({"driver": "qcow2", "node-name": unique("m"), "read-only": True,
                "backing": b.node_name, "file": {"driver": "file", "filename": mid}})
    return top, b, m


@pytest.mark.parametrize("which", ["mid", "base"])
def test_bottom_limits_what_is_copied(g, tmp_path, which) -> None:
    top, b, m = _chain(g, tmp_path)
    bottom = m if which == "mid" else b
    blk, cor, ov = g.cor(top, qcow2={"backing": m.node_name}, bottom=bottom.node_name)
    assert read(blk, 0, 192 * KIB) == b"\x11" * (64 * KIB) + b"\x22" * (64 * KIB) + \
        bytes(64 * KIB)
    g.close()
    check_clean(top)
    assert own(top, 64 * KIB, 64 * KIB)
    if which == "mid":  # the base's data and the zeroes below everything: not copied
        assert none_own(top, 0, 64 * KIB) and none_own(top, 128 * KIB, 64 * KIB)
    else:
        assert own(top, 0, 64 * KIB) and none_own(top, 128 * KIB, 64 * KIB)
    assert raw_of(top, tmp_path)[:128 * KIB] == b"\x11" * (64 * KIB) + b"\x22" * (64 * KIB)


def test_bad_bottom_and_read_only_child_are_refused(g, tmp_path) -> None:
    top, b, m = _chain(g, tmp_path)

    def refused(match: str, **opts: Any) -> None:
        with pytest.raises(BlockDriverError, match=match):
            g.cor(top, qcow2={"backing": m.node_name}, **opts)

    refused("Bottom node 'nope' not found", bottom="nope")
    other = g.node({"driver": "null-co", "node-name": unique("x")})
    refused(f"Bottom node '{other.node_name}' is not in the backing chain of",
            bottom=other.node_name)
    flt = g.node({"driver": "x-count", "node-name": unique("f"), "file": b.node_name})
    refused(f"Bottom node '{flt.node_name}' is a filter", bottom=flt.node_name)
    refused("is read-only: copy-on-read writes into its 'file' child", **{"read-only": True})
    assert b.refcnt >= 1 and m.refcnt >= 1  # nothing leaked or dropped by the failures
    blk, cor, ov = g.cor(top, qcow2={"backing": m.node_name}, bottom=b.node_name)
    refs = b.refcnt
    g.blks.remove(blk)
    blk_unref(blk)
    g.nodes.remove(cor)
    bdrv_unref(cor)
    assert b.refcnt == refs - 1  # the bottom's reference goes with the node


# -- the allocation query ----------------------------------------------------------------------
def _query(bs, ctx, offset: int, n: int) -> tuple[int, int]:
    out: list = []
    bdrv_aio_is_allocated(bs, ctx, offset, n, lambda r, m: out.append((r, m)))
    run_until(lambda: out)
    return out[0]


@pytest.mark.parametrize("o", [{"cluster_size": "64k"}, {"cluster_size": "4k"},
                               {"cluster_size": "64k", "extended_l2": "on"},
                               {"cluster_size": "64k", "compat": "0.10"}])
def test_qcow2_allocation_agrees_with_qemu_img_map(g, tmp_path, main_ctx, o) -> None:
    base, top = base_and_overlay(tmp_path, "8M", **o)
    cmds = ["write -P 1 1M 4k", "write -P 2 1152k 200k", "write -P 3 6M 1M"]
    if o.get("compat") != "0.10":
        cmds.append("write -z 3M 128k")
    qemu_io(top, *cmds)
    rnd = random.Random(1)
    n = g.node({"driver": "qcow2", "node-name": unique("q"), "read-only": True,
                "file": {"driver": "file", "filename": top}})
    # Over a filter too: the question goes down to the qcow2 node.
    f = g.node({"driver": "x-count", "node-name": unique("c"), "read-only": True,
                "file": n.node_name})
    mapped = depths(top)
    size = 8 * MIB
    for node in (n, f):
        for start in [0, *(rnd.randrange(0, size // 512) * 512 for _ in range(40))]:
            pos = start
            while pos < size:
                ret, m = _query(node, main_ctx, pos, size - pos)
                assert ret in (0, 1) and 0 < m <= size - pos
                for e in mapped:
                    if e["start"] < pos + m and pos < e["start"] + e["length"]:
                        assert (e["depth"] == 0) == bool(ret), (pos, m, ret, e)
                pos += m
        assert _query(node, main_ctx, size, 512) == (0, 0)  # past the end


def test_write_lock_bookkeeping() -> None:
    """The range tracker alone: writes share, copy-ups exclude, arrival order is kept."""
    from blocklayer.drivers.copy_on_read import _RangeTracker

    class Ctx:
        def __init__(self) -> None:
            self.ran: list = []

        def schedule(self, fn, *args) -> None:
            self.ran.append(fn)
            fn(*args)

    t, ctx, log = _RangeTracker(), Ctx(), []
    t.acquire(WRITE, 0, 100, ctx, lambda: log.append("w1"))
    t.acquire(WRITE, 50, 150, ctx, lambda: log.append("w2"))  # writes share
    t.acquire(COPY, 0, 4096, ctx, lambda: log.append("c1"))  # waits for both
    t.acquire(WRITE, 4000, 4100, ctx, lambda: log.append("w3"))  # waits behind c1
    t.acquire(WRITE, 8192, 8200, ctx, lambda: log.append("w4"))  # no overlap: runs
    assert log == ["w1", "w2", "w4"]
    t.release(WRITE, 0, 100)
    assert log == ["w1", "w2", "w4"]
    t.release(WRITE, 50, 150)
    assert log == ["w1", "w2", "w4", "c1"]
    t.release(COPY, 0, 4096)
    assert log[-1] == "w3"
    t.release(WRITE, 4000, 4100)
    t.release(WRITE, 8192, 8200)
    assert not t.busy
