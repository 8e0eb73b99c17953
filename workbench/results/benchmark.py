"""``BenchmarkResult``: what ``time_evaluator`` returns, and ``format_seconds``.

    >>> r = BenchmarkResult([1e-3, 2e-3, 3e-3], config={"number": 10})
    >>> r.mean, r.median
    (0.002, 0.002)
    >>> r.describe()
    '2 ms ± 816 µs per call (mean ± std. dev. of 3 runs, 10 calls each)'
    >>> format_seconds(4.56e-8)
    '45.6 ns'
"""
from __future__ import annotations

import html
import math
import statistics
from typing import Any, Sequence

# (multiplier from seconds, unit), largest unit first
_UNITS: tuple[tuple[float, str], ...] = ((1.0, "s"), (1e3, "ms"), (1e6, "µs"), (1e9, "ns"))


def time_unit(seconds: float) -> tuple[float, str]:
    """The unit to show ``seconds`` in, as ``(multiplier, name)``: ``time_unit(2e-6) == (1e6, "µs")``.

    Zero, nan and infinities get seconds (zero gets ns, like IPython's %timeit).
    """
    if seconds == 0:
        return 1e9, "ns"
    if not math.isfinite(seconds):
        return 1.0, "s"
    for scale, unit in _UNITS:
        if abs(seconds) * scale >= 1:
            return scale, unit
    return _UNITS[-1]


