"""QAPI's input visitor, for the options the block layer and the daemon read: typed values
out of an option tree, with qemu-storage-daemon 7.2's error messages.

Option trees come from ``pyvhost_blk/keyval.py`` (keyval text, whose leaves are all strings,
or JSON, whose leaves are typed).  The ``to_*`` helpers apply the rule for the mode the option
was written in (``from_json``): the keyval visitor converts strings (``on``/``off`` for
booleans, ``strtoll`` for integers, ``qemu_strtosz`` for sizes), the JSON visitor demands the
right JSON type.  Names are QEMU's full names (``addr.path``; ``iothread.0`` in keyval,
``iothread[0]`` in JSON): :func:`child_name` builds them.

This lives in ``blocklayer`` because drivers declare their options with these converters; the
command-line parser stays in ``pyvhost_blk``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger("pyvhost_blk.keyval")

_U64_MAX = (1 << 64) - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1


class KeyvalError(ValueError):
    """An option string could not be parsed or does not fit the expected schema.

    ``str(err)`` is the message qemu-storage-daemon would print after
    ``<prog>: --<option> <text>: ``.
    """


# --------------------------------------------------------------------------------------
# Typed access
# --------------------------------------------------------------------------------------

_C_SPACE = " \t\n\v\f\r"
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")
_INT_TYPES: dict[str, tuple[int, int]] = {
    "int8": (-(1 << 7), (1 << 7) - 1),
    "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (_I64_MIN, _I64_MAX),
    "uint8": (0, (1 << 8) - 1),
    "uint16": (0, (1 << 16) - 1),
    "uint32": (0, (1 << 32) - 1),
    "uint64": (0, _U64_MAX),
}
_DIGITS = re.compile(r"[0-9]+")
_HEXITS = re.compile(r"[0-9a-fA-F]+")
_FRACTION = re.compile(r"\.([0-9]+)([eE][+-]?[0-9]+)?")
_SIZE_SUFFIXES = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def child_name(parent: str, child: str | int, *, from_json: bool = False) -> str:
    """QEMU's full name of a member (``addr.path``) or list element.

    List elements are ``name.N`` in keyval mode and ``name[N]`` in JSON mode.
    """
    if isinstance(child, int):
        return f"{parent}[{child}]" if from_json else f"{parent}.{child}"
    return f"{parent}.{child}" if parent else child


def _type_error(name: str, expected: str) -> KeyvalError:
    return KeyvalError(f"Invalid parameter type for '{name}', expected: {expected}")


def _keyval_scalar(v: Any, name: str) -> str:
    """A keyval leaf, or QEMU's error for a dict/list where a scalar is expected."""
    if isinstance(v, dict | list):
        raise KeyvalError(f"Parameters '{name}.*' are unexpected")
    if not isinstance(v, str):
        raise _type_error(name, "string")
    return v


def to_bool(v: Any, name: str, *, from_json: bool = False) -> bool:
    """Convert an option value to ``bool`` as QAPI does.

    keyval: exactly ``on``/``yes``/``true``/``y`` or ``off``/``no``/``false``/``n``
    (case-sensitive), else ``Parameter 'NAME' expects 'on' or 'off'``.
    JSON: must be ``true``/``false``, else ``Invalid parameter type for 'NAME',
    expected: boolean``.
    """
    if from_json:
        if not isinstance(v, bool):
            raise _type_error(name, "boolean")
        return v
    s = _keyval_scalar(v, name)
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise KeyvalError(f"Parameter '{name}' expects 'on' or 'off'")


