"""minrpc, the native session server, against docs/protocol.md and the Python client.

The binary is built from workbench/native with the host C compiler (the build line of minrpc.h, with
-Wall -Wextra), started on a free loopback port, and driven two ways: byte for byte with the raw-wire
client of tests/test_protocol.py (its vectors are the ones of protocol.md), and with the client API
(``rpc.connect``, ``rpc.PopenSession``). After each test no session process and no workspace is left.
"""
from __future__ import annotations

import glob
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
from typing import Any

import numpy as np
import pytest

from .conftest import assert_clean, children, session_workspaces, wait_until
from .test_protocol import (
    CALL_ECHO,
    CALL_ECHO_OK,
    CONNECT_BYTES,
    CPU,
    FLOAT32,
    GET_ECHO,
    GET_ECHO_OK,
    IO_TIMEOUT,
    OVERSIZED_FRAME_IDS,
    OVERSIZED_FRAMES,
    RawPeer,
    ping_ok,
    upload_head,
)
from workbench import cc, rpc, runtime
from workbench.runtime.opencl import published_devices
from workbench.runtime.workspace import PREALLOCATE_WINDOW
from workbench.errors import (
    AuthenticationError,
    BadRequestError,
    ConnectionClosedError,
    ErrorCode,
    KernelCrashedError,
    KeyMismatchError,
    PathDeniedError,
    RemoteError,
    RemoteNotFoundError,
    ServerBusyError,
    SessionCrashedError,
    SessionTimeoutError,
    UnsupportedError,
)
from workbench.rpc.wire.protocol import (
    FLAG_NO_REPLY,
    FLAG_SERVER,
    HEADER,
    MAGIC,
    MAX_CTRL,
    PREAMBLE,
    VERSION,
    Ext,
    Handle,
    Kind,
    pack,
    unpack,
)

from .helpers import RAW_EXIT_H

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.join(os.path.dirname(HERE), "workbench", "native")
CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
START_TIMEOUT = 15.0

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler to build minrpc: apt-get install gcc")

# Kernels for the cases tests/kernels/kernels.c does not cover.
EXTRA_KERNELS = RAW_EXIT_H + r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <workbench_kernel.h>

typedef struct { const char* data; size_t size; } ByteArray;

