"""Benchmark pyvhost-blk against qemu-storage-daemon, in the same run.

    python -m benchmarks.run [--quick] [--pairs 5] [--only ours|qsd] [--no-pin]
                             [--ours CMD] [--qsd CMD] [--json OUT] ...

For every case (backend x workload) the daemon under test is started with the
same --blockdev/--export arguments qemu-storage-daemon takes, the libblkio
client (benchmarks/blkio_client.c) drives it for a few seconds, and the daemon
is stopped with SIGTERM.

Fairness: both daemons get the same shape, qsd its best configuration (stated in
the output): one iothread running the export (``--object iothread,id=io0``, the
export's ``iothread=io0``), Linux AIO + O_DIRECT for files.  The client is pinned
to CPU 0 and the daemon to CPU 1 (``taskset``; ``--no-pin`` turns that off).  Pairs
of runs alternate their order (ours then qsd, qsd then ours, ...) so drift of the
machine affects both sides alike.  Each side's figure is the median IOPS of its
runs with their min-max; the daemon's CPU time (utime+stime, /proc/PID/stat) is
read around every run, giving IOPS per daemon CPU-second and its ratio ours/qsd;
``perf stat -e cycles -p PID`` adds cycles per request where the CPU has counters.
The ``-poll0`` cases run our iothread with ``poll-max-ns=0`` (no polling).  With
--json OUT.json the runner also writes OUT.md (a Markdown report) and OUT.png
(a chart; needs matplotlib) next to it, see benchmarks/report.py.

Keep the machine otherwise idle while this runs (``--wait-idle SECS`` waits for
it before each run): it has two cores to share between the client and the
daemon.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks.build_client import build_client

GIB = 1 << 30
DISK_SIZE = GIB
# qsd 7.2 rejects size=1G for null-co ("Parameter 'size' expects integer").
NULL_BLOCKDEV = f"driver=null-co,node-name=disk0,size={DISK_SIZE}"
MEMORY_BLOCKDEV = "driver=x-memory,node-name=disk0,size=256M"  # ours only: a Python driver
# Best-performing file settings for qsd 7.2 on tmpfs here: Linux AIO with
# O_DIRECT (tmpfs supports O_DIRECT since Linux 6.6); falls back to io_uring
# when the kernel refuses O_DIRECT on tmpfs.  Measured 4k randread QD32 on
# this machine: native+direct ~370K, io_uring ~145K, io_uring+direct ~155K,
# threads ~110K IOPS.
QSD_FILE_OPTS = "aio=native,cache.direct=on"
QSD_FILE_FALLBACK_OPTS = "aio=io_uring"
OURS_FILE_OPTS = "aio=native,cache.direct=on"

SIDES = ("ours", "qsd")
# A run during which other processes used more than this much CPU (percent of
# one core) is flagged: with two cores, a busy neighbour changes everything.
BUSY_OTHER_PCT = 15.0
# client attempts when the daemon's socket exists but is not listening yet
CONNECT_TRIES = 5


#: the daemon's CPU and the client's, when pinned (``--no-pin`` turns pinning off)
CLIENT_CPU = 0
DAEMON_CPU = 1
#: both daemons run their export in one iothread (qsd's best shape: its iothread, unlike its
#: main loop, is the context QEMU optimises for); ``--no-iothread`` gives neither one
IOTHREAD_OBJ = "iothread,id=io0"
#: polling off, for our side of the ``-poll0`` cases
POLL0_OBJ = "iothread,id=io0,poll-max-ns=0"


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str     # "null" or "file"
    rw: str
    iodepth: int
    queues: int
    bs: int = 4096
    #: extra options for *our* side only: "python" (fast-path=off: every request through the
    #: node graph's Python code, in batches), "iothreads" (queues spread over one iothread
    #: each; qsd keeps all its queues on one iothread, its best setup) or "poll0" (our
    #: iothread with poll-max-ns=0)
    variant: str = ""

    @property
    def name(self) -> str:
        size = "" if self.bs == 4096 else f"-{self.bs // 1024}k"
        var = f"-{self.variant}" if self.variant else ""
        return f"{self.backend}-{self.rw}{size}-qd{self.iodepth}-{self.queues}q{var}"

    @property
    def label(self) -> str:
        var = f" {self.variant}" if self.variant else ""
        return (f"{self.backend:<6} {self.bs // 1024}k {self.rw:<9} QD{self.iodepth:<2} "
                f"{self.queues}q{var}")

    def daemon_opts(self, side: str, iothread: bool = True) -> tuple[list[str], str]:
        """(extra daemon arguments, extra export options) of `side` for this case.

        Both sides get the same shape -- one iothread running the export (``--object
        iothread,id=io0`` and the export's ``iothread=io0``) -- unless ``iothread`` is False
        (neither gets one) or the variant changes *our* side."""
        if side == "ours" and self.variant == "iothreads":
            objs = []
            for i in range(self.queues):
                objs += ["--object", f"iothread,id=io{i}"]
            return objs, "".join(f",iothread.{i}=io{i}" for i in range(self.queues))
        extra = ",fast-path=off" if side == "ours" and self.variant == "python" else ""
        if side == "ours" and self.variant == "poll0":
            return ["--object", POLL0_OBJ], ",iothread=io0"
        if not iothread:
            return [], extra
        return ["--object", IOTHREAD_OBJ], ",iothread=io0" + extra

    def ours_export_opts(self) -> tuple[list[str], str]:
        """(extra daemon arguments, extra export options) for our side."""
        return self.daemon_opts("ours")


def all_cases() -> list[Case]:
    cases = []
    for backend in ("null", "file"):
        cases += [
            Case(backend, "randread", 1, 1),
            Case(backend, "randread", 32, 1),
            # polling off on our side: what one request costs without it
            Case(backend, "randread", 1, 1, variant="poll0"),
            Case(backend, "randread", 32, 1, variant="poll0"),
            Case(backend, "randread", 32, 2),
            Case(backend, "randread", 32, 2, variant="iothreads"),
            Case(backend, "randwrite", 32, 1),
            Case(backend, "read", 16, 1, bs=65536),
            Case(backend, "write", 16, 1, bs=65536),
        ]
    # Python code per request, compared with qsd's null-co: the node graph's batch path
    # (fast-path=off), and a driver written in Python (x-memory, batched).
    # the same file under a raw format node with an offset, both sides (the graph's cost)
    cases.append(Case("raw", "randread", 32, 1))
    cases.append(Case("raw", "randwrite", 32, 1))
    cases.append(Case("null", "randread", 32, 1, variant="python"))
    cases.append(Case("memory", "randread", 32, 1))
    cases.append(Case("memory", "randwrite", 32, 1))
    return cases


#: queue depths of ``--sweep``
SWEEP_DEPTHS = (1, 2, 4, 8, 16, 32, 64, 128)


def sweep_cases() -> list[Case]:
    """``--sweep``: 4 KiB randread on one queue at every depth of SWEEP_DEPTHS, null-co and
    file, both sides with their default settings (one iothread, ours polling adaptively), then
    the same with our polling off (the ``-poll0`` variant)."""
    return [Case(backend, "randread", qd, 1, variant=variant)
            for variant in ("", "poll0")
            for backend in ("null", "file") for qd in SWEEP_DEPTHS]


class BenchError(RuntimeError):
    startup = False

    @property
    def summary(self) -> str:
        """First line of the message plus the daemon's last log line, if any."""
        lines = [ln for ln in str(self).splitlines() if ln.strip()]
        if len(lines) > 1:
            return f"{lines[0].rstrip(':')}: {lines[-1].strip()}"
        return lines[0] if lines else "error"


# --------------------------------------------------------------------------
# daemon handling


def _proc_cpu_seconds(pid: int) -> float | None:
    """utime+stime of a process (all threads), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, IndexError, ValueError):
        return None


def _system_busy_seconds() -> float | None:
    """CPU seconds spent non-idle by the whole machine so far (all CPUs)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait: float, sample: float = 0.5) -> float:
    """Wait (up to max_wait s) until the machine's busy CPU over `sample` s is
    below BUSY_OTHER_PCT of one core; return the last measured busy percent."""
    deadline = time.monotonic() + max_wait
    while True:
        b0 = _system_busy_seconds()
        time.sleep(sample)
        b1 = _system_busy_seconds()
        if b0 is None or b1 is None:
            return 0.0
        busy = (b1 - b0) / sample * 100.0
        if busy <= BUSY_OTHER_PCT or time.monotonic() >= deadline:
            return busy
        time.sleep(1.0)


