"""The session library: servers, client sessions, the tracker, the proxy, the wire protocol.

    >>> from workbench import rpc
    >>> server = rpc.Server(port=0)
    >>> remote = rpc.connect("127.0.0.1", server.port)

One subpackage per role: ``wire`` (frames, handshake, auth proofs: what both
sides share), ``client`` (sessions and the tracker client), ``server`` (the
session server, its workers and request handlers, minrpc's handle),
``tracker``, ``proxy`` and ``service`` (the process and event-loop machinery
of the three network services). docs/architecture.md says who may import
whom. The names here are TVM's; they load on first use, so a server process
imports only what it serves with.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LocalSession": "client.local",
    "PopenSession": "client.local",
    "popen_server_command": "client.local",
    "RPCSession": "client.session",
    "RemoteFunction": "client.session",
    "RemoteModule": "client.session",
    "connect": "client.session",
    "TrackerSession": "client.tracker_session",
    "connect_tracker": "client.tracker_session",
    "Server": "server.server",
    "MinRPCServer": "server.minrpc",
    "with_minrpc": "server.minrpc",
    "Proxy": "proxy.proxy",
    "Tracker": "tracker.tracker",
    "register_func": "..runtime.registry",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ..runtime.registry import register_func
    from .client.local import LocalSession, PopenSession, popen_server_command
    from .client.session import RemoteFunction, RemoteModule, RPCSession, connect
    from .client.tracker_session import TrackerSession, connect_tracker
    from .proxy.proxy import Proxy
    from .server.minrpc import MinRPCServer, with_minrpc
    from .server.server import Server
    from .tracker.tracker import Tracker


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench.rpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module if module.startswith("..") else f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
