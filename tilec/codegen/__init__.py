"""Code generation: templates -> Cython -> C -> a built module.

The only stage that imports Jinja2 and Cython. The steps, each its own
module:

1. ``render.render_module``: templates -> Cython source for the plan's dtype
2. ``cythonize.cythonize``: Cython -> C (cached: the C is what devices get)
3. ``tilec_runtime.native.build``: C -> shared library, on the device
   (cached; needs only a C compiler and the Python headers)

What each tile runs (its units, shapes and static buffer plan) is lowered
from the plan on the device itself (``tilec_runtime.lower``): it is data the
plan determines, and the device needs no planner to compute it.

Every step is keyed by its inputs in the build cache, so a second compile of
the same plan runs neither Cython nor the C compiler. ``TILEC_DEBUG=1``
prints each step with its time and whether it ran or was cached
(:mod:`tilec.debug`).
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from tilec import debug
from tilec.codegen.cythonize import cythonize
from tilec.codegen.render import render_module
from tilec_runtime import native


class KernelBundle:
    """What a device needs to run a plan with generated kernels."""

    def __init__(self, module, c_source, module_obj, built, generated):
        self.module, self.c_source = module, c_source
        self.module_obj = module_obj  # the loaded module (on the machine that built it)
        self.built, self.generated = built, generated  # whether the C compiler / Cython ran


def generate(dtypes, on_compile=None):
    """Steps 1-2: the C source of the kernel module for ``dtypes``."""
    with debug.stage("codegen render") as st:
        module, pyx = render_module(tuple(dtypes))
        st.detail = f"{module} ({'+'.join(dtypes)}): {len(pyx.splitlines())} lines of Cython"
    with debug.stage("codegen cythonize") as st:
        source = cythonize(module, pyx, on_compile)
        st.detail = f"{module}: {'ran' if source.generated else 'cached'}, {len(source.text.splitlines())} lines of C"
    return source


def build_modules(dtype_sets, progress=None):
    """Steps 1-3 for several dtype sets, in parallel (Cython and the C
    compiler are subprocesses). Returns [(module object, CSource, BuildResult)].
    ``progress(message)`` hears once if anything has to be compiled (the
    first use on a machine; later runs find everything in the cache)."""
    announced = threading.Lock()

    def announce():
        if progress and announced.acquire(blocking=False):
            progress(f"compiling kernels ({', '.join('+'.join(d) for d in dtype_sets)}): "
                     f"once on this machine, then cached ...")

    def one(dtypes):
        source = generate(dtypes, announce)
        with debug.stage("codegen build") as st:
            result = native.build(source.text, source.module, on_compile=announce)
            st.detail = f"{source.module}: {'built' if result.built else 'cached'} at {result.path}"
        return native.load(result.path, source.module), source, result

    with ThreadPoolExecutor(max_workers=max(1, min(len(dtype_sets), os.cpu_count() or 1))) as pool:
        return list(pool.map(one, [tuple(d) for d in dtype_sets]))


def compile_kernels(dtype, progress=None):
    """Steps 1-3 for one dtype: the built, loaded module and its C source."""
    (module_obj, source, result), = build_modules([(str(dtype),)], progress)
    return KernelBundle(source.module, source.text, module_obj, result.built, source.generated)
