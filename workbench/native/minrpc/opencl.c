/*
 * opencl.c: OpenCL devices (docs/protocol.md section 14): the ICD loader, the device list, and the session
 * worker's runtime (contexts, queues, buffers, launches behind a gate, the guarded wait, profiling timers).
 * The Python server does the same in workbench/runtime/opencl.py; the error texts are its texts.
 *
 * The loader is dlopen'ed ("libOpenCL.so.1", then "libOpenCL.so"); the few types, constants and prototypes used are
 * declared here from the OpenCL headers' facts, so minrpc builds (and starts) where there is no OpenCL at all.
 */
#include "opencl.h"
#include "core.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernel_runtime.h"

/* ---- OpenCL's types and constants (CL/cl.h) ----------------------------------------------------------------- */
typedef int32_t cl_int;
typedef uint32_t cl_uint;
typedef uint64_t cl_ulong;
typedef uint64_t cl_bitfield;
typedef void* cl_handle; /* cl_platform_id, cl_device_id, cl_context, cl_command_queue, cl_mem, cl_program, ... */

#define CL_SUCCESS 0
#define CL_DEVICE_TYPE_CPU (1 << 1)
#define CL_DEVICE_TYPE_GPU (1 << 2)
#define CL_PLATFORM_NAME 0x0902
#define CL_DEVICE_TYPE_INFO 0x1000
#define CL_DEVICE_MAX_COMPUTE_UNITS 0x1002
#define CL_DEVICE_MAX_WORK_ITEM_DIMENSIONS 0x1003
#define CL_DEVICE_MAX_WORK_GROUP_SIZE 0x1004
#define CL_DEVICE_MAX_WORK_ITEM_SIZES 0x1005
#define CL_DEVICE_MAX_CLOCK_FREQUENCY 0x100C
#define CL_DEVICE_GLOBAL_MEM_SIZE 0x101F
#define CL_DEVICE_LOCAL_MEM_SIZE 0x1023
#define CL_DEVICE_NAME 0x102B
#define CL_DEVICE_VENDOR 0x102C
#define CL_DRIVER_VERSION 0x102D
#define CL_DEVICE_VERSION 0x102F
#define CL_QUEUE_PROFILING_ENABLE (1 << 1)
#define CL_MEM_READ_WRITE (1 << 0)
#define CL_MAP_READ (1 << 0)
#define CL_MAP_WRITE_INVALIDATE_REGION (1 << 2)
#define CL_COMPLETE 0
#define CL_PROGRAM_KERNEL_NAMES 0x1168
#define CL_PROGRAM_BUILD_LOG 0x1183
#define CL_KERNEL_NUM_ARGS 0x1191
#define CL_KERNEL_ARG_ADDRESS_QUALIFIER 0x1196
#define CL_KERNEL_ARG_TYPE_NAME 0x1198
#define CL_KERNEL_ARG_NAME 0x119A
#define CL_PROFILING_COMMAND_START 0x1282
#define CL_PROFILING_COMMAND_END 0x1283
#define CL_INVALID_WORK_GROUP_SIZE (-54)

typedef cl_int (*fn_get_platform_ids)(cl_uint, cl_handle*, cl_uint*);
typedef cl_int (*fn_get_info)(cl_handle, cl_uint, size_t, void*, size_t*);
typedef cl_int (*fn_get_device_ids)(cl_handle, cl_bitfield, cl_uint, cl_handle*, cl_uint*);
typedef cl_handle (*fn_create_context)(const intptr_t*, cl_uint, const cl_handle*, void*, void*, cl_int*);
typedef cl_handle (*fn_create_queue)(cl_handle, cl_handle, cl_bitfield, cl_int*);
typedef cl_handle (*fn_create_buffer)(cl_handle, cl_bitfield, size_t, void*, cl_int*);
typedef cl_int (*fn_release)(cl_handle);
typedef cl_int (*fn_fill_buffer)(cl_handle, cl_handle, const void*, size_t, size_t, size_t, cl_uint, const cl_handle*,
                                 cl_handle*);
typedef void* (*fn_map_buffer)(cl_handle, cl_handle, cl_uint, cl_bitfield, size_t, size_t, cl_uint, const cl_handle*,
                               cl_handle*, cl_int*);
typedef cl_int (*fn_unmap)(cl_handle, cl_handle, void*, cl_uint, const cl_handle*, cl_handle*);
typedef cl_int (*fn_finish)(cl_handle);
typedef cl_handle (*fn_create_program)(cl_handle, cl_uint, const char**, const size_t*, cl_int*);
typedef cl_int (*fn_build_program)(cl_handle, cl_uint, const cl_handle*, const char*, void*, void*);
typedef cl_int (*fn_build_info)(cl_handle, cl_handle, cl_uint, size_t, void*, size_t*);
typedef cl_handle (*fn_create_kernel)(cl_handle, const char*, cl_int*);
typedef cl_int (*fn_arg_info)(cl_handle, cl_uint, cl_uint, size_t, void*, size_t*);
typedef cl_int (*fn_set_arg)(cl_handle, cl_uint, size_t, const void*);
typedef cl_int (*fn_nd_range)(cl_handle, cl_handle, cl_uint, const size_t*, const size_t*, const size_t*, cl_uint,
                              const cl_handle*, cl_handle*);
typedef cl_handle (*fn_user_event)(cl_handle, cl_int*);
typedef cl_int (*fn_set_status)(cl_handle, cl_int);

