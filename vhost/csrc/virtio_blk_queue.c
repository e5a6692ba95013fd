/*
 * The virtio-blk queue: the per-request path in C.  Pops each queue, parses and checks every
 * request once, answers it, serves it in C, or hands it to Python's node graph in batches;
 * completes, accounts and pushes.  And Python's side of a queue.
 *
 * Theory of operation
 * -------------------
 * Every virtio-blk rule is applied here, once, to every request (pyvu_fast_start, QEMU's
 * virtio-blk-handler.c): the header (wherever the guest cut it), the status byte, the type,
 * the sector range and size limits, writable, DISCARD / WRITE_ZEROES' one segment and flags.
 * Malformed requests (no header or status byte: completed with nothing written, counted in
 * blkstate.malformed_ops), invalid ones (IOERR, counted invalid), unknown types (UNSUPP) and
 * GET_ID (the serial in the blkstate) are answered here.  The rest starts, chosen from flags
 * Python sets in struct pyvu_blkstate (one per BlockBackend, the single source of truth for
 * in-flight counts and accounting: blkstate.c):
 *   - C ("fast") path: IN/OUT/FLUSH on a null-co node, or on a file node served by io_uring /
 *     Linux AIO in this context, aligned for it, with a medium (force_slow == 0);
 *   - batch path: everything else (a node only Python can serve, a filter in the graph, the C
 *     path switched off, DISCARD and WRITE_ZEROES, a misaligned request (PYVU_BATCH_EACH: the
 *     node graph pads it), no medium).  It waits on the queue's batch list; Python takes the
 *     list as plain values (blocklayer/batch.py), the node graph serves it — a driver may hand
 *     leaf I/O straight back to the C engines (pyvu_fastq_submit) — and C accounts, completes
 *     and pushes each request.
 * A request that *fails* on either path is handed to Python (the failed list), so the error
 * policy (rerror/werror, stop and retry) lives in one place (virtio/blk_export.py); a retry
 * runs the request through here again (pyvu_fastq_resubmit), as does the redo of a request an
 * engine could not finish (-EAGAIN).  Only a device without a blkstate (not a block device)
 * gets raw elements (the slow list, its handle_request).
 *
 * Python pauses a queue by setting q->paused and then taking the dispatch lock exclusively
 * once, so no pop loop is running after that.
 *
 * Threads: a queue is only touched by its AioContext's thread (the pop loop with the GIL
 * released, from the poller's kick handler; Python's side with the GIL).
 *
 * Licence: GPL-2.0-or-later (linked with libvhost-user).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>

/* Put q on a list of queues that got completions (each once; no bound on their number). */
static void pyvu_touch(struct pyvu_fastq *q, struct pyvu_fastq **head)
{
    if (!q->touched) {
        q->touched = 1;
        q->touched_next = *head;
        *head = q;
    }
}

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
        free(r->own_iov);
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
    free(r->own_iov);   /* Python answers it or re-runs it from the start: C is done with it */
    r->own_iov = NULL;
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

/* How many requests a queue pops before its engine submits and reaps them (0: all there
 * are): PYVU_SUBMIT_EVERY when C serves it through Linux AIO or io_uring (vhost/pyvu.h says
 * why); Python's batches keep their own size (PYVU_BATCH_TAKE).  The queue's thread, under
 * the device's lock. */
static int pyvu_fastq_pop_limit(struct pyvu_fastq *q)
{
    struct pyvu_blkstate *b = q->blk;
    if (!b || b->driver == DRV_NULL || !pyvu_c_serves(q, b)) {
        return 0;
    }
    return PYVU_SUBMIT_EVERY;
}

/* Queue a parsed, checked request for Python's node graph (blocklayer/batch.py). */
static void pyvu_batch_add(struct pyvu_fastq *q, struct pyvu_req *r)
{
    r->batched = 1;
    q->batch[q->nbatch++] = r;
}

/* Complete a request C answered itself (a status, nothing else to do). */
static void pyvu_req_answer(struct pyvu_req *r, uint8_t status, uint32_t in_len)
{
    r->in_len = in_len;
    pyvu_req_complete(r, status);
}

/* No header or no status byte: completed with nothing written (QEMU marks the device broken;
 * we count it, for the export's "malformed-requests"). */
static void pyvu_req_malformed(struct pyvu_fastq *q, struct pyvu_req *r)
{
    __atomic_fetch_add(&q->blk->malformed_ops, 1, __ATOMIC_RELAXED);
    r->in_len = 0;
    q->done[q->ndone++] = r;
}

