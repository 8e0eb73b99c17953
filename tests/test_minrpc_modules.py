"""minrpc's device side end to end: modules (.so, .tar of every tar dialect), their refusals, linking, registration.

A host minrpc (``rpc.MinRPCServer``: built from workbench/native with the host
compiler, started on a free loopback port) is driven through
``workbench.rpc.connect``: it loads our kernels (workbench.cc) and
apache-tvm's ``export_library`` output (a parallel loop, a workspace, both),
as ``.so`` and as ``.tar`` (tars written by Python's tarfile in its PAX, GNU
and ustar formats, gzip-compressed, and by GNU ``tar`` with its ``./``
entries), checked against numpy; it refuses every bad ``.tar`` with the error
class and text of the Python server (workbench/runtime/modules.py); it
registers with the Python tracker, with and without a registration token.
The emulated aarch64 board (qemu-user) links with the cross compiler and
refuses x86-64 objects. apache-tvm runs only in a subprocess.
"""
from __future__ import annotations

import importlib.util
import io
import os
import shutil
import struct
import subprocess
import tarfile
import textwrap

import numpy as np
import pytest

from workbench import cc, rpc, runtime
from workbench.errors import BadRequestError, PathDeniedError, RemoteError

from .conftest import session_workspaces, wait_until
from .helpers import (
    EM_AARCH64, EM_X86_64, PRINT_MAIN_REPORT, TVM_BUILD, emulated_board_missing, make_tar, run_export_script,
)

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS_C = os.path.join(HERE, "kernels", "kernels.c")
CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler to build minrpc: apt-get install gcc")


# -- the server and sessions -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minrpc(private_tmpdir):
    """A host minrpc serving key "dev" (built once and cached by workbench.native.build_minrpc)."""
    with rpc.MinRPCServer(port=0, key="dev") as server:
        yield server
    assert not server.alive


@pytest.fixture
def remote(minrpc, private_tmpdir):
    """A session on the host minrpc; afterwards no session workspace is left."""
    session = rpc.connect("127.0.0.1", minrpc.port, key="dev")
    yield session
    session.close()
    assert wait_until(lambda: not session_workspaces(private_tmpdir)), session_workspaces(private_tmpdir)


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> dict[str, bytes]:
    """Object files (as bytes) built by the host compiler: kernels, plain code, and the kinds a device refuses."""
    out = tmp_path_factory.mktemp("objects")
    sources = {
        "ok": "int ok_value(void) { return 7; }\n",
        "dup": "int ok_value(void) { return 8; }\n",
        "deplibs": '__asm__(".section .deplibs,\\"MS\\",%0x6fff4c04,1\\n.asciz \\"/etc/passwd\\"\\n.text");\n'
                   "int deplibs_value(void) { return 1; }\n",
    }
    built = {}
    for name, text in sources.items():
        (out / f"{name}.c").write_text(text)
        (path,) = cc.compile_objects([out / f"{name}.c"], out)
        built[name] = open(path, "rb").read()
    (out / "lto").mkdir()
    (lto,) = cc.compile_objects([out / "ok.c"], out / "lto", options=["-flto"])
    built["lto"] = open(lto, "rb").read()
    (out / "kernels").mkdir()
    (kernels,) = cc.compile_objects([KERNELS_C], out / "kernels")
    built["kernels"] = open(kernels, "rb").read()
    return built


def gnu_tar(path, directory, *flags: str) -> str:
    """A tar written by GNU tar of everything in ``directory``: members ``./``, ``./lib0.o``, ..."""
    subprocess.run(["tar", *flags, "-cf", str(path), "-C", str(directory), "."], check=True, timeout=60)
    return str(path)


def run_add_one(remote, mod) -> None:
    dev = remote.cpu(0)
    a = runtime.tensor(np.arange(16, dtype="float32"), dev)
    b = runtime.empty((16,), "float32", dev)
    mod["add_one"](a, b)
    np.testing.assert_array_equal(b.numpy(), np.arange(16, dtype="float32") + 1)


# -- our kernels, every tar dialect ------------------------------------------------------------------------
def test_our_kernels_as_so_and_tar(remote, tmp_path):
    so = cc.create_shared(tmp_path / "kernels.so", [KERNELS_C])
    tar = cc.create_tar(tmp_path / "kernels.tar", [KERNELS_C])
    remote.upload(so)
    remote.upload(tar)
    for name in ("kernels.so", "kernels.tar"):
        mod = remote.load_module(name)
        assert "add_one" in mod.function_names and "scale_shift" in mod.function_names
        run_add_one(remote, mod)


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed (apt-get install tar)")
@pytest.mark.parametrize("dialect", ["pax-long-name", "gnu-long-name", "ustar-prefix", "gzip",
                                     "gnu-tar", "gnu-tar-gzip", "gnu-tar-posix", "gnu-tar-v7"])
