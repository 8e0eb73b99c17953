"""TVM kernels that call into the runtime through context slots run on our TVM-free runtime.

apache-tvm 0.27 exports (in a subprocess, once per test session) kernels whose
libraries define TVM's context slots: a ``parallel`` vector add and matmul
(``__TVMBackendParallelLaunch``), a two-stage kernel with a 4 MiB intermediate
(``__TVMBackendAllocWorkspace``/``FreeWorkspace``), both at once (a workspace
allocated inside each parallel task), and ``topi.argsort``, which looks up a
runtime function we do not provide. Hand-written C kernels declare the slots the
way TVM's code generator does to check what TVM's schedules cannot be made to
emit here: barriers, ``num_task=0``, nested launches, a failing task, and a slot
nobody knows. Each runs as ``.so`` and ``.tar``, on a real ``rpc.Server`` whose
pool is sized by ``TVM_NUM_THREADS`` and on ``LocalSession``, against numpy.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from workbench import cc, rpc, runtime
from workbench.errors import RemoteError, UnsupportedError
from workbench.runtime import ffi

from .helpers import PRINT_MAIN_REPORT, TVM_BUILD, run_export_script

if importlib.util.find_spec("tvm") is None:
    pytest.skip(
        "apache-tvm is not installed (it is the `tvm` test extra: pip install -e .[test,tvm]); "
        "these tests export kernels with it",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(420)  # the first test pays for the LLVM export

EXPORT_TIMEOUT_S = 300
SERVER_THREADS = 3  # TVM_NUM_THREADS of the test server: more than this machine may have CPUs
VN = 1 << 20  # vector add length
MN = 256  # matmul size
WN = 1 << 20  # two-stage length: a 4 MiB float32 intermediate
PR, PC = 64, 1024  # parallel + workspace: rows, columns (a 4 KiB workspace per row, in each task)
SORT_N = 64

EXPORT_SCRIPT = TVM_BUILD + textwrap.dedent(
    f"""
    from tvm import topi

    def main():
        out = scheduled_kernels({VN}, {WN}, {PR}, {PC})

        x = te.placeholder(({MN}, {MN}), name="X")
        w = te.placeholder(({MN}, {MN}), name="W")
        k = te.reduce_axis((0, {MN}), name="k")
        y = te.compute(({MN}, {MN}), lambda i, j: te.sum(x[i, k] * w[k, j], axis=k), name="Y")
        def matmul_schedule(sch):
            i, j, kk = sch.get_loops(sch.get_sblock("Y"))
            sch.parallel(i)
        out["matmul"] = build("matmul", [x, w, y], matmul_schedule)

        s = te.placeholder(({SORT_N},), name="S")
        o = topi.argsort(s, axis=0, is_ascend=True, dtype="int32")
        out["argsort"] = build("argsort", [s, o])
        return {{"tvm_version": tvm.__version__, "kernels": out}}
    """
) + PRINT_MAIN_REPORT

# Slots declared as TVM's code generator declares them: weak, zero-initialised, filled by the loader.
C_KERNELS = r"""
#include <pthread.h>
#include <stdio.h>
#include <workbench_kernel.h>

typedef struct { void* sync_handle; int32_t num_task; } Env;
typedef int (*Lambda)(int task_id, Env* env, void* cdata);
__attribute__((weak)) int (*__TVMBackendParallelLaunch)(Lambda, void*, int) = 0;
__attribute__((weak)) int (*__TVMBackendParallelBarrier)(int, Env*) = 0;
__attribute__((weak)) int (*__TVMBackendSomethingNew)(int) = 0;

typedef struct {
  int64_t* out;
  pthread_t task_thread;
  int fail_task;
} Ctx;

static int nested(int task_id, Env* env, void* cdata) {
  Ctx* ctx = (Ctx*)cdata;
  __atomic_fetch_add(&ctx->out[60], 1, __ATOMIC_SEQ_CST);
  ctx->out[61] = pthread_equal(pthread_self(), ctx->task_thread) ? 1 : 0;
  ctx->out[62] = env->num_task;
  return task_id == 0 ? 0 : -1;
}

