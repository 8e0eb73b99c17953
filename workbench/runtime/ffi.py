"""The kernel ABI (TVM FFI packed C ABI) through ctypes: no TVM needed.

A kernel is ``int __tvm_ffi_<name>(void* self, const TVMFFIAny* args,
int32_t nargs, TVMFFIAny* ret)``. Kernel libraries resolve their one runtime
symbol, ``TVMFFIErrorSetRaisedFromCStrParts``, against our shim, which is
loaded RTLD_GLOBAL before any kernel.

TVM-exported libraries also *define* context slots (``__TVMBackendParallelLaunch``,
``__TVMBackendAllocWorkspace``, ``__tvm_ffi__library_ctx``, ...): pointers that
TVM's loader fills after ``dlopen`` and that kernels call through. Every library
loaded here gets each slot filled (``fill_context_slots``): with the shim's thread
pool, workspace allocator and friends, or, for a runtime function this TVM-free
runtime does not have, with a stub that fails the call with an error naming it.
A kernel's runtime calls (``T.call_packed("name", ...)``, looked up through
``__TVMFFIEnvModLookupFromImports``) reach the functions registered in this process
with ``workbench.rpc.register_func``: tensors arrive as ``KernelTensor`` views of
the kernel's memory (``.numpy()`` writes through), scalars as Python numbers.

    >>> lib = NativeLibrary("add_one.so")          # doctest: +SKIP
    >>> lib.get_function("add_one")(a, b)         # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
from typing import Any, Iterator, NamedTuple, Sequence

from ..errors import (
    BadRequestError,
    CallCancelledError,
    FunctionNotFoundError,
    KernelCrashedError,
    RemoteError,
    RemoteTypeError,
)
from .timer import MAX_CACHE_FLUSH_BYTES  # time_evaluator's cache_flush_bytes: 1 GiB covers every cache there is

log = logging.getLogger(__name__)

KERNEL_PREFIX = "__tvm_ffi_"

# TVM FFI type indices (tvm/ffi/c_api.h)
TYPE_NONE, TYPE_INT, TYPE_BOOL, TYPE_FLOAT, TYPE_OPAQUE_PTR = 0, 1, 2, 3, 4
TYPE_DLTENSOR_PTR, TYPE_RAW_STR, TYPE_BYTE_ARRAY_PTR = 7, 8, 9


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _AnyValue(ctypes.Union):
    _fields_ = [("v_int64", ctypes.c_int64), ("v_float64", ctypes.c_double), ("v_ptr", ctypes.c_void_p)]


class TVMFFIAny(ctypes.Structure):
    _anonymous_ = ("value",)
    _fields_ = [("type_index", ctypes.c_int32), ("zero_padding", ctypes.c_uint32), ("value", _AnyValue)]


class ByteArray(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("size", ctypes.c_size_t)]


PackedFunc = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(TVMFFIAny), ctypes.c_int32, ctypes.POINTER(TVMFFIAny)
)


class KernelError(RemoteError):
    """A kernel returned an error (its own message is the exception text)."""


class KernelTypeError(KernelError, RemoteTypeError):
    """A kernel failed with a TypeError: a checked argument (``WB_ARG_TENSOR_OF``...) or ``WB_FAIL("TypeError", ...)``."""


_CRASHED, _CANCELLED, _INTERRUPTED = "KernelCrashed: ", "Cancelled: ", "Interrupted: "  # set by the guard


def _kernel_error(name: str) -> RemoteError | KeyboardInterrupt:
    """The exception for the kernel ``name`` that failed: a TypeError kind stays a TypeError,
    a kernel that died is a KernelCrashedError, one stopped after a cancel a CallCancelledError,
    one stopped by Ctrl-C in this process (``sigint_stops_kernels``) a KeyboardInterrupt.

        >>> isinstance(KernelTypeError("add_one: TypeError: expected 2 arguments, got 1"), TypeError)
        True
    """
    text = _last_error()
    if text.startswith(_CRASHED):
        return KernelCrashedError(
            f"{name}: {text[len(_CRASHED):]}; the session, its tensors (with what the kernel wrote) and its "
            "modules are intact: fix the kernel and call again")
    if text.startswith(_CANCELLED):
        return CallCancelledError(f"{name}: {text[len(_CANCELLED):]}")
    if text.startswith(_INTERRUPTED):
        return KeyboardInterrupt(f"{name}: {text[len(_INTERRUPTED):]}")
    return (KernelTypeError if text.startswith("TypeError: ") else KernelError)(f"{name}: {text}")


# -- the shim ------------------------------------------------------------------
_shim_lock = threading.Lock()
_shim: ctypes.CDLL | None = None
# The newest symbol of the shim (kernel_runtime.c): a built shim without it is stale (built before the source changed).
_SHIM_NEWEST_SYMBOL = "wb_guard_prepare"
_NATIVE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "native")


def _shim_source() -> str:
    """The extension wrapper; the runtime itself is ``_shim_sources()[1]`` (shared with minrpc)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shim.c")


