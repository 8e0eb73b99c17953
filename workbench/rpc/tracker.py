"""``rpc.Tracker``: one queue of devices per key, shared by many users.

It speaks TVM's tracker protocol (workbench.rpc.tracker_wire), so TVM servers
can register with it and TVM's ``query_rpc_tracker`` can read it. Free servers
are handed out first in, first out; waiting requests by priority (higher
first), then arrival. Unlike TVM's, a request whose client has gone leaves its
queue at once, and a server whose connection closes leaves the free list.

    >>> from workbench import rpc
    >>> tracker = rpc.Tracker(port=0)
    >>> rpc.Server(port=0, tracker_addr=("127.0.0.1", tracker.port), key="rasp")  # doctest: +SKIP
    >>> rpc.connect_tracker("127.0.0.1", tracker.port).request("rasp")             # doctest: +SKIP
"""
from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
from collections import deque
from typing import Any, Callable

from ..errors import ProtocolError
from .service import ServiceHandle, ServiceLoop, bind_port, service_main, setup_logging, stop_on_signals
from .tracker_wire import GREETING, MAGIC_BYTES, Code, MessageReader, encode, quick_ack

log = logging.getLogger("workbench.rpc.tracker")


class Tracker(ServiceHandle):
    """An RPC tracker in a separate process (``port`` reports where it listens).

    Ends with ``terminate()``, when collected, or when this process exits.
    """

    what = "RPC tracker"

    def __init__(self, host: str = "127.0.0.1", port: int = 9190, port_end: int = 9199, silent: bool = False):
        self.host = host
        self._start("workbench.rpc.tracker", {"host": host, "port": port, "port_end": port_end, "silent": silent})


# -- the tracker process ------------------------------------------------------------
class _Value:
    """A free server slot of ``key``: where to connect and the match key to present."""

    __slots__ = ("conn", "key", "host", "port", "matchkey")

    def __init__(self, conn: "_Conn", key: str, host: str, port: int, matchkey: str):
        self.conn, self.key, self.host, self.port, self.matchkey = conn, key, host, port, matchkey


class _Request:
    __slots__ = ("conn", "key", "user", "priority", "cancelled")

    def __init__(self, conn: "_Conn", key: str, user: str, priority: int):
        self.conn, self.key, self.user, self.priority, self.cancelled = conn, key, user, priority, False


class _Queue:
    def __init__(self) -> None:
        self.free: deque[_Value] = deque()
        self.waiting: list[tuple[int, int, _Request]] = []  # heap of (-priority, arrival, request)
        self.pending = 0

    def waiting_list(self) -> list[dict[str, Any]]:
        if not self.pending:
            return []
        return [{"user": r.user, "priority": r.priority} for _, _, r in sorted(self.waiting) if not r.cancelled]

    def next_request(self) -> _Request | None:
        while self.waiting:
            request = heapq.heappop(self.waiting)[2]
            if not request.cancelled:
                return request
        return None


class _Conn:
    __slots__ = ("sock", "host", "reader", "out", "info", "values", "requests", "matchkeys")

    def __init__(self, sock: socket.socket, host: str):
        self.sock = sock
        self.host = host
        self.reader = MessageReader(expect_magic=True)
        self.out = bytearray()
        self.info: dict[str, Any] = {"addr": [host, 0]}
        self.values: list[_Value] = []
        self.requests: list[_Request] = []
        self.matchkeys: set[str] = set()


