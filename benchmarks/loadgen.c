/*
 * The benchmark's load generator, compiled so that it never limits the
 * figures.  Built and run by bench.py (see benchmarks/README.md); prints one
 * JSON object on stdout, or a message on stderr and exits 1 when a reply is
 * not the expected one, a count does not add up, or nothing comes for 30 s.
 *
 *   loadgen stream --addr HOST:PORT --queue Q [--conns C] [--window W]
 *           --phase pairs:N|puts:N|gets:N|acks:N [--phase ...]
 *           [--warmup-pairs P] [--get-timeout MS] [--idle K [--expect-conns] [--rss-pid PID]]
 *       C connections, each working through the phases (N requests each) with
 *       W requests in flight: after each read, one request per reply it
 *       brought, all in one writev.  One connection is driven
 *       with blocking calls, several with epoll in one thread.
 *       acks:N: N Reserve + Ack pairs (2N requests; the queue must hold N
 *       messages): each Reserve's reply brings the id its Ack sends back,
 *       Acks go out before new Reserves, and the window counts both.
 *   loadgen consumers --addr HOST:PORT --queue Q --total N [--producers 4]
 *           [--consumers 4] [--window 128] [--get-timeout 1000]
 *           [--multiplex | --consumer-window G]
 *       Producers pipeline N Puts in all (one thread, epoll), consumers each
 *       send one Get and wait for its reply (a blocking thread each, or with
 *       --multiplex all on one epoll thread), until N messages are delivered.
 *       --consumer-window G: the consumers pipeline G Gets each instead, all
 *       on one epoll thread; after each read, one Get per reply it brought,
 *       in one send.  A Timeout reply is counted and its Get sent again.
 *
 * Message bodies are the benchmark's deterministic pattern, of the size named
 * by the queue's last dot-separated field.  Gets carry --get-timeout (ms, by
 * default 1000): a Get in "stream" expects a message, which a server holding
 * one sends at once whatever the timeout (the original Go server, given 0,
 * which it takes as 1 ms, sometimes answers Timeout under load while the
 * message is there); a message that is missing shows as Timeout.
 * Latency: per request, from the send call that carried it to the return of
 * the receive call that brought its reply (CLOCK_MONOTONIC).  cpu_s/cpu_frac:
 * this process's user+system CPU over the timed part (1.0 = one core busy).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define STALL_S 30
#define MAX_IOV 1024

typedef unsigned char u8;

static const char PATTERN[] = "mqmq benchmark message: 0123456789 abcdefghijklmnopqrstuvwxyz\n";

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    fflush(stderr);
    _exit(1);
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* This process's CPU time, all threads, user and system (exact, not in ticks as getrusage may be). */
static double cpu_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void put32(u8 *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static uint32_t get32(const u8 *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

typedef struct { u8 *data; size_t len; } buf_t;

static buf_t frame(int n, const void **values, const size_t *lens) {
    size_t total = 4;
    for (int i = 0; i < n; i++) total += 4 + lens[i];
    buf_t b = { malloc(total), total };
    if (!b.data) fail("out of memory");
    put32(b.data, (uint32_t)(total - 4));
    size_t o = 4;
    for (int i = 0; i < n; i++) {
        put32(b.data + o, (uint32_t)lens[i]);
        memcpy(b.data + o + 4, values[i], lens[i]);
        o += 4 + lens[i];
    }
    return b;
}

static size_t size_of_queue(const char *name) {
    const char *dot = strrchr(name, '.');
    const char *tail = dot ? dot + 1 : name;
    if (!*tail) return 0;
    for (const char *p = tail; *p; p++)
        if (*p < '0' || *p > '9') return 0;
    return (size_t)strtoull(tail, NULL, 10);
}

/* --- Requests and expected replies ------------------------------------------ */

static buf_t PUT, GET, GET_REPLY, OK_REPLY, TIMEOUT_REPLY, INFO_REQ, RESERVE;
static const char *g_queue;
/* Room for an Ack frame: its header, "Ack", the queue and an id (at most 64 bytes). */
#define ACK_ROOM(queue_len) (4 + 4 + 3 + 4 + (queue_len) + 4 + 64)

static void build_requests(const char *queue, int get_timeout_ms) {
    size_t size = size_of_queue(queue);
    u8 *body = malloc(size + 1);
    if (!body) fail("out of memory");
    for (size_t i = 0; i < size; i++) body[i] = PATTERN[i % (sizeof PATTERN - 1)];
    char timeout[24];
    snprintf(timeout, sizeof timeout, "%d", get_timeout_ms);
    const void *pv[3] = { "Put", queue, body };
    size_t pl[3] = { 3, strlen(queue), size };
    PUT = frame(3, pv, pl);
    const void *gv[3] = { "Get", queue, timeout };
    size_t gl[3] = { 3, strlen(queue), strlen(timeout) };
    GET = frame(3, gv, gl);
    const void *sv[3] = { "Reserve", queue, timeout };
    size_t sl[3] = { 7, strlen(queue), strlen(timeout) };
    RESERVE = frame(3, sv, sl);
    g_queue = queue;
    const void *rv[2] = { "OK", body };
    size_t rl[2] = { 2, size };
    GET_REPLY = frame(2, rv, rl);
    const void *ov[1] = { "OK" };
    size_t ol[1] = { 2 };
    OK_REPLY = frame(1, ov, ol);
    const void *tv[1] = { "Timeout" };
    size_t tl[1] = { 7 };
    TIMEOUT_REPLY = frame(1, tv, tl);
    const void *iv[1] = { "Info" };
    size_t il[1] = { 4 };
    INFO_REQ = frame(1, iv, il);
    free(body);
}

/* Say what an unexpected reply was. */
static void unexpected(const u8 *got, size_t len, const buf_t *expected, long good) {
    char shown[200];
    size_t o = 0;
    shown[0] = 0;
    /* the values, shortened */
    size_t off = 4;
    int first = 1, malformed = len < 4 || get32(got) != len - 4;
    while (!malformed && off < len && o < sizeof shown - 60) {
        if (len - off < 4) { malformed = 1; break; }
        uint32_t l = get32(got + off);
        off += 4;
        if (l > len - off) { malformed = 1; break; }
        o += snprintf(shown + o, sizeof shown - o, "%s'", first ? "" : ", ");
        for (uint32_t i = 0; i < l && i < 40 && o < sizeof shown - 20; i++) {
            u8 ch = got[off + i];
            shown[o++] = (ch >= 32 && ch < 127 && ch != '\'') ? (char)ch : '?';
        }
        o += snprintf(shown + o, sizeof shown - o, l > 40 ? "'...(%u bytes)" : "'", l);
        off += l;
        first = 0;
    }
    if (malformed) fail("malformed reply (%zu bytes) after %ld good replies", len, good);
    if (len >= 15 && memcmp(got + 8, "Timeout", 7) == 0 && expected != &TIMEOUT_REPLY)
        fail("a Get was answered Timeout after %ld good replies: messages went missing", good);
    if (len >= 13 && memcmp(got + 8, "Error", 5) == 0)
        fail("the server answered [%s] after %ld good replies", shown, good);
    fail("unexpected reply [%s] (%zu bytes) after %ld good replies; expected a %zu-byte frame",
         shown, len, good, expected->len);
}

/* --- Connections ------------------------------------------------------------- */

static char *g_host = "127.0.0.1";
static int g_port;

static void parse_addr(const char *addr) {
    const char *colon = strrchr(addr, ':');
    if (!colon) fail("bad address %s: want HOST:PORT", addr);
    g_port = atoi(colon + 1);
    if (colon != addr) {
        g_host = strndup(addr, (size_t)(colon - addr));
        if (g_host[0] == '[') {
            g_host++;
            g_host[strlen(g_host) - 1] = 0;
        }
    }
}

static int connect_to(int nodelay, int recv_timeout_s) {
    struct sockaddr_in sa4 = { .sin_family = AF_INET, .sin_port = htons((uint16_t)g_port) };
    struct sockaddr_in6 sa6 = { .sin6_family = AF_INET6, .sin6_port = htons((uint16_t)g_port) };
    struct sockaddr *sa;
    socklen_t salen;
    int family;
    if (inet_pton(AF_INET, g_host, &sa4.sin_addr) == 1) {
        sa = (struct sockaddr *)&sa4; salen = sizeof sa4; family = AF_INET;
    } else if (inet_pton(AF_INET6, g_host, &sa6.sin6_addr) == 1) {
        sa = (struct sockaddr *)&sa6; salen = sizeof sa6; family = AF_INET6;
    } else {
        fail("bad host %s: want a numeric IP address", g_host);
        return -1;
    }
    int fd = socket(family, SOCK_STREAM, 0);
    if (fd < 0) fail("socket: %s", strerror(errno));
    if (connect(fd, sa, salen) < 0) fail("cannot connect to %s:%d: %s", g_host, g_port, strerror(errno));
    int one = 1;
    if (nodelay) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = { recv_timeout_s, 0 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct timeval stv = { STALL_S, 0 };
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &stv, sizeof stv);
    return fd;
}

static void write_all(int fd, struct iovec *iov, int count, long good) {
    while (count) {
        ssize_t n = writev(fd, iov, count > MAX_IOV ? MAX_IOV : count);
        if (n < 0) {
            if (errno == EINTR) continue;
            fail("sending failed after %ld replies: %s", good, strerror(errno));
        }
        size_t left = (size_t)n;
        while (left) {
            if (left >= iov->iov_len) {
                left -= iov->iov_len;
                iov++;
                count--;
            } else {
                iov->iov_base = (char *)iov->iov_base + left;
                iov->iov_len -= left;
                left = 0;
            }
        }
        while (count && iov->iov_len == 0) { iov++; count--; }
    }
}

/* --- Streams --------------------------------------------------------------------- */

typedef struct { const buf_t *req, *rep; } item_t;
/* A phase: `count` requests, after the pattern; or, with `acks`, Reserve +
   Ack pairs (count = 2 x pairs), the Acks made from the Reserves' replies. */
typedef struct { item_t pat[2]; int npat; long count; int acks; } phase_t;

/* What a request in flight was, for its reply: */
enum { KIND_PATTERN, KIND_RESERVE, KIND_ACK };

typedef struct {
    int fd;
    phase_t *phases;
    int nphases;
    long total, sent, replied;
    int window;
    int send_phase, recv_phase;
    long send_pos, recv_pos;  /* position within the current phase */
    uint64_t *sent_at;        /* ring of window entries */
    uint64_t *lat;            /* per reply */
    u8 *buf;
    size_t cap, filled;
    uint64_t first_send, last_recv;
    struct iovec *iov;
    long recv_calls, send_calls;
    /* acks phases: each request's kind (a ring of window entries), the Reserves
       sent in the current phase, and the Acks ready to go (a ring of window
       frames of ack_room bytes each, from ack_head, ack_ready of them). */
    u8 *kinds;
    long reserves_sent;
    u8 *acks;
    size_t ack_room;
    long ack_head, ack_ready;
} stream_t;

static size_t largest_reply(phase_t *phases, int n) {
    size_t m = 0;
    for (int p = 0; p < n; p++)
        for (int i = 0; i < phases[p].npat; i++)
            if (phases[p].pat[i].rep->len > m) m = phases[p].pat[i].rep->len;
    for (int p = 0; p < n; p++)  /* a Reserve's reply: the Get's, an id and a count */
        if (phases[p].acks && GET_REPLY.len + 4 + 64 + 4 + 20 > m) m = GET_REPLY.len + 4 + 64 + 4 + 20;
    return m;
}

static void stream_init(stream_t *s, int fd, phase_t *phases, int nphases, int window, int keep_latency) {
    memset(s, 0, sizeof *s);
    s->fd = fd;
    s->phases = phases;
    s->nphases = nphases;
    for (int i = 0; i < nphases; i++) s->total += phases[i].count;
    s->window = window;
    s->sent_at = calloc((size_t)window, sizeof *s->sent_at);
    s->lat = keep_latency ? malloc((size_t)(s->total + 1) * sizeof *s->lat) : NULL;
    size_t largest = largest_reply(phases, nphases);
    s->cap = 2 * largest + 65536;
    if (s->cap < (1u << 18)) s->cap = 1u << 18;
    s->buf = malloc(s->cap);
    s->iov = malloc((size_t)window * sizeof *s->iov);
    s->kinds = calloc((size_t)window, 1);
    s->ack_room = ACK_ROOM(strlen(g_queue));
    s->acks = malloc((size_t)window * s->ack_room);
    if (!s->sent_at || (keep_latency && !s->lat) || !s->buf || !s->iov || !s->kinds || !s->acks)
        fail("out of memory");
    while (s->recv_phase < nphases && phases[s->recv_phase].count == 0) s->recv_phase++;
    while (s->send_phase < nphases && phases[s->send_phase].count == 0) s->send_phase++;
}

static void stream_free(stream_t *s) {
    free(s->sent_at);
    free(s->lat);
    free(s->buf);
    free(s->iov);
    free(s->kinds);
    free(s->acks);
}

/* Send up to `most` requests (bounded by the window and the total) in one writev. */
static void stream_send(stream_t *s, long most) {
    long room = s->window - (s->sent - s->replied);
    long left = s->total - s->sent;
    long n = most < room ? most : room;
    if (n > left) n = left;
    if (n <= 0) return;
    for (long k = 0; k < n; k++) {
        phase_t *ph = &s->phases[s->send_phase];
        u8 *kind = &s->kinds[(s->sent + k) % s->window];
        if (!ph->acks) {
            const buf_t *req = ph->pat[s->send_pos % ph->npat].req;
            s->iov[k].iov_base = req->data;
            s->iov[k].iov_len = req->len;
            *kind = KIND_PATTERN;
        } else if (s->ack_ready) {
            u8 *ack = s->acks + (size_t)(s->ack_head % s->window) * s->ack_room;
            s->iov[k].iov_base = ack;
            s->iov[k].iov_len = 4 + get32(ack);
            s->ack_head++;
            s->ack_ready--;
            *kind = KIND_ACK;
        } else if (s->reserves_sent < ph->count / 2) {
            s->iov[k].iov_base = RESERVE.data;
            s->iov[k].iov_len = RESERVE.len;
            s->reserves_sent++;
            *kind = KIND_RESERVE;
        } else {
            n = k;  /* the rest wait for their Reserves' replies */
            break;
        }
        if (++s->send_pos == ph->count) {
            s->send_pos = 0;
            s->reserves_sent = 0;
            do s->send_phase++; while (s->send_phase < s->nphases && s->phases[s->send_phase].count == 0);
        }
    }
    if (n <= 0) return;
    uint64_t t = now_ns();
    if (!s->first_send) s->first_send = t;
    for (long k = 0; k < n; k++) s->sent_at[(s->sent + k) % s->window] = t;
    write_all(s->fd, s->iov, (int)n, s->replied);
    __atomic_store_n(&s->sent, s->sent + n, __ATOMIC_RELEASE);
    s->send_calls++;
}

/* A Reserve's reply: OK, the benchmark message, an id and a deliveries
   count; its Ack is made ready to send. */
static void reserved(stream_t *s, const u8 *got, size_t len) {
    size_t get_len = GET_REPLY.len;  /* OK and the message, as a Get's reply */
    if (len < get_len + 8 || get32(got) != len - 4 || get32(got + 4) != 2 || memcmp(got + 8, "OK", 2) != 0
        || memcmp(got + 10, GET_REPLY.data + 10, get_len - 10) != 0)
        unexpected(got, len, &GET_REPLY, s->replied);
    const u8 *p = got + get_len;
    uint32_t id_len = get32(p);
    if (id_len == 0 || id_len > 64 || get_len + 4 + id_len + 4 > len) unexpected(got, len, &GET_REPLY, s->replied);
    uint32_t count_len = get32(p + 4 + id_len);
    if (count_len == 0 || get_len + 8 + id_len + count_len != len) unexpected(got, len, &GET_REPLY, s->replied);
    u8 *ack = s->acks + (size_t)((s->ack_head + s->ack_ready) % s->window) * s->ack_room;
    size_t queue_len = strlen(g_queue), o = 4;
    put32(ack + o, 3); memcpy(ack + o + 4, "Ack", 3); o += 7;
    put32(ack + o, (uint32_t)queue_len); memcpy(ack + o + 4, g_queue, queue_len); o += 4 + queue_len;
    put32(ack + o, id_len); memcpy(ack + o + 4, p + 4, id_len); o += 4 + id_len;
    put32(ack, (uint32_t)(o - 4));
    s->ack_ready++;
}

/* One receive call; checks every whole reply.  The number of replies it brought. */
static long stream_recv(stream_t *s) {
    ssize_t got = recv(s->fd, s->buf + s->filled, s->cap - s->filled, 0);
    uint64_t t = now_ns();
    s->recv_calls++;
    if (got < 0) {
        if (errno == EINTR) return 0;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            fail("no reply for %d s after %ld of %ld replies", STALL_S, s->replied, s->total);
        fail("connection failed after %ld of %ld replies: %s", s->replied, s->total, strerror(errno));
    }
    if (got == 0) fail("the server closed the connection after %ld of %ld replies", s->replied, s->total);
    size_t end = s->filled + (size_t)got, off = 0;
    long before = s->replied;
    while (end - off >= 4) {
        uint32_t length = get32(s->buf + off);
        size_t stop = off + 4 + (size_t)length;
        if (stop > end) {
            if (4 + (size_t)length > s->cap)
                fail("a reply frame announces %u bytes, more than any expected reply, after %ld good replies",
                     length, s->replied);
            break;
        }
        if (s->replied == __atomic_load_n(&s->sent, __ATOMIC_ACQUIRE) || s->recv_phase >= s->nphases)
            fail("a reply came with no request in flight, after %ld replies", s->replied);
        phase_t *ph = &s->phases[s->recv_phase];
        int kind = s->kinds[s->replied % s->window];
        if (kind == KIND_RESERVE) {
            reserved(s, s->buf + off, stop - off);
        } else {
            const buf_t *exp = kind == KIND_ACK ? &OK_REPLY : ph->pat[s->recv_pos % ph->npat].rep;
            if (exp->len != stop - off || memcmp(exp->data, s->buf + off, exp->len) != 0)
                unexpected(s->buf + off, stop - off, exp, s->replied);
        }
        if (s->lat) s->lat[s->replied] = t - s->sent_at[s->replied % s->window];
        s->replied++;
        if (++s->recv_pos == ph->count) {
            s->recv_pos = 0;
            do s->recv_phase++; while (s->recv_phase < s->nphases && s->phases[s->recv_phase].count == 0);
        }
        off = stop;
    }
    if (off && off < end) memmove(s->buf, s->buf + off, end - off);
    s->filled = end - off;
    if (s->replied != before) s->last_recv = t;
    return s->replied - before;
}

static void drive(stream_t *streams, int n) {
    for (int i = 0; i < n; i++) stream_send(&streams[i], streams[i].window);
    if (n == 1) {
        stream_t *s = &streams[0];
        while (s->replied < s->total) {
            stream_recv(s);
            stream_send(s, s->window);
        }
        return;
    }
    int ep = epoll_create1(0);
    if (ep < 0) fail("epoll_create1: %s", strerror(errno));
    int active = 0;
    for (int i = 0; i < n; i++) {
        if (streams[i].total == 0) continue;
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &streams[i] };
        epoll_ctl(ep, EPOLL_CTL_ADD, streams[i].fd, &ev);
        active++;
    }
    struct epoll_event events[256];
    while (active) {
        int ready = epoll_wait(ep, events, 256, STALL_S * 1000);
        if (ready < 0) {
            if (errno == EINTR) continue;
            fail("epoll_wait: %s", strerror(errno));
        }
        if (ready == 0) {
            long done = 0, total = 0;
            for (int i = 0; i < n; i++) { done += streams[i].replied; total += streams[i].total; }
            fail("no reply for %d s after %ld of %ld replies", STALL_S, done, total);
        }
        for (int e = 0; e < ready; e++) {
            stream_t *s = events[e].data.ptr;
            stream_recv(s);
            if (s->replied >= s->total) {
                epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
                active--;
            } else {
                stream_send(s, s->window);
            }
        }
    }
    close(ep);
}

/* --- Latency percentiles ------------------------------------------------------------ */

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double g_mean_us, g_max_us;

/* p50 and p99 in µs of n latencies (sorted in place); -1 when there are none.
   Their mean and maximum are left in g_mean_us and g_max_us. */
static void percentiles(uint64_t *lat, long n, double *p50, double *p99) {
    g_mean_us = g_max_us = -1;
    if (n <= 0) { *p50 = *p99 = -1; return; }
    qsort(lat, (size_t)n, sizeof *lat, cmp_u64);
    double sum = 0;
    for (long i = 0; i < n; i++) sum += lat[i];
    g_mean_us = sum / n / 1000.0;
    g_max_us = lat[n - 1] / 1000.0;
    long i50 = (long)((n * 50 + 99) / 100) - 1, i99 = (long)((n * 99 + 99) / 100) - 1;
    if (i50 < 0) i50 = 0;
    if (i99 < 0) i99 = 0;
    *p50 = lat[i50] / 1000.0;
    *p99 = lat[i99] / 1000.0;
}

static void print_num(const char *key, double v, int last) {
    if (v < 0) printf("\"%s\": null%s", key, last ? "" : ", ");
    else printf("\"%s\": %.6g%s", key, v, last ? "" : ", ");
}

/* --- Info and RSS ---------------------------------------------------------------------- */

static long info_connections(int fd) {
    struct iovec iov = { INFO_REQ.data, INFO_REQ.len };
    write_all(fd, &iov, 1, 0);
    u8 head[4];
    size_t have = 0;
    while (have < 4) {
        ssize_t n = recv(fd, head + have, 4 - have, 0);
        if (n <= 0) fail("Info: no reply");
        have += (size_t)n;
    }
    uint32_t length = get32(head);
    char *body = malloc(length + 1);
    if (!body) fail("out of memory");
    have = 0;
    while (have < length) {
        ssize_t n = recv(fd, body + have, length - have, 0);
        if (n <= 0) fail("Info: reply cut short");
        have += (size_t)n;
    }
    body[length] = 0;
    char *key = memmem(body, length, "\"NumConnections\":", 17);
    if (length < 6 || memcmp(body + 4, "OK", 2) != 0 || !key) fail("Info was not answered OK with NumConnections");
    long value = strtol(key + 17, NULL, 10);
    free(body);
    return value;
}

static long read_rss(long pid) {
    if (pid <= 0) return -1;
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%ld/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long rss = -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmRSS:", 6) == 0) { rss = strtol(line + 6, NULL, 10) * 1024; break; }
    fclose(f);
    return rss;
}

/* --- Modes --------------------------------------------------------------------------------- */

typedef struct {
    const char *addr, *queue;
    int conns, window, idle, expect_conns, producers, consumers, get_timeout, multiplex, consumer_window;
    long warmup_pairs, total, rss_pid;
    phase_t phases[8];
    int nphases;
} opts_t;

static void parse_phase(opts_t *o, const char *spec) {
    if (o->nphases == 8) fail("too many phases");
    phase_t *ph = &o->phases[o->nphases++];
    const char *colon = strchr(spec, ':');
    if (!colon) fail("bad phase %s: want pairs:N, puts:N, gets:N or acks:N", spec);
    ph->count = atol(colon + 1);
    ph->acks = 0;
    if (strncmp(spec, "pairs:", 6) == 0) {
        ph->npat = 2;
        ph->pat[0] = (item_t){ &PUT, &OK_REPLY };
        ph->pat[1] = (item_t){ &GET, &GET_REPLY };
    } else if (strncmp(spec, "puts:", 5) == 0) {
        ph->npat = 1;
        ph->pat[0] = (item_t){ &PUT, &OK_REPLY };
    } else if (strncmp(spec, "gets:", 5) == 0) {
        ph->npat = 1;
        ph->pat[0] = (item_t){ &GET, &GET_REPLY };
    } else if (strncmp(spec, "acks:", 5) == 0) {
        ph->npat = 0;
        ph->acks = 1;
        ph->count *= 2;
    } else {
        fail("bad phase %s: want pairs:N, puts:N, gets:N or acks:N", spec);
    }
}

static int raise_open_files(long wanted) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return 0;
    if ((long)rl.rlim_cur >= wanted) return 1;
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || (long)rl.rlim_max >= wanted ? (rlim_t)wanted : rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    getrlimit(RLIMIT_NOFILE, &rl);
    return (long)rl.rlim_cur >= wanted;
}

