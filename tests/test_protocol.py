"""The wire protocol (docs/protocol.md) spoken byte by byte against a real server.

A raw socket plays a broken or hostile client: garbage, bad magic, unknown
versions, oversized, truncated and malformed frames, unknown requests, bulk
parts of the wrong size. Each gets the documented ERROR frame (or a plain
close where nothing can be said), the server keeps serving, and no worker or
workspace is left behind. The client side is checked against peers that are
not workbench servers.
"""
from __future__ import annotations

import hashlib
import hmac
import socket
import struct
import threading
import time
from typing import Any, Callable

import pytest

from .conftest import assert_clean, wait_until
from workbench import rpc
from workbench.errors import ConnectionClosedError, ErrorCode, ProtocolError, RPCError
from workbench.rpc.wire.protocol import (
    FLAG_NO_REPLY,
    HEADER,
    MAGIC,
    MAX_BULK,
    MAX_CTRL,
    NONCE_BYTES,
    PREAMBLE,
    VERSION,
    Ext,
    Handle,
    Kind,
    SocketChannel,
    pack,
    unpack,
)
from workbench.rpc.server.worker import server_handshake

IO_TIMEOUT = 5.0  # no single read in this file may wait longer
FLOAT32 = [2, 32, 1]  # DLPack [code, bits, lanes]
CPU = [1, 0]


# -- a client written by hand, as a C client would be ---------------------------------
class RawFrame:
    def __init__(self, kind: int, flags: int, ctrl: Any, bulk: bytes):
        self.kind, self.flags, self.ctrl, self.bulk = kind, flags, ctrl, bulk

    def __repr__(self) -> str:
        return f"RawFrame(kind={self.kind}, flags={self.flags}, ctrl={self.ctrl!r}, bulk={len(self.bulk)} bytes)"


class RawPeer:
    """One connection driven with PREAMBLE, HEADER and pack/unpack only."""

    def __init__(self, sock: socket.socket):
        sock.settimeout(IO_TIMEOUT)
        self.sock = sock
        self.last_bulk = b""  # the bulk part of the last OK reply read by request()

    @classmethod
    def connect(cls, port: int) -> "RawPeer":
        return cls(socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT))

    def __enter__(self) -> "RawPeer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # bytes
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"the server closed the connection after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def assert_closed(self) -> None:
        """The server closes its end: EOF (or a reset) comes, with no further bytes."""
        try:
            rest = self.sock.recv(1 << 16)
        except ConnectionResetError:
            rest = b""
        assert rest == b"", f"expected the server to close the connection, got {rest[:64]!r}"

    # frames
    def send_raw_frame(self, kind: int, ctrl: bytes, bulk: bytes = b"", flags: int = 0) -> None:
        self.send(HEADER.pack(len(ctrl), kind, flags, len(bulk)) + ctrl + bulk)

    def send_frame(self, kind: int, ctrl: Any = None, bulk: bytes = b"", flags: int = 0) -> None:
        self.send_raw_frame(kind, pack(ctrl), bulk, flags)

    def recv_frame(self) -> RawFrame:
        ctrl_len, kind, flags, bulk_len = HEADER.unpack(self.recv_exact(HEADER.size))
        ctrl = unpack(self.recv_exact(ctrl_len))
        return RawFrame(kind, flags, ctrl, self.recv_exact(bulk_len) if bulk_len else b"")

    def request(self, kind: int, args: Any, bulk: bytes = b"") -> Any:
        """Send a request; return the OK reply's control part (bulk in ``self.last_bulk``)."""
        self.send_frame(kind, args, bulk)
        frame = self.recv_frame()
        assert frame.kind == Kind.OK, f"request {kind} failed: {frame}"
        self.last_bulk = frame.bulk
        return frame.ctrl

    def expect_error(self, code: ErrorCode) -> str:
        """Read one frame: an ERROR [code, message]; return the message."""
        frame = self.recv_frame()
        assert frame.kind == Kind.ERROR, f"expected an ERROR frame, got {frame}"
        assert isinstance(frame.ctrl, list) and len(frame.ctrl) == 2, frame
        got, message = frame.ctrl
        assert got == code, f"expected error code {code!r}, got {got}: {message}"
        assert isinstance(message, str) and message
        assert frame.bulk == b""
        return message

    # handshake
    def recv_preamble(self) -> tuple[bytes, int, int]:
        return PREAMBLE.unpack(self.recv_exact(PREAMBLE.size))

    def start(self) -> dict:
        """Send the preamble, check the server's, read HELLO; return the HELLO map."""
        self.send(PREAMBLE.pack(MAGIC, VERSION, 0))
        assert self.recv_preamble() == (MAGIC, VERSION, 0)
        hello = self.recv_frame()
        assert hello.kind == Kind.HELLO and hello.bulk == b"", hello
        return hello.ctrl

    def handshake(self, key: str = "", timeout: float = 0, proof: bytes | None = None, ctor: list | None = None) -> dict:
        """The whole client handshake; return the session info of the OK reply."""
        self.start()
        self.send_frame(Kind.CONNECT, {"key": key, "timeout": timeout, "proof": proof, "ctor": ctor})
        ok = self.recv_frame()
        assert ok.kind == Kind.OK, ok
        return ok.ctrl


