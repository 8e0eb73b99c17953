"""The Jupyter server extension behind the lab's Devices sidebar (docs/lab-extension.md).

REST handlers under ``{base_url}workbench/api/``, authenticated like every
Jupyter handler (the token, or the login cookie with XSRF), on Jupyter's own
port:

    GET    workbench/api/trackers         the trackers this server knows, with their keys and servers
    POST   workbench/api/trackers         {"address": "host:port"}: add one to the list
    DELETE workbench/api/trackers/<id>    remove one added that way
    POST   workbench/api/farm             {"action": "start" | "stop"}: the lab's embedded farm

``pip install -e ".[notebook]"`` enables it (``jupyter server extension list``
shows ``workbench.lab_extension``). ``python -m workbench.lab`` hands it the
lab's farm: ``WORKBENCH_LAB_FARM=local=2`` (the servers) with
``WORKBENCH_TRACKER`` (where its tracker listens) start that farm here, in the
Jupyter server, so that the sidebar can stop and start it again on the same
port.

    >>> TrackerList().add("10.0.0.7:9190")["origin"]       # doctest: +SKIP
    'added'
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # imported where first used: a plain `jupyter lab` loads this extension, and pays nothing for them
    from .farm.local import LocalFarm
    from .rpc.client.tracker_session import TrackerSession

log = logging.getLogger(__name__)

FARM_ENV = "WORKBENCH_LAB_FARM"  # "local=2 aarch64-qemu=1": the farm python -m workbench.lab hands over
POLL_INTERVAL_S = 1.0  # how often a tracker someone looks at is asked
DEMAND_S = 10.0  # trackers are polled while the API was read this recently
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 10.0)  # between tries at a tracker that does not answer
QUERY_TIMEOUT_S = 2.0
MAX_ADDED = 16


class TrackerEntry:
    """One tracker of the list: its last summary as rows, and whether it answers."""

    def __init__(self, address: tuple[str, int], origin: str):
        self.address, self.origin = address, origin
        self.status, self.error, self.updated = "connecting", None, None
        self.keys: list[dict[str, Any]] = []
        self.servers: list[dict[str, Any]] = []
        self.failures, self.next_try = 0, 0.0
        self._session: TrackerSession | None = None

    @property
    def id(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def poll(self, now: float) -> None:
        """Read the tracker's summary (one connection kept open; a failure backs off)."""
        if now < self.next_try:
            return
        try:
            if self._session is None:
                from .rpc.client.tracker_session import TrackerSession

                self._session = TrackerSession(self.address, timeout=QUERY_TIMEOUT_S)
            summary = self._session.summary()
            self.keys = [{"key": r["key"], "free": r["free"], "total": r["total"], "waiting": r["pending"]}
                         for r in summary.key_rows()]
            self.servers = [{name: str(r.get(name, "")) for name in ("address", "key", "arch", "target", "devices")}
                            for r in summary.server_rows()]
            self.status, self.error, self.updated, self.failures = "ok", None, time.time(), 0
            self.next_try = now + POLL_INTERVAL_S
        except Exception as exc:  # any failure is the tracker's state to show, not the server's problem
            self.close()
            self.status, self.error = "unreachable", _reason(exc)
            self.next_try = now + BACKOFF_S[min(self.failures, len(BACKOFF_S) - 1)]
            self.failures += 1

    def as_json(self, default: tuple[str, int] | None, now: float) -> dict[str, Any]:
        return {
            "id": self.id, "address": self.id, "origin": self.origin, "default": self.address == default,
            "status": self.status, "error": self.error, "updated": self.updated,
            "retry_in": round(max(0.0, self.next_try - now), 1) if self.status == "unreachable" else None,
            "keys": self.keys, "servers": self.servers,
        }

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class LabFarm:
    """The lab's embedded farm: started and stopped from the sidebar, on one tracker port for its whole life."""

    def __init__(self, servers: Mapping[str, int] | None = None, port: int = 0):
        self.servers = dict(servers or {"local": 2})
        self.port = port
        self.state, self.error = "stopped", None
        self.farm: LocalFarm | None = None
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    @property
    def tracker(self) -> tuple[str, int] | None:
        return ("127.0.0.1", self.port) if self.port else None

    def start(self, servers: Mapping[str, int] | None = None, wait: bool = False) -> None:
        """Start the farm in the background (``wait``: here); a no-op while it runs or starts."""
        with self._lock:
            if self.state != "stopped":
                return
            if servers:
                self.servers = dict(servers)
            self.state, self.error = "starting", None
            self._worker = threading.Thread(target=self._start, name="workbench-lab-farm", daemon=True)
            self._worker.start()
        if wait:
            self._worker.join()

    def _start(self) -> None:
        try:
            from .farm.local import LocalFarm

            farm = LocalFarm(self.servers, tracker_port=self.port)
        except Exception as exc:
            log.error("cannot start the lab's farm: %s", exc)
            with self._lock:
                self.state, self.error = "stopped", _reason(exc)
            return
        with self._lock:
            self.farm, self.port, self.state = farm, farm.tracker_addr[1], "running"
        if not os.environ.get("WORKBENCH_TRACKER") and not os.environ.get("TVM_TRACKER_HOST"):
            os.environ["WORKBENCH_TRACKER"] = f"127.0.0.1:{self.port}"  # the kernels started from now on use it
        log.info("the lab's farm runs: tracker 127.0.0.1:%d, servers %s", self.port, self.servers)

    def stop(self, wait: bool = False) -> None:
        with self._lock:
            if self.state != "running":
                return
            self.state = "stopping"
            self._worker = threading.Thread(target=self._stop, name="workbench-lab-farm", daemon=True)
            self._worker.start()
        if wait:
            self._worker.join()

    def _stop(self) -> None:
        farm, self.farm = self.farm, None
        if farm is not None:
            farm.close()
        with self._lock:
            self.state = "stopped"

    def close(self) -> None:
        """End the farm (the Jupyter server stops): wait for a start or stop under way first."""
        worker = self._worker
        if worker is not None:
            worker.join()
        self.stop(wait=True)

    def as_json(self) -> dict[str, Any]:
        tracker = self.tracker
        return {"state": self.state, "tracker": f"{tracker[0]}:{tracker[1]}" if tracker else None,
                "servers": self.servers, "error": self.error}


