"""A fuzzing vhost-user frontend: every header field drawn from the full 32-bit range.

Each case connects to export A, brings the connection to one of four states (fresh, after
GET_FEATURES, set up with queues stopped, set up with queues running), sends one message whose
request, flags and size are any 32-bit values (with a payload of any length up to the declared
one, and 0 to 12 file descriptors), then hangs up.  After every case the harness checks what a
user relies on: the daemon is alive, export B still serves, export A accepts a well-behaved
frontend and serves a verified write and read, and the daemon's fd table is back to its
baseline.  The seed is fixed, so a failure is reproducible; ``PYVHOST_FUZZ_CASES`` and
``PYVHOST_FUZZ_SEED`` run more or other cases.

The two defects an independent fuzzing frontend found are pinned as tests of their own.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from tests.frontend.vhost_user import (
    GET_FEATURES,
    HDR,
    SET_OWNER,
    VHOST_USER_VERSION,
    connect,
)
from tests.reliability import Harness, Verdict

CASES = int(os.environ.get("PYVHOST_FUZZ_CASES", "300"))
SEED = int(os.environ.get("PYVHOST_FUZZ_SEED", "20261130"))

# Values at the edges of each field's range, mixed with uniformly drawn ones.
_EDGES = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
          0x80000001, 0xFFFFFFFE, 0xFFFFFFFF]
STATES = ("fresh", "features", "set-up", "running")


def _eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


@dataclass
class Case:
    state: str
    request: int
    flags: int
    size: int
    payload_len: int
    nfds: int
    seed: int

    def __str__(self) -> str:
        return (f"state={self.state} request={self.request:#x} flags={self.flags:#x} "
                f"size={self.size:#x} payload={self.payload_len} fds={self.nfds} "
                f"(PYVHOST_FUZZ_SEED={SEED}, case seed {self.seed})")


def _u32(rng: random.Random, known: range | None = None) -> int:
    r = rng.random()
    if r < 0.35:
        return rng.choice(_EDGES)
    if known is not None and r < 0.7:
        return rng.choice(known)
    return rng.getrandbits(32)


def _draw(rng: random.Random) -> Case:
    request = _u32(rng, range(0, 50))  # the defined request codes, and some past them
    flags = _u32(rng, range(0, 16))
    if rng.random() < 0.5:
        flags = (flags & ~0x3) | VHOST_USER_VERSION  # let it past the version check too
    size = _u32(rng, range(0, 300))
    if size <= 300:
        payload_len = size if rng.random() < 0.7 else rng.randrange(0, size + 1)
    else:
        payload_len = rng.randrange(0, 300)
    nfds = rng.choice([0, 0, 0, 1, 1, 2, 3, 8, rng.randrange(0, 13)])
    return Case(rng.choice(STATES), request, flags, size, payload_len, nfds,
                rng.getrandbits(32))


def _run_case(env: Harness, case: Case) -> None:
    rng = random.Random(case.seed)
    with connect(env.a_sock) as fe:
        if case.state == "features":
            fe.get_features()
        elif case.state == "set-up":
            fe.setup(queue_size=64, start=False)
        elif case.state == "running":
            fe.setup(queue_size=64)
        fds = _eventfds(case.nfds)
        try:
            hdr = HDR.pack(case.request, case.flags, case.size)
            fe.send_raw(hdr + rng.randbytes(case.payload_len), fds)
        except OSError:
            pass  # the daemon may close first (e.g. on a refused header): that is an answer
        finally:
            for fd in fds:
                os.close(fd)
        # Hang up without waiting: the daemon must notice and free the export either way.


def test_fuzz_headers(env: Harness) -> None:
    rng = random.Random(SEED)
    for i in range(CASES):
        case = _draw(rng)
        try:
            _run_case(env, case)
            env.check_healthy()
        except AssertionError as e:
            raise AssertionError(f"fuzz case {i}: {case}\n{e}") from e


def test_request_all_ones_closes_and_frees_the_export(env: Harness) -> None:
    """request=0xFFFFFFFF flags=1 size=0 after GET_FEATURES once got no answer, the connection
    stayed open, its close went unnoticed and the export refused every later frontend."""
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.get_features()
        fe.send_raw(HDR.pack(0xFFFFFFFF, VHOST_USER_VERSION, 0))
        v.expect_closed(fe, "request 0xFFFFFFFF", 3)
    v.finish()
    log = env.new_log(100_000)
    v.expect("request 4294967295" in log,
             f"the refusal names the request as sent (unsigned); log:\n{log}")
    v.expect("request -1" not in log, "a request code was read as a signed number")
    if v.problems:
        raise AssertionError("\n".join(v.problems))


def test_request_all_ones_then_hang_up(env: Harness) -> None:
    """The same message, the frontend hanging up at once: the export serves the next one."""
    with connect(env.a_sock) as fe:
        fe.get_features()
        fe.send_raw(HDR.pack(0xFFFFFFFF, VHOST_USER_VERSION, 0))
    env.check_healthy()


def test_request_zero_with_fds_closes_them(env: Harness) -> None:
    """request=0 flags=1 size=0 with 8 eventfds closed the connection silently and kept all 8."""
    v = Verdict(env)
    for _ in range(3):
        with connect(env.a_sock) as fe:
            fe.send_msg(SET_OWNER)
            fds = _eventfds(8)
            try:
                fe.send_raw(HDR.pack(0, VHOST_USER_VERSION, 0), fds)
            finally:
                for fd in fds:
                    os.close(fd)
            v.expect_closed(fe, "request 0 with 8 fds", 3)
    v.finish()  # includes: the daemon's fds are back to the baseline
    log = env.new_log(100_000)
    assert "request 0" in log, f"refusing request 0 leaves no log line; log:\n{log}"


def test_get_features_still_answered_after_fuzz_state(env: Harness) -> None:
    """A sanity anchor for the fuzz: a valid message still gets its reply (so a case that
    'passes' because the daemon answers nothing would show up here)."""
    with connect(env.a_sock) as fe:
        assert fe.get_features() != 0
        fe.send_msg(GET_FEATURES)
        assert fe.recv_msg().request == GET_FEATURES
    env.check_healthy()
