"""The block-layer QMP commands, with QEMU's names, arguments and error texts.

Registered on the daemon's ``QmpDispatcher`` (``pyvhost_blk/qmp.py``); every handler runs in the
main thread.  Commands that must wait for in-flight requests (resize, medium removal, iothread
moves, export deletion's drain) are asynchronous: they drain the node, act, end the drained
section and only then answer.

Extensions (not in QEMU for exports): the tray commands address an export created with
``removable=on`` by its id; ``query-block-exports`` shows tray, iostatus and iothreads;
``query-blockstats`` lists each export's BlockBackend under ``device`` = export id;
``x-pyvhost-stats`` returns the per-queue/per-iothread counters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blocklayer.aio import qemu_get_aio_context
from blocklayer.bdrv import (
    BlockDriverError,
    bdrv_anon_name,
    bdrv_drained,
    bdrv_drained_end,
    bdrv_find_node,
    bdrv_nodes,
    bdrv_unref,
)
from blocklayer.block_backend import (
    BLK_PERM_ALL,
    BLK_PERM_RESIZE,
    BlockBackend,
    blk_dev_change_media_cb,
    blk_dev_eject_request,
    blk_dev_has_removable_media,
    blk_dev_has_tray,
    blk_dev_is_medium_locked,
    blk_dev_is_tray_open,
    blk_drain,
    blk_insert_bs,
    blk_iostatus_reset,
    blk_new,
    blk_remove_bs,
    blk_set_aio_context,
    blk_truncate,
    blk_unref,
)
from blocklayer.blockdev import blockdev_add
from blocklayer.events import qapi_event_send
from blocklayer.reopen import bdrv_reopen_multiple
from pyvhost_blk.keyval import KeyvalError
from pyvhost_blk.qmp import (
    QmpDispatcher,
    QmpError,
    arg_bool,
    arg_int,
    arg_str,
    args_check,
)
from pyvhost_blk.qmp_filters import register_filter_commands
from pyvhost_blk.qmp_snapshot import register_snapshot_commands
from vhost.server import SocketInUse

if TYPE_CHECKING:
    from pyvhost_blk.daemon import Daemon

Complete = Callable[[Any], None]


class BlockCommands:
    """Holds the daemon and implements each command (main thread)."""

    def __init__(self, daemon: Daemon, dispatcher: QmpDispatcher) -> None:
        self.d = daemon
        reg = dispatcher.register
        reg("query-block-exports", self.query_block_exports)
        reg("query-named-block-nodes", self.query_named_block_nodes)
        reg("query-blockstats", self.query_blockstats)
        reg("query-iothreads", self.query_iothreads)
        reg("x-pyvhost-stats", lambda args: self.d.stats())
        reg("blockdev-add", self.blockdev_add)
        reg("blockdev-del", self.blockdev_del)
        reg("blockdev-reopen", self.blockdev_reopen, is_async=True)
        reg("block-export-add", self.block_export_add)
        reg("block-export-del", self.block_export_del)
        reg("block_resize", self.block_resize, is_async=True)
        reg("blockdev-open-tray", self.open_tray, is_async=True)
        reg("blockdev-close-tray", self.close_tray)
        reg("blockdev-remove-medium", self.remove_medium, is_async=True)
        reg("blockdev-insert-medium", self.insert_medium)
        reg("blockdev-change-medium", self.change_medium, is_async=True)
        reg("x-blockdev-set-iothread", self.set_iothread, is_async=True)
        reg("cont", self.cont)
        reg("x-blockdev-drain", self.drain, is_async=True)
        reg("x-block-export-set-fast-path", self.set_fast_path)
        register_filter_commands(daemon, dispatcher)  # throttle, blkdebug: qmp_filters.py
        register_snapshot_commands(daemon, dispatcher)  # blockdev-snapshot: qmp_snapshot.py

    # -- queries ---------------------------------------------------------------------------
    def query_block_exports(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        args_check(args)
        return [e.info() for e in self.d.exports.values()]

    def query_named_block_nodes(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        args_check(args, optional=("flat",))
        return [bs.to_dict() for bs in bdrv_nodes()]

    def query_blockstats(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        args_check(args, optional=("query-nodes",))
        if arg_bool(args, "query-nodes", default=False):
            out = []
            for bs in bdrv_nodes():
                blks = [p for p in bs.parents if isinstance(p, BlockBackend)]
                stats = blks[0].stats.to_dict() if blks else None
                entry: dict[str, Any] = {"node-name": bs.node_name}
                if stats is not None:
                    entry["stats"] = stats
                out.append(entry)
            return out
        out = []
        for e in self.d.exports.values():
            entry = {"device": e.id, "stats": e.blk.stats.to_dict()}
            if e.node_name:
                entry["node-name"] = e.node_name
            out.append(entry)
        return out

    def query_iothreads(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        args_check(args)
        return [
            {"id": t.id, "thread-id": t.native_id, "poll-max-ns": t.poll_max_ns,
             "poll-grow": 0, "poll-shrink": 0, "aio-max-batch": 0}
            for t in self.d.iothreads.values()
        ]

    # -- nodes -------------------------------------------------------------------------------
    def blockdev_add(self, args: dict[str, Any]) -> None:
        try:
            blockdev_add(args, from_json=True)
        except (KeyvalError, BlockDriverError, PermissionError, OSError) as e:
            raise QmpError("GenericError", str(e)) from None

    def blockdev_del(self, args: dict[str, Any]) -> None:
        args_check(args, required=("node-name",))
        name = arg_str(args, "node-name")
        bs = bdrv_find_node(name)
        if bs is None:
            raise QmpError("GenericError", f"Failed to find node with node-name='{name}'")
        # QEMU's qmp_blockdev_del, in its order: a device uses it; it was not added by the
        # monitor (an inline child, a medium's node); another node uses it.
        if any(isinstance(p, BlockBackend) for p in bs.parents):
            raise QmpError("GenericError", f"Node {name} is in use")
        if name.startswith("#"):
            raise QmpError("GenericError", f"Node {name} is not owned by the monitor")
        if bs.parents:
            raise QmpError("GenericError", f"Block device {name} is in use")
        bdrv_unref(bs)

    def blockdev_reopen(self, args: dict[str, Any], complete: Complete) -> None:
        """QEMU's blockdev-reopen: ``options`` lists nodes with their new options (today: which
        node each child role points at; blocklayer/reopen.py)."""
        args_check(args, required=("options",))
        entries = args["options"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise QmpError("GenericError", "Invalid parameter type for 'options', expected: array")

        def done(err: Exception | None) -> None:
            complete(QmpError("GenericError", str(err)) if err is not None else {})

        bdrv_reopen_multiple(entries, done)

    # -- exports -------------------------------------------------------------------------------
    def block_export_add(self, args: dict[str, Any]) -> None:
        try:
            self.d.add_export(args, True)
        except (KeyvalError, PermissionError, OSError, SocketInUse) as e:
            raise QmpError("GenericError", str(e)) from None

    def block_export_del(self, args: dict[str, Any]) -> None:
        args_check(args, required=("id",), optional=("mode",))
        eid = arg_str(args, "id")
        mode = arg_str(args, "mode", default="safe")
        if mode not in ("safe", "hard"):
            raise QmpError("GenericError", f"Parameter 'mode' does not accept value '{mode}'")
        exp = self.d.exports.get(eid)
        if exp is None or exp.shutting_down:
            raise QmpError("GenericError", f"Export '{eid}' is not found")
        if mode == "safe" and exp.server is not None and exp.server.conn is not None:
            raise QmpError("GenericError", f"export '{eid}' still in use")
        exp.shutting_down = True

        def deleted() -> None:
            exp.delete()
            self.d.remove_export(eid)
            qapi_event_send("BLOCK_EXPORT_DELETED", {"id": eid})

        # Like QEMU, answer now; the export disappears once its requests have drained.
        if exp.server is not None:
            exp.server.shutdown(lambda: blk_drain(exp.blk, deleted))
        else:
            blk_drain(exp.blk, deleted)

    def _export_by_id(self, args: dict[str, Any]) -> Any:
        """QEMU's qmp_get_blk: exactly one of 'device' and 'id' (here both name an export)."""
        dev, qid = args.get("device"), args.get("id")
        if (dev is None) == (qid is None):
            raise QmpError("GenericError", "Need exactly one of 'device' and 'id'")
        name = arg_str(args, "device" if dev is not None else "id")
        exp = self.d.exports.get(name)
        if exp is None:
            raise QmpError("DeviceNotFound", f"Device '{name}' not found")
        return exp, name

    # -- resize ---------------------------------------------------------------------------------
    def block_resize(self, args: dict[str, Any], complete: Complete) -> None:
        args_check(args, required=("size",), optional=("device", "node-name"))
        size = arg_int(args, "size", "int64")
        dev, node = args.get("device"), args.get("node-name")
        bs = None
        if node is not None:
            bs = bdrv_find_node(arg_str(args, "node-name"))
        if bs is None and dev is not None:
            exp = self.d.exports.get(arg_str(args, "device"))
            bs = exp.blk.root if exp is not None else None
        if bs is None:
            raise QmpError("GenericError",
                           f"Cannot find device={dev or ''} nor node-name={node or ''}")
        if size < 0:
            raise QmpError("GenericError", "Parameter 'size' expects a >0 size")
        blk = blk_new(qemu_get_aio_context(), BLK_PERM_RESIZE, BLK_PERM_ALL)
        try:
            blk_insert_bs(blk, bs)
        except PermissionError as e:
            blk_unref(blk)
            raise QmpError("GenericError", str(e)) from None

        def drained() -> None:
            try:
                blk_truncate(blk, size)
                result: Any = {}
            except OSError as e:
                result = QmpError("GenericError", e.strerror or str(e))
            finally:
                bdrv_drained_end(bs)
                blk_unref(blk)
            complete(result)

        bdrv_drained(bs, drained)

    # -- tray and medium -------------------------------------------------------------------------
    def open_tray(self, args: dict[str, Any], complete: Complete) -> None:
        args_check(args, optional=("device", "id", "force"))
        exp, name = self._export_by_id(args)
        force = arg_bool(args, "force", default=False)
        blk = exp.blk
        if not blk_dev_has_removable_media(blk):
            raise QmpError("GenericError", f"Device '{name}' is not removable")
        if not blk_dev_has_tray(blk):
            raise QmpError("GenericError", f"Device '{name}' does not have a tray")
        if blk_dev_is_tray_open(blk):
            complete({})
            return
        locked = blk_dev_is_medium_locked(blk)
        if locked:
            blk_dev_eject_request(blk, force)
        if not locked or force:
            blk_dev_change_media_cb(blk, False)
        complete({})

    def close_tray(self, args: dict[str, Any]) -> None:
        args_check(args, optional=("device", "id"))
        exp, name = self._export_by_id(args)
        blk = exp.blk
        if not blk_dev_has_removable_media(blk):
            raise QmpError("GenericError", f"Device '{name}' is not removable")
        if not blk_dev_has_tray(blk) or not blk_dev_is_tray_open(blk):
            return
        try:
            blk_dev_change_media_cb(blk, True)
        except ValueError as e:
            raise QmpError("GenericError", str(e)) from None

    def remove_medium(self, args: dict[str, Any], complete: Complete) -> None:
        args_check(args, required=("id",))
        exp, name = self._export_by_id(args)
        blk = exp.blk
        if not blk_dev_has_removable_media(blk):
            raise QmpError("GenericError", f"Device '{name}' is not removable")
        if blk_dev_has_tray(blk) and not blk_dev_is_tray_open(blk):
            raise QmpError("GenericError", f"Tray of device '{name}' is not open")
        if blk.root is None:
            complete({})
            return

        def drained() -> None:
            blk_remove_bs(blk)
            if not blk_dev_has_tray(blk):
                blk_dev_change_media_cb(blk, False)
            complete({})

        blk_drain(blk, drained)

    def insert_medium(self, args: dict[str, Any]) -> None:
        args_check(args, required=("id", "node-name"))
        exp, name = self._export_by_id(args)
        node = arg_str(args, "node-name")
        bs = bdrv_find_node(node)
        if bs is None:
            raise QmpError("GenericError", f"Node '{node}' not found")
        if bs.parents:
            raise QmpError("GenericError", f"Node '{node}' is already in use")
        self._insert(exp, name, bs)

    def _insert(self, exp: Any, name: str, bs: Any) -> None:
        blk = exp.blk
        if not blk_dev_has_removable_media(blk):
            raise QmpError("GenericError", f"Device '{name}' is not removable")
        if blk_dev_has_tray(blk) and not blk_dev_is_tray_open(blk):
            raise QmpError("GenericError", f"Tray of device '{name}' is not open")
        if blk.root is not None:
            raise QmpError("GenericError", f"There already is a medium in device '{name}'")
        try:
            blk_insert_bs(blk, bs)
        except PermissionError as e:
            raise QmpError("GenericError", str(e)) from None
        if not blk_dev_has_tray(blk):
            blk_dev_change_media_cb(blk, True)

    def change_medium(self, args: dict[str, Any], complete: Complete) -> None:
        args_check(args, required=("filename",),
               optional=("device", "id", "format", "read-only-mode", "force"))
        exp, name = self._export_by_id(args)
        filename = arg_str(args, "filename")
        fmt = arg_str(args, "format", default="raw")
        if fmt not in ("raw", "file"):
            raise QmpError("GenericError", f"Unknown driver '{fmt}' (pyvhost-blk has raw files)")
        ro_mode = arg_str(args, "read-only-mode", default="retain")
        if ro_mode not in ("retain", "read-only", "read-write"):
            raise QmpError("GenericError",
                           f"Parameter 'read-only-mode' does not accept value '{ro_mode}'")
        read_only = {"retain": not exp.writable, "read-only": True,
                     "read-write": False}[ro_mode]
        try:
            bs = blockdev_add({"driver": "file", "node-name": bdrv_anon_name(),
                               "filename": filename, "read-only": read_only}, from_json=True,
                              internal=True)
        except (KeyvalError, BlockDriverError) as e:
            raise QmpError("GenericError", str(e)) from None

        def after_open(_: Any) -> None:
            def after_remove(_: Any) -> None:
                try:
                    self._insert(exp, name, bs)
                except QmpError as e:
                    bdrv_unref(bs)
                    complete(e)
                    return
                bdrv_unref(bs)  # the export's reference keeps it open now
                self.close_tray({"id": name})
                complete({})

            self.remove_medium({"id": name}, _chain(after_remove, complete, bs))

        try:
            self.open_tray({"id": name, "force": arg_bool(args, "force", default=False)},
                           _chain(after_open, complete, bs))
        except QmpError:
            bdrv_unref(bs)
            raise

    # -- iothreads ---------------------------------------------------------------------------
    def set_iothread(self, args: dict[str, Any], complete: Complete) -> None:
        args_check(args, required=("node-name", "iothread"), optional=("force",))
        name = arg_str(args, "node-name")
        bs = bdrv_find_node(name)
        if bs is None:
            raise QmpError("GenericError", f"Failed to find node with node-name='{name}'")
        force = arg_bool(args, "force", default=False)
        if bs.parents and not force:
            raise QmpError("GenericError",
                           f"Node {name} is associated with a BlockBackend and could not be "
                           "moved. Use force=true to override.")
        target = args["iothread"]
        if target is None:
            ctx = qemu_get_aio_context()
        else:
            tid = arg_str(args, "iothread")
            t = self.d.iothreads.get(tid)
            if t is None:
                raise QmpError("GenericError", f"Cannot find iothread {tid}")
            ctx = t.ctx
        users = [e for e in self.d.exports.values() if e.blk in bs.parents]
        for e in users:
            why = e.can_set_aio_context(ctx)
            if why:
                raise QmpError("GenericError", why)

        def drained() -> None:
            for e in users:
                blk_set_aio_context(e.blk, ctx)
            bdrv_drained_end(bs)
            complete({})

        bdrv_drained(bs, drained)

    def set_fast_path(self, args: dict[str, Any]) -> None:
        """Extension: ``{"id": EXPORT, "enable": bool}`` — serve plain reads/writes/flushes in
        C (the default) or send every request through the node graph's Python code (batches)."""
        args_check(args, required=("id", "enable"))
        eid = arg_str(args, "id")
        exp = self.d.exports.get(eid)
        if exp is None:
            raise QmpError("GenericError", f"Export '{eid}' is not found")
        exp.set_fast_path(arg_bool(args, "enable"))

    def drain(self, args: dict[str, Any], complete: Complete) -> None:
        """Extension: drain a node (stop its users, wait for their in-flight requests), hold
        the drained section for ``hold-ms`` milliseconds, end it, then answer.  For tests
        and maintenance."""
        args_check(args, required=("node-name",), optional=("hold-ms",))
        name = arg_str(args, "node-name")
        bs = bdrv_find_node(name)
        if bs is None:
            raise QmpError("GenericError", f"Failed to find node with node-name='{name}'")
        hold = arg_int(args, "hold-ms", "uint32", default=0)

        def drained() -> None:
            def end() -> None:
                bdrv_drained_end(bs)
                complete({})

            if hold:
                threading.Timer(hold / 1000, qemu_get_aio_context().schedule, (end,)).start()
            else:
                end()

        bdrv_drained(bs, drained)

    # -- run state ---------------------------------------------------------------------------
    def cont(self, args: dict[str, Any]) -> None:
        args_check(args)
        for e in self.d.exports.values():
            blk_iostatus_reset(e.blk)
            e.resume_after_error()


def _chain(then: Callable[[Any], None], complete: Complete, bs: Any) -> Complete:
    """Continue with ``then`` unless the previous async step failed (then clean up)."""

    def step(result: Any) -> None:
        if isinstance(result, QmpError):
            bdrv_unref(bs)
            complete(result)
        else:
            then(result)

    return step

