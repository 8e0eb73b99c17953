"""OpenCL devices on the serving side, through the ICD loader (``libOpenCL.so.1``) loaded at run time.

Nothing here is linked: ``ctypes`` opens the loader the first time an OpenCL
device is used, so a server on a machine without OpenCL starts as before and
lists no ``cl`` device. On Debian and Ubuntu, ``apt-get install
pocl-opencl-icd ocl-icd-libopencl1`` gives a CPU OpenCL device (PoCL).

What it holds, the OpenCL row of the device table (``runtime.device_api``):

* **devices**, numbered as TVM's OpenCL runtime numbers them: the GPUs of every
  platform in platform order, or, where there is none, the CPU devices
  (``published_devices()`` lists them with TVM's attribute names);
* **tensors** (``CLTensor``): one ``cl_mem`` buffer each, the DLTensor's
  ``data`` being the ``cl_mem`` itself (DLPack's convention for OpenCL),
  zero-filled; TENSOR_WRITE maps the buffer and reads the request's bulk part
  from the socket straight into it, TENSOR_READ sends from a mapping (one copy
  each way, no per-element work);
* **programs and launches**: a build error is a ``CLBuildError`` carrying the
  compiler's log with its line numbers; a launch enqueues the kernel behind a
  *gate* (a user event), and ``finish`` opens the gate and waits for the queue
  in one guarded call: kernels run only while the guard is armed, so a kernel
  that faults in the OpenCL runtime's own threads fails that call, not the
  process;
* **timing** as TVM's OpenCL timer: the queues record profiling events while a
  timer runs, and the time is the sum of the kernels' execution on the device.

The server process never initialises an OpenCL platform itself (PoCL starts
threads, which a forked session worker would not have): it lists devices from
a forked child (``published_devices``), and each session worker opens its own.

    >>> published_devices()                              # doctest: +SKIP
    [{'device_id': 0, 'device_name': 'pthread-skylake-avx512-...', 'multi_processor_count': 2, ...}]
"""
from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any, Callable, Sequence

from . import opencl_probe
from .opencl_probe import NO_OPENCL_ENV, opencl_disabled  # noqa: F401  (this module's names too)
from ..errors import BadRequestError, CallCancelledError, DeviceNotFoundError, KernelCrashedError, RemoteError

log = logging.getLogger(__name__)

DEVICE_TYPE = 4  # DLPack kDLOpenCL
LOADER_NAMES = ("libOpenCL.so.1", "libOpenCL.so")
APT_PACKAGES = "pocl-opencl-icd ocl-icd-libopencl1"
INSTALL_HINT = f"sudo apt-get install {APT_PACKAGES}"

# -- OpenCL constants (CL/cl.h) ------------------------------------------------------------------
CL_SUCCESS = 0
CL_DEVICE_TYPE_CPU, CL_DEVICE_TYPE_GPU, CL_DEVICE_TYPE_ACCELERATOR = 1 << 1, 1 << 2, 1 << 3
CL_PLATFORM_VERSION, CL_PLATFORM_NAME, CL_PLATFORM_VENDOR = 0x0901, 0x0902, 0x0903
CL_DEVICE_TYPE_INFO = 0x1000
CL_DEVICE_MAX_COMPUTE_UNITS = 0x1002
CL_DEVICE_MAX_WORK_ITEM_DIMENSIONS = 0x1003
CL_DEVICE_MAX_WORK_GROUP_SIZE = 0x1004
CL_DEVICE_MAX_WORK_ITEM_SIZES = 0x1005
CL_DEVICE_MAX_CLOCK_FREQUENCY = 0x100C
CL_DEVICE_MAX_MEM_ALLOC_SIZE = 0x1010
CL_DEVICE_GLOBAL_MEM_SIZE = 0x101F
CL_DEVICE_LOCAL_MEM_SIZE = 0x1023
CL_DEVICE_NAME, CL_DEVICE_VENDOR, CL_DRIVER_VERSION, CL_DEVICE_VERSION = 0x102B, 0x102C, 0x102D, 0x102F
CL_QUEUE_PROFILING_ENABLE = 1 << 1
CL_MEM_READ_WRITE = 1 << 0
CL_MAP_READ, CL_MAP_WRITE_INVALIDATE_REGION = 1 << 0, 1 << 2
CL_PROGRAM_KERNEL_NAMES = 0x1168
CL_PROGRAM_BUILD_LOG = 0x1183
CL_KERNEL_NUM_ARGS = 0x1191
CL_KERNEL_ARG_ADDRESS_QUALIFIER, CL_KERNEL_ARG_TYPE_NAME, CL_KERNEL_ARG_NAME = 0x1196, 0x1198, 0x119A
CL_KERNEL_ARG_ADDRESS_GLOBAL, CL_KERNEL_ARG_ADDRESS_LOCAL = 0x119B, 0x119C
CL_KERNEL_ARG_ADDRESS_CONSTANT, CL_KERNEL_ARG_ADDRESS_PRIVATE = 0x119D, 0x119E
CL_PROFILING_COMMAND_START, CL_PROFILING_COMMAND_END = 0x1282, 0x1283

