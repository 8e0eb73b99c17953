/*
 * conn.c: frames over a connected socket or a pair of pipes (docs/protocol.md section 3).
 *
 * Small reads go through one receive buffer (one recv usually brings a whole small frame); bulk parts go
 * straight to their destination: recv into tensor memory, splice(2) into files, sendfile(2) out of files.
 * A reply is built in one buffer (header room + control part) and sent with one writev, its bulk part
 * in the same call.
 */
#include "core.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define CONN_BUFFER (64 << 10)
#define CONN_SCRATCH (1 << 20)
#define CONN_SPLICE_PIPE (1 << 20)
#define CONN_BATCH ((uint64_t)1 << 20)
#define CONN_PIECE ((size_t)2 << 20) /* a file sent to a peer on this machine goes in pieces of this size, */
#define CONN_SENDFILE_SHARE 3        /* one in this many by sendfile (conn_sendfile) */

static int loopback_peer(int fd);

void conn_init(mr_conn* c, int rfd, int wfd, int is_socket) {
    memset(c, 0, sizeof(*c));
    c->rfd = rfd;
    c->wfd = wfd;
    c->is_socket = is_socket;
    c->splice_pipe[0] = c->splice_pipe[1] = -1;
    /* A peer on this machine: bulk received in batches (below), and TCP sends without congestion control's
     * pacing (reno, always there and allowed): there is no network to pace for, and BBR's pacing (some
     * distributions' default) reorders loopback segments into spurious retransmits. */
    c->loopback = is_socket && loopback_peer(rfd);
    if (c->loopback) setsockopt(rfd, IPPROTO_TCP, TCP_CONGESTION, "reno", 4); /* else the default stays */
}

void conn_free(mr_conn* c) {
    free(c->buf);
    free(c->scratch);
    mp_buf_free(&c->out);
    if (c->splice_pipe[0] >= 0) {
        close(c->splice_pipe[0]);
        close(c->splice_pipe[1]);
    }
    c->buf = c->scratch = NULL;
    c->splice_pipe[0] = c->splice_pipe[1] = -1;
}

/* Wait until rfd is readable or the deadline passes: 0, or -1 (c->err = ETIMEDOUT / EINTR on termination). */
static int wait_readable(mr_conn* c) {
    for (;;) {
        int64_t left = c->deadline_ns - mr_now_ns();
        if (left <= 0) {
            c->err = ETIMEDOUT;
            return -1;
        }
        struct pollfd p = {c->rfd, POLLIN, 0};
        int rc = poll(&p, 1, (int)((left + 999999) / 1000000));
        if (rc > 0) return 0;
        if (rc < 0 && errno != EINTR) {
            c->err = errno;
            return -1;
        }
        if (mr_terminate) {
            c->err = EINTR;
            return -1;
        }
    }
}

/* One read of at most n bytes into dst: > 0, or -1 (c->err; 0 = the peer closed). */
static ssize_t read_some(mr_conn* c, void* dst, size_t n) {
    for (;;) {
        if (c->deadline_ns > 0 && wait_readable(c)) return -1;
        ssize_t got = c->is_socket ? recv(c->rfd, dst, n, 0) : read(c->rfd, dst, n);
        if (got > 0) return got;
        if (got == 0) {
            c->err = 0;
            return -1;
        }
        if (errno == EINTR && !mr_terminate) continue;
        c->err = errno;
        return -1;
    }
}

int conn_fill(mr_conn* c, size_t n) {
    if (!c->buf) {
        c->buf = (uint8_t*)malloc(CONN_BUFFER);
        if (!c->buf) {
            c->err = ENOMEM;
            return -1;
        }
        c->cap = CONN_BUFFER;
    }
    if (c->start == c->end) c->start = c->end = 0;
    if (c->end - c->start >= n) return 0;
    if (c->start + n > c->cap) { /* move what is left to the front */
        memmove(c->buf, c->buf + c->start, c->end - c->start);
        c->end -= c->start;
        c->start = 0;
    }
    while (c->end - c->start < n) {
        ssize_t got = read_some(c, c->buf + c->end, c->cap - c->end);
        if (got < 0) return -1;
        c->end += (size_t)got;
    }
    return 0;
}

