/*
 * The vhost-user device: the small amount of C that sits between libvhost-user and Python.
 *
 * Theory of operation
 * -------------------
 * - struct pyvu_dev (pyvu_internal.h) wraps a VuDev with the dispatch lock (a writer-preferring
 *   rwlock: taken exclusively around vu_dispatch, shared by queue threads around pop/push) and
 *   the state our own read_msg leaves behind (EOF, or why a message was refused).
 * - pyvu_read_msg replaces libvhost-user's default reader: an EOF or a short/oversized message
 *   becomes "disconnect" instead of exit(0) or an assert.  pyvu_validate_msg checks each
 *   message before libvhost-user sees it; pyvu_process_msg answers the few that libvhost-user
 *   must not.
 * - The ring checks (pyvu_ring_problem, pyvu_next_chain_problem) are what libvhost-user leaves
 *   out; the queue loop (virtio_blk_queue.c) runs them before popping.
 *
 * Threads: messages are read, checked and dispatched on the main thread, inside vu_dispatch
 * with the dispatch lock held exclusively; the ring checks run on a queue's thread with the
 * lock held shared.
 *
 * Licence: GPL-2.0-or-later (linked with libvhost-user).
 */
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <errno.h>
#include <string.h>
#include <stdio.h>
#include <unistd.h>
#include <stddef.h>
#include <pthread.h>
#include <endian.h>

static struct pyvu_dev *pyvu_from_vu(VuDev *dev)
{
    return (struct pyvu_dev *)((char *)dev - offsetof(struct pyvu_dev, vu));
}

static int pyvu_dev_init(struct pyvu_dev *d)
{
    pthread_rwlockattr_t attr;
    int r;

    pthread_rwlockattr_init(&attr);
    /* Writer-preferring: a waiting vu_dispatch makes queue threads' trylocks fail. */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    r = pthread_rwlock_init(&d->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    d->eof = 0;
    d->bad_msg = 0;
    d->why[0] = 0;
    d->gen = 1;
    d->inflight_qsize = 0;
    return r;
}

static void pyvu_dev_destroy(struct pyvu_dev *d)
{
    pthread_rwlock_destroy(&d->lock);
}

static void *pyvu_handle(VuDev *dev)
{
    return pyvu_from_vu(dev)->handle;
}

static int pyvu_rdlock(struct pyvu_dev *d) { return pthread_rwlock_rdlock(&d->lock); }
static int pyvu_wrlock(struct pyvu_dev *d) { return pthread_rwlock_wrlock(&d->lock); }
static int pyvu_unlock(struct pyvu_dev *d) { return pthread_rwlock_unlock(&d->lock); }

static void pyvu_close_fds(int *fds, int n)
{
    for (int i = 0; i < n; i++) {
        if (fds[i] >= 0) {
            close(fds[i]);
        }
    }
}

static int pyvu_read_full(int fd, void *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = read(fd, (char *)buf + done, len - done);
        if (r < 0 && (errno == EINTR || errno == EAGAIN)) {
            continue;
        }
        if (r <= 0) {
            return -1;
        }
        done += r;
    }
    return 0;
}

/*
 * Check one message before libvhost-user sees it: a known request we serve, the payload size
 * its handler reads, queue indices below max_queues, sizes it would trust (ring size, region
 * count, config and inflight sizes), and exactly the fds it takes.  Returns NULL if the message
 * is fine, else why not (the connection is then closed).
 */
#define PYVU_RING_MAX 1024      /* VIRTQUEUE_MAX_SIZE */
#define PYVU_ADDR_LIMIT (1ull << 56)   /* no real guest has memory above this */

/* The fd really holds [offset, offset + size): else touching it would raise SIGBUS. */
static int pyvu_fd_covers(int fd, uint64_t offset, uint64_t size)
{
    struct stat st;
    if (fstat(fd, &st) < 0) {
        return 0;
    }
    if (!S_ISREG(st.st_mode)) {
        return 1;   /* e.g. a device: its size is not in st_size */
    }
    return offset + size >= offset && (uint64_t)st.st_size >= offset + size;
}

