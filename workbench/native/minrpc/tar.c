/*
 * tar.c: .tar modules, linked on the device (docs/protocol.md section 6; workbench/runtime/modules.py does
 * the same in Python, and the checks and error texts follow it).
 *
 * A .tar holds object files (workbench.cc.create_tar, or TVM's export_library, which runs `tar -czf`).
 * Linking runs the device's toolchain on bytes a client sent, so it is confined:
 *   - only members named *.o / *.obj are taken (other files of an export are skipped), and each must be a
 *     regular file with a plain relative name: links, sparse files, devices, directories, absolute and '..'
 *     names are refused (MR_PATH_DENIED);
 *   - each must be a relocatable ELF object for this device's kind (mr_self_elf_kind), with its section table
 *     inside the file, no section that makes a linker open other files (LLVM .deplibs, .linker-options) and no
 *     LTO code (which would run the compiler's plugin) (MR_BAD_REQUEST naming the member and the fix);
 *   - the objects are streamed into work_dir as 0.o, 1.o, ... (never the whole tar in memory), written into an
 *     ar archive with no symbol index, and linked with --whole-archive: a linker takes each member as an object
 *     or fails, it never reads one as a linker script;
 *   - the compiler runs with fork+execvp (no shell), in work_dir (TMPDIR too), with no client-controlled
 *     argument, its output captured (bounded) and a 60 s deadline; its error text names tar members, never
 *     server paths.
 * Tar formats: ustar (POSIX prefix), GNU (long names 'L'/'K', old sparse 'S'), pax ('x' and global 'g'
 * records: path, linkpath, size, GNU.sparse.*), v7; plain or gzip-compressed (a small DEFLATE decoder below,
 * RFC 1951/1952). At most 10000 members; names up to 4096 bytes; truncated or corrupt archives are refused.
 * The uncompressed bytes count against what the session workspace's byte quota has left: a member whose size
 * does not fit is refused at its header, before any of its data is read, and the decompression stops as soon
 * as the count is over (what the archive wrote is removed with work_dir by the caller); 4 GiB at most.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "elf_read.h"
#include "minrpc.h"

extern char** environ;

#define TAR_BLOCK 512
#define TAR_MAX_MEMBERS 10000
#define TAR_MAX_NAME 4096
#define TAR_MAX_PAX ((uint64_t)1 << 20)          /* one pax or GNU long-name header's data */
#define TAR_MAX_BYTES ((uint64_t)4 << 30)        /* what a compressed .tar may expand to */
#define LINK_TIMEOUT_S 60
#define LINK_OUTPUT_CAP 16384                     /* compiler output kept for the error text */
#define COPY_CHUNK (64 * 1024)

#define SHT_LLVM_LINKER_OPTIONS 0x6FFF4C01u
#define SHT_LLVM_DEPENDENT_LIBRARIES 0x6FFF4C04u

/* ======================================================================================================
 * Python-style quoting for names in messages (repr of a str), so both servers word errors alike.
 * ====================================================================================================== */
static void py_repr(const char* s, size_t len, char* out, size_t cap) {
    int has_single = memchr(s, '\'', len) != NULL, has_double = memchr(s, '"', len) != NULL;
    char quote = has_single && !has_double ? '"' : '\'';
    size_t n = 0;
    if (cap < 8) {
        if (cap) out[0] = '\0';
        return;
    }
    out[n++] = quote;
    for (size_t i = 0; i < len; ++i) {
        if (n + 8 >= cap) { /* too long for the message: cut, and say so */
            memcpy(out + n, "...", 3);
            n += 3;
            break;
        }
        unsigned char c = (unsigned char)s[i];
        if (c == '\\' || c == (unsigned char)quote) {
            out[n++] = '\\';
            out[n++] = (char)c;
        } else if (c == '\n') {
            out[n++] = '\\';
            out[n++] = 'n';
        } else if (c == '\r') {
            out[n++] = '\\';
            out[n++] = 'r';
        } else if (c == '\t') {
            out[n++] = '\\';
            out[n++] = 't';
        } else if (c < 0x20 || c == 0x7f) {
            n += (size_t)snprintf(out + n, cap - n, "\\x%02x", c);
        } else {
            out[n++] = (char)c; /* printable ASCII, and UTF-8 bytes as they are */
        }
    }
    out[n++] = quote;
    out[n] = '\0';
}

/* The first line of a file's first 16 bytes as Python shows bytes.decode("latin-1"): its repr, and whether
   it is printable non-blank text (then it is probably a linker script). */
static int latin1_head_repr(const uint8_t* b, size_t len, char* out, size_t cap) {
    size_t end = 0;
    while (end < len && b[end] != '\n') ++end;
    int printable = 1, blank = 1;
    char quote = '\'';
    int has_single = 0, has_double = 0;
    for (size_t i = 0; i < end; ++i) {
        has_single |= b[i] == '\'';
        has_double |= b[i] == '"';
    }
    if (has_single && !has_double) quote = '"';
    size_t n = 0;
    out[n++] = quote;
    for (size_t i = 0; i < end && n + 8 < cap; ++i) {
        uint8_t c = b[i];
        int is_printable = (c >= 0x20 && c < 0x7f) || (c >= 0xa1 && c != 0xad);
        if (!is_printable) printable = 0;
        if (!(c == ' ' || c == '\t' || c == '\r' || c == 0x0b || c == 0x0c || (c >= 0x1c && c <= 0x1f) || c == 0x85 ||
              c == 0xa0))
            blank = 0;
        if (c == '\\' || c == (uint8_t)quote) {
            out[n++] = '\\';
            out[n++] = (char)c;
        } else if (c == '\t' || c == '\r') {
            out[n++] = '\\';
            out[n++] = c == '\t' ? 't' : 'r';
        } else if (!is_printable) {
            n += (size_t)snprintf(out + n, cap - n, "\\x%02x", c);
        } else if (c < 0x80) {
            out[n++] = (char)c;
        } else { /* U+00A1..U+00FF in UTF-8 */
            out[n++] = (char)(0xc0 | (c >> 6));
            out[n++] = (char)(0x80 | (c & 0x3f));
        }
    }
    out[n++] = quote;
    out[n] = '\0';
    return printable && !blank && end > 0;
}

/* ======================================================================================================
 * The archive's bytes: a file read sequentially, plain or through a gzip (DEFLATE) decoder.
 * ====================================================================================================== */
typedef struct {
    uint16_t count[16];  /* codes of each length */
    uint16_t symbol[320]; /* symbols ordered by code */
} huffman;

enum { GZ_MEMBER_HEADER, GZ_BLOCK_HEADER, GZ_STORED, GZ_CODES, GZ_TRAILER, GZ_END };

typedef struct {
    int fd;
    int gz;
    int failed;    /* a read failed: why says it */
    char why[200];
    uint64_t delivered; /* bytes handed to the tar reader */
    uint64_t limit;     /* what the archive may expand to: TAR_MAX_BYTES, or less, what the quota has left */
    uint64_t quota_limit, quota_used, quota_left; /* the workspace's byte quota (0: none) */
    int over_quota;     /* the expansion went past quota_left */
    /* compressed input */
    uint8_t in[COPY_CHUNK];
    size_t in_pos, in_len;
    int in_eof;
    uint32_t bitbuf;
    int bitcnt;
    /* the DEFLATE stream */
    int state;
    int last_block;
    uint32_t stored_left;
    huffman lit, dist;
    uint32_t copy_len, copy_dist;
    uint8_t window[32768];
    uint32_t wpos;
    uint64_t member_out; /* bytes of the current gzip member */
    uint32_t crc;
    int members_done;    /* gzip members read to their trailer */
} source;

static uint32_t crc_table[256];

static void crc_init(void) {
    if (crc_table[1]) return;
    for (uint32_t n = 0; n < 256; ++n) {
        uint32_t c = n;
        for (int k = 0; k < 8; ++k) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[n] = c;
    }
}

static int src_fail(source* s, const char* why) {
    if (!s->failed) snprintf(s->why, sizeof(s->why), "%s", why);
    s->failed = 1;
    return -1;
}

