"""Issue 7, item 16: registration tokens for the tracker's and the proxy's server side, and ServerBusyError.

A tracker (``auth_token=``, ``rpc_tracker --auth-token``) or a proxy
(``auth_token=``, ``rpc_proxy --auth-token``) with a token takes a server only
after it proved, over a fresh nonce of the service's, that it knows the token
(``rpc.Server(registration_token=...)``). Strangers are raw sockets speaking just
enough of the protocol; the servers, trackers and proxies are the real ones on
127.0.0.1. Every wait is bounded; every process and socket ends with its test.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from workbench import rpc
from workbench.errors import AuthenticationError, DeviceNotFoundError, ErrorCode, RPCError, ServerBusyError
from workbench.farm import LocalFarm
from workbench.rpc.wire.protocol import FLAG_SERVER, MAGIC, PREAMBLE, VERSION, Kind
from workbench.rpc.tracker.registration import AUTH_NONCE, AUTH_PROOF, registration_proof
from workbench.rpc.tracker.wire import Code, TrackerConnection

from .conftest import ROOT, assert_clean, children, wait_until
from .wire import frame, read_frame

HOST = "127.0.0.1"
TOKEN = "registration-s3cret"
ENV_NAMES = ("WORKBENCH_RPC_TOKEN", "WORKBENCH_REGISTRATION_TOKEN", "WORKBENCH_TRACKER_TOKEN", "WORKBENCH_PROXY_TOKEN")


# -- helpers ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_tokens(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORKBENCH_LOG_LEVEL", "WARNING")  # services started here log warnings to this stderr


class Stderr:
    """What the services started by this test wrote to stderr (they inherit it), read as it arrives."""

    def __init__(self, capfd):
        self.capfd = capfd
        self.text = ""

    def read(self) -> str:
        self.text += self.capfd.readouterr().err
        return self.text

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match:
        found: list[re.Match] = []

        def seen() -> bool:
            match = re.search(pattern, self.read())
            if match:
                found.append(match)
            return bool(match)

        assert wait_until(seen, timeout, 0.05), (
            f"no log line matching {pattern!r} within {timeout} s:\n{self.text[-3000:]}")
        return found[0]


@pytest.fixture
def stderr(capfd) -> Stderr:
    return Stderr(capfd)


def wire(closing: list, port: int) -> TrackerConnection:
    conn = TrackerConnection(HOST, port, timeout=10)
    closing.append(conn)
    return conn


def summary_of(port: int) -> dict:
    with contextlib.closing(TrackerConnection(HOST, port, timeout=10)) as conn:
        reply = conn.call([Code.SUMMARY])
    assert reply[0] == Code.SUCCESS, reply
    return reply[1]


def free_slots(port: int, key: str) -> int:
    return summary_of(port)["queue_info"].get(key, {}).get("free", 0)


def server_entries(port: int, key: str) -> list[dict]:
    return [s for s in summary_of(port)["server_info"] if s.get("key") == f"server:{key}"]


def tracker_nonce(conn: TrackerConnection) -> bytes:
    reply = conn.call([AUTH_NONCE])
    assert reply[0] == Code.SUCCESS and reply[1]["auth"] is True, reply
    nonce = bytes.fromhex(reply[1]["nonce"])
    assert len(nonce) == 32
    return nonce


def tracker_proof(nonce: bytes, token: str = TOKEN) -> str:
    return registration_proof(token, nonce, "tracker").hex()








def closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def proxy_challenge(closing: list, port: int, key: str) -> tuple[socket.socket, bytes]:
    """A raw server's REGISTER at a proxy with a token, answered by a HELLO with a nonce."""
    sock = socket.create_connection((HOST, port), timeout=5)
    closing.append(sock)
    sock.sendall(PREAMBLE.pack(MAGIC, VERSION, FLAG_SERVER) + frame(Kind.REGISTER, {"key": key, "info": {}}))
    kind, hello = read_frame(sock)
    assert kind == Kind.HELLO and hello["auth"] is True, (kind, hello)
    assert isinstance(hello["nonce"], bytes) and len(hello["nonce"]) == 32
    return sock, hello["nonce"]


