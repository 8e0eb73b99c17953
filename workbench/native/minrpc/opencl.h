/*
 * opencl.h: OpenCL devices in minrpc (docs/protocol.md section 14), as the Python server serves them
 * (workbench/runtime/opencl.py, opencl_module.py).
 *
 *   opencl.c         the ICD loader (dlopen'ed at run time, never linked), the device list probed in a forked child
 *                    of the listener, the session worker's runtime (contexts, queues, buffers, the gate and the
 *                    guarded wait, profiling timers)
 *   opencl_module.c  .cl modules (hand-written OpenCL C, built for every device, kernels called with their launch)
 *                    and TVM's "opencl" modules (a host library's two context slots pointed at its kernels)
 *
 * Nothing here needs libOpenCL to start: without a loader (or with WORKBENCH_NO_OPENCL=1) the server has no cl
 * device and everything else works as before.
 */
#ifndef MINRPC_OPENCL_H
#define MINRPC_OPENCL_H

#include <stddef.h>
#include <stdint.h>

#include "minrpc.h"
#include "msgpack.h"

#define MR_CL_DEVICE_TYPE 4 /* DLPack kDLOpenCL */
#define MR_CL_INSTALL_HINT "sudo apt-get install pocl-opencl-icd ocl-icd-libopencl1"

/* ---- the devices the server publishes (listed once, in the listener, by a forked child) ---------------------- */
#define MR_CL_TEXT 256
#define MR_CL_MAX_DIMS 8
typedef struct {
    char device_name[MR_CL_TEXT], vendor[MR_CL_TEXT], platform[MR_CL_TEXT];
    char compute_version[MR_CL_TEXT], driver_version[MR_CL_TEXT];
    const char* device_kind; /* "gpu", "cpu", "accelerator" (static) */
    uint64_t multi_processor_count, max_threads_per_block, max_shared_memory_per_block, total_global_memory;
    uint64_t max_clock_rate;
    uint32_t dims;
    uint64_t max_thread_dimensions[MR_CL_MAX_DIMS];
} mr_cl_info;

/* Start listing the devices (once): nothing when WORKBENCH_NO_OPENCL is set or there is no loader; else in a forked
   child that writes them through a pipe (over 30 s, or a failed child: none), collected by the first mr_cl_count,
   mr_cl_published or mr_cl_put_details. Never opens a platform in this process. */
void mr_cl_probe(void);
/* The probe's pipe while it runs, else -1: a listener polls it and calls mr_cl_count once it is readable, so the
   probe is reaped even when no session comes. */
int mr_cl_probe_fd(void);
int mr_cl_count(void);
const mr_cl_info* mr_cl_published(int device_id);
/* The session info's "device_details": an array of one map per device (TVM's attribute names). */
void mr_cl_put_details(mp_buf* b);

/* ---- the session worker's runtime -------------------------------------------------------------------------- */
/* Open the runtime if needed and check it is usable: 0, or -1 with err (KERNEL_CRASHED "cannot be used any more",
   or REMOTE when the platform cannot be opened). */
int mr_cl_ready(mr_error* err);
int mr_cl_opened(void);
/* The runtime's device count (0 before mr_cl_ready). */
int mr_cl_devices(void);
/* "cl(0) (NAME)", for messages. */
const char* mr_cl_describe(int device_id);
/* 0 if the device exists, else -1 with err (NO_DEVICE "this server has no cl(N); its OpenCL devices: ..."). */
int mr_cl_check_device(int device_id, mr_error* err);
int mr_cl_current(void);
void mr_cl_set_current(int device_id);

/* Buffers: one cl_mem of max(nbytes, 1) bytes, zero-filled when `zero`. 0 and *mem, or -1 with err. */
int mr_cl_alloc(int device_id, uint64_t nbytes, int zero, void** mem, mr_error* err);
void mr_cl_free(int device_id, void* mem);
/* Map nbytes (> 0) of a buffer, blocking: for writing (the old contents invalidated) or reading. */
void* mr_cl_map(int device_id, void* mem, uint64_t nbytes, int for_write, mr_error* err);
void mr_cl_unmap(int device_id, void* mem, void* ptr);
/* Run what is still behind a gate (a call that failed halfway) before memory is touched: 0, or -1 with err. */
int mr_cl_settle(mr_error* err);

/* Enqueue `kernel` (its arguments set) on the device's queue behind the gate: 0, or -1 with err (REMOTE naming
   the launch). `name` is kept for the error of a crash. local NULL: the runtime's choice. */
