"""cffi builder for ``vhost._vhost_user``: libvhost-user + our C glue, compiled at install time.

Declarations live here and nowhere else; the Pythonic side is ``vhost/ffi.py`` and up.
libvhost-user's structs are declared with a trailing ``...;`` so their layout comes from the
compiler, not from us.  What C shares with Python (constants, ``struct pyvu_blkstate``) is
``vhost/pyvu.h``, whose declarations are derived from it (``shared_cdef``).  The C itself lives
in ``vhost/csrc/``, one file per layer, pasted in the order of ``C_SOURCES``.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

sys.path.insert(0, os.path.dirname(__file__))
from libvhost_user_source import SourceUnavailable, qemu_source_tree  # noqa: E402

CDEF = r"""
struct iovec { void *iov_base; size_t iov_len; };

/* From libvhost-user.h and csrc/vhost_device.c; cffi reads their values from the compiled
 * source. */
#define VHOST_USER_HDR_SIZE ...
#define VHOST_USER_MAX_CONFIG_SIZE ...
#define PYVU_MSG_PAYLOAD_MAX ...

typedef struct VhostUserMsg {
    uint32_t request;
    uint32_t flags;
    uint32_t size;
    int fds[8];
    int fd_num;
    ...;
} VhostUserMsg;

typedef struct VuRing { unsigned int num; ...; } VuRing;

typedef struct VuVirtq {
    VuRing vring;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    unsigned int inuse;
    int call_fd;
    int kick_fd;
    unsigned int enable;
    bool started;
    ...;
} VuVirtq;

typedef struct VuDev {
    int sock;
    uint32_t nregions;
    VuVirtq *vq;
    uint64_t features;
    uint64_t protocol_features;
    int backend_fd;
    bool broken;
    uint16_t max_queues;
    ...;
} VuDev;

typedef struct VuVirtqElement {
    unsigned int index;
    unsigned int out_num;
    unsigned int in_num;
    struct iovec *in_sg;
    struct iovec *out_sg;
} VuVirtqElement;

typedef uint64_t (*vu_get_features_cb) (VuDev *dev);
typedef void (*vu_set_features_cb) (VuDev *dev, uint64_t features);
typedef int (*vu_process_msg_cb) (VuDev *dev, VhostUserMsg *vmsg, int *do_reply);
typedef bool (*vu_read_msg_cb) (VuDev *dev, int sock, VhostUserMsg *vmsg);
typedef void (*vu_queue_set_started_cb) (VuDev *dev, int qidx, bool started);
typedef bool (*vu_queue_is_processed_in_order_cb) (VuDev *dev, int qidx);
typedef int (*vu_get_config_cb) (VuDev *dev, uint8_t *config, uint32_t len);
typedef int (*vu_set_config_cb) (VuDev *dev, const uint8_t *data, uint32_t offset,
                                 uint32_t size, uint32_t flags);
typedef void (*vu_panic_cb) (VuDev *dev, const char *err);
typedef void (*vu_watch_cb) (VuDev *dev, int condition, void *data);
typedef void (*vu_set_watch_cb) (VuDev *dev, int fd, int condition, vu_watch_cb cb, void *data);
typedef void (*vu_remove_watch_cb) (VuDev *dev, int fd);

typedef struct VuDevIface {
    vu_get_features_cb get_features;
    vu_set_features_cb set_features;
    vu_get_features_cb get_protocol_features;
    vu_set_features_cb set_protocol_features;
    vu_process_msg_cb process_msg;
    vu_queue_set_started_cb queue_set_started;
    vu_queue_is_processed_in_order_cb queue_is_processed_in_order;
    vu_get_config_cb get_config;
    vu_set_config_cb set_config;
    ...;
} VuDevIface;

bool vu_init(VuDev *dev, uint16_t max_queues, int socket, vu_panic_cb panic,
             vu_read_msg_cb read_msg, vu_set_watch_cb set_watch,
             vu_remove_watch_cb remove_watch, const VuDevIface *iface);
