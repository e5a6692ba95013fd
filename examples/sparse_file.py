"""A disk backed by a sparse file, as a plugin: reads and writes go to the file with
os.preadv/os.pwritev, trim punches holes.  It blocks on the file system, so it says so
(``BLOCKING = True``): its calls run in threads of its own, never in the queue's loop.

    pyvhost-blk --blockdev driver=python,node-name=d,script=examples/sparse_file.py,\\
file=/var/tmp/disk.img,size=1G --export type=vhost-user-blk,id=e0,node-name=d,writable=on,\\
addr.type=unix,addr.path=/tmp/d.sock

The file is created (sparse) if missing and grown to ``size`` if smaller.  Also an nbdkit
plugin: ``nbdkit python examples/sparse_file.py file=... size=...``.
"""

import errno
import os

import nbdkit

API_VERSION = 2
BLOCKING = True

path = None
size = None
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def config(key, value):
    global path, size
    if key == "file":
        path = value
    elif key == "size":
        size = nbdkit.parse_size(value)
    else:
        raise RuntimeError(f"unknown parameter {key!r}")


def config_complete():
    if path is None:
        raise RuntimeError("file=PATH is required")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL  # pread/pwrite at offsets need no lock


def open(readonly):
    fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT) | os.O_CLOEXEC,
                 0o644)
    if size is not None and not readonly and os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)
    return fd


def close(fd):
    os.close(fd)


def get_size(fd):
    return os.fstat(fd).st_size


def pread(fd, buf, offset, flags):
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:  # past the end of the file: zeroes
            buf[done:] = bytes(len(buf) - done)
            return
        done += n


def pwrite(fd, buf, offset, flags):
    done = 0
    while done < len(buf):
        done += os.pwritev(fd, [buf[done:]], offset + done)
    if flags & nbdkit.FLAG_FUA:
        os.fdatasync(fd)


def can_fua(fd):
    return nbdkit.FUA_NATIVE


def flush(fd, flags):
    os.fdatasync(fd)


def trim(fd, count, offset, flags):
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, count):
            raise OSError(ctypes.get_errno(), "fallocate")
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise  # unsupported: trim is advisory, nothing to do