static const char *pyvu_check_region(VhostUserMemoryRegion *r, int fd)
{
    if (!r->memory_size || r->guest_phys_addr + r->memory_size < r->guest_phys_addr ||
        r->guest_phys_addr + r->memory_size > PYVU_ADDR_LIMIT ||
        r->userspace_addr + r->memory_size < r->userspace_addr ||
        r->mmap_offset + r->memory_size < r->mmap_offset) {
        return "memory region out of range";
    }
    if (!pyvu_fd_covers(fd, r->mmap_offset, r->memory_size)) {
        return "memory region larger than its file";
    }
    return NULL;
}

/*
 * Rings.  libvhost-user checks only that each ring *starts* inside a memory region (qva_to_va),
 * then reads and writes it for vring.num entries; a frontend could place a ring across the end
 * of its region.  Sizes of a split virtqueue's parts, in bytes:
 */
#define PYVU_DESC_BYTES(n)  (16ull * (n))
#define PYVU_AVAIL_BYTES(n) (6ull + 2ull * (n))    /* flags, idx, ring[n], used_event */
#define PYVU_USED_BYTES(n)  (6ull + 8ull * (n))    /* flags, idx, ring[n], avail_event */

/* [qva, qva + len) lies inside one memory region (frontend addresses). */
static int pyvu_qva_range_ok(VuDev *dev, uint64_t qva, uint64_t len)
{
    for (unsigned i = 0; i < dev->nregions; i++) {
        VuDevRegion *r = &dev->regions[i];
        if (qva >= r->qva && len <= r->size && qva - r->qva <= r->size - len) {
            return 1;
        }
    }
    return 0;
}

/* [p, p + len) lies inside one mapped memory region (our addresses). */
static int pyvu_host_range_ok(VuDev *dev, const void *p, uint64_t len)
{
    uintptr_t a = (uintptr_t)p;
    for (unsigned i = 0; i < dev->nregions; i++) {
        VuDevRegion *r = &dev->regions[i];
        uintptr_t base = (uintptr_t)(r->mmap_addr + r->mmap_offset);
        if (a >= base && len <= r->size && a - base <= r->size - len) {
            return 1;
        }
    }
    return 0;
}

/*
 * Everything a pop or push on a mapped queue touches lies in mapped memory: the three rings for
 * vring.num entries, and (with inflight tracking) vring.num entries of the inflight region.
 * NULL if so, else why not.
 */
static const char *pyvu_ring_problem(struct pyvu_dev *d, VuVirtq *vq)
{
    VuDev *dev = &d->vu;
    uint64_t n = vq->vring.num;

    if (n == 0) {
        return "queue started without a ring size";
    }
    if (!pyvu_host_range_ok(dev, vq->vring.desc, PYVU_DESC_BYTES(n)) ||
        !pyvu_host_range_ok(dev, vq->vring.avail, PYVU_AVAIL_BYTES(n)) ||
        !pyvu_host_range_ok(dev, vq->vring.used, PYVU_USED_BYTES(n))) {
        return "ring runs past the end of its memory region";
    }
    if (vq->inflight && n > d->inflight_qsize) {
        return "ring larger than its inflight region";
    }
    return NULL;
}

/* SET_VRING_ADDR: libvhost-user maps the rings and reads the used index at once.  Checked with
 * the ring size set so far; queue threads check again with the final size before popping. */
static const char *pyvu_vring_addr_problem(VuDev *dev, const struct vhost_vring_addr *a)
{
    uint64_t n = dev->vq[a->index].vring.num ? dev->vq[a->index].vring.num : 1;

    if (!pyvu_qva_range_ok(dev, a->desc_user_addr, PYVU_DESC_BYTES(n)) ||
        !pyvu_qva_range_ok(dev, a->avail_user_addr, PYVU_AVAIL_BYTES(n)) ||
        !pyvu_qva_range_ok(dev, a->used_user_addr, PYVU_USED_BYTES(n))) {
        return "ring outside guest memory";
    }
    return NULL;
}

/*
 * SET_VRING_KICK starts a queue.  With inflight tracking, libvhost-user then reads the used
 * index and walks the inflight entries the frontend left behind (vu_check_queue_inflights),
 * trusting the ring mapping and the region's desc_num, which lives in memory the frontend can
 * write; the entries it finds are popped again by index without a check against the ring size.
 */
