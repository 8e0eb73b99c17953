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
#include <link.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
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

/* ==========================================================================
 * Guarded calls (kernel_runtime.h): a kernel that faults ends its call, not the process.
 *
 * A guarded call keeps a frame (WBGuard) on its thread: sigsetjmp(env, 0) (no signal mask saved: no
 * system call per call) and the frame armed in a thread-local pointer.  The handlers, installed once
 * for the process with SA_NODEFER (the signal stays unblocked after the jump) and SA_ONSTACK (a
 * per-thread alternate stack, so that a stack overflow is caught too), siglongjmp to the armed frame
 * of the thread that faulted; with none armed they chain to what was installed before (Python's
 * faulthandler, or the default: the process dies as it always did), except on a thread the running
 * kernel started: that thread ends and the call fails (wb_guard_end_kernel_thread).  A kernel
 * library's calls of exit() and its kin, and its SIGKILLs of its own process, go to the wrappers
 * below instead (wb_guard_library rewrites its GOT entries for them), which jump the same way inside
 * a guarded call and do as asked otherwise: an on_exit handler would run after every exit handler
 * registered later (those of libraries loaded since), leaving them run in a process that goes on.
 * The interrupt (wb_guard_interrupt) is a real-time signal sent to
 * the calling thread, honoured only while the call it was meant for still runs.
 * ========================================================================== */
/* What a jump carries besides a signal number (signals are < 0x10000): how the kernel ended itself. */
#define WB_EXIT_MARK 0x10000        /* exit(), _exit(), _Exit(), quick_exit(), the exit system calls */
#define WB_SELF_KILL_MARK 0x20000   /* | sig: SIGKILL or SIGSTOP sent to its own process */
#define WB_THREAD_EXIT_MARK 0x30000 /* pthread_exit() on the server's thread */
#define WB_MARK_KIND(mark) ((mark) & 0x70000)
#define WB_ALTSTACK_BYTES (64 * 1024)

typedef struct WBGuard {
  sigjmp_buf env;
  struct WBGuard* outer; /* the frame armed before this one on this thread (a nested guarded call) */
  int64_t serial;        /* this call's number when it is the thread's outermost, else 0 */
  int in_parallel;       /* wb_in_parallel on entry (restored after a jump) */
} WBGuard;

static __thread WBGuard* wb_guard_frame;     /* the armed frame of this thread */
static __thread int wb_guard_exit_status;   /* exit()'s status, when that is what was caught */
static __thread int wb_guard_thread_ready;  /* this thread has its alternate signal stack */
static __thread int wb_in_parallel;         /* inside a parallel region (the pool, below) */
static __thread void* wb_launching;          /* the pool whose launch this thread runs (the pool, below) */
static int64_t wb_guard_serials;            /* guarded calls begun */
static int64_t wb_guard_now;                /* the serial of the outermost guarded call running, 0 none */
static int64_t wb_guard_cancel;             /* the serial wb_guard_interrupt was asked to stop */
static int64_t wb_guard_fault_count;
static int64_t wb_guard_thread_death_serial; /* the call whose kernel lost one of its own threads (below) */
static int wb_guard_thread_death;            /* how that thread ended: a signal or a mark */
static int wb_guard_thread_death_status;     /* its exit status, for WB_EXIT_MARK */
static pthread_t wb_guard_owner;            /* the thread running wb_guard_now */
static pthread_once_t wb_guard_once = PTHREAD_ONCE_INIT;
static pthread_key_t wb_guard_stack_key;
/* The faults, then (from WB_GUARD_NFAULTS on) the signals a kernel may send itself (raise(), kill() of
   its own pid), caught only when sent by this process: the same signal from outside (the server's
   owner ending it, a terminal) does what it did before. */
static const int wb_guard_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS,
                                       SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM};
#define WB_GUARD_NFAULTS 7
#define WB_GUARD_NSIGNALS ((int)(sizeof(wb_guard_signals) / sizeof(wb_guard_signals[0])))
static struct sigaction wb_guard_previous[WB_GUARD_NSIGNALS + 1]; /* the last one: the interrupt signal */
static int wb_guard_interrupt_signal;

static void wb_pool_abandon_launch(void); /* the pool, below: after a jump out of a launch */

static int wb_guard_slot(int sig) {
  for (int i = 0; i < WB_GUARD_NSIGNALS; ++i)
    if (wb_guard_signals[i] == sig) return i;
  return WB_GUARD_NSIGNALS;
}

static struct sigaction wb_guard_previous_sigint; /* while wb_guard_sigint(1) holds SIGINT */

/* A thread with no guarded call of its own faulted, exited or sent its process a fatal signal while a
   kernel runs on another thread: a thread that kernel started (OpenMP's, its own pthreads).  That
   thread ends (the exit system call ends it alone; a pthread_join of it returns), and the kernel's
   call fails as if the kernel had crashed itself.  Returns only when no kernel runs elsewhere. */
static int64_t wb_guard_lost_threads; /* threads ended by wb_guard_end_kernel_thread (wb_guard_threads_lost) */
/* Set when a wb_guarded_wait lost one of the device runtime's threads: that runtime's other threads may still
   fault on the same kernel after the wait has ended (its work-groups ran on several), and they end alone too. */
static int wb_guard_device_threads_lost;

