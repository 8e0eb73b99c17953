"""OpenCL devices on both servers (the Python server and minrpc, the C one), with a real OpenCL platform (PoCL, a CPU
OpenCL) on real servers: every test that talks to a server runs against each kind (the `server` fixture).

Skipped, naming the Debian packages, where this machine has no OpenCL device. The TVM part builds its
OpenCL module with apache-tvm in a subprocess (the wheel has no OpenCL runtime, but it exports the
module) and runs it on a server that has no TVM.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from workbench import cc, rpc, runtime
from workbench.errors import (
    BadRequestError,
    DeviceNotFoundError,
    KernelCrashedError,
    RemoteError,
    UnsupportedError,
)
from workbench.runtime.opencl import APT_PACKAGES, NO_OPENCL_ENV, published_devices

from .conftest import wait_until
from .helpers import PRINT_MAIN_REPORT, run_export_script, start_server

if not published_devices():
    pytest.skip(f"no OpenCL device on this machine: install PoCL with `sudo apt-get install {APT_PACKAGES}`",
                allow_module_level=True)

CL = 4
VADD = r"""
__kernel void vadd(__global const float* a, __global const float* b, __global float* c, int n) {
  int i = get_global_id(0);
  if (i < n) c[i] = a[i] + b[i];
}

__kernel void scale2d(__global float* m, float s, int width) {
  int x = get_global_id(0), y = get_global_id(1);
  m[y * width + x] *= s;
}

