"""TVM's RPC wire protocol (apache-tvm 0.27, RPC protocol "0.8.0"): the subset workbench servers speak.

A connection whose first four bytes are TVM's RPC magic (``0x000FF271``,
little-endian) is a TVM client (``tvm.rpc.connect``, a tracker's
``request``, MetaSchedule's ``RPCRunner``). docs/protocol.md, section
"TVM's protocol on workbench servers", describes the bytes; this module holds
the codec only (no sockets but ``TVMChannel``, no session state):

* the handshake: ``i32 magic, i32 keylen, key`` from the client (the key is
  ``client:<key>[ -timeout=<seconds>]``), answered ``i32 magic, i32 keylen,
  key`` (``server:<key>``) or one ``i32`` refusal code;
* packets: ``u64 length`` then ``length`` bytes, starting with an ``i32``
  code (``Code``); arguments and return values are *packed sequences*:
  ``i32 count``, then per value an ``i32`` type index (``TypeIndex``) and its
  payload.

Every length read from the wire is checked against the packet it sits in and
against the limits below before anything is allocated; nothing is unpickled.

    >>> parse_client_key(b"client:rasp -timeout=60")
    ('rasp', {'timeout': '60'})
    >>> exception_packet("boom")[:12].hex()  # u64 length 24, i32 code 5 (EXCEPTION)
    '180000000000000005000000'
"""
from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any, Callable, NamedTuple

from ...errors import BadRequestError, ErrorCode, KeyMismatchError, ProtocolError, TooLargeError
from .protocol import MAX_BULK, MAX_CTRL, Kind, SocketChannel

RPC_MAGIC = 0xFF271
MAGIC_BYTES = struct.pack("<i", RPC_MAGIC)  # b"\x71\xf2\x0f\x00": the first bytes of a TVM client
CODE_SUCCESS = RPC_MAGIC  # handshake answers (i32)
CODE_DUPLICATE = RPC_MAGIC + 1
CODE_MISMATCH = RPC_MAGIC + 2  # TVM's client: "cannot find server that matches key=..."
PROTOCOL_VERSION = "0.8.0"  # kRPCProtocolVer, checked in INIT_SERVER
MAX_KEY = 4096  # handshake key bytes (TVM's keys are a few dozen)
MAX_INIT_PACKET = 64 << 10  # the INIT_SERVER packet, read in the server's event loop
MAX_PACKET = MAX_BULK + MAX_CTRL  # a packet's length: a tensor's bytes (MAX_BULK) and its description
MAX_INLINE = MAX_CTRL  # argument bytes of one packet held in memory (strings, byte arrays, shapes)
MAX_ARGS = 4096  # values in one packed sequence
MAX_NDIM = 64
STREAM_MIN = 64 << 10  # a last byte-array argument at least this large is left on the stream (uploads)
SESSION_TIMEOUT_PREFIX = "RPCSessionTimeoutError: "  # TVM's client raises RPCSessionTimeoutError for these

_I32, _U32, _I64, _U64, _F64 = (struct.Struct(f) for f in ("<i", "<I", "<q", "<Q", "<d"))
_DEVICE = struct.Struct("<ii")  # DLDevice: device_type, device_id
_DTYPE = struct.Struct("<BBH")  # DLDataType: code, bits, lanes


class Code(IntEnum):
    """RPC codes: the first i32 of every packet (TVM's ``RPCCode``)."""

    NONE = 0
    SHUTDOWN = 1
    INIT_SERVER = 2
    CALL_FUNC = 3
    RETURN = 4
    EXCEPTION = 5
    COPY_FROM_REMOTE = 6
    COPY_TO_REMOTE = 7
    COPY_ACK = 8
    GET_GLOBAL_FUNC = 9  # syscalls from here on: their arguments are one packed sequence
    FREE_HANDLE = 10
    DEV_SET_DEVICE = 11
    DEV_GET_ATTR = 12
    DEV_ALLOC_DATA = 13
    DEV_FREE_DATA = 14
    DEV_STREAM_SYNC = 15
    COPY_AMONG_REMOTE = 16
    DEV_ALLOC_DATA_WITH_SCOPE = 17
    DEV_CREATE_STREAM = 18
    DEV_FREE_STREAM = 19
    DEV_SET_STREAM = 20
    DEV_GET_CURRENT_STREAM = 21


