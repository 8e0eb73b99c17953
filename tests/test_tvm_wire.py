"""apache-tvm 0.27's own RPC client on our servers: TVM's wire protocol, told apart by its first bytes.

``tvm.rpc.connect`` (and a tracker's ``request``, and MetaSchedule's
``RPCRunner``) talk to ``rpc.Server`` as to a TVM server: files, modules,
tensors, kernels and ``time_evaluator``, in a session that has our sandbox,
crash isolation and limits. The client runs in this process, the server in
its own, on loopback; after each test no session worker or workspace is left.
A few tests write TVM's bytes by hand, to check the bounds of the codec.
The tests that hold for both servers run on minrpc too (``any_server``, ``any_remote``,
``make_server``); tests/test_tvm_wire_minrpc.py has minrpc's own.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from workbench import rpc
from workbench.errors import AuthenticationError
from workbench.runtime.workspace import PREALLOCATE_WINDOW

from .conftest import assert_clean, wait_until
from .wire import recv_exact

if importlib.util.find_spec("tvm") is None:
    pytest.skip("apache-tvm is not installed (it is the `tvm` test extra: pip install -e .[test,tvm])",
                allow_module_level=True)

pytestmark = pytest.mark.timeout(300)  # the first test pays for TVM's import and one LLVM export

HOST = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
N = 1024
MAGIC = 0xFF271


@pytest.fixture(scope="module")
def tvm():
    import tvm as tvm_module
    import tvm.rpc  # noqa: F401  (a submodule: tvm.rpc.connect)

    return tvm_module


@pytest.fixture(scope="module")
def tvm_kernels(tmp_path_factory) -> dict[str, dict[str, str]]:
    """``add_one`` (float32[1024] -> +1) built by apache-tvm, as .so and .tar."""
    out = tmp_path_factory.mktemp("tvm_wire_kernels")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "tvm_export_kernels.py"), str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return {k["name"]: k["files"] for k in report["kernels"]}


@pytest.fixture(scope="module")
def server(private_tmpdir):
    srv = rpc.Server(port=0, silent=True, server_init_callback="tests.helpers:register_extras")
    yield srv
    srv.terminate()
    assert not srv.alive


def close(remote) -> None:
    """End a TVM client session now (TVM ends it when its last reference goes; tensors may still hold it)."""
    remote._sess.get_function("CloseRPCConnection")()
    gc.collect()


@pytest.fixture
def remote(tvm, server, private_tmpdir):
    sess = tvm.rpc.connect(HOST, server.port)
    yield sess
    close(sess)
    assert_clean(server, private_tmpdir)


NO_CC = (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")) is None
BOTH = ["python", pytest.param("minrpc", marks=pytest.mark.skipif(NO_CC, reason="no C compiler to build minrpc"))]


def start_server(kind: str, **options):
    """``rpc.Server`` (kind "python") or ``rpc.MinRPCServer`` ("minrpc") on a free port, with ``options``."""
    if kind == "python":
        return rpc.Server(port=0, silent=True, **options)
    return rpc.MinRPCServer(port=0, **options)


@pytest.fixture(params=BOTH)
def make_server(request):
    """``make_server(**options)``: a server of the test's kind (both, in turn); all end with the test."""
    started = []

    def make(**options):
        started.append(start_server(request.param, **options))
        return started[-1]

    try:
        yield make
    finally:
        for srv in started:
            srv.terminate()


@pytest.fixture(scope="module", params=BOTH)
def any_server(request, private_tmpdir):
    """The Python server above, then minrpc: for what both serve alike."""
    if request.param == "python":
        yield request.getfixturevalue("server")
        return
    srv = start_server("minrpc")
    yield srv
    srv.terminate()
    assert not srv.alive


@pytest.fixture
def any_remote(tvm, any_server, private_tmpdir):
    sess = tvm.rpc.connect(HOST, any_server.port)
    yield sess
    close(sess)
    assert_clean(any_server, private_tmpdir)


