"""``BenchmarkResult``: what ``time_evaluator`` returns.

    >>> r = BenchmarkResult([1e-3, 2e-3, 3e-3])
    >>> r.mean, r.median
    (0.002, 0.002)
"""
from __future__ import annotations

import statistics
from typing import Any, Sequence


class BenchmarkResult:
    """Per-repeat timings in seconds, with their summary statistics."""

    def __init__(self, results: Sequence[float], *, name: str = "", device: str = "", config: dict[str, Any] | None = None):
        if not results:
            raise ValueError("a BenchmarkResult needs at least one timing")
        self.results = tuple(float(r) for r in results)
        self.name = name
        self.device = device
        self.config = dict(config or {})

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

    def plot(self, ax=None):
        """A bar per repeat with the mean as a line; returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3))
        scale, unit = _unit(self.median)
        ax.bar(range(len(self.results)), [r * scale for r in self.results], color="#4878a8")
        ax.axhline(self.mean * scale, color="#c44e52", label=f"mean {self.mean * scale:.4g} {unit}")
        ax.set_xlabel("repeat")
        ax.set_ylabel(f"time per call ({unit})")
        ax.set_title(f"{self.name or 'function'} on {self.device or 'device'}")
        ax.legend()
        return ax

    def __repr__(self) -> str:
        scale, unit = _unit(self.median)
        return (
            f"BenchmarkResult({self.name or 'function'}: mean {self.mean * scale:.4g} {unit}, "
            f"median {self.median * scale:.4g} {unit}, min {self.min * scale:.4g} {unit}, "
            f"max {self.max * scale:.4g} {unit}, std {self.std * scale:.4g} {unit}, "
            f"{len(self.results)} repeats)"
        )


def _unit(seconds: float) -> tuple[float, str]:
    for scale, unit in ((1, "s"), (1e3, "ms"), (1e6, "us")):
        if seconds * scale >= 1:
            return scale, unit
    return 1e9, "ns"
