"""``driver=throttle``: QEMU's throttle filter (``block/throttle.c``).

``--object throttle-group,id=G,limits.iops-total=N --blockdev driver=throttle,node-name=t,
throttle-group=G,file=NODE``: every read, write, write-zeroes and discard that passes through the
node waits for its turn under the group's limits (``blocklayer/throttle_group.py``); flushes
pass at once, as in QEMU.  Several throttle nodes naming one group share its limits and take
turns in round robin.  The group must exist when the node is opened; QMP
``block_set_io_throttle`` (``pyvhost_blk/qmp_filters.py``) changes its limits or moves the node
to another group, and ``limits`` may be changed with ``qom-set`` on the group.

Theory of operation
-------------------
The node is a ``ThrottleGroupMember``.  A request calls ``intercept(ctx, nbytes, direction,
go)``, where ``go`` passes it to the ``file`` child; ``go`` runs at once or later, always in the
request's AioContext, so the child completes it there as the block layer requires.  Nothing
blocks: a throttled export's waiting requests sit in a queue while the iothread serves other
exports.  A node whose member has no group (limits switched off by ``block_set_io_throttle``
with every limit 0) passes everything straight down.

A throttle node declares no C path: the export serves its requests in Python (batches of
parsed requests go through ``aio_*`` one by one).

Drains: while the node is drained, requests do not wait for the limits (QEMU's
``throttle_co_drain_begin``), so a drain does not take the queue's length at the configured
rate.  The group notices a drained node (``bs.quiesce_counter``) when the member's timer next
fires, and flushes its queue then; ``drained_begin``/``drained_end`` do it at once, if the
block layer calls a driver's drain hooks (see docs/filters.md).

Threads: I/O callbacks in the request's AioContext (several at once for a multiqueue export);
open, close, drain hooks and ``block_device_info`` in the main thread.
"""

from __future__ import annotations

from typing import Any

from blocklayer.aio import AioContext
from blocklayer.bdrv import BlockDriverError, Completion, bdrv_register
from blocklayer.drivers.filter import FilterDriver
from blocklayer.io import (
    bdrv_aio_pdiscard,
    bdrv_aio_preadv,
    bdrv_aio_pwrite_zeroes,
    bdrv_aio_pwritev,
)
from blocklayer.iov import IOVector
from blocklayer.qapi import to_str
from blocklayer.throttle_group import (
    READ,
    WRITE,
    ThrottleGroupMember,
    throttle_group_find,
    throttle_group_register_tgm,
    throttle_group_unregister_tgm,
)


@bdrv_register
class ThrottleFilter(FilterDriver):
    format_name = "throttle"
    batch_io = None  # every request through aio_*: never FilterDriver.batch_forward
    options = {"throttle-group": to_str}

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        """Main thread: join the group (which must exist, as in QEMU)."""
        super().__init__(node_name, opts)
        name = opts.get("throttle-group")
        if name is None:
            raise BlockDriverError("Parameter 'throttle-group' is missing")
        if throttle_group_find(name) is None:
            raise BlockDriverError(f"Throttle group '{name}' does not exist")
        self.tgm = ThrottleGroupMember(node_name)
        self.tgm.is_drained = self._is_drained
        throttle_group_register_tgm(self.tgm, name)

    def _is_drained(self) -> bool:
        """Any thread: the node is in a drained section (its own, or one below it that
        reached it through the graph)."""
        bs = self.bs
        return bs is not None and bs.quiesce_counter > 0

    def close(self) -> None:
        """Main thread, node unused: leave the group."""
        throttle_group_unregister_tgm(self.tgm)

    # -- I/O (the request's AioContext) ---------------------------------------------------------
    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        file = self.file
        self.tgm.intercept(ctx, qiov.size, READ,
                           lambda: bdrv_aio_preadv(file, ctx, offset, qiov, cb))

    def aio_pwritev(self, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
                    cb: Completion) -> None:
        file = self.file
        self.tgm.intercept(ctx, qiov.size, WRITE,
                           lambda: bdrv_aio_pwritev(file, ctx, offset, qiov, flags, cb))

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        file = self.file
        self.tgm.intercept(ctx, nbytes, WRITE,
                           lambda: bdrv_aio_pdiscard(file, ctx, offset, nbytes, cb))

    def aio_pwrite_zeroes(self, ctx: AioContext, offset: int, nbytes: int, flags: int,
                          cb: Completion) -> None:
        file = self.file
        self.tgm.intercept(ctx, nbytes, WRITE,
                           lambda: bdrv_aio_pwrite_zeroes(file, ctx, offset, nbytes, flags, cb))

    # flush: FilterDriver's, straight down (QEMU does not throttle flushes)

    # -- drain hooks (main thread) --------------------------------------------------------------
    def drained_begin(self) -> None:
        """The node is being drained: let queued requests go (QEMU's drain_begin)."""
        self.tgm.disable_limits()

    def drained_end(self) -> None:
        self.tgm.enable_limits()

    # -- QMP ------------------------------------------------------------------------------------
    def query_info(self) -> dict[str, Any]:
        return self.block_device_info()

    def block_device_info(self) -> dict[str, Any]:
        """Main thread: the throttle members of QMP BlockDeviceInfo for this node (QEMU's
        names: ``bps`` ... ``iops_wr``, ``*_max``, ``*_max_length``, ``iops_size``,
        ``group``); none when the node's limits are switched off."""
        g = self.tgm.group
        if g is None:
            return {}
        return {**g.get_config().to_block_device_info(), "group": g.name}


def throttle_nodes_below(bs: Any) -> list[Any]:
    """Main thread: the throttle nodes at or below ``bs``, nearest first (depth first in the
    order of the children), each once."""
    out: list[Any] = []
    seen: set[int] = set()

    def walk(n: Any) -> None:
        if id(n) in seen:
            return
        seen.add(id(n))
        if isinstance(n.drv, ThrottleFilter):
            out.append(n)
        for c in n.children.values():
            walk(c.bs)

    walk(bs)
    return out