static const char *pyvu_kick_problem(VuDev *dev, unsigned idx)
{
    struct pyvu_dev *d = pyvu_from_vu(dev);
    VuVirtq *vq = &dev->vq[idx];
    const char *why;

    if (!(dev->protocol_features & (1ULL << VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)) ||
        !vq->inflight || !vq->inflight->version) {
        return NULL;
    }
    vq->inflight->desc_num = d->inflight_qsize;
    if (!vu_is_vq_usable(dev, vq)) {
        return "queue with inflight state started before its ring addresses";
    }
    why = pyvu_ring_problem(d, vq);
    if (why) {
        return why;
    }
    for (unsigned i = vq->vring.num; i < d->inflight_qsize; i++) {
        if (vq->inflight->desc[i].inflight) {
            return "inflight entry beyond the ring";
        }
    }
    return NULL;
}

/* An indirect table holds another indirect descriptor. */
static int pyvu_table_nests(const struct vring_desc *t, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        if (le16toh(t[i].flags) & VRING_DESC_F_INDIRECT) {
            return 1;
        }
    }
    return 0;
}

/* The same for a table that spans two regions, through a copy.  Rare, and kept out of
 * pyvu_next_chain_problem so that the per-request path has no 16 KiB stack frame. */
static __attribute__((noinline)) int pyvu_copied_table_nests(VuDev *dev, uint64_t addr,
                                                             uint32_t len)
{
    struct vring_desc buf[VIRTQUEUE_MAX_SIZE];
    if (virtqueue_read_indirect_desc(dev, buf, addr, len)) {
        return 0;                  /* unreadable: libvhost-user reports it */
    }
    return pyvu_table_nests(buf, len / sizeof(struct vring_desc));
}

/*
 * Before each pop from the avail ring: look at the next chain's head for what libvhost-user
 * accepts but the virtio spec forbids: an indirect table that is empty (libvhost-user reads its
 * first entry anyway) or that holds another indirect descriptor (QEMU refuses those chains).
 * Everything else about the chain is libvhost-user's to check.  Queue thread, read lock held.
 */
static const char *pyvu_next_chain_problem(VuDev *dev, VuVirtq *vq)
{
    unsigned num = vq->vring.num;
    uint16_t avail_idx = le16toh(__atomic_load_n(&vq->vring.avail->idx, __ATOMIC_ACQUIRE));
    struct vring_desc *t;
    uint64_t addr, rlen;
    uint32_t len;
    unsigned head;
    int nests;

    if (avail_idx == vq->last_avail_idx || (vq->resubmit_list && vq->resubmit_num)) {
        return NULL;
    }
    head = le16toh(vq->vring.avail->ring[vq->last_avail_idx % num]);
    if (head >= num || !(le16toh(vq->vring.desc[head].flags) & VRING_DESC_F_INDIRECT)) {
        return NULL;
    }
    len = le32toh(vq->vring.desc[head].len);
    addr = le64toh(vq->vring.desc[head].addr);
    if (len == 0) {
        return "empty indirect descriptor table";
    }
    if (len % sizeof(struct vring_desc) ||
        len > VIRTQUEUE_MAX_SIZE * sizeof(struct vring_desc)) {
        return NULL;               /* libvhost-user reports these */
    }
    rlen = len;
    t = vu_gpa_to_va(dev, &rlen, addr);
    if (!t) {
        return NULL;
    }
    nests = rlen == len ? pyvu_table_nests(t, len / sizeof(struct vring_desc))
                        : pyvu_copied_table_nests(dev, addr, len);
    return nests ? "nested indirect descriptor" : NULL;
}

/*
 * The protocol features we offer: libvhost-user's, less PAGEFAULT, plus the device's own.
 * libvhost-user offers PAGEFAULT (postcopy migration) whenever the kernel has userfaultfd,
 * but postcopy is not served here (the POSTCOPY_* messages are refused), so QEMU must see
 * that up front and refuse postcopy with its own error instead of losing the disk mid-way.
 * pyvu_process_msg answers GET_PROTOCOL_FEATURES with this; the validator refuses any
 * SET_PROTOCOL_FEATURES outside it.
 */
