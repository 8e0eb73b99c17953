/*
 * sha256.c: SHA-256 (FIPS 180-4), HMAC-SHA256 (RFC 2104), constant-time comparison and random bytes.
 *
 * What the handshake's auth proofs and the tracker's registration proofs need (docs/protocol.md
 * "Authentication", "Registration tokens"):
 *   proof = HMAC-SHA256(token, label + nonce)
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* syscall() */
#endif
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/syscall.h>
#endif

#include "minrpc.h"

typedef struct {
    uint32_t state[8];
    uint64_t total; /* bytes hashed so far */
    uint8_t block[64];
    size_t used; /* bytes waiting in block */
} sha256_ctx;

/* The first 32 bits of the fractional parts of the cube roots of the first 64 primes. */
static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

/* One 64-byte block into the state. */
static void sha256_compress(uint32_t state[8], const uint8_t block[64]) {
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 | (uint32_t)block[4 * i + 2] << 8 |
               (uint32_t)block[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
        uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int i = 0; i < 64; ++i) {
        uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
}

static void sha256_init(sha256_ctx* ctx) {
    /* the first 32 bits of the fractional parts of the square roots of the first 8 primes */
    static const uint32_t H0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(ctx->state, H0, sizeof(H0));
    ctx->total = 0;
    ctx->used = 0;
}

static void sha256_update(sha256_ctx* ctx, const void* data, size_t len) {
    const uint8_t* p = (const uint8_t*)data;
    ctx->total += len;
    if (ctx->used) {
        size_t take = 64 - ctx->used < len ? 64 - ctx->used : len;
        memcpy(ctx->block + ctx->used, p, take);
        ctx->used += take;
        p += take;
        len -= take;
        if (ctx->used < 64) return;
        sha256_compress(ctx->state, ctx->block);
        ctx->used = 0;
    }
    for (; len >= 64; p += 64, len -= 64) sha256_compress(ctx->state, p);
    if (len) memcpy(ctx->block, p, len);
    ctx->used = len;
}

static void sha256_final(sha256_ctx* ctx, uint8_t out[32]) {
    uint64_t bits = ctx->total * 8;
    uint8_t pad[72]; /* 0x80, zeros up to 56 mod 64, then the length in bits, big-endian */
    size_t n = (ctx->used < 56 ? 56 : 120) - ctx->used;
    memset(pad, 0, sizeof(pad));
    pad[0] = 0x80;
    for (int i = 0; i < 8; ++i) pad[n + (size_t)i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_update(ctx, pad, n + 8);
    for (int i = 0; i < 8; ++i) {
        out[4 * i] = (uint8_t)(ctx->state[i] >> 24);
        out[4 * i + 1] = (uint8_t)(ctx->state[i] >> 16);
        out[4 * i + 2] = (uint8_t)(ctx->state[i] >> 8);
        out[4 * i + 3] = (uint8_t)ctx->state[i];
    }
    memset(ctx, 0, sizeof(*ctx));
}

void mr_sha256(const void* data, size_t len, uint8_t out[32]) {
    sha256_ctx ctx;
    sha256_init(&ctx);
    sha256_update(&ctx, data, len);
    sha256_final(&ctx, out);
}

void mr_hmac_sha256(const void* key, size_t key_len, const void* msg1, size_t len1, const void* msg2, size_t len2,
                    uint8_t out[32]) {
    uint8_t k[64], pad[64], inner[32];
    sha256_ctx ctx;
    memset(k, 0, sizeof(k));
    if (key_len > 64)
        mr_sha256(key, key_len, k); /* a key longer than a block is hashed first */
    else if (key_len)
        memcpy(k, key, key_len);

    for (int i = 0; i < 64; ++i) pad[i] = k[i] ^ 0x36;
    sha256_init(&ctx);
    sha256_update(&ctx, pad, 64);
    if (len1) sha256_update(&ctx, msg1, len1);
    if (msg2 && len2) sha256_update(&ctx, msg2, len2);
    sha256_final(&ctx, inner);

    for (int i = 0; i < 64; ++i) pad[i] = k[i] ^ 0x5c;
    sha256_init(&ctx);
    sha256_update(&ctx, pad, 64);
    sha256_update(&ctx, inner, 32);
    sha256_final(&ctx, out);
    memset(k, 0, sizeof(k));
    memset(pad, 0, sizeof(pad));
}

int mr_equal_ct(const uint8_t* a, const uint8_t* b, size_t n) {
    volatile uint8_t diff = 0; /* no early exit: the time does not depend on where they differ */
    for (size_t i = 0; i < n; ++i) diff |= (uint8_t)(a[i] ^ b[i]);
    return diff == 0;
}

/* /dev/urandom, for kernels without getrandom(2). */
static int random_from_urandom(uint8_t* p, size_t n) {
    int fd;
    do {
        fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) return -1;
    while (n > 0) {
        ssize_t got = read(fd, p, n);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            close(fd);
            return -1;
        }
        p += got;
        n -= (size_t)got;
    }
    close(fd);
    return 0;
}

int mr_random(void* out, size_t n) {
    uint8_t* p = (uint8_t*)out;
#if defined(SYS_getrandom)
    while (n > 0) {
        size_t ask = n > 256 ? 256 : n; /* up to 256 bytes never come back short once the pool is ready */
        long got = syscall(SYS_getrandom, p, ask, 0);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break; /* ENOSYS (an old kernel, a seccomp filter): fall back */
        p += got;
        n -= (size_t)got;
    }
    if (n == 0) return 0;
#endif
    return random_from_urandom(p, n);
}
