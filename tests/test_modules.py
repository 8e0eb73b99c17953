"""Modules (.so, .tar linked on the device), functions, kernel errors and crashes."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from workbench import cc, rpc, runtime
from workbench.errors import (
    BadRequestError,
    RemoteError,
    RemoteNotFoundError,
    SessionCrashedError,
    UnsupportedError,
)

from .conftest import assert_clean


def test_load_so_and_call(mod, remote):
    assert "add_one" in mod.function_names
    dev = remote.cpu(0)
    a = runtime.tensor(np.arange(1024, dtype="float32"), dev)
    b = runtime.empty((1024,), "float32", dev)
    mod["add_one"](a, b)
    np.testing.assert_array_equal(b.numpy(), np.arange(1024, dtype="float32") + 1)


def test_load_tar_links_on_the_device(remote, kernels):
    remote.upload(kernels["tar"])
    mod = remote.load_module("kernels.tar")
    dev = remote.cpu()
    a = runtime.tensor(np.ones((4, 5), "float32"), dev)
    b = runtime.empty((4, 5), "float32", dev)
    mod["add_one"](a, b)
    np.testing.assert_array_equal(b.numpy(), np.full((4, 5), 2, "float32"))


def test_download_linked_module(remote, kernels, tmp_path):
    remote.upload(kernels["tar"])
    blob = remote.download_linked_module("kernels.tar")
    assert isinstance(blob, bytearray) and blob[:4] == b"\x7fELF"
    remote.upload(blob, target="relinked.so")
    assert "scale_shift" in remote.load_module("relinked.so").function_names


def test_scalar_string_and_return_values(mod, remote):
    dev = remote.cpu()
    a = runtime.tensor(np.arange(6, dtype="float32"), dev)
    b = runtime.empty((6,), "float32", dev)
    assert mod["scale_shift"](a, 2.0, 3, b) is None
    np.testing.assert_allclose(b.numpy(), np.arange(6) * 2.0 + 3)
    assert mod["sum_int32"](runtime.tensor(np.arange(10, dtype="int32"), dev)) == 45
    assert mod["strlen"]("hello, board") == 12
    assert mod["half"](3.0) == 1.5


def test_kernel_error_message_comes_back(mod, remote):
    with pytest.raises(RemoteError, match="expected 2 arguments, got 1"):
        mod["add_one"](runtime.empty((3,), "float32", remote.cpu()))
    with pytest.raises(RemoteError, match="the kernel refuses, as asked"):
        mod["fail"]()
    assert mod["half"](1.0) == 0.5  # the session goes on


def test_missing_function_lists_what_exists(mod, remote):
    with pytest.raises(RemoteNotFoundError, match=r"no kernel named 'nope'.*add_one"):
        mod["nope"]
    with pytest.raises(RemoteNotFoundError, match="no function named 'no.such.func'"):
        remote.get_function("no.such.func")


def test_bad_module_files(remote):
    remote.upload(b"not an elf", target="junk.so")
    with pytest.raises(RemoteError, match="cannot load junk.so"):
        remote.load_module("junk.so")
    remote.upload(b"not a tar", target="junk.tar")
    with pytest.raises(RemoteError, match="not a readable tar"):
        remote.load_module("junk.tar")
    remote.upload(b"x", target="model.onnx")
    with pytest.raises(UnsupportedError, match=r"shared object \(.so\), an object file \(.o\) or a .tar"):
        remote.load_module("model.onnx")
    with pytest.raises(RemoteNotFoundError, match="upload it first"):
        remote.load_module("absent.so")


def test_registered_functions(remote):
    assert remote.get_function("workbench.echo")("hi") == "hi"
    assert remote.get_function("workbench.echo")(1, 2.5, "x") == [1, 2.5, "x"]


@pytest.mark.parametrize("kernel, signal_text", [("segfault_unguarded", "SIGSEGV"), ("exit_group", "exited with status 3")])
def test_crashing_kernel_ends_only_its_session(server, private_tmpdir, kernels, kernel, signal_text):
    victim = rpc.connect("127.0.0.1", server.port)
    bystander = rpc.connect("127.0.0.1", server.port)
    victim.upload(kernels["so"])
    mod = victim.load_module("kernels.so")
    with pytest.raises(SessionCrashedError, match=signal_text):
        mod[kernel]()
    with pytest.raises(SessionCrashedError, match="session has ended"):
        victim.listdir(".")
    assert server.alive
    assert bystander.ping()["objects"] == 0  # other sessions are untouched
    fresh = rpc.connect("127.0.0.1", server.port)
    assert fresh.listdir(".") == []
    for s in (victim, bystander, fresh):
        s.close()
    assert_clean(server, private_tmpdir)


def test_system_lib_serves_load_library_kernels(kernels, private_tmpdir):
    with rpc.Server(port=0, silent=True, load_library=[kernels["so"]]) as srv:
        remote = rpc.connect("127.0.0.1", srv.port)
        lib = remote.system_lib()
        assert "add_one" in lib.function_names
        assert lib["half"](5.0) == 2.5
        remote.close()
        assert_clean(srv, private_tmpdir)


def test_module_entry_needs_a_name(mod):
    with pytest.raises(BadRequestError, match="no entry function"):
        mod()


MATH_KERNEL = r"""
#include <math.h>
#include <workbench_kernel.h>

WB_KERNEL(mathk) {
  WB_EXPECT_ARGS(1);
  DLTensor* a = WB_ARG_TENSOR(0);
  float* x = (float*)a->data;
  for (int64_t i = 0; i < a->shape[0]; ++i) x[i] = expf(x[i]) + logf(x[i] + 2.0f) + powf(x[i], 1.5f);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_tar_modules_link_libm_like_tvm(remote, tmp_path):
    """A .tar linked on the device binds libm calls to libm's current versions, as TVM's export_library link does."""
    src = tmp_path / "mathk.c"
    src.write_text(MATH_KERNEL)
    remote.upload(cc.create_tar(tmp_path / "mathk.tar", [src]))
    so = tmp_path / "linked.so"
    so.write_bytes(remote.download_linked_module("mathk.tar"))
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", str(so)], capture_output=True, text=True,
                             check=True).stdout
    for name in ("expf", "logf", "powf"):
        assert re.search(rf"\b{name}@GLIBC_", symbols), f"{name} is not bound to a libm version:\n{symbols}"
    mod = remote.load_module("mathk.tar")
    x = np.linspace(0.5, 2.0, 64, dtype="float32")
    t = runtime.tensor(x, remote.cpu())
    mod["mathk"](t)
    np.testing.assert_allclose(t.numpy(), np.exp(x) + np.log(x + 2) + x ** 1.5, rtol=1e-5)
