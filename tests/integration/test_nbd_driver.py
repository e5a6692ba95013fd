"""driver=nbd against real NBD servers started here: qemu-nbd (raw and qcow2 images, unix and
TCP) and nbdkit's memory plugin.  Through the real daemon with the libblkio client (verify
mode), and in-process on the driver for what the client cannot send (discard, write-zeroes,
scattered buffers, requests above the server's payload limit).

The server is killed and restarted under I/O: with ``reconnect-delay`` requests wait and
complete; without it they fail with EIO and work again once the server is back.  A server
that is not there at open is one line and exit status 1.  A missing server or libnbd fails
the test with how to install it (never a skip)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import DaemonProcess, blkio_client, pyvhost_blk_cmd, run_client

MIB = 1 << 20
IMG_SIZE = 64 * MIB


# -- servers ---------------------------------------------------------------------------------
def _need(exe: str, package: str) -> str:
    path = shutil.which(exe)
    if path is None:
        pytest.fail(f"{exe} not found: install it with 'apt-get install {package}'")
    return path


def _need_libnbd() -> None:
    try:
        import nbd  # noqa: F401
    except ImportError:
        pytest.fail("libnbd's Python binding is missing: 'apt-get install python3-libnbd' "
                    "(the venv must see system site-packages)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NbdServer:
    """A server process (foreground) that can be killed and started again on the same
    address.  Test thread only."""

    def __init__(self, cmd: list[str], workdir: Path, unix: str | None = None,
                 port: int | None = None) -> None:
        self.cmd, self.unix, self.port = cmd, unix, port
        self.log = workdir / f"server-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def _answers(self) -> bool:
        fam, addr = ((socket.AF_UNIX, self.unix) if self.unix
                     else (socket.AF_INET, ("127.0.0.1", self.port)))
        with socket.socket(fam) as s:
            try:
                s.connect(addr)
                return True
            except OSError:
                return False

    def start(self, timeout: float = 10) -> None:
        if self.unix and os.path.exists(self.unix):
            os.unlink(self.unix)  # a killed server leaves its socket behind
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                pytest.fail(f"{self.cmd[0]} exited with {self.proc.returncode}: "
                            f"{self.log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.cmd[0]} did not listen: {self.log.read_text()}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def server_opts(self) -> str:
        if self.unix:
            return f"server.type=unix,server.path={self.unix}"
        return f"server.type=inet,server.host=127.0.0.1,server.port={self.port}"


class Servers:
    """The servers one test started (all killed at its end)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.started: list[NbdServer] = []

    def qemu_nbd(self, image: Path, fmt: str = "raw", tcp: bool = False,
                 read_only: bool = False, export: str | None = None) -> NbdServer:
        exe = _need("qemu-nbd", "qemu-utils")
        cmd = [exe, "--persistent", "--shared=16", f"--format={fmt}", "--cache=writeback",
               "--discard=unmap"]
        if read_only:
            cmd.append("--read-only")
        if export is not None:
            cmd.append(f"--export-name={export}")
        port, unix = (_free_port(), None) if tcp else (None, str(self.tmp / "nbd.sock"))
        cmd += ["--bind=127.0.0.1", f"--port={port}"] if tcp else [f"--socket={unix}"]
        srv = NbdServer([*cmd, str(image)], self.tmp, unix=unix, port=port)
        self.started.append(srv)
        return srv

    def nbdkit_memory(self, size: str = "64M", tcp: bool = False) -> NbdServer:
        exe = _need("nbdkit", "nbdkit")
        port, unix = (_free_port(), None) if tcp else (None, str(self.tmp / "nbdkit.sock"))
        where = ["--ipaddr", "127.0.0.1", "--port", str(port)] if tcp else ["--unix", unix]
        srv = NbdServer([exe, "--foreground", *where, "memory", size], self.tmp, unix=unix,
                        port=port)
        self.started.append(srv)
        return srv


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    _need_libnbd()
    s = Servers(tmp_path)
    yield s
    for srv in s.started:
        srv.kill()


