"""Toolchains: build kernel libraries with the host (or a cross) C compiler.

    >>> from workbench import cc
    >>> cc.create_shared("add_one.so", ["add_one.c"])           # doctest: +SKIP
    >>> cc.create_tar("add_one.tar", ["add_one.c"])             # doctest: +SKIP
    >>> cc.create_executable("hello", ["hello.c"])              # doctest: +SKIP
    >>> mod = cc.load_source(remote, source_text, name="add_one")   # doctest: +SKIP
    >>> cc.build(source_text, target="aarch64-linux-gnu").export_library("lib.tar")   # doctest: +SKIP
    >>> tvm_mod.export_library("lib.so", fcompile=cc.cross_compiler("aarch64-linux-gnu"))   # doctest: +SKIP
    >>> cc.parse_target("llvm -mtriple=armv7l-linux-gnueabihf -mattr=+neon").compiler
    'arm-linux-gnueabihf-gcc'

Kernels include ``workbench_kernel.h`` (on the include path these functions set).
"""
from .compiler import (
    compile_objects, create_executable, create_ndk_shared, create_shared, create_tar, cross_compiler, include_path,
    target_triple,
)
from .module import Module, build
from .source import CompileError, build_source, compiler_for, load_source
from .targets import TargetSpec, ToolchainNotFoundError, ndk_compiler, parse_target

__all__ = [
    "CompileError", "Module", "TargetSpec", "ToolchainNotFoundError", "build", "build_source", "compile_objects",
    "compiler_for", "create_executable", "create_ndk_shared", "create_shared", "create_tar", "cross_compiler", "include_path",
    "load_source", "ndk_compiler", "parse_target", "target_triple",
]
