"""A small vhost-user frontend for tests (``tests/frontend/vhost_user.py``).

It speaks the protocol as QEMU's vhost-user-blk device does, lays out split virtqueues in memfd
guest memory it maps itself, builds virtio-blk requests as descriptor chains, and can send
arbitrary (malformed) messages and rings for the hostile-input tests in ``tests/reliability``.
"""
