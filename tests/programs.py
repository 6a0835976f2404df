"""Test-only helpers: build valid programs by hand, and hypothesis strategies
that generate random valid programs.

Shapes follow darknet's formulas:

- conv: ``out = (n + 2*pad - size) // stride + 1``
- maxpool: ``out = (n + padding - size) // stride + 1`` (``padding`` is the
  total padding, darknet's default ``size - 1``; the map is offset by
  ``padding // 2`` at the top/left)
- avgpool: ``(C, 1, 1)``; connected: ``(output, 1, 1)``
- local_avgpool: as maxpool
- route: channels summed, spatial size of its (equal-sized) inputs
- reorg: ``(C * s * s, H / s, W / s)`` (darknet order: C divisible by ``s * s``);
  reversed ``(C / (s * s), H * s, W * s)``
- softmax / cost: the shape of their input

This deliberately does not use the planner's IR or cfg frontend: the tests
of the runtime must not depend on them.
"""
import copy

from hypothesis import strategies as st

from tilec_runtime.program import ACTIVATIONS, REORG_ORDERS, validate


class ShapeError(ValueError):
    """The requested layer does not fit the map it reads."""


class ProgramBuilder:
    """Appends layers one at a time; each method returns the new layer's index.

    ``src`` (default: the previous layer, or ``-1`` for the first layer) is
    the index of the layer read; ``-1`` is the network input.
    """

    def __init__(self, c, h, w):
        self.input_shape = [int(c), int(h), int(w)]
        self.layers = []

    # -- helpers --------------------------------------------------------
    def shape(self, j):
        """[C, H, W] of the output of layer ``j`` (``-1``: the network input)."""
        return list(self.input_shape if j == -1 else self.layers[j]["out_shape"])

    @property
    def last(self):
        return len(self.layers) - 1

    def _src(self, src):
        return self.last if src is None else src

    def _add(self, kind, inputs, out_shape, **fields):
        if any(v < 1 for v in out_shape):
            raise ShapeError(f"{kind}: output shape {out_shape} has an empty dimension")
        layer = dict(index=len(self.layers), kind=kind, inputs=list(inputs),
                     in_shape=self.shape(inputs[0]), out_shape=[int(v) for v in out_shape], **fields)
        self.layers.append(layer)
        return layer["index"]

    # -- layers ---------------------------------------------------------
    def conv(self, filters, size, stride=1, pad="same", bn=False, act="linear", src=None):
        """``pad="same"`` is darknet's ``pad=1`` (``size // 2``); an int is explicit."""
        src = self._src(src)
        c, h, w = self.shape(src)
        p = size // 2 if pad == "same" else int(pad)
        if min(h, w) + 2 * p < size:
            raise ShapeError(f"conv {size}x{size} pad {p} does not fit a {h}x{w} map")
        ho = (h + 2 * p - size) // stride + 1
        wo = (w + 2 * p - size) // stride + 1
        return self._add("conv", [src], [filters, ho, wo], filters=filters, size=size, stride=stride,
                         pad=p, bn=bool(bn), act=act)

    def maxpool(self, size=2, stride=2, padding=None, src=None):
        """``padding=None`` is darknet's default ``size - 1``."""
        src = self._src(src)
        c, h, w = self.shape(src)
        padding = size - 1 if padding is None else int(padding)
        if min(h, w) + padding < size:
            raise ShapeError(f"maxpool {size} padding {padding} does not fit a {h}x{w} map")
        ho = (h + padding - size) // stride + 1
        wo = (w + padding - size) // stride + 1
        return self._add("maxpool", [src], [c, ho, wo], size=size, stride=stride, padding=padding)

    def avgpool(self, src=None):
        src = self._src(src)
        return self._add("avgpool", [src], [self.shape(src)[0], 1, 1])

    def local_avgpool(self, size=2, stride=2, padding=None, count_pad=False, src=None):
        """``padding=None`` is ``size - 1``, as maxpool's."""
        src = self._src(src)
        c, h, w = self.shape(src)
        padding = size - 1 if padding is None else int(padding)
        if not avg_windows_fit(h, w, size, stride, padding):
            raise ShapeError(f"local_avgpool {size}/{stride} padding {padding} does not fit a {h}x{w} map")
        return self._add("local_avgpool", [src], [c, (h + padding - size) // stride + 1,
                                                  (w + padding - size) // stride + 1],
                         size=size, stride=stride, padding=padding, count_pad=bool(count_pad))

    def connected(self, output, act="linear", src=None):
        src = self._src(src)
        return self._add("connected", [src], [output, 1, 1], output=output, act=act)

    def route(self, *srcs):
        if not srcs:
            raise ShapeError("route needs at least one input")
        shapes = [self.shape(j) for j in srcs]
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise ShapeError(f"route inputs have different spatial sizes: {shapes}")
        return self._add("route", list(srcs), [sum(s[0] for s in shapes)] + shapes[0][1:])

    def reorg(self, stride=2, src=None, order="darknet", reverse=False):
        src = self._src(src)
        c, h, w = self.shape(src)
        if reverse:
            if c % (stride * stride):
                raise ShapeError(f"depth-to-space stride {stride} needs channels divisible by {stride * stride}, "
                                 f"got {c}")
            return self._add("reorg", [src], [c // (stride * stride), h * stride, w * stride], stride=stride,
                             order=order, reverse=True)
        if h % stride or w % stride:
            raise ShapeError(f"reorg stride {stride} needs a map divisible by it, got {h}x{w}")
        if order == "darknet" and c % (stride * stride):
            raise ShapeError(f"darknet reorg stride {stride} needs channels divisible by {stride * stride}, got {c}")
        return self._add("reorg", [src], [c * stride * stride, h // stride, w // stride], stride=stride, order=order,
                         reverse=False)

    def softmax(self, src=None):
        src = self._src(src)
        return self._add("softmax", [src], self.shape(src))

    def cost(self, src=None, type="sse"):
        src = self._src(src)
        return self._add("cost", [src], self.shape(src), type=type)

    def build(self):
        """A validated deep copy of the program."""
        return validate(copy.deepcopy(self.layers))


# -- hypothesis strategies ------------------------------------------------

CONV_SIZES = (1, 3, 5)
POOL_SHAPES = ((2, 2), (2, 1), (3, 2))  # (size, stride)


@st.composite
def conv_args(draw, c, h, w):
    """Arguments of a conv of ``c`` input channels that fits an ``h`` x ``w``
    map (1x1 always does). No batch norm after a conv whose filters are a
    single weight (1 channel, 1x1): batch norm makes that weight's gradient
    exactly zero, and what any two implementations then compute is their
    own rounding noise, amplified by 1/|w|: nothing to compare."""
    n = min(h, w)
    size = draw(st.sampled_from([k for k in CONV_SIZES if n + 2 * (k - 1) >= k]))
    pads = ["same"] + [p for p in range(size) if n + 2 * p >= size]
    return dict(filters=draw(st.integers(1, 4)), size=size, stride=draw(st.integers(1, 2)),
                pad=draw(st.sampled_from(pads)), bn=draw(st.booleans()) and c * size * size > 1,
                act=draw(st.sampled_from(ACTIVATIONS)))


@st.composite
def maxpool_args(draw, h, w):
    """Arguments of a maxpool that fits, or None if none does."""
    n = min(h, w)
    options = [(k, s, p) for k, s in POOL_SHAPES for p in [None, *range(k)] if n + (k - 1 if p is None else p) >= k]
    if not options:
        return None
    size, stride, padding = draw(st.sampled_from(options))
    return dict(size=size, stride=stride, padding=padding)


def _same_hw(b, hw, before):
    """Earlier outputs (including the input, -1) whose spatial size is ``hw``."""
    return [j for j in range(-1, before) if b.shape(j)[1:] == list(hw)]


def _reorg(b, src, order, draw):
    """A stride-2 reorg of ``src``, behind a 1x1 conv to 4 channels when
    darknet's order needs them."""
    if order == "darknet" and b.shape(src)[0] % 4:
        src = b.conv(4, 1, 1, 0, bn=draw(st.booleans()), act="leaky", src=src)
    return b.reorg(2, src=src, order=order)


def avg_windows_fit(h, w, size, stride, padding):
    """Whether every window of an average pool over an h x w map (total
    ``padding``, ``padding // 2`` at the top/left) holds a cell of the map."""
    top = padding // 2
    ho, wo = (h + padding - size) // stride + 1, (w + padding - size) // stride + 1
    return (min(h, w) + padding >= size and top < size and (ho - 1) * stride - top < h
            and (wo - 1) * stride - top < w)


@st.composite
def local_avgpool_args(draw, h, w):
    """Arguments of a local_avgpool whose every window holds a cell of the map, or None."""
    options = [(k, s, p) for k, s in POOL_SHAPES for p in range(2 * k - 1) if avg_windows_fit(h, w, k, s, p)]
    if not options:
        return None
    size, stride, padding = draw(st.sampled_from(options))
    return dict(size=size, stride=stride, padding=padding, count_pad=draw(st.booleans()))


TAILS = ("classify", "regress", "route", "reorg", "depth_to_space", "local_avgpool")


@st.composite
def random_stacks(draw, max_prefix=5, tails=TAILS):
    """A random valid program: a spatial prefix of 1..max_prefix conv/maxpool
    layers on a (C in 1..4, H and W in 5..23 independently) input, then a tail:

    - ``classify``: avgpool, connected, softmax
    - ``regress``: conv 1x1, cost sse
    - ``route``: route of the last output with an earlier same-sized one
      (or itself), then classify or regress
    - ``reorg``: YOLO-style passthrough (route of the last output with the
      reorg of an earlier map twice its size) when one exists, else reorg
      of the last output (needs even H, W), then classify or regress. The
      order is drawn; darknet's needs channels divisible by 4, so as in
      YOLOv2 a 1x1 conv to 4 channels goes first where they are not.
    - ``depth_to_space``: a 1x1 conv to 4 or 8 channels where the channels
      are not a multiple of 4, a reversed reorg (either order) doubling the
      map, optionally a 3x3 conv on it, then classify or regress
    - ``local_avgpool``: an average pool (drawn window, padding, count_pad)
      of the last output, then classify or regress
    """
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(5, 23)), draw(st.integers(5, 23))
    b = ProgramBuilder(c, h, w)
    for _ in range(draw(st.integers(1, max_prefix))):
        cc, hh, ww = b.shape(b.last)
        pool = draw(maxpool_args(hh, ww)) if draw(st.integers(0, 2)) == 0 else None
        if pool is not None:
            b.maxpool(**pool)
        else:
            b.conv(**draw(conv_args(cc, hh, ww)))
    tail = draw(st.sampled_from(tails))
    last = b.last
    _, hh, ww = b.shape(last)
    if tail == "route":
        others = _same_hw(b, (hh, ww), last)
        b.route(last, draw(st.sampled_from(others)) if others else last)
    elif tail == "reorg":
        big = [j for j in range(-1, last) if b.shape(j)[1:] == [2 * hh, 2 * ww]]
        order = draw(st.sampled_from(REORG_ORDERS))
        if big:
            r = _reorg(b, draw(st.sampled_from(big)), order, draw)
            b.route(r, last)
        elif hh % 2 == 0 and ww % 2 == 0:
            _reorg(b, last, order, draw)
    elif tail == "depth_to_space":
        if b.shape(last)[0] % 4:
            b.conv(draw(st.sampled_from([4, 8])), 1, 1, 0, bn=draw(st.booleans()), act="leaky")
        b.reorg(2, order=draw(st.sampled_from(["onnx", "space_to_depth"])), reverse=True)
        if draw(st.booleans()):
            b.conv(**draw(conv_args(*b.shape(b.last))))
    elif tail == "local_avgpool":
        pool = draw(local_avgpool_args(hh, ww))
        if pool is not None:
            b.local_avgpool(**pool)
    if tail == "classify" or (tail != "regress" and draw(st.booleans())):
        b.avgpool()
        b.connected(draw(st.integers(2, 5)), act=draw(st.sampled_from(ACTIVATIONS)))
        b.softmax()
    else:
        b.conv(draw(st.integers(1, 3)), 1, 1, 0, bn=draw(st.booleans()), act="linear")
        b.cost()
    return b.build()
