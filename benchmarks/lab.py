"""Seventh table, "lab": what the JupyterLab extension costs a user at start-up ("Cost. With the extension, the
lab reaches 'Idle' at most 10 % later than without it, measured in a benchmark").

    python benchmarks/lab.py            # this table alone
    python benchmarks/lab.py --quick    # 2 pairs of runs instead of 5

* to Idle: from starting ``jupyter lab`` (the timer starts at Popen) until a notebook's kernel shows "Idle" in
  the status bar: the server's REST API answering (its port read from the runtime file), then
  ``lab/tree/bench.ipynb?reset`` (one cell, kernelspec python3) opened in headless Debian Chromium driven by
  Playwright, in a fresh browser context (empty cache), until ``#jp-main-statusbar`` shows ``| Idle``.
* two variants, interleaved in pairs (with, without, with, without ...) after one untimed warm-up pair:
  with = the extension as installed (the frontend from ``share/jupyter/labextensions``, the server extension
  enabled by ``etc/jupyter/jupyter_server_config.d/rpc-workbench.json``); without = both halves off for that run
  only: ``labconfig/page_config.json`` ``{"disabledExtensions": {"jupyterlab-rpc-workbench": true}}`` in the
  run's JUPYTER_CONFIG_DIR (JupyterLab merges page_config from every config dir) and
  ``--ServerApp.jpserver_extensions=workbench.lab_extension=False``. After the timer each run checks that it
  is the variant it claims: the page's ``jupyter-config-data`` (disabledExtensions), the Devices sidebar tab
  ``[data-id="workbench-devices"]``, and ``GET workbench/api/trackers`` (200 with, 404 without).
* ratio = median with / median without, target <= 1.10; informative: the server's start to its REST API
  answering, and what the page fetched of the extension's files before Idle (a disabled federated extension's
  JavaScript is still fetched by JupyterLab 4, only its plugins are not activated and its style not loaded).

Every run has its own JUPYTER_CONFIG_DIR, DATA_DIR, RUNTIME_DIR, workspace and user settings (the news toast
off) under a temporary directory, as tests/browser.py's ``JupyterLab`` sets them up, and a random token; all
on 127.0.0.1. ``WORKBENCH_TRACKER`` names a ``LocalFarm({"local": 1})`` this process starts, in both variants.
Without the extension installed (``jupyter labextension list`` does not list ``jupyterlab-rpc-workbench``)
the table says it skipped. Kernels, servers, the browser and the farm end before it returns (bounded waits,
leftovers killed).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

if __package__:
    from . import harness
else:  # run as a script: this directory is sys.path[0]
    import harness

EXTENSION = "jupyterlab-rpc-workbench"  # the frontend (federated) extension
SERVER_EXTENSION = "workbench.lab_extension"
SIDEBAR_TAB = '[data-id="workbench-devices"]'
API_PATH = "workbench/api/trackers"
TARGET_RATIO = 1.10
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]
START_TIMEOUT_S = 90.0  # the server answering its REST API
IDLE_TIMEOUT_S = 90.0  # the page showing the kernel Idle
STOP_TIMEOUT_S = 20.0  # each step of ending the server and its kernels
LIST_TIMEOUT_S = 120.0  # jupyter labextension list
NOT_INSTALLED = "skipped: the lab extension is not installed (pip install -e .[notebook])"
VARIANTS = ("with", "without")

# as tests/browser.py (not imported: it needs pytest and fails tests; the benchmark needs the moment of Popen
# and a variant's own flags): user settings for an unattended page, the status bar's kernel item when Idle
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}
IDLE = re.compile(r"\|\s*Idle\b")  # "Python 3 (ipykernel) | Idle"
NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "bench", "metadata": {}, "outputs": [],
               "source": ["1 + 1"]}],
    "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                 "language_info": {"name": "python"}},
    "nbformat": 4, "nbformat_minor": 5,
}
# what the page fetched, read after the timer (a listener in Python would add work to the timed window)
RESOURCES_JS = """() => performance.getEntriesByType('resource').map(e => ({
    name: e.name, start: e.startTime, end: e.responseEnd, bytes: e.encodedBodySize || 0}))"""
CONFIG_JS = "() => JSON.parse(document.getElementById('jupyter-config-data').textContent)"


def extension_listed() -> bool:
    """Whether ``jupyter labextension list`` lists the frontend extension (installed in some data dir)."""
    proc = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
                          text=True, timeout=LIST_TIMEOUT_S, stdin=subprocess.DEVNULL)
    return re.search(rf"^\s*{re.escape(EXTENSION)}\s", proc.stdout + proc.stderr, re.MULTILINE) is not None


# -- one jupyter lab --------------------------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: tells a pid reused from the process we saw."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(processes: set[tuple[int, str]]) -> list[int]:
    alive = []
    for pid, started in processes:
        if _start_time(pid) != started:
            continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "Z":  # a zombie has ended: its parent reaps it
                alive.append(pid)
    return alive


class Lab:
    """``jupyter lab`` on 127.0.0.1 for one run of ``variant``, all its state under ``home``."""

    def __init__(self, home: Path, variant: str, tracker: str):
        self.home, self.variant, self.tracker = home, variant, tracker
        self.root = home / "root"
        self.dirs = {name: home / name for name in ("config", "data", "runtime", "workspaces", "settings", "ipython")}
        self.token = secrets.token_hex(16)
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = home / "jupyter-lab.log"
        self.seen: set[tuple[int, str]] = set()  # the server's descendants (the kernel), ended by stop()

    def prepare(self) -> None:
        """Everything the run needs on disk, before the timer."""
        for path in [self.root, *self.dirs.values()]:
            path.mkdir(parents=True, exist_ok=True)
        (self.root / "bench.ipynb").write_text(json.dumps(NOTEBOOK))
        for name, values in LAB_SETTINGS.items():
            path = self.dirs["settings"] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        if self.variant == "without":
            labconfig = self.dirs["config"] / "labconfig"
            labconfig.mkdir()
            (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": {EXTENSION: True}}))

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(self.dirs["config"]), JUPYTER_DATA_DIR=str(self.dirs["data"]),
                   JUPYTER_RUNTIME_DIR=str(self.dirs["runtime"]), IPYTHONDIR=str(self.dirs["ipython"]),
                   JUPYTER_PLATFORM_DIRS="1")
        env.pop("MPLBACKEND", None)
        for name in ("TVM_TRACKER_HOST", "TVM_TRACKER_PORT", "WORKBENCH_LAB_FARM"):
            env.pop(name, None)
        env["WORKBENCH_TRACKER"] = self.tracker  # the benchmark's farm: the sidebar's poller has a real tracker
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser", f"--ip={harness.HOST}", "--port=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
            f"--LabApp.workspaces_dir={self.dirs['workspaces']}", f"--LabApp.user_settings_dir={self.dirs['settings']}",
        ]
        if self.variant == "without":
            cmd.append(f"--ServerApp.jpserver_extensions={SERVER_EXTENSION}=False")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        return cmd, env

    def start(self, cmd: list[str], env: dict[str, str]) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.root)

    def wait_ready(self) -> None:
        """The port from the runtime file, then the REST API answering (bounded)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        info = self.dirs["runtime"] / f"jpserver-{self.proc.pid}.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with status {self.proc.returncode} while starting: "
                                   f"{self.log_tail()}")
            if self.port is None and info.exists():
                with contextlib.suppress(ValueError, KeyError):  # written in parts: read it again
                    self.port = int(json.loads(info.read_text())["port"])
            if self.port is not None:
                with contextlib.suppress(OSError):
                    self.status("api/status", timeout=2.0)
                    return
            time.sleep(0.02)
        raise RuntimeError(f"jupyter lab did not answer within {START_TIMEOUT_S:.0f} s: {self.log_tail()}")

    def url(self, path: str) -> str:
        return f"http://{harness.HOST}:{self.port}/{path}?reset&token={self.token}"

    def request(self, method: str, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        """(HTTP status, decoded JSON or None) of a REST call with the token; an HTTP error is a status too."""
        req = urllib.request.Request(f"http://{harness.HOST}:{self.port}/{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as answer:
                body = answer.read()
                return answer.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as exc:
            exc.close()
            return exc.code, None

    def status(self, path: str, timeout: float = 10.0) -> int:
        return self.request("GET", path, timeout)[0]

    def note_processes(self) -> None:
        if self.proc is not None:
            for pid in harness.descendants(self.proc.pid):
                started = _start_time(pid)
                if started is not None:
                    self.seen.add((pid, started))

    def stop(self) -> list[str]:
        """End the kernels (REST), then the server (SIGTERM, then kill; bounded); kill what is left below it.

        Returns what outlived the server's end (killed here), each as "PID command".
        """
        if self.proc is None:
            return []
        self.note_processes()
        if self.proc.poll() is None and self.port is not None:
            with contextlib.suppress(OSError, ValueError):
                for kind in ("sessions", "kernels"):
                    for item in self.request("GET", f"api/{kind}")[1] or []:
                        self.request("DELETE", f"api/{kind}/{item['id']}", timeout=STOP_TIMEOUT_S)
        self.note_processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # jupyter_server's clean stop (its kernels too)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        harness.wait_until(lambda: not _alive(self.seen), STOP_TIMEOUT_S)
        left = []
        for pid in _alive(self.seen):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                left.append(f"{pid} {command}")
                os.kill(pid, signal.SIGKILL)
        self.proc = None
        return left

    def log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -- one run --------------------------------------------------------------------------------------
def one_run(browser: Any, variant: str, home: Path, tracker: str) -> dict[str, Any]:
    """Start a lab of ``variant`` and open the notebook until its kernel is Idle; the seconds, and what was checked."""
    lab = Lab(home, variant, tracker)
    lab.prepare()
    cmd, env = lab.command()
    context = browser.new_context()
    figures: dict[str, Any] = {"variant": variant}
    try:
        page = context.new_page()
        page.add_init_script("performance.setResourceTimingBufferSize(5000)")
        idle = page.locator("#jp-main-statusbar").get_by_text(IDLE).first
        began = time.perf_counter()
        lab.start(cmd, env)
        lab.wait_ready()
        figures["rest_s"] = time.perf_counter() - began
        page.goto(lab.url("lab/tree/bench.ipynb"), wait_until="commit", timeout=IDLE_TIMEOUT_S * 1000)
        try:
            idle.wait_for(timeout=IDLE_TIMEOUT_S * 1000)
        except Exception as exc:
            bar = page.locator("#jp-main-statusbar")
            raise RuntimeError(f"the kernel was not Idle within {IDLE_TIMEOUT_S:.0f} s ({variant}); status bar: "
                               f"{bar.inner_text() if bar.count() else '(none)'!r}; dialog shown: "
                               f"{page.locator('.jp-Dialog').count() > 0}") from exc
        figures["idle_s"] = time.perf_counter() - began
        figures.update(check_variant(page, lab, variant))
    finally:
        with contextlib.suppress(Exception):
            context.close()
        figures["left_running"] = lab.stop()
    return figures


def check_variant(page: Any, lab: Lab, variant: str) -> dict[str, Any]:
    """After the timer: that the run had (or had not) both halves of the extension; what the page fetched."""
    config = page.evaluate(CONFIG_JS)
    disabled = EXTENSION in config.get("disabledExtensions", [])
    federated = EXTENSION in [e.get("name") for e in config.get("federated_extensions", [])]
    if variant == "with":  # the sidebar's tab appears as the app starts: give it a moment after Idle
        sidebar = harness.wait_until(lambda: page.locator(SIDEBAR_TAB).count() > 0, 10.0)
    else:
        sidebar = page.locator(SIDEBAR_TAB).count() > 0
    api = lab.status(API_PATH)
    checks = {"page_config_lists": federated, "page_config_disables": disabled, "sidebar_tab": sidebar,
              "api_status": api}
    if variant == "with" and not (federated and not disabled and sidebar and api == 200):
        raise RuntimeError(f"the 'with' run lacks part of the extension: {checks} (is {SERVER_EXTENSION} enabled? "
                           "jupyter server extension list)")
    if variant == "without" and not (disabled and not sidebar and api == 404):
        raise RuntimeError(f"the 'without' run still has part of the extension: {checks}")
    resources = page.evaluate(RESOURCES_JS)
    mine = [r for r in resources if f"/lab/extensions/{EXTENSION}/" in r["name"]]
    return {
        "checks": checks,
        "resources": len(resources),
        "resource_bytes": sum(r["bytes"] for r in resources),
        "extension_files": [{"name": r["name"].split("?")[0].rsplit("/", 1)[-1], "bytes": r["bytes"],
                             "start_ms": round(r["start"], 1), "end_ms": round(r["end"], 1)} for r in mine],
        "api_requests": sum(f"/{API_PATH.rsplit('/', 1)[0]}/" in r["name"] for r in resources),
    }


# -- the table ------------------------------------------------------------------------------------
def measure(pairs: int) -> dict[str, Any]:
    """``pairs`` interleaved pairs of runs (after one untimed warm-up pair), every process ended."""
    from playwright.sync_api import sync_playwright

    from workbench.farm import LocalFarm

    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"no {CHROMIUM}: install the Debian package chromium (apt-get install chromium)")
    runs: list[dict[str, Any]] = []
    warmup: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="wb-bench-lab-"))
    farm = LocalFarm({"local": 1})
    try:
        tracker = f"{farm.tracker_addr[0]}:{farm.tracker_addr[1]}"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                for i in range(pairs + 1):
                    for variant in VARIANTS:
                        figures = one_run(browser, variant, work / f"{i:02d}-{variant}", tracker)
                        (warmup if i == 0 else runs).append(figures)
            finally:
                browser.close()
    finally:
        farm.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"tracker": tracker, "pairs": pairs, "runs": runs, "warmup": warmup}


