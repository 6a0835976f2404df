"""A first plan that fits when memory binds: beam search along the chain.

The Lagrangian search (:mod:`tilec.solve.bounds`) prices memory with one
multiplier per device; where devices are alike it trades the same groups
back and forth between them and may find no plan that fits, and CP-SAT
minimising the overflow then takes seconds on a small machine (measured:
YOLOv2 at batch 4 on 2-3 Pi 3s, no plan within the default 3 s, most
runs). Memory grows along a path (bytes add up, workspaces are
maxima), so a partial path that already overflows a device can be dropped
at once; beam search walks the candidates' DAG boundary by boundary,
keeping at each node the few partial paths with the best score ``seconds /
fastest plan's seconds + weight * fullest device's share``, and for each
device those that leave it emptiest (so that a later group needing most of
one device, a weight-heavy layer on one Pi, finds a path with room for
it). Attempts go from narrow to wide and from "fast first" to "small
first", until one finds a plan close to the fastest (memory aside) or the
time is up; the fastest complete path found is a plan CP-SAT then improves
(its upper bound and its hint).

Memory is counted as CP-SAT's model counts it (process, state and kept
bytes, staging buffers of transitions, the tiles' scratch and the tail's
activations and temporaries, one at a time where the device gives the
scratch back during the tail), and the path found is checked with the
cost model's own prediction. (With that, memory is not quite monotone
along a path: a tail large enough for the scratch to be given back may
need less than a smaller one. A path dropped for that is rare and costs
only the beam's breadth.)
"""
import heapq
import time

from tilec_runtime.footprint import early_bytes, tail_early, tail_peak, tiles_and_tail

# attempts, cheapest first: (partial paths kept per node by score, per device those that leave it
# emptiest, weight of memory against seconds). Measured on YOLOv2 (batch 4 on 2-6 Pi 3s, batch 8 on 4-6):
# the narrow beams take 0.02-3 s, the wide ones 2-3x more. Which finds the fastest plan varies with the
# candidates: batch 8 on 5 Pi 3s, after a one-map route could join the conv after it, none and 163 s from
# the narrow ones, 110 s from the wide fast-first one (the memory-first wide one 139-166 s).
ATTEMPTS = ((3, 1, 1.0), (3, 1, 16.0), (6, 2, 1.0), (6, 2, 64.0))
# Tried only when those find no plan at all: wider memory-first beams (more partial paths per node, and
# more per device that leave it emptiest). YOLOv2 at batch 8 on 3 Pi 3s: none of the four above finds a
# plan that fits 750 MB, (12, 2, 64) one of 296 s a step in 0.5 s, (12, 3, 64) 321 s in 0.7 s; wider ones
# (16-48 wide) none or no better. The search is not monotone in its width.
WIDE_ATTEMPTS = ((12, 2, 64.0), (12, 3, 64.0))
# A plan this much slower than the fastest one (memory aside) is taken; a slower one, the next attempts
# may better until the deadline. The first attempt's plan for YOLOv2 at batch 8 on 6 Pi 3s on a 100 Mbit/s
# link took 297 s a step (all of the tail on single devices), the second's 104 s (the fastest plan 85 s).
CLOSE = 0.3


class _Late(Exception):
    """The deadline passed during a search."""


class _Partial:
    """A path so far: its seconds, per device the tiles' largest scratch and
    its tail groups' (phase, grads, workspace) (``work``), and its bytes per
    device, those included (``total``)."""
    __slots__ = ("secs", "work", "total", "path")

    def __init__(self, secs, work, total, path):
        self.secs, self.work, self.total, self.path = secs, work, total, path


