/*
 * workspace.c: the session workspace, the one directory a client's paths may touch.
 *
 * Layout (as workbench/runtime/workspace.py): <base>/files is what the client sees, <base>/lib holds
 * private copies of loaded modules and linked .tar modules. Every client path is relative, without NUL
 * or '..', and is resolved like os.path.realpath (symlinks followed, missing tails kept) and then checked
 * to lie inside <base>/files: no escape through symlinks. Error texts name the client's path, never the
 * server's.
 */
#include "core.h"

#include <errno.h>
#include <ftw.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char* join(const char* a, const char* b) {
    size_t la = strlen(a), lb = strlen(b);
    char* out = (char*)malloc(la + lb + 2);
    if (!out) return NULL;
    memcpy(out, a, la);
    out[la] = '/';
    memcpy(out + la + 1, b, lb + 1);
    return out;
}

int ws_open(mr_workspace* ws, const char* base) {
    memset(ws, 0, sizeof(*ws));
    ws->base = realpath(base, NULL);
    if (!ws->base) return -1;
    ws->root = join(ws->base, "files");
    ws->private_dir = join(ws->base, "lib");
    if (!ws->root || !ws->private_dir) {
        errno = ENOMEM;
        return -1;
    }
    if (mkdir(ws->root, 0700) && errno != EEXIST) return -1;
    if (mkdir(ws->private_dir, 0700) && errno != EEXIST) return -1;
    return 0;
}

void ws_close(mr_workspace* ws) {
    free(ws->base);
    free(ws->root);
    free(ws->private_dir);
    memset(ws, 0, sizeof(*ws));
}

char* ws_private_path(mr_workspace* ws, const char* name) {
    const char* slash = strrchr(name, '/');
    const char* base = slash ? slash + 1 : name;
    size_t n = strlen(ws->private_dir) + strlen(base) + 32;
    char* out = (char*)malloc(n);
    if (out) snprintf(out, n, "%s/%u-%s", ws->private_dir, ++ws->serial, base);
    return out;
}

/* os.path.realpath(root + "/" + rel) without strict checks: symlinks followed, missing components kept. */
static char* resolve_real(const char* root, const char* rel, int* loop) {
    size_t cap = strlen(root) + strlen(rel) + PATH_MAX + 2;
    char* path = (char*)malloc(cap);
    char* rest = strdup(rel);
    if (!path || !rest) {
        free(path);
        free(rest);
        return NULL;
    }
    strcpy(path, root);
    int links = 0;
    *loop = 0;
    char* p = rest;
    while (*p) {
        while (*p == '/') ++p;
        if (!*p) break;
        char* end = strchr(p, '/');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        char comp[NAME_MAX + 2];
        if (n > NAME_MAX) n = NAME_MAX + 1; /* too long for any file system: kept as is (lstat fails) */
        memcpy(comp, p, n);
        comp[n] = '\0';
        p = end ? end : p + strlen(p);
        if (strcmp(comp, ".") == 0) continue;
        if (strcmp(comp, "..") == 0) {
            char* slash = strrchr(path, '/');
            if (slash && slash != path) *slash = '\0';
            else strcpy(path, "/");
            continue;
        }
        size_t dirlen = strlen(path), len = dirlen;
        if (len + 1 + n + 1 > cap) {
            cap = (len + n + 2) * 2;
            char* grown = (char*)realloc(path, cap);
            if (!grown) break;
            path = grown;
        }
        if (len > 1 || path[0] != '/') path[len++] = '/';
        memcpy(path + len, comp, n + 1);
        struct stat st;
        if (lstat(path, &st) != 0 || !S_ISLNK(st.st_mode)) continue;
        /* a symlink: go on from its target, then the rest */
        if (++links > 40) {
            *loop = 1;
            break;
        }
        char target[PATH_MAX + 1];
        ssize_t tl = readlink(path, target, PATH_MAX);
        if (tl < 0) continue;
        target[tl] = '\0';
        path[dirlen] = '\0'; /* back to the directory holding the link */
        if (target[0] == '/') strcpy(path, "/");
        size_t rl = strlen(p);
        char* next = (char*)malloc((size_t)tl + rl + 2);
        if (!next) break;
        memcpy(next, target, (size_t)tl);
        next[tl] = '/';
        memcpy(next + tl + 1, p, rl + 1);
        free(rest);
        rest = p = next;
    }
    free(rest);
    return path;
}

