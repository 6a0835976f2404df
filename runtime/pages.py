"""Memory a device gives back to the system between the phases of a step.

A device's tiles share one scratch (``tilec_runtime.lower.scratch_buffers``)
for what lives only within one kernel call or one tile's backward; between
the last tile's forward and the first tile's backward it holds nothing.
The tail groups run in between, and their activations and temporaries
come and go within that time. Where both are large (``scratch_release`` in
the plan's schedule: ``tilec_runtime.footprint.RELEASE_MIN_BYTES``), the scratch
gives its pages back to the kernel before the tail (``madvise
MADV_DONTNEED``: the mapping stays, the next write faults in zeroed pages)
and the tail groups let go of their arrays after their backward
(``tail_free``), so the device's peak is the larger of the two, not both.

Giving pages back costs their first touch again: measured here (x86-64
under KVM) 0.65 ms per MB released and written again, against 0.05 ms per
MB for a plain write: 60 ms for the 96 MB scratch of YOLOv2 at batch 8 on
six devices, a step of 76 s on Pi 3s.

Freed arrays reach the kernel only if the allocator maps them apart
(``fix_mmap_threshold``, which a worker process sets at its start) or is
asked to give its free pages back (``trim``, after each ``tail_free``).
"""
import ctypes
import functools
import mmap

import numpy as np

# glibc's malloc raises its mmap threshold (up to 32 MiB) whenever a large block is freed, so a step's
# numpy temporaries (the tail's) then come from the heap, which keeps what it fragments: measured on
# YOLOv2 at 608, batch 1, 2 workers, each worker's peak grew by 27 and 13 MB after the first step. A fixed
# threshold keeps blocks of 4 MiB and more in mmap, returned when freed (measured there: the same step time;
# with 1 MiB steps were 5-10% slower, paying page faults for mid-size arrays each step).
MMAP_THRESHOLD = 4 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
# Fixing the mmap threshold also fixes the trim threshold at its default (128 KiB): every freed block at
# the top of the heap went back to the system, and the next step's temporaries of a few MB page-faulted
# afresh. Measured: a 128-of-256-filter 3x3 conv on 26x26 (im2col workspace 3.1 MB) took 4.1 ms instead
# of 2.5. The heap may keep this much free at its top (less than a 4 MiB block times the few alive at once).
TRIM_THRESHOLD = 32 << 20


class Scratch:
    """``nbytes`` of zeroed memory as a uint8 array whose pages can be given back."""

    def __init__(self, nbytes):
        self.nbytes = int(nbytes)
        # private: a shared anonymous mapping keeps its pages in shmem when they are unmapped
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        self._map = mmap.mmap(-1, max(self.nbytes, 1), flags=flags) if flags else mmap.mmap(-1, max(self.nbytes, 1))
        self.array = np.frombuffer(self._map, np.uint8, count=self.nbytes)

    def release(self):
        """Give the pages back; the content is lost (it reads as zeros)."""
        if self.nbytes and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)


@functools.lru_cache(maxsize=None)
def _libc():
    """The C library of this process (glibc's malloc tuning lives there), or None."""
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def trim():
    """Give the system the C heap's free memory back (glibc's
    ``malloc_trim``: the free pages inside the heap too, not only at its
    top); elsewhere nothing. After a tail group lets go of its arrays, most
    of which are below the mmap threshold: without it the heap keeps them,
    and the tiles' backward, touching the scratch again, adds to them
    (measured, YOLOv2 at batch 2 on 2 workers: 763 MB at the peak without,
    713 MB with; 0.4-4 ms a call)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def fix_mmap_threshold():
    """Stop glibc's malloc from keeping freed temporaries (see ``MMAP_THRESHOLD``); elsewhere a no-op.
    True where it took effect."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
