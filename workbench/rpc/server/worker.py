"""One client session on the serving side: handshake, then requests until the client leaves.

A worker runs in its own process (forked per session by the server, spawned
with ``no_fork=True``, or as the stdio server behind ``PopenSession``), so a
kernel that crashes ends only its own session. The server process runs the
handshake itself (``serve.Handshake``) and forks a worker for an accepted
CONNECT (``serve_accepted``); the stdio server runs the whole handshake in the
worker (``run_session``).

    python -m workbench.rpc.server.worker --stdio        # the server binary for PopenSession
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import mmap
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable

from ...errors import (
    CallCancelledError,
    ConnectionClosedError,
    ErrorCode,
    KernelCrashedError,
    RemoteError,
    RemoteNotFoundError,
    RPCError,
    UnsupportedError,
    code_of,
)
from ...runtime import ffi
from ...runtime.ffi import NativeLibrary, shim
from ...runtime.quota import DEFAULT_WORKSPACE_BYTES, DEFAULT_WORKSPACE_FILES, Quotas, format_size
from ...runtime.workspace import Workspace
from ...runtime import device_api
from ...runtime.storage import DeviceTensor
from ..wire.exits import ENDED_ON_PURPOSE, EXIT_CLEAN, EXIT_LOST, EXIT_REFUSED, EXIT_TIMED_OUT, death_notice
from .handler import Bulk, CallOutcome, Reply, SessionHandler, device_info, error_text
from .secrets import hide_from_kernels
from ..tracker.registration import REGISTRATION_TOKEN_ENV
from ..wire.handshake import HANDSHAKE_TIMEOUT_S, TOKEN_ENV, TVM_PROTOCOL, check_connect, hello
from ..wire.relay import relay
from ..wire.protocol import (
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

try:  # the worker's fast path for plain calls, in C; without it, every request takes the Python path
    from . import _serve as _fastpath
except ImportError:  # not built (a tree copied without pip install)
    _fastpath = None

log = logging.getLogger(__name__)

FASTPATH_ENV = "WORKBENCH_SERVER_FASTPATH"  # "0": every request takes the Python path (tests compare the two)
SPIN_ENV = "WORKBENCH_SERVER_SPIN_US"  # how long a worker polls for the next request before it sleeps (0: never)
# After each reply the fast path polls for the next request this long, then sleeps (an idle worker takes no
# CPU): a client calling in a loop from another CPU is served without waking a sleeping worker (tens of µs on
# a VM). It polls only when the client's packets come from another CPU (on the client's own CPU a poll would
# take turns with it), yielding to whatever else wants the CPU. benchmarks/run.py, "empty call round trip".
DEFAULT_SPIN_US = 50

_OK = int(Kind.OK)
_CANCEL = int(Kind.CANCEL)

CANCEL_GRACE_S = 2.0  # a call still running this long after the client's CANCEL is stopped
CRASH_LIMIT, CRASH_WINDOW_S = 3, 10.0  # a kernel crashing this often ends the session (no crash loop)


class CrashCounter:
    """Ends the session when its kernels crash ``CRASH_LIMIT`` times within ``CRASH_WINDOW_S`` seconds.

        >>> counter = CrashCounter()
        >>> counter.crashed(0.0), counter.crashed(1.0), counter.crashed(2.0)
        (False, False, True)
    """

    def __init__(self) -> None:
        self._times: list[float] = []

    def crashed(self, now: float | None = None) -> bool:
        """Count one crash; True when this one ends the session."""
        now = time.monotonic() if now is None else now
        self._times = [t for t in self._times if now - t < CRASH_WINDOW_S] + [now]
        return len(self._times) >= CRASH_LIMIT


def crash_loop_notice(exc: KernelCrashedError) -> str:
    what = str(exc).split("; the session, ")[0]  # "add_one: the kernel died of signal 11 (...)"
    return (f"{what}. That is the {CRASH_LIMIT}rd crash within {CRASH_WINDOW_S:g} s, so the server ended the session "
            "(its tensors and modules are gone): fix the kernel, then connect again")


class CallWatch:
    """The worker's watcher thread (in C, kernel_runtime.c): a kernel still running ``grace`` seconds
    after the client sent CANCEL (or left) is stopped, and its call fails with CallCancelledError.

    ``start`` runs when the session gets its first native kernel (``SessionHandler.on_native_function``).
    """

    def __init__(self, fd: int, grace: float = CANCEL_GRACE_S):
        self.fd, self.grace, self.running = fd, grace, False

    def start(self) -> None:
        if self.fd < 0 or self.running:
            return
        self.running = shim().wb_guard_watch(self.fd, int(self.grace * 1000)) == 0
        if not self.running:
            log.warning("cannot start the call watcher: a kernel that never returns cannot be cancelled")

    def stop(self) -> None:
        if self.running:
            shim().wb_guard_watch(-1, 0)
            self.running = False


_CALL_CODE = SessionHandler.call.__code__


def _in_call(frame: Any) -> bool:
    """Whether ``frame`` (a thread's innermost) is inside ``SessionHandler.call``: a CALL is being served."""
    while frame is not None:
        if frame.f_code is _CALL_CODE:
            return True
        frame = frame.f_back
    return False


class PythonCallWatch:
    """Stops a Python function on the server (``register_func``) still running ``grace`` seconds after the
    client sent CANCEL (or left): a signal to the worker's main thread, whose handler raises
    CallCancelledError inside the function (a blocking call in it is interrupted).

    ``start`` runs, in the main thread, when the session gets its first Python function
    (``SessionHandler.on_python_function``); a thread then looks at the connection ten times a second
    while the main thread is inside ``SessionHandler.call`` (read from its frames: nothing is added to
    the request path) and no native kernel runs (``CallWatch`` stops those). The connection has input
    then only if the client cancelled or left.
    """

    def __init__(self, fd: int, handler: SessionHandler, grace: float = CANCEL_GRACE_S):
        self.fd, self.handler, self.grace = fd, handler, grace
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._armed = False
        self._signal = signal.SIGRTMIN + 3

    def start(self) -> None:
        if self.fd < 0 or self._thread is not None or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(self._signal, self._on_signal)
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, name="python-call-watch", daemon=True)
        self._thread.start()

    def _fast_call(self) -> bool:
        """Whether the fast path (``_serve.c``) runs a function now: it has no ``SessionHandler.call`` frame."""
        fast = self.handler.fast
        return fast is not None and fast.calling

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._armed and (_in_call(frame) or self._fast_call()):
            self._armed = False
            raise CallCancelledError(
                f"the function was stopped: it ran past the {self.grace:g} s grace period after the client cancelled it")

    def _python_call_running(self) -> bool:
        if ffi._shim is not None and ffi._shim.wb_guard_running():  # a native kernel: CallWatch's
            return False
        return self._fast_call() or _in_call(sys._current_frames().get(self._main))

    def _run(self) -> None:
        since = None
        while not self._stop.wait(0.1):
            if not self._python_call_running():
                since = None
                self._armed = False
                continue
            try:
                pending = bool(select.select([self.fd], [], [], 0)[0])
            except (OSError, ValueError):  # the connection is closing
                return
            now = time.monotonic()
            if not pending:
                since = None
            elif since is None:
                since = now
            elif now - since >= self.grace:
                self._armed = True
                signal.pthread_kill(self._main, self._signal)
                since = now  # again after another grace period if the function did not stop

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)


