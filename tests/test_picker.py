"""TrackerSummary and the DevicePicker panel, against a real tracker and real servers on 127.0.0.1.

No browser and no Jupyter server: widgets talk to a recording comm (installed
as ``comm.create_comm``) that keeps every message a widget sends, so a test can
count the updates each row widget got. Waits are bounded loops, never timing
assertions.
"""
from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
import threading
import time
import weakref

import comm
import pytest
from comm.base_comm import BaseComm

from workbench import rpc
from workbench.errors import RPCError
from workbench.rpc.tracker.summary import TrackerSummary
from workbench.rpc.tracker.wire import Code, TrackerConnection

from .conftest import ROOT, wait_until

LOCAL = "127.0.0.1"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


# -- a comm that records what widgets send ----------------------------------------------
class RecordingComm(BaseComm):
    """Keeps (msg_type, data) of every message instead of sending it to a front end."""

    def __init__(self, *args, **kwargs):
        self.messages: list[tuple[str, dict]] = []
        super().__init__(*args, **kwargs)

    def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
        self.messages.append((msg_type, data or {}))


@pytest.fixture(autouse=True)
def recording_comm(monkeypatch):
    monkeypatch.setattr(comm, "create_comm", lambda **kwargs: RecordingComm(**kwargs))


def value_updates(widget) -> int:
    """How many state updates of ``value`` the widget sent since its messages were last cleared."""
    return sum(1 for kind, data in widget.comm.messages
               if kind == "comm_msg" and data.get("method") == "update" and "value" in data.get("state", {}))


def clear_messages(*widgets) -> None:
    for widget in widgets:
        widget.comm.messages.clear()


# -- real parts ---------------------------------------------------------------------------
@pytest.fixture
def trackers():
    """``trackers(port=0)``: a Tracker on 127.0.0.1; every one ends with the test."""
    started: list[rpc.Tracker] = []

    def start(port: int = 0) -> rpc.Tracker:
        deadline = time.monotonic() + 10
        while True:
            try:
                trk = rpc.Tracker(port=port, port_end=port + 1 if port else 9199, silent=True)
                break
            except RuntimeError:  # the port is still held for a moment after a restart
                if not port or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        started.append(trk)
        return trk

    try:
        yield start
    finally:
        for trk in started:
            trk.terminate()
    assert not any(trk.alive for trk in started)


@pytest.fixture
def tracker(trackers):
    return trackers()


@pytest.fixture
def picker_factory(closing):
    from workbench.notebook.picker import DevicePicker

    def make(*args, **kwargs) -> DevicePicker:
        picker = DevicePicker(*args, **kwargs)
        closing.append(picker)
        return picker

    return make


def summary_of(port: int) -> TrackerSummary:
    with rpc.connect_tracker(LOCAL, port) as ts:
        return TrackerSummary(ts.summary())


def wait_free(port: int, key: str, free: int, timeout: float = 20.0) -> None:
    def ok() -> bool:
        return summary_of(port).get("queue_info", {}).get(key, {}).get("free") == free

    assert wait_until(ok, timeout), f"key {key!r}: wanted {free} free, the tracker says {summary_of(port)!r}"


def server_addr(srv: rpc.Server) -> str:
    return f"{LOCAL}:{srv.port}"


def picker_threads(kind: str = "") -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"DevicePicker {kind}")]


# -- TrackerSummary -------------------------------------------------------------------------
SAMPLE = {
    "queue_info": {
        "rasp": {"free": 1, "pending": 2},
        "gone": {"free": 0, "pending": 0},  # a queue left after its last server went
        "<b>": {"free": 1, "pending": 0},
    },
    "waiting": {"rasp": [{"user": "ann", "priority": 2}, {"user": "bob", "priority": 1}]},  # ours only
    "server_info": [
        {"key": "server:rasp", "addr": ["10.0.0.9", 9091], "arch": "aarch64", "target": "aarch64-linux-gnu",
         "devices": [[1, 0], [4, 0]], "labels": {"os": "linux", "board": "pi4"}},
        {"key": "server:proxy[rasp,<b>]", "addr": ["10.0.0.2", 9090]},  # a TVM-style entry: key and addr only
        {"key": "server:rasp", "addr": ["10.0.0.3", 9091], "devices": [[2, 1]]},
    ],
}


