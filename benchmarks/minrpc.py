"""minrpc, the native server, beside our Python server and TVM's C++ server; and the emulated aarch64 board.

    python benchmarks/run.py                   # prints this "minrpc" table after the others
    python benchmarks/minrpc.py [--quick]      # this table alone (--json PATH, --no-tvm, --cpu N)

All on 127.0.0.1, servers on free ports:

* idle RSS: VmRSS of the listening process (minrpc's; the Python server's
  ``rpc.Server`` process; TVM's ``tvm.rpc.Server`` process), read after one
  session came and went, for each of several fresh starts. Target: minrpc
  under 2 MB.
* empty call round trip: an empty kernel (``WB_KERNEL(nop)``, loaded from a
  ``.so``) called on minrpc and on the Python server, TVM's C++
  ``testing.nop`` on TVM's server, and the C ping-pong of
  ``benchmarks/raw/rawnet.c``, in interleaved rounds (a block of each, order
  rotating), pinned to one CPU (this process and every server on it), then
  across two CPUs (this process on one, the servers on the other). Target:
  minrpc no slower than TVM's C++ server; "met" counts the rounds whose own
  ratio met it.
* bulk: upload and download of a file, a tensor to the device
  (``runtime.tensor``) and back (``Tensor.numpy``) on minrpc (and the Python
  server, for reference) against the native loopback limit (rawnet: the way of
  send/sendfile into recv/splice fastest over every round), interleaved, the
  client on one CPU and the servers on the other. Target: >= 0.50x raw.
* time_evaluator overhead: the empty kernel timed with ``number=1000`` on
  each server (TVM's runtime loads our kernel ABI too): the device-side
  seconds per call. Target: minrpc under 1 µs.
* the emulated aarch64 board (minrpc under qemu-aarch64, in a LocalFarm):
  seed 004 from ``cc.cross_compiler`` to the checked result (compile and
  export a tar, get the board from the tracker, upload, load (linked on the
  board), run, compare with numpy), in seconds, with its parts.

Each figure is the median of the runs (or of every reading, for the calls),
with the spread (min..max of the runs or blocks) and how many met the target.
Nothing is asserted; every process started here is ended before it returns.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

if __package__:
    from . import harness
else:  # run as a script: this directory is sys.path[0]
    import harness

RSS_TARGET_MB = 2.0
TE_TARGET_US = 1.0
BULK_TARGET = 0.5
BOARD = "aarch64-qemu"
NOP_C = "#include <workbench_kernel.h>\nWB_KERNEL(nop) { return 0; }\n"
ADD_ONE_C = """#include <workbench_kernel.h>
WB_KERNEL(add_one) {
  WB_EXPECT_ARGS(2);
  DLTensor* a = WB_ARG_TENSOR_OF(0, float32, 1);
  DLTensor* b = WB_ARG_TENSOR_OF(1, float32, 1);
  for (int64_t i = 0; i < a->shape[0]; ++i) ((float*)b->data)[i] = ((const float*)a->data)[i] + 1.0f;
  return 0;
}
"""
SIDES = ("minrpc", "python", "tvm")


@dataclass(frozen=True)
class MinRPCConfig:
    runs: int = 5  # fresh starts for RSS; rounds of time_evaluator
    call_rounds: int = 10  # interleaved rounds of call blocks, per placement
    call_block: int = 200  # calls per block
    call_warmup: int = 200
    bulk_bytes: int = 64 * harness.MIB
    bulk_rounds: int = 5
    bulk_block: int = 2
    te_number: int = 1000
    te_repeat: int = 5
    board_runs: int = 3
    cpu: int = 0
    other_cpu: int | None = None
    tvm: bool = True
    budget_s: float = 240.0  # what is left after this is skipped (n/a)

    @classmethod
    def quick(cls, **overrides: Any) -> "MinRPCConfig":
        values = dict(runs=3, call_rounds=4, call_block=100, call_warmup=50, bulk_bytes=8 * harness.MIB,
                      bulk_rounds=2, bulk_block=1, te_repeat=3, board_runs=2, budget_s=150.0)
        values.update(overrides)
        return cls(**values)


@dataclass
class Figures:
    """Readings by (row, side): a list of per-run (or per-block) values; ``rounds`` the per-round ratios."""

    values: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    pooled: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # every reading (calls)
    rounds: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[tuple[str, str], str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, row: str, side: str, value: float) -> None:
        self.values.setdefault((row, side), []).append(value)

    def median(self, row: str, side: str) -> float | None:
        pooled = self.pooled.get((row, side))
        values = pooled or self.values.get((row, side))
        return statistics.median(values) if values else None

    def miss(self, row: str, side: str, reason: str) -> None:
        if (row, side) not in self.values:
            self.missing.setdefault((row, side), reason)

    @contextlib.contextmanager
    def attempt(self, rows: tuple[str, ...], sides: tuple[str, ...]):
        try:
            yield
        except Exception as exc:
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            for row in rows:
                for side in sides:
                    self.miss(row, side, reason)


# -- helpers ----------------------------------------------------------------------------------
def vm_rss_mb(pid: int) -> float:
    """VmRSS of one process, in MB (10**6 bytes)."""
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib * 1024 / 1e6


def build_kernel(source: str, directory: str, name: str) -> str:
    from workbench import cc

    src = os.path.join(directory, f"{name}.c")
    with open(src, "w") as f:
        f.write(source)
    return cc.create_shared(os.path.join(directory, f"{name}.so"), [src])


def tvm_module() -> Any:
    import tvm
    import tvm.rpc
    import tvm.runtime

    return tvm


# The C client of the "server's share" rows: argv fd request-hex reply-hex warmup count cpu (-1: unpinned);
# prints {"seconds": [...]} for the timed round trips. The socket is the session's own, inherited.
C_CLIENT = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static size_t unhex(const char* text, unsigned char* out, size_t cap) {
    size_t n = strlen(text) / 2;
    if (n > cap) exit(4);
    for (size_t i = 0; i < n; ++i) sscanf(text + 2 * i, "%2hhx", &out[i]);
    return n;
}

int main(int argc, char** argv) {
    if (argc != 7) return 5;
    int fd = atoi(argv[1]), warmup = atoi(argv[4]), count = atoi(argv[5]), cpu = atoi(argv[6]);
    unsigned char request[256], expected[256], reply[256];
    size_t request_len = unhex(argv[2], request, sizeof(request));
    size_t reply_len = unhex(argv[3], expected, sizeof(expected));
    if (cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        sched_setaffinity(0, sizeof(set), &set);
    }
    double* seconds = calloc((size_t)count + 1, sizeof(double));
    for (int i = 0; i < warmup + count; ++i) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        if (send(fd, request, request_len, MSG_NOSIGNAL) != (ssize_t)request_len) return 2;
        for (size_t got = 0; got < reply_len;) {
            ssize_t n = recv(fd, reply + got, reply_len - got, 0);
            if (n <= 0) return 3;
            got += (size_t)n;
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        if (memcmp(reply, expected, reply_len) != 0) { fprintf(stderr, "unexpected reply\n"); return 6; }
        if (i >= warmup) seconds[i - warmup] = (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9;
    }
    printf("{\"seconds\": [");
    for (int i = 0; i < count; ++i) printf("%s%.9g", i ? ", " : "", seconds[i]);
    printf("]}\n");
    return 0;
}
"""


