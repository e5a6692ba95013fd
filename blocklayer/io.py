"""Requests on a node: the generic rules between a parent and a node's driver (QEMU's
``block/io.c``).

Theory of operation
-------------------
Whoever submits I/O to a node — a BlockBackend to its root, a format or filter driver to its
child — goes through these functions, never straight to ``bs.drv``: the rules that belong to
every node are applied here once:

* **Alignment.**  A node has a request alignment and a memory alignment (``bs.request_alignment``
  / ``bs.mem_alignment``: a file opened with O_DIRECT on a 4 KiB-sector disk needs 4 KiB
  offsets, lengths and often buffers).  A request that does not fit is *padded*: a read reads
  the aligned range into an aligned bounce buffer and copies the part asked for; a write reads
  the head and tail blocks it only partly covers, patches them and writes the aligned range —
  holding that range in the node's RmwTracker (``blocklayer/rmw.py``) so that two sub-block
  writes to one block both land.  Misaligned guest memory alone is bounced without padding.
  Drivers never see a request their node cannot take.  (The C request path serves only aligned
  requests and leaves the rest to this code; see ``pyvu_blkstate.align_mask``.)
* ``detect-zeroes=on|unmap``: a write of nothing but zeroes becomes a write-zeroes (which may
  deallocate with ``unmap``, QEMU's bdrv_co_do_zero_pwritev shortcut).
* A discard reaches the driver only on a node opened with ``discard=unmap`` (BDRV_O_UNMAP), and
  only its aligned part (discard is advisory); a write-zeroes may deallocate only there; one the
  driver cannot do, or an unaligned one, is written as zeroed buffers
  (bdrv_co_do_pwrite_zeroes' fallback).

* **Batches.**  ``bdrv_batch`` gives a batch of parsed requests (``blocklayer/batch.py``) to
  the driver's ``batch_io`` when the node has one and none of the rules above needs a look at
  a request.  The requests that need one go through the per-request functions below first
  (``bdrv_batch_each``): every request on a node with ``detect-zeroes`` or without
  ``batch_io``, and otherwise each request of a type the driver's ``batch_io`` does not take
  (``batch_types``; by default only reads, writes and flushes: a discard or write-zeroes always
  meets the discard policy and the fallback above), misaligned for this node, or marked EACH by
  C (misaligned for the root, or the redo of a request a C engine could not finish).  This is
  the one place that decides it: a ``batch_io`` only ever sees what it declared.

Each function runs in the caller's AioContext, and ``cb(ret)`` runs there too (0 or -errno).
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import Callable

from blocklayer.aio import AioContext
from blocklayer.batch import (
    BATCH_TYPES,
    EACH,
    T_DISCARD,
    T_FLUSH,
    T_READ,
    T_WRITE,
    T_WRITE_ZEROES,
    UNSET,
    Batch,
)
from blocklayer.bdrv import BDRV_REQ_MAY_UNMAP, BlockDriverState, Completion
from blocklayer.iov import IOVector
from vhost.ffi import ffi, lib


def _fits(bs: BlockDriverState, offset: int, qiov: IOVector) -> bool:
    a = bs.request_alignment
    if (offset | qiov.size) & (a - 1):
        return False
    return bs.mem_alignment <= 1 or qiov.is_aligned(bs.mem_alignment)


class _Bounce:
    """An anonymous mapping (page-aligned, so aligned for any O_DIRECT) and its C pointer."""

    __slots__ = ("map", "ptr", "qiov")

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size)
        self.ptr = ffi.from_buffer(self.map)
        self.qiov = IOVector.from_buffers([self.map])

    def part(self, skip: int, size: int) -> IOVector:
        return self.qiov.slice_from(skip).slice_to(size)

    def close(self) -> None:
        self.qiov = None  # type: ignore[assignment]
        self.ptr = None
        try:
            self.map.close()
        except BufferError:
            pass  # a view is still referenced somewhere: the GC unmaps it later


def _span(bs: BlockDriverState, offset: int, size: int) -> tuple[int, int]:
    a = bs.request_alignment
    return offset - offset % a, -(-(offset + size) // a) * a


def bdrv_aio_preadv(bs: BlockDriverState, ctx: AioContext, offset: int, qiov: IOVector,
                    cb: Completion) -> None:
    if _fits(bs, offset, qiov):
        bs.drv.aio_preadv(ctx, offset, qiov, cb)
        return
    start, end = _span(bs, offset, qiov.size)
    buf = _Bounce(end - start)

    def done(ret: int) -> None:
        if ret >= 0:
            lib.pyvu_iov_from_buf(qiov.iov, qiov.niov, buf.ptr + (offset - start), qiov.size)
        buf.close()
        cb(ret)

    bs.drv.aio_preadv(ctx, start, buf.qiov, done)


def bdrv_aio_pwritev(bs: BlockDriverState, ctx: AioContext, offset: int, qiov: IOVector,
                     flags: int, cb: Completion) -> None:
    if bs.detect_zeroes != "off" and qiov.size and lib.pyvu_iov_is_zero(qiov.iov, qiov.niov):
        if bs.detect_zeroes == "unmap":
            flags |= BDRV_REQ_MAY_UNMAP
        bdrv_aio_pwrite_zeroes(bs, ctx, offset, qiov.size, flags, cb)
        return
    _pwritev(bs, ctx, offset, qiov, flags, cb)


def _pwritev(bs: BlockDriverState, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
             cb: Completion) -> None:
    """A write, padded or bounced if the node needs it (no zero detection: the zero-write
    fallback comes through here too)."""
    if _fits(bs, offset, qiov):
        bs.drv.aio_pwritev(ctx, offset, qiov, flags, cb)
        return
    start, end = _span(bs, offset, qiov.size)
    if start == offset and end == offset + qiov.size:  # only the memory is misaligned
        buf = _Bounce(end - start)
        lib.pyvu_iov_to_buf(qiov.iov, qiov.niov, buf.ptr, qiov.size)

        def bounced(ret: int) -> None:
            buf.close()
            cb(ret)

        bs.drv.aio_pwritev(ctx, start, buf.qiov, flags, bounced)
        return
    bs.rmw.acquire(start, end, ctx, lambda: _rmw(bs, ctx, offset, qiov, flags, start, end, cb))


def _rmw(bs: BlockDriverState, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
         start: int, end: int, cb: Completion) -> None:
    """Read the partly covered head/tail blocks, patch in the data, write [start, end).
    Runs holding [start, end) in bs.rmw; releases it when the write completed."""
    a = bs.request_alignment
    buf = _Bounce(end - start)
    reads = []
    if offset != start:
        reads.append(0)
    if offset + qiov.size != end and (end - a != start or not reads):
        reads.append(end - a - start)
    left = [len(reads)]
    failed = [0]

    def finish(ret: int) -> None:
        buf.close()
        bs.rmw.release(start, end)
        cb(ret)

    def write() -> None:
        if failed[0]:
            finish(failed[0])
            return
        lib.pyvu_iov_to_buf(qiov.iov, qiov.niov, buf.ptr + (offset - start), qiov.size)
        bs.drv.aio_pwritev(ctx, start, buf.qiov, flags, finish)

    def got(ret: int) -> None:
        if ret < 0 and not failed[0]:
            failed[0] = ret
        left[0] -= 1
        if left[0] == 0:
            write()

    for skip in reads:
        bs.drv.aio_preadv(ctx, start + skip, buf.part(skip, a), got)


def bdrv_aio_flush(bs: BlockDriverState, ctx: AioContext, cb: Completion) -> None:
    bs.drv.aio_flush(ctx, cb)


def bdrv_aio_pdiscard(bs: BlockDriverState, ctx: AioContext, offset: int, nbytes: int,
                      cb: Completion) -> None:
    """Discard a range: its aligned part; on a node with ``discard=ignore`` (QEMU's default)
    nothing (a discard is advisory, so both succeed)."""
    a = bs.request_alignment
    start, end = -(-offset // a) * a, (offset + nbytes) // a * a
    if not bs.unmap or end <= start:
        cb(0)
    else:
        bs.drv.aio_pdiscard(ctx, start, end - start, cb)


def bdrv_aio_pwrite_zeroes(bs: BlockDriverState, ctx: AioContext, offset: int, nbytes: int,
                           flags: int, cb: Completion) -> None:
    """Make a range read as zeroes.  BDRV_REQ_MAY_UNMAP lets the driver deallocate it, but
    only on a node with ``discard=unmap``."""
    f = flags if bs.unmap else flags & ~BDRV_REQ_MAY_UNMAP
    if (offset | nbytes) & (bs.request_alignment - 1):
        _write_zero_buffers(bs, ctx, offset, nbytes, f & ~BDRV_REQ_MAY_UNMAP, cb)
        return

    def done(ret: int) -> None:
        if ret == -errno.ENOTSUP:  # the driver cannot: write a zeroed buffer instead
            _write_zero_buffers(bs, ctx, offset, nbytes, f & ~BDRV_REQ_MAY_UNMAP, cb)
        else:
            cb(ret)

    bs.drv.aio_pwrite_zeroes(ctx, offset, nbytes, f, done)


_ZERO_CHUNK = 1 << 20
_zeroes = bytearray(_ZERO_CHUNK)  # never written to: drivers only read from it


def _write_zero_buffers(bs: BlockDriverState, ctx: AioContext, offset: int, nbytes: int,
                        flags: int, cb: Completion) -> None:
    """bdrv_co_do_pwrite_zeroes' fallback: write zeroes in chunks of at most 1 MiB."""
    if nbytes == 0:
        cb(0)
        return
    n = min(nbytes, _ZERO_CHUNK)
    qiov = IOVector.from_buffers([memoryview(_zeroes)[:n]])

    def next_chunk(ret: int) -> None:
        if ret < 0:
            cb(ret)
        else:
            _write_zero_buffers(bs, ctx, offset + n, nbytes - n, flags, cb)

    _pwritev(bs, ctx, offset, qiov, flags, next_chunk)  # padded if need be


def bdrv_batch(bs: BlockDriverState, b: Batch) -> None:
    """Serve the batch's requests not yet taken (``ret[i] == UNSET``) on node ``bs``: its
    driver's ``batch_io`` for those it takes as they are, the others one by one through
    ``bdrv_aio_*`` (the module docstring says which).  In ``b.ctx``.  Each request ends
    answered (``ret[i]``) or taken (PENDING), as batch.py says."""
    drv = bs.drv
    batch_io = drv.batch_io
    if batch_io is None or bs.detect_zeroes != "off":
        bdrv_batch_each(bs, b)
        return
    mask = bs.request_alignment - 1
    if b.special or mask:
        taken = getattr(drv, "batch_types", BATCH_TYPES)
        types, flags, offs, lens, ret = b.types, b.flags, b.offsets, b.lengths, b.ret
        # C checked alignment against the root; a filter's offset may have moved requests
        # off this node's alignment: those take the padding path too.
        odd = [i for i in range(b.n) if ret[i] == UNSET and (
            flags[i] & EACH or types[i] not in taken or (offs[i] | lens[i]) & mask)]
        if odd:
            bdrv_batch_each(bs, b, odd)
    batch_io(b)


def bdrv_batch_each(bs: BlockDriverState, b: Batch, which: range | list[int] | None = None
                    ) -> None:
    """Serve the batch's requests (all, or those in ``which``) not yet taken one by one through
    ``bdrv_aio_*`` (the node's rules, then its driver's ``aio_*``).  In ``b.ctx``."""
    ctx, types, ret = b.ctx, b.types, b.ret
    for i in which if which is not None else range(b.n):
        if ret[i] != UNSET:
            continue
        t, done = types[i], b.defer(i)
        if t == T_READ:
            bdrv_aio_preadv(bs, ctx, b.offsets[i], b.qiov(i), done)
        elif t == T_WRITE:
            bdrv_aio_pwritev(bs, ctx, b.offsets[i], b.qiov(i), b.flags[i] & ~EACH, done)
        elif t == T_FLUSH:
            bdrv_aio_flush(bs, ctx, done)
        elif t == T_DISCARD:
            bdrv_aio_pdiscard(bs, ctx, b.offsets[i], b.lengths[i], done)
        elif t == T_WRITE_ZEROES:
            bdrv_aio_pwrite_zeroes(bs, ctx, b.offsets[i], b.lengths[i], b.flags[i] & ~EACH,
                                   done)
        else:
            done(-errno.ENOTSUP)


def bdrv_aio_is_allocated(bs: BlockDriverState, ctx: AioContext, offset: int, nbytes: int,
                          cb: Callable[[int, int], None]) -> None:
    """QEMU's bdrv_is_allocated on node ``bs``: ``cb(ret, n)`` as
    ``BlockDriver.aio_is_allocated`` says, the range clamped to the node's length (``n`` 0
    past its end); filters pass the question to their child (``FilterDriver``)."""
    nbytes = min(nbytes, bs.bdrv_getlength() - offset)
    if nbytes <= 0:
        cb(0, 0)
        return
    bs.drv.aio_is_allocated(ctx, offset, nbytes, cb)
