"""Timing results: ``BenchmarkResult`` with pandas frames and matplotlib plots."""
from .benchmark import BenchmarkResult

__all__ = ["BenchmarkResult"]
