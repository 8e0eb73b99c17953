/*
 * core.h: what the core files of minrpc share (minrpc.h is the contract with the device files).
 *
 *   main.c       options, the TCP listener or stdio, a session process per session, the tracker loop
 *   handshake.c  the handshake, read without blocking (in the listener's event loop), and CONNECT's checks
 *   session.c    one session process: slots, workspace, the worker, its supervision and notices
 *   requests.c   the worker: the request loop and every request of protocol.md section 6
 *   tvm.c        TVM's RPC protocol (protocol.md section 13): its handshake checks, its packets, and a worker
 *                loop that serves them with requests.c's operations
 *   workspace.c  the session workspace: confined paths, directories, removal
 *   conn.c       frames over a socket or a pair of pipes
 *   msgpack.c    control parts
 */
#ifndef MINRPC_CORE_H
#define MINRPC_CORE_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#include "minrpc.h"
#include "msgpack.h"

/* ---- protocol constants (docs/protocol.md) ----------------------------------------------------- */
#define MR_VERSION 1
#define MR_HEADER 16
#define MR_MAX_CTRL ((uint64_t)16 << 20)
#define MR_MAX_BULK ((uint64_t)1 << 40)
#define MR_MAX_CONNECT_CTRL (64 << 10)
#define MR_NONCE 32
#define MR_FLAG_NO_REPLY 1
#define MR_FLAG_SERVER 1
#define MR_MAX_SESSION_TIMEOUT 31536000.0

enum {
    K_OK = 0, K_ERROR = 1, K_HELLO = 2, K_CONNECT = 3, K_REGISTER = 4, K_PROXY_CONNECT = 5,
    K_PING = 16, K_UPLOAD, K_DOWNLOAD, K_REMOVE, K_LISTDIR, K_LOAD_MODULE, K_LINK_MODULE, K_GET_FUNCTION,
    K_MODULE_FUNCTION, K_CALL, K_TENSOR_ALLOC, K_TENSOR_WRITE, K_TENSOR_READ, K_FREE, K_TIME_EVAL, K_SYSTEM_LIB,
    K_CANCEL = 32, /* no reply: stop the running request (docs/protocol.md section 12) */
};

/* docs/protocol.md section 12: a call still running this long after CANCEL is stopped; a kernel that
   crashes MR_CRASH_LIMIT times within MR_CRASH_WINDOW_NS ends the session. */
#define MR_CANCEL_GRACE_MS 2000
#define MR_CRASH_LIMIT 3
#define MR_CRASH_WINDOW_NS (10LL * 1000000000LL)

/* Exit statuses of a worker (the session process learns a clean end from shared memory, not from these). */
#define MR_EXIT_LOST 89 /* the session's connection was closed under the worker (by the code it ran) */
#define MR_EXIT_STUCK 90 /* a cancelled kernel ignored the interrupts (kernel_runtime.h WB_EXIT_STUCK) */
/* How a stdio server exits (as python -m workbench.rpc.server.worker --stdio): PopenSession reads 86 as "the session
   ended, nothing to report", where any other status of a server that went away is reported as its death. */
#define MR_EXIT_STDIO_DONE 86

/* ---- configuration (main.c) ---------------------------------------------------------------------- */
/* The options main.c parses; it keeps the one instance to itself and hands the session a pointer
   (mr_session_args.cfg), which passes it on to the worker (mr_worker_run). */
typedef struct {
    const char* host;
    int port, port_end;
    const char* key;
    const char* tracker_host;
    int tracker_port;
    const char* custom_addr;
    const char* cc;
    int max_sessions;
    double idle_timeout;      /* 0: off */
    double preempt_idle;      /* a session idle this long yields its slot to a client that would be refused; 0: off */
    double handshake_timeout; /* seconds */
    int silent;
    int stdio;
    char* token;     /* WORKBENCH_RPC_TOKEN, or NULL */
    char* reg_token; /* WORKBENCH_REGISTRATION_TOKEN, or NULL */
    const char* target;
    /* per-session quotas, 0: no limit (docs/protocol.md, "Quotas"; workbench/runtime/quota.py) */
    uint64_t max_workspace_bytes; /* --max-workspace-bytes: files of the workspace, private copies included */
    uint64_t max_workspace_files; /* --max-workspace-files: its files and directories */
    uint64_t max_tensor_bytes;    /* --max-tensor-bytes: the tensors the client allocated */
    int allow_tvm_clients;        /* --allow-tvm-clients: TVM's clients (who cannot prove a token) are let in */
} mr_config;

