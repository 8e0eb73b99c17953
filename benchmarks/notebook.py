"""The notebook layer's figures: what the workbench costs a JupyterLab user.

    python benchmarks/run.py                 # prints this "notebook" table after the others
    python benchmarks/notebook.py [--quick]  # this table alone

* load_ext: ``%load_ext workbench`` plus ``import ipywidgets`` in a fresh
  interpreter that has IPython loaded (as a kernel has), wall time;
* rpc_compile: ``%%rpc_compile`` of the quickstart kernel on the embedded farm,
  split into the compiler's time and everything else (writing the source,
  upload, load on the device, binding and display);
* picker poll: one ``DevicePicker.poll_once()`` (SUMMARY and the table update)
  against a tracker with 1000 registered servers;
* rpc_time while polling: ``%rpc_time`` of an empty kernel with and without a
  picker polling that tracker in the background, interleaved; the change of the
  mean per call, and of a plain empty remote call's round trip;
* progress bar: a 256 MiB upload and download with the bar on and off
  (benchmarks/progress.py; the bars drawn to /dev/null here, on stderr there).

Each figure is the median of several runs, with the spread (min to max) and
how many runs met the target. Nothing is asserted; every server ends before it
returns.
"""
from __future__ import annotations

import contextlib
import io
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from workbench.demo import ADD_ONE_C

if __package__:
    from . import harness
    from . import progress as progress_bench
    from . import tracker as tracker_bench
else:  # run as a script: this directory is sys.path[0]
    import harness
    import progress as progress_bench
    import tracker as tracker_bench

QUICKSTART_KERNEL = ADD_ONE_C + "\nWB_KERNEL(empty) { return 0; }\n"  # the demo's kernel, and an empty one

LOAD_EXT = (
    "import time, IPython\n"
    "from IPython.core.interactiveshell import InteractiveShell\n"
    "ip = InteractiveShell.instance()\n"
    "t = time.perf_counter()\n"
    "ip.run_line_magic('load_ext', 'workbench')\n"
    "import ipywidgets\n"
    "print(time.perf_counter() - t)\n"
)


def spread(values: list[float], target: Callable[[float], bool]) -> dict[str, Any]:
    return {
        "median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values),
        "met": sum(map(target, values)), "values": values,
    }


def measure_load_ext(runs: int) -> dict[str, Any]:
    seconds = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", LOAD_EXT], capture_output=True, text=True, timeout=60)
        if proc.returncode:
            raise RuntimeError(f"load_ext failed: {proc.stderr.strip()[-500:]}")
        seconds.append(float(proc.stdout.strip().splitlines()[-1]))
    return spread(seconds, lambda s: s < 1.0)


@contextlib.contextmanager
def shell_on_farm(servers: dict[str, int]):
    from IPython.core.interactiveshell import InteractiveShell

    from workbench.farm import start_farm, stop_farm

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "workbench")
    start_farm(servers)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ip.run_line_magic("rpc_connect", "")
        yield ip
    finally:
        remote = ip.user_ns.pop("remote", None)
        if remote is not None:
            remote.close()
        stop_farm()


def measure_compile(ip: Any, runs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    magics = ip.magics_manager.registry["WorkbenchMagics"]
    compiler, rest = [], []
    for i in range(runs + 1):
        with contextlib.redirect_stdout(io.StringIO()):
            start = time.perf_counter()
            ip.run_cell_magic("rpc_compile", "quick", QUICKSTART_KERNEL)
            total = time.perf_counter() - start
        if i:  # the first run warms the compiler's and the server's caches
            compiler.append(magics.last_compile_timings["compile"])
            rest.append(total - magics.last_compile_timings["compile"])
    return spread(compiler, lambda s: True), spread(rest, lambda s: s < 0.050)


@contextlib.contextmanager
def tracker_with(n: int):
    """A Tracker with ``n`` registered server entries (raw registrations, as benchmarks/tracker.py makes them)."""
    from workbench import rpc

    harness.ensure_fd_limit(n + 256)
    tracker = rpc.Tracker(port=0, silent=True)
    population = tracker_bench.Population(tracker.port)
    try:
        population.grow(n)
        yield tracker
    finally:
        population.close()
        tracker.terminate()


def measure_picker_poll(tracker_port: int, polls: int) -> dict[str, Any]:
    from workbench.notebook import DevicePicker

    picker = DevicePicker(("127.0.0.1", tracker_port), interval=3600, namespace={})
    try:
        picker.poll_once()  # builds the rows once; later polls update what changed
        seconds = []
        for _ in range(polls):
            start = time.perf_counter()
            summary = picker.poll_once()
            seconds.append(time.perf_counter() - start)
        if len(summary["server_info"]) < 1000:
            raise RuntimeError(f"the tracker lists {len(summary['server_info'])} servers, not 1000")
    finally:
        picker.close()
    return spread(seconds, lambda s: s < 0.010)


def measure_time_while_polling(ip: Any, tracker_port: int, runs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """%rpc_time of an empty kernel and an empty remote call, each with and without a picker polling, interleaved."""
    from workbench.notebook import DevicePicker

    remote = ip.user_ns["remote"]
    ip.user_ns["wb_empty"] = ip.user_ns["quick"]["empty"]
    changes, ping_changes = [], []
    for i in range(runs):
        figures: dict[bool, tuple[float, float]] = {}
        for polling in ((True, False) if i % 2 else (False, True)):
            picker = DevicePicker(("127.0.0.1", tracker_port), interval=0.25, namespace={}) if polling else None
            try:
                if picker is not None:
                    picker.poll_once()
                with contextlib.redirect_stdout(io.StringIO()):
                    result = ip.run_line_magic("rpc_time", "wb_empty() -r 5 --min-repeat-ms 50 -o -q")
                pings = []
                for _ in range(300):
                    start = time.perf_counter()
                    remote.ping()
                    pings.append(time.perf_counter() - start)
                figures[polling] = (result.mean, statistics.median(pings))
            finally:
                if picker is not None:
                    picker.close()
        changes.append((figures[True][0] / figures[False][0] - 1) * 100)
        ping_changes.append((figures[True][1] / figures[False][1] - 1) * 100)
    return spread(changes, lambda p: abs(p) < 5), spread(ping_changes, lambda p: True)


def measure(quick: bool = False) -> dict[str, Any]:
    runs = 3 if quick else 7
    figures: dict[str, Any] = {"load_ext_s": measure_load_ext(runs)}
    with shell_on_farm({"local": 1}) as ip:
        figures["compile_s"], figures["compile_rest_s"] = measure_compile(ip, runs)
        with tracker_with(1000) as tracker:
            figures["picker_poll_s"] = measure_picker_poll(tracker.port, 20 if quick else 50)
            figures["rpc_time_change_pct"], figures["ping_change_pct"] = measure_time_while_polling(
                ip, tracker.port, runs)
    # the bars are drawn all the same, to /dev/null: hundreds of them on stderr would bury the report's tables
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        progress = progress_bench.progress_overhead(runs=3 if quick else 5, size=(64 if quick else 256) << 20)
    for direction in ("upload", "download"):
        p = progress[direction]
        figures[f"progress_{direction}_pct"] = {
            "median": p["median_percent"], "min": p["min_percent"], "max": p["max_percent"],
            "runs": len(p["overhead_percent"]), "met": p["runs_under_target"], "values": p["overhead_percent"],
        }
    figures["progress_size_mib"] = progress["size_bytes"] >> 20
    return figures


ROWS = [
    ("%load_ext workbench (+ ipywidgets)", "load_ext_s", 1e3, "ms", "< 1000 ms"),
    ("%%rpc_compile: compiler", "compile_s", 1e3, "ms", "-"),
    ("%%rpc_compile: everything else", "compile_rest_s", 1e3, "ms", "< 50 ms"),
    ("picker poll, 1000 servers", "picker_poll_s", 1e3, "ms", "< 10 ms"),
    ("%rpc_time empty kernel, picker polling", "rpc_time_change_pct", 1, "% change", "|x| < 5 %"),
    ("empty remote call, picker polling", "ping_change_pct", 1, "% change", "-"),
    ("progress bar, upload", "progress_upload_pct", 1, "% overhead", "< 2 %"),
    ("progress bar, download", "progress_download_pct", 1, "% overhead", "< 2 %"),
]


def report(figures: dict[str, Any]) -> str:
    header = ["notebook layer", "median", "min", "max", "unit", "target", "met in"]
    rows = []
    for label, key, scale, unit, target in ROWS:
        f = figures[key]
        met = f"{f['met']}/{f['runs']}" if target != "-" else "-"
        rows.append([label, f"{f['median'] * scale:.3g}", f"{f['min'] * scale:.3g}", f"{f['max'] * scale:.3g}",
                     unit, target, met])
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(f"(progress bar on a {figures['progress_size_mib']} MiB transfer, drawn to /dev/null; "
               "a target is met when most runs meet it)")
    return "\n".join(out)


def measure_notebook(quick: bool = False) -> tuple[str, dict[str, Any]]:
    figures = measure(quick)
    return report(figures), figures


def main(argv: list[str] | None = None) -> int:
    return harness.section_main(argv, "notebook.py", __doc__, "fewer runs and a 64 MiB transfer",
                                lambda args: measure_notebook(args.quick))


if __name__ == "__main__":
    sys.exit(main())
