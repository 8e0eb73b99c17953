"""Issue 7 against the proxy: reconnecting right after a session, and strangers that cannot hold it.

Real proxies and servers on 127.0.0.1; attackers are raw sockets speaking just
enough of the protocol. Timeouts are configured small so the tests are fast;
every wait is bounded, every thread stops and every socket closes with its test.
"""
from __future__ import annotations

import resource
import socket
import threading
import time

import pytest

from workbench import rpc
from workbench.errors import DeviceNotFoundError, ErrorCode, RPCError
from workbench.rpc.wire.handshake import ERROR_BUSY
from workbench.rpc.wire.protocol import FLAG_SERVER, HEADER, MAGIC, PREAMBLE, VERSION, Kind

from .conftest import assert_clean, wait_until
from .wire import closed_by_peer, frame, read_frame, recv_exact
from .test_hardening_tracker import cpu_seconds, flood_fds, peak_rss_mb, start_limited, stop_limited

HOST = "127.0.0.1"
PROBE_KEY = "probe-no-such-key"


# -- helpers ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def no_token(monkeypatch):
    monkeypatch.delenv("WORKBENCH_RPC_TOKEN", raising=False)


def through_proxy(proxy: rpc.Proxy, key: str) -> rpc.Server:
    return rpc.Server(host=HOST, port=proxy.port, is_proxy=True, key=key, silent=True)


def waiting_keys(port: int) -> list[str]:
    """The keys the proxy says are waiting (from its error for a key nobody serves)."""
    try:
        rpc.connect(HOST, port, key=PROBE_KEY, connect_timeout=5).close()
    except DeviceNotFoundError as exc:
        text = str(exc).split("(keys waiting: ", 1)[1].split(")", 1)[0]
        return [] if text == "none" else text.split(", ")
    raise AssertionError("a session was opened with the probe key")


def wait_waiting(port: int, keys: list[str], timeout: float = 15.0) -> None:
    assert wait_until(lambda: waiting_keys(port) == sorted(keys), timeout=timeout, interval=0.05), (
        f"keys waiting at the proxy: {waiting_keys(port)}, expected {sorted(keys)}")








def silent_client(port: int, key: str, closing: list) -> socket.socket:
    """Asks the proxy for ``key`` and then says nothing more (reads the proxy's HELLO)."""
    sock = socket.create_connection((HOST, port), timeout=5)
    closing.append(sock)
    sock.sendall(PREAMBLE.pack(MAGIC, VERSION, 0) + frame(Kind.PROXY_CONNECT, {"key": key}))
    assert PREAMBLE.unpack(recv_exact(sock, PREAMBLE.size))[0] == MAGIC
    kind, hello = read_frame(sock)
    assert kind == Kind.HELLO and hello["proxy"] is True
    return sock