def _shim_sources() -> list[str]:
    """Every file the shim is built from: the wrapper, the kernel runtime, and its header (for staleness)."""
    return [
        _shim_source(),
        os.path.join(_NATIVE_DIR, "kernel_runtime.c"),
        os.path.join(_NATIVE_DIR, "kernel_runtime.h"),
    ]


def _build_shim() -> str:
    """Compile the shim where the package was copied without being pip-installed.

    Rebuilt whenever one of ``_shim_sources()`` is newer than the cached build.
    """
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "workbench")
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, f"wbshim-{sys.implementation.cache_tag}-{os.uname().machine}.so")
    sources = _shim_sources()
    newest = max(os.path.getmtime(path) for path in sources)
    if os.path.exists(out) and os.path.getmtime(out) >= newest:
        return out
    cc = os.environ.get("CC", "cc")
    tmp = tempfile.NamedTemporaryFile(dir=cache, suffix=".so", delete=False).name
    cmd = [cc, "-shared", "-fPIC", "-O2", "-pthread", "-I", sysconfig.get_paths()["include"], "-I", _NATIVE_DIR,
           "-o", tmp, *[path for path in sources if path.endswith(".c")]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(
            "the kernel-ABI shim is not built and compiling it failed; reinstall the package "
            f"with `pip install rpc-workbench` (or `pip install -e .`):\n{' '.join(cmd)}\n{proc.stderr}"
        )
    os.replace(tmp, out)
    return out


def shim() -> ctypes.CDLL:
    """Load the shim RTLD_GLOBAL (once per process) and return it."""
    global _shim
    with _shim_lock:
        if _shim is None:
            spec = importlib.util.find_spec("workbench.runtime._shim")
            path = spec.origin if spec and spec.origin and spec.origin.endswith(".so") else None
            if path is None or _SHIM_NEWEST_SYMBOL not in dynamic_symbols(path):
                path = _build_shim()  # not built, or built from older sources: never load that one
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            lib.wb_last_error.restype = ctypes.c_char_p
            lib.wb_time_calls.argtypes = [
                ctypes.c_void_p, ctypes.POINTER(TVMFFIAny), ctypes.c_int32, ctypes.c_int64,
                ctypes.POINTER(ctypes.c_int64),
            ]
            lib.wb_time_calls_flushed.argtypes = [
                ctypes.c_void_p, ctypes.POINTER(TVMFFIAny), ctypes.c_int32, ctypes.c_int64, ctypes.c_int64,
                ctypes.POINTER(ctypes.c_int64),
            ]
            lib.wb_flush_cache.argtypes = [ctypes.c_int64]
            lib.wb_cache_flushes.restype = ctypes.c_int64
            lib.wb_cache_flushed_bytes.restype = ctypes.c_int64
            lib.wb_new_library_ctx.restype = ctypes.c_void_p
            lib.wb_new_library_ctx.argtypes = [ctypes.c_char_p]
            lib.wb_missing_function_stub.restype = ctypes.c_void_p
            lib.wb_missing_function_stub.argtypes = [ctypes.c_char_p]
            lib.wb_workspace_mallocs.restype = ctypes.c_int64
            lib.wb_raise.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            lib.wb_raise.restype = None
            lib.wb_guarded_call.argtypes = [
                ctypes.c_void_p, ctypes.POINTER(TVMFFIAny), ctypes.c_int32, ctypes.POINTER(TVMFFIAny),
            ]
            lib.wb_guard_running.restype = ctypes.c_int64
            lib.wb_guard_interrupt.argtypes = [ctypes.c_int64]
            lib.wb_guard_suspend.restype = ctypes.c_void_p
            lib.wb_guard_resume.argtypes = [ctypes.c_void_p]
            lib.wb_guard_resume.restype = None
            lib.wb_guard_faults.restype = ctypes.c_int64
            lib.wb_guard_watch.argtypes = [ctypes.c_int, ctypes.c_int64]
            lib.wb_guard_library.argtypes = [ctypes.c_void_p]
            lib.wb_guard_sigint.argtypes = [ctypes.c_int]
            lib.wb_set_function_resolver.argtypes = [_Resolver]
            lib.wb_set_function_resolver.restype = None
            lib.wb_set_function_resolver(_resolver)
            # The guard's handlers go in now, before this process loads a library that saves the handlers it
            # finds and later puts them back (PoCL's LLVM does on Ctrl-C): it must find ours (kernel_runtime.h).
            lib.wb_guard_prepare()
            _shim = lib
        return _shim


_guarded: Any = None


def guarded_call() -> Any:
    """``wb_guarded_call(fn, args, nargs, ret)`` as a PackedFunc (its signature, with ``fn`` where ``self`` is):
    calling it costs what calling a kernel's own pointer costs (kernel_runtime.h, guarded calls).

        >>> guarded_call()(kernel_address, args, nargs, ctypes.byref(ret))  # doctest: +SKIP
        0
    """
    global _guarded
    if _guarded is None:
        _guarded = PackedFunc(ctypes.cast(shim().wb_guarded_call, ctypes.c_void_p).value)
    return _guarded


@contextlib.contextmanager
def sigint_stops_kernels() -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) stops a native kernel that runs in this process: its call raises
    KeyboardInterrupt and the process goes on (``LocalSession``). Outside a kernel, SIGINT does what it did.

        >>> with sigint_stops_kernels():
        ...     pass
    """
    if threading.current_thread() is not threading.main_thread():  # signals are the main thread's
        yield
        return
    lib = shim()
    lib.wb_guard_sigint(1)
    try:
        yield
    finally:
        lib.wb_guard_sigint(0)


def flush_cache(nbytes: int) -> None:
    """Evict ``nbytes`` worth of data caches by writing a buffer of that size (in C, on this device).

        >>> flush_cache(1 << 20)
    """
    if nbytes <= 0:
        return
    if nbytes > MAX_CACHE_FLUSH_BYTES:
        raise BadRequestError(f"cache_flush_bytes must be 0..{MAX_CACHE_FLUSH_BYTES}, not {nbytes}")
    if shim().wb_flush_cache(nbytes) != 0:
        raise RemoteError(f"cannot allocate the {nbytes}-byte buffer for cache_flush_bytes on this device")


def cache_flush_stats() -> tuple[int, int]:
    """How many cache flushes this process ran, and how many bytes they wrote (for tests and diagnostics)."""
    lib = shim()
    return int(lib.wb_cache_flushes()), int(lib.wb_cache_flushed_bytes())


def thread_pool_size() -> int:
    """How many threads a kernel's ``parallel`` loop runs on in this process (the pool starts if needed).

    ``TVM_NUM_THREADS``, else ``OMP_NUM_THREADS``, else the CPUs in this process's affinity mask,
    read once when the pool starts (per process: a forked worker starts its own).

        >>> thread_pool_size() >= 1
        True
    """
    return int(shim().wb_thread_pool_size())


def workspace_mallocs() -> int:
    """How many kernel workspaces this process took from the system allocator (not its per-thread cache)."""
    return int(shim().wb_workspace_mallocs())


# -- runtime functions a kernel calls by name (T.call_packed) -----------------------------
_DL_NUMPY = {0: "int", 1: "uint", 2: "float", 5: "complex"}


class KernelTensor:
    """A tensor a kernel passes to a registered function: a view of the kernel's memory, valid during the call.

    ``numpy()`` is a zero-copy numpy array over it (writes reach the kernel's tensor);
    ``shape``, ``dtype`` (``"float32"``...), ``dltensor`` (the DLPack struct).

        >>> @rpc.register_func("tests.fill")                       # doctest: +SKIP
        ... def fill(t, value):
        ...     t.numpy()[:] = value
    """

    def __init__(self, address: int):
        self.dltensor = DLTensor.from_address(address)
        dl = self.dltensor
        self.shape = tuple(int(dl.shape[i]) for i in range(dl.ndim))
        code, bits, lanes = dl.dtype.code, dl.dtype.bits, dl.dtype.lanes
        base = "bool" if code == 6 else f"{_DL_NUMPY.get(code, f'code{code}_')}{bits}"
        self.dtype = base if lanes == 1 else f"{base}x{lanes}"
        self._np_dtype = _numpy_dtype(code, bits, lanes)

    def numpy(self):
        """A numpy array over the tensor's memory (no copy; writable)."""
        import numpy as np

        if self._np_dtype is None:
            raise TypeError(f"a {self.dtype} tensor has no numpy dtype; use .dltensor")
        dl, dt = self.dltensor, np.dtype(self._np_dtype)
        count = 1
        for n in self.shape:
            count *= n
        if count == 0 or not dl.data:
            return np.empty(self.shape, dt)
        start = dl.data + dl.byte_offset
        if not dl.strides:
            raw = (ctypes.c_uint8 * (count * dt.itemsize)).from_address(start)
            return np.frombuffer(raw, dtype=dt).reshape(self.shape)
        strides = [int(dl.strides[i]) for i in range(dl.ndim)]
        if any(s < 0 for s in strides):
            raise TypeError("a tensor with negative strides cannot be viewed from numpy here; use .dltensor")
        extent = 1 + sum((n - 1) * s for n, s in zip(self.shape, strides))
        raw = (ctypes.c_uint8 * (extent * dt.itemsize)).from_address(start)
        flat = np.frombuffer(raw, dtype=dt)
        return np.lib.stride_tricks.as_strided(flat, self.shape, [s * dt.itemsize for s in strides])

    def __repr__(self) -> str:
        return f"<KernelTensor shape={self.shape} dtype={self.dtype}>"


def _numpy_dtype(code: int, bits: int, lanes: int) -> str | None:
    if lanes != 1:
        return None
    if code == 6:
        return "bool" if bits == 8 else None
    if code in _DL_NUMPY and bits in (8, 16, 32, 64, 128) and not (code == 5 and bits < 64):
        return f"{_DL_NUMPY[code]}{bits}"
    return None


def _from_any(arg: "TVMFFIAny", i: int, name: str) -> Any:
    t = arg.type_index
    if t == TYPE_DLTENSOR_PTR:
        return KernelTensor(arg.v_ptr)
    if t == TYPE_INT:
        return int(arg.v_int64)
    if t == TYPE_BOOL:
        return bool(arg.v_int64)
    if t == TYPE_FLOAT:
        return float(arg.v_float64)
    if t == TYPE_NONE:
        return None
    if t == TYPE_RAW_STR:
        return ctypes.string_at(arg.v_ptr).decode("utf-8", "replace") if arg.v_ptr else ""
    if t == TYPE_BYTE_ARRAY_PTR:
        ba = ByteArray.from_address(arg.v_ptr)
        return ctypes.string_at(ba.data, ba.size)
    if t == TYPE_OPAQUE_PTR:
        return int(arg.v_ptr or 0)
    raise TypeError(
        f"argument {i} of the kernel's call to {name!r} has TVM FFI type {t}, which a function registered "
        "on this TVM-free server cannot take (it takes tensors, ints, floats, bools, strings and bytes)"
    )


def _to_any(value: Any, ret: "TVMFFIAny", name: str) -> None:
    import numbers

    if value is None:
        ret.type_index, ret.v_int64 = TYPE_NONE, 0
    elif isinstance(value, bool):
        ret.type_index, ret.v_int64 = TYPE_BOOL, int(value)
    elif isinstance(value, numbers.Integral) and _I64_MIN <= int(value) <= _I64_MAX:
        ret.type_index, ret.v_int64 = TYPE_INT, int(value)
    elif isinstance(value, numbers.Real):
        ret.type_index, ret.v_float64 = TYPE_FLOAT, float(value)
    else:
        raise TypeError(
            f"{name!r} returned {type(value).__name__}, which a kernel cannot receive; "
            "return None, a bool, an int (int64) or a float"
        )


def _kernel_call(name: str):
    """The packed function a kernel calls for ``name``: the function registered under it at call time."""

    def call(_self, args, nargs, ret):
        guard = shim().wb_guard_suspend()  # a fault or a cancel must never unwind through Python's frames
        try:
            from .registry import get_global_func

            func = get_global_func(name)
            values = [_from_any(args[i], i, name) for i in range(nargs)]
            result = func(*values)
            if ret:
                _to_any(result, ret[0], name)
            return 0
        except BaseException as exc:  # a Python error must never unwind through the kernel's C frames
            text = f"{name}: {type(exc).__name__}: {exc}" if str(exc) else f"{name}: {type(exc).__name__}"
            shim().wb_raise(b"RuntimeError", text.encode("utf-8", "replace"))
            return -1
        finally:
            shim().wb_guard_resume(guard)

    return PackedFunc(call)


_Resolver = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p))
_kernel_calls: dict[str, Any] = {}  # name -> PackedFunc, alive for the process (kernels keep the handle)
_kernel_calls_lock = threading.Lock()