/* Start a checked request: count it in flight, then the C engines or the batch list. */
static void pyvu_req_go(struct pyvu_fastq *q, struct pyvu_req *r, int in_c)
{
    struct pyvu_blkstate *b = q->blk;
    r->start_ns = pyvu_now_ns();
    pyvu_blk_in_flight_add(b, 1);
    if (!in_c) {
        pyvu_batch_add(q, r);
        return;
    }
    r->offset += (uint64_t)b->offset;   /* the C engines address the leaf */
    if (r->type == VIRTIO_BLK_T_FLUSH) {
        if (b->driver == DRV_NULL || b->no_flush) {
            pyvu_fast_ok(r);
        } else if (pyvu_ring_prep(q->ring, r, PYVU_OP_FSYNC) < 0) {
            pyvu_fast_fail(r, -EIO);
        }
        return;
    }
    int is_write = r->type == VIRTIO_BLK_T_OUT;
    if (b->driver == DRV_NULL) {
        if (!is_write && b->read_zeroes) {
            for (unsigned i = 0; i < r->niov; i++) {
                memset(r->iov[i].iov_base, 0, r->iov[i].iov_len);
            }
        }
        pyvu_fast_ok(r);
    } else if (b->driver == DRV_FILE_LAIO) {
        pyvu_laio_prep(q->laio, r, is_write);
    } else if (pyvu_ring_prep(q->ring, r, is_write ? PYVU_OP_WRITE : PYVU_OP_READ) < 0) {
        pyvu_fast_fail(r, -EIO);
    }
}

/*
 * virtio_blk_sect_range_ok: nb_sectors whole sectors from sector, aligned to the logical block
 * size, inside the disk (total sectors; < 0: no medium, which the block layer fails with
 * ENOMEDIUM, so only the size rules apply).
 */
static int pyvu_sect_range_ok(struct pyvu_blkstate *b, uint64_t sector, uint64_t nb,
                              int64_t total)
{
    if (nb > BDRV_REQUEST_MAX_SECTORS || ((sector << 9) % b->lbs)) {
        return 0;
    }
    return total < 0 || (sector <= (uint64_t)total && nb <= (uint64_t)total - sector);
}

/* A medium's length in sectors, or < 0 for none. */
static int64_t pyvu_total_sectors(struct pyvu_blkstate *b)
{
    int64_t len = __atomic_load_n(&b->length, __ATOMIC_ACQUIRE);
    return len < 0 ? len : len >> 9;
}

/* virtio_blk_handle_discard_write_zeroes: one segment, QEMU's statuses; to the batch. */
static void pyvu_start_dwz(struct pyvu_fastq *q, struct pyvu_req *r, uint64_t out_total)
{
    struct pyvu_blkstate *b = q->blk;
    VuVirtqElement *e = &r->elem;
    uint8_t buf[VIRTIO_BLK_OUTHDR_SIZE + VIRTIO_BLK_DWZ_SIZE];
    uint64_t sector, seg = out_total - VIRTIO_BLK_OUTHDR_SIZE;
    uint32_t num, flags;
    int is_wz = r->type == VIRTIO_BLK_T_WRITE_ZEROES;

    if (!b->writable) {
        pyvu_req_answer(r, VIRTIO_BLK_S_IOERR, 1);
        return;
    }
    if (seg > VIRTIO_BLK_DWZ_SIZE) {
        pyvu_req_answer(r, VIRTIO_BLK_S_UNSUPP, 1);    /* only one segment is supported */
        return;
    }
    if (seg != VIRTIO_BLK_DWZ_SIZE) {
        pyvu_req_answer(r, VIRTIO_BLK_S_IOERR, 1);
        return;
    }
    pyvu_iov_to_buf(e->out_sg, e->out_num, buf, sizeof(buf));
    memcpy(&sector, buf + VIRTIO_BLK_OUTHDR_SIZE, 8);
    memcpy(&num, buf + VIRTIO_BLK_OUTHDR_SIZE + 8, 4);
    memcpy(&flags, buf + VIRTIO_BLK_OUTHDR_SIZE + 12, 4);
    sector = le64toh(sector);
    num = le32toh(num);
    flags = le32toh(flags);
    r->kind = is_wz ? PYVU_ACCT_WRITE : PYVU_ACCT_UNMAP;
    if (num > (is_wz ? VHOST_USER_BLK_MAX_WRITE_ZEROES_SECTORS
                     : VHOST_USER_BLK_MAX_DISCARD_SECTORS) ||
        !pyvu_sect_range_ok(b, sector, num, pyvu_total_sectors(b))) {
        pyvu_acct_invalid(b, r->kind);
        pyvu_req_answer(r, VIRTIO_BLK_S_IOERR, 1);
        return;
    }
    if ((flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) ||
        (!is_wz && (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))) {
        pyvu_req_answer(r, VIRTIO_BLK_S_UNSUPP, 1);    /* UNMAP is not valid on a discard */
        return;
    }
    r->offset = sector << 9;
    r->bytes = (uint64_t)num << 9;
    r->iov = NULL;
    r->niov = 0;
    r->in_len = 1;
    r->flags = is_wz && (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) ? BDRV_REQ_MAY_UNMAP : 0;
    r->fua = is_wz && !__atomic_load_n(&b->wce, __ATOMIC_RELAXED);
    pyvu_req_go(q, r, 0);       /* the node's rules: discard policy, fallback, ... */
}

