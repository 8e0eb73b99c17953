/*
 * opencl_module.c: OpenCL kernel modules (docs/protocol.md section 14), as workbench/runtime/opencl_module.py
 * serves them, with its error texts:
 *
 *   .cl files     hand-written OpenCL C, built for every device (-cl-kernel-arg-info); a kernel is called with its
 *                 own arguments (checked by address qualifier and type name), then 1, 2, 4 or 6 launch ints;
 *   TVM modules   a host library exported by apache-tvm for target opencl: its __tvm_ffi__library_bin imports one
 *                 "opencl" module (the kernels' source and function infos); the library's lookup and call context
 *                 slots are pointed here, so its host code launches the kernels without TVM.
 */
#include "opencl.h"
#include "core.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kernel_runtime.h"

int mr_cl_no_device_error(const char* name, mr_error* err) {
    return mr_fail(err, MR_UNSUPPORTED,
                   "cannot load %s: its kernels run on an OpenCL device, and this server has none; install an OpenCL "
                   "platform on the device (a CPU one: %s) and restart the server", name, MR_CL_INSTALL_HINT);
}

/* The runtime, with at least one device: 0, or -1 with err (UNSUPPORTED naming `name` when there is none). */
/* The low `size` (1, 2, 4 or 8) bytes of `u`, in the device's (this host's) byte order. */
static void low_bytes(uint8_t* out, uint64_t u, int size) {
    if (size == 1) {
        uint8_t t = (uint8_t)u;
        memcpy(out, &t, 1);
    } else if (size == 2) {
        uint16_t t = (uint16_t)u;
        memcpy(out, &t, 2);
    } else if (size == 4) {
        uint32_t t = (uint32_t)u;
        memcpy(out, &t, 4);
    } else {
        memcpy(out, &u, 8);
    }
}

static int runtime_with_devices(const char* name, mr_error* err) {
    if (mr_cl_count() == 0) return mr_cl_no_device_error(name, err);
    if (mr_cl_ready(err)) {
        if (err->code == MR_NO_DEVICE) return mr_cl_no_device_error(name, err);
        return -1;
    }
    if (mr_cl_devices() == 0) return mr_cl_no_device_error(name, err);
    return 0;
}

/* ---- hand-written OpenCL C ------------------------------------------------------------------------------------ */
typedef struct {
    uint32_t space;
    char type_name[128], name[128];
} cl_arg;

struct mr_cl_kernel {
    mr_cl_module* module;
    char* name;
    void** per_device; /* cl_kernel per device, made on first use */
    uint32_t nargs;
    cl_arg* args;
    char signature[1024];
};

struct mr_cl_module {
    char* name;
    int n_devices;
    void** programs;
    mr_strlist names;
    mr_cl_kernel** kernels; /* by index of names, made on first use */
    int refs;               /* the module object, and each function handed out of it */
};

const mr_strlist* mr_cl_module_names(const mr_cl_module* m) { return &m->names; }
const char* mr_cl_kernel_name(const mr_cl_kernel* k) { return k->name; }

/* Python's UnicodeDecodeError text for the first byte that is not UTF-8, or NULL when it is all UTF-8. */
static const char* utf8_error(const unsigned char* s, size_t n, char* out, size_t cap) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len = c < 0x80 ? 1 : (c >= 0xC2 && c <= 0xDF) ? 2 : (c >= 0xE0 && c <= 0xEF) ? 3 : (c >= 0xF0 && c <= 0xF4) ? 4 : 0;
        if (!len) {
            snprintf(out, cap, "'utf-8' codec can't decode byte 0x%02x in position %zu: invalid start byte", c, i);
            return out;
        }
        for (size_t k = 1; k < len; ++k) {
            if (i + k >= n) {
                snprintf(out, cap, "'utf-8' codec can't decode byte 0x%02x in position %zu: unexpected end of data", c, i);
                return out;
            }
            unsigned cc = s[i + k];
            unsigned lo = 0x80, hi = 0xBF;
            if (k == 1 && c == 0xE0) lo = 0xA0;
            if (k == 1 && c == 0xED) hi = 0x9F;
            if (k == 1 && c == 0xF0) lo = 0x90;
            if (k == 1 && c == 0xF4) hi = 0x8F;
            if (cc < lo || cc > hi) {
                snprintf(out, cap, "'utf-8' codec can't decode byte 0x%02x in position %zu: invalid continuation byte",
                         c, i);
                return out;
            }
        }
        i += len;
    }
    return NULL;
}

static void module_free(mr_cl_module* m) {
    if (!m) return;
    for (int i = 0; m->programs && i < m->n_devices; ++i) mr_cl_release_program(m->programs[i]);
    for (int i = 0; m->kernels && i < m->names.count; ++i) {
        mr_cl_kernel* k = m->kernels[i];
        if (!k) continue;
        free(k->name);
        free(k->args);
        for (int d = 0; k->per_device && d < m->n_devices; ++d) mr_cl_release_kernel(k->per_device[d]);
        free(k->per_device);
        free(k);
    }
    free(m->kernels);
    free(m->programs);
    mr_strlist_free(&m->names);
    free(m->name);
    free(m);
}

