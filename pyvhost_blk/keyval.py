"""Parsing of qemu-storage-daemon style option strings (``--blockdev``, ``--export``, ...).

Theory
------
qsd accepts every QAPI-typed option in one of two spellings:

* **keyval** (``driver=file,node-name=disk0,cache.direct=on``): a flat list of
  ``key=value`` pairs separated by ``,``.  Dotted keys denote a path in a tree
  whose root is an object; a path fragment made only of digits denotes a list
  index (``iothread.0=a,iothread.1=b``), so inner nodes are objects or lists and
  the leaves are *always strings*.  ``,,`` in a value is a literal comma.  The
  first element may omit ``key=`` when the caller names an *implied key*
  (``--object iothread,id=io0`` means ``qom-type=iothread,id=io0``).  A bare
  ``help`` or ``?`` element asks for help.  If the same leaf is given twice the
  last value wins (QEMU 7.2 does not reject duplicates).
* **JSON** (``{"driver": "file", ...}``), chosen when the text's very first
  character is ``{``.  Values are typed (numbers, booleans, ...).  As in QEMU's
  parser, duplicate keys are rejected and single-quoted strings are accepted.

Because keyval leaves are untyped, QAPI's "keyval input visitor" converts strings
to the type the schema expects (``on``/``off`` for booleans, ``strtoll`` for
integers, ``qemu_strtosz`` for sizes), whereas the plain visitor used for JSON
demands that the JSON type already be right.  The ``to_*`` helpers that apply
this rule (``blocklayer/qapi.py``, re-exported here) phrase their errors exactly
like qemu-storage-daemon 7.2 does, so the daemon can print
``<prog>: --export <arg>: <message>`` as qsd would.

Names passed to the helpers are QEMU's *full names*: ``addr.path`` for object
members (both modes), ``iothread.0`` (keyval) or ``iothread[0]`` (JSON) for
list elements; :func:`child_name` builds them.

This module only depends on the standard library and holds no QEMU code; it
reproduces behaviour observed from ``qemu-storage-daemon`` 7.2.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

# The typed access to option trees (QAPI's input visitor) lives with the block layer, whose
# drivers declare their options with it; re-exported here for the daemon's modules.
from blocklayer.qapi import (  # noqa: F401
    KeyvalError,
    check_keys,
    child_name,
    parse_size,
    require,
    to_bool,
    to_dict,
    to_int,
    to_size,
    to_str,
    to_str_list,
)

__all__ = [
    "KeyvalError",
    "ParsedOption",
    "check_keys",
    "child_name",
    "parse_json_object",
    "parse_keyval",
    "parse_keyval_help",
    "parse_option",
    "parse_size",
    "require",
    "to_bool",
    "to_dict",
    "to_int",
    "to_size",
    "to_str",
    "to_str_list",
]

log = logging.getLogger(__name__)

_U64_MAX = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
_INT_MAX = (1 << 31) - 1  # list indices are capped like QEMU's key_to_index()
_MAX_FRAGMENT = 127

HELP_OPTIONS = ("help", "?")


# --------------------------------------------------------------------------------------
# keyval syntax
# --------------------------------------------------------------------------------------

# A QAPI name, optionally with a downstream "__RFQDN_" prefix (which may contain dots).
_QAPI_NAME = re.compile(r"(?:__[A-Za-z0-9.\-]*_)?[A-Za-z][A-Za-z0-9_\-]*")
_INDEX = re.compile(r"[0-9]+")
_BARE = re.compile(r"[^=,]*")


class _Inconsistent(Exception):
    pass


def _put(cur: dict[str, Any], key: str, value: str | None) -> Any:
    """Make ``cur[key]`` a dict (``value is None``) or the string ``value``.

    Raise :class:`_Inconsistent` when ``cur[key]`` already is the other kind.
    """
    old = cur.get(key)
    if old is not None:
        if isinstance(old, dict) != (value is None):
            raise _Inconsistent
        if value is None:
            return old
    new: Any = {} if value is None else value
    cur[key] = new
    return new


def _parse_one(
    root: dict[str, Any], text: str, pos: int, implied_key: str | None
) -> tuple[int, bool]:
    """Parse the element starting at ``text[pos]`` into ``root``.

    Return the position of the next element and whether the element was a help request.
    """
    end = len(text)
    m = _BARE.match(text, pos)
    assert m is not None
    bare_len = m.end() - pos
    implied = False
    if bare_len and (m.end() == end or text[m.end()] != "="):
        if text[pos : m.end()] in HELP_OPTIONS:
            nxt = m.end()
            if nxt < end and text[nxt] == ",":
                nxt += 1
            return nxt, True
        if implied_key is not None:
            implied = True

    key = implied_key if implied and implied_key is not None else text[pos : m.end()]
    fragments: list[str] = []
    s = 0
    while True:
        if s and (im := _INDEX.match(key, s)):
            flen = im.end() - s
        else:
            nm = _QAPI_NAME.match(key, s)
            flen = nm.end() - s if nm else 0
        if not flen or (s + flen < len(key) and key[s + flen] != "."):
            raise KeyvalError(f"Invalid parameter '{key}'")
        if flen > _MAX_FRAGMENT:
            frag = " fragment" if s or s + flen != len(key) else ""
            raise KeyvalError(f"Parameter{frag} '{key[s : s + flen]}' is too long")
        fragments.append(key[s : s + flen])
        s += flen
        if s == len(key):
            break
        s += 1  # skip '.'

    if implied:
        # An implied value extends to the next ',' and knows no ',,' escape.
        s = m.end() + 1 if m.end() < end else end
        value = text[pos : m.end()]
    else:
        s = m.end()
        if s == end or text[s] != "=":
            raise KeyvalError(f"Expected '=' after parameter '{key}'")
        s += 1
        chars: list[str] = []
        while s < end:
            if text[s] == ",":
                s += 1
                if s >= end or text[s] != ",":
                    break
            chars.append(text[s])
            s += 1
        value = "".join(chars)

    cur: Any = root
    for i, frag in enumerate(fragments[:-1]):
        try:
            cur = _put(cur, frag, None)
        except _Inconsistent:
            raise KeyvalError(
                f"Parameters '{'.'.join(fragments[: i + 1])}.*' used inconsistently"
            ) from None
    try:
        _put(cur, fragments[-1], value)
    except _Inconsistent:
        raise KeyvalError(f"Parameters '{key}.*' used inconsistently") from None
    return s, False


def _listify(cur: dict[str, Any], prefix: str) -> dict[str, Any] | list[Any]:
    """Turn dicts whose keys are all list indices into lists, recursively.

    ``prefix`` is the dotted path of ``cur`` including a trailing dot ('' at the root).
    """
    has_index = has_member = False
    for k, v in list(cur.items()):
        if k[0].isascii() and k[0].isdigit():
            has_index = True
        else:
            has_member = True
        if isinstance(v, dict):
            cur[k] = _listify(v, f"{prefix}{k}.")
    if has_index and has_member:
        raise KeyvalError(f"Parameters '{prefix}*' used inconsistently")
    if not has_index:
        return cur
    by_index = {min(int(k), _INT_MAX): v for k, v in cur.items()}
    out = []
    for i in range(max(by_index) + 1):
        if i not in by_index:
            raise KeyvalError(f"Parameter '{prefix}{i}' missing")
        out.append(by_index[i])
    return out


def parse_keyval_help(text: str, implied_key: str | None = None) -> tuple[dict[str, Any], bool]:
    """Parse QEMU keyval syntax; return ``(tree, help_requested)``.

    ``help_requested`` is true when a bare ``help`` or ``?`` element occurs
    (``--object iothread,help``); the element itself is dropped from the tree.
    Other semantics are those of :func:`parse_keyval`.
    """
    root: dict[str, Any] = {}
    want_help = False
    pos = 0
    while pos < len(text):
        pos, is_help = _parse_one(root, text, pos, implied_key)
        want_help = want_help or is_help
        implied_key = None
    result = _listify(root, "")
    assert isinstance(result, dict)
    return result, want_help


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse ``key=value,...`` (QEMU keyval syntax) into a tree of dicts, lists and strings.

    * ``a.b=1`` -> ``{"a": {"b": "1"}}``; ``a.0=x,a.1=y`` -> ``{"a": ["x", "y"]}``
      (indices may come in any order but must be contiguous from 0).
    * ``,,`` inside a value is a literal ``,``; a trailing ``,`` is ignored.
    * With ``implied_key``, the first element may be a bare value:
      ``parse_keyval("iothread,id=x", "qom-type")`` -> ``{"qom-type": "iothread", "id": "x"}``.
    * The same leaf given twice: the last value wins (as in QEMU 7.2).
    * Leaves are always ``str``; use the ``to_*`` helpers for typed access.

    Raises :class:`KeyvalError` with QEMU's messages: ``Invalid parameter 'K'``,
    ``Expected '=' after parameter 'K'``, ``Parameters 'a.*' used inconsistently``,
    ``Parameter 'a.0' missing``, ``Parameter 'K' is too long``, ``Parameter fragment
    'F' is too long``, and ``Help is not available for this option`` for a bare
    ``help``/``?`` (use :func:`parse_keyval_help` to accept it).
    """
    tree, want_help = parse_keyval_help(text, implied_key)
    if want_help:
        raise KeyvalError("Help is not available for this option")
    return tree


