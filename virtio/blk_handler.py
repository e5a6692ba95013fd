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
type is ``VIRTIO_BLK_S_UNSUPP``.  DISCARD and WRITE_ZEROES take exactly one 16-byte segment
(``struct virtio_blk_discard_write_zeroes``); more, unknown flags, or UNMAP on a discard are
UNSUPP, as QEMU answers.

A read, write, flush or write-zeroes that fails goes through the BlockBackend's error policy
(``rerror``/``werror``): *report* → IOERR, *ignore* → OK, *stop* → the request is handed to
``on_stop(retry, abandon)`` and completes only when the transport calls ``retry()`` after a
resume — or never, if the transport calls ``abandon()`` (``done(ABANDONED)``: the frontend
went away and will resubmit it).

Threads: ``process_req`` runs in the AioContext that owns the virtqueue; so does ``done``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from blocklayer.accounting import BlockAcctType
from blocklayer.bdrv import BDRV_REQ_MAY_UNMAP
from blocklayer.block_backend import (
    BlockBackend,
    BlockErrorAction,
    blk_aio_flush,
    blk_aio_pdiscard,
    blk_aio_preadv,
    blk_aio_pwrite_zeroes,
    blk_aio_pwritev,
    blk_error_action,
    blk_get_error_action,
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
ABANDONED = -2  # a stopped request given up (the connection went away): do not complete it
BDRV_REQUEST_MAX_SECTORS = lib.BDRV_REQUEST_MAX_SECTORS  # vhost/pyvu.h
MAX_DISCARD_SECTORS = 32768  # per request, as QEMU's vhost-user-blk export advertises
MAX_WRITE_ZEROES_SECTORS = 32768
DWZ_SIZE = 16  # struct virtio_blk_discard_write_zeroes: le64 sector, le32 num, le32 flags
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
_unpack_dwz = struct.Struct("<QII").unpack

Done = Callable[[int, int], None]
_unpack_hdr = struct.Struct("<IIQ").unpack

S_OK = int(VirtioBlkStatus.OK)
S_IOERR = int(VirtioBlkStatus.IOERR)
S_UNSUPP = int(VirtioBlkStatus.UNSUPP)
T_IN = int(VirtioBlkType.IN)
T_OUT = int(VirtioBlkType.OUT)
T_FLUSH = int(VirtioBlkType.FLUSH)
T_GET_ID = int(VirtioBlkType.GET_ID)
T_DISCARD = int(VirtioBlkType.DISCARD)
T_WRITE_ZEROES = int(VirtioBlkType.WRITE_ZEROES)


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
        self, blk: BlockBackend, serial: str, logical_block_size: int, writable: bool,
        on_stop: Callable[[Callable[[], None], Callable[[], None]], None] | None = None,
    ) -> None:
        self.blk = blk
        self.serial = serial.encode()[:VIRTIO_BLK_ID_BYTES]
        self.logical_block_size = logical_block_size
        self.writable = writable
        #: called (in the request's context) with retry and abandon callables when a policy
        #: says stop
        self.on_stop = on_stop

    def handle_error(self, ret: int, is_read: bool, retry: Callable[[], None],
                     done: Callable[[int], None]) -> None:
        """virtio_blk_handle_rw_error: apply rerror/werror to a failed request."""
        error = -ret
        action = blk_get_error_action(self.blk, is_read, error)
        if action == BlockErrorAction.STOP and self.on_stop is None:
            action = BlockErrorAction.REPORT
        blk_error_action(self.blk, action, is_read, error)
        if action == BlockErrorAction.STOP:
            self.on_stop(retry, lambda: done(ABANDONED))
        elif action == BlockErrorAction.IGNORE:
            done(S_OK)
        else:
            done(S_IOERR)

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
            return True  # no medium: let the block layer fail it with ENOMEDIUM
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
            offset = sector << VIRTIO_BLK_SECTOR_BITS
            blk, aio = self.blk, blk_aio_pwritev if is_write else blk_aio_preadv

            def submit() -> None:
                aio(blk, offset, qiov, 0, rw_done)

            def rw_done(ret: int) -> None:
                if ret >= 0:
                    done(S_OK, in_len)
                else:
                    self.handle_error(ret, not is_write, submit, lambda s: done(s, in_len))

            submit()
        elif rtype == T_FLUSH:
            def flush() -> None:
                blk_aio_flush(self.blk, flush_done)

            def flush_done(ret: int) -> None:
                if ret >= 0:
                    done(S_OK, 1)
                else:
                    self.handle_error(ret, False, flush, lambda s: done(s, 1))

            flush()
        elif rtype == T_DISCARD or rtype == T_WRITE_ZEROES:
            if not self.writable:
                done(S_IOERR, 1)
                return
            self._discard_write_zeroes(rtype, out_sg, out_num, done)
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

    def _discard_write_zeroes(self, rtype: int, out_sg: Any, out_num: int, done: Done) -> None:
        """virtio_blk_discard_write_zeroes: one segment only, QEMU's statuses."""
        seg = iov_slice(out_sg, out_num, VIRTIO_BLK_OUTHDR_SIZE, 0)
        if seg is None or seg.size > DWZ_SIZE:
            done(S_UNSUPP, 1)  # only one segment is supported
            return
        if seg.size != DWZ_SIZE:
            done(S_IOERR, 1)
            return
        buf = ffi.new("char[]", DWZ_SIZE)
        lib.pyvu_iov_to_buf(seg.iov, seg.niov, buf, DWZ_SIZE)
        sector, num_sectors, flags = _unpack_dwz(ffi.unpack(buf, DWZ_SIZE))
        is_wz = rtype == T_WRITE_ZEROES
        max_sectors = MAX_WRITE_ZEROES_SECTORS if is_wz else MAX_DISCARD_SECTORS
        nbytes = num_sectors << VIRTIO_BLK_SECTOR_BITS
        kind = BlockAcctType.WRITE if is_wz else BlockAcctType.UNMAP
        if num_sectors > max_sectors or not self.sect_range_ok(sector, nbytes):
            self.blk.stats.block_acct_invalid(kind)
            done(S_IOERR, 1)
            return
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            done(S_UNSUPP, 1)
            return
        offset = sector << VIRTIO_BLK_SECTOR_BITS
        if is_wz:
            bflags = BDRV_REQ_MAY_UNMAP if flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP else 0

            def wz() -> None:
                blk_aio_pwrite_zeroes(self.blk, offset, nbytes, bflags, wz_done)

            def wz_done(ret: int) -> None:
                if ret >= 0:
                    done(S_OK, 1)
                else:
                    self.handle_error(ret, False, wz, lambda s: done(s, 1))

            wz()
        else:
            if flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                done(S_UNSUPP, 1)  # the UNMAP flag is not valid on a discard
                return
            blk_aio_pdiscard(self.blk, offset, nbytes,
                             lambda ret: done(S_OK if ret >= 0 else S_IOERR, 1))
