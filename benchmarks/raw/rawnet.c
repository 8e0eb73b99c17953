/* rawnet: the native loopback limits the benchmark compares rpc-workbench with.
 *
 * Built by benchmarks/run.py at run time (gcc -O2, into a temporary directory).
 * Both ends are C; the process forks its peer, each end pins itself to the CPU
 * it is given (-1: not pinned), and the peer dies with its parent.
 *
 *   rawnet bulk METHOD BYTES REPS CPU PEER_CPU DIR
 *       Move BYTES from this process to the peer REPS times (after one untimed
 *       warm-up), each time until the peer has every byte and answered one
 *       byte. METHOD is SOURCE-SINK: SOURCE "send" (send() from memory) or
 *       "sendfile" (from a file in DIR, in the page cache); SINK "recv"
 *       (recv() into memory), "splice" (socket -> pipe -> a new file in DIR
 *       per transfer, its extent preallocated), "write" (recv() into a 1 MiB
 *       buffer, written to such a file 256 KiB at a time, as an upload from
 *       this machine lands) or "overwrite" (the same, over the pages of the
 *       last transfer's file, as an upload after a remove lands); every sink
 *       wakes once per 1 MiB batch
 *       (SO_RCVLOWAT) and both ends use reno, as workbench's loopback sockets
 *       do. Prints the seconds of each transfer.
 *
 *   rawnet first BYTES REPS CPU PEER_CPU
 *       A new connection's first transfer, REPS times (after one untimed): each
 *       time a freshly forked peer connects (untimed) and receives BYTES from
 *       send() into memory it has just mapped (anonymous, huge pages advised,
 *       as a new tensor of workbench's), batched and on reno as above. Prints
 *       the seconds of each first transfer, until the peer's one-byte answer.
 *
 *   rawnet refault BYTES WAIT_S
 *       The first touch of BYTES of fresh memory (anonymous, huge pages
 *       advised) right after the same amount was freed, and after it was left
 *       free for WAIT_S seconds: on a VM whose balloon reports free memory to
 *       its host, the second is far slower. Prints the seconds of each touch.
 *
 *   rawnet ping SIZE WARMUP COUNT CPU PEER_CPU
 *       SIZE-byte messages echoed by the peer over TCP_NODELAY; prints the
 *       seconds of each of COUNT round trips after WARMUP untimed ones.
 *
 * Output: one JSON line {"mode": ..., "method": ..., "seconds": [...]}.
 * Exit status 0 on success, 2 on bad usage, 1 on any system error (with a
 * message on stderr). Every socket has a 30 s timeout; the whole run is killed
 * by SIGALRM after 300 s.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PIPE_BYTES (1 << 20)
#define LAND_BYTES (1 << 20)   /* the write sink's buffer: received into, then written out */
#define WRITE_BYTES (256 << 10) /* ... in writes of this size, at offsets that are multiples of it */
#define BATCH_BYTES (1 << 20)
#define IO_TIMEOUT_S 30
#define RUN_LIMIT_S 300

static void die(const char *what) {
    fprintf(stderr, "rawnet: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void pin(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) die("sched_setaffinity");
}

static void tune(int fd) {
    int one = 1;
    struct timeval tv = {IO_TIMEOUT_S, 0};
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0) die("TCP_NODELAY");
    /* no congestion control's pacing on loopback (as workbench's loopback sockets): BBR's reorders segments */
    setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, "reno", 4); /* failing that, the default stays */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0) die("SO_RCVTIMEO");
    if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0) die("SO_SNDTIMEO");
}

/* A connected pair: returns this end's socket; in the child (*is_peer = 1) the peer's. */
static int connect_pair(int cpu, int peer_cpu, int *is_peer, pid_t *child) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    socklen_t len = sizeof addr;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    if (listener < 0) die("socket");
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0) die("bind");
    if (listen(listener, 1) != 0) die("listen");
    if (getsockname(listener, (struct sockaddr *)&addr, &len) != 0) die("getsockname");
    pid_t parent = getpid();
    *child = fork();
    if (*child < 0) die("fork");
    if (*child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent) _exit(1);
        close(listener);
        pin(peer_cpu);
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) die("socket");
        if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) die("connect");
        tune(fd);
        *is_peer = 1;
        return fd;
    }
    pin(cpu);
    struct timeval tv = {IO_TIMEOUT_S, 0};
    setsockopt(listener, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int fd = accept(listener, NULL, NULL);
    if (fd < 0) die("accept");
    close(listener);
    tune(fd);
    *is_peer = 0;
    return fd;
}

