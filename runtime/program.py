"""The program: a model as the runtime sees it, plain JSON-able data.

A program is a list of layer dicts in execution order; ``layer["index"]`` is
its position (the 0-based index of the .cfg section after ``[net]``).
Fields common to every layer:

- ``kind``: conv | maxpool | avgpool | local_avgpool | connected | softmax | cost | region | route | reorg
- ``inputs``: indices of the layers it reads (``-1`` is the network input)
- ``in_shape``: [C, H, W] of its (first) input; ``out_shape``: [C, H, W]

Per kind: conv ``filters, size, stride, pad, bn, act``; maxpool ``size,
stride, padding`` (total padding, darknet's: the map is offset by
``padding // 2`` at the top/left); avgpool (global) none; local_avgpool
``size, stride, padding`` (as maxpool's, zero padding) and ``count_pad``
(whether padding cells count in a window's average); connected ``output,
act``; cost ``type`` (``sse``); reorg ``stride, order, reverse`` (``order``
is ``darknet``, the permutation of darknet's reorg layer that YOLOv2's
weights were trained with, ``space_to_depth``, a clean space-to-depth in
torch's pixel_unshuffle order, or ``onnx``, ONNX SpaceToDepth's
blocks-first order; ``reverse`` the inverse map, depth-to-space, for the
last two: darknet's own reverse is the onnx order's, see
``ops.reorg_forward``); region (the YOLOv2 loss,
``tilec_runtime.region``) ``anchors`` (2*num numbers, in cells), ``classes, coords, num, softmax,
rescore, bias_match, object_scale, noobject_scale, class_scale, coord_scale,
thresh, max_boxes`` (truth rows per image) and ``jitter`` (read by the data
loader, not the loss). ``act`` is linear | leaky | relu.

The planner produces programs from its graph IR; the runtime validates what
it reads (a plan comes from a file or a socket) before allocating anything.
"""

from tilec_runtime import region
from tilec_runtime.errors import ProgramError

KINDS = ("conv", "maxpool", "avgpool", "local_avgpool", "connected", "softmax", "cost", "region", "route", "reorg")
SPATIAL = ("conv", "maxpool")
ACTIVATIONS = ("linear", "leaky", "relu")
LOSSES = ("softmax", "cost", "region")
REORG_ORDERS = ("darknet", "space_to_depth", "onnx")

_REQUIRED = {
    "conv": ("filters", "size", "stride", "pad", "bn", "act"),
    "maxpool": ("size", "stride", "padding"),
    "avgpool": (),
    "local_avgpool": ("size", "stride", "padding", "count_pad"),
    "connected": ("output", "act"),
    "softmax": (),
    "cost": ("type",),
    "region": ("anchors", "classes", "coords", "num", "softmax", "rescore", "bias_match", "object_scale",
               "noobject_scale", "class_scale", "coord_scale", "thresh", "max_boxes", "jitter"),
    "route": (),
    "reorg": ("stride", "order", "reverse"),
}


def pads_of(layer):
    """(top, bottom, left, right) border padding of a spatial layer on its whole map."""
    if layer["kind"] == "conv":
        p = layer["pad"]
        return (p, p, p, p)
    top = layer["padding"] // 2
    rest = layer["padding"] - top
    return (top, rest, top, rest)


def members_of(group):
    """The ranks of a plan group's tiles, sorted: a channel-split group's
    member index is a rank's position here."""
    return sorted(t["device"] for t in group["tiles"])


def tensor_shape(program, t):
    """(C, H, W) of tensor ``t``: layer ``t``'s output, or the image (-1)."""
    return program[t]["out_shape"] if t >= 0 else program[0]["in_shape"]


def message_shape(program, m, batch):
    """(B, C, h, w) of message ``m``: its channels (all of its tensor's
    unless it names a range) of its rectangle."""
    c = tensor_shape(program, m["tensor"])[0]
    if "channels" in m:
        c = m["channels"][1] - m["channels"][0] + 1
    return (batch, c, m["rows"][1] - m["rows"][0] + 1, m["cols"][1] - m["cols"][0] + 1)


def param_shapes(layer):
    """{key: shape} of the trainable parameters of a layer (state-dict keys)."""
    i, kind = layer["index"], layer["kind"]
    if kind == "conv":
        c = layer["in_shape"][0]
        f, k = layer["filters"], layer["size"]
        shapes = {f"{i}.conv.weight": (f, c, k, k)}
        if layer["bn"]:
            shapes[f"{i}.bn.weight"] = (f,)
            shapes[f"{i}.bn.bias"] = (f,)
        else:
            shapes[f"{i}.conv.bias"] = (f,)
        return shapes
    if kind == "connected":
        c, h, w = layer["in_shape"]
        return {f"{i}.fc.weight": (layer["output"], c * h * w), f"{i}.fc.bias": (layer["output"],)}
    return {}


