"""Keep BLAS on one thread inside the kernels' own threads.

The generated kernels split a layer over a device's cores themselves and
call BLAS from each of those threads; a BLAS that started threads of its own
on top would oversubscribe the cores. Environment variables only work before
the library loads, so this asks the loaded OpenBLAS libraries directly
(Linux: the ones mapped into the process; the way threadpoolctl does it,
without the dependency).
"""
import ctypes

_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads64_")


def loaded_blas():
    """Paths of the OpenBLAS libraries mapped into this process (Linux), else []."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if ".so" in p)


def limit_blas_threads(n=1):
    """Set every loaded OpenBLAS to ``n`` threads; returns how many were set."""
    done = 0
    for path in loaded_blas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(ctypes.c_int(n))
                done += 1
                break
    return done
