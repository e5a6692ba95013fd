"""``driver=x-count``: a test filter that counts the requests passing through it.

``--blockdev driver=x-count,node-name=c,file=NODE`` passes every request to its ``file`` child
unchanged and counts them by type; ``query-named-block-nodes`` shows the counts under
``x-count``.  It serves batches (``batch_io``) as well as single requests, so it shows that a
filter placed over a node the C path could serve sees every request, and that a Python filter
costs little.  No production code knows about it.
"""

from __future__ import annotations

import itertools
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.batch import T_FLUSH, T_READ, T_WRITE, UNSET, Batch
from blocklayer.bdrv import Completion, bdrv_register
from blocklayer.drivers.filter import FilterDriver
from blocklayer.iov import IOVector

_KIND = {T_READ: "read", T_WRITE: "write", T_FLUSH: "flush"}


@bdrv_register
class CountFilter(FilterDriver):
    format_name = "x-count"

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        # itertools.count: next() is atomic under the GIL, and queues on several iothreads
        # may count at once.
        self._counters = {k: itertools.count() for k in
                          ("read", "write", "flush", "discard", "write-zeroes")}
        self._seen = dict.fromkeys(self._counters, 0)

    def _count(self, kind: str) -> None:
        self._seen[kind] = next(self._counters[kind]) + 1

    def query_info(self) -> dict[str, Any]:
        return {"x-count": dict(self._seen)}

    def batch_io(self, b: Batch) -> None:
        types, ret = b.types, b.ret
        for i in range(b.n):
            if ret[i] == UNSET:
                self._count(_KIND.get(types[i], "read"))
        self.batch_forward(b)

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        self._count("read")
        super().aio_preadv(ctx, offset, qiov, cb)

    def aio_pwritev(self, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
                    cb: Completion) -> None:
        self._count("write")
        super().aio_pwritev(ctx, offset, qiov, flags, cb)

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        self._count("flush")
        super().aio_flush(ctx, cb)

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        self._count("discard")
        super().aio_pdiscard(ctx, offset, nbytes, cb)

    def aio_pwrite_zeroes(self, ctx: AioContext, offset: int, nbytes: int, flags: int,
                          cb: Completion) -> None:
        self._count("write-zeroes")
        super().aio_pwrite_zeroes(ctx, offset, nbytes, flags, cb)