/* Whether the TCP socket's peer is this machine (a loopback address, or one of its own). */
static int loopback_peer(int fd) {
    struct sockaddr_storage peer, own;
    socklen_t plen = sizeof(peer), olen = sizeof(own);
    if (getpeername(fd, (struct sockaddr*)&peer, &plen) != 0 || getsockname(fd, (struct sockaddr*)&own, &olen) != 0)
        return 0;
    if (peer.ss_family == AF_INET) {
        uint32_t a = ntohl(((struct sockaddr_in*)&peer)->sin_addr.s_addr);
        return (a >> 24) == 127 || a == ntohl(((struct sockaddr_in*)&own)->sin_addr.s_addr);
    }
    if (peer.ss_family == AF_INET6) {
        const struct in6_addr* a = &((struct sockaddr_in6*)&peer)->sin6_addr;
        if (IN6_IS_ADDR_LOOPBACK(a) || memcmp(a, &((struct sockaddr_in6*)&own)->sin6_addr, sizeof(*a)) == 0) return 1;
        return IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127;
    }
    return 0;
}

/* Bulk from a peer on this machine wakes its receiver once per CONN_BATCH bytes (SO_RCVLOWAT) rather than every
 * few segments, about 1.3x faster over loopback. The kernel wakes a sleeping receiver when the queue reaches the
 * batch, not when the receive's own request is met, so a receive only waits for a batch while more than one
 * batch is still due after what it asks for: one always comes. Elsewhere (a slow network) each wake-up would
 * wait for a whole batch, so it is left alone.
 *
 * Start waking per batch for a receive of n bytes: 1 if it did (end it with batch_end). */
static int batch_start(mr_conn* c, uint64_t n) {
    int bytes = (int)CONN_BATCH;
    if (n < 2 * CONN_BATCH || !c->loopback) return 0;
    return setsockopt(c->rfd, SOL_SOCKET, SO_RCVLOWAT, &bytes, sizeof(bytes)) == 0;
}

/* Wake at the first byte again (a small frame next, or poll, must not wait for a batch). */
static void batch_end(mr_conn* c) {
    int one = 1;
    setsockopt(c->rfd, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof(one));
}

int conn_read_exact(mr_conn* c, void* dst, uint64_t n) {
    uint8_t* p = (uint8_t*)dst;
    size_t have = c->end - c->start;
    if (have > n) have = (size_t)n;
    if (have) {
        memcpy(p, c->buf + c->start, have);
        c->start += have;
        p += have;
        n -= have;
    }
    int batched = c->deadline_ns <= 0 && batch_start(c, n);
    while (n) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : (size_t)n;
        ssize_t got;
        if (batched) {
            if (n < 2 * CONN_BATCH) {
                batch_end(c);
                batched = 0;
            } else if (chunk > n - CONN_BATCH) {
                chunk = (size_t)(n - CONN_BATCH); /* a batch is still due after this receive */
            }
        }
        if (c->is_socket && c->deadline_ns <= 0) {
            got = recv(c->rfd, p, chunk, MSG_WAITALL);
            if (got == 0) {
                c->err = 0;
                if (batched) batch_end(c);
                return -1;
            }
            if (got < 0) {
                if (errno == EINTR && !mr_terminate) continue;
                c->err = errno;
                if (batched) batch_end(c);
                return -1;
            }
        } else {
            got = read_some(c, p, chunk);
            if (got < 0) return -1;
        }
        p += got;
        n -= (uint64_t)got;
    }
    return 0;
}

static int ensure_scratch(mr_conn* c) {
    if (c->scratch) return 0;
    c->scratch = (uint8_t*)malloc(CONN_SCRATCH);
    if (!c->scratch) {
        c->err = ENOMEM;
        return -1;
    }
    c->scratch_cap = CONN_SCRATCH;
    return 0;
}

int conn_discard(mr_conn* c, uint64_t n) {
    size_t have = c->end - c->start;
    if (have > n) have = (size_t)n;
    c->start += have;
    n -= have;
    if (!n) return 0;
    uint8_t* sink = c->buf;
    size_t cap = c->cap;
    if (n > cap && ensure_scratch(c) == 0) {
        sink = c->scratch;
        cap = c->scratch_cap;
    }
    if (!sink) {
        if (conn_fill(c, 0)) return -1; /* allocates the buffer */
        sink = c->buf;
        cap = c->cap;
    }
    c->start = c->end = 0; /* the receive buffer is empty: it can serve as the sink */
    while (n) {
        ssize_t got = read_some(c, sink, n < cap ? (size_t)n : cap);
        if (got < 0) return -1;
        n -= (uint64_t)got;
    }
    return 0;
}

