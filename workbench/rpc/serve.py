"""The server process: accept connections, run each session in its own worker process.

The loop is single-threaded (a selector over the listening socket, one pidfd
per worker and the owner's pipe), so forking a worker per connection is safe.
When a worker dies of a signal or an unexpected exit, the server still holds
the connection and tells the client what happened before closing it.
"""
from __future__ import annotations

import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

from ..errors import ConnectionClosedError, ErrorCode, ProtocolError, RPCError, error_from_code
from ..runtime.workspace import Workspace
from .protocol import FLAG_SERVER, HEADER, MAGIC, PREAMBLE, VERSION, Kind, SocketChannel, pack, unpack
from .server import ServerConfig, resolve_callable
from .service import ServiceLoop, bind_port, service_main, setup_logging, stop_on_signals
from .handler import device_info
from .registration import TrackerRegistration
from .worker import EXIT_CLEAN, EXIT_REFUSED, death_notice, load_libraries, run_session, shutdown

log = logging.getLogger("workbench.rpc.server")
SELF = "self"  # the one tracker slot of a server


class _Worker:
    __slots__ = ("pid", "pidfd", "conn", "workspace", "wait", "matchkey")

    def __init__(self, pid: int, conn: socket.socket, workspace: str, wait: Callable[[], int], matchkey: str | None):
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.conn = conn
        self.workspace = workspace
        self.wait = wait
        self.matchkey = matchkey


class ProxyLink:
    """A server's connection waiting at a proxy (``is_proxy=True``): one session at a time."""

    def __init__(self, addr: tuple[str, int], key: str, info: dict):
        self.addr = addr
        self.key = key
        self.info = info
        self.sock: socket.socket | None = None
        self._retry_at = 0.0
        self._backoff = 0.1

    def poll(self, now: float) -> float:
        """Connect and register if due; return the seconds until the next attempt."""
        if self.sock is not None:
            return 3600.0
        if now >= self._retry_at:
            try:
                self.sock = self._register()
                self._backoff = 0.1
                log.info("waiting at the proxy %s:%d as key %r", *self.addr, self.key)
                return 3600.0
            except (OSError, RPCError) as exc:
                log.info("proxy %s:%d unreachable (%s); retrying in %.1f s", *self.addr, exc, self._backoff)
                self._retry_at = now + self._backoff
                self._backoff = min(self._backoff * 2, 5.0)
        return max(0.01, self._retry_at - now)

    def _register(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=5.0)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            body = pack({"key": self.key, "info": self.info})
            sock.sendall(PREAMBLE.pack(MAGIC, VERSION, FLAG_SERVER) + HEADER.pack(len(body), Kind.REGISTER, 0, 0) + body)
            ctrl_len, kind, _, _ = HEADER.unpack(_recv_exact(sock, HEADER.size))  # exactly: what follows is a client's
            ctrl = unpack(_recv_exact(sock, ctrl_len))
            if kind == Kind.ERROR:
                raise error_from_code(*ctrl[:2])
            if kind != Kind.OK:
                raise ProtocolError(f"the proxy answered REGISTER with kind {kind}")
            sock.settimeout(None)
            return sock
        except BaseException:
            sock.close()
            raise

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


