"""The qcow2 metadata caches: L2 tables and refcount blocks, by host offset.

Theory of operation
-------------------
A ``MetaCache`` holds whole tables (one cluster each) as ``bytearray``s in their on-disk,
big-endian form, keyed by the table's host offset, in LRU order.  Keeping the disk form means
a table is written back as it is, and a lookup is one dict access plus one
``struct.unpack_from`` — the structure a C fast path could also follow (L1 array → L2 buffer
→ 64-bit entry) to serve allocated clusters without Python.

Entries are *dirty* until written back.  The driver decides the order of write-backs (refcount
blocks before the L2 tables that point at newly counted clusters; see the driver's theory of
operation), so the cache never writes anything itself: ``victims()`` proposes clean entries to
drop when it is over capacity, and the driver writes dirty ones back when nothing clean is left.

``cache-clean-interval``: ``drop_idle(now, interval)`` forgets clean tables not used for that
many seconds (the driver calls it from a main-loop timer every interval, as QEMU, under its
metadata mutex, and on cache misses).

Lookups (``peek``) may come from any AioContext without the driver's metadata mutex (a read of
an allocated cluster never waits behind an allocation); insertion, dirtying and eviction happen
under that mutex.  Single dict operations are atomic under the GIL, which is all ``peek``
relies on.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class MetaCache:
    def __init__(self, name: str, max_tables: int) -> None:
        self.name = name
        self.max_tables = max(2, max_tables)
        self.tables: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        self.last_use: dict[int, float] = {}
        self.hits = 0
        self.misses = 0

    def peek(self, offset: int) -> bytearray | None:
        """The cached table at ``offset`` or None (any context, no lock)."""
        t = self.tables.get(offset)
        if t is not None:
            self.hits += 1
            self.last_use[offset] = time.monotonic()
            try:
                self.tables.move_to_end(offset)
            except KeyError:
                pass  # evicted meanwhile: the caller still holds a valid copy
        return t

    def insert(self, offset: int, table: bytearray, dirty: bool = False) -> None:
        """Under the metadata mutex."""
        self.misses += 1
        self.tables[offset] = table
        self.last_use[offset] = time.monotonic()
        if dirty:
            self.dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def mark_clean(self, offset: int) -> None:
        self.dirty.discard(offset)

    def forget(self, offset: int) -> None:
        self.tables.pop(offset, None)
        self.dirty.discard(offset)
        self.last_use.pop(offset, None)

    def over_capacity(self) -> bool:
        return len(self.tables) > self.max_tables

    def evict_clean(self) -> None:
        """Drop least recently used clean tables until within capacity (or none is clean)."""
        for off in list(self.tables):
            if len(self.tables) <= self.max_tables:
                return
            if off not in self.dirty:
                self.forget(off)

    def drop_idle(self, now: float, interval: float) -> None:
        for off, t in list(self.last_use.items()):
            if now - t >= interval and off not in self.dirty:
                self.forget(off)
