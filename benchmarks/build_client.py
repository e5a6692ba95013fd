"""Build (and cache) the libblkio-based test/benchmark client.

    from benchmarks.build_client import build_client
    exe = build_client()          # -> pathlib.Path of the compiled blkio_client

The binary lives in ``${PYVHOST_BLK_CACHE:-${XDG_CACHE_HOME:-~/.cache}/pyvhost-blk}/bin``
and is rebuilt only when blkio_client.c (or the compile command) changes; a
``.stamp`` file next to it records the SHA-256 of both.  Safe to call from
several processes at once (the build goes to a temporary name, then is renamed).

Run as a script to build and print the path:  python -m benchmarks.build_client
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile

SOURCE = pathlib.Path(__file__).resolve().with_name("blkio_client.c")
INSTALL_HINT = "install libblkio-dev (scripts/install-deps.sh)"


def cache_dir() -> pathlib.Path:
    """Root of pyvhost-blk's cache directory (not created)."""
    env = os.environ.get("PYVHOST_BLK_CACHE")
    if env:
        return pathlib.Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "pyvhost-blk"


def _pkg_config_flags() -> list[str]:
    if shutil.which("pkg-config") is None:
        raise RuntimeError(f"pkg-config not found: {INSTALL_HINT}")
    proc = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "blkio"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        detail = proc.stderr.strip() or "pkg-config cannot find blkio"
        raise RuntimeError(f"libblkio not found ({detail}): {INSTALL_HINT}")
    return shlex.split(proc.stdout)


def _compile_command(output: pathlib.Path) -> list[str]:
    flags = _pkg_config_flags()
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"C compiler {cc!r} not found: install gcc (scripts/install-deps.sh)")
    return [cc, "-O2", "-pthread", "-Wall", "-o", str(output), str(SOURCE), *flags]


def build_client(force: bool = False) -> pathlib.Path:
    """Return the path of an up-to-date blkio_client binary, compiling if needed.

    Raises RuntimeError if pkg-config/libblkio-dev/gcc are missing or the
    compilation fails (the message includes the compiler output).
    """
    bindir = cache_dir() / "bin"
    exe = bindir / "blkio_client"
    stamp = bindir / "blkio_client.stamp"

    # Hash of the source plus the command line (minus the output path), so a
    # libblkio upgrade that changes the flags or a different CC also rebuilds.
    cmd_template = _compile_command(pathlib.Path("OUTPUT"))
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update("\0".join(cmd_template).encode())
    want = digest.hexdigest()

    if not force and exe.is_file() and os.access(exe, os.X_OK):
        try:
            if stamp.read_text().strip() == want:
                return exe
        except OSError:
            pass

    bindir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".blkio_client.", dir=bindir)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        proc = subprocess.run(_compile_command(tmp), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            out = (proc.stderr + proc.stdout).strip()
            hint = f"; {INSTALL_HINT}" if "blkio.h" in out or "-lblkio" in out else ""
            raise RuntimeError(f"compiling {SOURCE.name} failed{hint}:\n{out}")
        tmp.chmod(0o755)
        os.replace(tmp, exe)
    finally:
        if tmp.exists():
            tmp.unlink()
    stamp_tmp = stamp.with_name(stamp.name + f".{os.getpid()}")
    stamp_tmp.write_text(want + "\n")
    os.replace(stamp_tmp, stamp)
    return exe


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        print(build_client(force="--force" in args))
    except RuntimeError as exc:
        print(f"build_client: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
