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
per request).  The handle's socket is watched with a *nested epoll*: ``AioContext`` fd handlers
watch only EPOLLIN, but libnbd sometimes needs EPOLLOUT too (a request larger than the socket
buffer), so the socket sits in a private ``select.epoll`` whose own fd (readable whenever the
socket is ready in the direction libnbd asked for, ``aio_get_direction``) is the one the
AioContext watches.  On a wake-up we call ``aio_notify_read``/``aio_notify_write``.

libnbd calls our completion callbacks while holding the handle's lock, so they only record
``(command, error)``; the records are handled once the libnbd call returned (``_drain``): a
request's ``cb`` may submit another request (FUA emulation, read-modify-write), which would
otherwise re-enter libnbd.

*Reconnect*: when the connection breaks (the socket reports EOF or an error, or libnbd
refuses a command because the handle is dead), the commands that were in flight and those
that arrive afterwards wait in ``_waiting`` while the first ``reconnect-delay`` seconds last,
as QEMU's nbd driver does; after that (at once with ``reconnect-delay=0``) they fail with EIO.
Reconnecting itself goes on in the background as in QEMU: a *reconnect thread* (one, only
while the server is away, because AioContext has no timers) makes blocking connection attempts
on a fresh handle with a growing pause, and hands a connected handle to the home context with a
bottom half, where the waiting commands are resubmitted in order.  The thread also tells the
home context when the delay has run out.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from typing import Any

from blocklayer.aio import AioContext
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
#: errors libnbd gives commands that died with the connection
_CONN_ERRNOS = (errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNRESET, errno.EPIPE)

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
    """One block-layer request: split into commands (payload limits) that complete apart."""

    __slots__ = ("ctx", "cb", "pending", "ret", "bounce", "qiov")

    def __init__(self, ctx: AioContext, cb: Completion, bounce: bytearray | None = None,
                 qiov: IOVector | None = None) -> None:
        self.ctx = ctx
        self.cb = cb
        self.pending = 0
        self.ret = 0
        self.bounce = bounce  # reads into a multi-element qiov land here first
        self.qiov = qiov


