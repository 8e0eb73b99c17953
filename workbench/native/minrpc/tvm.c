/*
 * tvm.c: apache-tvm 0.27's RPC protocol ("0.8.0") on minrpc (docs/protocol.md section 13).
 *
 * The listener (handshake.c) tells a TVM client apart by its first four bytes, checks its key and its
 * INIT_SERVER packet here (mr_tvm_check_key, mr_tvm_check_init), and forks its session as for ours; the worker
 * then runs mr_tvm_serve instead of our request loop. Every packet becomes one of requests.c's operations
 * (mr_worker_request with the arguments our client would send: UPLOAD, TENSOR_ALLOC, CALL, TIME_EVAL, ...), so
 * the sandbox, the quotas, the crash guard and the error texts are those of our protocol. The Python server does
 * the same (workbench/rpc/wire/tvm.py, workbench/rpc/server/tvm_session.py); texts follow it.
 *
 * Every length read from the wire is checked against what is left of its packet before anything is read or
 * allocated; strings, byte arrays and shapes of one packet are held in memory up to MAX_INLINE bytes in all,
 * except a last byte array that ends the packet, which stays on the stream (uploads, of any size). A packet
 * that cannot be decoded gets EXCEPTION, the rest of it is read and dropped, and the session goes on.
 * All integers on the wire are little-endian; they are assembled byte by byte (big-endian devices too), and
 * tensor bytes keep TVM's little-endian order (copies swap them on a big-endian device).
 */
#include "core.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define PROTOCOL_VERSION "0.8.0"
#define MAX_PACKET (MR_MAX_BULK + MR_MAX_CTRL) /* a tensor's bytes and their description */
#define MAX_INLINE ((uint64_t)MR_MAX_CTRL)     /* argument bytes of one packet held in memory */
#define MAX_ARGS 4096
#define MAX_NDIM 64
#define STREAM_MIN ((uint64_t)64 << 10) /* a last byte array this large stays on the stream */
#define LOCAL_BASE ((uint64_t)1 << 62)  /* handles of the functions served here; session ids stay far below */
#define MAX_LOCALS 65536
#define SESSION_TIMEOUT_PREFIX "RPCSessionTimeoutError: "
#define CACHE_FLUSH_PREPROC "cache_flush_cpu_non_first_arg"
#define MAX_CACHE_FLUSH ((int64_t)1 << 30)

enum { /* RPCCode */
    C_SHUTDOWN = 1, C_INIT_SERVER, C_CALL_FUNC, C_RETURN, C_EXCEPTION, C_COPY_FROM_REMOTE, C_COPY_TO_REMOTE,
    C_COPY_ACK, C_GET_GLOBAL_FUNC, C_FREE_HANDLE, C_DEV_SET_DEVICE, C_DEV_GET_ATTR, C_DEV_ALLOC_DATA,
    C_DEV_FREE_DATA, C_DEV_STREAM_SYNC, C_COPY_AMONG_REMOTE, C_DEV_ALLOC_DATA_WITH_SCOPE, C_DEV_CREATE_STREAM,
    C_DEV_FREE_STREAM, C_DEV_SET_STREAM, C_DEV_GET_CURRENT_STREAM,
};
static const char* const CODE_NAMES[] = {"NONE", "SHUTDOWN", "INIT_SERVER", "CALL_FUNC", "RETURN", "EXCEPTION",
                                         "COPY_FROM_REMOTE", "COPY_TO_REMOTE", "COPY_ACK", "GET_GLOBAL_FUNC",
                                         "FREE_HANDLE", "DEV_SET_DEVICE", "DEV_GET_ATTR", "DEV_ALLOC_DATA",
                                         "DEV_FREE_DATA", "DEV_STREAM_SYNC", "COPY_AMONG_REMOTE",
                                         "DEV_ALLOC_DATA_WITH_SCOPE", "DEV_CREATE_STREAM", "DEV_FREE_STREAM",
                                         "DEV_SET_STREAM", "DEV_GET_CURRENT_STREAM"};

enum { /* tvm-ffi type indices */
    T_NONE = 0, T_INT = 1, T_BOOL = 2, T_FLOAT = 3, T_PTR = 4, T_DTYPE = 5, T_DEVICE = 6, T_DLTENSOR = 7,
    T_RAW_STR = 8, T_BYTE_ARRAY = 9, T_SMALL_STR = 11, T_SMALL_BYTES = 12, T_OBJECT = 64, T_STR = 65, T_BYTES = 66,
    T_FUNCTION = 68, T_TENSOR = 70, T_MODULE = 73, T_OBJECT_REF = 115,
};

/* ---- values ------------------------------------------------------------------------------------------ */
enum { V_NONE, V_INT, V_BOOL, V_FLOAT, V_PTR, V_DTYPE, V_DEVICE, V_TENSOR, V_STR, V_BYTES, V_REF, V_STREAMED };

typedef struct {
    uint64_t data; /* the session's tensor id */
    int32_t device_type, device_id, ndim;
    uint8_t code, bits;
    uint16_t lanes;
    int64_t* shape;
    uint64_t byte_offset;
} tvm_tensor;

typedef struct {
    int kind;     /* V_* */
    int32_t type; /* V_REF: 68, 73 or 115; V_STREAMED: T_RAW_STR for a string */
    union {
        int64_t i;
        double f;
        uint64_t h; /* V_PTR, V_REF; V_STREAMED: its size */
        struct {
            uint8_t code, bits;
            uint16_t lanes;
        } dtype;
        struct {
            int32_t type, id;
        } device;
        tvm_tensor* t;
        struct {
            const char* p; /* NUL-terminated, in the arena */
            uint64_t n;
        } s;
    } v;
} tvm_value;

static const char* value_type_name(const tvm_value* v) {
    static const char* names[] = {"NoneType", "int", "bool", "float", "Pointer", "DataType", "Device", "TensorArg",
                                  "str", "bytes", "Ref", "StreamedBytes"};
    return names[v->kind];
}

/* ---- little-endian fields ---------------------------------------------------------------------------- */
static uint64_t le(const uint8_t* p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}

static void put_le(mp_buf* b, uint64_t v, int n) {
    uint8_t p[8];
    for (int i = 0; i < n; ++i) p[i] = (uint8_t)(v >> (8 * i));
    mp_put_raw(b, p, (size_t)n);
}

/* ---- reading a packet -------------------------------------------------------------------------------- */
typedef struct {
    mr_conn* c;         /* the session's stream, or NULL: mem */
    const uint8_t* mem; /* a packet in memory (INIT_SERVER, in the listener) */
    uint64_t left;      /* bytes of the packet not read yet */
    uint64_t inline_left; /* argument bytes it may still hold in memory */
    mp_arena* arena;
    int lost; /* the connection failed */
} tvm_reader;

static int take(tvm_reader* r, void* dst, uint64_t n, mr_error* err) {
    if (n > r->left)
        return mr_fail(err, MR_BAD_REQUEST, "a TVM packet field of %llu bytes overruns its packet (%llu bytes left)",
                       (unsigned long long)n, (unsigned long long)r->left);
    r->left -= n;
    if (!r->c) {
        memcpy(dst, r->mem, (size_t)n);
        r->mem += n;
        return 0;
    }
    if (n && conn_read_exact(r->c, dst, n)) {
        r->lost = 1;
        return mr_fail(err, MR_PROTOCOL, "the connection was lost");
    }
    return 0;
}

static int take_i32(tvm_reader* r, int32_t* out, mr_error* err) {
    uint8_t p[4];
    if (take(r, p, 4, err)) return -1;
    *out = (int32_t)(uint32_t)le(p, 4);
    return 0;
}

static int take_u32(tvm_reader* r, uint32_t* out, mr_error* err) {
    uint8_t p[4];
    if (take(r, p, 4, err)) return -1;
    *out = (uint32_t)le(p, 4);
    return 0;
}

static int take_u64(tvm_reader* r, uint64_t* out, mr_error* err) {
    uint8_t p[8];
    if (take(r, p, 8, err)) return -1;
    *out = le(p, 8);
    return 0;
}

/* n bytes of an argument held in memory (NUL-terminated in the arena), within the packet's MAX_INLINE. */
static int take_inline(tvm_reader* r, uint64_t n, const char* what, const char** out, mr_error* err) {
    if (n > r->left) return take(r, NULL, n, err); /* says that it overruns the packet */
    if (n > r->inline_left)
        return mr_fail(err, MR_TOO_LARGE, "%s of %llu bytes is over the %llu-byte limit for arguments held in memory "
                       "(only the last argument of tvm.rpc.server.upload may be larger)", what, (unsigned long long)n,
                       (unsigned long long)MAX_INLINE);
    r->inline_left -= n;
    char* p = (char*)mp_alloc(r->arena, (size_t)n + 1);
    if (!p) return mr_fail(err, MR_REMOTE, "out of memory for an argument of %llu bytes", (unsigned long long)n);
    if (take(r, p, n, err)) return -1;
    p[n] = '\0';
    *out = p;
    return 0;
}

/* Drop what is left of the packet (after an error, or fields this server ignores). */
static void skip_rest(tvm_reader* r) {
    if (!r->left || r->lost) return;
    uint64_t n = r->left;
    r->left = 0;
    if (!r->c) r->mem += n;
    else if (conn_discard(r->c, n)) r->lost = 1;
}

