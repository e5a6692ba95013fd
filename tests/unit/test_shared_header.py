"""One rule, one place: what C and Python share is written once, in vhost/pyvu.h.

The cffi declarations are generated from the header (vhost/_build.py), so Python reads those
constants as ``lib.NAME`` and the state's layout as ffi's struct.  This test checks that the
Python names meant to mirror the header really come from it, and compares what is still written
on both sides: the virtio-blk wire constants, which C's request parser (_fastpath.c) and the
Python handler (virtio/constants.py) each spell out.
"""

from __future__ import annotations

import re
from pathlib import Path

from blocklayer import accounting, bdrv, io_uring
from vhost import server
from vhost._build import CDEF, shared_cdef
from vhost.ffi import ffi, lib
from virtio import blk_handler
from virtio.constants import VirtioBlkStatus, VirtioBlkType

VHOST = Path(server.__file__).resolve().parent


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
    assert blk_handler.BDRV_REQUEST_MAX_SECTORS == lib.BDRV_REQUEST_MAX_SECTORS == (
        (2**31 - 1) >> 9)
    # vhost-user framing, read from libvhost-user's own definitions at build time
    assert (server.VHOST_USER_HDR_SIZE, server.MAX_PAYLOAD, server.VHOST_USER_MAX_CONFIG_SIZE) == (
        12, 272, 256)


def test_the_state_layout_is_declared_once() -> None:
    header = (VHOST / "pyvu.h").read_text()
    assert "struct pyvu_blkstate {" in header
    for name in ("_fastpath.c", "_pyvu.c"):
        assert "struct pyvu_blkstate {" not in (VHOST / name).read_text(), name
    assert "struct pyvu_blkstate {" not in CDEF  # the cdef takes it from the header
    assert "struct pyvu_blkstate {" in shared_cdef(header)
    assert ffi.sizeof("struct pyvu_blkstate") > 0


def test_what_is_still_written_twice_agrees() -> None:
    c = _defines((VHOST / "_fastpath.c").read_text())
    assert c["VBLK_T_IN"] == VirtioBlkType.IN
    assert c["VBLK_T_OUT"] == VirtioBlkType.OUT
    assert c["VBLK_T_FLUSH"] == VirtioBlkType.FLUSH
    assert c["VBLK_S_OK"] == VirtioBlkStatus.OK
    assert c["VBLK_S_IOERR"] == VirtioBlkStatus.IOERR
    # Nothing the header defines is defined again in the C files.
    header = _defines((VHOST / "pyvu.h").read_text())
    for name in ("_fastpath.c", "_pyvu.c"):
        again = set(header) & set(_defines((VHOST / name).read_text()))
        assert not again, f"{name} redefines {again}"
