"""Copying bytes between two connected sockets, both ways, in large blocks.

Linux moves the bytes with splice(2) through a pipe (no copy into Python);
elsewhere a 1 MiB buffer is reused. Used by the proxy and by sessions made
with ``session_constructor_args=["rpc.Connect", ...]``.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

from .protocol import unpaced_on_loopback

log = logging.getLogger("workbench.rpc.relay")
CHUNK = 1 << 20


def _half_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def pump(src: socket.socket, dst: socket.socket) -> bool:
    """Copy ``src`` to ``dst`` until ``src`` ends, then half-close ``dst``. False after an error.

    Out of file descriptors for the pipe splice(2) needs, it copies through a buffer instead.
    """
    try:
        pipe = None
        if hasattr(os, "splice"):
            try:
                pipe = os.pipe()
            except OSError as exc:
                log.info("relay copies through a buffer: no pipe (%s)", exc.strerror or exc)
        if pipe is not None:
            read_end, write_end = pipe
            try:
                try:
                    import fcntl

                    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, CHUNK)
                except OSError:
                    pass
                while moved := os.splice(src.fileno(), write_end, CHUNK, flags=os.SPLICE_F_MOVE):
                    while moved:
                        moved -= os.splice(read_end, dst.fileno(), moved, flags=os.SPLICE_F_MOVE)
            finally:
                os.close(read_end)
                os.close(write_end)
        else:
            buf = memoryview(bytearray(CHUNK))
            while n := src.recv_into(buf):
                dst.sendall(buf[:n])
    except OSError as exc:
        log.debug("relay stopped: %s", exc)
        return False
    finally:
        _half_close(dst)
    return True


class Relay:
    """Relays ``a`` and ``b`` both ways in a thread; owns and closes both sockets."""

    def __init__(self, a: socket.socket, b: socket.socket, on_done: Callable[["Relay"], None] | None = None):
        self.a, self.b = a, b
        for sock in (a, b):
            unpaced_on_loopback(sock)
        self._on_done = on_done
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)

    def start(self) -> "Relay":
        self._thread.start()
        return self

    def _run(self) -> None:
        back = threading.Thread(target=self._pump_back, name="relay-back", daemon=True)
        back.start()
        if not pump(self.a, self.b):
            self.stop()
        back.join()
        for sock in (self.a, self.b):
            sock.close()
        if self._on_done:
            self._on_done(self)

    def _pump_back(self) -> None:
        if not pump(self.b, self.a):
            self.stop()

    def stop(self) -> None:
        """End both directions now (the thread then closes the sockets)."""
        for sock in (self.a, self.b):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def relay(a: socket.socket, b: socket.socket) -> None:
    """Relay until both directions end (in this thread, plus one helper thread)."""
    r = Relay(a, b)
    r._run()
