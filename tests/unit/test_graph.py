"""The block graph: nested options and references, the raw format over a file, permissions
propagated to the leaf, drain and resize through a node, blockdev-del of a node in use."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from blocklayer import bdrv
from blocklayer.bdrv import (
    DRV_FILE,
    DRV_NONE,
    BlockDriverError,
    bdrv_drained_begin,
    bdrv_drained_end,
    bdrv_find_node,
    bdrv_unref,
)
from blocklayer.block_backend import (
    BLK_PERM_ALL,
    BLK_PERM_CONSISTENT_READ,
    BLK_PERM_RESIZE,
    BLK_PERM_WRITE,
    blk_aio_pdiscard,
    blk_getlength,
    blk_insert_bs,
    blk_new,
    blk_truncate,
    blk_unref,
)
from blocklayer.blockdev import blockdev_add
from blocklayer.dev_ops import BlockDevOps
from pyvhost_blk.keyval import KeyvalError, parse_option
from tests.unit.conftest import pattern, run_until, unique
from tests.unit.test_drivers import Results, do

KIB = 1024


@pytest.fixture
def graph(main_ctx) -> Iterator[dict]:
    """Opens nodes with blockdev_add and BlockBackends on them; closes everything at the end
    the way the daemon does (backends first, then the monitor's references)."""
    state: dict = {"nodes": [], "blks": []}

    def node(tree: dict, from_json: bool = True):
        bs = blockdev_add(tree, from_json=from_json)
        state["nodes"].append(bs)
        return bs

    def blk(bs, perm=BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE, shared=BLK_PERM_ALL):
        b = blk_new(main_ctx, perm, shared)
        state["blks"].append(b)
        blk_insert_bs(b, bs)
        return b

    state["node"], state["blk"] = node, blk
    yield state
    for b in state["blks"]:
        while b.refcnt > 0:
            blk_unref(b)
    for bs in reversed(state["nodes"]):
        if bdrv._nodes.get(bs.node_name) is bs:
            bdrv_unref(bs)


def _names() -> set[str]:
    return set(bdrv._nodes)


def test_nested_keyval_options_open_the_child_inline(graph, image) -> None:
    data = pattern(256 * KIB)
    path = image(data)
    before = _names()
    name = unique("raw")
    tree = parse_option(f"driver=raw,node-name={name},offset=64K,size=128K,"
                        f"file.driver=file,file.filename={path},file.aio=io_uring", "driver")
    bs = graph["node"](tree.values, from_json=tree.from_json)
    child = bs.children["file"].bs
    assert child.node_name.startswith("#block") and child.drv.format_name == "file"
    assert _names() - before == {name, child.node_name}
    blk = graph["blk"](bs)
    assert blk_getlength(blk) == 128 * KIB
    ret, q = do(blk, "read", 4096, nbytes=8192)
    assert ret == 0 and q.to_bytes() == data[64 * KIB + 4096: 64 * KIB + 4096 + 8192]
    # Writes land at offset + 64 KiB in the file, and nowhere else.
    new = bytearray(pattern(4096, seed=9))
    assert do(blk, "write", 0, bufs=[new])[0] == 0
    assert do(blk, "flush")[0] == 0
    with open(path, "rb") as f:
        disk = f.read()
    assert disk[64 * KIB: 68 * KIB] == new
    assert disk[:64 * KIB] == data[:64 * KIB] and disk[68 * KIB:] == data[68 * KIB:]
    # Beyond the window: EIO, as beyond the end of any medium.
    assert do(blk, "read", 128 * KIB, nbytes=512)[0] == -errno.EIO


def test_json_reference_to_an_existing_node(graph, image) -> None:
    path = image(pattern(64 * KIB))
    leaf = graph["node"]({"driver": "file", "node-name": unique("leaf"), "filename": path})
    bs = graph["node"]({"driver": "raw", "node-name": unique("raw"), "file": leaf.node_name,
                        "offset": 4096})
    assert bs.children["file"].bs is leaf
    assert bs.bdrv_getlength() == 60 * KIB
    info = bs.to_dict()
    assert info["children"] == [{"child": "file", "node-name": leaf.node_name}]
    assert info["file"] == path and info["drv"] == "raw"


def test_missing_child_and_bad_reference_are_refused(graph, image) -> None:
    before = _names()
    with pytest.raises(KeyvalError, match='A block device must be specified for "file"'):
        graph["node"]({"driver": "raw", "node-name": unique("raw")})
    with pytest.raises(BlockDriverError,
                       match="Cannot find device='' nor node-name='no-such-node'"):
        graph["node"]({"driver": "raw", "node-name": unique("raw"), "file": "no-such-node"})
    assert _names() == before


@pytest.mark.parametrize("opts,msg", [
    ({"offset": 80 * KIB}, r"Offset \(81920\) cannot be greater than size of the containing "
                           r"file \(65536\)"),
    ({"offset": 4096, "size": 64 * KIB},
     r"The sum of offset \(4096\) and size \(65536\) has to be smaller or equal to the  actual "
     r"size of the containing file \(65536\)"),
    ({"size": 1000}, "Specified size is not multiple of 512!"),
])
def test_raw_window_checked_and_inline_child_closed_on_failure(graph, image, opts, msg) -> None:
    path = image(pattern(64 * KIB))
    before = _names()
    with pytest.raises(BlockDriverError, match=msg):
        graph["node"]({"driver": "raw", "node-name": unique("raw"),
                       "file": {"driver": "file", "filename": path}, **opts})
    assert _names() == before, "the inline child of a refused node was left open"


def test_child_inherits_read_only(graph, image) -> None:
    path = image(pattern(16 * KIB))
    bs = graph["node"]({"driver": "raw", "node-name": unique("raw"), "read-only": True,
                        "file": {"driver": "file", "filename": path}})
    assert bs.children["file"].bs.read_only
    with pytest.raises(PermissionError, match="is read-only"):
        graph["blk"](bs)


def test_permissions_reach_the_leaf_and_conflict_with_qemus_words(graph, image) -> None:
    path = image(pattern(64 * KIB))
    leaf = graph["node"]({"driver": "file", "node-name": unique("leaf"), "filename": path})
    top = graph["node"]({"driver": "raw", "node-name": unique("raw"), "file": leaf.node_name})
    # A writer on the raw node that does not share writing (a guest device's default).
    graph["blk"](top, shared=BLK_PERM_CONSISTENT_READ | BLK_PERM_RESIZE)
    link = top.children["file"]
    assert link.perm & BLK_PERM_WRITE and not link.shared_perm & BLK_PERM_WRITE
    with pytest.raises(PermissionError) as e:
        graph["blk"](leaf)  # a second writer on the leaf itself
    assert str(e.value) == (f"Conflicts with use by node '{top.node_name}' as 'file', which "
                            f"does not allow 'write' on {leaf.node_name}")
    # A reader that shares everything is fine.
    graph["blk"](leaf, perm=BLK_PERM_CONSISTENT_READ)


def test_image_lock_taken_through_the_graph(graph, image) -> None:
    """The file leaf below a raw node takes the image's lock bytes for what the device above
    holds (QEMU's OFD locks), and gives them up when the device goes."""
    path = image(pattern(16 * KIB))
    top = graph["node"]({"driver": "raw", "node-name": unique("raw"),
                         "file": {"driver": "file", "filename": path}})
    blk = graph["blk"](top, shared=BLK_PERM_CONSISTENT_READ)
    lock = top.children["file"].bs.drv.lock
    perm, shared = lock.held
    assert perm & BLK_PERM_WRITE and not shared & BLK_PERM_WRITE
    graph["blks"].remove(blk)
    blk_unref(blk)
    perm, shared = lock.held
    assert not perm & BLK_PERM_WRITE and shared & BLK_PERM_WRITE


def test_drain_of_the_leaf_quiesces_the_device_above(graph, image) -> None:
    path = image(pattern(16 * KIB))
    top = graph["node"]({"driver": "raw", "node-name": unique("raw"),
                         "file": {"driver": "file", "filename": path}})
    blk = graph["blk"](top)
    seen: list[str] = []
    blk.dev_ops = BlockDevOps(drained_begin=lambda: seen.append("begin"),
                              drained_end=lambda: seen.append("end"))
    leaf = top.children["file"].bs
    bdrv_drained_begin(leaf)
    assert blk.quiesce_counter == 1 and seen == ["begin"]
    bdrv_drained_end(leaf)
    assert blk.quiesce_counter == 0 and seen == ["begin", "end"]


def test_resize_through_raw_reaches_file_and_device(graph, image) -> None:
    path = image(pattern(64 * KIB))
    top = graph["node"]({"driver": "raw", "node-name": unique("raw"), "offset": 4096,
                         "file": {"driver": "file", "filename": path}})
    blk = graph["blk"](top, perm=BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE)
    resized: list[int] = []
    blk.dev_ops = BlockDevOps(resize_cb=lambda: resized.append(blk_getlength(blk)))
    blk_truncate(blk, 128 * KIB)
    assert os.path.getsize(path) == 128 * KIB + 4096
    assert blk_getlength(blk) == 128 * KIB and resized and resized[-1] == 128 * KIB
    assert blk.c.length == 128 * KIB, "the C request path did not see the new length"


def test_fixed_size_raw_cannot_resize(graph, image) -> None:
    path = image(pattern(64 * KIB))
    top = graph["node"]({"driver": "raw", "node-name": unique("raw"), "size": 32 * KIB,
                         "file": {"driver": "file", "filename": path}})
    blk = graph["blk"](top, perm=BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE)
    with pytest.raises(OSError, match="Cannot resize fixed-size raw disks"):
        blk_truncate(blk, 16 * KIB)


def test_discard_policy_is_per_node(graph, image) -> None:
    """discard=unmap on the top node lets discards through; the inline file child defaults
    to unmap (the format decides), as in QEMU."""
    path = image(pattern(64 * KIB))
    top = graph["node"]({"driver": "raw", "node-name": unique("raw"), "discard": "unmap",
                         "file": {"driver": "file", "filename": path}})
    assert top.children["file"].bs.unmap
    blk = graph["blk"](top)
    res = Results()
    blk_aio_pdiscard(blk, 0, 64 * KIB, res)
    run_until(lambda: res.rets)
    assert res.rets == [0]


def test_c_path_serves_raw_with_its_offset(graph, image) -> None:
    path = image(pattern(64 * KIB))
    top = graph["node"]({"driver": "raw", "node-name": unique("raw"), "offset": 8192,
                         "file": {"driver": "file", "filename": path, "aio": "io_uring"}})
    blk = graph["blk"](top)
    assert blk.c.driver == DRV_FILE and blk.c.offset == 8192
    assert blk.c.fd == top.children["file"].bs.drv.fd


def test_c_path_not_used_over_a_python_only_child(graph, image) -> None:
    path = image(pattern(64 * KIB))
    top = graph["node"]({"driver": "raw", "node-name": unique("raw"),
                         "file": {"driver": "file", "filename": path, "aio": "threads"}})
    blk = graph["blk"](top)
    assert blk.c.driver == DRV_NONE


def test_closing_the_parent_closes_its_inline_child(graph, image) -> None:
    path = image(pattern(16 * KIB))
    before = _names()
    top = blockdev_add({"driver": "raw", "node-name": unique("raw"),
                        "file": {"driver": "file", "filename": path}}, from_json=True)
    child = top.children["file"].bs
    assert bdrv_find_node(child.node_name) is child
    bdrv_unref(top)
    assert _names() == before
    assert child.drv.fd < 0, "the inline child's image is still open"
