"""The notebook layer: IPython magics (``%load_ext workbench``) and the live device picker.

    %load_ext workbench
    %rpc_farm --servers local=2
    %rpc_connect

    >>> from workbench.notebook import DevicePicker
    >>> DevicePicker()                 # doctest: +SKIP   (the default tracker's devices, live)

Imported only inside IPython; the core (workbench.rpc, runtime, cc, results,
farm) never imports it. It needs the package's notebook extra:
``pip install "rpc-workbench[notebook]"``.
"""
try:
    import IPython  # noqa: F401  (the magics are IPython's; the rest of the extra loads when used)
except ImportError as exc:
    raise ModuleNotFoundError(
        'workbench.notebook needs IPython, which is not installed: install the notebook extra with '
        'pip install "rpc-workbench[notebook]" (in a clone of the repository: pip install -e ".[notebook]")',
        name=exc.name or "IPython",
    ) from None

from .magics import MagicError, WorkbenchMagics, load_ipython_extension, unload_ipython_extension


def __getattr__(name: str):
    if name == "DevicePicker":  # ipywidgets loads only when a picker is asked for
        from .picker import DevicePicker

        return DevicePicker
    raise AttributeError(f"module 'workbench.notebook' has no attribute {name!r}")


__all__ = ["DevicePicker", "MagicError", "WorkbenchMagics", "load_ipython_extension", "unload_ipython_extension"]
