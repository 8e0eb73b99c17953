"""upload / download / remove / listdir, confined to the session workspace."""
from __future__ import annotations

import glob
import os

import pytest

from workbench import rpc
from workbench.errors import PathDeniedError, RemoteNotFoundError
from workbench.rpc.wire.protocol import SocketChannel
from workbench.rpc.wire.protocol import HEADER, Kind, pack
from workbench.runtime.workspace import PREALLOCATE_MIN, PREALLOCATE_WINDOW, preallocate

from .conftest import assert_clean, session_workspaces, wait_until
from .helpers import start_server
from .test_protocol import RawPeer


def test_upload_download_roundtrip_bytes(remote):
    data = os.urandom(100_000)
    remote.upload(data, target="blob.bin")
    assert remote.download("blob.bin") == data
    assert isinstance(remote.download("blob.bin"), bytearray)


def test_upload_file_keeps_its_name(remote, tmp_path):
    local = tmp_path / "weights.bin"
    local.write_bytes(b"\x01\x02" * 1000)
    remote.upload(str(local))
    assert remote.listdir(".") == ["weights.bin"]
    remote.upload(local, target="sub/dir/copy.bin")
    assert remote.download("sub/dir/copy.bin") == local.read_bytes()
    assert remote.listdir("sub/dir") == ["copy.bin"]


def test_empty_file(remote):
    remote.upload(b"", target="empty")
    assert remote.download("empty") == bytearray()


def test_large_upload_streams(remote, tmp_path):
    size = 48 << 20
    local = tmp_path / "big.bin"
    with open(local, "wb") as f:
        f.truncate(size)
        f.seek(size - 5)
        f.write(b"tail!")
    remote.upload(str(local))
    back = remote.download("big.bin")
    assert len(back) == size and back[-5:] == b"tail!" and back[:4] == b"\0\0\0\0"


def test_preallocation_gives_the_blocks_and_keeps_the_length(tmp_path):
    fd = os.open(tmp_path / "new.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        preallocate(fd, 0, 8 << 20)
        st = os.fstat(fd)
        assert st.st_size == 0  # nothing to read yet, and a shorter write leaves no zeros behind it
        assert st.st_blocks * 512 >= 8 << 20
        preallocate(fd, 8 << 20, 4 << 20)  # the next window
        assert os.fstat(fd).st_blocks * 512 >= 12 << 20
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["python", "minrpc"])
def test_a_slow_upload_holds_no_more_disk_than_it_filled_and_one_window(kind, private_tmpdir):
    """A client that declares a huge upload and sends slowly gets disk as its bytes come (a window ahead),
    not the declared size at once; when it goes, the partial file goes with it."""
    declared, sent = 1 << 40, 3 << 20  # 1 TiB: over any disk; quotas off, so nothing refuses it up front
    with start_server(kind, max_workspace_bytes=0) as srv:
        with RawPeer.connect(srv.port) as peer:
            peer.handshake()
            ctrl = pack(["huge.bin"])
            peer.send(HEADER.pack(len(ctrl), Kind.UPLOAD, 0, declared) + ctrl)
            for _ in range(sent >> 20):
                peer.send(os.urandom(1 << 20))
            [workspace] = session_workspaces(private_tmpdir)

            def landing() -> list[os.stat_result]:
                return [os.stat(path) for path in glob.glob(os.path.join(workspace, "files", ".upload-*"))]

            assert wait_until(lambda: [st.st_size for st in landing()] == [sent])
            [st] = landing()
            assert st.st_blocks * 512 <= sent + PREALLOCATE_WINDOW + (1 << 20)
        assert_clean(srv, private_tmpdir)


@pytest.mark.parametrize("kind", ["python", "minrpc"])
def test_large_uploads_land_with_exactly_their_bytes(kind, private_tmpdir):
    """Around and over the preallocation size, replacing longer and shorter files, on both servers."""
    with start_server(kind) as srv, rpc.connect("127.0.0.1", srv.port) as remote:
        for size in (5 << 20, PREALLOCATE_MIN - 1, (3 << 20) + 123, PREALLOCATE_MIN, 6 << 20):
            data = os.urandom(size)
            remote.upload(data, target="w.bin")
            [workspace] = session_workspaces(private_tmpdir)
            assert os.path.getsize(os.path.join(workspace, "files", "w.bin")) == size
            assert remote.download("w.bin") == data
        remote.upload(os.urandom(2 << 20), target="gone.bin")
        remote.remove("gone.bin")
        assert remote.listdir(".") == ["w.bin"]


