"""Builds the one native piece of the Python package: the kernel-ABI shim.

It is workbench/runtime/_shim.c (the CPython extension wrapper) plus
workbench/native/kernel_runtime.c (the runtime itself, shared with minrpc).
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "workbench.runtime._shim",
            sources=["workbench/runtime/_shim.c", "workbench/native/kernel_runtime.c"],
            include_dirs=["workbench/native"],
            depends=["workbench/native/kernel_runtime.h"],
            extra_compile_args=["-O2", "-pthread"],  # the runtime's thread pool
            extra_link_args=["-pthread"],
        )
    ]
)