def proxy_prove(sock: socket.socket, proof) -> tuple[int, object]:
    sock.sendall(frame(Kind.REGISTER, {"proof": proof}))
    return read_frame(sock)


def proxy_proof(nonce: bytes, token: str = TOKEN) -> bytes:
    return registration_proof(token, nonce, "proxy")


def no_server_at_proxy(port: int, key: str) -> bool:
    try:
        rpc.connect(HOST, port, key=key, connect_timeout=5).close()
    except DeviceNotFoundError:
        return True
    return False


def through_proxy(proxy: rpc.Proxy, key: str, **options) -> rpc.Server:
    return rpc.Server(host=HOST, port=proxy.port, is_proxy=True, key=key, **options)


# -- the tracker ----------------------------------------------------------------------------
def test_a_server_without_the_token_cannot_register_and_is_never_handed_out(closing, spawn, private_tmpdir):
    with rpc.Tracker(port=0, silent=True, auth_token=TOKEN) as tracker:
        fake = wire(closing, tracker.port)
        reply = fake.call([Code.UPDATE_INFO, {"key": "server:rasp", "addr": [None, 9]}])
        assert reply[0] == Code.FAIL and "registration token" in reply[1], reply
        reply = fake.call([Code.PUT, "rasp", [9, "rasp:fake"], None])
        assert reply[0] == Code.FAIL and "registration_token=" in reply[1], reply
        nonce = tracker_nonce(fake)  # a wrong proof does not open the door either
        assert fake.call([AUTH_PROOF, tracker_proof(nonce, "a guess")])[0] == Code.FAIL
        assert fake.call([Code.PUT, "rasp", [9, "rasp:fake2"], None])[0] == Code.FAIL
        assert fake.call([Code.GET_PENDING_MATCHKEYS]) == []
        assert "rasp" not in summary_of(tracker.port)["queue_info"] and not server_entries(tracker.port, "rasp")

        real = spawn(tracker.port, "rasp", registration_token=TOKEN)
        assert wait_until(lambda: free_slots(tracker.port, "rasp") == 1, 15, 0.05)
        assert [e["addr"] for e in server_entries(tracker.port, "rasp")] == [[HOST, real.port]]
        with rpc.connect_tracker(HOST, tracker.port) as clients:
            remote = clients.request("rasp", timeout=15)
            remote.upload(b"to the real server", target="x")
            assert remote.listdir(".") == ["x"]
            remote.close()
        assert_clean(real, private_tmpdir)


def test_clients_need_no_token_at_a_token_tracker(closing, spawn):
    with rpc.Tracker(port=0, silent=True, auth_token=TOKEN) as tracker:
        spawn(tracker.port, "open", registration_token=TOKEN)
        assert wait_until(lambda: free_slots(tracker.port, "open") == 1, 15, 0.05)
        client = wire(closing, tracker.port)
        assert client.call([Code.PING]) == Code.SUCCESS
        assert client.call([Code.UPDATE_INFO, {"key": "client"}]) == Code.SUCCESS  # not a server: no token needed
        with rpc.connect_tracker(HOST, tracker.port) as tracker_session:
            tracker_session.request("open", timeout=15).close()


def test_a_wrong_registration_token_is_refused_logged_and_retried(spawn, stderr):
    wrong = rpc.Tracker(port=0, auth_token="another token")
    port = wrong.port
    try:
        spawn(port, "rasp", registration_token=TOKEN)
        stderr.wait_for(rf"WARNING workbench\.rpc\.registration: the tracker at {HOST}:{port} refused to register this "
                        r"server: wrong registration token: the server's registration_token differs from the tracker's")
        stderr.wait_for(rf"WARNING workbench\.rpc\.tracker: wrong registration proof from {re.escape(HOST)}")
        assert free_slots(port, "rasp") == 0 and not server_entries(port, "rasp")
    finally:
        wrong.terminate()
    # the server keeps trying: a tracker with its token, on the same address, gets it
    with rpc.Tracker(port=port, port_end=port + 1, silent=True, auth_token=TOKEN) as right:
        assert wait_until(lambda: free_slots(right.port, "rasp") == 1, 15, 0.05), summary_of(right.port)


