"""Small helpers for e2e tests that drive pyvhost-blk over its QMP monitor.

``MonitoredDaemon(args, workdir)`` starts the real daemon (``tests.daemon.DaemonProcess``) with a
QMP monitor on a unix socket and connects a ``Qmp`` client to it (the qemu.qmp library's
synchronous ``QEMUMonitorProtocol``).  ``Qmp.cmd(name, **args)`` returns the command's result or
raises ``QmpCommandError``; ``Qmp.error(name, **args)`` expects a failure and returns its
``desc``; ``Qmp.wait_event(name, timeout, match=...)`` waits for an event (events that arrive
while waiting for other things are kept, so an event is never lost because a test looked for
it late).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.daemon import DaemonProcess

try:
    from qemu.qmp.legacy import QEMUMonitorProtocol
except ImportError:  # pragma: no cover - reported as a test failure by require_qmp_lib()
    QEMUMonitorProtocol = None  # type: ignore[assignment,misc]

INSTALL_HINT = "run scripts/setup.sh (as root: apt packages, then the project's .venv)"


class QmpCommandError(RuntimeError):
    """A QMP command answered with an error."""

    def __init__(self, name: str, args: dict[str, Any], error: dict[str, Any]) -> None:
        self.name, self.args, self.error = name, args, error
        self.cls = error.get("class", "")
        self.desc = error.get("desc", "")
        super().__init__(f"QMP {name} {args} failed: {self.cls}: {self.desc}")


def require_qmp_lib() -> None:
    if QEMUMonitorProtocol is None:
        raise RuntimeError(f"the qemu.qmp Python library is missing; {INSTALL_HINT}")


class Qmp:
    """A synchronous QMP client with an event backlog."""

    def __init__(self, path: str | Path, connect_timeout: float = 20.0) -> None:
        require_qmp_lib()
        self.path = str(path)
        self.events: list[dict[str, Any]] = []
        deadline = time.monotonic() + connect_timeout
        while True:
            mon = QEMUMonitorProtocol(self.path)
            try:
                mon.connect()
                break
            except Exception:  # noqa: BLE001 - the socket may not be listening yet
                with contextlib.suppress(Exception):
                    mon.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.mon = mon

    def _collect(self) -> None:
        self.events.extend(self.mon.get_events(wait=False))

    def cmd_raw(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self.mon.cmd_raw(name, args or {})
        self._collect()
        return reply

    def cmd(self, name: str, **args: Any) -> Any:
        """Run a command (keyword arguments with ``_`` for ``-``); its result or raise."""
        qargs = {k.replace("_", "-"): v for k, v in args.items()}
        reply = self.cmd_raw(name, qargs)
        if "error" in reply:
            raise QmpCommandError(name, qargs, reply["error"])
        return reply.get("return")

    def cmd_args(self, name: str, args: dict[str, Any]) -> Any:
        """Like cmd() with the arguments as a dict (for names that are not identifiers)."""
        reply = self.cmd_raw(name, args)
        if "error" in reply:
            raise QmpCommandError(name, args, reply["error"])
        return reply.get("return")

    def error(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run a command that must fail; returns its error object (class, desc)."""
        reply = self.cmd_raw(name, args)
        assert "error" in reply, f"QMP {name} {args} should have failed but returned {reply}"
        return reply["error"]

    def wait_event(
        self,
        name: str,
        timeout: float = 10.0,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The first (oldest) backlog or new event called ``name`` for which ``match(data)``
        holds; it is removed from the backlog.  Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            self._collect()
            for i, ev in enumerate(self.events):
                if ev.get("event") == name and (match is None or match(ev.get("data", {}))):
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [e.get("event") for e in self.events]
                raise TimeoutError(f"no {name} event within {timeout} s (backlog: {seen})")
            try:
                ev = self.mon.pull_event(wait=float(min(remaining, 0.5)))
            except TimeoutError:  # asyncio.TimeoutError is TimeoutError since 3.11
                continue
            if ev is not None:
                self.events.append(ev)

    def drop_events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Remove (and return) the backlog's events called ``name`` (all if None)."""
        self._collect()
        gone = [e for e in self.events if name is None or e.get("event") == name]
        self.events = [e for e in self.events if not (name is None or e.get("event") == name)]
        return gone

    def export(self, export_id: str) -> dict[str, Any]:
        """The export's entry of query-block-exports."""
        for e in self.cmd("query-block-exports"):
            if e["id"] == export_id:
                return e
        raise KeyError(f"export {export_id!r} not in query-block-exports")

    def blockstats(self, export_id: str) -> dict[str, Any]:
        """query-blockstats' counters of the export's BlockBackend."""
        for e in self.cmd("query-blockstats"):
            if e["device"] == export_id:
                return e["stats"]
        raise KeyError(f"export {export_id!r} not in query-blockstats")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.mon.close()


class MonitoredDaemon:
    """pyvhost-blk with a QMP monitor; a context manager that always kills the daemon."""

    def __init__(self, args: list[str], workdir: Path) -> None:
        self.qmp_path = workdir / f"qmp-{time.monotonic_ns()}.sock"
        # The monitor goes first: DaemonProcess finds the sockets to wait for with a regex
        # that would swallow the options following the last addr.path.
        full = [
            "--chardev", f"socket,id=m0,path={self.qmp_path},server=on,wait=off",
            "--monitor", "chardev=m0",
        ] + list(args)
        self.proc = DaemonProcess(full, workdir, wait_sockets=False)
        try:
            self.proc.wait_for_sockets()
            self.qmp = Qmp(self.qmp_path)
        except BaseException:
            self.proc.close()
            raise

    def log(self) -> str:
        return self.proc.log()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stats(self) -> dict[str, Any]:
        return self.qmp.cmd("x-pyvhost-stats")

    def iothread_cpu(self, iothread_id: str) -> float:
        """CPU seconds used so far by an iothread's OS thread (query-iothreads' thread-id)."""
        tid = next(t["thread-id"] for t in self.qmp.cmd("query-iothreads")
                   if t["id"] == iothread_id)
        stat = Path(f"/proc/{self.proc.proc.pid}/task/{tid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def queue_requests(self, export_id: str) -> list[int]:
        return [q["requests"] for q in self.stats()["exports"][export_id]["queues"]]

    def close(self) -> None:
        self.qmp.close()
        self.proc.close()

    def __enter__(self) -> MonitoredDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def vhost_export(export_id: str, node: str, sock: Path | str, **opts: Any) -> str:
    """A ``--export`` value for a vhost-user-blk export; ``opts`` with ``_`` for ``-`` and
    ``__`` for ``.`` (``iothread__0='io0'``); True/False become on/off."""
    parts = [f"type=vhost-user-blk,id={export_id},node-name={node},addr.type=unix,"
             f"addr.path={sock}"]
    for k, v in opts.items():
        key = k.replace("__", ".").replace("_", "-")
        if isinstance(v, bool):
            v = "on" if v else "off"
        parts.append(f"{key}={v}")
    return ",".join(parts)
