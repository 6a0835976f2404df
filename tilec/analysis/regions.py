"""Region analysis of fused tiles: pure integer functions, no numpy.

A layer group is a run of spatial layers (conv, max-pool; batch norm and the
activation are folded into the conv). Its output map is split by split lines
into a grid of tiles. Rows and columns are independent (kernels are square,
strides and padding the same both ways), so everything is computed per
*axis* and a tile's 2-D region is the product of its row and column ranges.

For each tile and each layer of the group this module gives:

- ``region``: the inclusive range of the layer's output the tile computes.
  Walking backwards, output range ``[a, b]`` needs input range
  ``[a*s - p, b*s - p + k - 1]`` clipped to the map; what lies outside is
  border padding, never padding at a tile edge.
- ``owned``: one owner per position, a partition of the whole map with
  each owned range inside its owner's region. Regions are widened so that
  they cover the map, including positions that feed no output (a stride-2
  1x1 conv skips rows) but still count in batch-norm statistics and, since
  the batch-norm backward gives every position the mean terms, still receive
  a gradient.
- ``src``/``pads``: the clipped input range the layer reads and the border
  padding on each side of it.

Ranges are ``(lo, hi)`` tuples, inclusive, as in the plan file.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One axis of a spatial layer: kernel, stride, top/left padding, sizes."""
    size: int
    stride: int
    pad: int
    n_in: int
    n_out: int

    def need(self, lo, hi):
        """Unclipped input range needed for output range [lo, hi]."""
        return lo * self.stride - self.pad, hi * self.stride - self.pad + self.size - 1


def window_of(layer, axis):
    """The Window of a program layer along axis 1 (rows) or 2 (columns)."""
    if layer["kind"] == "conv":
        pad = layer["pad"]
    elif layer["kind"] == "maxpool":
        pad = layer["padding"] // 2
    else:
        raise ValueError(f"layer {layer['index']} ({layer['kind']}) is not spatial")
    return Window(layer["size"], layer["stride"], pad, layer["in_shape"][axis], layer["out_shape"][axis])


@dataclass(frozen=True)
class AxisLayer:
    """One tile's ranges at one layer, along one axis."""
    region: tuple
    owned: tuple
    src: tuple
    pads: tuple  # (before, after)


def _widen(ranges, n):
    """Extend ranges (sorted by tile) so that their union is [0, n-1]."""
    out = [list(r) for r in ranges]
    out[0][0] = 0
    out[-1][1] = n - 1
    for i in range(len(out) - 1):
        if out[i][1] + 1 < out[i + 1][0]:
            out[i][1] = out[i + 1][0] - 1
    return [tuple(r) for r in out]


def _owned(regions, n):
    """Partition [0, n-1] into ranges, each inside its tile's region.

    Boundaries sit midway in the overlap of neighbouring regions, which
    balances the statistics and exchange work between neighbours.
    """
    starts = [0]
    for i in range(1, len(regions)):
        lo, hi = regions[i][0], regions[i - 1][1] + 1
        starts.append(max(starts[-1], (lo + hi + 1) // 2))
    ends = [s - 1 for s in starts[1:]] + [n - 1]
    return list(zip(starts, ends))


def check_splits(splits, n, what="map"):
    """Split lines ``[0, x1, ..., n]`` must be strictly increasing from 0 to n."""
    if len(splits) < 2 or splits[0] != 0 or splits[-1] != n:
        raise ValueError(f"split lines {splits} must run from 0 to {n} ({what})")
    if any(b <= a for a, b in zip(splits, splits[1:])):
        raise ValueError(f"split lines {splits} must be strictly increasing ({what} of size {n})")


def axis_regions(windows, splits):
    """Per-tile, per-layer ranges along one axis for a group.

    ``windows``: the group's layers in order (one Window each); ``splits``:
    the output split lines of the last layer. Returns ``(layers, inputs)``:
    ``layers[t][j]`` is the AxisLayer of tile t at layer j of the group, and
    ``inputs[t]`` the clipped range of the group's input map tile t reads.
    """
    check_splits(splits, windows[-1].n_out, "group output")
    m = len(splits) - 1
    regions = [(splits[t], splits[t + 1] - 1) for t in range(m)]
    per_layer = []  # built from the last layer back
    for j in range(len(windows) - 1, -1, -1):
        w = windows[j]
        owned = regions if j == len(windows) - 1 else _owned(regions, w.n_out)
        needs = [w.need(lo, hi) for lo, hi in regions]
        srcs = [(max(lo, 0), min(hi, w.n_in - 1)) for lo, hi in needs]
        pads = [(s[0] - nd[0], nd[1] - s[1]) for s, nd in zip(srcs, needs)]
        per_layer.append([AxisLayer(regions[t], owned[t], srcs[t], pads[t]) for t in range(m)])
        regions = _widen(srcs, w.n_in) if j > 0 else srcs
    per_layer.reverse()
    layers = [[per_layer[j][t] for j in range(len(windows))] for t in range(m)]
    return layers, [layers[t][0].src for t in range(m)]


def even_splits(n, parts):
    """``parts`` near-equal split lines over n positions."""
    return [round(i * n / parts) for i in range(parts + 1)]


def weighted_splits(n, weights):
    """Split lines giving tile i a share of n proportional to weights[i] (each >= 1)."""
    total = float(sum(weights))
    splits, acc = [0], 0.0
    for i, w in enumerate(weights[:-1]):
        acc += w
        remaining = len(weights) - 1 - i
        splits.append(min(max(round(n * acc / total), splits[-1] + 1), n - remaining))
    splits.append(n)
    return splits


def length(r):
    return r[1] - r[0] + 1


def intersect(a, b):
    """Intersection of two inclusive ranges, or None."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo <= hi else None


def area_of(rows, cols):
    return length(rows) * length(cols)
