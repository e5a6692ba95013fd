"""BlockAcctStats: per-BlockBackend I/O accounting (QEMU's block/accounting.c).

Counts done/failed/invalid operations, bytes and total latency per request type, keeps a
latency histogram per type (QEMU's ``block-latency-histogram-set`` shape: ``boundaries`` in ns,
``bins`` = one more than boundaries) and the time of the last completed request (idle time).
Updated from any AioContext thread under one lock.
"""

from __future__ import annotations

import bisect
import threading
import time
from enum import IntEnum


class BlockAcctType(IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    UNMAP = 3


_N = len(BlockAcctType)
_PREFIX = {BlockAcctType.READ: "rd", BlockAcctType.WRITE: "wr",
           BlockAcctType.FLUSH: "flush", BlockAcctType.UNMAP: "unmap"}
DEFAULT_BOUNDARIES_NS = [10_000, 100_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000]


class BlockAcctStats:
    """Counters by request type (see module docstring)."""

    def __init__(self, boundaries_ns: list[int] | None = None) -> None:
        self.lock = threading.Lock()
        self.nr_ops = [0] * _N
        self.nr_bytes = [0] * _N
        self.failed_ops = [0] * _N
        self.invalid_ops = [0] * _N
        self.total_time_ns = [0] * _N
        self.boundaries = list(boundaries_ns or DEFAULT_BOUNDARIES_NS)
        self.bins = [[0] * (len(self.boundaries) + 1) for _ in range(_N)]
        self.last_access_ns = time.monotonic_ns()

    def block_acct_done(self, kind: BlockAcctType, nbytes: int, latency_ns: int) -> None:
        with self.lock:
            self.nr_ops[kind] += 1
            self.nr_bytes[kind] += nbytes
            self.total_time_ns[kind] += latency_ns
            self.bins[kind][bisect.bisect_right(self.boundaries, latency_ns)] += 1
            self.last_access_ns = time.monotonic_ns()

    def block_acct_failed(self, kind: BlockAcctType, latency_ns: int) -> None:
        with self.lock:
            self.failed_ops[kind] += 1
            self.total_time_ns[kind] += latency_ns
            self.bins[kind][bisect.bisect_right(self.boundaries, latency_ns)] += 1
            self.last_access_ns = time.monotonic_ns()

    def block_acct_invalid(self, kind: BlockAcctType) -> None:
        with self.lock:
            self.invalid_ops[kind] += 1
            self.last_access_ns = time.monotonic_ns()

    def to_dict(self) -> dict[str, object]:
        """QMP's BlockDeviceStats (query-blockstats), with QEMU's field names."""
        out: dict[str, object] = {}
        with self.lock:
            for kind, p in _PREFIX.items():
                out[f"{p}_operations"] = self.nr_ops[kind]
                out[f"failed_{p}_operations"] = self.failed_ops[kind]
                out[f"invalid_{p}_operations"] = self.invalid_ops[kind]
                out[f"{p}_total_time_ns"] = self.total_time_ns[kind]
                if kind != BlockAcctType.FLUSH:
                    out[f"{p}_bytes"] = self.nr_bytes[kind]
                if kind != BlockAcctType.UNMAP:
                    out[f"{p}_latency_histogram"] = {
                        "boundaries": list(self.boundaries), "bins": list(self.bins[kind]),
                    }
            out["rd_merged"] = out["wr_merged"] = out["unmap_merged"] = 0
            out["idle_time_ns"] = time.monotonic_ns() - self.last_access_ns
            out["account_invalid"] = out["account_failed"] = True
            out["timed_stats"] = []
        return out
