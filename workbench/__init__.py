"""rpc-workbench: compile on your laptop, run and time on remote devices.

    >>> from workbench import rpc, runtime
    >>> server = rpc.Server(port=0)                       # doctest: +SKIP
    >>> remote = rpc.connect("127.0.0.1", server.port)    # doctest: +SKIP

Submodules load on first use, so a device-side server imports only what it needs.
"""
import importlib

__version__ = "0.1.0"
_SUBMODULES = {"rpc", "runtime", "cc", "results", "testing", "errors"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
