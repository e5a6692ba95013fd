/*
 * The per-request path in C: event poller, shared BlockBackend state, virtqueue processing.
 *
 * Theory of operation
 * -------------------
 * Every AioContext waits in pyvu_poller_wait() (GIL released).  The epoll set holds two kinds of
 * entries: Python fds (reported back to Python as their fd number) and C handlers (a kick
 * eventfd of a queue, or an io_uring completion eventfd), which are served right here without
 * the GIL: pop every available request, decide per request whether C can serve it, submit or
 * complete it, push the completions with one notification per batch.
 *
 * The per-request choice is made from flags Python sets in struct pyvu_blkstate (one per
 * BlockBackend, the single source of truth for in-flight counts and accounting):
 *   - C ("fast") path: IN/OUT/FLUSH on a null-co node, or on a file node served by io_uring in
 *     this context, with no reason for Python to look (slow == 0, force_slow == 0);
 *   - batch path: every other well-formed IN/OUT/FLUSH (a node only Python can serve, a filter
 *     in the graph, the C path switched off).  C parses and checks it and queues it on the
 *     queue's batch list; Python takes the list as plain values (blocklayer/batch.py), the node
 *     graph serves it — a driver may hand leaf I/O straight back to this file's engines
 *     (pyvu_fastq_submit) — and C accounts, completes and pushes each request;
 *   - Python handler: anything else (other request types, malformed or misaligned requests, no
 *     medium).  Such elements go to the queue's slow list and the poller reports the queue to
 *     Python, which runs virtio/blk_handler.py on them.
 * A request that *fails* on the fast path is handed to Python as well (the failed list), so the
 * error policy (rerror/werror, stop and retry) lives in one place.
 *
 * Both paths count in the same counters: blk->in_flight (BlockBackend in-flight),
 * q->in_flight (popped, not pushed) and the accounting arrays.  When a counter drops to zero
 * and Python waits for a drain (pyvu_waiters), pyvu_wait_efd is signalled, which wakes the main
 * loop to re-check its aio_wait conditions.  Python pauses a queue by setting q->paused and then
 * taking the dispatch lock exclusively once, so no pop loop is running after that.
 *
 * Threads: a queue and its io_uring are only touched by their AioContext's thread; the
 * blkstate's counters are atomics shared by all queues and the Python side.
 */

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <linux/aio_abi.h>
#include <time.h>

#define PYVU_H_KICK       1
#define PYVU_H_URING      2
#define PYVU_H_LAIO       3
#define PYVU_QMAX         1024



static int pyvu_wait_efd = -1;
static int pyvu_waiters;        /* > 0 while Python waits for some counter to drop */

static void pyvu_set_wait_efd(int fd) { pyvu_wait_efd = fd; }
static void pyvu_set_waiters(int n) { __atomic_store_n(&pyvu_waiters, n, __ATOMIC_SEQ_CST); }

static void pyvu_kick_waiters(void)
{
    if (__atomic_load_n(&pyvu_waiters, __ATOMIC_SEQ_CST) && pyvu_wait_efd >= 0) {
        eventfd_write(pyvu_wait_efd, 1);
    }
}

static uint64_t pyvu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* ---- shared BlockBackend state (struct pyvu_blkstate: vhost/pyvu.h) ---- */

static void pyvu_blk_init(struct pyvu_blkstate *b)
{
    static const uint64_t bounds[PYVU_NBOUNDS] = {
        10000, 100000, 1000000, 10000000, 100000000, 1000000000,
    };
    memset(b, 0, sizeof(*b));
    memcpy(b->boundaries, bounds, sizeof(bounds));
    b->nbounds = PYVU_NBOUNDS;
    b->length = -1;
    b->wce = 1;
    b->lbs = 512;
    b->fd = -1;
    b->last_access_ns = pyvu_now_ns();
}

static int pyvu_bin(struct pyvu_blkstate *b, uint64_t ns)
{
    int i = 0;
    while (i < b->nbounds && ns >= b->boundaries[i]) {
        i++;
    }
    return i;
}

/* One completed request of ``kind`` that took ``ns``, finished at ``now``. */
static void pyvu_acct_done_at(struct pyvu_blkstate *b, int kind, uint64_t bytes, uint64_t ns,
                              uint64_t now)
{
    __atomic_fetch_add(&b->nr_ops[kind], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&b->nr_bytes[kind], bytes, __ATOMIC_RELAXED);
    __atomic_fetch_add(&b->total_time_ns[kind], ns, __ATOMIC_RELAXED);
    __atomic_fetch_add(&b->bins[kind][pyvu_bin(b, ns)], 1, __ATOMIC_RELAXED);
    __atomic_store_n(&b->last_access_ns, now, __ATOMIC_RELAXED);
}

static void pyvu_acct_done(struct pyvu_blkstate *b, int kind, uint64_t bytes, uint64_t ns)
{
    pyvu_acct_done_at(b, kind, bytes, ns, pyvu_now_ns());
}

static void pyvu_acct_failed(struct pyvu_blkstate *b, int kind, uint64_t ns)
{
    __atomic_fetch_add(&b->failed_ops[kind], 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&b->total_time_ns[kind], ns, __ATOMIC_RELAXED);
    __atomic_fetch_add(&b->bins[kind][pyvu_bin(b, ns)], 1, __ATOMIC_RELAXED);
    __atomic_store_n(&b->last_access_ns, pyvu_now_ns(), __ATOMIC_RELAXED);
}

static void pyvu_acct_invalid(struct pyvu_blkstate *b, int kind)
{
    __atomic_fetch_add(&b->invalid_ops[kind], 1, __ATOMIC_RELAXED);
    __atomic_store_n(&b->last_access_ns, pyvu_now_ns(), __ATOMIC_RELAXED);
}

static int64_t pyvu_blk_in_flight_add(struct pyvu_blkstate *b, int64_t n)
{
    int64_t v = __atomic_add_fetch(&b->in_flight, n, __ATOMIC_SEQ_CST);
    if (v == 0) {
        pyvu_kick_waiters();
    }
    return v;
}

