/*
 * requests.c: the session worker: the request loop and every request of docs/protocol.md section 6.
 *
 * The worker is a process of its own (forked by the session process), so a kernel that crashes ends only
 * its session. It owns the session's objects: tensors (page-aligned, zero-filled anonymous memory),
 * modules (dlopen'ed private copies) and functions (kernels, or the registered functions below), named by
 * handles whose ids come from one counter and are never reused. Error texts are those of the Python
 * server (workbench/rpc/server/handler.py and the runtime modules it calls), so clients see the same messages.
 *
 * The hot path (an empty CALL) does no allocation: the control part is parsed into an arena reset after
 * each request, the reply is built in one reused buffer and sent with one write.
 */
#include "core.h"

#include <dlfcn.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "kernel_runtime.h"
#include "opencl.h"

/* ---- DLPack --------------------------------------------------------------------------------------- */
typedef struct {
    int32_t device_type, device_id;
} mr_dldevice;
typedef struct {
    uint8_t code, bits;
    uint16_t lanes;
} mr_dldtype;
typedef struct {
    void* data;
    mr_dldevice device;
    int32_t ndim;
    mr_dldtype dtype;
    int64_t* shape;
    int64_t* strides;
    uint64_t byte_offset;
} mr_dltensor;

#define TYPE_NONE 0
#define TYPE_INT 1
#define TYPE_BOOL 2
#define TYPE_FLOAT 3
#define TYPE_DLTENSOR 7
#define TYPE_STR 8
#define TYPE_BYTES 9

#define MAX_LANES 1024
#define MAX_NDIM 64
#define MAX_TENSOR_BYTES ((uint64_t)1 << 40)
#define HUGE_PAGE (2u << 20)
#define INT32_MAX_ 2147483647.0
#define MAX_CACHE_FLUSH_BYTES 1073741824.0
#define MAX_NUMBER ((int64_t)1 << 62)
#define KERNEL_PREFIX "__tvm_ffi_"

/* ---- session objects -------------------------------------------------------------------------------- */
enum { OBJ_TENSOR = MP_EXT_TENSOR, OBJ_MODULE = MP_EXT_MODULE, OBJ_FUNCTION = MP_EXT_FUNCTION };
enum { FN_KERNEL, FN_ECHO, FN_NOP, FN_SLEEP, FN_CL /* a kernel of a .cl module (opencl_module.c) */ };

typedef struct {
    int kind;
} mr_obj;

typedef struct {
    int kind;
    mr_dltensor dl;
    uint64_t nbytes;
    size_t maplen;
    int borrowed; /* a view of another tensor's memory (tvm.c): owns nothing, counts against nothing */
    char dtype[24];
    int64_t shape[]; /* ndim entries */
} mr_tensor;

typedef struct {
    int kind;
    void* dl;         /* never dlclose'd: kernels may have started threads, handed out pointers */
    mr_strlist kernels;
    char* name;       /* the user's file name, for messages */
    char* entry;      /* points into kernels, or NULL */
    mr_cl_module* cl; /* a .cl module (OpenCL C): its programs; dl NULL */
} mr_module;

typedef struct {
    int kind;
    int builtin; /* FN_* */
    WBPackedFunc fn;
    const char* name; /* the kernel or registered name (storage follows, or static) */
    mr_cl_kernel* cl; /* FN_CL: the kernel (its module referenced) */
} mr_function;

/* id -> object: open addressing; id 0 = empty slot, obj NULL with an id = a removed one */
typedef struct {
    uint64_t id;
    mr_obj* obj;
} mr_slot;

static struct {
    const mr_config* cfg;
    mr_conn* c;
    mr_workspace* ws;
    mr_shared* shared;
    mp_arena arena;
    mr_slot* slots;
    size_t cap, used, live; /* used counts removed slots too */
    uint64_t next_id;
    uint64_t tensors, tensor_bytes;
    uint64_t bulk_left; /* of the request being served */
    int lost;           /* the connection failed while reading a bulk part */
    /* the reply's bulk part */
    const void* reply_bulk;
    uint64_t reply_bulk_len;
    int reply_fd;
    char* reply_unlink;
    mr_tensor* reply_swapped; /* a big-endian device: the tensor read, in wire order until it is sent */
    int64_t crash_ns[MR_CRASH_LIMIT - 1]; /* when the last kernels crashed, newest first */
    int end_session;                      /* the error being sent ends the session (a crash loop) */
    int no_cancel;                        /* TVM's protocol: no CANCEL frames (its client has none) */
    /* TENSOR_READ of an OpenCL tensor: the mapping its reply is sent from, unmapped once it is sent */
    int cl_mapped_device;
    void *cl_mapped_mem, *cl_mapped_ptr;
} S;

static int table_grow(void) {
    size_t cap = 16; /* a power of two (the probe masks with cap - 1), at most a quarter full */
    while (cap < S.live * 4) cap *= 2;
    mr_slot* fresh = (mr_slot*)calloc(cap, sizeof(mr_slot));
    if (!fresh) return -1;
    for (size_t i = 0; i < S.cap; ++i) {
        if (!S.slots[i].obj) continue;
        size_t j = (size_t)(S.slots[i].id * 0x9E3779B97F4A7C15ull) & (cap - 1);
        while (fresh[j].id) j = (j + 1) & (cap - 1);
        fresh[j] = S.slots[i];
    }
    free(S.slots);
    S.slots = fresh;
    S.cap = cap;
    S.used = S.live;
    return 0;
}

static mr_obj* table_get(uint64_t id) {
    if (!S.cap || !id) return NULL;
    size_t j = (size_t)(id * 0x9E3779B97F4A7C15ull) & (S.cap - 1);
    while (S.slots[j].id) {
        if (S.slots[j].id == id) return S.slots[j].obj;
        j = (j + 1) & (S.cap - 1);
    }
    return NULL;
}

/* Add an object: its new id, or 0 when out of memory. */
static uint64_t table_add(mr_obj* obj) {
    if ((S.used + 1) * 2 > S.cap && table_grow()) return 0;
    uint64_t id = ++S.next_id;
    size_t j = (size_t)(id * 0x9E3779B97F4A7C15ull) & (S.cap - 1);
    while (S.slots[j].id) j = (j + 1) & (S.cap - 1);
    S.slots[j].id = id;
    S.slots[j].obj = obj;
    S.used++;
    S.live++;
    return id;
}

static mr_obj* table_remove(uint64_t id) {
    if (!S.cap || !id) return NULL;
    size_t j = (size_t)(id * 0x9E3779B97F4A7C15ull) & (S.cap - 1);
    while (S.slots[j].id) {
        if (S.slots[j].id == id) {
            mr_obj* obj = S.slots[j].obj;
            if (obj) S.live--;
            S.slots[j].obj = NULL; /* the id stays: probing goes on past it */
            return obj;
        }
        j = (j + 1) & (S.cap - 1);
    }
    return NULL;
}

static void tensor_release(mr_tensor* t) {
    if (t->borrowed) {
        free(t);
        return;
    }
    S.tensors--;
    S.tensor_bytes -= t->nbytes;
    if (t->dl.device.device_type == MR_CL_DEVICE_TYPE) mr_cl_free(t->dl.device.device_id, t->dl.data);
    else munmap(t->dl.data, t->maplen);
    free(t);
}

static void obj_release(mr_obj* obj) {
    if (obj->kind == OBJ_TENSOR) tensor_release((mr_tensor*)obj);
    else if (obj->kind == OBJ_MODULE) {
        mr_module* m = (mr_module*)obj;
        if (m->cl) mr_cl_module_release(m->cl);
        mr_strlist_free(&m->kernels);
        free(m->name);
        free(m);
    } else {
        if (obj->kind == OBJ_FUNCTION && ((mr_function*)obj)->cl)
            mr_cl_module_release(mr_cl_kernel_module(((mr_function*)obj)->cl));
        free(obj);
    }
}

/* ---- small helpers ---------------------------------------------------------------------------------- */
static const char* kind_name(int kind) {
    static const char* names[] = {"PING", "UPLOAD", "DOWNLOAD", "REMOVE", "LISTDIR", "LOAD_MODULE", "LINK_MODULE",
                                  "GET_FUNCTION", "MODULE_FUNCTION", "CALL", "TENSOR_ALLOC", "TENSOR_WRITE",
                                  "TENSOR_READ", "FREE", "TIME_EVAL", "SYSTEM_LIB"};
    return names[kind - K_PING];
}

static const char* ext_what(int ext) {
    return ext == MP_EXT_TENSOR ? "tensor" : ext == MP_EXT_MODULE ? "module" : "function";
}

static int arity(const mp_node* args, uint32_t n, const char* name, mr_error* err) {
    if (args->len != n) return mr_fail(err, MR_BAD_REQUEST, "request %s takes %u arguments, got %u", name, n, args->len);
    return 0;
}

static int is_int(const mp_node* n) { return n->type == MP_INT || n->type == MP_UINT; }
static int is_number(const mp_node* n) { return is_int(n) || n->type == MP_FLOAT; }
static double as_double(const mp_node* n) {
    return n->type == MP_INT ? (double)n->v.i : n->type == MP_UINT ? (double)n->v.u : n->v.f;
}

/* The live object of handle type `ext` that h names, or NULL with the Python server's message. */
static mr_obj* get_obj(const mp_node* h, int ext, mr_error* err) {
    char shown[128];
    const char* what = ext_what(ext);
    if (h->type != MP_EXT) {
        mp_repr(h, shown, sizeof(shown), 60);
        mr_fail(err, MR_BAD_REQUEST, "expected a %s handle, got %s %s", what, mp_type_name(h), shown);
        return NULL;
    }
    mp_handle_repr(h->ext, h->v.u, shown, sizeof(shown));
    if (h->ext != ext) {
        mr_fail(err, MR_BAD_REQUEST, "%s is a %s handle, where a %s is expected", shown, ext_what(h->ext), what);
        return NULL;
    }
    mr_obj* obj = table_get(h->v.u);
    if (!obj) {
        mr_fail(err, MR_BAD_REQUEST, "%s is not a live %s of this session (was it freed, or is it another session's?)",
                shown, what);
        return NULL;
    }
    if (obj->kind != ext) {
        mr_fail(err, MR_BAD_REQUEST, "%s is not a %s of this session (that id names another kind of object)", shown, what);
        return NULL;
    }
    return obj;
}

/* A function or kernel name: a non-empty str without NUL. */
static const char* get_name(const mp_node* n, const char* what, mr_error* err) {
    if (n->type != MP_STR || n->len == 0 || strlen(n->v.s) != n->len) {
        char shown[128];
        mp_repr(n, shown, sizeof(shown), 80);
        mr_fail(err, MR_BAD_REQUEST, "a %s name is a non-empty string without NUL bytes, not %s", what, shown);
        return NULL;
    }
    return n->v.s;
}

