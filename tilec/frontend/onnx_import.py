"""ONNX models to the graph IR; their initializers become the initial weights.

Supported nodes (default domain, any opset an exporter writes, 9 and up):

- ``Conv`` (2-D, square kernel, equal strides, dilation 1, group 1, with or
  without bias), with a ``BatchNormalization`` and then a ``Relu`` or
  ``LeakyRelu(alpha=0.1)`` that read only its output folded into the same
  tilec conv layer. Padding maps onto tilec's single ``pad`` exactly or is
  refused (``onnx_pads``).
- ``MaxPool`` (pads, ``auto_pad``, ``ceil_mode``) onto darknet-style
  ``padding`` exactly, or refused; ``GlobalAveragePool`` and an
  ``AveragePool`` whose window is the whole map (avgpool); any other
  ``AveragePool`` (local_avgpool, ``count_include_pad`` either way; padding
  as MaxPool's; ``ceil_mode`` only where it keeps the floor's output size,
  since a partial last window's divisor has no tilec equivalent).
- ``Gemm`` (``alpha = beta = 1``, ``transA = 0``), or ``MatMul`` with an
  optional ``Add`` of a bias, on a flattened map, with an optional ``Relu``
  or ``LeakyRelu(0.1)``: a tilec connected layer.
- ``Concat`` on channels (route), ``SpaceToDepth`` (reorg with
  ``order="onnx"``, blocks first), ``DepthToSpace`` (reorg with
  ``reverse``: ``order="onnx"`` for DCR mode, ``"space_to_depth"`` for CRD,
  torch's pixel_shuffle), and ``Reshape -> Transpose -> Reshape`` when it
  is exactly one of tilec's reorg orders, either way (torch's
  pixel_unshuffle exports as ``order="space_to_depth"``).
- ``Flatten``, a ``Reshape`` to (batch, rest), ``Squeeze`` of 1x1 maps,
  ``Identity``, and the constant shape arithmetic exporters emit
  (``onnx_consts``). A trailing ``Softmax``/``LogSoftmax`` over each
  image's values is the softmax loss.

tilec's layers differ from ONNX's in ways that matter here:

- A conv with batch norm has no bias. A conv bias before a batch norm is
  folded into the running mean (``running_mean - bias``) and dropped. This
  is exact for inference, and for training too: batch statistics subtract
  the bias again, so its gradient is zero and it never changes, and the
  running mean, updated with the bias in ONNX's model and without it in
  tilec's, stays ``bias`` apart.
- A conv (without batch norm) or a connected layer always has a bias; one
  the ONNX model lacks starts at zero, and tilec trains it.
- Batch norm must use epsilon 1e-5 and momentum 0.9 (ONNX's convention,
  torch's 0.1), LeakyRelu alpha 0.1: tilec's fixed values.
- A layer after ``DepthToSpace``, which grows the map, runs on whole maps
  (the planner tiles only the leading convs and max-pools).

Every unsupported op, attribute or pattern is a :class:`ConfigError` naming
the file, the node (its name, or ``#position`` and its output), its op type
and the attribute.

Weights are keyed like tilec's state dict (``"{i}.conv.weight"``,
``"{i}.bn.running_mean"``, ...), ``i`` the tilec layer index.
"""
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tilec.errors import ConfigError, IRError
from tilec.frontend.onnx_consts import BATCH, FOLDABLE, fold
from tilec.frontend.onnx_pads import auto_pads, conv_pad, maxpool_padding, onnx_out_size
from tilec.ir.graph import DEFAULT_NET, Graph
from tilec_runtime.ops import BN_EPS, BN_MOMENTUM, LEAKY_SLOPE

LOSS_CHOICES = "softmax, sse or region:FILE"
META_LOSS, META_NET = "tilec.loss", "tilec.net"
"""``metadata_props`` keys of a model exported by tilec (``tilec.export``):
the loss layer and the [net] training settings, as JSON."""

DEFAULT_SOURCE = "the default"
"""``Imported.loss_from`` when the loss is ``import_onnx``'s ``default_loss``."""

# Attributes ONNX stores as float32: compare in float32.
_f32 = np.float32


@dataclass
class Value:
    """A computed tensor: the tilec layer that produces it (-1: the input)
    and that layer's ``[C, H, W]``; ``flat`` when ONNX sees it as
    ``(batch, C*H*W)`` (after Flatten or Gemm)."""
    layer: int
    shape: list
    flat: bool = False

    def dims(self):
        """Its ONNX shape, the batch as :data:`BATCH`."""
        return [BATCH, int(np.prod(self.shape))] if self.flat else [BATCH, *self.shape]


