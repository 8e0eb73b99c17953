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
import signal
import subprocess
import sys
import time
import weakref
from typing import Any, Callable

START_TIMEOUT_S = 30.0
LOG_LEVEL_ENV = "WORKBENCH_LOG_LEVEL"  # the level a service started from Python logs at (set by its owner)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    """Until its loop runs, SIGTERM and SIGINT end a service by SystemExit (``ServiceLoop.run`` then
    takes them over: a flag the loop checks between steps)."""

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


# a service gets its tokens in its config (on stdin), never in its environment, where its children would find them
TOKEN_VARIABLES = ("WORKBENCH_RPC_TOKEN", "WORKBENCH_REGISTRATION_TOKEN", "WORKBENCH_TRACKER_TOKEN",
                   "WORKBENCH_PROXY_TOKEN")


class ServiceProcess:
    """A started service; ``port`` is where it listens. Ends with ``terminate()``, at GC or at exit."""

    def __init__(self, module: str, config: dict[str, Any], what: str):
        self.what = what
        env = {name: value for name, value in os.environ.items() if name not in TOKEN_VARIABLES}  # in config
        env.setdefault(LOG_LEVEL_ENV, logging.getLevelName(owner_log_level()))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
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
                if not line:  # its stdout closes as it exits, a moment before its status can be collected
                    try:
                        self._proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
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


def owner_log_level() -> int:
    """The level a service started from this process logs at: this process's level for ``workbench``
    when it set up logging, else WARNING (what Python shows when nobody set up logging)."""
    logger = logging.getLogger("workbench.rpc")
    return logger.getEffectiveLevel() if logger.hasHandlers() else logging.WARNING


def setup_logging(silent: bool) -> None:
    """Logging of a service process (to stderr), unless its entry point set it up already.

    Started from Python (``rpc.Server``, ``rpc.Tracker``, ``rpc.Proxy``,
    ``LocalFarm``), a service logs at its owner's level (``$WORKBENCH_LOG_LEVEL``,
    set by ``ServiceProcess``): WARNING and above when the owner set up no
    logging, so a script prints nothing it did not ask for. Run from a command
    line it logs INFO. ``silent=True``: WARNING and above in any case.
    """
    if logging.getLogger().handlers:
        return
    level = logging.INFO
    named = os.environ.get(LOG_LEVEL_ENV)
    if named:
        level = logging.getLevelName(named.strip().upper())
        if not isinstance(level, int):
            level = logging.WARNING
    if silent:
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def configure_cli_logging(silent: bool = False) -> None:
    """What the command-line tools do first: INFO lines (WARNING and above with ``--silent``) on stderr.

        >>> configure_cli_logging(silent=True)  # doctest: +SKIP
    """
    logging.basicConfig(level=logging.WARNING if silent else logging.INFO, format=LOG_FORMAT, stream=sys.stderr)


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
