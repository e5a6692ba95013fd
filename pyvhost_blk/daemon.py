"""The daemon: builds iothreads, nodes and exports from the command line, runs the main loop.

Theory of operation
-------------------
Everything is created in the main thread before the main loop starts: ``--object iothread``
first (so exports can name them whatever the order), then ``--blockdev`` nodes, then
``--export``s, each with its listening socket.  The main loop (``qemu_get_aio_context()``)
dispatches vhost-user messages and serves queues that have no iothread.

SIGTERM/SIGINT/SIGHUP schedule a shutdown into the main loop: every export stops accepting,
lets its in-flight requests finish, disconnects, and removes its socket; then the iothreads stop,
the stats file and pidfile are dealt with, and the process exits 0.  SIGUSR1 writes the stats
file (when ``--stats-file`` was given).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
from typing import Any

from blocklayer.aio import qemu_get_aio_context
from blocklayer.bdrv import BlockDriverError, bdrv_find_node, bdrv_nodes
from blocklayer.blockdev import blockdev_add
from blocklayer.iothread import IOThread
from pyvhost_blk.cli import CommandLine, UsageError
from pyvhost_blk.keyval import (
    KeyvalError,
    ParsedOption,
    check_keys,
    require,
    to_bool,
    to_dict,
    to_int,
    to_str,
    to_str_list,
)
from vhost.server import SocketInUse, VuServer, listen_fd, listen_unix
from virtio.blk_export import VhostUserBlkExport

log = logging.getLogger("pyvhost_blk")

EXPORT_KEYS = (
    "type", "id", "node-name", "writable", "writethrough", "iothread", "fixed-iothread",
    "addr", "logical-block-size", "num-queues",
)
MAX_QUEUES = 64  # virtio-blk over vhost-user in QEMU allows up to VIRTIO_QUEUE_MAX/... keep sane


class Daemon:
    def __init__(self) -> None:
        self.main_ctx = qemu_get_aio_context()
        self.iothreads: dict[str, IOThread] = {}
        self.exports: dict[str, VhostUserBlkExport] = {}
        self.servers: list[VuServer] = []
        self.pidfile: str | None = None
        self.stats_file: str | None = None
        self.shutting_down = False
        self.done = False

    # -- construction (main thread, before the loop) -------------------------------------------
    def configure(self, cl: CommandLine) -> None:
        """Create everything the command line asks for.  Raises UsageError."""
        self.stats_file = cl.stats_file
        for opt, text, _parsed in cl.items:
            if opt in ("chardev", "monitor"):
                raise UsageError(
                    f"--{opt} {text}: the QMP monitor is not implemented yet in pyvhost-blk"
                )
        for text, parsed in cl.of("object"):
            self._wrap("object", text, self.object_add, parsed)
        for text, parsed in cl.of("blockdev"):
            self._wrap("blockdev", text, blockdev_add, parsed.values, parsed.from_json)
        for text, parsed in cl.of("export"):
            self._wrap("export", text, self.export_add, parsed)
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
        if qom_type != "iothread":
            raise KeyvalError(f"Invalid object type '{qom_type}' (pyvhost-blk has 'iothread')")
        check_keys(v, ("qom-type", "id", "poll-max-ns", "poll-grow", "poll-shrink",
                       "aio-max-batch", "thread-pool-min", "thread-pool-max"))
        oid = to_str(require(v, "id"), "id", from_json=j)
        if oid in self.iothreads:
            raise KeyvalError(
                f"attempt to add duplicate property '{oid}' to object (type 'container')"
            )
        poll = to_int(v["poll-max-ns"], "poll-max-ns", from_json=j) if "poll-max-ns" in v else 0
        t = IOThread(oid, poll)
        t.start()
        self.iothreads[oid] = t

    def export_add(self, p: ParsedOption) -> VhostUserBlkExport:
        v, j = p.values, p.from_json
        etype = to_str(require(v, "type"), "type", from_json=j)
        if etype != "vhost-user-blk":
            raise KeyvalError(f"Parameter 'type' does not accept value '{etype}'")
        check_keys(v, EXPORT_KEYS)
        eid = to_str(require(v, "id"), "id", from_json=j)
        if eid in self.exports:
            raise KeyvalError(f"Block export id '{eid}' is already in use")
        node_name = to_str(require(v, "node-name"), "node-name", from_json=j)
        bs = bdrv_find_node(node_name)
        if bs is None:
            raise KeyvalError(f"Cannot find device={node_name} nor node-name={node_name}")
        writable = to_bool(v.get("writable", False), "writable", from_json=j) \
            if "writable" in v else False
        writethrough = to_bool(v["writethrough"], "writethrough", from_json=j) \
            if "writethrough" in v else False
        nq = to_int(v["num-queues"], "num-queues", "uint16", from_json=j) \
            if "num-queues" in v else 1
        if nq == 0:
            raise KeyvalError("num-queues must be greater than 0")
        if nq > MAX_QUEUES:
            raise KeyvalError(f"num-queues must not exceed {MAX_QUEUES}")
        lbs = to_int(v["logical-block-size"], "logical-block-size", "uint64", from_json=j) \
            if "logical-block-size" in v else 512
        if lbs < 512 or lbs > 32768 or lbs & (lbs - 1):
            raise KeyvalError(
                f"Property {eid}.logical-block-size doesn't take value '{lbs}': it must be a "
                "power of 2 between 512 and 32768"
            )
        contexts = []
        if "iothread" in v:
            for name in to_str_list(v["iothread"], "iothread", from_json=j):
                t = self.iothreads.get(name)
                if t is None:
                    raise KeyvalError(f"iothread \"{name}\" not found")
                contexts.append(t.ctx)
        if writable and bs.read_only:
            raise KeyvalError(f"Block node '{node_name}' is read-only")
        addr = to_dict(require(v, "addr"), "addr")
        listener, path = self._listen(addr, j)
        exp = VhostUserBlkExport(eid, bs, writable, nq, lbs, contexts, writethrough)
        server = VuServer(eid, exp, listener, path)
        exp.attach_server(server)
        self.exports[eid] = exp
        self.servers.append(server)
        return exp

    @staticmethod
    def _listen(addr: dict[str, Any], j: bool) -> tuple[socket.socket, str | None]:
        atype = to_str(require(addr, "type", "addr"), "addr.type", from_json=j)
        if atype == "unix":
            check_keys(addr, ("type", "path", "abstract", "tight"), "addr")
            path = to_str(require(addr, "path", "addr"), "addr.path", from_json=j)
            return listen_unix(path), path
        if atype == "fd":
            check_keys(addr, ("type", "str"), "addr")
            s = to_str(require(addr, "str", "addr"), "addr.str", from_json=j)
            if not s.isdigit():
                raise KeyvalError(f"addr.str '{s}' is not a file descriptor number "
                                  "(named fds need the QMP monitor)")
            return listen_fd(int(s)), None
        raise KeyvalError(f"Parameter 'addr.type' does not accept value '{atype}'")

    def _write_pidfile(self, path: str) -> None:
        try:
            with open(path, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as e:
            raise UsageError(f"Cannot open pid file {path}: {e.strerror}") from None
        self.pidfile = path

    def abort(self) -> None:
        """Startup failed: undo what configure() created (sockets, threads, pidfile)."""
        for s in self.servers:
            self.main_ctx.set_fd_handler(s.listener.fileno(), None)
            s.listener.close()
            if s.path:
                try:
                    os.unlink(s.path)
                except OSError:
                    pass
        for t in self.iothreads.values():
            t.stop()
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
        self.main_ctx.run(should_stop=lambda: self.done)
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.main_ctx.schedule_from_signal_handler(self.shutdown, signal.Signals(signum).name)

    def shutdown(self, why: str = "quit") -> None:
        """Main thread: finish in-flight requests, close every export, then stop."""
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("%s: shutting down", why)
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
        for t in self.iothreads.values():
            t.stop()
        for exp in self.exports.values():
            exp.delete()
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
            s = exp.stats()
            exports[eid] = s
            for q in s.get("queues", []):
                if q["iothread"] in iothreads:
                    iothreads[q["iothread"]] += q["requests"]
        return {
            "pid": os.getpid(),
            "exports": exports,
            "iothreads": {k: {"requests": n} for k, n in iothreads.items()},
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
