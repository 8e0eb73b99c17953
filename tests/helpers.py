"""Functions a test server imports through server_init_callback, a runner for TVM export scripts, tars, and
the end of a shell's sessions."""
import io
import os
import tarfile
from typing import Iterable, Mapping, Union

from workbench import rpc

TarMember = Union[bytes, tarfile.TarInfo]

# raw_exit_group(status): a kernel's exit no guard sees (a block of tests/kernels/kernels.c), for sources written elsewhere
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "kernels.c")) as _f:
    _text = _f.read()
    RAW_EXIT_H = _text[_text.index("/* raw_exit_group: begin"):_text.index("/* raw_exit_group: end */")]


def start_server(kind: str, **options) -> Union[rpc.Server, rpc.MinRPCServer]:
    """A server on a free loopback port: ``kind`` "python" (``rpc.Server``, silent) or "minrpc"."""
    return rpc.Server(port=0, silent=True, **options) if kind == "python" else rpc.MinRPCServer(port=0, **options)


def register_extras() -> None:
    @rpc.register_func("tests.add", override=True)
    def add(a, b):
        return a + b

    @rpc.register_func("tests.tensor_sum", override=True)
    def tensor_sum(t):
        return float(t.numpy().sum())

    @rpc.register_func("tests.dict_of", override=True)
    def dict_of(n):
        return {f"k{i}": i for i in range(n)}

    @rpc.register_func("tests.boom", override=True)
    def boom():
        raise ValueError("boom from a registered function")

    @rpc.register_func("tests.adder", override=True)
    def adder(x):  # returns a function (a closure), as TVM's rpc tests do
        return lambda y: x + y

    @rpc.register_func("tests.same", override=True)
    def same(t):  # returns the tensor it was given
        return t

    @rpc.register_func("tests.arange", override=True)
    def arange(n):  # returns a new tensor (a host array, copied to the device) and a pair
        import numpy as np

        return np.arange(n, dtype="float32")

    @rpc.register_func("tests.a_set", override=True)
    def a_set():  # what msgpack cannot carry
        return {1, 2}

    @rpc.register_func("tests.pair", override=True)
    def pair(t):
        return [t, {"twice": lambda: 2 * float(t.numpy().sum())}]


def register_kernel_calls() -> None:
    """Functions TVM kernels call by name (T.call_packed) in tests/test_tvm_registered_calls.py."""
    import numpy as np

    @rpc.register_func("tests.kernel_fill", override=True)
    def kernel_fill(t, value, step):
        view = t.numpy()  # the kernel's own memory: writes reach the kernel
        view[:] = value + step * np.arange(view.size, dtype=view.dtype).reshape(view.shape)

    @rpc.register_func("tests.kernel_boom", override=True)
    def kernel_boom(t):
        raise ValueError(f"kernel_boom got a {t.dtype} tensor of shape {t.shape}")


# The start of a TVM export script. ``build(name, args, schedule=None)`` compiles a TE function for the host
# (after ``schedule(sch)`` on its Schedule, if given) and exports it into argv[1] as .so and .tar, returning
# {"so": path, "tar": path}. ``scheduled_kernels(vn, wn, pr, pc)`` builds the kernels with real schedules that
# need TVM's runtime: "vadd" (a parallel loop over vn floats), "twostage" (a wn-float intermediate: a
# workspace) and "parws" (a parallel loop over pr rows, each with a pc-float workspace in its task).
TVM_BUILD = """
import os, sys
import tvm
from tvm import te
from tvm.s_tir import Schedule

def build(name, args, schedule=None):
    mod = tvm.IRModule.from_expr(te.create_prim_func(args).with_attr("global_symbol", name))
    if schedule is not None:
        sch = Schedule(mod)
        sch.work_on(name)
        schedule(sch)
        mod = sch.mod
    exe = tvm.compile(mod, target="llvm")
    files = {}
    for ext in ("so", "tar"):
        files[ext] = os.path.abspath(os.path.join(sys.argv[1], name + "." + ext))
        exe.export_library(files[ext])
    return files

def scheduled_kernels(vn, wn, pr, pc):
    out = {}
    a, b = te.placeholder((vn,), name="A"), te.placeholder((vn,), name="B")
    c = te.compute((vn,), lambda i: a[i] + b[i], name="C")
    def parallel(sch):
        (i,) = sch.get_loops(sch.get_sblock("C"))
        outer, _ = sch.split(i, [None, 4096])
        sch.parallel(outer)
    out["vadd"] = build("vadd", [a, b, c], parallel)
    p = te.placeholder((wn,), name="P")
    t = te.compute((wn,), lambda i: p[i] * 2.0, name="T")
    q = te.compute((wn,), lambda i: t[(i * 7) % wn] + 1.0, name="Q")
    out["twostage"] = build("twostage", [p, q])
    r = te.placeholder((pr, pc), name="R")
    u = te.compute((pr, pc), lambda i, j: r[i, j] * 2.0, name="U")
    v = te.compute((pr, pc), lambda i, j: u[i, (j * 7) % pc] + 1.0, name="V")
    def parws(sch):
        i, _ = sch.get_loops(sch.get_sblock("V"))
        sch.parallel(i)
        sch.compute_at(sch.get_sblock("U"), i)
    out["parws"] = build("parws", [r, v], parws)
    return out
"""

