"""The block graph: parent → child links with roles and permissions (QEMU's ``BdrvChild``).

Theory of operation
-------------------
A node (``BlockDriverState``) reaches its children only through ``BdrvChild`` links, each with
a role (``file``, ``backing``) and a permission pair: what the parent takes on the child and
what it lets others do.  A node's *parents* are the objects holding a link to it: a
``BlockBackend`` (role ``root``) or a ``BdrvChild`` of another node.  Every parent answers the
same questions — ``perm``/``shared_perm``, ``role``, ``parent_desc()`` for error messages — and
receives the same callbacks (QEMU's ``BdrvChildClass``): ``root_drained_begin/poll/end``,
``root_resize``, ``root_change_media``.  A ``BdrvChild`` forwards them to its parent node's own
parents, so a drain or a resize of a leaf reaches the device at the top.

**Permissions.**  A node's permissions are the union of its parents' ``perm`` and the
intersection of their ``shared_perm``; a parent whose wish another parent does not share is
refused with QEMU's wording.  The node's driver derives what each child link needs from that
(``BlockDriver.child_perm``; formats and filters pass them through).  ``bdrv_refresh_perms``
first checks the whole subgraph below a changed parent, and only then applies the result,
leaves first (a ``file`` leaf takes the image's OFD locks in ``set_perm``); if a leaf refuses
(another process holds the image), what was applied is rolled back and nothing changes.

Main thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blocklayer.bdrv import BlockDriverState

BLK_PERM_CONSISTENT_READ = 0x01
BLK_PERM_WRITE = 0x02
BLK_PERM_WRITE_UNCHANGED = 0x04
BLK_PERM_RESIZE = 0x08
BLK_PERM_ALL = 0x0F
PERM_NAMES = {
    BLK_PERM_CONSISTENT_READ: "consistent read",
    BLK_PERM_WRITE: "write",
    BLK_PERM_WRITE_UNCHANGED: "write unchanged",
    BLK_PERM_RESIZE: "resize",
}


def perm_names(perm: int) -> str:
    """QEMU's ``bdrv_perm_names``: the names of the bits in ``perm``, comma-separated."""
    return ", ".join(n for bit, n in PERM_NAMES.items() if perm & bit)


class BdrvChild:
    """A node's link to one child: ``parent`` uses ``bs`` as ``role``."""

    def __init__(self, parent: BlockDriverState, role: str, bs: BlockDriverState) -> None:
        self.parent = parent
        self.role = role
        self.bs = bs
        self.perm = 0
        self.shared_perm = BLK_PERM_ALL

    def parent_desc(self) -> str:
        return f"node '{self.parent.node_name}'"

    # -- BdrvChildClass callbacks: the child tells its parent node, which tells its parents --
    def root_drained_begin(self) -> None:
        from blocklayer.bdrv import bdrv_drained_begin

        bdrv_drained_begin(self.parent)

    def root_drained_poll(self) -> bool:
        from blocklayer.bdrv import bdrv_drain_poll

        return bdrv_drain_poll(self.parent)

    def root_drained_end(self) -> None:
        from blocklayer.bdrv import bdrv_drained_end

        bdrv_drained_end(self.parent)

    def root_resize(self) -> None:
        for p in list(self.parent.parents):
            p.root_resize()

    def root_change_media(self, load: bool) -> None:
        pass  # only a device has a tray


def bdrv_attach_child(parent: BlockDriverState, role: str,
                      child_bs: BlockDriverState) -> BdrvChild:
    """Link ``child_bs`` below ``parent`` as ``role`` (no permissions yet: the parent's own
    parents bring them, through bdrv_refresh_perms).  A drained child drains its new parent."""
    if role in parent.children:
        raise ValueError(f"node '{parent.node_name}' already has a child '{role}'")
    c = BdrvChild(parent, role, child_bs)
    parent.children[role] = c
    child_bs.parents.append(c)
    child_bs.refcnt += 1
    for _ in range(child_bs.quiesce_counter):
        c.root_drained_begin()
    return c


def bdrv_detach_children(bs: BlockDriverState) -> None:
    """Drop every child link of ``bs`` (it is being closed), releasing their permissions."""
    from blocklayer.bdrv import bdrv_unref

    for c in list(bs.children.values()):
        for _ in range(c.bs.quiesce_counter):
            c.root_drained_end()
        c.bs.parents.remove(c)
        del bs.children[c.role]
        _release(c.bs)
        bdrv_unref(c.bs)


