"""Serialising read-modify-write: two padded writes to one aligned block never interleave.

A write smaller than a node's request alignment (a 512-byte guest sector on a 4 KiB-sector
device) is done as read block, patch, write block.  Two such writes to different sectors of one
block, running at once, would each write back the other's old data: the second one to finish
would undo the first.  QEMU marks such requests *serialising* (``tracked_request`` in
``block/io.c``); here, a padded write holds its aligned range in the node's ``RmwTracker`` from
before its read until its write completed, and a padded write overlapping a held range waits.

Requests of one node come from several AioContexts (a queue per iothread), so the tracker is
shared under a lock; a waiter is resumed in its own context.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class RmwTracker:
    """Ranges [start, end) held by padded writes of one node, and who waits for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[int, int]] = []
        self._waiting: list[tuple[int, int, Any, Callable[[], None]]] = []

    @staticmethod
    def _overlaps(start: int, end: int, ranges: list[tuple[int, int]]) -> bool:
        return any(s < end and start < e for s, e in ranges)

    def acquire(self, start: int, end: int, ctx: Any, then: Callable[[], None]) -> None:
        """Hold [start, end) and call ``then()`` (now, or later in ``ctx``) once no other
        holder overlaps it.  The caller must release() exactly once afterwards."""
        with self._lock:
            if self._overlaps(start, end, self._held) or self._overlaps(
                    start, end, [(s, e) for s, e, _, _ in self._waiting]):
                self._waiting.append((start, end, ctx, then))
                return
            self._held.append((start, end))
        then()

    def release(self, start: int, end: int) -> None:
        """Give [start, end) up; waiters that no longer overlap a holder run, in order."""
        ready: list[tuple[Any, Callable[[], None]]] = []
        with self._lock:
            self._held.remove((start, end))
            still: list[tuple[int, int, Any, Callable[[], None]]] = []
            for s, e, ctx, then in self._waiting:
                if self._overlaps(s, e, self._held) or self._overlaps(
                        s, e, [(a, b) for a, b, _, _ in still]):
                    still.append((s, e, ctx, then))
                else:
                    self._held.append((s, e))
                    ready.append((ctx, then))
            self._waiting = still
        for ctx, then in ready:
            ctx.schedule(then)

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._held or self._waiting)
