/*
 * agent: the only helper process inside a conformance guest (a tiny QEMU VM with a busybox
 * userland and no Python). Built static so that it runs on any guest kernel without a libc:
 *
 *     gcc -static -O2 -Wall -Wextra -pthread -o agent agent.c
 *
 * Modes:
 *   agent transfer server|client ...   a C port of `python -m conformance.endpoints.transfer`:
 *                                      same arguments, same byte streams, same JSON report (except
 *                                      that MPTCP_INFO is given raw, as hex, for the host to decode)
 *   agent serve DEVICE|-               the control loop the host drives over a virtio-serial port
 *                                      (or stdin/stdout): run commands, background jobs, and a
 *                                      fresh network namespace per case
 *   agent stream client|server SIZE    (for tests and debugging) the byte stream a role sends
 *
 * The transfer port must stay bit-identical with the Python endpoint: the peer of a guest is often
 * the Python program on the host, and each side checks the other's stream byte by byte.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

/* Not every libc's headers know these yet (values from include/uapi/linux/mptcp.h, in.h, tcp.h). */
#define IPPROTO_MPTCP_ 262
#define SOL_MPTCP_ 284
#define MPTCP_INFO_ 1
#define MPTCP_SUBFLOW_ADDRS_ 3
#define TCP_IS_MPTCP_ 43

#define FIRST_CHUNK 1000
#define BLOCK (1 << 20)
#define RECV_SIZE (1 << 16)
#define INFO_BUF 256      /* more than any kernel's struct mptcp_info: the kernel says its own size */
#define SOCKADDR_SIZE 128 /* one address in MPTCP_SUBFLOW_ADDRS (a sockaddr_storage) */
#define MOST_SUBFLOWS 16

