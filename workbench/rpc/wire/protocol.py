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

import contextlib
import functools
import mmap
import operator
import os
import select
import socket
import struct
from enum import IntEnum
from typing import Any, BinaryIO, Callable, Iterator

import msgpack

from ...errors import ConnectionClosedError, ProtocolError, TooLargeError
from ...progress import chunk_slices

try:  # the client's fast path for small requests, in C; a shim built before it lacks it: pure Python then
    from ...runtime._shim import exchange as _exchange
except ImportError:  # not built (a tree copied without pip install)
    _exchange = None

MAGIC = b"WBRP"
VERSION = 1
PREAMBLE = struct.Struct("<4sHH")  # magic, version, flags
HEADER = struct.Struct("<IHHQ")  # ctrl_len, kind, flags, bulk_len
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
MAX_CTRL = 16 << 20
MAX_BULK = 1 << 40
NONCE_BYTES = 32
FLAG_NO_REPLY = 1  # frame flag: the request wants no reply
FLAG_SERVER = 1  # preamble flag: a server connecting out to a proxy, to be paired with a client


class Kind(IntEnum):
    # replies and handshake
    OK = 0
    ERROR = 1
    HELLO = 2
    CONNECT = 3
    REGISTER = 4  # server -> proxy: {"key": K, "info": {...}}
    PROXY_CONNECT = 5  # client -> proxy: {"key": K}; the paired server's HELLO follows
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
    CANCEL = 32  # C -> S, always NO_REPLY: cancel the request in flight (docs/protocol.md section 12)


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


_HANDLE_EXTS = frozenset(int(e) for e in Ext)
_new_tuple = tuple.__new__


def _ext_hook(code: int, data: bytes) -> Any:
    if code in _HANDLE_EXTS and len(data) == 8:
        return _new_tuple(Handle, (code, data))  # ExtType's own __new__ re-validates in Python
    raise ProtocolError(f"unknown msgpack extension type {code} (length {len(data)})")


_pack = msgpack.Packer(default=_default, use_bin_type=True).pack
_unpackb = functools.partial(msgpack.unpackb, ext_hook=_ext_hook)  # str keys only, raw=False: the defaults


def pack(obj: Any) -> bytes:
    """Encode a control part."""
    return _pack(obj)


# Items of lists and dicts one control part may hold. A part of at most this many bytes cannot hold more
# (each item takes a byte); a larger one is decoded counting, so that a 16 MiB part of nils costs at most
# ~48 MiB (2 Mi references, one list of 2 Mi in the making, the part itself), not 16 Mi references.
MAX_OBJECTS = 2 << 20


def _unpack_counted(data: bytes | memoryview) -> Any:
    seen = 0

    def counted(items: Any) -> Any:
        nonlocal seen
        seen += len(items)
        if seen > MAX_OBJECTS:
            raise ProtocolError(f"malformed control message: more than {MAX_OBJECTS} items of lists and dicts in "
                                "one message (send data as a tensor or bytes)")
        return items

    return msgpack.unpackb(data, ext_hook=_ext_hook, list_hook=counted, object_pairs_hook=lambda p: dict(counted(p)),
                           max_array_len=MAX_OBJECTS, max_map_len=MAX_OBJECTS)


def unpack(data: bytes | memoryview) -> Any:
    """Decode a control part; anything but well-formed msgpack is a ProtocolError."""
    try:
        return _unpackb(data) if len(data) <= MAX_OBJECTS else _unpack_counted(data)
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed control message: {str(exc) or type(exc).__name__}") from None


_OK_NIL = HEADER.pack(1, Kind.OK, 0, 0) + b"\xc0"  # the reply "done, nothing to return"


def _too_large(ctrl_len: int, bulk_len: int) -> TooLargeError:
    if ctrl_len > MAX_CTRL:
        return TooLargeError(
            f"control part of {ctrl_len} bytes is over the {MAX_CTRL}-byte limit "
            "(is the peer speaking the workbench protocol?)"
        )
    return TooLargeError(f"bulk part of {bulk_len} bytes is over the {MAX_BULK}-byte limit")


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until all of ``data`` is written."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view):]


