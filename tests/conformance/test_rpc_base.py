"""upstream: tests/python/runtime/test_rpc_base.py (apache-tvm 0.27): test_rpc_base_random_key.

TVM tests its helpers ``base.random_key`` and ``base.split_random_key`` directly. The workbench has no such
public helpers; what they are for is public: the match key a server registers with the tracker is the device key,
':' and a random part unique among the key's servers, and the device key comes back from it whole, colons
included. Ours reads the match keys off the tracker's wire (TVM's) and connects with them.
"""
from __future__ import annotations

import pytest

from workbench import rpc

from ..conftest import wait_until
from .conftest import HOST
from .test_rpc_tracker import REQUEST, recvjson, sendjson, tracker_socket


@pytest.mark.parametrize("device_key", ["16e995b6", "127.0.0.1:5555"])
def test_rpc_base_random_key(device_key, spawn, closing):
    """upstream: test_rpc_base.py::test_rpc_base_random_key — a match key starts with the device key and splits back
    to it (also for a key holding ':'); a second one for the same key differs from the first."""
    with rpc.Tracker(host=HOST, port=0, silent=True) as tracker:
        servers = {spawn(tracker.port, device_key).port, spawn(tracker.port, device_key).port}
        client = rpc.connect_tracker(HOST, tracker.port)
        closing.append(client)
        assert wait_until(lambda: client.summary()["queue_info"].get(device_key, {}).get("free") == 2)
        raw = tracker_socket(tracker.port)
        try:
            matchkeys = []
            for _ in servers:
                sendjson(raw, [REQUEST, device_key, "", 1])
                code, (host, port, matchkey) = recvjson(raw)
                assert code == 0 and port in servers
                assert matchkey.startswith(device_key + ":")
                assert matchkey.rsplit(":", 1)[0] == device_key  # split_random_key: the device key, whole
                with rpc.connect(host, port, key=matchkey) as remote:  # the server takes its match key
                    remote.ping()
                matchkeys.append(matchkey)
            assert matchkeys[0] != matchkeys[1]
        finally:
            raw.close()
