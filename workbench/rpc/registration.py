"""Keeping a server registered with a tracker, driven by the server's event loop.

The server publishes what it is (UPDATE_INFO), offers itself under a fresh
match key (PUT), offers itself again after every session, and again when a
match key the tracker handed out goes unused; when the tracker goes away it
reconnects with backoff. All tracker I/O is short and bounded by timeouts.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from typing import Any

from ..errors import RPCError
from .tracker_wire import Code, TrackerConnection

log = logging.getLogger("workbench.rpc.server")

TRACKER_IO_TIMEOUT_S = 2.0
CHECK_INTERVAL_S = float(os.environ.get("WORKBENCH_TRACKER_CHECK_S", "1.0"))
UNMATCHED_TIMEOUT_S = float(os.environ.get("WORKBENCH_UNMATCHED_TIMEOUT_S", "5.0"))
BACKOFF_START_S, BACKOFF_MAX_S = 0.1, 5.0


class TrackerRegistration:
    def __init__(self, tracker_addr: tuple[str, int], key: str, port: int, custom_addr: str | None, info: dict[str, Any]):
        self.tracker_addr = (tracker_addr[0], int(tracker_addr[1]))
        self.key = key
        self.port = port
        self.custom_addr = custom_addr
        self.info = dict(info, key=f"server:{key}", addr=[custom_addr, port])
        self.conn: TrackerConnection | None = None
        self.matchkey: str | None = None
        self.busy = False  # a session holds the current match key
        self._retry_at = 0.0
        self._backoff = BACKOFF_START_S
        self._next_check = 0.0
        self._handed_out_at: float | None = None

    def poll(self, now: float) -> float:
        """Do what is due; return the seconds until something is due again."""
        if self.conn is None:
            if now < self._retry_at:
                return self._retry_at - now
            self._connect(now)
            if self.conn is None:
                return self._retry_at - now
        if not self.busy and now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL_S
            self._check_handed_out(now)
        return max(0.01, self._next_check - now) if self.conn else max(0.01, self._retry_at - now)

    def _connect(self, now: float) -> None:
        try:
            self.conn = TrackerConnection(*self.tracker_addr, timeout=TRACKER_IO_TIMEOUT_S)
            self._expect_success(self.conn.call([Code.UPDATE_INFO, self.info]), "UPDATE_INFO")
            self._put()
        except (OSError, RPCError) as exc:
            self._lost(now, exc)
            return
        log.info("registered with the tracker at %s:%d as key %r", *self.tracker_addr, self.key)
        self._backoff = BACKOFF_START_S

    def _put(self) -> None:
        self.matchkey = f"{self.key}:{secrets.token_hex(8)}"
        self._handed_out_at = None
        self._expect_success(self.conn.call([Code.PUT, self.key, [self.port, self.matchkey], self.custom_addr]), "PUT")

    def _expect_success(self, reply: Any, what: str) -> None:
        if reply != Code.SUCCESS:
            raise RPCError(f"the tracker answered {what} with {reply!r}")

    def _check_handed_out(self, now: float) -> None:
        """Offer the server again if the tracker handed out its match key and nobody came."""
        try:
            pending = self.conn.call([Code.GET_PENDING_MATCHKEYS])
            if self.matchkey in pending:
                self._handed_out_at = None
            elif self._handed_out_at is None:
                self._handed_out_at = now
            elif now - self._handed_out_at > UNMATCHED_TIMEOUT_S:
                log.info("match key handed out %.0f s ago was not used; registering again", now - self._handed_out_at)
                self._put()
        except (OSError, RPCError) as exc:
            self._lost(now, exc)

    def session_ended(self) -> None:
        """A session that used the match key ended: offer the server again under a new one."""
        self.busy = False
        if self.conn is not None:
            try:
                self._put()
            except (OSError, RPCError) as exc:
                self._lost(time.monotonic(), exc)

    def _lost(self, now: float, reason: Any) -> None:
        if self.conn is not None:
            log.warning("lost the tracker at %s:%d (%s); reconnecting", *self.tracker_addr, reason)
            self.conn.close()
            self.conn = None
        else:
            log.info("tracker at %s:%d unreachable (%s); retrying in %.1f s", *self.tracker_addr, reason, self._backoff)
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
