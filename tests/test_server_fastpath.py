"""The session worker's fast path for plain calls (workbench/rpc/server/_serve.c) answers byte for byte as the
Python path does.

Every test runs the same requests twice, with the fast path (the default) and without it
(``WORKBENCH_SERVER_FASTPATH=0``), on real sockets on 127.0.0.1, and compares what came back: the reply bytes,
the idle counter and the busy byte, the errors a client sees. Requests the fast path leaves to Python (other
kinds, NO_REPLY, bulk parts, calls that fail or return handles) are in the scripts too: the two paths must
hand over without a byte out of place.
"""
from __future__ import annotations

import mmap
import os
import signal
import socket
import struct
import threading
import time

import numpy as np
import pytest

from workbench import rpc, runtime
from workbench.errors import KernelCrashedError, SessionCrashedError
from workbench.rpc.server import worker
from workbench.rpc.server.handler import SessionHandler
from workbench.rpc.wire.protocol import FLAG_NO_REPLY, HEADER, Ext, Handle, Kind, pack
from workbench.runtime import device_api, registry

from .test_protocol import RawPeer

pytestmark = pytest.mark.skipif(worker._fastpath is None, reason="the fast path extension (_serve) is not built")

FN, TENSOR, MODULE = int(Ext.FUNCTION), int(Ext.TENSOR), int(Ext.MODULE)
IO_TIMEOUT = 10.0


def frame(kind: int, ctrl, flags: int = 0, bulk: bytes = b"") -> bytes:
    body = ctrl if isinstance(ctrl, bytes) else pack(ctrl)
    return HEADER.pack(len(body), kind, flags, len(bulk)) + body + bulk


def call(fn: int, *args, flags: int = 0) -> bytes:
    return frame(Kind.CALL, [Handle(FN, fn), list(args)], flags)


def _register() -> None:
    def raises(kind: str):
        raise {"value": ValueError, "type": TypeError, "key": KeyError}[kind](f"raised on purpose: {kind}")

    def two(a, b):
        return a - b

    registry.register_func("tests.fastpath.identity", lambda x: x, override=True)
    registry.register_func("tests.fastpath.raises", raises, override=True)
    registry.register_func("tests.fastpath.two", two, override=True)
    registry.register_func("tests.fastpath.nbytes", lambda t, k=1: int(t.nbytes) * k, override=True)
    registry.register_func("tests.fastpath.same", lambda t: t, override=True)
    registry.register_func("tests.fastpath.pair", lambda a, b: (a, b), override=True)
    registry.register_func("tests.fastpath.big", lambda: 1 << 80, override=True)


_register()

# the handles of the script's first requests (a new session numbers its objects from 1)
IDENTITY, RAISES, TWO, NBYTES, SAME, PAIR, NOP, ECHO, T1 = range(1, 10)
SETUP = [
    frame(Kind.GET_FUNCTION, ["tests.fastpath.identity"]),
    frame(Kind.GET_FUNCTION, ["tests.fastpath.raises"]),
    frame(Kind.GET_FUNCTION, ["tests.fastpath.two"]),
    frame(Kind.GET_FUNCTION, ["tests.fastpath.nbytes"]),
    frame(Kind.GET_FUNCTION, ["tests.fastpath.same"]),
    frame(Kind.GET_FUNCTION, ["tests.fastpath.pair"]),
    frame(Kind.GET_FUNCTION, ["workbench.nop"]),
    frame(Kind.GET_FUNCTION, ["workbench.echo"]),
    frame(Kind.TENSOR_ALLOC, [[2, 3], [2, 32, 1], 1, 0], bulk=np.arange(6, dtype="float32").tobytes()),
]
INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
        -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]
