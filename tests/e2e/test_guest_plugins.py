"""End to end: a QEMU guest's fio verify on a disk written in Python — the RAM-disk plugin
(examples/ramdisk.py, an nbdkit plugin run unchanged) under the checksum filter
(examples/checksum_filter.py), over vhost-user-blk-pci."""

from __future__ import annotations

from pathlib import Path

from tests.daemon import DaemonProcess
from tests.e2e.guest import Guest

ROOT = Path(__file__).resolve().parents[2]
FIO_VERIFY = (
    "fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=32M --iodepth=16 "
    "--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1"
)


def test_guest_fio_verify_on_a_python_plugin_under_a_python_filter(tmp_path: Path,
                                                                   guest_image) -> None:
    sock = tmp_path / "vhost.sock"
    args = [
        "--blockdev", f"driver=python,node-name=ram,script={ROOT / 'examples/ramdisk.py'},"
                      "size=64M",
        "--blockdev", f"driver=python-filter,node-name=sum,"
                      f"script={ROOT / 'examples/checksum_filter.py'},file=ram",
        "--export", f"type=vhost-user-blk,id=exp0,node-name=sum,addr.type=unix,"
                    f"addr.path={sock},writable=on,num-queues=1",
    ]
    with DaemonProcess(args, tmp_path) as d:
        with Guest(sock, num_queues=1, smp=1, image=guest_image) as g:
            assert g.run_ok("cat /sys/block/vda/size").strip() == str((64 << 20) // 512)
            status, out = g.run(FIO_VERIFY, timeout=600)
            assert status == 0, out
            assert "err= 0" in out and "verify:" not in out.lower(), out
            assert g.poweroff() == 0
        e = d.stats()["exports"]["exp0"]
        assert e["blockstats"]["wr_operations"] >= 8192  # 32 MiB of 4 KiB writes, verified
        assert e["blockstats"]["failed_rd_operations"] == 0
        assert "Traceback" not in d.log()
        assert d.terminate() == 0
