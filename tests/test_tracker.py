"""rpc.Tracker, TrackerSession and server registration: real processes on loopback.

Queue order and the wire format are checked with raw tracker connections
(``TrackerConnection`` or plain sockets): requests are queued while no server
is free, then slots are offered one by one with PUT from another connection,
and the test reads which request got which. Everything else runs our real
servers, tracker and CLIs, each on a free port of 127.0.0.1.
"""
from __future__ import annotations

import os
import platform
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from workbench import rpc
from workbench.cc.compiler import target_triple
from workbench.errors import KeyMismatchError
from workbench.rpc.client.tracker_session import TrackerError
from workbench.rpc.tracker.summary import format_summary
from workbench.rpc.tracker.wire import MAGIC_BYTES, MAX_MESSAGE, Code, TrackerConnection, encode

from .conftest import assert_clean, session_workspaces, wait_until
from .wire import closed_by_peer, recv_exact

LOCAL = "127.0.0.1"
CPU = 1  # DLPack device type of the CPU


# -- fixtures and helpers ---------------------------------------------------------------
@pytest.fixture
def tracker():
    trk = rpc.Tracker(port=0, silent=True)
    try:
        yield trk
    finally:
        trk.terminate()
    assert not trk.alive


@pytest.fixture
def session(tracker, closing):
    """A TrackerSession on the ``tracker`` fixture."""
    ts = rpc.connect_tracker(LOCAL, tracker.port)
    closing.append(ts)
    return ts


def wire(closing: list, port: int) -> TrackerConnection:
    conn = TrackerConnection(LOCAL, port, timeout=10)
    closing.append(conn)
    return conn


