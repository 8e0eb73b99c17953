"""``rpc.Proxy``: reach servers that clients cannot reach directly.

Servers started with ``is_proxy=True`` (``--through-proxy``) connect out to
the proxy and wait there; a client connects to the proxy as if it were a
server, names its key, and is paired with a waiting server of that key; from
then on the proxy relays bytes both ways (the handshake, authentication
included, is end to end). With ``tracker_addr`` the proxy offers its waiting
servers to the tracker, so ``request(key)`` works through it.

A client whose key has no server waiting, but whose servers are in sessions or
were here within the last minute, is held up to ``timeout_client`` seconds
until one of them (re)registers: reconnecting right after a session works. A
key nobody has served here is held for a short grace (``unknown_key_grace``,
3 s): a client that arrives just before its server (a script that starts both,
as TVM's own proxy test does) is paired, and a mistyped key is told within
seconds, with the keys there are.

Held clients of a key are paired in turns (workbench.rpc.proxy.turns): source
addresses take turns in rounds, each address once per round, and the clients
of one address go in arrival order. A connection that comes later never
overtakes a waiting client of its own address, and no other address is served
more than k + 1 times before the k-th waiting client of an address: a waiting
client is paired within k × A turns (A: addresses with clients waiting),
however many connections others open or reopen. Reconnecting buys no turn:
an address that has had its turn in a round keeps waiting for the next one
even if all its clients left and a new one came.

A client is never refused for its address alone: one address shares its host
or NAT with other users, and an attacker there could otherwise take all of its
places. Up to ``max_clients`` clients in all (held or being paired; at most
half the file-descriptor limit) are taken, whatever their addresses. When the
proxy is full, the newest held client of the address holding the most makes
room, provided that address holds more than its share
(``max_clients_per_source``) and more than the newcomer's would (longest queue
drop); otherwise the newcomer is refused. Both are told ``BUSY`` with the
limit. A paired client must send its CONNECT within ``pairing_timeout``
seconds, so silent clients cannot keep the servers from everyone else.

This is what queueing front ends do (HAProxy's server queue: first come, first
served, with ``timeout queue``), made fair between addresses. What it cannot do
is tell two clients of one address apart: an attacker on the client's own
address that keeps more clients waiting than the key's servers can pair in
``timeout_client`` seconds delays that client as much as that many honest
clients would.

Before pairing, the proxy reads only the opening of a connection (preamble and
one frame of at most 16 KiB), which must arrive within ``handshake_timeout``
seconds. At the file-descriptor limit it closes the oldest unfinished opening
to make room, or refuses with "proxy busy" and stops accepting for a moment
(never spinning), and the sessions it relays go on.

With ``auth_token``, a server may wait here only after proving it knows the
token: the proxy answers its REGISTER with a HELLO carrying a fresh nonce, and
the server's second REGISTER must carry ``registration_proof(token, nonce,
"proxy")`` (workbench.rpc.tracker.registration; the server's ``registration_token``),
else it is refused with ERROR ``AUTH`` and closed. Wrong proofs from one
address are checked at most once per ``min(0.25 s * 2**(n-1), 4 s)``; earlier
ones are refused unchecked. Clients need no token here (their session's
handshake, token included, is end to end with the server).

    >>> proxy = rpc.Proxy(port=0)                                                   # doctest: +SKIP
    >>> rpc.Server(host="127.0.0.1", port=proxy.port, is_proxy=True, key="phone")   # doctest: +SKIP
    >>> rpc.connect("127.0.0.1", proxy.port, key="phone")                          # doctest: +SKIP
"""
from __future__ import annotations

import hmac
import itertools
import logging
import os
import resource
import select
import selectors
import socket
import struct
import threading
import time
from collections import Counter, deque
from typing import Any, Callable

from ...errors import AuthenticationError, ErrorCode
from ..wire.protocol import FLAG_SERVER, HEADER, MAGIC, NONCE_BYTES, PREAMBLE, VERSION, Kind, pack, unpack
from ..wire.handshake import AuthThrottle, refusal_text
from ..tracker.registration import (
    REGISTRATION_TOKEN_ENV,
    TrackerRegistration,
    check_token,
    registration_proof,
    token_or_env,
)
from ..wire.relay import Relay
from ..wire.tvm import CODE_MISMATCH, MAGIC_BYTES as TVM_MAGIC_BYTES, MAX_KEY as MAX_TVM_KEY
from .turns import HeldQueue
from ..service.process import ServiceHandle, service_main, setup_logging, stop_on_signals
from ..service.loop import ServiceLoop, bind_port, peer_closed, refuse
from ..tracker.tracker import check_timeout

log = logging.getLogger("workbench.rpc.proxy")