def test_summary_rows_count_servers_per_key_and_fill_missing_fields():
    summary = TrackerSummary(SAMPLE)
    assert summary == SAMPLE and summary["queue_info"]["rasp"]["free"] == 1  # still the plain dict
    assert summary.key_rows() == [
        {"key": "<b>", "total": 1, "free": 1, "pending": 0},
        {"key": "rasp", "total": 3, "free": 1, "pending": 2},  # the proxy entry counts for both its keys
    ]
    assert summary.server_rows() == [  # by key, then address
        {"address": "10.0.0.3:9091", "key": "rasp", "arch": "", "target": "", "devices": "cuda(1)", "labels": ""},
        {"address": "10.0.0.9:9091", "key": "rasp", "arch": "aarch64", "target": "aarch64-linux-gnu",
         "devices": "cpu(0), cl(0)", "labels": "board=pi4, os=linux"},
        {"address": "10.0.0.2:9090", "key": "rasp, <b>", "arch": "", "target": "", "devices": "", "labels": ""},
    ]


def test_summary_position_frames_html_and_text():
    summary = TrackerSummary(SAMPLE)
    assert summary.position("rasp", "ann") == 1
    assert summary.position("rasp", "bob") == 2
    assert summary.position("rasp", "carl") is None
    assert summary.position("<b>", "ann") is None  # a TVM tracker sends no waiting list
    assert summary.position("nokey", "ann") is None
    assert summary.waiting("rasp") == SAMPLE["waiting"]["rasp"] and summary.waiting("<b>") == []

    keys, servers = summary.keys_frame(), summary.servers_frame()
    assert list(keys.columns) == ["key", "total", "free", "pending"]
    assert keys.set_index("key").loc["rasp"].tolist() == [3, 1, 2]
    assert list(servers.columns) == ["address", "key", "arch", "target", "devices", "labels"]
    assert servers["address"].tolist() == ["10.0.0.3:9091", "10.0.0.9:9091", "10.0.0.2:9090"]

    page = summary._repr_html_()
    assert "<h4>Queues</h4>" in page and "<h4>Servers</h4>" in page
    assert "board=pi4, os=linux" in page and "cpu(0), cl(0)" in page
    assert "<b>" not in page and "&lt;b&gt;" in page  # a key from the network is escaped

    text = repr(summary)
    assert text.startswith("Server List") and "Queue Status" in text
    assert "10.0.0.9:9091" in text and "rasp" in text

    empty = TrackerSummary({})
    assert empty.key_rows() == [] and empty.server_rows() == []
    assert list(empty.servers_frame().columns) == ["address", "key", "arch", "target", "devices", "labels"]
    assert "no servers registered" in empty._repr_html_()


def test_summary_of_a_real_tracker_and_queue_positions(tracker, spawn, closing):
    spawn(tracker.port, "board", labels={"board": "pi4", "os": "linux"})
    wait_free(tracker.port, "board", 1)
    ts = rpc.connect_tracker(LOCAL, tracker.port)
    closing.append(ts)
    held = ts.request("board")  # the only device is now busy
    closing.append(held)
    waiters = {}
    for user, priority in (("ann", 1), ("bob", 2)):  # bob's higher priority puts him first
        conn = TrackerConnection(LOCAL, tracker.port, timeout=10)
        closing.append(conn)
        conn.send([Code.REQUEST, "board", user, priority])
        waiters[user] = conn
    assert wait_until(lambda: summary_of(tracker.port)["queue_info"]["board"]["pending"] == 2)

    summary = summary_of(tracker.port)
    assert summary.position("board", "bob") == 1 and summary.position("board", "ann") == 2
    assert summary.key_rows() == [{"key": "board", "total": 1, "free": 0, "pending": 2}]
    (row,) = summary.server_rows()
    assert row["key"] == "board" and row["labels"] == "board=pi4, os=linux"
    assert "cpu(0)" in row["devices"] and row["arch"] and row["target"]
    waiters["bob"].close()  # a waiter that leaves leaves the queue
    assert wait_until(lambda: summary_of(tracker.port).position("board", "bob") is None)
    assert summary_of(tracker.port).position("board", "ann") == 1


