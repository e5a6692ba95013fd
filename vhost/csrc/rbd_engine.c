/*
 * The librbd engine: reads, writes and flushes of batched requests on a Ceph RBD image,
 * submitted with librbd's asynchronous C API and completed in C (issue "Beyond one host").
 *
 * Theory of operation
 * -------------------
 * One engine per (image, AioContext).  The rbd driver (blocklayer/drivers/rbd.py) opens the
 * image with librados/librbd (loaded by cffi, so this extension does not link librbd) and hands
 * this file the functions it needs as pointers (struct pyvu_rbd_fns).  pyvu_fastq_submit_rbd
 * submits a batch's requests straight from guest memory (rbd_aio_readv/writev: no copy).
 * librbd completes them on its own threads: pyvu_rbd_cb only records (request, result) under
 * the engine's mutex, in arrays sized when the request started (so librbd's threads never
 * allocate: out of memory fails a request with -ENOMEM at submission), and signals the
 * engine's eventfd — a C handler (PYVU_H_RBD) of the
 * AioContext that submitted, where pyvu_rbd_complete finishes the requests like any other C
 * engine's (pyvu_fast_cqe), flushes and reports their queues.  A FUA write is followed by an
 * rbd flush before it completes.  librbd retries across OSD restarts itself: a stall, not an
 * error.
 *
 * Threads: submission and completion in the engine's AioContext; pyvu_rbd_cb on librbd's.
 *
 * Licence: GPL-2.0-or-later (linked with libvhost-user).
 */
#include <pthread.h>
#include <sys/eventfd.h>

/* Completions pyvu_rbd_complete takes out per hold of the engine's lock. */
#define PYVU_RBD_TAKE 128

/*
 * librbd's thread: record (request, result) and wake the engine's loop.  The arrays have room
 * (pyvu_rbd_reserve, when the request started), so nothing is allocated here and nothing can
 * fail.  (Signalling only the first of the completions waiting, as QEMU's aio_notify does,
 * measured no faster: 4 KiB randread QD32 within noise, the loop's CPU per request not lower.)
 */
static void pyvu_rbd_cb(void *c, void *arg)
{
    struct pyvu_req *r = arg;
    struct pyvu_rbd *e = r->rbd;
    long ret = (long)e->f.get_return_value(c);
    int n;

    e->f.release(c);
    pthread_mutex_lock(&e->lock);
    n = e->ndone;
    e->done[n] = r;
    e->res[n] = ret;
    __atomic_store_n(&e->ndone, n + 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&e->lock);
    eventfd_write(e->efd, 1);
}

/*
 * Room in done/res for one more request: every request started and not yet collected
 * (inflight) may be completed before the loop runs.  The engine's context; 0 or -ENOMEM.
 */
static int pyvu_rbd_reserve(struct pyvu_rbd *e)
{
    struct pyvu_req **d;
    long *res = NULL;
    int cap;

    if (__atomic_load_n(&e->inflight, __ATOMIC_RELAXED) < e->cap) {
        return 0;
    }
    cap = e->cap ? e->cap * 2 : 256;
    pthread_mutex_lock(&e->lock);   /* librbd's threads write into the arrays */
    d = realloc(e->done, cap * sizeof(*d));
    if (d) {
        e->done = d;
        res = realloc(e->res, cap * sizeof(*res));
        if (res) {
            e->res = res;
            e->cap = cap;
        }
    }
    pthread_mutex_unlock(&e->lock);
    return res ? 0 : -ENOMEM;
}

static int pyvu_rbd_init(struct pyvu_rbd *e, int efd, void *image, const struct pyvu_rbd_fns *f)
{
    memset(e, 0, sizeof(*e));
    e->efd = efd;
    e->image = image;
    e->f = *f;
    e->h.type = PYVU_H_RBD;
    e->h.obj = e;
    return -pthread_mutex_init(&e->lock, NULL);
}

static void pyvu_rbd_destroy(struct pyvu_rbd *e)
{
    pthread_mutex_destroy(&e->lock);
    free(e->done);
    free(e->res);
    e->done = NULL;
    e->res = NULL;
}

