/*
 * The benchmark's floor server: answers every mqmq frame at once, holds no
 * queues, never waits.  Built and started by bench.py (see benchmarks/README.md).
 *
 *     floor [HOST:]PORT        (port 0: any free port; the port is logged)
 *
 * Logs "YYYY/MM/DD HH:MM:SS INFO: starting server: HOST:PORT" on stderr once
 * it listens, as `mqmq start` does.  Replies, the same as the Python floor it
 * replaced:
 *   Put       OK
 *   Get       OK + the benchmark message of the size named by the queue's last
 *             dot-separated field (the very bytes mqmq would send)
 *   Reserve   OK + the same message + id "1" + deliveries "1"
 *   Ack       OK
 *   Info      OK + {"NumConnections":N,"NumQueues":0,"NumMessages":0,"Queues":{}}
 *   Quit      the replies due are sent, then the connection is closed
 *   other     Error REQUEST_UNKNOWN_COMMAND, then the connection is closed
 * One thread, epoll, level-triggered; replies go out with one writev per read
 * (they point at prebuilt frames: nothing is copied); while replies are
 * pending the connection is not read.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
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

#define MAX_FRAME (4u + 3u + 4u + 1024u + 4u + 32u * 1024u * 1024u)
#define MAX_IOV 512
#define READ_CHUNK (256 * 1024)

static const char PATTERN[] = "mqmq benchmark message: 0123456789 abcdefghijklmnopqrstuvwxyz\n";

typedef struct { unsigned char *data; size_t len; } buf_t;

typedef struct {
    int fd;
    unsigned char *in;
    size_t in_len, in_cap;
    struct iovec out[MAX_IOV];  /* pending replies (prebuilt frames) */
    int out_first, out_count;
    int closing;
} conn_t;

static long connections;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* A frame of n values. */
static buf_t frame(int n, const void **values, const size_t *lens) {
    size_t total = 4;
    for (int i = 0; i < n; i++) total += 4 + lens[i];
    buf_t b = { malloc(total), total };
    if (!b.data) die("malloc");
    put32(b.data, (uint32_t)(total - 4));
    size_t o = 4;
    for (int i = 0; i < n; i++) {
        put32(b.data + o, (uint32_t)lens[i]);
        memcpy(b.data + o + 4, values[i], lens[i]);
        o += 4 + lens[i];
    }
    return b;
}

static buf_t frame1(const char *a) {
    const void *v[1] = { a };
    size_t l[1] = { strlen(a) };
    return frame(1, v, l);
}

static buf_t frame2(const char *a, const void *b, size_t blen) {
    const void *v[2] = { a, b };
    size_t l[2] = { strlen(a), blen };
    return frame(2, v, l);
}

static buf_t OK, UNKNOWN, INFO_REPLY;

/* Get and Reserve replies, by queue name (a handful of names per run). */
typedef struct { unsigned char *name; size_t len; buf_t reply, reserved; } cached_t;
static cached_t *cache;
static size_t cache_len, cache_cap;

static size_t size_of_queue(const unsigned char *name, size_t len) {
    size_t start = len;
    while (start > 0 && name[start - 1] != '.') start--;
    if (start == len) return 0;
    size_t size = 0;
    for (size_t i = start; i < len; i++) {
        if (name[i] < '0' || name[i] > '9') return 0;
        size = size * 10 + (name[i] - '0');
        if (size > 64u * 1024 * 1024) return 0;
    }
    return size;
}

static cached_t *replies_for(const unsigned char *name, size_t len) {
    for (size_t i = 0; i < cache_len; i++)
        if (cache[i].len == len && memcmp(cache[i].name, name, len) == 0) return &cache[i];
    if (cache_len == cache_cap) {
        cache_cap = cache_cap ? 2 * cache_cap : 16;
        cache = realloc(cache, cache_cap * sizeof *cache);
        if (!cache) die("realloc");
    }
    size_t size = size_of_queue(name, len);
    unsigned char *body = malloc(size + 1);
    if (!body) die("malloc");
    size_t plen = sizeof PATTERN - 1;
    for (size_t i = 0; i < size; i++) body[i] = PATTERN[i % plen];
    cached_t *c = &cache[cache_len++];
    c->name = malloc(len + 1);
    if (!c->name) die("malloc");
    memcpy(c->name, name, len);
    c->len = len;
    c->reply = frame2("OK", body, size);
    const void *v[4] = { "OK", body, "1", "1" };
    size_t l[4] = { 2, size, 1, 1 };
    c->reserved = frame(4, v, l);
    free(body);
    return c;
}

