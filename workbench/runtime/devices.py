"""Devices: DLPack device type codes and the Device handle.

    >>> from workbench import runtime
    >>> runtime.cpu(0)
    cpu(0)
"""
from __future__ import annotations

from typing import Any

# DLPack DLDeviceType codes.
DEVICE_TYPES: dict[str, int] = {
    "cpu": 1,
    "llvm": 1,
    "c": 1,
    "cuda": 2,
    "gpu": 2,
    "cuda_host": 3,
    "cl": 4,
    "opencl": 4,
    "vulkan": 7,
    "metal": 8,
    "vpi": 9,
    "rocm": 10,
    "ext_dev": 12,
    "webgpu": 15,
    "hexagon": 16,
}
DEVICE_NAMES: dict[int, str] = {
    1: "cpu",
    2: "cuda",
    3: "cuda_host",
    4: "cl",
    7: "vulkan",
    8: "metal",
    9: "vpi",
    10: "rocm",
    12: "ext_dev",
    15: "webgpu",
    16: "hexagon",
}


def device_type_code(dev_type: int | str) -> int:
    """The DLPack code for a device type given as a code or a name ("cpu", "cuda", "cl", ...)."""
    if isinstance(dev_type, bool):
        raise TypeError("device type must be an int code or a name such as 'cpu'")
    if isinstance(dev_type, int):
        if dev_type not in DEVICE_NAMES:
            raise ValueError(
                f"unknown device type code {dev_type}; known codes: "
                + ", ".join(f"{c} ({n})" for c, n in sorted(DEVICE_NAMES.items()))
            )
        return dev_type
    if isinstance(dev_type, str):
        name = dev_type.split()[0].lower()
        if name in DEVICE_TYPES:
            return DEVICE_TYPES[name]
        raise ValueError(
            f"unknown device type {dev_type!r}; known names: " + ", ".join(sorted(set(DEVICE_TYPES)))
        )
    raise TypeError(f"device type must be an int code or a name such as 'cpu', not {type(dev_type).__name__}")


def device_name(device_type: int, device_id: int) -> str:
    return f"{DEVICE_NAMES.get(device_type, f'device_type_{device_type}')}({device_id})"


class Device:
    """A device on a session: ``session`` is None for this process's own CPU.

    Get remote devices from a session (``remote.cpu(0)``); local ones from
    ``workbench.runtime.cpu()``.
    """

    __slots__ = ("device_type", "device_id", "session")

    def __init__(self, device_type: int | str, device_id: int = 0, session: Any = None):
        self.device_type = device_type_code(device_type)
        if not isinstance(device_id, int) or device_id < 0:
            raise ValueError(f"device id must be an int >= 0, not {device_id!r}")
        self.device_id = device_id
        self.session = session

    @property
    def name(self) -> str:
        return DEVICE_NAMES.get(self.device_type, str(self.device_type))

    def sync(self) -> None:
        """Wait until the device has finished the work sent to it, as TVM's ``Device.sync()``.

        Kernels run to completion within their call on every device workbench
        serves, so this is one round trip to a remote device (which also tells
        a lost session at once), and nothing for this process's CPU.

            >>> dev = remote.cpu(0)                                 # doctest: +SKIP
            >>> f(a, b); dev.sync()                                 # doctest: +SKIP
        """
        ping = getattr(self.session, "ping", None)
        if ping is not None:
            ping()

    # -- attributes, under TVM's names (published by the server: info["device_details"]) ------------------
    def _details(self) -> dict[str, Any] | None:
        info = getattr(self.session, "info", None)
        if not isinstance(info, dict):
            return {} if self.session is None and self.device_type == 1 else None  # this process's CPU
        where = [self.device_type, self.device_id]
        if where not in [list(d) for d in info.get("devices", [])]:
            return None
        for entry in info.get("device_details") or []:
            if isinstance(entry, dict) and entry.get("device") == where:
                return entry
        return {}

    @property
    def exist(self) -> bool:
        """Whether the session's server has this device (TVM's ``Device.exist``).

            >>> remote.cl(0).exist                                   # doctest: +SKIP
            True
        """
        return self._details() is not None

    def _attr(self, name: str) -> Any:
        details = self._details()
        return None if details is None else details.get(name)

    @property
    def device_name(self) -> str | None:
        """The device's name (``"pthread-skylake-avx512-..."`` for PoCL); None where the server does not say."""
        return self._attr("device_name")

    @property
    def multi_processor_count(self) -> int | None:
        """Compute units (OpenCL's CL_DEVICE_MAX_COMPUTE_UNITS)."""
        return self._attr("multi_processor_count")

    @property
    def max_threads_per_block(self) -> int | None:
        """The largest work-group (OpenCL's CL_DEVICE_MAX_WORK_GROUP_SIZE)."""
        return self._attr("max_threads_per_block")

    @property
    def max_thread_dimensions(self) -> list[int] | None:
        return self._attr("max_thread_dimensions")

    @property
    def max_shared_memory_per_block(self) -> int | None:
        """Local memory per work-group, in bytes."""
        return self._attr("max_shared_memory_per_block")

    @property
    def total_global_memory(self) -> int | None:
        """The device's memory, in bytes."""
        return self._attr("total_global_memory")

    @property
    def max_clock_rate(self) -> int | None:
        """In MHz, as OpenCL reports it."""
        return self._attr("max_clock_rate")

    @property
    def compute_version(self) -> str | None:
        return self._attr("compute_version")

    @property
    def driver_version(self) -> str | None:
        return self._attr("driver_version")

    @property
    def warp_size(self) -> int | None:
        return self._attr("warp_size")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Device)
            and (self.device_type, self.device_id) == (other.device_type, other.device_id)
            and self.session is other.session
        )

    def __hash__(self) -> int:
        return hash((self.device_type, self.device_id, id(self.session)))

    def __repr__(self) -> str:
        text = device_name(self.device_type, self.device_id)
        if self.session is not None and getattr(self.session, "is_remote", False):
            return f"remote[{self.session.address}].{text}"
        return text


def cpu(dev_id: int = 0) -> Device:
    """This process's CPU (tensors on it live in an in-process LocalSession)."""
    return Device("cpu", dev_id)
