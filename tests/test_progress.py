"""Progress bars: large transfers, long timings and queue waits (workbench.progress and the sessions)."""
from __future__ import annotations

import re
import sys
import threading
import time

import numpy as np
import pytest

from workbench import progress, rpc, runtime
from workbench.errors import PathDeniedError
from workbench.progress import (
    PROGRESS_CHUNK,
    TRANSFER_THRESHOLD,
    WAIT_THRESHOLD,
    chunk_slices,
    expected_time_eval_seconds,
    progress_enabled,
    timed_bar,
    transfer_bar,
    wait_bar,
)

MIB = 1 << 20
BIG = 20 * MIB + 12345  # over the threshold, and not a whole number of chunks


@pytest.fixture(autouse=True)
def default_environment(monkeypatch):
    """Each test starts with progress on (as in a terminal or a notebook; pytest's stderr is neither),
    whatever the caller's environment says; transfer bars appear at their first report (loopback transfers
    end before the usual SHOW_AFTER)."""
    monkeypatch.setattr(progress, "_watched", lambda: True)
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(progress, "SHOW_AFTER", 0.0)


@pytest.fixture
def bars(monkeypatch):
    """Every tqdm bar created during the test: a real ``tqdm.auto`` bar (it draws) that also records its updates."""
    import tqdm.auto

    created = []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            self.updates = []
            self.closed = False
            super().__init__(*args, **kwargs)
            created.append(self)

        def update(self, n=1):
            self.updates.append(n)
            return super().update(n)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    return created


