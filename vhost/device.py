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

    def connection_changed(self, connected: bool) -> None:
        """A frontend connected / disconnected (main thread)."""