__kernel void local_sum(__global const int* a, __global int* out, __local int* scratch) {
  int l = get_local_id(0);
  scratch[l] = a[get_global_id(0)];
  barrier(CLK_LOCAL_MEM_FENCE);
  if (l == 0) {
    int s = 0;
    for (int k = 0; k < get_local_size(0); ++k) s += scratch[k];
    out[get_group_id(0)] = s;
  }
}
"""
FAULT = r"""
__kernel void fault(__global float* a, long stride) {
  a[get_global_id(0) * stride] = 1.0f;
}
"""
SPIN = r"""
__kernel void spin(__global volatile float* a) {
  while (a[0] == 0.0f) { }
}
"""


SERVER_KINDS = ["python", "minrpc"]


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(request, private_tmpdir):
    srv = start_server(request.param)
    yield srv
    srv.terminate()


@pytest.fixture
def remote(server):
    session = rpc.connect("127.0.0.1", server.port)
    yield session
    session.close()


@pytest.fixture
def vadd(remote):
    return cc.load_source(remote, VADD, name="vadd", lang="opencl")


# -- 1. devices -----------------------------------------------------------------------------------------
def test_the_server_publishes_its_opencl_devices_with_their_attributes(remote):
    assert [CL, 0] in remote.info["devices"]
    dev = remote.cl(0)
    assert dev == remote.device("cl", 0) == remote.device(CL, 0) == remote.device("opencl")
    assert dev.exist and remote.cpu(0).exist
    assert dev.device_name == published_devices()[0]["device_name"] and dev.device_name
    assert dev.multi_processor_count >= 1 and dev.max_threads_per_block >= 1
    assert dev.total_global_memory > 0 and dev.max_shared_memory_per_block > 0
    assert "OpenCL" in dev.compute_version
    (details,) = [d for d in remote.info["device_details"] if d["device"] == [CL, 0]]
    assert details["exist"] is True and details["platform"]
    with pytest.raises(DeviceNotFoundError, match="no cl\\(7\\)"):
        remote.cl(7)


def test_the_tracker_summary_and_picker_rows_show_the_device(private_tmpdir):
    from workbench.farm import LocalFarm

    with LocalFarm({"opencl": 1}) as farm:
        (row,) = farm.summary().server_rows()
        assert row["key"] == "opencl"
        name = published_devices()[0]["device_name"]
        assert "cl(0)" in row["devices"] and name[:20] in row["devices"] and " CU" in row["devices"]
        remote = farm.request("opencl")
        try:
            a = runtime.tensor(np.arange(4, dtype="float32"), remote.cl(0))
            np.testing.assert_equal(a.numpy(), np.arange(4, dtype="float32"))
        finally:
            remote.close()


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_a_server_without_opencl_starts_and_lists_no_cl_device(private_tmpdir, monkeypatch, tmp_path, kind):
    monkeypatch.setenv(NO_OPENCL_ENV, "1")
    srv = start_server(kind)
    try:
        remote = rpc.connect("127.0.0.1", srv.port)
        assert remote.info["devices"] == [[1, 0]]
        assert not remote.device_details if hasattr(remote, "device_details") else "device_details" not in remote.info
        with pytest.raises(DeviceNotFoundError, match="has no cl\\(0\\); it has: cpu\\(0\\)"):
            remote.cl(0)
        path = tmp_path / "vadd.cl"
        path.write_text(VADD)
        remote.upload(str(path))
        with pytest.raises(UnsupportedError, match="pocl-opencl-icd"):
            remote.load_module("vadd.cl")
        remote.close()
    finally:
        srv.terminate()


# -- 2. tensors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "int8", "uint16", "int64", "bool"])
def test_tensors_round_trip_on_the_device(remote, dtype):
    dev = remote.cl(0)
    host = (np.arange(3 * 5 * 7) % 2 == 1) if dtype == "bool" else np.arange(3 * 5 * 7).astype(dtype)
    host = host.reshape(3, 5, 7)
    t = runtime.tensor(host, dev)
    assert t.device == dev and t.shape == (3, 5, 7)
    np.testing.assert_array_equal(t.numpy(), host)
    empty = runtime.empty((3, 5, 7), dtype, dev)
    np.testing.assert_array_equal(empty.numpy(), np.zeros_like(host))  # zero-filled, as CPU tensors
    empty.copyfrom(host)
    np.testing.assert_array_equal(empty.numpy(), host)


def test_large_and_empty_tensors_and_bad_writes(remote):
    dev = remote.cl(0)
    big = np.random.default_rng(0).random(3 << 20, dtype=np.float32)  # 12 MiB
    t = runtime.tensor(big, dev)
    np.testing.assert_array_equal(t.numpy(), big)
    zero = runtime.empty((0, 4), "float32", dev)
    assert zero.numpy().shape == (0, 4)
    small = runtime.tensor(np.ones(4, dtype="float32"), dev)
    with pytest.raises(BadRequestError, match="expected 16 bytes of data, the request carries 8"):
        remote._request(27, [small._wb_handle], bulk=memoryview(b"\0" * 8))
    np.testing.assert_array_equal(small.numpy(), np.ones(4, dtype="float32"))  # unchanged
    assert remote.ping()["tensors"] >= 3


def test_a_local_session_has_the_opencl_device_too():
    session = rpc.LocalSession()
    try:
        dev = session.cl(0)
        a = runtime.tensor(np.arange(8, dtype="int32"), dev)
        np.testing.assert_array_equal(a.numpy(), np.arange(8, dtype="int32"))
        mod = cc.load_source(session, VADD, name="vadd", lang="opencl")
        x = runtime.tensor(np.ones(8, dtype="float32"), dev)
        out = runtime.empty((8,), "float32", dev)
        mod["vadd"](x, x, out, 8, 8)
        np.testing.assert_array_equal(out.numpy(), np.full(8, 2, dtype="float32"))
    finally:
        session.close()



# -- 2(b). the crash guard of a notebook's own process, where PoCL's LLVM has fault handlers too ----------------
# LLVM saves the handlers it finds when it starts and puts them back on Ctrl-C: the guard's must survive that.
KERNELS = """\
    import ctypes, faulthandler, os, signal
    import numpy as np
    from workbench import rpc, runtime
    from workbench.errors import KernelCrashedError
    faulthandler.enable()  # as pytest and ipykernel do
    """
LOCAL_SESSION = """\
    session = rpc.LocalSession()
    {first}
    session.upload({so!r})
    mod = session.load_module("kernels.so")
    a, b = (runtime.tensor(np.zeros(2, dtype="float32"), session.cpu()) for _ in range(2))
    mod["add_one"](a, b)
    """
LLVM_BY_HAND = """\
    cl = ctypes.CDLL("libOpenCL.so.1")  # as pyopencl does: PoCL starts LLVM at clGetDeviceIDs
    platform, device = ctypes.c_void_p(), ctypes.c_void_p()
    assert cl.clGetPlatformIDs(1, ctypes.byref(platform), None) == 0
    assert cl.clGetDeviceIDs(platform, ctypes.c_uint64(0xFFFFFFFF), 1, ctypes.byref(device), None) == 0
    """
CTRL_C_THEN_CRASH = """\
    try:
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.1)
    except KeyboardInterrupt:
        pass
    try:
        mod["write_then_segfault"](a)
    except KernelCrashedError as exc:
        print("caught:", exc)
    print("still here", a.numpy().tolist())
    """


def _python(tmp_path, *parts: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The script made of ``parts`` in a new Python, its TMPDIR in tmp_path (where a dead one's workspace stays)."""
    script = "".join(textwrap.dedent(part) for part in parts)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TMPDIR": str(tmp_path)})


