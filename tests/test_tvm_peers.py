"""The three apache-tvm 0.27 peers of our tracker: TVM's RPC server, its query tool and its tracker.

1. A TVM ``rpc_server --tracker`` registers with our ``rpc.Tracker``, TVM
   clients get it through our tracker (again and again: it re-registers after
   every session), and our ``summary()`` shows it.
2. TVM's ``query_rpc_tracker`` reads our tracker: one of our servers and one
   TVM server, their keys and queue status.
3. Our ``TrackerSession`` reads a TVM tracker, and our ``rpc.Server``
   registers with it and is handed out through it.

Every TVM process runs in its own process group with TMPDIR in this test's
``tmp_path`` (a killed TVM server leaves its session directories behind, and
``tvm.rpc.Server.terminate`` needs psutil); the whole group is killed and
waited for at the end.
"""
from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest

from workbench import rpc

from .conftest import assert_clean, wait_until

if importlib.util.find_spec("tvm") is None:
    pytest.skip(
        "apache-tvm is not installed (it is the `tvm` test extra: pip install -e .[test,tvm])",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(90)

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0  # a TVM process imports tvm first: a few seconds on a busy machine
WAIT_S = 15.0


# -- TVM processes ----------------------------------------------------------------------
class TVMProcess:
    """A ``python -m tvm.exec.<tool>`` in its own process group, logging to a file."""

    def __init__(self, proc: subprocess.Popen, log: Path, tmpdir: Path):
        self.proc, self.log, self.tmpdir = proc, log, tmpdir

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def bound_port(self, timeout: float = START_TIMEOUT_S) -> int:
        """The port from the tool's ``bind to HOST:PORT`` log line."""
        found: list[int] = []

        def bound() -> bool:
            match = re.search(rf"bind to {re.escape(HOST)}:(\d+)", self.output())
            if match:
                found.append(int(match.group(1)))
            return bool(match) or self.proc.poll() is not None

        wait_until(bound, timeout, 0.05)
        assert found, f"{self.proc.args[2]} did not report its port (exit {self.proc.poll()}):\n{self.output()}"
        return found[0]


def port_range(span: int = 50) -> tuple[int, int]:
    """A start port that was free a moment ago, and an end ``span`` ports on (TVM tools scan the range)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        start = s.getsockname()[1]
    return start, min(start + span, 65535)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def end_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the whole process group, SIGKILL what is left; wait until none of it runs."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        if proc.poll() is not None and wait_until(lambda: not group_members(proc.pid), grace, 0.05):
            return
    raise AssertionError(f"{proc.args} left processes running: {group_members(proc.pid)}")


@contextlib.contextmanager
def tvm_tool(tmp_path: Path, name: str, tool: str, *args: str) -> Iterator[TVMProcess]:
    """Run ``python -m tvm.exec.<tool> args...``; end its process group and its temp files on exit."""
    tmpdir = tmp_path / f"{name}-tmp"
    tmpdir.mkdir()
    log = tmp_path / f"{name}.log"
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"tvm.exec.{tool}", *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    try:
        yield TVMProcess(proc, log, tmpdir)
    finally:
        end_group(proc)
        shutil.rmtree(tmpdir, ignore_errors=True)


def tvm_rpc_server(tmp_path: Path, tracker_port: int, key: str) -> contextlib.AbstractContextManager[TVMProcess]:
    start, end = port_range()
    return tvm_tool(
        tmp_path, f"tvm-server-{key}", "rpc_server", "--host", HOST, "--port", str(start), "--port-end", str(end),
        "--tracker", f"{HOST}:{tracker_port}", "--key", key,
    )


# -- waiting on a tracker ------------------------------------------------------------------
def wait_summary(tracker: rpc.TrackerSession, predicate: Callable[[dict[str, Any]], bool], what: str,
                 peers: tuple[TVMProcess, ...] = (), timeout: float = WAIT_S) -> dict[str, Any]:
    last: list[dict[str, Any]] = [{}]

    def check() -> bool:
        last[0] = tracker.summary()
        return predicate(last[0]) or any(p.proc.poll() is not None for p in peers)

    wait_until(check, timeout, 0.05)
    logs = "".join(f"\n--- {p.proc.args[2]} (exit {p.proc.poll()}):\n{p.output()}" for p in peers)
    assert predicate(last[0]), f"waited {timeout} s for {what}; last summary {last[0]}{logs}"
    return last[0]


def free(key: str, n: int = 1) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["queue_info"].get(key) == {"free": n, "pending": 0}


def server_entries(summary: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return [s for s in summary["server_info"] if s.get("key") == f"server:{key}"]


# -- a TVM client ---------------------------------------------------------------------------
def tvm_client_round_trip(tracker_port: int, key: str, payload: bytes, ours: rpc.TrackerSession) -> dict[str, Any]:
    """Get a ``key`` server from the tracker with TVM's client and use it; the session is gone on return."""
    import tvm
    from tvm import rpc as tvm_rpc

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # the tracker socket TVM's client opens: its REQUEST wait is bounded
    try:
        tracker = tvm_rpc.connect_tracker(HOST, tracker_port)
    finally:
        socket.setdefaulttimeout(old)
    try:
        remote = tracker.request(key, max_retry=1)
        remote.upload(bytearray(payload), "payload.bin")
        downloaded = bytes(remote.download("payload.bin"))
        host = np.arange(16, dtype="float32") * 1.5
        tensor = tvm.runtime.tensor(host, remote.cpu())
        back = tensor.numpy()
        during = ours.summary()  # while the TVM session is open
        del tensor, remote
    finally:
        tracker.close()
    gc.collect()  # the RPC session closes when its last reference goes
    return {"downloaded": downloaded, "sent": host, "back": back, "during": during}


# -- 1. a TVM server registers with our tracker ---------------------------------------------
def test_tvm_server_registers_with_our_tracker_and_serves_tvm_clients(tmp_path):
    with rpc.Tracker(port=0, silent=True) as tracker, rpc.connect_tracker(HOST, tracker.port) as ours, \
            tvm_rpc_server(tmp_path, tracker.port, "tvmdev") as tvm_server:
        summary = wait_summary(ours, free("tvmdev"), "the TVM server to register", (tvm_server,))
        [entry] = server_entries(summary, "tvmdev")
        assert entry["addr"] == [HOST, tvm_server.bound_port()]  # the None host TVM sends is filled in

        for attempt in range(2):  # the second works only if the TVM server registered again after the first
            payload = f"attempt {attempt} ".encode() * 1000
            result = tvm_client_round_trip(tracker.port, "tvmdev", payload, ours)
            assert result["downloaded"] == payload
            np.testing.assert_array_equal(result["back"], result["sent"])
            assert result["during"]["queue_info"]["tvmdev"] == {"free": 0, "pending": 0}, result["during"]
            assert len(server_entries(result["during"], "tvmdev")) == 1
            wait_summary(ours, free("tvmdev"), f"the TVM server to be free again after session {attempt + 1}",
                         (tvm_server,))
        assert tvm_server.proc.poll() is None, tvm_server.output()


# -- 2. TVM's query_rpc_tracker reads our tracker ----------------------------------------------
def test_tvm_query_rpc_tracker_reads_our_tracker(tmp_path, private_tmpdir):
    with rpc.Tracker(port=0, silent=True) as tracker, rpc.connect_tracker(HOST, tracker.port) as ours, \
            tvm_rpc_server(tmp_path, tracker.port, "tvmdev") as tvm_server:
        server = rpc.Server(port=0, tracker_addr=(HOST, tracker.port), key="oursdev", silent=True)
        try:
            wait_summary(ours, lambda s: free("tvmdev")(s) and free("oursdev")(s), "both servers to register",
                         (tvm_server,))
            query = subprocess.run(
                [sys.executable, "-m", "tvm.exec.query_rpc_tracker", "--host", HOST, "--port", str(tracker.port)],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                env=dict(os.environ, TMPDIR=str(tmp_path)),
            )
        finally:
            server.terminate()
    out = query.stdout
    assert query.returncode == 0, f"exit {query.returncode}\n{out}\n{query.stderr}"
    assert f"Tracker address {HOST}:{tracker.port}" in out, out
    assert re.search(rf"^{re.escape(HOST)}:{server.port}\s+server:oursdev$", out, re.M), out
    assert re.search(rf"^{re.escape(HOST)}:\d+\s+server:tvmdev$", out, re.M), out
    queue = out.split("Queue Status", 1)[1]
    for key in ("oursdev", "tvmdev"):  # key, total, free, pending
        assert re.search(rf"^{key}\s+1\s+1\s+0\s*$", queue, re.M), out
    assert_clean(server, private_tmpdir)


# -- 3. our client and server against TVM's tracker ---------------------------------------------
def test_our_session_and_server_with_a_tvm_tracker(tmp_path, private_tmpdir):
    if importlib.util.find_spec("tornado") is None:
        pytest.skip("apache-tvm's RPC tracker needs tornado, which is not installed (pip install tornado)")
    start, end = port_range()
    with tvm_tool(tmp_path, "tvm-tracker", "rpc_tracker", "--host", HOST, "--port", str(start),
                  "--port-end", str(end)) as tvm_tracker:
        port = tvm_tracker.bound_port()
        with rpc.connect_tracker(HOST, port) as ours, tvm_rpc_server(tmp_path, port, "tvmdev") as tvm_server:
            server = rpc.Server(port=0, tracker_addr=(HOST, port), key="ours", silent=True)
            try:
                peers = (tvm_tracker, tvm_server)
                summary = wait_summary(ours, lambda s: free("tvmdev")(s) and free("ours")(s),
                                       "both servers to register with the TVM tracker", peers)
                [tvm_entry] = server_entries(summary, "tvmdev")
                assert tvm_entry["addr"] == [HOST, tvm_server.bound_port()]
                [our_entry] = server_entries(summary, "ours")
                assert our_entry["addr"] == [HOST, server.port]
                text = ours.text_summary()
                assert re.search(rf"^{re.escape(HOST)}:\d+\s+server:tvmdev$", text, re.M), text
                assert re.search(r"^tvmdev\s+1\s+1\s+0$", text, re.M), text
                assert re.search(r"^ours\s+1\s+1\s+0$", text, re.M), text

                for attempt in range(2):  # the second works only if our server registered again
                    remote = ours.request("ours", timeout=30)
                    try:
                        payload = os.urandom(1 << 16)
                        remote.upload(payload, f"data{attempt}.bin")
                        assert f"data{attempt}.bin" in remote.listdir(".")
                        assert bytes(remote.download(f"data{attempt}.bin")) == payload
                        assert ours.summary()["queue_info"]["ours"] == {"free": 0, "pending": 0}
                    finally:
                        remote.close()
                    wait_summary(ours, free("ours"), f"our server to be free again after session {attempt + 1}",
                                 peers)
                assert_clean(server, private_tmpdir)
            finally:
                server.terminate()
        assert tvm_tracker.proc.poll() is None
        complaints = re.findall(r".*(?:WARNING|ERROR|Traceback|Invalid|Unknown tracker code).*", tvm_tracker.output())
        assert not complaints, f"the TVM tracker complained:\n{tvm_tracker.output()}"
