"""The vhost-user-blk export: VuServer + BlockBackend (QEMU's
block/export/vhost-user-blk-server.c), wired to the block layer through BlockDevOps.

Theory of operation
-------------------
``--export type=vhost-user-blk,id=ID,node-name=NODE,addr...`` (or QMP ``block-export-add``)
creates one ``VhostUserBlkExport``.  It owns a BlockBackend on NODE and registers BlockDevOps:

* ``drained_begin`` pauses every queue (no new pops, whatever iothread serves it) and
  ``drained_poll`` reports requests still in flight; ``drained_end`` resumes and looks at every
  ring again, so requests the guest queued meanwhile are served.  The BlockBackend's own
  request queuing is disabled (as QEMU's exports do): pausing the rings is the gate.
* ``resize_cb`` sends the vhost-user config-change message: the guest re-reads the capacity.
* With ``removable=on`` (our extension: QEMU's virtio-blk has no tray) the device has a tray:
  ``change_media_cb``/``is_tray_open``/``eject_request_cb`` implement open/close, and an open
  tray or a removed medium makes requests fail (ENOMEDIUM → IOERR) and the capacity read 0.

Permissions: reading, plus writing when ``writable=on``; every other user may read, resize and
write-unchanged, but **not write** unless ``share-rw=on`` — a second writer corrupts a guest
disk, so this is stricter than qemu-storage-daemon's exports (which share everything) and the
same as QEMU's guest devices.  The file driver turns this into image locks.

Requests: the C queue loop (``vhost/csrc/virtio_blk_queue.c``) parses, checks and answers every
virtio-blk request itself (the serial for GET_ID is in the BlockBackend's C state); the export
serves the node graph's share a batch at a time (``serve_batch``) and decides what a failed
request becomes (``handle_failed``).  No request is parsed in Python.

Error policy (QEMU's virtio_blk_handle_rw_error): ``rerror``/``werror`` (report, ignore, enospc,
stop) for reads, writes, flushes and write-zeroes; a failed discard is reported (IOERR).  On
*stop* the failed request is kept, the export's queues pause (QEMU stops the VM; a daemon stops
the export) and BLOCK_IO_ERROR is sent; ``resume_after_error()`` (QMP ``cont``) runs the kept
requests through C again from the start (``pyvu_fastq_resubmit``) and resumes the queues.

Queues map onto AioContexts: no iothread → the main loop; ``iothread=io0`` → all in io0; a list
→ queue *i* in ``iothreads[i % len]``.  ``set_aio_context`` (``x-blockdev-set-iothread``) moves
a single-context export; one spread over several iothreads refuses.

Threads: management methods run in the main thread; ``serve_batch``, ``handle_failed`` and
completions run in the queue's AioContext.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import Any

from blocklayer.aio import AioContext, qemu_get_aio_context
from blocklayer.batch import Batch
from blocklayer.bdrv import BlockDriverState
from blocklayer.block_backend import (
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    BlockBackend,
    BlockdevOnError,
    BlockErrorAction,
    blk_attach_dev,
    blk_error_action,
    blk_get_error_action,
    blk_get_stats,
    blk_insert_bs,
    blk_iostatus_enable,
    blk_iostatus_reset,
    blk_is_available,
    blk_nb_sectors,
    blk_new,
    blk_set_aio_context,
    blk_set_allow_aio_context_change,
    blk_set_dev_ops,
    blk_set_disable_request_queuing,
    blk_set_enable_write_cache,
    blk_set_on_error,
    blk_unref,
)
from blocklayer.dev_ops import BlockDevOps
from blocklayer.io import bdrv_batch
from blocklayer.io_uring import laio_get, luring_get
from blocklayer.ratelimit import log_exception_limited
from vhost.ffi import ffi, lib
from vhost.server import VuQueue, VuServer
from virtio.blk_config import WCE_OFFSET, VirtioBlkConfig
from virtio.constants import (
    VIRTIO_BLK_ID_BYTES,
    VhostUserProtocolFeature,
    VirtioBlkStatus,
    VirtioBlkType,
    VirtioFeature,
)

log = logging.getLogger("pyvhost_blk.export")

VIRTQUEUE_MAX_SIZE = 1024
DEFAULT_SERIAL = "vhost_user_blk"  # what qemu-storage-daemon answers to GET_ID


class ExportError(Exception):
    """A management operation on the export was refused (one line for the user)."""


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
        removable: bool = False,
        share_rw: bool = False,
        rerror: BlockdevOnError = BlockdevOnError.REPORT,
        werror: BlockdevOnError = BlockdevOnError.REPORT,
        fast_path: bool = True,
        inflight: bool = True,
    ) -> None:
        self.id = id
        self.num_queues = num_queues
        self.writable = writable
        self.logical_block_size = logical_block_size
        self.contexts = contexts or [qemu_get_aio_context()]
        self.removable = removable
        self.share_rw = share_rw
        perm = BLK_PERM_CONSISTENT_READ | (BLK_PERM_WRITE if writable else 0)
        shared = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED | BLK_PERM_RESIZE
        if share_rw:
            shared |= BLK_PERM_WRITE
        self.blk: BlockBackend = blk_new(self.contexts[0], perm, shared)
        self.blk.name = id
        try:
            blk_insert_bs(self.blk, bs)
        except BaseException:
            blk_unref(self.blk)
            raise
        blk_attach_dev(self.blk, self)
        blk_set_on_error(self.blk, rerror, werror)
        blk_iostatus_enable(self.blk)
        blk_set_enable_write_cache(self.blk, not writethrough)
        blk_set_disable_request_queuing(self.blk, True)
        blk_set_allow_aio_context_change(self.blk, True)
        self.blk.c.force_slow = int(not fast_path)
        self.blk.c.lbs = logical_block_size
        self.inflight = inflight
        self.tray_open = False
        self._batch: dict[VuQueue, Batch] = {}  # one per queue, reused
        ident = serial.encode()[:VIRTIO_BLK_ID_BYTES]  # GET_ID's answer, given by C
        ffi.memmove(self.blk.c.serial, ident, len(ident))
        self.blk.c.serial_len = len(ident)
        self.features = 0
        self.server: VuServer | None = None
        self.shutting_down = False
        self._stopped = False  # paused by an error policy, waiting for resume_after_error
        self._stop_lock = threading.Lock()
        self._retries: list[tuple[AioContext, Callable[[], None], Callable[[], None]]] = []
        blk_set_dev_ops(self.blk, BlockDevOps(
            change_media_cb=self._change_media if removable else None,
            eject_request_cb=self._eject_request if removable else None,
            is_tray_open=(lambda: self.tray_open) if removable else None,
            is_medium_locked=(lambda: False) if removable else None,
            resize_cb=self._resize,
            drained_begin=self._drained_begin,
            drained_end=self._drained_end,
            drained_poll=self._drained_poll,
        ))
        self.blk.aio_context_notifiers.append(self._aio_context_changed)

    def attach_server(self, server: VuServer) -> None:
        self.server = server

    @property
    def node_name(self) -> str | None:
        return self.blk.root.node_name if self.blk.root is not None else None

    # -- BlockDevOps (main thread) ----------------------------------------------------------
    def _drained_begin(self) -> None:
        if self.server is not None:
            self.server.pause(sync=True)

    def _drained_end(self) -> None:
        if self.server is not None:
            self.server.resume()

    def _drained_poll(self) -> bool:
        return self.server is not None and self.server.in_flight() > 0

    def _resize(self) -> None:
        if self.server is not None:
            self.server.config_changed()

    def _change_media(self, load: bool) -> None:
        self.tray_open = not load
        if self.server is not None:
            self.server.config_changed()

    def _eject_request(self, force: bool) -> None:
        # A virtio disk has no guest-side eject handshake: the tray opens at once.
        self._change_media(False)

    # -- error policy: stop and resume --------------------------------------------------------
    def _stop_on_error(self, retry: Callable[[], None], abandon: Callable[[], None]) -> None:
        """In the failed request's context: keep it for retry; pause the export once."""
        from blocklayer.aio import current_aio_context

        with self._stop_lock:
            self._retries.append((current_aio_context(), retry, abandon))
            first = not self._stopped
            self._stopped = True
        if first and self.server is not None:
            self.server.pause()
            log.warning("%s: I/O error, export stopped until resumed ('cont')", self.id,
                        extra={"export": self.id, "event": "io-error-stop"})

    def connection_closing(self) -> None:
        """Main thread: the frontend goes away, so requests kept for a retry never complete on
        this connection: give them up (not completed — the frontend resubmits them from its
        inflight records when it reconnects).  The export stays stopped until ``cont``."""
        with self._stop_lock:
            kept, self._retries = self._retries, []
        for ctx, _retry, abandon in kept:
            ctx.schedule(abandon)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def resume_after_error(self) -> None:
        """Main thread (QMP ``cont``): reset iostatus, retry kept requests, resume queues."""
        blk_iostatus_reset(self.blk)
        with self._stop_lock:
            retries, self._retries = self._retries, []
            was_stopped, self._stopped = self._stopped, False
        for ctx, retry, _abandon in retries:
            ctx.schedule(retry)
        if was_stopped and self.server is not None:
            self.server.resume()

    # -- iothreads ----------------------------------------------------------------------------
    def can_set_aio_context(self, ctx: AioContext) -> str | None:
        """None if the export can move to ``ctx``, else why not."""
        if len({id(c) for c in self.contexts}) > 1:
            return (f"Export '{self.id}' is spread over several iothreads and cannot be moved "
                    "to a single one")
        return None

    def _aio_context_changed(self, ctx: AioContext) -> None:
        self.contexts = [ctx]
        if self.server is not None:
            self.server.move_queues()

    # -- VuDevice (main thread) -----------------------------------------------------------------
    def get_features(self) -> int:
        f = (
            VirtioFeature.BLK_F_SEG_MAX
            | VirtioFeature.BLK_F_BLK_SIZE
            | VirtioFeature.BLK_F_FLUSH
            | VirtioFeature.BLK_F_TOPOLOGY
            | VirtioFeature.BLK_F_CONFIG_WCE
            | VirtioFeature.BLK_F_DISCARD
            | VirtioFeature.BLK_F_WRITE_ZEROES
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
        # CONFIG and MQ are added by libvhost-user.  INFLIGHT_SHMFD: the frontend keeps a shared
        # record of popped-but-not-pushed descriptors (libvhost-user updates it in
        # vu_queue_pop/vu_queue_push, which both request paths use per element), so requests in
        # flight when the daemon dies are resubmitted after it restarts and QEMU reconnects.
        return int(VhostUserProtocolFeature.INFLIGHT_SHMFD) if self.inflight else 0

    def config(self) -> VirtioBlkConfig:
        sectors = blk_nb_sectors(self.blk) if blk_is_available(self.blk) else 0
        return VirtioBlkConfig(
            capacity=max(sectors, 0),
            seg_max=VIRTQUEUE_MAX_SIZE - 2,
            blk_size=self.logical_block_size,
            min_io_size=1,
            opt_io_size=1,
            wce=1 if self.blk.enable_write_cache else 0,
            num_queues=self.num_queues,
            max_discard_sectors=lib.VHOST_USER_BLK_MAX_DISCARD_SECTORS,
            max_discard_seg=1,
            discard_sector_alignment=self.logical_block_size >> 9,
            max_write_zeroes_sectors=lib.VHOST_USER_BLK_MAX_WRITE_ZEROES_SECTORS,
            max_write_zeroes_seg=1,
            write_zeroes_may_unmap=1,
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
        """Main thread: a connection's queues are gone with it (their C state freed): so are
        their batches (kept per queue for reuse; a leak of one per queue per connection
        otherwise)."""
        if not connected:
            self._batch.clear()

    # -- per request (queue's AioContext) ---------------------------------------------------
    def request_state(self) -> Any:
        """The C state the queues' request path reads (``struct pyvu_blkstate *``)."""
        return self.blk.c

    def queue_engines(self, ctx: AioContext) -> tuple[Any, Any]:
        """This context's io_uring and Linux AIO engines (the file driver's, which the C path
        also submits to).  In ``ctx``."""
        return luring_get(ctx).ring, laio_get(ctx)

    def serve_batch(self, queue: VuQueue) -> None:
        """Requests C parsed and checked for the node graph: handed to the root node a batch
        at a time (blocklayer/batch.py), completed and pushed by C.  In the queue's
        AioContext."""
        b = self._batch.get(queue)
        if b is None:
            b = self._batch[queue] = Batch(queue.ctx, queue.cq, queue.schedule_c_flush)
        b.ctx = queue.ctx  # the queue may have moved to another iothread since
        cq = queue.cq
        while cq.nbatch:
            b.take()
            root = self.blk.root
            try:
                if root is None or not blk_is_available(self.blk):
                    b.fail_unanswered(-errno.ENOMEDIUM)
                else:
                    bdrv_batch(root, b)
            except Exception:
                log_exception_limited(log, "a driver failed a batch on export %r", self.id)
                b.fail_unanswered(-errno.EIO)
            b.finish()

    def handle_failed(self, queue: VuQueue, elem: Any, err: int, rtype: int) -> None:
        """A request failed with ``err`` (-errno) on either path: apply the error policy.
        -EAGAIN is no error: an engine could not finish it (a short read at the end of the
        image, a full Linux AIO context), so it runs again through the node graph, request by
        request.  In the queue's AioContext."""
        if err == -errno.EAGAIN:
            self._resubmit(queue, elem, each=True)
            return
        if rtype == VirtioBlkType.DISCARD:  # advisory: reported, never stops the export
            lib.pyvu_fastq_fail_done(queue.cq, elem, VirtioBlkStatus.IOERR)
            return
        self._handle_rw_error(queue, elem, err, rtype == VirtioBlkType.IN)

    def _handle_rw_error(self, queue: VuQueue, elem: Any, err: int, is_read: bool) -> None:
        """virtio_blk_handle_rw_error: rerror/werror decide between an IOERR, an OK, and
        keeping the request until ``resume_after_error`` (stop)."""
        error = -err
        action = blk_get_error_action(self.blk, is_read, error)
        blk_error_action(self.blk, action, is_read, error)
        if action == BlockErrorAction.STOP:
            self._stop_on_error(lambda: self._resubmit(queue, elem),
                                lambda: queue.abandon(elem))
            return
        status = VirtioBlkStatus.OK if action == BlockErrorAction.IGNORE else VirtioBlkStatus.IOERR
        lib.pyvu_fastq_fail_done(queue.cq, elem, status)

    def _resubmit(self, queue: VuQueue, elem: Any, each: bool = False) -> None:
        """Run a failed request through C again from the start (parsed and checked as if just
        popped); serve what that put on the batch list.  In the queue's AioContext."""
        lib.pyvu_fastq_resubmit(queue.cq, elem, int(each))
        if queue.cq.nbatch:
            self.serve_batch(queue)
        if queue.cq.nfailed:
            queue.schedule_c_flush()  # hands the failed list to handle_failed

    # -- management (main thread) -------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """QMP BlockExportInfo, plus our extensions (tray, iostatus, stopped, iothreads)."""
        d: dict[str, Any] = {
            "type": "vhost-user-blk",
            "id": self.id,
            "node-name": self.node_name or "",
            "shutting-down": self.shutting_down,
            "writable": self.writable,
            "num-queues": self.num_queues,
            "iothreads": [c.name for c in self.contexts],
            "io-status": self.blk.iostatus.value,
            "stopped": self._stopped,
            "connected": bool(self.server and self.server.conn is not None),
            "fast-path": not self.blk.c.force_slow,
        }
        if self.removable:
            d["removable"] = True
            d["tray-open"] = self.tray_open
        return d

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = {"id": self.id, "node-name": self.node_name,
                             "malformed-requests": self.blk.c.malformed_ops,
                             "fast-path": not self.blk.c.force_slow,
                             "fast-path-requests": self.blk.c.fast_ops,
                             "batch-requests": self.blk.c.batch_ops}
        if self.server is not None:
            s.update(self.server.stats())
        s["blockstats"] = blk_get_stats(self.blk).to_dict()
        return s

    def set_fast_path(self, enable: bool) -> None:
        """Main thread: let C serve what it can (True) or send every request to Python."""
        self.blk.c.force_slow = int(not enable)

    def delete(self) -> None:
        blk_unref(self.blk)

    def set_contexts(self, contexts: list[AioContext]) -> None:
        self.contexts = contexts
        blk_set_aio_context(self.blk, contexts[0])
