"""The C request path's transient conditions and counting, with faults made below both paths.

* A tiny io_uring (4 entries: its completion queue overflows with 64 requests in flight) and a
  tiny Linux AIO context (8 events): the kernel takes part of a submission, or none for now
  (-EBUSY, -EAGAIN).  Requests then wait for room and are served; the guest sees no error and
  every block verifies (before: EIO for whatever did not fit).  The rings are made small by
  test-only environment knobs read once when a context's engine is created.
* Many exports x queues on one iothread, all busy at once: nothing stalls (completions of more
  than 64 queues at once used to wait for their queue's next kick).
* A short read at the end of an image whose size is not a multiple of 512 is redone by Python:
  counted once, as done (it used to count as failed too).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess, run_client
from tests.frontend.vhost_user import S_OK, Segment, connect

MIB = 1 << 20


def _file_export(tmp_path: Path, name: str, aio: str, queues: int, size: int = 64 * MIB,
                 iothread: str | None = "io0") -> list[str]:
    img = tmp_path / f"{name}.img"
    with open(img, "wb") as f:
        f.truncate(size)
    direct = ",cache.direct=on" if aio == "native" else ""
    return ["--blockdev", f"driver=file,node-name={name},filename={img},aio={aio}{direct}",
            "--export", f"type=vhost-user-blk,id={name},node-name={name},addr.type=unix,"
                        f"addr.path={tmp_path / (name + '.sock')},writable=on,"
                        f"num-queues={queues}" + (f",iothread={iothread}" if iothread else "")]


@pytest.mark.parametrize("aio,env", [
    ("io_uring", {"PYVHOST_BLK_X_URING_ENTRIES": "4"}),
    ("native", {"PYVHOST_BLK_X_LAIO_EVENTS": "8", "PYVHOST_BLK_X_URING_ENTRIES": "4"}),
], ids=["io_uring-4-entries", "laio-8-events"])
def test_full_engines_delay_requests_never_fail_them(tmp_path: Path, aio: str,
                                                     env: dict[str, str]) -> None:
    args = ["--object", "iothread,id=io0", *_file_export(tmp_path, "d", aio, 2)]
    with DaemonProcess(args, tmp_path, env=env) as d:
        rc, out, err = run_client(str(tmp_path / "d.sock"), "--mode", "verify", "--blocks",
                                  "3000", "--queues", "2", "--iodepth", "64")
        assert rc == 0 and out["mismatches"] == 0, (out, err, d.log())
        e = d.stats()["exports"]["d"]
        bs = e["blockstats"]
        assert bs["failed_wr_operations"] == 0 and bs["failed_rd_operations"] == 0, bs
        assert bs["wr_operations"] == 3000 and bs["rd_operations"] == 3000, bs
        assert e["fast-path-requests"] >= 5000, e  # the C path served them, not a fallback
        assert d.terminate() == 0


def test_many_exports_and_queues_on_one_iothread(tmp_path: Path) -> None:
    n_exports, queues = 20, 4  # 80 queues on io0
    args = ["--object", "iothread,id=io0"]
    for i in range(n_exports):
        args += _file_export(tmp_path, f"e{i}", "io_uring", queues, size=4 * MIB)
    with DaemonProcess(args, tmp_path) as d:
        fes = []
        try:
            for i in range(n_exports):
                fe = connect(str(tmp_path / f"e{i}.sock"))
                fes.append(fe)
                fe.setup(queue_size=32, num_queues=queues)
            for rnd in range(5):
                reqs = []
                for i, fe in enumerate(fes):
                    for q in fe.queues:
                        data = bytes([(i * 7 + q.index + rnd) & 0xFF]) * 4096
                        sector = 8 * (q.index + 4 * rnd)
                        hdr_and_data = (q, q.submit_blk(
                            b"".join([_hdr(1, sector), data]), 1, out_split=[16, 4096]))
                        reqs.append(hdr_and_data)
                for fe in fes:  # every queue kicked before any is waited for
                    for q in fe.queues:
                        q.kick()
                for q, req in reqs:
                    q.wait([req], 10)
                    assert req.status == S_OK
            for i, fe in enumerate(fes):
                for q in fe.queues:
                    st, data = fe.read(8 * (q.index + 16), 4096, queue=q.index)
                    assert st == S_OK and data == bytes([(i * 7 + q.index + 4) & 0xFF]) * 4096
            total = sum(d.stats()["exports"][f"e{i}"]["fast-path-requests"]
                        for i in range(n_exports))
            assert total >= n_exports * queues * 5, total
        finally:
            for fe in fes:
                fe.close()


def _hdr(rtype: int, sector: int) -> bytes:
    from tests.frontend.vhost_user import blk_header

    return blk_header(rtype, sector)


def test_short_read_at_the_end_is_counted_once(tmp_path: Path) -> None:
    img = tmp_path / "odd.img"
    img.write_bytes(os.urandom(MIB + 100))  # the last sector is 100 bytes long on disk
    args = ["--blockdev", f"driver=file,node-name=o,filename={img},aio=io_uring",
            "--export", f"type=vhost-user-blk,id=o,node-name=o,addr.type=unix,"
                        f"addr.path={tmp_path / 'o.sock'},writable=on,num-queues=1"]
    with DaemonProcess(args, tmp_path) as d, connect(str(tmp_path / "o.sock")) as fe:
        fe.setup(queue_size=16, num_queues=1)
        st, data = fe.read(MIB // 512, 512)
        assert st == S_OK and data == img.read_bytes()[MIB:] + bytes(412)
        bs = d.stats()["exports"]["o"]["blockstats"]
        assert bs["rd_operations"] == 1 and bs["failed_rd_operations"] == 0, bs


@pytest.mark.parametrize("aio", ["native", "io_uring"])
def test_one_kick_for_more_requests_than_one_serve_pops(tmp_path: Path, aio: str) -> None:
    """An engine's queue is popped PYVU_SUBMIT_EVERY requests at a time, for a bounded number
    of rounds per kick; what is left in the ring is served without another kick from the
    frontend (and without polling to find it)."""
    n = 250  # more than PYVU_SUBMIT_EVERY x PYVU_BUSY_ROUNDS (4 x 32)
    args = ["--object", "iothread,id=io0,poll-max-ns=0",
            *_file_export(tmp_path, "d", aio, 1, size=4 * MIB)]
    with DaemonProcess(args, tmp_path) as d, connect(str(tmp_path / "d.sock")) as fe:
        fe.setup(queue_size=256, num_queues=1, arena_size=2 << 20)
        q = fe.queues[0]
        reqs = []
        for i in range(n):  # page-aligned data (O_DIRECT: the C path), one descriptor each
            data = q.arena.alloc(4096, align=4096)
            reqs.append(q.add_chain([Segment(q.buffer(_hdr(0, 8 * i)), 16, False),
                                     Segment(data, 4096, True),
                                     Segment(q.buffer(length=1), 1, True)], indirect=True))
        q.kick()  # once, for all of them
        q.wait(reqs, 10)
        assert all(r.status == S_OK for r in reqs)
        assert d.stats()["exports"]["d"]["fast-path-requests"] >= n
        assert d.terminate() == 0
