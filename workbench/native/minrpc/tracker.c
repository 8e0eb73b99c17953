/*
 * tracker.c: minrpc's registration with a tracker (TVM's wire format; workbench/rpc/tracker/registration.py does the
 * same for the Python server, and this file follows it).
 *
 * The wire (DESIGN.md): the client sends the magic 0x2F271 as an int32 little-endian, the tracker echoes it;
 * then each message is an int32 little-endian length and that many bytes of UTF-8 JSON. Requests are arrays
 * whose first element is a code; replies are a bare code (0) or [code, value].
 *
 *   -> [100]                            <- [0, {"auth": true, "nonce": "<64 hex>"}]    (with a registration token:
 *   -> [101, "<64 hex proof>"]          <- 0, or [-1, "message"]                        docs/protocol.md)
 *   -> [5, {"key": "server:K", "addr": [custom_addr, port], ...}]   <- 0     UPDATE_INFO
 *   -> [3, K, [port, "K:<16 hex>"], custom_addr]                    <- 0     PUT: the offer
 *   -> [7]                              <- ["K:…", …]                       GET_PENDING_MATCHKEYS, every second
 *
 * A match key the tracker handed out (no longer pending) but no client used within 5 s is replaced and offered
 * again. A lost tracker is reconnected with backoff (0.1 s doubling to 5 s) and the offer made again. Each call
 * does its I/O under one deadline of 2 s (poll before every send and recv), so no call blocks longer.
 * A refused registration (wrong or missing token) is logged once per reason on stderr, then retried with backoff.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "minrpc.h"
#include "opencl.h"

#define TRACKER_MAGIC 0x2F271
#define IO_TIMEOUT_S 2.0
#define CHECK_INTERVAL_S 1.0
#define UNMATCHED_TIMEOUT_S 5.0
#define BACKOFF_START_S 0.1
#define BACKOFF_MAX_S 5.0
#define MAX_REPLY (1 << 20) /* a reply larger than this is not one a registration needs */
#define MAX_REFUSAL_KINDS 16

enum { CODE_FAIL = -1, CODE_SUCCESS = 0, CODE_PUT = 3, CODE_UPDATE_INFO = 5, CODE_GET_PENDING = 7 };
enum { AUTH_NONCE = 100, AUTH_PROOF = 101 };
static const char REGISTER_LABEL[] = "workbench-tracker-register-v1";

/* The core's logger when linked into minrpc (lines "minrpc[pid]: ..."; info dropped with --silent);
   a plain stderr line otherwise. */
extern void mr_log_info(const char* fmt, ...) __attribute__((weak, format(printf, 1, 2)));
extern void mr_log_error(const char* fmt, ...) __attribute__((weak, format(printf, 1, 2)));