def _resolve(name_p: bytes, out) -> int:
    """TVMFFIEnvModLookupFromImports: 0 and the packed function for a registered name, 1 for none."""
    try:
        from .registry import is_registered

        name = name_p.decode("utf-8", "replace")
        if not is_registered(name):
            return 1
        with _kernel_calls_lock:
            fn = _kernel_calls.get(name)
            if fn is None:
                fn = _kernel_calls[name] = _kernel_call(name)
        out[0] = ctypes.cast(fn, ctypes.c_void_p).value
        log.debug("a kernel looked up the registered function %r", name)
        return 0
    except BaseException as exc:
        shim().wb_raise(b"RuntimeError", f"looking up a runtime function failed: {exc}".encode("utf-8", "replace"))
        return -1


_resolver = _Resolver(_resolve)


# -- context slots ---------------------------------------------------------------------
# slot name -> the shim function that fills it (TVM's context functions, tvm/runtime/c_backend_api.h and
# tvm/ffi/c_api.h); any other __TVM* slot gets a stub that fails naming it.
_SLOT_FUNCTIONS = {
    "__TVMBackendParallelLaunch": "wb_parallel_launch",
    "__TVMBackendParallelBarrier": "wb_parallel_barrier",
    "__TVMBackendAllocWorkspace": "wb_alloc_workspace",
    "__TVMBackendFreeWorkspace": "wb_free_workspace",
    "__TVMFFIErrorSetRaisedFromCStr": "TVMFFIErrorSetRaisedFromCStr",
    "__TVMFFIErrorSetRaisedFromCStrParts": "TVMFFIErrorSetRaisedFromCStrParts",
    "__TVMFFIHandleInitOnce": "wb_handle_init_once",
    "__TVMFFIEnvModLookupFromImports": "wb_env_mod_lookup_from_imports",
    "__TVMFFIFunctionCall": "wb_ffi_function_call",
}
LIBRARY_CTX_SLOT = "__tvm_ffi__library_ctx"