def assert_still_serving(server: rpc.Server, remote: rpc.RPCSession, tmpdir: str) -> None:
    """The session open all along still answers, a new one connects, and nothing is left over."""
    remote.ping()
    with rpc.connect("127.0.0.1", server.port, connect_timeout=IO_TIMEOUT) as fresh:
        fresh.ping()
    remote.close()
    assert_clean(server, tmpdir)


def ping_ok(peer: RawPeer) -> None:
    """PING on the same connection answers OK: the session goes on."""
    assert isinstance(peer.request(Kind.PING, []), dict)


# -- the happy path, byte for byte -----------------------------------------------------
# docs/protocol.md, "Handshake bytes": what the Python client sends as CONNECT.
CONNECT_BYTES = bytes.fromhex(
    "24000000 0300 0000 0000000000000000"
    "84 a3 6b6579 a0 a7 74696d656f7574 cb 0000000000000000 a5 70726f6f66 c0 a4 63746f72 c0"
)


def test_handshake_bytes_and_session_info(server):
    with RawPeer.connect(server.port) as peer:
        peer.send(b"WBRP\x01\x00\x00\x00")
        assert peer.recv_exact(8) == b"WBRP\x01\x00\x00\x00"
        head = peer.recv_exact(16)
        ctrl_len, kind, flags, bulk_len = struct.unpack("<IHHQ", head)
        assert (kind, flags, bulk_len) == (Kind.HELLO, 0, 0)
        assert ctrl_len == 0x38  # as in docs/protocol.md, "Handshake bytes"
        hello = unpack(peer.recv_exact(ctrl_len))
        assert set(hello) == {"version", "nonce", "auth"}
        assert hello["version"] == VERSION and hello["auth"] is False
        assert isinstance(hello["nonce"], bytes) and len(hello["nonce"]) == NONCE_BYTES
        connect = HEADER.pack(36, Kind.CONNECT, 0, 0) + pack({"key": "", "timeout": 0.0, "proof": None, "ctor": None})
        assert connect == CONNECT_BYTES
        peer.send(connect)
        ok = peer.recv_frame()
        assert ok.kind == Kind.OK and ok.bulk == b""
        info = ok.ctrl
        assert {"devices", "arch", "system", "cpu_count", "pid", "key", "session_timeout"} <= set(info)
        assert [1, 0] in info["devices"]
        assert info["session_timeout"] == 0.0 and isinstance(info["session_timeout"], float)


# The worked example of docs/protocol.md, section "Worked example".
GET_ECHO = bytes.fromhex("10000000 1700 0000 0000000000000000" "91 ae 776f726b62656e63682e6563686f")
GET_ECHO_OK = bytes.fromhex("0a000000 0000 0000 0000000000000000" "d7 03 0100000000000000")
CALL_ECHO = bytes.fromhex(
    "18000000 1900 0000 0000000000000000" "92 d7 03 0100000000000000 93 01 cb 4004000000000000 a1 78"
)
CALL_ECHO_OK = bytes.fromhex("0d000000 0000 0000 0000000000000000" "93 01 cb 4004000000000000 a1 78")


