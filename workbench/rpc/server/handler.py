"""The serving side of a session: one handler object per client session.

It owns the session's workspace, tensors and loaded modules, and answers the
protocol's requests. The same class serves a forked server worker, a stdio
server (PopenSession) and an in-process LocalSession.
"""
from __future__ import annotations

import inspect
import logging
import os
import platform
import re
import sys
import tempfile
import traceback
from typing import Any, BinaryIO, Callable

from ...cc.compiler import target_triple
from ...errors import BadRequestError, CallCancelledError, DeviceNotFoundError, RPCError, code_of, error_from_code
from ...runtime import device_api, registry
from ...runtime.devices import DEVICE_NAMES, device_name
from ...runtime.ffi import NativeFunction, NativeLibrary, flush_cache
from ...runtime.modules import link_tar, load_module
from ...runtime.quota import Quotas, format_size
from ...runtime.storage import SPARE, DeviceTensor
from ...runtime.tvm_bridge import TVMFunction
from ...runtime.timer import check_time_options, python_runner, time_repeats
from ...runtime.workspace import PREALLOCATE_MIN, PREALLOCATE_WINDOW, Workspace, preallocate
from ..wire.protocol import Ext, Handle, Kind

log = logging.getLogger(__name__)

CPU = 1
_TENSOR, _MODULE, _FUNCTION = int(Ext.TENSOR), int(Ext.MODULE), int(Ext.FUNCTION)
_EXT_NAMES = {_TENSOR: "tensor", _MODULE: "module", _FUNCTION: "function"}
_PLAIN_RESULTS = frozenset({int, float, str, bytes, bool, type(None)})  # call results sent as they are


def device_info() -> dict[str, Any]:
    """What this serving side is: published in the handshake (and to the tracker)."""
    info = {
        "devices": [list(d) for d in device_api.published()],
        "arch": platform.machine(),
        "system": platform.system(),
        "cpu_count": os.cpu_count() or 1,
        "pid": os.getpid(),
        "target": target_triple(),
    }
    if device_api.details():  # the attributes of the devices besides the CPU (TVM's names: docs/protocol.md)
        info["device_details"] = device_api.details()
    return info


class Bulk:
    """The bulk part of a request: read it into a buffer, or drop it."""

    def __init__(
        self,
        size: int,
        read_into: Callable[[memoryview], None],
        discard: Callable[[int], None],
        to_fd: Callable[[int, int, int], None],
    ):
        self.size = size
        self._read_into = read_into
        self._discard = discard
        self._to_fd = to_fd
        self.consumed = False

    def read_into(self, view: memoryview) -> None:
        if len(view) != self.size:
            raise BadRequestError(f"expected {len(view)} bytes of data, the request carries {self.size}")
        self.consumed = True
        self._read_into(view)

    def write_to(self, fd: int) -> None:
        """Stream the data into the open file ``fd``, its disk reserved a window at a time (``preallocate``)
        just before that window's bytes are read: a declared size never holds more disk than its bytes fill
        and one window, however slowly they come.

        ``to_fd(fd, n, follow)`` writes the next ``n`` bytes; if the write fails it drops them and the
        ``follow`` bytes after them, so the stream stays in step, and raises.
        """
        self.consumed = True
        for start in range(0, self.size, PREALLOCATE_WINDOW):
            n = min(PREALLOCATE_WINDOW, self.size - start)
            if self.size >= PREALLOCATE_MIN:
                preallocate(fd, start, n)
            self._to_fd(fd, n, self.size - start - n)

    def drop(self) -> None:
        if not self.consumed:
            self.consumed = True
            self._discard(self.size)


def in_order(write: Callable[[int, int, int], None]) -> Callable[[int, int, int], None]:
    """A ``Bulk``'s ``to_fd`` over data already at hand: ``write(fd, start, stop)`` for each call's next bytes.

        >>> to_fd = in_order(lambda fd, start, stop: write_all(fd, data[start:stop]))  # doctest: +SKIP
    """
    done = 0

    def to_fd(fd: int, n: int, follow: int) -> None:
        nonlocal done
        write(fd, done, done + n)
        done += n

    return to_fd


