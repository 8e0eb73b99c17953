"""ResultLog (workbench.results.log) and the rich display of BenchmarkResult."""
from __future__ import annotations

import sys
import threading

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from workbench import rpc, runtime  # noqa: E402
from workbench.results import BenchmarkResult, ResultLog, default_log, format_seconds  # noqa: E402
from workbench.results.log import COLUMNS  # noqa: E402

from .conftest import assert_clean  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def hand_built(name: str, times, number=None, device: str = "cpu(0)") -> BenchmarkResult:
    config = {} if number is None else {"number": number, "repeat": len(times), "min_repeat_ms": 0}
    return BenchmarkResult(times, name=name, device=device, config=config)


def tick_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels()]


# -- format_seconds and describe -------------------------------------------------------------------
def test_format_seconds_picks_the_unit():
    assert format_seconds(1.234e-6) == "1.23 µs"
    assert format_seconds(4.56e-8) == "45.6 ns"
    assert format_seconds(2.5e-3) == "2.5 ms"
    assert format_seconds(1.2) == "1.2 s"
    assert format_seconds(1.23456e-3, precision=5) == "1.2346 ms"
    assert format_seconds(0) == "0 ns"
    assert format_seconds(999.96e-6) == "1 ms"  # rounding carries into the next unit
    assert format_seconds(4321.0) == "4321 s"  # no exponent notation
    with pytest.raises(ValueError, match="precision"):
        format_seconds(1.0, precision=0)


def test_describe_in_timeit_style():
    r = hand_built("add_one", [1e-6, 2e-6, 3e-6], number=1000)
    assert r.describe() == "2 µs ± 816 ns per call (mean ± std. dev. of 3 runs, 1000 calls each)"
    single = hand_built("k", [2.5e-3], number=1)
    assert single.describe() == "2.5 ms ± 0 ns per call (mean ± std. dev. of 1 run, 1 call each)"
    assert BenchmarkResult([1.0, 3.0]).describe() == "2 s ± 1 s per call (mean ± std. dev. of 2 runs)"
    grown = BenchmarkResult([1.0, 3.0], config={"number": 1, "min_repeat_ms": 100})  # the device raised number
    assert grown.describe().endswith("(mean ± std. dev. of 2 runs, each at least 1 call and 100 ms)")


def test_benchmark_result_repr_and_plot_use_micro_sign():
    r = hand_built("k", [1e-6, 2e-6])
    assert "mean 1.5 µs" in repr(r) and "2 repeats" in repr(r)
    ax = r.plot()
    assert ax.get_ylabel() == "time per call (µs)"
    assert len(ax.patches) == 2


def test_benchmark_result_html_has_numbers_and_sparkline():
    r = hand_built("add_one", [1e-3, 3e-3, 2e-3], number=10)
    page = r._repr_html_()
    for text in ("add_one", "cpu(0)", "mean (ms)", ">2<", ">1<", ">3<", ">0.8165<", ">10<"):  # the unit in the header
        assert text in page, text
    assert "<svg" in page and page.count("<circle") == 3
    assert r.describe() in page


def test_html_escapes_names():
    page = hand_built("<script>", [1e-3])._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page


# -- the frame --------------------------------------------------------------------------------------
def test_empty_log_has_stable_columns():
    log = ResultLog()
    assert len(log) == 0
    assert list(log.frame.columns) == list(COLUMNS)
    assert list(log.summary().columns) == [
        "run", "function", "key", "server", "mean", "std", "min", "median", "max", "repeats", "number"
    ]
    assert "0 runs" in repr(log)
    assert "time something first" in log._repr_html_()


def test_hand_built_results_without_session():
    log = ResultLog()
    rows = log.add(hand_built("add_one", [1e-3, 2e-3, 3e-3], number=10), variant="baseline")
    assert len(rows) == 3 and len(log) == 3
    frame = log.frame
    assert list(frame.columns) == list(COLUMNS) + ["variant"]
    assert list(frame["repeat"]) == [0, 1, 2] and set(frame["repeats"]) == {3}
    assert list(frame["seconds"]) == [1e-3, 2e-3, 3e-3]
    row = frame.iloc[0]
    assert (row["run"], row["function"], row["device"], row["number"], row["variant"]) == (
        1, "add_one", "cpu(0)", 10, "baseline"
    )
    for column in ("key", "server", "arch", "target", "shapes", "dtypes"):
        assert row[column] == "", column
    assert isinstance(row["time"], pd.Timestamp)
    assert frame["time"].nunique() == 1  # one timestamp per add

    log.add(hand_built("mul", [5e-6]))  # no number in its config, no extra
    frame = log.frame
    assert list(frame["run"]) == [1, 1, 1, 2]
    assert pd.isna(frame["number"].iloc[3]) and pd.isna(frame["variant"].iloc[3])
    assert frame["time"].iloc[3] >= frame["time"].iloc[0]


