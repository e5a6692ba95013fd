"""A hostile frontend: malformed virtio-blk requests, rings and vhost-user messages.

Expected outcome by layer:

* **bad request** (a well-formed ring carrying a nonsensical virtio-blk request): the request is
  completed with status IOERR or UNSUPP (or, where there is no header or no status byte to
  write, with used length 0 and nothing written: the daemon's documented MALFORMED answer),
  no data changes, and the same connection keeps working;
* **bad ring** (descriptor chains the device cannot walk safely): the daemon closes that
  connection (the socket sees EOF) and a new frontend can connect and work;
* **bad message** (vhost-user messages that lie or break limits): the connection is closed
  (SET_CONFIG other than the 1-byte ``wce`` write: refused; the connection may stay).

After every case (``Harness.check_healthy``): the daemon is alive, its other export still
serves, A serves a new frontend, and the daemon's fd table is back to its baseline.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import time
from collections.abc import Callable

import pytest

from tests.frontend.vhost_user import (
    CONFIG_SIZE,
    F_PROTOCOL_FEATURES,
    GET_FEATURES,
    GET_INFLIGHT_FD,
    GET_VRING_BASE,
    MAX_PAYLOAD,
    PF_INFLIGHT_SHMFD,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR,
    SET_CONFIG,
    SET_INFLIGHT_FD,
    SET_MEM_TABLE,
    SET_VRING_ADDR,
    SET_VRING_BASE,
    SET_VRING_CALL,
    SET_VRING_ENABLE,
    SET_VRING_KICK,
    SET_VRING_NUM,
    STATUS_UNSET,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_GET_LIFETIME,
    T_IN,
    T_OUT,
    T_SECURE_ERASE,
    T_WRITE_ZEROES,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    WCE_OFFSET,
    ConnectionClosed,
    FrontendTimeout,
    Request,
    VhostUserFrontend,
    Virtqueue,
    blk_header,
    connect,
    dwz_segment,
)
from tests.reliability import A_SECTORS, SCRATCH, Harness, Verdict, pattern


def attach(env: Harness, queue_size: int = 64, **kw: object) -> VhostUserFrontend:
    fe = connect(env.a_sock)
    try:
        fe.setup(queue_size=queue_size, **kw)  # type: ignore[arg-type]
    except BaseException:
        fe.close()
        raise
    return fe


def still_works(env: Harness, fe: VhostUserFrontend, seed: int) -> None:
    """The same connection serves a verified write and read (both queues)."""
    data = pattern(SCRATCH + 8, 2, seed=seed)
    assert fe.write(SCRATCH + 8, data) == S_OK
    for q in range(len(fe.queues)):
        assert fe.read(SCRATCH + 8, len(data), queue=q) == (S_OK, data)


def outcome(req: Request) -> str:
    """What the device answered: a status name, or NOSTATUS (used length 0, nothing
    written: the daemon's MALFORMED answer)."""
    st = req.status
    if req.used_len == 0 and st in (None, STATUS_UNSET):
        return "NOSTATUS"
    return {S_OK: "OK", S_IOERR: "IOERR", S_UNSUPP: "UNSUPP"}.get(st, f"status={st}")  # type: ignore[arg-type]


# == bad requests: a status, the connection keeps working ===================================
# (id, out bytes, in length, out_split, in_split, acceptable outcomes)
BadRequest = tuple[str, bytes, int, list[int] | None, list[int] | None, set[str]]
REFUSED = {"IOERR", "UNSUPP", "NOSTATUS"}
_last = A_SECTORS


def _bad_requests() -> list[BadRequest]:
    hdr_rd = blk_header(T_IN, 0)
    return [
        ("header-8-bytes", hdr_rd[:8], 1, None, None, REFUSED),
        ("header-15-bytes-read", hdr_rd[:15], 513, None, None, REFUSED),
        ("header-0-bytes-write-data", b"", 1, None, None, REFUSED),  # only the status byte
        ("no-status-read", hdr_rd, 0, None, None, {"NOSTATUS"}),
        ("no-status-write", blk_header(T_OUT, 64) + b"\xff" * 512, 0, None, None, {"NOSTATUS"}),
        ("out-count-0", b"", 16 + 512 + 1, None, [16, 512, 1], REFUSED),
        ("read-at-capacity", blk_header(T_IN, _last), 513, None, None, {"IOERR"}),
        ("read-past-capacity", blk_header(T_IN, _last - 1), 1025, None, None, {"IOERR"}),
        ("read-sector-2^64-1", blk_header(T_IN, 2**64 - 1), 513, None, None, {"IOERR"}),
        ("read-sector-overflows-bytes", blk_header(T_IN, 2**55 + 1), 513, None, None,
         {"IOERR"}),
        ("read-511-bytes", blk_header(T_IN, 0), 512, None, None, {"IOERR"}),
        ("read-513-bytes", blk_header(T_IN, 0), 514, None, None, {"IOERR"}),
        ("read-513-bytes-split", blk_header(T_IN, 0), 514, None, [500, 13, 1], {"IOERR"}),
        ("write-at-capacity", blk_header(T_OUT, _last) + b"\xff" * 512, 1, None, None,
         {"IOERR"}),
        ("write-100-bytes", blk_header(T_OUT, 64) + b"\xff" * 100, 1, None, None, {"IOERR"}),
        ("write-100-bytes-python", blk_header(T_OUT, 64) + b"\xff" * 100, 1, [20], None,
         {"IOERR"}),
        ("write-past-capacity-split", blk_header(T_OUT, _last - 1) + b"\xff" * 1024, 1,
         [16, 512, 512], None, {"IOERR"}),
        ("discard-2-segments", blk_header(T_DISCARD) + dwz_segment(64, 1) * 2, 1, None, None,
         {"UNSUPP"}),
        ("write-zeroes-1000-segments", blk_header(T_WRITE_ZEROES) + dwz_segment(64, 1) * 1000,
         1, [16, 16], None, {"UNSUPP"}),
        ("write-zeroes-2^32-1-sectors", blk_header(T_WRITE_ZEROES)
         + dwz_segment(64, 2**32 - 1), 1, None, None, {"IOERR"}),
        ("write-zeroes-32769-sectors", blk_header(T_WRITE_ZEROES) + dwz_segment(0, 32769), 1,
         None, None, {"IOERR"}),
        ("write-zeroes-past-capacity", blk_header(T_WRITE_ZEROES)
         + dwz_segment(_last - 1, 2), 1, None, None, {"IOERR"}),
        ("discard-sector-2^64-1", blk_header(T_DISCARD) + dwz_segment(2**64 - 1, 1), 1, None,
         None, {"IOERR"}),
        ("write-zeroes-unknown-flags", blk_header(T_WRITE_ZEROES) + dwz_segment(64, 1, 0xFE), 1,
         None, None, {"UNSUPP"}),
        ("discard-unmap-flag", blk_header(T_DISCARD) + dwz_segment(64, 1, 1), 1, None, None,
         {"UNSUPP"}),
        ("write-zeroes-8-byte-segment", blk_header(T_WRITE_ZEROES) + b"\0" * 8, 1, None, None,
         {"IOERR"}),
        ("discard-no-segment", blk_header(T_DISCARD), 1, None, None, {"IOERR"}),
    ] + [
        (f"type-{t:#x}", blk_header(t, 64) + b"\xff" * 512, 513, None, None, {"UNSUPP"})
        for t in (2, 3, 5, 7, 9, 12, 15, T_GET_LIFETIME, T_SECURE_ERASE, 0x7FFFFFFF, 0xFFFFFFFF)
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_request(env: Harness, case: BadRequest) -> None:
    name, out, in_len, out_split, in_split, allowed = case
    before = env.read_image(0, 128)
    with attach(env) as fe:
        q = fe.queues[0]
        for indirect in (False, True):
            req = q.submit_blk(out, in_len, out_split=out_split, in_split=in_split,
                               indirect=indirect)
            q.kick()
            q.wait([req])
            got = outcome(req)
            assert got in allowed, f"{name} (indirect={indirect}): answered {got}"
            assert req.out_bytes() == out, "the device wrote into driver-readable buffers"
        assert env.read_image(0, 128) == before, f"{name} changed the image"
        still_works(env, fe, seed=1)
    env.check_healthy()


def test_valid_layouts(env: Harness) -> None:
    """Unusual but valid chains are served: header split over descriptors, data and status
    in one buffer, one byte per descriptor, flush, GET_ID."""
    with attach(env) as fe:
        q = fe.queues[0]
        data = pattern(SCRATCH + 16, 2, seed=7)
        for indirect in (False, True):
            w = q.submit_blk(blk_header(T_OUT, SCRATCH + 16) + data, 1, out_split=[8, 8, 300],
                             indirect=indirect)
            q.kick()
            q.wait([w])
            assert outcome(w) == "OK"
            r = q.submit_blk(blk_header(T_IN, SCRATCH + 16), 1025, out_split=[3, 13],
                             in_split=[1000, 25], indirect=indirect)
            q.kick()
            q.wait([r])
            assert outcome(r) == "OK" and r.data == data and r.used_len == 1025
            r = q.submit_blk(blk_header(T_IN, SCRATCH + 16), 1025,
                             in_split=[1] * 40 + [985], indirect=indirect)
            q.kick()
            q.wait([r])
            assert outcome(r) == "OK" and r.data == data
        assert fe.flush() == S_OK
        gid = fe.blk(T_GET_ID, 0, b"", 21)
        assert gid.status == S_OK and gid.data.rstrip(b"\0")
    env.check_healthy()


# == bad rings: the connection is closed =====================================================
RingCase = Callable[[VhostUserFrontend, Virtqueue], None]


def _hdr_and_status(q: Virtqueue, rtype: int = T_IN) -> tuple[int, int]:
    return q.buffer(blk_header(rtype, 0)), q.buffer(length=1)


def ring_loop_direct(fe: VhostUserFrontend, q: Virtqueue) -> None:
    hdr, st = _hdr_and_status(q)
    q.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1)
    q.write_desc(1, st, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0)
    q.publish(0)


def ring_loop_indirect(fe: VhostUserFrontend, q: Virtqueue) -> None:
    hdr, st = _hdr_and_status(q)
    table = q.buffer(length=32)
    fe.mem.write(table, struct.pack("<QIHH", hdr, 16, VRING_DESC_F_NEXT, 1)  # type: ignore
                 + struct.pack("<QIHH", st, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0))
    q.write_desc(0, table, 32, VRING_DESC_F_INDIRECT)
    q.publish(0)


def _indirect(fe: VhostUserFrontend, q: Virtqueue, addr: int | None, length: int,
              entries: bytes | None = None) -> None:
    hdr, st = _hdr_and_status(q)
    if addr is None:
        table = q.buffer(length=max(length, 48))
        fe.mem.write(table, entries if entries is not None else  # type: ignore[union-attr]
                     struct.pack("<QIHH", hdr, 16, VRING_DESC_F_NEXT, 1)
                     + struct.pack("<QIHH", st, 1, VRING_DESC_F_WRITE, 0))
        addr = table
    q.write_desc(0, addr, length, VRING_DESC_F_INDIRECT)
    q.publish(0)


def ring_indirect_len_24(fe: VhostUserFrontend, q: Virtqueue) -> None:
    _indirect(fe, q, None, 24)


def ring_indirect_len_0(fe: VhostUserFrontend, q: Virtqueue) -> None:
    _indirect(fe, q, None, 0)


def ring_nested_indirect(fe: VhostUserFrontend, q: Virtqueue) -> None:
    hdr, st = _hdr_and_status(q)
    inner = q.buffer(struct.pack("<QIHH", hdr, 16, VRING_DESC_F_NEXT, 1)
                     + struct.pack("<QIHH", st, 1, VRING_DESC_F_WRITE, 0))
    st2 = q.buffer(length=1)
    outer = struct.pack("<QIHH", inner, 32, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1) \
        + struct.pack("<QIHH", st2, 1, VRING_DESC_F_WRITE, 0)
    _indirect(fe, q, None, 32, outer)


def ring_indirect_outside_memory(fe: VhostUserFrontend, q: Virtqueue) -> None:
    _indirect(fe, q, 0x1000, 32)


def ring_indirect_crossing_end(fe: VhostUserFrontend, q: Virtqueue) -> None:
    end = fe.mem.main.gpa + fe.mem.main.size  # type: ignore[union-attr]
    _indirect(fe, q, end - 16, 32)


def ring_indirect_next_out_of_table(fe: VhostUserFrontend, q: Virtqueue) -> None:
    hdr, st = _hdr_and_status(q)
    _indirect(fe, q, None, 32, struct.pack("<QIHH", hdr, 16, VRING_DESC_F_NEXT, 5)
              + struct.pack("<QIHH", st, 1, VRING_DESC_F_WRITE, 0))


def _chain(fe: VhostUserFrontend, q: Virtqueue, descs: list[tuple[int, int, int]]) -> None:
    for i, (addr, length, flags) in enumerate(descs):
        nxt = i + 1 if i + 1 < len(descs) else 0
        q.write_desc(i, addr, length, flags | (VRING_DESC_F_NEXT if nxt else 0), nxt)
    q.publish(0)


def ring_desc_outside_memory(fe: VhostUserFrontend, q: Virtqueue) -> None:
    _, st = _hdr_and_status(q)
    _chain(fe, q, [(0x1000, 16, 0), (st, 1, VRING_DESC_F_WRITE)])


def ring_desc_len_past_end(fe: VhostUserFrontend, q: Virtqueue) -> None:
    hdr, st = _hdr_and_status(q)
    end = fe.mem.main.gpa + fe.mem.main.size  # type: ignore[union-attr]
    _chain(fe, q, [(hdr, 16, 0), (end - 512, 4096, VRING_DESC_F_WRITE),
                   (st, 1, VRING_DESC_F_WRITE)])


def ring_desc_near_2_64(fe: VhostUserFrontend, q: Virtqueue) -> None:
    hdr, st = _hdr_and_status(q)
    _chain(fe, q, [(hdr, 16, 0), (2**64 - 256, 512, VRING_DESC_F_WRITE),
                   (st, 1, VRING_DESC_F_WRITE)])


def ring_desc_len_0(fe: VhostUserFrontend, q: Virtqueue) -> None:
    hdr, st = _hdr_and_status(q)
    _chain(fe, q, [(hdr, 16, 0), (hdr, 0, VRING_DESC_F_WRITE), (st, 1, VRING_DESC_F_WRITE)])


def ring_writable_before_readable(fe: VhostUserFrontend, q: Virtqueue) -> None:
    hdr, st = _hdr_and_status(q)
    _chain(fe, q, [(st, 1, VRING_DESC_F_WRITE), (hdr, 16, 0)])


def ring_head_out_of_range(fe: VhostUserFrontend, q: Virtqueue) -> None:
    q.publish(q.size + 5)


def ring_next_out_of_range(fe: VhostUserFrontend, q: Virtqueue) -> None:
    hdr, _ = _hdr_and_status(q)
    q.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, q.size + 5)
    q.publish(0)


