/*
 * What the C files of vhost/csrc/ share with each other (what they share with Python is
 * vhost/pyvu.h): the structs more than one layer touches, the C handler types of the poller,
 * and the functions one layer calls in another.
 *
 * Theory of operation
 * -------------------
 * The extension is one translation unit: vhost/_build.py pastes libvhost-user.c, vhost/pyvu.h,
 * this header and then the layers in the order of its C_SOURCES list, so every function is
 * static and the files need no #include of each other.  The layers, bottom up:
 *
 *   vhost_device.c      the vhost-user device: struct pyvu_dev, the dispatch lock, message
 *                       reading and validation, ring checks (main thread; ring checks on
 *                       queue threads)
 *   iov.c               iovec helpers Python's request path calls (caller's thread)
 *   blkstate.c          the BlockBackend core: in-flight counts, accounting, drain waiters
 *                       (atomics, any thread)
 *   io_uring.c          the io_uring engine and the ring shared by C and Python requests
 *                       (its AioContext's thread)
 *   linux_aio.c         the Linux AIO engine (its AioContext's thread)
 *   poller.c            each AioContext's epoll set: C handlers served without the GIL,
 *                       tokens for Python (its AioContext's thread)
 *   virtio_blk_queue.c  the per-queue pop loop: virtio-blk parsing and checks of every
 *                       request, the choice C / batch, completions, the batch hand-off,
 *                       Python's side of a queue (the queue's AioContext's thread)
 *
 * Calls go both ways between layers (a kick reaches the queue through the poller, the queue
 * submits to an engine, an engine's completion finishes the queue's request and reports the
 * queue to the poller's caller), hence the declarations below, each under the file that
 * defines it.
 *
 * Licence: GPL-2.0-or-later (linked with libvhost-user).
 */
#ifndef PYVU_INTERNAL_H
#define PYVU_INTERNAL_H

#include <sys/uio.h>
#include <pthread.h>
#include <liburing.h>
#include <linux/aio_abi.h>
#include "libvhost-user.h"

struct pyvu_req;                    /* a popped request (virtio_blk_queue.c) */

/* ---- vhost_device.c ---- */

struct pyvu_dev {
    VuDev vu;
    pthread_rwlock_t lock;
    int eof;            /* the frontend closed the connection */
    int bad_msg;        /* the last message was refused by pyvu_read_msg */
    char why[160];      /* why, for the log */
    void *handle;       /* cffi handle of the Python VuServer connection */
    unsigned gen;       /* bumped by every message: queue threads re-check their rings */
    uint16_t inflight_qsize;    /* queue size of the inflight region the frontend gave */
};

static const char *pyvu_ring_problem(struct pyvu_dev *d, VuVirtq *vq);
static const char *pyvu_next_chain_problem(VuDev *dev, VuVirtq *vq);

/* ---- blkstate.c ---- */

static uint64_t pyvu_now_ns(void);
static void pyvu_kick_waiters(void);
static void pyvu_acct_done_at(struct pyvu_blkstate *b, int kind, uint64_t bytes, uint64_t ns,
                              uint64_t now);
static void pyvu_acct_failed(struct pyvu_blkstate *b, int kind, uint64_t ns);
static void pyvu_acct_invalid(struct pyvu_blkstate *b, int kind);
static int64_t pyvu_blk_in_flight_add(struct pyvu_blkstate *b, int64_t n);

/* ---- poller.c ---- */

/* The types of C handler (struct pyvu_chandler.type). */
#define PYVU_H_KICK       1
#define PYVU_H_URING      2
#define PYVU_H_LAIO       3
#define PYVU_H_RBD        4

struct pyvu_chandler {
    int type;
    void *obj;
};

static void pyvu_emit(uint64_t *out, int *nout, int max, uint64_t token);

/* ---- io_uring.c ---- */

/*
 * An operation that found the submission queue full waits in the ring's backlog (in order)
 * and is prepared as soon as completions make room: a full ring is a transient condition,
 * never an error a guest sees.
 */
struct pyvu_uring_op {
    int op, fd;
    const struct iovec *iov;
    unsigned niov;
    uint64_t offset, user_data;
};

struct pyvu_uring {
    struct io_uring ring;
    int efd;
    unsigned pending;   /* prepared, not yet submitted */
    struct pyvu_uring_op *backlog;
    unsigned nbacklog, backlog_head, backlog_cap;
};

/* A ring's completions for Python requests (user_data with the low bit set) wait here until
 * Python takes them; the arrays grow as needed (however many exports and queues share the
 * context), and if they cannot, completions stay in the kernel's ring for later. */
struct pyvu_ring {
    struct pyvu_uring u;
    struct pyvu_chandler h;
    uint64_t *py_ud;
    int *py_res;
    int npy;
    int pycap;
    int py_reported;
};