class EndReport:
    """How a forked worker tells its parent that it ended the session on purpose.

    An exit status cannot say it: a kernel may call ``exit(86)`` or ``_exit(0)``.
    One byte of memory shared across the fork (no file descriptor) holds the
    worker's exit code when it ends on purpose, and stays 0 when it dies.
    """

    __slots__ = ("_page",)

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, 2)  # anonymous, MAP_SHARED: the child's writes reach the parent

    def exit(self, code: int) -> None:
        """End this (worker) process with ``code``, reported as on purpose."""
        self._page[0] = code
        os._exit(code)

    def ended_on_purpose(self) -> bool:
        return self._page[0] != 0

    @property
    def page(self) -> mmap.mmap:
        """Byte 1: 1 while the worker serves a request (``serve_requests``), for the server to see it busy."""
        return self._page

    def busy(self) -> bool:
        return self._page[1] != 0

    def close(self) -> None:
        self._page.close()


def _exit(code: int, report: EndReport | None) -> None:
    if report is not None:
        report.exit(code)
    os._exit(code)


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
    """Run the server side of the handshake, blocking; return the client's CONNECT options.

    ``accept(options)`` gives the session info sent with OK (by default this
    device's), or raises an RPCError to refuse. Refusals are sent to the
    client as an ERROR frame and raised here. (The server process runs the
    same checks without blocking: ``serve.Handshake``.)
    """
    from ...errors import ProtocolError

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
    chan.send_frame(Kind.HELLO, hello(nonce, token))
    try:
        frame = chan.recv_frame()
        if frame.bulk_len:
            chan.discard_bulk(frame.bulk_len)  # a bulk part on CONNECT means nothing: dropped
    except ConnectionClosedError:
        raise
    except RPCError as exc:
        _refuse(chan, exc)
    try:
        opts = check_connect(frame.kind, frame.ctrl, nonce, key=key, token=token, matchkey=matchkey)
        info = accept(opts) if accept else dict(device_info(), key=key, session_timeout=opts["timeout"])
    except RPCError as exc:
        _refuse(chan, exc)
    if opts["proof"] is not None:
        info = dict(info, proof=opts["proof"])
    chan.send_frame(Kind.OK, info)
    return opts