def build_c_client(scratch: str) -> str:
    """Compile C_CLIENT with the system compiler into ``scratch``."""
    import subprocess

    src, binary = os.path.join(scratch, "frame_client.c"), os.path.join(scratch, "frame_client")
    with open(src, "w") as f:
        f.write(C_CLIENT)
    compiler = os.environ.get("CC") or ("gcc" if shutil.which("gcc") else "cc")
    proc = subprocess.run([*compiler.split(), "-O2", "-o", binary, src], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"building the C frame client failed: {proc.stderr.strip()}")
    return binary


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.seconds = seconds

    def check(self, what: str) -> None:
        if time.perf_counter() > self.end:
            raise TimeoutError(f"the table's {self.seconds:g} s budget ran out before {what}")


# -- the sides ----------------------------------------------------------------------------------
class Servers:
    """minrpc, the Python server and (optionally) TVM's server, each with a session and the nop kernel loaded."""

    def __init__(self, cfg: MinRPCConfig, figures: Figures, scratch: str):
        from workbench import rpc

        self.servers: list[Any] = []
        self.sessions: dict[str, Any] = {}
        self.nop: dict[str, Any] = {}
        self.devs: dict[str, Any] = {}
        self.c_program: str | None = None
        self.nop_so = build_kernel(NOP_C, scratch, "nop")
        self.minrpc = rpc.MinRPCServer(port=0)
        self.servers.append(self.minrpc)
        self.python = rpc.Server(port=0, silent=True)
        self.servers.append(self.python)
        for side, server in (("minrpc", self.minrpc), ("python", self.python)):
            remote = rpc.connect(harness.HOST, server.port)
            self._load(side, remote)
        self.tvm = None
        if cfg.tvm:
            with figures.attempt(("calls_pinned", "calls_split", "te"), ("tvm",)):
                tvm = tvm_module()
                figures.facts["tvm_version"] = tvm.__version__
                self.tvm = harness.start_tvm_server(tvm, scratch)
                self.servers.append(self.tvm)
                remote = tvm.rpc.connect(harness.HOST, self.tvm.port)
                self.sessions["tvm"] = remote
                self.devs["tvm"] = remote.cpu(0)
                remote.upload(self.nop_so)
                self.nop["tvm"] = remote.load_module("nop.so")
                self.nop["tvm_call"] = remote.get_function("testing.nop")

    def _load(self, side: str, remote: Any) -> None:
        self.sessions[side] = remote
        remote.upload(self.nop_so)
        self.nop[side] = remote.load_module("nop.so")
        self.devs[side] = remote.cpu(0)

    def call(self, side: str) -> Callable[[], Any]:
        return self.nop["tvm_call"] if side == "tvm" else self.nop[side]["nop"]

    def c_client(self, side: str, scratch: str) -> Callable[[int, int, int | None], list[float]]:
        """``f(warmup, count, cpu)``: the same CALL sent by a C program on the session's own socket (inherited),
        the 17-byte reply read raw: seconds of each round trip. What is left is the server's turnaround and the
        two system calls of any client; the Python client's encoding and decoding are left out."""
        import subprocess

        from workbench.rpc.wire.protocol import HEADER, Kind, pack

        if self.c_program is None:
            self.c_program = build_c_client(scratch)
        body = pack([self.nop[side]["nop"]._wb_handle, []])
        request = (HEADER.pack(len(body), Kind.CALL, 0, 0) + body).hex()
        expected = (HEADER.pack(1, Kind.OK, 0, 0) + b"\xc0").hex()  # OK nil
        fd = self.sessions[side]._chan.sock.fileno()

        def run_block(warmup: int, count: int, cpu: int | None) -> list[float]:
            proc = subprocess.run([self.c_program, str(fd), request, expected, str(warmup), str(count),
                                   str(-1 if cpu is None else cpu)], pass_fds=(fd,), capture_output=True,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise RuntimeError(f"the C client failed on {side} (status {proc.returncode}): {proc.stderr.strip()}")
            return json.loads(proc.stdout)["seconds"]

        return run_block

    def close(self) -> None:
        for side, session in self.sessions.items():
            with contextlib.suppress(Exception):
                getattr(session, "close", lambda: None)()
        self.sessions.clear()
        self.nop.clear()
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.terminate()


# -- measurements -------------------------------------------------------------------------------
def measure_rss(cfg: MinRPCConfig, figures: Figures, scratch: str, deadline: Deadline) -> None:
    """VmRSS of each server's listening process after one session came and went, over fresh starts."""
    from workbench import rpc

    tvm = None
    if cfg.tvm:
        with figures.attempt(("rss",), ("tvm",)):
            tvm = tvm_module()

    def minrpc() -> float:
        with rpc.MinRPCServer(port=0) as server:
            with rpc.connect(harness.HOST, server.port) as remote:
                remote.ping()
            harness.wait_until(lambda: not harness.descendants(server.pid), harness.IDLE_WAIT_S)
            return vm_rss_mb(server.pid)

    def python() -> float:
        with rpc.Server(port=0, silent=True) as server:
            with rpc.connect(harness.HOST, server.port) as remote:
                remote.ping()
            harness.wait_until(lambda: not harness.descendants(server.pid), harness.IDLE_WAIT_S)
            return vm_rss_mb(server.pid)

    def tvm_side() -> float:
        server = harness.start_tvm_server(tvm, scratch)
        try:
            remote = tvm.rpc.connect(harness.HOST, server.port)
            remote.cpu(0)
            del remote
            pid = server.proc._proc.pid  # the PopenWorker process that listens
            harness.wait_until(lambda: not harness.descendants(pid), harness.IDLE_WAIT_S)
            time.sleep(0.1)
            return vm_rss_mb(pid)
        finally:
            with contextlib.suppress(Exception):
                server.terminate()

    measures = {"minrpc": minrpc, "python": python}
    if tvm is not None:
        measures["tvm"] = tvm_side
    for i in range(cfg.runs):
        deadline.check("the RSS runs")
        for side, measure in measures.items():
            with figures.attempt(("rss",), (side,)), harness.owned():
                figures.add("rss", side, measure())


def measure_calls(cfg: MinRPCConfig, figures: Figures, servers: Servers, native: Any, deadline: Deadline,
                  scratch: str) -> None:
    """Empty-call round trips, interleaved, pinned to one CPU and across two."""
    sides = [s for s in SIDES if s in servers.sessions]
    wire: dict[str, Callable[[int, int, int | None], list[float]]] = {}
    for side in ("minrpc", "python"):
        with figures.attempt(("calls_pinned_wire", "calls_split_wire"), (side,)):
            wire[f"{side}_wire"] = servers.c_client(side, scratch)
    sides += list(wire)
    placements = [("calls_pinned", cfg.cpu, cfg.cpu)]
    if cfg.other_cpu is not None:
        placements.append(("calls_split", cfg.cpu, cfg.other_cpu))
    for row, cpu, peer_cpu in placements:
        deadline.check(row)
        harness.pin(harness.descendants(os.getpid()), {peer_cpu})  # every server and session process
        with harness.pinned_here(cpu):
            calls = {side: servers.call(side) for side in sides if side not in wire}
            for side in calls:
                harness.run_timed(calls[side], cfg.call_warmup)
            for rnd in range(cfg.call_rounds):
                block: dict[str, float] = {}
                for what in harness.rotated([*sides, "raw"], rnd):
                    if what == "raw":
                        if native is None:
                            continue
                        with figures.attempt((row,), ("raw",)):
                            times = native.ping(harness.PING_BYTES, min(cfg.call_warmup, cfg.call_block),
                                                cfg.call_block, cpu, peer_cpu)
                            figures.pooled.setdefault((row, "raw"), []).extend(t * 1e6 for t in times)
                            figures.add(row, "raw", statistics.median(times) * 1e6)
                        continue
                    if what in wire:
                        times = wire[what](min(cfg.call_warmup, cfg.call_block), cfg.call_block, cpu)
                    else:
                        times = harness.run_timed(calls[what], cfg.call_block)
                    key = (row + "_wire", what[:-5]) if what in wire else (row, what)
                    figures.pooled.setdefault(key, []).extend(t * 1e6 for t in times)
                    block[what] = statistics.median(times) * 1e6
                    figures.add(*key, block[what])
                if "tvm" in block:
                    figures.rounds.setdefault(row, []).append(block["minrpc"] / block["tvm"])
    all_cpus = set(os.sched_getaffinity(0))
    harness.pin(harness.descendants(os.getpid()), all_cpus)


BULK_ROWS = ("upload", "download", "to_device", "from_device")


def measure_bulk(cfg: MinRPCConfig, figures: Figures, servers: Servers, native: Any, deadline: Deadline) -> None:
    """Bulk transfers on minrpc and the Python server against the native limit, interleaved per round."""
    from workbench import runtime

    data = np.random.default_rng(0).bytes(cfg.bulk_bytes)
    arr = np.frombuffer(data, dtype=np.float32)
    ops: dict[str, dict[str, Callable[[], Any]]] = {}
    for side in ("minrpc", "python"):
        remote, dev = servers.sessions[side], servers.devs[side]
        remote.upload(data, target="bench.bin")
        on_device = runtime.tensor(arr, dev)
        if bytes(remote.download("bench.bin")) != data or on_device.numpy().tobytes() != data:
            figures.notes.append(f"{side}: what came back differs from what was sent")
        ops[side] = {
            "upload": harness.FreshUploads(remote, data),
            "download": lambda remote=remote: remote.download("bench.bin"),
            "to_device": lambda dev=dev: runtime.tensor(arr, dev),
            "from_device": on_device.numpy,
        }
    cpu = cfg.cpu
    peer = cfg.cpu if cfg.other_cpu is None else cfg.other_cpu
    harness.pin(harness.descendants(os.getpid()), {peer})
    raw_windows: dict[str, dict[str, list[float]]] = {}
    try:
        with harness.pinned_here(cpu):
            for row in BULK_ROWS:
                deadline.check(f"the bulk row {row}")
                raw = raw_windows[row] = {m: [] for m in harness.BULK_METHODS}
                for rnd in range(cfg.bulk_rounds):
                    for what in harness.rotated([*ops, *harness.BULK_METHODS], rnd):
                        if what in ops:
                            op = ops[what][row]
                            op()  # an untimed warm-up, as each native block has its own
                            times = harness.run_timed(op, cfg.bulk_block)
                            getattr(op, "after_block", lambda: None)()  # uploads: removed, as rawnet's are
                            figures.add(row, what, harness.mib_s(cfg.bulk_bytes, times))
                        elif native is not None:
                            with figures.attempt((row,), ("raw",)):
                                times = native.bulk(what, cfg.bulk_bytes, cfg.bulk_block,
                                                    *harness.bulk_ends(row, cpu, peer))
                                raw[what].append(harness.mib_s(cfg.bulk_bytes, times))
    finally:
        harness.pin(harness.descendants(os.getpid()), set(os.sched_getaffinity(0)))
    pooled = {m: [v for w in raw_windows.values() for v in w[m]] for m in harness.BULK_METHODS}
    measured = [m for m, v in pooled.items() if v]
    if not measured:
        return
    fastest = max(measured, key=lambda m: statistics.median(pooled[m]))
    figures.facts["raw_method"] = fastest
    for row, raw in raw_windows.items():
        if raw[fastest]:
            figures.values[row, "raw"] = raw[fastest]
            ours = figures.values.get((row, "minrpc"), [])
            figures.rounds[row] = [o / r for o, r in zip(ours, raw[fastest])]


def measure_time_evaluator(cfg: MinRPCConfig, figures: Figures, servers: Servers, deadline: Deadline) -> None:
    """The device-side seconds per call of the empty kernel, number=1000, on each server, interleaved."""
    sides = [s for s in SIDES if s in servers.nop]
    for rnd in range(cfg.runs):
        deadline.check("the time_evaluator runs")
        for side in sides[rnd % len(sides):] + sides[: rnd % len(sides)]:
            with figures.attempt(("te",), (side,)):
                f = servers.nop[side].time_evaluator("nop", servers.devs[side], number=cfg.te_number,
                                                     repeat=cfg.te_repeat)
                figures.add("te", side, statistics.median(list(f().results)) * 1e6)


def measure_board(cfg: MinRPCConfig, figures: Figures, scratch: str, deadline: Deadline) -> None:
    """Seed 004 on the emulated aarch64 board, from cc.cross_compiler to the checked result."""
    from workbench import cc, runtime
    from workbench.farm import LocalFarm
    from workbench.native.qemu import find_emulator

    find_emulator("aarch64")  # what to install, if anything is missing
    began = time.perf_counter()
    with LocalFarm({BOARD: 1}) as farm:
        figures.facts["board_farm_start_s"] = time.perf_counter() - began
        for i in range(cfg.board_runs):
            deadline.check("the board runs")
            out = os.path.join(scratch, f"board-{i}")
            os.makedirs(out)
            t0 = time.perf_counter()
            fcompile = cc.cross_compiler("aarch64-linux-gnu", output_format="tar")
            with cc.build(ADD_ONE_C, target="aarch64-linux-gnu", name="add_one") as mod:
                path = mod.export_library(os.path.join(out, "lib.tar"), fcompile=fcompile)
            t1 = time.perf_counter()
            with farm.request(BOARD) as remote:
                remote.upload(path)
                func = remote.load_module("lib.tar")
                t2 = time.perf_counter()
                dev = remote.cpu()
                a = runtime.tensor(np.random.uniform(size=1024).astype("float32"), dev)
                b = runtime.tensor(np.zeros(1024, dtype="float32"), dev)
                func(a, b)
                np.testing.assert_equal(b.numpy(), a.numpy() + 1)
                t3 = time.perf_counter()
            figures.add("board", "minrpc", t3 - t0)
            figures.add("board_compile", "minrpc", t1 - t0)
            figures.add("board_load", "minrpc", t2 - t1)
            figures.add("board_run", "minrpc", t3 - t2)


def measure(cfg: MinRPCConfig, figures: Figures) -> None:
    deadline = Deadline(cfg.budget_s)
    began = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="workbench-bench-minrpc-")
    native = None
    try:
        with figures.attempt(("calls_pinned", "calls_split", *BULK_ROWS), ("raw",)):
            native = harness.Native.build()
        with figures.attempt(("build",), ("minrpc",)):
            from workbench.native import build_minrpc

            t = time.perf_counter()
            build_minrpc()
            figures.facts["build_s"] = time.perf_counter() - t  # 0 when cached
        with figures.attempt(("rss",), SIDES):
            measure_rss(cfg, figures, scratch, deadline)
        with harness.owned(), figures.attempt(("calls_pinned", "calls_split", *BULK_ROWS, "te"), SIDES):
            servers = Servers(cfg, figures, scratch)
            try:
                with figures.attempt(("calls_pinned", "calls_split"), SIDES):
                    measure_calls(cfg, figures, servers, native, deadline, scratch)
                with figures.attempt(("te",), SIDES):
                    measure_time_evaluator(cfg, figures, servers, deadline)
                with figures.attempt(BULK_ROWS, SIDES):
                    measure_bulk(cfg, figures, servers, native, deadline)
            finally:
                servers.close()
        with harness.owned(), figures.attempt(("board", "board_compile", "board_load", "board_run"), ("minrpc",)):
            measure_board(cfg, figures, scratch, deadline)
    finally:
        if native is not None:
            native.close()
        shutil.rmtree(scratch, ignore_errors=True)
        figures.facts["elapsed_s"] = time.perf_counter() - began


