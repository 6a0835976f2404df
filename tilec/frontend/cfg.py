"""Darknet ``.cfg`` files to the graph IR.

Syntax: ``[section]`` headers, ``key=value`` lines, blank lines, comments
from ``#`` or ``;`` to the end of the line (darknet allows them only at the
start of a line; values never contain them, so trailing comments are
harmless). Whitespace around keys and values is ignored.

Sections (darknet's short aliases in parentheses) and their keys:

- ``[net]`` (``[network]``), first and once: ``height``, ``width``,
  ``channels`` (required); ``batch`` (images per training step, default 1),
  ``learning_rate``, ``momentum``, ``decay`` (darknet's defaults 0.001, 0.9,
  0.0001). Accepted and ignored: ``subdivisions`` (tilec's batch is the whole
  step; darknet would split it in ``subdivisions`` passes) and the training
  schedule and augmentation keys ``max_batches, policy, steps, scales,
  burn_in, angle, saturation, exposure, hue``.
- ``[convolutional]`` (``[conv]``): ``filters``, ``size`` (required);
  ``stride`` (1); ``pad`` (0 or 1: 1 means ``size//2``); ``padding`` (an
  explicit count; it must agree with ``pad=1`` when both are given, because
  darknet lets ``pad`` win while others let ``padding`` win);
  ``batch_normalize`` (0/1, default 0); ``activation`` (linear, leaky, relu;
  default **linear**, not darknet's logistic, which tilec does not support).
- ``[maxpool]`` (``[max]``): ``stride`` (1), ``size`` (= stride), ``padding``
  (total over both borders, = size - 1): darknet's defaults.
- ``[avgpool]`` (``[avg]``): no keys: global average pooling.
- ``[local_avgpool]`` (AlexeyAB's darknet): ``stride`` (1), ``size`` (=
  stride), ``padding`` (= size - 1) as ``[maxpool]``; zero padding that a
  window's average does not count (it divides by the cells inside the map).
- ``[connected]`` (``[conn]``): ``output`` (required), ``activation`` (linear).
- ``[softmax]`` (``[soft]``): ``groups`` (only 1).
- ``[cost]``: ``type`` (only sse, the default).
- ``[route]``: ``layers``, comma-separated; a negative entry is relative to
  the route's own index (``-1`` is the layer before it), others absolute.
- ``[reorg]``: ``stride`` (required; only 2), ``reverse`` (0/1, 0).
  darknet's reorg permutation (``order="darknet"`` in the IR), not a clean
  space-to-depth; the input channels must be divisible by 4. ``reverse=1``
  is darknet's inverse, a depth-to-space, which computes exactly ONNX
  DepthToSpace in DCR mode (``order="onnx", reverse=True`` in the IR).
- ``[region]``: the YOLOv2 detection loss (``tilec_runtime.region`` states
  its exact semantics). ``anchors`` (comma-separated width, height pairs in
  grid cells; darknet's default 0.5 each), ``classes`` (20), ``coords``
  (only 4), ``num`` (1), ``softmax`` (0/1, 0), ``rescore`` (0), ``bias_match``
  (0), ``object_scale``, ``noobject_scale``, ``class_scale``,
  ``coord_scale`` (1 each), ``thresh`` (0.5), ``max`` (truth boxes per
  image, 30), ``jitter`` (0.2: the data loader's crop/scale jitter).
  Accepted and ignored: ``random`` (darknet's multi-scale training) and
  ``absolute``. The input must have ``num * (5 + classes)`` channels.

A loss (``[softmax]``, ``[cost]`` or ``[region]``) must be the last section. Every error is a
:class:`~tilec.errors.ConfigError` reading ``file:line: [section]: what``;
a wrong key or value points at its line, a missing key or an impossible
shape at the section header.
"""
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from tilec.errors import ConfigError, IRError

SECTION_ALIASES = {
    "net": "net", "network": "net",
    "convolutional": "conv", "conv": "conv",
    "maxpool": "maxpool", "max": "maxpool",
    "avgpool": "avgpool", "avg": "avgpool", "local_avgpool": "local_avgpool",
    "connected": "connected", "conn": "connected",
    "softmax": "softmax", "soft": "softmax",
    "cost": "cost", "route": "route", "reorg": "reorg", "region": "region",
}
"""Section name as written -> IR kind (``net`` for the model settings)."""

# Darknet sections a user may reasonably bring; named so the error says
# "not supported yet" rather than "unknown".
UNSUPPORTED = ("yolo", "detection", "shortcut", "upsample", "dropout", "local",
               "batchnorm", "crop", "rnn", "gru", "lstm", "crnn", "deconvolutional")