static const char* base_name(const char* path) {
    const char* slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static int ends_with(const char* s, const char* suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}


/* ---- crashes ------------------------------------------------------------------------------------------ */
/* Count one crash: 1 when it is the MR_CRASH_LIMIT-th within MR_CRASH_WINDOW_NS (the session ends: no crash loop). */
static int count_crash(void) {
    int64_t now = mr_now_ns();
    int recent = 1;
    for (int i = 0; i < MR_CRASH_LIMIT - 1; ++i)
        if (S.crash_ns[i] && now - S.crash_ns[i] < MR_CRASH_WINDOW_NS) recent++;
    for (int i = MR_CRASH_LIMIT - 2; i > 0; --i) S.crash_ns[i] = S.crash_ns[i - 1];
    S.crash_ns[0] = now;
    return recent >= MR_CRASH_LIMIT;
}

/* An OpenCL request failed with err: a KERNEL_CRASHED one counts as a crash, as the Python server counts it (the
   crash-loop rule ends the session). Returns -1. */
static int cl_failed(mr_error* err) {
    if (err->code != MR_KERNEL_CRASHED || !count_crash()) return -1;
    char* cut = strstr(err->msg, "; the session, ");
    if (cut) *cut = '\0';
    size_t used = strlen(err->msg);
    snprintf(err->msg + used, sizeof(err->msg) - used,
             ". That is the %drd crash within %lld s, so the server ended the session (its tensors and modules are "
             "gone): fix the kernel, then connect again", MR_CRASH_LIMIT, (long long)(MR_CRASH_WINDOW_NS / 1000000000LL));
    err->code = MR_WORKER_DIED;
    S.end_session = 1;
    return -1;
}

/* ---- bulk parts ------------------------------------------------------------------------------------ */
static int bulk_into(void* dst, uint64_t n) {
    S.bulk_left -= n;
    if (conn_read_exact(S.c, dst, n)) {
        S.lost = 1;
        return -1;
    }
    return 0;
}

static int bulk_drop(void) {
    uint64_t n = S.bulk_left;
    S.bulk_left = 0;
    if (n && conn_discard(S.c, n)) {
        S.lost = 1;
        return -1;
    }
    return 0;
}

/* ---- the session info (the handshake's OK) --------------------------------------------------------- */
void mr_put_session_info(mp_buf* b, const mr_config* cfg, double session_timeout, const uint8_t* proof) {
    struct utsname u;
    if (uname(&u) != 0) strcpy(u.machine, "unknown");
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int n_cl = mr_cl_count();
    mp_put_map(b, (proof ? 10 : 9) + (n_cl ? 1 : 0));
    mp_put_cstr(b, "devices");
    mp_put_array(b, 1 + (uint32_t)n_cl);
    mp_put_array(b, 2);
    mp_put_int(b, 1);
    mp_put_int(b, 0);
    for (int i = 0; i < n_cl; ++i) {
        mp_put_array(b, 2);
        mp_put_int(b, MR_CL_DEVICE_TYPE);
        mp_put_int(b, i);
    }
    if (n_cl) { /* the OpenCL devices' attributes, under TVM's names (docs/protocol.md section 14) */
        mp_put_cstr(b, "device_details");
        mr_cl_put_details(b);
    }
    mp_put_cstr(b, "arch");
    mp_put_cstr(b, u.machine);
    mp_put_cstr(b, "system");
    mp_put_cstr(b, "Linux");
    mp_put_cstr(b, "cpu_count");
    mp_put_int(b, cpus > 0 ? cpus : 1);
    mp_put_cstr(b, "pid");
    mp_put_int(b, getpid());
    mp_put_cstr(b, "target");
    mp_put_cstr(b, cfg->target);
    mp_put_cstr(b, "key");
    mp_put_cstr(b, cfg->key);
    mp_put_cstr(b, "session_timeout");
    mp_put_float(b, session_timeout);
    mp_put_cstr(b, "server");
    mp_put_cstr(b, "minrpc");
    if (proof) {
        mp_put_cstr(b, "proof");
        mp_put_bin(b, proof, MR_NONCE);
    }
}

/* ---- PING, files ----------------------------------------------------------------------------------- */
static int do_ping(const mp_node* args, mr_error* err) {
    (void)args;
    (void)err;
    mp_buf* b = &S.c->out;
    mp_put_map(b, 3);
    mp_put_cstr(b, "objects");
    mp_put_uint(b, S.live);
    mp_put_cstr(b, "tensors");
    mp_put_uint(b, S.tensors);
    mp_put_cstr(b, "tensor_bytes");
    mp_put_uint(b, S.tensor_bytes);
    return 0;
}

static int do_upload(const mp_node* args, mr_error* err) {
    if (arity(args, 1, "UPLOAD", err)) return -1;
    char* full = ws_resolve(S.ws, &args->v.items[0], err);
    if (!full) return -1;
    char shown[600];
    py_repr_str(args->v.items[0].v.s, args->v.items[0].len, shown, sizeof(shown));
    int rc = -1;
    char* tmp = NULL;
    if (strcmp(full, S.ws->root) == 0) {
        mr_fail(err, MR_PATH_DENIED, "cannot write over the workspace directory itself; name a file");
        goto out;
    }
    /* the quotas, before anything is written: the file it replaces is credited */
    struct stat old;
    uint64_t old_size = 0, new_entries = 1, size = S.bulk_left;
    if (lstat(full, &old) == 0) {
        old_size = S_ISDIR(old.st_mode) ? 0 : (uint64_t)old.st_size;
        new_entries = 0;
    }
    uint64_t new_dirs = ws_missing_dirs(S.ws, full);
    char what_bytes[700], what_files[700], sz[32];
    snprintf(what_bytes, sizeof(what_bytes), "upload of %s to %s", mr_format_size(size, sz, sizeof(sz)), shown);
    snprintf(what_files, sizeof(what_files), "upload to %s", shown);
    if (ws_check_room(S.ws, what_bytes, what_files, size, old_size, new_entries + new_dirs, err)) goto out;
    int made = ws_make_parents(S.ws, full);
    int made_errno = errno;
    ws_charge(S.ws, 0, (int64_t)(new_dirs - ws_missing_dirs(S.ws, full)));
    if (made) {
        mr_fail(err, MR_REMOTE, "cannot create the directories of %s in the session workspace: %s", shown,
                strerror(made_errno));
        goto out;
    }
    /* written beside its target and renamed over it: a module loaded from the old file is never changed */
    size_t n = strlen(full) + 32;
    tmp = (char*)malloc(n);
    if (!tmp) {
        mr_fail(err, MR_REMOTE, "out of memory");
        goto out;
    }
    snprintf(tmp, n, "%.*s/.upload-XXXXXX", (int)(base_name(full) - full - 1), full);
    int fd = mkstemp(tmp);
    if (fd < 0) {
        mr_fail(err, MR_REMOTE, "cannot create %s in the session workspace: %s", shown, strerror(errno));
        goto out;
    }
    int write_errno = 0;
    if (S.bulk_left) {
        uint64_t size = S.bulk_left;
        S.bulk_left = 0;
        /* each window's extent at once, just before its bytes are read, rather than block by block as they
           land (about 1.14x faster on ext4), and never more disk than the bytes fill and one window, however
           slowly they come; advice only: a failure here is left to the writes, which say what went wrong */
        for (uint64_t done = 0; done < size && !S.lost && !write_errno;) {
            uint64_t n = size - done < MR_PREALLOCATE_WINDOW ? size - done : MR_PREALLOCATE_WINDOW;
            if (size >= MR_PREALLOCATE_MIN) (void)fallocate(fd, FALLOC_FL_KEEP_SIZE, (off_t)done, (off_t)n);
            if (conn_bulk_to_fd(S.c, fd, n, &write_errno)) S.lost = 1;
            done += n;
            /* a failed write dropped the rest of its window; the rest of the part goes too, to stay in step */
            if (write_errno && !S.lost && done < size && conn_discard(S.c, size - done)) S.lost = 1;
        }
    }
    if (!write_errno && fchmod(fd, 0644) != 0) write_errno = errno;
    if (close(fd) != 0 && !write_errno) write_errno = errno;
    if (S.lost || write_errno) {
        unlink(tmp);
        if (!S.lost)
            mr_fail(err, MR_REMOTE,
                    "%s while the server wrote the received data to a file (disk full or a file-size limit?); "
                    "the data was dropped", strerror(write_errno));
        goto out;
    }
    if (rename(tmp, full) != 0) {
        int e = errno;
        unlink(tmp);
        mr_fail(err, e == EISDIR ? MR_BAD_REQUEST : MR_REMOTE, "cannot write %s: %s%s", shown, strerror(e),
                e == EISDIR ? " (it is a directory: remove it first)" : "");
        goto out;
    }
    ws_charge(S.ws, (int64_t)size - (int64_t)old_size, (int64_t)new_entries);
    mp_put_nil(&S.c->out);
    rc = 0;
out:
    free(tmp);
    free(full);
    return rc;
}

static int do_download(const mp_node* args, mr_error* err) {
    if (arity(args, 1, "DOWNLOAD", err)) return -1;
    char* full = ws_resolve(S.ws, &args->v.items[0], err);
    if (!full) return -1;
    char shown[600];
    py_repr_str(args->v.items[0].v.s, args->v.items[0].len, shown, sizeof(shown));
    struct stat st;
    int fd = -1;
    if (stat(full, &st) == 0 && S_ISDIR(st.st_mode)) {
        free(full);
        return mr_fail(err, MR_BAD_REQUEST, "%s is a directory; download a file (listdir shows what is there)", shown);
    }
    fd = open(full, O_RDONLY | O_CLOEXEC);
    free(full);
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            return mr_fail(err, MR_NOT_FOUND, "no file %s in the session workspace (listdir shows what is there)", shown);
        return mr_fail(err, MR_REMOTE, "cannot open %s: %s", shown, strerror(errno));
    }
    if (fstat(fd, &st) != 0) {
        close(fd);
        return mr_fail(err, MR_REMOTE, "cannot read %s: %s", shown, strerror(errno));
    }
    mp_put_uint(&S.c->out, (uint64_t)st.st_size);
    S.reply_fd = fd;
    S.reply_bulk_len = (uint64_t)st.st_size;
    return 0;
}

static int do_remove(const mp_node* args, mr_error* err) {
    if (arity(args, 1, "REMOVE", err)) return -1;
    char* full = ws_resolve(S.ws, &args->v.items[0], err);
    if (!full) return -1;
    char shown[600];
    py_repr_str(args->v.items[0].v.s, args->v.items[0].len, shown, sizeof(shown));
    int rc = 0;
    struct stat st;
    if (strcmp(full, S.ws->root) == 0) rc = mr_fail(err, MR_PATH_DENIED, "cannot remove the workspace directory itself");
    else if (lstat(full, &st) != 0) rc = mr_fail(err, MR_NOT_FOUND, "no file %s in the session workspace", shown);
    else {
        uint64_t bytes, entries, left_bytes, left_entries;
        ws_tree_usage(full, &bytes, &entries);
        if (mr_remove_tree(full) != 0) rc = mr_fail(err, MR_REMOTE, "cannot remove %s: %s", shown, strerror(errno));
        ws_tree_usage(full, &left_bytes, &left_entries); /* what could not be removed stays counted */
        ws_charge(S.ws, (int64_t)left_bytes - (int64_t)bytes, (int64_t)left_entries - (int64_t)entries);
    }
    free(full);
    if (rc == 0) mp_put_nil(&S.c->out);
    return rc;
}

static int cmp_str(const void* a, const void* b) { return strcmp(*(char* const*)a, *(char* const*)b); }

static int do_listdir(const mp_node* args, mr_error* err) {
    if (args->len > 1) return mr_fail(err, MR_BAD_REQUEST, "request LISTDIR takes 0 or 1 arguments, got %u", args->len);
    mp_node dot = {MP_STR, 0, 1, {0}};
    dot.v.s = ".";
    const mp_node* path = args->len ? &args->v.items[0] : &dot;
    char* full = ws_resolve(S.ws, path, err);
    if (!full) return -1;
    char shown[600];
    py_repr_str(path->v.s, path->len, shown, sizeof(shown));
    DIR* d = opendir(full);
    free(full);
    if (!d) {
        if (errno == ENOENT || errno == ENOTDIR)
            return mr_fail(err, MR_NOT_FOUND, "no directory %s in the session workspace", shown);
        return mr_fail(err, MR_REMOTE, "cannot list %s: %s", shown, strerror(errno));
    }
    size_t count = 0, cap = 16;
    char** names = (char**)mp_alloc(&S.arena, cap * sizeof(char*));
    struct dirent* e;
    while (names && (e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (count == cap) {
            char** grown = (char**)mp_alloc(&S.arena, cap * 2 * sizeof(char*));
            if (!grown) {
                names = NULL;
                break;
            }
            memcpy(grown, names, cap * sizeof(char*));
            names = grown;
            cap *= 2;
        }
        size_t len = strlen(e->d_name);
        char* copy = (char*)mp_alloc(&S.arena, len + 1);
        if (!copy) {
            names = NULL;
            break;
        }
        memcpy(copy, e->d_name, len + 1);
        names[count++] = copy;
    }
    closedir(d);
    if (!names) return mr_fail(err, MR_REMOTE, "out of memory listing %s", shown);
    qsort(names, count, sizeof(char*), cmp_str);
    mp_put_array(&S.c->out, (uint32_t)count);
    for (size_t i = 0; i < count; ++i) mp_put_cstr(&S.c->out, names[i]);
    return 0;
}

/* ---- modules --------------------------------------------------------------------------------------- */
static int copy_file(const char* src, const char* dst) {
    if (link(src, dst) == 0) return 0;
    int in = open(src, O_RDONLY | O_CLOEXEC);
    if (in < 0) return -1;
    int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0700);
    if (out < 0) {
        close(in);
        return -1;
    }
    struct stat st;
    int rc = fstat(in, &st);
    off_t off = 0;
    while (rc == 0 && off < st.st_size) {
        ssize_t n = sendfile(out, in, &off, (size_t)(st.st_size - off));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            char buf[65536];
            ssize_t r;
            while ((r = pread(in, buf, sizeof(buf), off)) > 0) {
                if (write(out, buf, (size_t)r) != r) {
                    rc = -1;
                    break;
                }
                off += r;
            }
            if (r < 0) rc = -1;
            break;
        }
    }
    int e = errno;
    close(in);
    if (close(out) != 0) rc = -1;
    errno = e;
    return rc;
}

