"""The graph IR: a model as a DAG of layers with inferred shapes.

A :class:`Graph` wraps a private ``networkx.DiGraph``. Node ``-1`` is the
network input (it carries the input shape ``[C, H, W]``); nodes ``0 .. n-1``
are the layers in execution order, each holding the fields of the runtime's
program contract (``tilec_runtime.program``): ``kind``, ``inputs`` and the
kind's own fields. An edge ``j -> i`` means layer ``i`` reads the output of
``j``. Callers never touch the networkx graph: they go through checked
methods, and :meth:`Graph.to_networkx` hands out a copy.

Layers are immutable once added and the input shape is fixed at
construction, so a shape, once inferred, stays valid; :meth:`infer_shapes`
only computes the shapes still missing, which lets a frontend infer after
every layer and report the first impossible shape where it occurs.

Shapes follow darknet's rules, inferred by the runtime's
``tilec_runtime.program.out_shape`` (the runtime validates plans that come
off the network with the same function).

Examples
--------
>>> g = Graph([3, 8, 8], name="toy")
>>> g.add_layer("conv", [-1], filters=4, size=3, stride=1, pad=1, bn=True, act="leaky")
0
>>> g.add_layer("avgpool", [0])
1
>>> g.add_layer("softmax", [1])
2
>>> g.infer_shapes().layer(0)["out_shape"]
[4, 8, 8]
>>> [layer["kind"] for layer in g.to_program()]
['conv', 'avgpool', 'softmax']
"""
import copy
import math

import networkx as nx

from tilec.errors import IRError
from tilec_runtime.program import ACTIVATIONS, KINDS, LOSSES, REORG_ORDERS, out_shape, validate

INPUT = -1
"""The node id of the network input."""

# Darknet's defaults for the [net] settings a model does not give.
DEFAULT_NET = {"batch": 1, "learning_rate": 0.001, "momentum": 0.9, "decay": 0.0001}


# -- field checks: each returns an error text, or None when the value is fine

def _pos_int(v):
    # bool is an int subclass; True as a filter count is a bug, not a 1.
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return f"must be a positive integer, got {v!r}"
    return None


