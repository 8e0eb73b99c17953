/*
 * The kernel-ABI shim: the one native piece of rpc-workbench.
 *
 * Kernels follow the TVM FFI packed C ABI.  A kernel library needs exactly one
 * symbol from a runtime, TVMFFIErrorSetRaisedFromCStrParts, to report errors.
 * This file defines it (the loader opens this file RTLD_GLOBAL before any
 * kernel), keeps the last error per thread for Python to read, and holds the
 * timing loop behind time_evaluator so that timing a 100 ns kernel measures
 * the kernel, not the Python call, and the cache flush of cache_flush_bytes.
 *
 * It is built as a (trivial) CPython extension so that pip compiles it with
 * the package; Python uses it through ctypes.
 */
#include <Python.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
  int32_t type_index;
  uint32_t pad;
  union {
    int64_t v_int64;
    double v_float64;
    void* v_ptr;
  };
} WBAny;

typedef int (*WBPackedFunc)(void* self, const WBAny* args, int32_t nargs, WBAny* ret);

#define WB_ERR_CAP 4096
static __thread char wb_error[WB_ERR_CAP];

__attribute__((visibility("default")))
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  size_t used = 0;
  if (kind && *kind) used = (size_t)snprintf(wb_error, WB_ERR_CAP, "%s: ", kind);
  if (used >= WB_ERR_CAP) used = WB_ERR_CAP - 1;
  for (int32_t i = 0; parts && i < n && used < WB_ERR_CAP - 1; ++i) {
    if (!parts[i]) continue;
    size_t len = strlen(parts[i]);
    if (len > WB_ERR_CAP - 1 - used) len = WB_ERR_CAP - 1 - used;
    memcpy(wb_error + used, parts[i], len);
    used += len;
  }
  wb_error[used] = '\0';
}

/* Older kernels and hand-written ones may use the single-string form. */
__attribute__((visibility("default")))
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  const char* parts[1] = {message};
  TVMFFIErrorSetRaisedFromCStrParts(kind, parts, 1);
}

__attribute__((visibility("default")))
const char* wb_last_error(void) { return wb_error; }

__attribute__((visibility("default")))
void wb_clear_error(void) { wb_error[0] = '\0'; }

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/*
 * time_evaluator's cache_flush_bytes: write (then read) one byte per cache line of a
 * buffer of that size, so that the data a kernel touched is evicted before the clock
 * starts.  The buffer is kept and grown as needed; a session worker is one thread.
 */
static unsigned char* wb_flush_buf;
static int64_t wb_flush_cap;
static int64_t wb_flush_count;
static int64_t wb_flush_bytes;
static volatile unsigned wb_flush_sink;

__attribute__((visibility("default")))
int wb_flush_cache(int64_t nbytes) {
  if (nbytes <= 0) return 0;
  if (nbytes > wb_flush_cap) {
    unsigned char* grown = (unsigned char*)realloc(wb_flush_buf, (size_t)nbytes);
    if (!grown) return -1;
    wb_flush_buf = grown;
    wb_flush_cap = nbytes;
  }
  volatile unsigned char* p = wb_flush_buf;
  unsigned sum = 0;
  for (int64_t i = 0; i < nbytes; i += 64) p[i] = (unsigned char)(p[i] + 1);
  for (int64_t i = 0; i < nbytes; i += 64) sum += p[i];
  wb_flush_sink = sum;
  wb_flush_count += 1;
  wb_flush_bytes += nbytes;
  return 0;
}

__attribute__((visibility("default")))
int64_t wb_cache_flushes(void) { return wb_flush_count; }

__attribute__((visibility("default")))
int64_t wb_cache_flushed_bytes(void) { return wb_flush_bytes; }

/* Call fn `number` times back to back; store the elapsed nanoseconds.
   With flush_bytes > 0, flush that many bytes of cache first (outside the timed span). */
__attribute__((visibility("default")))
int wb_time_calls_flushed(void* fn, const WBAny* args, int32_t nargs, int64_t number, int64_t flush_bytes,
                          int64_t* elapsed_ns) {
  WBPackedFunc f = (WBPackedFunc)fn;
  WBAny ret;
  if (flush_bytes > 0 && wb_flush_cache(flush_bytes) != 0) {
    const char* parts[1] = {"cannot allocate the buffer for cache_flush_bytes"};
    TVMFFIErrorSetRaisedFromCStrParts("MemoryError", parts, 1);
    return -1;
  }
  int64_t start = now_ns();
  for (int64_t i = 0; i < number; ++i) {
    memset(&ret, 0, sizeof(ret));
    int rc = f(NULL, args, nargs, &ret);
    if (rc != 0) return rc;
  }
  *elapsed_ns = now_ns() - start;
  return 0;
}

__attribute__((visibility("default")))
int wb_time_calls(void* fn, const WBAny* args, int32_t nargs, int64_t number, int64_t* elapsed_ns) {
  return wb_time_calls_flushed(fn, args, nargs, number, 0, elapsed_ns);
}

static struct PyModuleDef shim_module = {PyModuleDef_HEAD_INIT, "_shim",
                                         "rpc-workbench kernel-ABI shim (used through ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__shim(void) { return PyModule_Create(&shim_module); }
