"""Python plugins and filters against their peers, in one run (issue: Programmable).

    .venv/bin/python -m benchmarks.plugins [--pairs N] [--runtime S] [--json OUT]

Rounds are interleaved (every side once per round), medians reported:

* ``plugin``: our ``driver=python`` running examples/ramdisk.py (a bytearray RAM disk),
  driven by the libblkio client, against qemu-storage-daemon's null-co (the ceiling: no data
  at all) and against nbdkit 1.32's Python plugin running **the same script**, driven by fio's
  ``nbd`` engine (libnbd) over a UNIX socket: 4 KiB randread and randwrite, QD32.
* ``filter``: the per-request CPU of a file node (aio=native, O_DIRECT) alone, with the
  ``x-count`` pass-through filter (Python, batch) and with a ``python-filter`` script that
  only passes requests on: CPU microseconds per request (daemon CPU-seconds / requests).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.build_client import build_client
from benchmarks.run import Case, _make_image, _proc_cpu_seconds, run_once

ROOT = pathlib.Path(__file__).resolve().parents[1]
RAMDISK = ROOT / "examples" / "ramdisk.py"
SIZE = "256M"
PASS_THROUGH = "API_VERSION = 2\n"  # a python-filter that defines nothing: all pass through


def _which(name: str, hint: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise SystemExit(f"benchmarks.plugins: {name} not found: {hint}")
    return exe


def run_nbdkit(rw: str, runtime: float, workdir: pathlib.Path) -> dict:
    """nbdkit python examples/ramdisk.py, fio's nbd engine, QD32 4 KiB."""
    nbdkit = _which("nbdkit", "apt-get install nbdkit nbdkit-plugin-python")
    fio = _which("fio", "apt-get install fio")
    sock = workdir / "nbdkit.sock"
    if sock.exists():
        sock.unlink()
    srv = subprocess.Popen([nbdkit, "-f", "-U", str(sock), "python", str(RAMDISK),
                            f"size={SIZE}"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            if srv.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("benchmarks.plugins: nbdkit did not start")
            time.sleep(0.05)
        cpu0, t0 = _proc_cpu_seconds(srv.pid), time.monotonic()
        out = subprocess.run(
            [fio, "--name=nbd", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
             f"--rw={rw}", "--bs=4k", "--iodepth=32", "--time_based", f"--runtime={runtime:g}",
             "--output-format=json"], capture_output=True, text=True, check=True).stdout
        wall = time.monotonic() - t0
        cpu1 = _proc_cpu_seconds(srv.pid)
        job = json.loads(out[out.index("{"):])["jobs"][0]  # after "fio: connected..."
        side = job["read" if "read" in rw else "write"]
        return {"iops": side["iops"], "daemon_cpu_pct": (cpu1 - cpu0) / wall * 100.0}
    finally:
        srv.terminate()
        srv.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--json", type=pathlib.Path)
    args = ap.parse_args(argv)
    ours = [_which("pyvhost-blk", "run scripts/setup.sh, then use .venv/bin")]
    qsd = [_which("qemu-storage-daemon", "apt-get install qemu-system-x86")]
    client = build_client()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="pyvhost-blk-plugins-"))
    image = workdir / "disk.img"
    _make_image(image)
    passthrough = workdir / "pass.py"
    passthrough.write_text(PASS_THROUGH)
    file_bd = f"driver=file,filename={image},aio=native,cache.direct=on"
    sides: dict[str, list[tuple[str, list[str], str, Case]]] = {}
    for rw in ("randread", "randwrite"):
        case = Case("plugin", rw, 32, 1)
        sides[f"plugin {rw}"] = [
            ("ours", ours, f"driver=python,node-name=disk0,script={RAMDISK},size={SIZE}",
             case),
            ("qsd", qsd, f"driver=null-co,node-name=disk0,size={256 << 20}", case),
            ("nbdkit", [], rw, case)]
    fcase = Case("file", "randread", 32, 1)
    sides["filter randread"] = [
        ("file", ours, f"{file_bd},node-name=disk0", fcase),
        ("x-count", ours, f"driver=x-count,node-name=disk0,file.{file_bd.replace(',', ',file.')}",
         fcase),
        ("python-filter", ours, f"driver=python-filter,node-name=disk0,script={passthrough},"
                                f"file.{file_bd.replace(',', ',file.')}", fcase)]
    results: dict[str, dict[str, list[dict]]] = {k: {s[0]: [] for s in v}
                                                 for k, v in sides.items()}
    for rnd in range(args.pairs):
        for group, entries in sides.items():
            for name, cmd, bd, case in entries:
                print(f"[{rnd + 1}/{args.pairs}] {group}: {name} ...", file=sys.stderr, end=" ")
                if name == "nbdkit":
                    r = run_nbdkit(bd, args.runtime, workdir)
                else:
                    r = run_once(name if name in ("ours", "qsd") else "ours", cmd, bd, case,
                                 client, workdir, args.runtime, False, rnd)
                print(f"{r.get('iops', 0):.0f} IOPS {r.get('error', '')}", file=sys.stderr)
                results[group][name].append(r)
    table = []
    for group, by_side in results.items():
        meds = {}
        for name, runs in by_side.items():
            good = [r for r in runs if "error" not in r and r.get("iops")]
            if not good:
                continue
            iops = statistics.median(r["iops"] for r in good)
            cpu = statistics.median(r.get("daemon_cpu_pct", 0.0) for r in good)
            meds[name] = (iops, cpu)
        base = next(iter(meds.values()))[0] if meds else 1
        for name, (iops, cpu) in meds.items():
            us = cpu / 100.0 / iops * 1e6 if iops else 0.0
            row = {"group": group, "side": name, "iops": round(iops), "daemon_cpu_pct":
                   round(cpu, 1), "cpu_us_per_request": round(us, 2),
                   "vs_first": round(iops / base, 3)}
            table.append(row)
    print(f"\n{'case':<18} {'side':<14} {'IOPS':>10} {'vs 1st':>7} {'CPU%':>6} {'CPU us/req':>10}")
    for row in table:
        print(f"{row['group']:<18} {row['side']:<14} {row['iops']:>10} {row['vs_first']:>7.2f} "
              f"{row['daemon_cpu_pct']:>6.1f} {row['cpu_us_per_request']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": table, "runs": results}, indent=1,
                                        default=str))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