static struct {
    void* lib;
    fn_get_platform_ids GetPlatformIDs;
    fn_get_info GetPlatformInfo, GetDeviceInfo, GetProgramInfo, GetKernelInfo, GetEventProfilingInfo;
    fn_get_device_ids GetDeviceIDs;
    fn_create_context CreateContext;
    fn_create_queue CreateCommandQueue;
    fn_create_buffer CreateBuffer;
    fn_release ReleaseMemObject, ReleaseProgram, ReleaseKernel, ReleaseEvent, ReleaseCommandQueue, ReleaseContext;
    fn_fill_buffer EnqueueFillBuffer;
    fn_map_buffer EnqueueMapBuffer;
    fn_unmap EnqueueUnmapMemObject;
    fn_finish Finish;
    fn_create_program CreateProgramWithSource;
    fn_build_program BuildProgram;
    fn_build_info GetProgramBuildInfo;
    fn_create_kernel CreateKernel;
    fn_arg_info GetKernelArgInfo;
    fn_set_arg SetKernelArg;
    fn_nd_range EnqueueNDRangeKernel;
    fn_user_event CreateUserEvent;
    fn_set_status SetUserEventStatus;
} CL;

#define LOAD(field, symbol)                                                  \
    do {                                                                     \
        void* p_ = dlsym(CL.lib, symbol);                                    \
        if (!p_) missing = symbol;                                           \
        memcpy(&CL.field, &p_, sizeof(p_)); /* object to function pointer */ \
    } while (0)

/* Open the ICD loader (once): 0, or -1 with a reason in why. */
static int load_loader(char* why, size_t cap) {
    static int state; /* 0 not tried, 1 open, -1 failed */
    static char reason[512];
    if (state == 0) {
        const char* names[] = {"libOpenCL.so.1", "libOpenCL.so"};
        const char* last = "not found";
        wb_guard_prepare(); /* before PoCL's LLVM saves the handlers it finds (kernel_runtime.h) */
        for (int i = 0; i < 2 && !CL.lib; ++i) {
            CL.lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
            if (!CL.lib) last = dlerror();
        }
        if (!CL.lib) {
            snprintf(reason, sizeof(reason), "this machine has no OpenCL loader (%s); install one with %s",
                     last ? last : "not found", MR_CL_INSTALL_HINT);
            state = -1;
        } else {
            const char* missing = NULL;
            LOAD(GetPlatformIDs, "clGetPlatformIDs");
            LOAD(GetPlatformInfo, "clGetPlatformInfo");
            LOAD(GetDeviceIDs, "clGetDeviceIDs");
            LOAD(GetDeviceInfo, "clGetDeviceInfo");
            LOAD(CreateContext, "clCreateContext");
            LOAD(CreateCommandQueue, "clCreateCommandQueue");
            LOAD(CreateBuffer, "clCreateBuffer");
            LOAD(ReleaseMemObject, "clReleaseMemObject");
            LOAD(EnqueueFillBuffer, "clEnqueueFillBuffer");
            LOAD(EnqueueMapBuffer, "clEnqueueMapBuffer");
            LOAD(EnqueueUnmapMemObject, "clEnqueueUnmapMemObject");
            LOAD(Finish, "clFinish");
            LOAD(CreateProgramWithSource, "clCreateProgramWithSource");
            LOAD(BuildProgram, "clBuildProgram");
            LOAD(GetProgramBuildInfo, "clGetProgramBuildInfo");
            LOAD(GetProgramInfo, "clGetProgramInfo");
            LOAD(ReleaseProgram, "clReleaseProgram");
            LOAD(CreateKernel, "clCreateKernel");
            LOAD(ReleaseKernel, "clReleaseKernel");
            LOAD(GetKernelInfo, "clGetKernelInfo");
            LOAD(GetKernelArgInfo, "clGetKernelArgInfo");
            LOAD(SetKernelArg, "clSetKernelArg");
            LOAD(EnqueueNDRangeKernel, "clEnqueueNDRangeKernel");
            LOAD(CreateUserEvent, "clCreateUserEvent");
            LOAD(SetUserEventStatus, "clSetUserEventStatus");
            LOAD(GetEventProfilingInfo, "clGetEventProfilingInfo");
            LOAD(ReleaseEvent, "clReleaseEvent");
            LOAD(ReleaseCommandQueue, "clReleaseCommandQueue");
            LOAD(ReleaseContext, "clReleaseContext");
            if (missing) {
                snprintf(reason, sizeof(reason), "the OpenCL loader lacks %s (an OpenCL 1.2 loader is needed); install "
                         "one with %s", missing, MR_CL_INSTALL_HINT);
                state = -1;
            } else {
                state = 1;
            }
        }
    }
    if (state < 0) snprintf(why, cap, "%s", reason);
    return state > 0 ? 0 : -1;
}

static int opencl_disabled(void) {
    const char* v = getenv("WORKBENCH_NO_OPENCL");
    if (!v) return 0;
    while (*v == ' ' || *v == '\t') v++;
    char low[16];
    size_t n = 0;
    for (; v[n] && n < sizeof(low) - 1; ++n) low[n] = (char)(v[n] >= 'A' && v[n] <= 'Z' ? v[n] + 32 : v[n]);
    while (n && (low[n - 1] == ' ' || low[n - 1] == '\t' || low[n - 1] == '\n')) n--;
    low[n] = '\0';
    return !(n == 0 || !strcmp(low, "0") || !strcmp(low, "false") || !strcmp(low, "no"));
}