int mr_cl_launch(int device_id, void* kernel, const char* name, uint32_t dims, const size_t* global_size,
                 const size_t* local_size, mr_error* err);
/* Wait (one guarded call per device: the gate opens, then clFinish) for device_id's work, or every device's with
   work (-1): 0, or -1 with err (KERNEL_CRASHED / CANCELLED, after which the runtime is not used again). */
int mr_cl_finish(int device_id, mr_error* err);
/* Profiling while a timer runs: the launches keep their events; mr_cl_timer_end sums END - START (ns) and
   releases them. */
void mr_cl_timer_begin(void);
int mr_cl_timer_end(int64_t* ns, mr_error* err);

/* Set an argument (clSetKernelArg): the OpenCL error code (0 = CL_SUCCESS). */
int mr_cl_set_arg(void* kernel, uint32_t index, size_t size, const void* value);
/* "CL_INVALID_VALUE (-30)" */
const char* mr_cl_error_name(int code, char* buf, size_t cap);
/* A program built from source for the device: NULL with err (REMOTE "OpenCL build failed: NAME for cl(0) (DEV):
   CL_... (code)\n<log>"). */
void* mr_cl_build(int device_id, const char* source, size_t len, const char* name, const char* options,
                  mr_error* err);
void mr_cl_release_program(void* program);
void mr_cl_release_kernel(void* kernel);
void* mr_cl_create_kernel(void* program, const char* name, mr_error* err);
/* The program's kernels (CL_PROGRAM_KERNEL_NAMES split at ';'), sorted: 0, or -1 with err. */
int mr_cl_kernel_names(void* program, mr_strlist* out, mr_error* err);
/* Kernel argument info (the program built with -cl-kernel-arg-info). */
uint32_t mr_cl_kernel_num_args(void* kernel);
uint32_t mr_cl_kernel_arg_space(void* kernel, uint32_t index); /* CL_KERNEL_ARG_ADDRESS_* */
void mr_cl_kernel_arg_text(void* kernel, uint32_t index, int name, char* out, size_t cap);
#define MR_CL_ARG_GLOBAL 0x119B
#define MR_CL_ARG_LOCAL 0x119C
#define MR_CL_ARG_CONSTANT 0x119D

/* ---- modules (opencl_module.c) --------------------------------------------------------------------------- */
/* "cannot load NAME: its kernels run on an OpenCL device, and this server has none; ..." (UNSUPPORTED). */
int mr_cl_no_device_error(const char* name, mr_error* err);

typedef struct mr_cl_module mr_cl_module;
typedef struct mr_cl_kernel mr_cl_kernel;
/* A .cl file of the workspace at `path` (`name` for messages), built for every device: NULL with err. */
mr_cl_module* mr_cl_load_source(const char* path, const char* name, mr_error* err);
const mr_strlist* mr_cl_module_names(const mr_cl_module* m);
/* Module objects and the functions handed out of them hold a reference each; the last release frees the programs. */
void mr_cl_module_retain(mr_cl_module* m);
void mr_cl_module_release(mr_cl_module* m);
mr_cl_module* mr_cl_kernel_module(mr_cl_kernel* k);
/* A kernel of the module: NULL with err (NOT_FOUND listing what it has). */
mr_cl_kernel* mr_cl_get_kernel(mr_cl_module* m, const char* name, mr_error* err);

/* One CALL argument, as requests.c resolved it. */
typedef struct {
    const mp_node* node;
    int is_tensor;
    int32_t device_type, device_id;
    void* data; /* a tensor's data: the cl_mem on an OpenCL device */
} mr_cl_value;
/* Set the kernel's arguments and launch it (the values: its arguments, then 1, 2, 4 or 6 launch ints). The work is
   only enqueued: the caller waits with mr_cl_finish. 0, or -1 with err. */
int mr_cl_call(mr_cl_kernel* k, const mr_cl_value* values, uint32_t n, mr_error* err);
const char* mr_cl_kernel_name(const mr_cl_kernel* k);

/* A TVM host library just opened (dl) with its context slots filled: if its __tvm_ffi__library_bin imports
   exactly one "opencl" module, point its lookup and call slots at that module's kernels (1); a library without
   OpenCL: 0; -1 with err (no device, a payload that cannot be read, a format or type this server cannot run). */
int mr_cl_attach_tvm(void* dl, const char* name, mr_error* err);

#endif
