"""upstream: tests/python/contrib/test_rpc_tracker.py (apache-tvm 0.27): check_server_drop and
check_tracker_rejects_oversized_msg_size, through the workbench's tracker, proxy, servers and TrackerSession.

Raw messages use the tracker's wire, which is TVM's (docs/protocol.md): the magic 0x2F271 echoed, then
int32-little-endian-length-prefixed JSON.
"""
from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from workbench import rpc

from ..conftest import wait_until
from . import INIT
from .conftest import HOST

RPC_TRACKER_MAGIC = 0x2F271
PUT, REQUEST = 3, 4


def tracker_socket(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
    assert struct.unpack("<i", recv_exact(sock, 4))[0] == RPC_TRACKER_MAGIC
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the tracker closed the connection"
        data += chunk
    return data


def sendjson(sock: socket.socket, value) -> None:
    data = json.dumps(value).encode()
    sock.sendall(struct.pack("<i", len(data)) + data)


def recvjson(sock: socket.socket):
    (size,) = struct.unpack("<i", recv_exact(sock, 4))
    return json.loads(recv_exact(sock, size))


def test_server_drop(spawn, private_tmpdir):
    """upstream: test_rpc_tracker.py::check_server_drop — a tracker with servers registered directly (abc, xyz) and
    through a proxy (xyz, xyz1) stays serviceable after requests nobody follows up and stale PUTs (a key at another
    server's port, or at the proxy's); a request_and_run and requests with a tiny and a 2 s session timeout may fail
    with a RuntimeError, and then keys abc and xyz1 are served again."""
    with rpc.Tracker(host=HOST, port=0, silent=True) as tserver, \
            rpc.Proxy(host=HOST, port=0, tracker_addr=(HOST, tserver.port), silent=True) as tproxy, \
            rpc.connect_tracker(HOST, tserver.port) as tclient:
        spawn(tserver.port, "abc", server_init_callback=INIT)
        server1 = spawn(tserver.port, "xyz", server_init_callback=INIT)
        with rpc.Server(HOST, tproxy.port, is_proxy=True, key="xyz", silent=True, server_init_callback=INIT), \
                rpc.Server(HOST, tproxy.port, is_proxy=True, key="xyz1", silent=True, server_init_callback=INIT):

            def queue(key):
                return tclient.summary()["queue_info"].get(key, {})

            assert wait_until(lambda: queue("abc").get("free") == 1 and queue("xyz").get("free") == 2
                              and queue("xyz1").get("free") == 1, timeout=30)
            raw = tracker_socket(tserver.port)
            try:
                def put(value):
                    sendjson(raw, value)
                    return recvjson(raw)

                # fault tolerance to requests nobody follows up
                put([REQUEST, "abc", "", 1])
                put([REQUEST, "xyz1", "", 1])
                # fault tolerance to stale worker values
                put([PUT, "xyz", [server1.port, "abc"]])
                put([PUT, "xyz", [server1.port, "abcxxx"]])
                put([PUT, "xyz", [tproxy.port, "abcxxx11"]])

                def check_timeout(timeout, sleeptime):
                    def myfunc(remote):
                        time.sleep(sleeptime)
                        f1 = remote.get_function("rpc.test2.addone")
                        assert f1(10) == 11

                    try:
                        tclient.request_and_run("xyz", myfunc, session_timeout=timeout, timeout=30)
                    except RuntimeError:
                        pass
                    assert "xyz" in tclient.text_summary()
                    try:
                        remote = tclient.request("xyz", priority=0, session_timeout=timeout, timeout=30)
                        remote2 = tclient.request("xyz", session_timeout=timeout, timeout=30)
                        with remote, remote2:
                            time.sleep(sleeptime)
                            f1 = remote.get_function("rpc.test2.addone")
                            assert f1(10) == 11
                            f1 = remote2.get_function("rpc.test2.addone")
                            assert f1(10) == 11
                    except RuntimeError:
                        pass
                    with tclient.request("abc", timeout=60) as remote3:
                        f1 = remote3.get_function("rpc.test2.addone")
                        assert f1(10) == 11
                    with tclient.request("xyz1", timeout=60) as remote3:
                        f1 = remote3.get_function("rpc.test2.addone")
                        assert f1(10) == 11

                check_timeout(0.01, 0.1)
                check_timeout(2, 0)
            finally:
                raw.close()


def test_tracker_rejects_oversized_msg_size(private_tmpdir):
    """upstream: test_rpc_tracker.py::check_tracker_rejects_oversized_msg_size — after the magic, a 2 GiB length
    header makes the tracker close the connection instead of buffering; (ours) the tracker goes on serving."""
    with rpc.Tracker(host=HOST, port=0, silent=True) as tserver:
        sock = tracker_socket(tserver.port)
        try:
            sock.settimeout(5)
            sock.sendall(struct.pack("<i", 0x7FFFFFFF))
            for _ in range(20):
                try:
                    chunk = sock.recv(4096)
                except ConnectionResetError:
                    chunk = b""
                if chunk == b"":
                    break
                time.sleep(0.05)
            else:
                pytest.fail("tracker did not close connection after oversized msg_size")
        finally:
            sock.close()
        with rpc.connect_tracker(HOST, tserver.port) as client:
            assert client.summary()["queue_info"] == {}