mr_cl_module* mr_cl_load_source(const char* path, const char* name, mr_error* err) {
    FILE* f = fopen(path, "rb");
    if (!f) {
        mr_fail(err, errno == ENOENT ? MR_NOT_FOUND : MR_REMOTE, "cannot read %s: %s", name, strerror(errno));
        return NULL;
    }
    struct stat st;
    char* source = NULL;
    size_t len = 0;
    if (fstat(fileno(f), &st) == 0 && (source = (char*)malloc((size_t)st.st_size + 1)) != NULL)
        len = fread(source, 1, (size_t)st.st_size, f);
    fclose(f);
    if (!source) {
        mr_fail(err, MR_REMOTE, "out of memory reading %s", name);
        return NULL;
    }
    source[len] = '\0';
    char why[200];
    if (utf8_error((const unsigned char*)source, len, why, sizeof(why))) {
        free(source);
        mr_fail(err, MR_BAD_REQUEST, "%s is not UTF-8 text (%s); an OpenCL module is OpenCL C source", name, why);
        return NULL;
    }
    if (memchr(source, '\0', len)) {
        free(source);
        mr_fail(err, MR_BAD_REQUEST, "%s holds a NUL byte; an OpenCL module is OpenCL C source", name);
        return NULL;
    }
    if (runtime_with_devices(name, err)) {
        free(source);
        return NULL;
    }
    mr_cl_module* m = (mr_cl_module*)calloc(1, sizeof(mr_cl_module));
    int n = mr_cl_devices();
    if (!m || !(m->name = strdup(name)) || !(m->programs = (void**)calloc((size_t)n, sizeof(void*)))) {
        module_free(m);
        free(source);
        mr_fail(err, MR_REMOTE, "out of memory loading %s", name);
        return NULL;
    }
    m->n_devices = n;
    for (int i = 0; i < n; ++i) {
        m->programs[i] = mr_cl_build(i, source, len, name, "-cl-kernel-arg-info", err);
        if (!m->programs[i]) {
            free(source);
            module_free(m);
            return NULL;
        }
    }
    free(source);
    m->refs = 1;
    if (mr_cl_kernel_names(m->programs[0], &m->names, err) ||
        !(m->kernels = (mr_cl_kernel**)calloc(m->names.count ? (size_t)m->names.count : 1, sizeof(mr_cl_kernel*)))) {
        if (err->code == 0) mr_fail(err, MR_REMOTE, "out of memory loading %s", name);
        module_free(m);
        return NULL;
    }
    return m;
}

void mr_cl_module_retain(mr_cl_module* m) { m->refs++; }

void mr_cl_module_release(mr_cl_module* m) {
    if (m && --m->refs <= 0) module_free(m);
}

mr_cl_module* mr_cl_kernel_module(mr_cl_kernel* k) { return k->module; }

static void* kernel_on(mr_cl_kernel* k, int device_id, mr_error* err) {
    if (!k->per_device[device_id]) k->per_device[device_id] = mr_cl_create_kernel(k->module->programs[device_id], k->name, err);
    return k->per_device[device_id];
}

mr_cl_kernel* mr_cl_get_kernel(mr_cl_module* m, const char* name, mr_error* err) {
    int index = -1;
    for (int i = 0; i < m->names.count; ++i)
        if (!strcmp(m->names.items[i], name)) index = i;
    if (index < 0) {
        char listing[2048] = "", shown[300];
        size_t used = 0;
        for (int i = 0; i < m->names.count && used < sizeof(listing); ++i)
            used += (size_t)snprintf(listing + used, sizeof(listing) - used, "%s%s", i ? ", " : "", m->names.items[i]);
        mr_fail(err, MR_NOT_FOUND, "no kernel named %s in %s (it has: %s)", py_repr_str(name, strlen(name), shown, sizeof(shown)),
                m->name, m->names.count ? listing : "none found");
        return NULL;
    }
    if (m->kernels[index]) return m->kernels[index];
    if (mr_cl_ready(err)) return NULL;
    mr_cl_kernel* k = (mr_cl_kernel*)calloc(1, sizeof(mr_cl_kernel));
    if (!k || !(k->name = strdup(name)) || !(k->per_device = (void**)calloc((size_t)m->n_devices, sizeof(void*)))) {
        if (k) free(k->name);
        free(k);
        mr_fail(err, MR_REMOTE, "out of memory");
        return NULL;
    }
    k->module = m;
    void* first = kernel_on(k, 0, err);
    if (!first) {
        free(k->per_device);
        free(k->name);
        free(k);
        return NULL;
    }
    k->nargs = mr_cl_kernel_num_args(first);
    k->args = (cl_arg*)calloc(k->nargs ? k->nargs : 1, sizeof(cl_arg));
    if (!k->args) {
        free(k->per_device);
        free(k->name);
        free(k);
        mr_fail(err, MR_REMOTE, "out of memory");
        return NULL;
    }
    size_t used = (size_t)snprintf(k->signature, sizeof(k->signature), "%s(", name);
    for (uint32_t i = 0; i < k->nargs; ++i) {
        cl_arg* a = &k->args[i];
        a->space = mr_cl_kernel_arg_space(first, i);
        mr_cl_kernel_arg_text(first, i, 0, a->type_name, sizeof(a->type_name));
        mr_cl_kernel_arg_text(first, i, 1, a->name, sizeof(a->name));
        if (!a->name[0]) snprintf(a->name, sizeof(a->name), "arg%u", i);
        if (used < sizeof(k->signature))
            used += (size_t)snprintf(k->signature + used, sizeof(k->signature) - used, "%s%s %s", i ? ", " : "",
                                     a->type_name, a->name);
    }
    if (used < sizeof(k->signature)) snprintf(k->signature + used, sizeof(k->signature) - used, ")");
    m->kernels[index] = k;
    return k;
}