WB_KERNEL(main) { return 0; }
WB_KERNEL(exit86) { exit(86); }
WB_KERNEL(_exit86) { raw_exit_group(86); return 0; }
WB_KERNEL(close_fds) { for (int fd = 3; fd < 4096; ++fd) close(fd); return 0; }
WB_KERNEL(token_visible) { WB_RETURN_INT(getenv("WORKBENCH_RPC_TOKEN") != NULL); }
WB_KERNEL(type_of) { WB_EXPECT_ARGS(1); WB_RETURN_INT(args[0].type_index); }
WB_KERNEL(bytes_sum) {
  WB_EXPECT_ARGS(1);
  if (args[0].type_index != 9) WB_FAIL("TypeError", "bytes_sum takes bytes");
  const ByteArray* b = (const ByteArray*)args[0].v_ptr;
  int64_t total = 0;
  for (size_t i = 0; i < b->size; ++i) total += (unsigned char)b->data[i];
  WB_RETURN_INT(total);
}
WB_KERNEL(ret_bool) { ret->type_index = kTVMFFIBool; ret->v_int64 = 1; return 0; }
/* 1 when the tensor's memory is page-aligned and all zero */
WB_KERNEL(fresh_tensor) {
  DLTensor* t = WB_ARG_TENSOR(0);
  int64_t n = (t->dtype.bits * t->dtype.lanes + 7) / 8;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  if ((uintptr_t)t->data % 4096 != 0 || t->strides != NULL || t->byte_offset != 0) WB_RETURN_INT(0);
  for (int64_t i = 0; i < n; ++i) if (((unsigned char*)t->data)[i]) WB_RETURN_INT(0);
  WB_RETURN_INT(1);
}
WB_KERNEL(say_hello) { printf("hello from a kernel\n"); fflush(stdout); return 0; }
"""


# -- the binary and the server process -------------------------------------------------------------
def build_command(output: str) -> list[str]:
    """The build line of minrpc.h (what workbench.native.build_minrpc runs), with warnings on."""
    sources = sorted(glob.glob(os.path.join(NATIVE, "minrpc", "*.c"))) + [os.path.join(NATIVE, "kernel_runtime.c")]
    return [CC, "-std=gnu99", "-O2", "-Wall", "-Wextra", "-D_GNU_SOURCE", "-pthread", "-rdynamic", "-I", NATIVE,
            *sources, "-ldl", "-lm", "-o", output]


@pytest.fixture(scope="session")
def minrpc_build(tmp_path_factory) -> tuple[str, str]:
    """``(path, compiler output)`` of minrpc built from this tree (or $WB_MINRPC_BINARY, a binary built elsewhere)."""
    given = os.environ.get("WB_MINRPC_BINARY")
    if given:
        return given, ""
    out = str(tmp_path_factory.mktemp("minrpc") / "minrpc")
    proc = subprocess.run(build_command(out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"building minrpc failed:\n{proc.stderr[-6000:]}"
    return out, proc.stderr


@pytest.fixture(scope="session")
def minrpc_binary(minrpc_build) -> str:
    return minrpc_build[0]


class MinRPC:
    """A minrpc TCP server in a subprocess: ``port``, ``pid``, ``alive``, ``terminate()`` (as ``rpc.Server``)."""

    def __init__(self, binary: str, *options: str, env: dict[str, str] | None = None,
                 limits: dict[int, int] | None = None):
        self.log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"minrpc-{os.getpid()}-{time.monotonic_ns()}.log"),
                        "w+b")

        def set_limits() -> None:
            import resource

            for which, value in (limits or {}).items():
                resource.setrlimit(which, (value, resource.getrlimit(which)[1]))

        self.proc = subprocess.Popen([binary, "--port", "0", *options], stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, preexec_fn=set_limits if limits else None)
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline().decode() if ready else ""
        match = re.fullmatch(r"minrpc listening on (\S+):(\d+)\n", line)
        if not match:
            self.terminate()
            raise AssertionError(f"minrpc did not start: {line!r}\n{self.log_text()}")
        self.host, self.port = match.group(1), int(match.group(2))

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def terminate(self) -> int:
        """SIGTERM, then the exit status (idempotent)."""
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if not self.log.closed:
            self.proc.stdout.close()
            self.log.close()
            os.unlink(self.log.name)
        return code

    def __enter__(self) -> "MinRPC":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.terminate()


@pytest.fixture(scope="module")
def server(minrpc_binary, private_tmpdir):
    """The minrpc server the tests of this module share (it replaces conftest's Python server here)."""
    srv = MinRPC(minrpc_binary)
    yield srv
    assert srv.terminate() == 0
    assert not srv.alive


@pytest.fixture
def started(minrpc_binary, private_tmpdir):
    """``started(*options, env=None)``: more minrpc servers, each stopped (and checked clean) at the end."""
    servers: list[MinRPC] = []

    def start(*options: str, env: dict[str, str] | None = None, limits: dict[int, int] | None = None) -> MinRPC:
        srv = MinRPC(minrpc_binary, *options, env=env, limits=limits)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        pid = srv.pid
        assert srv.terminate() == 0
        assert not children(pid)
    assert wait_until(lambda: not session_workspaces(private_tmpdir))


@pytest.fixture(scope="session")
def extra_kernels(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("minrpc-kernels")
    src = out / "extra.c"
    src.write_text(EXTRA_KERNELS)
    return cc.create_shared(str(out / "extra.so"), [str(src)])


def still_serving(server: MinRPC, tmpdir: str) -> None:
    """A new client is served, and nothing is left over."""
    with rpc.connect("127.0.0.1", server.port, connect_timeout=IO_TIMEOUT) as fresh:
        fresh.ping()
    assert server.alive
    assert_clean(server, tmpdir)


def raw_session(server: MinRPC, **handshake: Any) -> RawPeer:
    peer = RawPeer.connect(server.port)
    peer.handshake(**handshake)
    return peer


# -- the build and the command line ------------------------------------------------------------------
def test_builds_without_warnings(minrpc_build):
    path, output = minrpc_build
    assert os.access(path, os.X_OK)
    assert "warning" not in output, output


def test_help_and_bad_options(minrpc_binary):
    helped = subprocess.run([minrpc_binary, "--help"], capture_output=True, text=True, timeout=10)
    assert helped.returncode == 0 and "--idle-timeout" in helped.stdout and "--stdio" in helped.stdout
    for argv, named in [(["--port", "x"], "--port"), (["--bogus"], "--bogus"), (["--tracker", "nohost"], "--tracker"),
                        (["--max-sessions", "0"], "--max-sessions"), (["--idle-timeout", "-1"], "--idle-timeout"),
                        (["--port", "9100", "--port-end", "9000"], "--port-end"), (["--key"], "--key")]:
        proc = subprocess.run([minrpc_binary, *argv], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert named in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stdout == ""


def test_listening_line_and_no_other_stdout(started):
    srv = started()
    assert srv.host == "127.0.0.1" and 0 < srv.port < 65536
    with rpc.connect("127.0.0.1", srv.port) as remote:
        remote.ping()
    ready, _, _ = select.select([srv.proc.stdout], [], [], 0.2)
    assert not ready  # nothing after the one line


# -- the handshake, byte for byte -------------------------------------------------------------------
def test_handshake_bytes_and_session_info(server, private_tmpdir):
    with RawPeer.connect(server.port) as peer:
        peer.send(PREAMBLE.pack(MAGIC, VERSION, 0))
        assert peer.recv_exact(8) == b"WBRP\x01\x00\x00\x00"
        ctrl_len, kind, flags, bulk_len = HEADER.unpack(peer.recv_exact(16))
        assert (ctrl_len, kind, flags, bulk_len) == (0x38, Kind.HELLO, 0, 0)  # as in protocol.md
        hello = unpack(peer.recv_exact(ctrl_len))
        assert list(hello) == ["version", "nonce", "auth"]
        assert hello["version"] == 1 and hello["auth"] is False and len(hello["nonce"]) == 32
        peer.send(CONNECT_BYTES)
        ok = peer.recv_frame()
        assert ok.kind == Kind.OK and ok.bulk == b""
        info = ok.ctrl
        cl_devices = [[4, i] for i in range(len(info["devices"]) - 1)]  # then its OpenCL devices (protocol.md 14)
        assert info["devices"] == [[1, 0]] + cl_devices and info["system"] == "Linux"
        if "WB_MINRPC_BINARY" not in os.environ:  # this machine's build: the devices the Python side lists
            assert len(cl_devices) == len(published_devices())
            assert info.get("device_details", []) == published_devices()
        assert info["arch"] == os.uname().machine or "WB_MINRPC_BINARY" in os.environ  # (another build: its arch)
        assert info["server"] == "minrpc" and info["key"] == "" and info["cpu_count"] >= 1
        assert info["session_timeout"] == 0.0 and isinstance(info["session_timeout"], float)
        assert info["target"].startswith(info["arch"]) and "proof" not in info
        assert info["pid"] in children(children(server.pid)[0])  # the worker, a child of the session process
        ping_ok(peer)
    still_serving(server, private_tmpdir)


def test_two_nonces_differ(server, private_tmpdir):
    nonces = set()
    for _ in range(2):
        with RawPeer.connect(server.port) as peer:
            nonces.add(peer.start()["nonce"])
    assert len(nonces) == 2
    still_serving(server, private_tmpdir)


def test_worked_example_bytes(server, private_tmpdir):
    """docs/protocol.md section 9: GET_FUNCTION and CALL of workbench.echo, byte for byte."""
    with raw_session(server) as peer:
        peer.send(GET_ECHO)
        assert peer.recv_exact(len(GET_ECHO_OK)) == GET_ECHO_OK
        peer.send(CALL_ECHO)
        assert peer.recv_exact(len(CALL_ECHO_OK)) == CALL_ECHO_OK
    still_serving(server, private_tmpdir)


def test_error_example_bytes(server, private_tmpdir):
    message = "unknown request kind 99; this server speaks protocol version 1"
    with raw_session(server) as peer:
        peer.send(bytes.fromhex("01000000 6300 0000 0000000000000000 90"))
        assert peer.recv_exact(16) == bytes.fromhex("42000000 0100 0000 0000000000000000")
        assert peer.recv_exact(0x42) == bytes.fromhex("92 04 d9 3e") + message.encode()
        ping_ok(peer)
    still_serving(server, private_tmpdir)


def test_tensor_example_bytes(server, private_tmpdir):
    """docs/protocol.md section 9: TENSOR_ALLOC with a bulk part, TENSOR_READ, byte for byte (T(1): a fresh session)."""
    with raw_session(server) as peer:
        peer.send(bytes.fromhex("09000000 1a00 0000 0800000000000000 94 91 02 93 02 20 01 01 00 0000000000 00803f"))
        assert peer.recv_exact(26) == bytes.fromhex("0a000000 0000 0000 0000000000000000 d7 01 0100000000000000")
        peer.send(bytes.fromhex("0b000000 1c00 0000 0000000000000000 91 d7 01 0100000000000000"))
        assert peer.recv_exact(25) == bytes.fromhex("01000000 0000 0000 0800000000000000 08 0000000000 00803f")
        peer.send_frame(Kind.FREE, [Handle(Ext.TENSOR, 1)], flags=FLAG_NO_REPLY)
        assert peer.request(Kind.PING, []) == {"objects": 0, "tensors": 0, "tensor_bytes": 0}
    still_serving(server, private_tmpdir)


@pytest.mark.parametrize(
    "data, named",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic b'GET '"),
        (PREAMBLE.pack(b"WBRX", VERSION, 0), "bad magic b'WBRX'"),
        (PREAMBLE.pack(MAGIC, 2, 0), "the client speaks protocol version 2, this server speaks 1"),
        (PREAMBLE.pack(MAGIC, VERSION, FLAG_SERVER), "this is an RPC server, not a proxy"),
    ],
    ids=["http", "bad-magic", "version", "flag-server"],  # TVM's opening: tests/test_tvm_wire_minrpc.py
)
def test_bad_preamble_gets_preamble_then_error(server, private_tmpdir, data, named):
    with RawPeer.connect(server.port) as peer:
        peer.send(data)
        assert peer.recv_preamble() == (MAGIC, VERSION, 0)  # always first
        assert named in peer.expect_error(ErrorCode.PROTOCOL)
        peer.assert_closed()
    still_serving(server, private_tmpdir)


def test_short_garbage_then_close_gets_no_answer(server, private_tmpdir):
    with RawPeer.connect(server.port) as peer:
        peer.send(b"hi\n")
        peer.sock.shutdown(socket.SHUT_WR)
        peer.assert_closed()
    still_serving(server, private_tmpdir)


@pytest.mark.parametrize(
    "connect, code, named",
    [
        ({"key": "jetson"}, ErrorCode.KEY_MISMATCH, "this server serves key 'rasp', the client asked for 'jetson'"),
        ({"ctor": ["rpc.PopenSession", b"x"]}, ErrorCode.UNSUPPORTED, "'rpc.PopenSession' is not supported"),
        ({"ctor": ["rpc.Connect", "127.0.0.1", 9090, "k"]}, ErrorCode.UNSUPPORTED, "(minrpc"),
        ({"ctor": 5}, ErrorCode.UNSUPPORTED, "session constructor 5 is not supported"),
        ({"timeout": -1}, ErrorCode.PROTOCOL, "session_timeout must be a number >= 0 and at most 31536000 seconds"),
        ({"timeout": float("inf")}, ErrorCode.PROTOCOL, "not inf"),
        ({"timeout": True}, ErrorCode.PROTOCOL, "not True"),
        ({"key": 7}, ErrorCode.KEY_MISMATCH, "the key must be a string, not 7"),
    ],
    ids=["key", "ctor", "rpc-connect", "ctor-not-array", "timeout", "timeout-inf", "timeout-bool", "key-type"],
)
def test_connect_refusals(started, connect, code, named):
    srv = started("--key", "rasp")
    with RawPeer.connect(srv.port) as peer:
        peer.start()
        peer.send_frame(Kind.CONNECT, {"key": "", "timeout": 0, "proof": None, "ctor": None, **connect})
        assert named in peer.expect_error(code)
        peer.assert_closed()
    with rpc.connect("127.0.0.1", srv.port, key="rasp:1234") as remote:  # the part before ':' is compared
        assert remote.info["key"] == "rasp"


@pytest.mark.parametrize(
    "frame, code, named",
    [
        (HEADER.pack(len(pack([])), Kind.PING, 0, 0) + pack([]), ErrorCode.PROTOCOL, "expected a CONNECT message after HELLO, got kind 16"),
        (HEADER.pack(1, Kind.CONNECT, 0, 0) + b"\xc1", ErrorCode.PROTOCOL, "malformed control message"),
        (HEADER.pack(MAX_CTRL + 1, Kind.CONNECT, 0, 0), ErrorCode.TOO_LARGE, f"control part of {MAX_CTRL + 1} bytes"),
        (HEADER.pack(70000, Kind.CONNECT, 0, 0), ErrorCode.TOO_LARGE, "over the handshake's 65536-byte limit"),
        (HEADER.pack(0, Kind.CONNECT, 0, 0), ErrorCode.PROTOCOL, "an empty control part"),
    ],
    ids=["not-connect", "malformed", "oversized", "over-connect-limit", "empty"],
)
def test_unreadable_connect(server, private_tmpdir, frame, code, named):
    with RawPeer.connect(server.port) as peer:
        peer.start()
        peer.send(frame)
        assert named in peer.expect_error(code)
        peer.assert_closed()
    still_serving(server, private_tmpdir)


def test_bulk_part_on_connect_is_discarded(server, private_tmpdir):
    body = pack({"key": "", "timeout": 0.0, "proof": None, "ctor": None})
    bulk = HEADER.pack(1, Kind.PING, 0, 0) + b"\x90"  # looks like a frame: must not be read as one
    with RawPeer.connect(server.port) as peer:
        peer.start()
        peer.send(HEADER.pack(len(body), Kind.CONNECT, 0, len(bulk)) + body + bulk)
        assert peer.recv_frame().kind == Kind.OK
        ping_ok(peer)  # the very next frame answers this PING: the bulk part was not a request
    still_serving(server, private_tmpdir)


def test_handshake_deadline(started, private_tmpdir):
    srv = started("--handshake-timeout", "0.5")
    with RawPeer.connect(srv.port) as silent, RawPeer.connect(srv.port) as dripping:
        dripping.start()
        body = pack({"key": ""})
        try:
            for byte in (HEADER.pack(len(body), Kind.CONNECT, 0, 0) + body)[:5]:  # a byte at a time, never complete
                dripping.send(bytes([byte]))
                time.sleep(0.02)
        except OSError:
            pass  # the deadline came first (a slow machine): the answer is the same
        message = dripping.expect_error(ErrorCode.PROTOCOL)
        assert "the handshake did not complete within 0.5 s" in message
        dripping.assert_closed()
        silent.assert_closed()  # not even a preamble: nothing is said
    with rpc.connect("127.0.0.1", srv.port) as remote:
        remote.ping()


# -- frames after the handshake ------------------------------------------------------------------------
@pytest.mark.parametrize("ctrl_len, bulk_len, named", OVERSIZED_FRAMES, ids=OVERSIZED_FRAME_IDS)
def test_oversized_frame(server, private_tmpdir, ctrl_len, bulk_len, named):
    with raw_session(server) as peer:
        peer.send(HEADER.pack(ctrl_len, Kind.PING, 0, bulk_len))
        message = peer.expect_error(ErrorCode.TOO_LARGE)
        assert named in message and "closing this connection" in message
        peer.assert_closed()
    still_serving(server, private_tmpdir)


def test_control_part_at_the_limit_is_read(server, private_tmpdir):
    body = pack([b"x" * (MAX_CTRL - 6)])
    assert len(body) == MAX_CTRL
    with raw_session(server) as peer:
        peer.send_raw_frame(Kind.PING, body)
        assert peer.recv_frame().kind == Kind.OK
        ping_ok(peer)
    still_serving(server, private_tmpdir)


@pytest.mark.parametrize(
    "ctrl, named",
    [
        (b"\xc1", "malformed control message"),
        (b"\x92\x01", "malformed control message"),
        (b"\x90\x90", "malformed control message"),
        (b"\xa2\xff\xfe", "malformed control message"),
        (b"\xd7\x09" + bytes(8), "unknown msgpack extension type 9 (length 8)"),
        (b"\xd5\x01\x00\x00", "unknown msgpack extension type 1 (length 2)"),
        (b"", "malformed control message: an empty control part"),
        (b"\xdd\xff\xff\xff\xff", "malformed control message"),  # 4 billion items announced, none sent
        (b"\x81\x01\x02", "malformed control message"),  # a map key that is not a str
        (b"\x91" * 2000 + b"\xc0", "malformed control message"),  # nested too deeply
    ],
    ids=["never-used-byte", "truncated-array", "extra-data", "bad-utf8", "unknown-ext", "short-handle", "empty",
         "huge-count", "int-key", "deep"],
)
def test_malformed_control_part(server, private_tmpdir, ctrl, named):
    with raw_session(server) as peer:
        peer.send_raw_frame(Kind.PING, ctrl)
        message = peer.expect_error(ErrorCode.PROTOCOL)
        assert named in message and "closing this connection" in message
        peer.assert_closed()
    still_serving(server, private_tmpdir)


def test_a_control_part_of_too_many_items_is_refused_within_bounded_memory(server, private_tmpdir):
    """3 Mi nils in three lists (3 MiB on the wire): more items than a worker decodes (2 Mi nodes, 32 MiB)."""
    with raw_session(server) as peer:
        peer.send_raw_frame(Kind.PING, b"\xdc\x00\x03" + (b"\xdd\x00\x10\x00\x00" + b"\xc0" * (1 << 20)) * 3)
        message = peer.expect_error(ErrorCode.PROTOCOL)
        assert "more than 2097152 items of lists and dicts in one message" in message, message
        peer.assert_closed()
    still_serving(server, private_tmpdir)


@pytest.mark.parametrize("header", [b"\xdd\x00\x10\x00\x00", b"\xdf\x00\x10\x00\x00", b"\xdc\xff\xff"],
                         ids=["array32", "map32", "array16"])
def test_a_count_beyond_the_bytes_left_fails_before_anything_is_allocated(server, private_tmpdir, header):
    """An array or map that announces more items than bytes follow fails where its header ends: no item is
    allocated (each item takes a byte at least), whatever the count."""
    ctrl = header + b"\xc0" * 100  # 1 048 576 (or 65 535) items announced, 100 sent
    with raw_session(server) as peer:
        peer.send_raw_frame(Kind.PING, ctrl)
        message = peer.expect_error(ErrorCode.PROTOCOL)
        assert f"the data ends inside an object (truncated) (at byte {len(header)} of {len(ctrl)})" in message, message
        peer.assert_closed()
    still_serving(server, private_tmpdir)


@pytest.mark.parametrize(
    "data, how",
    [
        (HEADER.pack(1, Kind.PING, 0, 0)[:7], "shutdown"),
        (HEADER.pack(50, Kind.PING, 0, 0) + b"\x91" + b"\x00" * 9, "shutdown"),
        (upload_head("f.bin", 1000) + b"\x00" * 100, "shutdown"),
        (upload_head("f.bin", 1 << 30) + b"\x00" * 100, "close"),
        (HEADER.pack(9, Kind.TENSOR_ALLOC, 0, 4096) + pack([[1024], FLOAT32, 1, 0]) + b"\x00" * 10, "close"),
    ],
    ids=["mid-header", "mid-control", "mid-bulk", "mid-bulk-close", "mid-tensor-bulk"],
)
def test_truncated_frame_ends_the_session_quietly(server, private_tmpdir, data, how):
    with raw_session(server) as peer:
        peer.send(data)
        if how == "shutdown":
            peer.sock.shutdown(socket.SHUT_WR)
            peer.assert_closed()  # nothing to answer
    still_serving(server, private_tmpdir)


@pytest.mark.parametrize(
    "kind, bulk",
    [(99, b""), (99, b"z" * 100), (0xFFFF, b""), (int(Kind.HELLO), b""), (int(Kind.CONNECT), b""), (15, b"q" * 70000)],
    ids=["99", "99-with-bulk", "65535", "HELLO", "CONNECT", "15-with-big-bulk"],
)
def test_unknown_request_kind(server, private_tmpdir, kind, bulk):
    with raw_session(server) as peer:
        peer.send_frame(kind, [], bulk)
        message = peer.expect_error(ErrorCode.BAD_REQUEST)
        assert message == f"unknown request kind {kind}; this server speaks protocol version 1"
        ping_ok(peer)
        ping_ok(peer)
    still_serving(server, private_tmpdir)


def test_no_reply_flag_silences_errors(server, private_tmpdir):
    with raw_session(server) as peer:
        peer.send_frame(99, [], b"q" * 10, flags=FLAG_NO_REPLY)
        peer.send_frame(Kind.REMOVE, ["no-such-file"], flags=FLAG_NO_REPLY)
        peer.send_frame(Kind.PING, [], flags=FLAG_NO_REPLY)
        ping_ok(peer)  # the very next frame is this PING's reply
    still_serving(server, private_tmpdir)


@pytest.mark.parametrize(
    "kind, args, bulk, code, named",
    [
        (Kind.PING, {"not": "a list"}, b"", ErrorCode.BAD_REQUEST, "request PING: arguments must be a list, not dict"),
        (Kind.PING, "text", b"y" * 50, ErrorCode.BAD_REQUEST, "arguments must be a list, not str"),
        (Kind.REMOVE, ["a", "b"], b"", ErrorCode.BAD_REQUEST, "request REMOVE takes 1 arguments, got 2"),
        (Kind.LISTDIR, ["a", "b"], b"", ErrorCode.BAD_REQUEST, "request LISTDIR takes 0 or 1 arguments, got 2"),
        (Kind.CALL, [Handle(Ext.FUNCTION, 12345), []], b"", ErrorCode.BAD_REQUEST,
         "Handle(FUNCTION, 12345) is not a live function of this session"),
        (Kind.CALL, [Handle(Ext.FUNCTION, 1)], b"", ErrorCode.BAD_REQUEST, "request CALL takes [function, [arguments]]"),
        (Kind.CALL, [7, []], b"", ErrorCode.BAD_REQUEST, "expected a function handle, got int 7"),
        (Kind.TENSOR_ALLOC, [[4], FLOAT32, 2, 0], b"", ErrorCode.NO_DEVICE, "this server has no cuda(0); it has: cpu(0)"),
        (Kind.TENSOR_ALLOC, [[4], FLOAT32, 99, 0], b"", ErrorCode.NO_DEVICE, "(unknown device type 99)"),
        (Kind.TENSOR_ALLOC, [[4], [2, 12, 1], 1, 0], b"", ErrorCode.BAD_REQUEST,
         "float tensors of 12 bits are not supported; bits: 8, 16, 32, 64"),
        (Kind.TENSOR_ALLOC, [[4], [3, 8, 1], 1, 0], b"", ErrorCode.BAD_REQUEST, "dtype code 3 is not supported"),
        (Kind.TENSOR_ALLOC, [[4], [2, 32, 0], 1, 0], b"", ErrorCode.BAD_REQUEST, "dtype lanes must be 1..1024, not 0"),
        (Kind.TENSOR_ALLOC, [[-1], FLOAT32, 1, 0], b"", ErrorCode.BAD_REQUEST, "tensor dimensions must be 0..2**63-1"),
        (Kind.TENSOR_ALLOC, [[1 << 30, 1 << 30], FLOAT32, 1, 0], b"", ErrorCode.BAD_REQUEST,
         "a float32 tensor of shape (1073741824, 1073741824) needs 4611686018427387904 bytes"),
        (Kind.TENSOR_ALLOC, [[1] * 65, FLOAT32, 1, 0], b"", ErrorCode.BAD_REQUEST, "at most 64 dimensions, this one 65"),
        (Kind.TENSOR_ALLOC, [[4], FLOAT32, 1, 0], b"\x00" * 12, ErrorCode.BAD_REQUEST,
         "expected 16 bytes of data, the request carries 12"),
        (Kind.GET_FUNCTION, ["no.such"], b"", ErrorCode.NOT_FOUND, "no function named 'no.such' is registered"),
        (Kind.GET_FUNCTION, [""], b"", ErrorCode.BAD_REQUEST, "a function name is a non-empty string without NUL bytes"),
        (Kind.MODULE_FUNCTION, [Handle(Ext.TENSOR, 3), "f"], b"", ErrorCode.BAD_REQUEST,
         "Handle(TENSOR, 3) is a tensor handle, where a module is expected"),
        (Kind.TIME_EVAL, [Handle(Ext.FUNCTION, 1), [1, 0], {}, []], b"", ErrorCode.BAD_REQUEST, "is not a live function"),
        (Kind.TIME_EVAL, [Handle(Ext.FUNCTION, 1), [1], {}, []], b"", ErrorCode.BAD_REQUEST,
         "TIME_EVAL: the device is [device_type, device_id], not [1]"),
    ],
)
def test_bad_request_arguments(server, private_tmpdir, kind, args, bulk, code, named):
    with raw_session(server) as peer:
        peer.send_frame(kind, args, bulk)
        assert named in peer.expect_error(code)
        ping_ok(peer)
    still_serving(server, private_tmpdir)


def test_handles_are_typed_counted_and_never_reused(server, private_tmpdir):
    with raw_session(server) as peer:
        t = peer.request(Kind.TENSOR_ALLOC, [[2], FLOAT32, *CPU])
        f = peer.request(Kind.GET_FUNCTION, ["workbench.nop"])
        assert (t, f) == (Handle(Ext.TENSOR, 1), Handle(Ext.FUNCTION, 2))
        peer.send_frame(Kind.CALL, [t, []])
        assert "Handle(TENSOR, 1) is a tensor handle, where a function is expected" in peer.expect_error(ErrorCode.BAD_REQUEST)
        peer.send_frame(Kind.TENSOR_READ, [Handle(Ext.TENSOR, 2)])  # id 2 names the function
        assert "(that id names another kind of object)" in peer.expect_error(ErrorCode.BAD_REQUEST)
        peer.send_frame(Kind.CALL, [f, [Handle(Ext.FUNCTION, 2)]])
        assert "argument 0: Handle(FUNCTION, 2) is a function handle" in peer.expect_error(ErrorCode.BAD_REQUEST)
        peer.send_frame(Kind.FREE, [t, 5, "x", Handle(Ext.MODULE, 99)], flags=FLAG_NO_REPLY)
        peer.send_frame(Kind.TENSOR_READ, [t])
        assert "is not a live tensor of this session" in peer.expect_error(ErrorCode.BAD_REQUEST)
        assert peer.request(Kind.TENSOR_ALLOC, [[2], FLOAT32, *CPU]) == Handle(Ext.TENSOR, 3)  # never reused
        assert peer.request(Kind.PING, []) == {"objects": 2, "tensors": 1, "tensor_bytes": 8}
    still_serving(server, private_tmpdir)


def test_tensor_write_bulk_size_mismatch_leaves_the_tensor(server, private_tmpdir):
    data = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    with raw_session(server) as peer:
        t = peer.request(Kind.TENSOR_ALLOC, [[4], FLOAT32, *CPU], data)
        for size in (0, 8, 24):
            peer.send_frame(Kind.TENSOR_WRITE, [t], b"\xee" * size)
            message = peer.expect_error(ErrorCode.BAD_REQUEST)
            assert (f"the request carries {size}" if size else "carries no data; the tensor holds 16 bytes") in message
        assert peer.request(Kind.TENSOR_READ, [t]) == 16 and peer.last_bulk == data
    still_serving(server, private_tmpdir)


def test_registered_functions(server, private_tmpdir):
    with raw_session(server) as peer:
        echo = peer.request(Kind.GET_FUNCTION, ["workbench.echo"])
        assert peer.request(Kind.CALL, [echo, []]) == []
        assert peer.request(Kind.CALL, [echo, [{"a": [None, b"\x00"]}]]) == {"a": [None, b"\x00"]}
        t = peer.request(Kind.TENSOR_ALLOC, [[1], FLOAT32, *CPU])
        peer.send_frame(Kind.CALL, [echo, [t, 1]])
        assert "the function returned a value that cannot be sent back" in peer.expect_error(ErrorCode.BAD_REQUEST)
        sleep = peer.request(Kind.GET_FUNCTION, ["workbench.sleep"])
        assert peer.request(Kind.CALL, [sleep, [0.01]]) is None
        peer.send_frame(Kind.CALL, [sleep, [1, 2]])
        assert "takes 1 positional argument but 2 were given" in peer.expect_error(ErrorCode.BAD_REQUEST)
        peer.send_frame(Kind.CALL, [sleep, [-1]])
        assert "sleep length must be non-negative" in peer.expect_error(ErrorCode.REMOTE)
        nop = peer.request(Kind.GET_FUNCTION, ["workbench.nop"])
        assert peer.request(Kind.CALL, [nop, [1, "x", t]]) is None
    still_serving(server, private_tmpdir)


# -- the client API ------------------------------------------------------------------------------------
@pytest.fixture
def remote(server, private_tmpdir):
    sess = rpc.connect("127.0.0.1", server.port)
    yield sess
    sess.close()
    assert_clean(server, private_tmpdir)


def workspace_of(remote, tmpdir: str) -> str:
    """The files directory of ``remote``'s workspace (found through a marker file it uploads)."""
    marker = f"marker-{time.monotonic_ns()}"
    remote.upload(b"", marker)
    found = [d for d in glob.glob(os.path.join(tmpdir, "wb-session-*", "files")) if os.path.exists(os.path.join(d, marker))]
    assert len(found) == 1, found
    remote.remove(marker)
    return found[0]


def test_files_round_trip(remote):
    payload = os.urandom(3 << 20) + b"end"
    remote.upload(payload, "dir/sub/data.bin")
    remote.upload(b"", "empty")
    assert remote.download("dir/sub/data.bin") == payload
    assert remote.download("empty") == b""
    assert remote.listdir(".") == ["dir", "empty"] and remote.listdir("dir/sub") == ["data.bin"]
    remote.upload(b"new", "dir/sub/data.bin")  # replaced
    assert remote.download("dir/sub/data.bin") == b"new"
    with pytest.raises(BadRequestError, match="'dir' is a directory"):
        remote.download("dir")
    with pytest.raises(RemoteNotFoundError, match="no file 'gone.bin' in the session workspace"):
        remote.download("gone.bin")
    with pytest.raises(RemoteNotFoundError, match="no directory 'nodir'"):
        remote.listdir("nodir")
    remote.remove("dir")  # a whole tree
    with pytest.raises(RemoteNotFoundError):
        remote.remove("dir")
    assert remote.listdir() == ["empty"]


@pytest.mark.parametrize(
    "path, named",
    [
        ("../escape", "uses '..'"),
        ("a/../../x", "uses '..'"),
        ("a\\..\\x", "uses '..'"),
        ("/etc/passwd", "'/etc/passwd' is an absolute path; remote paths are relative to the session workspace, e.g. 'passwd'"),
        ("~/x", "is an absolute path"),
        ("bad\0name", "contains a NUL byte"),
    ],
)
def test_paths_are_confined(remote, path, named):
    for call in (lambda: remote.upload(b"x", path), lambda: remote.download(path), lambda: remote.remove(path),
                 lambda: remote.listdir(path)):
        with pytest.raises(PathDeniedError) as err:
            call()
        assert named in str(err.value)
    assert remote.listdir() == []


def test_symlink_escape_is_denied(remote, private_tmpdir, tmp_path):
    files = workspace_of(remote, private_tmpdir)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    os.symlink(str(outside), os.path.join(files, "link"))
    os.symlink("../../..", os.path.join(files, "up"))
    os.makedirs(os.path.join(files, "inner"))
    os.symlink("inner", os.path.join(files, "ok"))  # a symlink that stays inside is fine
    remote.upload(b"fine", "ok/file")
    assert remote.download("inner/file") == b"fine"
    for path in ("link/secret", "link", "up/x", "link/new"):
        with pytest.raises(PathDeniedError, match="leads outside the session workspace"):
            remote.download(path)
        with pytest.raises(PathDeniedError):
            remote.upload(b"x", path)
    assert (outside / "secret").read_text() == "secret" and sorted(os.listdir(outside)) == ["secret"]


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16", "uint16", "int32", "int64", "uint64", "float16",
                                   "float32", "float64", "bool", "complex64", "complex128"])
