"""Compute time of one layer on one region, from a device profile.

The runtime calls one kernel per layer and region (conv + batch norm +
activation together, see ``tilec_runtime.tiled``), so that is the unit
timed here. A call's time is ``overhead + flops * s_per_flop + bytes *
s_per_byte`` (:class:`tilec.profiles.Kernel`); this module defines the FLOPs
and bytes of a call, and ``tilec profile`` fits the coefficients against the
very same features, so measurement and prediction cannot drift apart.

Bytes count the arrays a kernel streams through memory, not every pass:
the fitted ``s_per_byte`` absorbs how many passes the implementation makes.

- conv: the im2col matrix (positions x C*k*k) and the output (positions x F);
  backward twice that (the column gradient and the scatter back).
- maxpool: the windows (positions x C*k*k) and the output; backward one
  masked pass over dy per window offset.
- connected: input, weights and output.
- everything else (avgpool, route, reorg, softmax, cost): input and output.

FLOPs follow :mod:`tilec.ir.stats` with every input gradient computed
(the runtime's backward always computes it).
"""
from math import prod

from tilec.ir.stats import backward_flops, forward_flops
from tilec.profiles import KERNEL_KINDS

SPATIAL = ("conv", "maxpool")


def kernel_kind(layer):
    kind = layer["kind"]
    return kind if kind in KERNEL_KINDS else "elementwise"


def features(layer, positions, batch, itemsize, direction):
    """(flops, bytes) of one call of ``layer``'s kernel computing
    ``positions`` output positions (rows x cols) for ``batch`` images.

    ``positions`` is ignored for non-spatial layers (they run on whole maps).
    """
    kind = layer["kind"]
    _, h, w = layer["out_shape"]
    if kind not in SPATIAL:
        positions = h * w
    flops_map = forward_flops(layer) if direction == "forward" else backward_flops(layer, True)
    flops = flops_map * batch * positions / (h * w)
    m = batch * positions
    if kind == "conv":
        c, f, k = layer["in_shape"][0], layer["filters"], layer["size"]
        nbytes = itemsize * m * (c * k * k + f)
        return flops, nbytes * (1 if direction == "forward" else 2)
    if kind == "maxpool":
        c, k = layer["in_shape"][0], layer["size"]
        if direction == "forward":
            return flops, itemsize * m * c * (k * k + 1)
        return flops, itemsize * m * c * k * k * 2
    n_in, n_out = prod(layer["in_shape"]), prod(layer["out_shape"])
    if kind == "connected":
        nbytes = itemsize * (batch * n_in + n_in * n_out + batch * n_out)
        return flops, nbytes * (1 if direction == "forward" else 2)
    return flops, itemsize * batch * (n_in + n_out)


def layer_seconds(profile, layer, positions, batch, itemsize, direction, scale=1.0):
    """Seconds for ``profile`` (sped up by ``scale``) to run ``layer`` on a region."""
    flops, nbytes = features(layer, positions, batch, itemsize, direction)
    return profile.kernel(kernel_kind(layer), direction).seconds(flops, nbytes) / scale


def update_seconds(profile, n_params, itemsize, scale=1.0):
    """The SGD-with-momentum update of ``n_params`` parameters: a streaming
    pass over parameters, gradients and velocity (timed like an
    element-wise kernel)."""
    return profile.kernel("elementwise", "forward").seconds(3 * n_params, 5 * n_params * itemsize) / scale


def reference_rate(profile):
    """FLOP/s of a mid-sized 3x3 conv forward + backward: a device's speed
    for weighting tile sizes between devices of different profiles."""
    layer = {"kind": "conv", "index": 0, "inputs": [-1], "in_shape": [64, 52, 52], "out_shape": [64, 52, 52],
             "filters": 64, "size": 3, "stride": 1, "pad": 1, "bn": True, "act": "leaky"}
    total_flops = sum(features(layer, 52 * 52, 1, 4, d)[0] for d in ("forward", "backward"))
    seconds = sum(layer_seconds(profile, layer, 52 * 52, 1, 4, d) for d in ("forward", "backward"))
    return total_flops / seconds
