"""``rpc.Proxy``: reach servers that clients cannot reach directly.

Servers started with ``is_proxy=True`` (``--through-proxy``) connect out to
the proxy and wait there; a client connects to the proxy as if it were a
server, names its key, and is paired with a waiting server of that key; from
then on the proxy relays bytes both ways (the handshake, authentication
included, is end to end). With ``tracker_addr`` the proxy offers its waiting
servers to the tracker, so ``request(key)`` works through it.

    >>> proxy = rpc.Proxy(port=0)                                                   # doctest: +SKIP
    >>> rpc.Server(host="127.0.0.1", port=proxy.port, is_proxy=True, key="phone")   # doctest: +SKIP
    >>> rpc.connect("127.0.0.1", proxy.port, key="phone")                          # doctest: +SKIP
"""
from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections import Counter, deque
from typing import Any, Callable

from ..errors import ErrorCode
from .protocol import FLAG_SERVER, HEADER, MAGIC, MAX_CTRL, PREAMBLE, VERSION, Kind, pack, unpack
from .registration import TrackerRegistration
from .relay import Relay
from .service import ServiceHandle, ServiceLoop, bind_port, service_main, setup_logging, stop_on_signals

log = logging.getLogger("workbench.rpc.proxy")
HANDSHAKE_TIMEOUT_S = 10.0


class Proxy(ServiceHandle):
    """An RPC proxy in a separate process (``port`` reports where it listens)."""

    what = "RPC proxy"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9090,
        port_end: int = 9199,
        tracker_addr: tuple[str, int] | None = None,
        custom_addr: str | None = None,
        silent: bool = False,
    ):
        self.host = host
        self._start("workbench.rpc.proxy", {
            "host": host, "port": port, "port_end": port_end, "silent": silent, "custom_addr": custom_addr,
            "tracker_addr": list(tracker_addr) if tracker_addr else None,
        })


# -- the proxy process ------------------------------------------------------------------
class _Incoming:
    """A connection whose opening (preamble and first frame) has not fully arrived."""

    __slots__ = ("sock", "buf", "preamble", "is_server", "deadline")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.preamble: bytes | None = None
        self.is_server = False
        self.deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S


class _Waiting:
    """A registered server waiting to be paired."""

    __slots__ = ("sock", "key", "info")

    def __init__(self, sock: socket.socket, key: str, info: dict):
        self.sock, self.key, self.info = sock, key, info