# -- kernels, tensors, time_evaluator ---------------------------------------------------------
def test_tvm_kernel_tensors_and_time_evaluator(tvm, any_remote, tvm_kernels):
    remote = any_remote
    remote.upload(tvm_kernels["add_one"]["so"])
    mod = remote.load_module("add_one.so")
    dev = remote.cpu(0)
    host = np.random.default_rng(0).uniform(-10, 10, N).astype("float32")
    a = tvm.runtime.tensor(host, dev)
    b = tvm.runtime.empty((N,), "float32", dev)
    mod["add_one"](a, b)
    np.testing.assert_array_equal(b.numpy(), host + np.float32(1))
    mod["main"](b, a)  # TVM's exported libraries alias their one function as main
    np.testing.assert_array_equal(a.numpy(), (host + np.float32(1)) + np.float32(1))

    result = mod.time_evaluator("add_one", dev, number=5, repeat=3)(a, b)
    assert len(result.results) == 3 and all(np.isfinite(result.results)) and result.mean >= 0
    np.testing.assert_array_equal(b.numpy(), a.numpy() + np.float32(1))

    dev.sync()
    assert dev.exist and not remote.device(2, 0).exist  # no CUDA device here
    b.copyfrom(a)  # copies into a remote tensor, from a remote tensor
    np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_tensor_views_reach_the_kernel_as_their_part(tvm, any_remote, kernels):
    remote = any_remote
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    dev = remote.cpu(0)
    base = tvm.runtime.tensor(np.arange(8, dtype="float32"), dev)
    square = base._create_view((2, 4))  # the same memory, another shape
    out = tvm.runtime.empty((2, 4), "float32", dev)
    mod["add_one"](square, out)
    np.testing.assert_array_equal(out.numpy(), np.arange(8, dtype="float32").reshape(2, 4) + 1)


def test_python_functions_and_values(tvm, remote):
    fill = remote.get_function("tvm.contrib.random.random_fill")  # what MetaSchedule fills its inputs with
    t = tvm.runtime.empty((256,), "float32", remote.cpu(0))
    fill(t)
    values = t.numpy()
    assert values.any() and (abs(values) <= 1).all()
    arange = remote.get_function("tests.arange")(5)  # a tensor made on the server
    np.testing.assert_array_equal(arange.numpy(), np.arange(5, dtype="float32"))
    same = remote.get_function("tests.same")(t)  # the tensor it was given, under a new handle
    np.testing.assert_array_equal(same.numpy(), values)
    del same
    np.testing.assert_array_equal(t.numpy(), values)  # freeing one handle keeps the tensor for the other
    assert remote.get_function("tests.adder")(2)(3) == 5  # a function (a closure) made on the server
    f = remote.get_function("workbench.echo")
    assert f(7) == 7 and f(2.5) == 2.5 and f("text") == "text" and f(True) is True
    assert bytes(f(bytearray(b"\x00\x01bytes"))) == b"\x00\x01bytes"
    assert f(None) is None
    with pytest.raises(Exception, match="cannot be sent back"):
        f(1, 2)  # echo returns a list for two arguments: TVM's protocol has no lists


# -- files ------------------------------------------------------------------------------------
def test_files_upload_download_listdir_remove(tvm, any_remote, tvm_kernels):
    remote = any_remote
    small = b"hello\x00world"
    remote.upload(bytearray(small), "small.bin")
    big = os.urandom(20 << 20)  # over the 16 MiB held in memory: streamed into the file
    remote.upload(bytearray(big), "sub/big.bin")
    assert bytes(remote.download("small.bin")) == small
    assert bytes(remote.download("sub/big.bin")) == big
    assert remote.listdir(".").split(",") == ["small.bin", "sub", ""]  # TVM's form: each entry, then ','
    assert remote.listdir("sub") == "sub/big.bin,"
    remote.remove("sub/big.bin")
    remote.remove("no-such-file")  # as TVM's: nothing to remove is no error
    assert remote.listdir("sub") == ""

    remote.upload(tvm_kernels["add_one"]["tar"], "lib.tar")
    linked = bytes(remote.download_linked_module("lib.tar"))
    assert linked[:4] == b"\x7fELF"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "linked.so")
        with open(path, "wb") as f:
            f.write(linked)
        remote.upload(path)
    mod = remote.load_module("linked.so")
    dev = remote.cpu(0)
    a = tvm.runtime.tensor(np.ones(N, dtype="float32"), dev)
    mod["add_one"](a, a)
    np.testing.assert_array_equal(a.numpy(), np.full(N, 2, dtype="float32"))