static int run_stream(opts_t *o) {
    int *idle_fds = NULL;
    double open_s = -1;
    long seen = -1;
    if (o->idle > 0) {
        if (!raise_open_files(o->idle + o->conns + 64))
            fail("cannot hold %d idle connections: the open-file limit is too low (ulimit -Hn)", o->idle);
        idle_fds = malloc((size_t)o->idle * sizeof *idle_fds);
        uint64_t t0 = now_ns();
        for (int i = 0; i < o->idle; i++) idle_fds[i] = connect_to(0, STALL_S);
        open_s = (now_ns() - t0) / 1e9;
    }
    int *fds = malloc((size_t)o->conns * sizeof *fds);
    for (int i = 0; i < o->conns; i++) fds[i] = connect_to(1, STALL_S);
    if (o->idle > 0 && o->expect_conns) {
        uint64_t deadline = now_ns() + 30ull * 1000000000u;
        for (;;) {
            seen = info_connections(fds[0]);
            if (seen >= o->idle + o->conns) break;
            if (now_ns() > deadline)
                fail("the server reports %ld connections; expected at least %d (%d idle and %d working)",
                     seen, o->idle + o->conns, o->idle, o->conns);
            usleep(50000);
        }
    }
    stream_t *streams = calloc((size_t)o->conns, sizeof *streams);
    if (o->warmup_pairs > 0) {
        phase_t warm;
        parse_phase(o, "pairs:0");
        warm = o->phases[--o->nphases];
        long each = o->warmup_pairs / o->conns;
        warm.count = 2 * (each < 10 ? 10 : each);
        for (int i = 0; i < o->conns; i++) stream_init(&streams[i], fds[i], &warm, 1, o->window, 0);
        drive(streams, o->conns);
        for (int i = 0; i < o->conns; i++) stream_free(&streams[i]);
    }
    for (int i = 0; i < o->conns; i++) stream_init(&streams[i], fds[i], o->phases, o->nphases, o->window, 1);
    double cpu0 = cpu_seconds();
    drive(streams, o->conns);
    double cpu = cpu_seconds() - cpu0;
    long rss = o->idle > 0 ? read_rss(o->rss_pid) : -1;
    if (o->idle > 0) {
        struct pollfd *pf = calloc((size_t)o->idle, sizeof *pf);
        for (int i = 0; i < o->idle; i++) { pf[i].fd = idle_fds[i]; pf[i].events = POLLIN; }
        int dropped = poll(pf, (nfds_t)o->idle, 0);
        if (dropped)
            fail("%d of the %d idle connections were closed (or written to) by the server", dropped, o->idle);
        for (int i = 0; i < o->idle; i++) close(idle_fds[i]);
        free(pf);
    }
    long requests = 0, nlat = 0;
    uint64_t start = UINT64_MAX, end = 0;
    for (int i = 0; i < o->conns; i++) {
        requests += streams[i].replied;
        if (streams[i].first_send && streams[i].first_send < start) start = streams[i].first_send;
        if (streams[i].last_recv > end) end = streams[i].last_recv;
    }
    uint64_t *lat = malloc((size_t)(requests + 1) * sizeof *lat);
    for (int i = 0; i < o->conns; i++) {
        memcpy(lat + nlat, streams[i].lat, (size_t)streams[i].replied * sizeof *lat);
        nlat += streams[i].replied;
    }
    double elapsed = end > start ? (end - start) / 1e9 : 0, p50, p99;
    percentiles(lat, nlat, &p50, &p99);
    printf("{\"requests\": %ld, ", requests);
    print_num("elapsed_s", elapsed, 0);
    print_num("rate", elapsed > 0 ? requests / elapsed : -1, 0);
    print_num("p50_us", p50, 0);
    print_num("p99_us", p99, 0);
    print_num("mean_us", g_mean_us, 0);
    print_num("max_us", g_max_us, 0);
    if (o->idle > 0) {
        print_num("open_s", open_s, 0);
        print_num("connections_seen", seen, 0);
        print_num("rss_with_idle", rss, 0);
    }
    print_num("cpu_s", cpu, 0);
    print_num("cpu_frac", elapsed > 0 ? cpu / elapsed : -1, 1);
    printf("}\n");
    return 0;
}