def test_frame_is_a_copy():
    log = ResultLog()
    log.add(hand_built("k", [1e-3]))
    mine = log.frame
    mine["seconds"] = 99.0
    mine.loc[0, "function"] = "changed"
    assert log.frame["function"].tolist() == ["k"]
    assert list(log.frame["seconds"]) == [1e-3]


def test_add_rejects_what_it_cannot_log():
    log = ResultLog()
    with pytest.raises(TypeError, match="BenchmarkResult"):
        log.add([1e-3, 2e-3])
    with pytest.raises(ValueError, match="seconds"):
        log.add(hand_built("k", [1e-3]), seconds=1)
    assert len(log) == 0


def test_clear_keeps_run_numbers_increasing():
    log = ResultLog()
    log.add(hand_built("k", [1e-3]), x=1)
    log.clear()
    assert len(log) == 0 and list(log.frame.columns) == list(COLUMNS)
    log.add(hand_built("k", [1e-3, 2e-3]))
    assert set(log.frame["run"]) == {2}


def test_context_from_a_real_session(mod, remote):
    dev = remote.cpu()
    a = runtime.tensor(np.ones(1024, "float32"), dev)
    b = runtime.empty((1024,), "float32", dev)
    m = runtime.tensor(np.ones((16, 3), "float32"), dev)
    n = runtime.empty((16, 3), "float32", dev)
    log = ResultLog()
    rows = log.add(mod.time_evaluator("add_one", dev, number=3, repeat=4)(a, b), session=remote, args=(a, b))
    log.add(mod.time_evaluator("scale_shift", dev, number=2, repeat=2)(m, 2.0, 3, n), session=remote,
            args=(m, 2.0, 3, n), size=48)
    assert len(rows) == 4 and len(log) == 6
    frame = log.frame
    first, second = frame[frame["run"] == 1], frame[frame["run"] == 2]
    assert set(first["function"]) == {"add_one"} and set(second["function"]) == {"scale_shift"}
    assert set(frame["server"]) == {remote.address} and remote.address.startswith("127.0.0.1:")
    assert set(frame["key"]) == {""}  # the fixture's server has no key
    assert set(frame["arch"]) == {remote.info["arch"]}
    assert set(frame["target"]) == {remote.info.get("target", "")}
    assert set(first["shapes"]) == {"1024;1024"} and set(first["dtypes"]) == {"float32;float32"}
    assert set(second["shapes"]) == {"16x3;float;int;16x3"}
    assert set(second["dtypes"]) == {"float32;float;int;float32"}
    assert list(first["number"]) == [3] * 4 and list(second["number"]) == [2] * 2
    assert list(first["repeat"]) == [0, 1, 2, 3] and set(first["repeats"]) == {4}
    assert (frame["seconds"] > 0).all()
    assert set(first["size"].isna()) == {True} and set(second["size"]) == {48}
    np.testing.assert_array_equal(n.numpy(), 5)  # the kernel really ran

    summary = log.summary()
    assert list(summary["run"]) == [1, 2]
    assert list(summary["repeats"]) == [4, 2] and list(summary["number"]) == [3, 2]
    add_one = summary.iloc[0]
    assert add_one["mean"] == pytest.approx(first["seconds"].mean())
    assert add_one["min"] <= add_one["median"] <= add_one["max"]


