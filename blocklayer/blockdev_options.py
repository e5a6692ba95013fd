"""Option converters shared by blockdev_add and the drivers (QAPI enum semantics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blocklayer.qapi import KeyvalError, to_str


def enum_of(*choices: str) -> Callable[..., str]:
    """A converter accepting one of ``choices`` (QAPI enums are strings in both syntaxes)."""

    def conv(v: Any, name: str, *, from_json: bool = False) -> str:
        s = to_str(v, name, from_json=from_json)
        if s not in choices:
            raise KeyvalError(f"Parameter '{name}' does not accept value '{s}'")
        return s

    return conv