const char* mr_cl_error_name(int code, char* buf, size_t cap) {
    static const struct {
        int code;
        const char* name;
    } names[] = {
        {-1, "CL_DEVICE_NOT_FOUND"}, {-2, "CL_DEVICE_NOT_AVAILABLE"}, {-3, "CL_COMPILER_NOT_AVAILABLE"},
        {-4, "CL_MEM_OBJECT_ALLOCATION_FAILURE"}, {-5, "CL_OUT_OF_RESOURCES"}, {-6, "CL_OUT_OF_HOST_MEMORY"},
        {-7, "CL_PROFILING_INFO_NOT_AVAILABLE"}, {-11, "CL_BUILD_PROGRAM_FAILURE"}, {-12, "CL_MAP_FAILURE"},
        {-14, "CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST"}, {-30, "CL_INVALID_VALUE"},
        {-32, "CL_INVALID_PLATFORM"}, {-33, "CL_INVALID_DEVICE"}, {-34, "CL_INVALID_CONTEXT"},
        {-36, "CL_INVALID_COMMAND_QUEUE"}, {-38, "CL_INVALID_MEM_OBJECT"}, {-42, "CL_INVALID_BINARY"},
        {-43, "CL_INVALID_BUILD_OPTIONS"}, {-44, "CL_INVALID_PROGRAM"}, {-45, "CL_INVALID_PROGRAM_EXECUTABLE"},
        {-46, "CL_INVALID_KERNEL_NAME"}, {-47, "CL_INVALID_KERNEL_DEFINITION"}, {-48, "CL_INVALID_KERNEL"},
        {-49, "CL_INVALID_ARG_INDEX"}, {-50, "CL_INVALID_ARG_VALUE"}, {-51, "CL_INVALID_ARG_SIZE"},
        {-52, "CL_INVALID_KERNEL_ARGS"}, {-53, "CL_INVALID_WORK_DIMENSION"}, {-54, "CL_INVALID_WORK_GROUP_SIZE"},
        {-55, "CL_INVALID_WORK_ITEM_SIZE"}, {-56, "CL_INVALID_GLOBAL_OFFSET"}, {-58, "CL_INVALID_EVENT"},
        {-59, "CL_INVALID_OPERATION"}, {-61, "CL_INVALID_BUFFER_SIZE"}, {-63, "CL_INVALID_GLOBAL_WORK_SIZE"},
        {-1001, "CL_PLATFORM_NOT_FOUND_KHR"},
    };
    const char* name = "CL error";
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); ++i)
        if (names[i].code == code) name = names[i].name;
    snprintf(buf, cap, "%s (%d)", name, code);
    return buf;
}

/* ---- listing devices ---------------------------------------------------------------------------------------- */
typedef struct {
    cl_handle platform, device;
} cl_pair;

/* (platform, device) as TVM numbers them: every platform's GPUs, or where there is none, every CPU device.
   Returns the count (malloc'ed *out), 0 when none. */
static int enumerate(cl_pair** out) {
    *out = NULL;
    cl_uint np = 0;
    if (CL.GetPlatformIDs(0, NULL, &np) != CL_SUCCESS || !np) return 0;
    cl_handle* platforms = (cl_handle*)calloc(np, sizeof(cl_handle));
    if (!platforms || CL.GetPlatformIDs(np, platforms, NULL) != CL_SUCCESS) {
        free(platforms);
        return 0;
    }
    const cl_bitfield kinds[2] = {CL_DEVICE_TYPE_GPU, CL_DEVICE_TYPE_CPU};
    int found = 0;
    cl_pair* pairs = NULL;
    for (int k = 0; k < 2 && !found; ++k) {
        for (cl_uint p = 0; p < np; ++p) {
            cl_uint nd = 0;
            if (CL.GetDeviceIDs(platforms[p], kinds[k], 0, NULL, &nd) != CL_SUCCESS || !nd) continue;
            cl_handle* ids = (cl_handle*)calloc(nd, sizeof(cl_handle));
            cl_pair* grown = (cl_pair*)realloc(pairs, (size_t)(found + (int)nd) * sizeof(cl_pair));
            if (!ids || !grown) {
                free(ids);
                if (grown) pairs = grown;
                continue;
            }
            pairs = grown;
            if (CL.GetDeviceIDs(platforms[p], kinds[k], nd, ids, NULL) == CL_SUCCESS)
                for (cl_uint d = 0; d < nd; ++d) pairs[found++] = (cl_pair){platforms[p], ids[d]};
            free(ids);
        }
    }
    free(platforms);
    if (!found) {
        free(pairs);
        pairs = NULL;
    }
    *out = pairs;
    return found;
}

static void info_text(fn_get_info get, cl_handle h, cl_uint param, char* out, size_t cap) {
    size_t size = 0;
    out[0] = '\0';
    if (get(h, param, 0, NULL, &size) != CL_SUCCESS || !size) return;
    char* buf = (char*)calloc(1, size + 1);
    if (!buf) return;
    if (get(h, param, size, buf, NULL) == CL_SUCCESS) {
        const char* s = buf;
        while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') s++;
        size_t n = strlen(s);
        while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r')) n--;
        if (n >= cap) n = cap - 1;
        memcpy(out, s, n);
        out[n] = '\0';
    }
    free(buf);
}

static uint64_t info_uint(cl_handle device, cl_uint param, size_t size) {
    uint64_t v64 = 0;
    uint32_t v32 = 0;
    if (size == 4) return CL.GetDeviceInfo(device, param, 4, &v32, NULL) == CL_SUCCESS ? v32 : 0;
    if (size == sizeof(size_t) && size != 8) {
        size_t v = 0;
        return CL.GetDeviceInfo(device, param, size, &v, NULL) == CL_SUCCESS ? (uint64_t)v : 0;
    }
    return CL.GetDeviceInfo(device, param, 8, &v64, NULL) == CL_SUCCESS ? v64 : 0;
}

