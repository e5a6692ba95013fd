"""``struct virtio_blk_config``: the device configuration space, packed little-endian.

Layout (virtio 1.2, 5.2.4): capacity u64, size_max u32, seg_max u32, geometry
(cylinders u16, heads u8, sectors u8), blk_size u32, topology (physical_block_exp u8,
alignment_offset u8, min_io_size u16, opt_io_size u32), wce u8, unused u8, num_queues u16,
discard (max sectors u32, max seg u32, sector alignment u32), write zeroes (max sectors u32,
max seg u32, may_unmap u8), 3 bytes padding: 60 bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_FMT = "<QIIHBBIBBHIBBHIIIIIB3x"
CONFIG_SIZE = struct.calcsize(_FMT)  # 60
WCE_OFFSET = 32
assert CONFIG_SIZE == 60


@dataclass
class VirtioBlkConfig:
    capacity: int = 0  # in 512-byte sectors
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = 512
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    wce: int = 0
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0

    def pack(self) -> bytes:
        return struct.pack(
            _FMT,
            self.capacity, self.size_max, self.seg_max,
            self.cylinders, self.heads, self.sectors,
            self.blk_size,
            self.physical_block_exp, self.alignment_offset, self.min_io_size, self.opt_io_size,
            self.wce, 0, self.num_queues,
            self.max_discard_sectors, self.max_discard_seg, self.discard_sector_alignment,
            self.max_write_zeroes_sectors, self.max_write_zeroes_seg,
            self.write_zeroes_may_unmap,
        )

    @classmethod
    def unpack(cls, data: bytes) -> VirtioBlkConfig:
        v = struct.unpack(_FMT, data[:CONFIG_SIZE])
        return cls(
            capacity=v[0], size_max=v[1], seg_max=v[2], cylinders=v[3], heads=v[4],
            sectors=v[5], blk_size=v[6], physical_block_exp=v[7], alignment_offset=v[8],
            min_io_size=v[9], opt_io_size=v[10], wce=v[11], num_queues=v[13],
            max_discard_sectors=v[14], max_discard_seg=v[15], discard_sector_alignment=v[16],
            max_write_zeroes_sectors=v[17], max_write_zeroes_seg=v[18],
            write_zeroes_may_unmap=v[19],
        )