/* ------------------------------------------------------------------------------------------ */
/* Small utilities                                                                              */
/* ------------------------------------------------------------------------------------------ */

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("agent: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

/* A growable byte buffer: JSON text, command output, request lines. */
struct buf {
    unsigned char *p;
    size_t len, cap;
};

static void buf_reserve(struct buf *b, size_t more)
{
    if (b->len + more <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more)
        cap *= 2;
    unsigned char *p = realloc(b->p, cap);
    if (!p)
        die("out of memory (%zu bytes)", cap);
    b->p = p;
    b->cap = cap;
}

static void buf_add(struct buf *b, const void *p, size_t n)
{
    buf_reserve(b, n + 1);
    memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = 0; /* always a C string too, for the text uses */
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_printf(struct buf *b, const char *fmt, ...)
{
    char small[256]; /* most texts fit: one formatting pass */
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof small) {
        buf_add(b, small, (size_t)n);
        return;
    }
    buf_reserve(b, (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf((char *)b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

static void buf_free(struct buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct timespec to_timespec(double s)
{
    struct timespec ts;
    if (!(s > 0))
        s = 0;
    if (s > 1e9)
        s = 1e9; /* "forever" without overflowing time_t arithmetic */
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

static void sleep_s(double s)
{
    struct timespec ts = to_timespec(s);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* write() until everything is out: devices and pipes take partial writes, and a non-blocking fd
 * (a host tty, say) may need waiting for. */
static int write_all(int fd, const void *data, size_t n)
{
    const char *p = data;
    while (n > 0) {
        ssize_t r = write(fd, p, n);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct pollfd pf = {fd, POLLOUT, 0};
            poll(&pf, 1, 1000);
        } else {
            if (r == 0)
                errno = EIO;
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* SHA-256 (FIPS 180-4): a static binary has no OpenSSL, and hashlib's digests are what the      */
/* reports compare.                                                                             */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    uint32_t h[8];
    uint64_t total;
    unsigned char block[64];
    size_t used;
} sha256_ctx;

static const uint32_t SHA_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_compress(uint32_t h[8], const unsigned char *p)
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + SHA_K[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d;
    h[4] += e; h[5] += f; h[6] += g; h[7] += k;
}

static void sha256_init(sha256_ctx *c)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(c->h, iv, sizeof iv);
    c->total = 0;
    c->used = 0;
}

static void sha256_update(sha256_ctx *c, const void *data, size_t n)
{
    const unsigned char *p = data;
    c->total += n;
    if (c->used) {
        size_t take = 64 - c->used < n ? 64 - c->used : n;
        memcpy(c->block + c->used, p, take);
        c->used += take;
        p += take;
        n -= take;
        if (c->used < 64)
            return;
        sha256_compress(c->h, c->block);
        c->used = 0;
    }
    for (; n >= 64; p += 64, n -= 64)
        sha256_compress(c->h, p);
    memcpy(c->block, p, n);
    c->used = n;
}

/* The hex digest of what was hashed so far; `c` itself goes on (like hashlib's hexdigest()). */
static void sha256_hex(const sha256_ctx *c, char out[65])
{
    sha256_ctx t = *c;
    uint64_t bits = t.total * 8;
    unsigned char pad[72] = {0x80};
    size_t padlen = (t.used < 56 ? 56 : 120) - t.used;
    for (int i = 0; i < 8; i++)
        pad[padlen + (size_t)i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_update(&t, pad, padlen + 8);
    for (int i = 0; i < 8; i++)
        snprintf(out + 8 * i, 9, "%08x", t.h[i]);
}

/* ------------------------------------------------------------------------------------------ */
/* The byte streams: Python's random.Random(seed).randbytes(n), block by block.                 */
/* ------------------------------------------------------------------------------------------ */

/* MT19937 exactly as CPython's _randommodule.c has it. */
#define MT_N 624
#define MT_M 397

typedef struct {
    uint32_t mt[MT_N];
    int index;
} mt19937;

/* random.Random(seed) for a small non-negative int: init_by_array with the key [seed] (CPython
 * splits the int's absolute value into 32-bit words, and 1 or 2 is one word). */
static void mt_seed(mt19937 *r, uint32_t seed)
{
    uint32_t *mt = r->mt;
    mt[0] = 19650218U;
    for (int i = 1; i < MT_N; i++)
        mt[i] = 1812433253U * (mt[i - 1] ^ (mt[i - 1] >> 30)) + (uint32_t)i;
    int i = 1;
    for (int k = MT_N; k; k--) { /* max(N, key length 1) rounds, j always 0 */
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1664525U)) + seed;
        if (++i >= MT_N) {
            mt[0] = mt[MT_N - 1];
            i = 1;
        }
    }
    for (int k = MT_N - 1; k; k--) {
        mt[i] = (mt[i] ^ ((mt[i - 1] ^ (mt[i - 1] >> 30)) * 1566083941U)) - (uint32_t)i;
        if (++i >= MT_N) {
            mt[0] = mt[MT_N - 1];
            i = 1;
        }
    }
    mt[0] = 0x80000000U;
    r->index = MT_N;
}

static uint32_t mt_next(mt19937 *r)
{
    static const uint32_t mag01[2] = {0, 0x9908b0dfU};
    uint32_t *mt = r->mt, y;
    if (r->index >= MT_N) {
        int kk;
        for (kk = 0; kk < MT_N - MT_M; kk++) {
            y = (mt[kk] & 0x80000000U) | (mt[kk + 1] & 0x7fffffffU);
            mt[kk] = mt[kk + MT_M] ^ (y >> 1) ^ mag01[y & 1];
        }
        for (; kk < MT_N - 1; kk++) {
            y = (mt[kk] & 0x80000000U) | (mt[kk + 1] & 0x7fffffffU);
            mt[kk] = mt[kk + (MT_M - MT_N)] ^ (y >> 1) ^ mag01[y & 1];
        }
        y = (mt[MT_N - 1] & 0x80000000U) | (mt[0] & 0x7fffffffU);
        mt[MT_N - 1] = mt[MT_M - 1] ^ (y >> 1) ^ mag01[y & 1];
        r->index = 0;
    }
    y = mt[r->index++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680U;
    y ^= (y << 15) & 0xefc60000U;
    y ^= y >> 18;
    return y;
}

/* rng.randbytes(n) = getrandbits(8n).to_bytes(n, "little"): getrandbits fills 32-bit words from
 * successive outputs, least significant first, and the last word of a request that is not a
 * multiple of 32 bits keeps only the top bits of its output (genrand >> (32 - k % 32)). */
static void randbytes(mt19937 *r, unsigned char *out, size_t n)
{
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        uint32_t w = mt_next(r);
        out[i] = (unsigned char)w;
        out[i + 1] = (unsigned char)(w >> 8);
        out[i + 2] = (unsigned char)(w >> 16);
        out[i + 3] = (unsigned char)(w >> 24);
    }
    size_t rem = n - i;
    if (rem) {
        uint32_t w = mt_next(r) >> (32 - 8 * rem);
        for (size_t k = 0; k < rem; k++)
            out[i + k] = (unsigned char)(w >> (8 * k));
    }
}

/* transfer.stream(role, size): one randbytes() per block of BLOCK bytes, the last one shorter. */
typedef struct {
    mt19937 rng;
    long long left;
} stream;

static uint32_t role_seed(const char *role) { return strcmp(role, "client") == 0 ? 1 : 2; }

static void stream_init(stream *s, const char *role, long long size)
{
    mt_seed(&s->rng, role_seed(role));
    s->left = size;
}

/* The next block into `out` (BLOCK bytes of room); its length, 0 once the stream is over. */
static size_t stream_next(stream *s, unsigned char *out)
{
    if (s->left <= 0)
        return 0;
    size_t n = s->left < BLOCK ? (size_t)s->left : BLOCK;
    randbytes(&s->rng, out, n);
    s->left -= (long long)n;
    return n;
}

/* transfer.digest(role, size, prefix): SHA-256 of the first `prefix` bytes (< 0: all). */
static void stream_digest(const char *role, long long size, long long prefix, char out[65])
{
    sha256_ctx h;
    sha256_init(&h);
    unsigned char *block = malloc(BLOCK);
    if (!block)
        die("out of memory");
    stream s;
    stream_init(&s, role, size);
    long long want = prefix < 0 ? size : prefix;
    size_t n;
    while (want > 0 && (n = stream_next(&s, block)) > 0) {
        sha256_update(&h, block, (long long)n < want ? n : (size_t)want);
        want -= (long long)n;
    }
    free(block);
    sha256_hex(&h, out);
}

/* ------------------------------------------------------------------------------------------ */
/* JSON, laid out as Python's json.dump(report, f, indent=2) does (ensure_ascii included), so   */
/* that a guest's report reads like a host's.                                                   */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    struct buf b;
    int depth;
    int count[16]; /* items so far at each nesting level */
    int after_key;
} json;

static void j_newline(json *j)
{
    buf_str(&j->b, "\n");
    for (int i = 0; i < j->depth; i++)
        buf_str(&j->b, "  ");
}

/* What goes before a value: nothing after a key, else a separator and the indentation. */
static void j_pre(json *j)
{
    if (j->after_key) {
        j->after_key = 0;
        return;
    }
    if (j->depth == 0)
        return;
    if (j->count[j->depth]++)
        buf_str(&j->b, ",");
    j_newline(j);
}

static void j_open(json *j, char c)
{
    j_pre(j);
    buf_add(&j->b, &c, 1);
    j->count[++j->depth] = 0;
}

static void j_close(json *j, char c)
{
    int items = j->count[j->depth--];
    if (items) /* Python writes an empty container as {} or [] */
        j_newline(j);
    buf_add(&j->b, &c, 1);
}

static void j_escape_cp(struct buf *b, unsigned cp)
{
    if (cp >= 0x10000) { /* outside the BMP: a surrogate pair, as ensure_ascii writes it */
        cp -= 0x10000;
        buf_printf(b, "\\u%04x\\u%04x", 0xd800 + (cp >> 10), 0xdc00 + (cp & 0x3ff));
    } else {
        buf_printf(b, "\\u%04x", cp);
    }
}

/* A string from bytes taken as UTF-8; an invalid byte is escaped the way Python's
 * surrogateescape decoding of a path or argument would give it (\udcXX). */
static void j_string_raw(struct buf *b, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    buf_str(b, "\"");
    while (*p) {
        unsigned c = *p;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            buf_add(b, e, 2);
            p++;
        } else if (c >= 0x20 && c < 0x7f) {
            buf_add(b, p, 1);
            p++;
        } else if (c < 0x80) {
            const char *short_esc = c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t"
                                  : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
            if (short_esc)
                buf_str(b, short_esc);
            else
                j_escape_cp(b, c);
            p++;
        } else {
            int len = c >= 0xf0 && c < 0xf5 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
            unsigned cp = len == 4 ? c & 7 : len == 3 ? c & 15 : c & 31;
            int ok = len > 0;
            for (int i = 1; ok && i < len; i++) {
                if ((p[i] & 0xc0) != 0x80)
                    ok = 0;
                else
                    cp = cp << 6 | (p[i] & 0x3f);
            }
            if (ok && ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp < 0xe000)))
                       || (len == 4 && (cp < 0x10000 || cp > 0x10ffff))))
                ok = 0;
            if (ok) {
                j_escape_cp(b, cp);
                p += len;
            } else {
                j_escape_cp(b, 0xdc00 + c);
                p++;
            }
        }
    }
    buf_str(b, "\"");
}

static void j_key(json *j, const char *k)
{
    j_pre(j);
    j_string_raw(&j->b, k);
    buf_str(&j->b, ": ");
    j->after_key = 1;
}

static void j_str(json *j, const char *s)
{
    j_pre(j);
    j_string_raw(&j->b, s);
}

static void j_null(json *j)
{
    j_pre(j);
    buf_str(&j->b, "null");
}

static void j_bool(json *j, int v)
{
    j_pre(j);
    buf_str(&j->b, v ? "true" : "false");
}

static void j_int(json *j, long long v)
{
    j_pre(j);
    buf_printf(&j->b, "%lld", v);
}

/* repr(round(x, 3)): the rounded value's shortest form, which is its 3-decimal form without
 * trailing zeros (one kept after the point, as in 12.0). */
static void j_round3(json *j, double v)
{
    char s[64];
    snprintf(s, sizeof s, "%.3f", v);
    size_t n = strlen(s);
    while (n > 0 && s[n - 1] == '0' && s[n - 2] != '.')
        s[--n] = 0;
    j_pre(j);
    buf_str(&j->b, s);
}

static void j_hex(json *j, const unsigned char *p, size_t n)
{
    struct buf t = {0};
    buf_reserve(&t, 2 * n + 1);
    for (size_t i = 0; i < n; i++)
        buf_printf(&t, "%02x", p[i]);
    j_str(j, t.p ? (const char *)t.p : "");
    buf_free(&t);
}

/* ------------------------------------------------------------------------------------------ */
/* transfer: errors as Python names them                                                        */
/* ------------------------------------------------------------------------------------------ */

/* f"{type(exc).__name__}: {exc}" of the exception Python would raise. */
typedef struct {
    char text[768];
} pyerr;

/* The OSError subclass CPython picks for an errno (Objects/exceptions.c). */
static const char *oserror_name(int err)
{
    switch (err) {
    case EAGAIN: case EALREADY: case EINPROGRESS: return "BlockingIOError";
    case ECHILD: return "ChildProcessError";
    case EPIPE: case ESHUTDOWN: return "BrokenPipeError";
    case ECONNABORTED: return "ConnectionAbortedError";
    case ECONNREFUSED: return "ConnectionRefusedError";
    case ECONNRESET: return "ConnectionResetError";
    case EEXIST: return "FileExistsError";
    case ENOENT: return "FileNotFoundError";
    case EISDIR: return "IsADirectoryError";
    case ENOTDIR: return "NotADirectoryError";
    case EINTR: return "InterruptedError";
    case EACCES: case EPERM: return "PermissionError";
    case ESRCH: return "ProcessLookupError";
    case ETIMEDOUT: return "TimeoutError";
    default: return "OSError";
    }
}

static void err_errno(pyerr *e, int err)
{
    snprintf(e->text, sizeof e->text, "%s: [Errno %d] %s", oserror_name(err), err, strerror(err));
}

/* An OSError from open(): Python adds the file name, as repr() quotes it. */
static void err_errno_file(pyerr *e, int err, const char *path)
{
    struct buf q = {0};
    buf_str(&q, "'");
    for (const char *p = path; *p; p++) {
        if (*p == '\'' || *p == '\\')
            buf_printf(&q, "\\%c", *p);
        else
            buf_add(&q, p, 1);
    }
    buf_str(&q, "'");
    snprintf(e->text, sizeof e->text, "%s: [Errno %d] %s: %s", oserror_name(err), err, strerror(err),
             (char *)q.p);
    buf_free(&q);
}

static void err_text(pyerr *e, const char *text) { snprintf(e->text, sizeof e->text, "%s", text); }

#define TIMED_OUT "TimeoutError: timed out"
#define STOPPED "Stopped: stopped by the harness (SIGTERM)"

/* ------------------------------------------------------------------------------------------ */
/* transfer: arguments, as argparse takes them                                                  */
/* ------------------------------------------------------------------------------------------ */

struct opts {
    const char *role, *addr, *report, *save_mismatch;
    long long port, send, expect, wait_subflows, abort_after;
    int tcp, has_abort;
    double wait_timeout, timeout, send_delay;
};

enum { O_STR, O_INT, O_FLOAT, O_FLAG, O_HELP };

static const struct {
    const char *name;
    int kind;
} OPTIONS[] = {
    {"--addr", O_STR},         {"--port", O_INT},          {"--tcp", O_FLAG},
    {"--send", O_INT},         {"--expect", O_INT},        {"--wait-subflows", O_INT},
    {"--wait-timeout", O_FLOAT}, {"--timeout", O_FLOAT},   {"--report", O_STR},
    {"--save-mismatch", O_STR}, {"--abort-after", O_INT},  {"--send-delay", O_FLOAT},
    {"--help", O_HELP},
};
#define NOPTIONS (sizeof OPTIONS / sizeof OPTIONS[0])

static const char USAGE[] =
    "usage: transfer [-h] --addr ADDR --port PORT [--tcp] [--send SEND] [--expect EXPECT]\n"
    "                [--wait-subflows WAIT_SUBFLOWS] [--wait-timeout WAIT_TIMEOUT]\n"
    "                [--timeout TIMEOUT] --report REPORT [--save-mismatch PATH]\n"
    "                [--abort-after BYTES] [--send-delay SECONDS]\n"
    "                {server,client}\n";

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(USAGE, stderr);
    fputs("transfer: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

/* Python's int(): surrounding whitespace, a sign, and underscores between digits allowed. */
static int parse_int(const char *s, long long *out)
{
    while (*s == ' ' || (*s >= '\t' && *s <= '\r'))
        s++;
    int neg = 0;
    if (*s == '+' || *s == '-')
        neg = *s++ == '-';
    unsigned long long v = 0;
    int digits = 0;
    for (; *s; s++) {
        if (*s >= '0' && *s <= '9') {
            if (v > (unsigned long long)LLONG_MAX / 10)
                return -1;
            v = v * 10 + (unsigned long long)(*s - '0');
            digits++;
        } else if (*s == '_' && digits && s[1] >= '0' && s[1] <= '9') {
            continue;
        } else {
            break;
        }
    }
    while (*s == ' ' || (*s >= '\t' && *s <= '\r'))
        s++;
    if (!digits || *s || v > (unsigned long long)LLONG_MAX)
        return -1;
    *out = neg ? -(long long)v : (long long)v;
    return 0;
}

/* Python's float(): decimal, inf and nan (no C99 hex floats). */
static int parse_float(const char *s, double *out)
{
    char clean[128];
    size_t n = 0;
    for (const char *p = s; *p; p++) {
        if (*p == 'x' || *p == 'X' || n + 1 >= sizeof clean)
            return -1;
        if (*p == '_' && p > s && p[-1] >= '0' && p[-1] <= '9' && p[1] >= '0' && p[1] <= '9')
            continue;
        clean[n++] = *p;
    }
    clean[n] = 0;
    char *end;
    errno = 0;
    double v = strtod(clean, &end);
    while (*end == ' ' || (*end >= '\t' && *end <= '\r'))
        end++;
    if (end == clean || *end)
        return -1;
    *out = v;
    return 0;
}

/* argparse takes "-5" and "-.5" as values: the parser has no option that looks like a number. */
static int looks_negative_number(const char *s)
{
    if (s[0] != '-' || !s[1])
        return 0;
    const char *p = s + 1;
    while (*p >= '0' && *p <= '9')
        p++;
    if (!*p)
        return p > s + 1;
    if (*p != '.')
        return 0;
    const char *q = ++p;
    while (*p >= '0' && *p <= '9')
        p++;
    return !*p && p > q;
}

static void parse_transfer_args(int argc, char **argv, struct opts *o)
{
    memset(o, 0, sizeof *o);
    o->wait_subflows = 1;
    o->wait_timeout = 5.0;
    o->timeout = 60.0;
    int seen[NOPTIONS] = {0}, only_positional = 0;
    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (!only_positional && strcmp(arg, "--") == 0) {
            only_positional = 1;
            continue;
        }
        if (only_positional || arg[0] != '-' || !arg[1] || looks_negative_number(arg)) {
            if (o->role)
                usage_error("unrecognized arguments: %s", arg);
            if (strcmp(arg, "server") != 0 && strcmp(arg, "client") != 0)
                usage_error("argument role: invalid choice: '%s' (choose from 'server', 'client')", arg);
            o->role = arg;
            continue;
        }
        if (strcmp(arg, "-h") == 0) {
            fputs(USAGE, stdout);
            exit(0);
        }
        if (arg[1] != '-')
            usage_error("unrecognized arguments: %s", arg);
        /* --name, --name=value, or a unique prefix of a name (argparse's allow_abbrev) */
        const char *eq = strchr(arg, '=');
        size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
        int found = -1, matches = 0;
        for (size_t k = 0; k < NOPTIONS; k++) {
            if (strlen(OPTIONS[k].name) == len && strncmp(OPTIONS[k].name, arg, len) == 0) {
                found = (int)k;
                matches = 1;
                break;
            }
            if (strncmp(OPTIONS[k].name, arg, len) == 0) {
                found = (int)k;
                matches++;
            }
        }
        if (matches == 0)
            usage_error("unrecognized arguments: %s", arg);
        if (matches > 1)
            usage_error("ambiguous option: %.*s", (int)len, arg);
        const char *name = OPTIONS[found].name;
        int kind = OPTIONS[found].kind;
        if (kind == O_HELP) {
            fputs(USAGE, stdout);
            exit(0);
        }
        const char *val = NULL;
        if (kind == O_FLAG) {
            if (eq)
                usage_error("argument %s: ignored explicit argument '%s'", name, eq + 1);
        } else if (eq) {
            val = eq + 1;
        } else {
            if (i + 1 >= argc || (argv[i + 1][0] == '-' && argv[i + 1][1] && !looks_negative_number(argv[i + 1])))
                usage_error("argument %s: expected one argument", name);
            val = argv[++i];
        }
        seen[found] = 1;
        long long iv = 0;
        double fv = 0;
        if (kind == O_INT && parse_int(val, &iv) != 0)
            usage_error("argument %s: invalid int value: '%s'", name, val);
        if (kind == O_FLOAT && parse_float(val, &fv) != 0)
            usage_error("argument %s: invalid float value: '%s'", name, val);
        if (!strcmp(name, "--addr")) o->addr = val;
        else if (!strcmp(name, "--port")) o->port = iv;
        else if (!strcmp(name, "--tcp")) o->tcp = 1;
        else if (!strcmp(name, "--send")) o->send = iv;
        else if (!strcmp(name, "--expect")) o->expect = iv;
        else if (!strcmp(name, "--wait-subflows")) o->wait_subflows = iv;
        else if (!strcmp(name, "--wait-timeout")) o->wait_timeout = fv;
        else if (!strcmp(name, "--timeout")) o->timeout = fv;
        else if (!strcmp(name, "--report")) o->report = val;
        else if (!strcmp(name, "--save-mismatch")) o->save_mismatch = val;
        else if (!strcmp(name, "--abort-after")) { o->abort_after = iv; o->has_abort = 1; }
        else if (!strcmp(name, "--send-delay")) o->send_delay = fv;
    }
    const char *missing[4];
    int nmissing = 0;
    if (!o->role) missing[nmissing++] = "role";
    if (!seen[0]) missing[nmissing++] = "--addr";
    if (!seen[1]) missing[nmissing++] = "--port";
    if (!seen[8]) missing[nmissing++] = "--report";
    if (nmissing) {
        char list[128] = "";
        for (int k = 0; k < nmissing; k++) {
            strcat(list, k ? ", " : "");
            strcat(list, missing[k]);
        }
        usage_error("the following arguments are required: %s", list);
    }
}

/* str(Path(p)): what _save() reports, with Path's normalisation (no "." parts, no doubled or
 * trailing slashes; exactly two leading slashes are kept, POSIX says they may mean something). */
static void path_str(const char *in, struct buf *out)
{
    if (in[0] == '/') {
        buf_str(out, in[1] == '/' && in[2] != '/' ? "//" : "/");
    }
    size_t root = out->len;
    const char *p = in;
    while (*p) {
        while (*p == '/')
            p++;
        const char *start = p;
        while (*p && *p != '/')
            p++;
        size_t n = (size_t)(p - start);
        if (n == 0 || (n == 1 && start[0] == '.'))
            continue;
        if (out->len > root)
            buf_str(out, "/");
        buf_add(out, start, n);
    }
    if (out->len == 0)
        buf_str(out, ".");
}

/* ------------------------------------------------------------------------------------------ */
/* transfer: what the kernel says about the connection                                          */
/* ------------------------------------------------------------------------------------------ */

struct info {
    int have; /* 0: not (or no longer) MPTCP, which Python's mptcp_info() gives as None */
    unsigned char raw[INFO_BUF];
    socklen_t len;
};

/* MPTCP_INFO as the kernel gives it; -1 (errno set) on an error mptcp_info() would raise. */
static int get_info(int fd, struct info *info)
{
    memset(info, 0, sizeof *info);
    info->len = INFO_BUF;
    if (getsockopt(fd, SOL_MPTCP_, MPTCP_INFO_, info->raw, &info->len) == 0) {
        info->have = 1;
        return 0;
    }
    info->len = 0;
    if (errno == EOPNOTSUPP || errno == ENOPROTOOPT || errno == EINVAL)
        return 0;
    return -1;
}

/* _total_subflows(): mptcpi_subflows_total (offset 80, absent before Linux 6.10: 0) or the
 * additional subflows plus the initial one. */
static long long total_subflows(const struct info *info)
{
    if (!info->have)
        return 1;
    unsigned total = info->len > 80 ? info->raw[80] : 0;
    return total ? total : (long long)info->raw[0] + 1;
}

static void j_info(json *j, const struct info *info)
{
    if (info->have)
        j_hex(j, info->raw, info->len);
    else
        j_null(j);
}

struct subflows {
    int have;
    unsigned char raw[16 + MOST_SUBFLOWS * 2 * SOCKADDR_SIZE];
    socklen_t len;
};

/* MPTCP_SUBFLOW_ADDRS: the request header (struct mptcp_subflow_data) is input as well as
 * output: its size and the size of one entry we have room for. */
static void get_subflows(int fd, struct subflows *s)
{
    memset(s, 0, sizeof *s);
    uint32_t hdr[4] = {16, 0, 0, 2 * SOCKADDR_SIZE};
    memcpy(s->raw, hdr, sizeof hdr);
    s->len = sizeof s->raw;
    s->have = getsockopt(fd, SOL_MPTCP_, MPTCP_SUBFLOW_ADDRS_, s->raw, &s->len) == 0;
}

static void j_sockaddr(json *j, const unsigned char *raw)
{
    uint16_t family, port;
    memcpy(&family, raw, 2);
    port = (uint16_t)(raw[2] << 8 | raw[3]);
    char text[INET6_ADDRSTRLEN];
    j_open(j, '{');
    if (family == AF_INET || family == AF_INET6) {
        inet_ntop(family, raw + (family == AF_INET ? 4 : 8), text, sizeof text);
        j_key(j, "addr");
        j_str(j, text);
        j_key(j, "port");
        j_int(j, port);
    } else {
        j_key(j, "family");
        j_int(j, family);
    }
    j_close(j, '}');
}

static void j_subflows(json *j, const struct subflows *s)
{
    if (!s->have) {
        j_null(j);
        return;
    }
    uint32_t hdr[4];
    memcpy(hdr, s->raw, sizeof hdr);
    uint32_t count = hdr[1] < MOST_SUBFLOWS ? hdr[1] : MOST_SUBFLOWS;
    j_open(j, '[');
    for (uint32_t i = 0; i < count; i++) {
        size_t base = 16 + (size_t)i * hdr[3];
        if (base + 2 * SOCKADDR_SIZE > sizeof s->raw)
            break;
        j_open(j, '{');
        j_key(j, "local");
        j_sockaddr(j, s->raw + base);
        j_key(j, "remote");
        j_sockaddr(j, s->raw + base + SOCKADDR_SIZE);
        j_close(j, '}');
    }
    j_close(j, ']');
}

/* is_mptcp(): TCP_IS_MPTCP, None when the kernel does not know the option. */
static void j_is_mptcp(json *j, int fd)
{
    int v = 0;
    socklen_t len = sizeof v;
    if (getsockopt(fd, IPPROTO_TCP, TCP_IS_MPTCP_, &v, &len) == 0)
        j_bool(j, v != 0);
    else
        j_null(j);
}

/* [host, port] of a socket address, as list(sock.getsockname()[:2]) gives it. */
static void j_addr_pair(json *j, const struct sockaddr_storage *ss)
{
    char text[INET6_ADDRSTRLEN] = "";
    int port = 0;
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &s6->sin6_addr, text, sizeof text);
        port = ntohs(s6->sin6_port);
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &s4->sin_addr, text, sizeof text);
        port = ntohs(s4->sin_port);
    }
    j_open(j, '[');
    j_str(j, text);
    j_int(j, port);
    j_close(j, ']');
}