class TrackerList:
    """What the sidebar shows: the default tracker, the lab farm's, those added in the panel; polled on demand."""

    def __init__(self, farm: LabFarm | None = None):
        self.farm = farm or LabFarm()
        self.added: list[TrackerEntry] = []
        self._entries: dict[tuple[str, int], TrackerEntry] = {}
        self._lock = threading.Lock()
        self._demand = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="workbench-tracker-poller", daemon=True)
        self._poller.start()

    @property
    def default(self) -> tuple[str, int] | None:
        """WORKBENCH_TRACKER (or TVM's variables) as the kernels this server starts see it."""
        try:
            from .farm.local import tracker_from_env

            return tracker_from_env()
        except ValueError:
            return None

    def _wanted(self) -> list[TrackerEntry]:
        """The entries to show, in order (made on first sight, kept while listed)."""
        order: list[tuple[tuple[str, int], str]] = []
        if self.default is not None:
            order.append((self.default, "default"))
        if self.farm.tracker is not None and self.farm.tracker != self.default:
            order.append((self.farm.tracker, "farm"))
        order += [(entry.address, "added") for entry in self.added]
        entries = []
        with self._lock:
            for address, origin in order:
                entry = self._entries.get(address)
                if entry is None:
                    entry = self._entries[address] = TrackerEntry(address, origin)
                entries.append(entry)
        return entries

    def add(self, address: str) -> dict[str, Any]:
        from .farm.local import parse_address

        addr = parse_address(address)  # ValueError: the handler's 400
        for entry in self._wanted():
            if entry.address == addr:
                return entry.as_json(self.default, time.monotonic())
        if len(self.added) >= MAX_ADDED:
            raise ValueError(f"the list holds {MAX_ADDED} added trackers at most: remove one first")
        entry = TrackerEntry(addr, "added")
        with self._lock:
            self._entries[addr] = entry
            self.added.append(entry)
        self._demand = time.monotonic()
        self._wake.set()
        return entry.as_json(self.default, time.monotonic())

    def remove(self, tracker_id: str) -> None:
        for entry in self.added:
            if entry.id == tracker_id:
                with self._lock:
                    self.added.remove(entry)
                    self._entries.pop(entry.address, None)
                entry.close()
                return
        if any(entry.id == tracker_id for entry in self._wanted()):
            raise ValueError(f"{tracker_id} is not one added in the panel: the default tracker and the farm's stay")
        raise KeyError(tracker_id)

    def as_json(self) -> dict[str, Any]:
        """The API's answer; reading it keeps the trackers polled for DEMAND_S seconds."""
        self._demand = time.monotonic()
        self._wake.set()
        now = time.monotonic()
        return {"trackers": [entry.as_json(self.default, now) for entry in self._wanted()],
                "farm": self.farm.as_json()}

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            if now - self._demand > DEMAND_S:  # nobody looks: sleep until someone does
                self._wake.wait()
                self._wake.clear()
                continue
            entries = self._wanted()
            for entry in entries:
                if self._stop.is_set():
                    return
                entry.poll(time.monotonic())
            soonest = min((entry.next_try for entry in entries), default=now + POLL_INTERVAL_S)
            self._stop.wait(max(0.05, min(POLL_INTERVAL_S, soonest - time.monotonic())))

    def close(self) -> None:
        """Stop polling, close the tracker connections and end the lab's farm."""
        self._stop.set()
        self._wake.set()
        self._poller.join(timeout=QUERY_TIMEOUT_S * 2)
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            entry.close()
        self.farm.close()