CL_ERRORS = {
    -1: "CL_DEVICE_NOT_FOUND", -2: "CL_DEVICE_NOT_AVAILABLE", -3: "CL_COMPILER_NOT_AVAILABLE",
    -4: "CL_MEM_OBJECT_ALLOCATION_FAILURE", -5: "CL_OUT_OF_RESOURCES", -6: "CL_OUT_OF_HOST_MEMORY",
    -7: "CL_PROFILING_INFO_NOT_AVAILABLE", -11: "CL_BUILD_PROGRAM_FAILURE", -12: "CL_MAP_FAILURE",
    -14: "CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST", -30: "CL_INVALID_VALUE",
    -32: "CL_INVALID_PLATFORM", -33: "CL_INVALID_DEVICE", -34: "CL_INVALID_CONTEXT",
    -36: "CL_INVALID_COMMAND_QUEUE", -38: "CL_INVALID_MEM_OBJECT", -42: "CL_INVALID_BINARY",
    -43: "CL_INVALID_BUILD_OPTIONS", -44: "CL_INVALID_PROGRAM", -45: "CL_INVALID_PROGRAM_EXECUTABLE",
    -46: "CL_INVALID_KERNEL_NAME", -47: "CL_INVALID_KERNEL_DEFINITION", -48: "CL_INVALID_KERNEL",
    -49: "CL_INVALID_ARG_INDEX", -50: "CL_INVALID_ARG_VALUE", -51: "CL_INVALID_ARG_SIZE",
    -52: "CL_INVALID_KERNEL_ARGS", -53: "CL_INVALID_WORK_DIMENSION", -54: "CL_INVALID_WORK_GROUP_SIZE",
    -55: "CL_INVALID_WORK_ITEM_SIZE", -56: "CL_INVALID_GLOBAL_OFFSET", -58: "CL_INVALID_EVENT",
    -59: "CL_INVALID_OPERATION", -61: "CL_INVALID_BUFFER_SIZE", -63: "CL_INVALID_GLOBAL_WORK_SIZE",
    -1001: "CL_PLATFORM_NOT_FOUND_KHR",
}