def serve_requests(
    chan: Channel,
    handler: SessionHandler,
    send_lock: threading.Lock | None = None,
    activity: list[int] | None = None,
    busy: mmap.mmap | None = None,
) -> None:
    """Answer requests until the client closes the connection.

    ``activity[0]`` (for ``IdleTimer``) is odd while waiting for a request and
    even while serving one; ``busy[1]`` (the worker's ``EndReport`` page) is 1
    while serving one, for the server to tell an idle session from a busy one.
    """
    lock = send_lock or threading.Lock()
    recv_frame, send_frame, handle = chan.recv_frame, chan.send_frame, handler.handle
    crashes = CrashCounter()
    handler.cancel_pending = chan.cancel_pending  # TIME_EVAL polls it between repeats (docs/protocol.md section 12)
    fast = fast_server(chan, handler, lock, activity, busy)
    handler.fast = fast
    if fast is not None:  # it serves plain calls itself, counting activity and busy as below, and returns the rest
        recv_frame, activity, busy = fast.next_request, None, None
    while True:
        if activity is not None:
            activity[0] += 1
        if busy is not None:
            busy[1] = 0
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
        if activity is not None:
            activity[0] += 1
        if busy is not None:
            busy[1] = 1
        kind, flags, ctrl, bulk_len = frame
        bulk = Bulk(bulk_len, chan.recv_bulk_into, chan.discard_bulk, chan.recv_bulk_to_fd) if bulk_len else None
        try:
            reply = handle(kind, ctrl, bulk)
        except ConnectionClosedError:
            return
        except Exception as exc:
            if flags & FLAG_NO_REPLY:
                if kind != _CANCEL:  # a CANCEL that crossed its request's reply: nothing to cancel
                    log.warning("request %s failed: %s", kind, exc)
                continue
            if isinstance(exc, KernelCrashedError) and crashes.crashed():
                log.warning("ending the session: %s", exc)
                with lock:
                    send_frame(Kind.ERROR, [int(ErrorCode.WORKER_DIED), crash_loop_notice(exc)])
                return
            if not isinstance(exc, (RPCError, OSError)):  # the client gets no traceback of the server's: the log does
                log.warning("request %s failed", kind, exc_info=exc)
            with lock:
                send_frame(Kind.ERROR, [int(code_of(exc)), error_text(exc)])
            continue
        if flags & FLAG_NO_REPLY:
            continue
        with lock:
            try:
                if type(reply) is Reply:
                    send_frame(_OK, reply.value, reply.bulk, file=reply.file)
                else:
                    send_frame(_OK, reply)
            except (TypeError, OverflowError, ValueError) as exc:  # cannot be encoded: fails before anything is sent
                why = "an int over 64 bits" if isinstance(exc, OverflowError) else exc
                send_frame(Kind.ERROR, [int(ErrorCode.BAD_REQUEST), f"the function returned a value that cannot be "
                                        f"sent back ({why}); return numbers that fit in 64 bits, strings, bytes, "
                                        f"tensors or lists of them"])
            finally:
                if type(reply) is Reply and reply.file:
                    reply.file[0].close()


