"""Boot a tiny Linux test guest in QEMU with a vhost-user-blk disk and drive it.

The guest (Debian kernel + busybox/fio initramfs) is built by
``qemu-configs/build-guest.sh``; see ``qemu-configs/README.md``.  Typical use::

    image = build_guest()
    with Guest(sock_path, num_queues=2, image=image) as g:
        status, out = g.run("cat /sys/block/vda/size")
        g.poweroff()

The serial console (ttyS0) is connected to QEMU's stdin/stdout through pipes;
a reader thread collects everything the guest prints (``console_log()``,
``wait_for()``).  ``run()`` executes each command in a subshell of the guest's
interactive root shell (so ``cd``/variables do not persist between calls, a
syntax error or ``exit`` cannot kill the shell) with stdin from /dev/null;
stdout and stderr are merged.  The guest also prints ``VDA-SIZE <sectors>``
on its console whenever /sys/block/vda/size changes (initial value included)
and ``VDA-GONE`` if the disk disappears; such lines are removed from
``run()`` output but stay in ``console_log()``.

Environment variables:

``PYVHOST_BLK_QEMU``
    QEMU system emulator binary (default ``qemu-system-x86_64``).
``PYVHOST_BLK_ACCEL``
    ``kvm`` or ``tcg``: force the accelerator.  Default: probe once per process
    whether a KVM guest really boots (nested KVM may hang), else use TCG.
``PYVHOST_BLK_KVM_PROBE_TIMEOUT``
    Seconds the KVM probe waits for the guest to come up (default 20).
``PYVHOST_BLK_BOOT_TIMEOUT``
    Seconds to wait for the guest's ready marker (default 120).
``PYVHOST_BLK_TIMEOUT_SCALE``
    Multiplier applied to every timeout (boot, run, wait_for, poweroff), for
    slow machines (default 1).
``PYVHOST_BLK_GUEST_KERNEL`` / ``PYVHOST_BLK_GUEST_INITRD``
    Use these prebuilt images instead of running build-guest.sh (both needed).
``PYVHOST_BLK_CACHE``
    Cache directory of build-guest.sh (default ``~/.cache/pyvhost-blk``).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "qemu-configs" / "build-guest.sh"
READY_MARKER = "PYVHOST-GUEST-READY"
INSTALL_HINT = (
    "run scripts/install-deps.sh (as root) to install QEMU, qemu-storage-daemon, "
    "fio, busybox-static and the other test dependencies"
)
DEFAULT_APPEND = "console=ttyS0 quiet panic=-1"

# Longest command (after escaping) sent as one console line; longer commands
# are uploaded to a file in chunks first (busybox line editing has a limit).
_MAX_LINE = 480
_WATCHER_LINE = re.compile(r"^(?:VDA-SIZE \d+|VDA-GONE)\n", re.MULTILINE)


class GuestError(RuntimeError):
    """QEMU or the guest failed (did not start, died, bad output)."""


class GuestTimeout(GuestError, TimeoutError):
    """The guest did not produce the expected console output in time."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


# --------------------------------------------------------------------- config


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def timeout_scale() -> float:
    return _env_float("PYVHOST_BLK_TIMEOUT_SCALE", 1.0)


def default_boot_timeout() -> float:
    return _env_float("PYVHOST_BLK_BOOT_TIMEOUT", 120.0)


def qemu_binary() -> str:
    """Path of the QEMU system emulator; raises GuestError if it is missing."""
    name = os.environ.get("PYVHOST_BLK_QEMU", "").strip() or "qemu-system-x86_64"
    path = shutil.which(name)
    if path is None:
        raise GuestError(f"QEMU binary {name!r} not found; {INSTALL_HINT}")
    return path


# --------------------------------------------------------------------- build


