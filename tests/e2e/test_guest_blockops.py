"""End to end: block-layer operations driven over pyvhost-blk's QMP monitor while a real QEMU
guest (TCG) uses the disk.

* resize, iothread moves and drains under fio crc32c verify, on a single-iothread export and on
  a 2-queue export spread over 2 iothreads (which must refuse the move);
* the tray of a ``removable=on`` export: open/remove during guest I/O, insert/close a second
  image, ``blockdev-change-medium``, and QEMU's error for a non-removable export;
* ``werror=enospc`` on a full tmpfs: the export stops, ``cont`` after freeing space finishes
  the guest's writes with no loss; ``werror=report`` gives the guest an I/O error;
* discard and write-zeroes issued by the guest, with ``discard=unmap`` and with the default;
* a read-only export.

Guest boots are shared: one per fio scenario, one guest with four disks for the tray, discard and
read-only tests (disks told apart by their serial), one with two disks on tmpfs for the error
policies.  Everything the tests start (daemon, QEMU, tmpfs mounts) is torn down even on failure.
Missing tools are test failures (run scripts/install-deps.sh), never skips.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.guest import (
    INSTALL_HINT,
    Guest,
    GuestError,
    GuestImage,
    build_guest,
    qemu_binary,
    timeout_scale,
)
from tests.e2e.qmp_helpers import MonitoredDaemon, Qmp, QmpCommandError, vhost_export

MiB = 1 << 20
FIO_VERIFY = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --iodepth=16 "
    "--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1"
)

# ----------------------------------------------------------------------------- helpers

_image: GuestImage | None = None


def guest_image() -> GuestImage:
    """The test guest (built once); missing tools fail the calling test."""
    global _image
    for tool in ("pyvhost-blk", "fio", "busybox"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found; {INSTALL_HINT}", pytrace=False)
    if _image is None:
        try:
            qemu_binary()
            _image = build_guest()
        except GuestError as exc:
            pytest.fail(str(exc), pytrace=False)
    return _image


def scaled(seconds: float) -> float:
    return seconds * timeout_scale()


def make_image(path: Path, size: int, head: bytes = b"") -> Path:
    """A sparse raw image of ``size`` bytes starting with ``head``."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def pattern(seed: int, n: int = MiB) -> bytes:
    return random.Random(seed).randbytes(n)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def guest_md5(g: Guest, dev: str, offset: int, length: int, bs: int = 65536) -> str:
    """md5 of ``length`` bytes at ``offset`` of a guest disk, read with O_DIRECT."""
    out = g.run_ok(
        f"dd if={dev} bs={bs} skip={offset // bs} count={length // bs} iflag=direct "
        "2>/dev/null | md5sum",
        timeout=120,
    )
    return out.split()[0]


