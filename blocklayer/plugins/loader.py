"""Loading a user's Python script as a plugin or filter module, and calling into it.

Each node loads its own copy of the script (its globals are that node's state, as each nbdkit
process has its own), with ``import nbdkit`` resolving to ``blocklayer/plugins/nbdkit.py``.
Whatever goes wrong while loading — a missing file, a syntax error, an exception at import —
becomes one ``BlockDriverError`` line naming the script.  Main thread.
"""

from __future__ import annotations

import errno
import importlib.util
import itertools
import logging
import os
import sys
import traceback
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from blocklayer.bdrv import BlockDriverError
from blocklayer.plugins import nbdkit
from blocklayer.qapi import KeyvalError
from blocklayer.ratelimit import log_exception_limited

log = logging.getLogger("pyvhost_blk.plugin")

_ids = itertools.count(1)


def load_script(path: str, kind: str) -> ModuleType:
    """Execute ``path`` as a fresh module; ``kind`` ('plugin', 'filter') is for messages."""
    sys.modules.setdefault("nbdkit", nbdkit)
    if not os.path.isfile(path):
        raise BlockDriverError(f"Python {kind} '{path}': no such file")
    name = f"pyvhost_blk_{kind}_{next(_ids)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BlockDriverError(f"Python {kind} '{path}': cannot be loaded as a Python file")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise BlockDriverError(
            f"Python {kind} '{path}': syntax error at line {e.lineno}: {e.msg}") from None
    except BaseException as e:  # noqa: BLE001 - any failure of user code is one line
        raise BlockDriverError(f"Python {kind} '{path}': {describe(e)}") from None
    return mod


def describe(e: BaseException) -> str:
    """An exception as one line: type, message, and where in the user's code it happened."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (line {tb[-1].lineno} in {tb[-1].name})" if tb else ""
    msg = str(e) or type(e).__name__
    return f"{type(e).__name__}: {msg}{where}" if str(e) else f"{msg}{where}"


def config_value(v: Any, name: str, *, from_json: bool = False) -> str:
    """A script's own ``KEY=VALUE`` option: a string, as on nbdkit's command line."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, int, float)):
        return str(v)
    raise KeyvalError(f"Parameter '{name}' expects a string, number or boolean")


class Script:
    """A loaded plugin or filter script and the rules for calling it: a set-up callback that
    raises is the one line the user sees; a request callback that raises is an errno (the one
    ``nbdkit.set_error`` recorded, else the exception's, else EIO), logged rate-limited."""

    def __init__(self, path: str, kind: str) -> None:
        self.path, self.kind = path, kind  # kind: 'plugin' or 'filter', for messages
        self.m = load_script(path, kind)

    def setup(self, fn: str, *args: Any, default: Any = None) -> Any:
        """Main thread: call optional callback ``fn``; BlockDriverError if it raises."""
        f = getattr(self.m, fn, None)
        if not callable(f):
            return default
        nbdkit.take_error()
        try:
            return f(*args)
        except BaseException as e:  # noqa: BLE001 - user code
            raise BlockDriverError(
                f"Python {self.kind} '{self.path}': {fn} failed: {describe(e)}") from None

    def configure(self, pairs: Iterable[tuple[str, Any]]) -> None:
        """Main thread: hand the script its own ``KEY=VALUE`` options, in order."""
        for key, value in pairs:
            if not callable(getattr(self.m, "config", None)):
                raise BlockDriverError(
                    f"Python {self.kind} '{self.path}' takes no parameters (got '{key}')")
            self.setup("config", key, value)

    def fail(self, what: str, e: BaseException) -> int:
        """-errno for callback ``what`` that raised ``e``; logs it (call inside ``except``)."""
        err = nbdkit.take_error()
        if not err:
            err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
        log_exception_limited(log, "Python %s '%s': %s failed", self.kind, self.path, what)
        return -err

    def teardown(self, calls: Iterable[tuple[str, tuple]]) -> None:
        """Main thread, at close: call each optional callback; failures are only logged."""
        for fn, args in calls:
            f = getattr(self.m, fn, None)
            if callable(f):
                try:
                    f(*args)
                except BaseException:  # noqa: BLE001 - user code, at shutdown
                    log_exception_limited(log, "Python %s '%s': %s failed", self.kind,
                                          self.path, fn)