HANDSHAKE_TIMEOUT_S = 10.0  # a new connection's opening (preamble and REGISTER or PROXY_CONNECT)
TIMEOUT_CLIENT_S = 5.0  # below the client's connect_timeout (10 s), so it reads the proxy's answer
PAIRING_TIMEOUT_S = 5.0  # a paired client sends its CONNECT within this, or both ends are closed
MAX_CLIENTS_PER_SOURCE = 16  # an address's share: its clients up to this many are never refused to make room
MAX_CLIENTS = 1024  # clients held or being paired at once, in all (and at most half the proxy's fd limit)
MAX_OPENING = 16 << 10  # bytes of the control part of a REGISTER or PROXY_CONNECT (and of a client's CONNECT)
KEY_MEMORY_S = 60.0  # a key whose servers were here this recently: its clients are held for one
TVM_MISMATCH = struct.pack("<i", CODE_MISMATCH)  # what a refused TVM client reads
UNKNOWN_KEY_GRACE_S = 3.0  # a key nobody served here: its client is held this long for a server that is starting


class Proxy(ServiceHandle):
    """An RPC proxy in a separate process (``port`` reports where it listens).

    ``timeout_client`` (seconds, 0: refuse at once) is how long a client waits
    for a server of its key to come back (TVM's proxy has the same knob);
    ``unknown_key_grace`` (seconds, at most ``timeout_client``) how long one waits
    for a key no server has had here, such as a server still starting;
    ``handshake_timeout``, ``pairing_timeout``, ``max_clients`` and
    ``max_clients_per_source`` bound what a stranger can hold (see the module doc). ``auth_token``:
    servers must prove they know it to wait here (their
    ``registration_token``); None: any server may. ``registration_token``
    (None: ``$WORKBENCH_REGISTRATION_TOKEN``) is what the proxy proves to a
    ``tracker_addr`` started with an auth token.

        >>> with rpc.Proxy(port=0, timeout_client=10) as proxy:           # doctest: +SKIP
        ...     rpc.connect("127.0.0.1", proxy.port, key="phone")
        >>> proxy = rpc.Proxy(port=0, auth_token="s3cret")                                   # doctest: +SKIP
        >>> rpc.Server(port=proxy.port, is_proxy=True, key="phone", registration_token="s3cret")  # doctest: +SKIP
    """

    what = "RPC proxy"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9090,
        port_end: int = 9199,
        tracker_addr: tuple[str, int] | None = None,
        custom_addr: str | None = None,
        silent: bool = False,
        *,
        timeout_client: float | None = TIMEOUT_CLIENT_S,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
        pairing_timeout: float = PAIRING_TIMEOUT_S,
        max_clients_per_source: int = MAX_CLIENTS_PER_SOURCE,
        max_clients: int = MAX_CLIENTS,
        unknown_key_grace: float | None = UNKNOWN_KEY_GRACE_S,
        auth_token: str | None = None,
        registration_token: str | None = None,
    ):
        self.host = host
        self._start("workbench.rpc.proxy.proxy", dict(
            {"host": host, "port": port, "port_end": port_end, "silent": silent, "custom_addr": custom_addr,
             "tracker_addr": list(tracker_addr) if tracker_addr else None,
             "auth_token": check_token("auth_token", auth_token),
             "registration_token": token_or_env("registration_token", registration_token, REGISTRATION_TOKEN_ENV)},
            **proxy_limits(timeout_client, handshake_timeout, pairing_timeout, max_clients_per_source, max_clients,
                           unknown_key_grace)))


