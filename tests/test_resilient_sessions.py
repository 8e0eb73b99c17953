"""Sessions that outlive a crashing or interrupted call (issue 15, point 1).

A kernel that faults or calls exit() fails its call with KernelCrashedError; the session, its
tensors (with what the kernel wrote) and modules go on, on both servers and in LocalSession and
PopenSession. The interrupt is a real SIGINT delivered to this process while it waits for a
reply; the client sends CANCEL (docs/protocol.md section 12), the server stops a timing at the
next repeat and a kernel still running after the grace period, and the same session goes on.
"""
from __future__ import annotations

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
from workbench.runtime import ffi
from workbench.errors import CallCancelledError, KernelCrashedError, SessionCrashedError, error_from_code
from workbench.rpc.wire.protocol import HEADER, FLAG_NO_REPLY, Kind
from .helpers import start_server



def _interrupt_after(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


@pytest.fixture(params=["python", "minrpc"])
def any_server(request, private_tmpdir):
    srv = start_server(request.param)
    yield srv
    srv.terminate()


def _open(srv, kernels):
    remote = rpc.connect("127.0.0.1", srv.port)
    remote.upload(kernels["so"])
    return remote, remote.load_module("kernels.so")


@pytest.fixture
def local(kernels):
    """``(session, module)``: a LocalSession (kernels run in this process) with the test kernels loaded."""
    session = rpc.LocalSession()
    session.upload(kernels["so"])
    yield session, session.load_module("kernels.so")
    session.close()


def test_cancel_frame_bytes_match_the_documented_ones():
    assert int(Kind.CANCEL) == 32
    assert HEADER.pack(1, Kind.CANCEL, FLAG_NO_REPLY, 0) + b"\x90" == bytes.fromhex("01000000200001000000000000000000") + b"\x90"
    crashed = error_from_code(14, "the kernel segfault was killed by signal 11")
    assert isinstance(crashed, KernelCrashedError) and isinstance(crashed, SessionCrashedError)
    assert isinstance(error_from_code(15, "cancelled"), CallCancelledError)


def test_ctrl_c_stops_time_evaluator_and_the_session_goes_on(mod, remote, server, private_tmpdir):
    dev = remote.cpu()
    a = runtime.tensor(np.arange(4, dtype="float32"), dev)
    b = runtime.empty((4,), "float32", dev)
    nap = mod.time_evaluator("sleep_ms", dev, number=1, repeat=50)  # 50 x 200 ms = 10 s if not stopped
    timer = _interrupt_after(0.5)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        nap(200)
    interrupted = time.monotonic() - start
    timer.join()
    assert interrupted < 5.0, f"Ctrl-C took {interrupted:.1f} s to interrupt a 10 s time_evaluator"
    # the same session, tensors and function objects work at once (the cancelled reply is dropped first)
    mod["add_one"](a, b)
    np.testing.assert_array_equal(b.numpy(), np.arange(4, dtype="float32") + 1)
    t0 = time.monotonic()
    result = mod.time_evaluator("sleep_ms", dev, number=1, repeat=2)(1)
    assert len(result.results) == 2
    assert time.monotonic() - t0 < 5.0, "the server did not stop the cancelled timing loop at the next repeat"


def test_ctrl_c_twice_and_ping_after(mod, remote):
    dev = remote.cpu()
    for _ in range(2):
        nap = mod.time_evaluator("sleep_ms", dev, number=1, repeat=50)
        timer = _interrupt_after(0.3)
        with pytest.raises(KeyboardInterrupt):
            nap(200)
        timer.join()
    assert remote.listdir(".") == ["kernels.so"]


def test_ctrl_c_in_a_subprocess_client_over_popen_session(kernels, tmp_path):
    """PopenSession (the stdio worker): SIGINT to the client process, then the next call works."""
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, threading, time
        import numpy as np
        from workbench import rpc, runtime
        remote = rpc.PopenSession(rpc.popen_server_command())
        remote.upload({kernels['so']!r})
        mod = remote.load_module("kernels.so")
        dev = remote.cpu()
        a = runtime.tensor(np.arange(3, dtype="float32"), dev)
        b = runtime.empty((3,), "float32", dev)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.monotonic()
        try:
            mod.time_evaluator("sleep_ms", dev, number=1, repeat=50)(200)
        except KeyboardInterrupt:
            print("interrupted after", round(time.monotonic() - start, 2))
        mod["add_one"](a, b)
        print("next call", b.numpy().tolist())
        remote.close()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("interrupted after"), out.stdout
    assert float(lines[0].split()[-1]) < 5.0
    assert lines[1] == "next call [1.0, 2.0, 3.0]"


def test_local_session_ctrl_c_stops_time_evaluator_at_a_repeat(local):
    session, mod = local
    dev = session.cpu()
    timer = _interrupt_after(0.5)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        mod.time_evaluator("sleep_ms", dev, number=1, repeat=50)(200)
    timer.join()
    assert time.monotonic() - start < 5.0
    a = runtime.tensor(np.ones(2, dtype="float32"), dev)
    b = runtime.empty((2,), "float32", dev)
    mod["add_one"](a, b)
    assert b.numpy().tolist() == [2.0, 2.0]


def test_ctrl_c_during_rpc_time_in_an_ipython_shell(any_server, kernels):
    """%rpc_time of a 10 s kernel in a real InteractiveShell: SIGINT returns fast, the next %rpc_time works."""
    from IPython.core.interactiveshell import InteractiveShell

    remote, mod = _open(any_server, kernels)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "workbench")
    try:
        shell.user_ns.update(m=mod, a=runtime.tensor(np.zeros(2, dtype="float32"), remote.cpu()),
                             b=runtime.empty((2,), "float32", remote.cpu()))
        timer = _interrupt_after(0.5)
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):  # as IPython shows a Ctrl-C in any cell
            shell.run_line_magic("rpc_time", 'm["sleep_ms"](200) -n 1 -r 50 -q')
        timer.join()
        assert time.monotonic() - start < 5.0
        shell.run_line_magic("rpc_time", 'm["add_one"](a, b) -n 2 -r 2 -q')
        assert shell.user_ns["b"].numpy().tolist() == [1.0, 1.0]
    finally:
        for name in ("m", "a", "b"):
            shell.user_ns.pop(name, None)
        shell.run_line_magic("unload_ext", "workbench")
        remote.close()