/* ---- poller ---- */

struct pyvu_chandler {
    int type;
    void *obj;
};

/*
 * Adaptive polling, as QEMU's AioContexts do it (iothread ``poll-max-ns``): before sleeping,
 * keep checking the epoll set without blocking for up to cur_poll_ns.  A frontend's next kick
 * then costs no wake-up (on an idle 2-core machine a wake-up costs ~20 us, more than a whole
 * batch of requests).  The window adapts like QEMU's: a sleep that ended sooner than
 * poll_ns (the maximum) grows it, one that lasted longer shrinks it, so an idle context sleeps
 * at once and never spins.
 */
#define PYVU_POLL_GROW_START 4000ull

struct pyvu_poller {
    int epfd;
    uint64_t poll_ns;           /* maximum window; 0: never poll */
    uint64_t cur_poll_ns;       /* current adaptive window */
    uint64_t polls, poll_hits;  /* statistics */
};

static int pyvu_poller_init(struct pyvu_poller *p)
{
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->poll_ns = 0;
    p->cur_poll_ns = 0;
    p->polls = p->poll_hits = 0;
    return p->epfd < 0 ? -errno : 0;
}

static void pyvu_poller_adjust(struct pyvu_poller *p, uint64_t block_ns)
{
    if (block_ns <= p->cur_poll_ns) {
        return;                                   /* the sweet spot */
    }
    if (block_ns > p->poll_ns) {
        p->cur_poll_ns /= 2;                      /* would poll too long: poll less */
        if (p->cur_poll_ns < PYVU_POLL_GROW_START) {
            p->cur_poll_ns = 0;
        }
    } else if (p->cur_poll_ns < p->poll_ns) {
        p->cur_poll_ns = p->cur_poll_ns ? p->cur_poll_ns * 2 : PYVU_POLL_GROW_START;
        if (p->cur_poll_ns > p->poll_ns) {
            p->cur_poll_ns = p->poll_ns;
        }
    }
}

static void pyvu_poller_close(struct pyvu_poller *p)
{
    if (p->epfd >= 0) {
        close(p->epfd);
        p->epfd = -1;
    }
}

static int pyvu_poller_add_py(struct pyvu_poller *p, int fd)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint64_t)(unsigned)fd };
    return epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

/*
 * An epoll entry's data is a Python fd (a small number) or a C handler tagged with
 * PYVU_EP_CHANDLER.  The tag, not the value's size, tells them apart: with a non-PIE Python
 * (Debian's /usr/bin/python3) the heap, and so a handler, can sit below 4 GiB.
 */
#define PYVU_EP_CHANDLER  (1ULL << 63)

static int pyvu_poller_add_c(struct pyvu_poller *p, int fd, struct pyvu_chandler *h)
{
    struct epoll_event ev = { .events = EPOLLIN,
                              .data.u64 = PYVU_EP_CHANDLER | (uint64_t)(uintptr_t)h };
    return epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

static int pyvu_poller_del(struct pyvu_poller *p, int fd)
{
    return epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, NULL) < 0 ? -errno : 0;
}

/* ---- io_uring completions shared by C and Python requests ---- */

/* A ring's completions for Python requests (user_data with the low bit set) wait here until
 * Python takes them; the arrays grow as needed (however many exports and queues share the
 * context), and if they cannot, completions stay in the kernel's ring for later. */
#define PYVU_PYCQE_INIT 1024

struct pyvu_ring {
    struct pyvu_uring u;
    struct pyvu_chandler h;
    uint64_t *py_ud;
    int *py_res;
    int npy;
    int pycap;
    int py_reported;
};

/* ---- Linux AIO (aio=native), one context per AioContext ---- */

#define PYVU_LAIO_EVENTS 4096
#define PYVU_LAIO_BATCH  256

struct pyvu_laio {
    aio_context_t ctx;
    int efd;
    struct pyvu_chandler h;
    struct iocb *pending[PYVU_LAIO_BATCH];
    int npending;
    long inflight;                  /* submitted, not yet reaped */
};

/*
 * The completion ring the kernel maps at the aio context's address (fs/aio.c's struct
 * aio_ring).  Completions are read from it directly, as QEMU's linux-aio does, instead of one
 * io_getevents() system call per batch.
 */
struct pyvu_aio_ring {
    unsigned id, nr, head, tail;
    unsigned magic, compat_features, incompat_features, header_length;
    struct io_event io_events[];
};
#define PYVU_AIO_RING_MAGIC 0xa10a10a1

/* Up to max completions; the kernel's ring when it has the layout we know, else the syscall. */
static long pyvu_laio_getevents(struct pyvu_laio *l, struct io_event *out, long max)
{
    struct pyvu_aio_ring *ring = (struct pyvu_aio_ring *)(uintptr_t)l->ctx;
    struct timespec zero = { 0, 0 };
    unsigned head, tail;
    long n = 0;

    if (ring->magic != PYVU_AIO_RING_MAGIC || ring->incompat_features) {
        return syscall(SYS_io_getevents, l->ctx, 0L, max, out, &zero);
    }
    head = ring->head;
    tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);  /* events before tail are written */
    while (head != tail && n < max) {
        out[n++] = ring->io_events[head];
        head = head + 1 == ring->nr ? 0 : head + 1;
    }
    __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
    return n;
}

static int pyvu_laio_init(struct pyvu_laio *l, int efd, unsigned nr_events)
{
    memset(l, 0, sizeof(*l));
    l->efd = efd;
    l->h.type = PYVU_H_LAIO;
    l->h.obj = l;
    if (syscall(SYS_io_setup, nr_events ? nr_events : PYVU_LAIO_EVENTS, &l->ctx) < 0) {
        return -errno;
    }
    return 0;
}

/* ---- queues ---- */

struct pyvu_req;

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

