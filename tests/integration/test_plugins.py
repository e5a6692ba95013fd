"""Python plugins and filters through the real daemon, the libblkio client and nbdkit.

What users rely on: a plugin written for ``nbdkit python`` serves the same data under
pyvhost-blk; plugin exceptions become I/O errors with the right errno and the export's error
policy, never a crash or a lost request; a blocking plugin does not stall other exports;
a broken script is one clear line at startup; Python filters see and can veto every request.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.daemon import DaemonProcess, pyvhost_blk_cmd, run_client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
MIB = 1 << 20


def _export(tmp_path: Path, node: str, name: str = "exp0", extra: str = "",
            writable: bool = True) -> list[str]:
    return ["--export", f"type=vhost-user-blk,id={name},node-name={node},addr.type=unix,"
                        f"addr.path={tmp_path / (name + '.sock')},num-queues=1,"
                        f"writable={'on' if writable else 'off'}{extra}"]


def _qmp_args(tmp_path: Path) -> list[str]:
    return ["--chardev", f"socket,id=m0,path={tmp_path / 'qmp.sock'},server=on,wait=off",
            "--monitor", "chardev=m0"]


def _script(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_ramdisk_example_verifies_in_batches(tmp_path: Path) -> None:
    bd = f"driver=python,node-name=ram,script={EXAMPLES / 'ramdisk.py'},size=32M"
    with DaemonProcess(["--blockdev", bd, *_export(tmp_path, "ram")], tmp_path) as d:
        rc, out, err = run_client(str(tmp_path / "exp0.sock"), "--mode", "verify",
                                  "--blocks", "2000")
        assert rc == 0 and out["mismatches"] == 0 and out["capacity"] == 32 * MIB, (out, err)
        e = d.stats()["exports"]["exp0"]
        assert e["batch-requests"] >= 4000 and e["fast-path-requests"] == 0
        assert d.terminate() == 0


def _nbdkit() -> str:
    exe = shutil.which("nbdkit")
    if exe is None or subprocess.run([exe, "python", "--version"],
                                     capture_output=True).returncode:
        raise RuntimeError("nbdkit's Python plugin is missing: apt-get install nbdkit "
                           "nbdkit-plugin-python (scripts/install-deps.sh does)")
    return exe


def _nbd_handle(sock: Path):  # noqa: ANN202 - libnbd's type
    try:
        import nbd
    except ImportError as e:
        raise RuntimeError("libnbd's Python binding is missing: apt-get install "
                           "python3-libnbd") from e
    h = nbd.NBD()
    h.connect_unix(str(sock))
    return h


def test_an_nbdkit_plugin_runs_unchanged_and_serves_the_same_data(tmp_path: Path) -> None:
    """examples/sparse_file.py under pyvhost-blk and under nbdkit, on one image: what one
    wrote, the other reads, byte for byte."""
    nbdkit = _nbdkit()
    img = tmp_path / "disk.img"
    script = EXAMPLES / "sparse_file.py"
    # 1. pyvhost-blk writes a seeded pattern through the plugin.
    bd = f"driver=python,node-name=d,script={script},file={img},size=16M"
    with DaemonProcess(["--blockdev", bd, *_export(tmp_path, "d")], tmp_path) as d:
        rc, out, err = run_client(str(tmp_path / "exp0.sock"), "--mode", "verify", "--blocks",
                                  "1000", "--seed", "7", "--phase", "write", "--oob", "none")
        assert rc == 0, (out, err, d.log())
        assert d.terminate() == 0
    written = img.read_bytes()
    assert len(written) == 16 * MIB and written != bytes(16 * MIB)
    # 2. nbdkit, the same script: reads exactly that; then writes it all back into a blank file.
    sock = tmp_path / "nbd.sock"
    srv = subprocess.Popen([nbdkit, "-f", "-U", str(sock), "python", str(script),
                            f"file={img}"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert srv.poll() is None, srv.stderr.read()
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
        h = _nbd_handle(sock)
        assert h.get_size() == 16 * MIB
        got = b"".join(h.pread(MIB, off) for off in range(0, 16 * MIB, MIB))
        assert got == written
        os.truncate(img, 0)
        os.truncate(img, 16 * MIB)
        for off in range(0, 16 * MIB, MIB):
            h.pwrite(got[off:off + MIB], off)
        h.flush()
        h.shutdown()
    finally:
        srv.terminate()
        srv.wait(10)
    # 3. pyvhost-blk reads back what nbdkit wrote: the pattern verifies.
    with DaemonProcess(["--blockdev", bd, *_export(tmp_path, "d")], tmp_path) as d:
        rc, out, err = run_client(str(tmp_path / "exp0.sock"), "--mode", "verify", "--blocks",
                                  "1000", "--seed", "7", "--phase", "read", "--oob", "none")
        assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
        assert d.terminate() == 0


FAILING = """
import errno, nbdkit
API_VERSION = 2
def open(readonly): return 1
def get_size(h): return 8 * 1024 * 1024
def pread(h, buf, offset, flags):
    if offset >= 4 * 1024 * 1024:
        raise ValueError("no data past 4M")      # anything else: EIO
    buf[:] = bytes(len(buf))
