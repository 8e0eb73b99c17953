"""The session library: servers, client sessions, the wire protocol.

    >>> from workbench import rpc
    >>> server = rpc.Server(port=0)
    >>> remote = rpc.connect("127.0.0.1", server.port)

Names load on first use, so a server process imports only what it serves with.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LocalSession": "client",
    "PopenSession": "client",
    "RPCSession": "client",
    "RemoteFunction": "client",
    "RemoteModule": "client",
    "connect": "client",
    "popen_server_command": "client",
    "Server": "server",
    "MinRPCServer": "minrpc",
    "with_minrpc": "minrpc",
    "Proxy": "proxy",
    "Tracker": "tracker",
    "TrackerSession": "tracker_client",
    "connect_tracker": "tracker_client",
    "register_func": "..runtime.registry",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ..runtime.registry import register_func
    from .client import (
        LocalSession,
        PopenSession,
        RemoteFunction,
        RemoteModule,
        RPCSession,
        connect,
        popen_server_command,
    )
    from .minrpc import MinRPCServer, with_minrpc
    from .proxy import Proxy
    from .server import Server
    from .tracker import Tracker
    from .tracker_client import TrackerSession, connect_tracker


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'workbench.rpc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module if module.startswith("..") else f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
