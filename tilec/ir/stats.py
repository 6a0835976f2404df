"""Per-layer counts: parameters, forward and backward FLOPs, activation bytes.

The numbers feed ``tilec info`` and, later, the cost model. Conventions:

- A multiply-add counts as 2 FLOPs; any other arithmetic operation
  (add, compare, select, exp, divide) as 1.
- Parameters are the trainable arrays of ``tilec_runtime.program.param_shapes``
  (conv weight, conv bias *or* batch-norm gamma and beta, connected weight and
  bias). Batch-norm running statistics are buffers, not parameters.
- FLOPs are per training step: per image times ``batch``. Forward counts
  training mode (batch-norm computes its statistics).

Per output element, besides the convolution / matrix product itself:

=================  =====  ========  ===========================================
operation          fwd    bwd       why
=================  =====  ========  ===========================================
conv/fc bias       1      1         add; bias gradient is a sum
batch norm         7      7         fwd: mean (1) + squared deviation (1 + 2)
                                    + normalise (1) + scale-shift (2);
                                    bwd: two sums (1 + 2) + dy - m1 (1)
                                    + xhat*m2 subtracted (2) + scale (1)
leaky              2      2         compare + multiply (select is free)
relu               1      1         compare
linear             0      0
maxpool            k*k-1  1         comparisons; bwd scatter-add
avgpool            note   note      fwd: one add per *input* element + one
                                    divide per output; bwd: one divide per
                                    input element
local_avgpool      k*k    k*k       fwd: k*k-1 adds + a divide; bwd: a divide
                                    + k*k-1 scatter-adds
softmax (+xent)    5      1         max, subtract, exp, sum, normalise; bwd
                                    p - onehot
cost (sse)         3      1         subtract + multiply-add; bwd: scale by 1/B
route, reorg       0      0         data movement only
=================  =====  ========  ===========================================

Backward: a conv (or connected) layer computes its weight gradient (as many
FLOPs as its forward product) and, when needed, its input gradient (as many
again): 2x forward. The input gradient is needed only if something upstream
has parameters to train, i.e. some ancestor (the input node excluded) has
parameters. So the first conv, and any parameter-free layer before it (a
maxpool on the raw image), computes no input gradient; a parameter-free layer
that needs no input gradient does no backward work at all.
"""
from dataclasses import dataclass
from math import prod

from tilec_runtime.program import param_shapes

BN_FWD = BN_BWD = 7
SOFTMAX_FWD, SOFTMAX_BWD = 5, 1
SSE_FWD, SSE_BWD = 3, 1
ACT_FLOPS = {"linear": 0, "relu": 1, "leaky": 2}

_DTYPE_BYTES = {"float16": 2, "float32": 4, "float64": 8}


def dtype_bytes(dtype):
    """Bytes per element: ``dtype`` is a positive int, a name such as
    ``"float32"``, or anything with an ``itemsize`` (a numpy dtype)."""
    if isinstance(dtype, int) and not isinstance(dtype, bool) and dtype > 0:
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    itemsize = getattr(dtype, "itemsize", None)
    if isinstance(itemsize, int) and itemsize > 0:
        return itemsize
    raise ValueError(f"unknown dtype {dtype!r} (use {', '.join(_DTYPE_BYTES)} or a byte count)")


def param_count(layer):
    """Trainable parameters of a program-style layer dict (needs ``in_shape``)."""
    return sum(prod(shape) for shape in param_shapes(layer).values())


def conv_product_flops(layer):
    """FLOPs of a conv's product alone per output value and image: its
    multiply-adds over the input window, ``2 * C * k * k``."""
    c, k = layer["in_shape"][0], layer["size"]
    return 2 * c * k * k


def forward_flops_per_position(layer):
    """Forward FLOPs of a conv or max-pool per output position (all channels)
    and image: :func:`forward_flops` over the output's ``H * W``, which a
    tile's region multiplies by its own area (``tilec.analysis.tiles``)."""
    c_out = layer["out_shape"][0]
    if layer["kind"] == "conv":
        epilogue = (BN_FWD if layer["bn"] else 1) + ACT_FLOPS[layer["act"]]
        return (conv_product_flops(layer) + epilogue) * c_out
    if layer["kind"] == "maxpool":
        return (layer["size"] ** 2 - 1) * c_out
    raise ValueError(f"layer {layer['index']} ({layer['kind']}) is not spatial: no FLOPs per position")


