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

import os
import shutil
import tempfile
from typing import BinaryIO, Callable

from ..errors import BadRequestError, PathDeniedError


class Workspace:
    """``base/files`` is what the client sees; ``base/lib`` holds private copies of loaded modules."""

    def __init__(self, base: str | None = None):
        self.base = os.path.realpath(base or tempfile.mkdtemp(prefix="wb-session-"))
        self.root = os.path.join(self.base, "files")
        self.private = os.path.join(self.base, "lib")
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.private, exist_ok=True)
        self._serial = 0

    def private_path(self, name: str) -> str:
        """A new, never reused path for ``name`` in the private directory."""
        self._serial += 1
        return os.path.join(self.private, f"{self._serial}-{os.path.basename(name)}")

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

    def write(self, path: str, writer: Callable[[int], None]) -> str:
        """Create ``path`` with what ``writer(fd)`` writes to the open file descriptor.

        The file is written beside its target and renamed over it, so a module
        loaded from the old file is never modified under its feet.
        """
        full = self.resolve(path)
        if full == self.root:
            raise PathDeniedError("cannot write over the workspace directory itself; name a file")
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(full), prefix=".upload-")
        try:
            try:
                writer(fd)
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.replace(tmp, full)
        except BaseException:
            os.unlink(tmp)
            raise
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
        shutil.rmtree(self.base, ignore_errors=True)