def plain(closing: list, port: int) -> socket.socket:
    sock = socket.create_connection((LOCAL, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    closing.append(sock)
    return sock


def queue(ts: rpc.TrackerSession, key: str) -> dict:
    return ts.summary()["queue_info"].get(key, {"free": 0, "pending": 0})


def wait_queue(ts: rpc.TrackerSession, key: str, free: int | None = None, pending: int | None = None,
               timeout: float = 10.0) -> None:
    def ok() -> bool:
        q = queue(ts, key)
        return (free is None or q["free"] == free) and (pending is None or q["pending"] == pending)

    assert wait_until(ok, timeout), f"queue {key!r}: wanted free={free} pending={pending}, it is {queue(ts, key)}"


def servers_of(ts: rpc.TrackerSession, key: str) -> list[dict]:
    return [s for s in ts.summary()["server_info"] if s.get("key") == f"server:{key}"]


def put(conn: TrackerConnection, key: str, port: int, matchkey: str, custom_addr: str | None = None) -> None:
    assert conn.call([Code.PUT, key, [port, matchkey], custom_addr]) == Code.SUCCESS


def granted(clients: dict[str, TrackerConnection], timeout: float = 5.0) -> tuple[str, list]:
    """The one client that received a grant, and the grant ``[host, port, matchkey]``."""
    names = {c.sock: name for name, c in clients.items()}
    ready, _, _ = select.select(list(names), [], [], timeout)
    assert len(ready) == 1, f"expected one grant, got {[names[s] for s in ready]}"
    name = names[ready[0]]
    reply = clients[name].recv()
    assert reply[0] == Code.SUCCESS, reply
    return name, reply[1]


def no_grant(clients, wait: float = 0.2) -> bool:
    ready, _, _ = select.select([c.sock for c in clients], [], [], wait)
    return not ready




def read_reply(sock: socket.socket):
    import json

    (size,) = struct.unpack("<i", recv_exact(sock, 4))
    return json.loads(recv_exact(sock, size))




def port_of(remote) -> int:
    return int(remote.address.rsplit(":", 1)[1])


def start_tracker_on(port: int, deadline_s: float = 10.0) -> rpc.Tracker:
    """A tracker on exactly ``port`` (retrying briefly should something else hold it for a moment)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return rpc.Tracker(port=port, port_end=port + 1, silent=True)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- the tracker process and its wire format ----------------------------------------------
def test_tracker_process_port_range_and_terminate():
    first = rpc.Tracker(port=0, silent=True)
    try:
        assert first.alive and first.port > 0 and f"{LOCAL}:{first.port} running" in repr(first)
        # its port is taken: the next tracker takes the next free one of [port, port_end)
        with rpc.Tracker(port=first.port, port_end=first.port + 20, silent=True) as second:
            assert first.port < second.port < first.port + 20
            conn = TrackerConnection(LOCAL, second.port)
            assert conn.call([Code.PING]) == Code.SUCCESS
            conn.close()
        assert not second.alive
    finally:
        first.terminate()
    assert not first.alive and "stopped" in repr(first)
    with pytest.raises(ConnectionRefusedError, match=rf"tracker at {LOCAL}:{first.port}.*is it running"):
        TrackerConnection(LOCAL, first.port, timeout=2)


def test_magic_and_first_message_in_one_segment(tracker, closing):
    sock = plain(closing, tracker.port)
    sock.sendall(MAGIC_BYTES + encode([Code.SUMMARY]))  # one write: one segment on loopback
    assert recv_exact(sock, 4) == MAGIC_BYTES
    assert read_reply(sock) == [Code.SUCCESS, {"queue_info": {}, "server_info": []}]
    # and split the other way: every byte in its own segment
    sock2 = plain(closing, tracker.port)
    for byte in MAGIC_BYTES + encode([Code.PING]) + encode([Code.PUT, "split", [9000, "split:1"], None]):
        sock2.send(bytes([byte]))
        time.sleep(0.001)
    assert recv_exact(sock2, 4) == MAGIC_BYTES
    assert read_reply(sock2) == Code.SUCCESS
    assert read_reply(sock2) == Code.SUCCESS
    sock2.sendall(encode([Code.GET_PENDING_MATCHKEYS]))
    assert read_reply(sock2) == ["split:1"]


BAD_INPUT = {
    "not a tracker client": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "over the size limit": MAGIC_BYTES + struct.pack("<i", MAX_MESSAGE + 1),
    "negative size": MAGIC_BYTES + struct.pack("<i", -1),
    "malformed JSON": MAGIC_BYTES + struct.pack("<i", 9) + b"{not json",
    "not UTF-8": MAGIC_BYTES + struct.pack("<i", 4) + b"\xff\xfe\xfd\xfc",
    "not an array": MAGIC_BYTES + encode({"code": 6}),
    "unknown code": MAGIC_BYTES + encode([99]),
    "PUT without its fields": MAGIC_BYTES + encode([Code.PUT, "k"]),
    "REQUEST with a bad priority": MAGIC_BYTES + encode([Code.REQUEST, "k", "me", "high"]),
    "UPDATE_INFO not an object": MAGIC_BYTES + encode([Code.UPDATE_INFO, [1, 2]]),
}


def test_bad_input_closes_that_connection_only(tracker, closing, session):
    good = wire(closing, tracker.port)
    put(good, "survivor", 9000, "survivor:1")
    waiting = wire(closing, tracker.port)
    waiting.send([Code.REQUEST, "lonely", "me", 1])
    wait_queue(session, "lonely", pending=1)
    for what, payload in BAD_INPUT.items():
        sock = plain(closing, tracker.port)
        sock.sendall(payload)
        echoed = closed_by_peer(sock)
        assert echoed in (b"", MAGIC_BYTES), f"{what}: the tracker answered {echoed!r}"
    # a good connection that turns bad: closed, and its slot leaves the free list
    turned = plain(closing, tracker.port)
    turned.sendall(MAGIC_BYTES + encode([Code.PUT, "survivor", [9001, "survivor:2"], None]))
    assert recv_exact(turned, 4) == MAGIC_BYTES and read_reply(turned) == Code.SUCCESS
    wait_queue(session, "survivor", free=2)
    turned.sendall(struct.pack("<i", 3) + b"nul")
    assert closed_by_peer(turned) == b""
    wait_queue(session, "survivor", free=1)
    # the tracker goes on serving everyone else, state intact
    assert tracker.alive
    assert good.call([Code.PING]) == Code.SUCCESS
    assert good.call([Code.GET_PENDING_MATCHKEYS]) == ["survivor:1"]
    assert queue(session, "lonely") == {"free": 0, "pending": 1}
    put(good, "lonely", 9002, "lonely:1")
    assert waiting.recv() == [Code.SUCCESS, [LOCAL, 9002, "lonely:1"]]


def test_free_servers_are_handed_out_first_in_first_out(tracker, closing, session):
    a, b, client = wire(closing, tracker.port), wire(closing, tracker.port), wire(closing, tracker.port)
    put(a, "fifo", 9001, "fifo:a1")
    put(b, "fifo", 9002, "fifo:b1")
    put(a, "fifo", 9003, "fifo:a2", custom_addr="10.0.0.7")  # handed out under the address it gave
    assert queue(session, "fifo") == {"free": 3, "pending": 0}
    assert a.call([Code.GET_PENDING_MATCHKEYS]) == ["fifo:a1", "fifo:a2"]
    grants = [client.call([Code.REQUEST, "fifo", "me", 1]) for _ in range(3)]
    assert grants == [
        [Code.SUCCESS, [LOCAL, 9001, "fifo:a1"]],
        [Code.SUCCESS, [LOCAL, 9002, "fifo:b1"]],
        [Code.SUCCESS, ["10.0.0.7", 9003, "fifo:a2"]],
    ]
    assert queue(session, "fifo") == {"free": 0, "pending": 0}
    assert a.call([Code.GET_PENDING_MATCHKEYS]) == [] and b.call([Code.GET_PENDING_MATCHKEYS]) == []
    # one port may offer several slots (a proxy does); a match key offered twice is one slot
    put(a, "fifo", 9001, "fifo:x1")
    put(a, "fifo", 9001, "fifo:x2")
    put(a, "fifo", 9001, "fifo:x1")
    assert queue(session, "fifo") == {"free": 2, "pending": 0}
    assert a.call([Code.GET_PENDING_MATCHKEYS]) == ["fifo:x1", "fifo:x2"]
    assert client.call([Code.REQUEST, "fifo", "me", 1]) == [Code.SUCCESS, [LOCAL, 9001, "fifo:x1"]]
    assert client.call([Code.REQUEST, "fifo", "me", 1]) == [Code.SUCCESS, [LOCAL, 9001, "fifo:x2"]]
    assert queue(session, "fifo") == {"free": 0, "pending": 0}


def test_waiting_requests_by_priority_then_arrival(tracker, closing, session):
    order = [("a", 1), ("b", 5), ("c", 1), ("d", 5), ("e", 3), ("f", -2), ("g", 3)]
    clients = {}
    for n, (name, priority) in enumerate(order, 1):
        clients[name] = wire(closing, tracker.port)
        clients[name].send([Code.REQUEST, "prio", f"user-{name}", priority])
        wait_queue(session, "prio", pending=n)  # so arrival order is the order above
    assert queue(session, "prio") == {"free": 0, "pending": len(order)}
    assert no_grant(clients.values())
    srv = wire(closing, tracker.port)
    served = []
    for i in range(len(order)):
        put(srv, "prio", 9100 + i, f"prio:{i}")
        name, grant = granted(clients)
        assert grant == [LOCAL, 9100 + i, f"prio:{i}"]  # each slot goes to the best waiting request at once
        served.append(name)
        del clients[name]
        assert queue(session, "prio") == {"free": 0, "pending": len(order) - i - 1}
    assert served == ["b", "d", "e", "g", "a", "c", "f"]
    put(srv, "prio", 9200, "prio:left")
    assert queue(session, "prio") == {"free": 1, "pending": 0}


def test_request_of_a_disconnected_client_leaves_the_queue(tracker, closing, session):
    gone, stays = wire(closing, tracker.port), wire(closing, tracker.port)
    gone.send([Code.REQUEST, "dc", "gone", 10])
    gone.send([Code.REQUEST, "dc", "gone", 10])
    wait_queue(session, "dc", pending=2)
    stays.send([Code.REQUEST, "dc", "stays", 1])
    wait_queue(session, "dc", pending=3)
    gone.close()
    wait_queue(session, "dc", pending=1)  # not counted as pending any more
    srv = wire(closing, tracker.port)
    put(srv, "dc", 9300, "dc:1")  # the higher-priority requests are gone: the remaining one gets it
    assert stays.recv() == [Code.SUCCESS, [LOCAL, 9300, "dc:1"]]
    put(srv, "dc", 9301, "dc:2")  # and nobody is handed this one
    time.sleep(0.2)
    assert queue(session, "dc") == {"free": 1, "pending": 0}
    assert srv.call([Code.GET_PENDING_MATCHKEYS]) == ["dc:2"]


def test_server_connection_closing_leaves_the_free_list(tracker, closing, session):
    # slots offered without UPDATE_INFO
    anon = wire(closing, tracker.port)
    put(anon, "drop", 9400, "drop:1")
    put(anon, "drop", 9401, "drop:2")
    # and a server that described itself first
    described = wire(closing, tracker.port)
    assert described.call([Code.UPDATE_INFO, {"key": "server:drop", "addr": [None, 9402]}]) == Code.SUCCESS
    put(described, "drop", 9402, "drop:3")
    assert queue(session, "drop") == {"free": 3, "pending": 0}
    assert servers_of(session, "drop") == [{"key": "server:drop", "addr": [LOCAL, 9402]}]
    anon.close()
    wait_queue(session, "drop", free=1)
    described.close()
    wait_queue(session, "drop", free=0)
    assert servers_of(session, "drop") == []
    with pytest.raises(TrackerError, match="key 'drop'.*0 server"):
        session.request("drop", timeout=0.3)  # no slot of a closed connection is handed out
    assert queue(session, "drop") == {"free": 0, "pending": 0}


# -- servers registering ------------------------------------------------------------------
def test_server_publishes_what_it_is(tracker, spawn, session):
    labels = {"board": "rpi4", "room": "lab 2"}
    srv = spawn(tracker.port, "board", labels=labels)
    plain_srv = spawn(tracker.port, "board")
    wait_queue(session, "board", free=2)
    info = {s["addr"][1]: s for s in servers_of(session, "board")}
    assert set(info) == {srv.port, plain_srv.port}
    mine = info[srv.port]
    assert mine["key"] == "server:board"
    assert mine["addr"] == [LOCAL, srv.port]
    assert [CPU, 0] in mine["devices"]
    assert mine["arch"] == platform.machine()
    assert mine["cpu_count"] == os.cpu_count()
    assert mine["target"] == target_triple()
    assert mine["labels"] == labels
    assert info[plain_srv.port]["labels"] == {}
    srv.terminate()  # its registration connection closes: it leaves the list and the free slots
    wait_queue(session, "board", free=1)
    assert [s["addr"][1] for s in servers_of(session, "board")] == [plain_srv.port]


def test_custom_addr_and_match_key(tracker, spawn, session, closing, private_tmpdir):
    srv = spawn(tracker.port, "cust", custom_addr="10.1.2.3")
    wait_queue(session, "cust", free=1)
    assert [s["addr"] for s in servers_of(session, "cust")] == [["10.1.2.3", srv.port]]
    client = wire(closing, tracker.port)
    code, (host, port, matchkey) = client.call([Code.REQUEST, "cust", "me", 1])
    assert (code, host, port) == (Code.SUCCESS, "10.1.2.3", srv.port) and matchkey.startswith("cust:")
    # the server takes only the match key the tracker handed out
    with pytest.raises(KeyMismatchError, match=r"handed out by a tracker.*connect_tracker"):
        rpc.connect(LOCAL, port, key="cust")
    remote = rpc.connect(LOCAL, port, key=matchkey)
    assert remote.listdir(".") == []
    assert queue(session, "cust")["free"] == 0
    remote.close()
    wait_queue(session, "cust", free=1)
    assert_clean(srv, private_tmpdir)


def test_server_registers_again_after_every_session(tracker, spawn, session, closing, private_tmpdir):
    srv = spawn(tracker.port, "again")
    wait_queue(session, "again", free=1)
    client = wire(closing, tracker.port)
    matchkeys = []
    for i in range(3):
        code, (host, port, matchkey) = client.call([Code.REQUEST, "again", "me", 1])
        assert (code, host, port) == (Code.SUCCESS, LOCAL, srv.port)
        matchkeys.append(matchkey)
        assert queue(session, "again") == {"free": 0, "pending": 0}
        with rpc.connect(host, port, key=matchkey) as remote:
            remote.upload(b"x" * (i + 1), target=f"f{i}")
            assert remote.listdir(".") == [f"f{i}"]  # a fresh workspace each session
        wait_queue(session, "again", free=1, timeout=3)  # offered again at once (not by the unmatched timer)
    assert len(set(matchkeys)) == 3
    with pytest.raises(KeyMismatchError):
        rpc.connect(LOCAL, srv.port, key=matchkeys[0])  # a used match key is spent
    # and through TrackerSession.request
    for session_timeout in (0, 30):
        remote = session.request("again", session_timeout=session_timeout, timeout=10)
        assert port_of(remote) == srv.port and remote.info["session_timeout"] == session_timeout
        remote.close()
        wait_queue(session, "again", free=1, timeout=3)
    assert_clean(srv, private_tmpdir)
    assert len(servers_of(session, "again")) == 1  # re-registering never duplicates the server


def test_unused_match_key_is_offered_again(tracker, spawn, session, closing, monkeypatch, private_tmpdir):
    monkeypatch.setenv("WORKBENCH_UNMATCHED_TIMEOUT_S", "0.5")
    monkeypatch.setenv("WORKBENCH_TRACKER_CHECK_S", "0.1")
    srv = spawn(tracker.port, "unused")
    wait_queue(session, "unused", free=1)
    client = wire(closing, tracker.port)
    granted_at = time.monotonic()
    code, (_, port, stale) = client.call([Code.REQUEST, "unused", "me", 1])  # ... and never connect
    assert queue(session, "unused")["free"] == 0
    wait_queue(session, "unused", free=1, timeout=10)
    assert time.monotonic() - granted_at >= 0.45  # not before the unmatched timeout
    with pytest.raises(KeyMismatchError):
        rpc.connect(LOCAL, port, key=stale)  # the stale key is spent
    # a server in use is not offered again, however long the session lasts
    remote = session.request("unused", timeout=10)
    time.sleep(1.5)  # three unmatched timeouts
    assert queue(session, "unused") == {"free": 0, "pending": 0}
    assert remote.listdir(".") == []
    remote.close()
    wait_queue(session, "unused", free=1)
    assert_clean(srv, private_tmpdir)


# -- sessions through the tracker -----------------------------------------------------------
def test_two_clients_share_one_server(tracker, spawn, session, closing, private_tmpdir):
    srv = spawn(tracker.port, "shared")
    wait_queue(session, "shared", free=1)
    first = session.request("shared", timeout=10)
    first.upload(b"mine", target="first.txt")
    other = rpc.connect_tracker(LOCAL, tracker.port)
    closing.append(other)
    got: dict = {}

    def second_client() -> None:
        try:
            got["session"] = other.request("shared", timeout=20)
            got["at"] = time.monotonic()
        except BaseException as exc:  # reported by the assertions below
            got["error"] = exc

    thread = threading.Thread(target=second_client, daemon=True)
    thread.start()
    wait_queue(session, "shared", free=0, pending=1)  # the second waits ...
    time.sleep(0.3)
    assert thread.is_alive() and not got
    assert first.listdir(".") == ["first.txt"]
    released_at = time.monotonic()
    first.close()
    thread.join(15)  # ... then gets it
    assert not thread.is_alive() and "error" not in got, got
    second = got["session"]
    closing.append(second)
    assert got["at"] >= released_at and port_of(second) == srv.port
    assert second.listdir(".") == []  # its own workspace
    assert queue(session, "shared") == {"free": 0, "pending": 0}
    second.close()
    wait_queue(session, "shared", free=1)
    assert_clean(srv, private_tmpdir)


def test_request_priority_through_tracker_sessions(tracker, spawn, session, closing, private_tmpdir):
    srv = spawn(tracker.port, "prio2")
    wait_queue(session, "prio2", free=1)
    holder = session.request("prio2", timeout=10)
    served: list[str] = []
    lock = threading.Lock()

    def client(name: str, priority: int) -> None:
        ts = rpc.connect_tracker(LOCAL, tracker.port)
        try:
            remote = ts.request("prio2", priority=priority, timeout=20)
            with lock:
                served.append(name)
            time.sleep(0.1)
            remote.close()
        finally:
            ts.close()

    threads = []
    for n, (name, priority) in enumerate([("low", 1), ("high", 9), ("mid", 5)], 1):
        threads.append(threading.Thread(target=client, args=(name, priority), daemon=True))
        threads[-1].start()
        wait_queue(session, "prio2", pending=n)
    holder.close()
    for thread in threads:
        thread.join(20)
    assert not any(t.is_alive() for t in threads)
    assert served == ["high", "mid", "low"]
    wait_queue(session, "prio2", free=1, pending=0)
    assert_clean(srv, private_tmpdir)


CLIENT_SCRIPT = """
import sys
from workbench import rpc
rpc.connect_tracker("127.0.0.1", int(sys.argv[1])).request("queued", timeout=60, wait=True)
"""


def test_client_dying_while_queued(tracker, spawn, session, private_tmpdir):
    proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(tracker.port)])
    try:
        wait_queue(session, "queued", pending=1, timeout=20)
        proc.kill()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_queue(session, "queued", pending=0)  # it left the queue at once
    srv = spawn(tracker.port, "queued")
    wait_queue(session, "queued", free=1)
    time.sleep(0.3)
    assert queue(session, "queued") == {"free": 1, "pending": 0}  # nobody was handed the new server
    remote = session.request("queued", timeout=10)
    assert port_of(remote) == srv.port and remote.listdir(".") == []
    remote.close()
    wait_queue(session, "queued", free=1)
    assert_clean(srv, private_tmpdir)


def test_request_failure_says_key_servers_and_wait(tracker, spawn, session, closing, private_tmpdir):
    with pytest.raises(ValueError, match="max_retry"):
        session.request("nobody", max_retry=0)
    start = time.monotonic()
    with pytest.raises(TrackerError, match=r"key 'nobody' .* after (0\.[5-9]|1\.\d) s \(0 server\(s\) registered for it\)"):
        session.request("nobody", timeout=0.5, wait=True)  # asked to wait: queues for a key nobody serves
    assert time.monotonic() - start < 5
    assert queue(session, "nobody") == {"free": 0, "pending": 0}  # the timed-out request left the queue
    # a server exists but is busy
    srv = spawn(tracker.port, "busy")
    wait_queue(session, "busy", free=1)
    holder = session.request("busy", timeout=10)
    with pytest.raises(TrackerError, match=r"key 'busy' .* after \d+\.\d s \(1 server\(s\) registered for it\)"):
        session.request("busy", timeout=0.4)
    assert queue(session, "busy") == {"free": 0, "pending": 0}
    holder.close()
    wait_queue(session, "busy", free=1)
    # every granted server refuses: max_retry attempts, then the last error
    ghost = wire(closing, tracker.port)
    assert ghost.call([Code.UPDATE_INFO, {"key": "server:ghost", "addr": [None, 1]}]) == Code.SUCCESS
    for _ in range(2):
        dead = socket.socket()  # bound, not listening: connecting to it is refused
        dead.bind((LOCAL, 0))
        closing.append(dead)
        put(ghost, "ghost", dead.getsockname()[1], f"ghost:{dead.getsockname()[1]}")
    with pytest.raises(TrackerError, match=r"key 'ghost' .*\(1 server\(s\) registered for it\); last error: cannot connect"):
        session.request("ghost", max_retry=2, timeout=10)
    assert_clean(srv, private_tmpdir)


def test_request_and_run_retries_on_another_server(tracker, spawn, session, private_tmpdir):
    servers = {s.port: s for s in (spawn(tracker.port, "flaky"), spawn(tracker.port, "flaky"))}
    wait_queue(session, "flaky", free=2)
    attempts: list[int] = []

    def run(remote):
        attempts.append(port_of(remote))
        remote.upload(b"data", target="in.bin")
        if len(attempts) == 1:
            servers[attempts[0]].terminate()  # the server drops mid-run
        return remote.listdir(".")

    assert session.request_and_run("flaky", run) == ["in.bin"]
    assert len(attempts) == 2 and attempts[0] != attempts[1]
    survivor = servers[attempts[1]]
    wait_queue(session, "flaky", free=1, timeout=5)  # released on return, not when garbage is collected
    assert wait_until(lambda: [s["addr"][1] for s in servers_of(session, "flaky")] == [survivor.port])

    # an error of func itself is not retried, and the server is released
    calls = []

    def fails(remote):
        calls.append(port_of(remote))
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        session.request_and_run("flaky", fails)
    assert calls == [survivor.port]
    wait_queue(session, "flaky", free=1, timeout=5)

    # every attempt drops: the error names the function, the key and the attempts
    def kills(remote):
        survivor.terminate()
        return remote.listdir(".")

    with pytest.raises(TrackerError, match=r"kills failed on key 'flaky' 1 times; last error: .*lost"):
        session.request_and_run("flaky", kills, max_retry=1)
    wait_queue(session, "flaky", free=0)
    assert wait_until(lambda: servers_of(session, "flaky") == [])
    assert wait_until(lambda: not session_workspaces(private_tmpdir))


def test_tracker_restart_servers_come_back(spawn, monkeypatch, private_tmpdir):
    monkeypatch.setenv("WORKBENCH_TRACKER_CHECK_S", "0.1")
    first = rpc.Tracker(port=0, silent=True)
    port = first.port
    second = None
    try:
        pair = {s.port: s for s in (spawn(port, "phoenix"), spawn(port, "phoenix"))}
        with rpc.connect_tracker(LOCAL, port) as ts:
            wait_queue(ts, "phoenix", free=2)
            held, other = ts.request("phoenix", timeout=10), ts.request("phoenix", timeout=10)
            busy = pair.pop(port_of(held))  # its session goes on while the tracker restarts
            (idle,) = pair.values()
            other.close()
            wait_queue(ts, "phoenix", free=1)
        first.terminate()
        late = spawn(port, "phoenix")  # starts while no tracker is there: keeps trying
        time.sleep(0.3)
        second = start_tracker_on(port)
        assert second.port == port
        with rpc.connect_tracker(LOCAL, port) as ts:
            wait_queue(ts, "phoenix", free=2)  # `idle` and `late` came back on their own
            assert {s["addr"][1] for s in servers_of(ts, "phoenix")} == {idle.port, late.port}
            assert held.listdir(".") == []  # the session lived through the restart
            held.close()
            wait_queue(ts, "phoenix", free=3)  # `busy` too, once its session ended
            assert {s["addr"][1] for s in servers_of(ts, "phoenix")} == {idle.port, busy.port, late.port}
            remotes = [ts.request("phoenix", timeout=10) for _ in range(3)]
            assert {port_of(r) for r in remotes} == {idle.port, busy.port, late.port}
            for remote in remotes:
                assert remote.listdir(".") == []
                remote.close()
            wait_queue(ts, "phoenix", free=3)
        for srv in (idle, busy, late):
            assert_clean(srv, private_tmpdir)
    finally:
        first.terminate()
        if second is not None:
            second.terminate()


# -- text summary and the CLIs ----------------------------------------------------------------
def table_rows(lines: list[str], title: str) -> tuple[str, list[str]]:
    """The header and the rows of the table under ``title``."""
    at = lines.index(title)
    rule = lines[at + 1]
    assert set(rule) == {"-"}, rule
    header = lines[at + 2]
    assert lines[at + 3] == rule
    end = lines.index(rule, at + 4)
    return header, lines[at + 4 : end]


def test_text_summary_layout(tracker, spawn, session, closing):
    srv = spawn(tracker.port, "rasp")
    proxy = wire(closing, tracker.port)
    assert proxy.call([Code.UPDATE_INFO, {"key": "server:proxy[k0,k1]", "addr": ["10.0.0.9", 9190]}]) == Code.SUCCESS
    for _ in range(2):
        wire(closing, tracker.port).send([Code.REQUEST, "k0", "me", 1])
    wait_queue(session, "k0", pending=2)
    wait_queue(session, "rasp", free=1)
    text = session.text_summary()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert lines[0] == "Server List"
    header, rows = table_rows(lines, "Server List")
    assert header.split() == ["server-address", "key"]
    assert [row.split() for row in rows] == [
        ["10.0.0.9:9190", "server:proxy[k0,k1]"],
        [f"{LOCAL}:{srv.port}", "server:rasp"],
    ]
    assert all(row.index("server:") == header.index("key") for row in rows)  # one column
    header, rows = table_rows(lines, "Queue Status")
    assert header.split() == ["key", "total", "free", "pending"]
    assert [row.split() for row in rows] == [["k0", "1", "0", "2"], ["k1", "1", "0", "0"], ["rasp", "1", "1", "0"]]
    for row in rows:  # numbers under their titles
        for title in ("total", "free", "pending"):
            assert row[header.index(title)].isdigit(), (row, title)
    assert lines[lines.index("Queue Status") - 1] == ""


def test_format_summary_of_seed_003():
    data = {
        "server_info": [{"addr": ["RPC_PROXY_IP", "RPC_PROXY_PORT"], "key": "server:proxy[RPC_KEY0,RPC_KEY1,RPC_KEY2]"}],
        "queue_info": {"RPC_KEY0": {"free": 0, "pending": 3}},
    }
    lines = format_summary(data).splitlines()
    header, rows = table_rows(lines, "Server List")
    # an address longer than the usual column still stands apart from its key
    assert [r.split() for r in rows] == [["RPC_PROXY_IP:RPC_PROXY_PORT", "server:proxy[RPC_KEY0,RPC_KEY1,RPC_KEY2]"]]
    assert rows[0].index("server:") == header.index("key")
    header, rows = table_rows(lines, "Queue Status")
    assert header.split() == ["key", "total", "free", "pending"]
    # TVM prints total 0 here; the proxy does serve each of its keys, so we count it
    assert [r.split() for r in rows] == [
        ["RPC_KEY0", "1", "0", "3"], ["RPC_KEY1", "1", "0", "0"], ["RPC_KEY2", "1", "0", "0"],
    ]
    empty = format_summary({"queue_info": {"idle": {"free": 0, "pending": 0}}, "server_info": []}).splitlines()
    assert table_rows(empty, "Server List")[1] == [] and table_rows(empty, "Queue Status")[1] == []


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_query_rpc_tracker_cli(tracker, spawn, session):
    srv = spawn(tracker.port, "cli-q")
    wait_queue(session, "cli-q", free=1)
    out = run_cli("-m", "workbench.exec.query_rpc_tracker", "--host", LOCAL, "--port", str(tracker.port))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"Tracker address {LOCAL}:{tracker.port}" and lines[1] == ""
    assert "Server List" in lines and "Queue Status" in lines
    assert [r.split() for r in table_rows(lines, "Server List")[1]] == [[f"{LOCAL}:{srv.port}", "server:cli-q"]]
    assert [r.split() for r in table_rows(lines, "Queue Status")[1]] == [["cli-q", "1", "1", "0"]]
    assert out.stdout.count("\n".join(session.text_summary().splitlines())) == 1

    with socket.socket() as unused:  # bound, not listening: nothing answers there
        unused.bind((LOCAL, 0))
        out = run_cli("-m", "workbench.exec.query_rpc_tracker", "--host", LOCAL, "--port", str(unused.getsockname()[1]))
    assert out.returncode == 1 and out.stdout == ""
    assert re.search(r"query_rpc_tracker: cannot connect to a tracker at 127\.0\.0\.1:\d+: .*is it running\?", out.stderr)


def test_rpc_tracker_and_rpc_server_clis(private_tmpdir):
    tracker = subprocess.Popen(
        [sys.executable, "-m", "workbench.exec.rpc_tracker", "--host", LOCAL, "--port", "0", "--port-end", "0"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    log: list[str] = []

    def drain() -> None:
        for line in tracker.stderr:
            log.append(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    server = None
    try:
        assert wait_until(lambda: any("RPCTracker: bind to" in line for line in log), 20), log
        port = int(re.search(r"bind to 127\.0\.0\.1:(\d+)", "".join(log)).group(1))
        server = subprocess.Popen(
            [sys.executable, "-m", "workbench.exec.rpc_server", "--host", LOCAL, "--port", "0",
             "--tracker", f"{LOCAL}:{port}", "--key", "cli", "--custom-addr", LOCAL,
             "--label", "board=rpi4", "--silent"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        )
        with rpc.connect_tracker(LOCAL, port) as ts:
            wait_queue(ts, "cli", free=1, timeout=20)
            (info,) = servers_of(ts, "cli")
            assert info["labels"] == {"board": "rpi4"} and info["addr"][0] == LOCAL
            remote = ts.request("cli", timeout=10)
            assert port_of(remote) == info["addr"][1] and remote.listdir(".") == []
            remote.close()
            wait_queue(ts, "cli", free=1)
        server.send_signal(signal.SIGINT)
        assert server.wait(15) == 0
        tracker.send_signal(signal.SIGINT)
        assert tracker.wait(15) == 0
    finally:
        for proc in (server, tracker):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(5)
        tracker.stderr.close()
    assert wait_until(lambda: not session_workspaces(private_tmpdir))
