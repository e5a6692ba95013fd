"""BlockAcctStats: per-BlockBackend I/O accounting (QEMU's block/accounting.c, first slice)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import IntEnum


class BlockAcctType(IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2


@dataclass
class BlockAcctStats:
    """Counters by request type: done, bytes, failed, invalid, total latency (ns)."""

    nr_ops: list[int] = field(default_factory=lambda: [0, 0, 0])
    nr_bytes: list[int] = field(default_factory=lambda: [0, 0, 0])
    failed_ops: list[int] = field(default_factory=lambda: [0, 0, 0])
    invalid_ops: list[int] = field(default_factory=lambda: [0, 0, 0])
    total_time_ns: list[int] = field(default_factory=lambda: [0, 0, 0])
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def block_acct_done(self, kind: BlockAcctType, nbytes: int, latency_ns: int) -> None:
        with self.lock:
            self.nr_ops[kind] += 1
            self.nr_bytes[kind] += nbytes
            self.total_time_ns[kind] += latency_ns

    def block_acct_failed(self, kind: BlockAcctType, latency_ns: int) -> None:
        with self.lock:
            self.failed_ops[kind] += 1
            self.total_time_ns[kind] += latency_ns

    def block_acct_invalid(self, kind: BlockAcctType) -> None:
        with self.lock:
            self.invalid_ops[kind] += 1

    def to_dict(self) -> dict[str, int]:
        """The subset of QMP's BlockDeviceStats we keep, with QEMU's field names."""
        r, w, f = BlockAcctType.READ, BlockAcctType.WRITE, BlockAcctType.FLUSH
        with self.lock:
            return {
                "rd_bytes": self.nr_bytes[r],
                "wr_bytes": self.nr_bytes[w],
                "rd_operations": self.nr_ops[r],
                "wr_operations": self.nr_ops[w],
                "flush_operations": self.nr_ops[f],
                "failed_rd_operations": self.failed_ops[r],
                "failed_wr_operations": self.failed_ops[w],
                "failed_flush_operations": self.failed_ops[f],
                "invalid_rd_operations": self.invalid_ops[r],
                "invalid_wr_operations": self.invalid_ops[w],
                "invalid_flush_operations": self.invalid_ops[f],
                "rd_total_time_ns": self.total_time_ns[r],
                "wr_total_time_ns": self.total_time_ns[w],
                "flush_total_time_ns": self.total_time_ns[f],
            }