char* ws_resolve(mr_workspace* ws, const mp_node* node, mr_error* err) {
    char shown[600];
    if (node->type != MP_STR || node->len == 0) {
        mp_repr(node, shown, sizeof(shown), 200);
        mr_fail(err, MR_BAD_REQUEST, "a remote path must be a non-empty string, not %s", shown);
        return NULL;
    }
    const char* s = node->v.s;
    py_repr_str(s, node->len, shown, sizeof(shown));
    if (strlen(s) != node->len) {
        mr_fail(err, MR_PATH_DENIED, "remote path %s contains a NUL byte", shown);
        return NULL;
    }
    if (s[0] == '/' || s[0] == '~') {
        const char* slash = strrchr(s, '/');
        const char* base = slash ? slash + 1 : s;
        char example[300];
        py_repr_str(*base ? base : "lib.so", strlen(*base ? base : "lib.so"), example, sizeof(example));
        mr_fail(err, MR_PATH_DENIED,
                "%s is an absolute path; remote paths are relative to the session workspace, e.g. %s", shown, example);
        return NULL;
    }
    /* '..' as a component, with '\\' read as a separator too */
    for (const char* p = s; *p;) {
        const char* q = p;
        while (*q && *q != '/' && *q != '\\') ++q;
        if (q - p == 2 && p[0] == '.' && p[1] == '.') {
            mr_fail(err, MR_PATH_DENIED, "%s uses '..'; remote paths must stay inside the session workspace", shown);
            return NULL;
        }
        p = *q ? q + 1 : q;
    }
    int loop = 0;
    char* real = resolve_real(ws->root, s, &loop);
    if (!real) {
        mr_fail(err, MR_REMOTE, "out of memory resolving %s", shown);
        return NULL;
    }
    size_t rl = strlen(ws->root);
    if (loop || !(strncmp(real, ws->root, rl) == 0 && (real[rl] == '\0' || real[rl] == '/'))) {
        free(real);
        mr_fail(err, MR_PATH_DENIED, "%s leads outside the session workspace (through a symlink%s)", shown,
                loop ? " loop" : "");
        return NULL;
    }
    return real;
}

int ws_make_parents(const mr_workspace* ws, const char* full) {
    char* dir = strdup(full);
    if (!dir) return -1;
    char* slash = strrchr(dir, '/');
    if (slash) *slash = '\0';
    size_t rl = strlen(ws->root);
    int rc = 0;
    /* create each component below the root, top down */
    for (char* p = dir + rl; p && *p;) {
        char* next = strchr(p + 1, '/');
        if (next) *next = '\0';
        if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
            rc = -1;
            break;
        }
        struct stat st;
        if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
            errno = ENOTDIR;
            rc = -1;
            break;
        }
        if (next) *next = '/';
        p = next;
    }
    int saved = errno;
    free(dir);
    errno = saved;
    return rc;
}

static int remove_one(const char* path, const struct stat* st, int flag, struct FTW* ftw) {
    (void)st;
    (void)ftw;
    if (flag == FTW_DP || flag == FTW_D) {
        if (rmdir(path) != 0 && errno != ENOENT) return 0; /* best effort: go on with the rest */
    } else if (unlink(path) != 0 && errno != ENOENT) {
        return 0;
    }
    return 0;
}

int mr_remove_tree(const char* path) {
    struct stat st;
    if (lstat(path, &st) != 0) return -1;
    if (!S_ISDIR(st.st_mode)) return unlink(path);
    /* directories the code of the session made unreadable are made readable first (best effort) */
    chmod(path, 0700);
    if (nftw(path, remove_one, 32, FTW_DEPTH | FTW_PHYS) != 0) return -1;
    return lstat(path, &st) == 0 ? -1 : 0;
}

