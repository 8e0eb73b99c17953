"""A newcomer's first hour (issue 15, point 5): the small things that made the loop harder than it is.

Compiler line numbers as the notebook shows them (host and cross compilers, TVM targets); a
``%%rpc_compile`` cell with no kernel; short tracebacks for the workbench's expected errors in plain
calls, through a real IPython shell; ``import workbench.notebook`` without IPython; the README's
snippets import what they use, and its JupyterLab snippet runs in a real shell against a real farm;
``.ipynb_checkpoints`` ignored; ``binder/runtime.txt``; and ``python -m workbench.lab`` saying which
variant it runs and why, with ``--serve`` to force serving.
"""
from __future__ import annotations

import ast
import builtins
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from workbench import cc, rpc  # noqa: E402
from workbench.cc.source import CompileError, build_source  # noqa: E402
from workbench.cc.targets import ToolchainNotFoundError  # noqa: E402
from workbench.errors import RemoteError, WorkbenchError  # noqa: E402
from workbench.notebook import MagicError  # noqa: E402
from workbench.notebook.tracebacks import HIDDEN_NOTE  # noqa: E402

from .helpers import drop_sessions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# line 1 in the editor is the %%rpc_compile line; the undeclared name is on line 5
BROKEN_CELL = """%%rpc_compile broken
#include <workbench_kernel.h>

WB_KERNEL(broken) {
  undeclared_thing = 3;
  return 0;
}
"""
NO_KERNEL = r"""#include <workbench_kernel.h>

static int helper(int x) { return x + 1; }
int plain_function(int x) { return helper(x); }
"""
TWO_ARGS = r"""#include <workbench_kernel.h>

WB_KERNEL(add_one) {
  WB_EXPECT_ARGS(2);
  return 0;
}
"""


def plain(text: str) -> str:
    return _ANSI.sub("", text)


@pytest.fixture(scope="module")
def shell(private_tmpdir):
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "workbench")
    yield ip
    drop_sessions(ip.user_ns)
    ip.run_line_magic("unload_ext", "workbench")


@pytest.fixture
def ns(shell, server):
    shell.user_ns["remote"] = rpc.connect("127.0.0.1", server.port)
    yield shell.user_ns
    drop_sessions(shell.user_ns)


# -- (a) compiler line numbers as the editor shows them ---------------------------------------------
def test_compile_errors_name_the_lines_the_notebook_shows(shell, ns, capsys):
    result = shell.run_cell(BROKEN_CELL)  # IPython hands the magic the cell below its first line, as Jupyter does
    assert isinstance(result.error_in_exec, MagicError)
    text = plain(capsys.readouterr().out)
    assert "cell:5:3: error:" in text and "undeclared_thing" in text, text
    assert "broken" not in ns


def test_cross_compiler_errors_name_the_same_lines(shell, ns):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("needs the aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu)")
    body = BROKEN_CELL.split("\n", 1)[1]
    with pytest.raises(MagicError) as info:  # the compiler fails before anything reaches the (host) device
        shell.run_cell_magic("rpc_compile", "broken --target aarch64-linux-gnu", body)
    assert "cell:5:3: error:" in str(info.value)


@pytest.mark.parametrize("target", [None, "aarch64-linux-gnu", "llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72",
                                    {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}],
                         ids=["host", "triple", "tvm-string", "tvm-dict"])
def test_build_source_numbers_from_first_line_for_every_target_form(tmp_path, target):
    try:
        cc.compiler_for(target)
    except ToolchainNotFoundError as exc:
        pytest.skip(str(exc))
    bad = "int f(void) {\n  return missing;\n}\n"
    with pytest.raises(CompileError) as info:
        build_source(bad, tmp_path, name="f", target=target, source_name="cell", first_line=2)
    assert "cell:3:10: error:" in str(info.value) and str(tmp_path) not in str(info.value)
    assert isinstance(info.value, WorkbenchError)
    good = TWO_ARGS
    path = build_source(good, tmp_path, name="ok", target=target, source_name="cell", first_line=2)
    machine = int.from_bytes(Path(path).read_bytes()[18:20], "little")  # ELF e_machine: 62 x86-64, 183 aarch64
    assert machine == (183 if target else {"x86_64": 62, "aarch64": 183}.get(os.uname().machine, machine))
    with pytest.raises(ValueError, match="first_line"):
        build_source(good, tmp_path, name="ok", first_line=0)


