"""Services in their own process: the owner's handle, and the child's entry.

``ServiceProcess`` starts ``python -m <module>``, sends it a JSON config on
stdin, and waits for ``ready PORT`` on its stdout. stdin stays open: when the
owner goes away it closes, and the service stops (``owner_gone`` in its loop).
"""
from __future__ import annotations

import json
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
import weakref
from typing import Any, Callable

START_TIMEOUT_S = 30.0


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream:
            try:
                stream.close()
            except OSError:
                pass


def stop_on_signals() -> None:
    """SIGTERM and SIGINT end the service's loop by SystemExit, so its cleanup runs."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def owner_gone(owner_fd: int) -> bool:
    """The owner's pipe became readable: True if it closed (the owner process is gone)."""
    if os.read(owner_fd, 4096):
        return False
    logging.getLogger(__name__).info("owner process is gone; stopping")
    return True


class ServiceLoop:
    """The event loop of a service process: its listener, its owner's pipe, and whatever it adds.

    Subclasses implement ``_accept()``, ``_event(key, events)`` for the other
    registered objects, and ``stop()``; they may add ``_timeout()`` (seconds
    until they have something to do) and ``_tick()`` (run after every wake-up).
    The loop ends when the owner's pipe closes, ``_running`` turns false, or
    SystemExit (SIGTERM/SIGINT) unwinds it; ``stop()`` always runs.
    """

    def __init__(self, listener: socket.socket | None, owner_fd: int | None):
        self.listener = listener
        self.owner_fd = owner_fd
        self._sel = selectors.DefaultSelector()
        self._running = True

    def run(self) -> None:
        if self.listener is not None:
            self._sel.register(self.listener, selectors.EVENT_READ, None)
        if self.owner_fd is not None:
            self._sel.register(self.owner_fd, selectors.EVENT_READ, "owner")
        try:
            while self._running:
                for key, events in self._sel.select(self._timeout()):
                    if key.data is None:
                        self._accept()
                    elif key.data == "owner":
                        if owner_gone(self.owner_fd):
                            return
                    else:
                        self._event(key, events)
                self._tick()
        finally:
            self.stop()

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


class ServiceProcess:
    """A started service; ``port`` is where it listens. Ends with ``terminate()``, at GC or at exit."""

    def __init__(self, module: str, config: dict[str, Any], what: str):
        self.what = what
        self._proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C in a terminal reaches the owner, which ends the service
        )
        self._finalizer = weakref.finalize(self, _stop, self._proc)
        try:
            self._proc.stdin.write(json.dumps(config) + "\n")
            self._proc.stdin.flush()
            self.port = self._wait_ready()
        except BaseException:
            self.terminate()
            raise

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.5)
            if ready:
                line = self._proc.stdout.readline()
                if line.startswith("ready "):
                    return int(line.split()[1])
                if line.startswith("error "):
                    raise RuntimeError(f"the {self.what} failed to start: {json.loads(line[6:])}")
                if not line:
                    break
            elif self._proc.poll() is not None:
                break
        code = self._proc.poll()
        raise RuntimeError(
            f"the {self.what} process {'exited with status %s' % code if code is not None else 'did not start'} "
            f"within {START_TIMEOUT_S:.0f} s (its log is on this process's stderr)"
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def terminate(self) -> None:
        self._finalizer()


def service_main(run: Callable[[dict[str, Any], Callable[[int], None], int], None]) -> None:
    """The child side: read the config, call ``run(config, ready, owner_fd)``, report start-up errors."""
    config = json.loads(sys.stdin.readline())
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing else may write to the owner's pipe

    def ready(port: int) -> None:
        out.write(f"ready {port}\n")
        out.flush()

    try:
        run(config, ready, 0)
    except SystemExit:
        raise
    except BaseException as exc:
        logging.getLogger(__name__).debug("service failed", exc_info=True)
        out.write(f"error {json.dumps(str(exc))}\n")
        out.flush()
        raise SystemExit(1)


def setup_logging(silent: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if silent else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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


class ServiceHandle:
    """What the owner holds of a service: ``port``, ``pid``, ``alive``, ``terminate()``, a context manager."""

    what = "service"
    host: str
    port: int
    _service: ServiceProcess

    def _start(self, module: str, config: dict[str, Any]) -> None:
        self._service = ServiceProcess(module, config, self.what)
        self.port = self._service.port

    @property
    def pid(self) -> int:
        return self._service.pid

    @property
    def alive(self) -> bool:
        return self._service.alive

    def terminate(self) -> None:
        """Stop the service and everything it started."""
        self._service.terminate()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.terminate()

    def __repr__(self) -> str:
        return f"<rpc.{type(self).__name__} {self.host}:{getattr(self, 'port', '?')} {'running' if self.alive else 'stopped'}>"
