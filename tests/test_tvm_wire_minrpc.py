"""apache-tvm 0.27's own RPC client on minrpc, the native server: TVM's wire protocol, told apart by its first bytes.

The twin of tests/test_tvm_wire.py (the Python server): ``tvm.rpc.connect`` and a
tracker's ``request`` talk to ``rpc.MinRPCServer`` as to a TVM server: files,
modules, tensors, kernels and ``time_evaluator``, in a session with minrpc's
sandbox, crash isolation and limits (docs/protocol.md section 13). The client
runs in this process, the server in its own, on loopback; after each test no
session process or workspace is left. A few tests write TVM's bytes by hand, to
check the bounds of minrpc's codec (tvm.c).
"""
from __future__ import annotations

import gc
import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from workbench import cc, rpc
from workbench.errors import AuthenticationError

from .conftest import assert_clean, wait_until
from .wire import recv_exact

if importlib.util.find_spec("tvm") is None:
    pytest.skip("apache-tvm is not installed (it is the `tvm` test extra: pip install -e .[test,tvm])",
                allow_module_level=True)
if (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")) is None:
    pytest.skip("no C compiler to build minrpc: apt-get install gcc", allow_module_level=True)

pytestmark = pytest.mark.timeout(300)  # the first test pays for TVM's import, one LLVM export and minrpc's build

HOST = "127.0.0.1"
HERE = os.path.dirname(os.path.abspath(__file__))
N = 1024
MAGIC = 0xFF271


@pytest.fixture(scope="module")
def tvm():
    import tvm as tvm_module
    import tvm.rpc  # noqa: F401  (a submodule: tvm.rpc.connect)

    return tvm_module


@pytest.fixture(scope="module")
def tvm_kernels(tmp_path_factory) -> dict[str, dict[str, str]]:
    """``add_one`` (float32[1024] -> +1) built by apache-tvm, as .so and .tar."""
    out = tmp_path_factory.mktemp("tvm_wire_minrpc_kernels")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "tvm_export_kernels.py"), str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    return {k["name"]: k["files"] for k in report["kernels"]}


@pytest.fixture(scope="module")
def server(private_tmpdir):
    srv = rpc.MinRPCServer(port=0)
    yield srv
    srv.terminate()
    assert not srv.alive


def close(remote) -> None:
    """End a TVM client session now (TVM ends it when its last reference goes; tensors may still hold it)."""
    remote._sess.get_function("CloseRPCConnection")()
    gc.collect()


@pytest.fixture
def remote(tvm, server, private_tmpdir):
    sess = tvm.rpc.connect(HOST, server.port)
    yield sess
    close(sess)
    assert_clean(server, private_tmpdir)


# -- kernels, tensors, time_evaluator ---------------------------------------------------------
def test_tvm_kernel_tensors_and_time_evaluator(tvm, remote, tvm_kernels):
    remote.upload(tvm_kernels["add_one"]["so"])
    mod = remote.load_module("add_one.so")
    dev = remote.cpu(0)
    host = np.random.default_rng(0).uniform(-10, 10, N).astype("float32")
    a = tvm.runtime.tensor(host, dev)
    b = tvm.runtime.empty((N,), "float32", dev)
    mod["add_one"](a, b)
    np.testing.assert_array_equal(b.numpy(), host + np.float32(1))
    mod["main"](b, a)  # TVM's exported libraries alias their one function as main
    np.testing.assert_array_equal(a.numpy(), (host + np.float32(1)) + np.float32(1))

    result = mod.time_evaluator("add_one", dev, number=5, repeat=3)(a, b)
    assert len(result.results) == 3 and all(np.isfinite(result.results)) and result.mean >= 0
    np.testing.assert_array_equal(b.numpy(), a.numpy() + np.float32(1))
    flushed = mod.time_evaluator("add_one", dev, number=2, repeat=2, f_preproc="cache_flush_cpu_non_first_arg")(a, b)
    assert len(flushed.results) == 2  # MetaSchedule's cold-cache timing

    dev.sync()
    assert dev.exist and not remote.device(2, 0).exist  # no CUDA device here
    b.copyfrom(a)  # copies into a remote tensor, from a remote tensor
    np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_a_tar_is_linked_on_the_device_and_scalars_reach_kernels(tvm, remote, tvm_kernels):
    remote.upload(tvm_kernels["scale_shift"]["tar"], "scale_shift.tar")
    mod = remote.load_module("scale_shift.tar")
    dev = remote.cpu(0)
    host = np.arange(N, dtype="float32")
    a = tvm.runtime.tensor(host, dev)
    b = tvm.runtime.empty((N,), "float32", dev)
    mod["scale_shift"](a, 2.0, 3, b)
    np.testing.assert_allclose(b.numpy(), host * 2 + 3)
    assert len(mod.time_evaluator("scale_shift", dev, number=3, repeat=2)(a, 2.0, 3, b).results) == 2