/* Start one operation of r on the image; 0 or -errno (then nothing was started). */
static int pyvu_rbd_start(struct pyvu_rbd *e, struct pyvu_req *r, int op)
{
    void *c;
    int ret;

    ret = pyvu_rbd_reserve(e);
    if (ret < 0) {
        return ret;
    }
    r->rbd = e;
    ret = e->f.create_completion(r, pyvu_rbd_cb, &c);
    if (ret < 0) {
        return ret;
    }
    if (op == PYVU_OP_FSYNC) {
        ret = e->f.flush(e->image, c);
    } else if (op == PYVU_OP_WRITE) {
        ret = e->f.writev(e->image, r->iov, (int)r->niov, r->offset, c);
    } else {
        ret = e->f.readv(e->image, r->iov, (int)r->niov, r->offset, c);
    }
    if (ret < 0) {
        e->f.release(c);
        return ret;
    }
    __atomic_add_fetch(&e->inflight, 1, __ATOMIC_RELAXED);
    return 0;
}

/*
 * Submit the batch's requests not yet answered (PYVU_BATCH_UNSET) to the engine, at offset[i]
 * (the node's own offsets); each is marked PYVU_BATCH_PENDING and completed by C.  Returns how
 * many were looked at.  Queue's context.
 */
static int pyvu_fastq_submit_rbd(struct pyvu_fastq *q, struct pyvu_rbd *e, void **handles,
                                 uint64_t *offset, int *ret, int n)
{
    (void)q;
    for (int i = 0; i < n; i++) {
        struct pyvu_req *r = handles[i];
        int rc;
        if (ret[i] != PYVU_BATCH_UNSET || !pyvu_req_is_io(r)) {
            continue;               /* answered, taken by someone else, or not an I/O */
        }
        ret[i] = PYVU_BATCH_PENDING;
        r->offset = offset[i];
        rc = pyvu_rbd_start(e, r, r->type == VIRTIO_BLK_T_FLUSH ? PYVU_OP_FSYNC
                                  : r->type == VIRTIO_BLK_T_OUT ? PYVU_OP_WRITE : PYVU_OP_READ);
        if (rc < 0) {
            pyvu_fast_fail(r, rc);
        }
    }
    return n;
}

/* Finish what librbd completed, then flush and report the queues.  The engine's context. */
static void pyvu_rbd_complete(struct pyvu_rbd *e, uint64_t *out, int *nout, int max)
{
    struct pyvu_fastq *touched = NULL, *q, *next;
    struct pyvu_req *done[PYVU_RBD_TAKE];
    long res[PYVU_RBD_TAKE];
    int n;

    do {
        /* from the end of the list: the order of completions does not matter */
        pthread_mutex_lock(&e->lock);
        n = e->ndone < PYVU_RBD_TAKE ? e->ndone : PYVU_RBD_TAKE;
        memcpy(done, e->done + e->ndone - n, n * sizeof(*done));
        memcpy(res, e->res + e->ndone - n, n * sizeof(*res));
        __atomic_store_n(&e->ndone, e->ndone - n, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&e->lock);
        __atomic_sub_fetch(&e->inflight, n, __ATOMIC_RELAXED);
        for (int i = 0; i < n; i++) {
            struct pyvu_req *r = done[i];
            long ret = res[i];
            if (ret >= 0 && r->fua && r->type == VIRTIO_BLK_T_OUT) {
                r->fua = 0;                 /* written: complete after the flush */
                r->type = VIRTIO_BLK_T_FLUSH;
                int rc = pyvu_rbd_start(e, r, PYVU_OP_FSYNC);
                if (rc < 0) {
                    pyvu_fast_fail(r, rc);
                    pyvu_touch(r->q, &touched);
                }
                continue;
            }
            /* librbd answers a read or write with its length (or 0), a flush with 0 */
            pyvu_fast_cqe(r, ret < 0 ? (int)ret
                             : r->type == VIRTIO_BLK_T_FLUSH ? 0 : (int)r->bytes);
            pyvu_touch(r->q, &touched);
        }
    } while (n == PYVU_RBD_TAKE);
    for (q = touched; q; q = next) {
        next = q->touched_next;
        q->touched = 0;
        pyvu_fastq_flush(q);
        pyvu_report_queue(q, out, nout, max);
    }
}
