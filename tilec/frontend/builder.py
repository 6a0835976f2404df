"""A small fluent Python API that builds the same IR as a .cfg file.

Examples
--------
>>> m = Model(height=32, width=24, channels=3, batch=2, learning_rate=0.01)
>>> g = m.conv(16, size=3, bn=True, act="leaky").maxpool(2, 2).avgpool().connected(10).softmax().build()
>>> [layer["out_shape"] for layer in g.layers()]
[[16, 32, 24], [16, 16, 12], [16, 1, 1], [10, 1, 1], [10, 1, 1]]

Each call checks its layer at once (a wrong value or an impossible shape
fails at the call that gave it, not at :meth:`Model.build`, and leaves the
model unchanged); every error is a :class:`~tilec.errors.ConfigError` naming
the layer.
"""
from tilec.errors import ConfigError, IRError
from tilec.ir.graph import DEFAULT_NET, Graph


class Model:
    """A model under construction; methods append a layer and return ``self``.

    Parameters
    ----------
    height, width, channels : int
        The input image.
    batch, learning_rate, momentum, decay
        As darknet's [net]; the defaults are darknet's.
    name : str
    """

    def __init__(self, height, width, channels, *, batch=DEFAULT_NET["batch"],
                 learning_rate=DEFAULT_NET["learning_rate"], momentum=DEFAULT_NET["momentum"],
                 decay=DEFAULT_NET["decay"], name="model"):
        try:
            self._graph = Graph([channels, height, width], name=name, batch=batch,
                                learning_rate=learning_rate, momentum=momentum, decay=decay)
        except IRError as err:
            raise ConfigError(str(err)) from None

    def _add(self, kind, inputs=None, **fields):
        # Add to a copy: a call that fails leaves the model as it was.
        graph = self._graph.copy()
        try:
            graph.add_layer(kind, inputs, **fields)
            graph.infer_shapes()
        except IRError as err:
            raise ConfigError(str(err)) from None
        self._graph = graph
        return self

    def conv(self, filters, size=3, stride=1, pad=None, bn=False, act="linear"):
        """Convolution; ``pad`` is the border padding in pixels (``None``:
        ``size // 2``, "same" at stride 1, as a .cfg's ``pad=1``)."""
        return self._add("conv", filters=filters, size=size, stride=stride,
                         pad=size // 2 if pad is None and isinstance(size, int) else pad,
                         bn=bn, act=act)

    def maxpool(self, size, stride, padding=None):
        """Max-pooling; ``padding`` is the total over both borders
        (``None``: ``size - 1``, darknet's default)."""
        if padding is None and isinstance(size, int):
            padding = size - 1
        return self._add("maxpool", size=size, stride=stride, padding=padding)

    def avgpool(self):
        """Global average pooling to ``[C, 1, 1]``."""
        return self._add("avgpool")

    def local_avgpool(self, size, stride, padding=None, count_pad=False):
        """Average pooling over ``size`` x ``size`` windows; ``padding`` as
        :meth:`maxpool`'s (zeros), counted in a window's average only with
        ``count_pad`` (torch's AvgPool2d default; ONNX's and AlexeyAB
        darknet's ``[local_avgpool]`` count only the cells of the map)."""
        if padding is None and isinstance(size, int):
            padding = size - 1
        return self._add("local_avgpool", size=size, stride=stride, padding=padding, count_pad=count_pad)

    def connected(self, output, act="linear"):
        """Fully connected layer with ``output`` units."""
        return self._add("connected", output=output, act=act)

    def softmax(self):
        """Softmax with cross-entropy loss (must be the last layer)."""
        return self._add("softmax")

    def sse(self):
        """Sum-of-squared-errors loss, a .cfg's ``[cost] type=sse``."""
        return self._add("cost", type="sse")

    def region(self, anchors, classes, *, softmax=True, rescore=True, bias_match=True, object_scale=5.0,
               noobject_scale=1.0, class_scale=1.0, coord_scale=1.0, thresh=0.6, max_boxes=30, jitter=0.2):
        """The YOLOv2 region loss (must be the last layer): ``anchors`` is a
        flat list of width, height pairs in grid cells, one pair per anchor;
        the previous layer must have ``len(anchors)/2 * (5 + classes)``
        channels. The defaults are darknet's yolov2-voc settings (its .cfg
        defaults differ: see ``tilec.frontend.cfg``)."""
        anchors = [float(a) for a in anchors] if isinstance(anchors, (list, tuple)) else anchors
        num = len(anchors) // 2 if isinstance(anchors, list) else 0
        return self._add("region", anchors=anchors, classes=classes, coords=4, num=num, softmax=softmax,
                         rescore=rescore, bias_match=bias_match, object_scale=object_scale,
                         noobject_scale=noobject_scale, class_scale=class_scale, coord_scale=coord_scale,
                         thresh=thresh, max_boxes=max_boxes, jitter=jitter)

    def route(self, *layers):
        """Concatenate the channels of ``layers``: negative entries are
        relative to this route (``-1`` is the layer before it), others
        absolute, as in a .cfg."""
        index = len(self._graph)
        inputs = [index + j if isinstance(j, int) and j < 0 else j for j in layers]
        if any(isinstance(j, int) and not isinstance(j, bool) and j < 0 for j in inputs):
            raise ConfigError(f"node {index} (route): layers {list(layers)} reach before layer 0")
        return self._add("route", inputs)

    def reorg(self, stride=2, order="darknet", reverse=False):
        """``[C, H, W] -> [C*s*s, H/s, W/s]``: darknet's reorg permutation (as
        in a .cfg), ``order="space_to_depth"`` (pixel_unshuffle order) or
        ``order="onnx"`` (ONNX SpaceToDepth, blocks first); with ``reverse``
        the inverse, ``[C, H, W] -> [C/s², H*s, W*s]`` (depth-to-space: torch's
        pixel_shuffle for ``space_to_depth``, ONNX DepthToSpace DCR, which is
        also darknet's ``reverse=1``, for ``onnx``); see
        ``tilec_runtime.ops.reorg_forward``."""
        return self._add("reorg", stride=stride, order=order, reverse=reverse)

    def __len__(self):
        return len(self._graph)

    def build(self):
        """A verified copy of the graph, shapes inferred.

        Raises
        ------
        ConfigError
            When the model does not end with exactly one loss, say.
        """
        try:
            return self._graph.copy().verify()
        except IRError as err:
            raise ConfigError(str(err)) from None