/* ---- quotas ---------------------------------------------------------------------------------------- */
const char* mr_format_size(uint64_t n, char* buf, size_t cap) {
    static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    if (n < 1024) {
        snprintf(buf, cap, n == 1 ? "1 byte" : "%llu bytes", (unsigned long long)n);
        return buf;
    }
    double value = (double)n;
    int unit = 0;
    while (value >= 1024 && unit < 5) {
        value /= 1024;
        ++unit;
    }
    snprintf(buf, cap, "%.1f %s", value, units[unit]);
    return buf;
}

static int quota_bytes(mr_error* err, const char* what, uint64_t limit, uint64_t used, const char* whose,
                       const char* its, const char* option, const char* flag, const char* fix) {
    char l[32], u[32];
    return mr_fail(err, MR_BAD_REQUEST,
                   "%s would put %s over %s %s quota (%s / %s; %s used): %s or start the server with a larger %s", what,
                   whose, its, mr_format_size(limit, l, sizeof(l)), option, flag, mr_format_size(used, u, sizeof(u)), fix,
                   flag);
}

int mr_quota_workspace_bytes(mr_error* err, const char* what, uint64_t limit, uint64_t used) {
    return quota_bytes(err, what, limit, used, "the session workspace", "its", "max_workspace_bytes",
                       "--max-workspace-bytes", "remove files");
}

int mr_quota_tensor_bytes(mr_error* err, const char* what, uint64_t limit, uint64_t used) {
    return quota_bytes(err, what, limit, used, "the session's tensors", "their", "max_tensor_bytes",
                       "--max-tensor-bytes", "free tensors");
}

int mr_quota_workspace_files(mr_error* err, const char* what, uint64_t limit, uint64_t used) {
    return mr_fail(err, MR_BAD_REQUEST,
                   "%s would put the session workspace over its quota of %llu files and directories "
                   "(max_workspace_files / --max-workspace-files; %llu used): remove files or start the server with a "
                   "larger --max-workspace-files",
                   what, (unsigned long long)limit, (unsigned long long)used);
}

int mr_parse_size(const char* text, uint64_t* out) {
    const char* p = text;
    while (*p == ' ' || *p == '\t') ++p;
    if (*p < '0' || *p > '9') return -1;
    /* digits and an optional fraction (its first 9 digits), exact: no strtod, so no locale and no rounding */
    uint64_t whole = 0, frac = 0, scale = 1;
    for (; *p >= '0' && *p <= '9'; ++p) {
        if (whole > (UINT64_MAX - 9) / 10) return -1;
        whole = whole * 10 + (uint64_t)(*p - '0');
    }
    if (*p == '.') {
        ++p;
        if (*p < '0' || *p > '9') return -1;
        for (; *p >= '0' && *p <= '9'; ++p)
            if (scale < 1000000000ULL) {
                frac = frac * 10 + (uint64_t)(*p - '0');
                scale *= 10;
            }
    }
    while (*p == ' ' || *p == '\t') ++p;
    int shift = 0;
    const char* units = "kmgtp";
    if (*p) {
        const char* u = strchr(units, *p | 0x20);
        if (u && *p != '\0') {
            shift = 10 * (int)(u - units + 1);
            ++p;
        }
        if ((*p | 0x20) == 'i' && (p[1] | 0x20) == 'b') p += 2;
        else if ((*p | 0x20) == 'b') p += 1;
    }
    while (*p == ' ' || *p == '\t') ++p;
    if (*p) return -1;
    const uint64_t max = (uint64_t)INT64_MAX;
    if (shift && whole > max >> shift) return -1;
    uint64_t value = whole << shift;
    uint64_t part = 0, rest = frac; /* floor(frac * 2^shift / scale) by long division: exact, no overflow */
    for (int i = 0; i < shift; ++i) {
        rest <<= 1;
        part <<= 1;
        if (rest >= scale) {
            rest -= scale;
            part |= 1;
        }
    }
    if (value > max - part) return -1;
    *out = value + part;
    return 0;
}

