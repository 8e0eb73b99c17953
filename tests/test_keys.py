"""Device keys: a typo fails at once and names the real keys; waiting is asked for; %rpc_tracker keeps the farm.

Real trackers and servers on loopback, a real IPython InteractiveShell for the
magics. Every request is bounded by its own timeout (and the file by
pytest-timeout), so a request that queues where it should fail cannot hang the run.
"""
from __future__ import annotations

import threading
import time

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from workbench import farm as farm_api
from workbench import rpc
from workbench.errors import KeyNotFoundError
from workbench.notebook import MagicError
from workbench.rpc.client.tracker_session import TrackerError, WaitStatus, closest_key

from .conftest import assert_clean, wait_until

pytestmark = pytest.mark.timeout(300)

HOST = "127.0.0.1"
FAST_S = 5.0  # "fails at once": a generous bound on a noisy machine; the requests themselves allow 30 s


def queue(tracker: rpc.TrackerSession, key: str) -> dict:
    return tracker.summary()["queue_info"].get(key, {"free": 0, "pending": 0})


@pytest.fixture(scope="module")
def board(private_tmpdir):
    """A tracker with two "local" servers and one "rasp4" server (a lab in miniature)."""
    with rpc.Tracker(host=HOST, port=0, silent=True) as tracker:
        servers = [rpc.Server(host=HOST, port=0, key=key, tracker_addr=(HOST, tracker.port), silent=True)
                   for key in ("local", "local", "rasp4")]
        try:
            with rpc.connect_tracker(HOST, tracker.port) as ts:
                assert wait_until(lambda: queue(ts, "local")["free"] == 2 and queue(ts, "rasp4")["free"] == 1, 20), \
                    ts.summary()
            yield tracker, servers
        finally:
            for srv in servers:
                srv.terminate()


@pytest.fixture
def ts(board):
    tracker, _ = board
    with rpc.connect_tracker(HOST, tracker.port) as session:
        yield session


# -- the Python API -------------------------------------------------------------------------------------
def test_a_key_typo_fails_at_once_naming_the_keys_their_free_counts_and_the_closest(ts):
    start = time.monotonic()
    with pytest.raises(KeyNotFoundError) as info:
        ts.request("rasp", timeout=30)  # were it queued, this would end in a plain TrackerError after 30 s
    assert time.monotonic() - start < FAST_S
    exc = info.value
    text = str(exc)
    assert "no session for key 'rasp'" in text and "did you mean 'rasp4'?" in text
    assert "local 2 of 2 free" in text and "rasp4 1 of 1 free" in text
    assert "wait=True" in text and "--key rasp" in text  # the ways out: wait, or start a server of that key
    assert exc.key == "rasp" and exc.closest == "rasp4" and exc.keys == {"local": (2, 2), "rasp4": (1, 1)}
    assert isinstance(exc, LookupError) and isinstance(exc, TrackerError)  # `except TrackerError` still catches it
    assert queue(ts, "rasp") == {"free": 0, "pending": 0}  # it never queued
    assert queue(ts, "rasp4")["free"] == 1  # and took nothing

    with pytest.raises(KeyNotFoundError, match="did you mean 'rasp4'"):  # the same through request_and_run
        ts.request_and_run("RASP4", lambda remote: remote.listdir("."), timeout=30)
    with pytest.raises(KeyNotFoundError) as info:  # nothing close: the keys, no guess
        ts.request("gpu", timeout=30)
    assert info.value.closest is None and "did you mean" not in str(info.value)
    assert "local 2 of 2 free" in str(info.value)


def test_an_empty_tracker_says_no_key_has_servers(private_tmpdir):
    with rpc.Tracker(host=HOST, port=0, silent=True) as tracker, rpc.connect_tracker(HOST, tracker.port) as ts:
        with pytest.raises(KeyNotFoundError, match="no server is registered for any key") as info:
            ts.request("rasp4", timeout=30)
        assert info.value.keys == {} and info.value.closest is None


def test_closest_key():
    assert closest_key("rasp", ["local", "rasp4"]) == "rasp4"
    assert closest_key("Rasp4", ["local", "rasp4"]) == "rasp4"  # case
    assert closest_key("rasp", ["raspberry-pi-4", "local"]) == "raspberry-pi-4"  # a prefix difflib finds too far
    assert closest_key("gpu", ["local", "rasp4"]) is None