static void log_line(int warning, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static void log_line(int warning, const char* fmt, ...) {
    char text[1100];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    if (warning && mr_log_error)
        mr_log_error("%s", text);
    else if (!warning && mr_log_info)
        mr_log_info("%s", text);
    else if (warning || !mr_log_error) {
        char line[1200];
        int n = snprintf(line, sizeof(line), "minrpc[%d]: %s\n", (int)getpid(), text);
        if (n > (int)sizeof(line) - 1) n = (int)sizeof(line) - 1;
        ssize_t w = write(2, line, (size_t)n);
        (void)w;
    }
}

/* ==========================================================================================================
 * A tiny JSON writer and reader: what the tracker's messages need, no more.
 * ========================================================================================================== */
typedef struct {
    char* data;
    size_t len, cap;
    int failed;
} jbuf;

static void jb_put(jbuf* b, const char* s, size_t n) {
    if (b->failed) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char* grown = (char*)realloc(b->data, cap);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

static void jb_raw(jbuf* b, const char* s) { jb_put(b, s, strlen(s)); }

static void jb_int(jbuf* b, long long v) {
    char text[32];
    snprintf(text, sizeof(text), "%lld", v);
    jb_raw(b, text);
}

/* A JSON string (NULL: null). Bytes >= 0x80 go as they are (UTF-8). */
static void jb_str(jbuf* b, const char* s) {
    if (!s) {
        jb_raw(b, "null");
        return;
    }
    jb_put(b, "\"", 1);
    for (const unsigned char* p = (const unsigned char*)s; *p; ++p) {
        if (*p == '"' || *p == '\\') {
            char esc[2] = {'\\', (char)*p};
            jb_put(b, esc, 2);
        } else if (*p < 0x20 || *p == 0x7f) {
            char esc[8];
            snprintf(esc, sizeof(esc), "\\u%04x", *p);
            jb_raw(b, esc);
        } else {
            jb_put(b, (const char*)p, 1);
        }
    }
    jb_put(b, "\"", 1);
}

enum { J_NULL, J_BOOL, J_INT, J_FLOAT, J_STR, J_ARRAY, J_OBJECT };

typedef struct jv {
    int type;
    long long num; /* J_INT, J_BOOL */
    char* str;     /* J_STR (NUL-terminated; may not hold a NUL) */
    struct jv* items; /* J_ARRAY, J_OBJECT (values) */
    char** keys;      /* J_OBJECT */
    int n;
} jv;

static void jv_free(jv* v) {
    if (!v) return;
    free(v->str);
    for (int i = 0; i < v->n; ++i) {
        jv_free(&v->items[i]);
        if (v->keys) free(v->keys[i]);
    }
    free(v->items);
    free(v->keys);
    memset(v, 0, sizeof(*v));
}

typedef struct {
    const char* p;
    const char* end;
    int depth;
} jreader;

static void skip_ws(jreader* r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r')) r->p++;
}

static void put_utf8(jbuf* b, unsigned cp) {
    char u[4];
    if (cp < 0x80) {
        u[0] = (char)cp;
        jb_put(b, u, 1);
    } else if (cp < 0x800) {
        u[0] = (char)(0xc0 | cp >> 6);
        u[1] = (char)(0x80 | (cp & 0x3f));
        jb_put(b, u, 2);
    } else if (cp < 0x10000) {
        u[0] = (char)(0xe0 | cp >> 12);
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[2] = (char)(0x80 | (cp & 0x3f));
        jb_put(b, u, 3);
    } else {
        u[0] = (char)(0xf0 | cp >> 18);
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[3] = (char)(0x80 | (cp & 0x3f));
        jb_put(b, u, 4);
    }
}

static int hex4(const char* p, unsigned* out) {
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static int parse_string(jreader* r, char** out) {
    jbuf b = {0};
    r->p++; /* the opening quote */
    while (r->p < r->end && *r->p != '"') {
        unsigned char c = (unsigned char)*r->p;
        if (c < 0x20) goto bad;
        if (c != '\\') {
            jb_put(&b, r->p++, 1);
            continue;
        }
        if (r->end - r->p < 2) goto bad;
        char e = r->p[1];
        r->p += 2;
        const char* simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            static const char MAP[] = "\"\\/\b\f\n\r\t";
            jb_put(&b, &MAP[simple - "\"\\/bfnrt"], 1);
        } else if (e == 'u') {
            unsigned cp;
            if (r->end - r->p < 4 || hex4(r->p, &cp)) goto bad;
            r->p += 4;
            if (cp >= 0xd800 && cp < 0xdc00 && r->end - r->p >= 6 && r->p[0] == '\\' && r->p[1] == 'u') {
                unsigned low;
                if (hex4(r->p + 2, &low) == 0 && low >= 0xdc00 && low < 0xe000) {
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
                    r->p += 6;
                }
            }
            if (cp == 0) goto bad; /* a NUL has no place in our strings */
            put_utf8(&b, cp);
        } else {
            goto bad;
        }
    }
    if (r->p >= r->end || b.failed) goto bad;
    r->p++;
    if (!b.data) {
        b.data = strdup("");
        if (!b.data) return -1;
    }
    *out = b.data;
    return 0;
bad:
    free(b.data);
    return -1;
}

static int parse_value(jreader* r, jv* v);

static int parse_container(jreader* r, jv* v, int object) {
    int cap = 0;
    v->type = object ? J_OBJECT : J_ARRAY;
    r->p++;
    skip_ws(r);
    if (r->p < r->end && *r->p == (object ? '}' : ']')) {
        r->p++;
        return 0;
    }
    for (;;) {
        if (v->n == cap) {
            cap = cap ? cap * 2 : 4;
            jv* items = (jv*)realloc(v->items, (size_t)cap * sizeof(jv));
            if (!items) return -1;
            v->items = items;
            if (object) {
                char** keys = (char**)realloc(v->keys, (size_t)cap * sizeof(char*));
                if (!keys) return -1;
                v->keys = keys;
            }
        }
        memset(&v->items[v->n], 0, sizeof(jv));
        if (object) {
            skip_ws(r);
            v->keys[v->n] = NULL;
            if (r->p >= r->end || *r->p != '"' || parse_string(r, &v->keys[v->n])) {
                v->n++; /* so that jv_free frees what was made */
                return -1;
            }
            skip_ws(r);
            if (r->p >= r->end || *r->p != ':') {
                v->n++;
                return -1;
            }
            r->p++;
        }
        int rc = parse_value(r, &v->items[v->n]);
        v->n++;
        if (rc) return -1;
        skip_ws(r);
        if (r->p < r->end && *r->p == ',') {
            r->p++;
            continue;
        }
        if (r->p < r->end && *r->p == (object ? '}' : ']')) {
            r->p++;
            return 0;
        }
        return -1;
    }
}

static int parse_value(jreader* r, jv* v) {
    memset(v, 0, sizeof(*v));
    skip_ws(r);
    if (r->p >= r->end) return -1;
    char c = *r->p;
    if (c == '{' || c == '[') {
        if (++r->depth > 16) return -1;
        int rc = parse_container(r, v, c == '{');
        r->depth--;
        return rc;
    }
    if (c == '"') {
        v->type = J_STR;
        return parse_string(r, &v->str);
    }
    static const char* WORDS[] = {"true", "false", "null"};
    for (int i = 0; i < 3; ++i) {
        size_t n = strlen(WORDS[i]);
        if ((size_t)(r->end - r->p) >= n && memcmp(r->p, WORDS[i], n) == 0) {
            r->p += n;
            v->type = i == 2 ? J_NULL : J_BOOL;
            v->num = i == 0;
            return 0;
        }
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        const char* start = r->p;
        int is_float = 0;
        if (*r->p == '-') r->p++;
        while (r->p < r->end && ((*r->p >= '0' && *r->p <= '9') || strchr(".eE+-", *r->p))) {
            if (!(*r->p >= '0' && *r->p <= '9')) is_float = 1;
            r->p++;
        }
        char text[40];
        size_t n = (size_t)(r->p - start);
        if (n == 0 || n >= sizeof(text)) return -1;
        memcpy(text, start, n);
        text[n] = '\0';
        char* end;
        errno = 0;
        if (is_float) {
            strtod(text, &end);
            v->type = J_FLOAT;
        } else {
            v->num = strtoll(text, &end, 10);
            v->type = J_INT;
        }
        return (*end || errno) ? -1 : 0;
    }
    return -1;
}

static int json_parse(const char* text, size_t len, jv* out) {
    jreader r = {text, text + len, 0};
    if (parse_value(&r, out)) {
        jv_free(out);
        return -1;
    }
    skip_ws(&r);
    if (r.p != r.end) {
        jv_free(out);
        return -1;
    }
    return 0;
}

/* ==========================================================================================================
 * The registration.
 * ========================================================================================================== */
struct mr_tracker {
    char* host;
    int port;
    char* key;
    int server_port;
    char* custom_addr;
    char* token;
    int fd;                /* -1: not connected */
    char matchkey[600];    /* "<key>:<16 hex digits>" */
    int busy;              /* a session runs: nothing on offer */
    int offered;           /* the current match key was PUT on this connection */
    double handed_out_at;  /* < 0: the tracker still holds it (or nothing to watch) */
    double next_check;
    double retry_at;
    double backoff;
    int unreachable_logged;
    char refusals[MAX_REFUSAL_KINDS][160]; /* kinds of refusal already logged (numbers blanked out) */
    int n_refusals;
    double deadline; /* of the current call's I/O */
    char why[600];   /* why the last exchange failed */
    int refused;     /* ... and whether it was a refusal (not a lost connection) */
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void new_matchkey(mr_tracker* t) {
    uint8_t r[8];
    if (mr_random(r, sizeof(r)) != 0) { /* no randomness at all: time and pid keep keys distinct */
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t x = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ ((uint64_t)getpid() << 44);
        for (int i = 0; i < 8; ++i) r[i] = (uint8_t)(x >> (8 * i));
    }
    snprintf(t->matchkey, sizeof(t->matchkey), "%.500s:%02x%02x%02x%02x%02x%02x%02x%02x", t->key, r[0], r[1], r[2],
             r[3], r[4], r[5], r[6], r[7]);
    t->offered = 0;
    t->handed_out_at = -1;
}

mr_tracker* mr_tracker_new(const char* host, int port, const char* key, int server_port, const char* custom_addr,
                           const char* registration_token) {
    mr_tracker* t = (mr_tracker*)calloc(1, sizeof(mr_tracker));
    if (!t) return NULL;
    t->host = strdup(host ? host : "127.0.0.1");
    t->key = strdup(key ? key : "");
    t->custom_addr = custom_addr && *custom_addr ? strdup(custom_addr) : NULL;
    t->token = registration_token && *registration_token ? strdup(registration_token) : NULL;
    if (!t->host || !t->key || (custom_addr && *custom_addr && !t->custom_addr) ||
        (registration_token && *registration_token && !t->token)) {
        mr_tracker_free(t);
        return NULL;
    }
    t->port = port;
    t->server_port = server_port;
    t->fd = -1;
    t->backoff = BACKOFF_START_S;
    new_matchkey(t);
    return t;
}

const char* mr_tracker_matchkey(const mr_tracker* t) { return t->matchkey; }

void mr_tracker_free(mr_tracker* t) {
    if (!t) return;
    if (t->fd >= 0) close(t->fd);
    free(t->host);
    free(t->key);
    free(t->custom_addr);
    if (t->token) {
        memset(t->token, 0, strlen(t->token));
        free(t->token);
    }
    free(t);
}

/* ---- I/O under the call's deadline ------------------------------------------------------------------ */
static int fail_io(mr_tracker* t, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail_io(mr_tracker* t, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->why, sizeof(t->why), fmt, ap);
    va_end(ap);
    t->refused = 0;
    return -1;
}

static int wait_fd(mr_tracker* t, short events) {
    for (;;) {
        double left = t->deadline - now_s();
        if (left <= 0) return fail_io(t, "no answer within %.0f s", IO_TIMEOUT_S);
        struct pollfd p = {t->fd, events, 0};
        int n = poll(&p, 1, (int)(left * 1000) + 1);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return fail_io(t, "%s", strerror(errno));
        if (n > 0) return 0;
    }
}

static int send_all(mr_tracker* t, const void* data, size_t n) {
    const uint8_t* p = (const uint8_t*)data;
    while (n) {
        if (wait_fd(t, POLLOUT)) return -1;
        ssize_t w = send(t->fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (w < 0) return fail_io(t, "%s", strerror(errno));
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int recv_all(mr_tracker* t, void* data, size_t n) {
    uint8_t* p = (uint8_t*)data;
    while (n) {
        if (wait_fd(t, POLLIN)) return -1;
#ifdef TCP_QUICKACK
        /* ACK at once: TVM's tracker writes a length and its body in two writes, without TCP_NODELAY */
        int one = 1;
        setsockopt(t->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
#endif
        ssize_t got = recv(t->fd, p, n, 0);
        if (got < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
        if (got < 0) return fail_io(t, "%s", strerror(errno));
        if (got == 0) return fail_io(t, "the tracker closed the connection");
        p += got;
        n -= (size_t)got;
    }
    return 0;
}

static void put_le32(uint8_t* p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* Send one JSON message and read the reply into *reply. */
static int call(mr_tracker* t, const jbuf* msg, jv* reply) {
    memset(reply, 0, sizeof(*reply));
    if (msg->failed || !msg->data) return fail_io(t, "out of memory");
    uint8_t* frame = (uint8_t*)malloc(msg->len + 4);
    if (!frame) return fail_io(t, "out of memory");
    put_le32(frame, (uint32_t)msg->len);
    memcpy(frame + 4, msg->data, msg->len);
    int rc = send_all(t, frame, msg->len + 4); /* one write: no Nagle stall between length and body */
    free(frame);
    if (rc) return -1;
    uint8_t head[4];
    if (recv_all(t, head, 4)) return -1;
    int32_t len = (int32_t)((uint32_t)head[0] | (uint32_t)head[1] << 8 | (uint32_t)head[2] << 16 | (uint32_t)head[3] << 24);
    if (len < 0 || len > MAX_REPLY) return fail_io(t, "the tracker sent a reply of %d bytes", (int)len);
    char* body = (char*)malloc((size_t)len + 1);
    if (!body) return fail_io(t, "out of memory");
    if (recv_all(t, body, (size_t)len)) {
        free(body);
        return -1;
    }
    rc = json_parse(body, (size_t)len, reply);
    free(body);
    if (rc) return fail_io(t, "the tracker sent a malformed reply");
    return 0;
}

/* A reply that must be 0 (SUCCESS); [-1, "text"] is a refusal. */
static int expect_success(mr_tracker* t, jv* reply, const char* what) {
    int rc = 0;
    if (reply->type == J_INT && reply->num == CODE_SUCCESS) {
        rc = 0;
    } else if (reply->type == J_ARRAY && reply->n == 2 && reply->items[0].type == J_INT &&
               reply->items[0].num == CODE_FAIL && reply->items[1].type == J_STR) {
        snprintf(t->why, sizeof(t->why), "%.500s", reply->items[1].str);
        t->refused = 1;
        rc = -1;
    } else {
        rc = fail_io(t, "the tracker answered %s with something else than 0", what);
    }
    jv_free(reply);
    return rc;
}

static int authenticate(mr_tracker* t) {
    jbuf msg = {0};
    jv reply;
    jb_raw(&msg, "[100]");
    int rc = call(t, &msg, &reply);
    free(msg.data);
    if (rc) {
        if (strcmp(t->why, "the tracker closed the connection") == 0) {
            snprintf(t->why, sizeof(t->why),
                     "the tracker closed the connection when asked for a registration nonce: it takes no registration "
                     "token (a TVM tracker?); start this server without WORKBENCH_REGISTRATION_TOKEN");
            t->refused = 1;
        }
        return -1;
    }
    const jv* body = NULL;
    if (reply.type == J_ARRAY && reply.n == 2 && reply.items[0].type == J_INT && reply.items[0].num == CODE_SUCCESS &&
        reply.items[1].type == J_OBJECT)
        body = &reply.items[1];
    if (!body) {
        jv_free(&reply);
        return fail_io(t, "the tracker answered the request for a registration nonce with something else");
    }
    int auth = 0;
    const char* nonce_hex = NULL;
    for (int i = 0; i < body->n; ++i) {
        if (strcmp(body->keys[i], "auth") == 0) auth = body->items[i].type == J_BOOL && body->items[i].num;
        if (strcmp(body->keys[i], "nonce") == 0 && body->items[i].type == J_STR) nonce_hex = body->items[i].str;
    }
    if (!auth) { /* a tracker without a token: register without a proof */
        jv_free(&reply);
        return 0;
    }
    uint8_t nonce[32], proof[32];
    int ok = nonce_hex && strlen(nonce_hex) == 64;
    for (int i = 0; ok && i < 32; ++i) {
        unsigned byte;
        ok = sscanf(nonce_hex + 2 * i, "%2x", &byte) == 1 && strchr("0123456789abcdefABCDEF", nonce_hex[2 * i]) &&
             strchr("0123456789abcdefABCDEF", nonce_hex[2 * i + 1]);
        nonce[i] = (uint8_t)byte;
    }
    jv_free(&reply);
    if (!ok) return fail_io(t, "the tracker sent a registration nonce that is not 32 bytes of hex");
    mr_hmac_sha256(t->token, strlen(t->token), REGISTER_LABEL, sizeof(REGISTER_LABEL) - 1, nonce, sizeof(nonce), proof);
    char hex[65];
    for (int i = 0; i < 32; ++i) snprintf(hex + 2 * i, 3, "%02x", proof[i]);
    memset(&msg, 0, sizeof(msg)); /* a new message */
    jb_raw(&msg, "[101,");
    jb_str(&msg, hex);
    jb_raw(&msg, "]");
    rc = call(t, &msg, &reply);
    free(msg.data);
    if (rc) return -1;
    return expect_success(t, &reply, "the registration proof");
}

static int update_info(mr_tracker* t) {
    struct utsname u;
    if (uname(&u) != 0) snprintf(u.machine, sizeof(u.machine), "unknown");
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    char server_key[620];
    snprintf(server_key, sizeof(server_key), "server:%.600s", t->key);
    jbuf msg = {0};
    jb_raw(&msg, "[5,{\"key\":");
    jb_str(&msg, server_key);
    jb_raw(&msg, ",\"addr\":[");
    jb_str(&msg, t->custom_addr);
    jb_raw(&msg, ",");
    jb_int(&msg, t->server_port);
    jb_raw(&msg, "],\"devices\":[[1,0]");
    for (int i = 0; i < mr_cl_count(); ++i) {
        jb_raw(&msg, ",[4,");
        jb_int(&msg, i);
        jb_raw(&msg, "]");
    }
    jb_raw(&msg, "]");
    if (mr_cl_count()) { /* the OpenCL devices' attributes, as in the session info (docs/protocol.md section 14) */
        jb_raw(&msg, ",\"device_details\":[");
        for (int i = 0; i < mr_cl_count(); ++i) {
            const mr_cl_info* d = mr_cl_published(i);
            jb_raw(&msg, i ? ",{\"device\":[4," : "{\"device\":[4,");
            jb_int(&msg, i);
            jb_raw(&msg, "],\"exist\":true,\"device_name\":");
            jb_str(&msg, d->device_name);
            jb_raw(&msg, ",\"device_kind\":");
            jb_str(&msg, d->device_kind);
            jb_raw(&msg, ",\"vendor\":");
            jb_str(&msg, d->vendor);
            jb_raw(&msg, ",\"platform\":");
            jb_str(&msg, d->platform);
            jb_raw(&msg, ",\"compute_version\":");
            jb_str(&msg, d->compute_version);
            jb_raw(&msg, ",\"driver_version\":");
            jb_str(&msg, d->driver_version);
            jb_raw(&msg, ",\"multi_processor_count\":");
            jb_int(&msg, (long long)d->multi_processor_count);
            jb_raw(&msg, ",\"max_threads_per_block\":");
            jb_int(&msg, (long long)d->max_threads_per_block);
            jb_raw(&msg, ",\"max_thread_dimensions\":[");
            for (uint32_t k = 0; k < d->dims; ++k) {
                if (k) jb_raw(&msg, ",");
                jb_int(&msg, (long long)d->max_thread_dimensions[k]);
            }
            jb_raw(&msg, "],\"max_shared_memory_per_block\":");
            jb_int(&msg, (long long)d->max_shared_memory_per_block);
            jb_raw(&msg, ",\"total_global_memory\":");
            jb_int(&msg, (long long)d->total_global_memory);
            jb_raw(&msg, ",\"max_clock_rate\":");
            jb_int(&msg, (long long)d->max_clock_rate);
            jb_raw(&msg, ",\"warp_size\":1}");
        }
        jb_raw(&msg, "]");
    }
    jb_raw(&msg, ",\"arch\":");
    jb_str(&msg, u.machine);
    jb_raw(&msg, ",\"system\":\"Linux\",\"cpu_count\":");
    jb_int(&msg, cpus > 0 ? cpus : 1);
    jb_raw(&msg, ",\"pid\":");
    jb_int(&msg, (long long)getpid());
    jb_raw(&msg, ",\"target\":");
    jb_str(&msg, MINRPC_TARGET);
    jb_raw(&msg, ",\"server\":\"minrpc\"}]");
    jv reply;
    int rc = call(t, &msg, &reply);
    free(msg.data);
    return rc ? -1 : expect_success(t, &reply, "UPDATE_INFO");
}

static int put_offer(mr_tracker* t) {
    jbuf msg = {0};
    jb_raw(&msg, "[3,");
    jb_str(&msg, t->key);
    jb_raw(&msg, ",[");
    jb_int(&msg, t->server_port);
    jb_raw(&msg, ",");
    jb_str(&msg, t->matchkey);
    jb_raw(&msg, "],");
    jb_str(&msg, t->custom_addr);
    jb_raw(&msg, "]");
    jv reply;
    int rc = call(t, &msg, &reply);
    free(msg.data);
    if (rc || expect_success(t, &reply, "PUT")) return -1;
    t->offered = 1;
    t->handed_out_at = -1;
    return 0;
}

/* Is our match key still waiting at the tracker? Hand-outs unused for 5 s are offered again. */
static int check_handed_out(mr_tracker* t, double now) {
    jbuf msg = {0};
    jb_raw(&msg, "[7]");
    jv reply;
    int rc = call(t, &msg, &reply);
    free(msg.data);
    if (rc) return -1;
    if (reply.type != J_ARRAY) {
        jv_free(&reply);
        return fail_io(t, "the tracker answered GET_PENDING_MATCHKEYS with something else than a list");
    }
    int pending = 0;
    for (int i = 0; i < reply.n; ++i)
        if (reply.items[i].type == J_STR && strcmp(reply.items[i].str, t->matchkey) == 0) pending = 1;
    jv_free(&reply);
    if (t->busy || pending) {
        t->handed_out_at = -1;
    } else if (t->handed_out_at < 0) {
        t->handed_out_at = now;
    } else if (now - t->handed_out_at > UNMATCHED_TIMEOUT_S) {
        log_line(0, "the match key the tracker handed out %.0f s ago was not used; offering this server again",
                 now - t->handed_out_at);
        new_matchkey(t);
        return put_offer(t);
    }
    return 0;
}

/* Connect with the call's deadline (non-blocking connect, then poll). */
static int open_connection(mr_tracker* t) {
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    char port[16];
    snprintf(port, sizeof(port), "%d", t->port);
    int rc = getaddrinfo(t->host, port, &hints, &res);
    if (rc != 0) return fail_io(t, "cannot resolve %s: %s", t->host, gai_strerror(rc));
    int err = ECONNREFUSED;
    for (struct addrinfo* a = res; a && t->fd < 0; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        if (connect(fd, a->ai_addr, a->ai_addrlen) != 0 && errno != EINPROGRESS) {
            err = errno;
            close(fd);
            continue;
        }
        t->fd = fd;
        if (wait_fd(t, POLLOUT)) {
            close(fd);
            t->fd = -1;
            err = ETIMEDOUT;
            continue;
        }
        int so_error = 0;
        socklen_t len = sizeof(so_error);
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len) != 0 || so_error) {
            err = so_error ? so_error : errno;
            close(fd);
            t->fd = -1;
        }
    }
    freeaddrinfo(res);
    if (t->fd < 0) return fail_io(t, "%s", strerror(err));
    int one = 1;
    setsockopt(t->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    uint8_t magic[4], echo[4];
    put_le32(magic, TRACKER_MAGIC);
    if (send_all(t, magic, 4) || recv_all(t, echo, 4)) return -1;
    if (memcmp(magic, echo, 4) != 0) return fail_io(t, "%s:%d is not an RPC tracker (it answered the magic wrongly)",
                                                    t->host, t->port);
    return 0;
}

static void drop_connection(mr_tracker* t) {
    if (t->fd >= 0) close(t->fd);
    t->fd = -1;
    t->offered = 0;
}

/* A refusal: logged once per kind (numbers aside) until a registration goes through. */
static void log_refusal(mr_tracker* t) {
    char kind[160];
    size_t n = 0;
    for (const char* p = t->why; *p && n + 1 < sizeof(kind); ++p) {
        if (*p >= '0' && *p <= '9') {
            while (p[1] == '.' || (p[1] >= '0' && p[1] <= '9')) ++p;
            kind[n++] = '#';
        } else {
            kind[n++] = *p;
        }
    }
    kind[n] = '\0';
    for (int i = 0; i < t->n_refusals; ++i)
        if (strcmp(t->refusals[i], kind) == 0) return;
    if (t->n_refusals < MAX_REFUSAL_KINDS) snprintf(t->refusals[t->n_refusals++], sizeof(t->refusals[0]), "%s", kind);
    log_line(1, "the tracker at %s:%d refused to register this server: %s; retrying with backoff", t->host, t->port,
             t->why);
}

/* The connection failed or the tracker refused: drop it and retry with backoff. */
static void lost(mr_tracker* t, double now, int was_registered) {
    if (t->refused)
        log_refusal(t);
    else if (was_registered)
        log_line(1, "lost the tracker at %s:%d (%s); reconnecting", t->host, t->port, t->why);
    else if (!t->unreachable_logged) {
        log_line(1, "the tracker at %s:%d is unreachable (%s); retrying with backoff", t->host, t->port, t->why);
        t->unreachable_logged = 1;
    }
    drop_connection(t);
    t->retry_at = now + t->backoff;
    t->backoff = t->backoff * 2 > BACKOFF_MAX_S ? BACKOFF_MAX_S : t->backoff * 2;
}

static void connect_and_register(mr_tracker* t, double now) {
    if (open_connection(t) || (t->token && authenticate(t)) || update_info(t) || (!t->busy && put_offer(t))) {
        lost(t, now, 0);
        return;
    }
    log_line(0, "registered with the tracker at %s:%d as server:%s", t->host, t->port, t->key);
    t->backoff = BACKOFF_START_S;
    t->n_refusals = 0;
    t->unreachable_logged = 0;
    t->next_check = now + CHECK_INTERVAL_S;
}

double mr_tracker_poll(mr_tracker* t) {
    double now = now_s();
    t->deadline = now + IO_TIMEOUT_S;
    if (t->fd < 0) {
        if (now < t->retry_at) return t->retry_at - now;
        connect_and_register(t, now);
        if (t->fd < 0) return t->retry_at - now > 0.01 ? t->retry_at - now : 0.01;
    }
    if (!t->busy && !t->offered && put_offer(t)) {
        lost(t, now, 1);
        return t->retry_at - now > 0.01 ? t->retry_at - now : 0.01;
    }
    if (now >= t->next_check) {
        t->next_check = now + CHECK_INTERVAL_S;
        if (!t->busy && check_handed_out(t, now)) {
            lost(t, now, 1);
            return t->retry_at - now > 0.01 ? t->retry_at - now : 0.01;
        }
    }
    double due = t->next_check - now;
    return due > 0.01 ? due : 0.01;
}

void mr_tracker_set_busy(mr_tracker* t, int busy) {
    t->busy = busy ? 1 : 0;
    new_matchkey(t); /* busy: the used key is retired at once; idle again: a fresh key for the next client */
    if (!t->busy && t->fd >= 0) {
        t->deadline = now_s() + IO_TIMEOUT_S;
        if (put_offer(t)) lost(t, now_s(), 1);
    }
}
