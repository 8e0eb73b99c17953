"""Builds the native piece of the Python package and installs the JupyterLab extension.

- The kernel-ABI shim: workbench/runtime/_shim.c (the CPython extension wrapper) plus
  workbench/native/kernel_runtime.c (the runtime itself, shared with minrpc).
- The lab extension (extensions/jupyterlab-rpc-workbench, TypeScript): built with node through
  hatch-jupyter-builder when its sources are newer than the build, then installed as the data files
  share/jupyter/labextensions/jupyterlab-rpc-workbench, with the server extension's switch
  etc/jupyter/jupyter_server_config.d/rpc-workbench.json. Editable installs get them too (copies).
  Without node the package installs without the lab extension, and says so.
"""
import logging
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.sdist import sdist
from setuptools.dist import Distribution

install_data = Distribution().get_command_class("install_data")  # distutils' (setuptools has no own)

HERE = Path(__file__).resolve().parent
LAB_EXT = HERE / "extensions" / "jupyterlab-rpc-workbench"
LAB_EXT_BUILT = LAB_EXT / "labextension"
LAB_EXT_NAME = "jupyterlab-rpc-workbench"
LAB_EXT_SOURCES = ("src", "style", "package.json", "tsconfig.json", "yarn.lock")
JLPM = [sys.executable, "-c", "import sys; from jupyter_builder.jlpm import main; main(sys.argv[1:])"]  # JupyterLab's yarn
SERVER_CONFIG = "jupyter-config/jupyter_server_config.d/rpc-workbench.json"
INSTALL_JSON = {"packageManager": "python", "packageName": "rpc-workbench",
                "uninstallInstructions": "Use your Python package manager (pip) to uninstall rpc-workbench"}

log = logging.getLogger("rpc-workbench.setup")


def _newest(path: Path) -> float:
    if path.is_file():
        return path.stat().st_mtime
    return max((p.stat().st_mtime for p in path.rglob("*") if p.is_file()), default=0.0)


def build_lab_extension() -> None:
    """Build the lab extension if its sources are newer than the build (node, and jlpm from JupyterLab 4.6+)."""
    if not (LAB_EXT / "package.json").exists():  # an sdist: the built extension came with it
        return
    sources = [LAB_EXT / name for name in LAB_EXT_SOURCES if (LAB_EXT / name).exists()]
    built = (LAB_EXT_BUILT / "package.json").exists()
    if built and max(map(_newest, sources)) <= _newest(LAB_EXT_BUILT):
        return
    if shutil.which("node") is None:
        print(f"warning: node was not found, so the JupyterLab extension ({LAB_EXT_NAME}: the Devices sidebar) is "
              "not built; the workbench works in notebook cells without it. Install node >= 18 and pip install "
              "again to get it.", file=sys.stderr)
        return
    from hatch_jupyter_builder import npm_builder

    npm_builder("wheel", "standard", path=str(LAB_EXT), build_cmd="build:prod", force=True, npm=JLPM)


def lab_extension_data_files() -> list[tuple[str, list[str]]]:
    """The built extension and the server extension's switch, as (install dir, [files])."""
    files = [("etc/jupyter/jupyter_server_config.d", [SERVER_CONFIG])]
    if not (LAB_EXT_BUILT / "package.json").exists():
        return files
    install_json = LAB_EXT_BUILT / "install.json"
    if not install_json.exists():
        import json

        install_json.write_text(json.dumps(INSTALL_JSON, indent=2) + "\n")
    target = f"share/jupyter/labextensions/{LAB_EXT_NAME}"
    for folder, _, names in sorted(os.walk(LAB_EXT_BUILT)):
        rel = os.path.relpath(folder, LAB_EXT_BUILT)
        paths = [os.path.relpath(os.path.join(folder, n), HERE) for n in sorted(names)]
        if paths:
            files.append((target if rel == "." else f"{target}/{rel}", paths))
    return files


class InstallData(install_data):
    """Builds the lab extension first, then installs it with the other data files."""

    def run(self) -> None:
        build_lab_extension()
        self.data_files = lab_extension_data_files()
        super().run()


class Sdist(sdist):
    """Ships the built lab extension (MANIFEST.in takes it), so a wheel built from the sdist needs no node."""

    def run(self) -> None:
        build_lab_extension()
        super().run()


class WorkbenchDistribution(Distribution):
    def has_data(self) -> bool:
        """Editable installs ask for this (not has_data_files) before they install data files."""
        return True

    def has_data_files(self) -> bool:
        return True


setup(
    distclass=WorkbenchDistribution,
    cmdclass={"install_data": InstallData, "sdist": Sdist},
    data_files=[("etc/jupyter/jupyter_server_config.d", [SERVER_CONFIG])],
    ext_modules=[
        Extension(
            "workbench.runtime._shim",
            sources=["workbench/runtime/_shim.c", "workbench/native/kernel_runtime.c"],
            include_dirs=["workbench/native"],
            depends=["workbench/native/kernel_runtime.h", "workbench/native/wire_out.h"],
            extra_compile_args=["-O2", "-pthread"],  # the runtime's thread pool
            extra_link_args=["-pthread"],
        ),
        Extension(  # the session worker's fast path for plain calls (worker.py, serve_requests)
            "workbench.rpc.server._serve",
            sources=["workbench/rpc/server/_serve.c"],
            include_dirs=["workbench/native"],
            depends=["workbench/native/wire_out.h"],
            extra_compile_args=["-O2"],
        ),
    ],
)