/* out[t] = t + 1; barrier; out[32 + t] = the sum of every task's out[k]; out[63] = num_task */
static int phases(int task_id, Env* env, void* cdata) {
  Ctx* ctx = (Ctx*)cdata;
  int n = env->num_task;
  if (n > 32) return -1;
  __atomic_store_n(&ctx->out[task_id], task_id + 1, __ATOMIC_RELAXED);
  for (int round = 0; round < 3; ++round)
    if (__TVMBackendParallelBarrier(task_id, env) != 0) return -1;
  int64_t sum = 0;
  for (int k = 0; k < n; ++k) sum += __atomic_load_n(&ctx->out[k], __ATOMIC_RELAXED);
  ctx->out[32 + task_id] = sum;
  if (task_id == 0) ctx->out[63] = n;
  if (task_id == n - 1) {
    ctx->task_thread = pthread_self();
    if (__TVMBackendParallelLaunch(nested, ctx, 0) != 0) return -1;
  }
  return 0;
}

WB_KERNEL(barrier_phases) {
  WB_EXPECT_ARGS(1);
  Ctx ctx = {(int64_t*)WB_ARG_TENSOR(0)->data, 0, -1};
  if (__TVMBackendParallelLaunch(phases, &ctx, 0) != 0) return -1;
  return 0;
}

static int maybe_fail(int task_id, Env* env, void* cdata) {
  Ctx* ctx = (Ctx*)cdata;
  (void)env;
  if (task_id == ctx->fail_task) WB_FAIL("ValueError", "task %d failed on purpose", task_id);
  return 0;
}

WB_KERNEL(fail_task) {
  WB_EXPECT_ARGS(1);
  Ctx ctx = {0, 0, (int)WB_ARG_INT(0)};
  return __TVMBackendParallelLaunch(maybe_fail, &ctx, 0) != 0 ? -1 : 0;
}

WB_KERNEL(unknown_slot) {
  (void)args; (void)nargs;
  return __TVMBackendSomethingNew(1) != 0 ? -1 : 0;
}
"""


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tvm_built(tmp_path_factory) -> dict[str, dict[str, str]]:
    """``{kernel: {"so": path, "tar": path}}`` exported by apache-tvm 0.27 in a subprocess."""
    out = tmp_path_factory.mktemp("tvm_slot_kernels")
    return run_export_script(EXPORT_SCRIPT, out, "the TVM kernels", EXPORT_TIMEOUT_S)["kernels"]


@pytest.fixture(scope="session")
def c_slot_kernels(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("c_slot_kernels")
    src = out / "slots.c"
    src.write_text(C_KERNELS)
    return {"so": cc.create_shared(out / "slots.so", [src]), "tar": cc.create_tar(out / "slots.tar", [src])}


@pytest.fixture(scope="module")
def server(private_tmpdir):
    """Our server, its workers' thread pools sized by TVM_NUM_THREADS (overrides conftest's)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVM_NUM_THREADS", str(SERVER_THREADS))
        mp.setenv("WORKBENCH_NO_TVM", "1")  # a TVM-free device: modules needing TVM are refused at load
        srv = rpc.Server(port=0, silent=True)
    yield srv
    srv.terminate()
    assert not srv.alive


@pytest.fixture(params=["server", "local"])
def sess(request):
    """A session on the TVM_NUM_THREADS server, or LocalSession (this very process)."""
    if request.param == "server":
        yield request.getfixturevalue("remote")
        return
    local = rpc.LocalSession()
    yield local
    local.close()


def pool_threads(sess) -> int:
    return SERVER_THREADS if sess.is_remote else ffi.thread_pool_size()


def load(sess, files: dict[str, str], ext: str):
    sess.upload(files[ext])
    return sess.load_module(os.path.basename(files[ext]))


