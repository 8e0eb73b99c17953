"""Kernels compiled by apache-tvm 0.27 run on our server, with no TVM on the server side.

apache-tvm (the ``tvm`` test extra: ``pip install -e .[test,tvm]``) is used
only on the client side, and only in a subprocess: ``tests/tvm_export_kernels.py``
compiles ``add_one`` and ``scale_shift`` for the llvm target and exports each as a
shared object (``.so``) and as a tar of objects (``.tar``), once per test session.

The server side is provably TVM-free in two ways:

* a tripwire: the server and its session workers run with a ``PYTHONPATH``
  whose first entry holds fake ``tvm`` and ``tvm_ffi`` packages; importing
  either records the attempt in a file (and fails), and the file must stay empty;
* ``/proc/<pid>/maps`` of the server, of the session worker that ran a kernel
  (which does map the kernel) and of a PopenSession server shows no TVM library.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from workbench import rpc, runtime
from workbench.errors import RemoteError
from workbench.results import BenchmarkResult
from workbench.runtime.ffi import exported_kernels

if importlib.util.find_spec("tvm") is None:
    pytest.skip(
        "apache-tvm is not installed (it is the `tvm` test extra: pip install -e .[test,tvm])",
        allow_module_level=True,
    )

# The export (LLVM compile of two kernels) runs inside the first test's budget.
pytestmark = pytest.mark.timeout(420)

HERE = os.path.dirname(os.path.abspath(__file__))
EXPORT_SCRIPT = os.path.join(HERE, "tvm_export_kernels.py")
EXPORT_TIMEOUT_S = 300
N = 1024


# -- what "TVM on the server side" looks like ----------------------------------------
def _tvm_package_dirs() -> list[str]:
    """Where the installed TVM packages live (found without importing them)."""
    dirs = []
    for name in ("tvm", "tvm_ffi"):
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.realpath(location) + os.sep)
    return dirs


TVM_DIRS = _tvm_package_dirs()


def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {parts[5].strip() for parts in (line.split(maxsplit=5) for line in f) if len(parts) == 6}


def tvm_mappings(pid: int) -> list[str]:
    """Files from TVM mapped into process ``pid`` (libtvm*, anything from the tvm/tvm_ffi packages)."""
    found = []
    for path in mapped_files(pid):
        real = path.replace(" (deleted)", "")
        if re.search(r"libtvm", os.path.basename(real)) or any(real.startswith(d) for d in TVM_DIRS):
            found.append(path)
    return sorted(found)


# -- fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tvm_kernels(tmp_path_factory) -> dict[str, dict[str, str]]:
    """``{"add_one": {"so": path, "tar": path}, "scale_shift": {...}}``, exported by apache-tvm once."""
    out = tmp_path_factory.mktemp("exported_kernels")
    cmd = [sys.executable, EXPORT_SCRIPT, str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"exporting the TVM kernels took over {EXPORT_TIMEOUT_S} s: {' '.join(cmd)}")
    if proc.returncode != 0:
        pytest.fail(
            f"exporting the TVM kernels failed (status {proc.returncode}): {' '.join(cmd)}\n"
            + proc.stderr[-4000:]
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the export script printed no JSON line; stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    report = json.loads(lines[-1])
    assert report["tvm_version"].startswith("0.27"), report["tvm_version"]
    kernels = {k["name"]: k["files"] for k in report["kernels"]}
    for files in kernels.values():
        for path in files.values():
            assert os.path.getsize(path) > 0, path
    return kernels


@pytest.fixture(scope="module")
def tripwire(tmp_path_factory) -> dict[str, str]:
    """A PYTHONPATH entry whose fake ``tvm``/``tvm_ffi`` packages log any import into a file."""
    root = tmp_path_factory.mktemp("no_tvm_here")
    log_path = root / "imports.log"
    log_path.write_text("")
    for name in ("tvm", "tvm_ffi"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(
            "import os, sys\n"
            f"with open({str(log_path)!r}, 'a') as f:\n"
            f"    f.write('pid %d imported {name}: %s\\n' % (os.getpid(), ' '.join(sys.argv)))\n"
            f"raise ImportError('tests/test_tvm_kernels.py: the server side must not import {name}')\n"
        )
    pythonpath = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": pythonpath, "log": str(log_path)}


def tvm_imports(tripwire) -> str:
    with open(tripwire["log"]) as f:
        return f.read()


@pytest.fixture(scope="module")
def server(private_tmpdir, tripwire):
    """Our server (overrides conftest's, so its ``remote`` fixture connects here), tripwire armed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", tripwire["PYTHONPATH"])
        srv = rpc.Server(port=0, silent=True)
    yield srv
    srv.terminate()
    assert not srv.alive
    assert tvm_imports(tripwire) == "", "the server side imported TVM"


@pytest.fixture
def dev(remote):
    return remote.cpu(0)


@pytest.fixture
def a_np() -> np.ndarray:
    return np.random.default_rng(0).uniform(-10, 10, N).astype("float32")


def upload_and_load(remote, path: str, name: str | None = None):
    remote.upload(path, name)
    return remote.load_module(name or os.path.basename(path))


def check_add_one(fn, remote, a_np: np.ndarray) -> None:
    dev = remote.cpu(0)
    a = runtime.tensor(a_np, dev)
    b = runtime.empty((N,), "float32", dev)
    assert fn(a, b) is None
    np.testing.assert_array_equal(b.numpy(), a_np + np.float32(1))


# -- tests --------------------------------------------------------------------------------
def test_add_one_so(remote, tvm_kernels, a_np):
    mod = upload_and_load(remote, tvm_kernels["add_one"]["so"])
    assert {"add_one", "main"} <= set(mod.function_names)
    assert mod.entry_name == "main"
    check_add_one(mod["add_one"], remote, a_np)
    check_add_one(mod, remote, a_np + 5)  # the entry function, through mod(a, b)


def test_add_one_tar_linked_by_the_server(remote, tvm_kernels, a_np):
    mod = upload_and_load(remote, tvm_kernels["add_one"]["tar"])
    assert {"add_one", "main"} <= set(mod.function_names)
    assert mod.entry_name == "main"
    check_add_one(mod["add_one"], remote, a_np)
    check_add_one(mod, remote, a_np - 3)


def test_download_linked_module(remote, tvm_kernels, a_np, tmp_path):
    remote.upload(tvm_kernels["add_one"]["tar"])
    data = remote.download_linked_module("add_one.tar")
    assert isinstance(data, (bytes, bytearray))
    assert data[:4] == b"\x7fELF", "not an ELF file"
    byteorder = "little" if data[5] == 1 else "big"
    assert int.from_bytes(data[16:18], byteorder) == 3, "not a shared object (ELF e_type ET_DYN)"
    assert b"libtvm" not in data, "the linked module depends on a TVM library"
    local = tmp_path / "linked.so"
    local.write_bytes(data)
    assert {"add_one", "main"} <= set(exported_kernels(str(local)))

    remote.upload(bytes(data), target="add_one_linked.so")
    mod = remote.load_module("add_one_linked.so")
    check_add_one(mod["add_one"], remote, a_np)


def test_tvm_argument_errors_reach_the_client(remote, tvm_kernels, a_np, dev):
    mod = upload_and_load(remote, tvm_kernels["add_one"]["so"])
    add_one = mod["add_one"]
    a = runtime.tensor(a_np, dev)

    with pytest.raises(RemoteError) as info:
        add_one(a)
    assert "Expected 2 arguments" in str(info.value)
    assert "add_one(A: Tensor([1024], float32), B: Tensor([1024], float32))" in str(info.value)

    wrong = runtime.tensor(np.zeros(N, dtype="float64"), dev)
    with pytest.raises(RemoteError) as info:
        add_one(a, wrong)
    assert "Mismatched" in str(info.value) and "dtype" in str(info.value)
    np.testing.assert_array_equal(wrong.numpy(), np.zeros(N))  # untouched

    # The session goes on: same module, same tensors, a fresh output.
    assert remote.ping()["tensors"] >= 2
    check_add_one(add_one, remote, a_np)
    check_add_one(mod, remote, a_np)


def test_scale_shift_scalar_arguments(remote, tvm_kernels, a_np, dev):
    remote.upload(tvm_kernels["scale_shift"]["so"])
    mod = remote.load_module("scale_shift.so")
    a = runtime.tensor(a_np, dev)
    b = runtime.empty((N,), "float32", dev)
    for scale, shift in ((2.5, 3), (-0.75, -7), (0.0, 0)):
        mod["scale_shift"](a, scale, shift, b)
        expected = a_np * np.float32(scale) + np.float32(shift)
        np.testing.assert_allclose(b.numpy(), expected, rtol=1e-6, atol=1e-5)


def test_time_evaluator(remote, tvm_kernels, a_np, dev):
    mod = upload_and_load(remote, tvm_kernels["add_one"]["so"])
    a = runtime.tensor(a_np, dev)
    b = runtime.empty((N,), "float32", dev)
    result = mod.time_evaluator(mod.entry_name, dev, number=10, repeat=3)(a, b)
    assert isinstance(result, BenchmarkResult)
    assert len(result.results) == 3
    assert all(t > 0 for t in result.results), result.results
    assert 0 < result.min <= result.mean <= result.max
    np.testing.assert_array_equal(b.numpy(), a_np + np.float32(1))  # it really ran


def test_server_side_maps_no_tvm(server, remote, tvm_kernels, a_np, tripwire, private_tmpdir):
    mod = upload_and_load(remote, tvm_kernels["add_one"]["so"])
    check_add_one(mod["add_one"], remote, a_np)

    worker = remote.info["pid"]
    assert worker != server.pid
    with open(f"/proc/{worker}/status") as f:
        ppid = int(re.search(r"^PPid:\s*(\d+)", f.read(), re.M).group(1))
    assert ppid == server.pid, "the session is not served by a worker of our server"
    # The worker that ran the kernel maps it (from a private per-load path): this is the process to look at.
    assert any(p.endswith("add_one.so") for p in mapped_files(worker)), sorted(mapped_files(worker))
    assert tvm_mappings(worker) == []
    assert tvm_mappings(server.pid) == []

    # The stdio server of a PopenSession is just as free of TVM.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", tripwire["PYTHONPATH"])
        popen = rpc.PopenSession(rpc.popen_server_command())
    try:
        pmod = upload_and_load(popen, tvm_kernels["add_one"]["so"])
        check_add_one(pmod, popen, a_np)
        pid = popen.info["pid"]
        assert any(p.endswith("add_one.so") for p in mapped_files(pid)), sorted(mapped_files(pid))
        assert tvm_mappings(pid) == []
    finally:
        popen.close()

    assert tvm_imports(tripwire) == "", "the server side tried to import TVM"


def test_tar_and_so_of_the_same_name(remote, tvm_kernels, a_np, dev):
    """lib.so and lib.tar side by side: linking lib.tar neither overwrites lib.so nor reuses its code."""
    with open(tvm_kernels["scale_shift"]["so"], "rb") as f:
        scale_shift_so = f.read()
    remote.upload(scale_shift_so, target="lib.so")
    remote.upload(tvm_kernels["add_one"]["tar"], "lib.tar")
    so_mod = remote.load_module("lib.so")
    tar_mod = remote.load_module("lib.tar")
    assert "scale_shift" in so_mod.function_names and "add_one" in tar_mod.function_names

    check_add_one(tar_mod["add_one"], remote, a_np)
    a = runtime.tensor(a_np, dev)
    b = runtime.empty((N,), "float32", dev)
    so_mod["scale_shift"](a, 2.0, 1, b)
    np.testing.assert_allclose(b.numpy(), a_np * 2 + 1, rtol=1e-6)
    assert remote.download("lib.so") == scale_shift_so, "loading lib.tar overwrote the uploaded lib.so"


def test_reupload_while_loaded(remote, tvm_kernels, a_np, dev):
    """A rebuilt kernel uploaded over a loaded one: the new load runs the new code, the old module still works."""
    old = upload_and_load(remote, tvm_kernels["add_one"]["so"], "kernel.so")
    check_add_one(old, remote, a_np)
    new = upload_and_load(remote, tvm_kernels["scale_shift"]["so"], "kernel.so")
    assert "scale_shift" in new.function_names

    a = runtime.tensor(a_np, dev)
    b = runtime.empty((N,), "float32", dev)
    new(a, 3.0, 2, b)  # the entry function is scale_shift's now
    np.testing.assert_allclose(b.numpy(), a_np * 3 + 2, rtol=1e-6, atol=1e-5)
    check_add_one(old, remote, a_np)
