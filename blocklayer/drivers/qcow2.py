"""``driver=qcow2``: QEMU's copy-on-write image format (docs/interop/qcow2.txt), v2 and v3.

``--blockdev driver=qcow2,node-name=q,file.driver=file,file.filename=x.qcow2`` reads the image
through its ``file`` child.  The optional ``backing`` child is, as in QEMU: a node given by
name (``backing=NODE``), or — when the option is absent — the header's backing file, opened
read-only as an inline child (its name relative to the image's directory, its format from the
header extension or probed: qcow2 by its magic, else raw).  ``backing=null`` (no backing
child) needs blockdev_add to tell the driver (see ``_explicit_no_backing``).

Options (QEMU's names): ``l2-cache-size``, ``refcount-cache-size``, ``cache-size`` (bytes),
``cache-clean-interval`` (seconds).

Theory of operation
-------------------
**Mapping.**  A guest offset splits into an L1 index, an L2 index and an offset in the cluster.
The L1 table lives in memory for the node's lifetime (a list of entries); L2 tables and refcount
blocks go through ``MetaCache``s (``blocklayer/qcow2/cache.py``), kept in on-disk form.  An L2
entry is unallocated (read from the backing node, or zeroes), a zero cluster, a normal cluster
(host offset; bit 63 "COPIED" = refcount is exactly one, so it may be written in place), or a
compressed cluster (zlib or zstd, ``blocklayer/qcow2/compress.py``).  With extended L2 entries
(128 bits) each of a cluster's 32 subclusters has its own allocated/zero bits; reads follow them,
and a write to a cluster whose subclusters are not all allocated rewrites the whole cluster.
``aio_is_allocated`` (QEMU's bdrv_is_allocated, which the copy-on-read filter asks) answers
from the same lookups: every kind but unallocated is this image's own.

**Requests** are generator coroutines (``blocklayer/coroutine.py``) running in the caller's
AioContext; all I/O goes through ``blocklayer/io.py`` on the child nodes.  A read of mapped data
looks up a cached L2 table without any lock; only a cache miss takes the node's metadata mutex.
A write to an allocated, COPIED cluster is written in place, also without the mutex.

**Batches** (``batch_io``, what the export hands over: many parsed requests at once) keep the
common case off the coroutines: a read or write inside one cluster whose L2 table is cached
and whose entry is a normal allocated cluster (COPIED for a write) gets its offset rewritten to
the host offset and goes down to the ``file`` child with the batch, whose driver hands it to
the C engines (io_uring, Linux AIO): no Python per request beyond one table lookup.  Reads of
clusters this image does not have go, as a batch, to the backing node (which does the same
down the chain).  A write inside one new cluster whose old contents read as zeroes is
allocated right there under the metadata mutex (if it is free: no waiting in batch_io) when
the refcount block is cached — counted, mapped — and written the same way.  Everything else
goes through the per-request coroutines below, started before the rest of the batch goes
down (see ``batch_io`` for why this cannot race an allocation).

**Allocating writes** (unallocated, zero, compressed or shared clusters) hold their guest
clusters in a ``RangeLock`` (two writers never allocate one guest cluster), read what the
clusters keep of their old contents (COW: backing data, zeroes or the old cluster; skipped when
that is all zeroes, since new clusters are appended past the end of the file, where the file
reads as zeroes), then, under the metadata mutex, take new clusters at the end of the file and
count them (refcount blocks, and a bigger refcount table, are created as needed), write
head + data + tail in one request, and finally point the L2 entries at the new clusters.
The clusters these entries used to point at are queued as *pending frees*.

**Ordering (crash safety).**  Metadata is written back so that the file is consistent at any
point — an interrupted run leaves at most leaked clusters, never an L2 entry pointing at a
cluster whose refcount is zero on disk or a refcount of zero for a used cluster:

1. dirty refcount blocks are written, then the file is flushed,
2. only then are dirty L2 tables written (and the file flushed again),
3. only then are pending frees applied (refcounts decreased, the clusters discarded in the
   file): a cluster's refcount drops after no L2 entry on disk points at it any more.

A new L2 table is counted, flushed, written and flushed before the L1 entry pointing at it is
written; a new refcount block is written and flushed before the refcount-table entry; a new
refcount table before the header switches to it.  Clusters are only ever taken at the end of
the file, never reused, so a freed-but-still-referenced-on-disk cluster cannot get a second
owner.  Write-back happens on guest flush, FUA writes, cache pressure, resize and close.
A cluster allocated by ``batch_io`` is mapped before its data is written; that is safe only
because it is new and its old contents were zeroes (``_alloc_in_batch``).  Clusters past the
end of the file found in use are crash leaks and skipped, up to MAX_LEAKED_BYTES; more, or a
refcount above 1 there, is a damaged refcount table: EIO.

Open-time checks reject bad images with one line (``BlockDriverError``); bad entries found
later (an L2 table or cluster offset that is misaligned, beyond the file, or overlapping
metadata) fail the request with EIO and a log line, and are never written through.

Not supported (refused with a clear line): external data files, encryption, writing images with
internal snapshots, writing images whose dirty bit is set (lazy refcounts not yet repaired).
Write-zeroes on v2 images falls back to writing zeroes; shrinking is refused.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections.abc import Callable, Generator
from typing import Any

from blocklayer.aio import AioContext, current_aio_context, qemu_get_aio_context
from blocklayer.batch import T_READ, T_WRITE, UNSET, Batch
from blocklayer.bdrv import (
    BDRV_REQ_FUA,
    BlockDriver,
    BlockDriverError,
    BlockDriverState,
    Completion,
    bdrv_anon_name,
    bdrv_register,
    bdrv_unref,
)
from blocklayer.coroutine import CoMutex, Op, RangeLock, co_run_sync, co_start
from blocklayer.graph import (
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    bdrv_attach_child,
)
from blocklayer.io import (
    bdrv_aio_flush,
    bdrv_aio_pdiscard,
    bdrv_aio_preadv,
    bdrv_aio_pwritev,
    bdrv_batch,
    bdrv_batch_each,
)
from blocklayer.iov import IOVector
from blocklayer.qapi import to_int, to_size
from blocklayer.qcow2 import header as hdr
from blocklayer.qcow2.cache import MetaCache
from blocklayer.qcow2.compress import decompress_cluster
from vhost.ffi import ffi, lib

log = logging.getLogger("pyvhost_blk.qcow2")

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # L1 and standard L2 entries: bits 9-55
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1

UNALLOC, ZERO, NORMAL, COMPRESSED = range(4)
ALL_SUBCLUSTERS = 0xFFFFFFFF
DEFAULT_L2_CACHE_MAX = 32 << 20  # QEMU's default maximum on Linux
MAX_CHAIN = 64
#: clusters past the end of the file found in use (leaked by a crash) that allocation skips
#: before it calls the refcounts damaged: what could have been in flight
MAX_LEAKED_BYTES = 64 << 20
#: batch_io: a ``ret`` value marking requests kept from a child while another child is given
#: the batch (neither UNSET nor PENDING, and never left in place: see ``batch_io``)
_HIDDEN = 3
_unpack_q = struct.Struct(">Q").unpack_from
_unpack_qq = struct.Struct(">QQ").unpack_from

CoGen = Generator[Op, int, Any]

#: (st_dev, st_ino) of the images being opened right now, outermost first (main thread):
#: a backing file that is one of them would make the chain loop.
_opening: list[tuple[int, int]] = []


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read(bs: BlockDriverState, offset: int, qiov: IOVector) -> Op:
    return lambda ctx, r: bdrv_aio_preadv(bs, ctx, offset, qiov, r)


def _write(bs: BlockDriverState, offset: int, qiov: IOVector) -> Op:
    return lambda ctx, r: bdrv_aio_pwritev(bs, ctx, offset, qiov, 0, r)


def _flush(bs: BlockDriverState) -> Op:
    return lambda ctx, r: bdrv_aio_flush(bs, ctx, r)


def _buf(data: bytes | bytearray) -> IOVector:
    return IOVector.from_buffers([data])


def _part(qiov: IOVector, start: int, size: int) -> IOVector:
    if start == 0 and size == qiov.size:
        return qiov
    q = qiov.slice_from(start) if start else qiov
    return q.slice_to(size) if size != q.size else q


def _concat(parts: list[IOVector]) -> IOVector:
    parts = [p for p in parts if p.size]
    if len(parts) == 1:
        return parts[0]
    n = sum(p.niov for p in parts)
    arr = ffi.new("struct iovec[]", n)
    i = 0
    for p in parts:
        for j in range(p.niov):
            arr[i].iov_base = p.iov[j].iov_base
            arr[i].iov_len = p.iov[j].iov_len
            i += 1
    return IOVector(arr, n, sum(p.size for p in parts), parts)


def _explicit_no_backing(opts: dict[str, Any]) -> bool:
    """``backing=null``: blockdev_add passes ``opts['backing'] = None`` (JSON null or the
    keyval string 'null') once it knows the convention; absent means "from the header"."""
    return "backing" in opts and opts["backing"] in (None, "null", "")


def _corrupt(msg: str) -> OSError:
    log.error("qcow2: %s", msg)
    return OSError(errno.EIO, msg)


@bdrv_register
class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    child_roles = {"file": True, "backing": False}
    options = {
        "l2-cache-size": to_size,
        "refcount-cache-size": to_size,
        "cache-size": to_size,
        "cache-clean-interval": lambda v, n, from_json=False: to_int(
            v, n, "uint32", from_json=from_json),
    }

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        self.opts = opts
        self.no_backing = _explicit_no_backing(opts)
        self.clean_interval = float(opts.get("cache-clean-interval", 600))
        self._last_clean = time.monotonic()
        self._clean_timer: Any = None
        self._closed = False
        self.mutex = CoMutex()
        self.ranges = RangeLock()
        self.pending_frees: list[tuple[int, int]] = []  # (host offset, clusters)
        self.need_sync = False  # refcount metadata written since the last file flush
        self.l2_unsynced = False  # L2 tables written since the last file flush
        self._in_writeback = False
        self.header: hdr.Header | None = None

    # -- open ---------------------------------------------------------------------------------
    @property
    def file(self) -> BlockDriverState:
        assert self.bs is not None
        return self.bs.children["file"].bs

    @property
    def backing(self) -> BlockDriverState | None:
        assert self.bs is not None
        c = self.bs.children.get("backing")
        return c.bs if c is not None else None

    def attach(self, bs: BlockDriverState) -> None:
        """Main thread: read and check the header and tables, open the backing chain."""
        super().attach(bs)
        ctx = current_aio_context()
        file_len = self.file.bdrv_getlength()
        self.file_len = file_len
        first = bytearray(min(file_len, 1 << 21))
        try:
            co_run_sync(ctx, self._co_read_meta(0, first))
        except OSError as e:
            raise BlockDriverError(f"Could not read qcow2 header: {e.strerror}") from None
        h = hdr.parse_header(bytes(first), file_len)
        self.header = h
        self.writable = not bs.read_only
        if self.writable:
            if h.incompatible & hdr.INCOMPAT_CORRUPT:
                raise BlockDriverError("qcow2: Image is corrupt; cannot be opened read/write")
            if h.incompatible & hdr.INCOMPAT_DIRTY:
                raise BlockDriverError(
                    "qcow2 image is dirty (lazy refcounts not yet repaired): run 'qemu-img "
                    "check -r all' on it, or open it read-only")
            if h.nb_snapshots:
                raise BlockDriverError(
                    "qcow2 images with internal snapshots can only be opened read-only")
        self.cluster_bits = cb = h.cluster_bits
        self.cs = cs = 1 << cb
        self.ext_l2 = h.extended_l2
        self.l2_entry = 16 if self.ext_l2 else 8
        self.l2_entries = cs // self.l2_entry
        self.l2_bits = self.l2_entries.bit_length() - 1
        self.sc_bits = cb - 5 if self.ext_l2 else cb  # allocation unit of reads
        self.size = h.size
        self.v3 = h.version == 3
        self.rc_bits = 1 << h.refcount_order
        self.rb_bits = cb + 3 - h.refcount_order  # log2(refcount entries per block)
        self.rc_max = (1 << self.rc_bits) - 1
        self.csize_shift = 62 - (cb - 8)
        self.csize_mask = (1 << (cb - 8)) - 1
        self.coff_mask = (1 << self.csize_shift) - 1
        self._setup_caches()
        try:
            co_run_sync(ctx, self._co_load_tables())
        except OSError as e:
            raise BlockDriverError(f"Could not read qcow2 tables: {e.strerror}") from None
        self._check_tables()
        self.next_free = -(-file_len // cs)
        self.leaked_past_eof = 0
        self.max_leaked = max(1024, MAX_LEAKED_BYTES >> cb)
        if self.writable and self.v3 and h.autoclear:
            # Bitmaps etc. we do not keep up to date: tell QEMU they are stale.
            h.autoclear = 0
            try:
                co_run_sync(ctx, self._co_write_meta(hdr.OFF_FEATURES + 16,
                                                     struct.pack(">Q", 0), sync=True))
            except OSError as e:
                raise BlockDriverError(f"Could not update qcow2 header: {e.strerror}") from None
        if "backing" not in bs.children and not self.no_backing and h.backing_file:
            self._open_backing(h)
        self._arm_clean_timer()  # (last: a refused image leaves no timer behind)

    def _setup_caches(self) -> None:
        o, cs = self.opts, self.cs
        rc_default = max(4 * cs, 256 << 10)
        covering = -(-self.size // (self.l2_entries * cs)) * cs  # every L2 table of the image
        if "cache-size" in o:
            total = o["cache-size"]
            if "l2-cache-size" in o and "refcount-cache-size" in o:
                raise BlockDriverError("cache-size, l2-cache-size and refcount-cache-size may "
                                       "not be set at the same time")
            rc = o.get("refcount-cache-size", min(rc_default, total // 4))
            l2 = o.get("l2-cache-size", total - rc)
        else:
            l2 = o.get("l2-cache-size", max(min(covering, DEFAULT_L2_CACHE_MAX), 2 * cs))
            rc = o.get("refcount-cache-size", rc_default)
        self.l2_cache = MetaCache("l2", l2 // cs)
        self.rc_cache = MetaCache("refcount", rc // cs)

    def _co_load_tables(self) -> CoGen:
        h = self.header
        assert h is not None
        raw = bytearray(h.l1_size * 8)
        if raw:
            yield from self._co_read_meta(h.l1_table_offset, raw)
        self.l1 = list(struct.unpack(f">{h.l1_size}Q", raw))
        self.l1_offset, self.l1_size = h.l1_table_offset, h.l1_size
        raw = bytearray(h.refcount_table_clusters * self.cs)
        yield from self._co_read_meta(h.refcount_table_offset, raw)
        self.reftable = [e & REFT_OFFSET_MASK for e in struct.unpack(f">{len(raw) // 8}Q", raw)]
        self.reft_offset = h.refcount_table_offset
        self.reft_clusters = h.refcount_table_clusters

    def _check_tables(self) -> None:
        """Every table the L1 and refcount tables point at is aligned, inside the file and
        apart from the header, the L1 table, the refcount table and each other."""
        cs, cb, flen = self.cs, self.cluster_bits, self.file_len
        meta: dict[int, str] = {0: "the header"}
        for i in range(-(-self.l1_size * 8 // cs)):
            meta[(self.l1_offset >> cb) + i] = "the L1 table"
        for i in range(self.reft_clusters):
            meta[(self.reft_offset >> cb) + i] = "the refcount table"

        def claim(off: int, what: str) -> None:
            if off & (cs - 1):
                raise BlockDriverError(f"{what} offset {off:#x} is not cluster-aligned")
            if off + cs > flen:
                raise BlockDriverError(f"{what} offset {off:#x} is beyond the end of the file "
                                       f"({flen} bytes)")
            other = meta.get(off >> cb)
            if other is not None:
                raise BlockDriverError(f"{what} at {off:#x} overlaps {other}")
            meta[off >> cb] = what

        for i, e in enumerate(self.reftable):
            if e:
                claim(e, f"Refcount block {i}")
        for i, e in enumerate(self.l1):
            off = e & OFFSET_MASK
            if off:
                claim(off, f"L2 table {i}")
        self.meta = set(meta)

    def _open_backing(self, h: hdr.Header) -> None:
        """Main thread: open the header's backing file read-only as the ``backing`` child."""
        from blocklayer.blockdev import blockdev_add  # (imports the drivers: not at the top)

        assert self.bs is not None
        me = self.bs.filename
        name = h.backing_file
        path = name if os.path.isabs(name) or not me else os.path.join(
            os.path.dirname(me), name)
        ident, mine = _identity(path), _identity(me) if me else None
        if ident is not None and ident == mine:
            raise BlockDriverError(f"Backing file '{name}' of '{me}' is the image itself")
        if ident is not None and ident in _opening:
            raise BlockDriverError(f"Backing file chain of '{me}' loops back to '{name}'")
        if len(_opening) >= MAX_CHAIN:
            raise BlockDriverError(f"Backing file chain of '{me}' is longer than {MAX_CHAIN}")
        fmt = h.backing_format or self._probe(path)
        fileopts: dict[str, Any] = {"driver": "file", "filename": path}
        if self.file.drv.format_name == "file":  # the same I/O mode as the image's file
            fileopts["aio"] = getattr(self.file.drv, "aio", "threads")
            if getattr(self.file.drv, "direct", False):
                fileopts["cache"] = {"direct": True}
        tree: dict[str, Any] = {"driver": fmt, "node-name": bdrv_anon_name(),
                                "read-only": True, "file": fileopts}
        if mine is not None:
            _opening.append(mine)
        try:
            child = blockdev_add(tree, from_json=True, internal=True)
        except BlockDriverError as e:
            raise BlockDriverError(f"Could not open backing file '{name}': {e}") from None
        except Exception as e:
            raise BlockDriverError(f"Could not open backing file '{name}': {e}") from None
        finally:
            if mine is not None:
                _opening.pop()
        bdrv_attach_child(self.bs, "backing", child)
        bdrv_unref(child)  # the link holds it now

    @staticmethod
    def _probe(path: str) -> str:
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise BlockDriverError(f"Could not open backing file '{path}': {e.strerror}") \
                from None
        return "qcow2" if magic == hdr.MAGIC else "raw"

    # -- the node interface ----------------------------------------------------------------
    def getlength(self) -> int:
        return self.size

    def can_write(self) -> bool:
        return getattr(self, "writable", True)

    def child_perm(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        """QEMU's rules: the image file always needs consistent reads and, on a writable node,
        write and resize (metadata), shared with no other writer; the backing file is only
        read."""
        if role == "backing":
            p = perm & BLK_PERM_CONSISTENT_READ
            s = (BLK_PERM_WRITE | BLK_PERM_RESIZE) if shared & BLK_PERM_WRITE else 0
            return p, s | BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED
        p = perm | BLK_PERM_CONSISTENT_READ
        if self.bs is not None and not self.bs.read_only:
            p |= BLK_PERM_WRITE | BLK_PERM_RESIZE
        return p, shared & ~(BLK_PERM_WRITE | BLK_PERM_RESIZE)

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        co_start(ctx, self._co_read(offset, qiov), cb)

    def aio_pwritev(self, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
                    cb: Completion) -> None:
        co_start(ctx, self._co_write(offset, qiov, flags), cb)

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        co_start(ctx, self._co_flush(), cb)

    def aio_pwrite_zeroes(self, ctx: AioContext, offset: int, nbytes: int, flags: int,
                          cb: Completion) -> None:
        if not self.v3:
            cb(-errno.ENOTSUP)  # no zero flag in v2: the block layer writes zeroes
            return
        co_start(ctx, self._co_zero(offset, nbytes, flags, discard=False), cb)

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        co_start(ctx, self._co_zero(offset, nbytes, 0, discard=True), cb)

    @property
    def cluster_size(self) -> int:
        """QEMU's BlockDriverInfo.cluster_size: the allocation unit (copy-on-read copies
        whole clusters, as QEMU's bdrv_round_to_subclusters)."""
        return self.cs

    def aio_is_allocated(self, ctx: AioContext, offset: int, nbytes: int,
                         cb: Callable[[int, int], None]) -> None:
        """QEMU's bdrv_is_allocated (BlockDriver.aio_is_allocated): normal, compressed and
        zero clusters (subclusters with extended L2) are this image's; unallocated ones are
        read from the backing chain (or are zeroes without one) and are not.  Lock-free when
        the L2 tables are cached (``cb`` then runs before this returns); a miss reads the
        table under the metadata mutex, as a read does."""
        out = [0, 0]

        def co() -> CoGen:
            out[0], out[1] = yield from self._co_is_allocated(offset, nbytes)

        co_start(ctx, co(), lambda ret: cb(ret, 0) if ret < 0 else cb(out[0], out[1]))

    def _co_is_allocated(self, offset: int, nbytes: int) -> CoGen:
        """(1 or 0, n): the first n bytes from ``offset`` are all allocated here or all not;
        n is as long as the mapping allows (several L2 tables if need be), up to ``nbytes``
        and the image's end (n 0 at or past it)."""
        end = min(offset + nbytes, self.size)
        pos = offset
        first: bool | None = None
        while pos < end:
            kind, _host, _e, run = yield from self._co_map(pos, end - pos)
            alloc = kind != UNALLOC
            if first is None:
                first = alloc
            elif alloc != first:
                break
            pos += run
        return (1 if first else 0), pos - offset

    def batch_io(self, b: Batch) -> None:
        """The common case without one Python coroutine per request.  In ``b.ctx``.

        A read or write inside one cluster whose L2 table is cached and whose entry is a
        normal allocated cluster (all subclusters allocated with extended L2; for a write also
        COPIED, no FUA, and no allocating request holding that guest cluster) gets its offset
        rewritten to the host offset and goes to the ``file`` child with the rest of the
        batch: the file driver hands such requests to the C engines (io_uring / Linux AIO).
        A read inside one cluster that is unallocated in this image (its L2 entry, or its
        whole L2 table, absent) and inside the backing node's length goes to the backing node
        as a batch, the same way down the chain.  A write inside one new cluster whose old
        contents read as zeroes is allocated here when that needs no I/O and no wait
        (``_alloc_in_batch``) and goes to the file too.  Everything else — other allocating
        writes (COW), zero and compressed clusters, requests spanning clusters, L2 tables not
        in the cache, corrupt entries, flushes (metadata write-back, then the file), FUA
        writes — is started first through the per-request path (``bdrv_batch_each``), so no
        child sees it as UNSET.

        Why this is safe against allocations: a cluster an allocating write is allocating has
        no normal COPIED entry until its data is written (the entry is set last, under the
        mutex), so no in-place write of it can reach C before the allocation's data; clusters
        are only ever taken at the end of the file, never reused, so a host offset looked up
        here cannot meanwhile belong to something else.  A request racing a discard of its own
        range may land in the freed cluster (the guest asked for both at once: either order
        is allowed; the cluster is never reused).  The mapping a request used is the one
        current when the batch was served, as for the per-request path's lock-free lookups.
        """
        bs = self.bs
        assert bs is not None
        n = b.n
        ret, types, offs, lens, flags = b.ret, b.types, b.offsets, b.lengths, b.flags
        cb, cs = self.cluster_bits, self.cs
        cmask, l2bits, l2mask = cs - 1, self.l2_bits, self.l2_entries - 1
        l1, l1n = self.l1, self.l1_size
        cache = self.l2_cache
        ext, v3, meta = self.ext_l2, self.v3, self.meta
        limit = max(self.file_len, self.next_free << cb)
        held = self.ranges._held  # non-empty while some allocating request runs
        writable = getattr(self, "writable", False)
        bk = self.backing
        blen = bk.bdrv_getlength() if bk is not None else 0
        seen: dict[int, bytearray] = {}
        slow: list[int] = []
        fast = 0
        back: list[int] = []
        locked: bool | None = None  # the metadata mutex: not tried yet / held / busy
        try:
            for i in range(n):
                if ret[i] != UNSET:
                    continue
                t = types[i]
                if t == T_WRITE:
                    if flags[i] or not writable:
                        slow.append(i)
                        continue
                elif t != T_READ:
                    slow.append(i)
                    continue
                off, ln = offs[i], lens[i]
                c = off >> cb
                if not ln or (off + ln - 1) >> cb != c:
                    slow.append(i)
                    continue
                l1i = c >> l2bits
                l2off = l1[l1i] & OFFSET_MASK if l1i < l1n else 0
                if not l2off:
                    if t == T_READ and off + ln <= blen:
                        back.append(i)
                    else:
                        slow.append(i)
                    continue
                tbl = seen.get(l2off)
                if tbl is None:
                    tbl = cache.peek(l2off)
                    if tbl is None:
                        slow.append(i)
                        continue
                    seen[l2off] = tbl
                if ext:
                    e, bm = _unpack_qq(tbl, (c & l2mask) << 4)
                    if bm & ALL_SUBCLUSTERS != ALL_SUBCLUSTERS:
                        if not bm and not e & OFLAG_COMPRESSED and t == T_READ \
                                and off + ln <= blen:
                            back.append(i)
                        else:
                            slow.append(i)
                        continue
                else:
                    e = _unpack_q(tbl, (c & l2mask) << 3)[0]
                    if t == T_WRITE and (not e or e == OFLAG_ZERO and v3):
                        if locked is None:  # the mutex for the rest of the loop, if free now
                            locked = self.mutex.try_lock()
                        host = self._alloc_in_batch(c, l1i, l2off, tbl, e, blen) \
                            if locked else None
                        if host is None:
                            slow.append(i)
                        else:
                            offs[i] = host + (off & cmask)
                            limit = max(limit, self.next_free << cb)
                            fast += 1
                        continue
                    if e & OFLAG_ZERO and v3:
                        slow.append(i)
                        continue
                host = e & OFFSET_MASK
                if e & OFLAG_COMPRESSED or not host:
                    if not e and t == T_READ and off + ln <= blen:
                        back.append(i)
                    else:
                        slow.append(i)
                    continue
                if t == T_WRITE and (not e & OFLAG_COPIED
                                     or held and self.ranges.busy(c, c + 1)):
                    slow.append(i)
                    continue
                if host & cmask or host + cs > limit or (host >> cb) in meta:
                    slow.append(i)  # the per-request path fails it with EIO and a log line
                    continue
                offs[i] = host + (off & cmask)
                fast += 1
        finally:
            if locked:
                self.mutex.unlock()
        if slow:
            bdrv_batch_each(bs, b, slow)
        if fast:
            for i in back:
                ret[i] = _HIDDEN
            try:
                bdrv_batch(self.file, b)
            finally:
                for i in back:
                    if ret[i] == _HIDDEN:
                        ret[i] = UNSET
        if back:
            assert bk is not None
            bdrv_batch(bk, b)

    def _alloc_in_batch(self, c: int, l1i: int, l2off: int, tbl: bytearray, e: int,
                        blen: int) -> int | None:
        """batch_io, holding the metadata mutex: allocate guest cluster ``c`` for a write that
        lies inside it, without a coroutine, when nothing needs I/O or a wait: its L2 table is
        cached and not shared, its old contents read as zeroes (unallocated with nothing
        below, or a zero cluster without a host cluster), no allocating request holds it, and
        the next free cluster's refcount block is cached.  Returns the new host offset (the
        entry already points at it), or None: the per-request path does it then.

        Crash safety is that of the per-request path: the refcount is counted (in the cache)
        before the L2 entry is set, and both are written back in the usual order.  The entry
        is set before the data is written, which the per-request path does after; that is
        safe because the cluster is new (past everything the file held, so it reads as
        zeroes until written) and its old contents were zeroes too: a write-back, or a crash,
        before the data lands shows zeroes — the data of a write not yet completed."""
        l1e = self.l1[l1i]
        if not l1e & OFLAG_COPIED or l1e & OFFSET_MASK != l2off:
            return None
        # Under the mutex now: the table must still be the cached one (a table evicted and
        # read again is another buffer) and the entry what the caller saw (another context
        # may have allocated the cluster between its look and our taking the mutex).
        if self.l2_cache.tables.get(l2off) is not tbl:
            return None
        l2i = c & (self.l2_entries - 1)
        if _unpack_q(tbl, l2i << 3)[0] != e:
            return None
        if e != OFLAG_ZERO:
            bk = self.backing
            if bk is not None and (c << self.cluster_bits) < blen:
                return None
        with self.ranges._lock:  # an allocating request taking the cluster waits for this
            if self.ranges._busy(c, c + 1):
                return None
            return self._alloc_one(c, l2off, tbl, l2i)

    def _alloc_one(self, c: int, l2off: int, tbl: bytearray, l2i: int) -> int | None:
        rb = self.rb_bits
        new = self.next_free
        b = new >> rb
        if b >= len(self.reftable) or not self.reftable[b]:
            return None
        roff = self.reftable[b]
        blk = self.rc_cache.tables.get(roff)
        if blk is None:
            return None
        ri = new & ((1 << rb) - 1)
        if self._rc_get(blk, ri):
            return None  # in use past the end of the file: _co_alloc says so and skips it
        self._rc_set(blk, ri, 1)
        self.rc_cache.mark_dirty(roff)
        self.next_free = new + 1
        host = new << self.cluster_bits
        struct.pack_into(">Q", tbl, l2i << 3, host | OFLAG_COPIED)
        self.l2_cache.mark_dirty(l2off)
        return host

    def truncate(self, size: int) -> None:
        """Main thread, node drained: grow the image (shrinking is refused)."""
        if size < self.size:
            raise OSError(errno.ENOTSUP, "qcow2: shrinking images is not supported")
        if size % 512:
            raise OSError(errno.EINVAL, "The new size must be a multiple of 512")
        co_run_sync(qemu_get_aio_context(), self._co_grow(size))

    def close(self) -> None:
        """Write back dirty metadata (main thread; polls until done)."""
        self._closed = True
        if self._clean_timer is not None:
            self._clean_timer.cancel()
        if getattr(self, "writable", False) and hasattr(self, "meta") and (
                self.l2_cache.dirty or self.rc_cache.dirty or self.pending_frees):
            try:
                co_run_sync(qemu_get_aio_context(), self._co_flush())
            except OSError as e:
                log.error("qcow2: %s: writing back metadata at close failed: %s",
                          self.node_name, e.strerror)
            self.writable = False

    # -- metadata I/O ------------------------------------------------------------------------
    def _co_read_meta(self, offset: int, buf: bytearray) -> CoGen:
        yield _read(self.file, offset, _buf(buf))

    def _co_write_meta(self, offset: int, data: bytes | bytearray, sync: bool = False) -> CoGen:
        yield _write(self.file, offset, _buf(data))
        if sync:
            yield from self._co_sync()

    def _co_sync(self) -> CoGen:
        yield _flush(self.file)
        self.need_sync = False
        self.l2_unsynced = False

    def _check_host(self, off: int, length: int, what: str) -> None:
        """A data cluster (or compressed run) must be inside the image and not metadata."""
        limit = max(self.file_len, self.next_free << self.cluster_bits)
        if off <= 0 or off + length > limit + (self.cs if what == "compressed" else 0):
            raise _corrupt(f"{self.node_name}: {what} cluster offset {off:#x} is beyond the "
                           "end of the image file")
        if what != "compressed":
            if off & (self.cs - 1):
                raise _corrupt(f"{self.node_name}: data cluster offset {off:#x} is unaligned")
            cb = self.cluster_bits
            for c in range(off >> cb, (off + length - 1 >> cb) + 1):
                if c in self.meta:
                    raise _corrupt(f"{self.node_name}: data cluster {off:#x} overlaps metadata")

    def _arm_clean_timer(self) -> None:
        """QEMU's cache-clean-interval timer: every interval, forget the tables nobody used
        for that long (an idle guest's cache shrinks without any request)."""
        if self.clean_interval > 0 and not self._closed:
            self._clean_timer = qemu_get_aio_context().timer_new(self.clean_interval,
                                                                 self._clean_tick)

    def _clean_tick(self) -> None:
        """Main loop: drop idle clean tables under the metadata mutex, then re-arm."""
        if self._closed:
            return

        def co() -> CoGen:
            yield self.mutex.lock()
            try:
                self._last_clean = 0.0  # due now
                self._maybe_clean()
            finally:
                self.mutex.unlock()

        co_start(qemu_get_aio_context(), co(), lambda ret: None)
        self._arm_clean_timer()

    def _maybe_clean(self) -> None:
        if self.clean_interval <= 0:
            return
        now = time.monotonic()
        if now - self._last_clean >= self.clean_interval:
            self._last_clean = now
            self.l2_cache.drop_idle(now, self.clean_interval)
            self.rc_cache.drop_idle(now, self.clean_interval)

    def _co_table(self, cache: MetaCache, off: int, what: str) -> CoGen:
        """Under the mutex: the table at ``off`` from ``cache``, loaded if need be."""
        t = cache.peek(off)
        if t is not None:
            return t
        if off & (self.cs - 1) or off + self.cs > max(self.file_len,
                                                        self.next_free << self.cluster_bits):
            raise _corrupt(f"{self.node_name}: {what} offset {off:#x} is invalid")
        self._maybe_clean()
        t = bytearray(self.cs)
        yield from self._co_read_meta(off, t)
        cache.insert(off, t)
        if cache.over_capacity():
            cache.evict_clean()
            if len(cache.tables) > 2 * cache.max_tables and not self._in_writeback:
                yield from self._co_writeback(final_sync=False)
                cache.evict_clean()
        return t

    def _co_l2(self, l1i: int) -> CoGen:
        """The L2 table of L1 entry ``l1i`` (None if unallocated); takes the mutex only on a
        cache miss.  Any context."""
        off = self.l1[l1i] & OFFSET_MASK
        if not off:
            return None
        t = self.l2_cache.peek(off)
        if t is not None:
            return t
        yield self.mutex.lock()
        try:
            off = self.l1[l1i] & OFFSET_MASK
            return (yield from self._co_table(self.l2_cache, off, "L2 table"))
        finally:
            self.mutex.unlock()

    # -- mapping -------------------------------------------------------------------------------
    def _entry(self, t: bytearray, l2i: int) -> tuple[int, int]:
        if self.ext_l2:
            return struct.unpack_from(">QQ", t, l2i * 16)  # type: ignore[return-value]
        return struct.unpack_from(">Q", t, l2i * 8)[0], 0

    def _classify(self, e: int, bitmap: int, sc: int) -> tuple[int, int]:
        """(kind, host offset of subcluster ``sc`` / of the compressed data) of an entry."""
        if e & OFLAG_COMPRESSED:
            return COMPRESSED, e & self.coff_mask
        host = e & OFFSET_MASK
        if self.ext_l2:
            if bitmap & (1 << sc):
                if not host:
                    raise _corrupt(f"{self.node_name}: allocated subcluster without a cluster")
                return NORMAL, host + (sc << self.sc_bits)
            if bitmap & (1 << (32 + sc)):
                return ZERO, 0
            return UNALLOC, 0
        if e & OFLAG_ZERO and self.v3:
            return ZERO, 0
        return (NORMAL, host) if host else (UNALLOC, 0)

    def _co_map(self, offset: int, maxlen: int) -> CoGen:
        """(kind, host, entry, run): what the guest bytes [offset, offset + run) are, run <=
        maxlen and all of one kind with contiguous host data, within one L2 table."""
        cb, ub = self.cluster_bits, self.sc_bits
        l1i = offset >> (cb + self.l2_bits)
        if l1i >= self.l1_size:
            return UNALLOC, 0, 0, maxlen
        t = yield from self._co_l2(l1i)
        table_end = (l1i + 1) << (cb + self.l2_bits)
        limit = min(offset + maxlen, table_end)
        if t is None:
            return UNALLOC, 0, 0, limit - offset
        l2i = (offset >> cb) & (self.l2_entries - 1)
        e, bm = self._entry(t, l2i)
        sc = (offset >> ub) & 31 if self.ext_l2 else 0
        kind, host = self._classify(e, bm, sc)
        if kind == COMPRESSED:
            run = min(limit, ((offset >> cb) + 1) << cb) - offset
            return kind, host, e, run
        if kind == NORMAL:
            host += offset & ((1 << ub) - 1)
        first = e
        pos = ((offset >> ub) + 1) << ub  # next unit
        while pos < limit:
            if pos & (self.cs - 1) == 0:
                l2i += 1
                e, bm = self._entry(t, l2i)
                sc = 0
            else:
                sc += 1
            k2, h2 = self._classify(e, bm, sc)
            if k2 != kind or (kind == NORMAL and (h2 != host + (pos - offset) or
                                                  (e ^ first) & OFLAG_COPIED)):
                break
            pos += 1 << ub
        return kind, host, first, min(pos, limit) - offset

    # -- read --------------------------------------------------------------------------------
    def _co_read(self, offset: int, qiov: IOVector) -> CoGen:
        """Request context: read guest [offset, offset + qiov.size)."""
        pos, n = 0, qiov.size
        while pos < n:
            kind, host, e, run = yield from self._co_map(offset + pos, n - pos)
            part = _part(qiov, pos, run)
            if kind == NORMAL:
                self._check_host(host - (host & (self.cs - 1)), run + (host & (self.cs - 1)),
                                 "data")
                yield _read(self.file, host, part)
            elif kind == ZERO:
                part.memset(0)
            elif kind == UNALLOC:
                yield from self._co_read_backing(offset + pos, part)
            else:
                data = yield from self._co_read_compressed(e)
                skip = (offset + pos) & (self.cs - 1)
                src = ffi.from_buffer(data)
                lib.pyvu_iov_from_buf(part.iov, part.niov, src + skip, run)
            pos += run

    def _co_read_backing(self, offset: int, qiov: IOVector) -> CoGen:
        bk = self.backing
        n = qiov.size
        blen = bk.bdrv_getlength() if bk is not None else 0
        if offset >= blen:
            qiov.memset(0)
            return
        if offset + n > blen:
            qiov.memset(0, blen - offset)
            qiov = _part(qiov, 0, blen - offset)
        yield _read(bk, offset, qiov)

    def _co_read_compressed(self, e: int) -> CoGen:
        host = e & self.coff_mask
        nsect = ((e >> self.csize_shift) & self.csize_mask) + 1
        length = nsect * 512 - (host & 511)
        self._check_host(host, 1, "compressed")
        length = min(length, max(self.file_len, self.next_free << self.cluster_bits) - host)
        raw = bytearray(length)
        yield _read(self.file, host, _buf(raw))
        assert self.header is not None
        return decompress_cluster(self.header.compression_type, bytes(raw), self.cs)

    # -- write -------------------------------------------------------------------------------
    def _co_write(self, offset: int, qiov: IOVector, flags: int) -> CoGen:
        """Request context: write guest [offset, offset + qiov.size)."""
        if not self.writable:
            raise OSError(errno.EROFS, "read-only")
        pos, n = 0, qiov.size
        while pos < n:
            kind, host, e, run = yield from self._co_map(offset + pos, n - pos)
            if kind == NORMAL and e & OFLAG_COPIED and not e & OFLAG_COMPRESSED:
                self._check_host(host - (host & (self.cs - 1)), run + (host & (self.cs - 1)),
                                 "data")
                yield _write(self.file, host, _part(qiov, pos, run))
                pos += run
                continue
            pos += yield from self._co_alloc_write(offset + pos, _part(qiov, pos, n - pos))
        if flags & BDRV_REQ_FUA:
            yield from self._co_flush()

    def _writable_in_place(self, e: int, bitmap: int) -> bool:
        if not e & OFLAG_COPIED or e & OFLAG_COMPRESSED or not e & OFFSET_MASK:
            return False
        if self.ext_l2:
            return bitmap & ALL_SUBCLUSTERS == ALL_SUBCLUSTERS
        return not (e & OFLAG_ZERO and self.v3)

    def _known_zero(self, e: int, bm: int, guest: int) -> bool:
        """Whether the old contents of the guest cluster at ``guest`` read as zeroes without
        looking at any data (so COW needs no read)."""
        if e & OFLAG_COMPRESSED:
            return False
        if self.ext_l2:
            if bm & ALL_SUBCLUSTERS:
                return False
            if bm >> 32 == ALL_SUBCLUSTERS:
                return True
        elif e & OFLAG_ZERO and self.v3:
            return True
        elif e & OFFSET_MASK:
            return False
        bk = self.backing
        return bk is None or guest >= bk.bdrv_getlength()

    def _co_alloc_write(self, offset: int, qiov: IOVector) -> CoGen:
        """Write the start of ``qiov`` at ``offset`` into newly allocated clusters: as many
        consecutive clusters (in one L2 table) as need allocating.  Returns bytes written."""
        cb, cs = self.cluster_bits, self.cs
        c0 = offset >> cb
        l1i = c0 >> self.l2_bits
        if l1i >= self.l1_size:
            raise OSError(errno.EIO, "write beyond the L1 table")
        c_end = min(-(-(offset + qiov.size) // cs), (l1i + 1) << self.l2_bits)
        yield self.ranges.acquire(c0, c_end)
        try:
            t = yield from self._co_l2(l1i)
            entries = []
            c1 = c0
            while c1 < c_end:  # the run of clusters that need allocating
                e, bm = self._entry(t, c1 & (self.l2_entries - 1)) if t is not None else (0, 0)
                if self._writable_in_place(e, bm):
                    break
                entries.append((e, bm))
                c1 += 1
            if c1 == c0:
                return 0  # allocated meanwhile by another request: the caller maps again
            end = min(offset + qiov.size, c1 << cb)
            head_len, tail_len = offset - (c0 << cb), (c1 << cb) - end
            data = _part(qiov, 0, end - offset)
            parts: list[IOVector] = []
            start = c0 << cb
            head_zero = not head_len or self._known_zero(*entries[0], c0 << cb)
            tail_zero = not tail_len or self._known_zero(*entries[-1], (c1 - 1) << cb)
            if head_len and not head_zero:
                head = bytearray(head_len)
                yield from self._co_read(c0 << cb, _buf(head))
                parts.append(_buf(head))
            elif head_len:
                start = offset  # a new cluster reads as zeroes: skip writing them
            parts.append(data)
            if tail_len and not tail_zero:
                tail = bytearray(tail_len)
                yield from self._co_read(end, _buf(tail))
                parts.append(_buf(tail))
            yield self.mutex.lock()
            try:
                host = yield from self._co_alloc(c1 - c0)
            finally:
                self.mutex.unlock()
            yield _write(self.file, host + (start - (c0 << cb)), _concat(parts))
            yield self.mutex.lock()
            try:
                t = yield from self._co_l2_for_write(l1i)
                for i, (old, _bm) in enumerate(entries):
                    self._set_entry(t, (c0 + i) & (self.l2_entries - 1),
                                    (host + (i << cb)) | OFLAG_COPIED, ALL_SUBCLUSTERS)
                    self._free_old(old)
                self.l2_cache.mark_dirty(self.l1[l1i] & OFFSET_MASK)
            finally:
                self.mutex.unlock()
            return end - offset
        finally:
            self.ranges.release(c0, c_end)

    def _set_entry(self, t: bytearray, l2i: int, e: int, bitmap: int) -> None:
        if self.ext_l2:
            struct.pack_into(">QQ", t, l2i * 16, e, bitmap)
        else:
            struct.pack_into(">Q", t, l2i * 8, e)

    def _free_old(self, e: int) -> None:
        """Queue the host cluster(s) an overwritten entry used (freed after write-back)."""
        if e & OFLAG_COMPRESSED:
            host = e & self.coff_mask
            nsect = ((e >> self.csize_shift) & self.csize_mask) + 1
            first = host >> self.cluster_bits
            last = (host + nsect * 512 - (host & 511) - 1) >> self.cluster_bits
            for c in range(first, last + 1):
                self.pending_frees.append((c << self.cluster_bits, 1))
        elif e & OFFSET_MASK:
            self.pending_frees.append((e & OFFSET_MASK, 1))

    def _co_l2_for_write(self, l1i: int) -> CoGen:
        """Under the mutex: the L2 table of ``l1i``, allocated if it does not exist yet.
        Ordering: counted and flushed, written and flushed, then the L1 entry."""
        e = self.l1[l1i]
        off = e & OFFSET_MASK
        if off:
            if not e & OFLAG_COPIED:
                raise _corrupt(f"{self.node_name}: L2 table {l1i} is shared (no COPIED flag)")
            return (yield from self._co_table(self.l2_cache, off, "L2 table"))
        off = yield from self._co_alloc(1)
        self.meta.add(off >> self.cluster_bits)
        yield from self._co_write_refblocks()
        t = bytearray(self.cs)
        yield from self._co_sync()
        yield from self._co_write_meta(off, t, sync=True)
        self.l1[l1i] = off | OFLAG_COPIED
        yield from self._co_write_meta(self.l1_offset + 8 * l1i,
                                       struct.pack(">Q", self.l1[l1i]))
        self.l2_cache.insert(off, t)
        return t

    # -- write-zeroes and discard -----------------------------------------------------------
    def _co_zero(self, offset: int, nbytes: int, flags: int, discard: bool) -> CoGen:
        """Request context.  Whole clusters get the zero flag (write-zeroes, or discard with a
        backing file on v3) or become unallocated (discard); their old host clusters are freed.
        Write-zeroes of partial clusters writes zero buffers; discard ignores them."""
        if not self.writable:
            raise OSError(errno.EROFS, "read-only")
        cb, cs = self.cluster_bits, self.cs
        end = offset + nbytes
        a, b = -(-offset // cs) * cs, end // cs * cs
        if not discard:
            for s, e in ((offset, min(a, end)), (max(b, a, offset), end)):
                if e > s:
                    z = bytearray(e - s)
                    yield from self._co_write(s, _buf(z), 0)
        if b <= a:
            return
        pos = a
        while pos < b:
            c0 = pos >> cb
            l1i = c0 >> self.l2_bits
            c1 = min(b >> cb, (l1i + 1) << self.l2_bits)
            yield from self._co_zero_clusters(l1i, c0, c1, discard)
            pos = c1 << cb
        if flags & BDRV_REQ_FUA:
            yield from self._co_flush()

    def _co_zero_clusters(self, l1i: int, c0: int, c1: int, discard: bool) -> CoGen:
        bk = self.backing
        use_zero_flag = self.v3 and (not discard or bk is not None)
        yield self.ranges.acquire(c0, c1)
        try:
            yield self.mutex.lock()
            try:
                if l1i >= self.l1_size:
                    return
                if not self.l1[l1i] & OFFSET_MASK and (not use_zero_flag or bk is None):
                    return  # nothing allocated and nothing below: already reads as zeroes
                t = yield from self._co_l2_for_write(l1i)
                for c in range(c0, c1):
                    i = c & (self.l2_entries - 1)
                    old, bm = self._entry(t, i)
                    if use_zero_flag:
                        new, nbm = (0, ALL_SUBCLUSTERS << 32) if self.ext_l2 else (OFLAG_ZERO, 0)
                    else:
                        new, nbm = 0, 0
                    if (old, bm) == (new, nbm):
                        continue
                    self._set_entry(t, i, new, nbm)
                    self._free_old(old)
                self.l2_cache.mark_dirty(self.l1[l1i] & OFFSET_MASK)
            finally:
                self.mutex.unlock()
        finally:
            self.ranges.release(c0, c1)

    # -- refcounts and allocation (all under the mutex) --------------------------------------
    def _rc_get(self, blk: bytearray, i: int) -> int:
        bits = self.rc_bits
        if bits >= 8:
            nb = bits >> 3
            return int.from_bytes(blk[i * nb:(i + 1) * nb], "big")
        per = 8 // bits
        return (blk[i // per] >> ((i % per) * bits)) & self.rc_max

    def _rc_set(self, blk: bytearray, i: int, v: int) -> None:
        if not 0 <= v <= self.rc_max:
            raise _corrupt(f"{self.node_name}: refcount overflow or underflow")
        bits = self.rc_bits
        if bits >= 8:
            nb = bits >> 3
            blk[i * nb:(i + 1) * nb] = v.to_bytes(nb, "big")
            return
        per = 8 // bits
        shift = (i % per) * bits
        blk[i // per] = (blk[i // per] & ~(self.rc_max << shift) & 0xFF) | (v << shift)

    def _co_refblock(self, cluster: int) -> CoGen:
        b = cluster >> self.rb_bits
        off = self.reftable[b] if b < len(self.reftable) else 0
        if not off:
            return None
        return (yield from self._co_table(self.rc_cache, off, "refcount block"))

    def _co_update(self, cluster: int, delta: int) -> CoGen:
        blk = yield from self._co_refblock(cluster)
        if blk is None:
            raise _corrupt(f"{self.node_name}: cluster {cluster:#x} has no refcount block")
        i = cluster & ((1 << self.rb_bits) - 1)
        v = self._rc_get(blk, i) + delta
        self._rc_set(blk, i, v)
        self.rc_cache.mark_dirty(self.reftable[cluster >> self.rb_bits])
        return v

    def _co_alloc(self, n: int) -> CoGen:
        """``n`` contiguous new clusters at the end of the file, counted (refcount 1, in the
        cache).  Returns their host offset."""
        rb = self.rb_bits
        while True:
            start = self.next_free
            again = False
            for b in range(start >> rb, ((start + n - 1) >> rb) + 1):
                if b >= len(self.reftable):
                    yield from self._co_grow_reftable(b)
                    again = True
                    break
                if not self.reftable[b]:
                    yield from self._co_new_refblock(b)
                    again = True
                    break
            if again:
                continue
            for c in range(start, start + n):
                blk = yield from self._co_refblock(c)
                rc = self._rc_get(blk, c & ((1 << rb) - 1))
                if rc:
                    # Legitimate: clusters counted before a crash, whose data never made it
                    # (refcount 1, at most what was in flight).  Anything else is a damaged
                    # refcount table or block: fail rather than grow the file without end.
                    self.leaked_past_eof += 1
                    if rc > 1 or self.leaked_past_eof > self.max_leaked:
                        raise _corrupt(f"{self.node_name}: refcounts past the end of the "
                                       f"file are not free (cluster {c << self.cluster_bits:#x}"
                                       f" has refcount {rc}): the refcount table or a refcount"
                                       " block is damaged")
                    if self.leaked_past_eof == 1:
                        log.warning("qcow2: %s: cluster %#x past the end of the file is in "
                                    "use (leaked); skipping such clusters", self.node_name,
                                    c << self.cluster_bits)
                    self.next_free = c + 1
                    again = True
                    break
            if again:
                continue
            for c in range(start, start + n):
                yield from self._co_update(c, 1)
            self.next_free = start + n
            return start << self.cluster_bits

    def _co_new_refblock(self, b: int) -> CoGen:
        """A refcount block for block index ``b``, at the end of the file; it counts itself if
        it lies in its own range.  Written and flushed before the table entry points at it."""
        r = self.next_free
        self.next_free += 1
        blk = bytearray(self.cs)
        mask = (1 << self.rb_bits) - 1
        if r >> self.rb_bits == b:
            self._rc_set(blk, r & mask, 1)
        else:
            yield from self._co_update(r, 1)
        off = r << self.cluster_bits
        self.meta.add(r)
        yield from self._co_write_meta(off, blk)
        yield from self._co_write_refblocks()
        yield from self._co_sync()
        self.reftable[b] = off
        self.rc_cache.insert(off, blk)
        yield from self._co_write_meta(self.reft_offset + 8 * b, struct.pack(">Q", off))
        self.need_sync = True

    def _co_grow_reftable(self, b: int) -> CoGen:
        """A bigger refcount table covering block ``b``: new refcount blocks for its own
        clusters, written and flushed, then the table, then the header switches to it."""
        cs, rb = self.cs, self.rb_bits
        old = list(self.reftable)
        entries = max(b + 1, 2 * len(old))
        t = self.next_free
        k = 0
        while True:
            nclusters = -(-entries * 8 // cs)
            end = t + nclusters + k
            missing = [x for x in range(t >> rb, ((end - 1) >> rb) + 1)
                       if x >= len(old) or not old[x]]
            need = max(missing, default=0) + 1
            if len(missing) == k and need <= entries:
                break
            k, entries = len(missing), max(entries, need)
        if nclusters * cs > hdr.MAX_REFTABLE_BYTES:
            raise OSError(errno.EFBIG, "qcow2: refcount table would be too large")
        new = old + [0] * (entries - len(old))
        blocks: dict[int, bytearray] = {}
        for j, x in enumerate(missing):
            new[x] = (t + nclusters + j) << self.cluster_bits
            blocks[x] = bytearray(cs)
        for c in range(t, end):
            x = c >> rb
            if x in blocks:
                self._rc_set(blocks[x], c & ((1 << rb) - 1), 1)
            else:
                yield from self._co_update(c, 1)
        self.next_free = end
        for c in range(t, end):
            self.meta.add(c)
        for x, blk in blocks.items():
            yield from self._co_write_meta(new[x], blk)
        yield from self._co_write_refblocks()
        raw = bytearray(nclusters * cs)
        struct.pack_into(f">{entries}Q", raw, 0, *new)
        yield from self._co_sync()
        yield from self._co_write_meta(t << self.cluster_bits, raw, sync=True)
        old_off, old_clusters = self.reft_offset, self.reft_clusters
        yield from self._co_write_meta(
            hdr.OFF_REFTABLE, struct.pack(">QI", t << self.cluster_bits, nclusters), sync=True)
        self.reftable = new
        self.reft_offset, self.reft_clusters = t << self.cluster_bits, nclusters
        for x, blk in blocks.items():
            self.rc_cache.insert(new[x], blk)
        for i in range(old_clusters):
            c = (old_off >> self.cluster_bits) + i
            self.meta.discard(c)
            yield from self._co_update(c, -1)

    # -- write-back ----------------------------------------------------------------------------
    def _co_write_refblocks(self) -> CoGen:
        for off in sorted(self.rc_cache.dirty):
            t = self.rc_cache.tables[off]
            self.rc_cache.mark_clean(off)
            yield from self._co_write_meta(off, t)
            self.need_sync = True

    def _co_writeback(self, final_sync: bool) -> CoGen:
        """Under the mutex: refcounts, flush, L2 tables, flush, pending frees (the ordering
        of the theory of operation)."""
        self._in_writeback = True
        try:
            yield from self._co_write_refblocks()
            if self.l2_cache.dirty:
                if self.need_sync:
                    yield from self._co_sync()
                for off in sorted(self.l2_cache.dirty):
                    t = self.l2_cache.tables[off]
                    self.l2_cache.mark_clean(off)
                    yield from self._co_write_meta(off, t)
                    self.l2_unsynced = True
            if self.pending_frees:
                if self.l2_unsynced or self.need_sync:
                    yield from self._co_sync()
                frees, self.pending_frees = self.pending_frees, []
                freed = []
                for off, n in frees:
                    for i in range(n):
                        c = (off >> self.cluster_bits) + i
                        if (yield from self._co_update(c, -1)) == 0:
                            freed.append(c)
                yield from self._co_write_refblocks()
                for c in freed:
                    yield lambda ctx, r, c=c: bdrv_aio_pdiscard(
                        self.file, ctx, c << self.cluster_bits, self.cs, r)
            if final_sync or self.need_sync or self.l2_unsynced:
                yield from self._co_sync()
        finally:
            self._in_writeback = False

    def _co_flush(self) -> CoGen:
        """Request context: everything completed so far is on stable storage."""
        if not getattr(self, "writable", False):
            yield _flush(self.file)
            return
        yield self.mutex.lock()
        try:
            yield from self._co_writeback(final_sync=True)
        finally:
            self.mutex.unlock()

    # -- resize ---------------------------------------------------------------------------------
    def _co_grow(self, size: int) -> CoGen:
        """Main thread, drained: a bigger L1 table if need be, then the header's size."""
        if not self.writable:
            raise OSError(errno.EACCES, "Image is read-only")
        cs = self.cs
        need = -(-size // (self.l2_entries * cs))
        yield self.mutex.lock()
        try:
            if need * 8 > hdr.MAX_L1_BYTES:
                raise OSError(errno.EFBIG, "Active L1 table too large")
            if need > self.l1_size:
                yield from self._co_writeback(final_sync=True)
                nclusters = -(-need * 8 // cs)
                off = yield from self._co_alloc(nclusters)
                yield from self._co_write_refblocks()
                l1 = self.l1 + [0] * (need - self.l1_size)
                raw = bytearray(nclusters * cs)
                struct.pack_into(f">{need}Q", raw, 0, *l1)
                yield from self._co_sync()
                yield from self._co_write_meta(off, raw, sync=True)
                yield from self._co_write_meta(hdr.OFF_L1, struct.pack(">IQ", need, off),
                                               sync=True)
                old_off, old_n = self.l1_offset, -(-self.l1_size * 8 // cs)
                self.l1, self.l1_offset, self.l1_size = l1, off, need
                for i in range(nclusters):
                    self.meta.add((off >> self.cluster_bits) + i)
                for i in range(old_n):
                    c = (old_off >> self.cluster_bits) + i
                    self.meta.discard(c)
                    yield from self._co_update(c, -1)
                yield from self._co_write_refblocks()
            yield from self._co_write_meta(hdr.OFF_SIZE, struct.pack(">Q", size), sync=True)
            self.size = size
        finally:
            self.mutex.unlock()

