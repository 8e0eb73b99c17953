"""Modules our TVM-free runtime cannot run by itself, run through apache-tvm where the device has it.

Two kinds of exported library need TVM's own runtime:

* a **Relax VM executable** (``relax.build(...).export_library``): its
  ``__tvm_ffi__library_bin`` data carries a serialized ``relax.VMExecutable``,
  whose ``main`` is bytecode for TVM's Relax virtual machine (the library
  exports only the model's TIR kernels, no ``main``);
* a kernel that **calls runtime functions by name** (it defines the
  ``__TVMFFIEnvModLookupFromImports`` slot), such as ``topi.argsort``, which
  calls ``tvm.contrib.sort.argsort``, unless every function it calls is
  registered in this process (``workbench.rpc.register_func``, e.g. in a
  server's ``server_init_callback``): then it runs on our runtime.

``tvm_requirement(path)`` says, from the file alone (no TVM), why a library needs
TVM, or None. ``load_module`` then loads such a library with
``tvm.runtime.load_module`` (a Relax VM executable into
``relax.VirtualMachine(exec, tvm.cpu())``) when TVM is importable on the device,
and refuses it at load time with a message naming what it needs otherwise.
Tensors are handed to TVM through DLPack over the session's own memory (no copy).
TVM is imported only here and only when a library needs it.

The switch ``WORKBENCH_NO_TVM=1`` in the server's (or this process's) environment
keeps TVM out even where it is installed: such libraries are refused as on a
device without TVM.

    >>> tvm_requirement("mlp.so")                                 # doctest: +SKIP
    'a Relax VM executable (relax.build(...).export_library)'
    >>> mod = load_with_tvm("/ws/mlp.so", "mlp.so")              # doctest: +SKIP
    >>> mod.get_function("main")(x, w1, w2, out)                 # doctest: +SKIP
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import struct
import sys
import time
import weakref
from typing import Any, Callable, NamedTuple

from ..errors import BadRequestError, FunctionNotFoundError, RemoteError, UnsupportedError
from .ffi import exported_kernels

log = logging.getLogger(__name__)

NO_TVM_ENV = "WORKBENCH_NO_TVM"
LIBRARY_BIN = "__tvm_ffi__library_bin"
LOOKUP_SLOT = "__TVMFFIEnvModLookupFromImports"
FUNC_HANDLE_PREFIX = ".tvm_func."  # TVM's per-name function handle in a library's symbol table
VM_EXECUTABLE = "relax.VMExecutable"
HOST_LIBRARY_KEY = "_lib"  # the library's own code in the import tree of library_bin
INSTALL_HINT = "pip install apache-tvm"
# global function names a TVM kernel looks up by name (tvm.contrib.sort.argsort, runtime.*, ...)
_RUNTIME_NAME = re.compile(rb"(?<=\x00)((?:tvm|runtime|tvm_ffi|ffi|vm|relax)\.[A-Za-z0-9_.]+)\x00")


class TVMRequirement(NamedTuple):
    """Why a library needs TVM's runtime: ``what`` it is, and the runtime functions it calls by name."""

    what: str
    functions: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.functions:
            names = ", ".join(repr(f) for f in self.functions)
            return f"{self.what} (it needs TVM runtime function{'s' if len(self.functions) > 1 else ''} {names})"
        return self.what


# -- what a library needs, read from the file ---------------------------------------------
def _symbol_bytes(data: bytes, wanted: str) -> bytes | None:
    """The contents of the defined dynamic symbol ``wanted`` of an ELF shared object (None if absent)."""
    from .ffi import elf_dynamic_symbols

    for sym in elf_dynamic_symbols(data):
        if sym.name == wanted:
            return None if sym.file_offset is None else data[sym.file_offset:sym.file_offset + sym.size]
    return None


