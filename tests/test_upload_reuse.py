"""A large file the client removes or replaces is kept aside, and the next large upload is written over it
(its pages are still cached: nothing to allocate). What the client sees never changes: every file holds
exactly its upload, listdir shows only its files, a loaded module is never written over, the kept files
count against the workspace quota and give way as soon as a write needs their room, and on disk there is
exactly what the workspace counts.
"""
from __future__ import annotations

import os

import pytest

from workbench.errors import QuotaExceededError
from workbench.rpc.wire.protocol import write_all
from workbench.runtime.quota import Quotas
from workbench.runtime.workspace import RECYCLE_BYTES, RECYCLE_FILES, RECYCLE_MIN, Workspace

MIB = 1 << 20


@pytest.fixture
def ws(tmp_path):
    workspace = Workspace(str(tmp_path / "session"))
    yield workspace
    workspace.cleanup()


def put(ws: Workspace, name: str, data: bytes) -> str:
    return ws.write(name, lambda fd: write_all(fd, data), len(data))


def on_disk(ws: Workspace) -> tuple[int, int]:
    """(bytes, entries) under the workspace, as the quota counts them."""
    size = entries = 0
    for top, dirs, files in os.walk(ws.base):
        entries += len(dirs) + len(files)
        size += sum(os.lstat(os.path.join(top, name)).st_size for name in files)
    return size, entries - 2  # files/ and lib/


def assert_counted(ws: Workspace) -> None:
    assert on_disk(ws) == (ws.used_bytes, ws.used_files)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_an_upload_after_a_remove_is_written_over_the_removed_file(ws):
    first, second = os.urandom(3 * MIB), os.urandom(2 * MIB + 5)
    inode = os.stat(put(ws, "a.bin", first)).st_ino
    ws.remove("a.bin")
    assert ws.listdir(".") == []
    assert_counted(ws)  # kept, and counted
    path = put(ws, "b.bin", second)
    assert os.stat(path).st_ino == inode  # the removed file's pages
    assert read(path) == second and os.path.getsize(path) == len(second)  # cut to its new length
    assert ws.listdir(".") == ["b.bin"]
    assert_counted(ws)
    bigger = os.urandom(5 * MIB)
    ws.remove("b.bin")
    assert read(put(ws, "c.bin", bigger)) == bigger  # a kept file smaller than the upload grows
    assert_counted(ws)


def test_a_replaced_file_is_kept_and_the_new_one_is_exact(ws):
    old, new, third = os.urandom(3 * MIB), os.urandom(2 * MIB), os.urandom(3 * MIB)
    put(ws, "x.bin", old)
    x = put(ws, "x.bin", new)
    assert read(x) == new and ws.listdir(".") == ["x.bin"]
    assert_counted(ws)
    y = put(ws, "y.bin", third)  # over the replaced file's pages
    assert read(y) == third and read(x) == new
    assert os.stat(x).st_ino != os.stat(y).st_ino
    assert_counted(ws)


def test_small_files_and_loaded_modules_are_never_kept(ws):
    put(ws, "small.bin", os.urandom(RECYCLE_MIN - 1))
    ws.remove("small.bin")
    module = os.urandom(2 * MIB)
    put(ws, "lib.so", module)
    private = ws.private_copy(ws.resolve("lib.so"), "lib.so")  # as load_module keeps it: a hard link
    ws.remove("lib.so")
    put(ws, "other.bin", os.urandom(2 * MIB))
    assert read(private) == module  # the loaded module's file was not written over
    assert_counted(ws)


def test_a_failed_upload_over_a_kept_file_leaves_nothing(ws):
    put(ws, "a.bin", os.urandom(3 * MIB))
    ws.remove("a.bin")

    def breaks(fd: int) -> None:
        write_all(fd, b"x" * MIB)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        ws.write("b.bin", breaks, 2 * MIB)
    assert ws.listdir(".") == [] and on_disk(ws) == (0, 0)
    assert_counted(ws)


def test_kept_files_give_way_to_the_byte_and_file_quotas(ws):
    ws.set_quotas(Quotas(workspace_bytes=8 * MIB, workspace_files=2))
    put(ws, "a.bin", os.urandom(6 * MIB))
    ws.remove("a.bin")
    assert ws.used_bytes == 6 * MIB  # kept, counted
    put(ws, "b.bin", os.urandom(7 * MIB))  # fits once the kept file is gone
    assert on_disk(ws)[0] <= 8 * MIB
    assert_counted(ws)
    with pytest.raises(QuotaExceededError):
        put(ws, "c.bin", os.urandom(2 * MIB))  # nothing left to give way
    ws.remove("b.bin")
    assert ws.bytes_left() == 8 * MIB  # what a .tar may expand into: the kept file let go first
    assert on_disk(ws) == (0, 0)
    for name in ("d.bin", "e.bin"):
        put(ws, name, os.urandom(MIB))
    ws.remove("d.bin")  # kept: still two entries
    put(ws, "f.bin", os.urandom(MIB // 2))  # a third entry is one too many: the kept file gives way
    assert ws.listdir(".") == ["e.bin", "f.bin"]
    assert_counted(ws)


def test_the_kept_files_are_bounded(ws):
    names = [f"f{i}.bin" for i in range(RECYCLE_FILES + 3)]
    for name in names:
        put(ws, name, bytes(RECYCLE_MIN))
    for name in names:
        ws.remove(name)
    assert len(os.listdir(ws.private)) == RECYCLE_FILES
    assert_counted(ws)
    big = RECYCLE_BYTES // 2 + MIB
    for name in ("g.bin", "h.bin"):
        with open(put(ws, name, b""), "r+b") as f:  # sparse: the size without the disk
            f.truncate(big)
        ws.charge(big, 0)
    ws.remove("g.bin")
    ws.remove("h.bin")  # would take the kept bytes over the bound: removed for good
    assert sum(os.path.getsize(os.path.join(ws.private, n)) for n in os.listdir(ws.private)) <= RECYCLE_BYTES
    assert_counted(ws)


def test_uploads_over_kept_files_through_a_server(remote):
    """End to end: shorter, longer and replacing uploads after removes, each downloaded whole (and, as the
    fixture checks, nothing of the session left once it ends)."""
    blobs = [os.urandom(n) for n in (3 * MIB, 2 * MIB + 1, 4 * MIB + 7, 3 * MIB)]
    remote.upload(blobs[0], target="a.bin")
    remote.remove("a.bin")
    remote.upload(blobs[1], target="b.bin")
    assert remote.download("b.bin") == blobs[1]
    remote.upload(blobs[2], target="b.bin")  # replaced: the old one kept
    remote.upload(blobs[3], target="c.bin")
    assert remote.download("b.bin") == blobs[2] and remote.download("c.bin") == blobs[3]
    assert remote.listdir(".") == ["b.bin", "c.bin"]
