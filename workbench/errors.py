"""Exceptions shared by every layer.

Every error that crosses the wire carries a numeric code (see docs/protocol.md);
the client raises the class registered for that code, so ``except
workbench.errors.SessionCrashedError`` works the same for local and remote code.
"""
from __future__ import annotations

import re
from enum import IntEnum


class ErrorCode(IntEnum):
    PROTOCOL = 1  # bad magic, unknown version, malformed or oversized frame
    AUTH = 2  # missing or wrong auth token
    KEY_MISMATCH = 3  # the server serves another key
    BAD_REQUEST = 4  # unknown operation, wrong arguments, unknown handle
    REMOTE = 5  # the remote code raised (kernel error, Python exception)
    PATH_DENIED = 6  # a path that leaves the session workspace
    NOT_FOUND = 7  # file, function or module symbol not found
    NO_DEVICE = 8  # the server does not have that device
    SESSION_TIMEOUT = 9  # session_timeout expired
    WORKER_DIED = 10  # the session worker crashed or exited
    TOO_LARGE = 11  # a frame or transfer over the limits
    UNSUPPORTED = 12  # a feature this server does not have (session constructor, ...)
    BUSY = 13  # "server busy" / "proxy busy": at a limit (max_sessions, file descriptors, processes, disk)
    KERNEL_CRASHED = 14  # the kernel a call ran died (signal, exit()); the session goes on
    CANCELLED = 15  # the request was cancelled by the client (CANCEL frame)


class WorkbenchError(Exception):
    """Base class of every rpc-workbench error."""