static void describe(cl_pair pair, mr_cl_info* info) {
    memset(info, 0, sizeof(*info));
    cl_handle d = pair.device;
    info_text(CL.GetDeviceInfo, d, CL_DEVICE_NAME, info->device_name, MR_CL_TEXT);
    info_text(CL.GetDeviceInfo, d, CL_DEVICE_VENDOR, info->vendor, MR_CL_TEXT);
    info_text(CL.GetPlatformInfo, pair.platform, CL_PLATFORM_NAME, info->platform, MR_CL_TEXT);
    info_text(CL.GetDeviceInfo, d, CL_DEVICE_VERSION, info->compute_version, MR_CL_TEXT);
    info_text(CL.GetDeviceInfo, d, CL_DRIVER_VERSION, info->driver_version, MR_CL_TEXT);
    uint64_t kind = info_uint(d, CL_DEVICE_TYPE_INFO, 8);
    info->device_kind = kind & CL_DEVICE_TYPE_GPU ? "gpu" : kind & CL_DEVICE_TYPE_CPU ? "cpu" : "accelerator";
    info->multi_processor_count = info_uint(d, CL_DEVICE_MAX_COMPUTE_UNITS, 4);
    info->max_threads_per_block = info_uint(d, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof(size_t));
    info->max_shared_memory_per_block = info_uint(d, CL_DEVICE_LOCAL_MEM_SIZE, 8);
    info->total_global_memory = info_uint(d, CL_DEVICE_GLOBAL_MEM_SIZE, 8);
    info->max_clock_rate = info_uint(d, CL_DEVICE_MAX_CLOCK_FREQUENCY, 4);
    uint32_t dims = (uint32_t)info_uint(d, CL_DEVICE_MAX_WORK_ITEM_DIMENSIONS, 4);
    if (dims > MR_CL_MAX_DIMS) dims = MR_CL_MAX_DIMS;
    size_t sizes[MR_CL_MAX_DIMS];
    if (dims && CL.GetDeviceInfo(d, CL_DEVICE_MAX_WORK_ITEM_SIZES, dims * sizeof(size_t), sizes, NULL) == CL_SUCCESS) {
        info->dims = dims;
        for (uint32_t i = 0; i < dims; ++i) info->max_thread_dimensions[i] = sizes[i];
    }
}

static mr_cl_info* published;
static int n_published;

static pid_t probe_pid = -1; /* the probe mr_cl_probe started, until probe_collect reads its list */
static int probe_fd = -1;
static void probe_collect(void);

int mr_cl_probe_fd(void) { return probe_fd; }

int mr_cl_count(void) {
    probe_collect();
    return n_published;
}
const mr_cl_info* mr_cl_published(int device_id) {
    probe_collect();
    return device_id >= 0 && device_id < n_published ? &published[device_id] : NULL;
}

#define PROBE_TIMEOUT_NS (30LL * 1000000000LL)
#define PROBE_MAX_DEVICES 64

void mr_cl_probe(void) {
    static int done;
    if (done) return;
    done = 1;
    if (opencl_disabled()) return;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) {
        mr_log_error("cannot list OpenCL devices (pipe: %s): none listed", strerror(errno));
        return;
    }
    pid_t pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        mr_log_error("cannot fork to list OpenCL devices (%s): none listed", strerror(errno));
        return;
    }
    if (pid == 0) { /* the child: open the platforms, write [count][infos], leave without the parent's exit code */
        close(fds[0]);
        dup2(2, 1); /* what a platform prints goes to stderr: stdout is the listener's (or a stdio session's) stream */
        char why[600];
        int32_t count = 0;
        cl_pair* pairs = NULL;
        if (load_loader(why, sizeof(why)) == 0) count = enumerate(&pairs);
        if (count > PROBE_MAX_DEVICES) count = PROBE_MAX_DEVICES;
        size_t total = sizeof(count) + (size_t)count * sizeof(mr_cl_info);
        uint8_t* data = (uint8_t*)calloc(1, total);
        if (!data) _exit(1);
        memcpy(data, &count, sizeof(count));
        for (int i = 0; i < count; ++i) describe(pairs[i], (mr_cl_info*)(data + sizeof(count)) + i);
        size_t off = 0;
        while (off < total) {
            ssize_t w = write(fds[1], data + off, total - off);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) _exit(1);
            off += (size_t)w;
        }
        _exit(0);
    }
    close(fds[1]);
    probe_pid = pid;
    probe_fd = fds[0];
}

/* The started probe's list (waiting for it at most PROBE_TIMEOUT_NS); a process that forks session processes
   collects it before the first, which inherits the list. */
