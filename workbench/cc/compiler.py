"""Compiling C kernels into shared objects or tars of object files, for this machine or across.

    >>> from workbench import cc
    >>> cc.create_shared("lib.so", ["add_one.c"])                          # doctest: +SKIP
    >>> fcompile = cc.cross_compiler("aarch64-linux-gnu", output_format="tar")   # doctest: +SKIP
    >>> tvm_module.export_library("lib.tar", fcompile=fcompile)           # doctest: +SKIP
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from typing import Any, Callable, Sequence

# target_triple and _compiler live in .targets (the lower layer) and are re-exported here, where callers import them
from .targets import _compiler, dump_machine, ndk_compiler, parse_target, target_triple

COMPILE_TIMEOUT_S = 300


def include_path() -> str:
    """The directory holding ``workbench_kernel.h``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "include")


def _run(cmd: list[str], cwd: str | os.PathLike | None = None, ccache_env: dict[str, str] | None = None) -> None:
    """Run a compiler command (in ``cwd``; through ccache with ``ccache_env`` added to the environment, as TVM's
    ``tvm.contrib.cc`` does)."""
    env = None
    if ccache_env is not None:
        if shutil.which("ccache") is None:
            raise ValueError("ccache not found: install it (apt-get install ccache), or pass ccache_env=None")
        cmd = ["ccache", *cmd]
        env = {**os.environ, **ccache_env}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, cwd=cwd, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"compiler took over {COMPILE_TIMEOUT_S} s: {shlex.join(cmd)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"compilation failed:\n$ {shlex.join(cmd)}\n{proc.stderr.strip()}")