/* --- One-at-a-time consumers ------------------------------------------------------------------ */

static pthread_barrier_t g_barrier;
static atomic_long g_delivered, g_extra, g_timeouts;
static atomic_int g_finished;
static _Atomic uint64_t g_last_delivery;  /* by any consumer: the stall clock */
static long g_total;
static int *g_consumer_fds, g_nconsumers;
static int g_get_timeout_ms;

typedef struct {
    int fd;
    uint64_t *lat;
    long nlat;
    uint64_t start, last;
} consumer_t;

static void finish_consumers(void) {
    if (atomic_exchange(&g_finished, 1)) return;
    for (int i = 0; i < g_nconsumers; i++) shutdown(g_consumer_fds[i], SHUT_RDWR);
}

/* One whole reply to a consumer's Get, sent at `sent`, received at `t`. */
static void consumer_reply(consumer_t *c, const u8 *buf, size_t have, uint64_t sent, uint64_t t) {
    if (have == GET_REPLY.len && memcmp(buf, GET_REPLY.data, have) == 0) {
        long d = atomic_fetch_add(&g_delivered, 1);
        if (d < g_total) {
            c->lat[c->nlat++] = t - sent;
            c->last = t;
            atomic_store(&g_last_delivery, t);
            if (d == g_total - 1) finish_consumers();
        } else {
            atomic_fetch_add(&g_extra, 1);  /* the floor answers every Get */
        }
    } else if (have == TIMEOUT_REPLY.len && memcmp(buf, TIMEOUT_REPLY.data, have) == 0) {
        atomic_fetch_add(&g_timeouts, 1);
    } else {  /* also two frames at once: only one Get was in flight */
        unexpected(buf, have, &GET_REPLY, atomic_load(&g_delivered));
    }
}

