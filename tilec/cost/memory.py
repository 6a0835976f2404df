"""Bytes a device holds during a training step, as the planner and the
simulator count them (the sizes themselves: ``tilec_runtime.footprint``).

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
  not overlap, so the step's workspace is the maximum over groups; the
  tiles' and the tail's are one at a time where the device gives the
  scratch back while its tail runs (``tilec_runtime.footprint.transient``).

Peak = process overhead + state + kept + workspace.
"""
from math import prod

from tilec_runtime.footprint import STATE_COPIES, image_bytes, tail_bytes, tile_bytes, transient
from tilec_runtime.program import param_shapes


def plan_memory(plan, rank, profile=None):
    """{part: bytes} that ``rank`` allocates for ``plan``, from the runtime's
    own static memory plan (``tilec_runtime.lower``): what the executor
    holds, not an estimate. Parts: ``overhead`` (the process, from the
    profile), ``state`` (parameters, accumulators, running statistics),
    ``arenas`` (every tile's arena, argmax arena and input region),
    ``messages`` (staging buffers of the messages to peers: the forward and
    the backward ones share their bytes; the cost model counts both, so
    the planner's count may be higher by the smaller), ``inputs`` (its
    pieces of the image streamed ahead; none for a local worker), ``tail``
    (the gradients of the tail groups' inputs, ``tail_member_bytes``),
    ``transient`` (the scratch all tiles share: workspaces, what lives only
    during a tile's backward, what a recomputing group recomputes; and the
    tail groups' activations and temporaries: the larger of the two where
    the schedule gives the scratch back while the tail runs,
    ``scratch_release``, and lets go of each tail group's after its
    backward, ``tail_free``; else both, ``tilec_runtime.footprint.tail_peak``)."""
    import numpy as np

    from tilec_runtime.executor import holdings, input_messages, staging_layout
    from tilec_runtime.program import buffer_shapes
    program = plan["program"]
    item = np.dtype(plan["dtype"]).itemsize
    params, buffers = holdings(plan, rank)
    shapes = {k: s for layer in program for k, s in param_shapes(layer).items()}
    bshapes = {k: s for layer in program for k, s in buffer_shapes(layer).items()}

    def size(shape, piece):  # a whole array, or the slice (axis, start, stop) of a layer split by channels
        return prod(shape) if piece is None else prod(shape) // shape[piece[0]] * (piece[2] - piece[1])
    state = item * (STATE_COPIES * sum(size(shapes[k], p) for k, p in params.items())
                    + sum(size(bshapes[k], p) for k, p in buffers.items()))
    arenas, scratch = tile_bytes(plan, rank)
    # staging buffers: one per content of the messages it sends, but a tile's halo one each (``staging_key``),
    # the forward ones and the backward ones in the same bytes (``staging_layout``)
    messages = staging_layout(plan, rank)[1]
    # its pieces of the image the launcher streams ahead (a local worker reads them: none)
    devices = (plan.get("cluster") or {}).get("devices")  # (a plan made without a cluster: as if sent)
    inputs = image_bytes(sum(prod(shape) for _, shape in input_messages(plan, rank)), item,
                         bool(devices and devices[rank].get("shared")))
    kept, held, freed, early = tail_bytes(plan, rank)
    released = any(op["op"] == "scratch_release" for op in plan["schedule"][rank])
    overhead = profile.process_overhead_bytes if profile is not None else 0
    return {"overhead": int(overhead), "state": int(state), "arenas": int(arenas), "messages": int(messages),
            "inputs": int(inputs), "tail": int(kept),
            "transient": int(transient(scratch, freed if released else held, released, early))}


def plan_peaks(plan, cluster):
    """Each device's peak bytes for ``plan`` on ``cluster`` (``plan_memory``
    summed, its profile's process overhead included): what ``tilec simulate
    --json`` reports and a device's memory must hold."""
    return [sum(plan_memory(plan, r, d.profile).values()) for r, d in enumerate(cluster.devices)]