def bdrv_replace_child(c: BdrvChild, new_bs: BlockDriverState) -> None:
    """Point link ``c`` at ``new_bs`` instead of its current child (QEMU's
    bdrv_replace_child_noperm plus the permission update), the parent node being drained.
    The new child takes the link's permissions first; if it refuses (PermissionError, in QEMU's
    words), nothing changes.  The old child gives them up and loses the link's reference."""
    from blocklayer.bdrv import bdrv_unref

    old = c.bs

    def move(src: BlockDriverState, dst: BlockDriverState) -> None:
        for _ in range(src.quiesce_counter):
            c.root_drained_end()
        src.parents.remove(c)
        c.bs = dst
        dst.parents.append(c)
        for _ in range(dst.quiesce_counter):
            c.root_drained_begin()

    move(old, new_bs)
    # The old subgraph gives up the link's permissions first (its nodes may hold the new child
    # too, e.g. a filter taken out over the same leaf), as in QEMU's single transaction.
    _release(old)
    try:
        bdrv_refresh_perms(new_bs, c, c.perm, c.shared_perm)
    except PermissionError:
        move(new_bs, old)
        bdrv_refresh_perms(old)  # it held them a moment ago
        raise
    new_bs.refcnt += 1
    bdrv_unref(old)


def _release(bs: BlockDriverState) -> None:
    try:
        bdrv_refresh_perms(bs)
    except PermissionError:
        pass  # giving up permissions cannot conflict


def bdrv_is_below(bs: BlockDriverState, top: BlockDriverState) -> bool:
    """``bs`` is ``top`` or one of its descendants."""
    return bs is top or any(bdrv_is_below(bs, c.bs) for c in top.children.values())


def bdrv_parent_perms(bs: BlockDriverState, changing: Any = None, perm: int = 0,
                      shared: int = BLK_PERM_ALL) -> tuple[int, int]:
    """The node's combined (perm, shared) if ``changing`` (one of its parents, or a parent
    about to be attached, or None) asked for (perm, shared); PermissionError in QEMU's words
    if that conflicts with another parent."""
    total_perm, total_shared = perm, shared
    for other in bs.parents:
        if other is changing:
            continue
        if perm & ~other.shared_perm:
            raise PermissionError(
                f"Conflicts with use by {other.parent_desc()} as '{other.role}', which does "
                f"not allow '{perm_names(perm & ~other.shared_perm)}' on {bs.node_name}"
            )
        if other.perm & ~shared:
            raise PermissionError(
                f"Conflicts with use by {other.parent_desc()} as '{other.role}', which uses "
                f"'{perm_names(other.perm & ~shared)}' on {bs.node_name}"
            )
        total_perm |= other.perm
        total_shared &= other.shared_perm
    return total_perm, total_shared


@dataclass
class _Step:
    bs: BlockDriverState
    perm: int
    shared: int
    links: list[tuple[BdrvChild, int, int]]


def _plan(bs: BlockDriverState, changing: Any, perm: int, shared: int,
          steps: list[_Step]) -> None:
    total = bdrv_parent_perms(bs, changing, perm, shared)
    if total[0] & (BLK_PERM_WRITE | BLK_PERM_RESIZE) and (
            bs.read_only or not bs.drv.can_write()):
        raise PermissionError(f"Block node '{bs.node_name}' is read-only")
    step = _Step(bs, *total, links=[])
    steps.append(step)
    for c in bs.children.values():
        cperm, cshared = bs.drv.child_perm(c.role, *total)
        step.links.append((c, cperm, cshared))
        _plan(c.bs, c, cperm, cshared, steps)


def bdrv_refresh_perms(bs: BlockDriverState, changing: Any = None, perm: int = 0,
                       shared: int = BLK_PERM_ALL) -> None:
    """Recompute the permissions of ``bs`` and everything below it, with ``changing`` (a
    parent) asking for (perm, shared) instead of what it holds now.  Checks the whole subgraph
    first; applies leaves first; raises PermissionError and changes nothing on a conflict.
    The caller records the changing parent's new perm/shared itself, once this succeeded."""
    steps: list[_Step] = []
    _plan(bs, changing, perm, shared, steps)
    done: list[_Step] = []
    try:
        for step in reversed(steps):  # leaves first: they may still refuse (image locks)
            step.bs.drv.set_perm(step.perm, step.shared)
            done.append(step)
    except PermissionError:
        for step in done:
            try:
                old = bdrv_parent_perms(step.bs)
                step.bs.drv.set_perm(*old)
            except PermissionError:
                pass
        raise
    for step in steps:
        for c, cperm, cshared in step.links:
            c.perm, c.shared_perm = cperm, cshared