def test_a_cancel_with_nothing_in_flight_is_ignored(remote, kernels):
    """A CANCEL that crossed its request's reply on the wire changes nothing (docs/protocol.md section 12)."""
    remote.upload(kernels["so"])
    remote._chan.send_frame(Kind.CANCEL, [], flags=FLAG_NO_REPLY)
    remote._chan.busy = False
    assert remote.listdir(".") == ["kernels.so"]
    mod = remote.load_module("kernels.so")
    assert len(mod.time_evaluator("sleep_ms", remote.cpu(), number=1, repeat=3)(1).results) == 3


# -- kernels that crash ------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel, args, says", [
    ("write_then_segfault", "a", r"write_then_segfault: the kernel died of signal 11 \(SIGSEGV"),
    ("call_exit", "", r"call_exit: the kernel called exit\(3\)"),
    ("call_abort", "", r"call_abort: the kernel died of signal 6 \(SIGABRT"),
    ("overflow_stack", "", r"overflow_stack: the kernel died of signal 11 \(SIGSEGV"),
    ("raise_sigterm", "", r"raise_sigterm: the kernel died of signal 15 \(SIGTERM"),
    # the ways to end a process that no handler sees, refused where the kernel asks for them
    ("syscall_exit_group", "", r"syscall_exit_group: the kernel called exit\(3\)"),
    ("raise_sigkill", "", r"raise_sigkill: the kernel sent its own process signal 9 \(SIGKILL"),
    ("kill_self_sigkill", "", r"kill_self_sigkill: the kernel sent its own process signal 9 \(SIGKILL"),
    ("raise_sigstop", "", r"raise_sigstop: the kernel sent its own process signal 19 \(SIGSTOP"),
    ("call_pthread_exit", "", r"call_pthread_exit: the kernel called pthread_exit\(\) on the server's thread"),
    # a thread the kernel started dies: that thread ends, the call fails
    ("thread_segfault", "", r"thread_segfault: the kernel's own thread died of signal 11 \(SIGSEGV"),
    ("thread_exit", "", r"thread_exit: the kernel's own thread called exit\(5\)"),
])
def test_a_crashing_kernel_fails_its_call_and_the_session_goes_on(any_server, kernels, kernel, args, says):
    remote, mod = _open(any_server, kernels)
    try:
        dev = remote.cpu()
        a = runtime.tensor(np.arange(4, dtype="float32"), dev)
        b = runtime.empty((4,), "float32", dev)
        add_one = mod["add_one"]
        with pytest.raises(KernelCrashedError, match=says) as info:
            mod[kernel](*([a] if args else []))
        assert info.value.code == 14 and "the session, its tensors" in str(info.value)
        expected = np.arange(4, dtype="float32")
        if kernel == "write_then_segfault":
            expected[0] = 42.0  # what the kernel wrote before it crashed stays
        np.testing.assert_array_equal(a.numpy(), expected)
        add_one(a, b)  # the function object bound before the crash works
        np.testing.assert_array_equal(b.numpy(), expected + 1)
        assert remote.listdir(".") == ["kernels.so"]
    finally:
        remote.close()


