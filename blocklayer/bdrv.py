"""BlockDriverState (a node of the block graph) and the driver interface.

Theory of operation
-------------------
A driver is a handful of callbacks, in nbdkit's spirit: open from options, report the length,
and do asynchronous read/write/flush.  Capability questions (``can_write``) are separate from I/O.

Every I/O callback is called in some AioContext (``ctx``, the caller's) and must eventually call
``cb(ret)`` *in that same context*: ``ret`` is 0 on success or a negative errno.  A driver may
call ``cb`` synchronously from inside the I/O callback; the BlockBackend defers such completions
to a bottom half so users never see a callback before ``blk_aio_*`` returned.

Nodes live in one registry by ``node-name`` (``bdrv_find_node``), as in QEMU.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.iov import IOVector

Completion = Callable[[int], None]

BDRV_REQ_FUA = 0x10  # QEMU's flag value: write must be on stable storage before completing


class BlockDriverError(Exception):
    """Opening a node failed; ``str(e)`` is the one line the user sees."""


class BlockDriver:
    """Base class of drivers.  Subclasses set ``format_name`` and ``options``."""

    format_name = ""
    #: option name -> converter(value, name) (keyval strings or JSON values)
    options: dict[str, Callable[[Any, str], Any]] = {}

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        self.node_name = node_name

    def getlength(self) -> int:
        raise NotImplementedError

    def can_write(self) -> bool:
        return True

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        cb(-errno.ENOTSUP)

    def aio_pwritev(
        self, ctx: AioContext, offset: int, qiov: IOVector, flags: int, cb: Completion
    ) -> None:
        cb(-errno.ENOTSUP)

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        cb(0)

    def close(self) -> None:
        pass


class BlockDriverState:
    """One node: a driver instance plus the generic state QEMU keeps per node."""

    def __init__(self, node_name: str, drv: BlockDriver, read_only: bool) -> None:
        self.node_name = node_name
        self.drv = drv
        self.read_only = read_only
        self.refcnt = 1
        self.parents: list[Any] = []  # BlockBackends attached to this node

    def bdrv_getlength(self) -> int:
        return self.drv.getlength()

    def bdrv_is_read_only(self) -> bool:
        return self.read_only

    def to_dict(self) -> dict[str, Any]:
        return {
            "node-name": self.node_name,
            "drv": self.drv.format_name,
            "ro": self.read_only,
            "virtual-size": self.bdrv_getlength(),
        }


_drivers: dict[str, type[BlockDriver]] = {}
_nodes: dict[str, BlockDriverState] = {}


def bdrv_register(cls: type[BlockDriver]) -> type[BlockDriver]:
    """Class decorator: make a driver available to ``--blockdev driver=NAME``."""
    _drivers[cls.format_name] = cls
    return cls


def bdrv_find_node(node_name: str) -> BlockDriverState | None:
    return _nodes.get(node_name)


def bdrv_nodes() -> list[BlockDriverState]:
    return list(_nodes.values())


def bdrv_unref(bs: BlockDriverState) -> None:
    """Drop a reference; the last one closes the driver and forgets the node."""
    bs.refcnt -= 1
    if bs.refcnt == 0:
        bs.drv.close()
        if _nodes.get(bs.node_name) is bs:
            del _nodes[bs.node_name]