# --------------------------------------------------------------------------------------
# JSON syntax (QEMU flavour: single-quoted strings, \' escape, duplicate keys rejected)
# --------------------------------------------------------------------------------------

_JSON_WS = " \t\r\n"
_DIGIT_CHARS = "0123456789"
_JSON_KEYWORD = re.compile(r"[a-z]+")
_JSON_ESCAPES = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_PUNCT = "{}[]:,"


@dataclass
class _Tok:
    kind: str  # one of _PUNCT, "str", "num", "kw", "err"
    value: Any
    text: str


def _lex_string(text: str, pos: int) -> tuple[_Tok, int]:
    """Lex a quoted string; escapes are only skipped here and checked by the parser."""
    quote = text[pos]
    i = pos + 1
    while i < len(text):
        c = text[i]
        if c == quote:
            return _Tok("str", None, text[pos : i + 1]), i + 1
        if c < " ":
            return _Tok("err", None, text[pos : i + 1]), len(text)
        i += 2 if c == "\\" else 1
    return _Tok("err", None, text[pos:]), len(text)


def _lex_number(text: str, pos: int) -> tuple[_Tok, int]:
    """Lex a JSON number; a malformed one becomes an ``err`` token like QEMU's lexer."""
    n = len(text)
    i = pos

    def digits(i: int) -> int | None:
        """Skip one or more digits; None if there is none at ``i``."""
        if i >= n or text[i] not in _DIGIT_CHARS:
            return None
        while i < n and text[i] in _DIGIT_CHARS:
            i += 1
        return i

    def error(i: int) -> tuple[_Tok, int]:
        return _Tok("err", None, text[pos : i + 1]), n

    if text[i] == "-":
        i += 1
    if text[i : i + 1] == "0":
        i += 1
        if i < n and text[i] in _DIGIT_CHARS:
            return error(i)
    else:
        nxt = digits(i)
        if nxt is None:
            return error(i)
        i = nxt
    is_int = True
    if text[i : i + 1] == ".":
        nxt = digits(i + 1)
        if nxt is None:
            return error(i + 1)
        i, is_int = nxt, False
    if text[i : i + 1] in ("e", "E"):
        i += 1
        if text[i : i + 1] in ("+", "-"):
            i += 1
        nxt = digits(i)
        if nxt is None:
            return error(i)
        i, is_int = nxt, False
    raw = text[pos:i]
    num: int | float = int(raw) if is_int else float(raw)
    if is_int and not _I64_MIN <= num <= _U64_MAX:
        num = float(raw)  # QEMU keeps only int64/uint64 values as integers
    return _Tok("num", num, raw), i


def _hex4(text: str, i: int) -> int | None:
    digits = text[i : i + 4]
    if len(digits) == 4 and all(h in "0123456789abcdefABCDEF" for h in digits):
        return int(digits, 16)
    return None


def _decode_string(raw: str) -> str:
    """Decode a lexed string token (including its quotes)."""
    out: list[str] = []
    i = 1
    end = len(raw) - 1
    while i < end:
        c = raw[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = raw[i + 1]
        if e in _JSON_ESCAPES:
            out.append(_JSON_ESCAPES[e])
            i += 2
            continue
        if e != "u":
            raise _JsonParser.fail("invalid escape sequence in string")
        bad = _JsonParser.fail(f"{raw[i : i + 6]} is not a valid Unicode character")
        cp = _hex4(raw, i + 2)
        if cp is None or 0xDC00 <= cp < 0xE000:
            raise bad
        i += 6
        if 0xD800 <= cp < 0xDC00:
            lo = _hex4(raw, i + 2) if raw[i : i + 2] == "\\u" else None
            if lo is None or not 0xDC00 <= lo < 0xE000:
                raise bad
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
            i += 6
        out.append(chr(cp))
    return "".join(out)


def _json_tokens(text: str) -> list[_Tok]:
    """Split ``text`` into tokens; a lexical error becomes a final ``err`` token."""
    toks: list[_Tok] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c in _JSON_WS:
            i += 1
        elif c in _PUNCT:
            toks.append(_Tok(c, None, c))
            i += 1
        elif c in "\"'":
            tok, i = _lex_string(text, i)
            toks.append(tok)
            if tok.kind == "err":
                break
        elif c == "-" or c in _DIGIT_CHARS:
            tok, i = _lex_number(text, i)
            toks.append(tok)
            if tok.kind == "err":
                break
        elif _JSON_KEYWORD.match(c):
            m = _JSON_KEYWORD.match(text, i)
            assert m is not None
            toks.append(_Tok("kw", m.group(0), m.group(0)))
            i = m.end()
        else:
            toks.append(_Tok("err", None, c))
            break
    return toks


class _JsonParser:
    _KEYWORDS: dict[str, Any] = {"true": True, "false": False, "null": None}

    def __init__(self, toks: list[_Tok]) -> None:
        self.toks = toks
        self.pos = 0

    @staticmethod
    def fail(msg: str) -> KeyvalError:
        return KeyvalError(f"JSON parse error, {msg}")

    def next(self) -> _Tok:
        if self.pos >= len(self.toks):
            raise self.fail("premature EOI")
        tok = self.toks[self.pos]
        self.pos += 1
        return tok

    def value(self, tok: _Tok) -> Any:
        if tok.kind == "{":
            return self.obj()
        if tok.kind == "[":
            return self.arr()
        if tok.kind == "str":
            return _decode_string(tok.text)
        if tok.kind == "num":
            return tok.value
        if tok.kind == "kw":
            if tok.value in self._KEYWORDS:
                return self._KEYWORDS[tok.value]
            raise self.fail(f"invalid keyword '{tok.value}'")
        raise self.fail("expecting value")

    def obj(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        tok = self.next()
        if tok.kind == "}":
            return out
        while True:
            key = self.value(tok)
            if not isinstance(key, str):
                raise self.fail("key is not a string in object")
            if self.next().kind != ":":
                raise self.fail("missing : in object pair")
            val = self.value(self.next())
            if key in out:
                raise self.fail("duplicate key")
            out[key] = val
            tok = self.next()
            if tok.kind == "}":
                return out
            if tok.kind != ",":
                raise self.fail("expected separator in dict")
            tok = self.next()

    def arr(self) -> list[Any]:
        out: list[Any] = []
        tok = self.next()
        if tok.kind == "]":
            return out
        while True:
            out.append(self.value(tok))
            tok = self.next()
            if tok.kind == "]":
                return out
            if tok.kind != ",":
                raise self.fail("expected separator in list")
            tok = self.next()


def parse_json_object(text: str) -> dict[str, Any]:
    """Parse ``text`` as one JSON object the way QEMU's JSON parser does.

    Extensions/quirks matched: single-quoted strings and the ``\\'`` escape are
    accepted; duplicate keys are rejected; integers outside int64/uint64 become
    floats; ``NaN``/``Infinity`` are rejected.  Errors (``KeyvalError``):
    ``JSON parse error, premature EOI`` / ``expecting value`` / ``invalid keyword 'x'`` /
    ``missing : in object pair`` / ``expected separator in dict`` / ``expected
    separator in list`` / ``key is not a string in object`` / ``duplicate key`` /
    ``stray '<text>'`` (lexical error), ``Expecting at most one JSON value`` for
    trailing data, and ``JSON value is not an object`` if the value is no object.
    """
    toks = _json_tokens(text)
    # QEMU's streamer hands the parser one complete top-level value at a time; a
    # lexical error before that value is complete wins over any grammar error.
    depth = 0
    stop = len(toks)
    for i, tok in enumerate(toks):
        if tok.kind == "err":
            raise KeyvalError(f"JSON parse error, stray '{tok.text}'")
        if tok.kind in ("{", "["):
            depth += 1
        elif tok.kind in ("}", "]"):
            depth -= 1
        if depth <= 0:
            stop = i + 1
            break
    parser = _JsonParser(toks[:stop])
    value = parser.value(parser.next())
    if parser.pos < stop or stop < len(toks):
        raise KeyvalError("Expecting at most one JSON value")
    if not isinstance(value, dict):
        raise KeyvalError("JSON value is not an object")
    return value


# --------------------------------------------------------------------------------------
# Either syntax
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedOption:
    """Result of :func:`parse_option`.

    ``values``: the option tree.  ``from_json``: true if it was written as JSON, in
    which case its leaves are typed JSON values; otherwise all leaves are strings.
    Pass ``from_json`` on to the ``to_*`` helpers.  ``help``: a bare ``help``/``?``
    element was given (only possible with ``allow_help=True``).
    """

    values: dict[str, Any]
    from_json: bool
    help: bool = field(default=False)


def parse_option(
    text: str, implied_key: str | None = None, *, allow_help: bool = False
) -> ParsedOption:
    """Parse an option argument written either as JSON or as keyval, like qsd.

    JSON is chosen iff ``text[0] == "{"`` (no leading blanks allowed, as in QEMU);
    ``implied_key`` only applies to keyval.  A help request raises ``Help is not
    available for this option`` unless ``allow_help`` is true, in which case it is
    reported in :attr:`ParsedOption.help`.
    """
    if text.startswith("{"):
        return ParsedOption(parse_json_object(text), True)
    tree, want_help = parse_keyval_help(text, implied_key)
    if want_help and not allow_help:
        raise KeyvalError("Help is not available for this option")
    return ParsedOption(tree, False, want_help)


