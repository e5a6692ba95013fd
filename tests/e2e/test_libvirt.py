"""End to end through libvirt: Debian's libvirtd runs a domain whose disk is a pyvhost-blk export.

What a libvirt user relies on, with libvirt's and our defaults (see docs/libvirt.md):

* the domain XML of ``qemu-configs/libvirt/`` (``<disk type='vhostuser'>``, shared memfd guest
  RAM, no ``<driver queues>``: QEMU asks for one queue per vCPU) starts against an export
  without ``num-queues``, and the guest passes fio verify on /dev/vda over 2 queues;
* QEMU runs as libvirt-qemu and reaches the socket only through the group of a setgid
  directory (``socket-mode=0660``); it never opens the image;
* ``virsh domblklist`` shows vda on the socket;
* after ``virsh destroy`` and ``virsh undefine`` the socket file is still the daemon's and
  serves the next frontend, and the image lock is the daemon's alone (released when it exits).

The domain is TCG (``type='qemu'``: nested KVM hangs on the development VM) and boots the
project's test guest directly (kernel + initramfs copied where libvirt-qemu can read them).
If libvirt cannot run here the test fails with the reason; it is never skipped.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from tests.e2e.guest import REPO_ROOT, GuestImage
from tests.e2e.libvirt_host import (
    ConsoleGuest,
    LibvirtError,
    LibvirtHost,
    open_files,
    qemu_log,
    qemu_pid,
    qemu_user_ids,
    virsh,
)
from tests.e2e.test_guest_pyvhost import run_fio_verify
from tests.frontend.vhost_user import S_OK, connect

TEMPLATE = REPO_ROOT / "qemu-configs" / "libvirt" / "pyvhost-blk-vm.xml"
IMAGE_SIZE = 256 << 20
VCPUS = 2
DEFAULT_QUEUES = 64
PATTERN_SECTOR = (100 << 20) // 512
PATTERN = bytes([0xA5]) * 4096
DOMAIN = "pyvhost-blk-e2e-test"


@pytest.fixture(scope="module")
def libvirt_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtHost]:
    """Debian's libvirtd (qemu:///system, stock configuration): the running one, or virtlogd and
    libvirtd started for this module and stopped after it."""
    host = LibvirtHost(tmp_path_factory.mktemp("libvirt"))
    try:
        host.start()
    except LibvirtError as e:
        host.stop()
        pytest.fail(str(e), pytrace=False)
    yield host
    host.stop()


@pytest.fixture
def qemu_dir() -> Iterator[Path]:
    """A directory only root and libvirt's QEMU can enter: root:libvirt-qemu, mode 2710 (setgid,
    so the socket and files created inside get group libvirt-qemu).  Under /tmp, because
    pytest's tmp_path lies below a 0700 directory that libvirt-qemu cannot traverse."""
    _, gid = qemu_user_ids()
    d = Path(tempfile.mkdtemp(prefix="pyvhost-blk-libvirt-", dir="/tmp"))
    os.chown(d, 0, gid)
    os.chmod(d, 0o2710)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def domain_xml(name: str, sock: Path, console: Path, kernel: Path, initrd: Path) -> str:
    """The template, as a TCG domain that boots the test guest, with its serial port on a
    UNIX socket for the test (the template's pty is for ``virsh console``)."""
    dom = ET.parse(TEMPLATE).getroot()
    dom.set("type", "qemu")
    dom.findall("name")[0].text = name
    assert dom.findall("vcpu")[0].text == str(VCPUS)
    os_el = dom.findall("os")[0]
    for boot in os_el.findall("boot"):
        os_el.remove(boot)
    ET.SubElement(os_el, "kernel").text = str(kernel)
    ET.SubElement(os_el, "initrd").text = str(initrd)
    ET.SubElement(os_el, "cmdline").text = "console=ttyS0 quiet panic=-1"
    devices = dom.findall("devices")[0]
    disk = devices.findall("disk")[0]
    assert disk.get("type") == "vhostuser"
    assert disk.findall("driver")[0].get("queues") is None  # QEMU's default: one per vCPU
    disk.findall("source")[0].set("path", str(sock))
    for el in devices.findall("serial") + devices.findall("console"):
        devices.remove(el)
    serial = ET.SubElement(devices, "serial", type="unix")
    ET.SubElement(serial, "source", mode="bind", path=str(console))
    ET.SubElement(serial, "target", port="0")
    return ET.tostring(dom, encoding="unicode")


def remove_domain(name: str) -> None:
    """Whatever state the domain is in, it is gone afterwards (for failure paths)."""
    virsh("destroy", name, check=False)
    virsh("undefine", name, check=False)


def wait_gone(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"QEMU (pid {pid}) still runs after virsh destroy"
        time.sleep(0.1)


def proc_ids(pid: int) -> tuple[int, int]:
    """Effective uid and gid of a process."""
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            ids[key] = int(value.split()[1])
    return ids["Uid"], ids["Gid"]


def holders(path: Path) -> set[int]:
    """Pids of the processes that have ``path`` open."""
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and str(path) in open_files(int(p))}


