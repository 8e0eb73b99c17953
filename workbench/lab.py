"""The workbench in JupyterLab: an embedded device farm and the tutorial notebooks, in one command.

    python -m workbench.lab                              # farm + JupyterLab on notebooks/, opened at 01-quickstart
    python -m workbench.lab --servers local=2 aarch64-qemu=1
    python -m workbench.lab --no-browser --port 8888     # serve only; open the URL JupyterLab prints
    python -m workbench.lab --headless                   # run 01-quickstart without a browser, print its results
    python -m workbench.lab --serve                      # serve JupyterLab even with no display and no terminal
    python -m workbench.lab -- --ServerApp.ip=0.0.0.0    # what follows -- goes to `jupyter lab` as it is

The farm's tracker is exported to the kernels as WORKBENCH_TRACKER, so
`%rpc_tracker` and `%rpc_connect` find it with no address. Ctrl-C (or SIGTERM)
ends JupyterLab with its kernels, then the farm.

Which variant runs: --headless or --serve say it. Otherwise the lab serves
JupyterLab, unless there is neither a display (no $DISPLAY or $WAYLAND_DISPLAY
on Linux) nor a terminal on stdin, as on a CI runner: then nobody could open
the lab, so the plain command runs the headless variant and says so on its
first line. An IDE or a script on a desktop has a display, so it serves.
--no-browser or --port also mean serving.
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .errors import WorkbenchError
from .farm import LocalFarm
from .farm.__main__ import parse_servers

QUICKSTART = "01-quickstart.ipynb"
DEFAULT_SERVERS = ["local=2"]
CELL_TIMEOUT_S = 300.0
KERNEL_START_TIMEOUT_S = 120.0
JUPYTER_STOP_TIMEOUT_S = 30.0  # JupyterLab shuts its kernels down on SIGTERM; then it is killed
INSTALL_HINT = 'pip install -e ".[notebook]"  (in a clone of the repository; or pip install "rpc-workbench[notebook]")'
TABLE_TAG, PLOT_TAG = "results-table", "results-plot"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class LabError(WorkbenchError):
    """The lab cannot start: what is missing and how to get it."""


def notebook_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The tutorial notebooks: ``explicit``, else ``notebooks/`` of the source tree this package runs from.

        >>> notebook_dir().name                 # doctest: +SKIP
        'notebooks'
    """
    if explicit is not None:
        path = Path(explicit).expanduser().resolve()
        if not (path / QUICKSTART).is_file():
            raise LabError(f"{path} has no {QUICKSTART}: pass the notebooks/ folder of a clone of rpc-workbench")
        return path
    path = Path(__file__).resolve().parent.parent / "notebooks"
    if not (path / QUICKSTART).is_file():
        raise LabError(
            "the tutorial notebooks are not installed with the package (a wheel has the library only). "
            "They are the notebooks/ folder of the rpc-workbench repository: clone it and run "
            f"{INSTALL_HINT.split('  ')[0]} && python -m workbench.lab there, or pass --notebook-dir DIR"
        )
    return path


def has_display() -> bool:
    """Whether a browser could open a window here: macOS and Windows always, Linux with X11 or Wayland.

        >>> has_display()               # doctest: +SKIP   (False on a CI runner)
        False
    """
    if sys.platform == "darwin" or sys.platform.startswith("win"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def headless_reason(*, serve: bool = False, no_browser: bool = False, port: int | None = None) -> str | None:
    """Why the plain command runs the headless variant here, or None when it serves JupyterLab.

    It goes headless only when nothing asks for serving (--serve, --no-browser, --port) and there is
    neither a display nor a terminal on stdin: a CI runner, a container, a script run from cron.

        >>> headless_reason(serve=True) is None
        True
    """
    if serve or no_browser or port is not None or has_display():
        return None
    if sys.stdin is not None and sys.stdin.isatty():
        return None
    return "no display ($DISPLAY and $WAYLAND_DISPLAY unset) and no terminal on stdin"


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LabError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
                       f"the lab needs the notebook extra: {INSTALL_HINT}")


