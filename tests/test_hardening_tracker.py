"""Issue 7 against the tracker: no stranger can stop it, fill its memory or starve other users.

Each test is one attack of the hardening issue, run against a real tracker
process on 127.0.0.1 with raw sockets, and then checks that the tracker still
serves everyone else with its state intact. Timeouts are configured small (half
a second) so the tests are fast; every wait is bounded.
"""
from __future__ import annotations

import json
import os
import resource
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

from workbench import rpc
from workbench.rpc.tracker.tracker import MAX_REQUESTS_PER_CONN, PRIORITY_MAX, PRIORITY_MIN
from workbench.errors import ProtocolError
from workbench.rpc.tracker.wire import MAGIC_BYTES, Code, MessageReader, TrackerConnection, encode

from .conftest import ROOT, wait_until
from .wire import closed_by_peer

LOCAL = "127.0.0.1"


# -- helpers ------------------------------------------------------------------------------
@pytest.fixture
def tracker():
    trk = rpc.Tracker(port=0, silent=True, handshake_timeout=0.5, idle_timeout=0.5, write_timeout=0.5)
    try:
        yield trk
    finally:
        trk.terminate()
    assert not trk.alive


def wire(closing: list, port: int) -> TrackerConnection:
    conn = TrackerConnection(LOCAL, port, timeout=10)
    closing.append(conn)
    return conn


