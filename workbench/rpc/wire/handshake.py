"""The session handshake's rules, shared by every server and client: checks, auth proofs, limits.

The server side runs in two places: ``worker.server_handshake`` (blocking, on a
channel: the stdio server behind PopenSession) and the server process's event
loop (``serve.Handshake``, non-blocking, so a connection that sends nothing
costs a file descriptor and no process). Both answer a CONNECT with
``check_connect``. docs/protocol.md, section 5, describes the bytes.

Authentication is mutual: the client proves it knows the token (``auth_proof``
over the server's nonce) and, when it holds a token, requires the server to
prove it too (``server_proof`` over both nonces) before it sends anything else.

    >>> proof = auth_proof("s3cret", bytes(32))
    >>> len(proof), proof == server_proof("s3cret", bytes(32), bytes(32))
    (32, False)
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import socket
import time
from collections import OrderedDict
from typing import Any, Callable, Sequence

from ...errors import (
    AuthenticationError,
    ConnectionClosedError,
    ErrorCode,
    KeyMismatchError,
    ProtocolError,
    RPCError,
    TooLargeError,
    UnsupportedError,
    error_from_code,
)
from .protocol import MAGIC, NONCE_BYTES, PREAMBLE, VERSION, Channel, Kind

MAX_PROXY_HOPS = 4  # proxies a client follows on the way to a server
TOKEN_ENV = "WORKBENCH_RPC_TOKEN"
HANDSHAKE_TIMEOUT_S = 10.0  # the whole handshake, from accept to CONNECT, not each read
MAX_SESSION_TIMEOUT_S = 365 * 24 * 3600.0  # one year; 0 means no limit
MAX_CONNECT_CTRL = 64 << 10  # a CONNECT control part is a few hundred bytes
ERROR_BUSY = ErrorCode.BUSY  # "server busy" (max_sessions reached, or out of processes, files or disk)
SESSION_CONSTRUCTORS = ("rpc.LocalSession", "rpc.Connect", "rpc.PopenSession")
MAX_PROGRAM_BYTES = 256 << 20  # rpc.PopenSession's program (CONNECT's bulk part)
TVM_PROTOCOL = "tvm"  # the "protocol" of accepted options for a TVM client's session (wire/tvm.py)
CLIENT_LABEL = b"workbench-rpc-v1"
SERVER_LABEL = b"workbench-rpc-v1-server"


def auth_proof(token: str, nonce: bytes) -> bytes:
    """What a client sends to prove it knows ``token`` (the token never crosses the wire)."""
    return hmac.new(token.encode(), CLIENT_LABEL + nonce, hashlib.sha256).digest()


def server_proof(token: str, nonce: bytes, client_nonce: bytes) -> bytes:
    """What a server sends back to prove it knows ``token`` too: over its nonce and the client's."""
    return hmac.new(token.encode(), SERVER_LABEL + nonce + client_nonce, hashlib.sha256).digest()


def check_session_timeout(value: Any) -> float:
    """``session_timeout`` as a float of seconds, or ValueError: a finite number from 0 (no limit) to a year."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 <= value <= MAX_SESSION_TIMEOUT_S  # False for NaN too
    ):
        raise ValueError(
            f"session_timeout must be a number >= 0 and at most {MAX_SESSION_TIMEOUT_S:.0f} seconds "
            f"(one year; 0 means no limit), not {value!r}"
        )
    return float(value)


def check_seconds(name: str, value: Any, *, allow_none: bool = True) -> float | None:
    """A server option in seconds (``idle_timeout``, ``handshake_timeout``): None, or a positive finite number."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 < value <= MAX_SESSION_TIMEOUT_S and math.isfinite(value)
    ):
        off = " or None (off)" if allow_none else ""
        raise ValueError(f"{name} must be a number of seconds > 0 and at most a year{off}, not {value!r}")
    return float(value)


def check_key(server_key: str, client_key: Any, matchkey: str | None) -> None:
    """Refuse a client whose key does not fit: with a tracker, only its match key does; else the server's key,
    alone or followed by ``:`` and anything (a proxy's match key), so a key may hold colons ("127.0.0.1:5555")."""
    if not isinstance(client_key, str):
        raise KeyMismatchError(f"the key must be a string, not {client_key!r}")
    if matchkey is not None:
        if client_key != matchkey:
            raise KeyMismatchError(
                f"this server of key {server_key!r} is handed out by a tracker: request it with "
                f"rpc.connect_tracker(host, port).request({server_key!r})"
            )
    elif server_key and client_key and client_key != server_key and not client_key.startswith(server_key + ":"):
        raise KeyMismatchError(f"this server serves key {server_key!r}, the client asked for {client_key!r}")