# -- the live tables -------------------------------------------------------------------------
def test_tables_follow_servers_and_only_changed_rows_are_sent(tracker, spawn, picker_factory):
    a1 = spawn(tracker.port, "a")
    b1 = spawn(tracker.port, "b")
    wait_free(tracker.port, "a", 1)
    wait_free(tracker.port, "b", 1)
    picker = picker_factory(f"{LOCAL}:{tracker.port}", interval=600)  # the thread polls once; the test drives
    assert wait_until(lambda: picker.summary is not None), picker.error
    view = picker.view
    assert set(view.key_rows) == {"a", "b"}
    assert set(view.server_rows) == {server_addr(a1), server_addr(b1)}
    assert view.key_select.options == ("a", "b") and not view.connect_button.disabled
    row_a, row_b = view.key_rows["a"], view.key_rows["b"]
    srv_a1, srv_b1 = view.server_rows[server_addr(a1)], view.server_rows[server_addr(b1)]
    assert row_a in view.keys_box.children and srv_b1 in view.servers_box.children
    assert ">1<" in row_b.value  # free 1, total 1

    # a server joins key b: only b's key row changes, and one server row appears
    clear_messages(row_a, row_b, srv_a1, srv_b1, view.servers_box)
    b2 = spawn(tracker.port, "b")
    wait_free(tracker.port, "b", 2)
    summary = picker.poll_once()
    assert {"key": "b", "total": 2, "free": 2, "pending": 0} in summary.key_rows()
    assert value_updates(row_b) == 1 and ">2<" in row_b.value
    assert value_updates(row_a) == value_updates(srv_a1) == value_updates(srv_b1) == 0
    assert view.key_rows["b"] is row_b  # the same widget, a new value
    new_row = view.server_rows[server_addr(b2)]
    assert new_row in view.servers_box.children and server_addr(b2) in new_row.value

    # an unchanged tracker sends nothing at all
    clear_messages(row_a, row_b, srv_a1, srv_b1, new_row)
    picker.poll_once()
    assert sum(value_updates(w) for w in (row_a, row_b, srv_a1, srv_b1, new_row)) == 0

    # key a's only server leaves: its key row and server row go (and are closed); b's rows are untouched
    a1.terminate()
    assert wait_until(lambda: "a" not in [row["key"] for row in summary_of(tracker.port).key_rows()], 20)
    picker.poll_once()
    assert "a" not in view.key_rows and row_a not in view.keys_box.children and row_a.comm is None
    assert server_addr(a1) not in view.server_rows and srv_a1 not in view.servers_box.children
    assert value_updates(row_b) == value_updates(srv_b1) == value_updates(new_row) == 0
    assert view.key_select.options == ("b",)


def test_rows_escape_what_the_tracker_sends():
    from workbench.notebook.picker import key_row_html, server_row_html

    html = key_row_html({"key": "<img src=x onerror=alert(1)>", "total": 1, "free": 1, "pending": 0})
    assert "<img" not in html and "&lt;img" in html
    html = server_row_html({"address": "h:1", "key": "k", "arch": "", "target": "", "devices": "",
                            "labels": 'x="><script>'})
    assert "<script>" not in html


