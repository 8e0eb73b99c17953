"""The server's tokens out of a kernel's reach (docs/protocol.md, "Tokens and kernels").

The serve process holds the tokens (it runs the handshakes and registers with
trackers and proxies); with a token it is not dumpable, so no process of its
user reads its memory or environment through /proc. A session's worker,
forked from it, wipes every copy of the tokens from its own memory (the heap,
the environment block and the command line on its stack) before it serves a
request, and gives up CAP_SYS_PTRACE, so that a kernel running as root cannot
read its parent's either. What remains: a kernel can still ptrace or read
processes of its user that are dumpable (other users' sessions are other
workers of this server: not dumpable); run servers as their own user.

    >>> hide_from_kernels("s3cret", None, worker=True)    # doctest: +SKIP   (in a worker after fork)
"""
from __future__ import annotations

import logging

from ..service.process import TOKEN_VARIABLES

log = logging.getLogger(__name__)

try:
    from ...runtime import _shim
except ImportError:  # built without the shim: nothing to do it with
    _shim = None


def hide_from_kernels(*tokens: str | None, worker: bool, always: bool = False) -> None:
    """With ``tokens`` (or ``always``): the serve process (``worker=False``) not dumpable; a worker that,
    without CAP_SYS_PTRACE, and with no copy of ``tokens`` left in its memory."""
    secrets = [t.encode() for t in tokens if t]
    if not secrets and not always:
        return
    if _shim is None or not hasattr(_shim, "guard_secrets"):
        log.warning("the package's native shim is missing or stale (pip install -e . again): the server's tokens "
                    "stay readable by the kernels it runs")
        return
    if _shim.guard_secrets(worker) != 0:
        log.warning("could not make this process undumpable%s: a kernel may read the server's tokens through /proc",
                    " or drop CAP_SYS_PTRACE" if worker else "")
    if worker and secrets and _shim.scrub_secrets(secrets) < 0:
        log.warning("could not wipe the server's tokens from this worker's memory (/proc/self/maps unreadable?)")
    if not worker and secrets:
        scrub_environment_block(secrets)


def scrub_environment_block(secrets: list[bytes]) -> int:
    """Wipe ``secrets`` from this process's command line and environment block (what /proc/PID/cmdline and
    /proc/PID/environ show, to processes of its user even when it is not dumpable); their variables leave
    ``os.environ`` too. The number of copies wiped."""
    import ctypes
    import os

    for name in TOKEN_VARIABLES:
        os.environ.pop(name, None)
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        arg_start, env_end = int(fields[45]), int(fields[48])  # fields 48 and 51 of proc(5); [0] is field 3
    except (OSError, IndexError, ValueError):
        return 0
    if not 0 < arg_start < env_end or env_end - arg_start > (1 << 24):
        return 0
    block = ctypes.string_at(arg_start, env_end - arg_start)
    wiped = 0
    for secret in secrets:
        at = block.find(secret)
        while at >= 0:
            ctypes.memset(arg_start + at, 0, len(secret))
            wiped += 1
            at = block.find(secret, at + len(secret))
    return wiped
