"""OpenCL kernel modules: hand-written OpenCL C (``.cl``) and the OpenCL part of a TVM-exported library.

**Hand-written OpenCL C.** ``load_module("vadd.cl")`` builds the file's source
for every OpenCL device of the server (a build error is the compiler's log,
with line numbers) and lists its ``__kernel`` functions. A kernel is called
with its own arguments, then the launch, as ints:

* a ``__global``/``__constant`` pointer takes a tensor on the OpenCL device;
  a ``__local`` pointer takes the size in bytes of the local buffer; a scalar
  (``int``, ``uint``, ``long``, ``float``, ``double``, ``char``, ...) a number;
* then **one int**, the global size of a 1-D launch (the OpenCL runtime picks
  the local size, or the kernel's ``reqd_work_group_size``), or **2, 4 or 6
  ints**: the global sizes of 1, 2 or 3 dimensions, then as many local sizes
  (0s: the runtime picks them)::

      mod["vadd"](a, b, c, 1024)              # global 1024
      mod["vadd"](a, b, c, 1024, 64)          # global 1024, local 64
      mod["mm"](a, b, c, 512, 512, 16, 16)    # global 512 x 512, local 16 x 16

**TVM's OpenCL modules.** ``tvm.compile(..., target=Target("opencl", host="llvm"))``
then ``export_library`` writes a host library whose ``__tvm_ffi__library_bin``
imports an ``"opencl"`` module: its format (``"cl"``), a map of kernel
function infos (argument types, launch parameter tags) and the OpenCL source,
one ``// Function: NAME`` section per kernel (``parse_tvm_opencl``). The host
code finds a kernel with ``TVMFFIEnvModLookupFromImports(library_ctx, name)``
and calls it through ``TVMFFIFunctionCall`` with the buffers (the tensors'
``data``, ``cl_mem`` handles), the scalars, then one int per launch tag
(``blockIdx.x`` ... the number of work-groups, ``threadIdx.x`` ... their size);
before that it calls ``__tvm_set_device(4, device_id)``. ``attach_tvm_imports``
points those two slots of such a library at this module, which launches the
kernels on the device (global size = groups x group size), as TVM's OpenCL
runtime does; any other name goes on to the functions registered in this
process, as for every library.

    >>> mod = load_source_module("/ws/vadd.cl", "vadd.cl")      # doctest: +SKIP
    >>> mod.get_function("vadd")(a, b, c, 1024)                 # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import logging
import struct
from typing import Any, Callable, NamedTuple, Sequence

from ..errors import BadRequestError, DeviceNotFoundError, FunctionNotFoundError, UnsupportedError
from . import opencl
from .device_api import wait_after_calls
from .ffi import KernelTypeError, PackedFunc, TVMFFIAny, shim
from .opencl import (
    CL_KERNEL_ARG_ADDRESS_CONSTANT,
    CL_KERNEL_ARG_ADDRESS_GLOBAL,
    CL_KERNEL_ARG_ADDRESS_LOCAL,
    CL_KERNEL_ARG_ADDRESS_QUALIFIER,
    CL_KERNEL_ARG_NAME,
    CL_KERNEL_ARG_TYPE_NAME,
    CL_KERNEL_NUM_ARGS,
    CLDevice,
    CLTensor,
    OpenCLRuntime,
)

log = logging.getLogger(__name__)

SOURCE_SUFFIX = ".cl"
BUILD_OPTIONS = "-cl-kernel-arg-info"  # hand-written kernels: their arguments' types and names, for the checks
TVM_DELIMITER = "// Function: "  # how TVM's OpenCL source separates its kernels
SET_DEVICE = "__tvm_set_device"
LAUNCH_COUNTS = (1, 2, 4, 6)


def no_device_error(name: str) -> UnsupportedError:
    return UnsupportedError(
        f"cannot load {name}: its kernels run on an OpenCL device, and this server has none; install an OpenCL "
        f"platform on the device (a CPU one: {opencl.INSTALL_HINT}) and restart the server")


def _runtime_with_devices(name: str) -> OpenCLRuntime:
    try:
        rt = opencl.runtime()
    except DeviceNotFoundError:
        raise no_device_error(name) from None
    if not rt.devices:
        raise no_device_error(name)
    rt.check_usable()
    return rt


# -- scalars ------------------------------------------------------------------------------------------
class Scalar(NamedTuple):
    ctype: Any
    floating: bool


SCALARS: dict[str, Scalar] = {
    "char": Scalar(ctypes.c_int8, False), "uchar": Scalar(ctypes.c_uint8, False),
    "short": Scalar(ctypes.c_int16, False), "ushort": Scalar(ctypes.c_uint16, False),
    "int": Scalar(ctypes.c_int32, False), "uint": Scalar(ctypes.c_uint32, False),
    "long": Scalar(ctypes.c_int64, False), "ulong": Scalar(ctypes.c_uint64, False),
    "float": Scalar(ctypes.c_float, True), "double": Scalar(ctypes.c_double, True),
}
for _name in ("char", "short", "int", "long"):
    SCALARS[f"unsigned {_name}"] = SCALARS["u" + _name]


def _int_range(ctype: Any) -> tuple[int, int]:
    bits = ctypes.sizeof(ctype) * 8
    signed = ctype(-1).value < 0
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


# -- hand-written OpenCL C -------------------------------------------------------------------------
class KernelArg(NamedTuple):
    name: str
    type_name: str
    space: int  # CL_KERNEL_ARG_ADDRESS_*


class CLSourceModule:
    """A ``.cl`` file's kernels, built for every OpenCL device: ``names``, ``entry_name``, ``get_function``."""

    def __init__(self, source: str, name: str):
        self.path = name
        self.source = source
        self._rt = rt = _runtime_with_devices(name)
        self._programs = {dev.device_id: rt.build(dev, source, name, BUILD_OPTIONS) for dev in rt.devices}
        self.names = rt.kernel_names(self._programs[0])
        self._functions: dict[str, CLFunction] = {}
        wait_after_calls(rt.finish)

    @property
    def entry_name(self) -> str | None:
        if "main" in self.names:
            return "main"
        return self.names[0] if len(self.names) == 1 else None

    def get_function(self, name: str) -> "CLFunction":
        if name not in self.names:
            listing = ", ".join(self.names) or "none found"
            raise FunctionNotFoundError(f"no kernel named {name!r} in {self.path} (it has: {listing})")
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = CLFunction(self, name)
        return fn

    def kernel(self, name: str, dev: CLDevice) -> int:
        return self._rt.create_kernel(self._programs[dev.device_id], name)

    def __repr__(self) -> str:
        return f"<CLSourceModule {self.path} kernels={self.names}>"


