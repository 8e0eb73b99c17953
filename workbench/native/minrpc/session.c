/*
 * session.c: one session process (docs/protocol.md sections 5, 7 and 8).
 *
 * Forked by the listener for each connection (or the process itself with --stdio), it:
 *   1. runs the handshake under one deadline (handshake_timeout, not renewed by each byte),
 *   2. checks CONNECT in the order of protocol.md's table (auth, key, constructor, timeout, max_sessions),
 *   3. creates the session workspace (mkdtemp under $TMPDIR, 0700),
 *   4. forks the worker, which sends the OK and serves the requests (requests.c),
 *   5. supervises it: session_timeout and idle_timeout (ERROR 9 notices), a client that hangs up while the
 *      worker is busy (the worker is killed), and the worker's death (ERROR 10 notice, sent without
 *      blocking: the worker says it ended the session on purpose in shared memory, never by exit status),
 *   6. removes the workspace and exits.
 */
#include "core.h"
#include "kernel_runtime.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TOKEN_ENV "WORKBENCH_RPC_TOKEN"

static int self_pipe[2] = {-1, -1};

static void wake(void) {
    int saved = errno;
    if (self_pipe[1] >= 0) {
        ssize_t w = write(self_pipe[1], "x", 1);
        (void)w;
    }
    errno = saved;
}

static void on_terminate(int sig) {
    (void)sig;
    mr_terminate = 1;
    wake();
}

static void on_child(int sig) {
    (void)sig;
    wake();
}

static void set_handler(int sig, void (*fn)(int)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = fn;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, NULL);
}

/* ---- handshake --------------------------------------------------------------------------------------- */
typedef struct {
    mr_conn* c;
    int refused; /* an ERROR was sent (or nothing can be said): the session does not start */
} handshake;

static void refuse(handshake* hs, int code, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
static void refuse(handshake* hs, int code, const char* fmt, ...) {
    char msg[MR_ERR_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    mr_log_info("refused: %s", msg);
    conn_send_error(hs->c, code, msg);
    hs->refused = 1;
}

static const char* signal_name(int sig) {
    switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGILL: return "SIGILL";
    case SIGKILL: return "SIGKILL";
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGHUP: return "SIGHUP";
    case SIGQUIT: return "SIGQUIT";
    case SIGPIPE: return "SIGPIPE";
    case SIGALRM: return "SIGALRM";
    case SIGUSR1: return "SIGUSR1";
    case SIGUSR2: return "SIGUSR2";
    case SIGTRAP: return "SIGTRAP";
    case SIGSYS: return "SIGSYS";
    case SIGXCPU: return "SIGXCPU";
    case SIGXFSZ: return "SIGXFSZ";
    case SIGVTALRM: return "SIGVTALRM";
    case SIGPROF: return "SIGPROF";
    default: return "SIG?";
    }
}

/* What to tell the client about a worker that ended with `status` without ending the session itself. */
static void death_notice(int status, char* out, size_t cap) {
    char what[256];
    const char* where = "most likely in the function it was running";
    if (WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) { /* a kernel's own SIGKILL is refused: from outside */
        snprintf(what, sizeof(what), "was killed by signal 9 (SIGKILL) from outside");
        where = "most likely by the system's out-of-memory killer (see `dmesg`) or a `kill -9`";
    } else if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        snprintf(what, sizeof(what), "was killed by signal %d (%s: %s)", sig, signal_name(sig), strsignal(sig));
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == MR_EXIT_STUCK) {
        snprintf(what, sizeof(what), "ended: the kernel it ran kept running two grace periods after the client "
                 "cancelled it, blocking the signal that stops it");
        where = "so the server ended the session rather than hold it forever";
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == MR_EXIT_LOST) {
        snprintf(what, sizeof(what), "exited with status %d: the code it ran closed the session's connection "
                 "(did it close every file descriptor?)", MR_EXIT_LOST);
    } else {
        snprintf(what, sizeof(what), "exited with status %d (did the code it ran call exit()?)",
                 WIFEXITED(status) ? WEXITSTATUS(status) : status);
    }
    snprintf(out, cap, "the session worker %s, %s; the server is still up: connect again to go on", what, where);
}

