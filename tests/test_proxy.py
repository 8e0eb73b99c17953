"""rpc.Proxy, its CLI, the tracker through a proxy, rpc.Connect nested sessions, and a
three-namespace topology where the client can reach the server only through the proxy.

Everything runs as real processes: proxies, trackers and servers on loopback (or
inside network namespaces this module creates and deletes). After each test no
session worker and no session workspace may be left.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import numpy as np
import pytest

from workbench import rpc, runtime
from workbench.errors import (
    AuthenticationError,
    DeviceNotFoundError,
    KeyMismatchError,
    RemoteNotFoundError,
    UnsupportedError,
)
from workbench.rpc.wire.relay import Relay
from workbench.rpc.client.tracker_session import TrackerError

from .conftest import ROOT, assert_clean, children, session_workspaces, wait_until

HOST = "127.0.0.1"
PROBE_KEY = "probe-no-such-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def waiting_keys(port: int) -> list[str] | None:
    """The keys the proxy says are waiting (from its error for a key nobody serves); None if unreachable."""
    try:
        rpc.connect(HOST, port, key=PROBE_KEY, connect_timeout=2).close()
    except DeviceNotFoundError as exc:
        text = re.search(r"\(keys waiting: (.*)\)", str(exc)).group(1)
        return [] if text == "none" else text.split(", ")
    except (OSError, ConnectionError):
        return None
    raise AssertionError("a session was opened with the probe key")


def wait_waiting(port: int, keys: list[str], timeout: float = 15.0) -> None:
    assert wait_until(lambda: waiting_keys(port) == sorted(keys), timeout=timeout, interval=0.05), (
        f"keys waiting at the proxy: {waiting_keys(port)}, expected {sorted(keys)}")


def wait_connect(port: int, key: str, timeout: float = 15.0, **options) -> rpc.RPCSession:
    """Connect through the proxy as soon as a server of ``key`` waits there."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return rpc.connect(HOST, port, key=key, **options)
        except DeviceNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def through_proxy(proxy: rpc.Proxy, key: str, **options) -> rpc.Server:
    return rpc.Server(host=HOST, port=proxy.port, is_proxy=True, key=key, silent=True, **options)


def worker_of(session: rpc.RPCSession, *servers: rpc.Server) -> rpc.Server:
    """The server whose worker serves ``session``."""
    pid = session.info["pid"]
    owners = [s for s in servers if pid in children(s.pid)]
    assert len(owners) == 1, f"session worker {pid} is a child of {len(owners)} of the servers"
    return owners[0]


def roundtrip(remote: rpc.RPCSession, size: int = 4 << 20) -> None:
    data = os.urandom(size)
    remote.upload(data, target="blob.bin")
    back = remote.download("blob.bin")
    assert len(back) == size and back == data


def run_add_one(remote: rpc.RPCSession, so_path: str) -> None:
    remote.upload(so_path)
    mod = remote.load_module(os.path.basename(so_path))
    dev = remote.cpu()
    x = np.random.uniform(size=(64, 33)).astype("float32")
    a = runtime.tensor(x, dev)
    b = runtime.empty(x.shape, "float32", dev)
    mod["add_one"](a, b)
    np.testing.assert_equal(b.numpy(), x + 1)


@pytest.fixture
def proxy():
    p = rpc.Proxy(unknown_key_grace=0, port=0, silent=True)
    yield p
    p.terminate()
    assert not p.alive


@pytest.fixture
def no_token(monkeypatch):
    monkeypatch.delenv("WORKBENCH_RPC_TOKEN", raising=False)