@pytest.mark.parametrize("kind, options", [("python", {}), ("python", {"timeout": 30.0}), ("minrpc", {})],
                         ids=["python", "python-timeout", "minrpc"])  # with a timeout: socket.sendfile
def test_downloads_arrive_whole_around_the_piece_sizes(kind, options, private_tmpdir):
    """On loopback a file goes in pieces (SEND_PIECE, minrpc's CONN_PIECE), some from a mapping and some
    by sendfile: every size around the pieces' edges arrives whole, with and without a progress bar."""
    piece = SocketChannel.SEND_PIECE
    sizes = [1, piece - 1, piece, piece + 1, piece * SocketChannel.SENDFILE_SHARE + 7, (9 << 20) + 3]
    with start_server(kind, **options) as srv, rpc.connect("127.0.0.1", srv.port) as remote:
        for size in sizes:
            data = os.urandom(size)
            remote.upload(data, target="f.bin")
            for progress in (False, True):
                assert remote.download("f.bin", progress=progress) == data, (size, progress)
    assert_clean(srv, private_tmpdir)


def test_remove_and_listdir(remote):
    remote.upload(b"a", target="a.txt")
    remote.upload(b"b", target="d/b.txt")
    assert remote.listdir(".") == ["a.txt", "d"]
    remote.remove("a.txt")
    remote.remove("d")
    assert remote.listdir(".") == []
    with pytest.raises(RemoteNotFoundError, match="no file 'a.txt'"):
        remote.remove("a.txt")
    with pytest.raises(RemoteNotFoundError, match="no file 'missing.bin'"):
        remote.download("missing.bin")


@pytest.mark.parametrize(
    "path, message",
    [
        ("/etc/passwd", "absolute path"),
        ("../escape.txt", "'..'"),
        ("a/../../escape.txt", "'..'"),
        ("~/x", "absolute path"),
    ],
)
def test_paths_outside_the_workspace_are_refused(remote, path, message):
    for call in (
        lambda: remote.upload(b"x", target=path),
        lambda: remote.download(path),
        lambda: remote.remove(path),
        lambda: remote.listdir(path),
        lambda: remote.load_module(path),
    ):
        with pytest.raises(PathDeniedError, match=message):
            call()
    assert remote.listdir(".") == []  # the session goes on


def test_symlink_escape_is_refused(remote, server, private_tmpdir):
    # A client cannot make symlinks, but a tar or a kernel could: plant one in the live workspace.
    (workspace,) = session_workspaces(private_tmpdir)
    os.symlink("/etc", os.path.join(workspace, "files", "etc"))
    with pytest.raises(PathDeniedError, match="outside the session workspace"):
        remote.download("etc/passwd")
    with pytest.raises(PathDeniedError, match="outside the session workspace"):
        remote.upload(b"x", target="etc/evil")


@pytest.mark.parametrize("size", [1000, 3 << 20], ids=["small", "bulk"])
def test_upload_takes_any_bytes_like_object_in_one_piece(remote, size):
    """A numpy array goes as its raw bytes, without tobytes(); 2-D, float, bytearray and memoryview alike."""
    import numpy as np

    arr = np.random.default_rng(1).random((size // 8 // 4, 4))  # float64, C order
    sources = {"array": arr, "bytearray": bytearray(arr.tobytes()), "memoryview": memoryview(arr.tobytes())[8:]}
    for name, data in sources.items():
        remote.upload(data, target=f"{name}.bin")
        assert remote.download(f"{name}.bin") == memoryview(data).cast("B").tobytes(), name
    with pytest.raises(ValueError, match=r"not contiguous; pass numpy.ascontiguousarray"):
        remote.upload(arr[:, ::2], target="strided.bin")
    with pytest.raises(TypeError, match=r"upload takes a file path or bytes .*not int"):
        remote.upload(123, target="x.bin")
    assert "strided.bin" not in remote.listdir(".")


def test_upload_bytes_needs_a_target(remote):
    with pytest.raises(ValueError, match="target="):
        remote.upload(b"abc")


def test_each_session_has_its_own_workspace_removed_at_close(server, private_tmpdir):
    a = rpc.connect("127.0.0.1", server.port)
    b = rpc.connect("127.0.0.1", server.port)
    a.upload(b"1", target="only_a.txt")
    assert b.listdir(".") == []
    assert len(session_workspaces(private_tmpdir)) == 2
    a.close()
    b.close()
    assert_clean(server, private_tmpdir)
