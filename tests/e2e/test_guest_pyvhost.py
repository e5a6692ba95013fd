"""End to end: real QEMU (vhost-user-blk-pci) boots a Linux guest on a pyvhost-blk disk and
fio verifies it.

One daemon serves the whole scenario, as it would in production: a first guest (2 queues over 2
iothreads) checks the disk size and hardware queues, runs fio with crc32c verification, writes a
known pattern and powers off; the pattern is then in the image file; a second QEMU attaches to the
same running daemon and passes the same verify; SIGTERM then stops the daemon cleanly.
"""

from __future__ import annotations

from pathlib import Path

from tests.daemon import DaemonProcess
from tests.e2e.guest import Guest

IMAGE_SIZE = 256 << 20
PATTERN_OFFSET = 100 << 20
PATTERN_BYTE = 0x5A
FIO_VERIFY = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=64M --iodepth=16 "
    "--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1"
)


def run_fio_verify(g: Guest) -> None:
    status, out = g.run(FIO_VERIFY, timeout=600)
    assert status == 0, out
    assert "err= 0" in out and "verify:" not in out.lower(), out


def queue_requests(d: DaemonProcess) -> list[int]:
    return [q["requests"] for q in d.stats()["exports"]["exp0"]["queues"]]


def test_two_guests_one_daemon_two_queues(tmp_path: Path, guest_image) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    sock = tmp_path / "vhost.sock"
    args = [
        "--blockdev",
        f"driver=file,node-name=disk0,filename={img},aio=io_uring",
        "--object",
        "iothread,id=io0",
        "--object",
        "iothread,id=io1",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
        f"addr.path={sock},writable=on,num-queues=2,iothread.0=io0,iothread.1=io1",
    ]
    with DaemonProcess(args, tmp_path) as d:
        with Guest(sock, num_queues=2, smp=2, image=guest_image) as g:
            assert g.run_ok("cat /sys/block/vda/size").strip() == str(IMAGE_SIZE // 512)
            assert g.run_ok("ls /sys/block/vda/mq | wc -l").strip() == "2"
            assert g.run_ok("cat /sys/block/vda/queue/logical_block_size").strip() == "512"
            before = queue_requests(d)
            run_fio_verify(g)
            after = queue_requests(d)
            # Both virtqueues (and so both iothreads) carried fio's requests.
            assert all(a - b > 100 for a, b in zip(after, before, strict=True)), (before, after)
            s = d.stats()
            assert s["iothreads"]["io0"]["requests"] > 0 and s["iothreads"]["io1"]["requests"] > 0
            g.run_ok(
                f"head -c 4096 /dev/zero | tr '\\000' '\\{PATTERN_BYTE:03o}' > /tmp/pat && "
                f"dd if=/tmp/pat of=/dev/vda bs=4096 seek={PATTERN_OFFSET // 4096} count=1 "
                "oflag=direct conv=fsync"
            )
            assert g.poweroff() == 0
        with open(img, "rb") as f:
            f.seek(PATTERN_OFFSET)
            assert f.read(4096) == bytes([PATTERN_BYTE]) * 4096

        # The first frontend is gone; a second QEMU attaches to the same running daemon.
        with Guest(sock, num_queues=2, smp=2, image=guest_image) as g:
            hexbyte = f"{PATTERN_BYTE:02x}"
            g.run_ok(
                f"dd if=/dev/vda bs=4096 skip={PATTERN_OFFSET // 4096} count=1 iflag=direct "
                f"2>/dev/null | od -An -tx1 | head -1 | grep -q '{hexbyte} {hexbyte}'"
            )
            run_fio_verify(g)
            assert g.poweroff() == 0
        stats = d.stats()["exports"]["exp0"]
        assert stats["connections"] == 2
        assert stats["blockstats"]["failed_wr_operations"] == 0
        assert d.terminate() == 0
        assert not sock.exists()


def test_one_queue_in_main_loop(tmp_path: Path, guest_image) -> None:
    """No iothread: the queue is served by the main loop, with the thread-pool file backend."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    sock = tmp_path / "vhost.sock"
    args = [
        "--blockdev",
        f"driver=file,node-name=disk0,filename={img},aio=threads",
        "--export",
        f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={sock},writable=on",
    ]
    with DaemonProcess(args, tmp_path) as d:
        with Guest(sock, num_queues=1, smp=1, image=guest_image) as g:
            assert g.run_ok("cat /sys/block/vda/size").strip() == str((128 << 20) // 512)
            run_fio_verify(g)
            assert g.poweroff() == 0
        assert queue_requests(d)[0] > 1000
        assert d.terminate() == 0