/* GET_ID: the serial, with its NUL terminator when it fits, truncated to the buffer. */
static void pyvu_answer_get_id(struct pyvu_blkstate *b, struct pyvu_req *r)
{
    VuVirtqElement *e = &r->elem;
    char id[VIRTIO_BLK_ID_BYTES + 1];
    uint64_t avail = 0, size;

    for (unsigned i = 0; i < e->in_num; i++) {
        avail += e->in_sg[i].iov_len;
    }
    avail--;                                    /* the status byte */
    size = (uint64_t)b->serial_len + 1;
    if (size > VIRTIO_BLK_ID_BYTES) {
        size = VIRTIO_BLK_ID_BYTES;
    }
    if (size > avail) {
        size = avail;
    }
    memcpy(id, b->serial, b->serial_len);
    id[b->serial_len] = 0;
    pyvu_iov_from_buf(e->in_sg, e->in_num, id, size);
    pyvu_req_answer(r, VIRTIO_BLK_S_OK, (uint32_t)size + 1);
}

/*
 * Parse and check a popped request (or one Python re-runs from the start: a retry, a redo),
 * then answer it, serve it in C, or queue it for Python's batch path.  Every virtio-blk rule
 * is here, once (QEMU's virtio-blk-handler.c).  each: the batch serves it request by request
 * (PYVU_BATCH_EACH).  Returns 0 only when the device is not a block device (no blkstate: its
 * handle_request sees the element), 1 when the request was taken.
 */
