/*
 * elf.c: what minrpc reads from ELF files, and the context slots it fills after dlopen.
 *
 *   mr_self_elf_kind     the (class, byte order, machine) this binary was built for
 *   mr_elf_symbols       the kernels (__tvm_ffi_<name>) and context slots of a shared object, from the
 *                        section table's SHT_DYNSYM and its string table (ELF32 and ELF64, both byte
 *                        orders; every offset bounds-checked: a malformed file is an error, never a crash)
 *   mr_fill_context_slots  the rules of workbench/runtime/ffi.py fill_context_slots, with kernel_runtime.c
 *   mr_fail              minrpc's error setter
 * and the shared reader of elf_read.h (tar.c checks .tar members with it).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "elf_read.h"
#include "kernel_runtime.h"
#include "minrpc.h"

int mr_fail(mr_error* err, int code, const char* fmt, ...) {
    if (!err) return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
    va_end(ap);
    err->code = code;
    return -1;
}

/* ---- this binary's kind ---------------------------------------------------------------------------- */
mr_elf_kind mr_self_elf_kind(void) {
    mr_elf_kind k;
    k.elf_class = sizeof(void*) == 8 ? 2 : 1;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    k.data = 2;
#else
    k.data = 1;
#endif
#if defined(__x86_64__)
    k.machine = 62; /* also x32 (class 1) */
#elif defined(__i386__)
    k.machine = 3;
#elif defined(__aarch64__)
    k.machine = 183;
#elif defined(__arm__)
    k.machine = 40;
#elif defined(__riscv)
    k.machine = 243;
#elif defined(__powerpc64__)
    k.machine = 21;
#elif defined(__powerpc__)
    k.machine = 20;
#elif defined(__s390__)
    k.machine = 22;
#elif defined(__mips__)
    k.machine = 8;
#elif defined(__loongarch__)
    k.machine = 258;
#else
    k.machine = 0; /* unknown: no .tar member will match, and the error says what this device links */
#endif
    return k;
}

/* The names of workbench.runtime.modules.MACHINES, so that both servers word errors alike. */
const char* mr_elf_machine_name(int machine, char* buf, size_t len) {
    switch (machine) {
    case 3: return "i386";
    case 8: return "mips";
    case 20: return "ppc";
    case 21: return "ppc64";
    case 22: return "s390";
    case 40: return "arm";
    case 62: return "x86_64";
    case 183: return "aarch64";
    case 243: return "riscv";
    case 258: return "loongarch";
    default: snprintf(buf, len, "ELF machine %d", machine); return buf;
    }
}

/* "aarch64 (64-bit, little-endian)": modules.ElfKind.describe. */
const char* mr_elf_kind_describe(mr_elf_kind kind, char* buf, size_t len) {
    char machine[32], bits[24], order[24];
    const char* name = mr_elf_machine_name(kind.machine, machine, sizeof(machine));
    if (kind.elf_class == 1 || kind.elf_class == 2)
        snprintf(bits, sizeof(bits), "%s", kind.elf_class == 1 ? "32-bit" : "64-bit");
    else
        snprintf(bits, sizeof(bits), "class %d", kind.elf_class);
    if (kind.data == 1 || kind.data == 2)
        snprintf(order, sizeof(order), "%s", kind.data == 1 ? "little-endian" : "big-endian");
    else
        snprintf(order, sizeof(order), "data %d", kind.data);
    snprintf(buf, len, "%s (%s, %s)", name, bits, order);
    return buf;
}

void mr_strlist_free(mr_strlist* list) {
    if (!list) return;
    for (int i = 0; i < list->count; ++i) free(list->items[i]);
    free(list->items);
    list->items = NULL;
    list->count = 0;
}

/* ---- the shared reader (elf_read.h) ------------------------------------------------------------------ */
int mr_pread_full(int fd, void* buf, size_t n, uint64_t off) {
    uint8_t* p = (uint8_t*)buf;
    while (n > 0) {
        ssize_t got = pread(fd, p, n, (off_t)off);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            if (got == 0) errno = 0; /* the file is shorter */
            return -1;
        }
        p += got;
        n -= (size_t)got;
        off += (uint64_t)got;
    }
    return 0;
}