def test_wait_queues_for_an_unregistered_key_until_a_server_registers(board, ts, private_tmpdir):
    tracker, _ = board
    got: dict = {}
    statuses: list[WaitStatus] = []

    def client() -> None:
        try:
            got["session"] = ts.request("late", wait=True, timeout=60, on_wait=statuses.append, progress=False)
        except BaseException as exc:  # reported below
            got["error"] = exc

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    late = None
    try:
        with rpc.connect_tracker(HOST, tracker.port) as watcher:
            assert wait_until(lambda: queue(watcher, "late")["pending"] == 1, 20), got
        # the queue status line says no "late" server is there yet, and names the keys that are
        assert wait_until(lambda: any(s.keys for s in statuses), 20), statuses
        line = next(s for s in statuses if s.keys).describe()
        assert "no server is registered for key 'late' yet" in line, line
        assert "local 2 of 2 free" in line and "rasp4 1 of 1 free" in line, line
        late = rpc.Server(host=HOST, port=0, key="late", tracker_addr=(HOST, tracker.port), silent=True)
        thread.join(60)
        assert not thread.is_alive() and "error" not in got, got
        with got["session"] as remote:
            assert remote.info["key"] == "late" and remote.listdir(".") == []
        assert_clean(late, private_tmpdir)
    finally:
        thread.join(60)
        if late is not None:
            late.terminate()


def test_a_registered_key_with_every_server_busy_queues(ts, private_tmpdir, board):
    _, servers = board
    holder = ts.request("rasp4", timeout=30)
    got: dict = {}
    statuses: list[WaitStatus] = []

    def client() -> None:
        try:
            with rpc.connect_tracker(HOST, board[0].port) as own:
                got["session"] = own.request("rasp4", timeout=60, on_wait=statuses.append, progress=False)
        except BaseException as exc:  # reported below
            got["error"] = exc

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: queue(ts, "rasp4")["pending"] == 1, 20), got  # queued, not refused
        assert wait_until(lambda: any(s.keys for s in statuses), 20), statuses
        line = next(s for s in statuses if s.keys).describe()
        assert "1st in the queue for 'rasp4'" in line and "rasp4 0 of 1 free" in line and "local 2 of 2 free" in line
        holder.close()
        thread.join(60)
        assert not thread.is_alive() and "error" not in got, got
        with got["session"] as remote:
            assert remote.info["key"] == "rasp4"
    finally:
        holder.close()
        thread.join(60)
    assert wait_until(lambda: queue(ts, "rasp4") == {"free": 1, "pending": 0}, 20)
    assert_clean(servers[2], private_tmpdir)


def test_open_session_fails_fast_or_waits(board):
    tracker, _ = board
    where = f"{HOST}:{tracker.port}"
    start = time.monotonic()
    with pytest.raises(KeyNotFoundError, match="did you mean 'rasp4'"):
        farm_api.open_session(key="rsap4", tracker=where, timeout=30, progress=False)
    assert time.monotonic() - start < FAST_S
    with pytest.raises(TrackerError) as info:  # asked to wait: it queued, and gave up at its timeout
        farm_api.open_session(key="rsap4", tracker=where, timeout=0.5, wait=True, progress=False)
    assert not isinstance(info.value, KeyNotFoundError) and "after" in str(info.value)
    assert "the keys with servers are local 2 of 2 free, rasp4 1 of 1 free" in str(info.value)


# -- the magics -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shell(private_tmpdir):
    farm_api.stop_farm()
    farm_api.set_default_tracker(None)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "workbench")
    yield ip
    for name, value in list(ip.user_ns.items()):
        if isinstance(value, rpc.RPCSession):
            value.close()
            del ip.user_ns[name]
    ip.run_line_magic("unload_ext", "workbench")
    farm_api.set_default_tracker(None)
    assert farm_api.current_farm() is None


@pytest.fixture
def lab(board, monkeypatch):
    """What `python -m workbench.lab` and Binder do: WORKBENCH_TRACKER names their tracker (here: no rasp4 on it)."""
    lab_tracker = rpc.Tracker(host=HOST, port=0, silent=True)
    lab_server = rpc.Server(host=HOST, port=0, key="local", tracker_addr=(HOST, lab_tracker.port), silent=True)
    try:
        with rpc.connect_tracker(HOST, lab_tracker.port) as ts:
            assert wait_until(lambda: queue(ts, "local")["free"] == 1, 20)
        monkeypatch.setenv("WORKBENCH_TRACKER", f"{HOST}:{lab_tracker.port}")
        yield lab_tracker
    finally:
        farm_api.stop_farm()
        farm_api.set_default_tracker(None)
        lab_server.terminate()
        lab_tracker.terminate()