def library_modules(path: str) -> list[str]:
    """The kinds of module a TVM library carries in ``__tvm_ffi__library_bin`` besides its own code.

    ``[]`` for a plain kernel library (it has no such data); ``["relax.VMExecutable"]`` for a Relax model.

        >>> library_modules("mlp.so")                               # doctest: +SKIP
        ['relax.VMExecutable']
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        blob = _symbol_bytes(data, LIBRARY_BIN)
    except (OSError, struct.error, IndexError, ValueError):
        return []
    if not blob:
        return []
    return _blob_module_kinds(blob)


def _blob_module_kinds(blob: bytes) -> list[str]:
    """Module keys of a library_bin: ``<u64 nbytes> <vec row_ptr> <vec child_indices> (<str key> [<bytes>])*``."""
    kinds: list[str] = []
    try:
        nbytes, = struct.unpack_from("<Q", blob, 0)
        end = min(len(blob), 8 + nbytes)
        pos = 8
        for _ in range(2):  # the import tree: row pointers, child indices
            count, = struct.unpack_from("<Q", blob, pos)
            pos += 8 + 8 * count
        while pos + 8 <= end:
            size, = struct.unpack_from("<Q", blob, pos)
            key = blob[pos + 8:pos + 8 + size].decode("utf-8")
            pos += 8 + size
            if key == HOST_LIBRARY_KEY:
                continue
            kinds.append(key)
            payload, = struct.unpack_from("<Q", blob, pos)
            pos += 8 + payload
    except (struct.error, UnicodeDecodeError):
        pass  # a truncated or unknown layout: what was read so far
    if not kinds and VM_EXECUTABLE.encode() in blob:
        kinds.append(VM_EXECUTABLE)
    return kinds


def runtime_functions(path: str) -> list[str]:
    """The runtime functions a kernel library calls by name (empty unless it looks functions up).

    TVM's code generator keeps one handle per name, ``.tvm_func.<name>``, in the library's
    symbol table; a stripped library is searched for TVM's own function names and the names
    registered in this process instead.

        >>> runtime_functions("argsort.so")                         # doctest: +SKIP
        ['tvm.contrib.sort.argsort']
    """
    from .ffi import context_slots, elf_static_symbol_names
    from .registry import list_global_func_names

    if LOOKUP_SLOT not in context_slots(path):
        return []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    names = {n[len(FUNC_HANDLE_PREFIX):] for n in elf_static_symbol_names(data) if n.startswith(FUNC_HANDLE_PREFIX)}
    if not names:  # stripped
        names = {m.decode() for m in _RUNTIME_NAME.findall(data)}
        names |= {n for n in list_global_func_names() if b"\0" + n.encode() + b"\0" in data}
    return sorted(n for n in names if n and not n.endswith(".") and ".." not in n)


def tvm_requirement(path: str) -> TVMRequirement | None:
    """Why the shared object ``path`` needs TVM's runtime to run, or None (it runs on ours).

    A kernel library that calls runtime functions by name runs on ours when every one of
    them is registered in this process (``workbench.rpc.register_func``); otherwise the
    requirement names the ones that are not.

        >>> tvm_requirement("add_one.so") is None                  # doctest: +SKIP
        True
    """
    kinds = library_modules(path)
    if VM_EXECUTABLE in kinds:
        return TVMRequirement("a Relax VM executable (relax.build(...).export_library): its functions run on "
                              "TVM's Relax virtual machine")
    if kinds:
        return TVMRequirement(f"a TVM library carrying {', '.join(repr(k) for k in kinds)} module(s), which "
                              "TVM's runtime loads")
    from .ffi import context_slots
    from .registry import is_registered

    if LOOKUP_SLOT in context_slots(path):
        functions = tuple(runtime_functions(path))
        missing = tuple(f for f in functions if not is_registered(f))
        if functions and not missing:
            log.debug("%s calls only registered functions: %s", path, ", ".join(functions))
            return None
        return TVMRequirement("a kernel library that calls into TVM's runtime", missing)
    return None


# -- is TVM there? -------------------------------------------------------------------------
def tvm_disabled() -> bool:
    """True when ``WORKBENCH_NO_TVM`` is set (to anything but ``""``/``0``/``false``/``no``)."""
    return os.environ.get(NO_TVM_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _import_tvm() -> tuple[Any, str]:
    """``(tvm module, "")``, or ``(None, why not)``; never raises."""
    if tvm_disabled():
        return None, f"the server runs with {NO_TVM_ENV}=1, which keeps TVM out"
    if "tvm" in sys.modules and sys.modules["tvm"] is None:
        return None, "importing tvm is blocked in this process"
    if "tvm" not in sys.modules and importlib.util.find_spec("tvm") is None:
        return None, "apache-tvm is not installed on the device"
    try:
        import tvm
        from tvm import relax  # noqa: F401  (the VM, needed for Relax executables)
    except Exception as exc:  # any failure to import is "no usable TVM", said with its reason
        return None, f"importing apache-tvm on the device failed ({type(exc).__name__}: {exc})"
    return tvm, ""


def refusal(name: str, need: TVMRequirement, why: str) -> UnsupportedError:
    """The error ``load_module`` raises for a library that needs TVM where TVM is not usable."""
    return UnsupportedError(
        f"cannot load {name}: it is {need.describe()}, which this TVM-free server cannot run ({why}). "
        f"The server needs apache-tvm: install it on the device ({INSTALL_HINT}) and restart the server"
        + (f" without {NO_TVM_ENV}" if tvm_disabled() else "")
        + (f"; or register {', '.join(repr(f) for f in need.functions)} on the server with "
           "workbench.rpc.register_func (e.g. in server_init_callback)" if need.functions else "")
        + "; or export kernels with tvm.compile(...).export_library, which run without TVM"
    )


def load_with_tvm(path: str, name: str, need: TVMRequirement | None = None) -> "TVMModule":
    """Load ``path`` through TVM's runtime (imported here), or raise UnsupportedError naming what it needs."""
    need = need or tvm_requirement(path) or TVMRequirement("a TVM library")
    tvm, why = _import_tvm()
    if tvm is None:
        raise refusal(name, need, why)
    try:
        lib = tvm.runtime.load_module(path)
    except Exception as exc:
        raise RemoteError(f"TVM's runtime cannot load {name}: {_tvm_message(exc)}") from None
    log.info("loaded %s through TVM %s: %s", name, tvm.__version__, need.describe())
    return TVMModule(tvm, lib, path, name, need)


