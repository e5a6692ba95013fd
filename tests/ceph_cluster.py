"""A one-node Ceph cluster for the rbd tests, started from Debian's packages in a temp dir.

Theory of operation
-------------------
The shape of Ceph's own ``micro-osd.sh`` (and go-ceph's CI): one monitor, one manager and one
OSD on 127.0.0.1, ``auth none`` (no keys to hand around), the OSD's object store in memory
(``memstore``: no disk to format, and nothing survives the cluster, which is what a test wants),
every pool of size 1.  ``CephCluster.start()`` writes ``ceph.conf``, makes the monitor's store
(``ceph-mon --mkfs``), starts ``ceph-mon``, ``ceph-mgr``, creates and starts ``osd.0``, creates
the pool and waits until its placement groups are active: only then does a write complete.
Everything runs in the calling (test) thread; daemons are children of the test process
(``--foreground``), stopped by ``stop()`` and by id.

``stop_osd()``/``start_osd()`` take the one OSD away and bring it back (memstore keeps its
objects in a file it writes at a clean shutdown, so SIGTERM, not SIGKILL).

A missing daemon is an error saying which Debian package to install, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

PACKAGES = {"ceph-mon": "ceph-mon", "ceph-mgr": "ceph-mgr", "ceph-osd": "ceph-osd",
            "ceph": "ceph-common", "rbd": "ceph-common", "monmaptool": "ceph-base"}


def missing_tools() -> list[str]:
    """Which executables are missing, as 'name (apt-get install pkg)'."""
    return [f"{exe} (apt-get install {pkg})" for exe, pkg in PACKAGES.items()
            if shutil.which(exe) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CephError(RuntimeError):
    pass


class CephCluster:
    """Test thread only.  ``conf`` is the ceph.conf path clients use (``conf=`` option)."""

    def __init__(self, workdir: Path, pool: str = "rbd", memstore_bytes: int = 2 << 30) -> None:
        self.dir = workdir
        self.pool = pool
        self.conf = workdir / "ceph.conf"
        self.fsid = str(uuid.uuid4())
        self.port = _free_port()
        self.memstore_bytes = memstore_bytes
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("run", "log", "mon/a", "mgr/x", "osd/0"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = v2:127.0.0.1:{self.port}
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd op num shards = 1
osd op num threads per shard = 2
osd max object name len = 256
osd max object namespace len = 64
# memstore writes its objects out only at a clean shutdown (OSD restart tests)
osd fast shutdown = false
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
mon data = {d}/mon/$id
mgr data = {d}/mgr/$id
osd data = {d}/osd/$id
keyring = {d}/keyring
mon cluster log file = {d}/log/cluster.log
[mgr]
mgr initial modules =
""")
        (d / "keyring").write_text("")

    def _env(self) -> dict[str, str]:
        return {**os.environ, "CEPH_CONF": str(self.conf)}

    def ceph(self, *args: str, timeout: float = 60) -> str:
        """Run the ``ceph`` CLI against this cluster; its stdout, or CephError."""
        return self._run(["ceph", "--connect-timeout", "20", *args], timeout)

    def rbd(self, *args: str, timeout: float = 120) -> str:
        return self._run(["rbd", *args], timeout)

    def _run(self, cmd: list[str], timeout: float) -> str:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=self._env())
        if p.returncode != 0:
            raise CephError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "a")
        self.procs[name] = subprocess.Popen(cmd + ["-c", str(self.conf), "--foreground"],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self._env())
        log.close()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise CephError(f"{name} exited with {p.returncode}; see {self.dir}/log")

    def _wait(self, what: str, cond: callable, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                if cond():
                    return
            except (CephError, subprocess.TimeoutExpired):
                pass
            if time.monotonic() > deadline:
                raise CephError(f"{what}: not within {timeout:.0f} s; see {self.dir}/log")
            time.sleep(0.3)

    def _step(self, name: str, t0: float) -> float:
        now = time.monotonic()
        self.timings[name] = round(now - t0, 2)
        return now

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        missing = missing_tools()
        if missing:
            raise CephError("Ceph is not installed: missing " + ", ".join(missing))
        t_start = t = time.monotonic()
        self._write_conf()
        subprocess.run(["monmaptool", "--create", "--clobber", "--fsid", self.fsid,
                        "--addv", "a", f"[v2:127.0.0.1:{self.port}]",
                        str(self.dir / "monmap")], check=True, capture_output=True)
        subprocess.run(["ceph-mon", "-c", str(self.conf), "-i", "a", "--mkfs",
                        "--monmap", str(self.dir / "monmap")],
                       check=True, capture_output=True, env=self._env())
        self._spawn("mon.a", ["ceph-mon", "-i", "a"])
        self._wait("ceph-mon answering", lambda: self.ceph("mon", "stat", timeout=10), 60)
        t = self._step("mon", t)
        self._spawn("mgr.x", ["ceph-mgr", "-i", "x"])
        osd_uuid = str(uuid.uuid4())  # the OSD boots only with the uuid it was created with
        osd_id = self.ceph("osd", "create", osd_uuid).strip()
        if osd_id != "0":
            raise CephError(f"expected osd id 0, got {osd_id!r}")
        subprocess.run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs",
                        "--osd-uuid", osd_uuid],
                       check=True, capture_output=True, env=self._env())
        self.start_osd()
        t = self._step("osd", t)
        self.ceph("osd", "pool", "create", self.pool, "8", "8")
        self.ceph("osd", "pool", "set", self.pool, "size", "1", "--yes-i-really-mean-it")
        self.ceph("osd", "pool", "application", "enable", self.pool, "rbd")
        self.wait_pgs_active()
        self._step("pool", t)
        self.timings["total"] = round(time.monotonic() - t_start, 2)

    def start_osd(self, timeout: float = 120) -> None:
        self._spawn("osd.0", ["ceph-osd", "-i", "0"])
        self._wait("osd.0 up", lambda: json.loads(
            self.ceph("osd", "dump", "--format=json", timeout=10))["osds"][0]["up"] == 1,
            timeout)

    def stop_osd(self) -> None:
        p = self.procs.pop("osd.0")
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def wait_pgs_active(self, timeout: float = 120) -> None:
        def active() -> bool:
            st = json.loads(self.ceph("pg", "stat", "--format=json", timeout=10))
            summary = st.get("pg_summary", st)
            num = summary.get("num_pgs", 0)
            states = summary.get("num_pg_by_state", [])
            act = sum(s["num"] for s in states if "active" in s["name"])
            return num > 0 and act == num
        self._wait("placement groups active", active, timeout)

    def stop(self) -> None:
        for name in ("osd.0", "mgr.x", "mon.a"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
