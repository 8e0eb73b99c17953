/*
 * main.c: minrpc's command line, the TCP listener (or one session over stdio) and the tracker loop.
 *
 *   minrpc [--host H] [--port P] [--port-end PE] [--key K] [--tracker HOST:PORT] [--custom-addr A]
 *          [--cc CC] [--max-sessions N] [--idle-timeout S] [--preempt-idle S] [--handshake-timeout S] [--silent]
 *          [--max-workspace-bytes SIZE] [--max-workspace-files N] [--max-tensor-bytes SIZE] [--allow-tvm-clients]
 *          [--stdio] [--help]
 *
 * With no arguments, or --stdio, one session is served on stdin/stdout (PopenSession, with_minrpc programs).
 * Otherwise the listener binds the first free port of [P, PE], prints "minrpc listening on HOST:PORT", runs
 * every connection's handshake in its event loop (handshake.c) and forks a session process only for a CONNECT
 * that passed its checks (session.c). Connections in their handshake are bounded in total (by the descriptors
 * there are, 1024 at most) and per client address (all but a quarter of those): the oldest makes room. The
 * listener never runs user code and never blocks on a client: it accepts, handshakes, forks, reaps, and keeps
 * the tracker registration going (mr_tracker_poll).
 */
#include "core.h"
#include "kernel_runtime.h"
#include "opencl.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static mr_config mr_cfg; /* the options: sessions get a pointer to it (mr_session_args.cfg) */
volatile sig_atomic_t mr_terminate; /* (core.h says why it is global) */

/* ---- shared helpers -------------------------------------------------------------------------------- */
/* (mr_fail, minrpc.h's error setter, lives in elf.c) */

static void vlog(const char* fmt, va_list ap) {
    char line[1200];
    int n = snprintf(line, sizeof(line), "minrpc[%d]: ", (int)getpid());
    vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    size_t len = strlen(line);
    line[len++] = '\n';
    ssize_t w = write(2, line, len); /* one write per line: lines of several processes do not mix */
    (void)w;
}

