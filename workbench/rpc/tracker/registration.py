"""Keeping servers registered with a tracker, driven by an event loop; registration tokens.

A registration publishes what it is (UPDATE_INFO) and offers *slots*: one per
server it stands for (a server has one; a proxy one per idle server behind
it), each under a fresh match key (PUT). A slot is offered again after every
session, and again when the tracker handed its match key out and nobody came.
When the tracker goes away it reconnects with backoff and offers every slot
again. All tracker I/O is short and bounded by timeouts.

A tracker or proxy started with an auth token takes registrations only from
servers that prove they know it (their ``registration_token``): the service
sends a fresh nonce, the server answers ``registration_proof(token, nonce,
service)``, and the token itself never crosses the wire. A captured proof is
worth nothing later: every nonce is random and good for one attempt. At a
tracker the exchange is two messages of workbench's own codes, outside TVM's
range (docs/protocol.md, "Registration tokens")::

    -> [100]                      <- [0, {"auth": true, "nonce": "<64 hex digits>"}]
    -> [101, "<64 hex digits>"]   <- 0, or [-1, "wrong registration token ..."]

    >>> len(registration_proof("s3cret", bytes(32), "tracker"))
    32
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Hashable

from ...errors import AuthenticationError, ConnectionClosedError, ProtocolError, RPCError
from .wire import Code, TrackerConnection

log = logging.getLogger("workbench.rpc.registration")

TRACKER_IO_TIMEOUT_S = 2.0
CHECK_INTERVAL_S = float(os.environ.get("WORKBENCH_TRACKER_CHECK_S", "1.0"))
UNMATCHED_TIMEOUT_S = float(os.environ.get("WORKBENCH_UNMATCHED_TIMEOUT_S", "5.0"))
BACKOFF_START_S, BACKOFF_MAX_S = 0.1, 5.0

# registration tokens
REGISTRATION_TOKEN_ENV = "WORKBENCH_REGISTRATION_TOKEN"  # what a server (or proxy) proves when it registers
TRACKER_TOKEN_ENV = "WORKBENCH_TRACKER_TOKEN"  # rpc_tracker --auth-token
PROXY_TOKEN_ENV = "WORKBENCH_PROXY_TOKEN"  # rpc_proxy --auth-token
AUTH_NONCE = 100  # tracker request [100]: answered [0, {"auth": bool, "nonce": hex}] (workbench only, not TVM)
AUTH_PROOF = 101  # tracker request [101, hex proof]: answered 0 or [-1, message]
NONCE_BYTES = 32
_LABELS = {"tracker": b"workbench-tracker-register-v1", "proxy": b"workbench-proxy-register-v1"}


def registration_proof(token: str, nonce: bytes, service: str) -> bytes:
    """HMAC-SHA256 over ``label + nonce`` with the token as key; the label names the service (tracker or proxy).

    The labels differ from each other and from the session handshake's, so no
    proof stands for another.
    """
    return hmac.new(token.encode(), _LABELS[service] + nonce, hashlib.sha256).digest()


def check_token(name: str, value: Any) -> str | None:
    """A token option: None or "" (none), else a non-empty string; a clear ValueError otherwise."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string (or None: no token), not {type(value).__name__}")
    return value


def token_or_env(name: str, value: str | None, env: str) -> str | None:
    """``value`` if given, else ``$env`` (empty or unset: no token)."""
    return check_token(env, os.environ.get(env)) if value is None else check_token(name, value)


class RefusalLog:
    """How loudly to log a refusal: WARNING the first time each kind of refusal (numbers aside) is seen, INFO for
    repeats, until ``reset()`` (a registration that went through). A server retrying with a wrong token says so
    once, not every few seconds.

        >>> refusals = RefusalLog()
        >>> [logging.getLevelName(refusals.level(t)) for t in ("wrong (1)", "wrong (2)", "other")]
        ['WARNING', 'INFO', 'WARNING']
    """

    MAX_KINDS = 16

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def level(self, text: str) -> int:
        kind = re.sub(r"\d+(?:\.\d+)*", "#", text)
        if kind in self._seen:
            return logging.INFO
        if len(self._seen) < self.MAX_KINDS:
            self._seen.add(kind)
        return logging.WARNING

    def reset(self) -> None:
        self._seen.clear()