static void refresh_info(void) {
    char json[160];
    int n = snprintf(json, sizeof json,
                     "{\"NumConnections\":%ld,\"NumQueues\":0,\"NumMessages\":0,\"Queues\":{}}", connections);
    free(INFO_REPLY.data);
    INFO_REPLY = frame2("OK", json, (size_t)n);
}

static int epfd;

static void close_conn(conn_t *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c);
    connections--;
}

/* Write what is pending; 1 when all is out, 0 when some is left, -1 on error. */
static int flush_out(conn_t *c) {
    while (c->out_count) {
        ssize_t n = writev(c->fd, c->out + c->out_first, c->out_count);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        size_t left = (size_t)n;
        while (left && c->out_count) {
            struct iovec *v = &c->out[c->out_first];
            if (left >= v->iov_len) {
                left -= v->iov_len;
                c->out_first++;
                c->out_count--;
            } else {
                v->iov_base = (char *)v->iov_base + left;
                v->iov_len -= left;
                left = 0;
            }
        }
    }
    c->out_first = 0;
    return 1;
}

static void want(conn_t *c, uint32_t events) {
    struct epoll_event ev = { .events = events, .data.ptr = c };
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void queue_reply(conn_t *c, buf_t *b) {
    c->out[c->out_first + c->out_count].iov_base = b->data;
    c->out[c->out_first + c->out_count].iov_len = b->len;
    c->out_count++;
}

/* Answer the whole frames in c->in; 1 to go on, 0 once the connection must close. */
static int answer(conn_t *c) {
    size_t off = 0, end = c->in_len;
    int go_on = 1;
    while (end - off >= 4 && c->out_first + c->out_count < MAX_IOV) {
        uint32_t length = get32(c->in + off);
        if (length > MAX_FRAME) { go_on = 0; break; }
        if (end - off - 4 < length) {
            if (length + 4 > c->in_cap) {
                size_t cap = c->in_cap;
                while (cap < length + 4) cap *= 2;
                unsigned char *grown = malloc(cap);
                if (!grown) die("malloc");
                memcpy(grown, c->in + off, end - off);
                free(c->in);
                c->in = grown;
                c->in_cap = cap;
                end -= off;
                off = 0;
            }
            break;
        }
        const unsigned char *f = c->in + off + 4;
        uint32_t first = length >= 4 ? get32(f) : 0;
        if (length >= 4 + first && first == 3 && memcmp(f + 4, "Put", 3) == 0) {
            queue_reply(c, &OK);
        } else if (length >= 11 && first == 3 && memcmp(f + 4, "Get", 3) == 0) {
            uint32_t name_len = get32(f + 7);
            if (name_len > length - 11) name_len = length - 11;
            queue_reply(c, &replies_for(f + 11, name_len)->reply);
        } else if (length >= 15 && first == 7 && memcmp(f + 4, "Reserve", 7) == 0) {
            uint32_t name_len = get32(f + 11);
            if (name_len > length - 15) name_len = length - 15;
            queue_reply(c, &replies_for(f + 15, name_len)->reserved);
        } else if (length >= 7 && first == 3 && memcmp(f + 4, "Ack", 3) == 0) {
            queue_reply(c, &OK);
        } else if (length >= 8 && first == 4 && memcmp(f + 4, "Info", 4) == 0) {
            refresh_info();
            queue_reply(c, &INFO_REPLY);
        } else {
            if (!(length >= 8 && first == 4 && memcmp(f + 4, "Quit", 4) == 0)) queue_reply(c, &UNKNOWN);
            go_on = 0;
            off += 4 + length;
            break;
        }
        off += 4 + length;
    }
    if (off) {
        memmove(c->in, c->in + off, end - off);
        end -= off;
    }
    c->in_len = end;
    return go_on;
}

static void on_readable(conn_t *c) {
    if (c->in_cap - c->in_len < READ_CHUNK / 4) {
        size_t cap = c->in_cap * 2;
        unsigned char *grown = realloc(c->in, cap);
        if (!grown) die("realloc");
        c->in = grown;
        c->in_cap = cap;
    }
    ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (n <= 0) { close_conn(c); return; }
    c->in_len += (size_t)n;
    int go_on = answer(c);
    int flushed = flush_out(c);
    if (flushed < 0) { close_conn(c); return; }
    if (!go_on) {
        if (!flushed) {  /* the last replies: a second to go out, blocking */
            struct timeval tv = { 1, 0 };
            setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
            fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) & ~O_NONBLOCK);
            flush_out(c);
        }
        close_conn(c);
        return;
    }
    if (!flushed) {
        want(c, EPOLLOUT);
    } else if (c->in_len >= 4 && c->out_count == 0) {
        /* more whole frames than MAX_IOV replies: answer the rest now */
        while (c->in_len >= 4 && go_on) {
            size_t before = c->in_len;
            go_on = answer(c);
            flushed = flush_out(c);
            if (flushed < 0) { close_conn(c); return; }
            if (!flushed) { want(c, EPOLLOUT); return; }
            if (c->in_len == before) break;  /* a partial frame */
        }
        if (!go_on) close_conn(c);
    }
}

