/*
 * handshake.c: the handshake (docs/protocol.md sections 5 and 7), read without blocking.
 *
 * The listener runs the handshake of every connection in its own event loop (main.c): it reads the
 * preamble, answers with ours and a HELLO, reads exactly one CONNECT frame and checks it (auth, key,
 * constructor, timeout), all without a process of its own per connection. Only a CONNECT that passed its
 * checks gets a session process (session.c). The auth proof is computed here, where no kernel runs.
 * With --stdio, mr_handshake_run drives the same steps on stdin/stdout, waiting for each.
 *
 * A connection whose first four bytes are TVM's RPC magic (71 f2 0f 00) is a TVM client (docs/protocol.md section
 * 13.2): the rest of those 8 bytes is its key's length; its key is checked (tvm.c) and answered with ours, then
 * its INIT_SERVER packet is read and checked, under the same deadline and bounds, before its session is forked.
 */
#include "core.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define TOKEN_ENV "WORKBENCH_RPC_TOKEN"

static const uint8_t OUR_PREAMBLE[8] = {'W', 'B', 'R', 'P', 1, 0, 0, 0};

void mr_handshake_init(mr_handshake* hs, int rfd, int wfd, int is_socket, int64_t deadline_ns) {
    memset(hs, 0, sizeof(*hs));
    hs->rfd = rfd;
    hs->wfd = wfd;
    hs->is_socket = is_socket;
    hs->deadline_ns = deadline_ns;
    hs->stage = HS_PREAMBLE;
    snprintf(hs->peer, sizeof(hs->peer), "stdio");
}

void mr_handshake_free(mr_handshake* hs) {
    free(hs->ctrl);
    hs->ctrl = NULL;
}

