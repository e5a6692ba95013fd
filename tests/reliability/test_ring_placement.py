"""A hostile frontend places rings and inflight state where libvhost-user would read or write
past the memory it mapped.

libvhost-user checks only that each ring *starts* inside a memory region, and after a reconnect
it trusts the inflight region the frontend hands over (its ``desc_num`` lives in memory the
frontend can write, and the heads it finds there are popped again without a check against the
ring size).  The daemon checks all of this itself; each case must end with the connection
closed (or, where the daemon can simply correct the state, with the queue working) and the
daemon healthy (``Verdict.finish``: alive, the other export serving, no fd leaked).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

import pytest

from tests.frontend.vhost_user import (
    PF_INFLIGHT_SHMFD,
    S_OK,
    SET_INFLIGHT_FD,
    T_IN,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    WANTED_PROTOCOL_FEATURES,
    ConnectionClosed,
    FrontendTimeout,
    VhostUserFrontend,
    Virtqueue,
    blk_header,
    connect,
)
from tests.reliability import SCRATCH, Harness, Verdict, pattern

RING_BYTES = {  # bytes of each part of a split ring of n entries
    "desc": lambda n: 16 * n,
    "avail": lambda n: 6 + 2 * n,
    "used": lambda n: 6 + 8 * n,
}


def _addrs(fe: VhostUserFrontend, q: Virtqueue, moved: str, qva: int) -> tuple[int, int, int]:
    """The queue's (desc, used, avail) frontend addresses with ``moved`` replaced by ``qva``."""
    assert fe.mem is not None
    a = {"desc": fe.mem.qva(q.desc), "used": fe.mem.qva(q.used), "avail": fe.mem.qva(q.avail)}
    a[moved] = qva
    return a["desc"], a["used"], a["avail"]


def _start_with_moved_ring(env: Harness, ring: str, before_end: int, num_at_addr: int,
                           what: str) -> None:
    """Start queue 0 with ``ring`` placed ``before_end`` bytes before the end of the only memory
    region while the ring has ``num_at_addr`` entries, then give it its full size and send a
    read; the daemon must close the connection."""
    v = Verdict(env)
    with connect(env.a_sock) as fe:
        fe.setup(queue_size=64, start=False)
        assert fe.mem is not None
        fe.set_mem_table()
        q = fe.queues[0]
        end = fe.mem.main.qva + fe.mem.main.size
        try:
            fe.set_vring_num(0, num_at_addr)
            fe.set_vring_base(0, 0)
            fe.set_vring_addr(0, *_addrs(fe, q, ring, end - before_end))
            fe.set_vring_num(0, q.size)
            fe.set_vring_kick(0, q.kick_fd)
            fe.set_vring_call(0, q.call_fd)
            fe.set_vring_enable(0, True)
            q.submit_blk(blk_header(T_IN, 0), 513)  # (a moved avail ring shows nothing, but
            q.kick()                                 # the kick is enough)
        except (ConnectionClosed, FrontendTimeout):
            pass
        v.expect_closed(fe, what)
    v.finish()


@pytest.mark.parametrize("ring", ["desc", "avail", "used"])
def test_ring_runs_past_region_end(env: Harness, ring: str) -> None:
    """A ring of 64 entries that starts 8 bytes before the end of the only memory region."""
    _start_with_moved_ring(env, ring, 8, 64, f"{ring} ring across the end of guest memory")


@pytest.mark.parametrize("ring", ["desc", "avail", "used"])
def test_ring_grows_past_region_end_after_its_address(env: Harness, ring: str) -> None:
    """SET_VRING_ADDR while the ring has 1 entry (it fits), then SET_VRING_NUM 64 (it no longer
    does) and a request: caught before the first pop."""
    _start_with_moved_ring(env, ring, RING_BYTES[ring](1), 1,
                           f"{ring} ring grown across the end of guest memory")


# == inflight state handed over at reconnect ==================================================
INFLIGHT_HDR = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("<B5xHQ")  # inflight, padding, next, counter


def inflight_queue_bytes(queue_size: int) -> int:
    """libvhost-user's (and QEMU's) per-queue stride of the inflight region."""
    return (16 * queue_size + 2 + 63) & ~63


