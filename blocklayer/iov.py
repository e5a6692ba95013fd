"""IOVector: a scatter/gather list over memory we do not own (QEMU's QEMUIOVector).

It wraps a C ``struct iovec[]`` (usually pointing into guest memory that libvhost-user mapped),
so io_uring can take it as it is, and offers zero-copy ``memoryview``s for Python-side drivers.
The owner (the virtio request) keeps the memory mapped until the request completes.
"""

from __future__ import annotations

from typing import Any

from vhost.ffi import ffi, lib


class IOVector:
    """``niov`` C iovecs covering ``size`` bytes; ``keep`` holds whatever keeps them alive."""

    __slots__ = ("iov", "niov", "size", "keep")

    def __init__(self, iov: Any, niov: int, size: int, keep: Any = None) -> None:
        self.iov = iov
        self.niov = niov
        self.size = size
        self.keep = keep

    @classmethod
    def from_buffers(cls, buffers: list[Any]) -> IOVector:
        """Build an IOVector over Python buffers (bytearray etc.): for tests and tools."""
        arr = ffi.new("struct iovec[]", len(buffers))
        keep = []
        total = 0
        for i, b in enumerate(buffers):
            cbuf = ffi.from_buffer(b)
            keep.append(cbuf)
            arr[i].iov_base = cbuf
            arr[i].iov_len = len(cbuf)
            total += len(cbuf)
        return cls(arr, len(buffers), total, (buffers, keep))

    def buffers(self) -> list[memoryview]:
        """Zero-copy writable views of each element (valid while the owner keeps the memory)."""
        iov = self.iov
        return [
            memoryview(ffi.buffer(iov[i].iov_base, iov[i].iov_len)) for i in range(self.niov)
        ]

    def memset(self, byte: int, start: int = 0) -> None:
        """Fill the vector from byte offset ``start`` to the end with ``byte``."""
        lib.pyvu_iov_memset(self.iov, self.niov, start, byte)

    def slice_from(self, skip: int) -> IOVector:
        """The same memory minus its first ``skip`` bytes (zero-copy; keeps self alive)."""
        dst = ffi.new("struct iovec[]", max(self.niov, 1))
        size = ffi.new("uint64_t *")
        n = lib.pyvu_iov_slice(self.iov, self.niov, skip, 0, dst, size)
        if n < 0:
            raise ValueError("slice beyond the end of the vector")
        return IOVector(dst, n, size[0], self)

    def slice_to(self, size: int) -> IOVector:
        """The same memory cut to its first ``size`` bytes (zero-copy; keeps self alive)."""
        dst = ffi.new("struct iovec[]", max(self.niov, 1))
        out = ffi.new("uint64_t *")
        n = lib.pyvu_iov_slice(self.iov, self.niov, 0, self.size - size, dst, out)
        if size > self.size or n < 0:
            raise ValueError("slice beyond the end of the vector")
        return IOVector(dst, n, size, self)

    def is_aligned(self, align: int) -> bool:
        """Every element's address and length is a multiple of ``align`` (a power of 2)."""
        mask, iov = align - 1, self.iov
        for i in range(self.niov):
            if (int(ffi.cast("uintptr_t", iov[i].iov_base)) | iov[i].iov_len) & mask:
                return False
        return True

    def to_bytes(self) -> bytes:
        """Copy the contents out (tests, small buffers)."""
        return b"".join(bytes(b) for b in self.buffers())
