"""Large receive buffers without zero-filling, on huge pages where the kernel allows.

On a machine whose kernel gives transparent huge pages only on request
(``madvise`` mode, the common default), a 64 MiB ``bytearray(n)`` costs 16,384
page faults plus a zero-fill before a single byte is received; asking for huge
pages and skipping the fill makes receiving several times faster. Receiving
into a buffer the program already dropped is faster still: ``RECYCLER`` hands
out large receive buffers and takes each back once nothing references it.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
import threading

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


class Recycler:
    """Large receive buffers that come back once the program drops them (a download or an array it no
    longer holds), so the next receive of that size writes memory that is already there instead of
    fresh pages the kernel must fault in and zero.

    Holds at most ``limit`` bytes of buffers it handed out, dropping the oldest first; sizes under
    ``min_bytes`` or over ``limit`` are plain ``receive_buffer``s.

        >>> buf = RECYCLER.get(64 << 20)       # doctest: +SKIP
    """

    def __init__(self, limit: int = 256 << 20, min_bytes: int = 1 << 20):
        self.limit, self.min_bytes = limit, min_bytes
        self._out: list[bytearray] = []  # handed out, the oldest first
        self._lock = threading.Lock()

    def get(self, size: int) -> bytearray:
        """A ``bytearray`` of ``size`` bytes, contents undefined (to be overwritten by a receive)."""
        if not self.min_bytes <= size <= self.limit:
            return receive_buffer(size)
        with self._lock:
            for i in range(len(self._out)):
                buf = self._out[i]
                if len(buf) == size and sys.getrefcount(buf) == 3:  # the list, the name, the argument
                    del self._out[i]
                    self._out.append(buf)
                    return buf
            held = sum(map(len, self._out))
            while self._out and held + size > self.limit:
                held -= len(self._out.pop(0))
            buf = receive_buffer(size)
            self._out.append(buf)
            return buf


RECYCLER = Recycler()
