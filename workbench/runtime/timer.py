"""The timing loop behind ``time_evaluator``, run next to the device (no network inside)."""
from __future__ import annotations

import time
from typing import Callable


def time_repeats(
    run: Callable[[int], float],
    *,
    number: int = 10,
    repeat: int = 1,
    min_repeat_ms: float = 0,
    limit_zero_time_iterations: int = 100,
    cooldown_interval_ms: float = 0,
    repeats_to_cooldown: int = 1,
    preproc: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds per call for each of ``repeat`` repeats.

    ``run(n)`` makes ``n`` back-to-back calls and returns the seconds they took.
    As in TVM: one warm-up call first; while a repeat lasts under
    ``min_repeat_ms`` (and has not measured zero ``limit_zero_time_iterations``
    times), ``number`` grows and the repeat is measured again; the grown
    ``number`` carries over to later repeats.

        >>> time_repeats(lambda n: n * 1e-6, number=5, repeat=2)
        [1e-06, 1e-06]
    """
    if number < 1 or repeat < 1:
        raise ValueError(f"number and repeat must be >= 1 (got number={number}, repeat={repeat})")
    if repeats_to_cooldown < 1:
        raise ValueError(f"repeats_to_cooldown must be >= 1, not {repeats_to_cooldown}")
    run(1)  # warm-up: page faults, lazy binding, caches
    results = []
    for i in range(repeat):
        if preproc is not None:
            preproc()
        duration_ms = 0.0
        zero_times = 0
        while True:
            if duration_ms > 0.0:
                number = int(max(min_repeat_ms / (duration_ms / number) + 1, number * 1.618))
            seconds = run(number)
            if seconds == 0:
                zero_times += 1
            duration_ms = seconds * 1e3
            if duration_ms >= min_repeat_ms or zero_times >= limit_zero_time_iterations:
                break
        results.append(seconds / number)
        if cooldown_interval_ms > 0 and (i + 1) % repeats_to_cooldown == 0 and i + 1 < repeat:
            time.sleep(cooldown_interval_ms / 1e3)
    return results


def python_runner(func: Callable, args: tuple) -> Callable[[int], float]:
    """``run(n)`` for a Python function."""

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            func(*args)
        return time.perf_counter() - start

    return run
