"""virtio / virtio-blk constants (from the virtio 1.2 specification).

Request types, statuses, the header size and the GET_ID size are shared with the C request path
(which parses every request): they come from ``vhost/pyvu.h`` (``lib.VIRTIO_BLK_*``), never
retyped here.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from vhost.ffi import lib


class VirtioBlkType(IntEnum):
    """Request types (``struct virtio_blk_outhdr.type``)."""

    IN = lib.VIRTIO_BLK_T_IN
    OUT = lib.VIRTIO_BLK_T_OUT
    FLUSH = lib.VIRTIO_BLK_T_FLUSH
    GET_ID = lib.VIRTIO_BLK_T_GET_ID
    GET_LIFETIME = lib.VIRTIO_BLK_T_GET_LIFETIME
    DISCARD = lib.VIRTIO_BLK_T_DISCARD
    WRITE_ZEROES = lib.VIRTIO_BLK_T_WRITE_ZEROES
    SECURE_ERASE = lib.VIRTIO_BLK_T_SECURE_ERASE


VIRTIO_BLK_T_BARRIER = lib.VIRTIO_BLK_T_BARRIER  # legacy flag, ignored as QEMU does


class VirtioBlkStatus(IntEnum):
    OK = lib.VIRTIO_BLK_S_OK
    IOERR = lib.VIRTIO_BLK_S_IOERR
    UNSUPP = lib.VIRTIO_BLK_S_UNSUPP


class VirtioFeature(IntFlag):
    """Feature bits we offer (device-specific and transport)."""

    BLK_F_SIZE_MAX = 1 << 1
    BLK_F_SEG_MAX = 1 << 2
    BLK_F_GEOMETRY = 1 << 4
    BLK_F_RO = 1 << 5
    BLK_F_BLK_SIZE = 1 << 6
    BLK_F_FLUSH = 1 << 9
    BLK_F_TOPOLOGY = 1 << 10
    BLK_F_CONFIG_WCE = 1 << 11
    BLK_F_MQ = 1 << 12
    BLK_F_DISCARD = 1 << 13
    BLK_F_WRITE_ZEROES = 1 << 14
    RING_INDIRECT_DESC = 1 << 28
    RING_EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32


class VhostUserProtocolFeature(IntFlag):
    MQ = 1 << 0
    REPLY_ACK = 1 << 3
    CONFIG = 1 << 9
    INFLIGHT_SHMFD = 1 << 12


VIRTIO_BLK_ID_BYTES = lib.VIRTIO_BLK_ID_BYTES
VIRTIO_BLK_OUTHDR_SIZE = lib.VIRTIO_BLK_OUTHDR_SIZE
