"""Connection lifecycle: many frontends come and go, some with requests in flight.

After 200 connect/disconnect cycles the daemon still serves, its open fds and RSS are stable,
its sockets are private (0600), a second frontend connecting while one is attached is
accepted and closed at once without disturbing the first, and one connecting while the previous
one is still closing waits and is then served.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from tests.daemon import DaemonProcess
from tests.frontend.vhost_user import (
    GET_FEATURES,
    S_OK,
    SECTOR,
    T_IN,
    T_OUT,
    VhostUserFrontend,
    blk_header,
    connect,
)
from tests.reliability import SCRATCH, Harness, pattern

CYCLES = 200
WARMUP = 20
RSS_SLACK_KIB = 4 << 10  # allocator noise; a leak per cycle would exceed this over 180 cycles


def _cycle(env: Harness, i: int) -> None:
    """One frontend's life; the kind of life depends on ``i``."""
    kind = i % 6
    if kind == 0:  # connect and hang up at once
        VhostUserFrontend(env.a_sock).close()
        return
    fe = connect(env.a_sock)
    try:
        if kind == 1:  # handshake only
            fe.handshake()
            return
        if kind == 2:  # memory table, no rings
            fe.setup(queue_size=32, start=False)
            fe.set_mem_table()
            return
        fe.setup(queue_size=64)
        if kind == 3:  # a verified write and read
            data = pattern(SCRATCH, 2, seed=i)
            assert fe.write(SCRATCH, data) == S_OK
            assert fe.read(SCRATCH, len(data), queue=1) == (S_OK, data)
            return
        # kinds 4 and 5: requests in flight on both queues when the frontend goes away
        for q in fe.queues:
            for k in range(24):
                if k % 3 == 0:
                    q.submit_blk(blk_header(T_OUT, SCRATCH + 16 + k) + pattern(0, 1, seed=i), 1)
                else:
                    q.submit_blk(blk_header(T_IN, k * 64), 64 * SECTOR + 1)
            q.kick()
        if kind == 5:  # ... and a message right behind the kicks
            fe.send_msg(GET_FEATURES)
    finally:
        fe.close()


def test_connect_disconnect_cycles(env: Harness) -> None:
    t0 = time.monotonic()
    for i in range(WARMUP):
        _cycle(env, i)
    env.assert_alive()
    env.check_fds()
    rss0 = env.rss_kib()
    for i in range(WARMUP, CYCLES):
        try:
            _cycle(env, i)
        except Exception as e:
            env.assert_alive()
            raise AssertionError(f"cycle {i} (kind {i % 6}): {e!r}\n{env.new_log()}") from e
    env.assert_alive()
    env.check_fds()
    env.check_healthy()
    rss1 = env.rss_kib()
    assert rss1 - rss0 < RSS_SLACK_KIB, f"RSS grew from {rss0} to {rss1} KiB over " \
                                        f"{CYCLES - WARMUP} cycles"
    stats = env.daemon.stats()["exports"]["expA"]  # type: ignore[union-attr]
    assert stats["connections"] >= CYCLES - CYCLES // 6
    assert all(q["in-flight"] == 0 for q in stats["queues"])
    assert time.monotonic() - t0 < 60


def test_socket_mode(env: Harness) -> None:
    for path in (env.a_sock, env.b_sock):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{path}: mode {stat.S_IMODE(st.st_mode):o}"


def test_second_frontend_refused(env: Harness) -> None:
    with connect(env.a_sock) as first:
        first.setup(queue_size=64)
        data = pattern(SCRATCH, 4, seed=99)
        assert first.write(SCRATCH, data) == S_OK
        # requests in flight on the first while the second knocks
        q = first.queues[0]
        reqs = [q.submit_blk(blk_header(T_IN, k * 8), 8 * SECTOR + 1) for k in range(32)]
        q.kick()
        for _ in range(3):
            second = VhostUserFrontend(env.a_sock, timeout=3)
            try:
                second.send_msg(GET_FEATURES)
            except Exception:
                pass
            assert second.peer_closed(3), "a second frontend was not closed at once"
            second.close()
        q.wait(reqs)
        assert all(r.status == S_OK for r in reqs)
        assert first.read(SCRATCH, len(data), queue=1) == (S_OK, data)
        assert first.get_features() == first.offered_features
        assert first.get_vring_base(1) == 1 + 0  # queue 1 served exactly one request
        assert not first.peer_closed(0.2)
    env.check_healthy()


def test_frontend_waits_while_previous_one_closes(tmp_path: Path) -> None:
    """A frontend that connects while the previous one's requests are still in flight (QEMU
    restarting) waits in the backlog and is served once they complete: it is not refused."""
    img = tmp_path / "disk.img"
    img.write_bytes(pattern(0, 64))
    sock = str(tmp_path / "vhost.sock")
    with DaemonProcess([
        "--blockdev", f"driver=x-delay,node-name=d,every=1,delay-us=300000,"
                      f"file.driver=file,file.filename={img},file.aio=io_uring",
        "--export", f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={sock},"
                    "writable=on",
    ], tmp_path) as d:
        first = connect(sock)
        first.setup(queue_size=64)
        q = first.queues[0]
        for k in range(4):
            q.submit_blk(blk_header(T_IN, k), SECTOR + 1)
        q.kick()
        time.sleep(0.1)  # popped: each now takes 300 ms
        first.close()
        t0 = time.monotonic()
        with connect(sock, retry_for=0) as second:  # no retry: a refusal fails the test
            second.setup(queue_size=64)
            assert second.read(8, SECTOR, timeout=10) == (S_OK, pattern(8, 1))
        assert time.monotonic() - t0 >= 0.1, "the old connection did not wait for its requests"
        assert d.proc.poll() is None
