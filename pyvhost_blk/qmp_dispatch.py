"""The QMP dispatcher: command registry, the request queue, built-in commands and events.

Theory of operation
-------------------
One :class:`QmpDispatcher` serves every monitor of the daemon (``pyvhost_blk/qmp_monitor.py``),
as QEMU's QMP dispatcher serves all its monitors.

* Each connection hands its complete messages (or JSON parse errors) to :meth:`_enqueue`; they
  go into a **single FIFO** which a bottom half drains **one command at a time across all
  monitors**, like QEMU's QMP dispatcher BH.  A request is checked as QEMU checks it (members,
  ``qmp_capabilities`` negotiation, ``exec-oob``), then its handler runs.
* A sync handler answers at once; an async handler (``is_async=True``) keeps the queue stopped
  until it calls ``complete(...)``, so responses always come back in request order and no
  handler is ever re-entered.  A handler's exception becomes a ``GenericError`` response.
* Built in: ``qmp_capabilities``, ``query-version``, ``query-commands`` and, when ``on_quit`` is
  given, ``quit``.  The greeting and ``query-version`` claim QEMU 7.2.0 (:data:`QMP_VERSION`:
  clients such as ``qemu.qmp`` and QEMU's iotests look at it); ``package`` names pyvhost-blk.
* :meth:`QmpDispatcher.emit` stamps an event (``{"timestamp": ..., "event": ..., "data": ...}``,
  QEMU's member order) and broadcasts it to the clients that have completed
  ``qmp_capabilities`` at that time.

Threads: everything runs in **one** AioContext, the dispatcher's ``ctx`` (by default the main
loop, ``qemu_get_aio_context()``; tests pass a private one), and nothing ever blocks.
:meth:`QmpDispatcher.emit` is the only entry point for other threads: it takes the timestamp
and schedules the broadcast into ``ctx``.  An async handler's ``complete`` may be called from
another thread too; the response is scheduled into ``ctx``.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blocklayer.aio import AioContext, qemu_get_aio_context
from pyvhost_blk import __version__
from pyvhost_blk.qmp_args import QmpError, args_check

if TYPE_CHECKING:
    from pyvhost_blk.qmp_monitor import Monitor, _Client

log = logging.getLogger("pyvhost_blk.qmp")  # one logger for the whole monitor, as before the split

QMP_VERSION = (7, 2, 0)  # what the greeting and query-version claim (major, minor, micro)

NO_ID: Any = object()  # the "id" of a request that has none (a request may send "id": null)

SyncHandler = Callable[[dict[str, Any]], Any]
AsyncHandler = Callable[[dict[str, Any], Callable[[Any], None]], None]


@dataclass
class _Command:
    name: str
    fn: Callable[..., Any]
    is_async: bool


class QmpDispatcher:
    """The command registry shared by all monitors, and the event broadcaster.

    ``on_quit`` registers ``quit``: it answers ``{}``, then ``on_quit()`` runs (in ``ctx``).
    ``ctx`` defaults to the main loop; every method except :meth:`emit` must be called in it
    (or before its loop runs).
    """

    def __init__(
        self,
        on_quit: Callable[[], None] | None = None,
        *,
        ctx: AioContext | None = None,
        package: str | None = None,
    ) -> None:
        self.ctx = ctx if ctx is not None else qemu_get_aio_context()
        self.package = package if package is not None else f"pyvhost-blk {__version__}"
        self._commands: dict[str, _Command] = {}
        self._monitors: list[Monitor] = []
        self._queue: collections.deque[tuple[_Client, Any, str | None]] = collections.deque()
        self._busy = False  # an async command is in flight
        self._scheduled = False
        self._on_quit = on_quit
        self.register("query-version", self._query_version)
        self.register("query-commands", self._query_commands)
        if on_quit is not None:
            self.register("quit", self._quit, is_async=True)

    # -- registry ------------------------------------------------------------------------------
    def register(self, name: str, fn: Callable[..., Any], *, is_async: bool = False) -> None:
        """Register a command.  Sync: ``fn(args) -> result`` (``None`` means ``{}``), raising
        :class:`QmpError`.  Async: ``fn(args, complete)``; call ``complete(result)`` or
        ``complete(QmpError(...))`` exactly once, later, in ``ctx``'s thread (other threads
        are tolerated: the response is scheduled into ``ctx``)."""
        if name == "qmp_capabilities" or name in self._commands:
            raise ValueError(f"QMP command {name!r} is already registered")
        self._commands[name] = _Command(name, fn, is_async)

    def unregister(self, name: str) -> None:
        self._commands.pop(name, None)

    def command_names(self) -> list[str]:
        """Every command, ``qmp_capabilities`` included, in registration order."""
        return ["qmp_capabilities", *self._commands]

    def version(self) -> dict[str, Any]:
        major, minor, micro = QMP_VERSION
        return {
            "qemu": {"micro": micro, "minor": minor, "major": major},
            "package": self.package,
        }

    def greeting(self) -> dict[str, Any]:
        return {"QMP": {"version": self.version(), "capabilities": ["oob"]}}

    # -- events (any thread) -------------------------------------------------------------------
    def emit(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Send event ``name`` to every negotiated client of every monitor.  Any thread.

        The timestamp is taken now; ``data=None`` leaves the ``data`` member out."""
        now = time.time()
        sec = int(now)
        ev: dict[str, Any] = {
            "timestamp": {"seconds": sec, "microseconds": int((now - sec) * 1e6)},
            "event": name,
        }
        if data is not None:
            ev["data"] = dict(data)
        self.ctx.schedule(self._broadcast, ev)

    def _broadcast(self, ev: dict[str, Any]) -> None:
        for mon in list(self._monitors):
            c = mon.client
            if c is not None and c.negotiated:
                c.send_obj(ev)

    # -- monitors ------------------------------------------------------------------------------
    def _attach(self, mon: Monitor) -> None:
        self._monitors.append(mon)

    def _detach(self, mon: Monitor) -> None:
        if mon in self._monitors:
            self._monitors.remove(mon)

    @property
    def monitors(self) -> list[Monitor]:
        return list(self._monitors)

    # -- the request queue ---------------------------------------------------------------------
    def _enqueue(self, client: _Client, obj: Any, err: str | None) -> None:
        self._queue.append((client, obj, err))
        client.pending += 1
        self._kick()

    def _kick(self) -> None:
        if not self._scheduled and not self._busy and self._queue:
            self._scheduled = True
            self.ctx.schedule(self._run_queue)

    def _run_queue(self) -> None:
        self._scheduled = False
        while self._queue and not self._busy:
            client, obj, err = self._queue.popleft()
            client.pending -= 1
            client.maybe_resume()
            if client.closed:
                continue  # QEMU drops the requests of a client that went away
            try:
                self._process(client, obj, err)
            except Exception:  # a bug here must not stop the queue forever
                log.exception("internal error processing a QMP request")
                self._busy = False

    def _process(self, client: _Client, req: Any, err: str | None) -> None:
        if err is not None:
            client.respond(QmpError(err), NO_ID)
            return
        if not isinstance(req, dict):
            client.respond(QmpError("QMP input must be a JSON object"), NO_ID)
            return
        rid = req.get("id", NO_ID)
        try:
            name, oob, args = self._check_request(client, req)
            cmd = self._lookup(client, name)
            if oob:
                raise QmpError(f"The command {name} does not support OOB")
        except QmpError as e:
            client.respond(e, rid)
            return
        if cmd is None:  # qmp_capabilities
            try:
                self._qmp_capabilities(client, args)
            except QmpError as e:
                client.respond(e, rid)
            else:
                client.respond({}, rid)
            return
        if not cmd.is_async:
            client.respond(self._call_sync(cmd, args), rid)
            return
        self._call_async(client, cmd, args, rid)

    @staticmethod
    def _check_request(client: _Client, req: dict[str, Any]) -> tuple[str, bool, dict]:
        """QEMU's checks of the request object; returns (command, is exec-oob, arguments)."""
        for key, v in req.items():
            if key in ("execute", "exec-oob"):
                if key == "exec-oob" and not client.oob:
                    raise QmpError(f"QMP input member '{key}' is unexpected")
                if not isinstance(v, str):
                    raise QmpError(f"QMP input member '{key}' must be a string")
            elif key == "arguments":
                if not isinstance(v, dict):
                    raise QmpError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if "execute" in req and "exec-oob" in req:
            raise QmpError("QMP input member 'execute' clashes with 'exec-oob'")
        if "execute" not in req and "exec-oob" not in req:
            raise QmpError("QMP input lacks member 'execute'")
        oob = "exec-oob" in req
        name = req["exec-oob"] if oob else req["execute"]
        return name, oob, req.get("arguments", {})

    def _lookup(self, client: _Client, name: str) -> _Command | None:
        """The command, or None for qmp_capabilities; QEMU's CommandNotFound errors."""
        if not client.negotiated:
            if name == "qmp_capabilities":
                return None
            raise QmpError(
                "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        if name == "qmp_capabilities":
            return None
        cmd = self._commands.get(name)
        if cmd is None:
            raise QmpError("CommandNotFound", f"The command {name} has not been found")
        return cmd

    def _call_sync(self, cmd: _Command, args: dict[str, Any]) -> Any:
        try:
            return cmd.fn(args)
        except QmpError as e:
            return e
        except Exception as e:
            log.exception("QMP command %s failed", cmd.name)
            return QmpError(str(e) or type(e).__name__)

    def _call_async(
        self, client: _Client, cmd: _Command, args: dict[str, Any], rid: Any
    ) -> None:
        self._busy = True
        done = [False]

        def finish(result: Any) -> None:
            self._busy = False
            client.respond(result, rid)
            self._kick()

        def complete(result: Any = None) -> None:
            if done[0]:
                log.error("QMP command %s completed twice (ignored)", cmd.name)
                return
            done[0] = True
            self.ctx.schedule(finish, result)

        try:
            cmd.fn(args, complete)
        except QmpError as e:
            complete(e)
        except Exception as e:
            log.exception("QMP command %s failed", cmd.name)
            if not done[0]:
                complete(QmpError(str(e) or type(e).__name__))

    # -- built-in commands ---------------------------------------------------------------------
    @staticmethod
    def _qmp_capabilities(client: _Client, args: dict[str, Any]) -> None:
        args_check(args, optional=("enable",))
        enable = args.get("enable", [])
        if not isinstance(enable, list):
            raise QmpError("Invalid parameter type for 'enable', expected: array")
        for i, cap in enumerate(enable):
            if not isinstance(cap, str):
                raise QmpError(f"Invalid parameter type for 'enable[{i}]', expected: string")
            if cap != "oob":
                raise QmpError(f"Parameter 'null' does not accept value '{cap}'")  # sic, QEMU
        if client.negotiated:  # QEMU checks the arguments first
            raise QmpError(
                "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
            )
        client.oob = "oob" in enable
        client.negotiated = True

    def _query_version(self, args: dict[str, Any]) -> dict[str, Any]:
        args_check(args)
        return self.version()

    def _query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        args_check(args)
        return [{"name": n} for n in self.command_names()]

    def _quit(self, args: dict[str, Any], complete: Callable[[Any], None]) -> None:
        args_check(args)
        complete(None)
        assert self._on_quit is not None
        self.ctx.schedule(self._on_quit)  # runs after the response has been queued
