"""Guest benchmark: fio inside a QEMU guest (vhost-user-blk-pci) on pyvhost-blk vs qsd.

    python -m benchmarks.guest_fio [--pairs 3] [--runtime 10] [--json OUT]

Boots the test guest (``qemu-configs/build-guest.sh``; KVM when it works, else TCG) once per run
against each daemon, interleaved (ours, qsd, ours, qsd...), runs
``fio --rw=randread --bs=4k --iodepth=32 --direct=1 --ioengine=libaio`` on /dev/vda over a raw
image on tmpfs, and prints the median IOPS of each side and the ratio.  Under TCG the guest's
CPU, not the backend, is usually the limit; the ratio says whether the backend costs anything.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from tests.daemon import DaemonProcess, qsd_cmd
from tests.e2e.guest import Guest, build_guest, default_accel

IMG_SIZE = 1 << 30


def one_run(side: str, img: Path, workdir: Path, runtime: int, image,
            ours_args: list[str]) -> float:
    sock = workdir / f"{side}.sock"
    args = (ours_args if side == "ours" else []) + [
        "--blockdev", f"driver=file,node-name=disk0,filename={img},aio=io_uring,cache.direct=on"
        if side == "ours" else
        f"driver=file,node-name=disk0,filename={img},aio=native,cache.direct=on",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                    f"addr.path={sock},writable=on",
    ]
    with DaemonProcess(args, workdir, cmd=None if side == "ours" else qsd_cmd()) as d:
        with Guest(sock, num_queues=1, smp=2, image=image) as g:
            status, out = g.run(
                f"fio --name=r --filename=/dev/vda --rw=randread --bs=4k --iodepth=32 "
                f"--ioengine=libaio --direct=1 --time_based --runtime={runtime} "
                f"--size=512M --output-format=json", timeout=runtime + 120)
            if status != 0:
                raise RuntimeError(f"fio failed on {side}: {out[-2000:]}")
            g.poweroff()
        d.terminate()
    data = json.loads(out[out.index("{"):])
    return float(data["jobs"][0]["read"]["iops"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.guest_fio")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--runtime", type=int, default=10)
    p.add_argument("--json", metavar="OUT")
    p.add_argument("--ours-args", default="", metavar="ARGS",
                   help="extra arguments for pyvhost-blk, e.g. "
                        "'--object main-loop,id=ml,poll-max-ns=32768'")
    args = p.parse_args(argv)
    image = build_guest()
    results: dict[str, list[float]] = {"ours": [], "qsd": []}
    with tempfile.TemporaryDirectory(prefix="pyvhost-guest-fio-", dir="/dev/shm") as tmp:
        work = Path(tmp)
        img = work / "disk.img"
        with open(img, "wb") as f:
            f.truncate(IMG_SIZE)
        for i in range(args.pairs):
            for side in ("ours", "qsd"):
                iops = one_run(side, img, work, args.runtime, image, shlex.split(args.ours_args))
                results[side].append(iops)
                print(f"[{i + 1}/{args.pairs}] {side}: {iops:,.0f} IOPS", file=sys.stderr)
    ours, qsd = statistics.median(results["ours"]), statistics.median(results["qsd"])
    print(f"guest fio 4k randread QD32: ours {ours:,.0f} IOPS, qsd {qsd:,.0f} IOPS, "
          f"ours/qsd {ours / qsd:.2f} (medians of {args.pairs}, {default_accel()} guest)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "ours": ours, "qsd": qsd,
                                               "ratio": ours / qsd}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
