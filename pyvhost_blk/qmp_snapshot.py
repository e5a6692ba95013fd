"""QMP ``blockdev-snapshot``: an external snapshot of a running node, as QEMU's.

``{"execute": "blockdev-snapshot", "arguments": {"node": "disk0", "overlay": "snap1"}}``: the
overlay is a node added before with ``blockdev-add`` (typically ``driver=qcow2`` over a file
made by ``qemu-img create -f qcow2 -b BASE -F FMT``, added with ``"backing": null``); the command
makes ``node`` the overlay's backing node and puts the overlay in ``node``'s place under every
parent — the export's BlockBackend included — drained, the guest unaware
(``blocklayer/snapshot.py``).  Afterwards ``node`` is only read, so its image can be copied
(``qemu-img convert -U``) while the guest keeps writing to the overlay.

Errors, in QEMU's words: ``Cannot find device='X' nor node-name='X'`` (either argument), ``The
overlay is already in use``, ``The overlay already has a backing image``, ``The overlay does not
support backing images``, ``An IO error has occurred`` (flushing ``node`` failed), and the
permission errors of the graph (``Block node 'X' is read-only``, image locks).  The answer comes
once the overlay is in place.  Main thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blocklayer.bdrv import BlockDriverState, bdrv_find_node
from blocklayer.snapshot import bdrv_snapshot
from pyvhost_blk.qmp import QmpDispatcher, QmpError, arg_str, args_check

if TYPE_CHECKING:
    from pyvhost_blk.daemon import Daemon

Complete = Callable[[Any], None]


def _lookup(name: str) -> BlockDriverState:
    """QEMU's bdrv_lookup_bs(name, name): a device name (exports' BlockBackends have none)
    or a node-name."""
    bs = bdrv_find_node(name)
    if bs is None:
        raise QmpError("GenericError", f"Cannot find device='{name}' nor node-name='{name}'")
    return bs


def register_snapshot_commands(daemon: Daemon, dispatcher: QmpDispatcher) -> None:
    def blockdev_snapshot(args: dict[str, Any], complete: Complete) -> None:
        args_check(args, required=("node", "overlay"))
        node = _lookup(arg_str(args, "node"))
        overlay = _lookup(arg_str(args, "overlay"))

        def done(err: Exception | None) -> None:
            complete(QmpError("GenericError", str(err)) if err is not None else {})

        bdrv_snapshot(node, overlay, done)

    dispatcher.register("blockdev-snapshot", blockdev_snapshot, is_async=True)
