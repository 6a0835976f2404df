"""Test helper: count numpy's array-data allocations exactly.

numpy allocates array data through a replaceable handler
(``PyDataMem_SetHandler``, numpy >= 1.22). This installs one that forwards
to the default handler and counts every allocation, so a test can assert
that a code path allocates no array at all (a temporary that is freed at
once still counts, which tracemalloc snapshots would miss). Built with the
runtime's own kernel builder (C compiler + Python and numpy headers).
"""
import contextlib

import numpy as np

from tilec_runtime.build_cache import digest
from tilec_runtime.native import build_and_load

C_SOURCE = r"""
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
#include <numpy/arrayobject.h>

static PyDataMem_Handler *base = NULL;
static long long allocations = 0;

static void *count_malloc(void *ctx, size_t n) {
    allocations++;
    return base->allocator.malloc(base->allocator.ctx, n);
}
static void *count_calloc(void *ctx, size_t nelem, size_t elsize) {
    allocations++;
    return base->allocator.calloc(base->allocator.ctx, nelem, elsize);
}
static void *count_realloc(void *ctx, void *p, size_t n) {
    allocations++;
    return base->allocator.realloc(base->allocator.ctx, p, n);
}
static void count_free(void *ctx, void *p, size_t n) {
    base->allocator.free(base->allocator.ctx, p, n);
}
static PyDataMem_Handler counting = {
    "tilec_counting_allocator", 1, {NULL, count_malloc, count_calloc, count_realloc, count_free}};

/* install() -> the previous handler (a capsule), to give back to restore() */
static PyObject *install(PyObject *self, PyObject *args) {
    if (base == NULL) {
        PyObject *def = PyDataMem_GetHandler();
        if (def == NULL) return NULL;
        base = (PyDataMem_Handler *)PyCapsule_GetPointer(def, "mem_handler");
        Py_DECREF(def);  /* numpy's default handler is static: the pointer stays valid */
        if (base == NULL) return NULL;
    }
    PyObject *cap = PyCapsule_New(&counting, "mem_handler", NULL);
    if (cap == NULL) return NULL;
    PyObject *old = PyDataMem_SetHandler(cap);
    Py_DECREF(cap);
    return old;
}
static PyObject *restore(PyObject *self, PyObject *old) {
    PyObject *prev = PyDataMem_SetHandler(old);
    if (prev == NULL) return NULL;
    Py_DECREF(prev);
    Py_RETURN_NONE;
}
static PyObject *count(PyObject *self, PyObject *noargs) { return PyLong_FromLongLong(allocations); }

static PyMethodDef methods[] = {
    {"install", install, METH_NOARGS, NULL}, {"restore", restore, METH_O, NULL},
    {"count", count, METH_NOARGS, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "MODNAME", NULL, -1, methods};
PyMODINIT_FUNC PyInit_MODNAME(void) {
    import_array();
    return PyModule_Create(&moddef);
}
"""


def _module():
    name = "tilec_alloc_counter_" + digest(C_SOURCE)[:12]
    mod, _ = build_and_load(C_SOURCE.replace("MODNAME", name), name, include_dirs=(np.get_include(),))
    return mod


@contextlib.contextmanager
def count_allocations():
    """``with count_allocations() as n: ...`` then ``n()`` is the number of
    numpy data allocations made inside the block (in this thread's context)."""
    mod = _module()
    old = mod.install()
    start = mod.count()
    end = []
    try:
        yield lambda: (end[0] if end else mod.count()) - start
    finally:
        end.append(mod.count())
        mod.restore(old)