_vp, _u32, _u64, _sz, _i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int32
_pi32 = ctypes.POINTER(_i32)
# name -> (restype, argtypes): only what this module calls
_PROTOTYPES: dict[str, tuple[Any, list]] = {
    "clGetPlatformIDs": (_i32, [_u32, _vp, ctypes.POINTER(_u32)]),
    "clGetPlatformInfo": (_i32, [_vp, _u32, _sz, _vp, ctypes.POINTER(_sz)]),
    "clGetDeviceIDs": (_i32, [_vp, _u64, _u32, _vp, ctypes.POINTER(_u32)]),
    "clGetDeviceInfo": (_i32, [_vp, _u32, _sz, _vp, ctypes.POINTER(_sz)]),
    "clCreateContext": (_vp, [_vp, _u32, _vp, _vp, _vp, _pi32]),
    "clCreateCommandQueue": (_vp, [_vp, _vp, _u64, _pi32]),
    "clCreateBuffer": (_vp, [_vp, _u64, _sz, _vp, _pi32]),
    "clReleaseMemObject": (_i32, [_vp]),
    "clEnqueueFillBuffer": (_i32, [_vp, _vp, _vp, _sz, _sz, _sz, _u32, _vp, _vp]),
    "clEnqueueMapBuffer": (_vp, [_vp, _vp, _u32, _u64, _sz, _sz, _u32, _vp, _vp, _pi32]),
    "clEnqueueUnmapMemObject": (_i32, [_vp, _vp, _vp, _u32, _vp, _vp]),
    "clEnqueueCopyBuffer": (_i32, [_vp, _vp, _vp, _sz, _sz, _sz, _u32, _vp, _vp]),
    "clFinish": (_i32, [_vp]),
    "clCreateProgramWithSource": (_vp, [_vp, _u32, _vp, _vp, _pi32]),
    "clBuildProgram": (_i32, [_vp, _u32, _vp, ctypes.c_char_p, _vp, _vp]),
    "clGetProgramBuildInfo": (_i32, [_vp, _vp, _u32, _sz, _vp, ctypes.POINTER(_sz)]),
    "clGetProgramInfo": (_i32, [_vp, _u32, _sz, _vp, ctypes.POINTER(_sz)]),
    "clReleaseProgram": (_i32, [_vp]),
    "clCreateKernel": (_vp, [_vp, ctypes.c_char_p, _pi32]),
    "clGetKernelInfo": (_i32, [_vp, _u32, _sz, _vp, ctypes.POINTER(_sz)]),
    "clGetKernelArgInfo": (_i32, [_vp, _u32, _u32, _sz, _vp, ctypes.POINTER(_sz)]),
    "clSetKernelArg": (_i32, [_vp, _u32, _sz, _vp]),
    "clEnqueueNDRangeKernel": (_i32, [_vp, _vp, _u32, _vp, _vp, _vp, _u32, _vp, _vp]),
    "clWaitForEvents": (_i32, [_u32, _vp]),
    "clCreateUserEvent": (_vp, [_vp, _pi32]),
    "clSetUserEventStatus": (_i32, [_vp, _i32]),
    "clGetEventProfilingInfo": (_i32, [_vp, _u32, _sz, _vp, ctypes.POINTER(_sz)]),
    "clReleaseEvent": (_i32, [_vp]),
}


class OpenCLError(RemoteError):
    """An OpenCL call failed; the message names the call and the error code."""


class CLBuildError(OpenCLError):
    """An OpenCL program did not build: the message holds the compiler's log (with its line numbers)."""


BUILD_FAILED = "OpenCL build failed"  # how a build error's message starts (cc.load_source reads it)


def error_name(code: int) -> str:
    return f"{CL_ERRORS.get(code, 'CL error')} ({code})"


def load_library() -> ctypes.CDLL:
    """The ICD loader with the prototypes this module uses; DeviceNotFoundError naming the packages when absent."""
    if opencl_disabled():
        raise DeviceNotFoundError(f"OpenCL is turned off on this server ({NO_OPENCL_ENV}=1)")
    _guard()  # its handlers in place before PoCL's LLVM saves the ones it finds (kernel_runtime.h)
    last = None
    for name in LOADER_NAMES:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as exc:
            last = exc
    else:
        raise DeviceNotFoundError(f"this machine has no OpenCL loader ({last}); install one with {INSTALL_HINT}")
    for fname, (restype, argtypes) in _PROTOTYPES.items():
        try:
            fn = getattr(lib, fname)
        except AttributeError:
            continue  # an old loader: calls of it fail when made
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _check(code: int, what: str) -> None:
    if code != CL_SUCCESS:
        raise OpenCLError(f"{what} failed: {error_name(code)}")


# -- listing devices ------------------------------------------------------------------------------
def _info_bytes(get: Callable, handle: int, param: int) -> bytes:
    size = _sz()
    if get(handle, param, 0, None, ctypes.byref(size)) != CL_SUCCESS or not size.value:
        return b""
    buf = ctypes.create_string_buffer(size.value)
    if get(handle, param, size.value, buf, None) != CL_SUCCESS:
        return b""
    return buf.raw[: size.value]


def _info_text(get: Callable, handle: int, param: int) -> str:
    return _info_bytes(get, handle, param).split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def _info_int(get: Callable, handle: int, param: int, ctype: Any) -> int:
    value = ctype()
    if get(handle, param, ctypes.sizeof(value), ctypes.byref(value), None) != CL_SUCCESS:
        return 0
    return int(value.value)


