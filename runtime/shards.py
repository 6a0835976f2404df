"""Channel parallelism: how the layers of a channel-split group are cut.

After the tiled prefix the maps are small and the weights large. A group of
such layers may run on a set of devices split by channels (tensor
parallelism), in pairs, so that a pair needs one collective:

- an *A* layer (the 1st, 3rd, ... conv or connected layer of the group) is
  split by output channels: each member holds its rows of the weights (and
  their bias or batch-norm channels) and computes its channels from the
  whole input; batch norm needs no synchronisation (a member has every
  position of its channels);
- a *B* layer (the 2nd, 4th, ...) is split by input channels, the ones the
  member's A produced: each member computes a partial sum of the whole
  output, an all-reduce completes it, and every member then applies the
  bias or batch norm and the activation to all channels (the same numbers
  on every member, so B's bias and batch-norm parameters are replicated);
- max- and average-pooling work on whatever a member holds (per channel);
- a sum-of-squares cost, the program's last layer, too: each member sums
  the squared errors of the channels it holds against those channels of
  the targets (which the launcher sends it), and its gradient is its own;
  the step's loss is the members' sum, in rank order. Where the group's
  last map is replicated, every member computes the whole cost's gradient
  and the first member alone counts its loss. No map and no gradient goes
  to one device and back for the loss.

A group may start with a route: every member assembles its whole map from
the route's inputs, which it receives whole (YOLOv2's route 28 of layers
27 and 24, before layer 29 split by channels: the members already hold
layer 24 between them, so nothing goes to one device and back).

The group's input is replicated on every member; its output is
replicated (it ends after a B) or split by channels (after an A). Backward
mirrors forward: the partial input gradients of an A are all-reduced (or,
for the group's input, summed by its producer), and every weight gradient
is whole on the member that holds those weights: nothing else is reduced.

Everything here is plain integer arithmetic on the program, so the planner
(messages, memory, costs) and every device (which slices it holds) agree.
"""
import numpy as np

# members' channels are cut into nearly equal parts by the same rule as a ring's chunks (the planner
# calls it by this name)
from tilec_runtime.collectives import chunk_bounds as part_bounds, use_ring
from tilec_runtime.program import members_of

# (a cost, like every loss, is the program's last layer: ``program.validate``)
SPLITTABLE = ("conv", "connected", "maxpool", "avgpool", "local_avgpool", "cost")
WEIGHTED = ("conv", "connected")


def roles(program, first, last):
    """{layer: "A" | "B" | "local"} of program[first..last] split by channels."""
    out, weighted = {}, 0
    for layer in program[first:last + 1]:
        if layer["kind"] in WEIGHTED:
            out[layer["index"]] = "A" if weighted % 2 == 0 else "B"
            weighted += 1
        else:
            out[layer["index"]] = "local"
    return out


def layouts(program, first, last, k):
    """{layer: None (whole) or [channel bounds of the k members]} of every
    output of the group: what each member holds of it."""
    r = roles(program, first, last)
    out, held = {}, None
    for layer in program[first:last + 1]:
        i = layer["index"]
        if r[i] == "A":
            held = part_bounds(layer["out_shape"][0], k)
        elif r[i] == "B":
            held = None
        out[i] = held
    return out


def check(program, first, last, k):
    """None if program[first..last] can be split over ``k`` devices, else why not."""
    if not any(layer["kind"] in WEIGHTED for layer in program[first:last + 1]):
        # pooling alone would be computed whole by every member, its input gradient returned k times
        return "it has no conv or connected layer to split"
    for layer in program[first:last + 1]:
        if layer["kind"] not in SPLITTABLE and not (layer["kind"] == "route" and layer["index"] == first):
            return f"layer {layer['index']} ({layer['kind']}) needs the whole map"
        if layer["index"] > first and layer["inputs"] != [layer["index"] - 1]:
            return f"layer {layer['index']} reads an earlier layer than the one before it"
        if layer["kind"] in WEIGHTED and layer["out_shape"][0] < k and roles(program, first, last)[
                layer["index"]] == "A":
            return f"layer {layer['index']} has {layer['out_shape'][0]} output channels for {k} devices"
    return None


REDUCE_PHASES = ("forward", "backward", "input")


MAX_SLICES = 4
# A B layer's sums are cut into slices of output channels, each all-reduced (on the communication
# thread) while the next is computed, when a slice still holds this many bytes: below it, the ring's
# 2 (k - 1) rounds of latency per slice cost more than the overlap saves.
SLICE_MIN_BYTES = 256 * 1024