/* The scalars a kernel takes, by type name. */
static const struct {
    const char* name;
    int size, is_signed, floating;
} SCALARS[] = {
    {"char", 1, 1, 0}, {"uchar", 1, 0, 0}, {"short", 2, 1, 0}, {"ushort", 2, 0, 0}, {"int", 4, 1, 0},
    {"uint", 4, 0, 0}, {"long", 8, 1, 0}, {"ulong", 8, 0, 0}, {"float", 4, 1, 1}, {"double", 8, 1, 1},
    {"unsigned char", 1, 0, 0}, {"unsigned short", 2, 0, 0}, {"unsigned int", 4, 0, 0}, {"unsigned long", 8, 0, 0},
};
#define SCALAR_NAMES                                                                                                  \
    "char, double, float, int, long, short, uchar, uint, ulong, unsigned char, unsigned int, unsigned long, unsigned " \
    "short, ushort"

/* The launch sizes: 0 and dims/global/local (local NULL: the runtime's choice), or -1 with err. */
static int launch_sizes(const char* name, const mr_cl_value* launch, uint32_t count, uint32_t* dims, size_t* global,
                        size_t* local, int* has_local, mr_error* err) {
    int all_int = 1;
    for (uint32_t i = 0; i < count; ++i)
        all_int &= !launch[i].is_tensor && (launch[i].node->type == MP_INT || launch[i].node->type == MP_UINT);
    if (!all_int) {
        char list[400] = "[", shown[128];
        size_t used = 1;
        for (uint32_t i = 0; i < count && used < sizeof(list); ++i) {
            if (launch[i].is_tensor) snprintf(shown, sizeof(shown), "<tensor>");
            else mp_repr(launch[i].node, shown, sizeof(shown), 100);
            used += (size_t)snprintf(list + used, sizeof(list) - used, "%s%s", i ? ", " : "", shown);
        }
        if (used < sizeof(list)) snprintf(list + used, sizeof(list) - used, "]");
        list[80] = '\0';
        return mr_fail(err, MR_REMOTE, "%s: the launch sizes are ints, got %s", name, list);
    }
    int64_t v[6];
    for (uint32_t i = 0; i < count; ++i)
        v[i] = launch[i].node->type == MP_UINT ? INT64_MAX : launch[i].node->v.i;
    uint32_t d = count == 1 ? 1 : count / 2;
    *dims = d;
    *has_local = 0;
    if (count > 1) {
        int nonzero = 0;
        for (uint32_t i = 0; i < d; ++i) nonzero += v[d + i] != 0;
        if (nonzero && nonzero != (int)d) {
            char list[200] = "[";
            size_t used = 1;
            for (uint32_t i = 0; i < d; ++i)
                used += (size_t)snprintf(list + used, sizeof(list) - used, "%s%lld", i ? ", " : "", (long long)v[d + i]);
            snprintf(list + used, sizeof(list) - used, "]");
            return mr_fail(err, MR_REMOTE, "%s: local sizes are all given or all 0 (the runtime picks), not %s", name, list);
        }
        *has_local = nonzero != 0;
    }
    int ok = 1;
    for (uint32_t i = 0; i < d; ++i) ok &= v[i] > 0 && v[i] < INT64_MAX;
    for (uint32_t i = 0; *has_local && i < d; ++i) ok &= v[d + i] > 0 && v[d + i] < INT64_MAX;
    if (!ok) {
        char text[400];
        size_t used = (size_t)snprintf(text, sizeof(text), "%s: launch sizes must be > 0, got global [", name);
        for (uint32_t i = 0; i < d; ++i)
            used += (size_t)snprintf(text + used, sizeof(text) - used, "%s%lld", i ? ", " : "", (long long)v[i]);
        used += (size_t)snprintf(text + used, sizeof(text) - used, "]");
        if (*has_local) {
            used += (size_t)snprintf(text + used, sizeof(text) - used, ", local [");
            for (uint32_t i = 0; i < d; ++i)
                used += (size_t)snprintf(text + used, sizeof(text) - used, "%s%lld", i ? ", " : "", (long long)v[d + i]);
            snprintf(text + used, sizeof(text) - used, "]");
        }
        return mr_fail(err, MR_REMOTE, "%s", text);
    }
    for (uint32_t i = 0; i < d; ++i) {
        global[i] = (size_t)v[i];
        local[i] = *has_local ? (size_t)v[d + i] : 0;
    }
    return 0;
}

