"""Benchmark pyvhost-blk against qemu-storage-daemon, in the same run.

    python -m benchmarks.run [--quick] [--pairs 3] [--only ours|qsd]
                             [--ours CMD] [--qsd CMD] [--json OUT] ...

For every case (backend x workload) the daemon under test is started with the
same --blockdev/--export arguments qemu-storage-daemon takes, the libblkio
client (benchmarks/blkio_client.c) drives it for a few seconds, and the daemon
is stopped with SIGTERM.  Runs are interleaved ours, qsd, ours, qsd, ... so
that drift of the machine affects both sides alike; each side's figure is the
median IOPS of its runs and the mean of its runs' mean latencies.  With
--json OUT.json the runner also writes OUT.md (a Markdown report) and OUT.png
(a chart; needs matplotlib) next to it, see benchmarks/report.py.

Keep the machine otherwise idle while this runs: it has two cores to share
between the client and the daemon.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
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


@dataclasses.dataclass(frozen=True)
class Case:
    backend: str     # "null" or "file"
    rw: str
    iodepth: int
    queues: int
    bs: int = 4096
    #: extra options for *our* side only: "python" (fast-path=off: every request through the
    #: Python handler) or "iothreads" (queues spread over one iothread each)
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

    def ours_export_opts(self) -> tuple[list[str], str]:
        """(extra daemon arguments, extra export options) for our side."""
        if self.variant == "python":
            return [], ",fast-path=off"
        if self.variant == "iothreads":
            objs = []
            for i in range(self.queues):
                objs += ["--object", f"iothread,id=io{i}"]
            return objs, "".join(f",iothread.{i}=io{i}" for i in range(self.queues))
        return [], ""


def all_cases() -> list[Case]:
    cases = []
    for backend in ("null", "file"):
        cases += [
            Case(backend, "randread", 1, 1),
            Case(backend, "randread", 32, 1),
            Case(backend, "randread", 32, 2),
            Case(backend, "randread", 32, 2, variant="iothreads"),
            Case(backend, "randwrite", 32, 1),
            Case(backend, "read", 16, 1, bs=65536),
            Case(backend, "write", 16, 1, bs=65536),
        ]
    # Python code per request, compared with qsd's null-co: the general Python handler
    # (fast-path=off), and a driver written in Python (x-memory, batched).
    cases.append(Case("null", "randread", 32, 1, variant="python"))
    cases.append(Case("memory", "randread", 32, 1))
    cases.append(Case("memory", "randwrite", 32, 1))
    return cases


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


class Daemon:
    """One daemon process exporting disk0 over a vhost-user socket."""

    def __init__(self, cmd: list[str], blockdev: str, sock: pathlib.Path,
                 queues: int, log: pathlib.Path, extra_args: list[str] | None = None,
                 export_opts: str = ""):
        self.sock = sock
        self.log = log
        self.argv = [
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
             workdir: pathlib.Path, runtime: float, client_poll: bool, rep: int) -> dict:
    sock = workdir / f"{side}.sock"
    log = workdir / f"{case.name}.{side}.{rep + 1}.log"
    extra_args, export_opts = case.ours_export_opts() if side == "ours" else ([], "")
    daemon = Daemon(cmd, blockdev, sock, case.queues, log, extra_args, export_opts)
    result: dict = {"side": side, "case": case.name, "daemon_log": str(log)}
    try:
        daemon.start()
    except BenchError as exc:
        exc.startup = True
        raise
    try:
        argv = [str(client), "--socket", str(sock), "--mode", "bench", "--rw", case.rw,
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
        for attempt in range(CONNECT_TRIES):
            cpu0 = daemon.cpu_seconds()
            sys0 = _system_busy_seconds()
            t0 = time.monotonic()
            try:
                proc = subprocess.run(argv, capture_output=True, text=True,
                                      timeout=runtime + 60, check=False)
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"client did not finish within {runtime + 60:.0f} s") from exc
            wall = time.monotonic() - t0
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
        cpu1 = daemon.cpu_seconds()
        sys1 = _system_busy_seconds()
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
            # includes the client's connect/setup time; close enough at runtime >= 1 s
            result["daemon_cpu_pct"] = round((cpu1 - cpu0) / wall * 100.0, 1)
            if sys0 is not None and sys1 is not None and "client_cpu_pct" in data:
                # CPU used by everything else on the machine during the run:
                # a busy neighbour makes the numbers meaningless.
                client_s = data["client_cpu_pct"] / 100.0 * data.get("seconds", 0)
                other = (sys1 - sys0) - (cpu1 - cpu0) - client_s
                result["other_cpu_pct"] = round(max(0.0, other) / wall * 100.0, 1)
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
        "iops_all": [round(r["iops"]) for r in good],
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


def print_table(results: list[dict], out=sys.stdout) -> None:
    from benchmarks.report import fmt_iops  # report imports this module: import late

    header = (f"{'case':<36} {'ours IOPS':>10} {'qsd IOPS':>10} {'ours/qsd':>8} "
              f"{'ours MiB/s':>10} {'ours lat':>9} {'qsd lat':>9} {'client CPU%':>12} "
              f"{'daemon CPU%':>12} {'RSS MiB':>12}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for res in results:
        o, q = res.get("ours"), res.get("qsd")
        oi = o["iops_median"] if o else None
        qi = q["iops_median"] if q else None
        ratio = f"{oi / qi:.2f}" if oi and qi else "-"
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
        rss = (f"{_fmt(o and o['rss_idle_mib_max'], '.0f')}/"
               f"{_fmt(o and o['rss_load_mib_max'], '.0f')}")
        print(f"{res['label']:<36} {fmt_iops(oi):>10} {fmt_iops(qi):>10} {ratio:>8} "
              f"{_fmt(o and o['mib_s_median'], '.0f'):>10} "
              f"{_fmt(o and o['lat_mean_us']):>9} {_fmt(q and q['lat_mean_us']):>9} "
              f"{ccpu:>12} {dcpu:>12} {rss:>12}{flag}", file=out)
    print("IOPS: median of the runs; lat: mean completion latency in microseconds "
          "(mean over runs);\nRSS MiB: ours idle/under load, without the shared guest-memory "
          "mapping;\nCPU%: ours/qsd, 100 = one core; !side: some runs of that side "
          "failed (see JSON/logs);\nbusy(N%): other processes used up to N% of a core during a run "
          "of this case -- not trustworthy.", file=out)


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
    p.add_argument("--pairs", type=int, default=3, metavar="N",
                   help="runs per side per case, interleaved ours/qsd (default 3)")
    p.add_argument("--only", choices=SIDES, help="benchmark only one side")
    p.add_argument("--ours", default="pyvhost-blk", metavar="CMD",
                   help="command line of our daemon (default: pyvhost-blk on PATH)")
    p.add_argument("--qsd", default="qemu-storage-daemon", metavar="CMD",
                   help="command line of qemu-storage-daemon (default: on PATH)")
    p.add_argument("--runtime", type=float, metavar="SECS",
                   help="seconds per client run (default 5, or 1 with --quick)")
    p.add_argument("--cases", metavar="SUBSTR", action="append",
                   help="only cases whose name contains SUBSTR (repeatable), e.g. "
                        "'null-', 'qd1-', 'randwrite'; names look like null-randread-qd32-2q")
    p.add_argument("--ours-file-opts", default=OURS_FILE_OPTS, metavar="OPTS",
                   help=f"extra --blockdev options for our file backend (default {OURS_FILE_OPTS})")
    p.add_argument("--qsd-file-opts", default=QSD_FILE_OPTS, metavar="OPTS",
                   help=f"extra --blockdev options for qsd's file backend (default "
                        f"{QSD_FILE_OPTS}, falling back to {QSD_FILE_FALLBACK_OPTS})")
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
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sides = [args.only] if args.only else list(SIDES)
    cmds = {}
    if "ours" in sides:
        cmds["ours"] = _resolve_cmd(args.ours, "--ours")
    if "qsd" in sides:
        cmds["qsd"] = _resolve_cmd(args.qsd, "--qsd")

    cases = all_cases()
    if args.cases:
        cases = [c for c in cases if any(s in c.name for s in args.cases)]
        if not cases:
            raise SystemExit("benchmarks.run: --cases matched no case; names are: " +
                             ", ".join(c.name for c in all_cases()))

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
    results: list[dict] = []
    failures = 0
    try:
        blockdevs: dict[tuple[str, str], str] = {}
        if any(c.backend == "file" for c in cases):
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
                for side in sides:
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
                                     client, workdir, args.runtime, args.client_poll, rep)
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
                        print(f" {r['iops']:.0f} IOPS, {r['lat_mean_us']:.1f} us"
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
            results.append(entry)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        failures += 1
    finally:
        if image is not None:
            image.unlink(missing_ok=True)

    print()
    print_table(results)
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
