"""Cross-compilation: target descriptions, cross_compiler fcompiles, NDK, and apache-tvm's export_library.

The aarch64 tests need Debian's gcc-aarch64-linux-gnu (.ci/run installs it) and
skip, naming the package, where it is missing. Results are checked by the ELF
machine field of what was built, not by the compiler's word.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from workbench import cc
from workbench.cc import TargetSpec, ToolchainNotFoundError, parse_target
from workbench.cc.targets import normalize_triple
from workbench.native.qemu import qemu_key_triple

from .helpers import EM_AARCH64, elf_machine

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS_C = os.path.join(HERE, "kernels", "kernels.c")
ARM64_GCC = "aarch64-linux-gnu-gcc"
needs_aarch64 = pytest.mark.skipif(
    shutil.which(ARM64_GCC) is None,
    reason="the aarch64 cross compiler is missing: apt-get install gcc-aarch64-linux-gnu",
)




def tar_machines(path) -> list[int]:
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        assert members and all(m.name.endswith(".o") for m in members), [m.name for m in members]
        return [elf_machine(tar.extractfile(m).read(64)) for m in members]


HOST = parse_target("host").triple

FORMS = [
    # (target as a user writes it, triple, compiler, flags)
    ("aarch64-linux-gnu", "aarch64-linux-gnu", ARM64_GCC, ()),
    ("aarch64-unknown-linux-gnu", "aarch64-linux-gnu", ARM64_GCC, ()),
    ("llvm -mtriple=aarch64-linux-gnu", "aarch64-linux-gnu", ARM64_GCC, ()),
    ("llvm -mtriple=armv7l-linux-gnueabihf -mcpu=cortex-a53 -mattr=+neon", "arm-linux-gnueabihf",
     "arm-linux-gnueabihf-gcc", ("-mcpu=cortex-a53", "-mfpu=neon")),
    ("llvm -mtriple=armv7l-linux-gnueabihf", "arm-linux-gnueabihf", "arm-linux-gnueabihf-gcc", ("-march=armv7-a",)),
    ("llvm -device=arm_cpu -model=rasp3b -mtriple=armv7l-linux-gnueabihf -mattr=+neon", "arm-linux-gnueabihf",
     "arm-linux-gnueabihf-gcc", ("-march=armv7-a", "-mfpu=neon")),
    ("llvm -mtriple=armv6l-linux-gnueabihf", "arm-linux-gnueabihf", "arm-linux-gnueabihf-gcc",
     ("-march=armv6", "-marm")),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]},
     "aarch64-linux-gnu", ARM64_GCC, ("-mcpu=cortex-a72",)),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+v8.2a", "+dotprod"]},
     "aarch64-linux-gnu", ARM64_GCC, ("-march=armv8.2-a+dotprod",)),
    ({"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf", "mcpu": "cortex-a7", "mattr": ["+neon", "+vfp4"]},
     "arm-linux-gnueabihf", "arm-linux-gnueabihf-gcc", ("-mcpu=cortex-a7", "-mfpu=neon-vfpv4")),
    ('{"kind": "llvm", "mtriple": "riscv64-unknown-linux-gnu"}', "riscv64-linux-gnu", "riscv64-linux-gnu-gcc", ()),
    ({"kind": "opencl", "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}, "aarch64-linux-gnu", ARM64_GCC,
     ()),
    ("arm64-linux-gnu", "aarch64-linux-gnu", ARM64_GCC, ()),
    # x86-32 in any spelling: Debian's i686 cross gcc
    ("llvm -mtriple=i386-pc-linux-gnu", "i686-linux-gnu", "i686-linux-gnu-gcc", ()),
    ("llvm -mtriple=i586-unknown-linux-gnu", "i686-linux-gnu", "i686-linux-gnu-gcc", ()),
    ("i686-linux-gnu", "i686-linux-gnu", "i686-linux-gnu-gcc", ()),
    ("x86-linux-gnu", "i686-linux-gnu", "i686-linux-gnu-gcc", ()),
]


@pytest.mark.parametrize("target,triple,compiler,flags", FORMS, ids=lambda v: json.dumps(v) if isinstance(v, dict)
                         else str(v))
def test_target_forms_map_to_cross_compiler_and_flags(target, triple, compiler, flags):
    spec = parse_target(target)
    assert (spec.triple, spec.compiler, spec.flags, spec.is_host) == (triple, compiler, flags, False)
    assert spec.package == "gcc-" + triple


@pytest.mark.parametrize("target", [None, "host", "llvm", "c", {"kind": "llvm"}, "llvm -mtriple=" + HOST,
                                    '{"kind": "llvm"}'])
def test_host_forms(target):
    spec = parse_target(target)
    assert spec.is_host and spec.compiler is None and spec.package is None and spec.flags == ()
    assert cc.compiler_for(target) is None


def test_host_cpu_flags_kept():
    spec = parse_target("llvm -mcpu=x86-64 -mattr=+sse2") if HOST.startswith("x86_64") else None
    if spec is None:
        pytest.skip("x86-specific flags")
    assert spec.is_host and spec.flags == ("-march=x86-64", "-msse2")
    assert cc.compiler_for("llvm -mcpu=x86-64 -mattr=+sse2").endswith("-march=x86-64 -msse2")


@pytest.mark.parametrize("bad", ["not a target at all", "llvm -mtriple=bad triple!", "x86"])
def test_unreadable_targets_say_what_to_write(bad):
    with pytest.raises(ValueError, match="triple"):
        parse_target(bad)


# every spelling of a target the code and the docs use (farm keys, build_minrpc, MinRPCServer, cross_compiler,
# seed 004) -> the Debian triple that names its cross packages
TRIPLES = [
    ("aarch64", "aarch64-linux-gnu"), ("arm64", "aarch64-linux-gnu"), (" ARM64 ", "aarch64-linux-gnu"),
    ("aarch64-linux-gnu", "aarch64-linux-gnu"), ("aarch64-unknown-linux-gnu", "aarch64-linux-gnu"),
    ("arm64-linux-gnu", "aarch64-linux-gnu"), ("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72", "aarch64-linux-gnu"),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "aarch64-linux-gnu"),
    ({"kind": "llvm", "mtriple": "arm64"}, "aarch64-linux-gnu"), ("llvm -mtriple=aarch64", "aarch64-linux-gnu"),
    ("armhf", "arm-linux-gnueabihf"), ("arm", "arm-linux-gnueabihf"), ("armv7", "arm-linux-gnueabihf"),
    ("armv7l", "arm-linux-gnueabihf"), ("arm-linux-gnueabihf", "arm-linux-gnueabihf"),
    ("armv7l-linux-gnueabihf", "arm-linux-gnueabihf"), ("armv6l-linux-gnueabihf", "arm-linux-gnueabihf"),
    ("arm-linux-gnueabi", "arm-linux-gnueabi"),
    ("llvm -mtriple=armv7l-linux-gnueabihf -mcpu=cortex-a53 -mattr=+neon", "arm-linux-gnueabihf"),
    ("riscv64", "riscv64-linux-gnu"), ("riscv64-unknown-linux-gnu", "riscv64-linux-gnu"),
    ("ppc64le", "powerpc64le-linux-gnu"), ("ppc64el", "powerpc64le-linux-gnu"),
    ("ppc64le-linux-gnu", "powerpc64le-linux-gnu"), ("s390x", "s390x-linux-gnu"),
    ("x86_64-linux-gnu", "x86_64-linux-gnu"), ("x86_64-pc-linux-gnu", "x86_64-linux-gnu"),
    ("amd64-linux-gnu", "x86_64-linux-gnu"), ("i386-linux-gnu", "i686-linux-gnu"),
    ("aarch64-linux-android", "aarch64-linux-android"), ("arm64-linux-android", "aarch64-linux-android"),
]


@pytest.mark.parametrize("target,triple", TRIPLES, ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_one_normaliser_for_targets_boards_and_farm_keys(target, triple):
    assert normalize_triple(target) == triple
    assert normalize_triple(triple) == triple  # its answers are fixed points
    if isinstance(target, str) and " " not in target.strip():
        assert qemu_key_triple(target.strip() + "-qemu") == triple  # a farm key names the same board


@pytest.mark.parametrize("target", ["host", "HOST", "llvm", "c", None, {"kind": "llvm"}, "llvm -mcpu=native"])
def test_normaliser_host_forms_are_this_machines_triple(target):
    assert normalize_triple(target) == normalize_triple(cc.target_triple()) == HOST
    assert "-pc-" not in HOST and "-unknown-" not in HOST


@pytest.mark.parametrize("bad", ["x86_64", "amd64", "x86", "i686", "not a target", "llvm -mtriple=bad!"])
def test_normaliser_refuses_what_is_no_target(bad):
    with pytest.raises(ValueError, match="triple"):
        normalize_triple(bad)
    if " " not in bad:
        with pytest.raises(ValueError, match=f"farm key '{bad}-qemu'"):
            qemu_key_triple(bad + "-qemu")


def test_target_spec_is_public_and_typed():
    spec = parse_target("aarch64-linux-gnu")
    assert isinstance(spec, TargetSpec)
    assert spec == TargetSpec("aarch64-linux-gnu", ARM64_GCC, (), False, "gcc-aarch64-linux-gnu")


@needs_aarch64
def test_create_shared_and_tar_for_aarch64(tmp_path):
    so = cc.create_shared(tmp_path / "k.so", [KERNELS_C], cc=ARM64_GCC)
    assert elf_machine(so) == EM_AARCH64
    tar = cc.create_tar(tmp_path / "k.tar", [KERNELS_C], cc=ARM64_GCC)
    assert tar_machines(tar) == [EM_AARCH64]
    # objects in, too: link the tar's object into a shared object
    (obj,) = cc.compile_objects([KERNELS_C], tmp_path, cc=ARM64_GCC)
    assert elf_machine(cc.create_shared(tmp_path / "from_obj.so", obj, cc=ARM64_GCC)) == EM_AARCH64


@needs_aarch64
@pytest.mark.parametrize("how", [ARM64_GCC, "aarch64-linux-gnu", "llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a53",
                                 {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}])
def test_cross_compiler_fcompile_formats(tmp_path, how):
    so_f = cc.cross_compiler(how)
    assert so_f.output_format == "so" and so_f.get_target_triple().startswith("aarch64")
    assert elf_machine(so_f(str(tmp_path / "k.so"), [KERNELS_C])) == EM_AARCH64
    tar_f = cc.cross_compiler(how, output_format="tar")
    assert tar_f.output_format == "tar"
    out = tar_f(str(tmp_path / "k_lib"), [KERNELS_C])
    assert tar_machines(out) == [EM_AARCH64]
    # a .tar output name is a tar whatever the format
    assert tar_machines(so_f(str(tmp_path / "named.tar"), [KERNELS_C])) == [EM_AARCH64]


@needs_aarch64
def test_target_flags_reach_the_compiler(tmp_path):
    fcompile = cc.cross_compiler("llvm -mtriple=aarch64-linux-gnu -mcpu=no-such-cpu")
    with pytest.raises(RuntimeError, match="no-such-cpu"):
        fcompile(str(tmp_path / "k.so"), [KERNELS_C])


@needs_aarch64
def test_fcompile_options_do_not_pile_up(tmp_path):
    src = tmp_path / "opts.c"
    src.write_text("#ifndef WB_BASE\n#error base option missing\n#endif\n"
                   "#ifdef WB_FIRST\n#error an earlier call's option leaked\n#endif\nint f(void) { return 1; }\n")
    fcompile = cc.cross_compiler("aarch64-linux-gnu", options=["-DWB_BASE"])
    with pytest.raises(RuntimeError, match="leaked"):
        fcompile(str(tmp_path / "a.so"), [str(src)], options=["-DWB_FIRST"])
    assert elf_machine(fcompile(str(tmp_path / "b.so"), [str(src)])) == EM_AARCH64


def test_cross_compiler_for_host_and_callables(tmp_path):
    host = cc.cross_compiler("host")
    with open(sys.executable, "rb") as f:
        host_machine = elf_machine(f.read(64))
    assert elf_machine(host(str(tmp_path / "k.so"), [KERNELS_C])) == host_machine
    wrapped = cc.cross_compiler(cc.create_tar)
    assert wrapped.output_format == "tar"
    assert tar_machines(wrapped(str(tmp_path / "k.tar"), [KERNELS_C])) == [host_machine]
    with pytest.raises(ValueError, match="output_format"):
        cc.cross_compiler("host", output_format="zip")


@needs_aarch64
def test_build_source_for_a_tvm_target(tmp_path):
    assert cc.compiler_for("llvm -mtriple=aarch64-linux-gnu -mcpu=cortex-a72") == f"{ARM64_GCC} -mcpu=cortex-a72"
    with open(KERNELS_C) as f:
        source = f.read()
    out = cc.build_source(source, tmp_path, name="k", target={"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    assert elf_machine(out) == EM_AARCH64


def _missing_cross_triple() -> str:
    for triple in ("riscv64-linux-gnu", "sparc64-linux-gnu", "s390x-linux-gnu", "powerpc64le-linux-gnu"):
        if shutil.which(f"{triple}-gcc") is None:
            return triple
    pytest.skip("every candidate cross compiler is installed")


def test_missing_cross_compiler_names_the_package(tmp_path):
    triple = _missing_cross_triple()
    for target in (triple, f"llvm -mtriple={triple}", {"kind": "llvm", "mtriple": triple}):
        with pytest.raises(ToolchainNotFoundError, match=f"apt-get install gcc-{triple}"):
            cc.cross_compiler(target)
    with pytest.raises(ToolchainNotFoundError, match=f"apt-get install gcc-{triple}"):
        cc.compiler_for(triple)
    with pytest.raises(ToolchainNotFoundError, match=f"gcc-{triple}"):
        cc.build_source("int f(void) { return 0; }", tmp_path, target=triple)
    assert not list(tmp_path.glob("*.so"))


def test_ndk_without_a_compiler_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv("WORKBENCH_NDK_CC", raising=False)
    monkeypatch.delenv("TVM_NDK_CC", raising=False)
    for build in (lambda: cc.cross_compiler("ndk"),
                  lambda: cc.create_ndk_shared(str(tmp_path / "k.so"), [KERNELS_C]),
                  lambda: cc.cross_compiler("aarch64-linux-android"),
                  lambda: cc.cross_compiler({"kind": "llvm", "mtriple": "aarch64-linux-android"})):
        with pytest.raises(ToolchainNotFoundError, match="WORKBENCH_NDK_CC"):
            build()
    monkeypatch.setenv("TVM_NDK_CC", str(tmp_path / "no-such-clang"))
    with pytest.raises(ToolchainNotFoundError, match="TVM_NDK_CC"):
        cc.cross_compiler("ndk")
    assert not (tmp_path / "k.so").exists()


@needs_aarch64
def test_ndk_compiler_from_the_environment(monkeypatch, tmp_path):
    # the aarch64 gcc stands in for the NDK's clang: what matters is that the variable's compiler builds
    monkeypatch.setenv("TVM_NDK_CC", str(tmp_path / "no-such-clang"))
    monkeypatch.setenv("WORKBENCH_NDK_CC", ARM64_GCC)  # ours wins over TVM's
    assert elf_machine(cc.create_ndk_shared(str(tmp_path / "a.so"), [KERNELS_C])) == EM_AARCH64
    fcompile = cc.cross_compiler("ndk")
    assert fcompile.output_format == "so" and fcompile.get_target_triple() == "aarch64-linux-gnu"
    assert elf_machine(fcompile(str(tmp_path / "b.so"), [KERNELS_C])) == EM_AARCH64
    monkeypatch.delenv("WORKBENCH_NDK_CC")
    monkeypatch.setenv("TVM_NDK_CC", ARM64_GCC)
    assert elf_machine(cc.cross_compiler("aarch64-linux-android")(str(tmp_path / "c.so"), [KERNELS_C])) \
        == EM_AARCH64


TVM_EXPORT = r"""
import json, sys
import tvm
from tvm import te
from workbench import cc

out = sys.argv[1]
A = te.placeholder((1024,), name="A")
B = te.compute((1024,), lambda i: A[i] + 1.0, name="B")
mod = tvm.IRModule.from_expr(te.create_prim_func([A, B]).with_attr("global_symbol", "add_one"))
target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
lib = tvm.compile(mod, target=target)
lib.export_library(out + "/add_one.so", fcompile=cc.cross_compiler(target))
lib.export_library(out + "/add_one.tar", fcompile=cc.cross_compiler("aarch64-linux-gnu", output_format="tar"))
print(json.dumps({"ok": True}))
"""


@needs_aarch64
@pytest.mark.skipif(importlib.util.find_spec("tvm") is None,
                    reason="apache-tvm is not installed (the `tvm` test extra: pip install -e .[test,tvm])")
def test_tvm_export_library_with_our_cross_compiler(tmp_path):
    # in a subprocess, as the other TVM tests: the test process stays free of TVM
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", TVM_EXPORT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    so = tmp_path / "add_one.so"
    assert elf_machine(so) == EM_AARCH64
    assert b"__tvm_ffi_add_one" in so.read_bytes()
    assert tar_machines(tmp_path / "add_one.tar") == [EM_AARCH64]