def fast_server(chan: Channel, handler: SessionHandler, lock: threading.Lock, activity: list[int] | None,
                busy: mmap.mmap | None) -> Any:
    """The C fast path for plain calls on ``chan`` (``_serve.Server``, see ``_serve.c``), or None where it does
    not apply: switched off (``WORKBENCH_SERVER_FASTPATH=0``), not built, or a connection that is not a plain
    blocking socket (a pipe, a socket with a timeout: the server's ``timeout=``)."""
    if _fastpath is None or os.environ.get(FASTPATH_ENV, "1") == "0":
        return None
    sock = getattr(chan, "sock", None)
    if type(chan) is not SocketChannel or type(sock) is not socket.socket or sock.gettimeout() is not None:
        return None
    try:
        spin_us = int(os.environ.get(SPIN_ENV) or DEFAULT_SPIN_US)
    except ValueError:
        log.warning("%s=%r is not a whole number of microseconds; using %d", SPIN_ENV, os.environ[SPIN_ENV],
                    DEFAULT_SPIN_US)
        spin_us = DEFAULT_SPIN_US
    # it reads the handler's objects (handles to functions and tensors) and the device sync list in place
    return _fastpath.Server(sock.fileno(), chan, handler._objects, DeviceTensor, device_api.SYNC, lock, activity,
                            busy, CallOutcome, spin_us)


def _notify_and_exit(chan: Channel, lock: threading.Lock, message: str, on_expire: Callable[[], None],
                     report: EndReport | None) -> None:
    if lock.acquire(timeout=2.0):
        try:
            chan.send_frame(Kind.ERROR, [int(ErrorCode.SESSION_TIMEOUT), message])
        except OSError:
            pass
    on_expire()
    _exit(EXIT_TIMED_OUT, report)


class Watchdog:
    """Ends the session when ``session_timeout`` expires, even inside a kernel that never returns."""

    def __init__(self, seconds: float, chan: Channel, send_lock: threading.Lock, on_expire: Callable[[], None],
                 report: EndReport | None = None):
        self.seconds = seconds
        self._chan = chan
        self._lock = send_lock
        self._on_expire = on_expire
        self._report = report
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        _notify_and_exit(self._chan, self._lock, (
            f"session timed out after {self.seconds:g} s (session_timeout={self.seconds:g}); "
            "the server ended it: connect again, with a larger session_timeout if needed"
        ), self._on_expire, self._report)

    def cancel(self) -> None:
        self._timer.cancel()


class IdleTimer:
    """Ends the session when the client has sent no request for ``seconds`` (a running request is not idle).

    It reads the counter ``serve_requests`` keeps (odd: waiting for a request),
    a few times per period: no system call on the request path.
    """

    def __init__(self, seconds: float, chan: Channel, send_lock: threading.Lock, on_expire: Callable[[], None],
                 report: EndReport | None = None):
        self.seconds = seconds
        self.activity = [0]
        self._chan, self._lock, self._on_expire, self._report = chan, send_lock, on_expire, report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idle-timer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = min(max(self.seconds / 8, 0.01), 1.0)
        seen, since = -1, time.monotonic()
        while not self._stop.wait(step):
            now, count = time.monotonic(), self.activity[0]
            if count != seen or not count & 1:
                seen, since = count, now
            elif now - since >= self.seconds:
                _notify_and_exit(self._chan, self._lock, (
                    f"the session was idle for {self.seconds:g} s (the server's idle_timeout) and the server "
                    "ended it: connect again"
                ), self._on_expire, self._report)

    def cancel(self) -> None:
        self._stop.set()


def session_info(opts: dict[str, Any], *, key: str, sock: socket.socket | None,
                 workspace: Workspace | None = None) -> tuple[dict[str, Any], socket.socket | None]:
    """The OK reply's session info for accepted CONNECT options, and for rpc.Connect (rpc.PopenSession) the
    inner session's socket."""
    ctor = opts.get("ctor")
    if ctor and ctor[0] in ("rpc.Connect", "rpc.PopenSession"):
        if sock is None:
            raise UnsupportedError(f"{ctor[0]} needs a network session; this one runs over pipes")
        if ctor[0] == "rpc.PopenSession":
            return popen_inner(sock, int(opts.get("program_bytes") or 0), workspace, opts["timeout"])[::-1]
        return connect_inner(ctor, opts["timeout"])[::-1]
    return dict(device_info(), key=key, session_timeout=opts["timeout"]), None


