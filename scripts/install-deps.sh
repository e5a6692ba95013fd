#!/usr/bin/env bash
# Install the system packages pyvhost-blk needs on Debian bookworm (run as root).
#
# - QEMU 7.2, qemu-storage-daemon, fio, busybox, liburing from bookworm;
# - libblkio (a third-party vhost-user-blk client for tests/benchmarks) from trixie,
#   pinned at priority 100 so nothing else is upgraded;
# - a deb-src entry for trixie, so the build can fetch QEMU 10.0's source for libvhost-user.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi

need_update=0
if [ ! -f /etc/apt/sources.list.d/pyvhost-blk-trixie.sources ]; then
    $SUDO tee /etc/apt/sources.list.d/pyvhost-blk-trixie.sources >/dev/null <<'SRC'
Types: deb deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    $SUDO tee /etc/apt/preferences.d/pyvhost-blk-trixie >/dev/null <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
    need_update=1
fi

pkgs=(qemu-system-x86 qemu-utils qemu-block-extra fio busybox-static liburing-dev
      python3-dev gcc make pkg-config dpkg-dev cpio gzip xz-utils procps)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
blkio_missing=0
dpkg -s libblkio-dev >/dev/null 2>&1 || blkio_missing=1

if [ ${#missing[@]} -gt 0 ] || [ $blkio_missing = 1 ] || [ $need_update = 1 ]; then
    $SUDO apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ $blkio_missing = 1 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        -t trixie libblkio1 libblkio-dev
fi
