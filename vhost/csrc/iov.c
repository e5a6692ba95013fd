/*
 * iovec helpers for the request path: the C parser (virtio_blk_queue.c) and Python's side
 * (blocklayer/iov.py, drivers) call them to slice, copy, fill and test guest buffers without a
 * copy into Python.
 *
 * Theory of operation: plain functions over struct iovec arrays, no state; they run on the
 * caller's thread (the queue's AioContext).
 *
 * Licence: GPL-2.0-or-later (linked with libvhost-user).
 */
#include <string.h>
#include <sys/uio.h>

/*
 * Copy src[0..n) into dst, dropping the first `skip` bytes and the last `trim` bytes.
 * Returns the number of iovecs written (<= n), or -1 if there are fewer than skip+trim bytes.
 * *size_out gets the byte count covered by dst.
 */
static int pyvu_iov_slice(const struct iovec *src, unsigned n, size_t skip, size_t trim,
                          struct iovec *dst, uint64_t *size_out)
{
    uint64_t total = 0, want, got = 0;
    unsigned i;
    int out = 0;

    for (i = 0; i < n; i++) {
        total += src[i].iov_len;
    }
    if (total < (uint64_t)skip + trim) {
        return -1;
    }
    want = total - skip - trim;
    for (i = 0; i < n && got < want; i++) {
        size_t len = src[i].iov_len;
        char *base = src[i].iov_base;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        base += skip;
        len -= skip;
        skip = 0;
        if (len > want - got) {
            len = want - got;
        }
        if (len == 0) {
            continue;
        }
        dst[out].iov_base = base;
        dst[out].iov_len = len;
        out++;
        got += len;
    }
    *size_out = got;
    return out;
}

/* Gather up to len bytes from the start of an iovec array; returns bytes copied. */
static size_t pyvu_iov_to_buf(const struct iovec *iov, unsigned n, void *buf, size_t len)
{
    size_t done = 0;
    for (unsigned i = 0; i < n && done < len; i++) {
        size_t c = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        memcpy((char *)buf + done, iov[i].iov_base, c);
        done += c;
    }
    return done;
}

/* Scatter len bytes into an iovec array; returns bytes copied. */
static size_t pyvu_iov_from_buf(const struct iovec *iov, unsigned n, const void *buf, size_t len)
{
    size_t done = 0;
    for (unsigned i = 0; i < n && done < len; i++) {
        size_t c = iov[i].iov_len < len - done ? iov[i].iov_len : len - done;
        memcpy(iov[i].iov_base, (const char *)buf + done, c);
        done += c;
    }
    return done;
}

/* 1 if every byte of the vector is zero (detect-zeroes).  Word-at-a-time where aligned. */
static int pyvu_iov_is_zero(const struct iovec *iov, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        const unsigned char *p = iov[i].iov_base;
        size_t len = iov[i].iov_len;
        while (len && ((uintptr_t)p & 7)) {
            if (*p++) {
                return 0;
            }
            len--;
        }
        for (; len >= 8; p += 8, len -= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            if (w) {
                return 0;
            }
        }
        while (len--) {
            if (*p++) {
                return 0;
            }
        }
    }
    return 1;
}

/* Fill an iovec array with a byte from offset `start` on. */
static void pyvu_iov_memset(const struct iovec *iov, unsigned n, size_t start, int byte)
{
    for (unsigned i = 0; i < n; i++) {
        size_t len = iov[i].iov_len;
        if (start >= len) {
            start -= len;
            continue;
        }
        memset((char *)iov[i].iov_base + start, byte, len - start);
        start = 0;
    }
}