static __thread int64_t pyvu_tls_uring_inflight;    /* see io_uring.c */
static int pyvu_uring_submit(struct pyvu_uring *u);
static int pyvu_ring_prep(struct pyvu_ring *ring, struct pyvu_req *r, int op);
static void pyvu_ring_complete(struct pyvu_ring *ring, uint64_t *out, int *nout, int max);

/* ---- linux_aio.c ---- */

#define PYVU_LAIO_BATCH  256

struct pyvu_laio {
    aio_context_t ctx;
    int efd;
    struct pyvu_chandler h;
    struct iocb *pending[PYVU_LAIO_BATCH];
    int npending;
    long inflight;                  /* submitted, not yet reaped */
};

static void pyvu_laio_submit(struct pyvu_laio *l);
static void pyvu_laio_prep(struct pyvu_laio *l, struct pyvu_req *r, int is_write);
static void pyvu_laio_complete(struct pyvu_laio *l, uint64_t *out, int *nout, int max);

/* ---- rbd_engine.c ---- */

/* struct pyvu_rbd_fns (librbd's entry points): vhost/pyvu.h */

struct pyvu_rbd {
    struct pyvu_chandler h;
    int efd;
    void *image;                    /* rbd_image_t */
    struct pyvu_rbd_fns f;
    int64_t inflight;
    pthread_mutex_t lock;           /* done/res/ndone/cap: filled by librbd's threads */
    struct pyvu_req **done;
    long *res;
    int ndone, cap;
};

static void pyvu_rbd_complete(struct pyvu_rbd *e, uint64_t *out, int *nout, int max);

/* ---- virtio_blk_queue.c ---- */

/* The bound of each of a queue's lists (slow, failed, done, batch). */
#define PYVU_QMAX         1024

struct pyvu_fastq {
    struct pyvu_dev *pdev;
    int qidx;
    struct pyvu_blkstate *blk;
    struct pyvu_ring *ring;         /* this context's ring, if the file driver uses io_uring */
    struct pyvu_laio *laio;         /* this context's Linux AIO context */
    struct pyvu_chandler h;
    int kick_fd;
    int paused;
    int64_t in_flight;              /* popped, not yet pushed (both paths) */
    uint64_t requests;
    uint64_t kicks;
    int py_reported;                /* a token for this queue is with Python */
    unsigned checked_gen;           /* pdev->gen when the rings were last checked */
    VuVirtqElement *slow[PYVU_QMAX];
    int nslow;
    struct pyvu_req *failed[PYVU_QMAX];
    int nfailed;
    struct pyvu_req *done[PYVU_QMAX];
    int ndone;
    struct pyvu_req *batch[PYVU_QMAX];  /* parsed requests waiting for Python's node graph */
    int nbatch;
    struct pyvu_fastq *touched_next;    /* on a completion handler's list of queues to flush */
    int touched;
};

struct pyvu_req {
    VuVirtqElement elem;            /* first: Python sees a VuVirtqElement * */
    struct pyvu_fastq *q;
    uint8_t *status;
    uint32_t in_len;
    int type;
    int kind;                       /* accounting kind */
    int fua;                        /* a write that must be followed by an fsync */
    int batched;                    /* served through Python's batch path */
    int flags;                      /* for the batch: BDRV_REQ_MAY_UNMAP, PYVU_BATCH_EACH */
    int fd;                         /* the file a C engine reads or writes */
    int err;                        /* -errno when handed to Python as failed */
    uint64_t offset;
    uint64_t bytes;
    uint64_t start_ns;
    struct iovec *iov;
    unsigned niov;
    struct iovec *own_iov;          /* malloc'd data iovecs (a write's header shares a buffer
                                     * with its data); freed when C lets go of the request */
    struct iocb cb;                 /* DRV_FILE_LAIO */
    struct pyvu_rbd *rbd;           /* the librbd engine serving it (rbd_engine.c) */
};

static int pyvu_fast_start(struct pyvu_fastq *q, struct pyvu_req *r, int each);

/* A read, write or flush: what a C engine can take from a batch (pyvu_fastq_submit*); the
 * other types (discard, write-zeroes) are the node graph's. */
static inline int pyvu_req_is_io(const struct pyvu_req *r)
{
    return r->type == VIRTIO_BLK_T_IN || r->type == VIRTIO_BLK_T_OUT ||
           r->type == VIRTIO_BLK_T_FLUSH;
}
static void pyvu_touch(struct pyvu_fastq *q, struct pyvu_fastq **head);
static void pyvu_fastq_flush(struct pyvu_fastq *q);
static void pyvu_fast_fail(struct pyvu_req *r, int err);
static void pyvu_fast_cqe(struct pyvu_req *r, int res);
static void pyvu_fastq_process(struct pyvu_fastq *q);
static int pyvu_fastq_process_some(struct pyvu_fastq *q, int chunks);
static int pyvu_fastq_pop_limit(struct pyvu_fastq *q);
static int pyvu_fastq_needs_python(struct pyvu_fastq *q);
static void pyvu_report_queue(struct pyvu_fastq *q, uint64_t *out, int *nout, int max);

#endif