class TypeIndex(IntEnum):
    """tvm-ffi type indices as they travel in packed sequences (tvm_ffi 0.1, apache-tvm 0.27)."""

    NONE = 0
    INT = 1
    BOOL = 2
    FLOAT = 3
    OPAQUE_PTR = 4
    DATA_TYPE = 5
    DEVICE = 6
    DLTENSOR_PTR = 7
    RAW_STR = 8
    BYTE_ARRAY_PTR = 9
    SMALL_STR = 11
    SMALL_BYTES = 12
    STATIC_OBJECT_BEGIN = 64
    STR = 65
    BYTES = 66
    FUNCTION = 68
    TENSOR = 70
    MODULE = 73
    RPC_OBJECT_REF = 115  # kTVMFFIDynObjectBegin - 13: a remote object's handle


# -- values ---------------------------------------------------------------------------------------
class Pointer(NamedTuple):
    """An opaque handle (type index 4): on a workbench server, the id of a session object."""

    value: int


class DataType(NamedTuple):
    code: int
    bits: int
    lanes: int


class Device(NamedTuple):
    device_type: int
    device_id: int


class Ref(NamedTuple):
    """A handle the client passes back: a remote function (68), module (73) or object (115)."""

    type_index: int
    handle: int


class TensorArg(NamedTuple):
    """A DLTensor as it travels: its data is the server's handle (what DEV_ALLOC_DATA* returned)."""

    data: int
    device: Device
    dtype: DataType
    shape: tuple[int, ...]
    byte_offset: int


class StreamedBytes(NamedTuple):
    """A last byte-array (or string) argument of ``size`` bytes left on the stream, for the server to move."""

    size: int
    is_str: bool


# -- the handshake -----------------------------------------------------------------------------------
def parse_client_key(raw: bytes) -> tuple[str, dict[str, str]]:
    """The key a TVM client asks for and its options, from its handshake key ``client:<key>[ -opt=value]``.

    KeyMismatchError when it is not a client's key (a TVM server's ``server:...``, or garbage).

        >>> parse_client_key(b"client:")
        ('', {})
    """
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise KeyMismatchError("the TVM handshake key is not UTF-8") from None
    words = text.split()
    if not words or not words[0].startswith("client:"):
        raise KeyMismatchError(f"a TVM client's handshake key starts with 'client:', not {text[:60]!r}")
    options = {}
    for word in words[1:]:
        name, sep, value = word.partition("=")
        if sep and name.startswith("-"):
            options[name[1:]] = value
    return words[0][len("client:"):], options


def server_reply(key: str) -> bytes:
    """The handshake's success answer: the magic, then this server's key as TVM's servers send it."""
    raw = f"server:{key}".encode()
    return MAGIC_BYTES + _I32.pack(len(raw)) + raw


def parse_init_server(body: bytes) -> list[Any]:
    """The session constructor arguments of an INIT_SERVER packet body (``[]``: a local session).

    ProtocolError for another packet, a wrong protocol version or malformed arguments.
    """
    reader = PacketReader(BytesSource(body), len(body))
    code = reader.i32()
    if code != Code.INIT_SERVER:
        raise ProtocolError(f"expected TVM's INIT_SERVER packet (code 2) after the handshake, got code {code}")
    size = reader.u64()
    if size > 64:
        raise ProtocolError(f"a TVM protocol version of {size} bytes")
    version = reader.take(size).decode(errors="replace")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"client protocol version mismatch with the server: server protocol={PROTOCOL_VERSION}, "
            f"client protocol={version} (use apache-tvm 0.27's RPC client)")
    try:
        args = read_packed(reader)
    except BadRequestError as exc:
        raise ProtocolError(f"malformed INIT_SERVER arguments: {exc}") from None
    if reader.left:
        raise ProtocolError(f"{reader.left} bytes after the INIT_SERVER arguments")
    return args