void mr_log_info(const char* fmt, ...) {
    if (mr_cfg.silent) return;
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

void mr_log_error(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

int64_t mr_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* ---- options ---------------------------------------------------------------------------------------- */
static const char USAGE[] =
    "usage: minrpc [--host H] [--port P] [--port-end PE] [--key K] [--tracker HOST:PORT] [--custom-addr A]\n"
    "              [--cc CC] [--max-sessions N] [--idle-timeout S] [--preempt-idle S] [--handshake-timeout S]\n"
    "              [--max-workspace-bytes SIZE] [--max-workspace-files N] [--max-tensor-bytes SIZE]\n"
    "              [--allow-tvm-clients] [--silent] [--stdio]\n"
    "\n"
    "minrpc: a small native rpc-workbench session server (docs/protocol.md, version 1).\n"
    "\n"
    "With no arguments, or --stdio, serve one session on stdin/stdout (workbench.rpc.PopenSession), then exit\n"
    "with status 86 (as python -m workbench.rpc.server.worker --stdio: the session ended, nothing to report).\n"
    "Otherwise listen on TCP and print one line, \"minrpc listening on HOST:PORT\".\n"
    "Clients speak docs/protocol.md, or TVM's RPC protocol (apache-tvm's tvm.rpc.connect; section 13).\n"
    "\n"
    "  --host H               address to bind (default 127.0.0.1)\n"
    "  --port P               first port to try (default 9090; 0: any free port)\n"
    "  --port-end PE          end of the port range, exclusive (default 9199)\n"
    "  --key K                the device key clients and the tracker ask for (default \"\")\n"
    "  --tracker HOST:PORT    register with this tracker (then only its match keys are served, one at a time)\n"
    "  --custom-addr A        the address the tracker hands to clients (default: the one it sees)\n"
    "  --cc CC                the C compiler that links .tar modules (default $WORKBENCH_CC, $CC, cc, gcc, clang)\n"
    "  --max-sessions N       sessions served at the same time (default 64)\n"
    "  --idle-timeout S       end a session that sent no request for S seconds (default: off)\n"
    "  --preempt-idle S       when full, a session idle for S seconds yields its slot to a new client\n"
    "                         (default 900; 0: never)\n"
    "  --handshake-timeout S  the whole handshake's deadline (default 10)\n"
    "  --max-workspace-bytes SIZE  bytes a session's workspace may hold: uploads, expanded .tar modules, loaded\n"
    "                         copies (default 4G; 0: no limit; sizes take K, M, G, T suffixes)\n"
    "  --max-workspace-files N     files and directories a session's workspace may hold (default 10000; 0: none)\n"
    "  --max-tensor-bytes SIZE     memory a session's tensors may take (default: half the machine's memory)\n"
    "  --allow-tvm-clients    with WORKBENCH_RPC_TOKEN set, still let TVM's RPC clients in (they cannot prove a\n"
    "                         token; refused otherwise)\n"
    "  --silent               log errors only\n"
    "  --stdio                serve one session on stdin/stdout\n"
    "\n"
    "Environment (read at start, then removed from the environment kernels and compilers see):\n"
    "  WORKBENCH_RPC_TOKEN           clients must prove they know it (and this server proves it back)\n"
    "  WORKBENCH_REGISTRATION_TOKEN  proves this server to a tracker that requires it\n";

static void usage_error(const char* fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char* fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "minrpc: %s (minrpc --help lists the options)\n", msg);
    exit(2);
}

static int parse_port(const char* opt, const char* v, int allow_zero) {
    char* end = NULL;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (!*v || *end || errno || n < (allow_zero ? 0 : 1) || n > 65535)
        usage_error("%s takes a port number %d..65535, not '%s'; e.g. %s 9090", opt, allow_zero ? 0 : 1, v, opt);
    return (int)n;
}

static double parse_seconds(const char* opt, const char* v) {
    char* end = NULL;
    errno = 0;
    double s = strtod(v, &end);
    if (!*v || *end || errno || !isfinite(s) || s <= 0 || s > MR_MAX_SESSION_TIMEOUT)
        usage_error("%s takes a number of seconds > 0 and at most a year, not '%s'; e.g. %s 30", opt, v, opt);
    return s;
}

static void parse_options(int argc, char** argv) {
    mr_cfg.host = "127.0.0.1";
    mr_cfg.port = 9090;
    mr_cfg.port_end = -1;
    mr_cfg.key = "";
    mr_cfg.max_sessions = 64;
    mr_cfg.preempt_idle = 900;
    mr_cfg.handshake_timeout = 10.0;
    mr_cfg.target = MINRPC_TARGET;
    mr_cfg.stdio = argc <= 1;
    mr_cfg.max_workspace_bytes = MR_DEFAULT_WORKSPACE_BYTES;
    mr_cfg.max_workspace_files = MR_DEFAULT_WORKSPACE_FILES;
    mr_cfg.max_tensor_bytes = mr_default_tensor_bytes();
    for (int i = 1; i < argc; ++i) {
        char* arg = argv[i];
        const char* value = NULL;
        char name[64];
        char* eq = strchr(arg, '=');
        if (strncmp(arg, "--", 2) == 0 && eq && (size_t)(eq - arg) < sizeof(name)) {
            memcpy(name, arg, (size_t)(eq - arg));
            name[eq - arg] = '\0';
            value = eq + 1;
        } else {
            snprintf(name, sizeof(name), "%s", arg);
        }
        static const char* flags[] = {"--silent", "--stdio", "--help", "-h", "--allow-tvm-clients"};
        int is_flag = 0;
        for (size_t f = 0; f < sizeof(flags) / sizeof(flags[0]); ++f) is_flag |= strcmp(name, flags[f]) == 0;
        if (is_flag) {
            if (value) usage_error("%s takes no value", name);
            if (strcmp(name, "--silent") == 0) mr_cfg.silent = 1;
            else if (strcmp(name, "--allow-tvm-clients") == 0) mr_cfg.allow_tvm_clients = 1;
            else if (strcmp(name, "--stdio") == 0) mr_cfg.stdio = 1;
            else {
                fputs(USAGE, stdout);
                exit(0);
            }
            continue;
        }
        static const char* valued[] = {"--host", "--port", "--port-end", "--key", "--tracker", "--custom-addr",
                                       "--cc", "--max-sessions", "--idle-timeout", "--handshake-timeout",
                                       "--preempt-idle", "--max-workspace-bytes", "--max-workspace-files",
                                       "--max-tensor-bytes"};
        int known = 0;
        for (size_t f = 0; f < sizeof(valued) / sizeof(valued[0]); ++f) known |= strcmp(name, valued[f]) == 0;
        if (!known) usage_error("unknown option '%s'", arg);
        if (!value) {
            if (i + 1 >= argc) usage_error("%s needs a value", name);
            value = argv[++i];
        }
        if (strcmp(name, "--host") == 0) {
            if (!*value) usage_error("--host takes an address to bind, e.g. --host 0.0.0.0, not ''");
            mr_cfg.host = value;
        } else if (strcmp(name, "--port") == 0) mr_cfg.port = parse_port(name, value, 1);
        else if (strcmp(name, "--port-end") == 0) mr_cfg.port_end = parse_port(name, value, 1);
        else if (strcmp(name, "--key") == 0) mr_cfg.key = value;
        else if (strcmp(name, "--custom-addr") == 0) mr_cfg.custom_addr = *value ? value : NULL;
        else if (strcmp(name, "--cc") == 0) mr_cfg.cc = *value ? value : NULL;
        else if (strcmp(name, "--idle-timeout") == 0) mr_cfg.idle_timeout = parse_seconds(name, value);
        else if (strcmp(name, "--handshake-timeout") == 0) mr_cfg.handshake_timeout = parse_seconds(name, value);
        else if (strcmp(name, "--preempt-idle") == 0)
            mr_cfg.preempt_idle = strcmp(value, "0") == 0 ? 0 : parse_seconds(name, value);
        else if (strcmp(name, "--max-workspace-bytes") == 0 || strcmp(name, "--max-tensor-bytes") == 0) {
            uint64_t* slot = strcmp(name, "--max-tensor-bytes") == 0 ? &mr_cfg.max_tensor_bytes : &mr_cfg.max_workspace_bytes;
            if (mr_parse_size(value, slot))
                usage_error("%s takes a size in bytes >= 0, or with a suffix such as 512M or 4G (0: no limit), "
                            "not '%s'", name, value);
        } else if (strcmp(name, "--max-workspace-files") == 0) {
            char* end = NULL;
            errno = 0;
            unsigned long long n = strtoull(value, &end, 10);
            if (!*value || *end || errno || *value == '-' || n > (unsigned long long)INT64_MAX)
                usage_error("--max-workspace-files takes a whole number >= 0 (0: no limit), e.g. 10000, not '%s'", value);
            mr_cfg.max_workspace_files = n;
        } else if (strcmp(name, "--max-sessions") == 0) {
            char* end = NULL;
            long n = strtol(value, &end, 10);
            if (!*value || *end || n < 1 || n > 100000)
                usage_error("--max-sessions takes a number of sessions from 1 to 100000, not '%s'; e.g. --max-sessions 8",
                            value);
            mr_cfg.max_sessions = (int)n;
        } else if (strcmp(name, "--tracker") == 0) {
            const char* colon = strrchr(value, ':');
            if (!colon || colon == value)
                usage_error("--tracker takes HOST:PORT, e.g. --tracker 127.0.0.1:9190, not '%s'", value);
            char* host = strndup(value, (size_t)(colon - value));
            if (host && host[0] == '[' && host[strlen(host) - 1] == ']') { /* [::1]:9190 */
                memmove(host, host + 1, strlen(host));
                host[strlen(host) - 1] = '\0';
            }
            mr_cfg.tracker_host = host;
            char* end = NULL;
            long port = strtol(colon + 1, &end, 10);
            if (!colon[1] || *end || port < 1 || port > 65535)
                usage_error("--tracker takes HOST:PORT with a port from 1 to 65535, e.g. --tracker 127.0.0.1:9190, not '%s'",
                            value);
            mr_cfg.tracker_port = (int)port;
        }
    }
    /* [port, port_end) as rpc.Server and TVM take it; a range that ends at or below port tries port alone */
    if (mr_cfg.port_end < 0) mr_cfg.port_end = mr_cfg.port > 9198 ? mr_cfg.port + 1 : 9199;
    if (mr_cfg.port != 0 && mr_cfg.port_end < mr_cfg.port)
        usage_error("--port-end %d is below --port %d; give a range such as --port %d --port-end %d", mr_cfg.port_end,
                    mr_cfg.port, mr_cfg.port, mr_cfg.port + 100);
    if (mr_cfg.port_end == mr_cfg.port) mr_cfg.port_end = mr_cfg.port + 1;
    if (mr_cfg.stdio && mr_cfg.tracker_host)
        usage_error("--tracker needs a TCP server: drop --stdio (a stdio server is one session of one client)");
}

/* Tokens: read once, then removed from the environment that kernels and the compiler inherit, and wiped
   from the environment block (what /proc/PID/environ shows, to this user's processes even when this one
   is not dumpable). */
static char* take_env(const char* name) {
    char* v = getenv(name);
    char* copy = v && *v ? strdup(v) : NULL;
    if (v) {
        memset(v, 0, strlen(v));
        __asm__ __volatile__("" : : "r"(v) : "memory");
    }
    unsetenv(name);
    return copy;
}

/* ---- the listener ------------------------------------------------------------------------------------ */
typedef struct {
    pid_t pid;
    int status_fd; /* -1 once its end was read */
    int started;   /* the session started (counted in *sessions) */
    char* workspace;
    char line[4200];
    size_t line_len;
} child;

static child* children;
static size_t n_children, cap_children;
static volatile int* sessions; /* shared with the session processes */
static mr_session_slot* slots; /* the same: the running sessions (max_sessions + 1) */
static int listen_self_pipe[2] = {-1, -1};
static mr_tracker* tracker;
static mr_throttle* throttle; /* with a token: wrong proofs slow down their address */

static void listener_wake(void) {
    int saved = errno;
    ssize_t w = write(listen_self_pipe[1], "x", 1);
    (void)w;
    errno = saved;
}

static void on_listener_terminate(int sig) {
    (void)sig;
    mr_terminate = 1;
    listener_wake();
}

static void on_listener_child(int sig) {
    (void)sig;
    listener_wake();
}

static void set_handler(int sig, void (*fn)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(sig, &sa, NULL);
}

static int bind_listener(int* port_out) {
    struct addrinfo hints, *res = NULL, numeric;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
    memset(&hints, 0, sizeof(hints));
    memset(&numeric, 0, sizeof(numeric));
    memset(&v4, 0, sizeof(v4));
    memset(&v6, 0, sizeof(v6));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int rc = 0, resolved = 0;
    /* a numeric address needs no resolver (which would map much of the C library: resident memory) */
    if (inet_pton(AF_INET, mr_cfg.host, &v4.sin_addr) == 1) {
        v4.sin_family = AF_INET;
        numeric.ai_family = AF_INET;
        numeric.ai_addr = (struct sockaddr*)&v4;
        numeric.ai_addrlen = sizeof(v4);
        res = &numeric;
    } else if (inet_pton(AF_INET6, mr_cfg.host, &v6.sin6_addr) == 1) {
        v6.sin6_family = AF_INET6;
        numeric.ai_family = AF_INET6;
        numeric.ai_addr = (struct sockaddr*)&v6;
        numeric.ai_addrlen = sizeof(v6);
        res = &numeric;
    } else {
        rc = getaddrinfo(mr_cfg.host, "0", &hints, &res);
        resolved = 1;
    }
    if (rc != 0 || !res) {
        mr_log_error("cannot use --host %s: %s; give an address of this machine, e.g. --host 127.0.0.1", mr_cfg.host,
                     gai_strerror(rc));
        return -1;
    }
    int last_errno = 0;
    int first = mr_cfg.port, last = mr_cfg.port == 0 ? 0 : mr_cfg.port_end - 1;
    for (int port = first; port <= last; ++port) {
        int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            last_errno = errno;
            break;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        struct sockaddr_storage addr;
        memcpy(&addr, res->ai_addr, res->ai_addrlen);
        if (addr.ss_family == AF_INET) ((struct sockaddr_in*)&addr)->sin_port = htons((uint16_t)port);
        else ((struct sockaddr_in6*)&addr)->sin6_port = htons((uint16_t)port);
        if (bind(fd, (struct sockaddr*)&addr, res->ai_addrlen) == 0 && listen(fd, 1024) == 0) {
            socklen_t len = sizeof(addr);
            getsockname(fd, (struct sockaddr*)&addr, &len);
            *port_out = ntohs(addr.ss_family == AF_INET ? ((struct sockaddr_in*)&addr)->sin_port
                                                        : ((struct sockaddr_in6*)&addr)->sin6_port);
            if (resolved) freeaddrinfo(res);
            return fd;
        }
        last_errno = errno;
        close(fd);
        if (last_errno != EADDRINUSE && last_errno != EACCES) break;
    }
    if (resolved) freeaddrinfo(res);
    if (mr_cfg.port == 0 || mr_cfg.port + 1 == mr_cfg.port_end)
        mr_log_error("cannot listen on %s:%d: %s", mr_cfg.host, mr_cfg.port, strerror(last_errno));
    else
        mr_log_error("cannot listen on %s: no free port in %d..%d (%s); give another range with --port and --port-end",
                     mr_cfg.host, mr_cfg.port, mr_cfg.port_end - 1, strerror(last_errno));
    return -1;
}

/* ---- handshakes, in the listener's event loop (handshake.c) ------------------------------------------- */
static mr_handshake** pending; /* connections in their handshake, oldest first */
static size_t n_pending, cap_pending;

/* End a handshake's connection: what the client sent is read, so close sends no reset. */
static void close_pending(size_t i) {
    mr_handshake* hs = pending[i];
    shutdown(hs->rfd, SHUT_WR);
    char sink[256];
    while (recv(hs->rfd, sink, sizeof(sink), MSG_DONTWAIT) > 0) {
    }
    close(hs->rfd);
    mr_handshake_free(hs);
    free(hs);
    memmove(pending + i, pending + i + 1, (n_pending - i - 1) * sizeof(*pending));
    --n_pending;
}

static void evict(size_t i) {
    mr_handshake_refuse(pending[i], MR_BUSY, "server busy: too many connections are in their handshake; try again");
    close_pending(i);
}

static int compare_address(const void* a, const void* b) {
    return memcmp((*(mr_handshake* const*)a)->addr, (*(mr_handshake* const*)b)->addr, 16);
}

/* The index of the oldest handshake of the address that holds the most (out of descriptors: it makes room). */
static size_t oldest_of_busiest(void) {
    mr_handshake** sorted = (mr_handshake**)malloc(n_pending * sizeof(*sorted));
    if (!sorted) return 0;
    memcpy(sorted, pending, n_pending * sizeof(*sorted));
    qsort(sorted, n_pending, sizeof(*sorted), compare_address);
    const uint8_t* busiest = sorted[0]->addr;
    for (size_t i = 0, run = 0, best = 0; i < n_pending; ++i) {
        run = i && !memcmp(sorted[i]->addr, sorted[i - 1]->addr, 16) ? run + 1 : 1;
        if (run > best) best = run, busiest = sorted[i]->addr;
    }
    size_t oldest = 0;
    while (memcmp(pending[oldest]->addr, busiest, 16)) ++oldest;
    free(sorted);
    return oldest;
}

/* Connections in their handshake at once: bounded by the descriptors there are, at most 1024. */
static size_t handshake_limit(void) {
    struct rlimit rl;
    size_t limit = 1024;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        long room = (long)rl.rlim_cur - 32 - (long)mr_cfg.max_sessions; /* one descriptor per child here */
        if (room < 8) room = 8;
        if ((size_t)room < limit) limit = (size_t)room;
    }
    return limit;
}

