/*
 * The system library of a with_minrpc program: what a TVM module compiled as a system library (its
 * system_lib_prefix attribute set) needs when it is linked into the executable instead of loaded with dlopen.
 *
 * Its start-up code registers every kernel ("__tvm_ffi_<name>") and its library context slot
 * ("__tvm_ffi__library_ctx") through TVMFFIEnvModRegisterSystemLibSymbol; its kernels may be local symbols,
 * so SYSTEM_LIB looks them up here before dlsym. It calls the TVM backend functions directly rather than
 * through context slots: they are defined here, over kernel_runtime's thread pool and workspaces. They live
 * in minrpc only, never in the Python server's shim, which shares a process with the real TVM runtime.
 */
#include <stdlib.h>
#include <string.h>

#include "kernel_runtime.h"
#include "minrpc/minrpc.h"

#define SYSLIB_KERNEL_PREFIX "__tvm_ffi_"

typedef struct {
    char* name;
    void* symbol;
} syslib_entry;

static syslib_entry* entries;
static int n_entries;
static int completed;

/* Called from the start-up code of system-library objects, before main. Returns 0, or -1 when out of memory. */
int TVMFFIEnvModRegisterSystemLibSymbol(const char* name, void* symbol) {
    if (!name || !symbol) return -1;
    syslib_entry* grown = (syslib_entry*)realloc(entries, sizeof(syslib_entry) * (size_t)(n_entries + 1));
    if (!grown) return -1;
    entries = grown;
    entries[n_entries].name = strdup(name);
    if (!entries[n_entries].name) return -1;
    entries[n_entries++].symbol = symbol;
    return 0;
}

int TVMBackendParallelLaunch(WBParallelLambda flambda, void* cdata, int num_task) {
    return wb_parallel_launch(flambda, cdata, num_task);
}

int TVMBackendParallelBarrier(int task_id, WBParallelGroupEnv* env) { return wb_parallel_barrier(task_id, env); }

void* TVMBackendAllocWorkspace(int device_type, int device_id, uint64_t nbytes, int dtype_code_hint,
                               int dtype_bits_hint) {
    return wb_alloc_workspace(device_type, device_id, nbytes, dtype_code_hint, dtype_bits_hint);
}

int TVMBackendFreeWorkspace(int device_type, int device_id, void* ptr) {
    return wb_free_workspace(device_type, device_id, ptr);
}

void* mr_syslib_lookup(const char* symbol) {
    for (int i = n_entries - 1; i >= 0; --i)  /* the last registration of a name wins */
        if (strcmp(entries[i].name, symbol) == 0) return entries[i].symbol;
    return NULL;
}

int mr_syslib_complete(mr_strlist* kernels, mr_error* err) {
    size_t plen = strlen(SYSLIB_KERNEL_PREFIX);
    for (int i = 0; i < n_entries; ++i) {
        const char* name = entries[i].name;
        if (strncmp(name, SYSLIB_KERNEL_PREFIX, plen) == 0 && name[plen] != '_' && name[plen] != '\0') {
            char** grown = (char**)realloc(kernels->items, sizeof(char*) * (size_t)(kernels->count + 1));
            if (!grown) return mr_fail(err, MR_REMOTE, "out of memory");
            kernels->items = grown;
            if (!(kernels->items[kernels->count] = strdup(name + plen))) return mr_fail(err, MR_REMOTE, "out of memory");
            kernels->count++;
        } else if (!completed && (strncmp(name, "__TVM", 5) == 0 || strcmp(name, "__tvm_ffi__library_ctx") == 0)) {
            if (mr_fill_slot(entries[i].symbol, name, "<system lib>", err)) return -1;
        }
    }
    completed = 1;
    mr_strlist_sort_unique(kernels);
    return 0;
}
