"""``ResultLog``: every timing of a session in one tidy pandas DataFrame.

    >>> from workbench.results import BenchmarkResult, ResultLog
    >>> log = ResultLog()
    >>> rows = log.add(BenchmarkResult([1e-3, 2e-3], name="add_one", config={"number": 10}), size=1024)
    >>> list(log.frame["seconds"]), len(log)
    ([0.001, 0.002], 2)
    >>> log.summary()[["function", "repeats", "number"]].values.tolist()
    [['add_one', 2, 10]]

One row per repeat, with the context that produced it (function, key and
address of the server, its arch and target, argument shapes and dtypes), so
results from several devices compare with one ``groupby``. pandas is
imported on first use, matplotlib only by ``plot``.
"""
from __future__ import annotations

import functools
import html
import importlib.util
import os
import threading
from typing import Any, Sequence

from .benchmark import BenchmarkResult, _number, format_seconds, pyplot, sparkline_svg, time_unit

COLUMNS: tuple[str, ...] = (
    "run", "function", "key", "server", "device", "arch", "target", "shapes", "dtypes",
    "number", "repeat", "repeats", "seconds", "time",
)
_DTYPES: dict[str, str] = {
    "run": "int64", "function": "str", "key": "str", "server": "str", "device": "str", "arch": "str",
    "target": "str", "shapes": "str", "dtypes": "str", "number": "Int64", "repeat": "int64",
    "repeats": "int64", "seconds": "float64", "time": "datetime64[ns]",
}
_STATS = ("mean", "std", "min", "median", "max")
KINDS = ("box", "bar")


def _describe_args(args: Sequence[Any]) -> tuple[str, str]:
    """``("1024;1024x3", "float32;float32")``: one entry per argument; scalars as their type name."""
    shapes, dtypes = [], []
    for arg in args:
        shape, dtype = getattr(arg, "shape", None), getattr(arg, "dtype", None)
        if shape is not None and dtype is not None:
            shapes.append("x".join(str(int(d)) for d in shape) if len(shape) else "()")
            dtypes.append(str(dtype))
        else:
            shapes.append(type(arg).__name__)
            dtypes.append(type(arg).__name__)
    return ";".join(shapes), ";".join(dtypes)


def _session_context(session: Any) -> dict[str, str]:
    if session is None:
        return {"key": "", "server": "", "arch": "", "target": ""}
    info = getattr(session, "info", None) or {}
    return {
        "key": str(info.get("key") or ""),
        "server": str(getattr(session, "address", "") or ""),
        "arch": str(info.get("arch") or ""),
        "target": str(info.get("target") or ""),
    }


def _group_label(function: str, key: str, server: str) -> str:
    where = key or server
    return f"{function or 'function'} @ {where}" if where else (function or "function")