# -- calling into TVM ------------------------------------------------------------------------
def _tvm_message(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class TVMModule:
    """A library loaded by TVM's runtime: ``names``, ``entry_name`` and ``get_function`` as ``NativeLibrary``."""

    def __init__(self, tvm: Any, lib: Any, path: str, name: str, need: TVMRequirement):
        self.path = name
        self.requirement = need
        self._tvm = tvm
        self._lib = lib
        self._tensors: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
        self._vm = None
        if lib.kind == VM_EXECUTABLE:
            from tvm import relax

            self._vm = relax.VirtualMachine(relax.VMExecutable(lib), tvm.cpu())
            self.names = self._vm_functions(relax.VMExecutable(lib))
        else:
            self.names = exported_kernels(path)

    @staticmethod
    def _vm_functions(executable: Any) -> list[str]:
        """The Relax functions of the executable: its bytecode's ``@name:`` blocks (not builtins or TIR kernels)."""
        return sorted(set(re.findall(r"^@([^:\s]+):", executable.as_text(), re.M))) or ["main"]

    @property
    def entry_name(self) -> str | None:
        if "main" in self.names:
            return "main"
        return self.names[0] if len(self.names) == 1 else None

    def get_function(self, name: str) -> "TVMFunction":
        if name not in self.names:
            listing = ", ".join(self.names) or "none found"
            raise FunctionNotFoundError(f"no function named {name!r} in {self.path} (it has: {listing})")
        if self._vm is not None:
            arity = int(self._vm.module["get_function_arity"](name))
            return TVMFunction(self, name, self._vm[name], arity)
        return TVMFunction(self, name, self._lib[name], None)

    def to_tvm(self, value: Any) -> Any:
        """A session value as TVM takes it: a DeviceTensor becomes a TVM tensor over the same memory (DLPack)."""
        if getattr(value, "dltensor", None) is None:
            return value
        cached = self._tensors.get(value)
        if cached is None:
            cached = self._tvm.runtime.from_dlpack(value.numpy())  # page-aligned memory: no copy
            self._tensors[value] = cached
        return cached

    def __repr__(self) -> str:
        return f"<TVMModule {self.path} ({self._lib.kind}) functions={self.names}>"


class _Plan:
    """What calls of a ``TVMFunction`` with the same argument objects need, made on the first of them.

    ``inputs``: the TVM views of the input tensors; ``views`` and ``shapes``: the TVM views of
    the output tensors and the shape each result must have; ``result_type``: the type of the
    result on the first call (a TVM tensor, or the array a tuple comes back as, with
    ``item_types`` the types of its tensors); ``refs``: weak references to the arguments.
    """

    __slots__ = ("inputs", "views", "shapes", "result_type", "item_types", "refs")

    def __init__(self, inputs: tuple, views: tuple, shapes: tuple, result_type: type | None,
                 item_types: tuple | None, refs: list):
        self.inputs = inputs
        self.views = views
        self.shapes = shapes
        self.result_type = result_type
        self.item_types = item_types
        self.refs = refs


class TVMFunction:
    """A function of a ``TVMModule``, called with session values.

    A kernel library's function takes its outputs as arguments (as ours do). A Relax
    function returns new tensors: pass a tensor for each, after the inputs, and the
    results are written there (``mod["main"](x, w1, w2, out)``).

    The first call with a given set of tensors checks everything and makes a plan (the
    TVM views of the tensors, the shapes of the results); later calls with the same tensor
    objects make one TVM call and one TVM copy per result, still checking each result's
    shape (it may depend on the data; its dtype is fixed by the function and checked on the
    first call). The views share the tensors' memory, so data written between calls is
    read. A plan holds its tensors weakly: it is dropped when one of them is freed, so an id
    reused by a new tensor never meets an old plan.
    """

    MAX_PLANS = 64  # per function; the oldest goes first (a plan also goes when one of its tensors does)

    def __init__(self, module: TVMModule, name: str, fn: Any, arity: int | None):
        self.module = module
        self.name = name
        self.__qualname__ = name
        self._fn = fn
        self._arity = arity
        self._plans: dict[tuple[int, ...], _Plan] = {}
        copy = module._tvm.get_global_func("runtime.TVMTensorCopyFromTo", allow_missing=True)
        self._copy = copy if copy is not None else (lambda src, dst: src.copyto(dst))

    def __call__(self, *args: Any) -> Any:
        plan = self._plans.get(tuple(map(id, args)))
        if plan is None:
            return self._first_call(args)
        try:
            result = self._fn(*plan.inputs)
        except Exception as exc:
            raise RemoteError(f"{self.name}: {_tvm_message(exc)}") from None
        views = plan.views
        if plan.item_types is None:
            if not views:  # a kernel: it wrote its outputs itself
                if result is None:
                    return None
            elif type(result) is plan.result_type and result.shape == plan.shapes[0]:
                self._copy(result, views[0])
                return None
        elif type(result) is plan.result_type and self._copy_all(tuple(result), plan):
            return None
        return self._finish(result, args)  # anything unplanned: the checks (and errors) of a first call

    def runner(self, args: tuple) -> Callable[[int], float]:
        """``run(n)`` for ``time_evaluator``: the seconds ``n`` calls with ``args`` take, as ``python_runner``.

        Each call does what ``self(*args)`` does; once the first call has made a plan, the
        loop runs the plan's TVM call and copy without looking it up again (the per-call
        overhead is what the timing reports on top of TVM's own).

            >>> run = mod.get_function("main").runner((x, w1, w2, out))   # doctest: +SKIP
            >>> run(100) / 100                                             # doctest: +SKIP
            1.2e-05
        """
        key = tuple(map(id, args))

        def run(n: int) -> float:
            plan = self._plans.get(key)
            if plan is None or plan.item_types is not None or len(plan.views) > 1:
                start = time.perf_counter()
                for _ in range(n):
                    self(*args)  # not planned (yet), or several results: the call as it is
                return time.perf_counter() - start
            fn, inputs, copy, finish, name = self._fn, plan.inputs, self._copy, self._finish, self.name
            if not plan.views:  # a kernel: it writes its outputs itself and returns nothing
                start = time.perf_counter()
                for _ in range(n):
                    try:
                        result = fn(*inputs)
                    except Exception as exc:
                        raise RemoteError(f"{name}: {_tvm_message(exc)}") from None
                    if result is not None:
                        finish(result, args)
                return time.perf_counter() - start
            view, shape, result_type = plan.views[0], plan.shapes[0], plan.result_type
            start = time.perf_counter()
            for _ in range(n):
                try:
                    result = fn(*inputs)
                except Exception as exc:
                    raise RemoteError(f"{name}: {_tvm_message(exc)}") from None
                if type(result) is result_type and result.shape == shape:
                    copy(result, view)
                else:
                    finish(result, args)  # the checks (and errors) of a first call
            return time.perf_counter() - start

        return run

    def _copy_all(self, results: tuple, plan: _Plan) -> bool:
        """Copy each result to its view if all are tensors of the planned types and shapes; else copy nothing."""
        if len(results) != len(plan.views):
            return False
        for got, kind, shape in zip(results, plan.item_types, plan.shapes):
            if type(got) is not kind or got.shape != shape:
                return False
        for got, view in zip(results, plan.views):
            self._copy(got, view)
        return True

    def _first_call(self, args: tuple) -> Any:
        """A call with tensors not seen together before: every check, then a plan for the next calls."""
        module = self.module
        arity = self._arity
        if arity is not None and len(args) < arity:
            raise BadRequestError(f"{self.name} of {module.path} takes {arity} inputs (then a tensor for each "
                                  f"output), got {len(args)} arguments")
        inputs = tuple(module.to_tvm(a) for a in (args if arity is None else args[:arity]))
        try:
            result = self._fn(*inputs)
        except Exception as exc:
            raise RemoteError(f"{self.name}: {_tvm_message(exc)}") from None
        value = self._finish(result, args)
        self._plan(args, inputs, result)
        return value

    def _finish(self, result: Any, args: tuple) -> Any:
        if self._arity is None:
            return _plain(result, self.name)
        return self._deliver(result, args[self._arity:])

    def _plan(self, args: tuple, inputs: tuple, result: Any) -> None:
        """Remember ``inputs`` and the output views for calls with the same ``args`` (all tensors; else no plan)."""
        if not all(getattr(a, "dltensor", None) is not None for a in args):
            return  # plain values (numbers, strings) are not planned: the general path takes them
        item_types = None
        if self._arity is None:
            if result is not None:
                return
            views, shapes, result_type = (), (), None
        else:
            outs = args[self._arity:]
            if not outs:
                return  # a plain result (a number, a string): nothing to copy, the general path returns it
            views = tuple(self.module.to_tvm(o) for o in outs)
            shapes = tuple(tuple(o.shape) for o in outs)
            result_type = type(result)
            if not hasattr(result, "__dlpack__"):  # a tuple of tensors (not nested: _deliver has checked them)
                items = tuple(result)
                if len(items) != len(outs) or not all(hasattr(r, "__dlpack__") for r in items):
                    return
                item_types = tuple(type(r) for r in items)
        key = tuple(map(id, args))
        plans = self._plans

        def forget(_ref: Any, key: tuple = key) -> None:
            plans.pop(key, None)  # one of the tensors died: its id may be reused by another object

        try:
            refs = [weakref.ref(a, forget) for a in args]
        except TypeError:
            return
        while len(plans) >= self.MAX_PLANS:
            plans.pop(next(iter(plans)))
        plans[key] = _Plan(inputs, views, shapes, result_type, item_types, refs)

    def _deliver(self, result: Any, outs: tuple) -> Any:
        """Write the tensors of ``result`` into ``outs`` (one copy each); return a plain value as it is."""
        import numpy as np

        flat = _flatten(result)
        tensors = [r for r in flat if hasattr(r, "__dlpack__")]
        if not tensors:
            if outs:
                raise BadRequestError(f"{self.name} returns no tensor, but got {len(outs)} output argument(s)")
            return _plain(result, self.name)
        if len(outs) != len(tensors) or len(tensors) != len(flat):
            shapes = ", ".join(f"{r.dtype}{list(r.shape)}" for r in tensors)
            raise BadRequestError(
                f"{self.name} of {self.module.path} returns {len(flat)} value(s) ({shapes}); pass a tensor for "
                f"each after the inputs, e.g. out = runtime.empty(shape, dtype, dev); "
                f"mod[{self.name!r}](*inputs, out)" + (f" (got {len(outs)})" if outs else "")
            )
        for i, (got, out) in enumerate(zip(tensors, outs)):
            if getattr(out, "dltensor", None) is None:
                raise BadRequestError(f"{self.name}: output argument {i} must be a tensor, not {type(out).__name__}")
            source = np.from_dlpack(got)
            target = out.numpy()
            if source.shape != target.shape or source.dtype != target.dtype:
                raise BadRequestError(f"{self.name}: output {i} is {source.dtype}{list(source.shape)}, the tensor "
                                      f"passed for it is {target.dtype}{list(target.shape)}")
            np.copyto(target, source)
        return None

    def __repr__(self) -> str:
        return f"<TVMFunction {self.name} of {self.module.path}>"


def _flatten(value: Any) -> list:
    if hasattr(value, "__dlpack__") or isinstance(value, (str, bytes)):
        return [value]
    try:
        items = list(value)
    except TypeError:
        return [value]
    return [leaf for item in items for leaf in _flatten(item)]


def _plain(value: Any, name: str) -> Any:
    """A TVM return value as the protocol carries it (None, a number, a string, bytes)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    raise BadRequestError(f"{name} returned a {type(value).__name__}, which cannot be sent back; "
                          "return tensors through output arguments")
