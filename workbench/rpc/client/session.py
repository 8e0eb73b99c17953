"""Client sessions over a socket: ``connect``, ``RPCSession``, ``RemoteModule``, ``RemoteFunction``.

    >>> from workbench import rpc, runtime
    >>> remote = rpc.connect("127.0.0.1", 9091)           # doctest: +SKIP
    >>> remote.upload("add_one.so")                        # doctest: +SKIP
    >>> mod = remote.load_module("add_one.so")             # doctest: +SKIP
    >>> dev = remote.cpu()                                  # doctest: +SKIP
    >>> a = runtime.tensor(np.arange(4, dtype="float32"), dev)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import operator
import os
import socket
import threading
import time
import weakref
from typing import Any, Callable, Sequence

from ...errors import (
    ArgumentTypeError,
    BadRequestError,
    CallCancelledError,
    ConnectionClosedError,
    DeviceNotFoundError,
    FunctionNotFoundError,
    KernelCrashedError,
    ProtocolError,
    RemoteNotFoundError,
    RPCError,
    SessionCrashedError,
    SessionTimeoutError,
    TooLargeError,
)
from ...progress import expected_time_eval_seconds, timed_bar, transfer_bar
from ...runtime.devices import Device, device_name, device_type_code
from ...runtime.timer import check_time_options
from ...runtime.buffers import RECYCLER
from ..wire.handshake import TOKEN_ENV, check_session_timeout, client_handshake, error_reply
from ..wire.protocol import FLAG_NO_REPLY, Channel, Handle, Kind, SocketChannel, unpack

try:  # the call fast path in C (_shim.c); a shim built before it lacks it: the same calls in Python then
    from ...runtime._shim import Caller as _Caller, FunctionBase as _FunctionBase
except ImportError:
    _Caller, _FunctionBase = None, object

log = logging.getLogger("workbench.rpc.client")
_ERROR, _FREE, _CALL = int(Kind.ERROR), int(Kind.FREE), int(Kind.CALL)
_CANCELLABLE = frozenset({_CALL, int(Kind.TIME_EVAL)})  # may run long: Ctrl-C cancels them (protocol.md section 12)
_CANCEL = int(Kind.CANCEL)

Receiver = Callable[[int, Any], memoryview]
_PLAIN = frozenset({int, float, str, bool, bytes, type(None)})  # argument types that hold no session object
_TENSOR_EXT, _FUNCTION_EXT = 1, 3  # Ext.TENSOR, Ext.FUNCTION: handles a call may return
_SESSION_NUMBERS = itertools.count(1)


def _plain_number(value: Any) -> Any:
    """numpy scalars (an ``np.int64`` from a sweep) as Python numbers; anything else as it is."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "__index__"):
        return operator.index(value)
    if hasattr(value, "__float__"):
        return float(value)
    return value


def _refuse_unsendable(args: Sequence[Any], what: str, kernel: bool) -> None:
    """ArgumentTypeError for an argument that cannot reach the device as it is, before anything is sent.

    A numpy array (or any host array) stays on this machine: it must be copied to the device
    with ``runtime.tensor(x, dev)`` first. A kernel (a module's function) takes no list, tuple
    or dict either; a Python function registered on the server may.

        >>> _refuse_unsendable((1.5, "a"), "add_one", True)  # plain values pass
    """
    for i, value in enumerate(args):
        kind = type(value)
        if kind in _PLAIN or getattr(value, "_wb_handle", None) is not None:
            continue
        array = hasattr(value, "__array__") or hasattr(value, "__array_interface__") or hasattr(value, "__dlpack__")
        if array and getattr(value, "ndim", None) != 0:  # numpy scalars and 0-d arrays go as numbers
            shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
            about = f" of shape {tuple(shape)} and dtype {dtype}" if shape is not None and dtype is not None else ""
            raise ArgumentTypeError(
                f"{what}: argument {i} is a {kind.__module__}.{kind.__qualname__}{about}, which lives on this "
                "machine; copy it to the device first and pass the tensor: runtime.tensor(x, dev), "
                "with dev a device of this session (e.g. remote.cpu())"
            )
        if kernel and (kind is list or kind is tuple or kind is dict):
            raise ArgumentTypeError(
                f"{what}: argument {i}: a kernel cannot take a {kind.__name__}; it takes tensors, ints, floats, "
                "bools, strings and bytes. For an array, copy it to the device and pass the tensor: "
                "runtime.tensor(np.asarray(x, dtype=\"float32\"), dev)"
            )


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _close_channel(chan: Channel, fast: Any) -> None:
    """A session's finalizer: the fast path is closed first, so it never writes to a closed (reused) descriptor."""
    if fast is not None:
        fast.close()
    chan.close()


