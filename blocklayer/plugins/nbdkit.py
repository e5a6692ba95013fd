"""The ``nbdkit`` module as nbdkit's Python plugins see it, for running them unchanged.

nbdkit embeds Python and offers plugins an ``nbdkit`` module (nbdkit-python-plugin(3)): the
constants of the C API and a few functions.  ``driver=python`` installs this module as
``sys.modules["nbdkit"]`` before loading a script, so ``import nbdkit`` works the same.  The
values are nbdkit's (nbdkit-plugin.h), so a plugin comparing flags gets what it expects.

``set_error(err)`` records the errno the next exception stands for, per thread (a plugin may
be called from several threads); the driver takes it with ``take_error()``.
"""

from __future__ import annotations

import logging
import threading

from blocklayer.qapi import parse_size as _parse_size

THREAD_MODEL_SERIALIZE_CONNECTIONS = 0
THREAD_MODEL_SERIALIZE_ALL_REQUESTS = 1
THREAD_MODEL_SERIALIZE_REQUESTS = 2
THREAD_MODEL_PARALLEL = 3

FLAG_MAY_TRIM = 1 << 0
FLAG_FUA = 1 << 1
FLAG_REQ_ONE = 1 << 2
FLAG_FAST_ZERO = 1 << 3

FUA_NONE = 0
FUA_EMULATE = 1
FUA_NATIVE = 2

CACHE_NONE = 0
CACHE_EMULATE = 1
CACHE_NATIVE = 2

EXTENT_HOLE = 1 << 0
EXTENT_ZERO = 1 << 1

_log = logging.getLogger("pyvhost_blk.plugin")
_local = threading.local()


def debug(msg: str) -> None:
    """Log ``msg`` at debug level (nbdkit prints it with -v)."""
    _log.debug("%s", msg)


def set_error(err: int) -> None:
    """The errno the exception the plugin is about to raise stands for."""
    _local.err = int(err)


def take_error() -> int | None:
    """The errno ``set_error`` recorded in this thread since the last call, if any."""
    err = getattr(_local, "err", None)
    _local.err = None
    return err


def export_name() -> str:
    """A vhost-user disk has no NBD export name: always ''."""
    return ""


def parse_size(text: str) -> int:
    """'100M' -> bytes (QEMU's size syntax, which nbdkit's suffixes are a subset of)."""
    return _parse_size(text)


def shutdown() -> None:
    """Asynchronous server shutdown: pyvhost-blk leaves that to QMP/signals; logged."""
    _log.warning("a plugin asked for shutdown (ignored: use QMP quit or SIGTERM)")