/* ------------------------------------------------------------------------------------------ */
/* transfer: the exchange                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* Expected: the peer's stream as it should arrive, compared chunk by chunk as it does. */
typedef struct {
    stream s;
    unsigned char *block;
    size_t blen, pos;
    long long offset;          /* bytes compared and equal so far */
    long long first_difference; /* -1: none */
    unsigned char sample[32];
    size_t sample_len;
    long long keep; /* what arrived, kept up to this many bytes for --save-mismatch */
    struct buf received;
} expected;

static void expected_init(expected *e, const char *role, long long size, long long keep)
{
    memset(e, 0, sizeof *e);
    stream_init(&e->s, role, size);
    e->block = malloc(BLOCK);
    if (!e->block)
        die("out of memory");
    e->first_difference = -1;
    e->keep = keep;
}

static void expected_compare(expected *e, const unsigned char *chunk, size_t n)
{
    if ((long long)e->received.len < e->keep) {
        size_t room = (size_t)(e->keep - (long long)e->received.len);
        buf_add(&e->received, chunk, n < room ? n : room);
    }
    if (e->first_difference >= 0)
        return;
    size_t i = 0;
    while (i < n) {
        if (e->pos >= e->blen) {
            e->blen = stream_next(&e->s, e->block);
            e->pos = 0;
            if (!e->blen) { /* more bytes than the peer sends */
                e->first_difference = e->offset + (long long)i;
                return;
            }
        }
        size_t m = n - i < e->blen - e->pos ? n - i : e->blen - e->pos;
        if (memcmp(chunk + i, e->block + e->pos, m) != 0) {
            size_t k = 0;
            while (chunk[i + k] == e->block[e->pos + k])
                k++;
            e->first_difference = e->offset + (long long)(i + k);
            /* the sample is taken from this chunk only, as Python slices it */
            e->sample_len = n - (i + k) < 32 ? n - (i + k) : 32;
            memcpy(e->sample, chunk + i + k, e->sample_len);
            return;
        }
        i += m;
        e->pos += m;
    }
    e->offset += (long long)n;
}

