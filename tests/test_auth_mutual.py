"""Mutual authentication (issue 7, items 16 and 17).

A client holding a token sends nothing of its session to a server that cannot
prove it knows the token too: not to one that says "no auth needed", not to
one that accepts any proof. Real servers prove it over the client's own nonce.
Wrong proofs from one address are slowed down, other addresses are not.
Nested sessions (``rpc.Connect``) use the token the client passes for the inner
server, never the server process's own.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import threading
import time

import pytest

from workbench import rpc
from workbench.errors import AuthenticationError, UnsupportedError
from workbench.rpc.wire.protocol import HEADER, MAGIC, NONCE_BYTES, PREAMBLE, VERSION, Kind, unpack

from .conftest import assert_clean, children
from .wire import frame
from .test_protocol import IO_TIMEOUT, FakeServer, RawPeer, _read_preamble

HOST = "127.0.0.1"


def client_proof(token: str, nonce: bytes) -> bytes:
    """docs/protocol.md, "Authentication", written out independently of the package."""
    return hmac.new(token.encode(), b"workbench-rpc-v1" + nonce, hashlib.sha256).digest()


def expected_server_proof(token: str, nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(token.encode(), b"workbench-rpc-v1-server" + nonce + client_nonce, hashlib.sha256).digest()


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("WORKBENCH_RPC_TOKEN", raising=False)




def recv_frame(conn: socket.socket) -> tuple[int, object]:
    head = b""
    while len(head) < HEADER.size:
        chunk = conn.recv(HEADER.size - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    ctrl_len, kind, _, _ = HEADER.unpack(head)
    body = b""
    while len(body) < ctrl_len:
        body += conn.recv(ctrl_len - len(body))
    return kind, unpack(body)


def drain(conn: socket.socket, stop: threading.Event, into: bytearray) -> None:
    """Record whatever else the client sends until it closes."""
    while not stop.is_set():
        try:
            chunk = conn.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            return
        into += chunk


FAKE_INFO = {"devices": [[1, 0]], "arch": "x86_64", "system": "Linux", "cpu_count": 1, "pid": 1, "key": "",
             "session_timeout": 0.0}


# -- 16: the client refuses servers that cannot prove the token -----------------------------------
def test_a_client_with_a_token_refuses_a_server_that_needs_none(no_token):
    after_hello = bytearray()

    def no_auth_needed(conn, stop):  # a stranger registered at a tracker or a proxy
        _read_preamble(conn)
        conn.sendall(PREAMBLE.pack(MAGIC, VERSION, 0) + frame(Kind.HELLO, {"version": 1, "nonce": os.urandom(32),
                                                                          "auth": False}))
        drain(conn, stop, after_hello)

    with FakeServer(no_auth_needed) as fake:
        with pytest.raises(AuthenticationError, match="says it needs no auth token, but this client has one"):
            rpc.connect(HOST, fake.port, auth_token="s3cret", connect_timeout=IO_TIMEOUT)
    assert after_hello == b""  # not even a CONNECT: nothing of the session went to it


@pytest.mark.parametrize("proof", [None, b"\0" * 32], ids=["no-proof", "wrong-proof"])
def test_a_client_with_a_token_refuses_a_server_that_cannot_prove_it(no_token, proof):
    after_connect = bytearray()
    connects = []

    def accepts_anything(conn, stop):
        _read_preamble(conn)
        conn.sendall(PREAMBLE.pack(MAGIC, VERSION, 0) + frame(Kind.HELLO, {"version": 1, "nonce": os.urandom(32),
                                                                          "auth": True}))
        connects.append(recv_frame(conn))
        conn.sendall(frame(Kind.OK, dict(FAKE_INFO, **({"proof": proof} if proof else {}))))
        drain(conn, stop, after_connect)

    with FakeServer(accepts_anything) as fake:
        with pytest.raises(AuthenticationError, match="did not prove that it knows the auth token"):
            rpc.connect(HOST, fake.port, auth_token="s3cret", connect_timeout=IO_TIMEOUT)
    kind, opts = connects[0]
    assert kind == Kind.CONNECT and len(opts["cnonce"]) == NONCE_BYTES
    assert after_connect == b""  # no request, no upload


def test_a_real_server_proves_it_over_the_clients_nonce(no_token, private_tmpdir):
    with rpc.Server(port=0, silent=True, auth_token="s3cret") as srv:
        with RawPeer.connect(srv.port) as peer:
            hello = peer.start()
            assert hello["auth"] is True
            client_nonce = os.urandom(NONCE_BYTES)
            peer.send_frame(Kind.CONNECT, {"key": "", "timeout": 0, "proof": client_proof("s3cret", hello["nonce"]),
                                           "ctor": None, "cnonce": client_nonce})
            ok = peer.recv_frame()
            assert ok.kind == Kind.OK
            assert ok.ctrl["proof"] == expected_server_proof("s3cret", hello["nonce"], client_nonce)
        with RawPeer.connect(srv.port) as peer:  # a client from before mutual auth: served, no proof sent
            hello = peer.start()
            peer.send_frame(Kind.CONNECT, {"key": "", "timeout": 0, "proof": client_proof("s3cret", hello["nonce"]),
                                           "ctor": None})
            ok = peer.recv_frame()
            assert ok.kind == Kind.OK and "proof" not in ok.ctrl
        with rpc.connect(HOST, srv.port, auth_token="s3cret") as remote:  # the client checks the proof
            assert "proof" not in remote.info
            remote.upload(b"x", target="x")
        assert_clean(srv, private_tmpdir)


def test_a_client_without_a_token_still_talks_to_open_servers(no_token, server):
    with rpc.connect(HOST, server.port) as remote:
        remote.ping()


# -- 16: wrong proofs from one address are slowed down ---------------------------------------------
def handshake_from(source: str, port: int, token: str) -> tuple[int, object]:
    """A handshake from the loopback address ``source``: the reply frame to CONNECT."""
    sock = socket.create_connection((HOST, port), timeout=IO_TIMEOUT, source_address=(source, 0))
    with RawPeer(sock) as peer:
        hello = peer.start()
        peer.send_frame(Kind.CONNECT, {"key": "", "timeout": 0, "proof": client_proof(token, hello["nonce"]),
                                       "ctor": None})
        reply = peer.recv_frame()
        return reply.kind, reply.ctrl


def test_wrong_proofs_from_one_address_are_slowed_down(no_token, private_tmpdir):
    from workbench.rpc.wire.handshake import AuthThrottle

    with rpc.Server(port=0, silent=True, auth_token="right") as srv:
        waits = []
        for attempt in range(1, 5):
            start = time.monotonic()
            with pytest.raises(AuthenticationError, match="wrong auth token") as err:
                rpc.connect(HOST, srv.port, auth_token="wrong")
            waited = time.monotonic() - start
            message = str(err.value)
            if attempt == 1:
                assert "waits" not in message
            else:
                assert f"(wrong proof {attempt} from this address: its next attempt waits" in message
            if waits:  # this attempt was held for the wait the previous refusal announced
                assert waited >= 0.8 * waits[-1], (attempt, waited, waits)
            waits.append(AuthThrottle().delay(attempt))
        assert waits == [0.25, 0.5, 1.0, 2.0]
        kind, ctrl = handshake_from("127.0.0.2", srv.port, "right")  # another address is not slowed down
        assert kind == Kind.OK
        with rpc.connect(HOST, srv.port, auth_token="right") as remote:  # the right token, after its wait
            remote.ping()
        with pytest.raises(AuthenticationError) as err:  # and a success forgets the failures
            rpc.connect(HOST, srv.port, auth_token="wrong")
        assert "waits" not in str(err.value)
        assert_clean(srv, private_tmpdir)


def test_the_throttle_is_bounded_and_forgets():
    from workbench.rpc.wire.handshake import AuthThrottle

    throttle = AuthThrottle(base_s=0.25, max_s=4.0, forget_s=60.0, max_addresses=2)
    for n in range(1, 10):
        delay = throttle.failed("a", now=100.0)
    assert delay == 4.0 and throttle.wait_until("a", now=100.0) == 104.0  # bounded
    throttle.attempt("a", now=104.0)
    assert throttle.wait_until("a", now=105.0) == 108.0  # one attempt per delay, in parallel or not
    assert throttle.wait_until("a", now=200.0) == 0.0 and throttle.failures("a", now=200.0) == 0  # forgotten
    throttle.failed("b", now=0.0)
    throttle.failed("c", now=0.0)
    throttle.failed("d", now=0.0)
    assert throttle.failures("b", now=0.0) == 0  # the table is bounded: the oldest address goes


# -- 17: nested sessions use the client's token, not the server's ------------------------------------
def test_rpc_connect_uses_the_token_the_client_passes(monkeypatch, private_tmpdir):
    monkeypatch.setenv("WORKBENCH_RPC_TOKEN", "outer-secret")
    outer = rpc.Server(port=0, silent=True)  # its token comes from its environment, as a CLI server's does
    monkeypatch.delenv("WORKBENCH_RPC_TOKEN")
    try:
        with rpc.Server(port=0, silent=True, auth_token="outer-secret") as same, \
                rpc.Server(port=0, silent=True, auth_token="inner-secret") as inner:
            # the outer server must not answer another server's challenge with its own token
            with pytest.raises(AuthenticationError, match="requires an auth token"):
                rpc.connect(HOST, outer.port, auth_token="outer-secret",
                            session_constructor_args=["rpc.Connect", HOST, same.port, ""])
            with rpc.connect(HOST, outer.port, auth_token="outer-secret",
                             session_constructor_args=["rpc.Connect", HOST, inner.port, "", "inner-secret"]) as remote:
                assert remote.info["pid"] in children(inner.pid)
                remote.upload(b"nested", target="n")
                assert remote.download("n") == b"nested"
            with pytest.raises(AuthenticationError, match="wrong auth token"):
                rpc.connect(HOST, outer.port, auth_token="outer-secret",
                            session_constructor_args=["rpc.Connect", HOST, inner.port, "", "guess"])
            assert_clean(inner, private_tmpdir)
            assert_clean(same, private_tmpdir)
        assert_clean(outer, private_tmpdir)
    finally:
        outer.terminate()


def test_rpc_connect_never_echoes_a_token(server, no_token):
    with pytest.raises(UnsupportedError, match=r"rpc.Connect takes \[url, port, key\]") as err:
        rpc.connect(HOST, server.port, session_constructor_args=["rpc.Connect", HOST, "not-a-port", "", "tok-123"])
    assert "tok-123" not in str(err.value) and "<token>" in str(err.value)
