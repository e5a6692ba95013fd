"""Locate libvhost-user's C source: fetched from the distribution, never committed.

Theory of operation
-------------------
libvhost-user ships inside QEMU's source tree (``subprojects/libvhost-user``, GPL-2.0-or-later).
The build needs ``libvhost-user.c``/``.h`` plus the QEMU headers its symlinks point at
(``include/qemu/{atomic,compiler}.h`` and ``include/standard-headers/linux``).

Where it comes from, in order:

1. ``PYVHOST_BLK_QEMU_SRC`` — an existing QEMU source tree (or an extracted source package);
2. the cache (``$PYVHOST_BLK_CACHE``, else ``$XDG_CACHE_HOME/pyvhost-blk``, else
   ``~/.cache/pyvhost-blk``),
   filled on first use by ``apt-get source --download-only qemu/trixie`` (Debian's newest QEMU;
   ``scripts/install-deps.sh`` adds the ``deb-src`` entry), from which only the few needed
   directories are extracted.

Runs at build time only (from ``vhost/_build.py``), in the build process.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

DEBIAN_SOURCE = "qemu/trixie"
INSTALL_HINT = (
    "pyvhost-blk needs libvhost-user's source from Debian's QEMU source package. "
    "Run 'sudo scripts/install-deps.sh' (adds a deb-src entry for trixie, pinned low) "
    "or point PYVHOST_BLK_QEMU_SRC at a QEMU source tree."
)


class SourceUnavailable(RuntimeError):
    """libvhost-user's source could not be found or fetched."""


def cache_dir() -> Path:
    """The per-user cache directory shared by the build, the guest builder and the tests."""
    env = os.environ.get("PYVHOST_BLK_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyvhost-blk"


def _tree_ok(root: Path) -> bool:
    lvu = root / "subprojects" / "libvhost-user"
    return (lvu / "libvhost-user.c").is_file() and (
        root / "include" / "standard-headers" / "linux" / "virtio_ring.h"
    ).is_file()


def _extract(orig_tarball: Path, dest: Path) -> None:
    """Extract subprojects/libvhost-user and include/ from QEMU's orig tarball into dest."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(orig_tarball) as tar:
        wanted = []
        for member in tar:
            parts = member.name.split("/", 1)
            if len(parts) == 2 and (
                parts[1].startswith("subprojects/libvhost-user/")
                or parts[1].startswith("include/")
            ):
                member.name = parts[1]
                wanted.append(member)
        # Extraction filters came in Python 3.11.4; Debian bookworm's Python is 3.11.2.  Without
        # them, refuse what the "tar" filter would: absolute names, links leaving the tree.
        if hasattr(tarfile, "tar_filter"):
            tar.extractall(tmp, members=wanted, filter="tar")
        else:
            root = str(tmp) + os.sep
            for m in wanted:
                target = os.path.normpath(os.path.join(tmp, m.name))
                link = ""
                if m.issym():
                    link = os.path.normpath(os.path.join(os.path.dirname(target), m.linkname))
                elif m.islnk():
                    link = os.path.normpath(os.path.join(tmp, m.linkname))
                if (os.path.isabs(m.name) or not target.startswith(root)
                        or (link and (os.path.isabs(m.linkname) or not link.startswith(root)))):
                    raise SourceUnavailable(f"{orig_tarball}: unsafe member {m.name!r}")
            tar.extractall(tmp, members=wanted)
    if not _tree_ok(tmp):
        raise SourceUnavailable(f"{orig_tarball} has no libvhost-user. {INSTALL_HINT}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _fetch_into_cache() -> Path:
    src_root = cache_dir() / "qemu-src"
    tree = src_root / "tree"
    if _tree_ok(tree):
        return tree
    download = src_root / "download"
    download.mkdir(parents=True, exist_ok=True)
    tarballs = sorted(glob.glob(str(download / "qemu_*.orig.tar.*")))
    if not tarballs:
        if shutil.which("apt-get") is None:
            raise SourceUnavailable(f"apt-get not found. {INSTALL_HINT}")
        proc = subprocess.run(
            ["apt-get", "source", "--download-only", DEBIAN_SOURCE],
            cwd=download,
            capture_output=True,
            text=True,
        )
        tarballs = sorted(glob.glob(str(download / "qemu_*.orig.tar.*")))
        if proc.returncode != 0 or not tarballs:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise SourceUnavailable(
                f"'apt-get source --download-only {DEBIAN_SOURCE}' failed ({detail[0]}). "
                + INSTALL_HINT
            )
    _extract(Path(tarballs[-1]), tree)
    return tree


def qemu_source_tree() -> Path:
    """Return a QEMU source root holding libvhost-user and its headers (fetching if needed)."""
    env = os.environ.get("PYVHOST_BLK_QEMU_SRC")
    if env:
        root = Path(env)
        if not _tree_ok(root):
            raise SourceUnavailable(
                f"PYVHOST_BLK_QEMU_SRC={env} has no subprojects/libvhost-user/libvhost-user.c "
                "and include/standard-headers"
            )
        return root
    return _fetch_into_cache()
