"""Large receive buffers without zero-filling, on huge pages where the kernel allows.

On a machine whose kernel gives transparent huge pages only on request
(``madvise`` mode, the common default), a 64 MiB ``bytearray(n)`` costs 16,384
page faults plus a zero-fill before a single byte is received; asking for huge
pages and skipping the fill makes receiving several times faster.
"""
from __future__ import annotations

import ctypes
import mmap

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_resize = ctypes.pythonapi.PyByteArray_Resize
_resize.argtypes = [ctypes.py_object, ctypes.c_ssize_t]
_resize.restype = ctypes.c_int
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not Linux
    _madvise = None


def advise_huge_pages(address: int, size: int) -> None:
    """Ask for huge pages over the whole 2 MiB pages inside ``[address, address+size)``."""
    if _madvise is None or size < 2 * HUGE_PAGE:
        return
    start = (address + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = (address + size) & ~(HUGE_PAGE - 1)
    if end > start:
        _madvise(start, end - start, MADV_HUGEPAGE)  # advice only: failure is harmless


def receive_buffer(size: int) -> bytearray:
    """A ``bytearray`` of ``size`` bytes whose contents are undefined, to be overwritten by a receive."""
    buf = bytearray()
    if size:
        if _resize(buf, size) != 0:
            raise MemoryError(f"cannot allocate a {size}-byte receive buffer")
        advise_huge_pages(ctypes.addressof(ctypes.c_char.from_buffer(buf)), size)
    return buf
