"""null-co: a disk of a given size that stores nothing (QEMU's block/null.c).

Reads leave the buffer untouched unless ``read-zeroes=on``; writes and flushes succeed at once.
"""

from __future__ import annotations

from typing import Any

from blocklayer.aio import AioContext
from blocklayer.batch import T_READ, UNSET, Batch
from blocklayer.bdrv import DRV_NULL, BlockDriver, Completion, FastPathInfo, bdrv_register
from blocklayer.iov import IOVector
from blocklayer.qapi import to_bool, to_int, to_size
from vhost.ffi import lib

DEFAULT_SIZE = 1 << 30  # QEMU's null-co default: 1 GiB


@bdrv_register
class NullDriver(BlockDriver):
    format_name = "null-co"
    options = {"size": to_size, "read-zeroes": to_bool, "latency-ns": to_int}

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        self.size = opts.get("size", DEFAULT_SIZE)
        self.read_zeroes = opts.get("read-zeroes", False)

    def getlength(self) -> int:
        return self.size

    def fast_path_info(self) -> FastPathInfo:
        return FastPathInfo(DRV_NULL, read_zeroes=bool(self.read_zeroes), no_flush=True)

    def batch_io(self, b: Batch) -> None:
        """A batch the C path did not serve (it is off, or a filter sits above): answer every
        request at once."""
        ret, types = b.ret, b.types
        if self.read_zeroes:
            for i in range(b.n):
                if types[i] == T_READ and ret[i] == UNSET:
                    lib.pyvu_iov_memset(b.iovs[i], b.niovs[i], 0, 0)
        for i in range(b.n):
            if ret[i] == UNSET:
                ret[i] = 0

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        if self.read_zeroes:
            qiov.memset(0)
        cb(0)

    def aio_pwritev(
        self, ctx: AioContext, offset: int, qiov: IOVector, flags: int, cb: Completion
    ) -> None:
        cb(0)
