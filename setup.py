"""Builds the one native piece: the kernel-ABI shim (see workbench/runtime/_shim.c)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "workbench.runtime._shim",
            sources=["workbench/runtime/_shim.c"],
            extra_compile_args=["-O2", "-pthread"],  # the shim's thread pool
            extra_link_args=["-pthread"],
        )
    ]
)
