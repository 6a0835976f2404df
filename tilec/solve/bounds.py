"""Exact reductions before CP-SAT: feasible plans and lower bounds from
shortest paths, used to drop candidates that cannot be optimal.

The candidates form a DAG ordered by layer (see
:mod:`tilec.cost.candidates`), so a shortest path is one pass, and so are
the shortest distances from the start to every arc and from every arc to
the end: the cheapest plan *through* an arc.

Lagrangian relaxation of the memory constraints: give every group a price
``seconds + sum_d lam_d * bytes_d / cap_d`` (state and kept bytes; keep or
recompute, whichever is cheaper at that price) and subtract ``sum_d lam_d
* free_d / cap_d``, where ``free_d`` is device d's memory less what every
plan puts on it (process, images). Any plan that fits costs at least that
much through each arc (workspace only adds memory, so leaving it out keeps
the bound valid). With all ``lam = 0`` it is the plain fastest plan.

- :func:`feasible_plan`: raise the multipliers of the devices that
  overflow until the cheapest path fits: an upper bound (and usually a
  good plan);
- :func:`prune`: drop every group and transition whose best bound through
  it, over the multipliers tried, exceeds that upper bound: the optimum
  keeps all its arcs, so CP-SAT on the rest still finds it and its bound
  still holds for the full problem.
"""
import time
from dataclasses import replace

import numpy as np

INF = float("inf")
GROW, SHRINK = 1.5, 0.95
REFINE = 8  # steps taken after the first plan that fits


def _arrays(cands):
    """Per group: seconds (keep, recompute) and (groups, devices) bytes
    relative to each device's memory (keep, recompute, each with and without
    workspace), computed once per candidate set."""
    arr = getattr(cands, "_bound_arrays", None)
    if arr is None:
        devices = cands.model.devices
        cap = np.array([d.memory_bytes for d in devices], float)
        n, count = len(devices), len(cands.groups)
        mem = np.zeros((4, count, n))
        for gi, g in enumerate(cands.groups):
            for d in g.members:
                mem[0, gi, d] = g.state[d] + g.kept[d]
                mem[1, gi, d] = g.state[d] + g.kept_recompute[d]
                mem[2, gi, d] = mem[0, gi, d] + g.workspace[d] + g.phase.get(d, 0)
                mem[3, gi, d] = mem[1, gi, d] + g.workspace_recompute[d] + g.phase.get(d, 0)
        secs = np.array([[cands.group_seconds(gi), cands.group_seconds(gi, True)] for gi in range(count)])
        arr = cands._bound_arrays = (secs.reshape(count, 2), mem / cap)
    return arr


def _transition_arrays(cands):
    """Per transition: seconds, and (transitions, devices) staging bytes
    relative to each device's memory, computed once per candidate set: the
    search prices them at every step."""
    arr = getattr(cands, "_bound_transitions", None)
    if arr is None:
        cap = np.array([d.memory_bytes for d in cands.model.devices], float)
        stage = np.zeros((len(cands.transitions), len(cap)))
        for t, nbytes in enumerate(cands.transition_bytes):
            for d, v in nbytes.items():
                stage[t, d] = v
        secs = np.array([t[3] for t in cands.transitions], float)
        arr = cands._bound_transitions = (secs, stage / cap)
    return arr


def _indexes(cands):
    """Groups by the boundary they start and end at, transitions by their
    boundary: fixed for a candidate set, while the prices change per step."""
    idx = getattr(cands, "_bound_indexes", None)
    if idx is None:
        starts, ends, moves_from = {}, {}, {}
        for gi, g in enumerate(cands.groups):
            starts.setdefault(g.first, []).append((gi, cands.group_layout[gi]))
            ends.setdefault(g.last + 1, []).append((gi, cands.group_out[gi]))
        for t, (b, li, lj, _) in enumerate(cands.transitions):
            moves_from.setdefault(b, []).append((t, li, lj))
        idx = cands._bound_indexes = (starts, ends, moves_from)
    return idx


class Prices(list):
    """Per group (price, recompute?), and ``moves``: per transition its price."""

    def __init__(self, groups, moves):
        super().__init__(groups)
        self.moves = moves


def _prices(cands, lams, workspace=False):
    """Per group: (price, recompute?), and the constant to subtract, at
    per-device multipliers ``lams``. With ``workspace`` the price also
    charges each group's workspace as if it added up (a penalty for
    finding plans that fit, not a bound)."""
    secs, rel = _arrays(cands)
    lam = np.asarray(lams, float)
    keep = secs[:, 0] + rel[2 if workspace else 0] @ lam
    rec = secs[:, 1] + rel[3 if workspace else 1] @ lam
    use_rec = rec < keep
    prices = list(zip(np.where(use_rec, rec, keep).tolist(), use_rec.tolist()))
    cap = [d.memory_bytes for d in cands.model.devices]
    # transitions: their seconds and their staging buffers at the same multipliers
    tsecs, tstage_rel = _transition_arrays(cands)
    moves = (tsecs + tstage_rel @ lam).tolist()
    return Prices(prices, moves), float(sum(l / c * free for l, c, free in zip(lams, cap, free_memory(cands))))


