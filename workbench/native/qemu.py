"""Emulated boards: run a program built for another architecture under qemu-user on this machine.

    >>> from workbench.native.qemu import find_emulator
    >>> board = find_emulator("aarch64")                       # doctest: +SKIP
    >>> board.command("./minrpc", "--port", "0")               # doctest: +SKIP
    ['/usr/bin/qemu-aarch64', '-L', '/usr/aarch64-linux-gnu', './minrpc', '--port', '0']

What an emulated board needs, from Debian's packages: ``qemu-user`` (the
emulator), ``gcc-<triple>`` (the cross compiler, which the board also uses to
link ``.tar`` modules) and ``libc6-dev-<arch>-cross`` (the target's C library,
the sysroot ``/usr/<triple>`` that ``qemu -L`` loads the program's libraries
from). qemu-user hands the emulated program's ``execve`` to this machine's
kernel, so the board runs the host's cross compiler natively; it could not
start another foreign program without binfmt_misc, and needs not.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any

# the one target normaliser (and its short names) is the toolchain's; re-exported here for existing callers
from ..cc.targets import ToolchainNotFoundError, normalize_triple

# arch (as the first part of a Debian triple) -> (qemu-user program, Debian architecture name)
QEMU_ARCHES = {
    "aarch64": ("qemu-aarch64", "arm64"),
    "arm": ("qemu-arm", "armhf"),
    "riscv64": ("qemu-riscv64", "riscv64"),
    "powerpc64le": ("qemu-ppc64le", "ppc64el"),
    "s390x": ("qemu-s390x", "s390x"),
}
QEMU_KEY_SUFFIX = "-qemu"


class EmulatorNotFoundError(ToolchainNotFoundError):
    """Something an emulated board needs is not installed; the message names the Debian packages."""


@dataclass(frozen=True)
class Emulator:
    """How to run programs of ``triple`` here: ``qemu`` with the target's ``sysroot``; ``compiler`` builds for it.

        >>> Emulator("aarch64-linux-gnu", "/usr/bin/qemu-aarch64", "/usr/aarch64-linux-gnu",
        ...          "aarch64-linux-gnu-gcc").command("prog")
        ['/usr/bin/qemu-aarch64', '-L', '/usr/aarch64-linux-gnu', 'prog']
    """

    triple: str
    qemu: str
    sysroot: str
    compiler: str

    @property
    def arch(self) -> str:
        return self.triple.split("-")[0]

    def command(self, program: str, *args: str) -> list[str]:
        """The command line that runs ``program args...`` under emulation."""
        return [self.qemu, "-L", self.sysroot, program, *args]


def qemu_key_triple(key: str) -> str | None:
    """The triple a farm key of the form ``<triple-or-arch>-qemu`` names (by :func:`normalize_triple`), else None.

        >>> qemu_key_triple("aarch64-qemu"), qemu_key_triple("arm-linux-gnueabihf-qemu"), qemu_key_triple("local")
        ('aarch64-linux-gnu', 'arm-linux-gnueabihf', None)
    """
    if not key.endswith(QEMU_KEY_SUFFIX):
        return None
    name = key[: -len(QEMU_KEY_SUFFIX)]
    try:
        return normalize_triple(name)
    except ValueError:
        raise ValueError(f"farm key {key!r}: {name!r} is not an architecture or triple; write e.g. aarch64-qemu, "
                         "armhf-qemu or aarch64-linux-gnu-qemu") from None


def packages_for(triple: str) -> dict[str, str]:
    """The Debian package of each piece a board of ``triple`` needs: {"qemu": ..., "compiler": ..., "libc": ...}."""
    arch = triple.split("-")[0]
    debian = QEMU_ARCHES.get(arch, (None, arch))[1]
    return {"qemu": "qemu-user", "compiler": f"gcc-{triple.replace('_', '-')}", "libc": f"libc6-dev-{debian}-cross"}


def _qemu_program(arch: str) -> str | None:
    name = QEMU_ARCHES[arch][0]
    return shutil.which(name) or shutil.which(name + "-static")


def _sysroot(triple: str) -> str:
    return os.path.join("/usr", triple)  # where Debian's libc6-dev-<arch>-cross installs it


def _has_c_library(sysroot: str) -> bool:
    return any(os.path.exists(os.path.join(sysroot, d, "libc.so.6")) for d in ("lib", "lib64", "usr/lib"))


def find_emulator(target: Any) -> Emulator:
    """The emulator, sysroot and cross compiler for ``target`` (``"aarch64"``, a triple, a TVM target).

    Raises :class:`EmulatorNotFoundError` naming every missing Debian package
    (``apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross``),
    or ValueError for an architecture qemu-user is not set up for here.

        >>> find_emulator("aarch64").sysroot          # doctest: +SKIP
        '/usr/aarch64-linux-gnu'
    """
    triple = normalize_triple(target)
    arch = triple.split("-")[0]
    if arch not in QEMU_ARCHES:
        raise ValueError(
            f"no emulated board for {triple}: the architectures set up for qemu-user are "
            f"{', '.join(sorted(QEMU_ARCHES))} (farm keys such as aarch64-qemu, armhf-qemu)"
        )
    packages = packages_for(triple)
    qemu = _qemu_program(arch)
    compiler = f"{triple}-gcc"
    sysroot = _sysroot(triple)
    missing = []
    if qemu is None:
        missing.append((f"the emulator {QEMU_ARCHES[arch][0]}", packages["qemu"]))
    if shutil.which(compiler) is None:
        missing.append((f"the cross compiler {compiler}", packages["compiler"]))
    if not _has_c_library(sysroot):
        missing.append((f"the {triple} C library in {sysroot}", packages["libc"]))
    if missing:
        what = ", ".join(w for w, _ in missing)
        raise EmulatorNotFoundError(
            f"an emulated {arch} board needs {what}: install "
            f"{'them' if len(missing) > 1 else 'it'} (Debian/Ubuntu: apt-get install "
            f"{' '.join(p for _, p in missing)}); all it needs: {' '.join(packages.values())}"
        )
    return Emulator(triple, qemu, sysroot, compiler)