/* Make room for a connection from addr: one address holds at most all but a quarter of the handshakes, and
   the oldest (of that address, when it holds its share) makes room. 0, or -1: no room (out of memory). */
static int make_room(const uint8_t addr[16]) {
    size_t limit = handshake_limit(), share = limit - limit / 4, held = 0, oldest_held = 0;
    for (size_t i = n_pending; i-- > 0;)
        if (!memcmp(pending[i]->addr, addr, 16)) ++held, oldest_held = i;
    if (held && held >= share) evict(oldest_held);
    else if (n_pending && n_pending >= limit) evict(0);
    if (n_pending == cap_pending) {
        size_t cap = cap_pending ? cap_pending * 2 : 64;
        mr_handshake** grown = (mr_handshake**)realloc(pending, cap * sizeof(*pending));
        if (!grown) return -1;
        pending = grown;
        cap_pending = cap;
    }
    return 0;
}

static void start_session(size_t i, const mr_connect* connect, int listen_fd);

/* Run the handshake of pending[i] as far as its bytes go; a checked CONNECT starts its session. */
static void advance(size_t i, int listen_fd) {
    mr_handshake* hs = pending[i];
    const char* matchkey = NULL;
    if (tracker) { /* while a session runs, no key matches: the tracker hands this device to one client at a time */
        const char* offered = mr_tracker_matchkey(tracker);
        matchkey = *sessions > 0 || !offered || !*offered ? "\001busy" : offered;
    }
    int rc = mr_handshake_step(hs, &mr_cfg, matchkey, throttle);
    if (rc == 0) return;
    mr_connect connect;
    if (rc > 0 && mr_handshake_check(hs, &mr_cfg, matchkey, throttle, &connect) == 0) start_session(i, &connect, listen_fd);
    else close_pending(i);
}