def _nbd_node(srv: NbdServer, node_name: str, from_json: bool = True, **opts: Any) -> Any:
    """An nbd node of the block graph, in this process, on ``srv``'s unix socket."""
    from blocklayer.blockdev import blockdev_add

    return blockdev_add({"driver": "nbd", "node-name": node_name, **opts,
                         "server": {"type": "unix", "path": srv.unix}}, from_json=from_json)


def _image(tmp_path: Path, fmt: str = "raw", size: int = IMG_SIZE) -> Path:
    img = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        with open(img, "wb") as f:
            f.truncate(size)
    else:
        subprocess.run([_need("qemu-img", "qemu-utils"), "create", "-q", "-f", fmt, str(img),
                        str(size)], check=True)
    return img


def _daemon_args(tmp_path: Path, blockdev: str, writable: bool = True) -> list[str]:
    w = "on" if writable else "off"
    return ["--blockdev", blockdev,
            "--export", f"type=vhost-user-blk,id=exp0,node-name=n0,addr.type=unix,"
                        f"addr.path={tmp_path / 'vhost.sock'},writable={w},num-queues=1"]


def _verify(tmp_path: Path, *args: str, d: DaemonProcess | None = None) -> dict:
    rc, out, err = run_client(str(tmp_path / "vhost.sock"), "--mode", "verify", *args)
    assert rc == 0 and out.get("mismatches") == 0 and not out.get("write_errors") \
        and not out.get("read_errors"), (out, err, d.log() if d else "")
    return out


# -- data through ours -> NBD -> server ------------------------------------------------------
@pytest.mark.parametrize("fmt,tcp", [("raw", False), ("qcow2", False), ("raw", True)])
def test_verify_through_qemu_nbd(tmp_path: Path, servers: Servers, fmt: str, tcp: bool) -> None:
    """Write, flush and read back through the daemon; the data is in the image afterwards
    (a second daemon reads it back after the server was restarted; qemu-img check is clean)."""
    img = _image(tmp_path, fmt)
    srv = servers.qemu_nbd(img, fmt, tcp=tcp)
    bd = f"driver=nbd,node-name=n0,{srv.server_opts()}"
    with DaemonProcess(_daemon_args(tmp_path, bd), tmp_path) as d:
        _verify(tmp_path, "--blocks", "3000", d=d)
        assert d.terminate() == 0, d.log()
    srv.kill()
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "check", "-q", str(img)], check=True)
    srv.start()
    with DaemonProcess(_daemon_args(tmp_path, bd), tmp_path) as d:
        _verify(tmp_path, "--blocks", "3000", "--phase", "read", d=d)
        assert d.terminate() == 0


@pytest.mark.parametrize("tcp", [False, True])
def test_verify_through_nbdkit_memory(tmp_path: Path, servers: Servers, tcp: bool) -> None:
    srv = servers.nbdkit_memory(tcp=tcp)
    bd = f"driver=nbd,node-name=n0,{srv.server_opts()}"
    with DaemonProcess(_daemon_args(tmp_path, bd), tmp_path) as d:
        out = _verify(tmp_path, "--blocks", "4000", d=d)
        assert out["capacity"] == IMG_SIZE
        assert d.terminate() == 0


def test_json_options_and_named_export(tmp_path: Path, servers: Servers) -> None:
    """QEMU's nested ``server`` object in JSON; ``export`` picks the export by name."""
    import json

    img = _image(tmp_path)
    srv = servers.qemu_nbd(img, export="disk0")
    bd = json.dumps({"driver": "nbd", "node-name": "n0", "export": "disk0",
                     "server": {"type": "unix", "path": srv.unix}})
    with DaemonProcess(_daemon_args(tmp_path, bd), tmp_path) as d:
        _verify(tmp_path, "--blocks", "500", d=d)
    bad = f"driver=nbd,node-name=n0,{srv.server_opts()},export=nope"
    _assert_open_fails(tmp_path, bad, "server has no export named 'nope'")