class ServeLoop(ServiceLoop):
    def __init__(self, config: ServerConfig, listener: socket.socket | None, owner_fd: int | None = None):
        super().__init__(listener, owner_fd)
        self.config = config
        self.workers: dict[int, _Worker] = {}
        self.system_libs = load_libraries(config.load_library)
        self.registration: TrackerRegistration | None = None
        self.proxy_link: ProxyLink | None = None
        if listener is None:  # is_proxy: wait at the proxy instead of listening
            info = dict(device_info(), labels=config.labels)
            self.proxy_link = ProxyLink((config.host, config.port), config.key, info)
        elif config.tracker_addr:
            info = dict(device_info(), key=f"server:{config.key}", labels=config.labels)
            self.registration = TrackerRegistration(
                config.tracker_addr, listener.getsockname()[1], config.custom_addr, info
            )
            self.registration.offer(SELF, config.key)

    def _matchkey(self) -> str | None:
        return self.registration.slots[SELF].matchkey if self.registration else None

    def _timeout(self) -> float | None:
        link = self.proxy_link
        if link is not None:
            if link.sock is not None or self.workers:
                return None
            timeout = link.poll(time.monotonic())
            if link.sock is not None:
                self._sel.register(link.sock, selectors.EVENT_READ, "proxy")
            return timeout
        reg = self.registration
        if reg is None:
            return None
        matchkey = self._matchkey()
        reg.slots[SELF].busy = any(w.matchkey == matchkey for w in self.workers.values())
        return reg.poll(time.monotonic())

    def _event(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data == "proxy":
            self._sel.unregister(key.fileobj)
            conn = self.proxy_link.take()
            if conn is not None:
                self._start_worker(conn, "the proxy")
        else:
            self._reap(key.data)

    def _accept(self) -> None:
        try:
            conn, addr = self.listener.accept()
        except OSError:
            return
        self._start_worker(conn, "%s:%s" % addr[:2])

    def _start_worker(self, conn: socket.socket, peer: str) -> None:
        log.info("connection from %s", peer)
        workspace = tempfile.mkdtemp(prefix="wb-session-")
        cfg = self.config
        matchkey = self._matchkey()
        if cfg.no_fork:
            cmd = [sys.executable, "-m", "workbench.rpc.worker", "--fd", str(conn.fileno()),
                   "--workspace", workspace, "--key", cfg.key]
            if matchkey:
                cmd += ["--matchkey", matchkey]
            for lib in cfg.load_library:
                cmd += ["--load-library", lib]
            if cfg.timeout is not None:
                cmd += ["--timeout", str(cfg.timeout)]
            if cfg.init:
                cmd += ["--init", cfg.init]
            env = dict(os.environ)
            env.pop("WORKBENCH_RPC_TOKEN", None)
            if cfg.token:
                env["WORKBENCH_RPC_TOKEN"] = cfg.token
            proc = subprocess.Popen(cmd, pass_fds=[conn.fileno()], env=env, stdin=subprocess.DEVNULL)
            worker = _Worker(proc.pid, conn, workspace, proc.wait, matchkey)
        else:
            pid = os.fork()
            if pid == 0:
                self._run_child(conn, workspace, matchkey)  # never returns
            worker = _Worker(pid, conn, workspace, lambda pid=pid: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]),
                             matchkey)
        self.workers[worker.pidfd] = worker
        self._sel.register(worker.pidfd, selectors.EVENT_READ, worker)

    def _run_child(self, conn: socket.socket, workspace: str, matchkey: str | None) -> None:
        code = EXIT_CLEAN
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if self.listener is not None:
                self.listener.close()
            for w in self.workers.values():
                w.conn.close()
                os.close(w.pidfd)
            if self.owner_fd is not None:
                os.close(self.owner_fd)
            if self.registration is not None and self.registration.conn is not None:
                self.registration.conn.sock.close()
            served = run_session(
                SocketChannel(conn), Workspace(workspace), key=self.config.key, token=self.config.token,
                system_libs=self.system_libs, sock=conn, io_timeout=self.config.timeout, matchkey=matchkey,
            )
            code = EXIT_CLEAN if served else EXIT_REFUSED
        except BaseException:
            log.exception("session worker failed")
            code = 1
        finally:
            os._exit(code)

    def _reap(self, worker: _Worker, notify: bool = True) -> None:
        self._sel.unregister(worker.pidfd)
        del self.workers[worker.pidfd]
        os.close(worker.pidfd)
        returncode = worker.wait()
        notice = death_notice(returncode)
        if self.registration and worker.matchkey == self._matchkey() and returncode != EXIT_REFUSED and notify:
            self.registration.offer(SELF, self.config.key)  # a session used the match key: offer a new one
        if notice and notify:
            log.warning("%s", notice)
            try:
                worker.conn.settimeout(1.0)
                SocketChannel(worker.conn).send_frame(Kind.ERROR, [int(ErrorCode.WORKER_DIED), notice])
            except OSError:
                pass
        shutdown(worker.conn)
        worker.conn.close()
        shutil.rmtree(worker.workspace, ignore_errors=True)

    def stop(self) -> None:
        for worker in list(self.workers.values()):
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap(worker, notify=False)
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
    """Entry of a server started by ``rpc.Server`` (see workbench.rpc.service)."""
    service_main(lambda config, ready, owner_fd: serve(ServerConfig(**config), ready, owner_fd))


if __name__ == "__main__":
    main()
