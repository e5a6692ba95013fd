"""FilterDriver: the base of nodes that sit over one ``file`` child and pass requests down.

As an nbdkit filter, a subclass does its own work and calls the next layer: every request,
the length and resizing go to the child (through ``blocklayer/io.py``, so the child's own rules
apply), shifted by ``offset`` bytes (0 unless the subclass says otherwise, as ``raw`` does).
A filter declares no C path, so its requests are served in Python unless it says otherwise.
``batch_forward`` passes a whole batch down (shifted) for filters with nothing to do per
request; a subclass opts in with ``batch_io = FilterDriver.batch_forward`` — a filter that
overrides ``aio_*`` and inherited it would be bypassed.
"""

from __future__ import annotations

from collections.abc import Callable

from blocklayer.aio import AioContext
from blocklayer.batch import UNSET, Batch
from blocklayer.bdrv import BlockDriver, BlockDriverState, Completion, bdrv_truncate
from blocklayer.io import (
    bdrv_aio_flush,
    bdrv_aio_is_allocated,
    bdrv_aio_pdiscard,
    bdrv_aio_preadv,
    bdrv_aio_pwrite_zeroes,
    bdrv_aio_pwritev,
    bdrv_batch,
)
from blocklayer.iov import IOVector


class FilterDriver(BlockDriver):
    child_roles = {"file": True}
    offset = 0  # bytes added to every request before it goes down

    @property
    def file(self) -> BlockDriverState:
        assert self.bs is not None
        return self.bs.children["file"].bs

    def getlength(self) -> int:
        return max(0, self.file.bdrv_getlength() - self.offset)

    def truncate(self, size: int) -> None:
        bdrv_truncate(self.file, size + self.offset)

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        bdrv_aio_preadv(self.file, ctx, offset + self.offset, qiov, cb)

    def aio_pwritev(self, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
                    cb: Completion) -> None:
        bdrv_aio_pwritev(self.file, ctx, offset + self.offset, qiov, flags, cb)

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        bdrv_aio_flush(self.file, ctx, cb)

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        bdrv_aio_pdiscard(self.file, ctx, offset + self.offset, nbytes, cb)

    def aio_pwrite_zeroes(self, ctx: AioContext, offset: int, nbytes: int, flags: int,
                          cb: Completion) -> None:
        bdrv_aio_pwrite_zeroes(self.file, ctx, offset + self.offset, nbytes, flags, cb)

    def aio_is_allocated(self, ctx: AioContext, offset: int, nbytes: int,
                         cb: Callable[[int, int], None]) -> None:
        """A filter holds no data of its own: its child's answer, shifted."""
        bdrv_aio_is_allocated(self.file, ctx, offset + self.offset, nbytes, cb)

    def batch_forward(self, b: Batch) -> None:
        """Pass the batch to the child, shifted by ``offset``.  In ``b.ctx``."""
        if self.offset:
            offs, ret, delta = b.offsets, b.ret, self.offset
            for i in range(b.n):
                if ret[i] == UNSET:
                    offs[i] += delta
        bdrv_batch(self.file, b)
