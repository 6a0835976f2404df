"""All-reduces over the devices of a group, on any ``Comm``.

Weight gradients use a ring all-reduce: a reduce-scatter then an all-gather,
each of ``n - 1`` rounds in which every member sends one ``1/n`` chunk to
its successor in the ring (members in rank order, wrapping around). Each
member sends ``2 (n - 1) / n`` of the array whatever ``n`` is, the least
any all-reduce can, and only to one neighbour at a time.

Every chunk is summed by exactly one member and then copied to the others,
so all members end with bit-identical gradients (replicated weights never
drift apart). The summation order of a chunk starts at the member that
owns it, so a sum of three or more differs from the rank-order sum of
``Comm.allreduce_sum`` by rounding only. Batch-norm statistics keep the
rank-order all-gather of ``Comm``: they are small, and combining them in
one fixed order on every member is what keeps them identical.
"""
import numpy as np

RING_MIN_BYTES = 64 * 1024  # below this, latency dominates: one all-gather round


def use_ring(nbytes, n_members, ring_min_bytes=RING_MIN_BYTES):
    return n_members > 1 and nbytes >= ring_min_bytes


def chunk_bounds(size, parts):
    """Start offsets of ``parts`` nearly equal chunks of ``size`` elements, and the end."""
    return [size * i // parts for i in range(parts + 1)]


def ring_chunks(shape, parts):
    """Lengths of the ring chunks of an array of ``shape``."""
    b = chunk_bounds(int(np.prod(shape, dtype=np.int64)), parts)
    return [b[i + 1] - b[i] for i in range(parts)]


def ring_allreduce(comm, tag, array, members):
    """Sum of ``array`` over ``members`` (sorted ranks, this one included).

    Tags of the chunk messages: ``(step, "rs" | "ag", key, chunk)`` for a
    ``tag`` of ``(step, "g", key)``.
    """
    n = len(members)
    if n == 1:
        return array
    step, _, key = tag
    p = members.index(comm.rank)
    succ, pred = members[(p + 1) % n], members[(p - 1) % n]
    flat = np.array(array, copy=True).reshape(-1)
    b = chunk_bounds(flat.size, n)

    def chunk(c):
        return flat[b[c]:b[c + 1]]

    # Reduce-scatter: in round s, pass on chunk p - s (own part plus what
    # came before) and add the predecessor's partial of chunk p - s - 1.
    # After n - 1 rounds this member holds the full sum of chunk p + 1.
    for s in range(n - 1):
        comm.send(succ, (step, "rs", key, (p - s) % n), chunk((p - s) % n))
        c = (p - s - 1) % n
        chunk(c)[...] += comm.recv(pred, (step, "rs", key, c))
    # All-gather: pass each finished chunk on around the ring. A chunk sent
    # above is overwritten here only after it has gone round the whole ring
    # (the predecessor could not have finished it otherwise), so the queued
    # send has left this process: no copies needed.
    for s in range(n - 1):
        comm.send(succ, (step, "ag", key, (p + 1 - s) % n), chunk((p + 1 - s) % n))
        c = (p - s) % n
        chunk(c)[...] = comm.recv(pred, (step, "ag", key, c))
    return flat.reshape(array.shape)