/* Set argument i from value: the OpenCL code of clSetKernelArg, or -1 with err (a value the kernel cannot take). */
static int set_argument(const mr_cl_kernel* k, void* kernel, uint32_t i, const mr_cl_value* value, int* cl_code,
                        mr_error* err) {
    const cl_arg* a = &k->args[i];
    char where[600];
    snprintf(where, sizeof(where), "%s: argument %u (%s %s)", k->name, i, a->type_name, a->name);
    const mp_node* n = value->node;
    if (a->space == MR_CL_ARG_GLOBAL || a->space == MR_CL_ARG_CONSTANT) {
        if (!value->is_tensor && n->type == MP_NIL) {
            *cl_code = mr_cl_set_arg(kernel, i, sizeof(void*), NULL);
            return 0;
        }
        if (!value->is_tensor)
            return mr_fail(err, MR_REMOTE, "%s: expected a tensor on an OpenCL device, got %s; allocate it with "
                                           "runtime.empty(shape, dtype, remote.cl(0))", where, mp_type_name(n));
        if (value->device_type != MR_CL_DEVICE_TYPE)
            return mr_fail(err, MR_REMOTE, "%s: expected a tensor on an OpenCL device, got a tensor on another device; "
                                           "copy it to remote.cl(0)", where);
        void* mem = value->data;
        *cl_code = mr_cl_set_arg(kernel, i, sizeof(mem), &mem);
        return 0;
    }
    char shown[128];
    if (a->space == MR_CL_ARG_LOCAL) {
        if (value->is_tensor || n->type != MP_INT || n->v.i <= 0) {
            if (value->is_tensor) snprintf(shown, sizeof(shown), "<tensor>");
            else mp_repr(n, shown, sizeof(shown), 40);
            return mr_fail(err, MR_REMOTE, "%s: a __local buffer takes its size in bytes (an int > 0), not %s", where, shown);
        }
        *cl_code = mr_cl_set_arg(kernel, i, (size_t)n->v.i, NULL);
        return 0;
    }
    int s = -1;
    for (size_t j = 0; j < sizeof(SCALARS) / sizeof(SCALARS[0]); ++j)
        if (!strcmp(SCALARS[j].name, a->type_name)) s = (int)j;
    if (s < 0)
        return mr_fail(err, MR_REMOTE, "%s: arguments of type %s cannot be passed; kernels take buffers, __local sizes "
                                       "and the scalars " SCALAR_NAMES, where, a->type_name);
    if (value->is_tensor || !(n->type == MP_INT || n->type == MP_UINT || n->type == MP_FLOAT))
        return mr_fail(err, MR_REMOTE, "%s: expected a number, got %s", where,
                       value->is_tensor ? (value->device_type == MR_CL_DEVICE_TYPE ? "CLTensor" : "DeviceTensor")
                                        : mp_type_name(n));
    uint8_t bytes[8];
    int size = SCALARS[s].size;
    if (SCALARS[s].floating) {
        double x = n->type == MP_FLOAT ? n->v.f : n->type == MP_INT ? (double)n->v.i : (double)n->v.u;
        if (size == 4) {
            float f = (float)x;
            memcpy(bytes, &f, 4);
        } else {
            memcpy(bytes, &x, 8);
        }
    } else {
        if (n->type == MP_FLOAT)
            return mr_fail(err, MR_REMOTE, "%s: expected an int, got float %s", where, py_repr_float(n->v.f, shown, sizeof(shown)));
        int bits = size * 8;
        long double low = SCALARS[s].is_signed ? -(long double)((uint64_t)1 << (bits - 1)) : 0;
        long double high = SCALARS[s].is_signed ? (long double)(((uint64_t)1 << (bits - 1)) - 1)
                                                : (bits == 64 ? (long double)UINT64_MAX : (long double)(((uint64_t)1 << bits) - 1));
        long double x = n->type == MP_UINT ? (long double)n->v.u : (long double)n->v.i;
        if (x < low || x > high) {
            char lo[32], hi[32], val[32];
            if (SCALARS[s].is_signed) {
                snprintf(lo, sizeof(lo), "%lld", (long long)low);
                snprintf(hi, sizeof(hi), "%lld", (long long)high);
            } else {
                snprintf(lo, sizeof(lo), "0");
                snprintf(hi, sizeof(hi), "%llu", bits == 64 ? (unsigned long long)UINT64_MAX
                                                            : (unsigned long long)(((uint64_t)1 << bits) - 1));
            }
            if (n->type == MP_UINT) snprintf(val, sizeof(val), "%llu", (unsigned long long)n->v.u);
            else snprintf(val, sizeof(val), "%lld", (long long)n->v.i);
            return mr_fail(err, MR_REMOTE, "%s: %s does not fit a %s (%s..%s)", where, val, a->type_name, lo, hi);
        }
        uint64_t u = n->type == MP_UINT ? n->v.u : (uint64_t)n->v.i;
        low_bytes(bytes, u, size);
    }
    *cl_code = mr_cl_set_arg(kernel, i, (size_t)size, bytes);
    return 0;
}

