"""The tutorial notebooks, executed top to bottom with nbclient in a real kernel, as a user runs them.

Each notebook runs in a temporary copy of notebooks/ with a timeout per cell; a
failed cell fails the test with the cell's source and its error. A cell
appended by the test then checks that the notebook ended every farm, server
and session it started (no child process of the kernel is left). Notebooks 02
and 05 use the emulated aarch64 board where qemu-user and the cross compiler
are installed; they also run once more with those tools hidden from PATH, as
on a machine without them, where they must go on with the host server.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need nbformat (pip install -e '.[test]')")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need nbclient (pip install -e '.[test]')")
pytest.importorskip("ipykernel", reason="the notebook tests need ipykernel (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 180  # a generous bound per cell: on a loaded 2-core machine the slowest cell takes a few seconds
KERNEL_START_TIMEOUT_S = 120
BOARD_TOOLS = ("qemu-aarch64", "aarch64-linux-gnu-")  # hidden from PATH in the "no-board" runs
BOARD_NOTEBOOKS = ("02-cross-compilation-and-rpc", "05-benchmarking-across-devices")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Appended to every notebook: what it started must be gone once its last cell ran.
LEFTOVER_CHECK = """
import glob as _glob, os as _os, time as _time

def _children():
    pids = []
    for path in _glob.glob(f"/proc/{_os.getpid()}/task/*/children"):
        with open(path) as f:
            pids += [int(p) for p in f.read().split()]
    return pids

_deadline = _time.monotonic() + 15
while _children() and _time.monotonic() < _deadline:
    _time.sleep(0.1)
_left = {pid: open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode(errors="replace")
         for pid in _children() if _os.path.exists(f"/proc/{pid}/cmdline")}
assert not _left, f"the notebook left processes running: {_left}"
import sys as _sys
if "workbench.farm" in _sys.modules:
    from workbench.farm import current_farm as _current_farm
    assert _current_farm() is None, f"the notebook left its embedded farm running: {_current_farm()!r}"
"""


def board_available() -> bool:
    return bool(shutil.which("qemu-aarch64") and shutil.which("aarch64-linux-gnu-gcc"))


def cases() -> list:
    out = [pytest.param(path, False, id=path.stem) for path in NOTEBOOKS]
    for path in NOTEBOOKS:
        if path.stem in BOARD_NOTEBOOKS and board_available():
            out.append(pytest.param(path, True, id=f"{path.stem}[no-board]"))
    return out


def path_without_board(bin_dir: Path) -> str:
    """A PATH of one directory linking every program on PATH except qemu-aarch64 and the aarch64 cross tools."""
    bin_dir.mkdir()
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = os.path.join(folder, name)
            link = bin_dir / name
            if name.startswith(BOARD_TOOLS) or link.exists() or not os.access(target, os.X_OK):
                continue
            link.symlink_to(target)
    return str(bin_dir)


def failure_report(name: str, nb) -> str:
    """The first cell with an error output: its index, source and error, without terminal colours."""
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                trace = ANSI.sub("", "\n".join(output.get("traceback", [])))
                return (f"{name}: cell {index} failed\n--- cell source ---\n{cell.source}\n--- error ---\n"
                        f"{output.get('ename')}: {output.get('evalue')}\n{trace[-6000:]}")
    return f"{name}: the execution failed without an error output"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path, hide_board", cases())
def test_notebook_runs_top_to_bottom(path, hide_board, tmp_path, monkeypatch, private_tmpdir):
    for var in ("WORKBENCH_TRACKER", "TVM_TRACKER_HOST", "TVM_TRACKER_PORT"):
        monkeypatch.delenv(var, raising=False)  # each notebook starts the farm it uses
    if hide_board:
        monkeypatch.setenv("PATH", path_without_board(tmp_path / "bin"))
    work = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, work)
    nb = nbformat.read(work / path.name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(LEFTOVER_CHECK))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=KERNEL_START_TIMEOUT_S,
                                     kernel_name="python3", resources={"metadata": {"path": str(work)}})
    failure = None
    try:
        client.execute()
    except nbclient.exceptions.CellTimeoutError as exc:
        failure = f"{path.stem}: a cell ran longer than {CELL_TIMEOUT_S} s: {exc}"
    except nbclient.exceptions.CellExecutionError:
        failure = failure_report(path.stem, nb)
    if failure:  # outside the except block: the report alone, not chained to nbclient's copy of it
        pytest.fail(failure, pytrace=False)
    texts = "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    if hide_board:  # the machine "without qemu" is told what to install, and the notebook went on
        assert "sudo apt-get install" in texts and "qemu-user" in texts and "gcc-aarch64-linux-gnu" in texts
        assert "local_demo = True" in texts


def test_notebooks_are_committed_clean():
    """Outputs cleared, a python3 kernelspec (JupyterLab opens them without asking), valid nbformat."""
    assert [p.stem for p in NOTEBOOKS] == [
        "01-quickstart", "02-cross-compilation-and-rpc", "03-rpc-system", "04-testing-with-rpc_run",
        "05-benchmarking-across-devices", "06-tvm-kernels",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.get("kernelspec", {}).get("name") == "python3", path.name
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {index} has outputs"
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), f"{path.name}: no title"


def test_quickstart_shows_picker_table_and_plot():
    """What the browser test and `python -m workbench.lab --headless` look for in 01-quickstart."""
    nb = nbformat.read(NOTEBOOK_DIR / "01-quickstart.ipynb", as_version=4)
    sources = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    assert any(s.strip() == "%rpc_tracker" for s in sources)
    tagged = {tag: cell.source for cell in nb.cells for tag in cell.metadata.get("tags", [])}
    assert tagged.get("results-table", "").startswith("%rpc_results --summary")
    assert tagged.get("results-plot", "").startswith("%rpc_results --plot")


def test_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"notebooks/{path.name}" in readme, f"README.md does not link {path.name}"