def test_tensor_views_reach_the_kernel_as_their_part(tvm, remote, kernels):
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    dev = remote.cpu(0)
    base = tvm.runtime.tensor(np.arange(8, dtype="float32"), dev)
    square = base._create_view((2, 4))  # the same memory, another shape
    out = tvm.runtime.empty((2, 4), "float32", dev)
    mod["add_one"](square, out)
    np.testing.assert_array_equal(out.numpy(), np.arange(8, dtype="float32").reshape(2, 4) + 1)


def test_registered_functions_and_values(tvm, remote):
    fill = remote.get_function("tvm.contrib.random.random_fill")  # what MetaSchedule fills its inputs with
    t = tvm.runtime.empty((256,), "float32", remote.cpu(0))
    fill(t)
    values = t.numpy()
    assert values.any() and (abs(values) <= 1).all()
    ints = tvm.runtime.empty((64,), "int32", remote.cpu(0))
    fill(ints)
    assert ((ints.numpy() >= 0) & (ints.numpy() < 100)).all()
    f = remote.get_function("workbench.echo")
    assert f(7) == 7 and f(2.5) == 2.5 and f("text") == "text" and f(True) is True
    assert bytes(f(bytearray(b"\x00\x01bytes"))) == b"\x00\x01bytes"
    assert f(None) is None
    with pytest.raises(Exception, match="cannot be sent back"):
        f(1, 2)  # echo returns a list for two arguments: TVM's protocol has no lists
    remote.get_function("workbench.nop")()


# -- files ------------------------------------------------------------------------------------
def test_files_upload_download_listdir_remove(tvm, remote, tvm_kernels):
    small = b"hello\x00world"
    remote.upload(bytearray(small), "small.bin")
    big = os.urandom(20 << 20)  # over the 16 MiB held in memory: streamed into the file
    remote.upload(bytearray(big), "sub/big.bin")
    remote.upload(bytearray(), "empty.bin")
    assert bytes(remote.download("small.bin")) == small
    assert bytes(remote.download("sub/big.bin")) == big
    assert bytes(remote.download("empty.bin")) == b""
    assert remote.listdir(".").split(",") == ["empty.bin", "small.bin", "sub", ""]  # TVM's form: entry, then ','
    assert remote.listdir("sub") == "sub/big.bin,"
    remote.remove("sub/big.bin")
    remote.remove("no-such-file")  # as TVM's: nothing to remove is no error
    assert remote.listdir("sub") == ""

    remote.upload(tvm_kernels["add_one"]["tar"], "lib.tar")
    linked = bytes(remote.download_linked_module("lib.tar"))
    assert linked[:4] == b"\x7fELF"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "linked.so")
        with open(path, "wb") as f:
            f.write(linked)
        remote.upload(path)
    mod = remote.load_module("linked.so")
    dev = remote.cpu(0)
    a = tvm.runtime.tensor(np.ones(N, dtype="float32"), dev)
    mod["add_one"](a, a)
    np.testing.assert_array_equal(a.numpy(), np.full(N, 2, dtype="float32"))


def test_paths_stay_in_the_workspace(tvm, remote):
    for bad in ("../escape.bin", "/etc/passwd", "a/../../b"):
        with pytest.raises(tvm.error.RPCError, match=r"absolute path|'\.\.'"):
            remote.upload(bytearray(b"x"), bad)
    with pytest.raises(tvm.error.RPCError, match="absolute path"):
        remote.download("/etc/passwd")
    with pytest.raises(tvm.error.RPCError, match="'..'"):
        remote.load_module("../../lib.so")
    with pytest.raises(tvm.error.RPCError, match="'..'"):
        remote.remove("../x")  # a denied path is an error, unlike a missing one
    with pytest.raises(tvm.error.RPCError) as info:
        remote.download("missing.bin")
    assert "wb-session" not in str(info.value) and tempfile.gettempdir() not in str(info.value)


