"""The client's fast path for small requests (issue 9): one C call sends the request and receives the reply.

``SocketChannel.request`` hands a request without a bulk part to ``_shim.exchange`` (send, then one
receive, in C) and reads what does not come whole through the buffered reader. Every test here runs
twice: through the C function and through the pure-Python path a shim built before it falls back to;
both must behave the same. Most tests talk to a scripted peer on 127.0.0.1 that sends replies in the
shapes a server (or a network) can produce; the rest to a real server.
"""
from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

import numpy as np
import pytest

from workbench.errors import (
    ConnectionClosedError,
    ProtocolError,
    RemoteError,
    RemoteNotFoundError,
    SessionTimeoutError,
)
from workbench.rpc.wire import protocol
from workbench.rpc.client.session import RemoteFunction, RPCSession, _Caller
from workbench.rpc.wire.protocol import FLAG_NO_REPLY, HEADER, Ext, Handle, Kind, SocketChannel, pack

from .wire import read_frame, recv_exact

HOST = "127.0.0.1"
PEER_TIMEOUT = 10.0
PATHS = ["c", "python"]


def use_path(chan: SocketChannel, path: str, session: RPCSession | None = None) -> None:
    """Make ``chan`` (and ``session``'s calls) take the C fast paths or the pure-Python ones (as without them)."""
    if path == "c":
        assert protocol._exchange is not None, "the shim lacks exchange(): rebuild it with `pip install -e .`"
        assert chan._exchange is protocol._exchange
        assert session is None or isinstance(session._fast, _Caller), "the shim lacks Caller: rebuild it"
    else:
        chan._exchange = None
        if session is not None:
            session._fast = None


