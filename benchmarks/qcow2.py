"""qcow2 images: pyvhost-blk's ``qcow2`` driver against qemu-storage-daemon's, same images.

    python -m benchmarks.qcow2 [--pairs 3] [--runtime 5] [--size 1G] [--case NAME ...]

Every run gets its own copy of a template image on tmpfs (/dev/shm), made once per benchmark,
so both daemons start each run from the same bytes (writes and allocations of one run never
reach the next).  Both open it the same way: ``driver=qcow2`` over ``file`` with
``aio=native,cache.direct=on`` (``aio=io_uring`` if qsd refuses O_DIRECT here), one iothread
running the export, daemon and client pinned to a core each (as ``benchmarks/run.py``, whose
``run_once``/``summarize`` this reuses).  Runs are interleaved in pairs whose order alternates
(ours, qsd; qsd, ours; ...); each side's figure is the median IOPS of its runs.

Cases (issue 12's targets):

* ``alloc-randread`` / ``alloc-randwrite``: 4 KiB random I/O at QD32 on a fully allocated image
  (``preallocation=full``: every cluster mapped, written in place);
* ``empty-randwrite``: 4 KiB random writes at QD32 on a new, empty image with 4 KiB clusters
  and a large virtual size (``--empty-size``, 8G): nearly every write lands in a cluster never
  written before and allocates (refcount update, L2 update).  With the default 64 KiB clusters
  on a 1 GiB disk, every cluster is allocated within the first fraction of a second and the
  rest of the run measures in-place writes; with 64 KiB clusters on a disk big enough, QEMU
  fallocates each new cluster whole on tmpfs, which runs the machine out of memory;
* ``backing-read``: 64 KiB sequential reads at QD16 from an empty overlay whose data is in its
  backing file (a fully allocated qcow2 image).  The backing node is given inline with the same
  file options on both sides (QEMU does not pass ``aio`` down to a backing file opened from
  the header).

The load average at the start and the end of the run is printed with the table: the machine's
two cores are shared by the daemon and the client, and by whoever else runs there.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from benchmarks.build_client import build_client
from benchmarks.run import (
    QSD_FILE_OPTS,
    BenchError,
    Case,
    _qsd_file_opts,
    run_once,
    summarize,
    wait_for_idle,
)

#: name -> (template image, workload)
CASES = {
    "alloc-randread": ("alloc", Case("qcow2-alloc", "randread", 32, 1)),
    "alloc-randwrite": ("alloc", Case("qcow2-alloc", "randwrite", 32, 1)),
    "empty-randwrite": ("empty", Case("qcow2-empty", "randwrite", 32, 1)),
    "backing-read": ("overlay", Case("qcow2-backing", "read", 16, 1, bs=65536)),
}
TARGETS = {"alloc-randread": 0.8, "alloc-randwrite": 0.8, "empty-randwrite": 0.5,
           "backing-read": 0.8}


def _qemu_img(*args: str) -> None:
    exe = shutil.which("qemu-img")
    if exe is None:
        raise SystemExit("qemu-img not found: apt-get install qemu-utils")
    subprocess.run([exe, *args], check=True, stdout=subprocess.DEVNULL)


def make_templates(d: pathlib.Path, size: str, empty_size: str) -> dict[str, pathlib.Path]:
    """The images every run copies: fully allocated, empty, and an overlay on the allocated
    one (which stays the overlay's backing file, read-only, for the whole benchmark)."""
    alloc, empty, base = d / "alloc.qcow2", d / "empty.qcow2", d / "base.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=full", str(alloc), size)
    _qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(empty), empty_size)
    shutil.copyfile(alloc, base)
    overlay = d / "overlay.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    return {"alloc": alloc, "empty": empty, "overlay": overlay, "base": base}


