"""The lab extension in a real JupyterLab, in headless Debian Chromium (docs/lab-extension.md).

The Devices sidebar follows a farm's servers joining and leaving, its "Connect in notebook" button
connects the active notebook, the status bar then shows the session's key (its card on a click),
the lab's farm starts and stops from the panel, and a ``%%rpc_compile`` cell is highlighted as C.
Screenshots of each step are saved under the test's tmp path (also on failure).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench import rpc

from .browser import JupyterLab, chromium_or_skip, chromium_page, open_notebook, sync_playwright_or_skip

EXTENSION = "jupyterlab-rpc-workbench"
NOTEBOOK = "scratch.ipynb"
STEP_TIMEOUT_S = 60.0


def _installed() -> bool:
    done = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True, text=True,
                          timeout=120)
    return re.search(rf"{EXTENSION} v\S+ .*enabled", re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)) is not None


C_CELL = "%%rpc_compile k\nint twice(int a) {\n  for (int i = 0; i < 1; ++i) a += a;\n  return a;\n}"
PYTHON_CELL = "int = 3\nfor i in range(int):\n    print(i)"


def _cell(cell_id: str, source: str) -> dict:
    return {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": {}, "outputs": [], "source": source}


@pytest.fixture
def chromium():
    executable = chromium_or_skip()
    sync_playwright = sync_playwright_or_skip()
    if not _installed():
        pytest.fail(f"the lab extension {EXTENSION} is not installed: pip install -e .[notebook] builds and installs "
                    "it (it needs node)")
    return executable, sync_playwright


@pytest.fixture
def lab(chromium, farm, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / NOTEBOOK).write_text(json.dumps({
        "cells": [_cell("first", "1 + 1"), _cell("c", C_CELL), _cell("python", PYTHON_CELL)],
        "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}},
        "nbformat": 4, "nbformat_minor": 5}))
    server = JupyterLab(root, tmp_path / "lab", env={"WORKBENCH_TRACKER": "%s:%d" % farm.tracker_addr}).start()
    try:
        yield server
    finally:
        left = server.stop(check=False)
    assert not left, f"processes outlived jupyter lab (killed now): {left}"


class Shots:
    """Numbered screenshots of the page under the test's tmp path (the test's artifacts)."""

    def __init__(self, page, folder: Path):
        self.page, self.folder, self.count = page, folder, 0

    def __call__(self, name: str) -> Path:
        self.count += 1
        path = self.folder / f"{self.count:02d}-{name}.png"
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture
def page(chromium, lab, tmp_path, capsys):
    with chromium_page(chromium, 900) as tab:
        shots = Shots(tab, tmp_path / "screenshots")
        shots.folder.mkdir()
        try:
            yield tab, shots
        finally:
            lab.note_processes()
            try:
                shots("last")
            finally:
                with capsys.disabled():
                    print(f"\nlab extension screenshots: {shots.folder}")


def _wait(what: str, predicate, timeout: float = STEP_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def _key_row(page, tracker: str, key: str):
    return page.locator(f'.wb-tracker[data-address="{tracker}"] tr.wb-key-row[data-key="{key}"]')


@pytest.mark.timeout(600)
def test_the_devices_sidebar_connects_a_notebook_and_shows_its_session(lab, page, farm):
    page, shot = page
    tracker = "%s:%d" % farm.tracker_addr
    open_notebook(page, lab.url(f"lab/tree/{NOTEBOOK}", reset=True))

    # the sidebar, opened from its tab in the left bar, lists the farm's keys, live
    page.locator('.jp-SideBar [data-id="workbench-devices"]').click()
    _wait("the farm's key in the sidebar", lambda: _key_row(page, tracker, "local").count())
    row = _key_row(page, tracker, "local")
    assert row.locator(".wb-free").inner_text().strip() == "1" and row.locator(".wb-total").inner_text().strip() == "1"
    shot("sidebar")
    with rpc.Server(port=0, key="board", tracker_addr=farm.tracker_addr, silent=True) as board:
        _wait("a server that joins", lambda: _key_row(page, tracker, "board").count())
        assert page.locator(f'.wb-tracker[data-address="{tracker}"] tr.wb-server-row'
                            f'[data-address="127.0.0.1:{board.port}"]').count() == 1
        shot("a-server-joined")
    _wait("a server that leaves", lambda: not _key_row(page, tracker, "board").count())

    # "Connect in notebook": a cell with %load_ext and %rpc_connect, run; the status bar shows the key
    status = page.locator(".wb-status-item")
    assert not status.is_visible()  # the kernel has not loaded the workbench yet
    row.locator("button.wb-connect").click()
    _wait("the status bar's session", lambda: status.is_visible() and "local @ 127.0.0.1:" in status.inner_text())
    sources = page.locator(".jp-CodeCell .jp-InputArea-editor").all_inner_texts()
    assert any("%load_ext workbench" in s and "%rpc_connect --key local" in s for s in sources), sources
    _wait("the device taken", lambda: _key_row(page, tracker, "local").locator(".wb-free").inner_text().strip() == "0")
    shot("connected")

    # a click on it shows the session's card
    status.click()
    dialog = page.locator(".jp-Dialog")
    _wait("the session card", lambda: dialog.count() and "127.0.0.1" in dialog.inner_text())
    shot("session-card")
    dialog.locator(".jp-mod-accept, .jp-mod-reject").first.click()


@pytest.mark.timeout(600)
def test_a_rpc_compile_cell_is_highlighted_as_c(lab, page):
    page, shot = page
    open_notebook(page, lab.url(f"lab/tree/{NOTEBOOK}", reset=True))
    c_cell = page.locator(".jp-CodeCell").nth(1)
    python_cell = page.locator(".jp-CodeCell").nth(2)
    _wait("the C cell marked", lambda: "wb-c-cell" in (c_cell.get_attribute("class") or ""))
    # `int` is a C type there (lezer's C grammar, tok-typeName), and a plain name in the Python cell
    c_types = _wait("C tokens (the C grammar loads on demand)",
                    lambda: c_cell.locator(".cm-content .tok-typeName").all_inner_texts())
    assert c_types.count("int") == 3, c_types
    assert c_cell.locator(".cm-content .tok-keyword").filter(has_text="return").count() == 1
    assert python_cell.locator(".cm-content .tok-typeName").count() == 0
    assert "wb-c-cell" not in (python_cell.get_attribute("class") or "")
    shot("c-cell")


@pytest.mark.timeout(600)
def test_the_sidebar_starts_and_stops_the_lab_farm(lab, page):
    page, shot = page
    open_notebook(page, lab.url(f"lab/tree/{NOTEBOOK}", reset=True))
    page.locator('.jp-SideBar [data-id="workbench-devices"]').click()
    farm_status = page.locator(".wb-farm-status")
    _wait("the farm's status", lambda: "stopped" in farm_status.inner_text())
    page.locator("button.wb-farm-start").click()
    _wait("the farm running", lambda: "running" in farm_status.inner_text())
    farm_tracker = page.locator('.wb-tracker').filter(has_text="farm")
    _wait("the farm's keys", lambda: farm_tracker.locator('tr.wb-key-row[data-key="local"]').count())
    shot("farm-running")
    page.locator("button.wb-farm-stop").click()
    _wait("the farm stopped", lambda: "stopped" in farm_status.inner_text())
    shot("farm-stopped")