class Peer:
    """The server end of a TCP connection on 127.0.0.1, driven by a script run in a thread."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def run(self, script: Callable[[socket.socket], None]) -> None:
        def main() -> None:
            try:
                script(self.conn)
            except BaseException as exc:  # reported by join(), in the test's thread
                self.error = exc
            finally:  # the client's reads past the script end (a broken test fails, it does not hang)
                try:
                    self.conn.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(PEER_TIMEOUT)
            assert not self.thread.is_alive(), "the scripted peer did not finish"
            self.thread = None
        if self.error is not None:
            raise self.error


@pytest.fixture(params=PATHS)
def wired(request):
    """``(session, peer)``: an RPCSession over a TCP connection whose other end the test scripts."""
    listener = socket.create_server((HOST, 0))
    client = socket.create_connection(listener.getsockname(), timeout=PEER_TIMEOUT)
    client.settimeout(None)  # as rpc.connect leaves it after the handshake
    conn, _ = listener.accept()
    listener.close()
    conn.settimeout(PEER_TIMEOUT)
    chan = SocketChannel(client)
    session = RPCSession(chan, {"key": ""}, f"peer:{request.param}")
    use_path(chan, request.param, session)
    peer = Peer(conn)
    try:
        yield session, peer
    finally:
        session.close()
        try:
            peer.join()
        finally:
            conn.close()


def reply(ctrl, kind: int = Kind.OK, bulk: bytes = b"") -> bytes:
    body = pack(ctrl)
    return HEADER.pack(len(body), kind, 0, len(bulk)) + body + bulk


def expect_call(conn: socket.socket, args: list) -> None:
    """Read one CALL frame and check its arguments."""
    kind, ctrl = read_frame(conn)
    assert kind == Kind.CALL and ctrl[1] == args, (kind, ctrl)


def function(session: RPCSession, ident: int = 7) -> RemoteFunction:
    return RemoteFunction(session, Handle(Ext.FUNCTION, ident), f"fn{ident}")


# -- replies in every shape ---------------------------------------------------------------------
def test_whole_replies_of_every_size(wired):
    session, peer = wired
    fn = function(session)
    values = [None, 3, -1.5, "text", b"\x00\xff", [1, [2, "x"]], {"a": 1}, "y" * 100_000, b"z" * 1_500_000]

    def script(conn):
        for value in values:
            expect_call(conn, [value])
            conn.sendall(reply(value))

    peer.run(script)
    for value in values:  # the big ones arrive in several pieces: the rest goes through the buffered reader
        assert fn(value) == value
    peer.join()


def test_a_reply_in_pieces(wired):
    session, peer = wired
    fn = function(session)
    data = reply(["split", 42])

    def script(conn):
        for cut in (1, 15, 16, 17, len(data) - 1):
            expect_call(conn, [cut])
            conn.sendall(data[:cut])
            time.sleep(0.05)  # the client has received the first piece and waits for the rest
            conn.sendall(data[cut:])
        expect_call(conn, ["after"])
        conn.sendall(reply("fine"))

    peer.run(script)
    for cut in (1, 15, 16, 17, len(data) - 1):
        assert fn(cut) == ["split", 42]
    assert fn("after") == "fine"  # nothing of the pieces was left in the buffer
    peer.join()


def test_a_notice_that_comes_with_a_reply_is_the_next_calls_reply(wired):
    session, peer = wired
    fn = function(session)
    notice = reply([9, "the session was idle for 1 s (the server's idle_timeout) and the server ended it"], Kind.ERROR)

    def script(conn):
        expect_call(conn, [1])
        conn.sendall(reply("first") + notice)  # one send: the client receives both at once
        expect_call(conn, [2])

    peer.run(script)
    assert fn(1) == "first"
    with pytest.raises(SessionTimeoutError, match="idle_timeout"):
        fn(2)
    peer.join()
    with pytest.raises(SessionTimeoutError, match="this session has ended"):
        fn(3)


def test_error_replies_leave_the_session_usable(wired):
    session, peer = wired
    fn = function(session)

    def script(conn):
        expect_call(conn, ["bad"])
        conn.sendall(reply([5, "kernel said no"], Kind.ERROR))
        expect_call(conn, ["good"])
        conn.sendall(reply("yes"))
        kind, ctrl = read_frame(conn)
        assert kind == Kind.GET_FUNCTION and ctrl == ["missing"]
        conn.sendall(reply([7, "no function missing"], Kind.ERROR))
        kind, ctrl = read_frame(conn)
        assert kind == Kind.PING and ctrl == []
        conn.sendall(reply({"objects": 0}))

    peer.run(script)
    with pytest.raises(RemoteError, match="kernel said no"):
        fn("bad")
    assert fn("good") == "yes"
    with pytest.raises(RemoteNotFoundError, match="no function missing"):
        session.get_function("missing")
    assert session.ping() == {"objects": 0}
    peer.join()


@pytest.mark.parametrize("whole", [True, False], ids=["whole", "in-pieces"])
def test_an_unexpected_bulk_part_ends_the_session(wired, whole):
    session, peer = wired
    fn = function(session)

    def script(conn):
        expect_call(conn, [])
        data = reply("value", bulk=b"B" * 1000)
        if whole:
            conn.sendall(data)
        else:
            conn.sendall(data[:20])
            time.sleep(0.05)
            conn.sendall(data[20:])

    peer.run(script)
    with pytest.raises(ProtocolError, match="unexpected 1000 bulk bytes in the reply to CALL"):
        fn()
    peer.join()
    with pytest.raises(ProtocolError, match="this session has ended"):
        session.ping()


@pytest.mark.parametrize("after", [0, 10, 17], ids=["nothing", "part-of-a-header", "part-of-a-reply"])
def test_a_peer_that_closes_ends_the_session(wired, after):
    session, peer = wired
    fn = function(session)

    def script(conn):
        expect_call(conn, [])
        conn.sendall(reply("never whole", bulk=b"")[:after])
        conn.shutdown(socket.SHUT_RDWR)

    peer.run(script)
    with pytest.raises(ConnectionClosedError, match=r"the connection to peer:\w+ was lost: the peer closed"):
        fn()
    peer.join()
    with pytest.raises(ConnectionClosedError, match="this session has ended"):
        fn()


def test_a_closed_socket_is_a_lost_connection(wired):
    session, peer = wired
    session._chan.sock.close()  # fileno() is -1 from now on: nothing is written to whatever reuses the number
    with pytest.raises(ConnectionClosedError, match="Bad file descriptor"):
        session.ping()


def test_oversized_headers_end_the_session(wired):
    session, peer = wired

    def script(conn):
        read_frame(conn)
        conn.sendall(HEADER.pack(protocol.MAX_CTRL + 1, Kind.OK, 0, 0))

    peer.run(script)
    with pytest.raises(protocol.TooLargeError, match="control part"):
        session.ping()
    peer.join()


# -- what goes out ----------------------------------------------------------------------------------
def test_pending_frees_go_out_before_the_request(wired):
    session, peer = wired
    fn = function(session)
    for ident in (11, 12):
        function(session, ident)  # collected at once: its handle waits for the next request

    def script(conn):
        ctrl_len, kind, flags, bulk_len = HEADER.unpack(recv_exact(conn, HEADER.size))
        assert (kind, flags, bulk_len) == (Kind.FREE, FLAG_NO_REPLY, 0)
        freed = protocol.unpack(recv_exact(conn, ctrl_len))
        assert sorted(h.id for h in freed) == [11, 12]
        expect_call(conn, ["x"])
        conn.sendall(reply("done"))

    peer.run(script)
    assert fn("x") == "done"
    peer.join()
    assert session._pending_free == []


def test_a_request_larger_than_the_socket_buffers(wired):
    session, peer = wired
    fn = function(session)
    session._chan.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = bytes(range(256)) * (8 << 10)  # 2 MiB: sent in many pieces while the peer reads slowly

    def script(conn):
        time.sleep(0.1)  # the client's first send fills its buffer and it has to wait
        expect_call(conn, [big])
        conn.sendall(reply(len(big)))

    peer.run(script)
    assert fn(big) == len(big)
    peer.join()


# -- sockets with a timeout (non-blocking inside Python) ---------------------------------------------
def test_a_socket_with_a_timeout_waits_for_a_late_reply(wired):
    session, peer = wired
    fn = function(session)
    session._chan.sock.settimeout(5)

    def script(conn):
        expect_call(conn, [])
        time.sleep(0.2)  # the first receive finds nothing: the socket object waits, with its timeout
        conn.sendall(reply("late"))
        expect_call(conn, [b"q" * (2 << 20)])  # bigger than the buffers: the send waits too
        conn.sendall(reply("big"))

    peer.run(script)
    assert fn() == "late"
    session._chan.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    assert fn(b"q" * (2 << 20)) == "big"
    peer.join()


def test_a_socket_timeout_that_expires_ends_the_session(wired):
    session, peer = wired
    fn = function(session)
    session._chan.sock.settimeout(0.3)
    timed_out = threading.Event()

    def script(conn):
        expect_call(conn, [])
        timed_out.wait(PEER_TIMEOUT)  # no reply, and the connection stays open

    peer.run(script)
    with pytest.raises(SessionTimeoutError, match="no answer from peer"):
        fn()
    timed_out.set()
    peer.join()


# -- signals -----------------------------------------------------------------------------------------
def test_ctrl_c_interrupts_a_call_that_waits(wired):
    session, peer = wired
    fn = function(session)
    main = threading.get_ident()
    interrupted = threading.Event()
    raised: list[int] = []

    def on_sigint(signum, frame_):
        if not raised:  # one KeyboardInterrupt; a late SIGINT after it must not hit the test
            raised.append(signum)
            raise KeyboardInterrupt

    def script(conn):
        expect_call(conn, [])  # the request is out: the client waits for a reply that never comes
        for _ in range(100):  # again until it lands inside the wait (a signal just before it goes unseen)
            signal.pthread_kill(main, signal.SIGINT)
            if interrupted.wait(0.05):
                return
        conn.shutdown(socket.SHUT_RDWR)  # ends the wait: the test fails instead of hanging
        raise AssertionError("the call was not interrupted")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        peer.run(script)
        with pytest.raises(KeyboardInterrupt):
            fn()
        interrupted.set()
        peer.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert raised == [signal.SIGINT]


def test_a_signal_whose_handler_returns_does_not_disturb_a_call(wired):
    session, peer = wired
    fn = function(session)
    main = threading.get_ident()
    handled: list[int] = []

    def script(conn):
        expect_call(conn, [])
        for _ in range(3):  # each interrupts the wait (or lands just before it); the call goes on
            signal.pthread_kill(main, signal.SIGUSR1)
            time.sleep(0.05)
        conn.sendall(reply("still here"))

    previous = signal.signal(signal.SIGUSR1, lambda signum, frame_: handled.append(signum))
    try:
        peer.run(script)
        assert fn() == "still here"
        peer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert handled and set(handled) == {signal.SIGUSR1}  # (two that come close together may be handled once)


# -- logging ---------------------------------------------------------------------------------------
def test_logging_mode_logs_each_request(wired, caplog):
    session, peer = wired
    session._log, session._fast = True, None  # as rpc.connect(..., enable_logging=True) sets them
    fn = function(session)

    def script(conn):
        expect_call(conn, [1])
        conn.sendall(reply(2))

    peer.run(script)
    with caplog.at_level(logging.INFO, logger="workbench.rpc.client"):
        assert fn(1) == 2
    peer.join()
    assert any(" CALL: " in record.getMessage() and record.getMessage().endswith(" ms") for record in caplog.records)


# -- the call fast path: RemoteFunction(*args) in one C call -------------------------------------------
EDGE_VALUES = [
    None, True, False, 0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
    0.0, -1.5, float("inf"), 1e300, "", "a" * 31, "b" * 32, "é" * 200, "ç" * 40000,
    b"", b"\x00" * 255, b"\x01" * 256, b"y" * 70000,
]


def test_arguments_go_out_as_msgpack_packs_them(wired):
    """Every plain value at each msgpack size boundary, alone and together (an array of over 15): the same bytes
    as msgpack's (the C encoder's frames, and the Python path's for what does not fit its frame)."""
    session, peer = wired
    fn = function(session)
    together = tuple(v for v in EDGE_VALUES if not isinstance(v, (str, bytes)) or len(v) < 300)
    other = function(session, 9)  # a session object: its handle goes out
    calls = [(v,) for v in EDGE_VALUES] + [(), together, (other, "t", other)]
    wanted = [HEADER.pack(len(pack([fn._wb_handle, args])), Kind.CALL, 0, 0) + pack([fn._wb_handle, args])
              for args in calls]

    def script(conn):
        for expected in wanted:
            assert recv_exact(conn, len(expected)) == expected
            conn.sendall(reply(None))

    peer.run(script)
    for args in calls:
        assert fn(*args) is None
    peer.join()


