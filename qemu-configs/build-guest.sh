#!/usr/bin/env bash
# Build the pyvhost-blk test guest: a Debian bookworm kernel plus a busybox/fio
# initramfs that boots to a root shell on ttyS0 with the virtio-blk driver loaded.
#
# Outputs (printed at the end, one path per line):
#   $CACHE/guest/vmlinuz
#   $CACHE/guest/initramfs.cpio.gz
# where CACHE=${PYVHOST_BLK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvhost-blk}.
#
# The build is cached: if both outputs exist and the stamp file records the
# sha256 of this script, nothing is done (editing the script forces a rebuild;
# so does `--force`).  The downloaded kernel .deb is kept in the cache and reused.
#
# Needs (Debian bookworm): apt-get/apt-cache/dpkg, busybox-static, fio, cpio,
# gzip, xz-utils, libc-bin (ldd/ldconfig), util-linux (flock).
# Run as root (apt-get download into the cache works unprivileged too, as long
# as the package lists are present).
set -euo pipefail

MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk)
KERNEL_META=linux-image-amd64
READY_MARKER=PYVHOST-GUEST-READY

die() { echo "build-guest.sh: error: $*" >&2; exit 1; }
log() { echo "build-guest.sh: $*" >&2; }

force=0
case "${1:-}" in
    --force) force=1 ;;
    "") ;;
    *) die "usage: $0 [--force]" ;;
esac

script_path=$(readlink -f "${BASH_SOURCE[0]}")
cache_root=${PYVHOST_BLK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyvhost-blk}
out=$cache_root/guest
kernel_out=$out/vmlinuz
initrd_out=$out/initramfs.cpio.gz
stamp=$out/build.stamp

mkdir -p "$out"
script_hash=$(sha256sum "$script_path" | cut -d' ' -f1)

is_fresh() {
    [ "$force" = 0 ] && [ -s "$kernel_out" ] && [ -s "$initrd_out" ] &&
        [ "$(cat "$stamp" 2>/dev/null)" = "$script_hash" ]
}

finish() {
    echo "$kernel_out"
    echo "$initrd_out"
    exit 0
}

# Fast path, without taking the lock.
if is_fresh; then finish; fi

# Serialise concurrent builds (e.g. parallel test sessions).
exec 9>"$out/.lock"
flock 9
if is_fresh; then finish; fi

