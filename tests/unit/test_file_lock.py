"""ImageLock: QEMU 7.2 file-posix lock bytes, seen through /proc/locks and /proc/self/fdinfo.

Two ``open()``s of one image in this process are two open file descriptions, so their OFD
locks conflict exactly as two processes' would: that is how these tests play "another process".
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocklayer import file_lock
from blocklayer.file_lock import (
    LOCK_PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    PERM_WRITE_UNCHANGED,
    ImageLock,
    ImageLockError,
    perm_names,
)

CR, W, WU, RS = PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE
ALL = LOCK_PERM_ALL
NO_W = ALL & ~W


# -- helpers --------------------------------------------------------------------------------
def _ranges_to_bytes(ranges: list[tuple[int, int]]) -> set[int]:
    return {b for start, end in ranges for b in range(start, end + 1)}


def fd_locks(fd: int) -> list[str]:
    """The ``lock:`` lines the kernel lists for ``fd`` (its open file description)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return [line.split(":", 1)[1].strip() for line in f if line.startswith("lock:")]


def fd_bytes(fd: int) -> set[int]:
    """Bytes locked by ``fd``'s open file description; asserts they are shared OFD locks."""
    ranges = []
    for line in fd_locks(fd):
        fields = line.split()
        assert fields[1:4] == ["OFDLCK", "ADVISORY", "READ"], line
        ranges.append((int(fields[-2]), int(fields[-1])))
    return _ranges_to_bytes(ranges)


def proc_locks(path: str | Path) -> list[list[str]]:
    """/proc/locks lines (split, without the leading id) for the file at ``path``."""
    st = os.stat(path)
    out = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:  # a blocked waiter
                continue
            maj, mnr, ino = fields[5].split(":")
            if (int(ino) == st.st_ino and int(maj, 16) == os.major(st.st_dev)
                    and int(mnr, 16) == os.minor(st.st_dev)):
                out.append(fields[1:])
    return out


