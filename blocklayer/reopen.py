"""blockdev-reopen: change the options of open nodes — today, which node a filter or format
sits on (QEMU's ``bdrv_reopen_multiple``, QMP ``blockdev-reopen``).

Theory of operation
-------------------
Each entry is a node's complete options, as for ``blockdev-add``.  Everything is checked before
anything changes: the node exists, its driver is the same, every child named is an existing
node (references only: a reopen creates no nodes) and would not make a cycle, and no other
option differs from what the node was opened with (``Cannot change the option 'X'``, QEMU's
words; a child role left out keeps its child, as QEMU keeps ``file``).  Then, per node, the node
is drained, its links are pointed at the new children (the new child takes the permissions
first and may refuse: then that node is left as it was), the alignments of it and of every
node above it are refreshed, and each BlockBackend above refreshes what the C request path may
serve — so a filter taken out of the path hands the requests back to C, and one put in sees
every request.  Main thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blocklayer.aio import aio_wait_until
from blocklayer.bdrv import (
    BlockDriverError,
    BlockDriverState,
    _drivers,
    bdrv_drain_poll,
    bdrv_drained_begin,
    bdrv_drained_end,
    bdrv_find_node,
    bdrv_refresh_above,
)
from blocklayer.blockdev import convert_options
from blocklayer.graph import bdrv_is_below, bdrv_replace_child
from blocklayer.qapi import KeyvalError, to_str

Plan = tuple[BlockDriverState, dict[str, BlockDriverState]]


def _check(tree: dict[str, Any]) -> Plan:
    if "node-name" not in tree:
        raise KeyvalError("node-name not specified")
    name = to_str(tree["node-name"], "node-name", from_json=True)
    bs = bdrv_find_node(name)
    if bs is None:
        raise BlockDriverError(f"Failed to find node with node-name='{name}'")
    cls = type(bs.drv)
    driver = to_str(tree.get("driver", ""), "driver", from_json=True)
    if driver != cls.format_name or driver not in _drivers:
        raise BlockDriverError("Cannot change the option 'driver'")
    roles, _flat, opts = convert_options(cls, tree, True)
    for key in (opts.keys() | bs.options.keys()) - cls.child_roles.keys():
        if opts.get(key) != bs.options.get(key):
            raise BlockDriverError(f"Cannot change the option '{key}'")
    new_children: dict[str, BlockDriverState] = {}
    for role, spec in roles.items():
        if not isinstance(spec, str):
            raise BlockDriverError(
                f"Cannot create a node while reopening '{name}': give '{role}' as a node-name")
        child = bdrv_find_node(spec)
        if child is None:
            raise BlockDriverError(f"Cannot find device='' nor node-name='{spec}'")
        if role not in bs.children:
            raise BlockDriverError(f"Cannot add a '{role}' child to '{name}' on reopen")
        if bdrv_is_below(bs, child):
            raise BlockDriverError(
                f"Making '{spec}' a {role} child of '{name}' would create a cycle")
        if bs.children[role].bs is not child:
            new_children[role] = child
    return bs, new_children


def bdrv_reopen_multiple(entries: list[dict[str, Any]],
                         then: Callable[[Exception | None], None]) -> None:
    """Check every entry, then reopen the nodes one after the other, each drained while its
    links change.  ``then(None)`` when done, or ``then(error)`` with the first failure (nodes
    before it stay reopened, as QEMU's transaction does not undo a committed node either)."""
    try:
        plans = [_check(e) for e in entries]
    except (KeyvalError, BlockDriverError) as e:
        then(e)
        return

    def step(i: int) -> None:
        if i == len(plans):
            then(None)
            return
        bs, new_children = plans[i]
        if not new_children:
            step(i + 1)
            return
        bdrv_drained_begin(bs)

        def drained() -> None:
            err: Exception | None = None
            try:
                for role, child in new_children.items():
                    bdrv_replace_child(bs.children[role], child)
                bdrv_refresh_above(bs)
            except PermissionError as e:
                err = e
            finally:
                bdrv_drained_end(bs)
            if err is not None:
                then(err)
            else:
                step(i + 1)

        aio_wait_until(lambda: not bdrv_drain_poll(bs), drained)

    step(0)
