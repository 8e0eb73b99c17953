"""The server process: handshakes in one event loop, each session in its own worker process.

The loop is single-threaded (a selector over the listening socket, the
connections still in their handshake, one pidfd per worker, the owner's
pipe), so forking a worker per session is safe. A connection costs a process
only once its CONNECT is accepted: until then it is a few bytes of state read
without blocking, with one deadline for the whole handshake
(``handshake_timeout``), and the oldest such connection makes room when there
are too many (the oldest of the client's address, when that address holds all
but a quarter of them). At most ``max_sessions`` workers run; more clients are told
"server busy". Every resource failure (file descriptors, processes, disk)
refuses that one connection and the server goes on.

When a worker dies of a signal or an unexpected exit, the server still holds
the connection and tells the client what happened, without ever waiting on a
client that does not read. When a client hangs up while its worker is busy
(a kernel that spins), the server sees the hang-up and kills the worker, so
the device is offered again. Workspaces of all sessions are removed when they
end and when the server stops.
"""
from __future__ import annotations

import collections
import heapq
import importlib
import itertools
import json
import logging
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from ...errors import (
    AuthenticationError,
    ConnectionClosedError,
    ErrorCode,
    ProtocolError,
    RPCError,
    UnsupportedError,
    error_from_code,
)
from ...runtime.workspace import Workspace
from ...cc.compiler import target_triple
from ...runtime import opencl_probe
from .handler import device_info
from ..wire.handshake import (
    ERROR_BUSY,
    MAX_CONNECT_CTRL,
    MAX_PROGRAM_BYTES,
    TOKEN_ENV,
    TVM_PROTOCOL,
    AuthThrottle,
    check_connect,
    check_key,
    check_session_timeout,
    hello,
    refusal_text,
)
from ..wire import tvm
from ..wire.protocol import (
    FLAG_SERVER,
    HEADER,
    MAGIC,
    MAX_BULK,
    MAX_CTRL,
    NONCE_BYTES,
    PREAMBLE,
    VERSION,
    Kind,
    SocketChannel,
    _too_large,
    pack,
    unpack,
)
from ..tracker.registration import REGISTRATION_TOKEN_ENV, RefusalLog, TrackerRegistration, registration_proof
from .secrets import hide_from_kernels
from ...runtime.quota import Quotas
from .server import ServerConfig, address_share, default_max_sessions, resolve_callable
from ..service.loop import ServiceLoop, bind_port, refuse
from ..service.process import service_main, setup_logging, stop_on_signals
from ..wire.exits import ENDED_ON_PURPOSE, EXIT_REFUSED, death_notice
from .worker import EndReport, load_libraries, serve_accepted, shutdown, worker_signals

log = logging.getLogger("workbench.rpc.server")
SELF = "self"  # the one tracker slot of a server
_HANGUP = object()  # selector data of the epoll that watches session connections for hang-ups
_PROBE = object()  # selector data of the OpenCL probe's pipe (opencl_probe): collected once readable
_PREAMBLE, _HEADER, _CTRL, _BULK, _WAIT = range(5)  # handshake stages
_TVM_KEY, _TVM_LENGTH, _TVM_INIT = range(5, 8)  # TVM's handshake: its key, then its INIT_SERVER packet
TCP_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6))  # a vanished peer: ~2 min


def error_frame(code: int, message: str) -> bytes:
    body = pack([int(code), message])
    return HEADER.pack(len(body), Kind.ERROR, 0, 0) + body


class _Worker:
    __slots__ = ("pid", "pidfd", "conn", "workspace", "wait", "matchkey", "report", "hung_up", "addr", "preempted",
                 "tvm")

    def __init__(self, pid: int, pidfd: int, conn: socket.socket, workspace: str, wait: Callable[[], int],
                 matchkey: str | None, report: EndReport | None):
        self.pid = pid
        self.pidfd = pidfd
        self.conn = conn
        self.workspace = workspace
        self.wait = wait
        self.matchkey = matchkey
        self.report = report
        self.hung_up = False
        self.addr: str | None = None  # the client's address (None: through a proxy)
        self.preempted: str | None = None  # why the server ended it to free its slot
        self.tvm = False  # a TVM client's session: notices go out as TVM's exception packets


_TCP_INFO_LAST = struct.Struct("=III")  # tcp_info's last_data_sent, last_ack_sent, last_data_recv (ms ago), at 44


def idle_seconds(worker: _Worker) -> float:
    """How long a session has been idle: 0 while its worker serves a request, else how long its connection has
    carried nothing (TCP_INFO). A worker that cannot tell (spawned, no_fork) is never idle."""
    if worker.report is None or worker.report.busy():
        return 0.0
    try:
        info = worker.conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        sent, _, received = _TCP_INFO_LAST.unpack_from(info, 44)
    except (OSError, struct.error):
        return 0.0
    return min(sent, received) / 1000


def _carries_program(ctrl: Any) -> bool:
    """A CONNECT for ``["rpc.PopenSession"]``: its bulk part is the program to run (read by the worker)."""
    ctor = ctrl.get("ctor") if isinstance(ctrl, dict) else None
    return isinstance(ctor, list) and len(ctor) == 1 and ctor[0] == "rpc.PopenSession"


