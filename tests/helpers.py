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