def ring_more_requests_than_size(fe: VhostUserFrontend, q: Virtqueue) -> None:
    """size + 1 reads published at once (the last reuses head 0, which is in flight)."""
    for i in range(q.size):
        hdr, st = q.buffer(blk_header(T_IN, i)), q.buffer(length=513)
        table = q.buffer(struct.pack("<QIHH", hdr, 16, VRING_DESC_F_NEXT, 1)
                         + struct.pack("<QIHH", st, 513, VRING_DESC_F_WRITE, 0))
        q.write_desc(i, table, 32, VRING_DESC_F_INDIRECT)
    for i in range(q.size + 1):
        q.set_avail_ring(i, i % q.size)
    q.set_avail_idx(q.size + 1)


def ring_avail_idx_jump(fe: VhostUserFrontend, q: Virtqueue) -> None:
    """avail->idx jumps by 0x8000; every ring slot names a valid read."""
    hdr, st = q.buffer(blk_header(T_IN, 0)), q.buffer(length=513)
    q.write_desc(0, hdr, 16, VRING_DESC_F_NEXT, 1)
    q.write_desc(1, st, 513, VRING_DESC_F_WRITE, 0)
    for i in range(q.size):
        q.set_avail_ring(i, 0)
    q.set_avail_idx(0x8000)


