"""A vhost-user frontend for tests: the QEMU side of a vhost-user-blk device, in Python.

Protocol
--------
Every message is a 12-byte header (``request`` u32, ``flags`` u32, ``size`` u32: the payload
size), then ``size`` payload bytes; file descriptors travel as SCM_RIGHTS on the header's
``sendmsg``.  ``flags`` carries the version (1), REPLY (bit 2) on replies and NEED_REPLY (bit 3)
when the frontend wants an acknowledgement (protocol feature REPLY_ACK: the backend answers with
a u64, 0 = success).  ``VhostUserFrontend`` follows what the daemon offers: it negotiates
REPLY_ACK when offered and then asks for an ack on every message that has no reply of its own,
as QEMU does.  The session QEMU runs, and ``VhostUserFrontend.setup()`` reproduces:

    SET_OWNER, GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
    GET_CONFIG, SET_FEATURES, SET_MEM_TABLE (memfd regions), and per queue SET_VRING_NUM,
    SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL (eventfds), SET_VRING_ENABLE.

Guest memory
------------
``GuestMemory`` is a list of ``Region`` s: one memfd each, mapped in this process too, with a
guest-physical address (``gpa``, what descriptors hold) and a frontend virtual address (``qva``,
what SET_VRING_ADDR holds; libvhost-user translates it through the region table).  Region 0
starts at ``GPA_BASE`` and is carved by a bump allocator: each queue gets its rings and a data
arena for request buffers.

Split virtqueue layout (virtio 1.2, 2.7), each part on its own 4 KiB page of region 0::

    desc   table   16 * N   {le64 addr, le32 len, le16 flags, le16 next}
    avail  ring     6 + 2N  {le16 flags, le16 idx, le16 ring[N], le16 used_event}
    used   ring     6 + 8N  {le16 flags, le16 idx, {le32 id, le32 len} ring[N], le16 avail_event}

With VIRTIO_RING_F_EVENT_IDX negotiated the frontend writes ``used_event`` = the last used index
it has seen (so every new completion interrupts), and kicks unconditionally.

virtio-blk requests
-------------------
A request is a chain: driver-readable buffers (the 16-byte header ``{le32 type, le32 ioprio,
le64 sector}`` then write data), then device-writable ones (read data, then the status byte).
``Virtqueue.submit_blk(out, in_len, out_split=..., in_split=..., indirect=...)`` places the
bytes in as many descriptors as asked (``out_split``/``in_split`` are segment lengths), directly
in the ring or through an indirect table.  Device-writable buffers are pre-filled with
``POISON`` and the status byte with ``STATUS_UNSET`` so a test can tell what the device wrote.
``Virtqueue.wait()`` waits for the call eventfd (with a timeout) and reads the used ring.

Raw mode
--------
``send_msg(request, payload, fds, size=..., flags=...)`` sends any header (lying sizes
included), ``send_raw(bytes, fds)`` any bytes; ``Virtqueue.write_desc``/``publish``/
``set_avail_idx`` write any ring content; ``peer_closed(timeout)`` tells whether the daemon
closed the connection.
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# -- protocol constants ---------------------------------------------------------------------------
VHOST_USER_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
HDR = struct.Struct("<III")  # request, flags, size
HDR_SIZE = HDR.size
MAX_PAYLOAD = 272  # sizeof(VhostUserMsg.payload) in libvhost-user (VhostUserConfig, 8-aligned)
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS
VRING_NOFD = 1 << 8

GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SET_BACKEND_REQ_FD = 21
GET_CONFIG = 24
SET_CONFIG = 25
GET_INFLIGHT_FD = 31
SET_INFLIGHT_FD = 32
VRING_KICK = 35
GET_MAX_MEM_SLOTS = 36

#: requests the backend answers with a reply of their own (no REPLY_ACK needed)
HAS_REPLY = frozenset({GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_VRING_BASE,
                       GET_CONFIG, GET_INFLIGHT_FD, GET_MAX_MEM_SLOTS})

# virtio / vhost feature bits
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_VERSION_1 = 1 << 32
BLK_F_SEG_MAX = 1 << 2
BLK_F_RO = 1 << 5
BLK_F_BLK_SIZE = 1 << 6
BLK_F_FLUSH = 1 << 9
BLK_F_TOPOLOGY = 1 << 10
BLK_F_CONFIG_WCE = 1 << 11
BLK_F_MQ = 1 << 12
BLK_F_DISCARD = 1 << 13
BLK_F_WRITE_ZEROES = 1 << 14
#: what the test frontend accepts, like QEMU's vhost-user-blk feature list
WANTED_FEATURES = (F_INDIRECT_DESC | F_EVENT_IDX | F_VERSION_1 | F_PROTOCOL_FEATURES
                   | BLK_F_SEG_MAX | BLK_F_RO | BLK_F_BLK_SIZE | BLK_F_FLUSH | BLK_F_TOPOLOGY
                   | BLK_F_CONFIG_WCE | BLK_F_MQ | BLK_F_DISCARD | BLK_F_WRITE_ZEROES)

# protocol feature bits
PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_CONFIG = 1 << 9
PF_INFLIGHT_SHMFD = 1 << 12
WANTED_PROTOCOL_FEATURES = PF_MQ | PF_REPLY_ACK | PF_CONFIG

# -- split ring -----------------------------------------------------------------------------------
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEM = struct.Struct("<II")  # id, len
PAGE = 4096

# -- virtio-blk -----------------------------------------------------------------------------------
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
SECTOR = 512
BLK_HDR = struct.Struct("<IIQ")  # type, ioprio, sector
DWZ = struct.Struct("<QII")  # sector, num_sectors, flags
CONFIG_SIZE = 60
WCE_OFFSET = 32
POISON = 0xA5  # device-writable buffers start as this ...
STATUS_UNSET = 0xEE  # ... and the status byte as this

GPA_BASE = 0x1_0000_0000
QVA_BASE = 0x7F00_0000_0000


class ConnectionClosed(Exception):
    """The daemon closed the connection (EOF, or a reset)."""


class FrontendTimeout(TimeoutError):
    """The daemon did not answer in time."""


def blk_header(rtype: int, sector: int = 0, ioprio: int = 0) -> bytes:
    """The 16-byte ``struct virtio_blk_outhdr``."""
    return BLK_HDR.pack(rtype & 0xFFFFFFFF, ioprio & 0xFFFFFFFF, sector & (2**64 - 1))


def dwz_segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    """One ``struct virtio_blk_discard_write_zeroes`` (16 bytes)."""
    return DWZ.pack(sector & (2**64 - 1), num_sectors & 0xFFFFFFFF, flags & 0xFFFFFFFF)


@dataclass
class Config:
    """The part of ``struct virtio_blk_config`` the tests look at."""

    raw: bytes

    @property
    def capacity(self) -> int:
        return struct.unpack_from("<Q", self.raw, 0)[0]

    @property
    def wce(self) -> int:
        return self.raw[WCE_OFFSET]

    @property
    def num_queues(self) -> int:
        return struct.unpack_from("<H", self.raw, 34)[0]


# -- guest memory --------------------------------------------------------------------------------
@dataclass
class Region:
    """One guest memory region: a memfd mapped here and (after SET_MEM_TABLE) in the daemon."""

    gpa: int
    size: int
    qva: int
    fd: int
    mm: mmap.mmap
    mmap_offset: int = 0
    #: the size announced in SET_MEM_TABLE (tests may lie: bigger than the memfd)
    announced_size: int | None = None

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def wire(self) -> bytes:
        """``VhostUserMemoryRegion``: gpa, size, userspace address, mmap offset."""
        size = self.size if self.announced_size is None else self.announced_size
        return struct.pack("<QQQQ", self.gpa, size, self.qva, self.mmap_offset)


class GuestMemory:
    """memfd-backed guest RAM.  Region 0 holds rings and buffers (bump-allocated)."""

    def __init__(self, size: int = 4 << 20, gpa: int = GPA_BASE) -> None:
        self.regions: list[Region] = []
        self.add_region(size, gpa)
        self._next = 0

    def add_region(self, size: int, gpa: int, qva: int | None = None,
                   file_size: int | None = None) -> Region:
        """A new memfd of ``file_size`` bytes (default ``size``) mapped as ``size`` bytes."""
        fd = os.memfd_create(f"guest-ram-{len(self.regions)}", os.MFD_CLOEXEC)
        real = size if file_size is None else file_size
        os.ftruncate(fd, real)
        mm = mmap.mmap(fd, real, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        if qva is None:
            qva = QVA_BASE + (len(self.regions) << 40)
        r = Region(gpa=gpa, size=real, qva=qva, fd=fd, mm=mm,
                   announced_size=None if file_size is None else size)
        self.regions.append(r)
        return r

    @property
    def main(self) -> Region:
        return self.regions[0]

    def alloc(self, size: int, align: int = 16) -> int:
        """``size`` bytes of region 0 (never freed): returns the guest address."""
        start = (self._next + align - 1) & ~(align - 1)
        if start + size > self.main.size:
            raise MemoryError(f"guest memory exhausted ({start + size} > {self.main.size})")
        self._next = start + size
        return self.main.gpa + start

    def _locate(self, gpa: int, length: int) -> tuple[Region, int]:
        for r in self.regions:
            if r.contains(gpa, length):
                return r, gpa - r.gpa
        raise ValueError(f"guest address {gpa:#x}+{length} is not in guest memory")

    def write(self, gpa: int, data: bytes) -> None:
        r, off = self._locate(gpa, len(data))
        r.mm[off:off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        r, off = self._locate(gpa, length)
        return bytes(r.mm[off:off + length])

    def fill(self, gpa: int, length: int, byte: int) -> None:
        self.write(gpa, bytes([byte]) * length)

    def qva(self, gpa: int) -> int:
        r, off = self._locate(gpa, 1)
        return r.qva + off

    def close(self) -> None:
        for r in self.regions:
            try:
                r.mm.close()
            except BufferError:
                pass
            os.close(r.fd)
        self.regions = []


class Arena:
    """A bump allocator for request buffers, reset when the queue has nothing in flight."""

    def __init__(self, mem: GuestMemory, size: int) -> None:
        self.mem = mem
        self.base = mem.alloc(size, PAGE)
        self.size = size
        self.used = 0

    def alloc(self, size: int, align: int = 16) -> int:
        start = (self.used + align - 1) & ~(align - 1)
        if start + size > self.size:
            raise MemoryError("request arena full: wait for completions first")
        self.used = start + size
        return self.base + start

    def reset(self) -> None:
        self.used = 0


# -- requests ------------------------------------------------------------------------------------
@dataclass
class Segment:
    """One buffer of a chain: guest address, length, device-writable."""

    addr: int
    length: int
    write: bool


@dataclass
class Request:
    """A published descriptor chain, and what the device answered."""

    head: int
    descs: list[int]
    segments: list[Segment]
    vq: Virtqueue
    used_len: int | None = None

    @property
    def done(self) -> bool:
        return self.used_len is not None

    def in_bytes(self) -> bytes:
        """Every device-writable buffer, concatenated (data then status for virtio-blk)."""
        return b"".join(self.vq.mem.read(s.addr, s.length) for s in self.segments if s.write)

    def out_bytes(self) -> bytes:
        return b"".join(self.vq.mem.read(s.addr, s.length) for s in self.segments if not s.write)

    @property
    def status(self) -> int | None:
        """The last device-writable byte (the virtio-blk status), None if there is none."""
        data = self.in_bytes()
        return data[-1] if data else None

    @property
    def data(self) -> bytes:
        """Device-writable bytes without the status byte."""
        return self.in_bytes()[:-1]


def split_lengths(total: int, split: Sequence[int] | None) -> list[int]:
    """Segment lengths covering ``total`` bytes: ``split`` as given (the last segment takes what
    is left), or one segment."""
    if not split:
        return [total] if total else []
    out = []
    left = total
    for n in split[:-1]:
        n = min(n, left)
        if n:
            out.append(n)
        left -= n
    if left:
        out.append(left)
    return out


def queue_footprint(size: int, arena_size: int) -> int:
    """Bytes of region 0 one Virtqueue takes: three page-aligned ring parts and its arena."""
    def page_up(n: int) -> int:
        return (n + PAGE - 1) & ~(PAGE - 1)
    return page_up(16 * size) + page_up(6 + 2 * size) + page_up(6 + 8 * size) + page_up(arena_size)


class Virtqueue:
    """One split virtqueue laid out in guest memory by the frontend (see the module doc)."""

    def __init__(self, mem: GuestMemory, index: int, size: int, event_idx: bool,
                 arena_size: int = 1 << 20) -> None:
        self.mem = mem
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.desc = mem.alloc(16 * size, PAGE)
        self.avail = mem.alloc(6 + 2 * size, PAGE)
        self.used = mem.alloc(6 + 8 * size, PAGE)
        self.arena = Arena(mem, arena_size)
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.avail_idx = 0  # our shadow of avail->idx (free-running u16)
        self.last_used = 0  # next used-ring entry to read
        self.free = list(range(size))
        self.inflight: dict[int, Request] = {}
        self.completed = 0

    # -- raw ring access --------------------------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        self.mem.write(self.desc + 16 * i,
                       DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, flags, next_ & 0xFFFF))

    def set_avail_ring(self, slot: int, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (slot % self.size), struct.pack("<H", head & 0xFFFF))

    def set_avail_idx(self, value: int) -> None:
        """Store avail->idx (raw: may jump anywhere)."""
        self.avail_idx = value & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def publish(self, head: int) -> None:
        """Append ``head`` to the avail ring and bump avail->idx."""
        self.set_avail_ring(self.avail_idx, head)
        self.set_avail_idx(self.avail_idx + 1)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def avail_event(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.size, 2))[0]

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    # -- chains -----------------------------------------------------------------------------------
    def add_chain(self, segments: Sequence[Segment], indirect: bool = False,
                  publish: bool = True) -> Request:
        """Write ``segments`` as one chain (or one indirect table) and publish its head."""
        if not segments:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table = self.arena.alloc(16 * len(segments))
            for j, s in enumerate(segments):
                flags = (VRING_DESC_F_WRITE if s.write else 0)
                if j + 1 < len(segments):
                    flags |= VRING_DESC_F_NEXT
                self.mem.write(table + 16 * j, DESC.pack(s.addr, s.length, flags, j + 1))
            descs = self._take(1)
            self.write_desc(descs[0], table, 16 * len(segments), VRING_DESC_F_INDIRECT)
        else:
            descs = self._take(len(segments))
            for j, s in enumerate(segments):
                flags = VRING_DESC_F_WRITE if s.write else 0
                nxt = 0
                if j + 1 < len(segments):
                    flags |= VRING_DESC_F_NEXT
                    nxt = descs[j + 1]
                self.write_desc(descs[j], s.addr, s.length, flags, nxt)
        req = Request(head=descs[0], descs=descs, segments=list(segments), vq=self)
        self.inflight[req.head] = req
        if publish:
            self.publish(req.head)
        return req

    def _take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"queue {self.index}: {n} descriptors wanted, "
                               f"{len(self.free)} free")
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def buffer(self, data: bytes | None = None, length: int = 0, fill: int = POISON) -> int:
        """A buffer in the arena holding ``data`` (or ``length`` bytes of ``fill``)."""
        n = len(data) if data is not None else length
        addr = self.arena.alloc(max(n, 1))
        self.mem.write(addr, data if data is not None else bytes([fill]) * n)
        return addr

    def submit_blk(self, out: bytes, in_len: int, *, out_split: Sequence[int] | None = None,
                   in_split: Sequence[int] | None = None, indirect: bool = False,
                   publish: bool = True) -> Request:
        """A virtio-blk request: ``out`` (header + write data) in driver-readable buffers cut as
        ``out_split``, ``in_len`` device-writable bytes (read data + status) cut as
        ``in_split``.  Writable buffers are poisoned, the status byte set to STATUS_UNSET."""
        segs: list[Segment] = []
        pos = 0
        for n in split_lengths(len(out), out_split):
            segs.append(Segment(self.buffer(out[pos:pos + n]), n, False))
            pos += n
        for n in split_lengths(in_len, in_split):
            segs.append(Segment(self.buffer(length=n), n, True))
        if in_len:
            last = segs[-1]
            self.mem.write(last.addr + last.length - 1, bytes([STATUS_UNSET]))
        return self.add_chain(segs, indirect=indirect, publish=publish)

    # -- completions ------------------------------------------------------------------------------
    def harvest(self) -> list[Request]:
        """Read new used-ring entries; returns the requests they complete."""
        done = []
        end = self.used_idx()
        while self.last_used != end:
            slot = self.last_used % self.size
            uid, ulen = USED_ELEM.unpack(self.mem.read(self.used + 4 + 8 * slot, 8))
            self.last_used = (self.last_used + 1) & 0xFFFF
            req = self.inflight.pop(uid, None)
            if req is None:
                raise AssertionError(f"queue {self.index}: device used unknown head {uid}")
            req.used_len = ulen
            self.free.extend(req.descs)
            self.completed += 1
            done.append(req)
        if self.event_idx:
            self.set_used_event(self.last_used)
        if not self.inflight:
            self.arena.reset()
        return done

    def wait(self, reqs: Iterable[Request] | None = None, timeout: float = 5.0) -> None:
        """Wait until ``reqs`` (default: everything in flight) completed; raise
        FrontendTimeout after ``timeout`` seconds."""
        want = list(reqs) if reqs is not None else list(self.inflight.values())
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.call_fd, select.POLLIN)
        while True:
            self.harvest()
            if all(r.done for r in want):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                pending = [r.head for r in want if not r.done]
                raise FrontendTimeout(f"queue {self.index}: heads {pending[:10]} "
                                      f"({len(pending)}) not completed in {timeout}s")
            if poller.poll(min(left, 0.05) * 1000):
                try:
                    os.eventfd_read(self.call_fd)
                except BlockingIOError:
                    pass

    def close(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            try:
                os.close(fd)
            except OSError:
                pass


# -- the connection ------------------------------------------------------------------------------
@dataclass
class Msg:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.payload)[0]


class VhostUserFrontend:
    """One connection to a vhost-user backend."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except BlockingIOError:  # EAGAIN: the listen backlog is full for now
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.01)
        self.features = 0
        self.protocol_features = 0
        self.reply_ack = False
        self.num_queues = 0
        self.config: Config | None = None
        self.offered_features = 0
        self.offered_protocol_features = 0
        self.mem: GuestMemory | None = None
        self.queues: list[Virtqueue] = []

    # -- raw messages -----------------------------------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are (fds as SCM_RIGHTS with the first byte)."""
        try:
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self.sock.sendmsg([data], anc)
                data = data[sent:]
            if data:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ConnectionClosed(str(e)) from e

    def send_msg(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                 flags: int | None = None, size: int | None = None,
                 need_reply: bool = False) -> None:
        """A message; ``size`` overrides the header's payload size (a lie, for tests)."""
        if flags is None:
            flags = VHOST_USER_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        n = len(payload) if size is None else size
        hdr = HDR.pack(request, flags, n & 0xFFFFFFFF)
        self.send_raw(hdr + payload, fds)

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except TimeoutError as e:
                raise FrontendTimeout(f"no reply within {self.timeout}s") from e
            except ConnectionResetError as e:
                raise ConnectionClosed(str(e)) from e
            if not chunk:
                raise ConnectionClosed("EOF from the daemon")
            buf += chunk
        return buf

    def recv_msg(self) -> Msg:
        fds: list[int] = []
        try:
            data, anc, _flags, _ = self.sock.recvmsg(
                HDR_SIZE, socket.CMSG_SPACE(MAX_FDS * 4))
        except TimeoutError as e:
            raise FrontendTimeout(f"no reply within {self.timeout}s") from e
        except ConnectionResetError as e:
            raise ConnectionClosed(str(e)) from e
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(blob[: len(blob) - len(blob) % 4])
                fds.extend(a)
        if not data:
            raise ConnectionClosed("EOF from the daemon")
        if len(data) < HDR_SIZE:
            data += self._recv_exact(HDR_SIZE - len(data))
        request, flags, size = HDR.unpack(data)
        payload = self._recv_exact(size) if size else b""
        return Msg(request, flags, payload, fds)

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> Msg | None:
        """Send a message and read its reply: its own (GET_*), or the REPLY_ACK one when
        negotiated (raising ConnectionClosed if the daemon closes instead)."""
        has_reply = request in HAS_REPLY
        ack = self.reply_ack and not has_reply
        self.send_msg(request, payload, fds, need_reply=ack)
        if not (has_reply or ack):
            return None
        m = self.recv_msg()
        if m.request != request or not m.flags & FLAG_REPLY:
            raise AssertionError(f"reply to {request} was {m.request} flags {m.flags:#x}")
        if ack and m.u64() != 0:
            raise AssertionError(f"request {request} was nacked ({m.u64()})")
        return m

    def peer_closed(self, timeout: float = 5.0) -> bool:
        """True if the daemon closes the connection within ``timeout`` s (data it sends
        meanwhile, e.g. replies, are discarded; fds received are closed)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return False
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(MAX_FDS * 4),
                                                    socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return True
            for level, kind, blob in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(blob[: len(blob) - len(blob) % 4])
                    for fd in a:
                        os.close(fd)
            if not data:
                return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        for q in self.queues:
            q.close()
        if self.mem is not None:
            self.mem.close()
            self.mem = None

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- protocol messages ------------------------------------------------------------------------
    def get_features(self) -> int:
        m = self.call(GET_FEATURES)
        assert m is not None
        return m.u64()

    def set_features(self, features: int) -> None:
        self.call(SET_FEATURES, struct.pack("<Q", features))
        self.features = features

    def get_protocol_features(self) -> int:
        m = self.call(GET_PROTOCOL_FEATURES)
        assert m is not None
        return m.u64()

    def set_protocol_features(self, features: int) -> None:
        self.call(SET_PROTOCOL_FEATURES, struct.pack("<Q", features))
        self.protocol_features = features
        self.reply_ack = bool(features & PF_REPLY_ACK)

    def get_queue_num(self) -> int:
        m = self.call(GET_QUEUE_NUM)
        assert m is not None
        return m.u64()

    def set_owner(self) -> None:
        self.call(SET_OWNER)

    def get_config(self, size: int = CONFIG_SIZE) -> Config:
        m = self.call(GET_CONFIG, struct.pack("<III", 0, size, 0) + bytes(size))
        assert m is not None
        if len(m.payload) < 12:
            raise AssertionError("GET_CONFIG failed (empty reply)")
        return Config(m.payload[12:])

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.call(SET_CONFIG, struct.pack("<III", offset, len(data), flags) + data)

    def set_mem_table(self, regions: Sequence[Region] | None = None) -> None:
        assert self.mem is not None
        regs = list(self.mem.regions if regions is None else regions)
        payload = struct.pack("<II", len(regs), 0) + b"".join(r.wire() for r in regs)
        self.call(SET_MEM_TABLE, payload, [r.fd for r in regs])

    def set_vring_num(self, index: int, num: int) -> None:
        self.call(SET_VRING_NUM, struct.pack("<II", index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.call(SET_VRING_BASE, struct.pack("<II", index, base))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int,
                       flags: int = 0) -> None:
        """Ring addresses as frontend virtual addresses (qva)."""
        self.call(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, flags, desc, used, avail, 0))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        if fd is None:
            self.call(SET_VRING_KICK, struct.pack("<Q", index | VRING_NOFD))
        else:
            self.call(SET_VRING_KICK, struct.pack("<Q", index), [fd])

    def set_vring_call(self, index: int, fd: int | None) -> None:
        if fd is None:
            self.call(SET_VRING_CALL, struct.pack("<Q", index | VRING_NOFD))
        else:
            self.call(SET_VRING_CALL, struct.pack("<Q", index), [fd])

    def set_vring_enable(self, index: int, enable: bool = True) -> None:
        self.call(SET_VRING_ENABLE, struct.pack("<II", index, int(enable)))

    def get_vring_base(self, index: int) -> int:
        m = self.call(GET_VRING_BASE, struct.pack("<II", index, 0))
        assert m is not None
        return struct.unpack_from("<II", m.payload)[1]

    # -- a whole session --------------------------------------------------------------------------
    def handshake(self, protocol_features: int | None = None) -> None:
        """What QEMU does at device init: owner, features, protocol features, queues, config."""
        self.set_owner()
        self.offered_features = self.get_features()
        if self.offered_features & F_PROTOCOL_FEATURES:
            self.offered_protocol_features = self.get_protocol_features()
            want = (WANTED_PROTOCOL_FEATURES if protocol_features is None
                    else protocol_features)
            self.set_protocol_features(self.offered_protocol_features & want
                                       if protocol_features is None else want)
            if self.protocol_features & PF_MQ:
                self.num_queues = self.get_queue_num()
            if self.protocol_features & PF_CONFIG:
                self.config = self.get_config()
        if not self.num_queues:
            self.num_queues = 1

    def setup(self, num_queues: int | None = None, queue_size: int = 128,
              mem_size: int | None = None, arena_size: int = 1 << 20,
              protocol_features: int | None = None, start: bool = True) -> list[Virtqueue]:
        """Handshake, then guest memory and ``num_queues`` started queues (default: all the
        backend offers, 64 for a default export).  ``mem_size`` defaults to what the queues'
        rings and arenas take plus 7 MiB for the test's own buffers (at least 8 MiB)."""
        self.handshake(protocol_features)
        feats = self.offered_features & WANTED_FEATURES
        self.set_features(feats)
        n = self.num_queues if num_queues is None else num_queues
        if mem_size is None:
            mem_size = max(8 << 20, n * queue_footprint(queue_size, arena_size) + (7 << 20))
        self.mem = GuestMemory(mem_size)
        for i in range(n):
            self.queues.append(Virtqueue(self.mem, i, queue_size, bool(feats & F_EVENT_IDX),
                                         arena_size))
        if start:
            self.start()
        return self.queues

    def start(self, regions: Sequence[Region] | None = None) -> None:
        """SET_MEM_TABLE and start every queue (as QEMU's vhost_dev_start)."""
        assert self.mem is not None
        self.set_mem_table(regions)
        for q in self.queues:
            self.start_queue(q)

    def start_queue(self, q: Virtqueue) -> None:
        assert self.mem is not None
        self.set_vring_num(q.index, q.size)
        self.set_vring_base(q.index, 0)
        self.set_vring_addr(q.index, self.mem.qva(q.desc), self.mem.qva(q.used),
                            self.mem.qva(q.avail))
        self.set_vring_kick(q.index, q.kick_fd)
        self.set_vring_call(q.index, q.call_fd)
        if self.features & F_PROTOCOL_FEATURES:
            self.set_vring_enable(q.index, True)

    # -- virtio-blk conveniences ------------------------------------------------------------------
    def blk(self, rtype: int, sector: int = 0, data: bytes = b"", in_len: int = 1, *,
            queue: int = 0, timeout: float = 5.0, out_split: Sequence[int] | None = None,
            in_split: Sequence[int] | None = None, indirect: bool = False) -> Request:
        """Submit one request (header + ``data`` out, ``in_len`` in), kick, wait for it."""
        q = self.queues[queue]
        req = q.submit_blk(blk_header(rtype, sector) + data, in_len, out_split=out_split,
                           in_split=in_split, indirect=indirect)
        q.kick()
        q.wait([req], timeout)
        return req

    def read(self, sector: int, nbytes: int, queue: int = 0, indirect: bool = False,
             timeout: float = 5.0) -> tuple[int | None, bytes]:
        req = self.blk(T_IN, sector, b"", nbytes + 1, queue=queue, indirect=indirect,
                       timeout=timeout)
        return req.status, req.data

    def write(self, sector: int, data: bytes, queue: int = 0, indirect: bool = False,
              timeout: float = 5.0) -> int | None:
        return self.blk(T_OUT, sector, data, 1, queue=queue, indirect=indirect,
                        timeout=timeout).status

    def flush(self, queue: int = 0, timeout: float = 5.0) -> int | None:
        return self.blk(T_FLUSH, 0, b"", 1, queue=queue, timeout=timeout).status


def connect(path: str, timeout: float = 5.0, retry_for: float = 5.0) -> VhostUserFrontend:
    """Connect and check the daemon really serves us (a daemon busy with a previous frontend
    accepts and closes at once): retried for ``retry_for`` seconds."""
    deadline = time.monotonic() + retry_for
    while True:
        fe = VhostUserFrontend(path, timeout)
        try:
            fe.offered_features = fe.get_features()
            return fe
        except (ConnectionClosed, OSError) as e:
            fe.close()
            if time.monotonic() > deadline:
                raise ConnectionClosed(f"{path}: no frontend slot for {retry_for}s") from e
            time.sleep(0.02)