# -- reading packets -------------------------------------------------------------------------------
class BytesSource:
    """``read_exact`` over bytes already received (the INIT_SERVER packet in the server's event loop)."""

    def __init__(self, data: bytes):
        self._data, self._at = data, 0

    def read_exact(self, n: int) -> bytes:
        out = self._data[self._at:self._at + n]
        self._at += n
        return out

    def discard_bulk(self, n: int) -> None:
        self._at += n


class PacketReader:
    """Reads one packet's fields from ``source`` (``read_exact(n)``, ``discard_bulk(n)``): never past its end.

    ``left`` is what remains of the packet; ``inline`` what argument bytes it may still hold in memory.
    A field that does not fit what is left is a BadRequestError, raised before anything is read, so the
    caller can drop the rest (``skip_rest``) and the stream stays in step.
    """

    def __init__(self, source: Any, length: int, inline: int = MAX_INLINE):
        self.source = source
        self.left = length
        self.inline = inline

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise BadRequestError(f"a TVM packet field of {n} bytes overruns its packet ({self.left} bytes left)")
        self.left -= n
        return self.source.read_exact(n)

    def take_inline(self, n: int, what: str) -> bytes:
        """``n`` bytes of an argument held in memory, within the packet's budget of ``MAX_INLINE`` bytes."""
        if n > self.left:
            return self.take(n)  # says that it overruns the packet
        if n > self.inline:
            raise TooLargeError(
                f"{what} of {n} bytes is over the {MAX_INLINE}-byte limit for arguments held in memory "
                "(only the last argument of tvm.rpc.server.upload may be larger)")
        self.inline -= n
        return self.take(n)

    def i32(self) -> int:
        return _I32.unpack(self.take(4))[0]

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def i64(self) -> int:
        return _I64.unpack(self.take(8))[0]

    def u64(self) -> int:
        return _U64.unpack(self.take(8))[0]

    def skip_rest(self) -> None:
        """Drop what is left of the packet (after an error, or fields this server ignores)."""
        if self.left:
            left, self.left = self.left, 0
            self.source.discard_bulk(left)


def read_tensor(reader: PacketReader) -> TensorArg:
    """A DLTensor: u64 data handle, DLDevice, i32 ndim, DLDataType, i64 shape[ndim], u64 byte_offset."""
    data = reader.u64()
    device = Device(*_DEVICE.unpack(reader.take(8)))
    ndim = reader.i32()
    dtype = DataType(*_DTYPE.unpack(reader.take(4)))
    if not 0 <= ndim <= MAX_NDIM:
        raise BadRequestError(f"a tensor of {ndim} dimensions (at most {MAX_NDIM})")
    shape = struct.unpack(f"<{ndim}q", reader.take_inline(8 * ndim, "a tensor shape"))
    return TensorArg(data, device, dtype, shape, reader.u64())


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise BadRequestError("a string argument that is not UTF-8") from None


def _object(reader: PacketReader, outer: int) -> Any:
    """An object value (type index >= 64, or a small string/bytes): u32 inner type index, then its payload."""
    inner = reader.u32()
    if inner == TypeIndex.RPC_OBJECT_REF:
        return Ref(inner, reader.u64())
    if inner in (TypeIndex.STR, TypeIndex.BYTES):
        raw = reader.take_inline(reader.u64(), "a string argument")
        return _text(raw) if inner == TypeIndex.STR else raw
    raise BadRequestError(f"an object of type index {inner} (sent as {outer}) cannot travel over TVM's RPC")


