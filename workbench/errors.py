"""Exceptions shared by every layer.

Every error that crosses the wire carries a numeric code (see docs/protocol.md);
the client raises the class registered for that code, so ``except
workbench.errors.SessionCrashedError`` works the same for local and remote code.
"""
from __future__ import annotations

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


class WorkbenchError(Exception):
    """Base class of every rpc-workbench error."""


class RPCError(WorkbenchError):
    """An error reported by (or about) an RPC peer."""

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


class PathDeniedError(RPCError, PermissionError):
    code = ErrorCode.PATH_DENIED


class RemoteNotFoundError(RPCError, LookupError):
    code = ErrorCode.NOT_FOUND


class DeviceNotFoundError(RPCError, LookupError):
    code = ErrorCode.NO_DEVICE


class SessionTimeoutError(RPCError, TimeoutError):
    code = ErrorCode.SESSION_TIMEOUT


class SessionCrashedError(RPCError):
    """The session's worker process died (segfault, abort, exit() in a kernel)."""

    code = ErrorCode.WORKER_DIED


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
    )
}


def error_from_code(code: int, message: str) -> RPCError:
    """Build the exception a client raises for an error frame."""
    try:
        code = ErrorCode(code)
    except ValueError:
        return RPCError(f"{message} (unknown error code {code})")
    return _BY_CODE.get(code, RPCError)(message, code=code)


def code_of(exc: BaseException) -> ErrorCode:
    """The wire code for an exception raised while serving a request."""
    if isinstance(exc, RPCError):
        return exc.code
    if isinstance(exc, FileNotFoundError):
        return ErrorCode.NOT_FOUND
    return ErrorCode.REMOTE
