"""Side-by-side performance report: rpc-workbench against raw loopback TCP, and TVM when installed.

    python benchmarks/run.py                  # full run (about a minute)
    python benchmarks/run.py --quick          # smoke run: small transfers, few iterations
    python benchmarks/run.py --json out.json  # also save every figure as JSON

Flags:
    --quick       8 MiB transfers (TVM 4 MiB), 300 calls, 2 start-ups, 100 tracker grants: a fast smoke run
    --json PATH   also write the figures, targets and notes to PATH as JSON (the tracker's under "tracker")
    --no-tvm      leave the TVM columns (and the TVM tracker rows) out even when ``import tvm`` works
    --no-tracker  leave the second table, "tracker", out
    --no-notebook leave the third table, "notebook" (benchmarks/notebook.py), out
    --cpu N       the CPU the pinned runs use (default: the first this process may run on)

One run measures, all on 127.0.0.1 with free ports:

* raw: a plain socket pair between this process and a child process: bulk
  throughput (``sendall`` of a memoryview into ``recv_into`` of a preallocated
  buffer) and the round trip of 16-byte messages (TCP_NODELAY), unpinned,
  with both processes pinned to one CPU, and with the two on different CPUs;
* ours: upload and download of a file, tensor copies to the device
  (``runtime.tensor`` and ``Tensor.copyfrom``) and back (``Tensor.numpy``),
  the round trip of an empty remote call (``workbench.nop``) unpinned, pinned
  to one CPU and across two (the server process and its workers pinned too;
  the unpinned figure is for information: the scheduler places each pair
  differently, so only like-for-like placements carry a target), server start-up
  (from ``rpc.Server(port=0)`` until ``rpc.connect`` succeeds) and the idle
  server's resident memory;
* tvm: the same figures for ``tvm.rpc`` (``tvm.runtime.tensor``, the C++
  no-op ``testing.nop`` for the empty call; smaller transfers: it is slow).

A second table, "tracker" (benchmarks/tracker.py), follows: our tracker and
apache-tvm's (``python -m tvm.exec.rpc_tracker``) with 10, 100 and 1000
registered server entries; registering a server, request to grant (median,
p99) and summary() for our client, TVM's stock client and a tuned raw client
against each, with targets for ours at 1000 entries and a growth check.

Every figure is a median. Targets and PASS/FAIL are printed beside our
figures; nothing is asserted: this is a report. Every process the run starts
is ended before it exits.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import operator
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

if __package__:
    from . import notebook as notebook_bench
    from . import tracker as tracker_bench
else:  # run as a script: this directory is sys.path[0]
    import notebook as notebook_bench
    import tracker as tracker_bench

MIB = 1 << 20
HOST = "127.0.0.1"
IO_TIMEOUT_S = 30.0  # every socket this script opens
LOOP_BUDGET_S = 20.0  # wall-clock cap of each timing loop
IDLE_WAIT_S = 5.0  # how long to wait for a closed session's worker to go away
PING_BYTES = 16
RAW_CONNECTIONS = 3  # the raw bulk figure is the median over this many connections
REMOTE_FILE = "bench.bin"
_upload_serial = itertools.count()


def fresh_name() -> str:
    """A new remote file name per upload: replacing a 64 MiB file would add the filesystem's
    cost of freeing the old one to the transfer (the session workspace goes at its end)."""
    return f"upload-{next(_upload_serial)}.bin"
RAW_KEYS = ("bulk", "call", "call_pinned", "call_split")
BULK_KEYS = ("upload", "download", "to_device", "copyfrom", "from_device")
SERVER_KEYS = ("call", "call_pinned", "call_split", "rss")
SECTION_LIMITS_S = {"raw": 30.0, "ours": 60.0, "proxy": 40.0, "tvm": 75.0}  # hard caps: a full run ends within 4 minutes
TRACKER_HARD_LIMIT_S = 60.0  # added to the tracker's own budget (after which it skips what is left)


@dataclass(frozen=True)
class Config:
    bulk_bytes: int = 64 * MIB
    tvm_bulk_bytes: int = 16 * MIB
    bulk_reps: int = 5
    tvm_bulk_reps: int = 3
    calls: int = 2000
    warmup: int = 200
    startups: int = 5
    tvm_startups: int = 5
    cpu: int = 0
    other_cpu: int | None = None  # a second CPU, for the cross-CPU raw round trip
    tvm: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> "Config":
        return cls(bulk_bytes=8 * MIB, tvm_bulk_bytes=4 * MIB, bulk_reps=2, tvm_bulk_reps=1,
                   calls=300, warmup=50, startups=2, tvm_startups=1, **overrides)


# -- results ----------------------------------------------------------------------
@dataclass
class Results:
    """Figures by (side, key), side being "raw", "ours" or "tvm"; and why missing ones are missing."""

    values: dict[tuple[str, str], float] = field(default_factory=dict)
    missing: dict[tuple[str, str], str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    def set(self, side: str, key: str, value: float) -> None:
        self.values[side, key] = value

    def get(self, side: str, key: str | None) -> float | None:
        return self.values.get((side, key)) if key else None

    @contextlib.contextmanager
    def attempt(self, side: str, *keys: str) -> Iterator[None]:
        """Run a measurement; if it fails, mark those of ``keys`` it did not set as missing, and go on."""
        try:
            yield
        except Exception as exc:
            text = str(exc).strip()
            reason = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
            for key in keys:
                if (side, key) not in self.values:
                    self.missing.setdefault((side, key), reason)


# -- timing -----------------------------------------------------------------------
def run_timed(fn: Callable[[], Any], count: int, budget_s: float = LOOP_BUDGET_S) -> list[float]:
    """Seconds taken by each of up to ``count`` calls of ``fn`` (at least one; stops once the budget is spent)."""
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(max(count, 1)):
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        times.append(end - start)
        if end > deadline:
            break
    return times


def round_trip_us(fn: Callable[[], Any], cfg: Config) -> float:
    """Median µs of one call of ``fn``, after warm-up."""
    run_timed(fn, cfg.warmup)
    return statistics.median(run_timed(fn, cfg.calls)) * 1e6


def throughput_mib_s(fn: Callable[[], Any], nbytes: int, reps: int) -> float:
    """MiB/s of a transfer of ``nbytes``: median of ``reps`` runs after one warm-up run."""
    fn()
    return nbytes / MIB / statistics.median(run_timed(fn, reps))


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


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- processes --------------------------------------------------------------------
def _parents() -> dict[int, int]:
    """pid -> parent pid of every process in /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parents