# -- errors ------------------------------------------------------------------------------------
def test_missing_functions_and_failing_kernels(tvm, remote, kernels):
    with pytest.raises(AttributeError, match="no function 'no.such.function'"):
        remote.get_function("no.such.function")
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    with pytest.raises(AttributeError, match="no function 'nope'"):
        mod["nope"]
    with pytest.raises(tvm.error.RPCError, match="fail: the kernel refuses, as asked"):
        mod["fail"]()
    with pytest.raises(tvm.error.RPCError, match="not supported"):
        remote.get_function("tvm.rpc.server.ImportModule")()
    assert remote.get_function("workbench.echo")(5) == 5  # the session goes on after errors


def test_a_crashing_kernel_ends_its_call_and_a_dying_worker_only_its_session(tvm, server, kernels, private_tmpdir):
    remote = tvm.rpc.connect(HOST, server.port)
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    dev = remote.cpu(0)
    with pytest.raises(tvm.error.RPCError, match=r"the kernel died of signal 11 \(SIGSEGV"):
        mod["segfault"]()
    a = tvm.runtime.tensor(np.zeros(4, dtype="float32"), dev)
    mod["add_one"](a, a)  # the same session, its tensors and modules, go on
    np.testing.assert_array_equal(a.numpy(), np.ones(4, dtype="float32"))
    with pytest.raises(tvm.error.RPCError, match="signal 11"):
        mod["segfault_unguarded"]()  # the worker really dies: the server says so, and goes on
    del a
    close(remote)
    assert_clean(server, private_tmpdir)
    again = tvm.rpc.connect(HOST, server.port)
    again.upload(bytearray(b"still here"), "x.bin")
    assert bytes(again.download("x.bin")) == b"still here"
    close(again)
    assert_clean(server, private_tmpdir)


def test_session_timeout_reaches_tvm_as_its_timeout_error(tvm, server, private_tmpdir):
    remote = tvm.rpc.connect(HOST, server.port, session_timeout=1)
    with pytest.raises(tvm.error.RPCSessionTimeoutError, match="session timed out after 1 s"):
        remote.get_function("workbench.sleep")(30.0)
    close(remote)
    assert_clean(server, private_tmpdir)


def test_a_full_server_refuses_tvm_clients_with_its_reason(tvm, private_tmpdir):
    with rpc.MinRPCServer(port=0, max_sessions=1) as srv:
        first = tvm.rpc.connect(HOST, srv.port)
        with pytest.raises(tvm.error.RPCError, match="server busy"):
            tvm.rpc.connect(HOST, srv.port)
        close(first)
        assert_clean(srv, private_tmpdir)
        second = tvm.rpc.connect(HOST, srv.port)  # the slot is free again
        assert second.listdir(".") == ""
        close(second)
        assert_clean(srv, private_tmpdir)


# -- keys and tokens -------------------------------------------------------------------------------
def test_keys_are_checked_in_tvms_handshake(tvm, private_tmpdir):
    with rpc.MinRPCServer(port=0, key="rasp") as srv:
        with pytest.raises(Exception, match="cannot find server that matches key"):
            tvm.rpc.connect(HOST, srv.port, key="jetson")
        for key in ("rasp", "rasp:1234abcd", ""):  # the key, a proxy's match key of it, or none
            remote = tvm.rpc.connect(HOST, srv.port, key=key)
            assert remote.listdir(".") == ""
            close(remote)
        assert_clean(srv, private_tmpdir)


