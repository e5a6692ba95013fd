/*
 * The event poller of every AioContext: an epoll set whose C handlers are served without the
 * GIL, and the tokens handed to Python.
 *
 * Theory of operation
 * -------------------
 * Every AioContext waits in pyvu_poller_wait() (GIL released).  The epoll set holds two kinds of
 * entries: Python fds (reported back to Python as their fd number) and C handlers (a kick
 * eventfd of a queue, or an io_uring or Linux AIO completion eventfd), which are served right
 * here without the GIL: pop every available request, decide per request whether C can serve it,
 * submit or complete it, push the completions with one notification per batch
 * (virtio_blk_queue.c, io_uring.c, linux_aio.c).  What needs Python comes back as a token: a
 * Python fd, or PYVU_TOKEN_C | the address of a queue or ring with work for Python.
 *
 * Threads: a poller is only used by its AioContext's thread.
 *
 * Licence: GPL-2.0-or-later (linked with libvhost-user).
 */
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/*
 * Adaptive polling
 * ----------------
 * Before sleeping, an AioContext keeps looking for work for up to cur_poll_ns (at most poll_ns,
 * the iothread's poll-max-ns; 0: never poll): a frontend's next request then costs no wake-up
 * (a sleep and a wake-up cost the sleeper ~10-20 us of CPU in a VM, more than a whole batch of
 * requests).  Polling must pay for itself, so it happens only while it finds work:
 *
 *   - it looks at memory, not at the epoll set: a queue's avail index (vu_queue_empty, under
 *     the dispatch read lock), the Linux AIO completion ring's head/tail, io_uring's CQ ring
 *     (PYVU_POLL_MEM); the epoll set (Python fds: bottom halves, the vhost-user socket) is
 *     looked at every PYVU_POLL_EPOLL_NS and after the window;
 *   - PYVU_POLL_NOTIFY_OFF (not the default) also turns the polled queues' guest
 *     notifications off while polling (vu_queue_set_notification, QEMU's poll_begin/poll_end),
 *     on again before sleeping, and looks at the queues once more then.  Measured with the
 *     libblkio client on 2 pinned CPUs, null-co: QD1 0.1-0.7M IOPS with it, 2.0M without;
 *     QD32 1.4M with it, 2.3M without.  The frontend's kick costs it less than what the
 *     suppression costs us, so it stays off;
 *   - every poll is a hit (it found work) or a miss (the window ran out, and we slept).  The
 *     window grows (x2 from PYVU_POLL_GROW_START, as QEMU's poll-grow) after a miss whose sleep
 *     ended within poll_ns -- a longer window would have caught it -- and shrinks (/2, as
 *     poll-shrink; 0 below PYVU_POLL_GROW_START) after a sleep longer than poll_ns, and at the
 *     end of every PYVU_POLL_WINDOW polls in which fewer than half were hits.  An idle queue
 *     therefore stops polling after its first long sleep, and the window comes back with the
 *     first short one.
 * The counters (polls, hits, misses, time spent polling, the window) are in x-pyvhost-stats.
 */
#define PYVU_POLL_GROW_START 4000ull
#define PYVU_POLL_WINDOW 32
#define PYVU_POLL_EPOLL_NS 50000ull

/* A C handler the poller can look at in memory (a queue, an engine's completion ring). */
struct pyvu_pollsrc {
    int fd;
    struct pyvu_chandler *h;
};

struct pyvu_poller {
    int epfd;
    uint64_t poll_ns;           /* maximum window; 0: never poll */
    uint64_t cur_poll_ns;       /* current adaptive window */
    uint64_t polls, poll_hits;  /* statistics: polls, polls that found work */
    uint64_t poll_misses;       /* polls whose window ran out */
    uint64_t poll_spin_ns;      /* time spent polling */
    uint64_t poll_grows, poll_shrinks;
    uint64_t win_polls, win_hits;   /* this measurement window (PYVU_POLL_WINDOW polls) */
    int mode;                   /* PYVU_POLL_MEM | PYVU_POLL_NOTIFY_OFF */
    int notify_off;             /* the polled queues' notifications are off */
    uint64_t last_epoll_ns;
    struct pyvu_pollsrc *src;
    int nsrc, capsrc;
};

