"""The timing loop behind ``time_evaluator``, run next to the device (no network inside)."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

from ..errors import BadRequestError

INT32_MAX = (1 << 31) - 1  # TVM takes these options as C ints
MAX_CACHE_FLUSH_BYTES = 1 << 30  # cache_flush_bytes: 1 GiB is more than every cache there is
MAX_NUMBER = 1 << 62  # min_repeat_ms never grows number past this

# option -> (default, smallest, largest, integral)
TIME_OPTIONS: dict[str, tuple[float, float, float, bool]] = {
    "number": (10, 1, INT32_MAX, True),
    "repeat": (1, 1, INT32_MAX, True),
    "min_repeat_ms": (0, 0, INT32_MAX, False),
    "limit_zero_time_iterations": (100, 0, INT32_MAX, True),
    "cooldown_interval_ms": (0, 0, INT32_MAX, False),
    "repeats_to_cooldown": (1, 1, INT32_MAX, True),
    "cache_flush_bytes": (0, 0, MAX_CACHE_FLUSH_BYTES, True),
}


def check_time_options(options: Any, error: type[Exception] = BadRequestError) -> dict[str, Any]:
    """The ``time_evaluator`` options with their defaults filled in, or ``error`` saying which one is wrong.

    Numbers must be finite and in TVM's ranges (C ints); ``f_preproc`` is a
    function name. Unknown options are refused.

        >>> check_time_options({"number": 5})["repeat"]
        1
    """
    if not isinstance(options, dict):
        raise error(f"time_evaluator options must be a map, not {type(options).__name__}")
    unknown = set(options) - set(TIME_OPTIONS) - {"f_preproc"}
    if unknown:
        raise error(f"unknown time_evaluator options: {sorted(map(str, unknown))}; known: {sorted(TIME_OPTIONS)} and f_preproc")
    out: dict[str, Any] = {}
    for name, (default, low, high, integral) in TIME_OPTIONS.items():
        value = options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integral and not isinstance(value, int)):
            kind = "an int" if integral else "a number"
            raise error(f"time_evaluator option {name} must be {kind}, not {value!r:.60}")
        if not (math.isfinite(value) and low <= value <= high):
            raise error(f"time_evaluator option {name} must be in {low}..{high}, not {value!r}")
        out[name] = value
    preproc = options.get("f_preproc") or ""
    if not isinstance(preproc, str):
        raise error(f"time_evaluator option f_preproc names a registered function (a str), not {preproc!r:.60}")
    out["f_preproc"] = preproc
    return out


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
    flush: Callable[[], None] | None = None,
    warmup: Callable[[int], float] | None = None,
    counts: list[int] | None = None,
) -> list[float]:
    """Seconds per call for each of ``repeat`` repeats.

    ``run(n)`` makes ``n`` back-to-back calls and returns the seconds they took.
    As in TVM: one warm-up call first; ``preproc()`` runs before each repeat;
    while a repeat lasts under ``min_repeat_ms`` (and has not measured zero
    ``limit_zero_time_iterations`` times), ``number`` grows and the repeat is
    measured again; the grown ``number`` carries over to later repeats; after
    every ``repeats_to_cooldown`` repeats (but the last) the loop sleeps
    ``cooldown_interval_ms``. ``flush()`` (the cache flush) runs before every
    measured run, so that the run a repeat reports starts with cold caches; a
    ``run`` that flushes itself (in C, next to the clock) comes with a
    ``warmup(n)`` that does not, for the warm-up call. ``counts``, when given,
    gets the number of calls each repeat actually made (``min_repeat_ms`` may
    have grown it), one entry per repeat.

        >>> calls = []
        >>> time_repeats(lambda n: n * 1e-6, number=5, repeat=2, counts=calls), calls
        ([1e-06, 1e-06], [5, 5])
    """
    if number < 1 or repeat < 1:
        raise ValueError(f"number and repeat must be >= 1 (got number={number}, repeat={repeat})")
    if repeats_to_cooldown < 1:
        raise ValueError(f"repeats_to_cooldown must be >= 1, not {repeats_to_cooldown}")
    (warmup or run)(1)  # warm-up: page faults, lazy binding, caches
    results = []
    for i in range(repeat):
        if preproc is not None:
            preproc()
        duration_ms = 0.0
        zero_times = 0
        while True:
            if duration_ms > 0.0:
                grown = max(min_repeat_ms / (duration_ms / number) + 1, number * 1.618)
                number = int(min(grown, MAX_NUMBER))
            if flush is not None:
                flush()
            seconds = run(number)
            if seconds == 0:
                zero_times += 1
            duration_ms = seconds * 1e3
            if duration_ms >= min_repeat_ms or zero_times >= limit_zero_time_iterations or number >= MAX_NUMBER:
                break
        results.append(seconds / number)
        if counts is not None:
            counts.append(number)
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