static int write_all_fd(int fd, const uint8_t* p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int conn_bulk_to_fd(mr_conn* c, int fd, uint64_t n, int* write_errno) {
    *write_errno = 0;
    size_t have = c->end - c->start;
    if (have > n) have = (size_t)n;
    if (have) {
        if (write_all_fd(fd, c->buf + c->start, have)) *write_errno = errno;
        c->start += have;
        n -= have;
    }
    if (!n) return 0;
    if (*write_errno) return conn_discard(c, n);
    if (c->is_socket && c->deadline_ns <= 0) {
        if (c->splice_pipe[0] < 0 && pipe(c->splice_pipe) == 0) {
            fcntl(c->splice_pipe[1], F_SETPIPE_SZ, CONN_SPLICE_PIPE); /* a smaller pipe only means more calls */
        }
        int batched = c->splice_pipe[0] >= 0 && batch_start(c, n);
        while (n && c->splice_pipe[0] >= 0) {
            if (batched && n < 2 * CONN_BATCH) { /* splice waits only while nothing is queued: n is coming */
                batch_end(c);
                batched = 0;
            }
            size_t want = n > CONN_SPLICE_PIPE ? CONN_SPLICE_PIPE : (size_t)n;
            ssize_t moved = splice(c->rfd, NULL, c->splice_pipe[1], NULL, want, SPLICE_F_MOVE);
            if (moved <= 0 && !(moved < 0 && errno == EINTR) && batched) {
                int saved = errno;
                batch_end(c);
                batched = 0;
                errno = saved;
            }
            if (moved == 0) {
                c->err = 0;
                return -1;
            }
            if (moved < 0) {
                if (errno == EINTR) continue;
                if (errno == EINVAL || errno == ENOSYS) break; /* no splice here: the copying loop below */
                c->err = errno;
                return -1;
            }
            n -= (uint64_t)moved;
            while (moved > 0) {
                ssize_t out = splice(c->splice_pipe[0], NULL, fd, NULL, (size_t)moved, SPLICE_F_MOVE);
                if (out < 0 && errno == EINTR) continue;
                if (out <= 0) {
                    *write_errno = out < 0 ? errno : EIO;
                    if (batched) batch_end(c);
                    /* empty the pipe: it carries the next transfer */
                    while (moved > 0) {
                        ssize_t r = read(c->splice_pipe[0], c->buf, moved < (ssize_t)c->cap ? (size_t)moved : c->cap);
                        if (r <= 0) break;
                        moved -= r;
                    }
                    return conn_discard(c, n);
                }
                moved -= out;
            }
        }
        if (!n) return 0;
    }
    if (ensure_scratch(c)) return -1;
    while (n) {
        ssize_t got = read_some(c, c->scratch, n < c->scratch_cap ? (size_t)n : c->scratch_cap);
        if (got < 0) return -1;
        n -= (uint64_t)got;
        if (write_all_fd(fd, c->scratch, (size_t)got)) {
            *write_errno = errno;
            return conn_discard(c, n);
        }
    }
    return 0;
}

int conn_writev(mr_conn* c, struct iovec* iov, int n) {
    while (n > 0) {
        ssize_t w;
        if (c->is_socket) {
            struct msghdr m;
            memset(&m, 0, sizeof(m));
            m.msg_iov = iov;
            m.msg_iovlen = (size_t)n;
            w = sendmsg(c->wfd, &m, MSG_NOSIGNAL);
        } else {
            w = writev(c->wfd, iov, n);
        }
        if (w < 0) {
            if (errno == EINTR) continue;
            c->err = errno;
            return -1;
        }
        size_t done = (size_t)w;
        while (n > 0 && done >= iov->iov_len) {
            done -= iov->iov_len;
            ++iov;
            --n;
        }
        if (n > 0) {
            iov->iov_base = (char*)iov->iov_base + done;
            iov->iov_len -= done;
        }
    }
    return 0;
}

/* n bytes of the file from *off by sendfile, *off advanced past what went: 0, or -1 with c->err set
 * (EINVAL or ENOSYS: this file cannot be sent so) */
static int sendfile_range(mr_conn* c, int fd, off_t* off, uint64_t n) {
    while (n) {
        size_t chunk = n > ((size_t)1 << 30) ? ((size_t)1 << 30) : (size_t)n;
        ssize_t sent = sendfile(c->wfd, fd, off, chunk);
        if (sent < 0 && errno == EINTR) continue;
        if (sent <= 0) {
            c->err = sent < 0 ? errno : EIO; /* 0: the file shrank under us */
            return -1;
        }
        n -= (uint64_t)sent;
    }
    return 0;
}

int conn_sendfile(mr_conn* c, int fd, uint64_t count) {
    off_t off = 0;
    if (c->loopback && count) {
        /* a peer on this machine: both ends' CPUs share the copying. Most pieces are sent from a read-only
         * mapping (copied into the socket here), one in CONN_SENDFILE_SHARE by sendfile (the receiver copies it
         * out of the page cache): faster than either way alone (benchmarks: download) */
        struct stat st;
        void* map = fstat(fd, &st) == 0 && (uint64_t)st.st_size >= count && count <= SIZE_MAX
                        ? mmap(NULL, (size_t)count, PROT_READ, MAP_SHARED, fd, 0)
                        : MAP_FAILED;
        if (map != MAP_FAILED) {
            int rc = 0;
            for (size_t at = 0, i = 0; at < count && !rc; at += CONN_PIECE, i++) {
                size_t n = count - at < CONN_PIECE ? (size_t)count - at : CONN_PIECE;
                if (i % CONN_SENDFILE_SHARE == CONN_SENDFILE_SHARE - 1) {
                    off_t from = (off_t)at;
                    rc = sendfile_range(c, fd, &from, n);
                } else {
                    struct iovec v = {(char*)map + at, n};
                    rc = conn_writev(c, &v, 1);
                }
            }
            munmap(map, (size_t)count);
            return rc;
        }
    }
    if (!sendfile_range(c, fd, &off, count)) return 0;
    if (c->err != EINVAL && c->err != ENOSYS) return -1;
    c->err = 0; /* no sendfile for this file: read + write, from where it stopped */
    count -= (uint64_t)off;
    if (ensure_scratch(c)) return -1;
    while (count) {
        ssize_t got = pread(fd, c->scratch, count < c->scratch_cap ? (size_t)count : c->scratch_cap, off);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            c->err = got < 0 ? errno : EIO;
            return -1;
        }
        struct iovec v = {c->scratch, (size_t)got};
        if (conn_writev(c, &v, 1)) return -1;
        off += got;
        count -= (uint64_t)got;
    }
    return 0;
}