def read_value(reader: PacketReader, last: bool = False) -> Any:
    """One value of a packed sequence. ``last``: a large byte array that ends the packet stays on the stream."""
    t = reader.i32()
    if t == TypeIndex.NONE:
        return None
    if t == TypeIndex.INT:
        return reader.i64()
    if t == TypeIndex.BOOL:
        return reader.i64() != 0
    if t == TypeIndex.FLOAT:
        return _F64.unpack(reader.take(8))[0]
    if t == TypeIndex.OPAQUE_PTR:
        return Pointer(reader.u64())
    if t == TypeIndex.DATA_TYPE:
        dtype = DataType(*_DTYPE.unpack(reader.take(4)))
        reader.take(4)  # padding
        return dtype
    if t == TypeIndex.DEVICE:
        return Device(*_DEVICE.unpack(reader.take(8)))
    if t == TypeIndex.DLTENSOR_PTR:
        return read_tensor(reader)
    if t in (TypeIndex.RAW_STR, TypeIndex.BYTE_ARRAY_PTR):
        size = reader.u64()
        if last and size >= STREAM_MIN and size == reader.left:
            return StreamedBytes(size, t == TypeIndex.RAW_STR)
        raw = reader.take_inline(size, "a string argument" if t == TypeIndex.RAW_STR else "a byte array argument")
        return _text(raw) if t == TypeIndex.RAW_STR else raw
    if t in (TypeIndex.FUNCTION, TypeIndex.MODULE):
        return Ref(t, reader.u64())
    if t >= TypeIndex.STATIC_OBJECT_BEGIN or t in (TypeIndex.SMALL_STR, TypeIndex.SMALL_BYTES):
        if t in (TypeIndex.BYTES, TypeIndex.SMALL_BYTES) and last:
            inner = reader.u32()
            if inner != TypeIndex.BYTES:
                raise BadRequestError(f"a byte array sent as type index {t} holds type index {inner}")
            size = reader.u64()
            if size >= STREAM_MIN and size == reader.left:
                return StreamedBytes(size, False)
            return reader.take_inline(size, "a byte array argument")
        return _object(reader, t)
    raise BadRequestError(f"unknown TVM type index {t} in the arguments")


def read_packed(reader: PacketReader, stream_last: bool = False) -> list[Any]:
    """A packed sequence: i32 count, then the values. ``stream_last``: see ``read_value``."""
    count = reader.i32()
    if not 0 <= count <= MAX_ARGS:
        raise BadRequestError(f"a packed sequence of {count} values (at most {MAX_ARGS})")
    return [read_value(reader, stream_last and i == count - 1) for i in range(count)]


# -- writing packets -------------------------------------------------------------------------------
def encode_value(value: Any) -> bytes:
    """One value of a packed sequence the server sends: type index and payload.

    None, bool, int (int64), float, ``Pointer``, str (sent as a raw string), bytes (a byte array),
    ``TensorArg`` (a DLTensor).
    """
    if value is None:
        return _I32.pack(TypeIndex.NONE)
    if isinstance(value, bool):
        return _I32.pack(TypeIndex.BOOL) + _I64.pack(int(value))
    if isinstance(value, Pointer):
        return _I32.pack(TypeIndex.OPAQUE_PTR) + _U64.pack(value.value)
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 63):
            raise OverflowError(f"{value} does not fit TVM's int64")
        return _I32.pack(TypeIndex.INT) + _I64.pack(value)
    if isinstance(value, float):
        return _I32.pack(TypeIndex.FLOAT) + _F64.pack(value)
    if isinstance(value, str):
        raw = value.encode()
        return _I32.pack(TypeIndex.RAW_STR) + _U64.pack(len(raw)) + raw
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        return _I32.pack(TypeIndex.BYTE_ARRAY_PTR) + _U64.pack(len(raw)) + raw
    if isinstance(value, TensorArg):  # a tensor the server returns: its description, its data handle
        return (_I32.pack(TypeIndex.DLTENSOR_PTR) + _U64.pack(value.data) + _DEVICE.pack(*value.device)
                + _I32.pack(len(value.shape)) + _DTYPE.pack(*value.dtype)
                + struct.pack(f"<{len(value.shape)}q", *value.shape) + _U64.pack(value.byte_offset))
    raise TypeError(f"a {type(value).__name__} cannot travel over TVM's RPC")