# -- report -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    key: str
    label: str
    unit: str
    base: str | None  # the side the ratio divides by (None: no ratio)
    target: tuple[str, float] | None  # (op, limit) on the ratio (base given) or on minrpc's figure
    target_text: str = ""
    sides: tuple[str, ...] = SIDES
    with_raw: bool = False


def rows(cfg: MinRPCConfig) -> list[Row]:
    size = f"{cfg.bulk_bytes // harness.MIB} MiB"
    out = [
        Row("rss", "idle RSS of the listening process", "MB", None, ("<", RSS_TARGET_MB), "< 2 MB"),
        Row("calls_pinned", "empty call round trip, pinned to 1 CPU", "µs", "tvm", ("<=", 1.0), "<= 1.00x tvm",
            with_raw=True),
    ]
    out.append(Row("calls_pinned_wire", "  the same CALL from a C client on the session's socket", "µs",
                   None, None, "(info)", ("minrpc", "python")))
    if cfg.other_cpu is not None:
        out.append(Row("calls_split", "empty call round trip, across 2 CPUs", "µs", "tvm", ("<=", 1.0),
                       "<= 1.00x tvm", with_raw=True))
        out.append(Row("calls_split_wire", "  the same CALL from a C client on the session's socket",
                       "µs", None, None, "(info)", ("minrpc", "python")))
    out += [
        Row("te", f"time_evaluator, empty kernel, number={cfg.te_number}", "µs/call", None, ("<", TE_TARGET_US),
            "< 1 µs"),
        Row("upload", f"upload {size}", "MiB/s", "raw", (">=", BULK_TARGET), ">= 0.50x raw", ("minrpc", "python"),
            True),
        Row("download", f"download {size}", "MiB/s", "raw", (">=", BULK_TARGET), ">= 0.50x raw",
            ("minrpc", "python"), True),
        Row("to_device", f"to device, runtime.tensor {size}", "MiB/s", "raw", (">=", BULK_TARGET), ">= 0.50x raw",
            ("minrpc", "python"), True),
        Row("from_device", f"from device, Tensor.numpy {size}", "MiB/s", "raw", (">=", BULK_TARGET),
            ">= 0.50x raw", ("minrpc", "python"), True),
        Row("board", "aarch64 board (qemu): seed 004, cross_compiler to checked result", "s", None, None, "(info)",
            ("minrpc",)),
        Row("board_compile", "  of which: cross-compile and export lib.tar", "s", None, None, "(info)", ("minrpc",)),
        Row("board_load", "  of which: request, upload, load_module (linked on the board)", "s", None, None,
            "(info)", ("minrpc",)),
        Row("board_run", "  of which: tensors, run, check with numpy", "s", None, None, "(info)", ("minrpc",)),
    ]
    return out


