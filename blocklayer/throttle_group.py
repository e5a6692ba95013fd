"""Throttle groups: QEMU's I/O limits (``util/throttle.c``, ``block/throttle-groups.c``).

Theory of operation
-------------------
**The leaky bucket.**  A group has six buckets — bytes and operations per second, each for
reads + writes together (``*-total``), reads and writes (QEMU's ``bps-total``, ``bps-read``,
``bps-write``, ``iops-total``, ``iops-read``, ``iops-write``).  Every request that is let
through pours its size (bps buckets) or one unit (iops buckets; with ``iops-size=S`` a request
of ``n > S`` bytes counts ``n / S`` units) into the total bucket and into the one of its
direction.  A bucket leaks ``avg`` units per second (the limit).  A request may go when every
bucket it pours into is below its size, otherwise it waits until enough has leaked:
``wait = (level - size) / avg`` seconds.  The size gives the bursts:

* no ``*-max``: the bucket holds ``avg / 10`` — a tenth of a second of I/O goes at once (so the
  guest is not throttled request by request), then the rate is ``avg``;
* ``*-max=M`` (and ``*-max-length=L`` seconds, default 1): the bucket holds ``M * L``, so an
  idle disk may burst that much; with ``L > 1`` a second bucket (size ``M / 10``, leaking ``M``
  per second) keeps the burst itself at ``M`` per second.

This is "leaky bucket as a meter", as QEMU's ``docs/throttle.txt`` explains; the formulas and
the validation rules (and their error texts) are QEMU's.  ``LeakyBucket``, ``ThrottleConfig``
and ``ThrottleState`` are pure arithmetic on a clock in nanoseconds: unit-testable.

**The group.**  A ``ThrottleGroup`` (``--object throttle-group,id=G,limits.iops-total=N``) holds
the buckets; each ``throttle`` node in it is a ``ThrottleGroupMember`` with two queues (reads,
writes) of requests waiting for their turn.  The members share the limits and take turns in
round robin (QEMU's tokens): when the buckets are full, *one* timer is armed in the whole group
per direction (``any_timer_armed``), on the member whose turn it is; when it fires, that
member's first queued request runs, and whoever runs a request picks the next member with
queued requests and either lets its head go at once (preferring its own queue) or arms that
member's timer.  A request that finds a timer armed or requests of its member queued waits in
the queue, so a member's requests keep their order.  This is ``throttle-groups.c``'s algorithm
written with callbacks instead of coroutines: "wait in the queue" is "append ``go`` to the
queue", "wake" is "schedule ``go`` as a bottom half in the request's own AioContext".

**Threads.**  A node may be used from several AioContexts at once (a multiqueue export spread
over iothreads), and members of one group may live in different iothreads: everything a group
shares — buckets, members' queues and counts, tokens, timers' state — is changed under
``group.lock``.  Callbacks (a request's ``go``, a timer's expiry) never run with it held.
``go`` always runs in the AioContext the request came from, which is where the driver must
complete it.  Groups are created, configured and deleted in the main thread.

**Timers.**  Each member has a ``ThrottleTimer`` per direction (QEMU's ThrottleTimers) on
the AioContexts' own timers (``ctx.timer_new``: armed from any thread, run in the context's
loop).  A throttle timer is armed in the context of the request that will run when it fires
(else the caller's).  Being late (the loop's wait has millisecond granularity) only delays a
request: the buckets leak by the time that really passed, so a late timer lets more through at
once and the average rate holds.

**Draining.**  While a member's node is drained (``disable_limits``, or ``is_drained()`` true),
its requests go without waiting, so a drain does not wait for the throttle (QEMU's
``io_limits_disabled``).  ``disable_limits`` releases the queue at once; ``is_drained`` is
noticed the next time the group looks at the member (its timer firing).
"""

from __future__ import annotations

import collections
import errno
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from blocklayer.aio import AioContext, current_aio_context
from blocklayer.qapi import KeyvalError, check_keys, require, to_dict, to_int, to_str

