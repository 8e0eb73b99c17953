"""upstream: tests/python/contrib/test_rpc_proxy.py (apache-tvm 0.27): rpc_proxy_check, through the workbench's proxy.

TVM's server there reaches the proxy over WebSocket (``websocket_proxy_server``); the workbench has no WebSocket
transport (its servers connect out to a proxy over TCP, ``is_proxy=True``), so ours checks the same client-side
behaviour with such a server. TVM's proxy also holds a client that comes before any server of its key; ours
refuses a key nobody serves at once (DeviceNotFoundError; it holds clients only of keys it has seen within the last
minute, see workbench/rpc/proxy/proxy.py), so the client here waits until the server is there, as TVM's test means to.
"""
from __future__ import annotations

import threading
import time

import pytest

from workbench import rpc
from workbench.errors import DeviceNotFoundError

from . import INIT
from .conftest import HOST


def connect_when_served(prox: rpc.Proxy, key: str, timeout: float = 30) -> rpc.RPCSession:
    """rpc.connect through the proxy once a server of ``key`` waits there (a bounded poll)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return rpc.connect(prox.host, prox.port, key=key)
        except DeviceNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_rpc_proxy_check(private_tmpdir):
    """upstream: test_rpc_proxy.py::rpc_proxy_check — a server that only the proxy can reach registers key x1 there;
    a client connecting to the proxy with key x1 gets a session on it: echo returns ints and strings."""
    with rpc.Proxy(HOST, port=0, silent=True) as prox, \
            rpc.Server(host=prox.host, port=prox.port, is_proxy=True, key="x1", silent=True, server_init_callback=INIT):
        client = connect_when_served(prox, "x1")
        with client:
            f1 = client.get_function("testing.echo")
            assert f1(10) == 10
            assert f1("xyz") == "xyz"


def test_rpc_proxy_check_client_first(private_tmpdir):
    """upstream: test_rpc_proxy.py::rpc_proxy_check — TVM's client may reach the proxy before the server does (the
    test's docstring: the proxy starting first is "often the case but not always"); the proxy pairs them."""
    with rpc.Proxy(HOST, port=0, silent=True) as prox:
        got: list = []
        client_thread = threading.Thread(target=lambda: got.append(_try_connect(prox, "x1")), daemon=True)
        client_thread.start()
        time.sleep(0.3)  # the client asks first; under TVM's rule the order does not matter
        with rpc.Server(host=prox.host, port=prox.port, is_proxy=True, key="x1", silent=True,
                        server_init_callback=INIT):
            client_thread.join(timeout=30)
            assert got, "the client is still waiting"
            client = got[0]
            if isinstance(client, Exception):
                raise client
            with client:
                assert client.get_function("testing.echo")(10) == 10


def _try_connect(prox: rpc.Proxy, key: str):
    try:
        return rpc.connect(prox.host, prox.port, key=key)
    except Exception as exc:  # handed to the test's thread
        return exc
