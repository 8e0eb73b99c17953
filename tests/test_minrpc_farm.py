"""minrpc from Python: builds, with_minrpc programs, MinRPCServer, and the emulated aarch64 board of a LocalFarm.

The board is minrpc cross-compiled for aarch64-linux-gnu and run under
qemu-aarch64 with Debian's aarch64 sysroot; it links ``.tar`` modules with the
host's aarch64 cross compiler. Its tests need Debian's qemu-user,
gcc-aarch64-linux-gnu and libc6-dev-arm64-cross (.ci/run installs them) and
skip, naming them, where they are missing. apache-tvm runs only in
subprocesses (the test process stays free of it).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from workbench import cc, rpc, runtime
from workbench.cc import ToolchainNotFoundError
from workbench.errors import KernelCrashedError, SessionCrashedError
from workbench.farm import LocalFarm
from workbench.native import MinRPCBuildError, build_minrpc
from workbench.native.qemu import EmulatorNotFoundError, find_emulator, packages_for
from workbench.results import BenchmarkResult
from workbench.testing import EvaluatorConfig, RPCConfig, rpc_run

from .conftest import alive, wait_until
from .helpers import ADD_ONE, EM_AARCH64, EM_X86_64, RAW_EXIT_H, elf_machine, emulated_board_missing, run_export_script

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BOARD = "aarch64-qemu"
TVM_EXPORT_TIMEOUT_S = 300


BOARD_MISSING = emulated_board_missing()
needs_board = pytest.mark.skipif(BOARD_MISSING is not None, reason=f"no emulated aarch64 board: {BOARD_MISSING}")
needs_arm64_gcc = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None,
    reason="the aarch64 cross compiler is missing: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
)
needs_tvm = pytest.mark.skipif(importlib.util.find_spec("tvm") is None,
                               reason="apache-tvm is not installed (the `tvm` test extra: pip install -e .[test,tvm])")


CRASHERS = RAW_EXIT_H + """#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <workbench_kernel.h>
WB_KERNEL(segfault) { raise(SIGSEGV); return 0; }
WB_KERNEL(quit) { _exit(86); return 0; }
WB_KERNEL(exit_group) { raw_exit_group(86); return 0; }
WB_KERNEL(fine) { ret->type_index = kTVMFFIInt; ret->v_int64 = 42; return 0; }
"""


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {c for c, p in parents.items() if p in frontier} - found
        found |= frontier
    return found



# -- builds ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def host_minrpc() -> str:
    return build_minrpc("host")


@pytest.fixture(scope="session")
def arm_minrpc() -> str:
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("the aarch64 cross compiler is missing: apt-get install gcc-aarch64-linux-gnu "
                    "libc6-dev-arm64-cross")
    return build_minrpc("aarch64-linux-gnu")


def test_build_minrpc_host_is_cached(host_minrpc):
    assert elf_machine(host_minrpc) in (EM_X86_64, EM_AARCH64) and os.access(host_minrpc, os.X_OK)
    first = os.stat(host_minrpc)
    again = build_minrpc()  # a hit: the same file, not rebuilt (a build renames a new file into place)
    assert again == host_minrpc and os.stat(again).st_ino == first.st_ino


@needs_arm64_gcc
def test_build_minrpc_aarch64_is_cached(arm_minrpc, tmp_path):
    assert elf_machine(arm_minrpc) == EM_AARCH64
    inode = os.stat(arm_minrpc).st_ino
    for form in ("aarch64-linux-gnu", "aarch64", {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}):
        assert build_minrpc(form) == arm_minrpc and os.stat(arm_minrpc).st_ino == inode
    copy = build_minrpc("aarch64-linux-gnu", output=tmp_path / "board-server")
    assert copy == str(tmp_path / "board-server") and elf_machine(copy) == EM_AARCH64
    assert os.access(copy, os.X_OK) and os.listdir(tmp_path) == ["board-server"]


def test_build_errors_carry_the_compiler_output(tmp_path):
    bad = tmp_path / "broken.c"
    bad.write_text("int broken(void) { return undeclared_name; }\n")
    with pytest.raises(MinRPCBuildError, match=r"(?s)building minrpc failed.*broken\.c.*undeclared_name"):
        build_minrpc(objects=[bad], output=tmp_path / "prog")
    assert sorted(os.listdir(tmp_path)) == ["broken.c"]  # no half-written program, no temp file


ARMHF_BOARD_MISSING = emulated_board_missing("armhf")


@pytest.mark.skipif(ARMHF_BOARD_MISSING is not None, reason=f"no emulated armhf board: {ARMHF_BOARD_MISSING}")
def test_seed_004_on_an_emulated_armhf_board(tmp_path):
    """The 32-bit ARM board: minrpc cross-built for arm-linux-gnueabihf under qemu-arm, a .tar linked there."""
    with LocalFarm({"armhf-qemu": 1}) as farm, farm.request("armhf-qemu") as remote:
        assert remote.info["arch"].startswith("armv7") and remote.info["target"] == "arm-linux-gnueabihf"
        with cc.build(ADD_ONE, target=remote.info["target"], name="add_one") as func:
            path = func.export_library(str(tmp_path / "lib.tar"))
        remote.upload(path)
        func = remote.load_module("lib.tar")
        dev = remote.cpu()
        x = np.random.default_rng(3).uniform(size=256).astype("float32")
        a, b = runtime.tensor(x, dev), runtime.empty((256,), "float32", dev)
        func["add_one"](a, b)
        np.testing.assert_allclose(b.numpy(), x + 1, rtol=1e-6)
        assert func.time_evaluator("add_one", dev, number=10, repeat=2)(a, b).mean > 0


def test_missing_cross_compiler_names_the_package():
    for triple in ("riscv64-linux-gnu", "s390x-linux-gnu", "powerpc64le-linux-gnu"):
        if shutil.which(f"{triple}-gcc") is None:
            break
    else:
        pytest.skip("every candidate cross compiler is installed")
    with pytest.raises(ToolchainNotFoundError, match=f"apt-get install gcc-{triple}"):
        build_minrpc(triple)
    with pytest.raises(EmulatorNotFoundError, match=f"apt-get install .*gcc-{triple}"):
        find_emulator(triple)


def test_farm_without_the_board_tools_says_what_to_install(monkeypatch, tmp_path):
    """aarch64-qemu on a machine without qemu-user and the cross compiler (a PATH without them): the farm
    refuses before starting anything, naming the packages."""
    monkeypatch.setenv("PATH", str(tmp_path))
    before = descendants(os.getpid())
    packages = packages_for("aarch64-linux-gnu")
    with pytest.raises(EmulatorNotFoundError, match=f"apt-get install {packages['qemu']} {packages['compiler']}") as info:
        LocalFarm({"local": 1, BOARD: 1})
    assert packages["libc"] in str(info.value)
    assert descendants(os.getpid()) <= before  # no tracker, no server was started


# -- with_minrpc: a program that embeds the server -------------------------------------------------
@pytest.fixture(scope="module")
def popen_program(tmp_path_factory) -> str:
    """A host program embedding minrpc and two modules' kernels (add_one, and the crashers)."""
    out = tmp_path_factory.mktemp("popen")
    with cc.build(ADD_ONE, name="add_one") as add_one, cc.build(CRASHERS, name="crashers") as crashers:
        fcompile = rpc.with_minrpc("host")
        return fcompile(str(out / "server"), add_one.objects + crashers.objects)


