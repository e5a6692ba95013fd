"""A filter that checksums every 4 KiB block written and fails reads whose data no longer
matches (silent corruption below it: a bad disk, a stray writer).  Checksums live in memory
(a real one would store them beside the image).

    pyvhost-blk --blockdev driver=file,node-name=img,filename=disk.img \\
                --blockdev driver=python-filter,node-name=sum,\\
script=examples/checksum_filter.py,file=img --export ...,node-name=sum

A read of a block never written through the filter is not checked.  A mismatch fails the
read with EILSEQ... as EIO to the guest (virtio-blk has one error status); the log says
which block.
"""

import errno
import zlib

import nbdkit

BLOCK = 4096
sums = {}  # block number -> crc32


def _blocks(buf, offset):
    """(block number, view) of each whole block; partial blocks are forgotten."""
    first = -(-offset // BLOCK)
    skip = first * BLOCK - offset
    for k in range((len(buf) - skip) // BLOCK):
        yield first + k, buf[skip + k * BLOCK:skip + (k + 1) * BLOCK]


def _forget(offset, length):
    for b in range(offset // BLOCK, -(-(offset + length) // BLOCK)):
        sums.pop(b, None)


async def pwrite(next, h, buf, offset, flags):
    await next.pwrite(buf, offset, flags)
    _forget(offset, len(buf))
    for b, view in _blocks(buf, offset):
        sums[b] = zlib.crc32(view)


async def pread(next, h, buf, offset, flags):
    await next.pread(buf, offset, flags)
    for b, view in _blocks(buf, offset):
        want = sums.get(b)
        if want is not None and zlib.crc32(view) != want:
            nbdkit.debug(f"checksum mismatch in block {b}")
            nbdkit.set_error(errno.EIO)
            raise OSError(errno.EIO, f"checksum mismatch in block {b}")


async def trim(next, h, count, offset, flags):
    _forget(offset, count)
    await next.trim(count, offset, flags)


async def zero(next, h, count, offset, flags):
    _forget(offset, count)
    await next.zero(count, offset, flags)