class Beam:
    """Beam searches over one candidate set: its DAG indexed once, and the
    fastest plan's seconds (``reference``, memory aside: the solver has it
    already) that scores time; :meth:`fit` searches for given memory."""

    def __init__(self, cands, reference=None):
        from tilec.solve.bounds import _indexes, _prices, distances
        self.cands, self.n, self.end = cands, cands.model.n, cands.end
        starts, _, moves = _indexes(cands)
        self.by_start = {}  # (b, layout) -> [group]
        for b, arcs in starts.items():
            for gi, li in arcs:
                self.by_start.setdefault((b, li), []).append(gi)
        self.moves_from = {}  # (b, layout) -> [(transition, layout it leads to)]
        for b, arcs in moves.items():
            for t, li, lj in arcs:
                self.moves_from.setdefault((b, li), []).append((t, lj))
        self.members = [g.members for g in cands.groups]  # (a property that sorts)
        if reference is None:
            ends = distances(cands, _prices(cands, [0.0] * self.n)[0])["to_arrived"]
            reference = min((v for (b, _), v in ends.items() if b == self.end), default=None)
        self.reference = None if reference is None else max(1e-9, reference)

    def fit(self, memory, recompute=True, deadline=None, attempts=ATTEMPTS):
        """A path that fits devices of ``memory`` bytes each
        ([(group index, recompute?)]): the fastest found by the attempts, in
        order, until one finds a path within ``CLOSE`` of the fastest plan
        (memory aside) or ``deadline`` (perf_counter) passes; None if none
        is found by then."""
        from tilec.solve.bounds import alone_too_big, fits, free_memory, with_memory
        cands = with_memory(self.cands, memory)
        free = free_memory(cands)
        if min(free) <= 0 or self.reference is None:
            return None
        dropped, forced = alone_too_big(cands)
        best = None  # (seconds, path)
        for width, roomy, weight in attempts:
            if best is not None and best[0] <= (1 + CLOSE) * self.reference:
                break
            try:
                found = self._search(free, dropped, forced, recompute, width, roomy, weight, deadline)
            except _Late:
                break
            for secs, path in found:  # fastest first; the cost model has the last word
                if fits(cands, path)[0]:
                    if best is None or secs < best[0]:
                        best = (secs, path)
                    break
        return None if best is None else best[1]

    def _search(self, free, dropped, forced, recompute, width, roomy, weight, deadline):
        """Complete paths that fit by the solver's count, fastest first: [(seconds, path)]."""
        cands, n, end = self.cands, self.n, self.end

        def score(p):
            return p.secs / self.reference + weight * max(t / f for t, f in zip(p.total, free))

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

        ready = {(0, li): [_Partial(0.0, {}, [0.0] * n, ())] for (b, li) in self.by_start if b == 0}
        arrived = {}  # (b, layout) -> [partial]
        done = []
        for b in range(end + 1):
            if deadline is not None and time.perf_counter() > deadline:
                raise _Late
            for (bb, li), gis in self.by_start.items():  # the groups leaving boundary b
                if bb != b or (b, li) not in ready:
                    continue
                for p in ready.pop((b, li)):
                    for gi in gis:
                        if gi in dropped:
                            continue
                        for q in self._extend(p, gi, free, forced, recompute):
                            g = cands.groups[gi]
                            if g.last + 1 == end:
                                done.append((q.secs, q.path))
                            else:
                                arrived.setdefault((g.last + 1, cands.group_out[gi]), []).append(q)
            # every group reaching boundary b + 1 is in: its transitions
            nb = b + 1
            for (bb, li) in [k for k in arrived if k[0] == nb]:
                here = select(arrived.pop((bb, li)))
                for t, lj in self.moves_from.get((nb, li), ()):
                    secs, stage = cands.transitions[t][3], cands.transition_bytes[t]
                    for p in here:
                        if any(p.total[d] + v > free[d] for d, v in stage.items()):
                            continue
                        total = list(p.total)
                        for d, v in stage.items():
                            total[d] += v
                        ready.setdefault((nb, lj), []).append(_Partial(p.secs + secs, p.work, total, p.path))
            for key in [k for k in ready if k[0] == nb]:
                ready[key] = select(ready[key])
        done.sort()
        return done

    def _extend(self, p, gi, free, forced, recompute):
        """Partial ``p`` followed by group ``gi``, kept and recomputed, where
        it still fits."""
        g, members = self.cands.groups[gi], self.members[gi]
        if g.is_tail:  # each device's tail groups so far, as ``tilec_runtime.footprint.tail_peak`` reads them
            parts = list(p.work.get("parts") or [()] * self.n)
            cut = p.work.get("cut", g.first)  # where the tiles end: the first tail group's first layer
            for d in members:
                parts[d] += ((g.phase.get(d, 0), g.grads.get(d, 0), g.workspace[d],
                              early_bytes(g.reads.get(d, {}), cut)),)
        scratch = p.work.get("tiles") or [0] * self.n
        for rec in ((True,) if gi in forced else (False, True) if recompute else (False,)):
            kept = g.kept_recompute if rec else g.kept
            if rec and all(kept[d] >= g.kept[d] for d in members):
                continue  # recomputing saves nothing here
            if g.is_tail:
                work = {**p.work, "parts": parts, "cut": cut}
            else:
                ws, new = g.workspace_recompute if rec else g.workspace, list(scratch)
                for d in members:
                    new[d] = max(scratch[d], ws.get(d, 0))
                work = {**p.work, "tiles": new}
            total = list(p.total)
            for d in members:
                total[d] += g.state[d] + kept[d] + _transient(work, d) - _transient(p.work, d)
            if all(total[d] <= free[d] for d in members):
                yield _Partial(p.secs + self.cands.group_seconds(gi, rec), work, total, p.path + ((gi, rec),))


