"""The device farm on this machine (a tracker and servers on loopback), and where sessions come from.

    >>> from workbench.farm import LocalFarm, open_session
    >>> with LocalFarm({"local": 2}) as farm:          # doctest: +SKIP
    ...     remote = farm.request("local")
    >>> remote = open_session(key="local")             # doctest: +SKIP

``default_tracker()`` is where sessions come from when no tracker is named:
the one set by ``set_default_tracker``/``start_farm``, else
``WORKBENCH_TRACKER=host:port`` (or TVM's ``TVM_TRACKER_HOST`` and
``TVM_TRACKER_PORT``), else an embedded LocalFarm started on first use.
"""
from ..rpc.client.tracker_session import KeyNotFoundError, RequestCancelled, WaitStatus
from .local import (
    LocalFarm,
    current_farm,
    default_tracker,
    parse_address,
    set_default_tracker,
    start_farm,
    stop_farm,
    tracker_from_env,
)
from .sessions import open_session

__all__ = [
    "KeyNotFoundError", "LocalFarm", "RequestCancelled", "WaitStatus", "current_farm", "default_tracker", "open_session",
    "parse_address", "set_default_tracker", "start_farm", "stop_farm", "tracker_from_env",
]
