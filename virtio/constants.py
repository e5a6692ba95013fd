"""virtio / virtio-blk constants (from the virtio 1.2 specification)."""

from __future__ import annotations

from enum import IntEnum, IntFlag


class VirtioBlkType(IntEnum):
    """Request types (``struct virtio_blk_outhdr.type``)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


VIRTIO_BLK_T_BARRIER = 0x80000000  # legacy flag, ignored as QEMU does


class VirtioBlkStatus(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


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


VIRTIO_BLK_SECTOR_BITS = 9
VIRTIO_BLK_SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20
VIRTIO_BLK_OUTHDR_SIZE = 16
