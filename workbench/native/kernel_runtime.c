/*
 * kernel_runtime.c: the kernel-ABI runtime shared by the Python server's shim and minrpc.
 *
 * See kernel_runtime.h for what it provides.  Kernels follow the TVM FFI packed C ABI; a kernel
 * library needs one symbol from a runtime, TVMFFIErrorSetRaisedFromCStrParts, defined here (the
 * Python loader opens the shim RTLD_GLOBAL before any kernel; minrpc is linked with -rdynamic).
 * The last error is kept per thread for the caller to read.  The timing loop behind
 * time_evaluator lives here so that timing a 100 ns kernel measures the kernel, not the caller.
 *
 * The rest is what TVM's runtime gives a kernel through the context slots TVM-exported libraries
 * define (pointers the loader fills after dlopen: ffi.py fill_context_slots, minrpc's
 * mr_fill_context_slots): a thread pool behind TVMBackendParallelLaunch and
 * TVMBackendParallelBarrier, workspaces behind TVMBackendAllocWorkspace and
 * TVMBackendFreeWorkspace, TVMFFIHandleInitOnce, the functions registered in the process behind
 * TVMFFIEnvModLookupFromImports and TVMFFIFunctionCall, and for every runtime function it does not
 * provide a stub that fails the kernel with an error naming it.
 *
 * C99 (gnu99), POSIX threads, GCC/Clang __atomic builtins; no Python headers.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT, RTLD_DEFAULT */
#endif
#include "kernel_runtime.h"

#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Every name of kernel_runtime.h is exported from the shared object (ctypes finds it there) and
   from minrpc's executable (-rdynamic: kernel libraries bind to it). */
#define WB_EXPORT __attribute__((visibility("default")))

/* Sequentially consistent atomics on plain integers (what <stdatomic.h>'s defaults do). */
#define WB_LOAD(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define WB_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_SEQ_CST)
#define WB_FETCH_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_SEQ_CST)
#define WB_FETCH_SUB(p, v) __atomic_fetch_sub((p), (v), __ATOMIC_SEQ_CST)

static __thread char wb_error[WB_ERR_CAP];

/* Our own error setter.  This runtime calls this one, never the exported name: in a process that
   also loaded TVM's FFI library globally, that name binds to TVM's definition. */
static void wb_error_set_parts(const char* kind, const char** parts, int32_t n) {
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

WB_EXPORT void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  wb_error_set_parts(kind, parts, n);
}

/* Older kernels and hand-written ones may use the single-string form. */
WB_EXPORT void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  const char* parts[1] = {message};
  wb_error_set_parts(kind, parts, 1);
}

/*
 * A kernel loaded into a process where TVM's FFI library is loaded globally (a LocalSession in a
 * notebook that imported tvm) binds its TVMFFIErrorSetRaisedFromCStrParts to TVM's, which keeps
 * the error in TVM's thread-local state.  Move it from there into ours (TVMFFIErrorMoveFromRaised
 * hands out an Error object: a 24-byte TVMFFIObject header, then kind and message byte arrays).
 */
static void wb_take_foreign_error(void) {
  static void (*move_from_raised)(void**);
  static int (*dec_ref)(void*);
  static int looked_up;
  if (!__atomic_load_n(&looked_up, __ATOMIC_ACQUIRE)) {
    move_from_raised = (void (*)(void**))dlsym(RTLD_DEFAULT, "TVMFFIErrorMoveFromRaised");
    dec_ref = (int (*)(void*))dlsym(RTLD_DEFAULT, "TVMFFIObjectDecRef");
    __atomic_store_n(&looked_up, 1, __ATOMIC_RELEASE);
  }
  if (!move_from_raised || !dec_ref) return;
  void* err = NULL;
  move_from_raised(&err);
  if (!err) return;
  const WBByteArray* kind = (const WBByteArray*)((const char*)err + 24);
  const WBByteArray* message = kind + 1;
  snprintf(wb_error, WB_ERR_CAP, "%.*s: %.*s", (int)(kind->size < 200 ? kind->size : 200), kind->data,
           (int)(message->size < WB_ERR_CAP - 210 ? message->size : WB_ERR_CAP - 210), message->data);
  dec_ref(err);
}

