"""``LocalFarm``: a tracker and servers with given keys, all on this machine."""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any, Mapping

from ..errors import RPCError
from ..rpc.client.session import RPCSession
from ..rpc.server.minrpc import MinRPCServer
from ..rpc.server.server import Server
from ..rpc.tracker.tracker import Tracker
from ..rpc.client.tracker_session import TrackerSession, connect_tracker
from ..rpc.tracker.summary import TrackerSummary

log = logging.getLogger("workbench.farm")
READY_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 900.0  # a farm's sessions end after 15 minutes without a request (idle_timeout=None: never)
MINRPC_KEY = "minrpc"  # a key served by minrpc built for this machine
OPENCL_KEY = "opencl"  # Python servers, for sessions that need an OpenCL device (refused where there is none)
# the server options minrpc servers take too; the others are the Python server's own
MINRPC_OPTIONS = frozenset({"idle_timeout", "max_sessions", "handshake_timeout", "auth_token", "custom_addr"})


def minrpc_target(key: str) -> str | None:
    """What a farm key runs: None for the Python server, "host" for ``minrpc``, the triple of an emulated board
    for ``<triple-or-arch>-qemu`` (``aarch64-qemu``, ``armhf-qemu``, ``aarch64-linux-gnu-qemu``).

        >>> minrpc_target("local"), minrpc_target("minrpc"), minrpc_target("aarch64-qemu")
        (None, 'host', 'aarch64-linux-gnu')
    """
    from ..native.qemu import qemu_key_triple

    return "host" if key == MINRPC_KEY else qemu_key_triple(key)


