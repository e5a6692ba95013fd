#!/usr/bin/env bash
# Set up pyvhost-blk and serve a default disk image over vhost-user, printing the QEMU command
# line that attaches it.  Environment: IMAGE (default ./pyvhost-blk-disk.img, created 1 GiB),
# SOCK (default /tmp/pyvhost-blk.sock), QUEUES (the export's num-queues; default: the daemon's,
# 64, so QEMU's default of one queue per vCPU is accepted).  Ctrl-C stops it cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. scripts/venv.sh
IMAGE=${IMAGE:-$PWD/pyvhost-blk-disk.img}
SOCK=${SOCK:-/tmp/pyvhost-blk.sock}
QUEUES=${QUEUES:-}
QEMU_QUEUES=${QUEUES:-2}  # what the printed QEMU command asks (2 vCPUs)
CACHE=${PYVHOST_BLK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvhost-blk}
if [ ! -e "$IMAGE" ]; then
    qemu-img create -f raw "$IMAGE" 1G >/dev/null
    echo "created $IMAGE (1 GiB raw)"
fi
cat <<EOT

Serving $IMAGE on $SOCK (${QUEUES:-up to 64} queues).  Attach it with:

  qemu-system-x86_64 -machine q35 -m 1G -smp 2 \\
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\
    -chardev socket,id=c0,path=$SOCK \\
    -device vhost-user-blk-pci,chardev=c0,num-queues=$QEMU_QUEUES \\
    ... your usual -kernel/-drive/-cdrom options ...

(The guest sees it as /dev/vda when it is the only virtio disk.  Ctrl-C here stops serving.)

A complete command with the project's small test guest (build it once with
qemu-configs/build-guest.sh; its shell is on this terminal, 'poweroff -f' leaves; under nested
virtualization where KVM guests hang at boot, use -accel tcg alone):

  qemu-system-x86_64 -accel kvm -accel tcg -m 1G -smp 2 -nographic -no-reboot \
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
    -kernel $CACHE/guest/vmlinuz -initrd $CACHE/guest/initramfs.cpio.gz \
    -append console=ttyS0 \
    -chardev socket,id=c0,path=$SOCK \
    -device vhost-user-blk-pci,chardev=c0,num-queues=$QEMU_QUEUES

EOT
exec "$VENV/bin/pyvhost-blk" \
    --blockdev "driver=file,node-name=disk0,filename=$IMAGE,aio=io_uring" \
    --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$SOCK,writable=on${QUEUES:+,num-queues=$QUEUES}"