/* The next compressed byte, or -1 at the end of the file (or on an error: failed set). */
static int next_byte(source* s) {
    if (s->in_pos == s->in_len) {
        if (s->in_eof) return -1;
        ssize_t got;
        do got = read(s->fd, s->in, sizeof(s->in));
        while (got < 0 && errno == EINTR);
        if (got < 0) {
            char text[160];
            snprintf(text, sizeof(text), "reading it failed: %s", strerror(errno));
            src_fail(s, text);
            return -1;
        }
        if (got == 0) {
            s->in_eof = 1;
            return -1;
        }
        s->in_len = (size_t)got;
        s->in_pos = 0;
    }
    return s->in[s->in_pos++];
}

/* n (<= 24) bits of the stream, least significant first; 0 with failed set when the data ends. */
static uint32_t bits(source* s, int n) {
    while (s->bitcnt < n) {
        int b = next_byte(s);
        if (b < 0) {
            src_fail(s, "the gzip data ends early: the archive is truncated");
            return 0;
        }
        s->bitbuf |= (uint32_t)b << s->bitcnt;
        s->bitcnt += 8;
    }
    uint32_t v = s->bitbuf & ((1u << n) - 1);
    s->bitbuf >>= n;
    s->bitcnt -= n;
    return v;
}

/* Canonical Huffman code from code lengths: 0 complete, > 0 incomplete, < 0 over-subscribed. */
static int huffman_build(huffman* h, const uint8_t* lengths, int n) {
    uint16_t offs[16];
    memset(h->count, 0, sizeof(h->count));
    for (int i = 0; i < n; ++i) h->count[lengths[i]]++;
    if (h->count[0] == n) return 1; /* no codes at all */
    int left = 1;
    for (int len = 1; len < 16; ++len) {
        left <<= 1;
        left -= h->count[len];
        if (left < 0) return -1;
    }
    offs[1] = 0;
    for (int len = 1; len < 15; ++len) offs[len + 1] = (uint16_t)(offs[len] + h->count[len]);
    for (int i = 0; i < n; ++i)
        if (lengths[i]) h->symbol[offs[lengths[i]]++] = (uint16_t)i;
    return left;
}

/* One symbol: the code's bits arrive most significant first. -1 for a code the table does not have. */
static int huffman_decode(source* s, const huffman* h) {
    int code = 0, first = 0, index = 0;
    for (int len = 1; len < 16; ++len) {
        code |= (int)bits(s, 1);
        if (s->failed) return -1;
        int count = h->count[len];
        if (code - first < count) return h->symbol[index + code - first];
        index += count;
        first += count;
        first <<= 1;
        code <<= 1;
    }
    src_fail(s, "the gzip data is corrupt (an invalid Huffman code)");
    return -1;
}

