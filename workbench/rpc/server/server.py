"""``rpc.Server``: start an RPC server in its own process.

    >>> from workbench import rpc
    >>> server = rpc.Server(port=0)              # any free port
    >>> remote = rpc.connect("127.0.0.1", server.port)
    >>> server.terminate()
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ...runtime.quota import check_count, parse_size
from ..wire.handshake import HANDSHAKE_TIMEOUT_S, check_seconds
from ..tracker.registration import REGISTRATION_TOKEN_ENV, token_or_env
from ..service.process import ServiceHandle


PREEMPT_IDLE_S = 900.0  # 15 min: a session idle this long yields its slot when the server is full (None: never)


def address_share(max_sessions: int) -> int:
    """The sessions one client address may hold: all but a quarter of the slots, kept for other addresses.

        >>> address_share(32), address_share(2)
        (24, 2)
    """
    return max_sessions - max_sessions // 4


def default_max_sessions() -> int:
    """How many sessions a server serves at once unless told (``max_sessions``), sized to this machine.

    16 per CPU, from 16 to 256, at most one per 64 MiB of memory, and at most
    one per 4 file descriptors of the process's limit (the server holds 2 per
    session and keeps room for connections still in their handshake).

        >>> default_max_sessions() >= 2
        True
    """
    import resource

    cpus = os.cpu_count() or 1
    limit = min(max(16 * cpus, 16), 256)
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        limit = min(limit, max(memory // (64 << 20), 2))
    except (ValueError, OSError):
        pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, max((soft - 64) // 4, 2))
    return int(limit)


def check_max_sessions(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_sessions must be an int >= 1 (None: sized to the machine), not {value!r}")
    return value


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 9091
    port_end: int = 9199
    key: str = ""
    load_library: list[str] = field(default_factory=list)
    silent: bool = False
    no_fork: bool = False
    init: str | None = None  # "module:function" called once at start
    reuse_addr: bool = True
    timeout: float | None = None
    token: str | None = None
    tracker_addr: tuple[str, int] | None = None
    is_proxy: bool = False
    custom_addr: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    max_sessions: int | None = None  # None: default_max_sessions() where the server runs
    idle_timeout: float | None = None  # end sessions that send no request for this long (None: never)
    preempt_idle: float | None = PREEMPT_IDLE_S  # a session idle this long gives its slot to a refused client
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S  # for the whole handshake, from accept to CONNECT
    registration_token: str | None = None  # proved to the tracker or proxy this server registers with
    # per-session quotas (workbench.runtime.quota): None the default, 0 no limit
    max_workspace_bytes: int | None = None  # default 4 GiB
    max_workspace_files: int | None = None  # default 10000 files and directories
    max_tensor_bytes: int | None = None  # default half the memory of the machine the server runs on
    allow_tvm_clients: bool = False  # with a token: let TVM's client (which cannot prove one) in all the same


def check_quotas(max_workspace_bytes: object = None, max_workspace_files: object = None,
                 max_tensor_bytes: object = None, *, flags: bool = False) -> dict[str, int | None]:
    """The quota options as ``ServerConfig`` keeps them (bytes; None: the default), or ValueError naming one
    (as a command-line flag with ``flags``).

        >>> check_quotas(max_workspace_bytes="512M")["max_workspace_bytes"]
        536870912
    """
    def name(option: str) -> str:
        return "--" + option.replace("_", "-") if flags else option

    return {
        "max_workspace_bytes": None if max_workspace_bytes is None
        else parse_size(max_workspace_bytes, name("max_workspace_bytes")),
        "max_workspace_files": None if max_workspace_files is None
        else check_count(max_workspace_files, name("max_workspace_files")),
        "max_tensor_bytes": None if max_tensor_bytes is None else parse_size(max_tensor_bytes, name("max_tensor_bytes")),
    }


def callable_spec(func: Callable | str) -> str:
    """``"module:qualname"`` for a function the server process can import."""
    if isinstance(func, str):
        resolve_callable(func)  # fail here, in the caller, not in the server
        return func
    module = getattr(func, "__module__", None)
    qualname = getattr(func, "__qualname__", "")
    if not callable(func) or not module or module == "__main__" or "<" in qualname:
        raise ValueError(
            f"server_init_callback={func!r} cannot be imported by the server process "
            "(functions defined in a notebook, in __main__, or inside another function are not): "
            "move it into a module and pass the function, or pass 'module:function'"
        )
    spec = f"{module}:{qualname}"
    resolve_callable(spec)
    return spec


def resolve_callable(spec: str) -> Callable:
    module_name, _, qualname = spec.partition(":")
    if not qualname:
        raise ValueError(f"{spec!r} is not of the form 'module:function'")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} is not callable")
    return obj


class Server(ServiceHandle):
    """An RPC server in a separate process; each client session runs in its own worker process.

    Parameters follow ``tvm.rpc.Server``. ``port`` is the first port tried, up to
    ``port_end`` (exclusive); ``port=0`` takes any free port. ``host`` defaults to
    127.0.0.1 (pass "0.0.0.0" to serve the network). ``auth_token`` (or
    ``WORKBENCH_RPC_TOKEN``) makes the server accept only clients that know the
    token. ``server_init_callback`` runs once in the server process; it must be
    importable (a module-level function, or ``"module:function"``).

    Limits: ``max_sessions`` sessions at once (None: ``default_max_sessions()``,
    sized to the machine; more are refused with "server busy"), a client must
    finish its handshake within ``handshake_timeout`` seconds, and a session
    whose client sends no request for ``idle_timeout`` seconds is ended (None,
    the default: never; ``LocalFarm`` turns it on). When the server is full, a
    session idle for ``preempt_idle`` seconds (default 15 min; None: never) gives
    its slot to the new client, and its own client is told why; one client
    address holds at most ``address_share(max_sessions)`` sessions (all but a
    quarter of the slots). Each session's workspace holds at most
    ``max_workspace_bytes`` (default 4 GiB) in at most ``max_workspace_files``
    files and directories (default 10000), and its tensors take at most
    ``max_tensor_bytes`` (default half the machine's memory); sizes are bytes or
    strings such as ``"512M"``, 0 is no limit, and a request over a quota is
    refused with ``QuotaExceededError`` (the session goes on). ``timeout`` is TVM's: the
    socket timeout of a session's reads and writes.
    ``registration_token`` (None: ``$WORKBENCH_REGISTRATION_TOKEN``) is what
    the server proves when it registers with ``tracker_addr``, or waits at a
    proxy (``is_proxy``), started with an auth token; with a wrong or missing
    one it logs a warning and keeps retrying.
    TVM's own client (``tvm.rpc.connect``, a tracker's ``request``, MetaSchedule's
    ``RPCRunner``) is served too, told apart by its first bytes; it cannot prove
    a token, so a server with one refuses it (saying why) unless
    ``allow_tvm_clients=True``.
    The server ends with ``terminate()``, when this object is collected, or
    when this process exits. It logs through ``logging`` at this process's
    level for ``workbench`` (nothing below WARNING unless logging was set up);
    ``silent=True`` keeps it to warnings.

        >>> with rpc.Server(port=0, max_sessions=4, idle_timeout=600) as server:  # doctest: +SKIP
        ...     remote = rpc.connect("127.0.0.1", server.port)
    """

    what = "RPC server"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9091,
        port_end: int = 9199,
        is_proxy: bool = False,
        tracker_addr: tuple[str, int] | None = None,
        key: str = "",
        load_library: str | Sequence[str] | None = None,
        custom_addr: str | None = None,
        silent: bool = False,
        no_fork: bool = False,
        server_init_callback: Callable | str | None = None,
        reuse_addr: bool = True,
        timeout: float | None = None,
        *,
        auth_token: str | None = None,
        labels: dict[str, str] | None = None,
        max_sessions: int | None = None,
        idle_timeout: float | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
        registration_token: str | None = None,
        preempt_idle: float | None = PREEMPT_IDLE_S,
        max_workspace_bytes: int | str | None = None,
        max_workspace_files: int | None = None,
        max_tensor_bytes: int | str | None = None,
        allow_tvm_clients: bool = False,
    ):
        if isinstance(load_library, str):
            load_library = [p for p in load_library.replace(",", ":").split(":") if p]
        libs = [os.path.abspath(p) for p in (load_library or [])]
        for lib in libs:
            if not os.path.exists(lib):
                raise FileNotFoundError(f"load_library: no such file {lib!r}")
        self.config = ServerConfig(
            host=host,
            port=int(port),
            port_end=int(port_end),
            key=key or "",
            load_library=libs,
            silent=silent,
            no_fork=no_fork,
            init=callable_spec(server_init_callback) if server_init_callback else None,
            reuse_addr=reuse_addr,
            timeout=timeout,
            token=auth_token if auth_token is not None else (os.environ.get("WORKBENCH_RPC_TOKEN") or None),
            tracker_addr=tuple(tracker_addr) if tracker_addr else None,
            is_proxy=is_proxy,
            custom_addr=custom_addr,
            labels=dict(labels or {}),
            max_sessions=check_max_sessions(max_sessions),
            idle_timeout=check_seconds("idle_timeout", idle_timeout),
            preempt_idle=check_seconds("preempt_idle", preempt_idle),
            handshake_timeout=check_seconds("handshake_timeout", handshake_timeout, allow_none=False),
            registration_token=token_or_env("registration_token", registration_token, REGISTRATION_TOKEN_ENV),
            **check_quotas(max_workspace_bytes, max_workspace_files, max_tensor_bytes),
            allow_tvm_clients=bool(allow_tvm_clients),
        )
        self.host = host
        self.key = key
        self._start("workbench.rpc.server", dataclasses.asdict(self.config))

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<rpc.Server {self.host}:{getattr(self, 'port', '?')} key={self.key!r} {state}>"