def with_memory(cands, memory):
    """``cands`` on devices with ``memory`` bytes each (the groups' costs do not depend on it)."""
    import copy
    model = copy.copy(cands.model)
    model.devices = tuple(replace(d, memory_bytes=int(m)) for d, m in zip(model.devices, memory))
    return replace(cands, model=model)


def free_memory(cands):
    """Per device: memory less what every plan puts there: the process."""
    return [d.memory_bytes - d.profile.process_overhead_bytes for d in cands.model.devices]


def distances(cands, prices):
    """Shortest distances (to, from) every node, and the best path, at group ``prices``."""
    end = cands.end
    starts, ends, moves_from = _indexes(cands)
    tprices = getattr(prices, "moves", None) or [t[3] for t in cands.transitions]
    to_ready, to_arrived, back = {}, {}, {}  # node -> distance; back: node -> predecessor
    for b in range(end + 1):
        for gi, lo in ends.get(b, []):
            g = cands.groups[gi]
            start = 0.0 if g.first == 0 else to_ready.get((g.first, cands.group_layout[gi]), INF)
            d = start + prices[gi][0]
            if d < to_arrived.get((b, lo), INF):
                to_arrived[(b, lo)] = d
                back[("a", b, lo)] = gi
        for t, li, lj in moves_from.get(b, []):
            d = to_arrived.get((b, li), INF) + tprices[t]
            if d < to_ready.get((b, lj), INF):
                to_ready[(b, lj)] = d
                back[("r", b, lj)] = (li, t)
    from_ready, from_arrived = {}, {}
    for b in range(end, -1, -1):
        for gi, li in starts.get(b, []):
            g = cands.groups[gi]
            rest = 0.0 if g.last + 1 == end else from_arrived.get((g.last + 1, cands.group_out[gi]), INF)
            d = prices[gi][0] + rest
            if d < from_ready.get((b, li), INF):
                from_ready[(b, li)] = d
        for t, li, lj in moves_from.get(b, []):
            d = tprices[t] + from_ready.get((b, lj), INF)
            if d < from_arrived.get((b, li), INF):
                from_arrived[(b, li)] = d
    # the best path, walked back from the cheapest arrival at the end
    ends_at = [(to_arrived[(end, lo)], lo) for _, lo in ends.get(end, []) if (end, lo) in to_arrived]
    path = []
    if ends_at:
        _, lo = min(ends_at)
        b = end
        while True:
            gi = back[("a", b, lo)]
            path.append((gi, prices[gi][1]))
            g = cands.groups[gi]
            if g.first == 0:
                break
            lo, _ = back[("r", g.first, cands.group_layout[gi])]
            b = g.first
        path.reverse()
    return {"to_ready": to_ready, "to_arrived": to_arrived, "from_ready": from_ready,
            "from_arrived": from_arrived, "path": path}


def through(cands, prices, dist):
    """Cheapest path cost through each group and each transition."""
    end = cands.end
    g_best = []
    for gi, g in enumerate(cands.groups):
        before = 0.0 if g.first == 0 else dist["to_ready"].get((g.first, cands.group_layout[gi]), INF)
        after = 0.0 if g.last + 1 == end else dist["from_arrived"].get((g.last + 1, cands.group_out[gi]), INF)
        g_best.append(before + prices[gi][0] + after)
    tprices = getattr(prices, "moves", None) or [t[3] for t in cands.transitions]
    t_best = [dist["to_arrived"].get((b, li), INF) + tp + dist["from_ready"].get((b, lj), INF)
              for (b, li, lj, _), tp in zip(cands.transitions, tprices)]
    return g_best, t_best


def predict(cands, path):
    """The cost model's prediction of ``path`` ([(group index, recompute?)])."""
    return cands.model.evaluate([(cands.groups[gi], rec) for gi, rec in path])


def fits(cands, path):
    pred = predict(cands, path)
    return all(m <= d.memory_bytes for m, d in zip(pred.memory, cands.model.devices)), pred


