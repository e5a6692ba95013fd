"""AioContext: bottom halves across threads, fd handlers, error isolation, aio_wait_until."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from blocklayer import aio
from blocklayer.aio import (
    AioContext,
    aio_wait_kick,
    aio_wait_until,
    current_aio_context,
    qemu_get_aio_context,
)
from blocklayer.iothread import IOThread
from tests.unit.conftest import drain_bhs, run_until


@pytest.fixture
def ctx():
    c = AioContext("unit")
    yield c
    assert not c._bh
    c.close()


def test_main_context_is_a_singleton():
    assert qemu_get_aio_context() is qemu_get_aio_context()
    assert current_aio_context() is qemu_get_aio_context()  # outside any running loop


def test_bh_runs_in_poll_not_in_schedule(ctx):
    ran = []
    ctx.schedule(ran.append, 1)
    ctx.schedule(ran.append, 2)
    assert ran == []
    assert ctx.aio_poll(blocking=False) is True
    assert ran == [1, 2]
    assert ctx.aio_poll(blocking=False) is False


def test_bh_scheduled_by_bh_runs_in_same_poll(ctx):
    ran = []
    ctx.schedule(lambda: ctx.schedule(ran.append, "nested"))
    ctx.aio_poll(blocking=False)
    assert ran == ["nested"]


def test_bh_from_other_thread_wakes_blocked_poll(ctx):
    ran_in = []
    started = threading.Event()

    def other():
        started.wait(5)
        time.sleep(0.05)  # let the main thread block in epoll
        ctx.schedule(lambda: ran_in.append(threading.get_ident()))

    t = threading.Thread(target=other)
    t.start()
    started.set()
    t0 = time.monotonic()
    progress = ctx.aio_poll(blocking=True, timeout=10)
    elapsed = time.monotonic() - t0
    t.join(5)
    assert progress is True
    assert ran_in == [threading.get_ident()]  # ran in the loop's thread, not the scheduler's
    assert elapsed < 5  # woken up, not timed out


def test_many_bhs_from_many_threads(ctx):
    count = [0]
    n_threads, per = 4, 250

    def worker():
        for _ in range(per):
            ctx.schedule(lambda: count.__setitem__(0, count[0] + 1))

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while count[0] < n_threads * per and time.monotonic() < deadline:
        ctx.aio_poll(blocking=True, timeout=0.1)
    for t in threads:
        t.join(5)
    drain_bhs(ctx)
    assert count[0] == n_threads * per


def test_blocking_poll_with_timeout_returns_without_progress(ctx):
    t0 = time.monotonic()
    assert ctx.aio_poll(blocking=True, timeout=0.05) is False
    assert 0.03 < time.monotonic() - t0 < 2


def test_fd_handler_fires_and_can_be_removed(ctx):
    r, w = os.pipe()
    try:
        fired = []

        def on_read():
            fired.append(os.read(r, 100))

        ctx.set_fd_handler(r, on_read)
        assert ctx.aio_poll(blocking=False) is False
        os.write(w, b"hello")
        assert ctx.aio_poll(blocking=True, timeout=5) is True
        assert fired == [b"hello"]
        # replacing the handler keeps the registration
        ctx.set_fd_handler(r, lambda: fired.append(os.read(r, 100) + b"!"))
        os.write(w, b"x")
        ctx.aio_poll(blocking=True, timeout=5)
        assert fired == [b"hello", b"x!"]
        ctx.set_fd_handler(r, None)
        os.write(w, b"ignored")
        assert ctx.aio_poll(blocking=True, timeout=0.05) is False
        assert fired == [b"hello", b"x!"]
        ctx.set_fd_handler(r, None)  # removing twice is harmless
    finally:
        os.close(r)
        os.close(w)


def test_fd_write_handler(ctx):
    """A write handler runs while the fd is writable (EPOLLOUT); read and write handlers of one
    fd are independent, and either can be dropped without the other."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        reads, writes = [], []

        def on_read():
            reads.append(a.recv(100))

        def on_write():
            writes.append(a.send(b"ping"))

        ctx.set_fd_handler(a.fileno(), on_read)  # the old signature: read only
        assert ctx.aio_poll(blocking=True, timeout=0.05) is False
        # now also writable: the write handler runs, the read handler does not
        ctx.set_fd_handler(a.fileno(), on_read, write_handler=on_write)
        assert ctx.aio_poll(blocking=True, timeout=5) is True
        assert writes == [4] and reads == []
        assert b.recv(100) == b"ping"
        # nothing more to write: drop the write handler, keep reading
        ctx.set_fd_handler(a.fileno(), on_read)
        writes.clear()
        b.send(b"pong")
        assert ctx.aio_poll(blocking=True, timeout=5) is True
        assert reads == [b"pong"] and writes == []
        assert ctx.aio_poll(blocking=True, timeout=0.05) is False
        # a write-only fd; then neither: no longer watched
        ctx.set_fd_handler(a.fileno(), None, on_write)
        assert ctx.aio_poll(blocking=True, timeout=5) is True and writes == [4]
        ctx.set_fd_handler(a.fileno(), None)
        assert a.fileno() not in ctx._handlers and a.fileno() not in ctx._writers
        assert ctx.aio_poll(blocking=True, timeout=0.05) is False
        ctx.set_fd_handler(a.fileno(), None)  # removing twice is harmless
    finally:
        a.close()
        b.close()


