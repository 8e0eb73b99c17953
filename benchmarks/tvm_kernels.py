"""TVM-exported kernels on our TVM-free server against the same files in TVM's own runtime.

    python benchmarks/run.py                     # prints this "tvm kernels" table last
    python benchmarks/tvm_kernels.py [--quick]   # this table alone

apache-tvm (0.27) exports, in a helper subprocess, the kernels a TVM user
writes with TVM's own schedules, each as ``.so`` and ``.tar``:

* matmul: 512x512 float32, the row loop ``parallel`` (thread pool);
* vadd: 1M-element float32 vector add, ``parallel`` over 4096-element chunks;
* workspace: a two-stage kernel whose 4 MiB float32 intermediate TVM puts in
  ``TVMBackendAllocWorkspace`` (serial);
* math: ``exp(a) + log(b)`` over 256K floats (serial; libm calls);
* launch: an empty parallel region, as near as TVM lets one be written: a
  ``parallel`` loop over num_threads iterations each copying one float;
* relax mlp: a two-layer MLP (x[1,64] @ w1[64,128], relu, @ w2[128,16]) built
  with ``relax.build``: a Relax VM executable, which our server runs through
  its TVM fallback (apache-tvm imported in the session worker,
  ``workbench/runtime/tvm_bridge.py``). Its kernels take microseconds, so the
  row measures the per-call cost of the path: the VM's bytecode, and on our
  side the call through the bridge and the copy of the result into the output
  tensor passed after the inputs (TVM's VM returns a new tensor instead).

The same helper then stays up as TVM's side: it loads every file with
``tvm.runtime.load_module`` in its own process (the MLP into
``relax.VirtualMachine``) and answers timing requests with TVM's
``time_evaluator``. Ours is ``time_evaluator`` of the same file
uploaded to an ``rpc.Server`` on 127.0.0.1 (remote tensors). Both processes
run with the same ``TVM_NUM_THREADS`` (the CPUs this process may run on), and
the two sides are timed in interleaved rounds (a block of ours and a block of
TVM's, the order alternating). Each figure is the median of every repeat of a
side, with its spread (min..max); ratio = ours / TVM of the medians, and how
many rounds met the target (the round's ratio of medians). Targets: each
kernel within 1.10x of TVM, the empty parallel region and the Relax MLP's
per-call cost within 1.5x. Nothing is asserted; every process ends before it
returns.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

if __package__:
    from . import harness
else:  # run as a script (or imported by the TVM helper): this directory is on sys.path
    import harness

EXPORT_TIMEOUT_S = 120.0  # the helper's export (LLVM) and start-up
REPLY_TIMEOUT_S = 30.0  # one timing request to the helper
TARGET_KERNEL = 1.10
TARGET_LAUNCH = 1.5
TARGET_RELAX = 1.5
RELAX_KERNELS = frozenset({"relax_mlp"})  # Relax VM executables: their function is "main", results returned
BLOCK_MS = 20.0  # one repeat lasts about this long (number is calibrated per kernel)
QUIESCE_MAX_S = 0.5  # before each block: wait at most this long for the other side's threads to go idle
QUIESCE_STEP_S = 0.02


@dataclass(frozen=True)
class KernelsConfig:
    rounds: int = 9  # interleaved rounds of (a block of ours, a block of TVM's) per kernel and format
    repeat: int = 5  # repeats per block
    budget_s: float = 90.0  # the whole section (export included) skips what is left after this
    threads: int = 0  # TVM_NUM_THREADS of both sides; 0: the CPUs this process may run on

    @classmethod
    def quick(cls) -> "KernelsConfig":
        return cls(rounds=3, repeat=3, budget_s=60.0)

    @property
    def num_threads(self) -> int:
        return self.threads or len(os.sched_getaffinity(0))


def kernel_table(threads: int) -> dict[str, tuple[str, list[tuple[tuple[int, ...], bool]], float]]:
    """name -> (row label, [(argument shape, is it the output)], target ratio); all float32.

        >>> kernel_table(2)["launch"][1]
        [((2,), False), ((2,), True)]
    """
    return {
        "matmul": ("matmul 512x512 f32, parallel", [((512, 512), False), ((512, 512), False), ((512, 512), True)],
                   TARGET_KERNEL),
        "vadd": ("vector add 1M f32, parallel", [((1 << 20,), False), ((1 << 20,), False), ((1 << 20,), True)],
                 TARGET_KERNEL),
        "workspace": ("two-stage, 4 MiB workspace", [((1 << 20,), False), ((1 << 20,), True)], TARGET_KERNEL),
        "math": ("exp + log 256K f32, serial", [((1 << 18,), False), ((1 << 18,), False), ((1 << 18,), True)],
                 TARGET_KERNEL),
        "launch": (f"empty parallel region ({threads} tasks)", [((threads,), False), ((threads,), True)],
                   TARGET_LAUNCH),
        "relax_mlp": ("relax mlp (per call)", [((1, 64), False), ((64, 128), False), ((128, 16), False),
                                               ((1, 16), True)], TARGET_RELAX),
    }


def entry(name: str) -> str:
    """The function of kernel ``name`` to call: the kernel itself, or a Relax executable's ``main``.

        >>> entry("vadd"), entry("relax_mlp")
        ('vadd', 'main')
    """
    return "main" if name in RELAX_KERNELS else name


def inputs(shapes: list[tuple[tuple[int, ...], bool]]) -> list[np.ndarray]:
    """The same arrays on both sides (inputs in [0.5, 2): log is defined; outputs zeroed).

        >>> [a.shape for a in inputs([((4,), False), ((4,), True)])]
        [(4,), (4,)]
    """
    rng = np.random.default_rng(8)
    return [(np.zeros(s, "float32") if out else rng.uniform(0.5, 2.0, s).astype("float32")) for s, out in shapes]


def expected(name: str, args: list[np.ndarray]) -> np.ndarray:
    """What kernel ``name`` writes to its output for the inputs ``args`` (numpy), to check ours against."""
    if name == "matmul":
        return args[0] @ args[1]
    if name == "vadd":
        return args[0] + args[1]
    if name == "workspace":
        n = args[0].size
        return args[0][(np.arange(n) * 7) % n] * 2.0 + 1.0
    if name == "math":
        return np.exp(args[0]) + np.log(args[1])
    if name == "relax_mlp":
        return np.maximum(args[0] @ args[1], 0) @ args[2]
    return args[0]


# The helper: TVM's side. argv: OUTDIR, a JSON list of kernel names and shapes; prints one JSON line when the
# files are written and loaded, then answers one JSON line per request line on stdin (fd 1 is kept for replies:
# LLVM and the linker print to fd 1 otherwise).
HELPER = r'''
import json, os, sys, time
saved = os.dup(1)
os.dup2(2, 1)
reply = os.fdopen(saved, "w", buffering=1)
began = time.perf_counter()
import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule
sys.path.insert(0, sys.argv[3])
from tvm_kernels import RELAX_KERNELS, inputs

outdir, threads = sys.argv[1], int(sys.argv[2])
spec = json.loads(sys.stdin.readline())

def build(name, args, schedule=None):
    prim = te.create_prim_func(args).with_attr("global_symbol", name)
    mod = tvm.IRModule.from_expr(prim)
    if schedule is not None:
        sch = Schedule(mod)
        sch.work_on(name)
        schedule(sch)
        mod = sch.mod
    exe = tvm.compile(mod, target="llvm")
    files = {}
    for ext in ("so", "tar"):
        files[ext] = os.path.abspath(os.path.join(outdir, name + "." + ext))
        exe.export_library(files[ext])
    return files

files = {}
N = 512
x = te.placeholder((N, N), name="X")
w = te.placeholder((N, N), name="W")
k = te.reduce_axis((0, N), name="k")
y = te.compute((N, N), lambda i, j: te.sum(x[i, k] * w[k, j], axis=k), name="Y")
def matmul_schedule(sch):
    i, j, kk = sch.get_loops(sch.get_sblock("Y"))
    sch.reorder(i, kk, j)
    sch.parallel(i)
files["matmul"] = build("matmul", [x, w, y], matmul_schedule)

V = 1 << 20
a = te.placeholder((V,), name="A")
b = te.placeholder((V,), name="B")
c = te.compute((V,), lambda i: a[i] + b[i], name="C")
def vadd_schedule(sch):
    (i,) = sch.get_loops(sch.get_sblock("C"))
    outer, _ = sch.split(i, [None, 4096])
    sch.parallel(outer)
files["vadd"] = build("vadd", [a, b, c], vadd_schedule)

p = te.placeholder((V,), name="P")
t = te.compute((V,), lambda i: p[i] * 2.0, name="T")
q = te.compute((V,), lambda i: t[(i * 7) % V] + 1.0, name="Q")
files["workspace"] = build("workspace", [p, q])

M = 1 << 18
e = te.placeholder((M,), name="E")
l = te.placeholder((M,), name="L")
m = te.compute((M,), lambda i: te.exp(e[i]) + te.log(l[i]), name="M")
files["math"] = build("math", [e, l, m])

s = te.placeholder((threads,), name="S")
d = te.compute((threads,), lambda i: s[i], name="D")
def launch_schedule(sch):
    (i,) = sch.get_loops(sch.get_sblock("D"))
    sch.parallel(i)
files["launch"] = build("launch", [s, d], launch_schedule)

from tvm import relax
from tvm.script import relax as R
bb = relax.BlockBuilder()
xs = relax.Var("x", R.Tensor((1, 64), "float32"))
w1 = relax.Var("w1", R.Tensor((64, 128), "float32"))
w2 = relax.Var("w2", R.Tensor((128, 16), "float32"))
with bb.function("main", [xs, w1, w2]):
    with bb.dataflow():
        hid = bb.emit(relax.op.nn.relu(relax.op.matmul(xs, w1)))
        out = bb.emit_output(relax.op.matmul(hid, w2))
    bb.emit_func_output(out)
exe = relax.build(bb.get(), target="llvm")
files["relax_mlp"] = {}
for ext in ("so", "tar"):
    files["relax_mlp"][ext] = os.path.abspath(os.path.join(outdir, "relax_mlp." + ext))
    exe.export_library(files["relax_mlp"][ext])
export_s = time.perf_counter() - began

dev = tvm.cpu(0)
loaded = {}
for name, shapes in spec.items():
    arrays = [tvm.runtime.tensor(arr, dev) for arr in inputs([(tuple(s), out) for s, out in shapes])]
    for ext, path in files[name].items():
        lib = tvm.runtime.load_module(path)
        if name in RELAX_KERNELS:  # the VM returns its result: no output argument
            loaded[name, ext] = (relax.VirtualMachine(relax.VMExecutable(lib), dev), "main", arrays[:-1])
        else:
            loaded[name, ext] = (lib, name, arrays)
print(json.dumps({"tvm_version": tvm.__version__, "files": files, "export_s": export_s}), file=reply)

for line in sys.stdin:
    req = json.loads(line)
    if req.get("op") == "quit":
        break
    mod, func, arrays = loaded[req["kernel"], req["ext"]]
    f = mod.time_evaluator(func, dev, number=req["number"], repeat=req["repeat"])
    print(json.dumps({"results": list(f(*arrays).results)}), file=reply)
'''


class TvmSide:
    """The helper process: exports the kernels, then times them in TVM's runtime on request.

        >>> with TvmSide.start(scratch, threads=2, spec=spec) as tvm_side:   # doctest: +SKIP
        ...     tvm_side.time("vadd", "so", number=100, repeat=3)            # [1.2e-4, ...] seconds per call
    """

    def __init__(self, proc: subprocess.Popen, info: dict[str, Any], log: str):
        self.proc = proc
        self.info = info
        self.log = log

    @classmethod
    def start(cls, scratch: str, threads: int, spec: dict[str, Any]) -> "TvmSide":
        script = os.path.join(scratch, "tvm_side.py")
        with open(script, "w") as f:
            f.write(HELPER)
        env = dict(os.environ, TVM_NUM_THREADS=str(threads))
        log = os.path.join(scratch, "tvm_side.log")  # a file, not a pipe: nobody reads it until something fails
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, script, scratch, str(threads), os.path.dirname(os.path.abspath(__file__))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, text=True,
            )
        side = cls(proc, {}, log)
        try:
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            side.info = side._reply(EXPORT_TIMEOUT_S, "exporting the kernels")
        except BaseException:
            side.close()
            raise
        return side

    def _reply(self, timeout_s: float, what: str) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            with open(self.log, errors="replace") as f:
                err = f.read()
            raise RuntimeError(f"the TVM helper failed {what} ({'timed out' if not ready else 'exited'}): "
                               f"{err.strip()[-800:]}")
        return json.loads(line)

    def time(self, kernel: str, ext: str, number: int, repeat: int) -> list[float]:
        req = {"op": "time", "kernel": kernel, "ext": ext, "number": number, "repeat": repeat}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._reply(REPLY_TIMEOUT_S, f"timing {kernel}.{ext}")["results"]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "TvmSide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _cpu_seconds(pids: set[int]) -> float:
    """User + system CPU seconds of every thread of ``pids`` so far."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def quiesce(max_s: float = QUIESCE_MAX_S) -> float:
    """Wait until the processes this one started use no CPU (the side just timed has stopped spinning: TVM's idle
    pool threads spin, yielding, for tens of ms after a launch), at most ``max_s``; the seconds waited."""
    began = time.perf_counter()
    pids = harness.descendants(os.getpid())
    before = _cpu_seconds(pids)
    while time.perf_counter() - began < max_s:
        time.sleep(QUIESCE_STEP_S)
        now = _cpu_seconds(pids)
        if now - before <= 0:  # not one clock tick (10 ms) used over the step
            break
        before = now
    return time.perf_counter() - began