static void send_all(int fd, const char *buf, size_t n) {
    while (n) {
        ssize_t k = send(fd, buf, n, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("send");
        }
        buf += k;
        n -= (size_t)k;
    }
}

static int recv_all(int fd, char *buf, size_t n) { /* 0 at EOF before any byte */
    size_t got = 0;
    while (got < n) {
        ssize_t k = recv(fd, buf + got, n - got, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("recv");
        }
        if (k == 0) {
            if (got == 0) return 0;
            errno = ECONNRESET;
            die("recv (peer closed mid-message)");
        }
        got += (size_t)k;
    }
    return 1;
}

/* SO_RCVLOWAT on the receiving socket: it sleeps until BATCH_BYTES are queued rather than waking every few
 * segments (as workbench's receivers do). Set only while two batches are still due, so one always comes: the
 * kernel wakes on the queue reaching the batch, not on the call's own request being met. */
static void wake_at(int fd, int bytes) {
    if (setsockopt(fd, SOL_SOCKET, SO_RCVLOWAT, &bytes, sizeof bytes) != 0) die("setsockopt SO_RCVLOWAT");
}

static void recv_bulk(int fd, char *buf, size_t n) {
    size_t got = 0;
    int batched = n >= 2 * BATCH_BYTES;
    if (batched) wake_at(fd, BATCH_BYTES);
    while (got < n) {
        if (batched && n - got < 2 * BATCH_BYTES) { wake_at(fd, 1); batched = 0; }
        ssize_t k = recv(fd, buf + got, n - got, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("recv");
        }
        if (k == 0) { errno = ECONNRESET; die("recv (the sender closed early)"); }
        got += (size_t)k;
    }
}

static void sendfile_all(int sock, int file, size_t n) {
    off_t off = 0;
    while ((size_t)off < n) {
        ssize_t k = sendfile(sock, file, &off, n - (size_t)off);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("sendfile");
        }
        if (k == 0) { errno = EIO; die("sendfile (source file too short)"); }
    }
}

static void splice_all(int sock, int pipe_rd, int pipe_wr, int file, size_t n) {
    int batched = n >= 2 * BATCH_BYTES;
    if (batched) wake_at(sock, BATCH_BYTES);
    while (n) {
        if (batched && n < 2 * BATCH_BYTES) { wake_at(sock, 1); batched = 0; }
        size_t want = n < PIPE_BYTES ? n : PIPE_BYTES;
        ssize_t k = splice(sock, NULL, pipe_wr, NULL, want, SPLICE_F_MOVE);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("splice from the socket");
        }
        if (k == 0) { errno = ECONNRESET; die("splice (peer closed)"); }
        n -= (size_t)k;
        while (k) {
            ssize_t w = splice(pipe_rd, NULL, file, NULL, (size_t)k, SPLICE_F_MOVE);
            if (w < 0) {
                if (errno == EINTR) continue;
                die("splice to the file");
            }
            k -= w;
        }
    }
}

static void write_all(int fd, const char *buf, size_t n) {
    while (n) {
        ssize_t k = write(fd, buf, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            die("write to the file");
        }
        buf += k;
        n -= (size_t)k;
    }
}

/* recv() into one reused buffer, written to the file from it (as workbench lands an upload from this machine) */
static void land_all(int sock, char *buf, int file, size_t n) {
    int batched = n >= 2 * BATCH_BYTES;
    if (batched) wake_at(sock, BATCH_BYTES);
    while (n) {
        if (batched && n < 2 * BATCH_BYTES) { wake_at(sock, 1); batched = 0; }
        size_t want = n < LAND_BYTES ? n : LAND_BYTES;
        if (!recv_all(sock, buf, want)) { errno = ECONNRESET; die("recv (peer closed)"); }
        for (size_t off = 0; off < want; off += WRITE_BYTES)
            write_all(file, buf + off, want - off < WRITE_BYTES ? want - off : WRITE_BYTES);
        n -= want;
    }
}