static void wb_guard_end_kernel_thread(int how, int status) {
  int64_t running = WB_LOAD(&wb_guard_now);
  if (pthread_equal(wb_guard_owner, pthread_self())) return;
  if (!running) {
    if (!WB_LOAD(&wb_guard_device_threads_lost)) return;
    WB_FETCH_ADD(&wb_guard_lost_threads, 1);
    for (;;) syscall(SYS_exit, 0);
  }
  WB_FETCH_ADD(&wb_guard_lost_threads, 1);
  int64_t before = WB_LOAD(&wb_guard_thread_death_serial); /* 0, or a call that ended before it heard */
  if (before != running && before != -1 &&
      __atomic_compare_exchange_n(&wb_guard_thread_death_serial, &before, -1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    wb_guard_thread_death = how; /* the first thread to go names the failure */
    wb_guard_thread_death_status = status;
    WB_STORE(&wb_guard_thread_death_serial, running);
    WB_STORE(&wb_guard_cancel, running);
    pthread_kill(wb_guard_owner, wb_guard_interrupt_signal);
  }
  for (;;) syscall(SYS_exit, 0);
}

/* A fault recurs when the handler it was passed to returns.  A handler that came in front of ours after they
   went in (wb_guard_reclaim put it behind them) may step aside by putting back the handlers it had found,
   ours among them (LLVM's does), and would then send the fault back here for ever.  1 when the same fault
   comes back a third time within 10 ms (its default action is due); a handler that mends the fault and
   returns (a runtime's guard page) sees nothing of this. */
static unsigned wb_guard_reclaimed; /* bit i: wb_guard_previous[i] is a handler wb_guard_reclaim put behind ours */
static __thread int wb_guard_passed_sig, wb_guard_passed_times;
static __thread void* wb_guard_passed_addr;
static __thread int64_t wb_guard_passed_ns;

static int wb_guard_fault_recurs(int sig, void* addr) {
  int64_t now = now_ns();
  if (sig != wb_guard_passed_sig || addr != wb_guard_passed_addr || now - wb_guard_passed_ns > 10000000LL) {
    wb_guard_passed_sig = sig;
    wb_guard_passed_addr = addr;
    wb_guard_passed_times = 0;
  }
  wb_guard_passed_ns = now;
  return ++wb_guard_passed_times >= 3;
}

static void wb_guard_on_signal(int sig, siginfo_t* info, void* context) {
  WBGuard* g = wb_guard_frame;
  if (sig == SIGINT) { /* only while wb_guard_sigint(1) holds it: Ctrl-C stops the kernel that runs */
    while (g && g->outer) g = g->outer;
    if (g && g->serial) {
      wb_guard_frame = NULL;
      siglongjmp(g->env, sig);
    }
    int64_t running = WB_LOAD(&wb_guard_now);
    if (running && !pthread_equal(wb_guard_owner, pthread_self())) { /* it reached another thread: pass it on */
      pthread_kill(wb_guard_owner, SIGINT);
      return;
    }
    struct sigaction* old = &wb_guard_previous_sigint;
    if ((old->sa_flags & SA_SIGINFO) && old->sa_sigaction)
      old->sa_sigaction(sig, info, context);
    else if (old->sa_handler != SIG_IGN && old->sa_handler != SIG_DFL && old->sa_handler != NULL)
      old->sa_handler(sig);
    return;
  }
  if (sig == wb_guard_interrupt_signal) {
    /* only the call it was sent for, on its own thread, and only while it runs */
    while (g && g->outer) g = g->outer;
    if (!g || !g->serial || g->serial != WB_LOAD(&wb_guard_cancel) || g->serial != WB_LOAD(&wb_guard_now)) return;
    wb_guard_frame = NULL;
    siglongjmp(g->env, sig);
  }
  int self_sent = info && info->si_pid == getpid() &&
                  (info->si_code == SI_USER || info->si_code == SI_TKILL || info->si_code == SI_QUEUE);
  if (g && (wb_guard_slot(sig) < WB_GUARD_NFAULTS || self_sent)) {
    wb_guard_frame = g->outer;
    siglongjmp(g->env, sig);
  }
  if (wb_guard_slot(sig) < WB_GUARD_NFAULTS || self_sent) wb_guard_end_kernel_thread(sig, 0);
  /* No kernel of ours is running on this thread (or the signal came from outside): as without us. */
  if (wb_guard_slot(sig) < WB_GUARD_NFAULTS && (WB_LOAD(&wb_guard_reclaimed) >> wb_guard_slot(sig) & 1u) && info &&
      info->si_code > 0 && wb_guard_fault_recurs(sig, info->si_addr)) {
    signal(sig, SIG_DFL); /* the fault recurs when this returns: the default action (the process ends) */
    return;
  }
  struct sigaction* old = &wb_guard_previous[wb_guard_slot(sig)];
  if ((old->sa_flags & SA_SIGINFO) && old->sa_sigaction) {
    old->sa_sigaction(sig, info, context);
  } else if (old->sa_handler == SIG_IGN) {
    return;
  } else if (old->sa_handler != SIG_DFL && old->sa_handler != NULL) {
    old->sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);
    raise(sig); /* delivered when this handler returns: the default action (the process ends) */
  }
}

static void wb_guard_free_stack(void* stack) {
  stack_t off;
  memset(&off, 0, sizeof(off));
  off.ss_flags = SS_DISABLE;
  sigaltstack(&off, NULL);
  free(stack);
}

static int wb_watch_fd = -1; /* the watcher (below) */
static int wb_watch_running;

static void wb_guard_forget_after_fork(void) {
  /* the child has no watcher thread: its own server starts one if it serves a session */
  wb_watch_fd = -1;
  wb_watch_running = 0;
  wb_guard_now = 0;
}

static void wb_guard_find_real_functions(void); /* below, with the wrappers */

static void wb_guard_action(struct sigaction* sa) {
  memset(sa, 0, sizeof(*sa));
  sa->sa_sigaction = wb_guard_on_signal;
  sa->sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK | SA_RESTART;
  sigemptyset(&sa->sa_mask);
}

