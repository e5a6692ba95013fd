"""QMP commands of the built-in filters: throttling (QEMU's names) and blkdebug (ours).

Theory of operation
-------------------
``register_filter_commands(daemon, dispatcher)`` adds, like ``BlockCommands`` does:

* ``block_set_io_throttle`` — QEMU's arguments (``bps``, ``bps_rd``, ``bps_wr``, ``iops``,
  ``iops_rd``, ``iops_wr``; ``*_max``, ``*_max_length``, ``iops_size``, ``group``).  QEMU sets
  limits on a *device's* BlockBackend; pyvhost-blk keeps limits in ``throttle`` filter nodes
  only, so the command acts on the first throttle node at or below the device's root node.
  ``device`` names an export (its id) or, our extension, a node; ``id`` names an export.
  Then, as QEMU's ``docs/throttle.txt`` says: the new limits apply to the node's whole group
  (last one wins); ``group`` moves the node to that group first (created if need be); a node
  whose limits were switched off joins ``group``, else a group named after the device; all
  limits 0 takes the node out of its group (its I/O then passes unthrottled, the other
  members are unaffected).  A device with no throttle node gets an error: no node is inserted
  implicitly.  Moving a node between groups drains it (with its limits lifted, so queued
  requests go at once); the answer comes once that is done.
* ``object-add`` / ``object-del`` — ``throttle-group`` objects (``object-add`` passes other
  types to the daemon's ``--object`` code: ``iothread``, ``x-prometheus``); deleting a group a
  node uses is refused with QEMU's words.
* ``qom-get`` / ``qom-set`` on a throttle group (path ``/objects/ID`` or ``ID``): property
  ``limits`` (QAPI ThrottleLimits; setting it merges the members given and empties the
  buckets, as QEMU), ``type``, and the read-only ``x-iops-total`` ... properties.
* ``x-query-throttle`` (ours) — every throttle node: group, limits in BlockDeviceInfo's names,
  requests queued now, and how many waited / went at once.
* ``x-blkdebug-set-rules`` (ours) — ``{"node-name": N, "rules": [inject-error rules as in
  ``--blockdev``'s ``inject-error``], "set-state": [...], "state": S}`` (the last two
  optional): replace a blkdebug node's rules at run time.  ``x-blkdebug-clear`` removes them
  all (state back to 1); ``x-blkdebug-query`` shows them, with how often each fired.

Every handler runs in the main thread.  ``query-named-block-nodes`` shows a throttle node's
limits through ``ThrottleFilter.block_device_info`` once ``BlockDriverState.to_dict`` merges
it (docs/filters.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from blocklayer.bdrv import (
    BlockDriverState,
    bdrv_drained,
    bdrv_drained_end,
    bdrv_find_node,
    bdrv_nodes,
)
from blocklayer.drivers.blkdebug import (
    BlkdebugDriver,
    parse_inject_rules,
    parse_set_state_rules,
)
from blocklayer.drivers.throttle import ThrottleFilter, throttle_nodes_below
from blocklayer.throttle_group import (
    BUCKET_NAMES,
    UINT_MAX,
    X_PROPERTIES,
    ThrottleConfig,
    ThrottleGroup,
    limits_to_config,
    throttle_group_find,
    throttle_group_object_add,
    throttle_group_object_del,
    throttle_group_register_tgm,
    throttle_group_unregister_tgm,
)
from pyvhost_blk.keyval import KeyvalError, ParsedOption
from pyvhost_blk.qmp import QmpDispatcher, QmpError, arg_dict, arg_int, arg_str, args_check

if TYPE_CHECKING:
    from pyvhost_blk.daemon import Daemon

Complete = Callable[[Any], None]

_LEGACY = tuple(legacy for _, legacy in BUCKET_NAMES.values())  # bps, bps_rd, ... iops_wr
_THROTTLE_OPTIONAL = (
    "device", "id", *(f"{n}_max" for n in _LEGACY), *(f"{n}_max_length" for n in _LEGACY),
    "iops_size", "group",
)


def register_filter_commands(daemon: Daemon, dispatcher: QmpDispatcher) -> FilterCommands:
    """Main thread, at startup: add the filters' commands (those not registered already)."""
    return FilterCommands(daemon, dispatcher)


