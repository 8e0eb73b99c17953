"""The global function registry that sessions expose through ``get_function``.

    >>> from workbench import rpc
    >>> @rpc.register_func("demo.add")
    ... def add(a, b):
    ...     return a + b
"""
from __future__ import annotations

import difflib
from typing import Callable, TypeVar

from ..errors import FunctionNotFoundError

F = TypeVar("F", bound=Callable)
_REGISTRY: dict[str, Callable] = {}


def register_func(name: str, f: F | None = None, override: bool = False):
    """Register ``f`` under ``name``; usable as a decorator (``@register_func("x")``).

    Registered functions take ints, floats, strings, bytes and tensors
    (server-side tensors with ``.numpy()``, ``.shape``, ``.dtype``) and return
    None, a number, a string, bytes, a tensor (one they were given, or a numpy
    array: the client gets a remote tensor), a function (a closure: the client
    gets a remote function), or lists and dicts of those, as in TVM.
    """
    if not isinstance(name, str) or not name:
        raise TypeError("register_func needs a non-empty function name")

    def register(func: F) -> F:
        if not callable(func):
            raise TypeError(f"register_func({name!r}) needs a callable, not {type(func).__name__}")
        if name in _REGISTRY and not override:
            raise ValueError(f"a function named {name!r} is already registered; pass override=True to replace it")
        _REGISTRY[name] = func
        return func

    return register if f is None else register(f)


def get_global_func(name: str) -> Callable:
    try:
        return _REGISTRY[name]
    except KeyError:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
        raise FunctionNotFoundError(
            f"no function named {name!r} is registered on this server{hint} "
            "(register one with workbench.rpc.register_func in server_init_callback)"
        ) from None


def is_registered(name: str) -> bool:
    """True when a function is registered under ``name`` in this process.

        >>> is_registered("workbench.echo")
        True
    """
    return name in _REGISTRY


def list_global_func_names() -> list[str]:
    return sorted(_REGISTRY)


def _echo(*args):
    return args[0] if len(args) == 1 else list(args)


def _nop(*args):
    return None


def _sleep(seconds: float) -> None:
    import time

    time.sleep(seconds)


def _tensor_info(tensor) -> list:
    """``[shape, dtype, [device_type, device_id]]`` of a tensor: how a client learns a tensor a call returned."""
    return [list(tensor.shape), tensor.dtype, [tensor.dltensor.device.device_type, tensor.dltensor.device.device_id]]


register_func("workbench.echo", _echo)
register_func("workbench.tensor_info", _tensor_info)
register_func("workbench.nop", _nop)
register_func("workbench.sleep", _sleep)
