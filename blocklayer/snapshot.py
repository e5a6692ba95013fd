"""External snapshots: put an overlay on top of a running node (QEMU's ``bdrv_append``, behind
QMP ``blockdev-snapshot``).

Theory of operation
-------------------
``bdrv_snapshot(node, overlay, then)`` does what QEMU's ``external_snapshot_prepare`` /
``_commit`` do for ``blockdev-snapshot``:

1. **Checks** (nothing changes if one fails, QEMU's words): neither node is some node's
   backing node ("Node 'X' is busy: node is used as backing hd of 'Y'", QEMU's op blocker),
   the overlay is no device's root ("The overlay is already in use"), has no backing child
   ("The overlay already has a backing image"), its driver takes one ("The overlay does not
   support backing images"), and is neither the node nor below it (that would make a
   cycle).
2. **Drain** ``node``: every parent stops submitting and its requests in flight complete.
   While the links move, every BlockBackend above ``node`` holds one more drained section of
   its own, so no device ever resumes half-way (a link moving from a drained node to another
   drained node would otherwise see its count drop to zero for a moment).
3. **Flush** ``node`` if it is writable (a format writes back its metadata): the image under the
   overlay is complete on disk before anything is written above it.  A failure ends the
   command with "An IO error has occurred" and changes nothing.
4. **Append**: ``node`` becomes the overlay's ``backing`` child; then every parent of ``node``
   (BlockBackends — the export's — and other nodes' links, except the overlay's new backing
   link) is pointed at the overlay instead (QEMU's ``bdrv_replace_node``): each takes its
   permissions on the overlay's subgraph first and, if a node or another process refuses, the
   graph goes back to what it was.  Alignments are refreshed and each BlockBackend refreshes
   its C state, so a raw node the C path served directly is no longer touched by it and the
   overlay's requests go through its driver.  The guest sees nothing: the same device, the
   same data (the overlay reads what it does not have from ``node``).
5. As QEMU's commit step, ``node`` becomes read-only, with the children only it uses (its
   ``file``), errors ignored: its parents now only read it, so its image gives up the write
   lock (``qemu-img`` can then copy it with
   ``-U``/``--force-share``, or even without once nothing writes it).

The overlay's image header is not changed: as in QEMU, the overlay should have been created
naming ``node``'s file as its backing file (``qemu-img create -b``) for the chain to survive a
restart.  Main thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blocklayer.aio import aio_wait_until, qemu_get_aio_context
from blocklayer.bdrv import (
    BlockDriverState,
    bdrv_drain_poll,
    bdrv_drained_begin,
    bdrv_drained_end,
    bdrv_refresh_above,
    bdrv_unref,
)
from blocklayer.graph import (
    BdrvChild,
    bdrv_attach_child,
    bdrv_is_below,
    bdrv_refresh_perms,
    bdrv_replace_child,
)
from blocklayer.io import bdrv_aio_flush


class SnapshotError(Exception):
    """The snapshot was refused or failed; ``str(e)`` is QEMU's message."""


def _backends_above(bs: BlockDriverState, out: list[Any]) -> list[Any]:
    """Every BlockBackend above ``bs`` (through other nodes' links), each once."""
    for p in bs.parents:
        if isinstance(p, BdrvChild):
            _backends_above(p.parent, out)
        elif p not in out:
            out.append(p)
    return out


def _busy(bs: BlockDriverState) -> None:
    """QEMU's op blocker on a backing node (bdrv_op_is_blocked, EXTERNAL_SNAPSHOT)."""
    for p in bs.parents:
        if isinstance(p, BdrvChild) and p.role == "backing":
            raise SnapshotError(f"Node '{bs.node_name}' is busy: node is used as backing hd "
                                f"of '{p.parent.node_name}'")


def check_snapshot(node: BlockDriverState, overlay: BlockDriverState) -> None:
    """QEMU's checks of external_snapshot_prepare, in its order; SnapshotError if refused."""
    _busy(node)
    if any(not isinstance(p, BdrvChild) for p in overlay.parents):
        raise SnapshotError("The overlay is already in use")
    _busy(overlay)
    if "backing" in overlay.children:
        raise SnapshotError("The overlay already has a backing image")
    if "backing" not in type(overlay.drv).child_roles:
        raise SnapshotError("The overlay does not support backing images")
    if bdrv_is_below(overlay, node):
        raise SnapshotError(f"Making '{node.node_name}' a backing child of "
                            f"'{overlay.node_name}' would create a cycle")


