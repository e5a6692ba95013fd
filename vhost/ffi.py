"""The compiled extension's ``ffi``/``lib``, re-exported, and the one place C failures become
Python exceptions.

If the extension is missing the package was not built: say how to build it.
"""

from __future__ import annotations

import os

try:
    from vhost._vhost_user import ffi, lib
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(
        "pyvhost-blk's C extension (vhost._vhost_user) is not built: run "
        "'scripts/setup.sh' (it builds it into the project's .venv)"
    ) from e

__all__ = ["ffi", "lib", "check_errno", "VhostError"]


class VhostError(OSError):
    """A failed C call, carrying its errno."""


def check_errno(ret: int, what: str) -> int:
    """Turn a negative-errno return (liburing/pthread style) into VhostError."""
    if ret < 0:
        raise VhostError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret
