"""The QMP monitor: QEMU Machine Protocol server, command registry and events.

Theory of operation
-------------------
Everything here runs in **one** AioContext, the dispatcher's ``ctx`` (by default the main loop,
``qemu_get_aio_context()``; tests pass a private one).  Sockets are watched with
``set_fd_handler``; nothing ever blocks:

* A :class:`Monitor` owns one listening socket (made by ``pyvhost_blk/chardev.py``) and serves
  **one client at a time**, like QEMU's socket chardev: while a client is connected the listener
  is not watched, so a second client's ``connect()`` succeeds (kernel backlog) but it gets its
  greeting only when the first one has gone.
* Input bytes go through :class:`JsonStreamer`, which reproduces QEMU's JSON lexer/streamer
  (byte-incremental, so fragmented input and several messages per read both work, and so
  that malformed input gets QEMU's exact ``JSON parse error, ...`` texts).  The grammar part is
  the QEMU-compatible parser of ``pyvhost_blk/keyval.py``.
* Every complete message (or parse error) is appended to the dispatcher's single FIFO, which a
  bottom half drains **one command at a time across all monitors**, like QEMU's QMP dispatcher
  BH.  A sync handler answers at once; an async handler (``is_async=True``) keeps the queue
  stopped until it calls ``complete(...)``, so responses always come back in request order and
  no handler is ever re-entered.  A client with ``QUEUE_MAX`` queued requests is not read from
  until the queue drains (QEMU also bounds its per-monitor request queue).
* Output is buffered per client.  A socket that is not writable is waited for through a private
  one-fd epoll registered in the context (``set_fd_handler`` only watches readability; an epoll
  fd is readable when its socket is writable).  A client that leaves more than ``OUTBUF_MAX``
  bytes unread is disconnected.
* :meth:`QmpDispatcher.emit` is the only entry point for other threads: it stamps the event and
  schedules its broadcast into ``ctx``; it reaches the clients that have completed
  ``qmp_capabilities`` at that time.

Wire format, checked against qemu-storage-daemon 7.2 with a raw socket: one JSON text per line,
lines end with ``\\r\\n``; non-ASCII and DEL are written as ``\\uXXXX`` (upper-case hex);
member order is QEMU's (``{"return": R, "id": I}``, ``{"id": I, "error": {...}}``, events
``{"timestamp": ..., "event": ..., "data": ...}``); ``pretty=on`` indents by 4 and writes an
empty object as ``{`` newline ``}``.  The greeting claims QEMU 7.2.0 (clients such as
``qemu.qmp`` and QEMU's iotests look at it); ``package`` names pyvhost-blk.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import re
import select
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from blocklayer.aio import AioContext, qemu_get_aio_context
from pyvhost_blk import __version__
from pyvhost_blk.keyval import (
    _I64_MIN,
    _U64_MAX,
    KeyvalError,
    _JsonParser,
    _Tok,
    to_bool,
    to_int,
    to_str,
    to_str_list,
)

__all__ = [
    "QMP_VERSION",
    "JsonStreamer",
    "Monitor",
    "QmpDispatcher",
    "QmpError",
    "arg_bool",
    "arg_dict",
    "arg_int",
    "arg_str",
    "arg_str_list",
    "args_check",
    "json_encode",
]

log = logging.getLogger("pyvhost_blk.qmp")

QMP_VERSION = (7, 2, 0)  # what the greeting and query-version claim (major, minor, micro)
QUEUE_MAX = 8  # requests queued per client before we stop reading it
OUTBUF_MAX = 64 << 20  # unread output after which a client is dropped
RECV_SIZE = 65536

# QEMU's limits on one JSON message (json-streamer)
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1024


# =============================================================================================
# Errors and argument helpers (for command handlers)
# =============================================================================================


class QmpError(Exception):
    """A QMP error response.  ``QmpError(desc)`` or ``QmpError(error_class, desc)``.

    ``error_class`` is one of QEMU's ``GenericError`` (the default), ``CommandNotFound``,
    ``DeviceNotActive``, ``DeviceNotFound``, ``KVMMissingCap``.
    """

    def __init__(self, error_class: str, desc: str | None = None) -> None:
        if desc is None:
            error_class, desc = "GenericError", error_class
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc

    def to_dict(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}


_MISSING: Any = object()


def args_check(
    args: Mapping[str, Any], required: Iterable[str] = (), optional: Iterable[str] = ()
) -> None:
    """QAPI's member checks: ``Parameter 'x' is missing`` (first missing of ``required``, in
    order), then ``Parameter 'y' is unexpected`` (first member of ``args`` in neither list)."""
    required = tuple(required)
    for name in required:
        if name not in args:
            raise QmpError(f"Parameter '{name}' is missing")
    allowed = set(required) | set(optional)
    for name in args:
        if name not in allowed:
            raise QmpError(f"Parameter '{name}' is unexpected")


def _get(args: Mapping[str, Any], name: str, default: Any) -> Any:
    if name in args:
        return args[name]
    if default is _MISSING:
        raise QmpError(f"Parameter '{name}' is missing")
    return default


def _typed(fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    try:
        return fn(*a, **kw)
    except KeyvalError as e:
        raise QmpError(str(e)) from None


def arg_str(args: Mapping[str, Any], name: str, default: Any = _MISSING) -> Any:
    """A ``str`` member (``Invalid parameter type for 'x', expected: string``); ``default``
    when absent, else ``Parameter 'x' is missing``."""
    if name not in args and default is not _MISSING:
        return default
    return _typed(to_str, _get(args, name, default), name, from_json=True)


def arg_bool(args: Mapping[str, Any], name: str, default: Any = _MISSING) -> Any:
    """A ``bool`` member (JSON ``true``/``false``)."""
    if name not in args and default is not _MISSING:
        return default
    return _typed(to_bool, _get(args, name, default), name, from_json=True)


def arg_int(
    args: Mapping[str, Any], name: str, type_: str = "int64", default: Any = _MISSING
) -> Any:
    """An integer member of QAPI type ``type_`` (``int8`` ... ``uint64``; ``size`` is
    ``uint64``)."""
    if name not in args and default is not _MISSING:
        return default
    t = "uint64" if type_ == "size" else type_
    return _typed(to_int, _get(args, name, default), name, t, from_json=True)


def arg_str_list(args: Mapping[str, Any], name: str, default: Any = _MISSING) -> Any:
    """A ``str`` or ``[str]`` member (QAPI alternate), always returned as a list."""
    if name not in args and default is not _MISSING:
        return default
    return _typed(to_str_list, _get(args, name, default), name, from_json=True)


def arg_dict(args: Mapping[str, Any], name: str, default: Any = _MISSING) -> Any:
    """A nested-object member (``Invalid parameter type for 'x', expected: object``)."""
    if name not in args and default is not _MISSING:
        return default
    v = _get(args, name, default)
    if not isinstance(v, dict):
        raise QmpError(f"Invalid parameter type for '{name}', expected: object")
    return v


# =============================================================================================
# JSON output, formatted like QEMU's qobject_to_json
# =============================================================================================

_ESCAPE_RE = re.compile('["\\\\\x00-\x1f\x7f-\U0010ffff]')
_SHORT_ESCAPES = {
    '"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t",
}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group(0)
    short = _SHORT_ESCAPES.get(c)
    if short is not None:
        return short
    cp = ord(c)
    if cp >= 0x10000:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


def _encode(obj: Any, pretty: bool, level: int, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, str):
        out.append('"' + _ESCAPE_RE.sub(_escape_char, obj) + '"')
    elif isinstance(obj, int):
        out.append(str(int(obj)))
    elif isinstance(obj, float):
        out.append(f"{obj:.17g}")  # QEMU's format: 0.1 -> 0.10000000000000001, 1.0 -> 1
    elif isinstance(obj, Mapping):
        items = list(obj.items())
        _encode_container("{", "}", items, pretty, level, out, is_dict=True)
    elif isinstance(obj, list | tuple):
        _encode_container("[", "]", list(obj), pretty, level, out, is_dict=False)
    else:
        raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _encode_container(
    open_: str, close: str, items: list[Any], pretty: bool, level: int, out: list[str],
    is_dict: bool,
) -> None:
    out.append(open_)
    inner = "\r\n" + "    " * (level + 1) if pretty else ""
    for i, item in enumerate(items):
        if i:
            out.append(",")
            if not pretty:
                out.append(" ")
        out.append(inner)
        if is_dict:
            key, value = item
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, not {type(key).__name__}")
            _encode(key, pretty, level + 1, out)
            out.append(": ")
            _encode(value, pretty, level + 1, out)
        else:
            _encode(item, pretty, level + 1, out)
    if pretty:
        out.append("\r\n" + "    " * level)
    out.append(close)


def json_encode(obj: Any, pretty: bool = False) -> str:
    """``obj`` as QEMU's monitor writes it (without the final ``\\r\\n``).  Raises TypeError
    for values JSON cannot represent.  Pretty output uses ``\\r\\n`` line ends, as on the
    wire."""
    out: list[str] = []
    _encode(obj, pretty, 0, out)
    return "".join(out)


# =============================================================================================
# JSON input: QEMU's lexer + streamer, incremental over bytes
# =============================================================================================

(_START, _STR, _STR_ESC, _MINUS, _ZERO, _INT, _FRAC0, _FRAC, _EXP0, _EXP_SIGN, _EXP, _KW,
 _RECOVERY) = range(13)
_WS = frozenset(b" \t\r\n")
_PUNCT_BYTES = frozenset(b"{}[]:,")
_DIGITS = frozenset(b"0123456789")
_LOWER = frozenset(range(0x61, 0x7B))
_RESYNC = frozenset(b"{}[]") | frozenset(range(0x20)) - {0x09} | {0xFE, 0xFF}
# inside a string: what stops a run of ordinary bytes
_STR_STOP = {
    q: re.compile(b"[\\x00-\\x1f\\\\\\xfe\\xff" + re.escape(bytes([q])) + b"]")
    for q in (0x22, 0x27)
}
_BAD_UTF8: Any = object()


def _decode_utf8(raw: bytes) -> str | Any:
    """UTF-8 as QEMU accepts it in strings: strict, and no noncharacters."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _BAD_UTF8
    if not s.isascii() and any(_is_nonchar(ord(c)) for c in s):
        return _BAD_UTF8
    return s