/* The state the sender thread and the receiving (main) thread share. */
struct xfer {
    int fd, stopfd, donefd;
    const struct opts *o;
    double t0;
    pthread_t thread;
    pthread_mutex_t mu; /* guards sent, send_error and the subflow wait's results */
    sha256_ctx sent;
    char send_error[256];
    int has_send_error;
    int waited;
    long long subflows_before_bulk;
    double waited_s;
    atomic_int done, stop;
    /* The socket's timeout as Python's socket object holds it: the receiver sets it before each
     * recv, and a sendall() takes whatever it is when it starts as its own whole budget. */
    _Atomic long long timeout_ns;
};

static void x_set_send_error(struct xfer *x, const char *msg)
{
    pthread_mutex_lock(&x->mu);
    if (!x->has_send_error) {
        snprintf(x->send_error, sizeof x->send_error, "%s", msg);
        x->has_send_error = 1;
    }
    pthread_mutex_unlock(&x->mu);
}

static void x_set_send_errno(struct xfer *x, int err)
{
    char msg[200];
    snprintf(msg, sizeof msg, "[Errno %d] %s", err, strerror(err)); /* str(OSError) */
    x_set_send_error(x, msg);
}

/* Waits up to `secs` for `fd` (if >= 0) to be ready for `events`, or for a stop request:
 * 1 ready, 0 timed out, -1 stop requested. */
static int x_wait(struct xfer *x, int fd, short events, double secs)
{
    for (;;) {
        if (atomic_load(&x->stop))
            return -1;
        struct pollfd pf[2] = {{x->stopfd, POLLIN, 0}, {fd, events, 0}};
        struct timespec ts = to_timespec(secs);
        double start = now_s();
        int r = ppoll(pf, fd >= 0 ? 2 : 1, &ts, NULL);
        if (r < 0 && errno == EINTR) {
            secs -= now_s() - start;
            continue;
        }
        if (atomic_load(&x->stop) || pf[0].revents)
            return -1;
        return r > 0 ? 1 : 0;
    }
}