def _tail(path: pathlib.Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def pin_prefix(cpu: int | None) -> list[str]:
    """``taskset -c CPU`` (which execs the command: same PID), or nothing."""
    if cpu is None:
        return []
    taskset = shutil.which("taskset")
    if taskset is None:
        raise SystemExit("benchmarks.run: taskset not found (util-linux); use --no-pin")
    return [taskset, "-c", str(cpu)]


def perf_status() -> tuple[bool, str]:
    """(cycles can be counted, a sentence for the report)."""
    perf = shutil.which("perf")
    if perf is None:
        return False, "perf not installed: no cycles per request"
    try:
        proc = subprocess.run([perf, "stat", "-x", ",", "-e", "cycles", "--", "true"],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"perf does not run ({exc}): no cycles per request"
    value = _perf_cycles(proc.stderr)
    if proc.returncode != 0 or value is None:
        why = "cycles <not supported>" if "not supported" in proc.stderr else \
            (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return False, (f"perf cannot count cycles here ({why}; no hardware PMU in this VM?): "
                       "no cycles per request; CPU time per request comes from /proc")
    return True, "cycles per request from perf stat -e cycles -p PID"


def _perf_cycles(text: str) -> float | None:
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("cycles"):
            try:
                return float(fields[0])
            except ValueError:
                return None
    return None


class PerfCounter:
    """``perf stat -e cycles -p PID`` around a run (SIGINT stops it and makes it report)."""

    def __init__(self, pid: int, out: pathlib.Path):
        self.out = out
        self.proc = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", "cycles", "-o", str(out), "-p", str(pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> float | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        try:
            return _perf_cycles(self.out.read_text())
        except OSError:
            return None


class Daemon:
    """One daemon process exporting disk0 over a vhost-user socket."""

    def __init__(self, cmd: list[str], blockdev: str, sock: pathlib.Path,
                 queues: int, log: pathlib.Path, extra_args: list[str] | None = None,
                 export_opts: str = "", cpu: int | None = None):
        self.sock = sock
        self.log = log
        self.argv = [
            *pin_prefix(cpu),
            *cmd,
            *(extra_args or []),
            "--blockdev", blockdev,
            "--export",
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
            f"addr.path={sock},writable=on,num-queues={queues}{export_opts}",
        ]
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self, timeout: float = 15.0) -> None:
        if self.sock.exists() or self.sock.is_symlink():
            self.sock.unlink()
        with open(self.log, "ab") as logf:
            logf.write(("$ " + shlex.join(self.argv) + "\n").encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                self.returncode = rc
                raise BenchError(f"{self.argv[0]} exited with status {rc} before creating "
                                 f"its socket:\n{_tail(self.log)}")
            try:
                if stat.S_ISSOCK(self.sock.stat().st_mode):
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        self.stop()
        raise BenchError(f"{self.argv[0]} did not create {self.sock} within {timeout:.0f} s:\n"
                         f"{_tail(self.log)}")

    def cpu_seconds(self) -> float | None:
        return _proc_cpu_seconds(self.proc.pid) if self.proc else None

    def rss_mib(self) -> tuple[float, float] | None:
        """(RSS without shared guest memory, shared memory) in MiB: the guest's RAM is a
        shared memfd mapping, counted in RssShmem."""
        if self.proc is None:
            return None
        try:
            fields = {}
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    fields[k] = v.split()
            anon_file = int(fields["RssAnon"][0]) + int(fields["RssFile"][0])
            return anon_file / 1024, int(fields["RssShmem"][0]) / 1024
        except (OSError, KeyError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.proc is None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with open(self.log, "ab") as logf:
                    logf.write(b"[bench] no exit within 10 s of SIGTERM; sending SIGKILL\n")
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        self.proc = None
        if self.sock.exists():
            try:
                self.sock.unlink()
            except OSError:
                pass
        return self.returncode


# --------------------------------------------------------------------------
# one run


def run_once(side: str, cmd: list[str], blockdev: str, case: Case, client: pathlib.Path,
             workdir: pathlib.Path, runtime: float, client_poll: bool, rep: int,
             pin: bool = True, iothread: bool = True, perf: bool = False) -> dict:
    sock = workdir / f"{side}.sock"
    log = workdir / f"{case.name}.{side}.{rep + 1}.log"
    extra_args, export_opts = case.daemon_opts(side, iothread)
    daemon = Daemon(cmd, blockdev, sock, case.queues, log, extra_args, export_opts,
                    cpu=DAEMON_CPU if pin else None)
    result: dict = {"side": side, "case": case.name, "daemon_log": str(log)}
    try:
        daemon.start()
    except BenchError as exc:
        exc.startup = True
        raise
    try:
        argv = [*pin_prefix(CLIENT_CPU if pin else None),
                str(client), "--socket", str(sock), "--mode", "bench", "--rw", case.rw,
                "--bs", str(case.bs), "--iodepth", str(case.iodepth), "--queues",
                str(case.queues), "--runtime", f"{runtime:g}"]
        idle = daemon.rss_mib()
        if idle is not None:
            result["rss_idle_mib"] = round(idle[0], 1)
        loaded: list = []
        sampler = threading.Timer(runtime / 2 + 0.3, lambda: loaded.append(daemon.rss_mib()))
        sampler.start()
        if client_poll:
            argv.append("--poll")
        counter = None
        for attempt in range(CONNECT_TRIES):
            if perf and daemon.proc is not None:
                counter = PerfCounter(daemon.proc.pid, workdir / f"{side}.perf")
            cpu0 = daemon.cpu_seconds()
            sys0 = _system_busy_seconds()
            t0 = time.monotonic()
            try:
                proc = subprocess.run(argv, capture_output=True, text=True,
                                      timeout=runtime + 60, check=False)
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"client did not finish within {runtime + 60:.0f} s") from exc
            wall = time.monotonic() - t0
            cpu1 = daemon.cpu_seconds()
            sys1 = _system_busy_seconds()
            cycles = counter.stop() if counter is not None else None
            # The socket file exists from bind() on, but connecting fails until listen():
            # on a busy machine the client can fall in between.
            if not (proc.returncode == 3 and "Connection refused" in proc.stderr
                    and attempt + 1 < CONNECT_TRIES):
                break
            time.sleep(0.2)
        sampler.cancel()
        if loaded and loaded[0] is not None:
            result["rss_load_mib"] = round(loaded[0][0], 1)
            result["rss_shmem_mib"] = round(loaded[0][1], 1)
        if proc.stderr.strip():
            result["client_stderr"] = proc.stderr.strip()[-2000:]
        try:
            data = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise BenchError(f"client exited with status {proc.returncode} and no JSON:\n"
                             f"{proc.stderr.strip()[-2000:]}") from exc
        result.update(data)
        result["client_status"] = proc.returncode
        if cpu0 is not None and cpu1 is not None and wall > 0:
            # The daemon's utime+stime (all threads, /proc/PID/stat) over the client's whole
            # run: its connect and setup too, which is a few ms in a run of seconds.
            cpu_s = cpu1 - cpu0
            result["daemon_cpu_s"] = round(cpu_s, 3)
            result["daemon_cpu_pct"] = round(cpu_s / wall * 100.0, 1)
            if cpu_s > 0 and data.get("ios"):
                result["iops_per_cpu"] = round(data["ios"] / cpu_s)
            if sys0 is not None and sys1 is not None and "client_cpu_pct" in data:
                # CPU used by everything else on the machine during the run:
                # a busy neighbour makes the numbers meaningless.
                client_s = data["client_cpu_pct"] / 100.0 * data.get("seconds", 0)
                other = (sys1 - sys0) - cpu_s - client_s
                result["other_cpu_pct"] = round(max(0.0, other) / wall * 100.0, 1)
        if cycles is not None and data.get("ios"):
            result["daemon_cycles"] = cycles
            result["cycles_per_req"] = round(cycles / data["ios"])
        if proc.returncode != 0 or data.get("errors") or data.get("aborted"):
            result["error"] = (f"client status {proc.returncode}, {data.get('errors')} request "
                               f"errors: {proc.stderr.strip()[-500:]}")
    finally:
        rc = daemon.stop()
        result["daemon_status"] = rc
    return result


# --------------------------------------------------------------------------
# summary


def summarize(runs: list[dict]) -> dict | None:
    good = [r for r in runs if "error" not in r and "iops" in r]
    if not good:
        return None

    def med(key):
        vals = [r[key] for r in good if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    def mean(key):
        vals = [r[key] for r in good if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    return {
        "runs_ok": len(good),
        "runs_failed": len(runs) - len(good),
        "iops_median": med("iops"),
        "iops_min": min(r["iops"] for r in good),
        "iops_max": max(r["iops"] for r in good),
        "iops_all": [round(r["iops"]) for r in good],
        # requests per second of daemon CPU time (utime+stime from /proc/PID/stat)
        "iops_per_cpu_median": med("iops_per_cpu"),
        "iops_per_cpu_all": [r["iops_per_cpu"] for r in good if r.get("iops_per_cpu")],
        "daemon_cpu_s_all": [r["daemon_cpu_s"] for r in good if "daemon_cpu_s" in r],
        "cycles_per_req_median": med("cycles_per_req"),
        "lat_mean_us": mean("lat_mean_us"),
        "lat_p50_us_median": med("lat_p50_us"),
        "lat_p99_us_median": med("lat_p99_us"),
        "client_cpu_pct_mean": mean("client_cpu_pct"),
        "daemon_cpu_pct_mean": mean("daemon_cpu_pct"),
        "other_cpu_pct_max": max((r.get("other_cpu_pct", 0.0) for r in good), default=None),
        "mib_s_median": med("mib_s"),
        "rss_idle_mib_max": max((r["rss_idle_mib"] for r in good if "rss_idle_mib" in r),
                                default=None),
        "rss_load_mib_max": max((r["rss_load_mib"] for r in good if "rss_load_mib" in r),
                                default=None),
    }


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _cpu_pair(o: dict | None, q: dict | None, key: str) -> str:
    return f"{_fmt(o and o[key], '.0f')}/{_fmt(q and q[key], '.0f')}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def _spread(s: dict | None) -> str:
    from benchmarks.report import fmt_iops  # report imports this module: import late

    if not s:
        return "-"
    return f"{fmt_iops(s['iops_min'])}-{fmt_iops(s['iops_max'])}"


def print_table(results: list[dict], out=sys.stdout) -> None:
    from benchmarks.report import fmt_iops  # report imports this module: import late

    header = (f"{'case':<36} {'ours IOPS':>9} {'(min-max)':>15} {'qsd IOPS':>9} "
              f"{'(min-max)':>15} {'ours/qsd':>8} {'daemon CPU%':>11} {'IOPS/CPU':>15} "
              f"{'ours/qsd':>8} {'lat us':>11} {'client CPU%':>11} {'RSS MiB':>8}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for res in results:
        o, q = res.get("ours"), res.get("qsd")
        oi = o["iops_median"] if o else None
        qi = q["iops_median"] if q else None
        oc = o.get("iops_per_cpu_median") if o else None
        qc = q.get("iops_per_cpu_median") if q else None
        ccpu = _cpu_pair(o, q, "client_cpu_pct_mean")
        dcpu = _cpu_pair(o, q, "daemon_cpu_pct_mean")
        flag = ""
        other = max((s["other_cpu_pct_max"] or 0.0) for s in (o, q) if s) if (o or q) else 0.0
        if other > BUSY_OTHER_PCT:
            flag += f" busy({other:.0f}%)"
        for side in SIDES:
            s = res.get(side)
            if res.get(f"{side}_attempted") and (s is None or s["runs_failed"]):
                flag += f" !{side}"
        cyc = [s.get("cycles_per_req_median") for s in (o, q) if s]
        if any(cyc):
            flag += f" cycles/req {_fmt(cyc[0], '.0f')}/{_fmt(cyc[-1], '.0f')}"
        lat = (f"{_fmt(o and o['lat_mean_us'])}/{_fmt(q and q['lat_mean_us'])}")
        print(f"{res['label']:<36} {fmt_iops(oi):>9} {_spread(o):>15} {fmt_iops(qi):>9} "
              f"{_spread(q):>15} {_ratio(oi, qi):>8} {dcpu:>11} "
              f"{fmt_iops(oc) + '/' + fmt_iops(qc):>15} {_ratio(oc, qc):>8} {lat:>11} "
              f"{ccpu:>11} {_fmt(o and o['rss_load_mib_max'], '.0f'):>8}{flag}", file=out)
    print("IOPS: median (min-max) of the runs; daemon CPU%: utime+stime of the daemon over a "
          "run\n(/proc/PID/stat), 100 = one core, ours/qsd; IOPS/CPU: requests per second of "
          "daemon CPU time\n(median of the runs), ours/qsd; lat: mean completion latency in "
          "microseconds, ours/qsd;\nRSS MiB: ours under load, without the shared guest-memory "
          "mapping; !side: some runs of that side\nfailed (see JSON/logs); busy(N%): other "
          "processes used up to N% of a core during a run of this case\n-- not trustworthy.",
          file=out)


# --------------------------------------------------------------------------
# main


def _resolve_cmd(text: str, what: str) -> list[str]:
    argv = shlex.split(text)
    if not argv:
        raise SystemExit(f"benchmarks.run: empty {what} command")
    exe = argv[0]
    if os.sep not in exe:
        found = shutil.which(exe)
        if found is None:
            hint = " (use --ours CMD, or --only qsd)" if what == "--ours" else ""
            raise SystemExit(f"benchmarks.run: {exe!r} not found on PATH{hint}")
        argv[0] = found
    elif not os.access(exe, os.X_OK):
        raise SystemExit(f"benchmarks.run: {exe!r} is not executable")
    return argv


def _make_image(path: pathlib.Path) -> None:
    """1 GiB raw image filled with non-zero data, so reads touch real pages."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(DISK_SIZE // len(chunk)):
            f.write(chunk)


def _qsd_file_opts(qsd_cmd: list[str], image: pathlib.Path, workdir: pathlib.Path,
                   wanted: str) -> tuple[str, str]:
    """Return (opts, note): `wanted` if qsd accepts it for the image, else the fallback."""
    blockdev = f"driver=file,filename={image},node-name=disk0,{wanted}"
    d = Daemon(qsd_cmd, blockdev, workdir / "probe.sock", 1, workdir / "probe.log")
    try:
        d.start()
    except BenchError as exc:
        if wanted == QSD_FILE_FALLBACK_OPTS:
            raise
        return QSD_FILE_FALLBACK_OPTS, f"qsd refused {wanted} ({str(exc).splitlines()[-1]}); " \
                                       f"using {QSD_FILE_FALLBACK_OPTS}"
    finally:
        d.stop()
    return wanted, ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Compare pyvhost-blk with qemu-storage-daemon using the libblkio client.")
    p.add_argument("--quick", action="store_true",
                   help="short runs (1 s each instead of 5 s)")
    p.add_argument("--pairs", type=int, default=5, metavar="N",
                   help="runs per side per case; the order alternates (ours first, then qsd "
                        "first) from pair to pair (default 5)")
    p.add_argument("--only", choices=SIDES, help="benchmark only one side")
    p.add_argument("--ours", default="pyvhost-blk", metavar="CMD",
                   help="command line of our daemon (default: pyvhost-blk on PATH)")
    p.add_argument("--qsd", default="qemu-storage-daemon", metavar="CMD",
                   help="command line of qemu-storage-daemon (default: on PATH)")
    p.add_argument("--runtime", type=float, metavar="SECS",
                   help="seconds per client run (default 5, or 1 with --quick)")
    p.add_argument("--cases", metavar="SUBSTR", action="append",
                   help="only cases whose name contains SUBSTR, a regular expression "
                        "(repeatable), e.g. 'null-', 'qd1-', 'randwrite', 'qd1-1q$'; names look "
                        "like null-randread-qd32-2q")
    p.add_argument("--sweep", action="store_true",
                   help="run the depth sweep instead of the default cases: 4k randread, one "
                        "queue, QD " + ",".join(map(str, SWEEP_DEPTHS)) + ", null-co and file, "
                        "default settings and with our polling off (-poll0); --cases filters it")
    p.add_argument("--ours-file-opts", default=OURS_FILE_OPTS, metavar="OPTS",
                   help=f"extra --blockdev options for our file backend (default {OURS_FILE_OPTS})")
    p.add_argument("--qsd-file-opts", default=QSD_FILE_OPTS, metavar="OPTS",
                   help=f"extra --blockdev options for qsd's file backend (default "
                        f"{QSD_FILE_OPTS}, falling back to {QSD_FILE_FALLBACK_OPTS})")
    p.add_argument("--no-pin", action="store_true",
                   help=f"do not pin the client to CPU {CLIENT_CPU} and the daemon to CPU "
                        f"{DAEMON_CPU} (taskset)")
    p.add_argument("--no-iothread", action="store_true",
                   help="run both exports in the daemons' main loop instead of one iothread "
                        "each (the -iothreads and -poll0 variants keep theirs)")
    p.add_argument("--no-perf", action="store_true",
                   help="do not count cycles with perf stat even if it works")
    p.add_argument("--client-poll", action="store_true",
                   help="client busy-polls for completions (default: sleeps on the eventfd)")
    p.add_argument("--image-dir", default="/dev/shm", metavar="DIR",
                   help="where to create the 1 GiB raw image (default /dev/shm)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECS",
                   help="before each run, wait up to SECS for other processes to leave "
                        f"the CPUs (busy < {BUSY_OTHER_PCT:.0f}%% of a core); default 0")
    p.add_argument("--json", metavar="OUT",
                   help="write all results to OUT as JSON, and a Markdown report and a PNG "
                        "chart next to it (OUT.json -> OUT.md, OUT.png)")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a sentence for the JSON's notes and the report, e.g. 'tests were "
                        "running in parallel' (repeatable)")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the daemon logs directory (printed at the end)")
    args = p.parse_args(argv)
    args.command_line = shlex.join(["python", "-m", "benchmarks.run",
                                    *(sys.argv[1:] if argv is None else argv)])
    if args.pairs < 1:
        p.error("--pairs must be >= 1")
    if args.runtime is None:
        args.runtime = 1.0 if args.quick else 5.0
    if args.runtime <= 0:
        p.error("--runtime must be positive")
    if not args.no_pin and (os.cpu_count() or 1) <= max(CLIENT_CPU, DAEMON_CPU):
        p.error(f"pinning needs CPUs {CLIENT_CPU} and {DAEMON_CPU}; use --no-pin")
    return args


def qsd_config_text(file_opts: str | None, iothread: bool) -> str:
    """What qsd ran, for the output: its best configuration."""
    shape = (f"--object {IOTHREAD_OBJ} and the export's iothread=io0 (both queues of a 2-queue "
             "export on it; qsd 7.2 takes one iothread per export: "
             "'iothread' is a string, a list is refused)" if iothread
             else "no iothread (--no-iothread)")
    aio = f"; file: {file_opts}" if file_opts else ""
    return f"qsd: {shape}{aio}; null-co: {NULL_BLOCKDEV}"


def ours_config_text(file_opts: str | None, iothread: bool) -> str:
    shape = (f"--object {IOTHREAD_OBJ} and the export's iothread=io0, as qsd" if iothread
             else "no iothread (--no-iothread)")
    aio = f"; file: {file_opts}" if file_opts else ""
    return (f"ours: {shape}{aio}; -poll0: --object {POLL0_OBJ}; -iothreads: one iothread per "
            "queue; -python: fast-path=off")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sides = [args.only] if args.only else list(SIDES)
    cmds = {}
    if "ours" in sides:
        cmds["ours"] = _resolve_cmd(args.ours, "--ours")
    if "qsd" in sides:
        cmds["qsd"] = _resolve_cmd(args.qsd, "--qsd")

    every = sweep_cases() if args.sweep else all_cases()
    cases = every
    if args.cases:
        cases = [c for c in cases if any(re.search(s, c.name) for s in args.cases)]
        if not cases:
            raise SystemExit("benchmarks.run: --cases matched no case; names are: " +
                             ", ".join(c.name for c in every))

    try:
        client = build_client()
    except RuntimeError as exc:
        raise SystemExit(f"benchmarks.run: {exc}") from None

    load1 = os.getloadavg()[0]
    if load1 > 0.7:
        print(f"warning: load average is {load1:.2f}; results will be noisy unless the "
              "machine is idle", file=sys.stderr)

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="pyvhost-blk-bench-"))
    image = None
    notes: list[str] = list(args.note)
    use_perf, perf_note = (False, "perf not used (--no-perf)") if args.no_perf else perf_status()
    pinning = (None if args.no_pin else
               f"client pinned to CPU {CLIENT_CPU} (all its threads: one per queue), daemon to "
               f"CPU {DAEMON_CPU} (all its threads: every iothread, the main loop) "
               "(taskset -c)")
    print("pinning: " + (pinning or "none (--no-pin)"), file=sys.stderr)
    print("perf: " + perf_note, file=sys.stderr)
    results: list[dict] = []
    failures = 0
    file_opts: dict[str, str] = {}
    try:
        blockdevs: dict[tuple[str, str], str] = {}
        if any(c.backend in ("file", "raw") for c in cases):
            fd, name = tempfile.mkstemp(prefix="pyvhost-blk-bench-", suffix=".img",
                                        dir=args.image_dir)
            os.close(fd)
            image = pathlib.Path(name)
            print(f"creating {DISK_SIZE >> 20} MiB image {image} ...", file=sys.stderr)
            _make_image(image)
            file_opts = {"ours": args.ours_file_opts, "qsd": args.qsd_file_opts}
            if "qsd" in sides:
                file_opts["qsd"], note = _qsd_file_opts(cmds["qsd"], image, workdir,
                                                        args.qsd_file_opts)
                if note:
                    notes.append(note)
                    print("note: " + note, file=sys.stderr)
            for side in SIDES:
                blockdevs[("file", side)] = (f"driver=file,filename={image},node-name=disk0,"
                                             f"{file_opts[side]}")
                leaf = ",".join(f"file.{o}" for o in file_opts[side].split(",") if o)
                blockdevs[("raw", side)] = (f"driver=raw,node-name=disk0,offset={1 << 20},"
                                            f"file.driver=file,file.filename={image},{leaf}")
        for side in SIDES:
            blockdevs[("null", side)] = NULL_BLOCKDEV
        # A driver written in Python (data in a bytearray, one Python call per batch of
        # requests) against qsd's null-co: the cost of running Python code per request.
        blockdevs[("memory", "ours")] = MEMORY_BLOCKDEV
        blockdevs[("memory", "qsd")] = NULL_BLOCKDEV

        total = len(cases) * args.pairs * len(sides)
        done = 0
        start_failures = {s: 0 for s in sides}   # consecutive daemon start failures
        given_up: set[str] = set()
        for case in cases:
            runs: dict[str, list[dict]] = {s: [] for s in sides}
            for rep in range(args.pairs):
                # the order alternates: ours first, then qsd first, ...
                for side in (sides if rep % 2 == 0 else sides[::-1]):
                    done += 1
                    if side in given_up:
                        runs[side].append({"side": side, "case": case.name, "rep": rep,
                                           "error": "skipped: daemon failed to start earlier"})
                        failures += 1
                        continue
                    if args.wait_idle > 0:
                        busy = wait_for_idle(args.wait_idle)
                        if busy > BUSY_OTHER_PCT:
                            print(f"machine still busy ({busy:.0f}% of a core) after "
                                  f"{args.wait_idle:g} s; running anyway", file=sys.stderr)
                    print(f"[{done}/{total}] {case.name} {side} #{rep + 1} ...",
                          end="", file=sys.stderr, flush=True)
                    try:
                        r = run_once(side, cmds[side], blockdevs[(case.backend, side)], case,
                                     client, workdir, args.runtime, args.client_poll, rep,
                                     pin=not args.no_pin, iothread=not args.no_iothread,
                                     perf=use_perf)
                        start_failures[side] = 0
                    except BenchError as exc:
                        r = {"side": side, "case": case.name, "error": str(exc)}
                        print(f" FAILED: {exc.summary}", file=sys.stderr)
                        if exc.startup:
                            start_failures[side] += 1
                            if start_failures[side] >= 3:
                                given_up.add(side)
                                print(f"giving up on {side}: its daemon failed to start 3 "
                                      "times in a row", file=sys.stderr)
                        r["rep"] = rep
                        runs[side].append(r)
                        failures += 1
                        continue
                    r["rep"] = rep
                    runs[side].append(r)
                    if "error" in r:
                        failures += 1
                        print(f" FAILED: {r['error'].splitlines()[0]}", file=sys.stderr)
                    else:
                        busy = r.get("other_cpu_pct", 0.0)
                        print(f" {r['iops']:.0f} IOPS, {r['lat_mean_us']:.1f} us, daemon "
                              f"CPU {r.get('daemon_cpu_pct', 0):.0f}%, "
                              f"{r.get('iops_per_cpu', 0):.0f} IOPS/CPU"
                              + (f" (other processes used {busy:.0f}% CPU!)"
                                 if busy > BUSY_OTHER_PCT else ""), file=sys.stderr)
            entry = {"case": case.name, "label": case.label,
                     **dataclasses.asdict(case)}
            for side in SIDES:
                entry[f"{side}_attempted"] = side in sides
                entry[side] = summarize(runs[side]) if side in sides else None
                entry[f"{side}_runs"] = runs.get(side, [])
            o, q = entry["ours"], entry["qsd"]
            entry["ratio_iops"] = (o["iops_median"] / q["iops_median"]
                                   if o and q and q["iops_median"] else None)
            entry["ratio_iops_per_cpu"] = (
                o["iops_per_cpu_median"] / q["iops_per_cpu_median"]
                if o and q and o["iops_per_cpu_median"] and q["iops_per_cpu_median"] else None)
            results.append(entry)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        failures += 1
    finally:
        if image is not None:
            image.unlink(missing_ok=True)

    has_file = any(c.backend in ("file", "raw") for c in cases)
    configs = [qsd_config_text(file_opts.get("qsd") if has_file else None, not args.no_iothread),
               ours_config_text(file_opts.get("ours") if has_file else None,
                                not args.no_iothread)]
    print()
    print_table(results)
    for line in (*configs, "pinning: " + (pinning or "none (--no-pin)"), "perf: " + perf_note):
        print(line)
    for note in notes:
        print("note: " + note)

    if args.json:
        meta = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "python": platform.python_version(),
            "git_commit": _git_commit(),
            "command_line": args.command_line,
            "loadavg_at_start": load1,
            "runtime_s": args.runtime,
            "pairs": args.pairs,
            "client_poll": args.client_poll,
            "pinning": pinning,
            "iothread": not args.no_iothread,
            "configs": configs,
            "perf": perf_note,
            "sides": sides,
            "commands": {s: cmds[s] for s in sides},
            "blockdev": {f"{b}/{s}": v for (b, s), v in blockdevs.items()} if results else {},
            "qsd_version": _qsd_version(cmds.get("qsd")),
            "notes": notes,
        }
        data = {"meta": meta, "cases": results}
        with open(args.json, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        print(f"results written to {args.json}")
        from benchmarks import report

        md, png = report.report_paths(args.json)
        for path in report.write_reports(data, md, png):
            print(f"report written to {path}")

    if args.keep_logs or failures:
        print(f"daemon logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    """Short commit of the source tree the benchmark ran from, '+dirty' if modified."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _qsd_version(cmd: list[str] | None) -> str | None:
    if not cmd:
        return None
    try:
        out = subprocess.run([*cmd, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


if __name__ == "__main__":
    sys.exit(main())