def test_a_server_with_a_token_refuses_tvm_clients_unless_allowed(tvm, private_tmpdir):
    with rpc.MinRPCServer(port=0, auth_token="s3cret") as strict:
        with pytest.raises(tvm.error.RPCError, match=r"requires an auth token.*allow_tvm_clients=True"):
            tvm.rpc.connect(HOST, strict.port)
        assert wait_until(lambda: any("refused a TVM-protocol client" in line for line in strict.log_tail()))
        assert_clean(strict, private_tmpdir)
    with rpc.MinRPCServer(port=0, auth_token="s3cret", allow_tvm_clients=True) as open_to_tvm:
        assert "--allow-tvm-clients" in open_to_tvm.command
        remote = tvm.rpc.connect(HOST, open_to_tvm.port)
        remote.upload(bytearray(b"ok"), "ok.bin")
        assert bytes(remote.download("ok.bin")) == b"ok"
        close(remote)
        with pytest.raises(AuthenticationError):  # our own clients still need the token
            rpc.connect(HOST, open_to_tvm.port, auth_token="wrong")
        with rpc.connect(HOST, open_to_tvm.port, auth_token="s3cret") as ours:
            assert ours.listdir(".") == []
        assert_clean(open_to_tvm, private_tmpdir)


# -- trackers ----------------------------------------------------------------------------------------
def test_a_tvm_client_gets_minrpc_from_our_tracker(tvm, private_tmpdir):
    with rpc.Tracker(port=0, silent=True) as tracker, \
            rpc.MinRPCServer(port=0, key="wbnative", tracker_addr=(HOST, tracker.port)) as server:
        with rpc.connect_tracker(HOST, tracker.port) as ours:
            assert wait_until(lambda: ours.summary()["queue_info"].get("wbnative", {}).get("free") == 1, 15)
        tvm_tracker = tvm.rpc.connect_tracker(HOST, tracker.port)
        try:
            for attempt in range(3):  # again and again: the server offers itself anew after each session
                remote = tvm_tracker.request("wbnative", session_timeout=60, max_retry=3)
                a = tvm.runtime.tensor(np.full(16, attempt, dtype="float32"), remote.cpu(0))
                np.testing.assert_array_equal(a.numpy(), np.full(16, attempt, dtype="float32"))
                del a
                close(remote)
                assert_clean(server, private_tmpdir)
        finally:
            tvm_tracker.close()
        with pytest.raises(Exception, match="cannot find server that matches key"):
            tvm.rpc.connect(HOST, server.port, key="wbnative")  # a tracker's server takes only its match key
        assert_clean(server, private_tmpdir)


# -- a big-endian board ----------------------------------------------------------------------------------
def big_endian_board_missing() -> str | None:
    from workbench.native.qemu import EmulatorNotFoundError, find_emulator

    try:
        find_emulator("s390x")
    except EmulatorNotFoundError as exc:
        return str(exc)
    return None


ADD_ONE_F32 = """#include <workbench_kernel.h>
WB_KERNEL(add_one) {
  WB_EXPECT_ARGS(2);
  DLTensor* a = WB_ARG_TENSOR_OF(0, float32, 1);
  DLTensor* b = WB_ARG_TENSOR_OF(1, float32, 1);
  for (int64_t i = 0; i < a->shape[0]; ++i) ((float*)b->data)[i] = ((float*)a->data)[i] + 1;
  return 0;
}
"""


@pytest.mark.skipif(big_endian_board_missing() is not None, reason=f"no big-endian board: {big_endian_board_missing()}")
def test_tensor_copies_keep_tvms_byte_order_on_a_big_endian_board(tvm, tmp_path, private_tmpdir):
    """TVM's client sends and reads tensor bytes little-endian; minrpc for s390x (under qemu) swaps them, so its
    kernel computes on the right numbers and the client reads them back right."""
    with cc.build(ADD_ONE_F32, target="s390x-linux-gnu", name="add_one_be") as mod:
        lib = mod.export_library(tmp_path / "dev_lib.tar")
    with rpc.MinRPCServer(target="s390x") as board:
        remote = tvm.rpc.connect(HOST, board.port)
        remote.upload(lib)
        f = remote.load_module("dev_lib.tar")
        dev = remote.cpu(0)
        host = np.arange(10, dtype="float32") * 1.5
        a = tvm.runtime.tensor(host, dev)
        b = tvm.runtime.empty((10,), "float32", dev)
        f["add_one"](a, b)
        np.testing.assert_array_equal(b.numpy(), host + 1)
        np.testing.assert_array_equal(a.numpy(), host)
        del a, b
        close(remote)
        assert_clean(board, private_tmpdir)


# -- TVM's bytes, by hand ----------------------------------------------------------------------------
def packet(code: int, body: bytes) -> bytes:
    return struct.pack("<Qi", 4 + len(body), code) + body


