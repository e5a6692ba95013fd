// SPDX-License-Identifier: MIT
/*
 * blkio_client - a third-party vhost-user-blk client for pyvhost-blk's
 * integration tests and benchmarks, built on libblkio's
 * "virtio-blk-vhost-user" driver.
 *
 * Two modes, one JSON object on stdout:
 *
 *   --mode bench   keep --iodepth requests in flight on each of --queues
 *                  queues (one pthread per queue) for --runtime seconds or
 *                  --count requests; report IOPS, throughput, latency and
 *                  the client's own CPU usage.
 *
 *   --mode verify  write --blocks distinct random 4 KiB blocks with a stamped
 *                  pattern, flush every queue, read them all back (on a
 *                  different queue than the one that wrote them when there
 *                  are several) and compare; then send one out-of-range read
 *                  on queue 0, which must fail.
 *
 * Build: gcc -O2 -pthread blkio_client.c $(pkg-config --cflags --libs blkio)
 * (benchmarks/build_client.py does this and caches the binary).
 */
#define _GNU_SOURCE
#include <blkio.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define VERIFY_BS 4096u
#define MAX_QUEUES 64
#define MAX_IODEPTH 1024

/* ------------------------------------------------------------------ */
/* options                                                              */

enum mode { MODE_BENCH, MODE_VERIFY };
enum phase { PHASE_BOTH, PHASE_WRITE, PHASE_READ };
static const char *const phase_names[] = { "both", "write", "read" };
enum oob { OOB_END, OOB_STRADDLE, OOB_NONE };
static const char *const oob_names[] = { "end", "straddle", "none" };
enum rw { RW_RANDREAD, RW_RANDWRITE, RW_READ, RW_WRITE };
static const char *const rw_names[] = { "randread", "randwrite", "read", "write" };

static struct {
    const char *socket;
    int queues;
    enum mode mode;
    enum rw rw;
    uint64_t bs;
    int iodepth;          /* -1: mode default */
    double runtime;
    uint64_t count;       /* 0: use runtime */
    uint64_t size;        /* 0: capacity */
    uint64_t blocks;
    uint64_t seed;
    enum oob oob;
    enum phase phase;
    bool raw_oob;         /* accepted for compatibility; no effect */
    double io_timeout;    /* seconds to wait for any completion */
    int queue_size;       /* 0: libblkio default */
    bool poll;            /* busy-poll for completions */
} opt = {
    .queues = 1,
    .mode = MODE_BENCH,
    .rw = RW_RANDREAD,
    .bs = 4096,
    .iodepth = -1,
    .runtime = 5.0,
    .blocks = 2000,
    .seed = 1,
    .io_timeout = 30.0,
};

static void usage(FILE *f)
{
    fprintf(f,
"usage: blkio_client --socket PATH [--queues N] [--mode bench|verify] [options]\n"
"\n"
"Connects to a vhost-user-blk export with libblkio's virtio-blk-vhost-user\n"
"driver and prints one JSON object on stdout.\n"
"\n"
"common options:\n"
"  --socket PATH       vhost-user unix socket (required)\n"
"  --queues N          queues to use, one thread per queue (default 1)\n"
"  --mode MODE         bench (default) or verify\n"
"  --iodepth N         requests in flight per queue (bench 32, verify 16)\n"
"  --size BYTES        use only the first BYTES of the disk (default: capacity)\n"
"  --io-timeout SECS   give up if no completion arrives for SECS (default 30)\n"
"  --queue-size N      virtqueue size (default: libblkio's, 256)\n"
"  --poll              busy-poll for completions instead of sleeping on the\n"
"                      completion eventfd (burns a core per queue)\n"
"\n"
"bench options:\n"
"  --rw KIND           randread (default), randwrite, read, write\n"
"  --bs BYTES          request size (default 4096)\n"
"  --runtime SECS      run for SECS seconds (float, default 5)\n"
"  --count N           instead of --runtime: issue N requests in total\n"
"\n"
"verify options:\n"
"  --blocks N          distinct 4 KiB blocks to write and check (default 2000)\n"
"  --seed S            seed for block choice and data stamps (default 1)\n"
"  --phase PHASE       both (default): write, flush, read back and compare;\n"
"                      write: only write+flush; read: only read back and\n"
"                      compare (same --seed/--blocks/--size, e.g. after a\n"
"                      daemon restart)\n"
"  --oob SHAPE         out-of-range read probe on queue 0 after the check:\n"
"                      end (default): 4 KiB at offset == capacity;\n"
"                      straddle: 4 KiB at capacity-512 (starts in range);\n"
"                      none: skip (oob_failed is then not required)\n"
"  --raw-oob           no-op: libblkio 1.5 does no client-side range check,\n"
"                      the probe always reaches the daemon (see README)\n"
"\n"
"BYTES accept K/M/G/T suffixes (powers of 1024).\n"
"exit status: 0 ok; 1 I/O failure or verification failure; 2 usage error;\n"
"3 connection/setup failure.\n");
}

static void die_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "blkio_client: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n\n");
    usage(stderr);
    exit(2);
}