class Reply:
    """A reply that carries a bulk part; operations without one return their value directly."""

    __slots__ = ("value", "bulk", "file")

    def __init__(self, value: Any = None, bulk: memoryview | bytes | None = None, file: tuple[BinaryIO, int] | None = None):
        self.value = value
        self.bulk = bulk
        self.file = file


class CallOutcome:
    """A call the worker's fast path (``_serve.c``) made, for ``SessionHandler.handle`` to finish: the function,
    and its result or the exception it raised. The control part of a CALL frame that ``next_request`` returns
    when the rest is Python's (an error, a result sent as handles, a device to sync); never from the network."""

    __slots__ = ("fn", "result", "exc")

    def __init__(self, fn: Callable, result: Any, exc: BaseException | None):
        self.fn, self.result, self.exc = fn, result, exc


class SessionHandler:
    """One session's objects and workspace, and the answers to its requests.

    ``quotas`` (None: no limits, as an in-process LocalSession has) bound its
    workspace and its tensors; a request over one is refused with
    QuotaExceededError and the session goes on.
    """

    def __init__(self, workspace: Workspace | None = None, system_libs: list[NativeLibrary] | None = None,
                 quotas: Quotas | None = None):
        self.workspace = workspace or Workspace()
        self.quotas = quotas or Quotas()
        self.workspace.set_quotas(self.quotas)
        if self.quotas.tensor_bytes:  # released tensors' memory kept for reuse: a quarter of the quota at most
            SPARE.limit = min(SPARE.limit, self.quotas.tensor_bytes // 4)
        self.tensor_bytes = 0  # of the live tensors the client allocated
        self._system_libs = system_libs or []
        self._objects: dict[int, Any] = {}
        self._shared: dict[int, int] = {}  # handles per tensor, for tensors a call handed out (_hand_out)
        self._next = 1
        self._ops: dict[int, Callable[[list, Bulk | None], Any]] = {
            Kind.PING: self.ping,
            Kind.UPLOAD: self.upload,
            Kind.DOWNLOAD: self.download,
            Kind.REMOVE: self.remove,
            Kind.LISTDIR: self.listdir,
            Kind.LOAD_MODULE: self.load_module,
            Kind.LINK_MODULE: self.link_module,
            Kind.GET_FUNCTION: self.get_function,
            Kind.MODULE_FUNCTION: self.module_function,
            Kind.CALL: self.call,
            Kind.TENSOR_ALLOC: self.tensor_alloc,
            Kind.TENSOR_WRITE: self.tensor_write,
            Kind.TENSOR_READ: self.tensor_read,
            Kind.FREE: self.free,
            Kind.TIME_EVAL: self.time_eval,
            Kind.SYSTEM_LIB: self.system_lib,
        }

    # -- dispatch -------------------------------------------------------------
    def handle(self, kind: int, args: Any, bulk: Bulk | None) -> Any:
        """The reply to one request: its value, or a ``Reply`` when it carries bulk data.

        Errors name paths relative to the workspace, never the server's own directories.
        """
        op = self._ops.get(kind)
        try:
            if bulk is None and op is not None and type(args) is list:
                return op(args, None)  # the common case, kept short
            if op is None:
                raise BadRequestError(f"unknown request kind {kind}; this server speaks protocol version 1")
            if type(args) is CallOutcome and kind == Kind.CALL:
                return self.finish_call(args)
            if not isinstance(args, list):
                raise BadRequestError(f"request {Kind(kind).name}: arguments must be a list, not {type(args).__name__}")
            return op(args, bulk)
        except Exception as exc:
            clean = self._scrub(exc)
            if clean is exc:
                raise
            raise clean from None
        finally:
            if bulk is not None:
                bulk.drop()

    def _scrub(self, exc: Exception) -> Exception:
        """``exc`` with the workspace's absolute paths made relative (the same object if it names none)."""
        text = str(exc)
        ws = self.workspace
        if ws.base not in text:
            return exc
        for prefix, shown in ((ws.root + os.sep, ""), (ws.private + os.sep, ""), (ws.root, "."), (ws.base, "<session>")):
            text = text.replace(prefix, shown)
        if isinstance(exc, RPCError):
            try:
                return type(exc)(text, code=exc.code)
            except TypeError:
                return error_from_code(exc.code, text)
        if isinstance(exc, OSError):
            return error_from_code(code_of(exc), text)
        return exc  # an error of the code the client ran: the server reports it with its traceback

    def close(self) -> None:
        tensors = {id(o): o for o in self._objects.values() if isinstance(o, DeviceTensor)}  # once each
        for tensor in tensors.values():
            tensor.release()
        self._objects.clear()
        self._shared.clear()
        self.tensor_bytes = 0
        self.workspace.cleanup()

    # -- objects --------------------------------------------------------------
    # called once, when the session gets its first native kernel, or a function whose calls wait in a guarded
    # call (``guarded = True``: an OpenCL kernel) (the worker starts its call watcher then,
    # not before: loading the shim early would bind a TVM module's error setter to ours)
    on_native_function: Callable[[], None] | None = None
    on_python_function: Callable[[], None] | None = None  # the same, for its first Python function

    def _add(self, ext: int, obj: Any) -> Handle:
        if self.on_native_function is not None and (type(obj) is NativeFunction or getattr(obj, "guarded", False)):
            self.on_native_function()
            self.on_native_function = None
        elif self.on_python_function is not None and ext == Ext.FUNCTION and type(obj) is not NativeFunction:
            self.on_python_function()
            self.on_python_function = None
        handle = Handle(ext, self._next)
        self._next += 1
        self._objects[handle.data] = obj  # keyed by the id's 8 wire bytes: no decoding per lookup
        return handle

    def _get(self, handle: Any, ext: int, cls: type | tuple[type, ...]) -> Any:
        """The live object of type ``cls`` that ``handle`` (of handle type ``ext``) names, or BadRequestError."""
        obj = self._objects.get(handle.data) if type(handle) is Handle and handle.code == ext else None
        if obj is None or not isinstance(obj, cls):
            raise BadRequestError(self._not_a(handle, ext))
        return obj

    def _not_a(self, value: Any, ext: int) -> str:
        """Why ``value`` is not a live object of handle type ``ext`` (an error message)."""
        what = _EXT_NAMES[ext]
        if type(value) is not Handle:
            return f"expected a {what} handle, got {type(value).__name__} {value!r:.60}"
        if value.code != ext:
            return f"{value!r} is a {_EXT_NAMES[value.code]} handle, where a {what} is expected"
        if value.data not in self._objects:
            return f"{value!r} is not a live {what} of this session (was it freed, or is it another session's?)"
        return f"{value!r} is not a {what} of this session (that id names another kind of object)"

    def tensor(self, handle: Any) -> DeviceTensor:
        """The live tensor ``handle`` names, or BadRequestError (TVM-protocol sessions copy into it directly)."""
        return self._get(handle, _TENSOR, DeviceTensor)

    def _resolve_args(self, args: list) -> list:
        out = []
        for i, a in enumerate(args):
            if type(a) is Handle:
                if a.code != _TENSOR:
                    raise BadRequestError(
                        f"argument {i}: {a!r} is a {_EXT_NAMES[a.code]} handle; only tensors, numbers, "
                        "strings and bytes can be passed to a function"
                    )
                a = self._get(a, _TENSOR, DeviceTensor)
            out.append(a)
        return out

    @staticmethod
    def _arity(args: list, n: int, name: str) -> None:
        if len(args) != n:
            raise BadRequestError(f"request {name} takes {n} arguments, got {len(args)}")

    @staticmethod
    def check_device(device_type: int, device_id: int) -> None:
        if type(device_type) is not int or type(device_id) is not int:
            raise BadRequestError(f"a device is [device_type, device_id], two ints (e.g. [1, 0]), not {[device_type, device_id]!r:.80}")
        if (device_type, device_id) not in device_api.published():
            have = ", ".join(device_name(*d) for d in device_api.published())
            raise DeviceNotFoundError(
                f"this server has no {device_name(device_type, device_id)}; it has: {have}"
                + ("" if device_type in DEVICE_NAMES else f" (unknown device type {device_type})")
            )

    # -- requests ---------------------------------------------------------------
    def ping(self, args: list, bulk: Bulk | None) -> Any:
        tensors = sum(isinstance(o, DeviceTensor) for o in self._objects.values())
        return {"objects": len(self._objects), "tensors": tensors, "tensor_bytes": self.tensor_bytes}

    def upload(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 1, "UPLOAD")
        self.workspace.write(args[0], bulk.write_to if bulk else lambda fd: None, bulk.size if bulk else 0)
        return None

    def download(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 1, "DOWNLOAD")
        f, size = self.workspace.open_read(args[0])
        return Reply(size, file=(f, size))

    def remove(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 1, "REMOVE")
        self.workspace.remove(args[0])
        return None

    def listdir(self, args: list, bulk: Bulk | None) -> Any:
        if len(args) > 1:
            raise BadRequestError(f"request LISTDIR takes 0 or 1 arguments, got {len(args)}")
        return self.workspace.listdir(args[0] if args else ".")

    def _module_reply(self, lib: Any) -> list:
        return [self._add(Ext.MODULE, lib), lib.names, lib.entry_name]

    def load_module(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 1, "LOAD_MODULE")
        return self._module_reply(load_module(self.workspace.resolve(args[0]), self.workspace))

    def link_module(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 1, "LINK_MODULE")
        path = self.workspace.resolve(args[0])
        if not path.endswith(".tar"):
            raise BadRequestError(f"download_linked_module takes a .tar of object files, not {args[0]!r}")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no file {args[0]!r} in the session workspace; upload it first")
        so = link_tar(path, self.workspace.private_path(os.path.basename(path) + ".so"), self.workspace)
        try:
            f = open(so, "rb")
        finally:
            os.unlink(so)  # sent from the open file, then gone: the client has it (not counted against the quota)
        size = os.fstat(f.fileno()).st_size
        return Reply(size, file=(f, size))

    def system_lib(self, args: list, bulk: Bulk | None) -> Any:
        lib = NativeLibrary(None)
        lib.names = sorted({n for l in self._system_libs for n in l.names})
        return self._module_reply(lib)

    def get_function(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 1, "GET_FUNCTION")
        return self._add(Ext.FUNCTION, registry.get_global_func(_name(args[0], "function")))

    def module_function(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 2, "MODULE_FUNCTION")
        lib = self._get(args[0], _MODULE, object)
        if not hasattr(lib, "get_function"):  # NativeLibrary, TVMModule, an OpenCL source module...
            raise BadRequestError(self._not_a(args[0], _MODULE))
        return self._add(Ext.FUNCTION, lib.get_function(_name(args[1], "kernel")))

    def _function(self, handle: Any) -> Callable:
        fn = self._objects.get(handle.data) if type(handle) is Handle and handle.code == _FUNCTION else None
        if fn is None or not callable(fn):
            raise BadRequestError(self._not_a(handle, _FUNCTION))
        return fn

    def call(self, args: list, bulk: Bulk | None) -> Any:
        if len(args) != 2 or type(args[1]) is not list:
            raise BadRequestError(f"request CALL takes [function, [arguments]], got {args!r:.200}")
        handle = args[0]
        fn = self._objects.get(handle.data) if type(handle) is Handle and handle.code == _FUNCTION else None
        if fn is None:
            fn = self._function(handle)  # raises the error
        call_args = args[1]
        if call_args:
            call_args = self._resolve_args(call_args)
        try:
            result = fn(*call_args)
            if device_api.SYNC:  # a device whose calls enqueue work (OpenCL): the call ends when it has run
                _sync()
            return result if type(result) in _PLAIN_RESULTS else self._result(result)  # the rest: refused when sent
        except TypeError as exc:
            if not callable(fn):  # a forged handle: a function's ext with another object's id
                raise BadRequestError(self._not_a(handle, _FUNCTION)) from None
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                # raised by the call itself (the arguments do not fit), not inside the function
                raise BadRequestError(f"{_callable_name(fn)}: {exc}") from None
            raise

    def finish_call(self, outcome: CallOutcome) -> Any:
        """The reply to a call the fast path made (``_serve.c``), as ``call`` makes it from the same outcome."""
        fn, result = outcome.fn, outcome.result
        try:
            if outcome.exc is not None:
                # raised by the call itself (from C: no frame in its traceback), or inside the function; re-raised
                # here, the traceback gains this one frame, as ``call``'s own frame heads it on the Python path
                raise outcome.exc
            if device_api.SYNC:
                _sync()
            return result if type(result) in _PLAIN_RESULTS else self._result(result)
        except TypeError as exc:
            if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                raise BadRequestError(f"{_callable_name(fn)}: {exc}") from None
            raise
        finally:
            outcome.exc = None  # no cycle through the traceback

    def _result(self, value: Any) -> Any:
        """A call's result as it travels: a tensor (or a host array, copied to the device) and a function (a
        closure) as handles of this session, also inside lists, tuples and dicts, as TVM returns them."""
        if isinstance(value, DeviceTensor):
            return self._hand_out(value)
        if hasattr(value, "__array_interface__") and getattr(value, "ndim", 0) > 0:  # a numpy array, host-side
            return self._hand_out(_device_copy(value))
        if isinstance(value, (list, tuple)):
            return [v if type(v) in _PLAIN_RESULTS else self._result(v) for v in value]
        if isinstance(value, dict):
            return {k: v if type(v) in _PLAIN_RESULTS else self._result(v) for k, v in value.items()}
        if callable(value) and not isinstance(value, type) and not hasattr(value, "__array_interface__"):
            return self._add(Ext.FUNCTION, value)
        return value

    def _hand_out(self, tensor: DeviceTensor) -> Handle:
        """A new handle to ``tensor``; a tensor with several handles is released with the last one freed."""
        count = self._shared.get(id(tensor))
        if count is None:
            count = sum(1 for o in self._objects.values() if o is tensor)
            if not count:  # made by the function: the session's from now on
                self.tensor_bytes += tensor.nbytes
        self._shared[id(tensor)] = count + 1
        return self._add(Ext.TENSOR, tensor)

    def tensor_alloc(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 4, "TENSOR_ALLOC")  # shape and dtype are checked by DeviceTensor
        shape, dtype, dev_type, dev_id = args
        self.check_device(dev_type, dev_id)
        admit = self._admit if self.quotas.tensor_bytes else None
        if dev_type == CPU:
            tensor = DeviceTensor(shape, dtype, (dev_type, dev_id), admit, overwritten=bulk is not None)
        else:
            tensor = device_api.api(dev_type).tensor(shape, dtype, (dev_type, dev_id), admit, zero=bulk is None)
        try:
            if bulk is not None:
                tensor.receive(bulk)
        except BaseException:
            tensor.release()
            raise
        self.tensor_bytes += tensor.nbytes
        return self._add(Ext.TENSOR, tensor)

    def _admit(self, tensor: DeviceTensor) -> None:
        """QuotaExceededError if ``tensor`` would take the session's tensors over their quota."""
        if self.tensor_bytes + tensor.nbytes > self.quotas.tensor_bytes:
            raise self.quotas.tensor_bytes_error(
                f"a {tensor.dtype} tensor of shape {tensor.shape} ({format_size(tensor.nbytes)})", self.tensor_bytes)

    def tensor_write(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 1, "TENSOR_WRITE")
        tensor = self._get(args[0], _TENSOR, DeviceTensor)
        if bulk is None:
            raise BadRequestError(f"TENSOR_WRITE carries no data; the tensor holds {tensor.nbytes} bytes")
        tensor.receive(bulk)
        return None

    def tensor_read(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 1, "TENSOR_READ")
        tensor = self._get(args[0], _TENSOR, DeviceTensor)
        return Reply(tensor.nbytes, bulk=tensor.contents())

    def free(self, args: list, bulk: Bulk | None) -> Any:
        for handle in args:
            if isinstance(handle, Handle):
                obj = self._objects.pop(handle.data, None)
                if isinstance(obj, DeviceTensor):
                    left = self._shared.pop(id(obj), 1) - 1  # handles a call handed out too (_hand_out)
                    if left > 0:
                        self._shared[id(obj)] = left
                    else:
                        self.tensor_bytes -= obj.nbytes
                        obj.release()
        return None

    cancel_pending: Callable[[], bool] | None = None  # set by the serving loop: did the client send CANCEL?
    fast: Any = None  # set by the serving loop: its C fast path (``_serve.Server``: ``calling``), if it has one

    def _cancellable(self, preproc: Callable[[], Any] | None, name: str, counts: list[int],
                     repeat: int) -> Callable[[], Any] | None:
        """``preproc`` that first stops the timing loop (CallCancelledError) when the client sent CANCEL."""
        pending = self.cancel_pending
        if pending is None:
            return preproc

        def check() -> None:
            if pending():
                raise CallCancelledError(
                    f"TIME_EVAL of {name} cancelled by the client after {len(counts)} of {repeat} repeats")
            if preproc is not None:
                preproc()

        return check

    def time_eval(self, args: list, bulk: Bulk | None) -> Any:
        self._arity(args, 4, "TIME_EVAL")
        handle, where, options, call_args = args
        if type(where) is not list or len(where) != 2:
            raise BadRequestError(f"TIME_EVAL: the device is [device_type, device_id], not {where!r:.80}")
        self.check_device(*where)
        fn = self._function(handle)
        options = check_time_options(options)
        if type(call_args) is not list:
            raise BadRequestError(f"TIME_EVAL: the arguments are a list, not {type(call_args).__name__}")
        values = self._resolve_args(call_args)
        preproc_name = options.pop("f_preproc")
        flush_bytes = options.pop("cache_flush_bytes")
        preproc = None
        if preproc_name:
            pre = registry.get_global_func(preproc_name)
            _check_binds(pre, values, f"f_preproc {preproc_name!r}")
            preproc = lambda: pre(*values)  # noqa: E731
        warmup = flush = None
        device_timer = None
        if where[0] != CPU:  # timed on the device's own clock (OpenCL: its queue's profiling events, as TVM)
            device_timer = device_api.api(where[0]).timer(where[1], lambda n: _repeat(fn, values, n))
        if device_timer is not None:
            run = device_timer
            if flush_bytes:
                flush = lambda: flush_cache(flush_bytes)  # noqa: E731
        elif isinstance(fn, NativeFunction):
            run = lambda n: fn.time_calls(values, n, flush_bytes)  # noqa: E731  (the flush in C, by the clock)
            if flush_bytes:
                warmup = lambda n: fn.time_calls(values, n)  # noqa: E731
        else:
            _check_binds(fn, values, _callable_name(fn))
            run = fn.runner(tuple(values)) if isinstance(fn, TVMFunction) else python_runner(fn, tuple(values))
            if flush_bytes:
                flush = lambda: flush_cache(flush_bytes)  # noqa: E731
        counts: list[int] = []
        preproc = self._cancellable(preproc, getattr(fn, "name", None) or _callable_name(fn), counts, options.get("repeat", 1))
        results: list[Any] = time_repeats(run, preproc=preproc, flush=flush, warmup=warmup, counts=counts, **options)
        return results + [counts]  # seconds per call per repeat, then the calls each repeat made (docs/protocol.md)


def _sync() -> None:
    """Wait for the work the call enqueued on devices that run asynchronously (``device_api.SYNC``)."""
    for wait in device_api.SYNC:
        wait()


def _repeat(fn: Callable, values: list, n: int) -> None:
    for _ in range(n):
        fn(*values)


def _device_copy(array: Any) -> DeviceTensor:
    """A CPU tensor holding a copy of the host (numpy) array a function returned."""
    import numpy as np

    from ...runtime.tensors import dl_dtype

    host = np.ascontiguousarray(array)
    tensor = DeviceTensor(list(host.shape), dl_dtype(host.dtype), (CPU, 0))
    tensor.view()[:] = host.reshape(-1).view(np.uint8)
    return tensor


def _name(value: Any, what: str) -> str:
    """A function or kernel name from a request, or BadRequestError."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise BadRequestError(f"a {what} name is a non-empty string without NUL bytes, not {value!r:.80}")
    return value


def _callable_name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _check_binds(fn: Callable, values: list, name: str) -> None:
    """BadRequestError if ``fn`` (a Python function) cannot take ``values``: said once, before any timing."""
    try:
        signature = inspect.signature(fn, follow_wrapped=False)  # what the call really binds against
    except (TypeError, ValueError):
        return  # no signature to check (a builtin): the call itself will say
    try:
        signature.bind(*values)
    except TypeError as exc:
        raise BadRequestError(f"{name}: {exc}") from None


# frames a client never sees: this package's and the standard library's (what a registered function called)
_SERVER_CODE = (os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep,
                os.path.dirname(os.__file__) + os.sep, "<frozen ")
# where this server lives: its install, its Python, its temporary files, its user's home (not what clients name)
_SERVER_PLACES = sorted({p.rstrip(os.sep) for p in (
    os.path.dirname(_SERVER_CODE[0].rstrip(os.sep)), sys.prefix, sys.base_prefix, sys.exec_prefix,
    tempfile.gettempdir(), os.path.expanduser("~"), os.path.dirname(os.__file__)) if len(p) > 1}, key=len, reverse=True)
_SERVER_PATH = re.compile("(?:" + "|".join(re.escape(p) for p in _SERVER_PLACES) + r")/(?:[^\s'\":/]+/)*([^\s'\":/]+)")


def scrub_paths(text: str) -> str:
    """``text`` with every path inside the server's own places (its install, its Python, its temporary
    files, its home) cut to its last part: a client learns no path of the server's. Paths a client named
    itself stay as they are.

        >>> scrub_paths(f"cannot read '{tempfile.gettempdir()}/wb-session-x/kernels.so': bad ELF")
        "cannot read 'kernels.so': bad ELF"
    """
    return _SERVER_PATH.sub(r"\1", text)


def error_text(exc: BaseException) -> str:
    """The message of an ERROR reply for ``exc``, with no path of the server's and none of its own frames.

    An error the server raised on purpose is its message. Any other (an error in a registered Python
    function, or one the server did not foresee) is its type and message, with the frames of the code
    that raised it outside this package and the standard library (a registered function's own), file
    names only; the whole
    traceback goes to the server's log (``serve_requests``).
    """
    if isinstance(exc, (RPCError, OSError)):
        return scrub_paths(str(exc))
    text = f"{type(exc).__name__}: {scrub_paths(str(exc))}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_SERVER_CODE)]
    if frames:
        for frame in frames:
            frame.filename = os.path.basename(frame.filename)
        tail = "".join(traceback.format_list(frames[-10:])).rstrip()
        text += f"\n\nRemote traceback (most recent call last):\n{tail}"
    return text
