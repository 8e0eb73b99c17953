"""rpc-workbench: compile on your laptop, run and time on remote devices.

    >>> from workbench import rpc, runtime
    >>> server = rpc.Server(port=0)                       # doctest: +SKIP
    >>> remote = rpc.connect("127.0.0.1", server.port)    # doctest: +SKIP

In IPython or JupyterLab, ``%load_ext workbench`` registers the magics
(``%rpc_connect``, ``%%rpc_compile``, ``%rpc_time``, ...).

Submodules load on first use, so a device-side server imports only what it needs.
"""
import importlib

__version__ = "0.1.0"
_SUBMODULES = {"rpc", "runtime", "cc", "results", "testing", "errors", "farm", "notebook"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """``%load_ext workbench``: register the rpc-workbench magics."""
    from .notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext workbench``: stop the pickers and the embedded farm the magics started."""
    from .notebook.magics import unload_ipython_extension as unload

    unload(ipython)
