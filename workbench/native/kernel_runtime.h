/*
 * kernel_runtime.h: what a kernel library gets from the process that loads it.
 *
 * Kernels follow the TVM FFI packed C ABI (docs/protocol.md section 11).  This runtime is shared by
 * the two servers that load kernels without TVM:
 *   - the Python session server, through workbench/runtime/_shim.c (a CPython extension built from
 *     _shim.c and kernel_runtime.c) that workbench/runtime/ffi.py loads RTLD_GLOBAL and calls through
 *     ctypes: every name below is part of that interface, keep them unchanged;
 *   - minrpc, the native server (native/minrpc), linked with -rdynamic so that kernel libraries bind
 *     TVMFFIErrorSetRaisedFromCStrParts to the definition here.
 *
 * It provides the error setter kernels call, the last error per thread, the timing loop behind
 * time_evaluator (and its cache flush), and what TVM's runtime gives a kernel through the context
 * slots a TVM-exported library defines (see fill_context_slots in ffi.py, mr_fill_context_slots in
 * minrpc): a thread pool (TVMBackendParallelLaunch/Barrier), workspaces (TVMBackendAlloc/FreeWorkspace),
 * TVMFFIHandleInitOnce, runtime functions looked up by name (TVMFFIEnvModLookupFromImports,
 * TVMFFIFunctionCall) and, for a runtime function it lacks, a stub failing the kernel naming it.
 * None of these is exported under a slot's own name (__TVM...): a weak slot in a kernel library
 * would bind to such a definition instead of its own storage.
 *
 * C99 (gnu99) and POSIX threads; no Python headers.
 */
#ifndef WORKBENCH_KERNEL_RUNTIME_H
#define WORKBENCH_KERNEL_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The TVMFFIAny layout: 16 bytes, int32 type index, uint32 padding, an 8-byte value. */
typedef struct {
  int32_t type_index; /* 0 None, 1 Int, 2 Bool, 3 Float, 4 opaque pointer, 7 DLTensor*, 8 C string, 9 byte array */
  uint32_t pad;
  union {
    int64_t v_int64;
    double v_float64;
    void* v_ptr;
    const char* v_c_str;
  };
} WBAny;

/* The same type under TVM's name (workbench_kernel.h declares an identical one for kernels). */
#ifndef WORKBENCH_KERNEL_H_
typedef WBAny TVMFFIAny;
#endif

/* TVMFFIByteArray: the value of a type-9 argument points at one. */
typedef struct {
  const char* data;
  size_t size;
} WBByteArray;

/* A kernel (or any packed function): int f(void* self, const TVMFFIAny* args, int32_t nargs, TVMFFIAny* ret). */
typedef int (*WBPackedFunc)(void* self, const WBAny* args, int32_t nargs, WBAny* ret);

/* Capacity of an error message, including its NUL. */
#define WB_ERR_CAP 4096

/* -- errors ------------------------------------------------------------------------------------
 * A kernel reports an error with the setter, then returns non-zero.  The message is
 * `kind + ": " + parts...` (no prefix for an empty kind, NULL parts skipped, at most 4095 bytes),
 * kept per thread until read. */
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts);
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message);
/* The calling thread's last error ("" when none; also takes one set through TVM's own runtime). */
const char* wb_last_error(void);
void wb_clear_error(void);
/* Set the calling thread's error (a caller failing a kernel, e.g. a registered function). */
void wb_raise(const char* kind, const char* text);

/* -- timing ------------------------------------------------------------------------------------- */
/* Write (then read) one byte per cache line of an nbytes buffer: 0, or -1 when it cannot be allocated. */
int wb_flush_cache(int64_t nbytes);
int64_t wb_cache_flushes(void);       /* how many flushes ran in this process */
int64_t wb_cache_flushed_bytes(void); /* and how many bytes they wrote */
/* Call fn(NULL, args, nargs, &ret) `number` times back to back; *elapsed_ns = the time they took.
   flush_bytes > 0: flush that many bytes of cache first, outside the timed span.  Returns 0, or the
   first non-zero return of fn (error set). */
int wb_time_calls_flushed(void* fn, const WBAny* args, int32_t nargs, int64_t number, int64_t flush_bytes,
                          int64_t* elapsed_ns);
