"""Issue 7, client side and request handling: objects of another session are refused before
anything is sent, handles of the wrong type are BAD_REQUEST, and argument errors come back
as BAD_REQUEST without server tracebacks or the server's absolute paths.

Requests the Python client would never send are sent with ``remote._request`` (the real
session, its real wire), so the server's own checks are what is tested.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time

import numpy as np
import pytest

from workbench import rpc, runtime
from workbench.errors import BadRequestError, DeviceNotFoundError, ProtocolError, RemoteError
from workbench.rpc.wire.protocol import HEADER, MAGIC, NONCE_BYTES, PREAMBLE, VERSION, Ext, Handle, Kind, pack

from .conftest import assert_clean

CPU = [1, 0]
FLOAT32 = [2, 32, 1]


@pytest.fixture
def pair(server, private_tmpdir, kernels):
    """Two sessions to one server, with the same objects created in the same order (so the same handle ids)."""
    sessions = [rpc.connect("127.0.0.1", server.port) for _ in range(2)]
    made = []
    for sess, base in zip(sessions, (1.0, 10.0)):
        sess.upload(kernels["so"])
        mod = sess.load_module("kernels.so")  # id 1
        dev = sess.cpu()
        x = runtime.tensor(np.full(4, base, "float32"), dev)  # id 2
        y = runtime.tensor(np.full(4, -1.0, "float32"), dev)  # id 3
        made.append((sess, mod, x, y))
    yield made
    for sess in sessions:
        sess.close()
    assert_clean(server, private_tmpdir)


def assert_untouched(pair) -> None:
    (_, _, ax, ay), (_, _, bx, by) = pair
    np.testing.assert_array_equal(ax.numpy(), 1.0)
    np.testing.assert_array_equal(ay.numpy(), -1.0)
    np.testing.assert_array_equal(bx.numpy(), 10.0)
    np.testing.assert_array_equal(by.numpy(), -1.0)


def names_both(a: rpc.RPCSession, b: rpc.RPCSession) -> str:
    """A pattern that matches a message naming both sessions, in either order."""
    one, two = re.escape(a.name), re.escape(b.name)
    return rf"(?s)({one}.*{two}|{two}.*{one})"


# -- item 2: objects of another session are refused on the client ---------------------------------
def test_call_with_another_sessions_tensors_is_refused(pair):
    (a, _, ax, ay), (b, mod_b, _, _) = pair
    assert a.name != b.name and a.address == b.address  # one server: only the session number tells them apart
    with pytest.raises(ValueError, match=names_both(a, b)):
        mod_b["add_one"](ax, ay)  # the ids 2 and 3 name b's own tensors on the server
    assert_untouched(pair)  # nothing was sent: b's tensors were not computed on


def test_time_evaluator_with_another_sessions_tensors_is_refused(pair):
    (a, _, ax, ay), (b, mod_b, _, _) = pair
    timer = mod_b.time_evaluator("add_one", b.cpu(), number=3, repeat=2)
    with pytest.raises(ValueError, match=names_both(a, b)):
        timer(ax, ay)
    assert_untouched(pair)
    assert len(timer(*pair[1][2:]).results) == 2  # with b's own tensors it runs


def test_another_sessions_module_function_or_nested_tensor_is_refused(pair):
    (a, mod_a, ax, _), (b, mod_b, bx, _) = pair
    echo = b.get_function("workbench.echo")
    for value in (mod_a, mod_a["half"], [bx, ax], {"t": ax}, (1, [ax])):
        with pytest.raises(ValueError, match=rf"belongs to {re.escape(a.name)}, not to {re.escape(b.name)}"):
            echo(value)
    assert echo([1, "x"]) == [1, "x"]
    assert b.get_function("workbench.nop")(bx, [1, "x"], 2.5) is None  # its own objects go through
    with pytest.raises(DeviceNotFoundError, match=names_both(a, b)):
        mod_b.time_evaluator("add_one", a.cpu())


def test_local_tensor_passed_to_a_remote_function_is_refused(pair):
    _, (b, mod_b, _, by) = pair
    with rpc.LocalSession() as local:
        t = runtime.tensor(np.zeros(4, "float32"), local.cpu())
        with pytest.raises(ValueError, match=names_both(local, b)):
            mod_b["add_one"](t, by)
    np.testing.assert_array_equal(by.numpy(), -1.0)


def test_tensor_copies_between_sessions_go_through_this_process(pair):
    (a, _, ax, ay), (b, _, bx, by) = pair
    ax.copyto(by)  # a -> b
    np.testing.assert_array_equal(by.numpy(), 1.0)
    ay.copyfrom(bx)  # b -> a
    np.testing.assert_array_equal(ay.numpy(), 10.0)
    c = runtime.tensor(ax, b.cpu())
    assert c.session is b
    np.testing.assert_array_equal(c.numpy(), 1.0)
    d = bx.copyto(a.cpu())
    assert d.session is a
    np.testing.assert_array_equal(d.numpy(), 10.0)
    np.testing.assert_array_equal(bx.numpy(), 10.0)  # sources unchanged
    with pytest.raises(TypeError, match="copyto takes a tensor or a device"):
        ax.copyto(np.zeros(4, "float32"))


# -- item 2: handle types are checked on the server -----------------------------------------------
@pytest.fixture
def objects(remote, kernels):
    """The session, the handles of a module, a tensor and a function, and the objects that keep them alive."""
    remote.upload(kernels["so"])
    mod = remote.load_module("kernels.so")
    t = runtime.tensor(np.arange(4, dtype="float32"), remote.cpu())
    fn = mod["add_one"]
    yield remote, mod._wb_handle, t._wb_handle, fn._wb_handle, t
    del mod, fn


def handle(ext: int, like: Handle) -> Handle:
    """A handle of type ``ext`` with the id of ``like`` (what a confused or hostile client sends)."""
    return Handle(ext, like.id)


def bad_request(remote, kind: int, args, match: str) -> str:
    with pytest.raises(BadRequestError, match=match) as info:
        remote._request(kind, args)
    text = str(info.value)
    assert "Traceback" not in text, text
    return text


def test_a_handle_of_the_wrong_type_is_a_bad_request(objects):
    remote, M, T, F, t = objects
    bad_request(remote, Kind.CALL, [T, []], r"Handle\(TENSOR, \d+\) is a tensor handle, where a function is expected")
    bad_request(remote, Kind.CALL, [M, [T]], "is a module handle, where a function is expected")
    bad_request(remote, Kind.CALL, [handle(Ext.FUNCTION, T), []], "is not a function of this session")
    bad_request(remote, Kind.CALL, [F, [F, T]], "argument 0: .* is a function handle; only tensors")
    bad_request(remote, Kind.CALL, [F, [T, M]], "argument 1: .* is a module handle")
    bad_request(remote, Kind.CALL, [F, [handle(Ext.TENSOR, M), T]], "is not a tensor of this session")
    bad_request(remote, Kind.TIME_EVAL, [M, CPU, {}, [T, T]], "is a module handle, where a function is expected")
    bad_request(remote, Kind.TIME_EVAL, [F, CPU, {}, [T, F]], "argument 1: .* is a function handle")
    bad_request(remote, Kind.MODULE_FUNCTION, [F, "add_one"], "is a function handle, where a module is expected")
    bad_request(remote, Kind.MODULE_FUNCTION, [handle(Ext.MODULE, T), "add_one"], "is not a module of this session")
    bad_request(remote, Kind.TENSOR_READ, [M], "is a module handle, where a tensor is expected")
    bad_request(remote, Kind.TENSOR_READ, [handle(Ext.MODULE, T)], "is a module handle, where a tensor is expected")
    bad_request(remote, Kind.TENSOR_WRITE, [handle(Ext.TENSOR, F)], "is not a tensor of this session")
    bad_request(remote, Kind.CALL, ["add_one", []], "expected a function handle, got str")
    bad_request(remote, Kind.CALL, [Handle(Ext.FUNCTION, 999), []], "is not a live function of this session")
    mod = remote.load_module("kernels.so")
    mod["add_one"](t, t)  # the session goes on
    np.testing.assert_array_equal(t.numpy(), [1, 2, 3, 4])


# -- item 18: argument errors are BAD_REQUEST, with no traceback --------------------------------------
@pytest.mark.parametrize("shape, dtype, match", [
    ([4], [2, 300, 1], "float tensors of 300 bits are not supported"),
    ([4], [0, 65, 1], "int tensors of 65 bits are not supported; bits: 1..64"),
    ([4], [2, 0, 1], "float tensors of 0 bits"),
    ([4], [2, 32, 0], "lanes must be 1..1024, not 0"),
    ([4], [2, 32, 70000], "lanes must be 1..1024, not 70000"),
    ([4], [3, 64, 1], "dtype code 3 is not supported"),
    ([4], [2, 32.0, 1], r"a dtype is \[code, bits, lanes\]"),
    ([4], [2, 32], r"a dtype is \[code, bits, lanes\]"),
    ([-1], FLOAT32, "dimensions must be 0..2\\*\\*63-1"),
    ([2.5], FLOAT32, "a shape is a list of ints"),
    ([True], FLOAT32, "a shape is a list of ints"),
    ([1] * 65, FLOAT32, "at most 64 dimensions"),
    ([1 << 40, 1 << 40], FLOAT32, "over the 1099511627776-byte limit of one tensor"),
    ([0, 1 << 63], FLOAT32, "dimensions must be 0..2\\*\\*63-1"),
])
def test_tensor_descriptions_are_range_checked(remote, shape, dtype, match):
    bad_request(remote, Kind.TENSOR_ALLOC, [shape, dtype, *CPU], match)
    t = runtime.tensor(np.arange(3, dtype="int16"), remote.cpu())  # the session goes on
    np.testing.assert_array_equal(t.numpy(), [0, 1, 2])


def test_bad_device_and_names_are_bad_requests(objects):
    remote, M, T, F, _ = objects
    bad_request(remote, Kind.TENSOR_ALLOC, [[4], FLOAT32, [1], 0], r"a device is \[device_type, device_id\]")
    bad_request(remote, Kind.TENSOR_ALLOC, [[4], FLOAT32, "cpu", 0], "two ints")
    bad_request(remote, Kind.TIME_EVAL, [F, [1], {}, []], r"the device is \[device_type, device_id\]")
    bad_request(remote, Kind.TIME_EVAL, [F, CPU, {}, "ab"], "the arguments are a list, not str")
    bad_request(remote, Kind.GET_FUNCTION, [123], "a function name is a non-empty string")
    bad_request(remote, Kind.GET_FUNCTION, [["workbench.echo"]], "a function name is a non-empty string")
    bad_request(remote, Kind.MODULE_FUNCTION, [M, 5], "a kernel name is a non-empty string")
    bad_request(remote, Kind.MODULE_FUNCTION, [M, "add\0one"], "without NUL bytes")
    bad_request(remote, Kind.LISTDIR, [".", "."], "LISTDIR takes 0 or 1 arguments, got 2")
    assert remote.ping()["tensors"] == 1


def test_kernel_arguments_are_never_silently_changed(objects):
    remote, M, T, F, t = objects
    mod = remote.load_module("kernels.so")
    out = runtime.empty((4,), "float32", remote.cpu())
    with pytest.raises(BadRequestError, match="9223372036854775808 does not fit a kernel's int64") as info:
        mod["scale_shift"](t, 1.0, 1 << 63, out)  # would wrap to -2**63
    assert "Traceback" not in str(info.value)
    with pytest.raises(BadRequestError, match="cannot hold a NUL"):
        mod["strlen"]("ab\0cd")  # would count 2
    with pytest.raises(BadRequestError, match="argument 0: a kernel cannot take a list"):
        mod["strlen"]([1, 2])
    with pytest.raises(BadRequestError, match="argument 1: a kernel cannot take a list"):
        mod.time_evaluator("scale_shift", remote.cpu())(t, [1.0], 1, out)
    mod["scale_shift"](t, 2.0, 1, out)
    np.testing.assert_array_equal(out.numpy(), [1, 3, 5, 7])
    assert mod["strlen"]("abcd") == 4


def test_arguments_a_python_function_cannot_take_are_a_bad_request(remote):
    sleep = remote.get_function("workbench.sleep")
    with pytest.raises(BadRequestError, match="missing 1 required positional argument") as info:
        sleep()
    assert "Traceback" not in str(info.value)
    with pytest.raises(BadRequestError, match="_sleep: too many positional arguments"):
        sleep.time_evaluator(remote.cpu())(0.0, 1)
    with pytest.raises(BadRequestError, match="f_preproc 'workbench.sleep': missing"):
        remote.get_function("workbench.nop").time_evaluator(remote.cpu(), f_preproc="workbench.sleep")()
    # an error inside the function is the function's: REMOTE, its type and message (the server's frames stay
    # in its log)
    with pytest.raises(RemoteError, match="TypeError: 'str' object cannot be interpreted as an integer") as info:
        sleep("soon")
    assert not isinstance(info.value, BadRequestError)
    assert "Traceback" not in str(info.value) and "traceback" not in str(info.value)


def test_errors_name_workspace_paths_not_server_paths(remote, private_tmpdir):
    remote.upload(b"x", target="a")
    with pytest.raises(RemoteError) as info:
        remote.upload(b"y", target="a/b")  # a is a file
    text = str(info.value)
    assert "File exists: 'a'" in text and private_tmpdir not in text and "wb-session-" not in text, text
    remote.upload(b"not an ELF file", target="bad.so")
    with pytest.raises(RemoteError, match="cannot load bad.so: bad.so: ") as info:
        remote.load_module("bad.so")
    assert private_tmpdir not in str(info.value) and "wb-session-" not in str(info.value)
    assert remote.listdir() == ["a", "bad.so"]


def test_local_session_checks_the_same():
    with rpc.LocalSession() as local:
        with pytest.raises(BadRequestError, match="float tensors of 300 bits"):
            local._request(Kind.TENSOR_ALLOC, [[4], [2, 300, 1], *CPU])
        with pytest.raises(TypeError, match="dtype float128 cannot live on a device"):
            runtime.empty((2,), "float128", local.cpu())
        with pytest.raises(TypeError, match="complex256 cannot live on a device"):
            runtime.tensor(np.zeros(2, "complex256"), local.cpu())
        c = runtime.tensor(np.array([1 + 2j], "complex128"), local.cpu())
        np.testing.assert_array_equal(c.numpy(), [1 + 2j])


# -- issue 17, item 6: one deadline covers connecting and the whole handshake ------------------------------
def _dripping_server(listener: socket.socket, stop: threading.Event) -> None:
    """Accept one client and send it a real preamble and HELLO, one byte every 0.3 s (about 20 s in all)."""
    conn, _ = listener.accept()
    with conn:
        body = pack({"auth": False, "nonce": b"\0" * NONCE_BYTES})
        hello = PREAMBLE.pack(MAGIC, VERSION, 0) + HEADER.pack(len(body), Kind.HELLO, 0, 0) + body
        for byte in hello:
            if stop.wait(0.3):
                return
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                return


def test_connect_timeout_bounds_a_handshake_that_a_server_drips():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        stop = threading.Event()
        dripper = threading.Thread(target=_dripping_server, args=(listener, stop), daemon=True)
        dripper.start()
        start = time.monotonic()
        try:
            with pytest.raises(ProtocolError, match=r"did not answer the handshake in time \(connect_timeout covers"):
                rpc.connect("127.0.0.1", listener.getsockname()[1], connect_timeout=1.5)
            # bounded by the deadline, not by each byte's wait: the whole HELLO would take about 20 s
            assert time.monotonic() - start < 10
        finally:
            stop.set()
            dripper.join(timeout=5)


# -- issue 17, item 7: errors carry no server paths and none of its frames ---------------------------------------
def test_an_unforeseen_server_error_carries_no_path_and_no_frame(remote):
    with pytest.raises(RemoteError) as info:
        remote.upload(b"x", target="d/" * 5000 + "f")  # so deep a path that the server's own code recurses too far
    text = str(info.value)
    assert text.startswith("RecursionError: maximum recursion depth exceeded"), text
    assert "Traceback" not in text and "File " not in text and "/work" not in text and ".py" not in text, text


def test_a_registered_functions_error_shows_its_own_frames_by_file_name(private_tmpdir):
    with rpc.Server(port=0, silent=True, server_init_callback="tests.helpers:register_extras") as srv, \
            rpc.connect("127.0.0.1", srv.port) as remote:
        with pytest.raises(RemoteError, match="ValueError: boom from a registered function") as info:
            remote.get_function("tests.boom")()
    text = str(info.value)
    assert 'File "helpers.py"' in text and "in boom" in text, text  # the user's own code: its frames help
    assert os.sep + "tests" + os.sep not in text and "workbench" not in text, text  # no path, no server frame