/* Put q on a list of queues that got completions (each once; no bound on their number). */
static void pyvu_touch(struct pyvu_fastq *q, struct pyvu_fastq **head)
{
    if (!q->touched) {
        q->touched = 1;
        q->touched_next = *head;
        *head = q;
    }
}

struct pyvu_req {
    VuVirtqElement elem;            /* first: Python sees a VuVirtqElement * */
    struct pyvu_fastq *q;
    uint8_t *status;
    uint32_t in_len;
    int type;
    int kind;                       /* accounting kind */
    int fua;                        /* a write that must be followed by an fsync */
    int batched;                    /* served through Python's batch path */
    int fd;                         /* the file a C engine reads or writes */
    int err;                        /* -errno when handed to Python as failed */
    uint64_t offset;
    uint64_t bytes;
    uint64_t start_ns;
    struct iovec *iov;
    unsigned niov;
    struct iocb cb;                 /* DRV_FILE_LAIO */
};

static int64_t pyvu_q_in_flight_add(struct pyvu_fastq *q, int64_t n)
{
    int64_t v = __atomic_add_fetch(&q->in_flight, n, __ATOMIC_SEQ_CST);
    if (v == 0) {
        pyvu_kick_waiters();
    }
    return v;
}

static void pyvu_req_complete(struct pyvu_req *r, uint8_t status)
{
    struct pyvu_fastq *q = r->q;
    *r->status = status;
    q->done[q->ndone++] = r;
}

/* Push completed requests (dispatch lock held shared). */
static void pyvu_fastq_flush_locked(struct pyvu_fastq *q)
{
    VuDev *dev = &q->pdev->vu;
    VuVirtq *vq = &dev->vq[q->qidx];
    int n = q->ndone;
    if (!n) {
        return;
    }
    for (int i = 0; i < n; i++) {
        struct pyvu_req *r = q->done[i];
        vu_queue_push(dev, vq, &r->elem, r->in_len);
        free(r);
    }
    q->ndone = 0;
    vu_queue_notify(dev, vq);
    pyvu_q_in_flight_add(q, -n);
}

static void pyvu_fastq_flush(struct pyvu_fastq *q)
{
    if (q->ndone) {
        pthread_rwlock_rdlock(&q->pdev->lock);
        pyvu_fastq_flush_locked(q);
        pthread_rwlock_unlock(&q->pdev->lock);
    }
}

static int pyvu_ring_prep(struct pyvu_ring *ring, struct pyvu_req *r, int op)
{
    return pyvu_uring_prep(&ring->u, op, r->fd, r->iov, r->niov, r->offset,
                           (uint64_t)(uintptr_t)r);
}

/*
 * Hand a C request to Python: failed with -errno (Python's error policy decides what the
 * guest sees), or -EAGAIN: not an error, Python serves it again from the start (and counts it
 * then, so a request is counted exactly once).
 */
static void pyvu_fast_fail(struct pyvu_req *r, int err)
{
    struct pyvu_fastq *q = r->q;
    if (err != -EAGAIN) {
        pyvu_acct_failed(q->blk, r->kind, pyvu_now_ns() - r->start_ns);
    }
    pyvu_blk_in_flight_add(q->blk, -1);
    r->err = err;
    q->failed[q->nfailed++] = r;
}

static void pyvu_fast_ok(struct pyvu_req *r)
{
    struct pyvu_fastq *q = r->q;
    uint64_t now = pyvu_now_ns();   /* one clock read per request: latency and idle time */
    pyvu_acct_done_at(q->blk, r->kind, r->bytes, now - r->start_ns, now);
    __atomic_fetch_add(r->batched ? &q->blk->batch_ops : &q->blk->fast_ops, 1, __ATOMIC_RELAXED);
    pyvu_blk_in_flight_add(q->blk, -1);
    pyvu_req_complete(r, VIRTIO_BLK_S_OK);
}

/*
 * Submit the pending iocbs.  io_submit takes a prefix of them; when it takes none it reports
 * why for the first one: EAGAIN (no room in the context: those wait for the next completions,
 * or for Python if nothing is in flight to complete) or an error of that iocb alone, which
 * fails that request only (through Python's error policy) and the rest go on.
 */
static void pyvu_laio_submit(struct pyvu_laio *l)
{
    int done = 0;
    while (done < l->npending) {
        long n = syscall(SYS_io_submit, l->ctx, (long)(l->npending - done), l->pending + done);
        if (n > 0) {
            done += n;
            l->inflight += n;
            continue;
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n == 0 || errno == EAGAIN) {
            if (l->inflight > 0) {
                break;              /* kept: retried when completions come */
            }
            for (int i = done; i < l->npending; i++) {   /* nothing will complete: Python */
                struct pyvu_req *r = (struct pyvu_req *)(uintptr_t)l->pending[i]->aio_data;
                pyvu_fast_fail(r, -EAGAIN);
            }
            done = l->npending;
            break;
        }
        struct pyvu_req *r = (struct pyvu_req *)(uintptr_t)l->pending[done]->aio_data;
        pyvu_fast_fail(r, -errno);
        done++;
    }
    memmove(l->pending, l->pending + done, (l->npending - done) * sizeof(l->pending[0]));
    l->npending -= done;
}

static void pyvu_laio_prep(struct pyvu_laio *l, struct pyvu_req *r, int is_write)
{
    struct iocb *cb = &r->cb;
    memset(cb, 0, sizeof(*cb));
    cb->aio_data = (uint64_t)(uintptr_t)r;
    cb->aio_lio_opcode = is_write ? IOCB_CMD_PWRITEV : IOCB_CMD_PREADV;
    cb->aio_fildes = r->fd;
    cb->aio_buf = (uint64_t)(uintptr_t)r->iov;
    cb->aio_nbytes = r->niov;
    cb->aio_offset = r->offset;
    cb->aio_flags = IOCB_FLAG_RESFD;
    cb->aio_resfd = l->efd;
    if (l->npending == PYVU_LAIO_BATCH) {
        pyvu_laio_submit(l);
    }
    if (l->npending == PYVU_LAIO_BATCH) {   /* the kernel takes no more now: Python redoes it */
        pyvu_fast_fail(r, -EAGAIN);
        return;
    }
    l->pending[l->npending++] = cb;
}

