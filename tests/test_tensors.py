"""Remote devices and tensors."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from workbench import runtime
from workbench.errors import DeviceNotFoundError
from workbench.runtime import Tensor

DTYPES = ["float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
SHAPES = [(1,), (7,), (3, 5), (2, 3, 4), (1, 1, 1, 9)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_roundtrip_and_compute(mod, remote, dtype):
    dev = remote.cpu()
    data = (np.arange(24) % 50).astype(dtype).reshape(2, 3, 4)
    a = runtime.tensor(data, dev)
    assert (a.shape, a.dtype, a.device) == ((2, 3, 4), np.dtype(dtype), dev)
    np.testing.assert_array_equal(a.numpy(), data)
    b = runtime.empty(a.shape, dtype, dev)
    mod["add_one_any"](a, b)
    np.testing.assert_array_equal(b.numpy(), data + np.ones_like(data))


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes(remote, shape):
    data = np.random.default_rng(0).standard_normal(shape).astype("float32")
    a = runtime.tensor(data, remote.cpu())
    assert a.shape == shape and a.ndim == len(shape) and a.nbytes == data.nbytes
    np.testing.assert_array_equal(a.numpy(), data)


def test_bool_and_zero_size(remote):
    flags = np.array([True, False, True])
    np.testing.assert_array_equal(runtime.tensor(flags, remote.cpu()).numpy(), flags)
    empty = runtime.tensor(np.zeros((0, 4), "float32"), remote.cpu())
    assert empty.numpy().shape == (0, 4)


def test_non_contiguous_input_is_copied_in_order(remote):
    data = np.arange(20, dtype="int32").reshape(4, 5)[:, ::2]
    np.testing.assert_array_equal(runtime.tensor(data, remote.cpu()).numpy(), data)


def test_copyfrom_and_copyto(remote):
    dev = remote.cpu()
    a = runtime.empty((2, 2), "float32", dev)
    np.testing.assert_array_equal(a.numpy(), np.zeros((2, 2)))
    a.copyfrom([[1, 2], [3, 4]])
    b = runtime.empty((2, 2), "float32", dev)
    a.copyto(b)
    np.testing.assert_array_equal(b.numpy(), [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        a.copyfrom(np.zeros(3))


def test_remote_memory_released_when_collected(remote):
    dev = remote.cpu()
    before = remote.ping()
    tensors = [runtime.tensor(np.zeros(1000, "float64"), dev) for _ in range(5)]
    assert remote.ping()["tensor_bytes"] == before["tensor_bytes"] + 5 * 8000
    del tensors
    gc.collect()
    assert remote.ping()["tensors"] == before["tensors"]


def test_devices_the_server_lacks(remote):
    assert repr(remote.cpu(0)).endswith("cpu(0)")
    for make, name in [
        (remote.cuda, "cuda(0)"), (remote.cl, "cl(0)"), (remote.vulkan, "vulkan(0)"), (remote.metal, "metal(0)"),
        (remote.rocm, "rocm(0)"), (remote.ext_dev, "ext_dev(0)"), (remote.hexagon, "hexagon(0)"),
        (remote.webgpu, "webgpu(0)"),
    ]:
        if [4, 0] in remote.info["devices"] and name == "cl(0)":
            continue  # this machine has an OpenCL device (PoCL): tests/test_opencl.py
        with pytest.raises(DeviceNotFoundError, match=rf"has no {name.replace('(', '[(]').replace(')', '[)]')}; it has: cpu\(0\)"):
            make()
    with pytest.raises(DeviceNotFoundError, match="has no cpu"):
        remote.cpu(3)
    assert remote.device("cpu", 0) == remote.device(1, 0)
    with pytest.raises(ValueError, match="unknown device type 'tpu'"):
        remote.device("tpu")


def test_unsupported_dtype_and_local_device(remote):
    with pytest.raises(TypeError, match="cannot live on a device"):
        runtime.tensor(np.array(["a", "b"]), remote.cpu())
    with pytest.raises(ValueError, match="not a session device"):
        runtime.tensor(np.zeros(2), runtime.cpu())


def test_tensor_repr_and_type(remote):
    a = runtime.tensor(np.zeros(3, "float32"), remote.cpu())
    assert isinstance(a, Tensor)
    assert "shape=(3,)" in repr(a) and "float32" in repr(a)
