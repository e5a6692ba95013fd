"""Shared fixtures for the unit tests.

Global state touched by these tests, and how it is restored:

* ``qemu_get_aio_context()`` is a process-wide singleton.  The ``main_ctx`` fixture runs it dry
  after each test and checks that no bottom half is left and that the test removed every fd
  handler it added (the main context's io_uring completion eventfd, which lives as long as the
  context, is allowed).
* Block nodes live in ``blocklayer.bdrv._nodes`` by node-name; ``make_node`` gives each test
  unique names and closes/forgets the nodes at teardown.  ``make_blk`` drops the BlockBackends.
"""

from __future__ import annotations

import itertools
import os
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

from blocklayer import bdrv, io_uring
from blocklayer.aio import AioContext, qemu_get_aio_context
from blocklayer.bdrv import BlockDriverState
from blocklayer.block_backend import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_WRITE,
    BlockBackend,
    blk_insert_bs,
    blk_new,
    blk_unref,
)
from blocklayer.blockdev import blockdev_add
from vhost.ffi import ffi, lib
from virtio.constants import VirtioBlkStatus, VirtioBlkType

# virtio-blk statuses and request types as plain ints, for the request tests
OK, IOERR, UNSUPP = int(VirtioBlkStatus.OK), int(VirtioBlkStatus.IOERR), int(VirtioBlkStatus.UNSUPP)
T_IN, T_OUT, T_FLUSH = int(VirtioBlkType.IN), int(VirtioBlkType.OUT), int(VirtioBlkType.FLUSH)

_names = itertools.count()


def unique(prefix: str = "n") -> str:
    """A node name / id no other test uses."""
    return f"{prefix}{os.getpid() % 1000}x{next(_names)}"


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, sector-distinguishable bytes: byte i of sector s is (i*7 + s*13 + seed)."""
    return bytes(((i % 512) * 7 + (i // 512) * 13 + seed) & 0xFF for i in range(size))


def run_until(
    cond: Callable[[], bool], ctx: AioContext | None = None, timeout: float = 5.0
) -> None:
    """Run ``ctx`` (default: the main context) until ``cond()``; fail after ``timeout`` s."""
    ctx = ctx or qemu_get_aio_context()
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the AioContext")
        ctx.aio_poll(blocking=True, timeout=0.05)


def drain_bhs(ctx: AioContext | None = None) -> None:
    """Run pending bottom halves until there is no more progress."""
    ctx = ctx or qemu_get_aio_context()
    for _ in range(100):
        if not ctx.aio_poll(blocking=False):
            return


def _allowed_fds(ctx: AioContext) -> set[int]:
    """Handlers that live as long as the process: the context's io_uring and Linux AIO
    engines (a vhost-user queue creates both) and the main loop's aio_wait eventfd."""
    from blocklayer import aio

    st = io_uring._states.get(ctx)
    allowed = {st.token} if st is not None else set()
    laio = io_uring._laio.get(ctx)
    if laio is not None:
        allowed.add(lib.PYVU_TOKEN_C | int(ffi.cast("uintptr_t", laio)))
    if aio._wait_efd >= 0:
        allowed.add(aio._wait_efd)
    return allowed


@pytest.fixture
def main_ctx():
    ctx = qemu_get_aio_context()
    drain_bhs(ctx)
    before = set(ctx._handlers)
    yield ctx
    drain_bhs(ctx)
    assert not ctx._bh, "test left bottom halves pending in the main AioContext"
    leaked = set(ctx._handlers) - before - _allowed_fds(ctx)
    assert not leaked, f"test left fd handlers in the main AioContext: {leaked}"


@pytest.fixture
def make_node():
    """make_node({...options without node-name...}) -> BlockDriverState (unique node-name)."""
    created: list[BlockDriverState] = []

    def make(opts: dict[str, Any], name: str | None = None) -> BlockDriverState:
        tree = dict(opts)
        tree["node-name"] = name or unique("node")
        bs = blockdev_add(tree)
        created.append(bs)
        return bs

    yield make
    for bs in created:
        forget_node(bs)


def forget_node(bs: BlockDriverState) -> None:
    if bdrv._nodes.get(bs.node_name) is bs:
        del bdrv._nodes[bs.node_name]
    bs.drv.close()


@pytest.fixture
def make_blk(main_ctx):
    """make_blk(bs, writable=True) -> BlockBackend in the main context, dropped at teardown."""
    created: list[BlockBackend] = []

    def make(bs: BlockDriverState | None, writable: bool = True) -> BlockBackend:
        perm = BLK_PERM_CONSISTENT_READ | (BLK_PERM_WRITE if writable else 0)
        blk = blk_new(main_ctx, perm, BLK_PERM_ALL)
        if bs is not None:
            blk_insert_bs(blk, bs)
        created.append(blk)
        return blk

    yield make
    drain_bhs(main_ctx)
    for blk in created:
        while blk.refcnt > 0:
            blk_unref(blk)


@pytest.fixture
def image(tmp_path):
    """image(size or data) -> path of a file with pattern() contents (or the given bytes)."""

    def make(content: int | bytes, name: str = "disk.img") -> str:
        data = pattern(content) if isinstance(content, int) else content
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)

    return make