def sendfile_range(out_fd: int, in_fd: int, start: int, stop: int, doing: str = "sent") -> None:
    """Bytes ``start:stop`` of the file ``in_fd`` to ``out_fd`` by sendfile(2), from successive offsets;
    ProtocolError if the file ends first ("the file shrank while it was being ``doing``")."""
    while start < stop:
        sent = os.sendfile(out_fd, in_fd, start, stop - start)
        if not sent:
            raise ProtocolError(f"the file shrank while it was being {doing}")
        start += sent


class Frame(tuple):
    """A received frame: ``(kind, flags, ctrl, bulk_len)``; the bulk part is still on the stream."""

    __slots__ = ()
    kind = property(operator.itemgetter(0))
    flags = property(operator.itemgetter(1))
    ctrl = property(operator.itemgetter(2))
    bulk_len = property(operator.itemgetter(3))

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
    # bulk from memory goes out in sends of at most this: on a new connection one send of 64 MiB is about
    # 1.5x slower over loopback (pieces of 2 MiB cost at most a few % on one that has carried data before)
    SEND_PIECE = 2 << 20

    def __init__(self) -> None:
        self._buf = bytearray(self.BUFFER)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._scratch: memoryview | None = None
        self._copy_buffer: memoryview | None = None  # for files sent by copying (_sendfile)
        # True from the first byte of a request until its reply is consumed (the client clears it): an
        # exception in between (Ctrl-C) leaves the stream out of step
        self.busy = False
        # True while await_reply waits for a reply's header: an interrupt then leaves the stream in step
        self.awaiting = False

    # -- raw stream, supplied by subclasses ---------------------------------
    def _recv_into(self, view: memoryview) -> int:
        raise NotImplementedError

    def _sendall(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def _send_head(self, head: bytes) -> None:
        """Send the header of a frame whose bulk part follows at once."""
        self._sendall(head)

    COPY_CHUNK = 256 << 10  # a file sent by copying passes through this buffer: small enough to stay in cache

    def _sendfile(self, file: BinaryIO, count: int, progress: Callable[[int], None] | None = None) -> None:
        """Send ``count`` bytes of ``file`` from its start (calling ``progress(n)`` after each chunk), copied
        through one reused buffer."""
        if self._copy_buffer is None:
            self._copy_buffer = memoryview(bytearray(self.COPY_CHUNK))
        chunk = self._copy_buffer
        file.seek(0)
        for part in chunk_slices(count, progress):
            sent = part.start
            while sent < part.stop:
                n = file.readinto(chunk[: min(len(chunk), part.stop - sent)])
                if not n:
                    raise ProtocolError("the file shrank while it was being sent")
                self._sendall(chunk[:n])
                sent += n

    def close(self) -> None:
        raise NotImplementedError

    # -- reading --------------------------------------------------------------
    def _fill(self, need: int) -> None:
        """Make at least ``need`` bytes available in the buffer."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start + need > self.BUFFER:  # move the leftover to the front
            leftover = self._end - self._start
            self._buf[:leftover] = self._view[self._start : self._end]
            self._start, self._end = 0, leftover
        while self._end - self._start < need:
            n = self._recv_into(self._view[self._end :] if self._end else self._view)
            if n == 0:
                raise ConnectionClosedError(
                    "the peer closed the connection"
                    + (" in the middle of a message" if self._end > self._start else "")
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
        start = self._start
        if self._end - start < 16:  # HEADER.size
            self._fill(16)
            start = self._start
        ctrl_len, kind, flags, bulk_len = _unpack_header(self._buf, start)
        if ctrl_len > MAX_CTRL or bulk_len > MAX_BULK:
            raise _too_large(ctrl_len, bulk_len)
        start += 16
        end = start + ctrl_len
        if end > self._end:
            self._start = start
            if ctrl_len > self.BUFFER:
                return _new_tuple(Frame, (kind, flags, unpack(self.read_exact(ctrl_len)), bulk_len))
            self._fill(ctrl_len)
            start = self._start
            end = start + ctrl_len
        self._start = end
        if ctrl_len == 1 and self._buf[start] == 0xC0:  # nil, the most common reply
            return _new_tuple(Frame, (kind, flags, None, bulk_len))
        return _new_tuple(Frame, (kind, flags, unpack(self._view[start:end]), bulk_len))

    def recv_bulk_into(self, view: memoryview, follow: int = 0) -> None:
        """Fill ``view`` entirely from the stream (buffered bytes first); ``follow``: how many bytes of the
        same bulk part come after these (a subclass may wait for bigger batches while that many are due)."""
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self._recv_rest(view, self._take_buffered(view))

    def _take_buffered(self, view: memoryview) -> int:
        """Copy what the small buffer holds to the start of ``view``; how many bytes that was."""
        have = min(self._end - self._start, len(view))
        if have:
            view[:have] = self._view[self._start : self._start + have]
            self._start += have
        return have

    def _recv_rest(self, view: memoryview, got: int, until: int | None = None) -> int:
        """Receive into ``view`` from offset ``got`` until ``until`` bytes are there (default: all of it)."""
        total = len(view)
        until = total if until is None else until
        while got < until:
            n = self._recv_into(view[got:])
            if n == 0:
                raise ConnectionClosedError(f"the peer closed the connection after {got} of {total} bulk bytes")
            got += n
        return got

    def recv_bulk_reporting(self, view: memoryview, progress: Callable[[int], None]) -> None:
        """``recv_bulk_into`` chunk by chunk (views of ``view``, no copy), calling ``progress(n)`` after each."""
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        for part in chunk_slices(len(view), progress):
            self.recv_bulk_into(view[part], len(view) - part.stop)

    def recv_bulk_to_fd(self, fd: int | None, count: int, follow: int = 0) -> None:
        """Write the next ``count`` stream bytes to the file ``fd`` (None: drop them), through one reused buffer
        (``follow``: the bytes of the bulk part after these, as for ``recv_bulk_into``).

        If writing the file fails (disk full, a file-size limit), the rest of the
        bulk part (``follow`` included) is still read and dropped before the error
        is raised, so the stream stays in step: no byte of a bulk part is ever read
        as a frame.
        """
        if self._scratch is None:
            self._scratch = memoryview(bytearray(self.SCRATCH))
        while count:
            chunk = self._scratch[: min(count, len(self._scratch))]
            count -= len(chunk)
            self.recv_bulk_into(chunk, count + follow)
            if fd is not None:
                try:
                    write_all(fd, chunk)
                except OSError as exc:
                    raise self._write_failed(exc, count + follow) from None

    def _write_failed(self, exc: OSError, still_to_come: int) -> OSError:
        """Drop the ``still_to_come`` bytes of the bulk part whose file write failed; the error to raise."""
        Channel.recv_bulk_to_fd(self, None, still_to_come)
        return OSError(exc.errno, f"{exc.strerror or exc} while the server wrote the received data to a file "
                                  "(disk full or a file-size limit?); the data was dropped")

    def discard_bulk(self, count: int) -> None:
        Channel.recv_bulk_to_fd(self, None, count)

    def _readable(self, timeout: float | None = 0.0) -> bool:
        """Whether the stream has bytes to read within ``timeout`` s (None: the stream's own timeout, or forever)."""
        return timeout is None

    def cancel_pending(self) -> bool:
        """Server side, between repeats of a long request: True (and the frame consumed) if a CANCEL came.

        Never blocks when nothing came; anything else that came stays buffered for ``recv_frame``.
        See docs/protocol.md section 12.

            >>> chan.cancel_pending()  # doctest: +SKIP
            False
        """
        if self._end - self._start < 16:
            if not self._readable():
                return False
            self._fill(16)  # a CANCEL frame is 17 bytes sent in one write: its header is here
        _, kind, flags, bulk_len = _unpack_header(self._buf, self._start)
        if kind != Kind.CANCEL:
            return False
        self.recv_frame()
        if bulk_len:
            self.discard_bulk(bulk_len)
        return True

    def await_reply(self) -> Frame:
        """Client side: the next frame, waiting for its header with ``awaiting`` set.

        An interrupt (KeyboardInterrupt) while ``awaiting`` is True leaves the stream in step: the
        request went out whole and no byte of its reply was consumed, so the caller may send CANCEL
        and read the reply later (docs/protocol.md section 12).
        """
        if self._end == self._start:
            # wait for the first byte where an interrupt consumes nothing (a KeyboardInterrupt raised
            # after a read returned would lose the bytes it read); then read as usual
            self.awaiting = True
            self._readable(None)
            self.awaiting = False
        return self.recv_frame()

    def request(self, kind: int, ctrl: Any) -> tuple[int, int, Any, int]:
        """Send a request without a bulk part; return its reply's ``(kind, flags, ctrl, bulk_len)``.

        The reply is a Frame (a plain tuple on SocketChannel's fast path); its bulk part is still on the stream.

            >>> chan.request(Kind.PING, [])  # doctest: +SKIP
            Frame(kind=0, ctrl={'objects': 0, 'tensors': 0, 'tensor_bytes': 0}, bulk_len=0)
        """
        body = _pack(ctrl)
        self.busy = True
        self._sendall(_pack_header(len(body), kind, 0, 0) + body)
        return self.recv_frame()

    # -- writing --------------------------------------------------------------
    def send_frame(
        self,
        kind: int,
        ctrl: Any = None,
        bulk: bytes | bytearray | memoryview | None = None,
        *,
        flags: int = 0,
        file: tuple[BinaryIO, int] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Send one frame; bulk comes from ``bulk`` or from ``file=(fileobj, size)``.

        ``progress(n)`` is called as each chunk of a large bulk part goes out (None: one write, no reports).
        """
        if bulk is None and file is None:
            if ctrl is None and kind == 0 and not flags:
                self._sendall(_OK_NIL)
            else:
                body = _pack(ctrl)
                self.busy = True
                self._sendall(_pack_header(len(body), kind, flags, 0) + body)
            return
        body = _pack(ctrl)
        self.busy = True
        if bulk is not None:
            bulk = memoryview(bulk).cast("B") if not isinstance(bulk, bytes) else bulk
            bulk_len = len(bulk)
        else:
            bulk_len = file[1]
        head = _pack_header(len(body), kind, flags, bulk_len) + body
        if bulk is not None and bulk_len <= self.SMALL_BULK:
            self._sendall(head + bytes(bulk))
            return
        if bulk_len:
            self._send_head(head)
        else:
            self._sendall(head)
        if bulk is not None:
            view = memoryview(bulk)
            for part in chunk_slices(bulk_len, progress):
                for start in range(part.start, part.stop, self.SEND_PIECE):
                    self._sendall(view[start : min(start + self.SEND_PIECE, part.stop)])
        elif file is not None and bulk_len:
            self._sendfile(file[0], bulk_len, progress)


def unpaced_on_loopback(sock: socket.socket) -> bool:
    """Whether the TCP ``sock``'s peer is on this machine; if so, it sends without congestion control's pacing
    from now on (reno): there is no network to pace for, and the pacing of BBR (some distributions' default)
    reorders loopback segments into spurious retransmits (transfers about 1.3x slower)."""
    if not _is_loopback(sock):
        return False
    if hasattr(socket, "TCP_CONGESTION"):
        with contextlib.suppress(OSError):  # reno is always there and allowed; failing that, the default stays
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
    return True


def _is_loopback(sock: socket.socket) -> bool:
    """Whether the TCP ``sock``'s peer is this machine (a loopback address, or one of this machine's own)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        peer, own = sock.getpeername(), sock.getsockname()
    except OSError:
        return False
    host = peer[0].removeprefix("::ffff:")
    return host == own[0].removeprefix("::ffff:") or host.startswith("127.") or host == "::1"


class SocketChannel(Channel):
    """A channel over a connected TCP socket."""

    SPLICE_PIPE = 1 << 20
    SENDFILE_SHARE = 3  # a file sent to a peer on this machine: one SEND_PIECE in this many goes by sendfile

    def __init__(self, sock: socket.socket):
        super().__init__()
        self.sock = sock
        self._pipe: tuple[int, int] | None = None
        self._landing: memoryview | None = None
        self._loopback = unpaced_on_loopback(sock)  # then bulk is received in batches, files sent from a map
        self._recv_into = sock.recv_into  # bound directly: one Python frame less per call
        self._sendall = sock.sendall
        # a bulk part's header waits for the bulk's first bytes (MSG_MORE) and goes out with them: under
        # TCP_NODELAY it would go alone, and the lone segment slows the 64 MiB behind it by some 15 % (C, loopback)
        self._more = getattr(socket, "MSG_MORE", 0) if type(sock) is socket.socket else 0
        self._fileno = sock.fileno  # -1 once closed: exchange() then raises EBADF, as sendall would
        # the fast path writes to the descriptor itself: a plain socket only (never one that wraps the stream)
        self._exchange = _exchange if type(sock) is socket.socket else None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a socketpair in tests)

    def request(self, kind: int, ctrl: Any) -> tuple[int, int, Any, int]:
        """``Channel.request`` with the send and the first receive in one C call (``_shim.exchange``).

        A reply that came whole, alone and without a bulk part is returned as the C call made it (a
        plain tuple). Else its first bytes are at the start of the receive buffer, and ``recv_frame``
        reads the frame from there, receiving the rest. Bytes still buffered from before (a notice that
        came with the last reply) go first, through the plain path, as everything does without the C
        function (a shim built before it). A socket with a timeout is non-blocking: what would block
        is left to the socket object, which waits with its timeout.

            >>> remote._chan.request(Kind.PING, [])  # doctest: +SKIP
            (0, 0, {'objects': 0, 'tensors': 0, 'tensor_bytes': 0}, 0)
        """
        body = _pack(ctrl)
        self.busy = True
        exchange = self._exchange
        if exchange is None or self._start != self._end:
            self._sendall(_pack_header(len(body), kind, 0, 0) + body)
            return self.recv_frame()
        got = exchange(self._fileno(), kind, body, self._buf, unpack)
        if got.__class__ is tuple:  # the whole reply, and nothing more: the buffer stays empty
            return got
        return self.resume(got, _pack_header(len(body), kind, 0, 0) + body)

    def _send_head(self, head: bytes) -> None:
        if self._more and self._sendall == self.sock.sendall:  # (the handshake bounds _sendall in time)
            self.sock.sendall(head, self._more)
        else:
            self._sendall(head)

    def _readable(self, timeout: float | None = 0.0) -> bool:
        return bool(select.select([self.sock], [], [], self.sock.gettimeout() if timeout is None else timeout)[0])

    def resume(self, got: int, frame: bytes) -> tuple[int, int, Any, int]:
        """The reply to ``frame``, a request that ``exchange`` (or the call fast path) began and returned ``got`` for."""
        if got.__class__ is tuple:  # the whole reply, and nothing more
            return got
        if got > 0:  # bytes of the reply at the start of the buffer
            self._start = 0
            self._end = got
        elif got == 0:
            raise ConnectionClosedError("the peer closed the connection")
        elif -1 - got < len(frame):  # the send would block (a socket with a timeout): the rest, with its timeout
            self._sendall(frame[-1 - got :])
        return self.recv_frame()

    def _sendfile(self, file: BinaryIO, count: int, progress: Callable[[int], None] | None = None) -> None:
        if self._loopback and count:
            # the peer is on this machine: both ends' CPUs share the copying. Most pieces are sent from a
            # read-only mapping of the file (copied into the socket here); one in SENDFILE_SHARE goes by
            # sendfile (no copy here: the receiver copies it from the page cache). 1.11-1.26x faster than
            # either way alone (benchmarks: download). The files are the session's own (its workspace, or
            # one it just linked): nothing truncates them meanwhile.
            try:
                mapping = mmap.mmap(file.fileno(), count, prot=mmap.PROT_READ)
            except (OSError, ValueError):  # not mappable, or shorter than count: copied (which says so)
                return super()._sendfile(file, count, progress)
            with mapping, memoryview(mapping) as view:
                for part in chunk_slices(count, progress):
                    for start in range(part.start, part.stop, self.SEND_PIECE):
                        stop = min(start + self.SEND_PIECE, part.stop)
                        if start // self.SEND_PIECE % self.SENDFILE_SHARE == self.SENDFILE_SHARE - 1:
                            self._sendfile_range(file, start, stop)
                        else:
                            self._sendall(view[start:stop])
            return
        if progress is None:
            self.sock.sendfile(file, 0, count)  # zero-copy os.sendfile on Linux
            return
        for part in chunk_slices(count, progress):  # still sendfile, one report per chunk
            self._sendfile_range(file, part.start, part.stop)

    def _sendfile_range(self, file: BinaryIO, start: int, stop: int) -> None:
        """Send bytes ``start:stop`` of ``file`` with sendfile(2); on a blocking socket straight to the system
        call (socket.sendfile would set up a selector for every piece)."""
        if self.sock.gettimeout() is None and hasattr(os, "sendfile"):
            sendfile_range(self.sock.fileno(), file.fileno(), start, stop)
            return
        while start < stop:
            sent = self.sock.sendfile(file, start, stop - start)
            if not sent:
                raise ProtocolError("the file shrank while it was being sent")
            start += sent

    # -- bulk from a peer on this machine: woken once per batch --------------------------------------------
    # Over loopback the receiver is woken for every few segments, and the two ends contend for the socket; with
    # SO_RCVLOWAT it sleeps until a batch has come (about 1.3x faster, benchmarks/run.py). A receive may only
    # wait for a batch while at least two batches of the bulk part are still due, so one is always coming: the
    # kernel wakes on the queue reaching the batch, not on the call's own request being met.
    BATCH = 1 << 20

    @contextlib.contextmanager
    def _in_batches(self, due: int) -> Iterator[int]:
        """While in the block, receives wake once ``BATCH`` bytes are queued; yields how many of the ``due``
        bytes may be received so (0: none, nothing set)."""
        batched = max(due - 2 * self.BATCH + 1, 0)
        if not batched or not self._loopback:  # a slow network would hold each wake-up for a whole batch
            yield 0
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.BATCH)
        except OSError:
            yield 0
            return
        try:
            yield batched
        finally:  # a small reply after this must wake its reader (and select) at its first byte
            with contextlib.suppress(OSError):  # closed meanwhile: nothing left to wake
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)

    def recv_bulk_into(self, view: memoryview, follow: int = 0) -> None:
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        got = self._take_buffered(view)
        with self._in_batches(len(view) - got + follow) as batched:
            if batched:
                got = self._recv_rest(view, got, until=min(got + batched, len(view)))
        self._recv_rest(view, got)

    def recv_bulk_reporting(self, view: memoryview, progress: Callable[[int], None]) -> None:
        """As ``Channel.recv_bulk_reporting``, in batches set once for the whole part rather than once per
        chunk (a receiver that is the busier end pays for every wake-up between chunks)."""
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        got = self._take_buffered(view)
        parts = chunk_slices(len(view), progress)
        part = next(parts, None)
        with self._in_batches(len(view) - got) as batched:
            until = got + batched
            while part is not None:
                got = self._recv_rest(view, got, until=min(part.stop, until))
                if got < part.stop:
                    break  # the last batches: woken at their first byte, after the block
                part = next(parts, None)
        while part is not None:
            got = self._recv_rest(view, got, until=part.stop)
            part = next(parts, None)

    def recv_bulk_to_fd(self, fd: int, count: int, follow: int = 0) -> None:
        """Move stream bytes to the file: from a peer on this machine through one reused buffer (``_land``),
        from any other with splice(2) (no copy through user space), where available."""
        if self._loopback:
            return self._land(fd, count, follow)
        have = min(self._end - self._start, count)
        if have:
            start = self._start
            self._start += have
            count -= have
            try:
                write_all(fd, self._view[start : start + have])
            except OSError as exc:
                raise self._write_failed(exc, count + follow) from None
        if not count:
            return
        if not hasattr(os, "splice") or self.sock.gettimeout() is not None:
            return super().recv_bulk_to_fd(fd, count, follow)
        with self._in_batches(count + follow) as batched:
            if batched:
                count -= self._splice_in(fd, min(batched, count), count + follow)
        if count:
            self._splice_in(fd, count, count + follow)

    # Over loopback, receiving into a buffer that stays in the cache and writing the file from it, LANDED bytes
    # per write at offsets that are multiples of it, beats splicing the socket's pages to the file (whose writes
    # start wherever the segments end): C, 64 MiB into a new file on ext4, 1.1-1.3x, and 1.1-2.6x when the
    # memory was freed seconds before; uploads of 64 MiB, median of 5 benchmark runs, 0.67x native against
    # 0.50x. Larger writes are not: from 512 KiB the filesystem takes the page cache in large folios, which at
    # times run at 0.1x on memory freed seconds before (on this VM, whose balloon hands it back to its host).
    LANDING = 1 << 20
    LANDED = 256 << 10

    def _land(self, fd: int, count: int, follow: int) -> None:
        """Write the next ``count`` stream bytes to ``fd`` through one reused buffer, received ``LANDING`` bytes
        at a time (the bytes already buffered first) and written ``LANDED`` at a time."""
        if self._landing is None:
            self._landing = memoryview(bytearray(self.LANDING))
        received = 0
        buffered = min(self._end - self._start, count)
        with contextlib.ExitStack() as batches:
            # batches while the stream owes at least two more: up to this many bytes of the count
            batched_until = buffered + batches.enter_context(self._in_batches(count - buffered + follow))
            batched = batched_until > buffered
            while received < count:
                chunk = self._landing[: min(self.LANDING, count - received)]
                got = self._take_buffered(chunk)
                if batched:
                    got = self._recv_rest(chunk, got, until=max(got, min(len(chunk), batched_until - received)))
                    if got < len(chunk):  # the last batches: woken at their first byte
                        batches.close()
                        batched = False
                self._recv_rest(chunk, got)
                received += len(chunk)
                try:
                    for start in range(0, len(chunk), self.LANDED):
                        write_all(fd, chunk[start : start + self.LANDED])
                except OSError as exc:
                    raise self._write_failed(exc, count - received + follow) from None

    def _splice_in(self, fd: int, count: int, due: int) -> int:
        """Move ``count`` stream bytes to ``fd`` through a pipe (``due``: bytes of the bulk part still to come,
        for the errors); returns ``count``."""
        if self._pipe is None:
            self._pipe = os.pipe()
            try:
                import fcntl

                fcntl.fcntl(self._pipe[1], fcntl.F_SETPIPE_SZ, self.SPLICE_PIPE)
            except OSError:
                pass  # a smaller pipe only means more calls
        read_end, write_end = self._pipe
        sock_fd = self.sock.fileno()
        left = count
        while left:
            moved = os.splice(sock_fd, write_end, min(left, self.SPLICE_PIPE), flags=os.SPLICE_F_MOVE)
            if moved == 0:
                raise ConnectionClosedError(f"the peer closed the connection with {due} bulk bytes still to come")
            left -= moved
            due -= moved
            try:
                while moved:
                    moved -= os.splice(read_end, fd, moved, flags=os.SPLICE_F_MOVE)
            except OSError as exc:
                while moved:  # empty the pipe: it carries the next transfer
                    moved -= len(os.read(read_end, moved))
                raise self._write_failed(exc, due) from None
        return count

    def close(self) -> None:
        if self._pipe is not None:
            for end in self._pipe:
                os.close(end)
            self._pipe = None
        try:
            self.sock.close()
        except OSError:
            pass


class PipeChannel(Channel):
    """A channel over a pair of file descriptors (a child's stdin/stdout)."""

    def __init__(self, read_fd: int, write_fd: int):
        super().__init__()
        self.read_fd = read_fd
        self.write_fd = write_fd

    def _recv_into(self, view: memoryview) -> int:
        return os.readv(self.read_fd, [view])

    def _readable(self, timeout: float | None = 0.0) -> bool:
        return bool(select.select([self.read_fd], [], [], timeout)[0])

    def _sendall(self, data: bytes | memoryview) -> None:
        write_all(self.write_fd, data)

    def close(self) -> None:
        for fd in {self.read_fd, self.write_fd}:
            try:
                os.close(fd)
            except OSError:
                pass