int mr_cl_call(mr_cl_kernel* k, const mr_cl_value* values, uint32_t count, mr_error* err) {
    if (mr_cl_ready(err)) return -1;
    uint32_t n = k->nargs;
    uint32_t nlaunch = count >= n ? count - n : 0;
    if (count < n || !(nlaunch == 1 || nlaunch == 2 || nlaunch == 4 || nlaunch == 6))
        return mr_fail(err, MR_REMOTE,
                       "%s: takes its %u argument(s), %s, then the launch: one int (the global size), or 2, 4 or 6 "
                       "ints (1, 2 or 3 global sizes, then as many local sizes); got %u value(s)",
                       k->name, n, k->signature, count);
    uint32_t dims = 1;
    size_t global[3] = {1, 1, 1}, local[3] = {0, 0, 0};
    int has_local = 0;
    if (launch_sizes(k->name, values + n, nlaunch, &dims, global, local, &has_local, err)) return -1;
    /* the device of its tensors (all on one), else the current one */
    int device = -1, mixed = 0;
    uint8_t seen[64] = {0};
    for (uint32_t i = 0; i < n; ++i) {
        if (!values[i].is_tensor || values[i].device_type != MR_CL_DEVICE_TYPE) continue;
        if (values[i].device_id >= 0 && values[i].device_id < 64) seen[values[i].device_id] = 1;
        if (device >= 0 && device != values[i].device_id) mixed = 1;
        device = values[i].device_id;
    }
    if (mixed) {
        char list[400] = "";
        size_t used = 0;
        for (int i = 0; i < 64; ++i)
            if (seen[i]) used += (size_t)snprintf(list + used, sizeof(list) - used, "%scl(%d)", used ? ", " : "", i);
        return mr_fail(err, MR_REMOTE, "%s: its tensors are on different devices: %s", k->name, list);
    }
    if (device < 0) device = mr_cl_current();
    if (mr_cl_check_device(device, err)) return -1;
    void* kernel = kernel_on(k, device, err);
    if (!kernel) return -1;
    for (uint32_t i = 0; i < n; ++i) {
        int code = 0;
        if (set_argument(k, kernel, i, &values[i], &code, err)) return -1;
        if (code != 0) {
            char name[64];
            return mr_fail(err, MR_REMOTE, "%s: argument %u (%s %s): clSetKernelArg failed: %s", k->name, i,
                           k->args[i].type_name, k->args[i].name, mr_cl_error_name(code, name, sizeof(name)));
        }
    }
    return mr_cl_launch(device, kernel, k->name, dims, global, has_local ? local : NULL, err);
}

/* ---- TVM's "opencl" module ------------------------------------------------------------------------------------ */
#define LIBRARY_BIN "__tvm_ffi__library_bin"
#define LIBRARY_CTX "__tvm_ffi__library_ctx"
#define LOOKUP_SLOT "__TVMFFIEnvModLookupFromImports"
#define CALL_SLOT "__TVMFFIFunctionCall"
#define SET_DEVICE "__tvm_set_device"
#define HANDLE_MAGIC 0x57424f43u /* "WBOC" */
#define FUNCTION_DELIMITER "// Function: "

typedef struct tvm_module tvm_module;

typedef struct {
    uint32_t magic;
    tvm_module* module;
    int kernel; /* index into module->kernels, -1: __tvm_set_device */
} tvm_handle;

typedef struct {
    char* name;
    uint32_t nargs;
    uint8_t* codes; /* per argument: DLPack code, bits */
    uint8_t* bits;
    int index_map[8]; /* per launch value: 0..2 blockIdx, 3..5 threadIdx */
    int n_index, dyn, work_dim;
    char* source;
    size_t source_len;
    void** programs; /* per device */
    void** kernels;  /* per device */
    tvm_handle handle;
} tvm_kernel;

struct tvm_module {
    char* name;
    void* ctx; /* the library's __tvm_ffi__library_ctx */
    int n_devices;
    int n_kernels;
    tvm_kernel* kernels;
    tvm_handle set_device;
    tvm_module* next;
};

static tvm_module* tvm_modules;

typedef struct {
    const uint8_t* data;
    size_t len, pos;
    int bad;
} reader;

static uint64_t rd_u64(reader* r) {
    if (r->bad || r->len - r->pos < 8) {
        r->bad = 1;
        return 0;
    }
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | r->data[r->pos + (size_t)i];
    r->pos += 8;
    return v;
}

static const uint8_t* rd_raw(reader* r, uint64_t n) {
    if (r->bad || n > r->len - r->pos) {
        r->bad = 1;
        return NULL;
    }
    const uint8_t* p = r->data + r->pos;
    r->pos += (size_t)n;
    return p;
}

/* A u64-counted string, malloc'ed with a NUL; NULL (r->bad) when truncated. */
static char* rd_str(reader* r) {
    uint64_t n = rd_u64(r);
    const uint8_t* p = rd_raw(r, n);
    if (!p) return NULL;
    char* s = (char*)malloc((size_t)n + 1);
    if (!s) {
        r->bad = 1;
        return NULL;
    }
    memcpy(s, p, (size_t)n);
    s[n] = '\0';
    return s;
}

static uint64_t rd_count(reader* r, uint64_t item_bytes) {
    uint64_t n = rd_u64(r);
    if (!r->bad && item_bytes && n > (r->len - r->pos) / item_bytes) r->bad = 1;
    return r->bad ? 0 : n;
}

/* The "opencl" payload of a library_bin when it is the only module besides "_lib": 1 and *payload, 0 otherwise. */
static int opencl_payload(const uint8_t* blob, const uint8_t** payload, size_t* payload_len) {
    uint64_t total = 0;
    for (int i = 7; i >= 0; --i) total = (total << 8) | blob[i];
    if (total > ((uint64_t)1 << 34)) return 0;
    reader r = {blob, (size_t)total + 8, 8, 0};
    for (int k = 0; k < 2; ++k) rd_raw(&r, 8 * rd_count(&r, 8));
    int others = 0, found = 0;
    while (!r.bad && r.pos + 8 <= r.len) {
        uint64_t n = rd_u64(&r);
        const uint8_t* key = rd_raw(&r, n);
        if (!key) break;
        if (n == 4 && !memcmp(key, "_lib", 4)) continue;
        uint64_t size = rd_u64(&r);
        const uint8_t* p = rd_raw(&r, size);
        if (!p) break;
        if (n == 6 && !memcmp(key, "opencl", 6) && !found) {
            found = 1;
            *payload = p;
            *payload_len = (size_t)size;
        } else {
            others++;
        }
    }
    return found && !others;
}