static int text_value(tvm_value* out, const char* p, uint64_t n, int is_str, mr_error* err) {
    if (is_str && !mp_valid_utf8((const uint8_t*)p, (size_t)n)) return mr_fail(err, MR_BAD_REQUEST, "a string argument that is not UTF-8");
    out->kind = is_str ? V_STR : V_BYTES;
    out->v.s.p = p;
    out->v.s.n = n;
    return 0;
}

static int read_tensor(tvm_reader* r, tvm_tensor** out, mr_error* err) {
    tvm_tensor* t = (tvm_tensor*)mp_alloc(r->arena, sizeof(tvm_tensor));
    uint8_t head[20];
    if (!t) return mr_fail(err, MR_REMOTE, "out of memory");
    if (take_u64(r, &t->data, err) || take(r, head, 16, err)) return -1;
    t->device_type = (int32_t)(uint32_t)le(head, 4);
    t->device_id = (int32_t)(uint32_t)le(head + 4, 4);
    t->ndim = (int32_t)(uint32_t)le(head + 8, 4);
    t->code = head[12];
    t->bits = head[13];
    t->lanes = (uint16_t)le(head + 14, 2);
    if (t->ndim < 0 || t->ndim > MAX_NDIM)
        return mr_fail(err, MR_BAD_REQUEST, "a tensor of %d dimensions (at most %d)", (int)t->ndim, MAX_NDIM);
    const char* raw = NULL;
    if (take_inline(r, 8 * (uint64_t)t->ndim, "a tensor shape", &raw, err)) return -1;
    t->shape = (int64_t*)mp_alloc(r->arena, (size_t)(t->ndim ? t->ndim : 1) * sizeof(int64_t));
    if (!t->shape) return mr_fail(err, MR_REMOTE, "out of memory");
    for (int32_t i = 0; i < t->ndim; ++i) t->shape[i] = (int64_t)le((const uint8_t*)raw + 8 * i, 8);
    if (take_u64(r, &t->byte_offset, err)) return -1;
    *out = t;
    return 0;
}

/* An object value (type index >= 64, or a small string/bytes): u32 inner type index, then its payload. */
static int read_object(tvm_reader* r, int32_t outer, tvm_value* out, mr_error* err) {
    uint32_t inner;
    if (take_u32(r, &inner, err)) return -1;
    if (inner == T_OBJECT_REF) {
        out->kind = V_REF;
        out->type = T_OBJECT_REF;
        return take_u64(r, &out->v.h, err);
    }
    if (inner == T_STR || inner == T_BYTES) {
        uint64_t n;
        const char* p;
        if (take_u64(r, &n, err) || take_inline(r, n, "a string argument", &p, err)) return -1;
        return text_value(out, p, n, inner == T_STR, err);
    }
    return mr_fail(err, MR_BAD_REQUEST, "an object of type index %u (sent as %d) cannot travel over TVM's RPC", inner,
                   (int)outer);
}

/* One value. `last`: a byte array (or string) of at least stream_min bytes that ends the packet stays on the
   stream (V_STREAMED, its size in v.h). */
static int read_value(tvm_reader* r, int last, uint64_t stream_min, tvm_value* out, mr_error* err) {
    int32_t t;
    uint8_t p[8];
    memset(out, 0, sizeof(*out));
    if (take_i32(r, &t, err)) return -1;
    switch (t) {
    case T_NONE: out->kind = V_NONE; return 0;
    case T_INT:
    case T_BOOL:
        if (take(r, p, 8, err)) return -1;
        out->kind = t == T_INT ? V_INT : V_BOOL;
        out->v.i = (int64_t)le(p, 8);
        if (t == T_BOOL) out->v.i = out->v.i != 0;
        return 0;
    case T_FLOAT: {
        if (take(r, p, 8, err)) return -1;
        uint64_t bits = le(p, 8);
        out->kind = V_FLOAT;
        memcpy(&out->v.f, &bits, 8);
        return 0;
    }
    case T_PTR:
        out->kind = V_PTR;
        return take_u64(r, &out->v.h, err);
    case T_DTYPE:
        if (take(r, p, 8, err)) return -1; /* code, bits, lanes, 4 bytes of padding */
        out->kind = V_DTYPE;
        out->v.dtype.code = p[0];
        out->v.dtype.bits = p[1];
        out->v.dtype.lanes = (uint16_t)le(p + 2, 2);
        return 0;
    case T_DEVICE:
        if (take(r, p, 8, err)) return -1;
        out->kind = V_DEVICE;
        out->v.device.type = (int32_t)(uint32_t)le(p, 4);
        out->v.device.id = (int32_t)(uint32_t)le(p + 4, 4);
        return 0;
    case T_DLTENSOR:
        out->kind = V_TENSOR;
        return read_tensor(r, &out->v.t, err);
    case T_RAW_STR:
    case T_BYTE_ARRAY: {
        uint64_t n;
        const char* s;
        if (take_u64(r, &n, err)) return -1;
        if (last && n >= stream_min && n == r->left) {
            out->kind = V_STREAMED;
            out->type = t;
            out->v.h = n;
            return 0;
        }
        if (take_inline(r, n, t == T_RAW_STR ? "a string argument" : "a byte array argument", &s, err)) return -1;
        return text_value(out, s, n, t == T_RAW_STR, err);
    }
    case T_FUNCTION:
    case T_MODULE:
        out->kind = V_REF;
        out->type = t;
        return take_u64(r, &out->v.h, err);
    default: break;
    }
    if (t >= T_OBJECT || t == T_SMALL_STR || t == T_SMALL_BYTES) {
        if ((t == T_BYTES || t == T_SMALL_BYTES) && last) {
            uint32_t inner;
            uint64_t n;
            const char* s;
            if (take_u32(r, &inner, err)) return -1;
            if (inner != T_BYTES)
                return mr_fail(err, MR_BAD_REQUEST, "a byte array sent as type index %d holds type index %u", (int)t, inner);
            if (take_u64(r, &n, err)) return -1;
            if (n >= stream_min && n == r->left) {
                out->kind = V_STREAMED;
                out->type = T_BYTE_ARRAY;
                out->v.h = n;
                return 0;
            }
            if (take_inline(r, n, "a byte array argument", &s, err)) return -1;
            return text_value(out, s, n, 0, err);
        }
        return read_object(r, t, out, err);
    }
    return mr_fail(err, MR_BAD_REQUEST, "unknown TVM type index %d in the arguments", (int)t);
}

/* A packed sequence: i32 count, then the values (in the arena). */
static int read_packed(tvm_reader* r, int stream_last, uint64_t stream_min, tvm_value** values, int32_t* count,
                       mr_error* err) {
    int32_t n;
    if (take_i32(r, &n, err)) return -1;
    if (n < 0 || n > MAX_ARGS) return mr_fail(err, MR_BAD_REQUEST, "a packed sequence of %d values (at most %d)", (int)n, MAX_ARGS);
    tvm_value* v = (tvm_value*)mp_alloc(r->arena, (size_t)(n ? n : 1) * sizeof(tvm_value));
    if (!v) return mr_fail(err, MR_REMOTE, "out of memory");
    for (int32_t i = 0; i < n; ++i)
        if (read_value(r, stream_last && i == n - 1, stream_min, &v[i], err)) return -1;
    *values = v;
    *count = n;
    return 0;
}