static char *touched(size_t n) {
    char *buf = malloc(n ? n : 1);
    if (!buf) die("malloc");
    for (size_t i = 0; i < n; i++) buf[i] = (char)(i * 131 + 7);
    return buf;
}

static void print_times(const char *mode, const char *method, const double *t, long n) {
    printf("{\"mode\": \"%s\", \"method\": \"%s\", \"seconds\": [", mode, method);
    for (long i = 0; i < n; i++) printf(i ? ", %.9f" : "%.9f", t[i]);
    printf("]}\n");
    fflush(stdout);
}

static int finish(pid_t child) {
    int status = 0;
    if (waitpid(child, &status, 0) < 0) die("waitpid");
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "rawnet: the peer process failed (status %d)\n", status);
        return 1;
    }
    return 0;
}

static int bulk(const char *method, size_t bytes, long reps, int cpu, int peer_cpu, const char *dir) {
    int from_file = strncmp(method, "sendfile-", 9) == 0;
    const char *sink = strchr(method, '-');
    if (!sink || (strcmp(sink, "-recv") != 0 && strcmp(sink, "-splice") != 0 && strcmp(sink, "-write") != 0 &&
                  strcmp(sink, "-overwrite") != 0) ||
        (!from_file && strncmp(method, "send-", 5) != 0)) {
        fprintf(stderr, "rawnet: unknown bulk method %s (SOURCE-SINK: SOURCE send or sendfile, SINK recv, splice "
                "write or overwrite)\n", method);
        return 2;
    }
    int to_file = strcmp(sink, "-recv") != 0, over = strcmp(sink, "-overwrite") == 0;
    int by_write = over || strcmp(sink, "-write") == 0;
    char path[4096];
    int is_peer;
    pid_t child;
    int fd = connect_pair(cpu, peer_cpu, &is_peer, &child);
    if (is_peer) { /* the receiver: take every transfer, answer one byte after each */
        char *buf = touched(by_write ? LAND_BYTES : to_file ? 0 : bytes);
        int p[2] = {-1, -1};
        if (to_file && !by_write) {
            if (pipe(p) != 0) die("pipe");
            fcntl(p[1], F_SETPIPE_SZ, PIPE_BYTES);
        }
        for (long r = 0; r <= reps; r++) {
            if (to_file) {
                snprintf(path, sizeof path, "%s/dst-%ld.bin", dir, over ? 0L : r);
                int out = open(path, O_WRONLY | O_CREAT | (over ? 0 : O_TRUNC), 0644);
                if (out < 0) die("open the destination file");
                (void)fallocate(out, FALLOC_FL_KEEP_SIZE, 0, (off_t)bytes); /* as workbench lands an upload */
                if (by_write) land_all(fd, buf, out, bytes);
                else splice_all(fd, p[0], p[1], out, bytes);
                if (close(out) != 0) die("close the destination file");
            } else {
                recv_bulk(fd, buf, bytes);
            }
            send_all(fd, "k", 1);
        }
        _exit(0);
    }
    char *buf = NULL;
    int src = -1;
    if (from_file) {
        snprintf(path, sizeof path, "%s/src.bin", dir);
        src = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
        if (src < 0) die("open the source file");
        char *block = touched(1 << 20);
        for (size_t done = 0; done < bytes;) {
            size_t n = bytes - done < (1 << 20) ? bytes - done : (1 << 20);
            if (write(src, block, n) != (ssize_t)n) die("write the source file");
            done += n;
        }
        free(block);
    } else {
        buf = touched(bytes);
    }
    double *times = calloc((size_t)reps + 1, sizeof *times);
    if (!times) die("calloc");
    char ack;
    for (long r = 0; r <= reps; r++) { /* r == 0: warm-up */
        double start = now();
        if (from_file) sendfile_all(fd, src, bytes);
        else send_all(fd, buf, bytes);
        if (!recv_all(fd, &ack, 1)) { errno = ECONNRESET; die("recv the acknowledgement"); }
        times[r] = now() - start;
    }
    close(fd);
    int status = finish(child);
    if (from_file) unlink(path);
    for (long r = 0; r <= reps; r++) {
        snprintf(path, sizeof path, "%s/dst-%ld.bin", dir, r);
        unlink(path);
    }
    if (status == 0) print_times("bulk", method, times + 1, reps);
    return status;
}

