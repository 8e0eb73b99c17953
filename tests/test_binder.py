"""binder/: the repo2docker configuration, checked the way Binder uses it.

The install test copies the repository (as repo2docker does into its image),
installs binder/requirements.txt into a fresh virtual environment from the
copy's root, runs binder/postBuild, then binder/start twice with that
environment's python first on PATH: with `true` (it must return, and leave
nothing running), and with a Python program that gets a device through the
exported WORKBENCH_TRACKER and runs a kernel on it. In the same environment
it runs the README's first command, `python -m workbench.lab`, as CI does
(no display, no terminal): the headless quickstart must pass.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
INSTALL_TIMEOUT_S = 900  # a fresh venv with JupyterLab from the package index; bounds the wait only

CLIENT = r'''
import os, sys
import numpy as np
import jupyterlab, ipywidgets, matplotlib, tqdm   # the notebook extra came with the install
import workbench
from workbench import cc, runtime
from workbench.farm import open_session

ADD_ONE = """
#include <workbench_kernel.h>
WB_KERNEL(add_one) {
  DLTensor* a = WB_ARG_TENSOR(0);
  DLTensor* b = WB_ARG_TENSOR(1);
  for (int64_t i = 0; i < a->shape[0]; ++i) ((float*)b->data)[i] = ((float*)a->data)[i] + 1.0f;
  return 0;
}
"""
print("prefix", sys.prefix)
print("workbench", workbench.__file__)
print("tracker", os.environ["WORKBENCH_TRACKER"])
with open_session(timeout=60) as remote:   # no address: the default tracker, i.e. WORKBENCH_TRACKER
    mod = cc.load_source(remote, ADD_ONE, name="add_one")
    a = runtime.tensor(np.arange(16, dtype="float32"), remote.cpu())
    b = runtime.empty((16,), "float32", remote.cpu())
    mod["add_one"](a, b)
    np.testing.assert_equal(b.numpy(), np.arange(16) + 1)
    print("ran add_one on", remote.info["key"], remote.address)
'''


def test_binder_files_follow_repo2docker():
    requirements = [line.strip() for line in (BINDER / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert requirements == ["-e .[notebook]"]  # repo2docker installs it from the repository's root
    packages = [line.strip() for line in (BINDER / "apt.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert packages == ["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user", "pocl-opencl-icd",
                        "ocl-icd-libopencl1"]
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", p) for p in packages)
    for name in ("postBuild", "start"):
        script = BINDER / name
        assert os.access(script, os.X_OK), f"binder/{name} must be executable"
        assert script.read_text().startswith("#!/bin/bash\n")
        subprocess.run(["bash", "-n", str(script)], check=True)  # parses
    lines = [line.strip() for line in (BINDER / "start").read_text().splitlines() if line.strip()]
    assert lines[-1] == 'exec "$@"'
    assert any("python -m workbench.farm" in line for line in lines)


def processes_with(marker: str) -> dict[int, str]:
    """Processes whose environment holds ``marker`` (everything binder/start and its children started)."""
    found = {}
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


@pytest.mark.timeout(INSTALL_TIMEOUT_S + 300)
def test_binder_install_and_start_in_a_fresh_venv(tmp_path, private_tmpdir):
    repo, venv = tmp_path / "repo", tmp_path / "venv"
    marker = f"WB_BINDER_TEST={uuid.uuid4().hex}"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.so", "*.egg-info", "build", ".pytest_cache", "benchmarks"))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        # this interpreter's pip installs into the venv (--python): no pip bootstrap in the venv; --no-compile
        # skips the bytecode of JupyterLab's dependencies, which nothing here imports twice
        install = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-compile",
             "--disable-pip-version-check", "-q", "-r", "binder/requirements.txt"],
            cwd=repo, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        assert install.returncode == 0, f"pip install -r binder/requirements.txt failed:\n{install.stderr[-5000:]}"

        env = {k: v for k, v in os.environ.items() if k not in ("WORKBENCH_TRACKER", "PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
                   WORKBENCH_FARM_LOG=str(tmp_path / "farm.log"), WB_BINDER_TEST=marker.split("=", 1)[1])
        post = subprocess.run(["binder/postBuild"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert post.returncode == 0, f"binder/postBuild failed:\n{post.stdout[-3000:]}\n{post.stderr[-3000:]}"

        started = subprocess.run(["binder/start", "true"], cwd=repo, env=env, stdin=subprocess.DEVNULL,
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        assert "binder/start: device farm at 127.0.0.1:" in started.stderr, started.stderr
        assert "Tracker address 127.0.0.1:" in (tmp_path / "farm.log").read_text()
        assert wait_until(lambda: not processes_with(marker), timeout=30), \
            f"left running after binder/start true: {processes_with(marker)}"

        ran = subprocess.run(["binder/start", "python", "-c", CLIENT], cwd=repo, env=env, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, f"stdout:\n{ran.stdout}\nstderr:\n{ran.stderr[-5000:]}"
        lines = dict(line.split(" ", 1) for line in ran.stdout.splitlines() if " " in line)
        assert lines["prefix"] == str(venv)  # the fresh venv's python ran it, with the package installed there
        assert lines["workbench"] == str(repo / "workbench" / "__init__.py")
        exported = re.search(r"device farm at (\S+)", ran.stderr).group(1)
        assert lines["tracker"] == exported
        assert lines["ran"].startswith("add_one on local ")
        assert wait_until(lambda: not processes_with(marker), timeout=30), \
            f"left running after the session: {processes_with(marker)}"

        # the README's first command on a machine like CI's (no display, no terminal), in this fresh venv:
        # the notebook extra alone must be enough for the headless run of the quickstart
        headless_env = {k: v for k, v in env.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        headless_env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "jupyter-runtime")
        lab = subprocess.run(["python", "-m", "workbench.lab", "--output", str(tmp_path / "lab")], cwd=repo,
                             env=headless_env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        assert lab.returncode == 0, f"stdout:\n{lab.stdout[-3000:]}\nstderr:\n{lab.stderr[-5000:]}"
        assert "running the headless variant" in lab.stdout and "timings (%rpc_results --summary)" in lab.stdout
        assert wait_until(lambda: not processes_with(marker), timeout=30), \
            f"left running after python -m workbench.lab: {processes_with(marker)}"
    finally:
        for pid in processes_with(marker):  # after a failure: end what the test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(venv, ignore_errors=True)  # a JupyterLab venv is hundreds of MB: not kept for pytest's history
        shutil.rmtree(repo, ignore_errors=True)