@dataclass
class Imported:
    """What an ONNX file holds for tilec: the graph (ending in its loss),
    its weights by state-dict key, and where the loss came from."""
    graph: Graph
    weights: dict
    loss_from: str = ""


class _Importer:
    """One pass over the nodes in their (topological) order."""

    def __init__(self, model, path):
        from onnx import numpy_helper

        self.path = str(path)
        g = model.graph
        self.nodes = list(g.node)
        self.position = {id(node): pos for pos, node in enumerate(self.nodes)}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.meta = {p.key: p.value for p in model.metadata_props}
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.values = {}
        self.consumers = defaultdict(list)
        for pos, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.consumers[name].append(pos)
        self.inputs = [i for i in g.input if i.name not in self.consts]
        self.outputs = [o.name for o in g.output]
        self.folded = set()       # nodes absorbed into an earlier layer
        self.weights = {}
        self.softmax_node = None  # a trailing Softmax: the softmax loss
        self.views = {}           # tensor -> (Value, view, perm): a space-to-depth under way
        self.batch = None

    # -- errors and lookups -------------------------------------------------

    def where(self, node):
        pos = self.position[id(node)]
        name = f"'{node.name}'" if node.name else f"#{pos} (output '{node.output[0]}')"
        return f"node {name} ({node.op_type})"

    def fail(self, node, detail):
        return ConfigError(f"{self.where(node)}: {detail}", path=self.path)

    def attrs(self, node, defaults):
        """{name: value} over ``defaults``; an attribute not among them is an error naming it."""
        from onnx import helper

        got = dict(defaults)
        for a in node.attribute:
            if a.name not in defaults:
                raise self.fail(node, f"attribute {a.name} is not supported")
            value = helper.get_attribute_value(a)
            got[a.name] = value.decode() if isinstance(value, bytes) else value
        return got

    def value(self, node, k, spatial=True):
        """The computed tensor at input ``k`` (a feature map unless ``spatial`` is False)."""
        name = node.input[k] if k < len(node.input) else ""
        if name not in self.values:
            what = "a constant" if name in self.consts else "missing" if not name else "not computed"
            raise self.fail(node, f"input {k} ('{name}') is {what}: tilec expects the network's feature map there")
        v = self.values[name]
        if spatial and v.flat:
            raise self.fail(node, f"input '{name}' is flattened to (batch, {np.prod(v.shape)}); "
                                  "tilec needs a (batch, C, H, W) map here")
        return v

    def const(self, node, k, what, optional=False):
        name = node.input[k] if k < len(node.input) else ""
        if not name and optional:
            return None
        if name not in self.consts:
            raise self.fail(node, f"input {what} ('{name}') must be an initializer or a constant")
        return np.asarray(self.consts[name])

    def sole_consumer(self, name, ops):
        """The node that alone reads tensor ``name`` (as its first input), if
        its op is in ``ops`` and ``name`` is not a graph output; else None."""
        readers = self.consumers.get(name, [])
        if name in self.outputs or len(readers) != 1:
            return None
        node = self.nodes[readers[0]]
        return node if node.op_type in ops and node.input[0] == name else None

    def unused(self, node, first):
        """Outputs from ``first`` on (BatchNormalization's training outputs,
        MaxPool's indices) must be read by nobody."""
        for name in node.output[first:]:
            if name and (self.consumers.get(name) or name in self.outputs):
                raise self.fail(node, f"output '{name}' is used; tilec computes only the first output")

    def add(self, node, kind, inputs, out_name, flat=False, **fields):
        try:
            index = self.graph.add_layer(kind, inputs, **fields)
            self.graph.infer_shapes()
        except IRError as err:
            raise self.fail(node, getattr(err, "detail", str(err))) from None
        self.values[out_name] = Value(index, self.graph.layer(index)["out_shape"], flat)
        return index

    # -- the network input and settings ---------------------------------------

    def read_input(self):
        from onnx import TensorProto

        inputs = self.inputs
        if len(inputs) != 1:
            raise ConfigError(f"expected one network input, found {len(inputs)}: "
                              f"{', '.join(i.name for i in inputs)}", path=self.path)
        tensor = inputs[0].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        if tensor.elem_type not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16) or len(dims) != 4 \
                or not all(dims[1:]):
            raise ConfigError(f"input '{inputs[0].name}': expected a float (batch, C, H, W) tensor with fixed "
                              f"C, H, W, got shape {dims}", path=self.path)
        self.batch = dims[0] or None
        net = dict(DEFAULT_NET, batch=self.batch or DEFAULT_NET["batch"])
        net.update((k, v) for k, v in self.meta_json(META_NET).items() if k in DEFAULT_NET)
        try:
            self.graph = Graph(dims[1:], name=Path(self.path).stem, **net)
        except IRError as err:
            raise ConfigError(f"input or metadata {META_NET}: {err}", path=self.path) from None
        self.values[inputs[0].name] = Value(-1, dims[1:])

    def meta_json(self, key):
        if key not in self.meta:
            return {}
        try:
            value = json.loads(self.meta[key])
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise ConfigError(f"metadata {key}: expected a JSON object, got {self.meta[key]!r}", path=self.path)
        return value

    # -- the walk ---------------------------------------------------------------

    def run(self):
        self.read_input()
        for pos, node in enumerate(self.nodes):
            if pos in self.folded:
                continue
            if node.domain not in ("", "ai.onnx"):
                raise self.fail(node, f"op domain '{node.domain}' is not supported")
            handler = HANDLERS.get(node.op_type)
            if node.op_type in FOLDABLE and all(not n or n in self.consts for n in node.input) \
                    and node.op_type != "Shape":
                handler = _fold
            if handler is None:
                raise self.fail(node, f"op {node.op_type} is not supported (tilec reads: {', '.join(SUPPORTED)})")
            handler(self, node)
        if len(self.outputs) != 1:
            raise ConfigError(f"expected one graph output, found {len(self.outputs)}: {', '.join(self.outputs)}",
                              path=self.path)
        out = self.outputs[0]
        if out not in self.values or self.values[out].layer == -1:
            raise ConfigError(f"output '{out}' is not computed by any layer tilec can run", path=self.path)
        return self.values[out]