static ssize_t send_now(const mr_handshake* hs, const void* p, size_t n) {
    if (hs->is_socket) return send(hs->wfd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    return write(hs->wfd, p, n);
}

void mr_handshake_refuse(mr_handshake* hs, int code, const char* fmt, ...) {
    char msg[MR_ERR_CAP];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (hs->tvm) { /* before our key went out TVM's client reads one i32 and no text */
        mr_log_info("refused the TVM client %s: %s", hs->peer, msg);
        if (hs->tvm_answered) {
            mr_notice_nowait(hs->wfd, hs->is_socket, 1, code, msg);
        } else {
            const uint32_t m = MR_TVM_MISMATCH;
            uint8_t mismatch[4] = {(uint8_t)m, (uint8_t)(m >> 8), (uint8_t)(m >> 16), (uint8_t)(m >> 24)};
            ssize_t w = send_now(hs, mismatch, sizeof(mismatch));
            (void)w;
        }
        return;
    }
    mr_log_info("refused %s: %s", hs->peer, msg);
    if (!hs->greeted) { /* the client learns our version first */
        ssize_t w = send_now(hs, OUR_PREAMBLE, sizeof(OUR_PREAMBLE));
        (void)w;
        hs->greeted = 1;
    }
    conn_send_error_nowait(hs->wfd, hs->is_socket, code, msg);
}

void mr_handshake_expire(mr_handshake* hs, const mr_config* cfg) {
    if (hs->stage == HS_PREAMBLE) return; /* not even a preamble: nothing to say to it */
    mr_handshake_refuse(hs, MR_PROTOCOL, "the handshake did not complete within %g s (the server's "
                        "handshake_timeout); closing this connection", cfg->handshake_timeout);
}

/* The preamble is in hs->head: answer with ours and a HELLO. 0, or -1 (refused, or the peer is gone). */
static int got_preamble(mr_handshake* hs, const mr_config* cfg) {
    const uint8_t* pre = hs->head;
    int version = pre[4] | pre[5] << 8, flags = pre[6] | pre[7] << 8;
    char shown[64];
    if (memcmp(pre, "WBRP", 4) != 0) {
        mr_handshake_refuse(hs, MR_PROTOCOL, "bad magic %s: this is an rpc-workbench server (protocol v1); connect "
                            "with workbench.rpc.connect (or TVM's tvm.rpc.connect)",
                            py_repr_bytes(pre, 4, shown, sizeof(shown)));
        return -1;
    }
    if (version != MR_VERSION) {
        mr_handshake_refuse(hs, MR_PROTOCOL, "the client speaks protocol version %d, this server speaks 1: install "
                            "the same rpc-workbench version on both sides", version);
        return -1;
    }
    if (flags & MR_FLAG_SERVER) {
        mr_handshake_refuse(hs, MR_PROTOCOL, "this is an RPC server, not a proxy: a server started with is_proxy=True "
                            "(--through-proxy) must connect to an RPC proxy (python -m workbench.exec.rpc_proxy); "
                            "rpc_server and rpc_proxy both default to port 9090, so give one of them another --port");
        return -1;
    }
    if (mr_random(hs->nonce, sizeof(hs->nonce))) {
        mr_handshake_refuse(hs, MR_BUSY, "server busy: it cannot read random bytes for the handshake's nonce; try "
                            "again later");
        return -1;
    }
    mp_buf b = {0};
    mp_put_raw(&b, OUR_PREAMBLE, sizeof(OUR_PREAMBLE));
    mp_reserve(&b, MR_HEADER);
    b.len += MR_HEADER;
    mp_put_map(&b, 3);
    mp_put_cstr(&b, "version");
    mp_put_int(&b, MR_VERSION);
    mp_put_cstr(&b, "nonce");
    mp_put_bin(&b, hs->nonce, MR_NONCE);
    mp_put_cstr(&b, "auth");
    mp_put_bool(&b, cfg->token != NULL);
    int rc = -1;
    if (!b.failed) {
        size_t at = sizeof(OUR_PREAMBLE);
        mr_put_header(b.data + at, (uint32_t)(b.len - at - MR_HEADER), K_HELLO, 0, 0);
        /* a fresh connection's buffer takes these ~90 bytes at once; if it does not, the peer is gone */
        rc = send_now(hs, b.data, b.len) == (ssize_t)b.len ? 0 : -1;
        hs->greeted = 1;
    }
    mp_buf_free(&b);
    return rc;
}

/* ---- a TVM client (docs/protocol.md section 13.2) ------------------------------------------------------ */
static const uint8_t TVM_MAGIC[4] = {0x71, 0xf2, 0x0f, 0x00};

/* Its key is in hs->ctrl: check it and answer with ours. 0, or -1 (refused, or the peer is gone). */
static int tvm_got_key(mr_handshake* hs, const mr_config* cfg, const char* matchkey) {
    mr_error err;
    int rc = mr_tvm_check_key(hs->ctrl, hs->ctrl_len, cfg, matchkey, hs->tvm_timeout, sizeof(hs->tvm_timeout),
                              hs->tvm_key, sizeof(hs->tvm_key), &err);
    mr_handshake_free(hs);
    if (rc) {
        mr_handshake_refuse(hs, err.code, "%s", err.msg);
        return -1;
    }
    size_t n = strlen(cfg->key) + 7;
    uint8_t* reply = (uint8_t*)malloc(8 + n);
    if (!reply) {
        mr_handshake_refuse(hs, MR_BUSY, "server busy: it is out of memory; try again later");
        return -1;
    }
    memcpy(reply, TVM_MAGIC, 4);
    for (int i = 0; i < 4; ++i) reply[4 + i] = (uint8_t)(n >> (8 * i));
    memcpy(reply + 8, "server:", 7);
    memcpy(reply + 15, cfg->key, n - 7);
    /* a fresh connection's buffer takes it at once; if it does not, the peer is gone */
    rc = send_now(hs, reply, 8 + n) == (ssize_t)(8 + n) ? 0 : -1;
    free(reply);
    hs->tvm_answered = 1;
    hs->stage = HS_TVM_LENGTH;
    return rc;
}

/* TVM's magic is in hs->head, its key's length after it. 0, or -1 (refused). */
static int tvm_got_magic(mr_handshake* hs, const mr_config* cfg, const char* matchkey) {
    const uint8_t* h = hs->head;
    int32_t keylen = (int32_t)((uint32_t)h[4] | (uint32_t)h[5] << 8 | (uint32_t)h[6] << 16 | (uint32_t)h[7] << 24);
    hs->tvm = 1;
    if (keylen < 0 || keylen > MR_TVM_MAX_KEY) {
        mr_handshake_refuse(hs, MR_TOO_LARGE, "a TVM handshake key of %d bytes", (int)keylen);
        return -1;
    }
    hs->ctrl = (uint8_t*)malloc(keylen ? (size_t)keylen : 1);
    if (!hs->ctrl) {
        mr_handshake_refuse(hs, MR_BUSY, "server busy: it is out of memory; try again later");
        return -1;
    }
    hs->ctrl_len = (size_t)keylen;
    hs->stage = HS_TVM_KEY;
    return keylen ? 0 : tvm_got_key(hs, cfg, matchkey);
}

/* The INIT_SERVER packet's length is in hs->head. 0, or -1 (refused). */
static int tvm_got_length(mr_handshake* hs) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | hs->head[i];
    if (n > MR_TVM_MAX_INIT) {
        mr_handshake_refuse(hs, MR_TOO_LARGE, "a %llu-byte packet where INIT_SERVER was expected is over the "
                            "handshake's %d-byte limit", (unsigned long long)n, MR_TVM_MAX_INIT);
        return -1;
    }
    if (!n) return 0; /* an empty packet is skipped */
    hs->ctrl = (uint8_t*)malloc((size_t)n);
    if (!hs->ctrl) {
        mr_handshake_refuse(hs, MR_BUSY, "server busy: it is out of memory; try again later");
        return -1;
    }
    hs->ctrl_len = (size_t)n;
    hs->stage = HS_TVM_INIT;
    return 0;
}

