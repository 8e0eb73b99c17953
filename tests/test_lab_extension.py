"""The Jupyter server extension behind the Devices sidebar (workbench/lab_extension.py, docs/lab-extension.md).

A real Jupyter server (jupyter_server's pytest plugin) with the extension enabled, real trackers and
servers on loopback: what the sidebar reads, adding and removing trackers, the lab's farm, and the
authentication every Jupyter handler has.
"""
from __future__ import annotations

import json
import time

import pytest
import tornado.httpclient

from workbench import rpc
from workbench.farm import LocalFarm

pytest_plugins = ["pytest_jupyter.jupyter_server"]


@pytest.fixture
def jp_server_config(farm, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TRACKER", "%s:%d" % farm.tracker_addr)
    monkeypatch.delenv("WORKBENCH_LAB_FARM", raising=False)
    return {"ServerApp": {"jpserver_extensions": {"workbench.lab_extension": True}}}


async def _json(jp_fetch, *path, method="GET", body=None, **kwargs):
    if body is not None:
        kwargs["body"] = json.dumps(body)
    response = await jp_fetch("workbench", "api", *path, method=method, **kwargs)
    return response.code, (json.loads(response.body) if response.body else None)


async def _until(jp_fetch, predicate, timeout=15.0):
    """The API's answer once ``predicate`` holds for it (the poller runs in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        _, data = await _json(jp_fetch, "trackers")
        if predicate(data):
            return data
        assert time.monotonic() < deadline, f"not reached in {timeout} s: {data}"
        await _sleep(0.1)


async def _sleep(seconds):
    import asyncio

    await asyncio.sleep(seconds)


def _tracker(data, address):
    return next(t for t in data["trackers"] if t["address"] == address)


async def test_the_default_tracker_is_listed_with_its_keys_and_servers(jp_fetch, farm):
    address = "%s:%d" % farm.tracker_addr
    data = await _until(jp_fetch, lambda d: d["trackers"] and d["trackers"][0]["status"] == "ok")
    entry = _tracker(data, address)
    assert entry["origin"] == "default" and entry["default"] is True and entry["error"] is None
    assert entry["keys"] == [{"key": "local", "free": 1, "total": 1, "waiting": 0}]
    (server,) = entry["servers"]
    assert server["key"] == "local" and server["address"].startswith("127.0.0.1:") and server["arch"]
    assert data["farm"]["state"] == "stopped"


async def test_keys_follow_servers_joining_and_leaving(jp_fetch, farm):
    address = "%s:%d" % farm.tracker_addr
    await _until(jp_fetch, lambda d: _tracker(d, address)["status"] == "ok")
    with rpc.Server(port=0, key="board", tracker_addr=farm.tracker_addr, silent=True):
        data = await _until(jp_fetch, lambda d: any(k["key"] == "board" for k in _tracker(d, address)["keys"]))
        assert {"key": "board", "free": 1, "total": 1, "waiting": 0} in _tracker(data, address)["keys"]
    await _until(jp_fetch, lambda d: not any(k["key"] == "board" for k in _tracker(d, address)["keys"]))


async def test_an_added_tracker_is_polled_and_an_unreachable_one_backs_off(jp_fetch, farm, private_tmpdir):
    with LocalFarm({"arm": 1}) as other:
        address = "%s:%d" % other.tracker_addr
        code, entry = await _json(jp_fetch, "trackers", method="POST", body={"address": address})
        assert code == 201 and entry["origin"] == "added" and entry["default"] is False
        data = await _until(jp_fetch, lambda d: _tracker(d, address)["status"] == "ok")
        assert [k["key"] for k in _tracker(data, address)["keys"]] == ["arm"]
    # the farm is gone: the entry says so, with the error and when it tries again
    data = await _until(jp_fetch, lambda d: _tracker(d, address)["status"] == "unreachable")
    entry = _tracker(data, address)
    assert entry["error"] and 0 <= entry["retry_in"] <= 10
    code, _ = await _json(jp_fetch, "trackers", address, method="DELETE")
    assert code == 204
    _, data = await _json(jp_fetch, "trackers")
    assert address not in [t["address"] for t in data["trackers"]]


@pytest.mark.parametrize("body, says", [
    ({"address": "nonsense"}, "host:port"),
    ({"address": "127.0.0.1:99999"}, "port from 1 to 65535"),
    ({}, "address"),
])
async def test_a_bad_tracker_address_is_refused_with_the_reason(jp_fetch, body, says):
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await _json(jp_fetch, "trackers", method="POST", body=body)
    assert info.value.code == 400 and says in json.loads(info.value.response.body)["message"]


async def test_the_default_tracker_cannot_be_removed(jp_fetch, farm):
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await _json(jp_fetch, "trackers", "%s:%d" % farm.tracker_addr, method="DELETE")
    assert info.value.code == 400 and "stay" in json.loads(info.value.response.body)["message"]
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await _json(jp_fetch, "trackers", "10.9.9.9:1", method="DELETE")
    assert info.value.code == 404


async def test_the_lab_farm_starts_and_stops_on_the_same_port(jp_fetch, private_tmpdir):
    code, farm = await _json(jp_fetch, "farm", method="POST", body={"action": "start", "servers": {"local": 1}})
    assert code == 200 and farm["state"] in ("starting", "running")
    data = await _until(jp_fetch, lambda d: d["farm"]["state"] == "running")
    tracker = data["farm"]["tracker"]
    data = await _until(jp_fetch, lambda d: any(t["address"] == tracker and t["status"] == "ok" for t in d["trackers"]))
    assert _tracker(data, tracker)["keys"][0]["key"] == "local"
    await _json(jp_fetch, "farm", method="POST", body={"action": "stop"})
    await _until(jp_fetch, lambda d: d["farm"]["state"] == "stopped")
    await _json(jp_fetch, "farm", method="POST", body={"action": "start"})
    data = await _until(jp_fetch, lambda d: d["farm"]["state"] == "running")
    assert data["farm"]["tracker"] == tracker  # kernels keep their WORKBENCH_TRACKER
    await _json(jp_fetch, "farm", method="POST", body={"action": "stop"})
    await _until(jp_fetch, lambda d: d["farm"]["state"] == "stopped")


async def test_a_bad_farm_request_is_refused(jp_fetch):
    for body in ({"action": "explode"}, {"action": "start", "servers": {"local": 0}}, {"action": "start", "servers": 3}):
        with pytest.raises(tornado.httpclient.HTTPClientError) as info:
            await _json(jp_fetch, "farm", method="POST", body=body)
        assert info.value.code == 400


async def test_requests_without_the_token_are_refused(jp_fetch, jp_base_url, jp_http_port):
    client = tornado.httpclient.AsyncHTTPClient()
    url = f"http://localhost:{jp_http_port}{jp_base_url}workbench/api/trackers"
    for method, body in (("GET", None), ("POST", json.dumps({"address": "127.0.0.1:9"}))):
        with pytest.raises(tornado.httpclient.HTTPClientError) as info:
            await client.fetch(url, method=method, body=body, raise_error=True)
        assert info.value.code == 403
    # a wrong token too
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await client.fetch(url, headers={"Authorization": "token not-the-token"})
    assert info.value.code == 403