/* Fails once no message has been delivered for STALL_S seconds (t: now). */
static void fail_if_stalled(uint64_t t) {
    uint64_t last = atomic_load(&g_last_delivery);
    if (t > last && t - last > (uint64_t)STALL_S * 1000000000u)
        fail("only %ld of %ld messages delivered, none in the last %d s",
             atomic_load(&g_delivered), g_total, STALL_S);
}

/* --multiplex: every consumer on one epoll thread (the old "fan"): each
   still has one Get in flight, but replies that arrive together are read in
   one wake-up and their next Gets go out together. */

static void *consumers_epoll_main(void *arg) {
    consumer_t *cons = arg;
    int n = g_nconsumers;
    size_t cap = GET_REPLY.len + 4096;
    u8 **bufs = calloc((size_t)n, sizeof *bufs);
    size_t *have = calloc((size_t)n, sizeof *have);
    uint64_t *sent = calloc((size_t)n, sizeof *sent);
    int ep = epoll_create1(0);
    if (!bufs || !have || !sent || ep < 0) fail("consumers: out of memory or epoll");
    for (int i = 0; i < n; i++) {
        bufs[i] = malloc(cap);
        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = (uint32_t)i };
        epoll_ctl(ep, EPOLL_CTL_ADD, cons[i].fd, &ev);
    }
    pthread_barrier_wait(&g_barrier);
    uint64_t start = now_ns();
    uint64_t expected = 0;
    atomic_compare_exchange_strong(&g_last_delivery, &expected, start);
    for (int i = 0; i < n; i++) {
        cons[i].start = start;
        sent[i] = now_ns();
        if (send(cons[i].fd, GET.data, GET.len, MSG_NOSIGNAL) != (ssize_t)GET.len)
            fail("consumer: sending failed: %s", strerror(errno));
    }
    struct epoll_event events[64];
    while (atomic_load(&g_delivered) < g_total) {
        int ready = epoll_wait(ep, events, 64, 1000);
        uint64_t t = now_ns();
        if (ready < 0 && errno != EINTR) fail("epoll_wait: %s", strerror(errno));
        if (ready <= 0) {
            fail_if_stalled(t);
            continue;
        }
        for (int e = 0; e < ready && atomic_load(&g_delivered) < g_total; e++) {
            int i = (int)events[e].data.u32;
            ssize_t got = recv(cons[i].fd, bufs[i] + have[i], cap - have[i], 0);
            t = now_ns();
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (got <= 0) {
                if (atomic_load(&g_finished)) break;
                fail("the server closed a consumer connection after %ld messages", atomic_load(&g_delivered));
            }
            have[i] += (size_t)got;
            if (have[i] < 4 || have[i] < 4 + (size_t)get32(bufs[i])) {
                if (have[i] == cap) unexpected(bufs[i], have[i], &GET_REPLY, atomic_load(&g_delivered));
                continue;
            }
            consumer_reply(&cons[i], bufs[i], have[i], sent[i], t);
            have[i] = 0;
            if (atomic_load(&g_delivered) < g_total) {
                sent[i] = now_ns();
                if (send(cons[i].fd, GET.data, GET.len, MSG_NOSIGNAL) != (ssize_t)GET.len) {
                    if (atomic_load(&g_finished)) break;
                    fail("consumer: sending failed: %s", strerror(errno));
                }
            }
        }
    }
    finish_consumers();
    for (int i = 0; i < n; i++) free(bufs[i]);
    free(bufs);
    free(have);
    free(sent);
    close(ep);
    return NULL;
}

