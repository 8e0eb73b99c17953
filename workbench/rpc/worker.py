"""One client session on the serving side: handshake, then requests until the client leaves.

A worker runs in its own process (forked per connection by the server, spawned
with ``no_fork=True``, or as the stdio server behind ``PopenSession``), so a
kernel that crashes ends only its own session.

    python -m workbench.rpc.worker --stdio        # the server binary for PopenSession
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import signal
import socket
import sys
import threading
import traceback
from typing import Any, Callable

from ..errors import (
    AuthenticationError,
    ConnectionClosedError,
    KeyMismatchError,
    ProtocolError,
    RemoteNotFoundError,
    RPCError,
    UnsupportedError,
    code_of,
    ErrorCode,
)
from ..runtime.ffi import NativeLibrary
from ..runtime.workspace import Workspace
from .handler import Bulk, Reply, SessionHandler, device_info
from .relay import relay
from .protocol import (
    FLAG_NO_REPLY,
    MAGIC,
    NONCE_BYTES,
    PREAMBLE,
    VERSION,
    Channel,
    Kind,
    PipeChannel,
    SocketChannel,
)

log = logging.getLogger(__name__)

EXIT_CLEAN = 0x56  # the client left; nothing to report
EXIT_TIMED_OUT = 0x57  # session_timeout expired; the worker told the client itself
EXIT_REFUSED = 0x58  # the handshake failed: no session was served
HANDSHAKE_TIMEOUT_S = 10.0
TOKEN_ENV = "WORKBENCH_RPC_TOKEN"
_OK = int(Kind.OK)
SESSION_CONSTRUCTORS = ("rpc.LocalSession", "rpc.Connect")


def death_notice(returncode: int) -> str | None:
    """What to tell the client when its worker ended with ``returncode`` (None: nothing)."""
    if returncode in (EXIT_CLEAN, EXIT_TIMED_OUT, EXIT_REFUSED):
        return None
    if returncode < 0:
        sig = signal.Signals(-returncode)
        what = f"was killed by signal {sig.value} ({sig.name}: {signal.strsignal(sig)})"
    else:
        what = f"exited with status {returncode} (did the code it ran call exit()?)"
    return (
        f"the session worker {what}, most likely in the function it was running; "
        "the server is still up: connect again to go on"
    )


def auth_proof(token: str, nonce: bytes) -> bytes:
    """What a client sends to prove it knows ``token`` (the token never crosses the wire)."""
    return hmac.new(token.encode(), b"workbench-rpc-v1" + nonce, hashlib.sha256).digest()


def check_key(server_key: str, client_key: Any, matchkey: str | None) -> None:
    """Refuse a client whose key does not fit: with a tracker, only its match key does."""
    if not isinstance(client_key, str):
        raise KeyMismatchError(f"the key must be a string, not {client_key!r}")
    if matchkey is not None:
        if client_key != matchkey:
            raise KeyMismatchError(
                f"this server of key {server_key!r} is handed out by a tracker: request it with "
                f"rpc.connect_tracker(host, port).request({server_key!r})"
            )
    elif server_key and client_key and client_key.partition(":")[0] != server_key:
        raise KeyMismatchError(f"this server serves key {server_key!r}, the client asked for {client_key!r}")


def _refuse(chan: Channel, exc: RPCError) -> None:
    try:
        chan.send_frame(Kind.ERROR, [int(exc.code), str(exc)])
    except OSError:
        pass
    raise exc


def server_handshake(
    chan: Channel,
    *,
    key: str = "",
    token: str | None = None,
    matchkey: str | None = None,
    accept: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the server side of the handshake; return the client's CONNECT options.

    ``accept(options)`` gives the session info sent with OK (by default this
    device's), or raises an RPCError to refuse. Refusals are sent to the
    client as an ERROR frame and raised here.
    """
    magic, version, _flags = PREAMBLE.unpack(chan.read_exact(PREAMBLE.size))
    chan._sendall(PREAMBLE.pack(MAGIC, VERSION, 0))
    if magic != MAGIC:
        _refuse(chan, ProtocolError(
            f"bad magic {magic!r}: this is an rpc-workbench server (protocol v{VERSION}); "
            "connect with workbench.rpc.connect (a TVM client cannot talk to it directly)"
        ))
    if version != VERSION:
        _refuse(chan, ProtocolError(
            f"the client speaks protocol version {version}, this server speaks {VERSION}: "
            "install the same rpc-workbench version on both sides"
        ))
    nonce = os.urandom(NONCE_BYTES)
    chan.send_frame(Kind.HELLO, {"version": VERSION, "nonce": nonce, "auth": bool(token)})
    try:
        frame = chan.recv_frame()
    except ConnectionClosedError:
        raise
    except RPCError as exc:
        _refuse(chan, exc)
    opts = frame.ctrl
    if frame.kind != Kind.CONNECT or not isinstance(opts, dict):
        _refuse(chan, ProtocolError(f"expected a CONNECT message after HELLO, got kind {frame.kind}"))
    if token:
        proof = opts.get("proof")
        if not proof:
            _refuse(chan, AuthenticationError(
                "this server requires an auth token: pass auth_token=... to rpc.connect "
                f"or set {TOKEN_ENV} on the client"
            ))
        if not isinstance(proof, bytes) or not hmac.compare_digest(proof, auth_proof(token, nonce)):
            _refuse(chan, AuthenticationError(
                f"wrong auth token: the client's {TOKEN_ENV} / auth_token differs from the server's"
            ))
    try:
        check_key(key, opts.get("key") or "", matchkey)
    except KeyMismatchError as exc:
        _refuse(chan, exc)
    ctor = opts.get("ctor")
    if ctor and not (isinstance(ctor, list) and ctor[0] in SESSION_CONSTRUCTORS):
        _refuse(chan, UnsupportedError(
            f"session constructor {ctor[0] if isinstance(ctor, list) else ctor!r} is not supported by this server "
            f"(supported: {', '.join(SESSION_CONSTRUCTORS)})"
        ))
    timeout = opts.get("timeout") or 0
    if not isinstance(timeout, (int, float)) or timeout < 0:
        _refuse(chan, ProtocolError(f"session_timeout must be a number >= 0, not {timeout!r}"))
    opts["timeout"] = float(timeout)
    try:
        info = accept(opts) if accept else dict(device_info(), key=key, session_timeout=opts["timeout"])
    except RPCError as exc:
        _refuse(chan, exc)
    chan.send_frame(Kind.OK, info)
    return opts


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, (RPCError, OSError)):
        return str(exc)
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-12:]).rstrip()
    return f"{type(exc).__name__}: {exc}\n\nRemote traceback (most recent call last):\n{tail}"


