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