@pytest.mark.parametrize("wired", ["c"], indirect=True)
def test_plain_calls_never_reach_the_python_path(wired):
    session, peer = wired
    fn = function(session)

    def python_path(args):
        raise AssertionError(f"the call {args!r} took the Python path")

    fn._call_python = python_path

    tensor = function(session, 9)  # a session object

    def script(conn):
        for i in range(3):
            expect_call(conn, [i, "x", 2.5, None, b"b", tensor._wb_handle])
            conn.sendall(reply([i]))

    peer.run(script)
    assert [fn(i, "x", 2.5, None, b"b", tensor) for i in range(3)] == [[0], [1], [2]]
    peer.join()


def test_a_closed_session_never_writes_to_its_old_descriptor(wired):
    """After close() the fast path is shut: a new socket that got the same descriptor number hears nothing."""
    session, peer = wired
    fn = function(session)
    peer.run(lambda conn: None)
    session.close()
    listener = socket.create_server((HOST, 0))
    with listener, socket.create_connection(listener.getsockname()) as other:
        conn, _ = listener.accept()
        with conn:
            with pytest.raises(ConnectionClosedError, match="this session has ended"):
                fn(1)
            conn.settimeout(0.2)
            with pytest.raises(socket.timeout):
                conn.recv(1)
    peer.join()