#define MR_DEFAULT_WORKSPACE_BYTES ((uint64_t)4 << 30)
#define MR_DEFAULT_WORKSPACE_FILES 10000
#define MR_PREALLOCATE_MIN ((uint64_t)1 << 20) /* uploads from this size get their extent before they land */
#define MR_PREALLOCATE_WINDOW ((uint64_t)64 << 20) /* ... a window at a time (workspace.PREALLOCATE_WINDOW) */
/* A quota option's value: bytes, or a number with a binary suffix K, M, G, T, P ("iB"/"B" allowed): "512M",
   "4G", "1.5k"; 0 is no limit. 0, or -1 if malformed (workspace.c). */
int mr_parse_size(const char* text, uint64_t* out);
/* The default --max-tensor-bytes: half this machine's memory, or of its cgroup's limit; 0 if unknown. */
uint64_t mr_default_tensor_bytes(void);

/* The one global the units share: set by the SIGTERM/SIGINT handlers (the listener's in main.c, a session
   process's in session.c), which can reach nothing but a static flag, and checked by the listener loop, the
   session's handshake and supervision, and conn.c's blocking reads (which give up with EINTR once it is set).
   Defined in main.c. */
extern volatile sig_atomic_t mr_terminate;

/* Log one line to stderr ("minrpc[pid]: ..."); info lines are dropped with --silent. */
void mr_log_info(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void mr_log_error(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

int64_t mr_now_ns(void);

/* ---- conn.c: frames over a stream --------------------------------------------------------------- */
typedef struct {
    int rfd, wfd;
    int is_socket;
    uint8_t* buf; /* receive buffer: buf[start..end) not yet consumed */
    size_t cap, start, end;
    int64_t deadline_ns; /* > 0: reads wait at most until then (the handshake) */
    int err;             /* why the last call failed: 0 = the peer closed, else an errno */
    int splice_pipe[2];  /* socket -> file without a copy through user space */
    int loopback;        /* a TCP peer on this machine: bulk receives wake per batch, sends unpaced (conn_init) */
    uint8_t* scratch;    /* bulk on its way to a file, when splice cannot be used */
    size_t scratch_cap;
    mp_buf out; /* the reply being built: MR_HEADER bytes of room, then the control part */
} mr_conn;

void conn_init(mr_conn* c, int rfd, int wfd, int is_socket);
void conn_free(mr_conn* c);
/* Make at least n bytes available in c->buf (n <= c->cap): 0, or -1 (c->err). */
int conn_fill(mr_conn* c, size_t n);
/* Read exactly n bytes into dst (buffered bytes first, then straight from the stream). */
int conn_read_exact(mr_conn* c, void* dst, uint64_t n);
/* Read and drop n bytes. */
int conn_discard(mr_conn* c, uint64_t n);
/* Move n stream bytes into the file fd. A failed write is kept in *write_errno (the rest is read and dropped):
   returns -1 only when reading fails. */
int conn_bulk_to_fd(mr_conn* c, int fd, uint64_t n, int* write_errno);
/* Write all of iov (a frame): 0, or -1 (c->err). */
int conn_writev(mr_conn* c, struct iovec* iov, int n);
/* Send count bytes of the file fd from its start. */
int conn_sendfile(mr_conn* c, int fd, uint64_t count);

/* Start a reply / message in c->out: room for the header; then mp_put_* the control part. */
void conn_begin(mr_conn* c);
/* Finish the message begun with conn_begin and send it with `bulk_len` bytes of bulk from `bulk` (NULL: none,
   or the caller sends them right after: pass bulk NULL and a bulk_len). */
int conn_finish(mr_conn* c, int kind, const void* bulk, uint64_t bulk_len);
/* Build and send ERROR [code, msg]. */
int conn_send_error(mr_conn* c, int code, const char* msg);
/* Send ERROR [code, msg] without blocking (notices): what does not fit is dropped. */
void conn_send_error_nowait(int fd, int is_socket, int code, const char* msg);
/* Send n bytes without blocking: what does not fit is dropped. */
void conn_send_nowait(int fd, int is_socket, const void* data, size_t n);
/* The 16-byte header. */
void mr_put_header(uint8_t* p, uint32_t ctrl_len, uint16_t kind, uint16_t flags, uint64_t bulk_len);

/* ---- workspace.c --------------------------------------------------------------------------------- */
typedef struct {
    char* base;    /* the mkdtemp directory (realpath) */
    char* root;    /* base/files: what the client sees */
    char* private_dir; /* base/lib: private copies of loaded modules */
    unsigned serial;
    uint64_t max_bytes, max_files;   /* quotas (0: none), from ws_set_quotas */
    uint64_t used_bytes, used_files; /* what files/ and lib/ hold: bytes of files, files and directories */
} mr_workspace;

/* Create base/files and base/lib in the existing directory base: 0, or -1 (errno). */
int ws_open(mr_workspace* ws, const char* base);
void ws_close(mr_workspace* ws);
/* A new private path for `name` (malloc'ed): base/lib/<n>-<basename>. */
char* ws_private_path(mr_workspace* ws, const char* name);
/* The absolute path of a client path (malloc'ed), or NULL with err (BAD_REQUEST / PATH_DENIED). */
char* ws_resolve(mr_workspace* ws, const mp_node* path, mr_error* err);
/* Create the directories above `full` (inside the workspace). */
int ws_make_parents(const mr_workspace* ws, const char* full);
/* Remove a file or a directory tree (not following symlinks): 0, or -1 (errno). */
int mr_remove_tree(const char* path);
/* Quotas (as workbench/runtime/workspace.py): set them (0: none) and count what the workspace holds. */
void ws_set_quotas(mr_workspace* ws, uint64_t max_bytes, uint64_t max_files);
/* Bytes (of files and links) and entries (files, links, directories) of the tree at path, itself included. */
void ws_tree_usage(const char* path, uint64_t* bytes, uint64_t* entries);
/* 0 if add_bytes more bytes (freed_bytes fewer) and add_files more entries fit; else -1 with err (BAD_REQUEST
   naming the quota), `what_bytes` / `what_files` naming the request ("upload of 1.0 GiB to 'x'"). */
int ws_check_room(const mr_workspace* ws, const char* what_bytes, const char* what_files, uint64_t add_bytes,
                  uint64_t freed_bytes, uint64_t add_files, mr_error* err);
/* Count bytes and entries written (negative: removed). */
void ws_charge(mr_workspace* ws, int64_t bytes, int64_t files);
/* How many directories above `full` (inside the workspace root) do not exist yet. */
uint64_t ws_missing_dirs(const mr_workspace* ws, const char* full);

/* ---- throttle.c: wrong auth proofs slow down their address ------------------------------------------- */
typedef struct mr_throttle mr_throttle;
/* A table in memory shared with the session processes forked later; NULL when out of memory. */
mr_throttle* mr_throttle_new(void);
/* 0: a CONNECT from addr is evaluated now (and the next one waits its delay); else the mr_now_ns() time its
   turn comes. */
int64_t mr_throttle_turn(mr_throttle* t, const uint8_t addr[16]);
/* A wrong proof from addr: its number of wrong proofs, and *delay_s its next attempt waits. */
int mr_throttle_failed(mr_throttle* t, const uint8_t addr[16], double* delay_s);
void mr_throttle_succeeded(mr_throttle* t, const uint8_t addr[16]);

/* ---- handshake.c: the handshake, read without blocking ---------------------------------------------- */
enum { HS_PREAMBLE, HS_HEADER, HS_CTRL, HS_BULK, HS_WAIT, HS_TVM_KEY, HS_TVM_LENGTH, HS_TVM_INIT };

typedef struct {
    int rfd, wfd, is_socket;
    int stage;           /* HS_*: what is being read; HS_WAIT: the CONNECT is read */
    int greeted;         /* our preamble went out */
    int64_t deadline_ns; /* the whole handshake's (handshake_timeout from accept) */
    int64_t turn_ns;     /* HS_WAIT with a token: when the auth throttle lets this address try */
    uint8_t head[MR_HEADER]; /* the preamble, then CONNECT's header */
    size_t have;         /* bytes of the current stage read so far */
    uint8_t* ctrl;       /* CONNECT's control part (malloc'ed, ctrl_len bytes) */
    size_t ctrl_len;
    int kind;
    uint64_t bulk_left;  /* a bulk part on CONNECT: read and dropped */
    uint8_t nonce[MR_NONCE];
    uint8_t addr[16];    /* the client's address (IPv4 as ::ffff:a.b.c.d): throttle, shares */
    char peer[64];       /* "127.0.0.1:5555" or "stdio", for messages */
    /* a TVM client (its first bytes were TVM's magic): HS_TVM_KEY (ctrl: its key), HS_TVM_LENGTH (head: the
       INIT_SERVER packet's length), HS_TVM_INIT (ctrl: the packet), then HS_WAIT */
    int tvm;
    int tvm_answered;      /* our key went out: a refusal is an EXCEPTION packet, before it TVM's mismatch code */
    char tvm_timeout[64];  /* its -timeout=<seconds> option ("" if none) */
    char tvm_key[128];     /* the key it asked for, for the log */
} mr_handshake;

/* What a CONNECT that passed its checks asks for. */
typedef struct {
    double timeout;    /* the session timeout, 0: none */
    uint8_t proof[32]; /* the server's proof to the client (has_proof) */
    int has_proof;
    int tvm;           /* a TVM client: the session speaks TVM's protocol (tvm.c) */
} mr_connect;

void mr_handshake_init(mr_handshake* hs, int rfd, int wfd, int is_socket, int64_t deadline_ns);
void mr_handshake_free(mr_handshake* hs);
/* Read what has arrived: 0, call again when rfd is readable (or, in HS_WAIT, at turn_ns); 1, the CONNECT (or a
   TVM client's INIT_SERVER) is read: check it (mr_handshake_check); -1, the handshake ended (refused, or the peer
   left): close it. `matchkey` as for mr_handshake_check: a TVM client's key is checked as soon as it is read. */
int mr_handshake_step(mr_handshake* hs, const mr_config* cfg, const char* matchkey, mr_throttle* throttle);
/* CONNECT's checks: 0 and *out, or -1 (refused). `matchkey`: with a tracker, the only key served. */
int mr_handshake_check(mr_handshake* hs, const mr_config* cfg, const char* matchkey, mr_throttle* throttle,
                       mr_connect* out);
/* Send our preamble (if not yet sent) and ERROR [code, msg], without blocking. */
void mr_handshake_refuse(mr_handshake* hs, int code, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
/* The deadline passed: tell the client, if it sent a preamble. */
void mr_handshake_expire(mr_handshake* hs, const mr_config* cfg);
/* The whole handshake on a blocking stream (--stdio): 0 and *out, or -1. */
int mr_handshake_run(mr_handshake* hs, const mr_config* cfg, mr_connect* out);

/* ---- session.c ------------------------------------------------------------------------------------ */
/* What the listener hands a session process. */
typedef struct {
    const mr_config* cfg;  /* the server's options */
    const char* peer;      /* "127.0.0.1:5555" or "stdio" */
    uint8_t addr[16];      /* the client's address (IPv4 as ::ffff:a.b.c.d), for the per-address share */
    mr_connect connect;    /* what its CONNECT asked for (the handshake is done) */
    volatile int* sessions; /* shared counter of running sessions (NULL: no limit) */
    struct mr_session_slot* slots; /* shared table of running sessions, cfg->max_sessions + 1 of them (NULL: none) */
    int status_fd;         /* -1, or a pipe to the listener: "S<workspace>\n" when the session starts */
} mr_session_args;

/* A running session, as the other session processes see it (for idle preemption and the per-address share). */
typedef struct mr_session_slot {
    volatile int32_t pid;           /* the session process; 0: a free slot */
    volatile int32_t preempt;       /* set by another session process: end this session, its slot is needed */
    volatile int64_t idle_since_ns; /* when the session last became idle (mr_now_ns); 0 while a request runs */
    uint8_t addr[16];               /* the client's address (as mr_session_args.addr) */
} mr_session_slot;

/* Run one handshaken session on rfd/wfd in this (session) process; returns the process exit status. */
int mr_session_main(int rfd, int wfd, int is_socket, const mr_session_args* args);

/* ---- requests.c ------------------------------------------------------------------------------------ */
/* Memory shared between a session process and its worker. */
typedef struct {
    volatile int ended;             /* the worker ended the session on purpose */
    volatile int sending;           /* the worker is writing a frame */
    volatile unsigned long activity; /* odd: waiting for a request; even: serving one */
    volatile int64_t idle_since_ns;  /* when it last began to wait (mr_now_ns) */
} mr_shared;

/* The worker: send the OK with `proof` (the server proof or NULL), then serve requests until the client
   leaves; `cfg` gives the key and target of the session info and the --cc of .tar links. `tvm`: the client speaks
   TVM's protocol: answer its INIT_SERVER and serve its packets instead (mr_tvm_serve). Returns when the
   session ends on purpose (the caller sets shared->ended and exits). */
void mr_worker_run(mr_conn* c, mr_workspace* ws, mr_shared* shared, const mr_config* cfg, double session_timeout,
                   const uint8_t* proof, int tvm);

/* What tvm.c serves TVM's packets with: requests.c's own operations, on its session objects. */
#define MR_LOST (-2) /* mr_worker_request: the connection failed (the session ends) */
/* Serve one request of kind K_* with `args` (a list node), as if it had come over our protocol, `bulk_len` bytes
   of its bulk part still on the stream: 0 and the reply's control part in mr_worker_reply, -1 with err, MR_LOST.
   The reply's file, if any (DOWNLOAD, LINK_MODULE), is mr_worker_reply_file's until mr_worker_reply_done. */
int mr_worker_request(int kind, const mp_node* args, uint64_t bulk_len, mr_error* err);
const uint8_t* mr_worker_reply(size_t* len);
int mr_worker_reply_file(uint64_t* len); /* its descriptor, or -1 */
void mr_worker_reply_done(void);
int mr_worker_ending(void);              /* the error just returned ends the session (a crash loop) */
mp_arena* mr_worker_arena(void);         /* reset before each request */
void mr_worker_connection_failed(void);  /* a failed read or write: _exit if the code the session ran closed it */
/* A tensor of the session, as tvm.c sees it. */
typedef struct {
    uint8_t* data;
    uint64_t nbytes;
    int32_t device_type, device_id, ndim;
    uint8_t code, bits;
    uint16_t lanes;
    const int64_t* shape;
} mr_tensor_info;
/* The object kind (MP_EXT_*) of id, 0 if none. */
int mr_worker_object_kind(uint64_t id);
/* The live tensor id: 0 and *out, or -1 with err (the texts of our TENSOR handles). */
int mr_worker_tensor(uint64_t id, mr_tensor_info* out, mr_error* err);
/* A session object describing nbytes of tensor `base` from byte_offset with another shape and dtype (the caller
   checked that it lies inside): its id (a TENSOR handle for CALL and TIME_EVAL), or 0 (out of memory). It owns
   no memory and counts against no quota; drop it with mr_worker_drop_view. */
uint64_t mr_worker_add_view(uint64_t base, uint64_t byte_offset, int32_t ndim, const int64_t* shape, uint8_t code,
                            uint8_t bits, uint16_t lanes, uint64_t nbytes);
void mr_worker_drop_view(uint64_t id);
/* check_device of TENSOR_ALLOC: 0 for cpu(0), else -1 with err (NO_DEVICE naming it). */
int mr_worker_check_device(int64_t device_type, int64_t device_id, mr_error* err);

/* ---- tvm.c: TVM's RPC protocol (docs/protocol.md section 13) -------------------------------------------------- */
#define MR_TVM_MAGIC 0xFF271       /* the i32 a TVM client opens with (71 f2 0f 00), and the success answer */
#define MR_TVM_MISMATCH 0xFF273    /* the refusal before our key went out (TVM: "cannot find server that matches") */
#define MR_TVM_MAX_KEY 4096        /* handshake key bytes */
#define MR_TVM_MAX_INIT (64 << 10) /* the INIT_SERVER packet, read in the listener */
/* The key a TVM client sent (`client:<key>[ -timeout=<s>]`): 0 and its -timeout option's text in timeout (cap
   bytes) and the key in key_out, or -1 with err (KEY_MISMATCH: not a client's key, not ours). */
int mr_tvm_check_key(const uint8_t* key, size_t n, const mr_config* cfg, const char* matchkey, char* timeout,
                     size_t timeout_cap, char* key_out, size_t key_cap, mr_error* err);
/* An INIT_SERVER packet (body, after its u64 length): 0, or -1 with err (another protocol version, a session
   constructor other than rpc.LocalSession, a malformed packet). */
int mr_tvm_check_init(const uint8_t* body, size_t n, mr_error* err);
/* Append TVM's EXCEPTION packet carrying msg (code SESSION_TIMEOUT: "RPCSessionTimeoutError: " first). */
void mr_tvm_put_exception(mp_buf* b, int code, const char* msg);
/* A notice or refusal without blocking: an EXCEPTION packet (tvm) or our ERROR frame. */
void mr_notice_nowait(int fd, int is_socket, int tvm, int code, const char* msg);
/* The worker's loop for a TVM client: answer INIT_SERVER, then serve packets until SHUTDOWN or the client leaves. */
void mr_tvm_serve(mr_conn* c, mr_shared* shared);

/* The session info map of the OK reply (devices, arch, ...), with `pid`. */
void mr_put_session_info(mp_buf* b, const mr_config* cfg, double session_timeout, const uint8_t* proof);

#endif