def proxy_limits(timeout_client: float | None = TIMEOUT_CLIENT_S, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 pairing_timeout: float = PAIRING_TIMEOUT_S,
                 max_clients_per_source: int = MAX_CLIENTS_PER_SOURCE, max_clients: int = MAX_CLIENTS,
                 unknown_key_grace: float | None = UNKNOWN_KEY_GRACE_S) -> dict[str, Any]:
    """The proxy's limits, checked (a clear ValueError for a bad one)."""
    limits = {"timeout_client": check_timeout("timeout_client", timeout_client) or 0.0,
              "unknown_key_grace": check_timeout("unknown_key_grace", unknown_key_grace) or 0.0}
    for name, value in (("handshake_timeout", handshake_timeout), ("pairing_timeout", pairing_timeout)):
        limits[name] = check_timeout(name, value)
        if limits[name] is None:
            raise ValueError(f"{name} must be a number of seconds > 0, not {value!r}")
    for name, value in (("max_clients_per_source", max_clients_per_source), ("max_clients", max_clients)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
        limits[name] = value
    return limits


# -- the proxy process ------------------------------------------------------------------
class _Incoming:
    """A connection whose opening (preamble and first frame) has not fully arrived; it holds no more than that."""

    __slots__ = ("sock", "host", "buf", "preamble", "is_server", "deadline", "nonce", "key", "info", "tvm")

    def __init__(self, sock: socket.socket, host: str, deadline: float):
        self.sock = sock
        self.host = host
        self.buf = bytearray()
        self.preamble: bytes | None = None
        self.is_server = False
        self.deadline = deadline
        self.nonce: bytes | None = None  # a server challenged for its registration proof (auth_token set)
        self.key = ""  # and the key and info of its first REGISTER
        self.info: dict = {}
        self.tvm = False  # a TVM client: its opening is TVM's magic, key length and key (replayed to the server)

    def need(self) -> int:
        """Bytes still missing from the part of the opening being read."""
        if self.preamble is None:
            return PREAMBLE.size - len(self.buf)
        if self.tvm:  # the key after TVM's magic and key length
            return struct.unpack_from("<i", self.preamble, 4)[0] - len(self.buf)
        if len(self.buf) < HEADER.size:
            return HEADER.size - len(self.buf)
        return HEADER.size + HEADER.unpack_from(self.buf)[0] - len(self.buf)


class _Held:
    """A client waiting for a server of its key to come back."""

    __slots__ = ("client", "host", "key", "base", "deadline", "arrival", "since")

    def __init__(self, client: _Incoming, key: str, base: str, deadline: float, arrival: int, since: float):
        self.client, self.host, self.key, self.base = client, client.host, key, base
        self.deadline, self.arrival, self.since = deadline, arrival, since


class _Waiting:
    """A registered server waiting to be paired."""

    __slots__ = ("sock", "key", "info")

    def __init__(self, sock: socket.socket, key: str, info: dict):
        self.sock, self.key, self.info = sock, key, info


class _PairingTimeout(Exception):
    pass


class ProxyLoop(ServiceLoop):
    def __init__(self, listener: socket.socket, owner_fd: int | None = None,
                 tracker_addr: tuple[str, int] | None = None, custom_addr: str | None = None,
                 *, timeout_client: float = TIMEOUT_CLIENT_S, handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
                 pairing_timeout: float = PAIRING_TIMEOUT_S, max_clients_per_source: int = MAX_CLIENTS_PER_SOURCE,
                 max_clients: int = MAX_CLIENTS, unknown_key_grace: float = UNKNOWN_KEY_GRACE_S,
                 auth_token: str | None = None, registration_token: str | None = None):
        super().__init__(listener, owner_fd)
        self.unknown_key_grace = unknown_key_grace or 0.0
        self.auth_token = auth_token
        self.throttle = AuthThrottle()  # wrong registration proofs, by address
        self.timeout_client = timeout_client or 0.0
        self.handshake_timeout = handshake_timeout
        self.pairing_timeout = pairing_timeout
        self.max_clients_per_source = max_clients_per_source
        # each held client is a descriptor: keep half of them for servers, relays and new connections
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_clients = max_clients if fd_limit == resource.RLIM_INFINITY else \
            min(max_clients, max(max_clients_per_source, fd_limit // 2))
        self.incoming: dict[int, _Incoming] = {}
        self.held: dict[str, HeldQueue[_Held]] = {}  # by device key (_base), in the order they are served
        self.waiting: dict[str, deque[_Waiting]] = {}
        self.relays: set[Relay] = set()
        self.pairings: set[tuple[socket.socket, socket.socket]] = set()  # being paired, in threads
        # guarded by _relays_lock (relay and pairing threads change them too):
        self.paired: Counter[str] = Counter()  # servers being paired or in a session, by key
        self.clients_of: Counter[str] = Counter()  # clients held or being paired, by source address
        self.last_seen: dict[str, float] = {}  # when a server of the key was last here
        self._relays_lock = threading.Lock()
        self._arrival = itertools.count()
        self._sweep_every = max(0.02, min(1.0, handshake_timeout / 4, (self.timeout_client or 4.0) / 4))
        self._next_sweep = 0.0
        self._published: str | None = None
        # told to a connection refused at the file-descriptor limit (a client reads it as "busy")
        self.limit_refusal = PREAMBLE.pack(MAGIC, VERSION, 0) + _frame(
            Kind.ERROR, [ErrorCode.BUSY, "proxy busy: it is out of file descriptors; try again later"])
        self.registration = None
        if tracker_addr:
            self.registration = TrackerRegistration(
                tracker_addr, listener.getsockname()[1], custom_addr, {"key": "server:proxy[]"}, registration_token
            )

    # -- event loop -------------------------------------------------------------------
    def _event(self, key: selectors.SelectorKey, events: int) -> None:
        data = key.data
        try:
            if isinstance(data, _Incoming):
                self._read_incoming(data)
            elif isinstance(data, _Held):
                self._drop_held(data, None)  # a held client only waits: readable means it left (or misbehaved)
            else:
                self._drop_waiting(data, "it closed the connection")
        except Exception:  # a bug must cost one connection, never the proxy
            log.exception("closing a connection after an unexpected error")
            sock = data.client.sock if isinstance(data, _Held) else data.sock
            self.incoming.pop(sock.fileno(), None)
            try:
                self._sel.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()

    def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep and (self.incoming or self.held or self.last_seen):
            self._next_sweep = now + self._sweep_every
            self._expire(now)

    def _timeout(self) -> float | None:
        now = time.monotonic()
        due = []
        if self.incoming or self.held:
            due.append(self._next_sweep - now)
        if self.registration is not None:
            self._publish_keys()  # sessions end in relay threads: catch up here
            due.append(self.registration.poll(now))
        return max(0.0, min(due)) if due else None

    def _accept(self) -> None:
        got = self.accept_connection()  # at the fd limit: _free_fds(), else a pause (never a busy loop)
        if got is None:
            return
        sock, addr = got
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            return
        conn = _Incoming(sock, addr[0], time.monotonic() + self.handshake_timeout)
        self.incoming[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _free_fds(self) -> bool:
        """At the fd limit: close the oldest connection that has not sent its opening, to make room."""
        if not self.incoming:
            return False
        conn = min(self.incoming.values(), key=lambda c: c.deadline)
        log.info("out of file descriptors: closing the connection from %s to make room", conn.host)
        self._close_incoming(conn)
        return True

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.incoming.values() if c.deadline < now]:
            log.info("closing a connection from %s: no opening within %g s", conn.host, self.handshake_timeout)
            self._close_incoming(conn)
        for held in [h for queue in self.held.values() for h in queue if h.deadline < now]:
            self._drop_held(held, (ErrorCode.NO_DEVICE, self._no_server(held.base, now - held.since)))
        with self._relays_lock:  # forget keys whose servers left long ago
            for key in [k for k, t in self.last_seen.items() if now - t > KEY_MEMORY_S and not self.paired[k]]:
                del self.last_seen[key]
                self.paired.pop(key, None)

    # -- openings ---------------------------------------------------------------------
    def _close_incoming(self, conn: _Incoming, error: tuple[int, str] | None = None) -> None:
        """Forget ``conn``; with ``error``, tell the peer first (never blocking the loop)."""
        self.incoming.pop(conn.sock.fileno(), None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        if error is None:
            conn.sock.close()
            return
        if conn.tvm:  # TVM's client reads one i32 here: "no server matches the key" (it names the key itself)
            log.info("refused a TVM client from %s: %s", conn.host, error[1])
            refuse(conn.sock, TVM_MISMATCH)
            return
        notice = _frame(Kind.ERROR, [int(error[0]), error[1]])
        if conn.preamble is None:
            notice = PREAMBLE.pack(MAGIC, VERSION, 0) + notice
        refuse(conn.sock, notice)  # a few hundred bytes into the socket's buffer, and close (never blocking)

    def _send_opening(self, conn: _Incoming, data: bytes) -> bool:
        """Send a few bytes of the opening without blocking; False (and ``conn`` closed) if they did not all fit."""
        try:
            sent = conn.sock.send(data)
        except OSError:
            sent = 0
        if sent != len(data):
            self._close_incoming(conn)
            return False
        return True

    def _read_incoming(self, conn: _Incoming) -> None:
        while True:  # read exactly the opening, part by part: nothing after it
            need = conn.need()
            try:
                data = conn.sock.recv(need)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close_incoming(conn)
                return
            conn.buf += data
            if len(data) < need:
                return
            if self._advance(conn):
                return

    def _advance(self, conn: _Incoming) -> bool:
        """A part of the opening is complete: check it; True once the connection has left ``incoming``."""
        if conn.preamble is None and conn.buf[:4] == TVM_MAGIC_BYTES:  # TVM's client (docs/protocol.md 13)
            length = struct.unpack_from("<i", conn.buf, 4)[0]
            conn.tvm, conn.preamble = True, bytes(conn.buf)
            conn.buf.clear()
            if not 0 < length <= MAX_TVM_KEY:
                self._close_incoming(conn, (ErrorCode.KEY_MISMATCH, "bad key length"))
                return True
            return False
        if conn.tvm:  # its key, "client:<key>[ -timeout=S]": paired with a server of that key, to which it is replayed
            word = bytes(conn.buf).decode("utf-8", "replace").split(" ")[0]
            conn.preamble += bytes(conn.buf)
            if not word.startswith("client:") or not word[len("client:"):]:
                self._close_incoming(conn, (ErrorCode.KEY_MISMATCH, "not a client's key"))
                return True
            self._client(conn, word[len("client:"):])
            return True
        if conn.preamble is None:
            magic, version, flags = PREAMBLE.unpack_from(conn.buf)
            if magic != MAGIC:
                self._close_incoming(conn, (ErrorCode.PROTOCOL, f"bad magic {magic!r}: this is an rpc-workbench proxy"))
                return True
            conn.preamble = bytes(conn.buf)
            conn.buf.clear()
            conn.is_server = bool(flags & FLAG_SERVER)
            if not conn.is_server:  # a client: tell it it reached a proxy, and ask for its key
                hello = PREAMBLE.pack(MAGIC, VERSION, 0) + _frame(
                    Kind.HELLO, {"version": VERSION, "proxy": True, "nonce": b"", "auth": False})
                return not self._send_opening(conn, hello)
            return False
        if len(conn.buf) == HEADER.size:
            ctrl_len, kind, _, bulk_len = HEADER.unpack_from(conn.buf)
            if not 0 < ctrl_len <= MAX_OPENING or bulk_len:
                self._close_incoming(conn, (ErrorCode.PROTOCOL, (
                    f"unexpected frame for a proxy (control part of {ctrl_len} bytes, bulk part of {bulk_len}): "
                    f"it takes REGISTER or PROXY_CONNECT {{key: ...}} of at most {MAX_OPENING} bytes")))
                return True
            return False
        kind = HEADER.unpack_from(conn.buf)[1]
        try:
            ctrl = unpack(bytes(conn.buf[HEADER.size:]))
        except Exception as exc:
            self._close_incoming(conn, (ErrorCode.PROTOCOL, f"malformed control message: {exc}"))
            return True
        if conn.nonce is not None:  # a challenged server: its second REGISTER carries the proof
            if kind != Kind.REGISTER or not isinstance(ctrl, dict):
                self._close_incoming(conn, (ErrorCode.PROTOCOL,
                                            "the proxy expected REGISTER {proof: ...} after its HELLO"))
            else:
                self._check_proof(conn, ctrl.get("proof"))
            return True
        expected = Kind.REGISTER if conn.is_server else Kind.PROXY_CONNECT
        key = ctrl.get("key") if isinstance(ctrl, dict) else None
        if kind == Kind.PROXY_CONNECT and key == "":
            self._close_incoming(conn, (ErrorCode.KEY_MISMATCH, (
                "this is an RPC proxy: connect with the key of a server waiting here, "
                f"rpc.connect(host, port, key=...) (keys waiting: {self._keys_waiting()})")))
            return True
        if kind != expected or not isinstance(key, str) or not key:
            self._close_incoming(conn, (ErrorCode.PROTOCOL, f"the proxy expected {expected.name} {{key: ...}}"))
            return True
        conn.buf = bytearray()
        if conn.is_server:
            info = ctrl.get("info")
            if self.auth_token:
                return self._challenge(conn, key, info if isinstance(info, dict) else {})
            self._register(conn, key, info if isinstance(info, dict) else {})
        else:
            self._client(conn, key)
        return True

    # -- registration tokens ----------------------------------------------------------------
    def _challenge(self, conn: _Incoming, key: str, info: dict) -> bool:
        """Ask a server for its registration proof over a fresh nonce; True once ``conn`` has left ``incoming``."""
        conn.key, conn.info = key, info
        conn.nonce = os.urandom(NONCE_BYTES)
        hello = _frame(Kind.HELLO, {"version": VERSION, "proxy": True, "auth": True, "nonce": conn.nonce})
        return not self._send_opening(conn, hello)  # its next frame, REGISTER {proof}, is read like the first

    def _check_proof(self, conn: _Incoming, proof: object) -> None:
        """A challenged server's second REGISTER: register it if its proof is right, else refuse with AUTH."""
        host, now = conn.host, time.monotonic()
        if not proof:
            text = (f"this proxy takes only servers that prove they know its registration token: start the server "
                    f"with registration_token=... (rpc_server --registration-token, or ${REGISTRATION_TOKEN_ENV})")
        else:
            turn = self.throttle.wait_until(host, now)
            if turn > now:
                text = (f"{self.throttle.failures(host, now)} wrong registration proofs came from {host}: its next "
                        f"proof is checked in {turn - now:.2f} s at the earliest; try again then")
                self._close_incoming(conn, (ErrorCode.AUTH, text))
                return
            self.throttle.attempt(host, now)
            expected = registration_proof(self.auth_token, conn.nonce, "proxy")
            if isinstance(proof, bytes) and hmac.compare_digest(proof, expected):
                self.throttle.succeeded(host)
                self._register(conn, conn.key, conn.info)
                return
            delay = self.throttle.failed(host, now)
            text = refusal_text(AuthenticationError(
                "wrong registration token: the server's registration_token differs from the proxy's --auth-token"),
                self.throttle.failures(host, now), delay)
        log.warning("refused a server of key %r from %s: %s", conn.key, host, text)
        self._close_incoming(conn, (ErrorCode.AUTH, text))

    # -- servers ------------------------------------------------------------------------
    def _register(self, conn: _Incoming, key: str, info: dict) -> None:
        self.incoming.pop(conn.sock.fileno())
        try:
            conn.sock.send(_frame(Kind.OK, None))
        except OSError:
            self._sel.unregister(conn.sock)
            conn.sock.close()
            return
        waiting = _Waiting(conn.sock, key, info)
        self._sel.modify(conn.sock, selectors.EVENT_READ, waiting)  # readable now only means it left
        self.waiting.setdefault(key, deque()).append(waiting)
        with self._relays_lock:
            self.last_seen[key] = time.monotonic()
        log.info("server of key %r is waiting (%d for that key)", key, len(self.waiting[key]))
        self._serve_held(key)
        if self.registration is not None and waiting in self.waiting.get(key, ()):
            self.registration.offer(id(waiting), key)
            self._publish_keys()

    def _keys_waiting(self) -> str:
        return ", ".join(sorted(k for k, q in self.waiting.items() if q)) or "none"

    def _publish_keys(self) -> None:
        """Tell the tracker the keys of the servers behind the proxy (waiting or in a session), when they change."""
        with self._relays_lock:
            keys = {k for k, n in self.paired.items() if n > 0}
        keys.update(k for k, q in self.waiting.items() if q)
        text = f"server:proxy[{','.join(sorted(keys))}]"
        if text != self._published:
            self._published = text
            self.registration.update_info(key=text)

    def _drop_waiting(self, waiting: _Waiting, why: str) -> None:
        queue = self.waiting.get(waiting.key)
        if queue and waiting in queue:
            queue.remove(waiting)
            if not queue:
                del self.waiting[waiting.key]
        self._sel.unregister(waiting.sock)
        waiting.sock.close()
        with self._relays_lock:
            self.last_seen[waiting.key] = time.monotonic()
        log.info("server of key %r left: %s", waiting.key, why)
        if self.registration is not None:
            self.registration.withdraw(id(waiting), still_on_offer=True)
            self._publish_keys()

    def _base(self, key: str) -> str:
        """The device key a client's key names: the key itself, or the longest key served here that it extends
        with ``:`` and a suffix (a match key; a key may hold colons, "127.0.0.1:5555"), else the part before its
        first colon."""
        if ":" not in key:
            return key
        with self._relays_lock:
            known = set(self.waiting) | set(self.held) | set(self.last_seen) | {k for k, n in self.paired.items() if n}
        if key in known:
            return key
        longest = max((k for k in known if key.startswith(k + ":")), key=len, default=None)
        return longest if longest is not None else key.partition(":")[0]

    def _take_server(self, key: str, base: str) -> tuple[_Waiting | None, bool]:
        """A live waiting server for ``key`` (a plain key or a tracker match key; ``base`` its device key), and
        whether it was the match."""
        if self.registration is not None:
            slot = self.registration.find(key)
            server = next((w for q in self.waiting.values() for w in q if id(w) == slot), None)
            if server is not None and not peer_closed(server.sock):
                return server, True
            if server is not None:
                self._drop_waiting(server, "it closed the connection")
        queue = self.waiting.get(base)
        while queue:
            server = queue[0]
            if not peer_closed(server.sock):
                return server, False
            self._drop_waiting(server, "it closed the connection")
        return None, False

    # -- clients ------------------------------------------------------------------------
    def _client(self, conn: _Incoming, key: str) -> None:
        base = self._base(key)
        with self._relays_lock:
            known = self.paired[base] > 0 or time.monotonic() - self.last_seen.get(base, -KEY_MEMORY_S) < KEY_MEMORY_S
        server, matched = self._take_server(key, base)
        if server is None and not (self.timeout_client and (known or self.unknown_key_grace)):
            self._close_incoming(conn, (ErrorCode.NO_DEVICE, self._no_server(base)))
            return
        if not self._make_room(conn):
            return
        with self._relays_lock:
            self.clients_of[conn.host] += 1
        self.incoming.pop(conn.sock.fileno())
        if server is not None and not self.held.get(base):
            self._sel.unregister(conn.sock)
            self._pair(conn, server, matched)
            return
        now = time.monotonic()
        wait = self.timeout_client if known or server is not None else min(self.timeout_client, self.unknown_key_grace)
        held = _Held(conn, key, base, now + wait, next(self._arrival), now)
        self._sel.modify(conn.sock, selectors.EVENT_READ, held)
        self.held.setdefault(base, HeldQueue()).add(held)
        log.info("holding a client of key %r from %s up to %g s for a server", base, conn.host, wait)
        if server is not None:  # clients were already waiting for the key: it waits its turn behind them
            self._serve_held(base)

    def _make_room(self, conn: _Incoming) -> bool:
        """A place for a new client, or False (and ``conn`` refused with BUSY) if the proxy is full.

        Below ``max_clients`` every client gets one, whatever its address. At it, the newest held client of the
        address with the most clients makes room, if that address holds more than its share
        (``max_clients_per_source``) and more than ``conn``'s would; otherwise ``conn`` itself is refused.
        """
        with self._relays_lock:
            total = sum(self.clients_of.values())
            mine = self.clients_of[conn.host] + 1
            heaviest, most = max(self.clients_of.items(), key=lambda item: item[1], default=(conn.host, 0))
        if total < self.max_clients:
            return True
        victim = None
        if heaviest != conn.host and most > max(self.max_clients_per_source, mine):
            victim = max((q.newest_of(heaviest) for q in self.held.values()), default=None,
                         key=lambda h: -1 if h is None else h.arrival)
        if victim is None:
            self._close_incoming(conn, (ErrorCode.BUSY, (
                f"proxy busy: it holds {total} clients waiting for servers (at most {self.max_clients}), "
                f"{mine - 1} of them from {conn.host}; try again once some are served, or start the proxy with a "
                "larger --max-clients")))
            return False
        log.warning("proxy full (%d clients): refusing the newest client from %s (%d clients) to hold one from %s",
                    total, heaviest, most, conn.host)
        self._drop_held(victim, (ErrorCode.BUSY, (
            f"proxy busy: it holds {total} clients waiting for servers (at most {self.max_clients}) and {most} of "
            f"them are from {heaviest}, the most of any address (over its share of {self.max_clients_per_source}): "
            "the newest of them made room for a client from another address; try again once some are served, or "
            "start the proxy with a larger --max-clients")))
        return True

    def _no_server(self, base: str, waited: float | None = None) -> str:
        text = f"no server of key {base!r} is waiting at this proxy (keys waiting: {self._keys_waiting()})"
        if waited is not None:
            with self._relays_lock:
                busy = self.paired[base]
            text += f"; waited {waited:.1f} s for one to register"
            if busy:
                text += f" ({busy} of its servers are in sessions)"
        return text

    def _drop_held(self, held: _Held, error: tuple[int, str] | None) -> None:
        queue = self.held.get(held.base)
        if queue is not None:
            queue.remove(held, served=False)
            if not queue:
                del self.held[held.base]
        with self._relays_lock:
            self._release_source(held.client.host)
        self._close_incoming(held.client, error)

    def _release_source(self, host: str) -> None:
        """One client of ``host`` is no longer held or being paired (call with _relays_lock held)."""
        self.clients_of[host] -= 1
        if self.clients_of[host] <= 0:
            del self.clients_of[host]

    def _serve_held(self, key: str) -> None:
        """Pair the clients held for ``key`` with its waiting servers, in their turns (workbench.rpc.proxy.turns)."""
        while self.held.get(key) and self.waiting.get(key):
            queue = self.held[key]
            held = queue.peek()
            if peer_closed(held.client.sock):
                self._drop_held(held, None)
                continue
            server, matched = self._take_server(held.key, held.base)
            if server is None:
                return
            queue.remove(held, served=True)
            if not queue:
                del self.held[key]
            self._sel.unregister(held.client.sock)
            self._pair(held.client, server, matched)

    # -- pairing --------------------------------------------------------------------------
    def _pair(self, client: _Incoming, server: _Waiting, matched: bool) -> None:
        """Hand ``client`` (counted in clients_of, out of the selector) and ``server`` to a pairing thread."""
        self.waiting[server.key].remove(server)
        if not self.waiting[server.key]:
            del self.waiting[server.key]
        self._sel.unregister(server.sock)
        if self.registration is not None:
            self.registration.withdraw(id(server), still_on_offer=not matched)
        pair = (client.sock, server.sock)
        with self._relays_lock:
            self.paired[server.key] += 1
            self.pairings.add(pair)
        log.info("pairing a client from %s with a server of key %r", client.host, server.key)
        threading.Thread(target=self._pair_then_relay, args=(client, server, pair), name="proxy-pairing",
                         daemon=True).start()

    def _pair_then_relay(self, client: _Incoming, server: _Waiting, pair: tuple[socket.socket, socket.socket]) -> None:
        """Replay the client's preamble to the server, drop the server's, pass the handshake until the client's
        CONNECT is through (within ``pairing_timeout``), then relay."""
        deadline = time.monotonic() + self.pairing_timeout
        try:
            _send_by(server.sock, client.preamble, deadline)
            if not client.tvm:  # (a TVM client's handshake goes on end to end: the server answers it)
                _recv_by(server.sock, PREAMBLE.size, deadline)
                _pass_first_frame(client.sock, server.sock, deadline, self.pairing_timeout)
            ok = True
        except (OSError, _PairingTimeout) as exc:
            log.info("pairing a client from %s with a server of key %r failed: %s", client.host, server.key, exc)
            ok = False
        with self._relays_lock:
            self.pairings.discard(pair)
            self._release_source(client.host)
            if not ok:
                self.paired[server.key] -= 1
                self.last_seen[server.key] = time.monotonic()
        if not ok:
            for sock in pair:
                sock.close()
            return
        for sock in pair:
            sock.settimeout(None)
        relay = Relay(client.sock, server.sock, on_done=lambda r: self._relay_done(r, server.key))
        with self._relays_lock:
            self.relays.add(relay)
        relay.start()

    def _relay_done(self, relay: Relay, key: str) -> None:
        with self._relays_lock:
            self.relays.discard(relay)
            self.paired[key] -= 1
            self.last_seen[key] = time.monotonic()

    def stop(self) -> None:
        with self._relays_lock:
            relays = list(self.relays)
            pairings = list(self.pairings)
        for pair in pairings:  # their threads wake up and close them
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for relay in relays:
            relay.stop()
        for relay in relays:
            relay.join(5)
        for conn in list(self.incoming.values()):
            self._close_incoming(conn)
        for queue in list(self.held.values()):
            for held in list(queue):
                self._drop_held(held, None)
        for queue in self.waiting.values():
            for waiting in queue:
                waiting.sock.close()
        self.waiting.clear()
        self._sel.close()
        self.listener.close()
        if self.registration is not None:
            self.registration.close()


def _send_by(sock: socket.socket, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _PairingTimeout("a peer did not read the handshake in time")
        sock.settimeout(remaining)
        try:
            view = view[sock.send(view):]
        except socket.timeout:
            raise _PairingTimeout("a peer did not read the handshake in time") from None


def _recv_by(sock: socket.socket, n: int, deadline: float) -> bytes:
    data = b""
    while len(data) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _PairingTimeout("the server did not answer in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(data))
        except socket.timeout:
            raise _PairingTimeout("the server did not answer in time") from None
        if not chunk:
            raise ConnectionError("the server closed the connection when paired")
        data += chunk
    return data


def _pass_first_frame(client: socket.socket, server: socket.socket, deadline: float, timeout: float) -> None:
    """Pass the server's bytes (its HELLO) to the client, and the client's first frame (its CONNECT) to the server.

    Reads no byte of the client past that frame: the relay takes over from there.
    """
    poller = select.poll()
    poller.register(client, select.POLLIN)
    poller.register(server, select.POLLIN)
    got = bytearray()
    need = HEADER.size
    while len(got) < need:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _PairingTimeout(f"the client sent no CONNECT within {timeout:g} s of being paired")
        for fd, _ in poller.poll(remaining * 1000):
            if fd == server.fileno():
                data = server.recv(1 << 16)
                if not data:
                    raise ConnectionError("the server closed the connection during the handshake")
                _send_by(client, data, deadline)
            else:
                data = client.recv(need - len(got))
                if not data:
                    raise ConnectionError("the client left during the handshake")
                got += data
                if len(got) == HEADER.size:
                    need = HEADER.size + min(HEADER.unpack_from(got)[0], MAX_OPENING)
                _send_by(server, data, deadline)


def _frame(kind: int, ctrl: Any) -> bytes:
    body = pack(ctrl)
    return HEADER.pack(len(body), kind, 0, 0) + body


def serve_proxy(config: dict[str, Any], ready: Callable[[int], None] | None = None, owner_fd: int | None = None) -> None:
    """Run a proxy in this process until SIGTERM/SIGINT (or the owner's pipe closes)."""
    setup_logging(config.get("silent", False))
    limits = proxy_limits(**{k: config[k] for k in ("timeout_client", "handshake_timeout", "pairing_timeout",
                                                    "max_clients_per_source", "max_clients", "unknown_key_grace")
                             if config.get(k) is not None})
    tokens = {k: check_token(k, config.get(k)) for k in ("auth_token", "registration_token")}
    listener = bind_port(config.get("host", "127.0.0.1"), int(config.get("port", 9090)), int(config.get("port_end", 9199)))
    listener.setblocking(False)
    stop_on_signals()
    port = listener.getsockname()[1]
    tracker = config.get("tracker_addr")
    log.info("RPCProxy: bind to %s:%d%s", config.get("host", "127.0.0.1"), port,
             " (servers register with the registration token only)" if tokens["auth_token"] else "")
    loop = ProxyLoop(listener, owner_fd, tuple(tracker) if tracker else None, config.get("custom_addr"), **limits,
                     **tokens)
    if ready:
        ready(port)
    loop.run()


if __name__ == "__main__":
    service_main(serve_proxy)
