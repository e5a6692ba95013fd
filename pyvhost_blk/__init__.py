"""pyvhost-blk: a virtio-blk vhost-user backend in Python."""

__version__ = "0.1.0"
