"""C kernels built for a target, as a module to export (and, for this machine, to call in-process).

    >>> from workbench import cc
    >>> mod = cc.build(ADD_ONE_C, target="aarch64-linux-gnu")      # doctest: +SKIP
    >>> mod.export_library("lib.tar", fcompile="tar")              # doctest: +SKIP
    >>> host = cc.build(ADD_ONE_C)                                 # doctest: +SKIP
    >>> host["add_one"](np.zeros(4, "float32"), out)               # doctest: +SKIP

A Module is what ``workbench.testing.rpc_run``/``local_run`` export, like an
apache-tvm module: anything with ``export_library(path, fcompile=...)``.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import weakref
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .compiler import compile_objects, create_ndk_shared, create_shared, create_tar
from .source import CompileError, _c_string, compiler_for
from .targets import parse_target

if TYPE_CHECKING:
    from ..rpc.client.local import LocalSession
    from ..rpc.client.session import RemoteModule

_KERNEL_RE = re.compile(r"\bWB_KERNEL\(\s*([A-Za-z_]\w*)\s*\)|\b__tvm_ffi_([A-Za-z]\w*)\s*\(")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def build(
    source_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    target: Any = "host",
    name: str | None = None,
    options: Sequence[str] | None = None,
) -> "Module":
    """Compile C kernels (source text, or paths of ``.c`` files) for ``target`` into a :class:`Module`.

    ``target`` is ``"host"``, a triple (``"aarch64-linux-gnu"``) or a TVM target
    (string or dict). Compiler diagnostics raise CompileError; a target no
    installed compiler builds for raises ToolchainNotFoundError naming the package.

        >>> mod = build(ADD_ONE_C, target="aarch64-linux-gnu", name="add_one")   # doctest: +SKIP
        >>> mod.export_library("add_one.so")                                      # doctest: +SKIP
    """
    paths: list[str] | None = None
    if isinstance(source_or_paths, os.PathLike):
        paths = [os.fspath(source_or_paths)]
    elif isinstance(source_or_paths, str):
        if "\n" not in source_or_paths and os.path.isfile(source_or_paths):
            paths = [source_or_paths]
    else:
        paths = [os.fspath(p) for p in source_or_paths]
        if not paths:
            raise ValueError("build: no source files given")
    if paths is not None:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"build: no such source file {missing[0]!r}")
    name = name or (os.path.splitext(os.path.basename(paths[0]))[0] if paths else "kernel")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"module name {name!r} must be a plain file name (letters, digits, _ . -)")
    cc = compiler_for(target)  # ToolchainNotFoundError before anything is written
    workdir = tempfile.mkdtemp(prefix="wb-module-")
    try:
        if paths is None:
            text = str(source_or_paths)
            src = os.path.join(workdir, f"{name}.c")
            with open(src, "w") as f:  # #line: diagnostics name the module and the text's own lines
                f.write(f'#line 1 "{_c_string(name + ".c")}"\n{text}' + ("" if text.endswith("\n") else "\n"))
            sources, texts = [src], [text]
        else:
            sources = [os.path.abspath(p) for p in paths]
            texts = []
            for p in sources:
                with open(p, errors="replace") as f:
                    texts.append(f.read())
        objdir = os.path.join(workdir, "obj")
        os.mkdir(objdir)
        try:
            objects = compile_objects(sources, objdir, options, cc)
        except RuntimeError as exc:
            text = str(exc)
            if not text.startswith("compilation failed"):
                raise
            raise CompileError(text.split("\n", 2)[-1].strip()) from None
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    names = sorted({a or b for t in texts for a, b in _KERNEL_RE.findall(t)})
    return Module(name, target, cc, sources, objects, names, workdir)


class Module:
    """Kernels compiled for one target: export them, or (host target) call them here.

    Built by :func:`build`. ``function_names`` are the kernels found in the
    source, ``entry_name`` is ``"main"`` if there is one, else the only kernel
    (None when there are several). ``close()`` (or collection) removes its files.

        >>> mod = build(ADD_ONE_C)                                          # doctest: +SKIP
        >>> mod.export_library("lib.tar", fcompile="tar")                   # doctest: +SKIP
        >>> mod["add_one"](a, b)   # numpy arrays: b is written in place    # doctest: +SKIP
    """

    def __init__(self, name: str, target: Any, cc: str | None, sources: list[str], objects: list[str],
                 names: list[str], workdir: str):
        self.name = name
        self.target = target
        self.target_spec = parse_target(target)
        self.sources = list(sources)
        self.objects = list(objects)
        self.function_names = list(names)
        self._cc = cc
        self._workdir = workdir
        self._session: LocalSession | None = None
        self._loaded: RemoteModule | None = None
        self._finalizer = weakref.finalize(self, Module._cleanup, workdir, [None])

    @property
    def entry_name(self) -> str | None:
        if "main" in self.function_names:
            return "main"
        return self.function_names[0] if len(self.function_names) == 1 else None

    @property
    def is_host(self) -> bool:
        return self.target_spec.is_host

    # -- export ---------------------------------------------------------------------------
    def export_library(
        self,
        file_name: str | os.PathLike,
        fcompile: str | Callable[..., Any] | None = None,
        options: Sequence[str] | None = None,
    ) -> str:
        """Write the kernels to ``file_name`` for the module's target; return the path.

        ``fcompile``: None (a shared object built by the target's compiler; a
        ``.tar`` name gives a tar of objects, as in TVM), ``"so"``, ``"tar"``
        (objects linked on the device), ``"ndk"`` (``WORKBENCH_NDK_CC``), or an
        ``fcompile(output, objects, options=None)`` such as ``cc.cross_compiler(...)``;
        one with ``object_format = "c"`` gets the C sources instead of objects.

            >>> mod.export_library("lib.so", fcompile=cc.cross_compiler("aarch64-linux-gnu"))   # doctest: +SKIP
        """
        self._check_open()
        path = os.fspath(file_name)
        if fcompile is None:
            fcompile = "tar" if path.endswith(".tar") else "so"
        if fcompile == "so":
            return create_shared(path, self.objects, options, self._cc)
        if fcompile == "tar":
            return create_tar(path, self.objects)
        if fcompile == "ndk":
            return create_ndk_shared(path, self.sources, options)
        if isinstance(fcompile, str) or not callable(fcompile):
            raise ValueError(f"fcompile must be None, 'so', 'tar', 'ndk' or a function, not {fcompile!r}")
        files = self.sources if getattr(fcompile, "object_format", "o") == "c" else self.objects
        result = fcompile(path, files, options=list(options)) if options else fcompile(path, files)
        return os.fspath(result) if isinstance(result, (str, os.PathLike)) else path

    # -- local calls (host target) --------------------------------------------------------
    def _local(self) -> "RemoteModule":
        self._check_open()
        if not self.is_host:
            raise RuntimeError(
                f"module {self.name!r} is built for {self.target_spec.triple}, not for this machine: export it "
                f"(mod.export_library('lib.tar', fcompile='tar')) and run it on such a device, e.g. with "
                f"workbench.testing.rpc_run(mod, 'cpu', args)"
            )
        if self._loaded is None:
            from ..rpc.client.local import LocalSession

            so = self.export_library(os.path.join(self._workdir, f"{self.name}.so"))
            session = LocalSession()
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, Module._cleanup, self._workdir, [session])
            session.upload(so, f"{self.name}.so")
            self._session, self._loaded = session, session.load_module(f"{self.name}.so")
        return self._loaded

    def get_function(self, name: str) -> Callable[..., Any]:
        """A kernel of a host module, callable here with numpy arrays (written back in place) or tensors."""
        fn = self._local().get_function(name)
        session = self._session

        def call(*args: Any) -> Any:
            return _call_local(session, fn, args)

        call.__name__ = name
        call.__doc__ = f"kernel {name} of {self.name} (in this process)"
        return call

    __getitem__ = get_function

    def __call__(self, *args: Any) -> Any:
        if self.entry_name is None:
            raise RuntimeError(f"module {self.name!r} has no entry function; call one by name: mod[name](...) "
                               f"with name in {self.function_names}")
        return self.get_function(self.entry_name)(*args)

    def close(self) -> None:
        """End the in-process session (if any) and remove the module's files."""
        self._loaded = None
        self._session = None
        self._finalizer()

    def _check_open(self) -> None:
        if not self._finalizer.alive:
            raise RuntimeError(f"module {self.name!r} is closed; build it again")

    @staticmethod
    def _cleanup(workdir: str, sessions: list) -> None:
        for session in sessions:
            if session is not None:
                session.close()
        shutil.rmtree(workdir, ignore_errors=True)

    def __enter__(self) -> "Module":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<cc.Module {self.name} for {self.target_spec.triple} functions={self.function_names}>"


def _call_local(session: Any, fn: Any, args: Sequence[Any]) -> Any:
    """Call ``fn`` with numpy arrays copied to the session's cpu and copied back (in place) afterwards."""
    import numpy as np

    from ..runtime.tensors import Tensor, tensor

    dev = session.cpu(0)
    sent: list[Any] = []
    arrays: list[tuple[np.ndarray, Tensor]] = []
    for a in args:
        if isinstance(a, np.ndarray):
            t = tensor(a, dev)
            sent.append(t)
            arrays.append((a, t))
        elif isinstance(a, Tensor) and a.session is not session:
            raise ValueError(f"{a!r} belongs to another session; pass a numpy array (a.numpy()) instead")
        else:
            sent.append(a)
    result = fn(*sent)
    for arr, t in arrays:
        if arr.flags.writeable:
            np.copyto(arr, t.numpy())
    return result
