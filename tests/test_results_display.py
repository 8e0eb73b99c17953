"""Readable timing results (issue 15, point 4), from real servers and real compiled kernels.

Summaries and rich displays show each time column in one unit named in its
header, with plain numbers; the frame stays in seconds; rows from rpc_run and
local_run say where they ran; ``number`` is the calls each repeat made; a plot
of one kernel is legible.
"""
from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from workbench import cc, rpc  # noqa: E402
from workbench.farm import LocalFarm  # noqa: E402
from workbench.results import BenchmarkResult, ResultLog, default_log  # noqa: E402
from workbench.results.benchmark import time_unit  # noqa: E402
from workbench.results.log import readable  # noqa: E402
from workbench.rpc.server.minrpc import MinRPCServer  # noqa: E402
from workbench.testing import EvaluatorConfig, RPCConfig, local_run, rpc_run  # noqa: E402

from .helpers import ADD_ONE, drop_sessions  # noqa: E402

# spin_ns(n): busy-waits n ns on the monotonic clock, so a run's time per call is known within a unit
SPIN = r"""#include <time.h>
#include <workbench_kernel.h>
static long long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
WB_KERNEL(spin_ns) {
  WB_EXPECT_ARGS(1);
  long long end = now_ns() + WB_ARG_INT(0);
  while (now_ns() < end) {
  }
  return 0;
}
"""
UNIT_SCALE = {"ns": 1e9, "µs": 1e6, "ms": 1e3, "s": 1.0}


@pytest.fixture(scope="module")
def spin_mod(private_tmpdir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("spin") / "spin.so")
    with cc.build(SPIN, name="spin") as mod:
        mod.export_library(path)
    return path


@pytest.fixture
def spin(remote, spin_mod):
    remote.upload(spin_mod, "spin.so")
    return remote.load_module("spin.so")["spin_ns"]


def header_units(table: str) -> dict[str, str]:
    """``{"mean": "µs", ...}`` from the first line of a printed summary."""
    first = table.splitlines()[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"\b(mean|std|min|median|max) \((ns|µs|ms|s)\)", first)}


def column_texts(summary, name: str) -> list[str]:
    shown = readable(summary)
    (column,) = [c for c in shown.columns if c.startswith(f"{name} (")]
    return list(shown[column])


# -- the summary --------------------------------------------------------------------------------------------------
def test_summary_of_microsecond_runs_reads_in_microseconds(remote, spin):
    log = ResultLog()
    result = spin.time_evaluator(remote.cpu(), number=100, repeat=5)(1500)  # about 1.5 µs per call
    log.add(result, session=remote)
    summary = log.summary()
    assert 1.5e-6 <= summary["mean"].iloc[0] < 1e-3  # the frame's numbers stay seconds
    text = repr(summary)
    assert header_units(text)["mean"] == "µs" and header_units(text)["median"] == "µs", text
    assert "e-0" not in text and "e+0" not in text, text  # no exponent notation
    assert len(text.splitlines()) == 2, text  # a header and one row: no wrapped table
    mean = column_texts(summary, "mean")[0]
    assert re.fullmatch(r"\d+(\.\d+)?", mean) and float(mean) == pytest.approx(summary["mean"].iloc[0] * 1e6, rel=5e-3)
    page = summary._repr_html_()
    assert "<th>mean (µs)</th>" in page and f"<td>{mean}</td>" in page
    assert "e-0" not in page
    # the log's own display and the result's too
    assert "mean (µs)" in log._repr_html_()
    assert "(µs)" in result._repr_html_() and "e-0" not in repr(result) and " µs" in repr(result)
    assert str(result) == result.describe() and "100 calls each" in str(result)


def test_mixed_magnitudes_pick_one_unit_per_column(remote, spin):
    log = ResultLog()
    for ns in (1500, 3000, 2_000_000):  # 1.5 µs, 3 µs and 2 ms per call
        log.add(spin.time_evaluator(remote.cpu(), number=3, repeat=3)(ns), session=remote, spin=ns)
    summary = log.summary()
    text = repr(summary)
    units = header_units(text)
    assert set(units) == {"mean", "std", "min", "median", "max"}, text
    assert text.splitlines()[0].count("mean (") == 1  # one unit per column, in its header
    for name in ("mean", "median", "min", "max"):
        assert units[name] == time_unit(float(summary[name].median()))[1] == "µs", (name, text)
        shown = column_texts(summary, name)
        assert all(re.fullmatch(r"\d+(\.\d+)?", cell) for cell in shown), shown
        for cell, seconds in zip(shown, summary[name]):
            assert float(cell) == pytest.approx(seconds * UNIT_SCALE[units[name]], rel=5e-3)
    assert float(column_texts(summary, "mean")[2]) >= 2000  # the 2 ms run reads 2000-odd µs, not 2e+03
    assert "e+0" not in text and "e-0" not in text, text
    assert all(len(line) < 200 for line in text.splitlines()) and len(text.splitlines()) == 4  # no wrapping
    # the tidy frame keeps seconds
    frame = log.frame
    assert "seconds" in frame.columns and not any("(" in c for c in frame.columns)
    assert frame.groupby("spin")["seconds"].median()[2_000_000] >= 2e-3


