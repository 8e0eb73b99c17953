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
import os
import sys
import threading
from typing import Any

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


def memfd_map(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A new memfd of ``size`` bytes (reading as zeros) and a shared writable mapping of it; OSError if
    either cannot be had (nothing is left open then)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise


class FileBuffer:
    """A receive buffer over a memfd: a transfer is spliced into ``fd`` (into the file's pages, like a file
    upload: faster than a receive into memory), the program reads it through ``map``.

        >>> buf = FileBuffer(1 << 20)          # doctest: +SKIP
    """

    __slots__ = ("map", "fd")

    def __init__(self, size: int):
        self.fd, self.map = memfd_map("workbench-receive", size)

    def fileno(self) -> int:
        os.lseek(self.fd, 0, os.SEEK_SET)  # each receive fills it from the start
        return self.fd

    def forget(self) -> None:
        """Close the memfd; ``map`` stays valid for whoever still views it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Recycler:
    """Large receive buffers that come back once the program drops them (a download or an array it no
    longer holds), so the next receive of that size writes memory that is already there instead of
    fresh pages the kernel must fault in and zero.

    Holds at most ``limit`` bytes (and ``max_files`` memfds) of buffers it handed out, dropping the
    oldest first; sizes under ``min_bytes`` or over ``limit`` are plain ``receive_buffer``s.

        >>> buf = RECYCLER.get(64 << 20)       # doctest: +SKIP
    """

    def __init__(self, limit: int = 256 << 20, min_bytes: int = 1 << 20, max_files: int = 16):
        self.limit, self.min_bytes, self.max_files = limit, min_bytes, max_files
        self._out: list[bytearray | FileBuffer] = []  # handed out, the oldest first
        self._lock = threading.Lock()

    def get(self, size: int) -> bytearray:
        """A ``bytearray`` of ``size`` bytes, contents undefined (to be overwritten by a receive)."""
        if not self.min_bytes <= size <= self.limit:
            return receive_buffer(size)
        return self._get(size, bytearray)

    def get_file(self, size: int) -> FileBuffer | bytearray:
        """A ``FileBuffer`` of ``size`` bytes to receive into by splicing (a ``bytearray`` where memfds are
        not to be had, or for sizes ``get`` would not keep)."""
        if not self.min_bytes <= size <= self.limit or not hasattr(os, "memfd_create"):
            return self.get(size)
        try:
            return self._get(size, FileBuffer)
        except OSError:  # out of descriptors: a plain buffer
            return self.get(size)

    def _get(self, size: int, kind: type) -> Any:
        with self._lock:
            for i in range(len(self._out)):
                buf = self._out[i]
                if type(buf) is kind and _free(buf, size):
                    del self._out[i]
                    self._out.append(buf)
                    return buf
            held = sum(map(_size, self._out))
            files = sum(type(b) is FileBuffer for b in self._out)
            while self._out and (held + size > self.limit or (kind is FileBuffer and files >= self.max_files)):
                old = self._out.pop(0)
                held -= _size(old)
                if type(old) is FileBuffer:
                    files -= 1
                    old.forget()
            buf = receive_buffer(size) if kind is bytearray else FileBuffer(size)
            self._out.append(buf)
            return buf


def _size(buf: bytearray | FileBuffer) -> int:
    return len(buf) if type(buf) is bytearray else len(buf.map)


def _free(buf: bytearray | FileBuffer, size: int) -> bool:
    """Whether ``buf`` has ``size`` bytes and nothing but the recycler references it (nor its mapping)."""
    if type(buf) is bytearray:
        return len(buf) == size and sys.getrefcount(buf) == 4  # the list, the two callers' names, the argument
    return len(buf.map) == size and sys.getrefcount(buf.map) == 2  # the buffer's slot, the argument


RECYCLER = Recycler()