def _number(value: float, precision: int) -> str:
    """``value`` to ``precision`` significant digits, never in exponent notation."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if abs(value) >= 10**precision:
        return f"{value:.0f}"
    text = f"{value:.{precision}g}"
    if "e" not in text:
        return text
    if abs(value) >= 1:  # rounded up to the next power of ten: 999.96 -> "1e+03"
        return f"{float(text):.0f}"
    decimals = precision - 1 - math.floor(math.log10(abs(value)))
    return f"{value:.{decimals}f}"


def format_seconds(seconds: float, precision: int = 3) -> str:
    """A duration in the unit that suits it, to ``precision`` significant digits.

        >>> format_seconds(1.234e-6), format_seconds(2.5e-3), format_seconds(1.2)
        ('1.23 µs', '2.5 ms', '1.2 s')
    """
    if precision < 1:
        raise ValueError(f"precision must be at least 1, got {precision}")
    seconds = float(seconds)
    scale, unit = time_unit(seconds)
    text = _number(seconds * scale, precision)
    # rounding may carry into the next unit: 999.96 µs -> "1e+03 µs" -> "1 ms"
    if abs(float(text)) >= 1000 and unit != "s":
        bigger = _UNITS[[u for _, u in _UNITS].index(unit) - 1]
        scale, unit = bigger
        text = _number(seconds * scale, precision)
    return f"{text} {unit}"


def sparkline_svg(values: Sequence[float], *, width: int = 120, height: int = 24, title: str = "") -> str:
    """A tiny inline SVG line chart of ``values`` (no matplotlib needed), for HTML reprs.

        >>> sparkline_svg([3, 1, 2]).startswith("<svg")
        True
    """
    values = [float(v) for v in values]
    pad = 3.0
    lo, hi = min(values), max(values)
    span = hi - lo

    def xy(i: int, v: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * (i / (len(values) - 1) if len(values) > 1 else 0.5)
        y = height / 2 if span == 0 else pad + (height - 2 * pad) * (hi - v) / span
        return round(x, 1), round(y, 1)

    points = [xy(i, v) for i, v in enumerate(values)]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" style="vertical-align: middle">'
    ]
    if title:
        parts.append(f"<title>{html.escape(title)}</title>")
    if len(points) > 1:
        coords = " ".join(f"{x},{y}" for x, y in points)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="#4878a8" stroke-width="1.5"/>')
    if len(points) <= 40:
        parts.extend(f'<circle cx="{x}" cy="{y}" r="1.8" fill="#4878a8"/>' for x, y in points)
    parts.append("</svg>")
    return "".join(parts)


class BenchmarkResult:
    """Per-repeat timings in seconds, with their summary statistics.

        >>> r = BenchmarkResult([1e-6, 3e-6], name="add_one", device="cpu(0)", config={"number": 100})
        >>> r.describe()
        '2 µs ± 1 µs per call (mean ± std. dev. of 2 runs, 100 calls each)'

    In a notebook it shows as a small table with a sparkline of the repeats.
    """

    def __init__(self, results: Sequence[float], *, name: str = "", device: str = "",
                 config: dict[str, Any] | None = None, numbers: Sequence[int] | None = None,
                 context: dict[str, str] | None = None):
        if not results:
            raise ValueError("a BenchmarkResult needs at least one timing")
        self.results = tuple(float(r) for r in results)
        self.name = name
        self.device = device
        self.config = dict(config or {})
        #: the calls each repeat actually made (the device may raise ``number`` for min_repeat_ms), or None
        self.numbers: tuple[int, ...] | None = None
        if numbers is not None:
            if len(numbers) != len(self.results) or any(isinstance(n, bool) or int(n) < 1 for n in numbers):
                raise ValueError(f"numbers must hold one call count >= 1 per repeat ({len(self.results)}), "
                                 f"not {list(numbers)!r:.80}")
            self.numbers = tuple(int(n) for n in numbers)
        #: where it ran: key, server (address), arch and target of the session, where known
        self.context: dict[str, str] = {k: str(v) for k, v in (context or {}).items() if v is not None}

    @property
    def number(self) -> int | None:
        """Calls per repeat: what each repeat made (the smallest where they differ), else the requested ``number``.

            >>> BenchmarkResult([1e-6, 1e-6], config={"number": 1}, numbers=[5000, 5000]).number
            5000
        """
        if self.numbers is not None:
            return min(self.numbers)
        number = self.config.get("number")
        return None if number is None else int(number)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.results)

    @property
    def median(self) -> float:
        return statistics.median(self.results)

    @property
    def min(self) -> float:
        return min(self.results)

    @property
    def max(self) -> float:
        return max(self.results)

    @property
    def std(self) -> float:
        return statistics.pstdev(self.results)

    def to_frame(self):
        """One row per repeat: ``repeat``, ``seconds``, plus the function and device."""
        import pandas as pd

        return pd.DataFrame(
            {
                "function": self.name,
                "device": self.device,
                "repeat": range(len(self.results)),
                "seconds": self.results,
            }
        )

    def describe(self) -> str:
        """One line in IPython %timeit's style.

            >>> BenchmarkResult([1e-3], config={"number": 1}).describe()
            '1 ms ± 0 ns per call (mean ± std. dev. of 1 run, 1 call each)'
            >>> BenchmarkResult([1e-3, 1e-3], config={"number": 1, "min_repeat_ms": 100}).describe()
            '1 ms ± 0 ns per call (mean ± std. dev. of 2 runs, each at least 1 call and 100 ms)'
        """
        runs = len(self.results)
        detail = f"mean ± std. dev. of {runs} run{'s' if runs != 1 else ''}"
        number, min_ms = self.number, self.config.get("min_repeat_ms") or 0
        if self.numbers is not None and len(set(self.numbers)) > 1:
            detail += f", {min(self.numbers)}–{max(self.numbers)} calls each"
        elif self.numbers is None and number is not None and min_ms > 0:
            # an older server raised number until a run lasted min_repeat_ms, without saying how far
            detail += f", each at least {number} call{'s' if number != 1 else ''} and {min_ms:g} ms"
        elif number is not None:
            detail += f", {number} call{'s' if number != 1 else ''} each"
        return f"{format_seconds(self.mean)} ± {format_seconds(self.std)} per call ({detail})"

    def plot(self, ax=None):
        """A bar per repeat with the mean as a line; returns the matplotlib Axes."""
        plt = pyplot()

        if ax is None:
            _, ax = plt.subplots(figsize=(6.4, 3.6))
        scale, unit = time_unit(self.median)
        ax.bar(range(len(self.results)), [r * scale for r in self.results], color="#4878a8")
        ax.axhline(self.mean * scale, color="#c44e52", label=f"mean {format_seconds(self.mean)}")
        ax.set_xlabel("repeat")
        ax.set_ylabel(f"time per call ({unit})")
        ax.set_title(f"{self.name or 'function'} on {self.device or 'device'}")
        ax.legend()
        return ax

    def _repr_html_(self) -> str:
        scale, unit = time_unit(self.median)
        stats = [("mean", self.mean), ("median", self.median), ("min", self.min), ("max", self.max), ("std", self.std)]
        head = "".join(f"<th>{label} ({unit})</th>" for label, _ in stats)
        cells = "".join(f"<td>{_number(value * scale, 4)}</td>" for _, value in stats)
        number: Any = self.number
        if self.numbers is not None and len(set(self.numbers)) > 1:
            number = f"{min(self.numbers)}–{max(self.numbers)}"
        elif self.numbers is None and number is not None and (self.config.get("min_repeat_ms") or 0) > 0:
            number = f"≥ {number}"  # the device raised it until a run lasted min_repeat_ms (a server before 15)
        shown = [format_seconds(r) for r in self.results[:20]]
        spark = sparkline_svg(self.results, title="per-repeat time per call: " + ", ".join(shown)
                              + (", …" if len(self.results) > len(shown) else ""))
        title = html.escape(f"{self.name or 'function'}" + (f" on {self.device}" if self.device else ""))
        return (
            '<table class="wb-benchmark">'
            f'<caption style="text-align: left"><b>{title}</b>: {html.escape(self.describe())}</caption>'
            f"<thead><tr>{head}<th>repeats</th><th>calls each</th><th>per repeat</th></tr></thead>"
            f"<tbody><tr>{cells}<td>{len(self.results)}</td>"
            f"<td>{'' if number is None else html.escape(str(number))}</td><td>{spark}</td></tr></tbody>"
            "</table>"
        )

    def __repr__(self) -> str:
        scale, unit = time_unit(self.median)
        stats = ", ".join(f"{label} {_number(value * scale, 4)} {unit}" for label, value in (
            ("mean", self.mean), ("median", self.median), ("min", self.min), ("max", self.max), ("std", self.std)))
        number = self.number
        calls = "" if number is None else f", {number} call{'s' if number != 1 else ''} each"
        return f"BenchmarkResult({self.name or 'function'}: {stats}, {len(self.results)} repeats{calls})"

    def __str__(self) -> str:
        return self.describe()


_unit = time_unit  # the old private name


def pyplot():
    """``matplotlib.pyplot``, or an ImportError that says how to install it."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plotting needs matplotlib: pip install matplotlib (or pip install \"rpc-workbench[notebook]\")"
        ) from None
    return plt
