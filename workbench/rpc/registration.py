"""Keeping servers registered with a tracker, driven by an event loop.

A registration publishes what it is (UPDATE_INFO) and offers *slots*: one per
server it stands for (a server has one; a proxy one per idle server behind
it), each under a fresh match key (PUT). A slot is offered again after every
session, and again when the tracker handed its match key out and nobody came.
When the tracker goes away it reconnects with backoff and offers every slot
again. All tracker I/O is short and bounded by timeouts.
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Hashable

from ..errors import RPCError
from .tracker_wire import Code, TrackerConnection

log = logging.getLogger("workbench.rpc.registration")

TRACKER_IO_TIMEOUT_S = 2.0
CHECK_INTERVAL_S = float(os.environ.get("WORKBENCH_TRACKER_CHECK_S", "1.0"))
UNMATCHED_TIMEOUT_S = float(os.environ.get("WORKBENCH_UNMATCHED_TIMEOUT_S", "5.0"))
BACKOFF_START_S, BACKOFF_MAX_S = 0.1, 5.0


@dataclass
class Slot:
    key: str
    matchkey: str
    busy: bool = False  # a session is using it: not on offer
    handed_out_at: float | None = None


class TrackerRegistration:
    def __init__(self, tracker_addr: tuple[str, int], port: int, custom_addr: str | None, info: dict[str, Any]):
        self.tracker_addr = (tracker_addr[0], int(tracker_addr[1]))
        self.port = port
        self.custom_addr = custom_addr
        self.info = dict(info, addr=[custom_addr, port])
        self.slots: dict[Hashable, Slot] = {}
        self.conn: TrackerConnection | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_START_S
        self._next_check = 0.0
        self._resync = False

    # -- what the owner says ----------------------------------------------------------
    def offer(self, slot: Hashable, key: str) -> str:
        """Offer ``slot`` under a new match key (now if connected, else on reconnecting)."""
        entry = self.slots[slot] = Slot(key, f"{key}:{secrets.token_hex(8)}")
        if self.conn is not None:
            self._guard(lambda: self._put(entry))
        return entry.matchkey

    def withdraw(self, slot: Hashable, still_on_offer: bool) -> None:
        """``slot`` is gone; if the tracker may still hand it out, offer everything afresh."""
        if self.slots.pop(slot, None) is not None and still_on_offer:
            self._resync = True

    def find(self, matchkey: str) -> Hashable | None:
        return next((s for s, e in self.slots.items() if e.matchkey == matchkey), None)

    def update_info(self, **fields: Any) -> None:
        self.info.update(fields)
        if self.conn is not None:
            self._guard(lambda: self._call([Code.UPDATE_INFO, self.info], "UPDATE_INFO"))

    # -- driven by the event loop -------------------------------------------------------
    def poll(self, now: float) -> float:
        """Do what is due; return the seconds until something is due again."""
        if self._resync and self.conn is not None:
            self._resync = False
            self.conn.close()
            self.conn = None
            self._retry_at = now
        if self.conn is None:
            if now < self._retry_at:
                return self._retry_at - now
            self._connect(now)
            if self.conn is None:
                return max(0.01, self._retry_at - now)
        if now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL_S
            if any(not e.busy for e in self.slots.values()):
                self._guard(lambda: self._check_handed_out(now))
        return max(0.01, self._next_check - now)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    # -- tracker I/O ------------------------------------------------------------------------
    def _connect(self, now: float) -> None:
        try:
            self.conn = TrackerConnection(*self.tracker_addr, timeout=TRACKER_IO_TIMEOUT_S)
            self._call([Code.UPDATE_INFO, self.info], "UPDATE_INFO")
            for entry in self.slots.values():
                if not entry.busy:
                    self._put(entry)
        except (OSError, RPCError) as exc:
            self._lost(now, exc)
            return
        log.info("registered with the tracker at %s:%d as %s", *self.tracker_addr, self.info.get("key"))
        self._backoff = BACKOFF_START_S

    def _put(self, entry: Slot) -> None:
        entry.handed_out_at = None
        self._call([Code.PUT, entry.key, [self.port, entry.matchkey], self.custom_addr], "PUT")

    def _call(self, message: list, what: str) -> Any:
        reply = self.conn.call(message)
        if what and reply != Code.SUCCESS:
            raise RPCError(f"the tracker answered {what} with {reply!r}")
        return reply

    def _check_handed_out(self, now: float) -> None:
        pending = set(self._call([Code.GET_PENDING_MATCHKEYS], ""))
        for entry in self.slots.values():
            if entry.busy or entry.matchkey in pending:
                entry.handed_out_at = None
            elif entry.handed_out_at is None:
                entry.handed_out_at = now
            elif now - entry.handed_out_at > UNMATCHED_TIMEOUT_S:
                log.info("match key handed out %.0f s ago was not used; offering the slot again", now - entry.handed_out_at)
                entry.matchkey = f"{entry.key}:{secrets.token_hex(8)}"
                self._put(entry)

    def _guard(self, action) -> None:
        try:
            action()
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
