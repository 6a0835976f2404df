"""The candidates every solver chooses among, priced outside any solver.

A *group* is a span program[first..last] of the tiled prefix with a layout
(its split lines and tile devices), priced by :class:`CostModel.group`,
including its entry (the halo it receives from its own layout's tiles on
its input map). A recomputing variant differs only in extra time and less
kept memory, so it is a second boolean on the same group. A *tail group*
(:class:`tilec.cost.tail.TailArc`) is a span after the tiled prefix on one
device or split by channels; its layouts are how a map is held
(:class:`tilec.cost.tail.Holding`).

At each boundary b (between layers b-1 and b) two kinds of node:
*arrived* (b, L): a group ended at layer b-1 and holds its output as
layout L (a tiled group's last layer owns exactly its tiles, so the layout
alone fixes who holds what); *ready* (b, L): the map of layer b-1 is held
as the next group needs it. A *transition* arc goes from arrived (b, L) to
ready (b, L') and costs moving the map from L to L' (zero when L = L'). A
group starting at b leaves ready (b, its input layout) and arrives at
(last + 1, its output layout).

The tiled prefix may end at any boundary of ``cuts``: there, transitions
lead from tiled layouts to tail holdings. A plan is a path: a group
starting at layer 0, then at each boundary a transition and the next
group, to a group ending at the program's last layer. Its time is the sum
of its arcs, its memory per device a sum plus a maximum: a linear,
additive model (DESIGN.md, "The optimisation problem").
"""
from dataclasses import dataclass, field
from math import prod


@dataclass
class Candidates:
    model: object  # CostModel
    layouts: list
    groups: list = field(default_factory=list)  # Group
    group_layout: list = field(default_factory=list)  # layout index of each group
    nodes: dict = field(default_factory=dict)  # (b, layout index) -> (rects, devices) of layer b-1's map
    transitions: list = field(default_factory=list)  # (b, from layout, to layout, seconds)
    transition_bytes: list = field(default_factory=list)  # {device: staging bytes} of each transition
    group_out: list = field(default_factory=list)  # layout index each group hands its output on in

    @property
    def prefix(self):
        """The layers tiled groups may cover: 0..prefix-1."""
        return self.model.prefix

    @property
    def end(self):
        """Every path ends at the program's last layer."""
        return len(self.model.program)

    def group_seconds(self, gi, recompute=False):
        g = self.groups[gi]
        return g.entry_s + g.seconds + (g.recompute_seconds if recompute else 0.0)


def weight_heavy_from(program, prefix):
    """The first layer of the tiled prefix that holds more weights than it
    outputs values per image, from where splitting by channels may pay
    (``prefix`` if none)."""
    from tilec_runtime.footprint import param_count
    for layer in program[:prefix]:
        if layer["index"] > 0 and param_count([layer]) >= prod(layer["out_shape"]):
            return layer["index"]
    return prefix


def tail_options(program, lo, n, members, mode="auto"):
    """[(first, last, mode, devices)] of every tail group from layer ``lo``:
    each span of a run that can be split by channels (``tilec.plan.tail.runs``)
    on any one device (``mode`` auto or one; the loss on rank 0) and split
    over the k first ``members(k)`` (auto or channels; one device where a
    run cannot be split at all); each other run on rank 0."""
    from tilec.analysis.tail import runs
    from tilec_runtime import shards
    out = []
    for f0, l0, ok in runs(program, lo):
        if not ok:  # whole maps, on any device; the loss on rank 0 (it has the targets)
            out += [(f0, l0, "one", (d,)) for d in ([0] if l0 == len(program) - 1 else range(n))]
            continue
        split = [(f, l, "channels", members(k)) for f in range(f0, l0 + 1) for l in range(f, l0 + 1)
                 for k in range(2, n + 1) if shards.check(program, f, l, k) is None] if mode != "one" else []
        # a sum-of-squares cost ending the run, on one device: on rank 0, alone (the kernels' own ``sse``)
        cost = l0 == len(program) - 1
        end = l0 if cost else l0 + 1
        ones = [(f, l, "one", (d,)) for f in range(f0, end) for l in range(f, end) for d in range(n)] \
            if mode != "channels" or not split else []
        out += split + ones + ([(l0, l0, "one", (0,))] if cost else [])
    return out