static void wb_guard_install(void) {
  wb_guard_find_real_functions();
  pthread_key_create(&wb_guard_stack_key, wb_guard_free_stack);
  pthread_atfork(NULL, NULL, wb_guard_forget_after_fork);
  wb_guard_interrupt_signal = SIGRTMIN + 2;
  struct sigaction sa;
  wb_guard_action(&sa);
  for (int i = 0; i < WB_GUARD_NSIGNALS; ++i) sigaction(wb_guard_signals[i], &sa, &wb_guard_previous[i]);
  sigaction(wb_guard_interrupt_signal, &sa, &wb_guard_previous[WB_GUARD_NSIGNALS]);
}

/* Once per process (handlers) and once per thread (an alternate stack, unless it has one). */
static void wb_guard_prepare_thread(void) {
  pthread_once(&wb_guard_once, wb_guard_install);
  wb_guard_thread_ready = 1;
  stack_t current;
  if (sigaltstack(NULL, &current) == 0 && !(current.ss_flags & SS_DISABLE)) return; /* e.g. faulthandler's */
  void* mem = malloc(WB_ALTSTACK_BYTES);
  if (!mem) return;
  stack_t alt;
  memset(&alt, 0, sizeof(alt));
  alt.ss_sp = mem;
  alt.ss_size = WB_ALTSTACK_BYTES;
  if (sigaltstack(&alt, NULL) != 0) {
    free(mem);
    return;
  }
  pthread_setspecific(wb_guard_stack_key, mem); /* freed when the thread ends */
}

/* Arm g (after sigsetjmp returned 0); top: an outermost call that wb_guard_interrupt may stop. */
static inline void wb_guard_arm(WBGuard* g, int top) {
  if (!wb_guard_thread_ready) wb_guard_prepare_thread();
  g->outer = wb_guard_frame;
  g->in_parallel = wb_in_parallel;
  g->serial = 0;
  if (top && !g->outer) {
    /* no read-modify-write, no fence: a session's calls come from one thread; the watcher only needs
       to see the serial of the call that runs (a release store publishes it with the owner) */
    g->serial = __atomic_load_n(&wb_guard_serials, __ATOMIC_RELAXED) + 1;
    __atomic_store_n(&wb_guard_serials, g->serial, __ATOMIC_RELAXED);
    pthread_t self = pthread_self();
    if (!pthread_equal(wb_guard_owner, self)) wb_guard_owner = self;
    __atomic_store_n(&wb_guard_now, g->serial, __ATOMIC_RELEASE);
  }
  wb_guard_frame = g;
}

static inline void wb_guard_disarm(WBGuard* g) {
  wb_guard_frame = g->outer;
  if (g->serial) __atomic_store_n(&wb_guard_now, 0, __ATOMIC_RELEASE);
}

static const char* wb_signal_name(int sig) {
  switch (sig) {
  case SIGSEGV: return "SIGSEGV";
  case SIGBUS: return "SIGBUS";
  case SIGFPE: return "SIGFPE";
  case SIGILL: return "SIGILL";
  case SIGABRT: return "SIGABRT";
  case SIGTRAP: return "SIGTRAP";
  case SIGSYS: return "SIGSYS";
  case SIGTERM: return "SIGTERM";
  case SIGHUP: return "SIGHUP";
  case SIGQUIT: return "SIGQUIT";
  case SIGUSR1: return "SIGUSR1";
  case SIGUSR2: return "SIGUSR2";
  case SIGALRM: return "SIGALRM";
  case SIGKILL: return "SIGKILL";
  case SIGSTOP: return "SIGSTOP";
  default: return "signal";
  }
}

/* After a jump to g: the error for what happened, and the code a guarded call returns. */
static int wb_guard_caught(WBGuard* g, int sig, const char* what) {
  if (g->serial) WB_STORE(&wb_guard_now, 0);
  if (wb_launching && !g->in_parallel) wb_pool_abandon_launch(); /* the jump left a parallel launch */
  wb_in_parallel = g->in_parallel;
  const char* whose = "";
  int status = wb_guard_exit_status;
  if (sig == wb_guard_interrupt_signal) {
    if (!g->serial || WB_LOAD(&wb_guard_thread_death_serial) != g->serial) {
      snprintf(wb_error, WB_ERR_CAP, "Cancelled: %s was stopped: it ran past the grace period after the client "
               "cancelled it", what);
      return WB_CANCELLED;
    }
    sig = wb_guard_thread_death; /* a thread the kernel started ended (wb_guard_end_kernel_thread) */
    status = wb_guard_thread_death_status;
    WB_STORE(&wb_guard_thread_death_serial, 0);
    whose = "'s own thread";
  }
  if (sig == SIGINT) {
    snprintf(wb_error, WB_ERR_CAP, "Interrupted: %s was stopped by Ctrl-C (SIGINT)", what);
    return WB_CANCELLED;
  }
  WB_FETCH_ADD(&wb_guard_fault_count, 1);
  int signum = sig & 0xffff;
  switch (WB_MARK_KIND(sig)) {
  case WB_EXIT_MARK:
    snprintf(wb_error, WB_ERR_CAP, "KernelCrashed: %s%s called exit(%d)", what, whose, status);
    break;
  case WB_SELF_KILL_MARK:
    snprintf(wb_error, WB_ERR_CAP, "KernelCrashed: %s%s sent its own process signal %d (%s: %s), which would have "
             "ended the session; the server refused it", what, whose, signum, wb_signal_name(signum), strsignal(signum));
    break;
  case WB_THREAD_EXIT_MARK:
    snprintf(wb_error, WB_ERR_CAP, "KernelCrashed: %s called pthread_exit() on the server's thread", what);
    break;
  default:
    snprintf(wb_error, WB_ERR_CAP, "KernelCrashed: %s%s died of signal %d (%s: %s)", what, whose, sig,
             wb_signal_name(sig), strsignal(sig));
  }
  return WB_CRASHED;
}