def nothing_more(sock: socket.socket) -> bool:
    """True if the peer has sent nothing more (and has not closed) so far."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


# -- item 5: reconnecting right after a session --------------------------------------------
def test_reconnect_right_after_a_session_closes(private_tmpdir):
    with rpc.Proxy(port=0, silent=True) as proxy, through_proxy(proxy, "phone") as server:
        wait_waiting(proxy.port, ["phone"])
        for i in range(5):  # each connect comes before the server is back at the proxy: it is held until then
            with rpc.connect(HOST, proxy.port, key="phone") as remote:
                remote.upload(f"session {i}".encode(), target="n.txt")
                assert remote.listdir(".") == ["n.txt"]
        assert_clean(server, private_tmpdir)


def test_a_known_key_waits_up_to_timeout_client_an_unknown_one_is_refused_at_once(private_tmpdir):
    with rpc.Proxy(port=0, silent=True, timeout_client=0.5) as proxy:
        with through_proxy(proxy, "gone"):
            wait_waiting(proxy.port, ["gone"])
        wait_waiting(proxy.port, [])
        with pytest.raises(DeviceNotFoundError, match=(
                r"no server of key 'gone' is waiting at this proxy \(keys waiting: none\); "
                r"waited 0\.\d s for one to come back")):
            rpc.connect(HOST, proxy.port, key="gone")
        with pytest.raises(DeviceNotFoundError, match=r"waiting at this proxy \(keys waiting: none\)$"):
            rpc.connect(HOST, proxy.port, key="never-served")
    with rpc.Proxy(port=0, silent=True, timeout_client=0) as proxy:  # 0: nobody is held
        with through_proxy(proxy, "gone"):
            wait_waiting(proxy.port, ["gone"])
        wait_waiting(proxy.port, [])
        with pytest.raises(DeviceNotFoundError, match=r"key 'gone' is waiting at this proxy \(keys waiting: none\)$"):
            rpc.connect(HOST, proxy.port, key="gone")


def test_proxy_limits_are_checked():
    for name, bad in (("timeout_client", float("inf")), ("pairing_timeout", 0), ("handshake_timeout", -1),
                      ("max_clients_per_source", 0)):
        with pytest.raises(ValueError, match=name):
            rpc.Proxy(port=0, **{name: bad})


# -- item 13: what a connection waiting to be paired may hold -----------------------------------
def test_a_connection_waiting_to_be_paired_holds_only_its_opening(closing):
    with rpc.Proxy(port=0, silent=True) as proxy:
        peak_before = peak_rss_mb(proxy.pid)
        junk = bytes(4 << 20)
        for _ in range(40):  # each claims a 15 MiB PROXY_CONNECT and sends 4 MiB of it
            sock = socket.create_connection((HOST, proxy.port), timeout=5)
            closing.append(sock)
            sock.sendall(PREAMBLE.pack(MAGIC, VERSION, 0) + HEADER.pack(15 << 20, Kind.PROXY_CONNECT, 0, 0))
            try:
                sock.sendall(junk)
            except OSError:
                pass  # refused and closed before it read the junk
            assert PREAMBLE.unpack(recv_exact(sock, PREAMBLE.size))[0] == MAGIC
            assert read_frame(sock)[0] == Kind.HELLO
            kind, error = read_frame(sock)
            assert kind == Kind.ERROR and error[0] == ErrorCode.PROTOCOL
            assert "unexpected frame for a proxy" in error[1] and "at most 16384 bytes" in error[1]
            sock.close()
        assert peak_rss_mb(proxy.pid) - peak_before < 32
        assert waiting_keys(proxy.port) == []  # and it serves on


# -- item 13: pairing deadline, silent clients, clients per source -------------------------------
def test_a_silent_paired_client_is_cut_at_the_pairing_deadline(private_tmpdir, closing):
    with rpc.Proxy(port=0, silent=True, pairing_timeout=0.3) as proxy, through_proxy(proxy, "k") as server:
        wait_waiting(proxy.port, ["k"])
        sock = silent_client(proxy.port, "k", closing)
        # the server's HELLO comes through; then, with no CONNECT from the client, both ends are closed
        rest = closed_by_peer(sock, timeout=3.0)
        assert len(rest) > HEADER.size and HEADER.unpack_from(rest)[1] == Kind.HELLO
        with rpc.connect(HOST, proxy.port, key="k") as remote:  # held until the server is back, then served
            assert remote.listdir(".") == []
        assert_clean(server, private_tmpdir)


class SilentAttacker:
    """Keeps ``count`` silent PROXY_CONNECTs for ``key`` open at all times, reopening those the proxy closes."""

    def __init__(self, port: int, key: str, count: int):
        self.port, self.key, self.count = port, key, count
        self.opened = 0
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, name="silent-attacker", daemon=True)

    def __enter__(self) -> "SilentAttacker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        for sock in self._socks:
            sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for sock in list(self._socks):
                try:
                    if sock.recv(1 << 16, socket.MSG_DONTWAIT) == b"":
                        raise ConnectionError
                except BlockingIOError:
                    continue
                except OSError:
                    self._socks.remove(sock)
                    sock.close()
            while len(self._socks) < self.count:
                try:
                    sock = socket.create_connection((HOST, self.port), timeout=2)
                    sock.sendall(PREAMBLE.pack(MAGIC, VERSION, 0) + frame(Kind.PROXY_CONNECT, {"key": self.key}))
                except OSError:
                    break
                self._socks.append(sock)
                self.opened += 1
            self._stop.wait(0.02)


def test_silent_clients_cannot_starve_a_legitimate_one(private_tmpdir):
    # timeout_client is below the server's own handshake deadline: only the proxy's pairing deadline frees it in time
    with rpc.Proxy(port=0, silent=True, pairing_timeout=0.3, timeout_client=4) as proxy, \
            through_proxy(proxy, "k") as server:
        wait_waiting(proxy.port, ["k"])
        with SilentAttacker(proxy.port, "k", 3) as attacker:
            assert wait_until(lambda: attacker.opened >= 3, 5)
            for _ in range(2):  # each is served in its turn, among the attacker's connections
                with rpc.connect(HOST, proxy.port, key="k") as remote:
                    assert remote.listdir(".") == []
            assert attacker.opened > 3  # the proxy kept cutting the attacker's silent pairings
        assert proxy.alive and server.alive
    assert_clean(server, private_tmpdir)


def test_one_source_may_hold_only_so_many_clients(private_tmpdir, closing):
    with rpc.Proxy(port=0, silent=True, max_clients_per_source=3, timeout_client=8) as proxy, \
            through_proxy(proxy, "busy") as server:
        wait_waiting(proxy.port, ["busy"])
        with rpc.connect(HOST, proxy.port, key="busy") as remote:  # the only server is in a session
            held = [silent_client(proxy.port, "busy", closing) for _ in range(3)]
            with pytest.raises(RPCError, match=(
                    r"proxy busy: 3 clients from 127\.0\.0\.1 are already waiting for servers at this proxy "
                    r"\(at most 3\); wait for them .* --max-clients-per-source")) as refused:
                rpc.connect(HOST, proxy.port, key="busy")
            assert refused.value.code == ERROR_BUSY
            assert all(nothing_more(sock) for sock in held)  # still held, not refused
            assert remote.listdir(".") == []
            for sock in held:
                sock.close()
        # the held clients left: their places are free again
        with rpc.connect(HOST, proxy.port, key="busy") as remote:
            assert remote.listdir(".") == []
    assert_clean(server, private_tmpdir)


# -- item 9: the file-descriptor limit ----------------------------------------------------------------
def test_at_the_fd_limit_the_proxy_backs_off_and_serves_its_sessions(private_tmpdir, closing):
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 256:
        pytest.skip("this test opens 120 connections")
    proc, port = start_limited("proxy.proxy", "serve_proxy", 48)
    try:
        with rpc.Server(host=HOST, port=port, is_proxy=True, key="fd", silent=True) as server:
            assert wait_until(lambda: _connects(port, "fd"), 15)
            with rpc.connect(HOST, port, key="fd") as remote:
                # registered servers (never closed to make room) past the limit: the rest wait in the backlog
                register = PREAMBLE.pack(MAGIC, VERSION, FLAG_SERVER) + frame(Kind.REGISTER, {"key": "flood"})
                flood = flood_fds(port, 120, closing, register)
                time.sleep(0.3)  # at the limit now
                before, start = cpu_seconds(proc.pid), time.monotonic()
                time.sleep(1.0)
                used = cpu_seconds(proc.pid) - before
                assert used < 0.5 * (time.monotonic() - start), f"the proxy used {used:.2f} s of CPU at the fd limit"
                remote.upload(b"x" * (1 << 20), target="blob")  # its relays go on
                assert remote.download("blob") == b"x" * (1 << 20)
                for sock in flood:
                    sock.close()
            # once descriptors are free again it accepts new clients (and the server back)
            assert wait_until(lambda: _connects(port, "fd"), 15)
            assert_clean(server, private_tmpdir)
    finally:
        stop_limited(proc)


def test_at_the_fd_limit_silent_connections_make_room_for_clients(private_tmpdir, closing):
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 256:
        pytest.skip("this test opens 120 connections")
    proc, port = start_limited("proxy.proxy", "serve_proxy", 48)
    try:
        with rpc.Server(host=HOST, port=port, is_proxy=True, key="fd", silent=True) as server:
            assert wait_until(lambda: _connects(port, "fd"), 15)
            flood_fds(port, 120, closing)  # silent: they never send their opening (and stay open)
            with rpc.connect(HOST, port, key="fd", connect_timeout=5) as remote:  # the oldest make room
                assert remote.listdir(".") == []
        assert_clean(server, private_tmpdir)
    finally:
        stop_limited(proc)


def _connects(port: int, key: str) -> bool:
    try:
        with rpc.connect(HOST, port, key=key, connect_timeout=5) as remote:
            return remote.listdir(".") == []
    except (OSError, DeviceNotFoundError):
        return False


def test_held_clients_are_served_in_turn_by_source_address():
    """The order the proxy pairs held clients in: each source address in turn, then by arrival.

    (Tests run on 127.0.0.1 only, so this is the policy itself, on the proxy's own records.)
    """
    from workbench.rpc.proxy.proxy import _Held, _Incoming, next_held

    hosts = ["10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.2"]
    queue = [_Held(_Incoming(None, host, 0.0), "k", 60.0, n, 0.0) for n, host in enumerate(hosts)]
    turn: dict[str, int] = {}
    served = []
    for n in range(len(hosts)):
        held = next_held(queue, turn)
        queue.remove(held)
        turn[held.client.host] = 100 + n
        served.append((held.client.host, held.arrival))
    assert served == [("10.0.0.1", 0), ("10.0.0.2", 3), ("10.0.0.3", 4), ("10.0.0.1", 1), ("10.0.0.2", 5),
                      ("10.0.0.1", 2)]