def _nonneg_int(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        return f"must be a non-negative integer, got {v!r}"
    return None


def _bool(v):
    return None if isinstance(v, bool) else f"must be True or False, got {v!r}"


def _act(v):
    return None if v in ACTIVATIONS else f"must be one of {', '.join(ACTIVATIONS)}, got {v!r}"


def _reorg_order(v):
    return None if v in REORG_ORDERS else f"must be one of {', '.join(REORG_ORDERS)}, got {v!r}"


def _cost_type(v):
    return None if v == "sse" else f"must be 'sse', got {v!r}"


def _nonneg_num(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        return f"must be a finite number >= 0, got {v!r}"
    return None


def _fraction(v):
    return _nonneg_num(v) or (None if v <= 1 else f"must be in [0, 1], got {v!r}")


def _coords(v):
    return None if v == 4 and not isinstance(v, bool) else f"must be 4 (x, y, w, h), got {v!r}"


def _anchors(v):
    if not isinstance(v, list) or not v or len(v) % 2 or any(_nonneg_num(a) or a == 0 for a in v):
        return f"must be a non-empty list of width, height pairs of positive numbers, got {v!r}"
    return None


FIELDS = {
    "conv": {"filters": _pos_int, "size": _pos_int, "stride": _pos_int, "pad": _nonneg_int,
             "bn": _bool, "act": _act},
    "maxpool": {"size": _pos_int, "stride": _pos_int, "padding": _nonneg_int},
    "avgpool": {},
    "local_avgpool": {"size": _pos_int, "stride": _pos_int, "padding": _nonneg_int, "count_pad": _bool},
    "connected": {"output": _pos_int, "act": _act},
    "softmax": {},
    "cost": {"type": _cost_type},
    "region": {"anchors": _anchors, "classes": _pos_int, "coords": _coords, "num": _pos_int, "softmax": _bool,
               "rescore": _bool, "bias_match": _bool, "object_scale": _nonneg_num, "noobject_scale": _nonneg_num,
               "class_scale": _nonneg_num, "coord_scale": _nonneg_num, "thresh": _fraction,
               "max_boxes": _pos_int, "jitter": _fraction},
    "route": {},
    "reorg": {"stride": _pos_int, "order": _reorg_order, "reverse": _bool},
}
"""Per kind, the fields a layer must have and how each is checked (the
field names are the runtime's; a test keeps the two in step)."""


def node_error(node, kind, detail):
    """An IRError naming ``node``; ``.node`` and ``.detail`` let a frontend
    re-word it with its own location (a .cfg line)."""
    err = IRError(f"node {node} ({kind}): {detail}")
    err.node, err.detail = node, detail
    return err


class Graph:
    """A model: layers in execution order, their connections and shapes.

    Parameters
    ----------
    input_shape : sequence of 3 int
        ``[C, H, W]`` of one input image.
    name : str
        The model's name (a .cfg file's stem, say).
    batch, learning_rate, momentum, decay
        The training settings of darknet's ``[net]``; defaults are darknet's.
    """

    def __init__(self, input_shape, *, name="model", batch=DEFAULT_NET["batch"],
                 learning_rate=DEFAULT_NET["learning_rate"], momentum=DEFAULT_NET["momentum"],
                 decay=DEFAULT_NET["decay"]):
        shape = list(input_shape)
        if len(shape) != 3 or any(_pos_int(v) for v in shape):
            raise IRError(f"input shape must be 3 positive integers [C, H, W], got {input_shape!r}")
        if _pos_int(batch):
            raise IRError(f"net: batch {_pos_int(batch)}")
        for key, value, upper in (("learning_rate", learning_rate, math.inf),
                                  ("momentum", momentum, 1.0), ("decay", decay, math.inf)):
            # "not 0 <= value < upper" also rejects NaN.
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < upper:
                raise IRError(f"net: {key} must be a number in [0, {upper}), got {value!r}")
        self.name = str(name)
        self._net = {"batch": batch, "height": shape[1], "width": shape[2], "channels": shape[0],
                     "learning_rate": float(learning_rate), "momentum": float(momentum),
                     "decay": float(decay)}
        self._g = nx.DiGraph()
        self._g.add_node(INPUT, kind="input", out_shape=shape)
        self._n = 0

    # -- reading -------------------------------------------------------------

    @property
    def net(self):
        """The [net] settings (a copy): batch, height, width, channels,
        learning_rate, momentum, decay."""
        return dict(self._net)

    @property
    def input_shape(self):
        """``[C, H, W]`` of the network input."""
        return list(self._g.nodes[INPUT]["out_shape"])

    def __len__(self):
        return self._n

    def __repr__(self):
        return f"Graph({self.name!r}, input {'x'.join(map(str, self.input_shape))}, {self._n} layers)"

    def _check_node(self, i, allow_input=False):
        if isinstance(i, bool) or not isinstance(i, int) or not (
                (allow_input and i == INPUT) or 0 <= i < self._n):
            raise IRError(f"no layer {i!r} (layers are 0..{self._n - 1})")

    def layer(self, i):
        """A copy of layer ``i`` as a program-style dict (``index``, ``kind``,
        ``inputs``, fields, and ``in_shape``/``out_shape`` once inferred)."""
        self._check_node(i)
        attrs = copy.deepcopy(self._g.nodes[i])
        return {"index": i, **attrs}

    def layers(self):
        """Copies of all layers, in execution order."""
        return [self.layer(i) for i in range(self._n)]

    def predecessors(self, i):
        """The nodes layer ``i`` reads, in its ``inputs`` order (-1 is the input)."""
        self._check_node(i)
        return list(self._g.nodes[i]["inputs"])

    def consumers(self, i):
        """The layers reading node ``i`` (which may be -1, the input), ascending."""
        self._check_node(i, allow_input=True)
        return sorted(self._g.successors(i))

    def to_networkx(self):
        """A deep copy of the underlying ``networkx.DiGraph``."""
        return copy.deepcopy(self._g)

    def copy(self):
        """An independent copy of this graph."""
        return copy.deepcopy(self)

    # -- building ------------------------------------------------------------

    def add_layer(self, kind, inputs=None, **fields):
        """Append a layer and return its index.

        Parameters
        ----------
        kind : str
            One of ``tilec_runtime.program.KINDS``.
        inputs : list of int, optional
            Nodes it reads; default: the previous layer (or the input, -1).
            A route reads one or more earlier nodes, every other kind one.
        **fields
            Exactly the kind's fields (:data:`FIELDS`), e.g. ``filters=16``.

        Raises
        ------
        IRError
            Naming the new node, when the kind, a field or an input is wrong.
        """
        i = self._n
        if kind not in FIELDS:
            raise IRError(f"node {i}: unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
        if inputs is None:
            inputs = [i - 1]
        inputs = list(inputs)
        if not inputs:
            raise node_error(i, kind, "has no inputs")
        if kind != "route" and len(inputs) != 1:
            raise node_error(i, kind, f"must have exactly one input, got {inputs}")
        for j in inputs:
            # Nodes are added in order, so "exists" and "precedes" are one check.
            if isinstance(j, bool) or not isinstance(j, int) or not -1 <= j < i:
                raise node_error(i, kind, f"input {j!r} is not an earlier node (-1..{i - 1})")
        spec = FIELDS[kind]
        unknown = sorted(set(fields) - set(spec))
        if unknown:
            known = ", ".join(spec) or "none"
            raise node_error(i, kind, f"unknown field(s) {', '.join(unknown)} (fields: {known})")
        missing = [key for key in spec if key not in fields]
        if missing:
            raise node_error(i, kind, f"missing field(s) {', '.join(missing)}")
        for key, check in spec.items():
            problem = check(fields[key])
            if problem:
                raise node_error(i, kind, f"{key} {problem}")
        self._g.add_node(i, kind=kind, inputs=inputs, **{k: fields[k] for k in spec})
        for j in inputs:
            self._g.add_edge(j, i)
        self._n += 1
        return i

    # -- shapes and checks ---------------------------------------------------

    def _shape_of(self, i, shapes):
        node = self._g.nodes[i]
        ins = [shapes[j] for j in node["inputs"]]
        layer = {"kind": node["kind"], "inputs": node["inputs"], **{k: node[k] for k in FIELDS[node["kind"]]}}
        try:
            return ins[0], out_shape(layer, ins)
        except ValueError as err:
            raise node_error(i, node["kind"], str(err)) from None

    def infer_shapes(self):
        """Fill ``in_shape`` (of the first input) and ``out_shape`` of every
        layer that lacks them; return ``self``.

        Raises
        ------
        IRError
            Naming the first node whose shape is impossible.
        """
        shapes = {INPUT: self.input_shape}
        for i in range(self._n):
            node = self._g.nodes[i]
            if "out_shape" not in node:
                node["in_shape"], node["out_shape"] = self._shape_of(i, shapes)
            shapes[i] = node["out_shape"]
        return self

    def verify(self):
        """Check the whole graph; return ``self``.

        Checks: at least one layer; acyclic; every layer's inputs exist,
        precede it and match the edges; arity; losses only at the end and a
        loss as the last layer; every shape possible and equal to any stored
        one.

        Raises
        ------
        IRError
            Naming the failing node, e.g. ``node 5 (route): ...``.
        """
        if self._n == 0:
            raise IRError("graph has no layers")
        if set(self._g.nodes) != set(range(INPUT, self._n)):
            raise IRError(f"graph nodes must be -1..{self._n - 1}")
        if not nx.is_directed_acyclic_graph(self._g):
            cycle = nx.find_cycle(self._g)
            # Name the node that reads a later one: the edge that closes the cycle.
            late, node = next((u, v) for u, v, *_ in cycle if u >= v)
            path = " -> ".join(str(u) for u, *_ in cycle) + f" -> {cycle[0][0]}"
            raise node_error(node, self._g.nodes[node].get("kind"),
                             f"reads later node {late}, a cycle: {path}")
        for i in range(self._n):
            node = self._g.nodes[i]
            kind, inputs = node.get("kind"), node.get("inputs", [])
            if kind not in FIELDS:
                raise node_error(i, kind, "unknown kind")
            for j in inputs:
                if not -1 <= j < i:
                    raise node_error(i, kind, f"input {j} does not exist before it")
            if not inputs or (kind != "route" and len(inputs) != 1):
                raise node_error(i, kind, f"bad number of inputs {inputs}")
            if set(self._g.predecessors(i)) != set(inputs):
                raise node_error(i, kind, f"edges {sorted(self._g.predecessors(i))} "
                                          f"do not match inputs {inputs}")
            if kind in LOSSES and i != self._n - 1:
                raise node_error(i, kind, f"a loss must be the last layer (last is {self._n - 1})")
        last = self._n - 1
        if self._g.nodes[last]["kind"] not in LOSSES:
            raise node_error(last, self._g.nodes[last]["kind"],
                             f"the last layer must be a loss ({' or '.join(LOSSES)})")
        shapes = {INPUT: self.input_shape}
        for i in range(self._n):
            in_shape, out = self._shape_of(i, shapes)
            node = self._g.nodes[i]
            for key, value in (("in_shape", in_shape), ("out_shape", out)):
                if key in node and node[key] != value:
                    raise node_error(i, node["kind"], f"stored {key} {node[key]} != inferred {value}")
            shapes[i] = out
        return self

    def to_program(self):
        """The runtime's program: a list of JSON-able layer dicts.

        Verifies the graph and infers shapes first; the result passes
        ``tilec_runtime.program.validate``.
        """
        self.verify().infer_shapes()
        program = []
        for i in range(self._n):
            node = self._g.nodes[i]
            layer = {"index": i, "kind": node["kind"], "inputs": list(node["inputs"]),
                     "in_shape": list(node["in_shape"]), "out_shape": list(node["out_shape"])}
            layer.update((key, node[key]) for key in FIELDS[node["kind"]])
            program.append(layer)
        return validate(program)