def test_an_upload_over_the_file_size_limit_fails_and_the_session_goes_on(tvm, private_tmpdir):
    """TVM's client uploading more than a window of preallocation to a server that cannot write it: the
    error says why, every byte of the upload is dropped (the windows after the failed one too), and the
    session goes on in step."""
    srv = rpc.Server(port=0, silent=True, server_init_callback="tests.test_hardening_server:limit_file_size")
    try:
        remote = tvm.rpc.connect(HOST, srv.port)
        with pytest.raises(tvm.error.RPCError, match="File too large while the server wrote the received data"):
            remote.upload(bytearray(os.urandom(PREALLOCATE_WINDOW + (5 << 20))), "big.bin")  # read as frames: garbage
        remote.upload(bytearray(b"small"), "small.bin")
        assert bytes(remote.download("small.bin")) == b"small"
        assert remote.listdir(".") == "small.bin,"
        close(remote)
        assert_clean(srv, private_tmpdir)
    finally:
        srv.terminate()


def test_paths_stay_in_the_workspace(tvm, any_remote):
    remote = any_remote
    for bad in ("../escape.bin", "/etc/passwd", "a/../../b"):
        with pytest.raises(tvm.error.RPCError, match=r"absolute path|'\.\.'"):
            remote.upload(bytearray(b"x"), bad)
    with pytest.raises(tvm.error.RPCError, match="absolute path"):
        remote.download("/etc/passwd")
    with pytest.raises(tvm.error.RPCError, match="'..'"):
        remote.load_module("../../lib.so")
    with pytest.raises(tvm.error.RPCError) as info:
        remote.download("missing.bin")
    assert "wb-session" not in str(info.value) and tempfile.gettempdir() not in str(info.value)


# -- errors ------------------------------------------------------------------------------------
def test_missing_functions_and_failing_kernels(tvm, remote, kernels):
    with pytest.raises(AttributeError, match="no function 'no.such.function'"):
        remote.get_function("no.such.function")
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    with pytest.raises(AttributeError, match="no function 'nope'"):
        mod["nope"]
    with pytest.raises(tvm.error.RPCError, match="fail: the kernel refuses, as asked"):
        mod["fail"]()
    with pytest.raises(tvm.error.RPCError, match="ValueError: boom from a registered function"):
        remote.get_function("tests.boom")()
    assert remote.get_function("tests.add")(2, 3) == 5  # the session goes on after errors


def test_a_crashing_kernel_ends_its_call_and_a_dying_worker_only_its_session(tvm, any_server, kernels, private_tmpdir):
    server = any_server
    remote = tvm.rpc.connect(HOST, server.port)
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    dev = remote.cpu(0)
    with pytest.raises(tvm.error.RPCError, match=r"the kernel died of signal 11 \(SIGSEGV"):
        mod["segfault"]()
    a = tvm.runtime.tensor(np.zeros(4, dtype="float32"), dev)
    mod["add_one"](a, a)  # the same session, its tensors and modules, go on
    np.testing.assert_array_equal(a.numpy(), np.ones(4, dtype="float32"))
    with pytest.raises(tvm.error.RPCError, match="signal 11"):
        mod["segfault_unguarded"]()  # the worker really dies: the server says so, and goes on
    del a
    close(remote)
    assert_clean(server, private_tmpdir)
    again = tvm.rpc.connect(HOST, server.port)
    again.upload(bytearray(b"still here"), "x.bin")
    assert bytes(again.download("x.bin")) == b"still here"
    close(again)
    assert_clean(server, private_tmpdir)


