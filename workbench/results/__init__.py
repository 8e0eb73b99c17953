"""Timing results: ``BenchmarkResult``, the ``ResultLog`` of a session, pandas frames and matplotlib plots.

    >>> from workbench.results import BenchmarkResult, default_log, format_seconds
    >>> format_seconds(2.5e-3)
    '2.5 ms'
"""
from .benchmark import BenchmarkResult, format_seconds
from .log import ResultLog, default_log

__all__ = ["BenchmarkResult", "ResultLog", "default_log", "format_seconds"]
