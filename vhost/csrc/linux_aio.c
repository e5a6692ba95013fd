/*
 * The Linux AIO engine (aio=native, O_DIRECT), one context per AioContext.
 *
 * Theory of operation
 * -------------------
 * A queue prepares its C requests' iocbs (pyvu_laio_prep) and submits them once per pop loop
 * (pyvu_laio_submit); the kernel signals the context's eventfd, a C handler of the poller, and
 * pyvu_laio_complete finishes the requests (pyvu_fast_cqe, virtio_blk_queue.c), then flushes
 * and reports their queues.  What the kernel cannot take goes to Python, never to the guest as
 * an error.
 *
 * Threads: a context is only touched by its AioContext's thread.
 *
 * Licence: GPL-2.0-or-later (linked with libvhost-user).
 */
#include <sys/syscall.h>
#include <linux/aio_abi.h>
#include <errno.h>
#include <string.h>
#include <unistd.h>

#define PYVU_LAIO_EVENTS 4096

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