/* ---- the handshake (in the listener) ----------------------------------------------------------------- */
static int is_space(uint8_t c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

int mr_tvm_check_key(const uint8_t* key, size_t n, const mr_config* cfg, const char* matchkey, char* timeout,
                     size_t timeout_cap, char* key_out, size_t key_cap, mr_error* err) {
    char a[300], b[300];
    timeout[0] = key_out[0] = '\0';
    if (!mp_valid_utf8(key, (size_t)n)) return mr_fail(err, MR_KEY_MISMATCH, "the TVM handshake key is not UTF-8");
    size_t i = 0, first_start = 0, first_end = 0;
    int words = 0;
    while (i < n) { /* whitespace-separated words: the key, then -name=value options */
        while (i < n && is_space(key[i])) ++i;
        if (i == n) break;
        size_t start = i;
        while (i < n && !is_space(key[i])) ++i;
        if (!words++) {
            first_start = start, first_end = i;
            continue;
        }
        const uint8_t* eq = (const uint8_t*)memchr(key + start, '=', i - start);
        if (eq && key[start] == '-' && eq - (key + start) == 8 && !memcmp(key + start + 1, "timeout", 7)) {
            size_t len = (size_t)(key + i - (eq + 1));
            if (len < timeout_cap) {
                memcpy(timeout, eq + 1, len);
                timeout[len] = '\0';
            } else { /* too long to be a number: kept so that it fails as one */
                snprintf(timeout, timeout_cap, "%.*s...", (int)(timeout_cap - 4), (const char*)(eq + 1));
            }
        }
    }
    static const char prefix[] = "client:";
    size_t plen = sizeof(prefix) - 1;
    if (!words || first_end - first_start < plen || memcmp(key + first_start, prefix, plen) != 0)
        return mr_fail(err, MR_KEY_MISMATCH, "a TVM client's handshake key starts with 'client:', not %s",
                       py_repr_str((const char*)key, n < 60 ? n : 60, a, sizeof(a)));
    const char* ck = (const char*)key + first_start + plen;
    size_t cn = first_end - first_start - plen;
    if (memchr(ck, '\0', cn)) return mr_fail(err, MR_KEY_MISMATCH, "the key must not hold a NUL byte");
    snprintf(key_out, key_cap, "%.*s", (int)cn, ck);
    py_repr_str(cfg->key, strlen(cfg->key), a, sizeof(a));
    if (matchkey) {
        if (strlen(matchkey) != cn || memcmp(ck, matchkey, cn) != 0)
            return mr_fail(err, MR_KEY_MISMATCH, "this server of key %s is handed out by a tracker: request it with "
                           "rpc.connect_tracker(host, port).request(%s)", a, a);
    } else if (*cfg->key && cn) { /* the key, alone or followed by ':' and anything (a proxy's match key) */
        size_t k = strlen(cfg->key);
        if (cn < k || memcmp(ck, cfg->key, k) != 0 || (cn > k && ck[k] != ':'))
            return mr_fail(err, MR_KEY_MISMATCH, "this server serves key %s, the client asked for %s", a,
                           py_repr_str(ck, cn, b, sizeof(b)));
    }
    return 0;
}

int mr_tvm_check_init(const uint8_t* body, size_t n, mr_error* err) {
    mp_arena arena = {0};
    tvm_reader r = {NULL, body, n, MAX_INLINE, &arena, 0};
    int32_t code, count = 0;
    uint64_t vlen;
    char version[65];
    tvm_value* ctor = NULL;
    int rc = -1;
    if (take_i32(&r, &code, err)) goto malformed;
    if (code != C_INIT_SERVER) {
        mr_fail(err, MR_PROTOCOL, "expected TVM's INIT_SERVER packet (code 2) after the handshake, got code %d", (int)code);
        goto out;
    }
    if (take_u64(&r, &vlen, err)) goto malformed;
    if (vlen > 64) {
        mr_fail(err, MR_PROTOCOL, "a TVM protocol version of %llu bytes", (unsigned long long)vlen);
        goto out;
    }
    if (take(&r, version, vlen, err)) goto malformed;
    version[vlen] = '\0';
    if (vlen != strlen(PROTOCOL_VERSION) || memcmp(version, PROTOCOL_VERSION, vlen) != 0) {
        for (uint64_t i = 0; i < vlen; ++i)
            if ((uint8_t)version[i] < 0x20 || (uint8_t)version[i] >= 0x7f) version[i] = '?';
        mr_fail(err, MR_PROTOCOL, "client protocol version mismatch with the server: server protocol=%s, client "
                "protocol=%s (use apache-tvm 0.27's RPC client)", PROTOCOL_VERSION, version);
        goto out;
    }
    if (read_packed(&r, 0, 0, &ctor, &count, err)) {
        char why[MR_ERR_CAP - 64];
        snprintf(why, sizeof(why), "%.*s", (int)sizeof(why) - 1, err->msg);
        mr_fail(err, MR_PROTOCOL, "malformed INIT_SERVER arguments: %s", why);
        goto out;
    }
    if (r.left) {
        mr_fail(err, MR_PROTOCOL, "%llu bytes after the INIT_SERVER arguments", (unsigned long long)r.left);
        goto out;
    }
    if (count) { /* only a local session: [] or ["rpc.LocalSession"] */
        const tvm_value* name = &ctor[0];
        int local = count == 1 && name->kind == V_STR && name->v.s.n == 16 && !memcmp(name->v.s.p, "rpc.LocalSession", 16);
        if (!local) {
            char shown[300];
            if (name->kind == V_STR) py_repr_str(name->v.s.p, name->v.s.n, shown, sizeof(shown));
            else snprintf(shown, sizeof(shown), "'%s'", value_type_name(name));
            if (strlen(shown) > 100) strcpy(shown + 97, "...");
            mr_fail(err, MR_UNSUPPORTED, "session constructor %s is not supported by this server for TVM's client "
                    "(supported: rpc.LocalSession; for a server behind this one, use a proxy or its tracker)", shown);
            goto out;
        }
    }
    rc = 0;
    goto out;
malformed:
    err->code = MR_PROTOCOL;
out:
    mp_arena_free(&arena);
    return rc;
}

/* ---- writing packets ----------------------------------------------------------------------------------- */
/* Begin a packet in b (its u64 length patched by end_packet): returns where it starts. */
static size_t begin_packet(mp_buf* b, int code) {
    size_t at = b->len;
    put_le(b, 0, 8);
    put_le(b, (uint32_t)code, 4);
    return at;
}

static void end_packet(mp_buf* b, size_t at, uint64_t extra) {
    if (b->failed) return;
    uint64_t n = b->len - at - 8 + extra;
    for (int i = 0; i < 8; ++i) b->data[at + i] = (uint8_t)(n >> (8 * i));
}

static void put_i32(mp_buf* b, int32_t v) { put_le(b, (uint32_t)v, 4); }
static void put_none(mp_buf* b) { put_i32(b, T_NONE); }
static void put_int(mp_buf* b, int64_t v) {
    put_i32(b, T_INT);
    put_le(b, (uint64_t)v, 8);
}
static void put_bool(mp_buf* b, int v) {
    put_i32(b, T_BOOL);
    put_le(b, v ? 1 : 0, 8);
}
static void put_float(mp_buf* b, double v) {
    uint64_t bits;
    memcpy(&bits, &v, 8);
    put_i32(b, T_FLOAT);
    put_le(b, bits, 8);
}
static void put_ptr(mp_buf* b, uint64_t h) {
    put_i32(b, T_PTR);
    put_le(b, h, 8);
}
static void put_text(mp_buf* b, int type, const void* p, uint64_t n) {
    put_i32(b, type);
    put_le(b, n, 8);
    mp_put_raw(b, p, (size_t)n);
}

void mr_tvm_put_exception(mp_buf* b, int code, const char* msg) {
    size_t at = begin_packet(b, C_EXCEPTION);
    size_t n = strlen(msg), prefix = 0;
    if (code == MR_SESSION_TIMEOUT && strncmp(msg, SESSION_TIMEOUT_PREFIX, sizeof(SESSION_TIMEOUT_PREFIX) - 1) != 0)
        prefix = sizeof(SESSION_TIMEOUT_PREFIX) - 1;
    put_i32(b, 1);
    put_i32(b, T_RAW_STR);
    put_le(b, prefix + n, 8);
    mp_put_raw(b, SESSION_TIMEOUT_PREFIX, prefix);
    mp_put_raw(b, msg, n); /* (a C string holds no NUL: nothing to escape) */
    end_packet(b, at, 0);
}

void mr_notice_nowait(int fd, int is_socket, int tvm, int code, const char* msg) {
    if (!tvm) {
        conn_send_error_nowait(fd, is_socket, code, msg);
        return;
    }
    mp_buf b = {0};
    mr_tvm_put_exception(&b, code, msg);
    if (!b.failed) conn_send_nowait(fd, is_socket, b.data, b.len);
    mp_buf_free(&b);
}

/* ---- the session (in the worker) ------------------------------------------------------------------------- */
enum {
    L_UPLOAD, L_DOWNLOAD, L_REMOVE, L_LISTDIR, L_LOAD_MODULE, L_DOWNLOAD_LINKED, L_MODULE_GET_FUNCTION,
    L_IMPORT_MODULE, L_TIME_EVALUATOR, L_RANDOM_FILL, L_SYSTEM_LIB, L_EVALUATOR,
};
static const struct {
    const char* name;
    int kind;
} BUILTINS[] = {
    {"tvm.rpc.server.upload", L_UPLOAD},
    {"tvm.rpc.server.download", L_DOWNLOAD},
    {"tvm.rpc.server.remove", L_REMOVE},
    {"tvm.rpc.server.listdir", L_LISTDIR},
    {"tvm.rpc.server.load_module", L_LOAD_MODULE},
    {"tvm.rpc.server.download_linked_module", L_DOWNLOAD_LINKED},
    {"tvm.rpc.server.ModuleGetFunction", L_MODULE_GET_FUNCTION},
    {"tvm.rpc.server.ImportModule", L_IMPORT_MODULE},
    {"runtime.RPCTimeEvaluator", L_TIME_EVALUATOR},
    {"tvm.contrib.random.random_fill", L_RANDOM_FILL},
    {"tvm.contrib.random.random_fill_for_measure", L_RANDOM_FILL},
    {"ffi.SystemLib", L_SYSTEM_LIB},
};
#define N_BUILTINS (sizeof(BUILTINS) / sizeof(BUILTINS[0]))

/* A function served here: a builtin, or a time evaluator (its function, device and options). */
typedef struct {
    uint64_t id;
    int kind;
    uint64_t fn;          /* L_EVALUATOR: the session function it times (freed with it) */
    int64_t options[9];   /* device_type, device_id, number, repeat, min_repeat_ms, limit_zero_time_iterations,
                             cooldown_interval_ms, repeats_to_cooldown, cache_flush_bytes */
    char* preproc;        /* f_preproc ("" none) */
} tvm_local;

/* What a packet answers beyond its head in T.out: tensor bytes, or a file. */
typedef struct {
    const uint8_t* data;
    uint64_t data_len;
    int fd; /* the reply file of requests.c (DOWNLOAD, LINK_MODULE), -1: none */
    uint64_t fd_len;
    uint8_t* swapped; /* a big-endian device: data in wire order, swapped back once sent */
    int swap_code, swap_bits;
} tvm_reply;

static struct {
    mr_conn* c;
    mr_shared* shared;
    mp_buf out; /* the reply being built */
    tvm_local* locals;
    size_t n_locals, cap_locals;
    uint64_t next_local;
    uint64_t views[MAX_ARGS + 2]; /* tensor views made for the packet being served (dropped after it) */
    size_t n_views;
    int shutdown;
} T;

/* ---- arguments of requests.c's operations (mp_node lists, in the arena) ---- */
static mp_node* new_nodes(size_t n, mr_error* err) {
    mp_node* out = (mp_node*)mp_alloc(mr_worker_arena(), (n ? n : 1) * sizeof(mp_node));
    if (!out) mr_fail(err, MR_REMOTE, "out of memory");
    else memset(out, 0, (n ? n : 1) * sizeof(mp_node));
    return out;
}

static void node_str(mp_node* n, const char* s, size_t len) {
    n->type = MP_STR;
    n->len = (uint32_t)len;
    n->v.s = s;
}

static void node_int(mp_node* n, int64_t v) {
    n->type = MP_INT;
    n->v.i = v;
}

static void node_handle(mp_node* n, int ext, uint64_t id) {
    n->type = MP_EXT;
    n->ext = (uint8_t)ext;
    n->v.u = id;
}

static void node_array(mp_node* n, mp_node* items, uint32_t len) {
    n->type = MP_ARRAY;
    n->len = len;
    n->v.items = items;
}

/* A one-string-argument list for UPLOAD, DOWNLOAD, ... */
static mp_node* str_args(const tvm_value* v, mr_error* err) {
    mp_node* list = new_nodes(2, err);
    if (!list) return NULL;
    node_str(&list[1], v->v.s.p, (size_t)v->v.s.n);
    node_array(&list[0], &list[1], 1);
    return list;
}

/* requests.c's reply, parsed. */
static mp_node* reply_node(mr_error* err) {
    size_t n;
    const uint8_t* p = mr_worker_reply(&n);
    mp_node* out = NULL;
    char perr[256];
    if (mp_parse(p, n, mr_worker_arena(), &out, perr, sizeof(perr))) {
        mr_fail(err, MR_REMOTE, "%s", perr);
        return NULL;
    }
    return out;
}

/* Run an operation; the error of a lost connection ends the session (T.shutdown). */
static int request(int kind, const mp_node* args, uint64_t bulk_len, mr_error* err) {
    int rc = mr_worker_request(kind, args, bulk_len, err);
    if (rc == MR_LOST) {
        T.shutdown = 1;
        return mr_fail(err, MR_PROTOCOL, "the connection was lost");
    }
    return rc;
}

/* ---- argument checks ---- */
static int arity(int32_t n, int32_t want, const char* name, mr_error* err) {
    if (n != want) return mr_fail(err, MR_BAD_REQUEST, "%s takes %d arguments, got %d", name, (int)want, (int)n);
    return 0;
}

static int want_str(const tvm_value* v, int i, const char* name, mr_error* err) {
    if (v[i].kind != V_STR)
        return mr_fail(err, MR_BAD_REQUEST, "%s: argument %d must be a string, not %s", name, i, value_type_name(&v[i]));
    return 0;
}

static int want_int(const tvm_value* v, int i, const char* name, mr_error* err) {
    if (v[i].kind != V_INT)
        return mr_fail(err, MR_BAD_REQUEST, "%s: argument %d must be an int, not %s", name, i, value_type_name(&v[i]));
    return 0;
}

static int want_device(const tvm_value* v, mr_error* err) {
    if (!v || v->kind != V_DEVICE)
        return mr_fail(err, MR_BAD_REQUEST, "expected a device, got %s", v ? value_type_name(v) : "NoneType");
    return mr_worker_check_device(v->v.device.type, v->v.device.id, err);
}

/* ---- tensors ---- */
static void swap_order(uint8_t* p, uint64_t nbytes, int code, int bits) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    unsigned unit = code == 5 ? (unsigned)bits / 16u : (unsigned)bits / 8u; /* complex: each component */
    if (bits % 8 || unit < 2) return;
    for (uint64_t i = 0; i + unit <= nbytes; i += unit)
        for (unsigned a = 0, b = unit - 1; a < b; ++a, --b) {
            uint8_t x = p[i + a];
            p[i + a] = p[i + b];
            p[i + b] = x;
        }
#else
    (void)p, (void)nbytes, (void)code, (void)bits;
#endif
}

