"""Target descriptions -> the C compiler and flags that build for them.

Accepts every form a TVM user writes: a triple (``"aarch64-linux-gnu"``),
TVM's old CLI string (``"llvm -mtriple=armv7l-linux-gnueabihf -mcpu=cortex-a53
-mattr=+neon"``), TVM 0.27's dict (``{"kind": "llvm", "mtriple": ...,
"mattr": [...]}``) or its JSON text, a ``tvm.target.Target``, and
``"host"``/``"llvm"``/``None`` for this machine.

    >>> spec = parse_target("llvm -mtriple=armv7l-linux-gnueabihf -mcpu=cortex-a53 -mattr=+neon")
    >>> spec.compiler, spec.flags, spec.package
    ('arm-linux-gnueabihf-gcc', ('-mcpu=cortex-a53', '-mfpu=neon'), 'gcc-arm-linux-gnueabihf')

:func:`normalize_triple` is the one place a target (or a short architecture
name such as ``"arm64"`` or ``"armhf"``) becomes the Debian triple that names
its cross packages; the emulated boards (``workbench.native.qemu``) use it too.
This module is the bottom of ``workbench.cc``: it imports nothing else of
workbench (``compiler`` imports it, not the other way round).
"""
from __future__ import annotations

import functools
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping

NDK_ENV_VARS = ("WORKBENCH_NDK_CC", "TVM_NDK_CC")
_TRIPLE_RE = re.compile(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+){1,3}")
_HOST_WORDS = {"", "host", "llvm", "c", "native", "cpu"}
# short names (Debian architecture names, the arch part of a triple) -> Debian triple; a farm key
# "<name>-qemu" ("aarch64-qemu", "armhf-qemu") and any target or mtriple may use them
ARCH_ALIASES = {
    "aarch64": "aarch64-linux-gnu", "arm64": "aarch64-linux-gnu",
    "armhf": "arm-linux-gnueabihf", "arm": "arm-linux-gnueabihf", "armv7": "arm-linux-gnueabihf",
    "armv7l": "arm-linux-gnueabihf",
    "riscv64": "riscv64-linux-gnu", "ppc64le": "powerpc64le-linux-gnu", "ppc64el": "powerpc64le-linux-gnu",
    "s390x": "s390x-linux-gnu",
}


class ToolchainNotFoundError(RuntimeError):
    """No compiler on this machine builds for the requested target."""


def _compiler(cc: str | None) -> list[str]:
    """The C compiler command ``cc`` (default ``$CC`` or ``cc``); FileNotFoundError if it is not installed."""
    cmd = shlex.split(cc or os.environ.get("CC") or "cc")
    if not shutil.which(cmd[0]):
        raise FileNotFoundError(
            f"C compiler {cmd[0]!r} not found: install gcc (apt-get install gcc) or pass cc='...'"
        )
    return cmd


@functools.lru_cache(maxsize=None)
def target_triple(cc: str | None = None) -> str:
    """This machine's target triple, as its C compiler names it (``gcc -dumpmachine``)."""
    try:
        proc = subprocess.run(_compiler(cc) + ["-dumpmachine"], capture_output=True, text=True, timeout=10)
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return f"{platform.machine()}-{platform.system().lower()}-gnu"


@dataclass(frozen=True)
class TargetSpec:
    """What builds for a target: ``compiler`` (None: this machine's ``$CC``/``cc``) plus ``flags``.

    ``triple`` is the normalized (Debian multiarch) triple, ``package`` the
    Debian package providing ``compiler`` (None for the host and the NDK).
    """

    triple: str
    compiler: str | None
    flags: tuple[str, ...] = ()
    is_host: bool = False
    package: str | None = None

    @property
    def is_android(self) -> bool:
        return "android" in self.triple

    def command(self) -> list[str]:
        """The compiler command with the target flags; ToolchainNotFoundError (naming what to install) if absent.

            >>> parse_target("host").command()[-1]          # doctest: +SKIP
            'cc'
        """
        if self.is_android:
            return ndk_compiler() + list(self.flags)
        if self.compiler is None:
            return shlex.split(os.environ.get("CC") or "cc") + list(self.flags)
        if shutil.which(self.compiler):
            return [self.compiler] + list(self.flags)
        raise ToolchainNotFoundError(
            f"no C compiler for {self.triple}: {self.compiler!r} is not installed on this machine (it compiles "
            f"for {target_triple()}). Install it (Debian/Ubuntu: apt-get install {self.package}) or pass a "
            f"compiler command instead of a target"
        )