static bool parse_u64(const char *s, uint64_t *out, bool suffixes)
{
    char *end;
    if (!s || !*s || *s == '-')
        return false;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s)
        return false;
    unsigned shift = 0;
    if (suffixes && *end) {
        switch (*end) {
        case 'k': case 'K': shift = 10; break;
        case 'm': case 'M': shift = 20; break;
        case 'g': case 'G': shift = 30; break;
        case 't': case 'T': shift = 40; break;
        default: return false;
        }
        end++;
        if (*end == 'i' && end[1] == 'B')
            end += 2;
        else if (*end == 'B')
            end++;
    }
    if (*end)
        return false;
    if (shift && v > (UINT64_MAX >> shift))
        return false;
    *out = (uint64_t)v << shift;
    return true;
}

static bool parse_double(const char *s, double *out)
{
    char *end;
    if (!s || !*s)
        return false;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || !(v > 0))
        return false;
    *out = v;
    return true;
}

static void parse_args(int argc, char **argv)
{
    enum { O_SOCKET = 256, O_QUEUES, O_MODE, O_RW, O_BS, O_IODEPTH, O_RUNTIME,
           O_COUNT, O_SIZE, O_BLOCKS, O_SEED, O_RAW_OOB, O_OOB, O_PHASE, O_IO_TIMEOUT,
           O_QUEUE_SIZE, O_POLL, O_HELP };
    static const struct option longopts[] = {
        { "socket", required_argument, NULL, O_SOCKET },
        { "queues", required_argument, NULL, O_QUEUES },
        { "mode", required_argument, NULL, O_MODE },
        { "rw", required_argument, NULL, O_RW },
        { "bs", required_argument, NULL, O_BS },
        { "iodepth", required_argument, NULL, O_IODEPTH },
        { "runtime", required_argument, NULL, O_RUNTIME },
        { "count", required_argument, NULL, O_COUNT },
        { "size", required_argument, NULL, O_SIZE },
        { "blocks", required_argument, NULL, O_BLOCKS },
        { "seed", required_argument, NULL, O_SEED },
        { "raw-oob", no_argument, NULL, O_RAW_OOB },
        { "oob", required_argument, NULL, O_OOB },
        { "phase", required_argument, NULL, O_PHASE },
        { "io-timeout", required_argument, NULL, O_IO_TIMEOUT },
        { "queue-size", required_argument, NULL, O_QUEUE_SIZE },
        { "poll", no_argument, NULL, O_POLL },
        { "help", no_argument, NULL, O_HELP },
        { NULL, 0, NULL, 0 },
    };
    bool runtime_given = false;
    uint64_t v;
    int c;

    opterr = 0;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case O_SOCKET:
            opt.socket = optarg;
            break;
        case O_QUEUES:
            if (!parse_u64(optarg, &v, false) || v < 1 || v > MAX_QUEUES)
                die_usage("--queues must be an integer in 1..64, got '%s'", optarg);
            opt.queues = (int)v;
            break;
        case O_MODE:
            if (!strcmp(optarg, "bench"))
                opt.mode = MODE_BENCH;
            else if (!strcmp(optarg, "verify"))
                opt.mode = MODE_VERIFY;
            else
                die_usage("--mode must be bench or verify, got '%s'", optarg);
            break;
        case O_RW: {
            int i;
            for (i = 0; i < 4; i++)
                if (!strcmp(optarg, rw_names[i]))
                    break;
            if (i == 4)
                die_usage("--rw must be randread, randwrite, read or write, got '%s'", optarg);
            opt.rw = (enum rw)i;
            break;
        }
        case O_BS:
            if (!parse_u64(optarg, &v, true) || v < 512 || v % 512 || v > (64u << 20))
                die_usage("--bs must be a multiple of 512 up to 64M, got '%s'", optarg);
            opt.bs = v;
            break;
        case O_IODEPTH:
            if (!parse_u64(optarg, &v, false) || v < 1 || v > MAX_IODEPTH)
                die_usage("--iodepth must be an integer in 1..1024, got '%s'", optarg);
            opt.iodepth = (int)v;
            break;
        case O_RUNTIME:
            if (!parse_double(optarg, &opt.runtime))
                die_usage("--runtime must be a positive number of seconds, got '%s'", optarg);
            runtime_given = true;
            break;
        case O_COUNT:
            if (!parse_u64(optarg, &v, true) || v < 1)
                die_usage("--count must be a positive integer, got '%s'", optarg);
            opt.count = v;
            break;
        case O_SIZE:
            if (!parse_u64(optarg, &v, true) || v < 1)
                die_usage("--size must be a positive byte count, got '%s'", optarg);
            opt.size = v;
            break;
        case O_BLOCKS:
            if (!parse_u64(optarg, &v, true) || v < 1)
                die_usage("--blocks must be a positive integer, got '%s'", optarg);
            opt.blocks = v;
            break;
        case O_SEED:
            if (!parse_u64(optarg, &v, false))
                die_usage("--seed must be a non-negative integer, got '%s'", optarg);
            opt.seed = v;
            break;
        case O_RAW_OOB:
            opt.raw_oob = true;
            break;
        case O_PHASE: {
            int i;
            for (i = 0; i < 3; i++)
                if (!strcmp(optarg, phase_names[i]))
                    break;
            if (i == 3)
                die_usage("--phase must be both, write or read, got '%s'", optarg);
            opt.phase = (enum phase)i;
            break;
        }
        case O_OOB: {
            int i;
            for (i = 0; i < 3; i++)
                if (!strcmp(optarg, oob_names[i]))
                    break;
            if (i == 3)
                die_usage("--oob must be end, straddle or none, got '%s'", optarg);
            opt.oob = (enum oob)i;
            break;
        }
        case O_IO_TIMEOUT:
            if (!parse_double(optarg, &opt.io_timeout))
                die_usage("--io-timeout must be a positive number of seconds, got '%s'", optarg);
            break;
        case O_QUEUE_SIZE:
            if (!parse_u64(optarg, &v, false) || v < 1 || v > 32768)
                die_usage("--queue-size must be an integer in 1..32768, got '%s'", optarg);
            opt.queue_size = (int)v;
            break;
        case O_POLL:
            opt.poll = true;
            break;
        case O_HELP:
        case 'h':
            usage(stdout);
            exit(0);
        case ':':
            die_usage("option %s needs an argument", argv[optind - 1]);
            break;
        default:
            die_usage("unknown option '%s'", argv[optind - 1]);
        }
    }
    if (optind < argc)
        die_usage("unexpected argument '%s'", argv[optind]);
    if (!opt.socket)
        die_usage("%s", "--socket PATH is required");
    if (opt.count && runtime_given)
        die_usage("%s", "--runtime and --count are mutually exclusive");
    if (opt.iodepth < 0)
        opt.iodepth = opt.mode == MODE_BENCH ? 32 : 16;
    if (opt.queue_size && opt.iodepth > opt.queue_size)
        die_usage("%s", "--iodepth must not exceed --queue-size");
}

