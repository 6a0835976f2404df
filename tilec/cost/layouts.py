"""Layouts: the ways of splitting a map over devices that the planner tries.

A layout is a grid R x C, the device of each tile (row-major), and weights
for the split lines: a device twice as fast gets about twice the area. A
layout does not depend on the map's size, so the same layout can be applied
to every group and every boundary; the solver then sees when consecutive
groups share a layout (only halos move between them) or not (the map is
redistributed).

Which layouts (for n devices):

- every grid R x C with R*C = k tiles, k = 1..n, over the k fastest devices
  (ties by rank, so rank 0 comes first among equals), and for k < n also
  over the k fastest devices other than rank 0 (rank 0 holds the tail's
  weights, which may leave it no room for activations);
- with devices of different speeds, each grid both weighted by speed and
  even (so no even grid is ever missed);
- single-device layouts on rank 0, on the fastest device, and on the first
  device other than rank 0 (rank 0 also holds the tail, so a group may be
  better off elsewhere for memory).
"""
from dataclasses import dataclass

from tilec.analysis.regions import even_splits, weighted_splits
from tilec.cost.compute import reference_rate


@dataclass(frozen=True)
class Layout:
    rows: int
    cols: int
    devices: tuple  # device of each tile, row-major
    row_weights: tuple = None  # None: even split lines
    col_weights: tuple = None

    def splits(self, h, w):
        """(row_splits, col_splits) on an h x w map, or None when the map is too small."""
        if self.rows > h or self.cols > w:
            return None
        rows = even_splits(h, self.rows) if self.row_weights is None else weighted_splits(h, list(self.row_weights))
        cols = even_splits(w, self.cols) if self.col_weights is None else weighted_splits(w, list(self.col_weights))
        if any(b <= a for a, b in zip(rows, rows[1:])) or any(b <= a for a, b in zip(cols, cols[1:])):
            return None
        return rows, cols

    @property
    def weighted(self):
        return self.row_weights is not None

    def label(self, names=None):
        devs = ",".join(names[d] if names else str(d) for d in self.devices)
        return f"{self.rows}x{self.cols} [{devs}]{' weighted' if self.weighted else ''}"


def device_speeds(cluster):
    """FLOP/s of each device on a reference conv, compute_scale included."""
    return [reference_rate(d.profile) * d.compute_scale for d in cluster.devices]


def _norm(weights):
    low = min(weights)
    return tuple(w / low for w in weights)


def layouts(cluster):
    """The layouts the planner chooses among, for a :class:`tilec.cluster.Cluster`."""
    n = len(cluster.devices)
    speed = device_speeds(cluster)
    order = sorted(range(n), key=lambda d: (-speed[d], d))
    singles = [0, order[0]] + [d for d in order if d != 0][:1]
    out = [Layout(1, 1, (d,)) for d in singles]
    others = [d for d in order if d != 0]
    for k in range(2, n + 1):
        for devs in (order[:k], others[:k]) if k < n else (order,):
            uneven = len({round(speed[d] / speed[devs[0]], 6) for d in devs}) > 1
            for r in (d for d in range(1, k + 1) if k % d == 0):
                c = k // r
                grid = [devs[i * c:(i + 1) * c] for i in range(r)]
                if uneven:
                    rw = _norm([sum(speed[d] for d in row) for row in grid])
                    cw = _norm([sum(speed[grid[i][j]] for i in range(r)) for j in range(c)])
                    out.append(Layout(r, c, tuple(devs), rw, cw))
                out.append(Layout(r, c, tuple(devs)))
    return list(dict.fromkeys(out))


def even_layout(rows, cols):
    """The even ``rows x cols`` grid over devices 0..rows*cols-1 (the layout of ``--grid``)."""
    return Layout(rows, cols, tuple(range(rows * cols)))