def test_unreachable_tracker_shows_one_line_and_recovers_on_the_same_port(trackers, spawn, picker_factory):
    first = trackers()
    port = first.port
    spawn(port, "local")
    wait_free(port, "local", 1)
    picker = picker_factory((LOCAL, port), interval=0.1, backoff_max=0.5)
    assert wait_until(lambda: "local" in picker.view.key_rows)

    first.terminate()
    assert wait_until(lambda: "unreachable" in picker.view.header.value, 10), picker.view.header.value
    header = picker.view.header.value
    assert f"{LOCAL}:{port}" in header and "retrying in" in header and header.count("unreachable") == 1
    assert picker.error.startswith(f"tracker {LOCAL}:{port} unreachable")
    assert "unreachable" in repr(picker)
    with pytest.raises(RPCError, match="unreachable.*is it running"):
        picker.poll_once()

    # a tracker comes back on that port: the old server re-registers, a new one joins, the panel refills itself
    trackers(port)
    fresh = spawn(port, "fresh")
    assert wait_until(lambda: {"local", "fresh"} <= set(picker.view.key_rows), 30), picker.view.header.value
    assert server_addr(fresh) in picker.view.server_rows
    assert wait_until(lambda: "unreachable" not in picker.view.header.value)
    assert picker.error is None


# -- threads and closing ----------------------------------------------------------------------
def test_close_stops_the_thread_and_closes_the_widgets(tracker, picker_factory):
    picker = picker_factory(f"{LOCAL}:{tracker.port}", interval=0.05)
    assert wait_until(lambda: picker.summary is not None)
    assert len(picker_threads("poll")) == 1
    root = picker.widget
    picker.close()
    assert picker_threads() == []
    assert picker.closed and picker.widget is None and root.comm is None
    picker.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        picker.connect("local")


def test_a_hung_tracker_is_reported_and_close_still_ends_the_thread(picker_factory):
    with socket.socket() as hung:  # accepts connections (the kernel's backlog) and never answers
        hung.bind((LOCAL, 0))
        hung.listen(8)
        address = f"{LOCAL}:{hung.getsockname()[1]}"
        picker = picker_factory(address, interval=0.05)
        assert len(picker_threads("poll")) == 1
        picker.close()  # the thread is waiting for the tracker's answer: close() waits for it to end
        assert picker_threads() == []

        picker = picker_factory(address, interval=0.05)
        assert wait_until(lambda: "unreachable" in picker.view.header.value, 30), picker.view.header.value
        assert address in picker.view.header.value
        picker.close()
        assert picker_threads() == []


def test_closing_the_widget_or_dropping_the_picker_stops_polling(tracker):
    from workbench.notebook.picker import DevicePicker

    picker = DevicePicker(f"{LOCAL}:{tracker.port}", interval=0.05)
    assert wait_until(lambda: picker.summary is not None)
    picker.widget.close()  # as a front end closing the panel
    assert picker.closed and picker_threads() == []

    picker = DevicePicker(f"{LOCAL}:{tracker.port}", interval=0.05)
    assert wait_until(lambda: picker.summary is not None)
    root, ref = picker.widget, weakref.ref(picker)
    del picker
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())
    assert wait_until(lambda: picker_threads() == [], 10)
    assert root.comm is None


def test_display_bundle_carries_the_widget_and_a_static_table(tracker, spawn, picker_factory):
    spawn(tracker.port, "local")
    wait_free(tracker.port, "local", 1)
    picker = picker_factory(f"{LOCAL}:{tracker.port}")
    picker.poll_once()
    bundle = picker._repr_mimebundle_()
    assert bundle[WIDGET_VIEW]["model_id"] == picker.widget.model_id
    assert "<h4>Queues</h4>" in bundle["text/html"] and "local" in bundle["text/html"]
    assert bundle["text/plain"].startswith("<DevicePicker tracker")


