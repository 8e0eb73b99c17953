"""Toolchains: build kernel libraries with the host (or a cross) C compiler.

    >>> from workbench import cc
    >>> cc.create_shared("add_one.so", ["add_one.c"])           # doctest: +SKIP
    >>> cc.create_tar("add_one.tar", ["add_one.c"])             # doctest: +SKIP
    >>> mod = cc.load_source(remote, source_text, name="add_one")   # doctest: +SKIP

Kernels include ``workbench_kernel.h`` (on the include path these functions set).
"""
from .compiler import compile_objects, create_shared, create_tar, include_path, target_triple
from .source import CompileError, ToolchainNotFoundError, build_source, compiler_for, load_source

__all__ = [
    "CompileError", "ToolchainNotFoundError", "build_source", "compile_objects", "compiler_for", "create_shared",
    "create_tar", "include_path", "load_source", "target_triple",
]