WB_EXPORT int wb_guarded_call(void* fn, const WBAny* args, int32_t nargs, WBAny* ret) {
  WBGuard g;
  int sig = sigsetjmp(g.env, 0);
  if (sig != 0) return wb_guard_caught(&g, sig, "the kernel");
  wb_guard_arm(&g, 1);
  int rc = ((WBPackedFunc)fn)(NULL, args, nargs, ret);
  wb_guard_disarm(&g);
  return rc;
}

/* Wait for a device runtime's worker threads as a guarded call: release(gate, 0) first when given (OpenCL:
   clSetUserEventStatus(gate, CL_COMPLETE), the event the kernels were enqueued behind, so that they run only
   now), then fn(arg) (clFinish(queue)).  Returns the first non-zero value of the two, or 0; WB_CRASHED /
   WB_CANCELLED (error set) when a thread of that runtime faults while it waits, or the call is stopped (a
   CANCEL, Ctrl-C).  The runtime's threads are then the kernel's own threads of wb_guarded_call. */
/* Our fault handlers in front again for a device wait: a library loaded since may have put its own there (an
   OpenCL platform's LLVM installs crash handlers when it compiles, whose restore-and-re-raise races with the
   device's other threads faulting on the same kernel, and the process died).  The handlers found in front
   are saved in others[] (bit i of the result: signal wb_guard_signals[i]) for wb_guard_behind, or, by
   wb_guard_reclaim, as the ones a fault outside a kernel goes to. */
static unsigned wb_guard_in_front(struct sigaction* others) {
  struct sigaction ours;
  wb_guard_action(&ours);
  unsigned moved = 0;
  for (int i = 0; i < WB_GUARD_NFAULTS; ++i) {
    struct sigaction now;
    if (sigaction(wb_guard_signals[i], NULL, &now) != 0) continue;
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == wb_guard_on_signal) continue;
    if (sigaction(wb_guard_signals[i], &ours, &others[i]) == 0) moved |= 1u << i;
  }
  return moved;
}

/* Our fault handlers back in front, for good, where a library removed them since they went in: a module's
   constructor that installs its own (wb_guard_library), or LLVM, which PoCL loads and which puts back on
   Ctrl-C the handlers it found when it started: when it started before this runtime, not ours
   (wb_guard_prepare, wb_guard_sigint).  The handler found in front becomes the one a fault outside a kernel
   is passed to, as it would be without us.  One system call when nothing moved. */
static void wb_guard_reclaim(void) {
  struct sigaction now;
  if (sigaction(SIGSEGV, NULL, &now) != 0 || ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == wb_guard_on_signal))
    return;
  __atomic_or_fetch(&wb_guard_reclaimed, wb_guard_in_front(wb_guard_previous), __ATOMIC_SEQ_CST);
}

static void wb_guard_behind(unsigned moved, const struct sigaction* others) {
  for (int i = 0; i < WB_GUARD_NFAULTS; ++i)
    if (moved & (1u << i)) sigaction(wb_guard_signals[i], &others[i], NULL);
}

WB_EXPORT int wb_guarded_wait(void* fn, void* arg, void* release, void* gate) {
  WBGuard g;
  struct sigaction others[WB_GUARD_NFAULTS];
  int sig = sigsetjmp(g.env, 0);
  if (sig != 0) { /* ours stay in front: the runtime's other threads may still fault on the same kernel */
    WB_STORE(&wb_guard_device_threads_lost, 1);
    return wb_guard_caught(&g, sig, "the kernel");
  }
  wb_guard_arm(&g, 1);
  unsigned moved = wb_guard_in_front(others);
  int rc = release ? ((int (*)(void*, int32_t))release)(gate, 0) : 0;
  if (rc == 0) rc = ((int (*)(void*))fn)(arg);
  wb_guard_disarm(&g);
  wb_guard_behind(moved, others);
  return rc;
}

WB_EXPORT void wb_guard_prepare(void) {
  if (!wb_guard_thread_ready) wb_guard_prepare_thread();
}

/* How many threads the guard has ended (a thread that faulted or exited while a kernel ran on another). */
WB_EXPORT int64_t wb_guard_threads_lost(void) { return WB_LOAD(&wb_guard_lost_threads); }

/* -- a kernel ending itself: exit(), a SIGKILL of its own process, pthread_exit() ----------------- */

/* Jump out of the guarded call of this thread; for a thread the running kernel started, end that thread
   and fail the call.  Returns when no kernel runs: the caller then does what was asked. */
static void wb_guard_leave(int mark, int status) {
  WBGuard* g = wb_guard_frame;
  if (g) {
    wb_guard_frame = g->outer;
    wb_guard_exit_status = status;
    siglongjmp(g->env, mark);
  }
  wb_guard_end_kernel_thread(mark, status);
}

static void (*wb_real_exit)(int);
static void (*wb_real__exit)(int);
static void (*wb_real_quick_exit)(int);
static void (*wb_real_pthread_exit)(void*);
static int (*wb_real_raise)(int);
static int (*wb_real_kill)(pid_t, int);
static int (*wb_real_pthread_kill)(pthread_t, int);
static long (*wb_real_syscall)(long, ...);

static void wb_guard_exit_to(int status, void (*real)(int)) {
  wb_guard_leave(WB_EXIT_MARK, status);
  real(status);
  _exit(status); /* not reached */
}

