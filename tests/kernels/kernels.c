/* Test kernels, written against workbench_kernel.h (the TVM FFI packed ABI). */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <workbench_kernel.h>

/* raw_exit_group: begin (tests/helpers.py RAW_EXIT_H copies this block into sources written elsewhere)
   The exit_group system call issued by the instruction itself, not through libc's syscall(): the one
   way a kernel ends its process that no guard in the process can see. */
#include <sys/syscall.h>
#include <unistd.h>
static inline void raw_exit_group(int status) {
#if defined(__x86_64__)
  __asm__ volatile("syscall" : : "a"((long)SYS_exit_group), "D"((long)status) : "rcx", "r11", "memory");
#elif defined(__aarch64__)
  register long x0 __asm__("x0") = status;
  register long x8 __asm__("x8") = SYS_exit_group;
  __asm__ volatile("svc 0" : : "r"(x0), "r"(x8) : "memory");
#else
  syscall(SYS_exit_group, status); /* no inline form here: goes through the guard */
#endif
}
/* raw_exit_group: end */

static int64_t numel(const DLTensor* t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  return n;
}

/* b = a + 1 for float32 tensors of any shape */
WB_KERNEL(add_one) {
  WB_EXPECT_ARGS(2);
  DLTensor* a = WB_ARG_TENSOR(0);
  DLTensor* b = WB_ARG_TENSOR(1);
  if (args[0].type_index != kTVMFFIDLTensorPtr || args[1].type_index != kTVMFFIDLTensorPtr)
    WB_FAIL("TypeError", "add_one takes two tensors");
  if (a->dtype.code != 2 || a->dtype.bits != 32) WB_FAIL("TypeError", "add_one wants float32");
  const float* x = (const float*)a->data;
  float* y = (float*)b->data;
  for (int64_t i = 0, n = numel(a); i < n; ++i) y[i] = x[i] + 1.0f;
  return 0;
}

/* b = a + 1 for int, uint and float tensors of any width and shape */
WB_KERNEL(add_one_any) {
  WB_EXPECT_ARGS(2);
  DLTensor* a = WB_ARG_TENSOR(0);
  DLTensor* b = WB_ARG_TENSOR(1);
  int64_t n = numel(a);
  if (numel(b) != n || a->dtype.code != b->dtype.code || a->dtype.bits != b->dtype.bits)
    WB_FAIL("ValueError", "add_one_any: a and b differ in size or dtype");
#define WB_LOOP(T) { const T* x = (const T*)a->data; T* y = (T*)b->data; for (int64_t i = 0; i < n; ++i) y[i] = (T)(x[i] + 1); return 0; }
  switch (a->dtype.code * 1000 + a->dtype.bits) {
    case 8: WB_LOOP(int8_t) case 16: WB_LOOP(int16_t) case 32: WB_LOOP(int32_t) case 64: WB_LOOP(int64_t)
    case 1008: WB_LOOP(uint8_t) case 1016: WB_LOOP(uint16_t) case 1032: WB_LOOP(uint32_t) case 1064: WB_LOOP(uint64_t)
    case 2032: WB_LOOP(float) case 2064: WB_LOOP(double)
  }
  WB_FAIL("TypeError", "add_one_any: unsupported dtype code %d bits %d", a->dtype.code, a->dtype.bits);
}

/* b = a * s + k, s a float, k an int */
WB_KERNEL(scale_shift) {
  WB_EXPECT_ARGS(4);
  if (args[1].type_index != kTVMFFIFloat || args[2].type_index != kTVMFFIInt)
    WB_FAIL("TypeError", "scale_shift(a, float s, int k, b)");
  DLTensor* a = WB_ARG_TENSOR(0);
  DLTensor* b = WB_ARG_TENSOR(3);
  double s = WB_ARG_FLOAT(1);
  int64_t k = WB_ARG_INT(2);
  for (int64_t i = 0, n = numel(a); i < n; ++i) ((float*)b->data)[i] = (float)(((float*)a->data)[i] * s + k);
  return 0;
}

