/*
 * minrpc: a small native session server speaking docs/protocol.md (version 1).
 *
 * This header is the contract between minrpc's source files:
 *   main.c     options, TCP listener or stdio, fork per session, tracker loop   (core)
 *   session.c  handshake, request loop, files, tensors, modules, calls, timing  (core)
 *   msgpack.c  the msgpack subset of protocol.md section 4                       (core)
 *              (the core splits these further: requests.c, conn.c, workspace.c, throttle.c; core.h
 *              declares what they share)
 *   sha256.c   SHA-256 and HMAC-SHA256                                          (device)
 *   elf.c      kernel and context-slot listing, ELF kind checks                  (device)
 *   tar.c      .tar modules: members checked, archive written, linked with cc    (device)
 *   tracker.c  registration with a (TVM-compatible) tracker                      (device)
 *   opencl.c, opencl_module.c  OpenCL devices, .cl and TVM opencl modules (opencl.h; the loader is dlopen'ed)
 * and ../kernel_runtime.{c,h}: the kernel-ABI runtime shared with the Python
 * server's shim (error setter, context slots, thread pool, workspaces, timing).
 *
 * Build (what workbench.native.build_minrpc runs):
 *   cc -std=gnu99 -O2 -D_GNU_SOURCE -pthread -rdynamic -I<native> \
 *      <native>/minrpc/[*].c <native>/kernel_runtime.c -ldl -lm -o minrpc
 * Compile-time macros: MINRPC_TARGET (the device's triple, e.g. "aarch64-linux-gnu";
 * default guessed from the compiler's predefined macros).
 */
#ifndef MINRPC_H
#define MINRPC_H

#include <stddef.h>
#include <stdint.h>

/* The device's target triple: -DMINRPC_TARGET=..., else from the compiler's predefined macros. */
#ifndef MINRPC_TARGET
#if defined(__x86_64__)
#define MINRPC_TARGET "x86_64-linux-gnu"
#elif defined(__aarch64__)
#define MINRPC_TARGET "aarch64-linux-gnu"
#elif defined(__arm__) && defined(__ARM_PCS_VFP)
#define MINRPC_TARGET "arm-linux-gnueabihf"
#elif defined(__arm__)
#define MINRPC_TARGET "arm-linux-gnueabi"
#elif defined(__i386__)
#define MINRPC_TARGET "i686-linux-gnu"
#elif defined(__riscv) && __riscv_xlen == 64
#define MINRPC_TARGET "riscv64-linux-gnu"
#elif defined(__powerpc64__) && defined(__LITTLE_ENDIAN__)
#define MINRPC_TARGET "powerpc64le-linux-gnu"
#elif defined(__s390x__)
#define MINRPC_TARGET "s390x-linux-gnu"
#else
#define MINRPC_TARGET "unknown-linux-gnu"
#endif
#endif


/* Error codes: docs/protocol.md section 7 (workbench.errors). */
enum {
    MR_OK = 0,
    MR_PROTOCOL = 1,
    MR_AUTH = 2,
    MR_KEY_MISMATCH = 3,
    MR_BAD_REQUEST = 4,
    MR_REMOTE = 5,
    MR_PATH_DENIED = 6,
    MR_NOT_FOUND = 7,
    MR_NO_DEVICE = 8,
    MR_SESSION_TIMEOUT = 9,
    MR_WORKER_DIED = 10,
    MR_TOO_LARGE = 11,
    MR_UNSUPPORTED = 12,
    MR_BUSY = 13,
    MR_KERNEL_CRASHED = 14, /* the kernel a call ran died (a signal, exit()); the session goes on */
    MR_CANCELLED = 15,      /* the client cancelled the request (CANCEL) */
};

/* An error to report: a code above and a message for people (what went wrong, what to do). */
#define MR_ERR_CAP 4096
typedef struct {
    int code;
    char msg[MR_ERR_CAP];
} mr_error;

/* Replace every `what` in text (a C string with room for cap bytes) with `with`, as far as it fits (tar.c). */
void mr_replace_all(char* text, size_t cap, const char* what, const char* with);

