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

Freed arrays reach the kernel only if the allocator maps them apart: glibc
raises its mmap threshold to the size of each mapped block freed (up to 32
MB), after which arrays of the tail's size come from the heap, whose free
space it keeps. ``return_freed_arrays`` fixes the threshold, as the
``MALLOC_MMAP_THRESHOLD_`` environment variable would.
"""
import ctypes
import mmap

import numpy as np

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
MAP_APART_BYTES = 1 << 20  # arrays this large and larger are mapped apart, and unmapped when freed


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


_fixed = False


def return_freed_arrays():
    """Have the C allocator map large blocks apart and unmap them when freed
    (glibc; elsewhere nothing changes). True where it took effect."""
    global _fixed
    if not _fixed:
        try:
            libc = ctypes.CDLL(None)
            _fixed = bool(libc.mallopt(M_MMAP_THRESHOLD, MAP_APART_BYTES))
        except (OSError, AttributeError):
            return False
    return _fixed
