"""Per-session quotas (issue 17, item 5), on both servers: workspace bytes, files and directories, tensor
memory, and .tar modules that expand past what the workspace has left.

Every refusal is checked for its words (the same on both servers), for what is on disk afterwards (nothing
past the quota, nothing left of a refused archive) and for the session going on. The options' parsing is
checked on rpc.Server, the rpc_server CLI and minrpc's own command line.
"""
from __future__ import annotations

import gc
import gzip
import io
import os
import re
import selectors
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest

from workbench import rpc, runtime
from workbench.errors import BadRequestError, QuotaExceededError, RPCError, error_from_code
from workbench.runtime.quota import (
    DEFAULT_WORKSPACE_BYTES,
    DEFAULT_WORKSPACE_FILES,
    Quotas,
    default_tensor_bytes,
    format_size,
    machine_memory,
    parse_size,
)

from .conftest import ROOT, session_workspaces, wait_until
from .helpers import start_server

HOST = "127.0.0.1"
MIB = 1 << 20
QUOTAS = dict(max_workspace_bytes="4M", max_workspace_files=20, max_tensor_bytes="4M")
KINDS = ["python", "minrpc"]


def workspace_usage(tmpdir: str) -> tuple[int, int]:
    """``(bytes, entries)`` on disk in every session workspace under ``tmpdir`` (files' sizes; files and
    directories below ``files/`` and ``lib/``)."""
    size = entries = 0
    for base in session_workspaces(tmpdir):
        for top, dirs, files in os.walk(base):
            entries += len(dirs) + len(files)
            for name in files:
                try:
                    size += os.lstat(os.path.join(top, name)).st_size
                except FileNotFoundError:
                    pass
        entries -= 2  # files/ and lib/ themselves
    return size, entries


def private_files(tmpdir: str) -> list[str]:
    """What the sessions' private directories (``lib/``: loaded copies, .tar extraction) hold."""
    return [name for base in session_workspaces(tmpdir) for name in os.listdir(os.path.join(base, "lib"))]


