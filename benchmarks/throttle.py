"""Throttle accuracy against its limit, ours and qemu-storage-daemon's, in one run.

    .venv/bin/python -m benchmarks.throttle [--runtime S] [--limits 1000,10000,100000]

Each daemon serves null-co through a ``throttle`` node of group ``g`` with
``limits.iops-total=L`` on one iothread; the libblkio client reads 4 KiB at QD32 for
``--runtime`` seconds.  Printed: achieved IOPS and the error against the limit (QEMU lets an
idle bucket pass a tenth of a second of I/O at once, so both sides sit about +1.6% over a 6 s
run).  A benchmark, not a test: at 100K IOPS the numbers depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import tempfile
import time

from benchmarks.build_client import build_client


def _run(cmd: list[str], limit: int, runtime: float, client: pathlib.Path,
         work: pathlib.Path) -> float:
    sock = work / "t.sock"
    if sock.exists():
        sock.unlink()
    args = [*cmd, "--object", "iothread,id=io0",
            "--object", f"throttle-group,id=g,limits.iops-total={limit}",
            "--blockdev", f"driver=null-co,node-name=d0,size={1 << 30}",
            "--blockdev", "driver=throttle,node-name=t0,throttle-group=g,file=d0",
            "--export", f"type=vhost-user-blk,id=e0,node-name=t0,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues=1,iothread=io0"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"benchmarks.throttle: {cmd[0]} did not start")
            time.sleep(0.05)
        out = subprocess.run([str(client), "--socket", str(sock), "--mode", "bench",
                              "--runtime", f"{runtime:g}"], capture_output=True, text=True,
                             check=True).stdout
        return float(json.loads(out)["iops"])
    finally:
        p.terminate()
        p.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=float, default=6.0)
    ap.add_argument("--limits", default="1000,10000,100000")
    args = ap.parse_args(argv)
    sides = {"ours": [shutil.which("pyvhost-blk") or "pyvhost-blk"],
             "qsd": [shutil.which("qemu-storage-daemon") or "qemu-storage-daemon"]}
    client = build_client()
    work = pathlib.Path(tempfile.mkdtemp(prefix="pyvhost-blk-throttle-"))
    print(f"{'limit':>8} {'side':<5} {'IOPS':>10} {'error':>8}")
    for limit in (int(x) for x in args.limits.split(",")):
        for side, cmd in sides.items():
            got = _run(cmd, limit, args.runtime, client, work)
            print(f"{limit:>8} {side:<5} {got:>10.1f} {got / limit - 1:>+8.2%}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
