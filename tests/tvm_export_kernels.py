"""Build small reference kernels with apache-tvm and export them for the workbench.

This is a helper script, not a pytest module. It needs apache-tvm (0.27) and is
meant to be run with an interpreter that has it installed, e.g.::

    /opt/tvmvenv/bin/python tests/tvm_export_kernels.py OUTDIR

It writes, for each kernel NAME:

* OUTDIR/NAME.so   -- shared library exporting ``__tvm_ffi_NAME``
* OUTDIR/NAME.tar  -- tar of the object file(s) the .so is linked from

and prints exactly one JSON line on stdout describing what it wrote. The
exported libraries only need ``TVMFFIErrorSetRaisedFromCStrParts`` from the
process that loads them, so the workbench server can load them with ctypes and
no TVM installed.

Kernels:

* ``add_one(A: float32[1024], B: float32[1024])``: B[i] = A[i] + 1
* ``scale_shift(A: float32[1024], s: float32, k: int32, B: float32[1024])``:
  B[i] = A[i] * s + float(k)
"""

import contextlib
import json
import os
import sys

N = 1024


def _kernel_definitions(te):
    """Return a list of (name, params_description, tensor_expression_args)."""
    defs = []

    a = te.placeholder((N,), name="A", dtype="float32")
    b = te.compute((N,), lambda i: a[i] + 1.0, name="B")
    defs.append(
        (
            "add_one",
            [
                {"name": "A", "kind": "tensor", "shape": [N], "dtype": "float32"},
                {"name": "B", "kind": "tensor", "shape": [N], "dtype": "float32"},
            ],
            [a, b],
        )
    )

    a2 = te.placeholder((N,), name="A", dtype="float32")
    scale = te.var("s", dtype="float32")
    shift = te.var("k", dtype="int32")
    out = te.compute((N,), lambda i: a2[i] * scale + shift.astype("float32"), name="B")
    defs.append(
        (
            "scale_shift",
            [
                {"name": "A", "kind": "tensor", "shape": [N], "dtype": "float32"},
                {"name": "s", "kind": "scalar", "dtype": "float32"},
                {"name": "k", "kind": "scalar", "dtype": "int32"},
                {"name": "B", "kind": "tensor", "shape": [N], "dtype": "float32"},
            ],
            [a2, scale, shift, out],
        )
    )
    return defs


def build_all(outdir):
    import tvm
    from tvm import te

    os.makedirs(outdir, exist_ok=True)
    kernels = []
    for name, params, args in _kernel_definitions(te):
        prim = te.create_prim_func(args).with_attr("global_symbol", name)
        executable = tvm.compile(tvm.IRModule.from_expr(prim), target="llvm")
        files = {}
        for ext in ("so", "tar"):
            path = os.path.abspath(os.path.join(outdir, f"{name}.{ext}"))
            executable.export_library(path)
            files[ext] = path
        kernels.append(
            {
                "name": name,
                "symbol": f"__tvm_ffi_{name}",
                "params": params,
                "files": files,
            }
        )
    return {"tvm_version": tvm.__version__, "target": "llvm", "outdir": os.path.abspath(outdir),
            "kernels": kernels}


def main(argv):
    if len(argv) != 2:
        sys.stderr.write(f"usage: {argv[0]} OUTDIR\n")
        return 2
    # Keep stdout clean for the single JSON line: anything the build prints goes to
    # stderr, from Python (redirect_stdout) and from native code (LLVM, the linker,
    # the tar tool) writing to file descriptor 1 directly.
    sys.stdout.flush()
    saved_stdout_fd = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            report = build_all(argv[1])
    finally:
        sys.stderr.flush()
        os.dup2(saved_stdout_fd, 1)
        os.close(saved_stdout_fd)
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