def descendants(pid: int) -> set[int]:
    parents = _parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def pin(pids: Iterable[int], cpus: set[int]) -> None:
    """Pin every thread of ``pids`` to ``cpus``; processes they fork later inherit it."""
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), cpus)


def rss_mb(pids: Iterable[int]) -> float:
    """VmRSS summed over ``pids``, in MB (10**6 bytes)."""
    kib = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            kib += next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    return kib * 1024 / 1e6


@contextlib.contextmanager
def pinned_here(cpu: int | None) -> Iterator[None]:
    """Run this thread on ``cpu`` inside the block (None: leave it alone)."""
    if cpu is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


class Owned:
    """The processes started below this one while the block runs (``pids()``); all are killed at its end."""

    def __init__(self) -> None:
        self._before = descendants(os.getpid())

    def pids(self) -> set[int]:
        return descendants(os.getpid()) - self._before

    def end(self) -> None:
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:  # reap our own children; grandchildren go to init
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@contextlib.contextmanager
def owned() -> Iterator[Owned]:
    processes = Owned()
    try:
        yield processes
    finally:
        processes.end()


@contextlib.contextmanager
def stderr_to_devnull() -> Iterator[None]:
    """Processes started inside inherit /dev/null as stderr (a TVM server logs every transfer)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def environ(name: str, value: str) -> Iterator[None]:
    """Processes started inside see ``name=value`` in their environment."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def startup_s(start: Callable[[], Any], connect: Callable[[Any], Any], close: Callable[[Any], None],
              stop: Callable[[Any], None], reps: int) -> float:
    """Median seconds from starting a server until a client session is up."""
    times = []
    deadline = time.perf_counter() + LOOP_BUDGET_S
    for _ in range(max(reps, 1)):
        with owned():
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
    return statistics.median(times)