class _Parser(_JsonParser):
    """keyval's QEMU-compatible grammar, plus string tokens whose UTF-8 was invalid."""

    def value(self, tok: _Tok) -> Any:
        if tok.kind == "str":
            if tok.value is _BAD_UTF8:
                raise self.fail("invalid UTF-8 sequence in string")
            s = super().value(tok)
            if not s.isascii() and any(_is_nonchar(ord(c)) for c in s):
                for m in _ESCAPE_IN_RE.finditer(tok.text):
                    if m.group(1) and _is_nonchar(int(m.group(1), 16)):
                        raise self.fail(f"{m.group(0)} is not a valid Unicode character")
            return s
        return super().value(tok)


_ESCAPE_IN_RE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)")


def _is_nonchar(cp: int) -> bool:
    return 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE


class JsonStreamer:
    """Split a byte stream into JSON values like QEMU's json-lexer + json-streamer.

    ``feed(data)`` calls ``emit(value, None)`` for each complete top-level value and
    ``emit(None, message)`` for each error (``JSON parse error, ...``).  After a lexical error
    the input is skipped up to the next ``{ } [ ]`` or control character, as QEMU does.
    """

    def __init__(self, emit: Callable[[Any, str | None], None]) -> None:
        self._emit = emit
        self._state = _START
        self._quote = 0
        self._buf = bytearray()
        self._tokens: list[_Tok] = []
        self._brace = 0
        self._bracket = 0
        self._size = 0

    # -- lexer ---------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        buf = self._buf
        while i < n:
            st = self._state
            b = data[i]
            if st == _START:
                i += 1
                if b in _WS:
                    continue
                if b in _PUNCT_BYTES:
                    self._token(chr(b), None, chr(b))
                    continue
                buf.append(b)
                if b == 0x22 or b == 0x27:
                    self._state, self._quote = _STR, b
                elif b == 0x2D:
                    self._state = _MINUS
                elif b == 0x30:
                    self._state = _ZERO
                elif b in _DIGITS:
                    self._state = _INT
                elif b in _LOWER:
                    self._state = _KW
                else:
                    self._error()
            elif st == _STR:
                m = _STR_STOP[self._quote].search(data, i)
                if m is None:
                    buf += data[i:]
                    i = n
                    if len(buf) > MAX_TOKEN_SIZE:
                        self._limit("JSON token size limit exceeded")
                    continue
                j = m.start()
                buf += data[i : j + 1]
                i = j + 1
                c = data[j]
                if c == self._quote:
                    self._string_token()
                elif c == 0x5C:
                    self._state = _STR_ESC
                else:
                    self._error()
            elif st == _STR_ESC:
                buf.append(b)
                i += 1
                if 0x20 <= b <= 0xFD:
                    self._state = _STR
                else:
                    self._error()
            elif st == _RECOVERY:
                if b in _RESYNC:
                    self._state = _START
                else:
                    i += 1
            elif st == _KW:
                if b in _LOWER:
                    buf.append(b)
                    i += 1
                else:
                    word = buf.decode("ascii")
                    self._reset_token()
                    self._token("kw", word, word)
            else:
                i = self._number(st, b, i)

    def _number(self, st: int, b: int, i: int) -> int:
        """One byte in a number state; returns the new input position."""
        digit = b in _DIGITS
        nxt: int | None = None  # next state if b continues the number
        error = False
        if st == _MINUS:
            nxt = _ZERO if b == 0x30 else _INT if digit else None
            error = nxt is None
        elif st == _ZERO:
            error = digit
            nxt = _FRAC0 if b == 0x2E else None
        elif st == _INT:
            nxt = _INT if digit else _FRAC0 if b == 0x2E else _EXP0 if b in (0x45, 0x65) else None
        elif st == _FRAC0:
            nxt = _FRAC if digit else None
            error = nxt is None
        elif st == _FRAC:
            nxt = _FRAC if digit else _EXP0 if b in (0x45, 0x65) else None
        elif st == _EXP0:
            nxt = _EXP if digit else _EXP_SIGN if b in (0x2B, 0x2D) else None
            error = nxt is None
        elif st == _EXP_SIGN:
            nxt = _EXP if digit else None
            error = nxt is None
        elif st == _EXP:
            nxt = _EXP if digit else None
        if error:
            self._buf.append(b)
            self._error()
            return i + 1
        if nxt is not None:
            self._buf.append(b)
            self._state = nxt
            return i + 1
        raw = self._buf.decode("ascii")  # the number ends before b, which is looked at again
        self._reset_token()
        self._token("num", _number_value(raw), raw)
        return i

    def _reset_token(self) -> None:
        self._buf.clear()
        self._state = _START

    def _string_token(self) -> None:
        raw = bytes(self._buf)
        self._reset_token()
        text = _decode_utf8(raw)
        if text is _BAD_UTF8:
            self._token("str", _BAD_UTF8, raw.decode("utf-8", "replace"))
        else:
            self._token("str", None, text)

    def _error(self) -> None:
        text = self._buf.decode("utf-8", "replace")
        self._buf.clear()
        self._state = _RECOVERY
        self._flush(None, f"JSON parse error, stray '{text}'")

    def _limit(self, msg: str) -> None:
        self._buf.clear()
        self._state = _RECOVERY
        self._flush(None, msg)

    # -- streamer ------------------------------------------------------------------------------
    def _token(self, kind: str, value: Any, text: str) -> None:
        if kind == "{":
            self._brace += 1
        elif kind == "}":
            self._brace -= 1
        elif kind == "[":
            self._bracket += 1
        elif kind == "]":
            self._bracket -= 1
        if self._size + len(text) + 1 > MAX_TOKEN_SIZE:
            self._flush(None, "JSON token size limit exceeded")
            return
        if len(self._tokens) + 1 > MAX_TOKEN_COUNT:
            self._flush(None, "JSON token count limit exceeded")
            return
        if self._brace + self._bracket > MAX_NESTING:
            self._flush(None, "JSON nesting depth limit exceeded")
            return
        self._tokens.append(_Tok(kind, value, text))
        self._size += len(text)
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        parser = _Parser(self._tokens)
        try:
            obj = parser.value(parser.next())
        except KeyvalError as e:
            self._flush(None, str(e))
        else:
            self._flush(obj, None)

    def _flush(self, obj: Any, err: str | None) -> None:
        self._tokens = []
        self._brace = self._bracket = self._size = 0
        self._emit(obj, err)