int wb_time_calls(void* fn, const WBAny* args, int32_t nargs, int64_t number, int64_t* elapsed_ns);

/* -- guarded calls: a kernel that faults or calls exit() ends its call, not the process -----------
 * A guarded call runs a kernel with handlers armed for the signals a fault raises (SIGSEGV, SIGBUS,
 * SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS), for SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGALRM
 * when the process sends them itself, and, in libraries passed to wb_guard_library, for the ways a
 * kernel ends its process without a signal a handler sees: exit() and its kin, SIGKILL or SIGSTOP
 * sent to its own process (raise, kill, pthread_kill, syscall), pthread_exit() on the calling thread.
 * If the kernel dies, the call returns WB_CRASHED with the error "KernelCrashed: ..." naming the
 * signal (or the exit status), and the process, its memory (tensors hold what the kernel wrote) and
 * its loaded libraries go on.  A fault in a pool thread fails the parallel loop with that error; a
 * thread the kernel started itself (OpenMP's, its own pthreads) that faults or exits while the call
 * runs ends alone, and the call fails with "the kernel's own thread ...".  Another thread may stop a call
 * that runs too long (wb_guard_interrupt): it returns WB_CANCELLED with "Cancelled: ...".  Outside a
 * guarded call the signals do what they did before (the handlers found at installation are chained).
 * What no process can stop in itself still ends it: SIGKILL from outside (the OOM killer, an
 * operator) and system calls the kernel issues by inline assembly. */
#define WB_CRASHED (-2)
#define WB_CANCELLED (-3)
int wb_guarded_call(void* fn, const WBAny* args, int32_t nargs, WBAny* ret);
/* release(gate, 0) (when not NULL), then fn(arg), as one guarded call: for waiting on a device runtime whose
   own threads run the kernels (OpenCL: clSetUserEventStatus(gate, CL_COMPLETE) lets the kernels enqueued
   behind the gate start, clFinish(queue) waits for them, so they run only while the guard is armed).  A fault
   in those threads fails it like a kernel's own thread's (WB_CRASHED), a CANCEL stops it (WB_CANCELLED);
   otherwise the first non-zero value of the two calls, or 0. */
int wb_guarded_wait(void* fn, void* arg, void* release, void* gate);
/* Put the guard's handlers in place now (once per process) and give this thread its alternate stack.  Called
   before anything that may load a library with handlers of its own (the OpenCL loader pulls in PoCL, which
   pulls in LLVM): such a library saves the handlers it finds and puts them back when it steps aside (LLVM does
   on Ctrl-C), so ours must be the ones it finds, or its stepping aside removes the guard. */
void wb_guard_prepare(void);
/* Threads the guard has ended so far (a thread that faulted or exited while a guarded call ran on another). */
int64_t wb_guard_threads_lost(void);
/* The serial number of the guarded call running now (outermost, any thread), 0 when none. */
int64_t wb_guard_running(void);
/* Stop the guarded call `serial` if it is still running: 1 (signal sent), 0 (it ended). */
int wb_guard_interrupt(int64_t serial);
/* on = 1: SIGINT (Ctrl-C) stops the guarded call that runs (WB_CANCELLED, "Interrupted: ..."); outside
   one it goes to the handler it replaced.  on = 0 puts that handler back.  For a process that runs
   kernels itself (LocalSession): around its calls.  on = 1 also puts the fault handlers back in front where
   a library has removed them since (LLVM does on Ctrl-C): one system call when none has.  0, or -1 from
   sigaction. */
int wb_guard_sigint(int on);
/* Around a callback from a kernel into code that must not be unwound (Python): disarm, then re-arm. */
void* wb_guard_suspend(void);
void wb_guard_resume(void* token);
/* Send a loaded library's calls of exit(), _exit(), _Exit(), quick_exit(), pthread_exit(), raise(),
   kill(), pthread_kill() and syscall() through the guard (its GOT entries are rewritten, and those of
   the libraries it links, the C library's aside): inside a
   guarded call, those that would end the process fail the call (WB_CRASHED, "called exit(N)"),
   elsewhere they do as before.  `handle` is what dlopen returned.  Also puts the guard's fault handlers back
   in front where the library's constructors (or its libraries') put their own.  0, or -1 when the library
   cannot be read. */
