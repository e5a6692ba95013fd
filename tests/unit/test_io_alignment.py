"""blocklayer/io.py pads and bounces requests a node cannot take as they are (unit level: a
file node told it needs 4 KiB requests and 512-byte buffers; the loop-device tests in
tests/integration/test_block_devices.py do the same on real 4 KiB-sector devices)."""

from __future__ import annotations

import random

from blocklayer.iov import IOVector
from blocklayer.rmw import RmwTracker
from tests.unit.conftest import pattern
from tests.unit.test_drivers import do

KIB = 1024


def _node(make_node, image, data: bytes):
    bs = make_node({"driver": "file", "filename": image(data), "aio": "threads"})
    bs.request_alignment, bs.mem_alignment = 4096, 512
    return bs


def test_sub_block_reads_and_writes_are_padded(main_ctx, make_node, make_blk, image) -> None:
    data = bytearray(pattern(64 * KIB))
    bs = _node(make_node, image, bytes(data))
    seen: list[tuple[str, int, int, bool]] = []
    drv = bs.drv
    orig_r, orig_w = drv.aio_preadv, drv.aio_pwritev

    def rd(ctx, off, q, cb):
        seen.append(("r", off, q.size, q.is_aligned(512)))
        orig_r(ctx, off, q, cb)

    def wr(ctx, off, q, flags, cb):
        seen.append(("w", off, q.size, q.is_aligned(512)))
        orig_w(ctx, off, q, flags, cb)

    drv.aio_preadv, drv.aio_pwritev = rd, wr
    blk = make_blk(bs)
    rng = random.Random(1)
    for off, n in ((512, 512), (4096 + 100, 3000), (7 * 4096 - 512, 1024), (0, 4096)):
        new = rng.randbytes(n)
        assert do(blk, "write", off, bufs=[bytearray(new)])[0] == 0
        data[off:off + n] = new
        ret, q = do(blk, "read", off, nbytes=n)
        assert ret == 0 and q.to_bytes() == bytes(data[off:off + n])
    assert all(o % 4096 == 0 and s % 4096 == 0 and a for _, o, s, a in seen), seen
    with open(drv.filename, "rb") as f:
        assert f.read() == bytes(data)


def test_misaligned_memory_alone_is_bounced(main_ctx, make_node, make_blk, image) -> None:
    data = pattern(16 * KIB)
    bs = _node(make_node, image, data)
    blk = make_blk(bs)
    backing = bytearray(4096 + 8)
    view = memoryview(backing)[3:3 + 4096]  # an address that is not 512-aligned
    q = IOVector.from_buffers([view])
    assert not q.is_aligned(512)
    ret, _ = do(blk, "read", 4096, bufs=[view])
    assert ret == 0 and bytes(view) == data[4096:8192]


def test_rmw_tracker_serialises_overlapping_ranges() -> None:
    class Ctx:
        def __init__(self) -> None:
            self.queued: list = []

        def schedule(self, fn) -> None:
            self.queued.append(fn)

        def run(self) -> None:
            todo, self.queued = self.queued, []
            for fn in todo:
                fn()

    ctx, ran = Ctx(), []
    t = RmwTracker()
    t.acquire(0, 4096, ctx, lambda: ran.append("a"))
    t.acquire(4096, 8192, ctx, lambda: ran.append("b"))  # disjoint: runs at once
    t.acquire(0, 8192, ctx, lambda: ran.append("c"))  # overlaps both: waits
    t.acquire(8192, 12288, ctx, lambda: ran.append("d"))  # overlaps nothing: runs
    t.acquire(4096, 6000, ctx, lambda: ran.append("e"))  # behind c: must not overtake it
    assert ran == ["a", "b", "d"]
    t.release(0, 4096)
    ctx.run()
    assert ran == ["a", "b", "d"]  # c still overlaps b
    t.release(4096, 8192)
    ctx.run()
    assert ran == ["a", "b", "d", "c"]  # e overlaps c, which now holds
    t.release(0, 8192)
    ctx.run()
    assert ran == ["a", "b", "d", "c", "e"]
    t.release(8192, 12288)
    t.release(4096, 6000)
    assert not t.busy