def _passes(op: str, value: float, limit: float) -> bool:
    return {"<": value < limit, "<=": value <= limit, ">=": value >= limit}[op]


def report(cfg: MinRPCConfig, figures: Figures) -> tuple[str, dict[str, Any]]:
    header = ["metric", "minrpc", "spread", "python", "tvm", "raw", "ratio", "target", "result", "met", "statistic"]
    cells: list[list[str]] = []
    doc_rows = []
    for row in rows(cfg):
        ours = figures.values.get((row.key, "minrpc"), [])
        med = {side: figures.median(row.key, side) for side in (*SIDES, "raw")}
        base = med.get(row.base) if row.base else None
        ratio = med["minrpc"] / base if med["minrpc"] is not None and base else None
        result, met = "-", ""
        if row.target is not None:
            op, limit = row.target
            value = ratio if row.base else med["minrpc"]
            result = "n/a" if value is None else ("PASS" if _passes(op, value, limit) else "FAIL")
            per_run = figures.rounds.get(row.key) if row.base else ours
            if per_run:
                met = f"{sum(_passes(op, v, limit) for v in per_run)}/{len(per_run)}"
        pooled = figures.pooled.get((row.key, "minrpc"))
        statistic = (f"median of {len(pooled)} calls in {len(ours)} blocks" if pooled else
                     f"median of {len(ours)} runs" if ours else "-")
        if row.base == "raw" and figures.facts.get("raw_method"):
            statistic += f"; raw: {figures.facts['raw_method'].replace('-', ' -> ')}"
        cells.append([
            f"{row.label} ({row.unit})", harness.fmt(med["minrpc"]),
            harness.span(ours) if ours else "",
            harness.fmt(med["python"]) if "python" in row.sides else "-",
            harness.fmt(med["tvm"]) if "tvm" in row.sides and cfg.tvm else "-",
            harness.fmt(med["raw"]) if row.with_raw else "-",
            f"{ratio:.2f}x" if ratio is not None else ("n/a" if row.base else "-"),
            row.target_text or "-", result, met, statistic,
        ])
        doc_rows.append({"key": row.key, "label": row.label, "unit": row.unit, "medians": med, "ratio": ratio,
                         "target": row.target_text, "result": result, "met": met,
                         "values": {s: figures.values.get((row.key, s), []) for s in (*SIDES, "raw")},
                         "round_ratios": figures.rounds.get(row.key, [])})
    tvm = f"tvm {figures.facts['tvm_version']}" if "tvm_version" in figures.facts else "no tvm"
    head = (f"minrpc: the native server beside the Python server and TVM's C++ server ({tvm}), "
            f"{figures.facts.get('elapsed_s', 0):.0f} s")
    split = f"; across 2 CPUs: this process on CPU {cfg.cpu}, the servers on CPU {cfg.other_cpu}" \
        if cfg.other_cpu is not None else ""
    notes = [
        "ratio = minrpc / the base the target names (tvm: TVM's C++ server; raw: rawnet's native loopback); "
        "met: runs (RSS, time_evaluator) or interleaved rounds (calls, bulk) whose own figure met the target.",
        f"calls: an empty kernel on minrpc and the Python server (through our Python client), TVM's testing.nop "
        f"(through TVM's C++ client), rawnet's 16-byte C ping-pong; {cfg.call_rounds} rounds of {cfg.call_block} "
        f"calls each; pinned: everything on CPU {cfg.cpu}{split}. The C-client rows send the same CALL's bytes "
        "from a C program on the session's own socket and read the 17-byte reply raw (the server's turnaround: "
        "our Python client's encoding and decoding left out).",
        f"bulk: {cfg.bulk_rounds} rounds of {cfg.bulk_block} transfers per side (each block after an untimed "
        f"warm-up transfer), this process on CPU {cfg.cpu}, the "
        f"servers on CPU {cfg.cpu if cfg.other_cpu is None else cfg.other_cpu}, rawnet's data going each row's "
        "way; TVM's bulk figures are in the first table.",
        "RSS: VmRSS of the process that listens (minrpc; the rpc.Server process; TVM's PopenWorker), after one "
        f"session ended, over {cfg.runs} fresh starts.",
        f"board: LocalFarm({{'{BOARD}': 1}}) started in {figures.facts.get('board_farm_start_s', float('nan')):.2f} s "
        "(minrpc under qemu-aarch64); each run cross-compiles, exports, uploads and links on the board anew.",
    ]
    if "build_s" in figures.facts:
        notes.append(f"minrpc build (host): {figures.facts['build_s']:.2f} s (cached builds take no time).")
    grouped: dict[str, list[str]] = {}
    labels = {r.key: r.label for r in rows(cfg)}
    for (key, side), reason in figures.missing.items():
        if key in labels:
            grouped.setdefault(f"{side} n/a ({reason})", []).append(labels[key])
    notes += [f"{what}: {'; '.join(sorted(set(which)))}" for what, which in grouped.items()]
    notes += figures.notes
    text = "\n".join([head, "", *harness.table_lines(header, cells), "", *notes])
    doc = {"config": dataclasses.asdict(cfg), "facts": figures.facts, "rows": doc_rows, "notes": notes}
    return text, doc


