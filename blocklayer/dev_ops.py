"""BlockDevOps: the callbacks a device model registers on its BlockBackend (QEMU's
``include/sysemu/block-backend-common.h``).

Every callback is optional.  They run in the main thread, except ``drained_poll`` which the
main thread calls while it waits for a drain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class BlockDevOps:
    #: medium loaded (True) or ejected (False); may raise ValueError to refuse a load
    change_media_cb: Callable[[bool], None] | None = None
    #: the user asked to eject (``force``: it will happen anyway)
    eject_request_cb: Callable[[bool], None] | None = None
    #: does the device have a tray, and is it open?  (presence of the callback = has a tray)
    is_tray_open: Callable[[], bool] | None = None
    #: is the medium locked by the guest?
    is_medium_locked: Callable[[], bool] | None = None
    #: the backend's size changed
    resize_cb: Callable[[], None] | None = None
    #: stop submitting new requests (quiesce counter went 0 -> 1)
    drained_begin: Callable[[], None] | None = None
    #: may submit again (quiesce counter went 1 -> 0)
    drained_end: Callable[[], None] | None = None
    #: True while the device still has requests of its own in flight
    drained_poll: Callable[[], bool] | None = None