class CLFunction:
    """A hand-written kernel, called with server-side values: its arguments, then the launch (module docstring)."""

    guarded = True  # its call ends in a guarded wait (runtime.opencl): the worker's call watcher can stop it

    def __init__(self, module: CLSourceModule, name: str):
        self.module = module
        self.name = name
        self.__qualname__ = name
        self._rt = module._rt
        self._kernels: dict[int, int] = {}
        first = self._kernel(self._rt.devices[0])
        self.args = self._arg_info(first)

    def _kernel(self, dev: CLDevice) -> int:
        kernel = self._kernels.get(dev.device_id)
        if kernel is None:
            kernel = self._kernels[dev.device_id] = self.module.kernel(self.name, dev)
        return kernel

    def _arg_info(self, kernel: int) -> list[KernelArg]:
        lib = self._rt.lib
        count = ctypes.c_uint32()
        lib.clGetKernelInfo(kernel, CL_KERNEL_NUM_ARGS, 4, ctypes.byref(count), None)
        args = []
        for i in range(count.value):
            space = ctypes.c_uint32()
            lib.clGetKernelArgInfo(kernel, i, CL_KERNEL_ARG_ADDRESS_QUALIFIER, 4, ctypes.byref(space), None)
            type_name = _arg_text(lib, kernel, i, CL_KERNEL_ARG_TYPE_NAME)
            args.append(KernelArg(_arg_text(lib, kernel, i, CL_KERNEL_ARG_NAME) or f"arg{i}", type_name, space.value))
        return args

    def signature(self) -> str:
        return f"{self.name}({', '.join(f'{a.type_name} {a.name}' for a in self.args)})"

    def __call__(self, *values: Any) -> None:
        n = len(self.args)
        kernel_values, launch = values[:n], values[n:]
        if len(values) < n or len(launch) not in LAUNCH_COUNTS:
            raise KernelTypeError(
                f"{self.name}: takes its {n} argument(s), {self.signature()}, then the launch: one int (the global "
                f"size), or 2, 4 or 6 ints (1, 2 or 3 global sizes, then as many local sizes); got {len(values)} "
                "value(s)")
        global_size, local_size = _launch_sizes(self.name, launch)
        dev = self._device(kernel_values)
        kernel = self._kernel(dev)
        set_arg = self._rt.lib.clSetKernelArg
        for i, (arg, value) in enumerate(zip(self.args, kernel_values)):
            code = self._set(set_arg, kernel, i, arg, value, dev)
            if code != opencl.CL_SUCCESS:
                raise KernelTypeError(f"{self.name}: argument {i} ({arg.type_name} {arg.name}): clSetKernelArg "
                                      f"failed: {opencl.error_name(code)}")
        self._rt.launch(dev, kernel, self.name, global_size, local_size)

    def _device(self, values: Sequence[Any]) -> CLDevice:
        devices = {v.device.device_id for v in values if isinstance(v, CLTensor)}
        if len(devices) > 1:
            raise KernelTypeError(f"{self.name}: its tensors are on different devices: "
                                  + ", ".join(f"cl({d})" for d in sorted(devices)))
        return self._rt.device(devices.pop() if devices else self._rt.current)

    def _set(self, set_arg: Callable, kernel: int, i: int, arg: KernelArg, value: Any, dev: CLDevice) -> int:
        where = f"{self.name}: argument {i} ({arg.type_name} {arg.name})"
        if arg.space in (CL_KERNEL_ARG_ADDRESS_GLOBAL, CL_KERNEL_ARG_ADDRESS_CONSTANT):
            if value is None:
                return set_arg(kernel, i, ctypes.sizeof(ctypes.c_void_p), None)
            if not isinstance(value, CLTensor):
                on = f" on {value.dltensor.device.device_type}" if getattr(value, "dltensor", None) else ""
                raise KernelTypeError(f"{where}: expected a tensor on an OpenCL device, got "
                                      f"{type(value).__name__}{on}; allocate it with runtime.empty(shape, dtype, "
                                      "remote.cl(0))" if not on else f"{where}: expected a tensor on an OpenCL "
                                      "device, got a tensor on another device; copy it to remote.cl(0)")
            mem = ctypes.c_void_p(value._live())
            return set_arg(kernel, i, ctypes.sizeof(mem), ctypes.byref(mem))
        if arg.space == CL_KERNEL_ARG_ADDRESS_LOCAL:
            if type(value) is not int or value <= 0:
                raise KernelTypeError(f"{where}: a __local buffer takes its size in bytes (an int > 0), "
                                      f"not {value!r:.40}")
            return set_arg(kernel, i, value, None)
        scalar = SCALARS.get(arg.type_name)
        if scalar is None:
            raise KernelTypeError(f"{where}: arguments of type {arg.type_name} cannot be passed; kernels take "
                                  f"buffers, __local sizes and the scalars {', '.join(sorted(SCALARS))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KernelTypeError(f"{where}: expected a number, got {type(value).__name__}")
        if scalar.floating:
            c_value = scalar.ctype(float(value))
        else:
            if not isinstance(value, int):
                raise KernelTypeError(f"{where}: expected an int, got float {value!r}")
            low, high = _int_range(scalar.ctype)
            if not low <= value <= high:
                raise KernelTypeError(f"{where}: {value} does not fit a {arg.type_name} ({low}..{high})")
            c_value = scalar.ctype(value)
        return set_arg(kernel, i, ctypes.sizeof(c_value), ctypes.byref(c_value))

    def __repr__(self) -> str:
        return f"<CLFunction {self.signature()} of {self.module.path}>"


def _arg_text(lib: Any, kernel: int, index: int, param: int) -> str:
    size = ctypes.c_size_t()
    if lib.clGetKernelArgInfo(kernel, index, param, 0, None, ctypes.byref(size)) != 0 or not size.value:
        return ""
    buf = ctypes.create_string_buffer(size.value)
    lib.clGetKernelArgInfo(kernel, index, param, size.value, buf, None)
    return buf.value.decode("utf-8", "replace").strip()


def _launch_sizes(name: str, launch: Sequence[Any]) -> tuple[list[int], list[int] | None]:
    """``(global, local or None)`` from the launch ints of a call (module docstring)."""
    if not all(type(v) is int for v in launch):
        raise KernelTypeError(f"{name}: the launch sizes are ints, got {list(launch)!r:.80}")
    if len(launch) == 1:
        global_size, local_size = list(launch), None
    else:
        dims = len(launch) // 2
        global_size, local_size = list(launch[:dims]), list(launch[dims:])
        if not any(local_size):
            local_size = None
        elif not all(local_size):
            raise KernelTypeError(f"{name}: local sizes are all given or all 0 (the runtime picks), not {local_size}")
    if not all(0 < g < (1 << 63) for g in global_size) or (local_size and not all(0 < n < (1 << 63) for n in local_size)):
        raise KernelTypeError(f"{name}: launch sizes must be > 0, got global {global_size}"
                              + (f", local {local_size}" if local_size else ""))
    return global_size, local_size


def load_source_module(path: str, name: str) -> CLSourceModule:
    """A ``.cl`` file of the session's workspace, built for every OpenCL device of this process."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        source = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequestError(f"{name} is not UTF-8 text ({exc}); an OpenCL module is OpenCL C source") from None
    if "\0" in source:
        raise BadRequestError(f"{name} holds a NUL byte; an OpenCL module is OpenCL C source")
    return CLSourceModule(source, name)


# -- TVM's "opencl" module ---------------------------------------------------------------------------
class TVMKernelInfo(NamedTuple):
    """A kernel's FunctionInfo: its arguments' DLPack types ``(code, bits, lanes)`` and launch parameter tags."""

    name: str
    arg_types: tuple[tuple[int, int, int], ...]
    launch_param_tags: tuple[str, ...]


class TVMOpenCLBlob(NamedTuple):
    fmt: str
    functions: dict[str, TVMKernelInfo]
    code: bytes


class _Reader:
    """TVM's binary stream: u64 lengths, little-endian; strings and byte arrays length-prefixed."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u64(self) -> int:
        value, = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return value

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def text(self) -> str:
        return self.raw(self.u64()).decode("utf-8")

    def count(self, item_bytes: int) -> int:
        n = self.u64()
        if n * item_bytes > len(self.data) - self.pos:
            raise ValueError("a count past the end of the data")
        return n


def parse_tvm_opencl(payload: bytes) -> TVMOpenCLBlob:
    """The ``"opencl"`` module of a library_bin: ``fmt`` (str), ``fmap`` (count, then per kernel its name and a
    FunctionInfo: name, arg_types as 4-byte DLDataTypes, launch_param_tags, arg_extra_tags as int32s), ``code``.

        >>> parse_tvm_opencl(payload).functions["add_one_kernel"].launch_param_tags  # doctest: +SKIP
        ('blockIdx.x', 'threadIdx.x')
    """
    try:
        r = _Reader(payload)
        fmt = r.text()
        functions = {}
        for _ in range(r.count(8)):
            key = r.text()
            name = r.text()
            types = tuple(struct.unpack_from("<BBH", r.raw(4)) for _ in range(r.count(4)))
            tags = tuple(r.text() for _ in range(r.count(8)))
            r.raw(4 * r.count(4))  # arg_extra_tags (int32 each): texture buffers, which OpenCL C here never has
            functions[key] = TVMKernelInfo(name, types, tags)
        code = r.raw(r.u64())
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise BadRequestError(f"the library's OpenCL module cannot be read ({exc}): was it exported by apache-tvm "
                              "0.27?") from None
    return TVMOpenCLBlob(fmt, functions, code)


def split_kernels(source: str) -> dict[str, str]:
    """Each kernel's own source, as TVM's OpenCL runtime builds it: sections after ``// Function: NAME`` lines."""
    kernels: dict[str, str] = {}
    parts = source.split(TVM_DELIMITER)
    for part in parts[1:]:
        name, _, body = part.partition("\n")
        kernels[name.strip()] = body
    return kernels


def tvm_opencl_payload(blob: bytes) -> bytes | None:
    """The ``"opencl"`` module's bytes in a library_bin (tvm_bridge._blob_module_kinds' layout), or None."""
    try:
        r = _Reader(blob)
        end = min(len(blob), 8 + r.u64())
        for _ in range(2):  # the import tree: row pointers, child indices
            r.raw(8 * r.count(8))
        while r.pos + 8 <= end:
            key = r.text()
            if key == "_lib":
                continue
            payload = r.raw(r.u64())
            if key == "opencl":
                return payload
    except (ValueError, struct.error, UnicodeDecodeError):
        return None
    return None


_DYN_SHMEM_TAG = "tir.use_dyn_shared_memory"


class TVMOpenCLModule:
    """The OpenCL kernels a TVM library imports, launched the way TVM's OpenCL runtime launches them."""

    def __init__(self, blob: TVMOpenCLBlob, name: str):
        if blob.fmt != "cl":
            raise UnsupportedError(f"cannot load {name}: its OpenCL module holds {blob.fmt!r} binaries; this server "
                                   "builds OpenCL C source (fmt 'cl') only")
        self.name = name
        self._rt = _runtime_with_devices(name)
        self.functions = blob.functions
        self.sources = split_kernels(blob.code.decode("utf-8", "replace"))
        missing = sorted(set(self.functions) - set(self.sources))
        if missing:
            raise BadRequestError(f"cannot load {name}: its OpenCL source has no section for {', '.join(missing)}")
        self._programs: dict[tuple[str, int], int] = {}
        self._launchers: dict[str, Callable] = {}
        wait_after_calls(self._rt.finish)

    def _kernel(self, fname: str, dev: CLDevice) -> int:
        program = self._programs.get((fname, dev.device_id))
        if program is None:  # built on first use, one program per kernel and device, as TVM does
            program = self._rt.build(dev, self.sources[fname], f"{fname} of {self.name}")
            self._programs[(fname, dev.device_id)] = program
        return self._rt.create_kernel(program, fname)

    def launcher(self, fname: str) -> Callable[[Any, int], None]:
        """``launch(args, nargs)`` for the host code's TVMFFIFunctionCall of kernel ``fname``."""
        launch = self._launchers.get(fname)
        if launch is None:
            launch = self._launchers[fname] = self._make_launcher(fname)
        return launch

    def _make_launcher(self, fname: str) -> Callable[[Any, int], None]:
        info = self.functions[fname]
        rt = self._rt
        n = len(info.arg_types)
        setters = [_tvm_setter(fname, i, t) for i, t in enumerate(info.arg_types)]
        index_map: list[int] = []
        dyn = 0
        for tag in info.launch_param_tags:
            if tag == _DYN_SHMEM_TAG:
                dyn = 1
            elif tag.startswith("tir."):
                continue  # launch flags without a value (cooperative, programmatic launches)
            elif tag.startswith("blockIdx.") and len(tag) == 10:
                index_map.append("xyz".index(tag[9]))
            elif tag.startswith("threadIdx.") and len(tag) == 11:
                index_map.append(3 + "xyz".index(tag[10]))
            else:
                raise UnsupportedError(f"{fname} of {self.name}: launch parameter {tag!r} is not an OpenCL one")
        work_dim = max([1] + [i % 3 + 1 for i in index_map])
        kernels: dict[int, int] = {}
        set_arg = rt.lib.clSetKernelArg
        needs = n + len(index_map) + dyn

        def launch(args: Any, nargs: int) -> None:
            if nargs < needs:
                raise KernelTypeError(f"{fname}: the host code passed {nargs} values, the kernel takes {needs}")
            dev = rt.device(rt.current)
            kernel = kernels.get(dev.device_id)
            if kernel is None:
                kernel = kernels[dev.device_id] = self._kernel(fname, dev)
            for i in range(n):
                code = setters[i](set_arg, kernel, args[i])
                if code:
                    raise KernelTypeError(f"{fname}: argument {i}: clSetKernelArg failed: {opencl.error_name(code)}")
            work = [1, 1, 1, 1, 1, 1]
            for j, at in enumerate(index_map):
                size = args[n + j].v_int64
                if size > 0:  # a dynamic extent of 0 launches one (as TVM)
                    work[at] = size
            rt.launch(dev, kernel, fname, [work[d] * work[d + 3] for d in range(work_dim)], work[3:3 + work_dim])

        return launch


def _tvm_setter(fname: str, index: int, dtype: tuple[int, int, int]) -> Callable[[Callable, int, Any], int]:
    """How argument ``index`` of DLPack type ``dtype`` goes from a TVMFFIAny to clSetKernelArg."""
    code, bits, lanes = dtype
    if lanes != 1:
        raise UnsupportedError(f"{fname}: argument {index} is a vector ({lanes} lanes), which TVM's OpenCL runtime "
                               "does not pass either")
    if code == 3:  # an opaque handle: a buffer's cl_mem (the DLTensor's data)
        def buffer(set_arg: Callable, kernel: int, value: Any) -> int:
            mem = ctypes.c_void_p(value.v_ptr if value.type_index else None)
            return set_arg(kernel, index, 8, ctypes.byref(mem))
        return buffer
    ctype = {(0, 8): ctypes.c_int8, (0, 16): ctypes.c_int16, (0, 32): ctypes.c_int32, (0, 64): ctypes.c_int64,
             (1, 8): ctypes.c_uint8, (1, 16): ctypes.c_uint16, (1, 32): ctypes.c_uint32, (1, 64): ctypes.c_uint64,
             (2, 32): ctypes.c_float, (2, 64): ctypes.c_double}.get((code, bits))
    if ctype is None:
        raise UnsupportedError(f"{fname}: argument {index} has DLPack type code {code} of {bits} bits, which this "
                               "server does not pass to OpenCL kernels")
    size = ctypes.sizeof(ctype)
    if code == 2:
        def floating(set_arg: Callable, kernel: int, value: Any) -> int:
            c_value = ctype(value.v_float64 if value.type_index == 3 else float(value.v_int64))
            return set_arg(kernel, index, size, ctypes.byref(c_value))
        return floating

    def integer(set_arg: Callable, kernel: int, value: Any) -> int:
        c_value = ctype(value.v_int64)
        return set_arg(kernel, index, size, ctypes.byref(c_value))
    return integer


# -- the host library's two slots ---------------------------------------------------------------------
_Lookup = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p))
LOOKUP_SLOT, CALL_SLOT = "__TVMFFIEnvModLookupFromImports", "__TVMFFIFunctionCall"
_shim_ready = False