RNG = np.random.default_rng(8)
EXTS = pytest.mark.parametrize("ext", ["so", "tar"])


# -- TVM-exported kernels ---------------------------------------------------------------------
@EXTS
def test_parallel_vector_add(sess, tvm_built, ext):
    mod = load(sess, tvm_built["vadd"], ext)
    dev = sess.cpu(0)
    a, b = RNG.uniform(-1, 1, VN).astype("float32"), RNG.uniform(-1, 1, VN).astype("float32")
    c = runtime.empty((VN,), "float32", dev)
    mod["vadd"](runtime.tensor(a, dev), runtime.tensor(b, dev), c)
    np.testing.assert_array_equal(c.numpy(), a + b)
    result = mod.time_evaluator("vadd", dev, number=3, repeat=2)(runtime.tensor(b, dev), runtime.tensor(a, dev), c)
    assert len(result.results) == 2
    np.testing.assert_array_equal(c.numpy(), b + a)


@EXTS
def test_parallel_matmul(sess, tvm_built, ext):
    mod = load(sess, tvm_built["matmul"], ext)
    dev = sess.cpu(0)
    x, w = RNG.uniform(-1, 1, (MN, MN)).astype("float32"), RNG.uniform(-1, 1, (MN, MN)).astype("float32")
    y = runtime.empty((MN, MN), "float32", dev)
    mod(runtime.tensor(x, dev), runtime.tensor(w, dev), y)
    np.testing.assert_allclose(y.numpy(), x @ w, rtol=1e-4, atol=1e-4)


@EXTS
def test_workspace_of_4_mib(sess, tvm_built, ext):
    mod = load(sess, tvm_built["twostage"], ext)
    dev = sess.cpu(0)
    p = RNG.uniform(-1, 1, WN).astype("float32")
    expected = p[(np.arange(WN) * 7) % WN] * np.float32(2) + np.float32(1)
    for _ in range(3):  # the freed block comes back from the thread's cache
        q = runtime.empty((WN,), "float32", dev)
        mod["twostage"](runtime.tensor(p, dev), q)
        np.testing.assert_array_equal(q.numpy(), expected)


def test_workspace_reuses_freed_blocks(tvm_built):
    """Repeated calls of a kernel with a workspace take it from the per-thread cache, not malloc."""
    local = rpc.LocalSession()
    try:
        mod = load(local, tvm_built["twostage"], "so")
        dev = local.cpu(0)
        p = runtime.tensor(RNG.uniform(-1, 1, WN).astype("float32"), dev)
        q = runtime.empty((WN,), "float32", dev)
        mod["twostage"](p, q)
        before = ffi.workspace_mallocs()
        for _ in range(5):
            mod["twostage"](p, q)
        assert ffi.workspace_mallocs() == before
    finally:
        local.close()


@EXTS
def test_parallel_tasks_with_workspaces(sess, tvm_built, ext):
    mod = load(sess, tvm_built["parws"], ext)
    dev = sess.cpu(0)
    r = RNG.uniform(-1, 1, (PR, PC)).astype("float32")
    v = runtime.empty((PR, PC), "float32", dev)
    mod(runtime.tensor(r, dev), v)
    np.testing.assert_array_equal(v.numpy(), r[:, (np.arange(PC) * 7) % PC] * np.float32(2) + np.float32(1))


@EXTS
def test_runtime_function_we_lack_fails_clearly(sess, tvm_built, ext, monkeypatch):
    monkeypatch.setenv("WORKBENCH_NO_TVM", "1")  # LocalSession: this process is a TVM-free device
    for _ in range(2):  # and again: the refused load left nothing behind
        with pytest.raises(UnsupportedError) as info:
            load(sess, tvm_built["argsort"], ext)
        text = str(info.value)
        assert "needs TVM runtime function 'tvm.contrib.sort.argsort'" in text, text
        assert "pip install apache-tvm" in text, text
    # the session (or this process) goes on
    dev = sess.cpu(0)
    vadd = load(sess, tvm_built["vadd"], ext)
    a = RNG.uniform(-1, 1, VN).astype("float32")
    c = runtime.empty((VN,), "float32", dev)
    vadd(runtime.tensor(a, dev), runtime.tensor(a, dev), c)
    np.testing.assert_array_equal(c.numpy(), a + a)


