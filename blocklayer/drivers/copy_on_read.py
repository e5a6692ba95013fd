"""``driver=copy-on-read``: QEMU's copy-on-read filter (``block/copy-on-read.c``).

``--blockdev driver=copy-on-read,node-name=c,file=NODE[,bottom=BASE]`` passes every request to
its ``file`` child; what a read finds *unallocated* in the child — data that came from the
child's backing chain (or zeroes it has no chain for) — is also written into the child, so the
next read of it is served by the top image.  Writes, write-zeroes, discards and flushes pass
through unchanged.  With ``bottom=BASE`` (a node of the child's backing chain, not a filter)
only data allocated in the chain from the child's backing node down to BASE inclusive is
copied (QEMU's option, used by block-stream): what lies below BASE is read, never copied.

Theory of operation
-------------------
**Allocation** comes from ``bdrv_aio_is_allocated`` (``blocklayer/io.py``): the node's driver
answers (``BlockDriver.aio_is_allocated``, QEMU's bdrv_is_allocated: qcow2 from its L2 tables, other
drivers "all allocated"), filters (``FilterDriver``: throttle, raw with its ``offset``...)
pass the question down, as QEMU's filters' block status does.

**A read** asks the child, without any lock, whether the whole range is allocated there; if
so it is a plain read of the child.  Otherwise the read becomes a *copy-up*, done a chunk of
at most ``MAX_BOUNCE`` bytes at a time, each widened to the child's clusters (QEMU's
``bdrv_co_do_copy_on_readv``: whole clusters are copied, so the image never has to do a
partial-cluster copy-on-write of its own): holding the chunk's range, it asks again which parts
are unallocated (and, with ``bottom``, allocated above BASE), reads the range from the child
into a bounce buffer (the child reads through its backing chain), writes the parts to copy back
into the child — a write-zeroes if a part is all zeroes (qcow2 v3 records zero clusters
without data) — and copies the bytes the guest asked for into its buffers.  A failed copy
fails the read, as in QEMU (the guest's read may be retried; the data are unchanged).

**Writes racing a copy-up.**  A copy-up writes data it read a moment before; a guest write
landing in between would be undone by that stale copy.  The filter therefore tracks its
requests by range (``_RangeTracker``, QEMU's serialising requests): writes, write-zeroes and
discards hold their range *shared* (they never wait for each other), a copy-up holds its
widened range *exclusive*, from its allocation query to the end of its write-back.  So a write
waits for a copy-up of an overlapping range and a copy-up for the writes in flight there; a
newcomer also queues behind an overlapping conflicting waiter (first come, first served: a
stream of writes does not starve a copy-up).  Plain reads of allocated data take no lock.
This orders the writes that come through the filter; another parent writing the child
directly (possible only if the node's users share *write*) is not ordered against copies.

**Permissions** (QEMU's ``cor_child_perm``): the child gets the node's consistent-read,
write and resize needs plus *write unchanged* (the copy-ups), and others may do everything
but what the node's users do not share of those three.  The child must be writable: a
read-only child is refused when the node opens (QEMU refuses WRITE_UNCHANGED on a read-only
node; the graph here only checks WRITE).

Each request runs in its caller's AioContext, as a generator coroutine of
``blocklayer/coroutine.py`` (the block layer's generic coroutine runner, shared with
qcow2).  The filter has no ``batch_io``: every request of a batch comes through the ``aio_*``
callbacks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.bdrv import (
    BlockDriverError,
    BlockDriverState,
    Completion,
    bdrv_find_node,
    bdrv_register,
    bdrv_unref,
)
from blocklayer.coroutine import Co, Op, co_start
from blocklayer.drivers.filter import FilterDriver
from blocklayer.graph import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
)
from blocklayer.io import (
    bdrv_aio_is_allocated,
    bdrv_aio_pdiscard,
    bdrv_aio_preadv,
    bdrv_aio_pwrite_zeroes,
    bdrv_aio_pwritev,
)
from blocklayer.iov import IOVector
from blocklayer.qapi import to_str
from vhost.ffi import ffi, lib

PERM_PASSTHROUGH = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE
PERM_UNCHANGED = BLK_PERM_ALL & ~PERM_PASSTHROUGH
#: the largest copy-up done at once (QEMU's MAX_BOUNCE_BUFFER is 16 MiB; a guest request
#: bigger than this is copied in several chunks)
MAX_BOUNCE = 1 << 20

IsAllocatedCb = Callable[[int, int], None]


# -- allocation --------------------------------------------------------------------------------
def _is_filter(bs: BlockDriverState) -> bool:
    """A node whose data is its ``file`` child's (QEMU's is_filter).  ``raw`` passes block
    status down too but is a format: it may be a backing node, or ``bottom``."""
    return isinstance(bs.drv, FilterDriver) and bs.drv.format_name != "raw" \
        and "file" in bs.children


def _op_is_allocated(bs: BlockDriverState, offset: int, nbytes: int, out: list[int]) -> Op:
    """``yield`` it: ``out`` becomes [ret, n] (a negative ret is raised in the coroutine)."""
    def op(ctx: AioContext, resume: Callable[[int], None]) -> None:
        def done(ret: int, n: int) -> None:
            out[:] = [ret, n]
            resume(min(ret, 0))
        bdrv_aio_is_allocated(bs, ctx, offset, nbytes, done)
    return op


def _skip_filters(bs: BlockDriverState | None) -> BlockDriverState | None:
    while bs is not None and _is_filter(bs):
        bs = bs.children["file"].bs
    return bs


def _backing_next(bs: BlockDriverState) -> BlockDriverState | None:
    """QEMU's bdrv_backing_chain_next: the next non-filter node down the backing chain."""
    top = _skip_filters(bs)
    c = top.children.get("backing") if top is not None else None
    return _skip_filters(c.bs) if c is not None else None


