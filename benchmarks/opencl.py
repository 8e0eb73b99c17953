"""Eighth table, "opencl": OpenCL devices (issue 19, point 7), on PoCL or whatever platform this machine has.

    python benchmarks/opencl.py            # this table alone
    python benchmarks/opencl.py --quick    # smaller copies, fewer rounds

* copies to and from ``cl(0)``: ``runtime.tensor`` (TENSOR_ALLOC with data: a new buffer),
  ``Tensor.copyfrom`` (TENSOR_WRITE) and ``Tensor.numpy`` (TENSOR_READ: a new array) of the same
  array, through a LocalSession (the handler in this process, as pyopencl runs), through a Python
  server and through minrpc (the C server) on loopback, against pyopencl doing the same: a new ``Buffer`` with ``COPY_HOST_PTR``, and
  ``enqueue_copy`` (blocking) into an existing buffer and into a new array, on the same device,
  interleaved in rounds in the same run; the target, at least 0.8 times
  pyopencl's rate, is on the in-process copies (the like-for-like row); the loopback rows add
  the socket, for information;
* a TVM-built OpenCL matmul (512 x 512, float32; 16 x 16 work-groups) on ``cl(0)`` against the same
  computation built for llvm (parallel over rows) on ``cpu(0)``, both on the Python server, and the
  OpenCL one on minrpc, ``time_evaluator`` (the OpenCL time from the queue's profiling events, as TVM's), for information.

pyopencl is the ``bench-opencl`` extra (``pip install -e .[bench-opencl]``); without it the
copy rows say so. apache-tvm (the ``bench`` extra) builds the matmuls in a subprocess.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Any, Callable

import numpy as np

if __package__:
    from . import harness
else:  # run as a script: this directory is sys.path[0]
    import harness

TARGET_RATIO = 0.8

MATMUL_EXPORT = r"""
import json, os, sys
import tvm
from tvm import te
from tvm.s_tir import Schedule

N = int(sys.argv[2])
out = {"tvm_version": tvm.__version__}

def define():
    x = te.placeholder((N, N), name="X")
    w = te.placeholder((N, N), name="W")
    k = te.reduce_axis((0, N), name="k")
    y = te.compute((N, N), lambda i, j: te.sum(x[i, k] * w[k, j], axis=k), name="Y")
    return tvm.IRModule.from_expr(te.create_prim_func([x, w, y]).with_attr("global_symbol", "matmul"))

sch = Schedule(define())
sch.work_on("matmul")
i, j, k = sch.get_loops(sch.get_sblock("Y"))
io, ii = sch.split(i, [None, 16])
jo, ji = sch.split(j, [None, 16])
sch.reorder(io, jo, ii, ji, k)
sch.bind(io, "blockIdx.y")
sch.bind(jo, "blockIdx.x")
sch.bind(ii, "threadIdx.y")
sch.bind(ji, "threadIdx.x")
out["opencl"] = os.path.join(sys.argv[1], "matmul_cl.so")
tvm.compile(sch.mod, target=tvm.target.Target("opencl", host="llvm")).export_library(out["opencl"])