def pwrite(h, buf, offset, flags):
    nbdkit.set_error(errno.ENOSPC)
    raise RuntimeError("disk full")
"""


def test_plugin_exceptions_are_io_errors_logged_rate_limited(tmp_path: Path) -> None:
    script = _script(tmp_path, "failing.py", FAILING)
    with DaemonProcess(["--blockdev", f"driver=python,node-name=f,script={script}",
                        *_export(tmp_path, "f")], tmp_path) as d:
        rc, out, err = run_client(str(tmp_path / "exp0.sock"), "--mode", "verify",
                                  "--blocks", "500", "--oob", "none")
        assert out["write_errors"] == 500, (out, err)
        assert out["read_errors"] > 0  # the blocks beyond 4 MiB
        e = d.stats()["exports"]["exp0"]["blockstats"]
        assert e["failed_wr_operations"] == 500
        log = d.log()
        assert "Traceback" in log and "RuntimeError: disk full" in log
        assert log.count("pwrite failed") < 10, "plugin errors are not rate-limited"
        assert d.terminate() == 0  # alive and well


def test_plugin_errno_drives_the_error_policy(tmp_path: Path) -> None:
    """werror=enospc: the plugin's ENOSPC stops the export (QEMU's policy) instead of
    failing the guest's write; cont retries it."""
    script = _script(tmp_path, "failing.py", FAILING)
    args = ["--blockdev", f"driver=python,node-name=f,script={script}",
            *_export(tmp_path, "f", extra=",werror=enospc"), *_qmp_args(tmp_path)]
    with DaemonProcess(args, tmp_path) as d:
        client = threading.Thread(target=run_client, args=(
            str(tmp_path / "exp0.sock"), "--mode", "verify", "--blocks", "4", "--oob", "none",
            "--io-timeout", "5"), kwargs={"timeout": 60})
        client.start()
        qmp = QEMUMonitorProtocol(str(tmp_path / "qmp.sock"))
        qmp.connect()
        try:
            deadline = time.monotonic() + 20
            while True:
                (info,) = qmp.cmd_raw("query-block-exports")["return"]
                if info.get("stopped"):
                    break
                assert time.monotonic() < deadline, info
                time.sleep(0.1)
            assert info["io-status"] == "nospace"
        finally:
            qmp.close()
        client.join(60)
        assert d.proc.poll() is None
        assert d.terminate() == 0


def test_a_blocking_plugin_does_not_stall_other_exports(tmp_path: Path) -> None:
    slow = _script(tmp_path, "slow.py", """
import time
API_VERSION = 2
BLOCKING = True
def open(readonly): return 1
def get_size(h): return 1024 * 1024
def pread(h, buf, offset, flags):
    time.sleep(3)
    buf[:] = bytes(len(buf))
""")
    args = ["--blockdev", f"driver=python,node-name=slow,script={slow}",
            "--blockdev", f"driver=python,node-name=ram,script={EXAMPLES / 'ramdisk.py'}",
            *_export(tmp_path, "slow", "slow", writable=False), *_export(tmp_path, "ram", "fast")]
    with DaemonProcess(args, tmp_path) as d:
        slow_client = threading.Thread(target=run_client, args=(
            str(tmp_path / "slow.sock"), "--mode", "bench", "--count", "32", "--iodepth", "32"))
        slow_client.start()
        time.sleep(0.5)  # the slow plugin now sleeps in its threads
        t0 = time.monotonic()
        rc, out, err = run_client(str(tmp_path / "fast.sock"), "--mode", "verify",
                                  "--blocks", "500")
        took = time.monotonic() - t0
        assert rc == 0 and out["mismatches"] == 0, (out, err)
        assert took < 2.5, f"the other export waited for the blocking plugin ({took:.1f} s)"
        slow_client.join(60)
        assert d.terminate() == 0


