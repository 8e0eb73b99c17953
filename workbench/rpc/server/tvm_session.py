"""A TVM-protocol session on a workbench server: TVM's packets served by the session handler.

The server's event loop runs TVM's handshake and reads its INIT_SERVER packet
(``serve.py``), then forks a worker as for our sessions; the worker answers the
INIT_SERVER (``accept_tvm_session``) and runs ``serve_tvm_requests`` where our
sessions run ``serve_requests``. Every request becomes one of the handler's
(``SessionHandler.handle(Kind..., args, bulk)``), so the workspace sandbox,
the crash guard, the quotas and the error scrubbing are the same for both
protocols; the worker's timers, crash counter and call watchers too.

Handles the client holds are the handler's object ids (a tensor's "data
pointer" is its id) or, from ``LOCAL_BASE`` up, functions this module serves
itself: the ``tvm.rpc.server.*`` functions, ``runtime.RPCTimeEvaluator`` and
the time evaluators it returns, ``tvm.contrib.random.random_fill*``,
``ffi.SystemLib``. docs/protocol.md ("TVM's protocol on workbench servers")
lists them.

    serve_tvm_requests(accept_tvm_session(sock), SessionHandler(workspace))   # in a worker
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import socket
import struct
import threading
from typing import Any, BinaryIO, Callable, NamedTuple

from ...errors import (
    BadRequestError,
    ConnectionClosedError,
    ErrorCode,
    KernelCrashedError,
    PathDeniedError,
    RPCError,
    UnsupportedError,
    code_of,
)
from ...runtime import device_api
from ...runtime.ffi import DLDataType, DLTensor
from ...runtime.storage import DeviceTensor, check_dtype, check_shape, dtype_name
from ..wire.protocol import Ext, Handle, Kind, write_all
from ..wire.tvm import (
    MAX_PACKET,
    RETURN_VOID,
    Code,
    DataType,
    Device,
    PacketReader,
    Pointer,
    Ref,
    StreamedBytes,
    TensorArg,
    TVMChannel,
    TypeIndex,
    bytes_return_header,
    call_return,
    copy_ack_header,
    exception_packet,
    read_packed,
    read_tensor,
    return_packet,
)
from .handler import Bulk, Reply, SessionHandler, error_text, in_order

log = logging.getLogger(__name__)

LOCAL_BASE = 1 << 62  # handles of the functions this module serves; the handler's ids stay far below
CACHE_FLUSH_PREPROC = "cache_flush_cpu_non_first_arg"  # TVM's f_preproc for cold-cache timing
ATTR_EXIST, ATTR_TOTAL_GLOBAL_MEMORY = 0, 14  # TVM's DeviceAttrKind values a CPU answers
_NUMPY_KINDS = {"float16": "f", "float32": "f", "float64": "f", "bool": "b",
                **{f"{sign}int{bits}": sign[:1] or "i" for sign in ("", "u") for bits in (8, 16, 32, 64)}}


class Shutdown(Exception):
    """The client sent SHUTDOWN: the session ends cleanly."""


class Out(NamedTuple):
    """A reply: ``head`` bytes, then (for copies and downloads) a tensor's memory or a file's bytes."""

    head: bytes
    view: memoryview | None = None
    file: tuple[BinaryIO, int] | None = None


class FileBytes(NamedTuple):
    """A byte-array return value read from a file (a download), sent without holding it in memory."""

    file: BinaryIO
    size: int


class TensorView:
    """A tensor argument that describes part of a session tensor (another shape, dtype or a byte offset),
    as TVM's views (``Tensor._create_view``) send it; checked to lie inside the tensor's memory."""

    def __init__(self, base: DeviceTensor, arg: TensorArg):
        shape = check_shape(list(arg.shape))
        code, bits, lanes = check_dtype(list(arg.dtype))
        self.itemsize = (bits * lanes + 7) // 8
        self.nbytes = math.prod(shape) * self.itemsize
        if arg.byte_offset < 0 or arg.byte_offset + self.nbytes > base.nbytes:
            raise BadRequestError(
                f"a tensor argument of {self.nbytes} bytes at byte offset {arg.byte_offset} overruns its "
                f"allocation of {base.nbytes} bytes")
        self.base, self.offset = base, arg.byte_offset
        self.shape, self.dtype = tuple(shape), dtype_name(code, bits, lanes)
        self._shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.dltensor = DLTensor(data=base.dltensor.data + arg.byte_offset, device=base.dltensor.device,
                                 ndim=len(shape), dtype=DLDataType(code, bits, lanes), shape=self._shape,
                                 strides=None, byte_offset=0)

    def view(self) -> memoryview:
        return self.base.view()[self.offset:self.offset + self.nbytes]

    def numpy(self):
        """A numpy array over this part of the tensor's memory (for registered Python functions)."""
        import numpy as np

        dtype = self.dtype if self.dtype != "bool" else np.bool_
        return np.frombuffer(self.view(), dtype=dtype, count=math.prod(self.shape)).reshape(self.shape)

    def __repr__(self) -> str:
        return f"<TensorView shape={self.shape} dtype={self.dtype} of {self.base!r} at {self.offset}>"