def _enumerate(lib: ctypes.CDLL) -> list[tuple[int, int]]:
    """``[(platform, device)]`` as TVM numbers them: every platform's GPUs, or where none, every CPU device."""
    count = _u32()
    if lib.clGetPlatformIDs(0, None, ctypes.byref(count)) != CL_SUCCESS or not count.value:
        return []
    platforms = (_vp * count.value)()
    if lib.clGetPlatformIDs(count.value, platforms, None) != CL_SUCCESS:
        return []
    for kind in (CL_DEVICE_TYPE_GPU, CL_DEVICE_TYPE_CPU):
        found = []
        for platform in platforms:
            n = _u32()
            if lib.clGetDeviceIDs(platform, kind, 0, None, ctypes.byref(n)) != CL_SUCCESS or not n.value:
                continue
            ids = (_vp * n.value)()
            if lib.clGetDeviceIDs(platform, kind, n.value, ids, None) == CL_SUCCESS:
                found += [(platform, d) for d in ids]
        if found:
            return found
    return []


def describe(lib: ctypes.CDLL, platform: int, device: int, device_id: int) -> dict[str, Any]:
    """A device's attributes under TVM's names (``Device.device_name``, ``multi_processor_count``...)."""
    get = lib.clGetDeviceInfo
    dims = _info_int(get, device, CL_DEVICE_MAX_WORK_ITEM_DIMENSIONS, _u32)
    raw = _info_bytes(get, device, CL_DEVICE_MAX_WORK_ITEM_SIZES)
    item_sizes = list((_sz * dims).from_buffer_copy(raw[: dims * ctypes.sizeof(_sz)])) if dims and raw else []
    kind = _info_int(get, device, CL_DEVICE_TYPE_INFO, _u64)
    return {
        "device": [DEVICE_TYPE, device_id],
        "exist": True,
        "device_name": _info_text(get, device, CL_DEVICE_NAME),
        "device_kind": "gpu" if kind & CL_DEVICE_TYPE_GPU else "cpu" if kind & CL_DEVICE_TYPE_CPU else "accelerator",
        "vendor": _info_text(get, device, CL_DEVICE_VENDOR),
        "platform": _info_text(lib.clGetPlatformInfo, platform, CL_PLATFORM_NAME),
        "compute_version": _info_text(get, device, CL_DEVICE_VERSION),
        "driver_version": _info_text(get, device, CL_DRIVER_VERSION),
        "multi_processor_count": _info_int(get, device, CL_DEVICE_MAX_COMPUTE_UNITS, _u32),
        "max_threads_per_block": _info_int(get, device, CL_DEVICE_MAX_WORK_GROUP_SIZE, _sz),
        "max_thread_dimensions": item_sizes,
        "max_shared_memory_per_block": _info_int(get, device, CL_DEVICE_LOCAL_MEM_SIZE, _u64),
        "total_global_memory": _info_int(get, device, CL_DEVICE_GLOBAL_MEM_SIZE, _u64),
        "max_clock_rate": _info_int(get, device, CL_DEVICE_MAX_CLOCK_FREQUENCY, _u32),
        "warp_size": 1,
    }


def probe() -> list[dict[str, Any]]:
    """The OpenCL devices of this machine, probed in this process (it starts the platforms' threads)."""
    try:
        lib = load_library()
    except DeviceNotFoundError:
        return []
    return [describe(lib, p, d, i) for i, (p, d) in enumerate(_enumerate(lib))]


_published: list[dict[str, Any]] | None = None
_published_lock = threading.Lock()


def published_devices() -> list[dict[str, Any]]:
    """The OpenCL devices a server publishes (``describe`` of each), probed once per process.

    Probed in a forked child (``runtime.opencl_probe``; the one a server started
    early if there is one) unless this process already runs OpenCL: a platform
    (PoCL) starts threads, and a server that forks session workers must not have
    them. ``[]`` when OpenCL is absent, turned off (``WORKBENCH_NO_OPENCL=1``) or
    the probe fails (logged).
    """
    global _published
    with _published_lock:
        if _published is None:
            started = opencl_probe.take()
            if opencl_disabled() or _runtime is not None:
                if started:
                    opencl_probe.discard(started)
                _published = [d.attributes for d in _runtime.devices] if _runtime is not None else []
            else:
                started = started or opencl_probe.fork()
                _published = opencl_probe.collect(started) if started else []
        return _published


