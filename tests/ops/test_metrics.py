"""The Prometheus endpoint (``--object x-prometheus``) against the real daemon.

One daemon for the module (``metrics_daemon``), with the endpoint on a kernel-chosen port
(``port=0``; the startup log line gives it) and three exports, so each test can read deltas of
counters nobody else moves:

* ``fast``: a ``file`` image with ``aio=io_uring`` (the C request path), 2 queues, queue 0 in
  iothread ``io0`` and queue 1 in ``io1``;
* ``py``: a ``file`` image with ``aio=threads`` (the Python request path), 1 queue, in the main
  loop;
* ``prom``: a ``null-co`` disk, 1 queue, in iothread ``io2``, used only by the tests that go
  through a real Prometheus server.

``prometheus`` (module-scoped too) runs Debian's ``/usr/bin/prometheus`` on loopback with a
temporary config and TSDB, scraping the daemon every second; the tests query it through its
HTTP API.  It is stopped at the end of the module.  Bad options get fresh processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import DaemonProcess, pyvhost_blk_cmd
from tests.frontend.vhost_user import (
    S_IOERR,
    S_OK,
    SECTOR,
    T_DISCARD,
    connect,
    dwz_segment,
)

PROMETHEUS = "/usr/bin/prometheus"
IMG_SIZE = 16 << 20
KIB4 = 4096
URL_RE = re.compile(r"Prometheus metrics on (http://\S+/metrics)")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers ------------------------------------------------------------------------------------
def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 200
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}"
    return samples[key]


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return val(after, name, **labels) - val(before, name, **labels)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_tcp(pid: int) -> list[tuple[str, int]]:
    """(local address, port) of the TCP sockets process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:  # TCP_LISTEN
                    host, port = local.split(":")
                    found.append((host, int(port, 16)))
    return found