def ndk_compiler() -> list[str]:
    """The Android NDK compiler command from ``WORKBENCH_NDK_CC`` (or TVM's ``TVM_NDK_CC``).

        >>> os.environ["WORKBENCH_NDK_CC"] = "/opt/ndk/bin/aarch64-linux-android21-clang"   # doctest: +SKIP
    """
    for var in NDK_ENV_VARS:
        value = os.environ.get(var, "").strip()
        if value:
            cmd = shlex.split(value)
            if not shutil.which(cmd[0]):
                raise ToolchainNotFoundError(f"{var}={value!r} names no executable compiler: point it at the NDK's "
                                             f"clang, e.g. $NDK/toolchains/llvm/prebuilt/linux-x86_64/bin/"
                                             f"aarch64-linux-android21-clang")
            return cmd
    raise ToolchainNotFoundError(
        "building for Android needs the NDK compiler: set WORKBENCH_NDK_CC (or TVM_NDK_CC) to it, e.g. "
        "$NDK/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android21-clang"
    )


def parse_target(target: Any = None) -> TargetSpec:
    """Map a target description to the triple, cross compiler, flags and Debian package that build for it.

        >>> parse_target("aarch64-linux-gnu").compiler
        'aarch64-linux-gnu-gcc'
        >>> parse_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}).flags
        ('-mcpu=cortex-a72',)
    """
    attrs = _attributes(target)
    host = _normalize(target_triple())
    raw = attrs.get("mtriple") or ""
    triple = _normalize(raw) if raw else host
    mcpu = str(attrs.get("mcpu") or "")
    mattr = attrs.get("mattr") or []
    if isinstance(mattr, str):
        mattr = [m for m in mattr.split(",") if m]
    is_host = _arch_os(triple) == _arch_os(host)
    flags = tuple(_flags(raw or triple, triple, mcpu, [str(m).strip() for m in mattr]))
    if is_host:
        return TargetSpec(host, None, flags, True, None)
    if "android" in triple:
        return TargetSpec(triple, None, flags, False, None)
    return TargetSpec(triple, f"{triple}-gcc", flags, False, f"gcc-{triple.replace('_', '-')}")


def normalize_triple(target: Any = None) -> str:
    """The Debian triple (the one its cross packages are named by) of anything :func:`parse_target` reads, or of
    a short architecture name (``"aarch64"``, ``"arm64"``, ``"armhf"``, ``"armv7l"``, ``"riscv64"``, ...).

    ``"host"``, ``"llvm"``, ``None`` give this machine's triple; ValueError for what is not a target.

        >>> normalize_triple("arm64"), normalize_triple("aarch64-unknown-linux-gnu")
        ('aarch64-linux-gnu', 'aarch64-linux-gnu')
        >>> normalize_triple("armhf"), normalize_triple("llvm -mtriple=armv7l-linux-gnueabihf")
        ('arm-linux-gnueabihf', 'arm-linux-gnueabihf')
    """
    return parse_target(target).triple


def _attributes(target: Any) -> dict[str, Any]:
    """The target's llvm attributes (mtriple, mcpu, mattr) from any accepted form."""
    if target is None:
        return {}
    if hasattr(target, "export") and not isinstance(target, (str, Mapping)):  # tvm.target.Target
        target = target.export()
    if isinstance(target, Mapping):
        host = target.get("host")
        if target.get("kind", "llvm") not in ("llvm", "c") and host is not None:
            return _attributes(host)  # e.g. {"kind": "opencl", "host": {"kind": "llvm", ...}}
        return dict(target)
    if not isinstance(target, str):
        raise TypeError(f"a target is a triple, a TVM target string or dict, or None, not {type(target).__name__}")
    text = target.strip()
    if text.startswith("{"):
        try:
            return _attributes(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"target {text!r} is not valid JSON: {exc}") from None
    words = text.split()
    if not words or words[0].lower() in _HOST_WORDS or words[0].startswith("-"):
        attrs: dict[str, Any] = {}
        for word in words[1:] if words and not words[0].startswith("-") else words:
            key, sep, value = word.lstrip("-").partition("=")
            if sep and key == "host":
                continue
            attrs[key] = value if sep else True
        return attrs
    if len(words) == 1 and (_TRIPLE_RE.fullmatch(text) or text.lower() in ARCH_ALIASES):
        return {"mtriple": text}
    raise ValueError(
        f"cannot read target {target!r}: write a triple ('aarch64-linux-gnu'), a TVM target "
        f"('llvm -mtriple=aarch64-linux-gnu') or dict ({{'kind': 'llvm', 'mtriple': ...}}), or 'host'"
    )