def connect_token(ctor: list) -> str | None:
    """The inner server's auth token in ``["rpc.Connect", url, port, key, ...]``: the string after the key.

    A bool there is TVM's ``enable_logging`` flag (seed 001's form), accepted and ignored.
    """
    return next((a for a in ctor[4:] if isinstance(a, str) and a), None)


def check_constructor(ctor: Any) -> list | None:
    """``session_constructor_args`` as sent in CONNECT: None, ``["rpc.LocalSession"]``,
    ``["rpc.Connect", url, port, key, token?]`` (TVM's enable_logging flag may stand beside the
    token) or ``["rpc.PopenSession"]`` (the program is CONNECT's bulk part); UnsupportedError otherwise."""
    if not ctor:
        return None
    name = ctor[0] if isinstance(ctor, list) else ctor
    if not isinstance(ctor, list) or name not in SESSION_CONSTRUCTORS:
        raise UnsupportedError(
            f"session constructor {name!r:.100} is not supported by this server "
            f"(supported: {', '.join(SESSION_CONSTRUCTORS)})"
        )
    if name == "rpc.PopenSession" and len(ctor) != 1:
        raise UnsupportedError(
            "rpc.PopenSession takes the program's bytes, which travel as CONNECT's bulk part: "
            "session_constructor_args=[\"rpc.PopenSession\", program_bytes] on the client")
    if name == "rpc.Connect":
        args = ctor[1:]
        extra = args[3:]
        ok = (
            2 <= len(args) <= 5
            and isinstance(args[0], str) and args[0]
            and type(args[1]) is int and 0 < args[1] < 65536
            and (len(args) < 3 or isinstance(args[2], str))
            and all(a is None or isinstance(a, (str, bool)) for a in extra)
            and sum(isinstance(a, str) for a in extra) <= 1 and sum(isinstance(a, bool) for a in extra) <= 1
        )
        if not ok:
            shown = ["<token>" if i >= 3 and isinstance(a, str) else a for i, a in enumerate(args)]  # never echo a token
            raise UnsupportedError(
                "rpc.Connect takes [url, port, key] and optionally the inner server's auth token: a host name, "
                f"a port from 1 to 65535, a key and a token (strings), not {shown!r:.200}"
            )
    return ctor


def check_connect(
    kind: int,
    opts: Any,
    nonce: bytes,
    *,
    key: str = "",
    token: str | None = None,
    matchkey: str | None = None,
) -> dict[str, Any]:
    """Check a CONNECT frame against this server; return its options, normalised.

    The returned map has ``key``, ``timeout`` (float), ``ctor`` and ``proof``:
    the server's own proof for the OK reply (None when the server has no token
    or the client sent no nonce of its own). Raises the RPCError to refuse with.
    """

    if kind != Kind.CONNECT or not isinstance(opts, dict):
        raise ProtocolError(
            f"expected a CONNECT message after HELLO, got kind {kind}"
            + (": a server started with is_proxy=True (--through-proxy) must connect to an RPC proxy "
               "(python -m workbench.exec.rpc_proxy), not to a server" if kind == Kind.REGISTER else "")
        )
    reply_proof = None
    if token:
        proof = opts.get("proof")
        if not proof:
            raise AuthenticationError(
                "this server requires an auth token: pass auth_token=... to rpc.connect "
                f"or set {TOKEN_ENV} on the client"
            )
        if not isinstance(proof, bytes) or not hmac.compare_digest(proof, auth_proof(token, nonce)):
            raise AuthenticationError(
                f"wrong auth token: the client's {TOKEN_ENV} / auth_token differs from the server's"
            )
        client_nonce = opts.get("cnonce")
        if client_nonce is not None:
            if not isinstance(client_nonce, bytes) or len(client_nonce) != NONCE_BYTES:
                raise ProtocolError(f"the client nonce (cnonce) must be {NONCE_BYTES} bytes")
            reply_proof = server_proof(token, nonce, client_nonce)
    check_key(key, opts.get("key") or "", matchkey)
    ctor = check_constructor(opts.get("ctor"))
    try:
        timeout = check_session_timeout(opts.get("timeout") or 0)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    return {"key": opts.get("key") or "", "timeout": timeout, "ctor": ctor, "proof": reply_proof}


def hello(nonce: bytes, token: str | None) -> dict[str, Any]:
    """The HELLO map a server sends."""
    return {"version": VERSION, "nonce": nonce, "auth": bool(token)}