# -- the runtime of this process ----------------------------------------------------------------
class CLDevice:
    """One OpenCL device of this process: its context and in-order queue (with profiling, for timers)."""

    def __init__(self, rt: "OpenCLRuntime", device_id: int, platform: int, handle: int):
        self.rt = rt
        self.device_id = device_id
        self.platform = platform
        self.handle = handle
        self.attributes = describe(rt.lib, platform, handle, device_id)
        self.name = self.attributes["device_name"]
        self._context: int | None = None
        self._queue: int | None = None
        self.dirty = False  # work enqueued since the last finish
        self.gate: int | None = None  # the user event the kernels since the last finish wait for (finish opens it)

    @property
    def context(self) -> int:
        if self._context is None:
            err = _i32()
            dev = (_vp * 1)(self.handle)
            ctx = self.rt.lib.clCreateContext(None, 1, dev, None, None, ctypes.byref(err))
            _check(err.value, f"clCreateContext for {self}")
            self._context = ctx
        return self._context

    @property
    def queue(self) -> int:
        if self._queue is None:
            err = _i32()
            queue = self.rt.lib.clCreateCommandQueue(self.context, self.handle, CL_QUEUE_PROFILING_ENABLE,
                                                     ctypes.byref(err))
            _check(err.value, f"clCreateCommandQueue for {self}")
            self._queue = queue
        return self._queue

    def __repr__(self) -> str:
        return f"cl({self.device_id}) ({self.name})"


