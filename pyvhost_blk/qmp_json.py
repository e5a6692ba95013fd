"""QEMU's QMP JSON, both ways: :func:`json_encode` (output) and :class:`JsonStreamer` (input).

Theory of operation
-------------------
* **Output.**  :func:`json_encode` formats a value as QEMU's ``qobject_to_json`` does, checked
  against qemu-storage-daemon 7.2 with a raw socket: non-ASCII and DEL are written as
  ``\\uXXXX`` (upper-case hex, surrogate pairs above U+FFFF); floats use ``%.17g``; members are
  written in the mapping's order (the callers build QEMU's order); ``pretty=True`` indents by 4
  with ``\\r\\n`` line ends and writes an empty object as ``{`` newline ``}``.  The monitor
  adds the final ``\\r\\n`` of each message.
* **Input.**  :class:`JsonStreamer` reproduces QEMU's json-lexer + json-streamer: it is fed
  bytes incrementally (so fragmented input and several messages per read both work), splits
  them into tokens with a byte-level state machine, counts braces and brackets, and hands each
  complete top-level token list to the grammar part, which is the QEMU-compatible parser of
  ``pyvhost_blk/keyval.py`` (:class:`_Parser` adds the UTF-8 checks QEMU makes on strings).
  Malformed input gets QEMU's exact ``JSON parse error, ...`` texts; after a lexical error the
  input is skipped up to the next ``{ } [ ]`` or control character, as QEMU does.  QEMU's
  limits on one message (token size and count, nesting depth) apply.

Threads: no shared state and no locking.  ``json_encode`` may run anywhere; a
:class:`JsonStreamer` belongs to one connection and is fed, and calls back, in the thread that
feeds it (the monitor's: the dispatcher's context).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from pyvhost_blk.keyval import _I64_MIN, _U64_MAX, KeyvalError, _JsonParser, _Tok

# QEMU's limits on one JSON message (json-streamer)
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1024


# =============================================================================================
# Output, formatted like QEMU's qobject_to_json
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
# Input: QEMU's lexer + streamer, incremental over bytes
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