def popen_inner(sock: socket.socket, size: int, workspace: Workspace | None,
                session_timeout: float) -> tuple[socket.socket, dict[str, Any]]:
    """Run the program of ``["rpc.PopenSession", program]`` (the ``size`` bytes after CONNECT on ``sock``) in the
    session workspace, served over a socket pair as its stdin and stdout, as TVM's server does; return the socket
    to it and its session info. The program ends when the session does (its socket closes; it is killed then)."""
    import stat
    import subprocess

    if workspace is None:
        raise UnsupportedError("rpc.PopenSession needs a session workspace")
    what = "rpc.PopenSession's program"
    workspace.check_room((f"{what} ({format_size(size)})", what), size, 1)  # refused: the session ends unread
    path = workspace.private_path("popen-program")
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = sock.recv(min(left, 1 << 20))
            if not chunk:
                raise ConnectionClosedError("the client closed the connection while sending its program")
            f.write(chunk)
            left -= len(chunk)
    workspace.charge_private(path, what)
    os.chmod(path, stat.S_IRWXU)
    ours, theirs = socket.socketpair()
    try:
        # its temporary files (a minrpc's own workspace) go inside this session's: removed with it
        env = dict(os.environ, TMPDIR=workspace.private)
        proc = subprocess.Popen([path], stdin=theirs, stdout=theirs, cwd=workspace.root, env=env,
                                start_new_session=True)
    except OSError as exc:
        ours.close()
        raise RemoteError(f"rpc.PopenSession: cannot start the program: {exc.strerror or exc} (is it an executable "
                          "for this server's machine?)") from None
    finally:
        theirs.close()
    try:
        from ..wire.handshake import client_handshake

        info = client_handshake(SocketChannel(ours), "rpc.PopenSession's program", session_timeout=session_timeout,
                                deadline=time.monotonic() + HANDSHAKE_TIMEOUT_S)
    except BaseException:
        ours.close()
        _end_program(proc)
        raise
    ours.settimeout(None)
    _PROGRAMS.append(proc)
    return ours, info


_PROGRAMS: list[Any] = []  # rpc.PopenSession programs this worker started: ended with its session (serve_accepted)


def _end_program(proc: Any) -> None:
    """Give an rpc.PopenSession program that saw its session end a moment to exit, then kill what is left."""
    try:
        proc.wait(timeout=2.0)
    except Exception:  # noqa: BLE001  (subprocess.TimeoutExpired)
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def serve_accepted(
    chan: Channel,
    workspace: Workspace,
    opts: dict[str, Any],
    *,
    key: str = "",
    system_libs: list[NativeLibrary] | None = None,
    sock: socket.socket | None = None,
    io_timeout: float | None = None,
    idle_timeout: float | None = None,
    report: EndReport | None = None,
    quotas: Quotas | None = None,
) -> int:
    """Serve a session whose CONNECT the server accepted (``check_connect``): send OK, then answer requests.

    Returns the exit code for the worker: EXIT_CLEAN, EXIT_REFUSED (rpc.Connect
    could not open the inner session) or EXIT_LOST. The workspace is removed.
    """
    inner = None
    try:
        if quotas is not None:
            workspace.set_quotas(quotas)  # (rpc.PopenSession's program counts too)
        try:
            info, inner = session_info(opts, key=key, sock=sock, workspace=workspace)
        except RPCError as exc:
            log.info("session refused: %s", exc)
            try:
                chan.send_frame(Kind.ERROR, [int(exc.code), str(exc)])
            except OSError:
                pass
            return EXIT_REFUSED
        if opts.get("proof") is not None:
            info["proof"] = opts["proof"]
        if opts.get("protocol") == TVM_PROTOCOL:  # TVM's client (the server read its handshake): tvm_session.py
            from .tvm_session import accept_tvm_session

            chan = accept_tvm_session(sock)
        else:
            chan.send_frame(Kind.OK, info)
        return _serve(chan, workspace, opts, system_libs=system_libs, sock=sock, io_timeout=io_timeout,
                      idle_timeout=idle_timeout, report=report, inner=inner, quotas=quotas)
    except OSError as exc:
        return EXIT_LOST if exc.errno == errno.EBADF else EXIT_CLEAN
    finally:
        if inner is not None:
            inner.close()
        while _PROGRAMS:
            _end_program(_PROGRAMS.pop())
        workspace.cleanup()
        shutdown(sock)


