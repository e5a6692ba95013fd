"""``driver=raw``: the raw format, QEMU's ``block/raw-format.c`` — the first node with a child.

``--blockdev driver=raw,node-name=d,file=NODE`` (or inline: ``file.driver=file,
file.filename=x.img``) shows its ``file`` child as it is, or a window of it with ``offset=``
and ``size=`` (both in bytes; ``size`` a multiple of 512).  Requests are shifted by ``offset``
and passed to the child; a fixed ``size`` cannot be resized.  Over a child the C request path
serves (null-co, a file with io_uring or Linux AIO), the raw node is served in C too, with the
offset added there (``FastPathInfo.offset``).
"""

from __future__ import annotations

import errno
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.bdrv import (
    DRV_FILE,
    DRV_FILE_LAIO,
    DRV_NULL,
    BlockDriver,
    BlockDriverError,
    BlockDriverState,
    Completion,
    FastPathInfo,
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
from blocklayer.qapi import to_size

SECTOR = 512
_C_KINDS = (DRV_NULL, DRV_FILE, DRV_FILE_LAIO)  # leaves whose requests C can shift


@bdrv_register
class RawDriver(BlockDriver):
    format_name = "raw"
    options = {"offset": to_size, "size": to_size}
    child_roles = {"file": True}

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        self.offset: int = opts.get("offset", 0)
        self.size: int | None = opts.get("size")

    def attach(self, bs: BlockDriverState) -> None:
        super().attach(bs)
        real = self.file.bdrv_getlength()
        if self.size is not None:
            if self.size % SECTOR:
                raise BlockDriverError(f"Specified size is not multiple of {SECTOR}!")
            if self.offset + self.size > real:
                raise BlockDriverError(
                    f"The sum of offset ({self.offset}) and size ({self.size}) has to be "
                    f"smaller or equal to the  actual size of the containing file ({real})")
        elif self.offset > real:
            raise BlockDriverError(
                f"Offset ({self.offset}) cannot be greater than size of the containing file "
                f"({real})")

    @property
    def file(self) -> BlockDriverState:
        assert self.bs is not None
        return self.bs.children["file"].bs

    def getlength(self) -> int:
        if self.size is not None:
            return self.size
        return max(0, self.file.bdrv_getlength() - self.offset)

    def fast_path_info(self) -> FastPathInfo:
        info = self.file.drv.fast_path_info()
        if info.kind not in _C_KINDS or self.file.detect_zeroes != "off":
            return FastPathInfo()
        return info._replace(offset=info.offset + self.offset)

    def truncate(self, size: int) -> None:
        if self.size is not None:
            raise OSError(errno.ENOTSUP, "Cannot resize fixed-size raw disks")
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
