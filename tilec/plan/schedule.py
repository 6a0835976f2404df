"""The schedule of a training step: for every rank, the ordered ops it runs.

The schedule is data (plan.json, ``schedule``): the runtime executes exactly
this list, and the simulator, the plan report, the cost model and the
runtime's frame validation read it; nothing derives it a second time. The
ops of one rank, in order:

``send``/``recv`` ``msg``
    a message of the plan's ``messages`` table (sender, receiver, tensor,
    rectangle, phase). A send is posted as soon as its data is final; a
    receive waits for it and copies it into place (forward) or adds it
    (backward: partial gradients are summed by their owners). A ``relay``
    message passes on a slice of a channel group's input that its sender
    received from the one device holding the map (to the other members
    after the sender's own receives; backward, each member's partial
    gradient of a slice to the member that relayed it, after its backward,
    before that member returns the slice's sum).
``conv_fwd``/``epi_fwd``/``pool_fwd`` ``group unit [rows]``
    one unit of a tile (``tilec_runtime.lower.units``): the convolution
    with its local batch-norm statistics (optionally only some output
    ``rows``, half-open, relative to the tile's region: the rows whose input
    is already here run while the halo is on the way), then batch norm or
    bias, the activation and a fused max-pool; or a max-pool alone.
``bn_stats``/``bn_grad`` ``group unit layer``
    the batch-norm all-reduce of a split group (count, mean and m2 forward;
    the two gradient sums backward), combined in rank order on every member.
``recompute`` ``group``
    a group that kept only its input runs its forward again, with the
    batch-norm statistics of the step's forward.
``grad_zero``
    the gradient buffers that receive backward messages start at zero.
``epi_bwd``/``bn_grad``/``conv_bwd``/``pool_bwd`` ``group unit``
    backward of a unit; ``conv_bwd`` adds the weight gradient into the
    parameter's accumulator (the momentum buffer, see ``buckets``).
``tail_fwd``/``tail_bwd`` ``group``
    a tail group on one device: its layers on whole maps (and the loss).
``chan_fwd``/``chan_reduce``/``chan_post``/``chan_bwd`` ``group layer``
    a tail group split by channels (``tilec_runtime.shards``): a layer's
    share of the forward; for a layer split by input channels the
    all-reduce of its partial sums (``phase`` forward) and then its bias or
    batch norm and activation (``chan_post``, backward ``chan_post_bwd``);
    backward, a layer's share, and the all-reduce of an A layer's partial
    input gradient (``phase`` backward) where its input comes from inside
    the group, and of the group's input gradient (``phase`` input) where
    its input is the replicated output of a group on the same devices.
    Such an A layer's backward runs in two parts (``part`` "input" and
    "weight"), with its all-reduce between them marked ``overlap``: it runs
    on the communication thread while the weight gradient is computed.
    A B layer's sums may be cut into ``slices`` of its output channels
    (``tilec_runtime.shards.forward_slices``): ``chan_fwd`` and an
    overlapped ``chan_reduce`` per ``slice``, so that each slice is summed
    while the next is computed; then per slice its ``chan_post`` and the
    next (A) layer's ``chan_fwd`` over those of its input channels, and that
    layer's ``chan_post`` (its batch norm and activation) once all are in.
``chan_wait`` ``group layer phase [slice]``
    the overlapped all-reduce is done; its sum joins the gradients.
``scratch_release``
    the tiles' scratch gives its pages back (``tilec_runtime.pages``):
    before the rank's first tail group, where its tail holds enough to pay
    for touching the pages again (``tilec.plan.build.releasing``).
``tail_free`` ``group``
    after a tail group's backward, on such a rank: it lets go of its
    activations, so that the tiles' backward finds the memory free.
``grad_start`` ``bucket``
    the bucket's gradients are final on this rank: sum them over its
    members (ring or all-gather) and update those parameters, on the
    communication thread, while backward goes on.
``grad_wait``
    every bucket of the step is summed and applied.

Buckets (``buckets``): one per conv unit of a tiled group and one for the
tail: its parameter keys, the keys whose gradients are partial sums that
its members all-reduce (weights and biases of a split group; batch-norm
gamma and beta are computed from all-reduced sums and are already whole),
and the algorithm per reduced key.
"""
import numpy as np

from tilec_runtime import shards
from tilec_runtime.collectives import RING_MIN_BYTES, use_ring
from tilec_runtime.geometry import Region
from tilec_runtime.lower import outside_tensors, produced_by, units
from tilec_runtime.program import members_of, param_shapes


def tile_of(group, rank):
    return next((t for t in group["tiles"] if t["device"] == rank), None)


def unit_layers(unit):
    return [i for i in unit if i is not None]