/* CONNECT's checks (workbench/rpc/wire/handshake.py check_connect, in that order). 0 and the options, or refused. */
static int check_connect(handshake* hs, int kind, const mp_node* opts, const uint8_t* nonce,
                         const mr_session_args* args, double* timeout, uint8_t* server_proof, int* has_proof) {
    const mr_config* cfg = args->cfg;
    const char* matchkey = args->matchkey;
    char a[300], b[300];
    *has_proof = 0;
    if (kind != K_CONNECT || opts->type != MP_MAP) {
        refuse(hs, MR_PROTOCOL, "expected a CONNECT message after HELLO, got kind %d%s", kind,
               kind == K_REGISTER ? ": a server started with is_proxy=True (--through-proxy) must connect to an RPC "
                                    "proxy (python -m workbench.exec.rpc_proxy), not to a server" : "");
        return -1;
    }
    if (cfg->token) {
        const mp_node* proof = mp_map_get(opts, "proof");
        int missing = !proof || proof->type == MP_NIL || ((proof->type == MP_BIN || proof->type == MP_STR) && !proof->len) ||
                      ((proof->type == MP_BOOL || proof->type == MP_INT) && proof->v.i == 0);
        if (missing) {
            refuse(hs, MR_AUTH, "this server requires an auth token: pass auth_token=... to rpc.connect or set %s on "
                   "the client", TOKEN_ENV);
            return -1;
        }
        uint8_t expected[32];
        mr_hmac_sha256(cfg->token, strlen(cfg->token), "workbench-rpc-v1", 16, nonce, MR_NONCE, expected);
        if (proof->type != MP_BIN || proof->len != 32 || !mr_equal_ct((const uint8_t*)proof->v.s, expected, 32)) {
            char more[128] = "";
            if (args->throttle) {
                double delay;
                int failures = mr_throttle_failed(args->throttle, args->addr, &delay);
                if (failures > 1)
                    snprintf(more, sizeof(more), " (wrong proof %d from this address: its next attempt waits %g s)",
                             failures, delay);
            }
            mr_log_error("wrong auth proof from %s", args->peer);
            refuse(hs, MR_AUTH, "wrong auth token: the client's %s / auth_token differs from the server's%s", TOKEN_ENV,
                   more);
            return -1;
        }
        if (args->throttle) mr_throttle_succeeded(args->throttle, args->addr);
        const mp_node* cnonce = mp_map_get(opts, "cnonce");
        if (cnonce && cnonce->type != MP_NIL) {
            if (cnonce->type != MP_BIN || cnonce->len != MR_NONCE) {
                refuse(hs, MR_PROTOCOL, "the client nonce (cnonce) must be %d bytes", MR_NONCE);
                return -1;
            }
            uint8_t both[2 * MR_NONCE];
            memcpy(both, nonce, MR_NONCE);
            memcpy(both + MR_NONCE, cnonce->v.s, MR_NONCE);
            mr_hmac_sha256(cfg->token, strlen(cfg->token), "workbench-rpc-v1-server", 23, both, sizeof(both),
                           server_proof);
            *has_proof = 1;
        }
    }
    /* the key: `opts.get("key") or ""` */
    const mp_node* key = mp_map_get(opts, "key");
    const char* client_key = "";
    if (key && !(key->type == MP_NIL || ((key->type == MP_STR || key->type == MP_BIN) && !key->len) ||
                 ((key->type == MP_BOOL || key->type == MP_INT) && key->v.i == 0) ||
                 (key->type == MP_FLOAT && key->v.f == 0) || ((key->type == MP_ARRAY || key->type == MP_MAP) && !key->len))) {
        if (key->type != MP_STR) {
            refuse(hs, MR_KEY_MISMATCH, "the key must be a string, not %s", mp_repr(key, a, sizeof(a), 0));
            return -1;
        }
        client_key = key->v.s;
    }
    py_repr_str(cfg->key, strlen(cfg->key), a, sizeof(a));
    if (matchkey) {
        if (strcmp(client_key, matchkey) != 0) {
            refuse(hs, MR_KEY_MISMATCH, "this server of key %s is handed out by a tracker: request it with "
                   "rpc.connect_tracker(host, port).request(%s)", a, a);
            return -1;
        }
    } else if (*cfg->key && *client_key) {
        const char* colon = strchr(client_key, ':');
        size_t n = colon ? (size_t)(colon - client_key) : strlen(client_key);
        if (n != strlen(cfg->key) || strncmp(client_key, cfg->key, n) != 0) {
            refuse(hs, MR_KEY_MISMATCH, "this server serves key %s, the client asked for %s", a,
                   py_repr_str(client_key, strlen(client_key), b, sizeof(b)));
            return -1;
        }
    }
    /* the session constructor: nil (or empty) and ["rpc.LocalSession"] */
    const mp_node* ctor = mp_map_get(opts, "ctor");
    int ctor_empty = !ctor || ctor->type == MP_NIL || ((ctor->type == MP_ARRAY || ctor->type == MP_STR ||
                     ctor->type == MP_BIN || ctor->type == MP_MAP) && !ctor->len) ||
                     ((ctor->type == MP_BOOL || ctor->type == MP_INT) && ctor->v.i == 0) ||
                     (ctor->type == MP_FLOAT && ctor->v.f == 0);
    if (!ctor_empty) {
        const mp_node* name = ctor->type == MP_ARRAY ? &ctor->v.items[0] : ctor;
        int local = ctor->type == MP_ARRAY && name->type == MP_STR && strcmp(name->v.s, "rpc.LocalSession") == 0 &&
                    name->len == strlen("rpc.LocalSession");
        if (!local) {
            int nested = ctor->type == MP_ARRAY && name->type == MP_STR && strcmp(name->v.s, "rpc.Connect") == 0;
            refuse(hs, MR_UNSUPPORTED, "session constructor %s is not supported by this server (minrpc; supported: "
                   "rpc.LocalSession)%s", mp_repr(name, b, sizeof(b), 100),
                   nested ? ": minrpc does not relay sessions; connect to the inner server directly, or through a "
                            "Python server (python -m workbench.exec.rpc_server)" : "");
            return -1;
        }
    }
    /* the session timeout: `opts.get("timeout") or 0`, a number from 0 to a year */
    const mp_node* t = mp_map_get(opts, "timeout");
    *timeout = 0;
    if (t && t->type != MP_NIL) {
        int numeric = t->type == MP_INT || t->type == MP_UINT || t->type == MP_FLOAT;
        double v = t->type == MP_INT ? (double)t->v.i : t->type == MP_UINT ? (double)t->v.u : t->v.f;
        int falsy = (t->type == MP_BOOL && !t->v.i) || (numeric && v == 0) ||
                    ((t->type == MP_STR || t->type == MP_BIN || t->type == MP_ARRAY || t->type == MP_MAP) && !t->len);
        if (!falsy) {
            if (!numeric || !(v >= 0 && v <= MR_MAX_SESSION_TIMEOUT)) {
                refuse(hs, MR_PROTOCOL, "session_timeout must be a number >= 0 and at most 31536000 seconds (one year; "
                       "0 means no limit), not %s", mp_repr(t, b, sizeof(b), 0));
                return -1;
            }
            *timeout = v;
        }
    }
    return 0;
}