class RemoteFunction(_FunctionBase):
    """A function living in a session; call it with remote tensors, numbers and strings.

    A call with plain values and this session's tensors, modules and functions is one C call
    (``_shim.FunctionBase``, on a session whose connection allows it); others go through ``_call_python``.
    """

    def __init__(self, session: "RPCSession", handle: Handle, name: str):
        self.session = session
        self._wb_handle = handle
        self.name = name
        session._track(self, handle)

    if _FunctionBase is object:  # no C fast path (a shim built before it)

        def __call__(self, *args: Any) -> Any:
            return self._call_python(args)

    _kernel = False  # a module's function (a kernel: tensors and numbers only); set by RemoteModule.get_function

    def _call_python(self, args: tuple) -> Any:
        for a in args:
            if type(a) not in _PLAIN:  # a tensor, module or function: it must be this session's
                _refuse_unsendable(args, self.name, self._kernel)
                self.session._check_owned(args, self.name)
                break
        value = self.session._call(_CALL, [self._wb_handle, args])  # a tuple goes out as an array, as a list does
        return value if type(value) in _PLAIN else self.session._wrap_result(value)

    def time_evaluator(
        self,
        dev: Device,
        number: int = 10,
        repeat: int = 1,
        min_repeat_ms: float = 0,
        limit_zero_time_iterations: int = 100,
        cooldown_interval_ms: float = 0,
        repeats_to_cooldown: int = 1,
        cache_flush_bytes: int = 0,
        f_preproc: str = "",
        *,
        progress: bool | None = None,
    ) -> Callable[..., Any]:
        """A function that runs this one ``number`` times per repeat on the device and returns the timings.

        TVM's options, in TVM's order. The loop runs next to the device (in C for
        kernels), so the network is not measured: one warm-up call, then ``repeat``
        repeats of ``number`` calls. ``min_repeat_ms`` raises ``number`` until one
        repeat lasts that long (``limit_zero_time_iterations`` bounds the repeats
        measured as zero); ``cooldown_interval_ms`` pauses after every
        ``repeats_to_cooldown`` repeats; ``cache_flush_bytes`` writes that many bytes
        on the device before each measured run (cold caches; at most 1 GiB);
        ``f_preproc`` names a registered function run with the same arguments before
        each repeat. A run expected to last over 2 s (from the options and this
        function's last timing) shows a progress bar; ``progress=False`` (or
        ``WORKBENCH_PROGRESS=0``) hides it.

            >>> timer = fn.time_evaluator(dev, number=100, repeat=5, progress=False)  # doctest: +SKIP
        """
        from ...results import BenchmarkResult

        self.session._check_device(dev)
        where = [dev.device_type, dev.device_id]
        options = check_time_options({name: _plain_number(value) for name, value in dict(
            number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
            limit_zero_time_iterations=limit_zero_time_iterations, cooldown_interval_ms=cooldown_interval_ms,
            repeats_to_cooldown=repeats_to_cooldown, cache_flush_bytes=cache_flush_bytes, f_preproc=f_preproc,
        ).items()}, ValueError)  # refused here, before anything is sent; the device checks again
        sent = dict(options)
        if not cache_flush_bytes:
            del sent["cache_flush_bytes"]  # sent only when asked for: servers before it refuse the option

        def evaluator(*args: Any) -> BenchmarkResult:
            _refuse_unsendable(args, f"time_evaluator of {self.name}", self._kernel)
            self.session._check_owned(args, f"time_evaluator of {self.name}")
            expected = expected_time_eval_seconds(
                number, repeat, min_repeat_ms, cooldown_interval_ms, repeats_to_cooldown,
                getattr(self, "_seconds_per_call", None),
            )
            with timed_bar(expected, f"time {self.name}", progress):
                results = self.session._call(Kind.TIME_EVAL, [self._wb_handle, where, dict(sent), list(args)])
            numbers = None
            if results and isinstance(results[-1], (list, tuple)):  # the calls each repeat made (servers since 15)
                *results, numbers = results
            info = getattr(self.session, "info", None) or {}
            context = {"key": str(info.get("key") or ""), "server": str(getattr(self.session, "address", "") or ""),
                       "arch": str(info.get("arch") or ""), "target": str(info.get("target") or "")}
            result = BenchmarkResult(results, name=self.name, device=repr(dev), config=options, numbers=numbers,
                                     context=context)
            self._seconds_per_call = result.mean  # the next run's estimate
            return result

        return evaluator

    def __repr__(self) -> str:
        return f"<RemoteFunction {self.name} on {self.session.address}>"


