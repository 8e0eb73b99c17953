"""What runs next to the device, and the tensors you create there.

    >>> from workbench import runtime
    >>> a = runtime.tensor(np_array, remote.cpu(0))   # doctest: +SKIP

The serving side imports only the device-side modules (no numpy); the tensor
API is loaded on first use.
"""
from .devices import DEVICE_TYPES, Device, cpu
from .registry import get_global_func, list_global_func_names, register_func

_LAZY = {"Tensor", "tensor", "empty"}

__all__ = [
    "DEVICE_TYPES",
    "Device",
    "Tensor",
    "cpu",
    "empty",
    "get_global_func",
    "list_global_func_names",
    "register_func",
    "tensor",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.tensors"), name)
    raise AttributeError(f"module 'workbench.runtime' has no attribute {name!r}")
