"""The quickstart notebook run in JupyterLab, in a real browser (headless Debian Chromium, driven by Playwright).

What a user sees after Run All Cells: the device picker widget listing the
farm's keys, the timing table, the plot, and no error. Only what renders in
the output areas counts (``.jp-OutputArea-output``): the cells' sources hold the
same words, so a match on the page's text would pass without running anything.
The notebook is a copy with its outputs cleared, so every output comes from
this run. The screenshot is saved under the test's tmp path, also on failure.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from .browser import (
    COUNTED,
    JupyterLab,
    chromium_or_skip,
    chromium_page,
    fit_viewport_to_notebook,
    input_prompts,
    open_notebook,
    run_all_cells,
    save_notebook,
    sync_playwright_or_skip,
    wait_for_run,
)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
QUICKSTART = "01-quickstart.ipynb"
SCREENSHOT = "quickstart.png"  # under the test's tmp path
RUN_TIMEOUT_S = 240.0  # Run All Cells, bounded (it takes ~5 s on an idle machine)
WIDGET_TIMEOUT_S = 30.0  # the picker fills its table from a background poll of the tracker
SAVE_TIMEOUT_S = 30.0
# an error output: a traceback, or the one-line form of the workbench magics' errors ("MagicError: ...")
ERROR_TEXT = re.compile(r"Traceback \(most recent call last\)|^\s*\w*(Error|Exception|Interrupt)\b.*:", re.M)
TIMING_COLUMNS = {"seconds", "mean", "median"}  # %rpc_results: one row per repeat, or --summary


def clear_outputs(path: Path) -> list[str]:
    """Clear the notebook's outputs and counts in place; return the source of each code cell, in order."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    sources = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            sources.append(cell.source)
    nbformat.write(nb, path)
    return sources


def farm_keys(sources: list[str]) -> set[str]:
    """The device keys the notebook's ``%rpc_farm --servers KEY=N ...`` starts (``local`` by default)."""
    keys: set[str] = set()
    for source in sources:
        for line in source.splitlines():
            if line.strip().startswith("%rpc_farm") and "--servers" in line:
                keys.update(re.findall(r"([\w.-]+)=\d+", line.split("--servers", 1)[1]))
    return keys or {"local"}


def error_outputs(page) -> list[str]:
    """The text of every stderr-rendered output that shows an error (JupyterLab renders errors as stderr)."""
    texts = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
    return [text.strip()[:2000] for text in texts if ERROR_TEXT.search(text)]


def timing_tables(page) -> list[list[str]]:
    """The column headings of each HTML table rendered in an output that has rows and timing columns."""
    headings = page.evaluate(
        """() => [...document.querySelectorAll('.jp-OutputArea-output table')]
              .filter(t => t.querySelectorAll('tbody tr').length > 0)
              .map(t => [...t.querySelectorAll('thead th')].map(th => th.innerText.trim()))""")
    # a summary names its unit in the header ("mean (µs)"): the column is "mean"
    return [h for h in headings if "function" in h and TIMING_COLUMNS & {c.split(" (")[0] for c in h}]


def png_plots(page) -> list[int]:
    """The natural width of each PNG image rendered in an output (0: it did not decode)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('.jp-OutputArea-output img')]
              .filter(i => i.src.startsWith('data:image/png'))
              .map(i => (i.complete ? i.naturalWidth : 0))""")


def picker_keys(page) -> set[str]:
    """The device keys the picker widget lists now (in its queue rows and its key dropdown)."""
    return set(page.evaluate(
        """() => {
            const scope = '.jp-OutputArea-output .jupyter-widgets';
            const cells = [...document.querySelectorAll(scope + ' .widget-html-content span[title]')];
            const options = [...document.querySelectorAll(scope + ' .widget-dropdown select option')];
            const rows = cells.map(s => s.innerText.trim());
            const chosen = new Set(options.map(o => o.value || o.innerText.trim()));
            return rows.filter(k => chosen.has(k));
        }"""))


def widget_outputs(page) -> list[str]:
    """The text of each output that holds a widget, or the front end's message in its place ("Loading widget...")."""
    return [text.strip()[:1500] for text in page.evaluate(
        """() => [...document.querySelectorAll('.jp-OutputArea-output')]
              .filter(o => o.querySelector('.jupyter-widgets') || /widget/i.test(o.innerText))
              .map(o => o.innerText)""")]


def saved_code_cells(lab: JupyterLab) -> list[dict]:
    """The code cells of the notebook file (as the front end saved it), through the REST API."""
    model = lab.api("GET", f"api/contents/{QUICKSTART}?content=1")
    return [cell for cell in model["content"]["cells"] if cell["cell_type"] == "code"]


