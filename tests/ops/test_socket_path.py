"""Socket paths the daemon cannot listen on: one clear line and exit 1, never a traceback.

A UNIX socket path holds at most 107 bytes (``sun_path`` is 108 with the terminating NUL); a
longer one, or one whose directory does not exist (or is not a directory), is refused with
QEMU's wording, on the command line (``--export``, ``--chardev``) and in QMP
``block-export-add`` (the daemon then goes on serving).  The longest valid path works.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess, pyvhost_blk_cmd
from tests.e2e.qmp_helpers import MonitoredDaemon
from tests.frontend.vhost_user import S_OK, connect

UNIX_PATH_MAX = 108


def run_daemon(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pyvhost_blk_cmd() + list(argv), capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


def path_of_length(directory: Path, length: int) -> str:
    """A path in ``directory`` exactly ``length`` bytes long."""
    prefix = f"{directory}/"
    assert len(prefix) + 8 <= length, "the test directory's path is too long for this test"
    return prefix + "s" * (length - len(prefix) - 5) + ".sock"


def export_arg(path: str) -> str:
    return f"type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={path}"


def too_long(path: str) -> str:
    return f"UNIX socket path '{path}' is too long: it must be less than {UNIX_PATH_MAX} bytes"


def assert_one_line_error(r: subprocess.CompletedProcess[str], expected: str) -> None:
    assert r.returncode == 1, r
    assert r.stdout == ""
    assert r.stderr == expected + "\n", r.stderr


@pytest.mark.parametrize("length", [UNIX_PATH_MAX, 200])
def test_export_path_too_long(tmp_path: Path, length: int) -> None:
    path = path_of_length(tmp_path, length)
    arg = export_arg(path)
    r = run_daemon("--blockdev", "driver=null-co,node-name=n0", "--export", arg)
    assert_one_line_error(r, f"pyvhost-blk: --export {arg}: {too_long(path)}")
    assert not os.path.lexists(path)


def test_longest_export_path_works(tmp_path: Path) -> None:
    """107 bytes is allowed: the limit is the kernel's, not a guess below it."""
    path = path_of_length(tmp_path, UNIX_PATH_MAX - 1)
    with DaemonProcess(["--blockdev", "driver=null-co,node-name=n0,size=1M,read-zeroes=on",
                        "--export", export_arg(path)], tmp_path) as d:
        with connect(path) as fe:
            fe.setup(num_queues=1, queue_size=16)
            assert fe.read(0, 512) == (S_OK, bytes(512))
        assert d.terminate() == 0
    assert not os.path.lexists(path)


@pytest.mark.parametrize("parent, reason", [
    ("no/such/dir", "No such file or directory"),
    ("a-file", "Not a directory"),
])
def test_export_path_without_directory(tmp_path: Path, parent: str, reason: str) -> None:
    (tmp_path / "a-file").write_text("not a directory\n")
    path = f"{tmp_path}/{parent}/s.sock"
    arg = export_arg(path)
    r = run_daemon("--blockdev", "driver=null-co,node-name=n0", "--export", arg)
    assert_one_line_error(
        r, f"pyvhost-blk: --export {arg}: Failed to bind socket to {path}: {reason}")


def test_monitor_socket_path_errors(tmp_path: Path) -> None:
    """The QMP monitor's socket goes through the same checks."""
    long_path = path_of_length(tmp_path, 150)
    spec = f"socket,id=m0,path={long_path},server=on,wait=off"
    r = run_daemon("--chardev", spec, "--monitor", "chardev=m0")
    assert_one_line_error(r, f"pyvhost-blk: --chardev {spec}: {too_long(long_path)}")
    missing = f"{tmp_path}/missing/m.sock"
    spec = f"socket,id=m0,path={missing},server=on,wait=off"
    r = run_daemon("--chardev", spec, "--monitor", "chardev=m0")
    assert_one_line_error(r, f"pyvhost-blk: --chardev {spec}: Failed to bind socket to "
                             f"{missing}: No such file or directory")


def test_qmp_block_export_add_bad_paths(tmp_path: Path) -> None:
    """block-export-add answers a GenericError with the same message; the daemon keeps running
    and the next export with a good path works."""
    long_path = path_of_length(tmp_path, 300)
    missing = f"{tmp_path}/missing/s.sock"
    with MonitoredDaemon(["--blockdev", "driver=null-co,node-name=n0,size=1M,read-zeroes=on"],
                         tmp_path) as md:
        cases = [
            (long_path, too_long(long_path)),
            (missing, f"Failed to bind socket to {missing}: No such file or directory"),
            ("bad\0path", "UNIX socket path 'bad\\x00path' contains a NUL byte"),
        ]
        for path, message in cases:
            err = md.qmp.error("block-export-add", {
                "type": "vhost-user-blk", "id": "e0", "node-name": "n0", "writable": False,
                "addr": {"type": "unix", "path": path}})
            assert err == {"class": "GenericError", "desc": message}
        assert md.qmp.cmd("query-block-exports") == []
        good = str(tmp_path / "good.sock")
        md.qmp.cmd_args("block-export-add", {
            "type": "vhost-user-blk", "id": "e0", "node-name": "n0",
            "addr": {"type": "unix", "path": good}})
        with connect(good) as fe:
            fe.setup(num_queues=1, queue_size=16)
            assert fe.read(0, 512) == (S_OK, bytes(512))
        assert "Traceback" not in md.log()
        assert md.proc.terminate() == 0


def test_socket_file_appears_only_once_listening(tmp_path: Path) -> None:
    """A frontend that connects the moment the socket file appears is accepted: the daemon
    binds under a temporary name and renames once it listens (before, a connect between bind
    and listen got ECONNREFUSED).  strace holds every listen() for 0.5 s, so the window the
    old order had is wide open."""
    import shutil
    import signal
    import socket
    import time

    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace not found: apt-get install strace (scripts/install-deps.sh)")
    sock_path, pidfile = tmp_path / "vu.sock", tmp_path / "pid"
    proc = subprocess.Popen(
        [strace, "-f", "-o", "/dev/null", "-e", "inject=listen:delay_enter=500000",
         *pyvhost_blk_cmd(), "--pidfile", str(pidfile), "--blockdev", "driver=null-co,node-name=n",
         "--export", f"type=vhost-user-blk,id=e,node-name=n,addr.type=unix,"
                     f"addr.path={sock_path}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not sock_path.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the socket never appeared"
            time.sleep(0.001)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(sock_path))  # ConnectionRefusedError fails the test
        finally:
            s.close()
        assert not list(tmp_path.glob("vu.sock.*.tmp")), "temporary socket left behind"
    finally:
        def daemon_pid() -> int | None:
            try:
                text = pidfile.read_text().strip()
            except FileNotFoundError:
                return None
            return int(text) if text.isdigit() else None  # may be created, not yet written

        deadline = time.monotonic() + 10
        while daemon_pid() is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = daemon_pid()
        if pid is not None:  # stop the daemon itself: strace then exits with it
            os.kill(pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=30 if pid is not None else 0.1)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # strace and the daemon: leave nothing behind
            proc.communicate(timeout=30)
    assert not sock_path.exists(), "socket not removed at exit"