# -- raw socket pair ----------------------------------------------------------------
def recv_exactly(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False if the peer closed first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _expect(sock: socket.socket, view: memoryview) -> None:
    if not recv_exactly(sock, view):
        raise ConnectionError("the raw peer closed the connection")


def _peer_main(port: int, mode: str, size: int, count: int, cpu: int | None) -> None:
    """The far end of the raw socket pair (a separate process): take ``size``-byte messages, answer each.

    ``mode`` "sink" answers one byte, "echo" answers the message. Ends at EOF,
    after ``count`` messages, or after IO_TIMEOUT_S of silence.
    """
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    with socket.create_connection((HOST, port), timeout=IO_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = memoryview(bytearray(size))
        reply = b"k" if mode == "sink" else buf
        for _ in range(count):
            if not recv_exactly(sock, buf):
                return
            sock.sendall(reply)


def accept_from(listener: socket.socket, proc: subprocess.Popen) -> socket.socket:
    """The connection of ``proc``; fails fast if it exits first."""
    listener.settimeout(0.1)
    deadline = time.monotonic() + IO_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            return listener.accept()[0]
        except socket.timeout:
            if proc.poll() is not None:
                raise ConnectionError(f"the raw peer process exited (code {proc.returncode}) before connecting") from None
    raise TimeoutError(f"the raw peer did not connect within {IO_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def raw_peer(mode: str, size: int, count: int, cpu: int | None) -> Iterator[socket.socket]:
    """A connected socket whose far end is ``_peer_main`` in a new process (this script, --raw-peer)."""
    with socket.create_server((HOST, 0)) as listener:
        port = listener.getsockname()[1]
        peer_args = json.dumps([port, mode, size, count, cpu])
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--raw-peer", peer_args], stdin=subprocess.DEVNULL)
        try:
            conn = accept_from(listener, proc)
            with conn:
                conn.settimeout(IO_TIMEOUT_S)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                yield conn
        finally:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def raw_bulk_mib_s(cfg: Config) -> float:
    """Median over RAW_CONNECTIONS fresh connections (loopback figures vary from one to the next)."""
    data = memoryview(bytearray(cfg.bulk_bytes))
    ack = memoryview(bytearray(1))
    times: list[float] = []
    for _ in range(RAW_CONNECTIONS):
        with raw_peer("sink", cfg.bulk_bytes, cfg.bulk_reps + 1, None) as conn:

            def send() -> None:
                conn.sendall(data)
                _expect(conn, ack)  # the receiver holds every byte

            send()  # warm-up
            times += run_timed(send, cfg.bulk_reps)
    return cfg.bulk_bytes / MIB / statistics.median(times)


def raw_round_trip_us(cfg: Config, cpu: int | None, peer_cpu: int | None) -> float:
    message = bytes(PING_BYTES)
    answer = memoryview(bytearray(PING_BYTES))
    with pinned_here(cpu), raw_peer("echo", PING_BYTES, cfg.warmup + cfg.calls, peer_cpu) as conn:

        def ping() -> None:
            conn.sendall(message)
            _expect(conn, answer)

        return round_trip_us(ping, cfg)


INTERLEAVE_BLOCKS = 10


def interleaved_round_trips_us(cfg: Config, fn: Callable[[], Any], peer_cpu: int | None) -> tuple[float, float]:
    """Median µs of a raw ping-pong and of ``fn``, timed in alternating blocks within the same
    window, so that the machine's drift (a shared VM) weighs on both alike."""
    message = bytes(PING_BYTES)
    answer = memoryview(bytearray(PING_BYTES))
    block = max(cfg.calls // INTERLEAVE_BLOCKS, 1)
    with raw_peer("echo", PING_BYTES, cfg.warmup + block * INTERLEAVE_BLOCKS, peer_cpu) as conn:

        def ping() -> None:
            conn.sendall(message)
            _expect(conn, answer)

        run_timed(ping, cfg.warmup)
        run_timed(fn, cfg.warmup)
        raw: list[float] = []
        ours: list[float] = []
        for _ in range(INTERLEAVE_BLOCKS):
            raw += run_timed(ping, block)
            ours += run_timed(fn, block)
    return statistics.median(raw) * 1e6, statistics.median(ours) * 1e6


def measure_raw(cfg: Config, res: Results) -> None:
    with res.attempt("raw", "bulk"):
        res.set("raw", "bulk", raw_bulk_mib_s(cfg))
    with res.attempt("raw", "call"):
        res.set("raw", "call", raw_round_trip_us(cfg, None, None))
    with res.attempt("raw", "call_pinned"):
        res.set("raw", "call_pinned", raw_round_trip_us(cfg, cfg.cpu, cfg.cpu))
    if cfg.other_cpu is not None:
        with res.attempt("raw", "call_split"):
            res.set("raw", "call_split", raw_round_trip_us(cfg, cfg.cpu, cfg.other_cpu))


# -- shared by ours and tvm -----------------------------------------------------------
def measure_bulk(side: str, res: Results, ops: dict[str, Callable[[], Any]], nbytes: int, reps: int) -> None:
    for key, op in ops.items():
        with res.attempt(side, key):
            res.set(side, key, throughput_mib_s(op, nbytes, reps))


def check_contents(side: str, res: Results, downloaded: Any, from_device: np.ndarray, data: bytes) -> None:
    """Record a warning if what came back differs from what was sent."""
    for what, got in (("download", bytes(downloaded)), ("Tensor.numpy()", from_device.tobytes())):
        if got != data:
            res.facts.setdefault("warnings", []).append(f"{side}: {what} returned different bytes than were sent")


def measure_server(side: str, res: Results, cfg: Config, processes: Owned,
                   session_figures: Callable[[], None], pinned_call_us: Callable[[str, int], float]) -> None:
    """Figures of one running server: a session's figures, idle RSS, then the pinned calls.

    ``pinned_call_us(key, peer_cpu)`` measures the call with this process on cfg.cpu and
    the server on ``peer_cpu``.
    """
    idle = len(processes.pids())
    with res.attempt(side, *BULK_KEYS, "call"):
        session_figures()
    gc.collect()  # drop the session's last references (a failure's traceback too), so it closes
    with res.attempt(side, "rss"):
        wait_until(lambda: len(processes.pids()) <= idle, IDLE_WAIT_S)
        time.sleep(0.1)
        res.set(side, "rss", rss_mb(processes.pids()))
        res.facts[f"{side}_server_processes"] = len(processes.pids())
    with res.attempt(side, "call_pinned"):
        pin(processes.pids(), {cfg.cpu})
        with pinned_here(cfg.cpu):
            res.set(side, "call_pinned", pinned_call_us("call_pinned", cfg.cpu))
    if cfg.other_cpu is not None:
        with res.attempt(side, "call_split"):
            pin(processes.pids(), {cfg.other_cpu})
            with pinned_here(cfg.cpu):
                res.set(side, "call_split", pinned_call_us("call_split", cfg.other_cpu))


# -- ours -------------------------------------------------------------------------------
def measure_ours(cfg: Config, res: Results) -> None:
    from workbench import rpc, runtime

    def start() -> Any:
        return rpc.Server(port=0, silent=True)

    def connect(server: Any) -> Any:
        return rpc.connect(HOST, server.port)

    def stop(server: Any) -> None:
        server.terminate()

    def close(remote: Any) -> None:
        remote.close()

    with res.attempt("ours", "startup"):
        res.set("ours", "startup", startup_s(start, connect, close, stop, cfg.startups))

    def session_figures(server: Any) -> None:
        remote = connect(server)
        try:
            data = np.random.default_rng(0).bytes(cfg.bulk_bytes)
            arr = np.frombuffer(data, dtype=np.float32)
            dev = remote.cpu(0)
            remote.upload(data, target=REMOTE_FILE)
            on_device = runtime.tensor(arr, dev)
            check_contents("ours", res, remote.download(REMOTE_FILE), on_device.numpy(), data)
            ops = {
                "upload": lambda: remote.upload(data, target=fresh_name()),
                "download": lambda: remote.download(REMOTE_FILE),
                "to_device": lambda: runtime.tensor(arr, dev),
                "copyfrom": lambda: on_device.copyfrom(arr),
                "from_device": on_device.numpy,
            }
            measure_bulk("ours", res, ops, cfg.bulk_bytes, cfg.bulk_reps)
            with res.attempt("ours", "call"):
                res.set("ours", "call", round_trip_us(remote.get_function("workbench.nop"), cfg))
        finally:
            remote.close()

    def pinned_call_us(server: Any, key: str, peer_cpu: int) -> float:
        """Ours and the raw figure it is compared with, interleaved (the raw figure replaces the raw section's)."""
        remote = connect(server)
        try:
            raw_us, ours_us = interleaved_round_trips_us(cfg, remote.get_function("workbench.nop"), peer_cpu)
            res.set("raw", key, raw_us)
            return ours_us
        finally:
            remote.close()

    with res.attempt("ours", *BULK_KEYS, *SERVER_KEYS), owned() as processes:
        server = start()
        try:
            measure_server("ours", res, cfg, processes, lambda: session_figures(server),
                           lambda key, peer_cpu: pinned_call_us(server, key, peer_cpu))
        finally:
            server.terminate()


PROXY_OPS = (("upload", "upload"), ("download", "download"), ("copyfrom", "Tensor.copyfrom"),
             ("from_device", "Tensor.numpy"))


def measure_proxy(cfg: Config, res: Results) -> None:
    """Our bulk figures again, through an rpc.Proxy (a server waiting at it, the client paired by key)."""
    from workbench import rpc, runtime

    keys = [f"proxy_{key}" for key, _ in PROXY_OPS]
    with res.attempt("ours", *keys), owned():
        proxy = rpc.Proxy(port=0, silent=True)
        server = None
        try:
            server = rpc.Server(host=HOST, port=proxy.port, is_proxy=True, key="bench", silent=True)
            deadline = time.monotonic() + 10
            while True:  # the server registers with the proxy in the background
                try:
                    remote = rpc.connect(HOST, proxy.port, key="bench")
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
                    "proxy_upload": lambda: remote.upload(data, target=fresh_name()),
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
def measure_tvm(cfg: Config, res: Results) -> None:
    try:
        import tvm
        import tvm.rpc
        import tvm.runtime
    except Exception as exc:  # not installed, or broken: the columns say n/a
        res.facts["tvm_absent"] = f"import tvm failed ({type(exc).__name__}: {exc})"
        return
    res.facts["tvm_version"] = getattr(tvm, "__version__", "?")
    scratch = tempfile.mkdtemp(prefix="workbench-bench-tvm-")  # TVM servers killed mid-session leave temp dirs
    try:
        measure_tvm_servers(cfg, res, tvm, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure_tvm_servers(cfg: Config, res: Results, tvm: Any, scratch: str) -> None:
    nbytes = cfg.tvm_bulk_bytes

    def start() -> Any:
        port = free_port()
        with stderr_to_devnull(), environ("TMPDIR", scratch):
            return tvm.rpc.Server(host=HOST, port=port, port_end=port + 100, silent=True)

    def connect(server: Any) -> Any:
        return tvm.rpc.connect(HOST, server.port)

    def stop(server: Any) -> None:
        # terminate() needs psutil to end the server's children; owned() ends whatever it leaves
        with contextlib.suppress(Exception):
            server.terminate()

    def nop(remote: Any) -> Callable[[], Any]:
        return remote.get_function("testing.nop")  # a C++ no-op from tvm_ffi's testing functions

    with res.attempt("tvm", "startup"):
        res.set("tvm", "startup", startup_s(start, connect, lambda remote: None, stop, cfg.tvm_startups))

    def session_figures(server: Any) -> None:
        remote = connect(server)
        data = bytearray(np.random.default_rng(0).bytes(nbytes))
        arr = np.frombuffer(data, dtype=np.float32)
        dev = remote.cpu(0)
        remote.upload(data, REMOTE_FILE)
        on_device = tvm.runtime.tensor(arr, dev)
        check_contents("tvm", res, remote.download(REMOTE_FILE), on_device.numpy(), bytes(data))
        ops = {
            "upload": lambda: remote.upload(data, fresh_name()),
            "download": lambda: remote.download(REMOTE_FILE),
            "to_device": lambda: tvm.runtime.tensor(arr, dev),
            "copyfrom": lambda: on_device.copyfrom(arr),
            "from_device": on_device.numpy,
        }
        measure_bulk("tvm", res, ops, nbytes, cfg.tvm_bulk_reps)
        with res.attempt("tvm", "call"):
            res.set("tvm", "call", round_trip_us(nop(remote), cfg))
        # returning drops the session: TVM serves one session at a time

    with res.attempt("tvm", *BULK_KEYS, *SERVER_KEYS), owned() as processes:
        server = start()
        try:
            measure_server("tvm", res, cfg, processes, lambda: session_figures(server),
                           lambda key, peer_cpu: round_trip_us(nop(connect(server)), cfg))
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


@dataclass(frozen=True)
class Metric:
    label: str
    unit: str
    key: str | None  # ours/tvm figure (None: a raw-only row)
    raw_key: str | None = None
    target: Target | None = None
    tvm_sized: bool = False  # TVM moved tvm_bulk_bytes, not bulk_bytes
    base_side: str = "raw"  # whose figure the ratio divides by ("ours": our direct path, for the proxy rows)


def metrics(cfg: Config) -> list[Metric]:
    size = f"{cfg.bulk_bytes // MIB} MiB"
    bulk = Target(">=", 0.5, True, ">= 0.50x raw")
    call = Target("<=", 1.5, True, "<= 1.50x raw")
    return [
        Metric(f"raw TCP bulk, {size}", "MiB/s", None, "bulk"),
        Metric(f"raw round trip, {PING_BYTES} B", "µs", None, "call"),
        Metric(f"raw round trip, {PING_BYTES} B, pinned", "µs", None, "call_pinned"),
        *([Metric(f"raw round trip, {PING_BYTES} B, across 2 CPUs", "µs", None, "call_split")]
          if cfg.other_cpu is not None else []),
        Metric(f"upload {size}", "MiB/s", "upload", "bulk", bulk, True),
        Metric(f"download {size}", "MiB/s", "download", "bulk", bulk, True),
        Metric(f"to device, runtime.tensor {size}", "MiB/s", "to_device", "bulk", bulk, True),
        Metric(f"to device, Tensor.copyfrom {size}", "MiB/s", "copyfrom", "bulk", bulk, True),
        Metric(f"from device, Tensor.numpy {size}", "MiB/s", "from_device", "bulk", bulk, True),
        Metric("empty call round trip, unpinned (info)", "µs", "call", "call"),
        Metric("empty call round trip, pinned", "µs", "call_pinned", "call_pinned", call),
        *([Metric("empty call round trip, across 2 CPUs", "µs", "call_split", "call_split", call)]
          if cfg.other_cpu is not None else []),
        *[Metric(f"through the proxy: {what} {size} (raw = our direct)", "MiB/s", f"proxy_{key}", key,
                 Target(">=", 0.4, True, ">= 0.40x direct"), base_side="ours") for key, what in PROXY_OPS],
        Metric("server start-up to connected", "s", "startup", None, Target("<", 0.2, False, "< 0.2 s")),
        Metric("idle server RSS", "MB", "rss", None, Target("<", 60, False, "< 60 MB")),
    ]


def fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:#.3g}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def row_values(m: Metric, res: Results) -> dict[str, Any]:
    ours, raw, tvm = res.get("ours", m.key), res.get(m.base_side, m.raw_key), res.get("tvm", m.key)
    ok = m.target.passed(ours, raw) if m.target else None
    return {
        "metric": m.label, "unit": m.unit, "ours": ours, "raw": raw,
        "ratio": ratio(ours, raw) if m.key else None,
        "target": m.target.text if m.target else None,
        "pass": ok, "tvm": tvm, "tvm_ratio": ratio(ours, tvm),
    }


def row_cells(m: Metric, v: dict[str, Any], tvm_wanted: bool) -> list[str]:
    def cell(value: float | None, wanted: bool, suffix: str = "") -> str:
        return fmt(value) + (suffix if value is not None else "") if wanted else "-"

    has = m.key is not None
    return [
        f"{m.label} ({m.unit})",
        cell(v["ours"], has),
        cell(v["raw"], m.raw_key is not None),
        f"{v['ratio']:.2f}x" if v["ratio"] is not None else ("n/a" if has and m.raw_key else "-"),
        v["target"] or "-",
        {True: "PASS", False: "FAIL", None: "n/a" if m.target else "-"}[v["pass"]],
        cell(v["tvm"], has and tvm_wanted and m.base_side == "raw", "*" if m.tvm_sized else ""),
        f"{v['tvm_ratio']:.2f}x" if v["tvm_ratio"] is not None
        else ("n/a" if has and tvm_wanted and m.base_side == "raw" else "-"),
    ]


def render_table(rows: list[list[str]]) -> str:
    header = ["metric", "ours", "raw", "ratio", "target", "result", "tvm", "tvm ratio"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


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
            if side == "tvm" and m.base_side != "raw":
                continue  # rows of ours only (the proxy)
            key = (m.raw_key if m.key is None else None) if side == "raw" else m.key
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
    split = (
        f"; across 2 CPUs: this process on CPU {cfg.cpu}, the raw peer (or the server and its workers) on CPU "
        f"{cfg.other_cpu} (what a round trip costs when the scheduler puts the two ends on different CPUs)"
        if cfg.other_cpu is not None else ""
    )
    return [
        *([f"* TVM bulk figures move {cfg.tvm_bulk_bytes // MIB} MiB per transfer (TVM is slow); ours and raw "
           f"move {cfg.bulk_bytes // MIB} MiB."] if tvm else []),
        "uploads write a new remote file each time (replacing one adds the filesystem's cost of freeing it).",
        "ratio = ours / raw" + (", tvm ratio = ours / tvm" if tvm else "")
        + "; MiB/s: higher is better; µs, s, MB: lower is better.",
        f"medians: bulk of {cfg.bulk_reps} transfers" + (f" (tvm {cfg.tvm_bulk_reps})" if tvm else "")
        + f", raw bulk of {cfg.bulk_reps} on each of {RAW_CONNECTIONS} connections, each after a warm-up; calls of "
        f"{cfg.calls} after {cfg.warmup} warm-up; start-up of {cfg.startups}"
        + (f" (tvm {cfg.tvm_startups})." if tvm else "."),
        f"pinned: this process and the raw peer, or the server and its workers, all on CPU {cfg.cpu}{split}; "
        "the pinned and across-2-CPUs raw figures are timed interleaved with ours (alternating blocks); "
        "unpinned (info, no target): where the scheduler puts them, which differs from pair to pair and run to run "
        "(one CPU for one pair, two for the next), so the pinned and across-2-CPUs rows carry the target.",
        f"RSS: VmRSS summed over the idle server's processes ({processes}).",
    ]


def report(cfg: Config, res: Results, elapsed_s: float) -> tuple[str, dict[str, Any]]:
    ms = metrics(cfg)
    values = [row_values(m, res) for m in ms]
    table = render_table([row_cells(m, v, cfg.tvm) for m, v in zip(ms, values)])
    tvm = f"tvm {res.facts['tvm_version']}" if "tvm_version" in res.facts else "no tvm"
    head = (
        f"rpc-workbench benchmark: python {platform.python_version()}, {platform.system()} {platform.release()}, "
        f"{len(os.sched_getaffinity(0))} CPUs (pinned runs on CPU {cfg.cpu}), {tvm}, {elapsed_s:.0f} s"
    )
    notes = [*explanations(cfg, res), *res.facts.get("warnings", []), *missing_notes(ms, res, cfg.tvm)]
    document = {"config": asdict(cfg), "environment": head, "rows": values, "notes": notes, "elapsed_s": elapsed_s}
    return "\n".join([head, "", table, "", *notes]), document


# -- command line -----------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small transfers and few iterations: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--no-tvm", action="store_true", help="leave the TVM columns out")
    parser.add_argument("--no-tracker", action="store_true", help='leave the second table, "tracker", out')
    parser.add_argument("--no-notebook", action="store_true", help='leave the third table, "notebook", out')
    allowed = sorted(os.sched_getaffinity(0))
    parser.add_argument("--cpu", type=int, default=allowed[0], help=f"CPU of the pinned runs (default {allowed[0]})")
    parser.add_argument("--raw-peer", metavar="JSON", help=argparse.SUPPRESS)  # internal: be the raw socket's far end
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
        with owned(), time_limit(seconds, "tracker"):
            tracker_bench.measure(tcfg, results, passthrough=(SectionTimeout,))
    except SectionTimeout:
        results.mark_missing(f"interrupted: the section hit its {seconds:g} s time limit")
    except Exception as exc:
        results.mark_missing(f"{type(exc).__name__}: {exc}")
    return tracker_bench.report(tcfg, results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.raw_peer:
        _peer_main(*json.loads(args.raw_peer))
        return 0
    cfg, json_path = config_from(args), args.json
    res = Results()
    began = time.perf_counter()
    sections = [("raw", measure_raw, RAW_KEYS), ("ours", measure_ours, (*BULK_KEYS, *SERVER_KEYS, "startup")),
                ("proxy", measure_proxy, ())]
    if cfg.tvm:
        sections.append(("tvm", measure_tvm, (*BULK_KEYS, *SERVER_KEYS, "startup")))
    for side, measure, keys in sections:
        with owned(), res.attempt(side, *keys), time_limit(SECTION_LIMITS_S[side], side) as limit:
            measure(cfg, res)
        if limit.expired:
            res.facts.setdefault("warnings", []).append(
                f"{side}: the section hit its {SECTION_LIMITS_S[side]:g} s time limit and was interrupted; "
                "what it had not measured yet is n/a"
            )
    text, document = report(cfg, res, time.perf_counter() - began)
    print(text, flush=True)
    if not args.no_tracker:
        tracker_text, document["tracker"] = measure_tracker(args.quick, cfg.tvm)
        print("\n" + tracker_text)
    if not args.no_notebook:
        notebook_text, document["notebook"] = notebook_bench.measure_notebook(args.quick)
        print("\n" + notebook_text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(document, f, indent=2)
        print(f"\nfigures saved to {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
