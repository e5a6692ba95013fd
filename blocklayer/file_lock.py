"""Image locking as QEMU 7.2's file-posix does it, so that we and QEMU see each other.

Theory of operation
-------------------
Each user of an image holds *permissions* (what it does to the image) and *shares* some of
them (what it lets others do at the same time).  QEMU 7.2 has four permission bits
(``BLK_PERM_*``; 7.2 has no GRAPH_MOD any more -- ``x-debug-query-block-graph`` lists
four permissions -- so ``BLK_PERM_ALL`` is 0x0f and there is no byte 104/204):

====  =================  ======================  =======================
bit   name               held -> shared lock on  not shared -> lock on
====  =================  ======================  =======================
0x01  consistent read    byte 100                byte 200
0x02  write              byte 101                byte 201
0x04  write unchanged    byte 102                byte 202
0x08  resize             byte 103                byte 203
====  =================  ======================  =======================

All locks are one-byte *shared* (read) **OFD** locks (``F_OFD_SETLK``) on the image's I/O fd;
nobody ever holds a write lock.  Contiguous bytes of one open file description show up merged
in ``/proc/locks`` (``OFDLCK ADVISORY READ -1 MAJ:MIN:INO 100 101``).  Conflicts are found
by *testing* (``F_OFD_GETLK``) for a write lock on a byte: the test reports any lock of another
open file description -- another process, or another ``open()`` of the same file in this
process -- but never our own (a ``dup()`` shares our open file description, so it does not
count as "another").  So:

* wanting permission *i* conflicts with a lock on byte 200+i held elsewhere
  (``Failed to get "write" lock``);
* not sharing permission *i* conflicts with a lock on byte 100+i held elsewhere
  (``Failed to get shared "write" lock``);

and QEMU adds the hint line ``Is another process using the image [FILENAME]?`` (FILENAME as
the user spelt it).  The first conflicting bit, in the order above (all "want" checks, then all
"share" checks), is the one reported.

A permission change is a transaction (QEMU's ``raw_handle_perm_lock``):

1. **prepare(perm, shared)** -- if the change only *drops* permissions or *adds* shares,
   nothing is locked or checked (it cannot conflict).  Otherwise lock the bytes of the *union*
   of the old and new state (old|new held, old|new unshared), *then* check the new state
   against everybody else.  Locking before checking means that of two processes racing for
   the same image, at least one sees the other (both may fail; they never both succeed).  On
   failure, go back to exactly the old bytes and raise :class:`ImageLockError`.
2. **commit(perm, shared)** -- lock exactly the new state's bytes and unlock the rest; this
   only unlocks, so it does not fail (an unlock error is logged as a warning, as QEMU does).
   **abort()** instead goes back to the committed state's bytes.

``update()`` is prepare + commit; ``check_and_apply()`` is the same thing named for the first
attachment (from the initial state "nothing held, everything shared").  Closing the fd (its
last duplicate) drops all its OFD locks; ``release()`` drops them while keeping the fd open.

``locking=auto`` locks when OFD locks are available (Linux >= 3.15: always here); ``on`` locks
anyway, falling back to process-wide POSIX locks with QEMU's warning; ``off`` takes and checks
nothing.  QEMU probes OFD support once, on ``/dev/null``.

Use: one ImageLock per open file description (a second one on a ``dup()`` would share and
then drop the first one's bytes).  The file driver creates it at open (holding nothing, as
QEMU's ``--blockdev`` alone locks nothing); whoever computes the node's cumulative permissions
(OR of the parents' ``perm``, AND of their ``shared``) calls ``update`` -- or ``prepare`` then
``commit``/``abort`` when several nodes change together; closing the fd drops everything.
If the driver ever replaces its fd (reopen read-only <-> read-write), QEMU locks the new fd
*without checking* (the old fd, another open file description, would conflict) before closing
the old one.

Threads: an ImageLock is used from the main loop only (permission changes are not I/O).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

from blocklayer.graph import (  # noqa: F401 - perm_names is part of this module's API
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    BLK_PERM_WRITE_UNCHANGED,
    PERM_NAMES,
    perm_names,
)

log = logging.getLogger("pyvhost_blk.file_lock")

# The permission bits are the block graph's (one definition, blocklayer/graph.py).
PERM_CONSISTENT_READ = BLK_PERM_CONSISTENT_READ
PERM_WRITE = BLK_PERM_WRITE
PERM_WRITE_UNCHANGED = BLK_PERM_WRITE_UNCHANGED
PERM_RESIZE = BLK_PERM_RESIZE
LOCK_PERM_ALL = BLK_PERM_ALL  # QEMU 7.2's BLK_PERM_ALL: the bits that have lock bytes

RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200

_BITS = tuple(1 << i for i in range(LOCK_PERM_ALL.bit_length()))

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
# ("0q" pads the tail to off_t alignment, as the C struct is).
_FLOCK = struct.Struct("hhqqi0q")

_OFD_FALLBACK_WARNING = (
    "warning: File lock requested but OFD locking syscall is unavailable, "
    "falling back to POSIX file locks\n"
    "Due to the implementation, locks can be lost unexpectedly."
)

_has_ofd: bool | None = None


def ofd_lock_available() -> bool:
    """Whether the kernel has OFD locks (probed once on /dev/null, as QEMU does)."""
    global _has_ofd
    if _has_ofd is None:
        try:
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            _has_ofd = False
            return _has_ofd
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
            _has_ofd = True
        except (OSError, AttributeError):
            _has_ofd = False
        finally:
            os.close(fd)
    return _has_ofd


class ImageLockError(OSError):
    """Locking or a lock check failed.

    ``str(e)`` is QEMU's message line (e.g. ``Failed to get "write" lock``); ``e.hint`` is
    QEMU's hint line ``Is another process using the image [FILENAME]?`` for conflicts found by
    the check, None for failures to lock a byte (QEMU prints no hint for those).  ``e.errno``
    is EAGAIN for a conflict, else the fcntl error; ``e.strerror`` is the message too, and
    ``e.filename`` is left None on purpose, so that code printing ``OSError`` as
    ``filename: strerror`` prints QEMU's line unchanged (the image is in the hint, and in
    ``e.image``).
    """

    def __init__(self, message: str, image: str, err: int = errno.EAGAIN,
                 hint: str | None = None) -> None:
        super().__init__(err, message)
        self.message = message
        self.image = image
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ImageLock:
    """The lock bytes of one image fd (see the module docstring).

    ``ImageLock(fd, filename, mode)``: ``fd`` is the file driver's I/O fd (O_RDONLY is fine:
    only read locks are taken), ``filename`` is used in messages, ``mode`` is the ``locking``
    option (``auto``, ``on``, ``off``).  Initially nothing is held and everything is shared.
    """

    def __init__(self, fd: int, filename: str, mode: str = "auto") -> None:
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"locking: invalid value '{mode}'")
        self.fd = fd
        self.filename = filename
        self.mode = mode
        self.warning: str | None = None  # QEMU's warning text, if locking=on fell back
        ofd = ofd_lock_available()
        if mode == "off":
            self.enabled = False
        elif mode == "on":
            self.enabled = True
            if not ofd:
                self.warning = _OFD_FALLBACK_WARNING
                log.warning("%s", _OFD_FALLBACK_WARNING)
        else:
            self.enabled = ofd
        self._setlk = fcntl.F_OFD_SETLK if ofd else fcntl.F_SETLK
        self._getlk = fcntl.F_OFD_GETLK if ofd else fcntl.F_GETLK
        self._perm = 0  # committed state (QEMU's s->perm, s->shared_perm)
        self._shared = LOCK_PERM_ALL
        self._locked_perm = 0  # bits whose byte 100+i / 200+i we hold
        self._locked_unshared = 0

    # -- public API ---------------------------------------------------------------------
    @property
    def held(self) -> tuple[int, int]:
        """The committed ``(perm, shared)`` (masked to QEMU 7.2's four bits)."""
        return self._perm, self._shared

    @property
    def locked(self) -> tuple[int, int]:
        """``(perm bits, unshared bits)`` whose bytes (100+i, 200+i) we hold right now."""
        return self._locked_perm, self._locked_unshared

    def check_and_apply(self, perm: int, shared: int) -> None:
        """Take ``perm`` while sharing only ``shared``: check for conflicts, then lock.

        Raises ImageLockError (nothing changed) on a conflict."""
        self.update(perm, shared)

    def update(self, perm: int, shared: int) -> None:
        """Change to ``(perm, shared)`` in two phases: prepare (lock the union, check) then
        commit (drop what is no longer needed).  On failure the old locks are restored and
        ImageLockError is raised."""
        self.prepare(perm, shared)
        self.commit(perm, shared)

    def prepare(self, perm: int, shared: int) -> None:
        """Phase 1 (QEMU's RAW_PL_PREPARE, ``bdrv_check_perm``).  After success, call
        ``commit`` with the same arguments or ``abort``; after failure, nothing to undo."""
        if not self.enabled:
            return
        perm &= LOCK_PERM_ALL
        shared &= LOCK_PERM_ALL
        if (self._perm | perm) == self._perm and (self._shared & shared) == self._shared:
            return  # only unlocking ahead: cannot conflict, so QEMU does not check
        try:
            self._apply(self._perm | perm, ~self._shared | ~shared, unlock=False)
            self._check(perm, shared)
        except ImageLockError:
            self.abort()
            raise

    def commit(self, perm: int, shared: int) -> None:
        """Phase 2 (QEMU's RAW_PL_COMMIT, ``bdrv_set_perm``): hold exactly the bytes of
        ``(perm, shared)``.  Only unlocks; never raises."""
        perm &= LOCK_PERM_ALL
        shared &= LOCK_PERM_ALL
        if self.enabled:
            self._apply_quietly(perm, ~shared)
        self._perm, self._shared = perm, shared

    def abort(self) -> None:
        """Undo a successful ``prepare`` (QEMU's RAW_PL_ABORT): back to the committed bytes."""
        if self.enabled:
            self._apply_quietly(self._perm, ~self._shared)

    def release(self) -> None:
        """Drop every lock byte (nothing held, everything shared); the fd stays open."""
        self.commit(0, LOCK_PERM_ALL)

    # -- QEMU's raw_apply_lock_bytes / raw_check_lock_bytes ----------------------------------
    def _apply(self, perm_bits: int, unshared_bits: int, unlock: bool) -> None:
        """Lock byte 100+i for bits in ``perm_bits`` and 200+i for bits in ``unshared_bits``
        that are not locked yet; with ``unlock``, also unlock the other locked bytes.
        Stops at the first failure (the bookkeeping stays exact)."""
        for base, want, attr in ((RAW_LOCK_PERM_BASE, perm_bits, "_locked_perm"),
                                 (RAW_LOCK_SHARED_BASE, unshared_bits, "_locked_unshared")):
            for i, bit in enumerate(_BITS):
                locked = getattr(self, attr)
                off = base + i
                if want & bit and not locked & bit:
                    try:
                        self._fcntl(self._setlk, fcntl.F_RDLCK, off)
                    except OSError as e:
                        raise ImageLockError(f"Failed to lock byte {off}", self.filename,
                                             e.errno or errno.EIO) from None
                    setattr(self, attr, locked | bit)
                elif unlock and locked & bit and not want & bit:
                    try:
                        self._fcntl(self._setlk, fcntl.F_UNLCK, off)
                    except OSError as e:
                        raise ImageLockError(f"Failed to unlock byte {off}", self.filename,
                                             e.errno or errno.EIO) from None
                    setattr(self, attr, locked & ~bit)

    def _apply_quietly(self, perm_bits: int, unshared_bits: int) -> None:
        try:
            self._apply(perm_bits, unshared_bits, unlock=True)
        except ImageLockError as e:  # QEMU: warn_report_err, carry on
            log.warning("warning: %s", e)

    def _check(self, perm: int, shared: int) -> None:
        hint = f"Is another process using the image [{self.filename}]?"
        for base, bits, fmt in ((RAW_LOCK_SHARED_BASE, perm, 'Failed to get "{}" lock'),
                                (RAW_LOCK_PERM_BASE, ~shared,
                                 'Failed to get shared "{}" lock')):
            for i, bit in enumerate(_BITS):
                if not bits & bit:
                    continue
                try:
                    conflict = self._test(base + i)
                    err = errno.EAGAIN
                except OSError as e:
                    conflict, err = True, e.errno or errno.EIO
                if conflict:
                    raise ImageLockError(fmt.format(PERM_NAMES[bit]), self.filename, err, hint)

    def _test(self, off: int) -> bool:
        """Would a write lock on byte ``off`` conflict with someone else's lock?"""
        res = self._fcntl(self._getlk, fcntl.F_WRLCK, off)
        return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK

    def _fcntl(self, cmd: int, ltype: int, off: int) -> bytes:
        return fcntl.fcntl(self.fd, cmd, _FLOCK.pack(ltype, os.SEEK_SET, off, 1, 0))