/* --consumer-window G: every consumer on one epoll thread, each pipelining G
   Gets.  Replies on a connection come in the order of its Gets; each is a
   message or Timeout (counted; its Get is sent again), anything else an
   error.  After each read, one Get per reply it brought goes out in one
   send, until every message is delivered (Gets still in flight then are
   left: the connections are shut down). */
typedef struct {
    int fd;
    u8 *buf;
    size_t filled;
    uint64_t *sent_at;  /* ring of G send times, in the order of the Gets */
    long sent, replied;
} window_consumer_t;

static int g_consumer_window;

static void window_consumer_send(window_consumer_t *w, long count, const u8 *gets) {
    if (count <= 0) return;
    uint64_t t = now_ns();
    for (long k = 0; k < count; k++) w->sent_at[(w->sent + k) % g_consumer_window] = t;
    size_t left = (size_t)count * GET.len, off = 0;
    while (left) {
        ssize_t n = send(w->fd, gets + off, left, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (atomic_load(&g_finished)) return;
            fail("consumer: sending failed after %ld messages: %s", atomic_load(&g_delivered), strerror(errno));
        }
        off += (size_t)n;
        left -= (size_t)n;
    }
    w->sent += count;
}

static void *consumers_window_main(void *arg) {
    consumer_t *cons = arg;
    int n = g_nconsumers, window = g_consumer_window;
    size_t cap = (size_t)window * GET_REPLY.len + 65536;
    if (cap < (1u << 18)) cap = 1u << 18;
    u8 *gets = malloc((size_t)window * GET.len);
    window_consumer_t *ws = calloc((size_t)n, sizeof *ws);
    int ep = epoll_create1(0);
    if (!gets || !ws || ep < 0) fail("consumers: out of memory or epoll");
    for (int k = 0; k < window; k++) memcpy(gets + (size_t)k * GET.len, GET.data, GET.len);
    for (int i = 0; i < n; i++) {
        ws[i].fd = cons[i].fd;
        ws[i].buf = malloc(cap);
        ws[i].sent_at = calloc((size_t)window, sizeof *ws[i].sent_at);
        if (!ws[i].buf || !ws[i].sent_at) fail("consumers: out of memory");
        struct epoll_event ev = { .events = EPOLLIN, .data.u32 = (uint32_t)i };
        epoll_ctl(ep, EPOLL_CTL_ADD, ws[i].fd, &ev);
    }
    pthread_barrier_wait(&g_barrier);
    uint64_t start = now_ns();
    uint64_t expected = 0;
    atomic_compare_exchange_strong(&g_last_delivery, &expected, start);
    for (int i = 0; i < n; i++) {
        cons[i].start = start;
        window_consumer_send(&ws[i], window, gets);
    }
    struct epoll_event events[256];
    while (atomic_load(&g_delivered) < g_total) {
        int ready = epoll_wait(ep, events, 256, 1000);
        uint64_t t = now_ns();
        if (ready < 0 && errno != EINTR) fail("epoll_wait: %s", strerror(errno));
        if (ready <= 0) {
            fail_if_stalled(t);
            continue;
        }
        for (int e = 0; e < ready && atomic_load(&g_delivered) < g_total; e++) {
            int i = (int)events[e].data.u32;
            window_consumer_t *w = &ws[i];
            ssize_t got = recv(w->fd, w->buf + w->filled, cap - w->filled, 0);
            t = now_ns();
            if (got < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (got <= 0) {
                if (atomic_load(&g_finished)) break;
                fail("the server closed a consumer connection after %ld messages", atomic_load(&g_delivered));
            }
            size_t end = w->filled + (size_t)got, off = 0;
            long replies = 0;
            while (end - off >= 4) {
                size_t stop = off + 4 + (size_t)get32(w->buf + off);
                if (stop > end) {
                    if (stop - off > cap) unexpected(w->buf + off, end - off, &GET_REPLY, atomic_load(&g_delivered));
                    break;
                }
                if (w->replied == w->sent)
                    fail("a consumer got a reply with no Get in flight, after %ld messages",
                         atomic_load(&g_delivered));
                uint64_t sent = w->sent_at[w->replied % window];
                w->replied++;
                replies++;
                /* one whole frame: a message, Timeout, or an error */
                consumer_reply(&cons[i], w->buf + off, stop - off, sent, t);
                off = stop;
            }
            if (off && off < end) memmove(w->buf, w->buf + off, end - off);
            w->filled = end - off;
            if (atomic_load(&g_delivered) < g_total) window_consumer_send(w, replies, gets);
        }
    }
    finish_consumers();
    for (int i = 0; i < n; i++) {
        free(ws[i].buf);
        free(ws[i].sent_at);
    }
    free(ws);
    free(gets);
    close(ep);
    return NULL;
}

static void *consumer_main(void *arg) {
    consumer_t *c = arg;
    size_t cap = GET_REPLY.len + 4096;
    u8 *buf = malloc(cap);
    pthread_barrier_wait(&g_barrier);
    c->start = now_ns();
    uint64_t expected = 0;
    atomic_compare_exchange_strong(&g_last_delivery, &expected, c->start);
    while (atomic_load(&g_delivered) < g_total) {
        uint64_t sent = now_ns();
        if (send(c->fd, GET.data, GET.len, MSG_NOSIGNAL) != (ssize_t)GET.len) {
            if (atomic_load(&g_finished)) break;
            fail("consumer: sending failed after %ld messages: %s", atomic_load(&g_delivered), strerror(errno));
        }
        size_t have = 0;
        uint64_t t;
        for (;;) {
            ssize_t n = recv(c->fd, buf + have, cap - have, 0);
            t = now_ns();
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
                if (atomic_load(&g_finished)) goto done;
                fail_if_stalled(t);
                continue;
            }
            if (n <= 0) {
                if (atomic_load(&g_finished)) goto done;
                fail("the server closed a consumer connection after %ld messages", atomic_load(&g_delivered));
            }
            have += (size_t)n;
            if (have >= 4 && have >= 4 + (size_t)get32(buf)) break;
            if (have == cap) unexpected(buf, have, &GET_REPLY, atomic_load(&g_delivered));
        }
        consumer_reply(c, buf, have, sent, t);
    }
done:
    free(buf);
    return NULL;
}

