"""The vhost-user-blk export: VuServer + VirtioBlkHandler + BlockBackend (QEMU's
block/export/vhost-user-blk-server.c).

Theory of operation
-------------------
``--export type=vhost-user-blk,id=ID,node-name=NODE,addr...,num-queues=N,iothread=...`` creates
one ``VhostUserBlkExport``.  It owns a BlockBackend on NODE (write permission only when
``writable=on``), a ``VirtioBlkHandler`` that turns requests into ``blk_aio_*`` calls, and a
``VuServer`` that speaks vhost-user through libvhost-user.

Queues map onto AioContexts: with no iothread everything runs in the main loop; with
``iothread=io0`` every queue runs in io0; with a list (``iothread.0=io0,iothread.1=io1``, QEMU
9+'s multiqueue syntax) queue *i* runs in ``iothreads[i % len]``.

Per request (in the queue's AioContext): the handler validates and submits; on completion the
export writes the status byte (last, after the data) and hands the element back to the queue,
which pushes completions in batches with one notification.
"""

from __future__ import annotations

import logging
from typing import Any

from blocklayer.aio import AioContext, qemu_get_aio_context
from blocklayer.bdrv import BlockDriverState
from blocklayer.block_backend import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_WRITE,
    BlockBackend,
    blk_get_stats,
    blk_insert_bs,
    blk_nb_sectors,
    blk_new,
    blk_set_enable_write_cache,
    blk_unref,
)
from vhost.ffi import ffi
from vhost.server import VuQueue, VuServer
from virtio.blk_config import WCE_OFFSET, VirtioBlkConfig
from virtio.blk_handler import MALFORMED, VirtioBlkHandler
from virtio.constants import VirtioFeature

log = logging.getLogger("pyvhost_blk.export")

VIRTQUEUE_MAX_SIZE = 1024
DEFAULT_SERIAL = "vhost_user_blk"  # what qemu-storage-daemon answers to GET_ID


class VhostUserBlkExport:
    """A virtio-blk device over vhost-user, backed by a BlockBackend."""

    def __init__(
        self,
        id: str,
        bs: BlockDriverState,
        writable: bool,
        num_queues: int,
        logical_block_size: int,
        contexts: list[AioContext],
        writethrough: bool = False,
        serial: str = DEFAULT_SERIAL,
    ) -> None:
        self.id = id
        self.num_queues = num_queues
        self.writable = writable
        self.logical_block_size = logical_block_size
        self.contexts = contexts or [qemu_get_aio_context()]
        perm = BLK_PERM_CONSISTENT_READ
        if writable:
            perm |= BLK_PERM_WRITE
        # qemu-storage-daemon's exports share every permission; locking arrives later.
        self.blk: BlockBackend = blk_new(self.contexts[0], perm, BLK_PERM_ALL)
        self.blk.name = id
        blk_insert_bs(self.blk, bs)
        blk_set_enable_write_cache(self.blk, not writethrough)
        self.node_name = bs.node_name
        self.handler = VirtioBlkHandler(self.blk, serial, logical_block_size, writable)
        self.features = 0
        self.malformed = 0
        self.server: VuServer | None = None

    def attach_server(self, server: VuServer) -> None:
        self.server = server

    # -- VuDevice (main thread) -----------------------------------------------------------------
    def get_features(self) -> int:
        f = (
            VirtioFeature.BLK_F_SEG_MAX
            | VirtioFeature.BLK_F_BLK_SIZE
            | VirtioFeature.BLK_F_FLUSH
            | VirtioFeature.BLK_F_TOPOLOGY
            | VirtioFeature.VERSION_1
            | VirtioFeature.RING_INDIRECT_DESC
            | VirtioFeature.RING_EVENT_IDX
        )
        if self.num_queues > 1:
            f |= VirtioFeature.BLK_F_MQ
        if not self.writable:
            f |= VirtioFeature.BLK_F_RO
        return int(f)

    def set_features(self, features: int) -> None:
        self.features = features

    def get_protocol_features(self) -> int:
        return 0  # CONFIG and MQ are added by libvhost-user

    def config(self) -> VirtioBlkConfig:
        sectors = blk_nb_sectors(self.blk)
        return VirtioBlkConfig(
            capacity=max(sectors, 0),
            seg_max=VIRTQUEUE_MAX_SIZE - 2,
            blk_size=self.logical_block_size,
            min_io_size=1,
            opt_io_size=1,
            wce=1 if self.blk.enable_write_cache else 0,
            num_queues=self.num_queues,
        )

    def get_config(self, size: int) -> bytes | None:
        return self.config().pack()

    def set_config(self, data: bytes, offset: int, flags: int) -> bool:
        # Only the write-cache byte is writable (VIRTIO_BLK_F_CONFIG_WCE).
        if offset != WCE_OFFSET or len(data) != 1:
            return False
        blk_set_enable_write_cache(self.blk, data[0] != 0)
        return True

    def queue_context(self, qidx: int) -> AioContext:
        return self.contexts[qidx % len(self.contexts)]

    def connection_changed(self, connected: bool) -> None:
        pass

    # -- per request (queue's AioContext) ---------------------------------------------------
    def handle_request(self, queue: VuQueue, elem: Any) -> None:
        def done(status: int, in_len: int) -> None:
            if status == MALFORMED:
                self.malformed += 1
                queue.complete(elem, 0)
                return
            last = elem.in_sg[elem.in_num - 1]
            ffi.cast("uint8_t *", last.iov_base)[last.iov_len - 1] = status
            queue.complete(elem, in_len)

        self.handler.process_req(elem.out_sg, elem.out_num, elem.in_sg, elem.in_num, done)

    # -- management (main thread) -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = {"id": self.id, "node-name": self.node_name,
                             "malformed-requests": self.malformed}
        if self.server is not None:
            s.update(self.server.stats())
        s["blockstats"] = blk_get_stats(self.blk).to_dict()
        return s

    def delete(self) -> None:
        blk_unref(self.blk)