def test_a_script_with_a_syntax_error_is_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = _script(tmp_path, "bad.py", "API_VERSION = 2\ndef open(readonly)\n    return 1\n")
    p = subprocess.run([*pyvhost_blk_cmd(), "--blockdev",
                        f"driver=python,node-name=b,script={bad}", *_export(tmp_path, "b")],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert f"Python plugin '{bad}': syntax error at line 2" in lines[0]
    missing = _script(tmp_path, "nothing.py", "x = 1\n")
    p = subprocess.run([*pyvhost_blk_cmd(), "--blockdev",
                        f"driver=python,node-name=b,script={missing},size=1M",
                        *_export(tmp_path, "b")], capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert "defines no 'open' function" in p.stderr and len(p.stderr.splitlines()) == 1


def test_short_reads_of_an_api_v1_plugin_fail_the_read(tmp_path: Path) -> None:
    short = _script(tmp_path, "short.py", """
def open(readonly): return 1
def get_size(h): return 1024 * 1024
def pread(h, count, offset):          # nbdkit API version 1: returns the data
    return bytes(count // 2)
def pwrite(h, buf, offset):
    pass
""")
    with DaemonProcess(["--blockdev", f"driver=python,node-name=s,script={short}",
                        *_export(tmp_path, "s")], tmp_path) as d:
        rc, out, err = run_client(str(tmp_path / "exp0.sock"), "--mode", "bench",
                                  "--count", "100")
        assert out["errors"] == 100, (out, err)
        assert "returned 2048 bytes of 4096" in d.log()
        assert d.terminate() == 0


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(32 * MIB)
    return img


def test_checksum_filter_fails_reads_of_corrupted_blocks(tmp_path: Path, image: Path) -> None:
    args = ["--blockdev", f"driver=file,node-name=img,filename={image},aio=io_uring",
            "--blockdev", f"driver=python-filter,node-name=sum,"
                          f"script={EXAMPLES / 'checksum_filter.py'},file=img",
            *_export(tmp_path, "sum"), *_qmp_args(tmp_path)]
    with DaemonProcess(args, tmp_path) as d:
        sock = str(tmp_path / "exp0.sock")
        rc, out, err = run_client(sock, "--mode", "verify", "--blocks", "300", "--seed", "3",
                                  "--oob", "none")
        assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
        # Corrupt the image under the filter: every written block changes.
        data = bytearray(image.read_bytes())
        for i in range(0, len(data), 4096):
            if any(data[i:i + 64]):
                data[i] ^= 0xFF
        image.write_bytes(data)
        rc, out, err = run_client(sock, "--mode", "verify", "--blocks", "300", "--seed", "3",
                                  "--phase", "read", "--oob", "none")
        assert out["read_errors"] == 300 and out["mismatches"] == 0, (out, err)
        assert d.terminate() == 0


def test_log_filter_sees_every_request(tmp_path: Path, image: Path) -> None:
    logfile = tmp_path / "requests.log"
    args = ["--blockdev", f"driver=file,node-name=img,filename={image},aio=io_uring",
            "--blockdev", f"driver=python-filter,node-name=log,"
                          f"script={EXAMPLES / 'log_filter.py'},file=img,logfile={logfile}",
            *_export(tmp_path, "log")]
    with DaemonProcess(args, tmp_path) as d:
        rc, out, err = run_client(str(tmp_path / "exp0.sock"), "--mode", "verify",
                                  "--blocks", "200", "--oob", "none")
        assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
        e = d.stats()["exports"]["exp0"]
        assert e["fast-path-requests"] == 0
        assert d.terminate() == 0
    lines = logfile.read_text().splitlines()
    ops = [ln.split()[1] for ln in lines]
    assert ops.count("write") == 200 and ops.count("read") == 200 and "flush" in ops
    assert all(ln.endswith(" ok") for ln in lines)
