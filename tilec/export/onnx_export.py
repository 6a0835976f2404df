"""A trained tilec model to ONNX, for inference.

Written with the ``onnx`` package's helper API (no torch). What the graph
computes, per layer kind:

- conv: ``Conv`` (bias when there is no batch norm), ``BatchNormalization``
  in inference mode (the running statistics, epsilon 1e-5), ``Relu`` or
  ``LeakyRelu(alpha=0.1)``;
- maxpool: ``MaxPool`` with pads ``[P//2, P//2, P - P//2, P - P//2]`` (top,
  left, bottom, right): darknet-style total padding ``P``;
- avgpool: ``GlobalAveragePool``; local_avgpool: ``AveragePool`` with
  maxpool's pads and ``count_include_pad``; connected: ``Flatten`` then
  ``Gemm`` (``transB=1``) and the activation;
- route: ``Concat`` on channels; reorg: ``SpaceToDepth`` for
  ``order="onnx"``, else ``Reshape -> Transpose -> Reshape`` in its order;
  reversed, ``DepthToSpace`` (DCR for ``onnx``, CRD for ``space_to_depth``);
- the loss: softmax exports the probabilities (``Flatten``, ``Softmax``,
  shape (N, K)); ``[cost]`` (sse) and ``[region]`` export their *input*, the
  raw output before the loss: for a region model the raw conv output,
  without the logistic and softmax that ``tilec forward`` applies, so
  decoding boxes is the consumer's job (anchors in the metadata).

The input is ``images`` (N, C, H, W), the output ``output``, N symbolic.
The model's metadata holds the loss layer (``tilec.loss``) and the [net]
training settings (``tilec.net``) as JSON, so that importing the file
(``tilec.frontend.onnx_import``) gives back the same program.
"""
import json

import numpy as np

from tilec.errors import TilecError

OPSET = 13
INPUT, OUTPUT = "images", "output"
META_LOSS, META_NET = "tilec.loss", "tilec.net"  # as read by tilec.frontend.onnx_import
_SHAPE_KEYS = ("index", "kind", "inputs", "in_shape", "out_shape")