def test_tensor_round_trip(remote, dtype):
    rng = np.random.default_rng(7)
    data = (rng.standard_normal((3, 5)) * 100).astype(dtype)
    dev = remote.cpu(0)
    t = runtime.tensor(data, dev)
    np.testing.assert_array_equal(t.numpy(), data)
    t.copyfrom(data[::-1].copy())
    np.testing.assert_array_equal(t.numpy(), data[::-1])
    empty = runtime.empty((0, 4), dtype, dev)
    assert empty.numpy().shape == (0, 4)


def test_kernels_from_a_shared_object(remote, kernels, extra_kernels):
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    assert {"add_one", "add_one_any", "segfault", "sum_int32"} <= set(mod.function_names)
    dev = remote.cpu(0)
    a = runtime.tensor(np.arange(6, dtype="float32").reshape(2, 3), dev)
    b = runtime.empty((2, 3), "float32", dev)
    mod["add_one"](a, b)
    np.testing.assert_array_equal(b.numpy(), np.arange(6, dtype="float32").reshape(2, 3) + 1)
    for dtype in ("int8", "uint16", "int32", "int64", "float64"):
        x = runtime.tensor(np.arange(10, dtype=dtype), dev)
        y = runtime.empty((10,), dtype, dev)
        mod["add_one_any"](x, y)
        np.testing.assert_array_equal(y.numpy(), np.arange(10, dtype=dtype) + 1)
    mod["scale_shift"](a, 2.0, 3, b)
    np.testing.assert_array_equal(b.numpy(), np.arange(6, dtype="float32").reshape(2, 3) * 2 + 3)
    assert mod["sum_int32"](runtime.tensor(np.arange(100, dtype="int32"), dev)) == 4950
    assert mod["strlen"]("héllo") == 6 and mod["half"](3.0) == 1.5
    with pytest.raises(RemoteError, match=r"^fail: ValueError: fail: the kernel refuses, as asked$"):
        mod["fail"]()
    with pytest.raises(RemoteError, match="scale_shift: TypeError"):
        mod["scale_shift"](a, 2, 3, b)  # an int where a float is expected: never converted
    with pytest.raises(RemoteNotFoundError, match=r"no kernel named 'nope' in kernels.so \(it exports: add_one, "):
        mod.get_function("nope")
    with pytest.raises(BadRequestError, match="does not fit a kernel's int64 argument"):
        mod["half"]((1 << 64) - 1)
    with pytest.raises(BadRequestError, match="cannot hold a NUL"):
        mod["strlen"]("a\0b")
    with pytest.raises(BadRequestError, match="a kernel cannot take a list"):
        mod["strlen"]([1])
    remote.upload(extra_kernels)
    extra = remote.load_module("extra.so")
    assert extra.entry_name == "main"
    assert extra["bytes_sum"](b"\x01\x02\xff") == 258
    assert extra["type_of"](None) == 0 and extra["type_of"](True) == 2 and extra["type_of"](1.5) == 3
    assert extra["ret_bool"]() is True
    assert extra["fresh_tensor"](runtime.empty((3, 1000), "float32", dev)) == 1
    assert extra["token_visible"]() == 0


