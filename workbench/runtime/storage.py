"""Device memory on the serving side: tensors as DLPack DLTensors over mmap'd buffers."""
from __future__ import annotations

import ctypes
import math
import mmap
import sys
from typing import Any, Callable, Sequence

from ..errors import BadRequestError, RemoteError
from .buffers import HUGE_PAGE, MADV_HUGEPAGE
from .ffi import DLDataType, DLDevice, DLTensor

PAGE = mmap.PAGESIZE


class Memory:
    """A tensor's memory: a page-rounded private anonymous mapping (zero-filled), in huge pages from 2 MiB:
    a transfer into fresh memory then faults in 512x fewer pages (about 1.1x faster than into a memfd's
    fresh pages, whose allocation goes page by page)."""

    __slots__ = ("map",)

    def __init__(self, size: int):
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if size >= HUGE_PAGE and hasattr(self.map, "madvise"):
            self.map.madvise(MADV_HUGEPAGE)

    def close(self) -> None:
        """Unmap (unless something still views it: the GC unmaps it later)."""
        try:
            self.map.close()
        except BufferError:
            pass


class SpareMemory:
    """Memory of released tensors kept for the next tensor of the same size whose every byte a transfer
    writes (TENSOR_ALLOC with data), so that transfer does not wait for the kernel to fault in and zero
    fresh pages. Only this session's process reuses them; a tensor that asks for zeros never gets one.

    At most ``limit`` bytes (the oldest go first) and only of at least ``min_bytes``; memory something
    still views (a numpy array of a registered function) is never kept.
    """

    def __init__(self, limit: int = 256 << 20, min_bytes: int = 1 << 20):
        self.limit, self.min_bytes = limit, min_bytes
        self._kept: list[Memory] = []  # oldest first
        self.bytes = 0

    def take(self, size: int) -> Memory | None:
        for i, mem in enumerate(self._kept):
            if len(mem.map) == size:
                del self._kept[i]
                self.bytes -= size
                return mem
        return None

    def keep(self, mem: Memory) -> bool:
        """Keep ``mem`` (True), or leave it to the caller (False): too small or too large, or still viewed."""
        size = len(mem.map)
        if not self.min_bytes <= size <= self.limit or sys.getrefcount(mem.map) > 2:  # the Memory's, the argument's
            return False
        while self.bytes + size > self.limit:
            self.bytes -= len(self._kept[0].map)
            self._kept.pop(0).close()
        self._kept.append(mem)
        self.bytes += size
        return True


SPARE = SpareMemory()

# DLPack dtype codes
DL_INT, DL_UINT, DL_FLOAT, DL_BFLOAT, DL_COMPLEX, DL_BOOL = 0, 1, 2, 4, 5, 6
_CODE_NAMES = {DL_INT: "int", DL_UINT: "uint", DL_FLOAT: "float", DL_BFLOAT: "bfloat", DL_COMPLEX: "complex", DL_BOOL: "bool"}

# What a tensor description may say (checked before anything is allocated).
SUPPORTED_BITS: dict[int, frozenset[int]] = {
    DL_INT: frozenset(range(1, 65)),  # int1 .. int64
    DL_UINT: frozenset(range(1, 65)),
    DL_FLOAT: frozenset({8, 16, 32, 64}),
    DL_BFLOAT: frozenset({16}),
    DL_COMPLEX: frozenset({64, 128}),
    DL_BOOL: frozenset({1, 8}),
}
MAX_LANES = 1024  # vector lanes per element (DLPack allows up to 65535; no real device goes past this)
MAX_NDIM = 64  # as numpy
MAX_TENSOR_BYTES = 1 << 40  # the protocol's bulk limit: a tensor must fit in one bulk part
_I64_MAX = (1 << 63) - 1


def _int(value: Any) -> bool:
    return type(value) is int  # not bool, not float: a description is exact or refused


def check_dtype(dtype: Any) -> tuple[int, int, int]:
    """``(code, bits, lanes)`` from a DLPack ``[code, bits, lanes]``, or BadRequestError saying what is allowed.

        >>> check_dtype([2, 32, 1])
        (2, 32, 1)
    """
    if not isinstance(dtype, (list, tuple)) or len(dtype) != 3 or not all(_int(x) for x in dtype):
        raise BadRequestError(f"a dtype is [code, bits, lanes] (three ints, e.g. [2, 32, 1] for float32), not {dtype!r:.100}")
    code, bits, lanes = dtype
    if code not in SUPPORTED_BITS:
        known = ", ".join(f"{c} ({n})" for c, n in _CODE_NAMES.items())
        raise BadRequestError(f"dtype code {code} is not supported; codes: {known}")
    if bits not in SUPPORTED_BITS[code]:
        allowed = sorted(SUPPORTED_BITS[code])
        span = f"{allowed[0]}..{allowed[-1]}" if len(allowed) > 8 else ", ".join(map(str, allowed))
        raise BadRequestError(f"{_CODE_NAMES[code]} tensors of {bits} bits are not supported; bits: {span}")
    if not 1 <= lanes <= MAX_LANES:
        raise BadRequestError(f"dtype lanes must be 1..{MAX_LANES}, not {lanes}")
    return code, bits, lanes