STRINGS = ["", "x", "é€😀", "a" * 31, "a" * 32, "b" * 255, "c" * 256, "d" * 65535, "e" * 65536, "f" * 70000]
PLAIN = [
    *[call(IDENTITY, i) for i in INTS],
    *[call(IDENTITY, s) for s in STRINGS],
    *[call(IDENTITY, b) for b in (b"", b"\0" * 3, b"\xff" * 300, b"z" * 70000)],
    call(IDENTITY, None), call(IDENTITY, True), call(IDENTITY, False),
    call(IDENTITY, 1.5), call(IDENTITY, -0.0), call(IDENTITY, float("inf")), call(IDENTITY, 1e300),
    frame(Kind.CALL, b"\x92\xd7\x03" + struct.pack("<Q", IDENTITY) + b"\x91\xca" + struct.pack(">f", 0.1)),  # float32
    frame(Kind.CALL, b"\x92\xd7\x03" + struct.pack("<Q", TWO) + b"\xdc\x00\x02\x05\x03"),  # array 16
    call(NOP), call(NOP, 1, "two", 3.0, b"4", None, Handle(TENSOR, T1)), call(ECHO, 7),
    call(TWO, 10, 3), call(NBYTES, Handle(TENSOR, T1)), call(NBYTES, Handle(TENSOR, T1), 3),
]
FALLBACKS = [
    call(ECHO, 1, 2, 3),  # a list result
    call(SAME, Handle(TENSOR, T1)),  # a tensor result: a new handle (10)
    call(PAIR, 1, Handle(TENSOR, T1)),  # a list with a tensor in it (11)
    call(IDENTITY, [1, 2]), call(IDENTITY, {"a": 1}),  # arguments the fast path does not decode
    call(NOP, flags=FLAG_NO_REPLY), call(RAISES, "value", flags=FLAG_NO_REPLY),
    frame(Kind.CANCEL, [], FLAG_NO_REPLY),  # nothing in flight: ignored
    frame(Kind.PING, []),
]
ERRORS = [
    call(RAISES, "value"), call(RAISES, "type"), call(RAISES, "key"),
    call(TWO, 1), call(TWO, 1, 2, 3), call(IDENTITY),  # the arguments do not fit
    call(99, 1),  # no such function
    frame(Kind.CALL, [Handle(TENSOR, T1), []]),  # a tensor is not a function
    frame(Kind.CALL, [Handle(MODULE, IDENTITY), []]),  # a function's id with a module's type
    call(NBYTES, Handle(FN, IDENTITY)),  # a function as an argument
    call(NBYTES, Handle(TENSOR, IDENTITY)),  # a tensor handle naming a function
    call(NBYTES, Handle(TENSOR, 99)),  # a tensor that is not there
    frame(Kind.CALL, [Handle(FN, IDENTITY)]), frame(Kind.CALL, [Handle(FN, IDENTITY), 1]), frame(Kind.CALL, 5),
    frame(Kind.FREE, [Handle(FN, TWO)]), call(TWO, 1, 2),  # freed, then called
    frame(Kind.FREE, [Handle(TENSOR, T1)], FLAG_NO_REPLY), call(NBYTES, Handle(TENSOR, T1)),
]
# each ends the session (the stream cannot be trusted): each is the last of its script
ENDINGS = {
    "trailing bytes": frame(Kind.CALL, pack([Handle(FN, NOP), []]) + b"\xc0"),
    "bad utf-8": frame(Kind.CALL, b"\x92\xd7\x03" + struct.pack("<Q", IDENTITY) + b"\x91\xa2\xff\xfe"),
}


