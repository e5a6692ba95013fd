#!/usr/bin/env bash
# Install the system packages pyvhost-blk needs on Debian bookworm (run as root or with sudo).
#
# - QEMU 7.2, qemu-storage-daemon, fio, busybox, liburing from bookworm;
# - python3-venv: the project lives in its own virtualenv (.venv), since Debian's Python is
#   externally managed (PEP 668);
# - libblkio (a third-party vhost-user-blk client for tests/benchmarks) from trixie,
#   pinned at priority 100 so nothing else is upgraded;
# - a deb-src entry for trixie, so the build can fetch QEMU 10.0's source for libvhost-user.
# - with PYVHOST_BLK_EXTRA_DEPS=1 (scripts/test.sh sets it): what the operations tests drive
#   for real: libvirt, Prometheus, systemd's tools, strace (to widen a race in one test),
#   the network storage servers and client bindings (nbdkit with its Python plugin, libnbd,
#   a one-node Ceph cluster, librbd/librados for Python), zstd (compressed qcow2 images).
#
# The trixie entry uses the Debian mirror this machine is already configured with (its deb822
# .sources files or sources.list), so the script works behind a local mirror.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi

# The machine's Debian mirror: the first URI serving a bookworm suite (not -security).
debian_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
        [ -f "$f" ] || continue
        case "$f" in
        *.sources)
            uri=$(awk '
                /^[[:space:]]*$/ { if (u != "" && s ~ /bookworm([[:space:]]|$|-updates)/ && s !~ /security/) { print u; exit } u=""; s=""; next }
                /^URIs:/ { u=$2 }
                /^Suites:/ { $1=""; s=$0 }
                END { if (u != "" && s ~ /bookworm([[:space:]]|$|-updates)/ && s !~ /security/) print u }
            ' "$f" | head -n 1) ;;
        *)
            uri=$(awk '$1 == "deb" && $0 !~ /security/ {
                        for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { if ($(i+1) ~ /^bookworm/) { print $i; exit } } }' "$f" | head -n 1) ;;
        esac
        if [ -n "$uri" ]; then echo "${uri%/}"; return 0; fi
    done
    return 1
}

sources=/etc/apt/sources.list.d/pyvhost-blk-trixie.sources
need_update=0
if [ ! -f "$sources" ]; then
    if ! mirror=$(debian_mirror); then
        echo "install-deps: no Debian bookworm mirror found in /etc/apt/sources.list{,.d/}; configure apt first" >&2
        exit 1
    fi
    printf 'Types: deb deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" | $SUDO tee "$sources" >/dev/null
    $SUDO tee /etc/apt/preferences.d/pyvhost-blk-trixie >/dev/null <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
    need_update=1
fi

pkgs=(qemu-system-x86 qemu-utils qemu-block-extra fio busybox-static liburing-dev
      python3 python3-dev python3-venv gcc make pkg-config dpkg-dev cpio gzip xz-utils procps)
if [ "${PYVHOST_BLK_EXTRA_DEPS:-0}" = 1 ]; then
    pkgs+=(libvirt-daemon-system libvirt-clients prometheus systemd strace
           nbdkit nbdkit-plugin-python python3-libnbd
           ceph-mon ceph-mgr ceph-osd ceph-common python3-rbd python3-rados zstd)
fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
blkio_missing=0
dpkg-query -W -f='${Status}' libblkio-dev 2>/dev/null | grep -q 'ok installed' || blkio_missing=1

if [ ${#missing[@]} -gt 0 ] || [ $blkio_missing = 1 ] || [ $need_update = 1 ]; then
    $SUDO apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ $blkio_missing = 1 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
        -t trixie libblkio1 libblkio-dev
fi