class AuthThrottle:
    """Slows down guessing: after a wrong proof from an address, its next attempts wait.

    With ``n`` failures from an address (forgotten ``forget_s`` after the last
    one, or at its first success), one attempt is evaluated per
    ``min(base_s * 2**(n-1), max_s)`` seconds; the others wait their turn. The
    server's loop asks ``wait_until`` and never sleeps itself.

        >>> t = AuthThrottle(base_s=1.0, max_s=4.0)
        >>> t.failed("10.0.0.1", now=0.0)
        1.0
        >>> t.wait_until("10.0.0.1", now=0.5), t.wait_until("10.0.0.2", now=0.5)
        (1.0, 0.0)
    """

    def __init__(self, base_s: float = 0.25, max_s: float = 4.0, forget_s: float = 300.0, max_addresses: int = 4096):
        self.base_s, self.max_s, self.forget_s, self.max_addresses = base_s, max_s, forget_s, max_addresses
        self._state: OrderedDict[str, list[float]] = OrderedDict()  # addr -> [failures, next_allowed, last_failure]

    def _entry(self, addr: str, now: float) -> list[float] | None:
        entry = self._state.get(addr)
        if entry is not None and now - entry[2] > self.forget_s:
            del self._state[addr]
            return None
        return entry

    def delay(self, failures: float) -> float:
        return min(self.base_s * 2 ** (failures - 1), self.max_s) if failures else 0.0

    def wait_until(self, addr: str, now: float | None = None) -> float:
        """When an attempt from ``addr`` may be evaluated (0.0: now)."""
        now = time.monotonic() if now is None else now
        entry = self._entry(addr, now)
        return 0.0 if entry is None or entry[1] <= now else entry[1]

    def attempt(self, addr: str, now: float | None = None) -> None:
        """An attempt from ``addr`` is being evaluated: the next one waits a full delay."""
        now = time.monotonic() if now is None else now
        entry = self._entry(addr, now)
        if entry is not None:
            entry[1] = now + self.delay(entry[0])

    def failed(self, addr: str, now: float | None = None) -> float:
        """Record a wrong proof from ``addr``; return the seconds its next attempt waits."""
        now = time.monotonic() if now is None else now
        entry = self._entry(addr, now) or [0.0, 0.0, now]
        entry[0] += 1
        entry[1], entry[2] = now + self.delay(entry[0]), now
        self._state[addr] = entry
        self._state.move_to_end(addr)
        while len(self._state) > self.max_addresses:
            self._state.popitem(last=False)
        return self.delay(entry[0])

    def failures(self, addr: str, now: float | None = None) -> int:
        entry = self._entry(addr, time.monotonic() if now is None else now)
        return int(entry[0]) if entry else 0

    def succeeded(self, addr: str) -> None:
        self._state.pop(addr, None)


def refusal_text(exc: RPCError, failures: int = 0, delay: float = 0.0) -> str:
    """The message of a refusal; after repeated wrong proofs it says how long the next attempt waits."""
    text = str(exc)
    if isinstance(exc, AuthenticationError) and failures > 1:
        text += f" (wrong proof {failures} from this address: its next attempt waits {delay:g} s)"
    return text


def error_reply(ctrl: Any) -> RPCError:
    """The exception for an ERROR frame's control part ``[code, message]``."""
    if isinstance(ctrl, list) and len(ctrl) >= 2 and isinstance(ctrl[0], int) and isinstance(ctrl[1], str):
        return error_from_code(ctrl[0], ctrl[1])
    return ProtocolError(f"malformed error reply from the peer: {ctrl!r}")