static void accept_connection(int fd, const struct sockaddr_storage* addr, int listen_fd) {
    mr_handshake* hs = (mr_handshake*)malloc(sizeof(*hs));
    uint8_t a16[16] = {0};
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (addr->ss_family == AF_INET) { /* as ::ffff:a.b.c.d */
        a16[10] = a16[11] = 0xff;
        memcpy(a16 + 12, &((const struct sockaddr_in*)addr)->sin_addr, 4);
        inet_ntop(AF_INET, &((const struct sockaddr_in*)addr)->sin_addr, host, sizeof(host));
        port = ntohs(((const struct sockaddr_in*)addr)->sin_port);
    } else if (addr->ss_family == AF_INET6) {
        memcpy(a16, &((const struct sockaddr_in6*)addr)->sin6_addr, 16);
        inet_ntop(AF_INET6, &((const struct sockaddr_in6*)addr)->sin6_addr, host, sizeof(host));
        port = ntohs(((const struct sockaddr_in6*)addr)->sin6_port);
    }
    if (!hs || make_room(a16)) {
        free(hs);
        mr_handshake tmp;
        mr_handshake_init(&tmp, fd, fd, 1, 0);
        mr_handshake_refuse(&tmp, MR_BUSY, "server busy: it is out of memory; try again later");
        close(fd);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    mr_handshake_init(hs, fd, fd, 1, mr_now_ns() + (int64_t)(mr_cfg.handshake_timeout * 1e9));
    memcpy(hs->addr, a16, 16);
    snprintf(hs->peer, sizeof(hs->peer), "%s:%d", host, port);
    pending[n_pending++] = hs;
    advance(n_pending - 1, listen_fd); /* a client sends its preamble with its connect: often here already */
}

/* ---- sessions ----------------------------------------------------------------------------------------- */
/* Fork the session process of pending[i], whose CONNECT passed its checks; it leaves the pending list. */
static void start_session(size_t i, const mr_connect* connect, int listen_fd) {
    mr_handshake* hs = pending[i];
    int fd = hs->rfd;
    if (n_children == cap_children) {
        size_t cap = cap_children ? cap_children * 2 : 16;
        child* grown = (child*)realloc(children, cap * sizeof(child));
        if (!grown) {
            mr_handshake_refuse(hs, MR_BUSY, "server busy: it is out of memory; try again later");
            close_pending(i);
            return;
        }
        children = grown;
        cap_children = cap;
    }
    int status[2];
    if (pipe2(status, O_CLOEXEC) != 0) {
        mr_handshake_refuse(hs, MR_BUSY, "server busy: it is out of file descriptors (%s); try again later",
                            strerror(errno));
        close_pending(i);
        return;
    }
    mr_cl_count(); /* the OpenCL devices, collected from the probe before the first session process inherits them */
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(status[0]);
        close(status[1]);
        mr_handshake_refuse(hs, MR_BUSY, "server busy: it cannot start a session process (%s); try again later",
                            strerror(e));
        close_pending(i);
        return;
    }
    if (pid == 0) {
        setpgid(0, 0); /* the session and its worker: killed together when the server stops */
        close(listen_fd);
        close(listen_self_pipe[0]);
        close(listen_self_pipe[1]);
        close(status[0]);
        for (size_t k = 0; k < n_children; ++k)
            if (children[k].status_fd >= 0) close(children[k].status_fd);
        for (size_t k = 0; k < n_pending; ++k) /* other clients' connections are not this session's */
            if (k != i) close(pending[k]->rfd);
        dup2(2, 1); /* stdout belongs to the listener's one line: a kernel's printf goes to stderr */
        int flags = fcntl(fd, F_GETFL);
        fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
        mr_session_args args;
        memset(&args, 0, sizeof(args));
        args.cfg = &mr_cfg;
        args.peer = hs->peer;
        memcpy(args.addr, hs->addr, 16);
        args.connect = *connect;
        args.sessions = sessions;
        args.slots = slots;
        args.status_fd = status[1];
        _exit(mr_session_main(fd, fd, 1, &args));
    }
    setpgid(pid, pid);
    close(status[1]);
    close(fd);
    mr_handshake_free(hs);
    free(hs);
    memmove(pending + i, pending + i + 1, (n_pending - i - 1) * sizeof(*pending));
    --n_pending;
    fcntl(status[0], F_SETFL, O_NONBLOCK);
    child* ch = &children[n_children++];
    memset(ch, 0, sizeof(*ch));
    ch->pid = pid;
    ch->status_fd = status[0];
}