def fill_context_slots(lib: ctypes.CDLL, slots: Sequence[str], name: str) -> dict[str, str]:
    """Write into each of ``slots`` (context slots ``lib`` defines) what TVM's loader would.

    Returns ``{slot: what filled it}`` (a shim function, ``"library context"`` or
    ``"missing: <function>"``), for logs and tests. Never leaves a slot at 0.

        >>> fill_context_slots(ctypes.CDLL("argsort.so"), ["__TVMFFIFunctionCall"], "argsort.so")  # doctest: +SKIP
        {'__TVMFFIFunctionCall': 'wb_ffi_function_call'}
    """
    native = shim()
    filled: dict[str, str] = {}
    for slot in slots:
        if slot == LIBRARY_CTX_SLOT:
            address = native.wb_new_library_ctx(name.encode("utf-8", "replace"))
            what = "library context"
        elif slot in _SLOT_FUNCTIONS:
            address = ctypes.cast(getattr(native, _SLOT_FUNCTIONS[slot]), ctypes.c_void_p).value
            what = _SLOT_FUNCTIONS[slot]
        else:
            address = native.wb_missing_function_stub(slot[2:].encode())
            what = f"missing: {slot[2:]}"
        if not address:
            raise RemoteError(f"cannot fill the context slot {slot} of {name}: out of memory")
        ctypes.c_void_p.in_dll(lib, slot).value = address
        filled[slot] = what
    if filled:
        log.debug("filled the context slots of %s: %s", name, filled)
    return filled