def client_handshake(
    chan: Channel,
    address: str,
    *,
    key: str = "",
    session_timeout: float = 0,
    token: str | None = None,
    constructor_args: Sequence[Any] | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Run the client side of the handshake on ``chan``; return the server's session info.

    ``deadline`` (a ``time.monotonic()`` value) bounds the whole handshake on a
    socket, however slowly the server sends: each read and write waits only
    for what is left of it (``connect`` passes the start plus ``connect_timeout``).

    With a ``token``, authentication is mutual: the client proves it knows the
    token, and the server must prove it knows it too, over a nonce of the
    client's, before this returns. A server that says it needs no token, or
    cannot prove it, is refused before anything of the session is sent to it
    (a stranger registered at a tracker or a proxy gets no kernels and no data).
    """
    session_timeout = check_session_timeout(session_timeout)
    sock = getattr(chan, "sock", None)
    if deadline is not None and sock is not None:
        chan._recv_into, chan._sendall = _until(deadline, sock.recv_into), _until(deadline, sock.sendall)
    try:
        return _client_handshake(chan, address, key, session_timeout, token, constructor_args)
    except socket.timeout:
        waited = "" if deadline is None else " (connect_timeout covers connecting and the whole handshake)"
        raise ProtocolError(
            f"{address} did not answer the handshake in time{waited}: is it an rpc-workbench server, "
            "and is it overloaded?"
        ) from None
    finally:
        if deadline is not None and sock is not None:
            chan._recv_into, chan._sendall = sock.recv_into, sock.sendall


def _until(deadline: float, io: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``io`` (a socket's recv_into or sendall) waiting at most until ``deadline`` (monotonic seconds)."""
    sock = io.__self__

    def bounded(data: Any) -> Any:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the handshake's deadline passed")
        sock.settimeout(left)
        return io(data)

    return bounded


def _client_handshake(chan: Channel, address: str, key: str, session_timeout: float, token: str | None,
                      constructor_args: Sequence[Any] | None) -> dict[str, Any]:
    try:
        chan._sendall(PREAMBLE.pack(MAGIC, VERSION, 0))
        magic, version, _ = PREAMBLE.unpack(chan.read_exact(PREAMBLE.size))
        if magic != MAGIC:
            raise ProtocolError(
                f"{address} is not an rpc-workbench server (it answered {magic!r}); "
                "check the port (a tracker or a TVM server listens elsewhere?)"
            )
        for _ in range(MAX_PROXY_HOPS + 1):
            frame = chan.recv_frame()
            if frame.kind == Kind.ERROR:
                raise error_reply(frame.ctrl)
            hello = frame.ctrl
            if frame.kind != Kind.HELLO or not isinstance(hello, dict):
                raise ProtocolError(f"{address} sent kind {frame.kind} where HELLO was expected")
            if not hello.get("proxy"):
                break
            chan.send_frame(Kind.PROXY_CONNECT, {"key": key or ""})  # a proxy: pair us with a server of key
        else:
            raise ProtocolError(f"more than {MAX_PROXY_HOPS} proxies on the way to {address}")
        ctor = list(constructor_args) if constructor_args else None
        program = None
        if ctor and ctor[0] == "rpc.PopenSession" and len(ctor) == 2 and isinstance(ctor[1], (bytes, bytearray)):
            program, ctor = ctor[1], ["rpc.PopenSession"]  # the program goes as CONNECT's bulk part
            if len(program) > MAX_PROGRAM_BYTES:
                raise TooLargeError(f"rpc.PopenSession: the program is {len(program)} bytes, over the "
                                    f"{MAX_PROGRAM_BYTES}-byte limit")
        connect = {"key": key or "", "timeout": session_timeout, "proof": None, "ctor": ctor}
        if token:
            nonce = hello.get("nonce")
            if not hello.get("auth"):
                raise AuthenticationError(
                    f"{address} says it needs no auth token, but this client has one (auth_token= or "
                    f"{TOKEN_ENV}): it cannot prove it is the server you meant (a stranger registered at a "
                    "tracker or proxy?), so nothing was sent to it. If that server really runs without a token, "
                    "connect without one (auth_token=\"\")"
                )
            if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
                raise ProtocolError(f"{address} sent a HELLO without a {NONCE_BYTES}-byte nonce")
            client_nonce = os.urandom(NONCE_BYTES)
            connect.update(proof=auth_proof(token, nonce), cnonce=client_nonce)
        chan.send_frame(Kind.CONNECT, connect, program)
        frame = chan.recv_frame()
        if frame.kind == Kind.ERROR:
            raise error_reply(frame.ctrl)
        info = frame.ctrl
        if frame.kind != Kind.OK or not isinstance(info, dict):
            raise ProtocolError(f"{address} answered CONNECT with kind {frame.kind} where OK was expected")
        if token:
            proof = info.pop("proof", None)
            if not isinstance(proof, bytes) or not hmac.compare_digest(proof, server_proof(token, nonce, client_nonce)):
                raise AuthenticationError(
                    f"{address} did not prove that it knows the auth token (its proof is "
                    f"{'wrong' if proof else 'missing'}): it may not be the server you meant, or it runs an "
                    "rpc-workbench older than mutual authentication (update it); nothing was sent to it"
                )
        return info
    except (ConnectionClosedError, BrokenPipeError, ConnectionResetError):
        raise ConnectionClosedError(
            f"{address} closed the connection during the handshake: is it an rpc-workbench server "
            "(TVM servers and trackers are not)?"
        ) from None