/* The entry function: "main" if exported, else the only kernel, else none (protocol.md section 11). */
static char* entry_of(const mr_strlist* kernels) {
    for (int i = 0; i < kernels->count; ++i)
        if (strcmp(kernels->items[i], "main") == 0) return kernels->items[i];
    return kernels->count == 1 ? kernels->items[0] : NULL;
}

/* The C math library, opened globally once before the first kernel library: a kernel built without -lm
   finds expf & co. as it would in the Python server's process. minrpc itself does not use libm, so that a
   listener does not map it (its resident memory stays small). */
static void load_libm(void) {
    static int done;
    if (done) return;
    done = 1;
    if (!dlopen("libm.so.6", RTLD_NOW | RTLD_GLOBAL)) dlopen("libm.so", RTLD_NOW | RTLD_GLOBAL);
}

/* Open a shared object (a private path) as a module named `name`: NULL with err on failure. */
static mr_module* open_library(const char* so, const char* name, mr_error* err) {
    load_libm();
    mr_module* m = (mr_module*)calloc(1, sizeof(mr_module));
    if (!m || !(m->name = strdup(name))) {
        free(m);
        mr_fail(err, MR_REMOTE, "out of memory loading %s", name);
        return NULL;
    }
    m->kind = OBJ_MODULE;
    mr_strlist slots = {0};
    if (mr_elf_symbols(so, name, &m->kernels, &slots, err)) goto fail;
    m->dl = dlopen(so, RTLD_NOW | RTLD_LOCAL);
    if (!m->dl) {
        const char* why = dlerror();
        mr_fail(err, MR_REMOTE, "cannot load %s: %s", name, why ? why : "unknown error");
        mr_replace_all(err->msg, sizeof(err->msg), so, name);
        goto fail;
    }
    if (mr_fill_context_slots(m->dl, &slots, name, err)) goto fail; /* (the library stays open: never unloaded) */
    if (wb_guard_library(m->dl) != 0) mr_log_info("cannot read %s's dynamic section: exit() in it ends the session", name);
    mr_strlist_free(&slots);
    m->entry = entry_of(&m->kernels);
    return m;
fail:
    mr_strlist_free(&slots);
    mr_strlist_free(&m->kernels);
    free(m->name);
    free(m);
    return NULL;
}

static int module_reply(mr_module* m, mr_error* err) {
    uint64_t id = table_add((mr_obj*)m);
    if (!id) {
        obj_release((mr_obj*)m);
        return mr_fail(err, MR_REMOTE, "out of memory");
    }
    mp_buf* b = &S.c->out;
    mp_put_array(b, 3);
    mp_put_handle(b, MP_EXT_MODULE, id);
    mp_put_array(b, (uint32_t)m->kernels.count);
    for (int i = 0; i < m->kernels.count; ++i) mp_put_cstr(b, m->kernels.items[i]);
    if (m->entry) mp_put_cstr(b, m->entry);
    else mp_put_nil(b);
    return 0;
}

/* Link the .tar (or the object file: is_object) at `tar` (client name `name`) into a new private .so; returns
   its path (malloc'ed) or NULL. */
static char* link_tar(const char* tar, const char* name, const char* so_name, int is_object, mr_error* err) {
    const char* cc = mr_find_cc(S.cfg->cc);
    if (!cc) {
        mr_fail(err, MR_UNSUPPORTED, "this device has no C compiler to link %s: install gcc on the device, "
                                     "or cross-compile and upload a .so instead",
                is_object ? "an object file into a module" : "a .tar module");
        return NULL;
    }
    char* so = ws_private_path(S.ws, so_name);
    if (!so) {
        mr_fail(err, MR_REMOTE, "out of memory");
        return NULL;
    }
    size_t n = strlen(so) + 8;
    char* work = (char*)malloc(n);
    if (!work) {
        free(so);
        mr_fail(err, MR_REMOTE, "out of memory");
        return NULL;
    }
    snprintf(work, n, "%s.objs", so);
    int rc;
    if (mkdir(work, 0700) != 0) rc = mr_fail(err, MR_REMOTE, "cannot create a directory to link %s: %s", name, strerror(errno));
    else if (is_object) rc = mr_link_object(tar, name, work, so, cc, err);
    else rc = mr_link_tar(tar, name, work, so, cc, S.ws->max_bytes, S.ws->used_bytes, err);
    mr_remove_tree(work);
    free(work);
    if (rc) {
        unlink(so);
        free(so);
        return NULL;
    }
    return so;
}

static int do_load_module(const mp_node* args, mr_error* err) {
    if (arity(args, 1, "LOAD_MODULE", err)) return -1;
    char* full = ws_resolve(S.ws, &args->v.items[0], err);
    if (!full) return -1;
    const char* name = base_name(full);
    char shown[600];
    py_repr_str(name, strlen(name), shown, sizeof(shown));
    char* so = NULL;
    int rc = -1;
    int is_object = ends_with(full, ".o") || ends_with(full, ".obj");
    int is_tar = ends_with(full, ".tar") || is_object; /* linked first, one object as a .tar's members */
    int is_cl = ends_with(full, ".cl");                /* OpenCL C, built for the OpenCL devices (opencl_module.c) */
    if (!is_tar && !is_cl && !ends_with(full, ".so") && !ends_with(full, ".dylib") && !ends_with(full, ".dll")) {
        mr_fail(err, MR_UNSUPPORTED,
                "cannot load %s: load_module takes a shared object (.so), an object file (.o) or a .tar of object "
                "files, or OpenCL C source (.cl)", shown);
        goto out;
    }
    struct stat st;
    if (stat(full, &st) != 0) {
        mr_fail(err, MR_NOT_FOUND, "no file %s in the session workspace; upload it first", shown);
        goto out;
    }
    if (is_cl) {
        mr_cl_module* cl = mr_cl_load_source(full, name, err);
        if (!cl) {
            cl_failed(err);
            goto out;
        }
        mr_module* m = (mr_module*)calloc(1, sizeof(mr_module));
        const mr_strlist* names = mr_cl_module_names(cl);
        if (m) {
            m->kind = OBJ_MODULE;
            m->cl = cl;
            m->name = strdup(name);
            m->kernels.items = (char**)calloc((size_t)names->count + 1, sizeof(char*));
            for (int i = 0; m->kernels.items && i < names->count; ++i)
                if ((m->kernels.items[m->kernels.count] = strdup(names->items[i])) != NULL) m->kernels.count++;
        }
        if (!m || !m->name || !m->kernels.items || m->kernels.count != names->count) {
            if (m) obj_release((mr_obj*)m);
            else mr_cl_module_release(cl);
            mr_fail(err, MR_REMOTE, "out of memory loading %s", name);
            goto out;
        }
        m->entry = entry_of(&m->kernels);
        rc = module_reply(m, err);
        goto out;
    }
    /* the private copy (or the library linked from a .tar) counts against the workspace's quotas until the
       session ends, at its full size even when hard-linked: the client may remove the file it came from */
    char what_bytes[800], what_files[700], sz[32];
    if (is_tar) {
        char stem[512];
        const char* dot = strrchr(name, '.');
        snprintf(stem, sizeof(stem), "%.*s.so", (int)(dot - name), name);
        so = link_tar(full, name, stem, is_object, err);
        if (!so) goto out;
        struct stat linked;
        uint64_t linked_size = stat(so, &linked) == 0 ? (uint64_t)linked.st_size : 0;
        snprintf(what_bytes, sizeof(what_bytes), "the library linked from %s (%s)", name,
                 mr_format_size(linked_size, sz, sizeof(sz)));
        snprintf(what_files, sizeof(what_files), "the library linked from %s", name);
        if (ws_check_room(S.ws, what_bytes, what_files, linked_size, 0, 1, err)) {
            unlink(so);
            goto out;
        }
        ws_charge(S.ws, (int64_t)linked_size, 1);
    } else {
        snprintf(what_bytes, sizeof(what_bytes),
                 "loading %s (%s; a loaded module keeps a private copy until the session ends)", shown,
                 mr_format_size((uint64_t)st.st_size, sz, sizeof(sz)));
        snprintf(what_files, sizeof(what_files),
                 "loading %s (a loaded module keeps a private copy until the session ends)", shown);
        if (ws_check_room(S.ws, what_bytes, what_files, (uint64_t)st.st_size, 0, 1, err)) goto out;
        /* a private copy under a new path: the loader caches libraries by path, so a re-uploaded lib.so
           must not hand back the old code */
        so = ws_private_path(S.ws, name);
        if (!so) {
            mr_fail(err, MR_REMOTE, "out of memory");
            goto out;
        }
        if (copy_file(full, so) != 0) {
            mr_fail(err, MR_REMOTE, "cannot copy %s to load it: %s", shown, strerror(errno));
            unlink(so);
            goto out;
        }
        struct stat copied;
        ws_charge(S.ws, stat(so, &copied) == 0 ? (int64_t)copied.st_size : 0, 1);
    }
    mr_module* m = open_library(so, name, err);
    if (m && mr_cl_attach_tvm(m->dl, name, err) < 0) { /* TVM's OpenCL target: its kernels launched here */
        cl_failed(err);
        obj_release((mr_obj*)m);
        m = NULL;
    }
    if (m) rc = module_reply(m, err);
    if (rc) { /* a failed load keeps no copy (a library that was opened stays mapped: removing its file is safe) */
        uint64_t bytes, entries;
        ws_tree_usage(so, &bytes, &entries);
        if (entries && unlink(so) == 0) ws_charge(S.ws, -(int64_t)bytes, -(int64_t)entries);
    }
out:
    free(so);
    free(full);
    return rc;
}

static int do_link_module(const mp_node* args, mr_error* err) {
    if (arity(args, 1, "LINK_MODULE", err)) return -1;
    char* full = ws_resolve(S.ws, &args->v.items[0], err);
    if (!full) return -1;
    char shown[600];
    py_repr_str(args->v.items[0].v.s, args->v.items[0].len, shown, sizeof(shown));
    int rc = -1;
    struct stat st;
    if (!ends_with(full, ".tar")) {
        mr_fail(err, MR_BAD_REQUEST, "download_linked_module takes a .tar of object files, not %s", shown);
    } else if (stat(full, &st) != 0) {
        mr_fail(err, MR_NOT_FOUND, "no file %s in the session workspace; upload it first", shown);
    } else {
        const char* name = base_name(full);
        char so_name[512];
        snprintf(so_name, sizeof(so_name), "%s.so", name);
        char* so = link_tar(full, name, so_name, 0, err);
        if (so) {
            int fd = open(so, O_RDONLY | O_CLOEXEC);
            if (fd < 0 || fstat(fd, &st) != 0) {
                mr_fail(err, MR_REMOTE, "cannot read the linked %s: %s", so_name, strerror(errno));
                if (fd >= 0) close(fd);
                unlink(so);
                free(so);
            } else {
                mp_put_uint(&S.c->out, (uint64_t)st.st_size);
                S.reply_fd = fd;
                S.reply_bulk_len = (uint64_t)st.st_size;
                S.reply_unlink = so; /* sent, then removed: the client has it */
                rc = 0;
            }
        }
    }
    free(full);
    return rc;
}

