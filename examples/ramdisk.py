"""A RAM disk: the smallest useful plugin.  It is an nbdkit Python plugin as well, so the
same file runs under ``nbdkit python examples/ramdisk.py size=64M`` and under

    pyvhost-blk --blockdev driver=python,node-name=ram,script=examples/ramdisk.py,size=64M \\
                --export type=vhost-user-blk,id=e0,node-name=ram,writable=on,\\
addr.type=unix,addr.path=/tmp/ram.sock

Contents start as zeroes and vanish with the process.
"""

import nbdkit

API_VERSION = 2

size = 64 * 1024 * 1024
disk = None  # a memoryview of the bytearray: its slices are views, so each call copies once


def config(key, value):
    global size
    if key != "size":
        raise RuntimeError(f"unknown parameter {key!r}")
    size = nbdkit.parse_size(value)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL  # the GIL makes each call atomic


def open(readonly):
    global disk
    if disk is None:
        disk = memoryview(bytearray(size))
    return 1


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf


def zero(h, count, offset, flags):
    disk[offset:offset + count] = bytes(count)


def trim(h, count, offset, flags):
    zero(h, count, offset, flags)
