"""IOThread: a thread running one AioContext (QEMU's ``--object iothread,id=...``).

The GIL is released whenever the loop waits in epoll, and by every blocking system call the
drivers make, so iothreads overlap their waiting and their I/O.
"""

from __future__ import annotations

import threading

from blocklayer.aio import DEFAULT_POLL_MAX_NS, AioContext


class IOThread:
    """``--object iothread,id=ID[,poll-max-ns=N,...]``: one thread, one AioContext."""

    def __init__(self, id: str, poll_max_ns: int = DEFAULT_POLL_MAX_NS) -> None:
        self.id = id
        self.poll_max_ns = poll_max_ns
        self.ctx = AioContext(id)
        self.ctx.set_poll_max_ns(poll_max_ns)
        self._thread = threading.Thread(target=self.ctx.run, name=f"iothread-{id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and join the thread.  Main thread."""
        self.ctx.stop()
        self._thread.join(timeout=10)

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident

    @property
    def native_id(self) -> int:
        """The kernel's thread id (QMP query-iothreads' thread-id)."""
        return self._thread.native_id or 0