NET_IGNORED = ("subdivisions", "max_batches", "policy", "steps", "scales", "burn_in",
               "angle", "saturation", "exposure", "hue")
"""[net] keys accepted and ignored (training schedule, augmentation)."""

_INT = re.compile(r"[+-]?\d+\Z")
_REQUIRED = object()


@dataclass
class _Section:
    name: str                                    # as written, lower-case
    line: int                                    # of the header
    options: dict = field(default_factory=dict)  # key -> (value, line)


class _Reader:
    """Typed access to one section's options, with errors that point at the
    option's line (or the header's, for a missing key)."""

    def __init__(self, section, path, known):
        self.section, self.path = section, path
        for key, (_, line) in section.options.items():
            if key not in known:
                expected = ", ".join(known) if known else "none"
                self.fail(f"unknown key {key!r} (keys: {expected})", line)

    def fail(self, message, line=None):
        raise ConfigError(message, path=self.path, line=line or self.section.line,
                          section=self.section.name)

    def _raw(self, key, default):
        if key not in self.section.options:
            if default is _REQUIRED:
                self.fail(f"missing required key {key!r}")
            return None, None
        return self.section.options[key]

    def has(self, key):
        return key in self.section.options

    def int(self, key, default=_REQUIRED, minimum=1, choices=None):
        text, line = self._raw(key, default)
        if text is None:
            return default
        if not _INT.match(text):
            self.fail(f"{key}={text}: expected an integer", line)
        value = int(text)
        if choices is not None and value not in choices:
            self.fail(f"{key}={text}: must be {' or '.join(map(str, choices))}", line)
        if value < minimum:
            kind = "positive" if minimum == 1 else f">= {minimum}"
            self.fail(f"{key}={text}: must be {kind}", line)
        return value

    def float(self, key, default, upper=math.inf):
        text, line = self._raw(key, default)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            self.fail(f"{key}={text}: expected a number", line)
        if not 0 <= value < upper:  # also rejects nan
            bound = f"in [0, {upper:g})" if upper < math.inf else "a finite number >= 0"
            self.fail(f"{key}={text}: must be {bound}", line)
        return value

    def choice(self, key, choices, default):
        text, line = self._raw(key, default)
        if text is None:
            return default
        if text not in choices:
            self.fail(f"{key}={text}: unknown {key} (supported: {', '.join(choices)})", line)
        return text

    def float_list(self, key, default):
        text, line = self._raw(key, default)
        if text is None:
            return default
        try:
            values = [float(item) for item in text.split(",")]
        except ValueError:
            self.fail(f"{key}={text}: expected comma-separated numbers", line)
        if not all(0 < v < math.inf for v in values):
            self.fail(f"{key}={text}: every value must be a positive number", line)
        return values

    def flag(self, key, default):
        return bool(self.int(key, int(default), minimum=0, choices=(0, 1)))

    def int_list(self, key):
        text, line = self._raw(key, _REQUIRED)
        items = [item.strip() for item in text.split(",")]
        if not all(_INT.match(item) for item in items):
            self.fail(f"{key}={text}: expected comma-separated integers", line)
        return [int(item) for item in items], line


