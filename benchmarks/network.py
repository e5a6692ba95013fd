"""Network drivers: pyvhost-blk's ``nbd`` driver against qemu-storage-daemon's, same server.

    python -m benchmarks.network [--pairs 3] [--runtime 5] [--size 1G]

One ``qemu-nbd`` serves a raw image on tmpfs (/dev/shm) over a unix socket for the whole run;
each daemon is started with the same ``--blockdev driver=nbd,...`` and ``--export``, and the
libblkio client (benchmarks/blkio_client.c) drives it.  Runs are interleaved ours, qsd, ... as
in ``benchmarks/run.py`` (whose ``run_once``/``summarize`` this reuses); each side's figure is
the median IOPS of its runs.  Cases: 4k randread QD1 and QD32, 4k randwrite QD32 (the issue's
targets).  Keep the machine otherwise idle: two cores are shared by server, daemon and client.

``--baseline CMD`` adds a third side, interleaved with the other two (another build of ours, e.g.
the driver before a change), so that before/after figures come from the same run.  The load
average at the start and the end of the run is printed with the table: on a shared machine it
says how much the figures can be trusted.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.build_client import build_client
from benchmarks.run import BenchError, Case, run_once, summarize

CASES = [Case("nbd", "randread", 1, 1), Case("nbd", "randread", 32, 1),
         Case("nbd", "randwrite", 32, 1)]
ONLY = {c.name: c for c in CASES}


def _start_qemu_nbd(image: pathlib.Path, sock: pathlib.Path) -> subprocess.Popen:
    """Main thread: a persistent qemu-nbd on ``sock``, waited for until it listens."""
    exe = shutil.which("qemu-nbd")
    if exe is None:
        raise SystemExit("qemu-nbd not found: apt-get install qemu-utils")
    proc = subprocess.Popen([exe, "--persistent", "--shared=8", "--format=raw",
                             "--cache=writeback", f"--socket={sock}", str(image)],
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("qemu-nbd did not start")
        time.sleep(0.02)
    return proc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--runtime", type=float, default=5.0)
    p.add_argument("--size", default="1G")
    p.add_argument("--ours", default="pyvhost-blk")
    p.add_argument("--qsd", default="qemu-storage-daemon")
    p.add_argument("--baseline", help="a third daemon command, run as our side (before/after)")
    p.add_argument("--case", action="append", choices=sorted(ONLY),
                   help="run only this case (repeatable)")
    args = p.parse_args(argv)
    cmds = {"ours": [args.ours], "qsd": [args.qsd]}
    if args.baseline:
        cmds["base"] = [args.baseline]
    sides = list(cmds)
    for side, cmd in cmds.items():
        if shutil.which(cmd[0]) is None:
            raise SystemExit(f"{side}: {cmd[0]} not found")
    client = build_client()
    with tempfile.TemporaryDirectory(prefix="bench-nbd-", dir="/dev/shm") as shm, \
            tempfile.TemporaryDirectory(prefix="bench-nbd-") as tmp:
        image = pathlib.Path(shm) / "disk.raw"
        subprocess.run(["truncate", "-s", args.size, str(image)], check=True)
        subprocess.run(["dd", "if=/dev/urandom", f"of={image}", "bs=1M", "count=64",
                        "conv=notrunc", "status=none"], check=True)  # not all holes
        workdir = pathlib.Path(tmp)
        sock = workdir / "nbd.sock"
        server = _start_qemu_nbd(image, sock)
        blockdev = f"driver=nbd,node-name=disk0,server.type=unix,server.path={sock}"
        rows = []
        load0 = os.getloadavg()
        try:
            for case in [ONLY[c] for c in args.case] if args.case else CASES:
                runs: dict[str, list[dict]] = {side: [] for side in sides}
                for rep in range(args.pairs):
                    for side in sides:
                        as_side = "qsd" if side == "qsd" else "ours"
                        try:
                            runs[side].append(run_once(as_side, cmds[side], blockdev, case,
                                                       client, workdir, args.runtime, False,
                                                       rep + (100 if side == "base" else 0)))
                        except BenchError as e:
                            runs[side].append({"error": e.summary})
                s = {side: summarize(r) for side, r in runs.items()}
                for side, rs in runs.items():
                    for r in rs:
                        if "error" in r:
                            print(f"{case.name} {side}: {r['error']}", file=sys.stderr)
                o = s["ours"]["iops_median"] if s["ours"] else None
                q = s["qsd"]["iops_median"] if s["qsd"] else None
                rows.append((case.label, o, q, (o / q) if o and q else None, s))
        finally:
            server.terminate()
            server.wait()
    load1 = os.getloadavg()
    base = "base" in cmds
    print(f"{'case':<28} {'ours IOPS':>10} {'qsd IOPS':>10} {'ours/qsd':>8} "
          f"{'ours CPU%':>9} {'qsd CPU%':>9}"
          + (f" {'base IOPS':>10} {'base/qsd':>8} {'base CPU%':>9}" if base else ""))
    for label, o, q, ratio, s in rows:
        oc = s["ours"]["daemon_cpu_pct_mean"] if s["ours"] else None
        qc = s["qsd"]["daemon_cpu_pct_mean"] if s["qsd"] else None
        line = (f"{label:<28} {o or 0:>10.0f} {q or 0:>10.0f} "
                f"{ratio if ratio is not None else 0:>8.2f} {oc or 0:>9.0f} {qc or 0:>9.0f}")
        if base:
            b = s["base"]["iops_median"] if s["base"] else None
            bc = s["base"]["daemon_cpu_pct_mean"] if s["base"] else None
            line += (f" {b or 0:>10.0f} {(b / q) if b and q else 0:>8.2f} {bc or 0:>9.0f}")
        print(line)
    for label, _o, _q, _ratio, s in rows:
        runs_txt = "; ".join(
            f"{side} " + " ".join(str(x) for x in s[side].get("iops_all", []))
            + (f" ({s[side]['iops_per_cpu_median']:.0f}/CPU-s)"
               if s[side].get("iops_per_cpu_median") else "")
            for side in sides if s[side])
        print(f"  {label.strip()}: IOPS per run (median IOPS per daemon CPU-second): {runs_txt}")
    print("load average (1/5/15 min): start " + " ".join(f"{x:.2f}" for x in load0)
          + ", end " + " ".join(f"{x:.2f}" for x in load1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
