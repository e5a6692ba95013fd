"""vhost/ serves any device through the VuDevice protocol, not only virtio-blk: a test device
that is not a block device (tests/devices/echo.py) behind the real VuServer, driven by the
test frontend like QEMU would, answers requests in several chained and indirect buffers, and
the connection closes and reconnects cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.frontend.vhost_user import Segment, VhostUserFrontend

ROOT = Path(__file__).resolve().parents[2]


def _start(sock: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "tests.devices.echo", str(sock)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stdout.read()
    return p


def test_a_non_block_device_is_served(tmp_path: Path) -> None:
    sock = tmp_path / "echo.sock"
    p = _start(sock)
    try:
        for _connection in range(2):
            fe = VhostUserFrontend(str(sock))
            (q,) = fe.setup(num_queues=1)
            reqs = []
            for k, indirect in ((0, False), (1, True), (2, False)):
                msg = os.urandom(100 + 37 * k)
                half = len(msg) // 2
                segs = [Segment(q.buffer(msg[:half]), half, False),
                        Segment(q.buffer(msg[half:]), len(msg) - half, False),
                        Segment(q.buffer(length=60), 60, True),
                        Segment(q.buffer(length=len(msg) - 60), len(msg) - 60, True)]
                reqs.append((msg, q.add_chain(segs, indirect=indirect)))
            q.kick()
            q.wait([r for _, r in reqs])
            for msg, r in reqs:
                assert r.used_len == len(msg)
                assert r.in_bytes() == msg[::-1]
            fe.close()
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
    assert p.returncode == 0, out
    lines = out.split()
    assert lines.count("connected") == 2 and lines.count("disconnected") == 2, out
    assert "Traceback" not in out, out