/* ------------------------------------------------------------------ */
/* helpers                                                              */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [0, n) */
static inline uint64_t rand_below(uint64_t *state, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)splitmix64(state) * n) >> 64);
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; s && *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch == '\n')
            fputs("\\n", f);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;
static bool err_printed;

/* Print the first failed request's message (only the first, to stderr). */
static void note_request_error(const char *what, uint64_t off, int ret, const char *msg)
{
    pthread_mutex_lock(&err_lock);
    if (!err_printed) {
        err_printed = true;
        fprintf(stderr, "blkio_client: %s at offset %" PRIu64 " failed: ret=%d (%s)%s%s\n",
                what, off, ret, strerror(-ret), msg ? ": " : "", msg ? msg : "");
    }
    pthread_mutex_unlock(&err_lock);
}

/* Latency histogram: log-linear, 32 sub-buckets per power of two (~3%). */
#define HIST_SUB_BITS 5
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_BUCKETS (64 * HIST_SUB)

static inline unsigned hist_index(uint64_t v)
{
    if (v < HIST_SUB)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);        /* >= HIST_SUB_BITS */
    unsigned sub = (unsigned)(v >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1);
    return (e - HIST_SUB_BITS + 1) * HIST_SUB + sub;
}

/* midpoint of a bucket's value range */
static double hist_value(unsigned idx)
{
    if (idx < HIST_SUB)
        return idx;
    unsigned e = idx / HIST_SUB + HIST_SUB_BITS - 1;
    unsigned sub = idx % HIST_SUB;
    double lo = (double)(HIST_SUB + sub) * (double)(1ull << (e - HIST_SUB_BITS));
    double width = (double)(1ull << (e - HIST_SUB_BITS));
    return lo + width / 2;
}