NANOSECONDS_PER_SECOND = 1_000_000_000
THROTTLE_VALUE_MAX = 1_000_000_000_000_000
UINT_MAX = 0xFFFFFFFF
_U64 = (1 << 64) - 1

READ, WRITE = 0, 1  # ThrottleDirection

# BucketType, in QEMU's order
BPS_TOTAL, BPS_READ, BPS_WRITE, OPS_TOTAL, OPS_READ, OPS_WRITE = range(6)
#: bucket -> its ThrottleLimits name (``limits.NAME``) and its block_set_io_throttle name
BUCKET_NAMES = {
    BPS_TOTAL: ("bps-total", "bps"),
    BPS_READ: ("bps-read", "bps_rd"),
    BPS_WRITE: ("bps-write", "bps_wr"),
    OPS_TOTAL: ("iops-total", "iops"),
    OPS_READ: ("iops-read", "iops_rd"),
    OPS_WRITE: ("iops-write", "iops_wr"),
}
# the buckets a request of each direction pours into and must wait for
_BUCKETS_OF = {READ: (BPS_TOTAL, OPS_TOTAL, BPS_READ, OPS_READ),
               WRITE: (BPS_TOTAL, OPS_TOTAL, BPS_WRITE, OPS_WRITE)}
_SIZE_BUCKETS = {READ: (BPS_TOTAL, BPS_READ), WRITE: (BPS_TOTAL, BPS_WRITE)}
_UNIT_BUCKETS = {READ: (OPS_TOTAL, OPS_READ), WRITE: (OPS_TOTAL, OPS_WRITE)}

# QAPI ThrottleLimits members, in QEMU's order
_LIMIT_ORDER = (OPS_TOTAL, OPS_READ, OPS_WRITE, BPS_TOTAL, BPS_READ, BPS_WRITE)
LIMIT_NAMES: tuple[str, ...] = tuple(
    f"{BUCKET_NAMES[b][0]}{suffix}" for b in _LIMIT_ORDER for suffix in ("", "-max", "-max-length")
) + ("iops-size",)
#: the throttle-group object's individual (legacy) properties
X_PROPERTIES: tuple[str, ...] = tuple(f"x-{n}" for n in LIMIT_NAMES)


class ThrottleConfigError(KeyvalError):
    """Invalid limits; ``str(e)`` is QEMU's message.  ``errno`` is EINVAL, as QEMU returns."""

    errno = errno.EINVAL


