"""``open_session``: a session on a device, the one way the notebook layer connects.

    >>> from workbench.farm import open_session
    >>> remote = open_session(key="local")                  # a free "local" device of the default tracker
    >>> remote = open_session("10.0.0.5:9090")              # a server, directly  # doctest: +SKIP
    >>> remote = open_session(key="rasp", tracker="tracker:9190", timeout=60)   # doctest: +SKIP
    >>> remote = open_session(key="rasp", wait=True)        # queue until a "rasp" server registers  # doctest: +SKIP
"""
from __future__ import annotations

import threading
from typing import Callable

from ..rpc.client.session import RPCSession, connect
from ..rpc.client.tracker_session import TrackerError, TrackerSession, WaitStatus
from .local import current_farm, default_tracker, parse_address


def open_session(
    address: str | tuple[str, int] | None = None,
    *,
    key: str | None = None,
    tracker: str | tuple[str, int] | None = None,
    priority: int = 1,
    session_timeout: float = 0,
    timeout: float | None = None,
    on_wait: Callable[[WaitStatus], None] | None = None,
    cancel: threading.Event | None = None,
    progress: bool | None = None,
    auth_token: str | None = None,
    wait: bool = False,
) -> RPCSession:
    """Connect to a server (``address``; a proxy too, with ``key``) or get a free device of ``key`` from a tracker.

    Without ``address`` the device comes from ``tracker`` (default: the
    default tracker, see ``workbench.farm.default_tracker``); ``key`` defaults
    to the embedded farm's first key, or the only key the tracker serves.
    While queued, ``on_wait`` gets a ``WaitStatus`` about every quarter second;
    ``timeout`` bounds the wait, and setting ``cancel`` (a ``threading.Event``)
    or Ctrl-C withdraws the request from the tracker's queue. A key no server
    is registered for fails at once with a ``KeyNotFoundError`` naming the keys
    there are and the closest one, unless ``wait=True`` (then it queues until
    one registers, like TVM's client).
    """
    if address is not None:
        if tracker is not None:
            raise ValueError("give a server address or a tracker, not both")
        host, port = parse_address(address, "server")
        return connect(host, port, key=key or "", session_timeout=session_timeout, auth_token=auth_token,
                       connect_timeout=timeout or 10.0)
    tracker_addr = parse_address(tracker) if tracker is not None else default_tracker()
    with TrackerSession(tracker_addr) as session:
        if key is None:
            key = _default_key(session, tracker_addr)
        return session.request(key, priority=priority, session_timeout=session_timeout, timeout=timeout,
                               auth_token=auth_token, on_wait=on_wait, cancel=cancel, progress=progress, wait=wait)


def _default_key(tracker: TrackerSession, addr: tuple[str, int]) -> str:
    farm = current_farm()
    if farm is not None and farm.tracker_addr == addr:
        return next(iter(farm.servers_per_key))
    keys = [row["key"] for row in tracker.summary().key_rows() if row["total"]]
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise TrackerError(f"the tracker at {tracker.address} has no servers registered; start one "
                           f"(python -m workbench.exec.rpc_server --tracker {tracker.address} --key NAME) "
                           "or wait for one: key=NAME, wait=True (%rpc_connect --key NAME --wait)")
    raise TrackerError(f"the tracker at {tracker.address} serves several keys ({', '.join(keys)}): name one with key=")
