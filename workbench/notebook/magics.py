"""The IPython magics: ``%load_ext workbench`` registers them.

    %rpc_farm --servers local=2          start the embedded farm, the default tracker from now on
    %rpc_tracker [HOST:PORT]             show the default tracker (or set it) and its live device picker
    %rpc_connect [HOST:PORT] [--key K]   bind a session as `remote` (no address: a free device of the tracker)
    %rpc_disconnect [NAME]               close a bound session
    %%rpc_compile NAME                   compile the cell's C kernel, upload, load, bind the module as NAME
    %rpc_time EXPR [-n N] [-r R] [-o]    time a remote call on the device, like %timeit
    %rpc_results [--plot] [--csv PATH]   the timings so far, as a DataFrame or a plot

Each magic is thin: it parses its arguments and calls the library
(``workbench.farm.open_session``, ``workbench.cc.load_source``,
``workbench.results.ResultLog``). Errors print one line; ``--debug`` shows the
full traceback.
"""
from __future__ import annotations

import argparse
import ast
import functools
import logging
import shlex
import sys
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from . import tracebacks
from .status import StatusReporter
from .. import cc
from ..errors import WorkbenchError
from ..farm import default_tracker, open_session, set_default_tracker, start_farm, stop_farm
from ..farm.__main__ import parse_servers
from ..farm.local import parse_address
from ..results import default_log
from ..rpc.client.session import RemoteFunction, RemoteModule, RPCSession

log = logging.getLogger("workbench.notebook")
DEFAULT_SESSION = "remote"
CELL_FIRST_LINE = 2  # a %%rpc_compile cell's C text starts below the magic's line: line 2 in the editor


class MagicError(Exception):
    """A magic failed for a reason the user can act on: shown as one line, without a traceback."""


def _discard(session: RPCSession, module: RemoteModule) -> None:
    """Remove the file of a module that will not be bound (best effort: the session may refuse or be gone)."""
    try:
        session.remove(module.path)
    except (WorkbenchError, OSError) as exc:
        log.debug("could not remove %s: %s", module.path, exc)