/* sock.sendall(): 0 all sent, -1 failed (send_error set), -2 stopped. */
static int x_sendall(struct xfer *x, const unsigned char *p, size_t n)
{
    double deadline = now_s() + (double)atomic_load(&x->timeout_ns) / 1e9;
    while (n > 0) {
        ssize_t r = send(x->fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (r > 0) {
            p += r;
            n -= (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            double left = deadline - now_s();
            int w = left > 0 ? x_wait(x, x->fd, POLLOUT, left) : 0;
            if (w < 0)
                return -2;
            if (w == 0) {
                x_set_send_error(x, "timed out");
                return -1;
            }
            continue;
        }
        x_set_send_errno(x, r < 0 ? errno : EIO);
        return -1;
    }
    return 0;
}

/* wait_for_subflows(): the path manager opens subflows only once the connection is fully
 * established, i.e. after the first data has flowed; the rest is held back until they are there
 * (on fast links the transfer would otherwise be over before any join). */
static int x_wait_for_subflows(struct xfer *x)
{
    struct info info;
    double deadline = now_s() + x->o->wait_timeout;
    for (;;) {
        if (get_info(x->fd, &info) != 0) {
            x_set_send_errno(x, errno);
            return -1;
        }
        if (total_subflows(&info) >= x->o->wait_subflows || now_s() >= deadline)
            break;
        if (x_wait(x, -1, 0, 0.01) < 0)
            return -2;
    }
    if (get_info(x->fd, &info) != 0) {
        x_set_send_errno(x, errno);
        return -1;
    }
    pthread_mutex_lock(&x->mu);
    x->subflows_before_bulk = total_subflows(&info);
    x->waited_s = now_s() - x->t0;
    x->waited = 1;
    pthread_mutex_unlock(&x->mu);
    return 0;
}

static void *sender(void *arg)
{
    struct xfer *x = arg;
    const struct opts *o = x->o;
    unsigned char *block = malloc(BLOCK);
    if (!block)
        die("out of memory");
    /* Holding back (data and DATA_FIN) lets the peer's first data segment go out before anything
     * from this side, e.g. a client's MP_CAPABLE with data (RFC 8684 §3.1). */
    if (o->send_delay > 0 && x_wait(x, -1, 0, o->send_delay) < 0)
        goto out;
    stream s;
    stream_init(&s, o->role, o->send);
    size_t n = stream_next(&s, block);
    size_t first = o->wait_subflows > 1 ? (n < FIRST_CHUNK ? n : FIRST_CHUNK) : n;
    pthread_mutex_lock(&x->mu);
    sha256_update(&x->sent, block, n);
    pthread_mutex_unlock(&x->mu);
    if (x_sendall(x, block, first) != 0)
        goto out;
    if (o->wait_subflows > 1 && x_wait_for_subflows(x) != 0)
        goto out;
    if (x_sendall(x, block + first, n - first) != 0)
        goto out;
    while ((n = stream_next(&s, block)) > 0) {
        pthread_mutex_lock(&x->mu);
        sha256_update(&x->sent, block, n);
        pthread_mutex_unlock(&x->mu);
        if (x_sendall(x, block, n) != 0)
            goto out;
    }
    if (shutdown(x->fd, SHUT_WR) != 0)
        x_set_send_errno(x, errno);
out:
    free(block);
    atomic_store(&x->done, 1);
    uint64_t one = 1;
    if (write(x->donefd, &one, sizeof one) < 0) { /* an eventfd write cannot fail here */ }
    return NULL;
}

/* Ends the sender thread (wherever it waits) and waits for it: the socket can then be closed
 * without the thread using a reused descriptor, and an abortive close takes effect at once. */
static void stop_sender(struct xfer *x)
{
    if (!x->thread)
        return;
    atomic_store(&x->stop, 1);
    uint64_t one = 1;
    if (write(x->stopfd, &one, sizeof one) < 0) { /* cannot fail: the counter is far from full */ }
    pthread_join(x->thread, NULL);
    x->thread = 0;
}

/* The first SIGTERM (read from a signalfd: every thread blocks it) ends the exchange. */
static int sigterm_arrived(int sigfd)
{
    struct signalfd_siginfo si;
    return read(sigfd, &si, sizeof si) == (ssize_t)sizeof si;
}

static long long floordiv2(long long v) { return v >= 0 ? v / 2 : -((-v + 1) / 2); }

static void j_head(json *j, const struct opts *o, struct xfer *x)
{
    j_open(j, '{');
    j_key(j, "role");
    j_str(j, o->role);
    j_key(j, "bytes_to_send");
    j_int(j, o->send);
    j_key(j, "bytes_expected");
    j_int(j, o->expect);
    pthread_mutex_lock(&x->mu);
    if (x->waited) { /* set by the sender while the exchange went on: they come first */
        j_key(j, "subflows_before_bulk");
        j_int(j, x->subflows_before_bulk);
        j_key(j, "waited_for_subflows_s");
        j_round3(j, x->waited_s);
    }
    pthread_mutex_unlock(&x->mu);
}

/* exchange(): send and receive at once, the whole bounded by `deadline`. Fills `j` with the
 * report (without local/peer/socket) and returns 0, with *ok as the report's "ok" and *aborted
 * set when the socket was closed here; -1 with `err` when Python's exchange() would have raised. */
static int wait_ready(int fd, short events, int sigfd, int *term_seen, double deadline);

static int exchange(int fd, const struct opts *o, int sigfd, int *term_seen, double deadline, json *j,
                    pyerr *err, int *ok, int *aborted)
{
    const char *peer_role = strcmp(o->role, "client") == 0 ? "server" : "client";
    struct xfer *x = calloc(1, sizeof *x);
    if (!x)
        die("out of memory");
    x->fd = fd;
    x->o = o;
    x->t0 = now_s();
    pthread_mutex_init(&x->mu, NULL);
    sha256_init(&x->sent);
    atomic_store(&x->timeout_ns, (long long)(o->timeout * 1e9));
    x->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    x->donefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (x->stopfd < 0 || x->donefd < 0)
        die("eventfd: %s", strerror(errno));
    int rc = pthread_create(&x->thread, NULL, sender, x);
    if (rc != 0)
        die("pthread_create: %s", strerror(rc));

    long long received = 0;
    sha256_ctx h;
    sha256_init(&h);
    expected e;
    expected_init(&e, peer_role, o->expect, o->save_mismatch ? o->expect : 0);
    struct info mid = {0}, info;
    struct subflows subs;
    const char *receive_error = NULL;
    int stopped = 0, failed = 0;
    unsigned char *chunk = malloc(RECV_SIZE);
    if (!chunk)
        die("out of memory");
    char hex[65], want[65];

    for (;;) {
        /* sock.settimeout(max(deadline - now, 0.001)); sock.recv(1 << 16) */
        double timeout = deadline - now_s();
        if (timeout < 0.001)
            timeout = 0.001;
        atomic_store(&x->timeout_ns, (long long)(timeout * 1e9));
        double call_deadline = now_s() + timeout;
        ssize_t n = -1;
        for (;;) {
            int ready = wait_ready(fd, POLLIN, sigfd, term_seen, call_deadline);
            if (ready < 0) {
                stopped = 1;
                break;
            }
            if (ready == 0) {
                receive_error = TIMED_OUT;
                break;
            }
            n = recv(fd, chunk, RECV_SIZE, MSG_DONTWAIT);
            if (n >= 0)
                break;
            if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) {
                if (now_s() >= call_deadline) {
                    receive_error = TIMED_OUT;
                    break;
                }
                continue;
            }
            /* Any other error is not caught in exchange(): the whole report becomes the error. */
            err_errno(err, errno);
            failed = 1;
            break;
        }
        if (stopped || receive_error || failed || n == 0)
            break;
        received += n;
        sha256_update(&h, chunk, (size_t)n);
        expected_compare(&e, chunk, (size_t)n);
        if (!mid.have && received >= floordiv2(o->expect)) {
            /* mid-transfer view: the subflows in use while data flows */
            if (get_info(fd, &mid) != 0) {
                err_errno(err, errno);
                failed = 1;
                break;
            }
        }
        if (o->has_abort && received >= o->abort_after) {
            /* _aborted(): a side that closed abortively after `received` bytes */
            if (get_info(fd, &info) != 0) {
                err_errno(err, errno);
                failed = 1;
                break;
            }
            get_subflows(fd, &subs);
            stop_sender(x);
            /* linger on with a zero timeout: MP_FASTCLOSE instead of DATA_FIN, subflows reset */
            struct linger lg = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(fd);
            *aborted = 1;
            sha256_hex(&h, hex);
            if (e.first_difference < 0) /* every byte was the peer's: the same prefix digest */
                memcpy(want, hex, sizeof want);
            else
                stream_digest(peer_role, o->expect, received, want);
            j_head(j, o, x);
            j_key(j, "aborted_after");
            j_int(j, received);
            j_key(j, "bytes_received");
            j_int(j, received);
            j_key(j, "sha256_received");
            j_str(j, hex);
            j_key(j, "sha256_expected");
            j_str(j, want);
            j_key(j, "duration_s");
            j_round3(j, now_s() - x->t0);
            j_key(j, "mptcp_info_raw");
            j_info(j, &info);
            j_key(j, "subflows");
            j_subflows(j, &subs);
            j_key(j, "fallback");
            j_bool(j, !info.have);
            *ok = strcmp(hex, want) == 0;
            j_key(j, "ok");
            j_bool(j, *ok);
            goto done;
        }
    }
    if (failed)
        goto done;

    if (!stopped) {
        /* thread.join(max(deadline - now, 0) + 1), which a SIGTERM interrupts too */
        double join_deadline = now_s() + (deadline - now_s() > 0 ? deadline - now_s() : 0) + 1.0;
        while (!atomic_load(&x->done)) {
            struct pollfd pf[2] = {{x->donefd, POLLIN, 0}, {sigfd, POLLIN, 0}};
            double left = join_deadline - now_s();
            if (left <= 0)
                break;
            struct timespec ts = to_timespec(left);
            int r = ppoll(pf, 2, &ts, NULL);
            if (r > 0 && pf[1].revents && sigterm_arrived(sigfd)) {
                *term_seen = stopped = 1;
                break;
            }
        }
    }
    if (stopped && !receive_error)
        receive_error = STOPPED;

    int alive = !atomic_load(&x->done);
    pthread_mutex_lock(&x->mu);
    if (alive && !x->has_send_error) {
        snprintf(x->send_error, sizeof x->send_error, "%s",
                 stopped ? "still sending when stopped" : "still sending at the deadline");
        x->has_send_error = 1;
    }
    int has_send_error = x->has_send_error;
    char send_error[sizeof x->send_error];
    memcpy(send_error, x->send_error, sizeof send_error);
    char sent_hex[65];
    sha256_hex(&x->sent, sent_hex);
    pthread_mutex_unlock(&x->mu);

    int all_sent = !has_send_error && atomic_load(&x->done);
    sha256_hex(&h, hex);
    /* digest(peer_role, expect): when every byte arrived and matched, it is what was received */
    if (e.first_difference < 0 && received == o->expect)
        memcpy(want, hex, sizeof want);
    else
        stream_digest(peer_role, o->expect, -1, want);

    j_head(j, o, x);
    j_key(j, "bytes_sent");
    if (all_sent)
        j_int(j, o->send);
    else
        j_null(j);
    j_key(j, "send_error");
    if (has_send_error)
        j_str(j, send_error);
    else
        j_null(j);
    j_key(j, "receive_error");
    if (receive_error)
        j_str(j, receive_error);
    else
        j_null(j);
    j_key(j, "sha256_sent");
    j_str(j, sent_hex);
    j_key(j, "bytes_received");
    j_int(j, received);
    j_key(j, "sha256_received");
    j_str(j, hex);
    j_key(j, "sha256_expected");
    j_str(j, want);
    j_key(j, "first_difference");
    if (e.first_difference >= 0)
        j_int(j, e.first_difference);
    else
        j_null(j);
    j_key(j, "difference_sample");
    if (e.sample_len)
        j_hex(j, e.sample, e.sample_len);
    else
        j_null(j);
    j_key(j, "received_saved");
    if (o->save_mismatch && e.first_difference >= 0 && e.received.len) {
        /* _save(): the stream that went wrong, whole: where each piece really belongs is the
         * evidence of how it went wrong */
        struct buf path = {0};
        path_str(o->save_mismatch, &path);
        int out = open((char *)path.p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
        if (out < 0 || write_all(out, e.received.p, e.received.len) != 0) {
            err_errno_file(err, errno, (char *)path.p);
            if (out >= 0)
                close(out);
            buf_free(&path);
            failed = 1;
            goto done;
        }
        close(out);
        j_str(j, (char *)path.p);
        buf_free(&path);
    } else {
        j_null(j);
    }
    j_key(j, "duration_s");
    j_round3(j, now_s() - x->t0);
    j_key(j, "mptcp");
    j_is_mptcp(j, fd);
    j_key(j, "mptcp_info_mid_raw");
    j_info(j, &mid);
    j_key(j, "mptcp_info_raw");
    if (get_info(fd, &info) != 0) {
        err_errno(err, errno);
        failed = 1;
        goto done;
    }
    j_info(j, &info);
    j_key(j, "subflows");
    get_subflows(fd, &subs);
    j_subflows(j, &subs);
    j_key(j, "fallback");
    j_bool(j, !info.have);
    *ok = all_sent && received == o->expect && strcmp(hex, want) == 0;
    j_key(j, "ok");
    j_bool(j, *ok);

done:
    stop_sender(x);
    close(x->stopfd);
    close(x->donefd);
    pthread_mutex_destroy(&x->mu);
    free(x);
    free(chunk);
    free(e.block);
    buf_free(&e.received);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* transfer: the connection                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* (addr, port) as Python's socket module resolves it: numeric addresses, "" for any, and the
 * few names it knows without a resolver (a static binary has no NSS to ask). */
static int make_sockaddr(int family, const char *addr, long long port, struct sockaddr_storage *ss,
                         socklen_t *len, pyerr *err)
{
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        if (addr[0] == 0)
            s4->sin_addr.s_addr = htonl(INADDR_ANY);
        else if (strcmp(addr, "<broadcast>") == 0)
            s4->sin_addr.s_addr = htonl(INADDR_BROADCAST);
        else if (strcmp(addr, "localhost") == 0)
            s4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        else if (!inet_aton(addr, &s4->sin_addr))
            goto unknown;
        *len = sizeof *s4;
        return 0;
    }
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons((uint16_t)port);
    char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    snprintf(host, sizeof host, "%s", addr);
    char *scope = strchr(host, '%');
    if (scope) {
        *scope++ = 0;
        long long idx;
        s6->sin6_scope_id = parse_int(scope, &idx) == 0 ? (uint32_t)idx : if_nametoindex(scope);
        if (!s6->sin6_scope_id)
            goto unknown;
    }
    if (inet_pton(AF_INET6, host, &s6->sin6_addr) != 1)
        goto unknown;
    *len = sizeof *s6;
    return 0;
unknown:
    err_text(err, "gaierror: [Errno -2] Name or service not known");
    return -1;
}

/* Waits for `fd` to be ready or for the first SIGTERM: 1 ready, 0 timed out, -1 stopped. */
static int wait_ready(int fd, short events, int sigfd, int *term_seen, double deadline)
{
    for (;;) {
        struct pollfd pf[2] = {{fd, events, 0}, {sigfd, POLLIN, 0}};
        struct timespec ts = to_timespec(deadline - now_s());
        int r = ppoll(pf, 2, &ts, NULL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r > 0 && pf[1].revents && sigterm_arrived(sigfd)) {
            *term_seen = 1;
            return -1;
        }
        if (r > 0 && pf[0].revents)
            return 1;
        if (r == 0 || now_s() >= deadline)
            return 0;
    }
}

static int serve_or_connect(const struct opts *o, int sigfd, int *term_seen, int *lfd_out, int *fd_out,
                            struct sockaddr_storage *peer, pyerr *err)
{
    int family = strchr(o->addr, ':') ? AF_INET6 : AF_INET;
    int proto = o->tcp ? 0 : IPPROTO_MPTCP_;
    struct sockaddr_storage ss;
    socklen_t sslen;
    int one = 1, zero = 0;
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, proto);
    if (fd < 0)
        goto fail_errno;
    if (strcmp(o->role, "server") == 0) {
        *lfd_out = fd;
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0)
            goto fail_errno;
        if (family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero) != 0)
            goto fail_errno;
        if (make_sockaddr(family, o->addr, o->port, &ss, &sslen, err) != 0)
            return -1;
        if (bind(fd, (struct sockaddr *)&ss, sslen) != 0 || listen(fd, 8) != 0)
            goto fail_errno;
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); /* settimeout() */
        if (write_all(STDOUT_FILENO, "listening\n", 10) != 0)
            goto fail_errno;
        /* lsock.accept() with lsock.settimeout(timeout) */
        double accept_deadline = now_s() + o->timeout;
        for (;;) {
            socklen_t plen = sizeof *peer;
            int c = accept4(fd, (struct sockaddr *)peer, &plen, SOCK_CLOEXEC);
            if (c >= 0) {
                *fd_out = c;
                break;
            }
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno != EAGAIN && errno != EWOULDBLOCK) || o->timeout == 0)
                goto fail_errno;
            int w = wait_ready(fd, POLLIN, sigfd, term_seen, accept_deadline);
            if (w < 0)
                goto stopped;
            if (w == 0)
                goto timed_out;
        }
        /* The listener stays open for the connection's life: MP_JOIN SYNs come to this port. */
    } else {
        *fd_out = fd;
        if (make_sockaddr(family, o->addr, o->port, &ss, &sslen, err) != 0)
            return -1;
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        if (connect(fd, (struct sockaddr *)&ss, sslen) != 0) {
            if (errno != EINPROGRESS || o->timeout == 0)
                goto fail_errno;
            int w = wait_ready(fd, POLLOUT, sigfd, term_seen, now_s() + o->timeout);
            if (w < 0)
                goto stopped;
            if (w == 0)
                goto timed_out;
            int so_error = 0;
            socklen_t len = sizeof so_error;
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len);
            if (so_error) {
                errno = so_error;
                goto fail_errno;
            }
        }
        socklen_t plen = sizeof *peer;
        if (getpeername(fd, (struct sockaddr *)peer, &plen) != 0)
            goto fail_errno;
    }
    fcntl(*fd_out, F_SETFL, fcntl(*fd_out, F_GETFL) | O_NONBLOCK);
    return 0;
