"""The tracker's wire format, compatible with Apache TVM's RPC tracker.

A connection opens with the 4-byte little-endian magic 0x2F271, echoed by the
tracker; then each message is an int32 little-endian length followed by that
many bytes of UTF-8 JSON. Requests are JSON arrays whose first element is a
``Code``; replies are a bare code (``0``) or ``[code, value]``.
"""
from __future__ import annotations

import json
import math
import socket
import struct
from enum import IntEnum
from typing import Any

from ...errors import ConnectionClosedError, ProtocolError

MAGIC = 0x2F271
MAGIC_BYTES = struct.pack("<i", MAGIC)
LENGTH = struct.Struct("<i")
MAX_MESSAGE = 4 << 20  # a summary of thousands of servers fits easily


def quick_ack(sock: socket.socket) -> None:
    """ACK what arrives at once. TVM's tracker code writes a message's length and body in two
    writes without TCP_NODELAY, so its body waits for our ACK of the length: without this, for
    a delayed ACK (40 ms or more). Linux clears the flag after use: set it before every read."""
    if _QUICKACK is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


class Code(IntEnum):
    FAIL = -1
    SUCCESS = 0
    PING = 1
    STOP = 2
    PUT = 3
    REQUEST = 4
    UPDATE_INFO = 5
    SUMMARY = 6
    GET_PENDING_MATCHKEYS = 7


def encode(message: Any) -> bytes:
    """Length prefix and body in one buffer (sent with one write: no Nagle stall)."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return LENGTH.pack(len(body)) + body


GREETING = object()  # what MessageReader yields for the opening magic
NOTHING = object()  # MessageReader.next(): no complete message yet


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a tracker message may carry")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a double")
    return value


class MessageReader:
    """Splits a byte stream into tracker messages, whatever the segment boundaries.

    ``max_message`` bounds one message (the tracker takes requests of 64 KiB at
    most; replies such as SUMMARY may be larger). JSON that is not strict
    (``NaN``, ``Infinity``), nests too deep or has an integer of thousands of
    digits is a ProtocolError, like any malformed message.

        >>> reader = MessageReader(expect_magic=False)
        >>> reader.feed(encode([6]))
        [[6]]
    """

    def __init__(self, expect_magic: bool = True, max_message: int = MAX_MESSAGE):
        self._buf = bytearray()
        self._magic = expect_magic
        self.max_message = max_message

    def add(self, data: bytes) -> None:
        """Add received bytes (read them back one message at a time with ``next()``)."""
        self._buf += data

    def next(self) -> Any:
        """The next complete message (GREETING for the opening magic), or NOTHING. Bad input raises ProtocolError."""
        if self._magic:
            if len(self._buf) < 4:
                return NOTHING
            if bytes(self._buf[:4]) != MAGIC_BYTES:
                raise ProtocolError(f"not a tracker client: bad magic {bytes(self._buf[:4]).hex()}")
            del self._buf[:4]
            self._magic = False
            return GREETING
        if len(self._buf) < 4:
            return NOTHING
        (size,) = LENGTH.unpack_from(self._buf)
        if size < 0 or size > self.max_message:
            raise ProtocolError(f"tracker message of {size} bytes is over the {self.max_message}-byte limit")
        if len(self._buf) < 4 + size:
            return NOTHING
        body = bytes(self._buf[4 : 4 + size])
        del self._buf[: 4 + size]
        try:
            return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, NaN/Infinity, an int of > 4300 digits
            raise ProtocolError(f"malformed tracker message: {exc}") from None
        except RecursionError:
            raise ProtocolError("malformed tracker message: nested too deep") from None

    def feed(self, data: bytes) -> list[Any]:
        """Add received bytes; return the complete messages. Bad input raises ProtocolError."""
        self.add(data)
        out = []
        while (message := self.next()) is not NOTHING:
            out.append(message)
        return out


class TrackerConnection:
    """A blocking request/response connection to a tracker (ours or TVM's)."""

    def __init__(self, host: str, port: int, timeout: float | None = 10.0):
        self.address = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ConnectionRefusedError(
                f"cannot connect to a tracker at {self.address}: {exc.strerror or exc}; is it running?"
            ) from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = MessageReader(expect_magic=False)
        self._pending: list[Any] = []
        try:
            self.sock.sendall(MAGIC_BYTES)
            echo = self._recv_exact(4)
        except BaseException:
            self.close()
            raise
        if echo != MAGIC_BYTES:
            self.close()
            raise ProtocolError(f"{self.address} is not an RPC tracker (it answered {echo.hex()})")

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            quick_ack(self.sock)
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionClosedError(f"the tracker at {self.address} closed the connection")
            data += chunk
        return data

    def send(self, message: Any) -> None:
        self.sock.sendall(encode(message))

    def recv(self) -> Any:
        while not self._pending:
            quick_ack(self.sock)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionClosedError(f"the tracker at {self.address} closed the connection")
            self._pending.extend(self._reader.feed(chunk))
        return self._pending.pop(0)

    def call(self, message: Any) -> Any:
        self.send(message)
        return self.recv()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
