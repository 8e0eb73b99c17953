"""upstream: tests/python/runtime/test_runtime_rpc.py (apache-tvm 0.27), case by case, through the workbench's API.

TVM's test servers have TVM's test functions registered; ours get the same names through
``server_init_callback`` (tests/conformance/__init__.py). Waits are bounded polls, never fixed sleeps.
"""
from __future__ import annotations

import gc
import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from workbench import cc, rpc, runtime
from workbench.errors import RPCError, SessionTimeoutError

from ..conftest import wait_until
from ..helpers import emulated_board_missing
from . import INIT, register_tvm_testing
from .conftest import HOST

COLON_KEY = "127.0.0.1:5555"
DEVICE_KEYS = ["test_device", COLON_KEY]
# A test kernel of a given dtype, b = a + 1, and a kernel that raises: for minrpc programs and the board.
ADD_ONE_T = """#include <workbench_kernel.h>
WB_KERNEL(add_one_{dtype}) {{
  WB_EXPECT_ARGS(2);
  DLTensor* a = WB_ARG_TENSOR_OF(0, {dtype}, 1);
  DLTensor* b = WB_ARG_TENSOR_OF(1, {dtype}, 1);
  for (int64_t i = 0; i < a->shape[0]; ++i) (({ctype}*)b->data)[i] = ({ctype})((({ctype}*)a->data)[i] + 1);
  return 0;
}}
"""
CTYPES = {"float32": "float", "float64": "double", "int32": "int32_t", "int8": "int8_t"}
RAISE_ERROR = """#include <workbench_kernel.h>
WB_KERNEL(test_raise_error) { WB_FAIL("RuntimeError", "msg"); }
"""


def add_one_source(dtype: str) -> str:
    return ADD_ONE_T.format(dtype=dtype, ctype=CTYPES[dtype])


@pytest.fixture(scope="module")
def minrpc_program(tmp_path_factory) -> str:
    """TVM's ``rpc.with_minrpc(cc.create_executable)(minrpc_exec, objects)``: a minrpc program (its kernels raise)."""
    out = tmp_path_factory.mktemp("minrpc")
    with cc.build(RAISE_ERROR, name="raise_error") as mod:
        return rpc.with_minrpc(cc.create_executable)(str(out / "minrpc"), mod.objects)


# -- test_bigendian_rpc ----------------------------------------------------------------------------------------
BIG_ENDIAN_BOARD_MISSING = emulated_board_missing("s390x")


