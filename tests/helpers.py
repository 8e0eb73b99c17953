"""Functions a test server imports through server_init_callback."""
from workbench import rpc


def register_extras() -> None:
    @rpc.register_func("tests.add", override=True)
    def add(a, b):
        return a + b

    @rpc.register_func("tests.tensor_sum", override=True)
    def tensor_sum(t):
        return float(t.numpy().sum())

    @rpc.register_func("tests.boom", override=True)
    def boom():
        raise ValueError("boom from a registered function")


def register_kernel_calls() -> None:
    """Functions TVM kernels call by name (T.call_packed) in tests/test_tvm_registered_calls.py."""
    import numpy as np

    @rpc.register_func("tests.kernel_fill", override=True)
    def kernel_fill(t, value, step):
        view = t.numpy()  # the kernel's own memory: writes reach the kernel
        view[:] = value + step * np.arange(view.size, dtype=view.dtype).reshape(view.shape)

    @rpc.register_func("tests.kernel_boom", override=True)
    def kernel_boom(t):
        raise ValueError(f"kernel_boom got a {t.dtype} tensor of shape {t.shape}")