def _index(messages, n):
    """Message indices by (group or tensor, rank) and direction (relayed
    ones apart: ``_relays``)."""
    fwd_in, fwd_out, bwd_in, bwd_out = {}, {}, {}, {}
    for k, m in enumerate(messages):
        if m.get("relay"):
            continue
        if m["phase"] == "forward":
            fwd_in.setdefault((m["group"], m["receiver"]), []).append(k)
            fwd_out.setdefault((m["tensor"], m["sender"]), []).append(k)
        else:
            bwd_in.setdefault((m["tensor"], m["receiver"]), []).append(k)
            bwd_out.setdefault((m["group"], m["sender"]), []).append(k)
    return fwd_in, fwd_out, bwd_in, bwd_out


def _relays(messages):
    """{(group, rank, phase, "send" | "recv"): message indices} of the
    messages a group's members pass on to one another
    (``tilec.analysis.tail.relayed``)."""
    out = {}
    for k, m in enumerate(messages):
        if m.get("relay"):
            out.setdefault((m["group"], m["sender"], m["phase"], "send"), []).append(k)
            out.setdefault((m["group"], m["receiver"], m["phase"], "recv"), []).append(k)
    return out


def _local_first(ks, messages, rank):
    return sorted(ks, key=lambda k: (messages[k]["sender"] != rank, k))


def interior_rows(program, tile, unit, local):
    """Output rows (half-open, relative to the tile's region) of a unit's
    conv that read only the ``local`` part of the group input (a Region),
    or None. Only a conv whose source columns the local part spans whole."""
    conv = unit[0]
    if conv is None or local is None:
        return None
    layer = program[conv]
    tl = next(t for t in tile["layers"] if t["layer"] == conv)
    src, region = Region.of(tl["src"]), Region.of(tl["region"])
    if not (local.cols[0] <= src.cols[0] and src.cols[1] <= local.cols[1]):
        return None
    k, s, p = layer["size"], layer["stride"], layer["pad"]
    h_in = layer["in_shape"][1]
    inside = [y for y in range(region.rows[0], region.rows[1] + 1)
              if local.rows[0] <= max(y * s - p, 0) and min(y * s - p + k - 1, h_in - 1) <= local.rows[1]]
    if not inside:
        return None
    lo, hi = inside[0] - region.rows[0], inside[-1] - region.rows[0] + 1
    return (lo, hi) if hi - lo == len(inside) else None


def group_forward(program, g, group, rank, outside, recvs, sends, bn_sync, messages=None, interior=True):
    """Forward ops of ``rank``'s tile of tiled group ``g``. ``recvs``: the
    messages into its input; ``sends(layer)``: the messages carrying a
    layer's output; ``bn_sync``: whether batch norm is all-reduced."""
    tile = tile_of(group, rank)
    first, last = group["layers"]
    us = units(program, first, last, outside)
    ops = []
    split = None
    if interior and messages is not None and recvs:
        local = [Region.of((messages[k]["rows"], messages[k]["cols"])) for k in recvs if messages[k]["sender"] == rank]
        remote = [k for k in recvs if messages[k]["sender"] != rank]
        if remote and len(local) == 1:
            split = interior_rows(program, tile, us[0], local[0])
    if split is None:
        ops += [{"op": "recv", "msg": k} for k in recvs]
    else:
        ops += [{"op": "recv", "msg": k} for k in recvs if messages[k]["sender"] == rank]
    for j, unit in enumerate(us):
        conv, pool = unit
        if conv is not None:
            if j == 0 and split is not None:
                h = Region.of(next(t for t in tile["layers"] if t["layer"] == conv)["region"]).height
                ops.append({"op": "conv_fwd", "group": g, "unit": j, "rows": list(split)})
                ops += [{"op": "recv", "msg": k} for k in recvs if messages[k]["sender"] != rank]
                for rows in ((0, split[0]), (split[1], h)):
                    if rows[1] > rows[0]:
                        ops.append({"op": "conv_fwd", "group": g, "unit": j, "rows": list(rows)})
            else:
                ops.append({"op": "conv_fwd", "group": g, "unit": j})
            if program[conv]["bn"] and bn_sync:
                ops.append({"op": "bn_stats", "group": g, "unit": j, "layer": conv})
            ops.append({"op": "epi_fwd", "group": g, "unit": j})
        else:
            if j == 0 and split is not None:
                ops += [{"op": "recv", "msg": k} for k in recvs if messages[k]["sender"] != rank]
            ops.append({"op": "pool_fwd", "group": g, "unit": j})
        for layer in unit_layers(unit):
            ops += [{"op": "send", "msg": k} for k in sends(layer)]
    return ops