def _last_error() -> str:
    lib = shim()
    text = (lib.wb_last_error() or b"").decode("utf-8", "replace")
    lib.wb_clear_error()
    return text or "the kernel returned an error without a message"


# -- arguments -------------------------------------------------------------------
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def pack_args(args: Sequence[Any]) -> tuple[ctypes.Array, list]:
    """Build the TVMFFIAny array for ``args``; the list keeps buffers alive.

    A value a kernel cannot take exactly (a list, an int outside int64, a string
    with a NUL) is a BadRequestError, never silently changed.
    """
    arr = (TVMFFIAny * max(len(args), 1))()
    keep: list = []
    for i, value in enumerate(args):
        slot = arr[i]
        dl = getattr(value, "dltensor", None)
        if dl is not None:
            slot.type_index = TYPE_DLTENSOR_PTR
            slot.v_ptr = ctypes.addressof(dl)
        elif value is None:
            slot.type_index = TYPE_NONE
        elif isinstance(value, bool):
            slot.type_index, slot.v_int64 = TYPE_BOOL, int(value)
        elif isinstance(value, int):
            if not _I64_MIN <= value <= _I64_MAX:
                raise BadRequestError(f"argument {i}: {value} does not fit a kernel's int64 argument")
            slot.type_index, slot.v_int64 = TYPE_INT, value
        elif isinstance(value, float):
            slot.type_index, slot.v_float64 = TYPE_FLOAT, value
        elif isinstance(value, str):
            if "\0" in value:
                raise BadRequestError(f"argument {i}: a kernel takes strings as C strings, which cannot hold a NUL")
            buf = ctypes.create_string_buffer(value.encode())
            keep.append(buf)
            slot.type_index, slot.v_ptr = TYPE_RAW_STR, ctypes.addressof(buf)
        elif isinstance(value, (bytes, bytearray)):
            buf = ctypes.create_string_buffer(bytes(value), len(value))
            ba = ByteArray(ctypes.addressof(buf), len(value))
            keep += [buf, ba]
            slot.type_index, slot.v_ptr = TYPE_BYTE_ARRAY_PTR, ctypes.addressof(ba)
        else:
            raise BadRequestError(
                f"argument {i}: a kernel cannot take a {type(value).__name__}; "
                "pass tensors, ints, floats, bools, strings or bytes"
            )
    return arr, keep