WB_EXPORT const char* wb_last_error(void) {
  if (!wb_error[0]) wb_take_foreign_error();
  return wb_error;
}

WB_EXPORT void wb_clear_error(void) { wb_error[0] = '\0'; }

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

WB_EXPORT int wb_flush_cache(int64_t nbytes) {
  if (nbytes <= 0) return 0;
  if ((uint64_t)nbytes > (uint64_t)(SIZE_MAX / 2)) return -1; /* a 32-bit device: more than it can address */
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

WB_EXPORT int64_t wb_cache_flushes(void) { return wb_flush_count; }

WB_EXPORT int64_t wb_cache_flushed_bytes(void) { return wb_flush_bytes; }

/* Call fn `number` times back to back; store the elapsed nanoseconds.
   With flush_bytes > 0, flush that many bytes of cache first (outside the timed span). */
WB_EXPORT int wb_time_calls_flushed(void* fn, const WBAny* args, int32_t nargs, int64_t number, int64_t flush_bytes,
                          int64_t* elapsed_ns) {
  WBPackedFunc f = (WBPackedFunc)fn;
  WBAny ret;
  if (flush_bytes > 0 && wb_flush_cache(flush_bytes) != 0) {
    const char* parts[1] = {"cannot allocate the buffer for cache_flush_bytes"};
    wb_error_set_parts("MemoryError", parts, 1);
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

WB_EXPORT int wb_time_calls(void* fn, const WBAny* args, int32_t nargs, int64_t number, int64_t* elapsed_ns) {
  return wb_time_calls_flushed(fn, args, nargs, number, 0, elapsed_ns);
}

/* ==========================================================================
 * What TVM's runtime gives a kernel through its context slots.
 * ========================================================================== */

static void wb_set_error(const char* kind, const char* text) {
  const char* parts[1] = {text};
  wb_error_set_parts(kind, parts, 1);
}

/* -- the thread pool --------------------------------------------------------
 * TVM's semantics (tvm/runtime/c_backend_api.h): a launch runs
 * flambda(task_id, env, cdata) for task_id in [0, num_task), num_task = 0 meaning
 * one task per pool thread; env->num_task is the task count and env->sync_handle
 * is what TVMBackendParallelBarrier(task_id, env) synchronises on.  The calling
 * thread runs task 0 itself; the pool holds the other threads.  A launch from
 * inside a parallel region (or while another thread's launch holds the pool) runs
 * on the calling thread as one task (num_task = 1): the kernel splits its work by
 * num_task, so that is the whole loop, serially.  The launch returns -1 if any
 * task returned non-zero, with the first failing task's error message.
 */
#define WB_MAX_THREADS 1024
#define WB_SPIN_ROUNDS 20000

typedef struct {
  WBParallelLambda flambda;
  void* cdata;
  int32_t num_task;   /* task ids 0 .. num_task-1 */
  int32_t nthreads;   /* threads running them: task t runs on thread t % nthreads */
  int pending; /* pool threads of this region not finished yet */
  int failed;
  int barrier_count;
  int barrier_gen;
  char error[WB_ERR_CAP];
} WBRegion;

typedef struct {
  int nthreads; /* including the thread that launches */
  pthread_t* threads;
  pthread_mutex_t launch_lock; /* one launch at a time */
  pthread_mutex_t mu;
  pthread_cond_t work_cv;
  pthread_cond_t done_cv;
  unsigned generation;
  int sleepers;
  int caller_sleeping;
  int stop;
  WBRegion region; /* the current launch: every pool thread acknowledges it before the next one */
} WBPool;

typedef struct {
  WBPool* pool;
  int index;
} WBThreadArg;

static WBPool* wb_pool;
static pthread_mutex_t wb_pool_create_lock = PTHREAD_MUTEX_INITIALIZER;
static __thread int wb_in_parallel;

static inline void wb_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* One round of a spin-wait: mostly a pause, but every 64th round gives the CPU away, so that on a loaded machine
   a spinner does not burn the time slice of the thread it waits for when both share one CPU. */
static inline void wb_spin_wait(int spin) {
  if ((spin & 63) == 63)
    sched_yield();
  else
    wb_cpu_relax();
}

static int wb_env_threads(const char* name) {
  const char* v = getenv(name);
  if (!v || !*v) return 0;
  char* end = NULL;
  long n = strtol(v, &end, 10);
  if (end == v || *end != '\0' || n <= 0) return 0;
  return n > WB_MAX_THREADS ? WB_MAX_THREADS : (int)n;
}

/* TVM_NUM_THREADS, then OMP_NUM_THREADS, then the CPUs this process may run on. */
WB_EXPORT int wb_default_num_threads(void) {
  int n = wb_env_threads("TVM_NUM_THREADS");
  if (!n) n = wb_env_threads("OMP_NUM_THREADS");
  if (!n) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  }
  if (n <= 0) n = (int)sysconf(_SC_NPROCESSORS_ONLN);
  if (n <= 0) n = 1;
  return n > WB_MAX_THREADS ? WB_MAX_THREADS : n;
}

static void wb_run_share(WBRegion* r, int thread_index) {
  WBParallelGroupEnv env;
  env.sync_handle = r;
  env.num_task = r->num_task;
  for (int t = thread_index; t < r->num_task; t += r->nthreads) {
    wb_error[0] = '\0';
    if (r->flambda(t, &env, r->cdata) != 0) {
      if (!wb_error[0]) wb_take_foreign_error();
      int expected = 0;
      if (__atomic_compare_exchange_n(&r->failed, &expected, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        if (wb_error[0])
          snprintf(r->error, WB_ERR_CAP, "%s", wb_error);
        else
          snprintf(r->error, WB_ERR_CAP, "task %d of a parallel loop failed without a message", t);
      }
    }
  }
}

static void* wb_pool_main(void* arg) {
  WBPool* pool = ((WBThreadArg*)arg)->pool;
  int index = ((WBThreadArg*)arg)->index;
  free(arg);
  unsigned seen = 0;
  wb_in_parallel = 1; /* a launch from a pool thread runs serially */
  for (;;) {
    unsigned gen = WB_LOAD(&pool->generation);
    for (int spin = 0; gen == seen && spin < WB_SPIN_ROUNDS && !WB_LOAD(&pool->stop); ++spin) {
      wb_spin_wait(spin);
      gen = WB_LOAD(&pool->generation);
    }
    if (gen == seen && !WB_LOAD(&pool->stop)) {
      WB_FETCH_ADD(&pool->sleepers, 1);
      pthread_mutex_lock(&pool->mu);
      while ((gen = WB_LOAD(&pool->generation)) == seen && !WB_LOAD(&pool->stop))
        pthread_cond_wait(&pool->work_cv, &pool->mu);
      pthread_mutex_unlock(&pool->mu);
      WB_FETCH_SUB(&pool->sleepers, 1);
    }
    if (WB_LOAD(&pool->stop)) return NULL;
    seen = gen;
    WBRegion* r = &pool->region;
    if (index < r->nthreads) wb_run_share(r, index);
    if (WB_FETCH_SUB(&r->pending, 1) == 1 && WB_LOAD(&pool->caller_sleeping)) {
      pthread_mutex_lock(&pool->mu);
      pthread_cond_broadcast(&pool->done_cv);
      pthread_mutex_unlock(&pool->mu);
    }
  }
}

static void wb_pool_forget_after_fork(void) {
  /* The child has none of the parent's pool threads: make a new pool on first use. */
  wb_pool = NULL;
  pthread_mutex_init(&wb_pool_create_lock, NULL);
}

static WBPool* wb_get_pool(void) {
  WBPool* pool = __atomic_load_n(&wb_pool, __ATOMIC_ACQUIRE);
  if (pool) return pool;
  static int atfork_registered;
  pthread_mutex_lock(&wb_pool_create_lock);
  pool = wb_pool;
  if (!pool) {
    if (!atfork_registered) {
      pthread_atfork(NULL, NULL, wb_pool_forget_after_fork);
      atfork_registered = 1;
    }
    pool = (WBPool*)calloc(1, sizeof(WBPool));
    if (pool) {
      pool->nthreads = wb_default_num_threads();
      pthread_mutex_init(&pool->launch_lock, NULL);
      pthread_mutex_init(&pool->mu, NULL);
      pthread_cond_init(&pool->work_cv, NULL);
      pthread_cond_init(&pool->done_cv, NULL);
      pool->threads = (pthread_t*)calloc((size_t)pool->nthreads, sizeof(pthread_t));
      int started = 1;
      for (int i = 1; i < pool->nthreads && pool->threads; ++i) {
        WBThreadArg* arg = (WBThreadArg*)malloc(sizeof(WBThreadArg));
        if (!arg) break;
        arg->pool = pool;
        arg->index = i;
        if (pthread_create(&pool->threads[i], NULL, wb_pool_main, arg) != 0) {
          free(arg);
          break;
        }
        started = i + 1;
      }
      pool->nthreads = started; /* fewer threads if the system refused some */
      __atomic_store_n(&wb_pool, pool, __ATOMIC_RELEASE);
    }
  }
  pthread_mutex_unlock(&wb_pool_create_lock);
  return pool;
}

/* How many threads a parallel loop runs on (creating the pool if needed). */
WB_EXPORT int wb_thread_pool_size(void) {
  WBPool* pool = wb_get_pool();
  return pool ? pool->nthreads : 1;
}

static int wb_parallel_serial(WBParallelLambda flambda, void* cdata) {
  WBParallelGroupEnv env;
  WBRegion one;
  memset(&one, 0, sizeof(one));
  one.num_task = 1;
  one.nthreads = 1;
  env.sync_handle = &one;
  env.num_task = 1;
  int outer = wb_in_parallel;
  wb_in_parallel = 1;
  int rc = flambda(0, &env, cdata);
  wb_in_parallel = outer;
  return rc == 0 ? 0 : -1;
}

WB_EXPORT int wb_parallel_launch(WBParallelLambda flambda, void* cdata, int num_task) {
  if (wb_in_parallel) return wb_parallel_serial(flambda, cdata);
  WBPool* pool = wb_get_pool();
  if (!pool || pool->nthreads <= 1 || num_task == 1) return wb_parallel_serial(flambda, cdata);
  if (pthread_mutex_trylock(&pool->launch_lock) != 0) return wb_parallel_serial(flambda, cdata);
  WBRegion* r = &pool->region;
  r->flambda = flambda;
  r->cdata = cdata;
  r->num_task = num_task <= 0 ? pool->nthreads : num_task;
  r->nthreads = r->num_task < pool->nthreads ? r->num_task : pool->nthreads;
  WB_STORE(&r->pending, pool->nthreads - 1); /* every pool thread acknowledges, working or not */
  WB_STORE(&r->failed, 0);
  WB_STORE(&r->barrier_count, 0);
  WB_STORE(&r->barrier_gen, 0);
  r->error[0] = '\0';
  WB_FETCH_ADD(&pool->generation, 1);
  if (WB_LOAD(&pool->sleepers) > 0) {
    pthread_mutex_lock(&pool->mu);
    pthread_cond_broadcast(&pool->work_cv);
    pthread_mutex_unlock(&pool->mu);
  }
  wb_in_parallel = 1;
  wb_run_share(r, 0);
  wb_in_parallel = 0;
  for (int spin = 0; WB_LOAD(&r->pending) > 0 && spin < WB_SPIN_ROUNDS * 4; ++spin) wb_spin_wait(spin);
  if (WB_LOAD(&r->pending) > 0) {
    pthread_mutex_lock(&pool->mu);
    WB_STORE(&pool->caller_sleeping, 1);
    while (WB_LOAD(&r->pending) > 0) pthread_cond_wait(&pool->done_cv, &pool->mu);
    WB_STORE(&pool->caller_sleeping, 0);
    pthread_mutex_unlock(&pool->mu);
  }
  int failed = WB_LOAD(&r->failed);
  if (failed) snprintf(wb_error, WB_ERR_CAP, "%s", r->error);
  pthread_mutex_unlock(&pool->launch_lock);
  return failed ? -1 : 0;
}

WB_EXPORT int wb_parallel_barrier(int task_id, WBParallelGroupEnv* env) {
  (void)task_id;
  WBRegion* r = (WBRegion*)env->sync_handle;
  if (!r || r->nthreads <= 1) return 0;
  if (r->num_task > r->nthreads) {
    wb_set_error("RuntimeError",
                 "a parallel loop with a barrier asked for more tasks than the thread pool has threads; "
                 "set TVM_NUM_THREADS to at least its task count");
    return -1;
  }
  int gen = WB_LOAD(&r->barrier_gen);
  if (WB_FETCH_ADD(&r->barrier_count, 1) == r->nthreads - 1) {
    WB_STORE(&r->barrier_count, 0);
    WB_FETCH_ADD(&r->barrier_gen, 1);
  } else {
    unsigned spin = 0;
    while (WB_LOAD(&r->barrier_gen) == gen) {
      if (++spin < WB_SPIN_ROUNDS)
        wb_cpu_relax();
      else
        sched_yield();
    }
  }
  return 0;
}

/* Stop the pool's threads (tests, orderly shutdown); the next launch makes a new pool. */
WB_EXPORT void wb_thread_pool_shutdown(void) {
  pthread_mutex_lock(&wb_pool_create_lock);
  WBPool* pool = wb_pool;
  if (pool) {
    pthread_mutex_lock(&pool->launch_lock);
    WB_STORE(&pool->stop, 1);
    pthread_mutex_lock(&pool->mu);
    pthread_cond_broadcast(&pool->work_cv);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->nthreads; ++i) pthread_join(pool->threads[i], NULL);
    __atomic_store_n(&wb_pool, NULL, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&pool->launch_lock);
    /* the pool struct is kept: a kernel of another thread may still hold it */
  }
  pthread_mutex_unlock(&wb_pool_create_lock);
}

/* -- workspaces -------------------------------------------------------------
 * TVMBackendAllocWorkspace(device_type, device_id, nbytes, dtype_code_hint, dtype_bits_hint):
 * CPU memory aligned to 64 bytes, to the page for blocks of 64 KiB and more.  A
 * block starts after a header (one alignment unit) that records its size; freed
 * blocks go to a small per-thread cache, so a kernel called again reuses them.
 */
#define WB_WS_ALIGN 64
#define WB_WS_PAGE_FROM (64 * 1024)
#define WB_WS_CACHE_SLOTS 16
#define WB_WS_CACHE_MAX_BYTES ((size_t)256 << 20)
#define WB_WS_MAGIC 0x57425753u /* "WBWS" */

typedef struct {
  void* base;    /* what posix_memalign returned */
  size_t size;   /* usable bytes (rounded) */
  size_t header; /* bytes from base to the block */
  uint32_t magic;
} WBBlockHeader;

typedef struct {
  void* blocks[WB_WS_CACHE_SLOTS];
  size_t total;
  int count;
} WBWorkspaceCache;

static pthread_key_t wb_ws_key;
static pthread_once_t wb_ws_key_once = PTHREAD_ONCE_INIT;
static __thread WBWorkspaceCache* wb_ws_cache;
static int64_t wb_ws_mallocs;

static WBBlockHeader* wb_header(void* ptr) { return (WBBlockHeader*)((char*)ptr - sizeof(WBBlockHeader)); }

static void wb_ws_cache_free(void* arg) {
  WBWorkspaceCache* cache = (WBWorkspaceCache*)arg;
  for (int i = 0; i < cache->count; ++i) free(wb_header(cache->blocks[i])->base);
  free(cache);
}

static void wb_ws_make_key(void) { pthread_key_create(&wb_ws_key, wb_ws_cache_free); }

static WBWorkspaceCache* wb_thread_cache(void) {
  if (!wb_ws_cache) {
    pthread_once(&wb_ws_key_once, wb_ws_make_key);
    wb_ws_cache = (WBWorkspaceCache*)calloc(1, sizeof(WBWorkspaceCache));
    if (wb_ws_cache) pthread_setspecific(wb_ws_key, wb_ws_cache);
  }
  return wb_ws_cache;
}

WB_EXPORT void* wb_alloc_workspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                         int dtype_bits_hint) {
  (void)device_id;
  (void)dtype_code_hint;
  (void)dtype_bits_hint;
  if (device_type != 1) {
    char text[200];
    snprintf(text, sizeof(text),
             "this kernel asked for a workspace on device type %d; this server provides CPU (device type 1) "
             "workspaces only", device_type);
    wb_set_error("RuntimeError", text);
    return NULL;
  }
  /* more than any device has (or, on a 32-bit device, than it can address): refused, never truncated */
  uint64_t requested = nbytes;
  int too_large = nbytes > ((uint64_t)1 << 62) || nbytes > (uint64_t)(SIZE_MAX / 2);
  if (too_large) nbytes = 1;
  size_t align = nbytes >= WB_WS_PAGE_FROM ? (size_t)sysconf(_SC_PAGESIZE) : WB_WS_ALIGN;
  if (align < WB_WS_ALIGN) align = WB_WS_ALIGN;
  size_t size = (size_t)(nbytes ? nbytes : 1);
  size = (size + WB_WS_ALIGN - 1) & ~(size_t)(WB_WS_ALIGN - 1);
  WBWorkspaceCache* cache = wb_thread_cache();
  if (cache && !too_large) {
    for (int i = cache->count - 1; i >= 0; --i) {
      void* block = cache->blocks[i];
      if (wb_header(block)->size == size && ((uintptr_t)block % align) == 0) {
        cache->blocks[i] = cache->blocks[--cache->count];
        cache->total -= size;
        return block;
      }
    }
  }
  void* base = NULL;
  if (too_large || posix_memalign(&base, align, align + size) != 0) {
    char text[200];
    snprintf(text, sizeof(text), "cannot allocate a %llu-byte workspace for this kernel: out of memory",
             (unsigned long long)requested);
    wb_set_error("MemoryError", text);
    return NULL;
  }
  WB_FETCH_ADD(&wb_ws_mallocs, 1);
  void* block = (char*)base + align;
  WBBlockHeader* h = wb_header(block);
  h->base = base;
  h->size = size;
  h->header = align;
  h->magic = WB_WS_MAGIC;
  return block;
}

WB_EXPORT int wb_free_workspace(int device_type, int device_id, void* ptr) {
  (void)device_type;
  (void)device_id;
  if (!ptr) return 0;
  WBBlockHeader* h = wb_header(ptr);
  if (h->magic != WB_WS_MAGIC) {
    wb_set_error("RuntimeError", "TVMBackendFreeWorkspace got a pointer this server's workspace allocator "
                                 "did not hand out");
    return -1;
  }
  WBWorkspaceCache* cache = wb_thread_cache();
  if (cache && h->size <= WB_WS_CACHE_MAX_BYTES) {
    while (cache->count > 0 &&
           (cache->count == WB_WS_CACHE_SLOTS || cache->total + h->size > WB_WS_CACHE_MAX_BYTES)) {
      void* old = cache->blocks[0]; /* the oldest goes */
      cache->total -= wb_header(old)->size;
      memmove(cache->blocks, cache->blocks + 1, (size_t)(cache->count - 1) * sizeof(void*));
      cache->count -= 1;
      free(wb_header(old)->base);
    }
    cache->blocks[cache->count++] = ptr;
    cache->total += h->size;
    return 0;
  }
  h->magic = 0;
  free(h->base);
  return 0;
}

/* How many workspace blocks came from the system allocator (not the per-thread cache). */
WB_EXPORT int64_t wb_workspace_mallocs(void) { return (int64_t)WB_LOAD(&wb_ws_mallocs); }

/* -- TVMFFIHandleInitOnce ---------------------------------------------------- */
static pthread_mutex_t wb_init_once_lock = PTHREAD_MUTEX_INITIALIZER;

WB_EXPORT int wb_handle_init_once(void** handle_addr, int (*init_func)(void** result)) {
  if (__atomic_load_n(handle_addr, __ATOMIC_ACQUIRE)) return 0;
  pthread_mutex_lock(&wb_init_once_lock);
  int rc = 0;
  if (!*handle_addr) {
    void* result = NULL;
    rc = init_func(&result);
    if (rc == 0) __atomic_store_n(handle_addr, result, __ATOMIC_RELEASE);
  }
  pthread_mutex_unlock(&wb_init_once_lock);
  return rc;
}

/* -- runtime functions this TVM-free server does not provide ------------------ */
#define WB_LIBCTX_MAGIC 0x5742434Cu /* "WBCL" */
typedef struct {
  uint32_t magic;
  char name[256];
} WBLibraryCtx;

/* What __tvm_ffi__library_ctx of a loaded library points at (never freed: the library is never unloaded). */
WB_EXPORT void* wb_new_library_ctx(const char* name) {
  WBLibraryCtx* ctx = (WBLibraryCtx*)calloc(1, sizeof(WBLibraryCtx));
  if (!ctx) return NULL;
  ctx->magic = WB_LIBCTX_MAGIC;
  snprintf(ctx->name, sizeof(ctx->name), "%s", name ? name : "");
  return ctx;
}

static void wb_missing_runtime_function(const char* what) {
  const char* parts[3] = {"this kernel needs TVM runtime function ", what,
                          ", which this TVM-free server does not provide"};
  wb_error_set_parts("RuntimeError", parts, 3);
}

/* -- runtime functions registered in this process (workbench.runtime.registry) ---------------
 * TVM's generated code for T.call_packed("name", ...) keeps a function handle per name in the
 * library: TVMFFIHandleInitOnce(&handle, init) where init calls
 * TVMFFIEnvModLookupFromImports(library_ctx, "name", &handle), then
 * TVMFFIFunctionCall(handle, args, nargs, &result) on every call.  The handle is a weak
 * reference owned by the module (the kernel never releases it), and only ever passed back to
 * TVMFFIFunctionCall, so it is ours to define: a WBFunction, kept for the life of the process.
 * The Python server installs the resolver (ffi.py; minrpc has none): name -> a packed function
 * calling the registered one, 1 when nothing is registered under the name, -1 (error set) when
 * resolving failed. */
static WBResolver wb_resolver;

#define WB_FUNC_MAGIC 0x57424646u /* "WBFF" */
typedef struct WBFunction {
  uint32_t magic;
  WBPackedFunc fn;
  struct WBFunction* next;
} WBFunction;
static WBFunction* wb_functions;
static pthread_mutex_t wb_functions_lock = PTHREAD_MUTEX_INITIALIZER;

WB_EXPORT void wb_set_function_resolver(WBResolver resolver) { wb_resolver = resolver; }

/* Set the calling thread's error (for Python callbacks that fail a kernel). */
WB_EXPORT void wb_raise(const char* kind, const char* text) { wb_set_error(kind, text); }

static WBFunction* wb_function_handle(WBPackedFunc fn) {
  pthread_mutex_lock(&wb_functions_lock);
  WBFunction* h = wb_functions;
  while (h && h->fn != fn) h = h->next;
  if (!h && (h = (WBFunction*)calloc(1, sizeof(WBFunction))) != NULL) {
    h->magic = WB_FUNC_MAGIC;
    h->fn = fn;
    h->next = wb_functions;
    wb_functions = h;
  }
  pthread_mutex_unlock(&wb_functions_lock);
  return h;
}

WB_EXPORT int wb_env_mod_lookup_from_imports(void* library_ctx, const char* func_name, void** out) {
  (void)library_ctx;
  if (out) *out = NULL;
  if (!out || !func_name) {
    wb_set_error("RuntimeError", "TVMFFIEnvModLookupFromImports called without a function name or result");
    return -1;
  }
  WBResolver resolver = wb_resolver;
  if (resolver) {
    void* fn = NULL;
    int rc = resolver(func_name, &fn);
    if (rc < 0) return -1; /* the resolver set the error */
    if (rc == 0 && fn) {
      WBFunction* h = wb_function_handle((WBPackedFunc)fn);
      if (!h) {
        wb_set_error("RuntimeError", "out of memory looking up a runtime function");
        return -1;
      }
      *out = h;
      return 0;
    }
  }
  char what[600];
  if (!resolver) { /* a native server (minrpc): no functions registered from Python */
    snprintf(what, sizeof(what),
             "this kernel needs the runtime function '%s' (looked up through TVMFFIEnvModLookupFromImports), "
             "which this native server does not have: run the module on a Python server "
             "(python -m workbench.exec.rpc_server) that registers it with workbench.rpc.register_func, or where "
             "apache-tvm (pip install apache-tvm) is installed",
             func_name);
    wb_set_error("RuntimeError", what);
    return -1;
  }
  snprintf(what, sizeof(what),
           "'%s' (looked up through TVMFFIEnvModLookupFromImports); register it on the server with "
           "workbench.rpc.register_func (e.g. in server_init_callback), or run the module where apache-tvm "
           "(pip install apache-tvm), which provides TVM's runtime functions, is installed",
           func_name);
  wb_missing_runtime_function(what);
  return -1;
}

WB_EXPORT int wb_ffi_function_call(void* func, const WBAny* args, int32_t nargs, WBAny* result) {
  WBFunction* h = (WBFunction*)func;
  if (!h || h->magic != WB_FUNC_MAGIC) {
    wb_missing_runtime_function("TVMFFIFunctionCall (on a function this server did not hand out)");
    return -1;
  }
  if (result) {
    result->type_index = 0; /* None unless the function returns something */
    result->pad = 0;
    result->v_int64 = 0;
  }
  return h->fn(h, args, nargs, result);
}

/* A stub per unknown slot name, so that the error names the slot. */
#define WB_STUBS 32
static char wb_stub_names[WB_STUBS][128];
static int wb_stub_count;
static pthread_mutex_t wb_stub_lock = PTHREAD_MUTEX_INITIALIZER;

static int wb_stub_fail(int index) {
  wb_missing_runtime_function(index >= 0 ? wb_stub_names[index] : "(a slot of the kernel library)");
  return -1;
}

#define WB_STUB(i) \
  static int wb_stub_##i(void) { return wb_stub_fail(i); }
WB_STUB(0) WB_STUB(1) WB_STUB(2) WB_STUB(3) WB_STUB(4) WB_STUB(5) WB_STUB(6) WB_STUB(7)
WB_STUB(8) WB_STUB(9) WB_STUB(10) WB_STUB(11) WB_STUB(12) WB_STUB(13) WB_STUB(14) WB_STUB(15)
WB_STUB(16) WB_STUB(17) WB_STUB(18) WB_STUB(19) WB_STUB(20) WB_STUB(21) WB_STUB(22) WB_STUB(23)
WB_STUB(24) WB_STUB(25) WB_STUB(26) WB_STUB(27) WB_STUB(28) WB_STUB(29) WB_STUB(30) WB_STUB(31)
static int wb_stub_overflow(void) { return wb_stub_fail(-1); }

static int (*const wb_stubs[WB_STUBS])(void) = {
    wb_stub_0,  wb_stub_1,  wb_stub_2,  wb_stub_3,  wb_stub_4,  wb_stub_5,  wb_stub_6,  wb_stub_7,
    wb_stub_8,  wb_stub_9,  wb_stub_10, wb_stub_11, wb_stub_12, wb_stub_13, wb_stub_14, wb_stub_15,
    wb_stub_16, wb_stub_17, wb_stub_18, wb_stub_19, wb_stub_20, wb_stub_21, wb_stub_22, wb_stub_23,
    wb_stub_24, wb_stub_25, wb_stub_26, wb_stub_27, wb_stub_28, wb_stub_29, wb_stub_30, wb_stub_31};

/* The address of a function that fails the kernel naming `function` (a runtime function we lack). */
WB_EXPORT void* wb_missing_function_stub(const char* function) {
  pthread_mutex_lock(&wb_stub_lock);
  int index = -1;
  for (int i = 0; i < wb_stub_count; ++i)
    if (strncmp(wb_stub_names[i], function, sizeof(wb_stub_names[i]) - 1) == 0) index = i;
  if (index < 0 && wb_stub_count < WB_STUBS) {
    index = wb_stub_count++;
    snprintf(wb_stub_names[index], sizeof(wb_stub_names[index]), "%s", function);
  }
  pthread_mutex_unlock(&wb_stub_lock);
  return index >= 0 ? (void*)wb_stubs[index] : (void*)wb_stub_overflow;
}

