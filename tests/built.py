"""The generated kernel modules, built once per test session (float32 and
float64 in parallel) into the session's cache (see conftest.py)."""
import numpy as np

from tilec.codegen import build_modules

_MODULES = {}


def module(dtype):
    """The built kernel module of ``dtype``."""
    if not _MODULES:
        for (mod, _, _), name in zip(build_modules([("float32",), ("float64",)]), ("float32", "float64")):
            _MODULES[name] = mod
    return _MODULES[np.dtype(dtype).name]


_SOURCES = {}


def kernel_source(dtype):
    """The generated kernels as C, as a launcher sends them to workers."""
    name = np.dtype(dtype).name
    if name not in _SOURCES:
        from tilec.codegen import generate
        source = generate((name,))
        _SOURCES[name] = {"module": source.module, "source": source.text}
    return _SOURCES[name]