# -- the relay ---------------------------------------------------------------------------
def test_relay_copies_both_ways_and_passes_on_the_end_of_each_direction():
    client, proxy_a = socket.socketpair()
    proxy_b, server = socket.socketpair()
    done = threading.Event()
    Relay(proxy_a, proxy_b, on_done=lambda r: done.set()).start()
    up, down = os.urandom(24 << 20), os.urandom(9 << 20 | 7)
    got_up, got_down = bytearray(), bytearray()

    def drain(sock, into):
        while chunk := sock.recv(1 << 20):
            into += chunk

    readers = [threading.Thread(target=drain, args=(server, got_up)), threading.Thread(target=drain, args=(client, got_down))]
    for t in readers:
        t.start()
    client.sendall(up)
    client.shutdown(socket.SHUT_WR)  # the end of one direction reaches the far side ...
    server.sendall(down)  # ... while the other direction goes on
    server.shutdown(socket.SHUT_WR)
    for t in readers:
        t.join(20)
    assert got_up == up and got_down == down
    assert done.wait(10)  # both directions ended: the relay closed its sockets and said so
    assert proxy_a.fileno() == -1 and proxy_b.fileno() == -1
    client.close()
    server.close()


def test_relay_stop_ends_both_directions():
    client, proxy_a = socket.socketpair()
    proxy_b, server = socket.socketpair()
    done = threading.Event()
    relay = Relay(proxy_a, proxy_b, on_done=lambda r: done.set()).start()
    client.sendall(b"ping")
    assert server.recv(4) == b"ping"
    relay.stop()
    relay.join(10)
    assert done.is_set()
    client.settimeout(5)
    server.settimeout(5)
    assert client.recv(1) == b"" and server.recv(1) == b""
    client.close()
    server.close()


# -- pairing ---------------------------------------------------------------------------
def test_pairing_relays_bulk_data_and_runs_a_kernel(proxy, kernels, private_tmpdir, no_token):
    with through_proxy(proxy, "board") as server:
        wait_waiting(proxy.port, ["board"])
        with rpc.connect(HOST, proxy.port, key="board") as remote:
            assert worker_of(remote, server) is server
            assert remote.info["key"] == "board"
            assert waiting_keys(proxy.port) == []  # paired: no longer waiting
            start = time.perf_counter()
            roundtrip(remote, 16 << 20)
            elapsed = time.perf_counter() - start
            assert elapsed < 10, f"32 MiB through the proxy took {elapsed:.1f} s"
            roundtrip(remote, 0)
            roundtrip(remote, 1)
            run_add_one(remote, kernels["so"])
            assert sorted(remote.listdir(".")) == ["blob.bin", "kernels.so"]
        assert children(proxy.pid) == []  # the proxy relays in threads, it forks nothing
        assert_clean(server, private_tmpdir)
        wait_waiting(proxy.port, ["board"])  # back in the pool after the session
    assert proxy.alive
    wait_waiting(proxy.port, [])


def test_each_key_is_paired_with_its_own_server(proxy, private_tmpdir, no_token):
    with through_proxy(proxy, "alpha") as alpha, through_proxy(proxy, "beta") as beta:
        wait_waiting(proxy.port, ["alpha", "beta"])
        with rpc.connect(HOST, proxy.port, key="beta") as rb:
            assert worker_of(rb, alpha, beta) is beta and rb.info["key"] == "beta"
            wait_waiting(proxy.port, ["alpha"])
            with rpc.connect(HOST, proxy.port, key="alpha") as ra:
                assert worker_of(ra, alpha, beta) is alpha and ra.info["key"] == "alpha"
                ra.upload(b"A", target="who")
                rb.upload(b"B", target="who")
                assert ra.download("who") == b"A" and rb.download("who") == b"B"  # two sessions, two workspaces
        wait_waiting(proxy.port, ["alpha", "beta"])
        # a tracker match key "key:suffix" pairs by its key part
        with rpc.connect(HOST, proxy.port, key="alpha:0123abcd") as ra:
            assert worker_of(ra, alpha, beta) is alpha
        assert_clean(alpha, private_tmpdir)
        assert_clean(beta, private_tmpdir)


