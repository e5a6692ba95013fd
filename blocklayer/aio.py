"""AioContext: one event loop, owned by one thread.

Theory of operation
-------------------
QEMU runs each I/O thread's work in an AioContext: fd handlers plus bottom halves (BHs), callables
queued to run soon in that context.  We keep the same shape:

* ``set_fd_handler(fd, handler, write_handler=None)`` registers a read handler and, optionally,
  a write handler (run while fd is writable: EPOLLOUT); it must be called from the context's
  home thread (to act on another context, schedule a BH into it).
* ``schedule(fn, *args)`` queues a BH.  It is the *only* thing other threads may do to a context
  (trio's ``run_sync_soon`` / QEMU's ``aio_bh_schedule_oneshot``): one locked deque and one
  eventfd that wakes the loop only when it is (about to be) blocked in ``epoll_wait``.
* ``timer_new(delay, fn, *args)`` runs ``fn(*args)`` in this context once ``delay`` seconds
  have passed (QEMU's ``aio_timer_new`` + ``timer_mod``); any thread; ``.cancel()`` stops it.
  Due timers run like BHs; a blocking wait sleeps no longer than the next deadline.
* ``aio_poll(blocking)`` runs one iteration: BHs and due timers, then ready fd handlers, then
  BHs again.
* The wait itself is ``pyvu_poller_wait`` (``vhost/csrc/poller.c``), with the GIL released.  Its
  epoll set may also hold *C handlers* (``add_c_handler``): virtqueue kicks and io_uring
  completions served in C without returning to Python.  When such a handler leaves work for
  Python it reports a *token*, dispatched like an fd: ``self._handlers[token]()``.

``current_aio_context()`` tells code which context it is running in; the block layer uses it to
deliver completions back into the context that submitted a request.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from vhost.ffi import check_errno, ffi, lib

_tls = threading.local()
_MAX_TOKENS = 128
_TOKEN_C = lib.PYVU_TOKEN_C
_TOKEN_FD_MASK = lib.PYVU_TOKEN_FD_MASK
_TOKEN_EVENTS_SHIFT = lib.PYVU_TOKEN_EVENTS_SHIFT
#: epoll events that call a read handler / a write handler (an error or hang-up calls both)
_READ_EVENTS = select.EPOLLIN | select.EPOLLPRI | select.EPOLLERR | select.EPOLLHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
#: adaptive polling window before sleeping, as qemu-storage-daemon's iothreads (poll-max-ns)
DEFAULT_POLL_MAX_NS = 32768
log = logging.getLogger("pyvhost_blk.aio")


def current_aio_context() -> AioContext:
    """The AioContext whose loop is running in this thread (the main one outside any loop)."""
    ctx = getattr(_tls, "ctx", None)
    return ctx if ctx is not None else qemu_get_aio_context()


class AioTimer:
    """A pending ``timer_new`` call; ``cancel()`` (any thread) stops it if it has not run."""

    __slots__ = ("deadline", "fn", "args", "cancelled")

    def __init__(self, deadline: float, fn: Callable[..., Any], args: tuple) -> None:
        self.deadline, self.fn, self.args, self.cancelled = deadline, fn, args, False

    def cancel(self) -> None:
        self.cancelled = True


class AioContext:
    """An epoll loop with fd handlers, thread-safe bottom halves and timers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._poller = ffi.new("struct pyvu_poller *")
        check_errno(lib.pyvu_poller_init(self._poller), "epoll_create1")
        self._poller.poll_ns = DEFAULT_POLL_MAX_NS
        self._tokens = ffi.new("uint64_t[]", _MAX_TOKENS)
        self._handlers: dict[int, Callable[[], None]] = {}  # read handlers, C tokens
        self._writers: dict[int, Callable[[], None]] = {}   # write handlers
        self._fd_events: dict[int, int] = {}                # epoll events of each Python fd
        self._bh: collections.deque[tuple[Callable[..., Any], tuple]] = collections.deque()
        self._bh_lock = threading.Lock()
        # Filled by signal handlers, which may interrupt this thread while it holds _bh_lock:
        # deque.append/popleft are atomic, so this one needs no lock.
        self._signal_bh: collections.deque[tuple[Callable[..., Any], tuple]] = (
            collections.deque()
        )
        self._blocked = False  # True while (about to be) waiting in epoll with no timeout
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        check_errno(lib.pyvu_poller_add_py(self._poller, self._wake_fd), "epoll_ctl")
        self.home_thread: int | None = None
        self.stopped = False
        self.iterations = 0
        self._timers: list[tuple[float, int, AioTimer]] = []  # heap, under _bh_lock
        self._timer_seq = itertools.count()

    # -- fd handlers (home thread only) ---------------------------------------------------------
    def set_fd_handler(self, fd: int, handler: Callable[[], None] | None,
                       write_handler: Callable[[], None] | None = None) -> None:
        """Register the read handler and the write handler of fd (None: none); with neither,
        stop watching fd.  The write handler runs while fd is writable (EPOLLOUT), so set it
        only while there is something to write.  An error or hang-up runs both.  Home thread
        only."""
        events = ((select.EPOLLIN if handler is not None else 0)
                  | (select.EPOLLOUT if write_handler is not None else 0))
        old = self._fd_events.get(fd, 0)
        if handler is None:
            self._handlers.pop(fd, None)
        else:
            self._handlers[fd] = handler
        if write_handler is None:
            self._writers.pop(fd, None)
        else:
            self._writers[fd] = write_handler
        if events == old:
            return
        if not events:
            del self._fd_events[fd]
            lib.pyvu_poller_del(self._poller, fd)  # fails harmlessly if already closed
            return
        if old:
            check_errno(lib.pyvu_poller_mod_py(self._poller, fd, events), "epoll_ctl")
        else:
            check_errno(lib.pyvu_poller_add_py_events(self._poller, fd, events), "epoll_ctl")
        self._fd_events[fd] = events

    def add_c_handler(self, fd: int, chandler: Any, token: int,
                      python_work: Callable[[], None]) -> None:
        """Watch ``fd`` with a C handler (``struct pyvu_chandler *``); when it reports
        ``token``, call ``python_work()`` here.  Home thread only."""
        self._handlers[token] = python_work
        check_errno(lib.pyvu_poller_add_c(self._poller, fd, chandler), "epoll_ctl")

    def remove_c_handler(self, fd: int, token: int) -> None:
        """Stop watching ``fd`` (before closing it).  Home thread only."""
        lib.pyvu_poller_del(self._poller, fd)
        self._handlers.pop(token, None)

    # -- bottom halves (any thread) ----------------------------------------------------------
    def schedule(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) soon in this context.  Safe from any thread (signal handlers use
        schedule_from_signal_handler)."""
        with self._bh_lock:
            self._bh.append((fn, args))
            wake = self._blocked
            self._blocked = False
        if wake:
            os.eventfd_write(self._wake_fd, 1)

    def schedule_from_signal_handler(self, fn: Callable[..., Any], *args: Any) -> None:
        """Like schedule(), for Python signal handlers (which run between any two bytecodes of
        the main thread, possibly while it holds the BH lock)."""
        self._signal_bh.append((fn, args))
        os.eventfd_write(self._wake_fd, 1)

    # -- timers (any thread) --------------------------------------------------------------------
    def timer_new(self, delay: float, fn: Callable[..., Any], *args: Any) -> AioTimer:
        """Run ``fn(*args)`` in this context after ``delay`` seconds.  Any thread."""
        t = AioTimer(time.monotonic() + max(0.0, delay), fn, args)
        with self._bh_lock:
            first = not self._timers or t.deadline < self._timers[0][0]
            heapq.heappush(self._timers, (t.deadline, next(self._timer_seq), t))
            wake = first and self._blocked  # a sleeping loop must shorten its wait
            if wake:
                self._blocked = False
        if wake:
            os.eventfd_write(self._wake_fd, 1)
        return t

    def _run_timers(self) -> bool:
        if not self._timers:
            return False
        now = time.monotonic()
        due = []
        with self._bh_lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
        for t in due:
            if t.cancelled:
                continue
            try:
                t.fn(*t.args)
            except Exception:
                log.exception("unhandled exception in timer %r", t.fn)
        return bool(due)

    def _run_bhs(self) -> bool:
        ran = False
        while self._signal_bh:
            fn, args = self._signal_bh.popleft()
            ran = True
            try:
                fn(*args)
            except Exception:
                log.exception("unhandled exception in bottom half %r", fn)
        while True:
            with self._bh_lock:
                if not self._bh:
                    return ran
                batch = self._bh
                self._bh = collections.deque()
            ran = True
            for fn, args in batch:
                try:
                    fn(*args)
                except Exception:
                    # A bug in one callback must not take the daemon (and every guest) down.
                    log.exception("unhandled exception in bottom half %r", fn)

    # -- the loop -----------------------------------------------------------------------------
    def aio_poll(self, blocking: bool, timeout: float | None = None) -> bool:
        """One loop iteration; returns whether any progress was made.  Home thread only."""
        progress = self._run_bhs()
        progress = self._run_timers() or progress
        if blocking and not progress:
            with self._bh_lock:
                if self._bh:
                    wait = 0.0
                else:
                    self._blocked = True
                    wait = -1.0 if timeout is None else timeout
                    if self._timers:
                        left = max(0.0, self._timers[0][0] - time.monotonic())
                        wait = left if wait < 0 else min(wait, left)
        else:
            wait = 0.0
        timeout_ms = -1 if wait < 0 else int(wait * 1000 + 0.999)
        n = lib.pyvu_poller_wait(self._poller, timeout_ms, self._tokens, _MAX_TOKENS)
        self._blocked = False
        self.iterations += 1
        tokens = self._tokens
        for i in range(max(n, 0)):  # n < 0: EINTR (signal handlers have run by now)
            token = tokens[i]
            if not token & _TOKEN_C:
                # a Python fd, with the epoll events that fired above its number
                fd, events = token & _TOKEN_FD_MASK, token >> _TOKEN_EVENTS_SHIFT
                if fd == self._wake_fd:
                    try:
                        os.eventfd_read(self._wake_fd)
                    except BlockingIOError:
                        pass
                    continue
                writer = self._writers.get(fd)
                if writer is not None and events & _WRITE_EVENTS:
                    try:
                        writer()
                    except Exception:
                        log.exception("unhandled exception in fd write handler %r", writer)
                    progress = True
                if not events & _READ_EVENTS:
                    # only writable: no read handler call (its writer may have gone since the
                    # wait, and a read with nothing to read is not harmless: libnbd then holds
                    # new commands until a reply comes)
                    continue
                token = fd
            handler = self._handlers.get(token)
            if handler is not None:
                try:
                    handler()
                except Exception:
                    log.exception("unhandled exception in fd handler %r", handler)
                progress = True
        return self._run_bhs() or progress

    def run(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Run the loop in the calling thread until stop() (or should_stop() is true)."""
        self.home_thread = threading.get_ident()
        _tls.ctx = self
        try:
            while not self.stopped and not (should_stop and should_stop()):
                self.aio_poll(blocking=True)
        finally:
            _tls.ctx = None

    def stop(self) -> None:
        """Ask the loop to return from run(); safe from any thread."""
        def _stop() -> None:
            self.stopped = True

        self.schedule(_stop)

    def set_poll_max_ns(self, ns: int) -> None:
        """How long to keep polling for events before sleeping (0: never poll)."""
        self._poller.poll_ns = ns
        if self._poller.cur_poll_ns > ns:
            self._poller.cur_poll_ns = ns

    @property
    def poll_stats(self) -> dict[str, int]:
        """The polling policy's counters (``vhost/csrc/poller.c``): polls, polls that found
        work (hits) and that ran out (misses), the current window and the time spent polling.
        Read from any thread (plain counters: a snapshot may be a few events old)."""
        p = self._poller
        return {"poll-max-ns": p.poll_ns, "poll-ns": p.cur_poll_ns, "polls": p.polls,
                "poll-hits": p.poll_hits, "poll-misses": p.poll_misses,
                "poll-time-ns": p.poll_spin_ns, "poll-grows": p.poll_grows,
                "poll-shrinks": p.poll_shrinks}

    def in_home_thread(self) -> bool:
        return self.home_thread is None or self.home_thread == threading.get_ident()

    def close(self) -> None:
        lib.pyvu_poller_close(self._poller)
        os.close(self._wake_fd)


