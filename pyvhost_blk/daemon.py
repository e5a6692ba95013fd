"""The daemon: builds iothreads, nodes and exports from the command line, runs the main loop.

Theory of operation
-------------------
Everything is created in the main thread before the main loop starts: ``--object iothread``
first (so exports can name them whatever the order), then ``--blockdev`` nodes, then
``--export``s, each with its listening socket.  The main loop (``qemu_get_aio_context()``)
dispatches vhost-user messages and serves queues that have no iothread.  Just before it runs,
systemd (``NOTIFY_SOCKET``) hears ``READY=1``; shutdown begins with ``STOPPING=1`` (systemd.py).

SIGTERM/SIGINT/SIGHUP schedule a shutdown into the main loop: every export stops accepting,
lets its in-flight requests finish, disconnects, and removes its socket; then the iothreads stop,
the stats file and pidfile are dealt with, and the process exits 0.  SIGUSR1 writes the stats
file (when ``--stats-file`` was given).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
from typing import TYPE_CHECKING, Any

from blocklayer.aio import DEFAULT_POLL_MAX_NS, qemu_get_aio_context
from blocklayer.bdrv import BlockDriverError, bdrv_nodes, close_all_nodes
from blocklayer.blockdev import blockdev_add
from blocklayer.events import set_event_emitter
from blocklayer.iothread import IOThread
from blocklayer.throttle_group import throttle_group_find, throttle_group_object_add
from pyvhost_blk import systemd
from pyvhost_blk.chardev import MonitorOptionError, create_monitors
from pyvhost_blk.cli import CommandLine, UsageError
from pyvhost_blk.exports import export_add
from pyvhost_blk.keyval import (
    KeyvalError,
    ParsedOption,
    check_keys,
    require,
    to_int,
    to_str,
)
from pyvhost_blk.qmp import Monitor, QmpDispatcher
from pyvhost_blk.qmp_commands import BlockCommands
from vhost.server import SocketInUse, VuServer
from virtio.blk_export import VhostUserBlkExport

if TYPE_CHECKING:
    from pyvhost_blk.metrics import PrometheusExporter

log = logging.getLogger("pyvhost_blk")



class Daemon:
    def __init__(self) -> None:
        try:  # LISTEN_FDS first, before fds of our own can sit where passed ones should be
            systemd.activation()
        except systemd.ActivationError as e:
            raise UsageError(f"socket activation: {e}") from None
        self.main_ctx = qemu_get_aio_context()
        self.iothreads: dict[str, IOThread] = {}
        self.main_loop_id: str | None = None
        self.exports: dict[str, VhostUserBlkExport] = {}
        self.pidfile: str | None = None
        self.stats_file: str | None = None
        self.shutting_down = False
        self.done = False
        self.qmp = QmpDispatcher(on_quit=lambda: self.shutdown("quit"))
        self.monitors: list[Monitor] = []
        self.metrics: dict[str, PrometheusExporter] = {}  # x-prometheus objects, by id
        set_event_emitter(self.qmp.emit)
        BlockCommands(self, self.qmp)

    # -- construction (main thread, before the loop) -------------------------------------------
    def configure(self, cl: CommandLine) -> None:
        """Create everything the command line asks for.  Raises UsageError."""
        self.stats_file = cl.stats_file
        for text, parsed in cl.of("object"):
            self._wrap("object", text, self.object_add, parsed)
        for text, parsed in cl.of("blockdev"):
            self._wrap("blockdev", text, blockdev_add, parsed.values, parsed.from_json)
        for text, parsed in cl.of("export"):
            self._wrap("export", text, self.export_add, parsed)
        if cl.of("monitor") or cl.of("chardev"):
            try:
                self.monitors = create_monitors(cl.of("chardev"), cl.of("monitor"), self.qmp)
            except MonitorOptionError as e:
                raise UsageError(f"--{e.option} {e.text}: {e}") from None
            except OSError as e:
                raise UsageError(f"--chardev: {e.strerror or e}") from None
        if cl.pidfile:
            self._write_pidfile(cl.pidfile)

    @staticmethod
    def _wrap(opt: str, text: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (KeyvalError, BlockDriverError, SocketInUse, PermissionError, OSError) as e:
            msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            if isinstance(e, OSError) and e.filename:
                msg = f"{e.filename}: {msg}"
            raise UsageError(f"--{opt} {text}: {msg}") from None

    def object_add(self, p: ParsedOption) -> None:
        v, j = p.values, p.from_json
        qom_type = to_str(require(v, "qom-type"), "qom-type", from_json=j)
        if qom_type == "main-loop":
            self.main_loop_add(p)
            return
        if qom_type == "x-prometheus":
            from pyvhost_blk.metrics import prometheus_object_add  # prometheus_client if asked

            m = prometheus_object_add(p, self)
            self.metrics[m.id] = m
            return
        if qom_type == "throttle-group":
            throttle_group_object_add(v, j, taken=(*self.iothreads, *self.metrics))
            return
        if qom_type != "iothread":
            raise KeyvalError(f"Invalid object type '{qom_type}' (pyvhost-blk has 'iothread', "
                              "'main-loop', 'throttle-group' and 'x-prometheus')")
        check_keys(v, ("qom-type", "id", "poll-max-ns", "poll-grow", "poll-shrink",
                       "aio-max-batch", "thread-pool-min", "thread-pool-max"))
        oid = to_str(require(v, "id"), "id", from_json=j)
        if oid in self.iothreads or oid in self.metrics or throttle_group_find(oid) is not None:
            raise KeyvalError(
                f"attempt to add duplicate property '{oid}' to object (type 'container')"
            )
        poll = (to_int(v["poll-max-ns"], "poll-max-ns", from_json=j) if "poll-max-ns" in v
                else DEFAULT_POLL_MAX_NS)
        t = IOThread(oid, poll)
        t.start()
        self.iothreads[oid] = t

    def main_loop_add(self, p: ParsedOption) -> None:
        """``--object main-loop,id=ID[,poll-max-ns=N]``: the main loop's settings.  qsd takes
        the object (aio-max-batch, thread-pool-*, accepted and ignored here); ``poll-max-ns``
        is ours: QEMU's main loop never polls, ours polls adaptively like an iothread (32 µs
        at most by default) and 0 turns that off.  Main thread, before the loop runs."""
        v, j = p.values, p.from_json
        check_keys(v, ("qom-type", "id", "poll-max-ns", "aio-max-batch", "thread-pool-min",
                       "thread-pool-max"))
        oid = to_str(require(v, "id"), "id", from_json=j)
        if self.main_loop_id is not None:
            raise KeyvalError("only one main-loop instance allowed")
        if "poll-max-ns" in v:
            ns = to_int(v["poll-max-ns"], "poll-max-ns", from_json=j)
            if ns < 0:
                raise KeyvalError("poll-max-ns must be at least 0")
            qemu_get_aio_context().set_poll_max_ns(ns)
        self.main_loop_id = oid

    def export_add(self, p: ParsedOption) -> VhostUserBlkExport:
        return self.add_export(p.values, p.from_json)

    def add_export(self, values: dict[str, Any], from_json: bool) -> VhostUserBlkExport:
        """Create an export and register it: the one place exports are added (``--export``
        and QMP ``block-export-add``).  Main thread.  Raises what ``export_add`` raises."""
        exp = export_add(values, from_json, self.iothreads, self.exports)
        self.exports[exp.id] = exp
        return exp

    def remove_export(self, eid: str) -> None:
        """Forget a deleted export (QMP ``block-export-del``, once it drained)."""
        self.exports.pop(eid, None)

    @property
    def servers(self) -> list[VuServer]:
        return [e.server for e in self.exports.values() if e.server is not None]

    def _write_pidfile(self, path: str) -> None:
        """Written under a temporary name and renamed: a reader never sees it empty."""
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.rename(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise UsageError(f"Cannot open pid file {path}: {e.strerror}") from None
        self.pidfile = path

    def abort(self) -> None:
        """Startup failed: undo what configure() created (sockets, threads, pidfile)."""
        for s in self.servers:
            s.stop_listening()
        for t in self.iothreads.values():
            t.stop()
        for m in self.monitors:
            m.close()
        for x in self.metrics.values():
            x.close()
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass

    # -- running ------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until a shutdown signal; returns the exit status.  Main thread."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(
            signal.SIGUSR1,
            lambda *_: self.main_ctx.schedule_from_signal_handler(self.write_stats),
        )
        self._wake_on_signals()
        self._notify_ready()
        self.main_ctx.run(should_stop=lambda: self.done)
        return 0

    def _wake_on_signals(self) -> None:
        """A signal can arrive while the main thread runs C handlers inside the poller (GIL
        released, not in a system call): Python only notes it, and the poller would go back
        to sleep without running the handler (a SIGUSR1 right after a busy period went
        unanswered).  Python's wakeup fd, watched by the main loop, makes the poller return
        to Python for it.  Main thread."""
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._signal_wakeup = (r, w)  # kept open for the life of the process

        def drain() -> None:
            try:
                while r.recv(512):
                    pass
            except BlockingIOError:
                pass

        signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        self.main_ctx.set_fd_handler(r.fileno(), drain)

    def _notify_ready(self) -> None:
        """Every export listens and the loop is about to run: tell systemd (``Type=notify``)
        with READY=1, and warn about activation sockets no export serves.  Main thread."""
        for warning in systemd.leftovers():
            log.warning("%s", warning)
        where = [s.path or f"fd {s.listener.fileno()}" for s in self.servers]
        systemd.notify(
            "READY=1",
            f"STATUS=serving {len(where)} export{'' if len(where) == 1 else 's'}"
            + (f" on {', '.join(where)}" if where else ""),
            f"MAINPID={os.getpid()}",
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.main_ctx.schedule_from_signal_handler(self.shutdown, signal.Signals(signum).name)

    def shutdown(self, why: str = "quit") -> None:
        """Main thread: finish in-flight requests, close every export, then stop."""
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("%s: shutting down", why, extra={"event": "shutdown", "reason": why})
        systemd.notify("STOPPING=1", f"STATUS=shutting down ({why})")
        remaining = [len(self.servers)]

        def one_done() -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                self._finish()

        if not self.servers:
            self._finish()
        for s in self.servers:
            s.shutdown(one_done)

    def _finish(self) -> None:
        self.write_stats()
        for m in self.monitors:
            m.close()
        for x in self.metrics.values():
            x.close()
        for t in self.iothreads.values():
            t.stop()
        for exp in self.exports.values():
            exp.delete()
        close_all_nodes()
        if self.pidfile:
            try:
                os.unlink(self.pidfile)
            except OSError:
                pass
        self.done = True

    def stats(self) -> dict[str, Any]:
        iothreads: dict[str, int] = {t: 0 for t in self.iothreads}
        exports = {}
        for eid, exp in self.exports.items():
            exports[eid] = exp.stats()
            if exp.server is not None:
                for name, n in exp.server.iothread_requests().items():
                    if name in iothreads:
                        iothreads[name] += n
        return {
            "pid": os.getpid(),
            "exports": exports,
            "iothreads": {k: {"requests": n, **self.iothreads[k].ctx.poll_stats}
                          for k, n in iothreads.items()},
            "main-loop": qemu_get_aio_context().poll_stats,
            "nodes": [bs.to_dict() for bs in bdrv_nodes()],
        }

    def write_stats(self) -> None:
        """Write the stats JSON atomically (main thread)."""
        if not self.stats_file:
            return
        tmp = self.stats_file + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.stats(), f, indent=1)
            os.replace(tmp, self.stats_file)
        except OSError as e:
            log.error("cannot write stats file %s: %s", self.stats_file, e)