def _move_backend(blk: Any, old: BlockDriverState, new: BlockDriverState) -> None:
    """Point a BlockBackend's root at ``new`` (both nodes drained; ``blk`` holds an extra
    drained section, so its count never reaches zero here).  PermissionError: unchanged."""
    for _ in range(new.quiesce_counter):
        blk.root_drained_begin()
    old.parents.remove(blk)
    new.parents.append(blk)
    blk.root = new
    try:
        bdrv_refresh_perms(new, blk, blk.perm, blk.shared_perm)
    except PermissionError:
        new.parents.remove(blk)
        old.parents.append(blk)
        blk.root = old
        for _ in range(new.quiesce_counter):
            blk.root_drained_end()
        for bs in (old, new):  # what they held a moment ago
            try:
                bdrv_refresh_perms(bs)
            except PermissionError:
                pass
        raise
    for _ in range(old.quiesce_counter):
        blk.root_drained_end()
    new.refcnt += 1
    bdrv_unref(old)  # the overlay's backing link keeps it


def bdrv_append(overlay: BlockDriverState, node: BlockDriverState) -> None:
    """``node`` becomes ``overlay``'s backing child and ``overlay`` takes its place under every
    parent of ``node``.  Both drained by the caller.  Raises PermissionError (graph unchanged)
    if a parent cannot get its permissions on the overlay's subgraph."""
    link = bdrv_attach_child(overlay, "backing", node)
    moved: list[tuple[Any, str]] = []
    try:
        bdrv_refresh_perms(overlay)
        for p in [p for p in node.parents if p is not link]:
            if isinstance(p, BdrvChild):
                bdrv_replace_child(p, overlay)
                moved.append((p, "child"))
            else:
                _move_backend(p, node, overlay)
                moved.append((p, "blk"))
    except PermissionError:
        for p, kind in reversed(moved):  # back to node: it held these permissions before
            if kind == "child":
                bdrv_replace_child(p, node)
            else:
                _move_backend(p, overlay, node)
        for _ in range(link.bs.quiesce_counter):
            link.root_drained_end()
        node.parents.remove(link)
        del overlay.children["backing"]
        node.refcnt -= 1  # the link's reference (node stays referenced by its parents)
        try:
            bdrv_refresh_perms(overlay)
        except PermissionError:
            pass
        raise
    bdrv_refresh_above(overlay)


def _make_read_only(bs: BlockDriverState) -> None:
    """QEMU's bdrv_reopen_set_read_only(old, true) after the snapshot, errors ignored: the
    node and the children only it uses (its ``file``) become read-only; then the permissions
    (and image locks) follow."""
    def mark(n: BlockDriverState) -> None:
        if n.read_only:
            return
        n.read_only = True
        if hasattr(n.drv, "writable"):
            n.drv.writable = False
        for c in n.children.values():
            if all(isinstance(p, BdrvChild) and p.parent is n for p in c.bs.parents):
                mark(c.bs)

    mark(bs)
    try:
        bdrv_refresh_perms(bs)
    except PermissionError:
        pass


def bdrv_snapshot(node: BlockDriverState, overlay: BlockDriverState,
                  then: Callable[[Exception | None], None]) -> None:
    """Main thread: the external snapshot of the module docstring; ``then(None)`` once the
    overlay is in place, ``then(SnapshotError or PermissionError)`` if refused (no change)."""
    try:
        check_snapshot(node, overlay)
    except SnapshotError as e:
        then(e)
        return
    bdrv_drained_begin(node)
    bdrv_drained_begin(overlay)

    def finish(err: Exception | None) -> None:
        bdrv_drained_end(overlay)
        bdrv_drained_end(node)
        then(err)

    def flushed(ret: int) -> None:
        if ret < 0:
            finish(SnapshotError("An IO error has occurred"))
            return
        try:  # the graph may have changed while draining and flushing
            check_snapshot(node, overlay)
        except SnapshotError as e:
            finish(e)
            return
        held = _backends_above(node, [])
        for blk in held:
            blk.root_drained_begin()
        err: Exception | None = None
        try:
            bdrv_append(overlay, node)
        except PermissionError as e:
            # QEMU's words for the common case: the overlay cannot take its parents' writes
            err = SnapshotError("Block node is read-only") \
                if str(e).endswith("is read-only") else e
        finally:
            for blk in held:
                blk.root_drained_end()
        if err is None:
            _make_read_only(node)
        finish(err)

    def drained() -> None:
        if node.read_only:
            flushed(0)
        else:
            bdrv_aio_flush(node, qemu_get_aio_context(), flushed)

    aio_wait_until(lambda: not bdrv_drain_poll(node), drained)