@dataclass
class KernelResults:
    ours: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (kernel, ext) -> seconds per call
    tvm: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    round_ratios: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    number: dict[str, int] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def measure(cfg: KernelsConfig, res: KernelResults) -> None:
    """Export, load both sides, check our outputs against numpy, then time them in interleaved rounds."""
    from workbench import rpc, runtime

    began = time.perf_counter()
    deadline = began + cfg.budget_s
    threads = cfg.num_threads
    table = kernel_table(threads)
    spec = {name: [[list(s), out] for s, out in shapes] for name, (_, shapes, _) in table.items()}
    res.facts["threads"] = threads
    scratch = tempfile.mkdtemp(prefix="workbench-bench-tvmk-")
    server = None
    try:
        with TvmSide.start(scratch, threads, spec) as tvm_side:
            res.facts["tvm_version"] = tvm_side.info["tvm_version"]
            res.facts["export_s"] = tvm_side.info["export_s"]
            files = tvm_side.info["files"]
            with harness.env_var("TVM_NUM_THREADS", str(threads)):
                server = rpc.Server(host=harness.HOST, port=0, silent=True)
            remote = rpc.connect(harness.HOST, server.port)
            # the Relax MLP in a session of its own: its worker imports TVM, the kernels' worker stays TVM-free
            relax_remote = rpc.connect(harness.HOST, server.port)
            ours: dict[tuple[str, str], tuple[Any, list[Any], Any]] = {}
            for name, (_, shapes, _) in table.items():
                arrays = inputs(shapes)
                sess = relax_remote if name in RELAX_KERNELS else remote
                dev = sess.cpu(0)
                for ext, path in files[name].items():
                    sess.upload(path)
                    mod = sess.load_module(os.path.basename(path))
                    tensors = [runtime.tensor(arr, dev) for arr in arrays]
                    mod[entry(name)](*tensors)
                    got = tensors[-1].numpy()
                    if not np.allclose(got, expected(name, arrays), rtol=1e-4, atol=1e-4):
                        res.notes.append(f"{name}.{ext}: our output differs from numpy")
                    ours[name, ext] = (mod, tensors, dev)
            res.facts["setup_s"] = time.perf_counter() - began
            # number per kernel: about BLOCK_MS per repeat, from one TVM call of the .so
            for name in table:
                one = min(tvm_side.time(name, "so", number=1, repeat=3))
                res.number[name] = max(1, min(100_000, int(BLOCK_MS * 1e-3 / max(one, 1e-8))))
            for rnd in range(cfg.rounds):
                for name in table:
                    for ext in ("so", "tar"):
                        if time.perf_counter() > deadline:
                            res.notes.append(f"the section hit its {cfg.budget_s:g} s budget after "
                                             f"{rnd} of {cfg.rounds} rounds; later rounds skipped")
                            return
                        mod, tensors, dev = ours[name, ext]
                        n = res.number[name]

                        def ours_block() -> list[float]:
                            f = mod.time_evaluator(entry(name), dev, number=n, repeat=cfg.repeat)
                            return list(f(*tensors).results)

                        def tvm_block() -> list[float]:
                            return tvm_side.time(name, ext, number=n, repeat=cfg.repeat)

                        order = (ours_block, tvm_block) if rnd % 2 == 0 else (tvm_block, ours_block)
                        got = {}
                        for block in order:
                            res.facts["quiesce_s"] = res.facts.get("quiesce_s", 0.0) + quiesce()
                            got[block] = block()
                        res.ours.setdefault((name, ext), []).extend(got[ours_block])
                        res.tvm.setdefault((name, ext), []).extend(got[tvm_block])
                        res.round_ratios.setdefault((name, ext), []).append(
                            statistics.median(got[ours_block]) / statistics.median(got[tvm_block]))
            remote.close()
            relax_remote.close()
    finally:
        if server is not None:
            server.terminate()
        shutil.rmtree(scratch, ignore_errors=True)
        res.facts["elapsed_s"] = time.perf_counter() - began


