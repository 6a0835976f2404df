"""Bytes a device holds during a training step.

Per device, over the whole step:

- *state*: for every layer whose parameters it holds (the layers of every
  group it computes a tile of, and on rank 0 the tail), the parameters and
  their accumulators, which are the SGD momentum and the gradient at once:
  ``STATE_COPIES`` copies;
- *kept*: activations stored in forward for backward, summed over the
  groups (they are all alive when backward starts): the group's input
  region, each layer's output region, the normalised values of batch-norm
  layers, max-pool argmax indices (int16). A group that recomputes keeps its
  input region only;
- *workspace*: the largest transient of any single kernel call (the im2col
  matrix and its gradient, the scatter target), plus, for a recomputing
  group, its regenerated activations during its backward. Transients do
  not overlap, so the step's workspace is the maximum over groups.

Peak = process overhead + state + kept + max workspace.
"""
from math import prod

from tilec.analysis.tail import is_identity
from tilec_runtime.program import param_shapes, tensor_shape

STATE_COPIES = 2  # parameters, and momentum buffers that accumulate the gradients
ARGMAX_BYTES = 2  # int16 max-pool indices


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
    if is_identity(layer):
        return 0  # its input itself (``tilec_runtime.reference``)
    if layer["kind"] == "conv":
        return values * itemsize * (2 if layer["bn"] else 1)
    if layer["kind"] == "maxpool":
        return values * (itemsize + ARGMAX_BYTES)
    return values * itemsize


def workspace_bytes(layer, positions, batch, itemsize):
    """The largest transient of one forward or backward call of a tail layer
    (``tilec_runtime.tailstep``) on ``positions`` output positions (a square
    of them): a conv's im2col band on one thread (the kernels' own sizes),
    the gradients of its output before and after batch norm and of its
    input (its weight gradient goes straight into the accumulator); a
    connected layer's weight gradient too; a route's nothing (its output,
    kept, is its one copy; backward hands on slices of its gradient); a
    reorg's one reordered copy. (Measured with tracemalloc on YOLOv2's tail
    groups on one device at batch 8, with what they keep: layers 18-24 3%
    under, 25 and 27-28 exact, 29-30 and 26 11% and 39% over; before, 29-30
    36% under and the route 2.3x over.)"""
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
        return itemsize * (workspace(op, 1, True) + m * (2 * f + c * layer["stride"] ** 2))
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


def image_bytes(values, itemsize):
    """Bytes of ``values`` image values held as frames from the data source
    besides the tile's input region (counted with the tile): the batches it
    streams ahead. This step's frame is let go as soon as it has landed
    (``tilec_runtime.executor``, the input op); the next one waits, and the
    one after is sent once this step is over."""
    from tilec_runtime.executor import BATCHES_AHEAD
    return BATCHES_AHEAD * values * itemsize


def tail_member_bytes(program, first, last, mode, k, member, batch, itemsize):
    """{"state", "kept", "workspace"} bytes of one member of a tail group over
    program[first..last] (``tilec_runtime.tailstep``): on one device
    (``mode`` "one"), the whole layers; split by channels over ``k``
    devices, the member's shares (``tilec_runtime.shards.share``). Kept: its
    inputs and their gradients, every output it holds and the normalised
    values of batch norm, and (split) the gradient buffer of each output;
    workspace: the largest kernel transient, and (split) a B layer's
    partial sum."""
    from tilec_runtime import shards
    layers = program[first:last + 1]
    reads = {j for layer in layers for j in layer["inputs"] if j < first}
    inputs = sum(batch * prod(tensor_shape(program, j)) for j in reads)
    if mode == "one":
        shares, grads, partial = layers, 0, 0
    else:
        shares = [shards.share(program, first, last, k, member, layer["index"]) for layer in layers]
        grads = sum(batch * prod(s["out_shape"]) for s in shares)
        roles = shards.roles(program, first, last)
        partial = max((batch * prod(layer["out_shape"]) for layer in layers if roles[layer["index"]] == "B"),
                      default=0)
    positions = [s["out_shape"][1] * s["out_shape"][2] for s in shares]
    kept = 2 * inputs * itemsize + grads * itemsize + sum(kept_bytes(s, p, batch, itemsize)
                                                          for s, p in zip(shares, positions))
    work = max((workspace_bytes(s, p, batch, itemsize) for s, p in zip(shares, positions)), default=0)
    return {"state": state_bytes(shares, itemsize), "kept": int(kept), "workspace": int(work + partial * itemsize),
            "params": param_count(shares)}


