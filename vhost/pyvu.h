/*
 * What the C request path and Python share: constants and the layout of the state both read.
 * The one place they are written.  vhost/_build.py pastes this file first into the C source
 * and derives the cffi declarations from it (every line except the preprocessor's other than
 * #define), so Python reads them as lib.NAME and ffi's struct: nothing here is typed again in
 * Python (tests/unit/test_shared_header.py checks what remains).
 *
 * cffi reads #define values as plain integer literals only: no expressions here.
 */
#ifndef PYVU_H
#define PYVU_H

#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

/* Poller tokens: a Python fd (a small number; the epoll events that fired are in the bits from
 * PYVU_TOKEN_EVENTS_SHIFT up, under PYVU_TOKEN_FD_MASK the fd) or this bit | a C object's
 * address. */
#define PYVU_TOKEN_C 0x8000000000000000
#define PYVU_TOKEN_EVENTS_SHIFT 32
#define PYVU_TOKEN_FD_MASK 0xffffffff

/* How an AioContext polls before sleeping (struct pyvu_poller.mode, vhost/csrc/poller.c):
 * look at the queues' avail rings and the engines' completion rings in memory instead of
 * calling epoll_wait(0) (the default); turn the polled queues' guest notifications off while
 * polling (measured slower, off by default). */
#define PYVU_POLL_MEM 1
#define PYVU_POLL_NOTIFY_OFF 2

/* What the C request path can serve (BlockBackend.update_c_state sets blkstate.driver). */
#define DRV_NONE 0          /* nothing: every request goes to the node graph (batches) */
#define DRV_NULL 1          /* null-co */
#define DRV_FILE 2          /* a file through io_uring */
#define DRV_FILE_LAIO 4     /* a file through Linux AIO (aio=native, O_DIRECT) */

/* Accounting kinds (QEMU's BlockAcctType) and the latency histogram's size. */
#define PYVU_ACCT_READ 0
#define PYVU_ACCT_WRITE 1
#define PYVU_ACCT_FLUSH 2
#define PYVU_ACCT_UNMAP 3
#define PYVU_NKINDS 4
#define PYVU_NBINS 7
#define PYVU_NBOUNDS 6      /* PYVU_NBINS - 1 */

/* io_uring operations of pyvu_uring_prep. */
#define PYVU_OP_READ 0
#define PYVU_OP_WRITE 1
#define PYVU_OP_FSYNC 2

/* virtio-blk (virtio 1.2, 5.2.6): request types, the legacy barrier flag, statuses, the size
 * of struct virtio_blk_outhdr. */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_T_GET_LIFETIME 10
#define VIRTIO_BLK_T_DISCARD 11
#define VIRTIO_BLK_T_WRITE_ZEROES 13
#define VIRTIO_BLK_T_SECURE_ERASE 14
#define VIRTIO_BLK_T_BARRIER 0x80000000
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2
#define VIRTIO_BLK_OUTHDR_SIZE 16
#define VIRTIO_BLK_ID_BYTES 20          /* GET_ID: the serial, zero padded */

/* DISCARD / WRITE_ZEROES: one struct virtio_blk_discard_write_zeroes (le64 sector, le32
 * num_sectors, le32 flags) per request, its one flag, and the most sectors one request may
 * cover (what QEMU's vhost-user-blk export advertises in the config space). */
#define VIRTIO_BLK_DWZ_SIZE 16
#define VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP 1
#define VHOST_USER_BLK_MAX_DISCARD_SECTORS 32768
#define VHOST_USER_BLK_MAX_WRITE_ZEROES_SECTORS 32768

/*
 * Completions reach the frontend as a stream, not in bursts: the frontend (a libblkio client,
 * a guest driver) looks at the used ring again after submitting, and only sleeps if it finds
 * nothing new there.  A burst (all of a batch pushed together) is what it then finds empty at
 * its next look; it sleeps, and a wake-up costs ~20 us in a VM -- more than the whole batch.
 * So the C path pushes every request as soon as it is done (null-co, no medium, errors: in
 * the pop loop; EVENT_IDX keeps the frontend from being notified for each), and a queue with
 * an I/O engine (Linux AIO, io_uring) submits what it popped every PYVU_SUBMIT_EVERY requests
 * and pushes what completed before popping on.  Measured (benchmarks.run --sweep: libblkio
 * client, 2 pinned CPUs, 4k randread, IOPS per daemon CPU-second ours/qsd): null-co QD16
 * 1.02 -> 4.57 and QD32 1.93 -> 2.68, file QD8 0.76 -> 1.40 and QD16 0.99 -> 1.59; with
 * polling off null-co QD32 0.54x -> 1.28x qsd's IOPS (benchmarks/README.md).  4 beat 1, 2
 * and 8 at QD 8-32.
 */