def _number_value(raw: str) -> int | float:
    if "." in raw or "e" in raw or "E" in raw or len(raw) > 21:
        return float(raw)
    v = int(raw)
    return v if _I64_MIN <= v <= _U64_MAX else float(raw)  # QEMU keeps (u)int64 exact


# =============================================================================================
# The dispatcher: command registry, request queue, events
# =============================================================================================

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
            client.respond(QmpError(err), _MISSING)
            return
        if not isinstance(req, dict):
            client.respond(QmpError("QMP input must be a JSON object"), _MISSING)
            return
        rid = req.get("id", _MISSING)
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


# =============================================================================================
# Monitor (one listening socket) and its client connection
# =============================================================================================


class _Client:
    """One connection of a Monitor."""

    def __init__(self, mon: Monitor, sock: socket.socket) -> None:
        self.mon = mon
        self.sock = sock
        self.fd = sock.fileno()
        self.negotiated = False
        self.oob = False
        self.pending = 0  # requests in the dispatcher's queue
        self.closed = False
        self.reading = False
        self._out = bytearray()
        self._wep: select.epoll | None = None  # watches EPOLLOUT while output is pending
        self._streamer = JsonStreamer(self._on_message)
        sock.setblocking(False)

    @property
    def ctx(self) -> AioContext:
        return self.mon.dispatcher.ctx

    def start(self) -> None:
        self._set_reading(True)
        self.send_obj(self.mon.dispatcher.greeting())

    # -- input ---------------------------------------------------------------------------------
    def _set_reading(self, on: bool) -> None:
        if on != self.reading and not self.closed:
            self.reading = on
            self.ctx.set_fd_handler(self.fd, self._on_readable if on else None)

    def maybe_resume(self) -> None:
        if not self.reading and self.pending < QUEUE_MAX:
            self._set_reading(True)

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.info("QMP client of %s: %s", self.mon.name, e.strerror or e)
            data = b""
        if not data:
            self.mon._client_gone(self)
            return
        self._streamer.feed(data)
        if self.pending >= QUEUE_MAX:
            self._set_reading(False)

    def _on_message(self, obj: Any, err: str | None) -> None:
        if not self.closed:
            self.mon.dispatcher._enqueue(self, obj, err)

    # -- output --------------------------------------------------------------------------------
    def respond(self, result: Any, rid: Any) -> None:
        if isinstance(result, QmpError):
            rsp: dict[str, Any] = {} if rid is _MISSING else {"id": rid}
            rsp["error"] = result.to_dict()
        else:
            rsp = {"return": {} if result is None else result}
            if rid is not _MISSING:
                rsp["id"] = rid
        self.send_obj(rsp)

    def send_obj(self, obj: Any) -> None:
        if self.closed:
            return
        try:
            text = json_encode(obj, self.mon.pretty)
        except (TypeError, ValueError, RecursionError) as e:
            log.error("QMP %s: cannot encode %r: %s", self.mon.name, obj, e)
            if "return" not in obj:
                return
            err = QmpError(f"internal error: the command's result is not JSON: {e}").to_dict()
            obj = {k: v for k, v in obj.items() if k == "id"} | {"error": err}
            text = json_encode(obj, self.mon.pretty)
        self._send((text + "\r\n").encode("utf-8", "surrogatepass"))

    def _send(self, data: bytes) -> None:
        if not self._out:
            try:
                n = self.sock.send(data, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                self._write_failed(e)
                return
            data = data[n:]
            if not data:
                return
        self._out += data
        if len(self._out) > OUTBUF_MAX:
            log.warning("QMP client of %s does not read its output: disconnecting", self.mon.name)
            self.mon._client_gone(self)
            return
        if self._wep is None:
            self._wep = select.epoll(1)
            self._wep.register(self.fd, select.EPOLLOUT)
            self.ctx.set_fd_handler(self._wep.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        try:
            n = self.sock.send(self._out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._write_failed(e)
            return
        del self._out[:n]
        if not self._out:
            self._stop_write_watch()

    def _write_failed(self, e: OSError) -> None:
        if e.errno not in (errno.EPIPE, errno.ECONNRESET):
            log.info("QMP client of %s: write: %s", self.mon.name, e.strerror or e)
        self._out.clear()
        self.mon._client_gone(self)

    def _stop_write_watch(self) -> None:
        if self._wep is not None:
            self.ctx.set_fd_handler(self._wep.fileno(), None)
            self._wep.close()
            self._wep = None

    def close(self) -> None:
        """Drop the connection (best effort to flush what is buffered, without blocking)."""
        if self.closed:
            return
        if self._out:
            try:
                self.sock.send(self._out, socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            except OSError:
                pass
        self._set_reading(False)
        self.closed = True
        self._stop_write_watch()
        self.sock.close()


class Monitor:
    """A QMP monitor on a listening socket (``--chardev socket,...,server=on`` +
    ``--monitor``).  Create it in ``dispatcher.ctx``'s thread (or before its loop runs).

    ``path`` is the socket file that :meth:`close` removes (None for an inherited fd).
    ``conn`` is an already accepted first client (``wait=on``).
    """

    def __init__(
        self,
        dispatcher: QmpDispatcher,
        listener: socket.socket,
        path: str | None = None,
        *,
        name: str = "",
        pretty: bool = False,
        conn: socket.socket | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.listener = listener
        self.path = path
        self.name = name or (path or f"fd {listener.fileno()}")
        self.pretty = pretty
        self.client: _Client | None = None
        self.closed = False
        self._accepting = False
        listener.setblocking(False)
        dispatcher._attach(self)
        if conn is not None:
            self._start_client(conn)
        else:
            self._set_accepting(True)

    @property
    def ctx(self) -> AioContext:
        return self.dispatcher.ctx

    def _set_accepting(self, on: bool) -> None:
        if on != self._accepting:
            self._accepting = on
            self.ctx.set_fd_handler(self.listener.fileno(), self._on_accept if on else None)

    def _on_accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as e:
            log.error("QMP %s: accept: %s", self.name, e.strerror or e)
            return
        self._start_client(conn)

    def _start_client(self, conn: socket.socket) -> None:
        # Like QEMU's socket chardev: one client; later ones wait in the listen backlog.
        self._set_accepting(False)
        self.client = _Client(self, conn)
        log.debug("QMP %s: client connected", self.name)
        self.client.start()

    def _client_gone(self, client: _Client) -> None:
        if client is not self.client:
            return
        client.close()
        self.client = None
        log.debug("QMP %s: client disconnected", self.name)
        if not self.closed:
            self._set_accepting(True)

    @property
    def connected(self) -> bool:
        return self.client is not None

    def close(self) -> None:
        """Disconnect the client, stop listening and remove the socket file."""
        if self.closed:
            return
        self.closed = True
        if self.client is not None:
            self.client.close()
            self.client = None
        self._set_accepting(False)
        self.dispatcher._detach(self)
        self.listener.close()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
