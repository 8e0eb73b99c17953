"""Per-session quotas: how much disk a session's workspace and how much memory its tensors may take.

A server starts every session with the same ``Quotas``; a request that would
go over one is refused (``QuotaExceededError``, BAD_REQUEST on the wire)
before anything is written or allocated, and the session goes on. Both
servers (this package's and minrpc) word the errors alike:

    >>> str(Quotas(workspace_bytes=4 << 30).workspace_bytes_error("upload of 2.0 GiB to 'w.bin'", 3 << 30))
    "upload of 2.0 GiB to 'w.bin' would put the session workspace over its 4.0 GiB quota (max_workspace_bytes / --max-workspace-bytes; 3.0 GiB used): remove files or start the server with a larger --max-workspace-bytes"

Sizes are given in bytes or with a binary suffix (``parse_size("512M")``); 0 is no limit.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from ..errors import QuotaExceededError

DEFAULT_WORKSPACE_BYTES = 4 << 30  # far over a tutorial's uploads and a benchmark's (under 1 GiB)
DEFAULT_WORKSPACE_FILES = 10_000  # files and directories of one session
MAX_TENSOR_DEFAULT_FRACTION = 2  # tensors may take 1/2 of the machine's memory (or of its cgroup's limit)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_MAX_SIZE = (1 << 63) - 1


def parse_size(value: Any, name: str = "size") -> int:
    """Bytes from an int or a string with an optional binary suffix (K, M, G, T, P; "iB"/"B" allowed).

        >>> parse_size("512M"), parse_size("4G"), parse_size("1.5k"), parse_size(0)
        (536870912, 4294967296, 1536, 0)

    Raises ValueError naming ``name`` and showing what it takes.
    """
    if isinstance(value, bool):
        value = None  # not a size: fall through to the error
    if isinstance(value, int) and 0 <= value <= _MAX_SIZE:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match:  # exact, as minrpc's mr_parse_size: the fraction's first 9 digits, rounded down
        whole, _, fraction = match.group(1).partition(".")
        unit = _UNITS[match.group(2).lower()]
        fraction = fraction[:9]
        number = int(whole) * unit + (int(fraction) * unit // 10 ** len(fraction) if fraction else 0)
        if number <= _MAX_SIZE:
            return number
    raise ValueError(f"{name} takes a size in bytes >= 0, or with a suffix such as 512M or 4G (0: no limit), "
                     f"not {value!r}")


def check_count(value: Any, name: str) -> int:
    """A count >= 0 (0: no limit) from an int or a string of digits, or ValueError naming ``name``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_SIZE:
        raise ValueError(f"{name} takes a whole number >= 0 (0: no limit), e.g. 10000, not {value!r}")
    return value


def format_size(n: int) -> str:
    """``n`` bytes for people, in binary units with one decimal (as minrpc prints it).

        >>> format_size(512), format_size(1536), format_size(4 << 30)
        ('512 bytes', '1.5 KiB', '4.0 GiB')
    """
    if n < 1024:
        return "1 byte" if n == 1 else f"{n} bytes"
    value, unit = float(n), 0
    while value >= 1024 and unit < 5:
        value /= 1024
        unit += 1
    return f"{value:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB')[unit]}"


def machine_memory() -> int:
    """This machine's memory in bytes, or its cgroup's limit when lower (0 if unknown)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 0
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or _MAX_SIZE):
            total = int(text)
        break
    return total


def default_tensor_bytes() -> int:
    """The default tensor quota of a session: half of this machine's memory (or of its cgroup's limit).

    0 (no limit) when the memory cannot be read. minrpc computes the same.
    """
    return machine_memory() // MAX_TENSOR_DEFAULT_FRACTION


def _bytes_error(what: str, limit: int, used: int, option: str, fix: str) -> str:
    return (f"{what} would put {fix[0]} over {fix[1]} {format_size(limit)} quota ({option} / --{option.replace('_', '-')}; "
            f"{format_size(used)} used): {fix[2]} or start the server with a larger --{option.replace('_', '-')}")


@dataclass(frozen=True)
class Quotas:
    """What one session may hold; 0 is no limit. ``Quotas()`` limits nothing (an in-process LocalSession).

        >>> Quotas.resolve(max_workspace_files=500).workspace_files
        500
    """

    workspace_bytes: int = 0  # bytes of files in the workspace, the private copies of loaded modules included
    workspace_files: int = 0  # files and directories in the workspace (and private copies of loaded modules)
    tensor_bytes: int = 0  # bytes of the tensors the client allocated (TENSOR_ALLOC)

    @classmethod
    def resolve(cls, max_workspace_bytes: Any = None, max_workspace_files: Any = None,
                max_tensor_bytes: Any = None, *, flags: bool = False) -> "Quotas":
        """The quotas from server options (None: the default; sizes as ``parse_size`` takes them).

        Raises ValueError naming the option (as a command-line flag with ``flags``) when a value is not a
        size (or a count).
        """
        def name(option: str) -> str:
            return "--" + option.replace("_", "-") if flags else option

        return cls(
            workspace_bytes=DEFAULT_WORKSPACE_BYTES if max_workspace_bytes is None
            else parse_size(max_workspace_bytes, name("max_workspace_bytes")),
            workspace_files=DEFAULT_WORKSPACE_FILES if max_workspace_files is None
            else check_count(max_workspace_files, name("max_workspace_files")),
            tensor_bytes=default_tensor_bytes() if max_tensor_bytes is None
            else parse_size(max_tensor_bytes, name("max_tensor_bytes")),
        )

    def worker_args(self) -> list[str]:
        """The command-line options that give a worker process (``python -m workbench.rpc.server.worker``) these quotas."""
        return ["--max-workspace-bytes", str(self.workspace_bytes), "--max-workspace-files",
                str(self.workspace_files), "--max-tensor-bytes", str(self.tensor_bytes)]

    # -- the errors (docs/protocol.md, "Quotas"; minrpc's workspace.c words them alike) --------------------
    def workspace_bytes_error(self, what: str, used: int) -> QuotaExceededError:
        """``what`` (an upload, a copy, an archive's expansion) would take the workspace over its byte quota."""
        return QuotaExceededError(_bytes_error(what, self.workspace_bytes, used, "max_workspace_bytes",
                                               ("the session workspace", "its", "remove files")))

    def workspace_files_error(self, what: str, used: int) -> QuotaExceededError:
        """``what`` would take the workspace over its quota of files and directories."""
        return QuotaExceededError(
            f"{what} would put the session workspace over its quota of {self.workspace_files} files and "
            f"directories (max_workspace_files / --max-workspace-files; {used} used): remove files or start the "
            "server with a larger --max-workspace-files")

    def tensor_bytes_error(self, what: str, used: int) -> QuotaExceededError:
        """``what`` (a tensor allocation) would take the session's tensors over their quota."""
        return QuotaExceededError(_bytes_error(what, self.tensor_bytes, used, "max_tensor_bytes",
                                               ("the session's tensors", "their", "free tensors")))