def packet(code: int, body: bytes) -> bytes:
    """``u64 length, i32 code, body``."""
    return _U64.pack(4 + len(body)) + _I32.pack(code) + body


def return_packet(values: list[Any]) -> bytes:
    """A RETURN packet carrying the packed sequence of ``values``."""
    return packet(Code.RETURN, _I32.pack(len(values)) + b"".join(encode_value(v) for v in values))


RETURN_VOID = return_packet([None])  # the answer to INIT_SERVER, COPY_TO_REMOTE, DEV_STREAM_SYNC, ...


def exception_packet(message: str, code: int | None = None) -> bytes:
    """An EXCEPTION packet: TVM's client raises it as ``RPCError`` (``RPCSessionTimeoutError`` for code 9)."""
    if code == ErrorCode.SESSION_TIMEOUT and not message.startswith(SESSION_TIMEOUT_PREFIX):
        message = SESSION_TIMEOUT_PREFIX + message
    return packet(Code.EXCEPTION, _I32.pack(1) + encode_value(message.replace("\0", "\\0")))


def bytes_return_header(size: int) -> bytes:
    """The head of a CALL_FUNC return of ``size`` bytes (``[66, byte array]``): the bytes follow it."""
    body = _I32.pack(2) + encode_value(int(TypeIndex.BYTES)) + _I32.pack(TypeIndex.BYTE_ARRAY_PTR) + _U64.pack(size)
    return _U64.pack(4 + len(body) + size) + _I32.pack(Code.RETURN) + body


def copy_ack_header(size: int) -> bytes:
    """The head of a COPY_ACK packet: ``size`` bytes of tensor data follow it."""
    return _U64.pack(4 + size) + _I32.pack(Code.COPY_ACK)


def call_return(value: Any) -> list[Any]:
    """What a CALL_FUNC return carries for ``value``: its type index, then its payload (TVM's convention).

    A function or module is a ``Ref`` (sent as the type index and an opaque handle).
    """
    if isinstance(value, Ref):
        return [value.type_index, Pointer(value.handle)]
    if value is None:
        return [int(TypeIndex.NONE), None]
    if isinstance(value, bool):
        return [int(TypeIndex.BOOL), value]
    if isinstance(value, int):
        return [int(TypeIndex.INT), value]
    if isinstance(value, float):
        return [int(TypeIndex.FLOAT), value]
    if isinstance(value, str):
        return [int(TypeIndex.STR), value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [int(TypeIndex.BYTES), bytes(value)]
    if hasattr(value, "__index__"):  # numpy integers
        return [int(TypeIndex.INT), int(value)]
    if hasattr(value, "__float__"):
        return [int(TypeIndex.FLOAT), float(value)]
    raise TypeError(
        f"the function returned a {type(value).__name__}, which TVM's RPC protocol cannot carry back "
        "(it carries None, bools, ints, floats, strings and bytes)")


def refusal(code: int, message: str, key_answered: bool) -> bytes:
    """What a server sends a TVM client it refuses: before its handshake answer only TVM's mismatch code
    fits (no text), after it an EXCEPTION packet with the reason, the answer to INIT_SERVER."""
    return exception_packet(message, code) if key_answered else _I32.pack(CODE_MISMATCH)


class TVMChannel(SocketChannel):
    """A session socket that speaks TVM's packets.

    The notices a worker sends on its own (``Watchdog``, ``IdleTimer``: ``send_frame(Kind.ERROR,
    [code, message])``) go out as EXCEPTION packets; it never sees a CANCEL (TVM's client has none).
    """

    def send_frame(self, kind: int, ctrl: Any = None, bulk: Any = None, *, flags: int = 0, file: Any = None,
                   progress: Callable[[int], None] | None = None) -> None:
        if kind != Kind.ERROR or not isinstance(ctrl, list) or len(ctrl) != 2:
            raise ProtocolError(f"a TVM-protocol session sends no workbench frame of kind {kind}")
        self._sendall(exception_packet(str(ctrl[1]), ctrl[0]))

    def cancel_pending(self) -> bool:
        return False