fail_errno:
    err_errno(err, errno);
    return -1;
timed_out:
    err_text(err, TIMED_OUT);
    return -1;
stopped:
    err_text(err, STOPPED);
    return -1;
}

static void write_report(const char *path, const struct buf *text)
{
    /* Written aside and renamed: a report is there whole or not at all. */
    struct buf tmp = {0};
    buf_printf(&tmp, "%s.tmp", path);
    int fd = open((char *)tmp.p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0 || write_all(fd, text->p, text->len) != 0 || close(fd) != 0)
        die("writing %s: %s", (char *)tmp.p, strerror(errno));
    if (rename((char *)tmp.p, path) != 0)
        die("renaming %s to %s: %s", (char *)tmp.p, path, strerror(errno));
    buf_free(&tmp);
}

static int cmd_transfer(int argc, char **argv)
{
    struct opts o;
    parse_transfer_args(argc, argv, &o);
    if (o.port < 0 || o.port > 65535) {
        fprintf(stderr, "OverflowError: %s(): port must be 0-65535.\n",
                strcmp(o.role, "server") == 0 ? "bind" : "connect");
        return 1;
    }
    /* What socket.settimeout() refuses, before any report (as the Python endpoint dies there). */
    const char *refused = o.timeout != o.timeout ? "ValueError: Invalid value NaN (not a number)"
                          : o.timeout < 0 ? "ValueError: Timeout value out of range"
                          : o.timeout > 9.2e9 ? "OverflowError: timestamp out of range for platform time_t"
                          : NULL;
    if (refused) {
        fprintf(stderr, "%s\n", refused);
        return 1;
    }

    /* The harness stops an endpoint whose connection it has seen die: the report of what got
     * through must still be written, so the first SIGTERM ends the exchange, not the process.
     * Every thread blocks it and the main thread reads it from a signalfd among what it waits
     * for, which no blocking call can miss. */
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigprocmask(SIG_BLOCK, &term, NULL);
    int sigfd = signalfd(-1, &term, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sigfd < 0)
        die("signalfd: %s", strerror(errno));
    signal(SIGPIPE, SIG_IGN); /* as in Python: a write to a closed peer is EPIPE, not death */

    double deadline = now_s() + o.timeout;
    int term_seen = 0, lfd = -1, fd = -1, aborted = 0, ok = 0, failed;
    struct sockaddr_storage peer = {0}, local = {0};
    pyerr err = {{0}};
    json j = {0};
    failed = serve_or_connect(&o, sigfd, &term_seen, &lfd, &fd, &peer, &err) != 0;
    if (!failed) {
        socklen_t len = sizeof local; /* read now: an aborting exchange closes the socket */
        if (getsockname(fd, (struct sockaddr *)&local, &len) != 0) {
            err_errno(&err, errno);
            failed = 1;
        }
    }
    if (!failed)
        failed = exchange(fd, &o, sigfd, &term_seen, deadline, &j, &err, &ok, &aborted) != 0;
    if (!failed) {
        j_key(&j, "local");
        j_addr_pair(&j, &local);
        j_key(&j, "peer");
        j_addr_pair(&j, &peer);
        j_key(&j, "socket");
        j_str(&j, o.tcp ? "tcp" : "mptcp");
        j_close(&j, '}');
        if (!aborted)
            close(fd);
        if (lfd >= 0)
            close(lfd);
    }
    /* A first SIGTERM after the exchange proper but before the report is final: in Python the
     * Stopped exception it raises replaces the report. */
    if (!term_seen && sigterm_arrived(sigfd)) {
        err_text(&err, STOPPED);
        failed = 1;
    }
    if (failed) {
        ok = 0;
        buf_free(&j.b);
        memset(&j, 0, sizeof j);
        j_open(&j, '{');
        j_key(&j, "role");
        j_str(&j, o.role);
        j_key(&j, "ok");
        j_bool(&j, 0);
        j_key(&j, "error");
        j_str(&j, err.text);
        j_close(&j, '}');
    }
    write_report(o.report, &j.b);
    buf_free(&j.b);
    return ok ? 0 : 1;
}

static int cmd_stream(int argc, char **argv)
{
    long long size;
    if (argc != 2 || (strcmp(argv[0], "client") != 0 && strcmp(argv[0], "server") != 0)
        || parse_int(argv[1], &size) != 0) {
        fputs("usage: agent stream client|server SIZE\n", stderr);
        return 2;
    }
    unsigned char *block = malloc(BLOCK);
    if (!block)
        die("out of memory");
    stream s;
    stream_init(&s, argv[0], size);
    size_t n;
    while ((n = stream_next(&s, block)) > 0)
        if (write_all(STDOUT_FILENO, block, n) != 0)
            die("writing the stream: %s", strerror(errno));
    free(block);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* serve: rtnetlink, for moving links between namespaces without `ip`                           */
/* ------------------------------------------------------------------------------------------ */

struct link {
    int index;
    unsigned flags;
    char name[IF_NAMESIZE];
};

static uint32_t nl_seq;

static int nl_open(void)
{
    int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (s < 0)
        return -1;
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
    if (bind(s, (struct sockaddr *)&sa, sizeof sa) != 0) {
        int e = errno;
        close(s);
        errno = e;
        return -1;
    }
    return s;
}

static int nl_send(int s, struct nlmsghdr *h)
{
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    h->nlmsg_seq = ++nl_seq;
    for (;;) {
        if (sendto(s, h, h->nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) >= 0)
            return 0;
        if (errno != EINTR)
            return -1;
    }
}

/* Every link the socket's namespace has (RTM_GETLINK dump); -1 with errno on failure. */
static int nl_links(int s, struct link **out, size_t *count)
{
    struct {
        struct nlmsghdr h;
        struct ifinfomsg i;
    } req;
    memset(&req, 0, sizeof req);
    req.h.nlmsg_len = NLMSG_LENGTH(sizeof req.i);
    req.h.nlmsg_type = RTM_GETLINK;
    req.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.i.ifi_family = AF_UNSPEC;
    *out = NULL;
    *count = 0;
    if (nl_send(s, &req.h) != 0)
        return -1;
    static uint32_t reply[65536 / 4]; /* aligned for nlmsghdr */
    for (;;) {
        ssize_t r = recv(s, reply, sizeof reply, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        int left = (int)r;
        for (struct nlmsghdr *h = (struct nlmsghdr *)reply; NLMSG_OK(h, left); h = NLMSG_NEXT(h, left)) {
            if (h->nlmsg_seq != nl_seq)
                continue;
            if (h->nlmsg_type == NLMSG_DONE)
                return 0;
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                errno = e->error ? -e->error : EIO;
                return -1;
            }
            if (h->nlmsg_type != RTM_NEWLINK)
                continue;
            struct ifinfomsg *ifi = NLMSG_DATA(h);
            struct link l = {.index = ifi->ifi_index, .flags = ifi->ifi_flags};
            int alen = (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof *ifi));
            for (struct rtattr *a = IFLA_RTA(ifi); RTA_OK(a, alen); a = RTA_NEXT(a, alen))
                if (a->rta_type == IFLA_IFNAME)
                    snprintf(l.name, sizeof l.name, "%s", (char *)RTA_DATA(a));
            struct link *grown = realloc(*out, (*count + 1) * sizeof **out);
            if (!grown)
                die("out of memory");
            *out = grown;
            (*out)[(*count)++] = l;
        }
    }
}

/* RTM_NEWLINK on an existing link, with one optional u32 attribute: 0 or -errno. */
static int nl_setlink(int s, int index, unsigned flags, unsigned change, int attr, uint32_t value)
{
    struct {
        struct nlmsghdr h;
        struct ifinfomsg i;
        char attrs[16];
    } req;
    memset(&req, 0, sizeof req);
    req.h.nlmsg_len = NLMSG_LENGTH(sizeof req.i);
    req.h.nlmsg_type = RTM_NEWLINK;
    req.h.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
    req.i.ifi_family = AF_UNSPEC;
    req.i.ifi_index = index;
    req.i.ifi_flags = flags;
    req.i.ifi_change = change;
    if (attr) {
        struct rtattr *a = (struct rtattr *)((char *)&req + NLMSG_ALIGN(req.h.nlmsg_len));
        a->rta_type = (unsigned short)attr;
        a->rta_len = RTA_LENGTH(sizeof value);
        memcpy(RTA_DATA(a), &value, sizeof value);
        req.h.nlmsg_len = NLMSG_ALIGN(req.h.nlmsg_len) + RTA_ALIGN(a->rta_len);
    }
    if (nl_send(s, &req.h) != 0)
        return -errno;
    uint32_t reply[8192 / 4];
    for (;;) {
        ssize_t r = recv(s, reply, sizeof reply, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        int left = (int)r;
        for (struct nlmsghdr *h = (struct nlmsghdr *)reply; NLMSG_OK(h, left); h = NLMSG_NEXT(h, left))
            if (h->nlmsg_seq == nl_seq && h->nlmsg_type == NLMSG_ERROR)
                return ((struct nlmsgerr *)NLMSG_DATA(h))->error;
    }
}

/* Moves every link but the loopback of the socket's namespace into the namespace `to_nsfd`;
 * what could not be moved is described in `msg`. Returns how many moves failed. */
static int move_links(int nl, int to_nsfd, const char *where, struct buf *msg)
{
    struct link *links;
    size_t n;
    if (nl_links(nl, &links, &n) != 0) {
        buf_printf(msg, "listing the links to move %s: %s\n", where, strerror(errno));
        return 1;
    }
    int failures = 0;
    for (size_t i = 0; i < n; i++) {
        if (links[i].flags & IFF_LOOPBACK)
            continue;
        int r = nl_setlink(nl, links[i].index, 0, 0, IFLA_NET_NS_FD, (uint32_t)to_nsfd);
        /* EINVAL: a device that cannot change namespace (sit0, tunl0 and the like: every
         * namespace has its own); ENODEV: gone since the listing. Neither is a link lost. */
        if (r == 0 || r == -EINVAL || r == -ENODEV)
            continue;
        buf_printf(msg, "moving %s %s: %s\n", links[i].name, where, strerror(-r));
        failures++;
    }
    free(links);
    return failures;
}

/* ------------------------------------------------------------------------------------------ */
/* serve: the control loop                                                                      */
/* ------------------------------------------------------------------------------------------ */

#define RC_RUNNING 255
#define RC_UNKNOWN_TAG 254
#define RC_BAD_REQUEST 253
#define SH_OUTPUT_CAP (8u << 20)
#define LINE_CAP (1u << 20)
#define BG_DIR "/run/bg"

struct bg {
    char tag[65];
    pid_t pid;
    int running; /* not reaped yet */
    int rc;      /* once reaped: exit status, or 128 + signal */
};

static struct {
    int in, out;        /* the control channel */
    int reconnects;     /* a device (not stdin): end of file means the host went away for now */
    int devnull;
    int init_nsfd;      /* the namespace the agent started in */
    int case_nsfd;      /* the current case's, -1 before the first `netns` */
    pid_t holder;       /* the process keeping the case namespace alive (0: none, or reaped) */
    struct bg *bgs;
    size_t nbgs;
} S = {.case_nsfd = -1};

static int status_rc(int status)
{
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 255;
}

static void respond(const char *id, int rc, const void *data, size_t n)
{
    char head[160];
    int k = snprintf(head, sizeof head, "=%s %d %zu\n", id, rc, n);
    struct buf b = {0};
    buf_add(&b, head, (size_t)k);
    buf_add(&b, data, n);
    if (write_all(S.out, b.p, b.len) != 0)
        fprintf(stderr, "agent: answering request %s: %s\n", id, strerror(errno));
    buf_free(&b);
}

static void respond_text(const char *id, int rc, const char *text) { respond(id, rc, text, strlen(text)); }

static void respond_error(const char *id, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void respond_error(const char *id, const char *fmt, ...)
{
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    for (char *p = text; *p; p++) /* one line, always */
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    respond_text(id, RC_BAD_REQUEST, text);
}

/* Collects every child that has ended: background jobs (their status is kept for `poll`), the
 * namespace holder, and orphans the agent may inherit (none of which may stay zombies). */
static void reap_all(void)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (pid == S.holder)
            S.holder = 0; /* the namespace lives on: the agent holds it by its descriptor */
        for (size_t i = 0; i < S.nbgs; i++)
            if (S.bgs[i].running && S.bgs[i].pid == pid) {
                S.bgs[i].running = 0;
                S.bgs[i].rc = status_rc(status);
            }
    }
}

