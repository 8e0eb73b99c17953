"""time_evaluator and BenchmarkResult.

The on-device options are checked with probe functions that a test server
registers (``register_probes``): a timed function that counts its calls and an
``f_preproc`` that records, at each repeat, the call count, the cache flushes
so far and the device clock. Every check is a count, an order, or a lower bound
the option guarantees (never an upper time bound).
"""
from __future__ import annotations

import inspect
import time

import numpy as np
import pandas as pd
import pytest

from workbench import rpc, runtime
from workbench.errors import BadRequestError, RemoteNotFoundError
from workbench.results import BenchmarkResult
from workbench.rpc.client.session import RemoteFunction, RemoteModule
from workbench.rpc.wire.protocol import Kind
from workbench.runtime.timer import time_repeats

from .conftest import assert_clean

TVM_SIGNATURE = [  # tvm.runtime.Module.time_evaluator in apache-tvm 0.27, after self
    ("func_name", inspect.Parameter.empty), ("dev", inspect.Parameter.empty), ("number", 10), ("repeat", 1),
    ("min_repeat_ms", 0), ("limit_zero_time_iterations", 100), ("cooldown_interval_ms", 0),
    ("repeats_to_cooldown", 1), ("cache_flush_bytes", 0), ("f_preproc", ""),
]


# -- probes, registered in the test server's process ----------------------------------------
_CALLS = [0]
_PRE: list[list] = []


def register_probes() -> None:
    """server_init_callback of the probe server."""
    from workbench.runtime.ffi import cache_flush_stats

    def count(*args):
        _CALLS[0] += 1

    def pre(*args):
        _PRE.append([_CALLS[0], cache_flush_stats()[0], time.perf_counter(), len(args)])

    def record():
        out = {"calls": _CALLS[0], "pre": list(_PRE), "flushes": list(cache_flush_stats())}
        _CALLS[0] = 0
        _PRE.clear()
        return out

    rpc.register_func("probe.count", count, override=True)
    rpc.register_func("probe.pre", pre, override=True)
    rpc.register_func("probe.record", record, override=True)


@pytest.fixture(scope="module")
def probe_server(private_tmpdir):
    srv = rpc.Server(port=0, silent=True, server_init_callback=register_probes)
    yield srv
    srv.terminate()


@pytest.fixture
def probed(probe_server, private_tmpdir):
    sess = rpc.connect("127.0.0.1", probe_server.port)
    yield sess
    sess.close()
    assert_clean(probe_server, private_tmpdir)


def record(sess) -> dict:
    return sess.get_function("probe.record")()


def test_time_evaluator_on_device(mod, remote):
    dev = remote.cpu()
    a = runtime.tensor(np.ones(1 << 16, "float32"), dev)
    b = runtime.empty((1 << 16,), "float32", dev)
    result = mod.time_evaluator("add_one", dev, number=5, repeat=4)(a, b)
    assert isinstance(result, BenchmarkResult)
    assert len(result.results) == 4 and all(r > 0 for r in result.results)
    assert result.min <= result.median <= result.max
    np.testing.assert_array_equal(b.numpy(), 2)  # it really ran the kernel


def test_timing_excludes_the_network_and_measures_the_kernel(mod, remote):
    dev = remote.cpu()
    result = mod.time_evaluator("sleep_ms", dev, number=2, repeat=2)(20)
    assert all(0.019 < r < 0.5 for r in result.results), result.results


def test_min_repeat_ms_raises_number():
    calls = []

    def run(n):
        calls.append(n)
        return n * 1e-4  # 0.1 ms a call

    results = time_repeats(run, number=1, repeat=2, min_repeat_ms=10)
    assert calls[0] == 1  # warm-up
    assert max(calls) * 1e-4 * 1e3 >= 10  # a repeat reached 10 ms
    assert results == pytest.approx([1e-4, 1e-4])


def test_min_repeat_ms_on_device(mod, remote):
    dev = remote.cpu()
    result = mod.time_evaluator("half", dev, number=1, repeat=2, min_repeat_ms=20)(1.0)
    assert len(result.results) == 2 and all(r < 1e-3 for r in result.results)


def test_zero_time_limit_stops():
    calls = []
    time_repeats(lambda n: calls.append(n) or 0.0, number=1, repeat=1, min_repeat_ms=5, limit_zero_time_iterations=3)
    assert len(calls) == 1 + 3


