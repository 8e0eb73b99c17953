"""TVM conformance: for each case of apache-tvm 0.27's own RPC, tracker, proxy and cc tests, a test of ours that
checks the same behaviour through the workbench's public API (the README's "TVM conformance" table maps them).

TVM's tests call functions that TVM registers for testing (``python/tvm/rpc/testing.py`` and the C++
``testing.*`` globals). :func:`register_tvm_testing` registers functions of the same names and behaviour on our
side; a test server imports it through ``server_init_callback="tests.conformance:register_tvm_testing"``.
"""
from __future__ import annotations

from workbench import rpc

INIT = "tests.conformance:register_tvm_testing"


def register_tvm_testing() -> None:
    """Functions of TVM's test registry, with TVM's names and behaviour."""
    import numpy as np

    def register(name):
        return rpc.register_func(name, override=True)

    @register("rpc.test.addone")
    def addone(x):
        return x + 1

    @register("rpc.test2.addone")  # tests/python/contrib/test_rpc_tracker.py registers this one itself
    def addone2(x):
        return x + 1

    @register("rpc.test.strcat")
    def strcat(name, x):
        return f"{name}:{x}"

    @register("rpc.test.except")
    def remote_throw(name):
        raise ValueError(f"{name}")

    @register("rpc.test.runtime_str_concat")
    def str_concat(x, y):
        return x + y

    @register("rpc.test.remote_tensor_func")
    def remote_tensor_func(y):
        np.testing.assert_equal(y.numpy(), np.ones((3, 4)))

    @register("rpc.test.add_to_lhs")
    def add_to_lhs(x):
        return lambda y: x + y

    @register("rpc.test.remote_return_nd")
    def remote_return_nd(name):
        nd = np.zeros(10).astype("float32")  # the closures below share it, as TVM's do
        if name == "get_arr":
            return lambda: nd
        if name == "get_elem":
            return lambda idx: float(nd[idx])
        if name == "get_arr_elem":
            return lambda arr, idx: float(arr.numpy()[idx])
        raise RuntimeError("unknown name")

    @register("testing.echo")  # TVM's C++ testing.echo: its first argument
    def echo(*args):
        return args[0]

    @register("testing.test_raise_error")  # TVM's: raise an error of the kind named
    def test_raise_error(kind, msg):
        raise {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)(msg)

    @register("ffi.Shape")  # TVM's shape object: a tuple of ints
    def make_shape(*dims):
        return tuple(int(d) for d in dims)

    @register("rpc.testing.GetShapeElem")
    def get_shape_elem(shape, index):
        return shape[index]

    @register("rpc.testing.GetShapeSize")
    def get_shape_size(shape):
        return len(shape)