# -- handlers: one per op --------------------------------------------------------

def _fold(imp, node):
    attrs = imp.attrs(node, {a.name: None for a in node.attribute})
    try:
        imp.consts[node.output[0]] = fold(node, attrs, imp.consts, imp.opset)
    except (ValueError, IndexError, KeyError) as err:
        raise imp.fail(node, f"cannot fold this constant: {err}") from None


def _shape(imp, node):
    attrs = imp.attrs(node, {"start": 0, "end": None})
    dims = imp.value(node, 0, spatial=False).dims()
    imp.consts[node.output[0]] = np.asarray(dims[attrs["start"]:attrs["end"]], dtype=np.int64)


def _identity(imp, node):
    imp.attrs(node, {})
    imp.values[node.output[0]] = imp.value(node, 0, spatial=False)


def _square(imp, node, name, values, default=None):
    """One number from an attribute that ONNX gives per axis (kernel, strides)."""
    values = default if values is None else list(values)
    if values is None or len(values) != 2 or values[0] != values[1]:
        raise imp.fail(node, f"attribute {name}={values}: tilec needs two equal values (H and W)")
    return int(values[0])


def _pads(imp, node, a, shape, kernel, stride):
    """ONNX's [top, left, bottom, right] from ``pads`` or ``auto_pad``."""
    if a["auto_pad"] not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise imp.fail(node, f"attribute auto_pad={a['auto_pad']} is not supported")
    if a["auto_pad"] != "NOTSET":
        (top, bottom), (left, right) = (auto_pads(a["auto_pad"], n, kernel, stride) for n in shape[1:])
        return [top, left, bottom, right]
    pads = [0, 0, 0, 0] if a["pads"] is None else list(a["pads"])
    if len(pads) != 4 or min(pads) < 0:
        raise imp.fail(node, f"attribute pads={pads}: expected 4 non-negative values")
    return pads


def _activation(imp, name):
    """(act, output name) after folding a Relu/LeakyRelu that alone reads ``name``."""
    node = imp.sole_consumer(name, ("Relu", "LeakyRelu"))
    if node is None:
        return "linear", name
    if node.op_type == "LeakyRelu":
        alpha = imp.attrs(node, {"alpha": 0.01})["alpha"]
        if _f32(alpha) != _f32(LEAKY_SLOPE):
            raise imp.fail(node, f"attribute alpha={alpha:g}: tilec's leaky activation has slope {LEAKY_SLOPE}")
    else:
        imp.attrs(node, {})
    imp.folded.add(imp.position[id(node)])
    return ("leaky" if node.op_type == "LeakyRelu" else "relu"), node.output[0]