def check_shape(shape: Any) -> list[int]:
    """The shape as a list of ints, or BadRequestError (at most MAX_NDIM dimensions, each >= 0)."""
    if not isinstance(shape, (list, tuple)) or not all(_int(s) for s in shape):
        raise BadRequestError(f"a shape is a list of ints (e.g. [2, 3]), not {shape!r:.100}")
    if len(shape) > MAX_NDIM:
        raise BadRequestError(f"a tensor has at most {MAX_NDIM} dimensions, this one {len(shape)}")
    if any(s < 0 or s > _I64_MAX for s in shape):
        raise BadRequestError(f"tensor dimensions must be 0..2**63-1, not {list(shape)!r:.100}")
    return list(shape)


def dtype_name(code: int, bits: int, lanes: int) -> str:
    base = "bool" if code == DL_BOOL else f"{_CODE_NAMES.get(code, f'code{code}')}{bits}"
    return base if lanes == 1 else f"{base}x{lanes}"


class DeviceTensor:
    """A tensor in this session's memory (page-aligned, zero-filled)."""

    def __init__(self, shape: Sequence[int], dtype: Sequence[int], device: tuple[int, int],
                 admit: Callable[["DeviceTensor"], None] | None = None, overwritten: bool = False):
        """Allocate the tensor; ``admit(self)``, when given, runs once its size is known and before any memory
        is taken (a session's tensor quota raises there). ``overwritten``: every byte is written next (a
        transfer), so the memory of a released tensor may serve (``SPARE``); otherwise it is zero-filled."""
        shape, code, bits, lanes = self._describe(shape, dtype, admit)
        size = max(-(-self.nbytes // PAGE) * PAGE, PAGE)
        memory = SPARE.take(size) if overwritten else None
        if memory is None:
            try:
                memory = Memory(size)
            except (OSError, OverflowError, ValueError) as exc:
                raise RemoteError(
                    f"cannot allocate a {self.dtype} tensor of {self.nbytes} bytes on this device "
                    f"({getattr(exc, 'strerror', None) or exc}); free tensors or use a smaller one"
                ) from None
        self._memory = memory
        self._mem = memory.map
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

    def _describe(self, shape: Sequence[int], dtype: Sequence[int],
                  admit: Callable[["DeviceTensor"], None] | None) -> tuple[list[int], int, int, int]:
        """Check and set ``shape``, ``dtype``, ``itemsize``, ``nbytes`` (every device's tensors), then ``admit``."""
        shape = check_shape(shape)
        code, bits, lanes = check_dtype(dtype)
        self.shape = tuple(shape)
        self.dtype = dtype_name(code, bits, lanes)
        self.itemsize = (bits * lanes + 7) // 8
        self.nbytes = math.prod(shape) * self.itemsize
        if self.nbytes > MAX_TENSOR_BYTES:
            raise BadRequestError(
                f"a {self.dtype} tensor of shape {self.shape} needs {self.nbytes} bytes, over the "
                f"{MAX_TENSOR_BYTES}-byte limit of one tensor; split it"
            )
        if admit is not None:
            admit(self)
        return shape, code, bits, lanes

    def view(self) -> memoryview:
        return memoryview(self._mem)[: self.nbytes]

    # what the requests do with a tensor, whatever its device (an OpenCL tensor: runtime/opencl.py CLTensor)
    def receive(self, bulk: Any) -> None:
        """TENSOR_WRITE (and TENSOR_ALLOC with data): read the request's bulk part into the tensor."""
        bulk.read_into(memoryview(self._mem)[: self.nbytes])

    def contents(self) -> memoryview:
        """TENSOR_READ: the tensor's bytes, valid until the session's next request."""
        return memoryview(self._mem)[: self.nbytes]

    def numpy(self):
        """A numpy array over this tensor's memory (for registered Python functions)."""
        import numpy as np

        return np.frombuffer(self._mem, dtype=self.dtype if self.dtype != "bool" else np.bool_, count=math.prod(self.shape)).reshape(self.shape)

    def release(self) -> None:
        if self._mem is not None and not self._mem.closed:
            del self._anchor
            memory, self._memory, self._mem = self._memory, None, None
            if not SPARE.keep(memory):
                memory.close()

    def __repr__(self) -> str:
        return f"<DeviceTensor shape={self.shape} dtype={self.dtype}>"