def _decode_ret(ret: TVMFFIAny) -> Any:
    t = ret.type_index
    if t == TYPE_NONE:
        return None
    if t == TYPE_INT:
        return int(ret.v_int64)
    if t == TYPE_BOOL:
        return bool(ret.v_int64)
    if t == TYPE_FLOAT:
        return float(ret.v_float64)
    log.warning("kernel returned a value of FFI type %d, which is not supported; returning None", t)
    return None


class NativeFunction:
    """A kernel in a loaded library, callable with server-side values."""

    def __init__(self, name: str, address: int, library: "NativeLibrary"):
        self.name = name
        self.address = address
        self.library = library  # keeps the library loaded
        self._call = guarded_call()  # a kernel that faults or exits fails its call, not the process
        self._fn = ctypes.c_void_p(address)  # passed as it is (no conversion per call)

    def __call__(self, *args: Any) -> Any:
        arr, _keep = pack_args(args)
        ret = TVMFFIAny()
        if self._call(self._fn, arr, len(args), ctypes.byref(ret)) != 0:
            raise _kernel_error(self.name)
        return _decode_ret(ret)

    def time_calls(self, args: Sequence[Any], number: int, cache_flush_bytes: int = 0) -> float:
        """Seconds that ``number`` back-to-back calls take, timed in C.

        ``cache_flush_bytes`` > 0: first write that many bytes (in C, just before the clock starts)
        so that the calls start with cold caches.
        """
        arr, _keep = pack_args(args)
        elapsed = ctypes.c_int64()
        if cache_flush_bytes:
            if not 0 < cache_flush_bytes <= MAX_CACHE_FLUSH_BYTES:
                raise BadRequestError(f"cache_flush_bytes must be 0..{MAX_CACHE_FLUSH_BYTES}, not {cache_flush_bytes}")
            rc = shim().wb_time_calls_flushed(self.address, arr, len(args), number, cache_flush_bytes, ctypes.byref(elapsed))
        else:
            rc = shim().wb_time_calls(self.address, arr, len(args), number, ctypes.byref(elapsed))
        if rc != 0:
            raise _kernel_error(self.name)
        return elapsed.value / 1e9

    def __repr__(self) -> str:
        return f"<NativeFunction {self.name} in {self.library.path}>"