static void probe_collect(void) {
    if (probe_fd < 0) return;
    int fds[1] = {probe_fd};
    pid_t pid = probe_pid;
    probe_fd = -1;
    probe_pid = -1;
    size_t cap = sizeof(int32_t) + PROBE_MAX_DEVICES * sizeof(mr_cl_info), got = 0;
    uint8_t* data = (uint8_t*)malloc(cap);
    int64_t deadline = mr_now_ns() + PROBE_TIMEOUT_NS;
    int timed_out = 0;
    while (data) {
        int64_t left = deadline - mr_now_ns();
        if (left <= 0) {
            timed_out = 1;
            break;
        }
        struct pollfd p = {fds[0], POLLIN, 0};
        int r = poll(&p, 1, (int)(left / 1000000 + 1));
        if (r < 0 && errno == EINTR) continue;
        if (r == 0) {
            timed_out = 1;
            break;
        }
        if (got == cap) break; /* more than it may write: ignored */
        ssize_t n = read(fds[0], data + got, cap - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fds[0]);
    if (timed_out) {
        mr_log_error("listing OpenCL devices took over 30 s: none listed");
        kill(pid, SIGKILL);
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    int32_t count = 0;
    if (data && got >= sizeof(count)) memcpy(&count, data, sizeof(count));
    if (timed_out || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        if (!timed_out)
            mr_log_error("listing OpenCL devices failed (the probe ended with status %#x): none listed", status);
    } else if (count > 0 && count <= PROBE_MAX_DEVICES && got == sizeof(count) + (size_t)count * sizeof(mr_cl_info)) {
        published = (mr_cl_info*)calloc((size_t)count, sizeof(mr_cl_info));
        if (published) {
            memcpy(published, data + sizeof(count), (size_t)count * sizeof(mr_cl_info));
            for (int i = 0; i < count; ++i) { /* the kind pointed into the child's copy of the same binary */
                published[i].device_name[MR_CL_TEXT - 1] = published[i].vendor[MR_CL_TEXT - 1] = '\0';
                published[i].platform[MR_CL_TEXT - 1] = published[i].compute_version[MR_CL_TEXT - 1] = '\0';
                published[i].driver_version[MR_CL_TEXT - 1] = '\0';
                const char* k = published[i].device_kind;
                published[i].device_kind = k && !strcmp(k, "gpu") ? "gpu" : k && !strcmp(k, "cpu") ? "cpu" : "accelerator";
            }
            n_published = count;
        }
    }
    free(data);
}

void mr_cl_put_details(mp_buf* b) {
    probe_collect();
    mp_put_array(b, (uint32_t)n_published);
    for (int i = 0; i < n_published; ++i) {
        const mr_cl_info* d = &published[i];
        mp_put_map(b, 15);
        mp_put_cstr(b, "device");
        mp_put_array(b, 2);
        mp_put_int(b, MR_CL_DEVICE_TYPE);
        mp_put_int(b, i);
        mp_put_cstr(b, "exist");
        mp_put_bool(b, 1);
        mp_put_cstr(b, "device_name");
        mp_put_cstr(b, d->device_name);
        mp_put_cstr(b, "device_kind");
        mp_put_cstr(b, d->device_kind);
        mp_put_cstr(b, "vendor");
        mp_put_cstr(b, d->vendor);
        mp_put_cstr(b, "platform");
        mp_put_cstr(b, d->platform);
        mp_put_cstr(b, "compute_version");
        mp_put_cstr(b, d->compute_version);
        mp_put_cstr(b, "driver_version");
        mp_put_cstr(b, d->driver_version);
        mp_put_cstr(b, "multi_processor_count");
        mp_put_uint(b, d->multi_processor_count);
        mp_put_cstr(b, "max_threads_per_block");
        mp_put_uint(b, d->max_threads_per_block);
        mp_put_cstr(b, "max_thread_dimensions");
        mp_put_array(b, d->dims);
        for (uint32_t k = 0; k < d->dims; ++k) mp_put_uint(b, d->max_thread_dimensions[k]);
        mp_put_cstr(b, "max_shared_memory_per_block");
        mp_put_uint(b, d->max_shared_memory_per_block);
        mp_put_cstr(b, "total_global_memory");
        mp_put_uint(b, d->total_global_memory);
        mp_put_cstr(b, "max_clock_rate");
        mp_put_uint(b, d->max_clock_rate);
        mp_put_cstr(b, "warp_size");
        mp_put_int(b, 1);
    }
}

/* ---- the session worker's runtime --------------------------------------------------------------------------- */
typedef struct {
    cl_pair id;
    cl_handle context, queue;
    cl_handle gate; /* the user event the launches since the last finish wait for */
    int dirty;      /* work enqueued since the last finish */
    char label[MR_CL_TEXT + 32]; /* "cl(0) (NAME)" */
    uint64_t max_work_group;
} cl_dev;

static struct {
    int opened;
    cl_dev* devs;
    int n;
    int current;
    char broken[2048];   /* why this process's OpenCL cannot be used any more ("" while it can) */
    int64_t threads_lost; /* wb_guard_threads_lost() when the runtime opened */
    char last_kernel[256];
    int timing;
    cl_handle* events;
    size_t n_events, cap_events;
} R;

int mr_cl_opened(void) { return R.opened; }
int mr_cl_devices(void) { return R.n; }
int mr_cl_current(void) { return R.current; }
void mr_cl_set_current(int device_id) { R.current = device_id; }
const char* mr_cl_describe(int device_id) {
    return device_id >= 0 && device_id < R.n ? R.devs[device_id].label : "cl(?)";
}

int mr_cl_ready(mr_error* err) {
    if (!R.opened) {
        char why[600];
        if (opencl_disabled()) return mr_fail(err, MR_NO_DEVICE, "OpenCL is turned off on this server (WORKBENCH_NO_OPENCL=1)");
        if (load_loader(why, sizeof(why))) return mr_fail(err, MR_NO_DEVICE, "%s", why);
        cl_pair* pairs = NULL;
        int n = enumerate(&pairs);
        R.devs = (cl_dev*)calloc(n ? (size_t)n : 1, sizeof(cl_dev));
        if (!R.devs) {
            free(pairs);
            return mr_fail(err, MR_REMOTE, "out of memory opening OpenCL");
        }
        for (int i = 0; i < n; ++i) {
            cl_dev* d = &R.devs[i];
            d->id = pairs[i];
            char name[MR_CL_TEXT];
            info_text(CL.GetDeviceInfo, d->id.device, CL_DEVICE_NAME, name, sizeof(name));
            snprintf(d->label, sizeof(d->label), "cl(%d) (%s)", i, name);
            d->max_work_group = info_uint(d->id.device, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof(size_t));
        }
        free(pairs);
        for (int i = 0; i < n; ++i) { /* one context and one in-order queue (with profiling) per device */
            cl_dev* d = &R.devs[i];
            cl_int e = CL_SUCCESS;
            char code[64];
            const char* what = "clCreateContext";
            d->context = CL.CreateContext(NULL, 1, &d->id.device, NULL, NULL, &e);
            if (e == CL_SUCCESS && d->context) {
                what = "clCreateCommandQueue";
                d->queue = CL.CreateCommandQueue(d->context, d->id.device, CL_QUEUE_PROFILING_ENABLE, &e);
            }
            if (e != CL_SUCCESS || !d->context || !d->queue) { /* nothing kept: the next request tries again */
                mr_fail(err, MR_REMOTE, "%s for %s failed: %s", what, d->label,
                        mr_cl_error_name(e != CL_SUCCESS ? e : -6, code, sizeof(code)));
                for (int j = 0; j <= i; ++j) {
                    if (R.devs[j].queue) CL.ReleaseCommandQueue(R.devs[j].queue);
                    if (R.devs[j].context) CL.ReleaseContext(R.devs[j].context);
                }
                free(R.devs);
                R.devs = NULL;
                return -1;
            }
        }
        R.n = n;
        R.threads_lost = wb_guard_threads_lost();
        snprintf(R.last_kernel, sizeof(R.last_kernel), "a kernel");
        R.opened = 1;
    }
    if (R.broken[0])
        return mr_fail(err, MR_KERNEL_CRASHED,
                       "the OpenCL device of this session cannot be used any more: %s; the session's CPU tensors and "
                       "modules are intact: open a new session for OpenCL", R.broken);
    return 0;
}

int mr_cl_check_device(int device_id, mr_error* err) {
    if (device_id >= 0 && device_id < R.n) return 0;
    char have[512] = "";
    size_t used = 0;
    for (int i = 0; i < R.n && used < sizeof(have); ++i)
        used += (size_t)snprintf(have + used, sizeof(have) - used, "%scl(%d)", i ? ", " : "", i);
    return mr_fail(err, MR_NO_DEVICE, "this server has no cl(%d); its OpenCL devices: %s", device_id,
                   R.n ? have : "none");
}

static int any_gate(void) {
    for (int i = 0; i < R.n; ++i)
        if (R.devs[i].gate) return 1;
    return 0;
}

int mr_cl_settle(mr_error* err) {
    if (R.opened && !R.broken[0] && any_gate()) return mr_cl_finish(-1, err);
    return 0;
}

int mr_cl_alloc(int device_id, uint64_t nbytes, int zero, void** mem, mr_error* err) {
    if (mr_cl_ready(err) || mr_cl_check_device(device_id, err) || mr_cl_settle(err)) return -1;
    cl_dev* d = &R.devs[device_id];
    cl_int e = CL_SUCCESS;
    char code[64];
    cl_handle m = CL.CreateBuffer(d->context, CL_MEM_READ_WRITE, nbytes ? (size_t)nbytes : 1, NULL, &e);
    if (e != CL_SUCCESS || !m)
        return mr_fail(err, MR_REMOTE, "cannot allocate %llu bytes on %s: %s; free tensors or use a smaller one",
                       (unsigned long long)nbytes, d->label, mr_cl_error_name(e != CL_SUCCESS ? e : -4, code, sizeof(code)));
    if (zero && nbytes) {
        uint8_t pattern = 0;
        e = CL.EnqueueFillBuffer(d->queue, m, &pattern, 1, 0, (size_t)nbytes, 0, NULL, NULL);
        if (e != CL_SUCCESS) {
            CL.ReleaseMemObject(m);
            return mr_fail(err, MR_REMOTE, "clEnqueueFillBuffer on %s failed: %s", d->label,
                           mr_cl_error_name(e, code, sizeof(code)));
        }
        d->dirty = 1;
    }
    *mem = m;
    return 0;
}

void mr_cl_free(int device_id, void* mem) {
    mr_error err;
    if (!R.opened || R.broken[0] || device_id < 0 || device_id >= R.n) return; /* a stuck runtime: left to the exit */
    if (mr_cl_settle(&err)) return;
    CL.ReleaseMemObject(mem);
}

void* mr_cl_map(int device_id, void* mem, uint64_t nbytes, int for_write, mr_error* err) {
    cl_dev* d = &R.devs[device_id];
    cl_int e = CL_SUCCESS;
    void* p = CL.EnqueueMapBuffer(d->queue, mem, 1, for_write ? CL_MAP_WRITE_INVALIDATE_REGION : CL_MAP_READ, 0,
                                  (size_t)nbytes, 0, NULL, NULL, &e);
    if (e != CL_SUCCESS || !p) {
        char code[64];
        mr_fail(err, MR_REMOTE, "clEnqueueMapBuffer of %llu bytes on %s failed: %s", (unsigned long long)nbytes,
                d->label, mr_cl_error_name(e, code, sizeof(code)));
        return NULL;
    }
    return p;
}

void mr_cl_unmap(int device_id, void* mem, void* ptr) {
    if (!R.opened || device_id < 0 || device_id >= R.n) return;
    cl_dev* d = &R.devs[device_id];
    CL.EnqueueUnmapMemObject(d->queue, mem, ptr, 0, NULL, NULL);
    d->dirty = 1;
}

int mr_cl_launch(int device_id, void* kernel, const char* name, uint32_t dims, const size_t* global_size,
                 const size_t* local_size, mr_error* err) {
    if (mr_cl_ready(err) || mr_cl_check_device(device_id, err)) return -1;
    cl_dev* d = &R.devs[device_id];
    char code[64];
    cl_int e = CL_SUCCESS;
    if (!d->gate) {
        d->gate = CL.CreateUserEvent(d->context, &e);
        if (e != CL_SUCCESS || !d->gate) {
            d->gate = NULL;
            return mr_fail(err, MR_REMOTE, "clCreateUserEvent on %s failed: %s", d->label,
                           mr_cl_error_name(e, code, sizeof(code)));
        }
    }
    if (R.timing && R.n_events == R.cap_events) {
        size_t cap = R.cap_events ? R.cap_events * 2 : 64;
        cl_handle* grown = (cl_handle*)realloc(R.events, cap * sizeof(cl_handle));
        if (!grown) return mr_fail(err, MR_REMOTE, "out of memory for the timer's events");
        R.events = grown;
        R.cap_events = cap;
    }
    cl_handle event = NULL;
    e = CL.EnqueueNDRangeKernel(d->queue, kernel, dims, NULL, global_size, local_size, 1, &d->gate,
                                R.timing ? &event : NULL);
    if (e != CL_SUCCESS) {
        char sizes[400];
        size_t used = (size_t)snprintf(sizes, sizeof(sizes), "global size [");
        for (uint32_t i = 0; i < dims && used < sizeof(sizes); ++i)
            used += (size_t)snprintf(sizes + used, sizeof(sizes) - used, "%s%zu", i ? ", " : "", global_size[i]);
        if (used < sizeof(sizes)) used += (size_t)snprintf(sizes + used, sizeof(sizes) - used, "]");
        if (local_size) {
            if (used < sizeof(sizes)) used += (size_t)snprintf(sizes + used, sizeof(sizes) - used, ", local size [");
            for (uint32_t i = 0; i < dims && used < sizeof(sizes); ++i)
                used += (size_t)snprintf(sizes + used, sizeof(sizes) - used, "%s%zu", i ? ", " : "", local_size[i]);
            if (used < sizeof(sizes)) snprintf(sizes + used, sizeof(sizes) - used, "]");
        }
        char hint[300] = "";
        if (e == CL_INVALID_WORK_GROUP_SIZE && local_size)
            snprintf(hint, sizeof(hint),
                     "; each global size must be a multiple of the local size, and the local sizes' product at most "
                     "the device's work-group size (%llu)", (unsigned long long)d->max_work_group);
        return mr_fail(err, MR_REMOTE, "%s: launching on %s with %s failed: %s%s", name, d->label, sizes,
                       mr_cl_error_name(e, code, sizeof(code)), hint);
    }
    d->dirty = 1;
    snprintf(R.last_kernel, sizeof(R.last_kernel), "%s", name);
    if (R.timing && event) R.events[R.n_events++] = event;
    return 0;
}

/* The error of a wait that a crash (or a cancel) ended; the runtime is not used again. */
static int lost(cl_dev* d, int code, mr_error* err) {
    const char* text = wb_last_error();
    static const char* prefixes[] = {"KernelCrashed: ", "Cancelled: ", "Interrupted: "};
    for (int i = 0; i < 3; ++i)
        if (!strncmp(text, prefixes[i], strlen(prefixes[i]))) text += strlen(prefixes[i]);
    char what[1024];
    snprintf(what, sizeof(what), "%s (an OpenCL kernel on %s)", R.last_kernel, d->label);
    snprintf(R.broken, sizeof(R.broken), "%s left it unusable (%s)", what, text);
    mr_fail(err, code == WB_CANCELLED ? MR_CANCELLED : MR_KERNEL_CRASHED,
            "%s: %s; the session, its CPU tensors and its modules are intact, but its OpenCL runtime cannot be "
            "trusted again: fix the kernel and open a new session for OpenCL", what, text);
    wb_clear_error();
    return -1;
}

int mr_cl_finish(int device_id, mr_error* err) {
    if (!R.opened || R.broken[0]) return 0;
    void* finish;
    void* release;
    memcpy(&finish, &CL.Finish, sizeof(finish));
    memcpy(&release, &CL.SetUserEventStatus, sizeof(release));
    for (int i = 0; i < R.n; ++i) {
        cl_dev* d = &R.devs[i];
        if (device_id >= 0 ? i != device_id : !d->dirty) continue;
        d->dirty = 0;
        cl_handle gate = d->gate;
        d->gate = NULL;
        int code;
        if (wb_guard_threads_lost() != R.threads_lost) { /* its queue would never finish: do not wait for it */
            wb_raise("KernelCrashed", "the kernel's own thread died while it was being launched");
            code = WB_CRASHED;
        } else { /* the gate opens and the queue drains inside one guarded call: the kernels run only there */
            code = wb_guarded_wait(finish, d->queue, gate ? release : NULL, gate);
        }
        if (gate) CL.ReleaseEvent(gate);
        if (code == WB_CRASHED || code == WB_CANCELLED) return lost(d, code, err);
        if (code != CL_SUCCESS) {
            char name[64];
            return mr_fail(err, MR_REMOTE, "clFinish on %s failed: %s", d->label, mr_cl_error_name(code, name, sizeof(name)));
        }
    }
    return 0;
}

void mr_cl_timer_begin(void) {
    R.timing = 1;
    R.n_events = 0;
}

int mr_cl_timer_end(int64_t* ns, mr_error* err) {
    int rc = 0;
    uint64_t total = 0;
    for (size_t i = 0; i < R.n_events; ++i) {
        cl_ulong start = 0, end = 0;
        cl_int e = CL.GetEventProfilingInfo(R.events[i], CL_PROFILING_COMMAND_START, 8, &start, NULL);
        if (e == CL_SUCCESS) e = CL.GetEventProfilingInfo(R.events[i], CL_PROFILING_COMMAND_END, 8, &end, NULL);
        if (e != CL_SUCCESS && rc == 0) {
            char code[64];
            rc = mr_fail(err, MR_REMOTE, "clGetEventProfilingInfo on %s failed: %s", mr_cl_describe(R.current),
                         mr_cl_error_name(e, code, sizeof(code)));
        }
        if (end > start) total += end - start;
        CL.ReleaseEvent(R.events[i]);
    }
    R.n_events = 0;
    R.timing = 0;
    *ns = (int64_t)total;
    return rc;
}

int mr_cl_set_arg(void* kernel, uint32_t index, size_t size, const void* value) {
    return CL.SetKernelArg(kernel, index, size, value);
}

void* mr_cl_build(int device_id, const char* source, size_t len, const char* name, const char* options,
                  mr_error* err) {
    if (mr_cl_ready(err) || mr_cl_check_device(device_id, err)) return NULL;
    cl_dev* d = &R.devs[device_id];
    cl_int e = CL_SUCCESS;
    char code[64];
    cl_handle program = CL.CreateProgramWithSource(d->context, 1, &source, &len, &e);
    if (e != CL_SUCCESS || !program) {
        mr_fail(err, MR_REMOTE, "clCreateProgramWithSource of %s failed: %s", name, mr_cl_error_name(e, code, sizeof(code)));
        return NULL;
    }
    e = CL.BuildProgram(program, 1, &d->id.device, options ? options : "", NULL, NULL);
    if (e != CL_SUCCESS) {
        size_t size = 0;
        char* log = NULL;
        if (CL.GetProgramBuildInfo(program, d->id.device, CL_PROGRAM_BUILD_LOG, 0, NULL, &size) == CL_SUCCESS && size &&
            (log = (char*)calloc(1, size + 1)) != NULL &&
            CL.GetProgramBuildInfo(program, d->id.device, CL_PROGRAM_BUILD_LOG, size, log, NULL) != CL_SUCCESS)
            log[0] = '\0';
        const char* s = log ? log : "";
        while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') s++;
        size_t n = strlen(s);
        while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == '\0')) n--;
        mr_fail(err, MR_REMOTE, "OpenCL build failed: %s for %s: %s\n%.*s", name, d->label,
                mr_cl_error_name(e, code, sizeof(code)), (int)n, s);
        free(log);
        CL.ReleaseProgram(program);
        return NULL;
    }
    return program;
}