def test_writable_only_event_never_calls_the_read_handler(ctx):
    """An fd reported only writable whose write handler another handler removed after the
    wait (same round of events): its read handler is not called -- there is nothing to read
    (for libnbd a read then would hold new commands until a reply arrives)."""
    r, w = os.pipe()
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        reads: list[bytes] = []
        os.write(w, b"x")  # the pipe is ready first, so its handler runs first

        def on_read() -> None:
            try:
                reads.append(a.recv(100))
            except BlockingIOError:
                reads.append(b"<nothing to read>")

        def on_pipe() -> None:
            os.read(r, 10)
            ctx.set_fd_handler(a.fileno(), on_read)  # its write handler is gone

        ctx.set_fd_handler(r, on_pipe)
        ctx.set_fd_handler(a.fileno(), on_read, write_handler=lambda: None)
        assert ctx.aio_poll(blocking=True, timeout=5) is True
        assert reads == []
        b.send(b"data")  # a real read event still reaches it
        assert ctx.aio_poll(blocking=True, timeout=5) is True
        assert reads == [b"data"]
    finally:
        ctx.set_fd_handler(r, None)
        ctx.set_fd_handler(a.fileno(), None)
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_write_handler_on_hangup(ctx):
    """The peer went away: a write-only fd's handler runs (EPOLLHUP/EPOLLERR), so the writer
    learns of it."""
    r, w = os.pipe()
    os.close(r)
    try:
        fired = []
        ctx.set_fd_handler(w, None, lambda: fired.append(True))
        assert ctx.aio_poll(blocking=True, timeout=5) is True
        assert fired
        ctx.set_fd_handler(w, None)
    finally:
        os.close(w)


def test_removing_handler_of_closed_fd(ctx):
    r, w = os.pipe()
    ctx.set_fd_handler(r, lambda: None)
    os.close(r)
    os.close(w)
    ctx.set_fd_handler(r, None)  # must not raise
    assert r not in ctx._handlers


def test_fd_handler_on_main_context(main_ctx):
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fired = []

        def handler():
            fired.append(os.eventfd_read(efd))

        main_ctx.set_fd_handler(efd, handler)
        os.eventfd_write(efd, 3)
        run_until(lambda: fired)
        assert fired == [3]
    finally:
        main_ctx.set_fd_handler(efd, None)
        os.close(efd)


def test_exception_in_bh_is_logged_and_loop_continues(ctx, caplog):
    ran = []

    def boom():
        raise RuntimeError("kaboom")

    ctx.schedule(ran.append, "before")
    ctx.schedule(boom)
    ctx.schedule(ran.append, "after")
    with caplog.at_level(logging.ERROR, logger="pyvhost_blk.aio"):
        ctx.aio_poll(blocking=False)
    assert ran == ["before", "after"]
    msgs = [r for r in caplog.records if "bottom half" in r.getMessage()]
    assert len(msgs) == 1
    assert msgs[0].exc_info and "kaboom" in str(msgs[0].exc_info[1])
    ctx.schedule(ran.append, "later")
    ctx.aio_poll(blocking=False)
    assert ran[-1] == "later"


def test_exception_in_fd_handler_is_logged(ctx, caplog):
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        def bad():
            os.eventfd_read(efd)
            raise ValueError("bad handler")

        ctx.set_fd_handler(efd, bad)
        os.eventfd_write(efd, 1)
        with caplog.at_level(logging.ERROR, logger="pyvhost_blk.aio"):
            ctx.aio_poll(blocking=True, timeout=5)
        assert any("fd handler" in r.getMessage() for r in caplog.records)
        ran = []
        ctx.schedule(ran.append, 1)
        ctx.aio_poll(blocking=False)
        assert ran == [1]
    finally:
        ctx.set_fd_handler(efd, None)
        os.close(efd)


def test_run_stop_and_current_context_in_loop_thread():
    c = AioContext("unit-run")
    seen = []
    t = threading.Thread(target=c.run, daemon=True)
    t.start()
    done = threading.Event()

    def probe():
        seen.append((current_aio_context(), threading.get_ident(), c.in_home_thread()))
        done.set()

    c.schedule(probe)
    assert done.wait(5)
    c.stop()
    t.join(5)
    assert not t.is_alive()
    assert seen == [(c, t.ident, True)]
    assert c.home_thread == t.ident
    assert not c.in_home_thread()  # called from the test's thread
    c.close()


def test_run_until_should_stop():
    c = AioContext("unit-should-stop")
    flag = threading.Event()
    t = threading.Thread(target=c.run, kwargs={"should_stop": flag.is_set}, daemon=True)
    t.start()
    flag.set()
    c.schedule(lambda: None)  # wake it up so it re-checks
    t.join(5)
    assert not t.is_alive()
    c.close()