static void wb_guard_exit(int status) { wb_guard_exit_to(status, wb_real_exit); }
static void wb_guard__exit(int status) { wb_guard_exit_to(status, wb_real__exit); }
static void wb_guard_quick_exit(int status) { wb_guard_exit_to(status, wb_real_quick_exit); }

static void wb_guard_pthread_exit(void* value) {
  WBGuard* g = wb_guard_frame;
  if (g) { /* ending the thread that serves the session would leave the server hung */
    wb_guard_frame = g->outer;
    siglongjmp(g->env, WB_THREAD_EXIT_MARK);
  }
  wb_real_pthread_exit(value); /* a thread the kernel started may end itself */
  for (;;) syscall(SYS_exit, 0);
}

/* SIGKILL and SIGSTOP: the two signals no handler sees, so a kernel sending one to its own process is
   stopped where it sends it (the others reach wb_guard_on_signal). */
static int wb_unstoppable(long sig) { return sig == SIGKILL || sig == SIGSTOP; }

static int wb_targets_self(long pid) { return pid == 0 || pid == -1 || pid == getpid() || pid == -getpgrp(); }

static int wb_guard_raise(int sig) {
  if (wb_unstoppable(sig)) wb_guard_leave(WB_SELF_KILL_MARK | sig, 0);
  return wb_real_raise(sig);
}

static int wb_guard_kill(pid_t pid, int sig) {
  if (wb_unstoppable(sig) && wb_targets_self(pid)) wb_guard_leave(WB_SELF_KILL_MARK | sig, 0);
  return wb_real_kill(pid, sig);
}

static int wb_guard_pthread_kill(pthread_t thread, int sig) {
  if (wb_unstoppable(sig)) wb_guard_leave(WB_SELF_KILL_MARK | sig, 0);
  return wb_real_pthread_kill(thread, sig);
}

/* syscall(): the same, for the system calls behind those functions. */
static long wb_guard_syscall(long nr, ...) {
  va_list ap;
  va_start(ap, nr);
  long a = va_arg(ap, long), b = va_arg(ap, long), c = va_arg(ap, long);
  long d = va_arg(ap, long), e = va_arg(ap, long), f = va_arg(ap, long);
  va_end(ap);
  if (nr == SYS_exit_group || (nr == SYS_exit && wb_guard_frame)) /* SYS_exit: ends only a kernel's own thread */
    wb_guard_leave(WB_EXIT_MARK, (int)a);
  else if ((nr == SYS_kill && wb_unstoppable(b) && wb_targets_self(a)) ||
           (nr == SYS_tkill && wb_unstoppable(b)) || (nr == SYS_tgkill && wb_unstoppable(c) && a == getpid()))
    wb_guard_leave(WB_SELF_KILL_MARK | (int)(nr == SYS_tgkill ? c : b), 0);
  return wb_real_syscall(nr, a, b, c, d, e, f);
}

/* libc's own, whatever GOT entries wb_guard_library rewrites later (this file's included, in minrpc) */
#define WB_REAL(var, name, fallback) \
  do {                                \
    *(void**)&(var) = dlsym(RTLD_DEFAULT, name); \
    if (!(var)) (var) = (fallback);   \
  } while (0)

static void wb_guard_find_real_functions(void) {
  WB_REAL(wb_real_exit, "exit", exit);
  WB_REAL(wb_real__exit, "_exit", _exit);
  WB_REAL(wb_real_quick_exit, "quick_exit", quick_exit);
  WB_REAL(wb_real_pthread_exit, "pthread_exit", pthread_exit);
  WB_REAL(wb_real_raise, "raise", raise);
  WB_REAL(wb_real_kill, "kill", kill);
  WB_REAL(wb_real_pthread_kill, "pthread_kill", pthread_kill);
  WB_REAL(wb_real_syscall, "syscall", syscall);
}
#undef WB_REAL

/* What wb_guard_library points a kernel library's GOT entries at, by the name they import. */
static const struct {
  const char* name;
  void* to;
} wb_guard_wrappers[] = {
    {"exit", (void*)wb_guard_exit},           {"_exit", (void*)wb_guard__exit},
    {"_Exit", (void*)wb_guard__exit},         {"quick_exit", (void*)wb_guard_quick_exit},
    {"pthread_exit", (void*)wb_guard_pthread_exit}, {"raise", (void*)wb_guard_raise},
    {"kill", (void*)wb_guard_kill},           {"pthread_kill", (void*)wb_guard_pthread_kill},
    {"syscall", (void*)wb_guard_syscall},
};

#if defined(__LP64__)
#define WB_R_SYM(info) ELF64_R_SYM(info)
#else
#define WB_R_SYM(info) ELF32_R_SYM(info)
#endif

typedef struct {
  ElfW(Addr) base;
  const char* name;
  ElfW(Addr) relro_start, relro_end;
} WBRelro;

static int wb_find_relro(struct dl_phdr_info* info, size_t size, void* data) {
  (void)size;
  WBRelro* r = (WBRelro*)data;
  if (info->dlpi_addr != r->base || strcmp(info->dlpi_name ? info->dlpi_name : "", r->name)) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_GNU_RELRO) {
      r->relro_start = info->dlpi_addr + info->dlpi_phdr[i].p_vaddr;
      r->relro_end = r->relro_start + info->dlpi_phdr[i].p_memsz;
    }
  return 1;
}

/* Point one GOT slot at `to`, making a read-only (RELRO) page writable for the moment. */
static void wb_patch_slot(void** slot, void* to, const WBRelro* relro) {
  if (*slot == to) return;
  long page = sysconf(_SC_PAGESIZE);
  void* start = (void*)((uintptr_t)slot & ~(uintptr_t)(page - 1));
  int readonly = (ElfW(Addr))slot >= relro->relro_start && (ElfW(Addr))slot < relro->relro_end;
  if (readonly && mprotect(start, (size_t)page, PROT_READ | PROT_WRITE) != 0) return;
  *slot = to;
  if (readonly) mprotect(start, (size_t)page, PROT_READ);
}

