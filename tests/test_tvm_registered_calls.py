"""TVM kernels that call functions by name run on our TVM-free runtime when those are registered.

apache-tvm 0.27 exports (in a subprocess, once per test session) TIR kernels that call
``T.call_packed("tests.<name>", A, x, k)``: TVM's generated code looks the function up
through the library's ``__TVMFFIEnvModLookupFromImports`` slot and calls it through
``__TVMFFIFunctionCall``. A server with ``WORKBENCH_NO_TVM=1`` whose
``server_init_callback`` registers the function runs the kernel: the Python function
gets a view of the kernel's tensor (and its scalars) and fills it, and the kernel
computes on what it wrote. A function nobody registered is refused at ``load_module``
naming it; a registered function that raises fails the call with its message. Each
runs as ``.so`` and ``.tar``, on a real ``rpc.Server`` and on ``LocalSession``.
"""
from __future__ import annotations

import importlib.util
import os
import textwrap

import numpy as np
import pytest

from tests.helpers import register_kernel_calls, run_export_script
from workbench import rpc, runtime
from workbench.errors import RemoteError, UnsupportedError
from workbench.runtime import tvm_bridge


if importlib.util.find_spec("tvm") is None:
    pytest.skip(
        "apache-tvm is not installed (it is the `tvm` test extra: pip install -e .[test,tvm]); "
        "these tests export kernels with it",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(300)

EXPORT_TIMEOUT_S = 240
N = 64
EXTS = pytest.mark.parametrize("ext", ["so", "tar"])

EXPORT_SCRIPT = textwrap.dedent(
    f"""
    import json, os, sys
    import tvm
    from tvm.script import tirx as T

    N = {N}

    @T.prim_func
    def fill_add(A: T.Buffer((N,), "float32"), B: T.Buffer((N,), "float32"), x: T.float64, k: T.int64):
        T.func_attr({{"global_symbol": "fill_add"}})
        T.evaluate(T.call_packed("tests.kernel_fill", A, x, k))
        for i in range(N):
            B[i] = A[i] * T.float32(2)

    @T.prim_func
    def boom(A: T.Buffer((N,), "float32")):
        T.func_attr({{"global_symbol": "boom"}})
        T.evaluate(T.call_packed("tests.kernel_boom", A))

    @T.prim_func
    def nobody(A: T.Buffer((N,), "float32")):
        T.func_attr({{"global_symbol": "nobody"}})
        T.evaluate(T.call_packed("tests.nobody_registered_this", A))

    out = {{}}
    for name, f in (("fill_add", fill_add), ("boom", boom), ("nobody", nobody)):
        exe = tvm.compile(tvm.IRModule({{name: f}}), target="llvm")
        out[name] = {{}}
        for ext in ("so", "tar"):
            path = os.path.abspath(os.path.join(sys.argv[1], name + "." + ext))
            exe.export_library(path)
            out[name][ext] = path
    print(json.dumps({{"tvm_version": tvm.__version__, "kernels": out}}))
    """
)


@pytest.fixture(scope="session")
def call_kernels(tmp_path_factory) -> dict[str, dict[str, str]]:
    """``{kernel: {"so": path, "tar": path}}`` exported by apache-tvm 0.27 in a subprocess."""
    out = tmp_path_factory.mktemp("tvm_call_kernels")
    return run_export_script(EXPORT_SCRIPT, out, "the TVM kernels", EXPORT_TIMEOUT_S)["kernels"]


def _tvm_free_server(**kwargs) -> rpc.Server:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_NO_TVM", "1")  # a TVM-free device: what our runtime cannot run is refused
        return rpc.Server(port=0, silent=True, **kwargs)


@pytest.fixture(scope="module")
def server(private_tmpdir):
    """A TVM-free server whose server_init_callback registers the functions the kernels call."""
    srv = _tvm_free_server(server_init_callback="tests.helpers:register_kernel_calls")
    yield srv
    srv.terminate()
    assert not srv.alive


@pytest.fixture(scope="module")
def bare_server(private_tmpdir):
    """A TVM-free server with nothing registered."""
    srv = _tvm_free_server()
    yield srv
    srv.terminate()
    assert not srv.alive


@pytest.fixture(params=["server", "local"])
def sess(request, monkeypatch):
    """A session on the registering server, or LocalSession (this process, TVM-free, functions registered)."""
    if request.param == "server":
        yield request.getfixturevalue("remote")
        return
    monkeypatch.setenv("WORKBENCH_NO_TVM", "1")
    register_kernel_calls()
    local = rpc.LocalSession()
    yield local
    local.close()


def load(sess, files: dict[str, str], ext: str):
    sess.upload(files[ext])
    return sess.load_module(os.path.basename(files[ext]))


def expected_fill(value: float, step: int) -> np.ndarray:
    return (value + step * np.arange(N, dtype="float32")).astype("float32")


@EXTS
def test_kernel_calls_a_registered_function(sess, call_kernels, ext):
    mod = load(sess, call_kernels["fill_add"], ext)
    dev = sess.cpu(0)
    a, b = runtime.empty(N, "float32", dev), runtime.empty(N, "float32", dev)
    mod["fill_add"](a, b, 1.5, 3)  # the Python function fills A (tensor, float, int), the kernel doubles it
    want = expected_fill(1.5, 3)
    np.testing.assert_array_equal(a.numpy(), want)
    np.testing.assert_array_equal(b.numpy(), want * np.float32(2))
    mod["fill_add"](a, b, -2.0, 1)  # the handle the kernel cached calls the function again
    np.testing.assert_array_equal(b.numpy(), expected_fill(-2.0, 1) * np.float32(2))
    result = mod.time_evaluator("fill_add", dev, number=3, repeat=2)(a, b, 0.5, 2)
    assert len(result.results) == 2 and result.min > 0
    np.testing.assert_array_equal(b.numpy(), expected_fill(0.5, 2) * np.float32(2))


@EXTS
def test_registered_function_errors_fail_the_call(sess, call_kernels, ext):
    mod = load(sess, call_kernels["boom"], ext)
    a = runtime.empty(N, "float32", sess.cpu(0))
    for _ in range(2):  # and again: the error left nothing behind
        with pytest.raises(RemoteError) as info:
            mod["boom"](a)
        assert "kernel_boom got a float32 tensor of shape (64,)" in str(info.value), str(info.value)
    fill = load(sess, call_kernels["fill_add"], ext)  # the session goes on
    b = runtime.empty(N, "float32", sess.cpu(0))
    fill["fill_add"](a, b, 1.0, 0)
    np.testing.assert_array_equal(b.numpy(), np.full(N, 2, "float32"))


@EXTS
def test_unregistered_function_is_refused_at_load(sess, call_kernels, ext):
    with pytest.raises(UnsupportedError) as info:
        load(sess, call_kernels["nobody"], ext)
    text = str(info.value)
    assert "'tests.nobody_registered_this'" in text, text
    assert "pip install apache-tvm" in text and "register_func" in text, text
    assert "tests.kernel_fill" not in text


@EXTS
def test_a_server_without_the_registration_refuses_the_kernel(bare_server, call_kernels, ext, private_tmpdir):
    sess = rpc.connect("127.0.0.1", bare_server.port)
    try:
        for _ in range(2):
            with pytest.raises(UnsupportedError) as info:
                load(sess, call_kernels["fill_add"], ext)
            text = str(info.value)
            assert "needs TVM runtime function 'tests.kernel_fill'" in text, text
            assert "pip install apache-tvm" in text, text
    finally:
        sess.close()


def test_requirement_read_from_the_file(call_kernels):
    register_kernel_calls()
    for ext_files in (call_kernels["fill_add"], call_kernels["boom"]):
        path = ext_files["so"]
        assert tvm_bridge.tvm_requirement(path) is None, path  # every function it calls is registered
    assert tvm_bridge.runtime_functions(call_kernels["fill_add"]["so"]) == ["tests.kernel_fill"]
    need = tvm_bridge.tvm_requirement(call_kernels["nobody"]["so"])
    assert need is not None and need.functions == ("tests.nobody_registered_this",)