def _strtoint(text: str, signed: bool) -> int | None:
    """C ``strtoll``/``strtoull`` with base 0 over the whole string; None on error.

    Leading white space and a sign are allowed; ``0x`` means hex and a leading
    ``0`` octal.  For ``unsigned``, a negative number wraps modulo 2**64 like
    ``strtoull``.  Out-of-range values are errors (ERANGE).
    """
    i = 0
    n = len(text)
    while i < n and text[i] in _C_SPACE:
        i += 1
    neg = False
    if i < n and text[i] in "+-":
        neg = text[i] == "-"
        i += 1
    digits = text[i:]
    if digits[:2] in ("0x", "0X") and digits[2:3] and digits[2] in "0123456789abcdefABCDEF":
        base, digits = 16, digits[2:]
        allowed = "0123456789abcdefABCDEF"
    elif digits[:1] == "0":
        base, allowed = 8, "01234567"
    else:
        base, allowed = 10, "0123456789"
    if not digits or any(c not in allowed for c in digits):
        return None
    mag = int(digits, base)
    if signed:
        val = -mag if neg else mag
        return val if _I64_MIN <= val <= _I64_MAX else None
    if mag > _U64_MAX:
        return None
    return (-mag) & _U64_MAX if neg else mag


def to_int(v: Any, name: str, type_: str = "int64", *, from_json: bool = False) -> int:
    """Convert an option value to an integer of QAPI type ``type_``.

    ``type_`` is one of ``int8`` ... ``int64``, ``uint8`` ... ``uint64``.

    keyval: C ``strtoll``/``strtoull`` base 0 (``0x`` hex, leading-``0`` octal,
    leading blanks and sign allowed, trailing garbage not); unsigned types accept
    negative numbers wrapped modulo 2**64, as QEMU does.  Unparsable or outside
    64 bits: ``Parameter 'NAME' expects integer``.
    JSON: signed types need a JSON integer within int64, else ``Invalid parameter
    type for 'NAME', expected: integer``; unsigned types need an integer within
    [-2**63, 2**64-1] (negatives wrap), else ``Parameter 'NAME' expects uint64``.
    Then, for types narrower than 64 bits, out of range gives ``Parameter 'NAME'
    expects uint16_t`` (resp. ``int32_t``, ...).
    """
    if type_ not in _INT_TYPES:
        raise ValueError(f"unknown integer type {type_!r}")
    lo, hi = _INT_TYPES[type_]
    signed = not type_.startswith("u")
    val: int | None
    if from_json:
        ok = isinstance(v, int) and not isinstance(v, bool)
        if signed:
            if not ok or not _I64_MIN <= v <= _I64_MAX:
                raise _type_error(name, "integer")
            val = v
        else:
            if not ok or not _I64_MIN <= v <= _U64_MAX:
                raise KeyvalError(f"Parameter '{name}' expects uint64")
            val = v & _U64_MAX
    else:
        val = _strtoint(_keyval_scalar(v, name), signed)
        if val is None:
            raise KeyvalError(f"Parameter '{name}' expects integer")
    if not lo <= val <= hi:
        raise KeyvalError(f"Parameter '{name}' expects {type_}_t")
    return val


def parse_size(text: str) -> int:
    """Parse a size like QEMU 7.2's ``qemu_strtosz``; raise ``ValueError`` if invalid.

    ``<integer>[.<fraction>][suffix]``: the integer part is decimal (a leading 0
    does *not* mean octal) or ``0x`` hex; suffixes ``B K M G T P E``
    (case-insensitive, powers of 1024, ``B`` = bytes = the default).  A fraction
    needs a suffix other than ``B`` and no exponent; the result is rounded to the
    nearest byte (halves up).  Hex cannot have a fraction; hex with a suffix is
    accepted with a deprecation warning.  Leading blanks and ``+`` are allowed,
    ``-`` is not; the result must fit in 64 bits.
    """
    bad = ValueError(f"invalid size {text!r}")
    n = len(text)
    i = 0
    while i < n and text[i] in _C_SPACE:
        i += 1
    if i < n and text[i] in "+-":
        if text[i] == "-":
            raise bad
        i += 1
    m = _DIGITS.match(text, i)
    if not m:
        raise bad
    val = int(m.group(0))
    pos = m.end()
    frac = 0  # 64-bit fixed-point fraction
    is_hex = False
    if val == 0 and text[pos : pos + 1] in ("x", "X"):
        hm = _HEXITS.match(text, pos + 1)
        if m.group(0) != "0" or not hm:
            raise bad  # strtoull stops before the 'x', which is then trailing garbage
        val = int(hm.group(0), 16)
        pos = hm.end()
        if text[pos : pos + 1] == ".":
            raise bad
        is_hex = True
    elif text[pos : pos + 1] == ".":
        fm = _FRACTION.match(text, pos)
        if fm and fm.group(2):
            raise bad
        if fm:
            frac = min(int(float("0." + fm.group(1)) * 2.0**64), _U64_MAX)
            pos = fm.end()
        else:
            pos += 1  # "1.k" is fine
    if val > _U64_MAX:
        raise bad
    c = text[pos : pos + 1].lower()
    if c and c in _SIZE_SUFFIXES:
        if is_hex:
            log.warning("Using a multiplier suffix on hex numbers is deprecated: %s", text)
        shift = _SIZE_SUFFIXES[c]
        pos += 1
    else:
        shift = 0
    if pos != n:
        raise bad
    if shift == 0:
        if frac:
            raise bad
        return val
    fpart = frac << shift
    total = (val << shift) + (fpart >> 64) + ((fpart >> 63) & 1)
    if total > _U64_MAX:
        raise bad
    return total


