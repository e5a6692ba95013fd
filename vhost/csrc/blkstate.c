/*
 * The BlockBackend core shared by both request paths: struct pyvu_blkstate (vhost/pyvu.h), one
 * per BlockBackend, the single source of truth for in-flight counts and accounting, and the
 * drain waiters.
 *
 * Theory of operation
 * -------------------
 * Both paths count in the same counters: blk->in_flight (BlockBackend in-flight),
 * q->in_flight (popped, not pushed: virtio_blk_queue.c) and the accounting arrays.  When a
 * counter drops to zero and Python waits for a drain (pyvu_waiters), pyvu_wait_efd is
 * signalled, which wakes the main loop to re-check its aio_wait conditions.
 *
 * Threads: the blkstate's counters are atomics shared by all queues and the Python side.
 *
 * Licence: GPL-2.0-or-later (linked with libvhost-user).
 */
#include <sys/eventfd.h>
#include <string.h>
#include <time.h>

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