def blockdev(image: pathlib.Path, file_opts: str, base: pathlib.Path | None) -> str:
    fo = ",".join(f"file.{o}" for o in file_opts.split(",") if o)
    s = f"driver=qcow2,node-name=disk0,file.driver=file,file.filename={image},{fo}"
    if base is not None:
        bo = ",".join(f"backing.file.{o}" for o in file_opts.split(",") if o)
        s += (f",backing.driver=qcow2,backing.read-only=on,backing.file.driver=file,"
              f"backing.file.filename={base},{bo}")
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--runtime", type=float, default=5.0)
    p.add_argument("--size", default="1G", help="the allocated image and the backing file")
    p.add_argument("--empty-size", default="8G", help="the empty image (4 KiB clusters)")
    p.add_argument("--ours", default="pyvhost-blk")
    p.add_argument("--qsd", default="qemu-storage-daemon")
    p.add_argument("--case", action="append", choices=sorted(CASES),
                   help="run only this case (repeatable)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECS",
                   help="before each pair, wait up to SECS for the machine to be idle")
    args = p.parse_args(argv)
    cmds = {"ours": [args.ours], "qsd": [args.qsd]}
    for side, cmd in cmds.items():
        if shutil.which(cmd[0]) is None:
            raise SystemExit(f"{side}: {cmd[0]} not found")
    client = build_client()
    names = args.case or list(CASES)
    rows = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-qcow2-", dir="/dev/shm") as shm, \
            tempfile.TemporaryDirectory(prefix="bench-qcow2-") as tmp:
        shmdir, workdir = pathlib.Path(shm), pathlib.Path(tmp)
        tpl = make_templates(shmdir, args.size, args.empty_size)
        file_opts, note = _qsd_file_opts(cmds["qsd"], tpl["alloc"], workdir, QSD_FILE_OPTS)
        if note:
            print(note, file=sys.stderr)
        for name in names:
            kind, case = CASES[name]
            runs: dict[str, list[dict]] = {"ours": [], "qsd": []}
            for rep in range(args.pairs):
                order = ("ours", "qsd") if rep % 2 == 0 else ("qsd", "ours")
                if args.wait_idle:
                    wait_for_idle(args.wait_idle)
                for side in order:
                    image = shmdir / f"run-{side}.qcow2"
                    shutil.copyfile(tpl[kind], image)
                    base = tpl["base"] if kind == "overlay" else None
                    if base is not None:  # the copy names its backing file by absolute path
                        _qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(base), "-F",
                                  "qcow2", str(image))
                    try:
                        runs[side].append(run_once(side, cmds[side],
                                                   blockdev(image, file_opts, base), case,
                                                   client, workdir, args.runtime, False, rep))
                    except BenchError as e:
                        runs[side].append({"error": e.summary})
                    finally:
                        image.unlink(missing_ok=True)
            s = {side: summarize(r) for side, r in runs.items()}
            for side, rs in runs.items():
                for r in rs:
                    if "error" in r:
                        print(f"{name} {side}: {r['error']}", file=sys.stderr)
            o = s["ours"]["iops_median"] if s["ours"] else None
            q = s["qsd"]["iops_median"] if s["qsd"] else None
            rows.append((name, case, o, q, (o / q) if o and q else None, s))
    load1 = os.getloadavg()
    print(f"file options on both sides: {file_opts}; {args.pairs} interleaved pairs of "
          f"{args.runtime:g} s runs; images {args.size} (empty: {args.empty_size}, 4k clusters)")
    print(f"{'case':<17} {'workload':<22} {'ours IOPS':>10} {'qsd IOPS':>10} {'ours/qsd':>8} "
          f"{'target':>6} {'ours CPU%':>9} {'qsd CPU%':>9}  runs ours / qsd")
    for name, case, o, q, ratio, s in rows:
        oc = s["ours"]["daemon_cpu_pct_mean"] if s["ours"] else None
        qc = s["qsd"]["daemon_cpu_pct_mean"] if s["qsd"] else None
        wl = f"{case.bs // 1024}k {case.rw} QD{case.iodepth}"
        all_o = s["ours"]["iops_all"] if s["ours"] else []
        all_q = s["qsd"]["iops_all"] if s["qsd"] else []
        print(f"{name:<17} {wl:<22} {o or 0:>10.0f} {q or 0:>10.0f} "
              f"{ratio if ratio is not None else 0:>8.2f} {TARGETS[name]:>6.1f} "
              f"{oc or 0:>9.0f} {qc or 0:>9.0f}  {all_o} / {all_q}")
    print("load average (1/5/15 min): start " + " ".join(f"{x:.2f}" for x in load0)
          + ", end " + " ".join(f"{x:.2f}" for x in load1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
