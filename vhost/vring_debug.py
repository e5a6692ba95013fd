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

libvhost-user's header is not part of the cffi declarations beyond a few fields (vhost/_build.py),
so the fields declared next to ``last_avail_idx`` in libvhost-user.h (``shadow_avail_idx``,
``used_idx``, ``signalled_used``, ``signalled_used_valid``, ``notification``) are read at their
offsets from it, checked against the declared ``used_idx``; the ring pointers follow ``num`` in
``VuRing``.  Main thread, dispatch lock held shared (no unmapping meanwhile).  Diagnostics
only: nothing here changes a ring.
"""

from __future__ import annotations

from typing import Any

from vhost.ffi import ffi, lib

VIRTIO_RING_F_EVENT_IDX = 29
_LAST_AVAIL = ffi.offsetof("VuVirtq", "last_avail_idx")
# libvhost-user.h: last_avail_idx, shadow_avail_idx, used_idx, signalled_used (uint16_t each),
# signalled_used_valid, notification (bool)
_LAYOUT_OK = ffi.offsetof("VuVirtq", "used_idx") == _LAST_AVAIL + 4


def queue_debug(queue: Any) -> dict[str, Any]:
    """``x-debug`` of a ``vhost.server.VuQueue`` (main thread)."""
    cq, conn = queue.cq, queue.conn
    d: dict[str, Any] = {
        "ndone": cq.ndone, "nbatch": cq.nbatch, "nfailed": cq.nfailed, "nslow": cq.nslow,
        "py-reported": cq.py_reported, "paused": cq.paused,
        "c-flush-scheduled": queue._c_flush_scheduled, "python-done": len(queue._done),
        "messages": conn.messages,
        "last-messages": [m for m in conn.last_messages if isinstance(m, int)],
        **vring_state(conn.pdev, conn.dev, queue.idx),
    }
    blk = conn.device.request_state()
    if blk is not None and blk != ffi.NULL:
        d["blk-in-flight"] = blk.in_flight
    return d


def vring_state(pdev: Any, dev: Any, qidx: int) -> dict[str, Any]:
    """The queue's indices (see the module docstring); {} when it is not set up."""
    if not _LAYOUT_OK:
        return {"vring": "layout of VuVirtq not as expected"}
    lib.pyvu_rdlock(pdev)
    try:
        if dev.vq == ffi.NULL or dev.broken:
            return {}
        vq = dev.vq + qidx
        u8 = ffi.cast("uint8_t *", vq)
        u16 = ffi.cast("uint16_t *", u8 + _LAST_AVAIL)
        out: dict[str, Any] = {
            "last-avail-idx": u16[0], "shadow-avail-idx": u16[1], "used-idx": u16[2],
            "signalled-used": u16[3], "signalled-used-valid": bool(u8[_LAST_AVAIL + 8]),
            "notification": bool(u8[_LAST_AVAIL + 9]), "inuse": vq.inuse,
            "event-idx": bool(dev.features >> VIRTIO_RING_F_EVENT_IDX & 1),
        }
        num = vq.vring.num
        ptrs = ffi.cast("uintptr_t *", ffi.addressof(vq.vring))  # num, then desc/avail/used
        avail, used = ptrs[2], ptrs[3]
        if avail and used and num:
            a = ffi.cast("uint16_t *", avail)
            out.update({"avail-flags": a[0], "avail-idx": a[1], "used-event": a[2 + num]})
            u = ffi.cast("uint16_t *", used)
            out.update({"used-flags": u[0], "ring-used-idx": u[1],
                        "avail-event": ffi.cast("uint16_t *", used + 4 + 8 * num)[0]})
        return out
    finally:
        lib.pyvu_unlock(pdev)