class TrackerLoop(ServiceLoop):
    def __init__(self, listener: socket.socket, owner_fd: int | None = None, stop_key: str | None = None):
        super().__init__(listener, owner_fd)
        self.stop_key = stop_key
        self.queues: dict[str, _Queue] = {}
        self.conns: dict[int, _Conn] = {}
        self._arrival = itertools.count()

    # -- event loop -----------------------------------------------------------------
    def _event(self, key: selectors.SelectorKey, events: int) -> None:
        conn = key.data
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
        if events & selectors.EVENT_READ and conn.sock.fileno() >= 0:
            self._read(conn)

    def stop(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        self._sel.close()
        self.listener.close()

    def _accept(self) -> None:
        try:
            sock, addr = self.listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, addr[0])
        self.conns[sock.fileno()] = conn
        self._sel.register(sock, selectors.EVENT_READ, conn)

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
        try:
            messages = conn.reader.feed(data)
        except ProtocolError as exc:
            log.warning("closing connection from %s: %s", conn.host, exc)
            self._close(conn)
            return
        for message in messages:
            if conn.sock.fileno() < 0:
                return
            if message is GREETING:
                self._send_raw(conn, MAGIC_BYTES)
                continue
            try:
                self._handle(conn, message)
            except (ProtocolError, TypeError, ValueError, KeyError, IndexError) as exc:
                log.warning("closing connection from %s: bad message %.200r (%s)", conn.host, message, exc)
                self._close(conn)
                return

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
            self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
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
        if not conn.out:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _close(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        for value in conn.values:  # its servers are no longer free
            self.queues[value.key].free.remove(value)
        conn.values.clear()
        for request in conn.requests:  # its requests leave their queues now
            request.cancelled = True
            queue = self.queues[request.key]
            queue.pending -= 1
            if len(queue.waiting) > 2 * queue.pending + 64:  # drop cancelled entries: the heap stays bounded
                queue.waiting = [entry for entry in queue.waiting if not entry[2].cancelled]
                heapq.heapify(queue.waiting)
        conn.requests.clear()

    # -- the protocol -----------------------------------------------------------------
    def _handle(self, conn: _Conn, message: Any) -> None:
        if not isinstance(message, list) or not message or not isinstance(message[0], int):
            raise ProtocolError("a tracker request is a JSON array starting with a code")
        code = message[0]
        if code == Code.PUT:
            self._put(conn, str(message[1]), message[2], message[3] if len(message) > 3 else None)
            self._send(conn, Code.SUCCESS)
        elif code == Code.REQUEST:
            self._request(conn, str(message[1]), str(message[2]) if len(message) > 2 else "",
                          int(message[3]) if len(message) > 3 else 1)
        elif code == Code.UPDATE_INFO:
            info = message[1]
            if not isinstance(info, dict):
                raise ProtocolError("UPDATE_INFO takes a JSON object")
            addr = info.get("addr")
            if isinstance(addr, list) and addr and addr[0] is None:
                addr[0] = conn.host
            conn.info.update(info)
            self._send(conn, Code.SUCCESS)
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
        else:
            raise ProtocolError(f"unknown tracker code {code}")

    def _queue(self, key: str) -> _Queue:
        queue = self.queues.get(key)
        if queue is None:
            queue = self.queues[key] = _Queue()
        return queue

    def _put(self, conn: _Conn, key: str, where: list, custom_addr: str | None) -> None:
        port, matchkey = int(where[0]), str(where[1])
        queue = self._queue(key)
        if matchkey in conn.matchkeys:
            return  # already on offer (a PUT sent twice)
        value = _Value(conn, key, custom_addr or conn.host, port, matchkey)
        conn.values.append(value)
        conn.matchkeys.add(matchkey)
        queue.free.append(value)
        self._schedule(key, queue)

    def _request(self, conn: _Conn, key: str, user: str, priority: int) -> None:
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
            if _peer_closed(request.conn.sock):  # gone, and its close not read yet: never grant to it
                self._close(request.conn)
                continue
            if not self._send(request.conn, [Code.SUCCESS, [value.host, value.port, value.matchkey]]):
                continue  # the requester was gone: closing it cancelled its requests; the server stays free
            queue.free.popleft()
            queue.pending -= 1
            request.conn.requests.remove(request)
            value.conn.values.remove(value)
            value.conn.matchkeys.discard(value.matchkey)

    def summary(self) -> dict[str, Any]:
        """TVM's SUMMARY, plus ``waiting``: each queue's requests (user, priority) in the order they will be served.

        ``waiting`` is ours (a TVM tracker has none); it is there only while requests wait, for their keys only.
        """
        summary = {
            "queue_info": {k: {"free": len(q.free), "pending": q.pending} for k, q in self.queues.items()},
            "server_info": [c.info for c in self.conns.values() if str(c.info.get("key", "")).startswith("server")],
        }
        waiting = {k: q.waiting_list() for k, q in self.queues.items() if q.pending}
        if waiting:
            summary["waiting"] = waiting
        return summary


def _peer_closed(sock: socket.socket) -> bool:
    """True if the peer has closed the connection (a request's client only ever waits: it sends nothing)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def serve_tracker(config: dict[str, Any], ready: Callable[[int], None] | None = None, owner_fd: int | None = None) -> None:
    setup_logging(config.get("silent", False))
    listener = bind_port(config.get("host", "127.0.0.1"), int(config.get("port", 9190)), int(config.get("port_end", 9199)))
    listener.setblocking(False)
    stop_on_signals()
    port = listener.getsockname()[1]
    log.info("RPCTracker: bind to %s:%d", config.get("host", "127.0.0.1"), port)
    if ready:
        ready(port)
    TrackerLoop(listener, owner_fd, config.get("stop_key")).run()


if __name__ == "__main__":
    service_main(serve_tracker)