_main_ctx: AioContext | None = None


def qemu_get_aio_context() -> AioContext:
    """The main loop's context (created on first use, like QEMU's qemu_aio_context)."""
    global _main_ctx
    if _main_ctx is None:
        _main_ctx = AioContext("main")
        _c_wait_fd()  # created with the loop, not on first use: a daemon's fd table is stable
    return _main_ctx


# -- AIO_WAIT_WHILE, made asynchronous ---------------------------------------------------------
# QEMU's main loop blocks in AIO_WAIT_WHILE(cond) and is woken by aio_wait_kick() whenever some
# counter drops.  Our main loop never blocks inside a handler; instead it registers a waiter
# (cond, then) and aio_wait_kick() schedules a recheck in the main context.

_waiters: list[tuple[Callable[[], bool], Callable[[], None]]] = []
_waiters_lock = threading.Lock()
_kick_pending = False


def aio_wait_until(cond: Callable[[], bool], then: Callable[[], None]) -> None:
    """Main thread: call ``then()`` in the main context once ``cond()`` is true (maybe now)."""
    if cond():
        then()
        return
    with _waiters_lock:
        _waiters.append((cond, then))
        lib.pyvu_set_waiters(len(_waiters))
    aio_wait_kick()  # cond may have become true between the check and the append


def aio_wait_kick() -> None:
    """Any thread: some condition a waiter may wait for has changed."""
    global _kick_pending
    with _waiters_lock:
        if not _waiters or _kick_pending:
            return
        _kick_pending = True
    qemu_get_aio_context().schedule(_recheck_waiters)


def _recheck_waiters() -> None:
    global _kick_pending
    with _waiters_lock:
        _kick_pending = False
        waiting = list(_waiters)
    for w in waiting:
        cond, then = w
        if cond():
            with _waiters_lock:
                if w in _waiters:
                    _waiters.remove(w)
                    lib.pyvu_set_waiters(len(_waiters))
                else:
                    continue
            then()


_wait_efd = -1


def _c_wait_fd() -> None:
    """The eventfd through which C counters (the fast path's in-flight counts) wake the main
    loop when they drop to zero while someone waits.  Main thread, once, with the main loop."""
    global _wait_efd
    if _wait_efd >= 0:
        return
    _wait_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def on_wait_fd() -> None:
        try:
            os.eventfd_read(_wait_efd)
        except BlockingIOError:
            pass
        aio_wait_kick()

    qemu_get_aio_context().set_fd_handler(_wait_efd, on_wait_fd)
    lib.pyvu_set_wait_efd(_wait_efd)