def raw_str(text: str) -> bytes:
    return struct.pack("<iQ", 8, len(text)) + text.encode()


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    (length,) = struct.unpack("<Q", recv_exact(sock, 8))
    body = recv_exact(sock, length)
    return struct.unpack_from("<i", body)[0], body[4:]


def exception_text(body: bytes) -> str:
    count, type_index, size = struct.unpack_from("<iiQ", body)
    assert (count, type_index) == (1, 8)
    return body[16:16 + size].decode()


def handshake(port: int, key: bytes = b"client:", version: bytes = b"0.8.0", ctor: bytes = b"\0\0\0\0") -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=20)
    sock.sendall(struct.pack("<ii", MAGIC, len(key)) + key)
    code, keylen = struct.unpack("<ii", recv_exact(sock, 8))
    assert code == MAGIC and recv_exact(sock, keylen) == b"server:"
    sock.sendall(packet(2, struct.pack("<Q", len(version)) + version + ctor))
    return sock


def assert_closed(sock: socket.socket) -> None:
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def test_a_tvm_opening_that_is_not_a_clients_gets_tvms_mismatch(server, private_tmpdir):
    """TVM's RPC magic opens TVM's handshake: a key that is not ``client:...`` (or a key length past the limit)
    gets TVM's mismatch code, one little-endian int32, and the connection closes."""
    for opening in (struct.pack("<ii", MAGIC, 4) + b"key0", struct.pack("<ii", MAGIC, 1 << 30),
                    struct.pack("<ii", MAGIC, -1), struct.pack("<ii", MAGIC, 2) + b"\xff\xfe"):
        with socket.create_connection((HOST, server.port), timeout=20) as sock:
            sock.sendall(opening)
            assert struct.unpack("<i", recv_exact(sock, 4))[0] == MAGIC + 2
            assert_closed(sock)
    assert_clean(server, private_tmpdir)


def test_init_server_refusals(server, private_tmpdir):
    with handshake(server.port, version=b"0.7.0") as sock:
        code, body = read_packet(sock)
        assert code == 5 and "protocol version mismatch" in exception_text(body)
        assert_closed(sock)
    ctor = struct.pack("<i", 2) + raw_str("rpc.Connect") + raw_str("127.0.0.1")
    with handshake(server.port, ctor=ctor) as sock:
        code, body = read_packet(sock)
        assert code == 5 and "'rpc.Connect' is not supported by this server for TVM's client" in exception_text(body)
    local = struct.pack("<i", 1) + raw_str("rpc.LocalSession")
    with handshake(server.port, ctor=local) as sock:
        assert read_packet(sock) == (4, struct.pack("<ii", 1, 0))  # a local session: accepted
    with handshake(server.port, key=b"client: -timeout=soon") as sock:
        code, body = read_packet(sock)
        assert code == 5 and "-timeout=soon" in exception_text(body)
    with socket.create_connection((HOST, server.port), timeout=20) as sock:  # INIT_SERVER past its limit
        sock.sendall(struct.pack("<ii", MAGIC, 7) + b"client:")
        recv_exact(sock, 15)
        sock.sendall(struct.pack("<Q", 1 << 20))
        code, body = read_packet(sock)
        assert code == 5 and "over the handshake's 65536-byte limit" in exception_text(body)
    assert_clean(server, private_tmpdir)