def test_every_tar_dialect_links(remote, objects, tmp_path, dialect):
    kernels = objects["kernels"]
    long_dir = "d/" + "x" * 120 + "/"
    path = tmp_path / "k.tar"
    if dialect == "pax-long-name":
        make_tar(path, [("README.txt", b"not linked"), (long_dir + "lib0.o", kernels)])
    elif dialect == "gnu-long-name":
        make_tar(path, [(long_dir + "lib0.o", kernels)], fmt=tarfile.GNU_FORMAT)
    elif dialect == "ustar-prefix":
        make_tar(path, [("p" * 90 + "/" + "q" * 50 + "/lib0.o", kernels)], fmt=tarfile.USTAR_FORMAT)
    elif dialect == "gzip":
        make_tar(path, [("lib0.o", kernels)], mode="w:gz")
    else:
        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "lib0.o").write_bytes(kernels)
        (src / "meta.json").write_bytes(b"{}")
        flags = {"gnu-tar": [], "gnu-tar-gzip": ["-z"], "gnu-tar-posix": ["--format=posix"],
                 "gnu-tar-v7": ["--format=v7"]}[dialect]
        gnu_tar(path, src, *flags)
    remote.upload(str(path))
    run_add_one(remote, remote.load_module("k.tar"))


# -- apache-tvm's export_library -------------------------------------------------------------------------
VN, WN, PR, PC = 1 << 18, 1 << 16, 16, 1024

TVM_EXPORT = TVM_BUILD + textwrap.dedent(
    f"""
    def main():
        return {{"tvm_version": tvm.__version__, "kernels": scheduled_kernels({VN}, {WN}, {PR}, {PC})}}
    """
) + PRINT_MAIN_REPORT


@pytest.fixture(scope="module")
def tvm_kernels(tmp_path_factory) -> dict[str, dict[str, str]]:
    if importlib.util.find_spec("tvm") is None:
        pytest.skip("apache-tvm is not installed (the `tvm` test extra: pip install -e .[test,tvm])")
    return run_export_script(TVM_EXPORT, tmp_path_factory.mktemp("tvm"), "TE kernels", timeout=300)["kernels"]


def _expected(name: str, inputs: list[np.ndarray]) -> np.ndarray:
    if name == "vadd":
        return inputs[0] + inputs[1]
    if name == "twostage":
        return (inputs[0] * 2)[(np.arange(WN) * 7) % WN] + 1
    return (inputs[0] * 2)[:, (np.arange(PC) * 7) % PC] + 1


@pytest.mark.parametrize("ext", ["so", "tar"])
@pytest.mark.parametrize("name", ["vadd", "twostage", "parws"])
def test_tvm_exported_kernels_run(remote, tvm_kernels, name, ext):
    """A parallel loop (__TVMBackendParallelLaunch), a workspace (__TVMBackendAllocWorkspace), both at once."""
    path = tvm_kernels[name][ext]
    if ext == "tar":
        with open(path, "rb") as f:
            assert f.read(2) == b"\x1f\x8b", "TVM's export_library writes a gzip-compressed tar (tar -czf)"
    remote.upload(path)
    mod = remote.load_module(os.path.basename(path))
    assert name in mod.function_names
    dev = remote.cpu(0)
    rng = np.random.default_rng(1)
    shapes = {"vadd": [(VN,), (VN,)], "twostage": [(WN,)], "parws": [(PR, PC)]}[name]
    inputs = [rng.standard_normal(shape).astype("float32") for shape in shapes]
    out = runtime.empty(shapes[0], "float32", dev)
    mod[name](*[runtime.tensor(x, dev) for x in inputs], out)
    np.testing.assert_allclose(out.numpy(), _expected(name, inputs), rtol=1e-6)