# -- (b) a cell with no kernel --------------------------------------------------------------------------
def test_a_cell_without_a_kernel_is_an_error_naming_wb_kernel(shell, ns):
    with pytest.raises(MagicError) as info:
        shell.run_cell_magic("rpc_compile", "nokernel", NO_KERNEL)
    message = str(info.value)
    assert "declares no kernel" in message and "WB_KERNEL(name)" in message and "#include <workbench_kernel.h>" in message
    assert "nokernel" not in ns
    assert "nokernel.so" not in ns["remote"].listdir(".")  # nothing left behind in the workspace
    shell.run_cell_magic("rpc_compile", "withkernel", TWO_ARGS)  # the same session goes on
    assert ns["withkernel"].function_names == ["add_one"]


# -- (c) short tracebacks for expected errors of plain calls -------------------------------------------
def test_a_remote_error_in_a_plain_call_shows_the_users_frames_only(shell, ns, capsys):
    shell.run_cell_magic("rpc_compile", "mod", TWO_ARGS)
    capsys.readouterr()
    shell.run_cell("import numpy as np\nfrom workbench import runtime\n"
                   "a = runtime.tensor(np.zeros(4, 'float32'), remote.cpu())\n"
                   "def step():\n    return mod['add_one'](a)\n")
    result = shell.run_cell("x = 1\nstep()")
    assert isinstance(result.error_in_exec, RemoteError)
    text = plain(capsys.readouterr().out)
    assert "expected 2 arguments, got 1" in text
    assert "----> 2 step()" in text and "mod['add_one'](a)" in text  # the cell and the user's own function
    assert "session.py" not in text and "workbench/rpc" not in text, text  # none of the library's frames
    assert HIDDEN_NOTE in text and len(text.strip().splitlines()) < 15
    shell.run_cell("%tb")  # the whole traceback stays available
    full = plain(capsys.readouterr().out)
    assert "session.py" in full and "expected 2 arguments, got 1" in full