def _conv(imp, node):
    a = imp.attrs(node, {"auto_pad": "NOTSET", "dilations": None, "group": 1, "kernel_shape": None,
                         "pads": None, "strides": None})
    x = imp.value(node, 0)
    w = imp.const(node, 1, "W")
    bias = imp.const(node, 2, "B", optional=True)
    if a["group"] != 1:
        raise imp.fail(node, f"attribute group={a['group']}: only group=1 is supported")
    if a["dilations"] is not None and any(d != 1 for d in a["dilations"]):
        raise imp.fail(node, f"attribute dilations={list(a['dilations'])}: only 1 is supported")
    if w.ndim != 4 or w.shape[1] != x.shape[0]:
        raise imp.fail(node, f"weights of shape {w.shape} do not fit an input of {x.shape[0]} channels")
    k = _square(imp, node, "kernel_shape", a["kernel_shape"], list(w.shape[2:]))
    if list(w.shape[2:]) != [k, k]:
        raise imp.fail(node, f"attribute kernel_shape={list(a['kernel_shape'])} disagrees with weights {w.shape}")
    s = _square(imp, node, "strides", a["strides"], [1, 1])
    pads = _pads(imp, node, a, x.shape, k, s)
    pad = conv_pad(x.shape[1:], k, s, pads)
    if pad is None:
        raise imp.fail(node, f"attribute pads={pads} (top, left, bottom, right) on a {x.shape[1]}x{x.shape[2]} "
                             "map: tilec's conv pads every border alike, and no such pad gives the same output")
    f = w.shape[0]
    out = node.output[0]
    bn = imp.sole_consumer(out, ("BatchNormalization",))
    index = len(imp.graph)
    weights = {f"{index}.conv.weight": w}
    if bn is not None:
        out = _batch_norm(imp, bn, index, f, bias, weights)
    else:
        weights[f"{index}.conv.bias"] = np.zeros(f, w.dtype) if bias is None else bias.reshape(f)
    act, out = _activation(imp, out)
    imp.add(node, "conv", [x.layer], out, filters=f, size=k, stride=s, pad=pad, bn=bn is not None, act=act)
    imp.weights.update(weights)


def _batch_norm(imp, node, index, f, conv_bias, weights):
    """Fold a BatchNormalization into conv layer ``index``; returns its output name."""
    a = imp.attrs(node, {"epsilon": 1e-5, "momentum": 0.9, "spatial": 1, "training_mode": 0})
    if _f32(a["epsilon"]) != _f32(BN_EPS):
        raise imp.fail(node, f"attribute epsilon={a['epsilon']:g}: tilec's batch norm uses {BN_EPS:g}")
    if _f32(a["momentum"]) != _f32(1 - BN_MOMENTUM):
        raise imp.fail(node, f"attribute momentum={a['momentum']:g}: tilec updates running statistics with "
                             f"ONNX momentum {1 - BN_MOMENTUM:g} (torch's {BN_MOMENTUM:g})")
    if a["spatial"] != 1:
        raise imp.fail(node, f"attribute spatial={a['spatial']}: only per-channel batch norm (1) is supported")
    imp.unused(node, 1)
    scale, beta, mean, var = (imp.const(node, k, what) for k, what in
                              ((1, "scale"), (2, "B"), (3, "input_mean"), (4, "input_var")))
    for what, v in (("scale", scale), ("B", beta), ("input_mean", mean), ("input_var", var)):
        if v.size != f:
            raise imp.fail(node, f"input {what} has {v.size} values for {f} channels")
    if conv_bias is not None:
        # the bias cancels in batch norm; only the running mean remembers it
        mean = mean.astype(np.float64).reshape(f) - conv_bias.astype(np.float64).reshape(f)
    weights.update({f"{index}.bn.weight": scale.reshape(f), f"{index}.bn.bias": beta.reshape(f),
                    f"{index}.bn.running_mean": mean.reshape(f), f"{index}.bn.running_var": var.reshape(f)})
    imp.folded.add(imp.position[id(node)])
    return node.output[0]


def _maxpool(imp, node):
    a = imp.attrs(node, {"auto_pad": "NOTSET", "ceil_mode": 0, "dilations": None, "kernel_shape": None,
                         "pads": None, "storage_order": 0, "strides": None})
    x = imp.value(node, 0)
    imp.unused(node, 1)
    if a["dilations"] is not None and any(d != 1 for d in a["dilations"]):
        raise imp.fail(node, f"attribute dilations={list(a['dilations'])}: only 1 is supported")
    k = _square(imp, node, "kernel_shape", a["kernel_shape"])
    s = _square(imp, node, "strides", a["strides"], [1, 1])
    pads = _pads(imp, node, a, x.shape, k, s)
    padding = maxpool_padding(x.shape[1:], k, s, pads, bool(a["ceil_mode"]))
    if padding is None:
        raise imp.fail(node, f"attribute pads={pads} (top, left, bottom, right), ceil_mode={a['ceil_mode']} on a "
                             f"{x.shape[1]}x{x.shape[2]} map: no darknet-style padding (total P, P//2 at the "
                             "top/left, the same on both axes) gives the same windows")
    imp.add(node, "maxpool", [x.layer], node.output[0], size=k, stride=s, padding=padding)