def test_a_server_without_a_token_at_a_token_tracker_says_what_to_do(spawn, stderr):
    with rpc.Tracker(port=0, auth_token=TOKEN) as tracker:
        spawn(tracker.port, "rasp")
        stderr.wait_for(rf"WARNING workbench\.rpc\.registration: the tracker at {HOST}:{tracker.port} refused to "
                        r"register this server: this tracker takes registrations only from servers that prove .*"
                        r"registration_token=\.\.\.")
        stderr.wait_for(r"WARNING workbench\.rpc\.tracker: refused UPDATE_INFO from 127\.0\.0\.1: it did not prove")
        assert free_slots(tracker.port, "rasp") == 0


def test_a_replayed_registration_proof_is_refused(closing):
    with rpc.Tracker(port=0, silent=True, auth_token=TOKEN) as tracker:
        honest = wire(closing, tracker.port)
        captured = tracker_proof(tracker_nonce(honest))
        assert honest.call([AUTH_PROOF, captured]) == Code.SUCCESS
        assert honest.call([Code.PUT, "rasp", [9, "rasp:honest"], None]) == Code.SUCCESS

        thief = wire(closing, tracker.port)
        reply = thief.call([AUTH_PROOF, captured])  # without a nonce of its own
        assert reply[0] == Code.FAIL and "ask for a nonce first" in reply[1], reply
        tracker_nonce(thief)
        reply = thief.call([AUTH_PROOF, captured])  # over another nonce
        assert reply[0] == Code.FAIL and "wrong registration token" in reply[1], reply
        assert thief.call([Code.PUT, "rasp", [10, "rasp:thief"], None])[0] == Code.FAIL
        reply = honest.call([AUTH_PROOF, captured])  # and a nonce is good for one proof only
        assert reply[0] == Code.FAIL and "ask for a nonce first" in reply[1], reply
        assert summary_of(tracker.port)["queue_info"]["rasp"] == {"free": 1, "pending": 0}


def test_wrong_tracker_proofs_from_one_address_are_slowed_down(closing):
    with rpc.Tracker(port=0, silent=True, auth_token=TOKEN) as tracker:
        guesser = wire(closing, tracker.port)
        tracker_nonce(guesser)
        assert "wrong registration token" in guesser.call([AUTH_PROOF, "00" * 32])[1]
        # right away, even the right proof is refused unchecked: guesses from here wait their turn
        honest = wire(closing, tracker.port)
        reply = honest.call([AUTH_PROOF, tracker_proof(tracker_nonce(honest))])
        assert reply[0] == Code.FAIL and re.search(r"1 wrong registration proofs came from 127\.0\.0\.1: its next "
                                                   r"proof is checked in [\d.]+ s", reply[1]), reply

        def accepted() -> bool:
            return honest.call([AUTH_PROOF, tracker_proof(tracker_nonce(honest))]) == Code.SUCCESS

        assert wait_until(accepted, 5, 0.05)  # its turn comes (0.25 s after one wrong proof)


def test_servers_and_proxies_take_the_registration_token_from_the_environment(monkeypatch, spawn):
    monkeypatch.setenv("WORKBENCH_REGISTRATION_TOKEN", TOKEN)
    with rpc.Tracker(port=0, silent=True, auth_token=TOKEN) as tracker, \
            rpc.Proxy(port=0, silent=True, tracker_addr=(HOST, tracker.port)):
        spawn(tracker.port, "rasp")
        assert wait_until(lambda: free_slots(tracker.port, "rasp") == 1, 15, 0.05)
        assert wait_until(lambda: any(s["key"].startswith("server:proxy")
                                      for s in summary_of(tracker.port)["server_info"]), 15, 0.05)