static void tvm_module_free(tvm_module* m) {
    if (!m) return;
    for (int i = 0; m->kernels && i < m->n_kernels; ++i) {
        tvm_kernel* k = &m->kernels[i];
        free(k->name);
        free(k->codes);
        free(k->bits);
        free(k->source);
        for (int d = 0; k->programs && d < m->n_devices; ++d) mr_cl_release_program(k->programs[d]);
        free(k->programs);
        free(k->kernels);
    }
    free(m->kernels);
    free(m->name);
    free(m);
}

static int bad_payload(const char* name, const char* why, mr_error* err) {
    (void)name;
    return mr_fail(err, MR_BAD_REQUEST, "the library's OpenCL module cannot be read (%s): was it exported by apache-tvm "
                                        "0.27?", why);
}

/* Parse the payload into m (kernels with their infos and sources): 0, or -1 with err. */
static int parse_payload(tvm_module* m, const uint8_t* payload, size_t len, mr_error* err) {
    reader r = {payload, len, 0, 0};
    char* fmt = rd_str(&r);
    if (!fmt) return bad_payload(m->name, "truncated", err);
    if (strcmp(fmt, "cl") != 0) {
        char shown[200];
        mr_fail(err, MR_UNSUPPORTED, "cannot load %s: its OpenCL module holds %s binaries; this server builds OpenCL C "
                                     "source (fmt 'cl') only", m->name, py_repr_str(fmt, strlen(fmt), shown, sizeof(shown)));
        free(fmt);
        return -1;
    }
    free(fmt);
    uint64_t count = rd_count(&r, 8);
    if (r.bad) return bad_payload(m->name, "a count past the end of the data", err);
    m->kernels = (tvm_kernel*)calloc(count ? (size_t)count : 1, sizeof(tvm_kernel));
    if (!m->kernels) return mr_fail(err, MR_REMOTE, "out of memory");
    for (uint64_t i = 0; i < count; ++i) {
        tvm_kernel* k = &m->kernels[m->n_kernels++];
        k->name = rd_str(&r);
        char* info_name = rd_str(&r);
        free(info_name);
        uint64_t nt = rd_count(&r, 4);
        if (r.bad) return bad_payload(m->name, "truncated", err);
        k->nargs = (uint32_t)nt;
        k->codes = (uint8_t*)calloc(nt ? (size_t)nt : 1, 1);
        k->bits = (uint8_t*)calloc(nt ? (size_t)nt : 1, 1);
        if (!k->codes || !k->bits) return mr_fail(err, MR_REMOTE, "out of memory");
        for (uint64_t j = 0; j < nt; ++j) {
            const uint8_t* t = rd_raw(&r, 4);
            if (!t) return bad_payload(m->name, "truncated", err);
            unsigned lanes = (unsigned)t[2] | (unsigned)t[3] << 8;
            k->codes[j] = t[0];
            k->bits[j] = t[1];
            if (lanes != 1)
                return mr_fail(err, MR_UNSUPPORTED, "%s: argument %llu is a vector (%u lanes), which TVM's OpenCL "
                                                    "runtime does not pass either", k->name, (unsigned long long)j, lanes);
            int ok = t[0] == 3 || ((t[0] == 0 || t[0] == 1) && (t[1] == 8 || t[1] == 16 || t[1] == 32 || t[1] == 64)) ||
                     (t[0] == 2 && (t[1] == 32 || t[1] == 64));
            if (!ok)
                return mr_fail(err, MR_UNSUPPORTED, "%s: argument %llu has DLPack type code %u of %u bits, which this "
                                                    "server does not pass to OpenCL kernels", k->name,
                               (unsigned long long)j, t[0], t[1]);
        }
        uint64_t ntags = rd_count(&r, 8);
        for (uint64_t j = 0; j < ntags && !r.bad; ++j) {
            char* tag = rd_str(&r);
            if (!tag) break;
            if (!strcmp(tag, "tir.use_dyn_shared_memory")) {
                k->dyn = 1;
            } else if (!strncmp(tag, "tir.", 4)) {
                /* launch flags without a value */
            } else if (!strncmp(tag, "blockIdx.", 9) && strlen(tag) == 10 && strchr("xyz", tag[9]) && tag[9] &&
                       k->n_index < 6) {
                k->index_map[k->n_index++] = (int)(strchr("xyz", tag[9]) - "xyz");
            } else if (!strncmp(tag, "threadIdx.", 10) && strlen(tag) == 11 && strchr("xyz", tag[10]) && tag[10] &&
                       k->n_index < 6) {
                k->index_map[k->n_index++] = 3 + (int)(strchr("xyz", tag[10]) - "xyz");
            } else {
                char shown[200];
                mr_fail(err, MR_UNSUPPORTED, "%s of %s: launch parameter %s is not an OpenCL one", k->name, m->name,
                        py_repr_str(tag, strlen(tag), shown, sizeof(shown)));
                free(tag);
                return -1;
            }
            free(tag);
        }
        rd_raw(&r, 4 * rd_count(&r, 4)); /* arg_extra_tags: texture buffers, which OpenCL C here never has */
        if (r.bad || !k->name) return bad_payload(m->name, "truncated", err);
        k->work_dim = 1;
        for (int j = 0; j < k->n_index; ++j)
            if (k->index_map[j] % 3 + 1 > k->work_dim) k->work_dim = k->index_map[j] % 3 + 1;
    }
    uint64_t code_len = rd_u64(&r);
    const uint8_t* code = rd_raw(&r, code_len);
    if (!code) return bad_payload(m->name, "truncated", err);
    /* each kernel's source: the text after its "// Function: NAME" line, up to the next such line */
    size_t dl = strlen(FUNCTION_DELIMITER);
    const char* text = (const char*)code;
    size_t n = (size_t)code_len;
    size_t pos = 0;
    const char* first = NULL;
    for (; pos + dl <= n; ++pos)
        if (!memcmp(text + pos, FUNCTION_DELIMITER, dl)) {
            first = text + pos;
            break;
        }
    while (first) {
        const char* name_start = first + dl;
        const char* eol = memchr(name_start, '\n', (size_t)(text + n - name_start));
        const char* body = eol ? eol + 1 : text + n;
        const char* next = NULL;
        for (const char* p = body; p + dl <= text + n; ++p)
            if (!memcmp(p, FUNCTION_DELIMITER, dl)) {
                next = p;
                break;
            }
        const char* body_end = next ? next : text + n;
        size_t name_len = (size_t)((eol ? eol : text + n) - name_start);
        while (name_len && (name_start[0] == ' ' || name_start[0] == '\t')) name_start++, name_len--;
        while (name_len && (name_start[name_len - 1] == ' ' || name_start[name_len - 1] == '\r' ||
                            name_start[name_len - 1] == '\t'))
            name_len--;
        for (int i = 0; i < m->n_kernels; ++i) {
            tvm_kernel* k = &m->kernels[i];
            if (strlen(k->name) == name_len && !memcmp(k->name, name_start, name_len)) {
                free(k->source);
                k->source_len = (size_t)(body_end - body);
                k->source = (char*)malloc(k->source_len + 1);
                if (!k->source) return mr_fail(err, MR_REMOTE, "out of memory");
                memcpy(k->source, body, k->source_len);
                k->source[k->source_len] = '\0';
            }
        }
        first = next;
    }
    char missing[1024] = "";
    size_t used = 0;
    for (int i = 0; i < m->n_kernels; ++i)
        if (!m->kernels[i].source && used < sizeof(missing))
            used += (size_t)snprintf(missing + used, sizeof(missing) - used, "%s%s", used ? ", " : "", m->kernels[i].name);
    if (used) return mr_fail(err, MR_BAD_REQUEST, "cannot load %s: its OpenCL source has no section for %s", m->name, missing);
    for (int i = 0; i < m->n_kernels; ++i) {
        tvm_kernel* k = &m->kernels[i];
        k->programs = (void**)calloc((size_t)m->n_devices, sizeof(void*));
        k->kernels = (void**)calloc((size_t)m->n_devices, sizeof(void*));
        if (!k->programs || !k->kernels) return mr_fail(err, MR_REMOTE, "out of memory");
        k->handle = (tvm_handle){HANDLE_MAGIC, m, i};
    }
    m->set_device = (tvm_handle){HANDLE_MAGIC, m, -1};
    return 0;
}

