"""What a QMP command handler uses: :class:`QmpError` and QAPI's argument checks.

Theory of operation
-------------------
A handler registered on :class:`~pyvhost_blk.qmp_dispatch.QmpDispatcher` receives the request's
``arguments`` object as a plain dict (already parsed from JSON, so values are typed) and answers
by returning a result or raising :class:`QmpError`.  The helpers below apply QAPI's rules for
JSON input and phrase their errors as qemu-storage-daemon 7.2 does:

* :func:`args_check` does the member checks (``Parameter 'x' is missing``, then
  ``Parameter 'y' is unexpected``);
* ``arg_str``/``arg_bool``/``arg_int``/``arg_str_list``/``arg_dict`` fetch one member, with an
  optional default, and convert it through the ``to_*`` converters of ``pyvhost_blk/keyval.py``
  (``from_json=True``: the JSON type must already be right), turning their
  :class:`~pyvhost_blk.keyval.KeyvalError` into :class:`QmpError`.

Threads: nothing here keeps state; the helpers run in whatever thread runs the handler (the
dispatcher's context, see ``pyvhost_blk/qmp_dispatch.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pyvhost_blk.keyval import KeyvalError, to_bool, to_int, to_str, to_str_list


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