/* A child that runs `/bin/sh -c cmd` with the given stdio, in the case namespace if there is
 * one (set before exec: the shell and all it starts live there). */
static pid_t spawn_sh(const char *cmd, int in, int out, int err, int own_group)
{
    pid_t pid = fork();
    if (pid != 0) {
        if (pid > 0 && own_group)
            setpgid(pid, pid); /* in the parent too, so that a killpg right after cannot miss */
        return pid;
    }
    if (own_group)
        setpgid(0, 0);
    dup2(in, 0);
    dup2(out, 1);
    dup2(err, 2);
    /* The shell must not inherit the agent's dispositions (SIGPIPE ignored survives exec). */
    for (int sig = 1; sig < NSIG; sig++)
        signal(sig, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (S.case_nsfd >= 0 && setns(S.case_nsfd, CLONE_NEWNET) != 0) {
        dprintf(2, "agent: entering the case network namespace: %s\n", strerror(errno));
        _exit(127);
    }
    execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
    dprintf(2, "agent: /bin/sh: %s\n", strerror(errno));
    _exit(127);
}

static int pidfd_open_(pid_t pid)
{
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    (void)pid;
    errno = ENOSYS;
    return -1;
#endif
}

/* Appends what `fd` has now (up to the cap; the rest is read and dropped so the writer never
 * blocks): 1 more may come, 0 end of file. */
static int drain(int fd, struct buf *out)
{
    char chunk[65536];
    for (;;) {
        ssize_t r = read(fd, chunk, sizeof chunk);
        if (r > 0) {
            size_t room = out->len < SH_OUTPUT_CAP ? SH_OUTPUT_CAP - out->len : 0;
            buf_add(out, chunk, (size_t)r < room ? (size_t)r : room);
            continue;
        }
        if (r == 0)
            return 0;
        if (errno == EINTR)
            continue;
        return errno == EAGAIN || errno == EWOULDBLOCK ? 1 : 0;
    }
}

static void do_sh(const char *id, const char *cmd)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) {
        respond_error(id, "pipe: %s", strerror(errno));
        return;
    }
    pid_t pid = spawn_sh(cmd, S.devnull, p[1], p[1], 0);
    close(p[1]);
    if (pid < 0) {
        respond_error(id, "fork: %s", strerror(errno));
        close(p[0]);
        return;
    }
    /* Output until the pipe closes or the shell has ended: a job it left running in the
     * background may hold the pipe open for ever, and must not hold the answer back. */
    int pidfd = pidfd_open_(pid), status = 0, exited = 0;
    struct buf out = {0};
    buf_add(&out, "", 0);
    for (;;) {
        if (exited) {
            drain(p[0], &out);
            break;
        }
        struct pollfd pf[2] = {{p[0], POLLIN, 0}, {pidfd, POLLIN, 0}};
        int r = poll(pf, pidfd >= 0 ? 2 : 1, pidfd >= 0 ? -1 : 50);
        if (r < 0 && errno != EINTR)
            break;
        if (r > 0 && pf[0].revents && drain(p[0], &out) == 0)
            break; /* end of file: the shell is ending */
        if (pidfd < 0 || (r > 0 && pf[1].revents)) {
            pid_t w = waitpid(pid, &status, WNOHANG);
            exited = w == pid || (w < 0 && errno != EINTR);
        }
    }
    while (!exited) {
        pid_t w = waitpid(pid, &status, 0);
        exited = w == pid || (w < 0 && errno != EINTR);
    }
    if (pidfd >= 0)
        close(pidfd);
    close(p[0]);
    respond(id, status_rc(status), out.p, out.len);
    buf_free(&out);
}

static int valid_tag(const char *tag)
{
    size_t n = strlen(tag);
    if (n == 0 || n > 64 || tag[0] == '.')
        return 0;
    for (const char *p = tag; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '_'
              || *p == '-' || *p == '.'))
            return 0;
    return 1;
}

static struct bg *find_bg(const char *tag)
{
    for (size_t i = 0; i < S.nbgs; i++)
        if (strcmp(S.bgs[i].tag, tag) == 0)
            return &S.bgs[i];
    return NULL;
}

static void do_bg(const char *id, char *rest)
{
    char *space = strchr(rest, ' ');
    if (!space || !space[1]) {
        respond_error(id, "usage: bg TAG COMMAND");
        return;
    }
    *space = 0;
    const char *tag = rest, *cmd = space + 1;
    if (!valid_tag(tag)) {
        respond_error(id, "bad tag '%s' (letters, digits, '_', '-', '.'; at most 64)", tag);
        return;
    }
    reap_all();
    struct bg *b = find_bg(tag);
    if (b && b->running) {
        respond_error(id, "tag %s is still running (pid %d)", tag, (int)b->pid);
        return;
    }
    mkdir("/run", 0755);
    if (mkdir(BG_DIR, 0755) != 0 && errno != EEXIST) {
        respond_error(id, "mkdir %s: %s", BG_DIR, strerror(errno));
        return;
    }
    char path[128];
    snprintf(path, sizeof path, BG_DIR "/%s.out", tag);
    int out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    snprintf(path, sizeof path, BG_DIR "/%s.err", tag);
    int err = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0 || err < 0) {
        respond_error(id, "opening %s/%s.*: %s", BG_DIR, tag, strerror(errno));
        if (out >= 0)
            close(out);
        if (err >= 0)
            close(err);
        return;
    }
    pid_t pid = spawn_sh(cmd, S.devnull, out, err, 1);
    close(out);
    close(err);
    if (pid < 0) {
        respond_error(id, "fork: %s", strerror(errno));
        return;
    }
    if (!b) {
        struct bg *grown = realloc(S.bgs, (S.nbgs + 1) * sizeof *S.bgs);
        if (!grown)
            die("out of memory");
        S.bgs = grown;
        b = &S.bgs[S.nbgs++];
        snprintf(b->tag, sizeof b->tag, "%s", tag);
    }
    b->pid = pid;
    b->running = 1;
    b->rc = 0;
    char text[32];
    snprintf(text, sizeof text, "%d", (int)pid);
    respond_text(id, 0, text);
}

static void do_poll(const char *id, const char *tag)
{
    struct bg *b = find_bg(tag);
    if (!b) {
        respond_text(id, RC_UNKNOWN_TAG, "unknown tag");
        return;
    }
    if (b->running) {
        int status;
        pid_t w = waitpid(b->pid, &status, WNOHANG);
        if (w == 0) {
            respond_text(id, RC_RUNNING, "running");
            return;
        }
        b->running = 0;
        b->rc = w == b->pid ? status_rc(status) : RC_BAD_REQUEST; /* reaped elsewhere: unknown */
    }
    respond(id, b->rc, "", 0); /* kept: asking again gives the same answer */
}

static void do_kill(const char *id, char *rest)
{
    char *space = strchr(rest, ' ');
    long long sig;
    if (!space || (*space = 0, parse_int(space + 1, &sig) != 0) || sig < 0 || sig >= NSIG) {
        respond_error(id, "usage: kill TAG SIGNUM");
        return;
    }
    struct bg *b = find_bg(rest);
    if (!b) {
        respond_text(id, RC_UNKNOWN_TAG, "unknown tag");
        return;
    }
    /* The whole group: a job's shell and what it started. A group already empty is no error. */
    if (killpg(b->pid, (int)sig) != 0 && errno != ESRCH) {
        char text[128];
        snprintf(text, sizeof text, "killpg %d: %s", (int)b->pid, strerror(errno));
        respond_text(id, 1, text);
        return;
    }
    respond(id, 0, "", 0);
}

/* Every background job still running is killed (its whole group) and reaped. */
static void kill_bgs(void)
{
    for (size_t i = 0; i < S.nbgs; i++) {
        struct bg *b = &S.bgs[i];
        if (!b->running)
            continue;
        killpg(b->pid, SIGKILL);
        int status;
        pid_t w;
        while ((w = waitpid(b->pid, &status, 0)) < 0 && errno == EINTR)
            ;
        b->running = 0;
        b->rc = w == b->pid ? status_rc(status) : 128 + SIGKILL;
    }
}

/* A netlink socket in the namespace `nsfd` (a socket stays in the namespace it was made in). */
static int nl_open_in(int nsfd)
{
    if (setns(nsfd, CLONE_NEWNET) != 0)
        return -1;
    int s = nl_open(), e = errno;
    if (setns(S.init_nsfd, CLONE_NEWNET) != 0)
        die("back to the initial network namespace: %s", strerror(errno)); /* cannot go on astray */
    errno = e;
    return s;
}

