"""``driver=python-filter``: a user's Python script between a node and its ``file`` child.

Theory of operation
-------------------
``--blockdev driver=python-filter,node-name=F,script=PATH,file=NODE[,KEY=VALUE...]``.  In
nbdkit filters' spirit, the script defines only what it changes; every callback it leaves
out passes straight through to the child.  Callbacks receive ``next``, the child node::

    async def pread(next, h, buf, offset, flags):
        await next.pread(buf, offset)           # the child's data, into buf
        ...                                     # look at it, change it, or raise
    async def pwrite(next, h, buf, offset, flags):    await next.pwrite(buf, offset, flags)
    async def flush(next, h, flags):                  await next.flush()
    async def trim(next, h, count, offset, flags):    await next.trim(count, offset)
    async def zero(next, h, count, offset, flags):    await next.zero(count, offset, flags)
    def get_size(next, h): return next.get_size()
    def open(next, readonly): return handle          # optional, default None
    def config(key, value), config_complete(), close(h)

``await next.X(...)`` starts the child's I/O and resumes the callback when it completes (no
thread, no asyncio: the coroutine is driven by the node's completions, in the queue's
AioContext); a failure raises ``OSError`` with its errno.  A plain ``def`` callback works too
when it does not call ``next``.  Errors are mapped as for plugins (``nbdkit.set_error``,
``OSError.errno``, else EIO) and logged rate-limited.  ``buf`` is a memoryview onto guest
memory, valid until the callback finishes.  ``docs/plugins.md`` has the guide and examples.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.bdrv import BlockDriverError, BlockDriverState, Completion, bdrv_register
from blocklayer.drivers.filter import FilterDriver
from blocklayer.io import (
    bdrv_aio_flush,
    bdrv_aio_pdiscard,
    bdrv_aio_preadv,
    bdrv_aio_pwrite_zeroes,
    bdrv_aio_pwritev,
)
from blocklayer.iov import IOVector
from blocklayer.plugins.loader import Script, config_value
from blocklayer.qapi import to_str
from blocklayer.ratelimit import log_exception_limited

log = logging.getLogger("pyvhost_blk.plugin")

Start = Callable[[Completion], None]


class _ChildIO:
    """What ``await next.pread(...)`` waits for: ``start(cb)`` submits the child's I/O."""

    __slots__ = ("start",)

    def __init__(self, start: Start) -> None:
        self.start = start

    def __await__(self) -> Any:
        ret = yield self
        return ret


class Next:
    """The child node as a filter's callbacks see it (in the request's AioContext)."""

    __slots__ = ("bs", "ctx")

    def __init__(self, bs: BlockDriverState, ctx: AioContext | None) -> None:
        self.bs, self.ctx = bs, ctx

    def get_size(self) -> int:
        return self.bs.bdrv_getlength()

    def pread(self, buf: Any, offset: int, flags: int = 0) -> _ChildIO:
        qiov = IOVector.from_buffers([buf])
        return _ChildIO(lambda cb: bdrv_aio_preadv(self.bs, self.ctx, offset, qiov, cb))

    def pwrite(self, buf: Any, offset: int, flags: int = 0) -> _ChildIO:
        qiov = IOVector.from_buffers([buf])
        return _ChildIO(lambda cb: bdrv_aio_pwritev(self.bs, self.ctx, offset, qiov,
                                                     flags, cb))

    def flush(self, flags: int = 0) -> _ChildIO:
        return _ChildIO(lambda cb: bdrv_aio_flush(self.bs, self.ctx, cb))

    def trim(self, count: int, offset: int, flags: int = 0) -> _ChildIO:
        return _ChildIO(lambda cb: bdrv_aio_pdiscard(self.bs, self.ctx, offset, count, cb))

    def zero(self, count: int, offset: int, flags: int = 0) -> _ChildIO:
        return _ChildIO(lambda cb: bdrv_aio_pwrite_zeroes(self.bs, self.ctx, offset, count,
                                                           flags, cb))


