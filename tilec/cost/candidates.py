"""The candidates every solver chooses among, priced outside any solver.

A *group* is a span program[first..last] of the tiled prefix with a layout
(its split lines and tile devices), priced by :class:`CostModel.group`,
including its entry (the halo it receives from its own layout's tiles on
its input map). A recomputing variant differs only in extra time and less
kept memory, so it is a second boolean on the same group.

At each boundary b (between layers b-1 and b) two kinds of node:
*arrived* (b, L): a group ended at layer b-1 with layout L (its last layer
owns exactly its tiles, so the layout alone fixes who holds what);
*ready* (b, L): the map of layer b-1 is held as layout L. A *transition*
arc goes from arrived (b, L) to ready (b, L') and costs moving the map from
L to L' (zero when L = L'). A group starting at b leaves ready (b, its
layout) and arrives at (last + 1, its layout).

A plan is a path: a group starting at layer 0, then at each boundary a
transition and the next group, to a group ending at the prefix's last
layer. Its time is the sum of its arcs plus the tail, its memory per device
a sum plus a maximum: a linear, additive model (DESIGN.md, "The
optimisation problem").
"""
from dataclasses import dataclass, field


@dataclass
class Candidates:
    model: object  # CostModel
    layouts: list
    groups: list = field(default_factory=list)  # Group
    group_layout: list = field(default_factory=list)  # layout index of each group
    nodes: dict = field(default_factory=dict)  # (b, layout index) -> (rects, devices) of layer b-1's map
    transitions: list = field(default_factory=list)  # (b, from layout, to layout, seconds)

    @property
    def prefix(self):
        return self.model.prefix

    def group_seconds(self, gi, recompute=False):
        g = self.groups[gi]
        return g.entry_s + g.seconds + (g.recompute_seconds if recompute else 0.0)


def enumerate_candidates(model, layouts, max_span=None):
    """Every (span, layout) group that fits, every node and every transition.

    ``max_span``: the longest group considered (None: any length).
    """
    cands = Candidates(model, list(layouts))
    prefix = model.prefix
    for b in range(1, prefix):
        for li, lay in enumerate(layouts):
            rects = model.layout_rects(lay, b - 1)
            if rects is not None:
                cands.nodes[(b, li)] = (rects, lay.devices)
    for first in range(prefix):
        for last in range(first, prefix if max_span is None else min(prefix, first + max_span)):
            _, h, w = model.program[last]["out_shape"]
            for li, lay in enumerate(layouts):
                if first > 0 and (first, li) not in cands.nodes:
                    continue
                splits = lay.splits(h, w)
                if splits is None:
                    continue
                try:
                    g = model.group(first, last, splits[0], splits[1], lay.devices, layout=lay)
                except ValueError:
                    continue  # split lines the region analysis rejects
                cands.groups.append(g)
                cands.group_layout.append(li)
    arrivals = {(g.last + 1, li) for g, li in zip(cands.groups, cands.group_layout) if g.last + 1 < prefix}
    for b, li in sorted(arrivals):
        src_rects, src_devs = cands.nodes[(b, li)]
        for (b2, lj), (dst_rects, dst_devs) in cands.nodes.items():
            if b2 != b:
                continue
            secs = 0.0 if li == lj else model.redistribute_seconds(b, src_rects, src_devs, dst_rects, dst_devs)
            cands.transitions.append((b, li, lj, secs))
    return cands