def test_a_tracker_without_a_token_takes_servers_with_one(closing, spawn):
    with rpc.Tracker(port=0, silent=True) as tracker:
        assert wire(closing, tracker.port).call([AUTH_NONCE]) == [Code.SUCCESS, {"auth": False}]
        spawn(tracker.port, "rasp", registration_token=TOKEN)
        assert wait_until(lambda: free_slots(tracker.port, "rasp") == 1, 15, 0.05)


def test_a_tvm_rpc_server_cannot_register_at_a_token_tracker(tmp_path, stderr):
    pytest.importorskip("tvm", reason="apache-tvm is the `tvm` test extra: pip install -e .[test,tvm]")
    from .test_tvm_peers import tvm_rpc_server

    with rpc.Tracker(port=0, silent=True, auth_token=TOKEN) as tracker, \
            tvm_rpc_server(tmp_path, tracker.port, "tvmdev") as tvm_server:
        stderr.wait_for(r"WARNING workbench\.rpc\.tracker: refused UPDATE_INFO from 127\.0\.0\.1: it did not prove "
                        r"the tracker's registration token \(a TVM rpc_server cannot: start the tracker without "
                        r"--auth-token to take TVM servers\)", timeout=60)
        summary = summary_of(tracker.port)
        assert "tvmdev" not in summary["queue_info"], (summary, tvm_server.output())
        assert not [s for s in summary["server_info"] if "tvmdev" in str(s.get("key"))], summary
        # on its side, TVM's server stops at its check of the UPDATE_INFO reply
        assert wait_until(lambda: "AssertionError" in tvm_server.output(), 30, 0.1), tvm_server.output()


def test_a_farm_with_a_registration_token(closing):
    with LocalFarm({"local": 1}, registration_token=TOKEN) as farm:
        fake = wire(closing, farm.tracker.port)
        assert fake.call([Code.PUT, "local", [9, "local:fake"], None])[0] == Code.FAIL
        assert summary_of(farm.tracker.port)["queue_info"]["local"] == {"free": 1, "pending": 0}
        with farm.request("local", timeout=15) as remote:
            assert remote.listdir(".") == []


# -- the proxy ------------------------------------------------------------------------------
def test_a_server_without_the_token_cannot_wait_at_a_token_proxy(closing):
    with rpc.Proxy(port=0, silent=True, auth_token=TOKEN, timeout_client=0.5) as proxy:
        sock, _ = proxy_challenge(closing, proxy.port, "phone")
        kind, error = proxy_prove(sock, None)
        assert kind == Kind.ERROR and error[0] == ErrorCode.AUTH, error
        assert "takes only servers that prove they know its registration token" in error[1] and closed(sock)

        sock, _ = proxy_challenge(closing, proxy.port, "phone")
        kind, error = proxy_prove(sock, os.urandom(32))
        assert kind == Kind.ERROR and error[0] == ErrorCode.AUTH and "wrong registration token" in error[1], error
        assert closed(sock)

        sock, _ = proxy_challenge(closing, proxy.port, "phone")  # challenged, never answers: not waiting either
        assert no_server_at_proxy(proxy.port, "phone")  # a client is never paired with any of them


def test_a_real_server_with_the_token_waits_at_the_proxy_and_serves(private_tmpdir):
    with rpc.Proxy(port=0, silent=True, auth_token=TOKEN) as proxy, \
            through_proxy(proxy, "phone", silent=True, registration_token=TOKEN) as server:
        def session() -> bool:
            try:
                remote = rpc.connect(HOST, proxy.port, key="phone", connect_timeout=5)
            except DeviceNotFoundError:
                return False
            with remote:
                remote.upload(b"through the proxy", target="p")
                assert remote.download("p") == b"through the proxy"
            return True

        assert wait_until(session, 15, 0.05)
        assert_clean(server, private_tmpdir)


