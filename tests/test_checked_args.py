"""Checked kernel arguments (issue 15, point 2): a wrong argument is a TypeError on the client, never a crash.

Real kernels compiled against workbench_kernel.h (and by apache-tvm), run by the Python server, by minrpc
and in a LocalSession; the notebook case through a real IPython shell on a real farm.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from workbench import cc, rpc, runtime
from workbench.errors import ArgumentTypeError, BadRequestError, RemoteError
from workbench.testing import local_run

from .conftest import ROOT
from .helpers import emulated_board_missing, start_server

CHECKED = r"""#include <workbench_kernel.h>

/* out = a + b, three 1-d float32 tensors */
WB_KERNEL(vadd) {
  WB_EXPECT_ARGS(3);
  DLTensor* a = WB_ARG_TENSOR_OF(0, float32, 1);
  DLTensor* b = WB_ARG_TENSOR_OF(1, float32, 1);
  DLTensor* out = WB_ARG_TENSOR_OF(2, float32, 1);
  for (int64_t i = 0; i < a->shape[0]; ++i) ((float*)out->data)[i] = ((float*)a->data)[i] + ((float*)b->data)[i];
  return 0;
}

/* the ndim of any tensor */
WB_KERNEL(ndim_of) { WB_RETURN_INT(WB_ARG_TENSOR(0)->ndim); }

/* the sum of a 2-d int32 tensor of any dtype-checked shape */
WB_KERNEL(sum2d) {
  DLTensor* t = WB_ARG_TENSOR_OF(0, int32, 2);
  int64_t s = 0;
  for (int64_t i = 0; i < t->shape[0] * t->shape[1]; ++i) s += ((int32_t*)t->data)[i];
  WB_RETURN_INT(s);
}

/* s * k as a float: a float and an int */
WB_KERNEL(scale) { WB_RETURN_FLOAT(WB_ARG_FLOAT(0) * (double)WB_ARG_INT(1)); }

