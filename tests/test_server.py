"""rpc.Server and its CLI: ports, keys, auth, timeouts, init callbacks, clean shutdown."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from workbench import rpc, runtime
from workbench.errors import (
    AuthenticationError,
    ConnectionClosedError,
    KeyMismatchError,
    RemoteError,
    SessionTimeoutError,
)

from .conftest import assert_clean, children, session_workspaces, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_search_and_terminate(private_tmpdir):
    first = rpc.Server(port=0, silent=True)
    base = first.port
    # occupy `base` with the first server, ask for [base, base+50): the second gets another port
    second = rpc.Server(port=base, port_end=base + 50, silent=True)
    assert base < second.port < base + 50
    remote = rpc.connect("127.0.0.1", second.port)
    remote.upload(b"x", target="x")
    pid = second.pid
    second.terminate()  # ends the session worker too, and removes its workspace
    first.terminate()
    assert not second.alive and not os.path.exists(f"/proc/{pid}")
    assert wait_until(lambda: not session_workspaces(private_tmpdir))
    with pytest.raises(ConnectionRefusedError, match="is the server running"):
        rpc.connect("127.0.0.1", base, connect_timeout=2)


def test_no_free_port_is_a_clear_error():
    with rpc.Server(port=0, silent=True) as srv:
        with pytest.raises(RuntimeError, match=rf"cannot listen on 127.0.0.1 ports {srv.port}\.\.{srv.port}"):
            rpc.Server(port=srv.port, port_end=srv.port + 1, silent=True, reuse_addr=False)


def test_key_must_match(private_tmpdir):
    with rpc.Server(port=0, key="rasp3b", silent=True) as srv:
        rpc.connect("127.0.0.1", srv.port, key="rasp3b").close()
        rpc.connect("127.0.0.1", srv.port).close()  # no key: accepted, as TVM does
        with pytest.raises(KeyMismatchError, match="serves key 'rasp3b', the client asked for 'jetson'"):
            rpc.connect("127.0.0.1", srv.port, key="jetson")
        assert_clean(srv, private_tmpdir)


def test_auth_token(private_tmpdir, monkeypatch):
    monkeypatch.delenv("WORKBENCH_RPC_TOKEN", raising=False)
    with rpc.Server(port=0, silent=True, auth_token="s3cret") as srv:
        with pytest.raises(AuthenticationError, match="requires an auth token"):
            rpc.connect("127.0.0.1", srv.port)
        with pytest.raises(AuthenticationError, match="wrong auth token"):
            rpc.connect("127.0.0.1", srv.port, auth_token="guess")
        ok = rpc.connect("127.0.0.1", srv.port, auth_token="s3cret")
        assert ok.listdir(".") == []
        ok.close()
        monkeypatch.setenv("WORKBENCH_RPC_TOKEN", "s3cret")
        rpc.connect("127.0.0.1", srv.port).close()
        assert_clean(srv, private_tmpdir)


def test_token_never_crosses_the_wire(private_tmpdir, monkeypatch):
    """Relay a session through a recording proxy: the token's bytes must not appear."""
    import threading

    monkeypatch.delenv("WORKBENCH_RPC_TOKEN", raising=False)
    token = "tok-" + os.urandom(8).hex()
    captured = bytearray()
    with rpc.Server(port=0, silent=True, auth_token=token) as srv:
        lsock = socket.create_server(("127.0.0.1", 0))
        port = lsock.getsockname()[1]

        def relay():
            client, _ = lsock.accept()
            upstream = socket.create_connection(("127.0.0.1", srv.port))
            for sock in (client, upstream):
                sock.settimeout(5)

            def pump(src, dst):
                try:
                    while data := src.recv(65536):
                        captured.extend(data)
                        dst.sendall(data)
                except OSError:
                    pass
                finally:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass

            t = threading.Thread(target=pump, args=(upstream, client))
            t.start()
            pump(client, upstream)
            t.join(5)
            client.close()
            upstream.close()

        thread = threading.Thread(target=relay)
        thread.start()
        remote = rpc.connect("127.0.0.1", port, auth_token=token)
        remote.upload(b"payload", target="p")
        remote.close()
        thread.join(10)
        lsock.close()
    assert b"payload" in captured and token.encode() not in captured