/* Lengths 257..285 and distances 0..29 (RFC 1951 section 3.2.5). */
static const uint16_t LEN_BASE[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                      31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
static const uint8_t LEN_EXTRA[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                      2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
static const uint16_t DIST_BASE[30] = {1,   2,   3,   4,   5,   7,    9,    13,   17,   25,   33,   49,   65,    97,    129,
                                       193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
static const uint8_t DIST_EXTRA[30] = {0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6,
                                       6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13};

static int read_dynamic_tables(source* s) {
    static const uint8_t ORDER[19] = {16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15};
    uint8_t lengths[320];
    int nlen = (int)bits(s, 5) + 257, ndist = (int)bits(s, 5) + 1, ncode = (int)bits(s, 4) + 4;
    if (s->failed) return -1;
    if (nlen > 286 || ndist > 30) return src_fail(s, "the gzip data is corrupt (bad table sizes)");
    memset(lengths, 0, sizeof(lengths));
    for (int i = 0; i < ncode; ++i) lengths[ORDER[i]] = (uint8_t)bits(s, 3);
    if (s->failed) return -1;
    huffman lencode;
    if (huffman_build(&lencode, lengths, 19) != 0) return src_fail(s, "the gzip data is corrupt (bad code lengths)");
    int i = 0;
    while (i < nlen + ndist) {
        int sym = huffman_decode(s, &lencode);
        if (sym < 0) return -1;
        if (sym < 16) {
            lengths[i++] = (uint8_t)sym;
            continue;
        }
        int repeat;
        uint8_t value = 0;
        if (sym == 16) {
            if (i == 0) return src_fail(s, "the gzip data is corrupt (a repeat with nothing before it)");
            value = lengths[i - 1];
            repeat = 3 + (int)bits(s, 2);
        } else if (sym == 17) {
            repeat = 3 + (int)bits(s, 3);
        } else {
            repeat = 11 + (int)bits(s, 7);
        }
        if (s->failed) return -1;
        if (i + repeat > nlen + ndist) return src_fail(s, "the gzip data is corrupt (too many code lengths)");
        while (repeat--) lengths[i++] = value;
    }
    if (lengths[256] == 0) return src_fail(s, "the gzip data is corrupt (no end-of-block code)");
    int rc = huffman_build(&s->lit, lengths, nlen);
    if (rc < 0 || (rc > 0 && nlen - s->lit.count[0] != 1))
        return src_fail(s, "the gzip data is corrupt (bad literal/length code)");
    rc = huffman_build(&s->dist, lengths + nlen, ndist);
    if (rc < 0 || (rc > 0 && ndist - s->dist.count[0] > 1))
        return src_fail(s, "the gzip data is corrupt (bad distance code)");
    return 0;
}

static void fixed_tables(source* s) {
    uint8_t lengths[320];
    int i = 0;
    for (; i < 144; ++i) lengths[i] = 8;
    for (; i < 256; ++i) lengths[i] = 9;
    for (; i < 280; ++i) lengths[i] = 7;
    for (; i < 288; ++i) lengths[i] = 8;
    huffman_build(&s->lit, lengths, 288);
    for (i = 0; i < 30; ++i) lengths[i] = 5;
    huffman_build(&s->dist, lengths, 30);
}

/* A gzip member header (RFC 1952); at the end of the input (after zero padding) the stream is done. */
static int read_member_header(source* s) {
    int b;
    s->bitbuf = 0;
    s->bitcnt = 0;
    do b = next_byte(s);
    while (b == 0 && s->members_done); /* zero padding after a member */
    if (b < 0) {
        if (s->failed) return -1;
        if (!s->members_done) return src_fail(s, "the gzip data is empty");
        s->state = GZ_END;
        return 0;
    }
    int id2 = next_byte(s), cm = next_byte(s), flags = next_byte(s);
    if (b != 0x1f || id2 != 0x8b) return src_fail(s, "data after the gzip stream is not gzip data");
    if (cm != 8 || flags < 0 || (flags & 0xe0)) return src_fail(s, "it uses a gzip compression method other than deflate");
    for (int i = 0; i < 6; ++i)
        if (next_byte(s) < 0) return src_fail(s, "the gzip header is truncated");
    if (flags & 4) { /* FEXTRA */
        int lo = next_byte(s), hi = next_byte(s);
        if (hi < 0) return src_fail(s, "the gzip header is truncated");
        for (int n = lo | hi << 8; n > 0; --n)
            if (next_byte(s) < 0) return src_fail(s, "the gzip header is truncated");
    }
    for (int field = 8; field <= 16; field <<= 1) { /* FNAME, FCOMMENT: NUL-terminated */
        if (!(flags & field)) continue;
        do b = next_byte(s);
        while (b > 0);
        if (b < 0) return src_fail(s, "the gzip header is truncated");
    }
    if (flags & 2) /* FHCRC */
        if (next_byte(s) < 0 || next_byte(s) < 0) return src_fail(s, "the gzip header is truncated");
    s->state = GZ_BLOCK_HEADER;
    s->last_block = 0;
    s->member_out = 0;
    s->crc = 0xFFFFFFFFu;
    s->wpos = 0;
    return 0;
}

static inline void emit(source* s, uint8_t* out, size_t* got, uint8_t b) {
    out[(*got)++] = b;
    s->window[s->wpos++ & 32767] = b;
    s->crc = crc_table[(s->crc ^ b) & 0xff] ^ (s->crc >> 8);
    s->member_out++;
}

/* Up to n decompressed bytes: how many (fewer only at the end of the data), or -1. */
static long inflate_read(source* s, uint8_t* out, size_t n) {
    size_t got = 0;
    while (got < n && !s->failed) {
        if (s->copy_len) {
            while (s->copy_len && got < n) {
                emit(s, out, &got, s->window[(s->wpos - s->copy_dist) & 32767]);
                s->copy_len--;
            }
            continue;
        }
        switch (s->state) {
        case GZ_MEMBER_HEADER:
            if (read_member_header(s)) return -1;
            break;
        case GZ_END: return (long)got;
        case GZ_BLOCK_HEADER: {
            if (s->last_block) {
                s->state = GZ_TRAILER;
                break;
            }
            s->last_block = (int)bits(s, 1);
            int type = (int)bits(s, 2);
            if (s->failed) return -1;
            if (type == 0) {
                s->bitbuf >>= s->bitcnt & 7; /* to a byte boundary */
                s->bitcnt -= s->bitcnt & 7;
                uint32_t len = bits(s, 16), nlen = bits(s, 16);
                if (s->failed) return -1;
                if (len != (~nlen & 0xffff)) return src_fail(s, "the gzip data is corrupt (a stored block's length)");
                s->stored_left = len;
                s->state = GZ_STORED;
            } else if (type == 1) {
                fixed_tables(s);
                s->state = GZ_CODES;
            } else if (type == 2) {
                if (read_dynamic_tables(s)) return -1;
                s->state = GZ_CODES;
            } else {
                return src_fail(s, "the gzip data is corrupt (block type 3)");
            }
            break;
        }
        case GZ_STORED:
            while (s->stored_left && got < n) {
                uint8_t b = (uint8_t)bits(s, 8);
                if (s->failed) return -1;
                emit(s, out, &got, b);
                s->stored_left--;
            }
            if (!s->stored_left) s->state = GZ_BLOCK_HEADER;
            break;
        case GZ_CODES: {
            int sym = huffman_decode(s, &s->lit);
            if (sym < 0) return -1;
            if (sym < 256) {
                emit(s, out, &got, (uint8_t)sym);
            } else if (sym == 256) {
                s->state = GZ_BLOCK_HEADER;
            } else {
                sym -= 257;
                if (sym >= 29) return src_fail(s, "the gzip data is corrupt (an invalid length)");
                uint32_t len = LEN_BASE[sym] + bits(s, LEN_EXTRA[sym]);
                int dsym = huffman_decode(s, &s->dist);
                if (dsym < 0) return -1;
                if (dsym >= 30) return src_fail(s, "the gzip data is corrupt (an invalid distance)");
                uint32_t dist = DIST_BASE[dsym] + bits(s, DIST_EXTRA[dsym]);
                if (s->failed) return -1;
                if (dist > s->member_out) return src_fail(s, "the gzip data is corrupt (a distance too far back)");
                s->copy_len = len;
                s->copy_dist = dist;
            }
            break;
        }
        case GZ_TRAILER: {
            s->bitbuf >>= s->bitcnt & 7;
            s->bitcnt -= s->bitcnt & 7;
            uint32_t crc = bits(s, 16);
            crc |= bits(s, 16) << 16;
            uint32_t isize = bits(s, 16);
            isize |= bits(s, 16) << 16;
            if (s->failed) return -1;
            if (crc != (s->crc ^ 0xFFFFFFFFu)) return src_fail(s, "the gzip data is corrupt (CRC mismatch)");
            if (isize != (uint32_t)s->member_out) return src_fail(s, "the gzip data is corrupt (length mismatch)");
            /* a whole byte the bit buffer still holds (the last one read) goes back in front of the input */
            if ((size_t)(s->bitcnt / 8) > s->in_pos) return src_fail(s, "the gzip data is corrupt (after a member)");
            s->in_pos -= (size_t)(s->bitcnt / 8);
            s->members_done++;
            s->state = GZ_MEMBER_HEADER;
            break;
        }
        }
    }
    return s->failed ? -1 : (long)got;
}

/* Up to n bytes of the archive: how many (fewer only at its end), or -1 (s->why). */
static long src_read(source* s, void* buf, size_t n) {
    size_t got = 0;
    if (s->gz) {
        long r = inflate_read(s, (uint8_t*)buf, n);
        if (r < 0) return -1;
        got = (size_t)r;
    } else {
        while (got < n) {
            ssize_t r = read(s->fd, (uint8_t*)buf + got, n - got);
            if (r < 0 && errno == EINTR) continue;
            if (r < 0) {
                char text[160];
                snprintf(text, sizeof(text), "reading it failed: %s", strerror(errno));
                return src_fail(s, text);
            }
            if (r == 0) break;
            got += (size_t)r;
        }
    }
    s->delivered += got;
    if (s->delivered > s->limit) {
        if (s->limit < TAR_MAX_BYTES) { /* the quota's limit (reported by source_error) */
            s->over_quota = 1;
            return src_fail(s, "it expands past the workspace's quota");
        }
        return src_fail(s, "it expands to more than 4 GiB");
    }
    return (long)got;
}

/* Why reading the archive failed, in err: the workspace's quota, or "not a readable tar archive: ...". */
static int source_error(source* s, const char* display, mr_error* err) {
    if (s->over_quota) {
        char what[600], sz[32];
        snprintf(what, sizeof(what), "expanding %s past %s", display, mr_format_size(s->limit, sz, sizeof(sz)));
        return mr_quota_workspace_bytes(err, what, s->quota_limit, s->quota_used);
    }
    return source_error(s, display, err);
}

/* ======================================================================================================
 * Tar headers.
 * ====================================================================================================== */
/* A numeric field: octal text (NUL/space padded) or GNU base-256. 0, or -1 if malformed. */
static int tar_number(const uint8_t* f, size_t len, uint64_t* out) {
    uint64_t v = 0;
    if (f[0] & 0x80) {
        if (f[0] == 0xff) return -1; /* negative */
        v = f[0] & 0x7f;
        for (size_t i = 1; i < len; ++i) {
            if (v >> 55) return -1;
            v = v << 8 | f[i];
        }
        *out = v;
        return 0;
    }
    size_t i = 0, end = 0;
    while (end < len && f[end]) ++end;
    while (i < end && f[i] == ' ') ++i;
    while (end > i && f[end - 1] == ' ') --end;
    for (; i < end; ++i) {
        if (f[i] < '0' || f[i] > '7' || (v >> 60)) return -1;
        v = v * 8 + (uint64_t)(f[i] - '0');
    }
    *out = v;
    return 0;
}

static int header_checksum_ok(const uint8_t* h) {
    uint64_t stored;
    if (tar_number(h + 148, 8, &stored)) return 0;
    uint64_t unsigned_sum = 0;
    int64_t signed_sum = 0;
    for (int i = 0; i < TAR_BLOCK; ++i) {
        uint8_t c = (i >= 148 && i < 156) ? ' ' : h[i];
        unsigned_sum += c;
        signed_sum += (signed char)c;
    }
    return stored == unsigned_sum || (int64_t)stored == signed_sum;
}

/* What pax records (or GNU long-name headers) say about the next member. */
typedef struct {
    char* path;
    char* linkpath;
    char* sparse_name;
    int has_size;
    uint64_t size;
    int sparse;
} member_meta;

static void meta_clear(member_meta* m) {
    free(m->path);
    free(m->linkpath);
    free(m->sparse_name);
    memset(m, 0, sizeof(*m));
}

static char* dup_bytes(const char* p, size_t n) {
    char* s = (char*)malloc(n + 1);
    if (s) {
        memcpy(s, p, n);
        s[n] = '\0';
    }
    return s;
}

static int set_string(char** slot, const char* p, size_t n) {
    char* s = dup_bytes(p, n);
    if (!s) return -1;
    free(*slot);
    *slot = s;
    return 0;
}

/* Records "LEN KEY=VALUE\n" into m: 0, or -1 if malformed (or out of memory). */
static int parse_pax(const char* data, size_t len, member_meta* m) {
    size_t pos = 0;
    while (pos < len) {
        if (data[pos] == '\0') break; /* padding */
        size_t i = pos, rec = 0;
        while (i < len && data[i] >= '0' && data[i] <= '9' && rec < len) rec = rec * 10 + (size_t)(data[i++] - '0');
        if (i == pos || i >= len || data[i] != ' ' || rec < 5 || rec > len - pos) return -1;
        size_t end = pos + rec; /* one past the record's '\n' */
        if (data[end - 1] != '\n') return -1;
        const char* key = data + i + 1;
        const char* eq = memchr(key, '=', (size_t)(data + end - 1 - key));
        if (!eq) return -1;
        size_t klen = (size_t)(eq - key);
        const char* value = eq + 1;
        size_t vlen = (size_t)(data + end - 1 - value);
        if (klen == 4 && memcmp(key, "path", 4) == 0) {
            if (set_string(&m->path, value, vlen)) return -1;
        } else if (klen == 8 && memcmp(key, "linkpath", 8) == 0) {
            if (set_string(&m->linkpath, value, vlen)) return -1;
        } else if (klen == 4 && memcmp(key, "size", 4) == 0) {
            uint64_t v = 0;
            if (vlen == 0 || vlen > 19) return -1;
            for (size_t k = 0; k < vlen; ++k) {
                if (value[k] < '0' || value[k] > '9') return -1;
                v = v * 10 + (uint64_t)(value[k] - '0');
            }
            m->has_size = 1;
            m->size = v;
        } else if (klen > 11 && memcmp(key, "GNU.sparse.", 11) == 0) {
            m->sparse = 1;
            if (klen == 15 && memcmp(key, "GNU.sparse.name", 15) == 0 && set_string(&m->sparse_name, value, vlen))
                return -1;
        }
        pos = end;
    }
    return 0;
}

/* Copy `size` archive bytes to fd (or drop them: fd < 0), then the padding to the next block.
   0; -1 with the source's error; -2: the archive ends first; -3: writing failed (errno kept in *werr). */
static int copy_member(source* s, uint64_t size, int fd, uint8_t* buf, int* werr) {
    uint64_t padded = (size + TAR_BLOCK - 1) / TAR_BLOCK * TAR_BLOCK;
    uint64_t done = 0;
    while (done < padded) {
        size_t want = padded - done > COPY_CHUNK ? COPY_CHUNK : (size_t)(padded - done);
        long got = src_read(s, buf, want);
        if (got < 0) return -1;
        size_t data = done >= size ? 0 : (size - done < (uint64_t)got ? (size_t)(size - done) : (size_t)got);
        for (size_t off = 0; fd >= 0 && off < data;) {
            ssize_t w = write(fd, buf + off, data - off);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) {
                *werr = w < 0 ? errno : ENOSPC;
                return -3;
            }
            off += (size_t)w;
        }
        done += (uint64_t)got;
        if ((size_t)got < want) return -2;
    }
    return 0;
}

/* Read a pax or GNU long-name header's data (bounded) into a malloc'ed, NUL-terminated buffer. */
static char* read_meta_data(source* s, uint64_t size, int* status) {
    uint64_t padded = (size + TAR_BLOCK - 1) / TAR_BLOCK * TAR_BLOCK;
    char* data = (char*)malloc((size_t)padded + 1);
    if (!data) {
        *status = -4;
        return NULL;
    }
    long got = padded ? src_read(s, data, (size_t)padded) : 0;
    if (got < 0 || (uint64_t)got < padded) {
        *status = got < 0 ? -1 : -2;
        free(data);
        return NULL;
    }
    data[size] = '\0';
    *status = 0;
    return data;
}

/* ======================================================================================================
 * Extraction: walk the members, refuse what is not a plain object file, stream the objects into work_dir.
 * ====================================================================================================== */
typedef struct {
    char** names; /* the member names, by object index */
    int count;
    int cap;
} object_list;

static void objects_free(object_list* o) {
    for (int i = 0; i < o->count; ++i) free(o->names[i]);
    free(o->names);
    memset(o, 0, sizeof(*o));
}

static int ends_with(const char* s, const char* suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && memcmp(s + n - k, suffix, k) == 0;
}

/* Why a .o member cannot be linked (modules._member_name_problem), or NULL. */
static const char* member_problem(const char* name, char type, int sparse, const char* linkname, char* buf,
                                  size_t cap) {
    char* norm = strdup(name);
    if (!norm) return "cannot be read (out of memory)";
    for (char* p = norm; *p; ++p)
        if (*p == '\\') *p = '/';
    int absolute = norm[0] == '/', dotdot = 0;
    for (char* part = norm; part;) {
        char* slash = strchr(part, '/');
        size_t len = slash ? (size_t)(slash - part) : strlen(part);
        if (len == 2 && part[0] == '.' && part[1] == '.') dotdot = 1;
        part = slash ? slash + 1 : NULL;
    }
    free(norm);
    if (absolute) return "has an absolute name";
    if (dotdot) return "has a '..' in its name";
    if (type == '1' || type == '2') {
        char target[TAR_MAX_NAME / 4];
        py_repr(linkname ? linkname : "", linkname ? strlen(linkname) : 0, target, sizeof(target));
        snprintf(buf, cap, "is a %s link to %s", type == '2' ? "symbolic" : "hard", target);
        return buf;
    }
    if (sparse || type == 'S') return "is a sparse file";
    if (!(type == '0' || type == '\0' || type == '7')) return "is not a regular file";
    return NULL;
}

/* Types with no data after the header, whatever their size field says (links, devices, directories). */
static int has_no_data(char type) { return type >= '1' && type <= '6'; }

static int extract_objects(source* s, const char* display, const char* work_dir, object_list* objects,
                           mr_error* err) {
    uint8_t header[TAR_BLOCK];
    uint8_t* buf = (uint8_t*)malloc(COPY_CHUNK);
    member_meta local, global;
    char* long_name = NULL;
    char* long_link = NULL;
    char shown[1200], problem_buf[TAR_MAX_NAME / 2];
    int members = 0, rc = -1, status = 0;
    memset(&local, 0, sizeof(local));
    memset(&global, 0, sizeof(global));
    if (!buf) return mr_fail(err, MR_REMOTE, "out of memory reading %s", display);
    for (;;) {
        long got = src_read(s, header, TAR_BLOCK);
        if (got < 0) {
            source_error(s, display, err);
            goto done;
        }
        if (got < TAR_BLOCK) {
            if (got == 0 && members == 0 && s->delivered == 0)
                mr_fail(err, MR_REMOTE, "%s is not a readable tar archive: it is empty", display);
            else
                mr_fail(err, MR_REMOTE,
                        "%s is not a readable tar archive: it ends %s; it is truncated (upload it again)", display,
                        got ? "inside a member's header" : "without the end-of-archive marker");
            goto done;
        }
        int zero = 1;
        for (int i = 0; i < TAR_BLOCK && zero; ++i) zero = header[i] == 0;
        if (zero) { /* the end of the archive; of gzip data, read the rest so that its CRC is checked */
            while (s->gz && (got = src_read(s, buf, COPY_CHUNK)) == COPY_CHUNK) {
            }
            if (got < 0) {
                source_error(s, display, err);
                goto done;
            }
            break;
        }
        if (!header_checksum_ok(header)) {
            if (members == 0)
                mr_fail(err, MR_REMOTE,
                        "%s is not a readable tar archive: it does not start with a tar header (a .tar module is a tar "
                        "of object files, plain or gzip-compressed)",
                        display);
            else
                mr_fail(err, MR_REMOTE, "%s is not a readable tar archive: the header of member %d is corrupt",
                        display, members + 1);
            goto done;
        }
        if (++members > TAR_MAX_MEMBERS) {
            mr_fail(err, MR_BAD_REQUEST,
                    "%s has more than %d members; a .tar module holds object files (usually one or a few): "
                    "pack only those",
                    display, TAR_MAX_MEMBERS);
            goto done;
        }
        char type = (char)header[156];
        uint64_t size;
        if (tar_number(header + 124, 12, &size)) {
            mr_fail(err, MR_REMOTE, "%s is not a readable tar archive: member %d has a malformed size", display,
                    members);
            goto done;
        }
        status = 0;
        /* headers about the next member */
        if (type == 'x' || type == 'X' || type == 'g' || type == 'L' || type == 'K') {
            if (size > TAR_MAX_PAX) {
                mr_fail(err, MR_BAD_REQUEST, "%s has an extended header of %llu bytes, over the %llu-byte limit", display,
                        (unsigned long long)size, (unsigned long long)TAR_MAX_PAX);
                goto done;
            }
            char* data = read_meta_data(s, size, &status);
            if (!data) goto stream_error;
            if (type == 'L' || type == 'K') {
                char** slot = type == 'L' ? &long_name : &long_link;
                free(*slot);
                *slot = data; /* NUL-terminated at its first NUL */
                if (strlen(data) > TAR_MAX_NAME) {
                    mr_fail(err, MR_BAD_REQUEST, "%s has a member name longer than %d bytes", display, TAR_MAX_NAME);
                    goto done;
                }
            } else {
                int bad = parse_pax(data, (size_t)size, type == 'g' ? &global : &local);
                free(data);
                if (bad) {
                    mr_fail(err, MR_REMOTE, "%s is not a readable tar archive: member %d has a malformed pax header",
                            display, members);
                    goto done;
                }
            }
            continue;
        }
        /* the member's name: pax path > GNU long name > ustar prefix + name */
        char name[TAR_MAX_NAME + 260], linkname[TAR_MAX_NAME + 1];
        const char* pax_path = local.sparse_name   ? local.sparse_name
                               : local.path        ? local.path
                               : global.sparse_name ? global.sparse_name
                                                    : global.path;
        const char* pax_link = local.linkpath ? local.linkpath : global.linkpath;
        if (pax_path)
            snprintf(name, sizeof(name), "%s", pax_path);
        else if (long_name)
            snprintf(name, sizeof(name), "%s", long_name);
        else {
            char plain[101], prefix[156];
            memcpy(plain, header, 100);
            plain[100] = '\0';
            memcpy(prefix, header + 345, 155);
            prefix[155] = '\0';
            int posix = memcmp(header + 257, "ustar\0", 6) == 0;
            if (posix && prefix[0] && type != 'S')
                snprintf(name, sizeof(name), "%s/%s", prefix, plain);
            else
                snprintf(name, sizeof(name), "%s", plain);
        }
        if (pax_link)
            snprintf(linkname, sizeof(linkname), "%s", pax_link);
        else if (long_link)
            snprintf(linkname, sizeof(linkname), "%s", long_link);
        else {
            memcpy(linkname, header + 157, 100);
            linkname[100] = '\0';
        }
        if (strlen(name) > TAR_MAX_NAME) {
            mr_fail(err, MR_BAD_REQUEST, "%s has a member name longer than %d bytes", display, TAR_MAX_NAME);
            goto done;
        }
        if (local.has_size) size = local.size;
        else if (global.has_size) size = global.size;
        int sparse = local.sparse || global.sparse || type == 'S';
        if (type == '\0' && ends_with(name, "/")) type = '5'; /* an old-style directory */
        if (type == '5')
            for (size_t n = strlen(name); n > 1 && name[n - 1] == '/'; --n) name[n - 1] = '\0';
        if (type == 'S' && header[482]) { /* old GNU sparse: extension headers follow (their map: unused) */
            uint8_t ext[TAR_BLOCK];
            int more = 1;
            while (more) {
                long r = src_read(s, ext, TAR_BLOCK);
                if (r < 0) goto stream_error_source;
                if (r < TAR_BLOCK) {
                    status = -2;
                    goto stream_error;
                }
                more = ext[504] != 0;
            }
        }
        uint64_t data_size = has_no_data(type) ? 0 : size;
        /* the quota, at the header: a member that would not fit is refused before any of its data is read */
        if (s->quota_limit && data_size && s->delivered + data_size > s->quota_left) {
            char what[1400], sz[32];
            py_repr(name, strlen(name), shown, sizeof(shown));
            snprintf(what, sizeof(what), "extracting the .tar member %s of %s (%s)", shown, display,
                     mr_format_size(data_size, sz, sizeof(sz)));
            mr_quota_workspace_bytes(err, what, s->quota_limit, s->quota_used + s->delivered);
            goto done;
        }
        int fd = -1;
        if (ends_with(name, ".o") || ends_with(name, ".obj")) {
            const char* problem = member_problem(name, type, sparse, linkname, problem_buf, sizeof(problem_buf));
            if (problem) {
                py_repr(name, strlen(name), shown, sizeof(shown));
                mr_fail(err, MR_PATH_DENIED,
                        "the .tar member %s %s; a .tar module holds regular object files with plain relative names "
                        "only",
                        shown, problem);
                goto done;
            }
            if (objects->count == objects->cap) {
                int cap = objects->cap ? objects->cap * 2 : 8;
                char** grown = (char**)realloc(objects->names, (size_t)cap * sizeof(char*));
                if (!grown) {
                    mr_fail(err, MR_REMOTE, "out of memory reading %s", display);
                    goto done;
                }
                objects->names = grown;
                objects->cap = cap;
            }
            char path[4200];
            snprintf(path, sizeof(path), "%s/%d.o", work_dir, objects->count);
            fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
            char* kept = strdup(name);
            if (fd < 0 || !kept) {
                int e = errno;
                free(kept);
                if (fd >= 0) close(fd);
                mr_fail(err, MR_REMOTE, "cannot extract the objects of %s on the device: %s", display,
                        fd < 0 ? strerror(e) : "out of memory");
                goto done;
            }
            objects->names[objects->count++] = kept;
        }
        int werr = 0;
        status = copy_member(s, data_size, fd, buf, &werr);
        if (fd >= 0 && close(fd) != 0 && status == 0) {
            werr = errno;
            status = -3;
        }
        if (status == -3) {
            mr_fail(err, MR_REMOTE, "cannot extract the objects of %s on the device: %s", display, strerror(werr));
            goto done;
        }
        if (status) goto stream_error;
        meta_clear(&local);
        free(long_name);
        free(long_link);
        long_name = long_link = NULL;
    }
    if (objects->count == 0) {
        mr_fail(err, MR_REMOTE, "%s holds no object files (.o) to link", display);
        goto done;
    }
    rc = 0;
    goto done;
stream_error_source:
    status = -1;
stream_error:
    if (status == -4)
        mr_fail(err, MR_REMOTE, "out of memory reading %s", display);
    else if (status == -1)
        source_error(s, display, err);
    else
        mr_fail(err, MR_REMOTE, "%s is not a readable tar archive: it ends inside member %d; it is truncated "
                "(upload it again)", display, members);
done:
    meta_clear(&local);
    meta_clear(&global);
    free(long_name);
    free(long_link);
    free(buf);
    return rc;
}

/* ======================================================================================================
 * The ELF checks of a member (modules.elf_kind and check_object).
 * ====================================================================================================== */
static int check_object(const char* path, const char* member, mr_error* err) {
    char shown[1200], kind_text[96], self_text[96];
    py_repr(member, strlen(member), shown, sizeof(shown));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        if (fd >= 0) close(fd);
        return mr_fail(err, MR_REMOTE, "cannot read the extracted .tar member %s: %s", shown, strerror(errno));
    }
    uint64_t size = (uint64_t)st.st_size;
    mr_elf_header h;
    mr_elf_section* sec = NULL;
    uint8_t* names = NULL;
    uint32_t bad_index = 0;
    int rc = -1;
    int status = mr_elf_read_header(fd, size, &h);
    if (status == MR_ELF_NOT_ELF) {
        char head[200];
        int text = latin1_head_repr(h.ident, h.ident_len, head, sizeof(head));
        mr_fail(err, MR_BAD_REQUEST,
                "the .tar member %s is not an ELF object file (it starts with %s: %s); a .tar module holds "
                "relocatable objects compiled with -c, e.g. by workbench.cc.create_tar or TVM's export_library",
                shown, head, text ? "a linker script or other text" : "not an ELF file");
        goto out;
    }
    if (status == MR_ELF_BAD_IDENT) {
        mr_fail(err, MR_BAD_REQUEST,
                "the .tar member %s has a malformed ELF header (class %d, data %d, version %d); rebuild it with the "
                "device's compiler",
                shown, h.kind.elf_class, h.kind.data, h.version);
        goto out;
    }
    if (status == MR_ELF_TRUNCATED) {
        mr_fail(err, MR_BAD_REQUEST, "the .tar member %s is truncated inside its ELF header", shown);
        goto out;
    }
    if (status != MR_ELF_OK) {
        mr_fail(err, MR_REMOTE, "cannot read the extracted .tar member %s: %s", shown, strerror(errno ? errno : EIO));
        goto out;
    }
    if (h.type == MR_ET_REL) {
        status = mr_elf_read_sections(fd, size, &h, &sec, &bad_index);
        switch (status) {
        case MR_ELF_OK: break;
        case MR_ELF_BAD_HEADER:
            mr_fail(err, MR_BAD_REQUEST,
                    "the .tar member %s is a malformed ELF object (header size %u, section entry size %u, section "
                    "table at %llu); rebuild it with the device's compiler",
                    shown, h.ehsize, h.shentsize, (unsigned long long)h.shoff);
            goto out;
        case MR_ELF_TABLE_PAST_END:
            mr_fail(err, MR_BAD_REQUEST,
                    "the .tar member %s is a malformed ELF object: its section table lies past the end of the file",
                    shown);
            goto out;
        case MR_ELF_TABLE_TOO_BIG:
            mr_fail(err, MR_BAD_REQUEST,
                    "the .tar member %s is a malformed ELF object: %u sections (names in section %u) do not fit in "
                    "its %llu bytes",
                    shown, h.shnum, h.shstrndx, (unsigned long long)size);
            goto out;
        case MR_ELF_SECTION_PAST_END:
            mr_fail(err, MR_BAD_REQUEST,
                    "the .tar member %s is a malformed ELF object: section %u runs past the end of the file", shown,
                    bad_index);
            goto out;
        case MR_ELF_NO_MEMORY: mr_fail(err, MR_REMOTE, "out of memory checking the .tar member %s", shown); goto out;
        default:
            mr_fail(err, MR_REMOTE, "cannot read the extracted .tar member %s: %s", shown,
                    strerror(errno ? errno : EIO));
            goto out;
        }
        /* section names (bounded: the table lies inside the file, checked above) */
        const mr_elf_section* strsec = &sec[h.shstrndx];
        uint64_t names_len = (h.shstrndx == 0 || strsec->type == MR_SHT_NOBITS) ? 0 : strsec->size;
        if (names_len > ((uint64_t)64 << 20)) {
            mr_fail(err, MR_BAD_REQUEST,
                    "the .tar member %s is a malformed ELF object: its section names take %llu bytes", shown,
                    (unsigned long long)names_len);
            goto out;
        }
        names = (uint8_t*)malloc((size_t)names_len + 1);
        if (!names || (names_len && mr_pread_full(fd, names, (size_t)names_len, strsec->offset) != 0)) {
            mr_fail(err, MR_REMOTE, "cannot read the extracted .tar member %s", shown);
            goto out;
        }
        names[names_len] = '\0';
        for (uint32_t i = 1; i < h.shnum; ++i) {
            const char* name = sec[i].name < names_len ? (const char*)names + sec[i].name : "";
            if (sec[i].type == SHT_LLVM_DEPENDENT_LIBRARIES || sec[i].type == SHT_LLVM_LINKER_OPTIONS) {
                mr_fail(err, MR_BAD_REQUEST,
                        "the .tar member %s has %s, which this device does not link; build the object without it",
                        shown,
                        sec[i].type == SHT_LLVM_DEPENDENT_LIBRARIES
                            ? "a .deplibs section (it makes lld open the files it names)"
                            : "a .linker-options section (options for the linker)");
                goto out;
            }
            if (strncmp(name, ".gnu.lto_", 9) == 0 || strncmp(name, ".llvm.lto", 9) == 0) {
                char section[200];
                snprintf(section, sizeof(section), "%s", name);
                mr_fail(err, MR_BAD_REQUEST,
                        "the .tar member %s holds link-time-optimisation code (%s), which this device does not "
                        "compile; build the objects without -flto",
                        shown, section);
                goto out;
            }
        }
    }
    if (h.type != MR_ET_REL) {
        const char* what = h.type == 0   ? "an ELF file of no type"
                           : h.type == 2 ? "an executable"
                           : h.type == 3 ? "a shared object"
                           : h.type == 4 ? "a core dump"
                                         : NULL;
        char other[48];
        if (!what) {
            snprintf(other, sizeof(other), "an ELF file of type %d", h.type);
            what = other;
        }
        mr_fail(err, MR_BAD_REQUEST,
                "the .tar member %s is %s, not a relocatable object; put the objects compiled with -c in the .tar (or "
                "upload a .so as is)",
                shown, what);
        goto out;
    }
    mr_elf_kind self = mr_self_elf_kind();
    if (h.kind.elf_class != self.elf_class || h.kind.data != self.data || h.kind.machine != self.machine) {
        mr_fail(err, MR_BAD_REQUEST,
                "the .tar member %s was compiled for %s, but this device links %s: cross-compile for the device's "
                "target triple",
                shown, mr_elf_kind_describe(h.kind, kind_text, sizeof(kind_text)),
                mr_elf_kind_describe(self, self_text, sizeof(self_text)));
        goto out;
    }
    rc = 0;
out:
    free(names);
    free(sec);
    close(fd);
    return rc;
}

/* ======================================================================================================
 * The ar archive (no symbol index: linked with --whole-archive).
 * ====================================================================================================== */
static int write_all(int fd, const void* data, size_t n) {
    const uint8_t* p = (const uint8_t*)data;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (w == 0) errno = ENOSPC;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int write_archive(const char* work_dir, int count, mr_error* err, const char* display) {
    char path[4200], obj[4200];
    uint8_t* buf = (uint8_t*)malloc(COPY_CHUNK);
    snprintf(path, sizeof(path), "%s/objects.a", work_dir);
    int out = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (out < 0 || !buf) {
        int e = errno;
        if (out >= 0) close(out);
        free(buf);
        return mr_fail(err, MR_REMOTE, "cannot write the archive to link %s on the device: %s", display,
                       buf ? strerror(e) : "out of memory");
    }
    int ok = write_all(out, "!<arch>\n", 8) == 0;
    for (int i = 0; ok && i < count; ++i) {
        snprintf(obj, sizeof(obj), "%s/%d.o", work_dir, i);
        int in = open(obj, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (in < 0 || fstat(in, &st) != 0 || (uint64_t)st.st_size > 9999999999ULL) {
            if (in >= 0) close(in);
            ok = 0;
            break;
        }
        char header[61], member[17];
        snprintf(member, sizeof(member), "%d.o/", i);
        snprintf(header, sizeof(header), "%-16s%-12d%-6d%-6d%-8o%-10llu`\n", member, 0, 0, 0, 0644,
                 (unsigned long long)st.st_size);
        ok = write_all(out, header, 60) == 0;
        for (;;) {
            if (!ok) break;
            ssize_t got = read(in, buf, COPY_CHUNK);
            if (got < 0 && errno == EINTR) continue;
            if (got <= 0) {
                ok = got == 0;
                break;
            }
            ok = write_all(out, buf, (size_t)got) == 0;
        }
        close(in);
        if (ok && (st.st_size & 1)) ok = write_all(out, "\n", 1) == 0;
    }
    int e = errno;
    if (close(out) != 0 && ok) {
        ok = 0;
        e = errno;
    }
    free(buf);
    if (!ok) return mr_fail(err, MR_REMOTE, "cannot write the archive to link %s on the device: %s", display, strerror(e));
    return 0;
}

/* ======================================================================================================
 * Running the compiler.
 * ====================================================================================================== */
static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void mr_replace_all(char* text, size_t cap, const char* what, const char* with) {
    size_t lw = strlen(what), lr = strlen(with);
    if (!lw) return;
    char* p = text;
    while ((p = strstr(p, what)) != NULL) {
        size_t tail = strlen(p + lw);
        if ((size_t)(p - text) + lr + tail + 1 > cap) break;
        memmove(p + lr, p + lw, tail + 1);
        memcpy(p, with, lr);
        p += lr;
    }
}

/* The linker's words about "objects.a(N.o)" / "./objects.a" in terms of the tar: "lib.tar(sub/b.o)". */
static void name_members(const char* text, char* out, size_t cap, const char* display, const object_list* objects) {
    size_t n = 0;
    const char* p = text;
    while (*p && n + 1 < cap) {
        const char* at = p;
        if (strncmp(at, "./objects.a", 11) == 0) at += 2;
        if (strncmp(at, "objects.a", 9) == 0) {
            const char* q = at + 9;
            char piece[1400];
            if (*q == '(') {
                char* end;
                long idx = strtol(q + 1, &end, 10);
                if (end > q + 1 && strncmp(end, ".o)", 3) == 0 && idx >= 0 && idx < objects->count) {
                    const char* member = objects->names[idx];
                    snprintf(piece, sizeof(piece), "%s(%.1024s)", display, member);
                    q = end + 3;
                } else {
                    snprintf(piece, sizeof(piece), "%s", display);
                }
            } else {
                snprintf(piece, sizeof(piece), "%s", display);
            }
            size_t len = strlen(piece);
            if (n + len >= cap) break;
            memcpy(out + n, piece, len);
            n += len;
            p = q;
            continue;
        }
        out[n++] = *p++;
    }
    out[n] = '\0';
}

/* Run `cc ... -o ./lib.so ./objects.a` in work_dir. 0 when it linked; else -1 with err. */
static int run_linker(const char* cc, const char* work_dir, const char* display, const object_list* objects,
                      mr_error* err) {
    /* argv: the words of cc, then the fixed arguments (none of them from the client) */
    char words[1024];
    char* argv[48];
    int argc = 0;
    snprintf(words, sizeof(words), "%s", cc);
    char* save = NULL;
    for (char* tok = strtok_r(words, " \t", &save); tok && argc < 32; tok = strtok_r(NULL, " \t", &save))
        argv[argc++] = tok;
    if (argc == 0) return mr_fail(err, MR_UNSUPPORTED, "the device's compiler command is empty");
    const char* fixed[] = {"-shared", "-fPIC", "-fno-lto", "-o", "./lib.so", "-Wl,--whole-archive", "./objects.a",
                           "-Wl,--no-whole-archive", "-lm", NULL};
    for (int i = 0; fixed[i]; ++i) argv[argc++] = (char*)fixed[i];
    argv[argc] = NULL;

    /* the environment: ours, with TMPDIR in the work directory (the toolchain's temporary files stay there) */
    size_t nenv = 0;
    while (environ && environ[nenv]) ++nenv;
    char** envp = (char**)calloc(nenv + 2, sizeof(char*));
    size_t tmp_len = strlen(work_dir) + 8;
    char* tmpdir = (char*)malloc(tmp_len);
    if (!envp || !tmpdir) {
        free(envp);
        free(tmpdir);
        return mr_fail(err, MR_REMOTE, "out of memory linking %s", display);
    }
    snprintf(tmpdir, tmp_len, "TMPDIR=%s", work_dir);
    size_t k = 0;
    for (size_t i = 0; i < nenv; ++i)
        if (strncmp(environ[i], "TMPDIR=", 7) != 0) envp[k++] = environ[i];
    envp[k++] = tmpdir;
    envp[k] = NULL;
    char exec_failed[300];
    snprintf(exec_failed, sizeof(exec_failed), "cannot run the device's compiler (%s): ", argv[0]);
    long max_fd = sysconf(_SC_OPEN_MAX);
    if (max_fd < 0 || max_fd > 65536) max_fd = 65536;

    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) != 0) {
        int e = errno;
        free(envp);
        free(tmpdir);
        return mr_fail(err, MR_BUSY, "server busy: it cannot start the linker (%s); try again later", strerror(e));
    }
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(pipefd[0]);
        close(pipefd[1]);
        free(envp);
        free(tmpdir);
        return mr_fail(err, MR_BUSY, "server busy: it cannot start the linker (%s); try again later", strerror(e));
    }
    if (pid == 0) {
        /* the child: only async-signal-safe calls until execvp */
        setpgid(0, 0); /* its own process group: killed as a whole at the deadline */
        int devnull = open("/dev/null", O_RDONLY);
        if (devnull >= 0) dup2(devnull, 0);
        dup2(pipefd[1], 1);
        dup2(pipefd[1], 2);
#if defined(SYS_close_range)
        if (syscall(SYS_close_range, 3u, ~0u, 0u) != 0)
#endif
            for (long fd = 3; fd < max_fd; ++fd) close((int)fd);
        signal(SIGPIPE, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (chdir(work_dir) != 0) _exit(126);
        environ = envp;
        execvp(argv[0], argv);
        const char* why = strerror(errno);
        ssize_t ignored = write(1, exec_failed, strlen(exec_failed));
        ignored = write(1, why, strlen(why));
        (void)ignored;
        _exit(127);
    }
    setpgid(pid, pid);
    close(pipefd[1]);
    free(envp);
    free(tmpdir);

    char* output = (char*)malloc(LINK_OUTPUT_CAP);
    size_t used = 0;
    int truncated = 0, timed_out = 0, status = 0;
    int64_t deadline = now_ms() + LINK_TIMEOUT_S * 1000;
    char sink[4096];
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0) {
            timed_out = 1;
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            break;
        }
        struct pollfd p = {pipefd[0], POLLIN, 0};
        int ready = poll(&p, 1, (int)(left > 1000 ? 1000 : left));
        if (ready < 0 && errno != EINTR) break;
        if (ready <= 0) continue;
        ssize_t got;
        if (output && used + 1 < LINK_OUTPUT_CAP)
            got = read(pipefd[0], output + used, LINK_OUTPUT_CAP - 1 - used);
        else
            got = read(pipefd[0], sink, sizeof(sink)); /* over the cap: read and dropped */
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break; /* every writer closed it: the compiler ended (or closed its output) */
        if (output && used + 1 < LINK_OUTPUT_CAP)
            used += (size_t)got;
        else
            truncated = 1;
    }
    close(pipefd[0]);
    /* wait for it, within the same deadline */
    for (;;) {
        pid_t r = waitpid(pid, &status, timed_out ? 0 : WNOHANG);
        if (r == pid) break;
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) { /* ECHILD: someone else reaped it (SIGCHLD ignored): judge by the output file */
            status = -1;
            break;
        }
        if (timed_out) continue;
        if (now_ms() >= deadline) {
            timed_out = 1;
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            continue;
        }
        struct timespec nap = {0, 10 * 1000 * 1000};
        nanosleep(&nap, NULL);
    }
    if (timed_out) {
        kill(-pid, SIGKILL); /* whatever of its process group is left */
        free(output);
        return mr_fail(err, MR_REMOTE, "linking %s on the device failed:\nthe linker ran for over %d s and was stopped",
                       display, LINK_TIMEOUT_S);
    }
    char so[4200];
    snprintf(so, sizeof(so), "%s/lib.so", work_dir);
    struct stat st;
    int linked = status == -1 ? stat(so, &st) == 0 : (WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (linked) {
        free(output);
        return 0;
    }
    /* the error text: the compiler's own words, with work_dir paths made relative and members named */
    char* text = (char*)malloc(LINK_OUTPUT_CAP + 64);
    char* named = (char*)malloc(MR_ERR_CAP);
    if (!output || !text || !named) {
        free(output);
        free(text);
        free(named);
        return mr_fail(err, MR_REMOTE, "linking %s on the device failed", display);
    }
    output[used] = '\0';
    snprintf(text, LINK_OUTPUT_CAP + 64, "%s%s", output, truncated ? "\n[... more output dropped]" : "");
    char prefix[4200];
    snprintf(prefix, sizeof(prefix), "%s/", work_dir);
    mr_replace_all(text, LINK_OUTPUT_CAP + 64, prefix, "");
    mr_replace_all(text, LINK_OUTPUT_CAP + 64, work_dir, ".");
    name_members(text, named, MR_ERR_CAP, display, objects);
    size_t len = strlen(named); /* strip, as Python's str.strip() */
    while (len && (named[len - 1] == '\n' || named[len - 1] == ' ' || named[len - 1] == '\r')) named[--len] = '\0';
    char* start = named;
    while (*start == '\n' || *start == ' ') ++start;
    if (!*start) {
        if (WIFSIGNALED(status))
            snprintf(named, MR_ERR_CAP, "the compiler (%s) was killed by signal %d", argv[0], WTERMSIG(status));
        else
            snprintf(named, MR_ERR_CAP, "the compiler (%s) exited with status %d and no message", argv[0],
                     WEXITSTATUS(status));
        start = named;
    }
    mr_fail(err, MR_REMOTE, "linking %s on the device failed:\n%s", display, start);
    free(output);
    free(text);
    free(named);
    return -1;
}