def test_two_servers_of_one_key_serve_two_sessions(proxy, private_tmpdir, no_token):
    with through_proxy(proxy, "twin") as one, through_proxy(proxy, "twin") as two:
        wait_waiting(proxy.port, ["twin"])
        first = rpc.connect(HOST, proxy.port, key="twin")
        second = wait_connect(proxy.port, "twin")
        try:
            assert {worker_of(first, one, two), worker_of(second, one, two)} == {one, two}
            assert waiting_keys(proxy.port) == []
        finally:
            first.close()
            second.close()
        assert_clean(one, private_tmpdir)
        assert_clean(two, private_tmpdir)


def test_no_waiting_server_is_a_clear_error(proxy, no_token):
    with pytest.raises(DeviceNotFoundError, match=re.escape(
            "no server of key 'ghost' is waiting at this proxy (keys waiting: none)")):
        rpc.connect(HOST, proxy.port, key="ghost")
    with through_proxy(proxy, "pi"), through_proxy(proxy, "jetson"):
        wait_waiting(proxy.port, ["jetson", "pi"])
        with pytest.raises(DeviceNotFoundError, match=re.escape(
                "no server of key 'ghost' is waiting at this proxy (keys waiting: jetson, pi)")):
            rpc.connect(HOST, proxy.port, key="ghost")
        # no key at all: the proxy says what it is and which keys it has
        with pytest.raises(KeyMismatchError, match=r"proxy.*key=.*\(keys waiting: jetson, pi\)"):
            rpc.connect(HOST, proxy.port)
        assert waiting_keys(proxy.port) == ["jetson", "pi"]  # refused clients take nothing from the pool


def test_server_registers_again_after_every_session(proxy, private_tmpdir, no_token):
    with through_proxy(proxy, "again") as server:
        workers = set()
        for i in range(4):
            remote = wait_connect(proxy.port, "again")
            assert remote.listdir(".") == []  # a fresh workspace every time
            remote.upload(f"session {i}".encode(), target="n.txt")
            assert worker_of(remote, server) is server
            workers.add(remote.info["pid"])
            if i == 2:  # a client that vanishes without closing cleanly
                remote._chan.sock.shutdown(socket.SHUT_RDWR)
            remote.close()
        assert len(workers) == 4
        assert_clean(server, private_tmpdir)
        wait_waiting(proxy.port, ["again"])


def test_server_waits_again_when_the_proxy_restarts(private_tmpdir, no_token):
    first = rpc.Proxy(unknown_key_grace=0, port=0, silent=True)
    port = first.port
    with through_proxy(first, "phoenix") as server:
        wait_waiting(port, ["phoenix"])
        first.terminate()
        assert waiting_keys(port) is None
        assert server.alive  # the server outlives its proxy, and retries with backoff
        with rpc.Proxy(unknown_key_grace=0, port=port, port_end=port + 1, silent=True) as second:
            assert second.port == port
            with wait_connect(port, "phoenix", timeout=20) as remote:
                assert worker_of(remote, server) is server
                roundtrip(remote, 1 << 20)
        assert_clean(server, private_tmpdir)


def test_a_server_that_dies_while_waiting_leaves_the_pool(proxy, private_tmpdir, no_token):
    doomed = through_proxy(proxy, "flaky")
    survivor = through_proxy(proxy, "flaky")
    lone = through_proxy(proxy, "lone")
    try:
        wait_waiting(proxy.port, ["flaky", "lone"])
        time.sleep(0.3)  # both "flaky" servers are waiting (the first to register is paired first)
        os.kill(doomed.pid, signal.SIGKILL)
        lone.terminate()
        wait_waiting(proxy.port, ["flaky"])
        for _ in range(3):  # every session lands on the survivor, never on the dead connection
            with wait_connect(proxy.port, "flaky") as remote:
                assert worker_of(remote, survivor) is survivor
                assert remote.listdir(".") == []
        survivor.terminate()
        wait_waiting(proxy.port, [])
        with pytest.raises(DeviceNotFoundError, match="no server of key 'flaky'"):
            rpc.connect(HOST, proxy.port, key="flaky")
        assert proxy.alive
    finally:
        for server in (doomed, survivor, lone):
            server.terminate()
    assert wait_until(lambda: not session_workspaces(private_tmpdir))


