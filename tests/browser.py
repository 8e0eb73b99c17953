"""Helpers of the browser test: JupyterLab in a subprocess, and its page in headless Debian Chromium.

    >>> lab = JupyterLab(root, home).start()                      # doctest: +SKIP
    >>> with sync_playwright() as pw:                             # doctest: +SKIP
    ...     browser = launch_chromium(pw, chromium)
    ...     page = browser.new_page()
    ...     open_notebook(page, lab.url("lab/tree/01-quickstart.ipynb", reset=True))
    ...     run_all_cells(page)
    >>> lab.stop()                                                # doctest: +SKIP

Everything the server and its kernels write (config, runtime files, workspace,
user settings, IPython profile) stays under ``home``; the server picks a free
port itself (``--port 0``) and we read it from its runtime file, so parallel
runs never race for a port. Chromium is Debian's (browsers cannot be
downloaded here); Playwright only drives it.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]
START_TIMEOUT_S = 90.0  # the server answering its REST API
STOP_TIMEOUT_S = 20.0  # each step of ending the server and its kernels

# JupyterLab user settings for an unattended page: no news toast (and no request to a news site); every cell
# attached to the DOM (a windowed notebook leaves cells out of view unrendered, so their outputs could not be seen);
# no blank space past the last cell (the screenshot shows the notebook, not an empty panel); no autosave (the
# server writes a notebook in place, so a read of the file while it saves can find it half written).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none", "scrollPastEnd": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}

IDLE = re.compile(r"\|\s*Idle\b")  # the status bar's kernel item: "Python 3 (ipykernel) | Idle"
COUNTED = re.compile(r"\[\d+\]:")  # an input prompt after its cell ran: "[3]:"


def chromium_or_skip() -> str:
    """The path of Debian's ``chromium``, or skip the test naming the package."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("the browser test needs Chromium: install the Debian package `chromium` (apt-get install chromium)")
    return path


def sync_playwright_or_skip() -> Any:
    """Playwright's ``sync_playwright``, or skip the test saying how to install it (never downloads a browser)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs the Python package playwright: pip install playwright "
                    "(it drives Debian's chromium; no `playwright install` needed)")
    return sync_playwright


def launch_chromium(playwright: Any, executable: str) -> Any:
    """Debian's Chromium, headless, through Playwright: ``launch_chromium(pw, "/usr/bin/chromium")``."""
    return playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)


@contextlib.contextmanager
def chromium_page(chromium: tuple[str, Any], height: int) -> Iterator[Any]:
    """A page 1400 px wide of headless Debian Chromium (``chromium``: its path and ``sync_playwright``), 30 s
    default timeout; the browser ends with the block."""
    executable, sync_playwright = chromium
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, executable)
        try:
            tab = browser.new_page(viewport={"width": 1400, "height": height})
            tab.set_default_timeout(30_000)
            yield tab
        finally:
            browser.close()


