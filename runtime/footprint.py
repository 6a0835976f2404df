"""What a device holds during a training step: the runtime's own account.

The executor's tiles allocate what their lowered memory plans say
(``tilec_runtime.lower``); its tail groups allocate with numpy
(``tilec_runtime.tailstep``), and what they allocate is counted here, per
layer, as measured. The planner's cost model, the simulator and the plan
builder read these sizes; none counts a second time.

- *state*: parameters and their accumulators (``STATE_COPIES``), and the
  batch-norm running statistics;
- a tile's own arena, argmax arena and input region, all step;
- the scratch the tiles share, for what lives only within one kernel call
  or one tile's backward;
- the gradients of a tail group's inputs, all step; its inputs,
  activations, their gradients and its kernels' temporaries from its
  forward to the end of its backward (*phase*).

Where the scratch and the tail's part are both large (``releases``), the
device gives the scratch's pages back while its tail runs and the tail
lets go of its arrays before the tiles' backward (``tilec_runtime.pages``):
the device then holds the larger of the two, not both (``transient``).
"""
from math import prod

from tilec_runtime.program import param_shapes, tensor_shape
from tilec_runtime.tailstep import fused_shares, native_cost

STATE_COPIES = 2  # parameters, and momentum buffers that accumulate the gradients
ARGMAX_BYTES = 2  # int16 max-pool indices
# A device gives its scratch's pages back while its tail groups run (``tilec_runtime.pages``) where that
# saves at least this much: the pages are touched again at a cost (0.65 ms per MB here) that a small
# saving does not pay for (yolov2-tiny at batch 1 on two devices: 6 MB of scratch, a step of 0.16 s).
RELEASE_MIN_BYTES = 32 << 20


def releases(scratch, tail, least=None):
    """Whether a device whose tiles share ``scratch`` bytes and whose tail
    groups hold ``tail`` bytes of activations and temporaries gives the
    scratch back while the tail runs: both at least ``least`` (default
    ``RELEASE_MIN_BYTES``), and something to give."""
    return min(scratch, tail) >= (RELEASE_MIN_BYTES if least is None else least) and min(scratch, tail) > 0


def transient(scratch, tail, released, early=0):
    """Bytes of the tiles' scratch and of the tail's activations and
    temporaries at the step's peak: one at a time where the scratch is
    given back during the tail (``released``), else both. ``early``: the
    tail's inputs that the tiles hand on before the scratch is given back
    (``early_bytes``), held beside it then."""
    return max(scratch + early, tail) if released else scratch + tail


def tiles_and_tail(scratch, tail, early=0):
    """A device's bytes of its tiles' scratch and its tail's activations and
    temporaries at the step's peak, ``tail`` = ``tail_peak``'s (held to the
    end, freed as they go): the larger where it gives the scratch back
    (``releases``, which comes with ``tail_free``; with the ``early``
    inputs beside the scratch), else both."""
    held, freed = tail
    if releases(scratch, freed):
        return transient(scratch, freed, True, early)
    return transient(scratch, held, False)


def early_bytes(reads, prefix):
    """Bytes of a tail group's inputs ``reads`` ({tensor: bytes}) that the
    tiled prefix (layers before ``prefix``) produces: a device's own tiles
    copy their pieces in as soon as they are final, before it gives its
    scratch back (measured: YOLOv2 at batch 8 on two workers, the 30 MB of
    layers 16 and 17 landed beside the whole scratch)."""
    return sum(nbytes for t, nbytes in reads.items() if t < prefix)


def param_count(layers):
    return sum(prod(s) for layer in layers for s in param_shapes(layer).values())


def state_bytes(layers, itemsize):
    """Parameters with their accumulators, and batch-norm running statistics."""
    from tilec_runtime.program import buffer_shapes
    buffers = sum(prod(s) for layer in layers for s in buffer_shapes(layer).values())
    return (STATE_COPIES * param_count(layers) + buffers) * itemsize


def kept_bytes(layer, positions, batch, itemsize):
    """Bytes kept for backward of ``layer``'s output on ``positions`` positions."""
    values = batch * layer["out_shape"][0] * positions
    if layer["kind"] == "route" and len(layer["inputs"]) == 1:
        return 0  # a route of one map: its output is that map itself (``tilec_runtime.reference``)
    if layer["kind"] == "conv":
        return values * itemsize * (2 if layer["bn"] else 1)
    if layer["kind"] == "maxpool":
        return values * (itemsize + ARGMAX_BYTES)
    return values * itemsize


