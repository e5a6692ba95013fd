"""pyvhost-blk served to a real third-party frontend: libblkio's virtio-blk-vhost-user driver.

Each test starts the real daemon process and drives it with the compiled libblkio client
(``benchmarks/blkio_client.c``); counters come from the daemon's own stats file.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess, run_client

IMG_SIZE = 256 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    return img


def export_args(sock: Path, img: Path | None, *, queues: int = 1, iothreads: int = 0,
                aio: str = "threads", writable: bool = True, extra: str = "") -> list[str]:
    args = []
    if img is None:
        args += ["--blockdev", "driver=null-co,node-name=disk0,size=256M,read-zeroes=on"]
    else:
        args += ["--blockdev", f"driver=file,node-name=disk0,filename={img},aio={aio}"]
    for i in range(iothreads):
        args += ["--object", f"iothread,id=io{i}"]
    exp = (f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},"
           f"writable={'on' if writable else 'off'},num-queues={queues}")
    if iothreads == 1:
        exp += ",iothread=io0"
    elif iothreads > 1:
        exp += "".join(f",iothread.{i}=io{i}" for i in range(iothreads))
    return args + ["--export", exp + extra]


@pytest.mark.parametrize("aio", ["threads", "io_uring"])
def test_verify_one_queue(tmp_path: Path, image: Path, aio: str) -> None:
    sock = tmp_path / "vhost.sock"
    with DaemonProcess(export_args(sock, image, aio=aio), tmp_path) as d:
        rc, out, err = run_client(str(sock), "--mode", "verify", "--blocks", "2000", "--seed", "7")
        assert out.get("mismatches") == 0, (out, err, d.log())
        assert out["written"] == out["read"] == 2000
        assert out["write_errors"] == out["read_errors"] == out["flush_errors"] == 0
        # A read at offset == capacity fails with an error the daemon produced.
        assert out["oob_failed"] is True and out["oob_error_from_libblkio"] is False
        assert rc == 0, (out, err)
        stats = d.stats()["exports"]["exp0"]
        assert stats["blockstats"]["invalid_rd_operations"] == 1
        assert stats["blockstats"]["wr_operations"] == 2000
        assert stats["blockstats"]["rd_operations"] == 2000
        assert d.terminate() == 0


@pytest.mark.parametrize("iothreads", [0, 1, 2], ids=["main-loop", "one-iothread", "two-iothreads"])
def test_verify_two_queues(tmp_path: Path, image: Path, iothreads: int) -> None:
    sock = tmp_path / "vhost.sock"
    args = export_args(sock, image, queues=2, iothreads=iothreads, aio="io_uring")
    with DaemonProcess(args, tmp_path) as d:
        rc, out, err = run_client(str(sock), "--mode", "verify", "--queues", "2",
                                  "--blocks", "2000")
        assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
        assert all(n > 0 for n in out["per_queue_requests"])
        s = d.stats()
        queues = s["exports"]["exp0"]["queues"]
        assert [q["queue"] for q in queues] == [0, 1]
        assert all(q["requests"] >= 1000 for q in queues), queues
        if iothreads == 2:
            assert [q["iothread"] for q in queues] == ["io0", "io1"]
            assert s["iothreads"]["io0"]["requests"] > 0
            assert s["iothreads"]["io1"]["requests"] > 0
        elif iothreads == 1:
            assert s["iothreads"]["io0"]["requests"] == sum(q["requests"] for q in queues)
        else:
            assert {q["iothread"] for q in queues} == {"main"}
        assert d.terminate() == 0


def test_data_survives_reconnect_and_restart(tmp_path: Path, image: Path) -> None:
    """A second frontend sees what the first wrote; so does a restarted daemon."""
    sock = tmp_path / "vhost.sock"
    args = export_args(sock, image, queues=2, iothreads=2)
    with DaemonProcess(args, tmp_path) as d:
        rc, out, err = run_client(str(sock), "--mode", "verify", "--phase", "write",
                                  "--blocks", "500", "--seed", "3", "--queues", "2")
        assert rc == 0, (out, err)
        rc, out, err = run_client(str(sock), "--mode", "verify", "--phase", "read",
                                  "--blocks", "500", "--seed", "3")
        assert rc == 0 and out["mismatches"] == 0, (out, err)
        assert d.stats()["exports"]["exp0"]["connections"] == 2
        assert d.terminate() == 0
    with DaemonProcess(args, tmp_path) as d:
        rc, out, err = run_client(str(sock), "--mode", "verify", "--phase", "read",
                                  "--blocks", "500", "--seed", "3")
        assert rc == 0 and out["mismatches"] == 0, (out, err)
        assert d.terminate() == 0


def test_read_only_export(tmp_path: Path, image: Path) -> None:
    """writable=off offers VIRTIO_BLK_F_RO: libblkio sees a read-only device."""
    sock = tmp_path / "vhost.sock"
    with DaemonProcess(export_args(sock, image, writable=False), tmp_path) as d:
        rc, out, err = run_client(str(sock), "--mode", "verify", "--blocks", "50")
        assert rc != 0
        assert "Device is read-only" in err, err
        assert d.stats()["exports"]["exp0"]["blockstats"]["wr_operations"] == 0
        assert d.terminate() == 0


def test_null_co_bench_runs(tmp_path: Path) -> None:
    sock = tmp_path / "vhost.sock"
    with DaemonProcess(export_args(sock, None), tmp_path) as d:
        rc, out, err = run_client(str(sock), "--mode", "bench", "--iodepth", "32",
                                  "--count", "20000")
        assert rc == 0 and out["errors"] == 0 and out["ios"] == 20000, (out, err)
        stats = d.stats()["exports"]["exp0"]
        assert stats["queues"][0]["requests"] == 20000
        assert d.terminate() == 0


def test_sigterm_finishes_and_removes_socket(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "vhost.sock"
    pidfile = tmp_path / "pid"
    args = export_args(sock, image) + ["--pidfile", str(pidfile)]
    with DaemonProcess(args, tmp_path) as d:
        assert int(pidfile.read_text()) == d.proc.pid
        # SIGTERM while a client is busy: the daemon waits for in-flight requests, then exits 0.
        client = threading.Thread(
            target=run_client, args=(str(sock), "--mode", "bench", "--rw", "randwrite",
                                     "--runtime", "3")
        )
        client.start()
        time.sleep(1.0)
        assert d.terminate() == 0, d.log()
        client.join(30)
        assert not sock.exists()
        assert not pidfile.exists()
        assert "shutting down" in d.log()


def test_stale_socket_is_replaced(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "vhost.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()  # leaves the file behind, as a crashed daemon does
    assert sock.exists()
    with DaemonProcess(export_args(sock, image), tmp_path) as d:
        rc, out, err = run_client(str(sock), "--mode", "verify", "--blocks", "20")
        assert rc == 0, (out, err)
        assert d.terminate() == 0


def test_live_socket_is_not_stolen(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "vhost.sock"
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 65536)
    with DaemonProcess(export_args(sock, image), tmp_path) as first:
        second = subprocess.run(
            ["pyvhost-blk", *export_args(sock, other)], capture_output=True, text=True, timeout=30
        )
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by another process" in lines[0], second.stderr
        rc, out, err = run_client(str(sock), "--mode", "verify", "--blocks", "20")
        assert rc == 0 and out["capacity"] == IMG_SIZE, (out, err)
        assert first.terminate() == 0


def test_second_frontend_is_refused_without_disturbing_the_first(
    tmp_path: Path, image: Path
) -> None:
    sock = tmp_path / "vhost.sock"
    with DaemonProcess(export_args(sock, image), tmp_path) as d:
        result: dict = {}

        def verify() -> None:
            result["r"] = run_client(str(sock), "--mode", "bench", "--rw", "randwrite",
                                     "--runtime", "2")

        t = threading.Thread(target=verify)
        t.start()
        time.sleep(0.7)
        intruder = socket.socket(socket.AF_UNIX)
        intruder.connect(str(sock))
        intruder.settimeout(5)
        assert intruder.recv(1) == b""  # accepted and closed at once
        intruder.close()
        t.join(60)
        rc, out, err = result["r"]
        assert rc == 0 and out["errors"] == 0, (out, err)
        assert "refusing a second frontend" in d.log()
        assert d.terminate() == 0


def test_inherited_listening_fd(tmp_path: Path, image: Path) -> None:
    sock = tmp_path / "vhost.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen(1)
    fd = listener.fileno()
    os.set_inheritable(fd, True)
    args = [
        "--blockdev", f"driver=file,node-name=disk0,filename={image}",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=fd,addr.str={fd},"
                    "writable=on",
    ]
    with DaemonProcess(args, tmp_path, pass_fds=(fd,)) as d:
        listener.close()
        rc, out, err = run_client(str(sock), "--mode", "verify", "--blocks", "50")
        assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
        assert d.terminate() == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--blockdev", "driver=file,node-name=d,filename=/nonexistent/disk.img"],
         "Could not open '/nonexistent/disk.img': No such file or directory"),
        (["--blockdev", "driver=null-co,node-name=d", "--export",
          "type=vhost-user-blk,id=e,node-name=nope,addr.type=unix,addr.path=/tmp/x.sock"],
         "Cannot find device=nope nor node-name=nope"),
        (["--blockdev", "driver=null-co,node-name=d,bogus=1"], "Parameter 'bogus' is unexpected"),
        (["--export", "type=vhost-user-blk,id=e,node-name=d,writable=maybe"], "writable"),
        (["--frobnicate"], "unrecognized option '--frobnicate'"),
    ],
)
def test_bad_options_one_clear_line(args: list[str], message: str) -> None:
    proc = subprocess.run(["pyvhost-blk", *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pyvhost-blk: ") and message in lines[0], lines[0]


def test_json_options_and_two_exports_in_one_process(tmp_path: Path, image: Path) -> None:
    """qsd's JSON syntax, two --blockdev/--export pairs, a JSON iothread list."""
    img2 = tmp_path / "second.img"
    with open(img2, "wb") as f:
        f.truncate(64 << 20)
    s1, s2 = tmp_path / "one.sock", tmp_path / "two.sock"
    args = [
        "--object", '{"qom-type": "iothread", "id": "io0"}',
        "--object", "iothread,id=io1",
        "--blockdev", f'{{"driver": "file", "node-name": "a", "filename": "{image}"}}',
        "--blockdev", f"file,node-name=b,filename={img2},aio=io_uring",
        "--export", '{"type": "vhost-user-blk", "id": "e1", "node-name": "a", "writable": true,'
                    f' "addr": {{"type": "unix", "path": "{s1}"}}, "num-queues": 2,'
                    ' "iothread": ["io0", "io1"]}',
        "--export", f"vhost-user-blk,id=e2,node-name=b,addr.type=unix,addr.path={s2},"
                    "writable=on,logical-block-size=4096",
    ]
    with DaemonProcess(args, tmp_path) as d:
        rc, out, err = run_client(str(s1), "--mode", "verify", "--queues", "2", "--blocks", "300")
        assert rc == 0 and out["capacity"] == IMG_SIZE, (out, err)
        rc, out, err = run_client(str(s2), "--mode", "verify", "--blocks", "300")
        assert rc == 0 and out["capacity"] == 64 << 20, (out, err)
        s = d.stats()
        assert [q["iothread"] for q in s["exports"]["e1"]["queues"]] == ["io0", "io1"]
        assert s["exports"]["e2"]["queues"][0]["iothread"] == "main"
        assert s["exports"]["e2"]["blockstats"]["wr_operations"] == 300
        assert d.terminate() == 0


@pytest.mark.parametrize("mode", [None, "0660"])
def test_socket_mode(tmp_path: Path, image: Path, mode: str | None) -> None:
    """The socket is created 0600 (only the daemon's user may connect); socket-mode widens it."""
    sock = tmp_path / "vhost.sock"
    extra = f",socket-mode={mode}" if mode else ""
    with DaemonProcess(export_args(sock, image, extra=extra), tmp_path) as d:
        assert os.stat(sock).st_mode & 0o777 == (int(mode, 8) if mode else 0o600)
        assert d.terminate() == 0
