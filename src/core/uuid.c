/* UUID v7 (RFC 9562 section 5.7) from the OS random source.
 *
 * Layout: 48-bit Unix milliseconds | version 7 | 12-bit rand_a | variant 10 | 62-bit rand_b.
 * rand_a is used as a counter (RFC 9562 6.2, method 1): seeded at random each new millisecond
 * with its top bit clear, incremented for each further id in the same millisecond, so ids made
 * by one process sort in creation order. Should the counter run out, the timestamp is moved one
 * millisecond ahead rather than breaking the order.
 *
 * The random bytes come from getrandom(2) RANDOM_POOL bytes at a time rather than one system
 * call per id. The pool lives in a page the kernel zeroes in a child process (MADV_WIPEONFORK,
 * whatever way the child was forked), and a zeroed pool reads as empty: a child never reuses
 * the bytes its parent had drawn ahead, which would give both the same ids within a
 * millisecond. Without MADV_WIPEONFORK (kernels before 4.14) every id makes its own call. */
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <errno.h>

#include "qx.h"

#define UUID_RANDOM_BYTES 10
#define RANDOM_POOL (32 * UUID_RANDOM_BYTES)

typedef struct random_pool {
    size_t left; /* unused bytes at the end of bytes; 0 (as in a wiped page) means refill */
    unsigned char bytes[RANDOM_POOL];
} random_pool;

static pthread_mutex_t uuid_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t last_ms;
static uint32_t counter;
static random_pool *pool;  /* NULL until made, or when the kernel cannot wipe it on fork */
static int pool_tried;

static int fill_random(unsigned char *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = getrandom(buf + got, n - got, 0);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        got += (size_t)r;
    }
    return 0;
}

/* The pool's page, made on first use; NULL when it cannot be wiped on fork. Under uuid_lock. */
static random_pool *pool_page(void)
{
    if (!pool_tried) {
        void *p;
        pool_tried = 1;
        p = mmap(NULL, sizeof *pool, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return NULL;
#ifdef MADV_WIPEONFORK
        if (madvise(p, sizeof *pool, MADV_WIPEONFORK) == 0) {
            pool = p;
            return pool;
        }
#endif
        munmap(p, sizeof *pool);
    }
    return pool;
}

/* UUID_RANDOM_BYTES random bytes into out, from the pool when there is one. Under uuid_lock. */
static int take_random(unsigned char *out)
{
    random_pool *rp = pool_page();
    if (rp == NULL)
        return fill_random(out, UUID_RANDOM_BYTES);
    if (rp->left < UUID_RANDOM_BYTES) {
        if (fill_random(rp->bytes, sizeof rp->bytes) != 0)
            return -1;
        rp->left = sizeof rp->bytes;
    }
    memcpy(out, rp->bytes + (sizeof rp->bytes - rp->left), UUID_RANDOM_BYTES);
    rp->left -= UUID_RANDOM_BYTES;
    return 0;
}

qx_status qx_uuid7(char out[QX_UUID_STRLEN + 1], qx_error *err)
{
    static const char hex[] = "0123456789abcdef";
    unsigned char b[16];
    unsigned char rnd[UUID_RANDOM_BYTES];
    struct timespec ts;
    uint64_t ms;
    uint32_t seq;
    int i, j;

    pthread_mutex_lock(&uuid_lock);
    if (take_random(rnd) != 0) {
        int e = errno;
        pthread_mutex_unlock(&uuid_lock);
        return qx_error_set(err, QX_ERR_DB, "getrandom failed: %s", strerror(e));
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    if (ms > last_ms) {
        last_ms = ms;
        counter = ((uint32_t)rnd[0] << 8 | rnd[1]) & 0x7ff; /* top bit clear: room to count */
    } else {
        ms = last_ms; /* same millisecond, or the clock stepped back: keep the order */
        if (++counter > 0xfff) {
            last_ms = ++ms;
            counter = ((uint32_t)rnd[0] << 8 | rnd[1]) & 0x7ff;
        }
    }
    seq = counter;
    pthread_mutex_unlock(&uuid_lock);

    b[0] = (unsigned char)(ms >> 40);
    b[1] = (unsigned char)(ms >> 32);
    b[2] = (unsigned char)(ms >> 24);
    b[3] = (unsigned char)(ms >> 16);
    b[4] = (unsigned char)(ms >> 8);
    b[5] = (unsigned char)ms;
    b[6] = (unsigned char)(0x70 | ((seq >> 8) & 0x0f));
    b[7] = (unsigned char)(seq & 0xff);
    memcpy(b + 8, rnd + 2, 8);
    b[8] = (unsigned char)(0x80 | (b[8] & 0x3f));

    for (i = 0, j = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[j++] = '-';
        out[j++] = hex[b[i] >> 4];
        out[j++] = hex[b[i] & 0x0f];
    }
    out[j] = '\0';
    return QX_OK;
}

/* 1 for the bytes that are hexadecimal digits (either case). */
static const unsigned char HEX_DIGIT[256] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0,
    0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
};

int qx_uuid_valid(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    unsigned ok = 1;
    size_t i;
    if (len != QX_UUID_STRLEN)
        return 0;
    /* 8-4-4-4-12 digits: the dashes at 8, 13, 18, 23, every other byte a digit */
    if (p[8] != '-' || p[13] != '-' || p[18] != '-' || p[23] != '-')
        return 0;
    for (i = 0; i < 8; i++)
        ok &= HEX_DIGIT[p[i]];
    for (i = 9; i < 13; i++)
        ok &= HEX_DIGIT[p[i]] & HEX_DIGIT[p[i + 5]] & HEX_DIGIT[p[i + 10]];
    for (i = 24; i < 36; i++)
        ok &= HEX_DIGIT[p[i]];
    return (int)ok;
}