class LocalFarm:
    """A tracker and ``servers[key]`` servers of each key on free loopback ports.

    Most keys get the Python server (``rpc.Server``). The key ``"minrpc"``
    gets the native server built for this machine, and a key
    ``"<arch-or-triple>-qemu"`` (``"aarch64-qemu"``, ``"armhf-qemu"``) an
    emulated board: minrpc cross-compiled for it and run under qemu-user,
    registered with its own triple and architecture, linking ``.tar`` modules
    with the cross compiler. Where qemu, the cross compiler or its C library
    is missing, the constructor raises ``EmulatorNotFoundError`` naming the
    Debian packages, before anything starts.
    The key ``"opencl"`` gets Python servers too, for sessions that need an
    OpenCL device (``remote.cl(0)``): where this machine has none, the
    constructor raises DeviceNotFoundError naming the Debian packages of PoCL.

    The constructor returns once every server is registered; everything ends
    on ``close()``, on leaving a ``with`` block (Ctrl-C included), when the
    farm is collected, or when this process exits. With ``registration_token``
    the farm's tracker takes registrations only from servers that prove it
    (the farm's own do; add others with ``registration_token=`` too).
    ``tracker_port`` puts the tracker on that port (default: any free one), so
    that a farm started again is found where the last one was.

        >>> with LocalFarm({"local": 2}, registration_token="s3cret") as farm:  # doctest: +SKIP
        ...     remote = farm.request("local")
    """

    def __init__(self, servers: Mapping[str, int] | None = None, *, host: str = "127.0.0.1", silent: bool = True,
                 registration_token: str | None = None, tracker_port: int = 0, **server_options: Any):
        self.servers_per_key = self.prepare(servers, **server_options)
        self.host = host
        server_options.setdefault("idle_timeout", IDLE_TIMEOUT_S)  # idle sessions end: a farm is shared
        self.targets = {key: minrpc_target(key) for key in self.servers_per_key}  # None: the Python server
        self.tracker: Tracker | None = None
        self.servers: list[Server | MinRPCServer] = []
        try:
            self.tracker = Tracker(host=host, port=tracker_port, port_end=tracker_port + 1 if tracker_port else 0,
                                   silent=silent, auth_token=registration_token)
            tracker_addr = (host, self.tracker.port)
            for key, count in self.servers_per_key.items():
                target = self.targets[key]
                for _ in range(count):
                    if target is None:
                        self.servers.append(Server(host=host, port=0, key=key, tracker_addr=tracker_addr,
                                                   silent=silent, registration_token=registration_token,
                                                   **server_options))
                    else:
                        self.servers.append(MinRPCServer(host=host, port=0, key=key, tracker_addr=tracker_addr,
                                                         target=target, silent=silent,
                                                         registration_token=registration_token,
                                                         **server_options))
            self._wait_registered()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def prepare(servers: Mapping[str, int] | None = None, **server_options: Any) -> dict[str, int]:
        """Check what a farm of ``servers`` needs, before anything starts; ``{key: count}`` as the farm takes it.

        Raises ValueError for a bad argument and EmulatorNotFoundError naming the
        Debian packages an emulated board lacks; builds minrpc for each target once.

            >>> LocalFarm.prepare({"local": 2})
            {'local': 2}
        """
        if servers is not None and not isinstance(servers, Mapping):
            raise ValueError(f"LocalFarm takes {{key: number of servers}}, e.g. {{'local': 2}}, not {servers!r}")
        servers = dict(servers or {"local": 1})
        for key, count in servers.items():
            if not isinstance(key, str) or not key or not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"LocalFarm takes {{key: number of servers >= 1}}, got {key!r}: {count!r}")
        targets = {key: minrpc_target(key) for key in servers}
        if OPENCL_KEY in servers:
            _check_opencl()
        native = sorted(k for k, t in targets.items() if t is not None)
        if native:
            from ..native import build_minrpc
            from ..native.qemu import find_emulator

            _check_minrpc_options(native, server_options)
            for target in sorted({t for t in targets.values() if t is not None}):
                if target != "host":
                    find_emulator(target)
            for target in sorted({t for t in targets.values() if t is not None}):
                build_minrpc(target)
        return servers

    @property
    def tracker_addr(self) -> tuple[str, int]:
        return (self.host, self.tracker.port)

    def _wait_registered(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with self.connect() as tracker:
            while True:
                queues = tracker.summary()["queue_info"]
                missing = {k: n - queues.get(k, {}).get("free", 0) for k, n in self.servers_per_key.items()}
                if all(m <= 0 for m in missing.values()):
                    return
                if time.monotonic() > deadline:
                    raise RPCError(f"LocalFarm: servers did not register within {READY_TIMEOUT_S:.0f} s (missing {missing})")
                time.sleep(0.02)

    def connect(self) -> TrackerSession:
        """A new connection to the farm's tracker."""
        return connect_tracker(*self.tracker_addr)

    def request(self, key: str = "local", **options: Any) -> RPCSession:
        """A session on a free server of ``key`` (options as ``TrackerSession.request``)."""
        with self.connect() as tracker:
            return tracker.request(key, **options)

    def summary(self) -> "TrackerSummary":
        """The tracker's summary of this farm (queues and servers), with ``keys_frame()``/``servers_frame()``."""
        with self.connect() as tracker:
            return tracker.summary()

    def _repr_html_(self) -> str:
        from html import escape

        head = f"<b>{escape(repr(self))}</b>"
        if self.tracker is None or not self.tracker.alive:
            return head + "<p>stopped</p>"
        try:
            return head + self.summary()._repr_html_()
        except (OSError, RPCError) as exc:
            return head + f"<p>tracker unreachable: {escape(str(exc))}</p>"

    def close(self) -> None:
        """End every server and the tracker."""
        for server in self.servers:
            server.terminate()
        self.servers.clear()
        if self.tracker is not None:
            self.tracker.terminate()

    def __enter__(self) -> "LocalFarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        keys = ", ".join(f"{k}×{n}" for k, n in self.servers_per_key.items())
        port = self.tracker.port if self.tracker else "?"
        return f"<LocalFarm tracker {self.host}:{port} servers {keys}>"


def _check_opencl() -> None:
    """DeviceNotFoundError naming the packages when this machine has no OpenCL device for the ``opencl`` key."""
    from ..errors import DeviceNotFoundError
    from ..runtime.opencl import APT_PACKAGES, NO_OPENCL_ENV, opencl_disabled, published_devices

    if opencl_disabled():
        raise DeviceNotFoundError(f"LocalFarm: the key {OPENCL_KEY!r} needs OpenCL, which {NO_OPENCL_ENV}=1 turns off")
    if not published_devices():
        raise DeviceNotFoundError(
            f"LocalFarm: the key {OPENCL_KEY!r} needs an OpenCL device, and this machine has none; a CPU one "
            f"(PoCL) installs with: sudo apt-get install {APT_PACKAGES}")


def _check_minrpc_options(keys: list[str], options: dict[str, Any]) -> None:
    other = sorted(set(options) - MINRPC_OPTIONS)
    if other:
        raise ValueError(
            f"LocalFarm: {', '.join(o + '=' for o in other)} {'apply' if len(other) > 1 else 'applies'} to Python "
            f"servers only, and the keys {', '.join(keys)} are served by minrpc (which takes "
            f"{', '.join(sorted(MINRPC_OPTIONS))}): start those in a farm of their own"
        )


def tracker_from_env() -> tuple[str, int] | None:
    """The tracker named by ``WORKBENCH_TRACKER=host:port`` or ``TVM_TRACKER_HOST``/``TVM_TRACKER_PORT``.

    As in TVM's ``query_rpc_tracker``, a missing TVM_TRACKER_HOST means 127.0.0.1
    and a missing TVM_TRACKER_PORT means 9190. None when nothing is set.
    """
    text = os.environ.get("WORKBENCH_TRACKER")
    if text:
        try:
            return parse_address(text)  # host:port, or [::1]:9190
        except ValueError:
            raise ValueError(f"WORKBENCH_TRACKER must be host:port (e.g. 127.0.0.1:9190), not {text!r}") from None
    host, port = os.environ.get("TVM_TRACKER_HOST"), os.environ.get("TVM_TRACKER_PORT")
    if host or port:  # either one names a tracker; the other defaults as in TVM's query_rpc_tracker
        host, port = host or "127.0.0.1", (port or "9190").strip()
        if not _is_port(port):
            raise ValueError(f"TVM_TRACKER_PORT must be a port number (1-65535), not {port!r}")
        return host, int(port)
    return None


def _is_port(text: str) -> bool:
    return text.isdigit() and 0 < int(text) < 65536


def parse_address(address: str | tuple[str, int], what: str = "tracker") -> tuple[str, int]:
    """``"host:port"`` (or ``"[::1]:port"``, or a ``(host, port)`` pair) as ``(host, port)``; a clear error otherwise."""
    if isinstance(address, (tuple, list)) and len(address) == 2:
        host, port = address[0], str(address[1])
    elif isinstance(address, str):
        host, sep, port = address.strip().rpartition(":")
        host = host.strip("[]")
        if not sep:
            host, port = "", port
    else:
        raise ValueError(f"a {what} address is 'host:port' or (host, port), not {address!r}")
    if not host or not _is_port(str(port).strip()):
        raise ValueError(f"a {what} address is host:port with a port from 1 to 65535 (e.g. 127.0.0.1:9190), "
                         f"not {address!r}")
    return str(host), int(str(port).strip())


_embedded: LocalFarm | None = None
_chosen: tuple[str, int] | None = None
_embedded_lock = threading.Lock()


def default_tracker() -> tuple[str, int]:
    """Where sessions come from when no tracker is named.

    In order: the one set by ``set_default_tracker`` (or ``start_farm``), the
    configured one (``WORKBENCH_TRACKER``, TVM's variables), else the embedded
    LocalFarm, started once and ended at exit.
    """
    if _chosen is not None:
        return _chosen
    configured = tracker_from_env()
    if configured:
        return configured
    return start_farm(replace=False).tracker_addr


def set_default_tracker(address: str | tuple[str, int] | None) -> tuple[str, int] | None:
    """Make ``address`` the default tracker (None: back to the configured one or the embedded farm)."""
    global _chosen
    _chosen = None if address is None else parse_address(address)
    return _chosen


def start_farm(servers: Mapping[str, int] | None = None, *, replace: bool = True, **options: Any) -> LocalFarm:
    """Start the embedded farm (``{key: count}``, default one "local" server) and make it the default tracker.

    A running embedded farm is stopped first (``replace=False`` keeps it and
    returns it). It ends with ``stop_farm()`` or when this process exits.

        >>> farm = start_farm({"local": 2})     # doctest: +SKIP
    """
    global _embedded, _chosen
    with _embedded_lock:
        if _embedded is not None and not replace:
            return _embedded
        farm = LocalFarm(servers, **options)  # a bad argument leaves the running farm alone
        old, _embedded = _embedded, farm
        if old is not None:
            atexit.unregister(old.close)
            old.close()
            if _chosen == old.tracker_addr:
                _chosen = None
        atexit.register(farm.close)
        log.info("started the embedded farm: %r", farm)
    if servers is not None or replace:
        _chosen = farm.tracker_addr
    return farm


def stop_farm() -> bool:
    """Stop the embedded farm; False if none was running. The default tracker goes back to the configured one."""
    global _embedded, _chosen
    with _embedded_lock:
        farm, _embedded = _embedded, None
    if farm is None:
        return False
    if _chosen == farm.tracker_addr:
        _chosen = None
    atexit.unregister(farm.close)
    farm.close()
    return True


def current_farm() -> LocalFarm | None:
    """The embedded farm, if one is running."""
    return _embedded
