"""``rpc.Tracker``: one queue of devices per key, shared by many users.

It speaks TVM's tracker protocol (workbench.rpc.tracker.wire), so TVM servers
can register with it and TVM's ``query_rpc_tracker`` can read it. Free servers
are handed out first in, first out; waiting requests by priority (higher
first), then arrival. Unlike TVM's, a request whose client has gone leaves its
queue at once, and a server whose connection closes leaves the free list.

Nobody on the network can stop it. A message that is not a well-formed request
(wrong shape, type or range, ``NaN``/``Infinity``, JSON nested too deep, over
64 KiB) closes that one connection. Priorities are clamped to
``[PRIORITY_MIN, PRIORITY_MAX]`` = [-1000, 1000]. A key's queue is dropped once
it has no free slot, no waiting request and no server connected (one busy in a
session keeps it). A connection has
``handshake_timeout`` seconds to send the tracker magic; one that is not a
server (never sent UPDATE_INFO, offers no slot) and has no request waiting is
closed after ``idle_timeout`` seconds without a message; one that does not read
its replies is closed after ``write_timeout`` seconds (the tracker reads no more
of its requests meanwhile). At the file-descriptor limit it closes the oldest
connection that never sent the magic (else the longest idle client) to make
room, or stops accepting for a moment instead of spinning, and serves the
connections it has.

With ``auth_token``, only servers that prove they know it may register: a
connection's PUT, and its UPDATE_INFO naming a server (``server:...``), are
answered ``[-1, "..."]`` and ignored until it has answered a nonce of the
tracker's with ``registration_proof`` (workbench.rpc.tracker.registration; the server's
``registration_token``). Clients that only REQUEST or read SUMMARY need no
token: the devices themselves are protected by the session token. TVM's own
``rpc_server`` cannot prove a token, so a tracker with one refuses it (and
logs why). Wrong proofs from one address are checked at most once per
``min(0.25 s * 2**(n-1), 4 s)`` (n: its wrong proofs); earlier attempts are
refused unchecked.

    >>> from workbench import rpc
    >>> tracker = rpc.Tracker(port=0)
    >>> rpc.Server(port=0, tracker_addr=("127.0.0.1", tracker.port), key="rasp")  # doctest: +SKIP
    >>> rpc.connect_tracker("127.0.0.1", tracker.port).request("rasp")             # doctest: +SKIP
"""
from __future__ import annotations

import heapq
import hmac
import itertools
import json
import logging
import math
import os
import re
import selectors
import socket
import time
from collections import Counter, OrderedDict, deque
from typing import Any, Callable

from ...errors import AuthenticationError, ProtocolError
from ..wire.handshake import AuthThrottle, refusal_text
from .registration import AUTH_NONCE, AUTH_PROOF, NONCE_BYTES, REGISTRATION_TOKEN_ENV, check_token, registration_proof
from ..service.process import ServiceHandle, service_main, setup_logging, stop_on_signals
from ..service.loop import ServiceLoop, bind_port, peer_closed
from .wire import GREETING, MAGIC_BYTES, NOTHING, Code, MessageReader, encode, quick_ack

log = logging.getLogger("workbench.rpc.tracker")

PRIORITY_MIN, PRIORITY_MAX = -1000, 1000  # a request's priority is clamped to this range
MAX_NAME = 512  # characters of a key, match key, user or address
MAX_REQUEST = 64 << 10  # bytes of one message from a client
MAX_INFO = 16 << 10  # bytes of a connection's UPDATE_INFO fields, as JSON
MAX_INFO_DEPTH = 8  # nesting of UPDATE_INFO values
MAX_SLOTS_PER_CONN = 4096  # free slots one connection may offer (a proxy offers one per idle server)
MAX_REQUESTS_PER_CONN = 256  # requests one connection may have waiting
MAX_WAITING_LISTED = 1000  # waiting requests per key that SUMMARY lists
MAX_KEYS_KEPT = 1024  # keys whose empty queue stays listed after their last server left (the most recent)
HANDSHAKE_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 600.0
WRITE_TIMEOUT_S = 30.0


