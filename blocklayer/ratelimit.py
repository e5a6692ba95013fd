"""Rate-limited logging of failures that guests or plugins can repeat at will.

A driver or plugin that raises on every request must not flood the log (nor slow the daemon
down formatting tracebacks): each distinct message is logged with its traceback the first time,
then at most once per ``INTERVAL`` seconds with how many were suppressed.  Any thread.
"""

from __future__ import annotations

import logging
import threading
import time

INTERVAL = 10.0
_lock = threading.Lock()
_last: dict[str, tuple[float, int]] = {}  # message -> (last logged, suppressed since)


def log_exception_limited(log: logging.Logger, msg: str, *args: object) -> None:
    """``log.exception(msg, *args)`` (call from an ``except`` block), rate-limited per
    message text."""
    text = msg % args if args else msg
    now = time.monotonic()
    with _lock:
        last, suppressed = _last.get(text, (-INTERVAL, 0))
        if now - last < INTERVAL:
            _last[text] = (last, suppressed + 1)
            return
        _last[text] = (now, 0)
        if len(_last) > 1024:  # distinct messages are few; never grow without bound
            _last.clear()
    if suppressed:
        text += f" (and {suppressed} more times in the last {now - last:.0f} s)"
    log.exception("%s", text)
