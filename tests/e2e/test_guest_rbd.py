"""End to end: a QEMU guest's fio verify on a Ceph RBD image served by pyvhost-blk's rbd
driver (the session's one-node cluster, tests/conftest.py), then ``rbd export`` holds what the
guest wrote."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.ceph_cluster import CephCluster
from tests.daemon import DaemonProcess
from tests.e2e.guest import Guest

MIB = 1 << 20
PATTERN_OFFSET = 40 * MIB
FIO_VERIFY = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=16M --iodepth=16 "
    "--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1"
)


def test_guest_fio_verify_on_rbd(tmp_path: Path, guest_image, ceph: CephCluster) -> None:
    image = f"guest-{uuid.uuid4().hex[:8]}"
    ceph.rbd("create", "--size", "64M", f"{ceph.pool}/{image}")
    sock = tmp_path / "vhost.sock"
    args = ["--blockdev", f"driver=rbd,node-name=r,pool={ceph.pool},image={image},"
                          f"conf={ceph.conf}",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=r,addr.type=unix,"
                        f"addr.path={sock},writable=on,num-queues=1"]
    with DaemonProcess(args, tmp_path) as d:
        with Guest(sock, num_queues=1, smp=1, image=guest_image) as g:
            assert g.run_ok("cat /sys/block/vda/size").strip() == str(64 * MIB // 512)
            status, out = g.run(FIO_VERIFY, timeout=600)
            assert status == 0 and "err= 0" in out and "verify:" not in out.lower(), out
            g.run_ok(f"head -c 4096 /dev/zero | tr '\\000' 'R' > /tmp/p && dd if=/tmp/p "
                     f"of=/dev/vda bs=4096 seek={PATTERN_OFFSET // 4096} count=1 "
                     "oflag=direct conv=fsync")
            assert g.poweroff() == 0
        assert d.terminate() == 0
    exported = tmp_path / "export.raw"
    ceph.rbd("export", f"{ceph.pool}/{image}", str(exported))
    with open(exported, "rb") as f:
        f.seek(PATTERN_OFFSET)
        assert f.read(4096) == b"R" * 4096
