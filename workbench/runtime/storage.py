"""Device memory on the serving side: tensors as DLPack DLTensors over mmap'd buffers."""
from __future__ import annotations

import ctypes
import math
import mmap
from typing import Sequence

from ..errors import BadRequestError
from .ffi import DLDataType, DLDevice, DLTensor

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)

# DLPack dtype codes
DL_INT, DL_UINT, DL_FLOAT, DL_BFLOAT, DL_COMPLEX, DL_BOOL = 0, 1, 2, 4, 5, 6
_CODE_NAMES = {DL_INT: "int", DL_UINT: "uint", DL_FLOAT: "float", DL_BFLOAT: "bfloat", DL_COMPLEX: "complex", DL_BOOL: "bool"}


def dtype_name(code: int, bits: int, lanes: int) -> str:
    base = "bool" if code == DL_BOOL else f"{_CODE_NAMES.get(code, f'code{code}')}{bits}"
    return base if lanes == 1 else f"{base}x{lanes}"


class DeviceTensor:
    """A tensor in this session's memory (page-aligned, zero-filled)."""

    def __init__(self, shape: Sequence[int], dtype: Sequence[int], device: tuple[int, int]):
        try:
            shape = [int(s) for s in shape]
            code, bits, lanes = (int(x) for x in dtype)
        except (TypeError, ValueError):
            raise BadRequestError(f"bad tensor description: shape={shape!r} dtype={dtype!r}") from None
        if any(s < 0 for s in shape) or bits <= 0 or lanes <= 0:
            raise BadRequestError(f"bad tensor description: shape={shape}, dtype bits={bits} lanes={lanes}")
        self.shape = tuple(shape)
        self.dtype = dtype_name(code, bits, lanes)
        self.itemsize = (bits * lanes + 7) // 8
        self.nbytes = math.prod(shape) * self.itemsize
        self._mem = mmap.mmap(-1, max(self.nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if self.nbytes >= HUGE_PAGE and hasattr(self._mem, "madvise"):
            self._mem.madvise(MADV_HUGEPAGE)  # 512x fewer page faults when the tensor is first written
        self._anchor = ctypes.c_char.from_buffer(self._mem)
        self._shape = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        self.dltensor = DLTensor(
            data=ctypes.addressof(self._anchor),
            device=DLDevice(*device),
            ndim=len(shape),
            dtype=DLDataType(code, bits, lanes),
            shape=self._shape,
            strides=None,
            byte_offset=0,
        )

    def view(self) -> memoryview:
        return memoryview(self._mem)[: self.nbytes]

    def numpy(self):
        """A numpy array over this tensor's memory (for registered Python functions)."""
        import numpy as np

        return np.frombuffer(self._mem, dtype=self.dtype if self.dtype != "bool" else np.bool_, count=math.prod(self.shape)).reshape(self.shape)

    def release(self) -> None:
        if self._mem is not None and not self._mem.closed:
            del self._anchor
            try:
                self._mem.close()
            except BufferError:  # a numpy view still exists; the GC frees it later
                pass

    def __repr__(self) -> str:
        return f"<DeviceTensor shape={self.shape} dtype={self.dtype}>"
