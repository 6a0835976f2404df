"""Cross-checks for the CP-SAT model: exact answers by plain search.

- :func:`shortest_path`: the fastest plan when memory is no constraint. The
  arcs of :mod:`tilec.cost.candidates` form a DAG ordered by layer, so one
  pass over the boundaries in order is a shortest path (dynamic
  programming); it also seeds CP-SAT with a first solution.
- :func:`exhaustive`: every path with every keep-or-recompute choice,
  memory checked at the end with :meth:`CostModel.evaluate`; exponential,
  for small instances in tests; :func:`least_memory_exhaustive` the same
  for the least-memory plan within a time (``cpsat.least_memory``).
"""
import time

from tilec.solve import InfeasibleError, solution_from_path


def _arcs(cands):
    """Groups by (first, input layout) and transitions by (b, from layout)."""
    starts, moves = {}, {}
    for gi, g in enumerate(cands.groups):
        starts.setdefault((g.first, cands.group_layout[gi]), []).append(gi)
    for b, li, lj, secs in cands.transitions:
        moves.setdefault((b, li), []).append((lj, secs))
    return starts, moves


def shortest_path(cands):
    """(seconds, [(gi, False)]) of the fastest path, ignoring memory."""
    starts, moves = _arcs(cands)
    end = cands.end
    # ready[(b, L)] = (seconds, path) with the map of layer b-1 held as L
    ready = {(0, li): (0.0, []) for li in range(len(cands.layouts))}
    best_end = (float("inf"), None)
    for b in range(end):
        arrived = {}
        for (rb, li), (secs, path) in list(ready.items()):
            if rb != b:
                continue
            for gi in starts.get((b, li), []):
                g = cands.groups[gi]
                t = secs + cands.group_seconds(gi)
                key = (g.last + 1, cands.group_out[gi])
                if g.last + 1 == end:
                    if t < best_end[0]:
                        best_end = (t, path + [(gi, False)])
                elif t < arrived.get(key, (float("inf"),))[0]:
                    arrived[key] = (t, path + [(gi, False)])
        for (ab, li), (secs, path) in arrived.items():
            for lj, move in moves.get((ab, li), []):
                t = secs + move
                if t < ready.get((ab, lj), (float("inf"),))[0]:
                    ready[(ab, lj)] = (t, path)
    if best_end[1] is None:
        raise InfeasibleError("no way to split the program over these devices")
    return best_end


def solve_shortest_path(cands):
    t0 = time.perf_counter()
    total, path = shortest_path(cands)
    return solution_from_path(cands, path, solver="shortest-path", status="OPTIMAL (memory ignored)",
                              objective_s=total, bound_s=total, wall_s=time.perf_counter() - t0)


def fits(cands, prediction):
    return all(m <= d.memory_bytes for m, d in zip(prediction.memory, cands.model.devices))


def _paths(cands, recompute, limit):
    """Every path with every keep-or-recompute choice, with its prediction."""
    starts, moves = _arcs(cands)
    end, model = cands.end, cands.model
    visited = [0]

    def walk(b, li, path):
        for gi in starts.get((b, li), []):
            g = cands.groups[gi]
            for rec in ((False, True) if recompute else (False,)):
                visited[0] += 1
                if visited[0] > limit:
                    raise RuntimeError(f"exhaustive search passed {limit} paths: the instance is too big")
                step = path + [(gi, rec)]
                if g.last + 1 == end:
                    yield step, model.evaluate([(cands.groups[i], r) for i, r in step])
                    continue
                for lj, _ in moves.get((g.last + 1, cands.group_out[gi]), []):
                    yield from walk(g.last + 1, lj, step)

    for li in range(len(cands.layouts)):
        yield from walk(0, li, [])


def exhaustive(cands, recompute=True, limit=2_000_000):
    """The fastest path whose every device fits its memory, by trying all paths."""
    t0 = time.perf_counter()
    best = [float("inf"), None]
    for step, pred in _paths(cands, recompute, limit):
        if pred.step_s < best[0] and fits(cands, pred):
            best[:] = [pred.step_s, step]
    if best[1] is None:
        raise InfeasibleError("no plan fits the devices' memory (exhaustive search)")
    return solution_from_path(cands, best[1], solver="exhaustive", status="OPTIMAL", objective_s=best[0],
                              bound_s=best[0], wall_s=time.perf_counter() - t0)


def least_memory_exhaustive(cands, within_s, caps, recompute=True, limit=2_000_000):
    """(share, seconds, path): of the paths that take at most ``within_s``
    and put at most ``caps[d]`` bytes on each device d, the least share of
    its memory the fullest device's peak takes, and the fastest path at that
    share (None if none)."""
    best = None
    for step, pred in _paths(cands, recompute, limit):
        if pred.step_s <= within_s and all(m <= cap for m, cap in zip(pred.memory, caps)):
            share = max(m / d.memory_bytes for m, d in zip(pred.memory, cands.model.devices))
            if best is None or (share, pred.step_s) < best[:2]:
                best = (share, pred.step_s, step)
    return best