def test_every_slot_is_filled(tvm_built, c_slot_kernels):
    """Each slot a library defines is found and filled: ours, or a stub naming what is missing."""
    assert ffi.context_slots(tvm_built["vadd"]["so"]) == ["__TVMBackendParallelLaunch"]
    assert ffi.context_slots(tvm_built["twostage"]["so"]) == ["__TVMBackendAllocWorkspace", "__TVMBackendFreeWorkspace"]
    argsort = ffi.NativeLibrary(tvm_built["argsort"]["so"])
    assert argsort.slots == {
        "__TVMFFIEnvModLookupFromImports": "wb_env_mod_lookup_from_imports",
        "__TVMFFIFunctionCall": "wb_ffi_function_call",
        "__TVMFFIHandleInitOnce": "wb_handle_init_once",
        "__tvm_ffi__library_ctx": "library context",
    }
    c_lib = ffi.NativeLibrary(c_slot_kernels["so"])
    assert c_lib.slots == {
        "__TVMBackendParallelBarrier": "wb_parallel_barrier",
        "__TVMBackendParallelLaunch": "wb_parallel_launch",
        "__TVMBackendSomethingNew": "missing: TVMBackendSomethingNew",
    }
    assert ffi.NativeLibrary(tvm_built["vadd"]["so"]).slots == {"__TVMBackendParallelLaunch": "wb_parallel_launch"}


