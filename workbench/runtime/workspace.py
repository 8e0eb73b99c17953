"""The session workspace: the one directory a client's paths may touch.

Every path a client sends is relative to the workspace; absolute paths, ``..``
and symlinks that lead outside are refused. The directory is removed when the
session ends.

    >>> ws = Workspace()
    >>> ws.resolve("lib/add.so").startswith(ws.root)
    True
    >>> ws.cleanup()
"""
from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from typing import BinaryIO, Callable

from ..errors import BadRequestError, PathDeniedError


class Workspace:
    def __init__(self, root: str | None = None):
        self.root = os.path.realpath(root or tempfile.mkdtemp(prefix="wb-session-"))
        os.makedirs(self.root, exist_ok=True)

    def resolve(self, path: str) -> str:
        """The absolute path for a client path, or PathDeniedError if it leaves the workspace."""
        if not isinstance(path, str) or not path:
            raise BadRequestError(f"a remote path must be a non-empty string, not {path!r}")
        if "\0" in path:
            raise PathDeniedError(f"remote path {path!r} contains a NUL byte")
        if os.path.isabs(path) or path.startswith("~"):
            raise PathDeniedError(
                f"{path!r} is an absolute path; remote paths are relative to the session "
                f"workspace, e.g. {os.path.basename(path) or 'lib.so'!r}"
            )
        if ".." in path.replace("\\", "/").split("/"):
            raise PathDeniedError(f"{path!r} uses '..'; remote paths must stay inside the session workspace")
        real = os.path.realpath(os.path.join(self.root, path))
        if real != self.root and not real.startswith(self.root + os.sep):
            raise PathDeniedError(f"{path!r} leads outside the session workspace (through a symlink)")
        return real

    def write(self, path: str, size: int, fill: Callable[[memoryview], None]) -> str:
        """Create ``path`` of ``size`` bytes, letting ``fill`` write straight into it."""
        full = self.resolve(path)
        if full == self.root:
            raise PathDeniedError("cannot write over the workspace directory itself; name a file")
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            if size:
                os.ftruncate(fd, size)
                with mmap.mmap(fd, size) as mm:
                    view = memoryview(mm)
                    try:
                        fill(view)
                    finally:
                        view.release()
        except BaseException:
            os.close(fd)
            os.unlink(full)
            raise
        os.close(fd)
        return full

    def open_read(self, path: str) -> tuple[BinaryIO, int]:
        full = self.resolve(path)
        if os.path.isdir(full):
            raise BadRequestError(f"{path!r} is a directory; download a file (listdir shows what is there)")
        if not os.path.exists(full):
            raise FileNotFoundError(f"no file {path!r} in the session workspace (listdir shows what is there)")
        f = open(full, "rb")
        return f, os.fstat(f.fileno()).st_size

    def remove(self, path: str) -> None:
        full = self.resolve(path)
        if full == self.root:
            raise PathDeniedError("cannot remove the workspace directory itself")
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        elif os.path.lexists(full):
            os.unlink(full)
        else:
            raise FileNotFoundError(f"no file {path!r} in the session workspace")

    def listdir(self, path: str = ".") -> list[str]:
        full = self.resolve(path)
        if not os.path.isdir(full):
            raise FileNotFoundError(f"no directory {path!r} in the session workspace")
        return sorted(os.listdir(full))

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