/* The bytes a tensor description covers: prod(shape) * ceil(bits * lanes / 8), or -1 with err. */
static int described_bytes(const tvm_tensor* t, uint64_t* out, mr_error* err) {
    if (!t->bits || !t->lanes)
        return mr_fail(err, MR_BAD_REQUEST, "a tensor argument of dtype [%d, %d, %d]: bits and lanes must be >= 1",
                       t->code, t->bits, t->lanes);
    uint64_t n = ((uint64_t)t->bits * t->lanes + 7) / 8;
    int zero = 0, overflow = 0;
    for (int32_t i = 0; i < t->ndim; ++i) {
        if (t->shape[i] < 0)
            return mr_fail(err, MR_BAD_REQUEST, "tensor dimensions must be 0..2**63-1, not %lld", (long long)t->shape[i]);
        uint64_t d = (uint64_t)t->shape[i];
        if (!d) zero = 1;
        else if (n > UINT64_MAX / d) overflow = 1;
        else n *= d;
    }
    if (zero) n = 0;
    else if (overflow) n = UINT64_MAX;
    *out = n;
    return 0;
}

/* The session tensor a description names, and the bytes it describes: checked to lie inside it. */
static int described(const tvm_tensor* t, mr_tensor_info* info, uint64_t* nbytes, mr_error* err) {
    if (mr_worker_tensor(t->data, info, err)) return -1;
    if (t->device_type != info->device_type || t->device_id != info->device_id)
        return mr_fail(err, MR_BAD_REQUEST, "a tensor argument names device (%d, %d), its memory is on (%d, %d)",
                       (int)t->device_type, (int)t->device_id, (int)info->device_type, (int)info->device_id);
    if (described_bytes(t, nbytes, err)) return -1;
    if (t->byte_offset > info->nbytes || *nbytes > info->nbytes - t->byte_offset)
        return mr_fail(err, MR_BAD_REQUEST, "a tensor argument of %llu bytes at byte offset %llu overruns its "
                       "allocation of %llu bytes", (unsigned long long)*nbytes, (unsigned long long)t->byte_offset,
                       (unsigned long long)info->nbytes);
    return 0;
}

/* The handle for a tensor argument: its tensor's, or a view's when it describes part of it (another shape,
   dtype or a byte offset, as TVM's views send it). 0 with err. */
static uint64_t tensor_arg(const tvm_tensor* t, uint64_t* nbytes, mr_error* err) {
    mr_tensor_info info;
    uint64_t n = 0;
    if (mr_worker_tensor(t->data, &info, err)) return 0;
    int same = t->device_type == info.device_type && t->device_id == info.device_id && t->ndim == info.ndim &&
               t->code == info.code && t->bits == info.bits && t->lanes == info.lanes && !t->byte_offset;
    for (int32_t i = 0; same && i < t->ndim; ++i) same = t->shape[i] == info.shape[i];
    if (same) {
        if (nbytes) *nbytes = info.nbytes;
        return t->data;
    }
    if (described(t, &info, &n, err)) return 0;
    if (T.n_views >= sizeof(T.views) / sizeof(T.views[0])) {
        mr_fail(err, MR_BAD_REQUEST, "too many tensor views in one packet");
        return 0;
    }
    uint64_t id = mr_worker_add_view(t->data, t->byte_offset, t->ndim, t->shape, t->code, t->bits, t->lanes, n);
    if (!id) {
        mr_fail(err, MR_REMOTE, "out of memory");
        return 0;
    }
    T.views[T.n_views++] = id;
    if (nbytes) *nbytes = n;
    return id;
}

/* CALL's and TIME_EVAL's argument list: tensors as handles, the rest as they are. `flush`: the bytes of the
   tensor arguments after the first (cache_flush_cpu_non_first_arg). */
