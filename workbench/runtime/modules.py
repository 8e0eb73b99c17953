"""Loading kernel modules on the serving side: ``.so`` as is, ``.tar`` linked here first.

A ``.tar`` holds object files (``export_library("lib.tar")`` in TVM, or
``workbench.cc.create_tar``); the device links them with its own compiler into
a shared object, as seed 004 does on a Raspberry Pi.

Linking runs the device's toolchain on bytes a client sent, so it is confined:

* only regular ``.o``/``.obj`` members with plain relative names are taken
  (symlinks, hard links, devices, sparse files, absolute and ``..`` names are
  refused);
* every member must be a relocatable ELF object for the machine the device's
  compiler produces (checked from the header and section table), with no
  section that makes a linker open other files (LLVM ``.deplibs`` and linker
  options) and no LTO code (which would run the compiler's LTO plugin);
* the objects are linked from one archive the server writes itself, with
  ``--whole-archive``: a linker never reads an archive member as a linker
  script, so even a file that slipped past the checks cannot make the link
  read ``/etc/passwd`` (``INPUT(...)``/``GROUP(...)``);
* the command has no client-controlled argument (no ``-L``/``-T``/``@file``,
  members are renamed ``0.o``, ``1.o``, ...), runs in its own directory inside
  the session workspace (its temporary files too), and reads nothing else but
  the toolchain's own start files and libraries;
* the archive is read as a stream (plain, gzip, bzip2 or xz), never whole: its
  uncompressed bytes count against what the session's workspace quota has left
  (each member's size is checked at its header, before its data is read, and the
  count stops the decompression as soon as it is over), and it may expand to
  4 GiB at most.

    >>> link_tar("lib.tar", "lib.so")               # doctest: +SKIP
    'lib.so'
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import posixpath
import re
import shutil
import struct
import subprocess
import tarfile
import zlib
from typing import TYPE_CHECKING, BinaryIO, Callable, NamedTuple

from ..errors import BadRequestError, PathDeniedError, RemoteError, RPCError, UnsupportedError
from .ffi import NativeLibrary
from .quota import format_size
from .tvm_bridge import TVMModule, library_modules, load_with_tvm, tvm_requirement

if TYPE_CHECKING:
    from .workspace import Workspace

SHARED_SUFFIXES = (".so", ".dylib", ".dll")
OPENCL_SUFFIX = ".cl"
OBJECT_SUFFIXES = (".o", ".obj")
LINK_TIMEOUT_S = 300
PROBE_TIMEOUT_S = 60
TAR_MAX_BYTES = 4 << 30  # what an archive may expand to, whatever the quota (minrpc's tar.c: the same)
COPY_CHUNK = 1 << 16

# ELF constants (System V gABI; LLVM's extensions from llvm/BinaryFormat/ELF.h)
ET_NAMES = {0: "an ELF file of no type", 1: "a relocatable object", 2: "an executable",
            3: "a shared object", 4: "a core dump"}
ET_REL = 1
SHT_NOBITS = 8
SHT_LLVM_LINKER_OPTIONS = 0x6FFF4C01
SHT_LLVM_DEPENDENT_LIBRARIES = 0x6FFF4C04
SHN_XINDEX = 0xFFFF
MACHINES = {3: "i386", 8: "mips", 20: "ppc", 21: "ppc64", 22: "s390", 40: "arm", 62: "x86_64",
            183: "aarch64", 243: "riscv", 258: "loongarch"}
# sections that make a linker do more than place bytes: open other files, or run the LTO plugin
FORBIDDEN_SECTIONS = {
    SHT_LLVM_DEPENDENT_LIBRARIES: "a .deplibs section (it makes lld open the files it names)",
    SHT_LLVM_LINKER_OPTIONS: "a .linker-options section (options for the linker)",
}
LTO_SECTION_PREFIXES = (b".gnu.lto_", b".llvm.lto")
_ARCHIVE_MEMBER = re.compile(r"(?:\./)?objects\.a\((\d+)\.o\)")


class ElfKind(NamedTuple):
    """What a linker cares about in an ELF header: word size, byte order, machine."""

    elf_class: int  # 1 = 32-bit, 2 = 64-bit
    data: int  # 1 = little-endian, 2 = big-endian
    machine: int  # e_machine

    def describe(self) -> str:
        bits = {1: "32-bit", 2: "64-bit"}.get(self.elf_class, f"class {self.elf_class}")
        order = {1: "little-endian", 2: "big-endian"}.get(self.data, f"data {self.data}")
        return f"{MACHINES.get(self.machine, f'ELF machine {self.machine}')} ({bits}, {order})"


def find_compiler() -> str:
    """The compiler this device links with: $WORKBENCH_CC, $CC, or cc/gcc/clang on PATH."""
    for name in (os.environ.get("WORKBENCH_CC"), os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name
    raise UnsupportedError(
        "this device has no C compiler to link a .tar module: install gcc on the device, "
        "or cross-compile and upload a .so instead"
    )


# -- the ELF check ------------------------------------------------------------------
def _read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def elf_kind(f: BinaryIO, size: int, name: str) -> tuple[ElfKind, int]:
    """``(ElfKind, e_type)`` of the ELF file ``f``, or BadRequestError if it is not a well-formed ELF file.

    Checks the identification bytes, and that the section header table and
    every section with contents lie inside the file.
    """
    ident = _read_at(f, 0, 16)
    if ident[:4] != b"\x7fELF":
        head = ident.split(b"\n")[0].decode("latin-1")
        what = "a linker script or other text" if head.isprintable() and head.strip() else "not an ELF file"
        raise BadRequestError(
            f"the .tar member {name!r} is not an ELF object file (it starts with {head!r}: {what}); "
            "a .tar module holds relocatable objects compiled with -c, e.g. by workbench.cc.create_tar "
            "or TVM's export_library"
        )
    elf_class, data, version = ident[4], ident[5], ident[6]
    if elf_class not in (1, 2) or data not in (1, 2) or version != 1:
        raise BadRequestError(f"the .tar member {name!r} has a malformed ELF header (class {elf_class}, "
                              f"data {data}, version {version}); rebuild it with the device's compiler")
    order = "<" if data == 1 else ">"
    if elf_class == 2:
        fmt, ehsize, shentsize_expected = order + "HHIQQQIHHHHHH", 64, 64
    else:
        fmt, ehsize, shentsize_expected = order + "HHIIIIIHHHHHH", 52, 40
    header = _read_at(f, 16, ehsize - 16)
    if len(header) != ehsize - 16:
        raise BadRequestError(f"the .tar member {name!r} is truncated inside its ELF header")
    (e_type, machine, _ver, _entry, _phoff, shoff, _flags, e_ehsize, _phentsize, _phnum,
     shentsize, shnum, shstrndx) = struct.unpack(fmt, header)
    kind = ElfKind(elf_class, data, machine)
    if e_type != ET_REL:
        return kind, e_type
    bad = f"the .tar member {name!r} is a malformed ELF object"
    if e_ehsize != ehsize or shentsize != shentsize_expected or not shoff:
        raise BadRequestError(f"{bad} (header size {e_ehsize}, section entry size {shentsize}, "
                              f"section table at {shoff}); rebuild it with the device's compiler")
    sh_fmt = order + ("IIQQQQIIQQ" if elf_class == 2 else "IIIIIIIIII")
    first = _read_at(f, shoff, shentsize)
    if len(first) != shentsize:
        raise BadRequestError(f"{bad}: its section table lies past the end of the file")
    if shnum == 0:  # extended numbering: the count is in section 0
        shnum = struct.unpack(sh_fmt, first)[5]
    if shstrndx == SHN_XINDEX:
        shstrndx = struct.unpack(sh_fmt, first)[6]
    if not 0 < shnum <= (size - shoff) // shentsize or shstrndx >= shnum:
        raise BadRequestError(f"{bad}: {shnum} sections (names in section {shstrndx}) do not fit in "
                              f"its {size} bytes")
    table = _read_at(f, shoff, shnum * shentsize)
    sections = [struct.unpack_from(sh_fmt, table, i * shentsize) for i in range(shnum)]
    for index, (_n, sh_type, _fl, _addr, offset, sh_size, *_rest) in enumerate(sections):
        if sh_type != SHT_NOBITS and index and offset + sh_size > size:
            raise BadRequestError(f"{bad}: section {index} runs past the end of the file")
    names = _read_at(f, sections[shstrndx][4], sections[shstrndx][5])
    for name_off, sh_type, *_rest in sections[1:]:
        end = names.find(b"\0", name_off)
        section = names[name_off:end if end >= 0 else len(names)]
        if sh_type in FORBIDDEN_SECTIONS:
            raise BadRequestError(f"the .tar member {name!r} has {FORBIDDEN_SECTIONS[sh_type]}, "
                                  "which this device does not link; build the object without it")
        if section.startswith(LTO_SECTION_PREFIXES):
            raise BadRequestError(
                f"the .tar member {name!r} holds link-time-optimisation code "
                f"({section.decode('latin-1')}), which this device does not compile; "
                "build the objects without -flto"
            )
    return kind, e_type


_toolchain_kinds: dict[str, ElfKind] = {}


def toolchain_kind(cc: str, scratch: str) -> ElfKind:
    """The ELF kind of the objects ``cc`` produces (it compiles an empty probe in ``scratch`` once)."""
    if cc in _toolchain_kinds:
        return _toolchain_kinds[cc]
    src, obj = os.path.join(scratch, "probe.c"), os.path.join(scratch, "probe.o")
    with open(src, "w") as f:
        f.write("int workbench_probe;\n")
    try:
        proc = subprocess.run(cc.split() + ["-c", "-fPIC", "-o", obj, src], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RemoteError(f"the device's compiler ({cc}) took over {PROBE_TIMEOUT_S} s to compile "
                          "an empty file") from None
    if proc.returncode != 0:
        raise RemoteError(f"the device's compiler ({cc}) cannot compile an empty file, so it cannot link "
                          f".tar modules; fix the toolchain or upload a .so:\n{proc.stderr.strip()}")
    try:
        with open(obj, "rb") as f:
            kind, _ = elf_kind(f, os.fstat(f.fileno()).st_size, "probe.o")
    except BadRequestError:
        raise UnsupportedError(
            f"the device's compiler ({cc}) does not produce ELF objects; .tar modules are linked on "
            "ELF (Linux) devices only: upload a shared object instead"
        ) from None
    finally:
        for path in (src, obj):
            if os.path.exists(path):
                os.unlink(path)
    _toolchain_kinds[cc] = kind
    return kind


def check_object(path: str, name: str, expected: ElfKind) -> None:
    """Raise BadRequestError unless ``path`` is a relocatable ELF object a linker for ``expected`` takes."""
    with open(path, "rb") as f:
        kind, e_type = elf_kind(f, os.fstat(f.fileno()).st_size, name)
    if e_type != ET_REL:
        raise BadRequestError(
            f"the .tar member {name!r} is {ET_NAMES.get(e_type, f'an ELF file of type {e_type}')}, not a "
            "relocatable object; put the objects compiled with -c in the .tar (or upload a .so as is)"
        )
    if kind != expected:
        raise BadRequestError(
            f"the .tar member {name!r} was compiled for {kind.describe()}, but this device links "
            f"{expected.describe()}: cross-compile for the device's target triple"
        )


# -- extraction and linking ---------------------------------------------------------
def _member_name_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name.replace("\\", "/")
    if name.startswith("/") or posixpath.isabs(name):
        return "has an absolute name"
    if ".." in name.split("/"):
        return "has a '..' in its name"
    if member.issym() or member.islnk():
        return f"is a {'symbolic' if member.issym() else 'hard'} link to {member.linkname!r}"
    if member.issparse():
        return "is a sparse file"
    if not member.isfile():
        return "is not a regular file"
    return None


class _Expansion(io.RawIOBase):
    """The uncompressed bytes of an archive, counted: over ``limit`` the next read raises ``over()``.

    Reads ask the decompressor for no more than one byte past the limit, so a bomb costs no more
    decompression than the limit allows.
    """

    def __init__(self, source: BinaryIO, limit: int, over: Exception):
        self.source = source
        self.limit = limit
        self.over = over
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.count > self.limit:
            raise self.over
        want = self.limit + 1 - self.count
        data = self.source.read(want if size is None or size < 0 else min(size, want))
        self.count += len(data)
        if self.count > self.limit:
            raise self.over
        return data

    def readinto(self, buffer) -> int:  # noqa: ANN001  (io's signature)
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _open_archive(tar_path: str) -> tuple[BinaryIO, BinaryIO, bool]:
    """``(raw file, uncompressed stream, compressed?)`` of an archive, plain, gzip, bzip2 or xz (by its magic)."""
    raw = open(tar_path, "rb")
    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return raw, gzip.GzipFile(fileobj=raw, mode="rb"), True
    if magic[:3] == b"BZh":
        return raw, bz2.BZ2File(raw), True
    if magic == b"\xfd7zXZ\x00":
        return raw, lzma.LZMAFile(raw), True
    return raw, raw, False


def _has_data(member: tarfile.TarInfo) -> bool:
    """Whether data follows the member's header (links, directories and devices have none)."""
    return member.isreg() or member.type not in tarfile.SUPPORTED_TYPES