class Tracker(ServiceHandle):
    """An RPC tracker in a separate process (``port`` reports where it listens).

    ``handshake_timeout``, ``idle_timeout`` and ``write_timeout`` (seconds; 0
    or None: never) bound what a connection may hold (see the module doc).
    ``auth_token``: servers must prove they know it to register (their
    ``registration_token``); TVM's own servers then cannot register. None (the
    default): anyone may register, as with TVM's tracker.
    Ends with ``terminate()``, when collected, or when this process exits.

        >>> with rpc.Tracker(port=0, idle_timeout=60) as tracker:  # doctest: +SKIP
        ...     print(rpc.connect_tracker("127.0.0.1", tracker.port).text_summary())
        >>> tracker = rpc.Tracker(port=0, auth_token="s3cret")                          # doctest: +SKIP
        >>> rpc.Server(port=0, key="rasp", tracker_addr=("127.0.0.1", tracker.port),    # doctest: +SKIP
        ...            registration_token="s3cret")
    """

    what = "RPC tracker"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9190,
        port_end: int = 9199,
        silent: bool = False,
        *,
        handshake_timeout: float | None = HANDSHAKE_TIMEOUT_S,
        idle_timeout: float | None = IDLE_TIMEOUT_S,
        write_timeout: float | None = WRITE_TIMEOUT_S,
        auth_token: str | None = None,
    ):
        self.host = host
        config = {"host": host, "port": port, "port_end": port_end, "silent": silent,
                  "auth_token": check_token("auth_token", auth_token)}
        for name, value in (("handshake_timeout", handshake_timeout), ("idle_timeout", idle_timeout),
                            ("write_timeout", write_timeout)):
            config[name] = check_timeout(name, value)
        self._start("workbench.rpc.tracker.tracker", config)


