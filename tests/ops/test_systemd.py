"""systemd integration, tested with real programs.

* Socket activation: ``systemd-socket-activate`` listens on a path and execs pyvhost-blk only
  when the first client connects, passing the *listening* socket as fd 3 named by
  ``--fdname`` (``LISTEN_FDNAMES``); the export takes it with ``addr.type=fd,addr.str=NAME``.
  Our vhost-user client connects while only the activator exists, and its requests are then
  served by the daemon that the connection started.
* sd_notify: the daemon's ``NOTIFY_SOCKET`` is a datagram socket of the test (a path, and an
  abstract ``@name`` in the activation test): ``READY=1`` (with ``STATUS=`` and ``MAINPID=``)
  arrives when the export already serves, ``STOPPING=1`` at SIGTERM.
* The shipped units in ``systemd/`` pass ``systemd-analyze verify`` and keep their hardening
  (``systemd-analyze security --offline``; neither needs a running systemd), and the sysusers
  file passes ``systemd-sysusers --dry-run``.
* Unusable socket activation gives one line on stderr and exit status 1.

A missing tool fails the test with how to install it; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from tests.daemon import DaemonProcess, pyvhost_blk_cmd
from tests.frontend.vhost_user import S_OK, SECTOR, VhostUserFrontend, connect

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SHIPPED_EXEC = "/usr/local/bin/pyvhost-blk"  # the path ExecStart= names in the shipped unit
FDNAME = "vhost"  # the shipped socket unit's FileDescriptorName=
IMAGE_SIZE = 4 << 20


def tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed: apt-get install systemd", pytrace=False)
    return exe


def pyvhost_blk() -> str:
    try:
        return pyvhost_blk_cmd()[0]
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    return img


class NotifySocket:
    """The service manager's end of sd_notify: a datagram socket, bound to ``path`` (a file
    system path, or ``@name`` for an abstract one)."""

    def __init__(self, path: str) -> None:
        self.env = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.messages: list[dict[str, str]] = []

    def pending(self) -> list[dict[str, str]]:
        """Messages received so far, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                self._add(self.sock.recv(65536))
        except BlockingIOError:
            pass
        return self.messages

    def wait_for(self, field: str, daemon: DaemonProcess, timeout: float = 30) -> dict[str, str]:
        """The first message carrying ``field`` (``KEY=VALUE``), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages:
                key, _, value = field.partition("=")
                if m.get(key) == value:
                    return m
            if time.monotonic() > deadline:
                pytest.fail(f"no {field} within {timeout}s; got {self.messages}\n{daemon.log()}")
            if daemon.proc.poll() is not None and not self.pending():
                pytest.fail(f"daemon exited with {daemon.proc.returncode} before {field}; "
                            f"got {self.messages}\n{daemon.log()}")
            self.sock.settimeout(0.1)
            try:
                self._add(self.sock.recv(65536))
            except TimeoutError:
                pass

    def _add(self, data: bytes) -> None:
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append(fields)

    def close(self) -> None:
        self.sock.close()


def served(fe: VhostUserFrontend, image: Path, seed: int) -> None:
    """A write then a read through ``fe``; the data reaches the image file."""
    data = bytes([seed]) * (8 * SECTOR)
    assert fe.write(16, data) == S_OK
    status, back = fe.read(16, len(data))
    assert status == S_OK and back == data
    with open(image, "rb") as f:
        f.seek(16 * SECTOR)
        assert f.read(len(data)) == data


def test_socket_activation_serves_a_client_that_connected_first(tmp_path: Path,
                                                                image: Path) -> None:
    activate = tool("systemd-socket-activate")
    sock = tmp_path / "vm1.sock"
    notify = NotifySocket(f"@pyvhost-blk-test-{os.getpid()}-{time.monotonic_ns()}")
    # systemd-socket-activate passes on only TERM, PATH, USER, HOME and what -E names.
    cmd = [activate, "-l", str(sock), f"--fdname={FDNAME}", "-E", f"NOTIFY_SOCKET={notify.env}",
           pyvhost_blk()]
    args = ["--blockdev", f"driver=file,node-name=disk0,filename={image}",
            "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=fd,"
                        f"addr.str={FDNAME},writable=on,num-queues=1"]
    with DaemonProcess(args, tmp_path, cmd=cmd, wait_sockets=False) as d:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert d.proc.poll() is None, d.log()
            assert time.monotonic() < deadline, f"{sock} did not appear:\n{d.log()}"
            time.sleep(0.02)
        time.sleep(0.2)
        # Only the activator runs: no daemon, nothing notified.
        assert os.path.basename(os.readlink(f"/proc/{d.proc.pid}/exe")) == \
            "systemd-socket-activate"
        assert notify.pending() == []

        # Connected (the kernel queues us on the activator's socket), and the first request
        # sent at once, as QEMU does: the connection starts the daemon, which answers.
        fe = VhostUserFrontend(str(sock), timeout=30)
        try:
            fe.offered_features = fe.get_features()
            ready = notify.wait_for("READY=1", d)
            # The activator exec'd the daemon: same pid, now Python.
            assert "python" in os.path.basename(os.readlink(f"/proc/{d.proc.pid}/exe"))
            assert ready["MAINPID"] == str(d.proc.pid)
            assert ready["STATUS"] == "serving 1 export on fd 3", ready
            fe.setup(queue_size=64)
            served(fe, image, 0x5A)
        finally:
            fe.close()
        # A second client is served too (the listener is the activator's socket, kept).
        with connect(str(sock), timeout=10, retry_for=10) as fe2:
            fe2.setup(queue_size=64)
            served(fe2, image, 0xA5)
        assert d.terminate() == 0, d.log()
        assert notify.wait_for("STOPPING=1", d)["STATUS"] == "shutting down (SIGTERM)"
        # The socket file belongs to whoever created it (systemd): the daemon leaves it.
        assert sock.exists()
        assert "Traceback" not in d.log()
    notify.close()


def test_notify_ready_after_listening_status_and_stopping(tmp_path: Path, image: Path) -> None:
    sock = str(tmp_path / "vu.sock")
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    args = ["--blockdev", f"driver=file,node-name=disk0,filename={image}",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues=1"]
    with DaemonProcess(args, tmp_path, wait_sockets=False,
                       env={"NOTIFY_SOCKET": notify.env}) as d:
        ready = notify.wait_for("READY=1", d)
        # READY=1 means usable: the very first attempt connects and is served.
        with connect(sock, timeout=10, retry_for=0) as fe:
            fe.setup(queue_size=64)
            served(fe, image, 0x11)
        assert ready["STATUS"] == f"serving 1 export on {sock}", ready
        assert ready["MAINPID"] == str(d.proc.pid)
        assert d.terminate() == 0, d.log()
        stopping = notify.wait_for("STOPPING=1", d)
        assert stopping["STATUS"] == "shutting down (SIGTERM)"
        assert [m for m in notify.messages if "READY" in m] == [ready]
        assert notify.messages.index(ready) < notify.messages.index(stopping)
    notify.close()


def test_no_notify_socket_no_messages(tmp_path: Path, image: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET nothing is sent and nothing complains (the plain daemon)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    sock = str(tmp_path / "vu.sock")
    args = ["--blockdev", f"driver=file,node-name=disk0,filename={image}",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                        f"addr.path={sock},num-queues=1"]
    with DaemonProcess(args, tmp_path) as d:
        assert d.terminate() == 0
        assert "notify" not in d.log().lower(), d.log()


# -- the shipped unit files ----------------------------------------------------------------
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the units as shipped, except for ExecStart='s path: verify
    requires the binary to exist, and here it is the virtualenv's, not /usr/local/bin's.
    verify reports unknown keys and bad values as warnings with exit status 0, so any output
    at all fails the test.  It runs offline (no systemd as PID 1 in this container)."""
    analyze = tool("systemd-analyze")
    exe = pyvhost_blk()
    service = (UNITS / "pyvhost-blk@.service").read_text()
    assert f"\nExecStart={SHIPPED_EXEC} $PYVHOST_BLK_ARGS\n" in service
    (tmp_path / "pyvhost-blk@.service").write_text(
        service.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={exe} "))
    shutil.copy(UNITS / "pyvhost-blk@.socket", tmp_path)
    proc = subprocess.run(
        [analyze, "verify", str(tmp_path / "pyvhost-blk@vm1.service"),
         str(tmp_path / "pyvhost-blk@vm1.socket")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr
    # The hardening stays: exposure at most 2.0 of 10 (1.2 with systemd 252).
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", "--no-pager",
         str(tmp_path / "pyvhost-blk@vm1.service")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    socket_unit = (UNITS / "pyvhost-blk@.socket").read_text()
    assert f"\nFileDescriptorName={FDNAME}\n" in socket_unit
    assert "\nListenStream=/run/pyvhost-blk/%i.sock\n" in socket_unit
    assert "\nType=notify\n" in service and "\nKillSignal=SIGTERM\n" in service


def test_sysusers_file_creates_the_service_user(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    proc = subprocess.run(
        [sysusers, f"--root={tmp_path}", "--dry-run", str(UNITS / "pyvhost-blk.sysusers.conf")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Creating user 'pyvhost-blk'" in proc.stdout + proc.stderr
    assert "\nUser=pyvhost-blk\n" in (UNITS / "pyvhost-blk@.service").read_text()


# -- unusable socket activation: one line, exit 1 ----------------------------------------------
# Runs the daemon the way a service manager does: the given fds moved to 3, 4, ... and
# LISTEN_PID set to the daemon's pid (this wrapper execs it, so the pid stays).
_EXEC_WITH_FDS = """
import os, sys
src = [int(x) for x in os.environ.pop("TEST_FDS").split(",") if x]
high = [os.dup2(fd, 100 + i) for i, fd in enumerate(src)]
for fd in src:
    os.close(fd)  # only 3, 4, ... stay
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[1], sys.argv[1:])
"""


def start_with_fds(argv: list[str], env: dict[str, str], fds: list[int]) -> subprocess.Popen:
    """``argv`` with ``fds`` as 3, 4, ... and LISTEN_PID=its pid, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return subprocess.Popen(
        [sys.executable, "-c", _EXEC_WITH_FDS, *argv],
        env={**base, "TEST_FDS": ",".join(map(str, fds)), **env}, pass_fds=fds,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def start_activated(export_str: str, env: dict[str, str], fds: list[int]) -> subprocess.Popen:
    """pyvhost-blk exporting a null-co node on ``addr.type=fd,addr.str=export_str``."""
    return start_with_fds(
        [pyvhost_blk(), "--blockdev", "driver=null-co,node-name=disk0",
         "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=fd,"
                     f"addr.str={export_str},num-queues=1"],
        env, fds)


def finish(proc: subprocess.Popen, timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"pyvhost-blk still running after {timeout}s (configuration accepted?):"
                    f"\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def unix_listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def make_fd(kind: str, tmp_path: Path) -> list[IO[str] | socket.socket]:
    """Objects whose first one's fd becomes fd 3 (the others just stay open meanwhile)."""
    if kind == "listener":
        return [unix_listener(tmp_path / "l.sock")]
    if kind == "file":
        return [open(tmp_path / "plain-file", "w")]
    if kind == "connected":
        return list(socket.socketpair())
    if kind == "datagram":
        dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        dgram.bind(str(tmp_path / "d.sock"))
        return [dgram]
    return []


_PROBE = """
import json, os
from pyvhost_blk.systemd import listen_fds
fds = listen_fds()
print(json.dumps({
    "names": fds.as_dict(), "by_index": [fds[0], fds[1]], "len": len(fds),
    "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "inheritable": [os.get_inheritable(fd) for fd in fds.fds],
}))
"""


def test_listen_fds_reads_like_sd_listen_fds(tmp_path: Path) -> None:
    """Without LISTEN_FDNAMES the fds are all 'unknown'; fds by index; the variables are gone
    (a child would not inherit them) and the fds are close-on-exec."""
    a = unix_listener(tmp_path / "a.sock")
    b = unix_listener(tmp_path / "b.sock")
    try:
        proc = start_with_fds([sys.executable, "-c", _PROBE],
                              {"LISTEN_FDS": "2", "PYTHONPATH": str(REPO)},
                              [a.fileno(), b.fileno()])
        res = finish(proc)
    finally:
        a.close()
        b.close()
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {
        "names": {"unknown": 3}, "by_index": [3, 4], "len": 2, "env": [],
        "inheritable": [False, False],
    }


BAD = {
    "LISTEN_FDS not a number": (
        FDNAME, {"LISTEN_FDS": "one", "LISTEN_FDNAMES": FDNAME}, "listener",
        r"socket activation: LISTEN_FDS=one is not a number of fds"),
    "LISTEN_FDS without its fds": (
        FDNAME, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": f"{FDNAME}:other"}, "listener",
        r"socket activation: LISTEN_FDS=2 but fd 4 is not open"),
    "names do not match LISTEN_FDS": (
        FDNAME, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": f"{FDNAME}:other"}, "listener",
        r"socket activation: LISTEN_FDNAMES=vhost:other names 2 fds but LISTEN_FDS=1"),
    "a name that is not passed": (
        "data", {"LISTEN_FDS": "1", "LISTEN_FDNAMES": FDNAME}, "listener",
        r"--export .*: addr.str 'data': no socket-activation fd is named 'data' "
        r"\(LISTEN_FDNAMES has 'vhost'\)"),
    "a name without socket activation": (
        FDNAME, {}, "",
        r"addr.str 'vhost': no socket-activation fd is named 'vhost' \(no LISTEN_FDS were "
        r"passed to this process\)"),
    "an fd that is not a socket": (
        FDNAME, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": FDNAME}, "file",
        r"addr.str 'vhost': fd 3 \(socket-activation name 'vhost'\) is not a socket"),
    "a connected socket (Accept=yes)": (
        FDNAME, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": FDNAME}, "connected",
        r"addr.str 'vhost': fd 3 \(socket-activation name 'vhost'\) is a socket that does not "
        r"listen"),
    "a datagram socket": (
        FDNAME, {"LISTEN_FDS": "1", "LISTEN_FDNAMES": FDNAME}, "datagram",
        r"addr.str 'vhost': fd 3 \(socket-activation name 'vhost'\) is not a stream socket"),
    "a number that is not a socket": (
        "3", {}, "file", r"addr.str '3': fd 3 is not a socket"),
}


@pytest.mark.parametrize("case", BAD.keys())
def test_unusable_activation_one_line_exit_1(tmp_path: Path, case: str) -> None:
    export_str, env, fd_kind, message = BAD[case]
    keep = make_fd(fd_kind, tmp_path)
    try:
        proc = start_activated(export_str, env, [keep[0].fileno()] if keep else [])
        res = finish(proc)
    finally:
        for k in keep:
            k.close()
    lines = res.stderr.splitlines()
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith("pyvhost-blk: "), lines
    assert re.search(message, lines[0]), lines[0]


def test_activation_for_another_process_is_ignored() -> None:
    """LISTEN_PID of another process: the fds are not ours (sd_listen_fds returns 0)."""
    res = subprocess.run(
        [pyvhost_blk(), "--blockdev", "driver=null-co,node-name=disk0", "--export",
         f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=fd,addr.str={FDNAME}"],
        env={**os.environ, "LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": FDNAME},
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1, res.stderr
    assert "no LISTEN_FDS were passed to this process" in res.stderr, res.stderr


def test_activation_fd_no_export_uses_is_warned_about(tmp_path: Path) -> None:
    """A socket systemd listens on that no export serves would leave QEMU waiting: warned,
    before READY=1.  The named one serves meanwhile."""
    a = unix_listener(tmp_path / "a.sock")
    b = unix_listener(tmp_path / "b.sock")
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        proc = start_activated(FDNAME, {"LISTEN_FDS": "2", "LISTEN_FDNAMES": f"{FDNAME}:spare",
                                        "NOTIFY_SOCKET": notify.env},
                               [a.fileno(), b.fileno()])
    finally:
        a.close()
        b.close()
    try:
        notify.sock.settimeout(30)
        assert "READY" in notify.sock.recv(4096).decode()
        with connect(str(tmp_path / "a.sock"), timeout=10, retry_for=0) as fe:
            fe.setup(queue_size=64)
            assert fe.read(0, 4096)[0] == S_OK
        proc.send_signal(signal.SIGTERM)
        res = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert res.returncode == 0, res.stderr
    assert "socket-activation fd 4 ('spare') is not used by any export" in res.stderr, \
        res.stderr
