"""The rpc-workbench data-plane protocol (version 1): constants and framing.

The byte layouts are written down in docs/protocol.md. In short:

* the client opens with 8 bytes ``b"WBRP" + u16 version + u16 flags``; the server
  answers with the same 8 bytes (its version) and a HELLO frame;
* every message after that is a *frame*: a 16-byte little-endian header
  ``u32 ctrl_len, u16 kind, u16 flags, u64 bulk_len``, then ``ctrl_len`` bytes of
  msgpack (the control part), then ``bulk_len`` raw bytes (file contents, tensor
  bytes) that are read straight into their destination buffer.
"""
from __future__ import annotations

import os
import socket
import struct
from enum import IntEnum
from typing import Any, BinaryIO, Callable

import msgpack

from ..errors import ConnectionClosedError, ProtocolError, TooLargeError

MAGIC = b"WBRP"
VERSION = 1
PREAMBLE = struct.Struct("<4sHH")  # magic, version, flags
HEADER = struct.Struct("<IHHQ")  # ctrl_len, kind, flags, bulk_len
MAX_CTRL = 16 << 20
MAX_BULK = 1 << 40
NONCE_BYTES = 32
FLAG_NO_REPLY = 1


class Kind(IntEnum):
    # replies and handshake
    OK = 0
    ERROR = 1
    HELLO = 2
    CONNECT = 3
    # requests
    PING = 16
    UPLOAD = 17
    DOWNLOAD = 18
    REMOVE = 19
    LISTDIR = 20
    LOAD_MODULE = 21
    LINK_MODULE = 22
    GET_FUNCTION = 23
    MODULE_FUNCTION = 24
    CALL = 25
    TENSOR_ALLOC = 26
    TENSOR_WRITE = 27
    TENSOR_READ = 28
    FREE = 29
    TIME_EVAL = 30
    SYSTEM_LIB = 31
    MODULE_INFO = 32


class Ext(IntEnum):
    """msgpack extension types: handles to objects that live in the session."""

    TENSOR = 1
    MODULE = 2
    FUNCTION = 3


_U64 = struct.Struct("<Q")


class Handle(msgpack.ExtType):
    """A reference to a session object: msgpack ext (type, u64 LE id), packed natively by msgpack."""

    __slots__ = ()

    def __new__(cls, ext: int, id: int) -> "Handle":
        return super().__new__(cls, ext, _U64.pack(id))

    @property
    def ext(self) -> int:
        return self.code

    @property
    def id(self) -> int:
        return _U64.unpack(self.data)[0]

    def __repr__(self) -> str:
        return f"Handle({Ext(self.code).name}, {self.id})"




