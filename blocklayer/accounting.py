"""BlockAcctStats: per-BlockBackend I/O accounting (QEMU's block/accounting.c).

Counts done/failed/invalid operations, bytes and total latency per request type, keeps a
latency histogram per type (QEMU's ``block-latency-histogram-set`` shape: ``boundaries`` in ns,
``bins`` = one more than boundaries) and the time of the last request (idle time).

The counters live in the BlockBackend's C state (``struct pyvu_blkstate``), updated with atomics
by both the C request path and Python: one set of numbers whichever path served a request.
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Any

from vhost.ffi import ffi, lib


class BlockAcctType(IntEnum):
    """QEMU's BlockAcctType; the values index the C counters (vhost/pyvu.h)."""

    READ = lib.PYVU_ACCT_READ
    WRITE = lib.PYVU_ACCT_WRITE
    FLUSH = lib.PYVU_ACCT_FLUSH
    UNMAP = lib.PYVU_ACCT_UNMAP


_N = len(BlockAcctType)
_PREFIX = {BlockAcctType.READ: "rd", BlockAcctType.WRITE: "wr",
           BlockAcctType.FLUSH: "flush", BlockAcctType.UNMAP: "unmap"}


def _c_default_boundaries() -> list[int]:
    """The histogram boundaries pyvu_blk_init sets (ns): C's, read back, never retyped."""
    st = ffi.new("struct pyvu_blkstate *")
    lib.pyvu_blk_init(st)
    return [st.boundaries[i] for i in range(st.nbounds)]


DEFAULT_BOUNDARIES_NS = _c_default_boundaries()
MAX_BOUNDARIES = lib.PYVU_NBOUNDS


class BlockAcctStats:
    """Counters by request type (see module docstring); ``c`` is the shared C state."""

    def __init__(self, boundaries_ns: list[int] | None = None, c: Any = None) -> None:
        if c is None:
            c = ffi.new("struct pyvu_blkstate *")
            lib.pyvu_blk_init(c)
        self.c = c
        bounds = list(DEFAULT_BOUNDARIES_NS if boundaries_ns is None else boundaries_ns)
        if len(bounds) > MAX_BOUNDARIES:
            raise ValueError(f"at most {MAX_BOUNDARIES} histogram boundaries")
        for i, b in enumerate(bounds):
            c.boundaries[i] = b
        c.nbounds = len(bounds)

    # views of the C arrays, per kind
    def _arr(self, field: str) -> list[int]:
        a = getattr(self.c, field)
        return [a[k] for k in range(_N)]

    @property
    def nr_ops(self) -> list[int]:
        return self._arr("nr_ops")

    @property
    def nr_bytes(self) -> list[int]:
        return self._arr("nr_bytes")

    @property
    def failed_ops(self) -> list[int]:
        return self._arr("failed_ops")

    @property
    def invalid_ops(self) -> list[int]:
        return self._arr("invalid_ops")

    @property
    def total_time_ns(self) -> list[int]:
        return self._arr("total_time_ns")

    @property
    def boundaries(self) -> list[int]:
        return [self.c.boundaries[i] for i in range(self.c.nbounds)]

    @property
    def bins(self) -> list[list[int]]:
        n = self.c.nbounds + 1
        return [[self.c.bins[k][i] for i in range(n)] for k in range(_N)]

    @property
    def last_access_ns(self) -> int:
        return self.c.last_access_ns

    @last_access_ns.setter
    def last_access_ns(self, value: int) -> None:
        self.c.last_access_ns = value

    @property
    def fast_ops(self) -> int:
        """Requests completed by the C path."""
        return self.c.fast_ops

    def block_acct_done(self, kind: BlockAcctType, nbytes: int, latency_ns: int) -> None:
        lib.pyvu_acct_done(self.c, kind, nbytes, latency_ns)

    def block_acct_failed(self, kind: BlockAcctType, latency_ns: int) -> None:
        lib.pyvu_acct_failed(self.c, kind, latency_ns)

    def block_acct_invalid(self, kind: BlockAcctType) -> None:
        lib.pyvu_acct_invalid(self.c, kind)

    def to_dict(self) -> dict[str, object]:
        """QMP's BlockDeviceStats (query-blockstats), with QEMU's field names."""
        out: dict[str, object] = {}
        nr, nb, failed = self.nr_ops, self.nr_bytes, self.failed_ops
        invalid, total, bins, bounds = self.invalid_ops, self.total_time_ns, self.bins, \
            self.boundaries
        for kind, p in _PREFIX.items():
            out[f"{p}_operations"] = nr[kind]
            out[f"failed_{p}_operations"] = failed[kind]
            out[f"invalid_{p}_operations"] = invalid[kind]
            out[f"{p}_total_time_ns"] = total[kind]
            if kind != BlockAcctType.FLUSH:
                out[f"{p}_bytes"] = nb[kind]
            if kind != BlockAcctType.UNMAP:
                out[f"{p}_latency_histogram"] = {"boundaries": bounds, "bins": bins[kind]}
        out["rd_merged"] = out["wr_merged"] = out["unmap_merged"] = 0
        out["idle_time_ns"] = max(0, time.monotonic_ns() - self.c.last_access_ns)
        out["account_invalid"] = out["account_failed"] = True
        out["timed_stats"] = []
        return out