def test_session_timeout_reaches_tvm_as_its_timeout_error(tvm, any_server, private_tmpdir):
    server = any_server
    remote = tvm.rpc.connect(HOST, server.port, session_timeout=1)
    with pytest.raises(tvm.error.RPCSessionTimeoutError, match="session timed out after 1 s"):
        remote.get_function("workbench.sleep")(30.0)
    close(remote)
    assert_clean(server, private_tmpdir)


# -- tokens ------------------------------------------------------------------------------------
def test_a_server_with_a_token_refuses_tvm_clients_unless_allowed(tvm, make_server, private_tmpdir):
    with make_server(auth_token="s3cret") as strict:
        with pytest.raises(tvm.error.RPCError, match=r"requires an auth token.*allow_tvm_clients=True"):
            tvm.rpc.connect(HOST, strict.port)
        assert_clean(strict, private_tmpdir)
    with make_server(auth_token="s3cret", allow_tvm_clients=True) as open_to_tvm:
        remote = tvm.rpc.connect(HOST, open_to_tvm.port)
        remote.upload(bytearray(b"ok"), "ok.bin")
        assert bytes(remote.download("ok.bin")) == b"ok"
        close(remote)
        with pytest.raises(AuthenticationError):  # our own clients still need the token
            rpc.connect(HOST, open_to_tvm.port, auth_token="wrong")
        assert_clean(open_to_tvm, private_tmpdir)


