"""Run and time modules on devices, as ``tvm.testing``'s ``rpc_run``/``local_run``.

    >>> from workbench.testing import rpc_run, local_run, EvaluatorConfig, RPCConfig
    >>> (x, y), result = local_run(mod, "cpu", [x, y], EvaluatorConfig(number=10))   # doctest: +SKIP
"""
from .config import CPU_CACHE_FLUSH_BYTES, EvaluatorConfig, RPCConfig
from .run import local_run, rpc_run, run_in_session

__all__ = ["CPU_CACHE_FLUSH_BYTES", "EvaluatorConfig", "RPCConfig", "local_run", "rpc_run", "run_in_session"]