void vu_deinit(VuDev *dev);
bool vu_dispatch(VuDev *dev);
const char *vu_request_to_string(unsigned int req);
void *vu_queue_pop(VuDev *dev, VuVirtq *vq, size_t sz);
void vu_queue_push(VuDev *dev, VuVirtq *vq, const VuVirtqElement *elem, unsigned int len);
void vu_queue_fill(VuDev *dev, VuVirtq *vq, const VuVirtqElement *elem, unsigned int len,
                   unsigned int idx);
void vu_queue_flush(VuDev *dev, VuVirtq *vq, unsigned int num);
void vu_queue_notify(VuDev *dev, VuVirtq *vq);
void vu_queue_set_notification(VuDev *dev, VuVirtq *vq, int enable);
bool vu_queue_enabled(VuDev *dev, VuVirtq *vq);
bool vu_queue_started(const VuDev *dev, const VuVirtq *vq);
bool vu_queue_empty(VuDev *dev, VuVirtq *vq);
void vu_config_change_msg(VuDev *dev);

void free(void *ptr);
int fallocate(int fd, int mode, long offset, long len);

/* csrc/vhost_device.c */
struct pyvu_dev {
    VuDev vu;
    int eof;
    int bad_msg;
    char why[160];
    void *handle;
    ...;
};
int pyvu_dev_init(struct pyvu_dev *d);
void pyvu_dev_destroy(struct pyvu_dev *d);
void *pyvu_handle(VuDev *dev);
int pyvu_rdlock(struct pyvu_dev *d);
int pyvu_wrlock(struct pyvu_dev *d);
int pyvu_unlock(struct pyvu_dev *d);
bool pyvu_read_msg(VuDev *dev, int sock, VhostUserMsg *vmsg);
int pyvu_process_msg(VuDev *dev, VhostUserMsg *vmsg, int *do_reply);
void pyvu_set_x_no_dirty_log(int on);
VuVirtq *pyvu_queue(VuDev *dev, int qidx);
int pyvu_vring_state(struct pyvu_dev *d, int qidx, struct pyvu_vring_state *s);

/* csrc/iov.c */
int pyvu_iov_slice(const struct iovec *src, unsigned n, size_t skip, size_t trim,
                   struct iovec *dst, uint64_t *size_out);
size_t pyvu_iov_to_buf(const struct iovec *iov, unsigned n, void *buf, size_t len);
size_t pyvu_iov_from_buf(const struct iovec *iov, unsigned n, const void *buf, size_t len);
void pyvu_iov_memset(const struct iovec *iov, unsigned n, size_t start, int byte);
int pyvu_iov_is_zero(const struct iovec *iov, unsigned n);

/* csrc/io_uring.c */
struct pyvu_uring { int efd; ...; };
int pyvu_uring_init(struct pyvu_uring *u, unsigned entries, int efd);
void pyvu_uring_exit(struct pyvu_uring *u);
int pyvu_uring_submit(struct pyvu_uring *u);
int pyvu_uring_prep(struct pyvu_uring *u, int op, int fd, const struct iovec *iov,
                    unsigned niov, uint64_t offset, uint64_t user_data);
int pyvu_uring_reap(struct pyvu_uring *u, uint64_t *user_data, int *res, int max);

/* csrc/blkstate.c */
void pyvu_blk_init(struct pyvu_blkstate *b);
void pyvu_acct_done(struct pyvu_blkstate *b, int kind, uint64_t bytes, uint64_t ns);
void pyvu_acct_failed(struct pyvu_blkstate *b, int kind, uint64_t ns);
void pyvu_acct_invalid(struct pyvu_blkstate *b, int kind);
int64_t pyvu_blk_in_flight_add(struct pyvu_blkstate *b, int64_t n);
uint64_t pyvu_now_ns(void);
void pyvu_set_wait_efd(int fd);
void pyvu_set_waiters(int n);