def _assert_the_crash_was_caught(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "caught: write_then_segfault: the kernel died of signal 11 (SIGSEGV" in proc.stdout
    assert "still here [42.0, 0.0]" in proc.stdout


def test_a_local_sessions_crash_guard_outlives_ctrl_c_after_its_opencl_device_started_llvm(kernels, tmp_path):
    on_the_device = 'runtime.tensor(np.arange(8, dtype="int32"), session.cl(0))  # before any kernel call'
    proc = _python(tmp_path, KERNELS, LOCAL_SESSION.format(first=on_the_device, so=str(kernels["so"])),
                   CTRL_C_THEN_CRASH)
    _assert_the_crash_was_caught(proc)


def test_a_local_sessions_crash_guard_outlives_ctrl_c_after_a_library_started_llvm_first(kernels, tmp_path):
    """The handlers LLVM puts back are not the guard's: its next call puts the guard's back in front."""
    proc = _python(tmp_path, KERNELS, LLVM_BY_HAND, LOCAL_SESSION.format(first="", so=str(kernels["so"])), CTRL_C_THEN_CRASH)
    _assert_the_crash_was_caught(proc)


def test_a_fault_outside_a_kernel_still_ends_the_process_when_the_handler_behind_the_guard_steps_aside(kernels, tmp_path):
    """LLVM starts after the guard (it saves the guard's handlers) and the next call puts the guard's back in
    front: a fault outside a kernel goes on to LLVM's handler, which puts the guard's back and returns.  The
    fault must then end the process (SIGSEGV), not go round between the two handlers for ever."""
    try:
        proc = _python(tmp_path, KERNELS, LOCAL_SESSION.format(first="", so=str(kernels["so"])), LLVM_BY_HAND,
                       'mod["add_one"](a, b)\nprint("faulting", flush=True)\nctypes.string_at(1)\n', timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the fault went round between the handlers for 60 s: {exc.stdout!r}")
    assert proc.stdout == "faulting\n" and proc.returncode == -signal.SIGSEGV, proc.stderr[-2000:]


# -- 3(b). hand-written OpenCL C ----------------------------------------------------------------------
def test_hand_written_kernels_with_each_launch_form(remote, vadd):
    assert vadd.function_names == ["local_sum", "scale2d", "vadd"]
    dev = remote.cl(0)
    a = runtime.tensor(np.arange(1000, dtype="float32"), dev)
    b = runtime.tensor(np.full(1000, 0.5, dtype="float32"), dev)
    c = runtime.empty((1000,), "float32", dev)
    vadd["vadd"](a, b, c, 1000, 1000)  # global 1000, the runtime's local size
    np.testing.assert_array_equal(c.numpy(), np.arange(1000, dtype="float32") + 0.5)
    c.copyfrom(np.zeros(1000, dtype="float32"))
    vadd["vadd"](a, b, c, 1000, 1024, 64)  # global 1024, local 64 (the kernel checks n)
    np.testing.assert_array_equal(c.numpy(), np.arange(1000, dtype="float32") + 0.5)
    m = runtime.tensor(np.ones((8, 16), dtype="float32"), dev)
    vadd["scale2d"](m, 3, 16, 16, 8, 4, 2)  # 2-D: global 16 x 8, local 4 x 2; an int for a float
    np.testing.assert_array_equal(m.numpy(), np.full((8, 16), 3, dtype="float32"))
    vadd["scale2d"](m, 0.5, 16, 16, 8, 0, 0)  # 2-D with the runtime's local size
    np.testing.assert_array_equal(m.numpy(), np.full((8, 16), 1.5, dtype="float32"))
    ints = runtime.tensor(np.arange(256, dtype="int32"), dev)
    sums = runtime.empty((4,), "int32", dev)
    vadd["local_sum"](ints, sums, 64 * 4, 256, 64)  # a __local buffer takes its size in bytes
    np.testing.assert_array_equal(sums.numpy(), np.arange(256).reshape(4, 64).sum(axis=1))


def test_bad_calls_say_what_a_kernel_takes(remote, vadd):
    dev = remote.cl(0)
    a = runtime.tensor(np.ones(64, dtype="float32"), dev)
    with pytest.raises(RemoteError, match="takes its 4 argument.*then the launch: one int"):
        vadd["vadd"](a, a, a, 64)
    with pytest.raises(RemoteError, match="got 7 value"):
        vadd["vadd"](a, a, a, 64, 64, 1, 1)
    with pytest.raises(RemoteError, match=r"argument 3 \(int n\): expected an int, got float"):
        vadd["vadd"](a, a, a, 1.5, 64)
    with pytest.raises(RemoteError, match="expected a tensor on an OpenCL device"):
        vadd["vadd"](runtime.tensor(np.ones(64, dtype="float32"), remote.cpu(0)), a, a, 64, 64)
    with pytest.raises(RemoteError, match="CL_INVALID_WORK_GROUP_SIZE.*multiple of the local size"):
        vadd["vadd"](a, a, a, 64, 60, 32)
    with pytest.raises(RemoteError, match="does not fit a int"):
        vadd["vadd"](a, a, a, 1 << 40, 64)
    vadd["vadd"](a, a, a, 64, 64)  # the session goes on
    np.testing.assert_array_equal(a.numpy(), np.full(64, 2, dtype="float32"))


def test_a_build_error_is_the_compilers_log_with_the_sources_lines(remote):
    source = "__kernel void k(__global float* a) {\n  a[0] = 1.0f;\n  a[1] = nope;\n}\n"
    with pytest.raises(cc.CompileError, match=r"k\.cl:3:\d+: .*undeclared identifier 'nope'") as info:
        cc.load_source(remote, source, name="k", lang="opencl")
    assert "CL_BUILD_PROGRAM_FAILURE" in str(info.value)
    with pytest.raises(cc.CompileError, match=r"cell:4:\d+: "):
        cc.load_source(remote, source, name="k", lang="opencl", source_name="cell", first_line=2)
    with pytest.raises(ValueError, match="do not apply to lang='opencl'"):
        cc.load_source(remote, source, name="k", lang="opencl", target="aarch64-linux-gnu")


def test_rpc_compile_lang_opencl_in_a_notebook(private_tmpdir):
    from IPython.core.interactiveshell import InteractiveShell

    from .test_magics import drop_sessions

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "workbench")
    try:
        ip.run_line_magic("rpc_farm", "--servers opencl=1")
        ip.run_line_magic("rpc_connect", "--key opencl")
        ip.run_cell_magic("rpc_compile", "--lang opencl twice", (
            "__kernel void twice(__global float* a) {\n"
            "  a[get_global_id(0)] *= 2.0f;\n"
            "}\n"))
        ns = ip.user_ns
        ns["np"], ns["runtime"] = np, runtime
        ip.run_cell("x = runtime.tensor(np.arange(32, dtype='float32'), remote.cl(0)); twice(x, 32); y = x.numpy()")
        np.testing.assert_array_equal(ns["y"], 2 * np.arange(32, dtype="float32"))
        result = ip.run_line_magic("rpc_time", "twice(x, 32) -n 5 -r 2 -o -q")
        assert len(result.results) == 2
        out = ip.run_cell("%%rpc_compile --lang opencl broken\n__kernel void broken(__global float* a) {\n  a[0] = b;\n}\n")
        text = str(out.error_in_exec) if out.error_in_exec else ""
        assert "OpenCL compiler rejected the cell" in text and "cell:3:" in text, text
        drop_sessions(ns)
    finally:
        ip.run_line_magic("rpc_farm", "--stop")
        ip.run_line_magic("unload_ext", "workbench")


# -- 4. timing --------------------------------------------------------------------------------------------
def test_time_evaluator_measures_on_the_device_queue(remote, vadd):
    dev = remote.cl(0)
    n = 1 << 16
    a = runtime.tensor(np.ones(n, dtype="float32"), dev)
    c = runtime.empty((n,), "float32", dev)
    result = vadd.time_evaluator("vadd", dev, number=5, repeat=3)(a, a, c, n, n)
    assert len(result.results) == 3 and all(r > 0 for r in result.results)
    grown = vadd.time_evaluator("vadd", dev, number=1, repeat=1, min_repeat_ms=5)(a, a, c, n, n)
    assert grown.results[0] > 0
    np.testing.assert_array_equal(c.numpy(), np.full(n, 2, dtype="float32"))


# -- 5. faults -------------------------------------------------------------------------------------------
def test_a_kernel_fault_ends_the_call_not_the_server(server, private_tmpdir):
    remote = rpc.connect("127.0.0.1", server.port)
    mod = cc.load_source(remote, FAULT, name="fault", lang="opencl")
    a = runtime.tensor(np.zeros(64, dtype="float32"), remote.cl(0))
    cpu = runtime.tensor(np.arange(4, dtype="float32"), remote.cpu(0))
    with pytest.raises(KernelCrashedError, match=r"fault \(an OpenCL kernel on cl\(0\).*signal 11 \(SIGSEGV"):
        mod["fault"](a, 1 << 40, 64)
    with pytest.raises(KernelCrashedError, match="cannot be used any more"):  # its OpenCL runtime lost a thread
        a.numpy()
    np.testing.assert_array_equal(cpu.numpy(), np.arange(4, dtype="float32"))  # the session goes on
    remote.close()
    again = rpc.connect("127.0.0.1", server.port)  # the server too, and a new session's OpenCL works
    b = runtime.tensor(np.arange(4, dtype="float32"), again.cl(0))
    np.testing.assert_array_equal(b.numpy(), np.arange(4, dtype="float32"))
    again.close()


def test_a_cancelled_endless_kernel_ends_the_call(server):
    remote = rpc.connect("127.0.0.1", server.port)
    mod = cc.load_source(remote, SPIN, name="spin", lang="opencl")
    a = runtime.tensor(np.zeros(4, dtype="float32"), remote.cl(0))
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        mod["spin"](a, 1)
    timer.cancel()
    assert time.monotonic() - t0 < 30
    # the session goes on; its OpenCL runtime still runs the endless kernel, so it is not used again
    with pytest.raises(KernelCrashedError, match="spin .*stopped: it ran past the grace period"):
        a.numpy()
    assert remote.ping()["tensors"] == 1
    remote.close()


# -- 3(a). TVM's OpenCL modules -------------------------------------------------------------------------
TVM_OPENCL = """
import os, sys, json
import tvm
from tvm import te
from tvm.s_tir import Schedule

def main():
    out = {"tvm_version": tvm.__version__}
    A = te.placeholder((1024,), name="A")
    B = te.compute((1024,), lambda i: A[i] + 1.0, name="B")
    sch = Schedule(tvm.IRModule.from_expr(te.create_prim_func([A, B]).with_attr("global_symbol", "add_one")))
    sch.work_on("add_one")
    (x,) = sch.get_loops(sch.get_sblock("B"))
    xo, xi = sch.split(x, [None, 32])
    sch.bind(xo, "blockIdx.x")
    sch.bind(xi, "threadIdx.x")
    lib = tvm.compile(sch.mod, target=tvm.target.Target("opencl", host="llvm"))
    for ext in ("so", "tar"):
        out[ext] = os.path.join(sys.argv[1], "add_one_cl." + ext)
        lib.export_library(out[ext])
    n, m, k = 64, 48, 32
    X = te.placeholder((n, k), name="X")
    W = te.placeholder((k, m), name="W")
    r = te.reduce_axis((0, k), name="r")
    s = te.var("s", dtype="float32")
    Y = te.compute((n, m), lambda i, j: te.sum(X[i, r] * W[r, j] * s, axis=r), name="Y")
    sch = Schedule(tvm.IRModule.from_expr(te.create_prim_func([X, W, s, Y]).with_attr("global_symbol", "mm")))
    sch.work_on("mm")
    i, j, rr = sch.get_loops(sch.get_sblock("Y"))
    io, ii = sch.split(i, [None, 8])
    jo, ji = sch.split(j, [None, 16])
    sch.reorder(io, jo, ii, ji, rr)
    sch.bind(io, "blockIdx.y")
    sch.bind(jo, "blockIdx.x")
    sch.bind(ii, "threadIdx.y")
    sch.bind(ji, "threadIdx.x")
    lib = tvm.compile(sch.mod, target=tvm.target.Target("opencl", host="llvm"))
    out["mm"] = os.path.join(sys.argv[1], "mm_cl.so")
    lib.export_library(out["mm"])
    return out
"""


@pytest.fixture(scope="module")
def tvm_opencl(tmp_path_factory):
    if importlib.util.find_spec("tvm") is None:
        pytest.skip("apache-tvm is not installed (the `tvm` test extra: pip install -e .[test,tvm])")
    return run_export_script(TVM_OPENCL + PRINT_MAIN_REPORT, tmp_path_factory.mktemp("tvm_cl"),
                             "TVM's OpenCL kernels", timeout=300)


@pytest.mark.timeout(420)
@pytest.mark.parametrize("kind", SERVER_KINDS)
@pytest.mark.parametrize("ext", ["so", "tar"])
def test_a_tvm_opencl_module_runs_on_the_tvm_free_server(tvm_opencl, private_tmpdir, monkeypatch, ext, kind):
    monkeypatch.setenv("WORKBENCH_NO_TVM", "1")  # the server runs it without TVM's runtime (minrpc never has it)
    srv = start_server(kind)
    try:
        remote = rpc.connect("127.0.0.1", srv.port)
        remote.upload(tvm_opencl[ext])
        mod = remote.load_module(os.path.basename(tvm_opencl[ext]))
        assert mod.entry_name == "main" and "add_one" in mod.function_names
        dev = remote.cl(0)
        a = runtime.tensor(np.random.default_rng(1).random(1024, dtype=np.float32), dev)
        b = runtime.empty((1024,), "float32", dev)
        mod["add_one"](a, b)
        np.testing.assert_array_equal(b.numpy(), a.numpy() + 1)
        timing = mod.time_evaluator("add_one", dev, number=10, repeat=2)(a, b)
        assert all(t > 0 for t in timing.results)
        with pytest.raises(RemoteError, match="(?s)device_type.*expected opencl"):  # TVM's own check, in its host code
            mod["add_one"](runtime.tensor(np.ones(1024, dtype="float32"), remote.cpu(0)), b)
        remote.close()
    finally:
        srv.terminate()


@pytest.mark.timeout(420)
def test_a_tvm_opencl_matmul_with_2d_launches_and_a_scalar(tvm_opencl, remote):
    remote.upload(tvm_opencl["mm"])
    mod = remote.load_module("mm_cl.so")
    dev = remote.cl(0)
    rng = np.random.default_rng(2)
    x, w = rng.random((64, 32), dtype=np.float32), rng.random((32, 48), dtype=np.float32)
    y = runtime.empty((64, 48), "float32", dev)
    mod["mm"](runtime.tensor(x, dev), runtime.tensor(w, dev), 0.5, y)
    np.testing.assert_allclose(y.numpy(), (x @ w) * 0.5, rtol=1e-5)


# -- 6. both servers alike, and what only minrpc (the C server) has to get right -------------------------------
def test_a_third_opencl_crash_within_10_s_ends_the_session(server):
    remote = rpc.connect("127.0.0.1", server.port)
    mod = cc.load_source(remote, FAULT, name="fault", lang="opencl")
    a = runtime.tensor(np.zeros(64, dtype="float32"), remote.cl(0))
    with pytest.raises(KernelCrashedError, match="signal 11"):
        mod["fault"](a, 1 << 40, 64)
    with pytest.raises(KernelCrashedError, match="cannot be used any more"):
        a.numpy()
    from workbench.errors import SessionCrashedError

    with pytest.raises(SessionCrashedError, match="cannot be used any more.*That is the 3rd crash within 10 s"):
        a.numpy()
    remote.close()


# a library that puts its own handler in front of the guard's (as an OpenCL platform's LLVM does when it compiles)
DEFAULT_SEGV = r"""
#include <signal.h>
#include <workbench_kernel.h>
WB_KERNEL(default_segv) {
  signal(SIGSEGV, SIG_DFL);
  return 0;
}
"""


def test_an_opencl_crash_is_caught_after_a_library_replaced_the_fault_handler(server):
    remote = rpc.connect("127.0.0.1", server.port)
    cc.load_source(remote, DEFAULT_SEGV, name="default_segv")["default_segv"]()
    mod = cc.load_source(remote, FAULT, name="fault", lang="opencl")
    a = runtime.tensor(np.zeros(64, dtype="float32"), remote.cl(0))
    with pytest.raises(KernelCrashedError, match="signal 11"):  # not the session: the device's threads faulted
        mod["fault"](a, 1 << 40, 64)
    assert remote.ping()
    remote.close()


def test_freed_opencl_tensors_modules_and_functions_leave_nothing_behind(server):
    remote = rpc.connect("127.0.0.1", server.port)
    dev = remote.cl(0)
    worker_fds = f"/proc/{remote.info['pid']}/fd"

    def round_trip(i: int) -> None:
        mod = cc.load_source(remote, VADD, name=f"vadd{i}", lang="opencl")
        x = runtime.tensor(np.full(1 << 16, i, dtype="float32"), dev)
        y = runtime.empty((1 << 16,), "float32", dev)
        mod["vadd"](x, x, y, 1 << 16, 1 << 16)
        np.testing.assert_array_equal(y.numpy(), np.full(1 << 16, 2 * i, dtype="float32"))
        del mod, x, y  # freed by the client's finalizers

    round_trip(0)  # the platform's own descriptors are opened by the first use
    baseline = remote.ping()
    fds = len(os.listdir(worker_fds))
    for i in range(1, 21):
        round_trip(i)
    import gc

    gc.collect()
    assert wait_until(lambda: remote.ping()["tensors"] == baseline["tensors"]), remote.ping()
    assert remote.ping()["tensor_bytes"] == baseline["tensor_bytes"]
    assert len(os.listdir(worker_fds)) <= fds + 2
    remote.close()


def test_minrpc_publishes_the_same_devices_as_the_python_server(private_tmpdir):
    python, native = start_server("python"), start_server("minrpc")
    try:
        with rpc.connect("127.0.0.1", python.port) as a, rpc.connect("127.0.0.1", native.port) as b:
            assert b.info["server"] == "minrpc"
            assert a.info["devices"] == b.info["devices"] == [[1, 0]] + [[CL, i] for i in range(len(published_devices()))]
            assert a.info["device_details"] == b.info["device_details"] == published_devices()
            assert b.cl(0).device_name == published_devices()[0]["device_name"]
    finally:
        python.terminate()
        native.terminate()


def _process_status(pid: int) -> tuple[int, str]:
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    with open(f"/proc/{pid}/maps") as f:
        return threads, f.read()


def test_the_minrpc_listener_never_starts_an_opencl_platform(private_tmpdir):
    srv = rpc.MinRPCServer(port=0)
    try:
        with rpc.connect("127.0.0.1", srv.port) as remote:  # a session that uses OpenCL (in its own worker)
            a = runtime.tensor(np.arange(16, dtype="float32"), remote.cl(0))
            mod = cc.load_source(remote, VADD, name="vadd", lang="opencl")
            mod["vadd"](a, a, a, 16, 16)
            np.testing.assert_array_equal(a.numpy(), 2 * np.arange(16, dtype="float32"))
            worker_threads, worker_maps = _process_status(remote.info["pid"])
            assert "libOpenCL" in worker_maps and worker_threads > 1  # the platform's threads, in the worker
        threads, maps = _process_status(srv.pid)
        assert threads == 1, "the listener started threads (an OpenCL platform?)"
        assert "libOpenCL" not in maps and "pocl" not in maps  # the device list came from a forked probe
        with rpc.connect("127.0.0.1", srv.port) as again:  # and each new session opens its own platform
            b = runtime.tensor(np.ones(8, dtype="int32"), again.cl(0))
            np.testing.assert_array_equal(b.numpy(), np.ones(8, dtype="int32"))
    finally:
        srv.terminate()


def test_minrpc_registers_its_opencl_devices_with_a_tracker(private_tmpdir):
    with rpc.Tracker(port=0, silent=True) as tracker, rpc.connect_tracker("127.0.0.1", tracker.port) as ts:
        srv = rpc.MinRPCServer(port=0, key="clboard", tracker_addr=("127.0.0.1", tracker.port))
        try:
            assert wait_until(lambda: ts.summary().server_rows()), ts.summary()
            (row,) = ts.summary().server_rows()
            name = published_devices()[0]["device_name"]
            assert row["key"] == "clboard" and "cl(0)" in row["devices"] and name[:20] in row["devices"]
            with ts.request("clboard") as remote:
                assert remote.info["server"] == "minrpc" and remote.cl(0).exist
        finally:
            srv.terminate()



def test_a_kernel_outlives_its_freed_module_and_a_timer_of_nothing_measures_zero(remote):
    dev = remote.cl(0)
    mod = cc.load_source(remote, VADD, name="vadd_kept", lang="opencl")
    vadd = mod["vadd"]
    remote._request(29, [mod._wb_handle])  # FREE the module's handle (its function stays)
    a = runtime.tensor(np.arange(32, dtype="float32"), dev)
    c = runtime.empty((32,), "float32", dev)
    vadd(a, a, c, 32, 32)  # the function keeps its kernel (and its module's programs)
    np.testing.assert_array_equal(c.numpy(), 2 * np.arange(32, dtype="float32"))
    nop = remote.get_function("workbench.nop")  # launches nothing: no profiling event, 0 s on the device's clock
    result = nop.time_evaluator(dev, number=3, repeat=2)(a)
    assert list(result.results) == [0.0, 0.0]


def test_a_minrpc_stdio_session_serves_the_opencl_device_too(private_tmpdir):
    from workbench.native import build_minrpc

    session = rpc.PopenSession(build_minrpc())  # minrpc on a pipe: its probe must not write into the stream
    try:
        assert session.info["server"] == "minrpc" and [CL, 0] in session.info["devices"]
        a = runtime.tensor(np.arange(8, dtype="float32"), session.cl(0))
        mod = cc.load_source(session, "__kernel void t(__global float* a) { a[get_global_id(0)] *= 3.0f; }",
                             name="t", lang="opencl")
        mod["t"](a, 8)
        np.testing.assert_array_equal(a.numpy(), 3 * np.arange(8, dtype="float32"))
    finally:
        session.close()