static double hist_percentile(const uint64_t *h, uint64_t total, double pct)
{
    if (!total)
        return 0;
    uint64_t rank = (uint64_t)((pct / 100.0) * (double)total);
    if (rank >= total)
        rank = total - 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h[i];
        if (seen > rank)
            return hist_value(i);
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* per-queue state and the request engine                               */

struct slot {
    uint8_t *buf;
    uint64_t off;
    uint64_t t_submit;
    uint64_t tag;          /* verify: index into the block list */
    int op;                /* 0 read, 1 write */
};

struct qstate {
    int index;
    struct blkioq *q;
    uint8_t *bufs;
    size_t slot_len;
    struct slot *slots;
    struct slot **free_slots;
    int nfree;
    int inflight;
    struct blkio_completion *comps;
    bool fatal;            /* blkioq_do_io failed or timed out */

    /* bench */
    uint64_t rng;
    uint64_t budget;       /* requests still to issue (count mode) */
    uint64_t deadline;     /* ns (runtime mode) */
    uint64_t seq_pos;      /* block index for sequential modes */
    uint64_t ios, errors;
    uint64_t lat_sum_ns;
    uint64_t *hist;

    /* verify */
    const uint64_t *wlist; /* indices into g_blocks this queue writes */
    uint64_t nwlist;
    const uint64_t *rlist; /* ... and reads back */
    uint64_t nrlist;
    uint64_t cursor;
    uint8_t *expect;       /* scratch for the expected pattern */
    uint64_t written, read, mismatches, write_errors, read_errors, flush_errors;

    uint64_t requests;     /* every request submitted on this queue */
};

static struct blkio *g_b;
static uint64_t g_capacity;
static uint64_t g_size;              /* usable region */
static uint64_t g_nblk;              /* g_size / block size */
static uint64_t *g_blocks;           /* verify: chosen block numbers */
static struct qstate g_qs[MAX_QUEUES];
static pthread_barrier_t g_start_barrier, g_phase_barrier;
static atomic_uint_fast64_t g_mismatch_reports;

/* producer: fill *s with the next request; false when nothing more to issue */
typedef bool (*produce_fn)(struct qstate *qs, struct slot *s, uint64_t now);
typedef void (*complete_fn)(struct qstate *qs, struct slot *s,
                            const struct blkio_completion *c, uint64_t now);

static int do_io_wait(struct qstate *qs, int min, int max)
{
    if (opt.poll) {
        uint64_t start = 0;
        for (unsigned spins = 0;; spins++) {
            int n = blkioq_do_io(qs->q, qs->comps, 0, max, NULL);
            if (n < 0 || n >= min)
                return n;
            if ((spins & 1023) == 1023) {
                uint64_t t = now_ns();
                if (!start)
                    start = t;
                else if ((double)(t - start) > opt.io_timeout * 1e9)
                    return -ETIME;
            }
        }
    }
    struct timespec to;
    to.tv_sec = (time_t)opt.io_timeout;
    to.tv_nsec = (long)((opt.io_timeout - (double)to.tv_sec) * 1e9);
    return blkioq_do_io(qs->q, qs->comps, min, max, &to);
}

static void report_fatal(struct qstate *qs, int ret)
{
    pthread_mutex_lock(&err_lock);
    if (ret == -ETIME)
        fprintf(stderr, "blkio_client: queue %d: no completion within %.1f s "
                "(%d requests in flight); giving up\n",
                qs->index, opt.io_timeout, qs->inflight);
    else
        fprintf(stderr, "blkio_client: queue %d: blkioq_do_io failed: %s: %s\n",
                qs->index, strerror(-ret), blkio_get_error_msg());
    pthread_mutex_unlock(&err_lock);
    qs->fatal = true;
}

/* Keep up to opt.iodepth requests in flight until the producer runs dry. */
static void run_engine(struct qstate *qs, produce_fn produce, complete_fn complete)
{
    uint64_t now = now_ns();
    for (;;) {
        while (qs->nfree > 0 && !qs->fatal) {
            struct slot *s = qs->free_slots[qs->nfree - 1];
            if (!produce(qs, s, now))
                break;
            qs->nfree--;
            s->t_submit = now;
            if (s->op)
                blkioq_write(qs->q, s->off, s->buf, qs->slot_len, s, 0);
            else
                blkioq_read(qs->q, s->off, s->buf, qs->slot_len, s, 0);
            qs->inflight++;
            qs->requests++;
        }
        if (qs->inflight == 0 || qs->fatal)
            return;
        int n = do_io_wait(qs, 1, opt.iodepth);
        if (n < 0) {
            report_fatal(qs, n);
            return;
        }
        now = now_ns();
        for (int i = 0; i < n; i++) {
            struct slot *s = qs->comps[i].user_data;
            complete(qs, s, &qs->comps[i], now);
            qs->free_slots[qs->nfree++] = s;
            qs->inflight--;
        }
    }
}

/* ------------------------------------------------------------------ */
/* bench mode                                                           */

static bool bench_produce(struct qstate *qs, struct slot *s, uint64_t now)
{
    if (opt.count) {
        if (!qs->budget)
            return false;
        qs->budget--;
    } else if (now >= qs->deadline) {
        return false;
    }
    uint64_t blk;
    if (opt.rw == RW_RANDREAD || opt.rw == RW_RANDWRITE) {
        blk = rand_below(&qs->rng, g_nblk);
    } else {
        blk = qs->seq_pos;
        if (++qs->seq_pos >= g_nblk)
            qs->seq_pos = 0;
    }
    s->off = blk * opt.bs;
    s->op = (opt.rw == RW_RANDWRITE || opt.rw == RW_WRITE);
    return true;
}

static void bench_complete(struct qstate *qs, struct slot *s,
                           const struct blkio_completion *c, uint64_t now)
{
    if (c->ret != 0) {
        qs->errors++;
        note_request_error(s->op ? "write" : "read", s->off, c->ret, c->error_msg);
        return;
    }
    uint64_t lat = now - s->t_submit;
    qs->ios++;
    qs->lat_sum_ns += lat;
    qs->hist[hist_index(lat)]++;
}

static void *bench_thread(void *arg)
{
    struct qstate *qs = arg;
    pthread_barrier_wait(&g_start_barrier);
    if (!opt.count)
        qs->deadline = now_ns() + (uint64_t)(opt.runtime * 1e9);
    run_engine(qs, bench_produce, bench_complete);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* verify mode                                                          */

#define STAMP_MAGIC 0x4b4c4248562d5950ull   /* "PY-VHBLK" little-endian */

/*
 * Every 32-byte unit of a block holds {magic, byte offset, seed,
 * block-list index << 32 | unit index}, so a block that lands at the wrong
 * offset, stale data from another run (other seed), zeroes, or data shifted
 * within the block all show up as mismatches.
 */
static void fill_stamp(uint8_t *buf, uint64_t off, uint64_t idx)
{
    uint64_t *w = (uint64_t *)buf;
    for (unsigned u = 0; u < VERIFY_BS / 32; u++) {
        w[4 * u + 0] = STAMP_MAGIC;
        w[4 * u + 1] = off;
        w[4 * u + 2] = opt.seed;
        w[4 * u + 3] = (idx << 32) | u;
    }
}

static bool verify_write_produce(struct qstate *qs, struct slot *s, uint64_t now)
{
    (void)now;
    if (qs->cursor >= qs->nwlist)
        return false;
    uint64_t idx = qs->wlist[qs->cursor++];
    s->tag = idx;
    s->off = g_blocks[idx] * VERIFY_BS;
    s->op = 1;
    fill_stamp(s->buf, s->off, idx);
    return true;
}

static void verify_write_complete(struct qstate *qs, struct slot *s,
                                  const struct blkio_completion *c, uint64_t now)
{
    (void)now;
    if (c->ret != 0) {
        qs->write_errors++;
        note_request_error("write", s->off, c->ret, c->error_msg);
    } else {
        qs->written++;
    }
}

static bool verify_read_produce(struct qstate *qs, struct slot *s, uint64_t now)
{
    (void)now;
    if (qs->cursor >= qs->nrlist)
        return false;
    uint64_t idx = qs->rlist[qs->cursor++];
    s->tag = idx;
    s->off = g_blocks[idx] * VERIFY_BS;
    s->op = 0;
    memset(s->buf, 0xa5, VERIFY_BS);   /* never looks like a valid stamp */
    return true;
}

static void describe_mismatch(struct qstate *qs, const struct slot *s)
{
    const uint64_t *got = (const uint64_t *)s->buf;
    bool zero = true, untouched = true;
    for (unsigned i = 0; i < VERIFY_BS / 8; i++) {
        if (got[i])
            zero = false;
        if (got[i] != 0xa5a5a5a5a5a5a5a5ull)
            untouched = false;
    }
    unsigned first_bad = 0;
    for (unsigned i = 0; i < VERIFY_BS / 8; i++)
        if (got[i] != ((const uint64_t *)qs->expect)[i]) { first_bad = i * 8; break; }
    pthread_mutex_lock(&err_lock);
    if (untouched)
        fprintf(stderr, "blkio_client: mismatch at offset %" PRIu64 " (queue %d): "
                "read succeeded but the buffer was left untouched (0xa5 fill)\n",
                s->off, qs->index);
    else if (zero)
        fprintf(stderr, "blkio_client: mismatch at offset %" PRIu64 " (queue %d): "
                "block reads back as all zeroes\n", s->off, qs->index);
    else if (got[0] == STAMP_MAGIC)
        fprintf(stderr, "blkio_client: mismatch at offset %" PRIu64 " (queue %d): "
                "first bad byte %u; block starts with the stamp of offset %" PRIu64
                " seed %" PRIu64 " index %" PRIu64 " unit %" PRIu64 "\n",
                s->off, qs->index, first_bad, got[1], got[2], got[3] >> 32,
                got[3] & 0xffffffffu);
    else
        fprintf(stderr, "blkio_client: mismatch at offset %" PRIu64 " (queue %d): "
                "first bad byte %u; no stamp (first word 0x%016" PRIx64 ")\n",
                s->off, qs->index, first_bad, got[0]);
    pthread_mutex_unlock(&err_lock);
}

static void verify_read_complete(struct qstate *qs, struct slot *s,
                                 const struct blkio_completion *c, uint64_t now)
{
    (void)now;
    if (c->ret != 0) {
        qs->read_errors++;
        note_request_error("read", s->off, c->ret, c->error_msg);
        return;
    }
    qs->read++;
    fill_stamp(qs->expect, s->off, s->tag);
    if (memcmp(qs->expect, s->buf, VERIFY_BS) != 0) {
        qs->mismatches++;
        if (atomic_fetch_add(&g_mismatch_reports, 1) < 5)
            describe_mismatch(qs, s);
    }
}

static void verify_flush(struct qstate *qs)
{
    blkioq_flush(qs->q, NULL, 0);
    qs->requests++;
    qs->inflight++;
    int n = do_io_wait(qs, 1, 1);
    if (n < 0) {
        report_fatal(qs, n);
        qs->flush_errors++;
        return;
    }
    qs->inflight--;
    if (qs->comps[0].ret != 0) {
        qs->flush_errors++;
        note_request_error("flush", 0, qs->comps[0].ret, qs->comps[0].error_msg);
    }
}

static void *verify_thread(void *arg)
{
    struct qstate *qs = arg;
    pthread_barrier_wait(&g_start_barrier);

    if (opt.phase != PHASE_READ) {
        qs->cursor = 0;
        run_engine(qs, verify_write_produce, verify_write_complete);
        if (!qs->fatal)
            verify_flush(qs);
    }

    /* every queue's writes are flushed before anyone reads back */
    pthread_barrier_wait(&g_phase_barrier);

    qs->cursor = 0;
    if (!qs->fatal && opt.phase != PHASE_WRITE)
        run_engine(qs, verify_read_produce, verify_read_complete);
    return NULL;
}

/* Choose opt.blocks distinct block numbers in [0, g_nblk). */
static void choose_blocks(void)
{
    uint64_t n = opt.blocks, rng = opt.seed ^ 0x5eed5eed5eed5eedull;
    g_blocks = malloc(n * sizeof(*g_blocks));
    if (!g_blocks) { perror("malloc"); exit(3); }

    if (g_nblk <= 4 * n) {
        /* dense: partial Fisher-Yates over all block numbers */
        uint64_t *all = malloc(g_nblk * sizeof(*all));
        if (!all) { perror("malloc"); exit(3); }
        for (uint64_t i = 0; i < g_nblk; i++)
            all[i] = i;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t j = i + rand_below(&rng, g_nblk - i);
            uint64_t t = all[i]; all[i] = all[j]; all[j] = t;
            g_blocks[i] = all[i];
        }
        free(all);
        return;
    }
    /* sparse: rejection sampling with an open-addressing set */
    uint64_t cap = 1;
    while (cap < 2 * n)
        cap <<= 1;
    uint64_t *set = malloc(cap * sizeof(*set));
    if (!set) { perror("malloc"); exit(3); }
    memset(set, 0xff, cap * sizeof(*set));
    for (uint64_t i = 0; i < n;) {
        uint64_t b = rand_below(&rng, g_nblk);
        uint64_t h = (b * 0x9e3779b97f4a7c15ull) & (cap - 1);
        while (set[h] != UINT64_MAX && set[h] != b)
            h = (h + 1) & (cap - 1);
        if (set[h] == b)
            continue;
        set[h] = b;
        g_blocks[i++] = b;
    }
    free(set);
}

/* ------------------------------------------------------------------ */
/* out-of-range probe                                                   */

struct oob_result {
    bool attempted;
    bool failed;
    bool lib_msg;          /* libblkio supplied an error_msg */
    int ret;
    char msg[512];
    uint64_t offset, len;
};

/*
 * Out-of-range probe, one read on queue 0 after everything else.
 *
 * libblkio 1.5's virtio-blk driver checks a request's alignment on the
 * client side (a misaligned request completes with -EINVAL and an
 * error_msg such as "invalid start offset" without reaching the daemon)
 * but it does NOT check the range against the capacity: an out-of-range
 * read is put on the virtqueue and the daemon must reject it.  Found by
 * experiment against qemu-storage-daemon 7.2: with the daemon stopped
 * (SIGSTOP) the probe never completes (-ETIME), and with it running the
 * probe fails with -EIO and no error_msg, i.e. VIRTIO_BLK_S_IOERR.
 * So every shape below reaches the daemon; no bypass is needed.
 */
static void oob_probe(struct qstate *qs, struct oob_result *r)
{
    uint8_t *buf = qs->slots[0].buf;
    r->attempted = true;
    r->len = VERIFY_BS;
    r->offset = opt.oob == OOB_STRADDLE ? g_capacity - 512 : g_capacity;
    memset(buf, 0, VERIFY_BS);
    blkioq_read(qs->q, r->offset, buf, r->len, NULL, 0);
    qs->requests++;
    qs->inflight++;
    int n = do_io_wait(qs, 1, 1);
    if (n < 0) {
        report_fatal(qs, n);
        r->failed = false;
        r->ret = n;
        snprintf(r->msg, sizeof(r->msg), "no completion: %s", strerror(-n));
        return;
    }
    qs->inflight--;
    r->ret = qs->comps[0].ret;
    r->failed = r->ret != 0;
    r->lib_msg = qs->comps[0].error_msg != NULL;
    if (qs->comps[0].error_msg)
        snprintf(r->msg, sizeof(r->msg), "%s", qs->comps[0].error_msg);
    else if (r->ret)
        snprintf(r->msg, sizeof(r->msg), "%s", strerror(-r->ret));
    else
        r->msg[0] = 0;
}

/* ------------------------------------------------------------------ */
/* setup and main                                                       */

static void die_blkio(const char *what, int ret)
{
    fprintf(stderr, "blkio_client: %s failed: %s: %s\n", what, strerror(-ret),
            blkio_get_error_msg());
    exit(3);
}

static double tv_sec(struct timeval tv)
{
    return (double)tv.tv_sec + (double)tv.tv_usec / 1e6;
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);

    int ret = blkio_create("virtio-blk-vhost-user", &g_b);
    if (ret < 0)
        die_blkio("blkio_create(virtio-blk-vhost-user)", ret);
    ret = blkio_set_str(g_b, "path", opt.socket);
    if (ret < 0)
        die_blkio("setting path", ret);
    ret = blkio_connect(g_b);
    if (ret < 0) {
        fprintf(stderr, "blkio_client: cannot connect to vhost-user socket %s: %s: %s\n",
                opt.socket, strerror(-ret), blkio_get_error_msg());
        exit(3);
    }
    if ((ret = blkio_get_uint64(g_b, "capacity", &g_capacity)) < 0)
        die_blkio("reading capacity", ret);

    int max_queues = 0, req_align = 512, buf_align = 1;
    uint64_t region_align = 4096;
    blkio_get_int(g_b, "max-queues", &max_queues);
    blkio_get_int(g_b, "request-alignment", &req_align);
    blkio_get_int(g_b, "buf-alignment", &buf_align);
    blkio_get_uint64(g_b, "mem-region-alignment", &region_align);
    if (max_queues > 0 && opt.queues > max_queues) {
        fprintf(stderr, "blkio_client: --queues %d but the export offers only %d "
                "queue(s) (export num-queues=...)\n", opt.queues, max_queues);
        exit(2);
    }
    if ((ret = blkio_set_int(g_b, "num-queues", opt.queues)) < 0)
        die_blkio("setting num-queues", ret);
    if (opt.queue_size && (ret = blkio_set_int(g_b, "queue-size", opt.queue_size)) < 0)
        die_blkio("setting queue-size", ret);
    int queue_size = 256;
    blkio_get_int(g_b, "queue-size", &queue_size);
    if (opt.iodepth > queue_size) {
        fprintf(stderr, "blkio_client: --iodepth %d exceeds the virtqueue size %d "
                "(use --queue-size)\n", opt.iodepth, queue_size);
        exit(2);
    }

    uint64_t bs = opt.mode == MODE_BENCH ? opt.bs : VERIFY_BS;
    if (bs % (uint64_t)req_align) {
        fprintf(stderr, "blkio_client: block size %" PRIu64 " is not a multiple of the "
                "device's request-alignment %d\n", bs, req_align);
        exit(2);
    }
    g_size = opt.size ? opt.size : g_capacity;
    if (g_size > g_capacity) {
        fprintf(stderr, "blkio_client: --size %" PRIu64 " exceeds the capacity %" PRIu64 "\n",
                g_size, g_capacity);
        exit(2);
    }
    g_nblk = g_size / bs;
    if (g_nblk == 0) {
        fprintf(stderr, "blkio_client: disk region of %" PRIu64 " bytes holds no "
                "%" PRIu64 "-byte block\n", g_size, bs);
        exit(2);
    }
    if (opt.mode == MODE_VERIFY && opt.blocks > g_nblk) {
        fprintf(stderr, "blkio_client: --blocks %" PRIu64 " but only %" PRIu64
                " 4 KiB blocks fit in %" PRIu64 " bytes\n", opt.blocks, g_nblk, g_size);
        exit(2);
    }

    if ((ret = blkio_start(g_b)) < 0)
        die_blkio("blkio_start", ret);

    /* One memory region holds every slot buffer of every queue. */
    size_t slot_len = (size_t)bs;
    if (buf_align > 1)
        slot_len = (slot_len + (size_t)buf_align - 1) / (size_t)buf_align * (size_t)buf_align;
    size_t region_len = slot_len * (size_t)opt.iodepth * (size_t)opt.queues;
    if (region_align < 4096)
        region_align = 4096;
    region_len = (region_len + region_align - 1) / region_align * region_align;
    struct blkio_mem_region region;
    if ((ret = blkio_alloc_mem_region(g_b, &region, region_len)) < 0)
        die_blkio("blkio_alloc_mem_region", ret);
    if ((ret = blkio_map_mem_region(g_b, &region)) < 0)
        die_blkio("blkio_map_mem_region", ret);
    memset(region.addr, 0x5a, region.len);   /* bench writes send this */

    for (int i = 0; i < opt.queues; i++) {
        struct qstate *qs = &g_qs[i];
        qs->index = i;
        qs->q = blkio_get_queue(g_b, i);
        if (!qs->q) {
            fprintf(stderr, "blkio_client: blkio_get_queue(%d): %s\n", i, blkio_get_error_msg());
            exit(3);
        }
        qs->slot_len = bs;
        qs->bufs = (uint8_t *)region.addr + slot_len * (size_t)opt.iodepth * (size_t)i;
        qs->slots = calloc((size_t)opt.iodepth, sizeof(*qs->slots));
        qs->free_slots = calloc((size_t)opt.iodepth, sizeof(*qs->free_slots));
        qs->comps = calloc((size_t)opt.iodepth, sizeof(*qs->comps));
        qs->hist = calloc(HIST_BUCKETS, sizeof(*qs->hist));
        qs->expect = aligned_alloc(64, VERIFY_BS);
        if (!qs->slots || !qs->free_slots || !qs->comps || !qs->hist || !qs->expect) {
            perror("calloc");
            exit(3);
        }
        for (int s = 0; s < opt.iodepth; s++) {
            qs->slots[s].buf = qs->bufs + slot_len * (size_t)s;
            qs->free_slots[s] = &qs->slots[s];
        }
        qs->nfree = opt.iodepth;
        uint64_t seedstate = opt.seed * 0x100000001b3ull + (uint64_t)i + 1;
        qs->rng = splitmix64(&seedstate);
        qs->seq_pos = g_nblk / (uint64_t)opt.queues * (uint64_t)i;
        if (opt.count)
            qs->budget = opt.count / (uint64_t)opt.queues +
                         ((uint64_t)i < opt.count % (uint64_t)opt.queues);
    }

    /* verify: split the block list between queues; reads go to the next queue */
    uint64_t **wl = NULL, **rl = NULL;
    if (opt.mode == MODE_VERIFY) {
        choose_blocks();
        wl = calloc((size_t)opt.queues, sizeof(*wl));
        rl = calloc((size_t)opt.queues, sizeof(*rl));
        for (int i = 0; i < opt.queues; i++) {
            wl[i] = malloc((opt.blocks / (uint64_t)opt.queues + 1) * sizeof(uint64_t));
            rl[i] = malloc((opt.blocks / (uint64_t)opt.queues + 1) * sizeof(uint64_t));
            if (!wl[i] || !rl[i]) { perror("malloc"); exit(3); }
        }
        for (uint64_t k = 0; k < opt.blocks; k++) {
            struct qstate *w = &g_qs[k % (uint64_t)opt.queues];
            struct qstate *r = &g_qs[(k + 1) % (uint64_t)opt.queues];
            wl[w->index][w->nwlist++] = k;
            rl[r->index][r->nrlist++] = k;
        }
        for (int i = 0; i < opt.queues; i++) {
            g_qs[i].wlist = wl[i];
            g_qs[i].rlist = rl[i];
        }
    }

    pthread_barrier_init(&g_start_barrier, NULL, (unsigned)opt.queues + 1);
    pthread_barrier_init(&g_phase_barrier, NULL, (unsigned)opt.queues);
    pthread_t tids[MAX_QUEUES];
    for (int i = 0; i < opt.queues; i++) {
        ret = pthread_create(&tids[i], NULL,
                             opt.mode == MODE_BENCH ? bench_thread : verify_thread, &g_qs[i]);
        if (ret) {
            fprintf(stderr, "blkio_client: pthread_create: %s\n", strerror(ret));
            exit(3);
        }
    }

    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    uint64_t t0 = now_ns();
    pthread_barrier_wait(&g_start_barrier);
    for (int i = 0; i < opt.queues; i++)
        pthread_join(tids[i], NULL);
    uint64_t t1 = now_ns();
    getrusage(RUSAGE_SELF, &ru1);
    double secs = (double)(t1 - t0) / 1e9;
    double cpu = (tv_sec(ru1.ru_utime) - tv_sec(ru0.ru_utime)) +
                 (tv_sec(ru1.ru_stime) - tv_sec(ru0.ru_stime));

    bool fatal = false;
    for (int i = 0; i < opt.queues; i++)
        fatal |= g_qs[i].fatal;

    int status = 0;
    if (opt.mode == MODE_BENCH) {
        uint64_t ios = 0, errors = 0, lat_sum = 0;
        uint64_t *hist = calloc(HIST_BUCKETS, sizeof(*hist));
        for (int i = 0; i < opt.queues; i++) {
            ios += g_qs[i].ios;
            errors += g_qs[i].errors;
            lat_sum += g_qs[i].lat_sum_ns;
            for (unsigned k = 0; k < HIST_BUCKETS; k++)
                hist[k] += g_qs[i].hist[k];
        }
        double iops = secs > 0 ? (double)ios / secs : 0;
        printf("{\"mode\":\"bench\",\"rw\":\"%s\",\"bs\":%" PRIu64 ",\"iodepth\":%d,"
               "\"queues\":%d,\"ios\":%" PRIu64 ",\"seconds\":%.6f,\"iops\":%.1f,"
               "\"mib_s\":%.3f,\"lat_mean_us\":%.3f,\"lat_p50_us\":%.3f,"
               "\"lat_p99_us\":%.3f,\"errors\":%" PRIu64 ",\"client_cpu_pct\":%.1f,"
               "\"capacity\":%" PRIu64 ",\"size\":%" PRIu64 ",\"aborted\":%s}\n",
               rw_names[opt.rw], opt.bs, opt.iodepth, opt.queues, ios, secs, iops,
               iops * (double)opt.bs / 1048576.0,
               ios ? (double)lat_sum / (double)ios / 1000.0 : 0.0,
               hist_percentile(hist, ios, 50) / 1000.0,
               hist_percentile(hist, ios, 99) / 1000.0,
               errors, secs > 0 ? cpu / secs * 100.0 : 0.0,
               g_capacity, g_size, fatal ? "true" : "false");
        if (errors || fatal)
            status = 1;
        free(hist);
    } else {
        struct oob_result oob = { 0 };
        if (opt.oob == OOB_NONE)
            snprintf(oob.msg, sizeof(oob.msg), "not attempted: --oob none");
        else if (!g_qs[0].fatal)
            oob_probe(&g_qs[0], &oob);
        else
            snprintf(oob.msg, sizeof(oob.msg), "not attempted: queue 0 failed");
        if (g_qs[0].fatal)
            fatal = true;

        uint64_t written = 0, readn = 0, mism = 0, we = 0, re = 0, fe = 0;
        for (int i = 0; i < opt.queues; i++) {
            written += g_qs[i].written;
            readn += g_qs[i].read;
            mism += g_qs[i].mismatches;
            we += g_qs[i].write_errors;
            re += g_qs[i].read_errors;
            fe += g_qs[i].flush_errors;
        }
        printf("{\"mode\":\"verify\",\"blocks\":%" PRIu64 ",\"written\":%" PRIu64
               ",\"read\":%" PRIu64 ",\"mismatches\":%" PRIu64 ",\"write_errors\":%" PRIu64
               ",\"read_errors\":%" PRIu64 ",\"flush_errors\":%" PRIu64
               ",\"oob_failed\":%s,\"oob_ret\":%d,\"oob_error\":",
               opt.blocks, written, readn, mism, we, re, fe,
               oob.failed ? "true" : "false", oob.ret);
        json_str(stdout, oob.msg);
        printf(",\"oob_shape\":\"%s\",\"oob_offset\":%" PRIu64 ",\"oob_len\":%" PRIu64
               ",\"oob_error_from_libblkio\":%s,\"per_queue_requests\":[",
               oob_names[opt.oob], oob.offset, oob.len, oob.lib_msg ? "true" : "false");
        for (int i = 0; i < opt.queues; i++)
            printf("%s%" PRIu64, i ? "," : "", g_qs[i].requests);
        printf("],\"phase\":\"%s\",\"queues\":%d,\"iodepth\":%d,\"seed\":%" PRIu64
               ",\"capacity\":%" PRIu64 ",\"seconds\":%.6f,\"aborted\":%s}\n",
               phase_names[opt.phase], opt.queues, opt.iodepth, opt.seed, g_capacity, secs,
               fatal ? "true" : "false");
        if (mism || we || re || fe || (opt.oob != OOB_NONE && !oob.failed) || fatal ||
            (opt.phase != PHASE_READ && written != opt.blocks) ||
            (opt.phase != PHASE_WRITE && readn != opt.blocks))
            status = 1;
    }
    fflush(stdout);

    /* Don't tear down with requests still in flight after a fatal error. */
    if (!fatal) {
        blkio_unmap_mem_region(g_b, &region);
        blkio_free_mem_region(g_b, &region);
        blkio_destroy(&g_b);
    }
    return status;
}