RING_CASES: list[RingCase] = [
    ring_loop_direct, ring_loop_indirect, ring_indirect_len_24, ring_indirect_len_0,
    ring_nested_indirect,
    ring_indirect_outside_memory, ring_indirect_crossing_end,
    ring_indirect_next_out_of_table, ring_desc_outside_memory, ring_desc_len_past_end,
    ring_desc_near_2_64, ring_desc_len_0, ring_writable_before_readable, ring_head_out_of_range,
    ring_next_out_of_range, ring_more_requests_than_size, ring_avail_idx_jump,
]


def _used_summary(fe: VhostUserFrontend, q: Virtqueue) -> str:
    """What the device put in the used ring (for failure messages)."""
    n = (q.used_idx() - q.last_used) & 0xFFFF
    out = []
    for k in range(min(n, 4)):
        slot = (q.last_used + k) % q.size
        uid, ulen = struct.unpack("<II", fe.mem.read(q.used + 4 + 8 * slot, 8))  # type: ignore
        out.append(f"(head {uid}, len {ulen})")
    return f"{n} used entries {' '.join(out)}"


@pytest.mark.parametrize("case", RING_CASES, ids=lambda f: f.__name__[5:].replace("_", "-"))
def test_bad_ring(env: Harness, case: RingCase) -> None:
    v = Verdict(env)
    size = 8 if case in (ring_more_requests_than_size, ring_avail_idx_jump) else 64
    with attach(env, queue_size=size) as fe:
        q = fe.queues[0]
        case(fe, q)
        q.kick()
        if not fe.peer_closed(5):
            v.expect(False, f"{case.__name__}: the daemon kept the connection open; "
                            f"{_used_summary(fe, q)}\n{env.new_log()}")
    v.finish()