def jupyter_command(notebooks: Path, *, port: int | None = None, open_browser: bool = True,
                    extra: Sequence[str] = ()) -> list[str]:
    """The ``jupyter lab`` command: this Python's JupyterLab on ``notebooks``, opened at the quickstart.

        >>> jupyter_command(Path("/repo/notebooks"), port=8888, open_browser=False)[:3]   # doctest: +SKIP
        ['/usr/bin/python3', '-m', 'jupyterlab']
    """
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={notebooks}",
           f"--LabApp.default_url=/lab/tree/{QUICKSTART}"]
    if port is not None:
        cmd += [f"--ServerApp.port={port}", "--ServerApp.port_retries=0"]
    if not open_browser:
        cmd.append("--ServerApp.open_browser=False")
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI run as root; JupyterLab refuses it unless told
        cmd.append("--ServerApp.allow_root=True")
    return cmd + list(extra)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for the lab farm's tracker, which JupyterLab's extension starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the JupyterLab child (Linux): SIGTERM when the lab process dies, so a killed lab leaves no server."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(notebooks: Path, servers: dict[str, int], tracker_port: int, *, port: int | None, open_browser: bool,
          extra: Sequence[str]) -> int:
    """Run JupyterLab on ``notebooks`` with the lab's farm (``servers``, its tracker on ``tracker_port``); its exit status.

    The farm runs in the Jupyter server, started by the workbench's server
    extension (``WORKBENCH_LAB_FARM``), so that the Devices sidebar can stop and
    start it; its tracker keeps ``tracker_port``, which the kernels get as
    WORKBENCH_TRACKER. Ctrl-C or SIGTERM stop JupyterLab (SIGTERM: it shuts its
    kernels down, then the farm), killed after JUPYTER_STOP_TIMEOUT_S.

        >>> serve(notebook_dir(), {"local": 2}, free_port(), port=8888, open_browser=False, extra=[])  # doctest: +SKIP
    """
    _require("jupyterlab")
    env = dict(os.environ, WORKBENCH_TRACKER=f"127.0.0.1:{tracker_port}",
               WORKBENCH_LAB_FARM=" ".join(f"{key}={count}" for key, count in servers.items()))
    cmd = jupyter_command(notebooks, port=port, open_browser=open_browser,
                          extra=["--ServerApp.jpserver_extensions=workbench.lab_extension=True", *extra])
    print(f"starting JupyterLab on {notebooks} (opens {QUICKSTART}); Ctrl-C ends JupyterLab and the farm", flush=True)
    # both end the lab, also where SIGINT came in ignored (a background job of a script)
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    proc = None
    try:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,  # no terminal: no "shut down? (y/n)"
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        return proc.wait()
    except KeyboardInterrupt:
        print("\nstopping JupyterLab and the farm", flush=True)
        return 0
    finally:
        for sig in previous:  # a second Ctrl-C must not leave JupyterLab or the farm running
            signal.signal(sig, signal.SIG_IGN)
        try:
            if proc is not None:
                _stop(proc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(JUPYTER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"JupyterLab did not stop within {JUPYTER_STOP_TIMEOUT_S:.0f} s: killing it", file=sys.stderr)
            proc.kill()
            proc.wait()


# -- headless ---------------------------------------------------------------------------------------
def run_headless(notebooks: Path, farm: LocalFarm, output: Path) -> int:
    """Execute 01-quickstart against ``farm`` with nbclient; print its results; 0 only if every cell ran.

    The executed notebook and the plot are written to ``output``.

        >>> with LocalFarm({"local": 2}) as farm:                                        # doctest: +SKIP
        ...     run_headless(notebook_dir(), farm, Path("out"))
    """
    _require("nbclient", "nbformat", "ipykernel")
    import nbclient
    import nbformat
    from jupyter_client import KernelManager

    host, port = farm.tracker_addr
    output.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(notebooks / QUICKSTART, as_version=4)
    print(f"running {QUICKSTART} on the farm at {host}:{port} (no browser needed)\n", flush=True)
    previous = os.environ.get("WORKBENCH_TRACKER")
    os.environ["WORKBENCH_TRACKER"] = f"{host}:{port}"  # the kernel inherits it: the notebook uses this farm
    started = time.monotonic()
    failure = None
    try:
        with tempfile.TemporaryDirectory(prefix="wb-kernel-") as sockets:
            # the kernel's channels as Unix sockets in a private folder, not TCP ports on loopback
            km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "kernel"))
            client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=KERNEL_START_TIMEOUT_S,
                                             resources={"metadata": {"path": str(output)}})
            try:
                client.execute()
            finally:  # nbclient leaves a kernel manager it was given running
                if km.has_kernel:
                    km.shutdown_kernel(now=False)
    except nbclient.exceptions.CellExecutionError:
        failure = _failed_cell(nb)
    except nbclient.exceptions.CellTimeoutError as exc:
        failure = f"a cell ran longer than {CELL_TIMEOUT_S:.0f} s: {exc}"
    finally:
        if previous is None:
            os.environ.pop("WORKBENCH_TRACKER", None)
        else:
            os.environ["WORKBENCH_TRACKER"] = previous
    executed = output / QUICKSTART
    nbformat.write(nb, executed)
    _print_streams(nb)
    if failure:
        print(f"\n{QUICKSTART} failed: {failure}\n\nthe notebook as far as it ran: {executed}", file=sys.stderr)
        return 1
    table = _tagged_output(nb, TABLE_TAG, "text/plain")
    plot = _tagged_output(nb, PLOT_TAG, "image/png")
    if table is None or plot is None:
        print(f"\n{QUICKSTART} ran, but its cells tagged {TABLE_TAG!r} and {PLOT_TAG!r} showed no "
              f"{'table' if table is None else 'plot'}: {executed}", file=sys.stderr)
        return 1
    plot_path = output / "01-quickstart-plot.png"
    plot_path.write_bytes(base64.b64decode(plot))
    code_cells = sum(cell.cell_type == "code" for cell in nb.cells)
    print(f"\ntimings (%rpc_results --summary):\n{table}\n")
    print(f"plot (%rpc_results --plot) saved to {plot_path}")
    print(f"executed notebook saved to {executed}")
    print(f"all {code_cells} code cells of {QUICKSTART} ran in {time.monotonic() - started:.1f} s")
    return 0