def test_module_loading_refusals(remote, kernels):
    remote.upload(b"not an elf", "junk.so")
    with pytest.raises(RemoteError, match="junk.so"):
        remote.load_module("junk.so")
    remote.upload(b"x", "lib.txt")
    with pytest.raises(UnsupportedError, match="load_module takes a shared object"):
        remote.load_module("lib.txt")
    with pytest.raises(RemoteNotFoundError, match="no file 'missing.so' in the session workspace; upload it first"):
        remote.load_module("missing.so")
    with pytest.raises(PathDeniedError):
        remote.load_module("../x.so")


def test_reuploaded_module_is_loaded_anew(remote, kernels, extra_kernels):
    with open(kernels["so"], "rb") as f:
        first = f.read()
    with open(extra_kernels, "rb") as f:
        second = f.read()
    remote.upload(first, "lib.so")
    assert "add_one" in remote.load_module("lib.so").function_names
    remote.upload(second, "lib.so")
    assert "bytes_sum" in remote.load_module("lib.so").function_names


def test_tar_module_linked_on_the_device(remote, kernels):
    remote.upload(kernels["tar"])
    mod = remote.load_module("kernels.tar")
    assert mod["half"](5.0) == 2.5
    linked = remote.download_linked_module("kernels.tar")
    assert bytes(linked[:4]) == b"\x7fELF"


