"""Bytes a device holds during a training step.

Per device, over the whole step:

- *state*: for every layer whose parameters it holds (the layers of every
  group it computes a tile of, and on rank 0 the tail), the parameters,
  their gradients and the SGD momentum: ``STATE_COPIES`` copies;
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

STATE_COPIES = 3  # parameters, gradients, momentum
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
