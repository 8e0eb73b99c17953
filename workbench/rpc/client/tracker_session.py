"""``connect_tracker`` and ``TrackerSession``: ask a tracker (ours or TVM's) for devices.

    >>> tracker = rpc.connect_tracker("127.0.0.1", 9190)          # doctest: +SKIP
    >>> print(tracker.text_summary())                             # doctest: +SKIP
    >>> remote = tracker.request("rasp4", priority=2, timeout=60) # doctest: +SKIP

A request for a key no server is registered for fails at once with a
``KeyNotFoundError`` that names the keys there are (and their free servers)
and the closest one; ``wait=True`` queues for it instead, as TVM's client does.
"""
from __future__ import annotations

import difflib
import functools
import getpass
import itertools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from ...errors import (
    ConnectionClosedError,
    KeyNotFoundError,
    ProtocolError,
    RPCError,
    SessionCrashedError,
    TrackerError,
)
from .session import RPCSession, connect
from ..tracker.summary import TrackerSummary, format_summary, server_keys
from ..tracker.wire import Code, TrackerConnection

log = logging.getLogger("workbench.rpc.tracker")
T = TypeVar("T")


class RequestCancelled(TrackerError):
    """A queued request was withdrawn through its ``cancel`` event."""


WAIT_STEP_S = 0.25
_request_ids = itertools.count(1)


@dataclass(frozen=True)
class WaitStatus:
    """Where a queued request stands: seconds waited, 1-based place in the queue, requests pending, servers of the key.

    ``position`` is None where the tracker does not tell (TVM's); the others are None until the first look.
    ``keys`` maps every key that has servers to ``(free, total)`` (None until the first look).
    """

    key: str
    waited: float
    position: int | None
    pending: int | None
    servers: int | None
    keys: dict[str, tuple[int, int]] | None = field(default=None, hash=False)

    def describe(self) -> str:
        """"2nd in the queue for 'rasp' (keys: rasp 0 of 1 free, local 2 of 2 free)", or what is known of the queue."""
        if self.servers == 0:
            text = f"no server is registered for key {self.key!r} yet"
        elif self.position is not None:
            text = f"{_ordinal(self.position)} in the queue for {self.key!r}"
        elif self.pending is not None:
            text = f"{self.pending} request(s) waiting for {self.key!r}"
        else:
            text = f"waiting for {self.key!r}"
        if self.keys is not None:
            text += f" (keys: {describe_keys(self.keys)})" if self.keys else " (no server is registered for any key)"
        return text


MAX_KEYS_SHOWN = 8


def registered_keys(summary: TrackerSummary) -> dict[str, tuple[int, int]]:
    """``{key: (free, total)}`` for every key with a registered server (or a free slot) in a SUMMARY.

    A key whose servers are all busy is registered; a queue the tracker keeps
    only for clients waiting on a key nobody serves is not.

        >>> registered_keys(TrackerSummary({"queue_info": {"rasp": {"free": 0, "pending": 1}, "typo": {"free": 0, "pending": 1}},
        ...                                 "server_info": [{"key": "server:rasp", "addr": ["10.0.0.7", 9091]}]}))
        {'rasp': (0, 1)}
    """
    return {row["key"]: (row["free"], row["total"]) for row in summary.key_rows() if row["total"] or row["free"]}


def describe_keys(keys: dict[str, tuple[int, int]]) -> str:
    """``"local 2 of 2 free, rasp4 0 of 1 free"``: at most MAX_KEYS_SHOWN, the most free first, then "and N more".

        >>> describe_keys({"rasp4": (0, 1), "local": (2, 2)})
        'local 2 of 2 free, rasp4 0 of 1 free'
    """
    order = sorted(keys.items(), key=lambda kv: (-kv[1][0], kv[0]))
    parts = [f"{key} {free} of {total} free" for key, (free, total) in order[:MAX_KEYS_SHOWN]]
    if len(order) > MAX_KEYS_SHOWN:
        parts.append(f"and {len(order) - MAX_KEYS_SHOWN} more")
    return ", ".join(parts)