def test_worked_example_bytes(server, remote, private_tmpdir):
    fn = Handle(Ext.FUNCTION, 1)
    assert HEADER.pack(16, Kind.GET_FUNCTION, 0, 0) + pack(["workbench.echo"]) == GET_ECHO
    assert HEADER.pack(24, Kind.CALL, 0, 0) + pack([fn, [1, 2.5, "x"]]) == CALL_ECHO
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send(GET_ECHO)
        assert peer.recv_exact(len(GET_ECHO_OK)) == GET_ECHO_OK
        peer.send(CALL_ECHO)
        assert peer.recv_exact(len(CALL_ECHO_OK)) == CALL_ECHO_OK
    assert_still_serving(server, remote, private_tmpdir)


def test_error_example_bytes(server, remote, private_tmpdir):
    """docs/protocol.md: an unknown request kind and its ERROR reply."""
    message = "unknown request kind 99; this server speaks protocol version 1"
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send(bytes.fromhex("01000000 6300 0000 0000000000000000 90"))
        head = peer.recv_exact(16)
        assert head == bytes.fromhex("42000000 0100 0000 0000000000000000")
        assert peer.recv_exact(0x42) == bytes.fromhex("92 04 d9 3e") + message.encode()
    assert_still_serving(server, remote, private_tmpdir)


def test_tensor_round_trip_with_bulk_parts(server, remote, private_tmpdir):
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        t = peer.request(Kind.TENSOR_ALLOC, [[4], FLOAT32, *CPU], data)
        assert isinstance(t, Handle) and t.ext == Ext.TENSOR
        assert peer.request(Kind.TENSOR_READ, [t]) == 16 and peer.last_bulk == data
        assert peer.request(Kind.TENSOR_WRITE, [t], data[::-1]) is None
        assert peer.request(Kind.TENSOR_READ, [t]) == 16 and peer.last_bulk == data[::-1]
        peer.send_frame(Kind.FREE, [t], flags=FLAG_NO_REPLY)  # no reply comes for it
        assert peer.request(Kind.PING, [])["tensors"] == 0
    assert_still_serving(server, remote, private_tmpdir)


# -- (a) garbage, (b) bad magic, (c) unknown version: preamble + ERROR, then close -----------
@pytest.mark.parametrize(
    "data, named",
    [
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "b'GET '"),
        (bytes(range(64)), "b'\\x00\\x01\\x02\\x03'"),
    ],
    ids=["http", "binary"],
)
def test_garbage_gets_bad_magic_error(server, remote, private_tmpdir, data, named):
    with RawPeer.connect(server.port) as peer:
        peer.send(data)
        assert peer.recv_preamble() == (MAGIC, VERSION, 0)  # the server says what it is first
        message = peer.expect_error(ErrorCode.PROTOCOL)
        assert "bad magic" in message and named in message and "rpc-workbench" in message
        peer.assert_closed()
    assert_still_serving(server, remote, private_tmpdir)


def test_a_tvm_clients_opening_gets_tvms_answer(server, remote, private_tmpdir):
    """TVM's RPC magic opens TVM's handshake (tests/test_tvm_wire.py): a key that is not a client's
    ``client:...`` gets TVM's mismatch code, one little-endian int32, and the connection closes."""
    with RawPeer.connect(server.port) as peer:
        peer.send(struct.pack("<ii", 0xFF271, 4) + b"key0")
        assert peer.recv_exact(4) == struct.pack("<i", 0xFF271 + 2)
        peer.assert_closed()
    assert_still_serving(server, remote, private_tmpdir)


def test_short_garbage_then_close_gets_no_answer(server, remote, private_tmpdir):
    with RawPeer.connect(server.port) as peer:
        peer.send(b"hi\n")
        peer.sock.shutdown(socket.SHUT_WR)
        peer.assert_closed()  # not a whole preamble: nothing to answer
    assert_still_serving(server, remote, private_tmpdir)


def test_bad_magic(server, remote, private_tmpdir):
    with RawPeer.connect(server.port) as peer:
        peer.send(PREAMBLE.pack(b"WBRX", VERSION, 0))
        assert peer.recv_preamble() == (MAGIC, VERSION, 0)
        message = peer.expect_error(ErrorCode.PROTOCOL)
        assert "bad magic b'WBRX'" in message
        peer.assert_closed()
    assert_still_serving(server, remote, private_tmpdir)