class ProxyLoop(ServiceLoop):
    def __init__(self, listener: socket.socket, owner_fd: int | None = None,
                 tracker_addr: tuple[str, int] | None = None, custom_addr: str | None = None):
        super().__init__(listener, owner_fd)
        self.incoming: dict[int, _Incoming] = {}
        self.waiting: dict[str, deque[_Waiting]] = {}
        self.relays: set[Relay] = set()
        self.paired: Counter[str] = Counter()  # servers in a session, by key (guarded by _relays_lock)
        self._relays_lock = threading.Lock()
        self._published: str | None = None
        self.registration = None
        if tracker_addr:
            self.registration = TrackerRegistration(
                tracker_addr, listener.getsockname()[1], custom_addr, {"key": "server:proxy[]"}
            )

    def _event(self, key: selectors.SelectorKey, events: int) -> None:
        if isinstance(key.data, _Incoming):
            self._read_incoming(key.data)
        else:
            self._drop_waiting(key.data, "it closed the connection")

    def _tick(self) -> None:
        self._expire_incoming()

    def _timeout(self) -> float | None:
        timeout = 1.0 if self.incoming else None
        if self.registration is not None:
            self._publish_keys()  # sessions end in relay threads: catch up here
            due = self.registration.poll(time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        return timeout

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Incoming(sock)
        self.incoming[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)

    def _expire_incoming(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.incoming.values() if c.deadline < now]:
            self._close_incoming(conn)

    def _close_incoming(self, conn: _Incoming, error: tuple[ErrorCode, str] | None = None) -> None:
        self.incoming.pop(conn.sock.fileno(), None)
        self._sel.unregister(conn.sock)
        if error is not None:
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(1.0)
                if conn.preamble is None:
                    conn.sock.sendall(PREAMBLE.pack(MAGIC, VERSION, 0))
                body = pack([int(error[0]), error[1]])
                conn.sock.sendall(HEADER.pack(len(body), Kind.ERROR, 0, 0) + body)
            except OSError:
                pass
        conn.sock.close()

    def _read_incoming(self, conn: _Incoming) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_incoming(conn)
            return
        conn.buf += data
        if conn.preamble is None:
            if len(conn.buf) < PREAMBLE.size:
                return
            magic, version, flags = PREAMBLE.unpack_from(conn.buf)
            if magic != MAGIC:
                self._close_incoming(conn, (ErrorCode.PROTOCOL, f"bad magic {magic!r}: this is an rpc-workbench proxy"))
                return
            conn.preamble = bytes(conn.buf[: PREAMBLE.size])
            del conn.buf[: PREAMBLE.size]
            conn.is_server = bool(flags & FLAG_SERVER)
            if not conn.is_server:  # a client: tell it it reached a proxy, and ask for its key
                conn.sock.sendall(PREAMBLE.pack(MAGIC, VERSION, 0) + _frame(
                    Kind.HELLO, {"version": VERSION, "proxy": True, "nonce": b"", "auth": False}))
        if len(conn.buf) < HEADER.size:
            return
        ctrl_len, kind, _, bulk_len = HEADER.unpack_from(conn.buf)
        if ctrl_len > MAX_CTRL or bulk_len:
            self._close_incoming(conn, (ErrorCode.PROTOCOL, "unexpected frame for a proxy"))
            return
        if len(conn.buf) < HEADER.size + ctrl_len:
            return
        try:
            ctrl = unpack(bytes(conn.buf[HEADER.size : HEADER.size + ctrl_len]))
        except Exception as exc:
            self._close_incoming(conn, (ErrorCode.PROTOCOL, str(exc)))
            return
        expected = Kind.REGISTER if conn.is_server else Kind.PROXY_CONNECT
        key = ctrl.get("key") if isinstance(ctrl, dict) else None
        if kind == Kind.PROXY_CONNECT and key == "":
            self._close_incoming(conn, (ErrorCode.KEY_MISMATCH, (
                "this is an RPC proxy: connect with the key of a server waiting here, "
                f"rpc.connect(host, port, key=...) (keys waiting: {self._keys_waiting()})")))
            return
        if kind != expected or not isinstance(key, str) or not key:
            self._close_incoming(conn, (ErrorCode.PROTOCOL, f"the proxy expected {expected.name} {{key: ...}}"))
            return
        del conn.buf[: HEADER.size + ctrl_len]  # what may follow belongs to the session
        if conn.is_server:
            self._register(conn, key, ctrl.get("info") or {})
        else:
            self._pair(conn, key)

    def _register(self, conn: _Incoming, key: str, info: dict) -> None:
        self.incoming.pop(conn.sock.fileno())
        waiting = _Waiting(conn.sock, key, info)
        self._sel.modify(conn.sock, selectors.EVENT_READ, waiting)  # readable now only means it left
        conn.sock.sendall(_frame(Kind.OK, None))
        self.waiting.setdefault(key, deque()).append(waiting)
        log.info("server of key %r is waiting (%d for that key)", key, len(self.waiting[key]))
        if self.registration is not None:
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
        self._sel.unregister(waiting.sock)
        waiting.sock.close()
        log.info("server of key %r left: %s", waiting.key, why)
        if self.registration is not None:
            self.registration.withdraw(id(waiting), still_on_offer=True)
            self._publish_keys()

    def _pair(self, conn: _Incoming, key: str) -> None:
        server = None
        if self.registration is not None:
            slot = self.registration.find(key)
            server = next((w for q in self.waiting.values() for w in q if id(w) == slot), None)
        matched = server is not None
        queue = self.waiting.get(key.partition(":")[0])
        if server is None and queue:
            server = queue[0]
        if server is None:
            self._close_incoming(conn, (ErrorCode.NO_DEVICE, (
                f"no server of key {key.partition(':')[0]!r} is waiting at this proxy "
                f"(keys waiting: {self._keys_waiting()})")))
            return
        self.waiting[server.key].remove(server)
        self._sel.unregister(server.sock)
        self.incoming.pop(conn.sock.fileno())
        self._sel.unregister(conn.sock)
        if self.registration is not None:
            self.registration.withdraw(id(server), still_on_offer=not matched)
        with self._relays_lock:
            self.paired[server.key] += 1
        log.info("pairing a client with a server of key %r", server.key)
        threading.Thread(target=self._start_relay, args=(conn, server), daemon=True).start()

    def _start_relay(self, client: _Incoming, server: _Waiting) -> None:
        """Replay the client's preamble to the server, drop the server's, then relay."""
        for sock in (client.sock, server.sock):
            sock.setblocking(True)
        try:
            server.sock.settimeout(HANDSHAKE_TIMEOUT_S)
            server.sock.sendall(client.preamble)
            preamble = b""
            while len(preamble) < PREAMBLE.size:
                chunk = server.sock.recv(PREAMBLE.size - len(preamble))
                if not chunk:
                    raise ConnectionError("the server closed the connection when paired")
                preamble += chunk
            server.sock.settimeout(None)
            if client.buf:
                server.sock.sendall(client.buf)
        except OSError as exc:
            log.warning("pairing failed: %s", exc)
            for sock in (client.sock, server.sock):
                sock.close()
            with self._relays_lock:
                self.paired[server.key] -= 1
            return
        relay = Relay(client.sock, server.sock, on_done=lambda r: self._relay_done(r, server.key))
        with self._relays_lock:
            self.relays.add(relay)
        relay.start()

    def _relay_done(self, relay: Relay, key: str) -> None:
        with self._relays_lock:
            self.relays.discard(relay)
            self.paired[key] -= 1

    def stop(self) -> None:
        with self._relays_lock:
            relays = list(self.relays)
        for relay in relays:
            relay.stop()
        for relay in relays:
            relay.join(5)
        for conn in list(self.incoming.values()):
            self._close_incoming(conn)
        for queue in self.waiting.values():
            for waiting in queue:
                waiting.sock.close()
        self.waiting.clear()
        self._sel.close()
        self.listener.close()
        if self.registration is not None:
            self.registration.close()


def _frame(kind: int, ctrl: Any) -> bytes:
    body = pack(ctrl)
    return HEADER.pack(len(body), kind, 0, 0) + body


def serve_proxy(config: dict[str, Any], ready: Callable[[int], None] | None = None, owner_fd: int | None = None) -> None:
    setup_logging(config.get("silent", False))
    listener = bind_port(config.get("host", "127.0.0.1"), int(config.get("port", 9090)), int(config.get("port_end", 9199)))
    listener.setblocking(False)
    stop_on_signals()
    port = listener.getsockname()[1]
    tracker = config.get("tracker_addr")
    log.info("RPCProxy: bind to %s:%d", config.get("host", "127.0.0.1"), port)
    loop = ProxyLoop(listener, owner_fd, tuple(tracker) if tracker else None, config.get("custom_addr"))
    if ready:
        ready(port)
    loop.run()


if __name__ == "__main__":
    service_main(serve_proxy)