/* ======================================================================================================
 * The entry points.
 * ====================================================================================================== */
/* Check the objects extracted into work_dir (N.o), archive and link them, keep the library as out_so. */
static int link_extracted(const object_list* objects, const char* display, const char* work_dir, const char* out_so,
                          const char* cc, mr_error* err) {
    int rc = 0;
    for (int i = 0; rc == 0 && i < objects->count; ++i) {
        char path[4200];
        snprintf(path, sizeof(path), "%s/%d.o", work_dir, i);
        rc = check_object(path, objects->names[i], err);
    }
    if (rc == 0) rc = write_archive(work_dir, objects->count, err, display);
    if (rc == 0) rc = run_linker(cc, work_dir, display, objects, err);
    if (rc == 0) {
        char so[4200];
        snprintf(so, sizeof(so), "%s/lib.so", work_dir);
        if (rename(so, out_so) != 0)
            rc = mr_fail(err, MR_REMOTE, "cannot keep the library linked from %s: %s", display, strerror(errno));
    }
    return rc;
}

int mr_link_tar(const char* tar_path, const char* display, const char* work_dir, const char* out_so, const char* cc,
                uint64_t quota_limit, uint64_t quota_used, mr_error* err) {
    crc_init();
    if (!cc || !*cc)
        return mr_fail(err, MR_UNSUPPORTED,
                       "this device has no C compiler to link a .tar module: install gcc on the device, or "
                       "cross-compile and upload a .so instead");
    int fd = open(tar_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return mr_fail(err, errno == ENOENT ? MR_NOT_FOUND : MR_REMOTE, "cannot read %s: %s", display, strerror(errno));
    uint8_t magic[6] = {0};
    ssize_t got = pread(fd, magic, sizeof(magic), 0);
    const char* compression = NULL;
    if (got >= 3 && memcmp(magic, "BZh", 3) == 0) compression = "bzip2";
    if (got >= 6 && memcmp(magic, "\xfd" "7zXZ\0", 6) == 0) compression = "xz";
    if (got >= 4 && memcmp(magic, "\x28\xb5\x2f\xfd", 4) == 0) compression = "zstd";
    if (compression) {
        close(fd);
        return mr_fail(err, MR_BAD_REQUEST,
                       "%s is compressed with %s, which this device does not read: upload the tar uncompressed or "
                       "gzip-compressed (tar -czf)",
                       display, compression);
    }
    source* s = (source*)calloc(1, sizeof(source));
    if (!s) {
        close(fd);
        return mr_fail(err, MR_REMOTE, "out of memory linking %s", display);
    }
    s->fd = fd;
    s->gz = got >= 2 && magic[0] == 0x1f && magic[1] == 0x8b;
    s->quota_limit = quota_limit;
    s->quota_used = quota_used;
    s->quota_left = quota_limit > quota_used ? quota_limit - quota_used : 0;
    s->limit = quota_limit && s->quota_left < TAR_MAX_BYTES ? s->quota_left : TAR_MAX_BYTES;
    s->state = GZ_MEMBER_HEADER;
    object_list objects;
    memset(&objects, 0, sizeof(objects));
    int rc = extract_objects(s, display, work_dir, &objects, err);
    close(fd);
    free(s);
    if (rc == 0) rc = link_extracted(&objects, display, work_dir, out_so, cc, err);
    objects_free(&objects);
    return rc;
}

int mr_link_object(const char* obj_path, const char* display, const char* work_dir, const char* out_so, const char* cc,
                   mr_error* err) {
    if (!cc || !*cc)
        return mr_fail(err, MR_UNSUPPORTED,
                       "this device has no C compiler to link an object file into a module: install gcc on the "
                       "device, or cross-compile and upload a .so instead");
    char path[4200];
    snprintf(path, sizeof(path), "%s/0.o", work_dir);
    int in = open(obj_path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    int out = in < 0 ? -1 : open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    int rc = in < 0 || out < 0 ? -1 : 0;
    char buf[65536];
    ssize_t n;
    while (rc == 0 && (n = read(in, buf, sizeof(buf))) != 0) {
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 || write(out, buf, (size_t)n) != n) rc = -1;
    }
    int e = errno;
    if (in >= 0) close(in);
    if (out >= 0) close(out);
    if (rc) return mr_fail(err, MR_REMOTE, "cannot copy %s to link it: %s", display, strerror(e));
    object_list objects;
    memset(&objects, 0, sizeof(objects));
    objects.names = (char**)malloc(sizeof(char*));
    if (!objects.names || !(objects.names[0] = strdup(display))) {
        free(objects.names);
        return mr_fail(err, MR_REMOTE, "out of memory linking %s", display);
    }
    objects.count = objects.cap = 1;
    rc = link_extracted(&objects, display, work_dir, out_so, cc, err);
    objects_free(&objects);
    if (rc) { /* the checks speak of .tar members: this is one object file */
        mr_replace_all(err->msg, sizeof(err->msg), "the .tar member ", "the object file ");
        mr_replace_all(err->msg, sizeof(err->msg), "a .tar module holds", "load_module takes");
    }
    return rc;
}

/* Is `name` (a path, or a command looked up on PATH) an executable file? */
static int runnable(const char* name) {
    struct stat st;
    if (strchr(name, '/')) return access(name, X_OK) == 0 && stat(name, &st) == 0 && S_ISREG(st.st_mode);
    const char* path = getenv("PATH");
    if (!path || !*path) path = "/usr/local/bin:/usr/bin:/bin";
    char full[4200];
    while (*path) {
        const char* colon = strchr(path, ':');
        size_t len = colon ? (size_t)(colon - path) : strlen(path);
        if (len == 0)
            snprintf(full, sizeof(full), "./%s", name);
        else
            snprintf(full, sizeof(full), "%.*s/%s", (int)len, path, name);
        if (access(full, X_OK) == 0 && stat(full, &st) == 0 && S_ISREG(st.st_mode)) return 1;
        if (!colon) break;
        path = colon + 1;
    }
    return 0;
}

const char* mr_find_cc(const char* preferred) {
    static char found[1024];
    if (preferred && *preferred) return preferred;
    const char* candidates[] = {getenv("WORKBENCH_CC"), getenv("CC"), "cc", "gcc", "clang"};
    for (size_t i = 0; i < sizeof(candidates) / sizeof(candidates[0]); ++i) {
        const char* c = candidates[i];
        if (!c) continue;
        while (*c == ' ' || *c == '\t') ++c;
        if (!*c || strlen(c) >= sizeof(found)) continue;
        char first[1024];
        size_t n = strcspn(c, " \t");
        memcpy(first, c, n);
        first[n] = '\0';
        if (runnable(first)) {
            snprintf(found, sizeof(found), "%s", c);
            return found;
        }
    }
    return NULL;
}
