"""What a progress bar costs a large transfer: 256 MiB uploads and downloads to a real local Server, bar on vs off.

    python benchmarks/progress.py                 # 5 runs of 256 MiB
    python benchmarks/progress.py --runs 9 --size-mib 512 --json out.json

Each run times PAIRS_PER_RUN transfers with the bar and as many without, in
alternating order (on/off, then off/on, ...), so that the machine's drift
weighs on both alike; the run's overhead is min(on) / min(off) - 1 (the
fastest of several transfers is the one least disturbed by other work on the
machine). The bar goes to stderr, as a user in a terminal sees it (tqdm.auto's
console bar). The report gives, per direction, the median and the spread (min,
max) of the overhead over the runs, and whether it stays under 2 % in most runs.

A transfer's bar appears only once the transfer has lasted
``workbench.progress.SHOW_AFTER`` (0.2 s); loopback transfers of 256 MiB may
end sooner, so the timed runs set it to 0: every bar is created and drawn,
the worst case.

End-to-end differences of a few percent drown in loopback noise on a busy
machine, so the report also times the bar's own work for one transfer (open,
one update per 8 MiB chunk, close; drawn to stderr) and gives it as a share
of the median transfer without a bar: the cost with the noise taken out; and
the same for a transfer that ends before SHOW_AFTER (counting only, no bar).
Nothing is asserted: this is a report. The server is ended before it returns.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import time
from typing import Any, Callable, Iterator

if __package__:
    from . import harness
else:  # run as a script: this directory is sys.path[0]
    import harness

TARGET_PERCENT = 2.0
PAIRS_PER_RUN = 5
BAR_REPS = 200  # bar-only repetitions for the direct cost
BUDGET_S = 120.0  # wall-clock cap of the timing loop: the runs stop once it is spent
SOURCE = "progress-source.bin"


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@contextlib.contextmanager
def show_after(seconds: float) -> Iterator[None]:
    """Transfer bars appear after ``seconds`` inside the block."""
    from workbench import progress

    saved = progress.SHOW_AFTER
    progress.SHOW_AFTER = seconds
    try:
        yield
    finally:
        progress.SHOW_AFTER = saved


def bar_work_s(size: int, reps: int = BAR_REPS, shown: bool = True) -> float:
    """Median seconds of what a bar does for one ``size``-byte transfer, without the transfer
    (``shown=False``: a transfer that ends before the bar would appear)."""
    from workbench.progress import chunk_slices, transfer_bar

    times = []
    with show_after(0.0 if shown else 3600.0):
        for _ in range(reps):
            start = time.perf_counter()
            with transfer_bar(size, "upload bar-only.bin", progress=True) as update:
                for _part in chunk_slices(size, update):
                    pass
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _summary(on: list[list[float]], off: list[list[float]], bar_s: float, count_s: float) -> dict[str, Any]:
    """Per-run overheads in percent and their median, spread and pass count; the bar's own share."""
    overheads = [(min(a) / min(b) - 1) * 100 for a, b in zip(on, off)]
    under = sum(o < TARGET_PERCENT for o in overheads)
    typical_off = statistics.median(s for run in off for s in run)
    return {
        "on_s": on,
        "off_s": off,
        "bar_work_s": bar_s,
        "bar_work_percent": bar_s / typical_off * 100,
        "count_work_s": count_s,
        "count_work_percent": count_s / typical_off * 100,
        "overhead_percent": overheads,
        "median_percent": statistics.median(overheads),
        "min_percent": min(overheads),
        "max_percent": max(overheads),
        "runs_under_target": under,
        "passed": under > len(overheads) / 2,
    }