def _global_avgpool(imp, node):
    imp.attrs(node, {})
    imp.add(node, "avgpool", [imp.value(node, 0).layer], node.output[0])


def _avgpool(imp, node):
    a = imp.attrs(node, {"auto_pad": "NOTSET", "ceil_mode": 0, "count_include_pad": 0, "dilations": None,
                         "kernel_shape": None, "pads": None, "strides": None})
    x = imp.value(node, 0)
    if a["dilations"] is not None and any(d != 1 for d in a["dilations"]):
        raise imp.fail(node, f"attribute dilations={list(a['dilations'])}: only 1 is supported")
    kernel = list(a["kernel_shape"] or [])
    if kernel == x.shape[1:] and a["auto_pad"] in ("NOTSET", "VALID") and not any(a["pads"] or []):
        imp.add(node, "avgpool", [x.layer], node.output[0])
        return
    k = _square(imp, node, "kernel_shape", a["kernel_shape"])
    s = _square(imp, node, "strides", a["strides"], [1, 1])
    pads = _pads(imp, node, a, x.shape, k, s)
    floor = [onnx_out_size(n, k, s, begin, end) for n, begin, end in zip(x.shape[1:], pads[:2], pads[2:])]
    ceil = [onnx_out_size(n, k, s, begin, end, True) for n, begin, end in zip(x.shape[1:], pads[:2], pads[2:])]
    padding = maxpool_padding(x.shape[1:], k, s, pads, False) if floor == ceil or not a["ceil_mode"] else None
    if padding is None:
        raise imp.fail(node, f"attribute pads={pads} (top, left, bottom, right), ceil_mode={a['ceil_mode']} on a "
                             f"{x.shape[1]}x{x.shape[2]} map: no darknet-style padding (total P, P//2 at the "
                             "top/left, the same on both axes) gives the same windows and divisors")
    imp.add(node, "local_avgpool", [x.layer], node.output[0], size=k, stride=s, padding=padding,
            count_pad=bool(a["count_include_pad"]))


def _flatten(imp, node):
    axis = imp.attrs(node, {"axis": 1})["axis"]
    x = imp.value(node, 0, spatial=False)
    if axis != 1:
        raise imp.fail(node, f"attribute axis={axis}: only axis=1 (batch, rest) is supported")
    imp.values[node.output[0]] = Value(x.layer, x.shape, flat=True)


def _squeeze(imp, node):
    attrs = imp.attrs(node, {"axes": None})
    x = imp.value(node, 0, spatial=False)
    axes = attrs["axes"] if imp.opset < 13 else (
        list(imp.const(node, 1, "axes").reshape(-1)) if len(node.input) > 1 and node.input[1] else None)
    if x.flat or x.shape[1:] != [1, 1] or sorted(int(a) % 4 for a in (axes or [2, 3])) != [2, 3]:
        raise imp.fail(node, f"only squeezing a (batch, C, 1, 1) map to (batch, C) is supported (axes {axes})")
    imp.values[node.output[0]] = Value(x.layer, x.shape, flat=True)


