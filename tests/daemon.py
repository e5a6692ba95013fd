"""Run pyvhost-blk (or qemu-storage-daemon) as a real process for integration and e2e tests.

``DaemonProcess(args)`` starts the daemon with the given arguments plus a stats file, waits for
every ``addr.path`` socket to appear, and offers ``stats()`` (SIGUSR1 → fresh JSON counters),
``terminate()`` (SIGTERM → exit status) and the log.  A missing executable fails loudly with how
to install it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = "run 'scripts/setup.sh' from the repository (it makes .venv), then use .venv/bin"


def pyvhost_blk_cmd() -> list[str]:
    exe = shutil.which("pyvhost-blk")
    if exe is None:
        raise RuntimeError(f"pyvhost-blk is not installed: {INSTALL_HINT}")
    return [exe]


def qsd_cmd() -> list[str]:
    exe = shutil.which("qemu-storage-daemon")
    if exe is None:
        raise RuntimeError(f"qemu-storage-daemon not found: {INSTALL_HINT}")
    return [exe]


def socket_paths(args: list[str]) -> list[str]:
    return re.findall(r"addr\.path=([^,]+)", " ".join(args))


class DaemonProcess:
    def __init__(self, args: list[str], workdir: Path, cmd: list[str] | None = None,
                 wait_sockets: bool = True, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.workdir = workdir
        self.stats_file = workdir / f"stats-{time.monotonic_ns()}.json"
        self.log_path = workdir / f"daemon-{time.monotonic_ns()}.log"
        self.is_ours = cmd is None
        full = (cmd or pyvhost_blk_cmd()) + args
        if self.is_ours:
            full += ["--stats-file", str(self.stats_file)]
        self.sockets = socket_paths(args)
        # A stale socket file may already exist: wait for the daemon's own (a new inode).
        self._stale = {p: _identity(p) for p in self.sockets if os.path.exists(p)}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            full, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, pass_fds=pass_fds,
        )
        if wait_sockets:
            try:
                self.wait_for_sockets()
            except BaseException:
                self.close()  # a daemon that never listened is not left running
                raise

    def wait_for_sockets(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not all(self._is_new(p) for p in self.sockets):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon sockets did not appear:\n{self.log()}")
            time.sleep(0.05)

    def _is_new(self, path: str) -> bool:
        try:
            return _identity(path) != self._stale.get(path)
        except FileNotFoundError:
            return False

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stats(self, timeout: float = 10) -> dict[str, Any]:
        """Ask for fresh counters (SIGUSR1) and return them."""
        before = self.stats_file.stat().st_mtime_ns if self.stats_file.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats_file.exists() and self.stats_file.stat().st_mtime_ns != before:
                return json.loads(self.stats_file.read_text())
            time.sleep(0.02)
        raise RuntimeError(f"no stats written:\n{self.log()}")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"daemon ignored SIGTERM for {timeout}s:\n{self.log()}") from None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def blkio_client() -> Path:
    """The compiled libblkio client (built on first use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.build_client import build_client

    return build_client()


def run_client(sock: str, *args: str, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    """Run the libblkio client; returns (exit status, its JSON, stderr)."""
    proc = subprocess.run(
        [str(blkio_client()), "--socket", sock, *args],
        capture_output=True, text=True, timeout=timeout,
    )
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        out = {"raw": proc.stdout}
    return proc.returncode, out, proc.stderr


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_ctime_ns
