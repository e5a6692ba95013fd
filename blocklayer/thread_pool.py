"""A worker pool for blocking system calls (QEMU's util/thread-pool.c).

``thread_pool_submit_aio(ctx, fn, cb)`` runs ``fn()`` in a worker and delivers ``cb(ret)`` in
``ctx`` through a bottom half.  ``fn`` returns 0/positive on success or a negative errno, or
raises OSError (turned into ``-errno``).  The workers release the GIL inside the system calls.
"""

from __future__ import annotations

import errno
import queue
import threading
from collections.abc import Callable

from blocklayer.aio import AioContext

MAX_WORKERS = 16


class ThreadPool:
    def __init__(self, max_workers: int = MAX_WORKERS) -> None:
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._max = max_workers
        self._workers: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()

    def submit(self, ctx: AioContext, fn: Callable[[], int], cb: Callable[[int], None]) -> None:
        """Any thread.  Completion runs in ``ctx``."""
        self._q.put((ctx, fn, cb))
        with self._lock:
            if self._idle == 0 and len(self._workers) < self._max:
                t = threading.Thread(target=self._worker, name="pool-worker", daemon=True)
                self._workers.append(t)
                self._idle += 1
                t.start()

    def _worker(self) -> None:
        while True:
            ctx, fn, cb = self._q.get()
            with self._lock:
                self._idle -= 1
            try:
                ret = fn()
            except OSError as e:
                ret = -(e.errno or errno.EIO)
            except Exception:  # a driver bug must not kill the worker or lose the request
                ret = -errno.EIO
            ctx.schedule(cb, ret)
            with self._lock:
                self._idle += 1


_pool: ThreadPool | None = None


def thread_pool_submit_aio(
    ctx: AioContext, fn: Callable[[], int], cb: Callable[[int], None]
) -> None:
    global _pool
    if _pool is None:
        _pool = ThreadPool()
    _pool.submit(ctx, fn, cb)