/* reads argument 2 without WB_EXPECT_ARGS: a missing argument is an error, not a read past the array */
WB_KERNEL(third) { WB_RETURN_INT(WB_ARG_TENSOR(2)->ndim); }
"""
N = 4
X = np.arange(N, dtype="float32")
Y = np.full(N, 10, dtype="float32")


@pytest.fixture(scope="module")
def checked_so(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("checked")
    (out / "checked.c").write_text(CHECKED)
    return cc.create_shared(str(out / "checked.so"), [str(out / "checked.c")])


@pytest.fixture(scope="module", params=["python", "minrpc", "local"])
def where(request, private_tmpdir):
    """A server of each kind (None for LocalSession), shared by the tests of this module."""
    srv = None if request.param == "local" else start_server(request.param)
    yield request.param, srv
    if srv is not None:
        srv.terminate()


@pytest.fixture
def session(where):
    kind, srv = where
    sess = rpc.LocalSession() if srv is None else rpc.connect("127.0.0.1", srv.port)
    yield sess
    sess.close()


@pytest.fixture
def mod(session, checked_so):
    session.upload(checked_so)
    return session.load_module("checked.so")


def tensors(session):
    dev = session.cpu()
    return dev, runtime.tensor(X, dev), runtime.tensor(Y, dev), runtime.empty((N,), "float32", dev)


def check_runs(mod, a, b, out) -> None:
    mod["vadd"](a, b, out)
    np.testing.assert_array_equal(out.numpy(), X + Y)


def test_a_float_for_a_tensor_is_a_type_error_and_the_session_goes_on(session, mod):
    dev, a, b, out = tensors(session)
    with pytest.raises(TypeError) as info:
        mod["vadd"](1.5, b, out)
    assert isinstance(info.value, RemoteError)
    assert "argument 0 of vadd: expected a 1-d float32 tensor, got a float (1.5)" in str(info.value)
    with pytest.raises(TypeError, match=r"argument 2 of vadd: expected a 1-d float32 tensor, got None"):
        mod["vadd"](a, b, None)
    check_runs(mod, a, b, out)  # the same session, the same tensors


def test_a_tensor_of_another_dtype_names_both_dtypes(session, mod):
    dev, a, b, out = tensors(session)
    ints = runtime.tensor(X.astype("int32"), dev)
    with pytest.raises(TypeError, match=r"argument 1 of vadd: expected a 1-d float32 tensor, "
                                        r"got an int32 tensor of shape \(4,\)") as info:
        mod["vadd"](a, ints, out)
    assert 'x.astype("float32")' in str(info.value)  # how to fix it
    doubles = runtime.tensor(np.zeros(N), dev)
    with pytest.raises(TypeError, match="got a float64 tensor"):
        mod["vadd"](a, b, doubles)
    np.testing.assert_array_equal(doubles.numpy(), np.zeros(N))  # never written
    with pytest.raises(TypeError, match=r"argument 0 of sum2d: expected a 2-d int32 tensor, got a float32 tensor"):
        mod["sum2d"](a)
    assert mod["sum2d"](runtime.tensor(np.arange(6, dtype="int32").reshape(2, 3), dev)) == 15
    check_runs(mod, a, b, out)


def test_wrong_ndim_and_count(session, mod):
    dev, a, b, out = tensors(session)
    square = runtime.tensor(np.ones((2, 2), "float32"), dev)
    with pytest.raises(TypeError, match=r"argument 0 of vadd: expected a 1-d float32 tensor, "
                                        r"got a float32 tensor of shape \(2, 2\)"):
        mod["vadd"](square, b, out)
    with pytest.raises(TypeError, match="expected 3 arguments, got 2"):
        mod["vadd"](a, b)
    with pytest.raises(TypeError, match=r"argument 2 of third: expected a tensor, got nothing \(the call passed 1"):
        mod["third"](a)
    assert mod["ndim_of"](square) == 2 and mod["ndim_of"](a) == 1
    with pytest.raises(TypeError, match=r"argument 0 of ndim_of: expected a tensor, got a str \(\"x\"\)"):
        mod["ndim_of"]("x")
    check_runs(mod, a, b, out)


def test_scalar_arguments_are_checked(session, mod):
    dev, a, b, out = tensors(session)
    assert mod["scale"](1.5, 4) == 6.0
    assert mod["scale"](3, 2) == 6.0  # an int for a float: converted exactly
    with pytest.raises(TypeError, match=r"argument 1 of scale: expected an int, got a float \(2.5\)"):
        mod["scale"](1.0, 2.5)
    with pytest.raises(TypeError, match=r"argument 0 of scale: expected a float, got a float32 tensor"):
        mod["scale"](a, 2)
    with pytest.raises(TypeError, match="too large for a double exactly"):
        mod["scale"]((1 << 53) + 1, 1)


def test_time_evaluator_checks_too(session, mod):
    dev, a, b, out = tensors(session)
    with pytest.raises(TypeError, match="argument 0 of vadd: expected a 1-d float32 tensor, got a float"):
        mod.time_evaluator("vadd", dev, number=2, repeat=1)(1.5, b, out)
    assert len(mod.time_evaluator("vadd", dev, number=2, repeat=2)(a, b, out).results) == 2
    check_runs(mod, a, b, out)


def test_host_arrays_and_lists_are_refused_before_sending(session, mod):
    dev, a, b, out = tensors(session)
    timer = mod.time_evaluator("vadd", dev, number=1)
    objects = session.ping()["objects"]
    with pytest.raises(ArgumentTypeError) as info:
        mod["vadd"](X, b, out)
    assert isinstance(info.value, TypeError) and isinstance(info.value, BadRequestError)
    assert "argument 0 is a numpy.ndarray of shape (4,) and dtype float32" in str(info.value)
    assert "runtime.tensor(x, dev)" in str(info.value)
    with pytest.raises(TypeError, match=r"runtime\.tensor\(x, dev\)"):
        timer(a, Y, out)
    with pytest.raises(TypeError, match=r"argument 1: a kernel cannot take a list.*runtime\.tensor"):
        mod["vadd"](a, [1.0, 2.0], out)
    assert session.ping()["objects"] == objects  # nothing was sent
    assert mod["scale"](np.float64(1.5), np.int64(2)) == 3.0  # numpy scalars are numbers
    check_runs(mod, a, b, out)


def test_local_run_reports_a_wrong_argument():
    module = cc.build(CHECKED.split("/* the ndim")[0])  # vadd alone: the module's entry function
    with pytest.raises(TypeError, match="argument 0 of vadd: expected a 1-d float32 tensor, got a float"):
        local_run(module, "cpu", [1.5, Y, np.zeros(N, "float32")])
    (x, y, out), result = local_run(module, "cpu", [X, Y, np.zeros(N, "float32")])
    np.testing.assert_array_equal(out, X + Y)


def test_emulated_aarch64_minrpc_checks_arguments(private_tmpdir, tmp_path):
    missing = emulated_board_missing()
    if missing:
        pytest.skip(missing)
    module = cc.build(CHECKED, target="aarch64-linux-gnu")
    module.export_library(str(tmp_path / "checked_arm.so"))
    with rpc.MinRPCServer(target="aarch64") as board:
        remote = rpc.connect("127.0.0.1", board.port)
        try:
            assert remote.info["arch"] == "aarch64"
            remote.upload(str(tmp_path / "checked_arm.so"))
            mod = remote.load_module("checked_arm.so")
            dev, a, b, out = tensors(remote)
            with pytest.raises(TypeError, match=r"argument 0 of vadd: expected a 1-d float32 tensor, got a float \(1\.5\)"):
                mod["vadd"](1.5, b, out)
            with pytest.raises(TypeError, match="got an int32 tensor"):
                mod["vadd"](a, runtime.tensor(X.astype("int32"), dev), out)
            check_runs(mod, a, b, out)
        finally:
            remote.close()


# -- TVM-built kernels check their own arguments --------------------------------------
@pytest.fixture(scope="module")
def tvm_add_one(tmp_path_factory) -> str:
    pytest.importorskip("tvm")
    out = tmp_path_factory.mktemp("tvm_checked")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "tvm_export_kernels.py"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return {k["name"]: k["files"]["so"] for k in report["kernels"]}["add_one"]


def test_tvm_kernels_refuse_wrong_arguments_cleanly(session, tvm_add_one):
    session.upload(tvm_add_one)
    add_one = session.load_module("add_one.so")["add_one"]
    dev = session.cpu()
    x = np.arange(1024, dtype="float32")
    a, b = runtime.tensor(x, dev), runtime.empty((1024,), "float32", dev)
    wrong = {
        "a float": (1.5, TypeError, "Mismatched type on argument #0"),
        "None": (None, TypeError, "Mismatched type on argument #0"),
        "an int32 tensor": (runtime.tensor(x.astype("int32"), dev), TypeError, "Mismatched A.dtype"),
        "a 2-d tensor": (runtime.tensor(x.reshape(32, 32), dev), RemoteError, "Mismatched A.ndim"),
        "a shorter tensor": (runtime.tensor(x[:512], dev), RemoteError, "Invalid A.shape[0]"),
    }
    for what, (value, error, text) in wrong.items():
        with pytest.raises(error) as info:
            add_one(value, b)
        assert text in str(info.value), (what, str(info.value))
        add_one(a, b)  # the session goes on after each
        np.testing.assert_array_equal(b.numpy(), x + 1)
    with pytest.raises(TypeError, match="runtime.tensor"):
        add_one(x, b)


# -- the issue's notebook case: notebook 01's own kernel in a real IPython shell on a real farm -------
def notebook_01_kernel() -> str:
    with open(os.path.join(ROOT, "notebooks", "01-quickstart.ipynb")) as f:
        cells = json.load(f)["cells"]
    source = next("".join(c["source"]) for c in cells
                  if c["cell_type"] == "code" and "".join(c["source"]).startswith("%%rpc_compile add_one"))
    assert "WB_ARG_TENSOR_OF(0, float32, 1)" in source
    first, body = source.split("\n", 1)
    return first[len("%%rpc_compile "):], body


def test_notebook_01_kernel_takes_a_float_then_runs(private_tmpdir, capsys):
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "workbench")
    try:
        shell.run_line_magic("rpc_farm", "--servers local=1")
        shell.run_line_magic("rpc_connect", "--key local --timeout 60")
        line, body = notebook_01_kernel()
        shell.run_cell_magic("rpc_compile", line, body)
        setup = shell.run_cell(
            "import numpy as np\nfrom workbench import runtime\n"
            "dev = remote.cpu(0)\nx = np.arange(1024, dtype='float32')\n"
            "a = runtime.tensor(x, dev)\nb = runtime.empty((1024,), 'float32', dev)\n")
        assert setup.success, setup.error_in_exec
        capsys.readouterr()
        bad = shell.run_cell("add_one['add_one'](1.5, b)")
        assert isinstance(bad.error_in_exec, TypeError)
        assert "argument 0 of add_one: expected a 1-d float32 tensor, got a float (1.5)" in str(bad.error_in_exec)
        ints = shell.run_cell("add_one['add_one'](runtime.tensor(x.astype('int32'), dev), b)")
        assert isinstance(ints.error_in_exec, TypeError) and "got an int32 tensor" in str(ints.error_in_exec)
        host = shell.run_cell("add_one['add_one'](x, b)")
        assert isinstance(host.error_in_exec, TypeError) and "runtime.tensor(x, dev)" in str(host.error_in_exec)
        good = shell.run_cell("add_one['add_one'](a, b)\nnp.testing.assert_allclose(b.numpy(), x + 1)")
        assert good.success, good.error_in_exec
    finally:
        for value in list(shell.user_ns.values()):
            if isinstance(value, rpc.RPCSession):
                value.close()
        shell.run_line_magic("rpc_farm", "--stop")
        shell.run_line_magic("unload_ext", "workbench")