@pytest.mark.timeout(300)
def test_a_real_kernel_sends_the_short_form_to_the_front_end(tmp_path, private_tmpdir):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        "%load_ext workbench\nfrom workbench import rpc\nremote = rpc.LocalSession()",
        "remote.download('nothere')",
        "%tb",
    )]
    nbclient.NotebookClient(nb, timeout=120, startup_timeout=120, allow_errors=True,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    error = next(o for o in nb.cells[1].outputs if o.output_type == "error")  # what JupyterLab shows
    assert error.ename == "RemoteNotFoundError" and "no file 'nothere'" in error.evalue
    shown = plain("\n".join(error.traceback))
    assert "----> 1 remote.download('nothere')" in shown and HIDDEN_NOTE in shown
    assert "workbench/" not in shown, shown
    full = plain("\n".join("\n".join(o.get("traceback", [])) for o in nb.cells[2].outputs))
    assert "workspace.py" in full and "session.py" in full  # %tb: the library's frames and the chained cause


def test_a_deliberate_plain_error_of_the_workbench_is_short_too(shell, ns, capsys):
    result = shell.run_cell("remote.upload(123)")  # the session refuses it with a TypeError of its own
    assert isinstance(result.error_in_exec, TypeError)
    text = plain(capsys.readouterr().out)
    assert "upload takes a file path or bytes" in text and "----> 1 remote.upload(123)" in text
    assert "session.py" not in text and HIDDEN_NOTE in text


def test_bugs_and_user_errors_keep_the_full_traceback(shell, ns, capsys):
    # an error the interpreter raised inside the workbench (what a bug looks like) is not shortened
    result = shell.run_cell("from workbench.notebook.magics import split_timed_expression\n"
                            "split_timed_expression(5)")
    assert isinstance(result.error_in_exec, AttributeError)
    text = plain(capsys.readouterr().out)
    assert "magics.py" in text and HIDDEN_NOTE not in text
    result = shell.run_cell("def mine():\n    return {}['k']\nmine()")  # the user's own error: IPython's as ever
    assert isinstance(result.error_in_exec, KeyError)
    text = plain(capsys.readouterr().out)
    assert "return {}['k']" in text and HIDDEN_NOTE not in text


def test_magic_errors_stay_one_line(shell, ns, capsys):
    result = shell.run_cell("%rpc_disconnect nothing_here   # a comment, as the README writes them")
    assert isinstance(result.error_in_exec, MagicError)
    text = plain(capsys.readouterr().out).strip()
    assert len(text.splitlines()) == 1 and "no session named `nothing_here`" in text


def test_a_trailing_comment_is_not_part_of_a_magics_line():
    from workbench.notebook.magics import strip_comment

    assert strip_comment("--servers local=1 rasp4=1    # an embedded farm") == "--servers local=1 rasp4=1"
    assert strip_comment('mod["a #1"](a, b) -r 3  # timed') == 'mod["a #1"](a, b) -r 3'
    assert strip_comment("--cflags '-DTAG=\\'#x\\'' -o m") == "--cflags '-DTAG=\\'#x\\'' -o m"
    assert strip_comment("a#b") == "a#b" and strip_comment("# only a comment") == ""


def test_another_extensions_handler_is_left_alone(shell):
    def other(self, etype, value, tb, tb_offset=None):
        print("other handler")

    shell.run_line_magic("unload_ext", "workbench")
    assert shell.custom_exceptions == ()  # unloading gives IPython its own display back
    try:
        shell.set_custom_exc((ZeroDivisionError,), other)
        shell.run_line_magic("load_ext", "workbench")
        assert shell.custom_exceptions == (ZeroDivisionError,)
        shell.run_line_magic("unload_ext", "workbench")
        assert shell.custom_exceptions == (ZeroDivisionError,)
    finally:
        shell.set_custom_exc((), None)
        shell.run_line_magic("load_ext", "workbench")
    assert MagicError in shell.custom_exceptions


# -- (d) the notebook layer without IPython ----------------------------------------------------------------
@pytest.mark.parametrize("code", ["import workbench.notebook", "import workbench; workbench.notebook"])
def test_notebook_layer_without_ipython_says_what_to_install(code):
    prelude = "import sys; sys.modules['IPython'] = None\n"  # IPython made unimportable, as if not installed
    proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: workbench.notebook needs IPython"), proc.stderr
    assert 'pip install "rpc-workbench[notebook]"' in last
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'name = "rpc-workbench"' in pyproject and re.search(r"^notebook = \[", pyproject, re.M)
    core = subprocess.run([sys.executable, "-c", prelude + "from workbench import rpc, runtime, cc, farm; print('ok')"],
                          capture_output=True, text=True, timeout=120)
    assert core.stdout.strip() == "ok", core.stderr  # the core never needed it


# -- (e) the README's snippets ------------------------------------------------------------------------------
def readme_blocks() -> list[tuple[str, str, str]]:
    """(section, language, code) of every fenced block of README.md."""
    section, blocks = "", []
    lines = (ROOT / "README.md").read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```") and line.strip() != "```":
            lang, body = line[3:].strip(), []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append((section, lang, "\n".join(body) + "\n"))
        i += 1
    return blocks


def magic_bound_names(cells: list[str]) -> set[str]:
    """The names the magics of ``cells`` bind: %rpc_connect's session (-o NAME), %%rpc_compile's module."""
    names = set()
    for cell in cells:
        for line in cell.splitlines():
            if line.startswith("%rpc_connect"):
                found = re.search(r"(?:-o|--name)\s+(\w+)", line.split("#")[0])
                names.add(found.group(1) if found else "remote")
            elif line.startswith("%%rpc_compile"):
                names.add(line.split()[1])
    return names


def unbound_names(code: str) -> set[str]:
    """Names ``code`` reads that it neither imports nor assigns (IPython magics made Python first)."""
    from IPython.core.inputtransformer2 import TransformerManager

    tree = ast.parse(TransformerManager().transform_cell(code))
    bound, used = set(dir(builtins)) | {"get_ipython"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return used - bound


# what the prose around a snippet names instead of defining: the kernel's C text, the tensors of "Use", a model
PLACEHOLDERS = {"ADD_ONE_C", "a", "b", "run_model"}


def test_every_readme_python_snippet_imports_what_it_uses():
    blocks = readme_blocks()
    python = [(section, code) for section, lang, code in blocks if lang == "python"]
    assert len(python) >= 5
    for section, code in python:
        magic_cells = [c for s, lang, c in blocks if s == section and lang in ("python", "c")]
        missing = unbound_names(code) - magic_bound_names(magic_cells)
        if section != "In JupyterLab":  # the JupyterLab snippet is whole: no placeholders at all
            missing -= PLACEHOLDERS
        assert not missing, f"README section {section!r}: a snippet uses {sorted(missing)} without importing them"


RUN_CELLS = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
from IPython.core.interactiveshell import InteractiveShell

ip = InteractiveShell.instance()
for cell in json.loads(sys.argv[1]):
    result = ip.run_cell(cell)
    if not result.success:
        print("FAILED CELL:", cell, file=sys.stderr)
        sys.exit(1)
from workbench.results import default_log
frame = default_log().frame
print("RESULT", json.dumps({"functions": sorted(set(frame["function"])), "rows": len(frame),
                            "module": type(ip.user_ns.get("add_one")).__name__}))
ip.run_line_magic("unload_ext", "workbench")
"""


@pytest.mark.timeout(300)
def test_readme_jupyterlab_snippet_runs_in_a_real_shell(tmp_path, private_tmpdir):
    cells = [code for section, lang, code in readme_blocks() if section == "In JupyterLab" and lang in ("python", "c")]
    assert len(cells) >= 3 and cells[0].startswith("%load_ext workbench")
    assert any(cell.startswith("%%rpc_compile add_one") for cell in cells)
    repeats = int(re.search(r"%rpc_time .* -r (\d+)", cells[-1]).group(1))
    env = {k: v for k, v in os.environ.items() if k not in ("WORKBENCH_TRACKER", "TVM_TRACKER_HOST", "TVM_TRACKER_PORT")}
    env.update(MPLBACKEND="Agg", IPYTHONDIR=str(tmp_path / "ipython"))
    proc = subprocess.run([sys.executable, "-c", RUN_CELLS, json.dumps(cells)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, plain(proc.stdout[-3000:] + proc.stderr[-3000:])
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["module"] == "RemoteModule" and result["functions"] == ["add_one"] and result["rows"] == repeats


# -- (f), (g) repository files -------------------------------------------------------------------------------
def test_notebook_checkpoints_are_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("notebooks/.ipynb_checkpoints/01-quickstart-checkpoint.ipynb", ".ipynb_checkpoints/x.ipynb"):
        proc = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", path], timeout=60)
        assert proc.returncode == 0, f"{path} is not ignored by .gitignore"
    proc = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", "notebooks/01-quickstart.ipynb"],
                          timeout=60)
    assert proc.returncode == 1  # the notebooks themselves are not


def test_binder_pins_a_python_the_package_supports():
    from packaging.specifiers import SpecifierSet

    runtime = (ROOT / "binder" / "runtime.txt").read_text().strip()
    found = re.fullmatch(r"python-(3\.\d+)", runtime)
    assert found, f"binder/runtime.txt must read python-3.X (repo2docker's format), not {runtime!r}"
    requires = re.search(r'^requires-python\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert found.group(1) + ".0" in SpecifierSet(requires)
    assert tuple(map(int, found.group(1).split("."))) >= (3, 11)  # not repo2docker's 3.10 fallback


# -- (h) python -m workbench.lab says which variant it runs, and --serve forces serving ----------------------
def lab_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORKBENCH_TRACKER", "TVM_TRACKER_HOST", "TVM_TRACKER_PORT", "DISPLAY", "WAYLAND_DISPLAY")}
    env.update(JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"), JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
               PYTHONUNBUFFERED="1")
    return env


def test_lab_help_documents_serve():
    proc = subprocess.run([sys.executable, "-m", "workbench.lab", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--serve" in proc.stdout and "--headless | --serve" in proc.stdout
    assert "--headless | --serve" in (ROOT / "README.md").read_text()
    both = subprocess.run([sys.executable, "-m", "workbench.lab", "--serve", "--headless"],
                          capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_lab_without_display_or_terminal_says_why_it_goes_headless(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "workbench.lab", "--notebook-dir", str(tmp_path)],  # fails fast after
                          env=lab_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    first = proc.stdout.splitlines()[0]
    assert "no display" in first and "no terminal" in first and "running the headless variant" in first
    assert "python -m workbench.lab --serve" in first
    assert proc.returncode == 1 and "has no 01-quickstart.ipynb" in proc.stderr


@pytest.mark.timeout(300)
def test_lab_serve_serves_without_display_or_terminal(tmp_path, private_tmpdir):
    # `-- --version` makes the JupyterLab it starts print its version and exit: proof that it was asked to serve
    proc = subprocess.run([sys.executable, "-m", "workbench.lab", "--serve", "--servers", "local=1", "--", "--version"],
                          env=lab_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "starting JupyterLab" in proc.stdout and "headless" not in proc.stdout
    assert re.search(r"^\d+\.\d+\.\d+", proc.stdout, re.M)  # JupyterLab's version line


def test_headless_reason_rule(monkeypatch):
    from workbench import lab

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    try:
        if sys.platform.startswith("linux"):
            assert "no display" in lab.headless_reason()
        assert lab.headless_reason(serve=True) is None and lab.headless_reason(port=8888) is None
        monkeypatch.setenv("DISPLAY", ":0")  # an IDE on a desktop: no terminal, but a display, so it serves
        assert lab.headless_reason() is None
    finally:
        sys.stdin.close()
