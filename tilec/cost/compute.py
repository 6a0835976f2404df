"""Compute time of the runtime's kernels, from a device profile.

The runtime runs a tiled group unit by unit, each unit in stages (the ops of
the plan's schedule, ``tilec.plan.schedule``): a convolution (``conv``:
forward with its batch-norm statistics; backward with the batch-norm
finish, the weight and the input gradient), its ``epilogue`` (batch norm or
bias, activation and a fused max-pool; backward their gradients and sums),
or a max-pool alone. The layers after the tiled prefix run whole on one
device, or split by channels (``share_seconds``). A call's time on one
thread is ``overhead + flops * s_per_flop + bytes * s_per_byte``
(:class:`tilec.profiles.KernelCost`); this module defines the
FLOPs and bytes of every call, and ``tilec profile`` fits the coefficients
against the very same features, so measurement and prediction cannot
drift apart. Threads divide it by the profile's measured speed-up.

Bytes count the arrays a kernel streams through memory, not every pass:
the fitted ``s_per_byte`` absorbs how many passes the implementation makes.

Rows count the row segments a kernel walks one by one (im2col's and
col2im's copies, the epilogue's and the pool's rows of each channel): each
costs a fixed few dozen nanoseconds (loop set-up, a short copy, a vector
loop's scalar remainder) whatever its width. A tile split by columns keeps
every row of the map, narrowed: detector-small's tiles split 1x2 over two
emulated devices took 0.874 s a step, split 2x1 0.674 s, which FLOPs and
bytes alone price the same. Features with a row count are (flops, bytes, rows);
``rows`` gives the output rows a call covers (default: the whole map's
width, as the tail runs layers).
"""
from math import prod

from tilec.ir.stats import backward_flops, conv_product_flops, forward_flops
from tilec_runtime.footprint import param_count
from tilec_runtime.kernel_set import band_rows
from tilec_runtime.lower import STREAM_PASSES, regenerates, streams

# Kernel kinds of the layers the reference executor runs whole (the tail);
# the rest are "elementwise" (a region loss too, where the profile has no
# "region" kind of its own)
WHOLE_LAYER_KIND = {"connected": "connected", "maxpool": "maxpool", "region": "region"}


def _rows(layer, positions, rows):
    """Output rows of a call on ``positions`` positions: ``rows`` if given, else full-width rows."""
    return rows if rows is not None else max(1, round(positions / layer["out_shape"][2]))


def conv_features(layer, positions, batch, itemsize, direction, dx=True, rows=None):
    """(flops, bytes, rows) of a convolution on ``positions`` output
    positions (``rows`` of them): the GEMMs over the im2col matrix
    (positions x C*k*k) and the output (positions x F); backward, the weight
    gradient and (``dx``) the input gradient, with the batch-norm finish
    folded in. Rows: im2col's row copies (C*k*k per output row; none for a
    1x1 stride-1 conv, whose GEMM reads its input), col2im's for ``dx``, and
    the batch-norm finish's F per output row."""
    c, f, k = layer["in_shape"][0], layer["filters"], layer["size"]
    m = batch * positions
    gemm = conv_product_flops(layer) * f * m
    h = batch * _rows(layer, positions, rows)
    copies = 0 if k == 1 and layer["stride"] == 1 else h * c * k * k
    if direction == "forward":
        return gemm, itemsize * m * (c * k * k + f), copies
    return (gemm * (2 if dx else 1), itemsize * m * (c * k * k * (2 if dx else 1) + 2 * f),
            copies * (2 if dx else 1) + h * f)


def epilogue_features(layer, positions, pooled, batch, itemsize, direction, rows=None):
    """(flops, bytes, rows) of batch norm or bias, the activation and a fused
    max-pool (``pooled``: its output positions, or None) around a conv on
    ``positions`` positions (``rows`` of them): rows of every channel."""
    f, m = layer["filters"], batch * positions
    h = batch * f * _rows(layer, positions, rows)
    if pooled is None:
        if direction == "forward":  # read z, write the activation
            return f * m * (6 if layer["bn"] else 2), itemsize * f * 2 * m, h
        return f * m * (8 if layer["bn"] else 3), itemsize * f * 3 * m, h  # read z and dy, write dz
    out = batch * pooled  # plus the pool's output and int16 argmax (forward), read back (backward)
    if direction == "forward":
        return f * m * (7 if layer["bn"] else 3), itemsize * f * (m + out) + 2 * f * out, h
    return f * m * (9 if layer["bn"] else 4), itemsize * f * (2 * m + out) + 2 * f * out, h


def pool_features(layer, positions, batch, itemsize, direction, rows=None):
    """(flops, bytes, rows) of a max-pool on ``positions`` output positions
    (``rows`` of them): output rows of every channel."""
    c, k, s = layer["in_shape"][0], layer["size"], layer["stride"]
    m = batch * positions
    h = batch * c * _rows(layer, positions, rows)
    if direction == "forward":
        return c * m * k * k, itemsize * c * m * (s * s + 1), h
    return c * m, itemsize * c * m * (s * s + 1), h