def run_daemon(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pyvhost_blk_cmd() + list(argv), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class MetricsDaemon:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sock = {name: str(workdir / f"{name}.sock") for name in ("fast", "py", "prom")}
        for name in ("fast", "py"):
            with open(workdir / f"{name}.img", "wb") as f:
                f.truncate(IMG_SIZE)
        exp = "type=vhost-user-blk,addr.type=unix,writable=on"
        self.d = DaemonProcess([
            "--object", "x-prometheus,id=metrics0,port=0",
            "--object", "iothread,id=io0", "--object", "iothread,id=io1",
            "--object", "iothread,id=io2",
            "--blockdev", f"driver=file,node-name=nfast,filename={workdir}/fast.img,"
                          "aio=io_uring",
            "--blockdev", f"driver=file,node-name=npy,filename={workdir}/py.img,aio=threads,"
                          "discard=unmap",
            "--blockdev", "driver=null-co,node-name=nprom,size=64M,read-zeroes=on",
            "--export", f"{exp},id=fast,node-name=nfast,addr.path={self.sock['fast']},"
                        "num-queues=2,iothread.0=io0,iothread.1=io1",
            "--export", f"{exp},id=py,addr.path={self.sock['py']},node-name=npy,num-queues=1",
            "--export", f"{exp},id=prom,node-name=nprom,addr.path={self.sock['prom']},"
                        "num-queues=1,iothread=io2",
        ], workdir, wait_sockets=False)
        try:  # never leave a daemon behind
            self.d.wait_for_sockets()
            m = URL_RE.search(self.d.log())
            assert m, self.d.log()
        except BaseException:
            self.d.close()
            raise
        self.url = m.group(1)
        self.host, self.port = urllib.parse.urlsplit(self.url).netloc.rsplit(":", 1)

    def scrape(self) -> Samples:
        return scrape(self.url)

    def scrape_disconnected(self, export: str, timeout: float = 10) -> Samples:
        """A scrape once ``export`` has no frontend: the daemon sees a frontend's close (and
        folds its queues' counters into totals) a moment after the frontend closed."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.scrape()
            if val(s, "pyvhost_blk_export_connected", export=export) == 0:
                return s
            assert time.monotonic() < deadline, f"{export} still connected after {timeout}s"
            time.sleep(0.02)

    def close(self) -> None:
        self.d.close()


@pytest.fixture(scope="module")
def metrics_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsDaemon]:
    md = MetricsDaemon(tmp_path_factory.mktemp("metrics"))
    try:
        yield md
        assert md.d.proc.poll() is None, md.d.log()
        assert md.d.terminate() == 0, md.d.log()
        assert "Traceback" not in md.d.log(), md.d.log()
    finally:
        md.close()


class Prometheus:
    """A real Prometheus server scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        if not os.access(PROMETHEUS, os.X_OK):
            pytest.fail(f"{PROMETHEUS} is missing: apt-get install prometheus", pytrace=False)
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "pyvhost-blk",
                                "static_configs": [{"targets": [target]}]}],
        }
        cfg = workdir / "prometheus.yml"
        cfg.write_text(json.dumps(config))  # YAML is a superset of JSON
        self.base = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address={self.base[len('http://'):]}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            try:
                with urllib.request.urlopen(self.base + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready after 60s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The value of a query that yields one series (None while it yields none)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_value(self, expr: str, expected: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.value(expr)
            if got == expected:
                return
            time.sleep(0.25)
        raise AssertionError(f"{expr} = {got}, expected {expected} (after {timeout}s);\n"
                             f"targets: {self.query_targets()}\nlog:\n{self.log()}")

    def query_targets(self) -> Any:
        with urllib.request.urlopen(self.base + "/api/v1/targets", timeout=10) as r:
            return json.load(r)["data"]["activeTargets"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def prometheus(metrics_daemon: MetricsDaemon,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    p = Prometheus(tmp_path_factory.mktemp("prometheus"),
                   f"{metrics_daemon.host}:{metrics_daemon.port}")
    try:
        yield p
    finally:
        p.stop()


# -- scraping the endpoint directly -------------------------------------------------------------
def test_listens_on_localhost_only(metrics_daemon: MetricsDaemon) -> None:
    """Default addr: 127.0.0.1, and the daemon's only TCP listener is the endpoint."""
    assert metrics_daemon.host == "127.0.0.1"
    assert listening_tcp(metrics_daemon.d.proc.pid) == [("0100007F", int(metrics_daemon.port))]


def test_off_by_default(tmp_path: Path) -> None:
    with DaemonProcess(["--blockdev", "driver=null-co,node-name=n0",
                        "--export", "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,"
                                    f"addr.path={tmp_path / 's.sock'}"], tmp_path) as d:
        assert listening_tcp(d.proc.pid) == []
        assert "Prometheus" not in d.log()
        assert d.terminate() == 0


def test_counters_move_with_known_io(metrics_daemon: MetricsDaemon) -> None:
    """N reads on queue 0 and M writes on queue 1 of ``fast`` (C path, two iothreads): ops,
    bytes, latency histogram, queue and iothread counters move by exactly that."""
    n_reads, n_writes = 7, 5
    md = metrics_daemon
    before = md.scrape()
    with connect(md.sock["fast"]) as fe:
        fe.setup(queue_size=64)
        connected = md.scrape()
        for i in range(n_reads):
            status, data = fe.read(i * 8, KIB4, queue=0)
            assert status == S_OK and len(data) == KIB4
        for i in range(n_writes):
            assert fe.write(64 + i * 8, bytes([i + 1]) * KIB4, queue=1) == S_OK
        during = md.scrape()
    after = md.scrape_disconnected("fast")
    e = {"export": "fast"}
    assert val(connected, "pyvhost_blk_export_connected", **e) == 1
    assert delta(connected, before, "pyvhost_blk_export_connections_total", **e) == 1
    assert val(during, "pyvhost_blk_export_requests_in_flight", **e) == 0
    for sample in (during, after):
        assert delta(sample, before, "pyvhost_blk_export_ops_total", op="read", **e) == n_reads
        assert delta(sample, before, "pyvhost_blk_export_bytes_total", op="read",
                     **e) == n_reads * KIB4
        assert delta(sample, before, "pyvhost_blk_export_ops_total", op="write",
                     **e) == n_writes
        assert delta(sample, before, "pyvhost_blk_export_bytes_total", op="write",
                     **e) == n_writes * KIB4
    for op in ("read", "write", "flush", "unmap"):
        assert delta(after, before, "pyvhost_blk_export_failed_ops_total", op=op, **e) == 0
        assert delta(after, before, "pyvhost_blk_export_invalid_ops_total", op=op, **e) == 0
    assert delta(after, before, "pyvhost_blk_export_ops_total", op="flush", **e) == 0
    # reads of an io_uring file are served in C (whether a write is depends on the image)
    assert n_reads <= delta(after, before, "pyvhost_blk_export_fast_path_requests_total",
                            **e) <= n_reads + n_writes
    assert val(after, "pyvhost_blk_export_connected", **e) == 0
    # per queue and per iothread
    assert delta(after, before, "pyvhost_blk_queue_requests_total", queue="0", **e) == n_reads
    assert delta(after, before, "pyvhost_blk_queue_requests_total", queue="1", **e) == n_writes
    assert val(after, "pyvhost_blk_queue_info", queue="0", iothread="io0", **e) == 1
    assert val(after, "pyvhost_blk_queue_info", queue="1", iothread="io1", **e) == 1
    assert delta(after, before, "pyvhost_blk_iothread_requests_total", iothread="io0") == n_reads
    assert delta(after, before, "pyvhost_blk_iothread_requests_total", iothread="io1") == n_writes
    # latency histograms: counts, cumulative buckets, a positive sum
    for op, n in (("read", n_reads), ("write", n_writes)):
        h = "pyvhost_blk_export_latency_seconds"
        assert delta(after, before, f"{h}_count", op=op, **e) == n
        assert delta(after, before, f"{h}_bucket", op=op, le="+Inf", **e) == n
        assert delta(after, before, f"{h}_sum", op=op, **e) > 0
        buckets = sorted(
            (float(dict(k[1])["le"]), v) for k, v in after.items()
            if k[0] == f"{h}_bucket" and dict(k[1]).get("export") == "fast"
            and dict(k[1]).get("op") == op
        )
        assert [b for b, _ in buckets][:-1] == [1e-05, 0.0001, 0.001, 0.01, 0.1, 1.0]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and counts[-1] == val(after, f"{h}_count", op=op, **e)
    assert val(after, "pyvhost_blk_up") == 1
    assert val(after, "pyvhost_blk_export_iostatus", iostatus="ok", **e) == 1
    assert val(after, "pyvhost_blk_export_iostatus", iostatus="failed", **e) == 0
    assert val(after, "pyvhost_blk_export_info", node_name="nfast", **e) == 1


def test_python_path_flush_unmap_and_invalid(metrics_daemon: MetricsDaemon) -> None:
    """``py`` (aio=threads: the Python path): flushes, discards (``unmap``) and an
    out-of-range read (invalid) are counted by type; nothing is counted as fast path."""
    md = metrics_daemon
    before = md.scrape()
    with connect(md.sock["py"]) as fe:
        fe.setup(queue_size=64)
        for i in range(3):
            assert fe.write(i * 8, b"\x5a" * KIB4) == S_OK
        for _ in range(2):
            assert fe.flush() == S_OK
        req = fe.blk(T_DISCARD, 0, dwz_segment(0, 16), 1)
        assert req.status == S_OK
        status, _ = fe.read(IMG_SIZE // SECTOR, KIB4)  # past the end
        assert status == S_IOERR
    after = md.scrape_disconnected("py")
    e = {"export": "py"}
    assert delta(after, before, "pyvhost_blk_export_ops_total", op="write", **e) == 3
    assert delta(after, before, "pyvhost_blk_export_ops_total", op="flush", **e) == 2
    assert delta(after, before, "pyvhost_blk_export_ops_total", op="unmap", **e) == 1
    assert delta(after, before, "pyvhost_blk_export_bytes_total", op="unmap",
                 **e) == 16 * SECTOR
    assert delta(after, before, "pyvhost_blk_export_invalid_ops_total", op="read", **e) == 1
    assert delta(after, before, "pyvhost_blk_export_ops_total", op="read", **e) == 0
    assert delta(after, before, "pyvhost_blk_export_latency_seconds_count", op="flush",
                 **e) == 2
    assert delta(after, before, "pyvhost_blk_export_fast_path_requests_total", **e) == 0
    assert delta(after, before, "pyvhost_blk_queue_requests_total", queue="0", **e) == 7
    assert ("pyvhost_blk_export_bytes_total",
            frozenset({"export": "py", "op": "flush"}.items())) not in after


def test_same_numbers_as_stats_file_and_qmp(metrics_daemon: MetricsDaemon) -> None:
    """With no I/O in between, a scrape and the stats file (x-pyvhost-stats) agree."""
    md = metrics_daemon
    with connect(md.sock["fast"]) as fe:
        fe.setup(queue_size=64)
        for i in range(4):
            assert fe.write(i * 8, b"\x01" * KIB4, queue=i % 2) == S_OK
    s = md.scrape_disconnected("fast")
    stats = md.d.stats()
    for eid, ex in stats["exports"].items():
        bs = ex["blockstats"]
        for op, p in (("read", "rd"), ("write", "wr"), ("flush", "flush"), ("unmap", "unmap")):
            assert val(s, "pyvhost_blk_export_ops_total", export=eid, op=op) == \
                bs[f"{p}_operations"]
            assert val(s, "pyvhost_blk_export_failed_ops_total", export=eid, op=op) == \
                bs[f"failed_{p}_operations"]
            assert val(s, "pyvhost_blk_export_latency_seconds_sum", export=eid, op=op) == \
                pytest.approx(bs[f"{p}_total_time_ns"] / 1e9)
            if op != "flush":
                assert val(s, "pyvhost_blk_export_bytes_total", export=eid, op=op) == \
                    bs[f"{p}_bytes"]
        for op, p in (("read", "rd"), ("write", "wr"), ("flush", "flush")):
            assert val(s, "pyvhost_blk_export_latency_seconds_count", export=eid, op=op) == \
                sum(bs[f"{p}_latency_histogram"]["bins"])
        for q in ex["queues"]:
            labels = {"export": eid, "queue": str(q["queue"])}
            assert val(s, "pyvhost_blk_queue_requests_total", **labels) == q["requests"]
            assert val(s, "pyvhost_blk_queue_kicks_total", **labels) == q["kicks"]
        assert val(s, "pyvhost_blk_export_connections_total", export=eid) == ex["connections"]
        assert val(s, "pyvhost_blk_export_fast_path_requests_total", export=eid) == \
            ex["fast-path-requests"]
    for name, t in stats["iothreads"].items():
        assert val(s, "pyvhost_blk_iothread_requests_total", iothread=name) == t["requests"]


def test_concurrent_scrapes_during_connects(metrics_daemon: MetricsDaemon) -> None:
    """Scrapes from several threads while frontends come and go (queues created and folded
    into totals in the main loop): every scrape succeeds and reads the counters."""
    md = metrics_daemon
    stop = threading.Event()
    results: list[float] = []
    errors: list[BaseException] = []

    def scraper() -> None:
        while not stop.is_set():
            try:
                results.append(val(md.scrape(), "pyvhost_blk_up"))
            except BaseException as e:  # reported below
                errors.append(e)
                return

    threads = [threading.Thread(target=scraper) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            with connect(md.sock["fast"]) as fe:
                fe.setup(queue_size=64)
                assert fe.read(i * 8, KIB4, queue=i % 2)[0] == S_OK
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert results and set(results) == {1.0}
    assert "metrics-" not in md.d.log().replace("metrics-listening", "")


# -- through a real Prometheus server -------------------------------------------------------------
def test_prometheus_scrapes_io_counters(metrics_daemon: MetricsDaemon,
                                        prometheus: Prometheus) -> None:
    """Prometheus scrapes the endpoint; its queries show exactly the I/O done on ``prom``."""
    prometheus.wait_value('up{job="pyvhost-blk"}', 1)
    prometheus.wait_value('pyvhost_blk_up{job="pyvhost-blk"}', 1)
    e = 'export="prom"'
    prometheus.wait_value(f'pyvhost_blk_export_ops_total{{{e},op="read"}}', 0)
    n_reads, n_writes = 9, 4
    with connect(metrics_daemon.sock["prom"]) as fe:
        fe.setup(queue_size=64)
        for i in range(n_reads):
            assert fe.read(i * 8, KIB4)[0] == S_OK
        for i in range(n_writes):
            assert fe.write(i * 8, b"\x33" * KIB4) == S_OK
        prometheus.wait_value(f"pyvhost_blk_export_connected{{{e}}}", 1)
    prometheus.wait_value(f'pyvhost_blk_export_ops_total{{{e},op="read"}}', n_reads)
    prometheus.wait_value(f'pyvhost_blk_export_bytes_total{{{e},op="read"}}', n_reads * KIB4)
    prometheus.wait_value(f'pyvhost_blk_export_ops_total{{{e},op="write"}}', n_writes)
    prometheus.wait_value(f'pyvhost_blk_export_bytes_total{{{e},op="write"}}', n_writes * KIB4)
    prometheus.wait_value(f'pyvhost_blk_export_latency_seconds_count{{{e},op="read"}}', n_reads)
    prometheus.wait_value(
        f'pyvhost_blk_export_latency_seconds_bucket{{{e},op="write",le="+Inf"}}', n_writes)
    prometheus.wait_value(f"sum(pyvhost_blk_queue_requests_total{{{e}}})", n_reads + n_writes)
    prometheus.wait_value('pyvhost_blk_iothread_requests_total{iothread="io2"}',
                          n_reads + n_writes)
    prometheus.wait_value(f"pyvhost_blk_export_connected{{{e}}}", 0)
    prometheus.wait_value(f'pyvhost_blk_export_iostatus{{{e},iostatus="ok"}}', 1)
    # a PromQL function over the histogram: every request took under a second
    prometheus.wait_value(
        f'pyvhost_blk_export_latency_seconds_bucket{{{e},op="read",le="1.0"}}'
        f' / ignoring(le) pyvhost_blk_export_latency_seconds_count{{{e},op="read"}}', 1)


def test_prometheus_sees_later_io(metrics_daemon: MetricsDaemon, prometheus: Prometheus) -> None:
    """The same Prometheus server (module-scoped) follows the counters as they move on."""
    e = 'export="prom"'
    expr = f'pyvhost_blk_export_ops_total{{{e},op="write"}}'
    prometheus.wait_value('up{job="pyvhost-blk"}', 1)
    before = prometheus.value(expr)
    assert before is not None
    conns = prometheus.value(f"pyvhost_blk_export_connections_total{{{e}}}")
    assert conns is not None
    with connect(metrics_daemon.sock["prom"]) as fe:
        fe.setup(queue_size=64)
        for i in range(6):
            assert fe.write(i * 8, b"\x44" * KIB4) == S_OK
        assert fe.flush() == S_OK
    prometheus.wait_value(expr, before + 6)
    prometheus.wait_value(f'pyvhost_blk_export_ops_total{{{e},op="flush"}}', 1)
    prometheus.wait_value(f"pyvhost_blk_export_connections_total{{{e}}}", conns + 1)


# -- bad options ----------------------------------------------------------------------------------
def test_port_in_use(tmp_path: Path) -> None:
    """A port already in use: one line, exit 1, no socket left behind."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        sock = tmp_path / "s.sock"
        r = run_daemon("--object", "iothread,id=io0",
                       "--object", f"x-prometheus,id=metrics0,port={port}",
                       "--blockdev", "driver=null-co,node-name=n0",
                       "--export", "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,"
                                   f"addr.path={sock}")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == (f"pyvhost-blk: --object x-prometheus,id=metrics0,port={port}: "
                        f"cannot listen on 127.0.0.1:{port}: Address already in use\n")
    assert not sock.exists()


@pytest.mark.parametrize("opt, message", [
    ("x-prometheus,id=m0", "Parameter 'port' is missing"),
    ("x-prometheus,port=9910", "Parameter 'id' is missing"),
    ("x-prometheus,id=m0,port=65536", "Parameter 'port' expects uint16_t"),
    ("x-prometheus,id=m0,port=http", "Parameter 'port' expects integer"),
    ("x-prometheus,id=m0,port=0,bind=all", "Parameter 'bind' is unexpected"),
    ("x-prometheus,id=m0,port=0,addr=no-such-host.invalid", "addr=no-such-host.invalid: "),
    ("x-prometheus,id=io0,port=0",
     "attempt to add duplicate property 'io0' to object (type 'container')"),
])
def test_bad_options(opt: str, message: str) -> None:
    r = run_daemon("--object", "iothread,id=io0", "--object", opt)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"pyvhost-blk: --object {opt}: "), lines
    assert message in lines[0]


def test_json_object_and_ipv6_loopback(tmp_path: Path) -> None:
    """JSON syntax works too; ``addr=::1`` listens on IPv6 loopback (if the host has it)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        addr = "::1"
    except OSError:
        addr = "127.0.0.1"
    obj = json.dumps({"qom-type": "x-prometheus", "id": "m0", "port": 0, "addr": addr})
    with DaemonProcess(["--object", obj, "--blockdev", "driver=null-co,node-name=n0",
                        "--export", "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,"
                                    f"addr.path={tmp_path / 's.sock'}"], tmp_path) as d:
        m = URL_RE.search(d.log())
        assert m, d.log()
        s = scrape(m.group(1))
        assert val(s, "pyvhost_blk_export_ops_total", export="e0", op="read") == 0
        assert d.terminate() == 0


# -- the scrape thread and the main loop (in-process) --------------------------------------------
def test_call_in_context_runs_in_the_loop_thread() -> None:
    from blocklayer.aio import AioContext
    from pyvhost_blk.metrics import call_in_context

    ctx = AioContext("metrics-test")
    t = threading.Thread(target=ctx.run)
    t.start()
    try:
        assert call_in_context(ctx, threading.get_ident, 5) == t.ident
        with pytest.raises(ZeroDivisionError):
            call_in_context(ctx, lambda: 1 // 0, 5)
    finally:
        ctx.stop()
        t.join(10)
        ctx.close()


def test_call_in_context_gives_up_on_a_loop_that_does_not_run() -> None:
    from blocklayer.aio import AioContext
    from pyvhost_blk.metrics import call_in_context

    ctx = AioContext("metrics-test")
    ran = []
    try:
        with pytest.raises(TimeoutError):
            call_in_context(ctx, lambda: ran.append(1), 0.1)
        ctx.aio_poll(blocking=False)  # the loop comes back: the abandoned call is skipped
        assert ran == []
    finally:
        ctx.close()


def test_collector_reports_down_instead_of_failing(caplog: pytest.LogCaptureFixture) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from pyvhost_blk.metrics import DaemonCollector

    def timeout() -> dict[str, Any]:
        raise TimeoutError

    def broken() -> dict[str, Any]:
        raise KeyError("exports")

    for read, event in ((timeout, "metrics-timeout"), (broken, "metrics-error")):
        reg = CollectorRegistry()
        reg.register(DaemonCollector(read))
        caplog.clear()
        text = generate_latest(reg).decode()
        assert "pyvhost_blk_up 0.0" in text
        assert "pyvhost_blk_export_" not in text
        assert [r.event for r in caplog.records] == [event]