def _tokenize(text, path):
    """Split the text into sections; syntax errors only."""
    sections = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.split(r"[#;]", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise ConfigError(f"malformed section header {line!r}", path=path, line=number)
            sections.append(_Section(line[1:-1].strip().lower(), number))
            continue
        if "=" not in line:
            raise ConfigError(f"expected key=value or [section], got {line!r}",
                              path=path, line=number,
                              section=sections[-1].name if sections else None)
        if not sections:
            raise ConfigError(f"{line!r} comes before any [section]", path=path, line=number)
        key, value = (part.strip() for part in line.split("=", 1))
        section = sections[-1]
        if not key or not value:
            raise ConfigError(f"expected key=value, got {line!r}", path=path, line=number,
                              section=section.name)
        if key in section.options:
            raise ConfigError(f"duplicate key {key!r} (first set at line {section.options[key][1]})",
                              path=path, line=number, section=section.name)
        section.options[key] = (value, number)
    return sections


def _read_net(section, path):
    known = ("batch", "height", "width", "channels", "learning_rate", "momentum", "decay")
    r = _Reader(section, path, known + NET_IGNORED)
    if r.has("subdivisions"):
        r.int("subdivisions")  # ignored, but a typo there is still a typo
    return {"input_shape": [r.int("channels"), r.int("height"), r.int("width")],
            "batch": r.int("batch", 1),
            "learning_rate": r.float("learning_rate", 0.001),
            "momentum": r.float("momentum", 0.9, upper=1.0),
            "decay": r.float("decay", 0.0001)}


def _read_layer(kind, section, path, index):
    """(inputs, fields) of a layer section; ``index`` is its layer index."""
    prev = [index - 1]
    if kind == "conv":
        r = _Reader(section, path, ("filters", "size", "stride", "pad", "padding",
                                    "batch_normalize", "activation"))
        size = r.int("size")
        pad = size // 2 if r.int("pad", 0, minimum=0, choices=(0, 1)) else 0
        if r.has("padding"):
            padding = r.int("padding", minimum=0)
            if r.has("pad") and pad and padding != pad:
                r.fail(f"pad=1 (padding {pad}) conflicts with padding={padding}; give one",
                       section.options["padding"][1])
            pad = padding
        return prev, {"filters": r.int("filters"), "size": size, "stride": r.int("stride", 1),
                      "pad": pad, "bn": bool(r.int("batch_normalize", 0, minimum=0, choices=(0, 1))),
                      "act": r.choice("activation", ("linear", "leaky", "relu"), "linear")}
    if kind in ("maxpool", "local_avgpool"):
        r = _Reader(section, path, ("size", "stride", "padding"))
        stride = r.int("stride", 1)
        size = r.int("size", stride)
        fields = {"size": size, "stride": stride, "padding": r.int("padding", size - 1, minimum=0)}
        return prev, fields if kind == "maxpool" else {**fields, "count_pad": False}
    if kind == "avgpool":
        _Reader(section, path, ())
        return prev, {}
    if kind == "connected":
        r = _Reader(section, path, ("output", "activation"))
        return prev, {"output": r.int("output"),
                      "act": r.choice("activation", ("linear", "leaky", "relu"), "linear")}
    if kind == "softmax":
        _Reader(section, path, ("groups",)).int("groups", 1, choices=(1,))
        return prev, {}
    if kind == "cost":
        return prev, {"type": _Reader(section, path, ("type",)).choice("type", ("sse",), "sse")}
    if kind == "route":
        r = _Reader(section, path, ("layers",))
        entries, line = r.int_list("layers")
        inputs = []
        for entry in entries:
            j = index + entry if entry < 0 else entry
            if not 0 <= j < index:
                reach = f"layers 0..{index - 1}" if index else "no layer (it is layer 0)"
                r.fail(f"layers={section.options['layers'][0]}: {entry} is layer {j}, "
                       f"but route {index} can read only {reach}", line)
            inputs.append(j)
        return inputs, {}
    if kind == "reorg":
        # a .cfg is darknet's model: its weights expect darknet's permutation
        # (reverse=1, a depth-to-space, is exactly ONNX DepthToSpace DCR: order onnx)
        r = _Reader(section, path, ("stride", "reverse"))
        reverse = bool(r.int("reverse", 0, minimum=0, choices=(0, 1)))
        return prev, {"stride": r.int("stride", choices=(2,)), "order": "onnx" if reverse else "darknet",
                      "reverse": reverse}
    if kind == "region":
        return prev, _read_region(section, path)
    raise AssertionError(kind)  # SECTION_ALIASES maps only to the kinds above


REGION_IGNORED = ("random", "absolute")
"""[region] keys accepted and ignored (multi-scale training; a no-op in darknet's region layer)."""


def _read_region(section, path):
    known = ("anchors", "classes", "coords", "num", "softmax", "rescore", "bias_match", "object_scale",
             "noobject_scale", "class_scale", "coord_scale", "thresh", "max", "jitter")
    r = _Reader(section, path, known + REGION_IGNORED)
    for key in REGION_IGNORED:
        if r.has(key):
            r.int(key, minimum=0, choices=(0, 1))  # ignored, but a typo there is still a typo
    num = r.int("num", 1)
    anchors = r.float_list("anchors", [0.5] * (2 * num))
    if len(anchors) != 2 * num:
        r.fail(f"anchors: {len(anchors)} values for num={num} (need {2 * num}: a width and a height each)",
               section.options["anchors"][1])
    return {"anchors": anchors, "classes": r.int("classes", 20), "coords": r.int("coords", 4, choices=(4,)),
            "num": num, "softmax": r.flag("softmax", False), "rescore": r.flag("rescore", False),
            "bias_match": r.flag("bias_match", False), "object_scale": r.float("object_scale", 1.0),
            "noobject_scale": r.float("noobject_scale", 1.0), "class_scale": r.float("class_scale", 1.0),
            "coord_scale": r.float("coord_scale", 1.0), "thresh": r.float("thresh", 0.5, upper=1.0),
            "max_boxes": r.int("max", 30), "jitter": r.float("jitter", 0.2, upper=1.0)}


def _read_text(path_or_text, path):
    """(text, path for messages, model name)."""
    is_path = isinstance(path_or_text, Path) or (
        isinstance(path_or_text, str) and "\n" not in path_or_text
        and path_or_text.strip() and not path_or_text.lstrip().startswith(("[", "#", ";")))
    if is_path:
        file = Path(path_or_text)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read: {err}", path=str(path or file)) from None
        return text, str(path or file), file.stem
    if not isinstance(path_or_text, str):
        raise TypeError(f"expected a path or cfg text, got {type(path_or_text).__name__}")
    return path_or_text, str(path or "<cfg>"), Path(path).stem if path else "model"


def parse_cfg(path_or_text, *, path=None):
    """Parse a darknet .cfg into a verified :class:`~tilec.ir.graph.Graph`.

    Parameters
    ----------
    path_or_text : str or pathlib.Path
        A path to a .cfg file, or the cfg text itself (a str that has a
        newline, is blank, or starts with ``[``, ``#`` or ``;``).
    path : str, optional
        The name used in error messages (and for the model's name) when
        text is given; overrides the file name otherwise.

    Returns
    -------
    Graph
        Shapes inferred, ``graph.name`` the file's stem.

    Raises
    ------
    ConfigError
        ``file:line: [section]: what is wrong``.

    Examples
    --------
    >>> g = parse_cfg("[net]\\nheight=8\\nwidth=8\\nchannels=1\\n[avgpool]\\n[softmax]\\n")
    >>> [layer["out_shape"] for layer in g.layers()]
    [[1, 1, 1], [1, 1, 1]]
    """
    from tilec.ir.graph import Graph  # networkx is heavy; only parsing needs it

    text, where, name = _read_text(path_or_text, path)
    sections = _tokenize(text, where)
    if not sections or SECTION_ALIASES.get(sections[0].name) != "net":
        first = sections[0] if sections else None
        raise ConfigError("the first section must be [net]", path=where,
                          line=first.line if first else None,
                          section=first.name if first else None)
    net = _read_net(sections[0], where)
    graph = Graph(net.pop("input_shape"), name=name, **net)
    loss = None
    for section in sections[1:]:
        kind = SECTION_ALIASES.get(section.name)

        def fail(message, section=section):
            raise ConfigError(message, path=where, line=section.line, section=section.name)

        if kind is None:
            if section.name in UNSUPPORTED:
                fail(f"[{section.name}] is not supported yet")
            fail("unknown section")
        if kind == "net":
            fail(f"[net] may appear only once, as the first section (line {sections[0].line})")
        if loss is not None:
            fail(f"a loss must be the last layer, but [{loss.name}] at line {loss.line} "
                 "comes before this section")
        index = len(graph)
        inputs, fields = _read_layer(kind, section, where, index)
        try:
            graph.add_layer(kind, inputs, **fields)
            graph.infer_shapes()  # only the new layer: report a bad shape where it occurs
        except IRError as err:
            fail(f"layer {index}: {getattr(err, 'detail', err)}")
        if kind in ("softmax", "cost", "region"):
            loss = section
    if len(graph) == 0:
        raise ConfigError("no layers after [net]", path=where, line=sections[0].line,
                          section=sections[0].name)
    if loss is None:
        last = sections[-1]
        raise ConfigError("the last section must be a loss ([softmax], [cost] or [region])",
                          path=where, line=last.line, section=last.name)
    return graph.verify()


LOSS_KINDS = ("softmax", "cost", "region")


def read_loss_file(path, kind="region"):
    """The fields of the ``[region]`` (or other loss ``kind``) section of a
    cfg-style file: a model carries no loss of its own (an ONNX file, say)
    and ``--loss region:FILE`` names one.

    FILE may hold just that section, or be a whole darknet .cfg: the other
    sections are not read. It must hold exactly one section of ``kind``.

    Raises
    ------
    ConfigError
        ``file:line: [section]: what``, as for a .cfg.
    """
    text, where, _ = _read_text(Path(path), None)
    found = [s for s in _tokenize(text, where) if SECTION_ALIASES.get(s.name) == kind]
    if len(found) != 1:
        lines = ", ".join(str(s.line) for s in found)
        raise ConfigError(f"expected exactly one [{kind}] section, found {len(found)}"
                          + (f" (lines {lines})" if found else ""), path=where)
    return _read_layer(kind, found[0], where, 0)[1]
