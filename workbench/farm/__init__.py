"""The device farm on this machine: a tracker and servers on loopback.

    >>> from workbench.farm import LocalFarm
    >>> with LocalFarm({"local": 2}) as farm:          # doctest: +SKIP
    ...     remote = farm.request("local")

``default_tracker()`` is where sessions come from when no tracker is named:
``WORKBENCH_TRACKER=host:port`` (or TVM's ``TVM_TRACKER_HOST`` and
``TVM_TRACKER_PORT``), else an embedded LocalFarm started on first use.
"""
from .local import LocalFarm, default_tracker, tracker_from_env

__all__ = ["LocalFarm", "default_tracker", "tracker_from_env"]
