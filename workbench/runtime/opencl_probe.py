"""Listing a server's OpenCL devices in a forked child, started early and collected when first needed.

A platform (PoCL) starts threads when it is opened, and a server that forks
session workers must not have them, so the server never opens one itself: a
child does, writes the devices as JSON to a pipe and exits. PoCL takes about
50 ms to open, so ``python -m workbench.rpc.server`` starts the child first
thing (this module imports only the standard library) and the probe runs while
the server imports and binds; ``runtime.opencl.published_devices()`` collects it.

    >>> started = start()                                    # doctest: +SKIP
    >>> devices = collect(started)                           # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import select
import signal
import time
from typing import Any

log = logging.getLogger(__name__)

NO_OPENCL_ENV = "WORKBENCH_NO_OPENCL"
PROBE_TIMEOUT_S = 30.0
Started = tuple[int, int]  # the probe's pid and the read end of its pipe

_started: Started | None = None  # the probe start() forked, until take()n
_taken = False  # take() was called: the devices are known, or being listed, without a new probe


def opencl_disabled() -> bool:
    """True when ``WORKBENCH_NO_OPENCL`` is set (to anything but ``""``/``0``/``false``/``no``)."""
    return os.environ.get(NO_OPENCL_ENV, "").strip().lower() not in ("", "0", "false", "no")


def start() -> None:
    """Fork the probe now, unless OpenCL is turned off or a probe ran or runs. Call it before this
    process has threads or secrets; ``take()`` hands the probe to whoever collects it."""
    global _started
    if _started is None and not _taken and not opencl_disabled():
        _started = fork()


def pending_fd() -> int | None:
    """The pipe of the probe ``start()`` forked, while nobody took it: readable once the probe is done."""
    return _started[1] if _started is not None else None


def take() -> Started | None:
    """The probe ``start()`` forked (its owner is the caller from now on), or None."""
    global _started, _taken
    started, _started, _taken = _started, None, True
    return started


def fork() -> Started | None:
    """A new probe; None (logged) when this process cannot fork."""
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_end)
        os.close(write_end)
        log.warning("cannot fork to list OpenCL devices (%s): none listed", exc)
        return None
    if pid == 0:  # the child: probe, write the JSON, leave without running any of the parent's exit code
        status = 1
        try:
            os.close(read_end)
            # by name, at run time: runtime.opencl imports this module, which a server imports first of all
            probe = importlib.import_module(".opencl", __package__).probe
            view = memoryview(json.dumps(probe()).encode())
            while view:
                view = view[os.write(write_end, view):]
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def discard(started: Started) -> None:
    """End a probe whose list is not needed."""
    os.kill(started[0], signal.SIGKILL)
    os.close(started[1])
    os.waitpid(started[0], 0)


def collect(started: Started) -> list[dict[str, Any]]:
    """The probe's devices (waiting at most ``PROBE_TIMEOUT_S``); ``[]`` (logged) if it failed."""
    pid, read_end = started
    chunks, deadline = [], time.monotonic() + PROBE_TIMEOUT_S
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_end], [], [], left)[0]:
                log.warning("listing OpenCL devices took over %g s: none listed", PROBE_TIMEOUT_S)
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    if status != 0:
        log.warning("listing OpenCL devices failed (the probe ended with status %#x): none listed", status)
        return []
    try:
        devices = json.loads(b"".join(chunks))
    except ValueError:
        return []
    return devices if isinstance(devices, list) else []