@pytest.mark.parametrize("version", [0, VERSION + 1, 0xFFFF])
def test_unknown_protocol_version(server, remote, private_tmpdir, version):
    with RawPeer.connect(server.port) as peer:
        peer.send(PREAMBLE.pack(MAGIC, version, 0))
        assert peer.recv_preamble() == (MAGIC, VERSION, 0)  # the server's own version
        message = peer.expect_error(ErrorCode.PROTOCOL)
        assert f"protocol version {version}" in message and f"speaks {VERSION}" in message
        peer.assert_closed()
    assert_still_serving(server, remote, private_tmpdir)


# -- (d) oversized frames: ERROR, then that connection closes -------------------------------
# (ctrl_len, bulk_len, what the error names): every server (minrpc too) answers each with an ERROR, then closes
OVERSIZED_FRAMES = [
    (MAX_CTRL + 1, 0, f"control part of {MAX_CTRL + 1} bytes is over the {MAX_CTRL}-byte limit"),
    (0xFFFFFFFF, 0, f"control part of {0xFFFFFFFF} bytes"),
    (1, MAX_BULK + 1, f"bulk part of {MAX_BULK + 1} bytes is over the {MAX_BULK}-byte limit"),
]
OVERSIZED_FRAME_IDS = ["ctrl-over-limit", "ctrl-max-u32", "bulk-over-limit"]


@pytest.mark.parametrize("ctrl_len, bulk_len, named", OVERSIZED_FRAMES, ids=OVERSIZED_FRAME_IDS)
def test_oversized_frame(server, remote, private_tmpdir, ctrl_len, bulk_len, named):
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send(HEADER.pack(ctrl_len, Kind.PING, 0, bulk_len))
        message = peer.expect_error(ErrorCode.TOO_LARGE)
        assert named in message and "closing this connection" in message
        peer.assert_closed()
    assert_still_serving(server, remote, private_tmpdir)


def test_frame_at_the_control_limit_is_read(server, remote, private_tmpdir):
    """MAX_CTRL itself is allowed: a control part of exactly 16 MiB is read whole."""
    body = pack([b"x" * (MAX_CTRL - 6)])  # fixarray (1) + bin 32 header (5) + data
    assert len(body) == MAX_CTRL
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send_raw_frame(Kind.PING, body)
        assert peer.recv_frame().kind == Kind.OK
        ping_ok(peer)
    assert_still_serving(server, remote, private_tmpdir)


# -- (e) truncated frames: the server ends that session quietly --------------------------------
def upload_head(name: str, bulk_len: int) -> bytes:
    """The header and control part of an UPLOAD whose bulk part is ``bulk_len`` bytes."""
    body = pack([name])
    return HEADER.pack(len(body), Kind.UPLOAD, 0, bulk_len) + body


@pytest.mark.parametrize(
    "data, how",
    [
        (HEADER.pack(1, Kind.PING, 0, 0)[:7], "shutdown"),
        (HEADER.pack(50, Kind.PING, 0, 0) + b"\x91" + b"\x00" * 9, "shutdown"),
        (upload_head("f.bin", 1000) + b"\x00" * 100, "shutdown"),
        (upload_head("f.bin", 1 << 30) + b"\x00" * 100, "close"),
    ],
    ids=["mid-header", "mid-control", "mid-bulk", "mid-bulk-close"],
)
def test_truncated_frame_then_close(server, remote, private_tmpdir, data, how):
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send(data)
        if how == "shutdown":
            peer.sock.shutdown(socket.SHUT_WR)
            peer.assert_closed()  # nothing to answer: the client is gone
    assert_still_serving(server, remote, private_tmpdir)


# -- (f) malformed control parts: ERROR PROTOCOL, then close ----------------------------------
@pytest.mark.parametrize(
    "ctrl, named",
    [
        (b"\xc1", "malformed control message: FormatError"),  # 0xc1 is never used in msgpack
        (b"\x92\x01", "malformed control message"),  # an array of 2 with 1 element
        (b"\x90\x90", "malformed control message"),  # two objects where one is expected
        (b"\xa2\xff\xfe", "malformed control message"),  # a str that is not UTF-8
        (b"\xd7\x09" + bytes(8), "unknown msgpack extension type 9 (length 8)"),
        (b"\xd5\x01\x00\x00", "unknown msgpack extension type 1 (length 2)"),  # a tensor handle must be 8 bytes
    ],
    ids=["never-used-byte", "truncated-array", "extra-data", "bad-utf8", "unknown-ext", "short-handle"],
)
def test_malformed_control_part(server, remote, private_tmpdir, ctrl, named):
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send_raw_frame(Kind.PING, ctrl)
        message = peer.expect_error(ErrorCode.PROTOCOL)
        assert named in message and "closing this connection" in message
        peer.assert_closed()
    assert_still_serving(server, remote, private_tmpdir)


def test_a_control_part_of_too_many_items_is_refused_within_bounded_memory(server, remote, private_tmpdir):
    """3 Mi nils in three lists (3 MiB on the wire): more items than a worker decodes (2 Mi, ~48 MiB at most)."""
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send_raw_frame(Kind.PING, b"\xdc\x00\x03" + (b"\xdd\x00\x10\x00\x00" + b"\xc0" * (1 << 20)) * 3)
        message = peer.expect_error(ErrorCode.PROTOCOL)
        assert "more than 2097152 items of lists and dicts in one message" in message, message
        peer.assert_closed()
    assert_still_serving(server, remote, private_tmpdir)


# -- (g) unknown request kinds: ERROR BAD_REQUEST, the session goes on ------------------------
@pytest.mark.parametrize(
    "kind, bulk",
    [(99, b""), (99, b"z" * 100), (0xFFFF, b""), (int(Kind.HELLO), b""), (int(Kind.CONNECT), b"")],
    ids=["99", "99-with-bulk", "65535", "HELLO", "CONNECT"],
)
def test_unknown_request_kind(server, remote, private_tmpdir, kind, bulk):
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send_frame(kind, [], bulk)
        message = peer.expect_error(ErrorCode.BAD_REQUEST)
        assert f"unknown request kind {kind}" in message
        ping_ok(peer)
        ping_ok(peer)
    assert_still_serving(server, remote, private_tmpdir)


def test_no_reply_flag_silences_errors(server, remote, private_tmpdir):
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send_frame(99, [], b"q" * 10, flags=FLAG_NO_REPLY)
        peer.send_frame(Kind.REMOVE, ["no-such-file"], flags=FLAG_NO_REPLY)
        ping_ok(peer)  # the very next frame is the PING's reply
    assert_still_serving(server, remote, private_tmpdir)


@pytest.mark.parametrize(
    "kind, args, bulk, named",
    [
        (Kind.PING, {"not": "a list"}, b"", "arguments must be a list, not dict"),
        (Kind.PING, "text", b"y" * 50, "arguments must be a list, not str"),
        (Kind.REMOVE, ["a", "b"], b"", "REMOVE takes 1 arguments, got 2"),
        (Kind.CALL, [Handle(Ext.FUNCTION, 12345), []], b"", "is not a live function"),
        (Kind.TENSOR_ALLOC, [[4], FLOAT32, 2, 0], b"", "has no cuda(0)"),
    ],
    ids=["map-args", "str-args-with-bulk", "arity", "dead-handle", "no-device"],
)
def test_bad_request_arguments(server, remote, private_tmpdir, kind, args, bulk, named):
    code = ErrorCode.NO_DEVICE if "cuda" in named else ErrorCode.BAD_REQUEST
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send_frame(kind, args, bulk)
        assert named in peer.expect_error(code)
        ping_ok(peer)
    assert_still_serving(server, remote, private_tmpdir)


# -- (h) bulk parts of the wrong size: ERROR BAD_REQUEST, the session goes on --------------------
@pytest.mark.parametrize("size", [0, 8, 24])
def test_tensor_write_bulk_size_mismatch(server, remote, private_tmpdir, size):
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        t = peer.request(Kind.TENSOR_ALLOC, [[4], FLOAT32, *CPU], data)
        peer.send_frame(Kind.TENSOR_WRITE, [t], b"\xee" * size)
        message = peer.expect_error(ErrorCode.BAD_REQUEST)
        if size:
            assert f"expected 16 bytes of data, the request carries {size}" in message
        else:
            assert "carries no data" in message and "16 bytes" in message
        assert peer.request(Kind.TENSOR_READ, [t]) == 16 and peer.last_bulk == data  # untouched
        ping_ok(peer)
    assert_still_serving(server, remote, private_tmpdir)


def test_tensor_alloc_bulk_size_mismatch(server, remote, private_tmpdir):
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        peer.send_frame(Kind.TENSOR_ALLOC, [[4], FLOAT32, *CPU], b"\x00" * 12)
        assert "expected 16 bytes of data, the request carries 12" in peer.expect_error(ErrorCode.BAD_REQUEST)
        ping_ok(peer)
    assert_still_serving(server, remote, private_tmpdir)


# -- notices the server sends on its own -------------------------------------------------------
def test_session_timeout_notice(server, remote, private_tmpdir):
    with RawPeer.connect(server.port) as peer:
        info = peer.handshake(timeout=0.3)
        assert info["session_timeout"] == 0.3
        start = time.monotonic()
        message = peer.expect_error(ErrorCode.SESSION_TIMEOUT)  # unsolicited: no request is pending
        assert time.monotonic() - start < 3
        assert "session timed out after 0.3 s" in message
        peer.assert_closed()
    assert_still_serving(server, remote, private_tmpdir)


def load_test_kernels(peer: "RawPeer", kernels: dict[str, str]) -> tuple[Handle, list[str]]:
    """UPLOAD and LOAD_MODULE of tests/kernels/kernels.c's library on a raw session: its handle and names."""
    with open(kernels["so"], "rb") as f:
        assert peer.request(Kind.UPLOAD, ["k.so"], f.read()) is None
    mod, names, _entry = peer.request(Kind.LOAD_MODULE, ["k.so"])
    assert mod.ext == Ext.MODULE
    return mod, names


def test_worker_died_notice(server, remote, private_tmpdir, kernels):
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        mod, names = load_test_kernels(peer, kernels)
        assert "segfault_unguarded" in names
        fn = peer.request(Kind.MODULE_FUNCTION, [mod, "segfault_unguarded"])  # a death no guard catches
        assert fn.ext == Ext.FUNCTION
        peer.send_frame(Kind.CALL, [fn, []])
        message = peer.expect_error(ErrorCode.WORKER_DIED)
        assert "SIGSEGV" in message and "connect again" in message
        peer.assert_closed()
    assert_still_serving(server, remote, private_tmpdir)


def test_kernel_crashed_reply_and_the_session_goes_on(server, remote, private_tmpdir, kernels):
    """docs/protocol.md section 12: a kernel that faults gets ERROR 14; the same connection serves on."""
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        mod, _names = load_test_kernels(peer, kernels)
        fn = peer.request(Kind.MODULE_FUNCTION, [mod, "segfault"])
        peer.send_frame(Kind.CALL, [fn, []])
        message = peer.expect_error(ErrorCode.KERNEL_CRASHED)
        assert message.startswith("segfault: the kernel died of signal 11 (SIGSEGV")
        half = peer.request(Kind.MODULE_FUNCTION, [mod, "half"])
        assert peer.request(Kind.CALL, [half, [3.0]]) == 1.5
    assert_still_serving(server, remote, private_tmpdir)


# -- the handshake's refusals, in process over a socketpair ---------------------------------------
class HandshakeServer:
    """``server_handshake`` on one end of a socketpair, in a thread; the test drives the other end."""

    def __init__(self, **kwargs: Any):
        self._ours, theirs = socket.socketpair()
        self._chan = SocketChannel(theirs)
        self.result: Any = None
        self.peer = RawPeer(self._ours)
        self._thread = threading.Thread(target=self._run, args=(kwargs,), daemon=True)
        self._thread.start()

    def _run(self, kwargs: dict) -> None:
        try:
            self.result = server_handshake(self._chan, **kwargs)
        except BaseException as exc:  # the refusal, examined by the test
            self.result = exc
        finally:
            self._chan.close()  # as run_session does when the handshake ends

    def __enter__(self) -> "HandshakeServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peer.close()
        self._thread.join(IO_TIMEOUT)
        self._chan.close()
        assert not self._thread.is_alive()


def proof_for(token: str, nonce: bytes) -> bytes:
    """docs/protocol.md, "Authentication", written out independently of the package."""
    return hmac.new(token.encode("utf-8"), b"workbench-rpc-v1" + nonce, hashlib.sha256).digest()


def test_auth_proof_is_hmac_of_the_nonce():
    with HandshakeServer(token="s3cret") as hs:
        hello = hs.peer.start()
        assert hello["auth"] is True
        hs.peer.send_frame(Kind.CONNECT, {"key": "", "timeout": 0, "proof": proof_for("s3cret", hello["nonce"]), "ctor": None})
        assert hs.peer.recv_frame().kind == Kind.OK
    assert isinstance(hs.result, dict)


@pytest.mark.parametrize(
    "server_kwargs, connect, code, named",
    [
        ({"token": "s3cret"}, {"proof": None}, ErrorCode.AUTH, "requires an auth token"),
        ({"token": "s3cret"}, {"proof": "WRONG"}, ErrorCode.AUTH, "wrong auth token"),
        ({"key": "rasp"}, {"key": "jetson"}, ErrorCode.KEY_MISMATCH, "serves key 'rasp'"),
        ({}, {"ctor": ["rpc.Spawn", b"x"]}, ErrorCode.UNSUPPORTED, "'rpc.Spawn' is not supported"),
        ({}, {"timeout": -1}, ErrorCode.PROTOCOL, "session_timeout must be a number >= 0"),
        ({}, None, ErrorCode.PROTOCOL, "expected a CONNECT message"),
    ],
    ids=["no-proof", "wrong-proof", "key", "ctor", "timeout", "not-connect"],
)
def test_handshake_refusals(server_kwargs, connect, code, named):
    with HandshakeServer(**server_kwargs) as hs:
        hello = hs.peer.start()
        if connect is None:
            hs.peer.send_frame(Kind.PING, [])
        else:
            fields = {"key": "", "timeout": 0, "proof": None, "ctor": None, **connect}
            if fields["proof"] == "WRONG":
                fields["proof"] = proof_for("not-the-token", hello["nonce"])
            hs.peer.send_frame(Kind.CONNECT, fields)
        assert named in hs.peer.expect_error(code)
        hs.peer.assert_closed()
    assert isinstance(hs.result, RPCError) and hs.result.code == code


# -- a bad result and an unreadable CONNECT --------------------------------------------------------------
def test_a_tensor_a_call_returns_is_a_new_handle(server, remote, private_tmpdir):
    with RawPeer.connect(server.port) as peer:
        peer.handshake()
        fn = peer.request(Kind.GET_FUNCTION, ["workbench.echo"])
        t = peer.request(Kind.TENSOR_ALLOC, [[1], FLOAT32, *CPU], struct.pack("<f", 2.5))
        try:
            returned, one = peer.request(Kind.CALL, [fn, [t, 1]])  # echo returns [its tensor, 1]
            assert one == 1 and returned.code == Ext.TENSOR and returned != t
            peer.request(Kind.FREE, [returned])  # the tensor lives on under its first handle
            peer.request(Kind.TENSOR_READ, [t])
            assert struct.unpack("<f", peer.last_bulk) == (2.5,)
            ping_ok(peer)
        finally:
            peer.close()
            assert_still_serving(server, remote, private_tmpdir)


@pytest.mark.parametrize(
    "connect, code",
    [
        (HEADER.pack(1, Kind.CONNECT, 0, 0) + b"\xc1", ErrorCode.PROTOCOL),
        (HEADER.pack(MAX_CTRL + 1, Kind.CONNECT, 0, 0), ErrorCode.TOO_LARGE),
        (HEADER.pack(len(pack({"ctor": 5})), Kind.CONNECT, 0, 0) + pack({"ctor": 5}), ErrorCode.UNSUPPORTED),
    ],
    ids=["malformed", "oversized", "ctor-not-array"],
)
def test_unreadable_connect_gets_an_error(server, remote, private_tmpdir, connect, code):
    with RawPeer.connect(server.port) as peer:
        peer.start()
        peer.send(connect)
        try:
            peer.expect_error(code)
            peer.assert_closed()
        finally:
            peer.close()
            assert_still_serving(server, remote, private_tmpdir)


# -- the client against peers that are not workbench servers ---------------------------------------
class FakeServer:
    """A one-connection TCP server on loopback running ``behaviour(conn, stop)`` in a thread."""

    def __init__(self, behaviour: Callable[[socket.socket, threading.Event], None]):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(IO_TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self._behaviour = behaviour
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(IO_TIMEOUT)
            try:
                self._behaviour(conn, self.stop)
            except OSError:
                pass

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self._thread.join(IO_TIMEOUT)
        self.listener.close()
        assert not self._thread.is_alive()


def _read_preamble(conn: socket.socket) -> None:
    got = b""
    while len(got) < PREAMBLE.size:
        chunk = conn.recv(PREAMBLE.size - len(got))
        if not chunk:
            return
        got += chunk


def test_client_against_http_server():
    def http(conn, stop):
        _read_preamble(conn)
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    with FakeServer(http) as fake:
        with pytest.raises(ProtocolError) as err:
            rpc.connect("127.0.0.1", fake.port, connect_timeout=IO_TIMEOUT)
    message = str(err.value)
    assert f"127.0.0.1:{fake.port} is not an rpc-workbench server" in message and "b'HTTP'" in message


def _wait_readable(conn: socket.socket, n: int) -> None:
    wait_until(lambda: len(conn.recv(n, socket.MSG_PEEK)) == n, timeout=IO_TIMEOUT)


@pytest.mark.parametrize("how", ["closes", "too-short", "reset"])
def test_client_against_server_that_closes(how):
    def answer_and_close(conn, stop):
        if how == "reset":  # a TVM tracker: echo a magic and close with the client's bytes unread (RST)
            _wait_readable(conn, PREAMBLE.size)
            conn.sendall((0x2F271).to_bytes(4, "little"))
            return
        _read_preamble(conn)
        if how == "too-short":
            conn.sendall(b"WBRP")

    with FakeServer(answer_and_close) as fake:
        with pytest.raises(ConnectionClosedError) as err:
            rpc.connect("127.0.0.1", fake.port, connect_timeout=IO_TIMEOUT)
    assert f"127.0.0.1:{fake.port} closed the connection during the handshake" in str(err.value)


def test_client_against_server_without_hello():
    def preamble_then_ok(conn, stop):
        _read_preamble(conn)
        conn.sendall(PREAMBLE.pack(MAGIC, VERSION, 0) + HEADER.pack(1, Kind.OK, 0, 0) + pack(None))
        stop.wait(IO_TIMEOUT)

    with FakeServer(preamble_then_ok) as fake:
        with pytest.raises(ProtocolError) as err:
            rpc.connect("127.0.0.1", fake.port, connect_timeout=IO_TIMEOUT)
    assert "sent kind 0 where HELLO was expected" in str(err.value)


def test_client_against_server_with_oversized_hello():
    def preamble_then_huge_frame(conn, stop):
        _read_preamble(conn)
        conn.sendall(PREAMBLE.pack(MAGIC, VERSION, 0) + b"\xff" * 16)
        stop.wait(IO_TIMEOUT)

    with FakeServer(preamble_then_huge_frame) as fake:
        with pytest.raises(RPCError) as err:
            rpc.connect("127.0.0.1", fake.port, connect_timeout=IO_TIMEOUT)
    assert err.value.code == ErrorCode.TOO_LARGE and "is the peer speaking the workbench protocol?" in str(err.value)


def test_client_against_silent_server_is_bounded():
    def silent(conn, stop):
        stop.wait(IO_TIMEOUT)

    with FakeServer(silent) as fake:
        start = time.monotonic()
        with pytest.raises((OSError, RPCError)) as err:
            rpc.connect("127.0.0.1", fake.port, connect_timeout=0.5)
        elapsed = time.monotonic() - start
    assert 0.4 < elapsed < 2.5, elapsed
    assert f"127.0.0.1:{fake.port}" in str(err.value) and "did not answer the handshake" in str(err.value)