def _serve_in_thread(script: list[bytes], fast: bool, monkeypatch, split: bool) -> tuple[bytes, list, int, object]:
    """Run ``serve_requests`` on one end of a loopback TCP connection; send ``script`` on the other, a frame per
    write (``split``: each frame in two writes, the second after a pause, and a whole script at once after);
    return every byte that came back, the idle counter, the busy byte and the fast path (or None)."""
    monkeypatch.setenv(worker.FASTPATH_ENV, "1" if fast else "0")
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT)
    server_sock, _ = listener.accept()
    listener.close()
    handler = SessionHandler()
    activity, page = [0], mmap.mmap(-1, 2)
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            worker.serve_requests(worker.SocketChannel(server_sock), handler, activity=activity, busy=page)
        except BaseException as exc:  # noqa: BLE001  (an error is part of what is compared)
            failures.append(exc)
        finally:
            server_sock.shutdown(socket.SHUT_RDWR)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    received = bytearray()

    def drain(until_closed: bool = False) -> None:
        client.settimeout(0.05 if not until_closed else IO_TIMEOUT)
        while True:
            try:
                chunk = client.recv(1 << 20)
            except socket.timeout:
                if until_closed:
                    raise
                return
            if not chunk:
                return
            received.extend(chunk)

    try:
        try:
            for data in script:
                if split:
                    client.sendall(data[:5])
                    time.sleep(0.002)
                    client.sendall(data[5:])
                else:
                    client.sendall(data)
                drain()
            if split:
                client.sendall(b"".join(script))  # pipelined: the next frames wait in the buffer
            client.shutdown(socket.SHUT_WR)
        except OSError:  # the server ended the session
            pass
        drain(until_closed=True)
        thread.join(IO_TIMEOUT)
        assert not thread.is_alive()
    finally:
        client.close()
        server_sock.close()
        handler.close()
    return bytes(received), [activity[0], page[1], [type(e).__name__ for e in failures]], handler.fast


@pytest.fixture(autouse=True)
def no_device_to_sync(monkeypatch):
    """No device waits to be synced after each call (an OpenCL test earlier in this process may have left one)."""
    monkeypatch.setattr(device_api, "SYNC", [])


@pytest.mark.parametrize("split", [False, True], ids=["frame per write", "split and pipelined"])
@pytest.mark.parametrize("part", ["plain", "fallbacks", "errors"])
def test_the_fast_path_replies_byte_for_byte_as_the_python_path(monkeypatch, part, split):
    script = SETUP + {"plain": PLAIN, "fallbacks": PLAIN[:3] + FALLBACKS + PLAIN[:3], "errors": ERRORS + PLAIN[:5]}[part]
    python, python_state, none = _serve_in_thread(script, False, monkeypatch, split)
    fast, fast_state, server = _serve_in_thread(script, True, monkeypatch, split)
    assert none is None and server is not None
    assert fast == python
    assert fast_state == python_state
    assert server.served > 0 and not server.calling
    if part == "plain" and not split:  # every call of the script but the four whose replies are over 64 KiB
        assert server.served == len(PLAIN) - 4


def test_calls_end_in_python_while_a_device_needs_a_sync_after_each(monkeypatch):
    """OpenCL's calls only enqueue work: after each call the handler waits for it (device_api.SYNC), in Python."""
    synced: list[int] = []
    monkeypatch.setattr(device_api, "SYNC", [lambda: synced.append(1)])
    script = SETUP + PLAIN[:10]
    python, python_state, _ = _serve_in_thread(script, False, monkeypatch, False)
    python_syncs = len(synced)
    fast, fast_state, server = _serve_in_thread(script, True, monkeypatch, False)
    assert fast == python and fast_state == python_state
    assert python_syncs == len(synced) - python_syncs == 10
    assert server.served == 0


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_a_request_that_ends_the_session_ends_it_the_same_way(monkeypatch, ending):
    script = SETUP + PLAIN[:3] + [ENDINGS[ending], call(NOP)]
    python, python_state, _ = _serve_in_thread(script, False, monkeypatch, False)
    fast, fast_state, _ = _serve_in_thread(script, True, monkeypatch, False)
    assert fast == python and fast_state == python_state
    assert b"\x01\x00" in fast[-200:]  # an ERROR frame came last


