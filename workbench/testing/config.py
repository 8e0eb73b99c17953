"""The two configurations of ``rpc_run``/``local_run``: how to time, and which tracker to ask for a device.

    >>> EvaluatorConfig(number=10, repeat=3)
    EvaluatorConfig(number=10, repeat=3, min_repeat_ms=100, enable_cpu_cache_flush=False)
    >>> RPCConfig("127.0.0.1", 9190, "rasp").session_priority
    1
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..rpc.client.session import RPCSession
    from ..rpc.client.tracker_session import TrackerSession

# Bytes written before each timed repeat when enable_cpu_cache_flush is set: more than the
# last-level cache of the boards and desktops this runs on (a Raspberry Pi 4 has 1 MiB, most
# desktops 8-32 MiB), so every repeat starts with cold caches.
CPU_CACHE_FLUSH_BYTES = 32 << 20


@dataclass(frozen=True)
class EvaluatorConfig:
    """How ``rpc_run``/``local_run`` time the module (TVM's meta_schedule defaults).

    ``number`` calls per repeat, ``repeat`` repeats, ``number`` grown until a
    repeat lasts ``min_repeat_ms``; ``enable_cpu_cache_flush`` writes
    CPU_CACHE_FLUSH_BYTES on the device before each repeat.

        >>> EvaluatorConfig(number=1, repeat=5, min_repeat_ms=0).repeat
        5
    """

    number: int = 3
    repeat: int = 1
    min_repeat_ms: float = 100
    enable_cpu_cache_flush: bool = False

    def __post_init__(self) -> None:
        for field in ("number", "repeat"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EvaluatorConfig.{field} must be an int >= 1, not {value!r}")
        if not isinstance(self.min_repeat_ms, (int, float)) or self.min_repeat_ms < 0:
            raise ValueError(f"EvaluatorConfig.min_repeat_ms must be a number >= 0, not {self.min_repeat_ms!r}")

    @property
    def cache_flush_bytes(self) -> int:
        """What ``time_evaluator`` gets as ``cache_flush_bytes``."""
        return CPU_CACHE_FLUSH_BYTES if self.enable_cpu_cache_flush else 0


_ENV = {
    "tracker_host": ("WORKBENCH_TRACKER_HOST", "TVM_TRACKER_HOST"),
    "tracker_port": ("WORKBENCH_TRACKER_PORT", "TVM_TRACKER_PORT"),
    "tracker_key": ("WORKBENCH_TRACKER_KEY", "TVM_TRACKER_KEY"),
}


@dataclass(frozen=True)
class RPCConfig:
    """Which tracker and device key ``rpc_run`` asks for a session (TVM's meta_schedule field names).

    Fields left None come from ``WORKBENCH_TRACKER_HOST``/``_PORT``/``_KEY``, or
    TVM's ``TVM_TRACKER_HOST``/``_PORT``/``_KEY`` (see :meth:`normalized`).
    ``session_timeout_sec`` ends a session that runs longer (0: never). A
    ``tracker_key`` no server is registered for fails at once with a
    ``KeyNotFoundError`` naming the keys there are; ``wait=True`` queues until one registers.

        >>> RPCConfig.normalized(RPCConfig(tracker_key="rasp"))   # host and port from the environment  # doctest: +SKIP
    """

    tracker_host: str | None = None
    tracker_port: int | str | None = None
    tracker_key: str | None = None
    session_priority: int = 1
    session_timeout_sec: float = 10
    wait: bool = False

    @classmethod
    def normalized(cls, config: "RPCConfig | None" = None) -> "RPCConfig":
        """``config`` (or an empty one) with missing fields read from the environment and checked.

        A field neither given nor set in the environment raises ValueError naming the variables to set.
        """
        config = config or cls()
        values = {}
        for field, names in _ENV.items():
            value = getattr(config, field)
            if value is None or value == "":
                value = next((os.environ[n].strip() for n in names if os.environ.get(n, "").strip()), None)
            if value is None:
                raise ValueError(
                    f"rpc_run needs the tracker's {field.split('_', 1)[1]}: set {names[0]} (or TVM's {names[1]}), "
                    f"or pass rpc_config=RPCConfig({field}=...)"
                )
            values[field] = value
        port = values["tracker_port"]
        if isinstance(port, str):
            if not port.isdigit():
                raise ValueError(f"the tracker port must be a number (1-65535), not {port!r} "
                                 f"(from {_ENV['tracker_port'][0]} or {_ENV['tracker_port'][1]})")
            port = int(port)
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"the tracker port must be a number (1-65535), not {port!r}")
        values["tracker_port"] = port
        return replace(config, **values)

    def connect_tracker(self) -> "TrackerSession":
        """A connection to the tracker (fields from the environment where missing)."""
        from ..rpc.client.tracker_session import connect_tracker

        config = RPCConfig.normalized(self)
        return connect_tracker(config.tracker_host, config.tracker_port)

    def connect_server(self) -> "RPCSession":
        """A session on a free device of ``tracker_key``, at ``session_priority``."""
        config = RPCConfig.normalized(self)
        with config.connect_tracker() as tracker:
            return tracker.request(config.tracker_key, priority=config.session_priority,
                                   session_timeout=config.session_timeout_sec, wait=config.wait)
