"""The event loop every network service runs: its listener, its owner's pipe, signals, refusals.

``ServiceLoop`` is what the server, the tracker and the proxy each subclass;
``bind_port`` picks their port and ``refuse`` closes a connection they will not
serve. When the owner's pipe closes (``owner_gone``), the loop ends.
"""
from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import threading
import time
from typing import Any

# accept() failing for want of resources: refuse, and accept again after a pause (never a busy loop)
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_PAUSE_S = (0.05, 1.0)  # first and longest pause
log = logging.getLogger("workbench.rpc.service")
_OWNER, _WAKEUP = object(), object()  # selector data of the owner's pipe and of the signal wake-up pipe


def owner_gone(owner_fd: int) -> bool:
    """The owner's pipe became readable: True if it closed (the owner process is gone)."""
    if os.read(owner_fd, 4096):
        return False
    logging.getLogger(__name__).info("owner process is gone; stopping")
    return True


def peer_closed(sock: socket.socket) -> bool:
    """True if the peer has closed (or reset) the connection; reads nothing it may have sent."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def refuse(sock: socket.socket, data: bytes = b"") -> None:
    """Close a connection we will not serve, after ``data`` (best effort, never blocking).

    What the peer already sent is read first, so that the close is a FIN and
    the peer reads ``data`` rather than a reset.
    """
    try:
        sock.setblocking(False)
        try:
            for _ in range(4):
                if not sock.recv(65536):
                    break
        except OSError:
            pass
        if data:
            sock.send(data)
    except OSError:
        pass
    finally:
        sock.close()


def _spare_fd() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class ServiceLoop:
    """The event loop of a service process: its listener, its owner's pipe, and whatever it adds.

    Subclasses implement ``_accept()`` (with ``accept_connection()``),
    ``_event(key, events)`` for the other registered objects, and ``stop()``;
    they may add ``_timeout()`` (seconds until they have something to do),
    ``_tick()`` (run after every wake-up) and ``_free_fds()`` (close something
    to make room at the file-descriptor limit). The loop ends when the owner's
    pipe closes, ``_running`` turns false, or SIGTERM/SIGINT arrives; a signal
    only sets a flag (and wakes the loop through a pipe), so it never cuts a
    step in half, and ``stop()`` always runs, with those signals ignored.
    """

    limit_refusal: bytes = b""  # what a connection refused at the fd limit is told before it is closed

    def __init__(self, listener: socket.socket | None, owner_fd: int | None):
        self.listener = listener
        self.owner_fd = owner_fd
        self._sel = selectors.DefaultSelector()
        self._running = True
        self._resume_at: float | None = None  # accepting paused until then (out of file descriptors)
        self._pause_s = ACCEPT_PAUSE_S[0]
        self._spare = _spare_fd()  # given up to accept-and-refuse one connection at the fd limit
        self._wakeup: tuple[int, int] | None = None

    def run(self) -> None:
        if self.listener is not None:
            self.listener.setblocking(False)
            self._sel.register(self.listener, selectors.EVENT_READ, None)
        if self.owner_fd is not None:
            self._sel.register(self.owner_fd, selectors.EVENT_READ, _OWNER)
        previous = self._catch_stop_signals()
        try:
            while self._running:
                timeout = self._timeout()
                if self._resume_at is not None:
                    wait = max(0.0, self._resume_at - time.monotonic())
                    timeout = wait if timeout is None else min(timeout, wait)
                for key, events in self._sel.select(timeout):
                    data = key.data
                    if data is None:
                        self._accept()
                    elif data is _OWNER:
                        if owner_gone(self.owner_fd):
                            return
                    elif data is _WAKEUP:
                        self._drain_wakeup()
                    else:
                        self._event(key, events)
                if self._resume_at is not None and time.monotonic() >= self._resume_at:
                    self._resume_at = None
                    self._sel.register(self.listener, selectors.EVENT_READ, None)
                self._tick()
        finally:
            for signum in previous:
                signal.signal(signum, signal.SIG_IGN)  # stop() is not cut short by a second signal
            try:
                self.stop()
            finally:
                self._close_wakeup()
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
                if self._spare is not None:
                    os.close(self._spare)
                    self._spare = None

    # -- stop signals ---------------------------------------------------------------------
    def _catch_stop_signals(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = (read_end, write_end)
        self._sel.register(read_end, selectors.EVENT_READ, _WAKEUP)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

        def stop(signum: int, frame: Any) -> None:
            self._running = False

        return {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wakeup[0], 512):
                pass
        except OSError:
            pass

    def _close_wakeup(self) -> None:
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def close_in_child(self) -> None:
        """In a process forked from the loop: close the loop's descriptors and undo its signal handling."""
        self._close_wakeup()
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
        if self.listener is not None:
            self.listener.close()
        if self.owner_fd is not None:
            os.close(self.owner_fd)
        self._sel.close()

    # -- accepting ---------------------------------------------------------------------------
    def accept_connection(self) -> tuple[socket.socket, Any] | None:
        """Accept one connection (non-blocking), or None.

        Out of file descriptors (or memory), it first asks ``_free_fds()`` to
        make room and tries again; failing that it accepts one connection with
        a spare descriptor, sends it ``limit_refusal`` and closes it, and stops
        accepting for a pause that doubles while the shortage lasts (50 ms to
        1 s), so the loop never spins on a listener it cannot serve.
        """
        for attempt in (0, 1):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:
                    log.debug("accept failed: %s", exc)
                    return None
                if attempt == 0 and self._free_fds():
                    continue
                self._at_limit(exc)
                return None
            self._pause_s = ACCEPT_PAUSE_S[0]
            return sock, addr
        return None

    def _free_fds(self) -> bool:
        """Close something to make room for a new connection; True if something was closed."""
        return False

    def _at_limit(self, exc: OSError) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None
            try:
                sock, _ = self.listener.accept()
            except OSError:
                sock = None
            if sock is not None:
                refuse(sock, self.limit_refusal)
            self._spare = _spare_fd()
        if self._pause_s == ACCEPT_PAUSE_S[0]:
            log.warning("cannot accept connections (%s): refusing them, and accepting again in %.2f s",
                        exc.strerror or exc, self._pause_s)
        if self._resume_at is None:
            self._sel.unregister(self.listener)
        self._resume_at = time.monotonic() + self._pause_s
        self._pause_s = min(self._pause_s * 2, ACCEPT_PAUSE_S[1])

    # -- for subclasses ------------------------------------------------------------------------
    def _timeout(self) -> float | None:
        return None

    def _tick(self) -> None:
        pass

    def _accept(self) -> None:
        raise NotImplementedError

    def _event(self, key: selectors.SelectorKey, events: int) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def bind_port(host: str, port: int, port_end: int, reuse_addr: bool = True) -> socket.socket:
    """Listen on the first free port of ``[port, port_end)`` (port 0: any free port)."""
    last = max(port_end, port + 1)
    errors = []
    for candidate in range(port, last) if port else [0]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
            sock.listen(128)
            return sock
        except OSError as exc:
            sock.close()
            errors.append(exc)
            if exc.errno not in (98, 13):  # EADDRINUSE, EACCES: try the next port
                break
    raise OSError(
        f"cannot listen on {host} ports {port}..{last - 1}: {errors[-1] if errors else 'no port'}; "
        "free a port or pass another port/port_end (port=0 picks any free port)"
    )