def buffer_shapes(layer):
    """{key: shape} of non-trainable state (batch-norm running statistics)."""
    if layer["kind"] == "conv" and layer["bn"]:
        i, f = layer["index"], layer["filters"]
        return {f"{i}.bn.running_mean": (f,), f"{i}.bn.running_var": (f,)}
    return {}


def decays(key):
    """Weight decay applies to conv and connected weights only."""
    return key.endswith(".conv.weight") or key.endswith(".fc.weight")


def _int(layer, key, low):
    v = layer[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ProgramError(f"layer {layer['index']} ({layer['kind']}): {key} must be an integer >= {low}, got {v!r}")
    return v


def _check_fields(layer):
    """Field types and values of one layer (a plan may come off the network)."""
    kind, i = layer["kind"], layer["index"]
    if kind == "conv":
        for key, low in (("filters", 1), ("size", 1), ("stride", 1), ("pad", 0)):
            _int(layer, key, low)
        if not isinstance(layer["bn"], bool):
            raise ProgramError(f"layer {i} (conv): bn must be true or false, got {layer['bn']!r}")
    elif kind in ("maxpool", "local_avgpool"):
        for key, low in (("size", 1), ("stride", 1), ("padding", 0)):
            _int(layer, key, low)
        if kind == "local_avgpool" and not isinstance(layer["count_pad"], bool):
            raise ProgramError(f"layer {i} (local_avgpool): count_pad must be true or false, "
                               f"got {layer['count_pad']!r}")
    elif kind == "connected":
        _int(layer, "output", 1)
    elif kind == "reorg":
        _int(layer, "stride", 1)
        if layer["order"] not in REORG_ORDERS:
            raise ProgramError(f"layer {i} (reorg): order must be one of {', '.join(REORG_ORDERS)}, "
                               f"got {layer['order']!r}")
        if not isinstance(layer["reverse"], bool):
            raise ProgramError(f"layer {i} (reorg): reverse must be true or false, got {layer['reverse']!r}")
    elif kind == "cost" and layer["type"] != "sse":
        raise ProgramError(f"layer {i} (cost): only type sse is supported, got {layer['type']!r}")
    if kind in ("conv", "connected") and layer["act"] not in ACTIVATIONS:
        raise ProgramError(f"layer {i} ({kind}): unknown activation {layer['act']!r}")


def _fmt(shape):
    return "x".join(str(v) for v in shape)


def out_shape(layer, in_shapes):
    """The output shape ``[C, H, W]`` of ``layer`` from the shapes of its
    inputs (one per ``layer["inputs"]``), by darknet's rules; the one place
    shapes are inferred (the planner's IR calls it too).

    - conv: ``(H + 2*pad - size) // stride + 1``
    - maxpool, local_avgpool: ``(H + padding - size) // stride + 1``
      (``padding`` is the total over both borders; a local_avgpool window
      must hold a cell of the map)
    - avgpool: ``[C, 1, 1]``; connected: ``[output, 1, 1]``
    - softmax, cost, region: the shape of their input (region: ``C`` must be
      ``num * (4 + 1 + classes)``, :func:`tilec_runtime.region.check`)
    - route: the channels of its inputs concatenated (all the same H, W)
    - reorg: ``[C*s*s, H/s, W/s]`` (H and W divisible by ``s``; with
      ``order="darknet"`` also C divisible by ``s*s``: see
      ``ops.reorg_forward``); reversed ``[C/s², H*s, W*s]`` (C divisible
      by ``s*s``)

    ``layer`` needs ``kind``, the kind's fields and, for a route, ``inputs``.
    Raises ValueError saying why the inputs do not fit (without naming the
    layer: the caller knows how to name it).
    """
    kind = layer["kind"]
    c, h, w = in_shapes[0]
    if kind in ("conv", "maxpool", "local_avgpool"):
        k, s = layer["size"], layer["stride"]
        top, bottom = pads_of(layer)[:2]
        if h + top + bottom < k or w + top + bottom < k:
            what, pad = ("kernel", f"pad {top}") if kind == "conv" else ("window", f"padding {top + bottom}")
            raise ValueError(f"{what} {k}x{k} is larger than the padded input {h + top + bottom}x"
                             f"{w + top + bottom} (input {_fmt(in_shapes[0])}, {pad})")
        ho, wo = (h + top + bottom - k) // s + 1, (w + top + bottom - k) // s + 1
        if kind == "local_avgpool" and (top >= k or (ho - 1) * s - top > h - 1 or (wo - 1) * s - top > w - 1):
            raise ValueError(f"padding {top + bottom} on input {_fmt(in_shapes[0])}: a {k}x{k} window "
                             f"at stride {s} would average padding alone")
        return [layer["filters"] if kind == "conv" else c, ho, wo]
    if kind == "avgpool":
        return [c, 1, 1]
    if kind == "connected":
        return [layer["output"], 1, 1]
    if kind == "route":
        inputs = layer["inputs"]
        for j, shape in zip(inputs[1:], in_shapes[1:]):
            if list(shape[1:]) != [h, w]:
                raise ValueError(f"inputs have different sizes: layer {inputs[0]} is "
                                 f"{_fmt(in_shapes[0])}, layer {j} is {_fmt(shape)} (CxHxW)")
        return [sum(shape[0] for shape in in_shapes), h, w]
    if kind == "reorg" and layer["reverse"]:
        s = layer["stride"]
        if layer["order"] == "darknet":
            # darknet's reverse=1 is exactly DepthToSpace DCR: one name for one map
            raise ValueError("a reversed darknet reorg is order onnx (DepthToSpace DCR), which computes it")
        if c % (s * s):
            raise ValueError(f"input {_fmt(in_shapes[0])}: depth-to-space needs channels divisible by "
                             f"stride² = {s * s}")
        return [c // (s * s), h * s, w * s]
    if kind == "reorg":
        s = layer["stride"]
        if h % s or w % s:
            raise ValueError(f"input {_fmt(in_shapes[0])} is not divisible by stride {s}")
        if layer["order"] == "darknet" and c % (s * s):
            # darknet's index arithmetic reads the input as (C/s², H*s, W*s)
            raise ValueError(f"input {_fmt(in_shapes[0])}: darknet's reorg needs channels divisible by "
                             f"stride² = {s * s}")
        return [c * s * s, h // s, w // s]
    if kind == "region":
        problem = region.check({**layer, "in_shape": list(in_shapes[0])})
        if problem:
            raise ValueError(problem)
    if kind in LOSSES:
        return [c, h, w]
    raise ValueError(f"unknown kind {kind!r}")


def validate(program):
    """Check that ``program`` is a well-formed list of layers; raise ProgramError."""
    if not isinstance(program, list) or not program:
        raise ProgramError("program must be a non-empty list of layers")
    for pos, layer in enumerate(program):
        if not isinstance(layer, dict):
            raise ProgramError(f"layer {pos}: not an object")
        kind = layer.get("kind")
        if kind not in KINDS:
            raise ProgramError(f"layer {pos}: unknown kind {kind!r}")
        if layer.get("index") != pos:
            raise ProgramError(f"layer {pos}: index {layer.get('index')!r} out of order")
        for key in ("inputs", "in_shape", "out_shape") + _REQUIRED[kind]:
            if key not in layer:
                raise ProgramError(f"layer {pos} ({kind}): missing field {key!r}")
        for shape_key in ("in_shape", "out_shape"):
            shape = layer[shape_key]
            if not (isinstance(shape, list) and len(shape) == 3
                    and all(isinstance(v, int) and v > 0 for v in shape)):
                raise ProgramError(f"layer {pos} ({kind}): bad {shape_key} {shape!r}")
        inputs = layer["inputs"]
        if not inputs or not all(isinstance(j, int) and -1 <= j < pos for j in inputs):
            raise ProgramError(f"layer {pos} ({kind}): inputs {inputs!r} must name earlier layers")
        _check_fields(layer)
        in_shapes = [tensor_shape(program, j) for j in inputs]
        if layer["in_shape"] != in_shapes[0]:
            raise ProgramError(f"layer {pos} ({kind}): in_shape {layer['in_shape']} is not its input's shape {in_shapes[0]}")
        try:
            expected = out_shape(layer, in_shapes)
        except ValueError as err:
            raise ProgramError(f"layer {pos} ({kind}): {err}") from None
        if layer["out_shape"] != expected:
            raise ProgramError(f"layer {pos} ({kind}): out_shape {layer['out_shape']} does not follow from "
                               f"its inputs {in_shapes}")
        if kind in LOSSES and pos != len(program) - 1:
            raise ProgramError(f"layer {pos} ({kind}): a loss must be the last layer")
    if program[-1]["kind"] not in LOSSES:
        raise ProgramError("the last layer must be a loss (softmax, cost or region)")
    return program