def _attach_with_inflight(env: Harness, queue_size: int, inflight_qsize: int,
                          version: int, inflight_heads: tuple[int, ...] = ()
                          ) -> tuple[VhostUserFrontend, int]:
    """Negotiate INFLIGHT_SHMFD, set the memory table and hand over an inflight region for
    queue 0 (``version`` 0: fresh; else state left by a previous backend, with the given
    heads in flight).  Returns the frontend and the region's memfd (the caller closes it)."""
    fe = connect(env.a_sock)
    try:
        fe.setup(queue_size=queue_size, num_queues=1, start=False,
                 protocol_features=WANTED_PROTOCOL_FEATURES | PF_INFLIGHT_SHMFD)
        assert fe.protocol_features & PF_INFLIGHT_SHMFD, "the daemon offers INFLIGHT_SHMFD"
        fe.set_mem_table()
        size = inflight_queue_bytes(inflight_qsize)
        ifd = os.memfd_create("inflight", os.MFD_CLOEXEC)
        os.ftruncate(ifd, size)
        os.pwrite(ifd, INFLIGHT_HDR.pack(0, version, inflight_qsize, 0, 0), 0)
        for n, head in enumerate(inflight_heads):
            os.pwrite(ifd, DESC_STATE.pack(1, 0, n + 1), INFLIGHT_HDR.size + 16 * head)
        fe.send_msg(SET_INFLIGHT_FD, struct.pack("<QQHH4x", size, 0, 1, inflight_qsize), [ifd])
        return fe, ifd
    except BaseException:
        fe.close()
        raise


def _expect_closed_after(env: Harness, what: str, queue_size: int, inflight_qsize: int,
                         version: int, steps: Callable[[VhostUserFrontend], None],
                         inflight_heads: tuple[int, ...] = ()) -> None:
    """Hand over the inflight region, run ``steps``; the daemon must close the connection."""
    v = Verdict(env)
    fe, ifd = _attach_with_inflight(env, queue_size, inflight_qsize, version, inflight_heads)
    with fe:
        try:
            steps(fe)
        except (ConnectionClosed, FrontendTimeout):
            pass
        finally:
            os.close(ifd)
        v.expect_closed(fe, what)
    v.finish()


def test_inflight_kick_before_ring_address(env: Harness) -> None:
    """Inflight state to recover, then SET_VRING_KICK before any SET_VRING_ADDR:
    libvhost-user would read the used index through a NULL ring pointer."""
    def steps(fe: VhostUserFrontend) -> None:
        q = fe.queues[0]
        fe.set_vring_num(0, q.size)
        fe.set_vring_base(0, 0)
        fe.set_vring_kick(0, q.kick_fd)
        q.kick()

    _expect_closed_after(env, "SET_VRING_KICK with inflight state and no ring address",
                         64, 64, 1, steps)


def test_inflight_entry_beyond_ring(env: Harness) -> None:
    """An inflight region for 64 entries marking head 40 in flight, and a ring of 8: the head
    would be popped again from descriptor 40 of an 8-entry table."""
    def steps(fe: VhostUserFrontend) -> None:
        fe.start_queue(fe.queues[0])
        fe.queues[0].kick()

    _expect_closed_after(env, "inflight head 40 on a ring of 8", 8, 64, 1, steps,
                         inflight_heads=(40,))


def test_ring_bigger_than_inflight_region(env: Harness) -> None:
    """An inflight region for 8 entries and a ring of 1024, then a request with head 1000:
    libvhost-user would mark entry 1000 of an 8-entry region."""
    def steps(fe: VhostUserFrontend) -> None:
        q = fe.queues[0]
        fe.start_queue(q)
        hdr, st = q.buffer(blk_header(T_IN, 0)), q.buffer(length=513)
        q.write_desc(1000, hdr, 16, VRING_DESC_F_NEXT, 1001)
        q.write_desc(1001, st, 513, VRING_DESC_F_WRITE, 0)
        q.publish(1000)
        q.kick()

    _expect_closed_after(env, "a ring of 1024 over an inflight region of 8", 1024, 8, 0, steps)


def test_inflight_desc_num_rewritten_by_frontend(env: Harness) -> None:
    """After SET_INFLIGHT_FD the frontend rewrites the region's desc_num to 65535 (the memory
    is shared): libvhost-user would walk 65535 entries of a 64-entry region when the queue
    starts.  The daemon restores the size it was given; the queue then simply works."""
    v = Verdict(env)
    fe, ifd = _attach_with_inflight(env, 64, 64, version=1)
    with fe:
        try:
            os.pwrite(ifd, struct.pack("<H", 0xFFFF), 10)  # desc_num
            fe.start_queue(fe.queues[0])
            data = pattern(SCRATCH, 1, seed=3)
            v.expect(fe.write(SCRATCH, data) == S_OK, "write after the rewrite failed")
            v.expect(fe.read(SCRATCH, len(data)) == (S_OK, data), "read back differs")
        except (ConnectionClosed, FrontendTimeout) as e:
            v.expect(False, f"the queue did not work after desc_num was restored: {e!r}")
        finally:
            os.close(ifd)
    v.finish()
