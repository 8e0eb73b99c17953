"""LocalFarm, the embedded default tracker, the farm CLI and the headless demo.

Every farm here is real: a tracker process and server processes on loopback.
After each test none of them may be left running.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from workbench import rpc
from workbench.rpc.client.tracker_session import TrackerError
from workbench.farm import LocalFarm, default_tracker, local, tracker_from_env

from .conftest import ROOT, children, wait_until

ENV_VARS = ("WORKBENCH_TRACKER", "TVM_TRACKER_HOST", "TVM_TRACKER_PORT")


def gone(pid: int) -> bool:
    """The process ended (and was reaped by its parent)."""
    return not os.path.exists(f"/proc/{pid}")


def farm_pids(farm: LocalFarm) -> list[int]:
    return [farm.tracker.pid] + [s.pid for s in farm.servers]


def descendants(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        found += [child] + descendants(child)
    return found


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


@pytest.fixture
def no_tracker_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def test_farm_registers_every_server_and_ends_them_all(private_tmpdir):
    start = time.monotonic()
    farm = LocalFarm({"a": 2, "b": 1})
    try:
        assert time.monotonic() - start < 30
        pids = farm_pids(farm)
        assert len(pids) == 4 and all(not gone(p) for p in pids)
        with farm.connect() as tracker:
            summary = tracker.summary()
            queues = summary["queue_info"]
            assert queues["a"]["free"] == 2 and queues["b"]["free"] == 1
            assert sorted(s["key"] for s in summary["server_info"]) == ["server:a", "server:a", "server:b"]
            text = tracker.text_summary()
        assert re.search(r"^a\s+2\s+2\s+0\s*$", text, re.M), text
        assert re.search(r"^b\s+1\s+1\s+0\s*$", text, re.M), text
        assert "LocalFarm" in repr(farm) and "a×2" in repr(farm)

        with farm.request("a", timeout=20) as remote:
            server_pids = {s.pid for s in farm.servers if s.key == "a"}
            assert any(remote.info["pid"] in children(p) for p in server_pids)
            remote.upload(b"farm", target="f.txt")
            assert bytes(remote.download("f.txt")) == b"farm"
        with farm.request("b", timeout=20) as remote:
            assert remote.info["key"] == "b"
    finally:
        farm.close()
    assert wait_until(lambda: all(gone(p) for p in pids), timeout=10), [p for p in pids if not gone(p)]
    farm.close()  # twice is fine


def test_farm_ends_everything_when_the_block_raises():
    with pytest.raises(KeyError, match="inside the block"):
        with LocalFarm({"ctx": 1}) as farm:
            pids = farm_pids(farm)
            with farm.request("ctx", timeout=20) as remote:
                worker = remote.info["pid"]
                raise KeyError("inside the block")
    assert wait_until(lambda: all(gone(p) for p in pids + [worker]), timeout=10)


def test_farm_default_is_one_local_server():
    with LocalFarm() as farm:
        assert farm.servers_per_key == {"local": 1}
        with farm.connect() as tracker:
            assert tracker.summary()["queue_info"]["local"]["free"] == 1
        pids = farm_pids(farm)
    assert wait_until(lambda: all(gone(p) for p in pids), timeout=10)


@pytest.mark.parametrize("servers", [
    {"a": 0}, {"a": -1}, {"a": "2"}, {"a": 1.0}, {"a": True}, {"": 1}, {1: 1}, {None: 1}, ["a", "b"], "a",
])
def test_farm_bad_arguments_are_clear_value_errors(servers):
    before = set(children(os.getpid()))
    start = time.monotonic()
    with pytest.raises(ValueError, match=re.escape("LocalFarm takes {key: number of servers")):
        LocalFarm(servers)
    assert time.monotonic() - start < 2, "refused only after starting processes"
    assert set(children(os.getpid())) <= before


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WORKBENCH_TRACKER": "10.0.0.7:9190"}, ("10.0.0.7", 9190)),
    ({"WORKBENCH_TRACKER": "tracker.lab:9000"}, ("tracker.lab", 9000)),
    ({"WORKBENCH_TRACKER": "[::1]:9190"}, ("::1", 9190)),
    ({"TVM_TRACKER_HOST": "10.0.0.8", "TVM_TRACKER_PORT": "9191"}, ("10.0.0.8", 9191)),
    ({"TVM_TRACKER_HOST": "10.0.0.8"}, ("10.0.0.8", 9190)),  # TVM's query_rpc_tracker defaults
    ({"TVM_TRACKER_PORT": "9192"}, ("127.0.0.1", 9192)),
    ({"WORKBENCH_TRACKER": "1.2.3.4:1", "TVM_TRACKER_HOST": "5.6.7.8", "TVM_TRACKER_PORT": "2"}, ("1.2.3.4", 1)),
    ({"WORKBENCH_TRACKER": "", "TVM_TRACKER_HOST": "5.6.7.8", "TVM_TRACKER_PORT": "2"}, ("5.6.7.8", 2)),
])
def test_tracker_from_env(monkeypatch, no_tracker_env, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracker_from_env() == expected


@pytest.mark.parametrize("env, message", [
    ({"WORKBENCH_TRACKER": "9190"}, "WORKBENCH_TRACKER must be host:port"),
    ({"WORKBENCH_TRACKER": "host:"}, "WORKBENCH_TRACKER must be host:port"),
    ({"WORKBENCH_TRACKER": "host:abc"}, "WORKBENCH_TRACKER must be host:port"),
    ({"WORKBENCH_TRACKER": ":9190"}, "WORKBENCH_TRACKER must be host:port"),
    ({"WORKBENCH_TRACKER": "host:70000"}, "WORKBENCH_TRACKER must be host:port"),
    ({"WORKBENCH_TRACKER": "host:0"}, "WORKBENCH_TRACKER must be host:port"),
    ({"TVM_TRACKER_HOST": "h", "TVM_TRACKER_PORT": "x"}, "TVM_TRACKER_PORT must be a port number"),
    ({"TVM_TRACKER_HOST": "h", "TVM_TRACKER_PORT": "-1"}, "TVM_TRACKER_PORT must be a port number"),
])
def test_tracker_from_env_bad_values(monkeypatch, no_tracker_env, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        tracker_from_env()
    with pytest.raises(ValueError, match=message):  # not silently replaced by an embedded farm
        default_tracker()


def test_default_tracker_uses_the_configured_one_without_starting_anything(monkeypatch, no_tracker_env):
    monkeypatch.setattr(local, "_embedded", None)
    before = set(children(os.getpid()))
    monkeypatch.setenv("WORKBENCH_TRACKER", "192.0.2.1:9190")  # never contacted
    assert default_tracker() == ("192.0.2.1", 9190)
    monkeypatch.delenv("WORKBENCH_TRACKER")
    monkeypatch.setenv("TVM_TRACKER_HOST", "192.0.2.2")
    monkeypatch.setenv("TVM_TRACKER_PORT", "9999")
    assert default_tracker() == ("192.0.2.2", 9999)
    assert local._embedded is None
    assert set(children(os.getpid())) <= before


def test_default_tracker_starts_one_embedded_farm(monkeypatch, no_tracker_env):
    monkeypatch.setattr(local, "_embedded", None)
    try:
        addr = default_tracker()
        farm = local._embedded
        assert farm is not None and addr == farm.tracker_addr
        assert default_tracker() == addr and local._embedded is farm  # started once
        with rpc.connect_tracker(*addr) as tracker:
            assert tracker.summary()["queue_info"]["local"]["free"] == 1
            with tracker.request("local", timeout=20) as remote:
                assert remote.listdir(".") == []
        pids = farm_pids(farm)
    finally:
        if local._embedded is not None:
            local._embedded.close()
    assert wait_until(lambda: all(gone(p) for p in pids), timeout=10)


class LineReader:
    """Collects a process's output lines in a thread (select() on a buffered pipe can miss lines)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join(10)  # the pipe ends with the process (and its children, which share it)

    def wait_for(self, pattern: str, timeout: float) -> str:
        """Everything read up to the first line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            lines = list(self.lines)
            for i, line in enumerate(lines):
                if re.search(pattern, line):
                    return "".join(lines[: i + 1])
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{''.join(lines)}")
            time.sleep(0.02)


def test_farm_cli_prints_the_tracker_and_ends_its_processes_on_ctrl_c(tmp_path):
    log = tmp_path / "farm.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "workbench.farm", "--servers", "x=2"], stdout=subprocess.PIPE,
                                stderr=log_file, text=True, env=clean_env(), cwd=ROOT)
    pids: list[int] = []
    reader = LineReader(proc.stdout)
    try:
        out = reader.wait_for(r"^Tracker address", 30)
        match = re.search(r"Tracker address (\S+):(\d+)\s+\(export WORKBENCH_TRACKER=\1:\2\)", out)
        assert match, out
        out = reader.wait_for(r"^x\s", 10)
        assert re.search(r"^x\s+2\s+2\s+0\s*$", out, re.M), out
        assert out.count("server:x") == 2, out
        with rpc.connect_tracker(match.group(1), int(match.group(2))) as tracker:
            with tracker.request("x", timeout=20) as remote:
                remote.upload(b"cli", target="c")
        pids = descendants(proc.pid)
        assert len(pids) >= 3, pids  # the tracker and two servers
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join()
        proc.stdout.close()
    assert wait_until(lambda: all(gone(p) for p in pids), timeout=10), [p for p in pids if not gone(p)]


@pytest.mark.parametrize("arg, message", [
    ("x=two", "--servers takes KEY or KEY=COUNT, not 'x=two'"),
    ("=2", "--servers takes KEY or KEY=COUNT, not '=2'"),
    ("x=0", "got 'x': 0"),
])
def test_farm_cli_bad_servers_argument(arg, message):
    res = subprocess.run([sys.executable, "-m", "workbench.farm", "--servers", arg], capture_output=True,
                         text=True, timeout=30, env=clean_env(), cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_demo_runs_on_the_embedded_farm():
    res = subprocess.run([sys.executable, "-m", "workbench.demo"], capture_output=True, text=True, timeout=90,
                         env=clean_env(), cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "started a local device farm" in res.stdout
    assert "b == a + 1" in res.stdout
    assert "per call (mean ± std. dev. of 5 runs, 100 calls each)" in res.stdout


def test_demo_uses_the_configured_tracker():
    with LocalFarm({"demo": 1}) as farm:
        env = dict(clean_env(), WORKBENCH_TRACKER="%s:%d" % farm.tracker_addr)
        res = subprocess.run([sys.executable, "-m", "workbench.demo", "--key", "demo"], capture_output=True,
                             text=True, timeout=90, env=env, cwd=ROOT)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "using the tracker at %s:%d" % farm.tracker_addr in res.stdout
        assert "started a local device farm" not in res.stdout
        assert "b == a + 1" in res.stdout and "per call (mean ± std. dev." in res.stdout


def test_demo_errors_are_one_line(private_tmpdir):
    with LocalFarm({"demo": 1}) as farm:
        env = dict(clean_env(), WORKBENCH_TRACKER="%s:%d" % farm.tracker_addr)
        res = subprocess.run([sys.executable, "-m", "workbench.demo", "--key", "nobody", "--timeout", "1"],
                             capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    assert res.returncode == 1
    assert "no session for key 'nobody'" in res.stderr and "0 server(s) registered" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    server = rpc.Server(port=0, silent=True, auth_token="right")
    try:
        env = dict(clean_env(), WORKBENCH_RPC_TOKEN="wrong")
        res = subprocess.run([sys.executable, "-m", "workbench.demo", "--connect", f"127.0.0.1:{server.port}"],
                             capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
    finally:
        server.terminate()
    assert res.returncode == 1
    assert "AuthenticationError" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_request_and_run_gives_up_after_its_timeout(private_tmpdir):
    with LocalFarm({"solo": 1}) as farm, farm.request("solo") as holder, farm.connect() as tracker:
        with pytest.raises(TrackerError, match="no session for key 'solo'"):
            tracker.request_and_run("solo", lambda remote: remote.listdir("."), timeout=0.5)
        assert holder.listdir(".") == []
        assert tracker.summary()["queue_info"]["solo"]["pending"] == 0
