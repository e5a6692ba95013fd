"""Generator coroutines over the callback block layer, and the locks they take.

Theory of operation
-------------------
The block layer is callback-based: every ``bdrv_aio_*`` call takes ``cb(ret)``.  A request of
a format or filter that needs several steps (qcow2, copy-on-read) is a sequence of such calls
(look up an L2 table, read the rest of a cluster, write the data, update the L2 entry, copy
up...), which is unreadable as nested callbacks.  Here a request is a
*generator*: it ``yield``s an **op** — a callable ``op(ctx, resume)`` that starts something
asynchronous and eventually calls ``resume(ret)`` — and receives ``ret`` back as the value of
the ``yield`` (a negative ``ret`` is raised inside the generator as ``OSError(-ret)``).
Sub-steps compose with ``yield from``.  ``co_start(ctx, gen, cb)`` drives one such generator and
calls ``cb(0 or -errno)`` when it returns or raises (an ``OSError`` gives its errno, anything
else ``-EIO`` and a log line: a bug fails one request, never the daemon).

An op may complete synchronously (``resume`` called before the op returns); the driver then
loops instead of recursing, so long runs of cache hits do not grow the stack.

**Locks.**  Requests of one node come from several AioContexts (one per iothread), so the
waiting lists are guarded by a ``threading.Lock`` and a waiter is always resumed through its
own context's bottom-half queue (``ctx.schedule``).  ``CoMutex`` is QEMU's CoMutex: one holder,
FIFO hand-over.  ``RangeLock`` holds ranges of guest clusters for allocating requests: two
requests that would allocate the same guest cluster never run at once.

Everything here runs in the AioContext of the request that uses it.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

log = logging.getLogger("pyvhost_blk.coroutine")

Resume = Callable[[int], None]
Op = Callable[[Any, Resume], None]
Co = Generator[Op, int, Any]


def co_start(ctx: Any, gen: Co, cb: Callable[[int], None]) -> None:
    """Run ``gen`` in ``ctx`` until it finishes; then ``cb(0)`` or ``cb(-errno)``.
    Called in ``ctx``; ``cb`` runs in ``ctx`` (possibly before co_start returns)."""
    _Runner(ctx, gen, cb).step(None)


class _Runner:
    __slots__ = ("ctx", "gen", "cb", "_sync", "_result")

    def __init__(self, ctx: Any, gen: Co, cb: Callable[[int], None]) -> None:
        self.ctx = ctx
        self.gen = gen
        self.cb = cb
        self._sync = False
        self._result: int | None = None

    def _resume(self, ret: int) -> None:
        if self._sync:  # completed inside the op: the loop in step() picks it up
            self._result = ret
        else:
            self.step(ret)

    def step(self, ret: int | None) -> None:
        while True:
            try:
                if ret is not None and ret < 0:
                    op = self.gen.throw(OSError(-ret, errno.errorcode.get(-ret, "error")))
                else:
                    op = self.gen.send(ret)
            except StopIteration:
                self.cb(0)
                return
            except OSError as e:
                self.cb(-(e.errno or errno.EIO))
                return
            except Exception:
                log.exception("qcow2: request failed")
                self.cb(-errno.EIO)
                return
            self._sync, self._result = True, None
            try:
                op(self.ctx, self._resume)
            except Exception as e:  # an op that failed to start: raise it in the generator
                if not isinstance(e, OSError):
                    log.exception("qcow2: starting an operation failed")
                self._sync = False
                ret = -(getattr(e, "errno", None) or errno.EIO)
                continue
            self._sync = False
            if self._result is None:
                return  # asynchronous: _resume -> step() later
            ret = self._result


def co_run_sync(ctx: Any, gen: Co, timeout_polls: int = 10_000_000) -> None:
    """Run ``gen`` to completion from non-request code (open, truncate, close: main thread)
    by polling ``ctx`` until it finished, as QEMU's BDRV_POLL_WHILE.  Raises OSError."""
    result: list[int] = []
    co_start(ctx, gen, result.append)
    n = 0
    while not result:
        ctx.aio_poll(blocking=True, timeout=0.1)
        n += 1
        if n > timeout_polls:
            raise OSError(errno.ETIMEDOUT, "qcow2: metadata I/O did not complete")
    if result[0] < 0:
        raise OSError(-result[0], errno.errorcode.get(-result[0], "error"))


class CoMutex:
    """A mutex held across yields; waiters are resumed FIFO in their own AioContext."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held = False
        self._waiters: deque[tuple[Any, Resume]] = deque()

    def lock(self) -> Op:
        """``yield mutex.lock()``: returns once this coroutine holds the mutex."""
        def op(ctx: Any, resume: Resume) -> None:
            with self._lock:
                if self._held:
                    self._waiters.append((ctx, resume))
                    return
                self._held = True
            resume(0)
        return op

    def try_lock(self) -> bool:
        """Take the mutex if nobody holds it (plain code, not a coroutine); else False."""
        with self._lock:
            if self._held:
                return False
            self._held = True
            return True

    def unlock(self) -> None:
        with self._lock:
            if not self._waiters:
                self._held = False
                return
            ctx, resume = self._waiters.popleft()  # ownership passes to the next waiter
        ctx.schedule(resume, 0)

    @property
    def locked(self) -> bool:
        return self._held


class RangeLock:
    """Holds [start, end) ranges (of guest clusters); an overlapping request waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[tuple[int, int]] = []
        self._waiters: list[tuple[int, int, Any, Resume]] = []

    def _busy(self, start: int, end: int) -> bool:
        return any(s < end and start < e for s, e in self._held)

    def acquire(self, start: int, end: int) -> Op:
        """``yield ranges.acquire(s, e)``: returns holding [s, e).  Waiters wait for held
        ranges only (overlapping requests in flight at once have no order to keep)."""
        def op(ctx: Any, resume: Resume) -> None:
            with self._lock:
                if self._busy(start, end):
                    self._waiters.append((start, end, ctx, resume))
                    return
                self._held.append((start, end))
            resume(0)
        return op

    def release(self, start: int, end: int) -> None:
        ready = []
        with self._lock:
            self._held.remove((start, end))
            if self._waiters:
                still = []
                for w in self._waiters:
                    s, e = w[0], w[1]
                    if s < end and start < e and not self._busy(s, e):
                        self._held.append((s, e))
                        ready.append(w)
                    else:
                        still.append(w)
                self._waiters = still
        for _s, _e, ctx, resume in ready:
            ctx.schedule(resume, 0)

    def busy(self, start: int, end: int) -> bool:
        with self._lock:
            return self._busy(start, end)
