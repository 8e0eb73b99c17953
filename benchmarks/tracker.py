"""Tracker figures: our tracker and apache-tvm's, each with N registered server entries.

    python benchmarks/run.py               # prints the "tracker" table after the main one
    python benchmarks/run.py --no-tracker  # leaves it out

For N = 10, 100 and 1000 registered entries, each (tracker, client) pair gives:

* register: one server registering on a fresh connection: connect, magic
  handshake, UPDATE_INFO and PUT, each answered (median);
* grant: a REQUEST on an open tracker connection until the tracker hands out
  a server (median and p99; the session's connect is not counted); after each
  grant the entry is offered again (PUT, untimed), so the count stays N;
* summary: SUMMARY until the reply (median), whose server list has N entries.

The N entries are N raw connections, one per entry, each sending what a
server sends (UPDATE_INFO ``{"key": "server:bench", "addr": [null, port]}``
then PUT ``[3, "bench", [port, matchkey], null]``) with ports nothing listens
on: nobody connects to them, and N real servers would not fit on a laptop.

Clients: "ours" is TrackerSession (grant: ``TrackerSession._grant``, the wire
part of ``request``; summary: ``summary()``) and TrackerRegistration (the
server's registration path); "tvm stock" is apache-tvm's own code
(``tvm.rpc.connect_tracker(..).summary()``; REQUEST through ``base.sendjson``
and ``base.recvjson`` on its session's socket, as its ``request`` does before
it connects to the server; registration as its ``rpc_server`` does it);
"tuned raw" is the small client below: TCP_NODELAY, length and body in one
write, TCP_QUICKACK before every read. Clients whose messages stall on Nagle
and delayed ACKs (40-90 ms a message) run a bounded number of operations;
the table says how many.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

if __package__:
    from . import harness
else:  # run as a script: this directory is sys.path[0]
    import harness

KEY = "bench"
MAGIC = struct.pack("<i", 0x2F271)
LENGTH = struct.Struct("<i")
SUCCESS, PING, PUT, REQUEST, UPDATE_INFO, SUMMARY = 0, 1, 3, 4, 5, 6
IO_TIMEOUT_S = 10.0  # every socket this module opens
SETTLE_TIMEOUT_S = 5.0
TRACKER_START_S = 60.0
POPULATION_PORT = 20000  # entry i says it serves on 20000 + i (nothing listens there)
REGISTER_PORT = 40000  # the servers registered while timing say 40000 + j
QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux

TARGETS = (  # our tracker with our client, at the largest N
    ("register_ms", 2.0, "register"),
    ("grant_median_ms", 1.0, "grant median"),
    ("grant_p99_ms", 5.0, "grant p99"),
    ("summary_ms", 5.0, "summary"),
)
GROWTH_LIMIT = 15.0  # figure(1000) / figure(100): linear growth is 10x, quadratic 100x; 1.5x slack for noise
FIGURES = ("register_ms", "grant_median_ms", "grant_p99_ms", "summary_ms")
GROWTH_CHECKED = ("register_ms", "grant_median_ms", "summary_ms")  # medians: a p99 of a few hundred samples is scheduler noise


@dataclass(frozen=True)
class TrackerConfig:
    sizes: tuple[int, ...] = (10, 100, 1000)
    grants: int = 400
    warmup: int = 20
    summaries: int = 40
    registers: int = 40
    slow_grants: int = 8  # for the clients that stall on Nagle (40-90 ms a message)
    slow_summaries: int = 4
    slow_registers: int = 4
    loop_budget_s: float = 8.0  # wall-clock cap of each timing loop
    budget_s: float = 150.0  # after this, what is left is skipped (n/a)
    tvm: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> "TrackerConfig":
        small = dict(grants=100, warmup=10, summaries=10, registers=10, slow_grants=3, slow_summaries=2,
                     slow_registers=2, loop_budget_s=3.0, budget_s=60.0)
        return cls(**{**small, **overrides})


@dataclass(frozen=True)
class Pair:
    tracker: str  # "ours" or "tvm"
    client: str  # "ours", "tuned raw" or "tvm stock"
    slow: bool  # bounded operation counts: its messages stall on Nagle

    @property
    def needs_tvm(self) -> bool:
        return self.tracker == "tvm" or self.client == "tvm stock"


PAIRS = (
    Pair("ours", "ours", False),
    Pair("ours", "tuned raw", False),
    Pair("ours", "tvm stock", True),
    Pair("tvm", "tuned raw", False),
    Pair("tvm", "tvm stock", True),
    Pair("tvm", "ours", True),
)


@dataclass
class TrackerResults:
    """Rows as they are measured (a time limit keeps what was done), and what went wrong."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def row(self, pair: Pair, n: int) -> dict[str, Any]:
        for row in self.rows:
            if (row["tracker"], row["client"], row["n"]) == (pair.tracker, pair.client, n):
                return row
        row = {"tracker": pair.tracker, "client": pair.client, "n": n, "bounded": pair.slow,
               **{f: None for f in FIGURES}, "register_count": 0, "grant_count": 0, "summary_count": 0,
               "missing": {}}
        self.rows.append(row)
        return row

    def mark_missing(self, reason: str) -> None:
        """Every figure not measured yet, and without a reason, is n/a for ``reason``."""
        for row in self.rows:
            for figure in FIGURES:
                if row[figure] is None:
                    row["missing"].setdefault(figure, reason)

    def get(self, tracker: str, client: str, n: int, figure: str) -> float | None:
        for row in self.rows:
            if (row["tracker"], row["client"], row["n"]) == (tracker, client, n):
                return row[figure]
        return None


