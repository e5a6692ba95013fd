"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import shutil

import pytest

from tests.e2e.guest import INSTALL_HINT, GuestError, GuestImage, build_guest, qemu_binary


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The test guest (Debian kernel + busybox/fio initramfs), built once; a missing tool fails
    the test with how to install it."""
    for tool in ("qemu-img", "pyvhost-blk"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found; {INSTALL_HINT}", pytrace=False)
    try:
        qemu_binary()
        return build_guest()
    except GuestError as exc:
        pytest.fail(str(exc), pytrace=False)