def qemu_io_write(img: Path) -> subprocess.CompletedProcess[str]:
    """qemu-io opening the image read-write: it takes QEMU's write lock, so it fails while
    another process holds a conflicting lock."""
    return subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0 0 4k", str(img)],
                          capture_output=True, text=True, timeout=60)


def test_libvirt_domain_on_default_export(libvirt_host: LibvirtHost, guest_image: GuestImage,
                                          qemu_dir: Path, tmp_path: Path) -> None:
    if shutil.which("qemu-io") is None:
        pytest.fail("qemu-io not found; apt-get install qemu-utils", pytrace=False)
    uid, gid = qemu_user_ids()
    name = DOMAIN
    remove_domain(name)  # left over by an interrupted run
    img = tmp_path / "disk.img"  # root-only directory: QEMU does not need the image
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    sock = qemu_dir / "vm.sock"
    console = qemu_dir / "console.sock"
    # /root/.cache is not readable by libvirt-qemu: copy the guest next to the socket.
    kernel, initrd = qemu_dir / "vmlinuz", qemu_dir / "initramfs.cpio.gz"
    shutil.copyfile(guest_image.kernel, kernel)
    shutil.copyfile(guest_image.initrd, initrd)
    xml = tmp_path / "domain.xml"
    xml.write_text(domain_xml(name, sock, console, kernel, initrd))
    args = [
        "--blockdev", f"driver=file,node-name=disk0,filename={img},aio=io_uring",
        "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                    f"addr.path={sock},writable=on,socket-mode=0660",
    ]
    with DaemonProcess(args, tmp_path) as d:
        st = os.stat(sock)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o660)
        # define can take tens of seconds: on a host where /dev/kvm exists but libvirt-qemu
        # cannot open it (no udev: root:root 0600), libvirt probes QEMU again on every
        # capabilities lookup (~4 s each, about ten per define).
        virsh("define", str(xml), timeout=180)
        try:
            # With <reconnect>, QEMU retries a socket it cannot connect to for ever, so a
            # permission problem shows as a start that never returns: bounded here.
            failed = None
            try:
                virsh("start", "--paused", name, timeout=90)
            except LibvirtError as e:
                failed = str(e)
            if failed:
                pytest.fail(f"{failed}\n--- QEMU log ---\n{qemu_log(name)}\n"
                            f"--- pyvhost-blk log ---\n{d.log()}{libvirt_host.diagnostics()}",
                            pytrace=False)
            pid = qemu_pid(name)
            assert proc_ids(pid) == (uid, gid)  # QEMU is not root: the socket's group lets it in
            g = ConsoleGuest(str(console), name, log_path=tmp_path / "console.log")
            try:
                virsh("resume", name)
                g.wait_ready()
                assert g.run_ok("cat /sys/block/vda/size").strip() == str(IMAGE_SIZE // 512)
                # One hardware queue per vCPU: QEMU asked for 2 of the export's 64.
                assert g.run_ok("ls /sys/block/vda/mq | wc -l").strip() == str(VCPUS)
                before = [q["requests"] for q in d.stats()["exports"]["exp0"]["queues"]]
                run_fio_verify(g)
                g.run_ok(
                    "head -c 4096 /dev/zero | tr '\\000' '\\245' > /tmp/pat && "
                    f"dd if=/tmp/pat of=/dev/vda bs=4096 seek={PATTERN_SECTOR // 8} count=1 "
                    "oflag=direct conv=fsync"
                )
            finally:
                g.close()
            after = [q["requests"] for q in d.stats()["exports"]["exp0"]["queues"]]
            assert len(after) == DEFAULT_QUEUES
            used = [i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a > b]
            assert used == list(range(VCPUS)), (before, after)

            rows = [ln.split() for ln in virsh("domblklist", name, "--details").splitlines()]
            assert ["vhostuser", "disk", "vda", str(sock)] in rows, rows
            assert str(img) not in open_files(pid)  # QEMU never opens (or locks) the image

            virsh("destroy", name)
            wait_gone(pid)
            virsh("undefine", name)
        finally:
            remove_domain(name)
        assert name not in virsh("list", "--all", "--name").split()

        # The socket is untouched: same file, still the daemon's, and it serves a new frontend.
        st2 = os.stat(sock)
        assert stat.S_ISSOCK(st2.st_mode) and st2.st_ino == st.st_ino
        assert (st2.st_uid, st2.st_gid, stat.S_IMODE(st2.st_mode)) == (0, gid, 0o660)
        deadline = time.monotonic() + 10
        while d.stats()["exports"]["exp0"]["connected"]:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        with connect(str(sock)) as fe:
            fe.setup(num_queues=1, queue_size=64)
            assert fe.read(PATTERN_SECTOR, len(PATTERN)) == (S_OK, PATTERN)
        assert d.stats()["exports"]["exp0"]["connections"] == 2

        # Only the daemon has the image open; its lock keeps writers out until it exits.
        assert holders(img) == {d.proc.pid}
        r = qemu_io_write(img)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stderr, r
        assert d.terminate() == 0
    assert not sock.exists()
    r = qemu_io_write(img)
    assert r.returncode == 0, r