/* INIT_SERVER is read: its checks (serve.py _got_tvm_init, in that order), then the token's. 0, or -1. */
static int check_tvm(mr_handshake* hs, const mr_config* cfg, mr_connect* out) {
    mr_error err;
    if (mr_tvm_check_init(hs->ctrl, hs->ctrl_len, &err)) {
        mr_handshake_refuse(hs, err.code, "%s", err.msg);
        return -1;
    }
    if (hs->tvm_timeout[0]) { /* as float(text), then check_session_timeout */
        const char* text = hs->tvm_timeout;
        char* end = NULL;
        errno = 0;
        double v = strtod(text, &end);
        while (end && (*end == ' ' || *end == '\t')) ++end;
        char shown[200];
        py_repr_str(text, strlen(text), shown, sizeof(shown));
        if (end == text || !end || *end) {
            mr_handshake_refuse(hs, MR_PROTOCOL, "-timeout=%s: could not convert string to float: %s", text, shown);
            return -1;
        }
        if (!(v >= 0 && v <= MR_MAX_SESSION_TIMEOUT)) {
            char num[64];
            mr_handshake_refuse(hs, MR_PROTOCOL, "-timeout=%s: session_timeout must be a number >= 0 and at most "
                                "31536000 seconds (one year; 0 means no limit), not %s", text,
                                py_repr_float(v, num, sizeof(num)));
            return -1;
        }
        out->timeout = v;
    }
    if (cfg->token && !cfg->allow_tvm_clients) {
        mr_log_error("refused a TVM-protocol client from %s: this server has an auth token, which TVM's client cannot "
                     "prove (--allow-tvm-clients lets them in)", hs->peer);
        mr_handshake_refuse(hs, MR_AUTH, "this server requires an auth token, which TVM's RPC client cannot prove: "
                            "connect with workbench.rpc.connect(..., auth_token=...), or start the server with "
                            "allow_tvm_clients=True (rpc_server --allow-tvm-clients) to let TVM's clients in without "
                            "a token");
        return -1;
    }
    char shown[300];
    mr_log_info("TVM-protocol client %s, key %s", hs->peer, py_repr_str(hs->tvm_key, strlen(hs->tvm_key), shown,
                                                                        sizeof(shown)));
    out->tvm = 1;
    return 0;
}

/* The CONNECT header is in hs->head: check its sizes. 0, or -1 (refused). */
static int got_header(mr_handshake* hs) {
    const uint8_t* h = hs->head;
    uint64_t ctrl_len = (uint64_t)h[0] | (uint64_t)h[1] << 8 | (uint64_t)h[2] << 16 | (uint64_t)h[3] << 24;
    uint64_t bulk_len = 0;
    for (int i = 7; i >= 0; --i) bulk_len = (bulk_len << 8) | h[8 + i];
    if (ctrl_len > MR_MAX_CTRL) {
        mr_handshake_refuse(hs, MR_TOO_LARGE, "control part of %llu bytes is over the %llu-byte limit (is the peer "
                            "speaking the workbench protocol?)", (unsigned long long)ctrl_len,
                            (unsigned long long)MR_MAX_CTRL);
        return -1;
    }
    if (bulk_len > MR_MAX_BULK) {
        mr_handshake_refuse(hs, MR_TOO_LARGE, "bulk part of %llu bytes is over the %llu-byte limit",
                            (unsigned long long)bulk_len, (unsigned long long)MR_MAX_BULK);
        return -1;
    }
    if (ctrl_len > MR_MAX_CONNECT_CTRL) {
        mr_handshake_refuse(hs, MR_TOO_LARGE, "a %llu-byte message where CONNECT was expected is over the handshake's "
                            "%d-byte limit", (unsigned long long)ctrl_len, MR_MAX_CONNECT_CTRL);
        return -1;
    }
    if (ctrl_len == 0) {
        mr_handshake_refuse(hs, MR_PROTOCOL, "malformed control message: an empty control part");
        return -1;
    }
    hs->kind = h[4] | h[5] << 8;
    hs->ctrl_len = (size_t)ctrl_len;
    hs->bulk_left = bulk_len;
    hs->ctrl = (uint8_t*)malloc(hs->ctrl_len);
    if (!hs->ctrl) {
        mr_handshake_refuse(hs, MR_BUSY, "server busy: it is out of memory; try again later");
        return -1;
    }
    return 0;
}