def closest_key(key: str, keys: Sequence[str]) -> str | None:
    """The key ``key`` most likely meant (difflib, ignoring case; a key that contains it or is contained), or None.

        >>> closest_key("rasp", ["local", "rasp4"]), closest_key("RASP4", ["rasp4"]), closest_key("gpu", ["local"])
        ('rasp4', 'rasp4', None)
    """
    by_folded = {k.casefold(): k for k in sorted(keys, reverse=True)}
    folded = key.casefold()
    match = difflib.get_close_matches(folded, list(by_folded), n=1, cutoff=0.6)
    if match:
        return by_folded[match[0]]
    if folded:  # "rasp" for "raspberry-pi-4", which difflib finds too different
        within = sorted((k for k in by_folded if min(len(k), len(folded)) >= 3 and (folded in k or k in folded)),
                        key=lambda k: (abs(len(k) - len(folded)), k))
        if within:
            return by_folded[within[0]]
    return None


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _wait_status(reply: Any, key: str, user: str) -> WaitStatus:
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == Code.SUCCESS and isinstance(reply[1], dict)):
        raise ValueError(f"unexpected SUMMARY reply {reply!r}")
    summary = TrackerSummary(reply[1])
    queue = summary.get("queue_info", {}).get(key, {})
    servers = sum(key in server_keys(str(s.get("key", ""))) for s in summary.get("server_info", []))
    return WaitStatus(key, 0.0, summary.position(key, user), queue.get("pending"), servers, registered_keys(summary))


@functools.lru_cache(maxsize=None)
def _user() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except Exception:  # no user database in a container: any label will do
        return "workbench"


