"""blockdev_add: build a node (and the nodes below it) from ``--blockdev`` / QMP
``blockdev-add`` options.

Options arrive as a tree (keyval strings or typed JSON, see ``pyvhost_blk/keyval.py``).  The
driver's child roles (``file``, ``backing``) are taken out first: each is either the
node-name of an existing node (``file=disk0``) or the options of a new one (``file.driver=file,
file.filename=x.img``), opened first with an automatic ``#blockN`` name unless it names itself,
and inheriting the parent's ``read-only`` and ``cache.*`` (and ``discard=unmap``, as QEMU's
format layers decide what reaches the file).  The rest is flattened to dotted names
(``cache.direct``), converted by the common option table plus the driver's own, and unknown
ones are refused with QEMU's wording.  If anything fails, the nodes opened for it are closed.
"""

from __future__ import annotations

import re
from typing import Any

# Importing the drivers package registers every driver module in it (one file per driver).
import blocklayer.drivers  # noqa: F401
from blocklayer.bdrv import (
    BlockDriver,
    BlockDriverError,
    BlockDriverState,
    _drivers,
    _nodes,
    bdrv_anon_name,
    bdrv_find_node,
    bdrv_refresh_limits,
    bdrv_unref,
)
from blocklayer.blockdev_options import enum_of
from blocklayer.graph import bdrv_attach_child
from blocklayer.qapi import KeyvalError, to_bool, to_str

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


# Options an inline child takes from its parent unless it sets them itself (QEMU's
# bdrv_inherited_options), and the defaults a format's child gets.
_INHERITED = ("read-only", "auto-read-only", "force-share", "cache.direct", "cache.no-flush")
_CHILD_DEFAULTS = {"discard": "unmap"}


def _child_tree(parent: dict[str, Any], child: dict[str, Any], role: str) -> dict[str, Any]:
    tree = dict(child)
    flat_child = flatten(child)
    if role == "backing":
        # A backing file is opened read-only unless its own options say otherwise (QEMU's
        # bdrv_backing_options): the overlay is what the guest writes.
        tree.setdefault("read-only", True)
    for name in _INHERITED:
        if name in parent and name not in flat_child and name not in tree:
            head, _, tail = name.partition(".")
            if tail:
                tree[head] = {**tree.get(head, {}), tail: parent[name]}
            else:
                tree[name] = parent[name]
    for name, value in _CHILD_DEFAULTS.items():
        tree.setdefault(name, value)
    return tree


def _open_children(cls: type, tree: dict[str, Any], flat_parent: dict[str, Any],
                   from_json: bool) -> dict[str, BlockDriverState]:
    """Open or look up the nodes the driver's child roles name.  On failure, closes what it
    opened and raises."""
    children: dict[str, BlockDriverState] = {}
    try:
        for role, required in cls.child_roles.items():
            spec = tree.pop(role, None)
            if spec is None:
                if required:
                    raise KeyvalError(f'A block device must be specified for "{role}"')
                continue
            if isinstance(spec, dict):
                sub = _child_tree(flat_parent, spec, role)
                internal = "node-name" not in sub
                if internal:
                    sub["node-name"] = bdrv_anon_name()
                children[role] = blockdev_add(sub, from_json, internal=internal)
            else:
                name = to_str(spec, role, from_json=from_json)
                bs = bdrv_find_node(name)
                if bs is None:
                    raise BlockDriverError(
                        f"Cannot find device='' nor node-name='{name}'")
                bs.refcnt += 1  # held while the parent opens
                children[role] = bs
    except BaseException:
        for bs in children.values():
            bdrv_unref(bs)
        raise
    return children


def convert_options(cls: type[BlockDriver], tree: dict[str, Any], from_json: bool
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Split a node's option tree into (child role -> spec, flat option strings/values,
    converted options), refusing unknown options with QEMU's wording."""
    tree = dict(tree)
    roles = {r: tree.pop(r) for r in cls.child_roles if r in tree}
    flat = flatten(tree)
    table = {**COMMON_OPTIONS, **cls.options}
    opts: dict[str, Any] = {}
    for name, value in flat.items():
        conv = table.get(name) or cls.other_option
        if conv is None:
            raise KeyvalError(f"Parameter '{name}' is unexpected")
        opts[name] = conv(value, name, from_json=from_json)
    return roles, flat, opts


def blockdev_add(tree: dict[str, Any], from_json: bool = False,
                 internal: bool = False) -> BlockDriverState:
    """Open a node, and the new nodes its child options describe, and register them under
    their node-names.  Main thread.

    Raises KeyvalError / BlockDriverError with the one line a user should see."""
    if "driver" not in tree:
        raise KeyvalError("Parameter 'driver' is missing")
    driver = to_str(tree["driver"], "driver", from_json=from_json)
    cls = _drivers.get(driver)
    if cls is None:
        raise KeyvalError(f"Parameter 'driver' does not accept value '{driver}'")
    if "node-name" not in tree:
        raise KeyvalError("Parameter 'node-name' is missing")
    roles, flat, opts = convert_options(cls, tree, from_json)
    for role, spec in list(roles.items()):
        # ``backing=null`` (JSON null, or the keyval string): no child, and the driver is told
        # so (a format would otherwise open the backing file its header names)
        if not cls.child_roles[role] and (spec is None or spec == "null"):
            del roles[role]
            opts[role] = None
    node_name = opts["node-name"]
    if opts.get("detect-zeroes") == "unmap" and opts.get("discard", "ignore") not in (
            "unmap", "on"):
        raise KeyvalError("setting detect-zeroes to unmap is not allowed without setting "
                          "discard operation to unmap")
    # Internal nodes (inline children, blockdev-change-medium's) are named '#blockN', like
    # QEMU's anonymous nodes: a name no user can give.
    if not (internal and node_name.startswith("#")) and not _NODE_NAME.match(node_name):
        raise KeyvalError(f"Invalid node-name: '{node_name}'")
    if node_name in _nodes:
        raise BlockDriverError(f"Duplicate nodes with node-name='{node_name}'")
    children = _open_children(cls, roles, flat, from_json)
    try:
        drv = cls(node_name, opts)
        bs = BlockDriverState(
            node_name, drv, read_only=opts.get("read-only", False),
            discard=opts.get("discard", "ignore"),
            detect_zeroes=opts.get("detect-zeroes", "off"),
        )
        bs.options = opts  # what blockdev-reopen compares against
        for role, child in children.items():
            bdrv_attach_child(bs, role, child)
        drv.attach(bs)
        bdrv_refresh_limits(bs)
    except BaseException:
        if "bs" in locals():
            bdrv_unref(bs)  # closes the driver, detaches (and unrefs) the children
        for child in children.values():
            bdrv_unref(child)  # the references held while opening
        raise
    for child in children.values():
        bdrv_unref(child)  # the parent's links hold them now
    _nodes[node_name] = bs
    return bs