static void wb_patch_relocs(const void* table, size_t bytes, int rela, ElfW(Addr) base, const ElfW(Sym)* symtab,
                            const char* strtab, const WBRelro* relro) {
  size_t step = rela ? sizeof(ElfW(Rela)) : sizeof(ElfW(Rel));
  for (size_t off = 0; off + step <= bytes; off += step) {
    const ElfW(Rel)* r = (const ElfW(Rel)*)((const char*)table + off); /* Rela begins as Rel does */
    const char* name = strtab + symtab[WB_R_SYM(r->r_info)].st_name;
    for (size_t i = 0; i < sizeof(wb_guard_wrappers) / sizeof(wb_guard_wrappers[0]); ++i)
      if (!strcmp(name, wb_guard_wrappers[i].name)) {
        wb_patch_slot((void**)(base + r->r_offset), wb_guard_wrappers[i].to, relro);
        break;
      }
  }
}

/* The C library's own objects: they define what the wrappers replace (and call it internally). */
static int wb_system_library(const char* name) {
  static const char* const prefixes[] = {"libc.", "libc-", "ld-linux", "ld64", "libpthread", "libdl", "librt", "libm."};
  for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); ++i)
    if (!strncmp(name, prefixes[i], strlen(prefixes[i]))) return 1;
  return 0;
}

static int wb_guard_link_map(struct link_map* lm, int needed_too);

WB_EXPORT int wb_guard_library(void* handle) {
  struct link_map* lm = NULL;
  pthread_once(&wb_guard_once, wb_guard_install);
  wb_guard_reclaim(); /* its constructors, and its libraries', have run: they may have put handlers of their own */
  if (!handle || dlinfo(handle, RTLD_DI_LINKMAP, &lm) != 0 || !lm || !lm->l_ld) return -1;
  return wb_guard_link_map(lm, 1);
}

/* Rewrite lm's GOT entries; needed_too: those of the libraries it names (DT_NEEDED) too, but the C
   library's, so that exit() called on the kernel's behalf by a library it links is caught as well. */
static int wb_guard_link_map(struct link_map* lm, int needed_too) {
  if (!lm->l_ld) return -1;
  ElfW(Addr) base = lm->l_addr;
  const ElfW(Sym)* symtab = NULL;
  const char* strtab = NULL;
  ElfW(Addr) jmprel = 0, rela = 0, rel = 0;
  size_t pltrelsz = 0, relasz = 0, relsz = 0;
  int pltrela = 1;
  /* glibc turns the dynamic section's addresses absolute on most targets; an offset is below the base */
#define WB_ABS(p) ((ElfW(Addr))(p) < base ? (ElfW(Addr))(p) + base : (ElfW(Addr))(p))
  for (const ElfW(Dyn)* d = lm->l_ld; d->d_tag != DT_NULL; ++d) {
    switch (d->d_tag) {
    case DT_SYMTAB: symtab = (const ElfW(Sym)*)WB_ABS(d->d_un.d_ptr); break;
    case DT_STRTAB: strtab = (const char*)WB_ABS(d->d_un.d_ptr); break;
    case DT_JMPREL: jmprel = WB_ABS(d->d_un.d_ptr); break;
    case DT_PLTRELSZ: pltrelsz = d->d_un.d_val; break;
    case DT_PLTREL: pltrela = d->d_un.d_val == DT_RELA; break;
    case DT_RELA: rela = WB_ABS(d->d_un.d_ptr); break;
    case DT_RELASZ: relasz = d->d_un.d_val; break;
    case DT_REL: rel = WB_ABS(d->d_un.d_ptr); break;
    case DT_RELSZ: relsz = d->d_un.d_val; break;
    default: break;
    }
  }
#undef WB_ABS
  if (!symtab || !strtab) return -1;
  WBRelro relro = {base, lm->l_name ? lm->l_name : "", 0, 0};
  dl_iterate_phdr(wb_find_relro, &relro);
  if (jmprel) wb_patch_relocs((const void*)jmprel, pltrelsz, pltrela, base, symtab, strtab, &relro);
  if (rela) wb_patch_relocs((const void*)rela, relasz, 1, base, symtab, strtab, &relro);
  if (rel) wb_patch_relocs((const void*)rel, relsz, 0, base, symtab, strtab, &relro);
  for (const ElfW(Dyn)* d = lm->l_ld; needed_too && d->d_tag != DT_NULL; ++d) {
    if (d->d_tag != DT_NEEDED || wb_system_library(strtab + d->d_un.d_val)) continue;
    void* dep = dlopen(strtab + d->d_un.d_val, RTLD_LAZY | RTLD_NOLOAD); /* loaded with lm: found by its name */
    struct link_map* dep_lm = NULL;
    if (dep && dlinfo(dep, RTLD_DI_LINKMAP, &dep_lm) == 0 && dep_lm && dep_lm != lm) wb_guard_link_map(dep_lm, 0);
    if (dep) dlclose(dep);
  }
  return 0;
}

WB_EXPORT int64_t wb_guard_running(void) { return WB_LOAD(&wb_guard_now); }

WB_EXPORT int wb_guard_interrupt(int64_t serial) {
  if (serial <= 0 || WB_LOAD(&wb_guard_now) != serial) return 0;
  WB_STORE(&wb_guard_cancel, serial);
  if (WB_LOAD(&wb_guard_now) != serial) return 0;
  return pthread_kill(wb_guard_owner, wb_guard_interrupt_signal) == 0;
}