static mp_node* call_args(tvm_reader* r, tvm_value* args, int32_t n, uint64_t* flush, mr_error* err) {
    mp_node* list = new_nodes((size_t)n + 1, err);
    if (!list) return NULL;
    mp_node* items = list + 1;
    if (flush) *flush = 0;
    for (int32_t i = 0; i < n; ++i) {
        tvm_value* a = &args[i];
        mp_node* out = &items[i];
        switch (a->kind) {
        case V_NONE: out->type = MP_NIL; break;
        case V_INT: node_int(out, a->v.i); break;
        case V_BOOL:
            out->type = MP_BOOL;
            out->v.i = a->v.i;
            break;
        case V_FLOAT:
            out->type = MP_FLOAT;
            out->v.f = a->v.f;
            break;
        case V_STREAMED: { /* a large last argument: held after all, within the packet's budget */
            char what[32];
            const char* p;
            snprintf(what, sizeof(what), "argument %d", (int)i);
            if (take_inline(r, a->v.h, what, &p, err) || text_value(a, p, a->v.h, a->type == T_RAW_STR, err)) return NULL;
        }
            /* fall through */
        case V_STR:
        case V_BYTES:
            if (a->v.s.n > UINT32_MAX) {
                mr_fail(err, MR_TOO_LARGE, "argument %d is too large", (int)i);
                return NULL;
            }
            out->type = a->kind == V_STR ? MP_STR : MP_BIN;
            out->len = (uint32_t)a->v.s.n;
            out->v.s = a->v.s.p;
            break;
        case V_TENSOR: {
            uint64_t bytes = 0, id = tensor_arg(a->v.t, &bytes, err);
            if (!id) return NULL;
            node_handle(out, MP_EXT_TENSOR, id);
            if (flush && i > 0) *flush += bytes;
            break;
        }
        default: {
            const char* what = a->kind == V_DEVICE ? "device" : a->kind == V_DTYPE ? "data type"
                               : a->kind == V_PTR  ? "pointer" : "remote object";
            mr_fail(err, MR_BAD_REQUEST, "argument %d: a %s cannot be passed to a function on a workbench server; "
                    "pass tensors, numbers, strings or bytes", (int)i, what);
            return NULL;
        }
        }
    }
    node_array(list, items, (uint32_t)n);
    return list;
}

/* ---- RETURN packets ---- */
static size_t begin_return(int32_t count) {
    size_t at = begin_packet(&T.out, C_RETURN);
    put_i32(&T.out, count);
    return at;
}

static void return_void(void) {
    size_t at = begin_return(1);
    put_none(&T.out);
    end_packet(&T.out, at, 0);
}

static void return_ptr(uint64_t h) {
    size_t at = begin_return(1);
    put_ptr(&T.out, h);
    end_packet(&T.out, at, 0);
}

/* A CALL_FUNC return: the value's type index as an int, then the value. */
static void return_handle(int type_index, uint64_t h) {
    size_t at = begin_return(2);
    put_int(&T.out, type_index);
    put_ptr(&T.out, h);
    end_packet(&T.out, at, 0);
}

static void return_none_call(void) {
    size_t at = begin_return(2);
    put_int(&T.out, T_NONE);
    put_none(&T.out);
    end_packet(&T.out, at, 0);
}

/* A CALL_FUNC return of the bytes of requests.c's reply file (a download): the head here, the file after it. */
static int return_file(tvm_reply* out, mr_error* err) {
    uint64_t len;
    int fd = mr_worker_reply_file(&len);
    if (fd < 0) return mr_fail(err, MR_REMOTE, "no file to send");
    size_t at = begin_return(2);
    put_int(&T.out, T_BYTES);
    put_i32(&T.out, T_BYTE_ARRAY);
    put_le(&T.out, len, 8);
    end_packet(&T.out, at, len);
    out->fd = fd;
    out->fd_len = len;
    return 0;
}

/* A CALL_FUNC return of a value requests.c's CALL replied (TVM's convention: [type index, value]). */
static int return_value(const mp_node* v, mr_error* err) {
    size_t at = begin_return(2);
    switch (v->type) {
    case MP_NIL:
        put_int(&T.out, T_NONE);
        put_none(&T.out);
        break;
    case MP_BOOL:
        put_int(&T.out, T_BOOL);
        put_bool(&T.out, (int)v->v.i);
        break;
    case MP_INT:
        put_int(&T.out, T_INT);
        put_int(&T.out, v->v.i);
        break;
    case MP_FLOAT:
        put_int(&T.out, T_FLOAT);
        put_float(&T.out, v->v.f);
        break;
    case MP_STR:
        put_int(&T.out, T_STR);
        put_text(&T.out, T_RAW_STR, v->v.s, v->len);
        break;
    case MP_BIN:
        put_int(&T.out, T_BYTES);
        put_text(&T.out, T_BYTE_ARRAY, v->v.s, v->len);
        break;
    default:
        T.out.len = at;
        if (v->type == MP_UINT)
            return mr_fail(err, MR_BAD_REQUEST, "the function returned a value that cannot be sent back: %llu does "
                           "not fit TVM's int64", (unsigned long long)v->v.u);
        return mr_fail(err, MR_BAD_REQUEST, "the function returned a value that cannot be sent back: the function "
                       "returned a %s, which TVM's RPC protocol cannot carry back (it carries None, bools, ints, "
                       "floats, strings and bytes)", mp_type_name(v));
    }
    end_packet(&T.out, at, 0);
    return 0;
}

/* ---- functions served here ---- */
static tvm_local* find_local(uint64_t id) {
    for (size_t i = 0; i < T.n_locals; ++i)
        if (T.locals[i].id == id) return &T.locals[i];
    return NULL;
}

static tvm_local* add_local(int kind, mr_error* err) {
    if (T.n_locals >= MAX_LOCALS) {
        mr_fail(err, MR_BAD_REQUEST, "this session holds %d functions, the most it takes: free some (their handles)",
                MAX_LOCALS);
        return NULL;
    }
    if (T.n_locals == T.cap_locals) {
        size_t cap = T.cap_locals ? T.cap_locals * 2 : 16;
        tvm_local* grown = (tvm_local*)realloc(T.locals, cap * sizeof(tvm_local));
        if (!grown) {
            mr_fail(err, MR_REMOTE, "out of memory");
            return NULL;
        }
        T.locals = grown;
        T.cap_locals = cap;
    }
    tvm_local* l = &T.locals[T.n_locals++];
    memset(l, 0, sizeof(*l));
    l->id = T.next_local++;
    l->kind = kind;
    return l;
}

static void free_session_object(uint64_t id) {
    int kind = mr_worker_object_kind(id);
    if (!kind) return; /* unknown handles are ignored */
    mp_node* list = new_nodes(2, &(mr_error){0});
    if (!list) return;
    node_handle(&list[1], kind, id);
    node_array(&list[0], &list[1], 1);
    mr_error err;
    if (request(K_FREE, list, 0, &err)) mr_log_info("freeing handle %llu failed: %s", (unsigned long long)id, err.msg);
}

static void free_local(tvm_local* l) {
    if (l->kind == L_EVALUATOR) free_session_object(l->fn);
    free(l->preproc);
    *l = T.locals[--T.n_locals];
}

static int fn_upload(tvm_reader* r, tvm_value* a, int32_t n, mr_error* err) {
    static const char name[] = "tvm.rpc.server.upload";
    if (arity(n, 2, name, err) || want_str(a, 0, name, err)) return -1;
    uint64_t size = 0;
    if (a[1].kind == V_STREAMED) size = a[1].v.h;
    else if (!((a[1].kind == V_STR || a[1].kind == V_BYTES) && a[1].v.s.n == 0)) /* the data end the packet */
        return mr_fail(err, MR_BAD_REQUEST, "tvm.rpc.server.upload takes the file's bytes as its last argument, "
                       "ending its packet, not a %s", value_type_name(&a[1]));
    mp_node* list = str_args(&a[0], err);
    if (!list) return -1;
    r->left -= size; /* requests.c reads (or drops) them */
    if (request(K_UPLOAD, list, size, err)) return -1;
    return_none_call();
    return 0;
}

static int fn_remove(tvm_value* a, int32_t n, mr_error* err) {
    static const char name[] = "tvm.rpc.server.remove";
    if (arity(n, 1, name, err) || want_str(a, 0, name, err)) return -1;
    const char* path = a[0].v.s.p;
    if (!strcmp(path, "") || !strcmp(path, ".")) { /* the session directory itself: it goes with the session */
        return_none_call();
        return 0;
    }
    mp_node* list = str_args(&a[0], err);
    if (!list) return -1;
    if (request(K_REMOVE, list, 0, err) && err->code != MR_NOT_FOUND) return -1; /* as TVM's: nothing there is fine */
    return_none_call();
    return 0;
}

static int fn_listdir(tvm_value* a, int32_t n, mr_error* err) {
    static const char name[] = "tvm.rpc.server.listdir";
    tvm_value dot;
    memset(&dot, 0, sizeof(dot));
    text_value(&dot, ".", 1, 1, err);
    if (n >= 1 && want_str(a, 0, name, err)) return -1;
    const tvm_value* path = n >= 1 && a[0].v.s.n ? &a[0] : &dot;
    mp_node* list = str_args(path, err);
    if (!list) return -1;
    if (request(K_LISTDIR, list, 0, err)) return -1;
    mp_node* names = reply_node(err);
    if (!names) return -1;
    if (names->type != MP_ARRAY) return mr_fail(err, MR_REMOTE, "LISTDIR replied %s", mp_type_name(names));
    /* TVM's C++ server's form: each entry's workspace path, then ',' */
    const char* p = path->v.s.p;
    size_t plen = strlen(p);
    int top = !strcmp(p, ".") || !strcmp(p, "./");
    while (plen && p[plen - 1] == '/') --plen;
    size_t at = begin_return(2);
    put_int(&T.out, T_STR);
    put_i32(&T.out, T_RAW_STR);
    size_t len_at = T.out.len;
    put_le(&T.out, 0, 8);
    for (uint32_t i = 0; i < names->len; ++i) {
        if (!top) {
            mp_put_raw(&T.out, p, plen);
            mp_put_raw(&T.out, "/", 1);
        }
        mp_put_raw(&T.out, names->v.items[i].v.s, names->v.items[i].len);
        mp_put_raw(&T.out, ",", 1);
    }
    if (!T.out.failed) {
        uint64_t total = T.out.len - len_at - 8;
        for (int i = 0; i < 8; ++i) T.out.data[len_at + i] = (uint8_t)(total >> (8 * i));
    }
    end_packet(&T.out, at, 0);
    return 0;
}

