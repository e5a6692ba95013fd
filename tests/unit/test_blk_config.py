"""virtio-blk config space, feature negotiation, and a few requests through the export's real
request path (an in-process vhost-user connection)."""

from __future__ import annotations

import struct

import pytest

from blocklayer.bdrv import BlockDriverState
from blocklayer.block_backend import blk_nb_sectors
from tests.frontend.vhost_user import POISON, STATUS_UNSET
from tests.unit.conftest import drain_bhs, outhdr
from virtio.blk_config import CONFIG_SIZE, WCE_OFFSET, VirtioBlkConfig
from virtio.blk_export import DEFAULT_SERIAL, VIRTQUEUE_MAX_SIZE, VhostUserBlkExport
from virtio.constants import VirtioBlkStatus, VirtioBlkType, VirtioFeature

# -- VirtioBlkConfig --------------------------------------------------------------------------
FULL = VirtioBlkConfig(
    capacity=0x0102030405060708,
    size_max=0x11121314,
    seg_max=0x21222324,
    cylinders=0x3132,
    heads=0x41,
    sectors=0x42,
    blk_size=0x51525354,
    physical_block_exp=0x61,
    alignment_offset=0x62,
    min_io_size=0x7172,
    opt_io_size=0x81828384,
    wce=1,
    num_queues=0x9192,
    max_discard_sectors=0xA1A2A3A4,
    max_discard_seg=0xB1B2B3B4,
    discard_sector_alignment=0xC1C2C3C4,
    max_write_zeroes_sectors=0xD1D2D3D4,
    max_write_zeroes_seg=0xE1E2E3E4,
    write_zeroes_may_unmap=1,
)


def test_config_size_is_60():
    assert CONFIG_SIZE == 60
    assert len(VirtioBlkConfig().pack()) == 60
    assert len(FULL.pack()) == 60


@pytest.mark.parametrize(
    "offset, fmt, value",
    [
        (0, "<Q", 0x0102030405060708),  # capacity
        (8, "<I", 0x11121314),  # size_max
        (12, "<I", 0x21222324),  # seg_max
        (16, "<H", 0x3132),  # geometry.cylinders
        (18, "<B", 0x41),  # geometry.heads
        (19, "<B", 0x42),  # geometry.sectors
        (20, "<I", 0x51525354),  # blk_size
        (24, "<B", 0x61),  # physical_block_exp
        (25, "<B", 0x62),  # alignment_offset
        (26, "<H", 0x7172),  # min_io_size
        (28, "<I", 0x81828384),  # opt_io_size
        (32, "<B", 1),  # wce (writeback)
        (33, "<B", 0),  # unused0
        (34, "<H", 0x9192),  # num_queues
        (36, "<I", 0xA1A2A3A4),  # max_discard_sectors
        (40, "<I", 0xB1B2B3B4),  # max_discard_seg
        (44, "<I", 0xC1C2C3C4),  # discard_sector_alignment
        (48, "<I", 0xD1D2D3D4),  # max_write_zeroes_sectors
        (52, "<I", 0xE1E2E3E4),  # max_write_zeroes_seg
        (56, "<B", 1),  # write_zeroes_may_unmap
        (57, "<3s", b"\0\0\0"),  # padding
    ],
)
def test_config_field_offsets_little_endian(offset, fmt, value):
    raw = FULL.pack()
    assert struct.unpack_from(fmt, raw, offset)[0] == value


def test_config_little_endian_bytes():
    raw = VirtioBlkConfig(capacity=0x1234, blk_size=4096, num_queues=2).pack()
    assert raw[0:8] == b"\x34\x12\0\0\0\0\0\0"
    assert raw[20:24] == b"\0\x10\0\0"
    assert raw[34:36] == b"\x02\0"


def test_wce_offset_constant():
    assert WCE_OFFSET == 32
    assert VirtioBlkConfig(wce=1).pack()[WCE_OFFSET] == 1
    assert VirtioBlkConfig(wce=0).pack()[WCE_OFFSET] == 0


def test_config_round_trip():
    assert VirtioBlkConfig.unpack(FULL.pack()) == FULL
    assert VirtioBlkConfig.unpack(VirtioBlkConfig().pack()) == VirtioBlkConfig()