class NativeLibrary:
    """A shared object of kernels.

    ``path=None`` is the server process itself: every library opened with
    ``global_scope=True`` (the server's --load-library files), as TVM's system lib.
    """

    def __init__(self, path: str | None, global_scope: bool = False, name: str | None = None):
        shim()
        self.path = name or path or "<system lib>"
        mode = ctypes.RTLD_GLOBAL if path is None or global_scope else ctypes.RTLD_LOCAL
        try:
            self._lib = ctypes.CDLL(path, mode=mode)
        except OSError as exc:
            shown = os.path.basename(self.path)  # the loader names the private copy: say the user's name
            text = str(exc).replace(path, shown) if path else str(exc)
            raise RemoteError(f"cannot load {shown}: {text}") from None
        if path and shim().wb_guard_library(self._lib._handle) != 0:  # exit() in a kernel fails its call
            log.warning("cannot read %s's dynamic section: exit() in its kernels ends the process", self.path)
        self.names = exported_kernels(path) if path else []
        self.slots = fill_context_slots(self._lib, context_slots(path), os.path.basename(self.path)) if path else {}

    def get_function(self, name: str) -> NativeFunction:
        try:
            fn = getattr(self._lib, KERNEL_PREFIX + name)
        except AttributeError:
            listing = ", ".join(self.names) or "none found"
            raise FunctionNotFoundError(
                f"no kernel named {name!r} in {os.path.basename(self.path)} "
                f"(it exports: {listing}); kernels are exported as {KERNEL_PREFIX}<name>"
            ) from None
        return NativeFunction(name, ctypes.cast(fn, ctypes.c_void_p).value, self)

    @property
    def entry_name(self) -> str | None:
        """TVM modules alias their entry as ``main``; a one-kernel library's only kernel."""
        if "main" in self.names:
            return "main"
        return self.names[0] if len(self.names) == 1 else None


def exported_kernels(path: str) -> list[str]:
    """Kernel names (``__tvm_ffi_<name>``) in an ELF shared object's dynamic symbols."""
    return sorted(
        raw[len(KERNEL_PREFIX):]
        for raw in dynamic_symbols(path)
        if raw.startswith(KERNEL_PREFIX) and not raw.startswith(KERNEL_PREFIX + "_")
    )


