"""Sessions without a network: ``LocalSession`` (in this process) and ``PopenSession`` (a child over pipes).

    >>> remote = rpc.LocalSession()                    # doctest: +SKIP
    >>> remote = rpc.PopenSession("./minrpc_server")   # doctest: +SKIP
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import weakref
from typing import Any, Callable, Sequence

from ...errors import BadRequestError, ProtocolError, RPCError, ServerStartError, SessionCrashedError, code_of, error_from_code
from ...progress import chunk_slices
from ...runtime.ffi import sigint_stops_kernels
from ..wire.exits import death_notice
from ..wire.handshake import TOKEN_ENV, client_handshake
from ..wire.protocol import Channel, Kind, PipeChannel, pack, sendfile_range, unpack, write_all
from .session import _CANCELLABLE, Receiver, RPCSession


class LocalSession(RPCSession):
    """The session API served in this process (no network, no worker process).

        >>> remote = rpc.LocalSession()
        >>> remote.listdir(".")
        []
    """

    is_remote = False

    def __init__(self) -> None:
        from ..server.handler import SessionHandler, device_info  # the serving side, in this process

        self._handler = SessionHandler()
        super().__init__(_NoChannel(), dict(device_info(), key=""), "local")
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, self._handler.close)

    def _call(self, kind: int, args: list) -> Any:
        if kind in _CANCELLABLE:
            # in process: Ctrl-C stops a native kernel where it runs (KeyboardInterrupt, sigint_stops_kernels),
            # else raises between two repeats of a timing; a kernel that faults or calls exit() fails its call
            # with KernelCrashedError (the guard in kernel_runtime.c), as on a server
            with sigint_stops_kernels():
                return self._request(kind, args)
        return self._request(kind, args)

    def _request(
        self, kind: int, args: list, *, bulk=None, file=None, recv: Receiver | None = None,
        bar: Callable[[int], Any] | None = None,
    ) -> Any:
        from ..server.handler import Reply, error_text

        with self._lock:
            self._ensure_open()
            if self._pending_free:
                self._handler.handle(Kind.FREE, self._take_frees(), None)
            has_bulk = bulk is not None or file is not None
            try:
                if bar is None or not has_bulk:
                    incoming = _local_bulk(bulk, file, None) if has_bulk else None
                    reply = self._handler.handle(kind, unpack(pack(args)), incoming)
                else:
                    size = memoryview(bulk).nbytes if bulk is not None else file[1]
                    with bar(size) as update:  # the same copies, chunk by chunk, each reported
                        reply = self._handler.handle(kind, unpack(pack(args)), _local_bulk(bulk, file, update))
            except RPCError:
                raise
            except Exception as exc:
                raise error_from_code(code_of(exc), error_text(exc)) from exc
            if type(reply) is not Reply:
                try:
                    value = unpack(pack(reply))
                except TypeError as exc:  # as a server says it
                    raise BadRequestError(f"the function returned a value that cannot be sent back: {exc}") from None
                if recv is not None:
                    recv(0, value)
                return value
            value = unpack(pack(reply.value))
            try:
                if bar is None:
                    if reply.file is not None:
                        _read_fully(reply.file[0], recv(reply.file[1], value))
                    else:
                        recv(len(reply.bulk), value)[:] = reply.bulk
                else:
                    size = reply.file[1] if reply.file is not None else memoryview(reply.bulk).nbytes
                    with bar(size) as update:
                        view = recv(size, value)
                        source = memoryview(reply.bulk).cast("B") if reply.file is None else None
                        for part in chunk_slices(size, update):  # one piece when there is no bar
                            if source is None:
                                _read_fully(reply.file[0], view[part])
                            else:
                                view[part] = source[part]
            finally:
                if reply.file is not None:
                    reply.file[0].close()
            return value


def _local_bulk(bulk: Any, file: tuple[Any, int] | None, update: Callable[[int], None] | None) -> Any:
    """The ``Bulk`` of an in-process request: ``bulk`` (bytes-like) or ``file`` (an open file and its size),
    copied chunk by chunk with each chunk reported to ``update`` (None: in one piece)."""
    from ..server.handler import Bulk, in_order

    if bulk is not None:
        src = memoryview(bulk).cast("B")
        size = len(src)

        def fill(view: memoryview, start: int) -> None:
            view[:] = src[start : start + len(view)]

        def write_part(fd: int, start: int, stop: int) -> None:
            write_all(fd, src[start:stop])
    else:
        f, size = file

        def fill(view: memoryview, start: int) -> None:  # read in order: the file's position is where start is
            _read_fully(f, view)

        def write_part(fd: int, start: int, stop: int) -> None:
            sendfile_range(fd, f.fileno(), start, stop, "copied")

    def read_into(view: memoryview) -> None:
        for part in chunk_slices(len(view), update):
            fill(view[part], part.start)

    def write(fd: int, start: int, stop: int) -> None:
        for part in chunk_slices(stop - start, update):
            write_part(fd, start + part.start, start + part.stop)

    return Bulk(size, read_into, lambda n: None, in_order(write))


def _read_fully(f: Any, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ProtocolError("the file shrank while it was being read")
        got += n


class _NoChannel(Channel):
    def close(self) -> None:
        pass


def popen_server_command() -> list[str]:
    """The command of the Python stdio server, a binary for PopenSession."""
    return [sys.executable, "-m", "workbench.rpc.server.worker", "--stdio"]


class PopenSession(RPCSession):
    """A session served by a child process over its stdin/stdout.

    ``binary`` is a path to a server executable, a command list, or the bytes of
    an executable (written to a temporary file first).

        >>> remote = rpc.PopenSession(rpc.popen_server_command())
        >>> remote.info["arch"] == os.uname().machine
        True
        >>> remote.close()
    """

    def __init__(self, binary: str | os.PathLike | Sequence[str] | bytes | bytearray, *, key: str = "", session_timeout: float = 0):
        self._tempfile = None
        if isinstance(binary, (bytes, bytearray)):
            fd, path = tempfile.mkstemp(prefix="wb-popen-")
            with os.fdopen(fd, "wb") as f:
                f.write(binary)
            os.chmod(path, stat.S_IRWXU)
            self._tempfile = path
            cmd = [path]
        elif isinstance(binary, (str, os.PathLike)):
            cmd = [os.fspath(binary)]
        else:
            cmd = [os.fspath(part) for part in binary]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        except OSError as exc:
            self._remove_tempfile()
            fix = ("make it executable (chmod +x) or run it through its emulator"
                   if isinstance(exc, PermissionError) else "give the path of a server program, e.g. one built with "
                   "export_library(path, fcompile=rpc.with_minrpc('host')), or rpc.popen_server_command()")
            raise ServerStartError(f"cannot start the server program {cmd[0]!r}: {exc.strerror or exc}; {fix}") from None
        chan = PipeChannel(self._proc.stdout.fileno(), self._proc.stdin.fileno())
        address = f"popen:{os.path.basename(cmd[0])}[{self._proc.pid}]"
        try:
            info = client_handshake(chan, address, key=key, session_timeout=session_timeout, token=os.environ.get(TOKEN_ENV))
        except BaseException:
            self._shutdown(self._proc, self._tempfile)
            raise
        super().__init__(chan, info, address)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, PopenSession._shutdown, self._proc, self._tempfile)

    def _lost(self, exc: BaseException) -> RPCError:
        try:
            code = self._proc.wait(2)
        except subprocess.TimeoutExpired:
            return super()._lost(exc)
        notice = death_notice(code)
        return SessionCrashedError(notice) if notice else super()._lost(exc)

    def _remove_tempfile(self) -> None:
        if self._tempfile:
            os.unlink(self._tempfile)

    @staticmethod
    def _shutdown(proc: subprocess.Popen, tempfile_path: str | None) -> None:
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if tempfile_path and os.path.exists(tempfile_path):
            os.unlink(tempfile_path)