def _shim() -> Any:
    global _shim_ready
    lib = shim()
    if not _shim_ready:
        lib.wb_env_mod_lookup_from_imports.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                                       ctypes.POINTER(ctypes.c_void_p)]
        lib.wb_ffi_function_call.argtypes = [ctypes.c_void_p, ctypes.POINTER(TVMFFIAny), ctypes.c_int32,
                                             ctypes.POINTER(TVMFFIAny)]
        lib.wb_guard_suspend.restype = ctypes.c_void_p
        _shim_ready = True
    return lib


def attach_tvm_imports(library: Any, module: TVMOpenCLModule) -> None:
    """Point ``library``'s lookup and call slots at ``module``'s kernels (and ``__tvm_set_device``); other names go
    on to the registered functions (the shim's own lookup and call, as any library's)."""
    native = _shim()
    rt = module._rt
    handles: dict[int, Callable[[Any, int], None]] = {}
    tokens: dict[str, ctypes.c_int64] = {}  # name -> a word whose address is the function's handle

    def set_device(args: Any, nargs: int) -> None:
        if nargs >= 2 and args[0].v_int64 == opencl.DEVICE_TYPE:
            rt.device(int(args[1].v_int64))  # raises for a device this server lacks
            rt.current = int(args[1].v_int64)

    def handle_of(name: str) -> int | None:
        token = tokens.get(name)
        if token is None:
            if name == SET_DEVICE:
                fn = set_device
            elif name in module.functions:
                fn = module.launcher(name)
            else:
                return None
            token = tokens[name] = ctypes.c_int64(len(tokens) + 1)
            handles[ctypes.addressof(token)] = fn
        return ctypes.addressof(token)

    def lookup(ctx: int, name_p: bytes, out: Any) -> int:
        guard = native.wb_guard_suspend()  # no fault or cancel may unwind through Python's frames
        try:
            handle = handle_of(name_p.decode("utf-8", "replace"))
            if handle is None:
                return native.wb_env_mod_lookup_from_imports(ctx, name_p, out)
            out[0] = handle
            return 0
        except BaseException as exc:
            native.wb_raise(b"RuntimeError", f"{name_p!r}: {exc}".encode("utf-8", "replace"))
            return -1
        finally:
            native.wb_guard_resume(guard)

    def call(handle: int, args: Any, nargs: int, ret: Any) -> int:
        fn = handles.get(handle or 0)
        if fn is None:
            return native.wb_ffi_function_call(handle, args, nargs, ret)
        guard = native.wb_guard_suspend()
        try:
            fn(args, nargs)
            return 0
        except BaseException as exc:
            text = str(exc)
            kind = b"TypeError" if isinstance(exc, TypeError) else b"RuntimeError"
            native.wb_raise(kind, text.encode("utf-8", "replace"))
            return -1
        finally:
            native.wb_guard_resume(guard)

    callbacks = (_Lookup(lookup), PackedFunc(call))
    library._opencl = (module, callbacks)  # alive as long as the library
    for slot, fn in zip((LOOKUP_SLOT, CALL_SLOT), callbacks):
        if slot in library.slots:
            ctypes.c_void_p.in_dll(library._lib, slot).value = ctypes.cast(fn, ctypes.c_void_p).value
            library.slots[slot] = "opencl module"


def load_tvm_library(so: str, name: str) -> Any:
    """A TVM host library whose only import is an OpenCL module: the NativeLibrary, its kernels launched here."""
    from .ffi import NativeLibrary
    from .tvm_bridge import LIBRARY_BIN, _symbol_bytes

    with open(so, "rb") as f:
        data = f.read()
    payload = tvm_opencl_payload(_symbol_bytes(data, LIBRARY_BIN) or b"")
    if payload is None:
        raise BadRequestError(f"cannot load {name}: its OpenCL module cannot be found in its library data")
    module = TVMOpenCLModule(parse_tvm_opencl(payload), name)
    library = NativeLibrary(so, name=name)
    attach_tvm_imports(library, module)
    return library