def test_desc_wrapping_2_64_in_top_region(env: Harness) -> None:
    """A second memory region at the very top of the guest-physical space, and a buffer that
    starts inside it and whose length wraps around 2^64: the end check ``addr + len > end``
    overflows.  A harmless GET_ID request shows whether the daemon accepts the buffer."""
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.setup(queue_size=64, start=False)
        top = 2**64 - (1 << 30)
        fe.mem.add_region(1 << 20, top)  # type: ignore[union-attr]
        try:
            fe.start()
        except ConnectionClosed:
            # The daemon refuses memory regions above 2^56 outright (no guest has any there),
            # which closes the connection before a wrapping buffer can be placed.
            v.finish()
            return
        q = fe.queues[0]
        hdr, st = _hdr_and_status(q, T_GET_ID)
        _chain(fe, q, [(hdr, 16, 0), (top + (1 << 20) - 4096, 2**31, VRING_DESC_F_WRITE),
                       (st, 1, VRING_DESC_F_WRITE)])
        q.kick()
        if not fe.peer_closed(5):
            v.expect(False, "a buffer wrapping around 2^64 was accepted; "
                            f"{_used_summary(fe, q)}\n{env.new_log()}")
    v.finish()


# == bad messages: the connection is closed ================================================
def _config(env: Harness) -> bytes:
    with connect(env.a_sock) as fe:
        fe.handshake()
        assert fe.config is not None
        return fe.config.raw


@pytest.mark.parametrize("offset,data", [
    (0, struct.pack("<Q", 1)),  # capacity
    (WCE_OFFSET, b"\0\0"),  # wce plus the next byte
    (WCE_OFFSET + 1, b"\0"),
    (WCE_OFFSET - 1, b"\0"),
    (0, bytes(CONFIG_SIZE)),
    (0xFFFFFFFF, b"\0"),
    (WCE_OFFSET, bytes(300)),  # more than the 256-byte config region
], ids=["capacity", "wce+1", "after-wce", "before-wce", "whole", "offset-2^32-1", "300-bytes"])
def test_set_config_refused(env: Harness, offset: int, data: bytes) -> None:
    v = Verdict(env)
    before = _config(env)
    with connect(env.a_sock) as fe:
        fe.handshake()
        payload = struct.pack("<III", offset, len(data), 0) + data
        try:
            fe.send_msg(SET_CONFIG, payload[:MAX_PAYLOAD], size=min(len(payload), MAX_PAYLOAD),
                        need_reply=fe.reply_ack)
        except ConnectionClosed:
            pass
        fe.peer_closed(1)  # the connection may stay: either is fine
    v.expect(_config(env) == before, "SET_CONFIG changed the config space")
    v.finish()


