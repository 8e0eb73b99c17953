"""The lab extension's TypeScript (extensions/jupyterlab-rpc-workbench): it type-checks and lints clean.

``pip install`` builds the extension (setup.py), which installs its node packages; these run the
package's own scripts (``jlpm typecheck``, ``jlpm lint:check``) on them.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXTENSION = Path(__file__).resolve().parent.parent / "extensions" / "jupyterlab-rpc-workbench"
JLPM = [sys.executable, "-c", "import sys; from jupyter_builder.jlpm import main; main(sys.argv[1:])"]  # JupyterLab's yarn


@pytest.fixture(scope="module")
def node_packages() -> Path:
    if shutil.which("node") is None:
        pytest.skip("node is not installed (Debian: apt-get install nodejs npm): the extension's TypeScript is not checked")
    pytest.importorskip("jupyter_builder", reason="jlpm comes with JupyterLab 4.6+: pip install -e .[notebook]")
    if not (EXTENSION / "node_modules").is_dir():  # pip install built it elsewhere (a wheel): install them here
        subprocess.run([*JLPM, "install"], cwd=EXTENSION, check=True, timeout=600, capture_output=True)
    return EXTENSION


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", ["typecheck", "lint:check"])
def test_the_extension_passes(node_packages, script):
    done = subprocess.run([*JLPM, "run", script], cwd=node_packages, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, f"jlpm {script} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