def test_a_wrong_or_missing_token_at_the_proxy_is_refused_and_logged(stderr):
    with rpc.Proxy(port=0, auth_token=TOKEN) as proxy:
        with through_proxy(proxy, "wrong", registration_token="not it"):
            stderr.wait_for(rf"WARNING workbench\.rpc\.server: the proxy {HOST}:{proxy.port} refused this server: "
                            r"wrong registration token: the server's registration_token differs from the proxy's")
            stderr.wait_for(r"WARNING workbench\.rpc\.proxy: refused a server of key 'wrong' from 127\.0\.0\.1")
            assert no_server_at_proxy(proxy.port, "wrong")
        with through_proxy(proxy, "none"):
            stderr.wait_for(rf"WARNING workbench\.rpc\.server: the proxy {HOST}:{proxy.port} refused this server: "
                            r"the proxy at .* takes only servers that prove its registration token: start this server "
                            r"with registration_token=")
            assert no_server_at_proxy(proxy.port, "none")


def test_a_proxy_without_a_token_takes_servers_with_one(private_tmpdir):
    with rpc.Proxy(port=0, silent=True) as proxy, \
            through_proxy(proxy, "phone", silent=True, registration_token=TOKEN) as server:
        assert wait_until(lambda: not no_server_at_proxy(proxy.port, "phone"), 15, 0.05)
        assert_clean(server, private_tmpdir)


def test_a_replayed_proof_at_the_proxy_is_refused_and_guessing_is_slowed_down(closing):
    with rpc.Proxy(port=0, silent=True, auth_token=TOKEN, timeout_client=0.5, unknown_key_grace=0) as proxy:
        honest, nonce = proxy_challenge(closing, proxy.port, "phone")
        captured = proxy_proof(nonce)
        assert proxy_prove(honest, captured) == (Kind.OK, None)

        thief, _ = proxy_challenge(closing, proxy.port, "stolen")
        kind, error = proxy_prove(thief, captured)
        assert kind == Kind.ERROR and error[0] == ErrorCode.AUTH and "wrong registration token" in error[1], error
        assert no_server_at_proxy(proxy.port, "stolen")

        # right after a wrong proof, the right one from the same address is refused unchecked
        late, nonce = proxy_challenge(closing, proxy.port, "late")
        kind, error = proxy_prove(late, proxy_proof(nonce))
        assert kind == Kind.ERROR and re.search(r"wrong registration proofs came from 127\.0\.0\.1: its next proof "
                                                r"is checked in [\d.]+ s", error[1]), error

        def accepted() -> bool:
            sock, nonce = proxy_challenge(closing, proxy.port, "late")
            return proxy_prove(sock, proxy_proof(nonce))[0] == Kind.OK

        assert wait_until(accepted, 5, 0.05)


def test_a_proxy_with_the_registration_token_registers_at_a_token_tracker(private_tmpdir):
    with rpc.Tracker(port=0, silent=True, auth_token=TOKEN) as tracker, \
            rpc.Proxy(port=0, silent=True, tracker_addr=(HOST, tracker.port), registration_token=TOKEN,
                      auth_token="proxy token") as proxy, \
            rpc.Proxy(port=0, silent=True, tracker_addr=(HOST, tracker.port)) as stranger, \
            through_proxy(proxy, "phone", silent=True, registration_token="proxy token"), \
            through_proxy(stranger, "phone", silent=True):
        assert wait_until(lambda: free_slots(tracker.port, "phone") == 1, 15, 0.05), summary_of(tracker.port)
        proxies = [s for s in summary_of(tracker.port)["server_info"] if s["key"].startswith("server:proxy")]
        assert [s["addr"][1] for s in proxies] == [proxy.port], proxies
        with rpc.connect_tracker(HOST, tracker.port) as clients, clients.request("phone", timeout=15) as remote:
            remote.upload(b"via the tracker and the proxy", target="t")
            assert remote.listdir(".") == ["t"]