def _arch_os(triple: str) -> tuple[str, ...]:
    """``x86_64-pc-linux-gnu`` and ``x86_64-linux-gnu`` both as ``('x86_64', 'linux', 'gnu')``."""
    parts = triple.strip().lower().split("-")
    if len(parts) == 4 or (len(parts) == 3 and parts[1] in ("pc", "unknown", "none")):
        parts = [parts[0]] + parts[2:]
    return tuple(parts)


def _normalize(triple: str) -> str:
    """LLVM's spelling of a triple (or a short name of :data:`ARCH_ALIASES`) -> the Debian multiarch triple its
    cross gcc is named by."""
    alias = ARCH_ALIASES.get(triple.strip().lower())
    if alias is not None:
        return alias
    if not _TRIPLE_RE.fullmatch(triple.strip()):
        raise ValueError(f"{triple!r} is not a target triple (e.g. aarch64-linux-gnu)")
    arch, *rest = _arch_os(triple)
    env = "-".join(rest)
    if "android" in env:
        return f"{'aarch64' if arch in ('arm64', 'aarch64') else arch}-linux-{rest[-1]}"
    if arch in ("arm64", "aarch64", "aarch64_be"):
        arch = "aarch64" if arch != "aarch64_be" else arch
    elif arch.startswith("arm") or arch.startswith("thumb"):
        arch = "arm"
        env = env if env.endswith(("gnueabihf", "gnueabi")) else "linux-gnueabihf"
    elif arch in ("i386", "i486", "i586", "i686", "x86"):
        arch = "i686"
    elif arch == "amd64":
        arch = "x86_64"
    elif arch == "ppc64le":
        arch = "powerpc64le"
    return f"{arch}-{env}"


def _flags(raw_triple: str, triple: str, mcpu: str, mattr: list[str]) -> list[str]:
    """gcc flags for the llvm ``mcpu``/``mattr`` (and the sub-architecture an arm triple names)."""
    arch = _arch_os(raw_triple)[0]
    flags: list[str] = []
    on = {m[1:] for m in mattr if m.startswith("+")}
    off = {m[1:] for m in mattr if m.startswith("-")}
    if triple.startswith("arm-"):
        if mcpu:
            flags.append(f"-mcpu={mcpu}")
        else:
            sub = re.match(r"(?:arm|thumb)v(\d+)([a-z]*)", arch)
            if sub:
                version, profile = sub.groups()
                if profile in ("l", ""):  # armv7l, armv7 -> armv7-a; armv6l -> armv6
                    profile = "a" if int(version) >= 7 else ""
                flags.append(f"-march=armv{version}{'-' + profile if profile else ''}")
                if int(version) < 7:
                    flags.append("-marm")  # armhf gcc defaults to Thumb-2, which v6 lacks
        if "neon" in on:
            flags.append("-mfpu=neon-vfpv4" if "vfp4" in on else "-mfpu=neon")
        elif "vfp4" in on:
            flags.append("-mfpu=vfpv4")
        return flags
    if triple.startswith(("x86_64", "i686")):
        if mcpu:
            flags.append(f"-march={mcpu}")
        flags += [f"-m{f}" for f in sorted(on)] + [f"-mno-{f}" for f in sorted(off)]
        return flags
    if triple.startswith("aarch64"):
        if mcpu:
            flags.append(f"-mcpu={mcpu}")
        extensions = sorted(f for f in on - {"neon", "fp-armv8"} if not f.startswith("v8") and not f.startswith("v9"))
        base = next((f for f in sorted(on) if re.fullmatch(r"v[89]\.?\d*a", f)), None)
        if not mcpu and (extensions or base):
            version = (base or "v8a")[1:-1]
            flags.append(f"-march=armv{version}-a" + "".join(f"+{e}" for e in extensions))
        return flags
    if mcpu:
        flags.append(f"-mcpu={mcpu}")
    return flags


def dump_machine(cmd: list[str]) -> str | None:
    """What triple ``cmd`` compiles for (``-dumpmachine``), or None if it will not say."""
    try:
        proc = subprocess.run(cmd[:1] + ["-dumpmachine"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None
