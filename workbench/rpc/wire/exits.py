"""How a session worker's end reads to its peers: exit statuses and the crash notice.

A worker (forked by a server, or the stdio server behind ``PopenSession``) ends
with one of these statuses when it ends on purpose; any other end is a death,
which ``death_notice`` puts in words for the client.

    >>> death_notice(-11)   # doctest: +ELLIPSIS
    'the session worker was killed by signal 11 (SIGSEGV: ...'
"""
from __future__ import annotations

import signal

EXIT_CLEAN = 0x56  # the client left; nothing to report
EXIT_TIMED_OUT = 0x57  # session_timeout or idle_timeout expired; the worker told the client itself
EXIT_REFUSED = 0x58  # the handshake failed: no session was served
EXIT_LOST = 0x59  # the session's connection was closed under the worker (by the code it ran)
EXIT_STUCK = 0x5A  # a cancelled kernel ignored the interrupts (kernel_runtime.h WB_EXIT_STUCK)
ENDED_ON_PURPOSE = (EXIT_CLEAN, EXIT_TIMED_OUT, EXIT_REFUSED)


def death_notice(returncode: int, ended_on_purpose: bool | None = None) -> str | None:
    """What to tell the client when its worker ended with ``returncode`` (None: nothing).

    ``ended_on_purpose`` is what the worker reported (``EndReport``); without
    a report the exit status decides, which a kernel calling ``exit()`` can fake.
    """
    if ended_on_purpose is None:
        ended_on_purpose = returncode in ENDED_ON_PURPOSE
    if ended_on_purpose:
        return None
    where = "most likely in the function it was running"
    if returncode == -signal.SIGKILL:  # a kernel's own SIGKILL is refused (kernel_runtime.c): this came from outside
        what = "was killed by signal 9 (SIGKILL) from outside"
        where = "most likely by the system's out-of-memory killer (see `dmesg`) or a `kill -9`"
    elif returncode < 0:
        sig = signal.Signals(-returncode)
        what = f"was killed by signal {sig.value} ({sig.name}: {signal.strsignal(sig)})"
    elif returncode == EXIT_STUCK:
        what = ("ended: the kernel it ran kept running two grace periods after the client cancelled it, "
                "blocking the signal that stops it")
        where = "so the server ended the session rather than hold it forever"
    elif returncode == EXIT_LOST:
        what = (f"exited with status {returncode}: the code it ran closed the session's connection "
                "(did it close every file descriptor?)")
    else:
        what = f"exited with status {returncode} (did the code it ran call exit()?)"
    return (
        f"the session worker {what}, {where}; "
        "the server is still up: connect again to go on"
    )
