"""``driver=blkdebug``: error injection with QEMU's options (``block/blkdebug.c``).

``--blockdev driver=blkdebug,node-name=d,image=NODE,inject-error.0.event=none,
inject-error.0.iotype=read,inject-error.0.errno=5,inject-error.0.once=on`` passes requests to
its ``image`` child (QEMU's name for the role) and fails those a rule matches with ``-errno``.
The BlockBackend above sees an ordinary I/O error, so the export's error policy
(``rerror``/``werror``: report, ignore, enospc, stop) decides what the guest sees — what tests
and users need to rehearse failures.  Rules can be replaced and cleared at run time with the
QMP commands ``x-blkdebug-set-rules`` and ``x-blkdebug-clear`` (``pyvhost_blk/qmp_filters.py``).

Options (QEMU's BlockdevOptionsBlkdebug):

* ``inject-error.N.*`` — ``event`` (required; one of QEMU's BlkdebugEvent names), ``iotype``
  (``read``, ``write``, ``write-zeroes``, ``discard``, ``flush``, ``block-status``; default:
  all but block-status), ``errno`` (default 5, EIO; 0 matches but injects nothing),
  ``sector`` (the rule matches only requests covering this 512-byte sector; flushes cover
  none), ``once`` (remove the rule after it fired once), ``immediately`` (complete the
  request with the error inside the call instead of from a bottom half), ``state`` (only
  while the node is in this state; 0 or absent: any).
* ``set-state.N.*`` — ``event``, ``state``, ``new_state`` (required): the event moves the node
  from ``state`` (any, if absent) to ``new_state``.  Nodes start in state 1.
* ``align`` — a request alignment to impose (a power of two), to exercise padding above.

Theory of operation
-------------------
QEMU's blkdebug reacts to *events* the block layer fires at it (``read_aio`` from a format
driver about to read, ``flush_to_disk``, ...): an event *activates* its inject-error rules, and
the active rules are checked against the next requests.  pyvhost-blk's block layer fires no
debug events, so this driver fires them itself, per request, for the request at hand:

=============  =====================================================================
request        events it fires
=============  =====================================================================
read           ``none``, ``read_aio``
write          ``none``, ``write_aio``, ``pwritev``
write-zeroes   ``none``, ``pwritev_zero``
discard        ``none``
flush          ``none``, ``flush_to_os``, ``flush_to_disk``
=============  =====================================================================

``none`` is QEMU's "active from the start" event: a rule on it is checked against every
request, filtered by ``iotype`` and ``sector`` — QEMU's own recipe for "fail the first read of
sector N".  A rule on another event applies to the requests that fire it.  Every other QEMU
event name (qcow2's ``l2_load`` ...) is accepted and never fires.  Unlike QEMU, a rule
activated by one request never lingers to fail a later, unrelated one (QEMU's active list
stays until another event replaces it).  The first rule in definition order that matches
decides; ``once`` rules are removed under the node's lock, so one fires exactly once even
with requests arriving from several iothreads.  Then the events' ``set-state`` rules move the
node's state (rules are matched against the state the request found, as in QEMU).

Threads: I/O callbacks in the request's AioContext (several at once); rules are read and
replaced under ``self.lock``; open, ``set_rules`` and ``clear`` in the main thread.
"""

from __future__ import annotations

import errno
import threading
from dataclasses import dataclass
from typing import Any

from blocklayer.aio import AioContext
from blocklayer.bdrv import BlockDriverError, BlockDriverState, Completion, bdrv_register
from blocklayer.drivers.filter import FilterDriver
from blocklayer.io import bdrv_aio_flush
from blocklayer.iov import IOVector
from blocklayer.qapi import (
    KeyvalError,
    check_keys,
    child_name,
    require,
    to_bool,
    to_int,
    to_size,
    to_str,
)

SECTOR = 512
#: QEMU's BlkdebugEvent, in its order (QAPI enum, qemu 7.2)
EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load", "reftable_grow",
    "reftable_update", "refblock_load", "refblock_update", "refblock_update_part",
    "refblock_alloc", "refblock_alloc_hookup", "refblock_alloc_write",
    "refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table",
    "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os", "flush_to_disk",
    "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
    "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
)
#: QEMU's BlkdebugIOType, in its order (bit i of a rule's mask)
IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
IO_READ, IO_WRITE, IO_WRITE_ZEROES, IO_DISCARD, IO_FLUSH, IO_BLOCK_STATUS = range(6)
_DEFAULT_MASK = sum(1 << t for t in (IO_READ, IO_WRITE, IO_WRITE_ZEROES, IO_DISCARD, IO_FLUSH))
#: the events a request of each iotype fires here (see the module docstring)
FIRED = {
    IO_READ: ("none", "read_aio"),
    IO_WRITE: ("none", "write_aio", "pwritev"),
    IO_WRITE_ZEROES: ("none", "pwritev_zero"),
    IO_DISCARD: ("none",),
    IO_FLUSH: ("none", "flush_to_os", "flush_to_disk"),
}
INJECT_KEYS = ("event", "state", "iotype", "errno", "sector", "once", "immediately")
SET_STATE_KEYS = ("event", "state", "new_state")


