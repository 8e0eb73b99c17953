"""cc.build and workbench.testing's rpc_run/local_run against real servers of a LocalFarm.

rpc_run takes its tracker from WORKBENCH_TRACKER_* (or TVM_TRACKER_*), exports the
module into a temporary directory, runs and times it on a granted device, and
brings every argument back as a numpy array; nothing is left behind locally or remotely.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

import numpy as np
import pytest

from workbench import cc, rpc, runtime
from workbench.farm import LocalFarm
from workbench.results import BenchmarkResult
from workbench.runtime import ffi
from workbench.testing import (
    CPU_CACHE_FLUSH_BYTES, EvaluatorConfig, RPCConfig, local_run, rpc_run, run_in_session,
)

from .helpers import ADD_ONE, EM_AARCH64, elf_machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAVE_ARM64_GCC = bool(shutil.which("aarch64-linux-gnu-gcc"))


SCALE_SHIFT = """#include <workbench_kernel.h>
/* b = a * s + k; a second kernel, main is the entry */
WB_KERNEL(helper) { return 0; }
WB_KERNEL(main) {
  WB_EXPECT_ARGS(4);
  DLTensor* a = WB_ARG_TENSOR(0);
  double s = WB_ARG_FLOAT(1);
  int64_t k = WB_ARG_INT(2);
  DLTensor* b = WB_ARG_TENSOR(3);
  for (int64_t i = 0; i < a->shape[0]; ++i) ((float*)b->data)[i] = (float)(((float*)a->data)[i] * s + k);
  return 0;
}
"""

FAST = EvaluatorConfig(number=2, repeat=3, min_repeat_ms=0)
ENV = ("WORKBENCH_TRACKER_HOST", "WORKBENCH_TRACKER_PORT", "WORKBENCH_TRACKER_KEY",
       "TVM_TRACKER_HOST", "TVM_TRACKER_PORT", "TVM_TRACKER_KEY")


@pytest.fixture(scope="module")
def farm(private_tmpdir):
    with LocalFarm({"board": 1}) as f:
        yield f


@pytest.fixture
def tracker_env(farm, monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    host, port = farm.tracker_addr
    monkeypatch.setenv("WORKBENCH_TRACKER_HOST", host)
    monkeypatch.setenv("WORKBENCH_TRACKER_PORT", str(port))
    monkeypatch.setenv("WORKBENCH_TRACKER_KEY", "board")
    return farm


@pytest.fixture(scope="module")
def add_one():
    with cc.build(ADD_ONE, name="add_one") as mod:
        yield mod


def leftovers() -> list[str]:
    """Our temporary directories in TMPDIR (exports, in-process session workspaces)."""
    tmp = tempfile.gettempdir()
    return sorted(glob.glob(os.path.join(tmp, "wb-run-*")) + glob.glob(os.path.join(tmp, "wb-session-*")))


def no_new_leftovers(before: list[str]) -> bool:
    """The server removes a closed session's workspace soon after, not at once: wait (bounded) for it."""
    from .conftest import wait_until

    return wait_until(lambda: not set(leftovers()) - set(before))


def test_rpc_run_copies_every_argument_back_and_times(tracker_env, add_one):
    x = np.arange(16, dtype="float32").reshape(4, 4)
    before = leftovers()
    (a, b), result = rpc_run(add_one, "cpu", [x, np.zeros((4, 4), "float32")], evaluator_config=FAST)
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(b, x + 1)
    assert isinstance(result, BenchmarkResult)
    assert len(result.results) == 3 and result.min > 0
    assert no_new_leftovers(before), f"temporary directories left behind: {set(leftovers()) - set(before)}"
    assert farm_is_free(tracker_env)


def farm_is_free(farm) -> bool:
    """The session rpc_run took went back to the tracker (it was closed)."""
    from .conftest import wait_until

    return wait_until(lambda: farm.summary()["queue_info"]["board"]["free"] == 1)


@pytest.mark.parametrize("export_func", ["tar", "so"])
def test_rpc_run_scalars_and_entry_main(tracker_env, export_func):
    with cc.build(SCALE_SHIFT, name="scale_shift") as mod:
        assert mod.function_names == ["helper", "main"] and mod.entry_name == "main"
        x = np.linspace(-1, 1, 8, dtype="float32")
        (a, s, k, b), _ = rpc_run(mod, "cpu", [x, 2.5, 3, np.zeros(8, "float32")], FAST, export_func=export_func)
    assert (s, k) == (2.5, 3)
    np.testing.assert_allclose(b, x * 2.5 + 3, rtol=1e-6)