def features(layer, positions, batch, itemsize, direction):
    """(flops, bytes) of a layer the reference executor runs whole (on the
    tail): input, weights and output for connected, input and output for
    the rest (route, reorg, avgpool, losses)."""
    kind = layer["kind"]
    _, h, w = layer["out_shape"]
    flops_map = forward_flops(layer) if direction == "forward" else backward_flops(layer, True)
    flops = flops_map * batch * positions / (h * w)
    n_in, n_out = prod(layer["in_shape"]), prod(layer["out_shape"])
    if kind == "connected":
        nbytes = itemsize * (batch * n_in + n_in * n_out + batch * n_out)
        return flops, nbytes * (1 if direction == "forward" else 2)
    return flops, itemsize * batch * (n_in + n_out)


def stage_seconds(profile, kind, direction, features_, threads=1, scale=1.0):
    """Seconds of one call with ``features_`` = (flops, bytes[, rows])."""
    flops, nbytes, *rows = features_
    return profile.seconds(kind, direction, flops, nbytes, threads, scale, rows[0] if rows else 0)


def layer_seconds(profile, layer, positions, batch, itemsize, direction, scale=1.0, threads=1):
    """Seconds for ``profile`` (sped up by ``scale``, on ``threads``) to run a
    whole layer on ``positions`` output positions, as the runtime does."""
    kind = layer["kind"]
    if kind == "conv":
        return (stage_seconds(profile, "conv", direction, conv_features(layer, positions, batch, itemsize, direction),
                              threads, scale)
                + stage_seconds(profile, "epilogue", direction,
                                epilogue_features(layer, positions, None, batch, itemsize, direction), threads, scale))
    if kind == "maxpool":
        return stage_seconds(profile, "maxpool", direction, pool_features(layer, positions, batch, itemsize, direction),
                             threads, scale)
    return stage_seconds(profile, WHOLE_LAYER_KIND.get(kind, "elementwise"), direction,
                         features(layer, positions, batch, itemsize, direction), threads, scale)


def share_seconds(profile, layer, share, role, batch, itemsize, direction, scale=1.0, threads=1, part="all"):
    """Seconds of a member's share of a layer split by channels
    (``tilec_runtime.shards``): an A or pooling layer on its channels (the
    layer ``share``), an A layer's backward ``part`` "input" (all but the
    weight gradient) or "weight", its forward "partial" (the sums) or
    "post" (batch norm or bias, activation); a B layer's ``part`` "partial" sum (its input
    channels, every output), "post" (on every member alike, its bias or
    batch norm and activation on all channels), or "all" of it."""
    positions = layer["out_shape"][1] * layer["out_shape"][2]
    if role == "A" and part in ("input", "weight"):  # backward in two parts (``tilec_runtime.tailstep``)
        whole = layer_seconds(profile, share, positions, batch, itemsize, direction, scale, threads)
        if layer["kind"] == "conv":
            weight = stage_seconds(profile, "conv", direction,
                                   conv_features(share, positions, batch, itemsize, direction, False), threads, scale)
        else:
            weight = whole / 2  # the two GEMMs of a connected layer's backward, of one size
        weight = min(weight, whole)
        return weight if part == "weight" else whole - weight
    if role != "B" and (part == "all" or layer["kind"] not in ("conv", "connected")):
        return layer_seconds(profile, share, positions, batch, itemsize, direction, scale, threads)
    # B's post is on every output channel (the whole layer's); an A layer's on its own
    post_layer = layer if role == "B" else share
    if layer["kind"] == "conv":
        partial = stage_seconds(profile, "conv", direction, conv_features(share, positions, batch, itemsize, direction),
                                threads, scale)
        post = stage_seconds(profile, "epilogue", direction,
                             epilogue_features(post_layer, positions, None, batch, itemsize, direction), threads, scale)
    else:
        partial = stage_seconds(profile, "connected", direction,
                                features(dict(share, act="linear"), 1, batch, itemsize, direction), threads, scale)
        n = batch * prod(post_layer["out_shape"])  # bias and activation
        post = stage_seconds(profile, "elementwise", direction, (3 * n, 3 * n * itemsize), threads, scale)
    return {"partial": partial, "post": post, "all": partial + post}[part]


# What making a conv output's gradient again costs, of the epilogue backward that made it first with its sums
# (tiny416 at batch 4, layer 0, traced on x86: conv backward 23.1 -> 31.2 ms, the epilogue backward 16.0 ms).
REGEN_SHARE = 0.5
# A unit's entry of what it costs more where its group recomputes, besides its forward again (not an op)
RECOMPUTE_EXTRA = "recompute_extra"


