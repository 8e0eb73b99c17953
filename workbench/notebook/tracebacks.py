"""Short tracebacks for the workbench's expected errors in a notebook (``%load_ext workbench`` installs them).

A plain call that fails on the device, e.g. ``mod["add_one"](a)``, shows the
cell's own frames and the message, not the ten library frames between the
call and the socket:

    RemoteError                          Traceback (most recent call last)
    Cell In[4], line 1
    ----> 1 mod["add_one"](a)
    RemoteError: add_one: TypeError: expected 2 arguments, got 1
    (workbench's own frames are hidden: %tb shows them)

An error is *expected* when the workbench raised it on purpose: an instance
of ``workbench.errors.WorkbenchError`` (every RPC error, ``CompileError``,
...), or any exception whose innermost frame is a ``raise`` statement in the
workbench's code (e.g. the ``TypeError`` for a numpy array passed as a
tensor). Everything else, including an error the interpreter raised inside
the workbench (a bug), keeps IPython's full traceback. ``%tb`` and ``%debug``
always see the whole traceback.

    >>> from IPython import get_ipython
    >>> from workbench.notebook import MagicError
    >>> install(get_ipython(), MagicError)      # doctest: +SKIP
    True
"""
from __future__ import annotations

import dis
import logging
import os
import sys
from types import TracebackType
from typing import Any, Callable

from ..errors import WorkbenchError

log = logging.getLogger("workbench.notebook")

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../workbench
HIDDEN_NOTE = "(workbench's own frames are hidden: %tb shows them)"
# the classes the handler is asked about; the rest of IPython's handling is untouched. Each is shortened only
# when it is expected (see is_expected); SyntaxError and its kin are not here, so IPython shows them as ever.
HANDLED = (WorkbenchError, TypeError, ValueError, LookupError, AttributeError, RuntimeError, OSError,
           KeyboardInterrupt)
_RAISES = {dis.opmap["RAISE_VARARGS"]}


def in_workbench(filename: str) -> bool:
    """Whether ``filename`` is a source file of the workbench package.

        >>> in_workbench(__file__)
        True
    """
    try:
        return os.path.commonpath([PACKAGE_DIR, os.path.abspath(filename)]) == PACKAGE_DIR
    except ValueError:  # another drive (Windows), or a pseudo-name like "<string>"
        return False


def _entries(tb: TracebackType | None) -> list[TracebackType]:
    out = []
    while tb is not None:
        out.append(tb)
        tb = tb.tb_next
    return out


def _raised_on_purpose(entry: TracebackType) -> bool:
    """Whether the instruction ``entry`` stopped at is a ``raise`` statement (not an operation that failed)."""
    code = entry.tb_frame.f_code
    return any(ins.offset == entry.tb_lasti and ins.opcode in _RAISES for ins in dis.get_instructions(code))


def is_expected(value: BaseException, tb: TracebackType | None) -> bool:
    """Whether ``value`` is an error the workbench raised on purpose, to be shown short.

        >>> from workbench.errors import RemoteError
        >>> is_expected(RemoteError("add_one: TypeError: expected 2 arguments, got 1"), None)
        True
    """
    if isinstance(value, WorkbenchError):
        return True
    entries = _entries(tb)
    if not entries:
        return False
    last = entries[-1]
    return in_workbench(last.tb_frame.f_code.co_filename) and _raised_on_purpose(last)


def user_frames(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` cut before its first frame in the workbench: the user's cell and the functions it called.

    The first entry (IPython's own ``run_code``, which IPython's formatter skips) is always kept.
    """
    entries = _entries(tb)
    if not entries:
        return None
    keep = entries[:1]
    for entry in entries[1:]:
        if in_workbench(entry.tb_frame.f_code.co_filename):
            break
        keep.append(entry)
    head = None
    for entry in reversed(keep):
        head = TracebackType(head, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return head


def short_traceback(shell: Any, etype: type, value: BaseException, tb: TracebackType | None,
                    tb_offset: int | None = None) -> list[str]:
    """IPython's structured traceback of ``value`` with the user's frames only, no chained exceptions, and a note."""
    cause, context, suppress = value.__cause__, value.__context__, value.__suppress_context__
    try:  # the chain would bring the library's frames back; %tb shows it
        value.__cause__, value.__context__, value.__suppress_context__ = None, None, True
        stb = shell.InteractiveTB.structured_traceback(etype, value, user_frames(tb), tb_offset=tb_offset)
    finally:
        value.__cause__, value.__context__, value.__suppress_context__ = cause, context, suppress
    return list(stb) + [HIDDEN_NOTE]


def make_handler(magic_error: type[BaseException]) -> Callable[..., None]:
    """The custom exception handler: ``magic_error`` as its message alone, expected errors short, the rest as ever."""

    def handler(shell: Any, etype: type, value: BaseException, tb: TracebackType | None,
                tb_offset: int | None = None) -> None:
        sys.last_type, sys.last_value, sys.last_traceback = etype, value, tb  # %tb and %debug: the whole of it
        if isinstance(value, magic_error):
            shell._showtraceback(etype, value, [f"{etype.__name__}: {value}"])
        elif is_expected(value, tb) and not hasattr(value, "_render_traceback_"):
            shell._showtraceback(etype, value, short_traceback(shell, etype, value, tb, tb_offset))
            if getattr(shell, "call_pdb", False):  # %pdb on: the debugger, as IPython's own display does
                shell.debugger(force=True)
        else:
            shell.showtraceback((etype, value, tb), tb_offset=tb_offset, running_compiled_code=True)

    return handler


def install(shell: Any, magic_error: type[BaseException]) -> bool:
    """Show ``magic_error`` in one line and the workbench's expected errors short in ``shell``.

    Returns False (and changes nothing) when another extension already set IPython's custom exception
    handler: the workbench does not take it over.
    """
    current = getattr(shell, "custom_exceptions", ())
    if current and not is_installed(shell):
        log.info("another custom exception handler is set (%s): workbench errors keep full tracebacks", current)
        return False
    shell.set_custom_exc((magic_error,) + HANDLED, make_handler(magic_error))
    shell._workbench_custom_exc = shell.CustomTB
    return True


def is_installed(shell: Any) -> bool:
    """Whether the handler of :func:`install` is the shell's custom exception handler."""
    marker = getattr(shell, "_workbench_custom_exc", None)
    return marker is not None and getattr(shell, "CustomTB", None) is marker


def uninstall(shell: Any) -> None:
    """Give IPython its default exception display back (if the workbench's handler is the one set)."""
    if is_installed(shell):
        shell.set_custom_exc((), None)
    shell._workbench_custom_exc = None