static int pyvu_fast_start(struct pyvu_fastq *q, struct pyvu_req *r, int each)
{
    struct pyvu_blkstate *b = q->blk;
    VuVirtqElement *e = &r->elem;
    uint8_t hdr[VIRTIO_BLK_OUTHDR_SIZE];
    uint32_t type;
    uint64_t sector, out_total = 0;
    int64_t total;
    struct iovec *last;
    int is_write, in_c;

    if (!b) {
        return 0;
    }
    r->q = q;
    r->own_iov = NULL;
    r->fua = 0;
    r->err = 0;
    r->batched = 0;
    r->flags = each ? PYVU_BATCH_EACH : 0;
    r->fd = b->fd;
    r->bytes = 0;
    for (unsigned i = 0; i < e->out_num; i++) {
        out_total += e->out_sg[i].iov_len;
    }
    if (e->in_num < 1 || e->out_num < 1 || e->in_sg[e->in_num - 1].iov_len < 1 ||
        out_total < VIRTIO_BLK_OUTHDR_SIZE) {
        pyvu_req_malformed(q, r);
        return 1;
    }
    last = &e->in_sg[e->in_num - 1];
    pyvu_iov_to_buf(e->out_sg, e->out_num, hdr, sizeof(hdr));
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    type = le32toh(type) & ~VIRTIO_BLK_T_BARRIER;
    sector = le64toh(sector);
    r->status = (uint8_t *)last->iov_base + last->iov_len - 1;
    r->type = type;
    r->in_len = 1;
    in_c = !each && pyvu_c_serves(q, b);
    total = pyvu_total_sectors(b);

    switch (type) {
    case VIRTIO_BLK_T_IN:
    case VIRTIO_BLK_T_OUT:
        break;
    case VIRTIO_BLK_T_FLUSH:
        r->kind = PYVU_ACCT_FLUSH;
        r->offset = 0;
        r->iov = NULL;
        r->niov = 0;
        pyvu_req_go(q, r, in_c && total >= 0);  /* no medium: the batch path fails it */
        return 1;
    case VIRTIO_BLK_T_DISCARD:
    case VIRTIO_BLK_T_WRITE_ZEROES:
        pyvu_start_dwz(q, r, out_total);
        return 1;
    case VIRTIO_BLK_T_GET_ID:
        pyvu_answer_get_id(b, r);
        return 1;
    default:
        pyvu_req_answer(r, VIRTIO_BLK_S_UNSUPP, 1);
        return 1;
    }

    is_write = type == VIRTIO_BLK_T_OUT;
    if (is_write && e->out_sg[0].iov_len == VIRTIO_BLK_OUTHDR_SIZE) {
        r->iov = e->out_sg + 1;
        r->niov = e->out_num - 1;
    } else if (is_write) {
        /* the header shares a buffer with the data, or is split: the data from byte 16 on */
        uint64_t size;
        r->own_iov = malloc(e->out_num * sizeof(struct iovec));
        if (!r->own_iov) {
            pyvu_req_answer(r, VIRTIO_BLK_S_IOERR, 1);
            return 1;
        }
        r->iov = r->own_iov;
        r->niov = (unsigned)pyvu_iov_slice(e->out_sg, e->out_num, VIRTIO_BLK_OUTHDR_SIZE, 0,
                                           r->own_iov, &size);
    } else {
        r->iov = e->in_sg;
        r->niov = e->in_num;
        if (last->iov_len == 1) {
            r->niov--;
        } else {
            last->iov_len--;    /* the status byte is not data */
        }
    }
    for (unsigned i = 0; i < r->niov; i++) {
        r->bytes += r->iov[i].iov_len;
    }
    r->kind = is_write ? PYVU_ACCT_WRITE : PYVU_ACCT_READ;
    r->in_len = is_write ? 1 : (uint32_t)r->bytes + 1;
    if ((r->bytes & 511) || !pyvu_sect_range_ok(b, sector, r->bytes >> 9, total) ||
        (is_write && !b->writable)) {
        pyvu_acct_invalid(b, r->kind);
        pyvu_req_answer(r, VIRTIO_BLK_S_IOERR, 1);
        return 1;
    }
    r->offset = sector << 9;
    if (b->align_mask | b->mem_mask) {
        /* blocklayer/io.py pads or bounces what the node cannot take as it is */
        uintptr_t bits = 0;
        for (unsigned i = 0; i < r->niov; i++) {
            bits |= (uintptr_t)r->iov[i].iov_base | r->iov[i].iov_len;
        }
        if ((((r->offset + (uint64_t)b->offset) | r->bytes) & b->align_mask) ||
            (bits & b->mem_mask)) {
            r->flags |= PYVU_BATCH_EACH;
            in_c = 0;
        }
    }
    r->fua = is_write && !__atomic_load_n(&b->wce, __ATOMIC_RELAXED);
    pyvu_req_go(q, r, in_c && total >= 0);
    return 1;
}

/*
 * Python re-runs a request it took from the failed list, from the start, as if just popped:
 * a retry after an error policy's stop (each = 0: C or the batch, as any request), or the redo
 * of one a C engine could not finish (-EAGAIN: each = 1, request by request through the node
 * graph, which resubmits short reads and zero-fills past the end of the file).  Whatever it
 * answers at once is pushed; Python then serves the batch list and the failed list.  Queue's
 * context.
 */
static void pyvu_fastq_resubmit(struct pyvu_fastq *q, VuVirtqElement *e, int each)
{
    pthread_rwlock_rdlock(&q->pdev->lock);
    pyvu_fast_start(q, (struct pyvu_req *)e, each);
    if (q->laio && q->laio->npending) {
        pyvu_laio_submit(q->laio);
    }
    if (q->ring && (q->ring->u.pending || q->ring->u.nbacklog)) {
        pyvu_uring_submit(&q->ring->u);
    }
    pyvu_fastq_flush_locked(q);
    pthread_rwlock_unlock(&q->pdev->lock);
}

/*
 * Python's error policy answered a request of the failed list: write the status and push it
 * (a read's in_len counts its data, as if it had succeeded: QEMU's virtio_blk_req_complete).
 * Queue's context.
 */