WB_EXPORT int wb_guard_sigint(int on) {
  static int held;
  pthread_once(&wb_guard_once, wb_guard_install);
  if (on) wb_guard_reclaim();
  if (on && !held) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = wb_guard_on_signal;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, &wb_guard_previous_sigint) != 0) return -1;
    held = 1;
  } else if (!on && held) {
    if (sigaction(SIGINT, &wb_guard_previous_sigint, NULL) != 0) return -1;
    held = 0;
  }
  return 0;
}

WB_EXPORT void* wb_guard_suspend(void) {
  WBGuard* g = wb_guard_frame;
  wb_guard_frame = NULL;
  return g;
}

WB_EXPORT void wb_guard_resume(void* token) { wb_guard_frame = (WBGuard*)token; }

WB_EXPORT int64_t wb_guard_faults(void) { return WB_LOAD(&wb_guard_fault_count); }

/* The watcher (kernel_runtime.h): a thread that stops a guarded call once the connection has had
   input (a CANCEL, or the end of the stream) for grace_ns while the call still runs.  While a call
   runs the client sends nothing but a CANCEL; while none runs, the watcher only sleeps. */
#define WB_WATCH_TRIES 2
static int64_t wb_watch_grace_ns;
static pthread_t wb_watch_thread;

static void wb_sleep_ns(int64_t ns) {
  struct timespec ts = {(time_t)(ns / 1000000000LL), (long)(ns % 1000000000LL)};
  nanosleep(&ts, NULL);
}

static void* wb_watch_main(void* arg) {
  (void)arg;
  const int64_t tick = 50 * 1000000LL;
  int64_t seen = 0, since = 0;
  int fd, tries = 0;
  while ((fd = WB_LOAD(&wb_watch_fd)) >= 0) {
    int64_t serial = wb_guard_running();
    if (!serial) {
      seen = since = 0;
      wb_sleep_ns(tick);
      continue;
    }
    if (serial != seen) seen = serial, since = 0, tries = 0;
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, (int)(tick / 1000000LL)) <= 0 || !(p.revents & (POLLIN | POLLHUP | POLLERR))) continue;
    int64_t now = now_ns();
    if (!since) since = now;
    if (now - since >= WB_LOAD(&wb_watch_grace_ns)) {
      /* A kernel that blocks the interrupt signal cannot be stopped in the process: the worker ends
         (its server tells the client) rather than hold the session forever.  Before that, a second
         try, for a kernel in a callback into Python that the Python side stops itself. */
      if (++tries > WB_WATCH_TRIES) _exit(WB_EXIT_STUCK);
      wb_guard_interrupt(serial);
      since = now;
    } else {
      wb_sleep_ns(tick); /* the input stays readable: do not spin on it */
    }
  }
  return NULL;
}

WB_EXPORT int wb_guard_watch(int fd, int64_t grace_ms) {
  if (WB_LOAD(&wb_watch_running)) {
    WB_STORE(&wb_watch_fd, -1);
    pthread_join(wb_watch_thread, NULL);
    WB_STORE(&wb_watch_running, 0);
  }
  if (fd < 0) return 0;
  pthread_once(&wb_guard_once, wb_guard_install);
  WB_STORE(&wb_watch_grace_ns, (grace_ms > 0 ? grace_ms : 0) * 1000000LL);
  WB_STORE(&wb_watch_fd, fd);
  /* the watcher must not take the interrupt signal itself */
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, wb_guard_interrupt_signal);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  int rc = pthread_create(&wb_watch_thread, NULL, wb_watch_main, NULL);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0) {
    WB_STORE(&wb_watch_fd, -1);
    return -1;
  }
  WB_STORE(&wb_watch_running, 1);
  return 0;
}


/* -- secrets out of a kernel's reach (kernel_runtime.h) ------------------------------------------- */
#ifndef PR_SET_DUMPABLE
#define PR_SET_DUMPABLE 4
#endif
#define WB_CAP_SYS_PTRACE 19

/* Zero every copy of each secret in this process's writable private memory: what a kernel searching
   its own memory (or /proc/self/environ, /proc/self/cmdline: the stack) would find.  Only resident
   pages are read (mincore), so reserved address space costs nothing; the patterns are copied to a
   page of their own, left out of the search and wiped at the end. */