def test_with_minrpc_program_serves_its_kernels(popen_program):
    with rpc.PopenSession(popen_program) as remote:
        lib = remote.system_lib()
        assert {"add_one", "segfault", "quit", "fine"} <= set(lib.function_names)
        dev = remote.cpu(0)
        x = np.arange(64, dtype="float32")
        a, b = runtime.tensor(x, dev), runtime.empty((64,), "float32", dev)
        lib["add_one"](a, b)
        np.testing.assert_array_equal(b.numpy(), x + 1)
        assert lib["fine"]() == 42
        result = lib.time_evaluator("add_one", dev, number=5, repeat=2)(a, b)
        assert isinstance(result, BenchmarkResult) and len(result.results) == 2


def test_with_minrpc_through_export_library(tmp_path):
    """Module.export_library(path, fcompile=rpc.with_minrpc(...)): what a seed user writes."""
    with cc.build(ADD_ONE, name="add_one") as mod:
        path = mod.export_library(tmp_path / "prog", fcompile=rpc.with_minrpc("gcc" if shutil.which("gcc") else "cc"))
    with rpc.PopenSession(path) as remote:
        assert remote.info["arch"] == os.uname().machine
        assert "add_one" in remote.system_lib().function_names


def test_with_minrpc_kernel_crash_fails_the_call_only(popen_program):
    with rpc.PopenSession(popen_program) as remote:
        lib = remote.system_lib()
        with pytest.raises(KernelCrashedError, match=r"segfault: the kernel died of signal 11 \(SIGSEGV"):
            lib["segfault"]()
        with pytest.raises(KernelCrashedError, match=r"quit: the kernel called exit\(86\)"):
            lib["quit"]()  # _exit() from a kernel linked into the program
        assert lib["fine"]() == 42  # the same program goes on