def accept_tvm_session(sock: socket.socket) -> TVMChannel:
    """Answer the INIT_SERVER the server read in its handshake: the session is open. The channel to serve it on."""
    chan = TVMChannel(sock)
    chan._sendall(RETURN_VOID)
    return chan


def _memory_bulk(data: bytes) -> Bulk:
    """A ``Bulk`` over bytes already read (a small upload)."""
    src = memoryview(data)

    def read_into(view: memoryview) -> None:
        view[:] = src

    return Bulk(len(src), read_into, lambda n: None, in_order(lambda fd, start, stop: write_all(fd, src[start:stop])))


def _arity(args: list, n: int, name: str) -> None:
    if len(args) != n:
        raise BadRequestError(f"{name} takes {n} arguments, got {len(args)}")


def _str(args: list, i: int, name: str) -> str:
    if not isinstance(args[i], str):
        raise BadRequestError(f"{name}: argument {i} must be a string, not {type(args[i]).__name__}")
    return args[i]


def _int(args: list, i: int, name: str) -> int:
    if type(args[i]) is not int:
        raise BadRequestError(f"{name}: argument {i} must be an int, not {type(args[i]).__name__}")
    return args[i]


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise BadRequestError("a string argument that is not UTF-8") from None


def _not_found(exc: Exception) -> bool:
    return isinstance(exc, RPCError) and exc.code == ErrorCode.NOT_FOUND