class ResultLog:
    """Collects ``BenchmarkResult``s with their context; one row per repeat.

        >>> log = ResultLog()
        >>> _ = log.add(mod.time_evaluator("add_one", dev, repeat=5)(a, b),   # doctest: +SKIP
        ...             session=remote, args=(a, b), variant="baseline")
        >>> log.summary()                                                      # doctest: +SKIP
        >>> log.plot("box")                                                    # doctest: +SKIP

    ``len(log)`` counts rows (timings). Safe to use from several threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: list[Any] = []  # one DataFrame per add
        self._extras: list[str] = []  # extra columns in order of first appearance
        self._cache: Any = None
        self._next_run = 1

    # -- adding ------------------------------------------------------------------
    def add(self, result: BenchmarkResult, *, session: Any = None, args: Sequence[Any] = (), **extra: Any):
        """Log ``result``; returns the rows added (a DataFrame, one row per repeat).

        ``session`` (an RPC session) gives key, server, arch and target;
        ``args`` the tensors the function was timed with (for shapes and
        dtypes); every keyword in ``extra`` becomes a column.

            >>> log.add(result, session=remote, args=(a, b), size=1 << 16)   # doctest: +SKIP
        """
        import pandas as pd

        if not isinstance(getattr(result, "results", None), (tuple, list)) or not result.results:
            raise TypeError(
                f"ResultLog.add needs a BenchmarkResult (what time_evaluator returns), got {type(result).__name__}"
            )
        clash = sorted(set(extra) & set(COLUMNS))
        if clash:
            raise ValueError(f"extra column(s) {clash} clash with the log's own columns; pass them under another name")
        shapes, dtypes = _describe_args(args)
        repeats = len(result.results)
        numbers = getattr(result, "numbers", None)  # the calls each repeat actually made, where the server said
        if numbers is None or len(numbers) != repeats:
            number = result.config.get("number") if isinstance(getattr(result, "config", None), dict) else None
            numbers = [number] * repeats
        now = pd.Timestamp.now()
        where = _session_context(session)
        known = getattr(result, "context", None) or {}  # where the result says it ran (time_evaluator fills it)
        for name in where:
            where[name] = where[name] or str(known.get(name) or "")
        context = dict(
            function=str(getattr(result, "name", "") or ""),
            device=str(getattr(result, "device", "") or ""),
            shapes=shapes, dtypes=dtypes, **where,
        )
        rows = pd.DataFrame(
            {
                "run": pd.Series([0] * repeats, dtype="int64"),  # numbered under the lock below
                **{name: pd.Series([context[name]] * repeats, dtype="str") for name in context},
                "number": pd.Series(list(numbers), dtype="Int64"),
                "repeat": pd.Series(range(repeats), dtype="int64"),
                "repeats": pd.Series([repeats] * repeats, dtype="int64"),
                "seconds": pd.Series(result.results, dtype="float64"),
                "time": pd.Series([now] * repeats, dtype="datetime64[ns]"),
            }
        )
        for name, value in extra.items():
            rows[name] = [value] * repeats
        rows = rows[list(COLUMNS) + list(extra)]
        with self._lock:
            rows["run"] = self._next_run
            self._next_run += 1
            self._parts.append(rows)
            self._extras.extend(name for name in extra if name not in self._extras)
            self._cache = None
        return rows.copy()

    def clear(self) -> None:
        """Forget every row (run numbers keep counting up, so exports before and after never collide)."""
        with self._lock:
            self._parts.clear()
            self._extras.clear()
            self._cache = None

    # -- reading -----------------------------------------------------------------
    def _frame(self):
        """The shared frame (callers must not modify it)."""
        import pandas as pd

        with self._lock:
            if self._cache is None:
                order = list(COLUMNS) + self._extras
                if self._parts:
                    frame = pd.concat(self._parts, ignore_index=True)
                else:
                    frame = pd.DataFrame({name: pd.Series(dtype=_DTYPES[name]) for name in COLUMNS})
                self._cache = frame.reindex(columns=order)
            return self._cache

    @property
    def frame(self):
        """A copy of all rows: the columns in ``COLUMNS`` order, then the extra columns."""
        return self._frame().copy()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(part) for part in self._parts)

    def summary(self):
        """One row per run: function, key, server, extra columns, mean, std, min, median, max, repeats, number.

        The times stay in seconds (``summary()["mean"]``); shown in a notebook or
        printed, each time column is in the one unit (ns, µs, ms or s) that suits
        its median, named in its header (``mean (µs)``). ``number`` is the calls
        per repeat (the smallest, where the repeats of a run differ).

            >>> print(log.summary())                                   # doctest: +SKIP
             run function key server  mean (µs)  std (ns) ...
        """
        import pandas as pd

        frame = self._frame()
        with self._lock:
            extras = list(self._extras)
        keys = ["run", "function", "key", "server"]
        out_columns = keys + extras + list(_STATS) + ["repeats", "number"]
        if frame.empty:
            return _summary_class()({name: pd.Series(dtype=_DTYPES.get(name, "float64")) for name in out_columns})
        grouped = frame.groupby("run", sort=True)
        summary = grouped[keys[1:] + extras + ["repeats"]].first()
        summary["number"] = grouped["number"].min()
        seconds = grouped["seconds"]
        summary["mean"] = seconds.mean()
        summary["std"] = seconds.std(ddof=0)  # as BenchmarkResult.std
        summary["min"] = seconds.min()
        summary["median"] = seconds.median()
        summary["max"] = seconds.max()
        return _summary_class()(summary.reset_index()[out_columns])

    # -- export ------------------------------------------------------------------
    def to_csv(self, path: str | os.PathLike) -> str:
        """Write every row to a CSV file; returns the path. Read back with ``pandas.read_csv(path, keep_default_na=False)``."""
        self._frame().to_csv(path, index=False)
        return os.fspath(path)

    def to_parquet(self, path: str | os.PathLike) -> str:
        """Write every row to a Parquet file (needs pyarrow or fastparquet); returns the path."""
        if importlib.util.find_spec("pyarrow") is None and importlib.util.find_spec("fastparquet") is None:
            raise ImportError(
                "writing Parquet needs pyarrow (or fastparquet), which is not installed: "
                "pip install pyarrow  (or use log.to_csv(path))"
            )
        self._frame().to_parquet(path, index=False)
        return os.fspath(path)

    # -- display -----------------------------------------------------------------
    def _runs_html(self, last: int = 50):
        """The last runs of the summary as display strings (HTML-escaped), times in one unit, with sparklines."""
        import pandas as pd

        summary = pd.DataFrame(self.summary().tail(last))
        shown = readable(summary, escape=True, precision=4)
        per_run = self._frame().groupby("run")["seconds"].apply(list)
        shown["per repeat"] = [sparkline_svg(per_run[run], width=90, height=18) for run in summary["run"]]
        return shown, time_unit(float(summary["median"].median()))[1]

    def _repr_html_(self) -> str:
        if len(self) == 0:
            return "<p><b>ResultLog</b>: empty; time something first (e.g. with <code>%rpc_time</code>).</p>"
        shown, _ = self._runs_html(last=50)
        runs = self._frame()["run"].nunique()
        table = shown.to_html(index=False, escape=False, na_rep="", classes="wb-result-log", border=0)
        note = f" (the last {len(shown)} shown; <code>log.summary()</code> has all)" if runs > len(shown) else ""
        return f"<p><b>ResultLog</b>: {runs} run{'s' if runs != 1 else ''}, {len(self)} timings{note}</p>{table}"

    def __repr__(self) -> str:
        summary = self.summary()
        runs = len(summary)
        head = f"<ResultLog: {runs} run{'s' if runs != 1 else ''}, {len(self)} timings>"
        lines = [head]
        shown = summary.tail(20)
        if runs > len(shown):
            lines.append(f"  ... {runs - len(shown)} earlier runs")
        for row in shown.itertuples(index=False):
            label = _group_label(row.function, row.key, row.server)
            lines.append(f"  run {row.run}: {label}: {format_seconds(row.mean)} ± {format_seconds(row.std)} "
                         f"({row.repeats} repeats)")
        return "\n".join(lines)

    def plot(self, kind: str = "box", ax: Any = None):
        """Plot the timings per (function, key or server, and argument shapes where they vary); returns the Axes.

        ``kind="box"``: the per-repeat distribution, one box per group;
        ``kind="bar"``: the mean per group with std error bars.

            >>> log.plot("bar")          # doctest: +SKIP
        """
        if kind not in KINDS:
            raise ValueError(f"unknown plot kind {kind!r}; use one of {', '.join(repr(k) for k in KINDS)}")
        frame = self._frame()
        if frame.empty:
            raise ValueError("the result log is empty: time something first (e.g. with %rpc_time), then plot")
        plt = pyplot()

        labels = [_group_label(f, k, s) for f, k, s in zip(frame["function"], frame["key"], frame["server"])]
        # a function timed at several argument shapes on one device: one group per shape, named by it
        shapes_per_label: dict[str, set] = {}
        for label, shape in zip(labels, frame["shapes"]):
            shapes_per_label.setdefault(label, set()).add(shape)
        labels = [f"{label} [{shape}]" if len(shapes_per_label[label]) > 1 else label
                  for label, shape in zip(labels, frame["shapes"])]
        groups: dict[str, list[float]] = {}
        for label, seconds in zip(labels, frame["seconds"]):
            groups.setdefault(label, []).append(float(seconds))
        scale, unit = time_unit(float(frame["seconds"].median()))
        names = list(groups)
        data = [[v * scale for v in groups[name]] for name in names]
        positions = list(range(1, len(names) + 1))
        created = ax is None
        if created:  # wide enough for its labels, never a thin strip: 6.4 x 4 in (matplotlib's default) at least
            _, ax = plt.subplots(figsize=(min(16.0, max(6.4, 1.1 * len(names) + 2)), 4.0))
        if kind == "box":
            ax.boxplot(data, positions=positions, widths=0.6, patch_artist=True,
                       boxprops={"facecolor": "#c6d6e8", "edgecolor": "#2f5d8a"},
                       medianprops={"color": "#c44e52"})
            ax.set_title(f"time per call, per repeat ({len(frame)} timings)")
        else:
            means = [sum(d) / len(d) for d in data]
            stds = [(sum((v - m) ** 2 for v in d) / len(d)) ** 0.5 for d, m in zip(data, means)]
            ax.bar(positions, means, yerr=stds, capsize=4, color="#4878a8", width=0.6)
            ax.set_title("mean time per call (± std. dev.)")
        ax.set_xticks(positions, names)
        ax.set_ylabel(f"time per call ({unit})")
        ax.set_ylim(bottom=0)
        if len(names) == 1:  # one group: a box in the middle of the plot, not one filling it edge to edge
            ax.set_xlim(0.25, 1.75)
        longest = max(len(name) for name in names)
        width_per_label = ax.figure.get_figwidth() * 72 / len(names)  # points
        if longest * 6.5 > width_per_label:  # labels that would overlap (about 6.5 pt per character): tilt them
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
        if created:
            ax.figure.tight_layout()
        return ax


def column_unit(seconds: Any) -> tuple[float, str]:
    """The one unit for a column of durations in seconds: the one its median reads between 1 and 1000 in.

        >>> column_unit([1.2e-6, 3e-6, 2e-3])
        (1000000.0, 'µs')
    """
    import pandas as pd

    values = pd.Series(seconds, dtype="float64").dropna()
    values = values[values != 0].abs()
    return time_unit(float(values.median()) if len(values) else 0.0)


def readable(summary: Any, *, escape: bool = False, precision: int = 3):
    """A copy of ``summary`` for showing: each time column in its own unit (header ``mean (µs)``), as text.

    Numbers never go to exponent notation; other columns are shown as they are
    (missing values as empty cells). ``escape`` HTML-escapes the text cells.

        >>> readable(log.summary())                                  # doctest: +SKIP
    """
    import pandas as pd

    def cell(value: Any) -> str:
        if value is None or (pd.api.types.is_scalar(value) and not isinstance(value, str) and pd.isna(value)):
            return ""
        if isinstance(value, float):
            value = _number(value, 6)
        return html.escape(str(value)) if escape else str(value)

    shown = pd.DataFrame(index=summary.index)
    for name in summary.columns:
        if name in _STATS or name == "seconds":
            scale, unit = column_unit(summary[name])
            shown[f"{name} ({unit})"] = ["" if pd.isna(v) else _number(float(v) * scale, precision)
                                         for v in summary[name]]
        else:
            shown[html.escape(str(name)) if escape else str(name)] = [cell(v) for v in summary[name]]
    return shown


@functools.lru_cache(maxsize=None)
def _summary_class() -> type:
    """``TimingSummary``, a pandas DataFrame subclass, made on first use (pandas is imported only then)."""
    import pandas as pd

    class TimingSummary(pd.DataFrame):
        """``ResultLog.summary()``: a pandas DataFrame in seconds that shows each time column in a readable unit.

        Computing with it works on seconds (``s["mean"].max()``); printing it or
        showing it in a notebook gives ``mean (µs)`` columns with plain numbers, on
        one line per row (no wrapping). ``readable(s)`` is the shown table as a DataFrame.

            >>> s = log.summary(); s["mean"].iloc[0]                     # doctest: +SKIP
            1.234e-06
        """

        @property
        def _constructor(self):
            return TimingSummary

        def _timed(self) -> bool:
            return not self.empty and any(name in _STATS for name in self.columns)

        def __repr__(self) -> str:
            return readable(self).to_string(index=False) if self._timed() else super().__repr__()

        def __str__(self) -> str:
            return self.__repr__()

        def _repr_html_(self) -> str:
            if not self._timed():
                return super()._repr_html_()
            return readable(self, escape=True).to_html(index=False, escape=False, na_rep="", border=0,
                                                       classes="wb-result-summary")

    TimingSummary.__module__, TimingSummary.__qualname__ = __name__, "TimingSummary"  # picklable by name
    return TimingSummary


def __getattr__(name: str) -> Any:
    """``workbench.results.log.TimingSummary``: the class, made when first asked for (PEP 562)."""
    if name == "TimingSummary":
        return _summary_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_default: ResultLog | None = None
_default_lock = threading.Lock()


def default_log() -> ResultLog:
    """The process-wide ResultLog (created on first use) that ``%rpc_time`` writes to.

        >>> default_log() is default_log()
        True
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = ResultLog()
        return _default