/* Set err (printf-style); returns -1 so that callers can `return mr_fail(err, ...)`. */
int mr_fail(mr_error* err, int code, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---- quotas (workspace.c; docs/protocol.md "Quotas", workbench/runtime/quota.py words them alike) ---- */
/* n bytes for people: "512 bytes", "1.5 KiB", "4.0 GiB" (binary units, one decimal); returns buf. */
const char* mr_format_size(uint64_t n, char* buf, size_t cap);
/* err = BAD_REQUEST "<what> would put the session workspace over its <limit> quota (max_workspace_bytes /
   --max-workspace-bytes; <used> used): remove files or start the server with a larger --max-workspace-bytes";
   returns -1. The same for the files quota and the tensor quota. */
int mr_quota_workspace_bytes(mr_error* err, const char* what, uint64_t limit, uint64_t used);
int mr_quota_workspace_files(mr_error* err, const char* what, uint64_t limit, uint64_t used);
int mr_quota_tensor_bytes(mr_error* err, const char* what, uint64_t limit, uint64_t used);

/* ---- sha256.c ----------------------------------------------------------- */
void mr_sha256(const void* data, size_t len, uint8_t out[32]);
/* HMAC-SHA256(key, msg1 || msg2); msg2 may be NULL with len2 0. */
void mr_hmac_sha256(const void* key, size_t key_len, const void* msg1, size_t len1, const void* msg2, size_t len2,
                    uint8_t out[32]);
/* Constant-time comparison of n bytes: 1 when equal. */
int mr_equal_ct(const uint8_t* a, const uint8_t* b, size_t n);
/* n random bytes from getrandom()/ /dev/urandom: 0, or -1 on failure. */
int mr_random(void* out, size_t n);

/* ---- elf.c ---------------------------------------------------------------- */
/* What an ELF file is built for: the triple (class, data encoding, e_machine). */
typedef struct {
    int elf_class;  /* 1 = ELFCLASS32, 2 = ELFCLASS64 */
    int data;       /* 1 = little-endian, 2 = big-endian */
    int machine;    /* e_machine: 62 x86-64, 183 AArch64, 40 ARM, 3 i386, 243 RISC-V */
} mr_elf_kind;

/* The kind of this very binary (compile-time macros): what .tar members must be built for. */
mr_elf_kind mr_self_elf_kind(void);
/* "x86-64", "AArch64 (64-bit, little-endian)", ...: for error messages. */
const char* mr_elf_kind_describe(mr_elf_kind kind, char* buf, size_t len);

/* A list of malloc'ed strings; free with mr_strlist_free. */
typedef struct {
    char** items;
    int count;
} mr_strlist;
void mr_strlist_free(mr_strlist* list);
/* Sort the list and drop duplicates. */
void mr_strlist_sort_unique(mr_strlist* list);

/*
 * The symbols of the ELF shared object (or executable) at `path` that a loader needs:
 *   kernels: defined, global or weak FUNC symbols of .dynsym named __tvm_ffi_<name>, where <name> does not
 *            start with '_' (that is, not __tvm_ffi__*); returned without the prefix, sorted, unique.
 *   slots:   defined OBJECT symbols of .dynsym named __TVM* or exactly __tvm_ffi__library_ctx (context slots).
 * `display` names the file in error texts (a workspace-relative path, never a server path).
 * Returns 0, or -1 with err (MR_REMOTE "… is not an ELF shared object …").
 */
int mr_elf_symbols(const char* path, const char* display, mr_strlist* kernels, mr_strlist* slots, mr_error* err);

/* ---- slots (elf.c) ---------------------------------------------------------- */
/*
 * Fill each context slot of a freshly dlopen'ed library, as TVM's loader would (see
 * workbench/runtime/ffi.py fill_context_slots): the kernel_runtime.h functions for the slots it knows,
 * a new library context for __tvm_ffi__library_ctx, and for any other __TVM* slot a stub that fails the
 * kernel naming it. Never leaves a slot at 0. Returns 0, or -1 with err.
 */
int mr_fill_context_slots(void* dl_handle, const mr_strlist* slots, const char* display, mr_error* err);
/* Fill the one context slot named `slot` at `where` (the rules above). Returns 0, or -1 with err. */
int mr_fill_slot(void* where, const char* slot, const char* display, mr_error* err);

/* ---- syslib.c --------------------------------------------------------------- */
/* A TVM system library (a module compiled with system_lib_prefix and linked into a with_minrpc program)
 * registers its kernels and context slots at start-up through TVMFFIEnvModRegisterSystemLibSymbol, and calls
 * TVMBackendParallelLaunch & co. directly: syslib.c provides them. mr_syslib_lookup returns a registered
 * symbol ("__tvm_ffi_<name>" or a slot name) or NULL; mr_syslib_complete appends the registered kernels to
 * `kernels` (sorted, unique) and fills the registered slots, once. */
void* mr_syslib_lookup(const char* symbol);
int mr_syslib_complete(mr_strlist* kernels, mr_error* err);

/* ---- tar.c ------------------------------------------------------------------ */
/*
 * Link the .tar module at `tar_path` into the shared object `out_so`, as docs/protocol.md section 6 and
 * workbench/runtime/modules.py say: every member a regular file with a plain relative name ending in .o or
 * .obj (links, absolute or '..' names: MR_PATH_DENIED; directories skipped; other members BAD_REQUEST),
 * each a relocatable ELF object of mr_self_elf_kind() with no .deplibs / .linker-options (SHT_LLVM_*)
 * section and no LTO (.gnu.lto_*) code (MR_BAD_REQUEST naming the member and the fix); ustar, GNU
 * (long names, type 'L') and pax ('x' path) headers understood. The objects are extracted into `work_dir`
 * (which exists and is private to the session), written into an ar archive there, and linked by running
 *   cc -shared -fPIC -o out_so -Wl,--whole-archive ./objects.a -Wl,--no-whole-archive -lm
 * in work_dir (fork+execvp, stdout/stderr captured; the link's error text names tar members, never server
 * paths). `cc` is the device's compiler (mr_find_cc). `display` names the tar in errors.
 * The archive is read as a stream; its uncompressed bytes may not pass quota_limit - quota_used (the session
 * workspace's byte quota and what it holds; quota_limit 0: no quota), checked at each member's header before
 * its data is read and while decompressing (mr_quota_workspace_bytes), nor 4 GiB.
 * Returns 0, or -1 with err.
 */
int mr_link_tar(const char* tar_path, const char* display, const char* work_dir, const char* out_so, const char* cc,
                uint64_t quota_limit, uint64_t quota_used, mr_error* err);
/* One object file (load_module("x.o"), as TVM's server takes it): copied into work_dir, checked and linked as a
 * .tar's members are. Returns 0, or -1 with err. */
int mr_link_object(const char* obj_path, const char* display, const char* work_dir, const char* out_so, const char* cc,
                   mr_error* err);
/* The device's C compiler: `preferred` if not NULL/empty, else $WORKBENCH_CC, $CC, then cc, gcc, clang on
 * PATH. NULL if there is none (then linking a .tar is MR_UNSUPPORTED "this device has no C compiler …"). */
const char* mr_find_cc(const char* preferred);

/* ---- tracker.c -------------------------------------------------------------- */
/*
 * Registration with a tracker (TVM wire format, DESIGN.md; workbench/rpc/tracker/registration.py does the same in
 * Python): connect, prove the registration token if given ([100] / [101, hex proof]), UPDATE_INFO with
 * `{"key": "server:<key>", "addr": [custom_addr or null, port], "devices": [[1, 0]], "arch": ...,
 * "system": "Linux", "cpu_count": n, "pid": n, "target": triple, "server": "minrpc"}`,
 * then PUT `[3, key, [port, matchkey], custom_addr]` with matchkey "<key>:<16 hex digits>", new for every
 * offer. Every second while on offer: GET_PENDING_MATCHKEYS; a match key handed out but not used within
 * 5 s is replaced and offered again. Lost tracker: reconnect with backoff 0.1 s doubling to 5 s, offer again.
 * All I/O is blocking with a 2 s timeout per exchange; no call ever blocks longer than that.
 */
typedef struct mr_tracker mr_tracker;
mr_tracker* mr_tracker_new(const char* host, int port, const char* key, int server_port, const char* custom_addr,
                           const char* registration_token);
/* The match key currently on offer (a CONNECT with exactly this key is accepted). */
const char* mr_tracker_matchkey(const mr_tracker* t);
/* busy = 1: a session started (the slot is off offer; its match key is retired at once).
 * busy = 0: the session ended: a fresh match key is offered. */
void mr_tracker_set_busy(mr_tracker* t, int busy);
/* Do what is due (connect, offer, check); returns the seconds until something is due again (> 0). */
double mr_tracker_poll(mr_tracker* t);
void mr_tracker_free(mr_tracker* t);

#endif
