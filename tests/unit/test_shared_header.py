"""One rule, one place: what C and Python share is written once, in vhost/pyvu.h.

The cffi declarations are generated from the header (vhost/_build.py), so Python reads those
constants as ``lib.NAME`` and the state's layout as ffi's struct.  This test checks that the
Python names meant to mirror the header really come from it, and that nothing the header
defines is written again: not in the C files (every file of vhost/csrc/), and not as a number in
the Python modules that mirror it (the virtio-blk wire constants, BDRV_REQ_* flags, driver kinds,
op codes).
"""

from __future__ import annotations

import re
from pathlib import Path

from blocklayer import accounting, batch, bdrv, io_uring
from vhost import server
from vhost._build import C_SOURCES, CDEF, shared_cdef
from vhost.ffi import ffi, lib
from virtio import constants
from virtio.constants import VirtioBlkStatus, VirtioBlkType

VHOST = Path(server.__file__).resolve().parent
CSRC = VHOST / "csrc"


def _c_files() -> list[Path]:
    """Every C source and header of vhost/csrc/ (what the build pastes after vhost/pyvu.h)."""
    files = sorted(p for p in CSRC.iterdir() if p.suffix in (".c", ".h"))
    assert files, f"no C files in {CSRC}"
    return files


def _defines(text: str) -> dict[str, int]:
    out = {}
    for m in re.finditer(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)u?\b", text, re.M):
        out[m.group(1)] = int(m.group(2), 0)
    return out


def test_header_constants_reach_python_unchanged() -> None:
    header = (VHOST / "pyvu.h").read_text()
    defs = _defines(header)
    assert defs, "no #define found in vhost/pyvu.h"
    for name, value in defs.items():
        if name == "PYVU_H":
            continue
        assert getattr(lib, name) == value, name
    assert defs["PYVU_NBOUNDS"] == defs["PYVU_NBINS"] - 1


def test_python_mirrors_come_from_the_header() -> None:
    assert (bdrv.DRV_NONE, bdrv.DRV_NULL, bdrv.DRV_FILE,
            bdrv.DRV_FILE_LAIO) == (lib.DRV_NONE, lib.DRV_NULL, lib.DRV_FILE,
                                    lib.DRV_FILE_LAIO)
    assert (io_uring.OP_READ, io_uring.OP_WRITE, io_uring.OP_FSYNC) == (
        lib.PYVU_OP_READ, lib.PYVU_OP_WRITE, lib.PYVU_OP_FSYNC)
    assert server.TOKEN_C == lib.PYVU_TOKEN_C
    assert [k.value for k in accounting.BlockAcctType] == [
        lib.PYVU_ACCT_READ, lib.PYVU_ACCT_WRITE, lib.PYVU_ACCT_FLUSH, lib.PYVU_ACCT_UNMAP]
    assert len(accounting.BlockAcctType) == lib.PYVU_NKINDS
    assert accounting.MAX_BOUNDARIES == lib.PYVU_NBOUNDS
    assert len(accounting.DEFAULT_BOUNDARIES_NS) == lib.PYVU_NBOUNDS
    assert lib.BDRV_REQUEST_MAX_SECTORS == (2**31 - 1) >> 9
    assert (constants.VIRTIO_BLK_ID_BYTES, constants.VIRTIO_BLK_OUTHDR_SIZE) == (
        lib.VIRTIO_BLK_ID_BYTES, lib.VIRTIO_BLK_OUTHDR_SIZE)
    assert (batch.T_DISCARD, batch.T_WRITE_ZEROES, batch.EACH) == (
        lib.VIRTIO_BLK_T_DISCARD, lib.VIRTIO_BLK_T_WRITE_ZEROES, lib.PYVU_BATCH_EACH)
    # vhost-user framing, read from libvhost-user's own definitions at build time
    assert (server.VHOST_USER_HDR_SIZE, server.MAX_PAYLOAD, server.VHOST_USER_MAX_CONFIG_SIZE) == (
        12, 272, 256)


def test_the_state_layout_is_declared_once() -> None:
    header = (VHOST / "pyvu.h").read_text()
    assert "struct pyvu_blkstate {" in header
    for path in _c_files():
        assert "struct pyvu_blkstate {" not in path.read_text(), path.name
    assert "struct pyvu_blkstate {" not in CDEF  # the cdef takes it from the header
    assert "struct pyvu_blkstate {" in shared_cdef(header)
    assert ffi.sizeof("struct pyvu_blkstate") > 0


def test_nothing_is_written_twice() -> None:
    header = _defines((VHOST / "pyvu.h").read_text())
    seen: dict[str, str] = {}
    for path in _c_files():
        again = set(header) & set(_defines(path.read_text()))
        assert not again, f"{path.name} redefines {again}"
        for name in re.findall(r"^\s*#\s*define\s+(\w+)", path.read_text(), re.M):
            assert name not in seen, f"{name} defined in {seen[name]} and {path.name}"
            seen[name] = path.name
    assert [t.value for t in VirtioBlkType] == [
        lib.VIRTIO_BLK_T_IN, lib.VIRTIO_BLK_T_OUT, lib.VIRTIO_BLK_T_FLUSH, lib.VIRTIO_BLK_T_GET_ID,
        lib.VIRTIO_BLK_T_GET_LIFETIME, lib.VIRTIO_BLK_T_DISCARD, lib.VIRTIO_BLK_T_WRITE_ZEROES,
        lib.VIRTIO_BLK_T_SECURE_ERASE]
    assert [s.value for s in VirtioBlkStatus] == [
        lib.VIRTIO_BLK_S_OK, lib.VIRTIO_BLK_S_IOERR, lib.VIRTIO_BLK_S_UNSUPP]
    assert (bdrv.BDRV_REQ_FUA, bdrv.BDRV_REQ_MAY_UNMAP) == (lib.BDRV_REQ_FUA,
                                                            lib.BDRV_REQ_MAY_UNMAP)
    # The Python mirrors assign from lib, never from a literal.
    root = VHOST.parent
    for path, names in ((root / "virtio" / "constants.py", ("IN", "OUT", "FLUSH", "OK",
                                                           "IOERR", "VIRTIO_BLK_T_BARRIER",
                                                           "VIRTIO_BLK_OUTHDR_SIZE",
                                                           "VIRTIO_BLK_ID_BYTES")),
                        (root / "blocklayer" / "bdrv.py", ("BDRV_REQ_FUA", "BDRV_REQ_MAY_UNMAP")),
                        (root / "blocklayer" / "batch.py", ("T_READ", "T_DISCARD", "T_WRITE_ZEROES",
                                                            "EACH", "PENDING", "UNSET"))):
        text = path.read_text()
        for n in names:
            assert not re.search(rf"^\s*{n}\s*=\s*(0x[0-9a-fA-F]+|\d+)\b", text, re.M), (path, n)


def test_every_c_file_is_built() -> None:
    """The build pastes exactly the files of vhost/csrc/ (none forgotten, none missing)."""
    assert sorted(C_SOURCES) == [p.name for p in _c_files()]
    assert C_SOURCES[0] == "pyvu_internal.h"  # the layers' shared declarations come first