def test_rpc_run_export_functions(tracker_env, add_one, tmp_path):
    x = np.ones(8, "float32")
    seen = []

    def export(mod, path):  # TVM's export_func(mod, path)
        seen.append(os.path.basename(path))
        mod.export_library(path)

    (_, b), _ = rpc_run(add_one, "cpu", [x, np.zeros(8, "float32")], FAST, export_func=export, output_format="so")
    np.testing.assert_array_equal(b, 2 * x)
    assert seen == ["wb_tmp_mod.so"]
    # an fcompile with output_format (cc.create_shared, cc.cross_compiler(...)) goes to export_library
    (_, b), _ = rpc_run(add_one, "cpu", [x, np.zeros(8, "float32")], FAST, export_func=cc.create_shared)
    np.testing.assert_array_equal(b, 2 * x)
    with pytest.raises(ValueError, match="output_format"):
        rpc_run(add_one, "cpu", [x, x], FAST, export_func=export)
    with pytest.raises(ValueError, match="export_func must be"):
        rpc_run(add_one, "cpu", [x, x], FAST, export_func="zip")


def test_rpc_config_falls_back_to_tvm_variables(farm, monkeypatch, add_one):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    host, port = farm.tracker_addr
    monkeypatch.setenv("TVM_TRACKER_HOST", host)
    monkeypatch.setenv("TVM_TRACKER_PORT", str(port))
    monkeypatch.setenv("TVM_TRACKER_KEY", "board")
    config = RPCConfig.normalized(None)
    assert (config.tracker_host, config.tracker_port, config.tracker_key) == (host, port, "board")
    (_, b), _ = rpc_run(add_one, "cpu", [np.zeros(3, "float32"), np.zeros(3, "float32")], FAST)
    np.testing.assert_array_equal(b, np.ones(3))
    # WORKBENCH_* wins over TVM_*; explicit fields win over both
    monkeypatch.setenv("WORKBENCH_TRACKER_KEY", "other")
    assert RPCConfig.normalized(None).tracker_key == "other"
    assert RPCConfig.normalized(RPCConfig(tracker_key="mine")).tracker_key == "mine"


@pytest.mark.parametrize("missing", ["HOST", "PORT", "KEY"])
def test_missing_tracker_variable_is_named(tracker_env, monkeypatch, add_one, missing):
    monkeypatch.delenv(f"WORKBENCH_TRACKER_{missing}")
    with pytest.raises(ValueError, match=f"WORKBENCH_TRACKER_{missing}.*TVM_TRACKER_{missing}"):
        rpc_run(add_one, "cpu", [np.zeros(2, "float32")] * 2, FAST)


def test_bad_tracker_port_is_refused(tracker_env, monkeypatch):
    monkeypatch.setenv("WORKBENCH_TRACKER_PORT", "ninety")
    with pytest.raises(ValueError, match="port must be a number.*ninety"):
        RPCConfig.normalized(None)


def test_run_in_session_removes_the_remote_file(farm, add_one):
    with farm.request("board") as remote:
        remote.upload(b"mine", "keep.txt")
        (_, b), result = run_in_session(remote, add_one, "cpu", [np.ones(4, "float32"), np.zeros(4, "float32")],
                                        FAST)
        np.testing.assert_array_equal(b, np.full(4, 2.0))
        assert remote.listdir(".") == ["keep.txt"]
        with pytest.raises(Exception, match="no cuda"):
            run_in_session(remote, add_one, "cuda", [np.ones(4, "float32")] * 2, FAST)
        assert remote.listdir(".") == ["keep.txt"]


def test_local_run_and_cache_flush(add_one):
    x = np.arange(5, dtype="float32")
    before = leftovers()
    flushes, flushed = ffi.cache_flush_stats()
    (a, b), result = local_run(add_one, "cpu", [x, np.zeros(5, "float32")], FAST)
    np.testing.assert_array_equal(b, x + 1)
    assert ffi.cache_flush_stats() == (flushes, flushed)
    (a, b), result = local_run(add_one, "cpu", [x, np.zeros(5, "float32")],
                               EvaluatorConfig(number=2, repeat=2, min_repeat_ms=0, enable_cpu_cache_flush=True))
    np.testing.assert_array_equal(b, x + 1)
    assert len(result.results) == 2
    assert ffi.cache_flush_stats()[1] - flushed >= 2 * CPU_CACHE_FLUSH_BYTES
    assert no_new_leftovers(before), f"temporary directories left behind: {set(leftovers()) - set(before)}"


def test_local_run_takes_runtime_tensors(add_one):
    with rpc.LocalSession() as other:
        t = runtime.tensor(np.full(3, 7, "float32"), other.cpu(0))
        (a, b), _ = local_run(add_one, "cpu", [t, np.zeros(3, "float32")], FAST)
    assert isinstance(a, np.ndarray)
    np.testing.assert_array_equal(b, np.full(3, 8.0))


def test_evaluator_config_defaults_and_checks():
    assert EvaluatorConfig() == EvaluatorConfig(number=3, repeat=1, min_repeat_ms=100, enable_cpu_cache_flush=False)
    assert EvaluatorConfig(enable_cpu_cache_flush=True).cache_flush_bytes == CPU_CACHE_FLUSH_BYTES
    with pytest.raises(ValueError, match="number"):
        EvaluatorConfig(number=0)
    assert RPCConfig().session_priority == 1