def test_three_crashes_within_ten_seconds_end_the_session(any_server, kernels):
    remote, mod = _open(any_server, kernels)
    segfault = mod["segfault"]
    for _ in range(2):
        with pytest.raises(KernelCrashedError):
            segfault()
    with pytest.raises(SessionCrashedError, match="3rd crash within 10 s, so the server ended the session") as info:
        segfault()
    assert not isinstance(info.value, KernelCrashedError)
    with pytest.raises(SessionCrashedError, match="this session has ended"):
        remote.listdir(".")
    with rpc.connect("127.0.0.1", any_server.port) as again:  # the server goes on
        assert again.listdir(".") == []


def test_a_death_no_guard_catches_still_ends_only_the_session(any_server, kernels):
    remote, mod = _open(any_server, kernels)
    with pytest.raises(SessionCrashedError, match="SIGSEGV") as info:
        mod["segfault_unguarded"]()
    assert not isinstance(info.value, KernelCrashedError)
    with rpc.connect("127.0.0.1", any_server.port) as again:
        assert again.listdir(".") == []


def test_a_worker_killed_from_outside_names_the_likely_killer(any_server, kernels):
    """SIGKILL from outside (the OOM killer, kill -9) is the one death the session cannot outlive: it says so."""
    remote, mod = _open(any_server, kernels)
    killer = threading.Timer(0.3, os.kill, (remote.info["pid"], signal.SIGKILL))
    killer.start()
    try:
        with pytest.raises(SessionCrashedError, match=r"signal 9 \(SIGKILL\) from outside, most likely by "
                                                       r"the system's out-of-memory killer"):
            mod["sleep_ms"](5000)
    finally:
        killer.cancel()
        remote.close()


def test_an_openmp_thread_that_faults_fails_only_the_call(any_server, tmp_path):
    """OpenMP's threads are the kernel's own: one of them faulting fails the call, and OpenMP still runs after."""
    src = tmp_path / "omp.c"
    src.write_text(textwrap.dedent("""\
        #include <omp.h>
        #include <workbench_kernel.h>
        WB_KERNEL(fault_in_thread_1) {
          #pragma omp parallel num_threads(2)
          { if (omp_get_thread_num() == 1) { volatile int* p = 0; *p = 1; } }
          return 0;
        }
        WB_KERNEL(count_threads) {
          int n = 0;
          #pragma omp parallel num_threads(2) reduction(+:n)
          n += 1;
          WB_RETURN_INT(n);
        }
        """))
    so = cc.create_shared(tmp_path / "omp.so", [str(src)], options=["-fopenmp"])
    with rpc.connect("127.0.0.1", any_server.port) as remote:
        remote.upload(so)
        mod = remote.load_module("omp.so")
        assert mod["count_threads"]() == 2
        with pytest.raises(KernelCrashedError, match=r"fault_in_thread_1: the kernel's own thread died of signal 11"):
            mod["fault_in_thread_1"]()
        assert mod["count_threads"]() >= 1  # OpenMP goes on (with the threads it has left)
        assert remote.ping()