@dataclass
class Slot:
    key: str
    matchkey: str
    busy: bool = False  # a session is using it: not on offer
    handed_out_at: float | None = None


class TrackerRegistration:
    """Registers one server (or a proxy's servers) with a tracker; ``token``: the tracker's registration token."""

    def __init__(self, tracker_addr: tuple[str, int], port: int, custom_addr: str | None, info: dict[str, Any],
                 token: str | None = None):
        self.tracker_addr = (tracker_addr[0], int(tracker_addr[1]))
        self.token = token
        self._refusals = RefusalLog()
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
            if self.token:
                self._authenticate()
            self._call([Code.UPDATE_INFO, self.info], "UPDATE_INFO")
            for entry in self.slots.values():
                if not entry.busy:
                    self._put(entry)
        except AuthenticationError as exc:
            self._refused(now, exc)
            return
        except (OSError, RPCError) as exc:
            self._lost(now, exc)
            return
        log.info("registered with the tracker at %s:%d as %s", *self.tracker_addr, self.info.get("key"))
        self._backoff = BACKOFF_START_S
        self._refusals.reset()

    def _authenticate(self) -> None:
        """Prove to the tracker that this server knows its registration token (over a nonce of the tracker's)."""
        where = "%s:%d" % self.tracker_addr
        try:
            reply = self.conn.call([AUTH_NONCE])
        except ConnectionClosedError:
            raise AuthenticationError(
                f"the tracker at {where} closed the connection when asked for a registration nonce: it takes no "
                f"registration token (a TVM tracker?); start this server without registration_token "
                f"(--registration-token, ${REGISTRATION_TOKEN_ENV})"
            ) from None
        body = reply[1] if isinstance(reply, list) and len(reply) == 2 and reply[0] == Code.SUCCESS else None
        if not isinstance(body, dict):
            raise ProtocolError(f"the tracker at {where} answered the request for a registration nonce with "
                                f"{str(reply)[:100]}")
        if not body.get("auth"):
            log.debug("the tracker at %s takes no registration token: registering without one", where)
            return
        try:
            nonce = bytes.fromhex(body.get("nonce") or "")
        except (TypeError, ValueError):
            nonce = b""
        if len(nonce) != NONCE_BYTES:
            raise ProtocolError(f"the tracker at {where} sent a registration nonce that is not {NONCE_BYTES} bytes")
        reply = self.conn.call([AUTH_PROOF, registration_proof(self.token, nonce, "tracker").hex()])
        if reply != Code.SUCCESS:
            raise AuthenticationError(_refusal(reply))

    def _put(self, entry: Slot) -> None:
        entry.handed_out_at = None
        self._call([Code.PUT, entry.key, [self.port, entry.matchkey], self.custom_addr], "PUT")

    def _call(self, message: list, what: str) -> Any:
        reply = self.conn.call(message)
        if what and reply != Code.SUCCESS:
            if isinstance(reply, list) and len(reply) == 2 and reply[0] == Code.FAIL and isinstance(reply[1], str):
                raise AuthenticationError(_refusal(reply))  # a token tracker refused a server without the token
            raise RPCError(f"the tracker answered {what} with {str(reply)[:200]}")
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
        except AuthenticationError as exc:
            self._refused(time.monotonic(), exc)
        except (OSError, RPCError) as exc:
            self._lost(time.monotonic(), exc)

    def _refused(self, now: float, exc: RPCError) -> None:
        """The tracker refused this registration: a WARNING line per kind of reason (repeats at INFO); retry with
        backoff."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        text = str(exc)
        log.log(self._refusals.level(text),
                "the tracker at %s:%d refused to register this server: %s; retrying in %.1f s",
                *self.tracker_addr, text, self._backoff)
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    def _lost(self, now: float, reason: Any) -> None:
        if self.conn is not None:
            log.warning("lost the tracker at %s:%d (%s); reconnecting", *self.tracker_addr, reason)
            self.conn.close()
            self.conn = None
        else:
            log.info("tracker at %s:%d unreachable (%s); retrying in %.1f s", *self.tracker_addr, reason, self._backoff)
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)


def _refusal(reply: Any) -> str:
    """The text of a tracker's ``[-1, message]`` refusal (or of an unexpected reply)."""
    if isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], str):
        return reply[1][:500]
    return f"it answered {str(reply)[:100]}"