class Handshake:
    """A connection in its handshake, read without blocking: the preamble, then one CONNECT frame
    (a TVM client: its key, then its INIT_SERVER packet)."""

    __slots__ = ("sock", "peer", "addr", "deadline", "buf", "stage", "nonce", "kind", "ctrl_len", "bulk_left",
                 "ctrl", "registered", "tvm")

    def __init__(self, sock: socket.socket, peer: str, addr: str | None, deadline: float):
        self.sock = sock
        self.peer = peer  # for messages: "host:port" or "the proxy"
        self.addr = addr  # for the auth throttle: the client's IP address (None through a proxy)
        self.deadline = deadline
        self.buf = b""
        self.stage = _PREAMBLE
        self.nonce = b""
        self.kind = self.ctrl_len = self.bulk_left = 0
        self.ctrl: Any = None
        self.registered = True
        self.tvm = False

    def need(self) -> int:
        """Bytes still to read for the current stage (exact: nothing after the CONNECT is read here)."""
        if self.stage == _PREAMBLE:
            return PREAMBLE.size - len(self.buf)
        if self.stage == _HEADER:
            return HEADER.size - len(self.buf)
        return self.ctrl_len - len(self.buf)


class ProxyLink:
    """A server's connection waiting at a proxy (``is_proxy=True``): one session at a time.

    ``token`` is the proxy's registration token: a proxy started with an auth
    token answers REGISTER with a HELLO carrying a nonce, and takes the server
    once its second REGISTER carries ``registration_proof(token, nonce, "proxy")``.
    """

    def __init__(self, addr: tuple[str, int], key: str, info: dict, token: str | None = None):
        self.addr = addr
        self.key = key
        self.info = info
        self.token = token
        self.sock: socket.socket | None = None
        self._retry_at = 0.0
        self._backoff = 0.1
        self._refusals = RefusalLog()  # a wrong token is logged at WARNING once, not at every retry

    def poll(self, now: float) -> float:
        """Connect and register if due; return the seconds until the next attempt."""
        if self.sock is not None:
            return 3600.0
        if now >= self._retry_at:
            try:
                self.sock = self._register()
                self._backoff = 0.1
                self._refusals.reset()
                log.info("waiting at the proxy %s:%d as key %r", *self.addr, self.key)
                return 3600.0
            except AuthenticationError as exc:
                text = str(exc)
                log.log(self._refusals.level(text), "the proxy %s:%d refused this server: %s; retrying in %.1f s",
                        *self.addr, text, self._backoff)
                self._retry_at = now + self._backoff
                self._backoff = min(self._backoff * 2, 5.0)
            except (OSError, RPCError) as exc:
                level = logging.WARNING if isinstance(exc, ProtocolError) else logging.INFO
                log.log(level, "proxy %s:%d unreachable (%s); retrying in %.1f s", *self.addr, exc, self._backoff)
                self._retry_at = now + self._backoff
                self._backoff = min(self._backoff * 2, 5.0)
        return max(0.01, self._retry_at - now)

    def _register(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=5.0)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            body = pack({"key": self.key, "info": self.info})
            sock.sendall(PREAMBLE.pack(MAGIC, VERSION, FLAG_SERVER) + HEADER.pack(len(body), Kind.REGISTER, 0, 0) + body)
            kind, ctrl = self._reply(sock, first=True)
            if kind == Kind.HELLO:  # a proxy with an auth token: prove the registration token over its nonce
                nonce = ctrl.get("nonce") if isinstance(ctrl, dict) and ctrl.get("auth") else None
                if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
                    raise ProtocolError(f"the proxy at {self.addr[0]}:{self.addr[1]} answered REGISTER with a HELLO "
                                        f"that carries no {NONCE_BYTES}-byte nonce")
                if not self.token:
                    raise AuthenticationError(
                        f"the proxy at {self.addr[0]}:{self.addr[1]} takes only servers that prove its registration "
                        f"token: start this server with registration_token=... (rpc_server --registration-token, or "
                        f"${REGISTRATION_TOKEN_ENV}) holding the proxy's --auth-token"
                    )
                body = pack({"proof": registration_proof(self.token, nonce, "proxy")})
                sock.sendall(HEADER.pack(len(body), Kind.REGISTER, 0, 0) + body)
                kind, ctrl = self._reply(sock, first=False)
            if kind == Kind.ERROR:
                raise error_from_code(*ctrl[:2])
            if kind != Kind.OK:
                raise ProtocolError(f"the proxy answered REGISTER with kind {kind}")
            sock.settimeout(None)
            return sock
        except BaseException:
            sock.close()
            raise

    def _reply(self, sock: socket.socket, first: bool) -> tuple[int, Any]:
        """One frame from the proxy, read exactly: what follows an OK is a client's."""
        head = _recv_exact(sock, HEADER.size)
        if first and head[:4] == MAGIC:  # a preamble: a server answered, not a proxy
            raise ProtocolError(
                f"{self.addr[0]}:{self.addr[1]} is an RPC server, not a proxy: a server started with "
                "is_proxy=True (--through-proxy) needs the address of an RPC proxy "
                "(python -m workbench.exec.rpc_proxy; rpc_server and rpc_proxy both default to port 9090: "
                "give one of them another --port)"
            )
        ctrl_len, kind, _, _ = HEADER.unpack(head)
        if ctrl_len > MAX_CONNECT_CTRL:
            raise ProtocolError(f"{self.addr[0]}:{self.addr[1]} answered REGISTER with a {ctrl_len}-byte message: "
                                "is it an RPC proxy?")
        return kind, unpack(_recv_exact(sock, ctrl_len))

    def take(self) -> socket.socket | None:
        """The waiting connection became readable: a paired client (returned), or the proxy left."""
        sock, self.sock = self.sock, None
        try:
            if sock.recv(1, socket.MSG_PEEK):
                return sock
        except OSError:
            pass
        sock.close()
        log.warning("the proxy %s:%d closed the connection; registering again", *self.addr)
        return None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionClosedError("the proxy closed the connection")
        data += chunk
    return data