def test_auth_token_is_end_to_end_through_the_proxy(proxy, private_tmpdir, no_token):
    token = "tok-" + uuid.uuid4().hex
    with through_proxy(proxy, "locked", auth_token=token) as server:
        wait_waiting(proxy.port, ["locked"])
        with pytest.raises(AuthenticationError, match="requires an auth token"):
            rpc.connect(HOST, proxy.port, key="locked")
        with pytest.raises(AuthenticationError, match="wrong auth token"):
            wait_connect(proxy.port, "locked", auth_token="not-" + token)
        with wait_connect(proxy.port, "locked", auth_token=token) as remote:
            assert worker_of(remote, server) is server
            roundtrip(remote, 1 << 20)
        assert_clean(server, private_tmpdir)
    with open(f"/proc/{proxy.pid}/environ", "rb") as f:
        assert token.encode() not in f.read()  # the proxy never had it


# -- proxy + tracker ---------------------------------------------------------------------
def queue(tracker, key: str) -> dict:
    return tracker.summary()["queue_info"].get(key, {"free": 0, "pending": 0})


def proxy_entry(tracker, port: int) -> str | None:
    for info in tracker.summary()["server_info"]:
        if info.get("addr", [None, None])[1] == port:
            return info["key"]
    return None


def test_proxy_offers_its_servers_to_the_tracker(private_tmpdir, no_token):
    with rpc.Tracker(port=0, silent=True) as tracker_proc, \
            rpc.Proxy(unknown_key_grace=0, port=0, silent=True, tracker_addr=(HOST, tracker_proc.port)) as proxy, \
            rpc.connect_tracker(HOST, tracker_proc.port) as tracker:
        cam, dsp = through_proxy(proxy, "cam"), through_proxy(proxy, "dsp")
        try:
            assert wait_until(lambda: queue(tracker, "cam")["free"] == 1 and queue(tracker, "dsp")["free"] == 1,
                              timeout=15)
            assert wait_until(lambda: proxy_entry(tracker, proxy.port) == "server:proxy[cam,dsp]", timeout=5), \
                tracker.summary()
            text = tracker.text_summary()
            assert f"{HOST}:{proxy.port}" in text and "server:proxy[cam,dsp]" in text
            assert re.search(r"^cam\s+1\s+1\s+0\s*$", text, re.M), text
            assert tracker.servers_for("cam") == 1 and tracker.servers_for("dsp") == 1

            with tracker.request("cam", timeout=20) as rc, tracker.request("dsp", timeout=20) as rd:
                assert worker_of(rc, cam, dsp) is cam and worker_of(rd, cam, dsp) is dsp
                roundtrip(rc, 2 << 20)
                assert queue(tracker, "cam")["free"] == 0
                assert proxy_entry(tracker, proxy.port) == "server:proxy[cam,dsp]"  # busy servers are still there
            assert wait_until(lambda: queue(tracker, "cam")["free"] == 1 and queue(tracker, "dsp")["free"] == 1,
                              timeout=15)
            for _ in range(3):  # offered again after every session
                with tracker.request("cam", timeout=20) as rc:
                    assert worker_of(rc, cam, dsp) is cam

            # a client that goes to the proxy directly takes a server the tracker had on offer:
            # the tracker must not hand it out as well
            direct = wait_connect(proxy.port, "dsp")
            try:
                assert wait_until(lambda: queue(tracker, "dsp")["free"] == 0, timeout=10)
                with pytest.raises(TrackerError, match="no session for key 'dsp'"):
                    tracker.request("dsp", timeout=1.5)
            finally:
                direct.close()
            with tracker.request("dsp", timeout=20) as rd:
                assert worker_of(rd, cam, dsp) is dsp

            # a server that leaves the proxy leaves the tracker's lists too
            dsp.terminate()
            assert wait_until(lambda: queue(tracker, "dsp")["free"] == 0, timeout=10)
            assert wait_until(lambda: proxy_entry(tracker, proxy.port) == "server:proxy[cam]", timeout=10), \
                tracker.summary()
            with pytest.raises(TrackerError, match=r"no session for key 'dsp'.*\(0 server\(s\) registered"):
                tracker.request("dsp", timeout=1)
            assert_clean(cam, private_tmpdir)
        finally:
            cam.terminate()
            dsp.terminate()