static int pyvu_poller_init(struct pyvu_poller *p)
{
    memset(p, 0, sizeof(*p));
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    p->mode = PYVU_POLL_MEM;        /* PYVU_POLL_NOTIFY_OFF measured slower: see above */
    return p->epfd < 0 ? -errno : 0;
}

static void pyvu_poll_grow(struct pyvu_poller *p)
{
    if (p->cur_poll_ns < p->poll_ns) {
        p->cur_poll_ns = p->cur_poll_ns ? p->cur_poll_ns * 2 : PYVU_POLL_GROW_START;
        if (p->cur_poll_ns > p->poll_ns) {
            p->cur_poll_ns = p->poll_ns;
        }
        p->poll_grows++;
    }
}

static void pyvu_poll_shrink(struct pyvu_poller *p)
{
    if (p->cur_poll_ns) {
        p->cur_poll_ns /= 2;
        if (p->cur_poll_ns < PYVU_POLL_GROW_START) {
            p->cur_poll_ns = 0;
        }
        p->poll_shrinks++;
    }
}

/* After a sleep of block_ns that followed a miss (or no poll at all), as QEMU's
 * adjust_polling_time. */
static void pyvu_poller_adjust(struct pyvu_poller *p, uint64_t block_ns)
{
    if (block_ns <= p->cur_poll_ns) {
        return;                                   /* the sweet spot */
    }
    if (block_ns > p->poll_ns) {
        pyvu_poll_shrink(p);                      /* would poll too long: poll less */
    } else {
        pyvu_poll_grow(p);
    }
}

/* One poll's outcome, and the end of a measurement window. */
static void pyvu_poll_count(struct pyvu_poller *p, int hit)
{
    p->polls++;
    p->win_polls++;
    if (hit) {
        p->poll_hits++;
        p->win_hits++;
    } else {
        p->poll_misses++;
    }
    if (p->win_polls >= PYVU_POLL_WINDOW) {
        if (p->win_hits * 2 < p->win_polls) {
            pyvu_poll_shrink(p);                  /* polling mostly found nothing */
        }
        p->win_polls = p->win_hits = 0;
    }
}

static void pyvu_poller_close(struct pyvu_poller *p)
{
    if (p->epfd >= 0) {
        close(p->epfd);
        p->epfd = -1;
    }
    free(p->src);
    p->src = NULL;
    p->nsrc = p->capsrc = 0;
}

/*
 * A Python fd: its token is the fd number, with the epoll events that fired in the bits from
 * PYVU_TOKEN_EVENTS_SHIFT up (EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP).
 */
static int pyvu_poller_add_py_events(struct pyvu_poller *p, int fd, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.u64 = (uint64_t)(unsigned)fd };
    return epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 ? -errno : 0;
}

static int pyvu_poller_mod_py(struct pyvu_poller *p, int fd, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.u64 = (uint64_t)(unsigned)fd };
    return epoll_ctl(p->epfd, EPOLL_CTL_MOD, fd, &ev) < 0 ? -errno : 0;
}

static int pyvu_poller_add_py(struct pyvu_poller *p, int fd)
{
    return pyvu_poller_add_py_events(p, fd, EPOLLIN);
}

/*
 * An epoll entry's data is a Python fd (a small number) or a C handler tagged with
 * PYVU_EP_CHANDLER.  The tag, not the value's size, tells them apart: with a non-PIE Python
 * (Debian's /usr/bin/python3) the heap, and so a handler, can sit below 4 GiB.
 */
#define PYVU_EP_CHANDLER  (1ULL << 63)

/* A queue's guest notifications on or off (its AioContext's thread). */
static void pyvu_queue_set_notify(struct pyvu_fastq *q, int enable)
{
    struct pyvu_dev *d = q->pdev;
    pthread_rwlock_rdlock(&d->lock);
    /* d->vu.vq is gone after vu_deinit (the connection closed; detaching follows) */
    if (d->vu.vq && !d->vu.broken && vu_is_vq_usable(&d->vu, &d->vu.vq[q->qidx])) {
        vu_queue_set_notification(&d->vu, &d->vu.vq[q->qidx], enable);
    }
    pthread_rwlock_unlock(&d->lock);
}