def group_backward(program, g, group, rank, outside, recvs, sends, bn_sync, buckets_of):
    """Backward ops of ``rank``'s tile of tiled group ``g``. ``recvs(layer)``:
    the gradient messages for a layer's output; ``sends``: the partial
    input gradients it returns; ``buckets_of(unit)``: bucket ids a unit's
    gradients complete."""
    first, last = group["layers"]
    us = units(program, first, last, outside)
    ops = [{"op": "recv", "msg": k} for k in recvs(produced_by(us[-1]))]
    if group.get("recompute"):
        ops.append({"op": "recompute", "group": g})
    for j in range(len(us) - 1, -1, -1):
        conv, pool = us[j]
        if j < len(us) - 1:
            for layer in unit_layers(us[j]):
                ops += [{"op": "recv", "msg": k} for k in recvs(layer)]
        if conv is not None:
            ops.append({"op": "epi_bwd", "group": g, "unit": j})
            if program[conv]["bn"] and bn_sync:
                ops.append({"op": "bn_grad", "group": g, "unit": j, "layer": conv})
            ops.append({"op": "conv_bwd", "group": g, "unit": j})
            ops += [{"op": "grad_start", "bucket": b} for b in buckets_of(j)]
        else:
            ops.append({"op": "pool_bwd", "group": g, "unit": j})
    ops += [{"op": "send", "msg": k} for k in sends]
    return ops


def channel_forward(program, g, group, sends, batch, itemsize):
    """Forward ops of a member of a channel-split tail group."""
    first, last = group["layers"]
    r = shards.roles(program, first, last)
    ops = []
    i = first
    while i <= last:
        pieces = shards.forward_slices(program[i], batch, itemsize) if r[i] == "B" else 1
        if r[i] != "B":
            ops.append({"op": "chan_fwd", "group": g, "layer": i})
        elif pieces == 1:
            ops += [{"op": "chan_fwd", "group": g, "layer": i},
                    {"op": "chan_reduce", "group": g, "layer": i, "phase": "forward"},
                    {"op": "chan_post", "group": g, "layer": i}]
        else:  # each slice of the sums is all-reduced while the next is computed
            for p in range(pieces):
                ops += [{"op": "chan_fwd", "group": g, "layer": i, "slice": p, "slices": pieces},
                        {"op": "chan_reduce", "group": g, "layer": i, "phase": "forward", "slice": p,
                         "slices": pieces, "overlap": True}]
            a = shards.takes_slices(r, last, i)
            for p in range(pieces):
                ops.append({"op": "chan_wait", "group": g, "layer": i, "phase": "forward", "slice": p})
                if a is not None:  # the slice's batch norm and activation, and the next layer's sums over it
                    ops += [{"op": "chan_post", "group": g, "layer": i, "slice": p, "slices": pieces},
                            {"op": "chan_fwd", "group": g, "layer": a, "slice": p, "slices": pieces}]
            if a is None:
                ops.append({"op": "chan_post", "group": g, "layer": i})
            else:  # the A layer ran with it: its post, and both layers' sends
                ops += [{"op": "send", "msg": k} for k in sends(i)]
                ops.append({"op": "chan_post", "group": g, "layer": a})
                i = a
        ops += [{"op": "send", "msg": k} for k in sends(i)]
        i += 1
    return ops


def channel_backward(program, g, group):
    """Backward ops of a member of a channel-split tail group."""
    first, last = group["layers"]
    r = shards.roles(program, first, last)
    ops = []
    for layer in reversed(program[first:last + 1]):
        i = layer["index"]
        if r[i] == "B":
            ops.append({"op": "chan_post_bwd", "group": g, "layer": i})
        if shards.reduces_input_grad(r, first, i):
            # the partial input gradient first: its all-reduce runs while the weight gradient is computed
            ops += [{"op": "chan_bwd", "group": g, "layer": i, "part": "input"},
                    {"op": "chan_reduce", "group": g, "layer": i, "phase": "backward", "overlap": True},
                    {"op": "chan_bwd", "group": g, "layer": i, "part": "weight"},
                    {"op": "chan_wait", "group": g, "layer": i, "phase": "backward"}]
        else:
            ops.append({"op": "chan_bwd", "group": g, "layer": i})
    if group.get("reduce_input"):
        ops.append({"op": "chan_reduce", "group": g, "layer": first, "phase": "input"})
    return ops