# -- refusals -------------------------------------------------------------------------------------------
def _link(kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo()
    info.type, info.linkname = kind, target
    return info


def _other_machine(obj: bytes) -> tuple[bytes, str]:
    data = bytearray(obj)
    other = EM_AARCH64 if struct.unpack_from("<H", data, 18)[0] != EM_AARCH64 else EM_X86_64
    struct.pack_into("<H", data, 18, other)
    return bytes(data), {EM_AARCH64: "aarch64", EM_X86_64: "x86_64"}[other]


REFUSALS = {
    # name: (members, error class, message pattern)
    "absolute": (lambda o: [("lib0.o", o["ok"]), ("/abs/x.o", o["ok"])], PathDeniedError,
                 r"the .tar member '/abs/x.o' has an absolute name; a .tar module holds regular object files"),
    "dotdot": (lambda o: [("lib0.o", o["ok"]), ("../up.o", o["ok"])], PathDeniedError,
               r"the .tar member '../up.o' has a '\.\.' in its name"),
    "symlink": (lambda o: [("lib0.o", o["ok"]), ("p.o", _link(tarfile.SYMTYPE, "/etc/passwd"))], PathDeniedError,
                r"the .tar member 'p.o' is a symbolic link to '/etc/passwd'"),
    "hardlink": (lambda o: [("lib0.o", o["ok"]), ("q.o", _link(tarfile.LNKTYPE, "lib0.o"))], PathDeniedError,
                 r"the .tar member 'q.o' is a hard link to 'lib0.o'"),
    "directory": (lambda o: [("lib0.o", o["ok"]), ("dir.o", _link(tarfile.DIRTYPE))], PathDeniedError,
                  r"the .tar member 'dir.o' is not a regular file"),
    "linker-script": (lambda o: [("lib0.o", o["ok"]), ("p.o", b"TARGET(binary)\nINPUT(/etc/passwd)\n")],
                      BadRequestError,
                      r"the .tar member 'p.o' is not an ELF object file \(it starts with 'TARGET\(binary\)': "
                      r"a linker script or other text\)"),
    "shared-object": (lambda o: [("lib0.o", o["so"])], BadRequestError,
                      r"'lib0.o' is a shared object, not a relocatable object; put the objects compiled with -c"),
    "wrong-machine": (lambda o: [("lib0.o", _other_machine(o["ok"])[0])], BadRequestError,
                      r"'lib0.o' was compiled for (aarch64|x86_64) \(64-bit, little-endian\), but this device links "
                      r".*: cross-compile for the device's target triple"),
    "deplibs": (lambda o: [("lib0.o", o["deplibs"])], BadRequestError,
                r"'lib0.o' has a \.deplibs section \(it makes lld open the files it names\)"),
    "lto": (lambda o: [("lib0.o", o["lto"])], BadRequestError,
            r"'lib0.o' (holds link-time-optimisation code .*build the objects without -flto|is not an ELF object)"),
    "truncated-elf": (lambda o: [("lib0.o", o["ok"][:30])], BadRequestError,
                      r"'lib0.o' is truncated inside its ELF header"),
    "elf-header-on-a-script": (lambda o: [("lib0.o", o["ok"][:64] + b"\nINPUT(/etc/passwd)\n")], BadRequestError,
                               r"'lib0.o' is a malformed ELF object"),
    "no-objects": (lambda o: [("README", b"hello")], RemoteError, r"bad\.tar holds no object files \(\.o\) to link"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_tar_is_refused(remote, objects, tmp_path, case):
    members, error, pattern = REFUSALS[case]
    so = dict(objects, so=open(cc.create_shared(tmp_path / "ok.so", [KERNELS_C]), "rb").read())
    remote.upload(make_tar(tmp_path / "bad.tar", members(so)))
    for call in (remote.load_module, remote.download_linked_module):
        with pytest.raises(error, match=pattern) as refused:
            call("bad.tar")
        assert type(refused.value) is error, refused.value  # e.g. not a RemoteError where BAD_REQUEST is due
        assert "wb-session" not in str(refused.value), f"the error shows a server path: {refused.value}"
    # the session goes on
    remote.upload(make_tar(tmp_path / "good.tar", [("lib0.o", objects["kernels"])]))
    run_add_one(remote, remote.load_module("good.tar"))


def test_truncated_and_oversized_archives_are_refused(remote, objects, tmp_path):
    whole = open(make_tar(tmp_path / "whole.tar", [("lib0.o", objects["kernels"])]), "rb").read()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 3])
    remote.upload(str(tmp_path / "cut.tar"))
    with pytest.raises(RemoteError, match=r"cut\.tar is not a readable tar archive: .*truncated"):
        remote.load_module("cut.tar")
    many = tmp_path / "many.tar"
    with tarfile.open(many, "w") as tar:
        for i in range(10001):
            tar.addfile(tarfile.TarInfo(f"f{i}.txt"), io.BytesIO(b""))
    remote.upload(str(many))
    with pytest.raises(BadRequestError, match=r"many\.tar has more than 10000 members"):
        remote.load_module("many.tar")


def test_link_errors_name_tar_members_not_server_paths(remote, objects, tmp_path, private_tmpdir):
    remote.upload(make_tar(tmp_path / "dup.tar", [("a.o", objects["ok"]), ("sub/b.o", objects["dup"])]))
    with pytest.raises(RemoteError, match=r"linking dup\.tar on the device failed") as err:
        remote.load_module("dup.tar")
    text = str(err.value)
    assert "ok_value" in text and "dup.tar(sub/b.o)" in text and "dup.tar(a.o)" in text, text
    assert private_tmpdir not in text and "objects.a" not in text and "wb-session" not in text, text


def test_download_linked_module_is_the_linked_library(remote, tmp_path):
    remote.upload(cc.create_tar(tmp_path / "kernels.tar", [KERNELS_C]))
    blob = bytes(remote.download_linked_module("kernels.tar"))
    assert blob[:4] == b"\x7fELF" and struct.unpack_from("<H", blob, 16)[0] == 3  # ET_DYN: a shared object
    assert b"__tvm_ffi_add_one" in blob
    remote.upload(blob, target="relinked.so")
    run_add_one(remote, remote.load_module("relinked.so"))


# -- the emulated aarch64 board ---------------------------------------------------------------------------
BOARD_MISSING = emulated_board_missing()


@pytest.mark.skipif(BOARD_MISSING is not None, reason=f"no emulated aarch64 board: {BOARD_MISSING}")
def test_board_links_with_its_cross_compiler_and_refuses_host_objects(objects, tmp_path, private_tmpdir):
    arm_tar = cc.create_tar(tmp_path / "arm.tar", [KERNELS_C], cc="aarch64-linux-gnu-gcc")
    host_tar = make_tar(tmp_path / "host.tar", [("lib0.o", objects["kernels"])])
    with rpc.MinRPCServer(target="aarch64", key="board") as board:
        with rpc.connect("127.0.0.1", board.port, key="board") as remote:
            remote.upload(arm_tar)
            run_add_one(remote, remote.load_module("arm.tar"))
            blob = bytes(remote.download_linked_module("arm.tar"))
            assert struct.unpack_from("<H", blob, 18)[0] == EM_AARCH64
            remote.upload(host_tar)
            with pytest.raises(BadRequestError, match=r"'lib0.o' was compiled for x86_64 \(64-bit, little-endian\), "
                                                      r"but this device links aarch64 \(64-bit, little-endian\)"):
                remote.load_module("host.tar")
    assert wait_until(lambda: not session_workspaces(private_tmpdir))


# -- registration with the Python tracker -----------------------------------------------------------------
@pytest.fixture
def tracker():
    trackers: list[rpc.Tracker] = []

    def start(**options) -> rpc.Tracker:
        trk = rpc.Tracker(port=0, silent=True, **options)
        trackers.append(trk)
        return trk

    yield start
    for trk in trackers:
        trk.terminate()


def _free(session, key: str) -> int:
    return session.summary()["queue_info"].get(key, {}).get("free", 0)


def test_registered_minrpc_serves_clients_in_turn(tracker, closing, tmp_path, private_tmpdir):
    trk = tracker()
    so = cc.create_shared(tmp_path / "kernels.so", [KERNELS_C])
    with rpc.MinRPCServer(port=0, key="native", tracker_addr=("127.0.0.1", trk.port)):
        summary = rpc.connect_tracker("127.0.0.1", trk.port)
        closing.append(summary)
        assert wait_until(lambda: _free(summary, "native") == 1), summary.summary()
        (info,) = [s for s in summary.summary()["server_info"] if s.get("key") == "server:native"]
        assert info["server"] == "minrpc" and info["arch"] == os.uname().machine
        for turn in range(2):  # two clients, one after the other, each handed the device by the tracker
            client = rpc.connect_tracker("127.0.0.1", trk.port)
            closing.append(client)
            remote = client.request("native", session_timeout=60)
            assert _free(summary, "native") == 0  # handed out: nobody else gets it meanwhile
            remote.upload(so)
            run_add_one(remote, remote.load_module("kernels.so"))
            remote.close()
            assert wait_until(lambda: _free(summary, "native") == 1), f"turn {turn}: not offered again"
    assert wait_until(lambda: not session_workspaces(private_tmpdir))


def test_token_tracker_takes_only_a_minrpc_that_proves_the_token(tracker, closing):
    trk = tracker(auth_token="s3cret")
    summary = rpc.connect_tracker("127.0.0.1", trk.port)
    closing.append(summary)
    with rpc.MinRPCServer(port=0, key="guarded", tracker_addr=("127.0.0.1", trk.port),
                          registration_token="") as stranger:
        assert wait_until(lambda: any("refused to register this server" in line for line in stranger.log_tail())), \
            stranger.log_tail()
        assert _free(summary, "guarded") == 0
        refusals = [line for line in stranger.log_tail() if "refused to register" in line]
        assert "registration token" in refusals[0]
    with rpc.MinRPCServer(port=0, key="guarded", tracker_addr=("127.0.0.1", trk.port),
                          registration_token="s3cret"):
        assert wait_until(lambda: _free(summary, "guarded") == 1), summary.summary()
        client = rpc.connect_tracker("127.0.0.1", trk.port)
        closing.append(client)
        with client.request("guarded", session_timeout=60) as remote:
            assert remote.ping()["objects"] == 0
