"""Prometheus metrics: ``--object x-prometheus,id=ID,port=PORT[,addr=ADDR]`` (ours).

Theory of operation
-------------------
Off unless the object is given.  Like every ``--object``, it is created in the main thread
while the daemon is configured: it binds ADDR:PORT (ADDR defaults to 127.0.0.1: the counters
are not for the network unless asked; ``port=0`` lets the kernel pick, and the startup log line,
event ``metrics-listening``, says which), so a port in use is a command-line error: one line,
exit 1.  A small HTTP server (the standard library's wsgiref with a thread per request) serves
``prometheus_client``'s WSGI app from its own thread, ``metrics-ID``; at exit (and when startup
fails) the daemon closes it.  Any path answers, ``/metrics`` by convention.

No counter lives here.  A scrape reads the counters QMP and the stats file read:

* ``Daemon.stats()``, which *is* ``x-pyvhost-stats`` and the ``--stats-file`` JSON: per queue
  requests, kicks and requests in flight; per export connections, fast-path and malformed
  requests; per iothread requests;
* each export's ``BlockAcctStats`` (what ``query-blockstats`` shows): operations, bytes, failed
  and invalid operations, total latency and latency-histogram bins per request type, kept in the
  BlockBackend's C state, which both request paths update with atomics;
* each export's iostatus and error-stop state (as ``query-block-exports`` shows them).

Those Python objects belong to the main thread (exports come and go through QMP, connections
close and their queues' counters are folded into totals there), so the scrape thread never walks
them.  It schedules one bottom half into the main AioContext (``schedule()``, the one thing any
thread may do to a context), which builds a plain snapshot exactly as a QMP command or SIGUSR1
would, and waits for it (``SNAPSHOT_TIMEOUT``); the metric families are then built from the
snapshot in the scrape thread.  A main loop that does not answer in time (busy for seconds, or
already gone at exit) gives ``pyvhost_blk_up 0`` and a warning instead of stale numbers.  Each
scrape reads every counter once, so within one scrape a histogram's buckets, ``_count`` and
``+Inf`` agree; between request types or exports they may be a request apart, as in QMP.

Metrics (labels in braces; ``op`` is the accounting's request type: ``read``, ``write``,
``flush``, ``unmap`` — QEMU's ``rd``/``wr``/``flush``/``unmap``):

* ``pyvhost_blk_up`` — 1 if this scrape could read the counters;
* ``pyvhost_blk_build_info{version}``, ``pyvhost_blk_export_info{export,node_name}``;
* ``pyvhost_blk_export_ops_total{export,op}`` (successful), ``..._failed_ops_total``,
  ``..._invalid_ops_total``, ``pyvhost_blk_export_bytes_total{export,op}`` (no ``flush``);
* ``pyvhost_blk_export_latency_seconds{export,op}`` — a histogram made of the accounting's bins
  (``le`` = the bins' boundaries, 10 µs … 1 s by default; QEMU's bins are [low, high), so
  ``le`` reads "below" — the difference is one nanosecond); ``_count`` = successful + failed
  operations, ``_sum`` = their total latency (``rd_total_time_ns``, ...);
* ``pyvhost_blk_export_requests_in_flight{export}``, ``pyvhost_blk_export_connected{export}``,
  ``pyvhost_blk_export_connections_total{export}``, ``..._fast_path_requests_total``,
  ``..._malformed_requests_total``, ``pyvhost_blk_export_fast_path{export}`` (1 = enabled),
  ``pyvhost_blk_export_stopped{export}`` (paused by ``rerror``/``werror=stop``);
* ``pyvhost_blk_export_iostatus{export,iostatus}`` — one series per state (``ok``, ``failed``,
  ``nospace``), 1 for the current one;
* ``pyvhost_blk_queue_requests_total{export,queue}``, ``pyvhost_blk_queue_kicks_total``,
  ``pyvhost_blk_queue_requests_in_flight``, ``pyvhost_blk_queue_info{export,queue,iothread}``
  (kicks count for the current connection only: a reconnect resets them, which ``rate()``
  handles as a counter reset);
* ``pyvhost_blk_iothread_requests_total{iothread}``;
* ``process_*`` from ``prometheus_client``'s process collector (CPU, memory, fds).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from blocklayer.accounting import BlockAcctType
from blocklayer.aio import AioContext, qemu_get_aio_context
from blocklayer.block_backend import BlockDeviceIoStatus, blk_get_stats
from pyvhost_blk import __version__
from pyvhost_blk.keyval import (
    KeyvalError,
    ParsedOption,
    check_keys,
    require,
    to_int,
    to_str,
)

if TYPE_CHECKING:
    from pyvhost_blk.daemon import Daemon

log = logging.getLogger("pyvhost_blk.metrics")

QOM_TYPE = "x-prometheus"
DEFAULT_ADDR = "127.0.0.1"
SNAPSHOT_TIMEOUT = 5.0  # seconds a scrape waits for the main loop (Prometheus allows 10 s)
_POLL_INTERVAL = 0.2  # how often the server thread looks for close(): bounds the wait at exit
_OPS = [(k, k.name.lower()) for k in BlockAcctType]  # read, write, flush, unmap

T = TypeVar("T")


# -- reading the counters (main thread) ----------------------------------------------------------
def daemon_snapshot(daemon: Daemon) -> dict[str, Any]:
    """Main thread: ``x-pyvhost-stats`` plus, per export, iostatus and the accounting arrays
    (``query-blockstats``'s counters, for every request type), as plain data."""
    snap = daemon.stats()
    for eid, exp in daemon.exports.items():
        acct = blk_get_stats(exp.blk)
        e = snap["exports"][eid]
        e["io-status"] = exp.blk.iostatus.value
        e["stopped"] = exp.stopped
        e["acct"] = {
            "nr_ops": acct.nr_ops,
            "nr_bytes": acct.nr_bytes,
            "failed_ops": acct.failed_ops,
            "invalid_ops": acct.invalid_ops,
            "total_time_ns": acct.total_time_ns,
            "boundaries": acct.boundaries,
            "bins": acct.bins,
        }
    return snap


def call_in_context(ctx: AioContext, fn: Callable[[], T], timeout: float) -> T:
    """From another thread: run ``fn()`` in ``ctx``'s loop and return its result.  Raises
    TimeoutError if the loop has not run it within ``timeout`` seconds (it then never will)."""
    fut: Future[T] = Future()

    def run() -> None:
        if not fut.set_running_or_notify_cancel():
            return  # the caller gave up
        try:
            fut.set_result(fn())
        except BaseException as e:  # handed to the waiting thread
            fut.set_exception(e)

    ctx.schedule(run)
    try:
        return fut.result(timeout)
    except TimeoutError:
        fut.cancel()
        raise


# -- snapshot -> metric families (any thread) ---------------------------------------------------
def _seconds(ns: int) -> float:
    return ns / 1e9


def _le(ns: int) -> str:
    return repr(_seconds(ns))


def metric_families(snap: dict[str, Any]) -> list[Metric]:
    """The ``pyvhost_blk_*`` families for one snapshot (see the module docstring)."""
    E, EO, EQ = ["export"], ["export", "op"], ["export", "queue"]
    info = InfoMetricFamily("pyvhost_blk_export", "An export and the node it serves", labels=E)
    ops = CounterMetricFamily("pyvhost_blk_export_ops_total",
                              "Requests completed successfully, by request type", labels=EO)
    failed = CounterMetricFamily("pyvhost_blk_export_failed_ops_total",
                                 "Requests that failed with an I/O error", labels=EO)
    invalid = CounterMetricFamily("pyvhost_blk_export_invalid_ops_total",
                                  "Requests refused as invalid (out of range, ...)", labels=EO)
    nbytes = CounterMetricFamily("pyvhost_blk_export_bytes_total",
                                 "Bytes read, written or unmapped by successful requests",
                                 labels=EO)
    latency = HistogramMetricFamily("pyvhost_blk_export_latency_seconds",
                                    "Request latency (successful and failed requests)",
                                    labels=EO)
    in_flight = GaugeMetricFamily("pyvhost_blk_export_requests_in_flight",
                                  "Requests popped from the rings and not yet completed",
                                  labels=E)
    connected = GaugeMetricFamily("pyvhost_blk_export_connected",
                                  "1 while a vhost-user frontend is attached", labels=E)
    connections = CounterMetricFamily("pyvhost_blk_export_connections_total",
                                      "vhost-user frontends accepted", labels=E)
    fast = CounterMetricFamily("pyvhost_blk_export_fast_path_requests_total",
                               "Requests completed by the C request path", labels=E)
    fast_on = GaugeMetricFamily("pyvhost_blk_export_fast_path",
                                "1 if the C request path is enabled", labels=E)
    malformed = CounterMetricFamily("pyvhost_blk_export_malformed_requests_total",
                                    "Requests with a malformed descriptor chain", labels=E)
    stopped = GaugeMetricFamily("pyvhost_blk_export_stopped",
                                "1 while the export is paused by an error policy (stop)",
                                labels=E)
    iostatus = GaugeMetricFamily("pyvhost_blk_export_iostatus",
                                 "The export's iostatus: 1 for the current state",
                                 labels=["export", "iostatus"])
    q_info = InfoMetricFamily("pyvhost_blk_queue", "The AioContext serving a queue",
                              labels=["export", "queue", "iothread"])
    q_requests = CounterMetricFamily("pyvhost_blk_queue_requests_total",
                                     "Requests popped from the queue", labels=EQ)
    q_kicks = CounterMetricFamily("pyvhost_blk_queue_kicks_total",
                                  "Kicks received (current connection)", labels=EQ)
    q_in_flight = GaugeMetricFamily("pyvhost_blk_queue_requests_in_flight",
                                    "Requests popped from the queue and not yet completed",
                                    labels=EQ)
    for eid, e in snap["exports"].items():
        info.add_metric([eid], {"node_name": e.get("node-name") or ""})
        acct = e["acct"]
        for kind, op in _OPS:
            ops.add_metric([eid, op], acct["nr_ops"][kind])
            failed.add_metric([eid, op], acct["failed_ops"][kind])
            invalid.add_metric([eid, op], acct["invalid_ops"][kind])
            if kind != BlockAcctType.FLUSH:
                nbytes.add_metric([eid, op], acct["nr_bytes"][kind])
            buckets, total = [], 0
            for bound, n in zip(acct["boundaries"] + [None], acct["bins"][kind], strict=True):
                total += n
                buckets.append(("+Inf" if bound is None else _le(bound), total))
            latency.add_metric([eid, op], buckets, _seconds(acct["total_time_ns"][kind]))
        queues = e.get("queues", [])
        in_flight.add_metric([eid], sum(q["in-flight"] for q in queues))
        connected.add_metric([eid], 1 if e.get("connected") else 0)
        connections.add_metric([eid], e.get("connections", 0))
        fast.add_metric([eid], e["fast-path-requests"])
        fast_on.add_metric([eid], 1 if e["fast-path"] else 0)
        malformed.add_metric([eid], e["malformed-requests"])
        stopped.add_metric([eid], 1 if e["stopped"] else 0)
        for state in BlockDeviceIoStatus:
            iostatus.add_metric([eid, state.value], 1 if e["io-status"] == state.value else 0)
        for q in queues:
            labels = [eid, str(q["queue"])]
            q_info.add_metric(labels + [q["iothread"]], {})
            q_requests.add_metric(labels, q["requests"])
            q_kicks.add_metric(labels, q["kicks"])
            q_in_flight.add_metric(labels, q["in-flight"])
    iothreads = CounterMetricFamily("pyvhost_blk_iothread_requests_total",
                                    "Requests popped by queues served in the iothread",
                                    labels=["iothread"])
    for name, t in snap["iothreads"].items():
        iothreads.add_metric([name], t["requests"])
    return [info, ops, failed, invalid, nbytes, latency, in_flight, connected, connections,
            fast, fast_on, malformed, stopped, iostatus, q_info, q_requests, q_kicks,
            q_in_flight, iothreads]


class DaemonCollector(Collector):
    """prometheus_client collector: one main-loop snapshot per scrape (scrape thread)."""

    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        snap: dict[str, Any] | None = None
        try:
            snap = self._read()
        except TimeoutError:
            log.warning("metrics: the main loop did not answer within %gs", SNAPSHOT_TIMEOUT,
                        extra={"event": "metrics-timeout"})
        except Exception:
            log.exception("metrics: cannot read the counters", extra={"event": "metrics-error"})
        yield GaugeMetricFamily("pyvhost_blk_up", "1 if this scrape could read the counters",
                                value=0 if snap is None else 1)
        yield InfoMetricFamily("pyvhost_blk_build", "pyvhost-blk's version",
                               value={"version": __version__})
        if snap is not None:
            yield from metric_families(snap)


# -- the HTTP server ----------------------------------------------------------------------------
class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape stuck waiting for the main loop never blocks exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log on stderr


class PrometheusExporter:
    """The ``x-prometheus`` object: a listening HTTP server for ``collector``'s metrics."""

    def __init__(self, id: str, addr: str, port: int, collector: Collector) -> None:
        self.id = id
        self.registry = CollectorRegistry()
        self.registry.register(collector)
        ProcessCollector(registry=self.registry)
        try:
            infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise OSError(e.errno, f"addr={addr}: {e.strerror}") from None
        family, _, _, _, sockaddr = infos[0]
        server_class = type("_Server", (_Server,), {"address_family": family})
        try:
            self.httpd = make_server(sockaddr[0], port, make_wsgi_app(self.registry),
                                     server_class, _QuietHandler)
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {_hostport(sockaddr[0], port)}: "
                                   f"{e.strerror or e}") from None
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": _POLL_INTERVAL},
                                        name=f"metrics-{id}", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (the port chosen by the kernel for ``port=0``)."""
        host, port = self.httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        return f"http://{_hostport(*self.address)}/metrics"

    def start(self) -> None:
        self._thread.start()
        host, port = self.address
        log.info("%s: Prometheus metrics on %s", self.id, self.url,
                 extra={"event": "metrics-listening", "object": self.id, "addr": host,
                        "port": port})

    def close(self) -> None:
        """Stop serving and close the listener (main thread, at exit or failed startup)."""
        if self._thread.is_alive():
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def prometheus_object_add(p: ParsedOption, daemon: Daemon) -> PrometheusExporter:
    """``--object x-prometheus,id=ID,port=PORT[,addr=ADDR]``: parse, bind, start serving.
    Main thread, while configuring.  KeyvalError for bad options, OSError if it cannot listen."""
    v, j = p.values, p.from_json
    check_keys(v, ("qom-type", "id", "port", "addr"))
    oid = to_str(require(v, "id"), "id", from_json=j)
    if oid in daemon.iothreads or oid in daemon.metrics:
        raise KeyvalError(
            f"attempt to add duplicate property '{oid}' to object (type 'container')"
        )
    port = to_int(require(v, "port"), "port", "uint16", from_json=j)
    addr = to_str(v["addr"], "addr", from_json=j) if "addr" in v else DEFAULT_ADDR
    ctx = qemu_get_aio_context()
    collector = DaemonCollector(
        lambda: call_in_context(ctx, lambda: daemon_snapshot(daemon), SNAPSHOT_TIMEOUT))
    exporter = PrometheusExporter(oid, addr, port, collector)
    exporter.start()
    return exporter