def _failed_cell(nb: Any) -> str:
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                trace = _ANSI.sub("", "\n".join(out.get("traceback", [])))
                return (f"cell {index} raised {out.get('ename')}: {out.get('evalue')}\n--- cell ---\n{cell.source}"
                        f"\n--- traceback ---\n{trace[-4000:]}")
    return "the execution stopped without an error output"


def _print_streams(nb: Any) -> None:
    """What the cells printed (the farm, the check, the timings), indented."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout" and out.get("text", "").strip():
                print("  " + out["text"].rstrip().replace("\n", "\n  "))


def _tagged_output(nb: Any, tag: str, mime: str) -> str | None:
    for cell in nb.cells:
        if tag in cell.get("metadata", {}).get("tags", []):
            for out in cell.get("outputs", []):
                data = out.get("data", {})
                if mime in data:
                    return data[mime]
    return None


# -- command line -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="python -m workbench.lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--headless", action="store_true",
                      help=f"run {QUICKSTART} with nbclient against the farm and print its results (no browser); "
                           "the default where there is neither a display nor a terminal")
    mode.add_argument("--serve", action="store_true",
                      help="serve JupyterLab even where there is neither a display nor a terminal (a script, an IDE "
                           "without a display, a container): open the URL it prints")
    parser.add_argument("--port", type=int, default=None, help="JupyterLab's port (default: 8888 or the next free one)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser; serve and print the URL")
    parser.add_argument("--servers", nargs="+", default=DEFAULT_SERVERS, metavar="KEY=N",
                        help="the farm's servers by key (default: local=2), e.g. local=2 aarch64-qemu=1")
    parser.add_argument("--notebook-dir", default=None, metavar="DIR", help="the notebooks (default: notebooks/ "
                                                                            "of the repository)")
    parser.add_argument("--output", default=None, metavar="DIR",
                        help="--headless: where the executed notebook and the plot go (default: a new temp folder)")
    args = parser.parse_args(argv)
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be 1-65535, not {args.port}")
    try:
        servers = parse_servers(args.servers)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    headless = args.headless
    reason = None if headless else headless_reason(serve=args.serve, no_browser=args.no_browser, port=args.port)
    if reason:
        print(f"python -m workbench.lab: {reason}, so nobody could open the lab here: running the headless "
              f"variant (--headless): it runs {QUICKSTART}, prints its results and exits. "
              "To serve JupyterLab instead: python -m workbench.lab --serve (then open the URL it prints)",
              flush=True)
        headless = True
    keys = ", ".join(f"{key}×{count}" for key, count in servers.items())
    try:
        notebooks = notebook_dir(args.notebook_dir)
        _require(*(("nbclient", "nbformat", "ipykernel") if headless else ("jupyterlab",)))
        if headless:
            farm = LocalFarm(servers)
        else:
            LocalFarm.prepare(servers)  # what the farm needs is missing: say so here, not in JupyterLab's log
            tracker_port = free_port()
    except (WorkbenchError, ValueError, OSError, RuntimeError) as exc:
        print(f"python -m workbench.lab: {exc}", file=sys.stderr)
        return 1
    if not headless:
        print(f"device farm: tracker 127.0.0.1:{tracker_port} with servers {keys} (WORKBENCH_TRACKER="
              f"127.0.0.1:{tracker_port} for the kernels), run by JupyterLab: the Devices sidebar stops and starts it",
              flush=True)
        # --serve with no display: no browser to open, the URL JupyterLab prints is the way in
        return serve(notebooks, servers, tracker_port, port=args.port,
                     open_browser=not args.no_browser and has_display(), extra=extra)
    with farm:
        host, port = farm.tracker_addr
        print(f"device farm: tracker {host}:{port} with servers {keys} (WORKBENCH_TRACKER={host}:{port} for the "
              f"kernels)", flush=True)
        output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="workbench-lab-"))
        try:
            return run_headless(notebooks, farm, output)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