def test_key_and_target_from_the_session(private_tmpdir):
    with rpc.Server(port=0, key="board", silent=True) as srv:
        sess = rpc.connect("127.0.0.1", srv.port, key="board")
        try:
            result = sess.get_function("workbench.sleep").time_evaluator(sess.cpu(), number=1, repeat=2)(0.0)
            log = ResultLog()
            log.add(result, session=sess, args=(0.0,))
            frame = log.frame
            assert set(frame["key"]) == {"board"} and set(frame["server"]) == {f"127.0.0.1:{srv.port}"}
            assert set(frame["function"]) == {"workbench.sleep"} and set(frame["shapes"]) == {"float"}
            ax = log.plot("bar")
            assert tick_texts(ax) == ["workbench.sleep @ board"]  # the key names the group
        finally:
            sess.close()
        assert_clean(srv, private_tmpdir)

    local = rpc.LocalSession()
    local.info["target"] = "x86_64-linux-gnu"  # what a server that knows its triple publishes
    log = ResultLog()
    log.add(hand_built("k", [1e-3]), session=local)
    row = log.frame.iloc[0]
    assert (row["server"], row["key"], row["target"]) == ("local", "", "x86_64-linux-gnu")
    local.close()


# -- summary, repr, html ----------------------------------------------------------------------------
def filled_log() -> ResultLog:
    log = ResultLog()
    log.add(hand_built("add_one", [1e-6, 2e-6, 3e-6], number=100), n=1024)
    log.add(hand_built("add_one", [4e-6, 6e-6], number=100), n=4096)
    log.add(hand_built("matmul", [2e-5], number=10))
    return log


def test_summary_one_row_per_run():
    summary = filled_log().summary()
    assert list(summary.columns) == [
        "run", "function", "key", "server", "n", "mean", "std", "min", "median", "max", "repeats", "number"
    ]
    assert list(summary["run"]) == [1, 2, 3]
    assert list(summary["function"]) == ["add_one", "add_one", "matmul"]
    assert summary["mean"].tolist() == pytest.approx([2e-6, 5e-6, 2e-5])
    assert summary["std"].tolist() == pytest.approx([np.std([1e-6, 2e-6, 3e-6]), 1e-6, 0.0])
    assert summary["min"].tolist() == pytest.approx([1e-6, 4e-6, 2e-5])
    assert summary["max"].tolist() == pytest.approx([3e-6, 6e-6, 2e-5])
    assert summary["median"].tolist() == pytest.approx([2e-6, 5e-6, 2e-5])
    assert list(summary["repeats"]) == [3, 2, 1] and list(summary["number"]) == [100, 100, 10]


def test_repr_and_html():
    log = filled_log()
    text = repr(log)
    assert text.startswith("<ResultLog: 3 runs, 6 timings>")
    assert "run 1: add_one: 2 µs ± 816 ns (3 repeats)" in text
    page = log._repr_html_()
    assert "3 runs, 6 timings" in page
    assert "mean (µs)" in page and "median (µs)" in page and "std (ns)" in page  # one unit per column
    for number in (">2<", ">5<", ">20<", ">816.5<", ">1024<", ">4096<"):
        assert number in page, number
    assert page.count("<svg") == 3  # a sparkline per run
    assert "&lt;NA&gt;" not in page and "<NA>" not in page


def test_csv_round_trip(tmp_path):
    log = filled_log()
    path = log.to_csv(tmp_path / "results.csv")
    back = pd.read_csv(path, keep_default_na=False)
    assert list(back.columns) == list(log.frame.columns)
    assert back["seconds"].tolist() == pytest.approx(log.frame["seconds"].tolist())
    assert back["function"].tolist() == log.frame["function"].tolist()
    assert back["run"].tolist() == [1, 1, 1, 2, 2, 3]


def test_parquet_round_trip(tmp_path):
    log = filled_log()
    path = log.to_parquet(tmp_path / "results.parquet")
    back = pd.read_parquet(path)
    pd.testing.assert_frame_equal(back, log.frame, check_dtype=False)
    assert back["number"].tolist() == [100] * 5 + [10]