static uint64_t pyvu_offered_protocol_features(VuDev *dev)
{
    uint64_t f = 1ULL << VHOST_USER_PROTOCOL_F_MQ | 1ULL << VHOST_USER_PROTOCOL_F_LOG_SHMFD |
                 1ULL << VHOST_USER_PROTOCOL_F_BACKEND_REQ |
                 1ULL << VHOST_USER_PROTOCOL_F_HOST_NOTIFIER |
                 1ULL << VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD |
                 1ULL << VHOST_USER_PROTOCOL_F_REPLY_ACK |
                 1ULL << VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS |
                 1ULL << VHOST_USER_PROTOCOL_F_CONFIG;
    if (dev->iface->get_protocol_features) {
        f |= dev->iface->get_protocol_features(dev);
    }
    return f;
}

/*
 * Test-only (PYVHOST_BLK_X_NO_DIRTY_LOG=1, read once at start): accept SET_LOG_BASE but map
 * no log, so nothing the backend writes is logged during a migration.  It shows that the
 * migration test can fail (tests/e2e/test_guest_migration.py); never set otherwise.
 */
static int pyvu_x_no_dirty_log;

static void pyvu_set_x_no_dirty_log(int on)
{
    pyvu_x_no_dirty_log = on;
}

/*
 * libvhost-user's process_msg hook: messages answered here instead of by libvhost-user.
 * Main thread, inside vu_dispatch.  Returns 1 if handled (*do_reply: send vmsg back).
 */
static int pyvu_process_msg(VuDev *dev, VhostUserMsg *vmsg, int *do_reply)
{
    if (pyvu_x_no_dirty_log && vmsg->request == VHOST_USER_SET_LOG_BASE) {
        pyvu_close_fds(vmsg->fds, vmsg->fd_num);
        vmsg->fd_num = 0;
        vmsg->flags = 0;
        vmsg->size = sizeof(vmsg->payload.u64);
        vmsg->payload.u64 = 0;
        *do_reply = 1;
        return 1;
    }
    switch (vmsg->request) {
    case VHOST_USER_GET_PROTOCOL_FEATURES:
        vmsg->flags = 0;        /* vu_send_reply sets the version and REPLY */
        vmsg->size = sizeof(vmsg->payload.u64);
        vmsg->payload.u64 = pyvu_offered_protocol_features(dev);
        vmsg->fd_num = 0;
        *do_reply = 1;
        return 1;
    case VHOST_USER_NONE:
        /* Refused by pyvu_read_msg; never let libvhost-user see it (it would exit(0)). */
        pyvu_from_vu(dev)->eof = 1;
        *do_reply = 0;
        return 1;
    default:
        return 0;
    }
}

