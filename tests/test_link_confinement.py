"""Linking a .tar on the device reads nothing of the host (issue 7, item 14).

A .tar member is linked only when it is a regular, relocatable ELF object for
the device's machine; the link itself takes members from an archive, so a
linker script smuggled in as ``p.o`` (``INPUT(/etc/passwd)``) is never read.
Real kernels (tests/kernels, TVM's export_library .tar) still link.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from workbench import cc, runtime
from workbench.errors import BadRequestError, PathDeniedError, RemoteError
from workbench.runtime import modules

from .helpers import make_tar

HERE = os.path.dirname(os.path.abspath(__file__))

# The exact attack of the issue, and variants that a bare gcc -shared links successfully.
LINKER_SCRIPTS = {
    "binary": b"TARGET(binary)\nINPUT(%s)\n",
    "binary-then-elf": b"TARGET(binary)\nINPUT(%s)\nTARGET(elf64-x86-64)\n",
    "group": b"GROUP(%s)\n",
}


@pytest.fixture(scope="module")
def objects(tmp_path_factory) -> dict[str, bytes]:
    """Objects and a shared object built by the host compiler, as bytes."""
    out = tmp_path_factory.mktemp("objects")
    (out / "ok.c").write_text("int ok_value(void) { return 7; }\n")
    (out / "dup.c").write_text("int ok_value(void) { return 8; }\n")
    (out / "deplibs.c").write_text(
        '__asm__(".section .deplibs,\\"MS\\",%0x6fff4c04,1\\n.asciz \\"/etc/passwd\\"\\n.text");\n'
        "int deplibs_value(void) { return 1; }\n"
    )
    built = {}
    for name in ("ok", "dup", "deplibs"):
        (path,) = cc.compile_objects([out / f"{name}.c"], out)
        built[name] = open(path, "rb").read()
    (out / "lto").mkdir()
    (lto,) = cc.compile_objects([out / "ok.c"], out / "lto", options=["-flto"])
    built["lto"] = open(lto, "rb").read()
    built["so"] = open(cc.create_shared(out / "ok.so", [out / "ok.c"]), "rb").read()
    return built


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> tuple[str, bytes]:
    """A host file outside every workspace, with a marker no object contains."""
    marker = b"WORKBENCH-HOST-SECRET-" + os.urandom(8).hex().encode()
    path = tmp_path_factory.mktemp("host") / "secret.txt"
    path.write_bytes(marker + b"\n")
    return str(path), marker


def assert_refused(remote, tar_name: str, error: type, match: str, marker: bytes | None = None) -> None:
    """Both load_module and download_linked_module refuse the tar, and no host bytes come back."""
    with pytest.raises(error, match=match) as load_err:
        remote.load_module(tar_name)
    with pytest.raises(error, match=match) as link_err:
        blob = remote.download_linked_module(tar_name)
        if marker is not None:  # only reached when the fix is gone: show what leaked
            assert marker not in blob
    for exc in (load_err.value, link_err.value):
        assert "wb-session" not in str(exc), f"the error shows a server path: {exc}"


# -- the attack -------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(LINKER_SCRIPTS))
def test_linker_script_member_is_refused(remote, objects, secret, variant, tmp_path):
    path, marker = secret
    script = LINKER_SCRIPTS[variant] % path.encode()
    remote.upload(make_tar(tmp_path / "evil.tar", {"lib0.o": objects["ok"], "p.o": script}))
    assert_refused(remote, "evil.tar", BadRequestError,
                   r"the .tar member 'p.o' is not an ELF object file .*linker script", marker)
    # the session goes on, and links a real object
    remote.upload(make_tar(tmp_path / "good.tar", {"lib0.o": objects["ok"]}))
    assert marker not in remote.download_linked_module("good.tar")
    assert remote.load_module("good.tar").function_names == []  # ok_value is not a kernel, but it linked


def test_etc_passwd_is_never_returned(remote, objects, tmp_path):
    """The exact report: ``p.o`` = ``TARGET(binary) INPUT(/etc/passwd)``."""
    if not os.path.exists("/etc/passwd"):
        pytest.skip("this machine has no /etc/passwd")
    first_line = open("/etc/passwd", "rb").readline().strip()
    remote.upload(make_tar(tmp_path / "p.tar", {"p.o": b"TARGET(binary) INPUT(/etc/passwd)\n"}))
    assert_refused(remote, "p.tar", BadRequestError, "'p.o' is not an ELF object file", first_line)
    remote.upload(make_tar(tmp_path / "q.tar", {"k.o": objects["ok"],
                                                "p.o": LINKER_SCRIPTS["binary-then-elf"] % b"/etc/passwd"}))
    assert_refused(remote, "q.tar", BadRequestError, "'p.o' is not an ELF object file", first_line)


def traced(tmp_path) -> tuple[str, str]:
    """``(compiler command, log path)``: the device's compiler run under strace, logging every file it opens."""
    if shutil.which("strace") is None:
        return modules.find_compiler(), ""
    log = str(tmp_path / "strace.log")
    return f"strace -f -qq -e trace=open,openat,creat -o {log} {modules.find_compiler()}", log