/* The CONNECT frame is read: with a token, its address may have to wait for the auth throttle. */
static int connect_read(mr_handshake* hs, const mr_config* cfg, mr_throttle* throttle) {
    hs->stage = HS_WAIT;
    if (!cfg->token || !throttle) return 1;
    int64_t turn = mr_throttle_turn(throttle, hs->addr);
    if (!turn) return 1;
    if (turn > hs->deadline_ns) {
        mr_handshake_expire(hs, cfg);
        return -1;
    }
    hs->turn_ns = turn;
    return 0;
}

int mr_handshake_step(mr_handshake* hs, const mr_config* cfg, const char* matchkey, mr_throttle* throttle) {
    if (hs->stage == HS_WAIT) return hs->tvm ? 1 : connect_read(hs, cfg, throttle);
    for (;;) { /* as far as the bytes already here go */
        uint8_t scratch[4096];
        uint8_t* dst;
        size_t need;
        if (hs->stage == HS_PREAMBLE || hs->stage == HS_HEADER || hs->stage == HS_TVM_LENGTH) {
            need = (hs->stage == HS_HEADER ? MR_HEADER : 8) - hs->have;
            dst = hs->head + hs->have;
        } else if (hs->stage == HS_CTRL || hs->stage == HS_TVM_KEY || hs->stage == HS_TVM_INIT) {
            need = hs->ctrl_len - hs->have;
            dst = hs->ctrl + hs->have;
        } else { /* HS_BULK: a bulk part on CONNECT means nothing: read and dropped */
            need = hs->bulk_left < sizeof(scratch) ? (size_t)hs->bulk_left : sizeof(scratch);
            dst = scratch;
        }
        ssize_t got = hs->is_socket ? recv(hs->rfd, dst, need, MSG_DONTWAIT) : read(hs->rfd, dst, need);
        if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return 0;
        if (got <= 0) return -1; /* the peer left mid-handshake (or its connection broke): nothing to say */
        if (hs->stage == HS_BULK) {
            hs->bulk_left -= (uint64_t)got;
            if (!hs->bulk_left) return connect_read(hs, cfg, throttle);
            if (!hs->is_socket) return 0;
            continue;
        }
        hs->have += (size_t)got;
        if ((size_t)got < need) {
            if (!hs->is_socket) return 0; /* a pipe: read again once poll says so */
            continue;
        }
        hs->have = 0;
        if (hs->stage == HS_PREAMBLE && !memcmp(hs->head, TVM_MAGIC, 4)) {
            if (tvm_got_magic(hs, cfg, matchkey)) return -1;
        } else if (hs->stage == HS_TVM_KEY) {
            if (tvm_got_key(hs, cfg, matchkey)) return -1;
        } else if (hs->stage == HS_TVM_LENGTH) {
            if (tvm_got_length(hs)) return -1;
        } else if (hs->stage == HS_TVM_INIT) {
            hs->stage = HS_WAIT; /* what follows is the session's */
            return 1;
        } else if (hs->stage == HS_PREAMBLE) {
            if (got_preamble(hs, cfg)) return -1;
            hs->stage = HS_HEADER;
        } else if (hs->stage == HS_HEADER) {
            if (got_header(hs)) return -1;
            hs->stage = HS_CTRL;
        } else {
            if (!hs->bulk_left) return connect_read(hs, cfg, throttle);
            hs->stage = HS_BULK;
        }
        if (!hs->is_socket) return 0;
    }
}