# -- the leaky bucket (pure arithmetic) -------------------------------------------------------
class LeakyBucket:
    """One limit: ``avg`` units/s, bursts of ``max`` units/s for ``burst_length`` seconds.
    Plain arithmetic: any thread, callers serialise (a group's buckets under its lock)."""

    __slots__ = ("avg", "max", "burst_length", "level", "burst_level")

    def __init__(self, avg: int = 0, max: int = 0, burst_length: int = 1) -> None:
        self.avg = avg
        self.max = max
        self.burst_length = burst_length
        self.level = 0.0  # units in the bucket
        self.burst_level = 0.0  # units in the burst bucket (burst_length > 1 only)

    def copy(self) -> LeakyBucket:
        b = LeakyBucket(self.avg, self.max, self.burst_length)
        b.level, b.burst_level = self.level, self.burst_level
        return b

    def leak(self, delta_ns: int) -> None:
        """Let ``delta_ns`` nanoseconds' worth of units out (QEMU's throttle_leak_bucket)."""
        self.level = max(self.level - self.avg * delta_ns / NANOSECONDS_PER_SECOND, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(
                self.burst_level - self.max * delta_ns / NANOSECONDS_PER_SECOND, 0.0)

    def compute_wait(self) -> int:
        """Nanoseconds until the next request may go (0: now).  QEMU's throttle_compute_wait."""
        if not self.avg:
            return 0
        if not self.max:
            size, burst_size = self.avg / 10, 0.0  # a tenth of a second goes at once
        else:
            size, burst_size = self.max * self.burst_length, self.max / 10
        extra = self.level - size
        if extra > 0:
            return int(extra * NANOSECONDS_PER_SECOND / self.avg)
        if self.burst_length > 1:
            extra = self.burst_level - burst_size
            if extra > 0:
                return int(extra * NANOSECONDS_PER_SECOND / self.max)
        return 0


class ThrottleConfig:
    """Six buckets and ``op_size`` (``iops-size``): what a group enforces (ThrottleConfig).
    Plain values: any thread; a group hands out copies (``ThrottleGroup.get_config``)."""

    __slots__ = ("buckets", "op_size")

    def __init__(self) -> None:
        self.buckets = [LeakyBucket() for _ in range(6)]
        self.op_size = 0

    def copy(self) -> ThrottleConfig:
        c = ThrottleConfig()
        c.buckets = [b.copy() for b in self.buckets]
        c.op_size = self.op_size
        return c

    def enabled(self) -> bool:
        """Any limit set (QEMU's throttle_enabled)."""
        return any(b.avg > 0 for b in self.buckets)

    def validate(self) -> None:
        """QEMU's throttle_is_valid: raise ThrottleConfigError with its message."""
        bk = self.buckets

        def clash(attr: str, total: int, rd: int, wr: int) -> bool:
            return bool(getattr(bk[total], attr) and (getattr(bk[rd], attr) or
                                                     getattr(bk[wr], attr)))

        if any(clash(a, *t) for a in ("avg", "max") for t in ((BPS_TOTAL, BPS_READ, BPS_WRITE),
                                                               (OPS_TOTAL, OPS_READ, OPS_WRITE))):
            raise ThrottleConfigError("bps/iops/max total values and read/write values cannot "
                                      "be used at the same time")
        if self.op_size and not (bk[OPS_TOTAL].avg or bk[OPS_READ].avg or bk[OPS_WRITE].avg):
            raise ThrottleConfigError("iops size requires an iops value to be set")
        for b in bk:
            if not (0 <= b.avg <= THROTTLE_VALUE_MAX and 0 <= b.max <= THROTTLE_VALUE_MAX):
                raise ThrottleConfigError(
                    f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]")
            if not b.burst_length:
                raise ThrottleConfigError("the burst length cannot be 0")
            if b.burst_length > 1 and not b.max:
                raise ThrottleConfigError("burst length set without burst rate")
            if b.max and b.burst_length > THROTTLE_VALUE_MAX // b.max:
                raise ThrottleConfigError("burst length too high for this burst rate")
            if b.max and not b.avg:
                raise ThrottleConfigError("bps_max/iops_max require corresponding bps/iops "
                                          "values")
            if b.max and b.max < b.avg:
                raise ThrottleConfigError("bps_max/iops_max cannot be lower than bps/iops")

    # -- conversions: QAPI ThrottleLimits (``limits``) and BlockDeviceInfo / BlockIOThrottle --
    def set_limit(self, name: str, value: int) -> None:
        """Set one ThrottleLimits member (``iops-total-max`` ...) as QEMU stores it: sizes
        are unsigned (a negative value wraps, then fails validation), lengths 32-bit."""
        if name == "iops-size":
            self.op_size = value & _U64
            return
        for b, (lname, _) in BUCKET_NAMES.items():
            if name == lname:
                self.buckets[b].avg = value
            elif name == f"{lname}-max":
                self.buckets[b].max = value
            elif name == f"{lname}-max-length":
                self.buckets[b].burst_length = value & UINT_MAX
            else:
                continue
            return
        raise KeyError(name)

    def get_limit(self, name: str) -> int:
        if name == "iops-size":
            return self.op_size
        for b, (lname, _) in BUCKET_NAMES.items():
            bk = self.buckets[b]
            if name == lname:
                return bk.avg
            if name == f"{lname}-max":
                return bk.max
            if name == f"{lname}-max-length":
                return bk.burst_length
        raise KeyError(name)

    def to_limits(self) -> dict[str, int]:
        """QAPI ThrottleLimits (qom-get of ``limits``): every member."""
        return {n: self.get_limit(n) for n in LIMIT_NAMES}

    def to_block_device_info(self) -> dict[str, int]:
        """The throttle members of QMP BlockDeviceInfo, as QEMU fills them: the six limits
        always, ``*_max`` (and ``*_max_length``) and ``iops_size`` only when set."""
        out: dict[str, int] = {}
        for b, (_, legacy) in BUCKET_NAMES.items():
            out[legacy] = self.buckets[b].avg
        for b, (_, legacy) in BUCKET_NAMES.items():
            bk = self.buckets[b]
            if bk.max:
                out[f"{legacy}_max"] = bk.max
                out[f"{legacy}_max_length"] = bk.burst_length
        if self.op_size:
            out["iops_size"] = self.op_size
        return out


def limits_to_config(limits: dict[str, Any], cfg: ThrottleConfig, from_json: bool,
                     what: str = "limits") -> ThrottleConfig:
    """QEMU's throttle_limits_to_config: a copy of ``cfg`` with the ThrottleLimits members in
    ``limits`` applied, validated.  ``what`` names the member in error messages.  Main thread
    (option parsing, QMP); raises KeyvalError / ThrottleConfigError."""
    check_keys(limits, LIMIT_NAMES, what)
    new = cfg.copy()
    for name, raw in limits.items():
        value = to_int(raw, f"{what}.{name}", "int64", from_json=from_json)
        if name.endswith("-max-length") and value > UINT_MAX:
            raise ThrottleConfigError(f"{name} value must be in the range [0, {UINT_MAX}]")
        new.set_limit(name, value)
    new.validate()
    return new


class ThrottleState:
    """The buckets in motion: QEMU's ThrottleState (levels, last leak) on ``clock``.
    Any thread, under the owning group's lock."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock
        self.cfg = ThrottleConfig()
        self.previous_leak = clock()
        self._active: dict[int, tuple[LeakyBucket, ...]] = {READ: (), WRITE: ()}

    def config(self, cfg: ThrottleConfig) -> None:
        """Take a new configuration; the buckets start empty (QEMU's throttle_config)."""
        self.cfg = cfg.copy()
        for b in self.cfg.buckets:
            b.level = b.burst_level = 0.0
        self.previous_leak = self.clock()
        bk = self.cfg.buckets
        self._active = {d: tuple(bk[i] for i in _BUCKETS_OF[d] if bk[i].avg) for d in (READ,
                                                                                       WRITE)}

    def _leak(self, now: int) -> None:
        delta = now - self.previous_leak
        self.previous_leak = now
        if delta <= 0:
            return
        for b in self.cfg.buckets:
            if b.avg:
                b.leak(delta)

    def compute_wait(self, direction: int) -> int:
        """Nanoseconds a request of ``direction`` must wait (0: it may go)."""
        return max((b.compute_wait() for b in self._active[direction]), default=0)

    def compute_timer(self, direction: int, now: int) -> tuple[bool, int]:
        """Leak up to ``now``; (must wait, when it may go) — QEMU's throttle_compute_timer."""
        self._leak(now)
        wait = self.compute_wait(direction)
        return (True, now + wait) if wait else (False, now)

    def account(self, direction: int, nbytes: int) -> None:
        """A request of ``nbytes`` goes: pour it into its buckets (QEMU's throttle_account)."""
        bk, op = self.cfg.buckets, self.cfg.op_size
        units = nbytes / op if op and nbytes > op else 1.0
        for i in _SIZE_BUCKETS[direction]:
            b = bk[i]
            b.level += nbytes
            if b.burst_length > 1:
                b.burst_level += nbytes
        for i in _UNIT_BUCKETS[direction]:
            b = bk[i]
            b.level += units
            if b.burst_length > 1:
                b.burst_level += units


# -- timers on AioContexts --------------------------------------------------------------------
_timer_lock = threading.Lock()  # every ThrottleTimer's arming
_timer_seq = itertools.count(1)


class ThrottleTimer:
    """A member's timer for one direction (QEMU's ThrottleTimers entry): at most one arming at
    a time, on an AioContext's timers (``ctx.timer_new``).  ``cb()`` runs in the thread of the
    context it was last armed in.  ``mod``/``delete``/``pending``: any thread."""

    __slots__ = ("cb", "_seq", "_armed")

    def __init__(self, cb: Callable[[], None]) -> None:
        self.cb = cb
        self._seq = 0  # the live arming (0: not pending)
        self._armed: Any = None  # its aio.AioTimer

    def mod(self, ctx: AioContext, deadline: int) -> None:
        """Fire at ``deadline`` (time.monotonic_ns) in ``ctx``, replacing any earlier arming
        (QEMU's timer_mod)."""
        with _timer_lock:
            if self._armed is not None:
                self._armed.cancel()
            self._seq = seq = next(_timer_seq)
            delay = (deadline - time.monotonic_ns()) / NANOSECONDS_PER_SECOND
            self._armed = ctx.timer_new(delay, self._fire, seq)

    def _fire(self, seq: int) -> None:
        """The context's thread."""
        with _timer_lock:
            if seq != self._seq:
                return  # deleted or re-armed since
            self._seq, self._armed = 0, None
        self.cb()

    def delete(self) -> None:
        """Disarm (QEMU's timer_del)."""
        with _timer_lock:
            if self._armed is not None:
                self._armed.cancel()
            self._seq, self._armed = 0, None

    def pending(self) -> bool:
        """Armed and not yet fired."""
        return self._seq != 0


# -- groups and members ----------------------------------------------------------------------
TimerFactory = Callable[[Callable[[], None]], Any]


class _Req:
    """A request waiting in a member's queue (under the group's lock): ``go()`` runs it, in
    ``ctx``."""

    __slots__ = ("ctx", "nbytes", "go")

    def __init__(self, ctx: AioContext, nbytes: int, go: Callable[[], None]) -> None:
        self.ctx, self.nbytes, self.go = ctx, nbytes, go


class ThrottleGroupMember:
    """One throttle node's place in a group (QEMU's ThrottleGroupMember).  Its queues and
    counts change under ``group.lock``; ``intercept`` runs in the request's AioContext;
    ``disable_limits``/``enable_limits`` in the main thread."""

    def __init__(self, name: str, timer_factory: TimerFactory = ThrottleTimer) -> None:
        self.name = name
        self.group: ThrottleGroup | None = None
        self.queues: tuple[collections.deque[_Req], collections.deque[_Req]] = (
            collections.deque(), collections.deque())
        self.pending = [0, 0]  # queued, or woken and not yet run (under group.lock)
        self.timers = (timer_factory(lambda: self._timer_fired(READ)),
                       timer_factory(lambda: self._timer_fired(WRITE)))
        self.io_limits_disabled = 0
        #: whether the node is in a drained section now (any thread; the driver sets it):
        #: then requests go without waiting, as with ``disable_limits``, from the next time
        #: the group looks at this member (its timer, or one of its requests finishing)
        self.is_drained: Callable[[], bool] | None = None
        #: requests that had to wait / went at once (statistics, under group.lock)
        self.throttled = 0
        self.passed = 0

    def intercept(self, ctx: AioContext, nbytes: int, direction: int,
                  go: Callable[[], None]) -> None:
        """In ``ctx`` (the request's): call ``go()`` — now, or in ``ctx`` once the limits let
        this request of ``nbytes`` bytes through (QEMU's
        throttle_group_co_io_limits_intercept)."""
        g = self.group
        if g is None:
            go()
        else:
            g.intercept(self, ctx, nbytes, direction, go)

    def _timer_fired(self, direction: int) -> None:
        """The timer's context."""
        g = self.group
        if g is not None:
            g.timer_cb(self, direction)

    def disable_limits(self) -> None:
        """Main thread, node drained: queued requests run now, new ones do not wait."""
        self.io_limits_disabled += 1
        if self.io_limits_disabled == 1 and self.group is not None:
            self.group.restart_member(self)

    def enable_limits(self) -> None:
        assert self.io_limits_disabled > 0
        self.io_limits_disabled -= 1

    def limits_disabled(self) -> bool:
        """Any thread: requests go without waiting now (drained)."""
        return bool(self.io_limits_disabled) or (self.is_drained is not None and
                                                 self.is_drained())

    def queued(self) -> int:
        """Requests waiting for their turn now (under ``group.lock`` for an exact count)."""
        return len(self.queues[READ]) + len(self.queues[WRITE])


class ThrottleGroup:
    """Limits shared by members that take turns (see the module docstring).  Configuration,
    register and unregister in the main thread; the request path in any AioContext; every
    method ``_``-prefixed below ``_restart_queue`` expects ``self.lock`` held."""

    def __init__(self, name: str, cfg: ThrottleConfig | None = None, *,
                 user_created: bool = False,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.name = name
        self.user_created = user_created  # an object-add'ed object (else made implicitly)
        self.clock = clock
        self.lock = threading.Lock()
        self.ts = ThrottleState(clock)
        self.ts.config(cfg or ThrottleConfig())
        self.members: list[ThrottleGroupMember] = []
        self.tokens: list[ThrottleGroupMember | None] = [None, None]
        self.any_timer_armed = [False, False]

    # -- configuration (main thread) ---------------------------------------------------------
    def get_config(self) -> ThrottleConfig:
        """Any thread: a copy of the limits."""
        with self.lock:
            return self.ts.cfg.copy()

    def config(self, cfg: ThrottleConfig) -> None:
        """Main thread: new limits for every member (buckets emptied); queued requests are
        looked at again at once under the new limits (QEMU's throttle_group_config)."""
        cfg.validate()
        with self.lock:
            self.ts.config(cfg)
            members = list(self.members)
        for m in members:
            self.restart_member(m)

    def register(self, m: ThrottleGroupMember) -> None:
        """Main thread: ``m`` joins (QEMU's throttle_group_register_tgm)."""
        assert m.group is None
        with self.lock:
            for d in (READ, WRITE):
                if self.tokens[d] is None:
                    self.tokens[d] = m
            self.members.append(m)
            m.group = self

    def unregister(self, m: ThrottleGroupMember) -> None:
        """Main thread: ``m`` leaves; its node is drained (nothing queued).  A timer it held
        for the group passes the turn on (QEMU's throttle_group_unregister_tgm)."""
        assert m.group is self
        m.io_limits_disabled += 1  # anything still queued (a bug elsewhere) runs, not hangs
        self.restart_member(m)
        wake: list[tuple[ThrottleGroupMember, int, _Req]] = []
        with self.lock:
            for d in (READ, WRITE):
                if m.timers[d].pending():
                    m.timers[d].delete()
                    self.any_timer_armed[d] = False
                    w = self._schedule_next(m, d)
                    if w is not None:
                        wake.append(w)
                if self.tokens[d] is m:
                    nxt = self._next_member(m)
                    self.tokens[d] = None if nxt is m else nxt
            self.members.remove(m)
            m.group = None
        m.io_limits_disabled -= 1
        for w in wake:
            self._wake(*w)

    # -- the request path (any AioContext) -----------------------------------------------------
    def intercept(self, m: ThrottleGroupMember, ctx: AioContext, nbytes: int, d: int,
                  go: Callable[[], None]) -> None:
        """In ``ctx``, the request's: see ThrottleGroupMember.intercept."""
        with self.lock:
            token = self._next_token(m, d)
            must_wait = self._schedule_timer(token, d, ctx)
            if must_wait or m.pending[d]:
                m.pending[d] += 1
                m.queues[d].append(_Req(ctx, nbytes, go))
                m.throttled += 1
                return
            m.passed += 1
            self.ts.account(d, nbytes)
            w = self._schedule_next(m, d)
        if w is not None:
            self._wake(*w)
        go()

    def _resume(self, m: ThrottleGroupMember, d: int, req: _Req) -> None:
        """A woken request, in its own context: account it, pass the turn on, run it."""
        with self.lock:
            m.pending[d] -= 1
            self.ts.account(d, req.nbytes)
            w = self._schedule_next(m, d)
        if w is not None:
            self._wake(*w)
        req.go()

    def _wake(self, m: ThrottleGroupMember, d: int, req: _Req) -> None:
        """Any thread, lock not held: run the popped ``req`` in its own context."""
        req.ctx.schedule(self._resume, m, d, req)

    def timer_cb(self, m: ThrottleGroupMember, d: int) -> None:
        """``m``'s timer fired (in the context it was armed in): its first queued request
        runs (QEMU's timer_cb and throttle_group_restart_queue)."""
        with self.lock:
            if m.group is not self:
                return
            self.any_timer_armed[d] = False
        self._restart_queue(m, d)

    def _restart_queue(self, m: ThrottleGroupMember, d: int) -> None:
        """Any thread, lock not held: run ``m``'s first queued request, or pass the turn."""
        with self.lock:
            if m.queues[d]:
                w: tuple[ThrottleGroupMember, int, _Req] | None = (m, d, m.queues[d].popleft())
            else:
                w = self._schedule_next(m, d)
        if w is not None:
            self._wake(*w)

    def restart_member(self, m: ThrottleGroupMember) -> None:
        """Any thread: fire ``m``'s armed timers now, else run its first queued requests
        (QEMU's throttle_group_restart_tgm)."""
        for d in (READ, WRITE):
            with self.lock:
                fire = m.timers[d].pending()
                if fire:
                    m.timers[d].delete()
            if fire:
                self.timer_cb(m, d)
            else:
                self._restart_queue(m, d)

    # -- under self.lock -------------------------------------------------------------------------
    def _next_member(self, m: ThrottleGroupMember) -> ThrottleGroupMember:
        ms = self.members
        return ms[(ms.index(m) + 1) % len(ms)]

    def _next_token(self, m: ThrottleGroupMember, d: int) -> ThrottleGroupMember:
        """The next member in round robin with requests pending, or ``m`` if none has any
        (QEMU's next_throttle_token)."""
        if m.pending[d] and m.limits_disabled():
            return m  # being drained: never wait behind the others
        start = self.tokens[d]
        if start is None or start.group is not self:
            return m
        token = self._next_member(start)
        while token is not start and not token.pending[d]:
            token = self._next_member(token)
        if token is start and not token.pending[d]:
            token = m
        return token

    def _timer_ctx(self, token: ThrottleGroupMember, d: int,
                   default: AioContext | None = None) -> AioContext:
        q = token.queues[d]
        if q:
            return q[0].ctx
        return default if default is not None else current_aio_context()

    def _schedule_timer(self, token: ThrottleGroupMember, d: int,
                        ctx: AioContext | None = None) -> bool:
        """Whether ``token``'s next request must wait; if so and no timer is armed in the
        group, arm ``token``'s and give it the turn (QEMU's throttle_group_schedule_timer)."""
        if token.limits_disabled():
            return False
        if self.any_timer_armed[d]:
            return True
        must_wait, when = self.ts.compute_timer(d, self.clock())
        if not must_wait:
            return False
        t = token.timers[d]
        if not t.pending():
            t.mod(self._timer_ctx(token, d, ctx), when)
        self.tokens[d] = token
        self.any_timer_armed[d] = True
        return True

    def _schedule_next(self, m: ThrottleGroupMember, d: int
                       ) -> tuple[ThrottleGroupMember, int, _Req] | None:
        """After a request of ``m`` went: let the next member's request go now (``m``'s own
        first, returned for the caller to wake once the lock is dropped) or arm a timer for it
        (QEMU's schedule_next_request)."""
        token = self._next_token(m, d)
        if not token.pending[d]:
            return None
        if self._schedule_timer(token, d):
            return None
        wake = None
        if m.queues[d]:
            wake = (m, d, m.queues[d].popleft())
            token = m
        else:  # another member's turn, now: its timer, at once, in its request's context
            token.timers[d].mod(self._timer_ctx(token, d), self.clock())
            self.any_timer_armed[d] = True
        self.tokens[d] = token
        return wake


# -- the registry of groups (main thread) -----------------------------------------------------
_groups: dict[str, ThrottleGroup] = {}


def throttle_group_find(name: str) -> ThrottleGroup | None:
    """Main thread: the group called ``name`` (an object, or made by block_set_io_throttle)."""
    return _groups.get(name)


def throttle_groups() -> list[ThrottleGroup]:
    """Main thread."""
    return list(_groups.values())


def throttle_group_register_tgm(m: ThrottleGroupMember, name: str) -> ThrottleGroup:
    """Main thread: ``m`` joins group ``name``, created (unlimited, not an object) if there is
    none — QEMU's throttle_group_incref + register_tgm."""
    g = _groups.get(name)
    if g is None:
        g = _groups[name] = ThrottleGroup(name)
    g.register(m)
    return g


def throttle_group_unregister_tgm(m: ThrottleGroupMember) -> None:
    """Main thread: ``m`` leaves its group; a group nobody made with object-add goes with its
    last member."""
    g = m.group
    if g is None:
        return
    g.unregister(m)
    if not g.members and not g.user_created and _groups.get(g.name) is g:
        del _groups[g.name]


def throttle_group_object_add(v: dict[str, Any], from_json: bool,
                              taken: Iterable[str] = ()) -> ThrottleGroup:
    """``--object throttle-group,id=G,limits.iops-total=N,...`` (or QMP object-add): create
    the group.  ``taken``: ids other objects already use.  Properties apply in the order
    given, as QEMU's; the limits are then validated.  Main thread.  Raises KeyvalError."""
    check_keys(v, ("qom-type", "id", "limits", *X_PROPERTIES))
    oid = to_str(require(v, "id"), "id", from_json=from_json)
    cfg = ThrottleConfig()
    for key, raw in v.items():
        if key == "limits":
            cfg = limits_to_config(to_dict(raw, "limits"), cfg, from_json)
        elif key in X_PROPERTIES:
            value = to_int(raw, key, "int64", from_json=from_json)
            if value < 0:
                raise ThrottleConfigError("Property values cannot be negative")
            if key.endswith("-max-length") and value > UINT_MAX:
                # QEMU's text, missing space included
                raise ThrottleConfigError(f"{key} value must be in therange [0, {UINT_MAX}]")
            cfg.set_limit(key[2:], value)
    existing = _groups.get(oid)
    if oid in set(taken) or (existing is not None and existing.user_created):
        raise KeyvalError(f"attempt to add duplicate property '{oid}' to object "
                          "(type 'container')")
    if existing is not None:
        raise KeyvalError("A group with this name already exists")
    cfg.validate()
    g = _groups[oid] = ThrottleGroup(oid, cfg, user_created=True)
    return g


def throttle_group_object_del(oid: str) -> None:
    """QMP object-del of a throttle-group: refused while a node uses it.  Main thread.
    Raises KeyError (no such object) or KeyvalError."""
    g = _groups.get(oid)
    if g is None or not g.user_created:
        raise KeyError(oid)
    if g.members:
        raise KeyvalError(f"object '{oid}' is in use, can not be deleted")
    del _groups[oid]