static void pyvu_fastq_fail_done(struct pyvu_fastq *q, VuVirtqElement *e, int status)
{
    struct pyvu_req *r = (struct pyvu_req *)e;
    r->q = q;
    pyvu_req_complete(r, (uint8_t)status);
    pyvu_fastq_flush(q);
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

/* Pop and serve what is available -- with `chunks`, at most pyvu_fastq_pop_limit(q)
 * requests -- a request done at once pushed at once (PYVU_SUBMIT_EVERY in vhost/pyvu.h says
 * why).  Returns 1 if it stopped at the limit (the ring may hold more).  Queue's thread, GIL
 * released. */
static int pyvu_fastq_process_some(struct pyvu_fastq *q, int chunks)
{
    struct pyvu_dev *d = q->pdev;
    VuDev *dev = &d->vu;
    int popped = 0, limit;

    pthread_rwlock_rdlock(&d->lock);
    if (__atomic_load_n(&q->paused, __ATOMIC_ACQUIRE) || d->vu.broken) {
        pthread_rwlock_unlock(&d->lock);
        return 0;
    }
    VuVirtq *vq = &dev->vq[q->qidx];
    if (q->checked_gen != d->gen && !pyvu_fastq_check_rings(q, vq)) {
        pthread_rwlock_unlock(&d->lock);
        return 0;
    }
    limit = chunks ? pyvu_fastq_pop_limit(q) : 0;
    while (q->nslow < PYVU_QMAX && q->ndone < PYVU_QMAX && q->nfailed < PYVU_QMAX &&
           q->nbatch < PYVU_QMAX) {
        if (limit && popped == limit) {
            break;
        }
        const char *why = pyvu_next_chain_problem(dev, vq);
        if (why) {
            vu_panic(dev, "queue %d: %s", q->qidx, why);
            break;
        }
        struct pyvu_req *r = vu_queue_pop(dev, vq, sizeof(struct pyvu_req));
        if (!r) {
            break;
        }
        popped++;
        pyvu_q_in_flight_add(q, 1);
        q->requests++;
        if (!pyvu_fast_start(q, r, 0)) {
            q->slow[q->nslow++] = &r->elem;
        }
        pyvu_fastq_flush_locked(q);     /* done at once (null-co): the frontend sees it now */
    }
    if (q->laio && q->laio->npending) {
        pyvu_laio_submit(q->laio);
    }
    if (q->ring && (q->ring->u.pending || q->ring->u.nbacklog)) {
        pyvu_uring_submit(&q->ring->u);
    }
    pyvu_fastq_flush_locked(q);
    pthread_rwlock_unlock(&d->lock);
    return limit && popped == limit;
}

/* Pop and serve everything available.  Queue's thread, GIL released. */
static void pyvu_fastq_process(struct pyvu_fastq *q)
{
    pyvu_fastq_process_some(q, 0);
}

static int pyvu_fastq_needs_python(struct pyvu_fastq *q)
{
    return q->nslow || q->nfailed || q->nbatch;
}

static void pyvu_report_queue(struct pyvu_fastq *q, uint64_t *out, int *nout, int max)
{
    if (pyvu_fastq_needs_python(q) && !q->py_reported) {
        q->py_reported = 1;
        pyvu_emit(out, nout, max, PYVU_TOKEN_C | (uint64_t)(uintptr_t)q);
    }
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
 * Python takes up to max batched requests as plain values: type (VIRTIO_BLK_T_IN, _OUT,
 * _FLUSH, _DISCARD, _WRITE_ZEROES), flags (BDRV_REQ_FUA when the write cache is off,
 * BDRV_REQ_MAY_UNMAP, PYVU_BATCH_EACH), byte offset on the root node, length, and the data
 * iovecs (the status byte is not part of them; none for a flush, discard or write-zeroes);
 * ret[i] starts as PYVU_BATCH_UNSET.  *special: how many are not plain reads, writes and
 * flushes (another type, or PYVU_BATCH_EACH), so Python looks for them only when there are
 * some.  Queue's context.
 */
static int pyvu_fastq_take_batch(struct pyvu_fastq *q, void **handles, int *type, int *flags,
                                 uint64_t *offset, uint64_t *bytes, struct iovec **iov,
                                 unsigned *niov, int *ret, int *special, int max)
{
    int n = q->nbatch < max ? q->nbatch : max;
    *special = 0;
    for (int i = 0; i < n; i++) {
        struct pyvu_req *r = q->batch[i];
        handles[i] = r;
        ret[i] = PYVU_BATCH_UNSET;
        type[i] = r->type;
        flags[i] = (r->fua ? BDRV_REQ_FUA : 0) | r->flags;
        offset[i] = r->offset;
        bytes[i] = r->bytes;
        iov[i] = r->iov;
        niov[i] = r->niov;
        *special += (r->flags & PYVU_BATCH_EACH) || (r->type != VIRTIO_BLK_T_IN &&
                                                     r->type != VIRTIO_BLK_T_OUT &&
                                                     r->type != VIRTIO_BLK_T_FLUSH);
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
        if (ret[i] != PYVU_BATCH_UNSET || !pyvu_req_is_io(r)) {
            continue;               /* answered, taken by someone else, or not an I/O */
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
