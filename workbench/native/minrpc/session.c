/*
 * session.c: one session process (docs/protocol.md sections 5, 7 and 8).
 *
 * Forked by the listener for each connection whose CONNECT passed its checks (handshake.c), or the process
 * itself with --stdio, it:
 *   1. takes a session slot (max_sessions, the per-address share; an idle session may have to yield its own),
 *   2. creates the session workspace (mkdtemp under $TMPDIR, 0700),
 *   3. forks the worker, which sends the OK and serves the requests (requests.c),
 *   4. supervises it: session_timeout and idle_timeout (ERROR 9 notices), a client that hangs up while the
 *      worker is busy (the worker is killed), and the worker's death (ERROR 10 notice, sent without
 *      blocking: the worker says it ended the session on purpose in shared memory, never by exit status),
 *   5. removes the workspace and exits.
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

static int tvm_session; /* the client speaks TVM's protocol: refusals and notices are its EXCEPTION packets */

/* Refuse a handshaken client (server busy): ERROR [code, msg]. */
static void refuse(mr_conn* c, int code, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
static void refuse(mr_conn* c, int code, const char* fmt, ...) {
    char msg[MR_ERR_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    mr_log_info("refused: %s", msg);
    mr_notice_nowait(c->wfd, c->is_socket, tvm_session, code, msg);
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
    double timeout = args->connect.timeout;
    tvm_session = args->connect.tvm;
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
            refuse(&c, MR_BUSY, "server busy: your address (%s) holds %d sessions, its share of the %d (max_sessions; "
                   "the rest stay for other addresses); close one first", host, held, limit);
            end_connection(rfd, wfd, is_socket);
            return 0;
        }
        int running = __atomic_fetch_add(args->sessions, 1, __ATOMIC_SEQ_CST);
        if (running >= limit && (preempted || preempt_idle_session(args, 0))) running = limit - 1; /* a slot comes free */
        if (running >= limit) {
            __atomic_fetch_sub(args->sessions, 1, __ATOMIC_SEQ_CST);
            refuse(&c, MR_BUSY, "server busy: %d sessions are running, the most it takes (max_sessions=%d); try again "
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
        refuse(&c, MR_BUSY, "server busy: it cannot create a session workspace (%s); try again later", strerror(e));
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
        refuse(&c, MR_BUSY, "server busy: it cannot start a session worker (%s); try again later", strerror(fork_errno));
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
        mr_worker_run(&c, &ws, shared, cfg, timeout, args->connect.has_proof ? args->connect.proof : NULL,
                      args->connect.tvm);
        shared->ended = 1; /* the session ended on purpose: nothing to report */
        _exit(0);
    }
    mr_log_info("session %s started (worker %d)%s", args->peer, (int)pid, tvm_session ? ", TVM's protocol" : "");

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
        if (!was_sending) mr_notice_nowait(wfd, is_socket, tvm_session, notice_code, notice);
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