def test_a_result_that_cannot_be_sent_is_an_error_and_the_session_goes_on(monkeypatch):
    script = SETUP + PLAIN[:3] + [frame(Kind.GET_FUNCTION, ["tests.fastpath.big"]), call(T1 + 1), call(TWO, 5, 3)]
    python, python_state, _ = _serve_in_thread(script, False, monkeypatch, False)
    fast, fast_state, _ = _serve_in_thread(script, True, monkeypatch, False)
    assert fast == python and fast_state == python_state
    assert b"cannot be sent back (an int over 64 bits)" in fast
    assert fast.endswith(HEADER.pack(1, Kind.OK, 0, 0) + b"\x02")  # the next call answered: 5 - 3


def test_the_fast_path_is_off_for_a_socket_with_a_timeout(monkeypatch):
    monkeypatch.delenv(worker.FASTPATH_ENV, raising=False)
    a, b = socket.socketpair()
    handler = SessionHandler()
    try:
        a.settimeout(1.0)
        assert worker.fast_server(worker.SocketChannel(a), handler, threading.Lock(), None, None) is None
        a.settimeout(None)
        assert worker.fast_server(worker.SocketChannel(a), handler, threading.Lock(), None, None) is not None
        monkeypatch.setenv(worker.FASTPATH_ENV, "0")
        assert worker.fast_server(worker.SocketChannel(a), handler, threading.Lock(), None, None) is None
    finally:
        handler.close()
        a.close()
        b.close()


# -- through a real server: a forked worker per session ----------------------------------------------------
def _server(monkeypatch, fast: bool, **options) -> rpc.Server:
    monkeypatch.setenv(worker.FASTPATH_ENV, "1" if fast else "0")
    return rpc.Server(port=0, silent=True, **options)


def _raw_session(port: int, script: list[bytes]) -> bytes:
    with RawPeer.connect(port) as peer:
        peer.handshake()
        out = bytearray()
        for data in script:
            peer.send(data)
            kind = HEADER.unpack_from(data)[1]
            flags = HEADER.unpack_from(data)[2]
            if flags & FLAG_NO_REPLY:
                continue
            head = peer.recv_exact(HEADER.size)
            ctrl_len, _, _, bulk_len = HEADER.unpack(head)
            out += head + peer.recv_exact(ctrl_len + bulk_len)
            assert kind  # every request in the scripts is answered by one frame
        return bytes(out)


def test_a_real_server_answers_the_same_bytes_on_both_paths(monkeypatch):
    # the scripts name functions registered in this process: a forked worker has them
    script = SETUP + PLAIN + FALLBACKS + ERRORS + PLAIN[:3]
    replies = []
    for fast in (False, True):
        server = _server(monkeypatch, fast)
        try:
            replies.append(_raw_session(server.port, script))
        finally:
            server.terminate()
    assert replies[0] == replies[1]


def test_crashes_and_cancels_look_the_same_on_both_paths(monkeypatch, kernels):
    seen = []
    for fast in (False, True):
        server = _server(monkeypatch, fast)
        try:
            remote = rpc.connect("127.0.0.1", server.port)
            remote.upload(kernels["so"], target="kernels.so")
            mod = remote.load_module("kernels.so")
            a = runtime.tensor(np.arange(4, dtype="float32"), remote.cpu())
            b = runtime.empty((4,), "float32", remote.cpu())
            outcome = []
            with pytest.raises(KernelCrashedError) as crashed:
                mod["segfault"]()
            outcome.append(str(crashed.value))
            mod["add_one"](a, b)  # the session goes on
            outcome.append(b.numpy().tolist())
            sleep, echo = remote.get_function("workbench.sleep"), remote.get_function("workbench.echo")
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                sleep(60)
            timer.join()
            outcome.append(echo(7))  # after the grace period: the server stopped the function
            for _ in range(2):
                with pytest.raises((KernelCrashedError, SessionCrashedError)) as crashed:
                    mod["segfault"]()
                outcome.append(str(crashed.value).split(": the kernel")[-1][:80])
            seen.append(outcome)
            remote.close()
        finally:
            server.terminate()
    assert seen[0] == seen[1]
    assert "3rd crash" in seen[1][-1]