static void end_case_namespace(void)
{
    if (S.holder > 0) {
        kill(S.holder, SIGKILL);
        while (waitpid(S.holder, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    S.holder = 0;
    if (S.case_nsfd >= 0)
        close(S.case_nsfd);
    S.case_nsfd = -1;
}

/* The holder: a child that owns a new network namespace (with `lo` up) and sleeps until killed.
 * Returns its pid and the namespace's descriptor, or -1 with a message. */
static pid_t start_holder(int *nsfd, struct buf *msg)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) {
        buf_printf(msg, "pipe: %s", strerror(errno));
        return -1;
    }
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        buf_printf(msg, "fork: %s", strerror(errno));
        close(p[0]);
        close(p[1]);
        return -1;
    }
    if (pid == 0) {
        /* Out of the agent's process group and session (a ^C for the agent is not for it), and
         * gone with the agent. */
        setsid();
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(0);
        int report[2] = {0, 0}; /* stage that failed, errno */
        if (unshare(CLONE_NEWNET) != 0) {
            report[0] = 1;
            report[1] = errno;
        } else {
            int nl = nl_open();
            struct link *links = NULL;
            size_t n = 0;
            if (nl < 0 || nl_links(nl, &links, &n) != 0) {
                report[0] = 2;
                report[1] = errno;
            }
            for (size_t i = 0; i < n && !report[0]; i++) {
                int r = links[i].flags & IFF_LOOPBACK ? nl_setlink(nl, links[i].index, IFF_UP, IFF_UP, 0, 0) : 0;
                if (r != 0) {
                    report[0] = 3;
                    report[1] = -r;
                }
            }
        }
        if (write(p[1], report, sizeof report) < 0) { /* the agent sees a short read */ }
        /* Nothing of the agent's stays open here: not the control channel, above all. */
        dup2(S.devnull, 0);
        dup2(S.devnull, 1);
        if (syscall(SYS_close_range, 3, ~0U, 0) != 0)
            for (int fd = 3; fd < 1024; fd++)
                close(fd);
        if (report[0])
            _exit(1);
        for (;;)
            pause();
    }
    close(p[1]);
    int report[2];
    ssize_t r;
    while ((r = read(p[0], report, sizeof report)) < 0 && errno == EINTR)
        ;
    close(p[0]);
    if (r != (ssize_t)sizeof report || report[0]) {
        static const char *stage[] = {"starting", "unshare(CLONE_NEWNET)", "listing its links", "bringing lo up"};
        buf_printf(msg, "new namespace: %s: %s", stage[r == (ssize_t)sizeof report ? report[0] : 0],
                   r == (ssize_t)sizeof report ? strerror(report[1]) : "the holder died");
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        return -1;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/ns/net", (int)pid);
    *nsfd = open(path, O_RDONLY | O_CLOEXEC);
    if (*nsfd < 0) {
        buf_printf(msg, "%s: %s", path, strerror(errno));
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
        return -1;
    }
    return pid;
}

static void do_netns(const char *id)
{
    struct buf msg = {0};
    int failures = 0;
    buf_add(&msg, "", 0);
    /* Nothing of the last case may go on into the next: its jobs die, its links come home. */
    kill_bgs();
    if (S.case_nsfd >= 0) {
        int nl = nl_open_in(S.case_nsfd);
        if (nl < 0) {
            buf_printf(&msg, "netlink in the case namespace: %s\n", strerror(errno));
            failures++;
        } else {
            failures += move_links(nl, S.init_nsfd, "back", &msg);
            close(nl);
        }
        end_case_namespace();
    }
    struct buf err = {0};
    int nsfd;
    pid_t pid = start_holder(&nsfd, &err);
    if (pid < 0) {
        respond_error(id, "%s%s", (char *)msg.p, (char *)err.p);
        buf_free(&msg);
        buf_free(&err);
        return;
    }
    S.holder = pid;
    S.case_nsfd = nsfd;
    int nl = nl_open(); /* the agent itself is always in the initial namespace */
    if (nl < 0) {
        buf_printf(&msg, "netlink: %s\n", strerror(errno));
        failures++;
    } else {
        failures += move_links(nl, nsfd, "into the case namespace", &msg);
        close(nl);
    }
    struct buf text = {0};
    buf_printf(&text, "%d", (int)pid);
    if (failures) {
        buf_printf(&text, "\n%s", (char *)msg.p);
        text.len--; /* no trailing newline */
    }
    respond(id, failures ? 1 : 0, text.p, text.len);
    buf_free(&text);
    buf_free(&msg);
}

static void cleanup_and_exit(int code)
{
    kill_bgs();
    end_case_namespace();
    exit(code);
}

/* One request line: `<id> <verb> [<rest>]`. Returns 1 after `quit`. */
static int handle_line(char *line)
{
    size_t len = strlen(line);
    if (len && line[len - 1] == '\r')
        line[--len] = 0;
    if (strspn(line, " \t") == len)
        return 0; /* a blank line asks nothing */
    char *space = strchr(line, ' ');
    const char *verb = space ? space + 1 : "";
    if (space)
        *space = 0;
    const char *id = line;
    int id_ok = *id && strlen(id) <= 64;
    for (const char *p = id; *p; p++)
        if (*p < 0x21 || *p > 0x7e)
            id_ok = 0;
    if (!id_ok) {
        respond_error("?", "malformed request: no usable id");
        return 0;
    }
    char *rest = strchr(verb, ' ');
    if (rest)
        *rest++ = 0;
    if (!*verb) {
        respond_error(id, "malformed request: no verb");
    } else if (strcmp(verb, "ping") == 0 && !rest) {
        respond_text(id, 0, "pong");
    } else if (strcmp(verb, "sh") == 0 && rest && *rest) {
        do_sh(id, rest);
    } else if (strcmp(verb, "bg") == 0 && rest) {
        do_bg(id, rest);
    } else if (strcmp(verb, "poll") == 0 && rest && valid_tag(rest)) {
        reap_all();
        do_poll(id, rest);
    } else if (strcmp(verb, "kill") == 0 && rest) {
        do_kill(id, rest);
    } else if (strcmp(verb, "netns") == 0 && !rest) {
        do_netns(id);
    } else if (strcmp(verb, "quit") == 0 && !rest) {
        respond(id, 0, "", 0);
        return 1;
    } else if (!strcmp(verb, "ping") || !strcmp(verb, "sh") || !strcmp(verb, "bg") || !strcmp(verb, "poll")
               || !strcmp(verb, "kill") || !strcmp(verb, "netns") || !strcmp(verb, "quit")) {
        respond_error(id, "malformed request: bad arguments for %s", verb);
    } else {
        respond_error(id, "unknown verb '%.40s'", verb);
    }
    return 0;
}

static int cmd_serve(const char *device)
{
    /* Descriptors 0-2 exist (closed ones would be handed out to our own files and pipes, which
     * a child's dup2() onto its stdio would then clobber). */
    int fd;
    while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= 2)
        ;
    if (fd > 2)
        close(fd);
    S.devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (S.devnull < 0)
        die("/dev/null: %s", strerror(errno));
    if (strcmp(device, "-") == 0) {
        S.in = STDIN_FILENO;
        S.out = STDOUT_FILENO;
    } else {
        S.in = S.out = open(device, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (S.in < 0)
            die("%s: %s", device, strerror(errno));
        S.reconnects = 1;
        struct termios t;
        if (tcgetattr(S.in, &t) == 0) { /* a console port (hvc): bytes as they are, no echo */
            cfmakeraw(&t);
            tcsetattr(S.in, TCSANOW, &t);
        }
    }
    S.init_nsfd = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (S.init_nsfd < 0)
        die("/proc/self/ns/net: %s", strerror(errno));
    /* The host may vanish mid-answer: EPIPE from write, not death. Children get it back. */
    signal(SIGPIPE, SIG_IGN);

    static char chunk[65536];
    struct buf in = {0};
    buf_reserve(&in, sizeof chunk + 1); /* never NULL, even before the first byte */
    size_t start = 0;    /* where the unprocessed bytes begin */
    int discarding = 0;  /* in an over-long line: dropped up to its newline */
    char discarded_id[65] = "?";
    for (;;) {
        /* Every complete line in what has come so far. */
        for (;;) {
            unsigned char *nl = memchr(in.p + start, '\n', in.len - start);
            if (!nl)
                break;
            *nl = 0;
            char *line = (char *)in.p + start;
            size_t len = (size_t)(nl - (in.p + start));
            start += len + 1;
            if (discarding) {
                discarding = 0;
                respond_error(discarded_id, "request line longer than %u bytes", LINE_CAP);
            } else if (memchr(line, 0, len)) {
                respond_error("?", "malformed request: a NUL byte");
            } else if (handle_line(line)) {
                cleanup_and_exit(0);
            }
            reap_all();
        }
        memmove(in.p, in.p + start, in.len - start);
        in.len -= start;
        start = 0;
        if (in.len > LINE_CAP) {
            if (!discarding) {
                size_t n = strcspn((char *)in.p, " ");
                snprintf(discarded_id, sizeof discarded_id, "%.*s", (int)(n < 64 ? n : 64), (char *)in.p);
                for (char *p = discarded_id; *p; p++)
                    if (*p < 0x21 || *p > 0x7e)
                        *p = '?';
            }
            discarding = 1;
            in.len = 0;
        }

        struct pollfd pf = {S.in, POLLIN, 0};
        int r = poll(&pf, 1, 1000);
        if (r == 0) {
            reap_all(); /* orphans of jobs must not linger as zombies between requests */
            continue;
        }
        if (r < 0) {
            if (errno != EINTR)
                sleep_s(0.1);
            continue;
        }
        ssize_t n = read(S.in, chunk, sizeof chunk);
        if (n > 0) {
            buf_add(&in, chunk, (size_t)n);
            continue;
        }
        if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (!S.reconnects)
            break; /* stdin closed: the session is over */
        /* A virtio-serial port reads as ended (and polls as hung up) while no host is connected:
         * wait for one, and let a half-sent line go with the host that sent it. */
        in.len = 0;
        discarding = 0;
        sleep_s(0.2);
        reap_all();
    }
    cleanup_and_exit(0);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "transfer") == 0)
        return cmd_transfer(argc - 2, argv + 2);
    if (argc == 3 && strcmp(argv[1], "serve") == 0)
        return cmd_serve(argv[2]);
    if (argc >= 2 && strcmp(argv[1], "stream") == 0)
        return cmd_stream(argc - 2, argv + 2);
    fputs("usage: agent transfer server|client --addr A --port P ... --report PATH\n"
          "       agent serve DEVICE|-\n"
          "       agent stream client|server SIZE\n",
          stderr);
    return 2;
}
