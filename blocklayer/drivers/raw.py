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

from blocklayer.bdrv import (
    DRV_FILE,
    DRV_FILE_LAIO,
    DRV_NULL,
    BlockDriverError,
    BlockDriverState,
    FastPathInfo,
    bdrv_register,
)
from blocklayer.drivers.filter import FilterDriver
from blocklayer.qapi import to_size

SECTOR = 512
_C_KINDS = (DRV_NULL, DRV_FILE, DRV_FILE_LAIO)  # leaves whose requests C can shift


@bdrv_register
class RawDriver(FilterDriver):
    format_name = "raw"
    options = {"offset": to_size, "size": to_size}

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

    batch_io = FilterDriver.batch_forward

    def getlength(self) -> int:
        return self.size if self.size is not None else super().getlength()

    def fast_path_info(self) -> FastPathInfo:
        info = self.file.drv.fast_path_info()
        if info.kind not in _C_KINDS or self.file.detect_zeroes != "off":
            return FastPathInfo()
        return info._replace(offset=info.offset + self.offset)

    def truncate(self, size: int) -> None:
        if self.size is not None:
            raise OSError(errno.ENOTSUP, "Cannot resize fixed-size raw disks")
        super().truncate(size)
