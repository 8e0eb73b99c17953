/*
 * The kernel-ABI shim: the Python server's native piece, a (trivial) CPython extension.
 *
 * Everything it does is in ../native/kernel_runtime.c (shared with minrpc, the native server): the
 * error setter kernels call, the last error per thread, the timing loop behind time_evaluator, and
 * what TVM's runtime gives kernels through context slots (thread pool, workspaces, runtime functions
 * looked up by name, stubs for the ones it lacks).  The extension is built from this file and that
 * one (setup.py; ffi.py's _build_shim for a tree copied without pip install), so that pip compiles
 * the runtime with the package.  Python loads it RTLD_GLOBAL before any kernel and calls it through
 * ctypes (workbench/runtime/ffi.py); the module object itself holds nothing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "kernel_runtime.h"

static struct PyModuleDef shim_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_shim",
    .m_doc = "rpc-workbench kernel-ABI shim (used through ctypes)",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__shim(void) { return PyModule_Create(&shim_module); }
