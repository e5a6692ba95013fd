"""Postcopy migration is not served, and QEMU is told so up front.

libvhost-user offers VHOST_USER_PROTOCOL_F_PAGEFAULT whenever the kernel has userfaultfd, but
the daemon refuses the POSTCOPY_* messages: a postcopy migration would have dropped the disk
in the middle.  The daemon no longer offers PAGEFAULT, so QEMU refuses postcopy when it is
enabled on the destination (QEMU checks the capability there, with ``-incoming``), and
precopy is unaffected.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.daemon import DaemonProcess
from tests.e2e.guest import qemu_binary
from tests.e2e.qmp_helpers import Qmp
from tests.frontend.vhost_user import connect

PF_PAGEFAULT = 1 << 8  # VHOST_USER_PROTOCOL_F_PAGEFAULT


def _export(tmp_path: Path) -> tuple[list[str], str]:
    sock = str(tmp_path / "vu.sock")
    return ["--blockdev", "driver=null-co,node-name=n,size=64M",
            "--export", f"type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={sock},"
                        "writable=on"], sock


def test_pagefault_not_offered_and_refused(tmp_path: Path) -> None:
    args, sock = _export(tmp_path)
    with DaemonProcess(args, tmp_path):
        with connect(sock) as fe:
            fe.get_features()
            offered = fe.get_protocol_features()
            assert not offered & PF_PAGEFAULT, f"PAGEFAULT offered ({offered:#x})"
            assert fe.get_features()  # still talking
        with connect(sock) as fe:
            fe.get_features()
            offered = fe.get_protocol_features()
            fe.send_msg(16, (offered | PF_PAGEFAULT).to_bytes(8, "little"))  # SET_PROTOCOL_F.
            assert fe.peer_closed(3), "SET_PROTOCOL_FEATURES with PAGEFAULT was accepted"


def test_qemu_refuses_postcopy_on_the_destination(tmp_path: Path) -> None:
    args, sock = _export(tmp_path)
    qmp_path = tmp_path / "qmp.sock"
    with DaemonProcess(args, tmp_path) as d:
        qemu = subprocess.Popen(
            [qemu_binary(), "-machine", "q35", "-accel", "tcg", "-m", "256M", "-nodefaults",
             "-display", "none", "-object",
             "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
             "-chardev", f"socket,id=c0,path={sock}",
             "-device", "vhost-user-blk-pci,chardev=c0,num-queues=1",
             "-qmp", f"unix:{qmp_path},server=on,wait=off", "-incoming", "defer"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            qmp = Qmp(qmp_path)
            try:
                err = qmp.error("migrate-set-capabilities", {
                    "capabilities": [{"capability": "postcopy-ram", "state": True}]})
                assert "Postcopy is not supported" in err["desc"], err
                # Precopy stays available: the capability set without postcopy is accepted.
                qmp.cmd("migrate-set-capabilities",
                        capabilities=[{"capability": "events", "state": True}])
                qmp.cmd("quit")
            finally:
                qmp.close()
            _, stderr = qemu.communicate(timeout=30)
        finally:
            if qemu.poll() is None:
                qemu.kill()
                qemu.communicate()
        assert "postcopy" in stderr.lower(), stderr  # QEMU names the vhost-user backend
        assert "frontend connected" in d.log()