/*
 * A read's data iovecs exclude the status byte: the last input iovec is dropped (if it is the
 * status byte alone) or shortened by one.  Before Python sees the element again, give the
 * byte back.  Every path that hands a parsed read to Python calls this.
 */
static void pyvu_req_undo_status(struct pyvu_req *r, VuVirtqElement *e)
{
    if (r->type == VIRTIO_BLK_T_IN && e->in_num && r->niov == e->in_num) {
        e->in_sg[e->in_num - 1].iov_len++;
    }
}

/* The C engines can serve the root node in this queue's context, end to end. */
static int pyvu_c_serves(struct pyvu_fastq *q, struct pyvu_blkstate *b)
{
    if (b->force_slow) {
        return 0;
    }
    switch (b->driver) {
    case DRV_NULL:
        return 1;
    case DRV_FILE:
        return q->ring != NULL;
    case DRV_FILE_LAIO:
        return q->laio != NULL && q->ring != NULL;
    default:
        return 0;
    }
}

/* Queue a parsed, checked request for Python's node graph (blocklayer/batch.py). */
static void pyvu_batch_add(struct pyvu_fastq *q, struct pyvu_req *r)
{
    r->batched = 1;
    q->batch[q->nbatch++] = r;
}

/*
 * Parse and check a popped request, then serve it in C or queue it for Python's batch path.
 * Returns 0 if the Python handler must see it (nothing changed), 1 if it was taken.
 */
static int pyvu_fast_start(struct pyvu_fastq *q, struct pyvu_req *r)
{
    struct pyvu_blkstate *b = q->blk;
    VuVirtqElement *e = &r->elem;
    uint32_t type;
    uint64_t sector, total, nb;
    struct iovec *last;
    int is_write, in_c = pyvu_c_serves(q, b);

    if (e->in_num < 1 || e->out_num < 1 || e->out_sg[0].iov_len < VIRTIO_BLK_OUTHDR_SIZE) {
        return 0;
    }
    last = &e->in_sg[e->in_num - 1];
    if (last->iov_len < 1) {
        return 0;
    }
    memcpy(&type, e->out_sg[0].iov_base, 4);
    memcpy(&sector, (char *)e->out_sg[0].iov_base + 8, 8);
    type = le32toh(type) & ~VIRTIO_BLK_T_BARRIER;
    sector = le64toh(sector);
    r->q = q;
    r->status = (uint8_t *)last->iov_base + last->iov_len - 1;
    r->type = type;
    r->fua = 0;
    r->err = 0;
    r->batched = 0;
    r->fd = b->fd;

    if (type == VIRTIO_BLK_T_FLUSH) {
        if ((int64_t)__atomic_load_n(&b->length, __ATOMIC_ACQUIRE) < 0) {
            return 0;                       /* no medium: the handler says so */
        }
        r->kind = PYVU_ACCT_FLUSH;
        r->bytes = 0;
        r->offset = 0;
        r->iov = NULL;
        r->niov = 0;
        r->in_len = 1;
        r->start_ns = pyvu_now_ns();
        pyvu_blk_in_flight_add(b, 1);
        if (!in_c) {
            pyvu_batch_add(q, r);
        } else if (b->driver == DRV_NULL || b->no_flush) {
            pyvu_fast_ok(r);
        } else if (pyvu_ring_prep(q->ring, r, PYVU_OP_FSYNC) < 0) {
            pyvu_fast_fail(r, -EIO);
        }
        return 1;
    }
    if (type != VIRTIO_BLK_T_IN && type != VIRTIO_BLK_T_OUT) {
        return 0;
    }
    is_write = type == VIRTIO_BLK_T_OUT;
    if (is_write) {
        if (e->out_sg[0].iov_len != VIRTIO_BLK_OUTHDR_SIZE) {
            return 0;   /* header and data in one buffer: leave it to Python */
        }
        r->iov = e->out_sg + 1;
        r->niov = e->out_num - 1;
    } else {
        r->iov = e->in_sg;
        r->niov = e->in_num;
        if (last->iov_len == 1) {
            r->niov--;
        } else {
            last->iov_len--;    /* the status byte is not data */
        }
    }
    r->bytes = 0;
    for (unsigned i = 0; i < r->niov; i++) {
        r->bytes += r->iov[i].iov_len;
    }
    r->kind = is_write ? PYVU_ACCT_WRITE : PYVU_ACCT_READ;
    r->in_len = is_write ? 1 : (uint32_t)r->bytes + 1;
    total = (uint64_t)__atomic_load_n(&b->length, __ATOMIC_ACQUIRE);
    if ((int64_t)total < 0) {
        pyvu_req_undo_status(r, e);
        return 0;
    }
    total >>= 9;
    nb = r->bytes >> 9;
    if ((r->bytes & 511) || nb > BDRV_REQUEST_MAX_SECTORS || ((sector << 9) % b->lbs) ||
        sector > total || nb > total - sector || (is_write && !b->writable)) {
        pyvu_acct_invalid(b, r->kind);
        r->in_len = 1;
        pyvu_req_complete(r, VIRTIO_BLK_S_IOERR);
        return 1;
    }
    r->offset = (sector << 9) + (uint64_t)b->offset;
    if (b->align_mask | b->mem_mask) {
        /* blocklayer/io.py pads or bounces what the node cannot take as it is */
        uintptr_t bits = 0;
        for (unsigned i = 0; i < r->niov; i++) {
            bits |= (uintptr_t)r->iov[i].iov_base | r->iov[i].iov_len;
        }
        if (((r->offset | r->bytes) & b->align_mask) || (bits & b->mem_mask)) {
            pyvu_req_undo_status(r, e);
            return 0;
        }
    }
    r->fua = is_write && !__atomic_load_n(&b->wce, __ATOMIC_RELAXED);
    r->start_ns = pyvu_now_ns();
    pyvu_blk_in_flight_add(b, 1);
    if (!in_c) {
        pyvu_batch_add(q, r);
        return 1;
    }
    if (b->driver == DRV_NULL) {
        if (!is_write && b->read_zeroes) {
            for (unsigned i = 0; i < r->niov; i++) {
                memset(r->iov[i].iov_base, 0, r->iov[i].iov_len);
            }
        }
        pyvu_fast_ok(r);
        return 1;
    }
    if (b->driver == DRV_FILE_LAIO) {
        pyvu_laio_prep(q->laio, r, is_write);
    } else if (pyvu_ring_prep(q->ring, r, is_write ? PYVU_OP_WRITE : PYVU_OP_READ) < 0) {
        pyvu_fast_fail(r, -EIO);
    }
    return 1;
}

