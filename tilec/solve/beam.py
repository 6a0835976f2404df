"""A first plan that fits when memory binds: beam search along the chain.

The Lagrangian search (:mod:`tilec.solve.bounds`) prices memory with one
multiplier per device; where devices are alike it trades the same groups
back and forth between them and may find no plan that fits, and CP-SAT
minimising the overflow then takes seconds on a small machine (measured:
YOLOv2 at batch 4 on 2-3 Pi 3s, no plan within the default 3 s, most
runs). Memory only grows along a path (bytes add up, workspaces are
maxima), so a partial path that already overflows a device can be dropped
at once; beam search walks the candidates' DAG boundary by boundary,
keeping at each node the few partial paths with the best score ``seconds /
fastest plan's seconds + weight * fullest device's share``, and for each
device those that leave it emptiest (so that a later group needing most of
one device, a weight-heavy layer on one Pi, finds a path with room for
it). Attempts go from narrow to wide and from "fast first" to "small
first"; the fastest complete path of the first that finds one is a plan
CP-SAT then improves (its upper bound and its hint).

Memory is counted as CP-SAT's model counts it (process, state and kept
bytes, staging buffers of transitions, each workspace pool's maximum), and
the path found is checked with the cost model's own prediction.
"""
import heapq
import time

from tilec.cost.model import workspace_pool

# attempts, cheapest first, until one finds a plan: (partial paths kept per node by score, per device
# those that leave it emptiest, weight of memory against seconds). Measured on YOLOv2 (batch 4 on 2-4
# Pi 3s, batch 8 on 5-6): the narrow beams find a plan in 0.05-1.9 s where they find one; the wide ones
# cost 2-3x more (batch 8 on 5 Pi 3s needs the memory-first wide one: 2.7 s).
ATTEMPTS = ((3, 1, 1.0), (3, 1, 16.0), (6, 2, 64.0), (6, 2, 1.0))


class _Late(Exception):
    """The deadline passed during a search."""


class _Partial:
    """A path so far: its seconds, its bytes per device (``used``: state,
    kept, staging; ``work``: each workspace pool's maximum) and their sum."""
    __slots__ = ("secs", "used", "work", "total", "path")

    def __init__(self, secs, used, work, total, path):
        self.secs, self.used, self.work, self.total, self.path = secs, used, work, total, path


def beam_fit(cands, dropped=(), forced=(), recompute=True, deadline=None, attempts=ATTEMPTS):
    """A path that fits ([(group index, recompute?)]): the fastest of the first
    attempt that finds one; None if none does by ``deadline`` (perf_counter)."""
    from tilec.solve.bounds import _indexes, _prices, distances, fits, free_memory
    free = free_memory(cands)
    if min(free) <= 0:
        return None
    n, end = len(free), cands.end
    starts, _, moves = _indexes(cands)
    by_start = {}
    for b, arcs in starts.items():
        for gi, li in arcs:
            if gi not in dropped:
                by_start.setdefault((b, li), []).append(gi)
    moves_from = {}  # (b, layout) -> [(transition, layout it leads to)]
    for b, arcs in moves.items():
        for t, li, lj in arcs:
            moves_from.setdefault((b, li), []).append((t, lj))
    # seconds are scored relative to the fastest plan's, memory relative to each device's
    fastest = [v for (b, _), v in distances(cands, _prices(cands, [0.0] * n)[0])["to_arrived"].items() if b == end]
    if not fastest:
        return None
    reference = max(1e-9, min(fastest))
    for width, roomy, weight in attempts:
        try:
            found = _search(cands, by_start, moves_from, free, n, end, forced, recompute, width, roomy, weight,
                            reference, deadline)
        except _Late:
            return None
        for _, path in found:  # fastest first; the cost model has the last word
            if fits(cands, path)[0]:
                return path
    return None