/* CONNECT's checks (workbench/rpc/wire/handshake.py check_connect, in that order). */
static int check_options(mr_handshake* hs, const mr_config* cfg, const mp_node* opts, const char* matchkey,
                         mr_throttle* throttle, mr_connect* out) {
    char a[300], b[300];
    int kind = hs->kind;
    if (kind != K_CONNECT || opts->type != MP_MAP) {
        mr_handshake_refuse(hs, MR_PROTOCOL, "expected a CONNECT message after HELLO, got kind %d%s", kind,
                            kind == K_REGISTER ? ": a server started with is_proxy=True (--through-proxy) must connect "
                            "to an RPC proxy (python -m workbench.exec.rpc_proxy), not to a server" : "");
        return -1;
    }
    if (cfg->token) {
        const mp_node* proof = mp_map_get(opts, "proof");
        int missing = !proof || proof->type == MP_NIL || ((proof->type == MP_BIN || proof->type == MP_STR) && !proof->len) ||
                      ((proof->type == MP_BOOL || proof->type == MP_INT) && proof->v.i == 0);
        if (missing) {
            mr_handshake_refuse(hs, MR_AUTH, "this server requires an auth token: pass auth_token=... to rpc.connect "
                                "or set %s on the client", TOKEN_ENV);
            return -1;
        }
        uint8_t expected[32];
        mr_hmac_sha256(cfg->token, strlen(cfg->token), "workbench-rpc-v1", 16, hs->nonce, MR_NONCE, expected);
        if (proof->type != MP_BIN || proof->len != 32 || !mr_equal_ct((const uint8_t*)proof->v.s, expected, 32)) {
            char more[128] = "";
            if (throttle) {
                double delay;
                int failures = mr_throttle_failed(throttle, hs->addr, &delay);
                if (failures > 1)
                    snprintf(more, sizeof(more), " (wrong proof %d from this address: its next attempt waits %g s)",
                             failures, delay);
            }
            mr_log_error("wrong auth proof from %s", hs->peer);
            mr_handshake_refuse(hs, MR_AUTH, "wrong auth token: the client's %s / auth_token differs from the "
                                "server's%s", TOKEN_ENV, more);
            return -1;
        }
        if (throttle) mr_throttle_succeeded(throttle, hs->addr);
        const mp_node* cnonce = mp_map_get(opts, "cnonce");
        if (cnonce && cnonce->type != MP_NIL) {
            if (cnonce->type != MP_BIN || cnonce->len != MR_NONCE) {
                mr_handshake_refuse(hs, MR_PROTOCOL, "the client nonce (cnonce) must be %d bytes", MR_NONCE);
                return -1;
            }
            uint8_t both[2 * MR_NONCE];
            memcpy(both, hs->nonce, MR_NONCE);
            memcpy(both + MR_NONCE, cnonce->v.s, MR_NONCE);
            mr_hmac_sha256(cfg->token, strlen(cfg->token), "workbench-rpc-v1-server", 23, both, sizeof(both),
                           out->proof);
            out->has_proof = 1;
        }
    }
    /* the key: `opts.get("key") or ""` */
    const mp_node* key = mp_map_get(opts, "key");
    const char* client_key = "";
    if (key && !(key->type == MP_NIL || ((key->type == MP_STR || key->type == MP_BIN) && !key->len) ||
                 ((key->type == MP_BOOL || key->type == MP_INT) && key->v.i == 0) ||
                 (key->type == MP_FLOAT && key->v.f == 0) || ((key->type == MP_ARRAY || key->type == MP_MAP) && !key->len))) {
        if (key->type != MP_STR) {
            mr_handshake_refuse(hs, MR_KEY_MISMATCH, "the key must be a string, not %s", mp_repr(key, a, sizeof(a), 0));
            return -1;
        }
        client_key = key->v.s;
    }
    py_repr_str(cfg->key, strlen(cfg->key), a, sizeof(a));
    if (matchkey) {
        if (strcmp(client_key, matchkey) != 0) {
            mr_handshake_refuse(hs, MR_KEY_MISMATCH, "this server of key %s is handed out by a tracker: request it "
                                "with rpc.connect_tracker(host, port).request(%s)", a, a);
            return -1;
        }
    } else if (*cfg->key && *client_key) { /* the key, alone or followed by ':' and anything (a proxy's match key) */
        size_t n = strlen(cfg->key);
        if (strncmp(client_key, cfg->key, n) != 0 || (client_key[n] != '\0' && client_key[n] != ':')) {
            mr_handshake_refuse(hs, MR_KEY_MISMATCH, "this server serves key %s, the client asked for %s", a,
                                py_repr_str(client_key, strlen(client_key), b, sizeof(b)));
            return -1;
        }
    }
    /* the session constructor: nil (or empty) and ["rpc.LocalSession"] */
    const mp_node* ctor = mp_map_get(opts, "ctor");
    int ctor_empty = !ctor || ctor->type == MP_NIL || ((ctor->type == MP_ARRAY || ctor->type == MP_STR ||
                     ctor->type == MP_BIN || ctor->type == MP_MAP) && !ctor->len) ||
                     ((ctor->type == MP_BOOL || ctor->type == MP_INT) && ctor->v.i == 0) ||
                     (ctor->type == MP_FLOAT && ctor->v.f == 0);
    if (!ctor_empty) {
        const mp_node* name = ctor->type == MP_ARRAY ? &ctor->v.items[0] : ctor;
        int local = ctor->type == MP_ARRAY && name->type == MP_STR && strcmp(name->v.s, "rpc.LocalSession") == 0 &&
                    name->len == strlen("rpc.LocalSession");
        if (!local) {
            int nested = ctor->type == MP_ARRAY && name->type == MP_STR && strcmp(name->v.s, "rpc.Connect") == 0;
            mr_handshake_refuse(hs, MR_UNSUPPORTED, "session constructor %s is not supported by this server (minrpc; "
                                "supported: rpc.LocalSession)%s", mp_repr(name, b, sizeof(b), 100),
                                nested ? ": minrpc does not relay sessions; connect to the inner server directly, or "
                                "through a Python server (python -m workbench.exec.rpc_server)" : "");
            return -1;
        }
    }
    /* the session timeout: `opts.get("timeout") or 0`, a number from 0 to a year */
    const mp_node* t = mp_map_get(opts, "timeout");
    if (t && t->type != MP_NIL) {
        int numeric = t->type == MP_INT || t->type == MP_UINT || t->type == MP_FLOAT;
        double v = t->type == MP_INT ? (double)t->v.i : t->type == MP_UINT ? (double)t->v.u : t->v.f;
        int falsy = (t->type == MP_BOOL && !t->v.i) || (numeric && v == 0) ||
                    ((t->type == MP_STR || t->type == MP_BIN || t->type == MP_ARRAY || t->type == MP_MAP) && !t->len);
        if (!falsy) {
            if (!numeric || !(v >= 0 && v <= MR_MAX_SESSION_TIMEOUT)) {
                mr_handshake_refuse(hs, MR_PROTOCOL, "session_timeout must be a number >= 0 and at most 31536000 "
                                    "seconds (one year; 0 means no limit), not %s", mp_repr(t, b, sizeof(b), 0));
                return -1;
            }
            out->timeout = v;
        }
    }
    return 0;
}

