"""Shared fixtures: real servers on loopback, test kernels built with the host compiler.

After every test that used a server, no session worker may be left running and
no session workspace may be left on disk.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time

import pytest

from workbench import cc, rpc

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# server processes import tests.helpers through server_init_callback
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory):
    """Every process of the run (servers and workers inherit TMPDIR) writes temp files here."""
    path = str(tmp_path_factory.mktemp("wbtmp"))
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = path
    tempfile.tempdir = None
    yield path
    assert not session_workspaces(path), f"session workspaces left behind: {session_workspaces(path)}"
    if old is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old
    tempfile.tempdir = None


def session_workspaces(tmpdir: str) -> list[str]:
    return glob.glob(os.path.join(tmpdir, "wb-session-*"))


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def alive(pid: int) -> bool:
    """The process runs: it has not ended, nor is it a zombie waiting for its parent (a process may be reaped
    and go between any two reads of /proc, so one read decides)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def assert_clean(server: rpc.Server, tmpdir: str) -> None:
    assert wait_until(lambda: not children(server.pid)), f"session workers left running: {children(server.pid)}"
    assert wait_until(lambda: not session_workspaces(tmpdir)), f"workspaces left: {session_workspaces(tmpdir)}"


@pytest.fixture(scope="module")
def server(private_tmpdir):
    srv = rpc.Server(port=0, silent=True)
    yield srv
    srv.terminate()
    assert not srv.alive


@pytest.fixture
def remote(server, private_tmpdir):
    sess = rpc.connect("127.0.0.1", server.port)
    yield sess
    sess.close()
    assert_clean(server, private_tmpdir)


@pytest.fixture(scope="session")
def kernels(tmp_path_factory) -> dict[str, str]:
    """The test kernels (tests/kernels/kernels.c) as .so and .tar."""
    out = tmp_path_factory.mktemp("kernels")
    src = os.path.join(HERE, "kernels", "kernels.c")
    return {
        "so": cc.create_shared(out / "kernels.so", [src]),
        "tar": cc.create_tar(out / "kernels.tar", [src]),
    }


@pytest.fixture
def farm(private_tmpdir):
    """A LocalFarm of one "local" server, for the test."""
    from workbench.farm import LocalFarm

    with LocalFarm({"local": 1}) as farm:
        yield farm


@pytest.fixture
def mod(remote, kernels):
    remote.upload(kernels["so"])
    return remote.load_module("kernels.so")


@pytest.fixture
def spawn(private_tmpdir):
    """``spawn(tracker_port, key, **options)``: an rpc.Server registered with the tracker; all end with the test."""
    started: list[rpc.Server] = []

    def start(tracker_port: int, key: str, **options) -> rpc.Server:
        srv = rpc.Server(port=0, tracker_addr=("127.0.0.1", tracker_port), key=key, silent=True, **options)
        started.append(srv)
        return srv

    try:
        yield start
    finally:
        for srv in started:
            srv.terminate()
    assert not any(srv.alive for srv in started)


@pytest.fixture
def closing():
    """Things with ``close()`` (sessions, pickers, tracker connections), closed in reverse order when the test ends."""
    things: list = []
    try:
        yield things
    finally:
        for thing in reversed(things):
            thing.close()


# -- the reliability table (tests/test_reliability.py) ---------------------------------------
def pytest_configure(config):
    if not hasattr(config, "workerinput"):  # the controller: xdist workers inherit the variable
        folder = tempfile.mkdtemp(prefix="wb-reliability-")
        config._wb_rows = os.path.join(folder, "rows.jsonl")
        os.environ["WB_RELIABILITY_ROWS"] = config._wb_rows


def pytest_terminal_summary(terminalreporter, config):
    path = getattr(config, "_wb_rows", None)
    if not path:
        return
    try:
        if os.path.exists(path):
            from .test_reliability import report_table

            with open(path) as f:
                rows = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["name"])
            if rows:
                terminalreporter.write_sep("=", "reliability")
                terminalreporter.write_line(report_table(rows))
    finally:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