def measure_minrpc(quick: bool = False, tvm: bool = True, cpu: int | None = None) -> tuple[str, dict[str, Any]]:
    """The "minrpc" table for benchmarks/run.py.

        >>> text, doc = measure_minrpc(quick=True)   # doctest: +SKIP
    """
    allowed = sorted(os.sched_getaffinity(0))
    cpu = allowed[0] if cpu is None else cpu
    others = [c for c in allowed if c != cpu]
    tvm = tvm and importlib.util.find_spec("tvm") is not None
    options = {"cpu": cpu, "other_cpu": others[0] if others else None, "tvm": tvm}
    cfg = MinRPCConfig.quick(**options) if quick else MinRPCConfig(**options)
    figures = Figures()
    try:
        measure(cfg, figures)
    except Exception as exc:
        figures.notes.append(f"interrupted: {type(exc).__name__}: {str(exc).strip()[:600]}")
    return report(cfg, figures)


def main(argv: list[str] | None = None) -> int:
    allowed = sorted(os.sched_getaffinity(0))

    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--no-tvm", action="store_true", help="leave TVM's server out")
        parser.add_argument("--cpu", type=int, default=allowed[0], help=f"CPU of the pinned runs (default {allowed[0]})")

    return harness.section_main(argv, "minrpc.py", __doc__, "fewer runs and 8 MiB transfers",
                                lambda args: measure_minrpc(args.quick, not args.no_tvm, args.cpu), flags)


if __name__ == "__main__":
    sys.exit(main())
