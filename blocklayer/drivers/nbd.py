"""``driver=nbd``: a disk on an NBD server, through libnbd (QEMU's block/nbd.c, on libnbd).

Options (QEMU's names): ``server.type=unix|inet``, ``server.path`` (unix), ``server.host`` and
``server.port`` (inet; port default 10809), ``export`` (default ""), ``reconnect-delay``
(seconds, default 0) and ``open-timeout`` (seconds, default 0), plus the common ``read-only``
and ``auto-read-only``.  The client library is Debian's ``python3-libnbd`` (module ``nbd``),
imported when a node is opened so that the other drivers load without it.

Theory of operation
-------------------
*Open* (main thread) connects synchronously, retrying until ``open-timeout`` has passed (one
attempt when 0), each attempt bounded by ``HANDSHAKE_TIMEOUT`` so a server that accepts and
never answers is one clear error line, not a hang.  What the server offers is read once:
size, read-only, flush/FUA/trim/write-zeroes, block size constraints (``limits()``).

*I/O*: one libnbd handle (one connection) per node, driven through libnbd's asynchronous API
from one AioContext, the node's *home*: the context of the first request.  A request from
another context hops into the home context with a bottom half and its completion hops back, so
every libnbd call on a connected handle is made by the home thread (no lock of ours, no thread
per request).  The handle's socket is an fd of the home context: its read handler is always
set, its write handler only while libnbd waits to send (``aio_get_direction``: a request larger
than the socket buffer), and they call ``aio_notify_read``/``aio_notify_write``.

The hot path is ``batch_io``: a batch of parsed reads, writes and flushes (plain values, see
``blocklayer/batch.py``) becomes one libnbd command each in a single Python call, straight on
guest memory -- libnbd's Python binding takes any buffer-like object, so a read lands in, and a
write is sent from, a cffi buffer over the guest's memory: no copy, no ``nbd.Buffer``.  In the
home context each command is issued as soon as it is built.  Each request's completion is
``b.defer(i)``, called from libnbd's completion callback when the command succeeded.
Requests the batch path does not take (several guest buffers, above the payload limit, FUA
emulated with a flush) and discard/write-zeroes go through ``aio_*``.

Per wake-up: libnbd's ``aio_notify_read`` reads at most one reply (its state machine goes
back to READY after each), so while ``poll(0)`` says more is waiting we call it again: a burst
of replies costs one trip through the event loop and one guest notification, not one each.
(Never call it with nothing to read: libnbd 1.14 then stays in REPLY.START and *queues* every
command issued afterwards until data arrives, which with nothing in flight is never.)
``set_pread_initialize(False)``: libnbd does not zero a read's buffer before the server fills it.

*Polling.*  The home context's adaptive polling (``vhost/csrc/poller.c``) is left as it is,
although it watches virtqueue memory and looks at the socket only between polls: measured with
this driver, turning it off for the node's context (QEMU's rule for an fd handler without a
poll callback) lost more -- about 40 % at QD1 on a busy 2-core host -- than the late replies
cost (probably because a polling thread is still on its CPU when the next event comes, where a
sleeping one waits to be scheduled).

libnbd calls completion callbacks while holding the handle's lock, so a callback must not call
libnbd: a batch request's ``done`` (it only records the result for C) runs right there; every
other completion is recorded as ``(command, error)`` and handled once the libnbd call returned
(``_drain``): a request's ``cb`` may submit another request (FUA emulation,
read-modify-write), which would otherwise re-enter libnbd.

*Reconnect*: when the connection breaks (the socket reports EOF or an error, or libnbd
refuses a command because the handle is dead), the commands that were in flight and those
that arrive afterwards wait in ``_waiting`` while the first ``reconnect-delay`` seconds last,
as QEMU's nbd driver does; after that (at once with ``reconnect-delay=0``) they fail with EIO.
The delay is a timer of the home context (``timer_new``).  Reconnecting itself goes on in the
background as in QEMU, whose connection attempts also run in a thread of their own
(nbd/client-connection.c): a *reconnect thread* (one, only while the server is away) makes
blocking connection attempts (name resolution, connect, handshake) on a fresh handle with a
growing pause, and hands a connected handle to the home context with a bottom half, where the
waiting commands are resubmitted in order.

Two rules keep a command from being lost across a connection loss.  A dead handle gives no
event: libnbd may accept a command, fail to send it, abort everything in flight and close the
socket itself (out of epoll), so after every libnbd call the handle is checked
(``_update_direction``).  And a handle is never dropped with commands in flight: libnbd frees
their callbacks without calling them, so one given up while still alive is shut down first
(``_abort_commands``).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from blocklayer.aio import AioContext, AioTimer
from blocklayer.batch import T_FLUSH, T_READ, T_WRITE, UNSET, Batch
from blocklayer.bdrv import (
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BlockDriver,
    BlockDriverError,
    BlockDriverState,
    Completion,
    bdrv_register,
)
from blocklayer.blockdev_options import enum_of
from blocklayer.iov import IOVector
from blocklayer.qapi import to_int, to_str
from vhost.ffi import ffi, lib

log = logging.getLogger("pyvhost_blk.nbd")

NBD_DEFAULT_PORT = "10809"
#: bound on one connection attempt (TCP connect + handshake); open-timeout may extend it
HANDSHAKE_TIMEOUT = 10.0
#: pauses between reconnection attempts: from the first to the last, doubling
RECONNECT_PAUSE_MIN, RECONNECT_PAUSE_MAX = 0.05, 1.0
#: largest read/write payload sent in one command when the server states no maximum
#: (libnbd's and qemu-nbd's limit)
DEFAULT_MAX_PAYLOAD = 32 << 20
#: largest trim / write-zeroes length per command (NBD lengths are 32-bit)
MAX_EFFECT_LEN = 1 << 30
#: replies read per wake-up at most (then the event loop gets its turn)
MAX_REPLIES_PER_WAKE = 64
#: errors libnbd gives commands that died with the connection
_CONN_ERRNOS = frozenset((errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNRESET, errno.EPIPE))

CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_ZERO = range(5)

# Connection states
CONNECTED, RECONNECTING, CLOSED = range(3)


def _uint32(v: Any, name: str, *, from_json: bool = False) -> int:
    return to_int(v, name, "uint32", from_json=from_json)


def _alive(h: Any) -> bool:
    """Home context: the connection works (aio_is_ready would be false in the middle of
    sending a command, which is no reason to give up on it)."""
    return not (h.aio_is_dead() or h.aio_is_closed())


def _import_nbd() -> Any:
    """Any thread: the libnbd binding, or one line saying how to install it."""
    try:
        import nbd
    except ImportError:
        raise BlockDriverError(
            "driver 'nbd' needs libnbd's Python binding (module 'nbd'): "
            "install the Debian package python3-libnbd") from None
    return nbd


class _Request:
    """A block-layer request split into several commands (payload limits) or bounced: its
    commands complete apart; ``cb`` runs in ``ctx`` once the last one is over."""

    __slots__ = ("ctx", "home", "cb", "pending", "ret", "bounce", "qiov")

    def __init__(self, ctx: AioContext, home: AioContext, cb: Completion,
                 bounce: bytearray | None = None, qiov: IOVector | None = None) -> None:
        self.ctx = ctx
        self.home = home
        self.cb = cb
        self.pending = 0
        self.ret = 0
        self.bounce = bounce  # reads into a multi-element qiov land here first
        self.qiov = qiov

    def part(self, ret: int) -> None:
        """Home context: one command is over."""
        if ret < 0 and self.ret == 0:
            self.ret = ret
        self.pending -= 1
        if self.pending:
            return
        if self.bounce is not None and self.ret == 0:
            q = self.qiov
            lib.pyvu_iov_from_buf(q.iov, q.niov, ffi.from_buffer(self.bounce), q.size)
        if self.ctx is self.home:
            self.cb(self.ret)
        else:
            self.ctx.schedule(self.cb, self.ret)


class _Cmd:
    """One NBD command (resubmitted as it is after a reconnect), and libnbd's completion
    callback for it (an instance is callable: no closure per command)."""

    __slots__ = ("drv", "kind", "offset", "length", "flags", "buf", "done", "ctx", "leaf")

    def __init__(self, drv: NbdDriver, kind: int, offset: int, length: int, flags: int,
                 buf: Any, done: Callable[[int], None], ctx: AioContext, leaf: bool) -> None:
        self.drv = drv
        self.kind = kind
        self.offset = offset
        self.length = length
        self.flags = flags
        self.buf = buf  # the payload (guest memory or a bounce buffer), alive until done
        self.done = done  # called once with 0 or -errno, in ctx
        self.ctx = ctx
        #: done may run inside libnbd's callback (it never calls libnbd: a batch entry's)
        self.leaf = leaf

    def __call__(self, err: Any) -> int:
        """libnbd's completion callback (home context, handle lock held): a leaf's success
        is delivered at once; anything else after libnbd returned (``_drain``)."""
        e = err.value
        if not e and self.leaf:
            self.done(0)
        else:
            self.drv._completed.append((self, e))
        return 1  # retire the command


@bdrv_register
class NbdDriver(BlockDriver):
    format_name = "nbd"
    options = {
        "server.type": enum_of("unix", "inet"),
        "server.path": to_str,
        "server.host": to_str,
        "server.port": to_str,
        "export": to_str,
        "reconnect-delay": _uint32,
        "open-timeout": _uint32,
    }

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        """Main thread: parse options, connect (blocking, bounded), read the server's offer."""
        super().__init__(node_name, opts)
        self.nbd = _import_nbd()
        stype = opts.get("server.type")
        if stype is None:
            raise BlockDriverError("Parameter 'server.type' is missing")
        if stype == "unix":
            if "server.path" not in opts:
                raise BlockDriverError("Parameter 'server.path' is missing")
            self.path: str = opts["server.path"]
            self.addr = self.path
        else:
            if "server.host" not in opts:
                raise BlockDriverError("Parameter 'server.host' is missing")
            self.host: str = opts["server.host"]
            self.port: str = opts.get("server.port", NBD_DEFAULT_PORT)
            self.addr = f"{self.host}:{self.port}"
        self.stype = stype
        self.export: str = opts.get("export", "")
        self.reconnect_delay: int = opts.get("reconnect-delay", 0)
        self.open_timeout: int = opts.get("open-timeout", 0)
        if stype == "unix":
            self.filename = f"nbd+unix:///{self.export}?socket={self.path}"
        else:
            self.filename = f"nbd://{self.addr}/{self.export}"

        self._h = self._open_connection()
        self.size: int = self._h.get_size()
        self.server_read_only = bool(self._h.is_read_only())
        self.read_only = bool(opts.get("read-only", False))
        if self.server_read_only and not self.read_only:
            if not opts.get("auto-read-only", False):
                self._h = None
                raise BlockDriverError("NBD export is read-only")
            self.read_only = True  # QEMU's bdrv_apply_auto_read_only
        h = self._h
        self.has_flush = bool(h.can_flush())
        self.has_fua = bool(h.can_fua())
        self.has_trim = bool(h.can_trim())
        self.has_zero = bool(h.can_zero())
        nbd = self.nbd
        self.min_block = h.get_block_size(nbd.SIZE_MINIMUM)
        self.max_payload = h.get_block_size(nbd.SIZE_MAXIMUM) or DEFAULT_MAX_PAYLOAD
        self.max_payload = min(self.max_payload, DEFAULT_MAX_PAYLOAD)
        self._fua_flag = nbd.CMD_FLAG_FUA
        self._dir_write = nbd.AIO_DIRECTION_WRITE

        self._state = CONNECTED
        self._home: AioContext | None = None
        self._fd = -1  # the connection's socket, watched by the home context (-1: none)
        self._writing = False  # its write handler is set
        self._rpoll: Any = None  # select.poll on the socket: more replies waiting?
        self._completed: list[tuple[_Cmd, int]] = []
        self._draining = False
        self._waiting: list[_Cmd] = []  # commands waiting for a reconnect
        self._delay_over = False  # the reconnect-delay of the current outage has run out
        self._delay_timer: AioTimer | None = None
        self._gen = 0  # outage counter: bottom halves of an older outage are ignored
        self._stop = threading.Event()  # tells the reconnect thread to give up (close)
        self._reconnect_thread: threading.Thread | None = None
        self._disconnect_time = 0.0
        #: what tests and stats may look at
        self.reconnects = 0
        self.last_outage_s = 0.0

    # -- connecting (main thread at open, the reconnect thread later) ------------------------
    def _connect_once(self, timeout: float) -> Any:
        """Any thread but the home one: one connection attempt on a new handle, bounded by
        ``timeout`` seconds.  Returns the connected handle; raises nbd.Error or TimeoutError."""
        nbd = self.nbd
        h = nbd.NBD()
        h.set_handle_name(f"pyvhost-blk:{self.node_name}")
        h.set_pread_initialize(False)  # the server fills the buffer; no memset before
        h.set_export_name(self.export)
        if self.stype == "unix":
            h.aio_connect_unix(self.path)
        else:
            h.aio_connect_tcp(self.host, self.port)
        deadline = time.monotonic() + timeout
        while not (h.aio_is_ready() or h.aio_is_dead() or h.aio_is_closed()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(errno.ETIMEDOUT, "no answer from the server")
            h.poll(max(1, int(remaining * 1000)))  # releases the GIL
        if not h.aio_is_ready():
            raise nbd.Error("connection closed during the handshake", errno.ECONNRESET)
        return h

    def _open_connection(self) -> Any:
        """Main thread: connect, retrying for open-timeout seconds; one line on failure."""
        nbd = self.nbd
        deadline = time.monotonic() + self.open_timeout
        pause = RECONNECT_PAUSE_MIN
        while True:
            attempt = max(HANDSHAKE_TIMEOUT, deadline - time.monotonic())
            try:
                return self._connect_once(attempt)
            except TimeoutError:
                raise BlockDriverError(
                    f"Failed to connect to '{self.addr}': no NBD handshake within "
                    f"{attempt:.0f} seconds") from None
            except nbd.Error as e:
                if time.monotonic() + pause >= deadline:
                    raise BlockDriverError(self._describe(e)) from None
            time.sleep(pause)
            pause = min(pause * 2, RECONNECT_PAUSE_MAX)

    def _describe(self, e: Any) -> str:
        """The one line for a failed connection attempt (QEMU's wording where it has one)."""
        msg = str(e.string)
        if "connect:" in msg and e.errnum:
            return f"Failed to connect to '{self.addr}': {os.strerror(e.errnum)}"
        return (f"Could not open NBD export '{self.export}' at '{self.addr}': "
                f"{msg.split(': ', 1)[-1]}")

    # -- the block driver interface --------------------------------------------------------
    def attach(self, bs: BlockDriverState) -> None:
        super().attach(bs)
        if self.read_only:
            bs.read_only = True  # auto-read-only over a read-only export

    def getlength(self) -> int:
        return self.size

    def can_write(self) -> bool:
        return not self.read_only

    def query_info(self) -> dict[str, Any]:
        """The connection's state, for diagnosing a stall (main thread; libnbd's own
        counters are read under its handle lock)."""
        h = self._h
        d: dict[str, Any] = {
            "state": ("connected", "reconnecting", "closed")[self._state],
            "reconnects": self.reconnects, "waiting": len(self._waiting),
            "completed": len(self._completed), "fd": self._fd, "writing": self._writing,
        }
        if h is not None:
            try:
                d.update({"libnbd-in-flight": h.aio_in_flight(),
                          "libnbd-direction": h.aio_get_direction(),
                          "libnbd-ready": bool(h.aio_is_ready())})
            except self.nbd.Error as e:
                d["libnbd-error"] = str(e.string)
        return {"x-nbd": d}

    def limits(self) -> tuple[int, int]:
        """The server's minimum block size, else 512 as QEMU assumes (a server that states
        nothing may still reject smaller requests)."""
        return (self.min_block or 512), 1

    # -- batches (the queue's AioContext) ------------------------------------------------------
    def batch_io(self, b: Batch) -> None:
        """One command per request, on guest memory; what this does not take (several
        buffers, above the payload limit, emulated FUA) goes through ``aio_*``.  In the home
        context, connected: each command is issued as it is built (one pass, one
        ``aio_get_direction`` per batch)."""
        ctx = b.ctx
        if self._home is None:
            self._bind(ctx)
        home = self._home
        n, types, ret, offs, lens = b.n, b.types, b.ret, b.offsets, b.lengths
        iovs, niovs, flags, defer = b.iovs, b.niovs, b.flags, b.defer
        buffer = ffi.buffer  # a cffi buffer is buffer-like: libnbd reads/writes guest memory
        leaf = ctx is home
        step, fua_ok, has_flush, fua = self.max_payload, self.has_fua, self.has_flush, \
            self._fua_flag
        h = self._h if leaf and self._state == CONNECTED else None
        cmds: list[_Cmd] = []
        for i in range(n):
            if ret[i] != UNSET:
                continue
            t = types[i]
            if t == T_READ or t == T_WRITE:
                fl, length = flags[i], lens[i]
                if niovs[i] != 1 or length > step or (fl and not fua_ok):
                    self._batch_one(b, i)
                    continue
                cmd = _Cmd(self, CMD_READ if t == T_READ else CMD_WRITE, offs[i], length,
                           fua if fl else 0, buffer(iovs[i][0].iov_base, length), defer(i),
                           ctx, leaf)
            elif t == T_FLUSH:
                if not has_flush:
                    ret[i] = 0  # the server has no cache to flush
                    continue
                cmd = _Cmd(self, CMD_FLUSH, 0, 0, 0, None, defer(i), ctx, leaf)
            else:
                self._batch_one(b, i)
                continue
            if h is None:
                cmds.append(cmd)
                continue
            try:
                if t == T_READ:
                    h.aio_pread(cmd.buf, cmd.offset, cmd, cmd.flags)
                elif t == T_WRITE:
                    h.aio_pwrite(cmd.buf, cmd.offset, cmd, cmd.flags)
                else:
                    h.aio_flush(cmd)
            except self.nbd.Error:
                # Refused (the command fails) or the connection is gone (it waits): the
                # general path sorts it out, with the rest of the batch after it.
                cmds.append(cmd)
                h = None
        if h is not None:
            self._update_direction()  # or the connection broke while sending: see there
        if cmds:
            if leaf:
                self._submit_all(cmds)
            else:
                home.schedule(self._submit_all, cmds)
        if leaf and self._completed:
            self._drain()  # aborted commands wait for the reconnect; failures are reported

    def _batch_one(self, b: Batch, i: int) -> None:
        """A batch entry the batch path does not take: as a single request."""
        t, done = b.types[i], b.defer(i)
        if t == T_READ:
            self.aio_preadv(b.ctx, b.offsets[i], b.qiov(i), done)
        elif t == T_WRITE:
            self.aio_pwritev(b.ctx, b.offsets[i], b.qiov(i), b.flags[i], done)
        else:
            done(-errno.ENOTSUP)

    # -- single requests (caller's context) ---------------------------------------------------
    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        """Read straight into the guest's buffer when it is one piece."""
        if qiov.niov == 1:
            self._payload(ctx, cb, CMD_READ, offset, qiov.buffers()[0], 0)
        else:
            bounce = bytearray(qiov.size)
            self._payload(ctx, cb, CMD_READ, offset, memoryview(bounce), 0, bounce, qiov)

    def aio_pwritev(
        self, ctx: AioContext, offset: int, qiov: IOVector, flags: int, cb: Completion
    ) -> None:
        """FUA goes to the server as FUA, or as a flush after the write."""
        if flags & BDRV_REQ_FUA and not self.has_fua and self.has_flush:
            cb = self._then_flush(ctx, cb)
        nflags = self._fua_flag if flags & BDRV_REQ_FUA and self.has_fua else 0
        if qiov.niov == 1:
            view = qiov.buffers()[0]
        else:
            gather = bytearray(qiov.size)
            lib.pyvu_iov_to_buf(qiov.iov, qiov.niov, ffi.from_buffer(gather), qiov.size)
            view = memoryview(gather)
        self._payload(ctx, cb, CMD_WRITE, offset, view, nflags)

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        if not self.has_flush:
            cb(0)  # the server has no cache to flush
            return
        self._start(ctx, [_Cmd(self, CMD_FLUSH, 0, 0, 0, None, cb, ctx, False)])

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        if not self.has_trim:
            cb(0)  # discard is advisory
            return
        self._effect(ctx, cb, CMD_TRIM, offset, nbytes, 0)

    def aio_pwrite_zeroes(
        self, ctx: AioContext, offset: int, nbytes: int, flags: int, cb: Completion
    ) -> None:
        if not self.has_zero:
            cb(-errno.ENOTSUP)  # blocklayer/io.py writes zeroed buffers instead
            return
        nbd = self.nbd
        nflags = 0 if flags & BDRV_REQ_MAY_UNMAP else nbd.CMD_FLAG_NO_HOLE
        if flags & BDRV_REQ_FUA:
            if self.has_fua:
                nflags |= nbd.CMD_FLAG_FUA
            elif self.has_flush:
                cb = self._then_flush(ctx, cb)
        self._effect(ctx, cb, CMD_ZERO, offset, nbytes, nflags)

    def _then_flush(self, ctx: AioContext, cb: Completion) -> Completion:
        def done(ret: int) -> None:
            if ret < 0:
                cb(ret)
            else:
                self.aio_flush(ctx, cb)
        return done

    def _payload(self, ctx: AioContext, cb: Completion, kind: int, offset: int,
                 view: memoryview, flags: int, bounce: bytearray | None = None,
                 qiov: IOVector | None = None) -> None:
        """A read or write: one command, or several (payload limit, bounce) under a
        _Request."""
        step = self.max_payload
        n = len(view)
        if n <= step and bounce is None:
            self._start(ctx, [_Cmd(self, kind, offset, n, flags, view, cb, ctx, False)])
            return
        home = self._bind_or_home(ctx)
        req = _Request(ctx, home, cb, bounce, qiov)
        cmds = [_Cmd(self, kind, offset + at, min(step, n - at), flags, view[at:at + step],
                     req.part, home, False) for at in range(0, n, step)]
        req.pending = len(cmds)
        self._start(ctx, cmds)

    def _effect(self, ctx: AioContext, cb: Completion, kind: int, offset: int, nbytes: int,
                flags: int) -> None:
        """A trim or write-zeroes, split at MAX_EFFECT_LEN."""
        if nbytes <= MAX_EFFECT_LEN:
            self._start(ctx, [_Cmd(self, kind, offset, nbytes, flags, None, cb, ctx, False)])
            return
        home = self._bind_or_home(ctx)
        req = _Request(ctx, home, cb)
        cmds = [_Cmd(self, kind, offset + at, min(MAX_EFFECT_LEN, nbytes - at), flags, None,
                     req.part, home, False) for at in range(0, nbytes, MAX_EFFECT_LEN)]
        req.pending = len(cmds)
        self._start(ctx, cmds)

    # -- submission (home context) -----------------------------------------------------------
    def _bind_or_home(self, ctx: AioContext) -> AioContext:
        if self._home is None:
            self._bind(ctx)
        return self._home  # type: ignore[return-value]

    def _start(self, ctx: AioContext, cmds: list[_Cmd]) -> None:
        """Caller's context: hand the commands to the home context (binding it if unbound)."""
        home = self._bind_or_home(ctx)
        if ctx is home:
            self._submit_all(cmds)
        else:
            home.schedule(self._submit_all, cmds)

    def _bind(self, ctx: AioContext) -> None:
        """Home context (the first requester's, in its thread): start watching the socket."""
        self._home = ctx
        if self._state == CONNECTED:
            self._watch(self._h.aio_get_fd())

    def _watch(self, fd: int) -> None:
        """Home context: the connection's socket becomes an fd of the home context."""
        self._fd = fd
        self._writing = False
        self._rpoll = select.poll()
        self._rpoll.register(fd, select.POLLIN)
        self._home.set_fd_handler(fd, self._on_readable)

    def _unwatch(self) -> None:
        """Home context: forget the socket (before libnbd closes it with the handle)."""
        if self._fd >= 0:
            self._home.set_fd_handler(self._fd, None)
            self._fd = -1
            self._writing = False
            self._rpoll = None

    def _update_direction(self) -> None:
        """Home context, after each libnbd call on a connected handle: the write handler is
        set exactly while libnbd waits to send.  Or the connection broke during the call:
        libnbd accepts a command even when sending it fails, and its handle is then dead --
        every command in flight aborted (ENOTCONN, in _completed) and the socket closed by
        libnbd itself, which takes it out of the epoll set: no event will ever tell us, so
        the caller's _drain must find the connection lost already."""
        h = self._h
        if not _alive(h):
            self._connection_lost("the server closed the connection")
            return
        want = bool(h.aio_get_direction() & self._dir_write)
        if want != self._writing and self._fd >= 0:
            self._writing = want
            self._home.set_fd_handler(self._fd, self._on_readable,
                                      self._on_writable if want else None)

    def _submit_all(self, cmds: list[_Cmd]) -> None:
        """Home context: issue the commands (in order), or park them while the server is
        away."""
        if self._state != CONNECTED:
            for cmd in cmds:
                self._park(cmd)
            self._drain()
            return
        h, Error = self._h, self.nbd.Error
        pread, pwrite = h.aio_pread, h.aio_pwrite
        for cmd in cmds:
            if self._state != CONNECTED:  # lost while submitting these
                self._park(cmd)
                continue
            try:
                k = cmd.kind
                if k == CMD_READ:
                    pread(cmd.buf, cmd.offset, cmd, cmd.flags)
                elif k == CMD_WRITE:
                    pwrite(cmd.buf, cmd.offset, cmd, cmd.flags)
                elif k == CMD_FLUSH:
                    h.aio_flush(cmd)
                elif k == CMD_TRIM:
                    h.aio_trim(cmd.length, cmd.offset, cmd, cmd.flags)
                else:
                    h.aio_zero(cmd.length, cmd.offset, cmd, cmd.flags)
            except Error as e:
                if self._state == CONNECTED and _alive(h):
                    # refused for itself (bounds, flags, read-only): that command fails
                    self._completed.append((cmd, e.errnum or errno.EIO))
                else:
                    self._connection_lost(f"{e.string}")
                    self._park(cmd)
        if self._state == CONNECTED:
            self._update_direction()
        if self._completed:
            self._drain()

    def _park(self, cmd: _Cmd) -> None:
        """Home context, server away: wait for the reconnect, or fail once the delay is over."""
        if self._delay_over or self._state == CLOSED:
            self._completed.append((cmd, errno.EIO))
        else:
            self._waiting.append(cmd)

    # -- events and completions (home context) ---------------------------------------------
    def _on_readable(self) -> None:
        """Home context: the socket has data (or an error / EOF).  Read every reply waiting,
        calling aio_notify_read only while there is something to read (see the module's
        docstring)."""
        self._on_event(self._read_replies)

    def _read_replies(self, h: Any) -> None:
        h.aio_notify_read()
        # More replies waiting?  Only while commands are in flight, and only plain data
        # (an EOF or error is left to the next wake-up, which reads it as one).
        more, in_flight, n = self._rpoll.poll, h.aio_in_flight, MAX_REPLIES_PER_WAKE
        while n and in_flight():
            ready = more(0)
            if not ready or ready[0][1] != select.POLLIN:
                break
            h.aio_notify_read()
            n -= 1

    def _on_writable(self) -> None:
        """Home context: libnbd waited to send and the socket has room."""
        self._on_event(self._send_waiting)

    def _send_waiting(self, h: Any) -> None:
        if h.aio_get_direction() & self._dir_write:
            h.aio_notify_write()

    def _on_event(self, step: Callable[[Any], None]) -> None:
        """Home context: one socket event's libnbd calls (``step``), then the dead-handle and
        direction check, and the completions they produced."""
        if self._state != CONNECTED:
            return
        h = self._h
        try:
            step(h)
        except self.nbd.Error as e:
            self._connection_lost(str(e.string))
        else:
            if self._state == CONNECTED and h is self._h:
                self._update_direction()
        if self._completed:
            self._drain()

    def _drain(self) -> None:
        """Home context, outside any libnbd call: finish the commands recorded as over."""
        if self._draining:
            return  # a callback below submitted more: the outer loop gets to them
        self._draining = True
        try:
            while self._completed:
                done, self._completed = self._completed, []
                for cmd, err in done:
                    if err in _CONN_ERRNOS and self._state != CLOSED:
                        # The connection died under it: retry after the reconnect, or fail.
                        self._connection_lost(os.strerror(err))
                        if self._delay_over or self._state == CLOSED:
                            self._finish(cmd, -errno.EIO)
                        else:
                            self._waiting.append(cmd)
                        continue
                    self._finish(cmd, -err if err else 0)
        finally:
            self._draining = False

    def _finish(self, cmd: _Cmd, ret: int) -> None:
        """Home context: deliver one command's result in its context."""
        if cmd.ctx is self._home:
            cmd.done(ret)
        else:
            cmd.ctx.schedule(cmd.done, ret)

    # -- reconnect ---------------------------------------------------------------------------
    def _connection_lost(self, why: str) -> None:
        """Home context: the connection broke.  Start reconnecting; commands wait for the
        first reconnect-delay seconds (none with 0) and then fail with EIO."""
        if self._state != CONNECTED:
            return
        self._state = RECONNECTING
        self._unwatch()
        if self._h is not None and _alive(self._h):
            self._abort_commands(self._h)
        self._h = None  # libnbd closes the socket with the handle
        self._gen += 1
        self._disconnect_time = time.monotonic()
        self._delay_over = self.reconnect_delay == 0
        if not self._delay_over:
            self._delay_timer = self._home.timer_new(self.reconnect_delay, self._delay_expired,
                                                     self._gen)
        log.warning("nbd node '%s': connection to '%s' lost (%s); %s", self.node_name,
                    self.addr, why,
                    f"requests wait up to {self.reconnect_delay} s for a reconnect"
                    if self.reconnect_delay else "requests fail until it is back")
        self._start_reconnect_thread()

    def _abort_commands(self, h: Any) -> None:
        """Home context: the handle is given up while libnbd still thinks it works (a
        command failed with ESHUTDOWN: the server is going away).  Dropping it as it is would
        lose its other commands -- libnbd frees a closed handle's callbacks without calling
        them -- so its socket is shut down and libnbd told: it then aborts every command
        (ENOTCONN, into _completed, which the caller drains: they wait for the reconnect).
        Only the home thread calls libnbd on this handle, so nothing reads it meanwhile."""
        if not h.aio_in_flight():
            return
        try:
            with socket.socket(fileno=os.dup(h.aio_get_fd())) as s:
                s.shutdown(socket.SHUT_RDWR)
        except OSError as e:
            log.error("nbd node '%s': cannot shut the old connection down: %s",
                      self.node_name, e)
            return
        # Replies already in the socket are still read (and complete normally), then EOF.
        tries = h.aio_in_flight() + 2
        while tries and _alive(h):
            tries -= 1
            try:
                if h.aio_get_direction() & self._dir_write:
                    h.aio_notify_write()  # EPIPE now
                else:
                    h.aio_notify_read()
            except self.nbd.Error:
                break
        if _alive(h) and h.aio_in_flight():
            log.error("nbd node '%s': %d commands of the old connection may be lost",
                      self.node_name, h.aio_in_flight())

    def _start_reconnect_thread(self) -> None:
        t = threading.Thread(target=self._reconnect_loop, args=(self._gen,),
                             name=f"nbd-reconnect-{self.node_name}", daemon=True)
        self._reconnect_thread = t
        t.start()

    def _reconnect_loop(self, gen: int) -> None:
        """Reconnect thread: try until connected or the node closes; hand a new connection
        to the home context."""
        home = self._home
        assert home is not None
        pause = RECONNECT_PAUSE_MIN
        while not self._stop.is_set():
            try:
                h = self._connect_once(HANDSHAKE_TIMEOUT)
            except (self.nbd.Error, TimeoutError):
                h = None
            except Exception:  # never let the thread die silently
                log.exception("nbd node '%s': reconnect attempt failed", self.node_name)
                h = None
            if h is not None:
                home.schedule(self._reconnected, gen, h)
                return
            self._stop.wait(pause)
            pause = min(pause * 2, RECONNECT_PAUSE_MAX)

    def _delay_expired(self, gen: int) -> None:
        """Home context (timer): the server stayed away longer than reconnect-delay: fail
        the waiting commands, and new ones at once until the reconnect."""
        if gen != self._gen or self._state != RECONNECTING:
            return
        self._delay_timer = None
        self._delay_over = True
        waiting, self._waiting = self._waiting, []
        for cmd in waiting:
            self._finish(cmd, -errno.EIO)

    def _reconnected(self, gen: int, h: Any) -> None:
        """Home context: a new connection is ready: check it is the same disk, then resubmit
        the waiting commands in their order."""
        if gen != self._gen or self._state != RECONNECTING:
            return
        size, ro = h.get_size(), bool(h.is_read_only())
        if size != self.size or (ro and not self.read_only):
            log.error("nbd node '%s': the export at '%s' changed (size %d, read-only %s); "
                      "not using it", self.node_name, self.addr, size, ro)
            self._start_reconnect_thread()
            return
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        self._h = h
        self._state = CONNECTED
        self._delay_over = False
        self.reconnects += 1
        self.last_outage_s = time.monotonic() - self._disconnect_time
        log.warning("nbd node '%s': reconnected to '%s' after %.2f s", self.node_name,
                    self.addr, self.last_outage_s)
        self._watch(h.aio_get_fd())
        waiting, self._waiting = self._waiting, []
        self._submit_all(waiting)

    # -- close (main thread, node drained) ---------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        home = self._home
        if home is not None and not home.in_home_thread() and not home.stopped:
            done = threading.Event()

            def in_home() -> None:
                self._close_in_home()
                done.set()

            home.schedule(in_home)
            if not done.wait(5):
                log.error("nbd node '%s': home context did not answer at close", self.node_name)
        else:
            self._close_in_home()
        h = self._h
        self._h = None
        if h is not None:
            try:  # a polite NBD_CMD_DISC; the socket closes with the handle
                h.aio_disconnect()
                h.poll(100)
            except self.nbd.Error:
                pass

    def _close_in_home(self) -> None:
        """Home context (or main, when no loop runs it): stop watching, fail waiters."""
        if self._state == CLOSED:
            return
        state, self._state = self._state, CLOSED
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        if self._home is not None:
            self._unwatch()
        waiting, self._waiting = self._waiting, []
        for cmd in waiting:
            self._finish(cmd, -errno.EIO)
        if state != CONNECTED:
            self._h = None