typedef struct {
    stream_t *streams;
    int n;
    uint64_t start;
} producers_t;

static int run_consumers(opts_t *o) {
    g_total = o->total;
    g_nconsumers = o->consumers;
    g_get_timeout_ms = o->get_timeout;
    g_consumer_window = o->consumer_window;
    phase_t *shares = calloc((size_t)o->producers, sizeof *shares);
    stream_t *streams = calloc((size_t)o->producers, sizeof *streams);
    for (int i = 0; i < o->producers; i++) {
        shares[i].npat = 1;
        shares[i].pat[0] = (item_t){ &PUT, &OK_REPLY };
        shares[i].count = o->total / o->producers + (i < o->total % o->producers);
        stream_init(&streams[i], connect_to(1, STALL_S), &shares[i], 1, o->window, 1);
    }
    g_consumer_fds = malloc((size_t)o->consumers * sizeof *g_consumer_fds);
    consumer_t *cons = calloc((size_t)o->consumers, sizeof *cons);
    for (int i = 0; i < o->consumers; i++) {
        cons[i].fd = g_consumer_fds[i] = connect_to(1, 1);
        cons[i].lat = malloc((size_t)(o->total + 1) * sizeof *cons[i].lat);
    }
    int nthreads = o->multiplex || o->consumer_window ? 1 : o->consumers;
    pthread_barrier_init(&g_barrier, NULL, (unsigned)nthreads + 1);
    pthread_t *threads = malloc((size_t)nthreads * sizeof *threads);
    if (o->consumer_window)
        pthread_create(&threads[0], NULL, consumers_window_main, cons);
    else if (o->multiplex)
        pthread_create(&threads[0], NULL, consumers_epoll_main, cons);
    else
        for (int i = 0; i < o->consumers; i++) pthread_create(&threads[i], NULL, consumer_main, &cons[i]);
    producers_t prod = { streams, o->producers, 0 };
    double cpu0 = cpu_seconds();
    /* the producers run on this thread */
    pthread_barrier_wait(&g_barrier);
    prod.start = now_ns();
    drive(streams, o->producers);
    for (int i = 0; i < nthreads; i++) pthread_join(threads[i], NULL);
    double cpu = cpu_seconds() - cpu0;
    long delivered = atomic_load(&g_delivered);
    if (delivered > g_total) delivered = g_total;
    long acked = 0, nput = 0, nget = 0;
    uint64_t start = prod.start, end = 0;
    for (int i = 0; i < o->producers; i++) {
        acked += streams[i].replied;
        if (streams[i].last_recv > end) end = streams[i].last_recv;
    }
    uint64_t put_end = end;
    uint64_t *puts = malloc((size_t)(acked + 1) * sizeof *puts);
    for (int i = 0; i < o->producers; i++) {
        memcpy(puts + nput, streams[i].lat, (size_t)streams[i].replied * sizeof *puts);
        nput += streams[i].replied;
    }
    uint64_t *gets = malloc((size_t)(delivered + 1) * sizeof *gets);
    for (int i = 0; i < o->consumers; i++) {
        if (cons[i].start && cons[i].start < start) start = cons[i].start;
        if (cons[i].last > end) end = cons[i].last;
        memcpy(gets + nget, cons[i].lat, (size_t)cons[i].nlat * sizeof *gets);
        nget += cons[i].nlat;
    }
    double elapsed = (end - start) / 1e9, put_elapsed = (put_end - prod.start) / 1e9;
    double p50, p99, g50, g99;
    percentiles(puts, nput, &p50, &p99);
    percentiles(gets, nget, &g50, &g99);
    printf("{\"requests\": %ld, \"puts_acknowledged\": %ld, \"delivered\": %ld, ", delivered, acked, delivered);
    printf("\"extra_replies\": %ld, \"get_timeouts\": %ld, ", atomic_load(&g_extra), atomic_load(&g_timeouts));
    long rc = 0, sc = 0;
    for (int i = 0; i < o->producers; i++) { rc += streams[i].recv_calls; sc += streams[i].send_calls; }
    printf("\"producer_recv_calls\": %ld, \"producer_send_calls\": %ld, ", rc, sc);
    print_num("elapsed_s", elapsed, 0);
    print_num("rate", elapsed > 0 ? delivered / elapsed : -1, 0);
    print_num("put_rate", put_elapsed > 0 ? acked / put_elapsed : -1, 0);
    print_num("p50_us", p50, 0);
    print_num("p99_us", p99, 0);
    print_num("get_p50_us", g50, 0);
    print_num("get_p99_us", g99, 0);
    print_num("cpu_s", cpu, 0);
    print_num("cpu_frac", elapsed > 0 ? cpu / elapsed : -1, 1);
    printf("}\n");
    return 0;
}

