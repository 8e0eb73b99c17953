"""``LocalFarm``: a tracker and servers with given keys, all on this machine."""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any, Mapping

from ..errors import RPCError
from ..rpc.client import RPCSession
from ..rpc.server import Server
from ..rpc.tracker import Tracker
from ..rpc.tracker_client import TrackerSession, connect_tracker

log = logging.getLogger("workbench.farm")
READY_TIMEOUT_S = 30.0


class LocalFarm:
    """A tracker and ``servers[key]`` servers of each key on free loopback ports.

    The constructor returns once every server is registered; everything ends
    on ``close()``, on leaving a ``with`` block (Ctrl-C included), when the
    farm is collected, or when this process exits.
    """

    def __init__(self, servers: Mapping[str, int] | None = None, *, host: str = "127.0.0.1", silent: bool = True,
                 **server_options: Any):
        if servers is not None and not isinstance(servers, Mapping):
            raise ValueError(f"LocalFarm takes {{key: number of servers}}, e.g. {{'local': 2}}, not {servers!r}")
        self.servers_per_key = dict(servers or {"local": 1})
        for key, count in self.servers_per_key.items():
            if not isinstance(key, str) or not key or not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"LocalFarm takes {{key: number of servers >= 1}}, got {key!r}: {count!r}")
        self.host = host
        self.tracker: Tracker | None = None
        self.servers: list[Server] = []
        try:
            self.tracker = Tracker(host=host, port=0, silent=silent)
            for key, count in self.servers_per_key.items():
                for _ in range(count):
                    self.servers.append(Server(host=host, port=0, key=key, tracker_addr=(host, self.tracker.port),
                                               silent=silent, **server_options))
            self._wait_registered()
        except BaseException:
            self.close()
            raise

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


def tracker_from_env() -> tuple[str, int] | None:
    """The tracker named by ``WORKBENCH_TRACKER=host:port`` or ``TVM_TRACKER_HOST``/``TVM_TRACKER_PORT``.

    As in TVM's ``query_rpc_tracker``, a missing TVM_TRACKER_HOST means 127.0.0.1
    and a missing TVM_TRACKER_PORT means 9190. None when nothing is set.
    """
    text = os.environ.get("WORKBENCH_TRACKER")
    if text:
        host, sep, port = text.strip().rpartition(":")
        host = host.strip("[]")  # [::1]:9190
        if not sep or not host or not _is_port(port):
            raise ValueError(f"WORKBENCH_TRACKER must be host:port (e.g. 127.0.0.1:9190), not {text!r}")
        return host, int(port)
    host, port = os.environ.get("TVM_TRACKER_HOST"), os.environ.get("TVM_TRACKER_PORT")
    if host or port:  # either one names a tracker; the other defaults as in TVM's query_rpc_tracker
        host, port = host or "127.0.0.1", (port or "9190").strip()
        if not _is_port(port):
            raise ValueError(f"TVM_TRACKER_PORT must be a port number (1-65535), not {port!r}")
        return host, int(port)
    return None


def _is_port(text: str) -> bool:
    return text.isdigit() and 0 < int(text) < 65536


_embedded: LocalFarm | None = None
_embedded_lock = threading.Lock()


def default_tracker() -> tuple[str, int]:
    """The configured tracker, or the embedded LocalFarm's (started once, ended at exit)."""
    global _embedded
    configured = tracker_from_env()
    if configured:
        return configured
    with _embedded_lock:
        if _embedded is None:
            _embedded = LocalFarm()
            atexit.register(_embedded.close)
            log.info("started the embedded farm: %r", _embedded)
        return _embedded.tracker_addr
