"""The native parts: minrpc, the small C session server, built from the sources shipped in this package.

    >>> from workbench.native import build_minrpc
    >>> path = build_minrpc()                          # host build, cached  # doctest: +SKIP
    >>> arm = build_minrpc("aarch64-linux-gnu")        # with aarch64-linux-gnu-gcc  # doctest: +SKIP

Builds are cached under ``~/.cache/workbench/minrpc/`` (``$XDG_CACHE_HOME``
is honoured), keyed by a hash of the sources, the flags, the compiler's path
and its version: a second call returns the same file without compiling.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from typing import Any, Iterator, Sequence

log = logging.getLogger("workbench.native")

NATIVE_DIR = os.path.dirname(os.path.abspath(__file__))
MINRPC_DIR = os.path.join(NATIVE_DIR, "minrpc")
# the build line of minrpc.h; the sources, the target macro and -o come around it
MINRPC_CFLAGS = ("-std=gnu99", "-O2", "-D_GNU_SOURCE", "-pthread", "-rdynamic")
COMPILE_FLAGS = MINRPC_CFLAGS[:-1]  # the same without -rdynamic, which only the link needs
MINRPC_LIBS = ("-ldl", "-lm")
BUILD_TIMEOUT_S = 300
CACHE_KEEP = 8  # builds kept per target (the most recently used); older ones are removed
# Debian's names for the architectures of its cross C libraries (libc6-dev-<arch>-cross)
DEBIAN_ARCH = {"aarch64": "arm64", "arm": "armhf", "x86_64": "amd64", "i686": "i386", "riscv64": "riscv64",
               "powerpc64le": "ppc64el", "s390x": "s390x", "mips64el": "mips64el"}

__all__ = ["MINRPC_CFLAGS", "MINRPC_LIBS", "MinRPCBuildError", "build_minrpc", "cache_dir", "minrpc_sources"]


class MinRPCBuildError(RuntimeError):
    """The compiler failed to build minrpc; the message carries the command and the compiler's output."""


