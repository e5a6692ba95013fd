"""Ours vs qemu-storage-daemon's rbd driver on the same one-node Ceph cluster, same run.

    flock /tmp/pyvhost-cpu.lock .venv/bin/python -m benchmarks.rbd [--pairs N] [--runtime S]

Starts the test cluster (tests/ceph_cluster.py: one monitor, manager and memstore OSD on
127.0.0.1), creates one image and fills it, then runs interleaved pairs (ABBA order) of the
libblkio client against each daemon exporting that image with the same ``--blockdev`` and
``--export`` options: 4 KiB randread and randwrite at QD32.  Prints the options, librbd's cache
settings as each daemon's librbd reports them (its admin socket), then per case and side: the
median IOPS with min-max, the ours/qsd ratio of the medians and the range of the per-pair
ratios, the daemon's CPU per request, and the OSD's side of the same runs: its CPU per
operation, its operations per second, and the share of a request's time the OSD spent on it
(OSD op latency over QD/IOPS) -- near 100 % means the OSD, not the daemon, sets the pace.
qsd's rbd driver comes with Debian's qemu-block-extra.
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
IODEPTH = 32
IMAGE = "bench"
#: librbd settings that decide how a write completes, read from each daemon's librbd
LIBRBD_KEYS = ("rbd_cache", "rbd_cache_policy", "rbd_cache_writethrough_until_flush",
               "rbd_cache_max_dirty", "rbd_op_threads", "ms_async_op_threads")
EXPORT = ("type=vhost-user-blk,id=e0,node-name=r,addr.type=unix,addr.path={sock},"
          "writable=on,num-queues=1")


def _cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in ticks of 10 ms


def _admin(sock: pathlib.Path, *cmd: str) -> dict:
    """A Ceph daemon's (or librbd client's) admin socket command, as JSON; {} if it fails."""
    try:
        out = subprocess.run(["ceph", "--admin-daemon", str(sock), *cmd], capture_output=True,
                             text=True, timeout=20).stdout
        return json.loads(out) if out.strip() else {}
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return {}


def _osd_counters(cluster: CephCluster) -> dict[str, float]:
    osd = _admin(cluster.dir / "run" / "osd.0.asok", "perf", "dump").get("osd", {})
    out = {"cpu": _cpu_seconds(cluster.procs["osd.0"].pid)}
    for op in ("op_r", "op_w"):
        out[op] = osd.get(op, 0)
        lat = osd.get(f"{op}_latency", {})
        out[f"{op}_lat_sum"] = lat.get("sum", 0.0)
        out[f"{op}_lat_n"] = lat.get("avgcount", 0)
    return out


def _run(cmd: list[str], blockdev: str, rw: str, runtime: float, client: pathlib.Path,
         work: pathlib.Path, cluster: CephCluster) -> dict:
    sock = work / "r.sock"
    if sock.exists():
        sock.unlink()
    args = [*cmd, "--blockdev", blockdev, "--export", EXPORT.format(sock=sock)]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"benchmarks.rbd: {cmd[0]} did not start: {args}")
            time.sleep(0.05)
        # both daemons are client.admin: the conf's "admin socket = run/$name.asok"
        conf = _admin(cluster.dir / "run" / "client.admin.asok", "config", "show")
        osd0 = _osd_counters(cluster)
        cpu0, t0 = _cpu_seconds(p.pid), time.monotonic()
        out = subprocess.run([str(client), "--socket", str(sock), "--mode", "bench",
                              "--rw", rw, "--iodepth", str(IODEPTH),
                              "--runtime", f"{runtime:g}"],
                             capture_output=True, text=True, timeout=runtime + 120)
        wall = time.monotonic() - t0
        cpu = _cpu_seconds(p.pid) - cpu0
        osd1 = _osd_counters(cluster)
        r = json.loads(out.stdout) if out.stdout.strip() else {"iops": 0, "errors": -1}
        op = "op_r" if rw.endswith("read") else "op_w"
        n = osd1[f"{op}_lat_n"] - osd0[f"{op}_lat_n"]
        r["daemon_cpu"] = cpu / wall
        r["osd_cpu"] = (osd1["cpu"] - osd0["cpu"]) / wall
        r["osd_ops"] = (osd1[op] - osd0[op]) / wall
        r["osd_lat"] = (osd1[f"{op}_lat_sum"] - osd0[f"{op}_lat_sum"]) / n if n else 0.0
        r["librbd"] = {k: conf.get(k, "?") for k in LIBRBD_KEYS}
        return r
    finally:
        p.terminate()
        p.wait(20)


def _summary(rw: str, results: dict[tuple[str, str], list[dict]], sides: list[str]) -> None:
    ok = {s: [r for r in results[(rw, s)] if not r.get("errors")] for s in sides}
    med = {s: statistics.median(r["iops"] for r in ok[s]) if ok[s] else 0.0 for s in sides}
    pairs = [a["iops"] / b["iops"]
             for a, b in zip(results[(rw, "ours")], results[(rw, "qsd")], strict=True)
             if b["iops"] and not a.get("errors") and not b.get("errors")]
    for side in sides:
        runs = ok[side]
        if not runs:
            print(f"{rw:<10} {side:<5} no run without errors")
            continue
        iops = [r["iops"] for r in runs]

        def m(key: str, runs: list[dict] = runs) -> float:
            return statistics.median(r[key] for r in runs)
        us = m("daemon_cpu") / med[side] * 1e6
        osd_us = m("osd_cpu") / m("osd_ops") * 1e6 if m("osd_ops") else 0.0
        share = statistics.median(r["osd_lat"] * r["iops"] / IODEPTH for r in runs)
        ratio = (f"{med['ours'] / med['qsd']:.2f} ({min(pairs):.2f}-{max(pairs):.2f})"
                 if side == "qsd" and med["qsd"] and pairs else "")
        print(f"{rw:<10} {side:<5} {med[side]:>8.0f} {min(iops):>7.0f}-{max(iops):<7.0f}"
              f"{us:>8.1f} {m('osd_cpu'):>8.2f} {osd_us:>8.1f} {m('osd_ops'):>8.0f}"
              f" {share * 100:>6.0f}%  {ratio}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4)
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
        cluster.rbd("create", "--size", f"{SIZE_MIB}M", f"{cluster.pool}/{IMAGE}")
        cluster.rbd("bench", "--io-type", "write", "--io-size", "4M", "--io-total",
                    f"{SIZE_MIB}M", f"{cluster.pool}/{IMAGE}", timeout=600)
        blockdev = f"driver=rbd,node-name=r,pool={cluster.pool},image={IMAGE},conf={cluster.conf}"
        print(f"both sides: --blockdev {blockdev} --export {EXPORT}; client: libblkio, "
              f"4 KiB, QD{IODEPTH}, {args.runtime:g} s per run, {args.pairs} pairs; "
              f"image {SIZE_MIB} MiB, filled")
        results: dict[tuple[str, str], list[dict]] = {}
        for rnd in range(args.pairs):
            order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
            for rw in ("randread", "randwrite"):
                for side in order:
                    r = _run(sides[side], blockdev, rw, args.runtime, client, work, cluster)
                    print(f"[{rnd + 1}/{args.pairs}] {rw} {side}: {r.get('iops', 0):.0f} IOPS,"
                          f" OSD {r['osd_cpu']:.2f} CPU", file=sys.stderr)
                    results.setdefault((rw, side), []).append(r)
        for side in sides:
            seen = {json.dumps(r["librbd"], sort_keys=True)
                    for (_rw, s), runs in results.items() if s == side for r in runs}
            print(f"librbd in {side}: {'; '.join(sorted(seen))}")
        print(f"\n{'case':<10} {'side':<5} {'IOPS':>8} {'min-max':>15} {'us/req':>8}"
              f" {'OSD CPU':>8} {'us/op':>8} {'OSD op/s':>8} {'OSD %':>7}  ours/qsd (pairs)")
        for rw in ("randread", "randwrite"):
            _summary(rw, results, list(sides))
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