static void read_status(child* ch) {
    for (;;) {
        ssize_t n = read(ch->status_fd, ch->line + ch->line_len, sizeof(ch->line) - 1 - ch->line_len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {
            close(ch->status_fd);
            ch->status_fd = -1;
            return;
        }
        ch->line_len += (size_t)n;
        ch->line[ch->line_len] = '\0';
        char* nl;
        while ((nl = strchr(ch->line, '\n')) != NULL) {
            *nl = '\0';
            if (ch->line[0] == 'S' && !ch->started) {
                ch->started = 1;
                free(ch->workspace);
                ch->workspace = strdup(ch->line + 1);
                if (tracker) mr_tracker_set_busy(tracker, 1);
            }
            size_t used = (size_t)(nl + 1 - ch->line);
            memmove(ch->line, nl + 1, ch->line_len - used + 1);
            ch->line_len -= used;
        }
        if (ch->line_len >= sizeof(ch->line) - 1) ch->line_len = 0; /* a line too long: dropped */
    }
}

static void forget_child(size_t i) {
    child* ch = &children[i];
    if (ch->status_fd >= 0) {
        read_status(ch); /* a last "started" line may still be in the pipe */
        if (ch->status_fd >= 0) close(ch->status_fd);
    }
    if (ch->started) {
        __atomic_fetch_sub(sessions, 1, __ATOMIC_SEQ_CST);
        if (tracker && *sessions == 0) mr_tracker_set_busy(tracker, 0);
    }
    if (ch->workspace) {
        struct stat st;
        if (lstat(ch->workspace, &st) == 0) mr_remove_tree(ch->workspace); /* its session process could not */
        free(ch->workspace);
    }
    children[i] = children[--n_children];
}

static void reap(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0) return;
        for (size_t i = 0; i < n_children; ++i)
            if (children[i].pid == pid) {
                forget_child(i);
                break;
            }
    }
}