void mr_cl_release_program(void* program) {
    if (program && R.opened && !R.broken[0]) CL.ReleaseProgram(program);
}

void mr_cl_release_kernel(void* kernel) {
    if (kernel && R.opened && !R.broken[0]) CL.ReleaseKernel(kernel);
}

void* mr_cl_create_kernel(void* program, const char* name, mr_error* err) {
    cl_int e = CL_SUCCESS;
    cl_handle k = CL.CreateKernel(program, name, &e);
    if (e != CL_SUCCESS || !k) {
        char code[64], shown[300];
        mr_fail(err, MR_REMOTE, "clCreateKernel(%s) failed: %s", py_repr_str(name, strlen(name), shown, sizeof(shown)),
                mr_cl_error_name(e, code, sizeof(code)));
        return NULL;
    }
    return k;
}

int mr_cl_kernel_names(void* program, mr_strlist* out, mr_error* err) {
    char* text = NULL;
    size_t size = 0;
    memset(out, 0, sizeof(*out));
    if (CL.GetProgramInfo(program, CL_PROGRAM_KERNEL_NAMES, 0, NULL, &size) == CL_SUCCESS && size) {
        text = (char*)calloc(1, size + 1);
        if (!text) return mr_fail(err, MR_REMOTE, "out of memory");
        if (CL.GetProgramInfo(program, CL_PROGRAM_KERNEL_NAMES, size, text, NULL) != CL_SUCCESS) text[0] = '\0';
    }
    int cap = 1;
    for (const char* p = text ? text : ""; *p; ++p) cap += *p == ';';
    out->items = (char**)calloc((size_t)cap, sizeof(char*));
    if (!out->items) {
        free(text);
        return mr_fail(err, MR_REMOTE, "out of memory");
    }
    char* save = NULL;
    for (char* tok = text ? strtok_r(text, ";", &save) : NULL; tok; tok = strtok_r(NULL, ";", &save)) {
        while (*tok == ' ') tok++;
        size_t n = strlen(tok);
        while (n && (tok[n - 1] == ' ' || tok[n - 1] == '\n')) tok[--n] = '\0';
        if (n && out->count < cap && (out->items[out->count] = strdup(tok)) != NULL) out->count++;
    }
    free(text);
    mr_strlist_sort_unique(out);
    return 0;
}