@dataclass
class InjectRule:
    """One ``inject-error`` rule (QEMU's BlkdebugInjectErrorOptions).  Built in the main
    thread; matched and counted under the node's lock in the request's AioContext."""

    event: str
    state: int = 0
    iotype: str | None = None
    errno: int = errno.EIO
    sector: int = -1
    once: bool = False
    immediately: bool = False
    hits: int = 0  # requests it failed (ours, for x-blkdebug-query)

    @property
    def mask(self) -> int:
        return _DEFAULT_MASK if self.iotype is None else 1 << IOTYPES.index(self.iotype)

    def matches(self, iotype: int, offset: int, nbytes: int, state: int) -> bool:
        if self.state and self.state != state:
            return False
        if not self.mask & (1 << iotype):
            return False
        if self.sector < 0:
            return True
        where = self.sector * SECTOR
        return nbytes > 0 and offset <= where < offset + nbytes

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"event": self.event}
        if self.state:
            d["state"] = self.state
        if self.iotype is not None:
            d["iotype"] = self.iotype
        d.update({"errno": self.errno, "once": self.once, "immediately": self.immediately})
        if self.sector >= 0:
            d["sector"] = self.sector
        d["hits"] = self.hits
        return d


@dataclass
class SetStateRule:
    """One ``set-state`` rule (QEMU's BlkdebugSetStateOptions); like InjectRule."""

    event: str
    new_state: int
    state: int = 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"event": self.event, "new_state": self.new_state}
        if self.state:
            d["state"] = self.state
        return d


def _enum(v: Any, short: str, full: str, choices: tuple[str, ...], from_json: bool) -> str:
    """Main thread (option parsing): a QAPI enum member."""
    s = to_str(v, full, from_json=from_json)
    if s not in choices:
        # QEMU's visitor names an enum member by its short name here
        raise KeyvalError(f"Parameter '{short}' does not accept value '{s}'")
    return s


def _rule_list(v: Any, name: str) -> list[Any]:
    if not isinstance(v, list):
        raise KeyvalError(f"Invalid parameter type for '{name}', expected: array")
    return v