# -- read-only exports -----------------------------------------------------------------------
def test_read_only_export(tmp_path: Path, servers: Servers) -> None:
    img = _image(tmp_path)
    img.write_bytes(b"\x5a" * IMG_SIZE)
    srv = servers.qemu_nbd(img, read_only=True)
    opts = srv.server_opts()
    # Opened read-write: refused at open, as QEMU ("NBD export is read-only").
    _assert_open_fails(tmp_path, f"driver=nbd,node-name=n0,{opts}", "NBD export is read-only")
    # auto-read-only=on makes the node read-only; a writable export of it is refused.
    _assert_open_fails(tmp_path, f"driver=nbd,node-name=n0,{opts},auto-read-only=on",
                       "read-only")
    for ro in ("read-only=on", "auto-read-only=on"):
        bd = f"driver=nbd,node-name=n0,{opts},{ro}"
        with DaemonProcess(_daemon_args(tmp_path, bd, writable=False), tmp_path) as d:
            # The device is offered read-only (VIRTIO_BLK_F_RO): libblkio's client, which
            # opens devices read-write, is refused.
            rc, out, err = run_client(str(tmp_path / "vhost.sock"), "--mode", "bench",
                                      "--count", "10")
            assert rc != 0 and "Device is read-only" in err, (rc, out, err, d.log())
            assert d.terminate() == 0
    # On the node itself: reads work, a write reaching the driver anyway is refused.
    from blocklayer.aio import AioContext
    from blocklayer.bdrv import bdrv_unref
    from blocklayer.iov import IOVector

    ctx = AioContext("test")
    bs = _nbd_node(srv, "nbdro", **{"auto-read-only": True})
    try:
        assert bs.read_only and not bs.drv.can_write()
        buf = bytearray(64 * 1024)
        assert _wait(ctx, lambda cb: bs.drv.aio_preadv(ctx, MIB, IOVector.from_buffers([buf]),
                                                        cb)) == 0
        assert buf == b"\x5a" * len(buf)
        ret = _wait(ctx, lambda cb: bs.drv.aio_pwritev(ctx, 0, IOVector.from_buffers([buf]),
                                                        0, cb))
        assert ret in (-errno.EPERM, -errno.EROFS, -errno.EINVAL), ret
    finally:
        bdrv_unref(bs)
        ctx.close()
    assert img.read_bytes() == b"\x5a" * IMG_SIZE  # nothing reached the image


# -- the server goes away --------------------------------------------------------------------
def _reconnect_time(log: str) -> float:
    m = re.findall(r"reconnected to '[^']*' after ([0-9.]+) s", log)
    assert m, log
    return float(m[-1])