/*
 * The rings, and the heads libvhost-user will pop again after a reconnect, are safe to walk:
 * checked before the first pop after every vhost-user message (which may have moved, resized
 * or remapped them).  A problem marks the device broken, which closes the connection.
 * Queue's thread, read lock held.
 */
static int pyvu_fastq_check_rings(struct pyvu_fastq *q, VuVirtq *vq)
{
    struct pyvu_dev *d = q->pdev;
    const char *why;

    if (!vu_is_vq_usable(&d->vu, vq)) {
        return 0;                   /* not mapped yet: there is nothing to pop */
    }
    why = pyvu_ring_problem(d, vq);
    for (unsigned i = 0; !why && vq->resubmit_list && i < vq->resubmit_num; i++) {
        if (vq->resubmit_list[i].index >= vq->vring.num) {
            why = "inflight entry beyond the ring";
        }
    }
    if (why) {
        vu_panic(&d->vu, "queue %d: %s", q->qidx, why);
        return 0;
    }
    q->checked_gen = d->gen;
    return 1;
}

/*
 * Completions are pushed and the frontend notified while popping: after the first completed
 * request of a pop loop (so the frontend can start reaping while we go on), then every
 * PYVU_NOTIFY_EVERY.  Measured on 2 cores with a libblkio client: notifying only at the end
 * of the loop leaves client and daemon taking turns (1 queue on null-co 1.3x qsd, 1.55x this
 * way); notifying after every request wakes the client so often that with 2 queues over 2
 * iothreads (4 busy threads on 2 cores) throughput fell to 0.3x.
 */
#define PYVU_NOTIFY_EVERY 16

/* Pop and serve everything available.  Queue's thread, GIL released. */
static void pyvu_fastq_process(struct pyvu_fastq *q)
{
    struct pyvu_dev *d = q->pdev;
    VuDev *dev = &d->vu;

    pthread_rwlock_rdlock(&d->lock);
    if (__atomic_load_n(&q->paused, __ATOMIC_ACQUIRE) || d->vu.broken) {
        pthread_rwlock_unlock(&d->lock);
        return;
    }
    VuVirtq *vq = &dev->vq[q->qidx];
    if (q->checked_gen != d->gen && !pyvu_fastq_check_rings(q, vq)) {
        pthread_rwlock_unlock(&d->lock);
        return;
    }
    int notified = 0;
    while (q->nslow < PYVU_QMAX && q->ndone < PYVU_QMAX && q->nfailed < PYVU_QMAX &&
           q->nbatch < PYVU_QMAX) {
        const char *why = pyvu_next_chain_problem(dev, vq);
        if (why) {
            vu_panic(dev, "queue %d: %s", q->qidx, why);
            break;
        }
        struct pyvu_req *r = vu_queue_pop(dev, vq, sizeof(struct pyvu_req));
        if (!r) {
            break;
        }
        pyvu_q_in_flight_add(q, 1);
        q->requests++;
        if (!pyvu_fast_start(q, r)) {
            q->slow[q->nslow++] = &r->elem;
        }
        if (q->ndone >= (notified ? PYVU_NOTIFY_EVERY : 1)) {
            pyvu_fastq_flush_locked(q);
            notified = 1;
        }
    }
    if (q->laio && q->laio->npending) {
        pyvu_laio_submit(q->laio);
    }
    if (q->ring && (q->ring->u.pending || q->ring->u.nbacklog)) {
        pyvu_uring_submit(&q->ring->u);
    }
    pyvu_fastq_flush_locked(q);
    pthread_rwlock_unlock(&d->lock);
}

static int pyvu_fastq_needs_python(struct pyvu_fastq *q)
{
    return q->nslow || q->nfailed || q->nbatch;
}

/* A completion for a C request. */
static void pyvu_fast_cqe(struct pyvu_req *r, int res)
{
    struct pyvu_fastq *q = r->q;
    if (r->type == VIRTIO_BLK_T_FLUSH) {
        if (res < 0) {
            pyvu_fast_fail(r, res);
        } else {
            pyvu_fast_ok(r);
        }
        return;
    }
    if (res < 0) {
        pyvu_fast_fail(r, res);
        return;
    }
    if ((uint64_t)res != r->bytes) {
        /* Short transfer: a short write means the host ran out of space (as file-posix);
         * a short read (past EOF of an image whose size is not sector-aligned) goes to
         * Python, which re-reads and zero-fills it. */
        pyvu_fast_fail(r, r->type == VIRTIO_BLK_T_OUT ? -ENOSPC : -EAGAIN);
        return;
    }
    if (r->fua) {
        r->fua = 0;
        r->type = VIRTIO_BLK_T_FLUSH;     /* the write is done; complete after the fsync */
        r->kind = PYVU_ACCT_WRITE;
        if (pyvu_ring_prep(q->ring, r, PYVU_OP_FSYNC) < 0) {
            pyvu_fast_fail(r, -EIO);
        }
        return;
    }
    pyvu_fast_ok(r);
}

