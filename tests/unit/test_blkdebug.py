"""blkdebug: QEMU's inject-error / set-state options and their errors, which requests a rule
fails and with what, once, immediately, states, and changing the rules at run time."""

from __future__ import annotations

import errno

import pytest

from blocklayer.bdrv import BlockDriverError
from blocklayer.block_backend import (
    blk_aio_flush,
    blk_aio_pdiscard,
    blk_aio_preadv,
    blk_aio_pwrite_zeroes,
    blk_aio_pwritev,
)
from blocklayer.drivers.blkdebug import (
    BlkdebugDriver,
    InjectRule,
    parse_inject_rules,
    parse_set_state_rules,
)
from blocklayer.iov import IOVector
from pyvhost_blk.keyval import KeyvalError, parse_keyval
from tests.unit.conftest import run_until


def _rules(text: str) -> list[InjectRule]:
    return parse_inject_rules(parse_keyval(text)["inject-error"])


def _err(fn, *a, **kw) -> str:
    with pytest.raises(KeyvalError) as e:
        fn(*a, **kw)
    return str(e.value)


# -- options ------------------------------------------------------------------------------------
def test_rule_defaults_are_qemus():
    (r,) = _rules("inject-error.0.event=read_aio")
    assert (r.event, r.errno, r.sector, r.once, r.immediately, r.state) == (
        "read_aio", errno.EIO, -1, False, False, 0)
    assert r.mask == 0b11111  # every iotype but block-status
    (r,) = _rules("inject-error.0.event=none,inject-error.0.iotype=write-zeroes,"
                  "inject-error.0.errno=28,inject-error.0.sector=8,inject-error.0.once=on,"
                  "inject-error.0.immediately=on,inject-error.0.state=2")
    assert (r.iotype, r.errno, r.sector, r.once, r.immediately, r.state) == (
        "write-zeroes", 28, 8, True, True, 2)
    (a, b) = parse_inject_rules([{"event": "none", "errno": 1}, {"event": "flush_to_disk",
                                                                 "once": True}], from_json=True)
    assert a.errno == 1 and b.once


@pytest.mark.parametrize("text,message", [
    ("inject-error.0.event=foo", "Parameter 'event' does not accept value 'foo'"),
    ("inject-error.0.errno=5", "Parameter 'inject-error.0.event' is missing"),
    ("inject-error.0.event=none,inject-error.0.iotype=bar",
     "Parameter 'iotype' does not accept value 'bar'"),
    ("inject-error.0.event=none,inject-error.0.once=maybe",
     "Parameter 'inject-error.0.once' expects 'on' or 'off'"),
    ("inject-error.0.event=none,inject-error.0.errno=x",
     "Parameter 'inject-error.0.errno' expects integer"),
    ("inject-error.0.event=none,inject-error.0.bogus=1",
     "Parameter 'inject-error.0.bogus' is unexpected"),
])
def test_rule_errors_are_qemus(text, message):
    assert _err(_rules, text) == message


def test_json_rule_errors():
    assert _err(parse_inject_rules, {"event": "none"}, from_json=True) == \
        "Invalid parameter type for 'inject-error', expected: array"
    assert _err(parse_inject_rules, [{"errno": 5}], from_json=True) == \
        "Parameter 'inject-error[0].event' is missing"
    assert _err(parse_inject_rules, [{"event": "none", "errno": "5"}], from_json=True) == \
        "Invalid parameter type for 'inject-error[0].errno', expected: integer"
    assert _err(parse_set_state_rules, parse_keyval("set-state.0.event=none")["set-state"]) \
        == "Parameter 'set-state.0.new_state' is missing"


def test_node_options(make_node):
    leaf = make_node({"driver": "null-co", "size": "1M"})
    with pytest.raises(KeyvalError, match='A block device must be specified for "image"'):
        make_node({"driver": "blkdebug"})
    with pytest.raises(BlockDriverError, match="Cannot meet constraints with align 3"):
        make_node({"driver": "blkdebug", "image": leaf.node_name, "align": "3"})
    d = make_node({"driver": "blkdebug", "image": leaf.node_name, "align": "4096",
                   "inject-error": [{"event": "none"}]})
    assert d.request_alignment == 4096 and d.bdrv_getlength() == 1 << 20
    assert d.to_dict()["children"] == [{"child": "image", "node-name": leaf.node_name}]


# -- injection through a BlockBackend -----------------------------------------------------------
@pytest.fixture
def dbg(make_node, make_blk):
    """dbg(rules, **opts) -> (BlockBackend, BlkdebugDriver) over a null-co image."""

    def make(rules: list[dict], **opts: str):
        leaf = make_node({"driver": "null-co", "size": "1M", "read-zeroes": "on"})
        d = make_node({"driver": "blkdebug", "image": leaf.node_name, "discard": "unmap",
                       "inject-error": rules, **opts})
        assert isinstance(d.drv, BlkdebugDriver)
        return make_blk(d), d.drv

    return make


def io(main_ctx, blk, op: str, offset: int = 0, nbytes: int = 4096) -> int:
    rets: list[int] = []
    q = IOVector.from_buffers([bytearray(nbytes)])
    if op == "read":
        blk_aio_preadv(blk, offset, q, 0, rets.append)
    elif op == "write":
        blk_aio_pwritev(blk, offset, q, 0, rets.append)
    elif op == "flush":
        blk_aio_flush(blk, rets.append)
    elif op == "discard":
        blk_aio_pdiscard(blk, offset, nbytes, rets.append)
    else:
        blk_aio_pwrite_zeroes(blk, offset, nbytes, 0, rets.append)
    run_until(lambda: rets, main_ctx)
    assert len(rets) == 1
    return rets[0]