int wb_guard_library(void* handle);
/* Faults caught in this process so far (tests and logs). */
int64_t wb_guard_faults(void);
/* A session server's watcher thread: a guarded call still running grace_ms after the connection `fd`
   became readable (the client sent CANCEL, or left) is interrupted; one that still runs two grace
   periods later (it blocks the interrupt signal) ends the process with WB_EXIT_STUCK, for its
   server to tell the client.  fd < 0 stops the watcher.
   0, or -1 when the thread cannot be started (the session goes on without it). */
int wb_guard_watch(int fd, int64_t grace_ms);
#define WB_EXIT_STUCK 90 /* workbench/rpc/wire/exits.py EXIT_STUCK, minrpc's MR_EXIT_STUCK */

/* -- secrets out of a kernel's reach -------------------------------------------------------------
 * A session's worker wipes every copy of the server's tokens from its own memory before it runs a
 * kernel (wb_scrub_secrets: the number of copies wiped, or -1), and the server and its workers are
 * not dumpable, the workers without CAP_SYS_PTRACE (wb_guard_secrets(drop_ptrace)): a kernel finds
 * the tokens neither in its process nor in its parent's /proc/PID/mem or environ. */
int64_t wb_scrub_secrets(const char* const* secrets, const int64_t* lengths, int32_t n);
int wb_guard_secrets(int drop_ptrace);

/* -- the thread pool (TVMBackendParallelLaunch, TVMBackendParallelBarrier) ----------------------- */
typedef struct {
  void* sync_handle;
  int32_t num_task;
} WBParallelGroupEnv;
typedef int (*WBParallelLambda)(int task_id, WBParallelGroupEnv* env, void* cdata);

/* TVM_NUM_THREADS, then OMP_NUM_THREADS, then the CPUs this process may run on (1..1024). */
int wb_default_num_threads(void);
/* Threads a parallel loop runs on (starts the pool if needed). */
int wb_thread_pool_size(void);
/* Run flambda(task, env, cdata) for task in [0, num_task) (num_task <= 0: one per thread): 0, or -1. */
int wb_parallel_launch(WBParallelLambda flambda, void* cdata, int num_task);
int wb_parallel_barrier(int task_id, WBParallelGroupEnv* env);
/* Stop the pool's threads; the next launch starts a new pool. */
void wb_thread_pool_shutdown(void);

/* -- workspaces (TVMBackendAllocWorkspace, TVMBackendFreeWorkspace) ------------------------------ */
void* wb_alloc_workspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint, int dtype_bits_hint);
int wb_free_workspace(int device_type, int device_id, void* ptr);
int64_t wb_workspace_mallocs(void); /* blocks taken from the system allocator, not the per-thread cache */

/* -- the rest of a kernel's runtime ------------------------------------------------------------- */
/* TVMFFIHandleInitOnce: run init_func once per handle, publishing its result. */
int wb_handle_init_once(void** handle_addr, int (*init_func)(void** result));
/* What a library's __tvm_ffi__library_ctx slot points at (never freed); NULL when out of memory. */
void* wb_new_library_ctx(const char* name);

/* Runtime functions a kernel calls by name (T.call_packed): the resolver maps a name to a packed
   function: 0 (and *out_fn), 1 when nothing is registered under the name, -1 (error set) on failure.
   Without a resolver every lookup fails with an error naming the function. */
typedef int (*WBResolver)(const char* name, void** out_fn);
void wb_set_function_resolver(WBResolver resolver);
/* TVMFFIEnvModLookupFromImports and TVMFFIFunctionCall. */
int wb_env_mod_lookup_from_imports(void* library_ctx, const char* func_name, void** out);
int wb_ffi_function_call(void* func, const WBAny* args, int32_t nargs, WBAny* result);

/* The address of a function that fails the kernel calling it, naming `function` (a runtime function
   this TVM-free runtime does not provide, e.g. "TVMBackendGetFuncFromEnv"). */
void* wb_missing_function_stub(const char* function);

#ifdef __cplusplus
}
#endif

#endif /* WORKBENCH_KERNEL_RUNTIME_H */