def serve_requests(chan: Channel, handler: SessionHandler, send_lock: threading.Lock | None = None) -> None:
    """Answer requests until the client closes the connection."""
    lock = send_lock or threading.Lock()
    recv_frame, send_frame, handle = chan.recv_frame, chan.send_frame, handler.handle
    while True:
        try:
            frame = recv_frame()
        except ConnectionClosedError:
            return
        except RPCError as exc:  # oversized or malformed frame: the stream cannot be trusted
            log.warning("closing session: %s", exc)
            with lock:
                try:
                    send_frame(Kind.ERROR, [int(exc.code), f"{exc}; closing this connection"])
                except OSError:
                    pass
            return
        kind, flags, ctrl, bulk_len = frame
        bulk = Bulk(bulk_len, chan.recv_bulk_into, chan.discard_bulk, chan.recv_bulk_to_fd) if bulk_len else None
        try:
            reply = handle(kind, ctrl, bulk)
        except ConnectionClosedError:
            return
        except Exception as exc:
            if flags & FLAG_NO_REPLY:
                log.warning("request %s failed: %s", kind, exc)
                continue
            with lock:
                send_frame(Kind.ERROR, [int(code_of(exc)), _error_text(exc)])
            continue
        if flags & FLAG_NO_REPLY:
            continue
        with lock:
            try:
                if type(reply) is Reply:
                    send_frame(_OK, reply.value, reply.bulk, file=reply.file)
                else:
                    send_frame(_OK, reply)
            except TypeError as exc:  # the value cannot be encoded; encoding fails before anything is sent
                send_frame(Kind.ERROR, [int(ErrorCode.BAD_REQUEST), f"the function returned a value that cannot be sent back: {exc}"])
            finally:
                if type(reply) is Reply and reply.file:
                    reply.file[0].close()


class Watchdog:
    """Ends the session when ``session_timeout`` expires, even inside a kernel that never returns."""

    def __init__(self, seconds: float, chan: Channel, send_lock: threading.Lock, on_expire: Callable[[], None]):
        self.seconds = seconds
        self._chan = chan
        self._lock = send_lock
        self._on_expire = on_expire
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        if self._lock.acquire(timeout=2.0):
            try:
                self._chan.send_frame(Kind.ERROR, [int(ErrorCode.SESSION_TIMEOUT), (
                    f"session timed out after {self.seconds:g} s (session_timeout={self.seconds:g}); "
                    "the server ended it: connect again, with a larger session_timeout if needed"
                )])
            except OSError:
                pass
        self._on_expire()
        os._exit(EXIT_TIMED_OUT)

    def cancel(self) -> None:
        self._timer.cancel()