# -- fake virtqueue elements ----------------------------------------------------------------
class Sg:
    """A C ``struct iovec[]`` over fresh C buffers (kept alive by this object)."""

    def __init__(self, chunks: list[bytes | int]) -> None:
        """Each chunk is the initial contents (bytes) or a size (int, filled with 0xEE)."""
        self.bufs = []
        self.iov = ffi.new("struct iovec[]", max(len(chunks), 1))
        self.num = len(chunks)
        for i, c in enumerate(chunks):
            data = c if isinstance(c, bytes) else b"\xee" * c
            buf = ffi.new("char[]", max(len(data), 1))
            ffi.memmove(buf, data, len(data))
            self.bufs.append(buf)
            self.iov[i].iov_base = buf
            self.iov[i].iov_len = len(data)

    def chunk(self, i: int) -> bytes:
        return ffi.unpack(self.bufs[i], self.iov[i].iov_len)

    def data(self) -> bytes:
        return b"".join(self.chunk(i) for i in range(self.num))


def outhdr(rtype: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, ioprio, sector)


class Done:
    """A ``done(status, in_len)`` recorder."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, status: int, in_len: int) -> None:
        self.calls.append((status, in_len))

    @property
    def called(self) -> bool:
        return bool(self.calls)

    @property
    def result(self) -> tuple[int, int]:
        assert len(self.calls) == 1, f"done called {len(self.calls)} times: {self.calls}"
        return self.calls[0]


# -- a real vhost-user connection in this process ----------------------------------------------
def in_thread(fn: Callable[[], Any], ctx: AioContext | None = None, timeout: float = 10.0) -> Any:
    """Run ``fn()`` (a blocking frontend call) in a thread while the main context runs: the
    server answers vhost-user messages in this thread's main loop."""
    import threading

    out: list[tuple[str, Any]] = []

    def call() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out.append(("err", e))

    t = threading.Thread(target=call, daemon=True)
    t.start()
    run_until(lambda: not t.is_alive(), ctx, timeout)
    t.join()
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


class BlkRig:
    """A VhostUserBlkExport behind a real VuServer in this process (the main AioContext), and
    the test frontend connected to it: every request goes the way a guest's does, through the
    C queue loop (vhost/csrc/virtio_blk_queue.c) and, for what C does not serve, the node
    graph."""

    def __init__(self, exp: Any, path: str) -> None:
        from tests.frontend.vhost_user import VhostUserFrontend, Virtqueue
        from vhost.server import VuServer, listen_unix

        self.exp = exp
        self.server = VuServer(exp.id, exp, listen_unix(path), path)
        exp.attach_server(self.server)
        self.fe = in_thread(lambda: VhostUserFrontend(path))
        self.qs: list[Virtqueue] = in_thread(
            lambda: self.fe.setup(num_queues=exp.num_queues, queue_size=64))
        self.q = self.qs[0]
        run_until(lambda: self.server.conn is not None and all(
            q.started for q in self.server.conn.queues))

    def submit(self, out: list[bytes], inp: list[int], queue: int = 0) -> Any:
        """A chain of driver-readable buffers ``out`` and device-writable buffers of the sizes
        ``inp`` (poisoned; the last byte of the last one STATUS_UNSET), published and kicked
        on queue ``queue``."""
        from tests.frontend.vhost_user import STATUS_UNSET, Segment

        q = self.qs[queue]
        segs = [Segment(q.buffer(c), len(c), False) for c in out]
        segs += [Segment(q.buffer(length=n), n, True) for n in inp]
        if inp:
            last = segs[-1]
            q.mem.write(last.addr + last.length - 1, bytes([STATUS_UNSET]))
        req = q.add_chain(segs)
        q.kick()
        return req

    def wait(self, req: Any, timeout: float = 5.0) -> None:
        run_until(lambda: bool(req.vq.harvest() or True) and req.done, timeout=timeout)

    def complete(self, out: list[bytes], inp: list[int] | None = None) -> tuple[Any, Any]:
        """Submit, wait; (status byte, used length)."""
        req = self.submit(out, [1] if inp is None else inp)
        self.wait(req)
        return req.status, req.used_len

    def close(self) -> None:
        self.fe.close()
        run_until(lambda: self.server.conn is None)
        self.server.stop_listening()


@pytest.fixture
def make_rig(main_ctx, tmp_path):
    """make_rig(export) -> BlkRig (the frontend is gone and the socket closed at teardown)."""
    rigs: list[BlkRig] = []

    def make(exp: Any) -> BlkRig:
        rig = BlkRig(exp, str(tmp_path / f"{unique('vu')}.sock"))
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        rig.close()
    drain_bhs(main_ctx)


@pytest.fixture
def export_rig(main_ctx, tmp_path):
    """export_rig(bs, writable=True, lbs=512, contexts=None, id="exp", num_queues=1, **kw)
    -> BlkRig over a new VhostUserBlkExport (queues in the main context unless ``contexts``)
    on node ``bs``; disconnected and deleted at teardown."""
    from virtio.blk_export import VhostUserBlkExport

    made: list[BlkRig] = []

    def make(bs: BlockDriverState, writable: bool = True, lbs: int = 512,
             contexts: list[AioContext] | None = None, id: str = "exp", num_queues: int = 1,
             **kw: Any) -> BlkRig:
        exp = VhostUserBlkExport(id, bs, writable, num_queues, lbs, contexts or [], **kw)
        try:
            rig = BlkRig(exp, str(tmp_path / f"{unique('vu')}.sock"))
        except BaseException:
            exp.delete()
            raise
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()
    drain_bhs(main_ctx)
    for rig in made:
        rig.exp.delete()