def unit_seconds(profile, program, unit, sizes, input_grad, batch, itemsize, threads=1, scale=1.0):
    """{schedule op: seconds} of one unit (conv layer or None, pool layer or
    None) of a tile; ``sizes[layer]``: the (rows, cols) of the tile's output
    of a layer; ``input_grad``: whether backward computes the input gradient."""
    conv, pool = unit
    out = {}

    def t(kind, direction, fb):
        return stage_seconds(profile, kind, direction, fb, threads, scale)

    if conv is None:
        layer, (h, w) = program[pool], sizes[pool]
        out["pool_fwd"] = t("maxpool", "forward", pool_features(layer, h * w, batch, itemsize, "forward", h))
        out["pool_bwd"] = t("maxpool", "backward", pool_features(layer, h * w, batch, itemsize, "backward", h))
        return out
    layer, (h, w) = program[conv], sizes[conv]
    pooled = sizes[pool][0] * sizes[pool][1] if pool is not None else None
    out["conv_fwd"] = t("conv", "forward", conv_features(layer, h * w, batch, itemsize, "forward", rows=h))
    out["epi_fwd"] = t("epilogue", "forward", epilogue_features(layer, h * w, pooled, batch, itemsize, "forward", h))
    out["epi_bwd"] = t("epilogue", "backward", epilogue_features(layer, h * w, pooled, batch, itemsize, "backward", h))
    out["conv_bwd"] = t("conv", "backward", conv_features(layer, h * w, batch, itemsize, "backward", input_grad, h))
    op = {"kind": "conv", "pool": pool, "out": [h, w], "channels": layer["in_shape"][0], "size": layer["size"],
          "filters": layer["filters"], "batch": batch,
          "band": band_rows(layer["in_shape"][0], layer["size"], h, w, batch)}
    # where it makes its output's gradient again band by band rather than store it: the epilogue
    # backward's pass without its sums (on several threads with an input gradient, twice)
    regen = REGEN_SHARE * out["epi_bwd"] * (2 if input_grad and threads > 1 else 1)
    out[RECOMPUTE_EXTRA] = 0.0
    if regenerates(op, 0, input_grad):  # (only a group's first unit computes no input gradient)
        out["conv_bwd"] += regen
    elif regenerates(op, 0, input_grad, recompute=True):
        out[RECOMPUTE_EXTRA] = regen  # only where its group recomputes
    if pool is not None and streams(dict(op, pool={**program[pool], "pads": [0, 0, 0, 0], "out": list(sizes[pool])}),
                                    0, input_grad, True):
        # a streamed conv, where its group recomputes: its output three times more (``streams``)
        out[RECOMPUTE_EXTRA] += STREAM_PASSES * out["conv_fwd"]
    return out


def update_seconds(profile, n_params, itemsize, scale=1.0, threads=1):
    """The SGD update of ``n_params`` parameters: a streaming pass over
    parameters and accumulators (timed like an element-wise kernel)."""
    return stage_seconds(profile, "elementwise", "forward", (3 * n_params, 3 * n_params * itemsize), threads, scale)


def zero_seconds(profile, n_params, itemsize, scale=1.0, threads=1):
    """Starting the backward: ``n_params`` accumulators scaled by the momentum in place."""
    return stage_seconds(profile, "elementwise", "forward", (n_params, 2 * n_params * itemsize), threads, scale)


def copy_seconds(profile, nbytes, scale=1.0):
    """A memory copy of ``nbytes`` (a message to the device itself, a staging copy)."""
    return stage_seconds(profile, "elementwise", "forward", (0, 2 * nbytes), 1, scale)


def one_core_seconds(profile, layers, batch, itemsize):
    """``layers`` on one core of a machine ``profile`` measured, alone (the
    paper's baseline): every layer on whole maps, no communication, and the
    update. A local worker's profile (``Profile.beside_others``) prices it
    as the machine alone does."""
    profile = profile.alone()
    total = sum(layer_seconds(profile, layer, layer["out_shape"][1] * layer["out_shape"][2], batch, itemsize, d)
                for layer in layers for d in ("forward", "backward"))
    return total + update_seconds(profile, param_count(layers), itemsize)


def reference_rate(profile, threads=1):
    """FLOP/s of a mid-sized 3x3 conv forward + backward on ``threads``: a
    device's speed for weighting tile sizes between devices of different
    profiles."""
    layer = {"kind": "conv", "index": 0, "inputs": [-1], "in_shape": [64, 52, 52], "out_shape": [64, 52, 52],
             "filters": 64, "size": 3, "stride": 1, "pad": 1, "bn": True, "act": "leaky"}
    total_flops = sum(conv_features(layer, 52 * 52, 1, 4, d)[0] for d in ("forward", "backward"))
    seconds = sum(layer_seconds(profile, layer, 52 * 52, 1, 4, d, threads=threads) for d in ("forward", "backward"))
    return total_flops / seconds