uint64_t mr_default_tensor_bytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    uint64_t total = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
    static const char* limits[] = {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"};
    for (size_t i = 0; i < sizeof(limits) / sizeof(limits[0]); ++i) {
        FILE* f = fopen(limits[i], "re");
        if (!f) continue;
        char line[64] = "";
        char* got = fgets(line, sizeof(line), f);
        fclose(f);
        char* end = NULL;
        unsigned long long v = got ? strtoull(line, &end, 10) : 0;
        if (got && end != line && (*end == '\n' || *end == '\0') && v > 0 && v < (total ? total : UINT64_MAX))
            total = v;
        break;
    }
    return total / 2;
}

static uint64_t usage_bytes, usage_entries; /* nftw's callback has no context pointer */

static int count_one(const char* path, const struct stat* st, int flag, struct FTW* ftw) {
    (void)path;
    (void)ftw;
    usage_entries++;
    if (flag == FTW_F || flag == FTW_SL || flag == FTW_SLN) usage_bytes += (uint64_t)st->st_size;
    return 0;
}

void ws_tree_usage(const char* path, uint64_t* bytes, uint64_t* entries) {
    usage_bytes = usage_entries = 0;
    struct stat st;
    if (lstat(path, &st) == 0) {
        if (S_ISDIR(st.st_mode)) nftw(path, count_one, 32, FTW_PHYS);
        else usage_bytes = (uint64_t)st.st_size, usage_entries = 1;
    }
    *bytes = usage_bytes;
    *entries = usage_entries;
}

void ws_set_quotas(mr_workspace* ws, uint64_t max_bytes, uint64_t max_files) {
    uint64_t b1, e1, b2, e2;
    ws->max_bytes = max_bytes;
    ws->max_files = max_files;
    ws_tree_usage(ws->root, &b1, &e1);
    ws_tree_usage(ws->private_dir, &b2, &e2);
    ws->used_bytes = b1 + b2;
    ws->used_files = e1 + e2 >= 2 ? e1 + e2 - 2 : 0; /* the two directories themselves are not the client's */
}

int ws_check_room(const mr_workspace* ws, const char* what_bytes, const char* what_files, uint64_t add_bytes,
                  uint64_t freed_bytes, uint64_t add_files, mr_error* err) {
    uint64_t after = ws->used_bytes > freed_bytes ? ws->used_bytes - freed_bytes : 0;
    if (ws->max_bytes && (add_bytes > ws->max_bytes || after > ws->max_bytes - add_bytes))
        return mr_quota_workspace_bytes(err, what_bytes, ws->max_bytes, ws->used_bytes);
    if (ws->max_files && add_files && ws->used_files + add_files > ws->max_files)
        return mr_quota_workspace_files(err, what_files, ws->max_files, ws->used_files);
    return 0;
}

void ws_charge(mr_workspace* ws, int64_t bytes, int64_t files) {
    ws->used_bytes = bytes < 0 && (uint64_t)-bytes > ws->used_bytes ? 0 : ws->used_bytes + (uint64_t)bytes;
    ws->used_files = files < 0 && (uint64_t)-files > ws->used_files ? 0 : ws->used_files + (uint64_t)files;
}

uint64_t ws_missing_dirs(const mr_workspace* ws, const char* full) {
    char* dir = strdup(full);
    if (!dir) return 0;
    size_t rl = strlen(ws->root);
    uint64_t missing = 0;
    struct stat st;
    for (;;) {
        char* slash = strrchr(dir, '/');
        if (!slash) break;
        *slash = '\0';
        if (strlen(dir) <= rl || lstat(dir, &st) == 0) break;
        ++missing;
    }
    free(dir);
    return missing;
}