void mr_put_header(uint8_t* p, uint32_t ctrl_len, uint16_t kind, uint16_t flags, uint64_t bulk_len) {
    for (int i = 0; i < 4; ++i) p[i] = (uint8_t)(ctrl_len >> (8 * i));
    p[4] = (uint8_t)kind;
    p[5] = (uint8_t)(kind >> 8);
    p[6] = (uint8_t)flags;
    p[7] = (uint8_t)(flags >> 8);
    for (int i = 0; i < 8; ++i) p[8 + i] = (uint8_t)(bulk_len >> (8 * i));
}

void conn_begin(mr_conn* c) {
    c->out.len = 0;
    c->out.failed = 0;
    if (mp_reserve(&c->out, 256) == 0) c->out.len = MR_HEADER;
}

int conn_finish(mr_conn* c, int kind, const void* bulk, uint64_t bulk_len) {
    if (c->out.failed || c->out.len < MR_HEADER) {
        c->err = ENOMEM;
        return -1;
    }
    mr_put_header(c->out.data, (uint32_t)(c->out.len - MR_HEADER), (uint16_t)kind, 0, bulk_len);
    struct iovec iov[2] = {{c->out.data, c->out.len}, {(void*)bulk, bulk ? (size_t)bulk_len : 0}};
    int rc = conn_writev(c, iov, bulk && bulk_len ? 2 : 1);
    if (c->out.cap > (1u << 20)) mp_buf_free(&c->out); /* a big reply's buffer is not kept */
    return rc;
}

int conn_send_error(mr_conn* c, int code, const char* msg) {
    conn_begin(c);
    mp_put_array(&c->out, 2);
    mp_put_int(&c->out, code);
    mp_put_cstr(&c->out, msg);
    return conn_finish(c, K_ERROR, NULL, 0);
}

void conn_send_nowait(int fd, int is_socket, const void* data, size_t n) {
    if (is_socket) {
        ssize_t w = send(fd, data, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        (void)w;
    } else {
        int flags = fcntl(fd, F_GETFL);
        if (flags >= 0) fcntl(fd, F_SETFL, flags | O_NONBLOCK);
        ssize_t w = write(fd, data, n);
        (void)w;
        if (flags >= 0) fcntl(fd, F_SETFL, flags);
    }
}

void conn_send_error_nowait(int fd, int is_socket, int code, const char* msg) {
    mp_buf b = {0};
    mp_reserve(&b, 256);
    b.len = MR_HEADER;
    mp_put_array(&b, 2);
    mp_put_int(&b, code);
    mp_put_cstr(&b, msg);
    if (!b.failed) {
        mr_put_header(b.data, (uint32_t)(b.len - MR_HEADER), K_ERROR, 0, 0);
        conn_send_nowait(fd, is_socket, b.data, b.len);
    }
    mp_buf_free(&b);
}
