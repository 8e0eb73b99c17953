"""Progress bars for long transfers, long timings and queue waits.

A bar is a ``tqdm.auto`` bar: a widget in a notebook, a console bar in a
terminal (on stderr). Without tqdm there is simply no bar. By default bars
show where someone watches: in a Jupyter kernel, or when stderr is a
terminal (not in logs or pipes). ``progress=False`` on a call, or
``WORKBENCH_PROGRESS=0``, turns them off; ``progress=True`` or
``WORKBENCH_PROGRESS=1`` turns them on wherever the output goes.

    >>> with transfer_bar(64 << 20, "upload data.bin", progress=False) as update:
    ...     update is None
    True

Transfers report per chunk of ``PROGRESS_CHUNK`` bytes, so a bar costs a
few dozen cheap calls per gigabyte, nothing per byte; and a transfer's bar
appears only once the transfer has lasted ``SHOW_AFTER`` seconds, so a fast
one (loopback, a local farm) creates no bar, widget or terminal output at all.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

ENV = "WORKBENCH_PROGRESS"
TRANSFER_THRESHOLD = 8 << 20  # bytes: smaller transfers get no bar
TIMED_THRESHOLD = 2.0  # seconds: shorter expected timings get no bar
WAIT_THRESHOLD = 1.0  # seconds: a queue wait shows a bar once it has lasted this long
PROGRESS_CHUNK = 8 << 20  # bytes moved between two progress reports
SHOW_AFTER = 0.2  # seconds: a transfer's bar appears at its first report after this long
TICK_SECONDS = 0.2  # how often a timed bar advances
TIMED_CAP = 0.99  # a timed bar stops here until its block ends
_OFF = frozenset({"0", "false", "no", "off"})
_ON = frozenset({"1", "true", "yes", "on"})

Update = Callable[[int], None]


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to show progress: an explicit True/False wins, then ``$WORKBENCH_PROGRESS`` (0/1, off/on);
    else on in a Jupyter kernel or when stderr is a terminal.

        >>> progress_enabled(False)
        False
    """
    if progress is not None:
        return bool(progress)
    setting = os.environ.get(ENV, "").strip().lower()
    if setting in _OFF:
        return False
    return setting in _ON or _watched()


def _watched() -> bool:
    """A terminal on stderr, or a Jupyter kernel (where bars are widgets)."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):
        pass
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def chunk_slices(total: int, update: Update | None = None, chunk: int = PROGRESS_CHUNK) -> Iterator[slice]:
    """Slices that cover ``range(total)``: one slice without ``update``; with it, ``chunk``-sized slices,
    calling ``update(n)`` once the caller has handled each.

        >>> done = []
        >>> [(s.start, s.stop) for s in chunk_slices(20, done.append, chunk=8)], done
        ([(0, 8), (8, 16), (16, 20)], [8, 8, 4])
        >>> list(chunk_slices(20))
        [slice(0, 20, None)]
    """
    if update is None:
        yield slice(0, total)
        return
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        yield slice(start, stop)
        update(stop - start)


@functools.lru_cache(maxsize=4)
def _without_monitor(base: type) -> type:
    """``base`` with tqdm's monitor thread turned off: our bars are refreshed by their owners."""
    return type(base.__name__, (base,), {"monitor_interval": 0, "__module__": __name__})


def _new_bar(**options: Any) -> Any:
    """A ``tqdm.auto`` bar, or None when tqdm is missing or cannot draw (a bar never breaks the work it shows)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    try:
        return _without_monitor(tqdm)(**options)
    except Exception as exc:  # e.g. a notebook front end that cannot show the widget
        log.debug("no progress bar: %s: %s", type(exc).__name__, exc)
        return None


class _TransferBar:
    """Counts a transfer's bytes; creates its tqdm bar at the first report ``SHOW_AFTER`` seconds in."""

    __slots__ = ("total", "desc", "done", "bar", "show_at", "unavailable")

    def __init__(self, total: int, desc: str):
        self.total = total
        self.desc = desc
        self.done = 0
        self.bar: Any = None
        self.show_at = time.monotonic() + SHOW_AFTER
        self.unavailable = False

    def update(self, nbytes: int) -> None:
        bar = self.bar
        if bar is None:
            if self.unavailable or time.monotonic() < self.show_at:
                self.done += nbytes
                return
            bar = self.bar = _new_bar(total=self.total, initial=self.done, desc=self.desc, unit="B",
                                      unit_scale=True, unit_divisor=1024, mininterval=0.2, leave=False)
            if bar is None:
                self.unavailable = True
                self.done += nbytes
                return
        bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def transfer_bar(total_bytes: int, desc: str, progress: bool | None = None) -> Iterator[Update | None]:
    """A byte-counting bar for a transfer of ``total_bytes``; yields ``update(nbytes)``, or None for no bar.

    There is no bar below ``TRANSFER_THRESHOLD`` bytes or when progress is off
    (None is yielded), nor without tqdm. The bar itself appears at the first
    ``update`` once the transfer has lasted ``SHOW_AFTER`` seconds, starting
    from the bytes already moved; it is closed (and cleared) when the block
    ends, also on error.

        >>> with transfer_bar(1 << 30, "upload big.bin") as update:
        ...     for _ in range(128):
        ...         if update is not None:  # None: no bar (progress off, or no tqdm)
        ...             update(8 << 20)
    """
    if total_bytes < TRANSFER_THRESHOLD or not progress_enabled(progress):
        yield None
        return
    counter = _TransferBar(total_bytes, desc)
    try:
        yield counter.update
    finally:
        counter.close()