def us(seconds: float) -> str:
    v = seconds * 1e6
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def report(cfg: KernelsConfig, res: KernelResults) -> tuple[str, dict[str, Any]]:
    """The "tvm kernels" table and its JSON document."""
    threads = res.facts.get("threads", cfg.num_threads)
    table = kernel_table(threads)
    header = ["kernel", "file", "ours µs", "ours spread", "tvm µs", "tvm spread", "ratio", "target", "result",
              "rounds met", "statistic"]
    rows: list[list[str]] = []
    doc_rows = []
    for name, (label, _, target) in table.items():
        for ext in ("so", "tar"):
            o, t, rr = res.ours.get((name, ext)), res.tvm.get((name, ext)), res.round_ratios.get((name, ext), [])
            if not o or not t:
                rows.append([label, "." + ext, "n/a", "", "n/a", "", "n/a", f"<= {target:.2f}x", "n/a", "", "-"])
                doc_rows.append({"kernel": name, "file": ext, "ours": None, "tvm": None})
                continue
            ratio = statistics.median(o) / statistics.median(t)
            met = sum(r <= target for r in rr)
            rows.append([
                label, "." + ext, us(statistics.median(o)), harness.span(o, us),
                us(statistics.median(t)), harness.span(t, us), f"{ratio:.2f}x", f"<= {target:.2f}x",
                "PASS" if ratio <= target else "FAIL", f"{met}/{len(rr)}",
                f"median of {len(o)}, number={res.number.get(name)}",
            ])
            doc_rows.append({
                "kernel": name, "label": label, "file": ext, "ours_s": statistics.median(o),
                "ours_min_s": min(o), "ours_max_s": max(o), "tvm_s": statistics.median(t), "tvm_min_s": min(t),
                "tvm_max_s": max(t), "ratio": ratio, "target": target, "pass": ratio <= target,
                "round_ratios": rr, "number": res.number.get(name), "ours_values": o, "tvm_values": t,
            })
    head = (f"tvm kernels: tvm {res.facts.get('tvm_version', '?')}, TVM_NUM_THREADS={threads} on both sides, "
            f"{cfg.rounds} interleaved rounds x {cfg.repeat} repeats per side, "
            f"{res.facts.get('elapsed_s', 0):.0f} s (export {res.facts.get('export_s', 0):.0f} s)")
    notes = [
        "ours = time_evaluator on our TVM-free rpc.Server (127.0.0.1, remote tensors); tvm = the same file loaded "
        "in a separate process by tvm.runtime.load_module, TVM's time_evaluator (.tar: linked by each side).",
        "relax mlp: ours runs the Relax VM executable through the server's TVM fallback (apache-tvm in a session "
        "worker of its own), main(x, w1, w2, out) writing its result into out; tvm = relax.VirtualMachine in the "
        "helper, vm.time_evaluator(\"main\") returning a new tensor per call.",
        "µs per call: median of every repeat of the side, spread min..max; ratio = ours / tvm of the medians; "
        "rounds met: rounds whose own ratio met the target; each repeat lasts about "
        f"{BLOCK_MS:g} ms (number calibrated on TVM's .so); before each block the run waits (at most "
        f"{QUIESCE_MAX_S:g} s) until the other side's threads stop spinning: TVM's idle pool threads spin for tens "
        f"of ms after a launch (waited {res.facts.get('quiesce_s', 0):.1f} s in all).",
        "TVM pins its pool's worker threads to CPUs (TVM_BIND_THREADS); ours does not pin.",
        *res.notes,
    ]
    text = "\n".join([head, "", *harness.table_lines(header, rows, left=2), "", *notes])
    return text, {"config": {"rounds": cfg.rounds, "repeat": cfg.repeat, "threads": threads}, "facts": res.facts,
                  "rows": doc_rows, "notes": notes}