sch = Schedule(define())
sch.work_on("matmul")
i, j, k = sch.get_loops(sch.get_sblock("Y"))
sch.reorder(i, k, j)
sch.parallel(i)
out["llvm"] = os.path.join(sys.argv[1], "matmul_llvm.so")
tvm.compile(sch.mod, target="llvm").export_library(out["llvm"])
print(json.dumps(out))
"""


def copy_rates(nbytes: int, rounds: int, per_round: int) -> dict[str, list[float]]:
    """MiB/s of each way, per round (the median of ``per_round`` copies), interleaved round by round."""
    import pyopencl as pcl

    from workbench import rpc, runtime

    host = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    ctx = pcl.Context([pcl.get_platforms()[0].get_devices()[0]])
    queue = pcl.CommandQueue(ctx)
    buf = pcl.Buffer(ctx, pcl.mem_flags.READ_WRITE, nbytes)
    local = rpc.LocalSession()
    server = rpc.Server(port=0, silent=True)
    native = rpc.MinRPCServer(port=0)
    remote = rpc.connect("127.0.0.1", server.port)
    remote_c = rpc.connect("127.0.0.1", native.port)
    ways: dict[str, Callable[[], Any]] = {}
    try:
        for name, session in (("local", local), ("loopback", remote), ("minrpc", remote_c)):
            dev = session.cl(0)
            tensor = runtime.tensor(host, dev)
            ways[f"{name} runtime.tensor"] = lambda s=session, d=dev: runtime.tensor(host, d)
            ways[f"{name} copyfrom"] = lambda t=tensor: t.copyfrom(host)
            ways[f"{name} numpy"] = lambda t=tensor: t.numpy()
        flags = pcl.mem_flags
        ways["pyopencl new buffer"] = lambda: (pcl.Buffer(ctx, flags.READ_WRITE | flags.COPY_HOST_PTR, hostbuf=host),
                                               queue.finish())
        ways["pyopencl to device"] = lambda: pcl.enqueue_copy(queue, buf, host, is_blocking=True)
        ways["pyopencl from device"] = lambda: pcl.enqueue_copy(queue, np.empty_like(host), buf, is_blocking=True)
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, fn in ways.items():
                fn()  # warm
                rates[name].append(harness.mib_s(nbytes, harness.run_timed(fn, per_round)))
        return rates
    finally:
        remote.close()
        remote_c.close()
        server.terminate()
        native.terminate()
        local.close()


def matmul_times(n: int, repeat: int) -> dict[str, Any]:
    from workbench import rpc, runtime

    with tempfile.TemporaryDirectory(prefix="wb-bench-cl-") as tmp:
        script = os.path.join(tmp, "export.py")
        with open(script, "w") as f:
            f.write(MATMUL_EXPORT)
        proc = subprocess.run([sys.executable, script, tmp, str(n)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"building the matmuls with apache-tvm failed: {proc.stderr.strip()[-300:]}")
        files = json.loads(proc.stdout.strip().splitlines()[-1])
        server = rpc.Server(port=0, silent=True)
        native = rpc.MinRPCServer(port=0)
        try:
            remote = rpc.connect("127.0.0.1", server.port)
            remote_c = rpc.connect("127.0.0.1", native.port)
            rng = np.random.default_rng(1)
            x, w = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
            out: dict[str, Any] = {"tvm_version": files["tvm_version"]}
            for kind, session, dev_of in (("opencl", remote, lambda s: s.cl(0)), ("llvm", remote, lambda s: s.cpu(0)),
                                          ("minrpc opencl", remote_c, lambda s: s.cl(0))):
                dev = dev_of(session)
                path = files[kind.split()[-1]]
                session.upload(path)
                mod = session.load_module(os.path.basename(path))
                args = [runtime.tensor(x, dev), runtime.tensor(w, dev), runtime.empty((n, n), "float32", dev)]
                mod["matmul"](*args)
                np.testing.assert_allclose(args[2].numpy(), x @ w, rtol=1e-3)
                result = mod.time_evaluator("matmul", dev, number=3, repeat=repeat)(*args)
                out[kind] = list(result.results)
            remote.close()
            remote_c.close()
            return out
        finally:
            server.terminate()
            native.terminate()


def measure_opencl(quick: bool = False) -> tuple[str, dict[str, Any]]:
    from workbench.runtime.opencl import APT_PACKAGES, published_devices

    title = "opencl (issue 19: OpenCL devices)"
    devices = published_devices()
    if not devices:
        text = f"no OpenCL device on this machine (sudo apt-get install {APT_PACKAGES})"
        return "\n".join([title, text]), {"skipped": text}
    document: dict[str, Any] = {"device": devices[0]["device_name"]}
    rows: list[list[str]] = []
    nbytes, rounds, per_round = ((8 << 20), 3, 5) if quick else ((64 << 20), 7, 5)
    try:
        rates = copy_rates(nbytes, rounds, per_round)
        document["copy_mib_s"] = rates
        for way, ref in (("runtime.tensor", "pyopencl new buffer"), ("copyfrom", "pyopencl to device"),
                         ("numpy", "pyopencl from device")):
            for where in ("local", "loopback", "minrpc"):
                ours = rates[f"{where} {way}"]
                ratios = [o / r for o, r in zip(ours, rates[ref])]
                target = f">= {TARGET_RATIO}: met in {sum(x >= TARGET_RATIO for x in ratios)} of {len(ratios)}" \
                    if where == "local" else "(info: adds the socket)"
                label = {"local": "LocalSession", "loopback": "Python server on loopback",
                         "minrpc": "minrpc on loopback"}[where]
                rows.append([f"{way}, {label}"
                             f" vs {ref} ({nbytes >> 20} MiB)",
                             f"{statistics.median(ours):.0f} vs {statistics.median(rates[ref]):.0f} MiB/s = "
                             f"{statistics.median(ratios):.2f} x",
                             f"median of {len(ratios)} ({harness.span(ratios, lambda v: f'{v:.2f}')})", target])
    except ImportError:
        rows.append(["copies to and from cl(0) vs pyopencl", "n/a",
                     "pyopencl is not installed: pip install -e .[bench-opencl]", ""])
    except Exception as exc:
        rows.append(["copies to and from cl(0) vs pyopencl", "n/a", harness.reason_of(exc), ""])
    n = 256 if quick else 512
    try:
        times = matmul_times(n, 3 if quick else 7)
        document["matmul_s"] = times
        cl_ms, cpu_ms = statistics.median(times["opencl"]) * 1e3, statistics.median(times["llvm"]) * 1e3
        rows.append([f"TVM matmul {n}x{n} float32: opencl on cl(0) vs llvm on cpu(0)",
                     f"{cl_ms:.2f} vs {cpu_ms:.2f} ms", f"median of {len(times['opencl'])} each "
                     f"(cl/cpu = {cl_ms / cpu_ms:.2f})", "(info)"])
        c_ms = statistics.median(times["minrpc opencl"]) * 1e3
        rows.append([f"TVM matmul {n}x{n} float32 on cl(0): minrpc vs the Python server", f"{c_ms:.2f} vs {cl_ms:.2f} ms",
                     f"median of {len(times['minrpc opencl'])} each", "(info: the same kernel, timed on the queue)"])
    except ImportError:
        rows.append(["TVM matmul, opencl vs llvm", "n/a", "apache-tvm is not installed (the bench extra)", ""])
    except Exception as exc:
        rows.append(["TVM matmul, opencl vs llvm", "n/a", harness.reason_of(exc), ""])
    table = harness.table_lines(["opencl", "ours", "spread", "target"], rows)
    return "\n".join([f"{title}: {devices[0]['device_name']}", *table]), document


def main(argv: list[str] | None = None) -> int:
    return harness.section_main(argv, "opencl.py", __doc__, "smaller copies, fewer rounds",
                                lambda args: measure_opencl(args.quick))


if __name__ == "__main__":
    sys.exit(main())