# ---------------------------------------------------------------- tool check
missing=()
need() { command -v "$1" >/dev/null 2>&1 || missing+=("$1 ($2)"); }
need apt-get apt
need apt-cache apt
need dpkg dpkg
need dpkg-deb dpkg
need cpio cpio
need gzip gzip
need xz xz-utils
need ldd libc-bin
need ldconfig libc-bin
need flock util-linux
need sha256sum coreutils
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || missing+=("busybox (busybox-static)")
[ -x /usr/bin/fio ] || missing+=("/usr/bin/fio (fio)")
if [ ${#missing[@]} -gt 0 ]; then
    die "missing tools: ${missing[*]}; run scripts/install-deps.sh (or: apt-get install busybox-static fio cpio xz-utils)"
fi
busybox_bin=$(command -v busybox)
if ldd "$busybox_bin" >/dev/null 2>&1; then
    die "$busybox_bin is dynamically linked; install busybox-static (apt-get install busybox-static)"
fi

# ---------------------------------------------------------------- kernel
resolve_kernel_pkg() {
    # linux-image-amd64 is a metapackage; take the versioned image from the
    # candidate version's Depends (e.g. linux-image-6.1.0-56-amd64).
    apt-cache show --no-all-versions "$KERNEL_META" 2>/dev/null |
        sed -n 's/^Depends: //p' | tr ',|' '\n\n' | sed 's/^ *//; s/ .*//' |
        grep -E '^linux-image-[0-9].*-amd64$' | head -n1
}

debdir=$out/debs
mkdir -p "$debdir"
kpkg=$(resolve_kernel_pkg || true)
if [ -z "$kpkg" ]; then
    log "cannot resolve $KERNEL_META, running apt-get update"
    apt-get update -q >&2 || true
    kpkg=$(resolve_kernel_pkg || true)
fi
if [ -z "$kpkg" ]; then
    # Offline fallback: reuse any previously downloaded kernel.
    kdeb=$(ls -t "$debdir"/linux-image-*-amd64_*.deb 2>/dev/null | head -n1 || true)
    [ -n "$kdeb" ] || die "cannot resolve the package behind $KERNEL_META (is a bookworm apt source configured?)"
    log "using cached $kdeb"
else
    kdeb=$(ls -t "$debdir/${kpkg}"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$kdeb" ]; then
        log "downloading $kpkg"
        if ! (cd "$debdir" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >&2); then
            log "download failed, running apt-get update and retrying"
            apt-get update -q >&2 || true
            (cd "$debdir" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >&2) || die "apt-get download $kpkg failed"
        fi
        kdeb=$(ls -t "$debdir/${kpkg}"_*.deb 2>/dev/null | head -n1 || true)
        [ -n "$kdeb" ] || die "apt-get download $kpkg produced no .deb in $debdir"
        # Drop older kernels' debs.
        find "$debdir" -name 'linux-image-*.deb' ! -name "$(basename "$kdeb")" -delete
    fi
fi

work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

log "unpacking $(basename "$kdeb")"
dpkg -x "$kdeb" "$work/kernel"
vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-* 2>/dev/null | head -n1 || true)
[ -n "$vmlinuz" ] || die "no /boot/vmlinuz-* in $kdeb"
kver=${vmlinuz##*/vmlinuz-}
moddir=$(ls -d "$work"/kernel/lib/modules/"$kver" "$work"/kernel/usr/lib/modules/"$kver" 2>/dev/null | head -n1 || true)
[ -n "$moddir" ] || die "no modules directory for $kver in $kdeb"

# ---------------------------------------------------------------- initramfs
root=$work/root
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc,proc,sys,dev,tmp,run,root,mnt}
# merged-/usr layout, like bookworm itself, so ldd's paths work verbatim.
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
chmod 1777 "$root/tmp"

# busybox + applet links
install -m 0755 "$busybox_bin" "$root/usr/bin/busybox"
for applet in $("$busybox_bin" --list-full); do
    dest=$root/$applet
    case "$applet" in bin/* | sbin/*) dest=$root/usr/$applet ;; esac
    [ -e "$dest" ] || [ -L "$dest" ] || { mkdir -p "$(dirname "$dest")"; ln -s /usr/bin/busybox "$dest"; }
done

# fio and its shared libraries (+ the dynamic loader)
install -m 0755 /usr/bin/fio "$root/usr/bin/fio"
libs=$(ldd /usr/bin/fio | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
[ -n "$libs" ] || die "ldd /usr/bin/fio found no libraries"
for lib in $libs; do
    case "$lib" in
        /lib/* | /lib64/* | /bin/* | /sbin/*) dest=$root/usr$lib ;;
        *) dest=$root$lib ;;
    esac
    mkdir -p "$(dirname "$dest")"
    cp -L "$lib" "$dest"
done
# library search path for libraries outside the default dirs (e.g. ceph/)
for lib in $libs; do dirname "$lib"; done | sort -u >"$root/etc/ld.so.conf"
ldconfig -r "$root" 2>/dev/null || log "warning: ldconfig -r failed (continuing)"

# kernel modules, decompressed, in load order
mkdir -p "$root/usr/lib/modules/guest"
loaded=()
for m in "${MODULES[@]}"; do
    f=$(find "$moddir" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" \) | head -n1)
    if [ -z "$f" ]; then
        if grep -qE "/$m\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
            log "module $m is built in"
        else
            log "warning: module $m not found (neither module nor built-in)"
        fi
        continue
    fi
    dest=$root/usr/lib/modules/guest/$m.ko
    case "$f" in
        *.ko.xz) xz -dc "$f" >"$dest" ;;
        *.ko.zst) zstd -qdc "$f" >"$dest" ;;
        *.ko.gz) gzip -dc "$f" >"$dest" ;;
        *) cp "$f" "$dest" ;;
    esac
    loaded+=("$m")
done

cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
EOF

# /etc/profile runs in the interactive login shell on ttyS0: the ready marker
# is printed there, so it means "a shell is about to read commands".
cat >"$root/etc/profile" <<EOF
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=\${TERM:-vt100}
PS1='guest# '
cd /root
echo $READY_MARKER
EOF

cat >"$root/init" <<EOF
#!/bin/sh
# pyvhost-blk test guest init (generated by build-guest.sh)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
hostname guest

for m in ${loaded[*]}; do
    insmod /lib/modules/guest/\$m.ko || echo "GUEST-WARNING: insmod \$m failed"
done

# If a virtio-blk PCI function (1af4:1001 legacy / 1af4:1042 modern) exists,
# give its probe a moment so /dev/vda is there when the shell starts.
has_blk=0
for d in /sys/bus/pci/devices/*; do
    [ -r "\$d/vendor" ] || continue
    read -r v <"\$d/vendor"; read -r p <"\$d/device"
    [ "\$v" = 0x1af4 ] && { [ "\$p" = 0x1001 ] || [ "\$p" = 0x1042 ]; } && has_blk=1
done
if [ \$has_blk = 1 ]; then
    i=0
    while [ ! -b /dev/vda ] && [ \$i -lt 50 ]; do sleep 0.2; i=\$((i + 1)); done
    [ -b /dev/vda ] || echo "GUEST-WARNING: virtio-blk PCI device present but no /dev/vda"
fi

# Background watcher: report /sys/block/vda/size on the console whenever it
# changes (the initial value too); "VDA-GONE" if the disk disappears.
(
    last=
    while :; do
        cur=
        [ -r /sys/block/vda/size ] && read -r cur </sys/block/vda/size 2>/dev/null
        if [ "\$cur" != "\$last" ]; then
            if [ -n "\$cur" ]; then echo "VDA-SIZE \$cur"; else echo "VDA-GONE"; fi
            last=\$cur
        fi
        sleep 0.2
    done
) </dev/null >/dev/console 2>&1 &

# Interactive root shell on the serial console; respawn it if it exits.
while :; do
    setsid cttyhack sh -l
    echo "GUEST: shell exited, respawning"
    sleep 1
done
EOF
chmod 0755 "$root/init"

log "packing initramfs"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --owner=0:0) |
    gzip -6 >"$work/initramfs.cpio.gz"

cp "$vmlinuz" "$work/vmlinuz"
mv -f "$work/vmlinuz" "$kernel_out"
mv -f "$work/initramfs.cpio.gz" "$initrd_out"
echo "$script_hash" >"$stamp"
log "built guest: kernel $kver, modules: ${loaded[*]:-none}"
finish