/* Fixed-size integers in the file's byte order. */
static uint16_t rd16(const uint8_t* p, int big) {
    return big ? (uint16_t)(p[0] << 8 | p[1]) : (uint16_t)(p[1] << 8 | p[0]);
}
static uint32_t rd32(const uint8_t* p, int big) {
    return big ? (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]
               : (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}
static uint64_t rd64(const uint8_t* p, int big) {
    return big ? (uint64_t)rd32(p, 1) << 32 | rd32(p + 4, 1) : (uint64_t)rd32(p + 4, 0) << 32 | rd32(p, 0);
}

int mr_elf_read_header(int fd, uint64_t size, mr_elf_header* h) {
    memset(h, 0, sizeof(*h));
    h->ident_len = size < 16 ? (size_t)size : 16;
    if (h->ident_len && mr_pread_full(fd, h->ident, h->ident_len, 0) != 0) return errno ? MR_ELF_IO : MR_ELF_TRUNCATED;
    if (h->ident_len < 4 || memcmp(h->ident, "\177ELF", 4) != 0) return MR_ELF_NOT_ELF;
    if (h->ident_len < 16) return MR_ELF_TRUNCATED;
    h->kind.elf_class = h->ident[4];
    h->kind.data = h->ident[5];
    h->version = h->ident[6];
    if ((h->kind.elf_class != 1 && h->kind.elf_class != 2) || (h->kind.data != 1 && h->kind.data != 2) ||
        h->version != 1)
        return MR_ELF_BAD_IDENT;
    int is64 = h->kind.elf_class == 2, big = h->kind.data == 2;
    size_t ehsize = is64 ? 64 : 52;
    uint8_t b[64];
    if (size < ehsize) return MR_ELF_TRUNCATED;
    if (mr_pread_full(fd, b, ehsize, 0) != 0) return errno ? MR_ELF_IO : MR_ELF_TRUNCATED;
    h->type = rd16(b + 16, big);
    h->kind.machine = rd16(b + 18, big);
    if (is64) {
        h->shoff = rd64(b + 40, big);
        h->ehsize = rd16(b + 52, big);
        h->shentsize = rd16(b + 58, big);
        h->shnum = rd16(b + 60, big);
        h->shstrndx = rd16(b + 62, big);
    } else {
        h->shoff = rd32(b + 32, big);
        h->ehsize = rd16(b + 40, big);
        h->shentsize = rd16(b + 46, big);
        h->shnum = rd16(b + 48, big);
        h->shstrndx = rd16(b + 50, big);
    }
    return MR_ELF_OK;
}

static void parse_section(const uint8_t* p, int is64, int big, mr_elf_section* s) {
    s->name = rd32(p, big);
    s->type = rd32(p + 4, big);
    if (is64) {
        s->addr = rd64(p + 16, big);
        s->offset = rd64(p + 24, big);
        s->size = rd64(p + 32, big);
        s->link = rd32(p + 40, big);
        s->entsize = rd64(p + 56, big);
    } else {
        s->addr = rd32(p + 12, big);
        s->offset = rd32(p + 16, big);
        s->size = rd32(p + 20, big);
        s->link = rd32(p + 24, big);
        s->entsize = rd32(p + 36, big);
    }
}

int mr_elf_read_sections(int fd, uint64_t size, mr_elf_header* h, mr_elf_section** out, uint32_t* bad_index) {
    *out = NULL;
    int is64 = h->kind.elf_class == 2, big = h->kind.data == 2;
    unsigned ehsize = is64 ? 64 : 52, entsize = is64 ? 64 : 40;
    if (h->ehsize != ehsize || h->shentsize != entsize || h->shoff == 0) return MR_ELF_BAD_HEADER;
    uint8_t first[64];
    if (h->shoff > size || size - h->shoff < entsize) return MR_ELF_TABLE_PAST_END;
    if (mr_pread_full(fd, first, entsize, h->shoff) != 0) return errno ? MR_ELF_IO : MR_ELF_TABLE_PAST_END;
    mr_elf_section s0;
    parse_section(first, is64, big, &s0);
    uint64_t shnum = h->shnum, shstrndx = h->shstrndx;
    if (shnum == 0) shnum = s0.size;           /* extended numbering: the count is in section 0 */
    if (shstrndx == 0xFFFF) shstrndx = s0.link; /* SHN_XINDEX */
    if (shnum == 0 || shnum > (size - h->shoff) / entsize || shstrndx >= shnum) {
        h->shnum = shnum > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)shnum;
        h->shstrndx = shstrndx > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)shstrndx;
        return MR_ELF_TABLE_TOO_BIG;
    }
    h->shnum = (uint32_t)shnum;
    h->shstrndx = (uint32_t)shstrndx;
    size_t table_bytes = (size_t)shnum * entsize; /* <= size: fits in memory as the file does */
    uint8_t* table = (uint8_t*)malloc(table_bytes);
    mr_elf_section* sections = (mr_elf_section*)calloc((size_t)shnum, sizeof(mr_elf_section));
    if (!table || !sections) {
        free(table);
        free(sections);
        return MR_ELF_NO_MEMORY;
    }
    if (mr_pread_full(fd, table, table_bytes, h->shoff) != 0) {
        int why = errno ? MR_ELF_IO : MR_ELF_TABLE_TOO_BIG;
        free(table);
        free(sections);
        return why;
    }
    for (uint32_t i = 0; i < shnum; ++i) {
        parse_section(table + (size_t)i * entsize, is64, big, &sections[i]);
        const mr_elf_section* s = &sections[i];
        if (i && s->type != MR_SHT_NOBITS && (s->offset > size || s->size > size - s->offset)) {
            if (bad_index) *bad_index = i;
            free(table);
            free(sections);
            return MR_ELF_SECTION_PAST_END;
        }
    }
    free(table);
    *out = sections;
    return MR_ELF_OK;
}