class RemoteModule:
    """A module loaded in a session: ``mod["name"]`` or ``mod.get_function(name)``."""

    def __init__(self, session: "RPCSession", handle: Handle, names: list[str], entry_name: str | None, path: str):
        self.session = session
        self._wb_handle = handle
        self.function_names = list(names)
        self.entry_name = entry_name
        self.path = path
        self._functions: dict[str, RemoteFunction] = {}
        session._track(self, handle)

    def get_function(self, name: str) -> RemoteFunction:
        fn = self._functions.get(name)
        if fn is None:
            handle = self.session._lookup(Kind.MODULE_FUNCTION, [self._wb_handle, name])
            fn = self._functions[name] = RemoteFunction(self.session, handle, name)
            fn._kernel = True  # takes tensors and numbers only: lists and host arrays are refused before sending
        return fn

    __getitem__ = get_function

    def __call__(self, *args: Any) -> Any:
        if not self.entry_name:
            raise BadRequestError(
                f"{self.path} has no entry function; call one by name: mod[name](...) with name in {self.function_names}"
            )
        return self.get_function(self.entry_name)(*args)

    def time_evaluator(
        self,
        func_name: str,
        dev: Device,
        number: int = 10,
        repeat: int = 1,
        min_repeat_ms: float = 0,
        limit_zero_time_iterations: int = 100,
        cooldown_interval_ms: float = 0,
        repeats_to_cooldown: int = 1,
        cache_flush_bytes: int = 0,
        f_preproc: str = "",
        *,
        progress: bool | None = None,
    ) -> Callable[..., Any]:
        """A function that times ``func_name`` on the device: TVM's signature, options as ``RemoteFunction.time_evaluator``.

            >>> timer = mod.time_evaluator("add_one", dev, number=10, repeat=3)  # doctest: +SKIP
            >>> timer(a, b).mean                                                  # doctest: +SKIP
        """
        if func_name is None:
            raise BadRequestError(f"{self.path} has no entry function; name one of {self.function_names}")
        return self.get_function(func_name).time_evaluator(
            dev, number, repeat, min_repeat_ms, limit_zero_time_iterations, cooldown_interval_ms,
            repeats_to_cooldown, cache_flush_bytes, f_preproc, progress=progress,
        )

    def __repr__(self) -> str:
        return f"<RemoteModule {self.path} functions={self.function_names} on {self.session.address}>"

    def _repr_html_(self) -> str:
        from .views import module_html

        return module_html(self)