static void* tvm_kernel_on(tvm_module* m, tvm_kernel* k, int device, mr_error* err) {
    if (k->kernels[device]) return k->kernels[device];
    if (!k->programs[device]) { /* built on first use, one program per kernel and device, as TVM does */
        char label[600];
        snprintf(label, sizeof(label), "%s of %s", k->name, m->name);
        k->programs[device] = mr_cl_build(device, k->source, k->source_len, label, "", err);
        if (!k->programs[device]) return NULL;
    }
    k->kernels[device] = mr_cl_create_kernel(k->programs[device], k->name, err);
    return k->kernels[device];
}

static int tvm_fail(const mr_error* err, const char* kind) {
    wb_raise(kind, err->msg);
    return -1;
}

static int tvm_set_device(tvm_module* m, const WBAny* args, int32_t nargs) {
    (void)m;
    static mr_error err;
    if (nargs >= 2 && args[0].v_int64 == MR_CL_DEVICE_TYPE) {
        int64_t id = args[1].v_int64;
        if (mr_cl_ready(&err) || mr_cl_check_device(id < 0 || id > 1 << 20 ? -1 : (int)id, &err))
            return tvm_fail(&err, "RuntimeError");
        mr_cl_set_current((int)args[1].v_int64);
    }
    return 0;
}

