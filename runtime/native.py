"""Generated kernels on a device: build a kernel module from C, cache, load.

The machine that compiles a plan renders the kernel templates and runs
Cython (``tilec.codegen``); what reaches a device is C source. A device
builds it with a C compiler and the Python headers only: no Cython, no
Jinja2, no BLAS to link (the module takes s/dgemm from
``scipy.linalg.cython_blas`` when it is imported). Built modules live in the
build cache (``tilec_runtime.build_cache``), keyed by the source, the
Python, numpy and platform, the compiler and its flags; they are loaded
with importlib under a name derived from the source's hash, so two
different kernel modules can live in one process.
"""
import contextlib
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import types

import numpy as np

from tilec_runtime.build_cache import digest, entry_dir, file_lock
from tilec_runtime.files import atomic_path, atomic_write
from tilec_runtime.errors import RuntimeFault

# -ffp-contract=off: no fused multiply-adds, so that the generated kernels
# round like numpy does (an activation's sign test then agrees with the
# reference's bit for bit); the kernels' time is in BLAS and memory anyway.
# -fno-trapping-math: lets the compiler evaluate both arms of a select
# (`u if u > 0 else u * slope`) and so vectorise the activation loops; it
# changes no result (nothing here reads floating-point exception flags).
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-strict-aliasing", "-fPIC", "-shared", "-w")
# Tuned for the CPU that builds them, when the compiler can: a kernel module
# is built on the device that runs it, and the build key includes the CPU,
# so a cache shared between different machines never hands one the other's.
NATIVE_FLAGS = ("-march=native",)
# The kernels split their work over a device's cores with OpenMP; a
# compiler without it (Apple's clang) builds them single-threaded.
OPENMP_FLAGS = ("-fopenmp",)
FLAGS_ENV = "TILEC_CFLAGS"  # extra flags; "-march=..." there replaces NATIVE_FLAGS

_loaded = {}
_load_lock = threading.Lock()


class KernelBuildError(RuntimeFault):
    """A kernel module cannot be built or loaded on this device."""


class BuildResult:
    """Where a module was built and whether this call had to build it."""

    def __init__(self, path, module, built, seconds):
        self.path, self.module, self.built, self.seconds = path, module, built, seconds

    def __repr__(self):
        return f"BuildResult({self.module!r}, built={self.built}, {self.seconds:.1f} s)"


def find_compiler():
    """The C compiler command (``CC``, Python's own, or cc/gcc/clang on PATH)."""
    if os.environ.get("CC"):
        cmd = shlex.split(os.environ["CC"])
    else:
        configured = shlex.split(sysconfig.get_config_var("CC") or "")
        cmd = configured if configured and shutil.which(configured[0]) else None
        if cmd is None:
            found = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
            cmd = [found] if found else None
    if not cmd or not shutil.which(cmd[0]):
        raise KernelBuildError(
            "no C compiler found, and the generated kernels must be compiled on this device: "
            "install one (Debian / Raspberry Pi OS: sudo apt install gcc python3-dev; "
            "macOS: xcode-select --install), set CC, or train with --kernels reference")
    return cmd


def python_include():
    """The directory of Python.h; a clear error if the headers are missing."""
    include = sysconfig.get_paths()["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        raise KernelBuildError(
            f"Python.h not found in {include}: install the Python headers "
            f"(Debian / Raspberry Pi OS: sudo apt install python3-dev), or train with --kernels reference")
    return include


_accepted = {}


def _accepts(cc, flags):
    """Whether the compiler takes ``flags`` (probed once per compiler)."""
    key = (tuple(cc), tuple(flags))
    if key not in _accepted:
        try:
            proc = subprocess.run(cc + list(flags) + ["-x", "c", "-c", os.devnull, "-o", os.devnull],
                                  capture_output=True, timeout=60)
            _accepted[key] = proc.returncode == 0
        except (OSError, subprocess.SubprocessError):
            _accepted[key] = False
    return _accepted[key]


def build_flags(cc):
    extra = shlex.split(os.environ.get(FLAGS_ENV, ""))
    flags = list(BASE_FLAGS)
    if not any(f.startswith(("-march", "-mcpu")) for f in extra) and _accepts(cc, NATIVE_FLAGS):
        flags += NATIVE_FLAGS
    if _accepts(cc, OPENMP_FLAGS):
        flags += OPENMP_FLAGS
    flags += extra
    if sys.platform == "darwin":
        flags += ["-undefined", "dynamic_lookup"]  # Python's symbols come from the interpreter
    return flags