# -- the command lines read their tokens from the environment ---------------------------------------
@contextlib.contextmanager
def cli(tmp_path: Path, tool: str, *args: str, **env: str) -> Iterator[Path]:
    """``python -m workbench.exec.<tool> args`` logging to a file; SIGTERM (then SIGKILL) and waited for on exit."""
    log = tmp_path / f"{tool}-{len(list(tmp_path.iterdir()))}.log"
    environ = {k: v for k, v in os.environ.items() if k not in ENV_NAMES and k != "WORKBENCH_LOG_LEVEL"}
    environ.update(env, PYTHONPATH=ROOT)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"workbench.exec.{tool}", *args], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=environ, start_new_session=True)
    try:
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bound_port(log: Path) -> int:
    found: list[int] = []

    def bound() -> bool:
        match = re.search(rf"bind to {re.escape(HOST)}:(\d+)", log.read_text(errors="replace"))
        if match:
            found.append(int(match.group(1)))
        return bool(match)

    assert wait_until(bound, 30, 0.05), log.read_text(errors="replace")
    return found[0]


def test_the_command_lines_take_their_tokens_from_the_environment(tmp_path, closing):
    with cli(tmp_path, "rpc_tracker", "--port", "0", WORKBENCH_TRACKER_TOKEN=TOKEN) as tracker_log:
        tracker_port = bound_port(tracker_log)
        stranger = wire(closing, tracker_port)
        assert stranger.call([Code.PUT, "cli", [9, "cli:x"], None])[0] == Code.FAIL  # the token is on
        with cli(tmp_path, "rpc_server", "--port", "0", "--tracker", f"{HOST}:{tracker_port}", "--key", "cli",
                 WORKBENCH_REGISTRATION_TOKEN=TOKEN) as server_log:
            assert wait_until(lambda: free_slots(tracker_port, "cli") == 1, 30, 0.05), server_log.read_text()
        with cli(tmp_path, "rpc_proxy", "--port", "0", WORKBENCH_PROXY_TOKEN="proxy token") as proxy_log:
            proxy_port = bound_port(proxy_log)
            proxy_challenge(closing, proxy_port, "probe")  # the token is on: a nonce, not an OK
            with cli(tmp_path, "rpc_server", "--host", HOST, "--port", str(proxy_port), "--through-proxy",
                     "--key", "phone", WORKBENCH_REGISTRATION_TOKEN="proxy token") as server_log:
                assert wait_until(lambda: not no_server_at_proxy(proxy_port, "phone"), 30, 0.1), server_log.read_text()


def test_token_options_are_checked():
    with pytest.raises(ValueError, match="auth_token must be a string"):
        rpc.Tracker(port=0, auth_token=1234)
    with pytest.raises(ValueError, match="registration_token must be a string"):
        rpc.Server(port=0, registration_token=b"bytes")


# -- "server busy" has its own exception ------------------------------------------------------
def test_max_sessions_refusals_raise_server_busy_error(private_tmpdir):
    with rpc.Server(port=0, silent=True, max_sessions=1) as server:
        first = rpc.connect(HOST, server.port)
        with pytest.raises(ServerBusyError, match=r"server busy: 1 sessions are running") as refused:
            rpc.connect(HOST, server.port)
        assert refused.value.code == ErrorCode.BUSY == 13 and isinstance(refused.value, RPCError)
        assert "unknown error code" not in str(refused.value)
        first.close()
        assert wait_until(lambda: not children(server.pid))
        with rpc.connect(HOST, server.port) as again:
            assert again.listdir(".") == []
        assert_clean(server, private_tmpdir)


def test_the_error_code_table_names_busy():
    from workbench.errors import error_from_code

    error = error_from_code(13, "proxy busy: 16 clients from 10.0.0.1 are already waiting")
    assert type(error) is ServerBusyError and error.code is ErrorCode.BUSY
    assert not isinstance(error, AuthenticationError)
