"""Static memory plan: offsets of a tile's buffers in one arena.

Every buffer a tile's step needs has a size and a lifetime on the step's
timeline (forward op j at time j, backward op j at time 2L-1-j for L ops).
Buffers whose lifetimes overlap get disjoint ranges; the others may share.
First fit, largest first: not optimal (that is NP-hard in general) but the
chain structure of a group leaves little to gain, and the result is checked
by ``check``.
"""
from bisect import insort

ALIGN = 16  # elements: 64 bytes for float32, so that every buffer starts on a cache line


def round_up(n):
    """``n`` rounded up to a whole number of ``ALIGN``."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_offsets(buffers):
    """``buffers``: {name: (size, first, last)} with inclusive times.
    Returns ({name: offset}, total size)."""
    placed = []  # (offset, end, first, last), kept sorted by offset
    offsets = {}
    top = 0
    for name, (size, first, last) in sorted(buffers.items(), key=lambda kv: (-kv[1][0], kv[0])):
        if size <= 0:
            offsets[name] = 0
            continue
        offset = 0
        for o, e, f, l in placed:
            if f > last or first > l:
                continue  # not alive at the same time
            if offset + size <= o:
                break
            if e > offset:
                offset = e
        offsets[name] = offset
        end = offset + round_up(size)
        if end > top:
            top = end
        insort(placed, (offset, end, first, last))
    return offsets, top


def check(buffers, offsets, total):
    """Raise ValueError if two buffers live at once and overlap, or one overruns."""
    items = [(n, offsets[n], offsets[n] + s, f, l) for n, (s, f, l) in buffers.items() if s > 0]
    for n, o, e, _, _ in items:
        if o < 0 or e > total:
            raise ValueError(f"buffer {n} [{o}, {e}) outside the arena of {total}")
    for a in range(len(items)):
        for b in range(a + 1, len(items)):
            na, oa, ea, fa, la = items[a]
            nb, ob, eb, fb, lb = items[b]
            if fa <= lb and fb <= la and oa < eb and ob < ea:
                raise ValueError(f"buffers {na} and {nb} are live together and overlap")