def test_time_evaluator(remote, kernels):
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    dev = remote.cpu(0)
    a = runtime.tensor(np.arange(1000, dtype="float32"), dev)
    b = runtime.empty((1000,), "float32", dev)
    result = mod.time_evaluator("add_one", dev, number=50, repeat=4)(a, b)
    assert len(result.results) == 4 and all(r > 0 for r in result.results)
    np.testing.assert_array_equal(b.numpy(), np.arange(1000, dtype="float32") + 1)
    slow = mod.time_evaluator("sleep_ms", dev, number=1, repeat=2, min_repeat_ms=30)(10)
    assert len(slow.results) == 2 and all(r >= 0.01 for r in slow.results)  # each call sleeps 10 ms
    flushed = mod.time_evaluator("add_one", dev, number=3, repeat=2, cache_flush_bytes=1 << 20,
                                 f_preproc="workbench.nop")(a, b)
    assert len(flushed.results) == 2
    with pytest.raises(RemoteError, match="fail: ValueError"):
        mod.time_evaluator("fail", dev)()
    nop = remote.get_function("workbench.nop")
    assert len(nop.time_evaluator(dev, number=5, repeat=3)(1, 2).results) == 3


@pytest.mark.parametrize(
    "options, named",
    [
        ({"number": 0}, "time_evaluator option number must be in 1..2147483647, not 0"),
        ({"number": 1.5}, "time_evaluator option number must be an int, not 1.5"),
        ({"repeat": True}, "time_evaluator option repeat must be an int, not True"),
        ({"min_repeat_ms": float("nan")}, "must be in 0..2147483647, not nan"),
        ({"cache_flush_bytes": (1 << 30) + 1}, "cache_flush_bytes must be in 0..1073741824"),
        ({"bogus": 1, "zz": 2}, "unknown time_evaluator options: ['bogus', 'zz']; known: ['cache_flush_bytes',"),
        ({"f_preproc": 5}, "f_preproc names a registered function (a str), not 5"),
    ],
)
def test_time_eval_option_checks(server, private_tmpdir, options, named):
    with raw_session(server) as peer:
        nop = peer.request(Kind.GET_FUNCTION, ["workbench.nop"])
        peer.send_frame(Kind.TIME_EVAL, [nop, CPU, options, []])
        assert named in peer.expect_error(ErrorCode.BAD_REQUEST)
        peer.send_frame(Kind.TIME_EVAL, [nop, CPU, {"f_preproc": "no.such"}, []])
        assert "no function named 'no.such'" in peer.expect_error(ErrorCode.NOT_FOUND)
        *seconds, calls = peer.request(Kind.TIME_EVAL, [nop, CPU, {"number": 2, "repeat": 3}, []])
        assert len(seconds) == 3 and calls == [2, 2, 2]  # then the calls each repeat made
    still_serving(server, private_tmpdir)


