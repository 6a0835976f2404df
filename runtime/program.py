"""The program: a model as the runtime sees it, plain JSON-able data.

A program is a list of layer dicts in execution order; ``layer["index"]`` is
its position (the 0-based index of the .cfg section after ``[net]``).
Fields common to every layer:

- ``kind``: conv | maxpool | avgpool | connected | softmax | cost | region | route | reorg
- ``inputs``: indices of the layers it reads (``-1`` is the network input)
- ``in_shape``: [C, H, W] of its (first) input; ``out_shape``: [C, H, W]

Per kind: conv ``filters, size, stride, pad, bn, act``; maxpool ``size,
stride, padding`` (total padding, darknet's: the map is offset by
``padding // 2`` at the top/left); connected ``output, act``; cost ``type``
(``sse``); reorg ``stride``; region (the YOLOv2 loss, ``tilec_runtime.region``)
``anchors`` (2*num numbers, in cells), ``classes, coords, num, softmax,
rescore, bias_match, object_scale, noobject_scale, class_scale, coord_scale,
thresh, max_boxes`` (truth rows per image) and ``jitter`` (read by the data
loader, not the loss). ``act`` is linear | leaky | relu.

The planner produces programs from its graph IR; the runtime validates what
it reads (a plan comes from a file or a socket) before allocating anything.
"""

from tilec_runtime import region
from tilec_runtime.errors import ProgramError

KINDS = ("conv", "maxpool", "avgpool", "connected", "softmax", "cost", "region", "route", "reorg")
SPATIAL = ("conv", "maxpool")
ACTIVATIONS = ("linear", "leaky", "relu")
LOSSES = ("softmax", "cost", "region")

_REQUIRED = {
    "conv": ("filters", "size", "stride", "pad", "bn", "act"),
    "maxpool": ("size", "stride", "padding"),
    "avgpool": (),
    "connected": ("output", "act"),
    "softmax": (),
    "cost": ("type",),
    "region": ("anchors", "classes", "coords", "num", "softmax", "rescore", "bias_match", "object_scale",
               "noobject_scale", "class_scale", "coord_scale", "thresh", "max_boxes", "jitter"),
    "route": (),
    "reorg": ("stride",),
}


def pads_of(layer):
    """(top, bottom, left, right) border padding of a spatial layer on its whole map."""
    if layer["kind"] == "conv":
        p = layer["pad"]
        return (p, p, p, p)
    top = layer["padding"] // 2
    rest = layer["padding"] - top
    return (top, rest, top, rest)


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
        if kind == "conv" and layer["act"] not in ACTIVATIONS:
            raise ProgramError(f"layer {pos} (conv): unknown activation {layer['act']!r}")
        if kind == "region":
            problem = region.check(layer)
            if problem:
                raise ProgramError(f"layer {pos} (region): {problem}")
        if kind in LOSSES and pos != len(program) - 1:
            raise ProgramError(f"layer {pos} ({kind}): a loss must be the last layer")
    if program[-1]["kind"] not in LOSSES:
        raise ProgramError("the last layer must be a loss (softmax, cost or region)")
    return program