def workspace_bytes(layer, positions, batch, itemsize, threads=1, inplace=False):
    """The largest transient of one forward or backward call of a tail layer
    (``tilec_runtime.tailstep``) on ``positions`` output positions (a square
    of them): a conv's workspace on the device's ``threads`` kernel threads
    (the kernels' own sizes: an im2col band per thread and a private weight
    gradient per thread but the first, or one band where they split the
    filters),
    the gradients of its output before and after batch norm and of its
    input (its weight gradient goes straight into the accumulator); a
    connected layer's weight gradient too; a route's nothing (its output,
    kept, is its one copy; backward hands on slices of its gradient); a
    reorg's one reordered copy. (Measured with tracemalloc on YOLOv2's tail
    groups on one device at batch 8, with what they keep: layers 18-24 3%
    under, 25 and 27-28 exact, 29-30 and 26 11% and 39% over; before, 29-30
    36% under and the route 2.3x over.) ``inplace``: a conv's output
    gradient is made in the buffer it arrives in (a channel-split member's,
    ``tailstep.ChannelGroup``): the largest transient is then its
    forward's (its sums with the workspace, then beside their normalised
    copy), the copy its batch-norm sums take, or its backward's input
    gradient with the workspace."""
    from tilec_runtime.kernel_set import band_rows
    from tilec_runtime.lower import workspace
    kind = layer["kind"]
    m = batch * positions
    if kind == "conv":
        c, f, k = layer["in_shape"][0], layer["filters"], layer["size"]
        wo = max(1, round(positions ** 0.5))
        ho = max(1, -(-positions // wo))
        op = {"kind": "conv", "channels": c, "filters": f, "size": k, "out": [ho, wo],
              "band": band_rows(c, k, ho, wo, batch)}
        ws, dx = workspace(op, threads), m * c * layer["stride"] ** 2
        if inplace:
            return itemsize * max(ws + m * f, 2 * m * f, ws + dx)
        return itemsize * (ws + m * 2 * f + dx)
    if kind == "maxpool":
        return itemsize * m * layer["in_shape"][0] * 2
    if kind == "route":
        return 0
    n_in, n_out = prod(layer["in_shape"]), prod(layer["out_shape"])
    if kind == "reorg":
        return itemsize * batch * n_out
    return itemsize * (batch * (n_in + n_out) * 2 + param_count([layer]))


def tile_own_bytes(spec, batch, itemsize):
    """What one tile keeps all step, from its lowered memory plan
    (``tilec_runtime.lower``): its arena, its input region, its argmax arena."""
    return itemsize * (spec["arena"] + batch * prod(spec["input"])) + ARGMAX_BYTES * spec["arg_arena"]


def image_bytes(values, itemsize, local=False):
    """Bytes of ``values`` image values held as frames from the data source
    besides the tile's input region (counted with the tile): the batches it
    streams ahead. This step's frame is let go as soon as it has landed
    (``tilec_runtime.executor``, the input op); the next one waits, and the
    one after is sent once this step is over. A local worker (``local``)
    reads this step's pieces from the launcher's file into its tiles' input
    regions before the step (``tilec_runtime.imagefile``) and holds none."""
    from tilec_runtime.executor import BATCHES_AHEAD
    return 0 if local else BATCHES_AHEAD * values * itemsize


def tail_member_bytes(program, first, last, mode, k, member, batch, itemsize, threads=1):
    """{"state", "kept", "phase", "grads", "workspace"} bytes of one member of a tail
    group over program[first..last] (``tilec_runtime.tailstep``): on one
    device (``mode`` "one"), the whole layers; split by channels over ``k``
    devices, the member's shares (``tilec_runtime.shards.share``); its
    kernels on ``threads`` threads (the device's). Kept (all
    step): the gradients of its inputs; phase (from its forward to the end
    of its backward, let go of by ``tail_free``): its inputs, every output
    it holds and the normalised values of batch norm, and (split) the gradient buffer
    of each output (``grads``, a part of ``phase``: they come to be in its
    backward); workspace: the largest kernel transient, and (split) a B
    layer's partial sum. A sum-of-squares cost on the tiled prefix
    (``tilec_runtime.tailstep.native_cost``) holds what it holds all step."""
    from tilec_runtime import shards
    layers = program[first:last + 1]
    reads = {j for layer in layers for j in layer["inputs"] if j < first}
    inputs = sum(batch * prod(tensor_shape(program, j)) for j in reads)
    if mode == "one":
        shares, grads, partial = layers, 0, 0
    else:
        shares = [shards.share(program, first, last, k, member, layer["index"]) for layer in layers]
        grads = sum(batch * prod(s["out_shape"]) for s in shares if s["kind"] != "cost")  # (a cost's is its own)
        roles = shards.roles(program, first, last)
        partial = max((batch * prod(layer["out_shape"]) for layer in layers if roles[layer["index"]] == "B"),
                      default=0)
    positions = [s["out_shape"][1] * s["out_shape"][2] for s in shares]
    kept = inputs * itemsize
    phase = (inputs + grads) * itemsize + sum(kept_bytes(s, p, batch, itemsize) for s, p in zip(shares, positions))
    if native_cost(program, first, last):
        kept, phase = kept + phase, 0
    work = max((workspace_bytes(s, p, batch, itemsize, threads, inplace=mode != "one")
                for s, p in zip(shares, positions)), default=0)
    return {"state": state_bytes(shares, itemsize), "kept": int(kept), "phase": int(phase),
            "grads": int(grads * itemsize if phase else 0), "workspace": int(work + partial * itemsize),
            "params": param_count(shares),
            "reads": {j: int(batch * prod(tensor_shape(program, j)) * itemsize) for j in reads}}


def tile_bytes(plan, rank):
    """(bytes of ``rank``'s tiles' own arenas and input regions, bytes of the
    scratch they share: with the channel groups' fused shares, which use it
    while the tail runs and whose arenas ``tail_member_bytes`` counts)."""
    import numpy as np

    from tilec_runtime.lower import lower_rank, scratch_bytes
    item = np.dtype(plan["dtype"]).itemsize
    threads = plan["devices"][rank]["threads"]
    own, scratch = 0, 0
    for spec in lower_rank(plan, rank, threads).values():
        own += tile_own_bytes(spec, plan["batch"], item)
        scratch = max(scratch, scratch_bytes(spec, item))
    for share in fused_shares(plan, rank, threads).values():
        scratch = max(scratch, scratch_bytes(share.spec, item))
    return own, scratch


def tail_parts(plan, rank):
    """(bytes ``rank``'s tail groups hold all step, [(phase, grads,
    workspace, early)] of each, in order: what ``tail_peak`` reads)."""
    import numpy as np

    from tilec_runtime.program import members_of
    item = np.dtype(plan["dtype"]).itemsize
    tails = [g for g in plan["groups"] if g["kind"] == "tail"]
    prefix = tails[0]["layers"][0] if tails else len(plan["program"])
    kept, parts = 0, []
    for group in tails:
        members = members_of(group)
        if rank in members:
            part = tail_member_bytes(plan["program"], *group["layers"], group["mode"], len(members),
                                     members.index(rank), plan["batch"], item, plan["devices"][rank]["threads"])
            kept += part["kept"]
            parts.append((part["phase"], part["grads"], part["workspace"], early_bytes(part["reads"], prefix)))
    return kept, parts


def tail_bytes(plan, rank):
    """(bytes ``rank``'s tail groups hold all step, bytes they hold at most
    while the tail runs, that where each lets go of its activations after
    its backward, their inputs from the tiles: ``early_bytes``):
    ``tail_peak`` of its tail groups in order."""
    kept, parts = tail_parts(plan, rank)
    return (kept, *tail_peak(parts), tail_early(parts))


def tail_early(parts):
    """The inputs from the tiles (``early_bytes``) of tail groups ``parts``."""
    return sum(p[3] for p in parts if len(p) > 3)


def tail_peak(parts):
    """(all of them, freed as they go) for a device's tail groups ``parts``,
    [(phase, grads, workspace[, early])] in the chain's order: what they hold at
    once while the tail runs. Kept to the end of the step, every group's
    activations and output gradients at once, and the largest temporary;
    let go of after each group's backward (``tail_free``), at most, over
    the groups g, the activations of g and the groups before it (the later
    ones are gone by g's backward) with g's output gradients and its
    temporaries."""
    acts = freed = phase = work = 0
    for p, g, w, *_ in parts:
        freed = max(freed, acts + p + w)
        acts += p - g
        phase, work = phase + p, max(work, w)
    return phase + work, freed