def raw(closing: list, port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((LOCAL, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    closing.append(sock)
    return sock


def framed(body: bytes) -> bytes:
    """A message body as sent on the wire (for JSON ``json.dumps`` would refuse to write)."""
    return struct.pack("<i", len(body)) + body




def summary_of(conn: TrackerConnection) -> dict:
    reply = conn.call([Code.SUMMARY])
    assert reply[0] == Code.SUCCESS, reply
    return reply[1]


def queue(conn: TrackerConnection, key: str) -> dict | None:
    return summary_of(conn)["queue_info"].get(key)


def put(conn: TrackerConnection, key: str, port: int, matchkey: str) -> None:
    assert conn.call([Code.PUT, key, [port, matchkey], None]) == Code.SUCCESS


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- one message must not kill it -----------------------------------------------------------
MALFORMED = {
    "priority Infinity": b'[4,"k","u",Infinity]',
    "a bare 1e400": b"1e400",
    "priority 1e400": b'[4,"k","u",1e400]',
    "port Infinity": b'[3,"k",[Infinity,"m"]]',
    "NaN": b'[4,"k","u",NaN]',
    "JSON nested 30,000 deep": b"[" * 30_000 + b"]" * 30_000,
    "JSON nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "an integer of 5,000 digits": b'[4,"k","u",' + b"9" * 5000 + b"]",
    "port 10**30": b'[3,"k",[' + str(10**30).encode() + b',"m"]]',
    "port out of range": b'[3,"k",[70000,"m"]]',
    "port as a string": b'[3,"k",["9000","m"]]',
    "port true": b'[3,"k",[true,"m"]]',
    "PUT key not a string": b'[3,5,[9000,"m"]]',
    "PUT where not a pair": b'[3,"k",[9000]]',
    "PUT custom address not a string": b'[3,"k",[9000,"m"],7]',
    "PUT key of 600 characters": b'[3,"' + b"k" * 600 + b'",[9000,"m"]]',
    "REQUEST key a list": b'[4,["k"],"u",1]',
    "REQUEST user a number": b'[4,"k",5,1]',
    "REQUEST priority true": b'[4,"k","u",true]',
    "REQUEST with extra fields": b'[4,"k","u",1,"more"]',
    "UPDATE_INFO key a number": b'[5,{"key":5}]',
    "UPDATE_INFO nested deep": b'[5,{"a":' + b"[" * 20 + b"]" * 20 + b"}]",
    "UPDATE_INFO over 16 KiB": b'[5,{"labels":"' + b"x" * (20 << 10) + b'"}]',
    "SUMMARY with a field": b'[6,"x"]',
    "code true": b"[true]",
    "code a float": b"[1.0]",
    "an empty array": b"[]",
    "a string": b'"hello"',
    "null": b"null",
    "code of 10**30": b"[" + str(10**30).encode() + b"]",
}


def test_malformed_messages_close_that_connection_only(tracker, closing):
    good = wire(closing, tracker.port)
    put(good, "survivor", 9000, "survivor:1")
    waiting = wire(closing, tracker.port)
    waiting.send([Code.REQUEST, "lonely", "me", 1])
    assert wait_until(lambda: queue(good, "lonely") == {"free": 0, "pending": 1}, 5)
    for what, body in MALFORMED.items():
        sock = raw(closing, tracker.port)
        try:
            sock.sendall(MAGIC_BYTES + framed(body))
        except OSError:
            pass  # closed before it read everything: refused all the same
        echoed = closed_by_peer(sock)
        assert echoed in (b"", MAGIC_BYTES), f"{what}: the tracker answered {echoed!r}"
        assert tracker.alive, f"{what} killed the tracker"
    # everyone else is served, state intact
    assert good.call([Code.PING]) == Code.SUCCESS
    assert good.call([Code.GET_PENDING_MATCHKEYS]) == ["survivor:1"]
    assert queue(good, "lonely") == {"free": 0, "pending": 1}
    assert set(summary_of(good)["queue_info"]) == {"survivor", "lonely"}  # no queue of an attacker's key
    put(good, "lonely", 9002, "lonely:1")
    assert waiting.recv() == [Code.SUCCESS, [LOCAL, 9002, "lonely:1"]]


def test_message_reader_refuses_what_would_break_its_reader():
    """Client side too: a reply from a hostile tracker is a ProtocolError, never a RecursionError or inf."""
    for body in (b"[" * 5000 + b"]" * 5000, b"1e400", b"[NaN]", b"-Infinity", b"9" * 5000):
        with pytest.raises(ProtocolError, match="malformed tracker message"):
            MessageReader(expect_magic=False).feed(framed(body))
    assert MessageReader(expect_magic=False).feed(framed(b"[0, 1.5e300]")) == [[0, 1.5e300]]


def test_well_formed_requests_of_tvm_shapes_are_served(tracker, closing):
    """The checks refuse nothing TVM's servers and clients send (float priorities included)."""
    srv = wire(closing, tracker.port)
    assert srv.call([Code.UPDATE_INFO, {"key": "server:tvm", "addr": [None, 9100]}]) == Code.SUCCESS
    assert srv.call([Code.PUT, "tvm", [9100, "tvm:0.123"], None]) == Code.SUCCESS
    assert srv.call([Code.PUT, "tvm", [9101, "tvm:0.456"], "10.0.0.9"]) == Code.SUCCESS
    client = wire(closing, tracker.port)
    assert client.call([Code.REQUEST, "tvm", "", 1]) == [Code.SUCCESS, [LOCAL, 9100, "tvm:0.123"]]
    assert client.call([Code.REQUEST, "tvm", "", 2.5]) == [Code.SUCCESS, ["10.0.0.9", 9101, "tvm:0.456"]]
    assert client.call([Code.STOP, "wrong"]) == Code.FAIL
    assert {"key": "server:tvm", "addr": [LOCAL, 9100]} in summary_of(client)["server_info"]


# -- priorities ------------------------------------------------------------------------------
def test_priorities_are_clamped_to_the_documented_range(tracker, closing):
    order = [("low", PRIORITY_MIN), ("top", PRIORITY_MAX), ("huge", 10**400), ("tiny", -(10**30))]
    clients = {}
    watcher = wire(closing, tracker.port)
    for n, (name, priority) in enumerate(order, 1):
        clients[name] = wire(closing, tracker.port)
        clients[name].send([Code.REQUEST, "prio", name, priority])
        assert wait_until(lambda: (queue(watcher, "prio") or {}).get("pending") == n, 5)
    listed = summary_of(watcher)["waiting"]["prio"]
    assert listed == [{"user": "top", "priority": PRIORITY_MAX}, {"user": "huge", "priority": PRIORITY_MAX},
                      {"user": "low", "priority": PRIORITY_MIN}, {"user": "tiny", "priority": PRIORITY_MIN}]
    srv = wire(closing, tracker.port)
    served = []
    for i in range(len(order)):
        put(srv, "prio", 9300 + i, f"prio:{i}")
        ready, _, _ = select.select([c.sock for c in clients.values()], [], [], 5)
        assert len(ready) == 1
        name = next(n for n, c in clients.items() if c.sock is ready[0])
        assert clients.pop(name).recv()[0] == Code.SUCCESS
        served.append(name)
    # 10**400 does not jump the queue: equal to the top priority, it is served in arrival order
    assert served == ["top", "huge", "low", "tiny"]


# -- memory: queues, requests, unread replies -------------------------------------------------
def test_queues_of_keys_nobody_serves_or_waits_for_are_dropped(tracker, closing):
    watcher = wire(closing, tracker.port)
    keys = 0
    for c in range(60):  # 15,000 requested keys, each withdrawn when its connection closes
        sock = raw(closing, tracker.port)
        sock.sendall(MAGIC_BYTES + b"".join(
            encode([Code.REQUEST, f"attack-{c}-{i}-" + "x" * 24, "u", 1]) for i in range(250)))
        assert sock.recv(4) == MAGIC_BYTES
        sock.close()
        keys += 250
    assert wait_until(lambda: not summary_of(watcher)["queue_info"], 30), "queues of withdrawn requests stayed"
    assert len(json.dumps(summary_of(watcher))) < 200
    # a slot handed out leaves no queue behind either, unless a server of the key is connected (busy)
    srv = wire(closing, tracker.port)
    put(srv, "used", 9400, "used:1")
    assert watcher.call([Code.REQUEST, "used", "me", 1]) == [Code.SUCCESS, [LOCAL, 9400, "used:1"]]
    assert "used" not in summary_of(watcher)["queue_info"]
    busy = wire(closing, tracker.port)
    assert busy.call([Code.UPDATE_INFO, {"key": "server:busy", "addr": [None, 9410]}]) == Code.SUCCESS
    put(busy, "busy", 9410, "busy:1")
    assert watcher.call([Code.REQUEST, "busy", "me", 1]) == [Code.SUCCESS, [LOCAL, 9410, "busy:1"]]
    assert summary_of(watcher)["queue_info"]["busy"] == {"free": 0, "pending": 0}  # as TVM's tracker lists it
    busy.close()
    assert wait_until(lambda: not any(s["key"] == "server:busy" for s in summary_of(watcher)["server_info"]), 15)
    assert summary_of(watcher)["queue_info"]["busy"] == {"free": 0, "pending": 0}  # its last server left: kept, as TVM
    # and a dropped key works as before: the request waits, the next slot is granted
    watcher.send([Code.REQUEST, "used", "me", 1])
    assert wait_until(lambda: queue(srv, "used") == {"free": 0, "pending": 1}, 15)
    put(srv, "used", 9401, "used:2")
    assert watcher.recv() == [Code.SUCCESS, [LOCAL, 9401, "used:2"]]


def test_keys_kept_after_their_servers_left_are_bounded(tracker, closing):
    from workbench.rpc.tracker.tracker import MAX_KEYS_KEPT

    for i in range(MAX_KEYS_KEPT + 40):  # servers of distinct keys come and go
        srv = TrackerConnection(LOCAL, tracker.port, timeout=10)
        try:
            assert srv.call([Code.UPDATE_INFO, {"key": f"server:gone-{i}", "addr": [None, 9500]}]) == Code.SUCCESS
            put(srv, f"gone-{i}", 9500, f"gone-{i}:1")
        finally:
            srv.close()
    watcher = wire(closing, tracker.port)  # (this tracker ends connections idle for 0.5 s)
    assert wait_until(lambda: not summary_of(watcher)["server_info"], 15)
    queues = summary_of(watcher)["queue_info"]
    assert len(queues) == MAX_KEYS_KEPT and f"gone-{MAX_KEYS_KEPT + 39}" in queues and "gone-0" not in queues
    assert all(q == {"free": 0, "pending": 0} for q in queues.values())


def test_one_connection_cannot_queue_unbounded_requests(tracker, closing):
    watcher = wire(closing, tracker.port)
    greedy = raw(closing, tracker.port)
    greedy.sendall(MAGIC_BYTES + b"".join(
        encode([Code.REQUEST, f"greedy-{i}", "u", 1]) for i in range(MAX_REQUESTS_PER_CONN + 1)))
    assert closed_by_peer(greedy) == MAGIC_BYTES
    assert wait_until(lambda: not summary_of(watcher)["queue_info"], 5)  # its requests left with it
    assert watcher.call([Code.PING]) == Code.SUCCESS


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def test_a_client_that_never_reads_its_replies_is_closed(tracker, closing):
    watcher = wire(closing, tracker.port)
    filler = wire(closing, tracker.port)
    for i in range(80):  # a summary of about 8 kB
        put(filler, f"key-{i:03d}-" + "k" * 64, 9500 + i, f"m{i}")
    peak_before = peak_rss_mb(tracker.pid)
    # the deaf client announces itself, so the watcher sees when it is gone, then floods SUMMARY requests
    deaf = raw(closing, tracker.port, rcvbuf=4096)
    deaf.sendall(MAGIC_BYTES + encode([Code.UPDATE_INFO, {"key": "server:deaf"}]))

    def deaf_listed() -> bool:
        return any(s.get("key") == "server:deaf" for s in summary_of(watcher)["server_info"])

    assert wait_until(deaf_listed, 5)
    batch = encode([Code.SUMMARY]) * 10_000
    deaf.settimeout(0.2)
    sent, deadline, gone = 0, time.monotonic() + 20, False
    while sent < 4 and time.monotonic() < deadline:  # 40,000 requests at most: ~320 MB of replies
        try:
            deaf.sendall(batch)
            sent += 1
        except socket.timeout:
            pass  # the tracker stopped reading us
        except OSError:
            gone = True  # it closed the connection
            break
        if not deaf_listed():
            gone = True
            break
    assert gone or wait_until(lambda: not deaf_listed(), 5), "the tracker kept a client that reads no replies"
    assert tracker.alive
    # it read no more requests than it could answer at once: its memory did not grow with the flood
    assert peak_rss_mb(tracker.pid) - peak_before < 16
    assert watcher.call([Code.PING]) == Code.SUCCESS
    assert len(summary_of(watcher)["queue_info"]) == 80


# -- idle connections --------------------------------------------------------------------------
def test_idle_connections_time_out_but_servers_and_waiting_requests_stay(tracker, closing):
    silent = raw(closing, tracker.port)  # not even the magic
    magic_only = raw(closing, tracker.port)
    magic_only.sendall(MAGIC_BYTES)
    # these stay however quiet they are: a waiting request, a server between sessions, a free slot
    waiting = wire(closing, tracker.port)
    waiting.send([Code.REQUEST, "idle", "me", 1])
    busy_server = wire(closing, tracker.port)
    assert busy_server.call([Code.UPDATE_INFO, {"key": "server:idle", "addr": [None, 9600]}]) == Code.SUCCESS
    offering = wire(closing, tracker.port)
    put(offering, "other", 9601, "other:1")
    # a client that asked something and then went quiet: closed last, so the others have been quiet longer
    talker = raw(closing, tracker.port)
    talker.sendall(MAGIC_BYTES + encode([Code.PING]))
    assert closed_by_peer(silent) == b""
    assert closed_by_peer(magic_only) == MAGIC_BYTES
    assert closed_by_peer(talker) == MAGIC_BYTES + encode(Code.SUCCESS)
    observer = wire(closing, tracker.port)
    summary = summary_of(observer)
    assert summary["queue_info"] == {"idle": {"free": 0, "pending": 1}, "other": {"free": 1, "pending": 0}}
    assert {"key": "server:idle", "addr": [LOCAL, 9600]} in summary["server_info"]
    assert busy_server.call([Code.PUT, "idle", [9600, "idle:1"], None]) == Code.SUCCESS
    assert waiting.recv() == [Code.SUCCESS, [LOCAL, 9600, "idle:1"]]
    assert offering.call([Code.GET_PENDING_MATCHKEYS]) == ["other:1"]


def test_a_registered_server_stays_registered_when_quiet(tracker, spawn, closing):
    srv = spawn(tracker.port, "quiet")
    watcher = wire(closing, tracker.port)
    assert wait_until(lambda: queue(watcher, "quiet") == {"free": 1, "pending": 0}, 10)
    probe = raw(closing, tracker.port)
    probe.sendall(MAGIC_BYTES)
    assert closed_by_peer(probe) == MAGIC_BYTES  # the idle timeout has passed
    with rpc.connect_tracker(LOCAL, tracker.port) as session:
        with session.request("quiet", timeout=10) as remote:
            assert remote.listdir(".") == []
    assert srv.alive


def test_timeouts_are_checked():
    for bad in (float("nan"), float("inf"), -1, "10"):
        with pytest.raises(ValueError, match="idle_timeout must be a finite number of seconds"):
            rpc.Tracker(port=0, idle_timeout=bad)
    result = subprocess.run([sys.executable, "-m", "workbench.exec.rpc_tracker", "--port", "0", "--idle-timeout",
                             "inf"], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 2 and "idle_timeout must be a finite number" in result.stderr


# -- the file-descriptor limit -----------------------------------------------------------------
SERVE_LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit}))
from workbench.rpc.{module} import {serve}
{serve}({{"port": 0, "silent": True}}, ready=lambda port: print(port, flush=True))
"""


def start_limited(module: str, serve: str, limit: int) -> tuple[subprocess.Popen, int]:
    """A tracker or proxy in a process allowed ``limit`` file descriptors; its port."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE_LIMITED.format(limit=limit, module=module, serve=serve)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        raise AssertionError(f"the {module} did not start: {line!r}")
    return proc, int(line)