def check_timeout(name: str, value: float | None) -> float | None:
    """``value`` as seconds (None: never); a clear ValueError for anything but a finite number >= 0."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of seconds >= 0 (0 or None: never), not {value!r}")
    return float(value)


# -- the tracker process ------------------------------------------------------------
class _Value:
    """A free server slot of ``key``: where to connect and the match key to present."""

    __slots__ = ("conn", "key", "host", "port", "matchkey")

    def __init__(self, conn: "_Conn", key: str, host: str, port: int, matchkey: str):
        self.conn, self.key, self.host, self.port, self.matchkey = conn, key, host, port, matchkey


class _Request:
    __slots__ = ("conn", "key", "user", "priority", "cancelled")

    def __init__(self, conn: "_Conn", key: str, user: str, priority: int | float):
        self.conn, self.key, self.user, self.priority, self.cancelled = conn, key, user, priority, False


class _Queue:
    def __init__(self) -> None:
        self.free: deque[_Value] = deque()
        self.waiting: list[tuple[int | float, int, _Request]] = []  # heap of (-priority, arrival, request)
        self.pending = 0

    def waiting_list(self) -> list[dict[str, Any]]:
        if not self.pending:
            return []
        live = (r for _, _, r in sorted(self.waiting) if not r.cancelled)
        return [{"user": r.user, "priority": r.priority} for r in itertools.islice(live, MAX_WAITING_LISTED)]

    def next_request(self) -> _Request | None:
        while self.waiting:
            request = heapq.heappop(self.waiting)[2]
            if not request.cancelled:
                return request
        return None


class _Conn:
    __slots__ = ("sock", "host", "reader", "out", "info", "values", "requests", "matchkeys",
                 "greeted", "announced", "serves", "opened", "last_message", "last_write", "authed", "nonce", "refused")

    def __init__(self, sock: socket.socket, host: str, now: float):
        self.sock = sock
        self.host = host
        self.reader = MessageReader(expect_magic=True, max_message=MAX_REQUEST)
        self.out = bytearray()  # replies not sent yet; while there are some, no more requests are read
        self.info: dict[str, Any] = {"addr": [host, 0]}
        self.values: list[_Value] = []
        self.requests: list[_Request] = []
        self.matchkeys: set[str] = set()
        self.greeted = False  # sent the magic
        self.announced = False  # sent UPDATE_INFO: a server (or a proxy), kept however quiet
        self.serves: tuple[str, ...] = ()  # the keys its UPDATE_INFO says it serves ("server:k", "server:proxy[a,b]")
        self.opened = self.last_message = self.last_write = now
        self.authed = False  # proved the registration token (only asked of a tracker that has one)
        self.nonce: bytes | None = None  # the registration nonce sent to it, good for one proof
        self.refused = False  # a registration of it was refused (logged once per connection)


def _name(value: Any, what: str, empty: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME or (not value and not empty):
        raise ProtocolError(f"{what} must be a {'' if empty else 'non-empty '}string of at most {MAX_NAME} "
                            f"characters, not {_show(value)}")
    return value


def _priority(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise ProtocolError(f"a request's priority must be a number, not {_show(value)}")
    return min(max(value, PRIORITY_MIN), PRIORITY_MAX)


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ProtocolError(f"a port must be an integer in 1..65535, not {_show(value)}")
    return value


def _served_keys(info_key: Any) -> tuple[str, ...]:
    """The device keys a server-list entry stands for: ``server:rasp``, or ``server:proxy[a,b]`` (a proxy)."""
    if not isinstance(info_key, str) or not info_key.startswith("server"):
        return ()
    name = info_key.split(":", 1)[1] if ":" in info_key else info_key
    proxied = re.fullmatch(r"proxy\[(.*)\](?::.*)?", name)
    if proxied:
        return tuple(dict.fromkeys(k for k in proxied.group(1).split(",") if k))
    return (name,)


def _depth(value: Any, limit: int) -> bool:
    """True if ``value`` nests no deeper than ``limit`` lists/objects."""
    if isinstance(value, dict):
        return limit > 0 and all(_depth(v, limit - 1) for v in value.values())
    if isinstance(value, list):
        return limit > 0 and all(_depth(v, limit - 1) for v in value)
    return True


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# the length of each request: (fewest, most) elements, code included
_ARITY = {Code.PING: (1, 1), Code.STOP: (1, 2), Code.PUT: (3, 4), Code.REQUEST: (2, 4),
          Code.UPDATE_INFO: (2, 2), Code.SUMMARY: (1, 1), Code.GET_PENDING_MATCHKEYS: (1, 1),
          AUTH_NONCE: (1, 1), AUTH_PROOF: (2, 2)}
_NAMES = {AUTH_NONCE: "AUTH_NONCE", AUTH_PROOF: "AUTH_PROOF"}
NO_TOKEN_TEXT = (
    "this tracker takes registrations only from servers that prove they know its registration token: start the "
    f"server with registration_token=... (rpc_server --registration-token, or ${REGISTRATION_TOKEN_ENV}); TVM's own "
    "rpc_server cannot register with a tracker started with --auth-token"
)
WRONG_TOKEN_TEXT = "wrong registration token: the server's registration_token differs from the tracker's --auth-token"


class TrackerLoop(ServiceLoop):
    def __init__(
        self,
        listener: socket.socket,
        owner_fd: int | None = None,
        stop_key: str | None = None,
        *,
        handshake_timeout: float | None = HANDSHAKE_TIMEOUT_S,
        idle_timeout: float | None = IDLE_TIMEOUT_S,
        write_timeout: float | None = WRITE_TIMEOUT_S,
        auth_token: str | None = None,
    ):
        super().__init__(listener, owner_fd)
        self.stop_key = stop_key
        self.auth_token = auth_token
        self.throttle = AuthThrottle()  # wrong registration proofs, by address
        self.queues: dict[str, _Queue] = {}
        self.conns: dict[int, _Conn] = {}
        self.served: Counter[str] = Counter()  # keys of the servers connected (their queues stay, even empty)
        self.seen: OrderedDict[str, None] = OrderedDict()  # keys once served: listed with free 0, as TVM does
        self._arrival = itertools.count()
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        limits = [t for t in (handshake_timeout, idle_timeout, write_timeout) if t]
        self._sweep_every = min([1.0] + [max(0.02, t / 4) for t in limits])
        self._next_sweep = 0.0

    # -- event loop -----------------------------------------------------------------
    def _event(self, key: selectors.SelectorKey, events: int) -> None:
        conn = key.data
        try:
            if events & selectors.EVENT_WRITE:
                self._flush(conn)
            if events & selectors.EVENT_READ and conn.sock.fileno() >= 0:
                self._read(conn)
        except Exception:  # a bug must cost one connection, never the tracker
            log.exception("closing connection from %s after an unexpected error", conn.host)
            self._close(conn)

    def _timeout(self) -> float | None:
        return max(0.0, self._next_sweep - time.monotonic()) if self.conns else None

    def _tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_every
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Close connections past their deadlines: no magic, idle, or not reading their replies."""
        handshake, idle, write = self.handshake_timeout, self.idle_timeout, self.write_timeout
        for conn in list(self.conns.values()):
            why = None
            if conn.out and write and now - conn.last_write > write:
                why = f"it read none of its replies for {write:g} s"
            elif not conn.greeted:
                if handshake and now - conn.opened > handshake:
                    why = f"no tracker magic within {handshake:g} s"
            elif idle and not (conn.announced or conn.values or conn.requests) and now - conn.last_message > idle:
                why = f"idle for {idle:g} s"
            if why:
                log.info("closing connection from %s: %s", conn.host, why)
                self._close(conn)

    def stop(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self._sel.close()
        self.listener.close()

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
        conn = _Conn(sock, addr[0], time.monotonic())
        self.conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _free_fds(self) -> bool:
        """At the fd limit: close the oldest connection that never sent the magic, else the longest idle client."""
        silent = [c for c in self.conns.values() if not c.greeted]
        if silent:
            victim = min(silent, key=lambda c: c.opened)
        else:
            idle = [c for c in self.conns.values() if not (c.announced or c.values or c.requests or c.out)]
            if not idle:
                return False
            victim = min(idle, key=lambda c: c.last_message)
        log.info("out of file descriptors: closing the connection from %s to make room", victim.host)
        self._close(victim)
        return True

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        quick_ack(conn.sock)  # a TVM client's message body waits for our ACK of its length
        conn.reader.add(data)
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Handle the complete messages received, until a reply cannot be sent at once."""
        handled = False
        while not conn.out and conn.sock.fileno() >= 0:
            try:
                message = conn.reader.next()
                if message is NOTHING:
                    break
                handled = True
                if message is GREETING:
                    conn.greeted = True
                    self._send_raw(conn, MAGIC_BYTES)
                else:
                    self._handle(conn, message)
            except (ProtocolError, TypeError, ValueError, KeyError, IndexError) as exc:
                log.warning("closing connection from %s: %s", conn.host, exc)
                self._close(conn)
                return
        if handled:
            conn.last_message = time.monotonic()

    def _send(self, conn: _Conn, message: Any) -> bool:
        return self._send_raw(conn, encode(message))

    def _send_raw(self, conn: _Conn, data: bytes) -> bool:
        """Send or queue ``data``; False if the connection turned out to be closed."""
        if conn.sock.fileno() < 0:
            return False
        if not conn.out:
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return False
            data = data[sent:]
            if not data:
                return True
            conn.last_write = time.monotonic()
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)  # read no more of its requests meanwhile
        conn.out += data
        return True

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        del conn.out[:sent]
        conn.last_write = time.monotonic()
        if not conn.out:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
            self._process(conn)  # the requests that arrived meanwhile

    def _close(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.out.clear()
        keys = set()
        for value in conn.values:  # its servers are no longer free
            self.queues[value.key].free.remove(value)
            keys.add(value.key)
        conn.values.clear()
        for request in conn.requests:  # its requests leave their queues now
            request.cancelled = True
            queue = self.queues[request.key]
            queue.pending -= 1
            keys.add(request.key)
            if len(queue.waiting) > 2 * queue.pending + 64:  # drop cancelled entries: the heap stays bounded
                queue.waiting = [entry for entry in queue.waiting if not entry[2].cancelled]
                heapq.heapify(queue.waiting)
        conn.requests.clear()
        keys.update(conn.serves)
        self._serve_keys(conn, ())
        for key in keys:
            self._forget_if_empty(key)

    def _forget_if_empty(self, key: str) -> None:
        """Drop the queue of ``key`` once it has no free slot, no waiting request and no server connected."""
        queue = self.queues.get(key)
        if queue is not None and not queue.free and not queue.pending and not self.served[key] and key not in self.seen:
            del self.queues[key]

    def _serve_keys(self, conn: _Conn, keys: tuple[str, ...]) -> None:
        """Record the keys ``conn`` now says it serves."""
        self.served.update(keys)
        for key in keys:  # once served, a key's queue stays (free 0) after its last server left, as in TVM
            self.seen[key] = None
            self.seen.move_to_end(key)
        while len(self.seen) > MAX_KEYS_KEPT:
            self._forget_if_empty(self.seen.popitem(last=False)[0])
        self.served.subtract(conn.serves)
        for key in conn.serves:
            if self.served[key] <= 0:
                del self.served[key]
        conn.serves = keys

    # -- the protocol -----------------------------------------------------------------
    def _handle(self, conn: _Conn, message: Any) -> None:
        if not isinstance(message, list) or not message or isinstance(message[0], bool) \
                or not isinstance(message[0], int):
            raise ProtocolError(f"a tracker request is a JSON array starting with a code, not {_show(message)}")
        code = message[0]
        arity = _ARITY.get(code)
        if arity is None:
            raise ProtocolError(f"unknown tracker code {_show(code)}")
        if not arity[0] <= len(message) <= arity[1]:
            name = _NAMES.get(code) or Code(code).name
            raise ProtocolError(f"{name} takes {arity[0] - 1}..{arity[1] - 1} fields, not {_show(message)}")
        if code == Code.PUT:
            where = message[2]
            if not isinstance(where, list) or len(where) != 2:
                raise ProtocolError(f"PUT takes [port, matchkey], not {_show(where)}")
            custom_addr = message[3] if len(message) > 3 else None
            if custom_addr is not None:
                _name(custom_addr, "PUT's custom address")
            if self.auth_token and not conn.authed:
                return self._refuse_registration(conn, "PUT")
            self._put(conn, _name(message[1], "PUT's key"), _port(where[0]), _name(where[1], "PUT's match key"),
                      custom_addr)
            self._send(conn, Code.SUCCESS)
        elif code == Code.REQUEST:
            key = _name(message[1], "REQUEST's key")
            user = _name(message[2], "REQUEST's user", empty=True) if len(message) > 2 else ""
            self._request(conn, key, user, _priority(message[3]) if len(message) > 3 else 1)
        elif code == Code.UPDATE_INFO:
            if self._update_info(conn, message[1]):
                self._send(conn, Code.SUCCESS)
        elif code == AUTH_NONCE:
            self._auth_nonce(conn)
        elif code == AUTH_PROOF:
            self._auth_proof(conn, message[1])
        elif code == Code.SUMMARY:
            self._send(conn, [Code.SUCCESS, self.summary()])
        elif code == Code.PING:
            self._send(conn, Code.SUCCESS)
        elif code == Code.GET_PENDING_MATCHKEYS:
            self._send(conn, sorted(conn.matchkeys))
        elif code == Code.STOP:
            if self.stop_key is not None and len(message) > 1 and message[1] == self.stop_key:
                self._send(conn, Code.SUCCESS)
                self._running = False
            else:
                self._send(conn, Code.FAIL)

    def _update_info(self, conn: _Conn, info: Any) -> bool:
        """Apply an UPDATE_INFO; False if it was refused (a server's, without the registration token)."""
        if not isinstance(info, dict):
            raise ProtocolError(f"UPDATE_INFO takes a JSON object, not {_show(info)}")
        if not _depth(info, MAX_INFO_DEPTH):
            raise ProtocolError(f"UPDATE_INFO nests deeper than {MAX_INFO_DEPTH} levels")
        if "key" in info:
            _name(info["key"], "UPDATE_INFO's key")
        if self.auth_token and not conn.authed and str(info.get("key", conn.info.get("key", ""))).startswith("server"):
            self._refuse_registration(conn, "UPDATE_INFO")
            return False
        addr = info.get("addr")
        if isinstance(addr, list) and addr and addr[0] is None:
            addr[0] = conn.host
        merged = dict(conn.info, **info)
        size = len(json.dumps(merged, separators=(",", ":")))
        if size > MAX_INFO:
            raise ProtocolError(f"UPDATE_INFO of {size} bytes is over the {MAX_INFO}-byte limit")
        conn.info = merged
        conn.announced = True
        before = conn.serves
        self._serve_keys(conn, _served_keys(merged.get("key")))
        for key in before:
            self._forget_if_empty(key)
        return True

    # -- registration tokens ----------------------------------------------------------------
    def _refuse_registration(self, conn: _Conn, what: str) -> None:
        if not conn.refused:
            conn.refused = True
            log.warning("refused %s from %s: it did not prove the tracker's registration token (a TVM rpc_server "
                        "cannot: start the tracker without --auth-token to take TVM servers)", what, conn.host)
        self._send(conn, [Code.FAIL, NO_TOKEN_TEXT])

    def _auth_nonce(self, conn: _Conn) -> None:
        """``[100]``: a fresh nonce for one registration proof (``{"auth": false}`` from a tracker without a token)."""
        if not self.auth_token:
            self._send(conn, [Code.SUCCESS, {"auth": False}])
            return
        conn.nonce = os.urandom(NONCE_BYTES)
        self._send(conn, [Code.SUCCESS, {"auth": True, "nonce": conn.nonce.hex()}])

    def _auth_proof(self, conn: _Conn, proof: Any) -> None:
        """``[101, hex]``: check a proof over the connection's nonce (used up either way); slow down guessing."""
        if not isinstance(proof, str) or len(proof) > 4 * NONCE_BYTES:
            raise ProtocolError(f"AUTH_PROOF takes the proof as {2 * NONCE_BYTES} hex digits, not {_show(proof)}")
        nonce, conn.nonce = conn.nonce, None
        if not self.auth_token:
            self._send(conn, [Code.FAIL, "this tracker takes no registration token: register without a proof"])
            return
        if nonce is None:
            self._send(conn, [Code.FAIL, f"ask for a nonce first ([{AUTH_NONCE}]); each nonce is good for one proof"])
            return
        now = time.monotonic()
        turn = self.throttle.wait_until(conn.host, now)
        if turn > now:
            self._send(conn, [Code.FAIL, (
                f"{self.throttle.failures(conn.host, now)} wrong registration proofs came from {conn.host}: its next "
                f"proof is checked in {turn - now:.2f} s at the earliest; try again then")])
            return
        self.throttle.attempt(conn.host, now)
        expected = registration_proof(self.auth_token, nonce, "tracker").hex()
        if hmac.compare_digest(proof.lower().encode(), expected.encode()):
            self.throttle.succeeded(conn.host)
            conn.authed = True
            log.info("%s proved the registration token", conn.host)
            self._send(conn, Code.SUCCESS)
            return
        delay = self.throttle.failed(conn.host, now)
        log.warning("wrong registration proof from %s", conn.host)
        self._send(conn, [Code.FAIL, refusal_text(AuthenticationError(WRONG_TOKEN_TEXT),
                                                  self.throttle.failures(conn.host, now), delay)])

    def _queue(self, key: str) -> _Queue:
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = _Queue()
        return queue

    def _put(self, conn: _Conn, key: str, port: int, matchkey: str, custom_addr: str | None) -> None:
        if matchkey in conn.matchkeys:
            return  # already on offer (a PUT sent twice)
        if len(conn.values) >= MAX_SLOTS_PER_CONN:
            raise ProtocolError(f"one connection may offer at most {MAX_SLOTS_PER_CONN} free slots")
        queue = self._queue(key)
        value = _Value(conn, key, custom_addr or conn.host, port, matchkey)
        conn.values.append(value)
        conn.matchkeys.add(matchkey)
        queue.free.append(value)
        self._schedule(key, queue)

    def _request(self, conn: _Conn, key: str, user: str, priority: int | float) -> None:
        if len(conn.requests) >= MAX_REQUESTS_PER_CONN:
            raise ProtocolError(f"one connection may have at most {MAX_REQUESTS_PER_CONN} requests waiting")
        queue = self._queue(key)
        request = _Request(conn, key, user, priority)
        heapq.heappush(queue.waiting, (-priority, next(self._arrival), request))
        queue.pending += 1
        conn.requests.append(request)
        self._schedule(key, queue)

    def _schedule(self, key: str, queue: _Queue) -> None:
        """Hand free servers to waiting requests: oldest server first, best request first."""
        while queue.free and queue.pending:
            request = queue.next_request()
            if request is None:
                break
            value = queue.free[0]
            if peer_closed(request.conn.sock):  # gone, and its close not read yet: never grant to it
                self._close(request.conn)
                continue
            if not self._send(request.conn, [Code.SUCCESS, [value.host, value.port, value.matchkey]]):
                continue  # the requester was gone: closing it cancelled its requests; the server stays free
            queue.free.popleft()
            queue.pending -= 1
            request.conn.requests.remove(request)
            value.conn.values.remove(value)
            value.conn.matchkeys.discard(value.matchkey)
        self._forget_if_empty(key)

    def summary(self) -> dict[str, Any]:
        """TVM's SUMMARY, plus ``waiting``: each queue's requests (user, priority) in the order they will be served.

        ``waiting`` is ours (a TVM tracker has none); it is there only while requests wait, for their keys only,
        and lists the first 1000 of each key.
        """
        summary = {
            "queue_info": {k: {"free": len(q.free), "pending": q.pending} for k, q in self.queues.items()},
            "server_info": [c.info for c in self.conns.values() if str(c.info.get("key", "")).startswith("server")],
        }
        waiting = {k: q.waiting_list() for k, q in self.queues.items() if q.pending}
        if waiting:
            summary["waiting"] = waiting
        return summary


def serve_tracker(config: dict[str, Any], ready: Callable[[int], None] | None = None, owner_fd: int | None = None) -> None:
    """Run a tracker in this process until SIGTERM/SIGINT (or the owner's pipe closes)."""
    setup_logging(config.get("silent", False))
    timeouts = {name: check_timeout(name, config.get(name, default)) for name, default in (
        ("handshake_timeout", HANDSHAKE_TIMEOUT_S), ("idle_timeout", IDLE_TIMEOUT_S), ("write_timeout", WRITE_TIMEOUT_S))}
    token = check_token("auth_token", config.get("auth_token"))
    listener = bind_port(config.get("host", "127.0.0.1"), int(config.get("port", 9190)), int(config.get("port_end", 9199)))
    listener.setblocking(False)
    stop_on_signals()
    port = listener.getsockname()[1]
    log.info("RPCTracker: bind to %s:%d%s", config.get("host", "127.0.0.1"), port,
             " (servers register with the registration token only)" if token else "")
    if ready:
        ready(port)
    TrackerLoop(listener, owner_fd, config.get("stop_key"), auth_token=token, **timeouts).run()


if __name__ == "__main__":
    service_main(serve_tracker)