def _rule_dict(v: Any, name: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise KeyvalError(f"Invalid parameter type for '{name}', expected: object")
    return v


def parse_inject_rules(v: Any, name: str = "inject-error", *,
                       from_json: bool = False) -> list[InjectRule]:
    """A list of inject-error rules from keyval (``inject-error.0.event=...``) or JSON, with
    QEMU's error messages.  Raises KeyvalError."""
    rules = []
    for i, item in enumerate(_rule_list(v, name)):
        base = child_name(name, i, from_json=from_json)
        r = _rule_dict(item, base)
        ev = require(r, "event", base)
        check_keys(r, INJECT_KEYS, base)
        rule = InjectRule(_enum(ev, "event", f"{base}.event", EVENTS, from_json))
        if "state" in r:
            rule.state = to_int(r["state"], f"{base}.state", from_json=from_json)
        if "iotype" in r:
            rule.iotype = _enum(r["iotype"], "iotype", f"{base}.iotype", IOTYPES, from_json)
        if "errno" in r:
            rule.errno = to_int(r["errno"], f"{base}.errno", from_json=from_json)
        if "sector" in r:
            rule.sector = to_int(r["sector"], f"{base}.sector", from_json=from_json)
        if "once" in r:
            rule.once = to_bool(r["once"], f"{base}.once", from_json=from_json)
        if "immediately" in r:
            rule.immediately = to_bool(r["immediately"], f"{base}.immediately",
                                       from_json=from_json)
        rules.append(rule)
    return rules


def parse_set_state_rules(v: Any, name: str = "set-state", *,
                          from_json: bool = False) -> list[SetStateRule]:
    """A list of set-state rules (keyval or JSON).  Raises KeyvalError."""
    rules = []
    for i, item in enumerate(_rule_list(v, name)):
        base = child_name(name, i, from_json=from_json)
        r = _rule_dict(item, base)
        ev = require(r, "event", base)
        new = require(r, "new_state", base)
        check_keys(r, SET_STATE_KEYS, base)
        rule = SetStateRule(_enum(ev, "event", f"{base}.event", EVENTS, from_json),
                            to_int(new, f"{base}.new_state", from_json=from_json))
        if "state" in r:
            rule.state = to_int(r["state"], f"{base}.state", from_json=from_json)
        rules.append(rule)
    return rules


def _inject_conv(v: Any, name: str, *, from_json: bool = False) -> list[InjectRule]:
    return parse_inject_rules(v, name, from_json=from_json)


def _set_state_conv(v: Any, name: str, *, from_json: bool = False) -> list[SetStateRule]:
    return parse_set_state_rules(v, name, from_json=from_json)


@bdrv_register
class BlkdebugDriver(FilterDriver):
    format_name = "blkdebug"
    batch_io = None  # every request through aio_*: never FilterDriver.batch_forward
    child_roles = {"image": True}
    options = {"inject-error": _inject_conv, "set-state": _set_state_conv, "align": to_size}

    def __init__(self, node_name: str, opts: dict[str, Any]) -> None:
        """Main thread: take the rules; the node starts in state 1."""
        super().__init__(node_name, opts)
        self.align = opts.get("align", 0)
        if self.align and (self.align >= 2**31 - 1 or self.align & (self.align - 1)):
            raise BlockDriverError(f"Cannot meet constraints with align {self.align}")
        self.lock = threading.Lock()
        self.inject: list[InjectRule] = opts.get("inject-error", [])
        self.set_state_rules: list[SetStateRule] = opts.get("set-state", [])
        self.state = 1
        self.injected = 0  # errors injected so far

    @property
    def file(self) -> BlockDriverState:
        assert self.bs is not None
        return self.bs.children["image"].bs

    @property
    def filename(self) -> str:
        return self.file.filename if self.bs is not None else ""

    def limits(self) -> tuple[int, int]:
        return max(self.align, 1), 1

    # -- rules (main thread) --------------------------------------------------------------------
    def set_rules(self, inject: list[InjectRule] | None = None,
                  set_state: list[SetStateRule] | None = None,
                  state: int | None = None) -> None:
        """Replace the inject-error rules and/or the set-state rules, and/or the state."""
        with self.lock:
            if inject is not None:
                self.inject = list(inject)
            if set_state is not None:
                self.set_state_rules = list(set_state)
            if state is not None:
                self.state = state

    def clear(self) -> None:
        """Remove every rule; the node is back in state 1."""
        self.set_rules([], [], 1)

    def query(self) -> dict[str, Any]:
        """Main thread: the rules, the state and how many errors were injected."""
        with self.lock:
            return {"state": self.state, "injected": self.injected,
                    "inject-error": [r.to_dict() for r in self.inject],
                    "set-state": [r.to_dict() for r in self.set_state_rules]}

    # -- the request path (the request's AioContext) ----------------------------------------------
    def _check(self, iotype: int, offset: int, nbytes: int) -> tuple[int, bool]:
        """The request's AioContext: (-errno or 0, immediately) for a request; fires its
        events."""
        if not self.inject and not self.set_state_rules:
            return 0, True
        fired = FIRED[iotype]
        with self.lock:
            state = self.state
            hit = None
            for rule in self.inject:
                if rule.event in fired and rule.matches(iotype, offset, nbytes, state):
                    hit = rule
                    break
            for sr in self.set_state_rules:
                if sr.event in fired and (not sr.state or sr.state == state):
                    self.state = sr.new_state
            if hit is None or not hit.errno:
                return 0, True
            hit.hits += 1
            self.injected += 1
            if hit.once:
                self.inject = [r for r in self.inject if r is not hit]
            return -hit.errno, hit.immediately

    @staticmethod
    def _fail(ctx: AioContext, cb: Completion, ret: int, immediately: bool) -> None:
        """In ``ctx``: complete the request with ``ret``, now or from a bottom half."""
        if immediately:
            cb(ret)
        else:  # QEMU yields to the event loop once before failing
            ctx.schedule(cb, ret)

    def aio_preadv(self, ctx: AioContext, offset: int, qiov: IOVector, cb: Completion) -> None:
        ret, now = self._check(IO_READ, offset, qiov.size)
        if ret:
            self._fail(ctx, cb, ret, now)
        else:
            super().aio_preadv(ctx, offset, qiov, cb)

    def aio_pwritev(self, ctx: AioContext, offset: int, qiov: IOVector, flags: int,
                    cb: Completion) -> None:
        ret, now = self._check(IO_WRITE, offset, qiov.size)
        if ret:
            self._fail(ctx, cb, ret, now)
        else:
            super().aio_pwritev(ctx, offset, qiov, flags, cb)

    def aio_flush(self, ctx: AioContext, cb: Completion) -> None:
        ret, now = self._check(IO_FLUSH, 0, 0)
        if ret:
            self._fail(ctx, cb, ret, now)
        else:
            bdrv_aio_flush(self.file, ctx, cb)

    def aio_pdiscard(self, ctx: AioContext, offset: int, nbytes: int, cb: Completion) -> None:
        ret, now = self._check(IO_DISCARD, offset, nbytes)
        if ret:
            self._fail(ctx, cb, ret, now)
        else:
            super().aio_pdiscard(ctx, offset, nbytes, cb)

    def aio_pwrite_zeroes(self, ctx: AioContext, offset: int, nbytes: int, flags: int,
                          cb: Completion) -> None:
        ret, now = self._check(IO_WRITE_ZEROES, offset, nbytes)
        if ret:
            self._fail(ctx, cb, ret, now)
        else:
            super().aio_pwrite_zeroes(ctx, offset, nbytes, flags, cb)