def test_kernel_segfault_ends_only_its_session(server, private_tmpdir, kernels):
    other = rpc.connect("127.0.0.1", server.port)
    remote = rpc.connect("127.0.0.1", server.port)
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    with pytest.raises(SessionCrashedError) as err:
        mod["segfault_unguarded"]()  # a death the guard cannot catch (the default action put back)
    message = str(err.value)
    assert "killed by signal 11 (SIGSEGV: Segmentation fault)" in message and "connect again" in message
    with pytest.raises(SessionCrashedError):
        remote.ping()  # the session is over
    remote.close()
    other.ping()  # another session goes on
    other.close()
    still_serving(server, private_tmpdir)


@pytest.mark.parametrize(
    "kernel, named",
    [("_exit86", "exited with status 86 (did the code it ran call exit()?)"),
     ("close_fds", "exited with status 89: the code it ran closed the session's connection")],
)
def test_kernel_exit_is_reported(server, private_tmpdir, extra_kernels, kernel, named):
    remote = rpc.connect("127.0.0.1", server.port)
    remote.upload(extra_kernels)
    mod = remote.load_module("extra.so")
    with pytest.raises(SessionCrashedError, match=re.escape(named)):
        mod[kernel]()
        remote.ping()  # close_fds itself returns: the next request finds the connection gone
    remote.close()
    still_serving(server, private_tmpdir)


def test_kernel_exit_fails_only_its_call(server, private_tmpdir, extra_kernels):
    with rpc.connect("127.0.0.1", server.port) as remote:
        remote.upload(extra_kernels)
        mod = remote.load_module("extra.so")
        with pytest.raises(KernelCrashedError, match=re.escape("exit86: the kernel called exit(86)")):
            mod["exit86"]()
        remote.ping()
    still_serving(server, private_tmpdir)


def test_session_timeout_even_inside_a_kernel(server, private_tmpdir, kernels):
    remote = rpc.connect("127.0.0.1", server.port, session_timeout=0.5)
    assert remote.info["session_timeout"] == 0.5
    remote.upload(kernels["so"])
    with pytest.raises(SessionTimeoutError, match=r"session timed out after 0.5 s \(session_timeout=0.5\)"):
        remote.load_module("kernels.so")["spin"]()
    remote.close()
    still_serving(server, private_tmpdir)


def test_session_timeout_notice_unsolicited(server, private_tmpdir):
    with raw_session(server, timeout=0.3) as peer:
        assert "session timed out after 0.3 s" in peer.expect_error(ErrorCode.SESSION_TIMEOUT)
        peer.assert_closed()
    still_serving(server, private_tmpdir)


def test_idle_timeout(started, private_tmpdir):
    srv = started("--idle-timeout", "0.4")
    with raw_session(srv) as busy:
        sleep = busy.request(Kind.GET_FUNCTION, ["workbench.sleep"])
        assert busy.request(Kind.CALL, [sleep, [0.7]]) is None  # a running request is not idle
        assert "the session was idle for 0.4 s (the server's idle_timeout)" in busy.expect_error(ErrorCode.SESSION_TIMEOUT)
        busy.assert_closed()
    still_serving(srv, private_tmpdir)


def test_client_hanging_up_on_a_busy_worker_ends_it(server, private_tmpdir, kernels):
    remote = rpc.connect("127.0.0.1", server.port)
    remote.upload(kernels["so"])
    fn = remote.load_module("kernels.so")["spin"]
    remote._chan.send_frame(Kind.CALL, [fn._wb_handle, []])
    remote._chan.close()  # gone while the worker spins
    assert_clean(server, private_tmpdir)