/* ---- kernels and slots of a shared object ------------------------------------------------------------- */
#define KERNEL_PREFIX "__tvm_ffi_"
#define LIBRARY_CTX_SLOT "__tvm_ffi__library_ctx"
#define MAX_TABLE_BYTES ((uint64_t)1 << 30) /* a .dynsym or .dynstr beyond this is not a kernel library */

static int strlist_push(mr_strlist* list, int* cap, const char* s) {
    if (list->count == *cap) {
        int grown_cap = *cap ? *cap * 2 : 16;
        char** grown = (char**)realloc(list->items, (size_t)grown_cap * sizeof(char*));
        if (!grown) return -1;
        list->items = grown;
        *cap = grown_cap;
    }
    char* copy = strdup(s);
    if (!copy) return -1;
    list->items[list->count++] = copy;
    return 0;
}

static int cmp_str(const void* a, const void* b) { return strcmp(*(char* const*)a, *(char* const*)b); }

/* Sort and drop duplicates. */
void mr_strlist_sort_unique(mr_strlist* list) {
    if (list->count < 2) return;
    qsort(list->items, (size_t)list->count, sizeof(char*), cmp_str);
    int kept = 1;
    for (int i = 1; i < list->count; ++i) {
        if (strcmp(list->items[i], list->items[kept - 1]) == 0)
            free(list->items[i]);
        else
            list->items[kept++] = list->items[i];
    }
    list->count = kept;
}

/* What the file is, for "… is not an ELF shared object (…)". */
static void describe_problem(int status, const mr_elf_header* h, uint32_t bad, char* buf, size_t len) {
    switch (status) {
    case MR_ELF_NOT_ELF: {
        char head[80];
        size_t n = 0;
        for (size_t i = 0; i < h->ident_len && n + 5 < sizeof(head); ++i) {
            uint8_t c = h->ident[i];
            if (c == '\n') break;
            if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'')
                head[n++] = (char)c;
            else
                n += (size_t)snprintf(head + n, sizeof(head) - n, "\\x%02x", c);
        }
        head[n] = '\0';
        snprintf(buf, len, "it starts with '%s'", head);
        break;
    }
    case MR_ELF_BAD_IDENT:
        snprintf(buf, len, "a malformed ELF header: class %d, data %d, version %d", h->kind.elf_class, h->kind.data,
                 h->version);
        break;
    case MR_ELF_TRUNCATED: snprintf(buf, len, "it is truncated inside its ELF header"); break;
    case MR_ELF_BAD_HEADER:
        snprintf(buf, len, "a malformed ELF header: header size %u, section entry size %u, section table at %llu",
                 h->ehsize, h->shentsize, (unsigned long long)h->shoff);
        break;
    case MR_ELF_TABLE_PAST_END: snprintf(buf, len, "its section table lies past the end of the file"); break;
    case MR_ELF_TABLE_TOO_BIG:
        snprintf(buf, len, "%u sections (names in section %u) do not fit in the file", h->shnum, h->shstrndx);
        break;
    case MR_ELF_SECTION_PAST_END: snprintf(buf, len, "section %u runs past the end of the file", bad); break;
    case MR_ELF_NO_MEMORY: snprintf(buf, len, "out of memory reading it"); break;
    default: snprintf(buf, len, "it cannot be read (%s)", strerror(errno ? errno : EIO)); break;
    }
}