def ofd_lock(fd: int, off: int, ltype: int = fcntl.F_RDLCK) -> None:
    """Lock byte ``off`` behind ImageLock's back (a process that does not check)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi0q", ltype, 0, off, 1, 0))


def expected_bytes(perm: int, shared: int) -> set[int]:
    return ({100 + i for i in range(4) if perm & (1 << i)}
            | {200 + i for i in range(4) if not shared & (1 << i)})


@pytest.fixture
def img(tmp_path: Path) -> str:
    p = tmp_path / "disk.img"
    p.write_bytes(b"\0" * 65536)
    return str(p)


@pytest.fixture
def open_fd(img: str) -> Iterator:
    """open_fd(flags=O_RDWR) -> a new open file description of the image (closed at the end)."""
    fds: list[int] = []

    def opener(flags: int = os.O_RDWR) -> int:
        fd = os.open(img, flags | os.O_CLOEXEC)
        fds.append(fd)
        return fd

    yield opener
    for fd in fds:
        os.close(fd)


# -- lock bytes -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "perm,shared",
    [
        (CR | W, NO_W),        # a QEMU guest device, writable, no share-rw
        (CR | W, ALL),         # qemu-storage-daemon's writable export / share-rw=on
        (CR, ALL),             # a reader that shares everything
        (CR, CR | WU | RS),    # a read-only QEMU device
        (0, 0),                # shares nothing, holds nothing
        (ALL, 0),              # everything
        (0, ALL),              # nothing at all
    ],
)
def test_lock_bytes_match_perms(img: str, open_fd, perm: int, shared: int) -> None:
    fd = open_fd()
    lk = ImageLock(fd, img)
    lk.check_and_apply(perm, shared)
    assert lk.held == (perm, shared)
    assert fd_bytes(fd) == expected_bytes(perm, shared)
    # /proc/locks: one line per contiguous range, OFD, shared, no owning pid.
    lines = proc_locks(img)
    assert all(f[:4] == ["OFDLCK", "ADVISORY", "READ", "-1"] for f in lines), lines
    ranges = [(int(f[-2]), int(f[-1])) for f in lines]
    assert _ranges_to_bytes(ranges) == expected_bytes(perm, shared)
    lk.release()


def test_proc_locks_lines_for_a_writer(img: str, open_fd) -> None:
    lk = ImageLock(open_fd(), img)
    lk.check_and_apply(CR | W, NO_W)
    st = os.stat(img)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    assert sorted(proc_locks(img), key=lambda f: int(f[-2])) == [
        ["OFDLCK", "ADVISORY", "READ", "-1", dev, "100", "101"],
        ["OFDLCK", "ADVISORY", "READ", "-1", dev, "201", "201"],
    ]
    lk.release()


def test_read_only_fd_can_lock(img: str, open_fd) -> None:
    fd = open_fd(os.O_RDONLY)
    lk = ImageLock(fd, img)
    lk.check_and_apply(CR, CR | WU | RS)
    assert fd_bytes(fd) == {100, 201}


def test_bits_beyond_qemu72_are_ignored(img: str, open_fd) -> None:
    """QEMU 7.2 has no GRAPH_MOD (0x10): no byte 104/204; shared=0x1f means 'everything'."""
    fd = open_fd()
    lk = ImageLock(fd, img)
    lk.check_and_apply(CR | W | 0x10, 0x1F)
    assert fd_bytes(fd) == {100, 101}
    assert lk.held == (CR | W, ALL)


# -- conflicts ------------------------------------------------------------------------------
def test_writer_blocks_second_writer(img: str, open_fd) -> None:
    a = ImageLock(open_fd(), img)
    a.check_and_apply(CR | W, NO_W)
    fd_b = open_fd()
    b = ImageLock(fd_b, img)
    with pytest.raises(ImageLockError) as ei:
        b.check_and_apply(CR | W, ALL)
    e = ei.value
    assert str(e) == 'Failed to get "write" lock'
    assert e.hint == f"Is another process using the image [{img}]?"
    assert e.errno == errno.EAGAIN and isinstance(e, OSError)
    assert e.strerror == str(e) and e.filename is None and e.image == img
    assert fd_bytes(fd_b) == set() and b.held == (0, ALL)  # rolled back


def test_unsharing_blocked_by_writer(img: str, open_fd) -> None:
    a = ImageLock(open_fd(), img)
    a.check_and_apply(CR | W, ALL)  # a writer that shares everything (a qsd export)
    fd_b = open_fd()
    b = ImageLock(fd_b, img)
    with pytest.raises(ImageLockError) as ei:
        b.check_and_apply(CR, CR | WU | RS)  # a reader that does not share write
    assert str(ei.value) == 'Failed to get shared "write" lock'
    assert ei.value.hint == f"Is another process using the image [{img}]?"
    assert fd_bytes(fd_b) == set()


def test_share_rw_writers_coexist(img: str, open_fd) -> None:
    a = ImageLock(open_fd(), img)
    a.check_and_apply(CR | W, ALL)
    fd_b = open_fd()
    b = ImageLock(fd_b, img)
    b.check_and_apply(CR | W, ALL)
    assert fd_bytes(fd_b) == {100, 101}
    # a reader that shares everything fits too
    ImageLock(open_fd(os.O_RDONLY), img).check_and_apply(CR, ALL)


def test_reader_fits_next_to_unsharing_writer(img: str, open_fd) -> None:
    a = ImageLock(open_fd(), img)
    a.check_and_apply(CR | W, NO_W)
    ImageLock(open_fd(os.O_RDONLY), img).check_and_apply(CR, ALL)


def test_own_open_file_description_never_conflicts(img: str, open_fd) -> None:
    """F_OFD_GETLK ignores our own locks -- also through a dup(), which shares the OFD."""
    fd = open_fd()
    a = ImageLock(fd, img)
    a.check_and_apply(ALL, 0)  # every byte
    dup = os.dup(fd)
    try:
        ImageLock(dup, img).check_and_apply(ALL, 0)
    finally:
        os.close(dup)  # the OFD's locks stay: fd still refers to it
    assert fd_bytes(fd) == expected_bytes(ALL, 0)


def test_first_conflict_reported_wants_before_shares(img: str, open_fd) -> None:
    a = ImageLock(open_fd(), img)
    a.check_and_apply(ALL, 0)
    b = ImageLock(open_fd(), img)
    cases = [
        ((CR, ALL), 'Failed to get "consistent read" lock'),
        ((RS | WU, ALL), 'Failed to get "write unchanged" lock'),
        ((RS, ALL), 'Failed to get "resize" lock'),
        ((RS, 0), 'Failed to get "resize" lock'),
        ((0, 0), 'Failed to get shared "consistent read" lock'),
        ((0, ALL & ~RS), 'Failed to get shared "resize" lock'),
    ]
    for (perm, shared), msg in cases:
        with pytest.raises(ImageLockError) as ei:
            b.check_and_apply(perm, shared)
        assert str(ei.value) == msg, (perm, shared)
    b.check_and_apply(0, ALL)  # nothing wanted, everything shared: always fine


# -- two-phase update -----------------------------------------------------------------------
def test_update_two_phases(img: str, open_fd) -> None:
    fd = open_fd()
    lk = ImageLock(fd, img)
    lk.check_and_apply(CR, ALL)
    assert fd_bytes(fd) == {100}
    lk.update(CR | W, NO_W)  # read-only -> writable, unsharing write
    assert fd_bytes(fd) == {100, 101, 201} and lk.held == (CR | W, NO_W)
    # Phase 1 holds the union of old and new, phase 2 drops what is no longer needed.
    lk.prepare(CR | RS, ALL & ~RS)
    assert fd_bytes(fd) == {100, 101, 103, 201, 203}
    assert lk.held == (CR | W, NO_W)
    lk.commit(CR | RS, ALL & ~RS)
    assert fd_bytes(fd) == {100, 103, 203} and lk.held == (CR | RS, ALL & ~RS)
    lk.update(CR, ALL)
    assert fd_bytes(fd) == {100}


def test_prepare_then_abort_restores(img: str, open_fd) -> None:
    fd = open_fd()
    lk = ImageLock(fd, img)
    lk.check_and_apply(CR, ALL)
    lk.prepare(CR | W, NO_W)
    assert fd_bytes(fd) == {100, 101, 201}
    lk.abort()
    assert fd_bytes(fd) == {100} and lk.held == (CR, ALL)


def test_update_rolls_back_on_want_conflict(img: str, open_fd) -> None:
    fd_a, fd_b = open_fd(), open_fd()
    a = ImageLock(fd_a, img)
    a.check_and_apply(CR, NO_W)  # a reader that does not share write
    b = ImageLock(fd_b, img)
    b.check_and_apply(CR, ALL)
    with pytest.raises(ImageLockError, match='^Failed to get "write" lock$'):
        b.update(CR | W, ALL)
    assert fd_bytes(fd_b) == {100} and b.held == (CR, ALL)  # byte 101 taken, then dropped
    assert fd_bytes(fd_a) == {100, 201}


def test_update_rolls_back_on_share_conflict(img: str, open_fd) -> None:
    fd_a, fd_b = open_fd(), open_fd()
    a = ImageLock(fd_a, img)
    a.check_and_apply(CR | W, ALL)
    b = ImageLock(fd_b, img)
    b.check_and_apply(CR, ALL)
    with pytest.raises(ImageLockError, match='^Failed to get shared "write" lock$'):
        b.update(CR, NO_W)
    assert fd_bytes(fd_b) == {100} and b.held == (CR, ALL)


def test_dropping_permissions_is_never_checked(img: str, open_fd) -> None:
    """QEMU skips the check (and locks nothing) when a change only drops permissions or
    shares more -- even if someone else now holds a conflicting byte; a change that wants
    more re-checks *every* wanted permission, including ones already held."""
    fd = open_fd()
    lk = ImageLock(fd, img)
    lk.check_and_apply(CR | W, ALL)
    intruder = open_fd()  # someone who took byte 200 without checking
    ofd_lock(intruder, 200)
    lk.update(CR, ALL)  # drop write: fine, no check
    assert fd_bytes(fd) == {100}
    with pytest.raises(ImageLockError, match='^Failed to get "consistent read" lock$'):
        lk.update(CR | W, ALL)
    assert fd_bytes(fd) == {100} and lk.held == (CR, ALL)


def test_lock_byte_failure_message(img: str, open_fd) -> None:
    """A write lock held elsewhere makes taking the shared lock fail: QEMU's message then is
    'Failed to lock byte N', without the hint."""
    other = open_fd()
    ofd_lock(other, 101, fcntl.F_WRLCK)
    fd = open_fd()
    lk = ImageLock(fd, img)
    with pytest.raises(ImageLockError) as ei:
        lk.check_and_apply(CR | W, ALL)
    assert str(ei.value) == "Failed to lock byte 101"
    assert ei.value.hint is None
    assert fd_bytes(fd) == set()  # byte 100 was taken, then rolled back


# -- release, close, modes ------------------------------------------------------------------
def test_release(img: str, open_fd) -> None:
    fd = open_fd()
    lk = ImageLock(fd, img)
    lk.check_and_apply(ALL, 0)
    lk.release()
    assert fd_bytes(fd) == set() and proc_locks(img) == []
    assert lk.held == (0, ALL) and lk.locked == (0, 0)
    ImageLock(open_fd(), img).check_and_apply(ALL, 0)  # free for others now


def test_close_drops_locks(img: str) -> None:
    fd = os.open(img, os.O_RDWR)
    ImageLock(fd, img).check_and_apply(CR | W, NO_W)
    assert proc_locks(img)
    os.close(fd)
    assert proc_locks(img) == []


def test_mode_off_takes_nothing(img: str, open_fd) -> None:
    a = ImageLock(open_fd(), img)
    a.check_and_apply(ALL, 0)
    fd = open_fd()
    off = ImageLock(fd, img, mode="off")
    off.check_and_apply(ALL, 0)  # no check either
    off.update(CR | W, NO_W)
    assert fd_bytes(fd) == set() and off.held == (CR | W, NO_W)
    off.release()


def test_mode_on_and_auto_lock(img: str, open_fd) -> None:
    for mode in ("on", "auto"):
        fd = open_fd()
        lk = ImageLock(fd, img, mode=mode)
        lk.check_and_apply(CR, ALL)
        assert fd_bytes(fd) == {100} and lk.warning is None
        lk.release()


def test_bad_mode(img: str, open_fd) -> None:
    with pytest.raises(ValueError):
        ImageLock(open_fd(), img, mode="yes")


def test_without_ofd_locks(img: str, open_fd, monkeypatch, caplog) -> None:
    """No OFD locks: auto does not lock; on uses POSIX locks and warns as QEMU does."""
    monkeypatch.setattr(file_lock, "_has_ofd", False)
    fd = open_fd()
    auto = ImageLock(fd, img)
    auto.check_and_apply(CR | W, NO_W)
    assert proc_locks(img) == []
    with caplog.at_level(logging.WARNING, logger="pyvhost_blk.file_lock"):
        on = ImageLock(fd, img, mode="on")
    assert on.warning is not None
    assert "falling back to POSIX file locks" in caplog.text
    on.check_and_apply(CR | W, NO_W)
    lines = proc_locks(img)
    assert {tuple(f[:4]) for f in lines} == {("POSIX", "ADVISORY", "READ", str(os.getpid()))}
    on.release()
    assert proc_locks(img) == []


def test_ofd_probe() -> None:
    assert file_lock.ofd_lock_available() is True  # Linux >= 3.15


def test_perm_names() -> None:
    assert perm_names(CR | W) == "consistent read, write"
    assert perm_names(WU | RS) == "write unchanged, resize"
    assert perm_names(0) == ""