# The end of a TVM export script that defines ``main() -> report``: LLVM, the linker and the tar tool write
# to file descriptor 1, so main() runs with fd 1 sent to stderr, and stdout carries the one JSON line.
PRINT_MAIN_REPORT = """
import contextlib as _contextlib, json as _json, os as _os, sys as _sys
_sys.stdout.flush()
_saved = _os.dup(1)
_os.dup2(2, 1)
try:
    with _contextlib.redirect_stdout(_sys.stderr):
        _report = main()
finally:
    _sys.stderr.flush()
    _os.dup2(_saved, 1)
print(_json.dumps(_report))
"""


def run_export_script(script_text: str, out_dir, what: str, timeout: float) -> dict:
    """Run a TVM export script (argv[1] = ``out_dir``) in a subprocess; return the JSON report it prints last.

    The test process never imports apache-tvm; a failure or time-out fails the test naming ``what``.
    """
    import json
    import subprocess
    import sys

    import pytest

    script = out_dir / "export.py"
    script.write_text(script_text)
    try:
        proc = subprocess.run([sys.executable, str(script), str(out_dir)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"exporting {what} took over {timeout} s")
    assert proc.returncode == 0, f"exporting {what} failed:\n{proc.stderr[-4000:]}"
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert report["tvm_version"].startswith("0.27"), report["tvm_version"]
    return report


# -- shared by the kernel, cross-compilation and minrpc tests ------------------------------------------------
EM_X86_64, EM_AARCH64 = 62, 183

ADD_ONE = """#include <workbench_kernel.h>
WB_KERNEL(add_one) {
  WB_EXPECT_ARGS(2);
  DLTensor* a = WB_ARG_TENSOR(0);
  DLTensor* b = WB_ARG_TENSOR(1);
  int64_t n = 1;
  for (int i = 0; i < a->ndim; ++i) n *= a->shape[i];
  for (int64_t i = 0; i < n; ++i) ((float*)b->data)[i] = ((const float*)a->data)[i] + 1.0f;
  return 0;
}
"""


def elf_machine(data_or_path) -> int:
    """The e_machine of an ELF file, given its first bytes or its path."""
    if not isinstance(data_or_path, (bytes, bytearray, memoryview)):
        with open(data_or_path, "rb") as f:
            data_or_path = f.read(20)
    data = bytes(data_or_path[:20])
    assert data[:4] == b"\x7fELF", "not an ELF file"
    return int.from_bytes(data[18:20], "little" if data[5] == 1 else "big")


def emulated_board_missing(arch: str = "aarch64") -> str | None:
    """Why there is no emulated ``arch`` board here (what to install), or None."""
    from workbench.native.qemu import EmulatorNotFoundError, find_emulator

    try:
        find_emulator(arch)
    except EmulatorNotFoundError as exc:
        return str(exc)
    return None


def make_tar(path, members: Mapping[str, TarMember] | Iterable[tuple[str, TarMember]],
             fmt: int = tarfile.PAX_FORMAT, mode: str = "w") -> str:
    """A tar written by Python's tarfile, members in order: ``name -> contents`` (a dict, or pairs); a TarInfo
    stands for links and odd entries."""
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, data in members.items() if isinstance(members, Mapping) else members:
            if isinstance(data, tarfile.TarInfo):
                data.name = name
                tar.addfile(data)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def drop_sessions(user_ns: dict) -> None:
    """Remove every session and remote module bound in a shell's namespace, closing the sessions."""
    for name in [n for n, v in user_ns.items() if isinstance(v, (rpc.RPCSession, rpc.RemoteModule))]:
        value = user_ns.pop(name)
        if isinstance(value, rpc.RPCSession):
            value.close()