# -- the Jupyter server side -----------------------------------------------------------
def _handlers(state: TrackerList) -> list:
    import tornado.web
    from jupyter_server.base.handlers import APIHandler

    class Base(APIHandler):
        def fail(self, status: int, message: str) -> None:
            self.set_status(status)
            self.finish(json.dumps({"message": message}))

        def body(self) -> dict[str, Any]:
            try:
                data = json.loads(self.request.body or b"{}")
            except ValueError:
                data = None
            if not isinstance(data, dict):
                raise tornado.web.HTTPError(400, "the body must be a JSON object")
            return data

    class Trackers(Base):
        @tornado.web.authenticated
        def get(self) -> None:
            self.finish(json.dumps(state.as_json()))

        @tornado.web.authenticated
        def post(self) -> None:
            address = self.body().get("address")
            if not isinstance(address, str):
                return self.fail(400, 'give the tracker as {"address": "host:port"}')
            try:
                entry = state.add(address)
            except ValueError as exc:
                return self.fail(400, str(exc))
            self.set_status(201)
            self.finish(json.dumps(entry))

    class Tracker(Base):
        @tornado.web.authenticated
        def delete(self, tracker_id: str) -> None:
            try:
                state.remove(tracker_id)
            except ValueError as exc:
                return self.fail(400, str(exc))
            except KeyError:
                return self.fail(404, f"no tracker {tracker_id} in the list")
            self.set_status(204)
            self.finish()

    class Farm(Base):
        @tornado.web.authenticated
        def get(self) -> None:
            self.finish(json.dumps(state.farm.as_json()))

        @tornado.web.authenticated
        def post(self) -> None:
            data = self.body()
            action, servers = data.get("action"), data.get("servers")
            if action == "start":
                if servers is not None and not _valid_servers(servers):
                    return self.fail(400, 'servers is {"key": count >= 1, ...}, e.g. {"local": 2}')
                state.farm.start(servers)
            elif action == "stop":
                state.farm.stop()
            else:
                return self.fail(400, 'action is "start" or "stop"')
            self.finish(json.dumps(state.farm.as_json()))

    return [(r"trackers", Trackers), (r"trackers/(?P<tracker_id>[^/]+)", Tracker), (r"farm", Farm)]


def _valid_servers(servers: Any) -> bool:
    return (isinstance(servers, dict) and 0 < len(servers) <= 16 and all(
        isinstance(k, str) and k and isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16
        for k, n in servers.items()))


def lab_farm_from_env() -> LabFarm:
    """The farm ``python -m workbench.lab`` hands over (``WORKBENCH_LAB_FARM``), started; else one to start later."""
    spec = os.environ.get(FARM_ENV, "").split()
    if not spec:
        return LabFarm()
    from .farm.__main__ import parse_servers
    from .farm.local import tracker_from_env

    try:
        farm = LabFarm(parse_servers(spec), port=(tracker_from_env() or ("", 0))[1])
    except (ValueError, argparse.ArgumentTypeError) as exc:
        farm = LabFarm()
        farm.error = f"{FARM_ENV}={os.environ[FARM_ENV]!r}: {exc}"
        log.error("cannot start the lab's farm: %s", farm.error)
        return farm
    farm.start()
    return farm


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from jupyter_server.utils import url_path_join

    state = TrackerList(lab_farm_from_env())
    atexit.register(state.close)  # a plain server extension gets no stop hook: the farm ends at exit too
    base = url_path_join(serverapp.web_app.settings["base_url"], "workbench", "api")
    serverapp.web_app.add_handlers(".*$", [(url_path_join(base, pattern), handler)
                                           for pattern, handler in _handlers(state)])
    serverapp.log.info("rpc-workbench: the Devices sidebar's API is at %s", base)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "workbench.lab_extension"}]