def dynamic_symbols(path: str) -> set[str]:
    """The names an ELF shared object defines in its dynamic symbol table (empty if unreadable)."""
    return {sym.name for sym in _defined_symbols(path)}


STT_OBJECT = 1


def context_slots(path: str) -> list[str]:
    """The context slots an ELF shared object defines: pointer-sized data named ``__TVM*``, and ``__tvm_ffi__library_ctx``.

    (Other ``__tvm_ffi__*`` data, such as ``__tvm_ffi__library_bin``, holds contents, not a slot.)

        >>> context_slots("vadd.so")                        # doctest: +SKIP
        ['__TVMBackendParallelLaunch']
    """
    return sorted(
        sym.name
        for sym in _defined_symbols(path)
        if sym.kind == STT_OBJECT and sym.size == sym.pointer_size
        and (sym.name.startswith("__TVM") or sym.name == LIBRARY_CTX_SLOT)
    )


class ElfSymbol(NamedTuple):
    """A defined dynamic symbol of an ELF file: its type (STT_*), size, the file's pointer size, where its bytes are."""

    name: str
    kind: int
    size: int
    pointer_size: int
    file_offset: int | None  # None for a symbol outside the file's sections (absolute, common)


def _defined_symbols(path: str) -> list[ElfSymbol]:
    """Each defined dynamic symbol of the ELF file at ``path`` (empty if unreadable)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    return elf_dynamic_symbols(data)


def elf_dynamic_symbols(data: bytes) -> list[ElfSymbol]:
    """Each defined dynamic symbol of an ELF image (empty for anything else, or a truncated or odd file)."""
    if data[:4] != b"\x7fELF":
        return []
    try:
        return _dynamic_symbols(data)
    except (struct.error, IndexError, ValueError):
        return []  # no symbols we can trust


def elf_static_symbol_names(data: bytes) -> set[str]:
    """The defined symbols of an ELF image's full symbol table (.symtab; empty when stripped or unreadable)."""
    if data[:4] != b"\x7fELF":
        return set()
    try:
        return {sym.name for sym in _dynamic_symbols(data, section_type=2)}  # SHT_SYMTAB
    except (struct.error, IndexError, ValueError):
        return set()


def _dynamic_symbols(data: bytes, section_type: int = 11) -> list[ElfSymbol]:
    is64 = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    if is64:
        shoff, = struct.unpack_from(end + "Q", data, 0x28)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x3A)
        sh_fmt, sym_fmt = end + "IIQQQQIIQQ", end + "IBBHQQ"
    else:
        shoff, = struct.unpack_from(end + "I", data, 0x20)
        shentsize, shnum = struct.unpack_from(end + "HH", data, 0x2E)
        sh_fmt, sym_fmt = end + "IIIIIIIIII", end + "IIIBBH"
    sections = [struct.unpack_from(sh_fmt, data, shoff + i * shentsize) for i in range(shnum)]
    pointer_size = 8 if is64 else 4
    found = []
    for sec in sections:
        if sec[1] != section_type:  # SHT_DYNSYM unless asked otherwise
            continue
        offset, size, link, entsize = sec[4], sec[5], sec[6], sec[9]
        strtab_off = sections[link][4]
        for j in range(size // entsize if entsize else 0):
            sym = struct.unpack_from(sym_fmt, data, offset + j * entsize)
            if is64:
                name_off, info, shndx, value, sym_size = sym[0], sym[1], sym[3], sym[4], sym[5]
            else:
                name_off, value, sym_size, info, shndx = sym[0], sym[1], sym[2], sym[3], sym[5]
            if shndx == 0:  # undefined
                continue
            name = data[strtab_off + name_off : data.index(b"\0", strtab_off + name_off)].decode(errors="replace")
            at = None
            if shndx < len(sections):  # address -> file offset through the symbol's section
                home = sections[shndx]
                at = value - home[3] + home[4]
                at = at if 0 <= at <= len(data) - sym_size else None
            found.append(ElfSymbol(name, info & 0xF, sym_size, pointer_size, at))
    return found