def _transient(work, d):
    """Device ``d``'s bytes of the tiles' scratch and of what the tail holds
    while it runs (``tilec_runtime.footprint.tiles_and_tail``), from a
    partial path's scratch maximum and tail groups (``_Partial.work``)."""
    parts = work["parts"][d] if "parts" in work else ()
    return tiles_and_tail(work["tiles"][d] if "tiles" in work else 0, tail_peak(parts), tail_early(parts))


def beam_fit(cands, recompute=True, deadline=None, attempts=ATTEMPTS, reference=None, wide=WIDE_ATTEMPTS):
    """A path that fits ``cands``' devices, or None (:meth:`Beam.fit`):
    ``attempts``, then, if they found none, ``wide``."""
    beam, memory = Beam(cands, reference), [d.memory_bytes for d in cands.model.devices]
    found = beam.fit(memory, recompute, deadline, attempts)
    if found is None and wide and (deadline is None or time.perf_counter() < deadline):
        found = beam.fit(memory, recompute, deadline, wide)
    return found


def leanest(cands, start_extra, deadline, recompute=True, attempts=((3, 1, 64.0),)):
    """(extra bytes, path): a path that fits every device given ``extra``
    bytes more than it has, by memory-first beam searches with less and
    less extra until none fits or ``deadline`` (perf_counter) passes; None
    if none fits with ``start_extra``. Explains an infeasible cluster
    (:mod:`tilec.solve.explain`) with a far smaller need than the least-
    overflow search alone finds in its time (YOLOv2 at batch 8 on 4 Pi 3s:
    59 MB over in 2.9 s, where the least-overflow search said 477)."""
    from tilec.solve.bounds import overflow
    beam, memory = Beam(cands), [d.memory_bytes for d in cands.model.devices]
    best, extra = None, max(0, int(start_extra))
    while time.perf_counter() < deadline:
        path = beam.fit([m + extra for m in memory], recompute, deadline, attempts)
        if path is None:
            break
        need = overflow(cands, path)
        if best is not None and need >= best[0]:
            break
        best = (need, path)
        if need == 0:
            break
        extra = need - max(1 << 20, need // 50)  # then ask for a little less
    return best