def opened_files(log: str, cwd: str) -> set[str]:
    """Files the traced processes opened successfully (relative names resolved against ``cwd``)."""
    found = set()
    with open(log) as f:
        for line in f:
            m = re.search(r'open(?:at)?\((?:AT_FDCWD, )?"([^"]*)".*\) = \d+', line) or \
                re.search(r'creat\("([^"]*)".*\) = \d+', line)
            if m:
                found.add(os.path.normpath(os.path.join(cwd, m.group(1))))
    return found


def test_the_link_itself_never_reads_a_script(objects, secret, tmp_path):
    """Second line of defence: even past the checks, the link takes members as objects or fails."""
    path, marker = secret
    work = tmp_path / "work"
    work.mkdir()
    (work / "0.o").write_bytes(objects["ok"])
    (work / "1.o").write_bytes(LINKER_SCRIPTS["binary-then-elf"] % path.encode())
    compiler, log = traced(tmp_path)
    with pytest.raises(RemoteError, match=r"objects\.a\(1\.o\).*not an object") as err:
        modules.link_objects(compiler, [str(work / "0.o"), str(work / "1.o")], str(work))
    assert str(work) not in str(err.value)
    assert not (work / "lib.so").exists() or marker not in (work / "lib.so").read_bytes()
    if log:
        assert path not in opened_files(log, str(work))


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (apt-get install strace)")
def test_the_link_opens_only_the_workspace_and_the_toolchain(objects, tmp_path):
    """Every file a successful link opens is in its work directory or part of the installed toolchain."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "0.o").write_bytes(objects["ok"])
    compiler, log = traced(tmp_path)
    modules.link_objects(compiler, [str(work / "0.o")], str(work))
    opened = opened_files(log, str(work))
    assert str(work / "objects.a") in opened
    system = ("/usr/", "/lib/", "/lib64/", "/lib32/", "/etc/ld.so.cache", "/dev/null", "/proc/")
    outside = sorted(p for p in opened if not p.startswith(str(work) + os.sep) and not p.startswith(system))
    assert not outside, f"the link opened files outside its work directory and the toolchain: {outside}"


# -- members that are not relocatable objects for this device ---------------------------
def test_shared_object_member_is_refused(remote, objects, tmp_path):
    remote.upload(make_tar(tmp_path / "so.tar", {"lib0.o": objects["so"]}))
    assert_refused(remote, "so.tar", BadRequestError,
                   r"'lib0.o' is a shared object, not a relocatable object; put the objects compiled with -c")


def test_object_for_another_machine_is_refused(remote, objects, tmp_path):
    other = 183 if modules.MACHINES.get(struct.unpack_from("<H", objects["ok"], 18)[0]) != "aarch64" else 62
    data = bytearray(objects["ok"])
    order = "<" if data[5] == 1 else ">"
    struct.pack_into(order + "H", data, 18, other)
    remote.upload(make_tar(tmp_path / "arm.tar", {"lib0.o": bytes(data)}))
    assert_refused(remote, "arm.tar", BadRequestError,
                   rf"'lib0.o' was compiled for {modules.MACHINES[other]} .*but this device links "
                   r".*cross-compile for the device's target triple")


def test_elf_header_in_front_of_a_script_is_refused(remote, objects, secret, tmp_path):
    """A valid-looking ELF identification followed by a linker script: the section table does not fit."""
    path, marker = secret
    polyglot = objects["ok"][:64] + b"\n" + LINKER_SCRIPTS["binary-then-elf"] % path.encode()
    remote.upload(make_tar(tmp_path / "poly.tar", {"lib0.o": polyglot}))
    assert_refused(remote, "poly.tar", BadRequestError, r"'lib0.o' is a malformed ELF object", marker)
    truncated = objects["ok"][:30]
    remote.upload(make_tar(tmp_path / "short.tar", {"lib0.o": truncated}))
    assert_refused(remote, "short.tar", BadRequestError, r"'lib0.o' is truncated inside its ELF header")


def test_deplibs_section_is_refused(remote, objects, tmp_path):
    """lld opens the files an object's .deplibs names (GNU ld ignores it); no object may carry one."""
    remote.upload(make_tar(tmp_path / "dep.tar", {"lib0.o": objects["deplibs"]}))
    assert_refused(remote, "dep.tar", BadRequestError, r"'lib0.o' has a \.deplibs section")