def test_set_config_wce_accepted(env: Harness) -> None:
    """The one writable field: a 1-byte write of ``wce`` takes effect."""
    with connect(env.a_sock) as fe:
        fe.handshake()
        assert fe.config is not None and fe.config.wce == 1
        fe.set_config(WCE_OFFSET, b"\0")
        assert fe.get_config().wce == 0
        fe.set_config(WCE_OFFSET, b"\1")
        assert fe.get_config().wce == 1
        assert not fe.peer_closed(0.2)
    env.check_healthy()


@pytest.mark.parametrize("num", [1025, 2048, 4096, 32768, 65535])
def test_ring_size_too_big(env: Harness, num: int) -> None:
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.setup(queue_size=64, start=False)
        fe.set_mem_table()
        try:
            fe.set_vring_num(0, num)
        except ConnectionClosed:
            pass
        v.expect_closed(fe, f"SET_VRING_NUM {num}", 3)
    v.finish()


def _queue_msgs(index: int) -> list[tuple[int, bytes]]:
    return [
        (SET_VRING_NUM, struct.pack("<II", index, 64)),
        (SET_VRING_BASE, struct.pack("<II", index, 0)),
        (SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, 0, 0, 0, 0)),
        (SET_VRING_ENABLE, struct.pack("<II", index, 1)),
        (GET_VRING_BASE, struct.pack("<II", index, 0)),
        (SET_VRING_KICK, struct.pack("<Q", index)),
        (SET_VRING_CALL, struct.pack("<Q", index)),
    ]


@pytest.mark.parametrize("index", [2, 255])
@pytest.mark.parametrize("msg", range(7), ids=["num", "base", "addr", "enable", "get-base",
                                               "kick", "call"])
def test_queue_index_too_big(env: Harness, index: int, msg: int) -> None:
    request, payload = _queue_msgs(index)[msg]
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.setup(queue_size=64)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            fds = [efd] if request in (SET_VRING_KICK, SET_VRING_CALL) else []
            fe.send_msg(request, payload, fds)
        finally:
            os.close(efd)
        v.expect_closed(fe, f"request {request} on queue {index}", 3)
    v.finish()


def _eventfds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


@pytest.mark.parametrize("request_,nfds", [
    (GET_FEATURES, 9), (SET_VRING_CALL, 20), (SET_MEM_TABLE, 9),
    (GET_FEATURES, 3), (SET_VRING_KICK, 2), (SET_MEM_TABLE, 4), (SET_VRING_NUM, 1),
], ids=["get-features-9", "set-vring-call-20", "set-mem-table-9", "get-features-3",
        "set-vring-kick-2", "set-mem-table-1-region-4-fds", "set-vring-num-1"])
def test_too_many_fds(env: Harness, request_: int, nfds: int) -> None:
    """More fds than the framing allows (> 8), or than the message takes."""
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.setup(queue_size=64, start=False)
        mem = fe.mem
        assert mem is not None
        fds = _eventfds(nfds)
        try:
            if request_ == SET_MEM_TABLE:
                payload = struct.pack("<II", 1, 0) + mem.main.wire()
                os.close(fds[0])
                fds[0] = os.dup(mem.main.fd)
            elif request_ in (SET_VRING_CALL, SET_VRING_KICK):
                payload = struct.pack("<Q", 0)
            elif request_ == SET_VRING_NUM:
                payload = struct.pack("<II", 0, 64)
            else:
                payload = b""
            fe.send_msg(request_, payload, fds)
        finally:
            for fd in fds:
                os.close(fd)
        v.expect_closed(fe, f"request {request_} with {nfds} fds", 3)
    v.finish()


@pytest.mark.parametrize("size", [MAX_PAYLOAD + 1, 4096, 0xFFFFFFFF])
def test_payload_bigger_than_maximum(env: Harness, size: int) -> None:
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.handshake()
        fe.send_msg(SET_VRING_NUM, struct.pack("<II", 0, 64), size=size)
        v.expect_closed(fe, f"payload size {size}", 3)
    v.finish()


def test_payload_bigger_than_sent_then_eof(env: Harness) -> None:
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.handshake()
        fe.send_msg(SET_VRING_NUM, struct.pack("<II", 0, 64), size=100)
        fe.sock.shutdown(socket.SHUT_WR)
        v.expect_closed(fe, "payload shorter than its size, then EOF", 3)
    v.finish()


def test_payload_bigger_than_sent_stalled(env: Harness) -> None:
    """A frontend that sends part of a message and then nothing must not stall the daemon:
    while it waits, the other export serves requests and messages, and a second frontend on
    A is refused at once (the slot is taken) rather than left hanging."""
    v = Verdict(env)
    stalled = connect(env.a_sock)
    try:
        stalled.handshake()
        stalled.send_msg(SET_VRING_NUM, struct.pack("<II", 0, 64), size=100)
        time.sleep(0.3)
        assert env.b is not None
        try:
            status, _ = env.b.read(8, SECTOR, timeout=3)
            v.expect(status == S_OK, f"export B answered {status}")
        except FrontendTimeout:
            v.expect(False, "export B's request was not served within 3s")
        env.b.sock.settimeout(3)
        try:
            env.b.get_features()
        except FrontendTimeout:
            v.expect(False, "export B's GET_FEATURES was not answered within 3s")
        finally:
            env.b.sock.settimeout(env.b.timeout)
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.settimeout(3)
        second.connect(env.a_sock)
        try:
            v.expect(second.recv(1) == b"", "a second frontend on A got data")
        except TimeoutError:
            v.expect(False, "a second frontend on A was neither served nor refused in 3s")
        finally:
            second.close()
    finally:
        stalled.close()
    v.finish()


