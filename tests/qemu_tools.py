"""QEMU's own tools as judges of our output, for tests: one way to run them, and one message
saying how to install them when they are missing."""

from __future__ import annotations

import shutil
import subprocess

import pytest

INSTALL = "install QEMU's tools: 'apt-get install qemu-utils' (qemu-img, qemu-io)"


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``qemu-img ARGS``; with ``check``, a failure is an AssertionError with its output."""
    exe = shutil.which("qemu-img")
    if exe is None:
        pytest.fail(f"qemu-img not found: {INSTALL}")
    p = subprocess.run([exe, *args], capture_output=True, text=True)
    if check and p.returncode:
        raise AssertionError(f"qemu-img {' '.join(args)}: {p.stdout}{p.stderr}")
    return p