def to_size(v: Any, name: str, *, from_json: bool = False) -> int:
    """Convert an option value to a byte count (QAPI type ``size``).

    keyval: :func:`parse_size`, else ``Parameter 'NAME' expects size``.
    JSON: like ``uint64`` (a JSON integer; negatives wrap), else ``Parameter
    'NAME' expects uint64`` -- suffixed strings are *not* accepted in JSON.
    """
    if from_json:
        return to_int(v, name, "uint64", from_json=True)
    text = _keyval_scalar(v, name)
    try:
        return parse_size(text)
    except ValueError:
        raise KeyvalError(f"Parameter '{name}' expects size") from None


def to_str(v: Any, name: str, *, from_json: bool = False) -> str:
    """Return a string option value.

    keyval: a dict/list there gives ``Parameters 'NAME.*' are unexpected``.
    JSON: a non-string gives ``Invalid parameter type for 'NAME', expected: string``.
    """
    if from_json:
        if not isinstance(v, str):
            raise _type_error(name, "string")
        return v
    return _keyval_scalar(v, name)


def to_str_list(v: Any, name: str, *, from_json: bool = False) -> list[str]:
    """Accept a single string or a list of strings; always return a list.

    Covers ``iothread=io0``, ``iothread.0=io0,iothread.1=io1``, JSON ``"io0"``
    and ``["io0", "io1"]``.  A bad element gives the :func:`to_str` error for its
    full name (``iothread.1`` / ``iothread[1]``); anything else gives
    ``Invalid parameter type for 'NAME', expected: string or array``.
    """
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return [
            to_str(e, child_name(name, i, from_json=from_json), from_json=from_json)
            for i, e in enumerate(v)
        ]
    raise _type_error(name, "string or array")


def to_dict(v: Any, name: str) -> dict[str, Any]:
    """Return a nested-object option value (both modes).

    Else ``Invalid parameter type for 'NAME', expected: object``.
    """
    if not isinstance(v, dict):
        raise _type_error(name, "object")
    return v


# --------------------------------------------------------------------------------------
# Schema checks
# --------------------------------------------------------------------------------------


def check_keys(values: Mapping[str, Any], allowed: Iterable[str], what: str = "") -> None:
    """Reject members of ``values`` not in ``allowed``.

    ``what`` is the full name of the object being checked ('' for the option's top
    level, ``addr`` for its ``addr`` member, ...).  Error, for the first unknown
    key in order: ``Parameter 'WHAT.KEY' is unexpected``.
    """
    allowed_set = set(allowed)
    for key in values:
        if key not in allowed_set:
            raise KeyvalError(f"Parameter '{child_name(what, key)}' is unexpected")


def require(values: Mapping[str, Any], key: str, what: str = "") -> Any:
    """Return ``values[key]``, or raise ``Parameter 'WHAT.KEY' is missing``.

    ``what`` is as for :func:`check_keys`.  A JSON ``null`` counts as present.
    """
    if key not in values:
        raise KeyvalError(f"Parameter '{child_name(what, key)}' is missing")
    return values[key]