static const char *pyvu_validate_msg(VuDev *dev, VhostUserMsg *m)
{
    size_t sz = m->size;
    int nfd = m->fd_num;
    unsigned idx;

    if ((m->flags & VHOST_USER_VERSION_MASK) != 1) {
        return "unsupported protocol version";
    }
    switch (m->request) {
    case VHOST_USER_NONE:
        /* Not a message: libvhost-user would exit(0) on it.  Refused (its fds closed). */
        return "request 0 (VHOST_USER_NONE) is not a message";
    case VHOST_USER_GET_FEATURES:
    case VHOST_USER_GET_PROTOCOL_FEATURES:
    case VHOST_USER_SET_OWNER:
    case VHOST_USER_RESET_OWNER:
    case VHOST_USER_GET_QUEUE_NUM:
    case VHOST_USER_GET_MAX_MEM_SLOTS:
        return nfd ? "unexpected file descriptors" : NULL;
    case VHOST_USER_SET_FEATURES:
    case VHOST_USER_SET_PROTOCOL_FEATURES:
        if (sz < sizeof(m->payload.u64)) {
            return "payload too short";
        }
        if (m->request == VHOST_USER_SET_PROTOCOL_FEATURES &&
            (m->payload.u64 & ~pyvu_offered_protocol_features(dev))) {
            return "protocol features that were not offered";
        }
        return nfd ? "unexpected file descriptors" : NULL;
    case VHOST_USER_SET_VRING_NUM:
    case VHOST_USER_SET_VRING_BASE:
    case VHOST_USER_GET_VRING_BASE:
    case VHOST_USER_SET_VRING_ENABLE:
    case VHOST_USER_VRING_KICK:
        if (sz < sizeof(m->payload.state)) {
            return "payload too short";
        }
        if (m->payload.state.index >= dev->max_queues) {
            return "queue index out of range";
        }
        if (m->request == VHOST_USER_SET_VRING_NUM &&
            (m->payload.state.num == 0 || m->payload.state.num > PYVU_RING_MAX ||
             (m->payload.state.num & (m->payload.state.num - 1)))) {
            return "ring size must be a power of 2 up to 1024";
        }
        if (m->request == VHOST_USER_SET_VRING_BASE && m->payload.state.num > 0xffff) {
            return "ring base out of range";
        }
        return nfd ? "unexpected file descriptors" : NULL;
    case VHOST_USER_SET_VRING_ADDR:
        if (sz < sizeof(m->payload.addr)) {
            return "payload too short";
        }
        if (m->payload.addr.index >= dev->max_queues) {
            return "queue index out of range";
        }
        if (nfd) {
            return "unexpected file descriptors";
        }
        {
            struct vhost_vring_addr a = m->payload.addr;   /* the message is packed */
            return pyvu_vring_addr_problem(dev, &a);
        }
    case VHOST_USER_SET_VRING_KICK:
    case VHOST_USER_SET_VRING_CALL:
    case VHOST_USER_SET_VRING_ERR:
        if (sz < sizeof(m->payload.u64)) {
            return "payload too short";
        }
        idx = m->payload.u64 & VHOST_USER_VRING_IDX_MASK;
        if (idx >= dev->max_queues) {
            return "queue index out of range";
        }
        if (m->payload.u64 & VHOST_USER_VRING_NOFD_MASK) {
            if (nfd) {
                return "unexpected file descriptors";
            }
        } else if (nfd != 1) {
            return "expected one file descriptor";
        }
        return m->request == VHOST_USER_SET_VRING_KICK ? pyvu_kick_problem(dev, idx) : NULL;
    case VHOST_USER_SET_MEM_TABLE:
        if (sz < offsetof(VhostUserMemory, regions)) {
            return "payload too short";
        }
        if (m->payload.memory.nregions > VHOST_MEMORY_BASELINE_NREGIONS) {
            return "too many memory regions";
        }
        if (sz < offsetof(VhostUserMemory, regions) +
                 m->payload.memory.nregions * sizeof(VhostUserMemoryRegion)) {
            return "payload shorter than its regions";
        }
        if ((unsigned)nfd != m->payload.memory.nregions) {
            return "one file descriptor per memory region expected";
        }
        for (unsigned i = 0; i < m->payload.memory.nregions; i++) {
            const char *why = pyvu_check_region(&m->payload.memory.regions[i], m->fds[i]);
            if (why) {
                return why;
            }
        }
        return NULL;
    case VHOST_USER_ADD_MEM_REG:
    case VHOST_USER_REM_MEM_REG:
        if (sz < sizeof(m->payload.memreg)) {
            return "payload too short";
        }
        if (m->request == VHOST_USER_ADD_MEM_REG) {
            if (nfd != 1) {
                return "expected one file descriptor";
            }
            return pyvu_check_region(&m->payload.memreg.region, m->fds[0]);
        }
        return nfd <= 1 ? NULL : "too many file descriptors";
    case VHOST_USER_SET_LOG_BASE:
        if (sz < sizeof(m->payload.log)) {
            return "payload too short";
        }
        return nfd == 1 ? NULL : "expected one file descriptor";
    case VHOST_USER_SET_LOG_FD:
    case VHOST_USER_SET_BACKEND_REQ_FD:
        return nfd == 1 ? NULL : "expected one file descriptor";
    case VHOST_USER_GET_CONFIG:
    case VHOST_USER_SET_CONFIG:
        if (sz < VHOST_USER_CONFIG_HDR_SIZE) {
            return "payload too short";
        }
        if (m->payload.config.size > VHOST_USER_MAX_CONFIG_SIZE ||
            m->payload.config.offset > VHOST_USER_MAX_CONFIG_SIZE - m->payload.config.size) {
            return "config access out of range";
        }
        if (m->request == VHOST_USER_SET_CONFIG &&
            sz < VHOST_USER_CONFIG_HDR_SIZE + m->payload.config.size) {
            return "payload shorter than the config data";
        }
        return nfd ? "unexpected file descriptors" : NULL;
    case VHOST_USER_GET_INFLIGHT_FD:
    case VHOST_USER_SET_INFLIGHT_FD:
        if (!(dev->protocol_features & (1ULL << VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD))) {
            return "inflight tracking was not negotiated";
        }
        if (sz < sizeof(m->payload.inflight)) {
            return "payload too short";
        }
        if (m->payload.inflight.num_queues == 0 ||
            m->payload.inflight.num_queues > dev->max_queues ||
            m->payload.inflight.queue_size == 0 ||
            m->payload.inflight.queue_size > PYVU_RING_MAX) {
            return "inflight queue count or size out of range";
        }
        if (m->request == VHOST_USER_SET_INFLIGHT_FD) {
            /* libvhost-user walks num_queues regions of vu_inflight_queue_size() bytes. */
            uint64_t per_queue = (sizeof(VuDescStateSplit) * m->payload.inflight.queue_size +
                                  sizeof(uint16_t) + 63) & ~63ull;
            if (m->payload.inflight.mmap_size <
                    per_queue * m->payload.inflight.num_queues ||
                m->payload.inflight.mmap_size > (64ull << 20)) {
                return "inflight region size does not match its queues";
            }
            if (nfd != 1) {
                return "expected one file descriptor";
            }
            if (!pyvu_fd_covers(m->fds[0], m->payload.inflight.mmap_offset,
                                m->payload.inflight.mmap_size)) {
                return "inflight region larger than its file";
            }
            return NULL;
        }
        return nfd ? "unexpected file descriptors" : NULL;
    default:
        return "unsupported request";
    }
}