def test_tracker_hands_out_every_server_behind_the_proxy(private_tmpdir, no_token):
    with rpc.Tracker(port=0, silent=True) as tracker_proc, \
            rpc.Proxy(unknown_key_grace=0, port=0, silent=True, tracker_addr=(HOST, tracker_proc.port)) as proxy, \
            rpc.connect_tracker(HOST, tracker_proc.port) as tracker:
        servers = [through_proxy(proxy, "pool") for _ in range(3)]
        try:
            wait_waiting(proxy.port, ["pool"])
            sessions = [tracker.request("pool", timeout=20) for _ in range(3)]
            assert {worker_of(s, *servers) for s in sessions} == set(servers)
            for s in sessions:
                s.close()
            assert all(server.alive for server in servers)
        finally:
            for server in servers:
                server.terminate()


def test_a_key_with_colons_behind_the_proxy(private_tmpdir, no_token):
    """Keys such as "127.0.0.1:5555" (TVM users name boards by address): through the tracker and the proxy,
    and straight to the proxy, as on a direct server."""
    key = "127.0.0.1:5555"
    with rpc.Tracker(port=0, silent=True) as tracker_proc, \
            rpc.Proxy(unknown_key_grace=0, port=0, silent=True, tracker_addr=(HOST, tracker_proc.port)) as proxy, \
            rpc.connect_tracker(HOST, tracker_proc.port) as tracker:
        server = through_proxy(proxy, key)
        try:
            wait_waiting(proxy.port, [key])
            with tracker.request(key, timeout=20) as remote:
                roundtrip(remote, 1 << 10)
            assert wait_until(lambda: queue(tracker, key)["free"] == 1, timeout=15)
            with rpc.connect(HOST, proxy.port, key=key) as remote:
                roundtrip(remote, 1 << 10)
        finally:
            server.terminate()


def test_tracker_counts_every_free_server_behind_the_proxy(no_token):
    """A proxy offers all its servers from one connection and one port: each is a free slot."""
    with rpc.Tracker(port=0, silent=True) as tracker_proc, \
            rpc.Proxy(unknown_key_grace=0, port=0, silent=True, tracker_addr=(HOST, tracker_proc.port)) as proxy, \
            rpc.connect_tracker(HOST, tracker_proc.port) as tracker:
        servers = [through_proxy(proxy, "pool") for _ in range(3)]
        try:
            wait_waiting(proxy.port, ["pool"])
            assert wait_until(lambda: queue(tracker, "pool")["free"] == 3, timeout=8), tracker.summary()
        finally:
            for server in servers:
                server.terminate()


