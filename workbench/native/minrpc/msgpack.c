/*
 * msgpack.c: the msgpack subset of docs/protocol.md section 4: a reader into an arena-allocated tree,
 * a writer with the smallest encodings, and Python-style repr() for error messages.
 */
#include "msgpack.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- arena ---------------------------------------------------------------------------------- */
struct mp_chunk {
    mp_chunk* next;
    size_t cap, used;
    /* data follows, 16-byte aligned */
};

#define MP_CHUNK_HEAD ((sizeof(mp_chunk) + 15) & ~(size_t)15)
#define MP_CHUNK_MIN (16 << 10)

void* mp_alloc(mp_arena* a, size_t n) {
    n = (n + 15) & ~(size_t)15;
    mp_chunk* c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > MP_CHUNK_MIN ? n : MP_CHUNK_MIN;
        if (c && cap < c->cap * 2 && c->cap * 2 <= (64u << 20)) cap = c->cap * 2; /* grow geometrically */
        if (cap < n) cap = n;
        mp_chunk* fresh = (mp_chunk*)malloc(MP_CHUNK_HEAD + cap);
        if (!fresh) return NULL;
        fresh->cap = cap;
        fresh->used = 0;
        fresh->next = c;
        a->head = c = fresh;
    }
    void* p = (char*)c + MP_CHUNK_HEAD + c->used;
    c->used += n;
    return p;
}

void mp_arena_reset(mp_arena* a) {
    mp_chunk* c = a->head;
    if (!c) return;
    /* keep the oldest (smallest) chunk only: memory stays flat across requests */
    while (c->next) {
        mp_chunk* next = c->next;
        free(c);
        c = next;
    }
    if (c->cap > MP_CHUNK_MIN) {
        free(c);
        a->head = NULL;
        return;
    }
    c->used = 0;
    a->head = c;
}

void mp_arena_free(mp_arena* a) {
    while (a->head) {
        mp_chunk* next = a->head->next;
        free(a->head);
        a->head = next;
    }
}

/* ---- reader ----------------------------------------------------------------------------------- */
#define MP_MAX_DEPTH 512
/* items of arrays and maps in one control part: 2 Mi nodes, 32 MiB of them, whatever a 16 MiB part holds
   (workbench/rpc/wire/protocol.py MAX_OBJECTS) */
#define MP_MAX_OBJECTS (2u << 20)

typedef struct {
    const uint8_t* p;
    const uint8_t* start;
    const uint8_t* end;
    mp_arena* arena;
    char* err;
    size_t errcap;
    uint64_t objects; /* items of arrays and maps so far */
} mp_reader;

static int rd_fail(mp_reader* r, const char* what) {
    snprintf(r->err, r->errcap, "malformed control message: %s (at byte %ld of %ld)", what, (long)(r->p - r->start),
             (long)(r->end - r->start));
    return -1;
}

static int need(mp_reader* r, size_t n) {
    if ((size_t)(r->end - r->p) < n) return rd_fail(r, "the data ends inside an object (truncated)");
    return 0;
}

static uint64_t be(const uint8_t* p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; ++i) v = (v << 8) | p[i];
    return v;
}