static int first(size_t bytes, long reps, int cpu, int peer_cpu) {
    char *buf = touched(bytes); /* the sender's data is warm, as a client's array is */
    double *times = calloc((size_t)reps + 1, sizeof *times);
    if (!times) die("calloc");
    char ack;
    for (long r = 0; r <= reps; r++) { /* r == 0: warm-up */
        int is_peer;
        pid_t child;
        int fd = connect_pair(cpu, peer_cpu, &is_peer, &child);
        if (is_peer) {
            char *dst = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (dst == MAP_FAILED) die("mmap");
            madvise(dst, bytes, MADV_HUGEPAGE); /* where THP is off, plain pages */
            recv_bulk(fd, dst, bytes);
            send_all(fd, "k", 1);
            _exit(0);
        }
        double start = now();
        send_all(fd, buf, bytes);
        if (!recv_all(fd, &ack, 1)) { errno = ECONNRESET; die("recv the acknowledgement"); }
        times[r] = now() - start;
        close(fd);
        if (finish(child) != 0) return 1; /* untimed: the next peer starts after this one has gone */
    }
    print_times("first", "send-recv", times + 1, reps);
    return 0;
}

static int ping(size_t size, long warmup, long count, int cpu, int peer_cpu) {
    int is_peer;
    pid_t child;
    int fd = connect_pair(cpu, peer_cpu, &is_peer, &child);
    char *buf = touched(size);
    if (is_peer) {
        while (recv_all(fd, buf, size)) send_all(fd, buf, size);
        _exit(0);
    }
    double *times = calloc((size_t)count + 1, sizeof *times);
    if (!times) die("calloc");
    for (long i = 0; i < warmup + count; i++) {
        double start = now();
        send_all(fd, buf, size);
        if (!recv_all(fd, buf, size)) { errno = ECONNRESET; die("recv the echo"); }
        if (i >= warmup) times[i - warmup] = now() - start;
    }
    close(fd);
    int status = finish(child);
    if (status == 0) print_times("ping", "send-recv", times, count);
    return status;
}

/* BYTES of fresh memory: taken and freed (munmap), WAIT_S seconds later taken again and touched */
static double touch_after(size_t bytes, unsigned wait_s) {
    for (int again = 0; again < 2; again++) {
        char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) die("mmap");
        madvise(p, bytes, MADV_HUGEPAGE);
        double start = now();
        memset(p, again + 1, bytes);
        double took = now() - start;
        munmap(p, bytes);
        if (again) return took;
        sleep(wait_s);
    }
    return 0;
}

static int refault(size_t bytes, unsigned wait_s) {
    double t[2] = {touch_after(bytes, 0), touch_after(bytes, wait_s)};
    print_times("refault", "freed just before, then left free WAIT_S s", t, 2);
    return 0;
}

int main(int argc, char **argv) {
    alarm(RUN_LIMIT_S);
    signal(SIGPIPE, SIG_IGN);
    if (argc == 8 && strcmp(argv[1], "bulk") == 0)
        return bulk(argv[2], strtoull(argv[3], NULL, 10), atol(argv[4]), atoi(argv[5]), atoi(argv[6]), argv[7]);
    if (argc == 6 && strcmp(argv[1], "first") == 0)
        return first(strtoull(argv[2], NULL, 10), atol(argv[3]), atoi(argv[4]), atoi(argv[5]));
    if (argc == 4 && strcmp(argv[1], "refault") == 0)
        return refault(strtoull(argv[2], NULL, 10), (unsigned)atoi(argv[3]));
    if (argc == 7 && strcmp(argv[1], "ping") == 0)
        return ping(strtoull(argv[2], NULL, 10), atol(argv[3]), atol(argv[4]), atoi(argv[5]), atoi(argv[6]));
    fprintf(stderr,
            "usage: rawnet bulk METHOD BYTES REPS CPU PEER_CPU DIR\n"
            "       rawnet first BYTES REPS CPU PEER_CPU\n"
            "       rawnet refault BYTES WAIT_S\n"
            "       rawnet ping SIZE WARMUP COUNT CPU PEER_CPU\n");
    return 2;
}