/* The largest payload a message may declare (larger ones are refused before reading). */
#define PYVU_MSG_PAYLOAD_MAX sizeof(((VhostUserMsg *)0)->payload)

/* Our read_msg: never exit(), never assert; refuse malformed framing. */
static bool pyvu_read_msg(VuDev *dev, int sock, VhostUserMsg *vmsg)
{
    struct pyvu_dev *d = pyvu_from_vu(dev);
    char control[CMSG_SPACE(VHOST_MEMORY_BASELINE_NREGIONS * sizeof(int))];
    struct iovec iov = { .iov_base = vmsg, .iov_len = VHOST_USER_HDR_SIZE };
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control, .msg_controllen = sizeof(control),
    };
    struct cmsghdr *cmsg;
    ssize_t rc;

    memset(control, 0, sizeof(control));
    vmsg->fd_num = 0;
    d->gen++;
    do {
        rc = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (rc < 0 && errno == EINTR);

    for (cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level == SOL_SOCKET && cmsg->cmsg_type == SCM_RIGHTS) {
            size_t n = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            if (n > VHOST_MEMORY_BASELINE_NREGIONS) {
                n = VHOST_MEMORY_BASELINE_NREGIONS;
            }
            memcpy(vmsg->fds, CMSG_DATA(cmsg), n * sizeof(int));
            vmsg->fd_num = n;
        }
    }
    if (rc == 0) {
        d->eof = 1;
        snprintf(d->why, sizeof(d->why), "frontend closed the connection");
        goto fail;
    }
    if (rc < 0) {
        d->eof = 1;
        snprintf(d->why, sizeof(d->why), "recvmsg: %s", strerror(errno));
        goto fail;
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        d->bad_msg = 1;
        snprintf(d->why, sizeof(d->why), "message carries more than %d fds",
                 VHOST_MEMORY_BASELINE_NREGIONS);
        goto fail;
    }
    if ((size_t)rc < VHOST_USER_HDR_SIZE) {
        if (pyvu_read_full(sock, (char *)vmsg + rc, VHOST_USER_HDR_SIZE - rc) < 0) {
            d->bad_msg = 1;
            snprintf(d->why, sizeof(d->why), "short message header");
            goto fail;
        }
    }
    if (vmsg->size > sizeof(vmsg->payload)) {
        d->bad_msg = 1;
        snprintf(d->why, sizeof(d->why), "payload size %u exceeds %zu",
                 vmsg->size, sizeof(vmsg->payload));
        goto fail;
    }
    if (vmsg->size && pyvu_read_full(sock, &vmsg->payload, vmsg->size) < 0) {
        d->bad_msg = 1;
        snprintf(d->why, sizeof(d->why), "short payload (request %u, size %u)",
                 (unsigned)vmsg->request, vmsg->size);
        goto fail;
    }
    {
        const char *why = pyvu_validate_msg(dev, vmsg);
        if (why) {
            d->bad_msg = 1;
            snprintf(d->why, sizeof(d->why), "request %u: %s", (unsigned)vmsg->request, why);
            goto fail;
        }
    }
    if (vmsg->request == VHOST_USER_GET_INFLIGHT_FD ||
        vmsg->request == VHOST_USER_SET_INFLIGHT_FD) {
        d->inflight_qsize = vmsg->payload.inflight.queue_size;
    }
    if (vmsg->request == VHOST_USER_GET_INFLIGHT_FD && dev->inflight_info.addr) {
        /*
         * libvhost-user allocates a new inflight region here and overwrites the old one's
         * fd and mapping without releasing them: every device reset leaked a memfd.  The old
         * region is being replaced (the rings are stopped), so release it first.
         */
        munmap(dev->inflight_info.addr, dev->inflight_info.size);
        close(dev->inflight_info.fd);
        dev->inflight_info.addr = NULL;
        dev->inflight_info.fd = -1;
        dev->inflight_info.size = 0;
        for (int i = 0; i < dev->max_queues; i++) {
            dev->vq[i].inflight = NULL;
        }
    }
    return true;