def _search(cands, by_start, moves_from, free, n, end, forced, recompute, width, roomy, weight, reference, deadline):
    """Complete paths that fit by the solver's count, fastest first: [(seconds, path)]."""
    def score(p):
        return p.secs / reference + weight * max(t / f for t, f in zip(p.total, free))

    def emptiest(d):
        return lambda p: (p.total[d], p.secs)

    roomiest = [emptiest(d) for d in range(n)]

    def select(partials):
        # the best by score, and for each device those that leave it emptiest: a later group that
        # needs most of one device (a weight-heavy layer on one Pi) then finds a path with room for it
        if len(partials) <= width:
            return partials
        chosen = {id(p): p for p in heapq.nsmallest(width, partials, key=score)}
        for key in roomiest:
            chosen.update((id(p), p) for p in heapq.nsmallest(roomy, partials, key=key))
        return list(chosen.values())

    members_of = {gi: g.members for gi, g in enumerate(cands.groups)}  # (a property that sorts)
    ready = {(0, li): [_Partial(0.0, [0.0] * n, {}, [0.0] * n, ())] for (b, li) in by_start if b == 0}
    arrived = {}  # (b, layout) -> [partial]
    done = []
    for b in range(end + 1):
        if deadline is not None and time.perf_counter() > deadline:
            raise _Late
        for (bb, li), gis in by_start.items():  # the groups leaving boundary b
            if bb != b or (b, li) not in ready:
                continue
            for p in ready.pop((b, li)):
                for gi in gis:
                    g, members = cands.groups[gi], members_of[gi]
                    pool = workspace_pool(g)
                    for rec in ((True,) if gi in forced else (False, True) if recompute else (False,)):
                        kept = g.kept_recompute if rec else g.kept
                        if rec and all(kept[d] >= g.kept[d] for d in members):
                            continue  # recomputing saves nothing here
                        ws = g.workspace_recompute if rec else g.workspace
                        used, total = list(p.used), list(p.total)
                        cur = p.work.get(pool) or [0] * n
                        new = list(cur)
                        over = False
                        for d in members:
                            new[d] = max(cur[d], ws.get(d, 0))
                            used[d] += g.state[d] + kept[d]
                            total[d] += g.state[d] + kept[d] + new[d] - cur[d]
                            if total[d] > free[d]:
                                over = True
                                break
                        if over:
                            continue
                        q = _Partial(p.secs + cands.group_seconds(gi, rec), used, {**p.work, pool: new}, total,
                                     p.path + ((gi, rec),))
                        if g.last + 1 == end:
                            done.append((q.secs, q.path))
                        else:
                            arrived.setdefault((g.last + 1, cands.group_out[gi]), []).append(q)
        # every group reaching boundary b + 1 is in: its transitions
        nb = b + 1
        for (bb, li) in [k for k in arrived if k[0] == nb]:
            here = select(arrived.pop((bb, li)))
            for t, lj in moves_from.get((nb, li), ()):
                secs, stage = cands.transitions[t][3], cands.transition_bytes[t]
                for p in here:
                    if any(p.total[d] + v > free[d] for d, v in stage.items()):
                        continue
                    used, total = list(p.used), list(p.total)
                    for d, v in stage.items():
                        used[d] += v
                        total[d] += v
                    ready.setdefault((nb, lj), []).append(_Partial(p.secs + secs, used, p.work, total, p.path))
        for key in [k for k in ready if k[0] == nb]:
            ready[key] = select(ready[key])
    done.sort()
    return done


def leanest(cands, start_extra, deadline, recompute=True, attempts=((3, 1, 64.0),)):
    """(extra bytes, path): a path that fits every device given ``extra``
    bytes more than it has, by memory-first beam searches with less and
    less extra until none fits or ``deadline`` (perf_counter) passes; None
    if none fits with ``start_extra``. Explains an infeasible cluster
    (:mod:`tilec.solve.explain`) with a far smaller need than the least-
    overflow search alone finds in its time (YOLOv2 at batch 8 on 4 Pi 3s:
    59 MB over in 2.9 s, where the least-overflow search said 477)."""
    from tilec.solve.bounds import alone_too_big, with_memory
    devices = cands.model.devices
    best, extra = None, max(0, int(start_extra))
    while time.perf_counter() < deadline:
        raised = with_memory(cands, [d.memory_bytes + extra for d in devices])
        path = beam_fit(raised, *alone_too_big(raised), recompute=recompute, deadline=deadline, attempts=attempts)
        if path is None:
            break
        pred = cands.model.evaluate([(cands.groups[gi], rec) for gi, rec in path])
        need = max(0, max(m - d.memory_bytes for m, d in zip(pred.memory, devices)))
        if best is not None and need >= best[0]:
            break
        best = (need, path)
        if need == 0:
            break
        extra = need - max(1 << 20, need // 50)  # then ask for a little less
    return best
