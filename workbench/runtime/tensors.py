"""Tensors that live on a session's device.

    >>> import numpy as np
    >>> from workbench import rpc, runtime
    >>> dev = rpc.LocalSession().cpu(0)
    >>> a = runtime.tensor(np.arange(3, dtype="float32"), dev)
    >>> a.numpy()
    array([0., 1., 2.], dtype=float32)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .buffers import RECYCLER
from .devices import Device
from .storage import SUPPORTED_BITS

_KIND_CODES = {"i": 0, "u": 1, "f": 2, "c": 5, "b": 6}
TENSOR_ALLOC, TENSOR_WRITE, TENSOR_READ = 26, 27, 28  # protocol kinds (workbench.rpc.wire.protocol.Kind)


def dl_dtype(dtype: Any) -> list[int]:
    """DLPack [code, bits, lanes] for a numpy dtype."""
    dt = np.dtype(dtype)
    code = _KIND_CODES.get(dt.kind)
    if code is None or dt.itemsize * 8 not in SUPPORTED_BITS[code]:
        raise TypeError(f"dtype {dt} cannot live on a device; use a numeric or bool dtype (float32, int8, ...)")
    return [code, dt.itemsize * 8, 1]


def _session_of(device: Device | None) -> Any:
    if not isinstance(device, Device):
        raise TypeError(f"expected a device such as remote.cpu(0), got {device!r}")
    if device.session is None:
        raise ValueError(
            f"{device!r} is not a session device: take it from a session, e.g. "
            "rpc.LocalSession().cpu(0) for this process or remote.cpu(0) for a server"
        )
    device.session._check_device(device)
    return device.session


def _bytes_view(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")


class Tensor:
    """A tensor on a session's device; its memory is freed when this object is collected."""

    def __init__(self, session: Any, handle: Any, shape: Sequence[int], dtype: Any, device: Device):
        self.session = session
        self._wb_handle = handle
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.device = device
        session._track(self, handle)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def numpy(self) -> np.ndarray:
        """Copy the tensor to a new local numpy array."""
        if not self.nbytes:
            return np.empty(self.shape, self.dtype)
        # into huge pages, reused once the program drops the array (buffers.RECYCLER)
        out = np.frombuffer(RECYCLER.get(self.nbytes), self.dtype, self.size).reshape(self.shape)
        self.session._request(TENSOR_READ, [self._wb_handle], recv=lambda size, _v: _bytes_view(out))
        return out

    def copyfrom(self, source: Any) -> "Tensor":
        """Overwrite the tensor with ``source`` (array-like of the same shape, or a tensor of any session)."""
        if isinstance(source, Tensor):
            source = source.numpy()  # through this process: never a handle of one session sent to another
        arr = np.ascontiguousarray(source, dtype=self.dtype)
        if arr.shape != self.shape:
            raise ValueError(f"copyfrom: source has shape {arr.shape}, the tensor has shape {self.shape}")
        self.session._request(TENSOR_WRITE, [self._wb_handle], bulk=_bytes_view(arr))
        return self

    def copyto(self, target: "Tensor | Device") -> "Tensor":
        """Copy into another tensor, or to a new tensor on ``target`` device (of this or another session)."""
        if isinstance(target, Device):
            return tensor(self.numpy(), target)
        if not isinstance(target, Tensor):
            raise TypeError(f"copyto takes a tensor or a device, not {type(target).__name__}")
        return target.copyfrom(self.numpy())

    def asnumpy(self) -> np.ndarray:
        return self.numpy()

    def __repr__(self) -> str:
        return f"<Tensor shape={self.shape} dtype={self.dtype} device={self.device!r}>"


def tensor(arr: Any, device: Device) -> Tensor:
    """Copy an array-like (or a tensor of any session) to a new tensor on ``device`` (one round trip)."""
    session = _session_of(device)
    data = np.ascontiguousarray(arr.numpy() if isinstance(arr, Tensor) else arr)
    handle = session._request(
        TENSOR_ALLOC,
        [list(data.shape), dl_dtype(data.dtype), device.device_type, device.device_id],
        bulk=_bytes_view(data) if data.nbytes else None,
    )
    return Tensor(session, handle, data.shape, data.dtype, device)


def empty(shape: int | Sequence[int], dtype: Any = "float32", device: Device | None = None) -> Tensor:
    """A new zero-filled tensor on ``device``."""
    session = _session_of(device)
    shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    handle = session._request(TENSOR_ALLOC, [list(shape), dl_dtype(dtype), device.device_type, device.device_id])
    return Tensor(session, handle, shape, dtype, device)