static void stop_children(void) {
    for (size_t i = 0; i < n_children; ++i) kill(children[i].pid, SIGTERM); /* each ends its worker */
    int64_t deadline = mr_now_ns() + 1500000000LL; /* well within MinRPCServer's 10 s before SIGKILL */
    while (n_children && mr_now_ns() < deadline) {
        reap();
        if (n_children) {
            struct timespec ts = {0, 10000000};
            nanosleep(&ts, NULL);
        }
    }
    for (size_t i = 0; i < n_children; ++i) kill(-children[i].pid, SIGKILL);
    while (n_children) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid < 0 && errno == EINTR) continue;
        if (pid < 0) { /* not ours any more: forget them all */
            while (n_children) forget_child(n_children - 1);
            break;
        }
        for (size_t i = 0; i < n_children; ++i)
            if (children[i].pid == pid) {
                forget_child(i);
                break;
            }
    }
}

static int serve_tcp(void) {
    int port = 0;
    int lfd = bind_listener(&port);
    if (lfd < 0) return 1;
    sessions = (volatile int*)mmap(NULL, sizeof(int), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    slots = (mr_session_slot*)mmap(NULL, (size_t)(mr_cfg.max_sessions + 1) * sizeof(mr_session_slot),
                                   PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sessions == MAP_FAILED || slots == MAP_FAILED || pipe2(listen_self_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
        mr_log_error("cannot start: %s", strerror(errno));
        return 1;
    }
    *sessions = 0;
    if (mr_cfg.token && !(throttle = mr_throttle_new())) {
        mr_log_error("cannot start: out of memory for the auth throttle");
        return 1;
    }
    set_handler(SIGTERM, on_listener_terminate);
    set_handler(SIGINT, on_listener_terminate);
    set_handler(SIGCHLD, on_listener_child);
    signal(SIGPIPE, SIG_IGN);
    printf("minrpc listening on %s:%d\n", mr_cfg.host, port);
    fflush(stdout);
    mr_log_info("serving key '%s' on %s:%d (target %s, max_sessions %d%s)", mr_cfg.key, mr_cfg.host, port,
                mr_cfg.target, mr_cfg.max_sessions, mr_cfg.token ? ", auth token required" : "");
    if (mr_cfg.tracker_host) {
        tracker = mr_tracker_new(mr_cfg.tracker_host, mr_cfg.tracker_port, mr_cfg.key, port, mr_cfg.custom_addr,
                                 mr_cfg.reg_token);
        if (!tracker) {
            mr_log_error("cannot register with the tracker %s:%d (out of memory)", mr_cfg.tracker_host, mr_cfg.tracker_port);
            return 1;
        }
    }
    int64_t backoff_until = 0;
    double tracker_due = 0;
    int64_t tracker_at = 0;
    struct pollfd* fds = NULL;
    size_t fds_cap = 0;
    size_t* polled = NULL; /* fds[first_pending + k] is pending[polled[k]] */
    while (!mr_terminate) {
        reap();
        int64_t now = mr_now_ns();
        if (tracker && now >= tracker_at) {
            tracker_due = mr_tracker_poll(tracker);
            if (!(tracker_due > 0)) tracker_due = 0.05;
            tracker_at = mr_now_ns() + (int64_t)(tracker_due * 1e9);
        }
        int64_t wait_ns = 1000000000LL;
        for (size_t i = n_pending; i-- > 0;) { /* deadlines, and CONNECTs whose auth-throttle turn came */
            mr_handshake* hs = pending[i];
            if (now >= hs->deadline_ns) {
                mr_handshake_expire(hs, &mr_cfg);
                close_pending(i);
            } else if (hs->stage == HS_WAIT && now >= hs->turn_ns) {
                advance(i, lfd);
            } else {
                int64_t due = (hs->stage == HS_WAIT ? hs->turn_ns : hs->deadline_ns) - now;
                if (due < wait_ns) wait_ns = due;
            }
        }
        size_t want = n_children + n_pending + 3;
        if (fds_cap < want) {
            size_t cap = want * 2;
            struct pollfd* grown = (struct pollfd*)realloc(fds, cap * sizeof(struct pollfd));
            if (grown) fds = grown;
            size_t* grown_polled = (size_t*)realloc(polled, cap * sizeof(size_t));
            if (grown_polled) polled = grown_polled;
            if (grown && grown_polled) fds_cap = cap;
        }
        size_t nfds = 0;
        fds[nfds++] = (struct pollfd){listen_self_pipe[0], POLLIN, 0};
        int listening = now >= backoff_until;
        if (listening) fds[nfds++] = (struct pollfd){lfd, POLLIN, 0};
        size_t first_child = nfds;
        for (size_t i = 0; i < n_children && nfds < fds_cap; ++i)
            if (children[i].status_fd >= 0) fds[nfds++] = (struct pollfd){children[i].status_fd, POLLIN, 0};
        size_t first_pending = nfds;
        for (size_t i = 0; i < n_pending && nfds < fds_cap; ++i)
            if (pending[i]->stage != HS_WAIT) { /* a CONNECT read waits for its turn: what follows is the session's */
                polled[nfds - first_pending] = i;
                fds[nfds++] = (struct pollfd){pending[i]->rfd, POLLIN, 0};
            }
        size_t probe_at = nfds; /* the OpenCL probe's pipe, while it runs */
        if (mr_cl_probe_fd() >= 0 && nfds < fds_cap) fds[nfds++] = (struct pollfd){mr_cl_probe_fd(), POLLIN, 0};
        if (tracker && tracker_at - now < wait_ns) wait_ns = tracker_at - now;
        if (!listening && backoff_until - now < wait_ns) wait_ns = backoff_until - now;
        if (wait_ns < 0) wait_ns = 0;
        int n = poll(fds, (nfds_t)nfds, (int)((wait_ns + 999999) / 1000000));
        if (n < 0) continue;
        if (fds[0].revents & POLLIN) {
            char sink[64];
            while (read(listen_self_pipe[0], sink, sizeof(sink)) > 0) {
            }
        }
        for (size_t k = first_child; k < first_pending; ++k) {
            if (!fds[k].revents) continue;
            for (size_t i = 0; i < n_children; ++i)
                if (children[i].status_fd == fds[k].fd) {
                    read_status(&children[i]);
                    break;
                }
        }
        if (probe_at < nfds && fds[probe_at].revents) mr_cl_count(); /* done: its list collected, the probe reaped */
        for (size_t k = probe_at; k-- > first_pending;) /* last first: a handshake that ends moves only later ones */
            if (fds[k].revents) advance(polled[k - first_pending], lfd);
        if (listening && (fds[1].revents & POLLIN)) {
            for (int accepted = 0; accepted < 64 && !mr_terminate; ++accepted) {
                struct sockaddr_storage addr;
                socklen_t len = sizeof(addr);
                int fd = accept4(lfd, (struct sockaddr*)&addr, &len, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (fd < 0) {
                    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                        if (n_pending) { /* the oldest handshake of the busiest address makes room */
                            evict(oldest_of_busiest());
                            continue;
                        }
                        mr_log_error("out of file descriptors or memory accepting connections (%s); waiting 100 ms",
                                     strerror(errno));
                        backoff_until = mr_now_ns() + 100000000LL; /* back off: the pending connection stays queued */
                    }
                    break;
                }
                accept_connection(fd, &addr, lfd);
            }
        }
    }
    while (n_pending) close_pending(n_pending - 1);
    free(polled);
    mr_log_info("stopping: ending %zu session process(es)", n_children);
    close(lfd);
    stop_children();
    if (tracker) mr_tracker_free(tracker);
    free(fds);
    return 0;
}

int main(int argc, char** argv) {
    parse_options(argc, argv);
    mr_cfg.token = take_env("WORKBENCH_RPC_TOKEN");
    mr_cfg.reg_token = take_env("WORKBENCH_REGISTRATION_TOKEN");
    if (mr_cfg.token || mr_cfg.reg_token) wb_guard_secrets(0); /* no process of this user reads ours */
    mr_cl_probe(); /* the OpenCL devices, listed by a forked child while the server starts (collected when first
                      needed): this process never starts a platform */
    if (mr_cfg.stdio) {
        /* the protocol goes to a copy of stdout; stdout itself goes to stderr, so a kernel's printf cannot
           corrupt the stream */
        int out = dup(1);
        if (out < 0 || dup2(2, 1) < 0) {
            mr_log_error("cannot set up stdio: %s", strerror(errno));
            return 1;
        }
        fcntl(out, F_SETFD, FD_CLOEXEC);
        signal(SIGPIPE, SIG_IGN);
        mr_handshake hs;
        mr_handshake_init(&hs, 0, out, 0, mr_now_ns() + (int64_t)(mr_cfg.handshake_timeout * 1e9));
        mr_session_args args;
        memset(&args, 0, sizeof(args));
        args.cfg = &mr_cfg;
        args.peer = "stdio";
        args.status_fd = -1;
        if (mr_handshake_run(&hs, &mr_cfg, &args.connect) == 0) mr_session_main(0, out, 0, &args);
        return MR_EXIT_STDIO_DONE;
    }
    return serve_tcp();
}
