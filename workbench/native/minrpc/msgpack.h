/*
 * msgpack.h: the msgpack subset of docs/protocol.md section 4 (control parts).
 *
 * Reading: mp_parse() turns one control part into a tree of mp_node, allocated in an arena that the
 * request loop resets after each request (so a long session does not grow). Strings and bins are copied
 * into the arena with a trailing NUL, so they outlive the receive buffer.
 * Writing: mp_buf, a growable byte buffer, with the smallest encoding of each value (as the Python side
 * emits: the worked example of protocol.md section 9 comes out byte for byte).
 * mp_repr() renders a value the way Python's repr() does, for error messages that match the Python server.
 */
#ifndef MINRPC_MSGPACK_H
#define MINRPC_MSGPACK_H

#include <stddef.h>
#include <stdint.h>

enum { MP_NIL, MP_BOOL, MP_INT, MP_UINT, MP_FLOAT, MP_STR, MP_BIN, MP_ARRAY, MP_MAP, MP_EXT };

/* Handle extension types (protocol.md section 4). */
enum { MP_EXT_TENSOR = 1, MP_EXT_MODULE = 2, MP_EXT_FUNCTION = 3 };

/* One value: 16 bytes on 64-bit targets. MP_UINT is only used above INT64_MAX. */
typedef struct mp_node {
    uint8_t type;
    uint8_t ext;  /* MP_EXT: the handle type */
    uint32_t len; /* MP_STR/MP_BIN: bytes; MP_ARRAY: items; MP_MAP: pairs */
    union {
        int64_t i;  /* MP_INT, MP_BOOL (0/1) */
        uint64_t u; /* MP_UINT; MP_EXT: the object id */
        double f;
        const char* s;            /* MP_STR, MP_BIN (NUL-terminated copy) */
        struct mp_node* items;    /* MP_ARRAY: len items; MP_MAP: 2*len (key, value, ...) */
    } v;
} mp_node;

/* A chunked bump allocator; mp_arena_reset keeps its first chunk and frees the rest. */
typedef struct mp_chunk mp_chunk;
typedef struct {
    mp_chunk* head;
} mp_arena;

void* mp_alloc(mp_arena* a, size_t n);
void mp_arena_reset(mp_arena* a);
void mp_arena_free(mp_arena* a);

/*
 * Parse exactly one object from data[0..len). Returns 0 and *out, or -1 with a message in err:
 * "malformed control message: ..." or "unknown msgpack extension type T (length L)" (the Python texts).
 */
int mp_parse(const uint8_t* data, size_t len, mp_arena* arena, mp_node** out, char* err, size_t errcap);

/* A map's value for a str key, or NULL. */
const mp_node* mp_map_get(const mp_node* map, const char* key);
/* Strict UTF-8: no overlongs, no surrogates, nothing above U+10FFFF (as Python's decoder). */
int mp_valid_utf8(const uint8_t* s, size_t n);

/* The output buffer. On allocation failure `failed` is set and further writes are dropped. */
typedef struct {
    uint8_t* data;
    size_t len, cap;
    int failed;
} mp_buf;

void mp_buf_free(mp_buf* b);
int mp_reserve(mp_buf* b, size_t extra);
void mp_put_raw(mp_buf* b, const void* p, size_t n);
void mp_put_nil(mp_buf* b);
void mp_put_bool(mp_buf* b, int v);
void mp_put_int(mp_buf* b, int64_t v);
void mp_put_uint(mp_buf* b, uint64_t v);
void mp_put_float(mp_buf* b, double v);
void mp_put_str(mp_buf* b, const char* s, size_t n);
void mp_put_cstr(mp_buf* b, const char* s);
void mp_put_bin(mp_buf* b, const void* p, size_t n);
void mp_put_array(mp_buf* b, uint32_t n);
void mp_put_map(mp_buf* b, uint32_t n);
void mp_put_handle(mp_buf* b, int ext, uint64_t id);
/* Write a parsed value back (echo). */
void mp_put_node(mp_buf* b, const mp_node* n);

/* Python's repr() of a value, cut to at most `limit` characters (as f"{v!r:.60}"); returns out. */
char* mp_repr(const mp_node* n, char* out, size_t cap, size_t limit);
/* Python's type name of a value: NoneType, bool, int, float, str, bytes, list, dict, Handle. */
const char* mp_type_name(const mp_node* n);
/* Python's repr() of a str (quotes and escapes), of bytes (b'...'), of a float. */
char* py_repr_str(const char* s, size_t n, char* out, size_t cap);
char* py_repr_bytes(const void* p, size_t n, char* out, size_t cap);
char* py_repr_float(double v, char* out, size_t cap);
/* Handle(TENSOR, 2) */
char* mp_handle_repr(int ext, uint64_t id, char* out, size_t cap);

#endif
