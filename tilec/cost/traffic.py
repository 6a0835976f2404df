"""Bytes on the wire, read off a plan's schedule.

What a rank sends for each op of its schedule, exactly as the runtime
sends it: a message's rectangle, the batch-norm all-gathers (count, mean
and m2 forward; two sums backward, float64), and the gradient buckets
(a ring sends each of the n - 1 chunks it passes on twice; an all-gather
sends the whole array to every other member), and the all-reduces of the
tail groups split by channels. The plan report, the simulator and the cost
model all count with these functions.
"""
import numpy as np

from tilec_runtime import shards
from tilec_runtime.collectives import ring_chunks
from tilec_runtime.program import members_of, param_shapes


def bn_bytes(kind, filters):
    """One member's contribution to a batch-norm all-gather."""
    return 8 * (1 + 2 * filters) if kind == "bn_stats" else 8 * 2 * filters


def reduce_bytes(shape, members, rank, algorithm, itemsize):
    """Bytes ``rank`` sends to all-reduce one gradient of ``shape``."""
    n = len(members)
    if n < 2:
        return 0
    if algorithm == "ring":
        lengths = ring_chunks(shape, n)
        p = members.index(rank)
        sent = [(p - s) % n for s in range(n - 1)] + [(p + 1 - s) % n for s in range(n - 1)]
        return sum(lengths[c] for c in sent) * itemsize
    return (n - 1) * int(np.prod(shape)) * itemsize


def param_shape_table(program):
    return {k: s for layer in program for k, s in param_shapes(layer).items()}


def op_sent_bytes(plan, rank, op, shapes=None):
    """Bytes ``rank`` puts on the wire for ``op`` of its schedule."""
    kind = op["op"]
    if kind == "send":
        m = plan["messages"][op["msg"]]
        return 0 if m["receiver"] == rank else m["bytes"]
    if kind in ("bn_stats", "bn_grad"):
        members = members_of(plan["groups"][op["group"]])
        return (len(members) - 1) * bn_bytes(kind, plan["program"][op["layer"]]["filters"])
    if kind == "chan_reduce":
        _, shape, members, ring = shards.op_reduce(plan, op)
        return reduce_bytes(shape, members, rank, "ring" if ring else "gather", np.dtype(plan["dtype"]).itemsize)
    if kind == "grad_start":
        bucket = plan["buckets"][op["bucket"]]
        shapes = shapes or param_shape_table(plan["program"])
        item = np.dtype(plan["dtype"]).itemsize
        return sum(reduce_bytes(shapes[key], bucket["members"], rank, algorithm, item)
                   for key, algorithm in bucket["reduce"].items())
    return 0


def bytes_sent(plan):
    """Bytes each device sends per training step, by rank: (messages, collectives)."""
    n = len(plan["devices"])
    shapes = param_shape_table(plan["program"])
    msgs, coll = [0] * n, [0] * n
    for r, ops in enumerate(plan["schedule"]):
        for op in ops:
            nbytes = op_sent_bytes(plan, r, op, shapes)
            if op["op"] == "send":
                msgs[r] += nbytes
            else:
                coll[r] += nbytes
    return msgs, coll