def test_partial_header_stalled(env: Harness) -> None:
    """Three bytes of a header, then nothing: the daemon waits for the rest without burning
    CPU, and keeps serving the other export."""
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.handshake()
        fe.send_raw(b"\x01\x00\x00")
        time.sleep(0.2)
        cpu0 = env.cpu_seconds()
        time.sleep(1.0)
        used = env.cpu_seconds() - cpu0
        v.expect(used < 0.3, f"daemon used {used:.2f}s of CPU in 1s waiting for a header")
        try:
            env.check_b()
        except AssertionError as e:
            v.expect(False, str(e))
    v.finish()


@pytest.mark.parametrize("nbytes", [1, 3, 11])
def test_partial_header_then_eof(env: Harness, nbytes: int) -> None:
    """Part of a header, then the frontend hangs up: the daemon sees the EOF, frees the
    connection (fd, CPU) and serves the next frontend."""
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.handshake()
        fe.send_raw(bytes([1] + [0] * (nbytes - 1)))
        fe.sock.shutdown(socket.SHUT_WR)
        v.expect_closed(fe, f"{nbytes} header bytes then EOF", 3)
    time.sleep(0.2)
    cpu0 = env.cpu_seconds()
    time.sleep(0.5)
    used = env.cpu_seconds() - cpu0
    v.expect(used < 0.2, f"daemon used {used:.2f}s of CPU in 0.5s after the frontend left")
    v.finish()


@pytest.mark.parametrize("request_,payload", [
    (SET_VRING_ADDR, struct.pack("<II", 0, 0)),
    (SET_MEM_TABLE, struct.pack("<II", 1, 0)),
    (SET_VRING_NUM, b"\0\0"),
], ids=["vring-addr-8-bytes", "mem-table-header-only", "vring-num-2-bytes"])
def test_payload_shorter_than_request(env: Harness, request_: int, payload: bytes) -> None:
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.setup(queue_size=64, start=False)
        assert fe.mem is not None
        fds = [fe.mem.main.fd] if request_ == SET_MEM_TABLE else []
        fe.send_msg(request_, payload, fds)
        v.expect_closed(fe, f"request {request_} with a {len(payload)}-byte payload", 3)
    v.finish()


@pytest.mark.parametrize("nregions", [2, 9, 509, 0xFFFFFFFF])
def test_mem_table_too_many_regions(env: Harness, nregions: int) -> None:
    """nregions larger than the fds sent (1) and than the 8 a message can carry."""
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.setup(queue_size=64, start=False)
        mem = fe.mem
        assert mem is not None
        regions = b"".join(
            struct.pack("<QQQQ", mem.main.gpa + (i << 30), mem.main.size, mem.main.qva + (i << 30),
                        0) for i in range(8))
        payload = struct.pack("<II", nregions, 0) + regions
        fe.send_msg(SET_MEM_TABLE, payload, [mem.main.fd])
        v.expect_closed(fe, f"SET_MEM_TABLE with nregions={nregions} and 1 fd", 3)
    v.finish()


def test_mem_table_region_bigger_than_memfd(env: Harness) -> None:
    """A region announced as 1 MiB over a 4 KiB memfd (nothing checks it against the memfd's
    size); if accepted, queue 0's rings are put in the part that does not exist."""
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.setup(queue_size=64, start=False, mem_size=64 << 10, arena_size=16 << 10)
        mem = fe.mem
        assert mem is not None
        lie = mem.add_region(1 << 20, mem.main.gpa + (1 << 30), file_size=4096)
        try:
            fe.set_mem_table()
        except ConnectionClosed:
            pass
        if not fe.peer_closed(1):
            v.expect(False, "SET_MEM_TABLE with a region bigger than its memfd was accepted")
            q = fe.queues[0]
            try:
                fe.set_vring_num(0, 64)
                fe.set_vring_base(0, 0)
                fe.set_vring_addr(0, lie.qva + (512 << 10), lie.qva + (520 << 10),
                                  lie.qva + (516 << 10))
                fe.set_vring_kick(0, q.kick_fd)
                fe.set_vring_call(0, q.call_fd)
                q.kick()
                fe.peer_closed(2)
            except (ConnectionClosed, FrontendTimeout):
                pass
    v.finish()


@pytest.mark.parametrize("num_queues,queue_size", [(1000, 64), (0, 64), (2, 0)],
                         ids=["1000-queues", "0-queues", "queue-size-0"])
def test_get_inflight_fd_absurd(env: Harness, num_queues: int, queue_size: int) -> None:
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.handshake()
        fe.send_msg(GET_INFLIGHT_FD, struct.pack("<QQHH4x", 0, 0, num_queues, queue_size))
        v.expect_closed(fe, f"GET_INFLIGHT_FD num_queues={num_queues} "
                            f"queue_size={queue_size}", 3)
    v.finish()