def _reshape(imp, node):
    if node.input[0] in imp.views:
        return _reorg(imp, node, *imp.views[node.input[0]])
    allowzero = imp.attrs(node, {"allowzero": 0})["allowzero"]
    x = imp.value(node, 0, spatial=False)
    target = [int(v) for v in imp.const(node, 1, "shape").reshape(-1)]
    if allowzero:
        raise imp.fail(node, "attribute allowzero=1 is not supported")
    dims = x.dims()
    out = [dims[i] if t == 0 and i < len(dims) else t for i, t in enumerate(target)]
    size = int(np.prod(x.shape))
    if out[:1] == [-1] and BATCH not in out and -1 not in out[1:] and int(np.prod(out[1:])) == size:
        out[0] = BATCH
    if out[:1] == [imp.batch]:
        out[0] = BATCH  # a model exported with a fixed batch size
    rest = out[1:]
    if out[:1] != [BATCH] or BATCH in rest or rest.count(-1) > 1 or any(v < -1 or v == 0 for v in rest):
        raise imp.fail(node, f"shape {target} on an input of shape (batch, {', '.join(map(str, dims[1:]))}): "
                             "tilec reads only reshapes that keep the batch dimension first")
    known = int(np.prod([v for v in rest if v != -1]))
    if -1 in rest:
        if known == 0 or size % known:
            raise imp.fail(node, f"shape {target} does not divide {size} values per image")
        rest[rest.index(-1)] = size // known
    if int(np.prod(rest)) != size:
        raise imp.fail(node, f"shape {target} does not hold {size} values per image")
    if len(rest) == 1:
        imp.values[node.output[0]] = Value(x.layer, x.shape, flat=True)
    elif rest == x.shape:
        imp.values[node.output[0]] = Value(x.layer, x.shape)
    elif len(rest) == 5 and not x.flat:
        _reorg_view(imp, node, x, rest)
    else:
        raise imp.fail(node, f"shape {target}: tilec reads (batch, C*H*W), (batch, C, H, W) unchanged, or the "
                             "6-d view of a space-to-depth or depth-to-space")


# A space-to-depth (or depth-to-space) written out, as torch exports
# pixel_unshuffle (pixel_shuffle before opset 11): Reshape to
# a 6-d view, Transpose, Reshape back to 4-d. Each step records what it saw
# in ``imp.views`` (the shape constants of later steps may come later in the
# node order); the last one becomes one reorg layer, or an error.

