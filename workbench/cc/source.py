"""Kernels from source text: pick the compiler for a target triple, build, upload and load.

    >>> from workbench import cc
    >>> mod = cc.load_source(remote, ADD_ONE_C, name="add_one")     # doctest: +SKIP
    >>> mod["add_one"](a, b)                                        # doctest: +SKIP

This is what ``%%rpc_compile`` runs. Compiler messages name the source by
``source_name`` with the line numbers of the text given, not of a temp file
(counted from ``first_line``: a cell's C text starts on the line below its
``%%rpc_compile`` line, so the magic passes 2).
"""
from __future__ import annotations

import os
import re
import shlex
import tempfile
import time
from typing import TYPE_CHECKING, Sequence

from ..errors import WorkbenchError
from .compiler import create_shared, create_tar
from .targets import ToolchainNotFoundError, parse_target

if TYPE_CHECKING:
    from ..rpc.client.session import RemoteModule, RPCSession

EXPORTS = ("so", "tar")
LANGS = ("c", "opencl")  # opencl: OpenCL C, uploaded as NAME.cl and built on the device for its OpenCL devices


class CompileError(WorkbenchError, RuntimeError):
    """The compiler rejected the source; ``message`` is its diagnostics."""


def compiler_for(target: object = None) -> str | None:
    """The C compiler command that builds for ``target``: None for this machine's own, else e.g. ``aarch64-linux-gnu-gcc``.

    ``target`` is anything :func:`workbench.cc.targets.parse_target` reads (a triple,
    a TVM target string or dict); its cpu flags are part of the command returned.
    A target no installed compiler builds for raises ToolchainNotFoundError naming
    the package to install.

        >>> compiler_for("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72")   # doctest: +SKIP
        'aarch64-linux-gnu-gcc -mcpu=cortex-a72'
    """
    try:
        spec = parse_target(target)
    except ValueError as exc:
        raise ToolchainNotFoundError(str(exc)) from None
    if spec.is_host and not spec.flags:
        return None
    return shlex.join(spec.command())