/* Strict UTF-8: no overlongs, no surrogates, nothing above U+10FFFF (as Python's decoder). */
int mp_valid_utf8(const uint8_t* s, size_t n) {
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            ++i;
            continue;
        }
        int k;
        uint32_t cp, min;
        if ((c & 0xE0) == 0xC0) k = 1, cp = c & 0x1F, min = 0x80;
        else if ((c & 0xF0) == 0xE0) k = 2, cp = c & 0x0F, min = 0x800;
        else if ((c & 0xF8) == 0xF0) k = 3, cp = c & 0x07, min = 0x10000;
        else return 0;
        if (i + (size_t)k >= n) return 0; /* the sequence runs past the end */
        for (int j = 1; j <= k; ++j) {
            if (i + (size_t)j >= n || (s[i + j] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
        i += (size_t)k + 1;
    }
    return 1;
}

static int parse_node(mp_reader* r, mp_node* n, int depth);

static int parse_bytes(mp_reader* r, mp_node* n, size_t len, int is_str) {
    if (need(r, len)) return -1;
    if (len > 0xFFFFFFFFu) return rd_fail(r, "a string over 4 GiB");
    if (is_str && !mp_valid_utf8(r->p, len)) return rd_fail(r, "a str that is not valid UTF-8");
    char* copy = (char*)mp_alloc(r->arena, len + 1);
    if (!copy) return rd_fail(r, "out of memory");
    memcpy(copy, r->p, len);
    copy[len] = '\0';
    r->p += len;
    n->type = is_str ? MP_STR : MP_BIN;
    n->len = (uint32_t)len;
    n->v.s = copy;
    return 0;
}

static int parse_items(mp_reader* r, mp_node* n, uint64_t count, int is_map, int depth) {
    if (depth >= MP_MAX_DEPTH) return rd_fail(r, "objects nested too deeply");
    uint64_t nodes = is_map ? count * 2 : count;
    /* every item takes at least one byte: refuse counts the data cannot hold before allocating */
    if (nodes > (uint64_t)(r->end - r->p)) return rd_fail(r, "the data ends inside an object (truncated)");
    r->objects += nodes;
    if (r->objects > MP_MAX_OBJECTS) {
        char what[120];
        snprintf(what, sizeof(what), "more than %u items of lists and dicts in one message (send data as a "
                 "tensor or bytes)", MP_MAX_OBJECTS);
        return rd_fail(r, what);
    }
    n->type = is_map ? MP_MAP : MP_ARRAY;
    n->len = (uint32_t)count;
    n->v.items = NULL;
    if (!nodes) return 0;
    mp_node* items = (mp_node*)mp_alloc(r->arena, (size_t)nodes * sizeof(mp_node));
    if (!items) return rd_fail(r, "out of memory");
    n->v.items = items;
    for (uint64_t i = 0; i < nodes; ++i) {
        if (parse_node(r, &items[i], depth + 1)) return -1;
        if (is_map && !(i & 1) && items[i].type != MP_STR && items[i].type != MP_BIN) {
            static const char* names[] = {"None", "bool", "int", "int", "float", "str", "bytes", "list", "dict", "ExtType"};
            char what[96];
            snprintf(what, sizeof(what), "a map key of type %s (keys are str)", names[items[i].type]);
            return rd_fail(r, what);
        }
    }
    return 0;
}

static int parse_ext(mp_reader* r, mp_node* n, size_t len) {
    if (need(r, 1 + len)) return -1;
    int type = (int8_t)r->p[0];
    if (type < MP_EXT_TENSOR || type > MP_EXT_FUNCTION || len != 8) {
        snprintf(r->err, r->errcap, "unknown msgpack extension type %d (length %lu)", type, (unsigned long)len);
        return -1;
    }
    const uint8_t* p = r->p + 1;
    uint64_t id = 0;
    for (int i = 7; i >= 0; --i) id = (id << 8) | p[i]; /* little-endian u64 */
    n->type = MP_EXT;
    n->ext = (uint8_t)type;
    n->len = 8;
    n->v.u = id;
    r->p += 1 + len;
    return 0;
}

static int parse_node(mp_reader* r, mp_node* n, int depth) {
    if (need(r, 1)) return -1;
    uint8_t c = *r->p++;
    n->ext = 0;
    n->len = 0;
    if (c <= 0x7f) {
        n->type = MP_INT;
        n->v.i = c;
        return 0;
    }
    if (c >= 0xe0) {
        n->type = MP_INT;
        n->v.i = (int8_t)c;
        return 0;
    }
    if (c >= 0xa0 && c <= 0xbf) return parse_bytes(r, n, c & 0x1f, 1);
    if (c >= 0x90 && c <= 0x9f) return parse_items(r, n, c & 0x0f, 0, depth);
    if (c >= 0x80 && c <= 0x8f) return parse_items(r, n, c & 0x0f, 1, depth);
    switch (c) {
    case 0xc0: n->type = MP_NIL; return 0;
    case 0xc2: n->type = MP_BOOL; n->v.i = 0; return 0;
    case 0xc3: n->type = MP_BOOL; n->v.i = 1; return 0;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: {
        int w = 1 << (c - 0xcc);
        if (need(r, (size_t)w)) return -1;
        uint64_t v = be(r->p, w);
        r->p += w;
        if (v > (uint64_t)INT64_MAX) { n->type = MP_UINT; n->v.u = v; }
        else { n->type = MP_INT; n->v.i = (int64_t)v; }
        return 0;
    }
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int w = 1 << (c - 0xd0);
        if (need(r, (size_t)w)) return -1;
        uint64_t v = be(r->p, w);
        r->p += w;
        int64_t s;
        if (w == 1) s = (int8_t)v;
        else if (w == 2) s = (int16_t)v;
        else if (w == 4) s = (int32_t)v;
        else s = (int64_t)v;
        n->type = MP_INT;
        n->v.i = s;
        return 0;
    }
    case 0xca: {
        if (need(r, 4)) return -1;
        uint32_t bits = (uint32_t)be(r->p, 4);
        float f;
        memcpy(&f, &bits, 4);
        r->p += 4;
        n->type = MP_FLOAT;
        n->v.f = f;
        return 0;
    }
    case 0xcb: {
        if (need(r, 8)) return -1;
        uint64_t bits = be(r->p, 8);
        double d;
        memcpy(&d, &bits, 8);
        r->p += 8;
        n->type = MP_FLOAT;
        n->v.f = d;
        return 0;
    }
    case 0xd9: case 0xda: case 0xdb:
    case 0xc4: case 0xc5: case 0xc6: {
        int is_str = c >= 0xd9;
        int w = 1 << (is_str ? c - 0xd9 : c - 0xc4);
        if (need(r, (size_t)w)) return -1;
        uint64_t len = be(r->p, w);
        r->p += w;
        return parse_bytes(r, n, (size_t)len, is_str);
    }
    case 0xdc: case 0xdd: case 0xde: case 0xdf: {
        int w = (c == 0xdc || c == 0xde) ? 2 : 4;
        if (need(r, (size_t)w)) return -1;
        uint64_t count = be(r->p, w);
        r->p += w;
        return parse_items(r, n, count, c >= 0xde, depth);
    }
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:
        return parse_ext(r, n, (size_t)1 << (c - 0xd4));
    case 0xc7: case 0xc8: case 0xc9: {
        int w = 1 << (c - 0xc7);
        if (need(r, (size_t)w)) return -1;
        uint64_t len = be(r->p, w);
        r->p += w;
        return parse_ext(r, n, (size_t)len);
    }
    default: /* 0xc1 */
        --r->p;
        return rd_fail(r, "byte 0xc1, which msgpack never uses (FormatError)");
    }
}