# -- processes ---------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/PID/stat), which tells a pid reused from the one we saw."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> set[tuple[int, str]]:
    """Every process below ``pid`` as ``(pid, start time)`` (the farm's services are the kernel's children)."""
    found: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in glob.glob(f"/proc/{parent}/task/*/children"):
            try:
                with open(task) as f:
                    kids = [int(p) for p in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                started = _start_time(kid)
                if started is not None and (kid, started) not in found:
                    found.add((kid, started))
                    todo.append(kid)
    return found


def still_running(processes: set[tuple[int, str]]) -> list[str]:
    """The processes of ``processes`` still running, each as ``"PID command line"``."""
    alive = []
    for pid, started in sorted(processes):
        if _start_time(pid) != started or _state(pid) == "Z":  # gone, or a zombie: ended, its parent reaps it
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # ended meanwhile
        alive.append(f"{pid} {cmd}")
    return alive


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


class JupyterLab:
    """``jupyter lab`` on 127.0.0.1 serving ``root``, with a random token and all its state under ``home``.

        >>> lab = JupyterLab(tmp_path / "root", tmp_path / "lab").start()     # doctest: +SKIP
        >>> lab.api("GET", "api/sessions")                                    # doctest: +SKIP
        []
        >>> lab.stop()                                                        # doctest: +SKIP
    """

    def __init__(self, root: Path, home: Path, env: dict[str, str] | None = None):
        self.root, self.home = Path(root), Path(home)
        self.extra_env = dict(env or {})  # e.g. WORKBENCH_TRACKER: a farm of the test's
        self.token = secrets.token_hex(16)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = self.home / "jupyter-lab.log"
        self.seen: set[tuple[int, str]] = set()  # every descendant seen (kernels, the farm), checked by stop()

    def start(self) -> "JupyterLab":
        dirs = {name: self.home / name for name in ("config", "data", "runtime", "workspaces", "settings", "ipython")}
        for path in dirs.values():
            path.mkdir(parents=True, exist_ok=True)
        for name, values in LAB_SETTINGS.items():
            path = dirs["settings"] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_DATA_DIR=str(dirs["data"]),
                   JUPYTER_RUNTIME_DIR=str(dirs["runtime"]), IPYTHONDIR=str(dirs["ipython"]),
                   JUPYTER_PLATFORM_DIRS="1")
        env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the plots
        for name in ("WORKBENCH_TRACKER", "TVM_TRACKER_HOST", "TVM_TRACKER_PORT", "WORKBENCH_LAB_FARM"):
            env.pop(name, None)  # the notebook starts its own farm, not one named by the caller's environment
        env.update(self.extra_env)
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", "--port=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            f"--LabApp.workspaces_dir={dirs['workspaces']}",
            f"--LabApp.user_settings_dir={dirs['settings']}",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.root)
        try:
            self._wait_ready(dirs["runtime"])
        except BaseException:
            self.stop(check=False)
            raise
        return self

    def _wait_ready(self, runtime: Path) -> None:
        """Read the port from the server's runtime file, then wait for its REST API to answer (bounded)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        info = runtime / f"jpserver-{self.proc.pid}.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with status {self.proc.returncode} while starting:\n"
                                   f"{self.log_tail()}")
            if self.port is None and info.exists():
                try:
                    self.port = int(json.loads(info.read_text())["port"])
                except (ValueError, KeyError):
                    pass  # written in parts: read it again
            if self.port is not None:
                try:
                    self.api("GET", "api/status", timeout=2.0)
                    return
                except (OSError, urllib.error.URLError):
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"jupyter lab did not answer within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def url(self, path: str, *, reset: bool = False) -> str:
        """The page ``path`` with the token (``reset``: a fresh layout, not the one saved in the workspace)."""
        query = ("reset&" if reset else "") + f"token={self.token}"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?{query}"

    def api(self, method: str, path: str, timeout: float = 10.0) -> Any:
        """Call the server's REST API with the token; the decoded JSON answer (None when empty)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/{path.lstrip('/')}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = answer.read()
        return json.loads(body) if body else None

    def note_processes(self) -> None:
        """Remember the server's descendants now (kernels and what they started), for ``stop`` to check."""
        if self.proc is not None:
            self.seen |= descendants(self.proc.pid)

    def shutdown_kernels(self) -> None:
        """Shut every kernel down through the REST API (the kernel exits cleanly: its atexit stops the farm)."""
        for session in self.api("GET", "api/sessions"):
            self.api("DELETE", f"api/sessions/{session['id']}", timeout=STOP_TIMEOUT_S)
        for kernel in self.api("GET", "api/kernels"):
            self.api("DELETE", f"api/kernels/{kernel['id']}", timeout=STOP_TIMEOUT_S)

    def stop(self, *, check: bool = True) -> list[str]:
        """End the kernels (REST), then the server (SIGINT, then kill; bounded); kill what is left below it.

        Returns the processes that outlived the server's end (killed here); with ``check``, fails the test
        naming them.
        """
        if self.proc is None:
            return []
        self.note_processes()
        if self.proc.poll() is None and self.port is not None:
            try:
                self.shutdown_kernels()
            except (OSError, urllib.error.URLError, ValueError):
                pass  # the server's own shutdown ends its kernels too
        self.note_processes()
        if self.proc.poll() is None:
            # a child inherits an ignored SIGINT (e.g. started from a background job): then SIGTERM, as clean
            interrupt = signal.SIGTERM if signal.getsignal(signal.SIGINT) == signal.SIG_IGN else signal.SIGINT
            self.proc.send_signal(interrupt)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S  # the farm's services end when their owner's pipe closes
        while still_running(self.seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = still_running(self.seen)
        for pid, started in self.seen:
            if _start_time(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.proc = None
        if check and left:
            pytest.fail("processes left running after jupyter lab ended (killed now):\n" + "\n".join(left))
        return left

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -- the page ----------------------------------------------------------------------------------
def kernel_idle(page: Any) -> bool:
    """True while the status bar says the notebook's kernel is Idle."""
    return page.locator("#jp-main-statusbar").get_by_text(IDLE).count() > 0


def open_notebook(page: Any, url: str, timeout: float = 90.0) -> None:
    """Open a notebook page and wait (bounded) until its kernel is Idle, accepting a dialog if one asks.

    A dialog (e.g. the kernel chooser of a notebook without a kernelspec) is accepted with its default.
    """
    page.goto(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dialog = page.locator(".jp-Dialog .jp-mod-accept")
        if dialog.count():
            dialog.first.click()
        elif page.locator(".jp-NotebookPanel").count() and kernel_idle(page):
            return
        time.sleep(0.2)
    raise AssertionError(f"the notebook's kernel was not Idle within {timeout:.0f} s; status bar: "
                         f"{page.locator('#jp-main-statusbar').inner_text()!r}")


def run_all_cells(page: Any) -> None:
    """Run > Run All Cells, through the menu bar as a user would."""
    page.locator("#jp-MainMenu").get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()


def save_notebook(page: Any, timeout: float = 30.0) -> str:
    """File > Save Notebook through the menu bar; wait (bounded) for the status bar to say how it went.

    Returns ``"Saving completed"``, ``"Saving failed"`` or ``""`` (no word within ``timeout``). Read the file
    only after: the server writes a notebook in place, and a read during the write can find it half written
    (jupyter_server then moves it aside as ``NAME.invalid``).
    """
    page.locator("#jp-MainMenu").get_by_role("menuitem", name="File", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Save Notebook(?! As)")).click()
    done = page.locator("#jp-main-statusbar").get_by_text(re.compile(r"Saving (completed|failed)"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done.count():
            return done.first.inner_text().strip()
        time.sleep(0.1)
    return ""


def input_prompts(page: Any) -> list[str]:
    """The input prompt of every code cell, in order: ``"[ ]:"`` not run, ``"[*]:"`` queued or running, ``"[3]:"``."""
    return [text.strip() for text in page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()]


def wait_for_run(page: Any, runnable: list[bool], timeout: float,
                 watch: Callable[[], None] | None = None) -> list[str]:
    """Wait (bounded) until the run of all cells ended: the kernel Idle and no cell queued.

    ``runnable[i]`` says whether code cell ``i`` has code (an empty cell never gets a count). Returns the
    prompts; the run ended early (an error stops Run All) when some runnable cell has no count. ``watch()``
    is called at every look, to note what the page shows only for a while (a live panel, before a later
    cell stops what it shows).
    """
    deadline = time.monotonic() + timeout
    settled_since = None
    prompts: list[str] = []
    while time.monotonic() < deadline:
        if watch is not None:
            watch()
        prompts = input_prompts(page)
        idle = kernel_idle(page) and not any("*" in p for p in prompts)
        counted = [bool(COUNTED.fullmatch(p)) for p in prompts]
        if idle and len(counted) == len(runnable) and all(c for c, r in zip(counted, runnable) if r):
            return prompts
        if idle and any(counted):  # stopped early? give the front end a moment to show the last counts
            settled_since = settled_since or time.monotonic()
            if time.monotonic() - settled_since > 3.0:
                return prompts
        else:
            settled_since = None
        time.sleep(0.25)
    return prompts


def fit_viewport_to_notebook(page: Any, width: int = 1400, cap: int = 12000) -> None:
    """Make the window as tall as the notebook (up to ``cap`` px) and scroll it to the top, so that a
    full-page screenshot shows every cell (the notebook scrolls inside the page, not the page itself)."""
    script = """() => {
        const panel = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer')
            || document.querySelector('.jp-NotebookPanel .jp-Notebook');
        if (!panel) return 0;
        panel.scrollTop = 0;
        return panel.scrollHeight - panel.clientHeight;
    }"""
    hidden = page.evaluate(script)
    if hidden > 0:
        size = page.viewport_size or {"height": 1000}
        page.set_viewport_size({"width": width, "height": int(min(cap, size["height"] + hidden + 20))})
        page.wait_for_timeout(300)  # one layout pass
        page.evaluate(script)