WB_EXPORT int64_t wb_scrub_secrets(const char* const* secrets, const int64_t* lengths, int32_t n) {
  long page = sysconf(_SC_PAGESIZE);
  size_t total = 0;
  for (int32_t i = 0; i < n; ++i)
    if (secrets[i] && lengths[i] > 0) total += (size_t)lengths[i];
  if (!total) return 0;
  size_t own_bytes = (total + (size_t)page - 1) & ~((size_t)page - 1);
  char* own = (char*)mmap(NULL, own_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (own == MAP_FAILED) return -1;
  const char* pats[8];
  size_t lens[8];
  int32_t m = 0;
  for (int32_t i = 0, off = 0; i < n && m < 8; ++i) {
    if (!secrets[i] || lengths[i] <= 0) continue;
    memcpy(own + off, secrets[i], (size_t)lengths[i]);
    pats[m] = own + off, lens[m++] = (size_t)lengths[i];
    off += (int)lengths[i];
  }
  mprotect(own, own_bytes, PROT_READ); /* not writable: never searched, even merged with a neighbour */
  int64_t hits = 0;
  FILE* maps = fopen("/proc/self/maps", "r");
  if (!maps) {
    munmap(own, own_bytes);
    return -1;
  }
  char line[512];
  unsigned char vec[256];
  while (fgets(line, sizeof line, maps)) {
    unsigned long lo, hi;
    char perms[5] = {0};
    if (sscanf(line, "%lx-%lx %4s", &lo, &hi, perms) != 3 || perms[0] != 'r' || perms[1] != 'w' || perms[3] != 'p')
      continue;
    if (strstr(line, "[vvar]") || strstr(line, "[vsyscall]")) continue;
    /* runs of resident pages, 256 pages a look; a copy may cross a page but not a hole */
    char* run = NULL;
    for (unsigned long at = lo; at < hi;) {
      size_t span = (size_t)(hi - at) < 256 * (size_t)page ? (size_t)(hi - at) : 256 * (size_t)page;
      int looked = mincore((void*)at, span, vec) == 0;
      for (size_t k = 0; k * (size_t)page < span; ++k) {
        char* p = (char*)at + k * (size_t)page;
        int resident = looked ? (vec[k] & 1) : 1;
        int last = p + page >= (char*)hi;
        if (resident && !run) run = p;
        if (run && (!resident || last)) {
          char* end = resident ? p + page : p;
          for (int32_t j = 0; j < m; ++j)
            for (char* q = run; q + lens[j] <= end;) {
              char* hit = (char*)memmem(q, (size_t)(end - q), pats[j], lens[j]);
              if (!hit) break;
              memset(hit, 0, lens[j]);
              __asm__ __volatile__("" : : "r"(hit) : "memory"); /* the wipe stays */
              ++hits;
              q = hit + lens[j];
            }
          run = NULL;
        }
      }
      at += span;
    }
  }
  fclose(maps);
  mprotect(own, own_bytes, PROT_READ | PROT_WRITE);
  memset(own, 0, own_bytes);
  __asm__ __volatile__("" : : "r"(own) : "memory");
  munmap(own, own_bytes);
  return hits;
}

/* No process of this user reads this one's memory or environment (/proc/PID/mem, environ), and this
   one (a session's worker: the kernels it runs) keeps no CAP_SYS_PTRACE to read its parent's: a root
   worker too finds the server's secrets out of reach.  0, or -1 when the kernel refused a step. */
WB_EXPORT int wb_guard_secrets(int drop_ptrace) {
  int rc = prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0 ? 0 : -1;
  if (drop_ptrace) {
    struct {
      uint32_t version;
      int pid;
    } header = {0x20080522 /* _LINUX_CAPABILITY_VERSION_3 */, 0};
    struct {
      uint32_t effective, permitted, inheritable;
    } data[2];
    if (syscall(SYS_capget, &header, data) != 0) return -1;
    for (int i = 0; i < 2; ++i) {
      uint32_t bit = i == WB_CAP_SYS_PTRACE / 32 ? 1u << (WB_CAP_SYS_PTRACE % 32) : 0;
      data[i].effective &= ~bit, data[i].permitted &= ~bit, data[i].inheritable &= ~bit;
    }
    if (syscall(SYS_capset, &header, data) != 0) rc = -1;
    prctl(PR_CAPBSET_DROP, WB_CAP_SYS_PTRACE, 0, 0, 0); /* where allowed: no exec gets it back */
  }
  return rc;
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
  WBGuard g;
  int sig = sigsetjmp(g.env, 0);
  if (sig != 0) return wb_guard_caught(&g, sig, "the kernel");
  wb_guard_arm(&g, 1);
  int64_t start = now_ns();
  for (int64_t i = 0; i < number; ++i) {
    memset(&ret, 0, sizeof(ret));
    int rc = f(NULL, args, nargs, &ret);
    if (rc != 0) {
      wb_guard_disarm(&g);
      return rc;
    }
  }
  *elapsed_ns = now_ns() - start;
  wb_guard_disarm(&g);
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

/* A pool thread's share, guarded: a task that faults fails the loop with KernelCrashed, naming it. */
static void wb_run_share_guarded(WBRegion* r, int thread_index) {
  WBGuard g;
  int sig = sigsetjmp(g.env, 0);
  if (sig != 0) {
    char what[64];
    snprintf(what, sizeof(what), "a task of the kernel's parallel loop (pool thread %d)", thread_index);
    wb_guard_caught(&g, sig, what);
    wb_in_parallel = 1;
    int expected = 0;
    if (__atomic_compare_exchange_n(&r->failed, &expected, 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
      snprintf(r->error, WB_ERR_CAP, "%s", wb_error);
    return;
  }
  wb_guard_arm(&g, 0);
  wb_run_share(r, thread_index);
  wb_guard_disarm(&g);
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
    if (index < r->nthreads) wb_run_share_guarded(r, index);
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
  wb_launching = pool;
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
  wb_launching = NULL;
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

/* A guarded call jumped out of the launch this thread ran (its task 0 faulted, or it was stopped).
   The pool threads finish their shares; if they do within a second the pool is used again, else
   (they wait on a barrier task 0 never reaches, or still run) it is left to them and the next
   launch starts a new pool. */
static void wb_pool_abandon_launch(void) {
  WBPool* pool = (WBPool*)wb_launching;
  wb_launching = NULL;
  WBRegion* r = &pool->region;
  for (int i = 0; i < 1000 && WB_LOAD(&r->pending) > 0; ++i) {
    struct timespec ms = {0, 1000000};
    nanosleep(&ms, NULL);
  }
  if (WB_LOAD(&r->pending) == 0) {
    pthread_mutex_unlock(&pool->launch_lock);
    return;
  }
  pthread_mutex_lock(&wb_pool_create_lock);
  if (wb_pool == pool) __atomic_store_n(&wb_pool, NULL, __ATOMIC_RELEASE);
  pthread_mutex_unlock(&wb_pool_create_lock);
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

