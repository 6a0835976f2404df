"""Two-dimensional tiles of a layer group, and what they cost.

Combines the per-axis ranges of ``regions`` into tiles (row-major over the
grid) and counts the work of each tile including its halo, which is what
the cost model and ``tilec info --plan`` report (FLOPs as ``tilec.ir.stats``
counts them, per position of a tile's regions).
"""
from dataclasses import dataclass

from tilec.analysis.regions import axis_regions, length, window_of
from tilec.ir.stats import forward_flops, forward_flops_per_position


@dataclass(frozen=True)
class TileLayer:
    layer: int
    region: tuple  # ((r0, r1), (c0, c1))
    owned: tuple
    src: tuple
    pads: tuple  # (top, bottom, left, right)


@dataclass(frozen=True)
class Tile:
    rows: tuple
    cols: tuple
    input: tuple  # ((r0, r1), (c0, c1)) of the group's input map
    layers: tuple  # TileLayer per layer of the group


def area(region):
    return length(region[0]) * length(region[1])


def spatial_prefix(program):
    """Number of leading layers that form a chain of conv/max-pool layers."""
    n = 0
    for layer in program:
        if layer["kind"] not in ("conv", "maxpool") or layer["inputs"] != [layer["index"] - 1]:
            break
        n += 1
    return n


def group_tiles(program, first, last, row_splits, col_splits):
    """The tiles (row-major over the grid) of group ``program[first..last]``."""
    layers = program[first:last + 1]
    rows, row_inputs = axis_regions([window_of(l, 1) for l in layers], row_splits)
    cols, col_inputs = axis_regions([window_of(l, 2) for l in layers], col_splits)
    tiles = []
    for i, rlayers in enumerate(rows):
        for j, clayers in enumerate(cols):
            per_layer = tuple(
                TileLayer(layer["index"], (r.region, c.region), (r.owned, c.owned), (r.src, c.src),
                          (r.pads[0], r.pads[1], c.pads[0], c.pads[1]))
                for layer, r, c in zip(layers, rlayers, clayers))
            tiles.append(Tile(rlayers[-1].region, clayers[-1].region, (row_inputs[i], col_inputs[j]), per_layer))
    return tiles


def tile_flops(program, tile):
    """Forward FLOPs of a tile's regions per image, halo included."""
    return sum(forward_flops_per_position(program[tl.layer]) * area(tl.region) for tl in tile.layers)


def group_flops(program, first, last):
    """Forward FLOPs of a group on whole maps per image (no halo)."""
    return sum(forward_flops(layer) for layer in program[first:last + 1])