def cache_dir() -> str:
    """Where built minrpc binaries are kept: ``$XDG_CACHE_HOME/workbench/minrpc`` (default ``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "workbench", "minrpc")


WORKER_ONLY_SOURCES = frozenset({"elf.c", "opencl_module.c", "requests.c", "syslib.c", "tar.c"})  # tvm.c: its handshake is the listener's


def minrpc_sources() -> list[str]:
    """The C files minrpc is built from (``native/minrpc/*.c`` and ``native/kernel_runtime.c``).

    A clear error when they are not there (a package installed without its C sources).
    """
    # what only session workers run goes last: the listener's code then sits in fewer pages (fault-around
    # maps 64 KiB of the binary around each page it runs, so mixed code costs the idle listener memory)
    sources = sorted(glob.glob(os.path.join(MINRPC_DIR, "*.c")),
                     key=lambda path: (os.path.basename(path) in WORKER_ONLY_SOURCES, path))
    runtime = os.path.join(NATIVE_DIR, "kernel_runtime.c")
    if not sources or not os.path.isfile(runtime):
        raise MinRPCBuildError(
            f"the minrpc sources are missing from {NATIVE_DIR} (expected minrpc/*.c and kernel_runtime.c): "
            "reinstall rpc-workbench from a source checkout (pip install -e .)"
        )
    return sources + [runtime]


def _headers() -> list[str]:
    from ..cc.compiler import include_path

    return sorted(glob.glob(os.path.join(NATIVE_DIR, "*.h")) + glob.glob(os.path.join(MINRPC_DIR, "*.h"))
                  + glob.glob(os.path.join(include_path(), "*.h")))


def resolve_compiler(target: Any = "host", cc: str | Sequence[str] | None = None) -> tuple[list[str], str]:
    """The compiler command that builds for ``target`` and the triple it builds for.

    ``cc`` (a command string or list) wins over the target's compiler. A
    missing cross compiler raises ``ToolchainNotFoundError`` naming the Debian
    package; a cross compiler without its C library names that package too.

        >>> resolve_compiler("aarch64-linux-gnu")        # doctest: +SKIP
        (['aarch64-linux-gnu-gcc'], 'aarch64-linux-gnu')
    """
    from ..cc.targets import ToolchainNotFoundError, _compiler, normalize_triple, parse_target, target_triple

    spec = parse_target(normalize_triple(target) if isinstance(target, str) and target != "host" else target)
    if cc is not None:
        command = _compiler(cc if isinstance(cc, str) else shlex.join(cc))
    elif spec.is_host:
        command = _compiler(None) + list(spec.flags)
    else:
        command = spec.command()
    triple = target_triple(shlex.join(command[:1])) if cc is not None or spec.is_host else spec.triple
    if not spec.is_host or cc is not None:
        _check_c_library(command, triple, ToolchainNotFoundError)
    return command, triple


def _check_c_library(command: list[str], triple: str, error: type) -> None:
    """A cross compiler without its target's C library cannot link a program: say which package has it."""
    try:
        proc = subprocess.run(command + ["-print-file-name=libc.so"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return  # the build itself will say what is wrong
    found = proc.stdout.strip()
    if proc.returncode == 0 and not os.path.isabs(found):
        arch = triple.split("-")[0]
        package = f"libc6-dev-{DEBIAN_ARCH.get(arch, arch)}-cross"
        raise error(
            f"{command[0]} has no C library for {triple} to link programs with: install it "
            f"(Debian/Ubuntu: apt-get install {package})"
        )


@functools.lru_cache(maxsize=32)
def _compiler_identity(path: str, mtime_ns: int) -> str:
    """What identifies a compiler build: its ``--version`` text and ``-dumpmachine`` (cached per file and mtime)."""
    parts = []
    for flag in ("--version", "-dumpmachine"):
        try:
            proc = subprocess.run([path, flag], capture_output=True, text=True, timeout=30)
            parts.append(proc.stdout.strip())
        except (OSError, subprocess.TimeoutExpired):
            parts.append("?")
    return "\n".join(parts)


def _file_digest(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def build_key(command: Sequence[str], flags: Sequence[str], files: Sequence[str]) -> str:
    """The cache key of a build: a hash of the sources' names and bytes, the flags, the compiler and its version."""
    exe = shutil.which(command[0]) or command[0]
    real = os.path.realpath(exe)
    try:
        mtime = os.stat(real).st_mtime_ns
    except OSError:
        mtime = 0
    h = hashlib.sha256()
    for part in (real, _compiler_identity(real, mtime), *command[1:], "\0", *flags, "\0"):
        h.update(part.encode() + b"\0")
    for path in files:
        h.update(os.path.basename(path).encode() + b"\0" + _file_digest(path))
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if needed): one build of a key at a time, across processes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run(cmd: list[str], what: str) -> None:
    """Run a compiler command; MinRPCBuildError with the command and its output when it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise MinRPCBuildError(f"{what} took over {BUILD_TIMEOUT_S} s:\n$ {shlex.join(cmd)}") from None
    if proc.returncode != 0:
        output_text = (proc.stderr + proc.stdout).strip() or "(no output)"
        raise MinRPCBuildError(f"{what} failed (status {proc.returncode}):\n$ {shlex.join(cmd)}\n{output_text}")
    if proc.stderr.strip():
        log.debug("%s: compiler warnings:\n%s", what, proc.stderr.strip())


def _compile_all(jobs: list[list[str]]) -> None:
    """Run compile commands, as many at once as this process has CPUs; the first failure raises (all of them named)."""
    import concurrent.futures

    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(_run, cmd, "building minrpc") for cmd in jobs]
        errors = [str(f.exception()) for f in futures if f.exception() is not None]
    if errors:
        raise MinRPCBuildError("\n\n".join(errors))


def _link(command: list[str], flags: list[str], files: list[str], output: str) -> None:
    """Link ``files`` into the program ``output``: built beside it under a temporary name, then renamed (atomic)."""
    directory = os.path.dirname(os.path.abspath(output)) or "."
    fd, tmp = tempfile.mkstemp(prefix=".minrpc-build-", dir=directory)
    os.close(fd)
    try:
        _run(command + list(MINRPC_CFLAGS) + flags + files + list(MINRPC_LIBS) + ["-o", tmp], "building minrpc")
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _cache_directory() -> str:
    directory = cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:  # a read-only home: the temporary directory serves as the cache
        fallback = os.path.join(tempfile.gettempdir(), f"workbench-minrpc-{os.getuid()}")
        log.warning("cannot use %s for minrpc builds (%s); using %s", directory, exc.strerror or exc, fallback)
        directory = fallback
        os.makedirs(directory, mode=0o700, exist_ok=True)
    return directory


def _object_name(source: str) -> str:
    return os.path.splitext(os.path.basename(source))[0] + ".o"


def is_cxx_driver(command: Sequence[str]) -> bool:
    """``g++``, ``aarch64-linux-gnu-g++``, ``clang++-17``, ``c++``: a C++ compiler driver (TVM's default is g++)."""
    return bool(command) and re.search(r"(g|c|clang)\+\+(-[\d.]+)?$", os.path.basename(command[0])) is not None


def minrpc_objects(target: Any = "host") -> list[str]:
    """minrpc's sources compiled for ``target`` by its C compiler (cached): what a program embedding it links."""
    from ..cc.compiler import include_path

    command, triple = resolve_compiler(target)
    flags = ["-I", NATIVE_DIR, "-I", include_path(), f'-DMINRPC_TARGET="{triple}"']
    return _minrpc_objects(command, flags, _cache_directory(), triple)


def _minrpc_objects(command: list[str], flags: list[str], directory: str, triple: str) -> list[str]:
    """minrpc's sources compiled once per key into ``objects-<triple>-<key>/`` of the cache (each program built
    from them is then a link step only)."""
    sources = minrpc_sources()
    key = build_key(command, [*COMPILE_FLAGS, *flags], sources + _headers())
    final = os.path.join(directory, f"objects-{triple}-{key[:24]}")
    objects = [os.path.join(final, _object_name(src)) for src in sources]
    with _locked(final + ".lock"):
        if all(os.path.isfile(o) for o in objects):
            os.utime(final)  # recently used: kept by _prune
        else:
            log.info("compiling minrpc for %s with %s", triple, command[0])
            tmp = tempfile.mkdtemp(prefix=".minrpc-objects-", dir=directory)
            try:
                language = ["-x", "c"] if is_cxx_driver(command) else []  # g++: our sources are C
                _compile_all([command + list(COMPILE_FLAGS) + flags + ["-c", *language, src, "-o",
                                                                         os.path.join(tmp, _object_name(src))]
                              for src in sources])
                shutil.rmtree(final, ignore_errors=True)  # a set left incomplete
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    _prune(directory, f"objects-{triple}-", final)
    return objects


def _prune(directory: str, prefix: str, keep: str) -> None:
    """Keep the CACHE_KEEP most recently used entries of a kind and target (``keep`` always); remove the others."""
    def last_used(path: str) -> float:
        try:
            return os.stat(path).st_mtime
        except OSError:  # removed meanwhile by another process
            return 0.0

    paths = glob.glob(os.path.join(directory, prefix + "*"))
    for lock in (p for p in paths if p.endswith(".lock")):  # of builds that failed or were removed
        if not os.path.exists(lock[: -len(".lock")]) and time.time() - last_used(lock) > 2 * BUILD_TIMEOUT_S:
            with contextlib.suppress(OSError):
                os.unlink(lock)
    entries = [p for p in paths if not p.endswith(".lock")]
    entries.sort(key=last_used, reverse=True)
    for path in entries[CACHE_KEEP:]:
        if path == keep:
            continue
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.unlink(path + ".lock")


def build_minrpc(
    target: Any = "host",
    *,
    cc: str | Sequence[str] | None = None,
    objects: Sequence[str | os.PathLike] = (),
    output: str | os.PathLike | None = None,
    options: Sequence[str] = (),
) -> str:
    """Build minrpc for ``target`` and return the path of the executable.

    ``target`` is ``"host"``, an architecture (``"aarch64"``, ``"armhf"``), a
    triple (``"aarch64-linux-gnu"``) or any TVM target
    :func:`workbench.cc.parse_target` reads; ``cc`` overrides the
    compiler. ``objects`` are objects (or C sources) linked into the program:
    their ``__tvm_ffi_<name>`` kernels are then served by ``remote.system_lib()``.
    ``options`` are extra compiler flags. minrpc's own sources are compiled
    once per compiler and kept in the cache (see :func:`cache_dir`), as is
    the program built without ``objects``; with ``output`` the program is
    written there (atomically). A missing cross compiler raises
    ``ToolchainNotFoundError`` naming the Debian package; compiler errors
    raise :class:`MinRPCBuildError` with the compiler's output.

        >>> server = build_minrpc()                                              # doctest: +SKIP
        >>> subprocess.Popen([server, "--port", "9090"])                         # doctest: +SKIP
        >>> build_minrpc("aarch64-linux-gnu", objects=["add_one.o"], output="board_server")   # doctest: +SKIP
    """
    from ..cc.compiler import include_path

    command, triple = resolve_compiler(target, cc)
    extra = [os.path.abspath(os.fspath(o)) for o in objects]
    for path in extra:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"build_minrpc: no such object or source file {path!r}")
    flags = ["-I", NATIVE_DIR, "-I", include_path(), f'-DMINRPC_TARGET="{triple}"', *map(str, options)]
    directory = _cache_directory()
    files = _minrpc_objects(command, flags, directory, triple) + extra
    if extra and output is not None:  # a program of the caller's (with_minrpc): built where it asked, not cached
        output = os.path.abspath(os.fspath(output))
        log.info("linking a minrpc program for %s into %s", triple, output)
        _link(command, flags, files, output)
        return output
    prefix = f"{'program' if extra else 'minrpc'}-{triple}-"
    key = build_key(command, [*MINRPC_CFLAGS, *flags, *MINRPC_LIBS], files)
    cached = os.path.join(directory, prefix + key[:24])
    with _locked(cached + ".lock"):
        if os.path.isfile(cached) and os.access(cached, os.X_OK):
            log.debug("minrpc for %s: cached %s", triple, cached)
            os.utime(cached)  # recently used: kept by _prune
        else:
            log.info("linking minrpc for %s", triple)
            _link(command, flags, files, cached)
    _prune(directory, prefix, cached)
    if output is None:
        return cached
    output = os.path.abspath(os.fspath(output))
    fd, tmp = tempfile.mkstemp(prefix=".minrpc-copy-", dir=os.path.dirname(output))
    os.close(fd)
    try:
        shutil.copyfile(cached, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return output
