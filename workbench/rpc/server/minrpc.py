"""minrpc from Python: ``MinRPCServer`` (the native server in its own process) and ``with_minrpc``.

    >>> from workbench import rpc
    >>> server = rpc.MinRPCServer(port=0)                        # host build  # doctest: +SKIP
    >>> board = rpc.MinRPCServer(target="aarch64")               # under qemu-aarch64  # doctest: +SKIP
    >>> remote = rpc.connect("127.0.0.1", board.port)            # doctest: +SKIP
    >>> fcompile = rpc.with_minrpc("gcc")                        # doctest: +SKIP
    >>> mod.export_library("server", fcompile=fcompile)          # doctest: +SKIP
    >>> remote = rpc.PopenSession("./server")                    # its kernels: remote.system_lib()  # doctest: +SKIP

minrpc is the C server of ``workbench/native/minrpc``: one process that
forks a worker per session, speaks docs/protocol.md, and needs no Python on
the device. ``workbench.native.build_minrpc`` builds (and caches) it.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import re
import selectors
import shlex
import signal
import subprocess
import threading
import time
import weakref
from typing import Any, Callable, Sequence

from ..wire.handshake import TOKEN_ENV, check_seconds
from ..tracker.registration import REGISTRATION_TOKEN_ENV, check_token
from .server import PREEMPT_IDLE_S, check_max_sessions, check_quotas

log = logging.getLogger("workbench.rpc.minrpc")

START_TIMEOUT_S = 30.0  # until the server prints its listening line (qemu start-up included)
STOP_TIMEOUT_S = 10.0  # after SIGTERM, before SIGKILL (the server ends its sessions in 1.5 s at most)
STDERR_TAIL = 40  # lines of the server's log kept for error messages
LISTENING_RE = re.compile(r"^minrpc listening on (\S+):(\d+)\s*$")
POPEN_SERVERS = ("posix_popen_server",)
TVM_RUNTIMES = ("libtvm", "libtvm_runtime", "libtvm.so", "libtvm_runtime.so")
PR_SET_PDEATHSIG = 1


class MinRPCServer:
    """The minrpc C server in its own process, for this machine or, under qemu-user, for another architecture.

    Parameters follow :class:`workbench.rpc.Server`: ``port=0`` takes any free
    port, else ports ``port`` to ``port_end`` (exclusive) are tried; with
    ``tracker_addr`` the server registers under ``key``. ``target`` is
    ``"host"`` or a board to emulate: ``"aarch64"``, ``"armhf"``, a triple or a
    TVM target; the server is then cross-compiled and run under
    ``qemu-<arch> -L /usr/<triple>``, and links ``.tar`` modules with the
    target's cross compiler (``cc``, default ``<triple>-gcc``). A missing
    emulator or cross compiler raises ``EmulatorNotFoundError`` naming the
    Debian packages. ``binary`` runs a minrpc you built yourself
    (``build_minrpc``, ``with_minrpc``) instead.

    Limits as ``rpc.Server``'s: ``max_sessions``, ``idle_timeout``,
    ``handshake_timeout``, ``preempt_idle`` (a session idle this long yields its
    slot when the server is full; None: never) and the per-address share, and
    the per-session quotas ``max_workspace_bytes``, ``max_workspace_files`` and
    ``max_tensor_bytes`` (None: minrpc's defaults, the same as ``rpc.Server``'s;
    0: no limit).

    The server also serves apache-tvm's own RPC client (``tvm.rpc.connect``, a
    tracker's ``request``; docs/protocol.md section 13). TVM's client cannot
    prove a token: a server with ``auth_token`` refuses it and says so, unless
    ``allow_tvm_clients=True`` (``--allow-tvm-clients``) lets it in without one.

    ``auth_token`` (None: ``$WORKBENCH_RPC_TOKEN``) and ``registration_token``
    (None: ``$WORKBENCH_REGISTRATION_TOKEN``) reach the server through its
    environment, never its command line. The process ends on
    ``terminate()``, when this object is collected, when this process exits,
    and (when started from the main thread) when this process dies; its
    session workers go with it. Its log goes to the ``workbench.rpc.minrpc``
    logger; a server that fails to start raises with the end of that log.

        >>> with MinRPCServer(target="aarch64", key="board") as board:     # doctest: +SKIP
        ...     remote = rpc.connect("127.0.0.1", board.port, key="board")
        ...     remote.info["arch"]
        'aarch64'
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        port_end: int | None = None,
        key: str = "",
        tracker_addr: tuple[str, int] | None = None,
        custom_addr: str | None = None,
        target: Any = "host",
        cc: str | None = None,
        silent: bool = True,
        *,
        binary: str | os.PathLike | None = None,
        auth_token: str | None = None,
        registration_token: str | None = None,
        max_sessions: int | None = None,
        idle_timeout: float | None = None,
        handshake_timeout: float | None = None,
        start_timeout: float = START_TIMEOUT_S,
        preempt_idle: float | None = PREEMPT_IDLE_S,
        max_workspace_bytes: int | str | None = None,
        max_workspace_files: int | None = None,
        max_tensor_bytes: int | str | None = None,
        allow_tvm_clients: bool = False,
    ):
        from ...cc.targets import parse_target
        from ...native import build_minrpc
        from ...native.qemu import find_emulator, normalize_triple

        self.host = host
        self.key = key or ""
        spec = parse_target(normalize_triple(target) if isinstance(target, str) else target)
        self.emulator = None if spec.is_host else find_emulator(spec.triple)  # raises naming the packages
        self.target = spec.triple
        self.binary = os.path.abspath(os.fspath(binary)) if binary is not None else build_minrpc(spec.triple)
        if not os.path.isfile(self.binary):
            raise FileNotFoundError(f"MinRPCServer: no such minrpc binary {self.binary!r}")
        device_cc = cc if cc is not None else (self.emulator.compiler if self.emulator else None)
        args = ["--host", host, "--port", str(int(port))]
        if port_end is not None and int(port) != 0:
            args += ["--port-end", str(int(port_end))]
        if self.key:
            args += ["--key", self.key]
        if tracker_addr is not None:
            args += ["--tracker", f"{tracker_addr[0]}:{int(tracker_addr[1])}"]
        if custom_addr:
            args += ["--custom-addr", custom_addr]
        if device_cc:
            args += ["--cc", device_cc]
        sessions = check_max_sessions(max_sessions)
        if sessions is not None:
            args += ["--max-sessions", str(sessions)]
        for flag, name, value in (("--idle-timeout", "idle_timeout", idle_timeout),
                                  ("--handshake-timeout", "handshake_timeout", handshake_timeout)):
            seconds = check_seconds(name, value)
            if seconds is not None:
                args += [flag, f"{seconds:g}"]
        preempt = check_seconds("preempt_idle", preempt_idle)
        args += ["--preempt-idle", f"{preempt:g}" if preempt is not None else "0"]
        for option, value in check_quotas(max_workspace_bytes, max_workspace_files, max_tensor_bytes).items():
            if value is not None:
                args += ["--" + option.replace("_", "-"), str(value)]
        if allow_tvm_clients:
            args.append("--allow-tvm-clients")
        if silent:
            args.append("--silent")
        self.command = self.emulator.command(self.binary, *args) if self.emulator else [self.binary, *args]
        env = dict(os.environ)
        for var, value, name in ((TOKEN_ENV, auth_token, "auth_token"),
                                 (REGISTRATION_TOKEN_ENV, registration_token, "registration_token")):
            if value is not None:
                token = check_token(name, value)
                if token:
                    env[var] = token
                else:
                    env.pop(var, None)
        self._log = collections.deque(maxlen=STDERR_TAIL)
        self._proc = _start(self.command, env)
        self._pump = _Pump(self._proc, self._log, f"minrpc[{self._proc.pid}]")
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._pump)
        try:
            self.port = self._wait_listening(start_timeout)
        except BaseException:
            self.terminate()
            raise

    def _wait_listening(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            line = self._pump.next_stdout_line(max(0.0, deadline - time.monotonic()))
            if line is None:
                break
            match = LISTENING_RE.match(line)
            if match:
                self.host = match.group(1).strip("[]")
                return int(match.group(2))
            log.debug("minrpc stdout before listening: %s", line.rstrip())
        code = self._proc.poll()
        if code is None and self._pump.stdout_closed:
            # its stdout closes as it exits, a moment before its status can be collected
            try:
                code = self._proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        if code is None:
            why = f"did not say it was listening within {timeout:g} s"
        else:
            self._pump.join(1.0)  # the rest of its stderr
            why = f"exited with status {code}" if code >= 0 else f"was killed by signal {-code}"
        tail = "\n".join(self._log).strip() or "(nothing on its stderr)"
        raise RuntimeError(f"the minrpc server ({self.target}) {why}: {shlex.join(self.command)}\n{tail}")

    @property
    def pid(self) -> int:
        """The server's process id (qemu's, for an emulated board)."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def log_tail(self) -> list[str]:
        """The last lines the server wrote to its stderr."""
        return list(self._log)

    def terminate(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and every process it started."""
        self._finalizer()

    def __enter__(self) -> "MinRPCServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()

    def __repr__(self) -> str:
        board = f" under {os.path.basename(self.emulator.qemu)}" if self.emulator else ""
        state = "running" if self.alive else "stopped"
        return (f"<rpc.MinRPCServer {self.host}:{getattr(self, 'port', '?')} key={self.key!r} "
                f"target={self.target}{board} {state}>")


def _death_signal() -> Callable[[], None] | None:
    """A preexec_fn that ends the child when this process dies (Linux), when called from the main thread.

    PR_SET_PDEATHSIG fires when the *thread* that started the child ends, so a
    server started from another thread is ended by terminate()/GC/exit only.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call
            os._exit(1)

    return preexec


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    try:
        return subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            start_new_session=True,  # its own process group (ended with it); Ctrl-C reaches the owner only
            preexec_fn=_death_signal(),
        )
    except OSError as exc:
        raise OSError(f"cannot start minrpc ({shlex.join(command)}): {exc.strerror or exc}") from None


class _Pump(threading.Thread):
    """Reads the server's stdout and stderr until both close: stdout lines are queued for the owner, stderr
    lines logged (and the last ones kept for errors)."""

    def __init__(self, proc: subprocess.Popen, tail: collections.deque, name: str):
        super().__init__(name=f"{name} log", daemon=True)
        self._proc = proc
        self._tail = tail
        self._stdout: collections.deque[str] = collections.deque(maxlen=64)
        self._cond = threading.Condition()
        self._closed = False
        self.start()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        buffers: dict[int, bytes] = {}
        for stream in (self._proc.stdout, self._proc.stderr):
            sel.register(stream, selectors.EVENT_READ)
            buffers[stream.fileno()] = b""
        try:
            while sel.get_map():
                for key, _ in sel.select():
                    fd = key.fileobj.fileno()
                    try:
                        data = os.read(fd, 65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(key.fileobj)
                        if buffers[fd]:
                            self._line(key.fileobj, buffers[fd])
                        continue
                    *lines, buffers[fd] = (buffers[fd] + data).split(b"\n")
                    for line in lines:
                        self._line(key.fileobj, line)
                    if len(buffers[fd]) > 65536:  # a line without end: cut it
                        self._line(key.fileobj, buffers[fd])
                        buffers[fd] = b""
        finally:
            sel.close()
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _line(self, stream: Any, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        if stream is self._proc.stdout:
            with self._cond:
                self._stdout.append(text)
                self._cond.notify_all()
        elif text.strip():
            self._tail.append(text)
            lowered = text.lower()
            level = logging.WARNING if ("error" in lowered or "warning" in lowered) else logging.INFO
            log.log(level, "%s", text if text.startswith("minrpc") else f"{self.name[:-4]}: {text}")

    @property
    def stdout_closed(self) -> bool:
        with self._cond:
            return self._closed

    def next_stdout_line(self, timeout: float) -> str | None:
        """The next line the server printed on stdout, or None (closed, or nothing within ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._stdout:
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return self._stdout.popleft()


def _stop(proc: subprocess.Popen, pump: _Pump) -> None:
    """SIGTERM, SIGKILL after STOP_TIMEOUT_S; then whatever is left of its process group (session workers, a
    linker) is killed before the server is reaped, so the group id cannot have been reused."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            _wait_no_reap(proc.pid, STOP_TIMEOUT_S)
        except OSError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group of start_new_session; the leader may be a zombie
    except OSError:
        pass
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    pump.join(2.0)
    for stream in (proc.stdout, proc.stderr):
        try:
            stream.close()
        except OSError:
            pass


def _wait_no_reap(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` (our child) has exited, without reaping it; True if it did within ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# -- with_minrpc ------------------------------------------------------------------------------
def with_minrpc(
    compile_func: str | Callable[..., Any] | None = "host",
    server: str = "posix_popen_server",
    runtime: str = "libtvm",
) -> Callable[..., str]:
    """Wrap a compile function so ``export_library`` builds a program that embeds the minrpc server.

    The program serves one session over its stdin/stdout: run it with
    ``rpc.PopenSession(path)`` (an emulated one with
    ``rpc.PopenSession(find_emulator("aarch64").command(path))``); the kernels
    linked into it are the session's ``remote.system_lib()``.
    ``compile_func`` names the compiler: ``"host"``, a compiler command
    (``"gcc"``, ``"aarch64-linux-gnu-gcc"``), a triple or TVM target, an
    fcompile of ``cc.cross_compiler`` (its triple), or a function
    ``f(output, files, options=None)`` that links an executable from objects,
    such as TVM's ``tvm.contrib.cc.create_executable`` (g++): minrpc's C
    sources are compiled by the C compiler of the triple the function's
    ``get_target_triple()`` reports, or the host's. ``server`` is TVM's name of the one kind there is,
    ``"posix_popen_server"``; ``runtime`` is accepted with TVM's values
    (the kernels get workbench's kernel runtime, linked in).

        >>> fcompile = with_minrpc("aarch64-linux-gnu")                        # doctest: +SKIP
        >>> cc.build(ADD_ONE_C, target="aarch64-linux-gnu").export_library("prog", fcompile=fcompile)  # doctest: +SKIP
        >>> tvm_lib.export_library("prog", fcompile=with_minrpc("gcc"))          # doctest: +SKIP
    """
    from ...cc.compiler import _is_compiler_command, _options, create_shared, create_tar
    from ...native import MINRPC_LIBS, build_minrpc, minrpc_objects, resolve_compiler

    if server not in POPEN_SERVERS:
        raise ValueError(
            f"with_minrpc: server={server!r} is not available: workbench's minrpc is built as 'posix_popen_server' "
            "(a program run with rpc.PopenSession(path)); for a TCP server use rpc.MinRPCServer"
        )
    if runtime not in TVM_RUNTIMES:
        raise ValueError(f"with_minrpc: runtime={runtime!r} is not one of TVM's ({', '.join(TVM_RUNTIMES[:2])}); "
                         "the program gets workbench's kernel runtime either way")
    call: Callable[..., Any] | None = None
    cc_command: list[str] | None = None
    target: Any = "host"
    if compile_func is None or (isinstance(compile_func, str) and compile_func.strip().lower() == "host"):
        target = "host"
    elif callable(compile_func):
        triple = getattr(compile_func, "get_target_triple", None)
        if compile_func in (create_shared, create_tar):
            target = "host"
        elif getattr(compile_func, "output_format", None) in ("so", "tar") and callable(triple):
            target = triple() or "host"  # a library fcompile (cc.cross_compiler): a program for its triple
        else:
            call = compile_func
    elif isinstance(compile_func, str) and compile_func.strip().lower() == "ndk":
        from ...cc.targets import ndk_compiler

        cc_command = ndk_compiler()
    elif isinstance(compile_func, str) and _is_compiler_command(compile_func):
        cc_command = shlex.split(compile_func)
    else:
        target = compile_func
    if call is None:
        command, triple_name = resolve_compiler(target, cc_command)  # missing compilers fail here, not at export
    else:  # minrpc's C sources are compiled by the C compiler of the triple the function reports (or the host's)
        triple_name = getattr(compile_func, "get_target_triple", lambda: None)() or "host"
        command, triple_name = resolve_compiler(triple_name)

    def fcompile(output: str | os.PathLike, objects: Sequence[str | os.PathLike],
                 options: str | Sequence[str] | None = None) -> str:
        output = os.fspath(output)
        extra = _options(options)
        if call is None:
            return build_minrpc(target, cc=command, objects=[os.fspath(o) for o in objects], output=output,
                                options=extra)
        # the function links: a C++ driver such as TVM's default (g++) would not compile C sources as C
        flags = ["-pthread", "-rdynamic", *extra, *MINRPC_LIBS]
        result = call(output, [os.fspath(o) for o in objects] + minrpc_objects(triple_name), options=flags)
        return os.fspath(result) if isinstance(result, (str, os.PathLike)) else output

    fcompile.__name__ = "with_minrpc"
    fcompile.output_format = "exe"  # type: ignore[attr-defined]
    fcompile.get_target_triple = lambda: triple_name  # type: ignore[attr-defined]
    fcompile.__doc__ = f"export_library compile function: a minrpc program built by {compile_func!r}"
    return fcompile