def _serve(
    chan: Channel,
    workspace: Workspace,
    opts: dict[str, Any],
    *,
    system_libs: list[NativeLibrary] | None,
    sock: socket.socket | None,
    io_timeout: float | None,
    idle_timeout: float | None,
    report: EndReport | None,
    inner: socket.socket | None,
    quotas: Quotas | None = None,
) -> int:
    """After the OK: relay to the inner server (rpc.Connect), or answer requests; the worker's exit code."""
    if inner is not None:
        sock.settimeout(None)
        relay(sock, inner)
        return EXIT_CLEAN
    if sock is not None:
        sock.settimeout(io_timeout)
    handler = SessionHandler(workspace, system_libs, quotas)
    lock = threading.Lock()
    timers: list[Watchdog | IdleTimer] = []
    fd = sock.fileno() if sock is not None else getattr(chan, "read_fd", -1)
    watch, python_watch = CallWatch(fd), PythonCallWatch(fd, handler)
    handler.on_native_function, handler.on_python_function = watch.start, python_watch.start

    def expire() -> None:
        workspace.cleanup()
        shutdown(sock)

    try:
        if opts["timeout"] > 0:
            timers.append(Watchdog(opts["timeout"], chan, lock, expire, report))
        activity = None
        if idle_timeout:
            idle = IdleTimer(idle_timeout, chan, lock, expire, report)
            timers.append(idle)
            activity = idle.activity
        try:
            busy = report.page if report is not None else None
            if opts.get("protocol") == TVM_PROTOCOL:
                from .tvm_session import serve_tvm_requests

                serve_tvm_requests(chan, handler, lock, activity, busy, CrashCounter(), crash_loop_notice)
            else:
                serve_requests(chan, handler, lock, activity, busy)
        except OSError as exc:  # socket timeout (the server's timeout=), a reset, or the fd closed under us
            if exc.errno == errno.EBADF:
                log.warning("the session's connection was closed by the code it ran")
                return EXIT_LOST
            log.info("session ended: %s", exc)
        return EXIT_CLEAN
    finally:
        watch.stop()
        python_watch.stop()
        for timer in timers:
            timer.cancel()
        handler.close()


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
    idle_timeout: float | None = None,
    report: EndReport | None = None,
    quotas: Quotas | None = None,
) -> int:
    """Handshake (blocking) and serve one session on ``chan``; return the worker's exit code.

    EXIT_REFUSED when the handshake failed, EXIT_LOST when the connection was
    closed under the worker, else EXIT_CLEAN. The workspace is removed at the end.
    """
    inner: list[socket.socket] = []

    def accept(opts: dict[str, Any]) -> dict[str, Any]:
        info, inner_sock = session_info(opts, key=key, sock=sock)
        if inner_sock is not None:
            inner.append(inner_sock)
        return info

    try:
        if sock is not None:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            opts = server_handshake(chan, key=key, token=token, matchkey=matchkey, accept=accept)
        except (RPCError, OSError) as exc:
            log.info("handshake refused: %s", exc)
            return EXIT_REFUSED
        hide_from_kernels(token, os.environ.get(REGISTRATION_TOKEN_ENV), worker=True)  # the handshake is done
        try:
            return _serve(chan, workspace, opts, system_libs=system_libs, sock=sock, io_timeout=io_timeout,
                          idle_timeout=idle_timeout, report=report, inner=inner[0] if inner else None, quotas=quotas)
        except OSError as exc:
            return EXIT_LOST if exc.errno == errno.EBADF else EXIT_CLEAN
    finally:
        for s in inner:
            s.close()
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
    """Open the session that ``["rpc.Connect", url, port, key, token]`` names; return its socket and info.

    The inner session authenticates with the token in ``ctor`` (the client's),
    never with this server's own: a server must not answer other hosts'
    challenges with its token.
    """
    from ..wire.handshake import client_handshake
    from ..wire.handshake import check_constructor, connect_token

    check_constructor(ctor)
    url, port = ctor[1], ctor[2]
    inner_key = ctor[3] if len(ctor) > 3 and isinstance(ctor[3], str) else ""
    inner_token = connect_token(ctor)
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    try:
        inner = socket.create_connection((url, port), timeout=HANDSHAKE_TIMEOUT_S)
    except OSError as exc:
        raise RemoteNotFoundError(f"rpc.Connect: cannot reach {url}:{port} from this server: {exc.strerror or exc}") from None
    try:
        info = client_handshake(SocketChannel(inner), f"{url}:{port}", key=inner_key,
                                session_timeout=session_timeout, token=inner_token, deadline=deadline)
    except BaseException:
        inner.close()
        raise
    inner.settimeout(None)
    return inner, info