def test_readme_sequence_under_workbench_tracker_connects_to_rasp4(shell, lab, capsys):
    lab_addr = (HOST, lab.port)
    shell.run_line_magic("rpc_tracker", "--no-picker")
    assert f"default tracker: {HOST}:{lab.port} (configured" in capsys.readouterr().out
    assert farm_api.default_tracker() == lab_addr

    shell.run_line_magic("rpc_farm", "--servers local=1 rasp4=1")
    farm = farm_api.current_farm()
    assert farm_api.default_tracker() == farm.tracker_addr != lab_addr
    capsys.readouterr()

    magics = shell.magics_manager.registry["WorkbenchMagics"]
    try:
        shell.run_line_magic("rpc_tracker", "")  # the README's next line: shows the farm, changes nothing
        out = capsys.readouterr().out
        assert f"default tracker: {farm.tracker_addr[0]}:{farm.tracker_addr[1]} (the embedded farm)" in out, out
        assert magics.pickers[-1].tracker_address == "%s:%d" % farm.tracker_addr
        assert farm_api.default_tracker() == farm.tracker_addr
    finally:
        magics.close()
    shell.run_line_magic("rpc_tracker", "--no-picker")  # again, and still the farm
    assert "(the embedded farm)" in capsys.readouterr().out
    assert farm_api.default_tracker() == farm.tracker_addr

    shell.run_line_magic("rpc_connect", "--key rasp4 --timeout 30")  # bounded: before the fix it queued at the lab's
    remote = shell.user_ns.pop("remote")
    assert remote.info["key"] == "rasp4"
    assert remote.address.endswith(":%d" % next(s.port for s in farm.servers if s.key == "rasp4"))
    remote.close()

    # naming a tracker still makes it the default; there the typo'd or missing key fails at once
    shell.run_line_magic("rpc_tracker", f"{HOST}:{lab.port} --no-picker")
    assert farm_api.default_tracker() == lab_addr
    start = time.monotonic()
    with pytest.raises(MagicError, match=r"key 'rasp4'.*the keys with servers are local 1 of 1 free"):
        shell.run_line_magic("rpc_connect", "--key rasp4 --timeout 30")
    assert time.monotonic() - start < FAST_S


def test_connect_magic_typo_fails_fast_in_one_line(shell, lab, capsys):
    shell.run_line_magic("rpc_farm", "--servers local=1 rasp4=1")
    capsys.readouterr()
    start = time.monotonic()
    result = shell.run_cell("%rpc_connect --key rasp --timeout 30")
    assert time.monotonic() - start < FAST_S
    assert isinstance(result.error_in_exec, MagicError)
    captured = capsys.readouterr()
    err = (captured.out + captured.err).strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "KeyNotFoundError" in err and "no session for key 'rasp'" in err and "did you mean 'rasp4'?" in err
    assert "local 1 of 1 free" in err and "rasp4 1 of 1 free" in err and "--wait" in err
    assert "remote" not in shell.user_ns
    with pytest.raises(UsageError, match="--wait"):
        shell.run_line_magic("rpc_connect", f"{HOST}:1 --wait")


def test_connect_magic_wait_queues_until_a_server_registers(shell, lab, private_tmpdir):
    shell.run_line_magic("rpc_farm", "--servers local=1")
    farm = farm_api.current_farm()
    started: list[rpc.Server] = []
    stop = threading.Event()

    def start_when_queued() -> None:  # a board that boots while the cell waits
        with rpc.connect_tracker(*farm.tracker_addr) as watcher:
            for _ in range(1000):
                if stop.is_set():
                    return
                if queue(watcher, "rasp4")["pending"] == 1:
                    started.append(rpc.Server(host=HOST, port=0, key="rasp4", tracker_addr=farm.tracker_addr,
                                              silent=True))
                    return
                stop.wait(0.02)

    thread = threading.Thread(target=start_when_queued, daemon=True)
    thread.start()
    try:
        shell.run_line_magic("rpc_connect", "--key rasp4 --wait --timeout 60 -o late")
        remote = shell.user_ns.pop("late")
        assert started and remote.info["key"] == "rasp4" and remote.address.endswith(f":{started[0].port}")
        remote.close()
        assert_clean(started[0], private_tmpdir)
    finally:
        stop.set()
        thread.join(30)
        for srv in started:
            srv.terminate()