def stop_limited(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdout.close()


def flood_fds(port: int, count: int, closing: list, opening: bytes = b"") -> list[socket.socket]:
    """``count`` connections, each sending ``opening``; past the server's fd limit they wait in its backlog."""
    socks = []
    for _ in range(count):
        sock = socket.create_connection((LOCAL, port), timeout=5)
        closing.append(sock)
        if opening:
            sock.sendall(opening)
        socks.append(sock)
    return socks


def test_at_the_fd_limit_the_tracker_backs_off_and_serves_its_connections(closing):
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 256:
        pytest.skip("this test opens 120 connections")
    proc, port = start_limited("tracker.tracker", "serve_tracker", 48)
    try:
        member = TrackerConnection(LOCAL, port, timeout=10)
        closing.append(member)
        put(member, "fd", 9700, "fd:1")
        # servers (never closed to make room) past the limit: the rest wait in the listen backlog
        flood = flood_fds(port, 120, closing, MAGIC_BYTES + encode([Code.UPDATE_INFO, {"key": "server:flood"}]))
        assert wait_until(lambda: sum(s.get("key") == "server:flood" for s in summary_of(member)["server_info"])
                          > 20, 10)
        time.sleep(0.2)  # at the limit now
        before, start = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(1.0)
        used = cpu_seconds(proc.pid) - before
        # spinning on accept() would burn the whole second
        assert used < 0.5 * (time.monotonic() - start), f"the tracker used {used:.2f} s of CPU at the fd limit"
        assert member.call([Code.PING]) == Code.SUCCESS  # the connections it has are served
        assert member.call([Code.GET_PENDING_MATCHKEYS]) == ["fd:1"]
        for sock in flood:
            sock.close()
        # once descriptors are free again it accepts new clients
        late = TrackerConnection(LOCAL, port, timeout=10)
        closing.append(late)
        assert late.call([Code.REQUEST, "fd", "late", 1]) == [Code.SUCCESS, [LOCAL, 9700, "fd:1"]]
    finally:
        stop_limited(proc)


def test_at_the_fd_limit_silent_connections_make_room_for_clients(closing):
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 256:
        pytest.skip("this test opens 120 connections")
    proc, port = start_limited("tracker.tracker", "serve_tracker", 48)
    try:
        member = TrackerConnection(LOCAL, port, timeout=10)
        closing.append(member)
        put(member, "fd", 9700, "fd:1")
        flood_fds(port, 120, closing)  # silent: they never send the magic (and stay open)
        client = TrackerConnection(LOCAL, port, timeout=5)  # the oldest silent ones are closed to make room
        closing.append(client)
        assert client.call([Code.REQUEST, "fd", "client", 1]) == [Code.SUCCESS, [LOCAL, 9700, "fd:1"]]
        assert member.call([Code.PING]) == Code.SUCCESS
    finally:
        stop_limited(proc)