# -- Connect and Cancel -----------------------------------------------------------------------
def test_connect_binds_the_session_into_the_namespace(tracker, spawn, picker_factory, closing):
    srv = spawn(tracker.port, "local")
    spawn(tracker.port, "other")
    wait_free(tracker.port, "local", 1)
    wait_free(tracker.port, "other", 1)
    namespace: dict = {}
    connected = []
    picker = picker_factory(f"{LOCAL}:{tracker.port}", namespace=namespace, name="board",
                            on_connect=connected.append)
    picker.poll_once()
    picker.view.key_select.value = "local"
    picker.view.connect_button.click()
    assert wait_until(lambda: picker.session is not None or "could not" in picker.view.status.value, 30)
    session = picker.session
    closing.append(session)
    assert namespace == {"board": session} and connected == [session]
    assert session.address == server_addr(srv)
    assert session.listdir(".") == []  # a working session on that server
    assert f"connected to {server_addr(srv)} as `board`" in picker.view.status.value
    assert wait_until(lambda: picker_threads("connect") == [])
    assert not picker.view.connect_button.disabled


def test_connect_binds_into_the_ipython_namespace_when_none_is_given(tracker, spawn, picker_factory, closing):
    from IPython.core.interactiveshell import InteractiveShell

    spawn(tracker.port, "local")
    wait_free(tracker.port, "local", 1)
    existed = InteractiveShell.initialized()
    shell = InteractiveShell.instance()
    try:
        picker = picker_factory(f"{LOCAL}:{tracker.port}", name="picked")
        picker.connect("local")
        assert wait_until(lambda: picker.session is not None or "could not" in picker.view.status.value, 30)
        closing.append(picker.session)
        assert shell.user_ns["picked"] is picker.session
        assert "as `picked`" in picker.view.status.value
    finally:
        shell.user_ns.pop("picked", None)
        if not existed:
            InteractiveShell.clear_instance()


def test_connect_while_busy_shows_the_queue_position_and_cancel_leaves_the_queue(
        tracker, spawn, picker_factory, closing):
    spawn(tracker.port, "local")
    wait_free(tracker.port, "local", 1)
    ts = rpc.connect_tracker(LOCAL, tracker.port)
    closing.append(ts)
    held = ts.request("local")  # every "local" server is busy now
    closing.append(held)
    namespace: dict = {}
    picker = picker_factory(f"{LOCAL}:{tracker.port}", namespace=namespace)
    picker.poll_once()
    picker.view.connect_button.click()
    assert wait_until(lambda: "1st in the queue for 'local'" in picker.view.status.value.replace("&#x27;", "'"), 15), \
        picker.view.status.value
    assert "waited" in picker.view.status.value
    assert picker.view.cancel_button.layout.display != "none" and picker.view.connect_button.disabled
    assert summary_of(tracker.port)["queue_info"]["local"]["pending"] == 1

    picker.view.cancel_button.click()
    assert wait_until(lambda: "cancelled" in picker.view.status.value, 10), picker.view.status.value
    assert wait_until(lambda: summary_of(tracker.port)["queue_info"]["local"]["pending"] == 0, 10)
    assert picker.session is None and namespace == {}
    assert wait_until(lambda: picker_threads("connect") == [])
    assert picker.view.cancel_button.layout.display == "none"

    held.close()  # the freed server goes back on offer: nobody stale took it
    wait_free(tracker.port, "local", 1)


def test_connect_without_a_key_says_what_to_do(tracker, picker_factory):
    picker = picker_factory(f"{LOCAL}:{tracker.port}")
    picker.poll_once()
    assert picker.view.key_select.options == () and picker.view.connect_button.disabled
    picker.connect()
    assert "choose a device key" in picker.view.status.value
    assert picker_threads("connect") == []