class TrackerSession:
    """A connection to a tracker. Use ``rpc.connect_tracker(host, port)``."""

    def __init__(self, addr: tuple[str, int], *, timeout: float | None = 10.0):
        self._addr = (addr[0], int(addr[1]))
        self._timeout = timeout
        self._conn: TrackerConnection | None = TrackerConnection(*self._addr, timeout=timeout)

    @property
    def address(self) -> str:
        return f"{self._addr[0]}:{self._addr[1]}"

    def _connection(self) -> TrackerConnection:
        if self._conn is None:
            self._conn = TrackerConnection(*self._addr, timeout=self._timeout)
        return self._conn

    def _call(self, message: list) -> Any:
        reused = self._conn is not None
        conn = self._connection()
        try:
            return conn.call(message)
        except (ConnectionError, ConnectionClosedError):
            self._drop()
            if not reused:
                raise
        except (OSError, RPCError):
            self._drop()
            raise
        return self._connection().call(message)  # the tracker restarted since: once more, on a new connection

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        """Close the connection to the tracker."""
        self._drop()

    def __enter__(self) -> "TrackerSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TrackerSession {self.address}>"

    # -- status -----------------------------------------------------------------------
    def summary(self) -> TrackerSummary:
        """``{"queue_info": {key: {"free": n, "pending": n}}, "server_info": [{"key": .., "addr": ..}, ...]}``.

        A dict, with tables: ``.keys_frame()``, ``.servers_frame()``, and an HTML view in notebooks.
        """
        reply = self._call([Code.SUMMARY])
        if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == Code.SUCCESS and isinstance(reply[1], dict)):
            raise TrackerError(f"the tracker at {self.address} answered SUMMARY with {reply!r}")
        return TrackerSummary(reply[1])

    def text_summary(self) -> str:
        """The server list and queue status as ``query_rpc_tracker`` prints them."""
        return format_summary(self.summary())

    def servers_for(self, key: str) -> int:
        return sum(key in server_keys(str(s.get("key", ""))) for s in self.summary().get("server_info", []))

    def keys(self) -> dict[str, tuple[int, int]]:
        """``{key: (free, total)}`` for every key with a registered server, busy or not.

            >>> tracker.keys()                                  # doctest: +SKIP
            {'local': (2, 2), 'rasp4': (0, 1)}
        """
        return registered_keys(self.summary())

    def check_key(self, key: str) -> None:
        """Raise ``KeyNotFoundError`` if no server is registered for ``key`` (what ``request`` does first).

        The message names the keys there are, with their free servers, and the
        closest one. A tracker whose SUMMARY cannot be read is not checked.

            >>> tracker.check_key("rasp")                       # doctest: +SKIP
            KeyNotFoundError: no session for key 'rasp' ... did you mean 'rasp4'? ...
        """
        try:
            keys = self.keys()
        except TrackerError as exc:  # a SUMMARY we cannot read (not a connection error): queue as TVM's client does
            log.info("tracker %s: cannot check key %r (%s); queueing for it", self.address, key, exc)
            return
        if key in keys:
            return
        closest = closest_key(key, list(keys))
        there = f"the keys with servers are {describe_keys(keys)}" if keys else "no server is registered for any key"
        guess = f"; did you mean {closest!r}?" if closest is not None else "."
        raise KeyNotFoundError(
            f"no session for key {key!r} from the tracker at {self.address} (0 server(s) registered for it): "
            f"{there}{guess} Start a {key!r} server (python -m workbench.exec.rpc_server --tracker {self.address} "
            f"--key {key}) or pass wait=True (%rpc_connect --wait) to queue until one registers",
            key=key, keys=keys, closest=closest,
        )

    # -- sessions ---------------------------------------------------------------------
    def request(
        self,
        key: str,
        priority: int = 1,
        session_timeout: float = 0,
        max_retry: int = 5,
        session_constructor_args: Sequence[Any] | None = None,
        *,
        timeout: float | None = None,
        auth_token: str | None = None,
        on_wait: Callable[[WaitStatus], None] | None = None,
        cancel: threading.Event | None = None,
        progress: bool | None = None,
        wait: bool = False,
    ) -> RPCSession:
        """Wait for a free server of ``key`` and connect to it.

        A ``key`` no server is registered for fails at once with a
        ``KeyNotFoundError`` naming the keys there are, their free servers and
        the closest one; ``wait=True`` queues for it until one registers. A key
        whose servers are all busy always queues.

        Higher ``priority`` is served first. ``max_retry`` bounds the attempts
        (a server that vanished after being granted costs one); ``timeout``
        bounds the whole wait in seconds (None: wait as long as it takes).
        While queued, ``on_wait(WaitStatus)`` is called about every quarter
        second and a progress bar shows the time waited (``progress=False``
        hides it); setting the ``cancel`` event, a timeout, Ctrl-C or any error
        withdraws the request from the tracker's queue.

            >>> stop = threading.Event()                                      # doctest: +SKIP
            >>> tracker.request("rasp", on_wait=print, cancel=stop)           # doctest: +SKIP
            >>> tracker.request("rasp", wait=True, timeout=600)  # the board is still booting  # doctest: +SKIP
        """
        from ...progress import wait_bar

        if max_retry < 1:
            raise ValueError(f"max_retry must be >= 1, not {max_retry}")
        start = time.monotonic()
        last: BaseException | None = None
        with wait_bar(f"waiting for {key!r}", progress) as bar:
            def waiting(status: WaitStatus) -> None:
                bar.update(status.waited, status.describe())
                if on_wait is not None:
                    on_wait(status)

            for _ in range(max_retry):
                remaining = None if timeout is None else timeout - (time.monotonic() - start)
                if remaining is not None and remaining <= 0:
                    break
                try:
                    if not wait:
                        self.check_key(key)
                    host, port, matchkey = self._grant(key, priority, remaining, waiting, cancel, start)
                except socket.timeout:
                    break
                except (RequestCancelled, KeyNotFoundError):
                    raise
                except (OSError, RPCError) as exc:  # the tracker went away (restarting?): next attempt reconnects
                    log.info("tracker %s: %s; asking again", self.address, exc)
                    last = exc
                    continue
                try:
                    left = None if timeout is None else timeout - (time.monotonic() - start)
                    return connect(host, port, key=matchkey, session_timeout=session_timeout,
                                   session_constructor_args=session_constructor_args, auth_token=auth_token,
                                   connect_timeout=10.0 if left is None else min(10.0, max(0.5, left)))
                except (OSError, RPCError) as exc:
                    log.info("server %s:%s for key %r failed: %s; asking the tracker again", host, port, key, exc)
                    last = exc
        waited = time.monotonic() - start
        others = ""
        try:
            keys = self.keys()
            count = f"{keys.get(key, (0, 0))[1]} server(s) registered for it"
            if key not in keys:  # waited for a key nobody serves: say which ones there are
                others = f"; the keys with servers are {describe_keys(keys)}" if keys else "; no key has servers"
        except (OSError, RPCError):
            count = "the tracker did not say how many servers it has for it"
        reason = f"; last error: {last}" if last else ""
        raise TrackerError(
            f"no session for key {key!r} from the tracker at {self.address} after {waited:.1f} s "
            f"({count}){others}{reason}"
        )

    def _grant(
        self,
        key: str,
        priority: int,
        timeout: float | None,
        on_wait: Callable[[WaitStatus], None] | None = None,
        cancel: threading.Event | None = None,
        start: float | None = None,
    ) -> tuple[str, int, str]:
        """Queue one REQUEST and wait for its grant; any way out but the grant withdraws it (closes the connection).

        Without ``on_wait`` and ``cancel`` it blocks in one read (the fast path the tracker benchmark times).
        """
        conn = self._connection()
        start = time.monotonic() if start is None else start
        user = f"{_user()}/{os.getpid()}.{next(_request_ids)}"  # unique: how we find our place in the queue
        deadline = None if timeout is None else time.monotonic() + timeout
        watcher: TrackerConnection | None = None
        next_look = 0.0
        status = WaitStatus(key, 0.0, None, None, None)
        try:
            conn.send([Code.REQUEST, key, user, priority])
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise socket.timeout(f"no {key!r} server within {timeout:.1f} s")
                step = WAIT_STEP_S if on_wait or cancel else None
                conn.sock.settimeout(step if deadline is None else min(step or deadline - now, deadline - now))
                try:
                    reply = conn.recv()
                    break
                except socket.timeout:
                    pass
                if cancel is not None and cancel.is_set():
                    raise RequestCancelled(f"the request for a {key!r} device was cancelled")
                now = time.monotonic()
                if now >= next_look:  # where are we in the queue? asked on a second connection, once a second
                    next_look = now + 1.0
                    try:
                        watcher = watcher or TrackerConnection(*self._addr, timeout=2.0)
                        status = _wait_status(watcher.call([Code.SUMMARY]), key, user)
                    except (OSError, RPCError, ValueError):
                        if watcher is not None:
                            watcher.close()
                        watcher = None
                status = WaitStatus(key, now - start, status.position, status.pending, status.servers, status.keys)
                if on_wait is not None:
                    on_wait(status)
        except BaseException:  # timeout, cancel, Ctrl-C, a lost tracker: leave the queue now
            self._drop()
            raise
        finally:
            if watcher is not None:
                watcher.close()
            if self._conn is not None:
                self._conn.sock.settimeout(self._timeout)
        if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == Code.SUCCESS):
            raise TrackerError(f"the tracker at {self.address} answered REQUEST with {reply!r}")
        host, port, matchkey = reply[1]
        return str(host), int(port), str(matchkey)

    def request_and_run(
        self,
        key: str,
        func: Callable[[RPCSession], T],
        priority: int = 1,
        session_timeout: float = 0,
        max_retry: int = 2,
        *,
        timeout: float | None = None,
        wait: bool = False,
    ) -> T:
        """Run ``func(session)`` on a server of ``key``; if the server drops mid-run, run it again on another.

        ``timeout`` bounds each wait for a free server (None: as long as it takes);
        an unregistered ``key`` fails at once unless ``wait=True`` (see ``request``).

            >>> tracker.request_and_run("rasp", lambda remote: remote.listdir("."), timeout=60)  # doctest: +SKIP
        """
        last = ""
        for attempt in range(1, max_retry + 1):
            session = self.request(key, priority=priority, session_timeout=session_timeout, timeout=timeout,
                                   wait=wait)
            try:
                return func(session)
            except (ConnectionClosedError, SessionCrashedError, ProtocolError, ConnectionError) as exc:
                session.close()
                last = str(exc)  # the text only: the exception's traceback would hold this frame
                log.warning("attempt %d/%d on key %r: the server dropped (%s)", attempt, max_retry, key, last)
            except BaseException:
                session.close()  # func failed (or the session timed out): free the server now
                raise
            finally:
                # the dropped session's error holds this frame in its traceback, a cycle only the garbage
                # collector frees: without this the server we return from would stay busy until it runs
                del session
        raise TrackerError(f"{getattr(func, '__name__', 'func')} failed on key {key!r} {max_retry} times; last error: {last}")


def connect_tracker(url: str, port: int) -> TrackerSession:
    """Connect to an RPC tracker (ours, or apache-tvm's)."""
    return TrackerSession((url, port))


