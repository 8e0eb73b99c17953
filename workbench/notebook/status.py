"""The kernel's side of the lab's session status item: the comm ``workbench.status`` (docs/lab-extension.md).

After ``%load_ext workbench`` the kernel tells the lab what session it holds
(key, server, or its place in a tracker's queue while ``%rpc_connect`` waits),
after every cell that changed it. A frontend that opens the comm (a reloaded
page) gets the state at once.

    >>> reporter = StatusReporter(get_ipython())    # doctest: +SKIP   (what %load_ext does)
    >>> reporter.state()["status"]                  # doctest: +SKIP
    'none'
"""
from __future__ import annotations

import logging
from typing import Any

from ..rpc.client.session import RPCSession
from ..rpc.client.tracker_session import WaitStatus

log = logging.getLogger(__name__)

TARGET = "workbench.status"
DEFAULT_NAME = "remote"


class StatusReporter:
    """Sends the session state on every open ``workbench.status`` comm when it changes."""

    def __init__(self, shell: Any):
        self.shell = shell
        self.comms: list[Any] = []
        self.trackers: dict[int, str] = {}  # id(session) -> the tracker it came from (%rpc_connect says)
        self._last: dict[str, Any] | None = None
        self._waiting: dict[str, Any] | None = None
        try:
            import comm

            self._manager = comm.get_comm_manager()
            self._manager.register_target(TARGET, self._opened_by_frontend)
            self._last = self.state()
            self._add(comm.create_comm(target_name=TARGET, data=self._last))
        except Exception as exc:  # no kernel (a terminal IPython): nothing to report to
            log.debug("no status comm: %s", exc)
            self._manager = None
        shell.events.register("post_run_cell", self.update)

    # -- the state ------------------------------------------------------------------------
    def _session(self) -> tuple[str, RPCSession] | None:
        """The session the notebook holds: ``remote`` if bound and open, else the first open one bound."""
        ns = self.shell.user_ns
        candidates = [(DEFAULT_NAME, ns.get(DEFAULT_NAME))] + [(k, v) for k, v in list(ns.items()) if not k.startswith("_")]
        for name, value in candidates:
            if isinstance(value, RPCSession) and getattr(value, "_ended", None) is None:
                return name, value
        return None

    def state(self) -> dict[str, Any]:
        """The whole state, as the comm carries it (no key "state": nbclient would take it for a widget's)."""
        if self._waiting is not None:
            return dict(self._waiting)
        found = self._session()
        if found is None:
            return {"loaded": True, "status": "none", "name": None, "key": None, "server": None, "tracker": None,
                    "position": None, "text": "RPC: no session", "card_html": None}
        name, session = found
        key = session.info.get("key") or ""
        try:
            card = session._repr_html_()
        except Exception as exc:  # a view must not break the status
            card = None
            log.debug("no card for %s: %s", session, exc)
        return {"loaded": True, "status": "connected", "name": name, "key": key or None, "server": session.address,
                "tracker": self.trackers.get(id(session)), "position": None,
                "text": f"RPC: {key + ' @ ' if key else ''}{session.address}", "card_html": card}

    # -- sending ----------------------------------------------------------------------------
    def update(self, *_: Any) -> None:
        """Send the state if it changed (after each cell)."""
        state = self.state()
        if state == self._last:
            return
        self._last = state
        for channel in list(self.comms):
            try:
                channel.send(state)
            except Exception as exc:
                log.debug("status comm gone: %s", exc)
                self.comms.remove(channel)

    def waiting(self, status: WaitStatus, tracker: str) -> None:
        """``%rpc_connect``'s on_wait: the place in the queue, sent while the cell runs."""
        place = f"#{status.position} in the queue" if status.position else "queued"
        self._waiting = {"loaded": True, "status": "waiting", "name": None, "key": status.key, "server": None,
                         "tracker": tracker, "position": status.position,
                         "text": f"RPC: waiting for {status.key} ({place})", "card_html": None}
        self.update()

    def connected(self, session: RPCSession | None, tracker: str | None) -> None:
        """``%rpc_connect`` ended (``session`` None: it failed): back to what the namespace holds."""
        self._waiting = None
        if session is not None and tracker:
            self.trackers[id(session)] = tracker

    def _add(self, channel: Any) -> None:
        self.comms.append(channel)
        channel.on_close(lambda _msg: channel in self.comms and self.comms.remove(channel))

    def _opened_by_frontend(self, channel: Any, _msg: Any) -> None:
        self._add(channel)
        channel.send(self.state())

    def close(self) -> None:
        """``%unload_ext``: stop reporting, close the comms."""
        try:
            self.shell.events.unregister("post_run_cell", self.update)
        except ValueError:
            pass
        if self._manager is not None:
            self._manager.unregister_target(TARGET, self._opened_by_frontend)
        for channel in self.comms:
            channel.close({"loaded": False})
        self.comms.clear()