def test_get_inflight_fd_repeated(env: Harness) -> None:
    """GET_INFLIGHT_FD (not negotiated: the daemon does not offer INFLIGHT_SHMFD) 20 times with
    2 queues of 1024: refused, and in any case nothing left behind after the disconnect."""
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.handshake()
        answered = 0
        for _ in range(20):
            try:
                fe.send_msg(GET_INFLIGHT_FD, struct.pack("<QQHH4x", 0, 0, 2, 1024))
                m = fe.recv_msg()
            except ConnectionClosed:
                break
            answered += 1
            for fd in m.fds:
                os.close(fd)
        v.expect(answered == 0, f"GET_INFLIGHT_FD answered {answered} times without "
                                "INFLIGHT_SHMFD being negotiated")
    v.finish()


@pytest.mark.parametrize("case", ["1000-queues", "mmap-size-0", "mmap-size-1TiB",
                                  "queue-size-65535", "not-negotiated",
                                  "memfd-smaller-than-mmap-size-forced"])
def test_set_inflight_fd_absurd(env: Harness, case: str) -> None:
    """SET_INFLIGHT_FD with absurd sizes, or without INFLIGHT_SHMFD negotiated (the daemon
    does not offer it).  ``memfd-smaller-than-mmap-size-forced`` also forces INFLIGHT_SHMFD on
    in SET_PROTOCOL_FEATURES, announces 1 queue of 1024 (16400 bytes) over a 4 KiB memfd and
    starts the queue, which makes libvhost-user walk the 1024 inflight entries."""
    forced = case.endswith("-forced")
    v = Verdict(env)
    pf = None
    if forced:
        with connect(env.a_sock) as probe:
            probe.handshake()
            pf = probe.protocol_features | PF_INFLIGHT_SHMFD
    with connect(env.a_sock) as fe:
        fe.setup(queue_size=64, start=False, protocol_features=pf)
        assert fe.offered_features & F_PROTOCOL_FEATURES
        fe.set_mem_table()
        ifd = os.memfd_create("inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(ifd, 4096)
            mmap_size, num_queues, queue_size = {
                "1000-queues": (4096, 1000, 64),
                "mmap-size-0": (0, 1, 64),
                "mmap-size-1TiB": (1 << 40, 1, 64),
                "queue-size-65535": (16 + 16 * 65535, 1, 65535),
                "not-negotiated": (4096, 1, 64),
                "memfd-smaller-than-mmap-size-forced": (16 + 16 * 1024, 1, 1024),
            }[case]
            if forced:
                # version 1, used_idx 7 != the ring's 0: the daemon "recovers" in-flight state
                os.pwrite(ifd, struct.pack("<QHHHH", 0, 1, queue_size, 0, 7), 0)
            try:
                fe.send_msg(SET_INFLIGHT_FD,
                            struct.pack("<QQHH4x", mmap_size, 0, num_queues, queue_size), [ifd])
                if forced and not fe.peer_closed(0.5):
                    fe.start_queue(fe.queues[0])
            except (ConnectionClosed, FrontendTimeout):
                pass
        finally:
            os.close(ifd)
        v.expect_closed(fe, f"SET_INFLIGHT_FD {case}", 3)
    v.finish()


# == seeded random requests ==================================================================
RANDOM_SEED = 20261125
RANDOM_REQUESTS = 10_000
AREA = 2048  # sectors [0, AREA) of A: the random test's data


def _expect_malformed(rng: random.Random) -> tuple[bytes, int, list[int] | None,
                                                   list[int] | None, set[str]]:
    """A request that is valid as a ring but not as virtio-blk, and what it must get."""
    kind = rng.randrange(9)
    sector = rng.randrange(AREA)
    if kind == 0:  # short header
        n = rng.randrange(0, 16)
        return blk_header(rng.choice([T_IN, T_OUT]), sector)[:n], rng.randrange(1, 600), \
            None, None, REFUSED
    if kind == 1:  # no status byte
        return blk_header(T_OUT, sector) + b"\xee" * 512, 0, None, None, {"NOSTATUS"}
    if kind == 2:  # length not a multiple of 512
        n = rng.choice([1, 100, 511, 513, 1000, 4095])
        if rng.random() < 0.5:
            return blk_header(T_IN, sector), n + 1, None, _rand_split(rng, n + 1), {"IOERR"}
        return blk_header(T_OUT, sector) + b"\xee" * n, 1, _rand_split(rng, 16 + n), None, \
            {"IOERR"}
    if kind == 3:  # beyond capacity
        s = rng.choice([A_SECTORS, A_SECTORS + 1, 2**63, 2**64 - 1, A_SECTORS - 1])
        n = 1024
        if rng.random() < 0.5:
            return blk_header(T_IN, s), n + 1, None, None, {"IOERR"}
        return blk_header(T_OUT, s) + b"\xee" * n, 1, None, None, {"IOERR"}
    if kind == 4:  # unknown type
        t = rng.choice([2, 3, 5, 6, 7, 9, 12, 15, 16, 255, 0x7FFFFFFF, 0xFFFFFFFF,
                        T_GET_LIFETIME, T_SECURE_ERASE])
        return blk_header(t, sector) + b"\xee" * rng.choice([0, 512]), 513, None, None, \
            {"UNSUPP"}
    if kind == 5:  # discard/write-zeroes with several segments
        t = rng.choice([T_DISCARD, T_WRITE_ZEROES])
        segs = b"".join(dwz_segment(rng.randrange(AREA), 1) for _ in range(rng.randrange(2, 40)))
        return blk_header(t) + segs, 1, _rand_split(rng, 16 + len(segs)), None, {"UNSUPP"}
    if kind == 6:  # discard/write-zeroes with a huge count or beyond capacity
        t = rng.choice([T_DISCARD, T_WRITE_ZEROES])
        seg = rng.choice([dwz_segment(0, 32769), dwz_segment(0, 2**32 - 1),
                          dwz_segment(A_SECTORS, 1), dwz_segment(2**64 - 1, 8)])
        return blk_header(t) + seg, 1, None, None, {"IOERR"}
    if kind == 7:  # bad flags
        return blk_header(T_WRITE_ZEROES) + dwz_segment(sector, 1, rng.choice([2, 0xFE, 2**31])), \
            1, None, None, {"UNSUPP"}
    # no driver-readable buffer at all
    in_len = rng.randrange(17, 600)
    return b"", in_len, None, _rand_split(rng, in_len), REFUSED


def _rand_split(rng: random.Random, total: int) -> list[int] | None:
    if total <= 1 or rng.random() < 0.4:
        return None
    cuts = sorted(rng.sample(range(1, total), min(total - 1, rng.randrange(1, 6))))
    return [b - a for a, b in zip([0] + cuts, cuts + [total], strict=True)]


def test_random_requests(env: Harness) -> None:
    """≥ 10,000 requests, a seeded mix of valid reads/writes/flushes (data checked against a
    shadow copy) and requests malformed at the virtio-blk level (valid rings): every valid one
    completes correctly, every malformed one gets its error, the connection survives."""
    rng = random.Random(RANDOM_SEED)
    shadow = bytearray(env.read_image(0, AREA))
    t0 = time.monotonic()
    counts = {"valid": 0, "malformed": 0}
    with attach(env, queue_size=256, arena_size=4 << 20, mem_size=16 << 20) as fe:
        done = 0
        while done < RANDOM_REQUESTS:
            q = fe.queues[rng.randrange(len(fe.queues))]
            batch: list[tuple[Request, str, object]] = []
            written: list[tuple[int, int]] = []
            read_ranges: list[tuple[int, int]] = []
            for _ in range(rng.randrange(1, 31)):  # <= 8 descriptors each: fits 256
                indirect = rng.random() < 0.3
                if rng.random() < 0.3:
                    out, in_len, osplit, isplit, allowed = _expect_malformed(rng)
                    req = q.submit_blk(out, in_len, out_split=osplit, in_split=isplit,
                                       indirect=indirect, publish=False)
                    batch.append((req, "bad", (allowed, out)))
                    continue
                op = rng.random()
                count = rng.choice([1, 1, 2, 4, 8, 16])
                sector = rng.randrange(AREA - count)
                rng_ = (sector, sector + count)
                overlaps = any(a < rng_[1] and rng_[0] < b for a, b in written)
                if op < 0.45 and not overlaps:
                    data = rng.randbytes(count * 512)
                    if any(a < rng_[1] and rng_[0] < b for a, b in read_ranges):
                        continue
                    req = q.submit_blk(blk_header(T_OUT, sector) + data, 1,
                                       out_split=_rand_split(rng, 16 + len(data)),
                                       indirect=indirect, publish=False)
                    written.append(rng_)
                    batch.append((req, "write", (sector, data)))
                elif op < 0.95 and not overlaps:
                    req = q.submit_blk(blk_header(T_IN, sector), count * 512 + 1,
                                       in_split=_rand_split(rng, count * 512 + 1),
                                       indirect=indirect, publish=False)
                    read_ranges.append(rng_)
                    batch.append((req, "read", (sector, count)))
                else:
                    req = q.submit_blk(blk_header(T_FLUSH), 1, indirect=indirect,
                                       publish=False)
                    batch.append((req, "flush", None))
            order = list(range(len(batch)))
            for i in order:
                q.publish(batch[i][0].head)
            q.kick()
            try:
                q.wait([b[0] for b in batch], timeout=10)
            except (FrontendTimeout, ConnectionClosed) as e:
                env.assert_alive()
                raise AssertionError(f"after {done} requests: {e}\n{env.new_log()}") from e
            for req, kind, info in batch:
                got = outcome(req)
                if kind == "bad":
                    allowed, out = info  # type: ignore[misc]
                    assert got in allowed, f"request #{done}: malformed got {got}"
                    assert req.out_bytes() == out
                    counts["malformed"] += 1
                elif kind == "write":
                    sector, data = info  # type: ignore[misc]
                    assert got == "OK", f"request #{done}: write of {sector} got {got}"
                    shadow[sector * 512:sector * 512 + len(data)] = data
                    counts["valid"] += 1
                elif kind == "read":
                    sector, count = info  # type: ignore[misc]
                    assert got == "OK", f"request #{done}: read of {sector} got {got}"
                    assert req.used_len == count * 512 + 1
                    assert req.data == bytes(shadow[sector * 512:(sector + count) * 512]), \
                        f"request #{done}: read of sector {sector}+{count}: wrong data"
                    counts["valid"] += 1
                else:
                    assert got == "OK"
                    counts["valid"] += 1
                done += 1
        assert not fe.peer_closed(0.1), "the daemon closed the connection"
        fe.flush()
    assert env.read_image(0, AREA) == bytes(shadow), "image differs from the shadow copy"
    assert counts["valid"] > 5000 and counts["malformed"] > 2000, counts
    assert time.monotonic() - t0 < 60
    env.check_healthy()