int mp_parse(const uint8_t* data, size_t len, mp_arena* arena, mp_node** out, char* err, size_t errcap) {
    mp_reader r = {data, data, data + len, arena, err, errcap, 0};
    if (len == 0) {
        snprintf(err, errcap, "malformed control message: an empty control part");
        return -1;
    }
    mp_node* root = (mp_node*)mp_alloc(arena, sizeof(mp_node));
    if (!root) {
        snprintf(err, errcap, "malformed control message: out of memory");
        return -1;
    }
    if (parse_node(&r, root, 0)) return -1;
    if (r.p != r.end) {
        char what[96];
        snprintf(what, sizeof(what), "%ld bytes of extra data after the object (ExtraData)", (long)(r.end - r.p));
        return rd_fail(&r, what);
    }
    *out = root;
    return 0;
}

const mp_node* mp_map_get(const mp_node* map, const char* key) {
    if (!map || map->type != MP_MAP) return NULL;
    size_t klen = strlen(key);
    const mp_node* found = NULL; /* the last one wins, as in a Python dict */
    for (uint32_t i = 0; i < map->len; ++i) {
        const mp_node* k = &map->v.items[2 * i];
        if (k->type == MP_STR && k->len == klen && memcmp(k->v.s, key, klen) == 0) found = &map->v.items[2 * i + 1];
    }
    return found;
}

/* ---- writer ----------------------------------------------------------------------------------- */
void mp_buf_free(mp_buf* b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    b->failed = 0;
}

