"""apache-tvm 0.27's own RPC client on minrpc, the native server: what tests/test_tvm_wire.py does not cover.

tests/test_tvm_wire.py runs TVM's client against both servers (kernels, views,
copies, time_evaluator, files, paths, crashes, session timeouts, tokens, the
tracker, the codec's bounds); these are minrpc's own: its registered functions,
a .tar linked on the device, MetaSchedule's RPCRunner, a full server, keys in
TVM's handshake, TVM's byte order on a big-endian board (s390x under qemu), and
more of TVM's bytes by hand for minrpc's codec (tvm.c). Real sockets on loopback; after each test no session
process or workspace is left.
"""
from __future__ import annotations

import os
import shutil
import socket
import struct

import numpy as np
import pytest

from workbench import cc, rpc

from . import test_tvm_wire as shared
from .conftest import assert_clean
from .helpers import emulated_board_missing
from .test_tvm_wire import (
    HOST,
    MAGIC,
    N,
    close,
    matmul_candidates,
    exception_text,
    handshake,
    packet,
    raw_str,
    read_packet,
)
from .wire import recv_exact

tvm = shared.tvm  # the fixtures of TVM's module and its kernels, shared with the tests of both servers
tvm_kernels = shared.tvm_kernels

if (shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")) is None:
    pytest.skip("no C compiler to build minrpc: apt-get install gcc", allow_module_level=True)

pytestmark = pytest.mark.timeout(300)  # the first test pays for TVM's import, one LLVM export and minrpc's build


@pytest.fixture(scope="module")
def server(private_tmpdir):
    srv = rpc.MinRPCServer(port=0)
    yield srv
    srv.terminate()
    assert not srv.alive


@pytest.fixture
def remote(tvm, server, private_tmpdir):
    sess = tvm.rpc.connect(HOST, server.port)
    yield sess
    close(sess)
    assert_clean(server, private_tmpdir)


# -- kernels, tensors, time_evaluator ---------------------------------------------------------
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
def test_a_denied_path_is_an_error_for_remove_unlike_a_missing_one(tvm, remote):
    remote.remove("no-such-file")  # as TVM's: nothing to remove is no error
    remote.remove("")  # the session directory: it goes with the session
    with pytest.raises(tvm.error.RPCError, match="'..'"):
        remote.remove("../x")
    with pytest.raises(tvm.error.RPCError, match="absolute path"):
        remote.remove("/tmp")


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


# -- a big-endian board ----------------------------------------------------------------------------------
BIG_ENDIAN_BOARD_MISSING = emulated_board_missing("s390x")


ADD_ONE_F32 = """#include <workbench_kernel.h>
WB_KERNEL(add_one) {
  WB_EXPECT_ARGS(2);
  DLTensor* a = WB_ARG_TENSOR_OF(0, float32, 1);
  DLTensor* b = WB_ARG_TENSOR_OF(1, float32, 1);
  for (int64_t i = 0; i < a->shape[0]; ++i) ((float*)b->data)[i] = ((float*)a->data)[i] + 1;
  return 0;
}
"""


@pytest.mark.skipif(BIG_ENDIAN_BOARD_MISSING is not None, reason=f"no big-endian board: {BIG_ENDIAN_BOARD_MISSING}")
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


def test_more_packet_bounds(server, private_tmpdir):
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


# -- MetaSchedule ------------------------------------------------------------------------------------
def test_metaschedule_rpc_runner_times_candidates_on_minrpc(tvm, tmp_path, private_tmpdir):
    """MetaSchedule's RPCRunner as tuning uses it (random_fill_for_measure, cold-cache time_evaluator, cleanup):
    two candidate schedules of a small matmul, timed on minrpc handed out by our tracker."""
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

    candidates = matmul_candidates(tvm, tmp_path)
    with rpc.Tracker(port=0, silent=True) as tracker, \
            rpc.MinRPCServer(port=0, key="native", tracker_addr=(HOST, tracker.port)) as server:
        runner = RPCRunner(
            RPCConfig(tracker_host=HOST, tracker_port=tracker.port, tracker_key="native", session_timeout_sec=60),
            EvaluatorConfig(number=3, repeat=2, min_repeat_ms=0, enable_cpu_cache_flush=True),
            max_workers=1,
        )
        results = [future.result() for future in runner.run(candidates)]
        for result in results:
            assert result.error_msg is None, result.error_msg
            assert len(result.run_secs) == 2 and all(float(s) >= 0 for s in result.run_secs)
        assert_clean(server, private_tmpdir)
