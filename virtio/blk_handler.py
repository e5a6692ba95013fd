"""virtio-blk request processing, independent of the transport (QEMU's virtio-blk-handler.c).

Theory of operation
-------------------
The transport (``virtio/blk_export.py`` over vhost-user) pops an element and hands its
descriptor iovecs to ``VirtioBlkHandler.process_req`` together with a ``done(status, in_len)``
callback.  The handler parses the 16-byte ``virtio_blk_outhdr`` (type, ioprio, sector; all
little-endian), validates it as QEMU does, and issues ``blk_aio_*`` on the BlockBackend.
``done`` is called exactly once, from the same AioContext, with the status byte to write and the
number of bytes written to the device-writable buffers (data + the status byte); the transport
writes the status byte *last*, then pushes the element.

Malformed requests never raise: a missing header or status byte is reported as
``done(MALFORMED, 0)`` (the transport completes the element with nothing written); an invalid
sector or length is ``VIRTIO_BLK_S_IOERR`` and counted with ``block_acct_invalid``; an unknown
type is ``VIRTIO_BLK_S_UNSUPP``.

Threads: ``process_req`` runs in the AioContext that owns the virtqueue; so does ``done``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from blocklayer.accounting import BlockAcctType
from blocklayer.block_backend import (
    BlockBackend,
    blk_aio_flush,
    blk_aio_preadv,
    blk_aio_pwritev,
    blk_nb_sectors,
)
from blocklayer.iov import IOVector
from vhost.ffi import ffi, lib
from virtio.constants import (
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_OUTHDR_SIZE,
    VIRTIO_BLK_SECTOR_BITS,
    VIRTIO_BLK_SECTOR_SIZE,
    VIRTIO_BLK_T_BARRIER,
    VirtioBlkStatus,
    VirtioBlkType,
)

MALFORMED = -1  # status for "no usable header or status byte": complete with in_len 0
BDRV_REQUEST_MAX_SECTORS = (2**31 - 1) >> 9

Done = Callable[[int, int], None]
_unpack_hdr = struct.Struct("<IIQ").unpack

S_OK = int(VirtioBlkStatus.OK)
S_IOERR = int(VirtioBlkStatus.IOERR)
S_UNSUPP = int(VirtioBlkStatus.UNSUPP)
T_IN = int(VirtioBlkType.IN)
T_OUT = int(VirtioBlkType.OUT)
T_FLUSH = int(VirtioBlkType.FLUSH)
T_GET_ID = int(VirtioBlkType.GET_ID)


def parse_outhdr(out_sg: Any, out_num: int) -> tuple[int, int, int] | None:
    """(type, ioprio, sector) from the start of the driver-readable iovecs, or None if they
    hold fewer than 16 bytes."""
    if out_num < 1:
        return None
    if out_sg[0].iov_len >= VIRTIO_BLK_OUTHDR_SIZE:
        raw = ffi.unpack(ffi.cast("char *", out_sg[0].iov_base), VIRTIO_BLK_OUTHDR_SIZE)
    else:
        buf = ffi.new("char[]", VIRTIO_BLK_OUTHDR_SIZE)
        if lib.pyvu_iov_to_buf(out_sg, out_num, buf, VIRTIO_BLK_OUTHDR_SIZE) < 16:
            return None
        raw = ffi.unpack(buf, VIRTIO_BLK_OUTHDR_SIZE)
    return _unpack_hdr(raw)


def iov_slice(sg: Any, n: int, skip: int, trim: int) -> IOVector | None:
    """The bytes of ``sg[0:n]`` minus ``skip`` at the front and ``trim`` at the back."""
    dst = ffi.new("struct iovec[]", max(n, 1))
    size = ffi.new("uint64_t *")
    cnt = lib.pyvu_iov_slice(sg, n, skip, trim, dst, size)
    if cnt < 0:
        return None
    return IOVector(dst, cnt, size[0])


class VirtioBlkHandler:
    """Serves virtio-blk requests on one BlockBackend (``blk``)."""

    def __init__(
        self, blk: BlockBackend, serial: str, logical_block_size: int, writable: bool
    ) -> None:
        self.blk = blk
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self.logical_block_size = logical_block_size
        self.writable = writable

    def sect_range_ok(self, sector: int, size: int) -> bool:
        """virtio_blk_sect_range_ok: whole sectors, aligned to the logical block size,
        inside the disk."""
        if size % VIRTIO_BLK_SECTOR_SIZE:
            return False
        nb_sectors = size >> VIRTIO_BLK_SECTOR_BITS
        if nb_sectors > BDRV_REQUEST_MAX_SECTORS:
            return False
        if (sector << VIRTIO_BLK_SECTOR_BITS) % self.logical_block_size:
            return False
        total = blk_nb_sectors(self.blk)
        if total < 0:
            return False
        return sector <= total and nb_sectors <= total - sector

    def process_req(
        self, out_sg: Any, out_num: int, in_sg: Any, in_num: int, done: Done
    ) -> None:
        """Handle one request; ``done(status, in_len)`` is called once (maybe synchronously for
        requests that fail validation)."""
        if in_num < 1 or out_num < 1 or in_sg[in_num - 1].iov_len < 1:
            done(MALFORMED, 0)
            return
        hdr = parse_outhdr(out_sg, out_num)
        if hdr is None:
            done(MALFORMED, 0)
            return
        rtype, _ioprio, sector = hdr
        rtype &= ~VIRTIO_BLK_T_BARRIER

        if rtype == T_IN or rtype == T_OUT:
            is_write = rtype == T_OUT
            if is_write:
                qiov = iov_slice(out_sg, out_num, VIRTIO_BLK_OUTHDR_SIZE, 0)
            else:
                qiov = iov_slice(in_sg, in_num, 0, 1)
            kind = BlockAcctType.WRITE if is_write else BlockAcctType.READ
            if qiov is None or not self.sect_range_ok(sector, qiov.size):
                self.blk.stats.block_acct_invalid(kind)
                done(S_IOERR, 1)
                return
            if is_write and not self.writable:
                self.blk.stats.block_acct_invalid(kind)
                done(S_IOERR, 1)
                return
            in_len = 1 if is_write else qiov.size + 1

            def rw_done(ret: int) -> None:
                done(S_OK if ret >= 0 else S_IOERR, in_len)

            offset = sector << VIRTIO_BLK_SECTOR_BITS
            if is_write:
                blk_aio_pwritev(self.blk, offset, qiov, 0, rw_done)
            else:
                blk_aio_preadv(self.blk, offset, qiov, 0, rw_done)
        elif rtype == T_FLUSH:
            blk_aio_flush(self.blk, lambda ret: done(S_OK if ret >= 0 else S_IOERR, 1))
        elif rtype == T_GET_ID:
            data = iov_slice(in_sg, in_num, 0, 1)
            avail = data.size if data is not None else 0
            # QEMU copies the NUL terminator too when it fits, and truncates to the buffer.
            payload = self.serial + b"\0"
            size = min(len(payload), avail, VIRTIO_BLK_ID_BYTES)
            if size:
                lib.pyvu_iov_from_buf(data.iov, data.niov, payload, size)
            done(S_OK, size + 1)
        else:
            done(S_UNSUPP, 1)