OPS = ("read", "write", "flush", "discard", "zeroes")


def test_none_rule_with_iotype_fails_only_that_type(main_ctx, dbg):
    blk, drv = dbg([{"event": "none", "iotype": "read", "errno": "5"}])
    assert [io(main_ctx, blk, op) for op in OPS] == [-errno.EIO, 0, 0, 0, 0]
    assert io(main_ctx, blk, "read") == -errno.EIO  # not once: every time
    assert drv.query()["injected"] == 2


def test_default_iotype_fails_everything(main_ctx, dbg):
    blk, _ = dbg([{"event": "none", "errno": "28"}])
    assert [io(main_ctx, blk, op) for op in OPS] == [-errno.ENOSPC] * 5


def test_events_select_request_types(main_ctx, dbg):
    blk, _ = dbg([{"event": "read_aio", "errno": "1"}, {"event": "flush_to_disk", "errno": "2"},
                  {"event": "pwritev_zero", "errno": "3"}])
    assert [io(main_ctx, blk, op) for op in OPS] == [-1, 0, -2, 0, -3]
    blk, _ = dbg([{"event": "write_aio"}, {"event": "l2_load"}])  # l2_load never fires
    assert [io(main_ctx, blk, op) for op in OPS] == [0, -errno.EIO, 0, 0, 0]


def test_once_fires_once_and_first_rule_wins(main_ctx, dbg):
    blk, drv = dbg([{"event": "none", "iotype": "write", "errno": "28", "once": "on"},
                    {"event": "none", "iotype": "write", "errno": "5"}])
    assert io(main_ctx, blk, "write") == -errno.ENOSPC
    assert io(main_ctx, blk, "write") == -errno.EIO
    q = drv.query()
    assert [r["errno"] for r in q["inject-error"]] == [5] and q["injected"] == 2


def test_sector_rules_match_requests_covering_it(main_ctx, dbg):
    blk, _ = dbg([{"event": "none", "sector": "16"}])  # byte 8192
    assert io(main_ctx, blk, "read", 0, 8192) == 0
    assert io(main_ctx, blk, "read", 4096, 8192) == -errno.EIO
    assert io(main_ctx, blk, "read", 8192 + 512, 512) == 0
    assert io(main_ctx, blk, "flush") == 0  # a flush covers no sector


def test_errno_zero_and_immediately(main_ctx, dbg):
    blk, drv = dbg([{"event": "none", "errno": "0", "once": "on"}])
    assert io(main_ctx, blk, "read") == 0
    assert len(drv.query()["inject-error"]) == 1  # a rule injecting nothing stays

    got: list[int] = []
    blk, drv = dbg([{"event": "none", "immediately": "on"}])
    drv.aio_preadv(main_ctx, 0, IOVector.from_buffers([bytearray(512)]), got.append)
    assert got == [-errno.EIO]  # inside the call
    drv.set_rules([InjectRule("none")])
    drv.aio_preadv(main_ctx, 0, IOVector.from_buffers([bytearray(512)]), got.append)
    assert got == [-errno.EIO]  # not yet: after a bottom half
    run_until(lambda: len(got) == 2, main_ctx)


def test_set_state_moves_the_rules(main_ctx, dbg):
    blk, drv = dbg([{"event": "none", "iotype": "write", "state": "2"}],
                   **{"set-state": [{"event": "read_aio", "new_state": "2"},
                                    {"event": "flush_to_os", "state": "2", "new_state": "3"}]})
    assert io(main_ctx, blk, "write") == 0  # state 1
    assert io(main_ctx, blk, "read") == 0  # -> 2 (the read itself was matched in state 1)
    assert io(main_ctx, blk, "write") == -errno.EIO
    assert io(main_ctx, blk, "flush") == 0  # -> 3
    assert io(main_ctx, blk, "write") == 0
    assert drv.query()["state"] == 3


def test_rules_replaced_and_cleared_at_run_time(main_ctx, dbg):
    blk, drv = dbg([])
    assert io(main_ctx, blk, "read") == 0
    drv.set_rules(parse_inject_rules([{"event": "none", "iotype": "read", "errno": 61}],
                                     "rules", from_json=True))
    assert io(main_ctx, blk, "read") == -61
    assert drv.query()["inject-error"][0]["hits"] == 1
    drv.clear()
    assert io(main_ctx, blk, "read") == 0
    assert drv.query() == {"state": 1, "injected": 1, "inject-error": [], "set-state": []}


def test_data_passes_through_untouched(main_ctx, make_node, make_blk, image):
    from tests.unit.conftest import pattern

    path = image(64 * 1024)
    leaf = make_node({"driver": "file", "filename": path})
    d = make_node({"driver": "blkdebug", "image": leaf.node_name})
    blk = make_blk(d)
    assert d.filename == path
    buf = bytearray(8192)
    rets: list[int] = []
    blk_aio_preadv(blk, 4096, IOVector.from_buffers([buf]), 0, rets.append)
    run_until(lambda: rets, main_ctx)
    assert rets == [0] and bytes(buf) == pattern(64 * 1024)[4096:12288]