# -- range tracking ------------------------------------------------------------------------
WRITE, COPY = 0, 1


class _RangeTracker:
    """Ranges held by the filter's writes (shared among writes) and copy-ups (exclusive).
    Two requests *conflict* when their ranges overlap and one of them is a copy-up.  A request
    runs when it conflicts with nothing held and no earlier waiter; waiters are granted in
    arrival order, each resumed in its own AioContext.  The earliest waiter waits only for
    held requests, which never wait: no deadlock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[int, int, int]] = []  # (kind, start, end)
        self._waiting: list[tuple[int, int, int, Any, Callable[[], None]]] = []

    @staticmethod
    def _conflicts(kind: int, start: int, end: int, others: Any) -> bool:
        return any((kind | k) == COPY and s < end and start < e for k, s, e, *_ in others)

    def acquire(self, kind: int, start: int, end: int, ctx: Any,
                then: Callable[[], None]) -> None:
        """Hold [start, end) as ``kind`` and call ``then()`` — now, or later in ``ctx``.
        The caller releases it exactly once afterwards."""
        with self._lock:
            if self._conflicts(kind, start, end, self._held) or \
                    self._conflicts(kind, start, end, self._waiting):
                self._waiting.append((kind, start, end, ctx, then))
                return
            self._held.append((kind, start, end))
        then()

    def release(self, kind: int, start: int, end: int) -> None:
        ready: list[tuple[Any, Callable[[], None]]] = []
        with self._lock:
            self._held.remove((kind, start, end))
            still: list[tuple[int, int, int, Any, Callable[[], None]]] = []
            for w in self._waiting:
                k, s, e = w[0], w[1], w[2]
                if self._conflicts(k, s, e, self._held) or self._conflicts(k, s, e, still):
                    still.append(w)
                else:
                    self._held.append((k, s, e))
                    ready.append((w[3], w[4]))
            self._waiting = still
        for ctx, then in ready:
            ctx.schedule(then)

    def op(self, kind: int, start: int, end: int) -> Op:
        """``yield tracker.op(...)``: returns holding the range."""
        return lambda ctx, resume: self.acquire(kind, start, end, ctx, lambda: resume(0))

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._held or self._waiting)


# -- the driver --------------------------------------------------------------------------------
@bdrv_register
class CopyOnReadDriver(FilterDriver):
    format_name = "copy-on-read"
    options = {"bottom": to_str}

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        self.bottom_name: str | None = opts.get("bottom")
        self.bottom: BlockDriverState | None = None
        self.ranges = _RangeTracker()
        self.copied_bytes = 0  # bytes written into the child by copy-ups (query_info)

    def attach(self, bs: BlockDriverState) -> None:
        super().attach(bs)
        f = self.file
        if f.read_only or not f.drv.can_write():
            raise BlockDriverError(
                f"Block node '{f.node_name}' is read-only: copy-on-read writes into its "
                "'file' child")
        if self.bottom_name is not None:
            bottom = bdrv_find_node(self.bottom_name)
            if bottom is None:
                raise BlockDriverError(f"Bottom node '{self.bottom_name}' not found")
            if _is_filter(bottom):
                raise BlockDriverError(f"Bottom node '{self.bottom_name}' is a filter")
            n = _backing_next(f)
            while n is not None and n is not bottom:
                n = _backing_next(n)
            if n is None:
                raise BlockDriverError(
                    f"Bottom node '{self.bottom_name}' is not in the backing chain of "
                    f"'{f.node_name}'")
            bottom.refcnt += 1  # held while we may look at it (QEMU's bdrv_ref)
            self.bottom = bottom

    def close(self) -> None:
        if self.bottom is not None:
            bottom, self.bottom = self.bottom, None
            bdrv_unref(bottom)

    def child_perm(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        """QEMU's cor_child_perm."""
        return ((perm & PERM_PASSTHROUGH) | BLK_PERM_WRITE_UNCHANGED,
                (shared & PERM_PASSTHROUGH) | PERM_UNCHANGED)

    def query_info(self) -> dict[str, Any]:
        return {"x-copy-on-read": {"copied-bytes": self.copied_bytes}}

    def _granularity(self) -> int:
        """The child's cluster size (QEMU's bdrv_get_info), at least its alignment."""
        bs = _skip_filters(self.file)
        cs = getattr(bs.drv, "cluster_size", 0) if bs is not None else 0
        return max(cs or 1, self.file.request_alignment)

    # -- writes: through, holding their range shared ----------------------------------------
    def _write_locked(self, ctx: AioContext, start: int, end: int,
                      run: Callable[[Completion], None], cb: Completion) -> None:
        def done(ret: int) -> None:
            self.ranges.release(WRITE, start, end)
            cb(ret)

        self.ranges.acquire(WRITE, start, end, ctx, lambda: run(done))

    def aio_pwritev(self, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
                    cb: Completion) -> None:
        self._write_locked(ctx, offset, offset + qiov.size, lambda d: bdrv_aio_pwritev(
            self.file, ctx, offset, qiov, flags, d), cb)

    def aio_pwrite_zeroes(self, ctx: AioContext, offset: int, nbytes: int, flags: int,
                          cb: Completion) -> None:
        self._write_locked(ctx, offset, offset + nbytes, lambda d: bdrv_aio_pwrite_zeroes(
            self.file, ctx, offset, nbytes, flags, d), cb)

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        self._write_locked(ctx, offset, offset + nbytes, lambda d: bdrv_aio_pdiscard(
            self.file, ctx, offset, nbytes, d), cb)

    # -- reads -------------------------------------------------------------------------------
    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        if not qiov.size:
            cb(0)
            return
        co_start(ctx, self._co_read(offset, qiov), cb)

    def _co_read(self, offset: int, qiov: IOVector) -> Co:
        f = self.file
        n = qiov.size
        # Lock-free: all allocated in the child (the common case once copied) is a plain read.
        out = [0, 0]
        pos, end = offset, offset + n
        while pos < end:
            yield _op_is_allocated(f, pos, end - pos, out)
            if out[0] != 1 or out[1] <= 0:
                break
            pos += out[1]
        if pos >= end:
            yield lambda ctx, r: bdrv_aio_preadv(f, ctx, offset, qiov, r)
            return
        if pos > offset:  # the allocated head, then copy-ups from the first hole
            yield lambda ctx, r: bdrv_aio_preadv(f, ctx, offset, _part(qiov, 0, pos - offset), r)
        g = self._granularity()
        while pos < end:
            chunk = min(end - pos, MAX_BOUNCE)
            yield from self._co_copy_up(pos, _part(qiov, pos - offset, chunk), g)
            pos += chunk

    def _co_copy_up(self, offset: int, qiov: IOVector, g: int) -> Co:
        """Read [offset, offset + qiov.size) into ``qiov``, copying what the child lacks,
        widened to clusters of ``g`` bytes, holding that range exclusively."""
        f = self.file
        length = f.bdrv_getlength()
        start = offset - offset % g
        end = min(-(-(offset + qiov.size) // g) * g, max(length, offset + qiov.size))
        yield self.ranges.op(COPY, start, end)
        try:
            copy = yield from self._co_runs_to_copy(start, min(end, length))
            if not copy:  # copied meanwhile by another read: a plain read
                yield lambda ctx, r: bdrv_aio_preadv(f, ctx, offset, qiov, r)
                return
            # (a bytearray: freed with its last view; an O_DIRECT child bounces it)
            buf = bytearray(end - start)
            whole = IOVector.from_buffers([buf])
            yield lambda ctx, r: bdrv_aio_preadv(f, ctx, start, whole, r)
            for s, e in copy:
                part = _part(whole, s - start, e - s)
                if lib.pyvu_iov_is_zero(part.iov, part.niov):
                    yield lambda ctx, r, s=s, e=e: bdrv_aio_pwrite_zeroes(f, ctx, s, e - s, 0, r)
                else:
                    yield lambda ctx, r, s=s, part=part: bdrv_aio_pwritev(f, ctx, s, part, 0, r)
                self.copied_bytes += e - s
            lib.pyvu_iov_from_buf(qiov.iov, qiov.niov, ffi.from_buffer(buf) + (offset - start),
                                  qiov.size)
        finally:
            self.ranges.release(COPY, start, end)

    def _co_runs_to_copy(self, start: int, end: int) -> Co:
        """Under the range lock: the [s, e) runs of [start, end) unallocated in the child
        (and, with ``bottom``, allocated in the chain down to it), merged."""
        f = self.file
        runs: list[tuple[int, int]] = []
        out = [0, 0]
        pos = start
        while pos < end:
            yield _op_is_allocated(f, pos, end - pos, out)
            ret, n = out
            if n <= 0:
                break
            if not ret:
                if self.bottom is None:
                    runs.append((pos, pos + n))
                else:
                    sub = pos
                    while sub < pos + n:
                        above, m = yield from self._co_allocated_above(sub, pos + n - sub)
                        if above:
                            runs.append((sub, sub + m))
                        sub += m
            pos += n
        merged: list[tuple[int, int]] = []
        for s, e in runs:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        return merged

    def _co_allocated_above(self, offset: int, nbytes: int) -> Co:
        """QEMU's bdrv_is_allocated_above(backing of the child, bottom, include_base):
        (1 or 0, n > 0) — allocated in some node of the chain from the child's backing node
        down to ``bottom``, or in none, for the first n bytes."""
        out = [0, 0]
        node = _backing_next(self.file)
        while node is not None:
            if offset >= node.bdrv_getlength():
                break  # past this node's end it reads zeroes: nothing below counts
            yield _op_is_allocated(node, offset, nbytes, out)
            ret, n = out
            if n <= 0:
                break
            if ret:
                return 1, n
            nbytes = n
            if node is self.bottom:
                break
            node = _backing_next(node)
        return 0, nbytes


def _part(qiov: IOVector, start: int, size: int) -> IOVector:
    if start == 0 and size == qiov.size:
        return qiov
    q = qiov.slice_from(start) if start else qiov
    return q.slice_to(size) if size != q.size else q