def feasible_plan(cands, steps=40, keep_bounds=True, deadline=None):
    """(upper bound seconds or None, its path or None,
    [(lams, prices, constant, dist)], the path that overflows least).

    The multiplier of every device that overflows grows by ``GROW``
    (starting from a small fraction of the fastest plan's time), the others
    shrink by ``SHRINK`` (so that two devices trading the same group do not
    ratchet up forever), until the cheapest path at those prices, workspace
    included, fits; then ``REFINE`` more steps oscillate around the boundary
    for faster plans that fit and tighter bounds. The prices without
    workspace at each step are valid Lagrangian bounds, kept for :func:`prune`.
    ``deadline`` (perf_counter): no step starts after it.
    """
    n = cands.model.n
    tried = []
    prices, const = _prices(cands, [0.0] * n)
    dist = distances(cands, prices)
    tried.append(([0.0] * n, prices, const, dist))
    if not dist["path"]:
        return None, None, tried, None
    ok, pred = fits(cands, dist["path"])
    if ok:
        return pred.step_s, dist["path"], tried, dist["path"]
    start = (pred.step_s) * 1e-2
    lams = [0.0] * n
    best = (None, None)
    closest = (_overflow(cands, pred), dist["path"])
    refine = REFINE
    for _ in range(steps):  # about 20 steps take the multipliers through 3 orders of magnitude
        if deadline is not None and time.perf_counter() > deadline:
            break
        over = [m > d.memory_bytes for m, d in zip(pred.memory, cands.model.devices)]
        lams = [(lam * GROW or start) if o else lam * SHRINK for lam, o in zip(lams, over)]
        dist = distances(cands, _prices(cands, lams, workspace=True)[0])
        if not dist["path"]:
            break
        if keep_bounds:
            bound_prices, const = _prices(cands, lams)
            tried.append((list(lams), bound_prices, const, distances(cands, bound_prices)))
        ok, pred = fits(cands, dist["path"])
        closest = min(closest, (_overflow(cands, pred), dist["path"]))
        if ok:
            secs = pred.step_s
            if best[0] is None or secs < best[0]:
                best = (secs, dist["path"])
        if best[0] is not None:
            refine -= 1
            if refine < 0:
                break
    return best[0], best[1], tried, closest[1]


def _overflow(cands, pred):
    return max(m - d.memory_bytes for m, d in zip(pred.memory, cands.model.devices))


def overflow(cands, path):
    """Bytes the fullest device lacks for ``path`` (0 if it fits)."""
    return max(0, _overflow(cands, predict(cands, path)))


def path_seconds(cands, path):
    return predict(cands, path).step_s


def lower_bound(cands, tried):
    """The best Lagrangian lower bound over the multipliers tried (seconds)."""
    best = 0.0
    for _, _, const, dist in tried:
        ends = [v for (b, _), v in dist["to_arrived"].items() if b == cands.end]
        if ends:
            best = max(best, min(ends) - const)
    return best


def alone_too_big(cands):
    """Groups that overflow a device by themselves (with what every plan puts
    there), and groups that fit only if they recompute: (dropped, forced).
    Dropping the first and forcing the second removes no plan that fits."""
    free = free_memory(cands)
    dropped, forced = set(), set()
    for gi, g in enumerate(cands.groups):
        def fits_alone(kept, ws):
            return all(g.state[d] + kept[d] + g.phase.get(d, 0) + ws[d] <= free[d] for d in g.members)
        if not fits_alone(g.kept, g.workspace):
            if fits_alone(g.kept_recompute, g.workspace_recompute):
                forced.add(gi)
            else:
                dropped.add(gi)
    return dropped, forced


def subset(cands, keep):
    """``cands`` with only the groups ``keep`` (indices, in order)."""
    return replace(cands, groups=[cands.groups[gi] for gi in keep],
                   group_layout=[cands.group_layout[gi] for gi in keep], group_out=[cands.group_out[gi] for gi in keep])


def prune(cands, upper, tried, slack=1e-6):
    """A copy of ``cands`` without the arcs that every bound tried puts above ``upper``."""
    keep_g = [True] * len(cands.groups)
    keep_t = [True] * len(cands.transitions)
    limit = upper * (1 + slack) + 1e-9
    for _, prices, const, dist in tried:
        g_best, t_best = through(cands, prices, dist)
        for gi, v in enumerate(g_best):
            if v - const > limit:
                keep_g[gi] = False
        for t, v in enumerate(t_best):
            if v - const > limit:
                keep_t[t] = False
    groups = [gi for gi, k in enumerate(keep_g) if k]
    return replace(cands, groups=[cands.groups[gi] for gi in groups],
                   group_layout=[cands.group_layout[gi] for gi in groups],
                   group_out=[cands.group_out[gi] for gi in groups],
                   transitions=[t for t, k in zip(cands.transitions, keep_t) if k],
                   transition_bytes=[t for t, k in zip(cands.transition_bytes, keep_t) if k]), groups