uint32_t mr_cl_kernel_num_args(void* kernel) {
    cl_uint n = 0;
    if (CL.GetKernelInfo(kernel, CL_KERNEL_NUM_ARGS, sizeof(n), &n, NULL) != CL_SUCCESS) return 0;
    return n;
}

uint32_t mr_cl_kernel_arg_space(void* kernel, uint32_t index) {
    cl_uint space = 0;
    if (CL.GetKernelArgInfo(kernel, index, CL_KERNEL_ARG_ADDRESS_QUALIFIER, sizeof(space), &space, NULL) != CL_SUCCESS)
        return 0;
    return space;
}

void mr_cl_kernel_arg_text(void* kernel, uint32_t index, int name, char* out, size_t cap) {
    size_t size = 0;
    cl_uint param = name ? CL_KERNEL_ARG_NAME : CL_KERNEL_ARG_TYPE_NAME;
    out[0] = '\0';
    if (CL.GetKernelArgInfo(kernel, index, param, 0, NULL, &size) != CL_SUCCESS || !size) return;
    char* buf = (char*)calloc(1, size + 1);
    if (!buf) return;
    if (CL.GetKernelArgInfo(kernel, index, param, size, buf, NULL) == CL_SUCCESS) snprintf(out, cap, "%s", buf);
    free(buf);
    size_t n = strlen(out);
    while (n && (out[n - 1] == ' ' || out[n - 1] == '\n')) out[--n] = '\0';
}
