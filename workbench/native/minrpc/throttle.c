/*
 * throttle.c: guessing the auth token is slowed down per client address (docs/protocol.md, "Authentication").
 *
 * After a wrong proof from an address, one CONNECT from it is evaluated per min(0.25 s * 2^(n-1), 4 s)
 * (n = its wrong proofs; forgotten 5 minutes after the last one, or at its first success); its other
 * CONNECTs wait their turn (within their handshake deadline). Other addresses are not affected.
 *
 * Session processes check CONNECTs, so the table lives in memory the listener shares with them (created
 * before the first fork), guarded by a process-shared robust mutex: a session process killed while it holds
 * the lock does not block the others. The table is small (the addresses seen last); the oldest is replaced.
 */
#include "core.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define THROTTLE_SLOTS 256
#define THROTTLE_BASE_NS 250000000LL
#define THROTTLE_MAX_NS 4000000000LL
#define THROTTLE_FORGET_NS 300000000000LL

typedef struct {
    uint8_t addr[16];
    int used;
    int failures;
    int64_t next_ns; /* when its next attempt may be evaluated */
    int64_t last_ns; /* its last wrong proof */
} slot;

struct mr_throttle {
    pthread_mutex_t lock;
    slot slots[THROTTLE_SLOTS];
};

mr_throttle* mr_throttle_new(void) {
    mr_throttle* t = (mr_throttle*)mmap(NULL, sizeof(mr_throttle), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                                        -1, 0);
    if (t == MAP_FAILED) return NULL;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&t->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    return t;
}

static void lock(mr_throttle* t) {
    if (pthread_mutex_lock(&t->lock) == EOWNERDEAD) pthread_mutex_consistent(&t->lock); /* its owner died */
}

static int64_t delay_ns(int failures) {
    if (failures <= 0) return 0;
    int64_t d = THROTTLE_BASE_NS;
    for (int i = 1; i < failures && d < THROTTLE_MAX_NS; ++i) d *= 2;
    return d < THROTTLE_MAX_NS ? d : THROTTLE_MAX_NS;
}

/* The slot of addr (forgotten ones cleared), or NULL. */
static slot* find(mr_throttle* t, const uint8_t addr[16], int64_t now) {
    for (int i = 0; i < THROTTLE_SLOTS; ++i) {
        slot* s = &t->slots[i];
        if (!s->used || memcmp(s->addr, addr, 16) != 0) continue;
        if (now - s->last_ns > THROTTLE_FORGET_NS) {
            s->used = 0;
            return NULL;
        }
        return s;
    }
    return NULL;
}

int64_t mr_throttle_turn(mr_throttle* t, const uint8_t addr[16]) {
    int64_t now = mr_now_ns();
    lock(t);
    slot* s = find(t, addr, now);
    int64_t turn = s && s->next_ns > now ? s->next_ns : 0;
    if (!turn && s) s->next_ns = now + delay_ns(s->failures); /* this attempt is evaluated: the next one waits */
    pthread_mutex_unlock(&t->lock);
    return turn;
}

int mr_throttle_failed(mr_throttle* t, const uint8_t addr[16], double* delay_s) {
    int64_t now = mr_now_ns();
    lock(t);
    slot* s = find(t, addr, now);
    if (!s) { /* a free slot, or the one whose last failure is oldest */
        s = &t->slots[0];
        for (int i = 0; i < THROTTLE_SLOTS; ++i) {
            if (!t->slots[i].used) {
                s = &t->slots[i];
                break;
            }
            if (t->slots[i].last_ns < s->last_ns) s = &t->slots[i];
        }
        memset(s, 0, sizeof(*s));
        memcpy(s->addr, addr, 16);
        s->used = 1;
    }
    s->failures++;
    s->next_ns = now + delay_ns(s->failures);
    s->last_ns = now;
    int failures = s->failures;
    *delay_s = (double)delay_ns(failures) / 1e9;
    pthread_mutex_unlock(&t->lock);
    return failures;
}

void mr_throttle_succeeded(mr_throttle* t, const uint8_t addr[16]) {
    lock(t);
    slot* s = find(t, addr, mr_now_ns());
    if (s) s->used = 0;
    pthread_mutex_unlock(&t->lock);
}