# -- number: the calls each repeat made ---------------------------------------------------------------------------
def check_grown_number(remote, fn, *args):
    result = fn.time_evaluator(remote.cpu(), number=1, repeat=3, min_repeat_ms=20)(*args)
    assert result.numbers is not None and len(result.numbers) == 3
    assert all(n > 1 for n in result.numbers), result.numbers
    assert result.number == min(result.numbers) > 1
    # each repeat's total (time per call × the calls it made) lasted min_repeat_ms: the device's stop rule
    for per_call, calls in zip(result.results, result.numbers):
        assert per_call * calls >= 0.020 * 0.999, (per_call, calls)
    log = ResultLog()
    rows = log.add(result, session=remote)
    assert list(rows["number"]) == list(result.numbers)
    assert log.summary()["number"].iloc[0] == min(result.numbers)
    assert re.search(rf"\b{result.number}(–\d+)? calls each\)$", result.describe()), result.describe()
    assert "≥" not in result._repr_html_()  # the count is known, not a lower bound
    return result


def test_number_is_the_calls_each_repeat_made(remote, spin):
    check_grown_number(remote, spin, 20_000)  # 20 µs per call, at least 20 ms per repeat: > 1 call


def test_number_from_minrpc(private_tmpdir, spin_mod):
    with MinRPCServer(port=0) as srv:
        sess = rpc.connect("127.0.0.1", srv.port)
        try:
            sess.upload(spin_mod, "spin.so")
            fn = sess.load_module("spin.so")["spin_ns"]
            check_grown_number(sess, fn, 20_000)
        finally:
            sess.close()


def test_a_reply_without_counts_keeps_the_requested_number():
    """A server from before the counts (a reply of floats only): the result knows only what was asked."""
    old = BenchmarkResult([1e-6, 1e-6], config={"number": 1, "min_repeat_ms": 20})
    assert old.numbers is None and old.number == 1
    assert "each at least 1 call and 20 ms" in old.describe() and "≥ 1" in old._repr_html_()


# -- rpc_run and local_run rows say where they ran ----------------------------------------------------------------
def test_rpc_run_and_local_run_rows_carry_key_server_and_target(private_tmpdir):
    x = np.arange(64, dtype="float32")
    config = EvaluatorConfig(number=2, repeat=2, min_repeat_ms=0)
    with LocalFarm({"board": 1}) as farm, cc.build(ADD_ONE, name="add_one") as mod:
        host, port = farm.tracker_addr
        _, remote_result = rpc_run(mod, "cpu", [x, np.zeros_like(x)], config, RPCConfig(host, port, "board"))
        _, local_result = local_run(mod, "cpu", [x, np.zeros_like(x)], config)
    log = ResultLog()
    log.add(remote_result)  # no session given: the result says where it ran
    log.add(local_result)
    frame = log.frame
    remote_rows, local_rows = frame[frame["run"] == 1], frame[frame["run"] == 2]
    assert set(remote_rows["key"]) == {"board"}
    (server,) = set(remote_rows["server"])
    assert re.fullmatch(r"127\.0\.0\.1:\d+", server)
    assert set(local_rows["key"]) == {"local"} and set(local_rows["server"]) == {"local"}
    assert all(frame["target"].str.len() > 0) and all(frame["arch"].str.len() > 0)
    assert list(frame["number"]) == [2, 2, 2, 2]


# -- a plot of one kernel -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["box", "bar"])
def test_one_kernel_plot_is_legible(remote, spin, kind):
    import matplotlib.pyplot as plt

    log = ResultLog()
    log.add(spin.time_evaluator(remote.cpu(), number=20, repeat=5)(2000), session=remote)
    ax = log.plot(kind)
    try:
        width, height = ax.figure.get_size_inches()
        assert width >= 6 and height >= 3.5, (width, height)  # not a thin strip
        (label,) = ax.get_xticklabels()
        assert label.get_text() == f"spin_ns @ {remote.address}"
        assert label.get_rotation() == 0  # horizontal
        left, right = ax.get_xlim()
        assert right - left <= 2  # the single box or bar is centred with room around it, not stretched across
        bbox = ax.get_position()
        assert bbox.width > 0.5 and bbox.height > 0.5  # the axes fill most of the figure
        assert "µs" in ax.get_ylabel()
    finally:
        plt.close(ax.figure)


# -- %rpc_results --summary through a real shell ------------------------------------------------------------------
def test_rpc_results_summary_magic_shows_units(private_tmpdir, spin_mod):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "workbench")
    ip.run_line_magic("rpc_farm", "--servers local=1")
    try:
        ip.run_line_magic("rpc_results", "--clear")  # the shell's log is shared: rows of earlier tests go
        ip.run_line_magic("rpc_connect", "")
        remote = ip.user_ns["remote"]
        remote.upload(spin_mod, "spin.so")
        ip.user_ns["spin"] = remote.load_module("spin.so")["spin_ns"]
        ip.run_line_magic("rpc_time", "spin(1500) -n 50 -r 3 -q")
        summary = ip.run_line_magic("rpc_results", "--summary")
        data, _ = ip.display_formatter.format(summary)
        text, page = data["text/plain"], data["text/html"]
        assert header_units(text)["mean"] == "µs", text
        assert "e-0" not in text and len(text.splitlines()) == 2, text
        assert "local" in text and "spin" in text
        assert "<th>median (µs)</th>" in page
        frame = ip.run_line_magic("rpc_results", "")
        assert frame["seconds"].max() < 1e-3 and "seconds" in frame.columns  # the frame stays seconds
    finally:
        drop_sessions(ip.user_ns)
        default_log().clear()
        ip.run_line_magic("unload_ext", "workbench")
