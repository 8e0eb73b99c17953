"""The kernel's side of the lab's status item: the comm ``workbench.status`` (docs/lab-extension.md).

A real ipykernel driven over jupyter_client, on a real farm: what the kernel announces on
``%load_ext workbench``, after ``%rpc_connect`` and ``%rpc_disconnect``, while it waits in a
tracker's queue, and to a frontend that opens the comm itself (a reloaded page).
"""
from __future__ import annotations

import queue
import time
import uuid

import pytest
from jupyter_client.manager import start_new_kernel

TARGET = "workbench.status"


@pytest.fixture
def kernel(farm, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TRACKER", "%s:%d" % farm.tracker_addr)
    manager, client = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def _run(client, code: str, timeout: float = 60.0) -> list[dict]:
    """Execute ``code``; every status comm message (open or msg data) the kernel sent meanwhile, in order."""
    msg_id = client.execute(code)
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no idle status for {code!r} within {timeout} s") from None
        kind, content = msg["msg_type"], msg["content"]
        if kind == "comm_open" and content.get("target_name") == TARGET or kind == "comm_msg":
            seen.append(content["data"])
        if kind == "error":
            seen.append({"error": content["ename"] + ": " + content["evalue"]})
        if (kind == "status" and content["execution_state"] == "idle"
                and msg["parent_header"].get("msg_id") == msg_id):
            return seen


def test_the_kernel_reports_its_session_as_it_changes(kernel, farm):
    (first,) = _run(kernel, "%load_ext workbench")
    assert first["loaded"] is True and first["status"] == "none" and first["text"] == "RPC: no session"
    seen = _run(kernel, "%rpc_connect --key local")
    connected = seen[-1]
    assert connected["status"] == "connected" and connected["key"] == "local" and connected["name"] == "remote"
    assert connected["tracker"] == "%s:%d" % farm.tracker_addr
    assert connected["text"] == f"RPC: local @ {connected['server']}"
    assert "<" in connected["card_html"] and connected["server"] in connected["card_html"]
    assert _run(kernel, "x = 1") == []  # nothing changed: nothing sent
    seen = _run(kernel, "%rpc_disconnect")
    assert seen[-1]["status"] == "none"


def test_the_place_in_the_queue_is_reported_while_waiting(kernel, farm):
    _run(kernel, "%load_ext workbench")
    with farm.request("local"):  # the only server is busy: the kernel queues behind this session
        seen = _run(kernel, "%rpc_connect --key local --timeout 2")
    waiting = [m for m in seen if m.get("status") == "waiting"]
    assert waiting, seen
    assert waiting[0]["key"] == "local" and waiting[0]["text"].startswith("RPC: waiting for local")
    assert any(m.get("position") == 1 and "#1 in the queue" in m["text"] for m in waiting), waiting
    assert any("error" in m for m in seen)  # the timeout
    assert seen[-1].get("status") == "none"  # after it gave up: no session


def test_a_frontend_that_opens_the_comm_gets_the_state(kernel):
    _run(kernel, "%load_ext workbench")
    _run(kernel, "%rpc_connect --key local")
    comm_id = uuid.uuid4().hex
    kernel.session.send(kernel.shell_channel.socket, "comm_open",
                        {"comm_id": comm_id, "target_name": TARGET, "data": {}})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        msg = kernel.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] == comm_id:
            assert msg["content"]["data"]["status"] == "connected"
            assert msg["content"]["data"]["key"] == "local"
            return
    raise AssertionError("the kernel did not answer the frontend's comm_open")
