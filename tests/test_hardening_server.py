"""Hardening of the server process and the session handshake (issue 7).

Each test is an attack or a failure the issue observed, run for real on
loopback: library logging, workspaces after a crash, file-descriptor and
resource exhaustion, session limits, the handshake deadline, idle sessions,
clients that die mid-call or never read, a write error in the middle of an
upload, kernels that exit or close every descriptor, out-of-range timeouts, a
bulk part on CONNECT, and the CLI's token. Mutual authentication and nested
sessions are in tests/test_auth_mutual.py.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import textwrap
import threading
import time

import pytest

from workbench import cc, rpc
from workbench.errors import (
    AuthenticationError,
    ErrorCode,
    RemoteError,
    RPCError,
    SessionCrashedError,
    SessionTimeoutError,
)
from workbench.farm import LocalFarm
from workbench.rpc.wire.protocol import FLAG_SERVER, HEADER, MAGIC, PREAMBLE, VERSION, Kind, pack
from workbench.runtime.workspace import PREALLOCATE_WINDOW

from .conftest import ROOT, alive, assert_clean, children, session_workspaces, wait_until
from .test_protocol import CPU, FLOAT32, RawPeer
from .helpers import RAW_EXIT_H, start_server

HOST = "127.0.0.1"
BUSY = 13  # the "server busy" error code (docs/protocol.md, section 7)

# kernels that end their worker in ways a crash handler must still see
HOSTILE_KERNELS = RAW_EXIT_H + r"""
#include <sys/syscall.h>
#include <unistd.h>
#include <workbench_kernel.h>

WB_KERNEL(exit86) { raw_exit_group(86); return 0; }  /* the system call itself: no guard catches it */

WB_KERNEL(close_every_fd) {
  for (int fd = 0; fd < 65536; ++fd) close(fd);
  return 0;
}
"""


def limit_file_size() -> None:
    """server_init_callback: files over 1 MiB cannot be written by the server and its workers (RLIMIT_FSIZE)."""
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_environment(**variables: str):
    """Set environment variables for the services started inside (they copy it), not for this process's temp files."""
    saved_tempdir = tempfile.tempdir
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tempfile.tempdir = saved_tempdir