def test_server_restart_with_reconnect_delay(tmp_path: Path, servers: Servers) -> None:
    """The server is killed while the guest writes and comes back 1.5 s later: every request
    waits and completes; the data written across the outage reads back."""
    img = _image(tmp_path, size=256 * MIB)
    srv = servers.qemu_nbd(img)
    bd = f"driver=nbd,node-name=n0,{srv.server_opts()},reconnect-delay=30"
    with DaemonProcess(_daemon_args(tmp_path, bd), tmp_path) as d:
        sock = str(tmp_path / "vhost.sock")
        client = subprocess.Popen(
            [str(blkio_client()), "--socket", sock,
             "--mode", "verify", "--blocks", "40000", "--phase", "write", "--io-timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)
        srv.kill()
        killed = time.monotonic()
        time.sleep(1.5)
        srv.start()
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, (out, err, d.log())
        assert '"write_errors":0' in out and '"flush_errors":0' in out, (out, d.log())
        outage = _reconnect_time(d.log())
        assert 1.4 <= outage < 5, (outage, time.monotonic() - killed)
        # The same daemon reads back every block written across the outage.
        _verify(tmp_path, "--blocks", "40000", "--phase", "read", d=d)
        # A bench run across a second outage: no request fails.
        bench = subprocess.Popen(
            [str(blkio_client()), "--socket", sock,
             "--mode", "bench", "--rw", "randwrite", "--runtime", "4", "--io-timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        srv.kill()
        time.sleep(1)
        srv.start()
        out, err = bench.communicate(timeout=60)
        assert bench.returncode == 0 and '"errors":0' in out, (out, err, d.log())
        assert d.terminate() == 0


def test_server_gone_without_reconnect_delay_fails_fast(tmp_path: Path, servers: Servers) -> None:
    """reconnect-delay=0 (the default): while the server is away requests fail with EIO at
    once (no hang); once it is back (reconnect goes on in the background) I/O works again."""
    img = _image(tmp_path)
    srv = servers.qemu_nbd(img)
    bd = f"driver=nbd,node-name=n0,{srv.server_opts()}"
    with DaemonProcess(_daemon_args(tmp_path, bd), tmp_path) as d:
        sock = str(tmp_path / "vhost.sock")
        _verify(tmp_path, "--blocks", "200", d=d)
        srv.kill()
        t0 = time.monotonic()
        rc, out, err = run_client(sock, "--mode", "bench", "--rw", "randread", "--count",
                                  "100", "--iodepth", "4", "--io-timeout", "10")
        assert rc != 0 and out["errors"] == 100, (out, err, d.log())
        assert time.monotonic() - t0 < 5
        srv.start()
        deadline = time.monotonic() + 10
        while "reconnected" not in d.log():
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.05)
        _verify(tmp_path, "--blocks", "200", d=d)
        assert d.terminate() == 0


# -- open failures: one line, exit status 1 ----------------------------------------------------
def _assert_open_fails(tmp_path: Path, blockdev: str, expect: str,
                       timeout: float = 30) -> float:
    t0 = time.monotonic()
    p = subprocess.run(pyvhost_blk_cmd() + _daemon_args(tmp_path, blockdev),
                       capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - t0
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and expect in lines[0], (p.returncode, lines)
    return took


def test_refused_connection_at_open(tmp_path: Path) -> None:
    _need_libnbd()
    missing = tmp_path / "nobody.sock"
    _assert_open_fails(tmp_path, f"driver=nbd,node-name=n0,server.type=unix,"
                                 f"server.path={missing}",
                       f"Failed to connect to '{missing}': No such file or directory")
    port = _free_port()
    took = _assert_open_fails(
        tmp_path, f"driver=nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,"
                  f"server.port={port},open-timeout=2",
        f"Failed to connect to '127.0.0.1:{port}': Connection refused")
    assert 1 <= took < 10  # open-timeout retried for about 2 s, then gave up


def test_open_timeout_waits_for_a_late_server(tmp_path: Path, servers: Servers) -> None:
    img = _image(tmp_path)
    srv = servers.qemu_nbd(img)
    srv.kill()
    bd = f"driver=nbd,node-name=n0,{srv.server_opts()},open-timeout=20"
    d = DaemonProcess(_daemon_args(tmp_path, bd), tmp_path, wait_sockets=False)
    try:
        time.sleep(1)
        srv.start()
        d.wait_for_sockets(30)
        _verify(tmp_path, "--blocks", "200", d=d)
        assert d.terminate() == 0
    finally:
        d.close()


def test_server_that_never_answers(tmp_path: Path) -> None:
    """A socket that accepts and never speaks NBD: one line after the handshake timeout."""
    _need_libnbd()
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as ls:
        ls.bind(str(path))
        ls.listen(4)
        took = _assert_open_fails(
            tmp_path, f"driver=nbd,node-name=n0,server.type=unix,server.path={path}",
            "no NBD handshake within 10 seconds")
    assert 9 <= took < 20


# -- in-process, on the driver ------------------------------------------------------------------
def _wait(ctx: object, submit: Callable[[Callable[[int], None]], None],
          timeout: float = 20) -> int:
    res: list[int] = []
    submit(res.append)
    deadline = time.monotonic() + timeout
    while not res:
        assert time.monotonic() < deadline, "request did not complete"
        ctx.aio_poll(True, 0.1)  # type: ignore[attr-defined]
    return res[0]


def test_driver_discard_zeroes_scatter_and_large(tmp_path: Path, servers: Servers) -> None:
    """What libblkio's client does not send: discard and write-zeroes pass through (qemu-nbd
    punches holes in the raw file), scattered buffers, a 40 MiB request (above the 32 MiB
    payload limit: split), flush; the server's block size reaches limits()."""
    from blocklayer.aio import AioContext
    from blocklayer.bdrv import BDRV_REQ_MAY_UNMAP, bdrv_unref
    from blocklayer.iov import IOVector

    img = _image(tmp_path)
    srv = servers.qemu_nbd(img)
    ctx = AioContext("test")
    bs = _nbd_node(srv, "nbdtest0", from_json=False, discard="unmap")
    drv = bs.drv
    try:
        assert drv.getlength() == IMG_SIZE and drv.can_write()
        assert drv.has_trim and drv.has_zero and drv.has_flush
        assert bs.request_alignment == drv.limits()[0] >= 1
        pattern = bytes(range(256)) * (4 * MIB // 256)
        parts = [bytearray(pattern[:4096]), bytearray(pattern[4096:-4096]),
                 bytearray(pattern[-4096:])]
        q = IOVector.from_buffers(parts)
        assert q.niov == 3
        assert _wait(ctx, lambda cb: drv.aio_pwritev(ctx, MIB, q, 0, cb)) == 0
        assert _wait(ctx, lambda cb: drv.aio_flush(ctx, cb)) == 0
        back = [bytearray(8192), bytearray(4 * MIB - 8192)]
        assert _wait(ctx, lambda cb: drv.aio_preadv(ctx, MIB, IOVector.from_buffers(back),
                                                     cb)) == 0
        assert b"".join(back) == pattern
        with open(img, "rb") as f:
            f.seek(MIB)
            assert f.read(4 * MIB) == pattern
        blocks = os.stat(img).st_blocks
        assert _wait(ctx, lambda cb: drv.aio_pdiscard(ctx, MIB, 2 * MIB, cb)) == 0
        assert os.stat(img).st_blocks <= blocks - (2 * MIB) // 512 + 16, "no hole punched"
        assert _wait(ctx, lambda cb: drv.aio_pwrite_zeroes(ctx, 3 * MIB, 2 * MIB,
                                                           BDRV_REQ_MAY_UNMAP, cb)) == 0
        with open(img, "rb") as f:
            f.seek(3 * MIB)
            assert f.read(2 * MIB) == bytes(2 * MIB)
        big = bytearray(os.urandom(40 * MIB))
        assert _wait(ctx, lambda cb: drv.aio_pwritev(
            ctx, 8 * MIB, IOVector.from_buffers([big]), 0, cb)) == 0
        got = bytearray(40 * MIB)
        assert _wait(ctx, lambda cb: drv.aio_preadv(
            ctx, 8 * MIB, IOVector.from_buffers([got]), cb)) == 0
        assert got == big
    finally:
        bdrv_unref(bs)
        ctx.close()


def test_driver_requests_wait_for_the_server(tmp_path: Path, servers: Servers) -> None:
    """In-process timing: a read submitted while the server is away completes once it is
    back (reconnect-delay); with the delay run out, requests fail with EIO."""
    from blocklayer.aio import AioContext
    from blocklayer.bdrv import bdrv_unref
    from blocklayer.iov import IOVector

    img = _image(tmp_path)
    srv = servers.qemu_nbd(img)
    ctx = AioContext("test")
    bs = _nbd_node(srv, "nbdtest1", **{"reconnect-delay": 2})
    drv = bs.drv
    buf = bytearray(4096)
    try:
        assert _wait(ctx, lambda cb: drv.aio_preadv(ctx, 0, IOVector.from_buffers([buf]),
                                                     cb)) == 0
        srv.kill()
        res: list[int] = []
        drv.aio_preadv(ctx, 0, IOVector.from_buffers([buf]), res.append)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.8:
            ctx.aio_poll(True, 0.05)
        assert not res, "a request failed while the reconnect-delay lasts"
        srv.start()
        while not res:
            assert time.monotonic() - t0 < 10
            ctx.aio_poll(True, 0.05)
        assert res == [0] and drv.reconnects == 1
        # Away longer than the delay: the waiting request fails with EIO after ~2 s.
        srv.kill()
        res.clear()
        drv.aio_preadv(ctx, 0, IOVector.from_buffers([buf]), res.append)
        t0 = time.monotonic()
        while not res:
            assert time.monotonic() - t0 < 10
            ctx.aio_poll(True, 0.05)
        took = time.monotonic() - t0
        assert res == [-5] and 1.5 < took < 4, (res, took)
    finally:
        bdrv_unref(bs)
        ctx.close()