@pytest.fixture
def chromium() -> tuple[str, object]:
    """Debian's chromium and Playwright's ``sync_playwright``; skips (naming what to install) before anything starts."""
    executable = chromium_or_skip()
    sync_playwright = sync_playwright_or_skip()
    pytest.importorskip("jupyterlab", reason="the browser test needs JupyterLab: pip install jupyterlab")
    pytest.importorskip("nbformat", reason="the browser test needs nbformat: pip install nbformat")
    return executable, sync_playwright


@pytest.fixture
def quickstart(tmp_path) -> list[str]:
    """A copy of notebooks/ as the server's root, the quickstart's outputs cleared; its code cells' sources."""
    assert (NOTEBOOKS / QUICKSTART).is_file(), f"{NOTEBOOKS / QUICKSTART} is missing"
    shutil.copytree(NOTEBOOKS, tmp_path / "notebooks")
    return clear_outputs(tmp_path / "notebooks" / QUICKSTART)


@pytest.fixture
def lab(chromium, quickstart, tmp_path):
    """jupyter lab serving the copy; at the end its kernels and the server stop, and nothing below them is left."""
    server = JupyterLab(tmp_path / "notebooks", tmp_path / "lab").start()
    try:
        yield server
    finally:
        left = server.stop(check=False)
    assert not left, f"processes outlived jupyter lab (killed now): {left}"


@pytest.fixture
def page(chromium, lab, tmp_path, capsys):
    """A page of headless Debian chromium; at the end (failures included) a screenshot of the whole notebook."""
    with chromium_page(chromium, 1000) as tab:
        try:
            yield tab
        finally:
            lab.note_processes()  # the kernel and the farm it started: stop() checks that they end
            try:
                try:
                    fit_viewport_to_notebook(tab)
                except Exception as exc:  # a page in a bad state: its screenshot as it is, then
                    print(f"could not fit the window to the notebook: {exc}")
                tab.screenshot(path=str(tmp_path / SCREENSHOT), full_page=True)
            finally:
                with capsys.disabled():
                    print(f"\nbrowser test screenshot: {tmp_path / SCREENSHOT}")


@pytest.mark.timeout(600)  # above the sum of the bounded waits; a run takes ~20 s
def test_quickstart_runs_in_jupyterlab(quickstart, lab, page, tmp_path):
    where = f"(screenshot: {tmp_path / SCREENSHOT})"
    runnable = [bool(source.strip()) for source in quickstart]
    keys = farm_keys(quickstart)

    open_notebook(page, lab.url(f"lab/tree/{QUICKSTART}", reset=True))
    before = input_prompts(page)
    assert before == ["[ ]:"] * len(quickstart), \
        f"expected {len(quickstart)} code cells not yet run, the page shows {before} {where}"

    # the picker is live: the notebook may stop the farm in a later cell, and the panel then empties;
    # so note the keys it lists at every look while the cells run
    shown: set[str] = set()
    run_all_cells(page)
    prompts = wait_for_run(page, runnable, RUN_TIMEOUT_S, watch=lambda: shown.update(picker_keys(page)))
    errors = error_outputs(page)
    not_run = [i + 1 for i, (p, r) in enumerate(zip(prompts, runnable)) if r and not COUNTED.fullmatch(p)]
    assert not not_run and len(prompts) == len(quickstart), \
        f"code cells {not_run} did not run (prompts {prompts}); error outputs: {errors} {where}"
    assert not errors, f"cells printed errors: {errors} {where}"

    deadline = time.monotonic() + WIDGET_TIMEOUT_S  # or the farm still runs and the panel is slow to show it
    while not keys <= shown and time.monotonic() < deadline:
        shown.update(picker_keys(page))
        time.sleep(0.25)
    assert keys <= shown, (
        f"the device picker widget listed keys {sorted(shown)}, expected the farm's {sorted(keys)}; "
        f"the widget outputs show: {widget_outputs(page)} {where}")
    assert timing_tables(page), \
        f"no timing table (columns function and one of {sorted(TIMING_COLUMNS)}) rendered in an output {where}"
    plots = png_plots(page)
    assert plots and all(plots), f"no PNG plot rendered in an output (widths {plots}) {where}"

    # what the front end holds, saved: no output of type "error" (JupyterLab renders errors as stderr)
    saved = save_notebook(page, SAVE_TIMEOUT_S)
    assert saved == "Saving completed", f"File > Save Notebook: the status bar says {saved or 'nothing'!r} {where}"
    cells = saved_code_cells(lab)
    counts = [cell["execution_count"] for cell in cells]
    assert len(cells) == len(runnable) and all(n for n, r in zip(counts, runnable) if r), \
        f"the saved notebook does not hold the run: execution counts {counts} {where}"
    failed = [(i + 1, o.get("ename"), o.get("evalue")) for i, c in enumerate(cells)
              for o in c["outputs"] if o["output_type"] == "error"]
    assert not failed, f"code cells with an error output (number, ename, evalue): {failed} {where}"