def test_exit_from_a_library_the_kernel_links_fails_only_the_call(any_server, tmp_path):
    """exit() called on the kernel's behalf by a shared library it links (DT_NEEDED) is caught like its own."""
    (tmp_path / "quits.c").write_text("#include <stdlib.h>\nvoid quit_now(int status) { exit(status); }\n")
    (tmp_path / "uses.c").write_text(textwrap.dedent("""\
        #include <workbench_kernel.h>
        void quit_now(int status);
        WB_KERNEL(quit_in_library) { quit_now(7); return 0; }
        WB_KERNEL(fine) { WB_RETURN_INT(1); }
        """))
    cc.create_shared(tmp_path / "libquits.so", [str(tmp_path / "quits.c")])
    uses = cc.create_shared(tmp_path / "uses.so", [str(tmp_path / "uses.c")],
                            options=[f"-L{tmp_path}", "-lquits", f"-Wl,-rpath,{tmp_path}"])  # where the server finds it
    with rpc.connect("127.0.0.1", any_server.port) as remote:
        remote.upload(uses)
        mod = remote.load_module("uses.so")
        with pytest.raises(KernelCrashedError, match=r"quit_in_library: the kernel called exit\(7\)"):
            mod["quit_in_library"]()
        assert mod["fine"]() == 1


def test_ctrl_c_during_a_call_that_never_returns(any_server, kernels):
    """A plain call of a kernel that spins: Ctrl-C raises at once; the server stops the kernel after the grace period."""
    remote, mod = _open(any_server, kernels)
    try:
        dev = remote.cpu()
        a = runtime.tensor(np.ones(3, dtype="float32"), dev)
        b = runtime.empty((3,), "float32", dev)
        spin, add_one = mod["spin"], mod["add_one"]
        for _ in range(2):
            timer = _interrupt_after(0.5)
            start = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                spin()
            assert time.monotonic() - start < 5.0
            timer.join()
            add_one(a, b)  # waits for the grace period, then works
            assert b.numpy().tolist() == [2.0, 2.0, 2.0]
    finally:
        remote.close()


def test_a_cancelled_kernel_that_blocks_signals_ends_the_session_with_a_reason(any_server, kernels):
    """No interrupt can stop a kernel that blocks every signal: the session ends, and says why, rather than hang."""
    remote, mod = _open(any_server, kernels)
    try:
        timer = _interrupt_after(0.5)
        with pytest.raises(KeyboardInterrupt):
            mod["spin_blocking_signals"]()
        timer.join()
        with pytest.raises(SessionCrashedError, match="kept running two grace periods after the client cancelled it"):
            remote.ping()
    finally:
        remote.close()
    with rpc.connect("127.0.0.1", any_server.port) as again:  # the server goes on
        assert again.listdir(".") == []


def test_popen_session_survives_a_crash(kernels):
    with rpc.PopenSession(rpc.popen_server_command()) as remote:
        remote.upload(kernels["so"])
        mod = remote.load_module("kernels.so")
        a = runtime.tensor(np.zeros(2, dtype="float32"), remote.cpu())
        with pytest.raises(KernelCrashedError, match="SIGSEGV"):
            mod["write_then_segfault"](a)
        assert a.numpy().tolist() == [42.0, 0.0]


RESETS_FAULT_HANDLERS = r"""
#include <signal.h>
#include <workbench_kernel.h>
__attribute__((constructor)) static void reset_at_load(void) { signal(SIGSEGV, SIG_DFL); }
WB_KERNEL(null_write) {
  volatile int* p = NULL;
  *p = 1;
  return 0;
}
"""


def test_a_library_that_resets_the_fault_handlers_as_it_loads_still_crashes_only_its_call(any_server):
    """Its constructor runs before the loader sees it: loading a module puts the guard's handlers back in front."""
    remote = rpc.connect("127.0.0.1", any_server.port)
    mod = cc.load_source(remote, RESETS_FAULT_HANDLERS, name="resets")
    with pytest.raises(KernelCrashedError, match=r"null_write: the kernel died of signal 11 \(SIGSEGV"):
        mod["null_write"]()
    assert remote.ping()
    remote.close()