def run_session(
    chan: Channel,
    workspace: Workspace,
    *,
    key: str = "",
    token: str | None = None,
    system_libs: list[NativeLibrary] | None = None,
    sock: socket.socket | None = None,
    io_timeout: float | None = None,
    matchkey: str | None = None,
) -> bool:
    """Handshake and serve one session on ``chan``; False if the handshake failed.

    The workspace is removed at the end.
    """
    handler = None
    watchdog = None
    inner: list[socket.socket] = []

    def accept(opts: dict[str, Any]) -> dict[str, Any]:
        ctor = opts.get("ctor")
        if ctor and ctor[0] == "rpc.Connect":
            if sock is None:
                raise UnsupportedError("rpc.Connect needs a network session; this one runs over pipes")
            inner_sock, info = connect_inner(ctor, opts["timeout"])
            inner.append(inner_sock)
            return info
        return dict(device_info(), key=key, session_timeout=opts["timeout"])

    try:
        if sock is not None:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            opts = server_handshake(chan, key=key, token=token, matchkey=matchkey, accept=accept)
        except (RPCError, OSError) as exc:
            log.info("handshake refused: %s", exc)
            for s in inner:
                s.close()
            return False
        if inner:  # rpc.Connect: from now on this session is a pipe to the inner server
            sock.settimeout(None)
            relay(sock, inner[0])
            return True
        if sock is not None:
            sock.settimeout(io_timeout)
        handler = SessionHandler(workspace, system_libs)
        lock = threading.Lock()
        if opts["timeout"] > 0:
            def expire() -> None:
                workspace.cleanup()
                shutdown(sock)
            watchdog = Watchdog(opts["timeout"], chan, lock, expire)
        try:
            serve_requests(chan, handler, lock)
        except OSError as exc:  # socket timeout (the server's timeout=) or a reset
            log.info("session ended: %s", exc)
        return True
    finally:
        if watchdog:
            watchdog.cancel()
        if handler:
            handler.close()
        workspace.cleanup()
        shutdown(sock)


def shutdown(sock: socket.socket | None) -> None:
    """End both directions of a connection, whoever else holds its descriptor."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def connect_inner(ctor: list, session_timeout: float) -> tuple[socket.socket, dict[str, Any]]:
    """Open the session that ``["rpc.Connect", url, port, key, ...]`` names; return its socket and info."""
    from .client import client_handshake

    if len(ctor) < 3 or not isinstance(ctor[1], str) or not isinstance(ctor[2], int):
        raise UnsupportedError(f"rpc.Connect takes [url, port, key]: got {ctor[1:]!r}")
    url, port = ctor[1], ctor[2]
    inner_key = ctor[3] if len(ctor) > 3 and isinstance(ctor[3], str) else ""
    try:
        inner = socket.create_connection((url, port), timeout=HANDSHAKE_TIMEOUT_S)
    except OSError as exc:
        raise RemoteNotFoundError(f"rpc.Connect: cannot reach {url}:{port} from this server: {exc.strerror or exc}") from None
    try:
        info = client_handshake(SocketChannel(inner), f"{url}:{port}", key=inner_key,
                                session_timeout=session_timeout, token=os.environ.get(TOKEN_ENV))
    except BaseException:
        inner.close()
        raise
    inner.settimeout(None)
    return inner, info


def load_libraries(paths: list[str] | None) -> list[NativeLibrary]:
    """Open the server's --load-library files (RTLD_GLOBAL, for system_lib())."""
    return [NativeLibrary(os.path.abspath(path), global_scope=True) for path in paths or []]


def serve_stdio(workspace: Workspace, **session_args: Any) -> int:
    """Serve one session on stdin/stdout from a forked worker, and report its death if it crashes."""
    out = os.dup(1)
    os.dup2(2, 1)  # a kernel's printf must not corrupt the protocol stream
    chan = PipeChannel(0, out)
    pid = os.fork()
    if pid == 0:
        code = EXIT_CLEAN
        try:
            run_session(chan, workspace, **session_args)
        except BaseException:
            log.exception("session worker failed")
            code = 1
        finally:
            os._exit(code)
    notice = death_notice(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    if notice:
        try:
            chan.send_frame(Kind.ERROR, [int(ErrorCode.WORKER_DIED), notice])
        except OSError:
            pass
    workspace.cleanup()
    return EXIT_CLEAN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.rpc.worker", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stdio", action="store_true", help="serve one session on stdin/stdout")
    mode.add_argument("--fd", type=int, help="serve one session on this inherited socket fd")
    parser.add_argument("--workspace", help="session directory (default: a new temporary one)")
    parser.add_argument("--key", default="")
    parser.add_argument("--matchkey", default=None, help="with a tracker: the match key a client must present")
    parser.add_argument("--load-library", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--init", default=None, help="module:function to call before serving")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.init:
        from .server import resolve_callable

        resolve_callable(args.init)()
    libs = load_libraries(args.load_library)
    token = os.environ.get(TOKEN_ENV) or None
    workspace = Workspace(args.workspace)
    if args.stdio:
        return serve_stdio(workspace, key=args.key, token=token, system_libs=libs)
    sock = socket.socket(fileno=args.fd)
    served = run_session(SocketChannel(sock), workspace, key=args.key, token=token, system_libs=libs, sock=sock,
                         io_timeout=args.timeout, matchkey=args.matchkey)
    sock.close()
    return EXIT_CLEAN if served else EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
