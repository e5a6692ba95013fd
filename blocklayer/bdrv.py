"""BlockDriverState (a node of the block graph) and the driver interface.

Theory of operation
-------------------
A driver is a handful of callbacks, in nbdkit's spirit: open from options, report the length,
and do asynchronous read/write/flush.  Capability questions (``can_write``) are separate from I/O.
A format or filter driver names its children (``child_roles``: ``file``, ``backing``); the node
links them (``blocklayer/graph.py``: roles, permissions, drain and resize through the graph),
and the driver reaches them as ``self.bs.children[role]``, doing I/O on them through
``blocklayer/io.py``.

A driver may also serve reads, writes and flushes in batches of plain values (``batch_io``,
``blocklayer/batch.py``): the fast way for Python code; without it, each request of a batch
goes through the ``aio_*`` callbacks.

Every I/O callback is called in some AioContext (``ctx``, the caller's) and must eventually call
``cb(ret)`` *in that same context*: ``ret`` is 0 on success or a negative errno.  A driver may
call ``cb`` synchronously from inside the I/O callback; the BlockBackend defers such completions
to a bottom half so users never see a callback before ``blk_aio_*`` returned.

Nodes live in one registry by ``node-name`` (``bdrv_find_node``), as in QEMU.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, NamedTuple

from blocklayer.aio import AioContext
from blocklayer.graph import BdrvChild, bdrv_detach_children
from blocklayer.iov import IOVector
from blocklayer.rmw import RmwTracker
from vhost.ffi import lib

Completion = Callable[[int], None]

# What the C request path can serve end to end (vhost/pyvu.h): nothing (the node graph's
# Python code serves it, in batches), null-co, a file through io_uring, or a file through Linux
# AIO (aio=native).
DRV_NONE, DRV_NULL, DRV_FILE = lib.DRV_NONE, lib.DRV_NULL, lib.DRV_FILE
DRV_FILE_LAIO = lib.DRV_FILE_LAIO

# QEMU's request flags (vhost/pyvu.h: the batch path carries them)
BDRV_REQ_MAY_UNMAP = lib.BDRV_REQ_MAY_UNMAP  # write_zeroes may deallocate instead of writing
BDRV_REQ_FUA = lib.BDRV_REQ_FUA  # the write must be on stable storage before completing


class FastPathInfo(NamedTuple):
    """How the C request path may serve a node (``BlockDriver.fast_path_info``)."""

    kind: int = DRV_NONE  # DRV_*: DRV_NONE keeps every request in Python
    fd: int = -1  # DRV_FILE / DRV_FILE_LAIO: the image's fd
    read_zeroes: bool = False  # DRV_NULL
    no_flush: bool = False
    offset: int = 0  # added to every request's offset (a raw node's ``offset``)


class BlockDriverError(Exception):
    """Opening a node failed; ``str(e)`` is the one line the user sees."""


class BlockDriver:
    """Base class of drivers.  Subclasses set ``format_name`` and ``options``."""

    format_name = ""
    #: option name -> converter(value, name) (keyval strings or JSON values)
    options: dict[str, Callable[[Any, str], Any]] = {}
    #: converter for options not in ``options`` (a plugin's own ``key=value``); None refuses
    other_option: Callable[..., Any] | None = None
    #: child role -> required (a node-name reference or inline options: ``file.driver=...``)
    child_roles: dict[str, bool] = {}
    #: ``batch_io(b: Batch)``: serve parsed reads, writes and flushes many at a time
    #: (blocklayer/batch.py says how to answer each).  None: each goes through ``aio_*``.
    batch_io: Callable[[Any], None] | None = None

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        self.node_name = node_name
        self.bs: BlockDriverState | None = None  # set by the node that owns the driver

    def attach(self, bs: BlockDriverState) -> None:
        """The node exists and its children are linked (``bs.children``): check what needs
        them (e.g. sizes).  Raise BlockDriverError to refuse the node."""
        self.bs = bs

    def limits(self) -> tuple[int, int]:
        """(request alignment, memory alignment) in bytes that the driver's I/O needs: a file
        opened with O_DIRECT probes them (QEMU's raw_probe_alignment); (1, 1) is "any".
        ``blocklayer/io.py`` pads and bounces other requests so drivers never see them."""
        return 1, 1

    def child_perm(self, role: str, perm: int, shared: int) -> tuple[int, int]:
        """What the node needs on child ``role`` and lets others do there, given what the
        node's own parents hold.  Default (formats, filters): the same."""
        return perm, shared

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

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        """Deallocate a range (contents become unspecified).  Default: nothing to do."""
        cb(0)

    def aio_pwrite_zeroes(
        self, ctx: AioContext, offset: int, nbytes: int, flags: int, cb: Completion
    ) -> None:
        """Make a range read as zeroes; BDRV_REQ_MAY_UNMAP allows deallocating it."""
        cb(-errno.ENOTSUP)

    def aio_is_allocated(self, ctx: AioContext, offset: int, nbytes: int,
                         cb: Callable[[int, int], None]) -> None:
        """QEMU's bdrv_is_allocated: whether the bytes from ``offset`` are this node's own —
        their contents decided by this node (data, or zeroes it records) rather than read from
        its backing chain.  ``cb(ret, n)``: ``ret`` 1 (allocated) or 0 (not) holds for the
        first ``n`` bytes, ``0 < n <= nbytes`` (the rest may differ: ask again); ``n`` is 0
        only at or past the end of the node; or ``ret`` < 0 (an errno, ``n`` 0).  Called in
        ``ctx``; ``cb`` runs there, possibly before this returns.  Filters pass the question
        to their child (``FilterDriver``); callers use ``bdrv_aio_is_allocated`` (io.py).
        Default, for drivers without a backing chain: everything is allocated."""
        cb(1, nbytes)

    def fast_path_info(self) -> FastPathInfo:
        """Whether and how the C request path may serve this node (see FastPathInfo).  A
        driver that says nothing is served in Python, so a new driver is always correct."""
        return FastPathInfo()

    def query_info(self) -> dict[str, Any]:
        """Driver-specific fields added to the node's ``query-named-block-nodes`` entry."""
        return {}

    def drained_begin(self) -> None:
        """Main thread: the node's first drained section begins (QEMU's bdrv_drain_begin
        callback): requests the driver holds back (a throttle queue) must go now."""

    def drained_end(self) -> None:
        """Main thread: the node's last drained section ends."""

    def set_perm(self, perm: int, shared: int) -> None:
        """The node's users now hold ``perm`` and share ``shared`` (QEMU's BLK_PERM_* bits).
        Drivers backed by a file lock the image here; raise PermissionError to refuse."""

    def truncate(self, size: int) -> None:
        """Change the length (main thread, node drained).  Raises OSError."""
        raise OSError(errno.ENOTSUP, "Image format driver does not support resize")

    def close(self) -> None:
        pass


class BlockDriverState:
    """One node: a driver instance plus the generic state QEMU keeps per node."""

    def __init__(
        self, node_name: str, drv: BlockDriver, read_only: bool, discard: str = "ignore",
        detect_zeroes: str = "off",
    ) -> None:
        self.node_name = node_name
        self.drv = drv
        self.read_only = read_only
        #: BDRV_O_UNMAP: discard requests reach the driver (QEMU's default is to ignore them)
        self.unmap = discard in ("unmap", "on")
        self.detect_zeroes = detect_zeroes
        self.refcnt = 1
        self.quiesce_counter = 0
        #: who uses this node: BlockBackends (role 'root') and BdrvChild links of other nodes
        self.parents: list[Any] = []
        self.children: dict[str, BdrvChild] = {}  # role -> link
        self.options: dict[str, Any] = {}  # the converted options it was opened with
        drv.bs = self
        #: QEMU's bs->bl.request_alignment / min_mem_alignment (bdrv_refresh_limits)
        self.request_alignment = 1
        self.mem_alignment = 1
        #: serialising read-modify-write ranges of requests padded to request_alignment
        self.rmw = RmwTracker()

    def bdrv_getlength(self) -> int:
        return self.drv.getlength()

    def bdrv_is_read_only(self) -> bool:
        return self.read_only

    @property
    def filename(self) -> str:
        """The image's file name: the driver's own, else its primary child's (as QEMU's
        ``bs->filename`` of a format node is its protocol node's)."""
        own = getattr(self.drv, "filename", "")
        if own:
            return own
        c = self.children.get("file")
        return c.bs.filename if c is not None else ""

    def to_dict(self) -> dict[str, Any]:
        """The main fields of QMP's BlockDeviceInfo (query-named-block-nodes), with its
        ``children`` as in QEMU 8.0+."""
        return {
            "node-name": self.node_name,
            "drv": self.drv.format_name,
            "ro": self.read_only,
            "file": self.filename,
            "children": [{"child": c.role, "node-name": c.bs.node_name}
                         for c in self.children.values()],
            "encrypted": False,
            "detect_zeroes": self.detect_zeroes,
            "write_threshold": 0,
            "image": {"virtual-size": self.bdrv_getlength(),
                      "filename": self.filename,
                      "format": self.drv.format_name},
            "cache": {"writeback": True, "direct": bool(getattr(self.drv, "direct", False)),
                      "no-flush": bool(getattr(self.drv, "no_flush", False))},
            "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
            **self.drv.query_info(),
        }


# -- drain, resize, media: the node side of BdrvChild callbacks ---------------------------
# A node's parents (BlockBackends, BdrvChild links of other nodes) implement
# root_drained_begin/end/poll, root_resize and root_change_media (QEMU's BdrvChildClass).

def bdrv_drained_begin(bs: BlockDriverState) -> None:
    """Main thread: quiesce every parent (they stop submitting new requests)."""
    bs.quiesce_counter += 1
    for parent in list(bs.parents):
        parent.root_drained_begin()
    if bs.quiesce_counter == 1:
        bs.drv.drained_begin()  # e.g. a throttle node lets its queued requests go


def bdrv_drained_end(bs: BlockDriverState) -> None:
    """Main thread: end one drained section; parents resume when the count reaches zero."""
    assert bs.quiesce_counter > 0
    if bs.quiesce_counter == 1:
        bs.drv.drained_end()
    bs.quiesce_counter -= 1
    for parent in list(bs.parents):
        parent.root_drained_end()


def bdrv_drain_poll(bs: BlockDriverState) -> bool:
    """True while some parent still has requests in flight."""
    return any(parent.root_drained_poll() for parent in bs.parents)


def bdrv_drained(bs: BlockDriverState, then: Callable[[], None]) -> None:
    """Main thread: begin a drained section and call ``then()`` once nothing is in flight.
    The caller ends the section with ``bdrv_drained_end``."""
    from blocklayer.aio import aio_wait_until

    bdrv_drained_begin(bs)
    aio_wait_until(lambda: not bdrv_drain_poll(bs), then)


def bdrv_truncate(bs: BlockDriverState, size: int) -> None:
    """Main thread: change the node's length, then tell its parents (resize_cb)."""
    if bs.read_only:
        raise OSError(errno.EACCES, "Image is read-only")
    bs.drv.truncate(size)
    for parent in list(bs.parents):
        parent.root_resize()


def bdrv_refresh_limits(bs: BlockDriverState) -> None:
    """Main thread, after open: the node's alignments are its driver's, and at least its
    children's (a format passes requests down; padding once at the top saves padding twice)."""
    req, mem = bs.drv.limits()
    for c in bs.children.values():
        req, mem = max(req, c.bs.request_alignment), max(mem, c.bs.mem_alignment)
    bs.request_alignment, bs.mem_alignment = req, mem


def bdrv_refresh_above(bs: BlockDriverState) -> None:
    """Main thread, after the graph changed at ``bs``: the alignments of ``bs`` and of every
    node above it, then what the C request path of each BlockBackend above may serve."""
    bdrv_refresh_limits(bs)
    for p in list(bs.parents):
        if isinstance(p, BdrvChild):
            bdrv_refresh_above(p.parent)
        elif hasattr(p, "update_c_state"):
            p.update_c_state()


_drivers: dict[str, type[BlockDriver]] = {}
_nodes: dict[str, BlockDriverState] = {}


def bdrv_register(cls: type[BlockDriver]) -> type[BlockDriver]:
    """Class decorator: make a driver available to ``--blockdev driver=NAME``."""
    _drivers[cls.format_name] = cls
    return cls


_anon_counter = 0


def bdrv_anon_name() -> str:
    """A new '#blockN' node-name, as QEMU names nodes the user did not name."""
    global _anon_counter
    _anon_counter += 1
    return f"#block{_anon_counter}"


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
        bdrv_detach_children(bs)


def close_all_nodes() -> None:
    """Main thread, at exit, after the exports are gone: drop the monitor's reference to every
    node, top nodes first, so each driver's ``close()`` runs (a format writes back its cached
    metadata) and the images are unlocked."""
    done: set[int] = set()
    while True:
        tops = [bs for bs in _nodes.values() if not bs.parents and id(bs) not in done]
        if not tops:
            return
        for bs in tops:
            done.add(id(bs))  # one reference each: the monitor's (never loop on a leak)
            bdrv_unref(bs)
