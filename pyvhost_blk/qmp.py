"""The QMP monitor (QEMU Machine Protocol): the public names, re-exported from its parts.

Theory of operation
-------------------
The monitor is split by concern; this module only gathers the public names, so that
``from pyvhost_blk.qmp import QmpDispatcher, QmpError, arg_str, ...`` keeps working:

* ``pyvhost_blk/qmp_args.py``: :class:`QmpError` and the QAPI argument checks that command
  handlers use (``args_check``, ``arg_str``, ``arg_int``, ...).
* ``pyvhost_blk/qmp_json.py``: the wire's JSON as QEMU writes it (:func:`json_encode`) and reads
  it (:class:`JsonStreamer`, QEMU's incremental lexer + streamer, with its error texts).
* ``pyvhost_blk/qmp_dispatch.py``: :class:`QmpDispatcher`, the command registry shared by all
  monitors, the single request queue run one command at a time, the built-in commands and the
  events.
* ``pyvhost_blk/qmp_monitor.py``: :class:`Monitor`, one listening socket serving one client at
  a time, with non-blocking buffered input and output.

Threads: everything runs in one AioContext, the dispatcher's ``ctx`` (by default the main
loop); :meth:`QmpDispatcher.emit` is the only entry point for other threads.  Behaviour was
checked against qemu-storage-daemon 7.2 with a raw socket.
"""

from __future__ import annotations

from pyvhost_blk.qmp_args import (
    QmpError,
    arg_bool,
    arg_dict,
    arg_int,
    arg_str,
    arg_str_list,
    args_check,
)
from pyvhost_blk.qmp_dispatch import QMP_VERSION, AsyncHandler, QmpDispatcher, SyncHandler
from pyvhost_blk.qmp_json import (
    MAX_NESTING,
    MAX_TOKEN_COUNT,
    MAX_TOKEN_SIZE,
    JsonStreamer,
    json_encode,
)
from pyvhost_blk.qmp_monitor import OUTBUF_MAX, QUEUE_MAX, RECV_SIZE, Monitor

__all__ = [
    "MAX_NESTING",
    "MAX_TOKEN_COUNT",
    "MAX_TOKEN_SIZE",
    "OUTBUF_MAX",
    "QMP_VERSION",
    "QUEUE_MAX",
    "RECV_SIZE",
    "AsyncHandler",
    "JsonStreamer",
    "Monitor",
    "QmpDispatcher",
    "QmpError",
    "SyncHandler",
    "arg_bool",
    "arg_dict",
    "arg_int",
    "arg_str",
    "arg_str_list",
    "args_check",
    "json_encode",
]
