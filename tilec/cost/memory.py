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

from tilec_runtime.program import param_shapes

STATE_COPIES = 2  # parameters, and momentum buffers that accumulate the gradients
ARGMAX_BYTES = 2  # int16 max-pool indices


def param_count(layers):
    return sum(prod(s) for layer in layers for s in param_shapes(layer).values())


def state_bytes(layers, itemsize):
    return STATE_COPIES * param_count(layers) * itemsize


def kept_bytes(layer, positions, batch, itemsize):
    """Bytes kept for backward of ``layer``'s output on ``positions`` positions."""
    values = batch * layer["out_shape"][0] * positions
    if layer["kind"] == "conv":
        return values * itemsize * (2 if layer["bn"] else 1)
    if layer["kind"] == "maxpool":
        return values * (itemsize + ARGMAX_BYTES)
    return values * itemsize


def workspace_bytes(layer, positions, batch, itemsize):
    """The largest transient of one forward or backward call on ``positions`` output positions."""
    kind = layer["kind"]
    m = batch * positions
    if kind == "conv":
        c, f, k, s = layer["in_shape"][0], layer["filters"], layer["size"], layer["stride"]
        # backward: im2col + its gradient, the padded input gradient, dy and dz
        return itemsize * m * (2 * c * k * k + c * s * s + 2 * f)
    if kind == "maxpool":
        c, k, s = layer["in_shape"][0], layer["size"], layer["stride"]
        return itemsize * m * c * (k * k + s * s + 1)
    n_in, n_out = prod(layer["in_shape"]), prod(layer["out_shape"])
    return itemsize * batch * (n_in + n_out) * 2


def plan_memory(plan, rank, profile=None):
    """{part: bytes} that ``rank`` allocates for ``plan``, from the runtime's
    own static memory plan (``tilec_runtime.lower``): what the executor
    holds, not an estimate. Parts: ``overhead`` (the process, from the
    profile), ``state`` (parameters, accumulators, running statistics),
    ``arenas`` (every tile's arena, argmax arena, workspace and input
    region; the groups that recompute share one arena), ``messages``
    (staging buffers of the messages to peers), ``tail`` (rank 0's tail
    inputs and an estimate of the reference executor's temporaries)."""
    import numpy as np

    from tilec_runtime.executor import rank_keys
    from tilec_runtime.lower import lower_rank
    from tilec_runtime.program import buffer_shapes
    program, batch = plan["program"], plan["batch"]
    item = np.dtype(plan["dtype"]).itemsize
    threads = plan["devices"][rank]["threads"]
    params, buffers = rank_keys(plan, rank)
    shapes = {k: s for layer in program for k, s in param_shapes(layer).items()}
    bshapes = {k: s for layer in program for k, s in buffer_shapes(layer).items()}
    state = item * (STATE_COPIES * sum(prod(shapes[k]) for k in params) + sum(prod(bshapes[k]) for k in buffers))
    arenas, shared, shared_args = 0, 0, 0
    for g, spec in lower_rank(plan, rank, threads).items():
        fixed = item * (spec["workspace"] + batch * prod(spec["input"]))
        if plan["groups"][g].get("recompute"):
            last = spec["ops"][-1]
            out = last["pool"]["out"] if last.get("pool") else last["out"]
            channels = last["filters"] if last["kind"] == "conv" else last["channels"]
            fixed += item * batch * channels * prod(out)  # the gradient arriving before the recompute
            shared, shared_args = max(shared, spec["arena"]), max(shared_args, spec["arg_arena"])
        else:
            fixed += item * spec["arena"] + ARGMAX_BYTES * spec["arg_arena"]
        arenas += fixed
    arenas += item * shared + ARGMAX_BYTES * shared_args
    messages = sum(m["bytes"] for m in plan["messages"] if m["sender"] == rank and m["receiver"] != rank)
    tail = 0
    for group in plan["groups"]:
        if group["kind"] == "tail" and any(t["device"] == rank for t in group["tiles"]):
            first, last = group["layers"]
            layers = program[first:last + 1]
            reads = {j for layer in layers for j in layer["inputs"] if j < first}
            inputs = sum(batch * prod(program[j]["out_shape"] if j >= 0 else program[0]["in_shape"]) * item
                         for j in reads)
            # the reference executor keeps every tail activation and makes a gradient of each
            tail = 2 * inputs + sum(kept_bytes(layer, layer["out_shape"][1] * layer["out_shape"][2], batch, item)
                                    for layer in layers) + max(
                (workspace_bytes(layer, layer["out_shape"][1] * layer["out_shape"][2], batch, item)
                 for layer in layers), default=0)
    overhead = profile.process_overhead_bytes if profile is not None else 0
    return {"overhead": int(overhead), "state": int(state), "arenas": int(arenas), "messages": int(messages),
            "tail": int(tail)}
