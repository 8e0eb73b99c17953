"""The device table: what each device type gives the serving side.

A device type is one ``DeviceAPI``: the devices it has (with their attributes,
under TVM's names), how to allocate a tensor there (the tensor object then
copies in and out, ``DeviceTensor.receive`` / ``contents``), how to wait for
the work calls enqueued (``sync``), and how to time calls on the device
(``timer``). The CPU and OpenCL fill it; the next device type (CUDA, Vulkan)
is one more entry in ``_APIS``, not a fork of the handler.

The CPU's row is what the handler always did (mmap'd tensors, kernels that run
to completion, the C timing loop); the handler takes its fast path for it and
asks this table only for other devices. Nothing here opens a device driver:
the OpenCL row loads ``runtime.opencl`` on first use.

    >>> published()[0]
    (1, 0)
    >>> api(1).name
    'cpu'
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

from ..errors import DeviceNotFoundError
from .storage import DeviceTensor

CPU, OPENCL = 1, 4

# Functions the handler calls after each CALL: a device type whose calls only enqueue work adds its wait here
# when it first runs something (empty for a CPU-only session: the check costs one truthiness test).
SYNC: list[Callable[[], None]] = []


def wait_after_calls(finish: Callable[[], None]) -> None:
    """Make the handler call ``finish`` after each CALL from now on (once, however often it is asked)."""
    if finish not in SYNC:
        SYNC.append(finish)


class DeviceAPI:
    """One device type's row of the table (the CPU's: see ``CPUAPI``)."""

    name = ""
    type_code = 0

    def devices(self) -> list[dict[str, Any]]:
        """Each device's attributes: ``{"device": [type, id], "exist": True, "device_name": ..., ...}``."""
        raise NotImplementedError

    def tensor(self, shape: Sequence[int], dtype: Sequence[int], device: tuple[int, int],
               admit: Callable[[DeviceTensor], None] | None = None, zero: bool = True) -> DeviceTensor:
        """A new tensor on ``device`` (zero-filled unless ``zero`` is False: its bytes are about to arrive)."""
        raise NotImplementedError

    def timer(self, device_id: int, calls: Callable[[int], None]) -> Callable[[int], float] | None:
        """``run(n)`` for ``time_repeats`` timing ``calls(n)`` on the device, or None for the wall clock."""
        return None


class CPUAPI(DeviceAPI):
    name, type_code = "cpu", CPU

    def devices(self) -> list[dict[str, Any]]:
        return [{"device": [CPU, 0], "exist": True}]

    def tensor(self, shape, dtype, device, admit=None, zero=True) -> DeviceTensor:
        return DeviceTensor(shape, dtype, device, admit)  # mmap'd: zero-filled for free


class OpenCLAPI(DeviceAPI):
    """OpenCL devices (``runtime.opencl``): listed from a forked probe, opened in the session worker."""

    name, type_code = "cl", OPENCL

    def devices(self) -> list[dict[str, Any]]:
        from .opencl import published_devices

        return published_devices()

    def tensor(self, shape, dtype, device, admit=None, zero=True) -> DeviceTensor:
        from .opencl import CLTensor

        from .opencl import runtime

        tensor = CLTensor(shape, dtype, device, admit, zero=zero)
        wait_after_calls(runtime().finish)
        return tensor

    def timer(self, device_id: int, calls: Callable[[int], None]) -> Callable[[int], float] | None:
        from .opencl import runtime

        rt = runtime()
        wait_after_calls(rt.finish)
        return rt.timed(rt.device(device_id), calls)


_APIS: dict[int, DeviceAPI] = {CPU: CPUAPI(), OPENCL: OpenCLAPI()}
_published: tuple[tuple[int, int], ...] | None = None
_details: list[dict[str, Any]] = []
_lock = threading.Lock()


def api(device_type: int) -> DeviceAPI:
    """The row of ``device_type``; DeviceNotFoundError for a type no row serves."""
    row = _APIS.get(device_type)
    if row is None:
        raise DeviceNotFoundError(f"this server serves no device of type {device_type}")
    return row


def published() -> tuple[tuple[int, int], ...]:
    """``((type, id), ...)`` of every device this process serves, the CPU first (listed once per process)."""
    global _published, _details
    if _published is None:
        with _lock:
            if _published is None:
                found: list[dict[str, Any]] = []
                for row in _APIS.values():
                    found += row.devices()
                _details = [d for d in found if d["device"][0] != CPU]
                _published = tuple(tuple(d["device"]) for d in found)  # type: ignore[misc]
    return _published


def details() -> list[dict[str, Any]]:
    """The attributes of the devices besides the CPU, as published (``info["device_details"]``)."""
    published()
    return _details