def test_calls_from_several_threads_each_get_their_own_reply(real):
    echo = real.get_function("workbench.echo")

    def work(t: int) -> list:
        return [echo(t, i) for i in range(200)]

    threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, work(t))) for t in range(4)]
    results: dict[int, list] = {}
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {t: [[t, i] for i in range(200)] for t in range(4)}


def test_session_objects_and_odd_arguments(real, server):
    """Tensors of the session go out as handles; numpy scalars, other sessions' objects,
    numbers msgpack cannot encode and keyword arguments take the Python path and its errors."""
    from workbench import rpc, runtime

    echo, nop = real.get_function("workbench.echo"), real.get_function("workbench.nop")
    a = runtime.tensor(np.arange(3, dtype="float32"), real.cpu(0))
    assert nop(a, "x", runtime.empty((2,), "int8", real.cpu(0))) is None
    assert echo(np.int64(7), np.float32(0.5)) == [7, 0.5]
    with rpc.connect(HOST, server.port) as other:
        elsewhere = runtime.empty((3,), "float32", other.cpu(0))
        with pytest.raises(ValueError, match="belongs to session"):
            echo(elsewhere)
    with pytest.raises(OverflowError):
        echo(2**64)
    with pytest.raises(TypeError, match="positional arguments only"):
        echo(value=1)
    assert echo("still usable") == "still usable"