@bdrv_register
class PythonFilterDriver(FilterDriver):
    format_name = "python-filter"
    options = {"script": to_str}
    other_option = staticmethod(config_value)

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        super().__init__(node_name, opts)
        if "script" not in opts:
            raise BlockDriverError("Parameter 'script' is missing")
        self.script: str = opts["script"]
        from blocklayer.blockdev import COMMON_OPTIONS  # (import cycle at module level)

        self.s = Script(self.script, "filter")
        self.m = m = self.s.m
        self._readonly = bool(opts.get("read-only", False))
        self.s.configure((k, v) for k, v in opts.items()
                         if k != "script" and k not in COMMON_OPTIONS)
        self.s.setup("config_complete")
        self.h: Any = None
        self.fns = {fn: getattr(m, fn) for fn in ("pread", "pwrite", "flush", "trim", "zero")
                    if callable(getattr(m, fn, None))}

    def attach(self, bs: BlockDriverState) -> None:
        super().attach(bs)
        self.h = self.s.setup("open", Next(self.file, None), self._readonly)

    def getlength(self) -> int:
        f = getattr(self.m, "get_size", None)
        if not callable(f):
            return super().getlength()
        try:
            return int(f(Next(self.file, None), self.h))
        except BaseException:  # noqa: BLE001
            log_exception_limited(log, "Python filter '%s': get_size failed", self.script)
            return super().getlength()

    def close(self) -> None:
        self.s.teardown((("close", (self.h,)), ("unload", ())))

    # -- running a callback (the request's AioContext) -------------------------------------------
    def _call(self, what: str, ctx: AioContext, cb: Completion, *args: Any) -> None:
        """Run the script's ``what`` with ``next`` first; drive it if it is a coroutine."""
        try:
            res = self.fns[what](Next(self.file, ctx), self.h, *args)
        except BaseException as e:  # noqa: BLE001 - user code: never lost, never raised on
            cb(self.s.fail(what, e))
            return
        if not hasattr(res, "send"):
            cb(0)
            return
        coro = res

        def step(value: Any, exc: BaseException | None) -> None:
            while True:
                try:
                    io = coro.throw(exc) if exc is not None else coro.send(value)
                except StopIteration:
                    cb(0)
                    return
                except BaseException as e:  # noqa: BLE001
                    cb(self.s.fail(what, e))
                    return
                if not isinstance(io, _ChildIO):
                    value, exc = None, TypeError(
                        "a filter may only await next.pread/pwrite/flush/trim/zero")
                    continue
                # state[0]: still inside start(); a completion then only records its result
                # and this loop goes on (no recursion); later ones resume the coroutine.
                state: list[Any] = [True, None]

                def done(ret: int, state: list[Any] = state) -> None:
                    if state[0]:
                        state[1] = ret
                    else:
                        resume(ret)

                io.start(done)
                state[0] = False
                if state[1] is None:
                    return
                value, exc = _result(state[1])

        def resume(ret: int) -> None:
            step(*_result(ret))

        step(None, None)

    # -- requests ---------------------------------------------------------------------------------
    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        if "pread" not in self.fns:
            return super().aio_preadv(ctx, offset, qiov, cb)
        self._each_buffer("pread", ctx, qiov, offset, 0, cb)

    def aio_pwritev(self, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
                    cb: Completion) -> None:
        if "pwrite" not in self.fns:
            return super().aio_pwritev(ctx, offset, qiov, flags, cb)
        self._each_buffer("pwrite", ctx, qiov, offset, flags, cb)

    def _each_buffer(self, what: str, ctx: AioContext, qiov: IOVector, offset: int,
                     flags: int, cb: Completion) -> None:
        """One callback per guest buffer, in order, at the matching offsets."""
        views = qiov.buffers()

        def go(k: int, pos: int, ret: int) -> None:
            if ret < 0 or k == len(views):
                cb(ret)
                return
            v = views[k]
            self._call(what, ctx, lambda r: go(k + 1, pos + len(v), r), v, pos, flags)

        go(0, offset, 0)

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        if "flush" not in self.fns:
            return super().aio_flush(ctx, cb)
        self._call("flush", ctx, cb, 0)

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        if "trim" not in self.fns:
            return super().aio_pdiscard(ctx, offset, nbytes, cb)
        self._call("trim", ctx, cb, nbytes, offset, 0)

    def aio_pwrite_zeroes(self, ctx: AioContext, offset: int, nbytes: int, flags: int,
                          cb: Completion) -> None:
        if "zero" not in self.fns:
            return super().aio_pwrite_zeroes(ctx, offset, nbytes, flags, cb)
        self._call("zero", ctx, cb, nbytes, offset, flags)


def _result(ret: int) -> tuple[Any, BaseException | None]:
    if ret < 0:
        return None, OSError(-ret, os.strerror(-ret))
    return None, None