def rows_of(doc: dict[str, Any]) -> list[list[str]]:
    by = {v: [r for r in doc["runs"] if r["variant"] == v] for v in VARIANTS}
    idle = {v: [r["idle_s"] for r in by[v]] for v in VARIANTS}
    rest = {v: [r["rest_s"] for r in by[v]] for v in VARIANTS}
    ratio = statistics.median(idle["with"]) / statistics.median(idle["without"])
    pair_ratios = [w / wo for w, wo in zip(idle["with"], idle["without"])]
    passed = ratio <= TARGET_RATIO
    doc.update({"idle_s": idle, "rest_s": rest, "ratio": ratio, "pair_ratios": pair_ratios, "pass": passed,
                "target": f"<= {TARGET_RATIO:.2f}"})
    n = len(idle["with"])
    labels = {"with": "with the extension", "without": "without (both halves disabled for the run)"}
    rows = [[f"start to the notebook's kernel Idle, {labels[v]}", f"{statistics.median(idle[v]):.2f} s",
             f"median of {len(idle[v])} ({harness.span(idle[v], lambda x: f'{x:.2f}')} s)", ""] for v in VARIANTS]
    met = sum(r <= TARGET_RATIO for r in pair_ratios)
    rows.append(["to Idle: with / without", f"{ratio:.3f}",
                 f"median with / median without; pairs {harness.span(pair_ratios, lambda x: f'{x:.3f}')}",
                 f"<= {TARGET_RATIO:.2f}: {'PASS' if passed else 'FAIL'} (pairs: met in {met} of {n})"])
    for v in VARIANTS:
        rows.append([f"server start to REST API answering, {v} (info)", f"{statistics.median(rest[v]):.2f} s",
                     f"median of {len(rest[v])} ({harness.span(rest[v], lambda x: f'{x:.2f}')} s)", ""])
    for v in VARIANTS:
        files = [len(r["extension_files"]) for r in by[v]]
        kb = [sum(f["bytes"] for f in r["extension_files"]) / 1e3 for r in by[v]]
        api = [r["api_requests"] for r in by[v]]
        rows.append([f"the extension's files fetched before Idle, {v} (info)",
                     f"{statistics.median(files):g} ({statistics.median(kb):.1f} kB)",
                     f"median of {len(files)}; workbench API requests before Idle: {statistics.median(api):g}", ""])
    return rows