# -- a real server ---------------------------------------------------------------------------------
@pytest.fixture(params=PATHS)
def real(request, remote):
    use_path(remote._chan, request.param, remote)
    return remote


def test_calls_on_a_real_server(real):
    echo = real.get_function("workbench.echo")
    assert real.ping()["objects"] >= 1
    assert echo(1, 2.5, "x") == [1, 2.5, "x"]
    assert echo(np.int64(7)) == 7  # numpy scalars go out as numbers
    big = np.arange(1 << 18, dtype=np.int64).tobytes()  # a 2 MiB reply: received in pieces
    assert echo(big) == big
    with pytest.raises(RemoteNotFoundError):
        real.get_function("workbench.no_such_function")
    with pytest.raises(RemoteError):
        real.get_function("workbench.sleep")("not a number")
    assert echo("after the errors") == "after the errors"
    assert real.listdir(".") == []


def test_ctrl_c_interrupts_a_long_call_on_a_real_server(real):
    sleep = real.get_function("workbench.sleep")
    main = threading.get_ident()
    started, interrupted = threading.Event(), threading.Event()
    raised: list[int] = []

    def on_sigint(signum, frame_):
        if not raised:
            raised.append(signum)
            raise KeyboardInterrupt

    def interrupter():
        started.wait(PEER_TIMEOUT)
        time.sleep(0.2)  # the call is waiting for the server by now (if not, the next SIGINT finds it)
        for _ in range(100):
            signal.pthread_kill(main, signal.SIGINT)
            if interrupted.wait(0.1):
                return

    previous = signal.signal(signal.SIGINT, on_sigint)
    thread = threading.Thread(target=interrupter, daemon=True)
    thread.start()
    try:
        started.set()
        with pytest.raises(KeyboardInterrupt):
            sleep(2)  # a Python function on the server: the interrupt returns at once, the function runs on
    finally:
        interrupted.set()
        thread.join(PEER_TIMEOUT)
        signal.signal(signal.SIGINT, previous)
    assert raised == [signal.SIGINT]
    # the client sent CANCEL; the sleep's reply is read and dropped before the next request: the session goes on
    assert real._outstanding
    real.ping()
    assert not real._outstanding and real.get_function("workbench.echo")(5) == 5


def test_an_argument_that_cannot_be_sent_leaves_the_session_usable(real):
    """An exception before the first byte of a request (msgpack cannot encode the value): the session goes on,
    also when FREEs of dropped objects went out just before."""
    echo = real.get_function("workbench.echo")
    real._pending_free.append(real.get_function("workbench.nop")._wb_handle)
    with pytest.raises(TypeError):
        echo(object())
    assert echo("still usable") == "still usable"


def test_a_shim_without_the_fast_path_keeps_the_python_one(server):
    """A shim built before exchange() existed (a stale build): the client imports, connects and calls all the same."""
    code = (
        "import sys, types\n"
        "sys.modules['workbench.runtime._shim'] = types.ModuleType('workbench.runtime._shim')  # no exchange\n"
        "from workbench import rpc\n"
        "from workbench.rpc.wire import protocol\n"
        "assert protocol._exchange is None\n"
        f"with rpc.connect('{HOST}', {server.port}) as remote:\n"
        "    assert remote._chan._exchange is None and remote._fast is None\n"
        "    echo = remote.get_function('workbench.echo')\n"
        "    assert echo(1, 'two') == [1, 'two'] and echo(b'x' * 3_000_000) == b'x' * 3_000_000\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
