"""``driver=host_device``: a host block device (LVM volume, NVMe namespace, loop device, SAN LUN),
as QEMU's ``hdev`` in ``block/file-posix.c``.

It is the ``file`` driver (same options, OFD locking, io_uring / Linux AIO / thread pool, the
same C request path) with what differs for a device:

* the size is the device's (``BLKGETSIZE64``), read at open and again by QMP ``block_resize``
  (as QEMU refreshes it), so a device grown underneath (``lvextend``, ``losetup -c``) is shown
  to the guest by ``block_resize``, which cannot grow the device itself ("Cannot grow device
  files");
* discard is ``BLKDISCARD`` and write-zeroes ``BLKZEROOUT`` (``fallocate`` first, which block
  devices support since Linux 4.9);
* with ``cache.direct=on`` the request alignment is the device's logical sector size
  (``BLKSSZGET``): a 4 KiB-sector device serves 512-byte guest requests padded by
  ``blocklayer/io.py``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from typing import Any

from blocklayer.bdrv import (
    BlockDriverError,
    bdrv_register,
)
from blocklayer.drivers.file import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FileDriver,
    _fallocate,
)

BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F


def _range_ioctl(fd: int, req: int, offset: int, nbytes: int) -> int:
    """Worker thread: BLKDISCARD / BLKZEROOUT on [offset, offset + nbytes); 0 or -errno."""
    try:
        fcntl.ioctl(fd, req, struct.pack("=QQ", offset, nbytes))
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


def _discard(fd: int, offset: int, nbytes: int) -> int:
    ret = _range_ioctl(fd, BLKDISCARD, offset, nbytes)
    return 0 if ret in (-errno.EOPNOTSUPP, -errno.ENOTTY) else ret  # discard is advisory


def _zeroout(fd: int, offset: int, nbytes: int, unmap: bool) -> int:
    if unmap and _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes) == 0:
        return 0
    if _fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, nbytes) == 0:
        return 0
    return _range_ioctl(fd, BLKZEROOUT, offset, nbytes)


@bdrv_register
class HostDeviceDriver(FileDriver):
    format_name = "host_device"

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        mode = os.fstat(self.fd).st_mode
        if not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
            self.close()
            raise BlockDriverError(
                "'host_device' driver expects either a character or block device")

    def _query_length(self) -> int:
        if stat.S_ISBLK(os.fstat(self.fd).st_mode):
            out = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            return int.from_bytes(out, "little")
        return super()._query_length()

    def truncate(self, size: int) -> None:
        """QEMU's raw_co_truncate on a device (not exact), then its refresh of the cached
        length: the device's size is asked again, so a device grown underneath (lvextend,
        losetup -c) is what the guest sees next; growing needs the device grown first."""
        length = self._query_length()
        if size > length:
            raise OSError(errno.EINVAL, "Cannot grow device files")
        self._length = length

    _discard_fn = staticmethod(_discard)
    _zeroes_fn = staticmethod(_zeroout)
