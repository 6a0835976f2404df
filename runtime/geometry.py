"""Rectangles of a feature map: the one ``Region`` type of tilec.

Every rectangle that is computed (a tile's region at a layer), owned (the
cells whose batch-norm statistics and gradient a tile is responsible for),
read (a layer's source window) or sent (a message) is a ``Region``: an
inclusive row range and an inclusive column range of one map, written in
plan files as ``[[r0, r1], [c0, c1]]``.
"""
from typing import NamedTuple


class Region(NamedTuple):
    rows: tuple  # (first, last), inclusive
    cols: tuple

    @classmethod
    def of(cls, value):
        """A Region from ``[[r0, r1], [c0, c1]]`` (or a Region)."""
        (r0, r1), (c0, c1) = value
        return cls((int(r0), int(r1)), (int(c0), int(c1)))

    @classmethod
    def whole(cls, h, w):
        return cls((0, h - 1), (0, w - 1))

    def to_json(self):
        return [list(self.rows), list(self.cols)]

    @property
    def height(self):
        return self.rows[1] - self.rows[0] + 1

    @property
    def width(self):
        return self.cols[1] - self.cols[0] + 1

    @property
    def area(self):
        return max(self.height, 0) * max(self.width, 0)

    def empty(self):
        return self.height <= 0 or self.width <= 0

    def intersect(self, other):
        """The common part, or None."""
        r0, r1 = max(self.rows[0], other.rows[0]), min(self.rows[1], other.rows[1])
        c0, c1 = max(self.cols[0], other.cols[0]), min(self.cols[1], other.cols[1])
        return Region((r0, r1), (c0, c1)) if r0 <= r1 and c0 <= c1 else None

    def contains(self, other):
        return (self.rows[0] <= other.rows[0] and other.rows[1] <= self.rows[1]
                and self.cols[0] <= other.cols[0] and other.cols[1] <= self.cols[1])

    def within(self, base):
        """(row slice, column slice) of this region in an array that covers ``base``."""
        return (slice(self.rows[0] - base.rows[0], self.rows[1] - base.rows[0] + 1),
                slice(self.cols[0] - base.cols[0], self.cols[1] - base.cols[0] + 1))

    def view(self, array, base):
        """The (B, C, h, w) view of this region in ``array``, which covers ``base``."""
        rs, cs = self.within(base)
        return array[:, :, rs, cs]
