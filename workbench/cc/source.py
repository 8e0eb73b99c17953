"""Kernels from source text: pick the compiler for a target triple, build, upload and load.

    >>> from workbench import cc
    >>> mod = cc.load_source(remote, ADD_ONE_C, name="add_one")     # doctest: +SKIP
    >>> mod["add_one"](a, b)                                        # doctest: +SKIP

This is what ``%%rpc_compile`` runs. Compiler messages name the source by
``source_name`` with the line numbers of the text given, not of a temp file.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Sequence

from .compiler import create_shared, create_tar, target_triple

if TYPE_CHECKING:
    from ..rpc.client import RemoteModule, RPCSession

EXPORTS = ("so", "tar")


class CompileError(RuntimeError):
    """The compiler rejected the source; ``message`` is its diagnostics."""


class ToolchainNotFoundError(RuntimeError):
    """No compiler on this machine builds for the requested target."""


def _arch_os(triple: str) -> tuple[str, ...]:
    """``x86_64-pc-linux-gnu`` and ``x86_64-linux-gnu`` both as ``('x86_64', 'linux', 'gnu')``."""
    parts = triple.strip().lower().split("-")
    if len(parts) == 4 or (len(parts) == 3 and parts[1] in ("pc", "unknown", "none")):
        parts = [parts[0]] + parts[2:]
    return tuple(parts)


def compiler_for(triple: str | None = None) -> str | None:
    """The C compiler that builds for ``triple``: None for this machine's own, else ``TRIPLE-gcc`` if installed.

    A triple no installed compiler targets raises ToolchainNotFoundError naming the package to install.
    """
    if not triple or _arch_os(triple) == _arch_os(target_triple()):
        return None
    if not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+){1,3}", triple):
        raise ToolchainNotFoundError(f"{triple!r} is not a target triple (e.g. aarch64-linux-gnu)")
    for name in (f"{triple}-gcc", f"{triple}-cc"):
        if shutil.which(name):
            return name
    package = f"gcc-{triple.replace('_', '-')}"
    raise ToolchainNotFoundError(
        f"no C compiler for {triple} on this machine (it compiles for {target_triple()}): install a cross "
        f"compiler (Debian: apt-get install {package}), or set CC for it, or pass a host target"
    )


def build_source(
    source: str,
    out_dir: str | os.PathLike,
    *,
    name: str = "kernel",
    target: str | None = None,
    export: str = "so",
    options: Sequence[str] | None = None,
    source_name: str | None = None,
) -> str:
    """Compile C ``source`` into ``out_dir/NAME.so`` (or ``.tar`` of objects, linked on the device); return the path.

    Diagnostics come as CompileError, naming ``source_name`` (default ``NAME.c``) and the source's own lines.
    """
    if export not in EXPORTS:
        raise ValueError(f"export must be one of {', '.join(EXPORTS)}, not {export!r}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"module name {name!r} must be a plain file name (letters, digits, _ . -)")
    cc = compiler_for(target)
    shown = source_name or f"{name}.c"
    src = os.path.join(os.fspath(out_dir), f"{name}.c")
    with open(src, "w") as f:  # the #line directive makes the compiler report the text's own name and lines
        f.write(f'#line 1 "{_c_string(shown)}"\n{source}')
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
    timings: dict[str, float] | None = None,
) -> "RemoteModule":
    """Build ``source`` for the session's device, upload it as ``NAME.so``/``NAME.tar``, load it and return the module.

    The target defaults to the triple the device published; ``timings``, if
    given, receives the seconds spent in ``compile`` and in ``upload_load``.
    """
    target = target or remote.info.get("target")
    with tempfile.TemporaryDirectory(prefix="wb-src-") as tmp:
        start = time.perf_counter()
        path = build_source(source, tmp, name=name, target=target, export=export, options=options,
                            source_name=source_name)
        compiled = time.perf_counter()
        remote.upload(path)
        module = remote.load_module(os.path.basename(path))
    if timings is not None:
        timings["compile"] = compiled - start
        timings["upload_load"] = time.perf_counter() - compiled
    return module


def _c_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
