"""Requests on a node: the generic rules between a parent and a node's driver (QEMU's
``block/io.c``).

Theory of operation
-------------------
Whoever submits I/O to a node — a BlockBackend to its root, a format or filter driver to its
child — goes through these functions, never straight to ``bs.drv``: the rules that belong to
every node are applied here once.  Today: a discard reaches the driver only on a node opened
with ``discard=unmap`` (BDRV_O_UNMAP), a write-zeroes may deallocate only there, and a driver
that cannot write zeroes gets zeroed buffers instead (bdrv_co_do_pwrite_zeroes' fallback).

Each function runs in the caller's AioContext, and ``cb(ret)`` runs there too (0 or -errno).
"""

from __future__ import annotations

import errno

from blocklayer.aio import AioContext
from blocklayer.bdrv import BDRV_REQ_MAY_UNMAP, BlockDriverState, Completion
from blocklayer.iov import IOVector


def bdrv_aio_preadv(bs: BlockDriverState, ctx: AioContext, offset: int, qiov: IOVector,
                    cb: Completion) -> None:
    bs.drv.aio_preadv(ctx, offset, qiov, cb)


def bdrv_aio_pwritev(bs: BlockDriverState, ctx: AioContext, offset: int, qiov: IOVector,
                     flags: int, cb: Completion) -> None:
    bs.drv.aio_pwritev(ctx, offset, qiov, flags, cb)


def bdrv_aio_flush(bs: BlockDriverState, ctx: AioContext, cb: Completion) -> None:
    bs.drv.aio_flush(ctx, cb)


def bdrv_aio_pdiscard(bs: BlockDriverState, ctx: AioContext, offset: int, nbytes: int,
                      cb: Completion) -> None:
    """Discard a range; on a node with ``discard=ignore`` (QEMU's default) a no-op success."""
    if not bs.unmap:
        cb(0)
    else:
        bs.drv.aio_pdiscard(ctx, offset, nbytes, cb)


def bdrv_aio_pwrite_zeroes(bs: BlockDriverState, ctx: AioContext, offset: int, nbytes: int,
                           flags: int, cb: Completion) -> None:
    """Make a range read as zeroes.  BDRV_REQ_MAY_UNMAP lets the driver deallocate it, but
    only on a node with ``discard=unmap``."""
    f = flags if bs.unmap else flags & ~BDRV_REQ_MAY_UNMAP

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

    bs.drv.aio_pwritev(ctx, offset, qiov, flags, next_chunk)
