"""A vhost-user device that is not a block device, for tests: ``echo`` answers each request by
writing the bytes the driver gave it, reversed, into the request's writable buffers.

It implements the VuDevice protocol (vhost/device.py) and nothing else: no blkstate (so the
server's C loop hands every element to ``handle_request``), no I/O engines.  Run as
``python -m tests.devices.echo SOCKET``; it serves until SIGTERM.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from blocklayer.aio import AioContext, qemu_get_aio_context
from vhost.ffi import ffi
from vhost.server import VuQueue, VuServer, listen_unix

VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29


class EchoDevice:
    num_queues = 1

    def __init__(self) -> None:
        self.requests = 0

    def get_features(self) -> int:
        return VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX

    def set_features(self, features: int) -> None:
        pass

    def get_protocol_features(self) -> int:
        return 0

    def get_config(self, size: int) -> bytes | None:
        return bytes(size)

    def set_config(self, data: bytes, offset: int, flags: int) -> bool:
        return False

    def queue_context(self, qidx: int) -> AioContext:
        return qemu_get_aio_context()

    def handle_request(self, queue: VuQueue, elem: Any) -> None:
        data = b"".join(bytes(ffi.buffer(elem.out_sg[i].iov_base, elem.out_sg[i].iov_len))
                        for i in range(elem.out_num))[::-1]
        pos = 0
        for i in range(elem.in_num):
            n = min(elem.in_sg[i].iov_len, len(data) - pos)
            ffi.buffer(elem.in_sg[i].iov_base, n)[:] = data[pos:pos + n]
            pos += n
        self.requests += 1
        queue.complete(elem, pos)

    def request_state(self) -> Any:
        return ffi.NULL

    def queue_engines(self, ctx: AioContext) -> tuple[Any, Any]:
        return ffi.NULL, ffi.NULL

    def handle_failed(self, queue: VuQueue, elem: Any, err: int, rtype: int) -> None:
        raise AssertionError("no request is served in C, so none can fail there")

    def serve_batch(self, queue: VuQueue) -> None:
        raise AssertionError("no request is parsed in C, so none is batched")

    def connection_closing(self) -> None:
        pass

    def connection_changed(self, connected: bool) -> None:
        print("connected" if connected else "disconnected", flush=True)


def main() -> None:
    path = sys.argv[1]
    ctx = qemu_get_aio_context()
    done = []
    server = VuServer("echo", EchoDevice(), listen_unix(path), path)
    signal.signal(signal.SIGTERM,
                  lambda *a: ctx.schedule_from_signal_handler(
                      server.shutdown, lambda: done.append(1)))
    print("ready", flush=True)
    ctx.run(should_stop=lambda: bool(done))


if __name__ == "__main__":
    main()
