"""Log output: ``--log-format text`` (the default) or ``--log-format json``.

Theory of operation
-------------------
Every module logs through the standard ``logging`` package under the ``pyvhost_blk`` logger
tree; ``setup_logging()`` (called once by ``main()`` after the command line is parsed, before
anything is created) installs one handler on the root logger, writing to stderr:

* ``text``: ``pyvhost-blk: <message>``, one line per record, exactly as before this option
  existed (tracebacks follow on their own lines, as ``logging`` prints them).
* ``json``: one JSON object per line (``JsonFormatter``): ``time`` (ISO 8601, UTC, with
  milliseconds and a ``Z``), ``level`` (``debug``, ``info``, ``warning``, ``error``,
  ``critical``), ``logger``, ``message``, ``pid``, ``thread``, then whatever context the log call
  passed with ``extra=`` (``export``, ``event``, ``reason``, ...), and ``exception`` (the
  formatted traceback) when there is one.  Values that are not JSON types are written with
  ``str()``; a newline in a message is escaped, so a record is always exactly one line.

``event`` names what happened in kebab-case (``frontend-connected``, ``frontend-disconnected``,
``io-error-stop``, ``metrics-listening``, ...), so a log pipeline can match on it instead of on the
message text, which may change.

Handlers run in whichever thread logs (main loop, iothreads, the metrics server's threads);
``logging`` serialises them with the handler's lock.  Command-line errors found before logging is
set up (``main()``'s ``UsageError``) are printed as one plain ``pyvhost-blk: ...`` line whatever
the format.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any

LOG_FORMATS = ("text", "json")
DEFAULT_LOG_FORMAT = "text"
TEXT_FORMAT = "pyvhost-blk: %(message)s"
LEVEL_ENV = "PYVHOST_BLK_LOG"  # the log level, as before: DEBUG, INFO (default), WARNING, ...

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "thread": record.threadName,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def make_formatter(fmt: str) -> logging.Formatter:
    """The formatter for ``--log-format FMT`` (one of ``LOG_FORMATS``)."""
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {fmt!r}")


def log_level(env: dict[str, str] | None = None) -> int:
    """The level named by ``$PYVHOST_BLK_LOG`` (default INFO).  ValueError if unknown."""
    name = (os.environ if env is None else env).get(LEVEL_ENV, "INFO").strip().upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"{LEVEL_ENV}={name}: unknown log level "
                         "(expected DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    return level


def setup_logging(fmt: str = DEFAULT_LOG_FORMAT, level: int = logging.INFO) -> None:
    """Send log records to stderr in format ``fmt``.  Like ``logging.basicConfig``, this does
    nothing if the root logger already has handlers (a test harness installed its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