/* The kernels linked into this executable (a program built with with_minrpc): dlopen(NULL). */
static void* system_lib_handle; /* dlopen(NULL), once SYSTEM_LIB was asked for */

static int do_system_lib(const mp_node* args, mr_error* err) {
    (void)args;
    static mr_strlist kernels;
    static int ready;
    if (!ready) {
        mr_strlist slots = {0};
        system_lib_handle = dlopen(NULL, RTLD_NOW);
        if (!system_lib_handle) return mr_fail(err, MR_REMOTE, "cannot open this server's own symbols: %s", dlerror());
        if (mr_elf_symbols("/proc/self/exe", "<system lib>", &kernels, &slots, err)) return -1;
        int rc = mr_fill_context_slots(system_lib_handle, &slots, "<system lib>", err);
        mr_strlist_free(&slots);
        if (rc || mr_syslib_complete(&kernels, err)) return -1;
        if (wb_guard_library(system_lib_handle) != 0)
            mr_log_info("cannot read this server's dynamic section: exit() in a kernel ends the session");
        ready = 1;
    }
    mr_module* m = (mr_module*)calloc(1, sizeof(mr_module));
    if (!m) return mr_fail(err, MR_REMOTE, "out of memory");
    m->kind = OBJ_MODULE;
    m->dl = system_lib_handle;
    m->name = strdup("<system lib>");
    m->kernels.items = (char**)calloc((size_t)kernels.count + 1, sizeof(char*));
    for (int i = 0; m->kernels.items && i < kernels.count; ++i) {
        m->kernels.items[i] = strdup(kernels.items[i]);
        if (m->kernels.items[i]) m->kernels.count++;
    }
    if (!m->name || !m->kernels.items || m->kernels.count != kernels.count) {
        obj_release((mr_obj*)m);
        return mr_fail(err, MR_REMOTE, "out of memory");
    }
    m->entry = entry_of(&m->kernels);
    return module_reply(m, err);
}

/* ---- functions ------------------------------------------------------------------------------------- */
static const struct {
    const char* name;
    int builtin;
} REGISTERED[] = {{"workbench.echo", FN_ECHO}, {"workbench.nop", FN_NOP}, {"workbench.sleep", FN_SLEEP}};
#define N_REGISTERED (sizeof(REGISTERED) / sizeof(REGISTERED[0]))

static int add_function(const char* name, int builtin, WBPackedFunc fn, mr_error* err) {
    size_t n = strlen(name);
    mr_function* f = (mr_function*)malloc(sizeof(mr_function) + n + 1);
    if (!f) return mr_fail(err, MR_REMOTE, "out of memory");
    f->kind = OBJ_FUNCTION;
    f->builtin = builtin;
    f->fn = fn;
    f->cl = NULL;
    memcpy((char*)(f + 1), name, n + 1);
    f->name = (const char*)(f + 1);
    uint64_t id = table_add((mr_obj*)f);
    if (!id) {
        free(f);
        return mr_fail(err, MR_REMOTE, "out of memory");
    }
    mp_put_handle(&S.c->out, MP_EXT_FUNCTION, id);
    return 0;
}

static int find_registered(const char* name, mr_error* err) {
    for (size_t i = 0; i < N_REGISTERED; ++i)
        if (strcmp(REGISTERED[i].name, name) == 0) return REGISTERED[i].builtin;
    char shown[300];
    py_repr_str(name, strlen(name), shown, sizeof(shown));
    return mr_fail(err, MR_NOT_FOUND,
                   "no function named %s is registered on this server (minrpc registers workbench.echo, "
                   "workbench.nop and workbench.sleep; kernels come from modules: load_module or system_lib)", shown);
}

static int do_get_function(const mp_node* args, mr_error* err) {
    if (arity(args, 1, "GET_FUNCTION", err)) return -1;
    const char* name = get_name(&args->v.items[0], "function", err);
    if (!name) return -1;
    int builtin = find_registered(name, err);
    if (builtin < 0) return -1;
    return add_function(name, builtin, NULL, err);
}

static int do_module_function(const mp_node* args, mr_error* err) {
    if (arity(args, 2, "MODULE_FUNCTION", err)) return -1;
    mr_module* m = (mr_module*)get_obj(&args->v.items[0], OBJ_MODULE, err);
    if (!m) return -1;
    const char* name = get_name(&args->v.items[1], "kernel", err);
    if (!name) return -1;
    if (m->cl) { /* a kernel of a .cl module */
        mr_cl_kernel* k = mr_cl_get_kernel(m->cl, name, err);
        if (!k) return cl_failed(err);
        if (add_function(name, FN_CL, NULL, err)) return -1;
        mr_function* f = (mr_function*)table_get(S.next_id);
        f->cl = k;
        mr_cl_module_retain(m->cl);
        return 0;
    }
    size_t n = strlen(name);
    char* sym = (char*)mp_alloc(&S.arena, n + sizeof(KERNEL_PREFIX));
    if (!sym) return mr_fail(err, MR_REMOTE, "out of memory");
    memcpy(sym, KERNEL_PREFIX, sizeof(KERNEL_PREFIX) - 1);
    memcpy(sym + sizeof(KERNEL_PREFIX) - 1, name, n + 1);
    void* fn = m->dl == system_lib_handle ? mr_syslib_lookup(sym) : NULL; /* a TVM system library's kernel */
    if (!fn) fn = dlsym(m->dl, sym);
    if (!fn) {
        char shown[300], listing[2048] = "";
        size_t used = 0;
        for (int i = 0; i < m->kernels.count && used + 4 < sizeof(listing); ++i)
            used += (size_t)snprintf(listing + used, sizeof(listing) - used, "%s%s", i ? ", " : "", m->kernels.items[i]);
        if (used >= sizeof(listing)) strcpy(listing + sizeof(listing) - 5, "...");
        py_repr_str(name, n, shown, sizeof(shown));
        return mr_fail(err, MR_NOT_FOUND, "no kernel named %s in %s (it exports: %s); kernels are exported as "
                                          "__tvm_ffi_<name>", shown, m->name, m->kernels.count ? listing : "none found");
    }
    WBPackedFunc packed;
    memcpy(&packed, &fn, sizeof(packed)); /* an object pointer from dlsym to a function pointer, as POSIX allows */
    return add_function(name, FN_KERNEL, packed, err);
}

/* CALL and TIME_EVAL arguments, resolved: tensor handles to their tensors. */
typedef struct {
    const mp_node* node;
    mr_tensor* tensor;
} mr_arg;

static mr_arg* resolve_args(const mp_node* list, mr_error* err) {
    mr_arg* out = (mr_arg*)mp_alloc(&S.arena, (list->len ? list->len : 1) * sizeof(mr_arg));
    if (!out) {
        mr_fail(err, MR_REMOTE, "out of memory");
        return NULL;
    }
    for (uint32_t i = 0; i < list->len; ++i) {
        const mp_node* a = &list->v.items[i];
        out[i].node = a;
        out[i].tensor = NULL;
        if (a->type != MP_EXT) continue;
        if (a->ext != MP_EXT_TENSOR) {
            char shown[64];
            mr_fail(err, MR_BAD_REQUEST,
                    "argument %u: %s is a %s handle; only tensors, numbers, strings and bytes can be passed to a "
                    "function", i, mp_handle_repr(a->ext, a->v.u, shown, sizeof(shown)), ext_what(a->ext));
            return NULL;
        }
        out[i].tensor = (mr_tensor*)get_obj(a, OBJ_TENSOR, err);
        if (!out[i].tensor) return NULL;
    }
    return out;
}

/* The TVMFFIAny array of a kernel call. */
static WBAny* pack_args(const mr_arg* args, uint32_t n, mr_error* err) {
    WBAny* out = (WBAny*)mp_alloc(&S.arena, (n ? n : 1) * sizeof(WBAny));
    if (!out) {
        mr_fail(err, MR_REMOTE, "out of memory");
        return NULL;
    }
    for (uint32_t i = 0; i < n; ++i) {
        const mp_node* a = args[i].node;
        WBAny* slot = &out[i];
        slot->pad = 0;
        slot->v_int64 = 0;
        if (args[i].tensor) {
            slot->type_index = TYPE_DLTENSOR;
            slot->v_ptr = &args[i].tensor->dl;
            continue;
        }
        switch (a->type) {
        case MP_NIL: slot->type_index = TYPE_NONE; break;
        case MP_BOOL: slot->type_index = TYPE_BOOL; slot->v_int64 = a->v.i; break;
        case MP_INT: slot->type_index = TYPE_INT; slot->v_int64 = a->v.i; break;
        case MP_UINT:
            mr_fail(err, MR_BAD_REQUEST, "argument %u: %llu does not fit a kernel's int64 argument", i,
                    (unsigned long long)a->v.u);
            return NULL;
        case MP_FLOAT: slot->type_index = TYPE_FLOAT; slot->v_float64 = a->v.f; break;
        case MP_STR:
            if (strlen(a->v.s) != a->len) {
                mr_fail(err, MR_BAD_REQUEST, "argument %u: a kernel takes strings as C strings, which cannot hold a NUL", i);
                return NULL;
            }
            slot->type_index = TYPE_STR;
            slot->v_c_str = a->v.s; /* NUL-terminated in the arena */
            break;
        case MP_BIN: {
            WBByteArray* ba = (WBByteArray*)mp_alloc(&S.arena, sizeof(WBByteArray));
            if (!ba) {
                mr_fail(err, MR_REMOTE, "out of memory");
                return NULL;
            }
            ba->data = a->v.s;
            ba->size = a->len;
            slot->type_index = TYPE_BYTES;
            slot->v_ptr = ba;
            break;
        }
        default:
            mr_fail(err, MR_BAD_REQUEST,
                    "argument %u: a kernel cannot take a %s; pass tensors, ints, floats, bools, strings or bytes", i,
                    mp_type_name(a));
            return NULL;
        }
    }
    return out;
}

/* A kernel that crashed (the guard in kernel_runtime.c caught it): KERNEL_CRASHED, the session goes
   on; the MR_CRASH_LIMIT-th crash within MR_CRASH_WINDOW_NS ends it (no crash loop). */
static int kernel_crashed(const mr_function* f, const char* what, mr_error* err) {
    if (count_crash()) {
        S.end_session = 1;
        return mr_fail(err, MR_WORKER_DIED,
                       "%s: %s. That is the %drd crash within %lld s, so the server ended the session (its tensors "
                       "and modules are gone): fix the kernel, then connect again",
                       f->name, what, MR_CRASH_LIMIT, (long long)(MR_CRASH_WINDOW_NS / 1000000000LL));
    }
    return mr_fail(err, MR_KERNEL_CRASHED,
                   "%s: %s; the session, its tensors (with what the kernel wrote) and its modules are intact: fix "
                   "the kernel and call again", f->name, what);
}

static int kernel_failed(const mr_function* f, mr_error* err) {
    static const char crashed[] = "KernelCrashed: ", cancelled[] = "Cancelled: ";
    const char* text = wb_last_error();
    if (!strncmp(text, crashed, sizeof(crashed) - 1)) {
        kernel_crashed(f, text + sizeof(crashed) - 1, err);
    } else if (!strncmp(text, cancelled, sizeof(cancelled) - 1)) {
        mr_fail(err, MR_CANCELLED, "%s: %s", f->name, text + sizeof(cancelled) - 1);
    } else {
        mr_fail(err, MR_REMOTE, "%s: %s", f->name, text && *text ? text : "the kernel returned an error without a message");
    }
    wb_clear_error();
    return -1;
}

/* Python's TypeError for a call that does not bind: BAD_REQUEST naming the function. */
static int check_binds(const mr_function* f, uint32_t nargs, const char* label, mr_error* err) {
    if (f->builtin != FN_SLEEP || nargs == 1) return 0;
    if (nargs == 0)
        return mr_fail(err, MR_BAD_REQUEST, "%s: _sleep() missing 1 required positional argument: 'seconds'", label);
    return mr_fail(err, MR_BAD_REQUEST, "%s: _sleep() takes 1 positional argument but %u were given", label, nargs);
}