def test_with_minrpc_kernel_exit_reports_the_child(popen_program):
    remote = rpc.PopenSession(popen_program)
    try:
        with pytest.raises(SessionCrashedError, match=r"status 86"):
            remote.system_lib()["exit_group"]()  # the system call itself: no guard catches it
        with pytest.raises(Exception):  # the session is over
            remote.ping()
    finally:
        remote.close()


@needs_board
def test_with_minrpc_for_the_board(tmp_path):
    with cc.build(ADD_ONE, target="aarch64-linux-gnu", name="add_one") as mod:
        path = mod.export_library(tmp_path / "prog", fcompile=rpc.with_minrpc(cc.cross_compiler("aarch64-linux-gnu")))
    assert elf_machine(path) == EM_AARCH64
    with rpc.PopenSession(find_emulator("aarch64").command(path)) as remote:
        assert remote.info["arch"] == "aarch64"
        dev = remote.cpu(0)
        a = runtime.tensor(np.ones(8, "float32"), dev)
        b = runtime.empty((8,), "float32", dev)
        remote.system_lib()["add_one"](a, b)
        np.testing.assert_array_equal(b.numpy(), np.full(8, 2.0))


def test_with_minrpc_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="posix_popen_server"):
        rpc.with_minrpc("gcc", server="tcp_server")
    with pytest.raises(ValueError, match="runtime"):
        rpc.with_minrpc("gcc", runtime="libfoo")
    rpc.with_minrpc("gcc", runtime="libtvm_runtime")  # TVM's values are accepted


# -- MinRPCServer ------------------------------------------------------------------------------------
def test_minrpc_server_on_the_host(host_minrpc, tmp_path, private_tmpdir):
    so = cc.create_shared(tmp_path / "add_one.so", [os.path.join(HERE, "kernels", "kernels.c")])
    with rpc.MinRPCServer(port=0, key="native") as server:
        assert server.alive and server.port > 0
        with rpc.connect("127.0.0.1", server.port, key="native") as remote:
            assert remote.info["arch"] == os.uname().machine and remote.info["key"] == "native"
            remote.upload(so)
            mod = remote.load_module("add_one.so")
            dev = remote.cpu(0)
            a, b = runtime.tensor(np.arange(4, dtype="float32"), dev), runtime.empty((4,), "float32", dev)
            mod["add_one"](a, b)
            np.testing.assert_array_equal(b.numpy(), np.arange(4) + 1)
        pid = server.pid
    assert not server.alive and not alive(pid)


def test_minrpc_server_start_up_errors_are_surfaced(host_minrpc):
    with rpc.MinRPCServer(port=0) as first:
        with pytest.raises(RuntimeError, match=r"minrpc server .*(exited|killed)(?s:.*)\S"):
            rpc.MinRPCServer(port=first.port, port_end=first.port + 1)  # the only port allowed is taken


