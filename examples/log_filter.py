"""A filter that logs every request, then passes it on unchanged.

    pyvhost-blk --blockdev driver=file,node-name=img,filename=disk.img \\
                --blockdev driver=python-filter,node-name=log,script=examples/log_filter.py,\\
file=img,logfile=/tmp/requests.log --export ...,node-name=log

One line per request: operation, offset, length, and the result (ok or the error).
"""

import time

logfile = None
out = None


def config(key, value):
    global logfile
    if key != "logfile":
        raise RuntimeError(f"unknown parameter {key!r}")
    logfile = value


def open(next, readonly):
    global out
    out = __builtins__["open"](logfile, "a", buffering=1) if logfile else None
    return None


def _log(op, offset, length, result):
    if out is not None:
        out.write(f"{time.time():.6f} {op} offset={offset} length={length} {result}\n")


async def _logged(op, offset, length, io):
    try:
        await io
    except OSError as e:
        _log(op, offset, length, f"error={e.errno}")
        raise
    _log(op, offset, length, "ok")


async def pread(next, h, buf, offset, flags):
    await _logged("read", offset, len(buf), next.pread(buf, offset, flags))


async def pwrite(next, h, buf, offset, flags):
    await _logged("write", offset, len(buf), next.pwrite(buf, offset, flags))


async def flush(next, h, flags):
    await _logged("flush", 0, 0, next.flush(flags))


async def trim(next, h, count, offset, flags):
    await _logged("trim", offset, count, next.trim(count, offset, flags))


async def zero(next, h, count, offset, flags):
    await _logged("zero", offset, count, next.zero(count, offset, flags))


def close(h):
    if out is not None:
        out.close()