# -- the pool's semantics, through hand-written kernels ------------------------------------------
@EXTS
def test_barrier_num_task_zero_and_nested_launch(sess, c_slot_kernels, ext):
    mod = load(sess, c_slot_kernels, ext)
    n = pool_threads(sess)
    out = runtime.tensor(np.zeros(64, dtype="int64"), sess.cpu(0))
    for _ in range(5):
        mod["barrier_phases"](out)
        got = out.numpy()
        assert got[63] == n, "num_task=0 is one task per pool thread"
        np.testing.assert_array_equal(got[:n], np.arange(1, n + 1))
        # every task saw every other task's first-phase write: the barrier held them
        np.testing.assert_array_equal(got[32:32 + n], np.full(n, n * (n + 1) // 2))
    # the launch from inside a task ran once, as one task, on that task's thread
    assert got[60] == 5 and got[61] == 1 and got[62] == 1


@EXTS
def test_failing_task_fails_the_launch(sess, c_slot_kernels, ext):
    mod = load(sess, c_slot_kernels, ext)
    n = pool_threads(sess)
    for task in sorted({0, n - 1}):
        with pytest.raises(RemoteError) as info:
            mod["fail_task"](task)
        assert f"task {task} failed on purpose" in str(info.value)
    assert mod["fail_task"](n + 5) is None  # no task with that id: nothing fails


@EXTS
def test_unknown_slot_names_itself(sess, c_slot_kernels, ext):
    mod = load(sess, c_slot_kernels, ext)
    with pytest.raises(RemoteError) as info:
        mod["unknown_slot"]()
    assert "this kernel needs TVM runtime function TVMBackendSomethingNew" in str(info.value)
    out = runtime.tensor(np.zeros(64, dtype="int64"), sess.cpu(0))
    mod["barrier_phases"](out)  # the session goes on
    assert out.numpy()[63] == pool_threads(sess)


# -- sizing -------------------------------------------------------------------------------------
def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_worker_pool_sized_by_tvm_num_threads(remote, tvm_built):
    """The worker starts TVM_NUM_THREADS - 1 pool threads at its first parallel loop, and no more later."""
    vadd = load(remote, tvm_built["vadd"], "so")["vadd"]  # the worker's call watcher starts with its first kernel
    dev = remote.cpu(0)
    a = runtime.tensor(np.ones(VN, dtype="float32"), dev)
    c = runtime.empty((VN,), "float32", dev)
    worker = remote.info["pid"]
    before = thread_count(worker)
    vadd(a, a, c)
    assert thread_count(worker) == before + SERVER_THREADS - 1
    for _ in range(3):
        vadd(a, a, c)
    assert thread_count(worker) == before + SERVER_THREADS - 1
    np.testing.assert_array_equal(c.numpy(), np.full(VN, 2, dtype="float32"))


POOL_PROBE = (
    "import os; from workbench.runtime import ffi; "
    "print(ffi.thread_pool_size(), len(os.sched_getaffinity(0)), len(os.listdir('/proc/self/task')))"
)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"TVM_NUM_THREADS": "5", "OMP_NUM_THREADS": "2"}, 5),
        ({"OMP_NUM_THREADS": "4"}, 4),
        ({"TVM_NUM_THREADS": "not a number", "OMP_NUM_THREADS": "3"}, 3),
        ({}, "affinity"),
    ],
)
def test_pool_size_precedence(env, expected):
    clean = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    proc = subprocess.run([sys.executable, "-c", POOL_PROBE], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    size, affinity, threads = map(int, proc.stdout.split())
    assert size == (affinity if expected == "affinity" else expected)
    assert threads >= size  # the pool's threads exist in this process


FORK_PROBE = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from workbench import rpc, runtime
    from workbench.runtime import ffi
    local = rpc.LocalSession()
    local.upload(sys.argv[1])
    mod = local.load_module(os.path.basename(sys.argv[1]))
    out = runtime.tensor(np.zeros(64, dtype="int64"), local.cpu(0))
    mod["barrier_phases"](out)  # the parent's pool exists now
    n = ffi.thread_pool_size()
    pid = os.fork()
    if pid == 0:  # the child has none of the parent's pool threads: it starts its own
        before = len(os.listdir("/proc/self/task"))
        out.numpy()[:] = 0
        mod["barrier_phases"](out)
        got = out.numpy()
        ok = got[63] == n and (got[32:32 + n] == n * (n + 1) // 2).all()
        ok = ok and len(os.listdir("/proc/self/task")) == before + n - 1
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), n)
    """
)


def test_forked_child_gets_its_own_pool(c_slot_kernels):
    env = dict(os.environ, TVM_NUM_THREADS="3")
    proc = subprocess.run([sys.executable, "-c", FORK_PROBE, c_slot_kernels["so"]], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "3"], proc.stdout + proc.stderr


TVM_IMPORTED_PROBE = textwrap.dedent(
    """
    import os, sys
    import tvm  # loads TVM's FFI library globally: kernels' error calls bind to it
    import numpy as np
    from workbench import rpc, runtime
    local = rpc.LocalSession()
    for path in sys.argv[1:]:
        local.upload(path)
    slots, argsort = local.load_module("slots.so"), local.load_module("argsort.so")
    for call in (lambda: slots["fail_task"](0), lambda: slots["unknown_slot"](),
                 lambda: argsort(runtime.tensor(np.zeros(8, "float32"), local.cpu(0)))):
        try:
            call()
            print("no error")
        except Exception as exc:
            print(str(exc).replace(os.linesep, " "))
    """
)


def test_errors_reach_a_local_session_in_a_process_that_imported_tvm(c_slot_kernels, tvm_built):
    proc = subprocess.run(
        [sys.executable, "-c", TVM_IMPORTED_PROBE, c_slot_kernels["so"], tvm_built["argsort"]["so"]],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, proc.stdout
    assert "task 0 failed on purpose" in lines[0]
    assert "needs TVM runtime function TVMBackendSomethingNew" in lines[1]
    assert "Expected 2 arguments" in lines[2]  # TVM's own argument check, through TVM's error state
