"""Loading kernel modules on the serving side: ``.so`` as is, ``.tar`` linked here first.

A ``.tar`` holds object files (``export_library("lib.tar")`` in TVM, or
``workbench.cc.create_tar``); the device links them with its own compiler into
a shared object, as seed 004 does on a Raspberry Pi.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from typing import Callable

from ..errors import RemoteError, UnsupportedError
from .ffi import NativeLibrary

SHARED_SUFFIXES = (".so", ".dylib", ".dll")
LINK_TIMEOUT_S = 300


def find_compiler() -> str:
    """The compiler this device links with: $WORKBENCH_CC, $CC, or cc/gcc/clang on PATH."""
    for name in (os.environ.get("WORKBENCH_CC"), os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name
    raise UnsupportedError(
        "this device has no C compiler to link a .tar module: install gcc on the device, "
        "or cross-compile and upload a .so instead"
    )


def _extract_objects(tar_path: str, dest: str) -> list[str]:
    try:
        tar = tarfile.open(tar_path)
    except (tarfile.TarError, OSError) as exc:
        raise RemoteError(f"{os.path.basename(tar_path)} is not a readable tar archive: {exc}") from None
    objects = []
    with tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if not member.isfile() or not name.endswith((".o", ".obj")):
                continue  # only plain object files; never links, devices or paths
            target = os.path.join(dest, f"{len(objects)}_{name}")
            src = tar.extractfile(member)
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            objects.append(target)
    if not objects:
        raise RemoteError(f"{os.path.basename(tar_path)} holds no object files (.o) to link")
    return objects


def link_tar(tar_path: str, out: str) -> str:
    """Link the objects of ``tar_path`` into the shared object ``out``; return ``out``."""
    work = out + ".objs"
    os.makedirs(work, exist_ok=True)
    try:
        objects = _extract_objects(tar_path, work)
        cmd = find_compiler().split() + ["-shared", "-fPIC", "-o", out, *objects]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LINK_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RemoteError(f"linking {os.path.basename(tar_path)} took over {LINK_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            raise RemoteError(
                f"linking {os.path.basename(tar_path)} on the device failed "
                f"(were the objects compiled for this device's architecture, {os.uname().machine}?):\n"
                + proc.stderr.strip()
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def load_module(path: str, private_path: Callable[[str], str]) -> NativeLibrary:
    """Load a ``.so`` or a ``.tar`` of objects (linked first).

    The library is opened from a new private path (``private_path(name)``):
    the dynamic loader caches libraries by path, so loading a re-uploaded
    ``lib.so`` must not hand back the old code.
    """
    name = os.path.basename(path)
    if not path.endswith((".tar",) + SHARED_SUFFIXES):
        raise UnsupportedError(
            f"cannot load {name!r}: load_module takes a shared object (.so) or a .tar of object files"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"no file {name!r} in the session workspace; upload it first")
    if path.endswith(".tar"):
        lib = NativeLibrary(link_tar(path, private_path(os.path.splitext(name)[0] + ".so")), name=name)
    else:
        copy = private_path(name)
        try:
            os.link(path, copy)
        except OSError:
            shutil.copyfile(path, copy)
        lib = NativeLibrary(copy, name=name)
    return lib
