"""blockdev_add: build a node from ``--blockdev`` / QMP ``blockdev-add`` options.

Options arrive as a tree (keyval strings or typed JSON, see ``pyvhost_blk/keyval.py``); they are
flattened to dotted names (``cache.direct``), converted by the common option table plus the
driver's own, and unknown ones are refused with QEMU's wording.
"""

from __future__ import annotations

import re
from typing import Any

# Importing the drivers registers them.
import blocklayer.drivers.file  # noqa: F401
import blocklayer.drivers.memory  # noqa: F401
import blocklayer.drivers.null  # noqa: F401
from blocklayer.bdrv import BlockDriverError, BlockDriverState, _drivers, _nodes
from blocklayer.blockdev_options import enum_of
from pyvhost_blk.keyval import KeyvalError, to_bool, to_str

COMMON_OPTIONS = {
    "driver": to_str,
    "node-name": to_str,
    "read-only": to_bool,
    "auto-read-only": to_bool,
    "force-share": to_bool,
    "cache.direct": to_bool,
    "cache.no-flush": to_bool,
    "discard": enum_of("ignore", "off", "unmap", "on"),
    "detect-zeroes": enum_of("off", "on", "unmap"),
}

_NODE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,31}$")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
    return out


def blockdev_add(tree: dict[str, Any], from_json: bool = False,
                 internal: bool = False) -> BlockDriverState:
    """Open a node and register it under its node-name.  Main thread.

    Raises KeyvalError / BlockDriverError with the one line a user should see."""
    flat = flatten(tree)
    if "driver" not in flat:
        raise KeyvalError("Parameter 'driver' is missing")
    driver = to_str(flat["driver"], "driver", from_json=from_json)
    cls = _drivers.get(driver)
    if cls is None:
        raise KeyvalError(f"Parameter 'driver' does not accept value '{driver}'")
    if "node-name" not in flat:
        raise KeyvalError("Parameter 'node-name' is missing")
    table = {**COMMON_OPTIONS, **cls.options}
    opts: dict[str, Any] = {}
    for name, value in flat.items():
        conv = table.get(name)
        if conv is None:
            raise KeyvalError(f"Parameter '{name}' is unexpected")
        opts[name] = conv(value, name, from_json=from_json)
    node_name = opts["node-name"]
    # Internal nodes (blockdev-change-medium's) are named '#blockN', like QEMU's anonymous
    # nodes: a name no user can give.
    if not (internal and node_name.startswith("#")) and not _NODE_NAME.match(node_name):
        raise KeyvalError(f"Invalid node-name: '{node_name}'")
    if node_name in _nodes:
        raise BlockDriverError(f"Duplicate nodes with node-name='{node_name}'")
    drv = cls(node_name, opts)
    bs = BlockDriverState(
        node_name, drv, read_only=opts.get("read-only", False),
        discard=opts.get("discard", "ignore"), detect_zeroes=opts.get("detect-zeroes", "off"),
    )
    _nodes[node_name] = bs
    return bs