int mp_reserve(mp_buf* b, size_t extra) {
    if (b->failed) return -1;
    if (b->cap - b->len >= extra) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra) {
        if (cap > ((size_t)1 << 62)) {
            b->failed = 1;
            return -1;
        }
        cap *= 2;
    }
    uint8_t* grown = (uint8_t*)realloc(b->data, cap);
    if (!grown) {
        b->failed = 1;
        return -1;
    }
    b->data = grown;
    b->cap = cap;
    return 0;
}

void mp_put_raw(mp_buf* b, const void* p, size_t n) {
    if (mp_reserve(b, n)) return;
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void put_be(mp_buf* b, uint8_t tag, uint64_t v, int w) {
    if (mp_reserve(b, 1 + (size_t)w)) return;
    uint8_t* p = b->data + b->len;
    p[0] = tag;
    for (int i = 0; i < w; ++i) p[1 + i] = (uint8_t)(v >> (8 * (w - 1 - i)));
    b->len += 1 + (size_t)w;
}

static void put_byte(mp_buf* b, uint8_t c) {
    if (mp_reserve(b, 1)) return;
    b->data[b->len++] = c;
}

void mp_put_nil(mp_buf* b) { put_byte(b, 0xc0); }
void mp_put_bool(mp_buf* b, int v) { put_byte(b, v ? 0xc3 : 0xc2); }

void mp_put_uint(mp_buf* b, uint64_t v) {
    if (v <= 0x7f) put_byte(b, (uint8_t)v);
    else if (v <= 0xff) put_be(b, 0xcc, v, 1);
    else if (v <= 0xffff) put_be(b, 0xcd, v, 2);
    else if (v <= 0xffffffffu) put_be(b, 0xce, v, 4);
    else put_be(b, 0xcf, v, 8);
}

void mp_put_int(mp_buf* b, int64_t v) {
    if (v >= 0) {
        mp_put_uint(b, (uint64_t)v);
        return;
    }
    if (v >= -32) put_byte(b, (uint8_t)(int8_t)v);
    else if (v >= INT8_MIN) put_be(b, 0xd0, (uint64_t)v, 1);
    else if (v >= INT16_MIN) put_be(b, 0xd1, (uint64_t)v, 2);
    else if (v >= INT32_MIN) put_be(b, 0xd2, (uint64_t)v, 4);
    else put_be(b, 0xd3, (uint64_t)v, 8);
}

void mp_put_float(mp_buf* b, double v) {
    uint64_t bits;
    memcpy(&bits, &v, 8);
    put_be(b, 0xcb, bits, 8);
}

static void put_len(mp_buf* b, size_t n, uint8_t fix, uint8_t fixmax, uint8_t t8, uint8_t t16, uint8_t t32) {
    if (fix && n <= fixmax) put_byte(b, (uint8_t)(fix | n));
    else if (t8 && n <= 0xff) put_be(b, t8, n, 1);
    else if (n <= 0xffff) put_be(b, t16, n, 2);
    else put_be(b, t32, n, 4);
}

void mp_put_str(mp_buf* b, const char* s, size_t n) {
    put_len(b, n, 0xa0, 31, 0xd9, 0xda, 0xdb);
    mp_put_raw(b, s, n);
}

void mp_put_cstr(mp_buf* b, const char* s) { mp_put_str(b, s, strlen(s)); }

void mp_put_bin(mp_buf* b, const void* p, size_t n) {
    put_len(b, n, 0, 0, 0xc4, 0xc5, 0xc6);
    mp_put_raw(b, p, n);
}

void mp_put_array(mp_buf* b, uint32_t n) { put_len(b, n, 0x90, 15, 0, 0xdc, 0xdd); }
void mp_put_map(mp_buf* b, uint32_t n) { put_len(b, n, 0x80, 15, 0, 0xde, 0xdf); }

void mp_put_handle(mp_buf* b, int ext, uint64_t id) {
    if (mp_reserve(b, 10)) return;
    uint8_t* p = b->data + b->len;
    p[0] = 0xd7;
    p[1] = (uint8_t)ext;
    for (int i = 0; i < 8; ++i) p[2 + i] = (uint8_t)(id >> (8 * i));
    b->len += 10;
}

void mp_put_node(mp_buf* b, const mp_node* n) {
    switch (n->type) {
    case MP_NIL: mp_put_nil(b); break;
    case MP_BOOL: mp_put_bool(b, (int)n->v.i); break;
    case MP_INT: mp_put_int(b, n->v.i); break;
    case MP_UINT: mp_put_uint(b, n->v.u); break;
    case MP_FLOAT: mp_put_float(b, n->v.f); break;
    case MP_STR: mp_put_str(b, n->v.s, n->len); break;
    case MP_BIN: mp_put_bin(b, n->v.s, n->len); break;
    case MP_EXT: mp_put_handle(b, n->ext, n->v.u); break;
    case MP_ARRAY:
        mp_put_array(b, n->len);
        for (uint32_t i = 0; i < n->len; ++i) mp_put_node(b, &n->v.items[i]);
        break;
    case MP_MAP:
        mp_put_map(b, n->len);
        for (uint32_t i = 0; i < 2 * n->len; ++i) mp_put_node(b, &n->v.items[i]);
        break;
    }
}

/* ---- repr --------------------------------------------------------------------------------------- */
typedef struct {
    char* out;
    size_t cap, len, limit; /* limit: characters (bytes) kept at most */
} rbuf;

static void rb_add(rbuf* r, const char* s, size_t n) {
    for (size_t i = 0; i < n && r->len < r->limit && r->len + 1 < r->cap; ++i) r->out[r->len++] = s[i];
    r->out[r->len] = '\0';
}

static void rb_cstr(rbuf* r, const char* s) { rb_add(r, s, strlen(s)); }

static int rb_full(const rbuf* r) { return r->len >= r->limit || r->len + 1 >= r->cap; }

static void rb_quoted(rbuf* r, const char* s, size_t n, int bytes) {
    int has_single = memchr(s, '\'', n) != NULL, has_double = memchr(s, '"', n) != NULL;
    char q = (has_single && !has_double) ? '"' : '\'';
    char tmp[8];
    if (bytes) rb_add(r, "b", 1);
    rb_add(r, &q, 1);
    for (size_t i = 0; i < n && !rb_full(r); ++i) {
        unsigned char c = (unsigned char)s[i];
        if (c == (unsigned char)q || c == '\\') {
            tmp[0] = '\\';
            tmp[1] = (char)c;
            rb_add(r, tmp, 2);
        } else if (c == '\n') rb_add(r, "\\n", 2);
        else if (c == '\r') rb_add(r, "\\r", 2);
        else if (c == '\t') rb_add(r, "\\t", 2);
        else if (c < 0x20 || c == 0x7f || (bytes && c >= 0x80)) {
            snprintf(tmp, sizeof(tmp), "\\x%02x", c);
            rb_add(r, tmp, 4);
        } else if (!bytes && c == 0xc2 && i + 1 < n && (unsigned char)s[i + 1] < 0xa0) {
            snprintf(tmp, sizeof(tmp), "\\x%02x", (unsigned char)s[i + 1]); /* U+0080..U+009F: not printable */
            rb_add(r, tmp, 4);
            ++i;
        } else {
            tmp[0] = (char)c;
            rb_add(r, tmp, 1);
        }
    }
    rb_add(r, &q, 1);
}

char* py_repr_float(double v, char* out, size_t cap) {
    if (isnan(v)) {
        snprintf(out, cap, "nan");
        return out;
    }
    if (isinf(v)) {
        snprintf(out, cap, v > 0 ? "inf" : "-inf");
        return out;
    }
    /* the shortest digits that round-trip, then Python's 'r' layout: fixed for 1e-4 <= |v| < 1e16 */
    char sci[40];
    int prec;
    for (prec = 1; prec <= 17; ++prec) {
        snprintf(sci, sizeof(sci), "%.*e", prec - 1, v);
        if (strtod(sci, NULL) == v) break;
    }
    char* e = strchr(sci, 'e');
    int exp = atoi(e + 1);
    char digits[24];
    size_t nd = 0;
    for (const char* p = sci; p < e; ++p)
        if (*p >= '0' && *p <= '9') digits[nd++] = *p;
    while (nd > 1 && digits[nd - 1] == '0') --nd;
    digits[nd] = '\0';
    const char* sign = v < 0 || (v == 0 && signbit(v)) ? "-" : "";
    if (exp < -4 || exp >= 16) {
        if (nd == 1) snprintf(out, cap, "%s%ce%c%02d", sign, digits[0], exp < 0 ? '-' : '+', abs(exp));
        else snprintf(out, cap, "%s%c.%se%c%02d", sign, digits[0], digits + 1, exp < 0 ? '-' : '+', abs(exp));
    } else if (exp < 0) {
        snprintf(out, cap, "%s0.%0*d%s", sign, -exp - 1, 0, digits);
        if (-exp - 1 == 0) snprintf(out, cap, "%s0.%s", sign, digits);
    } else if ((size_t)exp + 1 >= nd) {
        snprintf(out, cap, "%s%s%0*d.0", sign, digits, (int)((size_t)exp + 1 - nd), 0);
        if ((size_t)exp + 1 == nd) snprintf(out, cap, "%s%s.0", sign, digits);
    } else {
        snprintf(out, cap, "%s%.*s.%s", sign, exp + 1, digits, digits + exp + 1);
    }
    return out;
}

static const char* ext_name(int ext) {
    return ext == MP_EXT_TENSOR ? "TENSOR" : ext == MP_EXT_MODULE ? "MODULE" : "FUNCTION";
}

char* mp_handle_repr(int ext, uint64_t id, char* out, size_t cap) {
    snprintf(out, cap, "Handle(%s, %llu)", ext_name(ext), (unsigned long long)id);
    return out;
}

static void repr_node(rbuf* r, const mp_node* n, int depth) {
    char tmp[64];
    if (rb_full(r)) return;
    switch (n->type) {
    case MP_NIL: rb_cstr(r, "None"); break;
    case MP_BOOL: rb_cstr(r, n->v.i ? "True" : "False"); break;
    case MP_INT: snprintf(tmp, sizeof(tmp), "%lld", (long long)n->v.i); rb_cstr(r, tmp); break;
    case MP_UINT: snprintf(tmp, sizeof(tmp), "%llu", (unsigned long long)n->v.u); rb_cstr(r, tmp); break;
    case MP_FLOAT: rb_cstr(r, py_repr_float(n->v.f, tmp, sizeof(tmp))); break;
    case MP_STR: rb_quoted(r, n->v.s, n->len, 0); break;
    case MP_BIN: rb_quoted(r, n->v.s, n->len, 1); break;
    case MP_EXT: rb_cstr(r, mp_handle_repr(n->ext, n->v.u, tmp, sizeof(tmp))); break;
    case MP_ARRAY:
    case MP_MAP: {
        int map = n->type == MP_MAP;
        rb_cstr(r, map ? "{" : "[");
        if (depth > 32) rb_cstr(r, "...");
        for (uint32_t i = 0; i < n->len && depth <= 32 && !rb_full(r); ++i) {
            if (i) rb_cstr(r, ", ");
            if (map) {
                repr_node(r, &n->v.items[2 * i], depth + 1);
                rb_cstr(r, ": ");
                repr_node(r, &n->v.items[2 * i + 1], depth + 1);
            } else {
                repr_node(r, &n->v.items[i], depth + 1);
            }
        }
        rb_cstr(r, map ? "}" : "]");
        break;
    }
    }
}

char* mp_repr(const mp_node* n, char* out, size_t cap, size_t limit) {
    rbuf r = {out, cap, 0, limit ? limit : (size_t)-1};
    out[0] = '\0';
    repr_node(&r, n, 0);
    return out;
}

const char* mp_type_name(const mp_node* n) {
    static const char* names[] = {"NoneType", "bool", "int", "int", "float", "str", "bytes", "list", "dict", "Handle"};
    return names[n->type];
}

char* py_repr_str(const char* s, size_t n, char* out, size_t cap) {
    rbuf r = {out, cap, 0, (size_t)-1};
    out[0] = '\0';
    rb_quoted(&r, s, n, 0);
    return out;
}

char* py_repr_bytes(const void* p, size_t n, char* out, size_t cap) {
    rbuf r = {out, cap, 0, (size_t)-1};
    out[0] = '\0';
    rb_quoted(&r, (const char*)p, n, 1);
    return out;
}