def _default(obj: Any) -> Any:
    handle = getattr(obj, "_wb_handle", None)
    if isinstance(handle, Handle):
        return handle
    if hasattr(obj, "__index__"):
        return int(obj)
    if hasattr(obj, "__float__"):
        return float(obj)
    raise TypeError(
        f"cannot send a {type(obj).__name__} over RPC: pass ints, floats, strings, "
        "bytes, remote tensors, functions or modules"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code in (Ext.TENSOR, Ext.MODULE, Ext.FUNCTION) and len(data) == 8:
        return msgpack.ExtType.__new__(Handle, code, data)
    raise ProtocolError(f"unknown msgpack extension type {code} (length {len(data)})")


_packer = msgpack.Packer(default=_default, use_bin_type=True)


def pack(obj: Any) -> bytes:
    """Encode a control part."""
    return _packer.pack(obj)


def unpack(data: bytes | memoryview) -> Any:
    """Decode a control part; anything but well-formed msgpack is a ProtocolError."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed control message: {str(exc) or type(exc).__name__}") from None


_EMPTY_FRAMES = {Kind.OK: HEADER.pack(1, Kind.OK, 0, 0) + b"\xc0"}  # the reply "done, nothing to return"


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until all of ``data`` is written."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view):]


class Frame:
    __slots__ = ("kind", "flags", "ctrl", "bulk_len")

    def __init__(self, kind: int, flags: int, ctrl: Any, bulk_len: int):
        self.kind = kind
        self.flags = flags
        self.ctrl = ctrl
        self.bulk_len = bulk_len

    def __repr__(self) -> str:
        return f"Frame(kind={self.kind}, ctrl={self.ctrl!r}, bulk_len={self.bulk_len})"


class Channel:
    """Frames over a byte stream, with out-of-band bulk data.

    Small reads go through one reusable buffer (one ``recv`` usually brings a
    whole small frame); bulk data is received with ``recv_into`` straight into
    the caller's buffer, after handing over whatever the small buffer already
    holds. Subclasses supply the raw stream operations.
    """

    BUFFER = 256 << 10
    SCRATCH = 4 << 20  # bulk on its way to a file passes through this buffer
    SMALL_BULK = 64 << 10  # bulk below this goes out in the same write as its header

    def __init__(self) -> None:
        self._buf = bytearray(self.BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._scratch: memoryview | None = None

    # -- raw stream, supplied by subclasses ---------------------------------
    def _recv_into(self, view: memoryview) -> int:
        raise NotImplementedError

    def _sendall(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def _sendfile(self, file: BinaryIO, count: int) -> None:
        """Send ``count`` bytes of ``file`` from its start."""
        file.seek(0)
        chunk = memoryview(bytearray(min(count, 4 << 20) or 1))
        sent = 0
        while sent < count:
            n = file.readinto(chunk[: min(len(chunk), count - sent)])
            if not n:
                raise ProtocolError("the file shrank while it was being sent")
            self._sendall(chunk[:n])
            sent += n

    def close(self) -> None:
        raise NotImplementedError

    # -- reading --------------------------------------------------------------
    def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available in the buffer."""
        if self._end - self._start >= need:
            return
        if self._start:
            leftover = self._end - self._start
            self._buf[:leftover] = self._view[self._start : self._end]
            self._start, self._end = 0, leftover
        while self._end < need:
            n = self._recv_into(self._view[self._end :])
            if n == 0:
                raise ConnectionClosedError(
                    "the peer closed the connection"
                    + (" in the middle of a message" if self._end else "")
                )
            self._end += n

    def read_exact(self, n: int) -> bytes:
        if n > self.BUFFER:
            out = bytearray(n)
            self.recv_bulk_into(memoryview(out))
            return bytes(out)
        self._fill(n)
        data = bytes(self._view[self._start : self._start + n])
        self._start += n
        return data

    def recv_frame(self) -> Frame:
        self._fill(HEADER.size)
        ctrl_len, kind, flags, bulk_len = HEADER.unpack_from(self._buf, self._start)
        if ctrl_len > MAX_CTRL:
            raise TooLargeError(
                f"control part of {ctrl_len} bytes is over the {MAX_CTRL}-byte limit "
                "(is the peer speaking the workbench protocol?)"
            )
        if bulk_len > MAX_BULK:
            raise TooLargeError(f"bulk part of {bulk_len} bytes is over the {MAX_BULK}-byte limit")
        self._start += HEADER.size
        if ctrl_len <= self.BUFFER:
            self._fill(ctrl_len)
            ctrl = unpack(self._view[self._start : self._start + ctrl_len])
            self._start += ctrl_len
        else:
            ctrl = unpack(self.read_exact(ctrl_len))
        return Frame(kind, flags, ctrl, bulk_len)

    def recv_bulk_into(self, view: memoryview) -> None:
        """Fill ``view`` entirely from the stream (buffered bytes first)."""
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        total = len(view)
        have = min(self._end - self._start, total)
        if have:
            view[:have] = self._view[self._start : self._start + have]
            self._start += have
        got = have
        while got < total:
            n = self._recv_into(view[got:])
            if n == 0:
                raise ConnectionClosedError(
                    f"the peer closed the connection after {got} of {total} bulk bytes"
                )
            got += n

    def recv_bulk_to_fd(self, fd: int, count: int) -> None:
        """Write the next ``count`` stream bytes to the file ``fd``, through one reused buffer."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(self.SCRATCH))
        while count:
            step = min(count, len(self._scratch))
            chunk = self._scratch[:step]
            self.recv_bulk_into(chunk)
            write_all(fd, chunk)
            count -= step

    def discard_bulk(self, count: int) -> None:
        if self._scratch is None:
            self._scratch = memoryview(bytearray(self.SCRATCH))
        while count:
            step = min(count, len(self._scratch))
            self.recv_bulk_into(self._scratch[:step])
            count -= step

    # -- writing --------------------------------------------------------------
    def send_frame(
        self,
        kind: int,
        ctrl: Any = None,
        bulk: bytes | bytearray | memoryview | None = None,
        *,
        flags: int = 0,
        file: tuple[BinaryIO, int] | None = None,
    ) -> None:
        """Send one frame; bulk comes from ``bulk`` or from ``file=(fileobj, size)``."""
        if ctrl is None and bulk is None and file is None and not flags:
            self._sendall(_EMPTY_FRAMES[kind] if kind in _EMPTY_FRAMES else HEADER.pack(1, kind, 0, 0) + b"\xc0")
            return
        body = pack(ctrl)
        if bulk is not None:
            bulk = memoryview(bulk).cast("B") if not isinstance(bulk, bytes) else bulk
            bulk_len = len(bulk)
        elif file is not None:
            bulk_len = file[1]
        else:
            bulk_len = 0
        head = HEADER.pack(len(body), kind, flags, bulk_len) + body
        if bulk is not None and bulk_len <= self.SMALL_BULK:
            self._sendall(head + bytes(bulk))
            return
        self._sendall(head)
        if bulk is not None:
            self._sendall(bulk)
        elif file is not None and bulk_len:
            self._sendfile(file[0], bulk_len)


class SocketChannel(Channel):
    """A channel over a connected TCP socket."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self.sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a socketpair in tests)

    def _recv_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def _sendall(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def _sendfile(self, file: BinaryIO, count: int) -> None:
        self.sock.sendfile(file, 0, count)  # zero-copy os.sendfile on Linux

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class PipeChannel(Channel):
    """A channel over a pair of file descriptors (a child's stdin/stdout)."""

    def __init__(self, read_fd: int, write_fd: int, on_close: Callable[[], None] | None = None):
        super().__init__()
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._on_close = on_close

    def _recv_into(self, view: memoryview) -> int:
        return os.readv(self.read_fd, [view])

    def _sendall(self, data: bytes | memoryview) -> None:
        write_all(self.write_fd, data)

    def close(self) -> None:
        for fd in {self.read_fd, self.write_fd}:
            try:
                os.close(fd)
            except OSError:
                pass
        if self._on_close:
            self._on_close()