def test_the_command_line_flag_lets_tvm_clients_in(tvm, tmp_path):
    env = dict(os.environ, WORKBENCH_RPC_TOKEN="s3cret", TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "workbench.exec.rpc_server", "--port", "0", "--allow-tvm-clients"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    try:
        line = ""
        while "bind to" not in line:
            line = proc.stdout.readline()
            assert line, "the server ended before it bound a port"
        port = int(re.search(r"bind to [\d.]+:(\d+)", line).group(1))
        remote = tvm.rpc.connect(HOST, port)
        assert remote.listdir(".") == ""
        close(remote)
    finally:
        proc.terminate()
        proc.wait(30)


# -- trackers and farms --------------------------------------------------------------------------
def test_a_tvm_client_gets_our_server_from_our_tracker(tvm, make_server, private_tmpdir):
    with rpc.Tracker(port=0, silent=True) as tracker:
        server = make_server(tracker_addr=(HOST, tracker.port), key="wbdev")
        with rpc.connect_tracker(HOST, tracker.port) as ours:
            assert wait_until(lambda: ours.summary()["queue_info"].get("wbdev", {}).get("free") == 1, 15)
        tvm_tracker = tvm.rpc.connect_tracker(HOST, tracker.port)
        try:
            for attempt in range(3):  # again and again: the server offers itself anew after each session
                remote = tvm_tracker.request("wbdev", session_timeout=60, max_retry=1)
                a = tvm.runtime.tensor(np.full(16, attempt, dtype="float32"), remote.cpu(0))
                np.testing.assert_array_equal(a.numpy(), np.full(16, attempt, dtype="float32"))
                del a
                close(remote)
        finally:
            tvm_tracker.close()
        with pytest.raises(Exception, match="cannot find server that matches key"):
            tvm.rpc.connect(HOST, server.port, key="wbdev")  # a tracker's server takes only its match key
        assert_clean(server, private_tmpdir)


def matmul_candidates(tvm, tmp_path) -> list:
    """MetaSchedule RunnerInputs for two schedules (plain, and tiled by 16 and vectorized) of a 64x64 matmul."""
    from tvm import te
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    n = 64
    a, b = te.placeholder((n, n), name="A"), te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    func = te.create_prim_func([a, b, c])
    candidates = []
    for index, tile in enumerate((None, 16)):
        mod = tvm.IRModule({"main": func})
        if tile:
            sch = Schedule(mod)
            i, j, kk = sch.get_loops(sch.get_sblock("C"))
            jo, ji = sch.split(j, [None, tile])
            sch.reorder(i, jo, kk, ji)
            sch.vectorize(ji)
            mod = sch.mod
        path = str(tmp_path / f"candidate{index}.so")
        tvm.compile(mod, target="llvm").export_library(path)
        candidates.append(RunnerInput(path, "cpu", ArgInfo.from_prim_func(func)))
    return candidates


def test_metaschedule_rpc_runner_times_candidates_on_a_local_farm(tvm, tmp_path, private_tmpdir):
    """MetaSchedule's RPCRunner as tuning uses it: two candidate schedules of a small matmul, timed on a farm."""
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

    from workbench.farm import LocalFarm

    candidates = matmul_candidates(tvm, tmp_path)
    with LocalFarm({"local": 1}) as farm:
        host, port = farm.tracker_addr
        runner = RPCRunner(
            RPCConfig(tracker_host=host, tracker_port=port, tracker_key="local", session_timeout_sec=60),
            EvaluatorConfig(number=3, repeat=2, min_repeat_ms=0, enable_cpu_cache_flush=True),
            max_workers=1,
        )
        results = [future.result() for future in runner.run(candidates)]
        for result in results:
            assert result.error_msg is None, result.error_msg
            assert len(result.run_secs) == 2 and all(float(s) >= 0 for s in result.run_secs)
        for server in farm.servers:
            assert_clean(server, private_tmpdir)


def test_no_fork_server_serves_tvm_clients(tvm, private_tmpdir):
    with rpc.Server(port=0, silent=True, no_fork=True) as srv:
        remote = tvm.rpc.connect(HOST, srv.port)
        remote.upload(bytearray(b"spawned"), "s.bin")
        assert bytes(remote.download("s.bin")) == b"spawned"
        close(remote)
        assert_clean(srv, private_tmpdir)


# -- TVM's bytes, by hand ----------------------------------------------------------------------------
def packet(code: int, body: bytes) -> bytes:
    return struct.pack("<Qi", 4 + len(body), code) + body


def raw_str(text: str) -> bytes:
    return struct.pack("<iQ", 8, len(text)) + text.encode()


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    (length,) = struct.unpack("<Q", recv_exact(sock, 8))
    body = recv_exact(sock, length)
    return struct.unpack_from("<i", body)[0], body[4:]


def exception_text(body: bytes) -> str:
    count, type_index, size = struct.unpack_from("<iiQ", body)
    assert (count, type_index) == (1, 8)
    return body[16:16 + size].decode()


def handshake(port: int, key: bytes = b"client:", version: bytes = b"0.8.0", ctor: bytes = b"\0\0\0\0") -> socket.socket:
    """TVM's opening and INIT_SERVER (``ctor``: the packed constructor arguments, none by default)."""
    sock = socket.create_connection((HOST, port), timeout=20)
    sock.sendall(struct.pack("<ii", MAGIC, len(key)) + key)
    code, keylen = struct.unpack("<ii", recv_exact(sock, 8))
    assert code == MAGIC and recv_exact(sock, keylen) == b"server:"
    sock.sendall(packet(2, struct.pack("<Q", len(version)) + version + ctor))
    return sock


def test_handshake_and_packet_bounds(any_server, private_tmpdir):
    server = any_server
    with socket.create_connection((HOST, server.port), timeout=20) as sock:  # a key length past the limit
        sock.sendall(struct.pack("<ii", MAGIC, 1 << 30))
        assert struct.unpack("<i", recv_exact(sock, 4))[0] == MAGIC + 2  # TVM's mismatch code
        assert sock.recv(1) == b""
    with handshake(server.port, version=b"0.7.0") as sock:
        code, body = read_packet(sock)
        assert code == 5 and "protocol version mismatch" in exception_text(body)
    with handshake(server.port) as sock:
        assert read_packet(sock) == (4, struct.pack("<ii", 1, 0))  # INIT_SERVER answered: None
        sock.sendall(packet(9, struct.pack("<i", 1) + struct.pack("<iQ", 50, 0)))  # an unknown type index
        code, body = read_packet(sock)
        assert code == 5 and "unknown TVM type index 50" in exception_text(body)
        sock.sendall(packet(9, struct.pack("<i", 1) + raw_str("workbench.echo")))  # in step: the next works
        code, body = read_packet(sock)
        assert code == 4 and struct.unpack_from("<ii", body) == (1, 4)  # a handle (an opaque pointer)
        sock.sendall(packet(9, struct.pack("<i", 1) + struct.pack("<iQ", 8, 1 << 40)))  # a string past the packet
        code, body = read_packet(sock)
        assert code == 5 and "overruns its packet" in exception_text(body)
        tensor = struct.pack("<iQiiiBBHqQ", 7, 0, 1, 0, 1, 2, 32, 1, 4, 0)  # float32[4] on cpu(0), data 0
        sock.sendall(packet(17, struct.pack("<i", 2) + tensor + struct.pack("<i", 0)))  # allocate it
        code, body = read_packet(sock)
        count, type_index, data = struct.unpack_from("<iiQ", body)
        assert (code, count, type_index) == (4, 1, 4) and data  # its handle: what a DLTensor's data holds
        described = tensor[4:12].replace(struct.pack("<Q", 0), struct.pack("<Q", data)) + tensor[12:]
        sock.sendall(packet(6, described + struct.pack("<Q", 64)))  # copy 64 bytes out of its 16
        code, body = read_packet(sock)
        assert code == 5 and "overruns the tensor's 16 bytes" in exception_text(body)
        sock.sendall(packet(6, described + struct.pack("<Q", 16)))
        assert read_packet(sock) == (8, bytes(16))  # COPY_ACK: the zero-filled tensor
        sock.sendall(packet(3, struct.pack("<Q", 12345) + struct.pack("<i", 1) + raw_str("x" * (17 << 20))))
        code, body = read_packet(sock)  # 17 MiB in a string argument: over what a packet may hold in memory
        assert code == 5 and "over the 16777216-byte limit" in exception_text(body)
        sock.sendall(struct.pack("<Q", 1 << 62))  # a packet longer than anything the server takes
        code, body = read_packet(sock)
        assert code == 5 and "over this server's limit" in exception_text(body)
        assert sock.recv(1) == b""
    assert_clean(server, private_tmpdir)


def test_a_tvm_client_through_our_proxy(tvm, private_tmpdir):
    """TVM's client reaches a server that waits at our proxy: directly with its key, and through a tracker the
    proxy offers it to; a key no server has is TVM's "cannot find server"."""
    with rpc.Tracker(port=0, silent=True) as tracker, \
            rpc.Proxy(port=0, silent=True, tracker_addr=(HOST, tracker.port), unknown_key_grace=0) as proxy, \
            rpc.Server(host=HOST, port=proxy.port, is_proxy=True, key="behind", silent=True):
        with rpc.connect_tracker(HOST, tracker.port) as ours:
            assert wait_until(lambda: ours.summary()["queue_info"].get("behind", {}).get("free") == 1, 15)
        remote = None
        for _ in range(50):  # the server waits at the proxy again a moment after each session
            try:
                remote = tvm.rpc.connect(HOST, proxy.port, key="behind", session_timeout=60)
                break
            except Exception:  # noqa: BLE001  (TVM's RPCError: not yet back at the proxy)
                time.sleep(0.1)
        assert remote is not None, "TVM's client could not reach the server behind the proxy"
        a = tvm.runtime.tensor(np.arange(8, dtype="float32"), remote.cpu(0))
        np.testing.assert_array_equal(a.numpy(), np.arange(8, dtype="float32"))
        del a
        close(remote)
        tvm_tracker = tvm.rpc.connect_tracker(HOST, tracker.port)
        try:
            remote = tvm_tracker.request("behind", session_timeout=60, max_retry=3)
            assert remote.get_function("workbench.echo")(5) == 5
            close(remote)
        finally:
            tvm_tracker.close()
        with pytest.raises(Exception, match="cannot find server that matches key"):
            tvm.rpc.connect(HOST, proxy.port, key="nobody")