def plan_memory(plan, rank, profile=None):
    """{part: bytes} that ``rank`` allocates for ``plan``, from the runtime's
    own static memory plan (``tilec_runtime.lower``): what the executor
    holds, not an estimate. Parts: ``overhead`` (the process, from the
    profile), ``state`` (parameters, accumulators, running statistics),
    ``arenas`` (every tile's arena, argmax arena and input region, and the
    scratch all tiles share: workspaces, what lives only during a tile's
    backward, and what a recomputing group recomputes), ``messages``
    (staging buffers of the messages to peers), ``inputs`` (its pieces of
    the image, of this step and those streamed ahead), ``tail`` (the tail
    groups' inputs, activations and temporaries, ``tail_member_bytes``)."""
    import numpy as np

    from tilec_runtime.program import members_of
    from tilec_runtime.executor import holdings, input_messages, staging_key
    from tilec_runtime.lower import lower_rank, scratch_bytes
    from tilec_runtime.program import buffer_shapes
    program, batch = plan["program"], plan["batch"]
    item = np.dtype(plan["dtype"]).itemsize
    threads = plan["devices"][rank]["threads"]
    params, buffers = holdings(plan, rank)
    shapes = {k: s for layer in program for k, s in param_shapes(layer).items()}
    bshapes = {k: s for layer in program for k, s in buffer_shapes(layer).items()}

    def size(shape, piece):  # a whole array, or the slice (axis, start, stop) of a layer split by channels
        return prod(shape) if piece is None else prod(shape) // shape[piece[0]] * (piece[2] - piece[1])
    state = item * (STATE_COPIES * sum(size(shapes[k], p) for k, p in params.items())
                    + sum(size(bshapes[k], p) for k, p in buffers.items()))
    arenas, scratch = 0, 0
    for spec in lower_rank(plan, rank, threads).values():
        arenas += tile_own_bytes(spec, batch, item)
        scratch = max(scratch, scratch_bytes(spec, item))
    arenas += scratch
    # staging buffers: one per content of the forward messages, one per backward message (``staging_key``)
    staged = {staging_key(k, m, plan["groups"]): m["bytes"] for k, m in enumerate(plan["messages"])
              if m["sender"] == rank and m["receiver"] != rank and m["tensor"] >= 0}
    messages = sum(staged.values())
    # its pieces of the image: this step's and those the launcher streams ahead
    inputs = image_bytes(sum(prod(shape) for _, shape in input_messages(plan, rank)), item)
    kept, work = 0, 0  # every tail group's activations live through backward; transients do not overlap
    for group in plan["groups"]:
        members = members_of(group)
        if group["kind"] == "tail" and rank in members:
            part = tail_member_bytes(program, *group["layers"], group["mode"], len(members), members.index(rank),
                                     batch, item)
            kept, work = kept + part["kept"], max(work, part["workspace"])
    tail = kept + work
    overhead = profile.process_overhead_bytes if profile is not None else 0
    return {"overhead": int(overhead), "state": int(state), "arenas": int(arenas), "messages": int(messages),
            "inputs": int(inputs), "tail": int(tail)}


def plan_peaks(plan, cluster):
    """Each device's peak bytes for ``plan`` on ``cluster`` (``plan_memory``
    summed, its profile's process overhead included): what ``tilec simulate
    --json`` reports and a device's memory must hold."""
    return [sum(plan_memory(plan, r, d.profile).values()) for r, d in enumerate(cluster.devices)]