/* Read the preamble and CONNECT under the handshake deadline; returns 0 with the session's options. */
static int run_handshake(handshake* hs, const mr_session_args* args, double* timeout, uint8_t* proof, int* has_proof,
                         mp_arena* arena) {
    const mr_config* cfg = args->cfg;
    mr_conn* c = hs->c;
    c->deadline_ns = mr_now_ns() + (int64_t)(cfg->handshake_timeout * 1e9);
    if (conn_fill(c, 8)) return -1; /* not even a preamble: nothing to say */
    uint8_t pre[8];
    memcpy(pre, c->buf + c->start, 8);
    c->start += 8;
    static const uint8_t ours[8] = {'W', 'B', 'R', 'P', 1, 0, 0, 0};
    struct iovec v = {(void*)ours, 8};
    if (conn_writev(c, &v, 1)) return -1; /* always answered first: the client learns our version */
    int version = pre[4] | pre[5] << 8, flags = pre[6] | pre[7] << 8;
    char shown[64];
    if (memcmp(pre, "WBRP", 4) != 0) {
        refuse(hs, MR_PROTOCOL, "bad magic %s: this is an rpc-workbench server (protocol v1); connect with "
               "workbench.rpc.connect (a TVM client cannot talk to it directly)", py_repr_bytes(pre, 4, shown, sizeof(shown)));
        return -1;
    }
    if (version != MR_VERSION) {
        refuse(hs, MR_PROTOCOL, "the client speaks protocol version %d, this server speaks 1: install the same "
               "rpc-workbench version on both sides", version);
        return -1;
    }
    if (flags & MR_FLAG_SERVER) {
        refuse(hs, MR_PROTOCOL, "this is an RPC server, not a proxy: a server started with is_proxy=True "
               "(--through-proxy) must connect to an RPC proxy (python -m workbench.exec.rpc_proxy); rpc_server and "
               "rpc_proxy both default to port 9090, so give one of them another --port");
        return -1;
    }
    uint8_t nonce[MR_NONCE];
    if (mr_random(nonce, sizeof(nonce))) {
        refuse(hs, MR_BUSY, "server busy: it cannot read random bytes for the handshake's nonce; try again later");
        return -1;
    }
    conn_begin(c);
    mp_put_map(&c->out, 3);
    mp_put_cstr(&c->out, "version");
    mp_put_int(&c->out, MR_VERSION);
    mp_put_cstr(&c->out, "nonce");
    mp_put_bin(&c->out, nonce, MR_NONCE);
    mp_put_cstr(&c->out, "auth");
    mp_put_bool(&c->out, cfg->token != NULL);
    if (conn_finish(c, K_HELLO, NULL, 0)) return -1;
    /* CONNECT */
    if (conn_fill(c, MR_HEADER)) goto io_failed;
    const uint8_t* h = c->buf + c->start;
    uint64_t ctrl_len = (uint64_t)h[0] | (uint64_t)h[1] << 8 | (uint64_t)h[2] << 16 | (uint64_t)h[3] << 24;
    int kind = h[4] | h[5] << 8;
    uint64_t bulk_len = 0;
    for (int i = 7; i >= 0; --i) bulk_len = (bulk_len << 8) | h[8 + i];
    if (ctrl_len > MR_MAX_CTRL) {
        refuse(hs, MR_TOO_LARGE, "control part of %llu bytes is over the %llu-byte limit (is the peer speaking the "
               "workbench protocol?)", (unsigned long long)ctrl_len, (unsigned long long)MR_MAX_CTRL);
        return -1;
    }
    if (bulk_len > MR_MAX_BULK) {
        refuse(hs, MR_TOO_LARGE, "bulk part of %llu bytes is over the %llu-byte limit", (unsigned long long)bulk_len,
               (unsigned long long)MR_MAX_BULK);
        return -1;
    }
    if (ctrl_len > MR_MAX_CONNECT_CTRL) {
        refuse(hs, MR_TOO_LARGE, "a %llu-byte message where CONNECT was expected is over the handshake's %d-byte limit",
               (unsigned long long)ctrl_len, MR_MAX_CONNECT_CTRL);
        return -1;
    }
    if (ctrl_len == 0) {
        refuse(hs, MR_PROTOCOL, "malformed control message: an empty control part");
        return -1;
    }
    c->start += MR_HEADER;
    if (conn_fill(c, (size_t)ctrl_len)) goto io_failed;
    mp_node* opts;
    char perr[512];
    int parsed = mp_parse(c->buf + c->start, (size_t)ctrl_len, arena, &opts, perr, sizeof(perr));
    c->start += (size_t)ctrl_len;
    if (parsed) {
        refuse(hs, MR_PROTOCOL, "%s", perr);
        return -1;
    }
    if (bulk_len && conn_discard(c, bulk_len)) goto io_failed; /* a bulk part on CONNECT means nothing */
    if (cfg->token && args->throttle) { /* after wrong proofs from this address, CONNECTs wait their turn */
        int64_t turn;
        while ((turn = mr_throttle_turn(args->throttle, args->addr)) != 0) {
            if (turn > c->deadline_ns || mr_terminate) {
                c->err = ETIMEDOUT;
                goto io_failed;
            }
            int64_t wait = turn - mr_now_ns();
            struct timespec ts = {(time_t)(wait / 1000000000LL), (long)(wait % 1000000000LL)};
            if (wait > 0) nanosleep(&ts, NULL);
        }
    }
    c->deadline_ns = 0;
    return check_connect(hs, kind, opts, nonce, args, timeout, proof, has_proof);
io_failed:
    if (c->err == ETIMEDOUT)
        refuse(hs, MR_PROTOCOL, "the handshake did not complete within %g s (the server's handshake_timeout); "
               "closing this connection", cfg->handshake_timeout);
    return -1;
}