def _extract_objects(tar_path: str, dest: str, workspace: "Workspace | None" = None) -> list[tuple[str, str]]:
    """Extract the object members of ``tar_path`` into ``dest`` as ``0.o``, ``1.o``, ...: ``[(path, member name)]``.

    With ``workspace``, the archive's uncompressed bytes count against what its byte quota has left
    (QuotaExceededError: at a member's header when its size does not fit, or while decompressing).
    """
    name = os.path.basename(tar_path)
    left = workspace.bytes_left() if workspace is not None else None
    if left is not None and left < TAR_MAX_BYTES:
        over: Exception = workspace.quotas.workspace_bytes_error(
            f"expanding {name} past {format_size(left)}", workspace.used_bytes)
        limit = left
    else:
        over, limit = RemoteError(f"{name} is not a readable tar archive: it expands to more than 4 GiB"), TAR_MAX_BYTES
    objects: list[tuple[str, str]] = []
    try:
        raw, source, compressed = _open_archive(tar_path)
    except OSError as exc:
        raise RemoteError(f"{name} is not a readable tar archive: {exc}") from None
    expansion = _Expansion(source, limit, over)
    try:
        with raw, tarfile.open(fileobj=expansion, mode="r|") as tar:
            for member in tar:
                if left is not None and _has_data(member) and member.offset_data + member.size > left:
                    raise workspace.quotas.workspace_bytes_error(
                        f"extracting the .tar member {member.name!r} of {name} ({format_size(member.size)})",
                        workspace.used_bytes + member.offset_data)
                if not member.name.endswith(OBJECT_SUFFIXES):
                    continue  # other files of an export (sources, metadata) are not linked
                problem = _member_name_problem(member)
                if problem:
                    raise PathDeniedError(
                        f"the .tar member {member.name!r} {problem}; a .tar module holds regular object "
                        "files with plain relative names only"
                    )
                target = os.path.join(dest, f"{len(objects)}.o")
                src = tar.extractfile(member)
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, COPY_CHUNK)
                objects.append((target, member.name))
            if compressed:  # the rest of the compressed data, so that its checksum is checked (counted too)
                while expansion.read(COPY_CHUNK):
                    pass
    except RPCError:
        raise  # ours (PathDeniedError is an OSError too)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise RemoteError(f"{name} is not a readable tar archive: {exc}") from None
    if not objects:
        raise RemoteError(f"{name} holds no object files (.o) to link")
    return objects