fail:
    pyvu_close_fds(vmsg->fds, vmsg->fd_num);
    vmsg->fd_num = 0;
    return false;
}

static VuVirtq *pyvu_queue(VuDev *dev, int qidx)
{
    return &dev->vq[qidx];
}

/* A queue's indices and notification state (struct pyvu_vring_state) under the dispatch lock,
 * read where libvhost-user keeps them.  0, or -1 when the queue is not set up.  Any thread;
 * diagnostics only: nothing here changes a ring. */
static int pyvu_vring_state(struct pyvu_dev *d, int qidx, struct pyvu_vring_state *s)
{
    VuDev *dev = &d->vu;
    int ret = -1;

    memset(s, 0, sizeof(*s));
    pthread_rwlock_rdlock(&d->lock);
    if (dev->vq && !dev->broken && qidx >= 0 && qidx < dev->max_queues) {
        VuVirtq *vq = &dev->vq[qidx];
        unsigned int num = vq->vring.num;
        s->last_avail_idx = vq->last_avail_idx;
        s->shadow_avail_idx = vq->shadow_avail_idx;
        s->used_idx = vq->used_idx;
        s->signalled_used = vq->signalled_used;
        s->signalled_used_valid = vq->signalled_used_valid;
        s->notification = vq->notification;
        s->inuse = vq->inuse;
        s->event_idx = !!(dev->features & (1ULL << VIRTIO_RING_F_EVENT_IDX));
        if (vq->vring.avail && vq->vring.used && num) {
            s->rings_mapped = 1;
            s->avail_flags = le16toh(vq->vring.avail->flags);
            s->avail_idx = le16toh(vq->vring.avail->idx);
            s->used_event = le16toh(vq->vring.avail->ring[num]);
            s->used_flags = le16toh(vq->vring.used->flags);
            s->ring_used_idx = le16toh(vq->vring.used->idx);
            s->avail_event = le16toh(*(uint16_t *)&vq->vring.used->ring[num]);
        }
        ret = 0;
    }
    pthread_rwlock_unlock(&d->lock);
    return ret;
}
