"""driver=nbd, in-process: the connection breaking at the worst moments of a batch.

A batch's commands are issued straight on the libnbd handle (``NbdDriver.batch_io``).  When
the server is gone, libnbd may still *accept* a command: it queues it, tries to send, meets
EPIPE, moves the handle to DEAD -- which aborts every command in flight (their completion
callbacks run with ENOTCONN) and closes the socket -- and returns a cookie, not an error.  The
socket's close takes it out of the event loop's epoll set, so no later event tells the driver
the connection is gone: the driver itself must notice, or the aborted commands sit in its
completed list forever and the guest waits for them (with ``reconnect-delay``: until the
end of time, since nothing re-submits them).

The server is killed and the batch issued *without* running the event loop in between (so
the socket's hang-up is never seen first), which forces the path deterministically."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blocklayer.batch import PENDING, T_READ, T_WRITE, UNSET
from tests.integration.test_nbd_driver import (  # noqa: F401
    NbdServer,
    Servers,
    _image,
    _nbd_node,
    servers,
)
from vhost.ffi import ffi


class FakeBatch:
    """What ``batch_io`` reads of a ``blocklayer.batch.Batch``, over Python buffers: each
    request's ``defer(i)`` completion records its result in ``results[i]``."""

    def __init__(self, ctx: Any, reqs: list[tuple[int, int, bytearray]]) -> None:
        self.ctx = ctx
        self.n = n = len(reqs)
        self.types = ffi.new("int[]", [t for t, _, _ in reqs])
        self.flags = ffi.new("int[]", n)
        self.offsets = ffi.new("uint64_t[]", [o for _, o, _ in reqs])
        self.lengths = ffi.new("uint64_t[]", [len(b) for _, _, b in reqs])
        self.niovs = ffi.new("unsigned[]", [1] * n)
        self.ret = ffi.new("int[]", [UNSET] * n)
        self._keep = [ffi.from_buffer(b) for _, _, b in reqs]
        self._iov = [ffi.new("struct iovec *", {"iov_base": p, "iov_len": len(b)})
                     for p, (_, _, b) in zip(self._keep, reqs, strict=True)]
        self.iovs = ffi.new("struct iovec *[]", self._iov)
        self.results: dict[int, int] = {}

    def defer(self, i: int) -> Callable[[int], None]:
        self.ret[i] = PENDING

        def done(ret: int) -> None:
            assert i not in self.results, f"request {i} completed twice"
            self.results[i] = ret
        return done


def _poll_until(ctx: Any, cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        ctx.aio_poll(True, 0.05)
    return True


def test_batch_write_meets_a_dead_server(tmp_path: Path, servers: Servers) -> None:  # noqa: F811
    """The server dies; the next batch's only write is accepted by libnbd, which then finds
    the connection broken and aborts it: the write waits for the reconnect and completes
    once the server is back (it is never lost, never completed twice)."""
    from blocklayer.aio import AioContext
    from blocklayer.bdrv import bdrv_unref

    img = _image(tmp_path)
    srv = servers.qemu_nbd(img)
    ctx = AioContext("test")
    bs = _nbd_node(srv, "nbdrace0", **{"reconnect-delay": 30})
    drv = bs.drv
    try:
        warm = FakeBatch(ctx, [(T_READ, 0, bytearray(4096))])
        drv.batch_io(warm)  # binds the node to ctx, connection watched there
        assert _poll_until(ctx, lambda: warm.results == {0: 0}, 10), warm.results

        srv.kill()  # the hang-up is in the socket; the loop does not run before the batch
        data = bytearray(b"\x5a" * 4096)
        b = FakeBatch(ctx, [(T_WRITE, 8192, data)])
        drv.batch_io(b)
        srv.start()
        assert _poll_until(ctx, lambda: bool(b.results), 15), (
            "the write was lost: " + repr(drv.query_info()))
        assert b.results == {0: 0} and drv.reconnects == 1
        with open(img, "rb") as f:
            f.seek(8192)
            assert f.read(4096) == bytes(data)
    finally:
        bdrv_unref(bs)
        ctx.close()


def test_server_shutting_down_loses_no_command(tmp_path: Path, servers: Servers) -> None:  # noqa: F811
    """A read fails with ESHUTDOWN (the server says it is going away) while a slow write is
    still in flight on the same connection: the driver gives that connection up for a new
    one.  The write is not lost with the old handle (libnbd would free its callback without
    calling it): it is aborted, waits, and completes on the new connection, as does the
    read once the server stops refusing."""
    from blocklayer.aio import AioContext
    from blocklayer.bdrv import bdrv_unref

    exe = shutil.which("nbdkit")
    if exe is None:
        pytest.fail("nbdkit not found: install it with 'apt-get install nbdkit'")
    refuse = tmp_path / "refuse-reads"
    refuse.touch()
    sock = str(tmp_path / "nbdkit-err.sock")
    srv = NbdServer([exe, "--foreground", "--unix", sock, "--filter=error", "--filter=delay",
                     "memory", "64M", "delay-write=1", "error-pread=ESHUTDOWN",
                     "error-pread-rate=100%", f"error-pread-file={refuse}"],
                    tmp_path, unix=sock)
    servers.started.append(srv)
    ctx = AioContext("test")
    bs = _nbd_node(srv, "nbdrace1", **{"reconnect-delay": 30})
    drv = bs.drv
    try:
        data = bytearray(b"\xa5" * 4096)
        w = FakeBatch(ctx, [(T_WRITE, 0, data)])
        drv.batch_io(w)  # binds the node to ctx; the server holds the write for 1 s
        r = FakeBatch(ctx, [(T_READ, 0, bytearray(4096))])
        drv.batch_io(r)  # refused at once with ESHUTDOWN: the connection is given up
        assert _poll_until(ctx, lambda: drv.reconnects == 1, 10), drv.query_info()
        refuse.unlink()
        assert _poll_until(ctx, lambda: bool(w.results) and bool(r.results), 15), (
            "lost with the old connection: " + repr((w.results, r.results, drv.query_info())))
        assert w.results == {0: 0} and r.results == {0: 0}
    finally:
        bdrv_unref(bs)
        ctx.close()
