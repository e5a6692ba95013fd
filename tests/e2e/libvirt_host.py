"""Debian's libvirt for the end-to-end tests: its daemons, virsh, and a domain's serial console.

``LibvirtHost.start()`` uses the system libvirt (``qemu:///system``, configured as Debian ships
it: nothing under /etc is changed).  A daemon whose socket answers is used and left running;
a missing one (``virtlogd``: libvirtd hands QEMU's output to it; ``libvirtd``) is started in
the foreground as a child of the test and stopped by ``stop()``.  No systemd is needed.
Anything that keeps libvirt from working raises LibvirtError with the reason and the daemons'
log.

``ConsoleGuest`` drives the test guest's shell (see ``guest.py``) over a serial port that
libvirt exposes as a UNIX socket (``<serial type='unix'><source mode='bind'>``), with
``Guest``'s ``run()``/``run_ok()``/``wait_for()``.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from tests.e2e.guest import READY_MARKER, Guest, GuestError, default_boot_timeout

URI = "qemu:///system"
RUN_DIR = Path("/run/libvirt")
LIBVIRTD_SOCK = RUN_DIR / "libvirt-sock"
VIRTLOGD_SOCK = RUN_DIR / "virtlogd-sock"
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU_USER = "libvirt-qemu"  # Debian's qemu.conf default user and group
INSTALL_HINT = "apt-get install libvirt-daemon-system libvirt-clients qemu-system-x86"


class LibvirtError(RuntimeError):
    """libvirt cannot run here, or a virsh command failed."""


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def virsh(*args: str, timeout: float = 60, check: bool = True) -> str:
    """Run ``virsh -c qemu:///system ARGS``; its stdout.  LibvirtError if it fails or hangs."""
    cmd = ["virsh", "-c", URI, *args]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LibvirtError(f"'{' '.join(cmd)}' did not finish within {timeout} s") from None
    if check and r.returncode != 0:
        raise LibvirtError(f"'{' '.join(cmd)}' failed (exit {r.returncode}): "
                           f"{r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def qemu_log(domain: str, lines: int = 15) -> str:
    """The tail of libvirt's log of the domain's QEMU (its command line and errors)."""
    try:
        text = (QEMU_LOG_DIR / f"{domain}.log").read_text(errors="replace")
    except OSError as e:
        return f"(no QEMU log: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def qemu_pid(domain: str) -> int:
    """The pid of a running domain's QEMU (libvirt's pid file)."""
    return int((RUN_DIR / "qemu" / f"{domain}.pid").read_text().strip())


class LibvirtHost:
    """The system libvirt daemons: reused if running, else started (and later stopped) here."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, TextIO] = {}
        self.reused = False

    def start(self, timeout: float = 30) -> None:
        for tool in ("virsh", "libvirtd", "virtlogd"):
            if shutil.which(tool) is None:
                raise LibvirtError(f"{tool} not found; {INSTALL_HINT}")
        try:
            pwd.getpwnam(QEMU_USER)
        except KeyError:
            raise LibvirtError(f"user {QEMU_USER} (libvirt's QEMU user) does not exist; "
                               f"{INSTALL_HINT}") from None
        # libvirtd hands each QEMU's stdout/stderr to virtlogd (qemu.conf stdio_handler "logd"):
        # without it a domain does not start.
        if not _answers(VIRTLOGD_SOCK):
            self._spawn("virtlogd")
            self._wait_for(lambda: _answers(VIRTLOGD_SOCK), "virtlogd", timeout)
        if _answers(LIBVIRTD_SOCK):
            self.reused = True
        else:
            self._spawn("libvirtd")
        self._wait_ready(timeout)

    def _spawn(self, name: str) -> None:
        log = open(self.workdir / f"{name}.log", "w")
        self._logs[name] = log
        # Foreground (no --daemon): the process is ours to stop.
        self.procs[name] = subprocess.Popen([name], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self, name: str) -> str:
        try:
            return (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def diagnostics(self) -> str:
        return "".join(f"\n--- {name} log ---\n{self.log(name)}" for name in self.procs)

    def _wait_for(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise LibvirtError(f"{name} exited with status {p.returncode} at start"
                                       + self.diagnostics())
            if time.monotonic() > deadline:
                raise LibvirtError(f"{what} did not come up within {timeout} s"
                                   + self.diagnostics())
            time.sleep(0.2)

    def _wait_ready(self, timeout: float) -> None:
        # "virsh uri" opens a connection and nothing more; "version" would also wait for QEMU's
        # capabilities, which libvirt probes again on every use while /dev/kvm is not usable
        # by libvirt-qemu (a few seconds each: define and start pay it anyway).
        def ready() -> bool:
            try:
                virsh("uri", timeout=10)
            except LibvirtError:
                return False
            return True

        what = "the running libvirtd" if self.reused else "libvirtd"
        self._wait_for(ready, f"{what} (virsh -c {URI} uri)", timeout)

    def stop(self) -> None:
        """Stop the daemons started here (libvirtd first), SIGTERM then SIGKILL."""
        for name in ("libvirtd", "virtlogd"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self._logs.values():
            log.close()


class ConsoleGuest(Guest):
    """The test guest's shell on a serial port that is a UNIX socket (libvirt's QEMU listens,
    we connect).  ``Guest.__init__`` is not called (it would start a QEMU of its own): this sets
    up only the console state its ``run()``/``wait_for()`` use; the console is read here.
    QEMU belongs to libvirt: ``virsh destroy`` stops it (``poweroff()``/``wait_exit()``, which
    wait for a QEMU process of Guest's own, do not apply)."""

    def __init__(self, path: str, domain: str, log_path: Path | None = None,
                 connect_timeout: float = 30) -> None:
        self.socket_path = None
        self.proc = None
        self.domain = domain
        self._buf = ""
        self._cond = threading.Condition()
        self._eof = False
        self._seq = 0
        self._write_lock = threading.Lock()
        self._log_file = open(log_path, "a", encoding="utf-8") if log_path else None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._sock.connect(path)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise GuestError(f"cannot connect to the serial console {path}: {e}\n"
                                     f"--- QEMU log ---\n{qemu_log(domain)}") from None
                time.sleep(0.2)
        self._reader = threading.Thread(target=self._read_console, daemon=True,
                                        name=f"console-{domain}")
        self._reader.start()

    def wait_ready(self, timeout: float | None = None) -> float:
        """Wait for the guest's shell; returns the seconds it took."""
        t0 = time.monotonic()
        bt = default_boot_timeout() if timeout is None else timeout
        self.wait_for(re.escape(READY_MARKER), timeout=bt)
        status, out = self.run("echo shell-ok", timeout=max(30.0, bt / 4))
        if status != 0 or "shell-ok" not in out:
            raise GuestError(f"guest shell does not answer properly: {status} {out!r}")
        return time.monotonic() - t0

    def _console_read(self) -> bytes:
        try:
            return self._sock.recv(65536)
        except OSError:
            return b""

    def is_running(self) -> bool:
        with self._cond:
            return not self._eof

    def write(self, data: str) -> None:
        with self._write_lock:
            try:
                self._sock.sendall(data.encode())
            except OSError as exc:
                raise GuestError(f"cannot write to the guest console: {exc}\n"
                                 + self._diagnostics()) from None

    def qemu_stderr(self) -> str:
        return qemu_log(self.domain)

    def kill(self) -> None:
        """QEMU belongs to libvirt: ``virsh destroy`` stops it, not this object."""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._log_file is not None:
            self._log_file.close()


def qemu_user_ids() -> tuple[int, int]:
    """uid and gid libvirt runs QEMU as (qemu.conf's user and group, both libvirt-qemu)."""
    return pwd.getpwnam(QEMU_USER).pw_uid, grp.getgrnam(QEMU_USER).gr_gid


def open_files(pid: int) -> set[str]:
    """Paths a process has open (its /proc/PID/fd links)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                out.add(os.readlink(fd_dir / fd))
    return out
