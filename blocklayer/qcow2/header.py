"""The qcow2 header (QEMU's docs/interop/qcow2.txt): parsing, checking, and field offsets.

Theory of operation
-------------------
``parse_header(buf, file_len)`` takes the image's first cluster (or as much of it as the file
has) and returns a ``Header``, or raises ``BlockDriverError`` with one line saying what is
wrong — every field a later step would trust (table offsets, sizes, the backing file name) is
checked here against the file's length, so the driver never reads or writes outside the file
because of a bad header.  Messages follow QEMU's where QEMU has one.

Multi-byte fields are big-endian.  The fields the driver rewrites in place are each covered by
one small write: ``size`` (24, 8 bytes), ``l1_size`` + ``l1_table_offset`` (36, 12 bytes),
``refcount_table_offset`` + ``refcount_table_clusters`` (48, 12 bytes), and the three v3
feature words (72, 24 bytes).

Pure computation: runs in whatever context opens the image (the main thread).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from blocklayer.bdrv import BlockDriverError

MAGIC = b"QFI\xfb"
V2_HEADER_LEN = 72
V3_HEADER_LEN = 104

OFF_SIZE = 24
OFF_L1 = 36  # l1_size (u32) then l1_table_offset (u64)
OFF_REFTABLE = 48  # refcount_table_offset (u64) then refcount_table_clusters (u32)
OFF_FEATURES = 72  # incompatible, compatible, autoclear (u64 each)

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
#: incompatible features this driver implements (external data files it does not)
INCOMPAT_SUPPORTED = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
COMPAT_LAZY_REFCOUNTS = 1 << 0

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441

_BUILTIN_NAMES = {
    (0, 0): "dirty bit", (0, 1): "corrupt bit", (0, 2): "external data file",
    (0, 3): "compression type", (0, 4): "extended L2 entries",
}

MAX_L1_BYTES = 32 << 20  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
#: the largest virtual size this driver takes (QEMU's limit for 64-bit offsets of L2 entries)
MAX_VIRTUAL_SIZE = 1 << 56


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LEN
    compression_type: int = 0
    backing_file: str = ""
    backing_format: str = ""
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible & INCOMPAT_EXTL2)


def _err(msg: str) -> BlockDriverError:
    return BlockDriverError(msg)


def unsupported_features(h: Header, mask: int) -> str:
    """QEMU's wording for incompatible feature bits we cannot handle: the feature-name table's
    names where the image has one, then the bits nobody named."""
    names = []
    for bit in range(64):
        if mask & (1 << bit):
            name = h.feature_names.get((0, bit)) or _BUILTIN_NAMES.get((0, bit))
            if name:
                names.append(name)
                mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(names)


def _check_table(name: str, offset: int, nbytes: int, cluster_size: int, file_len: int) -> None:
    if offset % cluster_size or offset == 0 and nbytes:
        raise _err(f"Invalid {name} offset")
    if offset + nbytes > file_len:
        raise _err(f"{name[0].upper()}{name[1:]} offset {offset:#x} (+{nbytes} bytes) is beyond "
                   f"the end of the file ({file_len} bytes)")


def parse_header(buf: bytes, file_len: int) -> Header:
    """Check and decode the header in ``buf`` (the start of an image ``file_len`` bytes
    long).  Raises BlockDriverError with one line."""
    if len(buf) < 4 or buf[:4] != MAGIC:
        raise _err("Image is not in qcow2 format")
    if len(buf) < V2_HEADER_LEN:
        raise _err(f"qcow2 header truncated: the file has {len(buf)} bytes")
    (version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters, nb_snap,
     snap_off) = struct.unpack_from(">IQIIQIIQQIIQ", buf, 4)
    if version not in (2, 3):
        raise _err(f"Unsupported qcow2 version {version}")
    if not 9 <= cbits <= 21:
        raise _err(f"Unsupported cluster size: 2^{cbits}")
    h = Header(version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
               nb_snap, snap_off)
    cs = h.cluster_size
    if version == 3:
        if len(buf) < V3_HEADER_LEN:
            raise _err(f"qcow2 header truncated: the file has {len(buf)} bytes")
        (h.incompatible, h.compatible, h.autoclear, h.refcount_order,
         h.header_length) = struct.unpack_from(">QQQII", buf, 72)
        if h.header_length < V3_HEADER_LEN:
            raise _err("qcow2 header too short")
        if h.header_length > cs:
            raise _err("qcow2 header exceeds cluster size")
        if h.header_length > len(buf):
            raise _err(f"qcow2 header truncated: the file has {len(buf)} bytes")
        if h.header_length > V3_HEADER_LEN:
            h.compression_type = buf[104]
    if h.refcount_order > 6:
        raise _err("Reference count entry width too large; may not exceed 64 bits")
    _parse_extensions(h, buf)
    bad = h.incompatible & ~INCOMPAT_SUPPORTED
    if bad:
        raise _err(unsupported_features(h, bad))
    if h.compression_type not in (0, 1):
        raise _err(f"Unknown compression type {h.compression_type}")
    if h.compression_type and not h.incompatible & INCOMPAT_COMPRESSION:
        raise _err("Compression type is not zlib but the compression type feature bit is "
                   "not set")
    if h.crypt_method:
        raise _err("Encrypted qcow2 images are not supported (crypt_method "
                   f"{h.crypt_method})")
    if h.size > MAX_VIRTUAL_SIZE or h.size % 512:
        raise _err(f"Image size {h.size} is invalid (it must be a multiple of 512 and at "
                   f"most {MAX_VIRTUAL_SIZE})")
    entry = 16 if h.extended_l2 else 8
    per_l1 = (cs // entry) * cs
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise _err("Active L1 table too large")
    if h.l1_size < -(-h.size // per_l1):
        raise _err("L1 table is too small")
    _check_table("L1 table", l1_off, l1_size * 8, cs, file_len)
    if rt_clusters * cs > MAX_REFTABLE_BYTES:
        raise _err("Reference count table too large")
    if rt_clusters == 0:
        raise _err("Image has no reference count table")
    _check_table("reference count table", rt_off, rt_clusters * cs, cs, file_len)
    if nb_snap > MAX_SNAPSHOTS:
        raise _err("Too many snapshots")
    if nb_snap:
        _check_table("snapshot table", snap_off, 0, cs, file_len)
    if bfo:
        if bfs > MAX_BACKING_NAME:
            raise _err("Backing file name too long")
        if bfo + bfs > min(cs, len(buf)):
            raise _err("Backing file name is beyond the header cluster or the file")
        try:
            # a C string, as QEMU reads it: up to the first NUL
            h.backing_file = buf[bfo:bfo + bfs].split(b"\0", 1)[0].decode()
        except UnicodeDecodeError:
            raise _err("Backing file name is not valid UTF-8") from None
    return h


def _parse_extensions(h: Header, buf: bytes) -> None:
    """Header extensions: backing format and the feature-name table are used; others are
    skipped (an external data file is refused through its incompatible bit)."""
    pos = h.header_length
    end = min(len(buf), h.cluster_size)
    if h.backing_file_offset:
        end = min(end, h.backing_file_offset)
    while pos + 8 <= end:
        etype, elen = struct.unpack_from(">II", buf, pos)
        if etype == EXT_END:
            return
        data_end = pos + 8 + elen
        if data_end > end:
            raise _err(f"qcow2 header extension {etype:#x} at offset {pos} runs past the "
                       "header cluster")
        data = buf[pos + 8:data_end]
        if etype == EXT_BACKING_FORMAT:
            h.backing_format = data.split(b"\0", 1)[0].decode(errors="replace")
        elif etype == EXT_FEATURE_TABLE:
            for i in range(0, len(data) - 47, 48):
                ftype, bit = data[i], data[i + 1]
                name = data[i + 2:i + 48].split(b"\0", 1)[0].decode(errors="replace")
                h.feature_names[(ftype, bit)] = name
        pos = data_end + (-elen % 8)