/* the sum of an int32 tensor, returned as an int */
WB_KERNEL(sum_int32) {
  WB_EXPECT_ARGS(1);
  DLTensor* a = WB_ARG_TENSOR(0);
  int64_t total = 0;
  for (int64_t i = 0, n = numel(a); i < n; ++i) total += ((int32_t*)a->data)[i];
  WB_RETURN_INT(total);
}

/* the length of a string argument */
WB_KERNEL(strlen) {
  WB_EXPECT_ARGS(1);
  if (args[0].type_index != kTVMFFIRawStr) WB_FAIL("TypeError", "strlen takes a string");
  WB_RETURN_INT(strlen(args[0].v_c_str));
}

WB_KERNEL(half) {
  WB_EXPECT_ARGS(1);
  WB_RETURN_FLOAT(WB_ARG_FLOAT(0) / 2);
}

WB_KERNEL(fail) { WB_FAIL("ValueError", "fail: the kernel refuses, as asked"); }

WB_KERNEL(segfault) {
  volatile int* p = NULL;
  *p = 1;
  return 0;
}

WB_KERNEL(call_exit) { exit(3); }

/* Deaths no guard catches, for the tests of a worker that really dies: SIGSEGV with the default action
   put back (as a kernel that installs its own handlers could), and the exit system call itself. */
WB_KERNEL(segfault_unguarded) {
  signal(SIGSEGV, SIG_DFL);
  volatile int* p = NULL;
  *p = 1;
  return 0;
}

WB_KERNEL(exit_group) {
  raw_exit_group(3);
  return 0;
}

/* The ways a kernel ends its process that no handler sees, through libc: each is refused in a call. */
WB_KERNEL(syscall_exit_group) {
  syscall(SYS_exit_group, 3);
  return 0;
}

WB_KERNEL(raise_sigkill) {
  raise(SIGKILL);
  return 0;
}

WB_KERNEL(kill_self_sigkill) {
  kill(getpid(), SIGKILL);
  return 0;
}

WB_KERNEL(raise_sigstop) {
  raise(SIGSTOP);
  return 0;
}

WB_KERNEL(call_pthread_exit) { pthread_exit(NULL); }

/* A thread of the kernel's own dies (NULL dereference, or exit()) while the kernel waits for it. */
static void* thread_segfaults(void* arg) {
  (void)arg;
  volatile int* p = NULL;
  *p = 1;
  return NULL;
}

static void* thread_exits(void* arg) {
  (void)arg;
  exit(5);
}

static int run_thread(void* (*body)(void*)) {
  pthread_t t;
  if (pthread_create(&t, NULL, body, NULL) != 0) WB_FAIL("RuntimeError", "pthread_create failed");
  pthread_join(t, NULL);
  return 0;
}

WB_KERNEL(thread_segfault) { return run_thread(thread_segfaults); }
WB_KERNEL(thread_exit) { return run_thread(thread_exits); }

WB_KERNEL(call__exit) { _exit(3); }

/* Writes 42 at a[0], then dereferences NULL: the crash leaves what the kernel wrote. */
WB_KERNEL(write_then_segfault) {
  DLTensor* a = WB_ARG_TENSOR_OF(0, float32, 1);
  ((float*)a->data)[0] = 42.0f;
  volatile int* p = NULL;
  *p = 1;
  return 0;
}

static int recurse(int n) {
  volatile char frame[4096];
  frame[0] = (char)n;
  return n < 0 ? 0 : recurse(n + 1) + frame[0]; /* n < 0: never; it keeps the compiler from warning */
}

WB_KERNEL(overflow_stack) { return recurse(0); }

WB_KERNEL(call_abort) { abort(); }

WB_KERNEL(raise_sigterm) {
  raise(SIGTERM);
  return 0;
}

WB_KERNEL(spin) {
  for (;;) {
  }
  return 0;
}

/* spins with every signal blocked: no interrupt can stop it */
WB_KERNEL(spin_blocking_signals) {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  for (;;) {
  }
  return 0;
}

/* sleep for an int number of milliseconds */
WB_KERNEL(sleep_ms) {
  WB_EXPECT_ARGS(1);
  struct timespec ts = {WB_ARG_INT(0) / 1000, (WB_ARG_INT(0) % 1000) * 1000000L};
  nanosleep(&ts, NULL);
  return 0;
}