/* ---- the session ----------------------------------------------------------------------------------------- */
static void end_connection(int rfd, int wfd, int is_socket) {
    if (is_socket) shutdown(rfd, SHUT_RDWR); /* whoever else holds the descriptor: the client sees the end */
    close(rfd);
    if (wfd != rfd) close(wfd);
}

/* Kill the worker and reap it. */
static void kill_worker(pid_t pid, int* status) {
    kill(pid, SIGKILL);
    while (waitpid(pid, status, 0) < 0 && errno == EINTR) {
    }
}

/* When the server is full (or this client's address holds its share: same_address): ask the session idle
   longest (of this address), if for preempt_idle at least, to give its slot up; it ends itself at once and
   tells its client why, and this returns once it has (2 s at most).  1 if one was asked. */
static int preempt_idle_session(const mr_session_args* args, int same_address) {
    const mr_config* cfg = args->cfg;
    if (!args->slots || cfg->preempt_idle <= 0 || cfg->tracker_host) return 0;
    int64_t now = mr_now_ns(), oldest = 0;
    mr_session_slot* pick = NULL;
    for (int i = 0; i <= cfg->max_sessions; ++i) {
        mr_session_slot* slot = &args->slots[i];
        int64_t since = slot->idle_since_ns;
        if (same_address && memcmp(slot->addr, args->addr, 16)) continue;
        if (slot->pid && !slot->preempt && since && now - since >= (int64_t)(cfg->preempt_idle * 1e9) &&
            (!pick || since < oldest))
            pick = slot, oldest = since;
    }
    int32_t no = 0;
    if (!pick || !__atomic_compare_exchange_n(&pick->preempt, &no, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return 0;
    int32_t victim = pick->pid;
    kill(victim, SIGUSR1); /* wake it: it ends its session now, not at its next look */
    for (int i = 0; i < 2000 && pick->pid == victim; ++i) { /* until it has told its client (2 s at most) */
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
    }
    return 1;
}

int mr_session_main(int rfd, int wfd, int is_socket, const mr_session_args* args) {
    const mr_config* cfg = args->cfg;
    mr_conn c;
    conn_init(&c, rfd, wfd, is_socket);
    if (pipe(self_pipe) == 0) {
        for (int i = 0; i < 2; ++i) {
            fcntl(self_pipe[i], F_SETFL, O_NONBLOCK);
            fcntl(self_pipe[i], F_SETFD, FD_CLOEXEC);
        }
    }
    set_handler(SIGTERM, on_terminate);
    set_handler(SIGINT, on_terminate);
    set_handler(SIGCHLD, on_child);
    set_handler(SIGUSR1, on_child); /* another session process asks for this one's slot (preempt_idle_session) */
    signal(SIGPIPE, SIG_IGN);

    handshake hs = {&c, 0};
    mp_arena arena = {0};
    double timeout = 0;
    uint8_t proof[32];
    int has_proof = 0;
    int ok = run_handshake(&hs, args, &timeout, proof, &has_proof, &arena) == 0;
    mp_arena_free(&arena);
    if (!ok) {
        end_connection(rfd, wfd, is_socket);
        return 0;
    }
    /* max_sessions (the listener counts sessions in shared memory; with a tracker, one at a time) */
    int counted = 0;
    mr_session_slot* mine = NULL;
    if (args->sessions) {
        int limit = cfg->tracker_host ? 1 : cfg->max_sessions;
        int share = limit - limit / 4, held = 0; /* one address: all but a quarter of the slots */
        for (int i = 0; args->slots && i <= cfg->max_sessions; ++i)
            held += args->slots[i].pid && !args->slots[i].preempt && !memcmp(args->slots[i].addr, args->addr, 16);
        int preempted = share < limit && held >= share && preempt_idle_session(args, 1);
        if (share < limit && held >= share && !preempted) {
            char host[64];
            const char* colon = strrchr(args->peer, ':');
            snprintf(host, sizeof(host), "%.*s", colon ? (int)(colon - args->peer) : (int)strlen(args->peer), args->peer);
            refuse(&hs, MR_BUSY, "server busy: your address (%s) holds %d sessions, its share of the %d (max_sessions; "
                   "the rest stay for other addresses); close one first", host, held, limit);
            end_connection(rfd, wfd, is_socket);
            return 0;
        }
        int running = __atomic_fetch_add(args->sessions, 1, __ATOMIC_SEQ_CST);
        if (running >= limit && (preempted || preempt_idle_session(args, 0))) running = limit - 1; /* a slot comes free */
        if (running >= limit) {
            __atomic_fetch_sub(args->sessions, 1, __ATOMIC_SEQ_CST);
            refuse(&hs, MR_BUSY, "server busy: %d sessions are running, the most it takes (max_sessions=%d); try again "
                   "later, or start the server with a larger max_sessions (--max-sessions)", running, limit);
            end_connection(rfd, wfd, is_socket);
            return 0;
        }
        counted = 1;
        for (int i = 0; args->slots && !mine && i <= cfg->max_sessions; ++i) {
            int32_t free_slot = 0;
            if (__atomic_compare_exchange_n(&args->slots[i].pid, &free_slot, (int32_t)getpid(), 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST)) {
                mine = &args->slots[i];
                mine->preempt = 0;
                mine->idle_since_ns = 0;
                memcpy(mine->addr, args->addr, 16);
            }
        }
    }
    /* the workspace */
    const char* tmp = getenv("TMPDIR");
    char base[4096];
    snprintf(base, sizeof(base), "%s/wb-session-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    mr_workspace ws;
    if (!mkdtemp(base) || ws_open(&ws, base) != 0) {
        int e = errno;
        mr_remove_tree(base);
        refuse(&hs, MR_BUSY, "server busy: it cannot create a session workspace (%s); try again later", strerror(e));
        if (counted) __atomic_fetch_sub(args->sessions, 1, __ATOMIC_SEQ_CST);
        end_connection(rfd, wfd, is_socket);
        return 0;
    }
    if (args->status_fd >= 0) { /* tell the listener: a session started, and where its workspace is */
        char line[4200];
        int n = snprintf(line, sizeof(line), "S%s\n", ws.base);
        ssize_t w = write(args->status_fd, line, (size_t)n);
        (void)w;
    }
    mr_shared* shared = (mr_shared*)mmap(NULL, sizeof(mr_shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    pid_t pid = -1;
    int fork_errno = 0;
    if (shared == MAP_FAILED) fork_errno = errno;
    else if ((pid = fork()) < 0) fork_errno = errno;
    if (pid < 0) {
        mr_remove_tree(ws.base);
        refuse(&hs, MR_BUSY, "server busy: it cannot start a session worker (%s); try again later", strerror(fork_errno));
        end_connection(rfd, wfd, is_socket);
        return 0;
    }
    if (pid == 0) { /* the worker */
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        signal(SIGUSR1, SIG_DFL);
        signal(SIGXFSZ, SIG_IGN); /* a write over a file-size limit fails with EFBIG: an error reply, not a death */
        close(self_pipe[0]);
        close(self_pipe[1]);
        if (args->status_fd >= 0) close(args->status_fd);
        setvbuf(stderr, NULL, _IOLBF, 0);
        if (cfg->token || cfg->reg_token) { /* the kernels this worker runs find no copy, nor a way to its parent's */
            const char* secrets[2] = {cfg->token ? cfg->token : "", cfg->reg_token ? cfg->reg_token : ""};
            int64_t lengths[2] = {(int64_t)strlen(secrets[0]), (int64_t)strlen(secrets[1])};
            if (wb_guard_secrets(1) != 0 || wb_scrub_secrets(secrets, lengths, 2) < 0)
                mr_log_error("could not put the server's tokens out of the kernels' reach: %s", strerror(errno));
        }
        mr_worker_run(&c, &ws, shared, cfg, timeout, has_proof ? proof : NULL);
        shared->ended = 1; /* the session ended on purpose: nothing to report */
        _exit(0);
    }
    mr_log_info("session %s started (worker %d)", args->peer, (int)pid);

    /* supervise the worker */
    int64_t start = mr_now_ns();
    int64_t session_deadline = timeout > 0 ? start + (int64_t)(timeout * 1e9) : 0;
    int64_t idle_ns = cfg->idle_timeout > 0 ? (int64_t)(cfg->idle_timeout * 1e9) : 0;
    unsigned long seen = (unsigned long)-1;
    int64_t since = start;
    int watch_conn = 1, hung_up = 0;
    unsigned long busy_seen = 0;
    int status = 0, notice_code = 0;
    char notice[1024] = "";
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) break;
        if (mr_terminate) { /* the server stops: end the session */
            kill_worker(pid, &status);
            shared->ended = 1;
            break;
        }
        int64_t now = mr_now_ns();
        if (session_deadline && now >= session_deadline) {
            kill_worker(pid, &status);
            notice_code = MR_SESSION_TIMEOUT;
            snprintf(notice, sizeof(notice), "session timed out after %g s (session_timeout=%g); the server ended it: "
                     "connect again, with a larger session_timeout if needed", timeout, timeout);
            break;
        }
        unsigned long activity = shared->activity;
        if (activity != seen || !(activity & 1)) {
            seen = activity;
            since = now;
        }
        if (mine) {
            mine->idle_since_ns = activity & 1 ? shared->idle_since_ns : 0;
            if (mine->preempt) {
                kill_worker(pid, &status);
                notice_code = MR_SESSION_TIMEOUT;
                double idle = (now - shared->idle_since_ns) / 1e9;
                char how_long[32];
                if (idle >= 120) snprintf(how_long, sizeof(how_long), "%.0f min", idle / 60);
                else snprintf(how_long, sizeof(how_long), "%.0f s", idle);
                snprintf(notice, sizeof(notice), "the session was idle for %s and another client needed its slot "
                         "(max_sessions=%d), so the server ended it: its tensors and modules are gone. Connect again "
                         "(a server keeps idle sessions while nobody waits; preempt_idle=%g s)", how_long,
                         cfg->max_sessions, cfg->preempt_idle);
                break;
            }
        }
        if (activity == seen && (activity & 1) && idle_ns && now - since >= idle_ns) {
            kill_worker(pid, &status);
            notice_code = MR_SESSION_TIMEOUT;
            snprintf(notice, sizeof(notice), "the session was idle for %g s (the server's idle_timeout) and the server "
                     "ended it: connect again", cfg->idle_timeout);
            break;
        }
        if (hung_up) { /* the client is gone: a worker busy with the same request twice in a row is stopped */
            if (!(activity & 1) && activity == busy_seen) {
                kill_worker(pid, &status);
                shared->ended = 1; /* nobody to tell */
                break;
            }
            busy_seen = activity & 1 ? 0 : activity;
        }
        int64_t wait_ns = 1000000000LL;
        if (session_deadline && session_deadline - now < wait_ns) wait_ns = session_deadline - now;
        if (idle_ns) {
            int64_t step = idle_ns / 8 < 10000000 ? 10000000 : idle_ns / 8;
            if (step < wait_ns) wait_ns = step;
        }
        if (hung_up && wait_ns > 200000000) wait_ns = 200000000;
        struct pollfd p[2] = {{self_pipe[0], POLLIN, 0}, {rfd, POLLRDHUP, 0}};
        int n = poll(p, watch_conn ? 2 : 1, (int)((wait_ns + 999999) / 1000000));
        if (n > 0 && (p[0].revents & POLLIN)) {
            char sink[64];
            while (read(self_pipe[0], sink, sizeof(sink)) > 0) {
            }
        }
        if (n > 0 && watch_conn && (p[1].revents & (POLLRDHUP | POLLHUP | POLLERR))) {
            watch_conn = 0; /* the client hung up: the worker sees the end itself when it is waiting */
            hung_up = 1;
            busy_seen = shared->activity & 1 ? 0 : shared->activity;
        }
    }
    if (mr_terminate) notice_code = 0; /* the server stops: the connection just ends */
    else if (!notice_code && !shared->ended) {
        notice_code = MR_WORKER_DIED;
        death_notice(status, notice, sizeof(notice));
    }
    int was_sending = shared->sending;
    mr_remove_tree(ws.base); /* before the notice goes out */
    if (notice_code) {
        mr_log_info("session %s: %s", args->peer, notice);
        if (!was_sending) conn_send_error_nowait(wfd, is_socket, notice_code, notice);
    } else {
        mr_log_info("session %s ended", args->peer);
    }
    if (mine) { /* the slot is free again (after the notice: a session that preempted this one waits for it) */
        mine->idle_since_ns = 0;
        __atomic_store_n(&mine->pid, 0, __ATOMIC_SEQ_CST);
    }
    ws_close(&ws);
    munmap(shared, sizeof(mr_shared));
    end_connection(rfd, wfd, is_socket);
    conn_free(&c);
    return 0;
}
