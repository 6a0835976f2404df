"""Cython source -> C source, cached.

The only user of Cython in tilec. The C it produces is what devices build
(``tilec_runtime.native``), so it must not depend on where it was made:
Cython runs in a cache folder on a file named after the module, and the
paths it embeds are relative. Keyed by the source, the module name and the
Cython and scipy versions (the BLAS declarations come from scipy's .pxd).
"""
import os
import subprocess
import sys

from tilec.codegen.errors import CodegenError
from tilec_runtime.build_cache import digest, entry_dir, file_lock
from tilec_runtime.files import atomic_path, atomic_write


class CSource:
    """C source of a module and whether this call ran Cython."""

    def __init__(self, module, text, generated):
        self.module, self.text, self.generated = module, text, generated


def _versions():
    import Cython
    import scipy
    return f"Cython {Cython.__version__}; scipy {scipy.__version__}"


def cythonize(module, pyx_source, on_compile=None):
    """The C translation of ``pyx_source`` as module ``module`` (cached).
    ``on_compile()`` is called just before Cython runs."""
    try:
        versions = _versions()
    except ImportError as exc:
        raise CodegenError(f"generating kernels needs Cython and scipy: pip install cython scipy ({exc})") from exc
    folder = entry_dir("cython", digest(pyx_source, module, versions)[:32])
    c_path = os.path.join(folder, module + ".c")
    if not os.path.exists(c_path):
        with file_lock(os.path.join(folder, ".lock")):
            if not os.path.exists(c_path):
                if on_compile:
                    on_compile()
                atomic_write(os.path.join(folder, module + ".pyx"), pyx_source)
                with atomic_path(c_path) as tmp:
                    cmd = [sys.executable, "-m", "cython", "-3", "--fast-fail", "-o", tmp, module + ".pyx"]
                    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
                    if proc.returncode != 0:
                        raise CodegenError(f"Cython failed on the generated {module}.pyx (in {folder}):\n"
                                           + (proc.stderr or proc.stdout)[-4000:])
                with open(c_path) as f:
                    return CSource(module, f.read(), True)
    with open(c_path) as f:
        return CSource(module, f.read(), False)