class _Cmd:
    """One NBD command of a request (resubmitted as it is after a reconnect)."""

    __slots__ = ("req", "kind", "offset", "length", "flags", "buf")

    def __init__(self, req: _Request, kind: int, offset: int, length: int, flags: int,
                 buf: Any = None) -> None:
        self.req = req
        self.kind = kind
        self.offset = offset
        self.length = length
        self.flags = flags
        self.buf = buf  # nbd.Buffer over the payload (kept alive until completion)


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

        self._state = CONNECTED
        self._home: AioContext | None = None
        self._ep: select.epoll | None = None
        self._ep_fd = -1  # the socket registered in _ep (-1: none)
        self._ep_events = 0
        self._completed: list[tuple[_Cmd, int]] = []
        self._draining = False
        self._waiting: list[_Cmd] = []  # commands waiting for a reconnect
        self._delay_over = False  # the reconnect-delay of the current outage has run out
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

    def limits(self) -> tuple[int, int]:
        """The server's minimum block size, else 512 as QEMU assumes (a server that states
        nothing may still reject smaller requests)."""
        return (self.min_block or 512), 1

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        """Caller's context: read straight into the guest's buffer when it is one piece."""
        if qiov.niov == 1:
            req = _Request(ctx, cb)
            view = qiov.buffers()[0]
        else:
            bounce = bytearray(qiov.size)
            req = _Request(ctx, cb, bounce, qiov)
            view = memoryview(bounce)
        self._start(req, self._payload_cmds(req, CMD_READ, offset, view, 0))

    def aio_pwritev(
        self, ctx: AioContext, offset: int, qiov: IOVector, flags: int, cb: Completion
    ) -> None:
        """Caller's context.  FUA goes to the server as FUA, or as a flush after the write."""
        if flags & BDRV_REQ_FUA and not self.has_fua and self.has_flush:
            cb = self._then_flush(ctx, cb)
        nflags = self.nbd.CMD_FLAG_FUA if flags & BDRV_REQ_FUA and self.has_fua else 0
        if qiov.niov == 1:
            view = qiov.buffers()[0]
        else:
            gather = bytearray(qiov.size)
            lib.pyvu_iov_to_buf(qiov.iov, qiov.niov, ffi.from_buffer(gather), qiov.size)
            view = memoryview(gather)
        req = _Request(ctx, cb)
        self._start(req, self._payload_cmds(req, CMD_WRITE, offset, view, nflags))

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        if not self.has_flush:
            cb(0)  # the server has no cache to flush
            return
        req = _Request(ctx, cb)
        self._start(req, [_Cmd(req, CMD_FLUSH, 0, 0, 0)])

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        if not self.has_trim:
            cb(0)  # discard is advisory
            return
        req = _Request(ctx, cb)
        self._start(req, self._effect_cmds(req, CMD_TRIM, offset, nbytes, 0))

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
        req = _Request(ctx, cb)
        self._start(req, self._effect_cmds(req, CMD_ZERO, offset, nbytes, nflags))

    def _then_flush(self, ctx: AioContext, cb: Completion) -> Completion:
        def done(ret: int) -> None:
            if ret < 0:
                cb(ret)
            else:
                self.aio_flush(ctx, cb)
        return done

    def _payload_cmds(self, req: _Request, kind: int, offset: int, view: memoryview,
                      flags: int) -> list[_Cmd]:
        Buffer = self.nbd.Buffer
        step = self.max_payload
        n = len(view)
        if n <= step:
            return [_Cmd(req, kind, offset, n, flags, Buffer.from_buffer(view))]
        return [_Cmd(req, kind, offset + at, min(step, n - at), flags,
                     Buffer.from_buffer(view[at:at + step])) for at in range(0, n, step)]

    def _effect_cmds(self, req: _Request, kind: int, offset: int, nbytes: int,
                     flags: int) -> list[_Cmd]:
        return [_Cmd(req, kind, offset + at, min(MAX_EFFECT_LEN, nbytes - at), flags)
                for at in range(0, nbytes, MAX_EFFECT_LEN)] or [_Cmd(req, kind, offset, 0, 0)]

    # -- submission (home context) -----------------------------------------------------------
    def _start(self, req: _Request, cmds: list[_Cmd]) -> None:
        """Caller's context: hand the commands to the home context (binding it if unbound)."""
        req.pending = len(cmds)
        ctx = req.ctx
        if self._home is None:
            self._bind(ctx)
        if ctx is self._home:
            self._submit_all(cmds)
        else:
            self._home.schedule(self._submit_all, cmds)

    def _bind(self, ctx: AioContext) -> None:
        """Home context (the first requester's, in its thread): start watching the socket."""
        self._home = ctx
        self._ep = select.epoll()
        ctx.set_fd_handler(self._ep.fileno(), self._on_ready)
        if self._state == CONNECTED:
            self._watch(self._h.aio_get_fd())

    def _watch(self, fd: int) -> None:
        """Home context: put the connection's socket in the nested epoll."""
        self._ep_fd = fd
        self._ep_events = select.EPOLLIN
        self._ep.register(fd, self._ep_events)

    def _unwatch(self) -> None:
        """Home context: forget the socket (it may already be closed)."""
        if self._ep_fd >= 0:
            try:
                self._ep.unregister(self._ep_fd)
            except OSError:
                pass
            self._ep_fd = -1

    def _update_direction(self) -> None:
        """Home context: watch the socket in the direction(s) libnbd waits for."""
        if self._ep_fd < 0:
            return
        d = self._h.aio_get_direction()
        want = select.EPOLLIN | (select.EPOLLOUT if d & self.nbd.AIO_DIRECTION_WRITE else 0)
        if want != self._ep_events:
            self._ep_events = want
            self._ep.modify(self._ep_fd, want)

    def _submit_all(self, cmds: list[_Cmd]) -> None:
        """Home context."""
        for cmd in cmds:
            self._submit(cmd)
        if self._state == CONNECTED:
            self._update_direction()
        self._drain()

    def _submit(self, cmd: _Cmd) -> None:
        """Home context: issue one command, or park it while the server is away."""
        if self._state != CONNECTED:
            self._park(cmd)
            return
        h, nbd = self._h, self.nbd

        def completion(err: Any, cmd: _Cmd = cmd) -> int:
            # Called by libnbd with its handle lock held: record only (see _drain).
            self._completed.append((cmd, err.value))
            return 1  # retire the command

        try:
            k = cmd.kind
            if k == CMD_READ:
                h.aio_pread(cmd.buf, cmd.offset, completion, cmd.flags)
            elif k == CMD_WRITE:
                h.aio_pwrite(cmd.buf, cmd.offset, completion, cmd.flags)
            elif k == CMD_FLUSH:
                h.aio_flush(completion)
            elif k == CMD_TRIM:
                h.aio_trim(cmd.length, cmd.offset, completion, cmd.flags)
            else:
                h.aio_zero(cmd.length, cmd.offset, completion, cmd.flags)
        except nbd.Error as e:
            if _alive(h):  # refused for itself (bounds, flags): that command fails
                self._completed.append((cmd, e.errnum or errno.EIO))
            else:
                self._connection_lost(f"{e.string}")
                self._park(cmd)

    def _park(self, cmd: _Cmd) -> None:
        """Home context, server away: wait for the reconnect, or fail once the delay is over."""
        if self._delay_over or self._state == CLOSED:
            self._completed.append((cmd, errno.EIO))
        else:
            self._waiting.append(cmd)

    # -- events and completions (home context) ---------------------------------------------
    def _on_ready(self) -> None:
        """Home context: the nested epoll has an event for the socket."""
        events = 0
        for _fd, ev in self._ep.poll(0):
            events |= ev
        if events and self._state == CONNECTED:
            try:
                # Both ready: read first, a reply may change what libnbd wants to write.
                if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._h.aio_notify_read()
                elif events & select.EPOLLOUT:
                    self._h.aio_notify_write()
            except self.nbd.Error as e:
                self._connection_lost(str(e.string))
            else:
                if _alive(self._h):
                    self._update_direction()
                else:
                    self._connection_lost("the server closed the connection")
        self._drain()

    def _drain(self) -> None:
        """Home context, outside any libnbd call: finish the commands libnbd completed."""
        if self._draining:
            return  # a callback below submitted more: the outer loop gets to them
        self._draining = True
        try:
            done = self._completed
            while done:
                cmd, err = done.pop(0)
                if err in _CONN_ERRNOS and self._state != CLOSED:
                    # The connection died under it: retry after the reconnect, or fail.
                    self._connection_lost(os.strerror(err))
                    self._park_after_loss(cmd)
                    continue
                self._finish(cmd, -err if err else 0)
        finally:
            self._draining = False

    def _park_after_loss(self, cmd: _Cmd) -> None:
        if self._delay_over or self._state == CLOSED:
            self._finish(cmd, -errno.EIO)
        else:
            self._waiting.append(cmd)

    def _finish(self, cmd: _Cmd, ret: int) -> None:
        """Home context: one command is over; the request completes with its last one."""
        req = cmd.req
        if ret < 0 and req.ret == 0:
            req.ret = ret
        req.pending -= 1
        if req.pending:
            return
        if req.bounce is not None and req.ret == 0:
            q = req.qiov
            lib.pyvu_iov_from_buf(q.iov, q.niov, ffi.from_buffer(req.bounce), q.size)
        if req.ctx is self._home:
            req.cb(req.ret)
        else:
            req.ctx.schedule(req.cb, req.ret)

    # -- reconnect ---------------------------------------------------------------------------
    def _connection_lost(self, why: str) -> None:
        """Home context: the connection broke.  Start reconnecting; commands wait for the
        first reconnect-delay seconds (none with 0) and then fail with EIO."""
        if self._state != CONNECTED:
            return
        self._state = RECONNECTING
        self._unwatch()
        self._h = None  # libnbd closes the socket with the handle
        self._gen += 1
        self._disconnect_time = time.monotonic()
        self._delay_over = self.reconnect_delay == 0
        log.warning("nbd node '%s': connection to '%s' lost (%s); %s", self.node_name,
                    self.addr, why,
                    f"requests wait up to {self.reconnect_delay} s for a reconnect"
                    if self.reconnect_delay else "requests fail until it is back")
        self._start_reconnect_thread(self._disconnect_time + self.reconnect_delay)

    def _start_reconnect_thread(self, delay_deadline: float) -> None:
        t = threading.Thread(target=self._reconnect_loop, args=(self._gen, delay_deadline),
                             name=f"nbd-reconnect-{self.node_name}", daemon=True)
        self._reconnect_thread = t
        t.start()

    def _reconnect_loop(self, gen: int, delay_deadline: float) -> None:
        """Reconnect thread: try until connected or the node closes; tell the home context
        when the reconnect-delay has run out and when a new connection is ready."""
        home = self._home
        assert home is not None
        told_delay = self._delay_over
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
                home.schedule(self._reconnected, gen, h, delay_deadline)
                return
            now = time.monotonic()
            if not told_delay and now >= delay_deadline:
                home.schedule(self._delay_expired, gen)
                told_delay = True
            wait = pause if told_delay else min(pause, max(0.0, delay_deadline - now))
            self._stop.wait(wait)
            pause = min(pause * 2, RECONNECT_PAUSE_MAX)

    def _delay_expired(self, gen: int) -> None:
        """Home context: the server stayed away longer than reconnect-delay: fail waiters."""
        if gen != self._gen or self._state != RECONNECTING:
            return
        self._delay_over = True
        waiting, self._waiting = self._waiting, []
        for cmd in waiting:
            self._finish(cmd, -errno.EIO)

    def _reconnected(self, gen: int, h: Any, delay_deadline: float) -> None:
        """Home context: a new connection is ready: check it is the same disk, then resubmit
        the waiting commands in their order."""
        if gen != self._gen or self._state != RECONNECTING:
            return
        size, ro = h.get_size(), bool(h.is_read_only())
        if size != self.size or (ro and not self.read_only):
            log.error("nbd node '%s': the export at '%s' changed (size %d, read-only %s); "
                      "not using it", self.node_name, self.addr, size, ro)
            self._start_reconnect_thread(delay_deadline)
            return
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
        state, self._state = self._state, CLOSED
        if self._ep is not None:
            self._unwatch()
            if self._home is not None:
                self._home.set_fd_handler(self._ep.fileno(), None)
            self._ep.close()
            self._ep = None
        waiting, self._waiting = self._waiting, []
        for cmd in waiting:
            self._finish(cmd, -errno.EIO)
        if state != CONNECTED:
            self._h = None

