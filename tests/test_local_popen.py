"""LocalSession (in-process) and PopenSession (a server over a child's stdin/stdout)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from workbench import rpc, runtime
from workbench.errors import ConnectionClosedError, PathDeniedError, RemoteError, SessionCrashedError
from workbench.runtime.workspace import PREALLOCATE_WINDOW


def exercise(remote, kernels):
    remote.upload(kernels["tar"])
    mod = remote.load_module("kernels.tar")
    dev = remote.cpu()
    a = runtime.tensor(np.arange(5, dtype="float32"), dev)
    b = runtime.empty((5,), "float32", dev)
    mod["add_one"](a, b)
    np.testing.assert_array_equal(b.numpy(), np.arange(5) + 1)
    assert mod.time_evaluator("add_one", dev, number=3, repeat=2)(a, b).mean > 0
    with pytest.raises(RemoteError, match="expected 2 arguments"):
        mod["add_one"](a)
    with pytest.raises(PathDeniedError):
        remote.download("../x")
    remote.upload(b"abc", target="f.txt")
    assert remote.download("f.txt") == b"abc"
    assert "f.txt" in remote.listdir(".")
    assert remote.get_function("workbench.echo")(7) == 7


def test_local_session(kernels):
    remote = rpc.LocalSession()
    workspace = remote._handler.workspace.root
    exercise(remote, kernels)
    remote.close()
    assert not os.path.exists(workspace)


@pytest.mark.parametrize("progress", [False, True])
def test_local_uploads_over_a_window_land_whole(tmp_path, progress):
    """Over a window of preallocation an upload is written window after window, from bytes or from a file."""
    data = os.urandom(PREALLOCATE_WINDOW + (3 << 20) + 5)
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    with rpc.LocalSession() as remote:
        remote.upload(data, target="from-bytes.bin", progress=progress)
        remote.upload(path, target="from-file.bin", progress=progress)
        for name in ("from-bytes.bin", "from-file.bin"):
            assert remote.download(name, progress=False) == data


def test_popen_session_with_the_python_server(kernels):
    remote = rpc.PopenSession(rpc.popen_server_command())
    exercise(remote, kernels)
    proc = remote._proc
    remote.close()
    assert proc.poll() is not None


def test_popen_session_names_a_crash(kernels):
    remote = rpc.PopenSession(rpc.popen_server_command())
    remote.upload(kernels["so"])
    with pytest.raises(SessionCrashedError, match="SIGSEGV"):
        remote.load_module("kernels.so")["segfault_unguarded"]()
    remote.close()


def test_popen_session_from_bytes_of_an_executable(tmp_path):
    script = f"#!/bin/sh\nexec {' '.join(rpc.popen_server_command())}\n".encode()
    remote = rpc.PopenSession(script)
    path = remote._tempfile
    assert remote.listdir(".") == []
    remote.close()
    assert not os.path.exists(path)


def test_popen_session_bad_binary(tmp_path):
    with pytest.raises(RuntimeError, match="cannot start the server program '/no/such/server': No such file") as info:
        rpc.PopenSession("/no/such/server")  # a RuntimeError as in TVM, and still an OSError
    assert isinstance(info.value, OSError)
    plain = tmp_path / "server"
    plain.write_bytes(b"#!/bin/sh\n")
    with pytest.raises(RuntimeError, match=r"Permission denied; make it executable \(chmod \+x\)"):
        rpc.PopenSession(str(plain))
    with pytest.raises(ConnectionClosedError, match="closed the connection during the handshake"):
        rpc.PopenSession([shutil.which("true")])