class TVMSession:
    """One TVM-protocol session: decodes a packet, serves it with ``handler``, returns the reply (``Out``)."""

    def __init__(self, chan: TVMChannel, handler: SessionHandler):
        self.chan = chan
        self.handler = handler
        self._local: dict[int, Callable[[list, PacketReader], Any]] = {}
        self._owned: dict[int, Handle] = {}  # a local function's handler object, freed with it
        self._next_local = LOCAL_BASE
        self.builtins: dict[str, Callable[[list, PacketReader], Any]] = {
            "tvm.rpc.server.upload": self.upload,
            "tvm.rpc.server.download": self.download,
            "tvm.rpc.server.remove": self.remove,
            "tvm.rpc.server.listdir": self.listdir,
            "tvm.rpc.server.load_module": self.load_module,
            "tvm.rpc.server.download_linked_module": self.download_linked_module,
            "tvm.rpc.server.ModuleGetFunction": self.module_get_function,
            "tvm.rpc.server.ImportModule": self.import_module,
            "runtime.RPCTimeEvaluator": self.time_evaluator,
            "tvm.contrib.random.random_fill": self.random_fill,
            "tvm.contrib.random.random_fill_for_measure": self.random_fill,
            "ffi.SystemLib": self.system_lib,
        }
        self._syscalls: dict[int, Callable[[list], Any]] = {
            Code.GET_GLOBAL_FUNC: self.get_global_func,
            Code.FREE_HANDLE: self.free_handle,
            Code.DEV_SET_DEVICE: self.set_device,
            Code.DEV_GET_ATTR: self.get_attr,
            Code.DEV_ALLOC_DATA: self.alloc_data,
            Code.DEV_FREE_DATA: self.free_data,
            Code.DEV_STREAM_SYNC: self.no_stream,
            Code.COPY_AMONG_REMOTE: self.copy_among_remote,
            Code.DEV_ALLOC_DATA_WITH_SCOPE: self.alloc_data_with_scope,
            Code.DEV_CREATE_STREAM: self.no_stream,
            Code.DEV_FREE_STREAM: self.no_stream,
            Code.DEV_SET_STREAM: self.no_stream,
            Code.DEV_GET_CURRENT_STREAM: self.no_stream,
        }

    # -- a packet ---------------------------------------------------------------------------
    def handle(self, length: int) -> Out:
        """Serve the packet of ``length`` bytes that comes next on the stream; all of it is read on return."""
        reader = PacketReader(self.chan, length)
        try:
            code = reader.i32()
            syscall = self._syscalls.get(code)
            if syscall is not None:
                return Out(return_packet([syscall(read_packed(reader))]))
            if code == Code.CALL_FUNC:
                return self.call_func(reader)
            if code == Code.COPY_TO_REMOTE:
                return self.copy_to_remote(reader)
            if code == Code.COPY_FROM_REMOTE:
                return self.copy_from_remote(reader)
            if code == Code.SHUTDOWN:
                raise Shutdown()
            if code == Code.INIT_SERVER:
                raise BadRequestError("the session is already initialized (INIT_SERVER came twice)")
            try:
                name = f"{Code(code).name} ({code})"
            except ValueError:
                raise BadRequestError(f"unknown TVM RPC code {code}") from None
            raise BadRequestError(f"a client does not send TVM's RPC code {name} to a server")
        finally:
            reader.skip_rest()

    def _stream_bulk(self, reader: PacketReader, size: int) -> Bulk:
        """A ``Bulk`` over the last ``size`` bytes of the packet, still on the stream."""
        def consumed(n: int) -> None:
            reader.left -= n

        def read_into(view: memoryview) -> None:
            consumed(len(view))
            self.chan.recv_bulk_into(view)

        def discard(n: int) -> None:
            consumed(n)
            self.chan.discard_bulk(n)

        def to_fd(fd: int, n: int, follow: int) -> None:  # after a failed write, skip_rest drops what follows
            consumed(n)
            self.chan.recv_bulk_to_fd(fd, n)

        return Bulk(size, read_into, discard, to_fd)

    # -- values ------------------------------------------------------------------------------
    def _tensor(self, data: int) -> DeviceTensor:
        return self.handler.tensor(Handle(Ext.TENSOR, data))

    def _check_device(self, device: Any) -> Device:
        if not isinstance(device, Device):
            raise BadRequestError(f"expected a device, got {type(device).__name__}")
        self.handler.check_device(device.device_type, device.device_id)
        return device

    def _tensor_arg(self, arg: TensorArg) -> Handle | TensorView:
        """The handler's handle for a tensor argument, or a checked view when it describes part of one."""
        tensor = self._tensor(arg.data)
        dl = tensor.dltensor
        if arg.device != (dl.device.device_type, dl.device.device_id):
            raise BadRequestError(f"a tensor argument names device {tuple(arg.device)}, its memory is on "
                                  f"{(dl.device.device_type, dl.device.device_id)}")
        if arg.shape == tensor.shape and arg.dtype == (dl.dtype.code, dl.dtype.bits, dl.dtype.lanes) \
                and arg.byte_offset == 0:
            return Handle(Ext.TENSOR, arg.data)
        return TensorView(tensor, arg)

    def _region(self, arg: TensorArg, nbytes: int) -> memoryview:
        """``nbytes`` of a tensor's memory from the argument's byte offset, checked to lie inside it."""
        tensor = self._tensor(arg.data)
        if arg.byte_offset < 0 or arg.byte_offset + nbytes > tensor.nbytes:
            raise BadRequestError(f"a copy of {nbytes} bytes at byte offset {arg.byte_offset} overruns the "
                                  f"tensor's {tensor.nbytes} bytes")
        return tensor.view()[arg.byte_offset:arg.byte_offset + nbytes]

    def _args(self, args: list, reader: PacketReader) -> list:
        """Arguments for the handler's CALL and TIME_EVAL: tensors as handles (or views), the rest as they are."""
        out = []
        for i, arg in enumerate(args):
            if isinstance(arg, TensorArg):
                arg = self._tensor_arg(arg)
            elif isinstance(arg, StreamedBytes):
                raw = reader.take_inline(arg.size, f"argument {i}")
                arg = _utf8(raw) if arg.is_str else raw
            elif isinstance(arg, (Device, DataType, Pointer, Ref)):
                what = {Device: "device", DataType: "data type", Pointer: "pointer"}.get(type(arg), "remote object")
                raise BadRequestError(
                    f"argument {i}: a {what} cannot be passed to a function on a workbench server; "
                    "pass tensors, numbers, strings or bytes")
            out.append(arg)
        return out

    def _local_function(self, fn: Callable[[list, PacketReader], Any], owns: Handle | None = None) -> int:
        handle = self._next_local
        self._next_local += 1
        self._local[handle] = fn
        if owns is not None:
            self._owned[handle] = owns
        return handle

    # -- CALL_FUNC, copies ---------------------------------------------------------------------
    def call_func(self, reader: PacketReader) -> Out:
        handle = reader.u64()
        args = read_packed(reader, stream_last=True)
        local = self._local.get(handle)
        if local is not None:
            value = local(args, reader)
        else:
            value = self.handler.handle(Kind.CALL, [Handle(Ext.FUNCTION, handle), self._args(args, reader)], None)
        if isinstance(value, FileBytes):
            return Out(bytes_return_header(value.size), file=(value.file, value.size))
        if isinstance(value, Handle):  # a tensor or a function a registered function returned
            return Out(return_packet(self._returned(value)))
        try:
            return Out(return_packet(call_return(value)))
        except (TypeError, OverflowError) as exc:
            raise BadRequestError(f"the function returned a value that cannot be sent back: {exc}") from None

    def _returned(self, handle: Handle) -> list[Any]:
        """A CALL_FUNC return for a session object: ``[70, DLTensor, handle]`` for a tensor (TVM's form: the
        description, its data handle, the handle the client frees it by), ``[68 or 73, handle]`` otherwise."""
        if handle.code == Ext.TENSOR:
            tensor = self.handler.tensor(handle)
            dl = tensor.dltensor
            meta = TensorArg(handle.id, Device(dl.device.device_type, dl.device.device_id),
                             DataType(dl.dtype.code, dl.dtype.bits, dl.dtype.lanes), tuple(tensor.shape), 0)
            return [int(TypeIndex.TENSOR), meta, Pointer(handle.id)]
        return [int(TypeIndex.FUNCTION if handle.code == Ext.FUNCTION else TypeIndex.MODULE), Pointer(handle.id)]

    def copy_to_remote(self, reader: PacketReader) -> Out:
        arg = read_tensor(reader)
        nbytes = reader.u64()
        if nbytes != reader.left:
            raise BadRequestError(f"a copy of {nbytes} bytes in a packet that carries {reader.left}")
        region = self._region(arg, nbytes)
        reader.left = 0
        self.chan.recv_bulk_into(region)
        return Out(RETURN_VOID)

    def copy_from_remote(self, reader: PacketReader) -> Out:
        arg = read_tensor(reader)
        nbytes = reader.u64()
        return Out(copy_ack_header(nbytes), view=self._region(arg, nbytes))

    # -- syscalls ------------------------------------------------------------------------------
    def get_global_func(self, args: list) -> Pointer | None:
        _arity(args, 1, "GetGlobalFunc")
        name = _str(args, 0, "GetGlobalFunc")
        builtin = self.builtins.get(name)
        if builtin is not None:
            return Pointer(self._local_function(builtin))
        try:
            handle = self.handler.handle(Kind.GET_FUNCTION, [name], None)
        except RPCError as exc:
            if _not_found(exc):
                return None  # TVM's answer for a missing function: its client says "no function"
            raise
        return Pointer(handle.id)

    def free_handle(self, args: list) -> None:
        _arity(args, 1, "FreeHandle")
        handle = args[0].value if isinstance(args[0], Pointer) else args[0]
        if type(handle) is not int or not handle:
            return None
        if self._local.pop(handle, None) is not None:
            owned = self._owned.pop(handle, None)
            handles = [owned] if owned is not None else []
        else:
            handles = [Handle(Ext.FUNCTION, handle)]  # FREE looks up the id, whatever object it names
        if handles:
            self.handler.handle(Kind.FREE, handles, None)
        return None

    def set_device(self, args: list) -> None:
        self._check_device(args[0] if args else None)
        return None

    def get_attr(self, args: list) -> Any:
        _arity(args, 2, "DevGetAttr")
        device, kind = args
        if not isinstance(device, Device) or type(kind) is not int:
            raise BadRequestError("DevGetAttr takes a device and an attribute kind")
        if kind == ATTR_EXIST:
            return int(tuple(device) in device_api.published())
        self._check_device(device)
        if kind == ATTR_TOTAL_GLOBAL_MEMORY:
            try:
                return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError):
                return -1
        return None  # what TVM's CPU device answers for the other attributes

    def _alloc(self, shape: list, dtype: list, device: Device) -> Pointer:
        handle = self.handler.handle(Kind.TENSOR_ALLOC, [shape, dtype, device.device_type, device.device_id], None)
        return Pointer(handle.id)

    def alloc_data(self, args: list) -> Pointer:
        _arity(args, 4, "DevAllocData")
        device = self._check_device(args[0])
        nbytes = _int(args, 1, "DevAllocData")
        return self._alloc([nbytes], [1, 8, 1], device)  # raw bytes: a uint8 tensor

    def alloc_data_with_scope(self, args: list) -> Pointer:
        _arity(args, 2, "DevAllocDataWithScope")
        arg, scope = args
        if not isinstance(arg, TensorArg):
            raise BadRequestError("DevAllocDataWithScope takes a tensor description")
        if scope not in (None, "", "global"):
            raise UnsupportedError(f"memory scope {scope!r:.60} is not supported by this server (only 'global')")
        return self._alloc(list(arg.shape), list(arg.dtype), self._check_device(arg.device))

    def free_data(self, args: list) -> None:
        _arity(args, 2, "DevFreeData")
        if isinstance(args[1], Pointer) and args[1].value:
            self.handler.handle(Kind.FREE, [Handle(Ext.TENSOR, args[1].value)], None)
        return None

    def no_stream(self, args: list) -> None:
        """Stream calls: a CPU has no streams (TVM's CPU device answers a null stream and does nothing)."""
        self._check_device(args[0] if args else None)
        return None

    def copy_among_remote(self, args: list) -> None:
        if len(args) != 3 or not all(isinstance(a, TensorArg) for a in args[:2]):
            raise BadRequestError("CopyAmongRemote takes two tensors and a stream")
        src, dst = (TensorView(self._tensor(a.data), a) for a in args[:2])
        if src.nbytes != dst.nbytes:
            raise BadRequestError(f"cannot copy {src.nbytes} bytes into a tensor of {dst.nbytes}")
        dst.view()[:] = src.view()
        return None

    # -- the functions this module serves ---------------------------------------------------------
    def upload(self, args: list, reader: PacketReader) -> None:
        _arity(args, 2, "tvm.rpc.server.upload")
        path, data = _str(args, 0, "tvm.rpc.server.upload"), args[1]
        if isinstance(data, StreamedBytes):
            bulk: Bulk | None = self._stream_bulk(reader, data.size)
        elif isinstance(data, (bytes, str)):
            raw = data.encode() if isinstance(data, str) else data
            bulk = _memory_bulk(raw) if raw else None
        else:
            raise BadRequestError(f"tvm.rpc.server.upload takes the file's bytes, not a {type(data).__name__}")
        self.handler.handle(Kind.UPLOAD, [path], bulk)
        return None

    def download(self, args: list, reader: PacketReader) -> FileBytes:
        _arity(args, 1, "tvm.rpc.server.download")
        reply = self.handler.handle(Kind.DOWNLOAD, [_str(args, 0, "tvm.rpc.server.download")], None)
        return FileBytes(*reply.file)

    def remove(self, args: list, reader: PacketReader) -> None:
        """Remove a file or directory; like TVM's, a path that is not there is no error."""
        _arity(args, 1, "tvm.rpc.server.remove")
        path = _str(args, 0, "tvm.rpc.server.remove")
        if path in ("", "."):
            return None  # TVM's clients ask for the session directory itself: it goes with the session
        try:
            self.handler.handle(Kind.REMOVE, [path], None)
        except (FileNotFoundError, RPCError) as exc:
            if isinstance(exc, PathDeniedError) or not (isinstance(exc, FileNotFoundError) or _not_found(exc)):
                raise
        return None

    def listdir(self, args: list, reader: PacketReader) -> str:
        """The entries of a workspace directory as TVM's C++ server lists them: paths, each followed by ','."""
        path = _str(args, 0, "tvm.rpc.server.listdir") if args else "."
        names = self.handler.handle(Kind.LISTDIR, [path or "."], None)
        prefix = "" if path in ("", ".", "./") else path.rstrip("/") + "/"
        return "".join(f"{prefix}{name}," for name in names)

    def load_module(self, args: list, reader: PacketReader) -> Ref:
        _arity(args, 1, "tvm.rpc.server.load_module")
        handle, _names, _entry = self.handler.handle(Kind.LOAD_MODULE, [_str(args, 0, "tvm.rpc.server.load_module")], None)
        return Ref(TypeIndex.MODULE, handle.id)

    def download_linked_module(self, args: list, reader: PacketReader) -> FileBytes:
        _arity(args, 1, "tvm.rpc.server.download_linked_module")
        path = _str(args, 0, "tvm.rpc.server.download_linked_module")
        kind = Kind.DOWNLOAD if path.endswith((".so", ".dylib")) else Kind.LINK_MODULE  # as TVM: a library as it is
        reply: Reply = self.handler.handle(kind, [path], None)
        return FileBytes(*reply.file)

    def module_get_function(self, args: list, reader: PacketReader) -> Ref | None:
        if len(args) not in (2, 3) or not isinstance(args[0], Ref) or args[0].type_index != TypeIndex.MODULE:
            raise BadRequestError("tvm.rpc.server.ModuleGetFunction takes a module, a name and query_imports")
        name = _str(args, 1, "tvm.rpc.server.ModuleGetFunction")
        try:
            handle = self.handler.handle(Kind.MODULE_FUNCTION, [Handle(Ext.MODULE, args[0].handle), name], None)
        except RPCError as exc:
            if _not_found(exc):
                return None  # TVM's answer: its client raises "Module has no function ..."
            raise
        return Ref(TypeIndex.FUNCTION, handle.id)

    def import_module(self, args: list, reader: PacketReader) -> None:
        raise UnsupportedError("importing one remote module into another (tvm.rpc.server.ImportModule) is not "
                               "supported by this server: export the modules into one library instead")

    def system_lib(self, args: list, reader: PacketReader) -> Ref:
        handle, _names, _entry = self.handler.handle(Kind.SYSTEM_LIB, [], None)
        return Ref(TypeIndex.MODULE, handle.id)

    def random_fill(self, args: list, reader: PacketReader) -> None:
        """Fill a tensor with random values (TVM's tvm.contrib.random.random_fill, for measurements)."""
        import numpy as np

        if len(args) != 1 or not isinstance(args[0], TensorArg):
            raise BadRequestError("random_fill takes one tensor")
        view = TensorView(self._tensor(args[0].data), args[0])
        rng = np.random.default_rng()
        kind = _NUMPY_KINDS.get(view.dtype, "V")  # bfloat16, int4, vectors: random bits
        if kind == "f":
            view.numpy()[...] = rng.uniform(-1.0, 1.0, view.shape)
        elif kind in "iu":
            view.numpy()[...] = rng.integers(0, 100, view.shape)
        elif kind == "b":
            view.numpy()[...] = rng.integers(0, 2, view.shape).astype(bool)
        else:  # random bits
            raw = view.view()
            raw[:] = rng.integers(0, 256, len(raw), dtype=np.uint8).tobytes()
        return None

    def time_evaluator(self, args: list, reader: PacketReader) -> Ref:
        """``runtime.RPCTimeEvaluator(module or None, name, device_type, device_id, number, repeat, min_repeat_ms,
        limit_zero_time_iterations, cooldown_interval_ms, repeats_to_cooldown, cache_flush_bytes, f_preproc)``:
        a function that times ``name`` with those arguments and returns the seconds per call of each repeat."""
        name = "runtime.RPCTimeEvaluator"
        _arity(args, 12, name)
        mod, func = args[0], _str(args, 1, name)
        ints = [_int(args, i, name) for i in range(2, 11)]
        preproc = _str(args, 11, name)
        if mod is None:
            fn = self.handler.handle(Kind.GET_FUNCTION, [func], None)
        elif isinstance(mod, Ref) and mod.type_index == TypeIndex.MODULE:
            fn = self.handler.handle(Kind.MODULE_FUNCTION, [Handle(Ext.MODULE, mod.handle), func], None)
        else:
            raise BadRequestError(f"{name}: argument 0 must be a module or None")
        device = (ints[0], ints[1])
        options = dict(zip(("number", "repeat", "min_repeat_ms", "limit_zero_time_iterations",
                            "cooldown_interval_ms", "repeats_to_cooldown", "cache_flush_bytes"), ints[2:]))

        def evaluate(call_args: list, call_reader: PacketReader) -> bytes:
            values = self._args(call_args, call_reader)
            opts = dict(options)
            if preproc == CACHE_FLUSH_PREPROC:  # evict the arguments but the first: write as many bytes
                flush = sum(self._nbytes(v) for v in values[1:])
                opts["cache_flush_bytes"] = min(max(opts["cache_flush_bytes"], flush), 1 << 30)
            elif preproc:
                opts["f_preproc"] = preproc
            results = self.handler.handle(Kind.TIME_EVAL, [fn, list(device), opts, values], None)
            seconds = [float(s) for s in results[:-1]]
            return struct.pack(f"<{len(seconds)}d", *seconds)

        return Ref(TypeIndex.FUNCTION, self._local_function(evaluate, owns=fn))

    def _nbytes(self, value: Any) -> int:
        if isinstance(value, Handle):
            return self.handler.tensor(value).nbytes
        return getattr(value, "nbytes", 0) if isinstance(value, TensorView) else 0