class RPCSession:
    """A client session. Do not build it directly: use ``rpc.connect`` (or LocalSession, PopenSession).

    One request is in flight at a time (calls from several threads are
    serialised). Remote objects are freed when their local objects are
    collected, and all of them when the session closes.
    """

    is_remote = True
    _fast: Any = None  # the call fast path (_shim.Caller) while the session is open, if its connection allows it

    def __init__(self, chan: Channel, info: dict[str, Any], address: str, enable_logging: bool = False):
        self._chan = chan
        self.info = info
        self.address = address
        self._lock = threading.RLock()
        self._pending_free: list[Handle] = []
        self._ended: RPCError | None = None
        self._log = enable_logging
        self._number = next(_SESSION_NUMBERS)
        if _Caller is not None and getattr(chan, "_exchange", None) is not None and not enable_logging:
            self._fast = _Caller(chan.sock.fileno(), chan, chan._buf, self._lock, self._pending_free, unpack, Handle)
        self._finalizer = weakref.finalize(self, _close_channel, chan, self._fast)

    # -- plumbing ----------------------------------------------------------------
    @property
    def name(self) -> str:
        """This session in messages: its address and a number that tells sessions to one server apart."""
        return f"session #{self._number} ({self.address})"

    def _check_owned(self, values: Sequence[Any], what: str) -> None:
        """ValueError if a tensor, module or function among ``values`` (nested in lists too) belongs to another session.

        Handles are numbered per session, so another session's object would name
        one of ours (or none): refused here, before anything is sent.
        """
        for i, value in enumerate(values):
            kind = type(value)
            if kind in _PLAIN:
                continue
            if kind is list or kind is tuple:
                self._check_owned(value, what)
                continue
            if kind is dict:
                self._check_owned(list(value.values()), what)
                continue
            owner = getattr(value, "session", self)
            if owner is not self and getattr(value, "_wb_handle", None) is not None:
                owner_name = getattr(owner, "name", None) or repr(owner)
                raise ValueError(
                    f"{what}: argument {i}, {type(value).__name__} {_short_repr(value)}, belongs to {owner_name}, "
                    f"not to {self.name} where it would run; objects cannot cross sessions: copy a tensor over "
                    "with runtime.tensor(t.numpy(), dev) (dev of this session), and load modules in each session"
                )

    def _track(self, obj: Any, handle: Handle) -> None:
        weakref.finalize(obj, self._pending_free.append, handle)

    def _take_frees(self) -> list[Handle]:
        """Handles of collected objects; pop() one by one, as finalizers may append meanwhile."""
        pending, frees = self._pending_free, []
        while pending:
            frees.append(pending.pop())
        return frees

    def _ensure_open(self) -> None:
        if self._ended is not None:
            raise type(self._ended)(f"this session has ended: {self._ended}", code=self._ended.code)

    def _request(
        self,
        kind: int,
        args: list,
        *,
        bulk: bytes | bytearray | memoryview | None = None,
        file: tuple[Any, int] | None = None,
        recv: Receiver | None = None,
        bar: Callable[[int], Any] | None = None,
    ) -> Any:
        """Send one request and return the reply's control part (its bulk part goes to ``recv``).

        ``bar(total_bytes)`` opens a progress bar around a bulk part, sent or received: a context
        manager yielding ``update(nbytes)`` or None (``progress.transfer_bar`` with its description bound).
        A request without bulk parts either way goes the short way, ``_call``.
        """
        if bulk is None and file is None and recv is None:
            return self._call(kind, args)
        start = time.perf_counter() if self._log else 0.0
        with self._lock:
            if self._ended is not None:
                self._ensure_open()
            chan = self._chan
            try:
                if self._outstanding or self._pending_free:
                    self._settle()
                if bar is None or (bulk is None and file is None):
                    chan.send_frame(kind, args, bulk, file=file)
                else:
                    with bar(memoryview(bulk).nbytes if bulk is not None else file[1]) as update:
                        chan.send_frame(kind, args, bulk, file=file, progress=update)
                reply_kind, _, ctrl, bulk_len = chan.recv_frame()
                if reply_kind == _ERROR:
                    if bulk_len:
                        chan.discard_bulk(bulk_len)
                    raise error_reply(ctrl)
                if bulk_len or recv is not None:
                    self._receive_bulk(kind, ctrl, bulk_len, recv, bar)
                chan.busy = False
            except BaseException as exc:
                lost = self._failed(exc)
                if lost is None:
                    raise
                raise lost from None
        if self._log:
            log.info("%s %s: %.3f ms", self.address, Kind(kind).name, (time.perf_counter() - start) * 1e3)
        return ctrl

    def _call(self, kind: int, args: list) -> Any:
        """``_request`` for a request without a bulk part whose reply has none (CALL, PING, ...): the short way.

        The request goes out and the reply's first bytes come back in one step (``Channel.request``).
        A request that may run long (``_CANCELLABLE``: CALL, TIME_EVAL) instead waits for its reply
        where Ctrl-C consumes nothing: the KeyboardInterrupt sends CANCEL and is raised at once, the
        server stops a timing at its next repeat and a kernel still running after its grace period (2 s),
        and the reply is read and dropped before the next request (``_failed``, ``_settle``).

            >>> remote._call(Kind.PING, [])  # doctest: +SKIP
            {'objects': 0, 'tensors': 0, 'tensor_bytes': 0}
        """
        start = time.perf_counter() if self._log else 0.0
        with self._lock:
            if self._ended is not None:
                self._ensure_open()
            chan = self._chan
            try:
                if self._outstanding or self._pending_free:
                    self._settle()
                if kind in _CANCELLABLE:
                    chan.send_frame(kind, args)
                    frame = chan.await_reply()
                else:
                    frame = chan.request(kind, args)
                ctrl = self._reply(kind, frame)
            except BaseException as exc:
                lost = self._failed(exc)
                if lost is None:
                    raise
                raise lost from None
        if self._log:
            log.info("%s %s: %.3f ms", self.address, Kind(kind).name, (time.perf_counter() - start) * 1e3)
        return ctrl

    _outstanding = False  # a cancelled request's reply is still to come (docs/protocol.md section 12)

    def _settle(self) -> None:
        """Before a request, under the lock: read a cancelled request's late reply, send the pending FREEs."""
        if self._outstanding:
            self._drain()
        if self._pending_free:
            self._chan.send_frame(_FREE, self._take_frees(), flags=FLAG_NO_REPLY)
            self._chan.busy = False  # sent whole, and no reply comes

    def _cancel(self) -> None:
        """Send CANCEL for the request whose reply is awaited; its reply is dropped before the next request."""
        chan = self._chan
        chan.awaiting = False
        chan.busy = False  # in step: the request went out whole, nothing of its reply was read
        if not self._outstanding:
            self._outstanding = True
            self._fast_saved, self._fast = self._fast, None  # calls take the Python path, which drains first
            try:
                chan.send_frame(_CANCEL, [], flags=FLAG_NO_REPLY)
            except OSError as exc:
                self._end(self._lost(exc))

    def _drain(self) -> None:
        """Read and drop the reply of the cancelled request (raising it if it ends the session)."""
        chan = self._chan
        reply_kind, _, ctrl, bulk_len = chan.await_reply()
        if bulk_len:
            chan.discard_bulk(bulk_len)
        chan.busy = False
        self._outstanding = False
        if self._ended is None:
            self._fast = self.__dict__.pop("_fast_saved", None)  # the call fast path again
        if reply_kind == _ERROR:
            exc = error_reply(ctrl)
            if isinstance(exc, (SessionCrashedError, SessionTimeoutError, ProtocolError)) and not isinstance(
                    exc, KernelCrashedError):
                raise exc  # a notice that ended the session while the request was cancelled

    def _resume_call(self, got: Any, frame: bytes) -> Any:
        """The rest of a CALL the C fast path began (``_shim.FunctionBase``), with the session lock held.

        ``got`` is what ``exchange`` returned (the reply was not one whole frame, or was an error) or
        the exception it raised; ``frame`` is the request's bytes.
        """
        with self._lock:
            try:
                if isinstance(got, BaseException):
                    raise got
                value = self._reply(_CALL, self._chan.resume(got, frame))
            except BaseException as exc:
                lost = self._failed(exc)
                if lost is None:
                    raise
                raise lost from None
        return value if type(value) in _PLAIN else self._wrap_result(value)

    def _wrap_result(self, value: Any) -> Any:
        """A call's result with the session objects it holds made usable, as TVM returns them: a function
        handle as a RemoteFunction, a tensor handle as a Tensor (its shape and dtype asked once), in lists
        and dicts too. (The C fast path calls this for results that are not plain values.)"""
        kind = type(value)
        if kind is Handle:
            if value.code == _FUNCTION_EXT:
                return RemoteFunction(self, value, "<function returned by a call>")
            if value.code == _TENSOR_EXT:
                return self._returned_tensor(value)
            return value
        if kind is list:
            return [v if type(v) in _PLAIN else self._wrap_result(v) for v in value]
        if kind is dict:
            return {k: v if type(v) in _PLAIN else self._wrap_result(v) for k, v in value.items()}
        return value

    def _returned_tensor(self, handle: Handle) -> Any:
        from ...runtime.tensors import Tensor

        try:
            info = self._tensor_info
        except AttributeError:
            info = self._tensor_info = self.get_function("workbench.tensor_info")
        try:
            shape, dtype, (dev_type, dev_id) = self._call(_CALL, [info._wb_handle, [handle]])
        except BaseException:
            with self._lock:
                self._pending_free.append(handle)  # freed with the next request
            raise
        return Tensor(self, handle, shape, dtype, Device(dev_type, dev_id, self))

    def _reply(self, kind: int, frame: tuple[int, int, Any, int]) -> Any:
        """The control part of the reply ``frame`` to a request of ``kind``; an error reply raised."""
        reply_kind, _, ctrl, bulk_len = frame
        if reply_kind == _ERROR:
            if bulk_len:
                self._chan.discard_bulk(bulk_len)
            raise error_reply(ctrl)
        if bulk_len:
            self._receive_bulk(kind, ctrl, bulk_len, None)
        self._chan.busy = False
        return ctrl

    def _failed(self, exc: BaseException) -> RPCError | None:
        """What a request that raised ``exc`` means for the session; the exception to raise instead, or None.

        A crashed or timed-out session, a protocol error or an oversized frame end the session (``exc``
        is raised); a lost connection ends it too, raised as ``_lost`` describes it; an error reply
        (the session goes on) and anything else (KeyboardInterrupt, a value msgpack cannot send) are
        raised as they are. A KeyboardInterrupt while a reply was awaited (the channel is ``awaiting``:
        the request went out whole, nothing of its reply was read) sends CANCEL and the session goes on;
        anything else that happened while a request was on the wire (the channel is ``busy``) ends the
        session, since the next reply would be out of step.
        """
        if isinstance(exc, (KernelCrashedError, CallCancelledError)):  # the call died, the session goes on
            self._chan.busy = False
            return None
        if isinstance(exc, (SessionCrashedError, SessionTimeoutError, ProtocolError, TooLargeError)):
            self._end(exc)
            return None
        if isinstance(exc, RPCError) and not isinstance(exc, ConnectionClosedError):
            self._chan.busy = False
            return None  # an error reply, read whole: the session goes on
        if isinstance(exc, OSError):  # ConnectionClosedError is one too
            lost = self._lost(exc)
            self._end(lost)
            return lost
        if isinstance(exc, KeyboardInterrupt) and self._chan.awaiting:  # the request went out whole, nothing
            self._cancel()  # of its reply was read: CANCEL it, and the session goes on
            return None
        if self._chan.busy:  # Ctrl-C (or another exception) between a request's first byte and its reply's last
            self._end(ConnectionClosedError(
                f"a request to {self.address} was interrupted ({type(exc).__name__}) before its reply was read, "
                "so the session was closed (the server stops what it was running and frees the device): "
                "connect again to go on"))
        return None  # raised as it is (e.g. a value msgpack cannot send: nothing went out)

    def _receive_bulk(self, kind: int, ctrl: Any, bulk_len: int, recv: Receiver | None,
                      bar: Callable[[int], Any] | None = None) -> None:
        if recv is None:
            self._chan.discard_bulk(bulk_len)
            raise ProtocolError(f"unexpected {bulk_len} bulk bytes in the reply to {Kind(kind).name}")
        view = recv(bulk_len, ctrl)
        if not bulk_len:
            return
        with bar(bulk_len) if bar is not None else contextlib.nullcontext() as update:
            if update is None:
                self._chan.recv_bulk_into(view)
            else:
                self._chan.recv_bulk_reporting(view, update)

    def _lost(self, exc: BaseException) -> RPCError:
        if isinstance(exc, socket.timeout):
            return SessionTimeoutError(f"no answer from {self.address}: {exc}")
        return ConnectionClosedError(f"the connection to {self.address} was lost: {exc}")

    def _end(self, exc: RPCError) -> None:
        # keep a copy without a traceback: the raised one holds the caller's frames (and their sessions)
        self._ended = type(exc)(str(exc), code=exc.code)
        self._finalizer()

    # -- lifetime ----------------------------------------------------------------
    def close(self) -> None:
        """End the session; the server frees everything it held and removes its workspace."""
        with self._lock:
            if self._ended is None:
                self._ended = ConnectionClosedError("the session was closed by close()")
            self._finalizer()

    def __enter__(self) -> "RPCSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._ended is None else "closed"
        key = f" key={self.info['key']!r}" if self.info.get("key") else ""
        return f"<{type(self).__name__} {self.address}{key} ({self.info.get('arch', '?')}) {state}>"

    def _repr_html_(self) -> str:
        from .views import session_html

        return session_html(self)

    def ping(self) -> dict[str, int]:
        """One round trip; returns what the session holds: ``objects``, ``tensors``, ``tensor_bytes``."""
        return self._request(Kind.PING, [])

    # -- files -----------------------------------------------------------------
    def upload(
        self,
        data: str | os.PathLike | bytes | bytearray | memoryview | Any,  # Any: a numpy array, any buffer
        target: str | None = None,
        *,
        progress: bool | None = None,
    ) -> None:
        """Upload a local file (path) or bytes into the session workspace as ``target``.

        Bytes may be any bytes-like object in one piece: bytes, bytearray, memoryview, a
        C-contiguous numpy array (its raw bytes, sent without a copy). Over 8 MiB a progress bar
        shows once the transfer has lasted 0.2 s; ``progress=False`` (or ``WORKBENCH_PROGRESS=0``) hides it.

            >>> remote.upload("lib.so")                             # doctest: +SKIP
            >>> remote.upload(data, target="weights.bin", progress=False)  # doctest: +SKIP
            >>> remote.upload(np.arange(16, dtype="float32"), target="x.bin")  # doctest: +SKIP
        """
        if isinstance(data, (str, os.PathLike)):
            path = os.fspath(data)
            name = target or os.path.basename(path)
            bar = functools.partial(transfer_bar, desc=f"upload {name}", progress=progress)
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._request(Kind.UPLOAD, [name], file=(f, size), bar=bar)
            return
        try:
            contiguous = memoryview(data).c_contiguous
        except TypeError:
            raise TypeError(
                f"upload takes a file path or bytes (or another bytes-like object: bytearray, memoryview, "
                f"a numpy array), not {type(data).__name__}"
            ) from None
        if not contiguous:
            raise ValueError(f"upload sends bytes in one piece, and this {type(data).__name__} is not "
                             "contiguous; pass numpy.ascontiguousarray(data) (a copy) instead")
        if not target:
            raise ValueError("upload(bytes) needs target=, the remote file name (e.g. target='lib.so')")
        bar = functools.partial(transfer_bar, desc=f"upload {target}", progress=progress)
        self._request(Kind.UPLOAD, [target], bulk=data, bar=bar)  # the channel sends it as its bytes

    def _recv_bytes(self, kind: int, path: str, desc: str = "", progress: bool | None = None) -> bytearray:
        box: list[bytearray] = []

        def receive(size: int, _value: Any) -> memoryview:
            box.append(RECYCLER.get(size))
            return memoryview(box[0])

        bar = functools.partial(transfer_bar, desc=desc or f"download {path}", progress=progress)
        self._request(kind, [path], recv=receive, bar=bar)
        return box[0]

    def download(self, path: str, *, progress: bool | None = None) -> bytearray:
        """The contents of a file in the session workspace.

        Over 8 MiB a progress bar shows once the transfer has lasted 0.2 s; ``progress=False``
        (or ``WORKBENCH_PROGRESS=0``) hides it.

            >>> data = remote.download("out.bin")  # doctest: +SKIP
        """
        return self._recv_bytes(Kind.DOWNLOAD, path, progress=progress)

    def remove(self, path: str) -> None:
        """Remove a file (or directory) from the session workspace."""
        self._request(Kind.REMOVE, [path])

    def listdir(self, path: str = ".") -> list[str]:
        """Names in a workspace directory, sorted."""
        return self._request(Kind.LISTDIR, [path])

    # -- modules and functions -----------------------------------------------------
    def load_module(self, path: str) -> RemoteModule:
        """Load an uploaded ``.so``, an object file (``.o``) or a ``.tar`` of objects (both linked on the device)."""
        handle, names, entry = self._request(Kind.LOAD_MODULE, [path])
        return RemoteModule(self, handle, names, entry, path)

    def download_linked_module(self, path: str, *, progress: bool | None = None) -> bytearray:
        """Link an uploaded ``.tar`` of objects on the device and download the shared object (a bar over 8 MiB)."""
        return self._recv_bytes(Kind.LINK_MODULE, path, f"download {path} linked", progress)

    def get_function(self, name: str) -> RemoteFunction:
        """A function registered on the server (``rpc.register_func``)."""
        return RemoteFunction(self, self._lookup(Kind.GET_FUNCTION, [name]), name)

    def _lookup(self, kind: Kind, args: list) -> Any:
        """A function's handle; a missing one raises FunctionNotFoundError, an AttributeError as in TVM."""
        try:
            return self._request(kind, args)
        except RemoteNotFoundError as exc:
            raise FunctionNotFoundError(str(exc)) from None

    def system_lib(self) -> RemoteModule:
        """The module of kernels linked into the server (its --load-library files)."""
        handle, names, entry = self._request(Kind.SYSTEM_LIB, [])
        return RemoteModule(self, handle, names, entry, "<system lib>")

    # -- devices -----------------------------------------------------------------
    @property
    def devices(self) -> list[Device]:
        return [Device(t, i, self) for t, i in self.info.get("devices", [])]

    def _check_device(self, dev: Device) -> None:
        if dev.session is not self:
            owner = getattr(dev.session, "name", None) or "this process (runtime.cpu())"
            raise DeviceNotFoundError(
                f"{dev!r} belongs to another session, {owner}, not to {self.name}; use a device of this "
                f"session, e.g. remote.cpu(0)"
            )

    def device(self, dev_type: int | str, dev_id: int = 0) -> Device:
        """A device of this session; a clear error if the server does not have it."""
        code = device_type_code(dev_type)
        have = [tuple(d) for d in self.info.get("devices", [])]
        if (code, dev_id) not in have:
            raise DeviceNotFoundError(
                f"{self.address} has no {device_name(code, dev_id)}; it has: "
                + (", ".join(device_name(*d) for d in have) or "no devices")
            )
        return Device(code, dev_id, self)

    def cpu(self, dev_id: int = 0) -> Device:
        return self.device("cpu", dev_id)

    def cuda(self, dev_id: int = 0) -> Device:
        return self.device("cuda", dev_id)

    def cl(self, dev_id: int = 0) -> Device:
        return self.device("cl", dev_id)

    def vulkan(self, dev_id: int = 0) -> Device:
        return self.device("vulkan", dev_id)

    def metal(self, dev_id: int = 0) -> Device:
        return self.device("metal", dev_id)

    def rocm(self, dev_id: int = 0) -> Device:
        return self.device("rocm", dev_id)

    def ext_dev(self, dev_id: int = 0) -> Device:
        return self.device("ext_dev", dev_id)

    def hexagon(self, dev_id: int = 0) -> Device:
        return self.device("hexagon", dev_id)

    def webgpu(self, dev_id: int = 0) -> Device:
        return self.device("webgpu", dev_id)