class RPCError(WorkbenchError, RuntimeError):
    """An error reported by (or about) an RPC peer.

    It is a ``RuntimeError``, as TVM's ``tvm.rpc`` errors are, so code written for TVM that retries on
    ``except RuntimeError`` (tuning runners, test helpers) catches remote errors and session timeouts too.

        >>> isinstance(SessionTimeoutError("session timed out"), RuntimeError)
        True
    """

    code: ErrorCode = ErrorCode.REMOTE

    def __init__(self, message: str, *, code: ErrorCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class ProtocolError(RPCError):
    code = ErrorCode.PROTOCOL


class AuthenticationError(RPCError):
    code = ErrorCode.AUTH


class KeyMismatchError(RPCError):
    code = ErrorCode.KEY_MISMATCH


class BadRequestError(RPCError):
    code = ErrorCode.BAD_REQUEST


class RemoteError(RPCError):
    """The remote code raised; the message carries the remote error text."""

    code = ErrorCode.REMOTE


class RemoteTypeError(RemoteError, TypeError):
    """The remote code raised a TypeError: a kernel's checked argument (``WB_ARG_TENSOR_OF``, ``WB_EXPECT_ARGS``,
    ``WB_FAIL("TypeError", ...)``) or a Python function on the server; ``except TypeError`` catches it.

        >>> try:                                                   # doctest: +SKIP
        ...     mod["add_one"](1.5, b)
        ... except TypeError as exc:
        ...     print(exc)  # add_one: TypeError: argument 0 of add_one: expected a 1-d float32 tensor, got a float (1.5)
    """


class ArgumentTypeError(BadRequestError, TypeError):
    """The client refused an argument before sending it (a numpy array, a list for a kernel): nothing was sent.

        >>> try:                                                   # doctest: +SKIP
        ...     mod["add_one"](np.zeros(4, "float32"), b)
        ... except TypeError as exc:
        ...     print(exc)  # ... copy it to the device first: runtime.tensor(x, dev) ...
    """


class QuotaExceededError(BadRequestError):
    """A request would take the session over one of its server's quotas (workspace bytes or files, tensor
    memory); nothing was written or allocated, and the session goes on. BAD_REQUEST on the wire; the message
    names the quota and the server option that raises it.

        >>> try:                                                   # doctest: +SKIP
        ...     remote.upload(big, target="big.bin")
        ... except QuotaExceededError as exc:
        ...     print(exc)  # upload of 5.0 GiB to 'big.bin' would put the session workspace over its 4.0 GiB quota ...
    """


class PathDeniedError(RPCError, PermissionError):
    code = ErrorCode.PATH_DENIED


class RemoteNotFoundError(RPCError, LookupError):
    code = ErrorCode.NOT_FOUND


class FunctionNotFoundError(RemoteNotFoundError, AttributeError):
    """A module or a server has no function of that name; an ``AttributeError``, as TVM raises.

        >>> try:                                                   # doctest: +SKIP
        ...     mod["add_onee"]
        ... except AttributeError as exc:
        ...     print(exc)  # no kernel named 'add_onee' in add.so (it exports: add_one) ...
    """


class DeviceNotFoundError(RPCError, LookupError):
    code = ErrorCode.NO_DEVICE


class SessionTimeoutError(RPCError, TimeoutError):
    code = ErrorCode.SESSION_TIMEOUT


class SessionCrashedError(RPCError):
    """The session's worker process died (segfault, abort, exit() in a kernel)."""

    code = ErrorCode.WORKER_DIED


class KernelCrashedError(SessionCrashedError):
    """The kernel a call ran died (a signal such as SIGSEGV, ``abort()``, ``exit()``); the session goes on.

    The session's tensors (with what the kernel wrote), modules and functions stay
    valid, so the next call works. It is a ``SessionCrashedError`` for code that
    caught crashes before sessions survived them.

        >>> try:                                                   # doctest: +SKIP
        ...     f(a)
        ... except KernelCrashedError as exc:
        ...     print(exc)   # "the kernel f was killed by signal 11 (SIGSEGV: ...) ..."
    """

    code = ErrorCode.KERNEL_CRASHED


class CallCancelledError(RPCError):
    """The request was cancelled by the client (it sent CANCEL after a KeyboardInterrupt); the client discards it."""

    code = ErrorCode.CANCELLED


class TooLargeError(RPCError):
    code = ErrorCode.TOO_LARGE


class UnsupportedError(RPCError):
    code = ErrorCode.UNSUPPORTED


class ServerBusyError(RPCError):
    """The server or proxy is at a limit and refused this connection; the service goes on: try again later.

    Raised for "server busy" (``max_sessions`` sessions running, too many
    connections in their handshake, out of file descriptors, processes or
    disk) and "proxy busy" (too many clients of one address waiting).

        >>> try:                                                   # doctest: +SKIP
        ...     remote = rpc.connect("127.0.0.1", 9091)
        ... except ServerBusyError:
        ...     time.sleep(1.0)  # then connect again
    """

    code = ErrorCode.BUSY


class ServerStartError(RPCError, OSError):
    """A server program could not be started (``rpc.PopenSession`` on a missing or non-executable file).

    A ``RuntimeError`` as in TVM, and an ``OSError`` as the failure it reports.

        >>> try:                                                   # doctest: +SKIP
        ...     rpc.PopenSession("./no-such-server")
        ... except RuntimeError as exc:
        ...     print(exc)  # cannot start the server program './no-such-server': No such file or directory ...
    """

    code = ErrorCode.PROTOCOL


class ConnectionClosedError(RPCError, ConnectionError):
    """The peer closed the connection."""

    code = ErrorCode.PROTOCOL


_BY_CODE = {
    cls.code: cls
    for cls in (
        ProtocolError,
        AuthenticationError,
        KeyMismatchError,
        BadRequestError,
        RemoteError,
        PathDeniedError,
        RemoteNotFoundError,
        DeviceNotFoundError,
        SessionTimeoutError,
        SessionCrashedError,
        TooLargeError,
        UnsupportedError,
        ServerBusyError,
        KernelCrashedError,
        CallCancelledError,
    )
}


# "add_one: TypeError: argument 0 ..." (a kernel's error, either server) or "TypeError: ..." (a Python function's)
_REMOTE_TYPE_ERROR = re.compile(r"(?:[A-Za-z_][\w.]*: )?TypeError: ")
# "... over its 4.0 GiB quota (max_workspace_bytes / --max-workspace-bytes; ..." (either server)
_QUOTA_ERROR = re.compile(r" quota (?:of \d+ files and directories )?\((?:max_workspace_bytes|max_workspace_files|"
                          r"max_tensor_bytes) / --max-")


def error_from_code(code: int, message: str) -> RPCError:
    """Build the exception a client raises for an error frame.

    A remote error whose kind is TypeError is a :class:`RemoteTypeError`, so ``except TypeError`` works; a
    refusal that names a session quota is a :class:`QuotaExceededError`.

        >>> type(error_from_code(5, "add_one: TypeError: expected 2 arguments, got 1")).__name__
        'RemoteTypeError'
    """
    try:
        code = ErrorCode(code)
    except ValueError:
        return RPCError(f"{message} (unknown error code {code})")
    if code == ErrorCode.REMOTE and _REMOTE_TYPE_ERROR.match(message):
        return RemoteTypeError(message, code=code)
    if code == ErrorCode.BAD_REQUEST and _QUOTA_ERROR.search(message):
        return QuotaExceededError(message, code=code)
    return _BY_CODE.get(code, RPCError)(message, code=code)


def code_of(exc: BaseException) -> ErrorCode:
    """The wire code for an exception raised while serving a request."""
    if isinstance(exc, RPCError):
        return exc.code
    if isinstance(exc, FileNotFoundError):
        return ErrorCode.NOT_FOUND
    return ErrorCode.REMOTE


class TrackerError(RPCError):
    """The tracker refused, or no session could be had through it (also importable from ``rpc.client.tracker_session``)."""


class KeyNotFoundError(TrackerError, LookupError):
    """No server is registered for the requested device key (a typo, or a board not started yet).

    Raised at once by ``TrackerSession.request(key)`` unless ``wait=True``. ``key`` is
    the key asked for, ``keys`` maps each key that has servers to ``(free, total)``,
    ``closest`` is the likeliest intended key (or None).

        >>> try:                                                   # doctest: +SKIP
        ...     remote = tracker.request("rasp")
        ... except KeyNotFoundError as exc:
        ...     remote = tracker.request(exc.closest or "rasp", wait=True)
    """

    def __init__(self, message: str, *, key: str = "", keys: dict[str, tuple[int, int]] | None = None,
                 closest: str | None = None):
        super().__init__(message)
        self.key = key
        self.keys = dict(keys or {})
        self.closest = closest
