"""Modules only TVM's runtime can run: through apache-tvm on the device where it is there, refused clearly where not.

apache-tvm 0.27 exports (in a subprocess, once per test session) a tiny Relax MLP
(``relax.build(...).export_library``: two dense layers and a relu), the same MLP
with a symbolic batch returning ``(y, h)``, ``topi.argsort`` (its kernel calls the
runtime function ``tvm.contrib.sort.argsort``) and a plain vector add, each as
``.so`` and ``.tar``. On a real ``rpc.Server`` whose workers may
import TVM they run end to end against numpy; on a server started with
``WORKBENCH_NO_TVM=1`` (TVM installed, but kept out) ``load_module`` refuses them,
saying what they are and that the server needs apache-tvm, and never imports TVM.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from workbench import rpc, runtime
from workbench.errors import BadRequestError, RemoteError, RemoteNotFoundError, UnsupportedError
from workbench.runtime import tvm_bridge

from .helpers import PRINT_MAIN_REPORT, run_export_script

if importlib.util.find_spec("tvm") is None:
    pytest.skip(
        "apache-tvm is not installed (it is the `tvm` test extra: pip install -e .[test,tvm]); "
        "these tests export modules with it and run them through it",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(420)  # the first test pays for the export

EXPORT_TIMEOUT_S = 300
BATCH, IN, HIDDEN, OUT = 4, 8, 16, 3
SORT_N = 64
VN = 1024

EXPORT_SCRIPT = textwrap.dedent(
    f"""
    import os, sys
    import tvm
    from tvm import relax, te, topi
    from tvm.script import relax as R

    def export(name, built):
        files = {{}}
        for ext in ("so", "tar"):
            files[ext] = os.path.abspath(os.path.join(sys.argv[1], name + "." + ext))
            built.export_library(files[ext])
        return files

    def main():
        bb = relax.BlockBuilder()
        x = relax.Var("x", R.Tensor(({BATCH}, {IN}), "float32"))
        w1 = relax.Var("w1", R.Tensor(({IN}, {HIDDEN}), "float32"))
        w2 = relax.Var("w2", R.Tensor(({HIDDEN}, {OUT}), "float32"))
        with bb.function("main", [x, w1, w2]):
            with bb.dataflow():
                h = bb.emit(relax.op.nn.relu(relax.op.matmul(x, w1)))
                y = bb.emit_output(relax.op.matmul(h, w2))
            bb.emit_func_output(y)
        out = {{"mlp": export("mlp", relax.build(bb.get(), target="llvm"))}}

        n = tvm.tirx.Var("n", "int64")  # a symbolic batch; both layers' outputs returned as a tuple
        bb = relax.BlockBuilder()
        x = relax.Var("x", R.Tensor((n, {IN}), "float32"))
        w1 = relax.Var("w1", R.Tensor(({IN}, {HIDDEN}), "float32"))
        w2 = relax.Var("w2", R.Tensor(({HIDDEN}, {OUT}), "float32"))
        with bb.function("main", [x, w1, w2]):
            with bb.dataflow():
                h = bb.emit(relax.op.nn.relu(relax.op.matmul(x, w1)))
                y = bb.emit(relax.op.matmul(h, w2))
                pair = bb.emit_output(relax.Tuple([y, h]))
            bb.emit_func_output(pair)
        xs = relax.Var("x", R.Tensor((n, {IN}), "float32"))
        with bb.function("seven", [xs]):  # a plain result: nothing to pass for it
            bb.emit_func_output(relax.prim_value(7))
        out["mlp_pair"] = export("mlp_pair", relax.build(bb.get(), target="llvm"))

        s = te.placeholder(({SORT_N},), name="S")
        o = topi.argsort(s, axis=0, is_ascend=True, dtype="int32")
        prim = te.create_prim_func([s, o]).with_attr("global_symbol", "argsort")
        out["argsort"] = export("argsort", tvm.compile(tvm.IRModule.from_expr(prim), target="llvm"))

        a = te.placeholder(({VN},), name="A")
        b = te.compute(({VN},), lambda i: a[i] * 2.0, name="B")
        prim = te.create_prim_func([a, b]).with_attr("global_symbol", "double")
        out["double"] = export("double", tvm.compile(tvm.IRModule.from_expr(prim), target="llvm"))
        return {{"tvm_version": tvm.__version__, "modules": out}}

    """
) + PRINT_MAIN_REPORT

RNG = np.random.default_rng(85)
EXTS = pytest.mark.parametrize("ext", ["so", "tar"])


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict[str, dict[str, str]]:
    """``{"mlp"|"mlp_pair"|"argsort"|"double": {"so": path, "tar": path}}`` exported by apache-tvm 0.27 in a
    subprocess."""
    out = tmp_path_factory.mktemp("tvm_fallback_modules")
    return run_export_script(EXPORT_SCRIPT, out, "the TVM modules", EXPORT_TIMEOUT_S)["modules"]


@pytest.fixture(scope="module")
def server(private_tmpdir):
    """A server whose session workers may import apache-tvm (overrides conftest's: ``remote`` connects here)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(tvm_bridge.NO_TVM_ENV, raising=False)
        srv = rpc.Server(port=0, silent=True)
    yield srv
    srv.terminate()
    assert not srv.alive


@pytest.fixture(scope="module")
def no_tvm_server(private_tmpdir):
    """A server started with WORKBENCH_NO_TVM=1: TVM is installed here, but its workers keep it out."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(tvm_bridge.NO_TVM_ENV, "1")
        srv = rpc.Server(port=0, silent=True)
    yield srv
    srv.terminate()
    assert not srv.alive


@pytest.fixture
def no_tvm_remote(no_tvm_server):
    sess = rpc.connect("127.0.0.1", no_tvm_server.port)
    yield sess
    sess.close()


def load(sess, files: dict[str, str], ext: str):
    sess.upload(files[ext])
    return sess.load_module(os.path.basename(files[ext]))


def mlp_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = RNG.uniform(-1, 1, (BATCH, IN)).astype("float32")
    w1 = RNG.uniform(-1, 1, (IN, HIDDEN)).astype("float32")
    w2 = RNG.uniform(-1, 1, (HIDDEN, OUT)).astype("float32")
    return x, w1, w2


def mlp_reference(x, w1, w2) -> np.ndarray:
    return np.maximum(x @ w1, 0) @ w2


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib << 10


def tvm_mapped(pid: int) -> list[str]:
    """TVM libraries (libtvm*.so) mapped into process ``pid``."""
    with open(f"/proc/{pid}/maps") as f:
        return sorted({line.split()[-1] for line in f if re.search(r"/libtvm[^/]*\.so", line)})


# -- what needs TVM, from the file alone ------------------------------------------------------
def test_requirements_are_read_from_the_files(exported):
    for ext in ("so",):
        mlp = exported["mlp"][ext]
        assert tvm_bridge.library_modules(mlp) == ["relax.VMExecutable"]
        assert "Relax VM executable" in tvm_bridge.tvm_requirement(mlp).describe()
        argsort = tvm_bridge.tvm_requirement(exported["argsort"][ext])
        assert argsort.functions == ("tvm.contrib.sort.argsort",)
        assert tvm_bridge.tvm_requirement(exported["double"][ext]) is None
        assert tvm_bridge.library_modules(exported["double"][ext]) == []


# -- with TVM on the device -----------------------------------------------------------------------
@EXTS
def test_relax_mlp_end_to_end(remote, exported, ext):
    mod = load(remote, exported["mlp"], ext)
    assert mod.function_names == ["main"] and mod.entry_name == "main"
    dev = remote.cpu(0)
    x, w1, w2 = mlp_inputs()
    args = [runtime.tensor(a, dev) for a in (x, w1, w2)]
    out = runtime.empty((BATCH, OUT), "float32", dev)
    assert mod["main"](*args, out) is None
    np.testing.assert_allclose(out.numpy(), mlp_reference(x, w1, w2), rtol=1e-5, atol=1e-5)

    # the same function through get_function, with new inputs in the same tensors
    x2 = RNG.uniform(-1, 1, (BATCH, IN)).astype("float32")
    args[0].copyfrom(x2)
    mod.get_function("main")(*args, out)
    np.testing.assert_allclose(out.numpy(), mlp_reference(x2, w1, w2), rtol=1e-5, atol=1e-5)

    result = mod.time_evaluator("main", dev, number=3, repeat=2)(*args, out)
    assert len(result.results) == 2 and all(t > 0 for t in result.results)
    np.testing.assert_allclose(out.numpy(), mlp_reference(x2, w1, w2), rtol=1e-5, atol=1e-5)


def test_relax_output_must_be_passed(remote, exported):
    mod = load(remote, exported["mlp"], "so")
    dev = remote.cpu(0)
    args = [runtime.tensor(a, dev) for a in mlp_inputs()]
    with pytest.raises(BadRequestError) as info:
        mod["main"](*args)
    assert f"float32[{BATCH}, {OUT}]" in str(info.value) and "pass a tensor for each" in str(info.value)
    with pytest.raises(BadRequestError, match="output 0 is float32"):
        mod["main"](*args, runtime.empty((OUT, BATCH), "float32", dev))
    with pytest.raises(BadRequestError, match="takes 3 inputs"):
        mod["main"](args[0])
    with pytest.raises(RemoteNotFoundError, match="no function named 'relu'"):
        mod.get_function("relu")  # a TIR kernel of the model, not a function of the executable
    out = runtime.empty((BATCH, OUT), "float32", dev)
    mod["main"](*args, out)  # the session goes on
    assert np.isfinite(out.numpy()).all()


# A function's first call with a set of tensors makes a plan (TVM views, result shapes); later calls
# with the same tensors reuse it. These hold the plan to what a call without one does.
def test_relax_reads_tensors_rewritten_between_calls(remote, exported):
    mod = load(remote, exported["mlp"], "so")
    dev = remote.cpu(0)
    x, w1, w2 = mlp_inputs()
    args = [runtime.tensor(a, dev) for a in (x, w1, w2)]
    out = runtime.empty((BATCH, OUT), "float32", dev)
    f = mod["main"]
    for _ in range(3):  # the first call plans, the next ones run the plan: each reads what the tensors hold now
        f(*args, out)
        np.testing.assert_allclose(out.numpy(), mlp_reference(x, w1, w2), rtol=1e-5, atol=1e-5)
        x, w1, w2 = mlp_inputs()
        for t, a in zip(args, (x, w1, w2)):
            t.copyfrom(a)
    out.copyfrom(np.zeros((BATCH, OUT), "float32"))  # the result is written again, not left from before
    f(*args, out)
    np.testing.assert_allclose(out.numpy(), mlp_reference(x, w1, w2), rtol=1e-5, atol=1e-5)
    x2 = RNG.uniform(-1, 1, (BATCH, IN)).astype("float32")
    args[0].copyfrom(x2)
    mod.time_evaluator("main", dev, number=5, repeat=2)(*args, out)  # the timing loop runs the plan too
    np.testing.assert_allclose(out.numpy(), mlp_reference(x2, w1, w2), rtol=1e-5, atol=1e-5)


def test_relax_fresh_tensors_every_call(remote, exported):
    """Tensors freed and allocated again (the server reuses their ids) never meet the plan of the old ones."""
    mod = load(remote, exported["mlp"], "so")
    dev = remote.cpu(0)
    _, w1, w2 = mlp_inputs()
    weights = [runtime.tensor(w1, dev), runtime.tensor(w2, dev)]
    for i in range(24):
        x = RNG.uniform(-1, 1, (BATCH, IN)).astype("float32")
        xt, out = runtime.tensor(x, dev), runtime.empty((BATCH, OUT), "float32", dev)
        mod["main"](xt, *weights, out)
        mod["main"](xt, *weights, out)
        np.testing.assert_allclose(out.numpy(), mlp_reference(x, w1, w2), rtol=1e-5, atol=1e-5, err_msg=f"call {i}")
        del xt, out  # freed with the next request


def test_relax_output_checked_for_every_set_of_tensors(remote, exported):
    mod = load(remote, exported["mlp"], "so")
    dev = remote.cpu(0)
    x, w1, w2 = mlp_inputs()
    args = [runtime.tensor(a, dev) for a in (x, w1, w2)]
    out = runtime.empty((BATCH, OUT), "float32", dev)
    mod["main"](*args, out)
    mod["main"](*args, out)  # planned
    with pytest.raises(BadRequestError, match=rf"output 0 is float32\[{BATCH}, {OUT}\], the tensor passed for it "
                                              rf"is float32\[{OUT}, {BATCH}\]"):
        mod["main"](*args, runtime.empty((OUT, BATCH), "float32", dev))  # same bytes, another shape
    with pytest.raises(BadRequestError, match=r"passed for it is int32"):
        mod["main"](*args, runtime.empty((BATCH, OUT), "int32", dev))  # same bytes, another dtype
    with pytest.raises(BadRequestError, match="output 0 is float32"):
        mod.time_evaluator("main", dev, number=2)(*args, runtime.empty((BATCH * OUT,), "float32", dev))
    with pytest.raises(BadRequestError, match="pass a tensor for each"):
        mod["main"](*args, out, runtime.empty((BATCH, OUT), "float32", dev))
    mod["main"](*args, out)  # the plan of the right tensors still runs
    np.testing.assert_allclose(out.numpy(), mlp_reference(x, w1, w2), rtol=1e-5, atol=1e-5)


def test_relax_tuple_result_and_symbolic_batch(remote, exported):
    mod = load(remote, exported["mlp_pair"], "so")
    dev = remote.cpu(0)
    w1, w2 = RNG.uniform(-1, 1, (IN, HIDDEN)).astype("float32"), RNG.uniform(-1, 1, (HIDDEN, OUT)).astype("float32")
    weights = [runtime.tensor(w1, dev), runtime.tensor(w2, dev)]
    for n in (1, 5, 5, 33):
        x = RNG.uniform(-1, 1, (n, IN)).astype("float32")
        xt = runtime.tensor(x, dev)
        y, h = runtime.empty((n, OUT), "float32", dev), runtime.empty((n, HIDDEN), "float32", dev)
        for _ in range(2):
            mod["main"](xt, *weights, y, h)
            hidden = np.maximum(x @ w1, 0)
            np.testing.assert_allclose(h.numpy(), hidden, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(y.numpy(), hidden @ w2, rtol=1e-5, atol=1e-5)
            x = RNG.uniform(-1, 1, (n, IN)).astype("float32")
            xt.copyfrom(x)
        with pytest.raises(BadRequestError, match=rf"output 0 is float32\[{n}, {OUT}\]"):
            mod["main"](xt, *weights, h, y)  # the outputs swapped
    mod.time_evaluator("main", dev, number=3, repeat=2)(xt, *weights, y, h)
    np.testing.assert_allclose(y.numpy(), np.maximum(x @ w1, 0) @ w2, rtol=1e-5, atol=1e-5)
    assert [mod["seven"](xt) for _ in range(3)] == [7, 7, 7]
    assert len(mod.time_evaluator("seven", dev, number=3, repeat=2)(xt).results) == 2


def test_relax_fresh_tensors_do_not_grow_the_worker(server, exported):
    """Plans and TVM views go with their tensors: 48 calls on fresh 7 MiB of tensors leave the worker's memory flat."""
    sess = rpc.connect("127.0.0.1", server.port)
    try:
        mod = load(sess, exported["mlp_pair"], "so")
        dev = sess.cpu(0)
        worker = sess.info["pid"]
        weights = [runtime.tensor(a, dev) for a in mlp_inputs()[1:]]
        n = 1 << 16  # x 2 MiB, h 4 MiB, y 0.75 MiB

        def fresh_call() -> None:
            x = runtime.tensor(np.ones((n, IN), "float32"), dev)
            y, h = runtime.empty((n, OUT), "float32", dev), runtime.empty((n, HIDDEN), "float32", dev)
            mod["main"](x, *weights, y, h)
            mod["main"](x, *weights, y, h)

        for _ in range(8):
            fresh_call()
        assert sess.ping()["tensors"] == 2  # the FREEs of the last call's tensors go with this request
        before = rss_bytes(worker)
        for _ in range(48):
            fresh_call()
        assert sess.ping()["tensors"] == 2
        grown = rss_bytes(worker) - before
        assert grown < 64 << 20, f"the worker grew by {grown >> 20} MiB over 48 calls (~330 MiB if nothing was freed)"
    finally:
        sess.close()


@EXTS
def test_argsort_through_tvm(remote, exported, ext):
    mod = load(remote, exported["argsort"], ext)
    assert "argsort" in mod.function_names
    dev = remote.cpu(0)
    s = RNG.permutation(SORT_N).astype("float32")  # distinct values: one right answer
    o = runtime.empty((SORT_N,), "int32", dev)
    mod["argsort"](runtime.tensor(s, dev), o)  # TVM's kernel writes into our tensor's memory
    np.testing.assert_array_equal(o.numpy(), np.argsort(s))
    with pytest.raises(RemoteError, match="Expected 2 arguments"):
        mod["argsort"](runtime.tensor(s, dev))
    result = mod.time_evaluator("argsort", dev, number=2, repeat=2)(runtime.tensor(s[::-1].copy(), dev), o)
    assert len(result.results) == 2
    np.testing.assert_array_equal(o.numpy(), np.argsort(s[::-1]))


def test_worker_imports_tvm_only_for_a_module_that_needs_it(server, exported):
    sess = rpc.connect("127.0.0.1", server.port)
    try:
        worker = sess.info["pid"]
        dev = sess.cpu(0)
        double = load(sess, exported["double"], "so")
        a = RNG.uniform(-1, 1, VN).astype("float32")
        b = runtime.empty((VN,), "float32", dev)
        double(runtime.tensor(a, dev), b)
        np.testing.assert_array_equal(b.numpy(), a * 2)
        assert tvm_mapped(worker) == [], "a plain kernel made the worker load TVM"
        load(sess, exported["mlp"], "so")
        assert tvm_mapped(worker), "the Relax module was not loaded through TVM's runtime"
        double(runtime.tensor(a, dev), b)  # our own kernels still run next to TVM
        np.testing.assert_array_equal(b.numpy(), a * 2)
    finally:
        sess.close()
    assert tvm_mapped(server.pid) == [], "the server process itself loaded TVM"


# -- without TVM on the device ------------------------------------------------------------------
@EXTS
def test_relax_module_refused_without_tvm(no_tvm_remote, exported, ext):
    with pytest.raises(UnsupportedError) as info:
        load(no_tvm_remote, exported["mlp"], ext)
    text = str(info.value)
    assert f"cannot load mlp.{ext}" in text and "Relax VM executable" in text, text
    assert "needs apache-tvm" in text and "pip install apache-tvm" in text, text
    assert "WORKBENCH_NO_TVM" in text, text


@EXTS
def test_runtime_function_module_refused_without_tvm(no_tvm_remote, exported, ext):
    with pytest.raises(UnsupportedError) as info:
        load(no_tvm_remote, exported["argsort"], ext)
    text = str(info.value)
    assert "TVM runtime function 'tvm.contrib.sort.argsort'" in text, text
    assert "pip install apache-tvm" in text, text
    # the session goes on, and TVM-free kernels run in it without TVM
    dev = no_tvm_remote.cpu(0)
    double = load(no_tvm_remote, exported["double"], ext)
    a = RNG.uniform(-1, 1, VN).astype("float32")
    b = runtime.empty((VN,), "float32", dev)
    double(runtime.tensor(a, dev), b)
    np.testing.assert_array_equal(b.numpy(), a * 2)
    assert tvm_mapped(no_tvm_remote.info["pid"]) == []


# -- LocalSession (in a subprocess: importing TVM into the test process would change its other tests) --
LOCAL_PROBE = textwrap.dedent(
    f"""
    import json, os, sys
    import numpy as np
    from workbench import rpc, runtime
    mlp, argsort = sys.argv[1], sys.argv[2]
    local = rpc.LocalSession()
    dev = local.cpu(0)
    report = {{}}
    for path in (mlp, argsort):
        local.upload(path)
    try:
        mod = local.load_module(os.path.basename(mlp))
        rng = np.random.default_rng(1)
        x, w1, w2 = (rng.uniform(-1, 1, s).astype("float32") for s in
                     (({BATCH}, {IN}), ({IN}, {HIDDEN}), ({HIDDEN}, {OUT})))
        out = runtime.empty(({BATCH}, {OUT}), "float32", dev)
        mod["main"](*(runtime.tensor(a, dev) for a in (x, w1, w2)), out)
        report["mlp"] = bool(np.allclose(out.numpy(), np.maximum(x @ w1, 0) @ w2, rtol=1e-5, atol=1e-5))
        mod = local.load_module(os.path.basename(argsort))
        s = rng.permutation({SORT_N}).astype("float32")
        o = runtime.empty(({SORT_N},), "int32", dev)
        mod["argsort"](runtime.tensor(s, dev), o)
        report["argsort"] = bool((o.numpy() == np.argsort(s)).all())
    except Exception as exc:
        report["error"] = type(exc).__name__ + ": " + str(exc)
    report["tvm_imported"] = sys.modules.get("tvm") is not None
    local.close()
    print(json.dumps(report))
    """
)


@pytest.mark.parametrize("no_tvm", [False, True], ids=["with-tvm", "no-tvm"])
def test_local_session(exported, no_tvm):
    env = {k: v for k, v in os.environ.items() if k != tvm_bridge.NO_TVM_ENV}
    if no_tvm:
        env[tvm_bridge.NO_TVM_ENV] = "1"
    proc = subprocess.run([sys.executable, "-c", LOCAL_PROBE, exported["mlp"]["so"], exported["argsort"]["so"]],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if no_tvm:
        assert report["error"].startswith("UnsupportedError: cannot load mlp.so"), report
        assert "pip install apache-tvm" in report["error"], report
        assert report["tvm_imported"] is False
    else:
        assert report == {"mlp": True, "argsort": True, "tvm_imported": True}