def test_cooldown_and_validation():
    with pytest.raises(ValueError, match="number and repeat"):
        time_repeats(lambda n: 1.0, number=0)
    with pytest.raises(ValueError, match="repeats_to_cooldown"):
        time_repeats(lambda n: 1.0, repeats_to_cooldown=0)


def test_python_function_and_preproc(remote):
    sleep = remote.get_function("workbench.sleep")
    result = sleep.time_evaluator(remote.cpu(), number=1, repeat=2, f_preproc="workbench.nop")(0.01)
    assert all(r >= 0.009 for r in result.results)
    with pytest.raises(RemoteNotFoundError, match="no function named 'missing.preproc'"):
        sleep.time_evaluator(remote.cpu(), number=1, f_preproc="missing.preproc")(0.0)


def test_benchmark_result_frame_and_repr():
    r = BenchmarkResult([1e-3, 3e-3, 2e-3], name="add_one", device="cpu(0)")
    assert (r.mean, r.median, r.min, r.max) == pytest.approx((2e-3, 2e-3, 1e-3, 3e-3))
    assert r.std == pytest.approx(np.std([1e-3, 3e-3, 2e-3]))
    frame = r.to_frame()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame["seconds"]) == [1e-3, 3e-3, 2e-3] and set(frame["function"]) == {"add_one"}
    assert "mean 2 ms" in repr(r) and "3 repeats" in repr(r)
    with pytest.raises(ValueError):
        BenchmarkResult([])


def test_benchmark_result_plot():
    import matplotlib

    matplotlib.use("Agg")
    ax = BenchmarkResult([1e-6, 2e-6], name="k").plot()
    assert ax.get_ylabel() == "time per call (µs)"


# -- TVM's signature, positional arguments included ---------------------------------------------
def test_signature_is_tvms():
    params = list(inspect.signature(RemoteModule.time_evaluator).parameters.values())[1:]
    assert [(p.name, p.default) for p in params[:-1]] == TVM_SIGNATURE
    assert params[-1].name == "progress" and params[-1].kind is inspect.Parameter.KEYWORD_ONLY
    fn_params = list(inspect.signature(RemoteFunction.time_evaluator).parameters.values())[1:]
    assert [(p.name, p.default) for p in fn_params[:-1]] == TVM_SIGNATURE[1:]


def test_signature_matches_installed_tvm():
    tvm = pytest.importorskip("tvm")
    theirs = list(inspect.signature(tvm.runtime.Module.time_evaluator).parameters.values())[1:]
    assert [(p.name, p.default) for p in theirs] == TVM_SIGNATURE


def test_positional_arguments_in_tvms_order(mod, remote):
    dev = remote.cpu()
    a = runtime.tensor(np.zeros(8, "float32"), dev)
    b = runtime.empty((8,), "float32", dev)
    assert len(mod.time_evaluator("add_one", dev, 2, 3)(a, b).results) == 3  # number, repeat
    assert len(mod.time_evaluator("add_one", dev, np.int64(2), np.int32(2), np.float32(0.5))(a, b).results) == 2
    with pytest.raises(ValueError, match="cache_flush_bytes must be an int"):
        mod.time_evaluator("add_one", dev, 1, 1, 0, 100, 0, 1, "workbench.nop")  # f_preproc is the 10th


def test_f_preproc_positional_runs_before_each_repeat(probed):
    fn = probed.get_function("probe.count")
    t = runtime.tensor(np.ones(4, "float32"), probed.cpu())
    result = fn.time_evaluator(probed.cpu(), 2, 3, 0, 100, 0, 1, 0, "probe.pre")(t, 7)
    assert len(result.results) == 3
    seen = record(probed)
    # one warm-up call, then each repeat: f_preproc (with the same 2 arguments), then 2 calls
    assert [(calls, nargs) for calls, _, _, nargs in seen["pre"]] == [(1, 2), (3, 2), (5, 2)]
    assert seen["calls"] == 1 + 3 * 2


def test_min_repeat_ms_makes_each_repeat_last_that_long(probed):
    fn = probed.get_function("probe.count")
    result = fn.time_evaluator(probed.cpu(), number=1, repeat=2, min_repeat_ms=30)()
    calls = record(probed)["calls"] - 1  # without the warm-up
    # each repeat reports seconds / n for the n calls of its last run, which lasted >= 30 ms: n >= 0.03 / result
    needed = sum(0.030 / r for r in result.results)
    assert calls >= 0.999 * needed, (calls, result.results)