# -- cc.build ---------------------------------------------------------------------------------------
def test_host_module_local_calls(add_one):
    x = np.arange(6, dtype="float32")
    out = np.zeros(6, "float32")
    add_one["add_one"](x, out)  # numpy arrays written back in place
    np.testing.assert_array_equal(out, x + 1)
    out2 = np.zeros(6, "float32")
    add_one(x, out2)  # the entry function
    np.testing.assert_array_equal(out2, x + 1)
    assert add_one.entry_name == "add_one"
    with pytest.raises(Exception, match="no kernel named 'nope'"):
        add_one["nope"]


def test_build_from_paths_and_exports(tmp_path):
    src = tmp_path / "add_one.c"
    src.write_text(ADD_ONE)
    with cc.build(str(src)) as mod:
        assert mod.name == "add_one" and mod.is_host
        so = mod.export_library(tmp_path / "a.so")
        tar = mod.export_library(tmp_path / "a.tar")  # a .tar name: objects, as TVM
        with tarfile.open(tar) as t:
            assert [m.name for m in t.getmembers()] == ["add_one.o"]
        with rpc.LocalSession() as local:
            local.upload(so, "a.so")
            local.upload(tar, "a.tar")
            for path in ("a.so", "a.tar"):
                dev = local.cpu(0)
                b = runtime.empty(4, "float32", dev)
                local.load_module(path)["add_one"](runtime.tensor(np.ones(4, "float32"), dev), b)
                np.testing.assert_array_equal(b.numpy(), np.full(4, 2.0))
        workdir = mod._workdir
    assert not os.path.exists(workdir)  # close() removed the module's files
    with pytest.raises(RuntimeError, match="closed"):
        mod.export_library(tmp_path / "b.so")


def test_build_reports_compile_errors_and_bad_input(tmp_path):
    with pytest.raises(cc.CompileError, match=r"broken\.c:2"):
        cc.build("#include <workbench_kernel.h>\nWB_KERNEL(x) { return y; }\n", name="broken")
    with pytest.raises(FileNotFoundError, match="no such source file"):
        cc.build([str(tmp_path / "absent.c")])
    with pytest.raises(ValueError, match="plain file name"):
        cc.build(ADD_ONE, name="../up")
    with pytest.raises(ValueError, match="fcompile must be"):
        with cc.build(ADD_ONE) as mod:
            mod.export_library(tmp_path / "x.so", fcompile="zip")
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "wb-module-*broken*"))


@pytest.mark.skipif(not HAVE_ARM64_GCC, reason="aarch64-linux-gnu-gcc is not installed (apt-get install "
                                               "gcc-aarch64-linux-gnu)")
@pytest.mark.parametrize("target", ["aarch64-linux-gnu", "llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72",
                                    {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}])
def test_build_for_aarch64(tmp_path, target):
    with cc.build(ADD_ONE, target=target, name="add_one") as mod:
        assert not mod.is_host and mod.target_spec.triple == "aarch64-linux-gnu"
        assert elf_machine(mod.export_library(tmp_path / "k.so")) == EM_AARCH64
        tar = mod.export_library(tmp_path / "k.tar", fcompile="tar")
        with tarfile.open(tar) as t:
            t.extractall(tmp_path / "objs")
        assert elf_machine(tmp_path / "objs" / "add_one.o") == EM_AARCH64
        fcompile = cc.cross_compiler("aarch64-linux-gnu")
        assert elf_machine(mod.export_library(tmp_path / "c.so", fcompile=fcompile)) == EM_AARCH64
        with pytest.raises(RuntimeError, match="built for aarch64-linux-gnu, not for this machine.*rpc_run"):
            mod["add_one"](np.zeros(2, "float32"), np.zeros(2, "float32"))


# -- an apache-tvm module --------------------------------------------------------------------------
TVM_SCRIPT = r"""
import json, sys
import numpy as np
import tvm
from tvm import te
from workbench.testing import EvaluatorConfig, rpc_run

n = 64
A = te.placeholder((n,), name="A", dtype="float32")
B = te.compute((n,), lambda i: A[i] + 1.0, name="B")
mod = tvm.compile(tvm.IRModule.from_expr(te.create_prim_func([A, B]).with_attr("global_symbol", "add_one")),
                  target="llvm")
x = np.arange(n, dtype="float32")
report = {}
for export in ("tar", "so"):
    (a, b), result = rpc_run(mod, "cpu", [x, np.zeros(n, "float32")],
                             evaluator_config=EvaluatorConfig(number=2, repeat=2, min_repeat_ms=0), export_func=export)
    report[export] = {"ok": bool(np.array_equal(b, x + 1)), "repeats": len(result.results)}
print(json.dumps(report))
"""


@pytest.mark.skipif(importlib.util.find_spec("tvm") is None,
                    reason="apache-tvm is not installed (the `tvm` test extra: pip install -e .[test,tvm])")
def test_rpc_run_with_an_apache_tvm_module(tracker_env):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", TVM_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"tar": {"ok": True, "repeats": 2}, "so": {"ok": True, "repeats": 2}}
