"""Behaviours TVM code relies on (issue 18, points 1 to 5): what `tvm.rpc` raises, returns and accepts.

Each test names what TVM does; tests/conformance/ maps TVM's own RPC tests case by case.
"""
from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest

from workbench import cc, rpc, runtime
from workbench.errors import BadRequestError, FunctionNotFoundError, RemoteError, SessionTimeoutError

from .helpers import ADD_ONE, start_server


@pytest.fixture(scope="module")
def extras_server(private_tmpdir):
    with rpc.Server(port=0, silent=True, server_init_callback="tests.helpers:register_extras") as srv:
        yield srv


# -- 1. errors: RuntimeError, as TVM's RPCError; a missing function is an AttributeError --------------------
def test_remote_errors_are_runtime_errors(extras_server):
    with rpc.connect("127.0.0.1", extras_server.port) as remote:
        with pytest.raises(RuntimeError, match="boom from a registered function") as info:
            remote.get_function("tests.boom")()
        assert isinstance(info.value, RemoteError)
        assert remote.get_function("tests.add")(2, 3) == 5  # the session goes on


@pytest.mark.parametrize("kind", ["python", "minrpc"])
def test_session_timeouts_are_runtime_errors(private_tmpdir, kind):
    srv = start_server(kind)
    try:
        remote = rpc.connect("127.0.0.1", srv.port, session_timeout=0.5)
        time.sleep(1.0)
        with pytest.raises(RuntimeError, match="session timed out") as info:
            remote.ping()
        assert isinstance(info.value, SessionTimeoutError)
        remote.close()
    finally:
        srv.terminate()


@pytest.mark.parametrize("kind", ["python", "minrpc"])
def test_a_missing_kernel_is_an_attribute_error(private_tmpdir, kernels, kind):
    srv = start_server(kind)
    try:
        with rpc.connect("127.0.0.1", srv.port) as remote:
            remote.upload(kernels["so"])
            mod = remote.load_module("kernels.so")
            with pytest.raises(AttributeError, match="add_onee") as info:
                mod["add_onee"]
            assert isinstance(info.value, FunctionNotFoundError) and isinstance(info.value, LookupError)
            with pytest.raises(AttributeError, match="no_such.function"):
                remote.get_function("no_such.function")
            assert "add_one" in mod.function_names  # the module and the session go on
            remote.ping()
    finally:
        srv.terminate()


def test_a_missing_local_function_is_an_attribute_error(kernels):
    with rpc.LocalSession() as local:
        local.upload(kernels["so"])
        mod = local.load_module("kernels.so")
        with pytest.raises(AttributeError, match="add_onee"):
            mod["add_onee"]
        with pytest.raises(AttributeError, match="no_such.function"):
            local.get_function("no_such.function")
    with pytest.raises(AttributeError, match="no_such.function"):
        runtime.get_global_func("no_such.function")


# -- 5. the smaller pieces ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["python", "minrpc"])
def test_device_sync(private_tmpdir, kind):
    srv = start_server(kind)
    try:
        remote = rpc.connect("127.0.0.1", srv.port)
        dev = remote.cpu(0)
        a = runtime.tensor(np.arange(4, dtype="float32"), dev)
        dev.sync()  # as TVM's Device.sync(): the work sent is done
        np.testing.assert_array_equal(a.numpy(), np.arange(4))
        runtime.cpu(0).sync()  # this process's CPU: nothing to wait for
        srv.terminate()
        with pytest.raises(RuntimeError):  # a lost session is told at once
            dev.sync()
        remote.close()
    finally:
        srv.terminate()


HELLO = '#include <stdio.h>\nint main(void) { printf("hello %d\\n", 6 * 7); return 0; }\n'


def test_create_executable(tmp_path):
    src = tmp_path / "hello.c"
    src.write_text(HELLO)
    path = cc.create_executable(tmp_path / "hello", [src])
    assert path == str(tmp_path / "hello")
    assert subprocess.run([path], capture_output=True, text=True, check=True).stdout == "hello 42\n"
    obj = cc.compile_objects([src], tmp_path)[0]  # objects, with options as TVM passes them (a list or a string)
    cc.create_executable(tmp_path / "hello2", [obj], options="-s")
    assert subprocess.run([str(tmp_path / "hello2")], capture_output=True, text=True, check=True).stdout == "hello 42\n"
    with pytest.raises(RuntimeError, match="missing.c"):
        cc.create_executable(tmp_path / "bad", [tmp_path / "missing.c"])


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is missing: apt-get install g++")
def test_with_minrpc_builds_with_a_cxx_driver(tmp_path):
    """TVM's default compiler is g++: minrpc's C sources are still compiled as C."""
    def create_executable(output, objects, options=None):  # TVM's tvm.contrib.cc.create_executable, as it links
        subprocess.run(["g++", "-o", output, *(options or []), *objects], check=True, capture_output=True)

    with cc.build(ADD_ONE, name="add_one") as mod:
        path = mod.export_library(tmp_path / "prog", fcompile=rpc.with_minrpc("g++"))
        with rpc.PopenSession(path) as remote:
            assert "add_one" in remote.system_lib().function_names
        path = rpc.with_minrpc(create_executable)(str(tmp_path / "prog2"), mod.objects)
    with rpc.PopenSession(path) as remote:
        dev = remote.cpu(0)
        a, b = runtime.tensor(np.ones(8, "float32"), dev), runtime.empty((8,), "float32", dev)
        remote.system_lib()["add_one"](a, b)
        np.testing.assert_array_equal(b.numpy(), np.full(8, 2.0))


