"""``driver=python``: a disk whose behaviour is a user's Python script (nbdkit's plugin API).

Theory of operation
-------------------
``--blockdev driver=python,node-name=N,script=PATH[,blocking=on][,KEY=VALUE...]``.  The script
is an nbdkit Python plugin (nbdkit-python-plugin(3)), and nbdkit's plugins run unchanged:
``API_VERSION = 2`` callbacks ``open(readonly)``, ``get_size(h)``, ``pread(h, buf, offset,
flags)``, ``pwrite``, ``flush``, ``trim``, ``zero``, the ``can_*`` questions, ``block_size``,
``thread_model``, ``config(key, value)`` / ``config_complete()``, ``close(h)``; version 1
scripts (no ``API_VERSION``: ``pread(h, count, offset)`` returning the data) too.  Every
``KEY=VALUE`` the driver does not know goes to ``config`` in order, as nbdkit's command line
would.  ``docs/plugins.md`` is the user's guide.

*Requests.*  Reads, writes and flushes arrive in batches (``batch_io``, parsed and checked by
C); discard, write-zeroes and requests the generic rules reshape (padding) come one at a time
through ``aio_*``.  Each becomes one plugin call with ``buf`` a writable ``memoryview`` onto
guest memory — no copy — valid only during the call.  A request spread over several guest
buffers becomes one call per buffer, at the matching offsets.

*Where the plugin runs.*  By default in the queue's AioContext, inline: the fastest way, for
plugins that compute or touch memory.  A plugin that blocks (network, disks, sleeps) says so
with ``BLOCKING = True`` in the script, or the user with ``blocking=on``: its calls then run in
a thread pool of the node's own, so it never stalls other exports or other queues.  nbdkit's
thread model is honoured: below ``THREAD_MODEL_PARALLEL`` (nbdkit's default for Python is
``SERIALIZE_ALL_REQUESTS``) one call at a time.

*Errors.*  A callback that raises fails that request: with the errno it ``nbdkit.set_error``-ed,
else the exception's ``errno`` (an ``OSError``), else EIO; the guest sees it through the
export's error policy (``rerror``/``werror``).  The traceback is logged, rate-limited.  A
version-1 ``pread`` that returns fewer bytes than asked fails with EIO.  Problems at open
(a syntax error, a missing ``open``/``get_size``/``pread``, ``config`` refusing a key) are one
line naming the script.

*Capabilities* (nbdkit's defaults): writable if ``pwrite`` exists and ``can_write`` agrees;
flush, trim and zero if defined (and ``can_*`` agrees); ``zero`` raising EOPNOTSUPP falls back
to writing zeroes; FUA is passed as ``nbdkit.FLAG_FUA`` when ``can_fua`` says FUA_NATIVE, else
emulated with a flush.  ``block_size``'s minimum becomes the node's request alignment.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.batch import T_FLUSH, T_READ, T_WRITE, UNSET, Batch
from blocklayer.bdrv import (
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BlockDriver,
    BlockDriverError,
    Completion,
    bdrv_register,
)
from blocklayer.iov import IOVector
from blocklayer.plugins import nbdkit
from blocklayer.plugins.loader import Script, config_value
from blocklayer.qapi import to_bool, to_str
from blocklayer.thread_pool import ThreadPool
from vhost.ffi import ffi

log = logging.getLogger("pyvhost_blk.plugin")


def _views(iov: Any, niov: int) -> list[memoryview]:
    return [memoryview(ffi.buffer(iov[k].iov_base, iov[k].iov_len)) for k in range(niov)]


@bdrv_register
class PythonPluginDriver(BlockDriver):
    format_name = "python"
    options = {"script": to_str, "blocking": to_bool}
    other_option = staticmethod(config_value)

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        if "script" not in opts:
            raise BlockDriverError("Parameter 'script' is missing")
        self.script: str = opts["script"]
        own = {"script", "blocking"}
        from blocklayer.blockdev import COMMON_OPTIONS  # (import cycle at module level)

        config = [(k, v) for k, v in opts.items() if k not in own and k not in COMMON_OPTIONS]
        self.s = Script(self.script, "plugin")
        self.m = m = self.s.m
        for fn in ("open", "get_size", "pread"):
            if not callable(getattr(m, fn, None)):
                raise BlockDriverError(
                    f"Python plugin '{self.script}': the script defines no '{fn}' function")
        self.api = int(getattr(m, "API_VERSION", 1))
        readonly = bool(opts.get("read-only", False))
        self.s.configure(config)
        for fn in ("config_complete", "get_ready", "after_fork"):
            self.s.setup(fn)
        model = self.s.setup("thread_model", default=nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS)
        self.h = self.s.setup("open", readonly)
        self.size = int(self.s.setup("get_size", self.h))
        if self.size < 0:
            raise BlockDriverError(f"Python plugin '{self.script}': get_size returned "
                                   f"{self.size}")
        self.block = self._ask("block_size", (1, 4096, 0xFFFFFFFF))
        self.writable = callable(getattr(m, "pwrite", None)) and not readonly and \
            bool(self._ask("can_write", True))
        self.can_flush = callable(getattr(m, "flush", None)) and bool(self._ask("can_flush",
                                                                              True))
        self.can_trim = callable(getattr(m, "trim", None)) and bool(self._ask("can_trim", True))
        self.can_zero = callable(getattr(m, "zero", None)) and bool(self._ask("can_zero", True))
        fua_default = nbdkit.FUA_EMULATE if self.can_flush else nbdkit.FUA_NONE
        self.fua_native = self._ask("can_fua", fua_default) == nbdkit.FUA_NATIVE
        self.blocking = bool(opts.get("blocking", getattr(m, "BLOCKING", False)))
        serialized = model != nbdkit.THREAD_MODEL_PARALLEL
        self._lock: AbstractContextManager[Any] = (threading.Lock() if serialized
                                                   else nullcontext())
        self._pool = ThreadPool(1 if serialized else 16) if self.blocking else None
        self._bind()

    # -- open (main thread) -------------------------------------------------------------------
    def _ask(self, fn: str, default: Any) -> Any:
        return self.s.setup(fn, self.h, default=default)

    def _bind(self) -> None:
        """The per-request calls, with the API version and FUA mode folded in once."""
        m, h = self.m, self.h
        if self.api >= 2:
            pread = m.pread

            def read(buf: memoryview, off: int) -> None:
                pread(h, buf, off, 0)

            pwrite = getattr(m, "pwrite", None)

            def write(buf: memoryview, off: int, fua: int) -> None:
                pwrite(h, buf, off, fua)
        else:
            def read(buf: memoryview, off: int) -> None:
                data = m.pread(h, len(buf), off)
                if len(data) != len(buf):
                    nbdkit.set_error(errno.EIO)
                    raise OSError(errno.EIO, f"pread returned {len(data)} bytes of {len(buf)}")
                buf[:] = data

            def write(buf: memoryview, off: int, fua: int) -> None:
                m.pwrite(h, buf, off)

        self._read, self._write = read, write

    # -- what the node is ----------------------------------------------------------------------
    def getlength(self) -> int:
        return self.size

    def can_write(self) -> bool:
        return self.writable

    def limits(self) -> tuple[int, int]:
        try:
            minimum = int(self.block[0])
        except (TypeError, ValueError, IndexError):
            minimum = 1
        return (minimum if minimum > 0 and minimum & (minimum - 1) == 0 else 1), 1

    def close(self) -> None:
        self.s.teardown((("close", (self.h,)), ("cleanup", ()), ("unload", ())))

    # -- one request (in the caller's thread) --------------------------------------------------
    def _flush_call(self) -> None:
        if self.can_flush:
            self.m.flush(self.h, 0) if self.api >= 2 else self.m.flush(self.h)

    def _rw(self, is_write: bool, views: list[memoryview], offset: int, flags: int) -> int:
        """Read or write one request (its buffers in order) under the thread model's lock."""
        try:
            with self._lock:
                return self._rw_locked(is_write, views, offset, flags)
        except BaseException as e:  # noqa: BLE001 - user code: never into C, never lost
            return self.s.fail("pwrite" if is_write else "pread", e)

    def _rw_locked(self, is_write: bool, views: list[memoryview], offset: int,
                   flags: int) -> int:
        pos = offset
        if is_write:
            if not self.writable:
                return -errno.EROFS
            fua = nbdkit.FLAG_FUA if flags & BDRV_REQ_FUA and self.fua_native else 0
            for v in views:
                self._write(v, pos, fua)
                pos += len(v)
            if flags & BDRV_REQ_FUA and not self.fua_native:
                self._flush_call()
        else:
            for v in views:
                self._read(v, pos)
                pos += len(v)
        return 0

    def _flush(self) -> int:
        try:
            with self._lock:
                self._flush_call()
            return 0
        except BaseException as e:  # noqa: BLE001
            return self.s.fail("flush", e)

    def _trim(self, offset: int, nbytes: int) -> int:
        if not self.can_trim:
            return 0  # discard is advisory
        try:
            with self._lock:
                if self.api >= 2:
                    self.m.trim(self.h, nbytes, offset, 0)
                else:
                    self.m.trim(self.h, nbytes, offset)
            return 0
        except BaseException as e:  # noqa: BLE001
            return self.s.fail("trim", e)

    def _zero(self, offset: int, nbytes: int, flags: int) -> int:
        if not self.can_zero:
            return -errno.ENOTSUP  # blocklayer/io.py writes zeroed buffers instead
        may_trim = bool(flags & BDRV_REQ_MAY_UNMAP)
        try:
            with self._lock:
                if self.api >= 2:
                    f = nbdkit.FLAG_MAY_TRIM if may_trim else 0
                    if flags & BDRV_REQ_FUA and self.fua_native:
                        f |= nbdkit.FLAG_FUA
                    self.m.zero(self.h, nbytes, offset, f)
                else:
                    self.m.zero(self.h, nbytes, offset, may_trim)
                if flags & BDRV_REQ_FUA and not self.fua_native:
                    self._flush_call()
            return 0
        except BaseException as e:  # noqa: BLE001
            err = self.s.fail("zero", e)
            return -errno.ENOTSUP if err in (-errno.EOPNOTSUPP, -errno.ENOTSUP) else err

    def _run(self, ctx: AioContext, fn: Callable[[], int], cb: Completion) -> None:
        """Inline, or in the node's own threads for a blocking plugin; ``cb`` in ``ctx``."""
        if self._pool is not None:
            self._pool.submit(ctx, fn, cb)
        else:
            cb(fn())

    # -- batches (the queue's AioContext) --------------------------------------------------------
    def batch_io(self, b: Batch) -> None:
        types, ret, offs, iovs, niovs, flags = b.types, b.ret, b.offsets, b.iovs, b.niovs, b.flags
        if self._pool is not None:
            for i in range(b.n):
                if ret[i] == UNSET:
                    self._submit_one(b, i)
            return
        # Inline: one lock for the whole batch, and a request in one guest buffer (the usual
        # case) goes straight to the plugin (API 2: no adapter in between).  The arrays are
        # read into Python lists with one call each (indexing C arrays costs per element).
        buffer, h, m, n, unpack = ffi.buffer, self.h, self.m, b.n, ffi.unpack
        v2 = self.api >= 2
        read, write = (m.pread, getattr(m, "pwrite", None)) if v2 else (self._read, self._write)
        plain_write = self.writable
        tl, rl, ol = unpack(types, n), unpack(ret, n), unpack(offs, n)
        nl, fl, il = unpack(niovs, n), unpack(flags, n), unpack(iovs, n)
        with self._lock:
            for i in range(n):
                if rl[i] != UNSET:
                    continue
                t = tl[i]
                try:
                    if nl[i] == 1 and (t == T_READ or (t == T_WRITE and plain_write
                                                       and not fl[i])):
                        v = il[i]
                        buf = memoryview(buffer(v.iov_base, v.iov_len))
                        if t == T_READ:
                            if v2:
                                read(h, buf, ol[i], 0)
                            else:
                                read(buf, ol[i])
                        elif v2:
                            write(h, buf, ol[i], 0)
                        else:
                            write(buf, ol[i], 0)
                        rl[i] = 0
                    elif t == T_READ or t == T_WRITE:
                        rl[i] = self._rw_locked(t == T_WRITE, _views(il[i], nl[i]), ol[i],
                                                fl[i])
                    elif t == T_FLUSH:
                        self._flush_call()
                        rl[i] = 0
                    else:
                        rl[i] = -errno.ENOTSUP
                except BaseException as e:  # noqa: BLE001 - user code: never into C
                    rl[i] = self.s.fail("pwrite" if t == T_WRITE else
                                       "flush" if t == T_FLUSH else "pread", e)
        ret[0:n] = rl

    def _submit_one(self, b: Batch, i: int) -> None:
        t, off, fl = b.types[i], b.offsets[i], b.flags[i]
        views = _views(b.iovs[i], b.niovs[i]) if t != T_FLUSH else []
        if t == T_FLUSH:
            fn: Callable[[], int] = self._flush
        else:
            def fn() -> int:
                return self._rw(t == T_WRITE, views, off, fl)
        self._run(b.ctx, fn, b.defer(i))

    # -- single requests -------------------------------------------------------------------------
    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        views = qiov.buffers()
        self._run(ctx, lambda: self._rw(False, views, offset, 0), cb)

    def aio_pwritev(self, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
                    cb: Completion) -> None:
        views = qiov.buffers()
        self._run(ctx, lambda: self._rw(True, views, offset, flags), cb)

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        self._run(ctx, self._flush, cb)

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        self._run(ctx, lambda: self._trim(offset, nbytes), cb)

    def aio_pwrite_zeroes(self, ctx: AioContext, offset: int, nbytes: int, flags: int,
                          cb: Completion) -> None:
        self._run(ctx, lambda: self._zero(offset, nbytes, flags), cb)