def test_local_session_survives_a_crash_in_this_process(local):
    session, mod = local
    a = runtime.tensor(np.zeros(2, dtype="float32"), session.cpu())
    faults = ffi.shim().wb_guard_faults()
    with pytest.raises(KernelCrashedError, match="SIGSEGV"):
        mod["write_then_segfault"](a)
    with pytest.raises(KernelCrashedError, match=r"exit\(3\)"):
        mod["call_exit"]()
    assert a.numpy().tolist() == [42.0, 0.0]  # and this process is still here
    assert ffi.shim().wb_guard_faults() == faults + 2


def test_a_crash_in_an_ipython_shell_keeps_the_notebooks_names(any_server, kernels):
    """Through a real InteractiveShell: the crash is one short error, the names bound before it still work."""
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    remote, mod = _open(any_server, kernels)
    try:
        shell.user_ns.update(m=mod, a=runtime.tensor(np.arange(3, dtype="float32"), remote.cpu()),
                             b=runtime.empty((3,), "float32", remote.cpu()))
        result = shell.run_cell("m['write_then_segfault'](a)")
        assert isinstance(result.error_in_exec, KernelCrashedError)
        assert shell.run_cell("m['add_one'](a, b)\nout = b.numpy().tolist()").success
        assert shell.user_ns["out"] == [43.0, 2.0, 3.0]
    finally:
        for name in ("m", "a", "b", "out"):
            shell.user_ns.pop(name, None)
        remote.close()


@pytest.mark.timeout(300)
def test_a_real_notebook_kernel_survives_a_null_dereference(tmp_path, private_tmpdir):
    """nbclient runs cells in a real IPython kernel on a farm: the crash is one error, the next cells go on."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    crash = textwrap.dedent("""\
        %%rpc_compile crash
        #include <workbench_kernel.h>
        WB_KERNEL(write_then_crash) {
          DLTensor* a = WB_ARG_TENSOR_OF(0, float32, 1);
          ((float*)a->data)[0] = 42.0f;
          volatile int* p = 0;
          *p = 1;
          return 0;
        }""")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        "%load_ext workbench\n%rpc_farm --servers local=1\n%rpc_connect\n"
        "import numpy as np\nfrom workbench import runtime\n"
        "a = runtime.tensor(np.arange(3, dtype='float32'), remote.cpu())",
        crash,
        "crash['write_then_crash'](a)",
        "print(a.numpy().tolist(), remote.listdir('.'))",
    )]
    nbclient.NotebookClient(nb, timeout=120, startup_timeout=120, allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    error = next(o for o in nb.cells[2].outputs if o.output_type == "error")
    assert error.ename == "KernelCrashedError" and "died of signal 11 (SIGSEGV" in error.evalue
    out = "".join(o.get("text", "") for o in nb.cells[3].outputs if o.output_type == "stream")
    assert out.startswith("[42.0, 1.0, 2.0]") and "crash.so" in out, nb.cells[3].outputs


def test_local_session_ctrl_c_stops_a_kernel_that_never_returns(local):
    """In process, Ctrl-C (SIGINT to this process) stops the kernel where it runs; SIGINT elsewhere is as before."""
    session, mod = local
    a = runtime.tensor(np.ones(2, dtype="float32"), session.cpu())
    b = runtime.empty((2,), "float32", session.cpu())
    timer = _interrupt_after(0.5)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="spin: the kernel was stopped by Ctrl-C"):
        mod["spin"]()
    timer.join()
    assert time.monotonic() - start < 5.0
    mod["add_one"](a, b)
    assert b.numpy().tolist() == [2.0, 2.0]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's handler is back
    timer = _interrupt_after(0.1)
    with pytest.raises(KeyboardInterrupt):  # outside a kernel: Python's own KeyboardInterrupt
        time.sleep(5)
    timer.join()


def test_ctrl_c_during_a_long_registered_function(any_server):
    """workbench.sleep (a Python function on our server, a built-in on minrpc): Ctrl-C returns at once, and the
    server stops the function after the grace period instead of letting the next request wait for it."""
    with rpc.connect("127.0.0.1", any_server.port) as remote:
        sleep, echo = remote.get_function("workbench.sleep"), remote.get_function("workbench.echo")
        timer = _interrupt_after(0.3)
        with pytest.raises(KeyboardInterrupt):
            sleep(60)
        timer.join()
        start = time.monotonic()
        assert echo(7) == 7  # after the 2 s grace period, not after 60 s
        assert time.monotonic() - start < 30