static int pyvu_poller_add_c(struct pyvu_poller *p, int fd, struct pyvu_chandler *h)
{
    struct epoll_event ev = { .events = EPOLLIN,
                              .data.u64 = PYVU_EP_CHANDLER | (uint64_t)(uintptr_t)h };
    if (p->nsrc == p->capsrc) {
        int cap = p->capsrc ? 2 * p->capsrc : 8;
        struct pyvu_pollsrc *s = realloc(p->src, cap * sizeof(*s));
        if (!s) {
            return -ENOMEM;
        }
        p->src = s;
        p->capsrc = cap;
    }
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        return -errno;
    }
    p->src[p->nsrc].fd = fd;
    p->src[p->nsrc].h = h;
    p->nsrc++;
    return 0;
}

static int pyvu_poller_del(struct pyvu_poller *p, int fd)
{
    for (int i = 0; i < p->nsrc; i++) {
        if (p->src[i].fd == fd) {
            struct pyvu_chandler *h = p->src[i].h;
            if (p->notify_off && h->type == PYVU_H_KICK) {
                pyvu_queue_set_notify(h->obj, 1);   /* its next context may sleep at once */
            }
            p->src[i] = p->src[--p->nsrc];
            break;
        }
    }
    return epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, NULL) < 0 ? -errno : 0;
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

/*
 * A kick serves the queue for as long as the frontend keeps it busy, as qsd's request loop
 * does: completions that are already there after submitting (page cache, null-co) are
 * finished at once, and requests that arrived meanwhile are popped, without a trip through
 * epoll and two eventfds per request.  Bounded, so the context's other handlers get their turn;
 * a queue left with requests in its ring (popped PYVU_SUBMIT_EVERY at a time) kicks itself, so
 * it is served again after them.
 */
#define PYVU_BUSY_ROUNDS 32

/* Serve a queue that has requests (a kick, or polling saw them): see PYVU_BUSY_ROUNDS. */
static void pyvu_serve_queue(struct pyvu_fastq *q, uint64_t *out, int *nout, int max)
{
    int reaped = 0, more = 0;
    for (int round = 0; round < PYVU_BUSY_ROUNDS; round++) {
        uint64_t before = q->requests;
        more = pyvu_fastq_process_some(q, 1);
        if (q->laio) {
            long inflight = q->laio->inflight;
            pyvu_laio_complete(q->laio, out, nout, max);
            reaped |= q->laio->inflight != inflight;
        } else if (q->ring) {
            pyvu_ring_complete(q->ring, out, nout, max);
        }
        if (q->requests == before || pyvu_fastq_needs_python(q)) {
            break;
        }
    }
    /*
     * Linux AIO signals its eventfd for every completion, also for those reaped above from
     * the ring (tmpfs and the page cache complete inside io_submit).  With nothing left in
     * flight, every count on it is for work done here: clear it now (one read), or the next
     * epoll_wait would return at once for it and cost an epoll_wait and a read per batch
     * (counted with perf stat syscalls:*, 2 -> 1 per batch at QD32 with polling off).  A
     * completion that signals after this read is harmless: at worst a wake-up that finds
     * nothing.
     */
    if (reaped && q->laio->inflight == 0 && !q->laio->npending) {
        eventfd_t v;
        eventfd_read(q->laio->efd, &v);     /* nonblocking: may be 0 */
    }
    if (more && q->kick_fd >= 0) {
        eventfd_write(q->kick_fd, 1);       /* requests left in the ring: come back for them */
    }
    pyvu_report_queue(q, out, nout, max);
}