def measure_lab(quick: bool) -> tuple[str, dict[str, Any]]:
    pairs = 2 if quick else 5
    title = "lab (the lab extension's cost: JupyterLab reaches Idle at most 10 % later with it)"
    header = ["lab", "ours", "spread", "target"]
    label = "start to the notebook's kernel Idle: with / without"
    try:
        listed = extension_listed()
    except Exception as exc:
        return "\n".join([title, *harness.table_lines(header, [[label, "n/a", harness.reason_of(exc), ""]])]), {
            "skipped": harness.reason_of(exc)}
    if not listed:
        return "\n".join([title, *harness.table_lines(header, [[label, "n/a", NOT_INSTALLED, ""]])]), {
            "skipped": NOT_INSTALLED}
    try:
        document = measure(pairs)
        rows = rows_of(document)
    except Exception as exc:
        return "\n".join([title, *harness.table_lines(header, [[label, "n/a", harness.reason_of(exc), ""]])]), {
            "error": harness.reason_of(exc)}
    notes = [f"each run: Popen of jupyter lab to '| Idle' in the status bar of lab/tree/bench.ipynb?reset "
             f"(headless Chromium, fresh context); {document['pairs']} pairs interleaved (with, without) after one "
             f"untimed warm-up pair; WORKBENCH_TRACKER = a LocalFarm({{'local': 1}}) at {document['tracker']}."]
    left = [p for r in document["runs"] + document["warmup"] for p in r["left_running"]]
    if left:
        notes.append(f"left running after a lab ended (killed): {'; '.join(left)}")
    return "\n".join([title, *harness.table_lines(header, rows), *notes]), document


def main(argv: list[str] | None = None) -> int:
    return harness.section_main(argv, "lab.py", __doc__, "2 pairs of runs instead of 5",
                                lambda args: measure_lab(args.quick))


if __name__ == "__main__":
    sys.exit(main())