def _paths(items: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    return [os.fspath(items)] if isinstance(items, (str, os.PathLike)) else [os.fspath(s) for s in items]


def _options(options: str | Sequence[str] | None) -> list[str]:
    """TVM passes ``options`` as a list or as one string; both are accepted."""
    if options is None:
        return []
    return shlex.split(options) if isinstance(options, str) else [str(o) for o in options]


def create_shared(
    output: str | os.PathLike,
    objects_or_sources: str | os.PathLike | Sequence[str | os.PathLike],
    options: str | Sequence[str] | None = None,
    cc: str | None = None,
    cwd: str | os.PathLike | None = None,
    ccache_env: dict[str, str] | None = None,
) -> str:
    """Compile and link C sources and/or objects into the shared object ``output``; return its path.

    ``cc`` is the compiler command (default ``$CC`` or ``cc``), e.g. ``"aarch64-linux-gnu-gcc"``. As in
    TVM, the compiler runs in ``cwd`` (relative paths are there) and, with ``ccache_env``, through ccache
    with those variables (a ValueError if ccache is not installed).

        >>> create_shared("add_one.so", ["add_one.c"], cc="aarch64-linux-gnu-gcc")   # doctest: +SKIP
    """
    return _build(["-shared", "-fPIC"], output, objects_or_sources, options, cc, cwd, ccache_env)


def _build(kind: list[str], output: str | os.PathLike, objects_or_sources: Any, options: Any, cc: str | None,
           cwd: str | os.PathLike | None, ccache_env: dict[str, str] | None) -> str:
    output = os.fspath(output)
    cmd = _compiler(cc) + kind + ["-O2", "-I", include_path(), "-o", output]
    _run(cmd + _paths(objects_or_sources) + _options(options), cwd, ccache_env)
    return output


create_shared.output_format = "so"  # type: ignore[attr-defined]  # what TVM's export_library looks for


def create_executable(
    output: str | os.PathLike,
    objects_or_sources: str | os.PathLike | Sequence[str | os.PathLike],
    options: str | Sequence[str] | None = None,
    cc: str | None = None,
    cwd: str | os.PathLike | None = None,
    ccache_env: dict[str, str] | None = None,
) -> str:
    """Compile and link C sources and/or objects into the program ``output``; return its path.

    As TVM's ``tvm.contrib.cc.create_executable`` (``cwd``, ``ccache_env`` too), but ``cc`` defaults to the
    C compiler (``$CC`` or ``cc``).

        >>> create_executable("hello", ["hello.c"], cc="aarch64-linux-gnu-gcc")   # doctest: +SKIP
    """
    return _build([], output, objects_or_sources, options, cc, cwd, ccache_env)


def compile_objects(
    sources: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    options: Sequence[str] | None = None,
    cc: str | None = None,
) -> list[str]:
    """Compile each C source into a position-independent object in ``out_dir``."""
    objects = []
    for src in sources:
        src = os.fspath(src)
        obj = os.path.join(os.fspath(out_dir), os.path.splitext(os.path.basename(src))[0] + ".o")
        _run(_compiler(cc) + ["-c", "-fPIC", "-O2", "-I", include_path(), "-o", obj, src] + _options(options))
        objects.append(obj)
    return objects


def create_tar(
    output: str | os.PathLike,
    objects: str | os.PathLike | Sequence[str | os.PathLike],
    options: str | Sequence[str] | None = None,
    cc: str | None = None,
) -> str:
    """Pack objects (C sources are compiled first, with ``cc``) in ``output`` (.tar), to be linked on the device.

    This is the format of TVM's ``export_library("lib.tar")``: a tar of ``.o`` files.

        >>> create_tar("lib.tar", ["add_one.c"], cc="aarch64-linux-gnu-gcc")   # doctest: +SKIP
    """
    output = os.fspath(output)
    with tempfile.TemporaryDirectory(prefix="wb-cc-") as tmp:
        paths = _paths(objects)
        c_sources = [s for s in paths if not s.endswith(".o")]
        objects = [s for s in paths if s.endswith(".o")] + compile_objects(c_sources, tmp, _options(options), cc)
        with tarfile.open(output, "w") as tar:
            for obj in objects:
                tar.add(obj, arcname=os.path.basename(obj))
    return output


create_tar.output_format = "tar"  # type: ignore[attr-defined]


def create_ndk_shared(
    output: str | os.PathLike,
    objects_or_sources: str | os.PathLike | Sequence[str | os.PathLike],
    options: str | Sequence[str] | None = None,
) -> str:
    """Link an Android shared object with the NDK compiler named by ``WORKBENCH_NDK_CC`` (or ``TVM_NDK_CC``).

        >>> os.environ["WORKBENCH_NDK_CC"] = "$NDK/.../aarch64-linux-android21-clang"   # doctest: +SKIP
        >>> create_ndk_shared("lib.so", ["add_one.c"])                                    # doctest: +SKIP
    """
    return create_shared(output, objects_or_sources, ["-lm"] + _options(options), cc=shlex.join(ndk_compiler()))


create_ndk_shared.output_format = "so"  # type: ignore[attr-defined]


def cross_compiler(
    compiler_or_triple: Any,
    options: str | Sequence[str] | None = None,
    output_format: str | None = None,
) -> Callable[..., str]:
    """An ``fcompile(output, objects, options=None)`` that builds with a cross compiler, for ``export_library``.

    ``compiler_or_triple`` is a compiler command (``"aarch64-linux-gnu-gcc"``), a
    triple (``"aarch64-linux-gnu"``), any target :func:`workbench.cc.targets.parse_target`
    reads (TVM string or dict), ``"ndk"`` (``WORKBENCH_NDK_CC``), or a function
    ``f(output, objects, options=None)``. ``output_format`` is ``"so"`` (default)
    or ``"tar"`` (objects to be linked on the device); an output named ``*.tar``
    is always a tar. The fcompile has ``output_format`` and ``get_target_triple``
    as apache-tvm's ``export_library`` expects. A missing compiler raises
    ToolchainNotFoundError naming the Debian package, here rather than at export.

        >>> fcompile = cross_compiler("aarch64-linux-gnu")                 # doctest: +SKIP
        >>> fcompile.output_format                                          # doctest: +SKIP
        'so'
        >>> tvm_module.export_library("lib.so", fcompile=fcompile)         # doctest: +SKIP
    """
    if output_format not in (None, "so", "tar"):
        raise ValueError(f"output_format must be 'so' or 'tar', not {output_format!r}")
    base = _options(options)
    link: Callable[..., str] | None = None
    cc: str | None = None
    triple: str | None = None
    if callable(compiler_or_triple):
        link = compiler_or_triple
        output_format = output_format or getattr(link, "output_format", None)
    elif isinstance(compiler_or_triple, str) and compiler_or_triple.strip().lower() == "ndk":
        cmd = ndk_compiler()
        cc, triple = shlex.join(cmd), dump_machine(cmd)
    elif isinstance(compiler_or_triple, str) and _is_compiler_command(compiler_or_triple):
        cmd = _compiler(compiler_or_triple)
        cc, triple = shlex.join(cmd), dump_machine(cmd)
    else:
        spec = parse_target(compiler_or_triple)
        cmd = spec.command()
        cc, triple = shlex.join(cmd), spec.triple
    output_format = output_format or "so"

    def fcompile(output: str | os.PathLike, objects: Sequence[str | os.PathLike],
                 options: str | Sequence[str] | None = None) -> str:
        all_options = base + _options(options)
        if link is not None:
            return link(output, objects, options=all_options)
        if output_format == "tar" or os.fspath(output).endswith(".tar"):
            return create_tar(output, objects, all_options, cc)
        return create_shared(output, objects, all_options, cc)

    fcompile.output_format = output_format  # type: ignore[attr-defined]
    fcompile.get_target_triple = (  # type: ignore[attr-defined]
        getattr(link, "get_target_triple", None) if link is not None else (lambda: triple or target_triple(cc)))
    fcompile.__doc__ = f"export_library compile function: {compiler_or_triple!r} -> .{output_format}"
    return fcompile


def _is_compiler_command(text: str) -> bool:
    """``aarch64-linux-gnu-gcc``, ``/opt/x/clang --target=...``, ``cc``: a command, not a target description."""
    words = shlex.split(text)
    if not words:
        return False
    name = os.path.basename(words[0])
    return (os.sep in words[0] or bool(re.search(r"(^|-)(gcc|g\+\+|cc|c\+\+|clang|clang\+\+)(-[\d.]+)?$", name))
            or (len(words) == 1 and shutil.which(words[0]) is not None and "-" not in name))