@pytest.mark.skipif(BIG_ENDIAN_BOARD_MISSING is not None, reason=f"no big-endian board: {BIG_ENDIAN_BOARD_MISSING}")
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int8"])
def test_bigendian_rpc(tmp_path, dtype):
    """upstream: test_runtime_rpc.py::test_bigendian_rpc — add-one kernels of four dtypes, cross-compiled, run on a
    big-endian device (there a PowerPC host; here minrpc for s390x under qemu-user); the results are right."""
    with cc.build(add_one_source(dtype), target="s390x-linux-gnu", name=f"add_one_{dtype}") as mod:
        lib = mod.export_library(tmp_path / "dev_lib.tar")
    with rpc.MinRPCServer(target="s390x") as board, rpc.connect(HOST, board.port) as remote:
        remote.upload(lib)
        f = remote.load_module("dev_lib.tar")
        dev = remote.cpu(0)
        a = runtime.tensor(np.random.default_rng(0).integers(0, 256, size=10).astype(dtype), dev)
        b = runtime.tensor(np.zeros(10, dtype=dtype), dev)
        f[f"add_one_{dtype}"](a, b)
        np.testing.assert_allclose(b.numpy(), a.numpy() + np.array(1, dtype=dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int8"])
def test_bigendian_rpc_object_file(tmp_path, x1, dtype):
    """upstream: test_runtime_rpc.py::test_bigendian_rpc — its module travels as an object file: upload
    ``dev_lib.o``, ``load_module("dev_lib.o")`` (linked on the device), call it (here on this machine's server)."""
    src = tmp_path / "dev_lib.c"
    src.write_text(add_one_source(dtype))
    (obj,) = cc.compile_objects([src], tmp_path)
    x1.upload(obj, "dev_lib.o")
    f = x1.load_module("dev_lib.o")
    dev = x1.cpu(0)
    a = runtime.tensor(np.random.default_rng(0).integers(0, 256, size=10).astype(dtype), dev)
    b = runtime.tensor(np.zeros(10, dtype=dtype), dev)
    f[f"add_one_{dtype}"](a, b)
    np.testing.assert_allclose(b.numpy(), a.numpy() + np.array(1, dtype=dtype))


def test_bigendian_rpc_tvm_object_file(x1, tvm_built):
    """upstream: test_runtime_rpc.py::test_bigendian_rpc — the object file is TVM's ``f.write_to_file("dev_lib.o")``."""
    x1.upload(tvm_built["o"])
    f = x1.load_module("dev_lib.o")
    dev = x1.cpu(0)
    a = runtime.tensor(np.random.default_rng(0).uniform(size=102).astype("float32"), dev)
    b = runtime.tensor(np.zeros(102, dtype="float32"), dev)
    f(a, b)
    np.testing.assert_allclose(b.numpy(), a.numpy() + 1)


# -- registered functions ----------------------------------------------------------------------------------------
def test_rpc_simple(x1):
    """upstream: test_runtime_rpc.py::test_rpc_simple — a server of key x1, a client with that key: registered
    functions return values, and a function that raises raises a RuntimeError on the client."""
    f1 = x1.get_function("rpc.test.addone")
    assert f1(10) == 11
    f3 = x1.get_function("rpc.test.except")
    with pytest.raises(RuntimeError, match="abc"):
        f3("abc")
    f2 = x1.get_function("rpc.test.strcat")
    assert f2("abc", 11) == "abc:11"


def test_rpc_runtime_string(x1):
    """upstream: test_runtime_rpc.py::test_rpc_runtime_string — runtime strings (TVM's ffi String; our str) travel
    as arguments and come back as the result."""
    func = x1.get_function("rpc.test.runtime_str_concat")
    assert str(func("abc", "def")) == "abcdef"


def test_rpc_array(x1):
    """upstream: test_runtime_rpc.py::test_rpc_array — a tensor made from numpy on the remote CPU: its device says
    remote, its numpy() is the data, and a remote function that takes it sees the same data."""
    x = np.ones((3, 4))
    r_cpu = runtime.tensor(x, x1.cpu(0))
    assert str(r_cpu.device).startswith("remote")
    np.testing.assert_equal(r_cpu.numpy(), x)
    fremote = x1.get_function("rpc.test.remote_tensor_func")
    fremote(r_cpu)


def test_rpc_large_array(x1):
    """upstream: test_runtime_rpc.py::test_rpc_large_array — large tensors (5041x720 and 720x192 float32) are
    created on the remote and read back unchanged."""
    dev = x1.cpu(0)
    a_np = np.ones((5041, 720)).astype("float32")
    b_np = np.ones((720, 192)).astype("float32")
    a = runtime.tensor(a_np, dev)
    b = runtime.tensor(b_np, dev)
    np.testing.assert_equal(a.numpy(), a_np)
    np.testing.assert_equal(b.numpy(), b_np)


def check_echo(remote, local_session: bool) -> None:
    """TVM's check() of test_rpc_echo."""
    fecho = remote.get_function("testing.echo")
    assert fecho(1, 2, 3) == 1
    assert fecho(100, 2, 3) == 100
    assert fecho("xyz") == "xyz"
    assert bytes(fecho(bytearray(b"123"))) == b"123"
    with pytest.raises(RuntimeError, match="msg"):
        raise_err = remote.get_function("testing.test_raise_error")
        raise_err("RuntimeError", "msg")
    remote.cpu().sync()
    if not local_session:
        with pytest.raises(AttributeError):
            remote.system_lib()["notexist"]


@pytest.mark.parametrize("kind", ["local", "server"])
def test_rpc_echo(kind, x1_server):
    """upstream: test_runtime_rpc.py::test_rpc_echo — echo returns its first argument (ints, strings, bytes), a
    raising function raises a RuntimeError, Device.sync() works, a missing system-lib function is an
    AttributeError; on a LocalSession and on a server."""
    if kind == "local":
        register_tvm_testing()
        with rpc.LocalSession() as remote:
            check_echo(remote, True)
    else:
        with rpc.connect(HOST, x1_server.port) as remote:
            check_echo(remote, False)


def test_rpc_echo_minrpc(minrpc_program):
    """upstream: test_runtime_rpc.py::test_rpc_echo (check_minrpc) — the same checks on a minrpc program built by
    ``rpc.with_minrpc(cc.create_executable)`` and run by ``rpc.PopenSession``. Our minrpc registers no TVM test
    functions: echo is its builtin ``workbench.echo`` (one argument), the raising function a kernel of the program."""
    with rpc.PopenSession(minrpc_program) as remote:
        fecho = remote.get_function("workbench.echo")
        assert fecho(1) == 1
        assert fecho(100) == 100
        assert fecho("xyz") == "xyz"
        assert bytes(fecho(bytearray(b"123"))) == b"123"
        with pytest.raises(RuntimeError, match="msg"):
            remote.system_lib()["test_raise_error"]()
        remote.cpu().sync()
        with pytest.raises(AttributeError):
            remote.system_lib()["notexist"]


def test_rpc_echo_minrpc_on_the_remote(minrpc_program, private_tmpdir):
    """upstream: test_runtime_rpc.py::test_rpc_echo (check_minrpc, "minrpc on the remote") — a client sends a minrpc
    program's bytes with ``session_constructor_args=["rpc.PopenSession", bytes]``; the server runs it and the
    session is served by it."""
    with open(minrpc_program, "rb") as f:
        program = f.read()
    with rpc.Server(port=0, silent=True) as server:
        with rpc.connect(HOST, server.port, session_constructor_args=["rpc.PopenSession", program]) as client:
            assert client.get_function("workbench.echo")("xyz") == "xyz"
            with pytest.raises(RuntimeError, match="msg"):
                client.system_lib()["test_raise_error"]()


def test_rpc_file_exchange(x1):
    """upstream: test_runtime_rpc.py::test_rpc_file_exchange — bytes uploaded under a name download unchanged."""
    blob = bytearray(np.random.randint(0, 10, size=(10)))
    x1.upload(blob, "dat.bin")
    rev = x1.download("dat.bin")
    assert rev == blob


# -- test_rpc_remote_module ----------------------------------------------------------------------------------------
@pytest.fixture(params=["local", "two_hops"])
def module_session(request, private_tmpdir):
    """TVM's two sessions of test_rpc_remote_module: a LocalSession, and server x0 reaching server x1 (rpc.Connect)."""
    if request.param == "local":
        with rpc.LocalSession() as remote:
            yield remote
        return
    with rpc.Server(port=0, key="x0", silent=True) as server0, rpc.Server(port=0, key="x1", silent=True) as server1:
        with rpc.connect(HOST, server0.port, key="x0",
                         session_constructor_args=["rpc.Connect", HOST, server1.port, "x1", False]) as client:
            yield client


def test_rpc_remote_module(module_session, tvm_built, tmp_path):
    """upstream: test_runtime_rpc.py::test_rpc_remote_module (check_remote) — a TVM-built .so uploaded, loaded and
    timed with ``time_evaluator(f1.entry_name, ...)`` computes B = A + 1; a .tar uploaded and linked on the remote
    comes back with ``download_linked_module`` and runs here (in a LocalSession)."""
    remote = module_session
    dev = remote.cpu(0)
    remote.upload(tvm_built["so"])
    f1 = remote.load_module("dev_lib.so")
    a = runtime.tensor(np.random.uniform(size=102).astype("float32"), dev)
    b = runtime.tensor(np.zeros(102, dtype="float32"), dev)
    time_f = f1.time_evaluator(f1.entry_name, remote.cpu(0), number=10)
    cost = time_f(a, b).mean
    assert cost >= 0
    np.testing.assert_equal(b.numpy(), a.numpy() + 1)

    remote.upload(tvm_built["tar"])
    local_download_path = tmp_path / "dev_lib.download.so"
    local_download_path.write_bytes(remote.download_linked_module("dev_lib.tar"))
    with rpc.LocalSession() as local:
        local.upload(str(local_download_path))
        fupdated = local.load_module("dev_lib.download.so")
        a = runtime.tensor(np.random.uniform(size=102).astype("float32"), local.cpu(0))
        b = runtime.tensor(np.zeros(102, dtype="float32"), local.cpu(0))
        fupdated(a, b)
        np.testing.assert_equal(b.numpy(), a.numpy() + 1)


def test_rpc_remote_module_minrpc(tvm_built, tmp_path):
    """upstream: test_runtime_rpc.py::test_rpc_remote_module (check_minrpc) — a TVM system library exported with
    ``fcompile=rpc.with_minrpc(cc.create_executable)`` (TVM's create_executable) runs under ``rpc.PopenSession``:
    ``system_lib()`` times "myadd" and computes B = A + 1; a missing program, and one that is not executable, raise
    RuntimeError."""
    with pytest.raises(RuntimeError):
        rpc.PopenSession("filenotexist")
    path_minrpc = str(tmp_path / "dev_lib.minrpc")
    shutil.copy(tvm_built["minrpc"], path_minrpc)
    with rpc.PopenSession(path_minrpc) as remote:
        dev = remote.cpu(0)
        f1 = remote.system_lib()
        a = runtime.tensor(np.random.uniform(size=102).astype("float32"), dev)
        b = runtime.tensor(np.zeros(102, dtype="float32"), dev)
        time_f = f1.time_evaluator("myadd", remote.cpu(0), number=1)
        assert time_f(a, b).mean >= 0
        np.testing.assert_equal(b.numpy(), a.numpy() + 1)
    os.chmod(path_minrpc, stat.S_IRUSR)  # not executable
    with pytest.raises(RuntimeError):
        rpc.PopenSession(path_minrpc)


def test_rpc_return_func(x1):
    """upstream: test_runtime_rpc.py::test_rpc_return_func — a remote function returns a function (a closure), and
    calling it runs on the remote."""
    f1 = x1.get_function("rpc.test.add_to_lhs")
    fadd = f1(10)
    assert fadd(12) == 22


# -- test_rpc_session_constructor_args ------------------------------------------------------------------------------
def test_rpc_session_constructor_args_multi_hop(private_tmpdir):
    """upstream: test_runtime_rpc.py::test_rpc_session_constructor_args (check_multi_hop) — a session on server x1
    opened through server x0 (``["rpc.Connect", url, port, "x1", False]``) serves calls and tensors."""
    with rpc.Server(port=0, key="x0", silent=True) as server0, \
            rpc.Server(port=0, key="x1", silent=True, server_init_callback=INIT) as server1:
        with rpc.connect(HOST, server0.port, key="x0",
                         session_constructor_args=["rpc.Connect", HOST, server1.port, "x1", False]) as client:
            fecho = client.get_function("testing.echo")
            assert fecho(1, 2, 3) == 1
            assert fecho(100, 2, 3) == 100
            assert fecho("xyz") == "xyz"
            assert bytes(fecho(bytearray(b"123"))) == b"123"
            nd = runtime.tensor([1, 2, 3], device=client.cpu(0))
            assert nd.numpy()[1] == 2


def test_rpc_session_constructor_args_error_handling(x1_server):
    """upstream: test_runtime_rpc.py::test_rpc_session_constructor_args (check_error_handling) — an unknown session
    constructor fails the connect with an RPCError."""
    with pytest.raises(RPCError):
        rpc.connect(HOST, x1_server.port, key="x1", session_constructor_args=["rpc.NonExistingConstructor"])


def test_rpc_return_tensor(x1):
    """upstream: test_runtime_rpc.py::test_rpc_return_tensor — closures returned by a remote function share a
    remote tensor: one returns it, another reads an element of the tensor it is given; deleting the client's
    handle (and collecting) leaves the remote state usable."""
    m = x1.get_function("rpc.test.remote_return_nd")
    get_arr = m("get_arr")
    get_elem = m("get_elem")
    get_arr_elem = m("get_arr_elem")
    arr = get_arr()
    assert get_elem(0) == 0.0
    assert get_arr_elem(arr, 0) == 0.0
    del arr
    gc.collect()
    assert get_elem(0) == 0.0


@pytest.mark.parametrize("kind", ["local", "server"])
def test_rpc_return_remote_object(kind, x1_server):
    """upstream: test_runtime_rpc.py::test_rpc_return_remote_object — an object a remote function returns (a shape)
    goes back as an argument to other remote functions; replacing it with another works (on a LocalSession and a
    server). Ours returns the shape by value, a list: the same calls give the same results."""
    if kind == "local":
        register_tvm_testing()
        client = rpc.LocalSession()
    else:
        client = rpc.connect(HOST, x1_server.port, key="x1")
    with client:
        make_shape = client.get_function("ffi.Shape")
        get_elem = client.get_function("rpc.testing.GetShapeElem")
        get_size = client.get_function("rpc.testing.GetShapeSize")
        shape = make_shape(2, 3)
        assert get_elem(shape, 0) == 2
        assert get_elem(shape, 1) == 3
        assert get_size(shape) == 2
        shape = make_shape(0)
        assert get_size(shape) == 1
        assert get_elem(shape, 0) == 0


def test_local_func():
    """upstream: test_runtime_rpc.py::test_local_func — on a LocalSession a function returns a closure, and bytes
    upload and download unchanged."""
    register_tvm_testing()
    with rpc.LocalSession() as client:
        f1 = client.get_function("rpc.test.add_to_lhs")
        fadd = f1(10)
        assert fadd(12) == 22
        blob = bytearray(np.random.randint(0, 10, size=(10)))
        client.upload(blob, "dat.bin")
        rev = client.download("dat.bin")
        assert rev == blob


# -- the tracker -----------------------------------------------------------------------------------------------------
def exist_address(summary, key, host, port) -> bool:
    for device in summary["server_info"]:
        if device["key"] == f"server:{key}":
            addr = device["addr"]
            if (host is None or host == addr[0]) and port == addr[1]:
                return True
    return False


def free(client, key) -> int:
    return client.summary()["queue_info"].get(key, {}).get("free", -1)


@pytest.mark.parametrize("device_key", DEVICE_KEYS)
def test_rpc_tracker_register(device_key, spawn, closing):
    """upstream: test_runtime_rpc.py::test_rpc_tracker_register — two servers register a key (one with a custom
    address): the summary counts 2 free and lists both addresses; a request takes one (1 free) and its end gives
    it back (2); a terminated server leaves the summary; with none left the key shows 0 free."""
    with rpc.Tracker(host=HOST, port=0, silent=True) as tracker:
        client = rpc.connect_tracker(HOST, tracker.port)
        closing.append(client)
        server1 = spawn(tracker.port, device_key)
        assert wait_until(lambda: free(client, device_key) == 1)  # first in the queue: the request below gets it
        server2 = spawn(tracker.port, device_key, custom_addr="test_addr")  # an address nobody can connect to
        assert wait_until(lambda: free(client, device_key) == 2)
        summary = client.summary()
        assert summary["queue_info"][device_key]["free"] == 2
        assert exist_address(summary, device_key, "127.0.0.1", server1.port)
        assert exist_address(summary, device_key, "test_addr", server2.port)

        remote = client.request(device_key, timeout=60)
        summary = client.summary()
        assert summary["queue_info"][device_key]["free"] == 1
        remote.close()
        assert wait_until(lambda: free(client, device_key) == 2)

        server1.terminate()
        assert wait_until(lambda: free(client, device_key) == 1)
        summary = client.summary()
        assert not exist_address(summary, device_key, "127.0.0.1", server1.port)
        assert exist_address(summary, device_key, "test_addr", server2.port)

        server2.terminate()
        assert wait_until(lambda: free(client, device_key) == 0)
        summary = client.summary()
        assert summary["queue_info"][device_key]["free"] == 0
        assert not exist_address(summary, device_key, "test_addr", server2.port)


HOLDER = """
import sys, time
from workbench import rpc
client = rpc.connect_tracker(sys.argv[1], int(sys.argv[2]))
remote = client.request(sys.argv[3], session_timeout=float(sys.argv[4]), timeout=60)
print("holding", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("device_key", DEVICE_KEYS)
def test_rpc_tracker_request(device_key, spawn, closing, tmp_path):
    """upstream: test_runtime_rpc.py::test_rpc_tracker_request — one server, two client processes request it: the
    first holds it (0 free), the second waits (1 pending); when the first process dies the second gets the
    server (0 free, 0 pending)."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    with rpc.Tracker(host=HOST, port=0, silent=True) as tracker:
        spawn(tracker.port, device_key)
        client = rpc.connect_tracker(HOST, tracker.port)
        closing.append(client)
        assert wait_until(lambda: free(client, device_key) == 1)
        procs = []
        try:
            for timeout in (60, 200):  # TVM's are 4 and 200 s; ours outlast the test so that only the kill frees it
                procs.append(subprocess.Popen([sys.executable, str(script), HOST, str(tracker.port), device_key,
                                               str(timeout)], stdout=subprocess.PIPE, text=True))
                if len(procs) == 1:
                    assert procs[0].stdout.readline() == "holding\n"

            def queue():
                return client.summary()["queue_info"][device_key]

            assert wait_until(lambda: queue()["pending"] == 1, timeout=30)
            assert queue()["free"] == 0 and queue()["pending"] == 1
            procs[0].terminate()
            procs[0].wait(timeout=30)
            assert procs[1].stdout.readline() == "holding\n"  # the second client got the server
            assert wait_until(lambda: queue()["pending"] == 0)
            assert queue()["free"] == 0 and queue()["pending"] == 0
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(timeout=30)
                proc.stdout.close()


@pytest.mark.parametrize("device_key", ["test_device", COLON_KEY])
def test_rpc_tracker_via_proxy(device_key, private_tmpdir):
    """upstream: test_runtime_rpc.py::test_rpc_tracker_via_proxy — two servers behind a proxy that registers them
    with the tracker: a client gets two sessions through the tracker."""
    with rpc.Tracker(host=HOST, port=0, silent=True) as tracker, \
            rpc.Proxy(host=tracker.host, port=0, tracker_addr=(tracker.host, tracker.port), silent=True) as proxy, \
            rpc.Server(host=proxy.host, port=proxy.port, key=device_key, tracker_addr=(tracker.host, tracker.port),
                       is_proxy=True, silent=True), \
            rpc.Server(host=proxy.host, port=proxy.port, key=device_key, tracker_addr=(tracker.host, tracker.port),
                       is_proxy=True, silent=True), \
            rpc.connect_tracker(tracker.host, tracker.port) as client:
        remote1 = client.request(device_key, session_timeout=30, timeout=60, wait=True)
        remote2 = client.request(device_key, session_timeout=30, timeout=60, wait=True)
        with remote1, remote2:
            remote1.ping()
            remote2.ping()


@pytest.mark.parametrize("with_proxy", [True, False])
def test_rpc_session_timeout_error(with_proxy, private_tmpdir):
    """upstream: test_runtime_rpc.py::test_rpc_session_timeout_error — a session requested from the tracker with
    ``session_timeout=1``: a call after the time is up raises the session-timeout error; directly and through a
    proxy."""
    with rpc.Tracker(host=HOST, port=0, silent=True) as tracker:
        tracker_addr = (tracker.host, tracker.port)
        proxy = rpc.Proxy(host=HOST, port=0, tracker_addr=tracker_addr, silent=True) if with_proxy else None
        try:
            if proxy is not None:
                server = rpc.Server(host=proxy.host, port=proxy.port, is_proxy=True, key="x1", silent=True,
                                    server_init_callback=INIT)
            else:
                server = rpc.Server(port=0, tracker_addr=tracker_addr, key="x1", silent=True,
                                    server_init_callback=INIT)
            with server, rpc.connect_tracker(*tracker_addr) as client:
                with client.request(key="x1", session_timeout=1, timeout=60, wait=True) as rpc_sess:
                    with pytest.raises(SessionTimeoutError):
                        f1 = rpc_sess.get_function("rpc.test.addone")
                        deadline = time.monotonic() + 30
                        while time.monotonic() < deadline:  # until the second is up: a bounded poll
                            assert f1(10) == 11
                            time.sleep(0.1)
        finally:
            if proxy is not None:
                proxy.terminate()


@pytest.mark.parametrize("call_with_unused_argument", [True, False])
def test_compiled_function_with_zero_arguments(call_with_unused_argument, tvm_built, x1):
    """upstream: test_runtime_rpc.py::test_compiled_function_with_zero_arguments — a TVM-compiled function that
    takes no argument (or one it ignores) is called over RPC and returns its int64 result (42)."""
    x1.upload(tvm_built["zero_args"])
    remote_mod = x1.load_module("libbuilt.so")
    if call_with_unused_argument:
        res = remote_mod["func_with_arg"](0)
    else:
        res = remote_mod["func_without_arg"]()
    assert res == 42
