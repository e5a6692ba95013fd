"""Batch: parsed requests handed to a Python driver as plain values, many per call.

The C queue loop (``vhost/_fastpath.c``) parses and checks reads, writes and flushes for a
driver that declares ``batch_io`` (``FastPathInfo(DRV_PYBATCH)``), and the device hands them
over in these parallel C arrays: ``types[i]`` (VIRTIO_BLK_T_IN/OUT/FLUSH), ``offsets[i]`` and
``lengths[i]`` in bytes, ``iovs[i]``/``niovs[i]`` the data buffers (the status byte is not part
of them).  The driver sets ``ret[i]`` (0 or -errno) for each of the first ``n``.
"""

from __future__ import annotations

from vhost.ffi import ffi


class Batch:
    """Parallel C arrays describing ``n`` parsed requests (filled by the queue)."""

    MAX = 256

    def __init__(self) -> None:
        m = self.MAX
        self.handles = ffi.new("void *[]", m)
        self.types = ffi.new("int[]", m)
        self.offsets = ffi.new("uint64_t[]", m)
        self.lengths = ffi.new("uint64_t[]", m)
        self.iovs = ffi.new("struct iovec *[]", m)
        self.niovs = ffi.new("unsigned[]", m)
        self.ret = ffi.new("int[]", m)
        self.n = 0
