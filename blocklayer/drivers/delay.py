"""``driver=x-delay``: a test-only filter that makes requests complete out of order.

``--blockdev driver=x-delay,node-name=d,every=7,delay-us=20000,file.driver=file,...`` delays
the completion of every ``every``-th read or write by ``delay-us`` microseconds and passes
everything else straight to its ``file`` child.  The crash-recovery tests use it to show what
inflight tracking is for.  Being a filter, it is served by the Python request path like any
node that does not declare a C path: no production code path knows about it.
"""

from __future__ import annotations

import itertools
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.bdrv import BlockDriverError, Completion, bdrv_register
from blocklayer.drivers.filter import FilterDriver
from blocklayer.iov import IOVector
from blocklayer.qapi import to_int


@bdrv_register
class DelayFilter(FilterDriver):
    format_name = "x-delay"
    options = {"every": to_int, "delay-us": to_int}

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        self.every = opts.get("every", 1)
        self.delay = opts.get("delay-us", 1000) / 1e6
        if self.every < 1 or self.delay < 0:
            raise BlockDriverError("x-delay needs every >= 1 and delay-us >= 0")
        self._count = itertools.count(1)  # next() is atomic under the GIL

    def _maybe_delayed(self, ctx: AioContext, cb: Completion) -> Completion:
        if next(self._count) % self.every:
            return cb

        def later(ret: int) -> None:
            ctx.timer_new(self.delay, cb, ret)

        return later

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        super().aio_preadv(ctx, offset, qiov, self._maybe_delayed(ctx, cb))

    def aio_pwritev(self, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
                    cb: Completion) -> None:
        super().aio_pwritev(ctx, offset, qiov, flags, self._maybe_delayed(ctx, cb))