def test_parquet_without_an_engine_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if neither engine were installed
    monkeypatch.setitem(sys.modules, "fastparquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        filled_log().to_parquet(tmp_path / "results.parquet")
    assert not (tmp_path / "results.parquet").exists()


# -- plots ------------------------------------------------------------------------------------------
def test_box_plot_one_box_per_group(mod, remote):
    dev = remote.cpu()
    a = runtime.tensor(np.ones(4096, "float32"), dev)
    b = runtime.empty((4096,), "float32", dev)
    log = ResultLog()
    for _ in range(2):  # two runs of the same function on the same server: one group
        log.add(mod.time_evaluator("add_one", dev, number=2, repeat=3)(a, b), session=remote, args=(a, b))
    log.add(mod.time_evaluator("add_one_any", dev, number=2, repeat=3)(a, b), session=remote, args=(a, b))
    log.add(hand_built("offline", [1e-6, 2e-6]))
    ax = log.plot("box")
    assert len(ax.patches) == 3  # one box per (function, key or server)
    assert tick_texts(ax) == [f"add_one @ {remote.address}", f"add_one_any @ {remote.address}", "offline"]
    unit = ax.get_ylabel()
    assert unit.startswith("time per call (") and unit[len("time per call ("):-1] in ("ns", "µs", "ms", "s")
    assert ax.get_title()
    assert all(t.get_rotation() == 30 for t in ax.get_xticklabels())  # long labels are turned


def test_plot_splits_a_function_timed_at_several_shapes(mod, remote):
    dev = remote.cpu()
    log = ResultLog()
    for n in (1024, 4096):
        a = runtime.tensor(np.ones(n, "float32"), dev)
        b = runtime.empty((n,), "float32", dev)
        log.add(mod.time_evaluator("add_one", dev, number=2, repeat=3)(a, b), session=remote, args=(a, b))
    ax = log.plot("box")
    assert len(ax.patches) == 2
    assert tick_texts(ax) == [f"add_one @ {remote.address} [1024;1024]", f"add_one @ {remote.address} [4096;4096]"]


def test_bar_plot_means_with_error_bars():
    log = filled_log()
    ax = log.plot(kind="bar")
    assert ax.get_ylabel() == "time per call (µs)"
    assert tick_texts(ax) == ["add_one", "matmul"]
    bars = [c for c in ax.containers if isinstance(c, matplotlib.container.BarContainer)]
    assert len(bars) == 1 and len(bars[0]) == 2
    heights = [p.get_height() for p in bars[0]]
    assert heights == pytest.approx([np.mean([1, 2, 3, 4, 6]), 20])  # µs, the repeats of both runs pooled
    assert bars[0].errorbar is not None
    (segments,) = bars[0].errorbar.lines[2]
    spans = [abs(seg[1][1] - seg[0][1]) / 2 for seg in segments.get_segments()]
    assert spans == pytest.approx([np.std([1, 2, 3, 4, 6]), 0])
    assert ax.get_title()


def test_plot_on_given_axes_and_in_ms():
    log = ResultLog()
    log.add(hand_built("slow", [2e-3, 4e-3]))
    fig, ax = plt.subplots()
    assert log.plot("box", ax=ax) is ax
    assert ax.get_ylabel() == "time per call (ms)"
    assert tick_texts(ax) == ["slow"] and ax.get_xticklabels()[0].get_rotation() == 0


def test_plot_errors():
    log = ResultLog()
    with pytest.raises(ValueError, match="time something first.*%rpc_time"):
        log.plot()
    log.add(hand_built("k", [1e-3]))
    with pytest.raises(ValueError, match="'box', 'bar'"):
        log.plot(kind="violin")


# -- process-wide log and threads -------------------------------------------------------------------
def test_default_log_is_one_object():
    log = default_log()
    assert isinstance(log, ResultLog) and default_log() is log

    seen = []
    threads = [threading.Thread(target=lambda: seen.append(default_log())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(seen) == 4 and all(s is log for s in seen)


def test_threads_adding_at_once_lose_nothing():
    log = ResultLog()
    threads_n, adds_each = 6, 20
    start = threading.Barrier(threads_n + 1)
    errors: list[BaseException] = []

    def adder(i: int) -> None:
        try:
            start.wait(timeout=10)
            for j in range(adds_each):
                log.add(hand_built(f"f{i}", [1e-6 * (j + 1)] * (j % 3 + 1), number=1), thread=i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def reader() -> None:
        try:
            start.wait(timeout=10)
            for _ in range(adds_each):
                log.summary()
                len(log.frame)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=adder, args=(i,)) for i in range(threads_n)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads)
    frame = log.frame
    expected_rows = threads_n * sum(j % 3 + 1 for j in range(adds_each))
    assert len(log) == len(frame) == expected_rows
    assert sorted(frame["run"].unique()) == list(range(1, threads_n * adds_each + 1))
    for _, run in frame.groupby("run"):
        assert list(run["repeat"]) == list(range(len(run))) and run["thread"].nunique() == 1
    assert frame.groupby("thread").size().tolist() == [expected_rows // threads_n] * threads_n
