"""Log output: ``--log-format json`` and the default text lines, against the real daemon.

A daemon with one export; a vhost-user frontend connects, does a read and disconnects; the
daemon is stopped with SIGTERM.  In JSON, every line must be one object with the documented
fields, and the connect, disconnect and shutdown records must carry their ``event`` (and
``export``) context.  The text format must be what it always was.  Bad values: one line, exit 1.
The formatter itself (tracebacks, newlines, non-JSON values) is checked in-process.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pyvhost_blk.logs import JsonFormatter
from tests.daemon import DaemonProcess, pyvhost_blk_cmd
from tests.frontend.vhost_user import S_OK, connect


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [*extra, "--blockdev", "driver=null-co,node-name=n0,size=16M",
            "--export", f"type=vhost-user-blk,id=exp0,addr.path={tmp_path / 'vu.sock'},"
                        "node-name=n0,addr.type=unix,num-queues=1"]


def _connect_read_disconnect(d: DaemonProcess, sock: str, until: str) -> None:
    with connect(sock) as fe:
        fe.setup(queue_size=64)
        assert fe.read(0, 4096)[0] == S_OK
    deadline = time.monotonic() + 10
    while until not in d.log():  # the daemon sees the close a moment later
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.02)


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pyvhost_blk_cmd() + list(argv), capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, env=env)


def test_json_lines(tmp_path: Path) -> None:
    sock = str(tmp_path / "vu.sock")
    started = datetime.datetime.now(datetime.UTC)
    with DaemonProcess(_args(tmp_path, "--log-format", "json"), tmp_path) as d:
        _connect_read_disconnect(d, sock, '"frontend-disconnected"')
        assert d.terminate() == 0
        text = d.log()
    ended = datetime.datetime.now(datetime.UTC)
    records: list[dict[str, Any]] = []
    for line in text.splitlines():
        rec = json.loads(line)  # every line is one JSON object
        assert isinstance(rec, dict), line
        for key in ("time", "level", "message", "logger", "pid", "thread"):
            assert key in rec, line
        assert rec["time"].endswith("Z"), line
        when = datetime.datetime.fromisoformat(rec["time"].replace("Z", "+00:00"))
        assert when.utcoffset() == datetime.timedelta(0)
        assert started - datetime.timedelta(seconds=1) <= when <= ended, line
        assert rec["level"] in ("debug", "info", "warning", "error", "critical"), line
        records.append(rec)
    by_event = {r.get("event"): r for r in records}
    conn = by_event["frontend-connected"]
    assert conn["export"] == "exp0" and conn["level"] == "info"
    assert conn["message"] == "exp0: frontend connected"
    disc = by_event["frontend-disconnected"]
    assert disc["export"] == "exp0"
    assert disc["reason"] == "frontend disconnected"
    assert disc["message"] == "exp0: frontend disconnected"
    shut = by_event["shutdown"]
    assert shut["reason"] == "SIGTERM" and "export" not in shut
    assert [r.get("event") for r in records].index("frontend-connected") < \
        [r.get("event") for r in records].index("frontend-disconnected")


def test_text_lines_unchanged(tmp_path: Path) -> None:
    """The default (and ``--log-format text``): ``pyvhost-blk: <message>``, nothing else."""
    sock = str(tmp_path / "vu.sock")
    for extra in ((), ("--log-format", "text")):
        with DaemonProcess(_args(tmp_path, *extra), tmp_path) as d:
            _connect_read_disconnect(d, sock, "frontend disconnected")
            assert d.terminate() == 0
            assert d.log().splitlines() == [
                "pyvhost-blk: exp0: frontend connected",
                "pyvhost-blk: exp0: frontend disconnected",
                "pyvhost-blk: SIGTERM: shutting down",
            ]


@pytest.mark.parametrize("argv, message", [
    (["--log-format", "xml"],
     "pyvhost-blk: --log-format xml: invalid log format (expected 'text' or 'json')"),
    (["--log-format=JSON"],
     "pyvhost-blk: --log-format JSON: invalid log format (expected 'text' or 'json')"),
    (["--log-format"], "pyvhost-blk: option '--log-format' requires an argument"),
])
def test_bad_log_format(argv: list[str], message: str) -> None:
    r = _run("--blockdev", "driver=null-co,node-name=n0", *argv)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == message + "\n"


def test_bad_log_level() -> None:
    r = _run("--blockdev", "driver=null-co,node-name=n0",
             env={**os.environ, "PYVHOST_BLK_LOG": "chatty"})
    assert r.returncode == 1
    assert r.stderr == ("pyvhost-blk: PYVHOST_BLK_LOG=CHATTY: unknown log level "
                        "(expected DEBUG, INFO, WARNING, ERROR or CRITICAL)\n")


def test_usage_error_stays_one_plain_line_in_json_mode(tmp_path: Path) -> None:
    """Command-line errors are one plain line whatever the format (documented)."""
    r = _run("--log-format", "json", "--blockdev",
             f"driver=file,node-name=d,filename={tmp_path / 'missing.img'}")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvhost-blk: --blockdev "), r.stderr


def test_formatter_one_line_with_traceback_and_extras() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    rec = logging.LogRecord("pyvhost_blk.vhost", logging.ERROR, __file__, 1,
                            "%s: two\nlines", ("exp0",), exc_info)
    rec.export = "exp0"
    rec.event = "frontend-failed"
    rec.path = Path("/tmp/x")  # not a JSON type: written with str()
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "exp0: two\nlines"
    assert out["level"] == "error" and out["logger"] == "pyvhost_blk.vhost"
    assert out["export"] == "exp0" and out["event"] == "frontend-failed"
    assert out["path"] == "/tmp/x"
    assert out["exception"].startswith("Traceback") and "ValueError: boom" in out["exception"]
    assert "args" not in out and "msg" not in out and "exc_info" not in out