def test_iothread_runs_bhs_in_its_thread():
    it = IOThread("unit-io")
    it.start()
    try:
        got = []
        ev = threading.Event()
        it.ctx.schedule(lambda: (got.append((threading.get_ident(), current_aio_context())),
                                 ev.set()))
        assert ev.wait(5)
        assert got == [(it.thread_id, it.ctx)]
        assert it.thread_id != threading.get_ident()
    finally:
        it.stop()
        it.ctx.close()
    assert not it._thread.is_alive()


# -- aio_wait_until / aio_wait_kick ------------------------------------------------------------
def test_aio_wait_until_immediate(main_ctx):
    called = []
    aio_wait_until(lambda: True, lambda: called.append(1))
    assert called == [1]
    assert aio._waiters == []


def test_aio_wait_until_after_kick(main_ctx):
    flag = [False]
    called = []
    aio_wait_until(lambda: flag[0], lambda: called.append(1))
    drain_bhs(main_ctx)
    assert called == []
    flag[0] = True
    assert called == []  # nothing rechecks until someone kicks
    aio_wait_kick()
    assert called == []  # the recheck is a BH of the main context
    run_until(lambda: called)
    assert called == [1]
    aio_wait_kick()
    drain_bhs(main_ctx)
    assert called == [1]  # exactly once
    assert aio._waiters == []


def test_aio_wait_kick_from_another_thread(main_ctx):
    flag = threading.Event()
    called = []
    aio_wait_until(flag.is_set, lambda: called.append(threading.get_ident()))
    drain_bhs(main_ctx)

    def other():
        time.sleep(0.02)
        flag.set()
        aio_wait_kick()

    t = threading.Thread(target=other)
    t.start()
    run_until(lambda: called)
    t.join(5)
    assert called == [threading.get_ident()]  # then() runs in the main loop's thread


def test_aio_wait_several_waiters(main_ctx):
    a, b = [False], [False]
    called = []
    aio_wait_until(lambda: a[0], lambda: called.append("a"))
    aio_wait_until(lambda: b[0], lambda: called.append("b"))
    drain_bhs(main_ctx)
    b[0] = True
    aio_wait_kick()
    run_until(lambda: called)
    assert called == ["b"]
    a[0] = True
    aio_wait_kick()
    run_until(lambda: len(called) == 2)
    assert called == ["b", "a"]
    assert aio._waiters == []


def test_aio_wait_kick_without_waiters_schedules_nothing(main_ctx):
    drain_bhs(main_ctx)
    aio_wait_kick()
    assert not main_ctx._bh


# -- signal handlers -----------------------------------------------------------------------------
_SIGNAL_SCRIPT = r"""
import os, signal
from blocklayer.aio import AioContext
ctx = AioContext("sig")
ran = []
signal.signal(signal.SIGUSR1, lambda *a: ctx.schedule_from_signal_handler(ran.append, "sig"))
# The main thread is inside one of the context's locked sections (aio_poll, _run_bhs and
# schedule itself take _bh_lock on every iteration) when the signal arrives; Python runs the
# handler right there, at the next bytecode boundary.
with ctx._bh_lock:
    os.kill(os.getpid(), signal.SIGUSR1)
    x = 1 + 1
ctx.aio_poll(blocking=False)
print(ran)
"""


def test_schedule_from_signal_handler_while_main_thread_holds_bh_lock(tmp_path):
    """The daemon's SIGTERM/SIGUSR1 handlers schedule work into the main loop; a handler that
    interrupts the main loop inside a _bh_lock section must not deadlock on that lock."""
    try:
        r = subprocess.run([sys.executable, "-c", _SIGNAL_SCRIPT], capture_output=True,
                           text=True, timeout=3, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("deadlock: AioContext.schedule() from a signal handler blocked on _bh_lock")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['sig']"


def test_timers_run_in_deadline_order_and_cancel(ctx):
    ran = []
    ctx.timer_new(0.06, ran.append, "late")
    ctx.timer_new(0.02, ran.append, "early")
    dropped = ctx.timer_new(0.04, ran.append, "cancelled")
    dropped.cancel()
    t0 = time.monotonic()
    while len(ran) < 2 and time.monotonic() - t0 < 2:
        ctx.aio_poll(blocking=True)  # sleeps until the next deadline, not forever
    assert ran == ["early", "late"]
    assert time.monotonic() - t0 >= 0.06


def test_a_timer_from_another_thread_shortens_a_blocked_wait():
    t = IOThread("timers")
    t.start()
    try:
        fired = threading.Event()
        t.ctx.schedule(lambda: None)
        time.sleep(0.2)  # the loop is now asleep with no deadline
        t0 = time.monotonic()
        t.ctx.timer_new(0.05, fired.set)
        assert fired.wait(2)
        assert time.monotonic() - t0 < 1.0
    finally:
        t.stop()
