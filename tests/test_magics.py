"""The magics through a real IPython shell against a real embedded farm (tracker and servers on loopback)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from workbench import farm as farm_api  # noqa: E402
from workbench import runtime  # noqa: E402
from workbench.notebook import MagicError  # noqa: E402
from workbench.results import BenchmarkResult, default_log  # noqa: E402
from workbench.rpc import RemoteModule, RPCSession, connect_tracker  # noqa: E402
from workbench.rpc.client.tracker_session import TrackerError  # noqa: E402

from .conftest import wait_until  # noqa: E402
from .helpers import drop_sessions  # noqa: E402

ADD_ONE = r"""#include <workbench_kernel.h>

WB_KERNEL(add_one) {
  WB_EXPECT_ARGS(2);
  DLTensor* a = WB_ARG_TENSOR(0);
  DLTensor* b = WB_ARG_TENSOR(1);
  for (int64_t i = 0; i < a->shape[0]; ++i) ((float*)b->data)[i] = ((float*)a->data)[i] + 1.0f;
  return 0;
}
"""

CRASH = r"""#include <workbench_kernel.h>

WB_KERNEL(crash) {
  volatile int* p = 0;
  *p = 1;
  return 0;
}
"""


@pytest.fixture(scope="module")
def shell(private_tmpdir):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "workbench")
    ip.run_line_magic("rpc_farm", "--servers local=2 other=1")
    yield ip
    drop_sessions(ip.user_ns)
    ip.run_line_magic("unload_ext", "workbench")
    assert farm_api.current_farm() is None


@pytest.fixture
def ns(shell):
    yield shell.user_ns
    drop_sessions(shell.user_ns)
    default_log().clear()


def free(key: str) -> int:
    with connect_tracker(*farm_api.default_tracker()) as tracker:
        return tracker.summary()["queue_info"].get(key, {}).get("free", 0)


def test_load_ext_registers_every_magic_with_usage(shell):
    magics = shell.magics_manager.magics
    for name in ("rpc_farm", "rpc_tracker", "rpc_connect", "rpc_disconnect", "rpc_time", "rpc_results"):
        assert name in magics["line"], name
        doc = magics["line"][name].__doc__  # what %rpc_connect? prints
        assert doc.lstrip(": \n").startswith(f"%{name}") and "--debug" in doc
    assert "rpc_compile" in magics["cell"]
    assert "--session-timeout" in magics["line"]["rpc_connect"].__doc__


def test_unknown_option_shows_usage(shell):
    with pytest.raises(UsageError) as info:
        shell.run_line_magic("rpc_connect", "--bogus 1")
    assert "unrecognized arguments: --bogus" in str(info.value)
    assert "usage: %rpc_connect" in str(info.value)


def test_farm_is_the_default_tracker(shell):
    farm = farm_api.current_farm()
    assert farm is not None and farm_api.default_tracker() == farm.tracker_addr
    assert farm.servers_per_key == {"local": 2, "other": 1}
    with pytest.raises(UsageError, match="KEY=COUNT"):
        shell.run_line_magic("rpc_farm", "--servers local=x")
    assert farm_api.current_farm() is farm  # a bad argument keeps the running farm


def test_connect_binds_remote_and_rerun_frees_the_device(shell, ns):
    shell.run_line_magic("rpc_connect", "")
    first = ns["remote"]
    assert isinstance(first, RPCSession) and first.info["key"] == "local"  # the farm's first key
    assert wait_until(lambda: free("local") == 1)
    shell.run_line_magic("rpc_connect", "")  # running the cell again closes the previous session
    assert first._ended is not None
    assert wait_until(lambda: free("local") == 1)
    shell.run_line_magic("rpc_connect", "--key other -o board")
    assert ns["board"].info["key"] == "other"
    shell.run_line_magic("rpc_disconnect", "board")
    assert "board" not in ns
    assert wait_until(lambda: free("other") == 1)


def test_connect_direct_address(shell, ns, server):
    shell.run_line_magic("rpc_connect", f"127.0.0.1:{server.port} -o direct")
    assert ns["direct"].address == f"127.0.0.1:{server.port}"
    with pytest.raises(MagicError, match="cannot connect"):
        shell.run_line_magic("rpc_connect", "127.0.0.1:1 -o nothing")


def test_compile_time_and_results(shell, ns, tmp_path):
    shell.run_line_magic("rpc_connect", "")
    shell.run_cell_magic("rpc_compile", "addmod", ADD_ONE)
    mod = ns["addmod"]
    assert isinstance(mod, RemoteModule) and "add_one" in mod.function_names
    assert ns["remote"].listdir(".") == ["addmod.so"]
    dev = ns["remote"].cpu()
    ns["a"] = runtime.tensor(np.arange(64, dtype="float32"), dev)
    ns["b"] = runtime.empty((64,), "float32", dev)
    shell.run_line_magic("rpc_time", 'addmod["add_one"](a, b) -n 10 -r 4 -q')
    np.testing.assert_array_equal(ns["b"].numpy(), np.arange(64, dtype="float32") + 1)
    result = shell.run_line_magic("rpc_time", '-r 3 -n 5 -o addmod["add_one"](a, b)')  # options first also work
    assert isinstance(result, BenchmarkResult) and len(result.results) == 3
    frame = shell.run_line_magic("rpc_results", "")
    assert len(frame) == 7 and set(frame["function"]) == {"add_one"}
    assert set(frame["key"]) == {"local"} and set(frame["shapes"]) == {"64;64"}
    csv = tmp_path / "t.csv"
    shell.run_line_magic("rpc_results", f"--csv {csv}")
    assert csv.read_text().count("\n") == 8
    shell.run_line_magic("rpc_results", "--plot --kind bar")
    shell.run_line_magic("rpc_results", "--clear")
    assert len(default_log()) == 0
    # without -n, each repeat lasts 100 ms at least, as %timeit's do: the device raises the count of calls
    default = shell.run_line_magic("rpc_time", 'addmod["add_one"](a, b) -r 2 -o -q')
    # (number only grows from one repeat to the next: each repeat is checked with its own count of calls)
    assert default.number > 1 and all(t * n >= 0.1 - 1e-9 for t, n in zip(default.results, default.numbers)), \
        (default.numbers, default.results)
    shell.run_line_magic("rpc_results", "--clear")


def test_compile_tar_export_and_target(shell, ns):
    shell.run_line_magic("rpc_connect", "")
    shell.run_cell_magic("rpc_compile", "tarmod --export tar --cflags '-O3 -DUNUSED=1'", ADD_ONE)
    assert ns["remote"].listdir(".") == ["tarmod.tar"]
    with pytest.raises(MagicError, match="apt-get install gcc-sparc64-linux-gnu"):
        shell.run_cell_magic("rpc_compile", "x --target sparc64-linux-gnu", ADD_ONE)


def test_compile_error_names_cell_lines(shell, ns):
    shell.run_line_magic("rpc_connect", "")
    bad = ADD_ONE.replace("WB_EXPECT_ARGS(2);", "WB_EXPECT_ARGS(2);\n  undeclared_thing = 3;")
    with pytest.raises(MagicError) as info:
        shell.run_cell_magic("rpc_compile", "bad", bad)
    text = str(info.value)
    assert "cell:6:" in text and "undeclared_thing" in text  # line 1 in the notebook is the %%rpc_compile line
    assert "/tmp" not in text and "wb-src-" not in text


def test_missing_and_dead_sessions(shell, ns):
    with pytest.raises(MagicError, match="no session named `remote`"):
        shell.run_cell_magic("rpc_compile", "m", ADD_ONE)
    shell.run_line_magic("rpc_connect", "")
    ns["remote"].close()
    with pytest.raises(MagicError, match="session has ended"):
        shell.run_cell_magic("rpc_compile", "m", ADD_ONE)
    with pytest.raises(UsageError, match="needs a call"):
        shell.run_line_magic("rpc_time", "-r 3")
    ns["x"] = 3
    with pytest.raises(MagicError, match="not a remote function"):
        shell.run_line_magic("rpc_time", "abs(x)")


def test_crashed_kernel_is_one_line(shell, ns):
    shell.run_line_magic("rpc_connect", "")
    shell.run_cell_magic("rpc_compile", "crashmod", CRASH)
    with pytest.raises(MagicError, match="SIGSEGV"):
        shell.run_line_magic("rpc_time", 'crashmod["crash"]() -n 1 -r 1')


def test_errors_in_a_cell_print_one_line(shell, ns, capsys):
    result = shell.run_cell("%rpc_connect --key nobody --timeout 0.5")
    assert isinstance(result.error_in_exec, MagicError)
    captured = capsys.readouterr()
    err = captured.out + captured.err
    assert "no session for key 'nobody'" in err and "0 server(s) registered" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(TrackerError):  # --debug: the library's own exception, with its traceback
        shell.run_line_magic("rpc_connect", "--key nobody --timeout 0.3 --debug")


def test_interrupting_a_queued_connect_leaves_no_waiter(shell, ns):
    shell.run_line_magic("rpc_connect", "--key other -o holder")  # the only "other" device is now busy
    main = threading.get_ident()
    stop = threading.Event()

    def interrupt_when_queued():
        with connect_tracker(*farm_api.default_tracker()) as tracker:
            for _ in range(500):
                if stop.is_set():
                    return
                if tracker.summary()["queue_info"]["other"]["pending"] == 1:
                    signal.pthread_kill(main, signal.SIGINT)
                    return
                stop.wait(0.02)

    thread = threading.Thread(target=interrupt_when_queued)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):  # as for any cell; the request left the tracker's queue
            shell.run_line_magic("rpc_connect", "--key other -o waiter --timeout 20")
    finally:
        stop.set()
        thread.join(10)
    with connect_tracker(*farm_api.default_tracker()) as tracker:
        assert wait_until(lambda: tracker.summary()["queue_info"]["other"]["pending"] == 0)
    assert "waiter" not in ns


def test_tracker_magic_sets_default(shell, ns, capsys):
    farm = farm_api.current_farm()
    host, port = farm.tracker_addr
    shell.run_line_magic("rpc_tracker", f"{host}:{port} --no-picker")
    out = capsys.readouterr().out
    assert f"default tracker: {host}:{port}" in out and "Queue Status" in out
    with pytest.raises(MagicError, match="host:port"):
        shell.run_line_magic("rpc_tracker", "nonsense --no-picker")


def test_core_imports_no_notebook_packages():
    code = (
        "import sys\n"
        "import workbench, workbench.rpc, workbench.runtime, workbench.cc, workbench.results, workbench.farm\n"
        "import workbench.exec.rpc_server, workbench.rpc.server.worker, workbench.rpc.client.tracker_session\n"
        "from workbench.rpc import connect, Server, Tracker, RPCSession\n"
        "bad = sorted(m for m in ('IPython', 'ipywidgets', 'matplotlib', 'tqdm') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_tracker_magic_shows_a_live_picker(shell, ns):
    magics = shell.magics_manager.registry["WorkbenchMagics"]
    shell.run_line_magic("rpc_tracker", "--interval 0.2")
    picker = magics.pickers[-1]
    try:
        assert picker.tracker_address == "%s:%d" % farm_api.current_farm().tracker_addr
        assert wait_until(lambda: picker.summary is not None and
                          {r["key"] for r in picker.summary.key_rows()} == {"local", "other"})
        picker.connect("other")  # the Connect button's path: binds `remote` in the shell
        assert wait_until(lambda: isinstance(ns.get("remote"), RPCSession))
        assert ns["remote"].info["key"] == "other"
    finally:
        magics.close()
    assert picker.closed and not magics.pickers


def test_queued_connect_shows_place_and_time_waited(shell, ns, capsys, monkeypatch):
    monkeypatch.setenv("WORKBENCH_PROGRESS", "1")  # pytest's stderr is no terminal: force the bar
    shell.run_line_magic("rpc_connect", "--key other -o holder")
    with pytest.raises(MagicError, match="no session for key 'other'"):
        shell.run_line_magic("rpc_connect", "--key other -o second --timeout 2.5")
    err = capsys.readouterr().err
    assert "1st in the queue for 'other'" in err and "waited 1 s" in err  # the bar, once the wait passed 1 s
    with connect_tracker(*farm_api.default_tracker()) as tracker:
        assert wait_until(lambda: tracker.summary()["queue_info"]["other"]["pending"] == 0)