def test_handshake_and_packet_bounds(server, private_tmpdir):
    with handshake(server.port) as sock:
        assert read_packet(sock) == (4, struct.pack("<ii", 1, 0))  # INIT_SERVER answered: None
        sock.sendall(packet(9, struct.pack("<i", 1) + struct.pack("<iQ", 50, 0)))  # an unknown type index
        code, body = read_packet(sock)
        assert code == 5 and "unknown TVM type index 50" in exception_text(body)
        sock.sendall(packet(9, struct.pack("<i", 1) + raw_str("workbench.echo")))  # in step: the next works
        code, body = read_packet(sock)
        assert code == 4 and struct.unpack_from("<ii", body) == (1, 4)  # a handle (an opaque pointer)
        (echo,) = struct.unpack_from("<Q", body, 8)
        sock.sendall(packet(3, struct.pack("<Q", echo) + struct.pack("<iiq", 1, 1, 42)))  # workbench.echo(42)
        assert read_packet(sock) == (4, struct.pack("<iiqiq", 2, 1, 1, 1, 42))  # [int 1, int 42]
        sock.sendall(packet(9, struct.pack("<i", 1) + struct.pack("<iQ", 8, 1 << 40)))  # a string past the packet
        code, body = read_packet(sock)
        assert code == 5 and "overruns its packet" in exception_text(body)
        sock.sendall(packet(9, struct.pack("<i", 5000)))  # too many values
        code, body = read_packet(sock)
        assert code == 5 and "a packed sequence of 5000 values" in exception_text(body)
        tensor = struct.pack("<iQiiiBBHqQ", 7, 0, 1, 0, 1, 2, 32, 1, 4, 0)  # float32[4] on cpu(0), data 0
        sock.sendall(packet(17, struct.pack("<i", 2) + tensor + struct.pack("<i", 0)))  # allocate it
        code, body = read_packet(sock)
        count, type_index, data = struct.unpack_from("<iiQ", body)
        assert (code, count, type_index) == (4, 1, 4) and data  # its handle: what a DLTensor's data holds
        described = tensor[4:12].replace(struct.pack("<Q", 0), struct.pack("<Q", data)) + tensor[12:]
        sock.sendall(packet(6, described + struct.pack("<Q", 64)))  # copy 64 bytes out of its 16
        code, body = read_packet(sock)
        assert code == 5 and "overruns the tensor's 16 bytes" in exception_text(body)
        sock.sendall(packet(7, described + struct.pack("<Q", 16) + bytes(range(16))))  # write it
        assert read_packet(sock) == (4, struct.pack("<ii", 1, 0))
        sock.sendall(packet(6, described + struct.pack("<Q", 16)))
        assert read_packet(sock) == (8, bytes(range(16)))  # COPY_ACK: what was written
        shifted = described[:-8] + struct.pack("<Q", 8)  # the same tensor from byte 8: 16 bytes overrun it
        sock.sendall(packet(7, shifted + struct.pack("<Q", 16) + bytes(16)))
        code, body = read_packet(sock)
        assert code == 5 and "overruns the tensor's 16 bytes" in exception_text(body)
        sock.sendall(packet(6, struct.pack("<QiiiBBHqQ", 999999, 1, 0, 1, 2, 32, 1, 4, 0) + struct.pack("<Q", 16)))
        code, body = read_packet(sock)
        assert code == 5 and "not a live tensor" in exception_text(body)
        sock.sendall(packet(14, struct.pack("<i", 2) + struct.pack("<iii", 6, 1, 0) + struct.pack("<iQ", 4, data)))
        assert read_packet(sock) == (4, struct.pack("<ii", 1, 0))  # DEV_FREE_DATA
        sock.sendall(packet(11, struct.pack("<i", 1) + struct.pack("<iii", 6, 2, 0)))  # DEV_SET_DEVICE cuda(0)
        code, body = read_packet(sock)
        assert code == 5 and "this server has no cuda(0)" in exception_text(body)
        sock.sendall(packet(8, b""))  # a server's code from the client
        code, body = read_packet(sock)
        assert code == 5 and "a client does not send TVM's RPC code COPY_ACK" in exception_text(body)
        sock.sendall(packet(77, b"xyz"))
        code, body = read_packet(sock)
        assert code == 5 and "unknown TVM RPC code 77" in exception_text(body)
        sock.sendall(packet(3, struct.pack("<Q", 12345) + struct.pack("<i", 1) + raw_str("x" * (17 << 20))))
        code, body = read_packet(sock)  # 17 MiB in a string argument: over what a packet may hold in memory
        assert code == 5 and "over the 16777216-byte limit" in exception_text(body)
        sock.sendall(struct.pack("<Q", 0) + packet(9, struct.pack("<i", 1) + raw_str("workbench.nop")))
        code, body = read_packet(sock)  # an empty packet is skipped
        assert code == 4
        sock.sendall(struct.pack("<Q", 1 << 62))  # a packet longer than anything the server takes
        code, body = read_packet(sock)
        assert code == 5 and "over this server's limit" in exception_text(body)
        assert_closed(sock)
    assert_clean(server, private_tmpdir)
