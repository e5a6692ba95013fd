"""QMP monitors: a listening socket (:class:`Monitor`) and its connection (:class:`_Client`).

Theory of operation
-------------------
A :class:`Monitor` owns one listening socket (made by ``pyvhost_blk/chardev.py`` for
``--chardev socket,...,server=on`` + ``--monitor``) and feeds its client's requests to the
shared :class:`~pyvhost_blk.qmp_dispatch.QmpDispatcher`.

* **One client at a time**, like QEMU's socket chardev: while a client is connected the
  listener is not watched, so a second client's ``connect()`` succeeds (kernel backlog) but it
  gets its greeting only when the first one has gone.
* **Input**: bytes read from the socket go through a
  :class:`~pyvhost_blk.qmp_json.JsonStreamer`; each complete message (or parse error) is
  appended to the dispatcher's queue.  A client with ``QUEUE_MAX`` queued requests is not read
  from until the queue drains (QEMU also bounds its per-monitor request queue); the dispatcher
  calls :meth:`_Client.maybe_resume` as it takes requests off the queue.
* **Output** is one JSON text per line, ending with ``\\r\\n``, encoded by
  :func:`~pyvhost_blk.qmp_json.json_encode` (``pretty=on`` per monitor).  Responses have QEMU's
  member order: ``{"return": R, "id": I}`` and ``{"id": I, "error": {...}}``.  Output is
  buffered per client.  A socket that is not writable is waited for through a private one-fd
  epoll registered in the context (``set_fd_handler`` only watches readability; an epoll fd is
  readable when its socket is writable).  A client that leaves more than ``OUTBUF_MAX`` bytes
  unread is disconnected.

Threads: every method runs in the dispatcher's AioContext (``dispatcher.ctx``), where the
sockets are watched with ``set_fd_handler``; nothing ever blocks.  Create a monitor in that
context's thread, or before its loop runs.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from typing import Any

from blocklayer.aio import AioContext
from pyvhost_blk.qmp_args import QmpError
from pyvhost_blk.qmp_dispatch import NO_ID, QmpDispatcher
from pyvhost_blk.qmp_json import JsonStreamer, json_encode

log = logging.getLogger("pyvhost_blk.qmp")  # one logger for the whole monitor, as before the split

QUEUE_MAX = 8  # requests queued per client before we stop reading it
OUTBUF_MAX = 64 << 20  # unread output after which a client is dropped
RECV_SIZE = 65536


class _Client:
    """One connection of a Monitor."""

    def __init__(self, mon: Monitor, sock: socket.socket) -> None:
        self.mon = mon
        self.sock = sock
        self.fd = sock.fileno()
        self.negotiated = False
        self.oob = False
        self.pending = 0  # requests in the dispatcher's queue
        self.closed = False
        self.reading = False
        self._out = bytearray()
        self._wep: select.epoll | None = None  # watches EPOLLOUT while output is pending
        self._streamer = JsonStreamer(self._on_message)
        sock.setblocking(False)

    @property
    def ctx(self) -> AioContext:
        return self.mon.dispatcher.ctx

    def start(self) -> None:
        self._set_reading(True)
        self.send_obj(self.mon.dispatcher.greeting())

    # -- input ---------------------------------------------------------------------------------
    def _set_reading(self, on: bool) -> None:
        if on != self.reading and not self.closed:
            self.reading = on
            self.ctx.set_fd_handler(self.fd, self._on_readable if on else None)

    def maybe_resume(self) -> None:
        if not self.reading and self.pending < QUEUE_MAX:
            self._set_reading(True)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.info("QMP client of %s: %s", self.mon.name, e.strerror or e)
            data = b""
        if not data:
            self.mon._client_gone(self)
            return
        self._streamer.feed(data)
        if self.pending >= QUEUE_MAX:
            self._set_reading(False)

    def _on_message(self, obj: Any, err: str | None) -> None:
        if not self.closed:
            self.mon.dispatcher._enqueue(self, obj, err)

    # -- output --------------------------------------------------------------------------------
    def respond(self, result: Any, rid: Any) -> None:
        if isinstance(result, QmpError):
            rsp: dict[str, Any] = {} if rid is NO_ID else {"id": rid}
            rsp["error"] = result.to_dict()
        else:
            rsp = {"return": {} if result is None else result}
            if rid is not NO_ID:
                rsp["id"] = rid
        self.send_obj(rsp)

    def send_obj(self, obj: Any) -> None:
        if self.closed:
            return
        try:
            text = json_encode(obj, self.mon.pretty)
        except (TypeError, ValueError, RecursionError) as e:
            log.error("QMP %s: cannot encode %r: %s", self.mon.name, obj, e)
            if "return" not in obj:
                return
            err = QmpError(f"internal error: the command's result is not JSON: {e}").to_dict()
            obj = {k: v for k, v in obj.items() if k == "id"} | {"error": err}
            text = json_encode(obj, self.mon.pretty)
        self._send((text + "\r\n").encode("utf-8", "surrogatepass"))

    def _send(self, data: bytes) -> None:
        if not self._out:
            try:
                n = self.sock.send(data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._write_failed(e)
                return
            data = data[n:]
            if not data:
                return
        self._out += data
        if len(self._out) > OUTBUF_MAX:
            log.warning("QMP client of %s does not read its output: disconnecting", self.mon.name)
            self.mon._client_gone(self)
            return
        if self._wep is None:
            self._wep = select.epoll(1)
            self._wep.register(self.fd, select.EPOLLOUT)
            self.ctx.set_fd_handler(self._wep.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        try:
            n = self.sock.send(self._out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._write_failed(e)
            return
        del self._out[:n]
        if not self._out:
            self._stop_write_watch()

    def _write_failed(self, e: OSError) -> None:
        if e.errno not in (errno.EPIPE, errno.ECONNRESET):
            log.info("QMP client of %s: write: %s", self.mon.name, e.strerror or e)
        self._out.clear()
        self.mon._client_gone(self)

    def _stop_write_watch(self) -> None:
        if self._wep is not None:
            self.ctx.set_fd_handler(self._wep.fileno(), None)
            self._wep.close()
            self._wep = None

    def close(self) -> None:
        """Drop the connection (best effort to flush what is buffered, without blocking)."""
        if self.closed:
            return
        if self._out:
            try:
                self.sock.send(self._out, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except OSError:
                pass
        self._set_reading(False)
        self.closed = True
        self._stop_write_watch()
        self.sock.close()


class Monitor:
    """A QMP monitor on a listening socket (``--chardev socket,...,server=on`` +
    ``--monitor``).  Create it in ``dispatcher.ctx``'s thread (or before its loop runs).

    ``path`` is the socket file that :meth:`close` removes (None for an inherited fd).
    ``conn`` is an already accepted first client (``wait=on``).
    """

    def __init__(
        self,
        dispatcher: QmpDispatcher,
        listener: socket.socket,
        path: str | None = None,
        *,
        name: str = "",
        pretty: bool = False,
        conn: socket.socket | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.listener = listener
        self.path = path
        self.name = name or (path or f"fd {listener.fileno()}")
        self.pretty = pretty
        self.client: _Client | None = None
        self.closed = False
        self._accepting = False
        listener.setblocking(False)
        dispatcher._attach(self)
        if conn is not None:
            self._start_client(conn)
        else:
            self._set_accepting(True)

    @property
    def ctx(self) -> AioContext:
        return self.dispatcher.ctx

    def _set_accepting(self, on: bool) -> None:
        if on != self._accepting:
            self._accepting = on
            self.ctx.set_fd_handler(self.listener.fileno(), self._on_accept if on else None)

    def _on_accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            log.error("QMP %s: accept: %s", self.name, e.strerror or e)
            return
        self._start_client(conn)

    def _start_client(self, conn: socket.socket) -> None:
        # Like QEMU's socket chardev: one client; later ones wait in the listen backlog.
        self._set_accepting(False)
        self.client = _Client(self, conn)
        log.debug("QMP %s: client connected", self.name)
        self.client.start()

    def _client_gone(self, client: _Client) -> None:
        if client is not self.client:
            return
        client.close()
        self.client = None
        log.debug("QMP %s: client disconnected", self.name)
        if not self.closed:
            self._set_accepting(True)

    @property
    def connected(self) -> bool:
        return self.client is not None

    def close(self) -> None:
        """Disconnect the client, stop listening and remove the socket file."""
        if self.closed:
            return
        self.closed = True
        if self.client is not None:
            self.client.close()
            self.client = None
        self._set_accepting(False)
        self.dispatcher._detach(self)
        self.listener.close()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
