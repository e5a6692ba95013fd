"""Throttling: QEMU's leaky buckets and validation, the group's round robin on a simulated
clock, AioContext timers, and the throttle filter under a BlockBackend."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from blocklayer.aio import AioContext
from blocklayer.block_backend import blk_aio_flush, blk_aio_preadv, blk_aio_pwritev
from blocklayer.iothread import IOThread
from blocklayer.iov import IOVector
from blocklayer.throttle_group import (
    BPS_TOTAL,
    OPS_READ,
    OPS_TOTAL,
    READ,
    THROTTLE_VALUE_MAX,
    WRITE,
    KeyvalError,
    LeakyBucket,
    ThrottleConfig,
    ThrottleConfigError,
    ThrottleGroup,
    ThrottleGroupMember,
    ThrottleState,
    ThrottleTimer,
    limits_to_config,
    throttle_group_find,
    throttle_group_object_add,
    throttle_group_object_del,
)
from tests.unit.conftest import run_until, unique

MS = 1_000_000
SEC = 1_000_000_000


# -- buckets ----------------------------------------------------------------------------------
def test_bucket_without_max_holds_a_tenth_of_a_second():
    b = LeakyBucket(avg=100)
    b.level = 10
    assert b.compute_wait() == 0  # exactly full: may go
    b.level = 15
    assert b.compute_wait() == 50 * MS  # 5 units over, leaking 100/s
    b.leak(25 * MS)
    assert b.level == pytest.approx(12.5)
    b.leak(10 * SEC)
    assert b.level == 0


def test_bucket_with_burst_limits_the_burst_rate():
    b = LeakyBucket(avg=100, max=2000, burst_length=60)
    b.level, b.burst_level = 500, 250  # main bucket (120000) far from full
    assert b.compute_wait() == 25 * MS  # burst bucket (200) 50 over, leaking 2000/s
    b.leak(10 * MS)
    assert b.level == pytest.approx(499) and b.burst_level == pytest.approx(230)
    b.level, b.burst_level = 120100, 0
    assert b.compute_wait() == 1 * SEC  # main bucket 100 over, leaking 100/s


def test_max_with_length_one_is_a_bucket_of_max_units():
    b = LeakyBucket(avg=100, max=2000)
    b.level = 2000
    assert b.compute_wait() == 0
    b.level = 2001
    assert b.compute_wait() == 10 * MS
    b.leak(SEC)
    assert b.burst_level == 0  # not tracked with burst_length 1


def test_account_counts_bytes_and_units_with_iops_size():
    st = ThrottleState(clock=lambda: 0)
    cfg = ThrottleConfig()
    cfg.buckets[OPS_TOTAL].avg = 1000
    cfg.buckets[BPS_TOTAL].avg = 1 << 20
    cfg.op_size = 4096
    st.config(cfg)
    st.account(WRITE, 8192)
    st.account(READ, 2048)
    st.account(READ, 6144)
    bk = st.cfg.buckets
    assert bk[OPS_TOTAL].level == pytest.approx(2 + 1 + 1.5)
    assert bk[BPS_TOTAL].level == 8192 + 2048 + 6144
    assert bk[OPS_READ].level == pytest.approx(2.5)


def test_config_empties_the_buckets():
    now = [0]
    st = ThrottleState(clock=lambda: now[0])
    cfg = ThrottleConfig()
    cfg.buckets[OPS_TOTAL].avg = 10
    st.config(cfg)
    for _ in range(5):
        st.account(READ, 512)
    assert st.compute_timer(READ, 0) == (True, 400 * MS)  # 4 over a bucket of 1
    st.config(cfg)
    assert st.compute_timer(READ, 0) == (False, 0)


# -- validation: QEMU's messages ---------------------------------------------------------------
@pytest.mark.parametrize("limits,message", [
    ({"iops-total": "10", "iops-read": "5"},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"bps-total-max": "10", "bps-write-max": "20", "bps-total": "1", "bps-write": "0"},
     "bps/iops/max total values and read/write values cannot be used at the same time"),
    ({"iops-total": "-1"}, f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"),
    ({"bps-read": str(THROTTLE_VALUE_MAX + 1)},
     f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"),
    ({"iops-total-max": "5"}, "bps_max/iops_max require corresponding bps/iops values"),
    ({"iops-total": "10", "iops-total-max": "5"},
     "bps_max/iops_max cannot be lower than bps/iops"),
    ({"iops-total": "10", "iops-total-max-length": "5"}, "burst length set without burst rate"),
    ({"iops-total": "10", "iops-total-max-length": "0"}, "the burst length cannot be 0"),
    ({"iops-total": "5", "iops-total-max-length": "-1"}, "burst length set without burst rate"),
    ({"iops-total": "1", "iops-total-max": "2", "iops-total-max-length": "99999999999"},
     "iops-total-max-length value must be in the range [0, 4294967295]"),
    ({"iops-total": "1", "iops-total-max": str(THROTTLE_VALUE_MAX),
      "iops-total-max-length": "2"}, "burst length too high for this burst rate"),
    ({"iops-size": "4096"}, "iops size requires an iops value to be set"),
    ({"foo": "1"}, "Parameter 'limits.foo' is unexpected"),
    ({"iops-total": "abc"}, "Parameter 'limits.iops-total' expects integer"),
])
def test_invalid_limits_give_qemus_messages(limits, message):
    with pytest.raises(KeyvalError) as e:
        limits_to_config(limits, ThrottleConfig(), from_json=False)
    assert str(e.value) == message


def test_limits_round_trip_and_block_device_info():
    cfg = limits_to_config({"iops-read": 100, "iops-read-max": 1000, "iops-read-max-length": 5,
                            "bps-write": 1 << 20, "iops-size": 4096}, ThrottleConfig(),
                           from_json=True)
    lim = cfg.to_limits()
    assert lim["iops-read"] == 100 and lim["iops-read-max"] == 1000
    assert lim["iops-read-max-length"] == 5 and lim["iops-total-max-length"] == 1
    assert lim["bps-write"] == 1 << 20 and lim["iops-size"] == 4096
    assert len(lim) == 19
    assert cfg.to_block_device_info() == {
        "bps": 0, "bps_rd": 0, "bps_wr": 1 << 20, "iops": 0, "iops_rd": 100, "iops_wr": 0,
        "iops_rd_max": 1000, "iops_rd_max_length": 5, "iops_size": 4096}
    assert cfg.enabled() and not ThrottleConfig().enabled()
    assert limits_to_config({"iops-read": 50}, cfg, True).get_limit("iops-read") == 50
    assert cfg.get_limit("iops-read") == 100  # the merge copies


# -- objects ----------------------------------------------------------------------------------
def test_object_add_and_del():
    gid = unique("g")
    g = throttle_group_object_add({"qom-type": "throttle-group", "id": gid,
                                   "limits": {"iops-total": "1000"}}, False)
    assert throttle_group_find(gid) is g and g.user_created
    assert g.get_config().buckets[OPS_TOTAL].avg == 1000

    def err(v: dict[str, Any], j: bool = False, taken: tuple[str, ...] = ()) -> str:
        with pytest.raises(KeyvalError) as e:
            throttle_group_object_add({"qom-type": "throttle-group", **v}, j, taken)
        return str(e.value)

    assert err({"id": gid}) == \
        f"attempt to add duplicate property '{gid}' to object (type 'container')"
    assert err({"id": "io0"}, taken=("io0",)) == \
        "attempt to add duplicate property 'io0' to object (type 'container')"
    assert err({"id": "x", "x-iops-total": "-5"}) == "Property values cannot be negative"
    assert err({"id": "x", "x-iops-total-max-length": "5000000000"}) == \
        "x-iops-total-max-length value must be in therange [0, 4294967295]"
    assert err({"id": "x", "x-iops-total": "5", "limits": {"iops-total": "7"},
                "x-iops-total-max": "2"}) == "bps_max/iops_max cannot be lower than bps/iops"
    assert err({"id": "x", "bogus": "1"}) == "Parameter 'bogus' is unexpected"
    assert err({}) == "Parameter 'id' is missing"
    assert err({"id": "x", "limits": {"iops-total": "1"}}, j=True) == \
        "Invalid parameter type for 'limits.iops-total', expected: integer"
    x = throttle_group_object_add({"qom-type": "throttle-group", "id": unique("g"),
                                   "x-iops-total": "5", "limits": {"iops-total": "7"}}, False)
    assert x.get_config().buckets[OPS_TOTAL].avg == 7  # in the order given
    throttle_group_object_del(x.name)
    with pytest.raises(KeyError):
        throttle_group_object_del(x.name)

    m = ThrottleGroupMember("n")
    g.register(m)
    with pytest.raises(KeyvalError, match=f"object '{gid}' is in use, can not be deleted"):
        throttle_group_object_del(gid)
    g.unregister(m)
    throttle_group_object_del(gid)
    assert throttle_group_find(gid) is None


# -- the group on a simulated clock ---------------------------------------------------------------
class Sim:
    """A clock, timers and AioContexts that only move when the test says so."""

    def __init__(self) -> None:
        self.now = 0
        self.bhs: list[tuple[Callable[..., Any], tuple]] = []
        self.timers: list[FakeTimer] = []

    def clock(self) -> int:
        return self.now

    def timer(self, cb: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(cb)
        self.timers.append(t)
        return t

    def schedule(self, fn: Callable[..., Any], *args: Any) -> None:
        self.bhs.append((fn, args))

    def run_bhs(self) -> None:
        while self.bhs:
            fn, args = self.bhs.pop(0)
            fn(*args)

    def run_until(self, t_end: int) -> None:
        while True:
            self.run_bhs()
            due = [t for t in self.timers if t.deadline is not None and t.deadline <= t_end]
            if not due:
                self.now = max(self.now, t_end)
                return
            t = min(due, key=lambda t: t.deadline)
            self.now = max(self.now, t.deadline)
            t.deadline = None
            t.cb()


class FakeTimer:
    def __init__(self, cb: Callable[[], None]) -> None:
        self.cb = cb
        self.deadline: int | None = None

    def mod(self, ctx: Any, deadline: int) -> None:
        self.deadline = deadline

    def delete(self) -> None:
        self.deadline = None

    def pending(self) -> bool:
        return self.deadline is not None


class Client:
    """A closed loop keeping ``depth`` requests of ``nbytes`` queued on member ``m``; each
    completes as soon as it is let through."""

    def __init__(self, sim: Sim, m: ThrottleGroupMember, depth: int, nbytes: int = 4096,
                 direction: int = READ) -> None:
        self.sim, self.m, self.nbytes, self.direction = sim, m, nbytes, direction
        self.times: list[int] = []
        self.stopped = False
        for _ in range(depth):
            self.submit()

    def submit(self) -> None:
        self.m.intercept(self.sim, self.nbytes, self.direction, self.done)  # type: ignore

    def done(self) -> None:
        self.times.append(self.sim.now)
        if not self.stopped:
            self.sim.schedule(self.submit)

    def between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.times if t0 * SEC <= t < t1 * SEC)


def _group(sim: Sim, limits: dict[str, int], n: int = 1
           ) -> tuple[ThrottleGroup, list[ThrottleGroupMember]]:
    g = ThrottleGroup("sim", limits_to_config(limits, ThrottleConfig(), True), clock=sim.clock)
    ms = [ThrottleGroupMember(f"m{i}", timer_factory=sim.timer) for i in range(n)]
    for m in ms:
        g.register(m)
    return g, ms


@pytest.mark.parametrize("iops", [10, 1000, 10_000, 100_000])
def test_simulated_rate_is_the_limit(iops):
    sim = Sim()
    _, (m,) = _group(sim, {"iops-total": iops})
    c = Client(sim, m, depth=32)
    sim.run_until(10 * SEC)
    # a tenth of a second's burst at the start, then exactly the limit
    assert c.between(1, 10) == pytest.approx(9 * iops, rel=0.002, abs=2)
    assert c.between(0, 10) == pytest.approx(10 * iops + iops / 10, rel=0.002, abs=34)


def test_bps_and_iops_size_limits():
    sim = Sim()
    _, (m,) = _group(sim, {"bps-total": 4 << 20})
    c = Client(sim, m, depth=8)
    sim.run_until(5 * SEC)
    assert c.between(1, 5) == pytest.approx(4 * 1024, rel=0.01)  # 4 MiB/s of 4 KiB

    sim = Sim()
    _, (m,) = _group(sim, {"iops-total": 1000, "iops-size": 4096})
    c = Client(sim, m, depth=8, nbytes=8192)
    sim.run_until(5 * SEC)
    assert c.between(1, 5) == pytest.approx(4 * 500, rel=0.01)  # each counts twice


def test_read_and_write_limits_are_separate():
    sim = Sim()
    _, (m,) = _group(sim, {"iops-read": 100, "iops-write": 1000})
    r = Client(sim, m, depth=4, direction=READ)
    w = Client(sim, m, depth=4, direction=WRITE)
    sim.run_until(5 * SEC)
    assert r.between(1, 5) == pytest.approx(400, rel=0.02)
    assert w.between(1, 5) == pytest.approx(4000, rel=0.02)


def test_burst_runs_at_max_for_its_length_then_at_avg():
    sim = Sim()
    _, (m,) = _group(sim, {"iops-total": 100, "iops-total-max": 1000,
                           "iops-total-max-length": 2})
    c = Client(sim, m, depth=16)
    sim.run_until(10 * SEC)
    # the bucket holds 2000; it fills at 1000/s while leaking 100/s: ~2.2 s of burst
    assert c.between(0.2, 1.2) == pytest.approx(1000, rel=0.03)
    assert c.between(1.2, 2.0) == pytest.approx(800, rel=0.03)
    assert c.between(4, 10) == pytest.approx(600, rel=0.02)
    # an idle disk earns its burst back
    c.stopped = True
    sim.run_until(40 * SEC)
    c.stopped = False
    start = len(c.times)
    for _ in range(16):
        c.submit()
    sim.run_until(41 * SEC)
    assert len(c.times) - start == pytest.approx(1000 + 100, rel=0.05)


def test_members_share_the_limit_in_turns():
    sim = Sim()
    _, (a, b) = _group(sim, {"iops-total": 1000}, n=2)
    ca, cb = Client(sim, a, depth=16), Client(sim, b, depth=4)
    sim.run_until(6 * SEC)
    assert ca.between(1, 6) + cb.between(1, 6) == pytest.approx(5000, rel=0.01)
    assert ca.between(1, 6) == pytest.approx(2500, rel=0.05)  # round robin, whatever the depth
    assert cb.between(1, 6) == pytest.approx(2500, rel=0.05)


def test_a_member_alone_gets_the_whole_limit():
    sim = Sim()
    _, (a, b) = _group(sim, {"iops-total": 1000}, n=2)
    ca = Client(sim, a, depth=8)
    sim.run_until(3 * SEC)
    assert ca.between(1, 3) == pytest.approx(2000, rel=0.01)
    assert b.passed == b.throttled == 0


def test_disable_limits_releases_the_queue_and_config_restarts_it():
    sim = Sim()
    g, (m,) = _group(sim, {"iops-total": 10})
    c = Client(sim, m, depth=0)
    c.stopped = True
    for _ in range(20):
        c.submit()
    sim.run_until(0)
    assert len(c.times) == 2 and m.queued() == 18  # a bucket of 1 unit: 0 and 1 pass
    m.disable_limits()
    sim.run_bhs()
    assert len(c.times) == 20 and m.queued() == 0
    m.enable_limits()
    c.times.clear()
    for _ in range(5):
        c.submit()
    sim.run_bhs()
    assert len(c.times) == 0 and m.queued() == 5  # the burst was used up
    g.config(limits_to_config({"iops-total": 100000}, ThrottleConfig(), True))
    sim.run_until(sim.now)
    assert len(c.times) == 5  # new, higher limits at once (empty buckets)


def test_a_drained_member_flushes_its_queue_when_its_timer_fires():
    sim = Sim()
    _, (m,) = _group(sim, {"iops-total": 1})  # one request a second
    c = Client(sim, m, depth=0)
    c.stopped = True
    for _ in range(30):
        c.submit()
    sim.run_until(0)
    assert len(c.times) == 1 and m.queued() == 29
    drained = [True]
    m.is_drained = lambda: drained[0]
    sim.run_until(2 * SEC)  # not 29 s: the first timer finds the node drained
    assert len(c.times) == 30 and c.times[-1] <= SEC
    drained[0] = False
    c.times.clear()
    for _ in range(3):
        c.submit()
    sim.run_until(3 * SEC)
    assert len(c.times) < 3  # limits again


def test_unregistering_a_member_passes_the_turn_on():
    sim = Sim()
    g, (a, b) = _group(sim, {"iops-total": 100}, n=2)
    ca = Client(sim, a, depth=4)
    cb = Client(sim, b, depth=4)
    sim.run_until(SEC // 2)
    ca.stopped = True  # drained: no new requests, and what is queued goes
    a.disable_limits()
    sim.run_bhs()
    assert a.queued() == 0
    g.unregister(a)
    assert a.group is None and g.members == [b] and g.tokens == [b, b]
    n = len(cb.times)
    sim.run_until(2 * SEC)
    # b alone at 100/s for 1.5 s, less the 4 requests a's drain let through
    assert len(cb.times) - n == pytest.approx(146, abs=3)


# -- real timers ------------------------------------------------------------------------------
@pytest.fixture
def ctx():
    c = AioContext("timers")
    yield c
    c.close()


def test_throttle_timer_fires_in_its_context(ctx):
    fired: list[tuple[int, int]] = []
    t0 = time.monotonic_ns()
    t = ThrottleTimer(lambda: fired.append((time.monotonic_ns(), threading.get_ident())))
    t.mod(ctx, t0 + 20 * MS)
    assert t.pending()
    run_until(lambda: fired, ctx)
    assert not t.pending()
    when, tid = fired[0]
    assert 20 * MS <= when - t0 < 500 * MS and tid == threading.get_ident()


def test_throttle_timer_delete_and_rearm(ctx):
    fired: list[str] = []
    a, b = ThrottleTimer(lambda: fired.append("a")), ThrottleTimer(lambda: fired.append("b"))
    now = time.monotonic_ns()
    a.mod(ctx, now + 5 * MS)
    b.mod(ctx, now + 10 * MS)
    a.delete()
    assert not a.pending()
    b.mod(ctx, now + 30 * MS)  # replaces the earlier arming
    a.mod(ctx, now + 15 * MS)
    run_until(lambda: len(fired) == 2, ctx)
    assert fired == ["a", "b"]
    time.sleep(0.05)
    for _ in range(3):
        ctx.aio_poll(blocking=False)
    assert fired == ["a", "b"]


def test_throttle_timer_armed_from_another_thread_fires_in_the_iothread():
    io = IOThread(unique("io"))
    io.start()
    try:
        got = threading.Event()
        where: list[int] = []

        def cb() -> None:
            where.append(threading.get_ident())
            got.set()

        t = ThrottleTimer(cb)
        t.mod(io.ctx, time.monotonic_ns() + 10 * MS)
        assert got.wait(5)
        assert where == [io.thread_id]
    finally:
        io.stop()


def test_threads_share_a_group_without_losing_requests():
    """Two iothreads run closed loops against one group (real time, real timers)."""
    g = ThrottleGroup("mt", limits_to_config({"iops-total": 2000}, ThrottleConfig(), True))
    ios = [IOThread(unique("io")) for _ in range(2)]
    members = [ThrottleGroupMember(f"m{i}") for i in range(2)]
    for m in members:
        g.register(m)
    counts = [0, 0]
    stop = threading.Event()
    lock = threading.Lock()

    def loop(i: int) -> None:
        ctx, m = ios[i].ctx, members[i]

        def done() -> None:
            with lock:
                counts[i] += 1
            if not stop.is_set():
                m.intercept(ctx, 4096, READ, done)

        for _ in range(16):
            m.intercept(ctx, 4096, READ, done)

    for io in ios:
        io.start()
    try:
        t0 = time.monotonic()
        for i, io in enumerate(ios):
            io.ctx.schedule(loop, i)
        time.sleep(1.5)
        stop.set()
        elapsed = time.monotonic() - t0
        time.sleep(0.1)
        total = sum(counts)
        assert total == pytest.approx(2000 * elapsed + 200, rel=0.15)
        assert min(counts) > 0.3 * total  # both got turns
        assert all(m.queued() == 0 for m in members)
    finally:
        for io in ios:
            io.stop()
        for m in members:
            g.unregister(m)


# -- the throttle filter under a BlockBackend ----------------------------------------------------
@pytest.fixture
def group_factory(main_ctx):
    made: list[str] = []

    def make(**limits: int) -> str:
        gid = unique("tg")
        throttle_group_object_add({"qom-type": "throttle-group", "id": gid,
                                   "limits": {k.replace("_", "-"): str(v)
                                              for k, v in limits.items()}}, False)
        made.append(gid)
        return gid

    yield make
    for gid in made:
        g = throttle_group_find(gid)
        if g is not None and not g.members:
            throttle_group_object_del(gid)


def test_throttle_node_options(main_ctx, make_node, group_factory):
    from blocklayer.bdrv import BlockDriverError

    leaf = make_node({"driver": "null-co", "size": "1M"})
    with pytest.raises(BlockDriverError, match="Parameter 'throttle-group' is missing"):
        make_node({"driver": "throttle", "file": leaf.node_name})
    with pytest.raises(BlockDriverError, match="Throttle group 'nope' does not exist"):
        make_node({"driver": "throttle", "file": leaf.node_name, "throttle-group": "nope"})
    gid = group_factory(iops_total=100)
    t = make_node({"driver": "throttle", "file": leaf.node_name, "throttle-group": gid})
    g = throttle_group_find(gid)
    assert g is not None and g.members == [t.drv.tgm]
    info = t.drv.block_device_info()
    assert info["iops"] == 100 and info["group"] == gid and "iops_max" not in info
    assert t.bdrv_getlength() == 1 << 20
    t.drv.close()
    assert g.members == []


def test_throttle_node_paces_reads_and_not_flushes(main_ctx, make_node, make_blk,
                                                   group_factory):
    gid = group_factory(iops_total=200)
    leaf = make_node({"driver": "null-co", "size": "1M", "read-zeroes": "on"})
    t = make_node({"driver": "throttle", "file": leaf.node_name, "throttle-group": gid})
    blk = make_blk(t)
    done: list[float] = []
    t0 = time.monotonic()
    for i in range(40):
        q = IOVector.from_buffers([bytearray(4096)])
        blk_aio_preadv(blk, i * 4096, q, 0, lambda ret: done.append(time.monotonic() - t0))
    flushed: list[int] = []
    blk_aio_flush(blk, flushed.append)
    run_until(lambda: flushed, main_ctx)
    assert flushed == [0] and len(done) <= 21  # the burst (20), and the flush did not wait
    run_until(lambda: len(done) == 40, main_ctx, timeout=10)
    assert done[19] < 0.05
    assert 0.09 <= done[-1] < 1.0  # 20 more at 200/s: 0.1 s
    w: list[int] = []
    blk_aio_pwritev(blk, 0, IOVector.from_buffers([bytearray(512)]), 0, w.append)
    run_until(lambda: w, main_ctx)
    assert w == [0]
    assert t.drv.tgm.throttled >= 19 and t.drv.tgm.queued() == 0


def test_throttle_node_drain_hooks_release_the_queue(main_ctx, make_node, make_blk,
                                                     group_factory):
    gid = group_factory(iops_total=1)
    leaf = make_node({"driver": "null-co", "size": "1M"})
    t = make_node({"driver": "throttle", "file": leaf.node_name, "throttle-group": gid})
    blk = make_blk(t)
    rets: list[int] = []
    for i in range(10):
        blk_aio_preadv(blk, i * 512, IOVector.from_buffers([bytearray(512)]), 0, rets.append)
    run_until(lambda: len(rets) == 1, main_ctx)
    assert t.drv.tgm.queued() == 9
    t.drv.drained_begin()
    run_until(lambda: len(rets) == 10, main_ctx, timeout=0.5)
    t.drv.drained_end()
    assert rets == [0] * 10


def test_throttle_filter_passes_errors_up(main_ctx, make_node, make_blk, group_factory):
    gid = group_factory(iops_total=1000)
    leaf = make_node({"driver": "null-co", "size": "1M"})
    dbg = make_node({"driver": "blkdebug", "image": leaf.node_name,
                     "inject-error": [{"event": "none", "iotype": "read", "errno": "28"}]})
    t = make_node({"driver": "throttle", "file": dbg.node_name, "throttle-group": gid})
    blk = make_blk(t)
    rets: list[int] = []
    blk_aio_preadv(blk, 0, IOVector.from_buffers([bytearray(512)]), 0, rets.append)
    blk_aio_pwritev(blk, 0, IOVector.from_buffers([bytearray(512)]), 0, rets.append)
    run_until(lambda: len(rets) == 2, main_ctx)
    assert sorted(rets) == [-errno.ENOSPC, 0]


def test_config_error_carries_errno():
    with pytest.raises(ThrottleConfigError) as e:
        limits_to_config({"iops-size": 1}, ThrottleConfig(), True)
    assert e.value.errno == errno.EINVAL