def forward_flops(layer):
    """Forward FLOPs of one image through a program-style layer dict."""
    kind = layer["kind"]
    n_in, n_out = prod(layer["in_shape"]), prod(layer["out_shape"])
    if kind in ("conv", "maxpool"):
        _, h, w = layer["out_shape"]
        return forward_flops_per_position(layer) * h * w
    if kind == "connected":
        return 2 * n_in * n_out + (1 + ACT_FLOPS[layer["act"]]) * n_out
    if kind == "avgpool":
        return n_in + n_out
    if kind == "local_avgpool":
        return layer["size"] ** 2 * n_out
    if kind == "softmax":
        return SOFTMAX_FWD * n_in
    if kind == "cost":
        return SSE_FWD * n_in
    return 0  # route, reorg


def backward_flops(layer, input_grad=True):
    """Backward FLOPs of one image through a program-style layer dict.

    Parameters
    ----------
    layer : dict
    input_grad : bool
        Whether the gradient with respect to the layer's input is needed
        (see the module docstring).
    """
    kind = layer["kind"]
    n_in, n_out = prod(layer["in_shape"]), prod(layer["out_shape"])
    if kind == "conv":
        product = conv_product_flops(layer) * n_out
        epilogue = (BN_BWD if layer["bn"] else 1) + ACT_FLOPS[layer["act"]]
        return product * (2 if input_grad else 1) + epilogue * n_out
    if kind == "connected":
        product = 2 * n_in * n_out
        return product * (2 if input_grad else 1) + (1 + ACT_FLOPS[layer["act"]]) * n_out
    if not input_grad:
        return 0
    if kind == "maxpool":
        return n_out
    if kind == "avgpool":
        return n_in
    if kind == "local_avgpool":
        return layer["size"] ** 2 * n_out
    if kind == "softmax":
        return SOFTMAX_BWD * n_in
    if kind == "cost":
        return SSE_BWD * n_in
    return 0  # route, reorg


def activation_bytes(layer, batch=1, dtype="float32"):
    """Bytes of a layer's output map for ``batch`` images."""
    return prod(layer["out_shape"]) * dtype_bytes(dtype) * batch


def needs_input_grad(graph):
    """Per layer index, whether its input gradient is needed: some ancestor
    layer (not the input node) has trainable parameters."""
    layers = graph.infer_shapes().layers()  # param_shapes needs in_shape
    trains = {-1: False}  # node -> it or an ancestor has parameters
    needs = {}
    for layer in layers:
        i = layer["index"]
        needs[i] = any(trains[j] for j in layer["inputs"])
        trains[i] = needs[i] or bool(param_shapes(layer))
    return needs


@dataclass(frozen=True)
class LayerStats:
    """Counts for one layer (FLOPs and bytes for the whole batch)."""
    index: int
    kind: str
    params: int
    fwd_flops: int
    bwd_flops: int
    act_bytes: int


@dataclass(frozen=True)
class Totals:
    """Sums over all layers."""
    params: int
    fwd_flops: int
    bwd_flops: int
    act_bytes: int


def layer_stats(graph, batch=1, dtype="float32"):
    """:class:`LayerStats` of every layer of ``graph`` (shapes are inferred
    if missing)."""
    graph.infer_shapes()
    needs = needs_input_grad(graph)
    return [LayerStats(index=layer["index"], kind=layer["kind"], params=param_count(layer),
                       fwd_flops=forward_flops(layer) * batch,
                       bwd_flops=backward_flops(layer, needs[layer["index"]]) * batch,
                       act_bytes=activation_bytes(layer, batch, dtype))
            for layer in graph.layers()]


def totals(stats):
    """:class:`Totals` of a list of :class:`LayerStats`."""
    return Totals(params=sum(s.params for s in stats), fwd_flops=sum(s.fwd_flops for s in stats),
                  bwd_flops=sum(s.bwd_flops for s in stats), act_bytes=sum(s.act_bytes for s in stats))