def _keepalive(sock: socket.socket) -> None:
    """A client that vanishes without closing (power cut, network gone) shows as a hang-up after ~2 minutes."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in TCP_KEEPALIVE:
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError:
        pass


class ServeLoop(ServiceLoop):
    def __init__(self, config: ServerConfig, listener: socket.socket | None, owner_fd: int | None = None):
        super().__init__(listener, owner_fd)
        import resource

        self.config = config
        self.max_sessions = config.max_sessions or default_max_sessions()
        self.quotas = Quotas.resolve(config.max_workspace_bytes, config.max_workspace_files, config.max_tensor_bytes)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        room = 1 << 20 if soft == resource.RLIM_INFINITY else soft - 64 - 2 * self.max_sessions
        self.max_pending = max(16, min(room, 1024))  # connections in their handshake; the oldest makes room
        self.workers: dict[int, _Worker] = {}
        self.pending: dict[int, Handshake] = {}  # by fd, oldest first
        self._pending_from: collections.Counter[str | None] = collections.Counter()  # handshakes by client address
        self._postponed: list[tuple[float, int, Handshake]] = []  # CONNECTs waiting for the auth throttle
        self._seq = itertools.count()
        self._workspaces: set[str] = set()
        self._hup = select.epoll()
        self._sel.register(self._hup.fileno(), selectors.EVENT_READ, _HANGUP)
        self._by_conn: dict[int, _Worker] = {}
        self._scratch = bytearray(64 << 10)
        self.throttle = AuthThrottle()
        tempfile.gettempdir()  # found now, while files are to spare: at the fd limit the search itself fails
        # the first session's device list then needs no file either (the OpenCL probe's pipe is open already)
        importlib.import_module("workbench.runtime.opencl")
        target_triple()
        self.limit_refusal = PREAMBLE.pack(MAGIC, VERSION, 0) + error_frame(
            ERROR_BUSY, "server busy: it is out of file descriptors; try again later")
        self.system_libs = load_libraries(config.load_library)
        self.registration: TrackerRegistration | None = None
        self.proxy_link: ProxyLink | None = None
        os.environ.pop(REGISTRATION_TOKEN_ENV, None)  # in config: session workers need not inherit it
        if listener is None:  # is_proxy: wait at the proxy instead of listening
            info = dict(device_info(), labels=config.labels)
            self.proxy_link = ProxyLink((config.host, config.port), config.key, info, config.registration_token)
        elif config.tracker_addr:
            info = dict(device_info(), key=f"server:{config.key}", labels=config.labels)
            self.registration = TrackerRegistration(
                config.tracker_addr, listener.getsockname()[1], config.custom_addr, info, config.registration_token
            )
            self.registration.offer(SELF, config.key)
        self._probe_fd = opencl_probe.pending_fd()
        if self._probe_fd is not None:  # collected when done, even if no session ever comes
            self._sel.register(self._probe_fd, selectors.EVENT_READ, _PROBE)

    def _devices(self) -> None:
        """List the devices now, if not yet (the OpenCL probe's list collected: its pipe leaves the loop first)."""
        if self._probe_fd is not None:
            self._sel.unregister(self._probe_fd)
            self._probe_fd = None
        device_info()

    def _matchkey(self) -> str | None:
        return self.registration.slots[SELF].matchkey if self.registration else None

    # -- the loop's hooks ------------------------------------------------------------------
    def _timeout(self) -> float | None:
        now = time.monotonic()
        timeout = None
        if self.pending:
            timeout = max(0.0, next(iter(self.pending.values())).deadline - now)
        if self._postponed:
            due = max(0.0, self._postponed[0][0] - now)
            timeout = due if timeout is None else min(timeout, due)
        due = self._service_timeout(now)
        return due if timeout is None else timeout if due is None else min(timeout, due)

    def _service_timeout(self, now: float) -> float | None:
        link = self.proxy_link
        if link is not None:
            if link.sock is not None or self.workers or self.pending:
                return None
            timeout = link.poll(now)
            if link.sock is not None:
                self._sel.register(link.sock, selectors.EVENT_READ, "proxy")
            return timeout
        reg = self.registration
        if reg is None:
            return None
        matchkey = self._matchkey()
        reg.slots[SELF].busy = any(w.matchkey == matchkey for w in self.workers.values())
        return reg.poll(now)

    def _tick(self) -> None:
        now = time.monotonic()
        while self.pending:
            hs = next(iter(self.pending.values()))
            if hs.deadline > now:
                break
            self._expire(hs)
        while self._postponed and self._postponed[0][0] <= now:
            _, _, hs = heapq.heappop(self._postponed)
            if self.pending.get(hs.sock.fileno()) is hs:
                self._guarded(self._evaluate, hs)

    def _event(self, key: selectors.SelectorKey, events: int) -> None:
        data = key.data
        if type(data) is Handshake:
            self._guarded(self._read_handshake, data)
        elif data is _HANGUP:
            self._hangups()
        elif data is _PROBE:
            self._devices()
        elif data == "proxy":
            self._sel.unregister(key.fileobj)
            conn = self.proxy_link.take()
            if conn is not None:
                self._begin(conn, "the proxy", None)
        else:
            self._reap(data)

    def _accept(self) -> None:
        got = self.accept_connection()
        if got is not None:
            sock, addr = got
            self._begin(sock, "%s:%s" % addr[:2], addr[0])

    def _free_fds(self) -> bool:
        if not self.pending:
            return False
        self._evict_oldest(self._pending_from.most_common(1)[0][0])  # of the address holding the most
        return True

    # -- handshakes -------------------------------------------------------------------------
    def _begin(self, sock: socket.socket, peer: str, addr: str | None) -> None:
        log.info("connection from %s", peer)
        if addr is not None and self._pending_from[addr] >= address_share(self.max_pending):
            self._evict_oldest(addr)  # one address holds all but a quarter of the handshakes
        elif len(self.pending) >= self.max_pending:
            self._evict_oldest()
        sock.setblocking(False)
        hs = Handshake(sock, peer, addr, time.monotonic() + self.config.handshake_timeout)
        self.pending[sock.fileno()] = hs
        self._pending_from[addr] += 1
        self._sel.register(sock, selectors.EVENT_READ, hs)

    def _forget(self, hs: Handshake) -> None:
        if self.pending.pop(hs.sock.fileno(), None) is hs:
            self._pending_from[hs.addr] -= 1
            if not self._pending_from[hs.addr]:
                del self._pending_from[hs.addr]
        if hs.registered:
            self._sel.unregister(hs.sock)
            hs.registered = False

    def _refuse(self, hs: Handshake, code: int | None = None, message: str = "") -> None:
        """End a handshake: with ``[code, message]`` if given (and our preamble first if not yet sent)."""
        self._forget(hs)
        data = b""
        if code is not None and hs.tvm:
            data = tvm.refusal(code, message, key_answered=hs.stage not in (_PREAMBLE, _TVM_KEY))
            log.info("refused the TVM client %s: %s", hs.peer, message)
        elif code is not None:
            if hs.stage == _PREAMBLE:
                data = PREAMBLE.pack(MAGIC, VERSION, 0)
            data += error_frame(code, message)
            log.info("refused %s: %s", hs.peer, message)
        refuse(hs.sock, data)

    def _expire(self, hs: Handshake) -> None:
        if hs.stage == _PREAMBLE:  # not even a preamble: nothing to say to it
            self._refuse(hs)
        else:
            self._refuse(hs, ErrorCode.PROTOCOL, (
                f"the handshake did not complete within {self.config.handshake_timeout:g} s "
                "(the server's handshake_timeout); closing this connection"))

    def _evict_oldest(self, addr: str | None = None) -> None:
        hs = next(h for h in self.pending.values() if addr is None or h.addr == addr)
        self._refuse(hs, ERROR_BUSY, "server busy: too many connections are in their handshake; try again")

    def _guarded(self, step: Callable[[Handshake], None], hs: Handshake) -> None:
        """Run one step of a handshake; whatever goes wrong ends that connection only."""
        try:
            step(hs)
        except Exception:
            log.exception("the handshake with %s failed; closing that connection", hs.peer)
            if self.pending.get(hs.sock.fileno()) is hs:
                self._forget(hs)
                hs.sock.close()

    def _read_handshake(self, hs: Handshake) -> None:
        if hs.stage == _BULK:
            self._discard_bulk(hs)
            return
        try:
            data = hs.sock.recv(hs.need())
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the peer left mid-handshake
            self._forget(hs)
            hs.sock.close()
            return
        hs.buf += data
        if hs.need():
            return
        if hs.stage == _PREAMBLE:
            self._got_preamble(hs)
        elif hs.stage == _HEADER:
            self._got_header(hs)
        elif hs.tvm:
            self._tvm_step(hs)
        else:
            self._got_ctrl(hs)

    def _got_preamble(self, hs: Handshake) -> None:
        if hs.buf[:4] == tvm.MAGIC_BYTES:  # TVM's client: its magic and key length came in these 8 bytes
            return self._got_tvm_magic(hs)
        magic, version, flags = PREAMBLE.unpack(hs.buf)
        if magic != MAGIC:
            return self._refuse(hs, ErrorCode.PROTOCOL, (
                f"bad magic {magic!r}: this is an rpc-workbench server (protocol v{VERSION}); "
                "connect with workbench.rpc.connect (or TVM's tvm.rpc.connect)"))
        if version != VERSION:
            return self._refuse(hs, ErrorCode.PROTOCOL, (
                f"the client speaks protocol version {version}, this server speaks {VERSION}: "
                "install the same rpc-workbench version on both sides"))
        if flags & FLAG_SERVER:
            return self._refuse(hs, ErrorCode.PROTOCOL, (
                "this is an RPC server, not a proxy: a server started with is_proxy=True (--through-proxy) "
                "must connect to an RPC proxy (python -m workbench.exec.rpc_proxy); rpc_server and rpc_proxy "
                "both default to port 9090, so give one of them another --port"))
        hs.nonce = os.urandom(NONCE_BYTES)
        body = pack(hello(hs.nonce, self.config.token))
        data = PREAMBLE.pack(MAGIC, VERSION, 0) + HEADER.pack(len(body), Kind.HELLO, 0, 0) + body
        hs.stage, hs.buf = _HEADER, b""
        try:
            sent = hs.sock.send(data)
        except OSError:
            sent = 0
        if sent != len(data):  # a fresh connection's buffer takes 80 bytes; if not, the peer is gone
            self._forget(hs)
            hs.sock.close()

    # -- TVM's handshake (wire/tvm.py; docs/protocol.md, "TVM's protocol on workbench servers") ----------
    def _got_tvm_magic(self, hs: Handshake) -> None:
        hs.tvm = True
        (keylen,) = struct.unpack_from("<i", hs.buf, 4)
        if not 0 <= keylen <= tvm.MAX_KEY:
            return self._refuse(hs, ErrorCode.TOO_LARGE, f"a TVM handshake key of {keylen} bytes")
        hs.stage, hs.ctrl_len, hs.buf = _TVM_KEY, keylen, b""
        if not keylen:
            self._tvm_step(hs)

    def _tvm_step(self, hs: Handshake) -> None:
        """The key, the INIT_SERVER packet's length or the packet itself has come whole."""
        if hs.stage == _TVM_KEY:
            try:
                key, options = tvm.parse_client_key(hs.buf)
                check_key(self.config.key, key, self._matchkey())
            except RPCError as exc:  # TVM's answer: the mismatch code (its client says "cannot find server")
                return self._refuse(hs, exc.code, str(exc))
            hs.ctrl = {"key": key, "timeout": options.get("timeout", "0"), "ctor": None, "proof": None,
                       "protocol": TVM_PROTOCOL}
            data = tvm.server_reply(self.config.key)
            try:
                sent = hs.sock.send(data)
            except OSError:
                sent = 0
            if sent != len(data):  # a fresh connection's buffer takes it; if not, the peer is gone
                self._forget(hs)
                hs.sock.close()
                return
            hs.stage, hs.ctrl_len, hs.buf = _TVM_LENGTH, 8, b""
        elif hs.stage == _TVM_LENGTH:
            (length,) = struct.unpack("<Q", hs.buf)
            if length > tvm.MAX_INIT_PACKET:
                return self._refuse(hs, ErrorCode.TOO_LARGE, (
                    f"a {length}-byte packet where INIT_SERVER was expected is over the handshake's "
                    f"{tvm.MAX_INIT_PACKET}-byte limit"))
            hs.stage, hs.ctrl_len, hs.buf = (_TVM_INIT, length, b"") if length else (_TVM_LENGTH, 8, b"")
        else:
            self._got_tvm_init(hs)

    def _got_tvm_init(self, hs: Handshake) -> None:
        """Decide on a TVM client's INIT_SERVER: its session constructor, its session_timeout, the token."""
        if hs.registered:
            self._sel.unregister(hs.sock)  # nothing more to read here: the worker reads what follows
            hs.registered = False
        hs.stage = _WAIT
        opts = hs.ctrl
        try:
            ctor = tvm.parse_init_server(hs.buf)
            if ctor and ctor != ["rpc.LocalSession"]:
                name = ctor[0] if isinstance(ctor[0], str) else type(ctor[0]).__name__
                raise UnsupportedError(
                    f"session constructor {name!r:.100} is not supported by this server for TVM's client "
                    "(supported: rpc.LocalSession; for a server behind this one, use a proxy or its tracker)")
            try:
                opts["timeout"] = check_session_timeout(float(opts["timeout"]))
            except ValueError as exc:
                raise ProtocolError(f"-timeout={opts['timeout']}: {exc}") from None
        except RPCError as exc:
            return self._refuse(hs, exc.code, str(exc))
        if self.config.token and not self.config.allow_tvm_clients:
            log.warning("refused a TVM-protocol client from %s: this server has an auth token, which TVM's "
                        "client cannot prove (allow_tvm_clients=True / --allow-tvm-clients lets them in)", hs.peer)
            return self._refuse(hs, ErrorCode.AUTH, (
                "this server requires an auth token, which TVM's RPC client cannot prove: connect with "
                "workbench.rpc.connect(..., auth_token=...), or start the server with allow_tvm_clients=True "
                "(rpc_server --allow-tvm-clients) to let TVM's clients in without a token"))
        log.info("TVM-protocol client %s, key %r", hs.peer, opts["key"])
        self._admit(hs, opts)

    def _got_header(self, hs: Handshake) -> None:
        ctrl_len, kind, _flags, bulk_len = HEADER.unpack(hs.buf)
        if ctrl_len > MAX_CTRL or bulk_len > MAX_BULK:
            return self._refuse(hs, ErrorCode.TOO_LARGE, str(_too_large(ctrl_len, bulk_len)))
        if ctrl_len > MAX_CONNECT_CTRL:
            return self._refuse(hs, ErrorCode.TOO_LARGE, (
                f"a {ctrl_len}-byte message where CONNECT was expected is over the handshake's "
                f"{MAX_CONNECT_CTRL}-byte limit"))
        if ctrl_len == 0:
            return self._refuse(hs, ErrorCode.PROTOCOL, "malformed control message: an empty control part")
        hs.kind, hs.ctrl_len, hs.bulk_left = kind, ctrl_len, bulk_len
        hs.stage, hs.buf = _CTRL, b""

    def _got_ctrl(self, hs: Handshake) -> None:
        try:
            hs.ctrl = unpack(hs.buf)
        except ProtocolError as exc:
            return self._refuse(hs, exc.code, str(exc))
        hs.buf = b""
        if hs.bulk_left and not _carries_program(hs.ctrl):
            hs.stage = _BULK  # a bulk part on CONNECT means nothing: read and dropped
            return
        self._evaluate(hs)  # (rpc.PopenSession's program, the bulk part, is read by the worker once accepted)

    def _discard_bulk(self, hs: Handshake) -> None:
        view = memoryview(self._scratch)[: min(hs.bulk_left, len(self._scratch))]
        try:
            n = hs.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if not n:
            self._forget(hs)
            hs.sock.close()
            return
        hs.bulk_left -= n
        if not hs.bulk_left:
            self._evaluate(hs)

    def _evaluate(self, hs: Handshake) -> None:
        """Decide on a complete CONNECT (after the auth throttle lets this address try)."""
        token = self.config.token
        if hs.registered:
            self._sel.unregister(hs.sock)  # nothing more to read here: the worker reads what follows
            hs.registered = False
        hs.stage = _WAIT
        now = time.monotonic()
        if token and hs.addr is not None:
            turn = self.throttle.wait_until(hs.addr, now)
            if turn > now:
                heapq.heappush(self._postponed, (turn, next(self._seq), hs))
                return
            self.throttle.attempt(hs.addr, now)
        try:
            opts = check_connect(hs.kind, hs.ctrl, hs.nonce, key=self.config.key, token=token,
                                 matchkey=self._matchkey())
        except RPCError as exc:
            text = str(exc)
            guessed = isinstance(exc, AuthenticationError) and isinstance(hs.ctrl, dict) and hs.ctrl.get("proof")
            if guessed and hs.addr is not None:
                delay = self.throttle.failed(hs.addr, now)
                text = refusal_text(exc, self.throttle.failures(hs.addr, now), delay)
                log.warning("wrong auth proof from %s", hs.peer)
            return self._refuse(hs, exc.code, text)
        if token and hs.addr is not None:
            self.throttle.succeeded(hs.addr)
        if _carries_program(hs.ctrl):
            if not 0 < hs.bulk_left <= MAX_PROGRAM_BYTES:
                return self._refuse(hs, ErrorCode.TOO_LARGE if hs.bulk_left else ErrorCode.UNSUPPORTED, (
                    f"rpc.PopenSession: the program (CONNECT's bulk part) is {hs.bulk_left} bytes; it must be 1 to "
                    f"{MAX_PROGRAM_BYTES} bytes"))
            opts["program_bytes"] = hs.bulk_left
        self._admit(hs, opts)

    def _admit(self, hs: Handshake, opts: dict[str, Any]) -> None:
        """Start a session for a client whose handshake passed its checks, unless the server is full."""
        share = address_share(self.max_sessions)
        held = sum(1 for w in self.workers.values() if w.addr is not None and w.addr == hs.addr and not w.preempted)
        if hs.addr is not None and held >= share < self.max_sessions and not self._preempt_idle(hs.addr):
            return self._refuse(hs, ERROR_BUSY, (
                f"server busy: your address ({hs.addr}) holds {held} sessions, its share of the "
                f"{self.max_sessions} (max_sessions; the rest stay for other addresses); close one first"))
        running = sum(1 for w in self.workers.values() if not w.preempted)
        if running >= self.max_sessions and not self._preempt_idle():
            return self._refuse(hs, ERROR_BUSY, (
                f"server busy: {len(self.workers)} sessions are running, the most it takes "
                f"(max_sessions={self.max_sessions}); try again later, or start the server with a larger "
                "max_sessions (--max-sessions)"))
        self._start_worker(hs, opts)

    def _preempt_idle(self, addr: str | None = None) -> bool:
        """End the session idle longest (of the client address ``addr``, if given), if for ``preempt_idle`` at least,
        for a client that would be refused."""
        limit = self.config.preempt_idle
        live = [w for w in self.workers.values() if w.preempted is None and (addr is None or w.addr == addr)]
        if not limit or not live:
            return False
        idle, worker = max(((idle_seconds(w), w) for w in live), key=lambda pair: pair[0])
        if idle < limit:
            return False
        how_long = f"{idle / 60:.0f} min" if idle >= 120 else f"{idle:.0f} s"
        worker.preempted = (
            f"the session was idle for {how_long} and another client needed its slot "
            f"(max_sessions={self.max_sessions}), so the server ended it: its tensors and modules are gone. "
            f"Connect again (a server keeps idle sessions while nobody waits; preempt_idle={limit:g} s)")
        log.info("ending the session of worker %d, idle %.0f s, for a new client", worker.pid, idle)
        os.kill(worker.pid, signal.SIGKILL)
        return True

    # -- workers --------------------------------------------------------------------------
    def _start_worker(self, hs: Handshake, opts: dict[str, Any]) -> None:
        self._forget(hs)
        conn = hs.sock
        try:
            workspace = tempfile.mkdtemp(prefix="wb-session-")
        except OSError as exc:
            log.warning("cannot create a session workspace: %s", exc)
            return self._refuse(hs, ERROR_BUSY, (
                f"server busy: it cannot create a session workspace ({exc.strerror or exc}); try again later"))
        self._workspaces.add(workspace)
        self._devices()  # listed once, before the first worker, which inherits the list
        try:
            worker = self._spawn(conn, workspace, opts, self._matchkey())
        except OSError as exc:
            log.warning("cannot start a session worker: %s", exc)
            self._remove_workspace(workspace)
            return self._refuse(hs, ERROR_BUSY, (
                f"server busy: it cannot start a session worker ({exc.strerror or exc}); try again later"))
        worker.addr = hs.addr
        worker.tvm = opts.get("protocol") == TVM_PROTOCOL
        self.workers[worker.pidfd] = worker
        self._sel.register(worker.pidfd, selectors.EVENT_READ, worker)
        fd = conn.fileno()
        self._hup.register(fd, select.EPOLLRDHUP)  # hang-ups and errors only: never a wake-up per request
        self._by_conn[fd] = worker

    def _reserve_fd(self) -> int:
        """An fd held across the fork and closed just before pidfd_open, which then cannot fail for want of one."""
        try:
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            if not self._free_fds():
                raise
            return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def _spawn(self, conn: socket.socket, workspace: str, opts: dict[str, Any], matchkey: str | None) -> _Worker:
        cfg = self.config
        _keepalive(conn)
        reserve = self._reserve_fd()
        try:
            if cfg.no_fork:
                proc = self._popen_worker(conn, workspace, opts)
                pid, wait, report = proc.pid, proc.wait, None
            else:
                report = EndReport()
                try:
                    pid = os.fork()
                except OSError:
                    report.close()
                    raise
                if pid == 0:
                    os.close(reserve)
                    self._run_child(conn, workspace, opts, report)  # never returns
                wait = lambda pid=pid: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])  # noqa: E731
        finally:
            os.close(reserve)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            wait()
            if report is not None:
                report.close()
            raise
        return _Worker(pid, pidfd, conn, workspace, wait, matchkey, report)

    def _popen_worker(self, conn: socket.socket, workspace: str, opts: dict[str, Any]) -> subprocess.Popen:
        cfg = self.config
        cmd = [sys.executable, "-m", "workbench.rpc.server.worker", "--fd", str(conn.fileno()),
               "--workspace", workspace, "--key", cfg.key]
        for lib in cfg.load_library:
            cmd += ["--load-library", lib]
        if cfg.timeout is not None:
            cmd += ["--timeout", str(cfg.timeout)]
        if cfg.idle_timeout is not None:
            cmd += ["--idle-timeout", str(cfg.idle_timeout)]
        if cfg.init:
            cmd += ["--init", cfg.init]
        cmd += self.quotas.worker_args()
        env = dict(os.environ)
        for name in (TOKEN_ENV, REGISTRATION_TOKEN_ENV):
            env.pop(name, None)  # the worker needs no token: the handshake is done
        proc = subprocess.Popen(cmd, pass_fds=[conn.fileno()], env=env, stdin=subprocess.PIPE)
        accepted = dict(opts, proof=opts["proof"].hex() if opts.get("proof") else None)
        try:  # on stdin, not the command line: a nested session's token must not show in ps
            proc.stdin.write(json.dumps(accepted).encode() + b"\n")
        finally:
            proc.stdin.close()
        return proc

    def _run_child(self, conn: socket.socket, workspace: str, opts: dict[str, Any], report: EndReport) -> None:
        try:
            worker_signals()
            self.close_in_child()
            self._hup.close()
            for w in self.workers.values():
                w.conn.close()
                os.close(w.pidfd)
                if w.report is not None:
                    w.report.close()
            for hs in self.pending.values():
                hs.sock.close()
            if self.registration is not None and self.registration.conn is not None:
                self.registration.conn.sock.close()
            if self.proxy_link is not None and self.proxy_link.sock is not None:
                self.proxy_link.sock.close()
            conn.setblocking(True)
            hide_from_kernels(self.config.token, self.config.registration_token, worker=True)
            code = serve_accepted(
                SocketChannel(conn), Workspace(workspace), opts, key=self.config.key, system_libs=self.system_libs,
                sock=conn, io_timeout=self.config.timeout, idle_timeout=self.config.idle_timeout, report=report,
                quotas=self.quotas,
            )
        except BaseException:
            log.exception("session worker failed")
            os._exit(1)
        if code in ENDED_ON_PURPOSE:
            report.exit(code)
        os._exit(code)

    def _hangups(self) -> None:
        """Clients that hung up (or whose connection failed): kill their workers, busy or not."""
        for fd, _events in self._hup.poll(0):
            self._hup.unregister(fd)
            worker = self._by_conn.pop(fd, None)
            if worker is not None and not worker.hung_up:
                worker.hung_up = True
                try:
                    signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
                except OSError:
                    pass

    def _reap(self, worker: _Worker, notify: bool = True) -> None:
        self._sel.unregister(worker.pidfd)
        fd = worker.conn.fileno()
        if self._by_conn.pop(fd, None) is not None:
            self._hup.unregister(fd)
        del self.workers[worker.pidfd]
        try:
            os.close(worker.pidfd)
            returncode = worker.wait()
            on_purpose = worker.report.ended_on_purpose() if worker.report is not None else None
        finally:
            if worker.report is not None:
                worker.report.close()
            self._remove_workspace(worker.workspace)
        if self.registration and worker.matchkey == self._matchkey() and returncode != EXIT_REFUSED and notify:
            self.registration.offer(SELF, self.config.key)  # a session used the match key: offer a new one
        notice = death_notice(returncode, on_purpose) if notify and not worker.hung_up else None
        code = ErrorCode.WORKER_DIED
        if worker.preempted and not worker.hung_up:
            notice, code = worker.preempted, ErrorCode.SESSION_TIMEOUT
        if notice:
            log.warning("%s", notice)
            data = tvm.exception_packet(notice, code) if worker.tvm else error_frame(code, notice)
            try:  # never wait on a client that does not read: what does not fit now is dropped
                worker.conn.send(data, socket.MSG_DONTWAIT)
            except OSError:
                pass
        shutdown(worker.conn)
        worker.conn.close()

    def _remove_workspace(self, path: str) -> None:
        """Remove a session's workspace; at the fd limit (rmtree needs descriptors) make room first."""
        for _ in range(3):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                self._workspaces.discard(path)
                return
            if not any([self._free_fds() for _ in range(8)]):
                break
        log.warning("cannot remove the session workspace %s yet; retrying when the server stops", path)

    def stop(self) -> None:
        for hs in list(self.pending.values()):  # first: the descriptors they hold may be needed below
            self._forget(hs)
            hs.sock.close()
        for worker in list(self.workers.values()):
            try:
                signal.pidfd_send_signal(worker.pidfd, signal.SIGKILL)
            except OSError:
                pass
        for worker in list(self.workers.values()):
            self._reap(worker, notify=False)
        for path in list(self._workspaces):  # whatever a failure on the way left behind
            self._remove_workspace(path)
        self._hup.close()
        self._sel.close()
        if self.listener is not None:
            self.listener.close()
        if self.proxy_link is not None and self.proxy_link.sock is not None:
            self.proxy_link.sock.close()
        if self.registration is not None:
            self.registration.close()


def serve(config: ServerConfig, ready: Callable[[int], None] | None = None, owner_fd: int | None = None) -> None:
    """Run a server in this process until SIGTERM/SIGINT (or the owner's pipe closes)."""
    setup_logging(config.silent)
    opencl_probe.start()  # (python -m workbench.rpc.server started it already) listed while the server starts
    hide_from_kernels(config.token, config.registration_token, worker=False)
    if config.init:
        resolve_callable(config.init)()
    if config.is_proxy:
        listener, port = None, config.port
    else:
        listener = bind_port(config.host, config.port, config.port_end, config.reuse_addr)
        port = listener.getsockname()[1]
    stop_on_signals()
    loop = ServeLoop(config, listener, owner_fd)
    if config.is_proxy:
        log.info("RPCServer: serving through the proxy %s:%d as key %r", config.host, port, config.key)
    else:
        log.info("RPCServer: bind to %s:%d", config.host, port)
    if ready:
        ready(port)
    loop.run()


def main() -> None:
    """Entry of a server started by ``rpc.Server`` (see workbench.rpc.service.process)."""
    service_main(lambda config, ready, owner_fd: serve(ServerConfig(**config), ready, owner_fd))


if __name__ == "__main__":
    main()