/* Load a table section (bounded, inside the file: checked by mr_elf_read_sections). */
static uint8_t* load_section(int fd, const mr_elf_section* s) {
    if (s->type == MR_SHT_NOBITS || s->size > MAX_TABLE_BYTES) return NULL;
    uint8_t* data = (uint8_t*)malloc(s->size ? (size_t)s->size : 1);
    if (data && s->size && mr_pread_full(fd, data, (size_t)s->size, s->offset) != 0) {
        free(data);
        return NULL;
    }
    return data;
}

int mr_elf_symbols(const char* path, const char* display, mr_strlist* kernels, mr_strlist* slots, mr_error* err) {
    kernels->items = NULL;
    kernels->count = 0;
    slots->items = NULL;
    slots->count = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mr_fail(err, MR_REMOTE, "cannot read %s: %s", display, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return mr_fail(err, MR_REMOTE, "%s is not an ELF shared object: it is not a regular file", display);
    }
    uint64_t size = (uint64_t)st.st_size;
    mr_elf_header h;
    mr_elf_section* sec = NULL;
    uint32_t bad = 0;
    char why[256], kind_text[96], self_text[96];
    int status = mr_elf_read_header(fd, size, &h);
    if (status == MR_ELF_OK && h.type != MR_ET_DYN && h.type != MR_ET_EXEC) {
        close(fd);
        const char* what = h.type == MR_ET_REL ? "a relocatable object (compiled with -c, not linked)"
                           : h.type == 4        ? "a core dump"
                                                : "an ELF file of another type";
        return mr_fail(err, MR_REMOTE,
                       "%s is not an ELF shared object (it is %s): link it with -shared, or upload the objects "
                       "in a .tar to be linked on the device",
                       display, what);
    }
    mr_elf_kind self = mr_self_elf_kind();
    if (status == MR_ELF_OK &&
        (h.kind.elf_class != self.elf_class || h.kind.data != self.data || h.kind.machine != self.machine)) {
        close(fd);
        return mr_fail(err, MR_REMOTE,
                       "%s is not an ELF shared object this device can load: it was built for %s, but this device "
                       "runs %s: cross-compile it for the device's target triple",
                       display, mr_elf_kind_describe(h.kind, kind_text, sizeof(kind_text)),
                       mr_elf_kind_describe(self, self_text, sizeof(self_text)));
    }
    if (status == MR_ELF_OK && h.shoff == 0 && h.shnum == 0) {
        close(fd); /* no section table (stripped of it): nothing to list, dlopen decides */
        return 0;
    }
    if (status == MR_ELF_OK) status = mr_elf_read_sections(fd, size, &h, &sec, &bad);
    if (status != MR_ELF_OK) {
        describe_problem(status, &h, bad, why, sizeof(why));
        close(fd);
        if (status == MR_ELF_NOT_ELF)
            return mr_fail(err, MR_REMOTE,
                           "%s is not an ELF shared object (%s); load_module takes a shared object built for this "
                           "device (.so) or a .tar of object files",
                           display, why);
        return mr_fail(err, MR_REMOTE,
                       "%s is not an ELF shared object this device can load (%s); rebuild it with the device's "
                       "compiler",
                       display, why);
    }
    int is64 = h.kind.elf_class == 2, big = h.kind.data == 2;
    uint64_t sym_size = is64 ? 24 : 16, pointer_size = is64 ? 8 : 4;
    int kcap = 0, scap = 0, failed = 0;
    for (uint32_t i = 0; i < h.shnum && !failed; ++i) {
        const mr_elf_section* s = &sec[i];
        if (s->type != MR_SHT_DYNSYM) continue;
        if (s->entsize < sym_size || s->link >= h.shnum) continue; /* not a table we can read */
        uint8_t* syms = load_section(fd, s);
        uint8_t* strs = load_section(fd, &sec[s->link]);
        uint64_t strs_len = sec[s->link].type == MR_SHT_NOBITS ? 0 : sec[s->link].size;
        if (!syms || !strs) {
            free(syms);
            free(strs);
            continue;
        }
        uint64_t count = s->size / s->entsize;
        for (uint64_t j = 1; j < count && !failed; ++j) { /* entry 0 is the null symbol */
            const uint8_t* p = syms + j * s->entsize;
            uint32_t name_off = rd32(p, big);
            uint8_t info;
            uint16_t shndx;
            uint64_t st_size;
            if (is64) {
                info = p[4];
                shndx = rd16(p + 6, big);
                st_size = rd64(p + 16, big);
            } else {
                st_size = rd32(p + 8, big);
                info = p[12];
                shndx = rd16(p + 14, big);
            }
            if (shndx == 0 || name_off >= strs_len) continue; /* undefined, or a name outside the table */
            const char* name = (const char*)strs + name_off;
            if (!memchr(name, '\0', (size_t)(strs_len - name_off))) continue; /* unterminated */
            int bind = info >> 4, type = info & 0xF, plain = 1;
            for (const char* c = name; *c && plain; ++c) plain = *c > 0x20 && *c < 0x7f;
            if (!plain) continue; /* names go to clients as UTF-8 text: symbols are printable ASCII */
            if (type == 2 && (bind == 1 || bind == 2) && strncmp(name, KERNEL_PREFIX, strlen(KERNEL_PREFIX)) == 0) {
                const char* kernel = name + strlen(KERNEL_PREFIX);
                if (*kernel && *kernel != '_' && strlist_push(kernels, &kcap, kernel)) failed = 1;
            } else if (type == 1 && st_size == pointer_size &&
                       (strncmp(name, "__TVM", 5) == 0 || strcmp(name, LIBRARY_CTX_SLOT) == 0)) {
                if (strlist_push(slots, &scap, name)) failed = 1;
            }
        }
        free(syms);
        free(strs);
    }
    free(sec);
    close(fd);
    if (failed) {
        mr_strlist_free(kernels);
        mr_strlist_free(slots);
        return mr_fail(err, MR_REMOTE, "out of memory reading the symbols of %s", display);
    }
    mr_strlist_sort_unique(kernels);
    mr_strlist_sort_unique(slots);
    return 0;
}