def test_lto_object_is_refused(remote, objects, tmp_path):
    """LTO code would run the compiler's plugin on client bytes at link time."""
    remote.upload(make_tar(tmp_path / "lto.tar", {"lib0.o": objects["lto"]}))
    assert_refused(remote, "lto.tar", BadRequestError,
                   r"'lib0.o' (holds link-time-optimisation code .*without -flto|is not an ELF object file)")


# -- members that are not plain files inside the workspace ------------------------------
def _link_info(kind: bytes, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo()
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "name, entry, problem",
    [
        ("p.o", _link_info(tarfile.SYMTYPE, "/etc/passwd"), r"is a symbolic link to '/etc/passwd'"),
        ("q.o", _link_info(tarfile.LNKTYPE, "lib0.o"), r"is a hard link to 'lib0.o'"),
        ("../up.o", None, r"has a '\.\.' in its name"),
        ("/abs/x.o", None, r"has an absolute name"),
        ("dir.o", "dir", r"is not a regular file"),
    ],
)
def test_links_and_names_leaving_the_tar_are_refused(remote, objects, tmp_path, name, entry, problem):
    if entry is None:
        entry = objects["ok"]
    elif entry == "dir":
        entry = tarfile.TarInfo()
        entry.type = tarfile.DIRTYPE
    remote.upload(make_tar(tmp_path / "odd.tar", {"lib0.o": objects["ok"], name: entry}))
    assert_refused(remote, "odd.tar", PathDeniedError,
                   rf"the .tar member '{name}' {problem}; a .tar module holds regular object files")


# -- what still links, and how failures read -----------------------------------------
def test_real_kernels_link_from_subdirectories_with_extra_files(remote, kernels, tmp_path):
    with tarfile.open(kernels["tar"]) as tar:
        (member,) = [m for m in tar.getmembers() if m.name.endswith(".o")]
        kernel_obj = tar.extractfile(member).read()
    tar_path = make_tar(tmp_path / "nested.tar", {
        "README.txt": b"not linked",
        "objs/kernels.o": kernel_obj,
        "meta/info.json": b"{}",
    })
    remote.upload(tar_path)
    mod = remote.load_module("nested.tar")
    dev = remote.cpu()
    a = runtime.tensor(np.arange(8, dtype="float32"), dev)
    b = runtime.empty((8,), "float32", dev)
    mod["add_one"](a, b)
    np.testing.assert_array_equal(b.numpy(), np.arange(8, dtype="float32") + 1)
    assert remote.download_linked_module("nested.tar")[:4] == b"\x7fELF"


def test_link_errors_name_members_not_server_paths(remote, objects, tmp_path, private_tmpdir):
    remote.upload(make_tar(tmp_path / "dup.tar", {"a.o": objects["ok"], "sub/b.o": objects["dup"]}))
    with pytest.raises(RemoteError, match=r"linking dup\.tar on the device failed") as err:
        remote.load_module("dup.tar")
    text = str(err.value)
    assert "ok_value" in text and "dup.tar(sub/b.o)" in text and "dup.tar(a.o)" in text, text
    assert private_tmpdir not in text and "objects.a" not in text, text


@pytest.mark.skipif(importlib.util.find_spec("tvm") is None, reason="apache-tvm is not installed (the tvm extra)")
@pytest.mark.timeout(300)
def test_tvm_exported_objects_pass_the_checks(tmp_path):
    """TVM's export_library .tar (LLVM objects with debug info) is a relocatable object of this machine."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, "tvm_export_kernels.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    for kernel in report["kernels"]:
        out = modules.link_tar(kernel["files"]["tar"], str(tmp_path / f"{kernel['name']}.so"))
        assert kernel["symbol"] in subprocess.run(["nm", "-D", out], capture_output=True, text=True).stdout
