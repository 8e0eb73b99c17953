"""Sessions that outlive an interrupted call (issue 15, point 1): Ctrl-C during time_evaluator.

The interrupt is a real SIGINT delivered to this process while it waits for the reply of a
TIME_EVAL of a kernel that sleeps; the client sends CANCEL (docs/protocol.md section 12), the
server stops at the next repeat, and the same session (its tensors and functions) goes on.
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

from workbench import rpc, runtime
from workbench.errors import CallCancelledError, KernelCrashedError, SessionCrashedError, error_from_code
from workbench.rpc.wire.protocol import HEADER, FLAG_NO_REPLY, Kind



def _interrupt_after(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


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


def test_local_session_ctrl_c_stops_time_evaluator_at_a_repeat(kernels):
    local = rpc.LocalSession()
    local.upload(kernels["so"])
    mod = local.load_module("kernels.so")
    dev = local.cpu()
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
    local.close()


def test_ctrl_c_during_rpc_time_in_an_ipython_shell(mod, remote):
    """%rpc_time of a 10 s kernel in a real InteractiveShell: SIGINT returns fast, the next %rpc_time works."""
    from IPython.core.interactiveshell import InteractiveShell

    from workbench.notebook.magics import MagicError

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "workbench")
    try:
        shell.user_ns.update(m=mod, a=runtime.tensor(np.zeros(2, dtype="float32"), remote.cpu()),
                             b=runtime.empty((2,), "float32", remote.cpu()))
        timer = _interrupt_after(0.5)
        start = time.monotonic()
        with pytest.raises(MagicError, match="interrupted"):  # the magics say "interrupted" for a Ctrl-C
            shell.run_line_magic("rpc_time", 'm["sleep_ms"](200) -n 1 -r 50 -q')
        timer.join()
        assert time.monotonic() - start < 5.0
        shell.run_line_magic("rpc_time", 'm["add_one"](a, b) -n 2 -r 2 -q')
        assert shell.user_ns["b"].numpy().tolist() == [1.0, 1.0]
    finally:
        for name in ("m", "a", "b"):
            shell.user_ns.pop(name, None)
        shell.run_line_magic("unload_ext", "workbench")


def test_a_cancel_with_nothing_in_flight_is_ignored(remote, kernels):
    """A CANCEL that crossed its request's reply on the wire changes nothing (docs/protocol.md section 12)."""
    remote.upload(kernels["so"])
    remote._chan.send_frame(Kind.CANCEL, [], flags=FLAG_NO_REPLY)
    remote._chan.busy = False
    assert remote.listdir(".") == ["kernels.so"]
    mod = remote.load_module("kernels.so")
    assert len(mod.time_evaluator("sleep_ms", remote.cpu(), number=1, repeat=3)(1).results) == 3