static void on_writable(conn_t *c) {
    int flushed = flush_out(c);
    if (flushed < 0) { close_conn(c); return; }
    if (!flushed) return;
    want(c, EPOLLIN);
    /* frames read while the replies were pending */
    while (c->in_len >= 4) {
        size_t before = c->in_len;
        int go_on = answer(c);
        flushed = flush_out(c);
        if (flushed < 0 || !go_on) { close_conn(c); return; }
        if (!flushed) { want(c, EPOLLOUT); return; }
        if (c->in_len == before) break;
    }
}

int main(int argc, char **argv) {
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max > 65536 ? 65536 : rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    const char *addr = argc > 1 ? argv[1] : "127.0.0.1:0";
    char host[64] = "127.0.0.1";
    const char *colon = strrchr(addr, ':');
    int port = atoi(colon ? colon + 1 : addr);
    if (colon && colon != addr) {
        size_t n = (size_t)(colon - addr);
        if (n >= sizeof host) n = sizeof host - 1;
        memcpy(host, addr, n);
        host[n] = 0;
    }
    OK = frame1("OK");
    {
        const void *v[2] = { "Error", "REQUEST_UNKNOWN_COMMAND" };
        size_t l[2] = { 5, 23 };
        UNKNOWN = frame(2, v, l);
    }
    refresh_info();

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "floor: bad address %s (IPv4 HOST:PORT)\n", addr);
        return 2;
    }
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    socklen_t salen = sizeof sa;
    getsockname(lfd, (struct sockaddr *)&sa, &salen);
    epfd = epoll_create1(0);
    if (epfd < 0) die("epoll_create1");
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev);

    time_t now = time(NULL);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y/%m/%d %H:%M:%S", localtime(&now));
    fprintf(stderr, "%s INFO: starting server: %s:%d\n", stamp, host, ntohs(sa.sin_port));
    fflush(stderr);

    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(epfd, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;  /* EAGAIN, or out of descriptors: next time */
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *nc = calloc(1, sizeof *nc);
                    if (!nc) die("calloc");
                    nc->fd = fd;
                    nc->in_cap = READ_CHUNK;
                    nc->in = malloc(nc->in_cap);
                    if (!nc->in) die("malloc");
                    struct epoll_event cev = { .events = EPOLLIN, .data.ptr = nc };
                    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &cev);
                    connections++;
                }
            } else if (events[i].events & EPOLLOUT) {
                on_writable(c);
            } else {
                on_readable(c);
            }
        }
    }
}