@pytest.fixture(scope="module")
def hostile_so(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("hostile")
    src = out / "hostile.c"
    src.write_text(HOSTILE_KERNELS)
    return cc.create_shared(out / "hostile.so", [str(src)])


def process_seconds(pid: int) -> float:
    """CPU seconds (user + system) the process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bytes_waiting(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


# -- 6: library logging ----------------------------------------------------------------------------
LOGGING_SCRIPT = textwrap.dedent("""
    import logging, sys
    from workbench import rpc
    if sys.argv[1] == "info":
        logging.basicConfig(level=logging.INFO)
    silent = sys.argv[2] == "silent"
    with rpc.Server(port=0, silent=silent) as server:
        with rpc.connect("127.0.0.1", server.port) as remote:
            remote.ping()
    if sys.argv[1] == "default":
        with rpc.Tracker(port=0, silent=silent), rpc.Proxy(port=0, silent=silent):
            pass
    print(len(logging.getLogger("workbench").handlers), len(logging.getLogger().handlers))
""")


def run_logging_script(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", LOGGING_SCRIPT, *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_a_library_server_prints_nothing_unless_asked():
    """rpc.Server (and Tracker, Proxy) in a script with no logging set up print nothing; the library adds no handler."""
    result = run_logging_script("default", "loud")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.split() == ["0", "0"]


def test_a_library_server_logs_at_its_owners_level():
    result = run_logging_script("info", "loud")
    assert result.returncode == 0, result.stderr
    assert "RPCServer: bind to 127.0.0.1:" in result.stderr  # the owner set up INFO: the server follows
    quiet = run_logging_script("info", "silent")
    assert quiet.returncode == 0 and "RPCServer: bind to" not in quiet.stderr  # silent=True: warnings only


# -- 7: workspaces of crashed sessions, server terminated at once -----------------------------------
def test_terminate_right_after_a_crash_leaves_no_workspace(tmp_path, kernels):
    for run in range(3):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        with server_environment(TMPDIR=str(folder)):
            srv = rpc.Server(port=0, silent=True)
        try:
            remote = rpc.connect(HOST, srv.port)
            for i in range(100):  # a workspace that takes a moment to remove
                remote.upload(b"x" * 64, target=f"d/{i}.bin")
            remote.upload(kernels["so"])
            with pytest.raises(SessionCrashedError, match="SIGSEGV"):
                remote.load_module("kernels.so")["segfault_unguarded"]()
        finally:
            srv.terminate()
        assert not srv.alive
        assert not session_workspaces(str(folder)), f"run {run}: {session_workspaces(str(folder))}"


# -- 9: resource failures refuse one connection; the server goes on -----------------------------------
def test_a_workspace_that_cannot_be_created_refuses_that_connection_only(tmp_path):
    folder = tmp_path / "server-tmp"
    folder.mkdir()
    with server_environment(TMPDIR=str(folder)):
        srv = rpc.Server(port=0, silent=True)
    try:
        folder.rmdir()  # the server's temporary directory is gone: mkdtemp fails
        with pytest.raises(RPCError, match="server busy: it cannot create a session workspace") as err:
            rpc.connect(HOST, srv.port, connect_timeout=5)
        assert err.value.code == BUSY
        assert srv.alive
        folder.mkdir()
        with rpc.connect(HOST, srv.port, connect_timeout=5) as remote:
            remote.upload(b"back", target="b")
            assert remote.listdir(".") == ["b"]
        assert wait_until(lambda: not session_workspaces(str(folder)))
    finally:
        srv.terminate()


def test_idle_connections_at_a_low_fd_limit_leave_the_server_serving(private_tmpdir):
    """300 connections that send nothing, against a server allowed 128 descriptors: a client is still served."""
    srv = rpc.Server(port=0, silent=True, handshake_timeout=120)  # no help from the deadline: room must be made
    idle: list[socket.socket] = []
    try:
        resource.prlimit(srv.pid, resource.RLIMIT_NOFILE, (128, 128))
        for _ in range(300):
            try:
                idle.append(socket.create_connection((HOST, srv.port), timeout=5))
            except OSError:
                break  # a full backlog: refusing is allowed
        assert len(idle) >= 200
        for _ in range(3):
            with rpc.connect(HOST, srv.port, connect_timeout=10) as remote:
                assert remote.ping()["objects"] == 0
        assert srv.alive
        told = 0
        for sock in idle:  # the server made room by closing the oldest idle connections, with a word
            sock.settimeout(0)
            try:
                data = sock.recv(1 << 16, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            told += b"server busy" in data
        assert told > 0
    finally:
        for sock in idle:
            sock.close()
        assert_clean(srv, private_tmpdir)
        srv.terminate()


BACKOFF_SCRIPT = textwrap.dedent("""
    import json, os, resource, socket, sys, time
    from workbench.rpc.service.loop import ServiceLoop

    class Hoard(ServiceLoop):
        # keeps every connection it accepts, until it runs out of descriptors
        limit_refusal = b"REFUSED"

        def __init__(self, listener):
            super().__init__(listener, None)
            self.held, self.start, self.cpu = [], time.monotonic(), None

        def _accept(self):
            got = self.accept_connection()
            if got is not None:
                self.held.append(got[0])

        def _timeout(self):
            return 0.05

        def _tick(self):  # CPU used from 1 s after the start (the clients are all there) to 2.5 s
            elapsed = time.monotonic() - self.start
            if self.cpu is None and elapsed >= 1.0:
                self.cpu = [time.process_time(), time.monotonic()]
            elif self.cpu is not None and elapsed >= 2.5:
                self.cpu = [time.process_time() - self.cpu[0], time.monotonic() - self.cpu[1]]
                self._running = False

        def _event(self, key, events):
            pass

        def stop(self):
            for sock in self.held:
                sock.close()
            self._sel.close()
            self.listener.close()

    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    print(listener.getsockname()[1], flush=True)
    sys.stdin.readline()  # the clients are connecting
    loop = Hoard(listener)
    loop.run()
    print(json.dumps({"held": len(loop.held), "cpu": loop.cpu[0], "wall": loop.cpu[1]}), flush=True)
""")


def test_the_service_loop_backs_off_at_the_fd_limit():
    """A service out of descriptors refuses a connection and pauses accepting: it does not spin (tracker, proxy too)."""
    proc = subprocess.Popen([sys.executable, "-c", BACKOFF_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    clients: list[socket.socket] = []
    try:
        port = int(proc.stdout.readline())
        for _ in range(60):  # 60 connections wait in the backlog before the loop starts
            clients.append(socket.create_connection((HOST, port), timeout=5))
        out, _ = proc.communicate("go\n", timeout=30)
        figures = json.loads(out)
        refused = 0
        for sock in clients:
            sock.settimeout(0)
            try:
                refused += sock.recv(64) == b"REFUSED"
            except OSError:
                pass
    finally:
        for sock in clients:
            sock.close()
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    assert 0 < figures["held"] < 30  # it did run out of descriptors
    assert refused >= 1  # a connection it could not serve was told so
    assert figures["cpu"] < 0.5 * figures["wall"], figures  # a busy loop would use all of it


# -- 10: max_sessions, the whole-handshake deadline, idle sessions ---------------------------------
def test_max_sessions_refuses_with_server_busy(private_tmpdir):
    with rpc.Server(port=0, silent=True, max_sessions=2) as srv:
        a = rpc.connect(HOST, srv.port)
        b = rpc.connect(HOST, srv.port)
        with pytest.raises(RPCError, match=r"server busy: 2 sessions are running, the most it takes "
                                           r"\(max_sessions=2\)") as err:
            rpc.connect(HOST, srv.port)
        assert err.value.code == BUSY and "unknown error code" not in str(err.value)
        a.close()
        assert wait_until(lambda: len(children(srv.pid)) == 1)
        with rpc.connect(HOST, srv.port) as c:
            c.ping()
        b.ping()
        b.close()
        assert_clean(srv, private_tmpdir)


def test_server_arguments_are_checked():
    for kwargs, named in [({"max_sessions": 0}, "max_sessions"), ({"max_sessions": True}, "max_sessions"),
                          ({"idle_timeout": math.inf}, "idle_timeout"), ({"idle_timeout": 0}, "idle_timeout"),
                          ({"handshake_timeout": None}, "handshake_timeout"),
                          ({"handshake_timeout": math.nan}, "handshake_timeout")]:
        with pytest.raises(ValueError, match=named):
            rpc.Server(port=0, **kwargs)


def test_the_handshake_deadline_covers_the_whole_handshake(private_tmpdir):
    """A client dripping a byte every 0.1 s is cut off at the deadline (0.5 s here), not kept for ever."""
    with rpc.Server(port=0, silent=True, handshake_timeout=0.5) as srv:
        drip = HEADER.pack(200, Kind.CONNECT, 0, 0) + b"\x80" * 200
        with socket.create_connection((HOST, srv.port), timeout=5) as sock, \
                socket.create_connection((HOST, srv.port), timeout=5) as silent:
            sock.sendall(PREAMBLE.pack(MAGIC, VERSION, 0))  # then the CONNECT, a byte at a time
            sock.settimeout(0.1)
            received, closed = b"", False
            for byte in drip[:50]:  # 5 s at most
                try:
                    sock.send(bytes([byte]))
                    while chunk := sock.recv(4096):
                        received += chunk
                    closed = True
                    break
                except socket.timeout:
                    continue
                except OSError:
                    closed = True
                    break
            assert closed, "the dripping client was kept past the handshake deadline"
            assert b"the handshake did not complete within 0.5 s" in received
            silent.settimeout(5)
            assert silent.recv(64) == b""  # a connection that sends nothing is closed at the deadline too
        with rpc.connect(HOST, srv.port) as remote:
            remote.ping()
        assert_clean(srv, private_tmpdir)


def test_idle_sessions_end_and_busy_ones_do_not(private_tmpdir, kernels):
    with rpc.Server(port=0, silent=True, idle_timeout=0.5) as srv:
        remote = rpc.connect(HOST, srv.port)
        remote.upload(kernels["so"])
        mod = remote.load_module("kernels.so")
        mod["sleep_ms"](1500)  # a request running three idle periods is not idle
        remote.ping()
        assert wait_until(lambda: not children(srv.pid), timeout=5)  # then nothing for 0.5 s: ended
        with pytest.raises(SessionTimeoutError, match=r"idle for 0.5 s \(the server's idle_timeout\)"):
            remote.ping()
        remote.close()
        assert_clean(srv, private_tmpdir)


def test_a_local_farm_ends_idle_sessions():
    with LocalFarm({"local": 1}) as farm:
        assert farm.servers[0].config.idle_timeout == 900.0
    with LocalFarm({"local": 1}, idle_timeout=None) as farm:
        assert farm.servers[0].config.idle_timeout is None


# -- 11: a client that dies in the middle of a call -----------------------------------------------
SPIN_CLIENT = textwrap.dedent("""
    import sys
    from workbench import rpc
    with rpc.connect_tracker("127.0.0.1", int(sys.argv[1])) as tracker:
        remote = tracker.request("spinner", timeout=20)
    remote.upload(sys.argv[2])
    mod = remote.load_module("kernels.so")
    print("calling", flush=True)
    mod["spin"]()
""")


def test_a_client_killed_mid_call_frees_its_worker_and_the_device(private_tmpdir, kernels):
    with rpc.Tracker(port=0, silent=True) as tracker, \
            rpc.Server(port=0, tracker_addr=(HOST, tracker.port), key="spinner", silent=True) as srv, \
            rpc.connect_tracker(HOST, tracker.port) as watcher:

        def free() -> int:
            return watcher.summary()["queue_info"].get("spinner", {}).get("free", 0)

        assert wait_until(lambda: free() == 1)
        client = subprocess.Popen([sys.executable, "-c", SPIN_CLIENT, str(tracker.port), kernels["so"]],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "calling"
            assert wait_until(lambda: len(children(srv.pid)) == 1)
            worker = children(srv.pid)[0]
            assert wait_until(lambda: process_seconds(worker) > 0.2)  # the kernel is spinning
            client.kill()
            client.wait()
        finally:
            client.kill()
            client.wait()
            client.stdout.close()
        assert wait_until(lambda: not children(srv.pid), timeout=10), "the spinning worker outlived its client"
        assert wait_until(lambda: free() == 1, timeout=10), "the device was not offered again"
        remote = watcher.request("spinner", timeout=10)
        remote.ping()
        remote.close()
        assert_clean(srv, private_tmpdir)


# -- 12: crash notices never stall the server -----------------------------------------------------
def test_workers_of_clients_that_do_not_read_never_stall_the_server(private_tmpdir):
    """20 clients ask for 32 MiB and read nothing; their workers die: a new client is served at once."""
    with rpc.Server(port=0, silent=True) as srv:
        peers = [RawPeer.connect(srv.port) for _ in range(20)]
        try:
            for peer in peers:
                peer.handshake()
                t = peer.request(Kind.TENSOR_ALLOC, [[8 << 20], FLOAT32, *CPU])
                peer.send_frame(Kind.TENSOR_READ, [t])  # and never read the reply
            for peer in peers:  # the worker is stuck sending: our window is full and stays full
                def full(peer=peer) -> bool:
                    before = bytes_waiting(peer.sock)
                    time.sleep(0.05)
                    return before > 32 << 10 and bytes_waiting(peer.sock) == before

                assert wait_until(full, timeout=30)
            workers = children(srv.pid)
            assert len(workers) == 20
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            assert wait_until(lambda: not any(alive(p) for p in workers))
            start = time.monotonic()
            with rpc.connect(HOST, srv.port, connect_timeout=30) as remote:
                remote.ping()
            assert time.monotonic() - start < 15  # a bound, not a benchmark: one second per dead worker was 20 s
        finally:
            for peer in peers:
                peer.close()
        assert_clean(srv, private_tmpdir)


# -- 15: a write error in the middle of an upload ---------------------------------------------------
@pytest.mark.parametrize("io_timeout", [None, 30.0], ids=["splice", "buffered"])
def test_an_upload_over_the_file_size_limit_is_drained_not_executed(private_tmpdir, io_timeout):
    """The bytes of a failed upload are read and dropped: an UPLOAD frame hidden inside them never runs."""
    hidden = pack(["evil.txt"])
    frame = HEADER.pack(len(hidden), Kind.UPLOAD, 0, 4) + hidden + b"EVIL"
    # over the server's 4 MiB scratch buffer, so the failure comes mid-stream either way, and over a window of
    # preallocation: the windows after the failed one are dropped too
    data = bytearray(PREALLOCATE_WINDOW + (9 << 20))
    for offset in range(1 << 20, len(data) - len(frame), 256 << 10):  # past the limit, over and over
        data[offset:offset + len(frame)] = frame
    with rpc.Server(port=0, silent=True, timeout=io_timeout,
                    server_init_callback="tests.test_hardening_server:limit_file_size") as srv:
        remote = rpc.connect(HOST, srv.port)
        with pytest.raises(RemoteError, match="File too large.*the data was dropped"):
            remote.upload(bytes(data), target="big.bin")
        assert remote.listdir(".") == []
        assert remote.ping()["objects"] == 0
        remote.upload(b"small", target="small.txt")  # the session goes on, in step
        assert remote.download("small.txt") == b"small"
        remote.close()
        assert_clean(srv, private_tmpdir)


# -- 18: worker deaths a kernel causes on purpose; out-of-range timeouts; bulk on CONNECT -------------
def test_a_kernel_calling_exit_86_is_reported(server, hostile_so, private_tmpdir):
    remote = rpc.connect(HOST, server.port)
    remote.upload(hostile_so, target="hostile.so")
    with pytest.raises(SessionCrashedError, match="the session worker exited with status 86"):
        remote.load_module("hostile.so")["exit86"]()
    remote.close()
    assert_clean(server, private_tmpdir)


def test_a_kernel_closing_every_fd_is_reported(server, hostile_so, private_tmpdir):
    remote = rpc.connect(HOST, server.port)
    remote.upload(hostile_so, target="hostile.so")
    with pytest.raises(SessionCrashedError, match="the session worker exited with status 89: the code it ran "
                                                  "closed the session's connection"):
        remote.load_module("hostile.so")["close_every_fd"]()
    remote.close()
    assert_clean(server, private_tmpdir)


@pytest.mark.parametrize("value", [math.inf, 1e300, 2**64 - 1, math.nan, -1], ids=["inf", "1e300", "2**64-1", "nan", "-1"])
def test_out_of_range_session_timeouts_are_refused(server, value):
    with pytest.raises(ValueError, match="session_timeout must be a number >= 0 and at most 31536000 seconds"):
        rpc.connect(HOST, server.port, session_timeout=value)
    with RawPeer.connect(server.port) as peer:  # a client that does not check: the server does
        peer.start()
        peer.send_frame(Kind.CONNECT, {"key": "", "timeout": value, "proof": None, "ctor": None})
        assert "session_timeout must be a number >= 0 and at most" in peer.expect_error(ErrorCode.PROTOCOL)
        peer.assert_closed()


def test_a_bulk_part_on_connect_is_discarded(server, private_tmpdir):
    hidden = pack(["evil.txt"])
    inside = HEADER.pack(len(hidden), Kind.UPLOAD, 0, 4) + hidden + b"EVIL"
    with RawPeer.connect(server.port) as peer:
        peer.start()
        peer.send_raw_frame(Kind.CONNECT, pack({"key": "", "timeout": 0, "proof": None, "ctor": None}), inside)
        assert peer.recv_frame().kind == Kind.OK
        assert peer.request(Kind.LISTDIR, []) == []  # the first reply is LISTDIR's: nothing ran from the bulk
    assert wait_until(lambda: not session_workspaces(private_tmpdir))


def test_a_server_connecting_to_a_server_as_to_a_proxy_is_told(server):
    """rpc_server --through-proxy pointed at another server (both default to port 9090) gets a clear error."""
    with RawPeer.connect(server.port) as peer:
        peer.send(PREAMBLE.pack(MAGIC, VERSION, FLAG_SERVER))
        assert peer.recv_preamble() == (MAGIC, VERSION, 0)
        assert "this is an RPC server, not a proxy" in peer.expect_error(ErrorCode.PROTOCOL)


def test_a_through_proxy_server_pointed_at_a_server_says_so(server):
    """rpc_server --through-proxy given a server's port (not a proxy's) logs why it cannot register."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORKBENCH_LOG_LEVEL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench.exec.rpc_server", "--through-proxy", "--port", str(server.port),
         "--key", "lost"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for _ in range(20):
            lines.append(proc.stderr.readline())
            if "is an RPC server, not a proxy" in lines[-1] or not lines[-1]:
                break
        assert "is an RPC server, not a proxy" in lines[-1], lines
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        proc.stderr.close()


