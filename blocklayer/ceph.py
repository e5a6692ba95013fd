"""librados and librbd's C API, loaded at run time with cffi (ABI mode) for the rbd driver.

Only what the driver calls is declared, with librbd's own names and signatures (librbd.h,
librados.h of Ceph 16).  The libraries are Debian's ``librados2``/``librbd1``; loading them is
deferred to the first rbd node, so a machine without Ceph still runs every other driver, and a
missing library is one line saying what to install.  The asynchronous read/write/flush calls
are handed to the C engine (vhost/csrc/rbd_engine.c) as function pointers; everything else is
called from Python (blocking calls: at open, resize and close in the main thread, and the rare
requests that do not come in batches from a worker thread).  cffi releases the GIL around each
call.
"""

from __future__ import annotations

import os
from typing import Any

from cffi import FFI

CDEF = """
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);
struct iovec { void *iov_base; size_t iov_len; };

int rados_create(rados_t *cluster, const char *const id);
int rados_conf_read_file(rados_t cluster, const char *path);
int rados_conf_set(rados_t cluster, const char *option, const char *value);
int rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);
int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
void rados_ioctx_destroy(rados_ioctx_t io);
void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace);

int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image,
                       const char *snap_name);
int rbd_close(rbd_image_t image);
int rbd_get_size(rbd_image_t image, uint64_t *size);
int rbd_resize(rbd_image_t image, uint64_t size);
ssize_t rbd_read(rbd_image_t image, uint64_t ofs, size_t len, char *buf);
ssize_t rbd_write(rbd_image_t image, uint64_t ofs, size_t len, const char *buf);
int rbd_discard(rbd_image_t image, uint64_t ofs, uint64_t len);
int rbd_write_zeroes(rbd_image_t image, uint64_t ofs, size_t len, int zero_flags,
                     int op_flags);
int rbd_flush(rbd_image_t image);

int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c);
ssize_t rbd_aio_get_return_value(rbd_completion_t c);
void rbd_aio_release(rbd_completion_t c);
int rbd_aio_readv(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                  rbd_completion_t c);
int rbd_aio_writev(rbd_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                   rbd_completion_t c);
int rbd_aio_flush(rbd_image_t image, rbd_completion_t c);
"""

#: the asynchronous calls the C engine makes (struct pyvu_rbd_fns' fields, in that order)
ENGINE_FUNCTIONS = (("create_completion", "rbd_aio_create_completion"),
                    ("get_return_value", "rbd_aio_get_return_value"),
                    ("release", "rbd_aio_release"), ("readv", "rbd_aio_readv"),
                    ("writev", "rbd_aio_writev"), ("flush", "rbd_aio_flush"))

_loaded: tuple[FFI, Any, Any] | None = None


class CephUnavailable(RuntimeError):
    """librados/librbd cannot be loaded; ``str()`` says what to install."""


def load() -> tuple[FFI, Any, Any]:
    """(ffi, librados, librbd), loaded once.  Any thread."""
    global _loaded
    if _loaded is None:
        ffi = FFI()
        ffi.cdef(CDEF)
        try:
            rados = ffi.dlopen("librados.so.2")
            rbd = ffi.dlopen("librbd.so.1")
        except OSError as e:
            raise CephUnavailable(
                f"driver 'rbd' needs librbd and librados ({e}): install the Debian packages "
                "librbd1 and librados2") from None
        _loaded = (ffi, rados, rbd)
    return _loaded


def check(ret: int, what: str) -> int:
    """``ret`` if it is not a negative errno, else OSError(errno, 'what: strerror')."""
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret
