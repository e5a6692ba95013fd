"""x-memory: a disk whose data lives in a Python ``bytearray`` — a driver written in Python.

It is both an example of a Python driver and a test backend: every byte really is stored, so
data can be verified, and every request runs Python code.  Reads, writes and flushes arrive in
batches through ``batch_io`` (the queue's C loop parses, checks and accounts them; one Python
call serves a whole batch); everything else (discard, write-zeroes, requests the virtio
handler serves) goes through the usual ``aio_*`` callbacks.

Options: ``size`` (default 64 MiB).  Contents start as zeroes and vanish with the process.
"""

from __future__ import annotations

from typing import Any

from blocklayer.aio import AioContext
from blocklayer.batch import T_READ, T_WRITE, UNSET, Batch
from blocklayer.bdrv import BlockDriver, Completion, bdrv_register
from blocklayer.iov import IOVector
from blocklayer.qapi import to_size
from vhost.ffi import ffi, lib

DEFAULT_SIZE = 64 << 20


@bdrv_register
class MemoryDriver(BlockDriver):
    format_name = "x-memory"
    options = {"size": to_size}

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        self._resize(opts.get("size", DEFAULT_SIZE))

    def _resize(self, size: int) -> None:
        old = getattr(self, "data", bytearray())
        self.data = bytearray(size)
        self.data[: min(size, len(old))] = old[:size]
        self._base = ffi.from_buffer(self.data)  # char[]: base + offset is a char *

    def getlength(self) -> int:
        return len(self.data)

    def truncate(self, size: int) -> None:
        self._resize(size)

    # -- batched requests from the C queue loop (the queue's AioContext) ---------------------
    def batch_io(self, b: Batch) -> None:
        """Serve ``b.n`` parsed, range-checked requests; set ``b.ret[i]`` (0 or -errno)."""
        # Each C array is read into a Python list with one call (indexing a C array costs a
        # cffi call per element) and the answers go back with one slice assignment.
        n, unpack, base = b.n, ffi.unpack, self._base
        tl, rl, ol = unpack(b.types, n), unpack(b.ret, n), unpack(b.offsets, n)
        il, nl, ll = unpack(b.iovs, n), unpack(b.niovs, n), unpack(b.lengths, n)
        from_buf, to_buf = lib.pyvu_iov_from_buf, lib.pyvu_iov_to_buf
        for i in range(n):
            if rl[i] != UNSET:
                continue
            t = tl[i]
            if t == T_READ:
                from_buf(il[i], nl[i], base + ol[i], ll[i])
            elif t == T_WRITE:
                to_buf(il[i], nl[i], base + ol[i], ll[i])
            rl[i] = 0  # flush: memory is as stable as it gets
        b.ret[0:n] = rl

    # -- the generic path ---------------------------------------------------------------------
    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        lib.pyvu_iov_from_buf(qiov.iov, qiov.niov, self._base + offset, qiov.size)
        cb(0)

    def aio_pwritev(
        self, ctx: AioContext, offset: int, qiov: IOVector, flags: int, cb: Completion
    ) -> None:
        lib.pyvu_iov_to_buf(qiov.iov, qiov.niov, self._base + offset, qiov.size)
        cb(0)

    def aio_pwrite_zeroes(
        self, ctx: AioContext, offset: int, nbytes: int, flags: int, cb: Completion
    ) -> None:
        self.data[offset:offset + nbytes] = bytes(nbytes)
        cb(0)

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        self.data[offset:offset + nbytes] = bytes(nbytes)
        cb(0)
