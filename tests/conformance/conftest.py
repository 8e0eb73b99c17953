"""Fixtures of the conformance tests: servers with TVM's test functions, and modules built by apache-tvm once per run."""
from __future__ import annotations

import fcntl
import json
import os

import pytest

from workbench import rpc

from ..helpers import PRINT_MAIN_REPORT, run_export_script
from . import INIT

HOST = "127.0.0.1"

# What TVM's test_rpc_remote_module and test_compiled_function_with_zero_arguments build: "myadd" (B = A + 1 on
# 102 floats) as .so, .tar and .o; the same as a system library linked into a minrpc program by TVM's own
# cc.create_executable through rpc.with_minrpc; and the module of two functions that return 42.
TVM_EXPORT = """
import os, sys
import tvm
from tvm import te
from tvm.script import ir as I
from tvm.script import tirx as T
from tvm.support import cc as tvm_cc
from workbench import rpc

def main():
    out = sys.argv[1]
    n = tvm.runtime.convert(102)
    A = te.placeholder((n,), name="A")
    B = te.compute(A.shape, lambda *i: A(*i) + 1.0, name="B")
    mod = tvm.IRModule.from_expr(te.create_prim_func([A, B]).with_attr("global_symbol", "myadd"))
    report = {"tvm_version": tvm.__version__}
    f = tvm.compile(mod, "llvm")
    for ext in ("so", "tar"):
        report[ext] = os.path.join(out, "dev_lib." + ext)
        f.export_library(report[ext])
    report["o"] = os.path.join(out, "dev_lib.o")
    f.mod.write_to_file(report["o"])
    syslib = tvm.compile(mod.with_attr("system_lib_prefix", ""), "llvm")
    report["minrpc"] = os.path.join(out, "dev_lib.minrpc")
    syslib.export_library(report["minrpc"], fcompile=rpc.with_minrpc(tvm_cc.create_executable))

    @I.ir_module
    class Module:
        @T.prim_func(s_tir=True)
        def func_without_arg() -> T.int64:
            return T.int64(42)

        @T.prim_func(s_tir=True)
        def func_with_arg(unused: T.int64) -> T.int64:
            return T.int64(42)

    report["zero_args"] = os.path.join(out, "libbuilt.so")
    tvm.compile(Module, target="llvm").export_library(report["zero_args"])
    return report
""" + PRINT_MAIN_REPORT


@pytest.fixture(scope="session")
def tvm_built(tmp_path_factory, worker_id) -> dict[str, str]:
    """The modules of TVM_EXPORT, built by apache-tvm in a subprocess once for all xdist workers of the run."""
    pytest.importorskip("tvm", reason="apache-tvm 0.27 is needed: pip install -e '.[tvm]'")
    root = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    out = root / "conformance_tvm_built"
    with open(root / "conformance_tvm_built.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for the one build
        report_path = out / "report.json"
        if not report_path.exists():
            out.mkdir(exist_ok=True)
            report = run_export_script(TVM_EXPORT, out, "the TVM conformance modules", timeout=300)
            report_path.write_text(json.dumps(report))
        report = json.loads(report_path.read_text())
    for name in ("so", "tar", "o", "minrpc", "zero_args"):
        assert os.path.getsize(report[name]) > 0, report[name]
    return report


@pytest.fixture(scope="module")
def x1_server(private_tmpdir):
    """A server of key "x1" with TVM's test functions registered, as TVM's ``rpc.Server(key="x1")`` has."""
    with rpc.Server(port=0, key="x1", silent=True, server_init_callback=INIT) as srv:
        yield srv


@pytest.fixture
def x1(x1_server):
    """A session on ``x1_server``, closed after the test."""
    with rpc.connect(HOST, x1_server.port, key="x1") as remote:
        yield remote