def tvm_available() -> str | None:
    """None when apache-tvm is importable here, else why not."""
    if importlib.util.find_spec("tvm") is None:
        return "apache-tvm is not installed (pip install apache-tvm==0.27.*)"
    return None


def measure_tvm_kernels(quick: bool = False, tvm: bool = True, threads: int = 0) -> tuple[str, dict[str, Any]]:
    """The "tvm kernels" table for benchmarks/run.py; skipped with a note when tvm is absent (or ``tvm=False``).

        >>> text, doc = measure_tvm_kernels(quick=True)   # doctest: +SKIP
    """
    cfg = dataclasses.replace(KernelsConfig.quick() if quick else KernelsConfig(), threads=threads)
    absent = tvm_available() if tvm else "--no-tvm"
    if absent:
        return f"tvm kernels: skipped: {absent}", {"skipped": absent}
    res = KernelResults()
    try:
        measure(cfg, res)
    except Exception as exc:
        res.notes.append(f"interrupted: {type(exc).__name__}: {str(exc).strip()[:600]}")
    return report(cfg, res)


def main(argv: list[str] | None = None) -> int:
    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--threads", type=int, default=0, help="TVM_NUM_THREADS of both sides (default: CPUs)")

    return harness.section_main(argv, "tvm_kernels.py", __doc__, "fewer rounds and repeats",
                                lambda args: measure_tvm_kernels(args.quick, threads=args.threads), flags)


if __name__ == "__main__":
    sys.exit(main())