static int ends_with(const char* s, const char* suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

/* The module handle of a LOAD_MODULE or SYSTEM_LIB reply [handle, names, entry]. */
static int module_return(mr_error* err) {
    mp_node* reply = reply_node(err);
    if (!reply) return -1;
    if (reply->type != MP_ARRAY || !reply->len || reply->v.items[0].type != MP_EXT)
        return mr_fail(err, MR_REMOTE, "a malformed module reply");
    return_handle(T_MODULE, reply->v.items[0].v.u);
    return 0;
}

static uint64_t function_of(const tvm_value* mod, const tvm_value* name, mr_error* err) {
    mp_node* list = new_nodes(3, err);
    if (!list) return 0;
    int kind = K_GET_FUNCTION;
    if (mod && mod->kind != V_NONE) {
        node_handle(&list[1], MP_EXT_MODULE, mod->v.h);
        node_str(&list[2], name->v.s.p, (size_t)name->v.s.n);
        node_array(&list[0], &list[1], 2);
        kind = K_MODULE_FUNCTION;
    } else {
        node_str(&list[1], name->v.s.p, (size_t)name->v.s.n);
        node_array(&list[0], &list[1], 1);
    }
    if (request(kind, list, 0, err)) return 0;
    mp_node* h = reply_node(err);
    if (!h) return 0;
    if (h->type != MP_EXT) {
        mr_fail(err, MR_REMOTE, "a malformed function reply");
        return 0;
    }
    return h->v.u;
}

static int fn_module_get_function(tvm_value* a, int32_t n, mr_error* err) {
    static const char name[] = "tvm.rpc.server.ModuleGetFunction";
    if ((n != 2 && n != 3) || a[0].kind != V_REF || a[0].type != T_MODULE)
        return mr_fail(err, MR_BAD_REQUEST, "%s takes a module, a name and query_imports", name);
    if (want_str(a, 1, name, err)) return -1;
    uint64_t fn = function_of(&a[0], &a[1], err);
    if (!fn) {
        if (err->code != MR_NOT_FOUND) return -1;
        return_none_call(); /* TVM's answer: its client raises "Module has no function ..." */
        return 0;
    }
    return_handle(T_FUNCTION, fn);
    return 0;
}

static int fn_time_evaluator(tvm_value* a, int32_t n, mr_error* err) {
    static const char name[] = "runtime.RPCTimeEvaluator";
    if (arity(n, 12, name, err) || want_str(a, 1, name, err)) return -1;
    for (int i = 2; i < 11; ++i)
        if (want_int(a, i, name, err)) return -1;
    if (want_str(a, 11, name, err)) return -1;
    if (a[0].kind != V_NONE && !(a[0].kind == V_REF && a[0].type == T_MODULE))
        return mr_fail(err, MR_BAD_REQUEST, "%s: argument 0 must be a module or None", name);
    uint64_t fn = function_of(&a[0], &a[1], err);
    if (!fn) return -1;
    tvm_local* l = add_local(L_EVALUATOR, err);
    if (!l) {
        free_session_object(fn);
        return -1;
    }
    l->fn = fn;
    for (int i = 0; i < 9; ++i) l->options[i] = a[2 + i].v.i;
    l->preproc = strdup(a[11].v.s.p);
    if (!l->preproc) {
        free_local(l);
        return mr_fail(err, MR_REMOTE, "out of memory");
    }
    return_handle(T_FUNCTION, l->id);
    return 0;
}

/* A time evaluator's call: TIME_EVAL of its function with its options on these arguments; returns the seconds
   per call of each repeat as little-endian f64 bytes. */
static int run_evaluator(tvm_reader* r, const tvm_local* l, tvm_value* a, int32_t n, mr_error* err) {
    static const char* const names[] = {"number", "repeat", "min_repeat_ms", "limit_zero_time_iterations",
                                        "cooldown_interval_ms", "repeats_to_cooldown", "cache_flush_bytes"};
    int flush_preproc = !strcmp(l->preproc, CACHE_FLUSH_PREPROC), other_preproc = l->preproc[0] && !flush_preproc;
    uint64_t flush = 0;
    mp_node* values = call_args(r, a, n, &flush, err);
    if (!values) return -1;
    mp_node* list = new_nodes(5 + 2 + 2 * 8, err);
    if (!list) return -1;
    mp_node *device = list + 5, *opts = list + 7;
    node_handle(&list[1], MP_EXT_FUNCTION, l->fn);
    node_int(&device[0], l->options[0]);
    node_int(&device[1], l->options[1]);
    node_array(&list[2], device, 2);
    for (int i = 0; i < 7; ++i) {
        int64_t v = l->options[2 + i];
        if (i == 6 && flush_preproc) { /* evict the arguments but the first: write as many bytes */
            int64_t want = flush > (uint64_t)MAX_CACHE_FLUSH ? MAX_CACHE_FLUSH : (int64_t)flush;
            if (want > v) v = want;
            if (v > MAX_CACHE_FLUSH) v = MAX_CACHE_FLUSH;
        }
        node_str(&opts[2 * i], names[i], strlen(names[i]));
        node_int(&opts[2 * i + 1], v);
    }
    uint32_t pairs = 7;
    if (other_preproc) {
        node_str(&opts[14], "f_preproc", 9);
        node_str(&opts[15], l->preproc, strlen(l->preproc));
        pairs = 8;
    }
    list[3].type = MP_MAP;
    list[3].len = pairs;
    list[3].v.items = opts;
    list[4] = *values;
    node_array(&list[0], &list[1], 4);
    if (request(K_TIME_EVAL, list, 0, err)) return -1;
    mp_node* results = reply_node(err);
    if (!results) return -1;
    if (results->type != MP_ARRAY || !results->len) return mr_fail(err, MR_REMOTE, "a malformed TIME_EVAL reply");
    uint32_t repeat = results->len - 1; /* the timings, then the calls of each repeat */
    size_t at = begin_return(2);
    put_int(&T.out, T_BYTES);
    put_i32(&T.out, T_BYTE_ARRAY);
    put_le(&T.out, (uint64_t)repeat * 8, 8);
    for (uint32_t i = 0; i < repeat; ++i) {
        const mp_node* s = &results->v.items[i];
        double v = s->type == MP_FLOAT ? s->v.f : s->type == MP_INT ? (double)s->v.i : 0.0;
        uint64_t bits;
        memcpy(&bits, &v, 8);
        put_le(&T.out, bits, 8);
    }
    end_packet(&T.out, at, 0);
    return 0;
}

/* tvm.contrib.random.random_fill: floats in [-1, 1], ints in [0, 100), bools, random bits for other dtypes. */
static uint64_t rng_state;
static uint64_t rng_next(void) {
    if (!rng_state && (mr_random(&rng_state, sizeof(rng_state)) || !rng_state)) rng_state = (uint64_t)mr_now_ns() | 1;
    rng_state ^= rng_state << 13; /* xorshift64 */
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void store_le_or_native(uint8_t* p, uint64_t v, int bytes) { /* native order: the kernel reads it */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    for (int i = 0; i < bytes; ++i) p[i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
#else
    for (int i = 0; i < bytes; ++i) p[i] = (uint8_t)(v >> (8 * i));
#endif
}

static int fn_random_fill(tvm_value* a, int32_t n, mr_error* err) {
    if (n != 1 || a[0].kind != V_TENSOR) return mr_fail(err, MR_BAD_REQUEST, "random_fill takes one tensor");
    mr_tensor_info info;
    uint64_t nbytes;
    const tvm_tensor* t = a[0].v.t;
    if (described(t, &info, &nbytes, err)) return -1;
    uint8_t* p = info.data + t->byte_offset;
    int bits = t->bits, typed = t->lanes == 1 && bits % 8 == 0;
    int is_float = typed && t->code == 2 && (bits == 16 || bits == 32 || bits == 64);
    int is_int = typed && (t->code == 0 || t->code == 1) && bits <= 64;
    int is_bool = typed && t->code == 6 && bits == 8;
    unsigned size = (unsigned)bits / 8;
    if (is_float || is_int || is_bool) {
        for (uint64_t at = 0; at + size <= nbytes; at += size) {
            uint64_t r = rng_next();
            if (is_bool) p[at] = (uint8_t)(r & 1);
            else if (is_int) store_le_or_native(p + at, (r >> 11) % 100, (int)size);
            else {
                double u = (double)(r >> 11) / 9007199254740992.0 * 2.0 - 1.0; /* [-1, 1) */
                if (bits == 64) {
                    uint64_t v;
                    memcpy(&v, &u, 8);
                    store_le_or_native(p + at, v, 8);
                } else if (bits == 32) {
                    float f = (float)u;
                    uint32_t v;
                    memcpy(&v, &f, 4);
                    store_le_or_native(p + at, v, 4);
                } else { /* float16: |u| < 1, sign, exponent below 15, a random mantissa */
                    uint16_t h = (uint16_t)((u < 0 ? 0x8000 : 0) | ((r >> 1) % 15) << 10 | ((r >> 8) & 0x3ff));
                    store_le_or_native(p + at, h, 2);
                }
            }
        }
    } else {
        for (uint64_t at = 0; at < nbytes; ++at) p[at] = (uint8_t)(rng_next() >> 24);
    }
    return_none_call();
    return 0;
}

/* CALL_FUNC of a function served here. */
static int call_local(tvm_reader* r, tvm_local* l, tvm_value* a, int32_t n, tvm_reply* out, mr_error* err) {
    switch (l->kind) {
    case L_UPLOAD: return fn_upload(r, a, n, err);
    case L_DOWNLOAD:
    case L_DOWNLOAD_LINKED: {
        const char* name = l->kind == L_DOWNLOAD ? "tvm.rpc.server.download" : "tvm.rpc.server.download_linked_module";
        if (arity(n, 1, name, err) || want_str(a, 0, name, err)) return -1;
        mp_node* list = str_args(&a[0], err);
        if (!list) return -1;
        int kind = K_DOWNLOAD;
        if (l->kind == L_DOWNLOAD_LINKED && !ends_with(a[0].v.s.p, ".so") && !ends_with(a[0].v.s.p, ".dylib"))
            kind = K_LINK_MODULE; /* as TVM: a library is returned as it is */
        if (request(kind, list, 0, err)) return -1;
        return return_file(out, err);
    }
    case L_REMOVE: return fn_remove(a, n, err);
    case L_LISTDIR: return fn_listdir(a, n, err);
    case L_LOAD_MODULE: {
        static const char name[] = "tvm.rpc.server.load_module";
        if (arity(n, 1, name, err) || want_str(a, 0, name, err)) return -1;
        mp_node* list = str_args(&a[0], err);
        if (!list || request(K_LOAD_MODULE, list, 0, err)) return -1;
        return module_return(err);
    }
    case L_MODULE_GET_FUNCTION: return fn_module_get_function(a, n, err);
    case L_IMPORT_MODULE:
        return mr_fail(err, MR_UNSUPPORTED, "importing one remote module into another (tvm.rpc.server.ImportModule) "
                       "is not supported by this server: export the modules into one library instead");
    case L_TIME_EVALUATOR: return fn_time_evaluator(a, n, err);
    case L_RANDOM_FILL: return fn_random_fill(a, n, err);
    case L_SYSTEM_LIB: {
        mp_node* list = new_nodes(1, err);
        if (!list) return -1;
        node_array(list, list, 0);
        if (request(K_SYSTEM_LIB, list, 0, err)) return -1;
        return module_return(err);
    }
    default: return run_evaluator(r, l, a, n, err);
    }
}

static int call_func(tvm_reader* r, tvm_reply* out, mr_error* err) {
    uint64_t handle;
    tvm_value* args;
    int32_t n;
    if (take_u64(r, &handle, err)) return -1;
    tvm_local* l = handle >= LOCAL_BASE ? find_local(handle) : NULL;
    /* an upload's data stay on the stream whatever their size */
    uint64_t stream_min = l && l->kind == L_UPLOAD ? 0 : STREAM_MIN;
    if (read_packed(r, 1, stream_min, &args, &n, err)) return -1;
    if (l) return call_local(r, l, args, n, out, err);
    mp_node* values = call_args(r, args, n, NULL, err);
    mp_node* list = new_nodes(3, err);
    if (!values || !list) return -1;
    node_handle(&list[1], MP_EXT_FUNCTION, handle);
    list[2] = *values;
    node_array(&list[0], &list[1], 2);
    if (request(K_CALL, list, 0, err)) return -1;
    mp_node* v = reply_node(err);
    return v ? return_value(v, err) : -1;
}

/* ---- copies ---- */
static int copy_to_remote(tvm_reader* r, mr_error* err) {
    tvm_tensor* t;
    uint64_t nbytes;
    mr_tensor_info info;
    if (read_tensor(r, &t, err) || take_u64(r, &nbytes, err)) return -1;
    if (nbytes != r->left)
        return mr_fail(err, MR_BAD_REQUEST, "a copy of %llu bytes in a packet that carries %llu",
                       (unsigned long long)nbytes, (unsigned long long)r->left);
    if (mr_worker_tensor(t->data, &info, err)) return -1;
    if (t->byte_offset > info.nbytes || nbytes > info.nbytes - t->byte_offset)
        return mr_fail(err, MR_BAD_REQUEST, "a copy of %llu bytes at byte offset %llu overruns the tensor's %llu bytes",
                       (unsigned long long)nbytes, (unsigned long long)t->byte_offset, (unsigned long long)info.nbytes);
    uint8_t* dst = info.data + t->byte_offset;
    if (take(r, dst, nbytes, err)) return -1;
    swap_order(dst, nbytes, t->code, t->bits); /* from TVM's little-endian order */
    return_void();
    return 0;
}

static int copy_from_remote(tvm_reader* r, tvm_reply* out, mr_error* err) {
    tvm_tensor* t;
    uint64_t nbytes;
    mr_tensor_info info;
    if (read_tensor(r, &t, err) || take_u64(r, &nbytes, err)) return -1;
    if (mr_worker_tensor(t->data, &info, err)) return -1;
    if (t->byte_offset > info.nbytes || nbytes > info.nbytes - t->byte_offset)
        return mr_fail(err, MR_BAD_REQUEST, "a copy of %llu bytes at byte offset %llu overruns the tensor's %llu bytes",
                       (unsigned long long)nbytes, (unsigned long long)t->byte_offset, (unsigned long long)info.nbytes);
    size_t at = begin_packet(&T.out, C_COPY_ACK);
    end_packet(&T.out, at, nbytes);
    out->data = info.data + t->byte_offset;
    out->data_len = nbytes;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    swap_order(info.data + t->byte_offset, nbytes, t->code, t->bits); /* to TVM's order until it is sent */
    out->swapped = info.data + t->byte_offset;
    out->swap_code = t->code;
    out->swap_bits = t->bits;
#endif
    return 0;
}

/* ---- syscalls: one packed sequence of arguments, a RETURN of one value ---- */
static int alloc_tensor(const int64_t* shape, int32_t ndim, int code, int bits, int lanes, int32_t dt, int32_t di,
                        mr_error* err) {
    mp_node* list = new_nodes(5 + (size_t)ndim + 3, err);
    if (!list) return -1;
    mp_node *dims = list + 5, *dtype = dims + ndim;
    for (int32_t i = 0; i < ndim; ++i) node_int(&dims[i], shape[i]);
    node_array(&list[1], dims, (uint32_t)ndim);
    node_int(&dtype[0], code);
    node_int(&dtype[1], bits);
    node_int(&dtype[2], lanes);
    node_array(&list[2], dtype, 3);
    node_int(&list[3], dt);
    node_int(&list[4], di);
    node_array(&list[0], &list[1], 4);
    if (request(K_TENSOR_ALLOC, list, 0, err)) return -1;
    mp_node* h = reply_node(err);
    if (!h) return -1;
    if (h->type != MP_EXT) return mr_fail(err, MR_REMOTE, "a malformed TENSOR_ALLOC reply");
    return_ptr(h->v.u);
    return 0;
}

static int serve_syscall(int code, tvm_value* a, int32_t n, mr_error* err) {
    switch (code) {
    case C_GET_GLOBAL_FUNC: {
        if (arity(n, 1, "GetGlobalFunc", err) || want_str(a, 0, "GetGlobalFunc", err)) return -1;
        for (size_t i = 0; i < N_BUILTINS; ++i)
            if (!strcmp(BUILTINS[i].name, a[0].v.s.p) && strlen(BUILTINS[i].name) == a[0].v.s.n) {
                tvm_local* l = add_local(BUILTINS[i].kind, err);
                if (!l) return -1;
                return_ptr(l->id);
                return 0;
            }
        uint64_t fn = function_of(NULL, &a[0], err);
        if (!fn && err->code != MR_NOT_FOUND) return -1;
        if (fn) return_ptr(fn);
        else return_void(); /* TVM's answer for a missing function: its client says "no function" */
        return 0;
    }
    case C_FREE_HANDLE: {
        if (arity(n, 1, "FreeHandle", err)) return -1;
        uint64_t h = a[0].kind == V_PTR ? a[0].v.h : a[0].kind == V_INT ? (uint64_t)a[0].v.i : 0;
        tvm_local* l = h >= LOCAL_BASE ? find_local(h) : NULL;
        if (l) free_local(l);
        else if (h) free_session_object(h);
        return_void();
        return 0;
    }
    case C_DEV_SET_DEVICE:
    case C_DEV_STREAM_SYNC:
    case C_DEV_CREATE_STREAM:
    case C_DEV_FREE_STREAM:
    case C_DEV_SET_STREAM:
    case C_DEV_GET_CURRENT_STREAM: /* a CPU has no streams: TVM's answers a null stream and does nothing */
        if (want_device(n ? &a[0] : NULL, err)) return -1;
        return_void();
        return 0;
    case C_DEV_GET_ATTR: {
        if (arity(n, 2, "DevGetAttr", err)) return -1;
        if (a[0].kind != V_DEVICE || a[1].kind != V_INT)
            return mr_fail(err, MR_BAD_REQUEST, "DevGetAttr takes a device and an attribute kind");
        size_t at = begin_return(1);
        if (a[1].v.i == 0) { /* kExist */
            put_int(&T.out, a[0].v.device.type == 1 && a[0].v.device.id == 0);
        } else {
            if (want_device(&a[0], err)) {
                T.out.len = at;
                return -1;
            }
            if (a[1].v.i == 14) { /* kTotalGlobalMemory */
                long pages = sysconf(_SC_PHYS_PAGES), size = sysconf(_SC_PAGESIZE);
                put_int(&T.out, pages > 0 && size > 0 ? (int64_t)pages * size : -1);
            } else {
                put_none(&T.out); /* what TVM's CPU device answers for the others */
            }
        }
        end_packet(&T.out, at, 0);
        return 0;
    }
    case C_DEV_ALLOC_DATA:
        if (arity(n, 4, "DevAllocData", err) || want_device(&a[0], err) || want_int(a, 1, "DevAllocData", err))
            return -1;
        return alloc_tensor(&a[1].v.i, 1, 1, 8, 1, a[0].v.device.type, a[0].v.device.id, err); /* bytes: uint8 */
    case C_DEV_ALLOC_DATA_WITH_SCOPE: {
        if (arity(n, 2, "DevAllocDataWithScope", err)) return -1;
        if (a[0].kind != V_TENSOR) return mr_fail(err, MR_BAD_REQUEST, "DevAllocDataWithScope takes a tensor description");
        if (!(a[1].kind == V_NONE || (a[1].kind == V_STR && (!a[1].v.s.n || !strcmp(a[1].v.s.p, "global"))))) {
            char shown[120] = "None";
            if (a[1].kind == V_STR) py_repr_str(a[1].v.s.p, a[1].v.s.n < 60 ? a[1].v.s.n : 60, shown, sizeof(shown));
            else snprintf(shown, sizeof(shown), "<%s>", value_type_name(&a[1]));
            return mr_fail(err, MR_UNSUPPORTED, "memory scope %s is not supported by this server (only 'global')", shown);
        }
        const tvm_tensor* t = a[0].v.t;
        tvm_value dev;
        dev.kind = V_DEVICE;
        dev.v.device.type = t->device_type;
        dev.v.device.id = t->device_id;
        if (want_device(&dev, err)) return -1;
        return alloc_tensor(t->shape, t->ndim, t->code, t->bits, t->lanes, t->device_type, t->device_id, err);
    }
    case C_DEV_FREE_DATA:
        if (arity(n, 2, "DevFreeData", err)) return -1;
        if (a[1].kind == V_PTR && a[1].v.h && mr_worker_object_kind(a[1].v.h) == MP_EXT_TENSOR)
            free_session_object(a[1].v.h);
        return_void();
        return 0;
    case C_COPY_AMONG_REMOTE: {
        if (n != 3 || a[0].kind != V_TENSOR || a[1].kind != V_TENSOR)
            return mr_fail(err, MR_BAD_REQUEST, "CopyAmongRemote takes two tensors and a stream");
        mr_tensor_info from, to;
        uint64_t from_bytes, to_bytes;
        if (described(a[0].v.t, &from, &from_bytes, err) || described(a[1].v.t, &to, &to_bytes, err)) return -1;
        if (from_bytes != to_bytes)
            return mr_fail(err, MR_BAD_REQUEST, "cannot copy %llu bytes into a tensor of %llu",
                           (unsigned long long)from_bytes, (unsigned long long)to_bytes);
        memmove(to.data + a[1].v.t->byte_offset, from.data + a[0].v.t->byte_offset, (size_t)from_bytes);
        return_void();
        return 0;
    }
    default: return mr_fail(err, MR_BAD_REQUEST, "unknown TVM RPC code %d", code);
    }
}

/* Serve the packet whose code comes next (r->left bytes); the reply is in T.out (and out). */
static int serve_packet(tvm_reader* r, tvm_reply* out, mr_error* err) {
    int32_t code;
    if (take_i32(r, &code, err)) return -1;
    if (code >= C_GET_GLOBAL_FUNC && code <= C_DEV_GET_CURRENT_STREAM) {
        tvm_value* args;
        int32_t n;
        if (read_packed(r, 0, 0, &args, &n, err)) return -1;
        return serve_syscall(code, args, n, err);
    }
    switch (code) {
    case C_CALL_FUNC: return call_func(r, out, err);
    case C_COPY_TO_REMOTE: return copy_to_remote(r, err);
    case C_COPY_FROM_REMOTE: return copy_from_remote(r, out, err);
    case C_SHUTDOWN: T.shutdown = 1; return 0;
    case C_INIT_SERVER: return mr_fail(err, MR_BAD_REQUEST, "the session is already initialized (INIT_SERVER came twice)");
    case C_RETURN:
    case C_EXCEPTION:
    case C_COPY_ACK:
        return mr_fail(err, MR_BAD_REQUEST, "a client does not send TVM's RPC code %s (%d) to a server", CODE_NAMES[code],
                       (int)code);
    default: return mr_fail(err, MR_BAD_REQUEST, "unknown TVM RPC code %d", (int)code);
    }
}

/* Send T.out (and what follows it); 0, or -1 (the connection failed). */
static int send_out(const tvm_reply* out) {
    mr_conn* c = T.c;
    if (T.out.failed) return -1;
    struct iovec iov[2] = {{T.out.data, T.out.len}, {(void*)out->data, out->data ? (size_t)out->data_len : 0}};
    T.shared->sending = 1;
    int rc = conn_writev(c, iov, out->data && out->data_len ? 2 : 1);
    if (rc == 0 && out->fd >= 0 && out->fd_len) rc = conn_sendfile(c, out->fd, out->fd_len);
    T.shared->sending = 0;
    return rc;
}

static void send_exception(int code, const char* msg) {
    T.out.len = 0;
    T.out.failed = 0;
    mr_tvm_put_exception(&T.out, code, msg);
    tvm_reply none = {NULL, 0, -1, 0, NULL, 0, 0};
    if (send_out(&none)) mr_worker_connection_failed();
}

void mr_tvm_serve(mr_conn* c, mr_shared* shared) {
    static mr_error err; /* 4 KiB: kept out of the stack of kernels */
    memset(&T, 0, sizeof(T));
    T.c = c;
    T.shared = shared;
    T.next_local = LOCAL_BASE;
    return_void(); /* INIT_SERVER, read by the listener: the session is open */
    tvm_reply none = {NULL, 0, -1, 0, NULL, 0, 0};
    if (send_out(&none)) {
        mr_worker_connection_failed();
        goto done;
    }
    for (;;) {
        mp_arena_reset(mr_worker_arena());
        shared->idle_since_ns = mr_now_ns();
        shared->activity++; /* odd: waiting for a packet */
        uint8_t head[8];
        if (conn_read_exact(c, head, 8)) {
            mr_worker_connection_failed();
            break; /* the client left (or its connection failed): the session ends quietly */
        }
        shared->activity++; /* even: serving */
        uint64_t length = le(head, 8);
        if (!length) continue;
        if (length > MAX_PACKET) {
            snprintf(err.msg, sizeof(err.msg), "a packet of %llu bytes is over this server's limit of %llu; closing "
                     "this connection", (unsigned long long)length, (unsigned long long)MAX_PACKET);
            mr_log_info("closing a TVM-protocol session: %s", err.msg);
            send_exception(MR_TOO_LARGE, err.msg);
            break;
        }
        if (T.out.cap > (1u << 20)) mp_buf_free(&T.out); /* a big reply's buffer is not kept */
        T.out.len = 0;
        T.out.failed = 0;
        T.n_views = 0;
        err.code = 0;
        tvm_reader r = {c, NULL, length, MAX_INLINE, mr_worker_arena(), 0};
        tvm_reply out = {NULL, 0, -1, 0, NULL, 0, 0};
        int rc = serve_packet(&r, &out, &err);
        for (size_t i = 0; i < T.n_views; ++i) mr_worker_drop_view(T.views[i]);
        skip_rest(&r);
        if (r.lost || (T.shutdown && rc)) { /* the connection failed */
            mr_worker_reply_done();
            mr_worker_connection_failed();
            break;
        }
        if (T.shutdown) break;
        if (rc == 0 && T.out.failed) rc = mr_fail(&err, MR_REMOTE, "out of memory for the reply");
        if (rc) {
            mr_worker_reply_done();
            if (mr_worker_ending()) { /* a crash loop: the error ends the session */
                mr_log_info("ending the session: %s", err.msg);
                send_exception(err.code, err.msg);
                break;
            }
            send_exception(err.code, err.msg);
            continue;
        }
        rc = send_out(&out);
        if (out.swapped) swap_order(out.swapped, out.data_len, out.swap_code, out.swap_bits); /* back */
        mr_worker_reply_done();
        if (rc) {
            mr_worker_connection_failed();
            break;
        }
    }
done:
    for (size_t i = 0; i < T.n_locals; ++i) free(T.locals[i].preproc);
    free(T.locals);
    mp_buf_free(&T.out);
}