def test_max_sessions(started, private_tmpdir):
    srv = started("--max-sessions", "1")
    with rpc.connect("127.0.0.1", srv.port) as first:
        with pytest.raises(ServerBusyError, match=r"server busy: 1 sessions are running, the most it takes \(max_sessions=1\)"):
            rpc.connect("127.0.0.1", srv.port)
        first.ping()
    assert wait_until(lambda: not children(srv.pid))
    with rpc.connect("127.0.0.1", srv.port) as second:
        second.ping()


def test_workspace_failure_refuses_that_session_only(started, tmp_path):
    srv = started(env=dict(os.environ, TMPDIR=str(tmp_path / "missing")))
    with pytest.raises(ServerBusyError, match=r"server busy: it cannot create a session workspace \(No such file"):
        rpc.connect("127.0.0.1", srv.port)
    (tmp_path / "missing").mkdir()
    with rpc.connect("127.0.0.1", srv.port) as remote:
        remote.ping()
    assert srv.alive


def test_file_size_limit_fails_the_upload_only(started):
    import resource

    srv = started(limits={resource.RLIMIT_FSIZE: 1 << 20})
    with rpc.connect("127.0.0.1", srv.port) as remote:
        with pytest.raises(RemoteError, match=r"while the server wrote the received data to a file \(disk full or a "
                                              r"file-size limit\?\); the data was dropped"):
            remote.upload(bytes(PREALLOCATE_WINDOW + (3 << 20)), "big.bin")  # the windows after the failed one too
        assert remote.listdir() == []  # no partial file
        remote.upload(b"small", "small.bin")
        assert remote.download("small.bin") == b"small"


def silent_peer(port: int, source: str = "127.0.0.1") -> RawPeer:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    return RawPeer(sock)


def test_handshakes_hold_no_process_and_the_oldest_makes_room(started):
    import resource

    srv = started(limits={resource.RLIMIT_NOFILE: 48})  # room for 8 handshakes; one address holds 6 of them
    other = silent_peer(srv.port, "127.0.0.2")
    idle = [silent_peer(srv.port) for _ in range(12)]  # connected, silent
    try:
        with rpc.connect("127.0.0.1", srv.port) as remote:  # the newest gets in: the oldest silent ones made room
            remote.ping()
            assert len(children(srv.pid)) == 1  # the session's process: none for a connection in its handshake
        for peer in idle[:6]:  # the oldest of the address that holds its share were told, in a frame
            assert peer.recv_preamble() == (MAGIC, VERSION, 0)
            assert "too many connections are in their handshake" in peer.expect_error(ErrorCode.BUSY)
        other.start()  # another address keeps its place
        other.send_frame(Kind.CONNECT, {})
        assert other.recv_frame().kind == Kind.OK
    finally:
        for peer in [other, *idle]:
            peer.close()
    assert wait_until(lambda: not children(srv.pid))
    with rpc.connect("127.0.0.1", srv.port) as remote:
        remote.ping()


# -- auth ------------------------------------------------------------------------------------------------
def test_auth_token(started, extra_kernels, monkeypatch):
    srv = started(env=dict(os.environ, WORKBENCH_RPC_TOKEN="s3cret"))
    monkeypatch.delenv("WORKBENCH_RPC_TOKEN", raising=False)
    with rpc.connect("127.0.0.1", srv.port, auth_token="s3cret") as remote:  # mutual: the server proved it too
        assert "proof" not in remote.info
        remote.upload(extra_kernels)
        assert remote.load_module("extra.so")["token_visible"]() == 0  # kernels never see the token
    with pytest.raises(AuthenticationError, match="wrong auth token"):
        rpc.connect("127.0.0.1", srv.port, auth_token="guess")
    with pytest.raises(AuthenticationError, match="this server requires an auth token"):
        rpc.connect("127.0.0.1", srv.port, auth_token="")
    with RawPeer.connect(srv.port) as peer:  # a client without cnonce gets no server proof
        import hashlib
        import hmac

        hello = peer.start()
        assert hello["auth"] is True
        proof = hmac.new(b"s3cret", b"workbench-rpc-v1" + hello["nonce"], hashlib.sha256).digest()
        peer.send_frame(Kind.CONNECT, {"key": "", "timeout": 0, "proof": proof, "ctor": None, "cnonce": b"short"})
        assert "the client nonce (cnonce) must be 32 bytes" in peer.expect_error(ErrorCode.PROTOCOL)
    with RawPeer.connect(srv.port) as peer:
        hello = peer.start()
        proof = hmac.new(b"s3cret", b"workbench-rpc-v1" + hello["nonce"], hashlib.sha256).digest()
        cnonce = os.urandom(32)
        peer.send_frame(Kind.CONNECT, {"key": "", "timeout": 0, "proof": proof, "ctor": None, "cnonce": cnonce})
        info = peer.recv_frame().ctrl
        expected = hmac.new(b"s3cret", b"workbench-rpc-v1-server" + hello["nonce"] + cnonce, hashlib.sha256).digest()
        assert info["proof"] == expected


def test_wrong_proofs_slow_down_their_address(started):
    srv = started(env=dict(os.environ, WORKBENCH_RPC_TOKEN="s3cret"))
    with pytest.raises(AuthenticationError) as first:
        rpc.connect("127.0.0.1", srv.port, auth_token="guess1")
    assert "wrong proof" not in str(first.value)
    with pytest.raises(AuthenticationError, match=r"\(wrong proof 2 from this address: its next attempt waits 0.5 s\)"):
        rpc.connect("127.0.0.1", srv.port, auth_token="guess2")  # waits its turn (0.25 s), then is refused
    with rpc.connect("127.0.0.1", srv.port, auth_token="s3cret") as remote:  # its turn comes: served, forgiven
        remote.ping()
    with pytest.raises(AuthenticationError) as again:
        rpc.connect("127.0.0.1", srv.port, auth_token="guess3")
    assert "wrong proof" not in str(again.value)


def test_client_with_token_refuses_server_without(server, private_tmpdir):
    with pytest.raises(AuthenticationError, match="says it needs no auth token"):
        rpc.connect("127.0.0.1", server.port, auth_token="s3cret")
    still_serving(server, private_tmpdir)


# -- stdio: PopenSession ------------------------------------------------------------------------------------
def test_popen_session(minrpc_binary, kernels, extra_kernels, private_tmpdir):
    with rpc.PopenSession([minrpc_binary]) as remote:
        assert remote.info["server"] == "minrpc"
        remote.upload(kernels["so"])
        remote.upload(extra_kernels)
        mod = remote.load_module("kernels.so")
        dev = remote.cpu(0)
        a = runtime.tensor(np.ones(4, dtype="float32"), dev)
        b = runtime.empty((4,), "float32", dev)
        mod["add_one"](a, b)
        np.testing.assert_array_equal(b.numpy(), np.full(4, 2, dtype="float32"))
        remote.load_module("extra.so")["say_hello"]()  # a kernel's printf does not corrupt the stream
        assert remote.ping()["tensors"] == 2
    remote = rpc.PopenSession(minrpc_binary)  # also without arguments at all
    remote.upload(kernels["so"])
    with pytest.raises(SessionCrashedError, match="SIGSEGV"):
        remote.load_module("kernels.so")["segfault"]()
    remote.close()
    assert wait_until(lambda: not session_workspaces(private_tmpdir))


def test_popen_session_sigterm_ends_cleanly(minrpc_binary, private_tmpdir):
    remote = rpc.PopenSession([minrpc_binary, "--stdio"])
    remote.upload(b"x", "x")
    assert len(session_workspaces(private_tmpdir)) == 1
    remote._proc.send_signal(signal.SIGTERM)
    assert remote._proc.wait(10) == 86  # "the session ended": the client reports a lost connection, not a crash
    with pytest.raises(ConnectionClosedError):
        remote.ping()
    remote.close()
    assert not session_workspaces(private_tmpdir)


