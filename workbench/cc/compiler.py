"""Compiling C kernels into shared objects or tars of object files."""
from __future__ import annotations

import functools
import os
import platform
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from typing import Sequence

COMPILE_TIMEOUT_S = 300


@functools.lru_cache(maxsize=None)
def target_triple(cc: str | None = None) -> str:
    """This machine's target triple, as its C compiler names it (``gcc -dumpmachine``)."""
    try:
        proc = subprocess.run(_compiler(cc) + ["-dumpmachine"], capture_output=True, text=True, timeout=10)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{platform.machine()}-{platform.system().lower()}-gnu"


def include_path() -> str:
    """The directory holding ``workbench_kernel.h``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "include")


def _compiler(cc: str | None) -> list[str]:
    cmd = shlex.split(cc or os.environ.get("CC") or "cc")
    if not shutil.which(cmd[0]):
        raise FileNotFoundError(
            f"C compiler {cmd[0]!r} not found: install gcc (apt-get install gcc) or pass cc='...'"
        )
    return cmd


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"compiler took over {COMPILE_TIMEOUT_S} s: {shlex.join(cmd)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"compilation failed:\n$ {shlex.join(cmd)}\n{proc.stderr.strip()}")


def create_shared(
    output: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    options: Sequence[str] | None = None,
    cc: str | None = None,
) -> str:
    """Compile and link C sources (or objects) into the shared object ``output``."""
    output = os.fspath(output)
    cmd = _compiler(cc) + ["-shared", "-fPIC", "-O2", "-I", include_path(), "-o", output]
    _run(cmd + [os.fspath(s) for s in sources] + list(options or []))
    return output


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
        _run(_compiler(cc) + ["-c", "-fPIC", "-O2", "-I", include_path(), "-o", obj, src] + list(options or []))
        objects.append(obj)
    return objects


def create_tar(
    output: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    options: Sequence[str] | None = None,
    cc: str | None = None,
) -> str:
    """Compile C sources to objects and pack them in ``output`` (.tar), to be linked on the device.

    This is the format of TVM's ``export_library("lib.tar")``: a tar of ``.o`` files.
    """
    output = os.fspath(output)
    with tempfile.TemporaryDirectory(prefix="wb-cc-") as tmp:
        objects = [s for s in map(os.fspath, sources) if s.endswith(".o")]
        c_sources = [s for s in map(os.fspath, sources) if not s.endswith(".o")]
        objects += compile_objects(c_sources, tmp, options, cc)
        with tarfile.open(output, "w") as tar:
            for obj in objects:
                tar.add(obj, arcname=os.path.basename(obj))
    return output