def serve_tvm_requests(
    chan: TVMChannel,
    handler: SessionHandler,
    send_lock: threading.Lock | None = None,
    activity: list[int] | None = None,
    busy: Any = None,
    crashes: Any = None,
    crash_notice: Callable[[KernelCrashedError], str] | None = None,
) -> None:
    """Answer TVM's packets until the client sends SHUTDOWN or closes the connection (``serve_requests``'s twin).

    ``activity``, ``busy`` as for ``serve_requests``; ``crashes`` (a ``CrashCounter``) ends the session,
    with ``crash_notice(exc)``, when its kernels crash too often.
    """
    lock = send_lock or threading.Lock()
    session = TVMSession(chan, handler)
    handler.cancel_pending = None  # TVM's client never cancels
    while True:
        if activity is not None:
            activity[0] += 1
        if busy is not None:
            busy[1] = 0
        try:
            (length,) = struct.unpack("<Q", chan.read_exact(8))
        except ConnectionClosedError:
            return
        if activity is not None:
            activity[0] += 1
        if busy is not None:
            busy[1] = 1
        if not length:
            continue
        if length > MAX_PACKET:
            log.warning("closing a TVM-protocol session: a packet of %d bytes", length)
            with lock:
                chan._sendall(exception_packet(
                    f"a packet of {length} bytes is over this server's limit of {MAX_PACKET}; closing this connection",
                    ErrorCode.TOO_LARGE))
            return
        try:
            out = session.handle(length)
        except (ConnectionClosedError, Shutdown):
            return
        except Exception as exc:
            if isinstance(exc, KernelCrashedError) and crashes is not None and crashes.crashed():
                log.warning("ending the session: %s", exc)
                with lock:
                    chan._sendall(exception_packet(crash_notice(exc) if crash_notice else str(exc),
                                                   ErrorCode.WORKER_DIED))
                return
            if not isinstance(exc, (RPCError, OSError)):
                log.warning("TVM request failed", exc_info=exc)
            with lock:
                chan._sendall(exception_packet(error_text(exc), code_of(exc)))
            continue
        with lock:
            try:
                chan._sendall(out.head)
                if out.view is not None:
                    chan._sendall(out.view)
                elif out.file is not None:
                    chan._sendfile(*out.file)
            finally:
                if out.file is not None:
                    out.file[0].close()