#define PYVU_REAP 64

/* Room for `more` Python completions; 0 if memory ran out (they then wait in the kernel). */
static int pyvu_ring_py_room(struct pyvu_ring *ring, int more)
{
    if (ring->pycap - ring->npy >= more) {
        return 1;
    }
    int cap = ring->pycap ? ring->pycap : PYVU_PYCQE_INIT;
    while (cap - ring->npy < more) {
        cap *= 2;
    }
    uint64_t *ud = realloc(ring->py_ud, cap * sizeof(*ud));
    if (!ud) {
        return 0;
    }
    ring->py_ud = ud;
    int *res = realloc(ring->py_res, cap * sizeof(*res));
    if (!res) {
        return 0;
    }
    ring->py_res = res;
    ring->pycap = cap;
    return 1;
}

/* Reap a ring: C requests are finished here (their queues put on *touched), Python ones are
 * kept for Python. */
static void pyvu_ring_reap(struct pyvu_ring *ring, struct pyvu_fastq **touched)
{
    uint64_t ud[PYVU_REAP];
    int res[PYVU_REAP];
    int n;
    do {
        if (!pyvu_ring_py_room(ring, PYVU_REAP)) {
            break;
        }
        n = pyvu_uring_reap(&ring->u, ud, res, PYVU_REAP);
        for (int i = 0; i < n; i++) {
            if (ud[i] & 1) {
                ring->py_ud[ring->npy] = ud[i];
                ring->py_res[ring->npy] = res[i];
                ring->npy++;
                continue;
            }
            struct pyvu_req *r = (struct pyvu_req *)(uintptr_t)ud[i];
            pyvu_fast_cqe(r, res[i]);
            pyvu_touch(r->q, touched);
        }
    } while (n == PYVU_REAP);
    if (ring->u.pending || ring->u.nbacklog) {
        pyvu_uring_submit(&ring->u);   /* FUA fsyncs, and what waited for room */
    }
}

/*
 * Tokens for Python.  When the caller's array is full, a C object's token (a queue or ring with
 * work for Python, reported once until Python took it) waits in this thread's overflow list
 * and is handed out first by the next pyvu_poller_wait: nothing is dropped, whatever the
 * number of queues on one context.  A Python fd needs no such care: epoll reports it again.
 */
static __thread uint64_t *pyvu_tls_overflow;
static __thread int pyvu_tls_noverflow, pyvu_tls_overflow_cap;

static void pyvu_emit(uint64_t *out, int *nout, int max, uint64_t token)
{
    if (*nout < max) {
        out[(*nout)++] = token;
        return;
    }
    if (!(token & PYVU_TOKEN_C)) {
        return;
    }
    if (pyvu_tls_noverflow == pyvu_tls_overflow_cap) {
        int cap = pyvu_tls_overflow_cap ? 2 * pyvu_tls_overflow_cap : 64;
        uint64_t *o = realloc(pyvu_tls_overflow, cap * sizeof(*o));
        if (!o) {
            return;
        }
        pyvu_tls_overflow = o;
        pyvu_tls_overflow_cap = cap;
    }
    pyvu_tls_overflow[pyvu_tls_noverflow++] = token;
}

static int pyvu_take_overflow(uint64_t *out, int max)
{
    int n = pyvu_tls_noverflow < max ? pyvu_tls_noverflow : max;
    memcpy(out, pyvu_tls_overflow, n * sizeof(*out));
    memmove(pyvu_tls_overflow, pyvu_tls_overflow + n,
            (pyvu_tls_noverflow - n) * sizeof(*out));
    pyvu_tls_noverflow -= n;
    return n;
}

static void pyvu_report_queue(struct pyvu_fastq *q, uint64_t *out, int *nout, int max)
{
    if (pyvu_fastq_needs_python(q) && !q->py_reported) {
        q->py_reported = 1;
        pyvu_emit(out, nout, max, PYVU_TOKEN_C | (uint64_t)(uintptr_t)q);
    }
}

/* Finish what a Linux AIO context completed (C requests), then flush and report the queues
 * they belong to.  The context's thread. */
static void pyvu_laio_complete(struct pyvu_laio *l, uint64_t *out, int *nout, int max)
{
    struct io_event events[64];
    struct pyvu_fastq *touched = NULL, *q, *next;
    long n;
    do {
        n = pyvu_laio_getevents(l, events, 64);
        if (n > 0) {
            l->inflight -= n;
        }
        for (long i = 0; i < n; i++) {
            struct pyvu_req *r = (struct pyvu_req *)(uintptr_t)events[i].data;
            pyvu_fast_cqe(r, (int)events[i].res);
            pyvu_touch(r->q, &touched);
        }
    } while (n == 64);
    if (l->npending) {
        pyvu_laio_submit(l);            /* what io_submit could not take before */
    }
    for (q = touched; q; q = next) {
        next = q->touched_next;
        q->touched = 0;
        if (q->ring && (q->ring->u.pending || q->ring->u.nbacklog)) {
            pyvu_uring_submit(&q->ring->u);   /* FUA fsyncs */
        }
        pyvu_fastq_flush(q);
        pyvu_report_queue(q, out, nout, max);
    }
}

/* The same for an io_uring ring; its Python requests' completions are reported too. */
static void pyvu_ring_complete(struct pyvu_ring *ring, uint64_t *out, int *nout, int max)
{
    struct pyvu_fastq *touched = NULL, *q, *next;
    pyvu_ring_reap(ring, &touched);
    for (q = touched; q; q = next) {
        next = q->touched_next;
        q->touched = 0;
        pyvu_fastq_flush(q);
        pyvu_report_queue(q, out, nout, max);
    }
    if (ring->npy && !ring->py_reported) {
        ring->py_reported = 1;
        pyvu_emit(out, nout, max, PYVU_TOKEN_C | (uint64_t)(uintptr_t)ring);
    }
}