def test_minrpc_server_that_closes_its_output_before_exiting_reports_its_status(tmp_path):
    """A server's stdout closes as it exits, a moment before its status can be collected: the error still
    says how it ended (it once said 'did not say it was listening' for a port already taken)."""
    fake = tmp_path / "minrpc"
    fake.write_text("#!/bin/sh\necho 'cannot listen on 127.0.0.1:1: Address already in use' >&2\n"
                    "exec >&- 2>&-\nsleep 0.3\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"exited with status 3(?s:.*)Address already in use"):
        rpc.MinRPCServer(binary=fake, start_timeout=30)


def test_minrpc_server_ends_with_its_owner(host_minrpc):
    """Collected, or its owner killed outright: the server goes too (no orphan left listening)."""
    import gc

    server = rpc.MinRPCServer(port=0)
    pid = server.pid
    del server
    gc.collect()
    assert wait_until(lambda: not alive(pid))
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom workbench import rpc\ns = rpc.MinRPCServer(port=0)\n"
                               "print(s.pid, flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        pid = int(read_until(owner, lambda text: text.endswith("\n"), 30))
        assert alive(pid)
        owner.kill()  # no cleanup code runs in the owner
        owner.wait()
        assert wait_until(lambda: not alive(pid)), f"minrpc {pid} outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        owner.stdout.close()


def test_farm_minrpc_key_with_a_registration_token(host_minrpc):
    with LocalFarm({"minrpc": 1}, registration_token="s3cret") as farm:  # registered: it proved the token
        with farm.request("minrpc") as remote:
            assert remote.info.get("server") == "minrpc" and remote.info["key"] == "minrpc"
    with pytest.raises(ValueError, match=r"labels=.*Python servers only.*minrpc"):
        LocalFarm({"minrpc": 1}, labels={"board": "x"})


@needs_board
def test_minrpc_server_for_aarch64_under_qemu(arm_minrpc):
    with rpc.MinRPCServer(target="aarch64", key="board") as board:
        assert board.command[0].endswith(("qemu-aarch64", "qemu-aarch64-static"))
        assert "--cc" in board.command and "aarch64-linux-gnu-gcc" in board.command
        with rpc.connect("127.0.0.1", board.port, key="board") as remote:
            assert remote.info["arch"] == "aarch64"
            assert remote.info["target"].startswith("aarch64")
            assert remote.ping()["objects"] == 0
    assert not board.alive


# -- the emulated board in a farm: seed 004 end to end ------------------------------------------------
@pytest.fixture(scope="module")
def board_farm(private_tmpdir):
    if BOARD_MISSING:
        pytest.skip(f"no emulated aarch64 board: {BOARD_MISSING}")
    with LocalFarm({"local": 1, BOARD: 1}) as farm:
        yield farm


@needs_board
def test_board_registers_with_its_triple_and_arch(board_farm):
    summary = board_farm.summary()
    assert summary["queue_info"][BOARD]["free"] == 1 and summary["queue_info"]["local"]["free"] == 1
    rows = {row["key"]: row for row in summary.server_rows()}
    assert rows[BOARD]["arch"] == "aarch64" and rows[BOARD]["target"].startswith("aarch64-")
    assert rows["local"]["arch"] == os.uname().machine


@needs_board
def test_seed_004_on_the_emulated_board(board_farm, tmp_path):
    fcompile = cc.cross_compiler("aarch64-linux-gnu", output_format="tar")
    with cc.build(ADD_ONE, target="aarch64-linux-gnu", name="add_one") as func:
        path = func.export_library(str(tmp_path / "lib.tar"), fcompile=fcompile)
    with tarfile.open(path) as tar:
        assert all(elf_machine(tar.extractfile(m).read(20)) == EM_AARCH64 for m in tar.getmembers())
    with board_farm.request(BOARD) as remote:
        assert remote.info["arch"] == "aarch64"
        remote.upload(path)
        func = remote.load_module("lib.tar")  # linked on the "device" by the aarch64 toolchain
        dev = remote.cpu()
        a = runtime.tensor(np.random.uniform(size=1024).astype("float32"), dev)
        b = runtime.tensor(np.zeros(1024, dtype="float32"), dev)
        func(a, b)
        np.testing.assert_equal(b.numpy(), a.numpy() + 1)
        time_f = func.time_evaluator(func.entry_name, dev, number=10)
        cost = time_f(a, b).mean
        assert cost > 0
        linked = remote.download_linked_module("lib.tar")
        assert elf_machine(bytes(linked[:20])) == EM_AARCH64


@needs_board
def test_rpc_run_against_the_board(board_farm):
    host, port = board_farm.tracker_addr
    with cc.build(ADD_ONE, target="aarch64-linux-gnu", name="add_one") as mod:
        x = np.arange(32, dtype="float32")
        (a, b), result = rpc_run(mod, "cpu", [x, np.zeros(32, "float32")],
                                 EvaluatorConfig(number=2, repeat=2, min_repeat_ms=0),
                                 RPCConfig(host, port, BOARD))
    np.testing.assert_array_equal(b, x + 1)
    assert len(result.results) == 2
    assert wait_until(lambda: board_farm.summary()["queue_info"][BOARD]["free"] == 1)


TVM_EXPORT = r"""
import json, os, sys
import tvm
from tvm import te
from workbench import cc, rpc

out = sys.argv[1]
A = te.placeholder((1024,), name="A")
B = te.compute((1024,), lambda i: A[i] + 1.0, name="B")
mod = tvm.IRModule.from_expr(te.create_prim_func([A, B]).with_attr("global_symbol", "add_one"))
board = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
lib = tvm.compile(mod, target=board)
lib.export_library(os.path.join(out, "board.so"), fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))
lib.export_library(os.path.join(out, "board.tar"))
errors = {}
# TVM 0.27 has no "system-lib" target option: a module is a system library through its system_lib_prefix
programs = {"syslib_prog": mod.with_attr("system_lib_prefix", ""), "plain_prog": mod}
for name, each in programs.items():
    try:
        tvm.compile(each, target={"kind": "llvm"}).export_library(os.path.join(out, name),
                                                                 fcompile=rpc.with_minrpc("host"))
    except Exception as exc:
        errors[name] = str(exc)
print(json.dumps({"tvm_version": tvm.__version__, "errors": errors}))
"""


@pytest.fixture(scope="module")
def tvm_exports(tmp_path_factory):
    if importlib.util.find_spec("tvm") is None:
        pytest.skip("apache-tvm is not installed (the `tvm` test extra: pip install -e .[test,tvm])")
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("the aarch64 cross compiler is missing: apt-get install gcc-aarch64-linux-gnu")
    out = tmp_path_factory.mktemp("tvm-board")
    report = run_export_script(TVM_EXPORT, out, "add_one for aarch64 and with_minrpc programs", TVM_EXPORT_TIMEOUT_S)
    return out, report["errors"]


@needs_board
@needs_tvm
@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", ["board.so", "board.tar"])
def test_tvm_kernel_for_aarch64_runs_on_the_board(board_farm, tvm_exports, name):
    out, _ = tvm_exports
    if name.endswith(".so"):
        assert elf_machine(out / name) == EM_AARCH64
    with board_farm.request(BOARD) as remote:
        remote.upload(str(out / name))
        mod = remote.load_module(name)
        dev = remote.cpu()
        x = np.random.default_rng(4).uniform(size=1024).astype("float32")
        a, b = runtime.tensor(x, dev), runtime.empty((1024,), "float32", dev)
        mod["add_one"](a, b)
        np.testing.assert_allclose(b.numpy(), x + 1, rtol=1e-6)


@needs_tvm
@pytest.mark.timeout(420)
@pytest.mark.parametrize("program", ["syslib_prog", "plain_prog"])
def test_tvm_kernel_in_a_with_minrpc_program(tvm_exports, program):
    """apache-tvm export_library(fcompile=rpc.with_minrpc(...)): a system library and a plain module alike."""
    out, errors = tvm_exports
    assert program not in errors, errors[program]
    with rpc.PopenSession(str(out / program)) as remote:
        lib = remote.system_lib()
        assert "add_one" in lib.function_names
        dev = remote.cpu()
        x = np.arange(1024, dtype="float32")
        a, b = runtime.tensor(x, dev), runtime.empty((1024,), "float32", dev)
        lib["add_one"](a, b)
        np.testing.assert_array_equal(b.numpy(), x + 1)


# -- python -m workbench.farm with the board ------------------------------------------------------------
def read_until(proc: subprocess.Popen, done, timeout: float) -> str:
    """What ``proc`` printed on stdout until ``done(text)`` holds, it closed stdout, or ``timeout`` passed."""
    import select

    text = ""
    deadline = time.monotonic() + timeout
    while not done(text):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
            break
        chunk = os.read(proc.stdout.fileno(), 65536).decode()
        if not chunk:
            break
        text += chunk
    return text


@needs_board
def test_farm_command_with_the_board_ends_everything_on_sigterm(arm_minrpc, host_minrpc):
    proc = subprocess.Popen([sys.executable, "-m", "workbench.farm", "--servers", "local=1", f"{BOARD}=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        rows = [re.compile(rf"(?m)^{key}\s+1\s+1\s+0\s*$") for key in (BOARD, "local")]  # total free pending
        text = read_until(proc, lambda seen: all(r.search(seen) for r in rows), 60)
        assert re.search(r"Tracker address 127\.0\.0\.1:\d+", text), text
        assert all(r.search(text) for r in rows), text
        started = descendants(proc.pid)
        assert len(started) >= 3, started  # the tracker, the Python server, qemu running minrpc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert wait_until(lambda: not any(alive(pid) for pid in started)), [p for p in started if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