# -- robustness ---------------------------------------------------------------------------------------------
def random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(12 if depth < 3 else 8)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, 1, -1, 2**31, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if choice == 3:
        return rng.choice([0.0, -1.5, float("inf"), float("nan"), 1e300])
    if choice == 4:
        return rng.choice(["", "workbench.echo", "workbench.nop", "..", "/etc", "a/b", "x" * 300, "\x00"])
    if choice == 5:
        return rng.randbytes(rng.randrange(40))
    if choice in (6, 7):
        return Handle(rng.choice([1, 2, 3]), rng.randrange(1, 4))
    if choice in (8, 9):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(["number", "repeat", "key", "x", "f_preproc"]): random_value(rng, depth + 1)
            for _ in range(rng.randrange(3))}


def random_frames(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.randrange(1, 5)):
        style = rng.randrange(4)
        if style == 0:
            out += rng.randbytes(rng.randrange(1, 48))
            continue
        kind = rng.choice([rng.randrange(16, 32), rng.randrange(16, 32), rng.randrange(0, 40), 0xFFFF])
        args = [random_value(rng) for _ in range(rng.randrange(5))] if style != 3 else random_value(rng)
        ctrl = pack(args) if style != 2 else rng.randbytes(rng.randrange(1, 30))
        if kind == Kind.TIME_EVAL or kind == Kind.TENSOR_ALLOC:
            ctrl = pack([random_value(rng) for _ in range(4)])
        bulk = rng.randbytes(rng.choice([0, 0, 4, 16, 100]))
        declared = len(bulk) if rng.random() < 0.9 else len(bulk) + rng.randrange(1, 1000)
        out += HEADER.pack(len(ctrl), kind, rng.choice([0, 0, 1]), declared) + ctrl + bulk
    return out


def test_fuzzed_frames_never_crash_the_server(server, private_tmpdir):
    rng = random.Random(0x5EED)
    replies = 0
    for _ in range(300):
        with RawPeer.connect(server.port) as peer:
            peer.handshake()
            try:
                peer.send(random_frames(rng))
                peer.sock.shutdown(socket.SHUT_WR)
                peer.sock.settimeout(IO_TIMEOUT)
                while peer.sock.recv(1 << 16):  # until the server closes: bounded by IO_TIMEOUT per read
                    replies += 1
            except (ConnectionResetError, BrokenPipeError):
                pass
        assert server.alive
    assert replies > 0
    still_serving(server, private_tmpdir)


def test_many_pings_keep_the_worker_flat(server, private_tmpdir):
    with raw_session(server) as peer:
        worker = children(children(server.pid)[0])[0]
        ping = HEADER.pack(1, Kind.PING, 0, 0) + b"\x90"

        def rss_kb() -> int:
            with open(f"/proc/{worker}/status") as f:
                return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])

        def pings(n: int) -> None:
            for _ in range(n // 100):
                peer.send(ping * 100)
                for _ in range(100):
                    assert peer.recv_frame().kind == Kind.OK

        pings(2000)
        before = rss_kb()
        pings(20000)
        assert rss_kb() - before < 256, (before, rss_kb())
    still_serving(server, private_tmpdir)


def test_sigterm_ends_sessions_and_removes_workspaces(started, private_tmpdir, kernels):
    srv = started()
    busy = rpc.connect("127.0.0.1", srv.port)
    busy.upload(kernels["so"])
    spin = busy.load_module("kernels.so")["spin"]
    busy._chan.send_frame(Kind.CALL, [spin._wb_handle, []])
    idle = rpc.connect("127.0.0.1", srv.port)
    half = RawPeer.connect(srv.port)  # in its handshake
    assert wait_until(lambda: len(session_workspaces(private_tmpdir)) == 2)
    group = [p for c in children(srv.pid) for p in [c, *children(c)]]
    assert srv.terminate() == 0
    assert not session_workspaces(private_tmpdir)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in group)), group
    for sess in (busy, idle):
        sess.close()
    half.close()


# -- a tracker -------------------------------------------------------------------------------------------
def test_registered_with_a_tracker(started, private_tmpdir):
    with rpc.Tracker(port=0, silent=True) as tracker, rpc.connect_tracker("127.0.0.1", tracker.port) as ts:
        srv = started("--tracker", f"127.0.0.1:{tracker.port}", "--key", "board")

        def free() -> int:
            return ts.summary()["queue_info"].get("board", {"free": 0})["free"]

        assert wait_until(free), ts.summary()
        with pytest.raises(KeyMismatchError, match=r"this server of key 'board' is handed out by a tracker"):
            rpc.connect("127.0.0.1", srv.port, key="board")
        remote = ts.request("board")
        assert remote.info["server"] == "minrpc" and remote.info["key"] == "board"
        assert remote.get_function("workbench.echo")(5) == 5
        with pytest.raises(KeyMismatchError):  # one session at a time: no other key matches meanwhile
            rpc.connect("127.0.0.1", srv.port, key="board")
        remote.close()
        assert wait_until(free), ts.summary()  # offered again, under a new match key
        with ts.request("board") as again:
            again.ping()
        srv.terminate()


# -- the emulated aarch64 board ----------------------------------------------------------------------------
ARM_GCC = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64")
ARM_SYSROOT = "/usr/aarch64-linux-gnu"


@pytest.fixture(scope="session")
def aarch64_minrpc(tmp_path_factory) -> str:
    """minrpc cross-compiled for aarch64-linux-gnu (the same build line with the cross compiler)."""
    if ARM_GCC is None or not os.path.isdir(ARM_SYSROOT):
        pytest.skip("no aarch64 cross compiler: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross")
    if QEMU is None:
        pytest.skip("no aarch64 emulator: apt-get install qemu-user")
    out = tmp_path_factory.mktemp("minrpc-aarch64")
    binary = str(out / "minrpc")
    command = build_command(binary)
    command[0] = ARM_GCC
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr[-6000:]
    src = os.path.join(HERE, "kernels", "kernels.c")
    so = str(out / "kernels.so")
    proc = subprocess.run([ARM_GCC, "-shared", "-fPIC", "-O2", "-I", cc.include_path(), "-o", so, src],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    wrapper = out / "minrpc-qemu"
    wrapper.write_text(f'#!/bin/sh\nexec {QEMU} -L {ARM_SYSROOT} {binary} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_aarch64_build_serves_under_qemu(aarch64_minrpc, private_tmpdir):
    arm_kernels = os.path.join(os.path.dirname(aarch64_minrpc), "kernels.so")
    with MinRPC(aarch64_minrpc) as board:
        with raw_session(board) as peer:  # the worked example, byte for byte, from the emulated board
            peer.send(GET_ECHO)
            assert peer.recv_exact(len(GET_ECHO_OK)) == GET_ECHO_OK
            peer.send(CALL_ECHO)
            assert peer.recv_exact(len(CALL_ECHO_OK)) == CALL_ECHO_OK
        remote = rpc.connect("127.0.0.1", board.port, connect_timeout=30)
        assert remote.info["arch"] == "aarch64" and remote.info["target"] == "aarch64-linux-gnu"
        remote.upload(arm_kernels)
        mod = remote.load_module("kernels.so")
        dev = remote.cpu(0)
        a = runtime.tensor(np.arange(8, dtype="float32"), dev)
        b = runtime.empty((8,), "float32", dev)
        mod["add_one"](a, b)
        np.testing.assert_array_equal(b.numpy(), np.arange(8, dtype="float32") + 1)
        assert len(mod.time_evaluator("add_one", dev, number=5, repeat=2)(a, b).results) == 2
        with pytest.raises(SessionCrashedError, match="SIGSEGV"):
            mod["segfault"]()
        remote.close()
        with rpc.PopenSession([aarch64_minrpc, "--stdio"]) as popen:
            assert popen.info["arch"] == "aarch64" and popen.ping()["objects"] == 0
        assert_clean(board, private_tmpdir)
        assert board.terminate() == 0