/*
 * A kick serves the queue for as long as the frontend keeps it busy, as qsd's request loop
 * does: completions that are already there after submitting (page cache, null-co) are
 * finished at once, and requests that arrived meanwhile are popped, without a trip through
 * epoll and two eventfds per request.  Bounded, so the context's other handlers get their turn.
 */
#define PYVU_BUSY_ROUNDS 32

static void pyvu_handle_c(struct pyvu_chandler *h, uint64_t *out, int *nout, int max)
{
    eventfd_t v;
    if (h->type == PYVU_H_KICK) {
        struct pyvu_fastq *q = h->obj;
        eventfd_read(q->kick_fd, &v);
        q->kicks++;
        for (int round = 0; round < PYVU_BUSY_ROUNDS; round++) {
            uint64_t before = q->requests;
            pyvu_fastq_process(q);
            if (q->laio) {
                pyvu_laio_complete(q->laio, out, nout, max);
            } else if (q->ring) {
                pyvu_ring_complete(q->ring, out, nout, max);
            }
            if (q->requests == before || pyvu_fastq_needs_python(q)) {
                break;
            }
        }
        pyvu_report_queue(q, out, nout, max);
    } else if (h->type == PYVU_H_LAIO) {
        struct pyvu_laio *l = h->obj;
        eventfd_read(l->efd, &v);
        pyvu_laio_complete(l, out, nout, max);
    } else if (h->type == PYVU_H_URING) {
        struct pyvu_ring *ring = h->obj;
        eventfd_read(ring->u.efd, &v);
        pyvu_ring_complete(ring, out, nout, max);
    }
}

/*
 * Wait for events.  C handlers are served here; returns the number of tokens for Python
 * (a Python fd, or PYVU_TOKEN_C|pointer of a queue/ring with work for Python), 0 on timeout,
 * -EINTR if a signal interrupted the wait.
 */
static int pyvu_poller_wait(struct pyvu_poller *p, int timeout_ms, uint64_t *out, int max)
{
    struct epoll_event ev[32];
    uint64_t deadline = 0;
    int nout = pyvu_tls_noverflow ? pyvu_take_overflow(out, max) : 0;

    if (timeout_ms > 0) {
        deadline = pyvu_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    }
    for (;;) {
        int n = 0;
        int may_block = !nout && timeout_ms != 0;
        if (may_block && p->poll_ns && p->cur_poll_ns && !pyvu_tls_uring_inflight) {
            uint64_t until = pyvu_now_ns() + p->cur_poll_ns;
            p->polls++;
            do {
                n = epoll_wait(p->epfd, ev, 32, 0);
            } while (n == 0 && pyvu_now_ns() < until);
            if (n > 0) {
                p->poll_hits++;
            }
        }
        if (n == 0) {
            uint64_t t0 = may_block ? pyvu_now_ns() : 0;
            n = epoll_wait(p->epfd, ev, 32, nout ? 0 : timeout_ms);
            if (may_block && n > 0 && p->poll_ns) {
                pyvu_poller_adjust(p, pyvu_now_ns() - t0);
            }
        }
        if (n < 0) {
            if (errno == EINTR) {
                return nout ? nout : -EINTR;
            }
            return nout ? nout : -errno;
        }
        for (int i = 0; i < n; i++) {
            uint64_t u = ev[i].data.u64;
            if (u & PYVU_EP_CHANDLER) {
                pyvu_handle_c((struct pyvu_chandler *)(uintptr_t)(u & ~PYVU_EP_CHANDLER),
                              out, &nout, max);
            } else {
                pyvu_emit(out, &nout, max, u);
            }
        }
        if (nout || n == 0 || timeout_ms == 0) {
            return nout;
        }
        if (timeout_ms > 0) {
            uint64_t now = pyvu_now_ns();
            if (now >= deadline) {
                return 0;
            }
            timeout_ms = (int)((deadline - now) / 1000000ull) + 1;
        }
    }
}

/* ---- Python's side of a queue ---- */

static void pyvu_fastq_init(struct pyvu_fastq *q, struct pyvu_dev *d, int qidx,
                            struct pyvu_blkstate *b)
{
    memset(q, 0, sizeof(*q));
    q->pdev = d;
    q->qidx = qidx;
    q->blk = b;
    q->kick_fd = -1;
    q->h.type = PYVU_H_KICK;
    q->h.obj = q;
}

/* Python took the queue's token: hand over the slow and failed lists. */
static int pyvu_fastq_take_slow(struct pyvu_fastq *q, VuVirtqElement **out, int max)
{
    int n = q->nslow < max ? q->nslow : max;
    memcpy(out, q->slow, n * sizeof(out[0]));
    memmove(q->slow, q->slow + n, (q->nslow - n) * sizeof(q->slow[0]));
    q->nslow -= n;
    return n;
}

static int pyvu_fastq_take_failed(struct pyvu_fastq *q, VuVirtqElement **out, int *err,
                                  int *type, int max)
{
    int n = q->nfailed < max ? q->nfailed : max;
    for (int i = 0; i < n; i++) {
        struct pyvu_req *r = q->failed[i];
        out[i] = &r->elem;
        err[i] = r->err;
        type[i] = r->type == VIRTIO_BLK_T_FLUSH && r->kind == PYVU_ACCT_WRITE ? VIRTIO_BLK_T_OUT : r->type;
        pyvu_req_undo_status(r, &r->elem);   /* give back the status byte */
    }
    memmove(q->failed, q->failed + n, (q->nfailed - n) * sizeof(q->failed[0]));
    q->nfailed -= n;
    return n;
}

/*
 * Python takes up to max batched requests as plain values: type (PYVU_BATCH_*), flags
 * (BDRV_REQ_FUA when the write cache is off), byte offset, length, and the data iovecs (the
 * status byte is not part of them); ret[i] starts as PYVU_BATCH_UNSET.  Queue's context.
 */
