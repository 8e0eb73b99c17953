"""What the benchmark tables share: timing and interleaving, processes and pinning, the native baselines, TVM's
server, the figures' format and table layout.

Every module of ``benchmarks/`` may import this one; it imports none of them (no import cycles: ``run.py``
imports the tables, the tables import this harness).

* timing: ``run_timed`` (seconds of each call, under a wall-clock budget), ``rotated`` (the order of the
  sides in each interleaved round), ``mib_s`` (a transfer's median rate), ``wait_until``, ``FreshUploads``
  (uploads to new names, removed after each block);
* processes: ``descendants``/``children`` (from /proc), ``pin``/``pinned_here`` (CPU placement),
  ``rss_mb``, ``owned`` (every process started inside the block is killed at its end),
  ``stderr_to_devnull``, ``env_var``, ``ensure_fd_limit``, ``free_port``, ``start_tvm_server``;
* the native limit: ``Native`` (``benchmarks/raw/rawnet.c``, built with gcc -O2);
* report: ``fmt`` (a figure), ``span`` (min..max), ``table_lines`` (aligned columns), ``reason_of``.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

MIB = 1 << 20
HOST = "127.0.0.1"
LOOP_BUDGET_S = 20.0  # wall-clock cap of each timing loop
IDLE_WAIT_S = 5.0  # how long to wait for a closed session's worker to go away
PING_BYTES = 16
RAW_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "raw", "rawnet.c")
BULK_METHODS = ("send-recv", "sendfile-recv", "send-splice", "sendfile-splice")  # rawnet's SOURCE-SINK
# the native ways that do a bulk row's very job, for the "(info)" row beside it: an upload lands in a file, a new
# one or one removed before (as rawnet's splice, write and overwrite sinks); a fresh session's first transfer is a
# new connection's first (rawnet first)
SAME_JOB = {"upload": ("send-splice", "sendfile-splice", "send-write", "send-overwrite"), "first_transfer": ("first",)}
# bulk rows whose data flows from the server to this process: their native runs send the other way too (the
# server's CPU to this one's; on a VM the two directions differ by some 10 %)
FROM_SERVER = frozenset({"download", "from_device"})


def bulk_ends(row: str, cpu: int | None, server_cpu: int | None) -> tuple[int | None, int | None]:
    """(the native sender's CPU, its receiver's) for a bulk row: the direction its data goes."""
    return (server_cpu, cpu) if row in FROM_SERVER else (cpu, server_cpu)
NATIVE_TIMEOUT_S = 60.0  # one rawnet run
BUILD_TIMEOUT_S = 60.0


def reason_of(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# -- timing -----------------------------------------------------------------------
def run_timed(fn: Callable[[], Any], count: int, budget_s: float = LOOP_BUDGET_S, self_timed: bool = False) -> list[float]:
    """Seconds taken by each of up to ``count`` calls of ``fn`` (at least one; stops once the budget is spent);
    ``self_timed``: the seconds ``fn`` returns (the part of its work it times itself)."""
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(max(count, 1)):
        start = time.perf_counter()
        seconds = fn()
        end = time.perf_counter()
        times.append(seconds if self_timed else end - start)
        if end > deadline:
            break
    return times


def mib_s(nbytes: int, times: list[float]) -> float:
    """MiB/s of a transfer of ``nbytes`` that took the median of ``times`` seconds."""
    return nbytes / MIB / statistics.median(times)


def rotated(items: Sequence[str], by: int) -> list[str]:
    """``items`` rotated left by ``by``: the order of the sides in interleaved round ``by``."""
    by %= len(items)
    return [*items[by:], *items[:by]]


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


_upload_serial = itertools.count()


def fresh_name() -> str:
    """A new remote file name per upload: replacing a 64 MiB file would add the filesystem's
    cost of freeing the old one to the transfer (the session workspace goes at its end)."""
    return f"upload-{next(_upload_serial)}.bin"


class FreshUploads:
    """Uploads, each to a new remote file (replacing one would add the filesystem's cost of freeing it),
    removed after each block, untimed, as the native program removes its files after each of its blocks."""

    def __init__(self, remote: Any, data: bytes):
        self.remote, self.data, self.names = remote, data, []

    def __call__(self) -> None:
        self.names.append(fresh_name())
        self.remote.upload(self.data, target=self.names[-1])

    def after_block(self) -> None:
        while self.names:
            self.remote.remove(self.names.pop())


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


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    return [child for child, parent in _parents().items() if parent == pid]


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


VIRTIO_BALLOON = "0x0005"  # a virtio device id (sysfs "device")
VIRTIO_BALLOON_F_REPORTING = 5  # its feature bit: free page reporting


def returns_free_memory_to_host() -> bool:
    """Whether this machine is a VM whose balloon reports free memory to the host (free page reporting).

    There, memory left free for a couple of seconds is handed back to the host, and
    the first touch of it afterwards is far slower (the host must back it again):
    transfers that land in fresh memory (a new file's page cache, a new tensor) slow
    down in stretches. False where sysfs does not tell.

        >>> returns_free_memory_to_host()  # doctest: +SKIP
        True
    """
    for device in glob.glob("/sys/bus/virtio/devices/*"):
        try:
            with open(os.path.join(device, "device")) as f:
                kind = f.read().strip()
            with open(os.path.join(device, "features")) as f:
                features = f.read().strip()
        except OSError:
            continue
        if (kind == VIRTIO_BALLOON and features[VIRTIO_BALLOON_F_REPORTING:][:1] == "1"
                and os.path.exists(os.path.join(device, "driver"))):
            return True
    return False


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
def env_var(name: str, value: str | None) -> Iterator[None]:
    """Processes started inside the block see ``name=value`` (our server's workers read TVM_NUM_THREADS), or
    no ``name`` at all when ``value`` is None."""
    saved = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def ensure_fd_limit(needed: int) -> None:
    """Raise this process's open-file limit (trackers started later inherit it) to fit ``needed`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise RuntimeError(f"{needed} connections need {needed} open files; the hard limit is {hard} (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_tvm_server(tvm: Any, scratch: str) -> Any:
    """A ``tvm.rpc.Server`` on a free port of HOST, its log to /dev/null and its temporary files in ``scratch``."""
    port = free_port()
    with stderr_to_devnull(), env_var("TMPDIR", scratch):  # a TVM server logs every transfer
        return tvm.rpc.Server(host=HOST, port=port, port_end=port + 100, silent=True)


# -- the native limit ---------------------------------------------------------------------
class Native:
    """The native raw baselines: ``benchmarks/raw/rawnet.c``, built with gcc -O2 into a temporary directory.

    Each call runs the program once (it forks its own peer, both ends pinned
    as asked) and returns the seconds of each timed transfer or round trip.

        >>> with Native.build() as native:                                  # doctest: +SKIP
        ...     native.ping(16, warmup=50, count=200, cpu=0, peer_cpu=0)   # [4.6e-06, ...]
    """

    def __init__(self, binary: str, scratch: str):
        self.binary = binary
        self.scratch = scratch  # also where the sendfile source and the splice destinations live

    @classmethod
    def build(cls) -> "Native":
        compiler = next((c for c in (os.environ.get("CC"), "gcc", "cc") if c and shutil.which(c.split()[0])), None)
        if compiler is None:
            raise RuntimeError(f"no C compiler to build {os.path.relpath(RAW_SOURCE)}: install gcc (apt-get install gcc)")
        scratch = tempfile.mkdtemp(prefix="workbench-bench-raw-")
        binary = os.path.join(scratch, "rawnet")
        try:
            proc = subprocess.run([*compiler.split(), "-O2", "-o", binary, RAW_SOURCE],
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
            if proc.returncode != 0:
                raise RuntimeError(f"building {os.path.relpath(RAW_SOURCE)} with {compiler} failed (status "
                                   f"{proc.returncode}): {proc.stderr.strip() or 'no message'}")
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return cls(binary, scratch)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> "Native":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self, *args: Any) -> list[float]:
        cmd = [self.binary, *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=NATIVE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"rawnet {args[0]} failed (status {proc.returncode}): {proc.stderr.strip()}")
        return json.loads(proc.stdout)["seconds"]

    def bulk(self, method: str, nbytes: int, reps: int, cpu: int | None, peer_cpu: int | None) -> list[float]:
        """Seconds of each of ``reps`` transfers of ``nbytes`` (after one untimed), by ``method`` (BULK_METHODS)."""
        return self._run("bulk", method, nbytes, reps, _cpu_arg(cpu), _cpu_arg(peer_cpu), self.scratch)

    def first(self, nbytes: int, reps: int, cpu: int | None, peer_cpu: int | None) -> list[float]:
        """Seconds of ``reps`` first transfers (send -> recv) of ``nbytes``, each on a new connection to a
        freshly forked peer receiving into memory it has just mapped (after one untimed)."""
        return self._run("first", nbytes, reps, _cpu_arg(cpu), _cpu_arg(peer_cpu))

    def ping(self, size: int, warmup: int, count: int, cpu: int | None, peer_cpu: int | None) -> list[float]:
        """Seconds of each of ``count`` round trips of ``size`` bytes, after ``warmup`` untimed ones."""
        return self._run("ping", size, warmup, count, _cpu_arg(cpu), _cpu_arg(peer_cpu))


def _cpu_arg(cpu: int | None) -> int:
    return -1 if cpu is None else cpu


# -- a table's own command line ---------------------------------------------------------------
def section_main(argv: list[str] | None, module: str, doc: str | None, quick_help: str,
                 measure: Callable[[argparse.Namespace], tuple[str, Any]],
                 add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """The command line of one table's module run on its own: ``--quick`` (``quick_help``), ``--json PATH``
    and the module's own flags (``add_arguments``); ``measure(args)`` gives (text, figures), every process it
    starts ended after it; prints the text, saves the figures.

        >>> section_main(None, "notebook.py", __doc__, "fewer runs", lambda a: measure(a.quick))  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(prog=f"python benchmarks/{module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    with owned():
        text, figures = measure(args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


# -- report -----------------------------------------------------------------------------
def fmt(value: float | None) -> str:
    """A figure with three significant digits below 10, one decimal below 100, none above; None: "n/a"."""
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:#.3g}"


def span(values: Sequence[float], form: Callable[[float], str] = fmt) -> str:
    """The spread of ``values``: "min..max", each formatted with ``form``."""
    return f"{form(min(values))}..{form(max(values))}"


def table_lines(header: list[str], rows: list[list[str]], left: int = 1, left_last: bool = True) -> list[str]:
    """The header, a rule and the rows in columns two spaces apart: the first ``left`` columns (and the last
    one, with ``left_last``) aligned left, the others right; no trailing spaces."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    last = len(header) - 1

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left or (left_last and i == last) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]