def make_buckets(program, groups, itemsize, ring_min_bytes=RING_MIN_BYTES):
    """The gradient buckets of a step (see the module docstring)."""
    outside = set()  # fusion does not change which keys a unit holds
    buckets = []
    for g, group in enumerate(groups):
        first, last = group["layers"]
        members = members_of(group)
        if group["kind"] == "tail":
            keys = sorted(k for layer in program[first:last + 1] for k in param_shapes(layer))
            if keys:
                buckets.append({"group": g, "unit": None, "members": members, "keys": keys, "reduce": {}})
            continue
        for j, unit in enumerate(units(program, first, last, outside)):
            conv = unit[0]
            if conv is None:
                continue
            shapes = param_shapes(program[conv])
            reduce = {}
            if len(members) > 1:
                for key, shape in shapes.items():
                    if ".bn." not in key:
                        nbytes = int(np.prod(shape)) * itemsize
                        reduce[key] = "ring" if use_ring(nbytes, len(members), ring_min_bytes) else "gather"
            buckets.append({"group": g, "unit": conv, "members": members, "keys": sorted(shapes),
                            "reduce": reduce})
    return buckets


def build_schedule(program, groups, messages, n_devices, buckets, interior=True, batch=1, itemsize=4, release=()):
    """[ops of rank r for r in range(n_devices)] of one training step
    (``batch`` and ``itemsize`` size the slices of a B layer's sums).
    ``release``: ranks that give their tiles' scratch back before their
    first tail group's forward and let go of each tail group's activations
    after its backward (the tiles' forward is over by then, and their
    backward not begun)."""
    outside = outside_tensors({"messages": messages})
    fwd_in, fwd_out, bwd_in, bwd_out = _index(messages, n_devices)
    relays = _relays(messages)

    def relay(g, r, phase):  # what a member passes on of what it received, then what the others pass it
        return [{"op": op, "msg": k} for op in ("send", "recv") for k in relays.get((g, r, phase, op), [])]
    bucket_ids = {}
    for b, bucket in enumerate(buckets):
        bucket_ids.setdefault((bucket["group"], bucket["unit"]), []).append(b)
    schedule = []
    for r in range(n_devices):
        ops = []
        for g, group in enumerate(groups):
            if tile_of(group, r) is None:
                continue
            recvs = _local_first(fwd_in.get((g, r), []), messages, r)
            if group["kind"] == "tail":
                if r in release and not any(op["op"] == "scratch_release" for op in ops):
                    ops.append({"op": "scratch_release"})
                ops += [{"op": "recv", "msg": k} for k in recvs] + relay(g, r, "forward")
                if group.get("mode", "one") == "channels":
                    ops += channel_forward(program, g, group, lambda t: fwd_out.get((t, r), []), batch, itemsize)
                else:
                    ops.append({"op": "tail_fwd", "group": g})
                    first, last = group["layers"]
                    for t in range(first, last + 1):
                        ops += [{"op": "send", "msg": k} for k in fwd_out.get((t, r), [])]
                continue
            bn_sync = len(members_of(group)) > 1
            ops += group_forward(program, g, group, r, outside, recvs, lambda t: fwd_out.get((t, r), []), bn_sync,
                                 messages, interior)
        ops.append({"op": "grad_zero"})
        for g in range(len(groups) - 1, -1, -1):
            group = groups[g]
            if tile_of(group, r) is None:
                continue
            sends = [{"op": "send", "msg": k} for k in bwd_out.get((g, r), [])]
            if group["kind"] == "tail":
                first, last = group["layers"]
                grads_in = [{"op": "recv", "msg": k} for t in range(first, last + 1)
                            for k in _local_first(bwd_in.get((t, r), []), messages, r)]
                if group.get("mode", "one") == "channels":
                    # (its input's gradient, summed slice by slice by the members that relayed it, goes back after)
                    ops += grads_in + channel_backward(program, g, group) + relay(g, r, "backward")
                else:
                    ops += grads_in + [{"op": "tail_bwd", "group": g}]
                ops += sends
                ops += [{"op": "grad_start", "bucket": b} for b in bucket_ids.get((g, None), [])]
                if r in release:
                    ops.append({"op": "tail_free", "group": g})
                continue
            first, last = group["layers"]
            us = units(program, first, last, outside)
            ops += group_backward(
                program, g, group, r, outside,
                lambda t: _local_first(bwd_in.get((t, r), []), messages, r), bwd_out.get((g, r), []),
                len(members_of(group)) > 1,
                lambda j, g=g, us=us: bucket_ids.get((g, us[j][0]), []))
        ops.append({"op": "grad_wait"})
        schedule.append([_fed(op, messages) for op in ops])
    return schedule


def _fed(op, messages):
    """The image's pieces come from the data source (the launcher streams
    every device its own, batches ahead), not from rank 0 at the start of
    the step: an ``input`` op where the receiver's ``recv`` would be."""
    if op["op"] == "recv" and messages[op["msg"]]["tensor"] == -1:
        return {"op": "input", "msg": op["msg"]}
    return op
