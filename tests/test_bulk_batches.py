"""Bulk receives from a peer on this machine wake once per batch (SO_RCVLOWAT) and never wait for bytes that
are not coming: the channel's (client and Python server) and minrpc's.

The kernel wakes a sleeping receiver when its queue reaches the batch, not when the receiver's own request
is met, so a batch may only be awaited while two are still due. These tests send exactly a bulk part and
then nothing (the sender waits), with pauses that leave the receiver asleep at the worst moments, and check
that every receive completes, gets every byte, and leaves the socket waking at its first byte again (so a
small reply, and select, are not held back).
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import msgpack
import numpy as np
import pytest

from workbench import rpc, runtime
from workbench.errors import ConnectionClosedError
from workbench.rpc.wire.protocol import HEADER, Kind, SocketChannel

from .helpers import start_server

BATCH = SocketChannel.BATCH
WAIT_S = 20.0  # a receive that has not finished by then is stuck
SIZES = [2 * BATCH - 1, 2 * BATCH, 2 * BATCH + 1, 5 * BATCH + 12345]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    return sender, receiver


def wake_threshold(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


class Sender(threading.Thread):
    """Sends ``data`` in pieces, pausing before the last ``tail`` bytes (the receiver is asleep by then), then
    sends nothing more until ``done`` is set."""

    def __init__(self, sock: socket.socket, data: bytes, tail: int):
        super().__init__(daemon=True)
        self.sock, self.data, self.tail = sock, data, tail
        self.done = threading.Event()

    def run(self) -> None:
        view, cut = memoryview(self.data), len(self.data) - self.tail
        for start in range(0, cut, 300_000):
            self.sock.sendall(view[start : min(start + 300_000, cut)])
        time.sleep(0.05)
        self.sock.sendall(view[cut:])
        self.done.wait(WAIT_S)


def run_bounded(receive, receiver: socket.socket) -> None:
    """Run ``receive()`` in a thread; fail (closing the socket to free it) if it does not finish in time."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            receive()
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(WAIT_S)
    if thread.is_alive():
        receiver.shutdown(socket.SHUT_RDWR)
        thread.join(5)
        pytest.fail(f"the receive was still waiting after {WAIT_S} s: it waited for bytes that were not coming")
    if errors:
        raise errors[0]


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
@pytest.mark.parametrize("tail", [1, BATCH // 2, BATCH + 7], ids=["tail1", "tail-half-batch", "tail-batch"])
@pytest.mark.parametrize("into", ["memory", "file", "file-after-its-header", "memory-with-progress"])
def test_a_bulk_part_with_nothing_after_it_arrives_whole(size, tail, into, tmp_path):
    """"file-after-its-header": the frame's header is read first, and the bulk bytes that came with it wait in
    the channel's buffer (the file's first bytes, not owed by the stream any more)."""
    sender_sock, receiver = tcp_pair()
    data = os.urandom(size)
    chan = SocketChannel(receiver)
    body = msgpack.packb(["blob.bin"])
    head = HEADER.pack(len(body), Kind.UPLOAD, 0, size) + body if into == "file-after-its-header" else b""
    sender = Sender(sender_sock, head + data, min(tail, size))
    sender.start()
    try:
        if into.startswith("file"):
            with open(tmp_path / "out", "w+b") as f:
                if head:
                    assert chan.recv_frame().bulk_len == size
                run_bounded(lambda: chan.recv_bulk_to_fd(f.fileno(), size), receiver)
                f.seek(0)
                got = f.read()
        else:
            out = bytearray(size)
            if into == "memory":
                receive = lambda: chan.recv_bulk_into(memoryview(out))  # noqa: E731
            else:
                receive = lambda: chan.recv_bulk_reporting(memoryview(out), lambda n: None)  # noqa: E731
            run_bounded(receive, receiver)
            got = bytes(out)
        assert got == data
        assert wake_threshold(receiver) == 1
    finally:
        sender.done.set()
        sender.join(5)
        sender_sock.close()
        chan.close()


def test_a_bulk_part_split_between_two_receives_arrives_whole():
    """The first receive knows that more of the part follows it (``follow``), and may batch to its end."""
    sender_sock, receiver = tcp_pair()
    size, first = 6 * BATCH + 3, 3 * BATCH
    data = os.urandom(size)
    chan = SocketChannel(receiver)
    sender = Sender(sender_sock, data, BATCH // 3)
    sender.start()
    out = bytearray(size)
    try:
        run_bounded(lambda: chan.recv_bulk_into(memoryview(out)[:first], follow=size - first), receiver)
        run_bounded(lambda: chan.recv_bulk_into(memoryview(out)[first:]), receiver)
        assert bytes(out) == data and wake_threshold(receiver) == 1
    finally:
        sender.done.set()
        sender.join(5)
        sender_sock.close()
        chan.close()


def test_a_peer_closing_mid_bulk_ends_the_receive_and_the_socket_wakes_at_its_first_byte_again():
    sender_sock, receiver = tcp_pair()
    chan = SocketChannel(receiver)
    sender_sock.sendall(os.urandom(3 * BATCH))
    sender_sock.close()
    try:
        with pytest.raises(ConnectionClosedError, match="after .* of .* bulk bytes"):
            run_bounded(lambda: chan.recv_bulk_into(memoryview(bytearray(8 * BATCH))), receiver)
        assert wake_threshold(receiver) == 1
    finally:
        chan.close()


@pytest.fixture(scope="module", params=["python", "minrpc"])
def server(request, private_tmpdir):
    srv = start_server(request.param)
    yield srv
    srv.terminate()


@pytest.fixture
def remote(server):
    with rpc.connect("127.0.0.1", server.port) as session:
        yield session


@pytest.mark.parametrize("size", SIZES, ids=lambda n: f"{n}B")
def test_sessions_move_sizes_around_the_batch_rule_and_answer_small_requests_after(remote, size):
    """Both servers' receivers (Python and minrpc's C) and the client's follow the rule."""
    data = os.urandom(size)
    remote.upload(data, target="blob.bin")
    assert bytes(remote.download("blob.bin")) == data
    array = np.frombuffer(data[: size - size % 4], dtype="float32")
    tensor = runtime.tensor(array, remote.cpu(0))
    np.testing.assert_array_equal(tensor.numpy(), array)
    tensor.copyfrom(array[::-1].copy())
    np.testing.assert_array_equal(tensor.numpy(), array[::-1])
    assert remote.ping()["tensors"] >= 1
    assert wake_threshold(remote._chan.sock) == 1


def test_a_fresh_sessions_first_large_tensor_and_a_progress_bar_transfer_are_whole(server):
    data = np.random.default_rng(5).random((17 << 20) // 4 + 3, dtype="float32")  # over a progress chunk
    with rpc.connect("127.0.0.1", server.port) as remote:
        tensor = runtime.tensor(data, remote.cpu(0))
        np.testing.assert_array_equal(tensor.numpy(), data)
        remote.upload(data.tobytes(), target="big.bin", progress=True)
        assert bytes(remote.download("big.bin", progress=True)) == data.tobytes()


def test_both_ends_of_a_loopback_session_send_without_pacing(server):
    """Over loopback both ends use reno: BBR's pacing (some distributions' default) reorders loopback segments
    into spurious retransmits. Checked on the client's socket and, with ss(8), on the server's."""
    with rpc.connect("127.0.0.1", server.port) as remote:
        ours = remote._chan.sock
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0") == b"reno"
        client_port = ours.getsockname()[1]
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( dport = :{client_port} )"],
                             capture_output=True, text=True, timeout=10).stdout
        assert out.strip(), f"ss shows no socket of the server's towards port {client_port}"
        assert " reno " in out, f"the server's socket of this session is not on reno: {out}"
