"""A virtqueue's indices and notification state, for diagnosing a stalled guest.

``x-pyvhost-stats`` shows, per queue, what libvhost-user and the guest's split ring say:

* libvhost-user's side (``VuVirtq``): ``last-avail-idx`` (next head to pop),
  ``shadow-avail-idx`` (the guest's avail idx as last read), ``used-idx`` (pushed),
  ``signalled-used`` / ``signalled-used-valid`` (the used idx of the last call), ``inuse``
  (popped, not pushed), ``notification``;
* the guest's rings: ``avail-idx`` / ``avail-flags`` / ``used-event`` (the guest wants a call
  once used idx passes it), ``ring-used-idx`` / ``used-flags`` / ``avail-event`` (we want a
  kick once avail idx passes it);
* ``event-idx``: VIRTIO_RING_F_EVENT_IDX was negotiated.

A request the guest waits for and the daemon never popped shows as ``avail-idx !=
last-avail-idx`` with nothing happening; a completion whose call the guest missed as
``used-idx`` past ``used-event`` with ``signalled-used == used-idx``.

``queue_debug`` adds the queue's C lists (``ndone``: completed, not yet pushed; ``nbatch``,
``nfailed``, ``nslow``), whether a push of late completions is scheduled, the BlockBackend's
in-flight count (decremented when a request completes, *before* its push: the queue's own
``in-flight`` is decremented at the push), and the connection's vhost-user message count and
last request codes (a message that quiesced the queues would show).

The values are read in C (``pyvu_vring_state``, ``vhost/csrc/vhost_device.c``), where
libvhost-user's structs and the ring layout are known, into ``struct pyvu_vring_state``
(``vhost/pyvu.h``).  Main thread; diagnostics only: nothing here changes a ring.
"""

from __future__ import annotations

from typing import Any

from vhost.ffi import ffi, lib


def queue_debug(queue: Any) -> dict[str, Any]:
    """``x-debug`` of a ``vhost.server.VuQueue`` (main thread)."""
    cq, conn = queue.cq, queue.conn
    d: dict[str, Any] = {
        "ndone": cq.ndone, "nbatch": cq.nbatch, "nfailed": cq.nfailed, "nslow": cq.nslow,
        "py-reported": cq.py_reported, "paused": cq.paused,
        "c-flush-scheduled": queue._c_flush_scheduled, "python-done": len(queue._done),
        "messages": conn.messages,
        "last-messages": [m for m in conn.last_messages if isinstance(m, int)],
        **vring_state(conn.pdev, queue.idx),
    }
    blk = conn.device.request_state()
    if blk is not None and blk != ffi.NULL:
        d["blk-in-flight"] = blk.in_flight
    return d


def vring_state(pdev: Any, qidx: int) -> dict[str, Any]:
    """The queue's indices (see the module docstring); {} when it is not set up."""
    st = ffi.new("struct pyvu_vring_state *")
    if lib.pyvu_vring_state(pdev, qidx, st) < 0:
        return {}
    out: dict[str, Any] = {
        "last-avail-idx": st.last_avail_idx, "shadow-avail-idx": st.shadow_avail_idx,
        "used-idx": st.used_idx, "signalled-used": st.signalled_used,
        "signalled-used-valid": bool(st.signalled_used_valid),
        "notification": bool(st.notification), "inuse": st.inuse,
        "event-idx": bool(st.event_idx),
    }
    if st.rings_mapped:
        out.update({"avail-flags": st.avail_flags, "avail-idx": st.avail_idx,
                    "used-event": st.used_event, "used-flags": st.used_flags,
                    "ring-used-idx": st.ring_used_idx, "avail-event": st.avail_event})
    return out