static int sleep_packed(void* self, const WBAny* args, int32_t nargs, WBAny* ret) {
    (void)self, (void)nargs, (void)ret;
    double s = args[0].v_float64;
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
    return 0;
}

/* Run a registered function (no reply written). */
static int run_builtin(const mr_function* f, const mr_arg* args, uint32_t nargs, mr_error* err) {
    if (f->builtin != FN_SLEEP) return 0; /* echo and nop compute nothing */
    const mp_node* a = args[0].node;
    if (args[0].tensor || !(is_number(a) || a->type == MP_BOOL))
        return mr_fail(err, MR_REMOTE, "%s: TypeError: the number of seconds must be a number, not %s", f->name,
                       args[0].tensor ? "DeviceTensor" : mp_type_name(a));
    (void)nargs;
    double s = a->type == MP_BOOL ? (double)a->v.i : as_double(a);
    if (isnan(s)) return mr_fail(err, MR_REMOTE, "%s: ValueError: Invalid value NaN (not a number)", f->name);
    if (s < 0) return mr_fail(err, MR_REMOTE, "%s: ValueError: sleep length must be non-negative", f->name);
    if (s > 1e12) return mr_fail(err, MR_REMOTE, "%s: OverflowError: sleep length is too large", f->name);
    /* as a guarded call, so that a CANCEL stops it after the grace period as it stops a kernel */
    WBAny seconds = {.type_index = 3 /* float */, .v_float64 = s}, ret;
    if (wb_guarded_call((void*)sleep_packed, &seconds, 1, &ret) != 0) return kernel_failed(f, err);
    return 0;
}

/* The values of a .cl kernel's call (opencl_module.c). */
static mr_cl_value* cl_values(const mr_arg* args, uint32_t n, mr_error* err) {
    mr_cl_value* out = (mr_cl_value*)mp_alloc(&S.arena, (n ? n : 1) * sizeof(mr_cl_value));
    if (!out) {
        mr_fail(err, MR_REMOTE, "out of memory");
        return NULL;
    }
    for (uint32_t i = 0; i < n; ++i) {
        out[i].node = args[i].node;
        out[i].is_tensor = args[i].tensor != NULL;
        out[i].device_type = args[i].tensor ? args[i].tensor->dl.device.device_type : 0;
        out[i].device_id = args[i].tensor ? args[i].tensor->dl.device.device_id : 0;
        out[i].data = args[i].tensor ? args[i].tensor->dl.data : NULL;
    }
    return out;
}

/* A kernel call that may have enqueued OpenCL work ended (rc: its result): wait for that work, so that an error or
   a crash belongs to the call that caused it. The call's own error (already in err) comes first, unless the wait
   found a crash. Returns rc, or -1. */
static int cl_settle_call(int rc, mr_error* err) {
    if (!mr_cl_opened()) return rc;
    static mr_error waited; /* 4 KiB: kept out of the stack */
    waited.code = 0;
    if (mr_cl_finish(-1, &waited) == 0) return rc;
    if (rc == 0 || waited.code == MR_KERNEL_CRASHED || waited.code == MR_CANCELLED) *err = waited;
    return cl_failed(err);
}

static int do_call(const mp_node* args, mr_error* err) {
    if (args->len != 2 || args->v.items[1].type != MP_ARRAY) {
        char shown[256];
        return mr_fail(err, MR_BAD_REQUEST, "request CALL takes [function, [arguments]], got %s",
                       mp_repr(args, shown, sizeof(shown), 200));
    }
    mr_function* f = (mr_function*)get_obj(&args->v.items[0], OBJ_FUNCTION, err);
    if (!f) return -1;
    const mp_node* list = &args->v.items[1];
    mr_arg* call = resolve_args(list, err);
    if (!call) return -1;
    mp_buf* b = &S.c->out;
    if (f->builtin != FN_KERNEL && f->builtin != FN_CL) {
        if (check_binds(f, list->len, "_sleep", err)) return -1;
        if (run_builtin(f, call, list->len, err)) return -1;
        if (f->builtin == FN_ECHO) {
            for (uint32_t i = 0; i < list->len; ++i)
                if (call[i].tensor)
                    return mr_fail(err, MR_BAD_REQUEST,
                                   "the function returned a value that cannot be sent back: cannot send a DeviceTensor "
                                   "over RPC: pass ints, floats, strings, bytes, remote tensors, functions or modules");
            if (list->len == 1) mp_put_node(b, &list->v.items[0]);
            else mp_put_node(b, list);
        } else {
            mp_put_nil(b);
        }
        return 0;
    }
    if (f->builtin == FN_CL) { /* enqueued behind the gate, then run in the guarded wait */
        mr_cl_value* values = cl_values(call, list->len, err);
        if (!values) return -1;
        if (mr_cl_call(f->cl, values, list->len, err)) return cl_settle_call(cl_failed(err), err);
        if (cl_settle_call(0, err)) return -1;
        mp_put_nil(b);
        return 0;
    }
    WBAny* packed = pack_args(call, list->len, err);
    if (!packed) return -1;
    WBAny ret;
    memset(&ret, 0, sizeof(ret));
    if (wb_guarded_call((void*)f->fn, packed, (int32_t)list->len, &ret) != 0) return cl_settle_call(kernel_failed(f, err), err);
    if (cl_settle_call(0, err)) return -1;
    switch (ret.type_index) {
    case TYPE_INT: mp_put_int(b, ret.v_int64); break;
    case TYPE_BOOL: mp_put_bool(b, ret.v_int64 != 0); break;
    case TYPE_FLOAT: mp_put_float(b, ret.v_float64); break;
    case TYPE_NONE: mp_put_nil(b); break;
    default:
        mr_log_info("kernel %s returned a value of FFI type %d, which is not supported; returning None", f->name,
                    ret.type_index);
        mp_put_nil(b);
    }
    return 0;
}

/* ---- tensors ---------------------------------------------------------------------------------------- */
static int check_device(const mp_node* type, const mp_node* id, mr_error* err) {
    if (type->type != MP_INT || id->type != MP_INT) {
        char a[100], b[100];
        mp_repr(type, a, sizeof(a), 40);
        mp_repr(id, b, sizeof(b), 40);
        char both[220];
        snprintf(both, sizeof(both), "[%s, %s]", a, b);
        both[80] = '\0'; /* {...!r:.80} */
        return mr_fail(err, MR_BAD_REQUEST, "a device is [device_type, device_id], two ints (e.g. [1, 0]), not %s", both);
    }
    if (type->v.i == 1 && id->v.i == 0) return 0;
    if (type->v.i == MR_CL_DEVICE_TYPE && id->v.i >= 0 && id->v.i < mr_cl_count()) return 0;
    static const char* names[17] = {NULL, "cpu", "cuda", "cuda_host", "cl", NULL, NULL, "vulkan", "metal", "vpi",
                                    "rocm", NULL, "ext_dev", NULL, NULL, "webgpu", "hexagon"};
    int64_t t = type->v.i;
    const char* name = t >= 0 && t < 17 ? names[t] : NULL;
    char what[64];
    if (name) snprintf(what, sizeof(what), "%s(%lld)", name, (long long)id->v.i);
    else snprintf(what, sizeof(what), "device_type_%lld(%lld)", (long long)t, (long long)id->v.i);
    char unknown[64] = "", have[512] = "cpu(0)";
    if (!name) snprintf(unknown, sizeof(unknown), " (unknown device type %lld)", (long long)t);
    for (int i = 0, used = 6; i < mr_cl_count() && used < (int)sizeof(have); ++i)
        used += snprintf(have + used, sizeof(have) - (size_t)used, ", cl(%d)", i);
    return mr_fail(err, MR_NO_DEVICE, "this server has no %s; it has: %s%s", what, have, unknown);
}

/* Tensor data travels little-endian (protocol.md section 6), as TVM's RPC has it: a big-endian device swaps each
   element (each component of a complex) on the way in and out. Its own inverse; nothing on little-endian ones. */
static void to_wire_order(mr_tensor* t) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    unsigned unit = t->dl.dtype.code == 5 ? t->dl.dtype.bits / 16u : t->dl.dtype.bits / 8u;
    if (t->dl.dtype.bits % 8 || unit < 2) return;
    uint8_t* p = (uint8_t*)t->dl.data;
    for (uint64_t i = 0; i + unit <= t->nbytes; i += unit)
        for (unsigned a = 0, b = unit - 1; a < b; ++a, --b) {
            uint8_t x = p[i + a];
            p[i + a] = p[i + b];
            p[i + b] = x;
        }
#else
    (void)t;
#endif
}

/* The request's bulk part (its size checked) into the tensor: a CPU tensor's memory, or an OpenCL buffer mapped for
   writing (one copy, no staging). 0, or -1 (err set, or the connection lost). */
static int fill_tensor(mr_tensor* t, mr_error* err) {
    if (t->dl.device.device_type != MR_CL_DEVICE_TYPE) {
        if (bulk_into(t->dl.data, t->nbytes)) return -1;
        to_wire_order(t);
        return 0;
    }
    if (mr_cl_ready(err) || mr_cl_settle(err)) return cl_failed(err);
    if (!t->nbytes) return 0;
    void* ptr = mr_cl_map(t->dl.device.device_id, t->dl.data, t->nbytes, 1, err);
    if (!ptr) return cl_failed(err);
    int rc = bulk_into(ptr, t->nbytes);
    mr_cl_unmap(t->dl.device.device_id, t->dl.data, ptr);
    return rc;
}