MAX_SPAN = 10  # layers in one tiled group: beyond, the halo's redundant work outgrows what fusing saves


def enumerate_candidates(model, layouts, max_span=MAX_SPAN, tail="auto", cuts=None):
    """Every (span, layout) group that fits, every tail group, every node and
    every transition.

    ``max_span``: the longest tiled group considered (None: any length);
    ``tail``: which tail groups ("auto", "one" or "channels", as
    ``tilec.compile.TAILS``); ``cuts``: the boundaries
    where the tiled prefix may end (default: from the first weight-heavy
    layer to the end of the prefix).
    """
    from tilec.cost.parallel import price_candidates
    from tilec.cost.tail import holdings
    cands = Candidates(model, list(layouts))
    prefix, program, n = model.prefix, model.program, model.n
    cuts = tuple(sorted(cuts)) if cuts is not None else tuple(range(max(1, weight_heavy_from(program, prefix)),
                                                                     prefix + 1)) if prefix else (0,)
    for b in range(1, prefix + 1):
        for li, lay in enumerate(layouts):
            rects = model.layout_rects(lay, b - 1)
            if rects is not None:
                cands.nodes[(b, li)] = (rects, lay.devices)
    jobs, job_layout = [], []
    for first in range(prefix):
        for last in range(first, prefix if max_span is None else min(prefix, first + max_span)):
            if last + 1 not in cuts and last + 1 == prefix:
                continue  # the prefix cannot end here
            _, h, w = program[last]["out_shape"]
            for li, lay in enumerate(layouts):
                if first > 0 and (first, li) not in cands.nodes:
                    continue
                splits = lay.splits(h, w)
                if splits is None:
                    continue
                jobs.append((first, last, splits[0], splits[1], lay.devices, lay))
                job_layout.append(li)
    pricer = model.tail_pricer
    lo = min(cuts)
    tails = list(tail_options(program, lo, n, pricer.members, tail))
    priced, arcs = price_candidates(model, jobs, tails)
    for g, li in zip(priced, job_layout):
        if g is not None:  # (None: split lines the region analysis rejects)
            cands.groups.append(g)
            cands.group_layout.append(li)
            cands.group_out.append(li)
    arrivals = {(g.last + 1, li) for g, li in zip(cands.groups, cands.group_layout)}
    for b, li in sorted(arrivals):
        if b >= prefix:
            continue
        src_rects, src_devs = cands.nodes[(b, li)]
        for (b2, lj), (dst_rects, dst_devs) in cands.nodes.items():
            if b2 != b:
                continue
            if li == lj:
                secs, stage = 0.0, {}
            else:
                secs, stage = model.redistribute(b, src_rects, src_devs, dst_rects, dst_devs)
            cands.transitions.append((b, li, lj, secs))
            cands.transition_bytes.append(stage)

    # the tail: groups after the cut (priced above), and the moves into and between them
    held = holdings(n, pricer.order)
    base = len(cands.layouts)
    cands.layouts += held
    index = {h: base + i for i, h in enumerate(held)}
    for arc in arcs:
        cands.groups.append(arc)
        cands.group_layout.append(index[arc.layout_in])
        cands.group_out.append(index[arc.layout_out])
    tail_starts = {(g.first, li) for g, li in zip(cands.groups, cands.group_layout) if li >= base}
    tail_ends = {(g.last + 1, li) for g, li in zip(cands.groups, cands.group_out) if li >= base}
    for b, lj in sorted(tail_starts):
        need = cands.layouts[lj]
        if b in cuts and b > 0:
            for (ab, li) in sorted(arrivals):
                if ab == b and li < base:
                    secs, stage = pricer.transition(b, cands.nodes[(b, li)], need)
                    cands.transitions.append((b, li, lj, secs))
                    cands.transition_bytes.append(stage)
        for ab, li in sorted(tail_ends):
            if ab == b:
                secs, stage = pricer.transition(b, cands.layouts[li], need)
                cands.transitions.append((b, li, lj, secs))
                cands.transition_bytes.append(stage)
    return cands
