"""Reliability tests: hostile frontends and connection lifecycle against the real daemon.

``Harness`` runs one pyvhost-blk process with two exports:

* ``A`` (the one under attack): a ``file`` image (``aio=io_uring``, so plain requests take the C
  path), writable, 2 queues, served by iothread ``io0``;
* ``B`` (the bystander): another ``file`` image (``aio=threads``: the Python path), 1 queue,
  served by the main loop, with a frontend attached for the whole module.

Every test ends with ``Harness.check_healthy()``: the daemon is alive (else its exit status and
log), B still serves a valid read with the right data, A accepts a new frontend and serves a
verified write + read, and the daemon's open fds (``/proc/PID/fd``, with their targets) are
back to the baseline taken before the test.  A test that kills the daemon fails, and the next
test gets a fresh daemon.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from pathlib import Path

from tests.daemon import DaemonProcess
from tests.frontend.vhost_user import (
    S_OK,
    SECTOR,
    T_GET_ID,
    T_OUT,
    VhostUserFrontend,
    connect,
)

A_SIZE = 16 << 20
B_SIZE = 4 << 20
A_SECTORS = A_SIZE // SECTOR
SCRATCH = A_SECTORS - 64  # sectors [SCRATCH, end) of A: the health check writes here


def pattern(sector: int, count: int = 1, seed: int = 0) -> bytes:
    """Recognisable content: each 8-byte word holds (seed, sector)."""
    return b"".join(struct.pack("<II", seed, s) * (SECTOR // 8)
                    for s in range(sector, sector + count))


class DaemonDied(AssertionError):
    pass


class Harness:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.a_img = workdir / "a.img"
        self.b_img = workdir / "b.img"
        self.a_sock = str(workdir / "a.sock")
        self.b_sock = str(workdir / "b.sock")
        for img, size in ((self.a_img, A_SIZE), (self.b_img, B_SIZE)):
            with open(img, "wb") as f:
                f.write(pattern(0, size // SECTOR))
        self.daemon: DaemonProcess | None = None
        self.b: VhostUserFrontend | None = None
        self.baseline: dict[int, str] = {}
        self.log_mark = 0
        self.restarts = 0
        self.tainted = False  # the last test did not end healthy: restart before the next
        self._seq = 0

    def args(self) -> list[str]:
        return [
            "--object", "iothread,id=io0",
            "--blockdev", f"driver=file,node-name=a,filename={self.a_img},aio=io_uring",
            "--blockdev", f"driver=file,node-name=b,filename={self.b_img},aio=threads",
            "--export", f"type=vhost-user-blk,id=expA,node-name=a,addr.type=unix,"
                        f"addr.path={self.a_sock},writable=on,num-queues=2,iothread=io0",
            "--export", f"type=vhost-user-blk,id=expB,node-name=b,addr.type=unix,"
                        f"addr.path={self.b_sock},writable=on,num-queues=1",
        ]

    # -- process ----------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.proc.pid

    def start(self) -> None:
        self.daemon = DaemonProcess(self.args(), self.workdir)
        try:
            self._warm_up()
        except BaseException:
            self.stop()  # never leave a daemon behind
            raise

    def _warm_up(self) -> None:
        # Warm up: the first connection to A creates io0's io_uring (fds that live as long as
        # the daemon); do it before any baseline is taken.
        # The same for lazily created helpers of the Python request path (thread pool, ...).
        with connect(self.a_sock) as fe:
            fe.setup(queue_size=64)
            for q in range(len(fe.queues)):
                assert fe.read(0, 4096, queue=q)[0] == S_OK
                assert fe.flush(queue=q) == S_OK
                assert fe.blk(T_GET_ID, 0, b"", 21, queue=q).status == S_OK
                data = self.read_image(SCRATCH, 1)
                assert fe.blk(T_OUT, SCRATCH, data, 1, queue=q, out_split=[8, 8]).status == S_OK
        self.b = connect(self.b_sock)
        self.b.setup(queue_size=64)
        self.check_b()

    def stop(self) -> None:
        if self.b is not None:
            self.b.close()
            self.b = None
        if self.daemon is not None:
            self.daemon.close()
            self.daemon = None

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.proc.poll() is None

    def death(self) -> str:
        """How the daemon ended, and the end of its log."""
        assert self.daemon is not None
        rc = self.daemon.proc.returncode
        how = (f"killed by {signal.Signals(-rc).name}" if rc is not None and rc < 0
               else f"exited with {rc}")
        return f"daemon {how}; log since the test began:\n{self.new_log()}"

    def new_log(self, limit: int = 4000) -> str:
        if self.daemon is None:
            return ""
        text = self.daemon.log()[self.log_mark:]
        return text if len(text) <= limit else "...\n" + text[-limit:]

    def begin(self) -> None:
        """Before a test: a live daemon (restarted if a previous test killed it), B attached,
        and a fd baseline."""
        if not self.alive() or self.tainted:
            if self.daemon is not None:
                self.restarts += 1
                self.stop()
            self.start()
            self.tainted = False
        if self.b is None:
            self.b = connect(self.b_sock)
            self.b.setup(queue_size=64)
        self.baseline = self.wait_fds_stable()
        assert self.daemon is not None
        self.log_mark = len(self.daemon.log())
        self.tainted = True  # until check_healthy() passes

    # -- observations -----------------------------------------------------------------------------
    def fd_table(self) -> dict[int, str]:
        out = {}
        d = f"/proc/{self.pid}/fd"
        for name in os.listdir(d):
            try:
                out[int(name)] = os.readlink(f"{d}/{name}")
            except FileNotFoundError:
                pass
        return out

    def wait_fds_stable(self, timeout: float = 5.0, quiet: float = 0.3) -> dict[int, str]:
        """The fd table once it has not changed for ``quiet`` seconds."""
        prev = self.fd_table()
        since = time.monotonic()
        deadline = since + timeout
        while time.monotonic() < deadline:
            time.sleep(0.05)
            cur = self.fd_table()
            if cur != prev:
                prev, since = cur, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return prev

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def read_image(self, sector: int, count: int = 1) -> bytes:
        with open(self.a_img, "rb") as f:
            f.seek(sector * SECTOR)
            return f.read(count * SECTOR)

    # -- checks -----------------------------------------------------------------------------------
    def assert_alive(self) -> None:
        if not self.alive():
            raise DaemonDied(self.death())

    def check_b(self) -> None:
        """The bystander export serves a valid read with the right data."""
        assert self.b is not None
        try:
            status, data = self.b.read(8, 2 * SECTOR, timeout=5)
        except Exception as e:
            self.assert_alive()
            raise AssertionError(f"export B stopped serving its frontend: {e!r}\n"
                                 f"{self.new_log()}") from e
        assert status == S_OK and data == pattern(8, 2), "export B returned wrong data"

    def check_a(self) -> None:
        """A new frontend on A is served: a verified write and read in the scratch area."""
        self._seq += 1
        data = pattern(SCRATCH, 4, seed=self._seq)
        try:
            with connect(self.a_sock) as fe:
                fe.setup(queue_size=32)
                assert fe.write(SCRATCH, data) == S_OK
                assert fe.read(SCRATCH, len(data)) == (S_OK, data)
                assert fe.read(SCRATCH, len(data), queue=1) == (S_OK, data)
        except Exception as e:
            self.assert_alive()
            raise AssertionError(f"export A does not serve a new frontend: {e!r}\n"
                                 f"{self.new_log()}") from e

    def check_fds(self, timeout: float = 5.0) -> None:
        """The daemon's fd table is back to the baseline (same numbers, same targets)."""
        deadline = time.monotonic() + timeout
        while True:
            cur = self.fd_table()
            if cur == self.baseline:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        extra = {k: v for k, v in cur.items() if self.baseline.get(k) != v}
        gone = {k: v for k, v in self.baseline.items() if cur.get(k) != v}
        raise AssertionError(
            f"daemon fds not back to baseline ({len(self.baseline)} -> {len(cur)}): "
            f"new/changed {extra}, missing/changed {gone}\n{self.new_log()}")

    def check_healthy(self) -> None:
        """After a case (every test frontend on A closed): alive, B and A serve, no fd leak."""
        self.assert_alive()
        self.check_b()
        self.check_fds()
        self.check_a()
        self.assert_alive()
        self.check_fds()
        self.tainted = False


class Verdict:
    """Collects a case's deviations, then runs the health check, and fails with all of them
    (so a report shows e.g. both "connection kept open" and "fd leaked")."""

    def __init__(self, env: Harness) -> None:
        self.env = env
        self.problems: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)

    def expect_closed(self, fe: VhostUserFrontend, what: str, timeout: float = 3.0) -> None:
        if not fe.peer_closed(timeout):
            self.problems.append(f"{what}: the daemon kept the connection open")

    def finish(self) -> None:
        try:
            self.env.check_healthy()
        except AssertionError as e:
            self.problems.append(f"health check: {e}")
        if self.problems:
            raise AssertionError("\n".join(self.problems))