static int do_tensor_alloc(const mp_node* args, mr_error* err) {
    if (arity(args, 4, "TENSOR_ALLOC", err)) return -1;
    const mp_node* shape = &args->v.items[0];
    const mp_node* dtype = &args->v.items[1];
    if (check_device(&args->v.items[2], &args->v.items[3], err)) return -1;
    char shown[256];
    /* the shape */
    int shape_ok = shape->type == MP_ARRAY;
    for (uint32_t i = 0; shape_ok && i < shape->len; ++i) shape_ok = is_int(&shape->v.items[i]);
    if (!shape_ok)
        return mr_fail(err, MR_BAD_REQUEST, "a shape is a list of ints (e.g. [2, 3]), not %s",
                       mp_repr(shape, shown, sizeof(shown), 100));
    if (shape->len > MAX_NDIM)
        return mr_fail(err, MR_BAD_REQUEST, "a tensor has at most %d dimensions, this one %u", MAX_NDIM, shape->len);
    for (uint32_t i = 0; i < shape->len; ++i)
        if (shape->v.items[i].type != MP_INT || shape->v.items[i].v.i < 0)
            return mr_fail(err, MR_BAD_REQUEST, "tensor dimensions must be 0..2**63-1, not %s",
                           mp_repr(shape, shown, sizeof(shown), 100));
    /* the dtype */
    int dtype_ok = dtype->type == MP_ARRAY && dtype->len == 3;
    for (uint32_t i = 0; dtype_ok && i < 3; ++i) dtype_ok = is_int(&dtype->v.items[i]);
    if (!dtype_ok)
        return mr_fail(err, MR_BAD_REQUEST, "a dtype is [code, bits, lanes] (three ints, e.g. [2, 32, 1] for float32), not %s",
                       mp_repr(dtype, shown, sizeof(shown), 100));
    const mp_node* codes = &dtype->v.items[0];
    const mp_node* bitsn = &dtype->v.items[1];
    const mp_node* lanesn = &dtype->v.items[2];
    int64_t code = codes->type == MP_INT ? codes->v.i : -1;
    static const char* code_names[7] = {"int", "uint", "float", NULL, "bfloat", "complex", "bool"};
    if (code < 0 || code > 6 || !code_names[code]) {
        mp_repr(codes, shown, sizeof(shown), 0);
        return mr_fail(err, MR_BAD_REQUEST,
                       "dtype code %s is not supported; codes: 0 (int), 1 (uint), 2 (float), 4 (bfloat), 5 (complex), 6 (bool)",
                       shown);
    }
    int64_t bits = bitsn->type == MP_INT ? bitsn->v.i : -1;
    int bits_ok;
    const char* span;
    switch (code) {
    case 0: case 1: bits_ok = bits >= 1 && bits <= 64; span = "1..64"; break;
    case 2: bits_ok = bits == 8 || bits == 16 || bits == 32 || bits == 64; span = "8, 16, 32, 64"; break;
    case 4: bits_ok = bits == 16; span = "16"; break;
    case 5: bits_ok = bits == 64 || bits == 128; span = "64, 128"; break;
    default: bits_ok = bits == 1 || bits == 8; span = "1, 8"; break;
    }
    if (!bits_ok)
        return mr_fail(err, MR_BAD_REQUEST, "%s tensors of %s bits are not supported; bits: %s", code_names[code],
                       mp_repr(bitsn, shown, sizeof(shown), 0), span);
    int64_t lanes = lanesn->type == MP_INT ? lanesn->v.i : -1;
    if (lanes < 1 || lanes > MAX_LANES)
        return mr_fail(err, MR_BAD_REQUEST, "dtype lanes must be 1..%d, not %s", MAX_LANES,
                       mp_repr(lanesn, shown, sizeof(shown), 0));
    char dname[24];
    if (code == 6) snprintf(dname, sizeof(dname), "bool");
    else snprintf(dname, sizeof(dname), "%s%lld", code_names[code], (long long)bits);
    if (lanes != 1) snprintf(dname + strlen(dname), sizeof(dname) - strlen(dname), "x%lld", (long long)lanes);
    /* the size: prod(shape) * ceil(bits * lanes / 8), exactly, or "too large" */
    uint64_t itemsize = (uint64_t)(bits * lanes + 7) / 8, nbytes = itemsize;
    int overflow = 0, zero = 0;
    for (uint32_t i = 0; i < shape->len; ++i) {
        uint64_t d = (uint64_t)shape->v.items[i].v.i;
        if (d == 0) zero = 1;
        else if (nbytes > UINT64_MAX / d) overflow = 1;
        else nbytes *= d;
    }
    if (zero) nbytes = 0, overflow = 0;
    char tuple[256]; /* the shape as Python shows a tuple */
    size_t used = (size_t)snprintf(tuple, sizeof(tuple), "(");
    for (uint32_t i = 0; i < shape->len && used < sizeof(tuple); ++i)
        used += (size_t)snprintf(tuple + used, sizeof(tuple) - used, "%s%lld", i ? ", " : "",
                                 (long long)shape->v.items[i].v.i);
    if (used < sizeof(tuple)) snprintf(tuple + used, sizeof(tuple) - used, shape->len == 1 ? ",)" : ")");
    if (overflow || nbytes > MAX_TENSOR_BYTES) {
        char size[64];
        if (overflow) snprintf(size, sizeof(size), "more than %llu", (unsigned long long)UINT64_MAX);
        else snprintf(size, sizeof(size), "%llu", (unsigned long long)nbytes);
        return mr_fail(err, MR_BAD_REQUEST, "a %s tensor of shape %s needs %s bytes, over the %llu-byte limit of one "
                                            "tensor; split it", dname, tuple, size, (unsigned long long)MAX_TENSOR_BYTES);
    }
    uint64_t quota = S.cfg->max_tensor_bytes;
    if (quota && (nbytes > quota || S.tensor_bytes > quota - nbytes)) {
        char what[400], sz[32];
        snprintf(what, sizeof(what), "a %s tensor of shape %s (%s)", dname, tuple, mr_format_size(nbytes, sz, sizeof(sz)));
        return mr_quota_tensor_bytes(err, what, quota, S.tensor_bytes);
    }
    mr_tensor* t = (mr_tensor*)calloc(1, sizeof(mr_tensor) + (shape->len ? shape->len : 1) * sizeof(int64_t));
    if (!t) return mr_fail(err, MR_REMOTE, "out of memory");
    t->kind = OBJ_TENSOR;
    t->nbytes = nbytes;
    int32_t device_type = (int32_t)args->v.items[2].v.i, device_id = (int32_t)args->v.items[3].v.i;
    if (device_type == MR_CL_DEVICE_TYPE) { /* one cl_mem, the DLTensor's data (docs/protocol.md section 14) */
        if (mr_cl_alloc(device_id, nbytes, S.bulk_left == 0, &t->dl.data, err)) {
            free(t);
            return cl_failed(err);
        }
    } else {
        t->maplen = nbytes ? (size_t)nbytes : 1;
        t->dl.data = mmap(NULL, t->maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    if (device_type != MR_CL_DEVICE_TYPE && t->dl.data == MAP_FAILED) {
        int e = errno;
        free(t);
        return mr_fail(err, MR_REMOTE, "cannot allocate a %s tensor of %llu bytes on this device (%s); free tensors "
                                       "or use a smaller one", dname, (unsigned long long)nbytes, strerror(e));
    }
#ifdef MADV_HUGEPAGE
    if (t->maplen && nbytes >= HUGE_PAGE) madvise(t->dl.data, t->maplen, MADV_HUGEPAGE); /* fewer page faults */
#endif
    t->dl.device.device_type = device_type;
    t->dl.device.device_id = device_id;
    t->dl.ndim = (int32_t)shape->len;
    t->dl.dtype.code = (uint8_t)code;
    t->dl.dtype.bits = (uint8_t)bits;
    t->dl.dtype.lanes = (uint16_t)lanes;
    for (uint32_t i = 0; i < shape->len; ++i) t->shape[i] = shape->v.items[i].v.i;
    t->dl.shape = t->shape;
    t->dl.strides = NULL;
    t->dl.byte_offset = 0;
    snprintf(t->dtype, sizeof(t->dtype), "%s", dname);
    S.tensors++;
    S.tensor_bytes += nbytes;
    if (S.bulk_left) {
        if (S.bulk_left != nbytes) {
            tensor_release(t);
            return mr_fail(err, MR_BAD_REQUEST, "expected %llu bytes of data, the request carries %llu",
                           (unsigned long long)nbytes, (unsigned long long)S.bulk_left);
        }
        if (fill_tensor(t, err)) {
            tensor_release(t);
            return -1;
        }
    }
    uint64_t id = table_add((mr_obj*)t);
    if (!id) {
        tensor_release(t);
        return mr_fail(err, MR_REMOTE, "out of memory");
    }
    mp_put_handle(&S.c->out, MP_EXT_TENSOR, id);
    return 0;
}

static int do_tensor_write(const mp_node* args, mr_error* err) {
    if (arity(args, 1, "TENSOR_WRITE", err)) return -1;
    mr_tensor* t = (mr_tensor*)get_obj(&args->v.items[0], OBJ_TENSOR, err);
    if (!t) return -1;
    if (!S.bulk_left)
        return mr_fail(err, MR_BAD_REQUEST, "TENSOR_WRITE carries no data; the tensor holds %llu bytes",
                       (unsigned long long)t->nbytes);
    if (S.bulk_left != t->nbytes)
        return mr_fail(err, MR_BAD_REQUEST, "expected %llu bytes of data, the request carries %llu",
                       (unsigned long long)t->nbytes, (unsigned long long)S.bulk_left);
    if (fill_tensor(t, err)) return -1;
    mp_put_nil(&S.c->out);
    return 0;
}

static int do_tensor_read(const mp_node* args, mr_error* err) {
    if (arity(args, 1, "TENSOR_READ", err)) return -1;
    mr_tensor* t = (mr_tensor*)get_obj(&args->v.items[0], OBJ_TENSOR, err);
    if (!t) return -1;
    if (t->dl.device.device_type == MR_CL_DEVICE_TYPE) { /* sent from a mapping, unmapped once it is sent */
        void* ptr = NULL;
        if (mr_cl_ready(err) || mr_cl_settle(err)) return cl_failed(err);
        if (t->nbytes && !(ptr = mr_cl_map(t->dl.device.device_id, t->dl.data, t->nbytes, 0, err))) return cl_failed(err);
        mp_put_uint(&S.c->out, t->nbytes);
        S.reply_bulk = ptr;
        S.reply_bulk_len = t->nbytes;
        S.cl_mapped_device = t->dl.device.device_id;
        S.cl_mapped_mem = t->dl.data;
        S.cl_mapped_ptr = ptr;
        return 0;
    }
    mp_put_uint(&S.c->out, t->nbytes);
    S.reply_bulk = t->dl.data;
    S.reply_bulk_len = t->nbytes;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    to_wire_order(t);
    S.reply_swapped = t;
#endif
    return 0;
}

static int do_free(const mp_node* args, mr_error* err) {
    (void)err;
    for (uint32_t i = 0; i < args->len; ++i) {
        const mp_node* h = &args->v.items[i];
        if (h->type != MP_EXT) continue;
        mr_obj* obj = table_get(h->v.u);
        if (!obj || obj->kind != h->ext) continue; /* unknown ids and mistyped handles are ignored */
        table_remove(h->v.u);
        obj_release(obj);
    }
    if (S.cap > 64 && S.live * 8 < S.cap) table_grow(); /* shrink after many frees: memory stays flat */
    mp_put_nil(&S.c->out);
    return 0;
}

/* ---- TIME_EVAL ---------------------------------------------------------------------------------------- */
/* Between two repeats: 1 (and the frame consumed) if the client sent CANCEL, or left; anything else
   that came stays buffered for the loop.  A CANCEL is one 17-byte write, so its header is whole. */
static int cancel_pending(void) {
    mr_conn* c = S.c;
    if (S.no_cancel) return 0;
    if (c->end - c->start < MR_HEADER) {
        struct pollfd p = {c->rfd, POLLIN, 0};
        if (poll(&p, 1, 0) <= 0) return 0;
        if (conn_fill(c, MR_HEADER)) return 1; /* the client left: stop as well */
    }
    const uint8_t* h = c->buf + c->start;
    if ((h[4] | h[5] << 8) != K_CANCEL) return 0;
    size_t ctrl_len = (size_t)h[0] | (size_t)h[1] << 8; /* "[]": one byte */
    if (conn_fill(c, MR_HEADER + ctrl_len)) return 1;
    c->start += MR_HEADER + ctrl_len;
    return 1;
}

typedef struct {
    const char* name;
    double value, low, high;
    int integral;
} time_option;

static int check_time_options(const mp_node* opts, time_option* o, const char** preproc, mr_error* err) {
    char shown[256];
    if (opts->type != MP_MAP) return mr_fail(err, MR_BAD_REQUEST, "time_evaluator options must be a map, not %s", mp_type_name(opts));
    static const char* known[] = {"cache_flush_bytes", "cooldown_interval_ms", "limit_zero_time_iterations",
                                  "min_repeat_ms", "number", "repeat", "repeats_to_cooldown"};
    /* unknown keys, as sorted(map(str, unknown)) */
    const char* unknown[64];
    char* texts[64];
    int n_unknown = 0;
    for (uint32_t i = 0; i < opts->len && n_unknown < 64; ++i) {
        const mp_node* k = &opts->v.items[2 * i];
        int ok = 0;
        if (k->type == MP_STR) {
            ok = strcmp(k->v.s, "f_preproc") == 0 && strlen(k->v.s) == k->len;
            for (int j = 0; j < 7 && !ok; ++j) ok = strcmp(k->v.s, known[j]) == 0 && strlen(k->v.s) == k->len;
        }
        if (ok) continue;
        char* t = (char*)mp_alloc(&S.arena, 260);
        if (!t) return mr_fail(err, MR_REMOTE, "out of memory");
        if (k->type == MP_STR) snprintf(t, 260, "%s", k->v.s);
        else py_repr_bytes(k->v.s, k->len, t, 260);
        int dup = 0;
        for (int j = 0; j < n_unknown; ++j) dup |= strcmp(unknown[j], t) == 0;
        if (!dup) unknown[n_unknown] = texts[n_unknown] = t, n_unknown++;
    }
    if (n_unknown) {
        qsort(texts, (size_t)n_unknown, sizeof(char*), cmp_str);
        char list[1024] = "[";
        size_t used = 1;
        for (int i = 0; i < n_unknown && used < sizeof(list); ++i) {
            py_repr_str(texts[i], strlen(texts[i]), shown, sizeof(shown));
            used += (size_t)snprintf(list + used, sizeof(list) - used, "%s%s", i ? ", " : "", shown);
        }
        if (used < sizeof(list)) snprintf(list + used, sizeof(list) - used, "]");
        return mr_fail(err, MR_BAD_REQUEST,
                       "unknown time_evaluator options: %s; known: ['cache_flush_bytes', 'cooldown_interval_ms', "
                       "'limit_zero_time_iterations', 'min_repeat_ms', 'number', 'repeat', 'repeats_to_cooldown'] "
                       "and f_preproc", list);
    }
    for (int i = 0; i < 7; ++i) {
        const mp_node* v = mp_map_get(opts, o[i].name);
        if (!v) continue; /* the default */
        if (v->type == MP_BOOL || !is_number(v) || (o[i].integral && !is_int(v)))
            return mr_fail(err, MR_BAD_REQUEST, "time_evaluator option %s must be %s, not %s", o[i].name,
                           o[i].integral ? "an int" : "a number", mp_repr(v, shown, sizeof(shown), 60));
        double x = as_double(v);
        if (!(isfinite(x) && o[i].low <= x && x <= o[i].high))
            return mr_fail(err, MR_BAD_REQUEST, "time_evaluator option %s must be in %.0f..%.0f, not %s", o[i].name,
                           o[i].low, o[i].high, mp_repr(v, shown, sizeof(shown), 0));
        o[i].value = x;
    }
    const mp_node* pre = mp_map_get(opts, "f_preproc");
    *preproc = NULL;
    if (pre) {
        int falsy = pre->type == MP_NIL || ((pre->type == MP_BOOL || pre->type == MP_INT) && pre->v.i == 0) ||
                    (pre->type == MP_FLOAT && pre->v.f == 0) ||
                    ((pre->type == MP_STR || pre->type == MP_BIN || pre->type == MP_ARRAY || pre->type == MP_MAP) &&
                     pre->len == 0);
        if (!falsy) {
            if (pre->type != MP_STR)
                return mr_fail(err, MR_BAD_REQUEST,
                               "time_evaluator option f_preproc names a registered function (a str), not %s",
                               mp_repr(pre, shown, sizeof(shown), 60));
            *preproc = pre->v.s;
        }
    }
    return 0;
}

/* ns that `number` calls of f take; -1 with err when one fails. */
/* One call of f (a kernel of a library or of a .cl module, or a registered function), nothing waited for. */
static int run_once(const mr_function* f, const mr_arg* args, uint32_t nargs, const WBAny* packed,
                    const mr_cl_value* values, mr_error* err) {
    if (f->builtin == FN_CL) return mr_cl_call(f->cl, values, nargs, err) ? cl_failed(err) : 0;
    if (f->builtin != FN_KERNEL) return run_builtin(f, args, nargs, err);
    WBAny ret;
    if (wb_guarded_call((void*)f->fn, packed, (int32_t)nargs, &ret) != 0) return kernel_failed(f, err);
    return 0;
}

/* `number` calls on an OpenCL device, timed as TVM's OpenCL timer: the sum of the launches' END - START. */
static int timed_run_cl(const mr_function* f, const mr_arg* args, uint32_t nargs, const WBAny* packed,
                        const mr_cl_value* values, int device_id, int64_t number, int64_t flush_bytes, double* seconds,
                        mr_error* err) {
    if (mr_cl_ready(err) || mr_cl_check_device(device_id, err)) return cl_failed(err);
    if (flush_bytes > 0 && wb_flush_cache(flush_bytes) != 0)
        return mr_fail(err, MR_REMOTE, "cannot allocate the %lld-byte buffer for cache_flush_bytes on this device",
                       (long long)flush_bytes);
    mr_cl_timer_begin();
    int rc = 0;
    for (int64_t i = 0; i < number && rc == 0; ++i) rc = run_once(f, args, nargs, packed, values, err);
    rc = cl_settle_call(rc, err);
    static mr_error timer_err;
    int64_t ns = 0;
    if (mr_cl_timer_end(&ns, &timer_err) && rc == 0) {
        *err = timer_err;
        rc = -1;
    }
    *seconds = (double)ns / 1e9;
    return rc;
}

static int timed_run(const mr_function* f, const mr_arg* args, uint32_t nargs, const WBAny* packed, int64_t number,
                     int64_t flush_bytes, double* seconds, mr_error* err) {
    int64_t elapsed = 0;
    if (f->builtin == FN_CL) {
        const mr_cl_value* values = (const mr_cl_value*)packed;
        if (flush_bytes > 0 && wb_flush_cache(flush_bytes) != 0)
            return mr_fail(err, MR_REMOTE, "cannot allocate the %lld-byte buffer for cache_flush_bytes on this device",
                           (long long)flush_bytes);
        int64_t start = mr_now_ns();
        int rc = 0;
        for (int64_t i = 0; i < number && rc == 0; ++i) rc = run_once(f, args, nargs, NULL, values, err);
        if (cl_settle_call(rc, err)) return -1;
        elapsed = mr_now_ns() - start;
    } else if (f->builtin == FN_KERNEL) {
        int rc = flush_bytes > 0
                     ? wb_time_calls_flushed((void*)f->fn, packed, (int32_t)nargs, number, flush_bytes, &elapsed)
                     : wb_time_calls((void*)f->fn, packed, (int32_t)nargs, number, &elapsed);
        if (rc != 0) return kernel_failed(f, err);
    } else {
        if (flush_bytes > 0 && wb_flush_cache(flush_bytes) != 0)
            return mr_fail(err, MR_REMOTE, "cannot allocate the %lld-byte buffer for cache_flush_bytes on this device",
                           (long long)flush_bytes);
        int64_t start = mr_now_ns();
        for (int64_t i = 0; i < number; ++i)
            if (run_builtin(f, args, nargs, err)) return -1;
        elapsed = mr_now_ns() - start;
    }
    *seconds = (double)elapsed / 1e9;
    return 0;
}

static int do_time_eval(const mp_node* args, mr_error* err) {
    if (arity(args, 4, "TIME_EVAL", err)) return -1;
    const mp_node* where = &args->v.items[1];
    char shown[256];
    if (where->type != MP_ARRAY || where->len != 2)
        return mr_fail(err, MR_BAD_REQUEST, "TIME_EVAL: the device is [device_type, device_id], not %s",
                       mp_repr(where, shown, sizeof(shown), 80));
    if (check_device(&where->v.items[0], &where->v.items[1], err)) return -1;
    mr_function* f = (mr_function*)get_obj(&args->v.items[0], OBJ_FUNCTION, err);
    if (!f) return -1;
    time_option o[7] = {
        {"number", 10, 1, INT32_MAX_, 1},
        {"repeat", 1, 1, INT32_MAX_, 1},
        {"min_repeat_ms", 0, 0, INT32_MAX_, 0},
        {"limit_zero_time_iterations", 100, 0, INT32_MAX_, 1},
        {"cooldown_interval_ms", 0, 0, INT32_MAX_, 0},
        {"repeats_to_cooldown", 1, 1, INT32_MAX_, 1},
        {"cache_flush_bytes", 0, 0, MAX_CACHE_FLUSH_BYTES, 1},
    };
    const char* preproc_name;
    if (check_time_options(&args->v.items[2], o, &preproc_name, err)) return -1;
    const mp_node* list = &args->v.items[3];
    if (list->type != MP_ARRAY)
        return mr_fail(err, MR_BAD_REQUEST, "TIME_EVAL: the arguments are a list, not %s", mp_type_name(list));
    mr_arg* values = resolve_args(list, err);
    if (!values) return -1;
    uint32_t nargs = list->len;
    mr_function preproc = {OBJ_FUNCTION, FN_NOP, NULL, preproc_name, NULL};
    int has_preproc = 0;
    if (preproc_name) {
        int builtin = find_registered(preproc_name, err);
        if (builtin < 0) return -1;
        preproc.builtin = builtin;
        char label[300];
        snprintf(label, sizeof(label), "f_preproc %s", py_repr_str(preproc_name, strlen(preproc_name), shown, sizeof(shown)));
        if (check_binds(&preproc, nargs, label, err)) return -1;
        has_preproc = 1;
    }
    WBAny* packed = NULL;
    mr_cl_value* cl = NULL;
    if (f->builtin == FN_KERNEL) {
        packed = pack_args(values, nargs, err);
        if (!packed) return -1;
    } else if (f->builtin == FN_CL) {
        cl = cl_values(values, nargs, err);
        if (!cl) return -1;
    } else if (check_binds(f, nargs, "_sleep", err)) {
        return -1;
    }
    int64_t number = (int64_t)o[0].value, repeat = (int64_t)o[1].value;
    double min_repeat_ms = o[2].value, cooldown_ms = o[4].value;
    int64_t limit_zero = (int64_t)o[3].value, repeats_to_cooldown = (int64_t)o[5].value;
    int64_t flush_bytes = (int64_t)o[6].value;
    double seconds = 0.0;
    /* an OpenCL device times on its queue's profiling events (as TVM's OpenCL timer); the CPU by the clock */
    int cl_device = where->v.items[0].v.i == MR_CL_DEVICE_TYPE ? (int)where->v.items[1].v.i : -1;
#define TIMED_RUN(n, flush)                                                                                      \
    (cl_device >= 0 ? timed_run_cl(f, values, nargs, packed, cl, cl_device, (n), (flush), &seconds, err)         \
                    : timed_run(f, values, nargs, cl ? (const WBAny*)(const void*)cl : packed, (n), (flush), &seconds, err))
    /* one warm-up call (page faults, lazy binding, caches), without the cache flush */
    if (TIMED_RUN(1, 0)) return -1;
    mp_buf* b = &S.c->out;
    /* the calls each repeat made (min_repeat_ms may grow number): sent after the timings, as one array */
    int64_t* counts = (int64_t*)mp_alloc(&S.arena, (size_t)repeat * sizeof(int64_t));
    if (!counts) return mr_fail(err, MR_REMOTE, "out of memory for %lld results", (long long)repeat);
    mp_put_array(b, (uint32_t)repeat + 1);
    for (int64_t i = 0; i < repeat; ++i) {
        if (has_preproc && run_builtin(&preproc, values, nargs, err)) return -1;
        double duration_ms = 0.0;
        int64_t zero_times = 0;
        for (;;) {
            if (duration_ms > 0.0) {
                double grown = min_repeat_ms / (duration_ms / (double)number) + 1;
                if (grown < (double)number * 1.618) grown = (double)number * 1.618;
                number = grown >= (double)MAX_NUMBER ? MAX_NUMBER : (int64_t)grown;
            }
            if (TIMED_RUN(number, flush_bytes)) return -1;
            if (seconds == 0) zero_times++;
            duration_ms = seconds * 1e3;
            if (duration_ms >= min_repeat_ms || zero_times >= limit_zero || number >= MAX_NUMBER) break;
        }
        mp_put_float(b, seconds / (double)number);
        counts[i] = number;
        if (i + 1 < repeat && cancel_pending())
            return mr_fail(err, MR_CANCELLED, "TIME_EVAL of %s cancelled by the client after %lld of %lld repeats",
                           f->name, (long long)(i + 1), (long long)repeat);
        if (b->failed) return mr_fail(err, MR_REMOTE, "out of memory for %lld results", (long long)repeat);
        if (cooldown_ms > 0 && (i + 1) % repeats_to_cooldown == 0 && i + 1 < repeat) {
            double secs = cooldown_ms / 1e3;
            struct timespec ts = {(time_t)secs, (long)((secs - (double)(time_t)secs) * 1e9)};
            while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
            }
        }
    }
#undef TIMED_RUN
    mp_put_array(b, (uint32_t)repeat);
    for (int64_t i = 0; i < repeat; ++i) mp_put_int(b, counts[i]);
    if (b->failed) return mr_fail(err, MR_REMOTE, "out of memory for %lld results", (long long)repeat);
    return 0;
}

/* ---- the loop --------------------------------------------------------------------------------------- */
typedef int (*handler_fn)(const mp_node* args, mr_error* err);
static const handler_fn HANDLERS[] = {do_ping, do_upload, do_download, do_remove, do_listdir, do_load_module,
                                      do_link_module, do_get_function, do_module_function, do_call, do_tensor_alloc,
                                      do_tensor_write, do_tensor_read, do_free, do_time_eval, do_system_lib};

/* Serve one request whose control part is `ctrl`; the reply is in S.c->out (begun). */
static int dispatch(int kind, const mp_node* ctrl, mr_error* err) {
    if (kind == K_CANCEL) return 0; /* nothing runs: its request already answered (section 12) */
    if (kind < K_PING || kind > K_SYSTEM_LIB)
        return mr_fail(err, MR_BAD_REQUEST, "unknown request kind %d; this server speaks protocol version 1", kind);
    if (ctrl->type != MP_ARRAY)
        return mr_fail(err, MR_BAD_REQUEST, "request %s: arguments must be a list, not %s", kind_name(kind),
                       mp_type_name(ctrl));
    return HANDLERS[kind - K_PING](ctrl, err);
}

/* Send the prepared reply (and its bulk part). */
static int send_reply(void) {
    mr_conn* c = S.c;
    int rc;
    S.shared->sending = 1;
    if (S.reply_fd >= 0) {
        rc = conn_finish(c, K_OK, NULL, S.reply_bulk_len);
        if (rc == 0 && S.reply_bulk_len) rc = conn_sendfile(c, S.reply_fd, S.reply_bulk_len);
    } else {
        rc = conn_finish(c, K_OK, S.reply_bulk, S.reply_bulk_len);
    }
    S.shared->sending = 0;
    return rc;
}

static void reply_done(void) {
    if (S.cl_mapped_ptr) mr_cl_unmap(S.cl_mapped_device, S.cl_mapped_mem, S.cl_mapped_ptr); /* its reply is sent */
    S.cl_mapped_ptr = S.cl_mapped_mem = NULL;
    if (S.reply_swapped) to_wire_order(S.reply_swapped); /* back to the device's order */
    S.reply_swapped = NULL;
    if (S.reply_fd >= 0) close(S.reply_fd);
    if (S.reply_unlink) {
        unlink(S.reply_unlink);
        free(S.reply_unlink);
    }
    S.reply_fd = -1;
    S.reply_unlink = NULL;
    S.reply_bulk = NULL;
    S.reply_bulk_len = 0;
}

/* A failed read or write: EBADF means the code the session ran closed our descriptor. */
static void connection_failed(void) {
    if (S.c->err == EBADF) {
        mr_log_error("the session's connection was closed by the code it ran");
        _exit(MR_EXIT_LOST);
    }
}

/* ---- what tvm.c serves TVM's packets with (core.h) ------------------------------------------------------ */
int mr_worker_request(int kind, const mp_node* args, uint64_t bulk_len, mr_error* err) {
    S.bulk_left = bulk_len;
    S.lost = 0;
    err->code = 0;
    conn_begin(S.c);
    int rc = dispatch(kind, args, err);
    if (S.lost || bulk_drop()) return MR_LOST;
    if (rc == 0 && S.c->out.failed) rc = mr_fail(err, MR_REMOTE, "out of memory for the reply");
    return rc;
}

const uint8_t* mr_worker_reply(size_t* len) {
    *len = S.c->out.len > MR_HEADER ? S.c->out.len - MR_HEADER : 0;
    return S.c->out.data + MR_HEADER;
}

int mr_worker_reply_file(uint64_t* len) {
    *len = S.reply_bulk_len;
    return S.reply_fd;
}

void mr_worker_reply_done(void) { reply_done(); }
int mr_worker_ending(void) { return S.end_session; }
mp_arena* mr_worker_arena(void) { return &S.arena; }
void mr_worker_connection_failed(void) { connection_failed(); }

int mr_worker_object_kind(uint64_t id) {
    mr_obj* obj = table_get(id);
    return obj ? obj->kind : 0;
}

int mr_worker_tensor(uint64_t id, mr_tensor_info* out, mr_error* err) {
    mp_node h = {MP_EXT, MP_EXT_TENSOR, 0, {0}};
    h.v.u = id;
    mr_tensor* t = (mr_tensor*)get_obj(&h, OBJ_TENSOR, err);
    if (!t) return -1;
    out->data = (uint8_t*)t->dl.data;
    out->nbytes = t->nbytes;
    out->device_type = t->dl.device.device_type;
    out->device_id = t->dl.device.device_id;
    out->ndim = t->dl.ndim;
    out->code = t->dl.dtype.code;
    out->bits = t->dl.dtype.bits;
    out->lanes = t->dl.dtype.lanes;
    out->shape = t->shape;
    return 0;
}

uint64_t mr_worker_add_view(uint64_t base, uint64_t byte_offset, int32_t ndim, const int64_t* shape, uint8_t code,
                            uint8_t bits, uint16_t lanes, uint64_t nbytes) {
    mr_tensor* b = (mr_tensor*)table_get(base);
    if (!b || b->kind != OBJ_TENSOR || ndim < 0 || ndim > MAX_NDIM) return 0;
    mr_tensor* t = (mr_tensor*)calloc(1, sizeof(mr_tensor) + (ndim ? (size_t)ndim : 1) * sizeof(int64_t));
    if (!t) return 0;
    t->kind = OBJ_TENSOR;
    t->borrowed = 1;
    t->nbytes = nbytes;
    t->dl = b->dl;
    t->dl.data = (uint8_t*)b->dl.data + byte_offset;
    t->dl.ndim = ndim;
    t->dl.dtype.code = code;
    t->dl.dtype.bits = bits;
    t->dl.dtype.lanes = lanes;
    for (int32_t i = 0; i < ndim; ++i) t->shape[i] = shape[i];
    t->dl.shape = t->shape;
    t->dl.strides = NULL;
    t->dl.byte_offset = 0;
    snprintf(t->dtype, sizeof(t->dtype), "view");
    uint64_t id = table_add((mr_obj*)t);
    if (!id) free(t);
    return id;
}

void mr_worker_drop_view(uint64_t id) {
    mr_tensor* t = (mr_tensor*)table_get(id);
    if (!t || t->kind != OBJ_TENSOR || !t->borrowed) return;
    table_remove(id);
    free(t);
}

int mr_worker_check_device(int64_t device_type, int64_t device_id, mr_error* err) {
    if (device_type == MR_CL_DEVICE_TYPE && device_id >= 0 && device_id < mr_cl_count())
        return mr_fail(err, MR_NO_DEVICE, "minrpc serves its OpenCL devices to workbench's clients only; a session of "
                                          "TVM's protocol has cpu(0): connect with workbench.rpc.connect for cl(%lld)",
                       (long long)device_id);
    mp_node type = {MP_INT, 0, 0, {0}}, id = {MP_INT, 0, 0, {0}};
    type.v.i = device_type;
    id.v.i = device_id;
    return check_device(&type, &id, err);
}

static int send_error_closing(int code, const char* msg) {
    char text[MR_ERR_CAP + 64];
    snprintf(text, sizeof(text), "%s; closing this connection", msg);
    mr_log_info("closing session: %s", text);
    S.shared->sending = 1;
    int rc = conn_send_error(S.c, code, text);
    S.shared->sending = 0;
    return rc;
}

static void serve_requests(mr_conn* c, mr_shared* shared, double session_timeout, const uint8_t* proof);

void mr_worker_run(mr_conn* c, mr_workspace* ws, mr_shared* shared, const mr_config* cfg, double session_timeout,
                   const uint8_t* proof, int tvm) {
    memset(&S, 0, sizeof(S));
    S.cfg = cfg;
    S.c = c;
    S.ws = ws;
    S.shared = shared;
    S.reply_fd = -1;
    ws_set_quotas(ws, cfg->max_workspace_bytes, cfg->max_workspace_files);
    /* a kernel still running MR_CANCEL_GRACE_MS after the client's CANCEL (or its leaving) is stopped */
    if (wb_guard_watch(c->rfd, MR_CANCEL_GRACE_MS) != 0)
        mr_log_info("cannot start the call watcher: a kernel that never returns cannot be cancelled");
    if (tvm) {
        S.no_cancel = 1;
        mr_tvm_serve(c, shared);
    } else {
        serve_requests(c, shared, session_timeout, proof);
    }
    wb_guard_watch(-1, 0);
}

static void serve_requests(mr_conn* c, mr_shared* shared, double session_timeout, const uint8_t* proof) {
    const mr_config* cfg = S.cfg;
    static mr_error err; /* 4 KiB: kept out of the stack of kernels */

    conn_begin(c);
    mr_put_session_info(&c->out, cfg, session_timeout, proof);
    shared->sending = 1;
    int rc = conn_finish(c, K_OK, NULL, 0);
    shared->sending = 0;
    if (rc) {
        connection_failed();
        return;
    }
    for (;;) {
        mp_arena_reset(&S.arena);
        shared->idle_since_ns = mr_now_ns();
        shared->activity++; /* odd: waiting for a request */
        if (conn_fill(c, MR_HEADER)) {
            connection_failed();
            return; /* the client left (or its connection failed): the session ends quietly */
        }
        const uint8_t* h = c->buf + c->start;
        uint64_t ctrl_len = (uint64_t)h[0] | (uint64_t)h[1] << 8 | (uint64_t)h[2] << 16 | (uint64_t)h[3] << 24;
        int kind = h[4] | h[5] << 8;
        int flags = h[6] | h[7] << 8;
        uint64_t bulk_len = 0;
        for (int i = 7; i >= 0; --i) bulk_len = (bulk_len << 8) | h[8 + i];
        char text[256];
        if (ctrl_len > MR_MAX_CTRL) {
            snprintf(text, sizeof(text), "control part of %llu bytes is over the %llu-byte limit (is the peer speaking "
                     "the workbench protocol?)", (unsigned long long)ctrl_len, (unsigned long long)MR_MAX_CTRL);
            send_error_closing(MR_TOO_LARGE, text);
            return;
        }
        if (bulk_len > MR_MAX_BULK) {
            snprintf(text, sizeof(text), "bulk part of %llu bytes is over the %llu-byte limit",
                     (unsigned long long)bulk_len, (unsigned long long)MR_MAX_BULK);
            send_error_closing(MR_TOO_LARGE, text);
            return;
        }
        c->start += MR_HEADER;
        const uint8_t* data;
        uint8_t* big = NULL;
        if (ctrl_len <= c->cap) {
            if (conn_fill(c, (size_t)ctrl_len)) {
                connection_failed();
                return;
            }
            data = c->buf + c->start;
            c->start += (size_t)ctrl_len;
        } else {
            big = (uint8_t*)malloc((size_t)ctrl_len);
            if (!big) {
                send_error_closing(MR_TOO_LARGE, "the server is out of memory for this control part");
                return;
            }
            if (conn_read_exact(c, big, ctrl_len)) {
                free(big);
                connection_failed();
                return;
            }
            data = big;
        }
        shared->activity++; /* even: serving */
        mp_node* ctrl;
        char perr[512];
        int parsed = mp_parse(data, (size_t)ctrl_len, &S.arena, &ctrl, perr, sizeof(perr));
        free(big);
        if (parsed) {
            send_error_closing(MR_PROTOCOL, perr);
            return;
        }
        S.bulk_left = bulk_len;
        S.lost = 0;
        err.code = 0;
        conn_begin(c);
        rc = dispatch(kind, ctrl, &err);
        if (S.lost || bulk_drop()) { /* the rest of the bulk part is read before any reply */
            reply_done();
            connection_failed();
            return;
        }
        if (flags & MR_FLAG_NO_REPLY) {
            if (rc) mr_log_info("request %d failed: %s", kind, err.msg);
            reply_done();
            continue;
        }
        if (rc == 0 && c->out.failed) rc = mr_fail(&err, MR_REMOTE, "out of memory for the reply");
        if (rc) {
            S.shared->sending = 1;
            rc = conn_send_error(c, err.code, err.msg);
            S.shared->sending = 0;
            if (S.end_session) {
                reply_done();
                return;
            }
        } else {
            rc = send_reply();
        }
        reply_done();
        if (rc) {
            connection_failed();
            return;
        }
    }
}