def forward_slices(layer, batch, itemsize):
    """How many slices of its output channels B layer ``layer``'s forward
    sums are all-reduced in (1: all at once, after they are computed)."""
    channels = layer["out_shape"][0]
    nbytes = batch * channels * layer["out_shape"][1] * layer["out_shape"][2] * itemsize
    return max(1, min(MAX_SLICES, channels, nbytes // SLICE_MIN_BYTES))


def takes_slices(roles_, last, i):
    """The A layer right after B layer ``i`` of a group ending at ``last``
    (``roles_``: its ``roles``), which sums B's output slice by slice as
    each is final (None if there is none)."""
    return i + 1 if i < last and roles_.get(i + 1) == "A" else None


def reduces_input_grad(roles_, first, i):
    """Whether layer ``i`` of a group starting at ``first`` is an A layer
    whose input gradient is partial and all-reduced by the members: a split
    layer comes before it in the group (the first A's goes back to the
    group's input, where its producer sums it)."""
    return roles_[i] == "A" and any(roles_[j] != "local" for j in range(first, i))


def reduce_id(layer, phase, piece=0):
    """The id of a channel group's all-reduce at ``layer``: a B layer's sums
    (``phase`` forward; ``piece``: which slice of them), an A layer's partial
    input gradient (backward), or the group's input gradient (input: the
    group's input is the replicated output of a group on the same devices,
    whose every member needs it)."""
    return (3 * layer + REDUCE_PHASES.index(phase)) * MAX_SLICES + piece


def reduce_shape(program, layer, phase, batch, piece=None, pieces=1):
    """Shape of the array that all-reduce sums (slice ``piece`` of ``pieces``)."""
    layer = program[layer]
    shape = list(layer["out_shape"] if phase == "forward" else layer["in_shape"])
    if piece is not None:
        bounds = part_bounds(shape[0], pieces)
        shape[0] = bounds[piece + 1] - bounds[piece]
    return (batch, *shape)


def op_reduce(plan, op):
    """(id, shape, members, ring?) of the all-reduce of schedule op ``op``
    (a ``chan_reduce``) of ``plan``: what the executor runs, the frame
    table expects, the simulator and the traffic count price."""
    piece = op.get("slice")
    shape = reduce_shape(plan["program"], op["layer"], op["phase"], plan["batch"], piece, op.get("slices", 1))
    members = members_of(plan["groups"][op["group"]])
    nbytes = int(np.prod(shape)) * np.dtype(plan["dtype"]).itemsize
    return (reduce_id(op["layer"], op["phase"], piece or 0), shape, members,
            use_ring(nbytes, len(members), plan["ring_min_bytes"]))


def input_bounds(layer, held_in):
    """Bounds of a B layer's input that each member holds, in the layer's
    own input features: channels for a conv, flattened C*H*W positions for
    a connected layer (channel-major, so a channel range is contiguous)."""
    _, h, w = layer["in_shape"]
    scale = 1 if layer["kind"] == "conv" else h * w
    return [b * scale for b in held_in]


def param_slices(program, first, last, k):
    """{key: (axis, [bounds of the k members])} of the parameters and
    buffers split over the members (the rest are replicated whole)."""
    r, held = roles(program, first, last), layouts(program, first, last, k)
    out = {}
    prev = None
    for layer in program[first:last + 1]:
        i, kind = layer["index"], layer["kind"]
        if r[i] == "A":
            bounds = held[i]
            if kind == "conv":
                out[f"{i}.conv.weight"] = (0, bounds)
                if layer["bn"]:
                    for key in ("bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
                        out[f"{i}.{key}"] = (0, bounds)
                else:
                    out[f"{i}.conv.bias"] = (0, bounds)
            else:
                out[f"{i}.fc.weight"] = (0, bounds)
                out[f"{i}.fc.bias"] = (0, bounds)
        elif r[i] == "B":
            bounds = input_bounds(layer, held[prev])
            out[f"{i}.conv.weight" if kind == "conv" else f"{i}.fc.weight"] = (1, bounds)
        prev = i
    return out


def share(program, first, last, k, member, i):
    """Layer ``i`` as ``member`` computes it: its own channels in and out (an
    A layer's output channels, a B layer's input channels, pooling on what
    the member holds). A B layer's output stays whole (a partial sum)."""
    layer = program[i]
    if layer["kind"] == "route":  # (a group's first layer: every member assembles the whole map)
        return dict(layer)
    held = layouts(program, first, last, k)
    role = roles(program, first, last)[i]
    c, h, w = layer["in_shape"]
    held_in = held.get(i - 1) if i > first else None
    if held_in is not None:
        c = held_in[member + 1] - held_in[member]
    out = list(layer["out_shape"])
    if role == "A":
        mine = held[i][member + 1] - held[i][member]
        return dict(layer, in_shape=[c, h, w], out_shape=[mine, *out[1:]],
                    **({"filters": mine} if layer["kind"] == "conv" else {"output": mine}))
    if role == "local":
        return dict(layer, in_shape=[c, h, w], out_shape=[c, *out[1:]])
    return dict(layer, in_shape=[c, h, w])


def loss_group(plan):
    """The group that computes the loss (the one holding the program's last layer)."""
    last = len(plan["program"]) - 1
    return next(g for g in plan["groups"] if g["layers"][0] <= last <= g["layers"][1])


def target_part(plan, rank):
    """What ``rank`` takes of each step's targets: None (it computes no
    part of the loss), ``"all"``, or (c0, c1): channels c0..c1-1 of a
    sum-of-squares cost split by channels (those its input holds here)."""
    group = loss_group(plan)
    members = members_of(group)
    if rank not in members:
        return None
    if group.get("mode") != "channels":
        return "all" if rank == members[0] else None
    first, last = group["layers"]
    held = layouts(plan["program"], first, last, len(members))[last]
    if held is None:
        return "all"
    m = members.index(rank)
    return (held[m], held[m + 1]) if held[m + 1] > held[m] else None


def cut_target(target, part):
    """The ``part`` (``target_part``) of a step's ``target``, or None."""
    if part is None or target is None:
        return None
    if part == "all":
        return target
    return np.ascontiguousarray(target[:, part[0]:part[1]])


def total_loss(losses):
    """The step's loss from every rank's part (None: no part), in rank order."""
    parts = [x for x in losses if x is not None]
    return sum(parts[1:], parts[0]) if parts else None