# -- 19: the CLI's token, the deadline, session_timeout on time -------------------------------------
def test_the_cli_reads_its_token_from_the_environment(private_tmpdir, monkeypatch):
    monkeypatch.delenv("WORKBENCH_RPC_TOKEN", raising=False)
    port = free_port()
    env = dict(os.environ, WORKBENCH_RPC_TOKEN="cli-secret", PYTHONPATH=ROOT)
    env.pop("WORKBENCH_LOG_LEVEL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench.exec.rpc_server", "--port", str(port), "--port-end", str(port + 1),
         "--max-sessions", "1", "--idle-timeout", "60"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert f"RPCServer: bind to 127.0.0.1:{port}" in proc.stderr.readline()  # the CLI logs INFO
        with pytest.raises(AuthenticationError, match="requires an auth token"):
            rpc.connect(HOST, port)  # a client without the token is refused: the server read the variable
        with rpc.connect(HOST, port, auth_token="cli-secret") as remote:
            assert remote.listdir(".") == []
            with pytest.raises(RPCError, match=r"server busy: 1 sessions .*max_sessions=1"):
                rpc.connect(HOST, port, auth_token="cli-secret")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        proc.stderr.close()


def test_the_cli_checks_its_limits():
    result = subprocess.run([sys.executable, "-m", "workbench.exec.rpc_server", "--max-sessions", "0"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "max_sessions must be an int >= 1" in result.stderr


def test_session_timeout_fires_on_time(server, kernels, private_tmpdir):
    start = time.monotonic()
    remote = rpc.connect(HOST, server.port, session_timeout=1.0)
    remote.upload(kernels["so"])
    with pytest.raises(SessionTimeoutError, match=r"session timed out after 1 s"):
        remote.load_module("kernels.so")["spin"]()
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed < 2.5, elapsed  # a timer firing 4x late (4 s) fails here
    remote.close()
    assert_clean(server, private_tmpdir)


# -- issue 17, item 3: idle sessions give up their slots; one address gets a share ---------------------------
SERVERS = ["python", "minrpc"]


@pytest.mark.parametrize("kind", SERVERS)
def test_a_full_server_ends_the_longest_idle_session_for_a_new_client(private_tmpdir, kind):
    with start_server(kind, max_sessions=2, preempt_idle=1.0) as srv:
        idle = rpc.connect(HOST, srv.port)
        busy = rpc.connect(HOST, srv.port)
        sleeping = threading.Thread(target=busy.get_function("workbench.sleep"), args=(4.0,))
        sleeping.start()  # a call in flight is no idleness, however long it lasts
        time.sleep(1.5)
        newcomer = rpc.connect(HOST, srv.port)  # full: the idle session gives its slot
        with pytest.raises(SessionTimeoutError, match=r"the session was idle for \d+ s and another client needed its "
                                                       r"slot \(max_sessions=2\)"):
            idle.ping()
        with pytest.raises(RPCError, match="server busy: 2 sessions are running"):
            rpc.connect(HOST, srv.port)  # the busy one and the newcomer (just started) are not idle enough
        sleeping.join()
        assert busy.ping() is not None and newcomer.ping() is not None
        for s in (idle, busy, newcomer):
            s.close()


@pytest.mark.parametrize("kind", SERVERS)
def test_without_preempt_idle_a_full_server_refuses(private_tmpdir, kind):
    with start_server(kind, max_sessions=1, preempt_idle=None) as srv, rpc.connect(HOST, srv.port) as held:
        time.sleep(1.2)
        with pytest.raises(RPCError, match="server busy: 1 sessions are running"):
            rpc.connect(HOST, srv.port)
        assert held.ping() is not None


@pytest.mark.parametrize("kind", SERVERS)
def test_one_address_holds_at_most_its_share_of_the_sessions(private_tmpdir, kind):
    with start_server(kind, max_sessions=4, preempt_idle=None) as srv:
        held = [rpc.connect(HOST, srv.port) for _ in range(3)]  # 4 - 4 // 4
        with pytest.raises(RPCError, match=r"your address \(127.0.0.1\) holds 3 sessions, its share of the 4"):
            rpc.connect(HOST, srv.port)
        held.pop().close()
        assert wait_until(lambda: _connects(srv.port))
        for s in held:
            s.close()


def _connects(port: int) -> bool:
    try:
        rpc.connect(HOST, port).close()
        return True
    except RPCError:
        return False