# reorg orders other than onnx: (6-d view per image of input [C, H, W], perm)
_REORG = {"space_to_depth": (lambda c, h, w, s: [c, h // s, s, w // s, s], [0, 1, 3, 5, 2, 4]),
          "darknet": (lambda c, h, w, s: [c // (s * s), h, s, w, s], [0, 3, 5, 1, 2, 4])}


class ExportError(TilecError):
    """The model cannot be written as ONNX; the message names the layer."""


class _Writer:
    """Nodes and initializers, and each layer's output tensor with its rank
    (4: (N, C, H, W); 2: (N, features), after Flatten/Gemm)."""

    def __init__(self, program):
        from onnx import helper

        self.helper = helper
        self.program = program
        self.nodes, self.inits = [], {}
        self.tensors = {-1: (INPUT, 4)}
        self.views = {}  # (layer, rank) -> a Reshape/Flatten of its output, made once

    def const(self, name, array, dtype=np.float32):
        from onnx import numpy_helper
        self.inits[name] = numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name)
        return name

    def node(self, op, inputs, name, **attrs):
        self.nodes.append(self.helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def shape(self, j):
        return self.program[0]["in_shape"] if j == -1 else self.program[j]["out_shape"]

    def map(self, j):
        """Layer ``j``'s output as (N, C, H, W)."""
        name, rank = self.tensors[j]
        if rank == 4:
            return name
        if (j, 4) not in self.views:
            shape = self.const(f"{j}.shape4d", [0, *self.shape(j)], np.int64)
            self.views[j, 4] = self.node("Reshape", [name, shape], f"{j}.map")
        return self.views[j, 4]

    def flat(self, j):
        """Layer ``j``'s output as (N, features)."""
        name, rank = self.tensors[j]
        if rank == 2:
            return name
        if (j, 2) not in self.views:
            self.views[j, 2] = self.node("Flatten", [name], f"{j}.flat", axis=1)
        return self.views[j, 2]

    def activation(self, i, x, act):
        if act == "relu":
            return self.node("Relu", [x], f"{i}.relu")
        if act == "leaky":
            from tilec_runtime.ops import LEAKY_SLOPE
            return self.node("LeakyRelu", [x], f"{i}.leaky", alpha=LEAKY_SLOPE)
        return x


def _conv(w, layer, params, buffers):
    i, k, s, p = layer["index"], layer["size"], layer["stride"], layer["pad"]
    inputs = [w.map(layer["inputs"][0]), w.const(f"{i}.conv.weight", params[f"{i}.conv.weight"])]
    if not layer["bn"]:
        inputs.append(w.const(f"{i}.conv.bias", params[f"{i}.conv.bias"]))
    z = w.node("Conv", inputs, f"{i}.conv", kernel_shape=[k, k], strides=[s, s], pads=[p] * 4)
    if layer["bn"]:
        from tilec_runtime.ops import BN_EPS, BN_MOMENTUM
        stats = [w.const(f"{i}.bn.{key}", (params if key in ("weight", "bias") else buffers)[f"{i}.bn.{key}"])
                 for key in ("weight", "bias", "running_mean", "running_var")]
        z = w.node("BatchNormalization", [z, *stats], f"{i}.bn", epsilon=BN_EPS, momentum=1 - BN_MOMENTUM)
    return w.activation(i, z, layer["act"]), 4


def _pool(w, layer, params, buffers):
    i, k, s, total = layer["index"], layer["size"], layer["stride"], layer["padding"]
    top, end = total // 2, total - total // 2
    op = "MaxPool" if layer["kind"] == "maxpool" else "AveragePool"
    if end >= k:
        # ONNX requires pads smaller than the window
        raise ExportError(f"layer {i} ({layer['kind']}): padding {total} puts {end} >= size {k} at the "
                          f"bottom/right, which ONNX {op} does not allow")
    extra = {} if op == "MaxPool" else {"count_include_pad": int(layer["count_pad"])}
    return w.node(op, [w.map(layer["inputs"][0])], f"{i}.{layer['kind']}", kernel_shape=[k, k],
                  strides=[s, s], pads=[top, top, end, end], **extra), 4


def _avgpool(w, layer, params, buffers):
    i = layer["index"]
    return w.node("GlobalAveragePool", [w.map(layer["inputs"][0])], f"{i}.avgpool"), 4


def _connected(w, layer, params, buffers):
    i = layer["index"]
    y = w.node("Gemm", [w.flat(layer["inputs"][0]), w.const(f"{i}.fc.weight", params[f"{i}.fc.weight"]),
                        w.const(f"{i}.fc.bias", params[f"{i}.fc.bias"])], f"{i}.fc", transB=1)
    return w.activation(i, y, layer["act"]), 2


def _route(w, layer, params, buffers):
    i = layer["index"]
    return w.node("Concat", [w.map(j) for j in layer["inputs"]], f"{i}.route", axis=1), 4


def _reorg(w, layer, params, buffers):
    i, s, order = layer["index"], layer["stride"], layer["order"]
    x = w.map(layer["inputs"][0])
    if layer["reverse"]:
        return w.node("DepthToSpace", [x], f"{i}.reorg", blocksize=s,
                      mode="CRD" if order == "space_to_depth" else "DCR"), 4
    if order == "onnx":
        return w.node("SpaceToDepth", [x], f"{i}.reorg", blocksize=s), 4
    view, perm = _REORG[order]
    c, h, wd = layer["in_shape"]
    v = w.node("Reshape", [x, w.const(f"{i}.view.shape", [0, *view(c, h, wd, s)], np.int64)], f"{i}.view")
    t = w.node("Transpose", [v], f"{i}.transpose", perm=perm)
    out = w.const(f"{i}.reorg.shape", [0, *layer["out_shape"]], np.int64)
    return w.node("Reshape", [t, out], f"{i}.reorg"), 4


def _loss(w, layer, params, buffers):
    j = layer["inputs"][0]
    if layer["kind"] == "softmax":
        return w.node("Softmax", [w.flat(j)], OUTPUT, axis=1), 2
    return w.node("Identity", [w.tensors[j][0]], OUTPUT), w.tensors[j][1]


LAYERS = {"conv": _conv, "maxpool": _pool, "local_avgpool": _pool, "avgpool": _avgpool,
          "connected": _connected, "route": _route,
          "reorg": _reorg, "softmax": _loss, "cost": _loss, "region": _loss}


def export_onnx(program, params, buffers, *, name="tilec", net=None):
    """The ONNX model (``onnx.ModelProto``) of a program and its weights.

    Parameters
    ----------
    program : list of dict
        A validated program (``Graph.to_program()``).
    params, buffers : dict
        Its weights, by state-dict key; written as float32.
    name : str
        The graph's name.
    net : dict, optional
        The [net] settings (``Graph.net``) to keep in the metadata.

    Raises
    ------
    ExportError
        A layer ONNX cannot express, naming it.
    """
    try:
        from onnx import TensorProto, checker, helper
    except ImportError:
        raise ExportError("writing ONNX needs the onnx package: pip install 'tilec[onnx]'") from None

    w = _Writer(program)
    for layer in program:
        w.tensors[layer["index"]] = LAYERS[layer["kind"]](w, layer, params, buffers)
    last = program[-1]
    rank = w.tensors[last["index"]][1]
    dims = ["N", *last["in_shape"]] if rank == 4 else ["N", int(np.prod(last["in_shape"]))]
    graph = helper.make_graph(
        w.nodes, name,
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", *program[0]["in_shape"]])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, dims)],
        initializer=list(w.inits.values()))
    model = helper.make_model(graph, producer_name="tilec", opset_imports=[helper.make_opsetid("", OPSET)])
    loss = {"kind": last["kind"], **{k: v for k, v in last.items() if k not in _SHAPE_KEYS}}
    meta = {META_LOSS: loss}
    if net:
        meta[META_NET] = {k: net[k] for k in ("batch", "learning_rate", "momentum", "decay")}
    helper.set_model_props(model, {k: json.dumps(v) for k, v in meta.items()})
    checker.check_model(model)
    return model


def write_onnx(path, model):
    """Write ``model`` to ``path`` atomically (write, fsync, rename)."""
    from tilec_runtime.files import atomic_write
    atomic_write(path, model.SerializeToString())