def _reorg_orders(c, h, w, s):
    """{(order, reverse, perm): the view per image of an input [C, H, W]}
    for stride ``s``."""
    return {("space_to_depth", False, (0, 1, 3, 5, 2, 4)): [c, h // s, s, w // s, s],
            ("onnx", False, (0, 3, 5, 1, 2, 4)): [c, h // s, s, w // s, s],
            ("darknet", False, (0, 3, 5, 1, 2, 4)): [c // (s * s), h, s, w, s],
            ("space_to_depth", True, (0, 1, 4, 2, 5, 3)): [c // (s * s), s, s, h, w],
            ("onnx", True, (0, 3, 4, 1, 5, 2)): [s, s, c // (s * s), h, w]}


def _next_step(imp, node, op):
    if imp.sole_consumer(node.output[0], (op,)) is None:
        raise imp.fail(node, "a 6-d view is read only as Reshape -> Transpose -> Reshape (a space-to-depth or "
                             "depth-to-space), each read by the next alone")


def _reorg_view(imp, node, x, view):
    _next_step(imp, node, "Transpose")
    imp.views[node.output[0]] = (x, view, None)


def _transpose(imp, node):
    perm = tuple(imp.attrs(node, {"perm": None})["perm"] or ())
    if node.input[0] not in imp.views:
        raise imp.fail(node, "a Transpose is read only as the middle of Reshape -> Transpose -> Reshape "
                             "(a space-to-depth or depth-to-space)")
    _next_step(imp, node, "Reshape")
    x, view, _ = imp.views[node.input[0]]
    imp.views[node.output[0]] = (x, view, perm)


def _reorg(imp, node, x, view, perm):
    """The last Reshape of a space-to-depth (or depth-to-space): one reorg
    layer in the order that (view, perm) computes."""
    imp.attrs(node, {"allowzero": 0})
    c, h, w = x.shape
    final = [int(v) for v in imp.const(node, 1, "shape").reshape(-1)]
    found = [(o, rev, s) for s in {v for v in view[:3] if v >= 2}
             for (o, rev, p), v in _reorg_orders(c, h, w, s).items() if p == perm and v == view]
    if len(found) == 1 and len(final) == 4 and final[0] in (0, -1, BATCH, imp.batch):
        order, reverse, s = found[0]
        want = [c // (s * s), h * s, w * s] if reverse else [c * s * s, h // s, w // s]
        if final[1:] == want and not (c % (s * s) if reverse else h % s or w % s):
            imp.add(node, "reorg", [x.layer], node.output[0], stride=s, order=order, reverse=reverse)
            return
    raise imp.fail(node, f"a view {view} of a {c}x{h}x{w} map, permuted {list(perm)} and reshaped to "
                         f"{final}: not a space-to-depth or depth-to-space in one of tilec's reorg orders")


def _connected(imp, node, x, weight, bias):
    """A connected layer for ``node`` (Gemm, or MatMul [+ Add]): weight (out, in)."""
    if weight.shape[1] != int(np.prod(x.shape)):
        raise imp.fail(node, f"weights {weight.shape} (out, in) do not fit {int(np.prod(x.shape))} inputs")
    out_units = weight.shape[0]
    if bias is None:
        bias = np.zeros(out_units, weight.dtype)
    elif bias.shape not in ((out_units,), (1, out_units)):
        raise imp.fail(node, f"bias of shape {bias.shape}: tilec needs one value per output ({out_units})")
    act, out = _activation(imp, node.output[0])
    index = imp.add(node, "connected", [x.layer], out, flat=True, output=out_units, act=act)
    imp.weights.update({f"{index}.fc.weight": weight, f"{index}.fc.bias": bias.reshape(out_units)})


def _gemm(imp, node):
    a = imp.attrs(node, {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0})
    x = imp.value(node, 0, spatial=False)
    if not x.flat:
        raise imp.fail(node, "input must be flattened to (batch, features) (Flatten or Reshape first)")
    b = imp.const(node, 1, "B")
    c = imp.const(node, 2, "C", optional=True)
    for key in ("alpha",) + (("beta",) if c is not None else ()):
        if a[key] != 1.0:
            raise imp.fail(node, f"attribute {key}={a[key]:g}: tilec's connected layer computes x W^T + b")
    if a["transA"]:
        raise imp.fail(node, "attribute transA=1 is not supported")
    if b.ndim != 2:
        raise imp.fail(node, f"input B has shape {b.shape}, not a matrix")
    _connected(imp, node, x, b if a["transB"] else b.T, c)


def _matmul(imp, node):
    imp.attrs(node, {})
    x = imp.value(node, 0, spatial=False)
    if not x.flat:
        raise imp.fail(node, "input must be flattened to (batch, features) (Flatten or Reshape first)")
    w = imp.const(node, 1, "B")
    if w.ndim != 2:
        raise imp.fail(node, f"input B has shape {w.shape}, not a matrix")
    readers = imp.consumers.get(node.output[0], [])
    add = None
    if node.output[0] not in imp.outputs and len(readers) == 1 and imp.nodes[readers[0]].op_type == "Add":
        add = imp.nodes[readers[0]]  # either input may be the bias
    bias = None
    if add is not None:
        other = [n for n in add.input if n != node.output[0]]
        if len(other) != 1 or other[0] not in imp.consts:
            raise imp.fail(add, "only the addition of a constant bias to a MatMul is supported")
        imp.attrs(add, {})
        bias = np.asarray(imp.consts[other[0]])
        imp.folded.add(imp.position[id(add)])
    _connected(imp, add if add is not None else node, x, w.T, bias)


def _concat(imp, node):
    axis = imp.attrs(node, {"axis": None})["axis"]
    xs = [imp.value(node, k) for k in range(len(node.input))]
    if axis not in (1, -3):
        raise imp.fail(node, f"attribute axis={axis}: only concatenation along channels (1) is supported")
    imp.add(node, "route", [x.layer for x in xs], node.output[0])


def _space_to_depth(imp, node):
    s = imp.attrs(node, {"blocksize": None})["blocksize"]
    imp.add(node, "reorg", [imp.value(node, 0).layer], node.output[0], stride=s, order="onnx", reverse=False)


DEPTH_TO_SPACE = {"DCR": "onnx", "CRD": "space_to_depth"}
"""ONNX DepthToSpace mode -> the reorg order whose reverse it is."""


def _depth_to_space(imp, node):
    a = imp.attrs(node, {"blocksize": None, "mode": "DCR"})
    x = imp.value(node, 0)
    if a["mode"] not in DEPTH_TO_SPACE:
        raise imp.fail(node, f"attribute mode={a['mode']}: only DCR and CRD are defined")
    imp.add(node, "reorg", [x.layer], node.output[0], stride=a["blocksize"], order=DEPTH_TO_SPACE[a["mode"]],
            reverse=True)


def _softmax(imp, node):
    axis = imp.attrs(node, {"axis": 1 if imp.opset < 13 else -1})["axis"]
    x = imp.value(node, 0, spatial=False)
    rank = 2 if x.flat else 4
    if node.output[0] not in imp.outputs or imp.consumers.get(node.output[0]):
        raise imp.fail(node, "a Softmax is read only as the model's last node (the softmax loss)")
    # before opset 13 Softmax flattens from its axis; since, it runs along it alone
    if axis % rank != 1 or (imp.opset >= 13 and not x.flat and x.shape[1:] != [1, 1]):
        raise imp.fail(node, f"attribute axis={axis} on a tensor of shape {x.dims()}: tilec's softmax is over "
                             "each image's values (axis 1 of (batch, K))")
    imp.softmax_node = node
    imp.values[node.output[0]] = x


def _constants_only(imp, node):
    raise imp.fail(node, f"{node.op_type} is supported only on constants (shape arithmetic)")


def _unsupported_alone(imp, node):
    raise imp.fail(node, f"{node.op_type} is supported only folded into the Conv before it (or Gemm/MatMul for "
                         "an activation), reading that node's output alone")


HANDLERS = {
    "Identity": _identity, "Shape": _shape, "Conv": _conv, "MaxPool": _maxpool,
    "GlobalAveragePool": _global_avgpool, "AveragePool": _avgpool, "Flatten": _flatten, "Squeeze": _squeeze,
    "Reshape": _reshape, "Transpose": _transpose, "Gemm": _gemm, "MatMul": _matmul, "Concat": _concat,
    "SpaceToDepth": _space_to_depth, "DepthToSpace": _depth_to_space, "Softmax": _softmax, "LogSoftmax": _softmax,
    "BatchNormalization": _unsupported_alone, "Relu": _unsupported_alone, "LeakyRelu": _unsupported_alone,
    "Add": _unsupported_alone, "Gather": _constants_only, "Unsqueeze": _constants_only, "Cast": _constants_only,
}
SUPPORTED = sorted(set(HANDLERS) | set(FOLDABLE))


# -- the entry points ------------------------------------------------------------

def _load(path):
    try:
        import onnx
    except ImportError:
        raise ConfigError("reading ONNX needs the onnx package: pip install 'tilec[onnx]'", path=str(path)) from None
    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise ConfigError("no such file", path=str(path)) from None
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise ConfigError(f"cannot read as an ONNX model: {type(exc).__name__}: {exc}", path=str(path)) from None


def read_onnx(path):
    """(importer after the walk, output Value): the layers and weights, no loss yet."""
    imp = _Importer(_load(path), path)
    return imp, imp.run()


def _loss_spec(imp, loss, default_loss):
    """(kind, fields, where it came from) of the loss layer."""
    trailing = imp.softmax_node
    meta = imp.meta_json(META_LOSS)
    if loss is not None:
        kind, fields = parse_loss(loss)
        if trailing is not None and kind != "softmax":
            raise imp.fail(trailing, f"the model ends in a softmax, the softmax loss; --loss {loss} does not apply")
        return kind, fields, f"--loss {loss}"
    if meta:
        fields = dict(meta)
        return fields.pop("kind", None), fields, f"metadata {META_LOSS}"
    if trailing is not None:
        return "softmax", {}, f"its last node, {imp.where(trailing)}"
    if default_loss is None:
        raise ConfigError(f"an ONNX model carries no loss: give --loss {LOSS_CHOICES}", path=imp.path)
    kind, fields = parse_loss(default_loss)
    return kind, fields, DEFAULT_SOURCE


def parse_loss(text):
    """(kind, fields) of a ``--loss`` value: ``softmax``, ``sse`` or ``region:FILE``.

    >>> parse_loss("sse")
    ('cost', {'type': 'sse'})
    """
    if text == "softmax":
        return "softmax", {}
    if text == "sse":
        return "cost", {"type": "sse"}
    if text.startswith("region:") and len(text) > 7:
        from tilec.frontend.cfg import read_loss_file
        return "region", read_loss_file(text[7:], "region")
    raise ConfigError(f"--loss {text!r}: expected {LOSS_CHOICES}")


def import_onnx(path, loss=None, default_loss=None):
    """Read an ONNX model: a verified graph ending in its loss, and its weights.

    Parameters
    ----------
    path : str or Path
    loss : str, optional
        ``--loss``: ``softmax``, ``sse`` or ``region:FILE``. Without it the
        loss is the file's own: the ``tilec.loss`` metadata of a model
        tilec exported, else a trailing Softmax.
    default_loss : str, optional
        The loss when neither names one (commands that do not train pass
        ``sse``: the model's output as it is); None makes that an error.

    Returns
    -------
    Imported

    Raises
    ------
    ConfigError
        Naming the file and the node, its op type and the attribute.
    """
    imp, out = read_onnx(path)
    kind, fields, source = _loss_spec(imp, loss, default_loss)
    try:
        imp.graph.add_layer(kind, [out.layer], **fields)
        graph = imp.graph.verify().infer_shapes()
    except IRError as err:
        raise ConfigError(f"loss ({source}): {getattr(err, 'detail', err)}", path=imp.path) from None
    return Imported(graph, imp.weights, source)


def onnx_weights(path):
    """The initializers of an ONNX model as tilec weights, by state-dict key."""
    return read_onnx(path)[0].weights