def build_source(
    source: str,
    out_dir: str | os.PathLike,
    *,
    name: str = "kernel",
    target: str | None = None,
    export: str = "so",
    options: Sequence[str] | None = None,
    source_name: str | None = None,
    first_line: int = 1,
) -> str:
    """Compile C ``source`` into ``out_dir/NAME.so`` (or ``.tar`` of objects, linked on the device); return the path.

    Diagnostics come as CompileError, naming ``source_name`` (default ``NAME.c``) and the source's own lines,
    numbered from ``first_line`` (where the text starts in the editor that shows it).

        >>> build_source("int f(void) {\n  return x;\n}\n", tmp, name="f", source_name="cell",
        ...              first_line=2)                                          # doctest: +SKIP
        CompileError: cell: In function 'f':
        cell:3:10: error: 'x' undeclared (first use in this function)
    """
    if export not in EXPORTS:
        raise ValueError(f"export must be one of {', '.join(EXPORTS)}, not {export!r}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"module name {name!r} must be a plain file name (letters, digits, _ . -)")
    if isinstance(first_line, bool) or not isinstance(first_line, int) or first_line < 1:
        raise ValueError(f"first_line must be a line number >= 1, not {first_line!r}")
    cc = compiler_for(target)
    shown = source_name or f"{name}.c"
    src = os.path.join(os.fspath(out_dir), f"{name}.c")
    with open(src, "w") as f:  # the #line directive makes the compiler report the text's own name and lines
        f.write(f'#line {first_line} "{_c_string(shown)}"\n{source}')
        if not source.endswith("\n"):
            f.write("\n")
    output = os.path.join(os.fspath(out_dir), f"{name}.{export}")
    try:
        (create_shared if export == "so" else create_tar)(output, [src], options, cc)
    except RuntimeError as exc:
        text = str(exc)
        if not text.startswith("compilation failed"):
            raise
        diagnostics = text.split("\n", 2)[2] if text.count("\n") >= 2 else text
        raise CompileError(diagnostics.replace(src, shown).strip()) from None
    return output


def load_source(
    remote: "RPCSession",
    source: str,
    *,
    name: str = "kernel",
    target: str | None = None,
    export: str = "so",
    options: Sequence[str] | None = None,
    source_name: str | None = None,
    first_line: int = 1,
    timings: dict[str, float] | None = None,
    lang: str = "c",
) -> "RemoteModule":
    """Build ``source`` for the session's device, upload it as ``NAME.so``/``NAME.tar``, load it and return the module.

    The target defaults to the triple the device published; ``timings``, if
    given, receives the seconds spent in ``compile`` and in ``upload_load``.
    ``source_name`` and ``first_line`` are how diagnostics name the text (see build_source).

    ``lang="opencl"``: ``source`` is OpenCL C. It is uploaded as ``NAME.cl`` and the device builds it for
    each of its OpenCL devices; a build error is a CompileError holding the device compiler's log, with the
    lines of ``source`` (numbered from ``first_line``). Call a kernel with its arguments, then the launch:
    the global size (one int), or 1-3 global sizes then as many local sizes (2, 4 or 6 ints)::

        mod = cc.load_source(remote, VADD_CL, name="vadd", lang="opencl")
        mod["vadd"](a, b, c, 1024)        # global 1024, the local size picked by the OpenCL runtime
        mod["vadd"](a, b, c, 1024, 64)    # global 1024, local 64
    """
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {', '.join(LANGS)}, not {lang!r}")
    if lang == "opencl":
        return _load_opencl(remote, source, name=name, target=target, export=export, options=options,
                            source_name=source_name, first_line=first_line, timings=timings)
    target = target or remote.info.get("target")
    with tempfile.TemporaryDirectory(prefix="wb-src-") as tmp:
        start = time.perf_counter()
        path = build_source(source, tmp, name=name, target=target, export=export, options=options,
                            source_name=source_name, first_line=first_line)
        compiled = time.perf_counter()
        remote.upload(path)
        module = remote.load_module(os.path.basename(path))
    if timings is not None:
        timings["compile"] = compiled - start
        timings["upload_load"] = time.perf_counter() - compiled
    return module


def _load_opencl(remote: "RPCSession", source: str, *, name: str, target: str | None, export: str,
                 options: Sequence[str] | None, source_name: str | None, first_line: int,
                 timings: dict[str, float] | None) -> "RemoteModule":
    from ..errors import RemoteError

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"module name {name!r} must be a plain file name (letters, digits, _ . -)")
    if isinstance(first_line, bool) or not isinstance(first_line, int) or first_line < 1:
        raise ValueError(f"first_line must be a line number >= 1, not {first_line!r}")
    if target or options or export != "so":
        raise ValueError("OpenCL C is built on the device for its OpenCL devices: target, options and export do not "
                         "apply to lang='opencl'")
    shown = source_name or f"{name}.cl"
    text = f'#line {first_line} "{_c_string(shown)}"\n{source}'  # the device compiler's log names the text's lines
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wb-src-") as tmp:
        path = os.path.join(tmp, f"{name}.cl")
        with open(path, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        remote.upload(path)
    uploaded = time.perf_counter()
    try:
        module = remote.load_module(f"{name}.cl")
    except RemoteError as exc:
        if OPENCL_BUILD_FAILED not in str(exc):
            raise
        raise CompileError(str(exc).split(": ", 1)[1] if str(exc).startswith(OPENCL_BUILD_FAILED) else str(exc)) \
            from None
    if timings is not None:
        timings["compile"] = 0.0  # built on the device, inside load_module
        timings["upload_load"] = time.perf_counter() - start
        timings["upload"] = uploaded - start
    return module


OPENCL_BUILD_FAILED = "OpenCL build failed"  # how the device's build error starts (runtime/opencl.py BUILD_FAILED)


def _c_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