def wait_until(what: str, cond: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + scaled(timeout)
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def vda_size_changed(g: Guest, sectors: int, since: int, timeout: float = 5.0) -> None:
    g.wait_for(rf"VDA-SIZE {sectors}\n", timeout=timeout, since=since)


class GuestJob:
    """A guest shell command run in the background; its output goes to /tmp/NAME.out and its
    exit status to /tmp/NAME.rc."""

    def __init__(self, g: Guest, name: str, script: str) -> None:
        self.g, self.name = g, name
        self.out_path, self.rc_path = f"/tmp/{name}.out", f"/tmp/{name}.rc"
        g.run_ok(
            f"rm -f {self.out_path} {self.rc_path}; "
            f"( ( {script} ) >{self.out_path} 2>&1 </dev/null; echo $? >{self.rc_path} ) "
            "</dev/null >/dev/null 2>&1 &"
        )

    def rc(self) -> int | None:
        status, out = self.g.run(f"cat {self.rc_path} 2>/dev/null")
        return int(out.split()[0]) if status == 0 and out.strip() else None

    def wait(self, timeout: float) -> int:
        return wait_until(f"guest job {self.name}", lambda: _some(self.rc()), timeout, 1.0)[0]

    def output(self, grep: str | None = None) -> str:
        if grep is None:
            return self.g.run(f"cat {self.out_path}", timeout=60)[1]
        return self.g.run(f"grep -iE '{grep}' {self.out_path}", timeout=60)[1]


def _some(v: int | None) -> tuple[int] | None:
    return None if v is None else (v,)


def fio_loop(g: Guest, fio_cmd: str, name: str = "fio") -> GuestJob:
    """Run complete fio verify passes back to back until /tmp/NAME.stop exists (or a pass
    fails); the job's output is every pass's, its status the failing pass's (0 if none);
    /tmp/NAME.passes counts the passes."""
    g.run_ok(f"rm -f /tmp/{name}.stop /tmp/{name}.passes")
    return GuestJob(
        g, name,
        f"n=0; rc=0; while [ $rc = 0 ] && [ ! -e /tmp/{name}.stop ]; do n=$((n+1)); "
        f"echo $n >/tmp/{name}.passes; {fio_cmd}; rc=$?; done; exit $rc",
    )


def check_fio_output(out: str, passes: int) -> None:
    """Every fio pass ended with err= 0 and no verify or I/O error was printed."""
    errs = re.findall(r"err=\s*(\d+)", out)
    assert errs and all(e == "0" for e in errs), out[-6000:]
    assert len(errs) >= passes, (passes, out[-6000:])
    low = out.lower()
    for bad in ("verify:", "bad magic", "io_u error", "input/output error", "crc32c"):
        assert bad not in low, out[-6000:]


def fio_summary(job: GuestJob) -> str:
    return job.output("err=|verify|error|crc")


class Rig:
    """Daemon + QMP + guest (and anything else registered on ``stack``)."""

    def __init__(self, stack: contextlib.ExitStack, d: MonitoredDaemon, g: Guest,
                 **extra: Any) -> None:
        self.stack, self.d, self.g = stack, d, g
        self.q: Qmp = d.qmp
        self.__dict__.update(extra)

    def diag(self) -> str:
        return (f"--- daemon log (tail) ---\n{self.d.log_tail()}\n"
                f"--- guest console (tail) ---\n{self.g.console_tail(30)}")


class SharedRig:
    """A module fixture's lazily built Rig: built on the first get() inside a test (so that a
    missing tool fails that test), shared by the following tests, torn down at module end.  A
    build failure is re-raised for every later test without rebuilding."""

    def __init__(self, build: Callable[[contextlib.ExitStack], Rig]) -> None:
        self.build = build
        self.stack = contextlib.ExitStack()
        self.rig: Rig | None = None
        self.failed: str | None = None

    def get(self) -> Rig:
        if self.failed is not None:
            pytest.fail(f"shared guest setup failed earlier: {self.failed}", pytrace=False)
        if self.rig is None:
            try:
                self.rig = self.build(self.stack)
            except BaseException as exc:
                self.failed = f"{type(exc).__name__}: {exc}"
                self.stack.close()
                raise
        return self.rig

    def close(self) -> None:
        if self.rig is not None and self.rig.g.is_running():
            with contextlib.suppress(GuestError):
                self.rig.g.poweroff(timeout=30)
        self.stack.close()


def start_rig(stack: contextlib.ExitStack, tmp: Path, daemon_args: list[str],
              socks: list[Path], num_queues: int = 1, smp: int = 1, **extra: Any) -> Rig:
    """Daemon with those arguments, then a guest with one vhost-user-blk disk per socket
    (vda = socks[0], ...)."""
    image = guest_image()
    d = stack.enter_context(MonitoredDaemon(daemon_args, tmp))
    extra_args: list[str] = []
    for i, s in enumerate(socks[1:], 1):
        extra_args += ["-chardev", f"socket,id=c{i},path={s}",
                       "-device", f"vhost-user-blk-pci,chardev=c{i},num-queues=1"]
    g = stack.enter_context(Guest(socks[0], num_queues=num_queues, smp=smp, image=image,
                                  extra_args=extra_args))
    return Rig(stack, d, g, **extra)


def guest_disks(g: Guest) -> dict[str, str]:
    """serial → /dev/vdX."""
    out = g.run_ok("for d in /sys/block/vd*; do echo ${d##*/} $(cat $d/serial); done")
    disks = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            disks[parts[1]] = f"/dev/{parts[0]}"
    return disks


# ------------------------------------------------------- 1, 2: resize/moves/drains under fio


def _blockops_under_fio(tmp: Path, num_queues: int) -> None:
    img = make_image(tmp / "disk.img", 256 * MiB)
    sock = tmp / "vhost.sock"
    threads = {"iothread": "io0"} if num_queues == 1 else {"iothread__0": "io0",
                                                          "iothread__1": "io1"}
    args = ["--blockdev", f"driver=file,node-name=disk0,filename={img},aio=io_uring",
            "--object", "iothread,id=io0", "--object", "iothread,id=io1",
            "--export", vhost_export("exp0", "disk0", sock, writable=True,
                                     num_queues=num_queues, **threads)]
    if num_queues == 1:
        fio = f"{FIO_VERIFY} --size=64M"
    else:
        # Two jobs, one per vCPU (so both virtqueues carry requests), on disjoint halves.
        fio = (f"{FIO_VERIFY} --size=32M --numjobs=2 --offset_increment=32M "
               "--cpus_allowed=0-1 --cpus_allowed_policy=split")
    with contextlib.ExitStack() as stack:
        r = start_rig(stack, tmp, args, [sock], num_queues=num_queues, smp=2)
        d, g, q = r.d, r.g, r.q
        try:
            size = 256 * MiB
            assert g.run_ok("cat /sys/block/vda/size").strip() == str(size // 512)
            assert g.run_ok("ls /sys/block/vda/mq | wc -l").strip() == str(num_queues)
            want_threads = ["io0"] if num_queues == 1 else ["io0", "io1"]
            assert q.export("exp0")["iothreads"] == want_threads

            cpu0 = {t: d.iothread_cpu(t) for t in ("io0", "io1")}
            before = d.queue_requests("exp0")
            job = fio_loop(g, fio)
            # fio is really writing before the QMP work starts.
            wait_until("fio requests", lambda: sum(d.queue_requests("exp0")) > sum(before) + 2000,
                       60)

            if num_queues > 1:
                err = q.error("x-blockdev-set-iothread",
                              {"node-name": "disk0", "iothread": "io1", "force": True})
                assert err["class"] == "GenericError"
                assert "spread over several iothreads" in err["desc"], err
                assert q.export("exp0")["iothreads"] == ["io0", "io1"]
            else:
                # Without force a node under a BlockBackend is not moved (QEMU's text).
                err = q.error("x-blockdev-set-iothread", {"node-name": "disk0", "iothread": "io1"})
                assert "Use force=true to override" in err["desc"], err

            resize_lat = []
            for i in range(20):
                size += MiB
                mark = g.mark()
                t0 = time.monotonic()
                assert q.cmd("block_resize", node_name="disk0", size=size) == {}
                vda_size_changed(g, size // 512, since=mark, timeout=5)
                resize_lat.append(time.monotonic() - t0)

                if num_queues == 1:
                    target: str | None = "io1" if i % 2 == 0 else "io0"
                    if i == 11:
                        target = None  # once to the main loop, then back to iothreads
                    assert q.cmd("x-blockdev-set-iothread", node_name="disk0", iothread=target,
                                 force=True) == {}
                    threads_now = q.export("exp0")["iothreads"]
                    if target is None:
                        assert len(threads_now) == 1 and threads_now[0] not in ("io0", "io1")
                    else:
                        assert threads_now == [target], (i, threads_now)
                else:
                    # Refused every time, and nothing moved.
                    with pytest.raises(QmpCommandError, match="spread over several iothreads"):
                        q.cmd("x-blockdev-set-iothread", node_name="disk0",
                              iothread="io0", force=True)
                    assert q.export("exp0")["iothreads"] == ["io0", "io1"]

                assert q.cmd("x-blockdev-drain", node_name="disk0", hold_ms=20 + 10 * (i % 3)) == {}
                assert job.rc() is None, f"fio ended early:\n{fio_summary(job)}"

            # A few more drains back to back, with a longer hold.
            for hold in (0, 50, 200):
                assert q.cmd("x-blockdev-drain", node_name="disk0", hold_ms=hold) == {}
            info = q.export("exp0")
            assert info["stopped"] is False and info["io-status"] == "ok", info

            # fio overlapped all of the above: it is still running; let the current pass end.
            assert job.rc() is None, f"fio ended before the QMP work was done:\n{fio_summary(job)}"
            g.run_ok("touch /tmp/fio.stop")
            rc = job.wait(300)
            passes = int(g.run_ok("cat /tmp/fio.passes").strip())
            out = fio_summary(job)
            assert rc == 0, out
            check_fio_output(out, passes * (1 if num_queues == 1 else 2))

            # The guest and the image agree on the final size.
            assert g.run_ok("cat /sys/block/vda/size").strip() == str(size // 512)
            assert os.path.getsize(img) == size
            after = d.queue_requests("exp0")
            assert all(a - b > 1000 for a, b in zip(after, before, strict=True)), (before, after)
            stats = d.stats()
            bs = stats["exports"]["exp0"]["blockstats"]
            assert bs["failed_wr_operations"] == 0 and bs["failed_rd_operations"] == 0, bs
            # Both iothreads really served requests (their threads used CPU) ...
            cpu = {t: d.iothread_cpu(t) - cpu0[t] for t in ("io0", "io1")}
            print(f"fio passes: {passes}; resize→VDA-SIZE latency max "
                  f"{max(resize_lat):.2f} s, mean {sum(resize_lat) / len(resize_lat):.2f} s; "
                  f"iothread CPU s: {cpu}; per-iothread counters: {stats['iothreads']}")
            assert cpu["io0"] > 0.05 and cpu["io1"] > 0.05, cpu
            assert g.poweroff() == 0
            assert d.proc.terminate() == 0, d.log_tail()
            # ... and the per-iothread counters say so.
            iot = stats["iothreads"]
            assert iot["io0"]["requests"] > 0 and iot["io1"]["requests"] > 0, iot
        except BaseException:
            print(r.diag())
            raise


def test_resize_iothread_moves_drains_under_fio_one_iothread(tmp_path: Path) -> None:
    _blockops_under_fio(tmp_path, num_queues=1)


def test_resize_drains_under_fio_two_queues_two_iothreads(tmp_path: Path) -> None:
    _blockops_under_fio(tmp_path, num_queues=2)


# ------------------------------------------------- 3, 5, 6: one guest with four disks

TRAY_A, TRAY_B, TRAY_C = 64 * MiB, 48 * MiB, 40 * MiB


@pytest.fixture(scope="module")
def disks_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRig]:
    tmp = tmp_path_factory.mktemp("disks")

    def build(stack: contextlib.ExitStack) -> Rig:
        imgs = {
            "tray_a": make_image(tmp / "tray-a.img", TRAY_A, pattern(1)),
            "tray_b": make_image(tmp / "tray-b.img", TRAY_B, pattern(2)),
            "tray_c": make_image(tmp / "tray-c.img", TRAY_C, pattern(3)),
            "unmap": make_image(tmp / "unmap.img", 32 * MiB),
            "ignore": make_image(tmp / "ignore.img", 32 * MiB),
            "ro": make_image(tmp / "ro.img", 16 * MiB, pattern(4)),
        }
        socks = [tmp / f"{n}.sock" for n in ("tray", "unmap", "ignore", "ro")]
        args = [
            "--object", "iothread,id=io0",
            "--blockdev", f"driver=file,node-name=tray0,filename={imgs['tray_a']}",
            "--blockdev",
            f"driver=file,node-name=unmap0,filename={imgs['unmap']},discard=unmap",
            "--blockdev", f"driver=file,node-name=ignore0,filename={imgs['ignore']}",
            "--blockdev", f"driver=file,node-name=ro0,filename={imgs['ro']},read-only=on",
            "--export", vhost_export("exp-tray", "tray0", socks[0], writable=True,
                                     removable=True, iothread="io0", serial="tray"),
            "--export", vhost_export("exp-unmap", "unmap0", socks[1], writable=True,
                                     serial="unmap"),
            "--export", vhost_export("exp-ignore", "ignore0", socks[2], writable=True,
                                     serial="ignore"),
            "--export", vhost_export("exp-ro", "ro0", socks[3]),  # default serial
        ]
        rig = start_rig(stack, tmp, args, socks, smp=1, imgs=imgs)
        rig.disks = guest_disks(rig.g)
        assert rig.disks.get("tray") == "/dev/vda", rig.disks  # the VDA-SIZE watcher's disk
        assert set(rig.disks) == {"tray", "unmap", "ignore", "vhost_user_blk"}, rig.disks
        return rig

    shared = SharedRig(build)
    yield shared
    shared.close()


def test_tray_open_remove_insert_close_change(disks_rig: SharedRig) -> None:
    r = disks_rig.get()
    d, g, q, imgs = r.d, r.g, r.q, r.imgs
    try:
        assert q.export("exp-tray")["tray-open"] is False
        assert guest_md5(g, "/dev/vda", 0, MiB) == md5(pattern(1))

        # Guest I/O: random direct reads, 32 in flight.
        failed_before = q.blockstats("exp-tray")["failed_rd_operations"]
        reads = GuestJob(g, "trayio",
                         "fio --name=r --filename=/dev/vda --rw=randread --bs=4k --iodepth=32 "
                         "--ioengine=libaio --direct=1 --time_based --runtime=120")
        start = sum(d.queue_requests("exp-tray"))
        wait_until("guest reads", lambda: sum(d.queue_requests("exp-tray")) > start + 500, 60)

        q.drop_events("DEVICE_TRAY_MOVED")
        mark = g.mark()
        t_open = time.monotonic()
        assert q.cmd("blockdev-open-tray", id="exp-tray") == {}
        ev = q.wait_event("DEVICE_TRAY_MOVED", 5)
        assert ev["data"] == {"device": "exp-tray", "id": "exp-tray", "tray-open": True}, ev
        assert q.export("exp-tray")["tray-open"] is True
        vda_size_changed(g, 0, since=mark)  # no medium → capacity 0
        assert q.cmd("blockdev-remove-medium", id="exp-tray") == {}
        info = q.export("exp-tray")
        assert info["tray-open"] is True and info["node-name"] == "", info

        # The guest's I/O stops getting data within seconds; nothing hangs.  Requests that
        # reach the daemon with the tray open fail (EIO); new ones are refused by the guest
        # itself (capacity 0: reads see the end of the disk, writes ENOSPC).
        t0 = time.monotonic()
        out = g.run_ok("dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | wc -c",
                       timeout=30)
        assert out.strip() == "0", out
        status, out = g.run("dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct",
                            timeout=30)
        assert status != 0 and re.search(r"error|No space|No medium", out), (status, out)
        assert time.monotonic() - t0 < scaled(15)
        with contextlib.suppress(AssertionError):
            wait_until("fio to fail", lambda: reads.rc() is not None, 5, 1.0)
        fio_rc = reads.rc()
        g.run("killall fio")
        reads.wait(30)
        failed = q.blockstats("exp-tray")["failed_rd_operations"] - failed_before
        print(f"tray open: fio {'exited ' + str(fio_rc) if fio_rc is not None else 'killed'}; "
              f"{failed} reads failed in the daemon; "
              f"{time.monotonic() - t_open:.1f} s after opening")
        if fio_rc is not None and fio_rc != 0:
            assert "Input/output error" in reads.output("error"), reads.output()

        # Removing from an empty drive is a no-op.
        assert q.cmd("blockdev-remove-medium", id="exp-tray") == {}

        # A second image, with a known pattern, goes in.
        q.cmd("blockdev-add", driver="file", node_name="tray1", filename=str(imgs["tray_b"]))
        assert q.cmd("blockdev-insert-medium", id="exp-tray", node_name="tray1") == {}
        err = q.error("blockdev-insert-medium", {"id": "exp-tray", "node-name": "tray1"})
        assert "already" in err["desc"], err
        info = q.export("exp-tray")
        assert info["tray-open"] is True and info["node-name"] == "tray1", info
        mark = g.mark()
        assert q.cmd("blockdev-close-tray", id="exp-tray") == {}
        ev = q.wait_event("DEVICE_TRAY_MOVED", 5)
        assert ev["data"]["tray-open"] is False, ev
        vda_size_changed(g, TRAY_B // 512, since=mark)
        assert q.export("exp-tray")["tray-open"] is False
        assert guest_md5(g, "/dev/vda", 0, MiB) == md5(pattern(2))
        # and is writable
        g.run_ok("dd if=/dev/zero bs=4096 count=1 2>/dev/null | tr '\\000' '\\132' >/tmp/z && "
                 "dd if=/tmp/z of=/dev/vda bs=4096 seek=2048 count=1 oflag=direct conv=fsync")
        assert read_at(imgs["tray_b"], 8 * MiB, 4096) == b"Z" * 4096
        # With the tray closed the medium can be neither removed nor replaced.
        err = q.error("blockdev-remove-medium", {"id": "exp-tray"})
        assert err["desc"] == "Tray of device 'exp-tray' is not open", err
        q.cmd("blockdev-add", driver="file", node_name="spare", filename=str(imgs["tray_a"]),
              read_only=True)
        err = q.error("blockdev-insert-medium", {"id": "exp-tray", "node-name": "spare"})
        assert err["desc"] == "Tray of device 'exp-tray' is not open", err
        assert q.cmd("blockdev-del", node_name="spare") == {}

        # A non-removable export has no tray (QEMU's error text).
        err = q.error("blockdev-open-tray", {"id": "exp-unmap"})
        assert err == {"class": "GenericError", "desc": "Device 'exp-unmap' is not removable"}

        # blockdev-change-medium: open, swap, close in one command.
        q.drop_events("DEVICE_TRAY_MOVED")
        mark = g.mark()
        assert q.cmd("blockdev-change-medium", id="exp-tray", filename=str(imgs["tray_c"]),
                     format="raw") == {}
        opened = q.wait_event("DEVICE_TRAY_MOVED", 5)
        closed = q.wait_event("DEVICE_TRAY_MOVED", 5)
        assert (opened["data"]["tray-open"], closed["data"]["tray-open"]) == (True, False)
        vda_size_changed(g, TRAY_C // 512, since=mark)
        info = q.export("exp-tray")
        assert info["tray-open"] is False and info["node-name"] not in ("", "tray1"), info
        assert guest_md5(g, "/dev/vda", 0, MiB) == md5(pattern(3))
        # The replaced node is free again.
        assert q.cmd("blockdev-del", node_name="tray1") == {}
        # (QEMU opens the new medium first, then finds there is no tray.)
        err = q.error("blockdev-change-medium", {"id": "exp-ro", "filename": str(imgs["tray_a"])})
        assert err["desc"] == "Device 'exp-ro' is not removable", err

    except BaseException:
        print(r.diag())
        raise


def _discard_and_zeroes(r: Rig, serial: str, export_id: str, img: Path, unmap: bool) -> None:
    g, q = r.g, r.q
    dev = r.disks[serial]
    # 8 MiB of a repeating text pattern, written from the guest.
    g.run_ok(f"yes 0123456789abcdef | head -c {8 * MiB} | "
             f"dd of={dev} bs=1M iflag=fullblock oflag=direct conv=fsync", timeout=120)
    line = b"0123456789abcdef\n"
    expect = (line * (8 * MiB // len(line) + 1))[:8 * MiB]
    assert read_at(img, 0, 8 * MiB) == expect
    alloc0 = allocated(img)
    assert alloc0 >= 8 * MiB, alloc0

    # Discard 4 MiB at 1 MiB.
    st0 = q.blockstats(export_id)
    g.run_ok(f"blkdiscard -o {1 * MiB} -l {4 * MiB} {dev}")
    st1 = q.blockstats(export_id)
    assert st1["unmap_operations"] > st0["unmap_operations"], (st0, st1)
    assert st1["unmap_bytes"] - st0["unmap_bytes"] == 4 * MiB, (st0, st1)
    assert st1["failed_unmap_operations"] == st0["failed_unmap_operations"]
    alloc1 = allocated(img)
    if unmap:
        # Punched: reads as zeroes, in the guest and in the file, and the blocks are freed.
        assert guest_md5(g, dev, 1 * MiB, 4 * MiB) == md5(bytes(4 * MiB))
        assert read_at(img, 1 * MiB, 4 * MiB) == bytes(4 * MiB)
        assert alloc1 <= alloc0 - 4 * MiB, (alloc0, alloc1)
    else:
        # discard=ignore (the default): accepted, but the image is untouched.
        assert alloc1 == alloc0, (alloc0, alloc1)
        assert read_at(img, 1 * MiB, 4 * MiB) == expect[1 * MiB:5 * MiB]
    # The data around the range is intact.
    assert guest_md5(g, dev, 0, 1 * MiB) == md5(expect[:MiB])
    assert guest_md5(g, dev, 5 * MiB, 3 * MiB) == md5(expect[5 * MiB:8 * MiB])

    # Write zeroes on 1 MiB at 6 MiB: fio's falloc engine turns trim into
    # fallocate(PUNCH_HOLE|KEEP_SIZE) on the block device = BLKDEV_ZERO_NOFALLBACK, i.e. a
    # VIRTIO_BLK_T_WRITE_ZEROES request (with the UNMAP flag) or an error, never plain writes.
    st0 = q.blockstats(export_id)
    out = g.run_ok(f"fio --name=wz --filename={dev} --ioengine=falloc --rw=trim --bs=256k "
                   f"--offset={6 * MiB} --size={1 * MiB} 2>&1", timeout=120)
    assert "err= 0" in out, out
    st1 = q.blockstats(export_id)
    assert st1["wr_operations"] - st0["wr_operations"] >= 1, (st0, st1)
    assert st1["wr_bytes"] - st0["wr_bytes"] == 1 * MiB, (st0, st1)
    assert st1["failed_wr_operations"] == st0["failed_wr_operations"]
    assert guest_md5(g, dev, 6 * MiB, 1 * MiB) == md5(bytes(MiB))
    assert read_at(img, 6 * MiB, 1 * MiB) == bytes(MiB)
    alloc2 = allocated(img)
    if unmap:
        # MAY_UNMAP on a discard=unmap node deallocates.
        assert alloc2 <= alloc1 - 1 * MiB, (alloc1, alloc2)
    else:
        # Without discard=unmap the zeroed range stays allocated.
        assert alloc2 == alloc1, (alloc1, alloc2)
    assert guest_md5(g, dev, 7 * MiB, 1 * MiB) == md5(expect[7 * MiB:8 * MiB])


def test_discard_and_write_zeroes_unmap(disks_rig: SharedRig) -> None:
    r = disks_rig.get()
    try:
        _discard_and_zeroes(r, "unmap", "exp-unmap", r.imgs["unmap"], unmap=True)
    except BaseException:
        print(r.diag())
        raise


def test_discard_and_write_zeroes_default_ignore(disks_rig: SharedRig) -> None:
    r = disks_rig.get()
    try:
        _discard_and_zeroes(r, "ignore", "exp-ignore", r.imgs["ignore"], unmap=False)
    except BaseException:
        print(r.diag())
        raise


def test_read_only_export(disks_rig: SharedRig) -> None:
    r = disks_rig.get()
    g, q = r.g, r.q
    dev = r.disks["vhost_user_blk"]
    name = dev.rsplit("/", 1)[1]
    try:
        info = q.export("exp-ro")
        assert info["writable"] is False, info
        assert g.run_ok(f"cat /sys/block/{name}/ro").strip() == "1"
        assert g.run_ok(f"cat /sys/block/{name}/serial").strip() == "vhost_user_blk"  # GET_ID
        assert g.run_ok(f"cat /sys/block/{name}/size").strip() == str(16 * MiB // 512)
        assert guest_md5(g, dev, 0, MiB) == md5(pattern(4))
        before = read_at(r.imgs["ro"], 0, MiB)
        st0 = q.blockstats("exp-ro")

        # Clearing the guest's read-only flag does not make the disk writable: every write
        # path fails (the guest kernel refuses, or the daemon answers IOERR).
        g.run("blockdev --setrw " + dev)
        status, out = g.run(f"dd if=/dev/zero of={dev} bs=4096 count=1 oflag=direct", timeout=60)
        assert status != 0 and re.search(r"Operation not permitted|Input/output error", out), out
        status, out = g.run(f"dd if=/dev/zero of={dev} bs=4096 count=1 conv=fsync", timeout=60)
        assert status != 0, out
        status, out = g.run(f"blkdiscard -o 0 -l 65536 {dev}", timeout=60)
        assert status != 0, out
        out = g.run(f"fio --name=wz --filename={dev} --ioengine=falloc --rw=trim --bs=64k "
                    "--size=64k 2>&1", timeout=60)[1]
        assert re.search(r"err=\s*[1-9]", out), out

        # Flush works (fsync of the block device sends VIRTIO_BLK_T_FLUSH).
        g.run_ok(f"sync -d {dev}")
        g.run_ok("sync")
        st1 = q.blockstats("exp-ro")
        assert st1["flush_operations"] > st0["flush_operations"], (st0, st1)
        assert st1["failed_flush_operations"] == 0
        assert st1["wr_operations"] == 0 and st1["wr_bytes"] == 0, st1
        assert st1["unmap_operations"] == 0, st1
        assert read_at(r.imgs["ro"], 0, MiB) == before
        # Reads keep working.
        assert guest_md5(g, dev, 0, MiB) == md5(pattern(4))
        g.run("blockdev --setro " + dev)
    except BaseException:
        print(r.diag())
        raise


# ------------------------------------------------- 4: werror=enospc / report on full tmpfs


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.fail(f"mount not found; {INSTALL_HINT}", pytrace=False)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (this test needs root): {proc.stderr.strip()}",
                    pytrace=False)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@pytest.fixture(scope="module")
def nospace_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRig]:
    tmp = tmp_path_factory.mktemp("nospace")

    def build(stack: contextlib.ExitStack) -> Rig:
        # vda: 64 MiB sparse image + 24 MiB filler on a 72 MiB tmpfs, werror=enospc.
        # vdb: 32 MiB sparse image + 24 MiB filler on a 40 MiB tmpfs, werror=report.
        mnt_a = stack.enter_context(tmpfs(tmp / "mnt-a", "72M"))
        mnt_b = stack.enter_context(tmpfs(tmp / "mnt-b", "40M"))
        fillers = []
        for mnt in (mnt_a, mnt_b):
            filler = mnt / "filler"
            filler.write_bytes(b"\x01" * (24 * MiB))
            fillers.append(filler)
        img_a = make_image(mnt_a / "a.img", 64 * MiB)
        img_b = make_image(mnt_b / "b.img", 32 * MiB)
        socks = [tmp / "a.sock", tmp / "b.sock"]
        args = [
            "--object", "iothread,id=io0",
            "--blockdev", f"driver=file,node-name=nodeA,filename={img_a},aio=io_uring",
            "--blockdev", f"driver=file,node-name=nodeB,filename={img_b},aio=io_uring",
            "--export", vhost_export("exp-enospc", "nodeA", socks[0], writable=True,
                                     iothread="io0", werror="enospc", serial="enospc"),
            "--export", vhost_export("exp-report", "nodeB", socks[1], writable=True,
                                     werror="report", serial="report"),
        ]
        return start_rig(stack, tmp, args, socks, smp=1, fillers=fillers, imgs=[img_a, img_b])

    shared = SharedRig(build)
    yield shared
    shared.close()


def test_werror_enospc_stops_and_cont_resumes(nospace_rig: SharedRig) -> None:
    r = nospace_rig.get()
    d, g, q = r.d, r.g, r.q
    try:
        q.drop_events()
        job = GuestJob(g, "nospc", f"{FIO_VERIFY} --size=64M")
        ev = q.wait_event("BLOCK_IO_ERROR", 120,
                          match=lambda data: data.get("device") == "exp-enospc")
        data = ev["data"]
        assert data["action"] == "stop" and data["nospace"] is True, ev
        assert data["operation"] == "write" and data["node-name"] == "nodeA", ev
        info = q.export("exp-enospc")
        assert info["stopped"] is True and info["io-status"] == "nospace", info

        # Stopped means stopped: no request is served and the guest sees no error.
        n0 = d.queue_requests("exp-enospc")
        time.sleep(1.0)
        assert d.queue_requests("exp-enospc") == n0
        assert job.rc() is None, job.output()
        assert q.export("exp-enospc")["stopped"] is True

        # Make room, resume: the kept requests are retried and fio finishes, verified.
        r.fillers[0].unlink()
        assert q.cmd("cont") == {}
        info = q.export("exp-enospc")
        assert info["stopped"] is False and info["io-status"] == "ok", info
        rc = job.wait(300)
        out = job.output("err=|verify|error|crc")
        assert rc == 0, job.output()
        check_fio_output(out, 1)
        info = q.export("exp-enospc")
        assert info["stopped"] is False and info["io-status"] == "ok", info
        # Every stop was resumed by our one cont (a second ENOSPC would have stopped again).
        for ev in q.drop_events("BLOCK_IO_ERROR"):
            assert ev["data"]["device"] == "exp-enospc" and ev["data"]["action"] == "stop", ev
        bs = q.blockstats("exp-enospc")
        print(f"enospc: {bs['failed_wr_operations']} failed writes retried after cont")
    except BaseException:
        print(r.diag())
        raise


def test_werror_report_gives_guest_io_error(nospace_rig: SharedRig) -> None:
    r = nospace_rig.get()
    g, q = r.g, r.q
    try:
        dev = guest_disks(g)["report"]
        q.drop_events()
        out = g.run(f"fio --name=rep --filename={dev} --rw=randwrite --bs=4k --size=32M "
                    "--iodepth=16 --ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 "
                    "--verify_fatal=1 2>&1", timeout=300)[1]
        assert re.search(r"err=\s*(5|28)\b", out), out  # EIO (or ENOSPC)
        assert "Input/output error" in out or "No space left" in out, out
        ev = q.wait_event("BLOCK_IO_ERROR", 10,
                          match=lambda data: data.get("device") == "exp-report")
        assert ev["data"]["action"] == "report" and ev["data"]["operation"] == "write", ev
        assert "nospace" not in ev["data"], ev  # no iostatus with werror=report (as QEMU)
        info = q.export("exp-report")
        assert info["stopped"] is False and info["io-status"] == "ok", info
        assert q.blockstats("exp-report")["failed_wr_operations"] > 0
        # The disk still works once there is room again.
        r.fillers[1].unlink()
        g.run_ok(f"fio --name=rep2 --filename={dev} --rw=write --bs=64k --size=32M "
                 "--ioengine=libaio --direct=1 --iodepth=4 --verify=crc32c --do_verify=1 "
                 "--verify_fatal=1 2>&1 | grep -q 'err= 0'", timeout=300)
    except BaseException:
        print(r.diag())
        raise