# -- 2. functions that return functions and tensors -------------------------------------------------------
@pytest.fixture(params=["server", "local"])
def extras_session(request, extras_server):
    if request.param == "server":
        with rpc.connect("127.0.0.1", extras_server.port) as remote:
            yield remote
    else:
        from .helpers import register_extras

        register_extras()
        with rpc.LocalSession() as local:
            yield local


def test_a_function_can_return_a_function(extras_session):
    fadd = extras_session.get_function("tests.adder")(10)
    assert isinstance(fadd, rpc.RemoteFunction)
    assert fadd(12) == 22 and fadd(-10) == 0
    del fadd  # freed with the next request
    assert extras_session.get_function("tests.adder")(1)(1) == 2


def test_a_function_can_return_tensors(extras_session):
    dev = extras_session.cpu(0)
    a = runtime.tensor(np.arange(6, dtype="float32").reshape(2, 3), dev)
    same = extras_session.get_function("tests.same")(a)
    assert isinstance(same, runtime.Tensor) and same.shape == (2, 3) and same.dtype == np.float32
    np.testing.assert_array_equal(same.numpy(), a.numpy())
    del same  # freeing the returned handle keeps the tensor alive for its first one
    extras_session.ping()
    np.testing.assert_array_equal(a.numpy(), np.arange(6).reshape(2, 3))
    fresh = extras_session.get_function("tests.arange")(5)  # a host array the function returned: a device tensor
    assert fresh.device == dev
    np.testing.assert_array_equal(fresh.numpy(), np.arange(5, dtype="float32"))
    t, more = extras_session.get_function("tests.pair")(fresh)  # inside lists and dicts too
    np.testing.assert_array_equal(t.numpy(), fresh.numpy())
    assert more["twice"]() == 20.0
    del t, more, fresh
    assert extras_session.ping()["tensors"] == 1  # only `a` is left


def test_an_unencodable_result_is_a_request_error(extras_session):
    with pytest.raises(BadRequestError, match="returned"):
        extras_session.get_function("tests.a_set")()
    extras_session.ping()  # the session goes on


# -- 4. load_module of an object file ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["python", "minrpc"])
def test_load_module_links_an_object_file(private_tmpdir, tmp_path, kind):
    """As TVM's server: an uploaded .o is linked on the device and loaded (TVM's cross-compilation examples)."""
    src = tmp_path / "add_one.c"
    src.write_text(ADD_ONE)
    obj = cc.compile_objects([src], tmp_path)[0]
    (tmp_path / "junk.o").write_bytes(b"not an object file")
    srv = start_server(kind)
    try:
        with rpc.connect("127.0.0.1", srv.port) as remote:
            remote.upload(obj, "add_one.o")
            mod = remote.load_module("add_one.o")
            dev = remote.cpu(0)
            a, b = runtime.tensor(np.arange(8, dtype="float32"), dev), runtime.empty((8,), "float32", dev)
            mod["add_one"](a, b)
            np.testing.assert_array_equal(b.numpy(), np.arange(8) + 1)
            remote.upload(str(tmp_path / "junk.o"))
            with pytest.raises(RuntimeError, match="the object file 'junk.o' is not an ELF object file .*; "
                                                   "load_module takes relocatable objects compiled with -c"):
                remote.load_module("junk.o")
            assert sorted(remote.listdir()) == ["add_one.o", "junk.o"]  # nothing else left in the workspace
            mod["add_one"](b, a)  # the session goes on
    finally:
        srv.terminate()


# -- TVM's rpc.PopenSession constructor: a program of the client's, run by the server ---------------------------
@pytest.fixture(scope="module")
def program_bytes(tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("popen-ctor")
    with cc.build(ADD_ONE, name="add_one") as mod:
        path = mod.export_library(out / "prog", fcompile=rpc.with_minrpc("host"))
    with open(path, "rb") as f:
        return f.read()


def test_popen_session_constructor_runs_the_clients_program(private_tmpdir, program_bytes):
    with rpc.Server(port=0, silent=True, max_workspace_bytes=len(program_bytes) // 2) as small, \
            rpc.Server(port=0, silent=True, auth_token="s3cret") as guarded, \
            rpc.Server(port=0, silent=True) as server:
        ctor = ["rpc.PopenSession", program_bytes]
        with rpc.connect("127.0.0.1", server.port, session_constructor_args=ctor) as remote:
            assert remote.info.get("server") == "minrpc"  # the program's own session info
            dev = remote.cpu(0)
            a, b = runtime.tensor(np.ones(4, "float32"), dev), runtime.empty((4,), "float32", dev)
            remote.system_lib()["add_one"](a, b)
            np.testing.assert_array_equal(b.numpy(), np.full(4, 2.0))
        with pytest.raises(RuntimeError, match="quota"):  # the program counts against the workspace quota
            rpc.connect("127.0.0.1", small.port, session_constructor_args=ctor)
        with pytest.raises(RuntimeError, match="requires an auth token"):  # checked before the program is read
            rpc.connect("127.0.0.1", guarded.port, session_constructor_args=ctor, auth_token="")
        with pytest.raises(RuntimeError, match="rpc.PopenSession takes the program's bytes"):
            rpc.connect("127.0.0.1", server.port, session_constructor_args=["rpc.PopenSession", "prog"])
        with rpc.connect("127.0.0.1", server.port) as remote:  # the server goes on
            remote.ping()
