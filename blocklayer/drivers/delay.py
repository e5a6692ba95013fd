"""``driver=x-delay``: a test-only filter that makes requests complete out of order.

``--blockdev driver=x-delay,node-name=d,every=7,delay-us=20000,file.driver=file,...`` delays
the completion of every ``every``-th read or write by ``delay-us`` microseconds and passes
everything else straight to its ``file`` child.  The crash-recovery tests use it to show what
inflight tracking is for.  Being a filter, it is served by the Python request path like any
node that does not declare a C path: no production code path knows about it.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.bdrv import (
    BlockDriver,
    BlockDriverError,
    BlockDriverState,
    Completion,
    bdrv_register,
    bdrv_truncate,
)
from blocklayer.io import (
    bdrv_aio_flush,
    bdrv_aio_pdiscard,
    bdrv_aio_preadv,
    bdrv_aio_pwrite_zeroes,
    bdrv_aio_pwritev,
)
from blocklayer.iov import IOVector
from blocklayer.qapi import to_int


@bdrv_register
class DelayFilter(BlockDriver):
    format_name = "x-delay"
    options = {"every": to_int, "delay-us": to_int}
    child_roles = {"file": True}

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        self.every = opts.get("every", 1)
        self.delay = opts.get("delay-us", 1000) / 1e6
        if self.every < 1 or self.delay < 0:
            raise BlockDriverError("x-delay needs every >= 1 and delay-us >= 0")
        self._count = itertools.count(1)  # next() is atomic under the GIL

    @property
    def file(self) -> BlockDriverState:
        assert self.bs is not None
        return self.bs.children["file"].bs

    def getlength(self) -> int:
        return self.file.bdrv_getlength()

    def truncate(self, size: int) -> None:
        bdrv_truncate(self.file, size)

    def _maybe_delayed(self, ctx: AioContext, cb: Completion) -> Completion:
        if next(self._count) % self.every:
            return cb

        def later(ret: int) -> None:
            t = threading.Timer(self.delay, ctx.schedule, (cb, ret))
            t.daemon = True
            t.start()

        return later

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        bdrv_aio_preadv(self.file, ctx, offset, qiov, self._maybe_delayed(ctx, cb))

    def aio_pwritev(self, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
                    cb: Completion) -> None:
        bdrv_aio_pwritev(self.file, ctx, offset, qiov, flags, self._maybe_delayed(ctx, cb))

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        bdrv_aio_flush(self.file, ctx, cb)

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        bdrv_aio_pdiscard(self.file, ctx, offset, nbytes, cb)

    def aio_pwrite_zeroes(self, ctx: AioContext, offset: int, nbytes: int, flags: int,
                          cb: Completion) -> None:
        bdrv_aio_pwrite_zeroes(self.file, ctx, offset, nbytes, flags, cb)