def _unquote(value: str) -> str:
    """IPython keeps the quotes of a quoted option value: ``--cflags "-O3 -g"`` arrives as ``'"-O3 -g"'``."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _tracker_origin(addr: tuple[str, int]) -> str:
    """Where the default tracker ``addr`` comes from, for %rpc_tracker's first line: " (the embedded farm)"."""
    from ..farm import current_farm, tracker_from_env

    farm = current_farm()
    if farm is not None and farm.tracker_addr == addr:
        return " (the embedded farm)"
    try:
        if tracker_from_env() == addr:
            return " (configured: $WORKBENCH_TRACKER or TVM_TRACKER_HOST/PORT)"
    except ValueError:
        pass
    return " (set by %rpc_tracker HOST:PORT)"


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` after a space, outside quotes), as in Python or a shell.

        >>> strip_comment('--servers local=2   # an embedded farm')
        '--servers local=2'
        >>> strip_comment('mod["a #1"](a, b) -r 3')
        'mod["a #1"](a, b) -r 3'
    """
    quote, escaped = None, False
    for i, ch in enumerate(line):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def _friendly(func: Callable) -> Callable:
    """Parse the magic's arguments; turn the library's errors into one-line MagicErrors unless --debug."""

    @functools.wraps(func)
    def wrapper(self: "WorkbenchMagics", line: str, cell: str | None = None):
        line = strip_comment(line)  # IPython hands a magic its whole line, a trailing "# ..." included
        debug = "--debug" in line.split()
        try:
            return func(self, line) if cell is None else func(self, line, cell)
        except UsageError as exc:  # bad options: the message, then how to call the magic
            usage = "usage: " + wrapper.parser.format_usage().lstrip(": \n").rstrip()
            raise UsageError(f"{exc}\n{usage}\n(%{func.__name__}? shows the full help)") from None
        except MagicError:
            raise
        except KeyboardInterrupt:  # as IPython shows it for any cell (the session goes on: the call was cancelled)
            raise KeyboardInterrupt from None
        except (WorkbenchError, OSError, ValueError, TypeError, LookupError, RuntimeError, TimeoutError) as exc:
            if debug:
                raise
            raise MagicError(f"{func.__name__}: {type(exc).__name__}: {exc}") from None

    return wrapper


@magics_class
class WorkbenchMagics(Magics):
    """The rpc-workbench magics; ``%load_ext workbench`` registers one instance."""

    def __init__(self, shell=None):
        super().__init__(shell)
        self.log = default_log()
        self.pickers: list[Any] = []
        self.last_compile_timings: dict[str, float] = {}  # seconds in "compile" and "upload_load" (the benchmark's)
        self.status: StatusReporter | None = None  # the lab's status item (load_ipython_extension sets it)

    # -- helpers ------------------------------------------------------------------------
    def _session(self, name: str | None) -> RPCSession:
        name = name or DEFAULT_SESSION
        value = self.shell.user_ns.get(name)
        if value is None:
            raise MagicError(f"no session named `{name}`: connect first with %rpc_connect (or -o {name}), "
                             f"or pass --session NAME")
        if not isinstance(value, RPCSession):
            raise MagicError(f"`{name}` is a {type(value).__name__}, not an RPC session: pass --session NAME")
        return value

    def _bind(self, name: str, value: Any) -> None:
        if not name.isidentifier():
            raise MagicError(f"{name!r} is not a Python name to bind the result to")
        old = self.shell.user_ns.get(name)
        if isinstance(old, RPCSession) and old is not value:
            old.close()  # re-running a connect cell must not keep the previous device busy
        self.shell.user_ns[name] = value

    # -- %rpc_farm ----------------------------------------------------------------------
    @magic_arguments()
    @argument("--servers", nargs="+", metavar="KEY=COUNT",
              help="servers to start, by key (default: local=1); restarts a running farm")
    @argument("--stop", action="store_true", help="stop the embedded farm")
    @argument("--debug", action="store_true", help="show the full traceback of an error")
    @line_magic
    @_friendly
    def rpc_farm(self, line: str = ""):
        """Start (or stop) the embedded device farm on this machine and make it the default tracker.

        %rpc_farm                          a farm with one server of key "local" (kept if one runs)
        %rpc_farm --servers local=2 arm=1  two "local" servers and one "arm" server
        %rpc_farm --stop
        """
        args = parse_argstring(self.rpc_farm, line)
        if args.stop:
            if args.servers:
                raise UsageError("--stop and --servers do not go together")
            print("stopped the embedded farm" if stop_farm() else "no embedded farm was running")
            return None
        try:
            servers = parse_servers(args.servers) if args.servers else None
        except argparse.ArgumentTypeError as exc:
            raise UsageError(str(exc)) from None
        farm = start_farm(servers, replace=servers is not None)
        set_default_tracker(farm.tracker_addr)
        display(farm)
        return None

    # -- %rpc_tracker ---------------------------------------------------------------------
    @magic_arguments()
    @argument("address", nargs="?", metavar="HOST:PORT",
              help="make this tracker the default (none: show the current default and keep it)")
    @argument("--interval", type=float, default=1.0, help="seconds between polls of the device panel")
    @argument("--no-picker", action="store_true", help="no device panel; print the tracker's summary")
    @argument("--debug", action="store_true", help="show the full traceback of an error")
    @line_magic
    @_friendly
    def rpc_tracker(self, line: str = ""):
        """Show the default tracker's live device panel (pick a key, press Connect); with HOST:PORT, set it first.

        %rpc_tracker                    the current default: the farm of %rpc_farm, else the configured
                                        tracker ($WORKBENCH_TRACKER), else the embedded farm (started on
                                        demand); never changes which one it is
        %rpc_tracker 10.0.0.2:9190      make a tracker of yours the default (ours or TVM's)
        """
        args = parse_argstring(self.rpc_tracker, line)
        if args.interval <= 0:
            raise UsageError("--interval must be > 0 seconds")
        if args.address:
            set_default_tracker(args.address)
        addr = default_tracker()
        print(f"default tracker: {addr[0]}:{addr[1]}{_tracker_origin(addr)}")
        if args.no_picker:
            from ..rpc.client.tracker_session import TrackerSession

            with TrackerSession(addr) as tracker:
                print()
                print(tracker.text_summary())
            return None
        from .picker import DevicePicker

        picker = DevicePicker(addr, interval=args.interval, namespace=self.shell.user_ns)
        self.pickers.append(picker)
        display(picker)
        return None

    # -- %rpc_connect ---------------------------------------------------------------------
    @magic_arguments()
    @argument("address", nargs="?", metavar="HOST:PORT", help="a server (or a proxy, with --key) to connect to directly")
    @argument("--key", help="the device key (default: the farm's first key)")
    @argument("--tracker", metavar="HOST:PORT", help="the tracker to ask (default: the default tracker)")
    @argument("--priority", type=int, default=1, help="queue priority; higher is served first (default 1)")
    @argument("--session-timeout", type=float, default=0, metavar="S",
              help="the server ends the session after S seconds (default 0: no limit)")
    @argument("--timeout", type=float, default=None, metavar="S", help="give up waiting for a device after S seconds")
    @argument("--wait", action="store_true",
              help="queue for a key no server is registered for yet (default: fail at once, naming the keys there are)")
    @argument("-o", "--name", default=DEFAULT_SESSION, metavar="NAME", help="the name to bind (default: remote)")
    @argument("--debug", action="store_true", help="show the full traceback of an error")
    @line_magic
    @_friendly
    def rpc_connect(self, line: str = ""):
        """Connect to a device and bind the session as `remote` (or -o NAME).

        %rpc_connect                          a free device of the default tracker (the farm's first key)
        %rpc_connect --key rasp4 --timeout 60 a free "rasp4" device, waiting at most a minute
        %rpc_connect --key rasp4 --wait       queue even if no "rasp4" server has registered yet
        %rpc_connect 192.168.1.7:9090         a server, directly

        A key no server is registered for fails at once, naming the keys there
        are and the closest one (unless --wait). While queued, a bar shows the
        place in the queue, the time waited and the keys there are;
        interrupting the kernel cancels the request.
        """
        args = parse_argstring(self.rpc_connect, line)
        if args.address and args.tracker:
            raise UsageError("give a server address or --tracker, not both")
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError("--timeout must be > 0 seconds")
        if not args.name.isidentifier():
            raise UsageError(f"-o takes a Python name, not {args.name!r}")
        if args.address and args.wait:
            raise UsageError("--wait is for a tracker's queue: it does not go with a server address")
        tracker = None if args.address else "%s:%d" % (parse_address(args.tracker) if args.tracker else default_tracker())
        on_wait = None if self.status is None else (lambda status: self.status.waiting(status, tracker))
        session = None
        try:
            session = open_session(args.address, key=args.key, tracker=args.tracker, priority=args.priority,
                                   session_timeout=args.session_timeout, timeout=args.timeout, wait=args.wait,
                                   on_wait=on_wait)
        finally:
            if self.status is not None:
                self.status.connected(session, tracker)
        self._bind(args.name, session)
        display(session)
        return None

    @magic_arguments()
    @argument("name", nargs="?", default=DEFAULT_SESSION, help="the session's name (default: remote)")
    @argument("--debug", action="store_true", help="show the full traceback of an error")
    @line_magic
    @_friendly
    def rpc_disconnect(self, line: str = ""):
        """Close a session bound by %rpc_connect and free its device: %rpc_disconnect [NAME]."""
        args = parse_argstring(self.rpc_disconnect, line)
        session = self._session(args.name)
        session.close()
        del self.shell.user_ns[args.name]
        print(f"closed `{args.name}` ({session.address})")

    # -- %%rpc_compile --------------------------------------------------------------------
    @magic_arguments()
    @argument("name", help="the module's name: bound in the notebook, and the file name on the device")
    @argument("--target", metavar="TRIPLE", help="the target triple (default: the one the device published)")
    @argument("--export", choices=cc.source.EXPORTS, default="so",
              help="so: link here; tar: a tar of objects, linked on the device (default: so)")
    @argument("--lang", choices=cc.source.LANGS, default="c",
              help="c (default), or opencl: the cell is OpenCL C, built on the device for its OpenCL devices")
    @argument("--session", metavar="NAME", help="the session to load into (default: remote)")
    @argument("--cflags", default="", help='extra compiler flags, quoted: --cflags "-O3 -march=native"')
    @argument("--debug", action="store_true", help="show the full traceback of an error")
    @cell_magic
    @_friendly
    def rpc_compile(self, line: str, cell: str):
        """Compile the cell's C kernel for the device, upload and load it, and bind the module as NAME.

        %%rpc_compile add_one
        #include <workbench_kernel.h>
        WB_KERNEL(add_one) { ... }

        Compiler errors name the lines as the notebook numbers them, the
        %%rpc_compile line being line 1 ("cell:4:10: error: ..."). A cell with
        no WB_KERNEL(name) is an error: the module would have nothing to call.

        %%rpc_compile --lang opencl vadd
        __kernel void vadd(__global const float* a, __global float* b) { ... }

        OpenCL C is built on the device (its OpenCL compiler's errors name the
        cell's lines too). Call a kernel with its arguments, then the global
        size, or the global sizes then the local sizes: vadd(a, b, 1024, 64).
        """
        args = parse_argstring(self.rpc_compile, line)
        if not args.name.isidentifier():
            raise UsageError(f"NAME must be a Python name, not {args.name!r}")
        if args.lang == "opencl" and (args.target or args.cflags or args.export != "so"):
            raise UsageError("--lang opencl: the cell is built on the device for its OpenCL devices; "
                             "--target, --export and --cflags do not apply")
        try:
            flags = shlex.split(_unquote(args.cflags))
        except ValueError as exc:
            raise UsageError(f"--cflags: {exc}") from None
        session = self._session(args.session)
        if not cell.strip():
            raise MagicError("rpc_compile: the cell is empty: write a C kernel below the %%rpc_compile line")
        self.last_compile_timings = {}
        opencl = args.lang == "opencl"
        try:
            module = cc.load_source(session, cell, name=args.name, target=args.target, export=args.export,
                                    options=flags, source_name="cell", first_line=CELL_FIRST_LINE,
                                    timings=self.last_compile_timings, lang=args.lang)
        except cc.CompileError as exc:
            if args.debug:
                raise
            what = "the device's OpenCL compiler" if opencl else "the C compiler"
            raise MagicError(f"{what} rejected the cell:\n{exc}") from None
        if not module.function_names and opencl:
            _discard(session, module)
            raise MagicError(f"rpc_compile: the cell declares no kernel, so `{args.name}` would have no function to "
                             f"call: declare one with __kernel void {args.name}(...) {{ ... }}")
        if not module.function_names:
            _discard(session, module)
            raise MagicError(f"rpc_compile: the cell declares no kernel, so `{args.name}` would have no function to "
                             f"call: declare one with WB_KERNEL(name) {{ ... }} from #include <workbench_kernel.h>, "
                             f"e.g. WB_KERNEL({args.name}) {{ ...; return 0; }}")
        self._bind(args.name, module)
        display(module)
        return None

    # -- %rpc_time ------------------------------------------------------------------------
    @magic_arguments()
    @argument("expr", nargs="*", metavar="EXPR", help='a call of a remote function, e.g. mod["add_one"](a, b)')
    @argument("-n", "--number", type=int, default=None, metavar="N",
              help="calls per measurement (default: chosen so that one lasts at least --min-repeat-ms)")
    @argument("-r", "--repeat", type=int, default=7, metavar="R", help="measurements (default 7)")
    @argument("--min-repeat-ms", type=float, default=None, metavar="MS",
              help="raise N until one measurement lasts MS milliseconds (default 100 without -n, else 0)")
    @argument("-o", "--output", action="store_true", help="return the BenchmarkResult")
    @argument("-q", "--quiet", action="store_true", help="print nothing")
    @argument("--debug", action="store_true", help="show the full traceback of an error")
    @line_magic
    @_friendly
    def rpc_time(self, line: str = ""):
        """Time a remote call on the device with time_evaluator, like %timeit; log it in the results.

        %rpc_time mod["add_one"](a, b)
        %rpc_time mod["add_one"](a, b) -n 100 -r 20 -o

        The loop runs on the device, next to the kernel: the network is not
        measured. Each timing is added to the results log (%rpc_results).
        """
        expr, options = split_timed_expression(line)
        args = parse_argstring(self.rpc_time, options)
        if args.expr:
            raise UsageError(f"unexpected {' '.join(args.expr)!r}: EXPR comes first or last, options apart")
        if args.number is not None and args.number < 1 or args.repeat < 1:
            raise UsageError("-n and -r must be >= 1")
        if args.min_repeat_ms is not None and args.min_repeat_ms < 0:
            raise UsageError("--min-repeat-ms must be >= 0")
        func, call_args = self._evaluate_call(expr)
        dev = next((a.device for a in call_args if hasattr(a, "device") and hasattr(a, "shape")), None)
        if dev is None:
            dev = func.session.cpu(0)
        min_repeat_ms = args.min_repeat_ms if args.min_repeat_ms is not None else (0 if args.number else 100)
        timer = func.time_evaluator(dev, number=args.number or 1, repeat=args.repeat, min_repeat_ms=min_repeat_ms)
        result = timer(*call_args)
        self.log.add(result, session=func.session, args=call_args, expr=expr)
        if not args.quiet:
            print(result.describe())
        return result if args.output else None

    def _evaluate_call(self, expr: str) -> tuple[RemoteFunction, list[Any]]:
        if not expr:
            raise UsageError('%rpc_time needs a call of a remote function: %rpc_time mod["add_one"](a, b)')
        call = ast.parse(expr, mode="eval").body
        if not isinstance(call, ast.Call) or call.keywords or any(isinstance(a, ast.Starred) for a in call.args):
            raise UsageError(f'EXPR must be a call with plain arguments, e.g. mod["add_one"](a, b), not {expr!r}')
        ns = self.shell.user_ns

        def value(node: ast.expr) -> Any:
            return eval(compile(ast.Expression(node), "<rpc_time>", "eval"), ns)

        try:
            func = value(call.func)
            call_args = [value(node) for node in call.args]
        except Exception as exc:
            raise MagicError(f"rpc_time: evaluating {expr!r} failed: {type(exc).__name__}: {exc}") from None
        if isinstance(func, RemoteModule):
            if not func.entry_name:
                raise MagicError(f"rpc_time: {func.path} has no entry function; call one: mod[name](...) "
                                 f"with name in {func.function_names}")
            func = func[func.entry_name]
        if not isinstance(func, RemoteFunction):
            raise MagicError(f'rpc_time: {ast.unparse(call.func)} is a {type(func).__name__}, not a remote function '
                             '(e.g. mod["add_one"] of a module loaded with %%rpc_compile or remote.load_module)')
        return func, call_args

    # -- %rpc_results ---------------------------------------------------------------------
    @magic_arguments()
    @argument("--plot", action="store_true", help="plot the timings")
    @argument("--kind", choices=("box", "bar"), default="box",
              help="box: the distribution per repeat; bar: means with error bars (default: box)")
    @argument("--summary", action="store_true", help="one row per timing run instead of one per repeat")
    @argument("--csv", metavar="PATH", help="write the log to a CSV file")
    @argument("--parquet", metavar="PATH", help="write the log to a Parquet file (needs pyarrow)")
    @argument("--clear", action="store_true", help="empty the log")
    @argument("--debug", action="store_true", help="show the full traceback of an error")
    @line_magic
    @_friendly
    def rpc_results(self, line: str = ""):
        """The timings of %rpc_time so far: a DataFrame (one row per repeat), a plot, or a file.

        %rpc_results                 the tidy DataFrame (times in seconds)
        %rpc_results --summary       one row per run, each time column in one unit (mean (µs), ...)
        %rpc_results --plot --kind bar
        %rpc_results --csv timings.csv
        """
        args = parse_argstring(self.rpc_results, line)
        if args.clear:
            count = len(self.log)
            self.log.clear()
            print(f"cleared {count} rows")
            return None
        for path, write in ((args.csv, self.log.to_csv), (args.parquet, self.log.to_parquet)):
            if path:
                write(path)
                print(f"wrote {len(self.log)} rows to {path}")
        if args.plot:
            ax = self.log.plot(kind=args.kind)
            display(ax.figure)
            import matplotlib.pyplot as plt

            plt.close(ax.figure)  # shown once, not again by the inline backend at the end of the cell
            return None
        if args.csv or args.parquet:
            return None
        return self.log.summary() if args.summary else self.log.frame

    def close(self) -> None:
        """Stop the pickers this instance showed and the status reports."""
        for picker in self.pickers:
            picker.close()
        self.pickers.clear()
        if self.status is not None:
            self.status.close()
            self.status = None


def split_timed_expression(line: str) -> tuple[str, str]:
    """Split ``%rpc_time``'s line into the Python call and the options, which may stand before or after it.

        >>> split_timed_expression('mod["f"](a, b) -r 20')
        ('mod["f"](a, b)', '-r 20')
    """
    text = line.strip()
    cuts = [0] + [i + 1 for i, ch in enumerate(text) if ch.isspace()]
    for start in cuts:  # leading options end where a parsable call begins
        head = text[:start]
        if start and not head.lstrip().startswith("-"):
            break
        rest = text[start:]
        ends = [len(rest)] + [i for i, ch in enumerate(rest) if ch.isspace() and rest[i:].lstrip().startswith("-")]
        for end in sorted(ends):
            candidate = rest[:end].strip()
            if candidate and _is_call(candidate):
                return candidate, (head + " " + rest[end:]).strip()
    return "", text


def _is_call(text: str) -> bool:
    try:
        return isinstance(ast.parse(text, mode="eval").body, ast.Call)
    except SyntaxError:
        return False


def load_ipython_extension(ipython) -> None:
    """Register the magics (``%load_ext workbench``) and the short display of errors.

    A magic's error shows as one line; an error the workbench raises on purpose in a
    plain call (``mod["f"](a)``, ``remote.download(...)``) shows the cell's frames and
    the message, not the library's (``%tb`` shows all; see ``workbench.notebook.tracebacks``).
    """
    magics = WorkbenchMagics(ipython)
    magics.status = StatusReporter(ipython)
    ipython.register_magics(magics)
    tracebacks.install(ipython, MagicError)
    log.debug("rpc-workbench magics loaded")


def unload_ipython_extension(ipython) -> None:
    magics = ipython.magics_manager.registry.get(WorkbenchMagics.__name__)
    if magics is not None:
        magics.close()
    tracebacks.uninstall(ipython)
    if sys.modules.get("workbench.farm"):
        stop_farm()