def test_config_unpack_ignores_trailing_bytes():
    assert VirtioBlkConfig.unpack(FULL.pack() + b"\xff" * 196) == FULL


def test_config_defaults():
    c = VirtioBlkConfig()
    assert (c.capacity, c.blk_size, c.num_queues, c.wce) == (0, 512, 1, 0)


# -- VhostUserBlkExport -----------------------------------------------------------------------
@pytest.fixture
def make_export(main_ctx, make_node):
    exports: list[VhostUserBlkExport] = []

    def make(
        size: int = 1 << 20,
        writable: bool = True,
        num_queues: int = 1,
        lbs: int = 512,
        read_only: bool = False,
        **kw,
    ) -> VhostUserBlkExport:
        bs = make_node({
            "driver": "null-co", "size": str(size), "read-zeroes": "on",
            "read-only": "on" if read_only else "off",
        })
        exp = VhostUserBlkExport("exp", bs, writable, num_queues, lbs, [], **kw)
        exports.append(exp)
        return exp

    yield make
    drain_bhs(main_ctx)
    for exp in exports:
        exp.delete()


FEATURES_ALWAYS = {
    "VERSION_1": 32,
    "RING_INDIRECT_DESC": 28,
    "RING_EVENT_IDX": 29,
    "SEG_MAX": 2,
    "BLK_SIZE": 6,
    "FLUSH": 9,
    "TOPOLOGY": 10,
}


def test_feature_bit_values():
    assert VirtioFeature.VERSION_1 == 1 << 32
    assert VirtioFeature.RING_INDIRECT_DESC == 1 << 28
    assert VirtioFeature.RING_EVENT_IDX == 1 << 29
    assert VirtioFeature.BLK_F_SEG_MAX == 1 << 2
    assert VirtioFeature.BLK_F_RO == 1 << 5
    assert VirtioFeature.BLK_F_BLK_SIZE == 1 << 6
    assert VirtioFeature.BLK_F_FLUSH == 1 << 9
    assert VirtioFeature.BLK_F_TOPOLOGY == 1 << 10
    assert VirtioFeature.BLK_F_MQ == 1 << 12


@pytest.mark.parametrize("writable", [True, False])
@pytest.mark.parametrize("num_queues", [1, 2, 4])
def test_features(make_export, writable, num_queues):
    f = make_export(writable=writable, num_queues=num_queues).get_features()
    assert isinstance(f, int)
    for name, bit in FEATURES_ALWAYS.items():
        assert f & (1 << bit), name
    assert bool(f & (1 << 12)) == (num_queues > 1)  # MQ
    assert bool(f & (1 << 5)) == (not writable)  # RO
    # CONFIG_WCE (11), DISCARD (13) and WRITE_ZEROES (14) are implemented and offered ...
    for bit in (11, 13, 14):
        assert f & (1 << bit)
    # ... and nothing we do not implement (SIZE_MAX, GEOMETRY, ...)
    allowed = (sum(1 << b for b in FEATURES_ALWAYS.values()) | (1 << 12) | (1 << 5)
               | (1 << 11) | (1 << 13) | (1 << 14))
    assert f & ~allowed == 0


def test_set_features_records(make_export):
    exp = make_export()
    exp.set_features(int(VirtioFeature.VERSION_1))
    assert exp.features == 1 << 32


@pytest.mark.parametrize(
    "size, lbs, nq",
    [(1 << 20, 512, 1), (64 << 20, 4096, 4), (3 * 512, 512, 2), (1 << 40, 512, 1)],
)
def test_config_from_export(make_export, size, lbs, nq):
    exp = make_export(size=size, lbs=lbs, num_queues=nq)
    c = exp.config()
    assert c.capacity == size // 512
    assert c.capacity == blk_nb_sectors(exp.blk)
    assert c.blk_size == lbs
    assert c.num_queues == nq
    assert c.seg_max == VIRTQUEUE_MAX_SIZE - 2
    assert c.wce == 1  # write-back by default
    raw = exp.get_config(60)
    assert raw == c.pack()
    assert struct.unpack_from("<Q", raw, 0)[0] == size // 512
    assert struct.unpack_from("<I", raw, 20)[0] == lbs
    assert struct.unpack_from("<H", raw, 34)[0] == nq


