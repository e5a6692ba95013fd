"""VuServer: a vhost-user socket served through libvhost-user.

Theory of operation
-------------------
One VuServer per export.  It listens on a UNIX socket (or an inherited listening fd) and serves
one frontend at a time; a second frontend that connects meanwhile is accepted and closed at
once, with a log line.  libvhost-user (bound with cffi in ``vhost/_build.py``) speaks the
protocol; we give it our own message reader (``pyvu_read_msg``: a closed connection or a
malformed frame becomes a disconnect, never ``exit(0)`` or an assert) and implement
``VuDevIface`` by forwarding to a ``VuDevice`` (``vhost/device.py``).

Threads and locking:

* Messages are dispatched in the main loop (``qemu_get_aio_context()``).
* Each queue is served in its device-chosen AioContext (an iothread, or the main loop).  Its kick
  eventfd is ``dup``-ed and watched there, so libvhost-user closing its copy can never race with
  the other thread's epoll set.
* libvhost-user has no locking, so ``struct pyvu_dev`` carries a writer-preferring rwlock:
  ``vu_dispatch`` holds it exclusively, a queue holds it shared while it pops or pushes.
* Messages that unmap guest memory or stop rings (everything except a short list of harmless
  ones) must not run while requests are in flight: before dispatching one, the connection sets
  ``quiescing`` (queues stop popping), takes the lock exclusively, and if requests are still in
  flight it releases the lock, stops watching the socket, and resumes when the count reaches
  zero (``aio_wait_until``).  The message itself is still unread in the socket meanwhile: we
  only peeked at its header.  After dispatch, every queue is rescheduled, since kicks that
  arrived while quiescing were consumed without popping.
* Disconnect (EOF, a malformed message, a libvhost-user panic) goes the same way: quiesce, wait
  for zero in flight, ``vu_deinit``, close, accept the next frontend.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import gc
import logging
import os
import select
import socket
import stat
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

from blocklayer.aio import (
    AioContext,
    aio_wait_kick,
    aio_wait_until,
    current_aio_context,
    qemu_get_aio_context,
)
from vhost.device import VuDevice
from vhost.ffi import ffi, lib
from vhost.vring_debug import queue_debug

log = logging.getLogger("pyvhost_blk.vhost")

TOKEN_C = lib.PYVU_TOKEN_C  # poller tokens for C objects with work for Python (vhost/pyvu.h)
TAKE_MAX = 64
VHOST_USER_HDR_SIZE = lib.VHOST_USER_HDR_SIZE
MAX_PAYLOAD = lib.PYVU_MSG_PAYLOAD_MAX  # larger sizes are refused by pyvu_read_msg
PARTIAL_TIMEOUT = 5.0  # seconds a frontend may take to finish sending one message
PARTIAL_RETRY = 0.01
VHOST_USER_MAX_CONFIG_SIZE = lib.VHOST_USER_MAX_CONFIG_SIZE
# _peek_request's answer while a message is still arriving: a sentinel, never a request code
# (any 32-bit value is one a frontend can send).
_INCOMPLETE = object()

# Requests that never touch guest memory mappings or stop a ring: no need to wait for in-flight
# requests before letting libvhost-user handle them (the exclusive lock still applies).
_NO_QUIESCE = frozenset(
    {
        1,  # GET_FEATURES
        3,  # SET_OWNER
        12,  # SET_VRING_KICK
        13,  # SET_VRING_CALL
        14,  # SET_VRING_ERR
        15,  # GET_PROTOCOL_FEATURES
        16,  # SET_PROTOCOL_FEATURES
        17,  # GET_QUEUE_NUM
        18,  # SET_VRING_ENABLE
        21,  # SET_BACKEND_REQ_FD
        24,  # GET_CONFIG
        25,  # SET_CONFIG
        35,  # VRING_KICK
        36,  # GET_MAX_MEM_SLOTS
    }
)


class VuQueue:
    """One virtqueue of a connection, served in ``ctx``.

    The ring is driven from C (``struct pyvu_fastq`` in ``vhost/csrc/virtio_blk_queue.c``): the
    kick eventfd is a C handler of the context's poller, which pops every request and serves in
    C those it can.  The rest come back here through ``_python_work``: a block device's parsed
    requests as batches (``serve_batch``) and failed ones (``handle_failed``), any other
    device's raw elements (``handle_request``).  Counters live in the C struct,
    shared by both paths.
    """

    def __init__(self, conn: VuConnection, idx: int, ctx: AioContext) -> None:
        self.conn = conn
        self.idx = idx
        self.ctx = ctx
        self.vq = lib.pyvu_queue(conn.dev, idx)
        self.cq = ffi.new("struct pyvu_fastq *")
        lib.pyvu_fastq_init(self.cq, conn.pdev, idx, conn.device.request_state())
        self.cq.paused = 1
        self.token = TOKEN_C | int(ffi.cast("uintptr_t", self.cq))
        self.kick_fd = -1  # our dup of libvhost-user's kick eventfd; touched in ctx only
        self.started = False
        self._credited = 0  # requests already credited to an iothread's total
        self._done: list[tuple[Any, int]] = []
        self._flush_scheduled = False
        self._process_scheduled = False
        self._c_flush_scheduled = False
        self._elems = ffi.new("VuVirtqElement *[]", TAKE_MAX)
        self._errs = ffi.new("int[]", TAKE_MAX)
        self._types = ffi.new("int[]", TAKE_MAX)

    @property
    def in_flight(self) -> int:
        """Popped and not yet pushed, whichever path serves them."""
        return self.cq.in_flight

    @property
    def requests(self) -> int:
        return self.cq.requests

    @property
    def kicks(self) -> int:
        return self.cq.kicks

    def update_paused(self) -> None:
        """Tell C whether it may pop (any thread; pausers then take the dispatch lock
        exclusively once, so that no pop loop is still running when they go on)."""
        conn = self.conn
        self.cq.paused = int(
            not self.started or conn.quiescing or conn.closed or bool(conn.server.pause_count)
        )

    # -- in self.ctx ----------------------------------------------------------------------------
    def _attach(self, fd: int) -> None:
        self._detach()
        self.kick_fd = fd
        self.cq.kick_fd = fd
        self.cq.ring, self.cq.laio = self.conn.device.queue_engines(self.ctx)
        self.started = True
        self.update_paused()
        self.ctx.add_c_handler(fd, ffi.addressof(self.cq.h), self.token, self._python_work)
        self.process()

    def _detach(self) -> None:
        self.started = False
        self.update_paused()
        if self.kick_fd >= 0:
            self.ctx.remove_c_handler(self.kick_fd, self.token)
            os.close(self.kick_fd)
            self.kick_fd = -1
            self.cq.kick_fd = -1

    def schedule_process(self) -> None:
        """Any thread: look at the ring again soon (after a quiesce, or a drain)."""
        if not self._process_scheduled:
            self._process_scheduled = True
            self.ctx.schedule(self._scheduled_process)

    def _scheduled_process(self) -> None:
        if current_aio_context() is not self.ctx:
            # The queue moved to another iothread since this was scheduled: only its own
            # context may pop from the ring.
            self.ctx.schedule(self._scheduled_process)
            return
        self._process_scheduled = False
        self.process()

    def process(self) -> None:
        """Pop and serve every available request.  In self.ctx."""
        self.update_paused()
        if self.cq.paused:
            return
        lib.pyvu_fastq_process(self.cq)
        self._python_work()

    def schedule_c_flush(self) -> None:
        """In self.ctx: requests C owns were completed outside its loop (a batch's request
        finished late): push them and hand any failures to the device soon, even while the
        queue is paused (a drain waits for exactly these)."""
        if not self._c_flush_scheduled:
            self._c_flush_scheduled = True
            self.ctx.schedule(self._c_flush)

    def _c_flush(self) -> None:
        self._c_flush_scheduled = False
        lib.pyvu_fastq_flush(self.cq)
        if self.cq.nfailed:
            self._python_work()

    def _python_work(self) -> None:
        """Requests C left to Python: hand them to the device.  In self.ctx."""
        cq, device = self.cq, self.conn.device
        while True:
            lib.pyvu_fastq_reported_done(cq)
            n = lib.pyvu_fastq_take_slow(cq, self._elems, TAKE_MAX)
            for i in range(n):
                device.handle_request(self, self._elems[i])
            if cq.nbatch:
                device.serve_batch(self)
            m = lib.pyvu_fastq_take_failed(cq, self._elems, self._errs, self._types, TAKE_MAX)
            for i in range(m):
                device.handle_failed(self, self._elems[i], self._errs[i], self._types[i])
            if n < TAKE_MAX and m < TAKE_MAX and not cq.nbatch:
                break
            lib.pyvu_fastq_process(cq)  # the lists were full: C stopped popping early

    def abandon(self, elem: Any) -> None:
        """In self.ctx: give up ``elem`` without completing it (the connection is going away;
        the frontend's inflight records bring it back after a reconnect)."""
        lib.free(elem)
        lib.pyvu_fastq_python_done(self.cq, 1)
        if self.cq.in_flight == 0:
            aio_wait_kick()

    def complete(self, elem: Any, in_len: int) -> None:
        """The device is done with ``elem`` (in self.ctx): push it with the next batch."""
        self._done.append((elem, in_len))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.ctx.schedule(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        done, self._done = self._done, []
        if not done:
            return
        conn = self.conn
        pdev = conn.pdev
        lib.pyvu_rdlock(pdev)
        try:
            dev, vq = conn.dev, self.vq
            push, free = lib.vu_queue_push, lib.free
            for elem, in_len in done:
                push(dev, vq, elem, in_len)
                free(elem)
            lib.vu_queue_notify(dev, vq)
        finally:
            lib.pyvu_unlock(pdev)
        lib.pyvu_fastq_python_done(self.cq, len(done))
        if self.cq.in_flight == 0:
            aio_wait_kick()

    def credit_ctx(self) -> tuple[str, int]:
        """(context name, requests popped there since the last credit): lets the server keep
        per-iothread totals right when a queue moves between iothreads."""
        n, self._credited = self.requests - self._credited, self.requests
        return self.ctx.name, n

    def move_to(self, new_ctx: AioContext) -> None:
        """Main thread, queue idle (drained): serve this queue from ``new_ctx`` from now on.
        The kick fd is detached in the old context first, then a fresh dup is attached in the
        new one, so no two loops ever watch the same fd number."""
        old = self.ctx
        if old is new_ctx:
            return
        self.conn.server.credit_iothread(*self.credit_ctx())
        started = self.started

        def detach_then_attach() -> None:
            kick = self.kick_fd
            fd = os.dup(kick) if kick >= 0 and started else -1
            self._detach()
            self.ctx = new_ctx
            if fd >= 0:
                new_ctx.schedule(self._attach, fd)

        old.schedule(detach_then_attach)

    def stats(self) -> dict[str, Any]:
        return {"queue": self.idx, "requests": self.requests, "kicks": self.kicks,
                "in-flight": self.in_flight, "iothread": self.ctx.name,
                "x-debug": queue_debug(self)}  # what a stalled guest may wait for


class VuConnection:
    """One connected frontend: a VuDev plus its queues.  Main thread unless stated."""

    def __init__(self, server: VuServer, sock: socket.socket) -> None:
        self.server = server
        self.device = server.device
        self.sock = sock
        self.main_ctx = qemu_get_aio_context()
        self.pdev = ffi.new("struct pyvu_dev *")
        self.dev = ffi.addressof(self.pdev.vu)
        self._handle = ffi.new_handle(self)
        self.pdev.handle = self._handle
        self.quiescing = False
        self.closed = False
        self._closing = False
        self._waiting = False
        self._partial_since: float | None = None
        self.messages = 0  # messages peeked at (a message waiting for a quiesce: again)
        self.last_messages: list[Any] = []  # their request codes, the last 8
        if lib.pyvu_dev_init(self.pdev) != 0:
            raise OSError(errno.ENOMEM, "pthread_rwlock_init failed")
        ok = lib.vu_init(
            self.dev, server.num_queues, sock.fileno(),
            lib.pyvu_cb_panic, lib.pyvu_read_msg, lib.pyvu_cb_set_watch,
            lib.pyvu_cb_remove_watch, _IFACE,
        )
        if not ok:
            lib.pyvu_dev_destroy(self.pdev)
            raise OSError(errno.ENOMEM, "vu_init failed")
        self.queues = [
            VuQueue(self, i, self.device.queue_context(i)) for i in range(server.num_queues)
        ]
        self.main_ctx.set_fd_handler(sock.fileno(), self._on_readable)

    def in_flight(self) -> int:
        return sum(q.in_flight for q in self.queues)

    # -- message dispatch -------------------------------------------------------------------
    def _peek_request(self) -> int | object | None:
        """The next message's request code (unsigned, as on the wire) without consuming it,
        once the whole message is in the socket buffer (libvhost-user then reads it without
        blocking the main loop).  None on EOF/error, _INCOMPLETE while the message is not all
        there yet."""
        try:
            hdr = self.sock.recv(VHOST_USER_HDR_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return _INCOMPLETE
        except OSError:
            return None
        if not hdr:
            return None
        if len(hdr) == VHOST_USER_HDR_SIZE:
            request, _flags, size = struct.unpack("<III", hdr)
            if size > MAX_PAYLOAD:
                return request  # pyvu_read_msg refuses it from the header alone
            avail = array.array("i", [0])
            try:
                fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, avail)
            except OSError:
                return None
            if avail[0] >= VHOST_USER_HDR_SIZE + size:
                self._partial_since = None
                return request
        # Incomplete.  If the frontend has already hung up, the rest will never come.
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLIN | select.POLLRDHUP)
        for _fd, ev in p.poll(0):
            if ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                return None
        return _INCOMPLETE

    def _wait_for_rest(self) -> None:
        """An incomplete message: stop watching the socket (it stays readable, so watching it
        would spin) and look again shortly; a frontend that stalls mid-message for longer than
        PARTIAL_TIMEOUT is disconnected.  Main thread."""
        now = time.monotonic()
        if self._partial_since is None:
            self._partial_since = now
        elif now - self._partial_since > PARTIAL_TIMEOUT:
            self.close("incomplete vhost-user message (frontend stalled or hung up mid-message)")
            return
        self._waiting = True
        self.main_ctx.set_fd_handler(self.sock.fileno(), None)

        def retry() -> None:
            self._waiting = False
            if not self.closed and not self._closing:
                self.main_ctx.set_fd_handler(self.sock.fileno(), self._on_readable)
                self._on_readable()

        t = threading.Timer(PARTIAL_RETRY, self.main_ctx.schedule, (retry,))
        t.daemon = True
        t.start()

    def _on_readable(self) -> None:
        if self.closed or self._waiting:
            return
        req = self._peek_request()
        if req is None:
            self.close("frontend disconnected")
            return
        if req is _INCOMPLETE:
            self._wait_for_rest()
            return
        need_quiesce = req not in _NO_QUIESCE
        self.messages += 1  # x-pyvhost-stats' x-debug
        self.last_messages = (self.last_messages + [req])[-8:]
        if need_quiesce:
            self.quiescing = True
            self._update_paused()
        lib.pyvu_wrlock(self.pdev)
        if need_quiesce and self.in_flight() > 0:
            lib.pyvu_unlock(self.pdev)
            self._wait_for_quiesce(self._on_readable)
            return
        try:
            ok = lib.vu_dispatch(self.dev)
        finally:
            lib.pyvu_unlock(self.pdev)
        if need_quiesce:
            self.quiescing = False
            self._update_paused()
            self._reschedule_queues()
        if self.pdev.eof:
            self.close("frontend disconnected")
        elif not ok or self.pdev.bad_msg:
            why = ffi.string(self.pdev.why).decode(errors="replace")
            self.close(f"bad vhost-user message: {why or 'dispatch failed'}")
        elif self.dev.broken:
            self.close("device marked broken by libvhost-user")

    def _wait_for_quiesce(self, then: Callable[[], None]) -> None:
        """Stop reading the socket until no request is in flight, then call ``then``."""
        self._waiting = True
        self.main_ctx.set_fd_handler(self.sock.fileno(), None)

        def resume() -> None:
            self._waiting = False
            if not self.closed:
                self.main_ctx.set_fd_handler(self.sock.fileno(), self._on_readable)
            then()

        aio_wait_until(lambda: self.in_flight() == 0, resume)

    def _reschedule_queues(self) -> None:
        for q in self.queues:
            q.schedule_process()

    # -- libvhost-user callbacks (main thread, inside vu_dispatch, lock held exclusively) ------
    def queue_set_started(self, qidx: int, started: bool) -> None:
        if not 0 <= qidx < len(self.queues):
            return
        q = self.queues[qidx]
        if started:
            kick = self.dev.vq[qidx].kick_fd
            if kick < 0:
                return
            fd = os.dup(kick)
            os.set_inheritable(fd, False)
            q.ctx.schedule(q._attach, fd)
        else:
            q.ctx.schedule(q._detach)

    # -- teardown ---------------------------------------------------------------------------
    def close(self, why: str) -> None:
        """Quiesce, wait for in-flight requests, deinit, close; then the server accepts again."""
        if self._closing:
            return
        self._closing = True
        self.quiescing = True
        self._update_paused()
        log.info("%s: %s", self.server.name, why,
                 extra={"export": self.server.name, "event": "frontend-disconnected",
                        "reason": why})
        self.device.connection_closing()
        if self.in_flight() > 0:
            self._wait_for_quiesce(self._finish_close)
        else:
            self._finish_close()

    @property
    def going_away(self) -> bool:
        """close() has begun (the connection may still wait for requests in flight)."""
        return self._closing or self.closed

    def _finish_close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._update_paused()
        self.main_ctx.set_fd_handler(self.sock.fileno(), None)
        lib.pyvu_wrlock(self.pdev)  # no pop loop runs after this; none starts (paused)
        try:
            lib.vu_deinit(self.dev)  # closes the connection's fd too
        finally:
            lib.pyvu_unlock(self.pdev)
        self.sock.detach()
        # Each queue's context stops watching its kick fd; the lock is destroyed only after the
        # last one did, since a kick may still wake a queue's C handler until then.
        remaining = [len(self.queues)]

        def detached() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                self.server._connection_closed(self)

        for q in self.queues:
            def detach(q: VuQueue = q) -> None:
                q._detach()
                self.main_ctx.schedule(detached)

            q.ctx.schedule(detach)
        if not self.queues:
            self.server._connection_closed(self)

    def _update_paused(self) -> None:
        for q in self.queues:
            q.update_paused()

    def stats(self) -> list[dict[str, int]]:
        return [q.stats() for q in self.queues]


class VuServer:
    """Listens for vhost-user frontends of one device.  Main thread."""

    def __init__(self, name: str, device: VuDevice, listener: socket.socket,
                 path: str | None) -> None:
        self.name = name
        self.device = device
        self.num_queues = device.num_queues
        self.listener = listener
        self.path = path
        self.conn: VuConnection | None = None
        self.connections = 0
        self.queue_totals = [0] * self.num_queues
        self.ctx_totals: dict[str, int] = {}  # requests per AioContext name, credited
        self.main_ctx = qemu_get_aio_context()
        self.pause_count = 0  # > 0: queues do not pop (drained, or stopped on an I/O error)
        self._pause_lock = threading.Lock()
        self.listener.setblocking(False)
        self.main_ctx.set_fd_handler(listener.fileno(), self._on_accept)

    # -- pausing queue processing (drain, error stop); any thread ----------------------------
    def pause(self, sync: bool = False) -> None:
        """Stop popping new requests from every queue (requests in flight go on).
        With ``sync`` (main thread only), also wait for a pop loop already running in another
        thread to finish, so that after return every popped request is counted in flight."""
        with self._pause_lock:
            self.pause_count += 1
        conn = self.conn
        if conn is not None:
            conn._update_paused()
        if sync and conn is not None and not conn.closed:
            lib.pyvu_wrlock(conn.pdev)
            lib.pyvu_unlock(conn.pdev)

    def resume(self) -> None:
        """Undo one pause(); on the last one, look at every ring again (kicks that arrived
        while paused were consumed without popping)."""
        with self._pause_lock:
            assert self.pause_count > 0
            self.pause_count -= 1
            last = self.pause_count == 0
        if last and self.conn is not None:
            self.conn._update_paused()
            self.conn._reschedule_queues()

    def config_changed(self) -> None:
        """Main thread: tell the frontend the config space changed (capacity, ...).  Needs the
        backend channel; the frontend answers with GET_CONFIG later, so never wait here."""
        conn = self.conn
        if conn is None or conn.closed or conn.dev.backend_fd < 0:
            return
        lib.vu_config_change_msg(conn.dev)

    def move_queues(self) -> None:
        """Main thread, drained: re-read ``device.queue_context(i)`` for every live queue."""
        if self.conn is not None:
            for q in self.conn.queues:
                q.move_to(self.device.queue_context(q.idx))

    def _on_accept(self) -> None:
        conn = self.conn
        if conn is not None and conn.going_away:
            # The frontend is going away (e.g. QEMU restarting): leave the next one in the
            # backlog until the old connection is gone, instead of refusing it.
            self.main_ctx.set_fd_handler(self.listener.fileno(), None)
            return
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.warning("%s: accept failed: %s", self.name, e,
                        extra={"export": self.name, "event": "accept-failed"})
            return
        if self.conn is not None:
            log.warning("%s: refusing a second frontend while one is attached", self.name,
                        extra={"export": self.name, "event": "frontend-refused"})
            sock.close()
            return
        sock.setblocking(True)  # libvhost-user reads a whole message with blocking calls
        try:
            self.conn = VuConnection(self, sock)
        except OSError as e:
            log.error("%s: cannot serve the frontend: %s", self.name, e,
                      extra={"export": self.name, "event": "frontend-failed"})
            sock.close()
            return
        self.connections += 1
        log.info("%s: frontend connected", self.name,
                 extra={"export": self.name, "event": "frontend-connected",
                        "connection": self.connections})
        self.device.connection_changed(True)

    def credit_iothread(self, name: str, requests: int) -> None:
        self.ctx_totals[name] = self.ctx_totals.get(name, 0) + requests

    def iothread_requests(self) -> dict[str, int]:
        """Requests popped per AioContext (by name), whichever queue and connection."""
        totals = dict(self.ctx_totals)
        if self.conn is not None:
            for q in self.conn.queues:
                name = q.ctx.name
                totals[name] = totals.get(name, 0) + q.requests - q._credited
        return totals

    def _connection_closed(self, conn: VuConnection) -> None:
        for q in conn.queues:
            self.queue_totals[q.idx] += q.requests
            self.credit_iothread(*q.credit_ctx())
        if self.conn is conn:
            self.conn = None
        lib.pyvu_dev_destroy(conn.pdev)
        self.device.connection_changed(False)
        # A connection's objects (queues, handlers, their callbacks) refer to each other: free
        # them now, not whenever the cyclic GC next runs -- which, with requests served in C
        # and few Python allocations, may be hundreds of connections later (the daemon's RSS
        # then grows by ~14 KiB per connection until it does).
        gc.collect()
        aio_wait_kick()  # shutdown() may be waiting for this
        if self.listener.fileno() >= 0:  # accept again (see _on_accept); not after shutdown
            self.main_ctx.set_fd_handler(self.listener.fileno(), self._on_accept)
            self._on_accept()

    def in_flight(self) -> int:
        return self.conn.in_flight() if self.conn else 0

    def stats(self) -> dict[str, Any]:
        live = self.conn.stats() if self.conn else []
        queues = []
        for i in range(self.num_queues):
            cur = live[i] if i < len(live) else {"requests": 0, "kicks": 0, "in-flight": 0}
            queues.append({
                "queue": i,
                "requests": self.queue_totals[i] + cur["requests"],
                "in-flight": cur["in-flight"],
                "kicks": cur["kicks"],
                "iothread": self.device.queue_context(i).name,
                **({"x-debug": cur["x-debug"]} if "x-debug" in cur else {}),
            })
        return {"connections": self.connections, "connected": self.conn is not None,
                "queues": queues}

    def stop_listening(self) -> None:
        """Main thread: stop accepting frontends, close the listener, remove the socket file."""
        if self.listener.fileno() < 0:
            return
        self.main_ctx.set_fd_handler(self.listener.fileno(), None)
        self.listener.close()
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def shutdown(self, then: Callable[[], None]) -> None:
        """Stop accepting, disconnect the frontend after its in-flight requests, unlink the
        socket, then call ``then``."""
        self.stop_listening()
        conn = self.conn
        if conn is None:
            then()
            return
        conn.close("shutting down")
        aio_wait_until(lambda: self.conn is None, then)


# -- listening sockets -------------------------------------------------------------------------
class SocketInUse(Exception):
    """Another live process owns the socket path."""


class SocketPathError(OSError):
    """A UNIX socket cannot be created at this path (too long, no such directory, no
    permission); ``str()`` is the whole message, in QEMU's words."""

    def __str__(self) -> str:
        return str(self.strerror)


# sizeof(struct sockaddr_un.sun_path): the path and its terminating NUL must fit.
UNIX_PATH_MAX = 108


def listen_unix(path: str, mode: int = 0o600) -> socket.socket:
    """Listen on ``path``.  A stale socket file (connect refused) is replaced; a live one
    (connect accepted) raises SocketInUse: never steal a running daemon's socket.  A path
    that is too long or cannot be bound raises SocketPathError."""
    if "\0" in path:
        raise SocketPathError(errno.EINVAL, f"UNIX socket path {path!r} contains a NUL byte")
    if len(os.fsencode(path)) >= UNIX_PATH_MAX:
        raise SocketPathError(errno.ENAMETOOLONG, f"UNIX socket path '{path}' is too long: "
                              f"it must be less than {UNIX_PATH_MAX} bytes")
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"'{path}' exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        else:
            raise SocketInUse(f"socket '{path}' is in use by another process")
        finally:
            probe.close()
    # Bind under a temporary name and rename once listening: the path never names a socket
    # that refuses connections (a frontend that sees the file may connect at once).
    tmp = f"{path}.{os.getpid()}.tmp"
    if not path or len(os.fsencode(tmp)) >= UNIX_PATH_MAX:
        tmp = path  # no room for a longer name: bind in place
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(tmp)
        sock.listen(1)
        if tmp != path:
            os.rename(tmp, path)
    except OSError as e:
        sock.close()
        if tmp != path:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise SocketPathError(e.errno, f"Failed to bind socket to {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    return sock


def listen_fd(fd: int) -> socket.socket:
    """Adopt an inherited listening socket (``addr.type=fd``)."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM:
        raise OSError(errno.EINVAL, f"fd {fd} is not a stream socket")
    return sock


# -- VuDevIface, implemented once for every connection -------------------------------------
def _conn(dev: Any) -> VuConnection:
    return ffi.from_handle(lib.pyvu_handle(dev))


def _log_exc(what: str) -> Callable[..., None]:
    def onerror(exc_type: Any, exc: Any, tb: Any) -> None:
        log.error("exception in %s callback", what, exc_info=(exc_type, exc, tb))
    return onerror


@ffi.def_extern(onerror=_log_exc("get_features"))
def pyvu_cb_get_features(dev: Any) -> int:
    return _conn(dev).device.get_features()


@ffi.def_extern(onerror=_log_exc("set_features"))
def pyvu_cb_set_features(dev: Any, features: int) -> None:
    _conn(dev).device.set_features(features)


@ffi.def_extern(onerror=_log_exc("get_protocol_features"))
def pyvu_cb_get_protocol_features(dev: Any) -> int:
    return _conn(dev).device.get_protocol_features()


@ffi.def_extern(onerror=_log_exc("set_protocol_features"))
def pyvu_cb_set_protocol_features(dev: Any, features: int) -> None:
    pass


@ffi.def_extern(onerror=_log_exc("queue_set_started"))
def pyvu_cb_queue_set_started(dev: Any, qidx: int, started: bool) -> None:
    _conn(dev).queue_set_started(qidx, started)


def _config_error(exc_type: Any, exc: Any, tb: Any) -> int:
    log.error("exception in config callback", exc_info=(exc_type, exc, tb))
    return -1


@ffi.def_extern(onerror=_config_error)
def pyvu_cb_get_config(dev: Any, config: Any, length: int) -> int:
    if length > VHOST_USER_MAX_CONFIG_SIZE:
        return -1
    data = _conn(dev).device.get_config(length)
    if data is None:
        return -1
    data = data[:length].ljust(length, b"\0")
    ffi.memmove(config, data, length)
    return 0


@ffi.def_extern(onerror=_config_error)
def pyvu_cb_set_config(dev: Any, data: Any, offset: int, size: int, flags: int) -> int:
    if size > VHOST_USER_MAX_CONFIG_SIZE:
        return -1
    ok = _conn(dev).device.set_config(ffi.unpack(ffi.cast("char *", data), size), offset, flags)
    return 0 if ok else -1


@ffi.def_extern(onerror=_log_exc("panic"))
def pyvu_cb_panic(dev: Any, err: Any) -> None:
    conn = _conn(dev)
    msg = ffi.string(err).decode(errors="replace")
    log.error("%s: libvhost-user: %s", conn.server.name, msg,
              extra={"export": conn.server.name, "event": "libvhost-user-error"})
    conn.main_ctx.schedule(conn.close, f"libvhost-user error: {msg}")


@ffi.def_extern(onerror=_log_exc("set_watch"))
def pyvu_cb_set_watch(dev: Any, fd: int, condition: int, cb: Any, data: Any) -> None:
    # Only used by libvhost-user for queues with a C handler, which we never set.
    log.debug("ignoring set_watch(fd=%d)", fd)


@ffi.def_extern(onerror=_log_exc("remove_watch"))
def pyvu_cb_remove_watch(dev: Any, fd: int) -> None:
    pass


# Test-only: see pyvu_set_x_no_dirty_log in csrc/vhost_device.c (read once, at start).
if os.environ.get("PYVHOST_BLK_X_NO_DIRTY_LOG") == "1":
    lib.pyvu_set_x_no_dirty_log(1)

_IFACE = ffi.new(
    "VuDevIface *",
    {
        "get_features": lib.pyvu_cb_get_features,
        "set_features": lib.pyvu_cb_set_features,
        "get_protocol_features": lib.pyvu_cb_get_protocol_features,
        "set_protocol_features": lib.pyvu_cb_set_protocol_features,
        "process_msg": lib.pyvu_process_msg,
        "queue_set_started": lib.pyvu_cb_queue_set_started,
        "get_config": lib.pyvu_cb_get_config,
        "set_config": lib.pyvu_cb_set_config,
    },
)
