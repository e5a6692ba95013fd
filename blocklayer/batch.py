"""Batch: parsed requests handed to the node graph as plain values, many per call.

Theory of operation
-------------------
The C queue loop (``vhost/csrc/virtio_blk_queue.c``) parses and checks every request (range,
writable, DISCARD / WRITE_ZEROES' segment, in flight, accounting, write-through →
BDRV_REQ_FUA) and answers what needs no node (GET_ID, invalid, unsupported, malformed).  What
the C engines cannot serve end to end — a node only Python implements, a filter in the graph,
the C path switched off, a discard or write-zeroes, a request misaligned for the node, no
medium — waits on the queue's batch list.  The device takes it into a ``Batch`` (parallel C
arrays, no object per request) and hands it to the root node with ``bdrv_batch``
(``blocklayer/io.py``), which gives the driver's ``batch_io`` the types it declares
(``batch_types``, by default reads, writes and flushes) and serves every other request one by
one through the node's rules (``bdrv_batch_each``).

Per request ``i`` (``0 <= i < n``): ``types[i]`` (T_READ / T_WRITE / T_FLUSH / T_DISCARD /
T_WRITE_ZEROES), ``flags[i]`` (BDRV_REQ_FUA, BDRV_REQ_MAY_UNMAP, and EACH: serve it request by
request, never through a ``batch_io``), ``offsets[i]`` and ``lengths[i]`` in bytes on the root
node, ``iovs[i]``/``niovs[i]`` the data buffers (guest memory, valid until the request
completes; none for a flush, discard or write-zeroes).  ``special`` counts the entries that are
not plain reads, writes and flushes.  Whoever serves request ``i`` either sets ``ret[i]`` to 0
or -errno before returning, or takes it for later: ``defer(i)`` gives a completion to call with
0 or -errno (in this batch's AioContext), and ``lib.pyvu_fastq_submit`` hands it back to a C
engine.  Both leave ``ret[i] == PENDING``.  ``ret[i]`` starts as UNSET: a request nobody
answered fails with EIO rather than hanging (a driver's bug never leaks one).  ``finish()``
hands the answered ones back to C, which accounts and pushes them; failures go to the error
policy (rerror/werror) through the queue's failed list.

Runs in the queue's AioContext; a Batch belongs to one queue and is reused for its next batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blocklayer.iov import IOVector
from vhost.ffi import ffi, lib

# virtio-blk's request types (vhost/pyvu.h)
T_READ, T_WRITE, T_FLUSH = lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH
T_DISCARD, T_WRITE_ZEROES = lib.VIRTIO_BLK_T_DISCARD, lib.VIRTIO_BLK_T_WRITE_ZEROES
#: what a driver's ``batch_io`` takes unless its class says otherwise (``batch_types``)
BATCH_TYPES = frozenset((T_READ, T_WRITE, T_FLUSH))
EACH = lib.PYVU_BATCH_EACH
PENDING = lib.PYVU_BATCH_PENDING
UNSET = lib.PYVU_BATCH_UNSET


class Batch:
    """Parallel C arrays describing ``n`` parsed requests of one queue (filled by ``take``)."""

    MAX = lib.PYVU_BATCH_TAKE  # per take: answered and pushed before the next (pyvu.h)

    def __init__(self, ctx: Any, cq: Any, on_late_done: Callable[[], None],
                 size: int | None = None) -> None:
        m = self.size = size or self.MAX  # a batch filled by hand (tests) may be larger
        self.ctx = ctx  # the queue's AioContext
        self.cq = cq  # struct pyvu_fastq *
        self._on_late_done = on_late_done  # push and report what completed after finish()
        self.handles = ffi.new("void *[]", m)
        self.types = ffi.new("int[]", m)
        self.flags = ffi.new("int[]", m)
        self.offsets = ffi.new("uint64_t[]", m)
        self.lengths = ffi.new("uint64_t[]", m)
        self.iovs = ffi.new("struct iovec *[]", m)
        self.niovs = ffi.new("unsigned[]", m)
        self.ret = ffi.new("int[]", m)
        self._special = ffi.new("int *")
        self.n = 0
        self._serving = 0  # generation of the batch being served (0: none)
        self._gen = 0

    def take(self) -> int:
        """Fill the arrays with up to ``size`` requests of the queue's batch list."""
        self.n = lib.pyvu_fastq_take_batch(self.cq, self.handles, self.types, self.flags,
                                           self.offsets, self.lengths, self.iovs, self.niovs,
                                           self.ret, self._special, self.size)
        self._gen += 1
        self._serving = self._gen
        return self.n

    @property
    def special(self) -> int:
        """How many requests are not plain reads, writes and flushes (C counted them)."""
        return self._special[0]

    def finish(self) -> None:
        """Hand every answered request back to C (accounted, pushed, or failed)."""
        self._serving = 0
        lib.pyvu_fastq_batch_done(self.cq, self.handles, self.ret, self.n)

    def fail_unanswered(self, err: int) -> None:
        """A driver raised: every request it neither answered nor took fails with ``err``."""
        ret = self.ret
        for i in range(self.n):
            if ret[i] == UNSET:
                ret[i] = err

    def defer(self, i: int) -> Callable[[int], None]:
        """Take request ``i`` for later: call the result once with 0 or -errno, in self.ctx."""
        handle, gen, cq = self.handles[i], self._gen, self.cq
        self.ret[i] = PENDING

        def done(ret: int) -> None:
            ret = ret if ret < 0 else 0
            if self._serving == gen:
                self.ret[i] = ret  # answered before the batch was handed back
            else:
                lib.pyvu_fastq_req_done(cq, handle, ret)
                self._on_late_done()

        return done

    def qiov(self, i: int) -> IOVector:
        """Request ``i``'s data buffers as an IOVector (zero-copy)."""
        return IOVector(self.iovs[i], self.niovs[i], self.lengths[i])

    def buffer(self, i: int) -> memoryview:
        """Request ``i``'s data as one writable memoryview when it is one buffer (the usual
        case); a copy-free view is impossible otherwise, so ``None`` is never returned:
        multi-buffer requests raise ValueError and callers use ``qiov(i)``."""
        if self.niovs[i] != 1:
            raise ValueError("request has several buffers")
        v = self.iovs[i][0]
        return memoryview(ffi.buffer(v.iov_base, v.iov_len))
