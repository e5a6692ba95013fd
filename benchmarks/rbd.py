"""Ours vs qemu-storage-daemon's rbd driver on the same one-node Ceph cluster, same run.

    .venv/bin/python -m benchmarks.rbd [--pairs N] [--runtime S]

Starts the test cluster (tests/ceph_cluster.py: one monitor, manager and memstore OSD on
127.0.0.1), creates one image per side and fills it, then runs interleaved pairs of the
libblkio client against each daemon exporting ``driver=rbd`` with the same options: 4 KiB
randread and randwrite at QD32.  Prints medians, min-max and the ours/qsd ratio, and the
daemons' CPU per request.  qsd's rbd driver comes with Debian's qemu-block-extra.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.ceph_cluster import CephCluster  # noqa: E402

SIZE_MIB = 256


def _cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in ticks of 10 ms


def _run(cmd: list[str], blockdev: str, rw: str, runtime: float, client: pathlib.Path,
         work: pathlib.Path) -> dict:
    sock = work / "r.sock"
    if sock.exists():
        sock.unlink()
    args = [*cmd, "--blockdev", blockdev, "--export",
            f"type=vhost-user-blk,id=e0,node-name=r,addr.type=unix,addr.path={sock},"
            "writable=on,num-queues=1"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"benchmarks.rbd: {cmd[0]} did not start: {args}")
            time.sleep(0.05)
        cpu0, t0 = _cpu_seconds(p.pid), time.monotonic()
        out = subprocess.run([str(client), "--socket", str(sock), "--mode", "bench",
                              "--rw", rw, "--runtime", f"{runtime:g}"],
                             capture_output=True, text=True, timeout=runtime + 120)
        wall = time.monotonic() - t0
        cpu = _cpu_seconds(p.pid) - cpu0
        r = json.loads(out.stdout) if out.stdout.strip() else {"iops": 0, "errors": -1}
        r["daemon_cpu"] = cpu / wall
        return r
    finally:
        p.terminate()
        p.wait(20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5.0)
    args = ap.parse_args(argv)
    sides = {"ours": [shutil.which("pyvhost-blk") or "pyvhost-blk"],
             "qsd": [shutil.which("qemu-storage-daemon") or "qemu-storage-daemon"]}
    client = build_client()
    work = pathlib.Path(tempfile.mkdtemp(prefix="pyvhost-blk-rbd-"))
    cluster = CephCluster(work / "ceph")
    t0 = time.monotonic()
    cluster.start()
    print(f"cluster up in {time.monotonic() - t0:.1f} s: {cluster.timings}", file=sys.stderr)
    try:
        images = {}
        for side in sides:
            name = f"bench-{side}"
            cluster.rbd("create", "--size", f"{SIZE_MIB}M", f"{cluster.pool}/{name}")
            cluster.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-total",
                        f"{SIZE_MIB}M", f"{cluster.pool}/{name}", timeout=600)
            images[side] = (f"driver=rbd,node-name=r,pool={cluster.pool},image={name},"
                            f"conf={cluster.conf}")
        results: dict[tuple[str, str], list[dict]] = {}
        for rnd in range(args.pairs):
            order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
            for rw in ("randread", "randwrite"):
                for side in order:
                    r = _run(sides[side], images[side], rw, args.runtime, client, work)
                    print(f"[{rnd + 1}/{args.pairs}] {rw} {side}: {r.get('iops', 0):.0f} IOPS",
                          file=sys.stderr)
                    results.setdefault((rw, side), []).append(r)
        print(f"\n{'case':<10} {'side':<5} {'IOPS median':>12} {'min-max':>17} "
              f"{'CPU us/req':>10} {'ours/qsd':>8}")
        for rw in ("randread", "randwrite"):
            med = {}
            for side in sides:
                runs = [r for r in results[(rw, side)] if not r.get("errors")]
                iops = [r["iops"] for r in runs] or [0.0]
                med[side] = statistics.median(iops)
                cpu = statistics.median(r["daemon_cpu"] for r in runs) if runs else 0.0
                us = cpu / med[side] * 1e6 if med[side] else 0.0
                ratio = f"{med['ours'] / med['qsd']:.2f}" if side == "qsd" and med["qsd"] \
                    else ""
                print(f"{rw:<10} {side:<5} {med[side]:>12.0f} "
                      f"{min(iops):>8.0f}-{max(iops):<8.0f} {us:>10.1f} {ratio:>8}")
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
