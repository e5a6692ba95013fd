"""systemd integration: socket activation (sd_listen_fds) and readiness (sd_notify).

Theory of operation
-------------------
*Socket activation.*  A service manager (systemd, ``systemd-socket-activate``) creates the
listening sockets itself, then starts us with them as fds 3, 4, ... and three variables:
``LISTEN_PID`` (the pid they are meant for), ``LISTEN_FDS`` (how many) and ``LISTEN_FDNAMES``
(``:``-separated names, from the socket unit's ``FileDescriptorName=``).  ``activation()``
reads them once, the first time it is called, exactly as sd_listen_fds(3) does: nothing is
passed unless ``LISTEN_PID`` is our pid; a malformed value, a name count that does not match,
or a fd that is not open is an error; the fds get ``FD_CLOEXEC``; the variables are removed from
the environment in every case (success or error) so a child never mistakes them for its own.
Unnamed fds get systemd's default name ``unknown``.  The result (or the error) is kept for the
life of the process: the variables are gone after the first call.

An export names its fd with ``addr.type=fd,addr.str=NAME`` (qemu-storage-daemon's
``addr.str`` takes a fd number or a monitor fd name; a name here is a ``LISTEN_FDNAMES`` name).
``ListenFds.take()`` resolves a name (or number) and marks the fd taken, so two exports cannot
adopt one fd; ``check_listener()`` makes sure it is a listening AF_UNIX stream socket
before the export adopts it.  ``leftovers()`` lists fds nobody took, for a warning: a socket
systemd listens on that no export serves would leave QEMU waiting forever.

*Readiness.*  ``notify()`` sends sd_notify(3) messages (``READY=1``, ``STATUS=...``,
``STOPPING=1``, ``MAINPID=...``) as one datagram to the AF_UNIX socket named by
``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket); without ``NOTIFY_SOCKET`` it
does nothing.  The variable is left in place (it is needed again for ``STOPPING=1``).  A send
that fails is logged and otherwise ignored: the service manager's problem is not the guest's.

Everything here runs in the main thread.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Iterator, MutableMapping

log = logging.getLogger("pyvhost_blk")

SD_LISTEN_FDS_START = 3
DEFAULT_NAME = "unknown"  # systemd's name for an fd without FileDescriptorName=


def is_number(text: str) -> bool:
    """Decimal ASCII digits only (str.isdigit alone takes '²', which int() refuses)."""
    return text.isascii() and text.isdigit()


class ActivationError(Exception):
    """Socket activation cannot be used as asked; the message is one line."""


class ListenFds:
    """The fds passed by the service manager: ``fds[name]`` or ``fds[index]`` → fd number."""

    def __init__(self, fds: list[int], names: list[str]) -> None:
        assert len(fds) == len(names)
        self.fds = fds
        self.names = names
        self.taken: set[int] = set()

    def __len__(self) -> int:
        return len(self.fds)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(self.names))

    def __contains__(self, key: object) -> bool:
        return key in self.names

    def __getitem__(self, key: str | int) -> int:
        """The fd with this name (it must be the only one), or the index-th fd (0 = fd 3)."""
        if isinstance(key, int):
            return self.fds[key]
        matches = [fd for fd, name in zip(self.fds, self.names, strict=True) if name == key]
        if not matches:
            raise KeyError(key)
        if len(matches) > 1:
            raise ActivationError(
                f"{len(matches)} socket-activation fds are named '{key}' "
                f"(fds {', '.join(map(str, matches))}): give each socket its own "
                "FileDescriptorName="
            )
        return matches[0]

    def as_dict(self) -> dict[str, int]:
        """name → fd (for a name given to several fds, the first)."""
        out: dict[str, int] = {}
        for fd, name in zip(self.fds, self.names, strict=True):
            out.setdefault(name, fd)
        return out

    def take(self, key: str) -> int:
        """The fd an export's ``addr.str`` means: a number is that fd (inherited any way, as
        before socket activation existed); anything else is a ``LISTEN_FDNAMES`` name.  The
        fd is marked taken; taking it twice is an error."""
        if is_number(key):
            fd = int(key)
        else:
            if key not in self:
                passed = ", ".join(f"'{n}'" for n in self) if self.fds else ""
                raise ActivationError(
                    f"no socket-activation fd is named '{key}' "
                    + (f"(LISTEN_FDNAMES has {passed})" if passed
                       else "(no LISTEN_FDS were passed to this process)")
                )
            fd = self[key]
        if fd in self.taken:
            raise ActivationError(f"fd {fd} is already used by another export")
        self.taken.add(fd)
        return fd

    def untaken(self) -> list[tuple[str, int]]:
        return [(n, fd) for fd, n in zip(self.fds, self.names, strict=True)
                if fd not in self.taken]


def listen_fds(environ: MutableMapping[str, str] | None = None,
               pid: int | None = None) -> ListenFds:
    """Parse ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES`` like sd_listen_fds_with_names(3)
    with ``unset_environment`` true.  Raises ActivationError."""
    env = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    try:
        return _parse(env, pid)
    finally:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)


def _parse(env: MutableMapping[str, str], pid: int) -> ListenFds:
    pid_text = env.get("LISTEN_PID")
    if pid_text is None:
        return ListenFds([], [])
    if not is_number(pid_text) or int(pid_text) <= 0:
        raise ActivationError(f"LISTEN_PID={pid_text} is not a process id")
    if int(pid_text) != pid:
        return ListenFds([], [])  # meant for the process that started us
    n_text = env.get("LISTEN_FDS")
    if n_text is None:
        return ListenFds([], [])
    if not is_number(n_text):
        raise ActivationError(f"LISTEN_FDS={n_text} is not a number of fds")
    if int(n_text) == 0:
        return ListenFds([], [])
    if int(n_text) > os.sysconf("SC_OPEN_MAX"):
        raise ActivationError(f"LISTEN_FDS={n_text} is more fds than a process can have")
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(n_text)))
    names_text = env.get("LISTEN_FDNAMES")
    names = names_text.split(":") if names_text is not None else [DEFAULT_NAME] * len(fds)
    if len(names) != len(fds):
        raise ActivationError(
            f"LISTEN_FDNAMES={names_text} names {len(names)} fds but LISTEN_FDS={n_text}"
        )
    for fd in fds:
        try:
            os.set_inheritable(fd, False)  # FD_CLOEXEC, as sd_listen_fds does
        except OSError as e:
            if e.errno == errno.EBADF:
                raise ActivationError(
                    f"LISTEN_FDS={n_text} but fd {fd} is not open (fds start at "
                    f"{SD_LISTEN_FDS_START})"
                ) from None
            raise ActivationError(f"LISTEN_FDS: fd {fd}: {e.strerror}") from None
    return ListenFds(fds, names)


_activation: ListenFds | ActivationError | None = None


def activation() -> ListenFds:
    """This process's socket-activation fds, parsed (and the variables removed) on the first
    call.  Raises ActivationError, on every call, if the variables were unusable."""
    global _activation
    if _activation is None:
        try:
            _activation = listen_fds()
        except ActivationError as e:
            _activation = e
    if isinstance(_activation, ActivationError):
        raise _activation
    return _activation


def leftovers() -> list[str]:
    """Warnings for socket-activation fds that no export took (call once exports exist)."""
    try:
        act = activation()
    except ActivationError:
        return []  # reported as an error where it mattered
    return [f"socket-activation fd {fd} ('{name}') is not used by any export: connections "
            f"to it will wait forever (use addr.type=fd,addr.str={name})"
            for name, fd in act.untaken()]


def check_listener(fd: int, what: str) -> None:
    """Raise ActivationError unless ``fd`` is a listening AF_UNIX stream socket (what a
    vhost-user-blk export serves on); ``what`` names it in the message."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ActivationError(f"{what}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ActivationError(f"{what} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX:
            raise ActivationError(f"{what} is not a unix socket (vhost-user needs AF_UNIX)")
        if sock.type != socket.SOCK_STREAM:
            raise ActivationError(f"{what} is not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(
                f"{what} is a socket that does not listen (a socket unit with Accept=yes "
                "passes connections; pyvhost-blk needs Accept=no)"
            )
    finally:
        sock.detach()  # the fd stays open for the export to adopt


# -- sd_notify ------------------------------------------------------------------------------
def notify_address(environ: MutableMapping[str, str] | None = None) -> str | None:
    """``NOTIFY_SOCKET`` as an AF_UNIX address (``@x`` → abstract ``\\0x``), or None."""
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    raise ValueError(f"NOTIFY_SOCKET={addr} is neither an absolute path nor an @abstract name")


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` fields (one datagram, one field per line) to the service manager.
    Returns True if sent, False without ``NOTIFY_SOCKET`` or if sending failed (logged)."""
    try:
        addr = notify_address()
    except ValueError as e:
        log.warning("sd_notify: %s", e)
        return False
    if addr is None:
        return False
    message = "\n".join(f.replace("\n", " ") for f in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(message, addr)
    except OSError as e:
        log.warning("sd_notify to %s failed: %s", addr.replace("\0", "@"), e.strerror or e)
        return False
    return True