def write_archive(path: str, objects: list[str]) -> None:
    """Write the ``ar`` archive ``path`` holding ``objects`` (no symbol index: linked with --whole-archive)."""
    with open(path, "wb") as out:
        out.write(b"!<arch>\n")
        for obj in objects:
            size = os.path.getsize(obj)
            name = os.path.basename(obj) + "/"
            out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{0o644:<8o}{size:<10}`\n".encode("ascii"))
            with open(obj, "rb") as f:
                shutil.copyfileobj(f, out)
            if size % 2:
                out.write(b"\n")


def link_objects(cc: str, objects: list[str], work: str) -> str:
    """Link ``objects`` (paths inside ``work``) into ``work/lib.so``, reading nothing but them and the toolchain.

    The objects go in through an archive with --whole-archive, so the linker
    takes each one as an object or fails; it never reads one as a linker script.
    A failed link raises RemoteError with the linker's complaint, paths in
    ``work`` shown relative to it.

        >>> link_objects("gcc", ["/ws/lib/1-lib.so.objs/0.o"], "/ws/lib/1-lib.so.objs")   # doctest: +SKIP
        '/ws/lib/1-lib.so.objs/lib.so'
    """
    write_archive(os.path.join(work, "objects.a"), objects)
    # -lm as TVM's export_library links: libm calls bind to libm's current versions (expf@GLIBC_2.27), not to
    # the older compatibility symbols an unversioned reference resolves to, which are 1.25-1.3x slower
    cmd = cc.split() + ["-shared", "-fPIC", "-fno-lto", "-o", "./lib.so",
                        "-Wl,--whole-archive", "./objects.a", "-Wl,--no-whole-archive", "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LINK_TIMEOUT_S, cwd=work,
                              env=dict(os.environ, TMPDIR=work))  # the toolchain's temp files stay here too
    except subprocess.TimeoutExpired:
        raise RemoteError(f"the linker ran for over {LINK_TIMEOUT_S} s and was stopped") from None
    if proc.returncode != 0:
        raise RemoteError(proc.stderr.replace(work + os.sep, "").strip())
    return os.path.join(work, "lib.so")


def link_tar(tar_path: str, out: str, workspace: "Workspace | None" = None) -> str:
    """Link the objects of ``tar_path`` into the shared object ``out``; return ``out``.

    Refuses (BadRequestError, PathDeniedError) any member that is not a regular
    relocatable ELF object for this device; see the module docstring. With
    ``workspace``, the archive's expansion counts against its byte quota
    (QuotaExceededError; ``out`` is not counted here).
    """
    return _link_into(out, tar_path, lambda work: _extract_objects(tar_path, work, workspace))


def link_object(obj_path: str, out: str) -> str:
    """Link one object file into the shared object ``out``, as TVM's server does for ``load_module("x.o")``;
    the object is checked and linked as a ``.tar``'s members are (see the module docstring)."""
    name = os.path.basename(obj_path)

    def copy(work: str) -> list[tuple[str, str]]:
        local = os.path.join(work, "0.o")
        with open(obj_path, "rb") as src, open(local, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return [(local, name)]

    try:
        return _link_into(out, obj_path, copy)
    except BadRequestError as exc:  # the checks speak of .tar members: this is one object file
        text = str(exc).replace(f"the .tar member {name!r}", f"the object file {name!r}")
        raise BadRequestError(text.replace("a .tar module holds", "load_module takes")) from None


def _link_into(out: str, source: str, extract: Callable[[str], list[tuple[str, str]]]) -> str:
    """Extract the objects of ``source`` into a private directory (``extract(work)``: [(path, member name)]),
    check them, link them into ``out``; return ``out``."""
    work = out + ".objs"
    os.makedirs(work, exist_ok=True)
    source_name = os.path.basename(source)
    try:
        cc = find_compiler()
        expected = toolchain_kind(cc, work)
        objects = extract(work)
        for path, member in objects:
            check_object(path, member, expected)
        try:
            linked = link_objects(cc, [path for path, _ in objects], work)
        except RemoteError as exc:
            members = [member for _, member in objects]
            text = _ARCHIVE_MEMBER.sub(
                lambda m: f"{source_name}({members[int(m.group(1))]})" if int(m.group(1)) < len(members) else m.group(0),
                str(exc),
            )
            raise RemoteError(f"linking {source_name} on the device failed:\n{text}") from None
        os.replace(linked, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def load_module(path: str, workspace: "Workspace") -> NativeLibrary | TVMModule:
    """Load a ``.so``, an object file or a ``.tar`` of objects (linked first) from the session's ``workspace``.

    A library that only TVM's runtime can run (a Relax VM executable, or kernels
    calling TVM runtime functions by name) is loaded through apache-tvm where the
    device has it, and refused here, naming what it needs, where it does not
    (see ``workbench.runtime.tvm_bridge``).

    The library is opened from a new private path (``workspace.private_path``):
    the dynamic loader caches libraries by path, so loading a re-uploaded
    ``lib.so`` must not hand back the old code. That copy counts against the
    workspace's quotas until the session ends (a failed load removes it).
    """
    name = os.path.basename(path)
    if not path.endswith((".tar", OPENCL_SUFFIX) + SHARED_SUFFIXES + OBJECT_SUFFIXES):
        raise UnsupportedError(
            f"cannot load {name!r}: load_module takes a shared object (.so), an object file (.o) or a .tar of "
            "object files, or OpenCL C source (.cl)"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"no file {name!r} in the session workspace; upload it first")
    if path.endswith(OPENCL_SUFFIX):  # OpenCL C, built for the server's OpenCL devices (runtime/opencl_module.py)
        from .opencl_module import load_source_module

        return load_source_module(path, name)
    if path.endswith((".tar",) + OBJECT_SUFFIXES):  # linked here first (an object file as TVM's server takes it)
        out = workspace.private_path(os.path.splitext(name)[0] + ".so")
        so = link_tar(path, out, workspace) if path.endswith(".tar") else link_object(path, out)
        workspace.charge_private(so, f"the library linked from {name}")
    else:
        so = workspace.private_copy(path, name)
    try:
        if library_modules(so) == ["opencl"]:  # TVM's OpenCL target: its kernels launched by runtime/opencl_module.py
            from .opencl_module import load_tvm_library

            return load_tvm_library(so, name)
        need = tvm_requirement(so)
        if need is not None:  # a Relax VM executable, or kernels calling runtime functions: TVM's runtime, or a refusal
            return load_with_tvm(so, name, need)
        return NativeLibrary(so, name=name)
    except BaseException:
        workspace.release_private(so)  # (a library that was opened stays mapped: removing its file is safe)
        raise