@pytest.fixture
def no_tqdm(monkeypatch):
    """tqdm cannot be imported."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)


@pytest.fixture(params=["socket", "popen", "local"])
def session(request):
    """A session of each kind: a real Server over TCP, a stdio server over pipes, in-process."""
    if request.param == "socket":
        yield request.getfixturevalue("remote")
        return
    sess = rpc.PopenSession(rpc.popen_server_command()) if request.param == "popen" else rpc.LocalSession()
    yield sess
    sess.close()


def payload(size: int) -> bytes:
    return np.random.default_rng(size).bytes(size)


def progress_lines(err: str) -> list[str]:
    """The bar renderings in captured stderr (tqdm redraws with carriage returns)."""
    return [part for part in re.split(r"[\r\n]", err) if "|" in part]


# -- the switch ------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "false", "No", " off "])
def test_environment_turns_progress_off(monkeypatch, value):
    monkeypatch.setenv(progress.ENV, value)
    assert not progress_enabled()
    assert progress_enabled(True)  # an explicit choice wins


def test_progress_is_on_by_default_and_false_wins(monkeypatch):
    assert progress_enabled()
    monkeypatch.setenv(progress.ENV, "1")
    assert progress_enabled()
    assert not progress_enabled(False)


def test_by_default_bars_show_only_where_someone_watches(monkeypatch):
    monkeypatch.undo()  # the real check: pytest's captured stderr is no terminal, and no Jupyter kernel runs here
    monkeypatch.delenv(progress.ENV, raising=False)
    assert not progress_enabled()
    monkeypatch.setenv(progress.ENV, "on")  # forced on: logs and pipes get the bar too
    assert progress_enabled()


def test_chunk_slices_cover_everything_once():
    done = []
    parts = list(chunk_slices(2 * PROGRESS_CHUNK + 5, done.append))
    assert [(p.start, p.stop) for p in parts] == [
        (0, PROGRESS_CHUNK), (PROGRESS_CHUNK, 2 * PROGRESS_CHUNK), (2 * PROGRESS_CHUNK, 2 * PROGRESS_CHUNK + 5)
    ]
    assert done == [PROGRESS_CHUNK, PROGRESS_CHUNK, 5]
    assert list(chunk_slices(7)) == [slice(0, 7)]  # no reports: one piece


# -- transfer_bar ------------------------------------------------------------------
def test_transfer_bar_below_threshold_or_off_is_none(bars):
    with transfer_bar(TRANSFER_THRESHOLD - 1, "small") as update:
        assert update is None
    with transfer_bar(TRANSFER_THRESHOLD, "off", progress=False) as update:
        assert update is None
    assert bars == []
    with transfer_bar(TRANSFER_THRESHOLD, "exactly 8 MiB") as update:
        update(TRANSFER_THRESHOLD)
    assert len(bars) == 1 and bars[0].total == TRANSFER_THRESHOLD and bars[0].closed


def test_transfer_bar_is_closed_on_error(bars, capsys):
    with pytest.raises(RuntimeError, match="mid-transfer"):
        with transfer_bar(64 * MIB, "upload doomed.bin") as update:
            update(8 * MIB)
            raise RuntimeError("mid-transfer")
    assert bars[0].closed
    assert "upload doomed.bin" in capsys.readouterr().err


def test_transfer_bar_without_tqdm_counts_quietly(no_tqdm, capsys):
    with transfer_bar(64 * MIB, "upload x") as update:
        for _ in range(8):
            update(8 * MIB)
    assert capsys.readouterr().err == ""


def test_a_fast_transfer_creates_no_bar(session, bars, capsys, monkeypatch):
    monkeypatch.setattr(progress, "SHOW_AFTER", 3600.0)
    data = payload(BIG)
    session.upload(data, target="fast.bin")
    assert session.download("fast.bin") == data
    assert bars == [] and capsys.readouterr().err == ""


def test_a_late_bar_starts_from_the_bytes_already_moved(bars, monkeypatch):
    monkeypatch.setattr(progress, "SHOW_AFTER", 0.3)
    total = 5 * PROGRESS_CHUNK
    with transfer_bar(total, "download slow.bin") as update:
        begun = time.monotonic()
        update(PROGRESS_CHUNK)
        update(PROGRESS_CHUNK)
        while time.monotonic() - begun < 0.3:  # let the transfer "last" past SHOW_AFTER
            time.sleep(0.05)
        for _ in range(3):
            update(PROGRESS_CHUNK)
    assert len(bars) == 1 and bars[0].closed
    assert bars[0].n == total and bars[0].initial + sum(bars[0].updates) == total
    assert bars[0].initial > 0 or len(bars[0].updates) == 5  # started late, from what had been moved


# -- transfers on real sessions -------------------------------------------------------
def test_large_transfers_show_a_bar_and_arrive_intact(session, bars, capsys, tmp_path):
    data = payload(BIG)
    session.upload(data, target="big.bin")
    path = tmp_path / "from-disk.bin"
    path.write_bytes(data[::-1])
    session.upload(path)
    assert session.download("big.bin") == data
    assert session.download("from-disk.bin") == data[::-1]

    assert [bar.desc for bar in bars] == [
        "upload big.bin", "upload from-disk.bin", "download big.bin", "download from-disk.bin"
    ]
    for bar in bars:
        assert bar.closed and bar.total == BIG
        assert sum(bar.updates) == BIG  # every byte counted once
        assert max(bar.updates) <= PROGRESS_CHUNK and len(bar.updates) >= BIG // PROGRESS_CHUNK
    lines = progress_lines(capsys.readouterr().err)
    assert any(line.startswith("upload big.bin:") and "20.0M" in line for line in lines), lines
    assert any(line.startswith("download from-disk.bin:") for line in lines), lines


def test_no_bar_below_the_threshold(session, bars, capsys):
    data = payload(TRANSFER_THRESHOLD - 1)
    session.upload(data, target="small.bin")
    assert session.download("small.bin") == data
    assert bars == []
    assert progress_lines(capsys.readouterr().err) == []


def test_progress_false_shows_nothing(session, bars, capsys):
    data = payload(BIG)
    session.upload(data, target="quiet.bin", progress=False)
    assert session.download("quiet.bin", progress=False) == data
    assert bars == []
    assert capsys.readouterr().err == ""


def test_environment_off_shows_nothing_unless_asked(session, bars, capsys, monkeypatch):
    monkeypatch.setenv(progress.ENV, "0")
    data = payload(BIG)
    session.upload(data, target="env.bin")
    assert session.download("env.bin") == data
    assert bars == [] and capsys.readouterr().err == ""
    assert session.download("env.bin", progress=True) == data  # an explicit True beats the environment
    assert [bar.desc for bar in bars] == ["download env.bin"]


def test_transfers_work_without_tqdm(session, no_tqdm, capsys, tmp_path):
    data = payload(BIG)
    session.upload(data, target="plain.bin")
    path = tmp_path / "plain-file.bin"
    path.write_bytes(data)
    session.upload(path)
    assert session.download("plain.bin") == data
    assert session.download("plain-file.bin") == data
    assert capsys.readouterr().err == ""


def test_a_refused_upload_closes_its_bar_and_the_session_goes_on(session, bars):
    with pytest.raises(PathDeniedError):
        session.upload(payload(BIG), target="../outside.bin")
    assert all(bar.closed for bar in bars)
    session.upload(b"still here", target="after.txt")
    assert session.download("after.txt") == b"still here"


def test_download_linked_module_takes_progress(remote, kernels, bars):
    remote.upload(kernels["tar"])
    so = remote.download_linked_module("kernels.tar", progress=True)
    assert so[:4] == b"\x7fELF"
    assert bars == []  # a small library: no bar


def test_numpy_buffers_upload_by_bytes(remote, bars):
    arr = np.arange(BIG // 4, dtype=np.float32)  # a memoryview of format "f": the bar counts bytes, not items
    remote.upload(memoryview(arr), target="floats.bin")
    assert remote.download("floats.bin") == arr.tobytes()
    assert bars[0].total == arr.nbytes and sum(bars[0].updates) == arr.nbytes


# -- timed_bar and time_evaluator -------------------------------------------------------
def progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("workbench-progress")]


def test_timed_bar_advances_and_its_thread_ends(bars, capsys):
    with timed_bar(30.0, "time slow_kernel"):
        assert [t.name for t in progress_threads()] == ["workbench-progress time slow_kernel"]
        deadline = time.monotonic() + 10
        while bars[0].n == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 < bars[0].n < 30.0  # moved by the thread, not yet done
    assert progress_threads() == []
    assert bars[0].closed
    assert any(line.startswith("time slow_kernel:") and "of about 30 s" in line
               for line in progress_lines(capsys.readouterr().err))


def test_timed_bar_thread_ends_on_error_too(bars):
    with pytest.raises(KeyboardInterrupt):
        with timed_bar(10.0, "time interrupted"):
            raise KeyboardInterrupt
    assert progress_threads() == [] and bars[0].closed


def test_timed_bar_short_or_off_or_without_tqdm_starts_nothing(bars, monkeypatch):
    with timed_bar(progress.TIMED_THRESHOLD, "time short"):
        assert progress_threads() == []
    with timed_bar(60.0, "time off", progress=False):
        assert progress_threads() == []
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with timed_bar(60.0, "time no tqdm"):
        assert progress_threads() == []
    assert bars == []


def test_expected_time_eval_seconds():
    assert expected_time_eval_seconds(10, 1) == 0  # nothing known yet: no bar
    assert expected_time_eval_seconds(10, 3, seconds_per_call=0.1) == pytest.approx(0.1 + 3 * 1.0)
    assert expected_time_eval_seconds(1, 4, min_repeat_ms=500) == pytest.approx(2.0)
    # a repeat lasts the longer of min_repeat_ms and number calls
    assert expected_time_eval_seconds(100, 2, min_repeat_ms=100, seconds_per_call=0.01) == pytest.approx(0.01 + 2.0)
    # cooldowns between groups of repeats, none after the last
    assert expected_time_eval_seconds(1, 5, cooldown_interval_ms=1000, repeats_to_cooldown=2) == pytest.approx(2.0)
    assert expected_time_eval_seconds(1, 5, cooldown_interval_ms=1000) == pytest.approx(4.0)


def test_time_evaluator_shows_a_bar_for_a_long_run(mod, remote, bars, capsys):
    dev = remote.cpu()
    result = mod.time_evaluator("half", dev, number=1, repeat=1, min_repeat_ms=2100)(3.0)
    assert result.results[0] < 1e-3
    assert progress_threads() == []
    assert [bar.desc for bar in bars] == ["time half"] and bars[0].total == pytest.approx(2.1)
    assert bars[0].closed
    assert any(line.startswith("time half:") for line in progress_lines(capsys.readouterr().err))


def test_time_evaluator_no_bar_when_short_or_off(mod, remote, bars):
    dev = remote.cpu()
    a = runtime.tensor(np.ones(1024, "float32"), dev)
    b = runtime.empty((1024,), "float32", dev)
    mod.time_evaluator("add_one", dev, number=10, repeat=3)(a, b)  # microseconds: no bar
    timer = mod.time_evaluator("half", dev, number=1, repeat=1, min_repeat_ms=2100, progress=False)
    assert timer(1.0).results[0] < 1e-3
    assert bars == []


def test_time_evaluator_learns_from_the_last_run(bars):
    @rpc.register_func("tests.progress.nap", override=True)
    def nap() -> None:
        time.sleep(0.03)

    remote = rpc.LocalSession()
    try:
        dev = remote.cpu()
        fn = remote.get_function("tests.progress.nap")
        fn.time_evaluator(dev, number=1, repeat=1)()  # nothing known: no bar, but a time per call learned
        assert bars == []
        result = fn.time_evaluator(dev, number=80, repeat=1)()  # 80 naps: over 2 s expected
        assert result.mean >= 0.03
        assert [bar.desc for bar in bars] == ["time tests.progress.nap"]
        assert bars[0].total > progress.TIMED_THRESHOLD and bars[0].closed
        assert progress_threads() == []
    finally:
        remote.close()


# -- wait_bar ------------------------------------------------------------------
def test_wait_bar_appears_only_after_a_second(bars, capsys):
    with wait_bar("request 'local'") as waiting:
        waiting.update(0.2, "1st in the queue")
        waiting.update(WAIT_THRESHOLD - 0.01, "1st in the queue")
        assert not waiting.shown and bars == []
        waiting.update(3.2, "2nd in the queue")
        assert waiting.shown and len(bars) == 1 and bars[0].total is None
        waiting.update(4.0, "1st in the queue")
        assert bars[0].n == 4.0
    assert bars[0].closed
    text = capsys.readouterr().err  # the open-ended bar is a line of text, redrawn in place
    assert "request 'local': waited 3 s, 2nd in the queue" in text
    assert "waited 4 s, 1st in the queue" in text
    waiting.update(9.0, "late")  # after the block: nothing
    assert capsys.readouterr().err == "" and len(bars) == 1


def test_wait_bar_short_wait_shows_nothing(bars, capsys):
    with wait_bar("request 'local'") as waiting:
        waiting.update(0.5, "1st in the queue")
    assert not waiting.shown and bars == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["argument", "environment", "no tqdm"])
def test_wait_bar_off_is_a_no_op(how, bars, capsys, monkeypatch):
    if how == "environment":
        monkeypatch.setenv(progress.ENV, "off")
    if how == "no tqdm":
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with wait_bar("request 'local'", progress=False if how == "argument" else None) as waiting:
        waiting.update(5.0, "2nd in the queue")
        waiting.update(6.0, "1st in the queue")
        assert not waiting.shown
    assert bars == [] and capsys.readouterr().err == ""


def test_core_modules_do_not_import_jupyter():
    import subprocess

    code = (
        "import sys, workbench.progress, workbench.rpc.client.session\n"
        "bad = [m for m in ('IPython', 'ipywidgets', 'matplotlib', 'tqdm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# -- the channel's chunked paths ---------------------------------------------------
@pytest.mark.parametrize("timeout", [None, 30.0], ids=["blocking", "with-timeout"])
@pytest.mark.parametrize("source", ["bytes", "file"])
def test_channel_sends_and_receives_in_reported_chunks(timeout, source, tmp_path):
    """A frame over a real TCP connection: sendfile (or sendall) and recv_into chunk by chunk, each reported."""
    import socket

    from workbench.rpc.wire.protocol import Kind, SocketChannel

    data = payload(BIG)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        peer, _ = listener.accept()
    client.settimeout(timeout)
    peer.settimeout(30)
    sender, receiver = SocketChannel(client), SocketChannel(peer)
    got = bytearray(BIG)
    received: list[int] = []
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            frame = receiver.recv_frame()
            assert (frame.kind, frame.ctrl, frame.bulk_len) == (Kind.UPLOAD, ["x"], BIG)
            receiver.recv_bulk_reporting(memoryview(got), received.append)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=receive, name="test receiver")
    thread.start()
    sent: list[int] = []
    try:
        if source == "bytes":
            sender.send_frame(Kind.UPLOAD, ["x"], data, progress=sent.append)
        else:
            path = tmp_path / "x.bin"
            path.write_bytes(data)
            with open(path, "rb") as f:
                sender.send_frame(Kind.UPLOAD, ["x"], file=(f, BIG), progress=sent.append)
    finally:
        sender.close()  # what was sent still arrives; on a failure the receiver sees the end at once
        thread.join(30)
        receiver.close()
    assert not thread.is_alive() and not errors, errors
    assert got == data
    assert sum(sent) == BIG and max(sent) <= PROGRESS_CHUNK and len(sent) == -(-BIG // PROGRESS_CHUNK)
    assert received == [PROGRESS_CHUNK, PROGRESS_CHUNK, BIG - 2 * PROGRESS_CHUNK]