def test_cooldown_pauses_between_repeats(probed):
    fn = probed.get_function("probe.count")
    start = time.monotonic()
    fn.time_evaluator(probed.cpu(), number=1, repeat=3, cooldown_interval_ms=150, f_preproc="probe.pre")()
    assert time.monotonic() - start >= 2 * 0.150
    clock = [at for _, _, at, _ in record(probed)["pre"]]
    assert all(b - a >= 0.149 for a, b in zip(clock, clock[1:])), clock  # on the device's clock

    fn.time_evaluator(probed.cpu(), number=1, repeat=4, cooldown_interval_ms=150, repeats_to_cooldown=2,
                      f_preproc="probe.pre")()
    clock = [at for _, _, at, _ in record(probed)["pre"]]
    assert clock[2] - clock[1] >= 0.149, clock  # the pause after every second repeat


def test_cache_flush_bytes_flushes_on_the_device_before_each_repeat(probed, kernels):
    probed.upload(kernels["so"])
    mod = probed.load_module("kernels.so")
    dev = probed.cpu()
    a = runtime.tensor(np.ones(64, "float32"), dev)
    b = runtime.empty((64,), "float32", dev)
    mod.time_evaluator("add_one", dev, number=5, repeat=3, cache_flush_bytes=1 << 20, f_preproc="probe.pre")(a, b)
    seen = record(probed)
    assert seen["flushes"] == [3, 3 << 20]  # in C, next to the kernel; not on the warm-up call
    assert [flushes for _, flushes, _, _ in seen["pre"]] == [0, 1, 2]  # f_preproc, then the flush, each repeat
    np.testing.assert_array_equal(b.numpy(), 2)

    fn = probed.get_function("probe.count")  # a Python function: the same, through the timer
    fn.time_evaluator(dev, number=2, repeat=2, cache_flush_bytes=4096, f_preproc="probe.pre")()
    seen = record(probed)
    assert seen["flushes"] == [3 + 2, (3 << 20) + 2 * 4096]
    assert [flushes for _, flushes, _, _ in seen["pre"]] == [3, 4]
    mod.time_evaluator("add_one", dev, number=5, repeat=3)(a, b)
    assert record(probed)["flushes"] == [5, (3 << 20) + 2 * 4096]  # none unless asked for


@pytest.mark.parametrize("value, error", [
    (1 << 31, "cache_flush_bytes must be in 0..1073741824"), (-1, "must be in 0..1073741824"),
    (1.5, "cache_flush_bytes must be an int"), (True, "must be an int"),
])
def test_cache_flush_bytes_is_bounded(mod, remote, value, error):
    dev = remote.cpu()
    with pytest.raises(ValueError, match=error):
        mod.time_evaluator("add_one", dev, cache_flush_bytes=value)
    fn = mod["add_one"]
    with pytest.raises(BadRequestError, match=error):  # the device checks too, before it allocates anything
        remote._request(Kind.TIME_EVAL, [fn._wb_handle, [1, 0], {"cache_flush_bytes": value}, []])
    assert remote.ping()["objects"] >= 2  # the session goes on


@pytest.mark.parametrize("options, error", [
    ({"number": 0}, "number must be in 1..2147483647"),
    ({"number": "10"}, "number must be an int"),
    ({"repeat": 1 << 40}, "repeat must be in 1..2147483647"),
    ({"min_repeat_ms": float("nan")}, "min_repeat_ms must be in 0..2147483647"),
    ({"min_repeat_ms": float("inf")}, "min_repeat_ms must be in"),
    ({"cooldown_interval_ms": -1}, "cooldown_interval_ms must be in"),
    ({"repeats_to_cooldown": 0}, "repeats_to_cooldown must be in 1"),
    ({"limit_zero_time_iterations": None}, "limit_zero_time_iterations must be an int"),
    ({"f_preproc": 5}, "f_preproc names a registered function"),
    ({"bogus": 1}, "unknown time_evaluator options: \\['bogus'\\]"),
])
def test_time_eval_options_are_checked_on_both_sides(mod, remote, options, error):
    fn = mod["add_one"]
    with pytest.raises(BadRequestError, match=error) as info:
        remote._request(Kind.TIME_EVAL, [fn._wb_handle, [1, 0], options, []])
    assert "Traceback" not in str(info.value)
    if "bogus" not in options:
        with pytest.raises(ValueError, match=error):
            fn.time_evaluator(remote.cpu(), **options)
    assert remote.ping()["objects"] >= 2