int mr_handshake_check(mr_handshake* hs, const mr_config* cfg, const char* matchkey, mr_throttle* throttle,
                       mr_connect* out) {
    memset(out, 0, sizeof(*out));
    mp_arena arena = {0};
    mp_node* opts;
    char perr[512];
    int rc;
    if (hs->tvm) {
        rc = check_tvm(hs, cfg, out);
        mr_handshake_free(hs);
        return rc;
    }
    if (mp_parse(hs->ctrl, hs->ctrl_len, &arena, &opts, perr, sizeof(perr))) {
        mr_handshake_refuse(hs, MR_PROTOCOL, "%s", perr);
        rc = -1;
    } else {
        rc = check_options(hs, cfg, opts, matchkey, throttle, out);
    }
    mp_arena_free(&arena);
    mr_handshake_free(hs);
    return rc;
}

int mr_handshake_run(mr_handshake* hs, const mr_config* cfg, mr_connect* out) {
    for (;;) {
        int64_t left = hs->deadline_ns - mr_now_ns();
        if (left <= 0 || mr_terminate) {
            if (!mr_terminate) mr_handshake_expire(hs, cfg);
            mr_handshake_free(hs);
            return -1;
        }
        struct pollfd p = {hs->rfd, POLLIN, 0};
        int n = poll(&p, 1, (int)((left + 999999) / 1000000));
        if (n <= 0) continue;
        int rc = mr_handshake_step(hs, cfg, NULL, NULL);
        if (rc < 0) {
            mr_handshake_free(hs);
            return -1;
        }
        if (rc > 0) return mr_handshake_check(hs, cfg, NULL, NULL, out);
    }
}
