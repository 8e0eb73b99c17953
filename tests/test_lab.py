"""`python -m workbench.lab`: the README's main command, as subprocesses.

--headless runs the quickstart against the lab's farm and prints the timing
table; the served mode answers HTTP with JupyterLab, hands WORKBENCH_TRACKER to
the server and its kernels, and ends JupyterLab, the kernels and the farm on
SIGINT or SIGTERM with no process left behind.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from workbench.rpc import connect_tracker

from .conftest import alive, wait_until

pytest.importorskip("jupyterlab", reason="the lab tests need JupyterLab (pip install -e '.[test]')")
pytest.importorskip("nbclient", reason="the lab tests need nbclient (pip install -e '.[test]')")

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "wb-lab-test-token"
START_TIMEOUT_S = 120  # JupyterLab's start on a loaded 2-core machine; bounds the waits, asserts nothing


def lab_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The lab's environment: no tracker configured, Jupyter's files under tmp_path, no display."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORKBENCH_TRACKER", "TVM_TRACKER_HOST", "TVM_TRACKER_PORT", "DISPLAY", "WAYLAND_DISPLAY")}
    env.update(JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"),
               JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
               JUPYTER_TOKEN=TOKEN, PYTHONUNBUFFERED="1", **extra)
    return env


def descendants(pid: int) -> dict[int, str]:
    """Every process below ``pid``, with its command line."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except FileNotFoundError:
                continue
            for kid in kids:
                if kid not in found:
                    found[kid] = cmdline(kid)
                    todo.append(kid)
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ValueError, IndexError):
        return None



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, *, method: str = "GET", body: dict | None = None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"token {TOKEN}"},
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_headless_runs_the_quickstart_and_prints_its_results(tmp_path, private_tmpdir):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "workbench.lab", "--headless", "--output", str(out)],
                          env=lab_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    text = proc.stdout
    assert "device farm: tracker 127.0.0.1:" in text and "local×2" in text
    table = text.split("timings (%rpc_results --summary):", 1)[1].split("plot (%rpc_results --plot)", 1)[0]
    assert "add_one" in table and "local" in table and "median" in table, table
    assert "b == a + 1" in text  # the notebook's own check ran
    plot = out / "01-quickstart-plot.png"
    assert f"saved to {plot}" in text and plot.read_bytes().startswith(b"\x89PNG")
    executed = json.loads((out / "01-quickstart.ipynb").read_text())
    assert not [o for c in executed["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    # the kernel used the lab's farm (WORKBENCH_TRACKER), so the notebook started none of its own
    assert "no embedded farm was running" in text


def test_without_display_or_terminal_the_plain_command_goes_headless(tmp_path):
    """Plain `python -m workbench.lab` on a CI machine goes headless; a wheel-like copy says where the notebooks are."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "workbench", site / "workbench", ignore=shutil.ignore_patterns("__pycache__"))
    env = lab_env(tmp_path, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-m", "workbench.lab"], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "no display" in proc.stdout and "headless" in proc.stdout
    assert "notebooks are not installed with the package" in proc.stderr
    assert "clone" in proc.stderr and "--notebook-dir" in proc.stderr


def test_a_folder_without_the_quickstart_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "workbench.lab", "--headless", "--notebook-dir", str(tmp_path)],
                          env=lab_env(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "has no 01-quickstart.ipynb" in proc.stderr


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serves_jupyterlab_with_the_farm_and_ends_everything(tmp_path, sig, private_tmpdir):
    port = free_port()
    log = open(tmp_path / "lab.log", "w")
    lab = subprocess.Popen(
        [sys.executable, "-m", "workbench.lab", "--no-browser", "--port", str(port), "--",
         f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", f"--LabApp.user_settings_dir={tmp_path / 'settings'}"],
        env=lab_env(tmp_path), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    seen: dict[int, str] = {}
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: lab.poll() is not None or _answers(f"{base}/api/status"), timeout=START_TIMEOUT_S), \
            _log(tmp_path)
        assert lab.poll() is None, _log(tmp_path)
        status, page = http(f"{base}/lab/tree/01-quickstart.ipynb")
        assert status == 200 and "<title>JupyterLab" in page
        status, listing = http(f"{base}/api/contents")
        assert status == 200 and "01-quickstart.ipynb" in listing  # the server's root is notebooks/

        seen = descendants(lab.pid)
        # the launcher's own child (the farm's services, and jupyter-lsp's npm, start as forks of it: for a
        # moment they show its command line too)
        jupyter = [pid for pid, cmd in seen.items() if "-m jupyterlab" in cmd and parent(pid) == lab.pid]
        assert len(jupyter) == 1, seen
        tracker = environ(jupyter[0]).get("WORKBENCH_TRACKER", "")
        host, _, tracker_port = tracker.rpartition(":")
        # the lab's farm answers there: JupyterLab's workbench extension starts it in the background
        assert wait_until(lambda: _free(host, int(tracker_port), "local") == 2, timeout=60), _log(tmp_path)

        status, kernel = http(f"{base}/api/kernels", method="POST", body={"name": "python3"})
        assert status == 201, kernel
        assert wait_until(lambda: any("ipykernel" in cmd for cmd in descendants(lab.pid).values()), timeout=60)
        seen = descendants(lab.pid)
        kernel_pid = next(pid for pid, cmd in seen.items() if "ipykernel" in cmd)
        assert environ(kernel_pid).get("WORKBENCH_TRACKER") == tracker  # what %rpc_connect finds with no address

        lab.send_signal(sig)
        assert lab.wait(timeout=90) == 0, _log(tmp_path)
        left = {pid: cmd for pid, cmd in seen.items() if alive(pid)}
        assert wait_until(lambda: not any(alive(pid) for pid in seen), timeout=30), f"left running: {left}"
        text = _log(tmp_path)
        assert "stopping JupyterLab and the farm" in text
    finally:
        if lab.poll() is None:
            lab.kill()
            lab.wait()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()


def _free(host: str, port: int, key: str) -> int:
    try:
        with connect_tracker(host, port) as session:
            return session.summary()["queue_info"].get(key, {}).get("free", 0)
    except OSError:
        return 0


def _answers(url: str) -> bool:
    try:
        return http(url, timeout=2)[0] == 200
    except OSError:
        return False


def _log(tmp_path: Path) -> str:
    return (tmp_path / "lab.log").read_text(errors="replace")[-5000:]
