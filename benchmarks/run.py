"""Side-by-side performance report: rpc-workbench against the native loopback limit, and TVM when installed.

    python benchmarks/run.py                  # full run (about two minutes, with the tracker and notebook tables)
    python benchmarks/run.py --quick          # smoke run: small transfers, few iterations
    python benchmarks/run.py --json out.json  # also save every figure as JSON

Flags:
    --quick       8 MiB transfers (TVM 4 MiB), 300 calls, 2 start-ups, 100 tracker grants: a fast smoke run
    --json PATH   also write the figures, targets and notes to PATH as JSON (the tracker's under "tracker")
    --readme [PATH] also write the first table, with the machine it ran on, into README.md (or PATH)
    --no-tvm      leave the TVM columns (and the TVM tracker rows) out even when ``import tvm`` works
    --no-tracker  leave the second table, "tracker", out
    --no-notebook leave the third table, "notebook" (benchmarks/notebook.py), out
    --no-tvm-kernels leave the fourth table, "tvm kernels" (benchmarks/tvm_kernels.py), out
    --no-minrpc   leave the fifth table, "minrpc" (benchmarks/minrpc.py), out
    --no-resilience leave the sixth table, "resilience" (benchmarks/resilience.py), out
    --no-lab      leave the seventh table, "lab" (benchmarks/lab.py), out
    --no-opencl   leave the eighth table, "opencl" (benchmarks/opencl.py), out
    --cpu N       the CPU the pinned runs use (default: the first this process may run on)

One run measures, all on 127.0.0.1 with free ports:

* raw, the native limit: ``benchmarks/raw/rawnet.c``, built at run time with
  ``gcc -O2`` into a temporary directory, both ends in C and pinned like ours.
  Bulk moves the same bytes four ways: ``send`` from memory or ``sendfile``
  from a page-cached file, into ``recv`` to memory or ``splice`` (through a
  pipe) to a new file, preallocated as ours; the raw figure of each bulk row
  is the way fastest over the whole run, measured in the same window as ours.
  The round trip is a C ping-pong of 16-byte messages (TCP_NODELAY).
* ours: upload and download of a file, tensor copies to the device
  (``runtime.tensor`` and ``Tensor.copyfrom``) and back (``Tensor.numpy``),
  with this process on one CPU and the server and its workers on another (the
  native transfers placed the same way), each operation timed in rounds that
  alternate a block of ours with a block of each native method; the round trip
  of an empty remote call (``workbench.nop``) unpinned, pinned to one CPU and
  across two, in blocks alternating with the C ping-pong and TVM's C++
  ``testing.nop`` (same placement, same window); the same transfers through an
  rpc.Proxy (unpinned); server start-up (from ``rpc.Server(port=0)`` until
  ``rpc.connect`` succeeds) and the idle server's resident memory.
* tvm: the same figures for ``tvm.rpc`` (``tvm.runtime.tensor``; smaller
  transfers, unpinned and not interleaved: it is slow; its empty call is the
  one interleaved above).

A second table, "tracker" (benchmarks/tracker.py), follows: our tracker and
apache-tvm's (``python -m tvm.exec.rpc_tracker``) with 10, 100 and 1000
registered server entries; registering a server, request to grant (median,
p99) and summary() for our client, TVM's stock client and a tuned raw client
against each, with targets for ours at 1000 entries and a growth check.

Then the "notebook" (benchmarks/notebook.py), "tvm kernels"
(benchmarks/tvm_kernels.py), "minrpc" (benchmarks/minrpc.py: the native
server's idle memory, empty call, bulk and time_evaluator overhead beside the
Python server and TVM's C++ server, and seed 004 on the emulated aarch64
board), "resilience" (benchmarks/resilience.py: the crash guard's cost and how
soon a session works again after a crash) and "lab" (benchmarks/lab.py: from
starting JupyterLab to a notebook's kernel Idle in headless Chromium, with the
lab extension and with both its halves disabled, interleaved; skipped while
``jupyter labextension list`` does not list jupyterlab-rpc-workbench) and "opencl"
(benchmarks/opencl.py: copies to and from an OpenCL device against pyopencl's
``enqueue_copy``, and a TVM-built OpenCL matmul against its llvm build, on PoCL
where nothing else is installed) tables.

The last column of the table says what each figure is (the median of how many
readings, or a single reading). Targets and PASS/FAIL are printed beside our
figures; nothing is asserted: this is a report. Every process the run starts
is ended before it exits.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import operator
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

if __package__:
    from . import harness
    from . import lab as lab_bench
    from . import minrpc as minrpc_bench
    from . import notebook as notebook_bench
    from . import opencl as opencl_bench
    from . import resilience as resilience_bench
    from . import tracker as tracker_bench
    from . import tvm_kernels as tvm_kernels_bench
else:  # run as a script: this directory is sys.path[0]
    import harness
    import lab as lab_bench
    import minrpc as minrpc_bench
    import notebook as notebook_bench
    import opencl as opencl_bench
    import resilience as resilience_bench
    import tracker as tracker_bench
    import tvm_kernels as tvm_kernels_bench

IO_TIMEOUT_S = 30.0  # every socket this script opens
REMOTE_FILE = "bench.bin"
INTERLEAVE_BLOCKS = 10  # the calls of each placement are timed in this many blocks per side


BULK_KEYS = ("upload", "download", "to_device", "copyfrom", "from_device")
CALL_KEYS = ("call", "call_pinned", "call_split")
# hard caps: a full run of this table ends within 5 minutes
SECTION_LIMITS_S = {"raw": 30.0, "ours": 90.0, "calls": 60.0, "proxy": 40.0, "tvm": 75.0}
TRACKER_HARD_LIMIT_S = 60.0  # added to the tracker's own budget (after which it skips what is left)


@dataclass(frozen=True)
class Config:
    bulk_bytes: int = 64 * harness.MIB
    tvm_bulk_bytes: int = 16 * harness.MIB
    bulk_rounds: int = 5  # each bulk row: this many rounds of (a block of ours, a block of each native method)
    bulk_block: int = 2  # transfers per block
    bulk_reps: int = 5  # the proxy rows (not interleaved)
    tvm_bulk_reps: int = 3
    calls: int = 2000
    warmup: int = 200
    startups: int = 5
    tvm_startups: int = 5
    cpu: int = 0
    other_cpu: int | None = None  # a second CPU, for the cross-CPU placements
    tvm: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        return cls(bulk_bytes=8 * harness.MIB, tvm_bulk_bytes=4 * harness.MIB, bulk_rounds=2, bulk_block=1,
                   bulk_reps=2, tvm_bulk_reps=1, calls=300, warmup=50, startups=2, tvm_startups=1, **overrides)

    @property
    def bulk_placement(self) -> tuple[int, int]:
        """(this process's CPU, the server's or the native peer's CPU) for the bulk rows."""
        return self.cpu, self.cpu if self.other_cpu is None else self.other_cpu

    def call_placements(self) -> list[tuple[str, int | None, int | None]]:
        """(key, this process's CPU, the server's or the native peer's CPU) of each call row; None: unpinned."""
        placements = [("call", None, None), ("call_pinned", self.cpu, self.cpu)]
        if self.other_cpu is not None:
            placements.append(("call_split", self.cpu, self.other_cpu))
        return placements


# -- results ----------------------------------------------------------------------
@dataclass
class Results:
    """Figures by (side, key), side being "raw", "ours" or "tvm"; how many readings each one summarises;
    and why missing ones are missing."""

    values: dict[tuple[str, str], float] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    missing: dict[tuple[str, str], str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    rounds: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # one figure per round, for targets

    def set(self, side: str, key: str, value: float, n: int) -> None:
        """Record a figure that is the median of ``n`` readings (1: a single reading)."""
        self.values[side, key] = value
        self.counts[side, key] = n

    def get(self, side: str, key: str | None) -> float | None:
        return self.values.get((side, key)) if key else None

    def note_missing(self, side: str, key: str, reason: str) -> None:
        if (side, key) not in self.values:
            self.missing.setdefault((side, key), reason)

    @contextlib.contextmanager
    def attempt(self, side: str, *keys: str) -> Iterator[None]:
        """Run a measurement; if it fails, mark those of ``keys`` it did not set as missing, and go on."""
        try:
            yield
        except Exception as exc:
            for key in keys:
                self.note_missing(side, key, harness.reason_of(exc))


# -- timing -----------------------------------------------------------------------
class SectionTimeout(Exception):
    """A section ran out of time (not an OSError, so socket code does not mistake it for its own timeout)."""


@dataclass
class Limit:
    expired: bool = False


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[Limit]:
    """Raise SectionTimeout in this (main) thread if the block runs longer than ``seconds``."""
    limit = Limit()

    def expire(signum: int, frame: Any) -> None:
        limit.expired = True
        raise SectionTimeout(f"{what} took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield limit
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- processes --------------------------------------------------------------------
def startup_s(start: Callable[[], Any], connect: Callable[[Any], Any], close: Callable[[Any], None],
              stop: Callable[[Any], None], reps: int) -> list[float]:
    """Seconds from starting a server until a client session is up, for each of up to ``reps`` starts."""
    times = []
    deadline = time.perf_counter() + harness.LOOP_BUDGET_S
    for _ in range(max(reps, 1)):
        with harness.owned():
            begin = time.perf_counter()
            server = start()
            try:
                session = connect(server)
                times.append(time.perf_counter() - begin)
                close(session)
            finally:
                stop(server)
        if time.perf_counter() > deadline:
            break
    return times


# -- the native limit ---------------------------------------------------------------------
class NativeRuns:
    """The native baselines as the sections use them: after the first failure, every raw figure is n/a with its reason."""

    def __init__(self, native: harness.Native | None, absent: str | None = None):
        self.native = native
        self.failure = absent

    def run(self, res: Results, key: str, measure: Callable[[harness.Native], list[float]]) -> list[float]:
        if self.native is not None and self.failure is None:
            try:
                return measure(self.native)
            except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
                self.failure = harness.reason_of(exc)
        res.note_missing("raw", key, self.failure or "not measured")
        return []


def measure_raw(cfg: Config, res: Results, native: NativeRuns) -> None:
    """The raw section: build the native program (its figures are taken in the sections that compare with it)."""
    try:
        native.native, native.failure = harness.Native.build(), None
    except Exception as exc:
        native.failure = harness.reason_of(exc)
        raise


class SelfTimed:
    """An operation that times its own part (a fresh session's first transfer: not its connect): returns seconds."""

    def __init__(self, fn: Callable[[], float]):
        self.fn = fn

    def __call__(self) -> float:
        return self.fn()


def timed_block(op: Callable[[], Any], count: int) -> list[float]:
    """Seconds of each of ``count`` runs of ``op`` (what a SelfTimed op says, else the whole call), then the
    op's ``after_block()`` if it has one."""
    try:
        return harness.run_timed(op, count, self_timed=isinstance(op, SelfTimed))
    finally:
        getattr(op, "after_block", lambda: None)()


def interleaved_bulk(cfg: Config, res: Results, native: NativeRuns, ops: dict[str, Callable[[], Any]]) -> None:
    """Each operation in its own window: ``bulk_rounds`` rounds of a block of ours and a block of each native
    method, in an order that rotates from round to round.

    The native limit is the method fastest over every window (the pooled median: choosing the best method
    row by row would pick whichever got lucky); each row's raw figure is that method's median in its window.
    A row of ``harness.SAME_JOB`` also times the native ways doing its very job (landing in a file, a new
    connection's first transfer) in its rounds: the fastest of them is its "(info)" row's raw figure.
    """
    cpu, peer_cpu = cfg.bulk_placement
    windows: dict[str, dict[str, list[float]]] = {}
    rounds: dict[str, dict[str, list[float]]] = {}

    def native_block(n: harness.Native, key: str, way: str) -> list[float]:
        ends = harness.bulk_ends(key, cpu, peer_cpu)
        if way == "first":
            return n.first(cfg.bulk_bytes, cfg.bulk_block, *ends)
        return n.bulk(way, cfg.bulk_bytes, cfg.bulk_block, *ends)

    for key, op in ops.items():
        with res.attempt("ours", key):
            ours: list[float] = []
            ways = list(dict.fromkeys([*harness.BULK_METHODS, *harness.SAME_JOB.get(key, ())]))
            raw = windows[key] = {m: [] for m in ways}
            per_round = rounds[key] = {m: [] for m in ["ours", *ways]}
            for round_ in range(cfg.bulk_rounds):
                for what in harness.rotated(["ours", *ways], round_):
                    if what == "ours":
                        op()  # an untimed warm-up, as each native block has its own
                        block = timed_block(op, cfg.bulk_block)
                        ours += block
                    else:
                        block = native.run(res, key, lambda n: native_block(n, key, what))
                        raw[what] += block
                    if block:
                        per_round[what].append(harness.mib_s(cfg.bulk_bytes, block))
            res.set("ours", key, harness.mib_s(cfg.bulk_bytes, ours), len(ours))
            res.rounds["ours", key] = per_round["ours"]
    pooled: dict[str, list[float]] = {m: [] for m in harness.BULK_METHODS}  # each way's times over every window
    for raw in windows.values():
        for m, times in raw.items():
            pooled.setdefault(m, []).extend(times)
    for key, ways in harness.SAME_JOB.items():  # the (info) rows: the same job done natively, in the row's window
        done = [w for w in ways if windows.get(key, {}).get(w)]
        if done:
            way = max(done, key=lambda w: harness.mib_s(cfg.bulk_bytes, pooled[w]))
            res.set("raw", f"{key}_same", harness.mib_s(cfg.bulk_bytes, windows[key][way]), len(windows[key][way]))
            res.facts.setdefault("raw_method", {})[f"{key}_same"] = "send-recv, new connection" if way == "first" else way
    for m in harness.BULK_METHODS:
        times = pooled[m]
        if times:
            res.set("raw", f"bulk:{m}", harness.mib_s(cfg.bulk_bytes, times), len(times))
        else:
            res.note_missing("raw", f"bulk:{m}", native.failure or "not measured")
    measured = [m for m in harness.BULK_METHODS if pooled[m]]
    if not measured:
        return
    fastest = max(measured, key=lambda m: harness.mib_s(cfg.bulk_bytes, pooled[m]))
    res.facts["raw_fastest"] = fastest
    for key, raw in windows.items():
        if raw[fastest]:
            res.set("raw", key, harness.mib_s(cfg.bulk_bytes, raw[fastest]), len(raw[fastest]))
            res.rounds["raw", key] = rounds[key][fastest]
            res.facts.setdefault("raw_method", {})[key] = fastest


def interleaved_calls(cfg: Config, res: Results, native: NativeRuns, key: str, cpu: int | None,
                      peer_cpu: int | None, calls: dict[str, Callable[[], Any]]) -> None:
    """The round trips of ``calls`` ({"ours": fn, "tvm": fn}) and of the C ping-pong, in INTERLEAVE_BLOCKS rounds
    of one block each, in an order that rotates from round to round: the machine's drift weighs on all alike."""
    block = max(cfg.calls // INTERLEAVE_BLOCKS, 1)
    for fn in calls.values():
        harness.run_timed(fn, cfg.warmup)
    times: dict[str, list[float]] = {side: [] for side in ("raw", *calls)}
    for round_ in range(INTERLEAVE_BLOCKS):
        for side in harness.rotated(list(times), round_):
            if side == "raw":
                seconds = native.run(res, key, lambda n: n.ping(harness.PING_BYTES, min(cfg.warmup, block),
                                                                block, cpu, peer_cpu))
            else:
                seconds = harness.run_timed(calls[side], block)
            times[side] += seconds
            if seconds:
                res.rounds.setdefault((side, key), []).append(statistics.median(seconds) * 1e6)
    for side, seconds in times.items():
        if seconds:
            res.set(side, key, statistics.median(seconds) * 1e6, len(seconds))


# -- shared by ours and tvm -----------------------------------------------------------
def measure_bulk(side: str, res: Results, ops: dict[str, Callable[[], Any]], nbytes: int, reps: int) -> None:
    """Each operation on its own: one warm-up, then the median of ``reps`` transfers (not interleaved)."""
    for key, op in ops.items():
        with res.attempt(side, key):
            op()
            times = harness.run_timed(op, reps)
            getattr(op, "after_block", lambda: None)()  # uploads: removed, as in the direct rows
            res.set(side, key, harness.mib_s(nbytes, times), len(times))


def check_contents(side: str, res: Results, downloaded: Any, from_device: np.ndarray, data: bytes) -> None:
    """Record a warning if what came back differs from what was sent."""
    for what, got in (("download", bytes(downloaded)), ("Tensor.numpy()", from_device.tobytes())):
        if got != data:
            res.facts.setdefault("warnings", []).append(f"{side}: {what} returned different bytes than were sent")


def measure_idle_rss(side: str, res: Results, processes: harness.Owned, idle: int) -> None:
    """VmRSS of the server's processes once its sessions are gone (``idle``: how many there are then)."""
    gc.collect()  # drop the session's last references (a failure's traceback too), so it closes
    with res.attempt(side, "rss"):
        harness.wait_until(lambda: len(processes.pids()) <= idle, harness.IDLE_WAIT_S)
        time.sleep(0.1)
        res.set(side, "rss", harness.rss_mb(processes.pids()), 1)
        res.facts[f"{side}_server_processes"] = len(processes.pids())


# -- ours -------------------------------------------------------------------------------
BYTECODE_NOW = ("bytecode never cached (PYTHONDONTWRITEBYTECODE)" if os.environ.get("PYTHONDONTWRITEBYTECODE")
                else "as this environment starts it")


@contextlib.contextmanager
def cached_bytecode() -> Iterator[None]:
    """Servers started inside keep their bytecode in a private cache (``PYTHONPYCACHEPREFIX``) and load it
    from there, as after ``pip install``, which compiles it, whatever ``PYTHONDONTWRITEBYTECODE`` says here;
    nothing is written into the source tree."""
    cache = tempfile.mkdtemp(prefix="workbench-bench-pyc-")
    try:
        with harness.env_var("PYTHONDONTWRITEBYTECODE", None), harness.env_var("PYTHONPYCACHEPREFIX", cache):
            yield
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def first_transfer(server: Any, arr: Any, settle: Callable[[], Any]) -> float:
    """Seconds of the first ``runtime.tensor`` of a new session (its connect and close not counted; its
    worker runs where the server was pinned). ``settle()`` first waits, untimed, for the last one's worker
    to be gone: its teardown would otherwise share this one's CPU."""
    from workbench import rpc, runtime

    settle()
    remote = rpc.connect(harness.HOST, server.port)
    try:
        dev = remote.cpu(0)
        begin = time.perf_counter()
        runtime.tensor(arr, dev)
        return time.perf_counter() - begin
    finally:
        remote.close()


def measure_ours(cfg: Config, res: Results, native: NativeRuns) -> None:
    from workbench import rpc, runtime

    def start() -> Any:
        return rpc.Server(port=0, silent=True)

    def connect(server: Any) -> Any:
        return rpc.connect(harness.HOST, server.port)

    for key, env in (("startup", cached_bytecode), ("startup_env", contextlib.nullcontext)):
        with res.attempt("ours", key), env():
            times = startup_s(start, connect, lambda remote: remote.close(), lambda server: server.terminate(),
                              cfg.startups + 1)[1:]  # the first: a warm-up (it fills the bytecode cache)
            res.set("ours", key, statistics.median(times), len(times))
            res.rounds["ours", key] = times

    with res.attempt("ours", *BULK_KEYS, "rss"), harness.owned() as processes:
        server = start()
        try:
            idle = len(processes.pids())
            remote = connect(server)
            try:
                data = np.random.default_rng(0).bytes(cfg.bulk_bytes)
                arr = np.frombuffer(data, dtype=np.float32)
                dev = remote.cpu(0)
                settled = lambda: harness.wait_until(lambda: len(processes.pids()) <= idle + 1,  # noqa: E731
                                                     harness.IDLE_WAIT_S)
                remote.upload(data, target=REMOTE_FILE)
                on_device = runtime.tensor(arr, dev)
                check_contents("ours", res, remote.download(REMOTE_FILE), on_device.numpy(), data)
                ops = {
                    "upload": harness.FreshUploads(remote, data),
                    "download": lambda: remote.download(REMOTE_FILE),
                    "to_device": lambda: runtime.tensor(arr, dev),
                    "copyfrom": lambda: on_device.copyfrom(arr),
                    "from_device": on_device.numpy,
                    "first_transfer": SelfTimed(lambda: first_transfer(server, arr, settled)),
                }
                cpu, peer_cpu = cfg.bulk_placement
                harness.pin(processes.pids(), {peer_cpu})  # the server and this session's worker
                with harness.pinned_here(cpu):
                    interleaved_bulk(cfg, res, native, ops)
            finally:
                remote.close()
            measure_idle_rss("ours", res, processes, idle)
        finally:
            server.terminate()


def measure_calls(cfg: Config, res: Results, native: NativeRuns) -> None:
    """The empty call of ours, the C ping-pong and TVM's C++ call, interleaved, in each placement."""
    from workbench import rpc

    tvm = _import_tvm(res) if cfg.tvm else None
    keys = [key for key, _, _ in cfg.call_placements()]
    scratch = tempfile.mkdtemp(prefix="workbench-bench-tvm-")  # TVM servers killed mid-session leave temp dirs
    try:
        with res.attempt("ours", *keys), harness.owned() as processes:
            server = rpc.Server(port=0, silent=True)
            servers: list[Any] = [server]
            sessions: list[Any] = []
            calls: dict[str, Callable[[], Any]] = {}
            try:
                sessions.append(rpc.connect(harness.HOST, server.port))
                calls["ours"] = sessions[-1].get_function("workbench.nop")
                if tvm is not None:
                    with res.attempt("tvm", *keys):
                        servers.append(harness.start_tvm_server(tvm, scratch))
                        sessions.append(tvm.rpc.connect(harness.HOST, servers[-1].port))
                        calls["tvm"] = sessions[-1].get_function("testing.nop")  # a C++ no-op from tvm_ffi
                for key, cpu, peer_cpu in cfg.call_placements():
                    with res.attempt("ours", key):
                        if peer_cpu is not None:
                            harness.pin(processes.pids(), {peer_cpu})  # both servers and their session processes
                        with harness.pinned_here(cpu):
                            interleaved_calls(cfg, res, native, key, cpu, peer_cpu, calls)
            finally:
                for session in sessions:
                    with contextlib.suppress(Exception):
                        getattr(session, "close", lambda: None)()  # TVM's sessions close when dropped
                calls.clear()
                sessions.clear()
                for each in servers:  # owned() ends whatever they leave
                    with contextlib.suppress(Exception):
                        each.terminate()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


PROXY_OPS = (("upload", "upload"), ("download", "download"), ("copyfrom", "Tensor.copyfrom"),
             ("from_device", "Tensor.numpy"))


def measure_proxy(cfg: Config, res: Results, native: NativeRuns) -> None:
    """Our bulk figures again, through an rpc.Proxy (a server waiting at it, the client paired by key)."""
    from workbench import rpc, runtime

    keys = [f"proxy_{key}" for key, _ in PROXY_OPS]
    with res.attempt("ours", *keys), harness.owned():
        proxy = rpc.Proxy(port=0, silent=True)
        server = None
        try:
            server = rpc.Server(host=harness.HOST, port=proxy.port, is_proxy=True, key="bench", silent=True)
            deadline = time.monotonic() + 10
            while True:  # the server registers with the proxy in the background
                try:
                    remote = rpc.connect(harness.HOST, proxy.port, key="bench")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            try:
                data = np.random.default_rng(1).bytes(cfg.bulk_bytes)
                arr = np.frombuffer(data, dtype=np.float32)
                remote.upload(data, target=REMOTE_FILE)
                on_device = runtime.tensor(arr, remote.cpu(0))
                check_contents("proxy", res, remote.download(REMOTE_FILE), on_device.numpy(), data)
                ops = {
                    "proxy_upload": harness.FreshUploads(remote, data),
                    "proxy_download": lambda: remote.download(REMOTE_FILE),
                    "proxy_copyfrom": lambda: on_device.copyfrom(arr),
                    "proxy_from_device": on_device.numpy,
                }
                measure_bulk("ours", res, ops, cfg.bulk_bytes, cfg.bulk_reps)
            finally:
                remote.close()
        finally:
            if server is not None:
                server.terminate()
            proxy.terminate()


# -- tvm --------------------------------------------------------------------------------
def _import_tvm(res: Results) -> Any:
    """The tvm module, or None (the reason recorded: the columns say n/a)."""
    try:
        import tvm
        import tvm.rpc
        import tvm.runtime
    except Exception as exc:  # not installed, or broken
        res.facts["tvm_absent"] = f"import tvm failed ({type(exc).__name__}: {exc})"
        return None
    res.facts["tvm_version"] = getattr(tvm, "__version__", "?")
    return tvm


def measure_tvm(cfg: Config, res: Results, native: NativeRuns) -> None:
    tvm = _import_tvm(res)
    if tvm is None:
        return
    scratch = tempfile.mkdtemp(prefix="workbench-bench-tvm-")  # TVM servers killed mid-session leave temp dirs
    try:
        measure_tvm_servers(cfg, res, tvm, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure_tvm_servers(cfg: Config, res: Results, tvm: Any, scratch: str) -> None:
    nbytes = cfg.tvm_bulk_bytes

    def connect(server: Any) -> Any:
        return tvm.rpc.connect(harness.HOST, server.port)

    def stop(server: Any) -> None:
        # terminate() needs psutil to end the server's children; owned() ends whatever it leaves
        with contextlib.suppress(Exception):
            server.terminate()

    with res.attempt("tvm", "startup"):
        times = startup_s(lambda: harness.start_tvm_server(tvm, scratch), connect, lambda remote: None, stop,
                          cfg.tvm_startups)
        res.set("tvm", "startup", statistics.median(times), len(times))

    def session_figures(server: Any) -> None:
        remote = connect(server)
        data = bytearray(np.random.default_rng(0).bytes(nbytes))
        arr = np.frombuffer(data, dtype=np.float32)
        dev = remote.cpu(0)
        remote.upload(data, REMOTE_FILE)
        on_device = tvm.runtime.tensor(arr, dev)
        check_contents("tvm", res, remote.download(REMOTE_FILE), on_device.numpy(), bytes(data))
        ops = {
            "upload": lambda: remote.upload(data, harness.fresh_name()),
            "download": lambda: remote.download(REMOTE_FILE),
            "to_device": lambda: tvm.runtime.tensor(arr, dev),
            "copyfrom": lambda: on_device.copyfrom(arr),
            "from_device": on_device.numpy,
        }
        measure_bulk("tvm", res, ops, nbytes, cfg.tvm_bulk_reps)
        # returning drops the session: TVM serves one session at a time

    with res.attempt("tvm", *BULK_KEYS, "rss"), harness.owned() as processes:
        server = harness.start_tvm_server(tvm, scratch)
        try:
            idle = len(processes.pids())
            session_figures(server)
            measure_idle_rss("tvm", res, processes, idle)
        finally:
            stop(server)


# -- report -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    op: str  # ">=", "<=" or "<"
    limit: float
    relative: bool  # compare ours/raw (True) or ours itself (False)
    text: str

    def passed(self, ours: float | None, raw: float | None) -> bool | None:
        value = (ours / raw if ours is not None and raw else None) if self.relative else ours
        if value is None:
            return None
        return {">=": operator.ge, "<=": operator.le, "<": operator.lt}[self.op](value, self.limit)

    def rounds_met(self, ours: list[float], base: list[float]) -> tuple[int, int]:
        """(rounds meeting the target, rounds): each round's figure of ours against the same round's base."""
        pairs = list(zip(ours, base)) if self.relative else [(o, None) for o in ours]
        return sum(bool(self.passed(o, b)) for o, b in pairs), len(pairs)


@dataclass(frozen=True)
class Metric:
    label: str
    unit: str
    key: str | None  # ours/tvm figure (None: a raw-only row)
    raw_key: str | None = None
    target: Target | None = None
    tvm_sized: bool = False  # TVM moved tvm_bulk_bytes, not bulk_bytes
    base_side: str = "raw"  # whose figure the ratio divides by ("ours": our direct path, for the proxy rows)
    target_vs: str | None = None  # "tvm": a relative target compares with TVM's figure, not the ratio's base
    tvm_row: bool = True  # TVM has this figure (a fresh session's first transfer, say, it does not)

    @property
    def has_tvm(self) -> bool:
        return self.tvm_row and self.base_side == "raw"

    def target_base(self) -> tuple[str, str | None]:
        """(side, key) of the figure a relative target divides by."""
        return ("tvm", self.key) if self.target_vs == "tvm" else (self.base_side, self.raw_key)


def metrics(cfg: Config) -> list[Metric]:
    size = f"{cfg.bulk_bytes // harness.MIB} MiB"
    bulk = Target(">=", 0.85, True, ">= 0.85x native")
    beats_tvm = Target("<=", 1.0, True, "<= TVM's C++")
    return [
        *[Metric(f"native raw bulk {size}, {method.replace('-', ' -> ')} (info)", "MiB/s", None, f"bulk:{method}")
          for method in harness.BULK_METHODS],
        Metric(f"upload {size}", "MiB/s", "upload", "upload", bulk, True),
        Metric(f"download {size}", "MiB/s", "download", "download", bulk, True),
        Metric(f"to device, runtime.tensor {size}", "MiB/s", "to_device", "to_device", bulk, True),
        Metric(f"to device, Tensor.copyfrom {size}", "MiB/s", "copyfrom", "copyfrom", bulk, True),
        Metric(f"from device, Tensor.numpy {size}", "MiB/s", "from_device", "from_device", bulk, True),
        Metric(f"a fresh session's first transfer, runtime.tensor {size}", "MiB/s", "first_transfer",
               "first_transfer", bulk, tvm_row=False),
        Metric(f"upload {size}, raw = native landing in a file (info)", "MiB/s", "upload", "upload_same",
               tvm_row=False),
        Metric("a fresh session's first transfer, raw = native first on a new connection (info)", "MiB/s",
               "first_transfer", "first_transfer_same", tvm_row=False),
        Metric(f"empty call round trip, unpinned (raw: {harness.PING_BYTES} B C ping-pong)", "µs", "call",
               "call"),
        Metric(f"empty call round trip, pinned to 1 CPU (raw: {harness.PING_BYTES} B C ping-pong)", "µs",
               "call_pinned", "call_pinned", beats_tvm if cfg.tvm else None, target_vs="tvm"),
        *([Metric(f"empty call round trip, across 2 CPUs (raw: {harness.PING_BYTES} B C ping-pong)", "µs",
                  "call_split", "call_split", beats_tvm if cfg.tvm else None, target_vs="tvm")]
          if cfg.other_cpu is not None else []),
        *[Metric(f"through the proxy: {what} {size} (raw = our direct)", "MiB/s", f"proxy_{key}", key,
                 Target(">=", 0.4, True, ">= 0.40x direct"), base_side="ours") for key, what in PROXY_OPS],
        Metric("server start-up to connected (bytecode cached, as installed)", "s", "startup", None,
               Target("<", 0.2, False, "< 0.2 s")),
        Metric(f"server start-up to connected, {BYTECODE_NOW} (info)", "s", "startup_env", None, tvm_row=False),
        Metric("idle server RSS", "MB", "rss", None, Target("<", 60, False, "< 60 MB")),
    ]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def reading(n: int | None) -> str | None:
    if n is None:
        return None
    return "single reading" if n == 1 else f"median of {n}"


def statistic(m: Metric, res: Results, tvm_wanted: bool) -> str:
    """What each figure of the row is: "median of 6; raw median of 6 (send -> recv); tvm median of 3"."""
    parts = []
    ours = reading(res.counts.get(("ours", m.key))) if m.key else None
    if ours:
        parts.append(ours)
    raw = reading(res.counts.get((m.base_side, m.raw_key))) if m.raw_key else None
    if raw:
        if m.key is None:
            parts.append(raw)
        elif m.base_side == "ours":
            parts.append(f"direct {raw}")
        else:
            method = res.facts.get("raw_method", {}).get(m.raw_key)
            parts.append(f"raw {raw}" + (f" ({method.replace('-', ' -> ')})" if method else ""))
    tvm = reading(res.counts.get(("tvm", m.key))) if m.key and tvm_wanted and m.has_tvm else None
    if tvm:
        parts.append(f"tvm {tvm}")
    return "; ".join(parts) or "-"


def row_values(m: Metric, res: Results, tvm_wanted: bool) -> dict[str, Any]:
    ours, raw = res.get("ours", m.key), res.get(m.base_side, m.raw_key)
    tvm = res.get("tvm", m.key) if m.has_tvm else None
    ok, met = None, None
    if m.target:
        base = m.target_base()
        ok = m.target.passed(ours, res.get(*base))
        ours_rounds, base_rounds = res.rounds.get(("ours", m.key)), res.rounds.get(base)
        if ours_rounds and (base_rounds or not m.target.relative):
            met = m.target.rounds_met(ours_rounds, base_rounds or [])
            ok = met[0] * 2 > met[1] if met[1] else ok  # met in most rounds
    return {
        "metric": m.label, "unit": m.unit, "ours": ours, "raw": raw,
        "ratio": ratio(ours, raw) if m.key else None,
        "target": m.target.text if m.target else None,
        "pass": ok, "rounds_met": met, "tvm": tvm, "tvm_ratio": ratio(ours, tvm),
        "statistic": statistic(m, res, tvm_wanted),
        "raw_method": res.facts.get("raw_method", {}).get(m.raw_key) if m.base_side == "raw" else None,
    }


def row_cells(m: Metric, v: dict[str, Any], tvm_wanted: bool) -> list[str]:
    def cell(value: float | None, wanted: bool, suffix: str = "") -> str:
        return harness.fmt(value) + (suffix if value is not None else "") if wanted else "-"

    has = m.key is not None
    return [
        f"{m.label} ({m.unit})",
        cell(v["ours"], has),
        cell(v["raw"], m.raw_key is not None),
        f"{v['ratio']:.2f}x" if v["ratio"] is not None else ("n/a" if has and m.raw_key else "-"),
        v["target"] or "-",
        {True: "PASS", False: "FAIL", None: "n/a" if m.target else "-"}[v["pass"]]
        + (f" {v['rounds_met'][0]}/{v['rounds_met'][1]}" if v["rounds_met"] else ""),
        cell(v["tvm"], has and tvm_wanted and m.has_tvm, "*" if m.tvm_sized else ""),
        f"{v['tvm_ratio']:.2f}x" if v["tvm_ratio"] is not None
        else ("n/a" if has and tvm_wanted and m.has_tvm else "-"),
        v["statistic"],
    ]


TABLE_HEADER = ["metric", "ours", "raw", "ratio", "target", "result", "tvm", "tvm ratio", "statistic"]


def missing_notes(ms: list[Metric], res: Results, tvm_wanted: bool) -> list[str]:
    """One line per side and reason: which figures are n/a, and why."""
    if tvm_wanted and "tvm_absent" in res.facts:
        grouped: dict[tuple[str, str], list[str]] = {("tvm", res.facts["tvm_absent"]): ["every figure"]}
    else:
        grouped = {}
    for side in ("raw", "ours", "tvm"):
        if side == "tvm" and (not tvm_wanted or "tvm_absent" in res.facts):
            continue
        for m in ms:
            if side != "ours" and m.base_side != "raw" or side == "tvm" and not m.tvm_row:
                continue  # rows of ours only (the proxy)
            key = m.raw_key if side == "raw" else m.key
            if key and (side, key) not in res.values:
                reason = res.missing.get((side, key), "not measured (an earlier step failed)")
                grouped.setdefault((side, reason), []).append(m.label)
    return [f"{side} n/a ({reason}): {'; '.join(labels)}" for (side, reason), labels in grouped.items()]


def explanations(cfg: Config, res: Results) -> list[str]:
    """The lines under the table that say how to read it."""
    tvm = cfg.tvm and "tvm_absent" not in res.facts
    processes = f"ours: {res.facts.get('ours_server_processes', '?')}"
    if tvm:
        processes += f", tvm: {res.facts.get('tvm_server_processes', '?')}"
    cpu, peer_cpu = cfg.bulk_placement
    split = (f"; across 2 CPUs: this process (the C client) on CPU {cfg.cpu}, the servers and their workers "
             f"(the C peer) on CPU {cfg.other_cpu}" if cfg.other_cpu is not None else "")
    return [
        *([f"* TVM bulk figures move {cfg.tvm_bulk_bytes // harness.MIB} MiB per transfer (TVM is slow; unpinned, "
           f"not interleaved); ours and raw move {cfg.bulk_bytes // harness.MIB} MiB."] if tvm else []),
        f"raw = the native limit, {os.path.relpath(harness.RAW_SOURCE)} (gcc -O2, both ends in C, "
        "pinned like ours). "
        "Bulk rows: the native way that is fastest over every window (send or sendfile into recv or splice to a "
        "file; the receiver waking per 1 MiB batch and both ends on reno, as ours on loopback; the info rows pool "
        "every window), its median in the row's own window; named in the statistic column.",
        f"interleaved: each bulk row is timed in {cfg.bulk_rounds} rounds of a block of {cfg.bulk_block} of ours "
        f"and a block of {cfg.bulk_block} of each native way (order rotating, each block after an untimed "
        f"warm-up transfer of its own), this process on CPU {cpu} and the server and its worker (the C peer) "
        f"on CPU {peer_cpu}, the native data going the row's way (download, numpy: from CPU {peer_cpu}); each call row in {INTERLEAVE_BLOCKS} rounds of "
        f"{max(cfg.calls // INTERLEAVE_BLOCKS, 1)} calls of ours, of the C ping-pong" + (" and of TVM's C++ testing.nop" if tvm else "") + " (same window, same placement).",
        f"call placements: unpinned (no target: where the scheduler puts each pair); pinned: this process, the "
        f"servers and their workers (the C ping-pong's two ends) all on CPU {cfg.cpu}{split}.",
        "uploads write a new remote file each time (replacing one adds the filesystem's cost of freeing it), "
        "removed after each block as the native program removes its own (so each block after the first writes "
        "over the pages of the files removed before it, as any upload after a remove does); a fresh session's "
        "first transfer: a new "
        "connection and worker each time, its connect and close untimed, after the last one's worker has ended; "
        "the proxy rows are unpinned and compare with our direct figure.",
        "the two rows 'raw = native ...' (info) set ours beside native code doing the row's very job, in the same "
        "window: landing the upload in a file (the fastest of splicing into a new one, recv-then-write into a new "
        "one, and recv-then-write over the last one's pages: as ours, which writes over a removed file's pages when "
        "it has one), and a first transfer on a new connection to a freshly forked peer receiving into memory it has "
        "just mapped (rawnet first).",
        "result: PASS when the target holds in most rounds; N/M: the rounds that met it (bulk: ours against "
        "the native way in the same round; calls: ours against TVM's C++ in the same round; start-up: each start).",
        "start-up: servers started with a private bytecode cache (PYTHONPYCACHEPREFIX, filled by an untimed first "
        "start), as after pip install; the info row starts them as this environment does.",
        "ratio = ours / raw" + (", tvm ratio = ours / tvm" if tvm else "")
        + "; MiB/s: higher is better; µs, s, MB: lower is better; statistic: what each figure is.",
        f"RSS: VmRSS summed over the idle server's processes ({processes}).",
        *(["this machine is a VM that hands memory free for a couple of seconds back to its host (virtio-balloon "
           "free page reporting); the first touch of such memory is far slower, so transfers landing in fresh "
           "memory (an upload's new file, a new tensor) slow down in stretches, ours and native alike: each "
           "round compares the two in the same window."] if harness.returns_free_memory_to_host() else []),
    ]


def report(cfg: Config, res: Results, elapsed_s: float) -> tuple[str, dict[str, Any]]:
    ms = metrics(cfg)
    values = [row_values(m, res, cfg.tvm) for m in ms]
    table = "\n".join(harness.table_lines(TABLE_HEADER, [row_cells(m, v, cfg.tvm) for m, v in zip(ms, values)]))
    tvm = f"tvm {res.facts['tvm_version']}" if "tvm_version" in res.facts else "no tvm"
    head = (
        f"rpc-workbench benchmark: python {platform.python_version()}, {platform.system()} {platform.release()}, "
        f"{len(os.sched_getaffinity(0))} CPUs (pinned runs on CPU {cfg.cpu}), {tvm}, {elapsed_s:.0f} s"
    )
    notes = [*explanations(cfg, res), *res.facts.get("warnings", []), *missing_notes(ms, res, cfg.tvm)]
    document = {"config": asdict(cfg), "environment": head, "rows": values, "notes": notes, "elapsed_s": elapsed_s,
                "markdown": markdown_table(ms, values, cfg.tvm)}
    return "\n".join([head, "", table, "", *notes]), document


def markdown_table(ms: list[Metric], values: list[dict[str, Any]], tvm_wanted: bool) -> str:
    """The table as Markdown (the statistic column left out), for the README."""
    rows = [row_cells(m, v, tvm_wanted)[:-1] for m, v in zip(ms, values)]
    header = TABLE_HEADER[:-1]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows])


def machine() -> str:
    """This machine in one line: CPU model and count, memory (and whether free memory goes back to a VM's
    host: harness.returns_free_memory_to_host), kernel, Python, the date."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    vm = ", a VM returning free memory to its host" if harness.returns_free_memory_to_host() else ""
    return (f"{model}, {len(os.sched_getaffinity(0))} CPUs, {memory:.0f} GiB{vm}, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")


README_BEGIN = "<!-- benchmark table: written by python benchmarks/run.py --readme -->"
README_END = "<!-- end of the benchmark table -->"


def update_readme(path: str, document: dict[str, Any]) -> None:
    """Put this run's table, with the machine it ran on, between the README's two markers."""
    with open(path) as f:
        text = f.read()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"--readme: {path} lacks the markers {README_BEGIN!r} and {README_END!r}; "
                         "put them where the table goes")
    before, rest = text.split(README_BEGIN, 1)
    after = rest.split(README_END, 1)[1]
    body = (f"{README_BEGIN}\nMeasured on {machine()}:\n\n{document['markdown']}\n\n"
            + "\n".join(f"- {note}" for note in document["notes"]) + f"\n{README_END}")
    with open(path, "w") as f:
        f.write(before + body + after)


# -- command line -----------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small transfers and few iterations: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--readme", nargs="?", const="README.md", metavar="PATH",
                        help="also write the first table, with this machine, into the README (default README.md) "
                             "between its benchmark markers")
    parser.add_argument("--no-tvm", action="store_true", help="leave the TVM columns out")
    parser.add_argument("--no-tracker", action="store_true", help='leave the second table, "tracker", out')
    parser.add_argument("--no-notebook", action="store_true", help='leave the third table, "notebook", out')
    parser.add_argument("--no-tvm-kernels", action="store_true", help='leave the fourth table, "tvm kernels", out')
    parser.add_argument("--no-minrpc", action="store_true", help='leave the fifth table, "minrpc", out')
    parser.add_argument("--no-resilience", action="store_true", help='leave the sixth table, "resilience", out')
    parser.add_argument("--no-lab", action="store_true", help='leave the seventh table, "lab", out')
    parser.add_argument("--no-opencl", action="store_true", help='leave the eighth table, "opencl", out')
    allowed = sorted(os.sched_getaffinity(0))
    parser.add_argument("--cpu", type=int, default=allowed[0], help=f"CPU of the pinned runs (default {allowed[0]})")
    args = parser.parse_args(argv)
    if args.cpu not in allowed:
        parser.error(f"--cpu {args.cpu}: this process may only run on CPUs {allowed}")
    return args


def config_from(args: argparse.Namespace) -> Config:
    others = sorted(os.sched_getaffinity(0) - {args.cpu})
    options = {"cpu": args.cpu, "other_cpu": others[0] if others else None, "tvm": not args.no_tvm}
    return Config.quick(**options) if args.quick else Config(**options)


def measure_tracker(quick: bool, tvm: bool) -> tuple[str, dict[str, Any]]:
    """The second table: what benchmarks/tracker.py measures, under a hard time limit; every process ended."""
    tcfg = (tracker_bench.TrackerConfig.quick if quick else tracker_bench.TrackerConfig)(tvm=tvm)
    results = tracker_bench.TrackerResults()
    seconds = tcfg.budget_s + TRACKER_HARD_LIMIT_S
    try:
        with harness.owned(), time_limit(seconds, "tracker"):
            tracker_bench.measure(tcfg, results, passthrough=(SectionTimeout,))
    except SectionTimeout:
        results.mark_missing(f"interrupted: the section hit its {seconds:g} s time limit")
    except Exception as exc:
        results.mark_missing(f"{type(exc).__name__}: {exc}")
    return tracker_bench.report(tcfg, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg, json_path = config_from(args), args.json
    res = Results()
    native = NativeRuns(None, "the native program was not built")
    began = time.perf_counter()
    sections: list[tuple[str, Callable[[Config, Results, NativeRuns], None], tuple[str, ...]]] = [
        ("raw", measure_raw, ()),
        ("ours", measure_ours, (*BULK_KEYS, "rss", "startup")),
        ("calls", measure_calls, CALL_KEYS),
        ("proxy", measure_proxy, ()),
    ]
    if cfg.tvm:
        sections.append(("tvm", measure_tvm, (*BULK_KEYS, "rss", "startup")))
    try:
        for name, measure, keys in sections:
            side = "raw" if name == "raw" else "tvm" if name == "tvm" else "ours"
            with harness.owned(), res.attempt(side, *keys), time_limit(SECTION_LIMITS_S[name], name) as limit:
                measure(cfg, res, native)
            if limit.expired:
                res.facts.setdefault("warnings", []).append(
                    f"{name}: the section hit its {SECTION_LIMITS_S[name]:g} s time limit and was interrupted; "
                    "what it had not measured yet is n/a"
                )
    finally:
        if native.native is not None:
            native.native.close()
    text, document = report(cfg, res, time.perf_counter() - began)
    print(text, flush=True)
    if args.readme:
        update_readme(args.readme, document)
        print(f"\nthe table is in {args.readme}")
    if not args.no_tracker:
        tracker_text, document["tracker"] = measure_tracker(args.quick, cfg.tvm)
        print("\n" + tracker_text)
    if not args.no_notebook:
        notebook_text, document["notebook"] = notebook_bench.measure_notebook(args.quick)
        print("\n" + notebook_text)
    if not args.no_tvm_kernels:
        with harness.owned():  # the TVM helper and our server end before the next step
            kernels_text, document["tvm_kernels"] = tvm_kernels_bench.measure_tvm_kernels(args.quick, cfg.tvm)
        print("\n" + kernels_text)
    if not args.no_minrpc:
        with harness.owned():  # the servers, qemu and the board's farm end before the next step
            minrpc_text, document["minrpc"] = minrpc_bench.measure_minrpc(args.quick, cfg.tvm, cfg.cpu)
        print("\n" + minrpc_text)
    if not args.no_resilience:
        with harness.owned():
            resilience_text, document["resilience"] = resilience_bench.measure_resilience(args.quick)
        print("\n" + resilience_text)
    if not args.no_lab:
        with harness.owned():  # the labs, their kernels, the browser and the farm end before the next step
            lab_text, document["lab"] = lab_bench.measure_lab(args.quick)
        print("\n" + lab_text)
    if not args.no_opencl:
        with harness.owned():  # the servers end before the report is saved
            opencl_text, document["opencl"] = opencl_bench.measure_opencl(args.quick)
        print("\n" + opencl_text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(document, f, indent=2)
        print(f"\nfigures saved to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