def test_bad_arguments_are_refused():
    from workbench.notebook.picker import DevicePicker

    with pytest.raises(ValueError, match="host:port"):
        DevicePicker("nonsense")
    with pytest.raises(ValueError, match="identifier"):
        DevicePicker("127.0.0.1:9190", name="not a name")
    with pytest.raises(ValueError, match="interval"):
        DevicePicker("127.0.0.1:9190", interval=0)
    assert picker_threads() == []


# -- without ipywidgets ---------------------------------------------------------------------------
FALLBACK = r"""
import sys, threading
sys.modules["ipywidgets"] = None
from workbench.notebook.picker import DevicePicker
assert "matplotlib" not in sys.modules and "ipywidgets" not in [m for m in sys.modules if sys.modules[m]]
live = DevicePicker("127.0.0.1:%(live)d")
bundle = live._repr_mimebundle_()
assert "application/vnd.jupyter.widget-view+json" not in bundle, bundle
assert live.widget is None
assert not [t for t in threading.enumerate() if t.name.startswith("DevicePicker")]
print(bundle["text/html"])
print("-----")
print(DevicePicker("127.0.0.1:%(dead)d")._repr_html_())
"""


def test_without_ipywidgets_a_static_table_is_shown(tracker, spawn):
    srv = spawn(tracker.port, "local")
    wait_free(tracker.port, "local", 1)
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind((LOCAL, 0))
        dead = sock.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, "-c", FALLBACK % {"live": tracker.port, "dead": dead}],
                            capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    live, down = result.stdout.split("-----")
    assert "<h4>Queues</h4>" in live and "<h4>Servers</h4>" in live
    assert server_addr(srv) in live and "local" in live
    assert f"tracker {LOCAL}:{dead} unreachable" in down


def test_imports_stay_light():
    code = ("import sys; import workbench.rpc.tracker.summary, workbench.rpc.client.tracker_session; "
            "bad = [m for m in ('IPython', 'ipywidgets', 'matplotlib') if m in sys.modules]; "
            "import workbench.notebook.picker; "
            "bad += [m for m in ('matplotlib',) if m in sys.modules]; print(bad)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_polls_of_an_unreachable_tracker_back_off_to_the_cap(picker_factory):
    """Each failed poll doubles the wait (interval * 2**failures) up to backoff_max, and the panel says when."""
    with socket.socket() as placeholder:  # a port nothing listens on
        placeholder.bind((LOCAL, 0))
        port = placeholder.getsockname()[1]
    picker = picker_factory((LOCAL, port), interval=5.0, backoff_max=40.0)
    assert wait_until(lambda: picker.error is not None, 10)  # the background thread's first poll: then it sleeps 10 s
    delays = [picker._tick() for _ in range(3)]
    assert delays == [20.0, 40.0, 40.0], delays
    assert "retrying in 40" in picker.view.header.value, picker.view.header.value


def test_servers_behind_one_address_are_separate_rows(tracker, picker_factory):
    """Two servers registered with one address (behind a NAT, or one custom_addr) are two rows, not one."""
    from workbench.notebook.picker import _server_ids

    summary = TrackerSummary({
        "queue_info": {"k": {"free": 2, "pending": 0}},
        "server_info": [{"addr": ["10.0.0.9", 9190], "key": "server:k", "arch": "aarch64"},
                        {"addr": ["10.0.0.9", 9190], "key": "server:k", "arch": "x86_64"}],
    })
    rows = summary.server_rows()
    assert [r["address"] for r in rows] == ["10.0.0.9:9190"] * 2 and {r["arch"] for r in rows} == {"aarch64", "x86_64"}
    assert len(set(_server_ids(rows))) == 2
    picker = picker_factory(f"{LOCAL}:{tracker.port}", interval=60.0)
    assert wait_until(lambda: picker.summary is not None)  # the first poll is done; the next is a minute away
    picker.view.show_summary(summary, "10.0.0.9:9190")
    assert len(picker.view.server_rows) == 2
    shown = " ".join(widget.value for widget in picker.view.server_rows.values())
    assert "aarch64" in shown and "x86_64" in shown
