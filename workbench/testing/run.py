"""Run a module on a device and time it: ``rpc_run`` (a device from the tracker) and ``local_run`` (this process).

    >>> from workbench import cc
    >>> from workbench.testing import rpc_run, EvaluatorConfig
    >>> mod = cc.build(ADD_ONE_C, target="aarch64-linux-gnu")                  # doctest: +SKIP
    >>> (a, b), result = rpc_run(mod, "cpu", [a, np.empty_like(a)],
    ...                          evaluator_config=EvaluatorConfig(number=10))     # doctest: +SKIP

The module is exported into a temporary directory, uploaded, loaded, timed on
the device with its arguments, and every argument comes back as a numpy array
(outputs included). Remote files and the temporary directory are removed.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from .config import EvaluatorConfig, RPCConfig

if TYPE_CHECKING:
    from ..results import BenchmarkResult

log = logging.getLogger(__name__)

ExportFunc = Union[str, Callable[..., Any]]
ARTIFACT = "wb_tmp_mod"


def rpc_run(
    mod: Any,
    device_type: str,
    args: Sequence[Any],
    evaluator_config: EvaluatorConfig | None = None,
    rpc_config: RPCConfig | None = None,
    export_func: ExportFunc = "tar",
    output_format: str | None = None,
) -> tuple[list[Any], "BenchmarkResult"]:
    """Export ``mod``, run and time it on a device the tracker grants; return ``(args, BenchmarkResult)``.

    ``mod`` is anything with ``export_library`` (a ``cc.Module``, an apache-tvm
    module). ``args`` are numpy arrays, tensors, ints and floats; arrays and
    tensors are copied to the device and every one comes back as a numpy array.
    ``rpc_config`` None (or fields left None) reads ``WORKBENCH_TRACKER_HOST``/
    ``_PORT``/``_KEY`` (or TVM's ``TVM_TRACKER_*``). ``export_func`` is ``"tar"``
    (objects linked on the device), ``"so"``, ``"ndk"``, an
    ``export_func(mod, path)`` (give ``output_format``), or an fcompile with an
    ``output_format`` such as ``cc.cross_compiler("aarch64-linux-gnu")``.

        >>> os.environ.update(WORKBENCH_TRACKER_HOST="127.0.0.1", WORKBENCH_TRACKER_PORT="9190",
        ...                   WORKBENCH_TRACKER_KEY="rasp")                               # doctest: +SKIP
        >>> (x, y), result = rpc_run(mod, "cpu", [x, np.empty_like(x)])                  # doctest: +SKIP
    """
    evaluator_config = evaluator_config or EvaluatorConfig()
    rpc_config = RPCConfig.normalized(rpc_config)
    export, output_format = _normalize_export(export_func, output_format)
    session = rpc_config.connect_server()
    try:
        return _run(session, mod, device_type, args, evaluator_config, export, output_format)
    finally:
        session.close()


def run_in_session(
    session: Any,
    mod: Any,
    device_type: str,
    args: Sequence[Any],
    evaluator_config: EvaluatorConfig | None = None,
    export_func: ExportFunc = "tar",
    output_format: str | None = None,
) -> tuple[list[Any], "BenchmarkResult"]:
    """As :func:`rpc_run`, in a session you hold (which stays open; the uploaded file is removed).

        >>> remote = rpc.connect("127.0.0.1", 9090)                                  # doctest: +SKIP
        >>> (x, y), result = run_in_session(remote, mod, "cpu", [x, np.empty_like(x)])   # doctest: +SKIP
    """
    export, output_format = _normalize_export(export_func, output_format)
    return _run(session, mod, device_type, args, evaluator_config or EvaluatorConfig(), export, output_format)


def local_run(
    mod: Any,
    device_type: str,
    args: Sequence[Any],
    evaluator_config: EvaluatorConfig | None = None,
    export_func: ExportFunc = "tar",
    output_format: str | None = None,
) -> tuple[list[Any], "BenchmarkResult"]:
    """As :func:`rpc_run`, on this machine: the export is loaded in-process (``rpc.LocalSession``).

        >>> (x, y), result = local_run(cc.build(ADD_ONE_C), "cpu", [x, np.empty_like(x)],
        ...                            evaluator_config=EvaluatorConfig(number=10, repeat=3))   # doctest: +SKIP
        >>> result.mean                                                                       # doctest: +SKIP
    """
    from ..rpc.client.local import LocalSession

    evaluator_config = evaluator_config or EvaluatorConfig()
    export, output_format = _normalize_export(export_func, output_format)
    session = LocalSession()
    try:
        out, result = _run(session, mod, device_type, args, evaluator_config, export, output_format)
        context = getattr(result, "context", None)
        if isinstance(context, dict) and not context.get("key"):
            context["key"] = "local"  # this machine, as the farm's key for host servers
        return out, result
    finally:
        session.close()


def _normalize_export(export_func: ExportFunc, output_format: str | None) -> tuple[Callable[[Any, str], Any], str]:
    """``export_func`` as a function ``(mod, path)``, and the file extension of what it writes."""
    from .. import cc

    def with_fcompile(fcompile: Any) -> Callable[[Any, str], Any]:
        return lambda mod, path: mod.export_library(path, fcompile=fcompile)

    if export_func == "tar":
        return with_fcompile(cc.create_tar), output_format or "tar"
    if export_func == "so":
        return (lambda mod, path: mod.export_library(path)), output_format or "so"
    if export_func == "ndk":
        return with_fcompile(cc.create_ndk_shared), output_format or "so"
    if isinstance(export_func, str) or not callable(export_func):
        raise ValueError(f"export_func must be 'tar', 'so', 'ndk' or a function, not {export_func!r}")
    fcompile_format = getattr(export_func, "output_format", None)
    if fcompile_format is not None:  # an fcompile(output, objects, ...) such as cc.cross_compiler(...)
        return with_fcompile(export_func), output_format or fcompile_format
    if output_format is None:
        raise ValueError("export_func is a function export_func(mod, path): say what it writes with "
                         "output_format='so' or 'tar'")
    return export_func, output_format


def _to_device(args: Sequence[Any], dev: Any) -> list[Any]:
    import numpy as np

    from ..runtime.tensors import Tensor, tensor

    sent: list[Any] = []
    for i, arg in enumerate(args):
        if isinstance(arg, (np.ndarray, Tensor)):
            sent.append(tensor(arg, dev))
        elif isinstance(arg, (bool, int, float, np.integer, np.floating)):
            sent.append(arg)
        elif hasattr(arg, "numpy"):  # an apache-tvm tensor, or another array library's
            sent.append(tensor(arg.numpy(), dev))
        else:
            raise ValueError(f"argument {i} is a {type(arg).__name__}: rpc_run takes numpy arrays, tensors, "
                             f"ints and floats")
    return sent


def _where(result: Any, session: Any) -> None:
    """Fill what ``result.context`` lacks (key, server, arch, target) from ``session``: the log's columns."""
    context = getattr(result, "context", None)
    if not isinstance(context, dict):
        return
    info = getattr(session, "info", None) or {}
    known = {"key": info.get("key"), "server": getattr(session, "address", None), "arch": info.get("arch"),
             "target": info.get("target")}
    for name, value in known.items():
        if not context.get(name) and value:
            context[name] = str(value)


def _run(session: Any, mod: Any, device_type: str, args: Sequence[Any], config: EvaluatorConfig,
         export: Callable[[Any, str], Any], output_format: str) -> tuple[list[Any], "BenchmarkResult"]:
    from ..runtime.tensors import Tensor

    if not hasattr(mod, "export_library"):
        raise TypeError(f"rpc_run runs a module with export_library (cc.build(...), an apache-tvm module), "
                        f"not a {type(mod).__name__}")
    dev = session.device(device_type, 0)
    remote_path = f"{ARTIFACT}.{output_format}"
    with tempfile.TemporaryDirectory(prefix="wb-run-") as tmp:
        artifact = os.path.join(tmp, remote_path)
        export(mod, artifact)
        if not os.path.isfile(artifact):
            raise RuntimeError(f"export_func wrote nothing at {artifact}: it must write the path it is given")
        session.upload(artifact, remote_path)
    try:
        remote_mod = session.load_module(remote_path)
        if remote_mod.entry_name is None:
            raise ValueError(f"the module has no entry function to run (it has {remote_mod.function_names}); "
                             f"give it a kernel named main, or build it with one kernel")
        sent = _to_device(args, dev)
        result = remote_mod.time_evaluator(
            remote_mod.entry_name, dev, number=config.number, repeat=config.repeat,
            min_repeat_ms=config.min_repeat_ms, cache_flush_bytes=config.cache_flush_bytes,
        )(*sent)
        _where(result, session)
        log.debug("%s on %s: %s", remote_mod.entry_name, session.name, result)
        return [a.numpy() if isinstance(a, Tensor) else a for a in sent], result
    finally:
        try:
            session.remove(remote_path)
        except Exception as exc:  # the session may have ended (a crashed kernel): its workspace went with it
            log.debug("could not remove %s from %s: %s", remote_path, session.name, exc)