class OpenCLRuntime:
    """The OpenCL platforms of this process (``runtime()``): devices, buffers, programs, launches, timers."""

    def __init__(self) -> None:
        self.lib = load_library()
        self.devices = [CLDevice(self, i, p, d) for i, (p, d) in enumerate(_enumerate(self.lib))]
        self.current = 0  # the device TVM's host code chose (__tvm_set_device)
        self.broken: str | None = None  # why this process's OpenCL cannot be trusted any more
        self._mapped: list[tuple[CLDevice, int, int]] = []  # (device, cl_mem, host pointer) to unmap
        self._events: list[int] | None = None  # while a timer runs: the launches' events
        self.launches = 0  # kernels enqueued in this process (tests, diagnostics)
        self.last_kernel = "a kernel"  # the last one launched (a crash's error names it)
        self._threads_lost = _guard().wb_guard_threads_lost()  # threads the guard ended: one more, and a
        # launch's kernel died in the OpenCL runtime's threads

    # -- devices ----------------------------------------------------------------------------
    def device(self, device_id: int) -> CLDevice:
        self.check_usable()
        if not 0 <= device_id < len(self.devices):
            have = ", ".join(f"cl({d.device_id})" for d in self.devices) or "none"
            raise DeviceNotFoundError(f"this server has no cl({device_id}); its OpenCL devices: {have}")
        return self.devices[device_id]

    def check_usable(self) -> None:
        if self.broken:
            raise KernelCrashedError(
                f"the OpenCL device of this session cannot be used any more: {self.broken}; the session's CPU "
                "tensors and modules are intact: open a new session for OpenCL")

    def settle(self) -> None:
        """Unmap what TENSOR_READ mapped (its reply has been sent: the next request is being served), and run
        the kernels still behind a gate (a call that failed halfway) before the memory is touched."""
        if any(d.gate for d in self.devices):
            self.finish()
        self._unmap()

    def _unmap(self) -> None:
        mapped, self._mapped = self._mapped, []
        for dev, mem, ptr in mapped:
            self.lib.clEnqueueUnmapMemObject(dev.queue, mem, ptr, 0, None, None)

    # -- memory -----------------------------------------------------------------------------
    def alloc(self, dev: CLDevice, nbytes: int, zero: bool = True) -> int:
        self.settle()
        err = _i32()
        mem = self.lib.clCreateBuffer(dev.context, CL_MEM_READ_WRITE, max(nbytes, 1), None, ctypes.byref(err))
        if err.value != CL_SUCCESS or not mem:
            raise RemoteError(f"cannot allocate {nbytes} bytes on {dev}: {error_name(err.value)}; free tensors "
                              "or use a smaller one")
        if zero and nbytes:
            pattern = ctypes.c_uint8(0)
            code = self.lib.clEnqueueFillBuffer(dev.queue, mem, ctypes.byref(pattern), 1, 0, nbytes, 0, None, None)
            if code != CL_SUCCESS:
                self.lib.clReleaseMemObject(mem)
                raise OpenCLError(f"clEnqueueFillBuffer on {dev} failed: {error_name(code)}")
            dev.dirty = True
        return mem

    def free(self, dev: CLDevice, mem: int) -> None:
        if self.broken:
            return  # its runtime may be stuck: leave the buffer (the process ends with the session)
        self.settle()
        self.lib.clReleaseMemObject(mem)

    def map(self, dev: CLDevice, mem: int, nbytes: int, flags: int) -> memoryview:
        err = _i32()
        ptr = self.lib.clEnqueueMapBuffer(dev.queue, mem, 1, flags, 0, nbytes, 0, None, None, ctypes.byref(err))
        if err.value != CL_SUCCESS or not ptr:
            raise OpenCLError(f"clEnqueueMapBuffer of {nbytes} bytes on {dev} failed: {error_name(err.value)}")
        return ptr

    def write(self, dev: CLDevice, mem: int, nbytes: int, fill: Callable[[memoryview], None]) -> None:
        """``fill(view)`` writes the buffer's ``nbytes`` bytes through a mapping (one copy, no staging)."""
        self.check_usable()
        self.settle()
        if not nbytes:
            fill(memoryview(b""))
            return
        ptr = self.map(dev, mem, nbytes, CL_MAP_WRITE_INVALIDATE_REGION)
        try:
            fill(memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B"))
        finally:
            self.lib.clEnqueueUnmapMemObject(dev.queue, mem, ptr, 0, None, None)
            dev.dirty = True

    def read(self, dev: CLDevice, mem: int, nbytes: int) -> memoryview:
        """The buffer's bytes, mapped for reading until the next request of the session (``settle``)."""
        self.check_usable()
        self.settle()
        if not nbytes:
            return memoryview(b"")
        ptr = self.map(dev, mem, nbytes, CL_MAP_READ)
        self._mapped.append((dev, mem, ptr))
        return memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B")

    def copy(self, dev: CLDevice, src: int, dst: int, nbytes: int) -> None:
        self.check_usable()
        self.settle()
        if nbytes:
            _check(self.lib.clEnqueueCopyBuffer(dev.queue, src, dst, 0, 0, nbytes, 0, None, None),
                   f"clEnqueueCopyBuffer on {dev}")
            dev.dirty = True

    # -- programs -----------------------------------------------------------------------------
    def build(self, dev: CLDevice, source: str, name: str, options: str = "") -> int:
        """A program built from ``source`` for ``dev``; CLBuildError with the compiler's log when it fails."""
        self.check_usable()
        err = _i32()
        data = source.encode()
        text = ctypes.c_char_p(data)
        length = _sz(len(data))
        program = self.lib.clCreateProgramWithSource(dev.context, 1, ctypes.byref(text), ctypes.byref(length),
                                                     ctypes.byref(err))
        _check(err.value, f"clCreateProgramWithSource of {name}")
        handle = (_vp * 1)(dev.handle)
        code = self.lib.clBuildProgram(program, 1, handle, options.encode(), None, None)
        if code != CL_SUCCESS:
            build_log = _info_text(lambda p, param, n, buf, out: self.lib.clGetProgramBuildInfo(
                p, dev.handle, param, n, buf, out), program, CL_PROGRAM_BUILD_LOG)
            self.lib.clReleaseProgram(program)
            raise CLBuildError(f"{BUILD_FAILED}: {name} for {dev}: {error_name(code)}\n{build_log.strip()}")
        return program

    def kernel_names(self, program: int) -> list[str]:
        text = _info_text(self.lib.clGetProgramInfo, program, CL_PROGRAM_KERNEL_NAMES)
        return sorted(n for n in text.split(";") if n)

    def create_kernel(self, program: int, name: str) -> int:
        err = _i32()
        kernel = self.lib.clCreateKernel(program, name.encode(), ctypes.byref(err))
        _check(err.value, f"clCreateKernel({name!r})")
        return kernel

    # -- launches --------------------------------------------------------------------------------
    def launch(self, dev: CLDevice, kernel: int, name: str, global_size: Sequence[int],
               local_size: Sequence[int] | None) -> None:
        """Enqueue ``kernel`` (its arguments set) on ``dev``'s queue; an event is kept while a timer runs."""
        self.check_usable()
        if self._mapped:
            self._unmap()  # (not settle: the kernels of this call stay behind the gate until its finish)
        dims = len(global_size)
        gsize = (_sz * dims)(*global_size)
        lsize = (_sz * dims)(*local_size) if local_size else None
        event = _vp() if self._events is not None else None
        if dev.gate is None:
            err = _i32()
            dev.gate = self.lib.clCreateUserEvent(dev.context, ctypes.byref(err))
            _check(err.value, f"clCreateUserEvent on {dev}")
        gate = _vp(dev.gate)
        code = self.lib.clEnqueueNDRangeKernel(dev.queue, kernel, dims, None, gsize, lsize, 1, ctypes.byref(gate),
                                              ctypes.byref(event) if event is not None else None)
        if code != CL_SUCCESS:
            sizes = f"global size {list(global_size)}" + (f", local size {list(local_size)}" if local_size else "")
            hint = ""
            if code == -54 and local_size:
                hint = ("; each global size must be a multiple of the local size, and the local sizes' product at "
                        f"most the device's work-group size ({dev.attributes['max_threads_per_block']})")
            raise OpenCLError(f"{name}: launching on {dev} with {sizes} failed: {error_name(code)}{hint}")
        dev.dirty = True
        self.launches += 1
        self.last_kernel = name
        if event is not None:
            self._events.append(event.value)

    def finish(self, dev: CLDevice | None = None) -> None:
        """Wait until ``dev`` (every device with work, by default) has run what was enqueued, in a guarded call.

        A kernel that faults in the OpenCL runtime's threads fails this wait with KernelCrashedError, and this
        process's OpenCL is then marked unusable (its runtime lost a thread); CPU work goes on.
        """
        devices = [dev] if dev is not None else [d for d in self.devices if d.dirty]
        if self.broken or not devices:
            return
        shim = _guard()
        finish = ctypes.cast(self.lib.clFinish, _vp).value
        release = ctypes.cast(self.lib.clSetUserEventStatus, _vp).value
        for d in devices:
            d.dirty = False
            gate, d.gate = d.gate, None
            if shim.wb_guard_threads_lost() != self._threads_lost:
                shim.wb_raise(b"KernelCrashed", b"the kernel's own thread died while it was being launched")
                code = WB_CRASHED  # its queue would never finish: do not wait for it
            else:  # the gate opens and the queue drains inside one guarded call: the kernels run only there
                code = shim.wb_guarded_wait(finish, d.queue, release if gate else None, gate)
            if gate:
                self.lib.clReleaseEvent(gate)
            if code in (WB_CRASHED, WB_CANCELLED):
                raise self._lost(d, code)
            _check(code, f"clFinish on {d}")

    def _lost(self, dev: CLDevice, code: int) -> Exception:
        """The error of a wait that a crash (or a cancel) ended; this process's OpenCL is not used again."""
        from .ffi import _last_error

        text = _last_error()
        for prefix in ("KernelCrashed: ", "Cancelled: ", "Interrupted: "):
            text = text[len(prefix):] if text.startswith(prefix) else text
        name = f"{self.last_kernel} (an OpenCL kernel on {dev})"
        self.broken = f"{name} left it unusable ({text})"
        tail = ("the session, its CPU tensors and its modules are intact, but its OpenCL runtime cannot be trusted "
                "again: fix the kernel and open a new session for OpenCL")
        if code == WB_CANCELLED:
            return CallCancelledError(f"{name}: {text}; {tail}")
        return KernelCrashedError(f"{name}: {text}; {tail}")

    # -- timing ----------------------------------------------------------------------------------
    def timed(self, dev: CLDevice, calls: Callable[[int], None]) -> Callable[[int], float]:
        """``run(n)`` for time_repeats: ``calls(n)`` with the launches' profiling events recorded, returning the
        seconds the kernels ran on the device (their CL_PROFILING_COMMAND_END - START, summed), as TVM's timer."""

        def run(n: int) -> float:
            self._events = events = []
            try:
                calls(n)
                self.finish(dev)
                total = 0
                start, end = ctypes.c_uint64(), ctypes.c_uint64()
                for event in events:
                    code = self.lib.clGetEventProfilingInfo(event, CL_PROFILING_COMMAND_START, 8,
                                                            ctypes.byref(start), None)
                    code = code or self.lib.clGetEventProfilingInfo(event, CL_PROFILING_COMMAND_END, 8,
                                                                    ctypes.byref(end), None)
                    _check(code, f"clGetEventProfilingInfo on {dev}")
                    total += max(0, end.value - start.value)
            finally:
                self._events = None
                for event in events:
                    self.lib.clReleaseEvent(event)
            return total / 1e9

        return run


WB_CRASHED, WB_CANCELLED = -2, -3  # a guarded call's results (native/kernel_runtime.h)
_shim: Any = None


def _guard() -> Any:
    """The kernel runtime (the shim) with its guarded wait, which clFinish runs in."""
    global _shim
    if _shim is None:
        from .ffi import shim

        lib = shim()
        lib.wb_guarded_wait.argtypes = [_vp, _vp, _vp, _vp]
        lib.wb_guarded_wait.restype = ctypes.c_int
        lib.wb_guard_threads_lost.restype = ctypes.c_int64
        _shim = lib
    return _shim


_runtime: OpenCLRuntime | None = None
_runtime_lock = threading.Lock()


def runtime() -> OpenCLRuntime:
    """This process's OpenCL runtime (opened on first use); DeviceNotFoundError when there is no OpenCL."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = OpenCLRuntime()
        return _runtime


def active_runtime() -> OpenCLRuntime | None:
    """The runtime if this process has opened one, else None (never opens it)."""
    return _runtime


# -- tensors ----------------------------------------------------------------------------------------
from .ffi import DLDataType, DLDevice, DLTensor  # noqa: E402  (ctypes structures only)
from .storage import DeviceTensor  # noqa: E402


class CLTensor(DeviceTensor):
    """A tensor in an OpenCL device's memory: one ``cl_mem`` buffer, which is the DLTensor's ``data``.

    The same requests as a CPU tensor: ``receive(bulk)`` maps the buffer and reads the bulk part into it,
    ``contents()`` maps it for reading (until the session's next request); ``numpy()`` is a copy.
    """

    def __init__(self, shape: Sequence[int], dtype: Sequence[int], device: tuple[int, int],
                 admit: Callable[[DeviceTensor], None] | None = None, zero: bool = True):
        shape, code, bits, lanes = self._describe(shape, dtype, admit)
        rt = runtime()
        self._rt = rt
        self.device = rt.device(device[1])
        self._mem = None  # (DeviceTensor's mmap; this tensor has none)
        self.mem: int | None = rt.alloc(self.device, self.nbytes, zero=zero)
        self._shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.dltensor = DLTensor(data=self.mem, device=DLDevice(*device), ndim=len(shape),
                                 dtype=DLDataType(code, bits, lanes), shape=self._shape, strides=None, byte_offset=0)

    def receive(self, bulk: Any) -> None:
        if bulk.size != self.nbytes:  # before the buffer is mapped: a refused write leaves the tensor as it was
            raise BadRequestError(f"expected {self.nbytes} bytes of data, the request carries {bulk.size}")
        self._rt.write(self.device, self._live(), self.nbytes, bulk.read_into)

    def contents(self) -> memoryview:
        return self._rt.read(self.device, self._live(), self.nbytes)

    def view(self) -> memoryview:
        return self.contents()

    def numpy(self):
        """A copy of the tensor's contents as a numpy array (it lives on the device, not in this process)."""
        import numpy as np

        data = bytes(self.contents())
        self._rt.settle()
        return np.frombuffer(data, dtype=self.dtype if self.dtype != "bool" else np.bool_).reshape(self.shape).copy()

    def _live(self) -> int:
        if self.mem is None:
            raise BadRequestError("this OpenCL tensor was freed")
        return self.mem

    def release(self) -> None:
        mem, self.mem = self.mem, None
        if mem is not None:
            self._rt.free(self.device, mem)

    def __repr__(self) -> str:
        return f"<CLTensor shape={self.shape} dtype={self.dtype} on {self.device}>"