def build_guest() -> GuestImage:
    """Build (or reuse from the cache) the guest kernel and initramfs."""
    kernel_env = os.environ.get("PYVHOST_BLK_GUEST_KERNEL", "").strip()
    initrd_env = os.environ.get("PYVHOST_BLK_GUEST_INITRD", "").strip()
    if kernel_env or initrd_env:
        if not (kernel_env and initrd_env):
            raise GuestError("set both PYVHOST_BLK_GUEST_KERNEL and PYVHOST_BLK_GUEST_INITRD")
        image = GuestImage(Path(kernel_env), Path(initrd_env))
        for p in (image.kernel, image.initrd):
            if not p.is_file():
                raise GuestError(f"guest image {p} does not exist")
        return image

    if not BUILD_SCRIPT.is_file():
        raise GuestError(f"guest build script {BUILD_SCRIPT} is missing")
    missing = [
        t
        for t in ("bash", "busybox", "fio", "cpio", "gzip", "dpkg", "apt-get")
        if shutil.which(t) is None
    ]
    if missing:
        raise GuestError(
            f"cannot build the test guest, missing: {', '.join(missing)}; {INSTALL_HINT}"
        )
    try:
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"{BUILD_SCRIPT} timed out after {exc.timeout} s") from None
    if proc.returncode != 0:
        raise GuestError(
            f"{BUILD_SCRIPT} failed (exit {proc.returncode}); {INSTALL_HINT}\n"
            f"--- stderr ---\n{proc.stderr[-4000:]}"
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if len(lines) < 2:
        raise GuestError(f"unexpected output from {BUILD_SCRIPT}: {proc.stdout!r}")
    image = GuestImage(Path(lines[-2]), Path(lines[-1]))
    for p in (image.kernel, image.initrd):
        if not p.is_file():
            raise GuestError(f"{BUILD_SCRIPT} reported {p}, which does not exist")
    return image


# --------------------------------------------------------------------- accel

_kvm_usable: bool | None = None
_kvm_lock = threading.Lock()


def kvm_usable() -> bool:
    """Whether a KVM guest really boots here (probed once per process).

    ``PYVHOST_BLK_ACCEL=kvm|tcg`` overrides the probe.
    """
    global _kvm_usable
    forced = os.environ.get("PYVHOST_BLK_ACCEL", "").strip().lower()
    if forced == "kvm":
        return True
    if forced == "tcg":
        return False
    if forced:
        raise ValueError(f"PYVHOST_BLK_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
    with _kvm_lock:
        if _kvm_usable is None:
            _kvm_usable = _probe_kvm()
        return _kvm_usable


def _probe_kvm() -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    timeout = _env_float("PYVHOST_BLK_KVM_PROBE_TIMEOUT", 20.0)
    try:
        with Guest(None, smp=1, mem="256M", accel="kvm", boot_timeout=timeout, qmp=False) as g:
            status, out = g.run("echo kvm-ok", timeout=timeout)
            return status == 0 and "kvm-ok" in out
    except GuestError:
        return False


def default_accel() -> str:
    return "kvm" if kvm_usable() else "tcg"


# --------------------------------------------------------------------- guest


def _qemu_opt(value: str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return value.replace(",", ",,")


def _shell_printf_format(text: str) -> str:
    """Encode text as a single-quoted printf(1) format that prints it verbatim.

    Only printable ASCII passes through unchanged; everything else (newlines,
    tabs, control characters, non-ASCII bytes) becomes an octal escape, so the
    result is one safe console line.
    """
    out = []
    for byte in text.encode():
        ch = chr(byte)
        if ch == "%":
            out.append("%%")
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "'":
            out.append("'\\''")
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return "'" + "".join(out) + "'"


class Guest:
    """A running QEMU guest; a context manager (``__exit__`` kills QEMU).

    QEMU is started by the constructor, which returns once the guest's shell
    is ready (or raises GuestError/GuestTimeout with the console tail).
    ``socket_path=None`` boots without a vhost-user disk.  ``image`` defaults
    to ``build_guest()``, ``accel`` to ``default_accel()``; ``append`` is added
    to the kernel command line; ``log_path`` gets a copy of the console output;
    ``qmp=True`` provides QEMU's QMP socket at ``qmp_path`` (see ``qmp()``).
    ``incoming="unix:PATH"`` starts a migration destination instead: QEMU waits for the
    guest's state and the constructor returns at once (``run()`` works once it arrived).
    The console log includes the echo of the commands sent by ``run()``, so
    ``wait_for()`` patterns should not occur in commands you send.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None,
        num_queues: int = 1,
        smp: int = 2,
        mem: str = "1G",
        extra_args: Sequence[str] = (),
        reconnect: int | None = None,
        *,
        image: GuestImage | None = None,
        accel: str | None = None,
        boot_timeout: float | None = None,
        append: str = "",
        qmp: bool = True,
        log_path: str | os.PathLike[str] | None = None,
        incoming: str | None = None,
    ) -> None:
        qemu = qemu_binary()
        self.socket_path = None if socket_path is None else os.fspath(socket_path)
        self.num_queues = num_queues
        self.accel = accel or default_accel()
        self.image = image or build_guest()
        self._tmpdir = tempfile.mkdtemp(prefix="pyvhost-guest-")
        self.qmp_path: str | None = os.path.join(self._tmpdir, "qmp.sock") if qmp else None
        self._stderr_path = os.path.join(self._tmpdir, "qemu.stderr")
        self._buf = ""
        self._cond = threading.Condition()
        self._eof = False
        self._log_file: TextIO | None = None
        self._seq = 0
        self._write_lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

        cmd = [qemu, "-nodefaults", "-nographic", "-no-reboot", "-accel", self.accel]
        smp_opt = str(smp)
        if self.accel == "kvm":
            cmd += ["-cpu", "host"]
        else:
            # QEMU < 8.1's TCG drops the guest's memory barriers when the machine can have only
            # one vCPU (no CF_PARALLEL; fixed by QEMU commit c914d46d0a "tcg: Do not elide
            # memory barriers for !CF_PARALLEL in system mode").  The guest's virtio driver
            # then re-reads the used index before its used_event store is visible to the
            # backend, misses a completion and waits for good: 2 stalls in 40 runs of the
            # nbd restart test.  A second possible vCPU (not started) and MTTCG keep them.
            cmd[-1] = "tcg,thread=multi"
            smp_opt = f"{smp},maxcpus={max(smp, 2)}"
        cmd += [
            "-smp",
            smp_opt,
            "-m",
            mem,
            "-object",
            f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa",
            "node,memdev=mem",
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            f"{DEFAULT_APPEND} {append}".strip(),
            "-chardev",
            "stdio,id=con0,signal=off",
            "-serial",
            "chardev:con0",
        ]
        if self.qmp_path:
            cmd += ["-qmp", f"unix:{_qemu_opt(self.qmp_path)},server=on,wait=off"]
        if self.socket_path is not None:
            chardev = f"socket,id=c0,path={_qemu_opt(self.socket_path)}"
            if reconnect is not None:
                chardev += f",reconnect={reconnect}"
            cmd += [
                "-chardev",
                chardev,
                "-device",
                f"vhost-user-blk-pci,chardev=c0,num-queues={num_queues}",
            ]
        cmd += list(extra_args)
        if incoming is not None:
            cmd += ["-incoming", incoming]
        self.cmdline = cmd

        self.boot_started = time.monotonic()
        try:
            if log_path is not None:
                self._log_file = open(log_path, "a", encoding="utf-8")
            with open(self._stderr_path, "wb") as err:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    start_new_session=True,
                )
            self._reader = threading.Thread(
                target=self._read_console, daemon=True, name=f"qemu-console-{self.proc.pid}"
            )
            self._reader.start()
            if incoming is not None:
                return  # a migration destination: the guest arrives already booted
            bt = default_boot_timeout() if boot_timeout is None else boot_timeout
            self.wait_for(re.escape(READY_MARKER), timeout=bt, scaled=boot_timeout is None)
            self.boot_time = time.monotonic() - self.boot_started
            # Round trip through the shell: proves it is reading commands.
            status, out = self.run("echo shell-ok", timeout=max(30.0, bt / 4))
            if status != 0 or "shell-ok" not in out:
                raise GuestError(f"guest shell does not answer properly: {status} {out!r}")
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------- properties

    @property
    def qemu_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ----------------------------------------------------------- console

    def _console_read(self) -> bytes:
        """One chunk of console output, b"" at EOF (console reader thread): QEMU's stdio
        here; a subclass may read another console (tests/e2e/libvirt_host.py)."""
        assert self.proc is not None and self.proc.stdout is not None
        try:
            return os.read(self.proc.stdout.fileno(), 65536)
        except OSError:
            return b""

    def _read_console(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while True:
            data = self._console_read()
            text = decoder.decode(data, final=not data).replace("\r", "")
            if self._log_file is not None and text:
                with contextlib.suppress(OSError):
                    self._log_file.write(text)
                    self._log_file.flush()
            with self._cond:
                self._buf += text
                if not data:
                    self._eof = True
                self._cond.notify_all()
            if not data:
                return

    def console_log(self) -> str:
        """Everything the guest printed so far (``\\r`` removed)."""
        with self._cond:
            return self._buf

    def mark(self) -> int:
        """Current end of the console log; pass as ``since`` to wait_for()."""
        with self._cond:
            return len(self._buf)

    def console_tail(self, lines: int = 40) -> str:
        return "\n".join(self.console_log().splitlines()[-lines:])

    def qemu_stderr(self) -> str:
        try:
            with open(self._stderr_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _diagnostics(self) -> str:
        parts = [f"--- last console lines ---\n{self.console_tail()}"]
        err = self.qemu_stderr().strip()
        if err:
            parts.append(f"--- qemu stderr ---\n{err[-3000:]}")
        rc = self.returncode
        if rc is not None:
            parts.append(f"--- qemu exited with status {rc} ---")
        return "\n".join(parts)

    def wait_for(
        self,
        pattern: str | re.Pattern[str],
        timeout: float = 60.0,
        since: int = 0,
        *,
        scaled: bool = True,
    ) -> re.Match[str]:
        """Wait until ``pattern`` matches the console log at or after offset ``since``.

        ``since=0`` searches everything printed so far; use ``mark()`` to
        only look at output that comes later.  Raises GuestTimeout on timeout
        and GuestError if QEMU exits first.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        # self._cond's lock is an RLock, so _diagnostics() may be called inside.
        if scaled:
            timeout *= timeout_scale()
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf, since)
                if m:
                    return m
                if self._eof:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestTimeout(
                        f"timed out after {timeout:.0f} s waiting for "
                        f"{rx.pattern!r} on the guest console\n" + self._diagnostics()
                    )
                self._cond.wait(min(remaining, 1.0))
        # Console closed: QEMU is gone (give it a moment to be reaped).
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        raise GuestError(f"QEMU exited while waiting for {rx.pattern!r}\n" + self._diagnostics())

    def write(self, data: str) -> None:
        """Send raw characters to the guest console."""
        if not self.is_running():
            raise GuestError("QEMU is not running\n" + self._diagnostics())
        assert self.proc is not None and self.proc.stdin is not None
        with self._write_lock:
            try:
                self.proc.stdin.write(data.encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError) as exc:
                raise GuestError(
                    f"cannot write to the guest console: {exc}\n" + self._diagnostics()
                ) from None

    # ----------------------------------------------------------- commands

    def _new_tag(self) -> str:
        self._seq += 1
        return f"{self._seq}-{secrets.token_hex(4)}"

    def _exec(self, body: str, timeout: float, what: str = "") -> tuple[int, str]:
        """Run one shell line between begin/end markers; returns (status, output)."""
        tag = self._new_tag()
        # The markers are assembled by printf, so the console's echo of the
        # typed line never contains them verbatim.
        line = f"printf 'PVB%s-{tag}\\n' BEGIN; {body}; printf 'PVB%s-{tag} %s\\n' END \"$?\"\n"
        rx = re.compile(rf"PVBBEGIN-{tag}\n(.*?)PVBEND-{tag} (\d+)\n", re.DOTALL)
        start = self.mark()
        self.write(line)
        try:
            m = self.wait_for(rx, timeout=timeout, since=start)
        except GuestTimeout as exc:
            with contextlib.suppress(GuestError):
                self.write("\x03")  # ^C the foreground job so the shell recovers
            raise GuestTimeout(
                f"guest command did not finish (sent ^C): {what or body}\n{exc}"
            ) from None
        return int(m.group(2)), m.group(1)

    def run(self, cmd: str, timeout: float = 120) -> tuple[int, str]:
        """Run ``cmd`` in the guest shell; returns (exit status, stdout+stderr).

        The command runs in a subshell with stdin from /dev/null.  The output
        has ``\\r`` removed and the watcher's VDA-SIZE/VDA-GONE lines dropped.
        Raises GuestTimeout (after sending ^C) if it does not finish in time.
        """
        fmt = _shell_printf_format(cmd)
        if len(fmt) <= _MAX_LINE:
            status, out = self._exec(f'(eval "$(printf {fmt})") </dev/null', timeout, cmd)
        else:
            path = f"/tmp/.pvb-cmd-{secrets.token_hex(4)}.sh"
            self._exec(f": >{path}", 30)
            data = cmd.encode()
            pos = 0
            while pos < len(data):
                # Cut on a UTF-8 character boundary so every chunk decodes.
                end = min(pos + _MAX_LINE // 4, len(data))
                while end < len(data) and (data[end] & 0xC0) == 0x80:
                    end -= 1
                chunk = _shell_printf_format(data[pos:end].decode())
                rc, out = self._exec(f"printf {chunk} >>{path}", 30)
                if rc != 0:
                    raise GuestError(f"uploading a long command failed: {out!r}")
                pos = end
            status, out = self._exec(f"(. {path}) </dev/null", timeout, cmd)
            self._exec(f"rm -f {path}", 30)
        return status, _WATCHER_LINE.sub("", out)

    def block_diagnostics(self, dev: str = "vda") -> str:
        """The guest's view of a disk, for a stalled test: requests in flight per direction
        (``inflight``: reads writes), the I/O counters, the virtio interrupts, the block
        layer's busy tags (debugfs, when the kernel has it) and the kernel's last lines."""
        status, out = self.run(
            f"echo inflight: $(cat /sys/block/{dev}/inflight); "
            f"echo stat: $(cat /sys/block/{dev}/stat); grep -i virtio /proc/interrupts; "
            "mount -t debugfs none /sys/kernel/debug 2>/dev/null; "
            f"for f in /sys/kernel/debug/block/{dev}/hctx*/busy "
            f"/sys/kernel/debug/block/{dev}/hctx*/dispatch; do echo \"$f: $(cat $f)\"; done "
            "2>/dev/null; dmesg | tail -n 15", timeout=30)
        return f"(status {status})\n{out}"

    def run_ok(self, cmd: str, timeout: float = 120) -> str:
        """Like run() but raise GuestError on a non-zero exit status."""
        status, out = self.run(cmd, timeout)
        if status != 0:
            raise GuestError(f"guest command failed with status {status}: {cmd}\n{out}")
        return out

    # ----------------------------------------------------------- QMP

    def qmp(
        self, execute: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> Any:
        """Run one QMP command on QEMU; returns its "return" value."""
        if self.qmp_path is None:
            raise GuestError("Guest was created with qmp=False")
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.qmp_path)
            f = s.makefile("rwb")

            def recv() -> dict[str, Any]:
                while True:
                    if time.monotonic() > deadline:
                        raise GuestTimeout(f"QMP {execute} timed out")
                    raw = f.readline()
                    if not raw:
                        raise GuestError("QMP connection closed")
                    msg = json.loads(raw)
                    if "event" not in msg:
                        return msg

            def send(obj: dict[str, Any]) -> None:
                f.write(json.dumps(obj).encode() + b"\n")
                f.flush()

            recv()  # greeting
            send({"execute": "qmp_capabilities"})
            recv()
            req: dict[str, Any] = {"execute": execute}
            if arguments:
                req["arguments"] = arguments
            send(req)
            reply = recv()
        if "error" in reply:
            raise GuestError(f"QMP {execute} failed: {reply['error']}")
        return reply.get("return")

    # ----------------------------------------------------------- shutdown

    def poweroff(self, timeout: float = 60.0) -> int:
        """Sync and power the guest off; waits for QEMU to exit, returns its status."""
        if self.is_running():
            with contextlib.suppress(GuestError):
                self.write("sync; poweroff -f\n")
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 60.0) -> int:
        """Wait for QEMU to exit by itself; raises GuestTimeout otherwise."""
        assert self.proc is not None
        timeout *= timeout_scale()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(
                f"QEMU did not exit within {timeout:.0f} s\n" + self._diagnostics()
            ) from None
        if self._reader is not None:
            self._reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        """Terminate QEMU now (SIGTERM, then SIGKILL) and wait for it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()

    def close(self) -> None:
        """Kill QEMU if still running and release all resources."""
        self.kill()
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.proc is not None and self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()
        if self._log_file is not None:
            self._log_file.close()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
