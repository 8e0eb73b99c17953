/*
 * wire_out.h: what the two call fast paths, the client's (runtime/_shim.c) and the session worker's
 * (rpc/server/_serve.c), write the same way: the frame header of docs/protocol.md, and plain Python
 * values (None, bool, int up to 64 bits, float, str, bytes) as msgpack-python's
 * Packer(use_bin_type=True) encodes them, byte for byte.
 */
#ifndef WORKBENCH_WIRE_OUT_H
#define WORKBENCH_WIRE_OUT_H

#include <Python.h>
#include <stdint.h>
#include <string.h>

/* The 16-byte frame header, little-endian: u32 ctrl_len, u16 kind, u16 flags, u64 bulk_len. */
enum { HEADER_SIZE = 16 };

/* A header of `kind` with a control part of ctrl_len bytes, flags 0 and no bulk part. */
static inline void put_header(unsigned char *head, uint32_t ctrl_len, uint16_t kind) {
  memset(head, 0, HEADER_SIZE);
  for (int i = 0; i < 4; i++) head[i] = (unsigned char)(ctrl_len >> (8 * i));
  head[4] = (unsigned char)(kind & 0xFF);
  head[5] = (unsigned char)(kind >> 8);
}

/* Call a lock's bound `release`, keeping the exception already set: -1 (with release's exception
 * instead) if releasing failed, else 0. */
static inline int release_lock(PyObject *release) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyObject *r = PyObject_CallNoArgs(release);
  if (r == NULL) {
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    return -1;
  }
  Py_DECREF(r);
  PyErr_Restore(type, value, tb);
  return 0;
}

typedef struct {
  unsigned char *p;
  size_t len, cap;
} Out;

/* `bytes` little-endian bytes at p (the frame header's byte order). */
static inline uint64_t get_le(const unsigned char *p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

static inline int out_put(Out *o, const void *src, size_t n) {
  if (o->cap - o->len < n) return -1;
  memcpy(o->p + o->len, src, n);
  o->len += n;
  return 0;
}

/* `tag` then `bytes` big-endian bytes of `v` (msgpack's byte order); bytes 0: the tag alone. */
static inline int out_tag(Out *o, unsigned char tag, uint64_t v, int bytes) {
  unsigned char b[9];
  b[0] = tag;
  for (int i = 0; i < bytes; i++) b[1 + i] = (unsigned char)(v >> (8 * (bytes - 1 - i)));
  return out_put(o, b, (size_t)bytes + 1);
}

/* A length-prefixed item: fix (tag_fix | n below fix_max), else the 8/16/32-bit forms (tag8 0: none). */
static inline int out_sized(Out *o, size_t n, int tag_fix, size_t fix_max, int tag8, int tag16, int tag32) {
  if (tag_fix >= 0 && n < fix_max) return out_tag(o, (unsigned char)(tag_fix | (int)n), 0, 0);
  if (tag8 && n <= 0xFF) return out_tag(o, (unsigned char)tag8, n, 1);
  if (n <= 0xFFFF) return out_tag(o, (unsigned char)tag16, n, 2);
  if (n <= 0xFFFFFFFFu) return out_tag(o, (unsigned char)tag32, n, 4);
  return -1;
}

/*
 * A plain value: 0 once encoded; 1 (nothing written) when `v` is of another type; -1 with no exception
 * set when it cannot be encoded here (the frame is full, an int over 64 bits, a str with lone surrogates):
 * the Python path then sends it, or says why it cannot.
 */
static inline int out_plain(Out *o, PyObject *v) {
  PyTypeObject *t = Py_TYPE(v);
  if (v == Py_None) return out_tag(o, 0xC0, 0, 0);
  if (v == Py_True) return out_tag(o, 0xC3, 0, 0);
  if (v == Py_False) return out_tag(o, 0xC2, 0, 0);
  if (t == &PyLong_Type) {
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow > 0) {
      unsigned long long u = PyLong_AsUnsignedLongLong(v);
      if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
      }
      return out_tag(o, 0xCF, u, 8);
    }
    if (overflow < 0 || (x == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return -1;
    }
    if (x >= 0) {
      if (x < 0x80) return out_tag(o, (unsigned char)x, 0, 0);
      if (x <= 0xFF) return out_tag(o, 0xCC, (uint64_t)x, 1);
      if (x <= 0xFFFF) return out_tag(o, 0xCD, (uint64_t)x, 2);
      if (x <= 0xFFFFFFFFLL) return out_tag(o, 0xCE, (uint64_t)x, 4);
      return out_tag(o, 0xCF, (uint64_t)x, 8);
    }
    if (x >= -32) return out_tag(o, (unsigned char)(x & 0xFF), 0, 0);
    if (x >= -128) return out_tag(o, 0xD0, (uint64_t)x, 1);
    if (x >= -32768) return out_tag(o, 0xD1, (uint64_t)x, 2);
    if (x >= -2147483648LL) return out_tag(o, 0xD2, (uint64_t)x, 4);
    return out_tag(o, 0xD3, (uint64_t)x, 8);
  }
  if (t == &PyFloat_Type) {
    double d = PyFloat_AS_DOUBLE(v);
    uint64_t bits;
    memcpy(&bits, &d, 8);
    return out_tag(o, 0xCB, bits, 8);
  }
  if (t == &PyUnicode_Type) {
    Py_ssize_t n;
    const char *text = PyUnicode_AsUTF8AndSize(v, &n);
    if (text == NULL) {
      PyErr_Clear();
      return -1;
    }
    if (out_sized(o, (size_t)n, 0xA0, 32, 0xD9, 0xDA, 0xDB) < 0) return -1;
    return out_put(o, text, (size_t)n);
  }
  if (t == &PyBytes_Type) {
    size_t n = (size_t)PyBytes_GET_SIZE(v);
    if (out_sized(o, n, -1, 0, 0xC4, 0xC5, 0xC6) < 0) return -1;
    return out_put(o, PyBytes_AS_STRING(v), n);
  }
  return 1;
}

#endif