/* ---- context slots ------------------------------------------------------------------------------------------ */
typedef void (*mr_any_fn)(void);

/* slot -> the kernel_runtime function that fills it (workbench/runtime/ffi.py _SLOT_FUNCTIONS) */
static const struct {
    const char* slot;
    mr_any_fn fn;
} SLOT_FUNCTIONS[] = {
    {"__TVMBackendParallelLaunch", (mr_any_fn)wb_parallel_launch},
    {"__TVMBackendParallelBarrier", (mr_any_fn)wb_parallel_barrier},
    {"__TVMBackendAllocWorkspace", (mr_any_fn)wb_alloc_workspace},
    {"__TVMBackendFreeWorkspace", (mr_any_fn)wb_free_workspace},
    {"__TVMFFIErrorSetRaisedFromCStr", (mr_any_fn)TVMFFIErrorSetRaisedFromCStr},
    {"__TVMFFIErrorSetRaisedFromCStrParts", (mr_any_fn)TVMFFIErrorSetRaisedFromCStrParts},
    {"__TVMFFIHandleInitOnce", (mr_any_fn)wb_handle_init_once},
    {"__TVMFFIEnvModLookupFromImports", (mr_any_fn)wb_env_mod_lookup_from_imports},
    {"__TVMFFIFunctionCall", (mr_any_fn)wb_ffi_function_call},
};

int mr_fill_slot(void* where, const char* slot, const char* display, mr_error* err) {
    const char* base = strrchr(display, '/');
    base = base ? base + 1 : display; /* the library context is named like ffi.py's: the file's name */
    mr_any_fn fn = NULL;
    void* data = NULL;
    if (strcmp(slot, LIBRARY_CTX_SLOT) == 0) {
        data = wb_new_library_ctx(base);
    } else {
        for (size_t k = 0; k < sizeof(SLOT_FUNCTIONS) / sizeof(SLOT_FUNCTIONS[0]); ++k)
            if (strcmp(slot, SLOT_FUNCTIONS[k].slot) == 0) fn = SLOT_FUNCTIONS[k].fn;
        if (!fn) data = wb_missing_function_stub(slot + 2); /* "__TVMFoo" fails naming "TVMFoo" */
    }
    if (!fn && !data)
        return mr_fail(err, MR_REMOTE, "cannot fill the context slot %s of %s: out of memory", slot, display);
    /* The slot is a pointer-sized object (mr_elf_symbols checked its size): store the address as such. */
    if (fn)
        memcpy(where, &fn, sizeof(fn));
    else
        memcpy(where, &data, sizeof(data));
    return 0;
}

int mr_fill_context_slots(void* dl_handle, const mr_strlist* slots, const char* display, mr_error* err) {
    for (int i = 0; i < slots->count; ++i) {
        const char* slot = slots->items[i];
        dlerror();
        void* where = dlsym(dl_handle, slot);
        if (!where)
            return mr_fail(err, MR_REMOTE,
                           "cannot find the context slot %s of %s after loading it, so its kernels cannot run here",
                           slot, display);
        if (mr_fill_slot(where, slot, display, err)) return -1;
    }
    return 0;
}