def test_session_timeout_is_enforced_by_the_server(server, kernels, private_tmpdir):
    remote = rpc.connect("127.0.0.1", server.port, session_timeout=1.5)
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    start = time.monotonic()
    with pytest.raises(SessionTimeoutError, match=r"session timed out after 1.5 s"):
        mod["spin"]()  # never returns by itself
    assert time.monotonic() - start < 10
    assert server.alive
    remote.close()
    assert_clean(server, private_tmpdir)


def test_init_callback_registers_functions(private_tmpdir):
    from tests.helpers import register_extras

    with rpc.Server(port=0, silent=True, server_init_callback=register_extras) as srv:
        remote = rpc.connect("127.0.0.1", srv.port)
        assert remote.get_function("tests.add")(2, 3) == 5
        t = runtime.tensor(np.arange(4, dtype="float32"), remote.cpu())
        assert remote.get_function("tests.tensor_sum")(t) == 6.0
        with pytest.raises(RemoteError, match="ValueError: boom from a registered function"):
            remote.get_function("tests.boom")()
        remote.close()
        assert_clean(srv, private_tmpdir)


def test_init_callback_must_be_importable():
    def local_callback():
        pass

    with pytest.raises(ValueError, match="cannot be imported by the server process"):
        rpc.Server(port=0, server_init_callback=local_callback)


def test_no_fork_mode(private_tmpdir, kernels):
    with rpc.Server(port=0, silent=True, no_fork=True, server_init_callback="tests.helpers:register_extras") as srv:
        remote = rpc.connect("127.0.0.1", srv.port)
        assert remote.get_function("tests.add")(1, 1) == 2
        remote.upload(kernels["so"])
        from workbench.errors import SessionCrashedError

        with pytest.raises(SessionCrashedError, match="SIGSEGV"):
            remote.load_module("kernels.so")["segfault_unguarded"]()  # a death no guard catches
        assert_clean(srv, private_tmpdir)


def test_idle_socket_timeout(private_tmpdir):
    with rpc.Server(port=0, silent=True, timeout=0.5) as srv:
        remote = rpc.connect("127.0.0.1", srv.port)
        assert remote.listdir(".") == []
        assert wait_until(lambda: not children(srv.pid), timeout=5)  # the idle session was ended
        with pytest.raises(ConnectionClosedError, match="lost|closed"):
            remote.listdir(".")
        assert_clean(srv, private_tmpdir)


def test_owner_death_stops_the_server(private_tmpdir):
    code = (
        "import sys, time; from workbench import rpc; s = rpc.Server(port=0, silent=True); "
        "print(s.pid, s.port, flush=True); time.sleep(60)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid, port = map(int, owner.stdout.readline().split())
        assert os.path.exists(f"/proc/{pid}")
        owner.kill()
        owner.wait()
        assert wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", timeout=10)
    finally:
        owner.kill()
        owner.stdout.close()


def test_cli_server(private_tmpdir, kernels):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "workbench.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
         "--port-end", str(port + 1), "--key", "cli", "--load-library", kernels["so"]],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stderr.readline()
        assert f"RPCServer: bind to 127.0.0.1:{port}" in line
        remote = rpc.connect("127.0.0.1", port, key="cli")
        assert remote.system_lib()["half"](8.0) == 4.0
        remote.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        proc.stderr.close()


def test_cli_bad_arguments():
    result = subprocess.run(
        [sys.executable, "-m", "workbench.exec.rpc_server", "--load-library", "/no/such/lib.so"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "no such file '/no/such/lib.so'" in result.stderr