class FilterCommands:
    """Holds the daemon and implements each command (main thread)."""

    def __init__(self, daemon: Daemon, dispatcher: QmpDispatcher) -> None:
        self.d = daemon
        have = set(dispatcher.command_names())
        for name, fn, is_async in (
            ("block_set_io_throttle", self.block_set_io_throttle, True),
            ("object-add", self.object_add, False),
            ("object-del", self.object_del, False),
            ("qom-get", self.qom_get, False),
            ("qom-set", self.qom_set, False),
            ("x-query-throttle", self.query_throttle, False),
            ("x-blkdebug-set-rules", self.blkdebug_set_rules, False),
            ("x-blkdebug-clear", self.blkdebug_clear, False),
            ("x-blkdebug-query", self.blkdebug_query, False),
        ):
            if name not in have:
                dispatcher.register(name, fn, is_async=is_async)

    # -- block_set_io_throttle ---------------------------------------------------------------
    def _device(self, args: dict[str, Any]) -> tuple[str, BlockDriverState]:
        """QEMU's qmp_get_blk, for exports (and, ``device`` only, node names)."""
        dev, qid = args.get("device"), args.get("id")
        if (dev is None) == (qid is None):
            raise QmpError("GenericError", "Need exactly one of 'device' and 'id'")
        name = arg_str(args, "device" if dev is not None else "id")
        exp = self.d.exports.get(name)
        if exp is not None:
            if exp.blk.root is None:
                raise QmpError("GenericError", "Device has no medium")
            return name, exp.blk.root
        bs = bdrv_find_node(name) if dev is not None else None
        if bs is None:
            raise QmpError("DeviceNotFound", f"Device '{name}' not found")
        return name, bs

    def block_set_io_throttle(self, args: dict[str, Any], complete: Complete) -> None:
        args_check(args, required=_LEGACY, optional=_THROTTLE_OPTIONAL)
        name, root = self._device(args)
        cfg = ThrottleConfig()
        for b, (_, legacy) in BUCKET_NAMES.items():
            bk = cfg.buckets[b]
            bk.avg = arg_int(args, legacy)
            if f"{legacy}_max" in args:
                bk.max = arg_int(args, f"{legacy}_max")
            if f"{legacy}_max_length" in args:
                bk.burst_length = arg_int(args, f"{legacy}_max_length") & UINT_MAX
        if "iops_size" in args:
            cfg.op_size = arg_int(args, "iops_size") & ((1 << 64) - 1)
        group = arg_str(args, "group", default=None)
        try:
            cfg.validate()
        except KeyvalError as e:
            raise QmpError("GenericError", str(e)) from None
        nodes = throttle_nodes_below(root)
        if not nodes:
            raise QmpError("GenericError",
                           f"Device '{name}' has no throttle node: put a 'throttle' filter "
                           "node above its image (blockdev-add driver=throttle)")
        node = nodes[0]
        m = node.drv.tgm
        if cfg.enabled():
            target = group or (m.group.name if m.group is not None else name)
            if m.group is not None and m.group.name == target:
                m.group.config(cfg)
                complete({})
                return
        else:
            if m.group is None:
                complete({})
                return
            target = None

        def drained() -> None:
            try:
                throttle_group_unregister_tgm(m)
                if target is not None:
                    throttle_group_register_tgm(m, target).config(cfg)
            finally:
                m.enable_limits()
                bdrv_drained_end(node)
            complete({})

        m.disable_limits()  # what is queued goes now: the drain does not wait for the limits
        bdrv_drained(node, drained)

    def query_throttle(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        args_check(args)
        out = []
        for bs in bdrv_nodes():
            drv = bs.drv
            if not isinstance(drv, ThrottleFilter):
                continue
            m = drv.tgm
            g = m.group
            entry: dict[str, Any] = {"node-name": bs.node_name, **drv.block_device_info()}
            if g is not None:
                with g.lock:
                    entry.update({"queued": m.queued(), "throttled": m.throttled,
                                  "passed": m.passed})
            out.append(entry)
        return out

    # -- objects -------------------------------------------------------------------------------
    def _taken_ids(self) -> list[str]:
        ids = [*self.d.iothreads, *self.d.metrics]
        if self.d.main_loop_id is not None:
            ids.append(self.d.main_loop_id)
        return ids

    def object_add(self, args: dict[str, Any]) -> None:
        qom_type = arg_str(args, "qom-type")
        try:
            if qom_type == "throttle-group":
                throttle_group_object_add(dict(args), True, taken=self._taken_ids())
            else:
                self.d.object_add(ParsedOption(dict(args), True))
        except (KeyvalError, OSError) as e:
            raise QmpError("GenericError", str(e)) from None

    def object_del(self, args: dict[str, Any]) -> None:
        args_check(args, required=("id",))
        oid = arg_str(args, "id")
        try:
            throttle_group_object_del(oid)
        except KeyvalError as e:
            raise QmpError("GenericError", str(e)) from None
        except KeyError:
            if oid in self._taken_ids():
                raise QmpError("GenericError", f"object '{oid}' can not be deleted "
                               "(pyvhost-blk deletes throttle-group objects only)") from None
            raise QmpError("GenericError", f"object '{oid}' not found") from None

    @staticmethod
    def _group_at(path: str) -> ThrottleGroup:
        oid = path[len("/objects/"):] if path.startswith("/objects/") else path
        g = throttle_group_find(oid)
        if g is None or not g.user_created or "/" in oid:
            raise QmpError("DeviceNotFound", f"Device '{path}' not found")
        return g

    def qom_get(self, args: dict[str, Any]) -> Any:
        args_check(args, required=("path", "property"))
        g = self._group_at(arg_str(args, "path"))
        prop = arg_str(args, "property")
        cfg = g.get_config()
        if prop == "limits":
            return cfg.to_limits()
        if prop == "type":
            return "throttle-group"
        if prop in X_PROPERTIES:
            return cfg.get_limit(prop[2:])
        raise QmpError("GenericError", f"Property 'throttle-group.{prop}' not found")

    def qom_set(self, args: dict[str, Any]) -> None:
        args_check(args, required=("path", "property", "value"))
        g = self._group_at(arg_str(args, "path"))
        prop = arg_str(args, "property")
        if prop in X_PROPERTIES:
            raise QmpError("GenericError", "Property cannot be set after initialization")
        if prop != "limits":
            raise QmpError("GenericError", f"Property 'throttle-group.{prop}' not found")
        value = arg_dict(args, "value")
        try:
            cfg = limits_to_config(value, g.get_config(), True)
        except KeyvalError as e:
            raise QmpError("GenericError", str(e)) from None
        g.config(cfg)

    # -- blkdebug ------------------------------------------------------------------------------
    @staticmethod
    def _blkdebug(args: dict[str, Any]) -> BlkdebugDriver:
        name = arg_str(args, "node-name")
        bs = bdrv_find_node(name)
        if bs is None:
            raise QmpError("GenericError", f"Failed to find node with node-name='{name}'")
        if not isinstance(bs.drv, BlkdebugDriver):
            raise QmpError("GenericError", f"Node '{name}' is not a blkdebug node")
        return bs.drv

    def blkdebug_set_rules(self, args: dict[str, Any]) -> None:
        args_check(args, required=("node-name", "rules"), optional=("set-state", "state"))
        drv = self._blkdebug(args)
        try:
            inject = parse_inject_rules(args["rules"], "rules", from_json=True)
            set_state = (parse_set_state_rules(args["set-state"], "set-state", from_json=True)
                         if "set-state" in args else None)
        except KeyvalError as e:
            raise QmpError("GenericError", str(e)) from None
        state = arg_int(args, "state", default=None)
        drv.set_rules(inject, set_state, state)

    def blkdebug_clear(self, args: dict[str, Any]) -> None:
        args_check(args, required=("node-name",))
        self._blkdebug(args).clear()

    def blkdebug_query(self, args: dict[str, Any]) -> dict[str, Any]:
        args_check(args, required=("node-name",))
        return self._blkdebug(args).query()
