"""Loading a user's Python script as a plugin or filter module.

Each node loads its own copy of the script (its globals are that node's state, as each nbdkit
process has its own), with ``import nbdkit`` resolving to ``blocklayer/plugins/nbdkit.py``.
Whatever goes wrong while loading — a missing file, a syntax error, an exception at import —
becomes one ``BlockDriverError`` line naming the script.  Main thread.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import traceback
from types import ModuleType

from blocklayer.bdrv import BlockDriverError
from blocklayer.plugins import nbdkit

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