@contextlib.contextmanager
def timed_bar(expected_seconds: float, desc: str, progress: bool | None = None) -> Iterator[None]:
    """A bar that fills over ``expected_seconds`` while the block runs (when that is over ``TIMED_THRESHOLD``).

    A thread owned by this context manager advances it every ``TICK_SECONDS``;
    it stops at 99% until the block ends, and is joined when the block ends.

        >>> with timed_bar(0.5, "time add_one"):   # too short: no bar
        ...     pass
    """
    if not expected_seconds > TIMED_THRESHOLD or not progress_enabled(progress):
        yield
        return
    bar = _new_bar(total=float(expected_seconds), desc=desc, leave=False,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} of about {total:.0f} s")
    if bar is None:
        yield
        return
    stop = threading.Event()
    ticker = threading.Thread(target=_advance, args=(bar, float(expected_seconds), stop),
                              name=f"workbench-progress {desc}", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        bar.close()


def _advance(bar: Any, total: float, stop: threading.Event) -> None:
    """The body of a timed bar's thread: move the bar to the elapsed time, capped, until ``stop``."""
    start = time.monotonic()
    cap = total * TIMED_CAP
    while not stop.wait(TICK_SECONDS):
        bar.n = min(time.monotonic() - start, cap)
        bar.refresh()


class WaitProgress:
    """What ``wait_bar`` yields: call ``update(waited_seconds, text)`` while waiting.

    The bar appears at the first update with ``waited_seconds >= WAIT_THRESHOLD``;
    a short wait shows nothing. With progress off every call is a no-op.
    """

    REFRESH_SECONDS = 0.5  # an unchanged text is redrawn at most this often

    def __init__(self, desc: str, enabled: bool = True):
        self.desc = desc
        self._enabled = enabled
        self._bar: Any = None
        self._text = ""
        self._drawn = 0.0
        self._lock = threading.Lock()

    @property
    def shown(self) -> bool:
        """Whether a bar has been created (the wait lasted long enough, and progress is on)."""
        return self._bar is not None

    def update(self, waited_seconds: float, text: str = "") -> None:
        """Show how long the wait has lasted, and ``text`` (e.g. "2nd in the queue")."""
        if not self._enabled or waited_seconds < WAIT_THRESHOLD:
            return
        with self._lock:
            if not self._enabled:
                return
            if self._bar is None:
                self._bar = _new_bar(total=None, desc=self.desc, leave=False,
                                     bar_format="{desc}: waited {n:.0f} s{postfix}")
                if self._bar is None:
                    self._enabled = False
                    return
            now = time.monotonic()
            if text == self._text and now - self._drawn < self.REFRESH_SECONDS:
                self._bar.n = waited_seconds
                return
            self._text, self._drawn = text, now
            self._bar.n = waited_seconds
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.refresh()

    def close(self) -> None:
        """Remove the bar; later updates do nothing."""
        with self._lock:
            self._enabled = False
            if self._bar is not None:
                self._bar.close()


@contextlib.contextmanager
def wait_bar(desc: str, progress: bool | None = None) -> Iterator[WaitProgress]:
    """An open-ended bar for a wait (a tracker queue); yields a ``WaitProgress``, closed when the block ends.

        >>> with wait_bar("request 'local'", progress=False) as waiting:
        ...     waiting.update(3.0, "2nd in the queue")
        ...     waiting.shown
        False
    """
    waiting = WaitProgress(desc, progress_enabled(progress))
    try:
        yield waiting
    finally:
        waiting.close()


def expected_time_eval_seconds(
    number: int,
    repeat: int,
    min_repeat_ms: float = 0,
    cooldown_interval_ms: float = 0,
    repeats_to_cooldown: int = 1,
    seconds_per_call: float | None = None,
) -> float:
    """A rough duration of a ``time_evaluator`` run, from its options and the last time per call (if known).

    One warm-up call, then ``repeat`` repeats of at least ``min_repeat_ms`` and
    of ``number`` calls each, plus the cooldown pauses between repeats.

        >>> expected_time_eval_seconds(number=10, repeat=3, seconds_per_call=0.1)
        3.1
        >>> expected_time_eval_seconds(number=1, repeat=4, min_repeat_ms=500)
        2.0
    """
    per_call = max(seconds_per_call or 0.0, 0.0)
    per_repeat = max(number * per_call, max(min_repeat_ms, 0) / 1e3)
    pauses = (repeat - 1) // max(repeats_to_cooldown, 1) if cooldown_interval_ms > 0 else 0
    return per_call + repeat * per_repeat + pauses * cooldown_interval_ms / 1e3
