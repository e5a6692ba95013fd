"""QAPI events raised by the block layer (BLOCK_IO_ERROR, DEVICE_TRAY_MOVED, ...).

The daemon installs the QMP monitor's emitter with ``set_event_emitter``; until then events are
only logged.  ``qapi_event_send`` may be called from any thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pyvhost_blk.events")

_emitter: Callable[[str, dict[str, Any]], None] | None = None


def set_event_emitter(fn: Callable[[str, dict[str, Any]], None] | None) -> None:
    global _emitter
    _emitter = fn


def qapi_event_send(name: str, data: dict[str, Any]) -> None:
    log.debug("event %s %s", name, data)
    if _emitter is not None:
        _emitter(name, data)