/* csrc/poller.c */
struct pyvu_chandler { int type; void *obj; };
struct pyvu_poller {
    int epfd;
    uint64_t poll_ns;
    uint64_t cur_poll_ns;
    uint64_t polls, poll_hits, poll_misses;
    uint64_t poll_spin_ns;
    uint64_t poll_grows, poll_shrinks;
    int mode;
    ...;
};
int pyvu_poller_init(struct pyvu_poller *p);
void pyvu_poller_close(struct pyvu_poller *p);
int pyvu_poller_add_py(struct pyvu_poller *p, int fd);
int pyvu_poller_add_py_events(struct pyvu_poller *p, int fd, uint32_t events);
int pyvu_poller_mod_py(struct pyvu_poller *p, int fd, uint32_t events);
int pyvu_poller_add_c(struct pyvu_poller *p, int fd, struct pyvu_chandler *h);
int pyvu_poller_del(struct pyvu_poller *p, int fd);
int pyvu_poller_wait(struct pyvu_poller *p, int timeout_ms, uint64_t *out, int max);

/* csrc/io_uring.c */
struct pyvu_ring { struct pyvu_uring u; struct pyvu_chandler h; int npy; ...; };
int pyvu_ring_init(struct pyvu_ring *ring, unsigned entries, int efd);
int pyvu_ring_take_py(struct pyvu_ring *ring, uint64_t *ud, int *res, int max);

/* csrc/linux_aio.c */
struct pyvu_laio { int efd; struct pyvu_chandler h; ...; };
int pyvu_laio_init(struct pyvu_laio *l, int efd, unsigned nr_events);

/* csrc/virtio_blk_queue.c */
struct pyvu_fastq {
    struct pyvu_ring *ring;
    struct pyvu_laio *laio;
    struct pyvu_chandler h;
    int kick_fd;
    int paused;
    int64_t in_flight;
    uint64_t requests;
    uint64_t kicks;
    int nslow;
    int nfailed;
    int nbatch;
    int ndone;          /* completed, not yet pushed (x-pyvhost-stats' x-debug) */
    int py_reported;
    ...;
};
void pyvu_fastq_init(struct pyvu_fastq *q, struct pyvu_dev *d, int qidx,
                     struct pyvu_blkstate *b);
void pyvu_fastq_process(struct pyvu_fastq *q);
int pyvu_fastq_take_slow(struct pyvu_fastq *q, VuVirtqElement **out, int max);
int pyvu_fastq_take_failed(struct pyvu_fastq *q, VuVirtqElement **out, int *err, int *type,
                           int max);
void pyvu_fastq_reported_done(struct pyvu_fastq *q);
int pyvu_fastq_take_batch(struct pyvu_fastq *q, void **handles, int *type, int *flags,
                          uint64_t *offset, uint64_t *bytes, struct iovec **iov, unsigned *niov,
                          int *ret, int *special, int max);
int pyvu_fastq_batch_done(struct pyvu_fastq *q, void **handles, int *ret, int n);
void pyvu_fastq_req_done(struct pyvu_fastq *q, void *handle, int ret);
void pyvu_fastq_flush(struct pyvu_fastq *q);
int pyvu_fastq_submit(struct pyvu_fastq *q, int fd, int laio, void **handles, uint64_t *offset,
                      int *ret, int n);
void pyvu_fastq_python_done(struct pyvu_fastq *q, int n);
void pyvu_fastq_resubmit(struct pyvu_fastq *q, VuVirtqElement *e, int each);
void pyvu_fastq_fail_done(struct pyvu_fastq *q, VuVirtqElement *e, int status);

/* csrc/rbd_engine.c */
struct pyvu_rbd { struct pyvu_chandler h; int efd; int64_t inflight; ...; };
int pyvu_rbd_init(struct pyvu_rbd *e, int efd, void *image, const struct pyvu_rbd_fns *f);
void pyvu_rbd_destroy(struct pyvu_rbd *e);
int pyvu_fastq_submit_rbd(struct pyvu_fastq *q, struct pyvu_rbd *e, void **handles,
                          uint64_t *offset, int *ret, int n);