def progress_overhead(runs: int = 5, size: int = 256 * harness.MIB, budget_s: float = BUDGET_S) -> dict[str, Any]:
    """Time ``runs`` runs of ``size``-byte uploads and downloads to a local Server with the bar on and off.

    Returns ``{"size_bytes", "runs", "target_percent", "stderr_is_tty", "upload": {...}, "download": {...}}``,
    each direction with the seconds of every transfer, the per-run overheads in percent, their
    median, min and max, how many runs stayed under the target and whether most did.

        >>> figures = progress_overhead(runs=3)                  # doctest: +SKIP
        >>> figures["upload"]["median_percent"] < 2              # doctest: +SKIP
        True
    """
    import numpy as np

    from workbench import rpc

    if runs < 1:
        raise ValueError(f"runs must be >= 1, not {runs}")
    data = np.random.default_rng(0).bytes(size)
    uploads = itertools.count()
    times: dict[str, dict[bool, list[list[float]]]] = {op: {True: [], False: []} for op in ("upload", "download")}
    server = rpc.Server(host=harness.HOST, port=0, silent=True)
    try:
        remote = rpc.connect(harness.HOST, server.port)
        try:
            remote.upload(data, target=SOURCE, progress=False)

            def upload(progress: bool) -> float:
                name = f"upload-{next(uploads)}.bin"  # a new file: replacing one adds the cost of freeing it
                seconds = _timed(lambda: remote.upload(data, target=name, progress=progress))
                remote.remove(name)
                return seconds

            def download(progress: bool) -> float:
                return _timed(lambda: remote.download(SOURCE, progress=progress))

            ops = {"upload": upload, "download": download}
            with show_after(0.0):  # every bar drawn, however fast the transfer
                for op in ops.values():  # warm-up: page cache, socket buffers, the first bar's imports
                    op(True)
                    op(False)
                deadline = time.perf_counter() + budget_s
                for run in range(runs):
                    for name, op in ops.items():
                        per_run: dict[bool, list[float]] = {True: [], False: []}
                        for pair in range(PAIRS_PER_RUN):
                            order = (True, False) if (run + pair) % 2 == 0 else (False, True)
                            for progress in order:
                                per_run[progress].append(op(progress))
                        for progress, seconds in per_run.items():
                            times[name][progress].append(seconds)
                    if time.perf_counter() > deadline:
                        break
        finally:
            remote.close()
    finally:
        server.terminate()
    bar_s, count_s = bar_work_s(size), bar_work_s(size, shown=False)
    return {
        "size_bytes": size,
        "runs": len(times["upload"][True]),
        "pairs_per_run": PAIRS_PER_RUN,
        "target_percent": TARGET_PERCENT,
        "stderr_is_tty": sys.stderr.isatty(),
        **{op: _summary(t[True], t[False], bar_s, count_s) for op, t in times.items()},
    }


def report(figures: dict[str, Any]) -> str:
    size = figures["size_bytes"] // harness.MIB
    lines = [
        f"progress-bar overhead: {size} MiB transfers to a local Server, {figures['runs']} runs of "
        f"{figures['pairs_per_run']} on/off pairs (interleaved), bar on stderr"
        + ("" if figures["stderr_is_tty"] else " (not a terminal: tqdm draws all the same)"),
        "",
        f"{'transfer':<10}{'off MiB/s':>11}{'on MiB/s':>10}{'median':>9}{'min':>9}{'max':>9}"
        f"{'runs < ' + format(figures['target_percent'], 'g') + '%':>12}  result  {'bar work':>14}  {'counting only':>14}",
    ]
    for op in ("upload", "download"):
        f = figures[op]
        off = statistics.median(s for run in f["off_s"] for s in run)
        on = statistics.median(s for run in f["on_s"] for s in run)
        lines.append(
            f"{op:<10}{size / off:>11.0f}{size / on:>10.0f}{f['median_percent']:>+8.2f}%{f['min_percent']:>+8.2f}%"
            f"{f['max_percent']:>+8.2f}%{f['runs_under_target']:>8}/{len(f['overhead_percent'])}"
            f"    {'PASS' if f['passed'] else 'FAIL'}  {f['bar_work_s'] * 1e6:>5.0f} µs {f['bar_work_percent']:.3f}%"
            f"  {f['count_work_s'] * 1e6:>5.1f} µs {f['count_work_percent']:.3f}%"
        )
    lines += [
        "",
        "MiB/s: median over every transfer; overhead per run = min(bar on) / min(bar off) - 1 over its pairs;",
        "median, min and max over the runs; negative figures: the bar's cost is below the run-to-run noise.",
        f"PASS: the overhead stayed under {figures['target_percent']:g}% in most runs.",
        "timed runs with every bar created and drawn (SHOW_AFTER = 0: the worst case).",
        "bar work: the bar alone for one transfer (open, an update per 8 MiB, close, drawn to stderr), "
        "and its share of the median transfer without a bar;",
        "counting only: the same for a transfer that ends before SHOW_AFTER (no bar is created).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/progress.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of on/off pairs (default 5)")
    parser.add_argument("--size-mib", type=int, default=256, help="bytes per transfer, in MiB (default 256)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.size_mib < 1:
        parser.error("--runs and --size-mib must be >= 1")
    figures = progress_overhead(args.runs, args.size_mib * harness.MIB)
    print(report(figures), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"\nfigures saved to {args.json}")
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a script: make the workbench package importable from the checkout
        import os

        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
