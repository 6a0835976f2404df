"""Memory a device gives back to the system while its tail runs
(``tilec_runtime.pages``): the scratch's pages, and the tail's freed arrays."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tilec_runtime import pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident pages read from /proc")


def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@linux
def test_a_released_scratch_leaves_memory_and_comes_back_zeroed():
    mb = 1 << 20
    scratch = pages.Scratch(64 * mb)
    before = resident()
    scratch.array[:] = 7
    filled = resident()
    assert filled - before >= 60 * mb
    scratch.release()
    assert filled - resident() >= 60 * mb
    assert not scratch.array[::4096].any()  # (what it held is gone)
    scratch.array[:mb] = 1  # and it is usable again, a page at a time
    assert scratch.array[:mb].all() and resident() - (filled - 64 * mb) < 8 * mb


FREED = textwrap.dedent("""
    import sys
    import numpy as np
    from tilec_runtime import pages
    if sys.argv[1] == "fixed":
        assert pages.fix_mmap_threshold()
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    base, held = resident(), []
    for step in range(3):  # as a tail's steps: arrays of a few MB, and small ones that stay between them
        big = [np.ones(6 << 17) for _ in range(14)]  # 6 MB each: above the fixed threshold
        held += [np.ones(1000) for _ in range(40)]
        del big
    print((resident() - base) // (1 << 20))
""")


@linux
def test_freed_arrays_reach_the_system_once_the_threshold_is_fixed():
    """Without it glibc serves arrays of a tail's size from its heap after
    the first is freed, and keeps them (the control run shows it); a worker
    fixes it at its start."""
    def left(mode):
        out = subprocess.run([sys.executable, "-c", FREED, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)
    assert left("fixed") < 8
    assert left("default") >= 64  # (control: 84 MB of freed arrays stay in the heap)


def test_a_released_scratch_is_a_byte_array_of_its_size():
    scratch = pages.Scratch(1000)
    assert scratch.array.dtype == np.uint8 and scratch.array.nbytes == 1000 and not scratch.array.any()
    scratch.array[:] = 3
    scratch.release()
    pages.Scratch(0).release()  # (a rank without tiles has an empty one)