def gzip_of_zeros(nbytes: int, chunk: int = 4 * MIB) -> bytes:
    """A gzip member of ``nbytes`` zero bytes, compressed chunk by chunk (never ``nbytes`` in memory)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros, parts, left = bytes(chunk), [], nbytes
    while left:
        parts.append(comp.compress(zeros[: min(chunk, left)]))
        left -= min(chunk, left)
    parts.append(comp.flush())
    return b"".join(parts)


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular member ``name`` that declares ``size`` bytes."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def zero_bomb(name: str, nbytes: int) -> bytes:
    """A .tar.gz of one member ``name`` holding ``nbytes`` zeros: about 1 KiB per MiB it expands to."""
    padding = -nbytes % 512
    return gzip.compress(tar_header(name, nbytes)) + gzip_of_zeros(nbytes + padding + 1024)  # data, padding, the end


@pytest.fixture(scope="module", params=KINDS)
def server(request, private_tmpdir):
    srv = start_server(request.param, **QUOTAS)
    yield srv
    srv.terminate()


def first_line(pipe, timeout: float = 30.0) -> str:
    """The first line a server prints on ``pipe`` (its listening line), waiting ``timeout`` seconds at most."""
    with selectors.DefaultSelector() as sel:
        sel.register(pipe, selectors.EVENT_READ)
        assert sel.select(timeout), f"the server printed nothing within {timeout} s"
    return pipe.readline()


def refused(call, pattern: str | None) -> str:
    """Run ``call``; it must raise QuotaExceededError (matching ``pattern``, if given); its message."""
    with pytest.raises(QuotaExceededError, match=pattern) as info:
        call()
    assert isinstance(info.value, BadRequestError) and info.value.code == 4, info.value
    assert "wb-session" not in str(info.value), info.value
    return str(info.value)


# -- workspace bytes ----------------------------------------------------------------------------------------
def test_an_upload_over_the_byte_quota_is_refused_before_it_is_written(remote, private_tmpdir):
    remote.upload(os.urandom(3 * MIB), target="weights.bin")
    message = refused(lambda: remote.upload(bytes(2 * MIB), target="more/big.bin"), None)
    assert message == (
        "upload of 2.0 MiB to 'more/big.bin' would put the session workspace over its 4.0 MiB quota "
        "(max_workspace_bytes / --max-workspace-bytes; 3.0 MiB used): remove files or start the server with a "
        "larger --max-workspace-bytes")
    assert remote.listdir(".") == ["weights.bin"]  # not even its directory
    assert workspace_usage(private_tmpdir) == (3 * MIB, 1)
    # replacing a file credits the old one; removing it credits it back
    remote.upload(bytes(4 * MIB), target="weights.bin")
    refused(lambda: remote.upload(b"x", target="one.byte"), r"upload of 1 byte to 'one\.byte' .* 4\.0 MiB used\)")
    remote.remove("weights.bin")
    remote.upload(bytes(2 * MIB), target="more/big.bin")
    remote.upload(bytes(2 * MIB), target="more/big2.bin")
    assert workspace_usage(private_tmpdir) == (4 * MIB, 3)
    remote.remove("more")
    assert remote.listdir(".") == []
    remote.upload(b"still works", target="a.txt")
    assert remote.download("a.txt") == b"still works"


def test_a_stream_of_uploads_stops_at_the_quota(remote, private_tmpdir):
    """As the attack: write MiB after MiB to new files; the writes past the quota are refused, none lands."""
    accepted = 0
    for i in range(12):  # three times the quota
        try:
            remote.upload(bytes(MIB // 2), target=f"blob{i}")
            accepted += 1
        except QuotaExceededError:
            pass
        assert workspace_usage(private_tmpdir)[0] <= 4 * MIB
    assert accepted == 8
    assert remote.ping() is not None


# -- files and directories ------------------------------------------------------------------------------------
def test_files_and_directories_count_against_the_files_quota(remote, private_tmpdir):
    for i in range(18):
        remote.upload(b"", target=f"f{i:02}")
    refused(lambda: remote.upload(b"", target="a/b/c"),
            r"^upload to 'a/b/c' would put the session workspace over its quota of 20 files and directories "
            r"\(max_workspace_files / --max-workspace-files; 18 used\): remove files or start the server with a "
            r"larger --max-workspace-files$")
    assert len(remote.listdir(".")) == 18 and "a" not in remote.listdir(".")
    remote.upload(b"", target="a/b")  # a directory and a file: 20
    remote.upload(b"new bytes", target="f00")  # replacing a file adds none
    refused(lambda: remote.upload(b"", target="f99"), "20 used")
    assert workspace_usage(private_tmpdir)[1] == 20
    remote.remove("a")  # a directory tree credits every entry
    remote.upload(b"", target="x/y")
    assert workspace_usage(private_tmpdir)[1] == 20


# -- tensors --------------------------------------------------------------------------------------------------
def test_tensor_memory_over_the_quota_is_refused_and_freeing_credits_it(remote):
    dev = remote.cpu(0)
    a = runtime.tensor(np.ones(3 * MIB // 4, "float32"), dev)
    message = refused(lambda: runtime.tensor(np.ones((1024, 1024), "float32"), dev), None)
    assert message == (
        "a float32 tensor of shape (1024, 1024) (4.0 MiB) would put the session's tensors over their 4.0 MiB quota "
        "(max_tensor_bytes / --max-tensor-bytes; 3.0 MiB used): free tensors or start the server with a larger "
        "--max-tensor-bytes")
    refused(lambda: runtime.empty((2, 1 << 20), "float32", dev), r"shape \(2, 1048576\) \(8\.0 MiB\)")
    assert remote.ping()["tensor_bytes"] == 3 * MIB
    del a
    gc.collect()  # the FREE goes out before the next request
    b = runtime.tensor(np.full(MIB, 2, "float32"), dev)
    assert remote.ping()["tensor_bytes"] == 4 * MIB and b.numpy()[-1] == 2


# -- .tar modules -----------------------------------------------------------------------------------------------
def test_a_gzip_bomb_is_refused_at_its_member_header(remote, private_tmpdir, kernels):
    remote.upload(zero_bomb("lib0.o", 256 * MIB), target="bomb.tar")  # 256 KiB that expand to 256 MiB
    used = os.path.getsize(os.path.join(session_workspaces(private_tmpdir)[0], "files", "bomb.tar"))
    for call in (remote.load_module, remote.download_linked_module):
        refused(lambda: call("bomb.tar"),
                rf"^extracting the \.tar member 'lib0\.o' of bomb\.tar \(256\.0 MiB\) would put the session "
                rf"workspace over its 4\.0 MiB quota \(max_workspace_bytes / --max-workspace-bytes; "
                rf"{re.escape(format_size(used + 512))} used\): remove files or start")
        assert private_files(private_tmpdir) == []  # what the archive wrote is gone
    # the session goes on, and a real .tar links under the quota (its library counts until the session ends)
    remote.upload(kernels["tar"])
    mod = remote.load_module("kernels.tar")
    assert len(private_files(private_tmpdir)) == 1 and workspace_usage(private_tmpdir)[0] <= 4 * MIB
    dev = remote.cpu(0)
    a, b = runtime.tensor(np.arange(4, dtype="float32"), dev), runtime.empty(4, "float32", dev)
    mod["add_one"](a, b)
    assert b.numpy().tolist() == [1, 2, 3, 4]


def test_a_bomb_after_the_end_of_the_archive_stops_at_the_quota(remote, private_tmpdir):
    """Gzip data after the tar's end is read (for its checksum) and counted too: decompression stops at the quota."""
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        info = tarfile.TarInfo("notes.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    remote.upload(gzip.compress(plain.getvalue()) + gzip_of_zeros(512 * MIB), target="trail.tar")
    left = 4 * MIB - workspace_usage(private_tmpdir)[0]
    refused(lambda: remote.load_module("trail.tar"),
            rf"^expanding trail\.tar past {re.escape(format_size(left))} would put the session workspace over its "
            r"4\.0 MiB quota")
    assert private_files(private_tmpdir) == []
    assert remote.listdir(".") == ["trail.tar"]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_a_member_header_lying_about_its_size_is_refused_before_its_data(remote, private_tmpdir, compress):
    """A header that declares 1 GiB where 1 KiB follows: refused at the header, not read to the archive's end."""
    data = tar_header("lib0.o", 1 << 30) + b"\x7fELF" + bytes(1020) + bytes(1024)
    remote.upload(gzip.compress(data) if compress else data, target="liar.tar")
    refused(lambda: remote.load_module("liar.tar"),
            r"^extracting the \.tar member 'lib0\.o' of liar\.tar \(1\.0 GiB\) would put the session workspace over "
            r"its 4\.0 MiB quota")
    assert private_files(private_tmpdir) == []
    # members that fit one by one but not together: the one that crosses the quota is refused at its header
    parts = [tar_header(f"m{i}.txt", 1536 * 1024) + bytes(1536 * 1024) for i in range(3)]
    remote.remove("liar.tar")
    remote.upload(gzip.compress(b"".join(parts) + bytes(1024)), target="three.tar")
    refused(lambda: remote.load_module("three.tar"), r"^extracting the \.tar member 'm2\.txt' of three\.tar \(1\.5 MiB\)")
    assert remote.listdir(".") == ["three.tar"]


def test_a_loaded_module_keeps_its_copy_counted(remote, private_tmpdir, kernels):
    """The private copy of a loaded .so counts until the session ends: removing the upload does not free it."""
    size = os.path.getsize(kernels["so"])
    remote.upload(kernels["so"])
    remote.load_module("kernels.so")
    remote.remove("kernels.so")
    assert workspace_usage(private_tmpdir) == (size, 1)
    refused(lambda: remote.upload(bytes(4 * MIB - size + 1), target="fill.bin"),
            rf"; {re.escape(format_size(size))} used\)")
    remote.upload(b"not an elf", target="junk.so")
    with pytest.raises(RPCError, match="junk.so"):
        remote.load_module("junk.so")
    assert private_files(private_tmpdir) == [f for f in private_files(private_tmpdir) if f.endswith("kernels.so")]


# -- the options -------------------------------------------------------------------------------------------------
def test_sizes_and_defaults():
    assert [parse_size(v) for v in ("0", "512", "1.5k", "512M", "4G", "4GiB", "2 tb", 7)] == [
        0, 512, 1536, 512 * MIB, 4 << 30, 4 << 30, 2 << 40, 7]
    for bad in ("", "-1", "4x", "G", "1e9", None, True, -5, 2.5):
        with pytest.raises(ValueError, match="takes a size in bytes >= 0, or with a suffix such as 512M or 4G"):
            parse_size(bad, "max_tensor_bytes")
    q = Quotas.resolve()
    assert (q.workspace_bytes, q.workspace_files) == (DEFAULT_WORKSPACE_BYTES, DEFAULT_WORKSPACE_FILES)
    assert q.tensor_bytes == default_tensor_bytes() == machine_memory() // 2 > 0
    assert Quotas() == Quotas(0, 0, 0)  # an in-process LocalSession: no limits
    assert type(error_from_code(4, "upload to 'x' would put the session workspace over its quota of 3 files and "
                                   "directories (max_workspace_files / --max-workspace-files; 3 used): ...")) \
        is QuotaExceededError
    assert type(error_from_code(4, "expected 4 bytes of data, the request carries 8")) is BadRequestError


@pytest.mark.parametrize("kind", KINDS)
def test_the_default_tensor_quota_is_half_the_memory_on_both_servers(kind, private_tmpdir):
    """Both servers compute the same default (and no session can ask for the whole machine)."""
    with start_server(kind) as srv, rpc.connect(HOST, srv.port) as remote:
        refused(lambda: runtime.empty((machine_memory(),), "uint8", remote.cpu(0)),
                rf"over their {re.escape(format_size(default_tensor_bytes()))} quota \(max_tensor_bytes")
        assert remote.listdir(".") == []


@pytest.mark.parametrize("options, pattern", [
    (dict(max_workspace_bytes="lots"), r"max_workspace_bytes takes a size in bytes >= 0, .* not 'lots'"),
    (dict(max_tensor_bytes=-1), r"max_tensor_bytes takes a size in bytes >= 0, .* not -1"),
    (dict(max_workspace_files="ten"), r"max_workspace_files takes a whole number >= 0 \(0: no limit\), e\.g\. 10000, "
                                      r"not 'ten'"),
])
@pytest.mark.parametrize("kind", KINDS)
def test_bad_quota_options_are_refused_by_the_server_objects(kind, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        start_server(kind, **options)


@pytest.mark.parametrize("argv, message", [
    (["--max-workspace-bytes", "4x"], "--max-workspace-bytes takes a size in bytes >= 0, or with a suffix such as "
                                      "512M or 4G (0: no limit), not '4x'"),
    (["--max-tensor-bytes=-2G"], "--max-tensor-bytes takes a size in bytes >= 0"),
    (["--max-workspace-files", "1.5"], "--max-workspace-files takes a whole number >= 0 (0: no limit)"),
])
def test_bad_quota_options_on_the_command_lines(argv, message):
    from workbench.native import build_minrpc

    for command in ([sys.executable, "-m", "workbench.exec.rpc_server", "--port", "0"],
                    [sys.executable, "-m", "workbench.rpc.server.worker", "--stdio"],
                    [build_minrpc(), "--port", "0"]):
        proc = subprocess.run(command + argv, capture_output=True, text=True, timeout=60, cwd=ROOT,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 2 and message in proc.stderr, (command, proc.stderr)


def test_minrpc_reads_sizes_as_the_python_server_does(private_tmpdir):
    """minrpc's own parser (its command line, not MinRPCServer's): "1.5k" is 1536 bytes, as parse_size says."""
    from workbench.native import build_minrpc

    proc = subprocess.Popen([build_minrpc(), "--port", "0", "--silent", "--max-workspace-bytes", "1.5k",
                             "--max-workspace-files", "2", "--max-tensor-bytes", "0.5 KiB"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(re.match(r"minrpc listening on \S+:(\d+)", first_line(proc.stdout)).group(1))
        with rpc.connect(HOST, port) as remote:
            remote.upload(bytes(1536), target="a")
            refused(lambda: remote.upload(bytes(1537), target="a"), r"^upload of 1\.5 KiB to 'a' .* over its 1\.5 KiB quota")
            refused(lambda: remote.upload(b"", target="d/b"), "quota of 2 files and directories")
            refused(lambda: runtime.empty(129, "float32", remote.cpu(0)), r"over their 512 bytes quota")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert wait_until(lambda: not session_workspaces(private_tmpdir))


def test_a_no_fork_server_passes_its_quotas_to_its_workers(private_tmpdir):
    with rpc.Server(port=0, silent=True, no_fork=True, max_workspace_files=1) as srv, \
            rpc.connect(HOST, srv.port) as remote:
        remote.upload(b"", target="a")
        refused(lambda: remote.upload(b"", target="b"), "quota of 1 files and directories")


def test_the_cli_serves_with_its_quotas(private_tmpdir):
    """python -m workbench.exec.rpc_server --max-workspace-bytes 1.5k: a session holds at most 1536 bytes."""
    proc = subprocess.Popen([sys.executable, "-m", "workbench.exec.rpc_server", "--port", "0",
                             "--max-workspace-bytes", "1.5k"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = int(re.search(r"bind to \S+:(\d+)", first_line(proc.stderr)).group(1))
        with rpc.connect(HOST, port) as remote:
            remote.upload(bytes(1536), target="a")
            refused(lambda: remote.upload(b"x", target="b"), r"^upload of 1 byte to 'b' .* over its 1\.5 KiB quota")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert wait_until(lambda: not session_workspaces(private_tmpdir))