def load_libraries(paths: list[str] | None) -> list[NativeLibrary]:
    """Open the server's --load-library files (RTLD_GLOBAL, for system_lib())."""
    return [NativeLibrary(os.path.abspath(path), global_scope=True) for path in paths or []]


def worker_signals() -> None:
    """Signal dispositions of a session worker: default for SIGTERM/SIGINT; SIGXFSZ ignored, so a write
    over a file-size limit fails with EFBIG (an error reply) instead of killing the session."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def serve_stdio(workspace: Workspace, **session_args: Any) -> int:
    """Serve one session on stdin/stdout from a forked worker, and report its death if it crashes."""
    out = os.dup(1)
    os.dup2(2, 1)  # a kernel's printf must not corrupt the protocol stream
    chan = PipeChannel(0, out)
    report = EndReport()
    pid = os.fork()
    if pid == 0:
        try:
            worker_signals()
            code = run_session(chan, workspace, report=report, **session_args)
        except BaseException:
            log.exception("session worker failed")
            os._exit(1)
        _exit(code, report if code in ENDED_ON_PURPOSE else None)
    notice = death_notice(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), report.ended_on_purpose())
    if notice:
        try:
            chan.send_frame(Kind.ERROR, [int(ErrorCode.WORKER_DIED), notice])
        except OSError:
            pass
    workspace.cleanup()
    return EXIT_CLEAN


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.rpc.server.worker", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stdio", action="store_true", help="serve one session on stdin/stdout")
    mode.add_argument("--fd", type=int, help="serve one accepted session on this inherited socket fd "
                                             "(its CONNECT options come as JSON on stdin)")
    parser.add_argument("--workspace", help="session directory (default: a new temporary one)")
    parser.add_argument("--key", default="")
    parser.add_argument("--load-library", action="append", default=[])
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--idle-timeout", type=float, default=None)
    parser.add_argument("--init", default=None, help="module:function to call before serving")
    parser.add_argument("--max-workspace-bytes", default=None, metavar="SIZE",
                        help=f"a session's workspace quota (default {format_size(DEFAULT_WORKSPACE_BYTES)}; 0: none)")
    parser.add_argument("--max-workspace-files", default=None, metavar="N",
                        help=f"files and directories a session's workspace may hold (default {DEFAULT_WORKSPACE_FILES})")
    parser.add_argument("--max-tensor-bytes", default=None, metavar="SIZE",
                        help="memory a session's tensors may take (default: half the machine's memory; 0: none)")
    args = parser.parse_args(argv)
    try:
        quotas = Quotas.resolve(args.max_workspace_bytes, args.max_workspace_files, args.max_tensor_bytes, flags=True)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.init:
        from .server import resolve_callable

        resolve_callable(args.init)()
    libs = load_libraries(args.load_library)
    workspace = Workspace(args.workspace)
    worker_signals()
    if args.stdio:
        token = os.environ.get(TOKEN_ENV) or None
        return serve_stdio(workspace, key=args.key, token=token, system_libs=libs, idle_timeout=args.idle_timeout,
                           quotas=quotas)
    hide_from_kernels(worker=True, always=True)  # the server's worker (no_fork): its tokens were never here
    accepted = json.loads(sys.stdin.readline())
    opts = dict(accepted, proof=bytes.fromhex(accepted["proof"]) if accepted.get("proof") else None)
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    code = serve_accepted(SocketChannel(sock), workspace, opts, key=args.key, system_libs=libs, sock=sock,
                          io_timeout=args.timeout, idle_timeout=args.idle_timeout, quotas=quotas)
    sock.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
