"""Decoding compressed qcow2 clusters: zlib (raw deflate, compression type 0) and zstd
(type 1).

A compressed cluster's descriptor gives a host offset and a length rounded up to 512-byte
sectors, so the stored bytes are one compressed stream followed by garbage.  Raw deflate stops
at its end by itself; for zstd the frame's real size is asked first
(``ZSTD_findFrameCompressedSize``).  zstd comes from ``libzstd.so.1`` through ctypes (the
``zstandard`` module is rarely installed); without it, reading a zstd cluster fails with
ENOTSUP and a log line saying what to install.

Runs in the request's AioContext (pure computation, no I/O).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import zlib

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

_zstd: ctypes.CDLL | None = None
_zstd_error = ""


def _load_zstd() -> ctypes.CDLL:
    global _zstd, _zstd_error
    if _zstd is not None:
        return _zstd
    if _zstd_error:
        raise OSError(errno.ENOTSUP, _zstd_error)
    name = ctypes.util.find_library("zstd") or "libzstd.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        _zstd_error = ("zstd-compressed qcow2 cluster: libzstd.so.1 is missing "
                       "(install libzstd1, e.g. 'apt-get install libzstd1')")
        raise OSError(errno.ENOTSUP, _zstd_error) from None
    lib.ZSTD_findFrameCompressedSize.restype = ctypes.c_size_t
    lib.ZSTD_findFrameCompressedSize.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.ZSTD_decompress.restype = ctypes.c_size_t
    lib.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p,
                                    ctypes.c_size_t]
    lib.ZSTD_isError.restype = ctypes.c_uint
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    _zstd = lib
    return lib


def zstd_available() -> bool:
    try:
        _load_zstd()
    except OSError:
        return False
    return True


def decompress_cluster(ctype: int, data: bytes, cluster_size: int) -> bytes:
    """The ``cluster_size`` bytes a compressed cluster holds.  Raises OSError(EIO) if the
    stream is corrupt or too short, OSError(ENOTSUP) for a decoder we do not have."""
    if ctype == COMPRESSION_ZLIB:
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(data, cluster_size)
        except zlib.error as e:
            raise OSError(errno.EIO, f"corrupt compressed cluster: {e}") from None
    elif ctype == COMPRESSION_ZSTD:
        lib = _load_zstd()
        n = lib.ZSTD_findFrameCompressedSize(data, len(data))
        if lib.ZSTD_isError(n):
            raise OSError(errno.EIO, "corrupt zstd-compressed cluster")
        buf = ctypes.create_string_buffer(cluster_size)
        got = lib.ZSTD_decompress(buf, cluster_size, data, n)
        if lib.ZSTD_isError(got):
            raise OSError(errno.EIO, "corrupt zstd-compressed cluster")
        out = buf.raw[:got]
    else:
        raise OSError(errno.ENOTSUP, f"unknown compression type {ctype}")
    if len(out) != cluster_size:
        raise OSError(errno.EIO, "compressed cluster decodes to the wrong size")
    return out
