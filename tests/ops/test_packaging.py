"""Packaging as a user meets it: an sdist built by ``python -m build`` installs with pip into a
fresh virtualenv made from Debian's Python, on a machine that has only the apt dependencies, and
the installed daemon serves a request.  (Debian's Python is externally managed (PEP 668):
nothing here, nor in scripts/, installs into it.)"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.frontend.vhost_user import S_OK, connect
from vhost._build import C_SOURCES

ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PY = "/usr/bin/python3"


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)  # type: ignore
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)])
    (tarball,) = out.glob("pyvhost_blk-*.tar.gz")
    return tarball


def test_sdist_has_the_c_sources_and_no_libvhost_user(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for need in ("setup.py", "pyproject.toml", "vhost/_build.py", "vhost/pyvu.h",
                 "vhost/libvhost_user_source.py"):
        assert need in names, f"{need} missing from the sdist"
    for name in C_SOURCES:  # every C file the build pastes, and nothing else from vhost/csrc
        assert f"vhost/csrc/{name}" in names, f"vhost/csrc/{name} missing from the sdist"
    assert {n for n in names if n.startswith("vhost/csrc/")} == {
        f"vhost/csrc/{name}" for name in C_SOURCES}
    assert not any(n.endswith(("libvhost-user.c", "libvhost-user.h")) for n in names), \
        "libvhost-user's source must be fetched by the build, never shipped"


def test_sdist_installs_into_a_debian_venv_and_serves(sdist: Path, tmp_path: Path) -> None:
    if not os.access(DEBIAN_PY, os.X_OK):
        pytest.fail(f"{DEBIAN_PY} not found: apt-get install python3 python3-venv")
    venv = tmp_path / "venv"
    _run([DEBIAN_PY, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(sdist)],
         cwd=tmp_path)  # not the checkout: the import must come from the installed package
    r = _run([py, "-c", "import vhost._vhost_user, blocklayer, virtio, pyvhost_blk"],
             cwd=tmp_path)
    r = _run([str(venv / "bin" / "pyvhost-blk"), "--version"], cwd=tmp_path)
    assert r.stdout.startswith("pyvhost-blk ")

    sock = str(tmp_path / "vu.sock")
    proc = subprocess.Popen(
        [str(venv / "bin" / "pyvhost-blk"),
         "--blockdev", "driver=null-co,node-name=n,size=1M,read-zeroes=on",
         "--export", f"type=vhost-user-blk,id=e,node-name=n,addr.type=unix,addr.path={sock}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(200):
            if os.path.exists(sock) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0]
        with connect(sock) as fe:
            fe.setup(queue_size=16)
            assert fe.read(0, 4096) == (S_OK, bytes(4096))
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