def test_writethrough_export_reports_wce_0(make_export):
    exp = make_export(writethrough=True)
    assert exp.blk.enable_write_cache is False
    assert exp.config().wce == 0


def test_set_config_toggles_write_cache(make_export):
    exp = make_export()
    assert exp.blk.enable_write_cache is True
    assert exp.set_config(b"\x00", WCE_OFFSET, 0) is True
    assert exp.blk.enable_write_cache is False
    assert exp.config().wce == 0
    assert exp.get_config(60)[WCE_OFFSET] == 0
    assert exp.set_config(b"\x01", WCE_OFFSET, 0) is True
    assert exp.blk.enable_write_cache is True
    assert exp.config().wce == 1


@pytest.mark.parametrize(
    "data, offset",
    [
        (b"\x00", 0),
        (b"\x00", 31),
        (b"\x00", 33),
        (b"\x00\x00", WCE_OFFSET),  # two bytes at the wce offset
        (b"", WCE_OFFSET),
        (bytes(60), 0),  # the whole config space
    ],
)
def test_set_config_refuses_other_writes(make_export, data, offset):
    exp = make_export()
    assert exp.set_config(data, offset, 0) is False
    assert exp.blk.enable_write_cache is True
    assert exp.config().capacity == (1 << 20) // 512


def test_export_writable_on_read_only_node_refused(make_node):
    bs = make_node({"driver": "null-co", "read-only": "on"})
    with pytest.raises(PermissionError, match="read-only"):
        VhostUserBlkExport("e", bs, True, 1, 512, [])


def test_export_read_only_node_not_writable(make_export):
    exp = make_export(read_only=True, writable=False)
    assert exp.get_features() & (1 << 5)


def test_export_holds_a_node_reference(make_export):
    exp = make_export()
    bs: BlockDriverState = exp.blk.root
    assert bs.refcnt == 2
    assert exp.blk in bs.parents
    assert exp.node_name == bs.node_name
    assert exp.queue_context(0) is exp.queue_context(5)


# -- requests through the C queue loop: the status byte is written last, into the last in-iovec --
def test_read_writes_status_last_byte(make_export, make_rig):
    rig = make_rig(make_export())
    req = rig.submit([outhdr(int(VirtioBlkType.IN), 0)], [500, 12 + 1])
    rig.wait(req)
    assert req.used_len == 513
    # data in the first 512 bytes, the status in the last byte of the last in-iovec
    assert req.in_bytes() == bytes(512) + bytes([int(VirtioBlkStatus.OK)])


def test_get_id_default_serial(make_export, make_rig):
    rig = make_rig(make_export())
    req = rig.submit([outhdr(int(VirtioBlkType.GET_ID))], [21])
    rig.wait(req)
    expect = DEFAULT_SERIAL.encode() + b"\0"
    assert req.used_len == len(expect) + 1
    data = req.in_bytes()
    assert data[: len(expect)] == expect
    assert data[-1] == int(VirtioBlkStatus.OK)


def test_unsupported(make_export, make_rig):
    rig = make_rig(make_export())
    assert rig.complete([outhdr(99)]) == (int(VirtioBlkStatus.UNSUPP), 1)


def test_write_on_read_only_export(make_export, make_rig):
    rig = make_rig(make_export(writable=False))
    assert rig.complete([outhdr(int(VirtioBlkType.OUT)), bytes(512)]) == (
        int(VirtioBlkStatus.IOERR), 1)


def test_malformed_completes_with_nothing_written(make_export, make_rig):
    exp = make_export()
    rig = make_rig(exp)
    req = rig.submit([b"\0" * 10], [4])
    rig.wait(req)
    assert req.used_len == 0
    assert req.in_bytes() == bytes([POISON] * 3 + [STATUS_UNSET])
    assert exp.stats()["malformed-requests"] == 1


def test_export_stats_shape(make_export):
    exp = make_export()
    s = exp.stats()
    assert s["id"] == "exp"
    assert s["node-name"] == exp.node_name
    assert s["blockstats"]["rd_operations"] == 0