static void pyvu_handle_c(struct pyvu_chandler *h, uint64_t *out, int *nout, int max)
{
    eventfd_t v;
    if (h->type == PYVU_H_KICK) {
        struct pyvu_fastq *q = h->obj;
        eventfd_read(q->kick_fd, &v);
        q->kicks++;
        pyvu_serve_queue(q, out, nout, max);
    } else if (h->type == PYVU_H_LAIO) {
        struct pyvu_laio *l = h->obj;
        eventfd_read(l->efd, &v);
        pyvu_laio_complete(l, out, nout, max);
    } else if (h->type == PYVU_H_URING) {
        struct pyvu_ring *ring = h->obj;
        eventfd_read(ring->u.efd, &v);
        pyvu_ring_complete(ring, out, nout, max);
    } else if (h->type == PYVU_H_RBD) {
        struct pyvu_rbd *e = h->obj;
        eventfd_read(e->efd, &v);
        pyvu_rbd_complete(e, out, nout, max);
    }
}

/* ---- polling memory ---- */

/* Linux AIO completions waiting in the ring the kernel maps at the context's address. */
static int pyvu_laio_ready(struct pyvu_laio *l)
{
    struct pyvu_aio_ring *ring = (struct pyvu_aio_ring *)(uintptr_t)l->ctx;
    if (!l->inflight) {
        return 0;
    }
    if (ring->magic != PYVU_AIO_RING_MAGIC || ring->incompat_features) {
        return 1;   /* a layout we do not know: let the eventfd tell */
    }
    return ring->head != __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);
}

/* Requests in a queue's avail ring that this context may pop now. */
static int pyvu_queue_ready(struct pyvu_fastq *q)
{
    struct pyvu_dev *d = q->pdev;
    int ready;
    if (__atomic_load_n(&q->paused, __ATOMIC_ACQUIRE)) {
        return 0;
    }
    pthread_rwlock_rdlock(&d->lock);
    ready = d->vu.vq && !d->vu.broken && !vu_queue_empty(&d->vu, &d->vu.vq[q->qidx]);
    pthread_rwlock_unlock(&d->lock);
    return ready;
}

/* Look at every source once, in memory; serve what has work.  Returns whether any progressed. */
static int pyvu_poll_sources(struct pyvu_poller *p, uint64_t *out, int *nout, int max)
{
    int progress = 0;
    for (int i = 0; i < p->nsrc; i++) {
        struct pyvu_chandler *h = p->src[i].h;
        if (h->type == PYVU_H_KICK) {
            struct pyvu_fastq *q = h->obj;
            if (pyvu_queue_ready(q)) {
                uint64_t before = q->requests;
                pyvu_serve_queue(q, out, nout, max);
                progress |= q->requests != before;
            }
        } else if (h->type == PYVU_H_LAIO) {
            struct pyvu_laio *l = h->obj;
            if (pyvu_laio_ready(l)) {
                long before = l->inflight;
                pyvu_laio_complete(l, out, nout, max);
                progress |= l->inflight != before;
            }
        } else if (h->type == PYVU_H_URING) {
            struct pyvu_ring *ring = h->obj;
            if (io_uring_cq_ready(&ring->u.ring)) {
                pyvu_ring_complete(ring, out, nout, max);
                progress = 1;
            }
        } else if (h->type == PYVU_H_RBD) {
            struct pyvu_rbd *e = h->obj;
            if (__atomic_load_n(&e->ndone, __ATOMIC_ACQUIRE)) {   /* a hint: read locked */
                eventfd_t v;
                eventfd_read(e->efd, &v);   /* (nonblocking: it may be 0 by now) */
                pyvu_rbd_complete(e, out, nout, max);
                progress = 1;
            }
        }
    }
    return progress;
}

/* The polled queues' notifications off (start polling) or on (about to sleep). */
static void pyvu_poll_notify(struct pyvu_poller *p, int enable)
{
    for (int i = 0; i < p->nsrc; i++) {
        if (p->src[i].h->type == PYVU_H_KICK) {
            pyvu_queue_set_notify(p->src[i].h->obj, enable);
        }
    }
    p->notify_off = !enable;
}

static int pyvu_poller_dispatch(struct epoll_event *ev, int n, uint64_t *out, int *nout,
                                int max)
{
    for (int i = 0; i < n; i++) {
        uint64_t u = ev[i].data.u64;
        if (u & PYVU_EP_CHANDLER) {
            pyvu_handle_c((struct pyvu_chandler *)(uintptr_t)(u & ~PYVU_EP_CHANDLER),
                          out, nout, max);
        } else {
            pyvu_emit(out, nout, max, u | ((uint64_t)ev[i].events << PYVU_TOKEN_EVENTS_SHIFT));
        }
    }
    return n;
}

