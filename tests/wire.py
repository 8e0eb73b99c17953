"""Raw-socket helpers for tests that speak the wire protocols by hand (session frames, tracker messages)."""
from __future__ import annotations

import socket

from workbench.rpc.wire.protocol import HEADER, pack, unpack


def frame(kind: int, ctrl) -> bytes:
    """A session-protocol frame with a msgpack control part and no bulk part."""
    body = pack(ctrl)
    return HEADER.pack(len(body), kind, 0, 0) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes; fails the test if the peer closes first."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"the peer closed the connection after {data!r}"
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, object]:
    """One frame without a bulk part: ``(kind, control part)``."""
    ctrl_len, kind, _, bulk_len = HEADER.unpack(recv_exact(sock, HEADER.size))
    assert bulk_len == 0
    return kind, unpack(recv_exact(sock, ctrl_len))


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sent before closing; fails if it does not close within ``timeout``."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            return data
        except socket.timeout:
            raise AssertionError(f"the peer kept the connection open (received {data[:200]!r})") from None
        if not chunk:
            return data
        data += chunk