#define PYVU_SUBMIT_EVERY 4

/* Python takes a queue's batch list this many requests at a time (blocklayer/batch.py), each
 * take answered and pushed before the next: measured with a Python driver at QD32, takes of 16
 * gave +30% IOPS over 32, and 16 beat 8. */
#define PYVU_BATCH_TAKE 16

/* A batch of parsed requests handed to Python (blocklayer/batch.py) carries virtio-blk request
 * types (IN, OUT, FLUSH, DISCARD, WRITE_ZEROES), per-request flags (QEMU's BDRV_REQ_* values),
 * the "completed later" mark a driver leaves in ret[i] (C then leaves the request alone until
 * Python completes it), and the mark ret[i] starts with. */
#define PYVU_BATCH_PENDING 1
#define PYVU_BATCH_UNSET 2  /* nobody answered: fails with EIO rather than hanging */
#define BDRV_REQ_MAY_UNMAP 4
#define BDRV_REQ_FUA 16
/* Not a BDRV_REQ_ flag: a batch entry to serve request by request (blocklayer/io.py
 * bdrv_batch_each, the node's padding and fallbacks), never through a driver's batch_io: a
 * request misaligned for the root node, or the redo of one a C engine could not finish. */
#define PYVU_BATCH_EACH 1073741824

/* The largest request in 512-byte sectors (QEMU's BDRV_REQUEST_MAX_SECTORS). */
#define BDRV_REQUEST_MAX_SECTORS 4194303

/* A queue's indices and notification state, for diagnosing a stalled guest (pyvu_vring_state
 * fills it from libvhost-user's VuVirtq and the guest's split ring; vhost/vring_debug.py says
 * what each field means). */
struct pyvu_vring_state {
    uint16_t last_avail_idx, shadow_avail_idx, used_idx, signalled_used;
    uint8_t signalled_used_valid, notification, event_idx, rings_mapped;
    unsigned int inuse;
    uint16_t avail_flags, avail_idx, used_event, used_flags, ring_used_idx, avail_event;
};

/* One per BlockBackend: the in-flight count and accounting of both request paths, and the
 * flags that decide which path serves a request. */
struct pyvu_blkstate {
    int64_t in_flight;
    uint64_t nr_ops[PYVU_NKINDS], nr_bytes[PYVU_NKINDS], failed_ops[PYVU_NKINDS];
    uint64_t invalid_ops[PYVU_NKINDS], total_time_ns[PYVU_NKINDS];
    uint64_t bins[PYVU_NKINDS][PYVU_NBINS];
    uint64_t boundaries[PYVU_NBOUNDS];
    int nbounds;
    uint64_t last_access_ns;
    uint64_t fast_ops;          /* requests the C path served end to end (for tests/stats) */
    uint64_t batch_ops;         /* requests C parsed and Python's node graph served in batches */
    int64_t length;             /* bytes; < 0: no medium */
    int force_slow;             /* the user turned the C path off: all to the batch path */
    int wce;                    /* write cache enabled (else writes are FUA) */
    int writable;
    int driver;                 /* DRV_* */
    int fd;                     /* file driver: the image fd */
    int64_t offset;             /* added to every request's offset (a raw node's offset=) */
    uint32_t align_mask;        /* request alignment - 1 (O_DIRECT): others are padded */
    uint32_t mem_mask;          /* memory alignment - 1 of every buffer */
    int read_zeroes;            /* null-co */
    int no_flush;
    uint32_t lbs;               /* logical block size */
    uint64_t malformed_ops;     /* requests without a header or a status byte */
    char serial[VIRTIO_BLK_ID_BYTES];   /* GET_ID's answer (not NUL terminated when full) */
    int serial_len;
};

/* librbd's asynchronous C API, as pointers the rbd driver fills in (blocklayer/ceph.py loads
 * librbd with cffi at run time; the extension does not link it): rbd_aio_create_completion,
 * rbd_aio_get_return_value, rbd_aio_release, rbd_aio_readv, rbd_aio_writev, rbd_aio_flush.
 * The C engine is vhost/csrc/rbd_engine.c. */
typedef void (*pyvu_rbd_cb_t)(void *c, void *arg);
struct pyvu_rbd_fns {
    int (*create_completion)(void *arg, pyvu_rbd_cb_t cb, void **c);
    ssize_t (*get_return_value)(void *c);
    void (*release)(void *c);
    int (*readv)(void *image, const struct iovec *iov, int iovcnt, uint64_t off, void *c);
    int (*writev)(void *image, const struct iovec *iov, int iovcnt, uint64_t off, void *c);
    int (*flush)(void *image, void *c);
};

#endif