/*
 * One poll (PYVU_POLL_MEM): look at the sources in memory for up to the window, and at the
 * epoll set every PYVU_POLL_EPOLL_NS.  Returns 1 if it found work (served here, or events in
 * ev[0..*n)), 0 if the window ran out.
 */
static int pyvu_poll_mem(struct pyvu_poller *p, struct epoll_event *ev, int *n,
                         uint64_t *out, int *nout, int max)
{
    uint64_t t0 = pyvu_now_ns(), now = t0, until = t0 + p->cur_poll_ns;
    int hit = 0;

    if ((p->mode & PYVU_POLL_NOTIFY_OFF) && !p->notify_off) {
        pyvu_poll_notify(p, 0);
    }
    *n = 0;
    if (t0 - p->last_epoll_ns >= PYVU_POLL_EPOLL_NS) {
        /* busy with C work since the last look: Python's fds get their turn */
        p->last_epoll_ns = t0;
        *n = epoll_wait(p->epfd, ev, 32, 0);
        if (*n != 0) {
            return *n > 0;
        }
    }
    for (;;) {
        if (pyvu_poll_sources(p, out, nout, max)) {
            hit = 1;
            break;
        }
        now = pyvu_now_ns();
        if (now - p->last_epoll_ns >= PYVU_POLL_EPOLL_NS || now >= until) {
            p->last_epoll_ns = now;
            *n = epoll_wait(p->epfd, ev, 32, 0);
            if (*n != 0) {
                hit = *n > 0;
                break;
            }
        }
        if (now >= until) {
            break;
        }
    }
    p->poll_spin_ns += pyvu_now_ns() - t0;
    return hit;
}

/*
 * Wait for events.  C handlers are served here; returns the number of tokens for Python
 * (a Python fd with its events, or PYVU_TOKEN_C|pointer of a queue/ring with work for
 * Python), 0 on timeout, -EINTR if a signal interrupted the wait.
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
            if (p->mode & PYVU_POLL_MEM) {
                int hit = pyvu_poll_mem(p, ev, &n, out, &nout, max);
                pyvu_poll_count(p, hit);
                if (hit && n == 0) {
                    goto served;        /* served in C: poll again, or return tokens */
                }
            } else {
                uint64_t t0 = pyvu_now_ns(), until = t0 + p->cur_poll_ns;
                do {
                    n = epoll_wait(p->epfd, ev, 32, 0);
                } while (n == 0 && pyvu_now_ns() < until);
                p->poll_spin_ns += pyvu_now_ns() - t0;
                pyvu_poll_count(p, n > 0);
            }
        }
        if (n == 0) {
            if (may_block && p->notify_off) {
                /* about to sleep: notifications on, then look once more (poll_end) */
                pyvu_poll_notify(p, 1);
                if (pyvu_poll_sources(p, out, &nout, max)) {
                    goto served;
                }
            }
            uint64_t t0 = may_block ? pyvu_now_ns() : 0;
            n = epoll_wait(p->epfd, ev, 32, nout ? 0 : timeout_ms);
            if (may_block && n > 0 && p->poll_ns) {
                uint64_t t1 = pyvu_now_ns();
                p->last_epoll_ns = t1;
                pyvu_poller_adjust(p, t1 - t0);
            }
        }
        if (n < 0) {
            if (errno == EINTR) {
                return nout ? nout : -EINTR;
            }
            return nout ? nout : -errno;
        }
        pyvu_poller_dispatch(ev, n, out, &nout, max);
        if (nout || n == 0 || timeout_ms == 0) {
            return nout;
        }
        goto check_deadline;
served:
        if (nout || timeout_ms == 0) {
            return nout;
        }
check_deadline:
        if (timeout_ms > 0) {
            uint64_t now = pyvu_now_ns();
            if (now >= deadline) {
                return 0;
            }
            timeout_ms = (int)((deadline - now) / 1000000ull) + 1;
        }
    }
}
