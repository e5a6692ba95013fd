"""io_uring per AioContext (QEMU's block/io_uring.c): LuringState.

One ring per AioContext, created lazily in that context's thread.  The ring is shared with the C
request path (``struct pyvu_ring`` in ``vhost/csrc/io_uring.c``): its completion eventfd is a C
handler of the context's poller, which finishes C requests itself (their user_data is a
pointer, so even) and keeps completions of Python requests (odd user_data) for
``_python_work``.  Python requests prepared during one loop iteration are submitted together by
one bottom half (one ``io_uring_enter`` per batch).  Home thread of ``ctx`` only.
"""

from __future__ import annotations

import errno
import itertools
import os
import weakref
from collections.abc import Callable
from typing import Any

from blocklayer.aio import AioContext
from vhost.ffi import check_errno, ffi, lib

OP_READ, OP_WRITE, OP_FSYNC = lib.PYVU_OP_READ, lib.PYVU_OP_WRITE, lib.PYVU_OP_FSYNC
RING_ENTRIES = 256
# Test-only: tiny rings and AIO contexts make the "no room for now" paths of both engines run
# (tests/integration/test_engine_limits.py).  Read once per context, never per request.
_X_URING_ENTRIES = int(os.environ.get("PYVHOST_BLK_X_URING_ENTRIES", "0") or 0)
_X_LAIO_EVENTS = int(os.environ.get("PYVHOST_BLK_X_LAIO_EVENTS", "0") or 0)
REAP_BATCH = 64


class LuringState:
    def __init__(self, ctx: AioContext) -> None:
        self.ctx = ctx
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.ring = ffi.new("struct pyvu_ring *")
        entries = _X_URING_ENTRIES or RING_ENTRIES
        check_errno(lib.pyvu_ring_init(self.ring, entries, self._efd), "io_uring_queue_init")
        self._ring = ffi.addressof(self.ring.u)
        self._pending: dict[int, tuple[Callable[[int], None], Any]] = {}
        self._ids = itertools.count(1)
        self._submit_scheduled = False
        self._ud = ffi.new("uint64_t[]", REAP_BATCH)
        self._res = ffi.new("int[]", REAP_BATCH)
        self.token = lib.PYVU_TOKEN_C | int(ffi.cast("uintptr_t", self.ring))
        ctx.add_c_handler(self._efd, ffi.addressof(self.ring.h), self.token, self._on_completion)

    def submit(
        self, op: int, fd: int, iov: Any, niov: int, offset: int, cb: Callable[[int], None],
        keep: Any = None,
    ) -> None:
        """Queue one request; cb(res) runs in this context when it completes."""
        uid = 2 * next(self._ids) + 1  # odd: a Python request (C requests are pointers)
        ret = lib.pyvu_uring_prep(self._ring, op, fd, iov if iov is not None else ffi.NULL,
                                  niov, offset, uid)
        if ret < 0:
            self.ctx.schedule(cb, ret)
            return
        self._pending[uid] = (cb, keep)
        if not self._submit_scheduled:
            self._submit_scheduled = True
            self.ctx.schedule(self._submit)

    def _submit(self) -> None:
        self._submit_scheduled = False
        ret = lib.pyvu_uring_submit(self._ring)
        if ret < 0 and ret != -errno.EBUSY and ret != -errno.EAGAIN:
            # Nothing was submitted: fail what is pending rather than leave it hanging.
            pending, self._pending = self._pending, {}
            for cb, _ in pending.values():
                cb(ret)

    def _on_completion(self) -> None:
        """Completions of Python requests, collected by the C handler."""
        while True:
            n = lib.pyvu_ring_take_py(self.ring, self._ud, self._res, REAP_BATCH)
            for i in range(n):
                entry = self._pending.pop(self._ud[i], None)
                if entry is not None:
                    entry[0](self._res[i])
            if n < REAP_BATCH:
                break
        if self._pending and not self._submit_scheduled:
            # Requests that did not fit into the submission queue earlier.
            self._submit_scheduled = True
            self.ctx.schedule(self._submit)


_states: weakref.WeakKeyDictionary[AioContext, LuringState] = weakref.WeakKeyDictionary()
_laio: weakref.WeakKeyDictionary[AioContext, Any] = weakref.WeakKeyDictionary()


def laio_get(ctx: AioContext) -> Any:
    """The context's Linux AIO context (``struct pyvu_laio *``) for aio=native on the C path,
    created on first use; its completion eventfd is a C handler.  Home thread of ctx only."""
    st = _laio.get(ctx)
    if st is None:
        st = ffi.new("struct pyvu_laio *")
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        check_errno(lib.pyvu_laio_init(st, efd, _X_LAIO_EVENTS), "io_setup")
        token = lib.PYVU_TOKEN_C | int(ffi.cast("uintptr_t", st))
        ctx.add_c_handler(efd, ffi.addressof(st.h), token, lambda: None)
        _laio[ctx] = st
    return st


def luring_get(ctx: AioContext) -> LuringState:
    """The context's ring (created on first use).  Home thread of ctx only."""
    st = _states.get(ctx)
    if st is None:
        st = LuringState(ctx)
        _states[ctx] = st
    return st