/* --- Main ------------------------------------------------------------------------------------- */

static void usage(void) {
    fail("usage: loadgen stream|consumers --addr HOST:PORT --queue NAME [options] (see the source's header)");
}

int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2) usage();
    opts_t o = { .conns = 1, .window = 1, .producers = 4, .consumers = 4,
                 .get_timeout = 1000, .rss_pid = -1 };
    const char *mode = argv[1];
    const char *phase_specs[8];
    int nspecs = 0, window_given = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--expect-conns") == 0) { o.expect_conns = 1; continue; }
        if (strcmp(a, "--multiplex") == 0) { o.multiplex = 1; continue; }
        if (!v) usage();
        i++;
        if (strcmp(a, "--addr") == 0) o.addr = v;
        else if (strcmp(a, "--queue") == 0) o.queue = v;
        else if (strcmp(a, "--conns") == 0) o.conns = atoi(v);
        else if (strcmp(a, "--window") == 0) { o.window = atoi(v); window_given = 1; }
        else if (strcmp(a, "--phase") == 0) { if (nspecs == 8) usage(); phase_specs[nspecs++] = v; }
        else if (strcmp(a, "--warmup-pairs") == 0) o.warmup_pairs = atol(v);
        else if (strcmp(a, "--idle") == 0) o.idle = atoi(v);
        else if (strcmp(a, "--rss-pid") == 0) o.rss_pid = atol(v);
        else if (strcmp(a, "--total") == 0) o.total = atol(v);
        else if (strcmp(a, "--producers") == 0) o.producers = atoi(v);
        else if (strcmp(a, "--consumers") == 0) o.consumers = atoi(v);
        else if (strcmp(a, "--get-timeout") == 0) o.get_timeout = atoi(v);
        else if (strcmp(a, "--consumer-window") == 0) o.consumer_window = atoi(v);
        else usage();
    }
    if (!o.addr || !o.queue || o.conns < 1 || o.window < 1) usage();
    parse_addr(o.addr);
    int is_stream = strcmp(mode, "stream") == 0;
    if (!is_stream && !window_given) o.window = 128;
    build_requests(o.queue, o.get_timeout);
    for (int i = 0; i < nspecs; i++) parse_phase(&o, phase_specs[i]);
    if (is_stream) {
        if (o.nphases == 0) usage();
        return run_stream(&o);
    }
    if (strcmp(mode, "consumers") == 0) {
        if (o.total < 1 || o.producers < 1 || o.consumers < 1 || o.consumer_window < 0
            || (o.multiplex && o.consumer_window)) usage();
        return run_consumers(&o);
    }
    usage();
    return 2;
}
