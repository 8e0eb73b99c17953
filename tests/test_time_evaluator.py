"""time_evaluator and BenchmarkResult."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from workbench import runtime
from workbench.errors import RemoteNotFoundError
from workbench.results import BenchmarkResult
from workbench.runtime.timer import time_repeats


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