static int tvm_launch(tvm_module* m, tvm_kernel* k, const WBAny* args, int32_t nargs) {
    static mr_error err; /* 4 KiB: kept out of the kernel's stack */
    err.code = 0;
    int needs = (int)k->nargs + k->n_index + k->dyn;
    if (nargs < needs) {
        mr_fail(&err, MR_REMOTE, "%s: the host code passed %d values, the kernel takes %d", k->name, nargs, needs);
        return tvm_fail(&err, "TypeError");
    }
    if (mr_cl_ready(&err)) return tvm_fail(&err, "RuntimeError");
    int device = mr_cl_current();
    if (mr_cl_check_device(device, &err)) return tvm_fail(&err, "RuntimeError");
    void* kernel = tvm_kernel_on(m, k, device, &err);
    if (!kernel) return tvm_fail(&err, "RuntimeError");
    for (uint32_t i = 0; i < k->nargs; ++i) {
        const WBAny* v = &args[i];
        uint8_t bytes[8];
        size_t size;
        uint8_t code = k->codes[i], bits = k->bits[i];
        if (code == 3) {
            void* mem = v->type_index ? v->v_ptr : NULL;
            memcpy(bytes, &mem, sizeof(mem));
            size = sizeof(mem);
        } else if (code == 2) {
            double x = v->type_index == 3 ? v->v_float64 : (double)v->v_int64;
            if (bits == 32) {
                float f = (float)x;
                memcpy(bytes, &f, 4);
                size = 4;
            } else {
                memcpy(bytes, &x, 8);
                size = 8;
            }
        } else {
            uint64_t u = (uint64_t)v->v_int64;
            size = bits / 8;
            low_bytes(bytes, u, (int)size);
        }
        int rc = mr_cl_set_arg(kernel, i, size, bytes);
        if (rc) {
            char name[64];
            mr_fail(&err, MR_REMOTE, "%s: argument %u: clSetKernelArg failed: %s", k->name, i,
                    mr_cl_error_name(rc, name, sizeof(name)));
            return tvm_fail(&err, "TypeError");
        }
    }
    int64_t work[6] = {1, 1, 1, 1, 1, 1};
    for (int j = 0; j < k->n_index; ++j) {
        int64_t size = args[k->nargs + (uint32_t)j].v_int64;
        if (size > 0) work[k->index_map[j]] = size; /* a dynamic extent of 0 launches one (as TVM) */
    }
    size_t global[3], local[3];
    for (int d = 0; d < k->work_dim; ++d) {
        global[d] = (size_t)(work[d] * work[d + 3]);
        local[d] = (size_t)work[d + 3];
    }
    if (mr_cl_launch(device, kernel, k->name, (uint32_t)k->work_dim, global, local, &err)) return tvm_fail(&err, "RuntimeError");
    return 0;
}

/* The library's TVMFFIEnvModLookupFromImports: its OpenCL kernels and __tvm_set_device, else the usual lookup. */
static int tvm_lookup(void* library_ctx, const char* name, void** out) {
    for (tvm_module* m = tvm_modules; m && name && out; m = m->next) {
        if (m->ctx != library_ctx) continue;
        if (!strcmp(name, SET_DEVICE)) {
            *out = &m->set_device;
            return 0;
        }
        for (int i = 0; i < m->n_kernels; ++i)
            if (!strcmp(m->kernels[i].name, name)) {
                *out = &m->kernels[i].handle;
                return 0;
            }
    }
    return wb_env_mod_lookup_from_imports(library_ctx, name, out);
}

/* The library's TVMFFIFunctionCall: the handles above run here, the others as before. */
static int tvm_call(void* handle, const WBAny* args, int32_t nargs, WBAny* result) {
    tvm_handle* h = (tvm_handle*)handle;
    int ours = 0;
    for (tvm_module* m = tvm_modules; m && h && !ours; m = m->next) {
        if (h == &m->set_device) ours = 1;
        for (int i = 0; i < m->n_kernels && !ours; ++i) ours = h == &m->kernels[i].handle;
    }
    if (!ours) return wb_ffi_function_call(handle, args, nargs, result);
    if (result) {
        result->type_index = 0;
        result->pad = 0;
        result->v_int64 = 0;
    }
    if (h->kernel < 0) return tvm_set_device(h->module, args, nargs);
    return tvm_launch(h->module, &h->module->kernels[h->kernel], args, nargs);
}

int mr_cl_attach_tvm(void* dl, const char* name, mr_error* err) {
    const uint8_t* blob = (const uint8_t*)dlsym(dl, LIBRARY_BIN);
    const uint8_t* payload = NULL;
    size_t payload_len = 0;
    if (!blob || !opencl_payload(blob, &payload, &payload_len)) return 0;
    if (runtime_with_devices(name, err)) return -1;
    tvm_module* m = (tvm_module*)calloc(1, sizeof(tvm_module));
    if (!m || !(m->name = strdup(name))) {
        free(m);
        return mr_fail(err, MR_REMOTE, "out of memory loading %s", name);
    }
    m->n_devices = mr_cl_devices();
    if (parse_payload(m, payload, payload_len, err)) {
        tvm_module_free(m);
        return -1;
    }
    void** ctx_slot = (void**)dlsym(dl, LIBRARY_CTX);
    void** lookup_slot = (void**)dlsym(dl, LOOKUP_SLOT);
    void** call_slot = (void**)dlsym(dl, CALL_SLOT);
    m->ctx = ctx_slot ? *ctx_slot : NULL;
    m->next = tvm_modules;
    tvm_modules = m; /* (kept while the library is: libraries are never unloaded) */
    int (*lookup)(void*, const char*, void**) = tvm_lookup;
    int (*call)(void*, const WBAny*, int32_t, WBAny*) = tvm_call;
    if (lookup_slot) memcpy(lookup_slot, &lookup, sizeof(lookup));
    if (call_slot) memcpy(call_slot, &call, sizeof(call));
    return 1;
}
