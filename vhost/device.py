"""The interface a vhost-user device implements (rust-vmm's ``VhostUserBackend`` in spirit).

The device never sees vhost-user messages: the server (``vhost/server.py``) and libvhost-user
own the protocol, and call these methods.  Which thread each runs in is stated per method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from blocklayer.aio import AioContext
    from vhost.server import VuQueue


class VuDevice(Protocol):
    num_queues: int

    def get_features(self) -> int:
        """Device feature bits to offer (main thread, during dispatch)."""

    def set_features(self, features: int) -> None:
        """The frontend acknowledged these feature bits (main thread, during dispatch)."""

    def get_protocol_features(self) -> int:
        """Extra vhost-user protocol features (main thread, during dispatch)."""

    def get_config(self, size: int) -> bytes | None:
        """Config space bytes (padded/truncated by the server to ``size``); None = error."""

    def set_config(self, data: bytes, offset: int, flags: int) -> bool:
        """A config space write from the driver; False = refused."""

    def queue_context(self, qidx: int) -> AioContext:
        """The AioContext that serves queue ``qidx``."""

    def handle_request(self, queue: VuQueue, elem: Any) -> None:
        """One popped ``VuVirtqElement *`` (in the queue's context, dispatch lock held shared).
        The device must eventually call ``queue.complete(elem, in_len)`` in the same context,
        never free or push the element itself."""

    # -- the C request path (vhost/csrc/virtio_blk_queue.c) ----------------------------------
    # Each queue's C loop pops elements and serves what the device's state allows in C; the
    # rest comes back through handle_request, failures through handle_failed, parsed requests
    # for a batch-capable Python driver through serve_batch.

    def request_state(self) -> Any:
        """The ``struct pyvu_blkstate *`` the queues' C loop reads (which requests it may
        serve, the shared in-flight count and accounting), or ``ffi.NULL``: a device that is
        not a block device gets every request through ``handle_request``.  Main thread, at
        connection."""

    def queue_engines(self, ctx: AioContext) -> tuple[Any, Any]:
        """The C I/O engines a queue served in ``ctx`` may hand requests to:
        (``struct pyvu_ring *``, ``struct pyvu_laio *``), either ``ffi.NULL``.  In ``ctx``,
        when the queue starts there."""

    def handle_failed(self, queue: VuQueue, elem: Any, err: int, rtype: int) -> None:
        """A request the C loop served failed with ``err`` (-errno; -EAGAIN: serve it again
        from the start).  Same contract as handle_request.  In the queue's context."""

    def serve_batch(self, queue: VuQueue) -> None:
        """Take the queue's parsed batch (``lib.pyvu_fastq_take_batch``), serve it and hand
        the results back (``lib.pyvu_fastq_batch_done``).  In the queue's context."""

    def connection_closing(self) -> None:
        """Main thread: the connection is closing and waits for the requests in flight.  A
        device holding requests back (an error policy's stop) gives them up now with
        ``queue.abandon(elem)`` in the queue's context, or the close would wait forever."""

    def connection_changed(self, connected: bool) -> None:
        """A frontend connected / disconnected (main thread)."""