extern "Python" uint64_t pyvu_cb_get_features(VuDev *);
extern "Python" void pyvu_cb_set_features(VuDev *, uint64_t);
extern "Python" uint64_t pyvu_cb_get_protocol_features(VuDev *);
extern "Python" void pyvu_cb_set_protocol_features(VuDev *, uint64_t);
extern "Python" void pyvu_cb_queue_set_started(VuDev *, int, bool);
extern "Python" int pyvu_cb_get_config(VuDev *, uint8_t *, uint32_t);
extern "Python" int pyvu_cb_set_config(VuDev *, const uint8_t *, uint32_t, uint32_t, uint32_t);
extern "Python" void pyvu_cb_panic(VuDev *, const char *);
extern "Python" void pyvu_cb_set_watch(VuDev *, int, int, vu_watch_cb, void *);
extern "Python" void pyvu_cb_remove_watch(VuDev *, int);
"""


HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_HEADER = os.path.join(HERE, "pyvu.h")
CSRC = os.path.join(HERE, "csrc")

#: The C glue (vhost/csrc/), pasted in this order after vhost/pyvu.h into the one translation
#: unit that also holds libvhost-user.c: the internal header (the structs and functions the
#: layers share), then the layers bottom up.  Every function is static; the header's
#: declarations make the order free, this order only keeps the generated source readable.
C_SOURCES = (
    "pyvu_internal.h",      # what the layers share with each other (pyvu.h: with Python)
    "vhost_device.c",       # vhost-user: struct pyvu_dev, dispatch lock, message validation
    "iov.c",                # iovec helpers of Python's request path
    "blkstate.c",           # BlockBackend core: in-flight counts, accounting, drain waiters
    "io_uring.c",           # io_uring engine, the ring shared by C and Python requests
    "linux_aio.c",          # Linux AIO engine (aio=native)
    "poller.c",             # an AioContext's epoll set, C handlers, tokens for Python
    "virtio_blk_queue.c",   # the per-queue pop loop, parsing, batch hand-off, Python's side
    "rbd_engine.c",         # librbd engine: batched requests straight to librbd's aio calls
)


def shared_cdef(header: str) -> str:
    """The cffi declarations of vhost/pyvu.h: the header less its preprocessor lines other
    than #define (include guards, #include), which cffi does not read."""
    keep = []
    for line in header.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("#") and not stripped.startswith("#define"):
            continue
        if stripped.startswith("#define PYVU_H"):
            continue  # the include guard
        keep.append(line)
    return "\n".join(keep) + "\n"


def make_ffi() -> FFI:
    """Return the FFI builder (used by setuptools' ``cffi_modules``)."""
    try:
        root = qemu_source_tree()
    except SourceUnavailable as e:
        sys.stderr.write(f"\nERROR: {e}\n\n")
        raise SystemExit(1) from None
    lvu = root / "subprojects" / "libvhost-user"
    with open(SHARED_HEADER, encoding="utf-8") as f:
        header = f.read()
    glue = header + "\n"
    for name in C_SOURCES:
        with open(os.path.join(CSRC, name), encoding="utf-8") as f:
            glue += f"/* ---- vhost/csrc/{name} ---- */\n" + f.read() + "\n"
    ffibuilder = FFI()
    ffibuilder.cdef(shared_cdef(header) + CDEF)
    ffibuilder.set_source(
        "vhost._vhost_user",
        # libvhost-user.c is compiled in the same translation unit (setuptools refuses
        # absolute paths in ``sources``, and the file lives in the cache, not the tree).
        '#include <sys/uio.h>\n#include "libvhost-user.c"\n' + glue,
        include_dirs=[str(lvu), str(root / "include"), str(root)],
        define_macros=[("_GNU_SOURCE", None)],
        extra_compile_args=["-O2", "-Wno-unused-function", "-Wno-sign-compare"],
        libraries=["uring", "pthread"],
    )
    return ffibuilder


if __name__ == "__main__":
    make_ffi().compile(verbose=True)