# -- the CLI ------------------------------------------------------------------------------
def read_log_until(path, proc: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    """Wait for a line matching ``pattern`` in the log file ``proc`` writes."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path) as f:
            text = f.read()
        match = re.search(pattern, text, re.M)
        if match:
            return match
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no line matching {pattern!r} within {timeout} s "
                                 f"(process {'exited %s' % proc.returncode if proc.poll() is not None else 'running'}); "
                                 f"log:\n{text}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{proc.args} did not stop on signal {sig}")
    return proc.returncode


def test_rpc_proxy_cli(private_tmpdir, tmp_path, no_token):
    log = tmp_path / "proxy.log"
    with rpc.Tracker(port=0, silent=True) as tracker_proc, open(log, "w") as log_file:
        first = free_port()
        proxy = subprocess.Popen(
            [sys.executable, "-m", "workbench.exec.rpc_proxy", "--host", HOST, "--port", str(first),
             "--port-end", str(first + 20), "--tracker", f"{HOST}:{tracker_proc.port}"],
            stderr=log_file, cwd=ROOT)
        server = None
        try:
            port = int(read_log_until(log, proxy, rf"RPCProxy: bind to {HOST}:(\d+)", 30).group(1))
            assert first <= port < first + 20
            server = subprocess.Popen(
                [sys.executable, "-m", "workbench.exec.rpc_server", "--through-proxy", "--host", HOST,
                 "--port", str(port), "--key", "cli-board", "--silent"], cwd=ROOT)
            with rpc.connect_tracker(HOST, tracker_proc.port) as tracker:
                with tracker.request("cli-board", timeout=20, wait=True) as remote:
                    assert remote.info["pid"] in children(server.pid)
                    roundtrip(remote, 1 << 20)
                assert "server:proxy[cli-board]" in tracker.text_summary()
            with wait_connect(port, "cli-board") as remote:  # and directly at the proxy
                assert remote.listdir(".") == []
            assert stop(server) == 0
            assert stop(proxy) == 0
        finally:
            for proc in (server, proxy):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert wait_until(lambda: not session_workspaces(private_tmpdir))


def test_rpc_proxy_cli_bad_arguments():
    res = subprocess.run([sys.executable, "-m", "workbench.exec.rpc_proxy", "--tracker", "nowhere"],
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 2 and "--tracker takes HOST:PORT, not 'nowhere'" in res.stderr
    with rpc.Proxy(unknown_key_grace=0, port=0, silent=True) as busy:  # its port is taken: a clear message, exit status 1
        res = subprocess.run([sys.executable, "-m", "workbench.exec.rpc_proxy", "--port", str(busy.port),
                              "--port-end", str(busy.port + 1)], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert res.returncode == 1, res.stderr
    assert f"rpc_proxy: cannot listen on 127.0.0.1 ports {busy.port}..{busy.port}" in res.stderr
    assert "Traceback" not in res.stderr


def test_proxy_port_search():
    with rpc.Proxy(unknown_key_grace=0, port=0, silent=True) as a:
        with rpc.Proxy(unknown_key_grace=0, port=a.port, port_end=a.port + 30, silent=True) as b:
            assert a.port < b.port < a.port + 30
            assert "rpc.Proxy" in repr(b) and "running" in repr(b)
        assert not b.alive and "stopped" in repr(b)


# -- rpc.Connect: a session relayed by one server to another --------------------------------
def test_rpc_connect_reaches_an_inner_server(server, kernels, private_tmpdir, no_token):
    with rpc.Server(port=0, key="inner", silent=True) as inner:
        ctor = ["rpc.Connect", HOST, inner.port, "inner", False]  # seed 001's form, with the logging flag
        with rpc.connect(HOST, server.port, session_constructor_args=ctor) as remote:
            assert remote.info["pid"] in children(inner.pid)  # the session is served by the inner server
            assert remote.info["key"] == "inner"
            assert len(children(server.pid)) == 1  # the outer server's worker only relays
            roundtrip(remote, 8 << 20)
            run_add_one(remote, kernels["so"])
        assert_clean(inner, private_tmpdir)
        assert_clean(server, private_tmpdir)


def test_rpc_connect_through_a_proxied_gateway(proxy, private_tmpdir, no_token):
    """client -> proxy -> gateway server (behind the proxy) -> inner server."""
    with through_proxy(proxy, "gateway") as gateway, rpc.Server(port=0, key="deep", silent=True) as inner:
        ctor = ["rpc.Connect", HOST, inner.port, "deep"]
        with wait_connect(proxy.port, "gateway", session_constructor_args=ctor) as remote:
            assert remote.info["pid"] in children(inner.pid)
            assert len(children(gateway.pid)) == 1
            roundtrip(remote, 4 << 20)
        assert_clean(inner, private_tmpdir)
        assert_clean(gateway, private_tmpdir)


def test_rpc_connect_errors_are_clear(server, private_tmpdir, no_token):
    dead = free_port()
    with pytest.raises(RemoteNotFoundError, match=rf"rpc.Connect: cannot reach {HOST}:{dead} from this server"):
        rpc.connect(HOST, server.port, session_constructor_args=["rpc.Connect", HOST, dead, ""])
    with rpc.Server(port=0, key="inner", silent=True) as inner:
        with pytest.raises(KeyMismatchError, match="serves key 'inner', the client asked for 'other'"):
            rpc.connect(HOST, server.port, session_constructor_args=["rpc.Connect", HOST, inner.port, "other"])
        assert_clean(inner, private_tmpdir)
    with pytest.raises(UnsupportedError, match=r"rpc.Connect takes \[url, port, key\]"):
        rpc.connect(HOST, server.port, session_constructor_args=["rpc.Connect", HOST])
    with pytest.raises(UnsupportedError, match="session constructor 'rpc.Elsewhere' is not supported"):
        rpc.connect(HOST, server.port, session_constructor_args=["rpc.Elsewhere"])
    rpc.connect(HOST, server.port).close()  # the server is fine after all that
    assert_clean(server, private_tmpdir)


# -- three network namespaces: client | proxy | server ----------------------------------------
CLIENT_SCRIPT = textwrap.dedent("""
    import json, os, socket, sys, time
    import numpy as np
    from workbench import rpc, runtime
    from workbench.errors import DeviceNotFoundError

    proxy_ip, port, key, tracker_port, so_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    unreachable = sys.argv[6].split(",")
    out = {"reached": [], "unreachable": {}}
    for addr in unreachable:
        start = time.monotonic()
        try:
            socket.create_connection((addr, port), timeout=2).close()
            out["reached"].append(addr)
        except OSError as exc:
            out["unreachable"][addr] = [type(exc).__name__, str(exc), round(time.monotonic() - start, 2)]

    deadline = time.monotonic() + 20
    while True:
        try:
            remote = rpc.connect(proxy_ip, port, key=key, connect_timeout=2)
            break
        except DeviceNotFoundError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    data = os.urandom(4 << 20)
    remote.upload(data, target="blob.bin")
    out["roundtrip"] = remote.download("blob.bin") == data
    remote.upload(so_path)
    mod = remote.load_module(os.path.basename(so_path))
    dev = remote.cpu()
    a = runtime.tensor(np.arange(8, dtype="float32"), dev)
    b = runtime.empty((8,), "float32", dev)
    mod["add_one"](a, b)
    out["add_one"] = b.numpy().tolist()
    out["pid"] = remote.info["pid"]
    remote.close()

    with rpc.connect_tracker(proxy_ip, tracker_port) as tracker:
        # the server registers again through the proxy once the session above has ended: queue for it (a request
        # in that moment's gap would fail fast, naming the keys there are)
        with tracker.request(key, timeout=20, wait=True) as remote:
            remote.upload(b"via the tracker", target="t.txt")
            out["via_tracker"] = bytes(remote.download("t.txt")).decode()
            out["tracker_pid"] = remote.info["pid"]
        out["summary"] = tracker.text_summary()
    print(json.dumps(out))
""")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


def netns_unavailable() -> str | None:
    """Why the namespace topology cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (to create network namespaces)"
    if not shutil.which("ip"):
        return "needs iproute2's ip command"
    probe = f"wbprobe{os.getpid()}{uuid.uuid4().hex[:4]}"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode:
            return f"'ip netns add' failed: {made.stderr.strip()}"
        veth = _ip("-n", probe, "link", "add", "a0", "type", "veth", "peer", "name", "a1", check=False)
        if veth.returncode:
            return f"cannot create veth pairs: {veth.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns does not work here: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def test_client_reaches_the_server_only_through_the_proxy(kernels, private_tmpdir, tmp_path, no_token):
    why = netns_unavailable()
    if why:
        pytest.skip(f"network namespace topology: {why}")
    tag = uuid.uuid4().hex[:6]
    ns = {role: f"wb-{role}-{os.getpid()}-{tag}" for role in ("client", "proxy", "server")}
    client_side, server_side = ("10.231.1.1", "10.231.1.2"), ("10.231.2.1", "10.231.2.2")  # (proxy, peer)
    port, tracker_port, key = 9090, 9190, "behind-proxy"
    procs: list[subprocess.Popen] = []

    def start(role: str, pattern: str, *cmd: str) -> subprocess.Popen:
        """Start ``python -m cmd...`` in the namespace of ``role`` and wait for ``pattern`` in its log."""
        log = tmp_path / f"{cmd[0]}.log"
        with open(log, "w") as log_file:
            proc = subprocess.Popen(["ip", "netns", "exec", ns[role], sys.executable, "-m", *cmd],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file, cwd=ROOT)
        procs.append(proc)
        read_log_until(log, proc, pattern, 30)
        return proc

    try:
        for name in ns.values():
            _ip("netns", "add", name)
        # veth ends are created directly inside the namespaces: nothing appears in the host's
        _ip("link", "add", "eth-c", "netns", ns["client"], "type", "veth", "peer", "name", "eth-pc", "netns", ns["proxy"])
        _ip("link", "add", "eth-s", "netns", ns["server"], "type", "veth", "peer", "name", "eth-ps", "netns", ns["proxy"])
        for role, dev, addr in (("client", "eth-c", client_side[1]), ("proxy", "eth-pc", client_side[0]),
                                ("proxy", "eth-ps", server_side[0]), ("server", "eth-s", server_side[1])):
            _ip("-n", ns[role], "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns[role], "link", "set", dev, "up")
        for name in ns.values():
            _ip("-n", name, "link", "set", "lo", "up")
        subprocess.run(["ip", "netns", "exec", ns["proxy"], "sysctl", "-q", "-w", "net.ipv4.ip_forward=0"],
                       check=True, timeout=10)

        start("proxy", rf"RPCTracker: bind to 0.0.0.0:{tracker_port}$",
              "workbench.exec.rpc_tracker", "--host", "0.0.0.0", "--port", str(tracker_port),
              "--port-end", str(tracker_port + 1))
        start("proxy", rf"RPCProxy: bind to 0.0.0.0:{port}$",
              "workbench.exec.rpc_proxy", "--host", "0.0.0.0", "--port", str(port), "--port-end", str(port + 1),
              "--tracker", f"127.0.0.1:{tracker_port}", "--custom-addr", client_side[0])
        server = start("server", "waiting at the proxy",
                       "workbench.exec.rpc_server", "--through-proxy", "--host", server_side[0], "--port", str(port),
                       "--key", key)

        res = subprocess.run(
            ["ip", "netns", "exec", ns["client"], sys.executable, "-c", CLIENT_SCRIPT, client_side[0], str(port), key,
             str(tracker_port), kernels["so"], ",".join([server_side[1], server_side[0]])],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])

        assert out["reached"] == []  # no route from the client to the server side
        assert set(out["unreachable"]) == {server_side[0], server_side[1]}
        assert all(elapsed <= 2.5 for _, _, elapsed in out["unreachable"].values()), out["unreachable"]
        assert out["roundtrip"] is True
        assert out["add_one"] == [float(i + 1) for i in range(8)]
        assert out["pid"] != out["tracker_pid"]  # a new worker per session
        assert out["via_tracker"] == "via the tracker"
        assert f"{client_side[0]}:{port}" in out["summary"] and f"server:proxy[{key}]" in out["summary"]
        assert all(p.poll() is None for p in procs)
        assert wait_until(lambda: not children(server.pid))
        for proc in reversed(procs):
            assert stop(proc, signal.SIGTERM) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for name in ns.values():
            _ip("netns", "del", name, check=False)
    existing = _ip("netns", "list").stdout
    assert not any(name in existing for name in ns.values())
    assert wait_until(lambda: not session_workspaces(private_tmpdir))