def connect(
    url: str,
    port: int,
    key: str = "",
    session_timeout: float = 0,
    session_constructor_args: Sequence[Any] | None = None,
    enable_logging: bool = False,
    *,
    auth_token: str | None = None,
    connect_timeout: float = 10.0,
) -> RPCSession:
    """Connect to an RPC server.

    ``session_timeout`` (seconds, 0 = none, at most a year) is enforced by the
    server: when it expires the session ends and the pending call raises
    SessionTimeoutError. ``auth_token`` defaults to ``$WORKBENCH_RPC_TOKEN``;
    with a token the server must prove it knows it too, or the connection is
    refused (``AuthenticationError``) before anything is sent.
    ``connect_timeout`` bounds connecting and the whole handshake together, however
    slowly a server sends. ``session_constructor_args=["rpc.Connect", host, port, key, token]`` opens
    a session on the server at host:port through this one; ``token`` (optional)
    is the inner server's, sent to this server, which uses it for that
    handshake only.

        >>> remote = rpc.connect("127.0.0.1", 9091, session_timeout=60)  # doctest: +SKIP
    """
    check_session_timeout(session_timeout)  # before connecting
    address = f"{url}:{port}"
    deadline = time.monotonic() + connect_timeout  # connecting and the whole handshake
    try:
        sock = socket.create_connection((url, port), timeout=connect_timeout)
    except OSError as exc:
        raise ConnectionRefusedError(
            f"cannot connect to an RPC server at {address}: {exc.strerror or exc}; is the server running there?"
        ) from None
    chan = SocketChannel(sock)
    try:
        info = client_handshake(
            chan, address, key=key, session_timeout=session_timeout,
            token=auth_token if auth_token is not None else os.environ.get(TOKEN_ENV),
            constructor_args=session_constructor_args, deadline=deadline,
        )
    except BaseException:
        chan.close()
        raise
    sock.settimeout(None)
    return RPCSession(chan, info, address, enable_logging)


