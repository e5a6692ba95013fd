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
from vhost.ffi import ffi

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
    """Handlers that live as long as the process: the context's io_uring and the main loop's
    aio_wait eventfd."""
    from blocklayer import aio

    st = io_uring._states.get(ctx)
    allowed = {st.token} if st is not None else set()
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