static int pyvu_fastq_take_batch(struct pyvu_fastq *q, void **handles, int *type, int *flags,
                                 uint64_t *offset, uint64_t *bytes, struct iovec **iov,
                                 unsigned *niov, int *ret, int max)
{
    int n = q->nbatch < max ? q->nbatch : max;
    for (int i = 0; i < n; i++) {
        struct pyvu_req *r = q->batch[i];
        handles[i] = r;
        ret[i] = PYVU_BATCH_UNSET;
        type[i] = r->type;
        flags[i] = r->fua ? BDRV_REQ_FUA : 0;
        offset[i] = r->offset;
        bytes[i] = r->bytes;
        iov[i] = r->iov;
        niov[i] = r->type == VIRTIO_BLK_T_FLUSH ? 0 : r->niov;
    }
    memmove(q->batch, q->batch + n, (q->nbatch - n) * sizeof(q->batch[0]));
    q->nbatch -= n;
    return n;
}

/* One batched request is done: 0 or -errno (failures go to the error policy).  No push yet. */
static void pyvu_batch_req_done(struct pyvu_req *r, int ret)
{
    r->fua = 0;     /* whoever served it honoured BDRV_REQ_FUA */
    if (ret < 0) {
        pyvu_fast_fail(r, ret);
    } else {
        pyvu_fast_ok(r);
    }
}

/*
 * Python finished (part of) a batch: ret[i] is 0 or -errno, or PYVU_BATCH_PENDING for a
 * request that completes later (pyvu_fastq_req_done) or that C took back (pyvu_fastq_submit).
 * Successes are accounted and pushed here; failures go to the failed list (the error policy).
 * Queue's context.  Returns how many failed.
 */
static int pyvu_fastq_batch_done(struct pyvu_fastq *q, void **handles, int *ret, int n)
{
    int nfailed = 0;
    for (int i = 0; i < n; i++) {
        if (ret[i] == PYVU_BATCH_PENDING) {
            continue;
        }
        int res = ret[i] == PYVU_BATCH_UNSET ? -EIO : ret[i];
        nfailed += res < 0;
        pyvu_batch_req_done(handles[i], res);
    }
    pyvu_fastq_flush(q);
    return nfailed;
}

/* One request Python completed later (queue's context); pushed with the next flush. */
static void pyvu_fastq_req_done(struct pyvu_fastq *q, void *handle, int ret)
{
    (void)q;
    pyvu_batch_req_done(handle, ret);
}

/*
 * A Python driver hands leaf I/O back to the C engines: reads, writes and flushes of batch
 * entries on file descriptor fd at offset[i] (the node's own offsets), through this context's
 * Linux AIO (laio != 0) or io_uring.  Entries not yet answered (PYVU_BATCH_UNSET) are taken
 * and marked PYVU_BATCH_PENDING; C completes
 * them (FUA as write + fsync).  Returns how many were taken, or -1 if this context has no such
 * engine (Python serves them itself then).  Queue's context.
 */
static int pyvu_fastq_submit(struct pyvu_fastq *q, int fd, int laio, void **handles,
                             uint64_t *offset, int *ret, int n)
{
    if (!q->ring || (laio && !q->laio)) {
        return -1;
    }
    for (int i = 0; i < n; i++) {
        struct pyvu_req *r = handles[i];
        if (ret[i] != PYVU_BATCH_UNSET) {
            continue;               /* answered or taken by someone else */
        }
        ret[i] = PYVU_BATCH_PENDING;
        r->fd = fd;
        r->offset = offset[i];
        if (r->type == VIRTIO_BLK_T_FLUSH) {
            if (pyvu_ring_prep(q->ring, r, PYVU_OP_FSYNC) < 0) {
                pyvu_fast_fail(r, -EIO);
            }
        } else if (laio) {
            pyvu_laio_prep(q->laio, r, r->type == VIRTIO_BLK_T_OUT);
        } else if (pyvu_ring_prep(q->ring, r, r->type == VIRTIO_BLK_T_OUT ? PYVU_OP_WRITE
                                                                     : PYVU_OP_READ) < 0) {
            pyvu_fast_fail(r, -EIO);
        }
    }
    if (q->laio && q->laio->npending) {
        pyvu_laio_submit(q->laio);
    }
    if (q->ring->u.pending || q->ring->u.nbacklog) {
        pyvu_uring_submit(&q->ring->u);
    }
    return n;
}

static void pyvu_fastq_reported_done(struct pyvu_fastq *q)
{
    q->py_reported = 0;
}

/* Python finished n elements of this queue (pushed them itself). */
static void pyvu_fastq_python_done(struct pyvu_fastq *q, int n)
{
    pyvu_q_in_flight_add(q, -n);
}

static int pyvu_ring_take_py(struct pyvu_ring *ring, uint64_t *ud, int *res, int max)
{
    int n = ring->npy < max ? ring->npy : max;
    memcpy(ud, ring->py_ud, n * sizeof(ud[0]));
    memcpy(res, ring->py_res, n * sizeof(res[0]));
    /* O(npy) shift; npy is normally tiny (Python takes everything each time). */
    memmove(ring->py_ud, ring->py_ud + n, (ring->npy - n) * sizeof(ud[0]));
    memmove(ring->py_res, ring->py_res + n, (ring->npy - n) * sizeof(res[0]));
    ring->npy -= n;
    if (!ring->npy) {
        ring->py_reported = 0;
    }
    return n;
}

static int pyvu_ring_init(struct pyvu_ring *ring, unsigned entries, int efd)
{
    memset(ring, 0, sizeof(*ring));
    ring->h.type = PYVU_H_URING;
    ring->h.obj = ring;
    if (!pyvu_ring_py_room(ring, PYVU_PYCQE_INIT)) {
        free(ring->py_ud);
        free(ring->py_res);
        return -ENOMEM;
    }
    return pyvu_uring_init(&ring->u, entries, efd);
}