def cpu_id():
    """What identifies this CPU's instruction set (for the build key)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        return " | ".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compiler_version(cc):
    try:
        out = subprocess.run(cc + ["--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def build_key(c_source, module, cc, flags):
    """Everything that changes the built file (``flags`` include the include dirs)."""
    return digest(c_source, module, sys.version, np.__version__, platform.machine(), platform.system(), cpu_id(),
                  sysconfig.get_config_var("EXT_SUFFIX") or "", " ".join(cc), _compiler_version(cc), *flags)


def build(c_source, module, include_dirs=(), on_compile=None):
    """Build ``module`` from ``c_source`` into the cache unless it is there.
    ``include_dirs``: besides Python's (the kernels need no other; a module
    using numpy's C API passes ``numpy.get_include()``). ``on_compile()``
    is called just before the compiler runs (not when the cache has it)."""
    t0 = time.perf_counter()
    cc = find_compiler()
    flags = build_flags(cc) + ["-I" + d for d in include_dirs]
    key = build_key(c_source, module, cc, flags)
    folder = entry_dir("build", key[:32])
    target = os.path.join(folder, module + sysconfig.get_config_var("EXT_SUFFIX"))
    if os.path.exists(target):
        return BuildResult(target, module, False, time.perf_counter() - t0)
    include = python_include()
    with file_lock(os.path.join(folder, ".lock")):
        if os.path.exists(target):  # another worker built it while we waited
            return BuildResult(target, module, False, time.perf_counter() - t0)
        if on_compile:
            on_compile()
        src = os.path.join(folder, module + ".c")
        atomic_write(src, c_source)
        with atomic_path(target) as tmp:
            cmd = cc + flags + ["-I" + include, src, "-o", tmp, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise KernelBuildError(f"building kernel module {module} failed ({' '.join(cmd)}):\n"
                                       + (proc.stderr or proc.stdout)[-4000:])
    return BuildResult(target, module, True, time.perf_counter() - t0)


@contextlib.contextmanager
def _blas_alone():
    """While a kernel module loads: ``scipy.linalg`` as a bare package, so
    that importing its ``cython_blas`` (the kernels' BLAS) runs none of
    ``scipy.linalg``'s own initialisation, its LAPACK and BLAS wrappers and
    the rest: 27 MB of a process's memory here, against 1 MB for
    ``cython_blas`` alone, and every worker would hold them. A process that
    has ``scipy.linalg`` keeps it; one that imports it later gets all of it
    then (``cython_blas`` among it by import, ``from scipy.linalg import
    cython_blas``, not as an attribute of the package), and a thread that
    imports it during the load gets a module that hands on the whole one's
    names."""
    if "scipy.linalg" in sys.modules:
        yield
        return
    try:
        spec = importlib.util.find_spec("scipy.linalg")
    except ImportError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        yield  # (the import fails as it would have, and says why)
        return
    bare = types.ModuleType("scipy.linalg")
    bare.__path__ = list(spec.submodule_search_locations)

    def whole(name):
        # another thread that imports scipy.linalg meanwhile gets this module: it hands on the real one's
        # attributes, importing it then (the import system reads only __path__ and dunders it has)
        if name.startswith("__"):
            raise AttributeError(name)
        if sys.modules.get("scipy.linalg") is bare:
            del sys.modules["scipy.linalg"]
        return getattr(importlib.import_module("scipy.linalg"), name)
    bare.__getattr__ = whole
    sys.modules["scipy.linalg"] = bare
    try:
        yield
    finally:
        if sys.modules.get("scipy.linalg") is bare:
            del sys.modules["scipy.linalg"]


def load(path, module):
    """Import a built module from its file (once per process)."""
    with _load_lock:
        mod = _loaded.get(path)
        if mod is None:
            spec = importlib.util.spec_from_file_location(module, path)
            if spec is None:
                raise KernelBuildError(f"{path}: not a loadable module")
            mod = importlib.util.module_from_spec(spec)
            try:
                with _blas_alone():
                    spec.loader.exec_module(mod)
            except ImportError as exc:
                raise KernelBuildError(f"loading kernel module {path} failed: {exc} "
                                       f"(the kernels need scipy for BLAS: pip install scipy)") from exc
            _loaded[path] = mod
        return mod


def build_and_load(c_source, module, include_dirs=()):
    """(module object, BuildResult)."""
    result = build(c_source, module, include_dirs)
    return load(result.path, module), result