@contextlib.contextmanager
def attempt(row: dict[str, Any], figures: tuple[str, ...], passthrough: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Run a measurement; if it fails, the figures it did not set are n/a with the reason, and the run goes on."""
    try:
        yield
    except passthrough:
        raise
    except Exception as exc:
        for figure in figures:
            if row[figure] is None:
                row["missing"].setdefault(figure, harness.reason_of(exc))


# -- the tuned raw client ---------------------------------------------------------------
def _quickack(sock: socket.socket) -> None:
    """ACK what arrives at once: a peer that writes length and body separately (TVM's tracker, without
    TCP_NODELAY) holds the body back until the length is ACKed, and a delayed ACK takes 40 ms."""
    if QUICKACK is not None:
        sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)


class RawConnection:
    """A tracker connection at the wire: TCP_NODELAY, length and body in one write, TCP_QUICKACK on reads."""

    def __init__(self, port: int):
        self.sock = socket.create_connection((harness.HOST, port), timeout=IO_TIMEOUT_S)
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._buf = bytearray()
            self.sock.sendall(MAGIC)
            echo = self._take(4)
            if echo != MAGIC:
                raise ConnectionError(f"the tracker answered the magic with {echo.hex()}")
        except BaseException:
            self.sock.close()
            raise

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            _quickack(self.sock)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the tracker closed the connection")
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def call(self, message: Any) -> Any:
        body = json.dumps(message, separators=(",", ":")).encode()
        _quickack(self.sock)
        self.sock.sendall(LENGTH.pack(len(body)) + body)
        (size,) = LENGTH.unpack(self._take(4))
        return json.loads(self._take(size))

    def close(self) -> None:
        self.sock.close()


def _expect_success(reply: Any, what: str) -> None:
    if reply != SUCCESS:
        raise RuntimeError(f"the tracker answered {what} with {reply!r}")


def _expect_grant(reply: Any) -> tuple[str, int, str]:
    if not (isinstance(reply, list) and len(reply) == 2 and reply[0] == SUCCESS):
        raise RuntimeError(f"the tracker answered REQUEST with {reply!r}")
    host, port, matchkey = reply[1]
    return str(host), int(port), str(matchkey)


def _info(port: int) -> dict[str, Any]:
    return {"key": f"server:{KEY}", "addr": [None, port]}


class Population:
    """N registered server entries, one raw connection each (like N servers); offers an entry again when granted."""

    def __init__(self, tracker_port: int):
        self.tracker_port = tracker_port
        self.conns: dict[int, RawConnection] = {}
        self._serial = itertools.count()

    def matchkey(self) -> str:
        return f"{KEY}:{next(self._serial)}"  # TVM's tracker splits it at the last ":" to find the key

    def grow(self, n: int) -> None:
        while len(self.conns) < n:
            port = POPULATION_PORT + len(self.conns)
            conn = RawConnection(self.tracker_port)
            self.conns[port] = conn
            _expect_success(conn.call([UPDATE_INFO, _info(port)]), "UPDATE_INFO")
            self.offer(port)

    def offer(self, port: int) -> None:
        conn = self.conns.get(port)
        if conn is not None:  # else: a server registered while timing, now gone
            _expect_success(conn.call([PUT, KEY, [port, self.matchkey()], None]), "PUT")

    def free(self) -> tuple[int, int, int]:
        """(free, pending, servers listed) as the tracker's summary says."""
        conn = next(iter(self.conns.values()))
        reply = conn.call([SUMMARY])
        queue = reply[1]["queue_info"].get(KEY, {})
        return queue.get("free", 0), queue.get("pending", 0), len(reply[1]["server_info"])

    def settle(self, n: int) -> None:
        """Wait until the tracker has exactly ``n`` free entries (closed registrations processed)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            state = self.free()
            if state[0] == n and state[1] == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the tracker does not settle at {n} free entries: (free, pending, servers) = {state}")
            time.sleep(0.01)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()


# -- the clients ------------------------------------------------------------------------
class RawClient:
    def __init__(self, tracker_port: int):
        self.tracker_port = tracker_port
        self.conn = RawConnection(tracker_port)

    def grant(self) -> tuple[str, int, str]:
        return _expect_grant(self.conn.call([REQUEST, KEY, "bench", 1]))

    def summary(self) -> dict[str, Any]:
        return self.conn.call([SUMMARY])[1]

    def register(self, port: int, matchkey: str) -> float:
        begin = time.perf_counter()
        conn = RawConnection(self.tracker_port)
        try:
            _expect_success(conn.call([UPDATE_INFO, _info(port)]), "UPDATE_INFO")
            _expect_success(conn.call([PUT, KEY, [port, matchkey], None]), "PUT")
            return time.perf_counter() - begin
        finally:
            conn.close()

    def close(self) -> None:
        self.conn.close()


class OursClient:
    """TrackerSession for grants and summaries; TrackerRegistration (the server's path) for registering."""

    def __init__(self, tracker_port: int):
        from workbench.rpc.client.tracker_session import TrackerSession

        self.tracker_port = tracker_port
        self.session = TrackerSession((harness.HOST, tracker_port))

    def grant(self) -> tuple[str, int, str]:
        return self.session._grant(KEY, 1, None)  # request() minus connecting to the server

    def summary(self) -> dict[str, Any]:
        return self.session.summary()

    def register(self, port: int, matchkey: str) -> float:
        from workbench.rpc.tracker.registration import TrackerRegistration

        begin = time.perf_counter()
        registration = TrackerRegistration((harness.HOST, self.tracker_port), port, None, {"key": f"server:{KEY}"})
        registration.offer(0, KEY)  # not connected yet: recorded, offered by _connect
        registration._connect(time.monotonic())  # connect, magic, UPDATE_INFO, PUT: what poll() does first
        elapsed = time.perf_counter() - begin
        connected = registration.conn is not None
        registration.close()
        if not connected:
            raise RuntimeError("TrackerRegistration did not register (its log says why)")
        return elapsed

    def close(self) -> None:
        self.session.close()


class StockClient:
    """apache-tvm's own client code, as its TrackerSession and rpc_server use it."""

    def __init__(self, tracker_port: int):
        import tvm.rpc
        from tvm.rpc import base

        self.base = base
        self.tracker_port = tracker_port
        self.session = tvm.rpc.connect_tracker(harness.HOST, tracker_port)
        self.session._sock.settimeout(IO_TIMEOUT_S)

    def grant(self) -> tuple[str, int, str]:
        # TrackerSession.request up to the point where it connects to the granted server
        self.base.sendjson(self.session._sock, [self.base.TrackerCode.REQUEST, KEY, "", 1])
        return _expect_grant(self.base.recvjson(self.session._sock))

    def summary(self) -> dict[str, Any]:
        return self.session.summary()

    def register(self, port: int, matchkey: str) -> float:
        base = self.base
        begin = time.perf_counter()
        sock = base.connect_with_retry((harness.HOST, self.tracker_port))  # tvm/rpc/server.py, _listen_loop
        try:
            sock.settimeout(IO_TIMEOUT_S)
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
                raise RuntimeError("not an RPC tracker")
            base.sendjson(sock, [base.TrackerCode.UPDATE_INFO, {"key": f"server:{KEY}", "addr": (None, port)}])
            _expect_success(base.recvjson(sock), "UPDATE_INFO")
            base.sendjson(sock, [base.TrackerCode.PUT, KEY, (port, matchkey), None])
            _expect_success(base.recvjson(sock), "PUT")
            return time.perf_counter() - begin
        finally:
            sock.close()

    def close(self) -> None:
        self.session.close()


CLIENTS: dict[str, Callable[[int], Any]] = {"ours": OursClient, "tuned raw": RawClient, "tvm stock": StockClient}


# -- the trackers -----------------------------------------------------------------------
@contextlib.contextmanager
def ours_tracker() -> Iterator[int]:
    from workbench import rpc

    tracker = rpc.Tracker(host=harness.HOST, port=0, silent=True)
    try:
        yield tracker.port
    finally:
        tracker.terminate()


def _end_group(proc: subprocess.Popen) -> None:
    """End the TVM tracker: its popen_worker child first (the tracker, waiting on it, reaps it), then the rest
    of its process group, then the tracker itself."""
    children = harness.children(proc.pid)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while any(os.path.exists(f"/proc/{pid}") for pid in children) and time.monotonic() < deadline:
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _text(path: str) -> str:
    with open(path) as f:
        return f.read()


@contextlib.contextmanager
def tvm_tracker(results: TrackerResults) -> Iterator[int]:
    """``python -m tvm.exec.rpc_tracker`` in its own process group (it runs the tracker in a child), ended with it."""
    with tempfile.NamedTemporaryFile("w+", prefix="workbench-bench-tvm-tracker-", suffix=".log") as log:
        first = harness.free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", harness.HOST, "--port", str(first),
             "--port-end", str(first + 50)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )
        try:
            port = None
            deadline = time.monotonic() + TRACKER_START_S
            while port is None:
                found = re.search(r"bind to [\d.]+:(\d+)", _text(log.name))
                if found:
                    port = int(found.group(1))
                elif proc.poll() is not None or time.monotonic() > deadline:
                    tail = _text(log.name).strip().splitlines()[-1:] or ["no output"]
                    raise RuntimeError(f"TVM's tracker did not start ({tail[0]})")
                else:
                    time.sleep(0.05)
            yield port
        finally:
            _end_group(proc)
            warnings = [line for line in _text(log.name).splitlines() if " WARNING " in line]
            if warnings:
                results.facts["tvm_tracker_warnings"] = len(warnings)


def coalesced_handshake(port: int) -> str:
    """Send the magic and a PING in one write (one segment on loopback); say what the tracker did."""
    body = json.dumps([PING]).encode()
    with socket.create_connection((harness.HOST, port), timeout=3.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(MAGIC + LENGTH.pack(len(body)) + body)
        data = b""
        try:
            while len(data) < 8 or len(data) < 8 + LENGTH.unpack_from(data, 4)[0]:
                _quickack(sock)
                chunk = sock.recv(4096)
                if not chunk:
                    return f"breaks: the tracker closed the connection (after {len(data)} bytes)"
                data += chunk
        except ConnectionResetError:
            return "breaks: the tracker reset the connection"
        except socket.timeout:
            return f"breaks: no answer within 3 s ({len(data)} bytes)"
    if data[:4] != MAGIC:
        return f"breaks: the magic came back as {data[:4].hex()}"
    reply = json.loads(data[8:])
    return "ok: magic echoed, PING answered" if reply == SUCCESS else f"breaks: PING answered {reply!r}"


# -- measuring --------------------------------------------------------------------------
def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def timed_loop(op: Callable[[], float], count: int, budget_s: float) -> list[float]:
    """Seconds of up to ``count`` runs of ``op`` (which returns its own duration); at least one."""
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(max(count, 1)):
        samples.append(op())
        if time.perf_counter() > deadline:
            break
    return samples


def measure_pair(pair: Pair, n: int, population: Population, cfg: TrackerConfig, results: TrackerResults,
                 passthrough: tuple[type[BaseException], ...]) -> None:
    row = results.row(pair, n)
    grants, summaries, registers, warmup = (
        (cfg.slow_grants, cfg.slow_summaries, cfg.slow_registers, 1) if pair.slow
        else (cfg.grants, cfg.summaries, cfg.registers, cfg.warmup)
    )
    with attempt(row, FIGURES, passthrough):
        population.settle(n)
        client = CLIENTS[pair.client](population.tracker_port)
        try:
            with attempt(row, ("grant_median_ms", "grant_p99_ms"), passthrough):

                def grant() -> float:
                    begin = time.perf_counter()
                    _, port, _ = client.grant()
                    elapsed = time.perf_counter() - begin
                    population.offer(port)  # untimed: the count stays n
                    return elapsed

                timed_loop(grant, warmup, cfg.loop_budget_s)
                samples = timed_loop(grant, grants, cfg.loop_budget_s)
                row["grant_median_ms"] = statistics.median(samples) * 1e3
                row["grant_p99_ms"] = p99(samples) * 1e3
                row["grant_count"] = len(samples)
            with attempt(row, ("summary_ms",), passthrough):

                def summary() -> float:
                    begin = time.perf_counter()
                    data = client.summary()
                    elapsed = time.perf_counter() - begin
                    free = data["queue_info"].get(KEY, {}).get("free")
                    if free != n or len(data["server_info"]) < n:
                        raise RuntimeError(f"summary lists {len(data['server_info'])} servers, {free} free; expected {n}")
                    return elapsed

                timed_loop(summary, 1 if pair.slow else 2, cfg.loop_budget_s)
                samples = timed_loop(summary, summaries, cfg.loop_budget_s)
                row["summary_ms"] = statistics.median(samples) * 1e3
                row["summary_count"] = len(samples)
        finally:
            client.close()
        with attempt(row, ("register_ms",), passthrough):
            serial = itertools.count()
            samples = timed_loop(lambda: client.register(REGISTER_PORT + next(serial), population.matchkey()),
                                 registers, cfg.loop_budget_s)
            row["register_ms"] = statistics.median(samples) * 1e3
            row["register_count"] = len(samples)


def measure(cfg: TrackerConfig, results: TrackerResults,
            passthrough: tuple[type[BaseException], ...] = ()) -> TrackerResults:
    """Fill ``results`` tracker by tracker, N by N (what a time limit interrupts stays measured).

    ``passthrough``: exceptions that end the whole run instead of marking one figure n/a (a section timeout).
    """
    began = time.monotonic()
    tvm_ok = cfg.tvm
    if cfg.tvm:
        try:
            import tvm
            import tvm.rpc  # noqa: F401

            results.facts["tvm_version"] = getattr(tvm, "__version__", "?")
        except Exception as exc:
            tvm_ok = False
            results.facts["tvm_absent"] = f"import tvm failed ({harness.reason_of(exc)})"
    pairs_of = {side: [p for p in PAIRS if p.tracker == side and (tvm_ok or not p.needs_tvm)] for side in ("ours", "tvm")}
    for pair in pairs_of["ours"] + pairs_of["tvm"]:
        for n in cfg.sizes:
            results.row(pair, n)
    try:
        harness.ensure_fd_limit(2 * max(cfg.sizes) + 256)
        _measure_trackers(cfg, results, pairs_of, began, passthrough)
    finally:
        results.facts["elapsed_s"] = time.monotonic() - began
    return results


def _measure_trackers(cfg: TrackerConfig, results: TrackerResults, pairs_of: dict[str, list[Pair]], began: float,
                      passthrough: tuple[type[BaseException], ...]) -> None:
    trackers = {"ours": ours_tracker, "tvm": lambda: tvm_tracker(results)}
    for side, pairs in pairs_of.items():
        if not pairs:
            continue
        try:
            with trackers[side]() as port:
                try:
                    results.facts[f"handshake_{side}"] = coalesced_handshake(port)
                except passthrough:
                    raise
                except Exception as exc:
                    results.facts[f"handshake_{side}"] = f"not checked ({harness.reason_of(exc)})"
                population = Population(port)
                try:
                    for n in cfg.sizes:
                        population.grow(n)
                        for pair in pairs:
                            if time.monotonic() - began > cfg.budget_s:
                                row = results.row(pair, n)
                                for figure in FIGURES:
                                    row["missing"].setdefault(figure, f"skipped: the {cfg.budget_s:g} s budget was spent")
                                continue
                            measure_pair(pair, n, population, cfg, results, passthrough)
                finally:
                    population.close()
        except passthrough:
            raise
        except Exception as exc:
            results.warnings.append(f"{side} tracker: {harness.reason_of(exc)}")
            for row in results.rows:
                if row["tracker"] == side:
                    for figure in FIGURES:
                        if row[figure] is None:
                            row["missing"].setdefault(figure, harness.reason_of(exc))


# -- the report -------------------------------------------------------------------------
def checks(cfg: TrackerConfig, results: TrackerResults) -> list[dict[str, Any]]:
    """Targets on our tracker with our client at the largest N, and growth from the 2nd largest N to it."""
    big = max(cfg.sizes)
    out = []
    for figure, limit, label in TARGETS:
        value = results.get("ours", "ours", big, figure)
        out.append({"check": f"{label} at N={big}", "value": value, "unit": "ms", "target": f"<= {limit:g} ms",
                    "pass": None if value is None else value <= limit})
    smaller = sorted(cfg.sizes)[-2] if len(cfg.sizes) > 1 else None
    if smaller:
        for figure, _, label in TARGETS:
            a, b = results.get("ours", "ours", big, figure), results.get("ours", "ours", smaller, figure)
            growth = a / b if a is not None and b else None
            checked = figure in GROWTH_CHECKED
            out.append({"check": f"growth {label}, N={big} / N={smaller}", "value": growth, "unit": "x",
                        "target": f"<= {GROWTH_LIMIT:g}x" if checked else "(info)",
                        "pass": None if growth is None or not checked else growth <= GROWTH_LIMIT})
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def missing_notes(results: TrackerResults) -> list[str]:
    """One line per reason: which (tracker/client, N, figure) cells are n/a; whole rows and pairs said once."""
    grouped: dict[str, dict[str, dict[int, list[str]]]] = {}
    for row in results.rows:
        for figure, reason in row["missing"].items():
            pairs = grouped.setdefault(reason, {})
            pairs.setdefault(f"{row['tracker']}/{row['client']}", {}).setdefault(row["n"], []).append(figure)
    lines = []
    for reason, pairs in grouped.items():
        where = []
        for pair, sizes in pairs.items():
            whole = [n for n, figures in sizes.items() if len(figures) == len(FIGURES)]
            where += [f"{pair} N={n}: {', '.join(f)}" for n, f in sizes.items() if n not in whole]
            if whole:
                where.append(f"{pair} N={','.join(map(str, whole))}: every figure")
        lines.append(f"n/a ({reason}): {'; '.join(where)}")
    return lines


def report(cfg: TrackerConfig, results: TrackerResults) -> tuple[str, dict[str, Any]]:
    header = ["tracker", "client", "N", "register ms", "grant median ms", "grant p99 ms", "summary ms", "ops (reg/grant/sum)"]
    cells = []
    for row in results.rows:
        counts = f"{row['register_count']}/{row['grant_count']}/{row['summary_count']}"
        cells.append([row["tracker"], row["client"] + (" *" if row["bounded"] else ""), str(row["n"]),
                      *(_fmt(row[f]) for f in FIGURES), counts])
    checked = checks(cfg, results)
    check_cells = [[c["check"], f"{_fmt(c['value'])} {c['unit']}" if c["value"] is not None else "n/a", c["target"],
                    "-" if c["target"] == "(info)" else {True: "PASS", False: "FAIL", None: "n/a"}[c["pass"]]]
                   for c in checked]
    big = max(cfg.sizes)
    tvm = f"apache-tvm {results.facts['tvm_version']}'s" if "tvm_version" in results.facts else "no TVM"
    lines = [f"tracker: ours and {tvm}, with N registered server entries each, "
             f"{results.facts.get('elapsed_s', 0):.0f} s", ""]
    lines += harness.table_lines(header, cells, left=2, left_last=False)
    lines += ["", f"targets: our tracker with our client (TrackerSession, TrackerRegistration) at N={big}"]
    lines += harness.table_lines(["check", "value", "target", "result"], check_cells, left=1, left_last=False)
    notes = [
        "",
        "register: fresh connection, magic, UPDATE_INFO, PUT (median); grant: REQUEST to the grant on an open "
        "connection, the session's connect excluded (median, p99 = nearest rank), the entry re-offered untimed; "
        "summary: SUMMARY of N servers (median). ms: lower is better.",
        "* bounded: this client stalls on Nagle and delayed ACKs against a peer that does not ACK at once, as TVM's tracker (40-90 ms a message), so it runs few operations "
        "(ops column: registrations/grants/summaries timed); its p99 is then its maximum.",
        "entries: one raw connection per entry (UPDATE_INFO + PUT, like a server; ports nothing listens on).",
        f"growth: figure at N={big} / figure at the next smaller N, checked on the medians; linear growth gives 10x, "
        f"so <= {GROWTH_LIMIT:g}x allows noise but not faster-than-linear growth; the p99 ratio is information (a few "
        "slow samples on a shared machine move it either way).",
        "tuned raw: TCP_NODELAY, length and body in one write, TCP_QUICKACK before every read (TVM's tracker writes "
        "length and body separately without TCP_NODELAY: a client that does not ACK at once waits for its delayed ACK).",
    ]
    for side in ("ours", "tvm"):
        if f"handshake_{side}" in results.facts:
            notes.append(f"{side} tracker, magic and first message in one segment: {results.facts[f'handshake_{side}']}")
    if "tvm_absent" in results.facts:
        notes.append(f"tvm rows left out: {results.facts['tvm_absent']}")
    elif not cfg.tvm:
        notes.append("tvm rows left out (--no-tvm)")
    if results.facts.get("tvm_tracker_warnings"):
        notes.append(f"TVM's tracker logged {results.facts['tvm_tracker_warnings']} warning(s) (the one-segment "
                     "handshake check is one)")
    notes += missing_notes(results)
    notes += results.warnings
    document = {"config": asdict(cfg), "rows": results.rows, "checks": checked, "facts": results.facts,
                "notes": [n for n in notes if n]}
    return "\n".join(lines + notes), document


if __name__ == "__main__":  # the tracker table alone: python benchmarks/tracker.py [--quick] [--no-tvm]
    config = (TrackerConfig.quick if "--quick" in sys.argv else TrackerConfig)(tvm="--no-tvm" not in sys.argv)
    print(report(config, measure(config, TrackerResults()))[0])
