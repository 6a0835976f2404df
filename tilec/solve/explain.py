"""Why no plan fits, in terms a user can act on.

The same model is solved again with every device allowed a common memory
overrun, minimised (seeded with the leanest plan memory-first beam searches
find, :func:`tilec.solve.beam.leanest`). The plan that needs the least extra memory names the
device that overflows most and what it holds (parameters + gradients +
momentum, kept activations, workspace, of its tiles and tail groups), and the
overrun gives the smallest memory that would work.
"""
import time

from tilec.solve import InfeasibleError
from tilec.solve.beam import leanest

MB = 1_000_000
LEAN_SHARE = 1.0  # of the time limit, for memory-first beam searches before CP-SAT


def _mb(nbytes):
    return f"{nbytes / MB:,.0f} MB"


def explain_infeasible(cands, time_limit=10.0, workers=0, recompute=True, fallback=None):
    """An :class:`InfeasibleError` whose message explains the shortfall.

    ``fallback``: the path that overflows least, when the caller already
    ran :func:`feasible_plan` on ``cands`` (the search is seconds on large
    candidate sets, and would find the same path again)."""
    from ortools.sat.python import cp_model

    from tilec.solve.bounds import feasible_plan, free_memory, overflow, predict, with_memory
    from tilec.solve.cpsat import PlanModel
    model = cands.model
    devices = model.devices
    path, proven = None, False
    free = free_memory(cands)
    if min(free) < 0:
        # What no plan avoids (the process; rank 0's images) already overflows:
        # that much memory is needed anyway. If some plan fits once every
        # device has it, it is the smallest memory that works.
        need = max(d.memory_bytes - f for d, f in zip(devices, free) if f < 0)
        raised = with_memory(cands, [max(d.memory_bytes, need) for d in devices])
        _, fitting, _, fallback = feasible_plan(raised, keep_bounds=False)
        if fitting is not None:
            path, proven = fitting, True
    elif fallback is None:
        fallback = feasible_plan(cands, keep_bounds=False)[3]
    if path is None:
        # memory-first beam searches first: a lean plan to start from (seconds of CP-SAT alone find far worse)
        start = time.perf_counter()
        short = overflow(cands, fallback) if fallback else None
        if fallback:
            lean = leanest(cands, short, start + LEAN_SHARE * time_limit, recompute)
            if lean is not None and lean[0] < short:
                short, fallback = lean
        pm = PlanModel(cands, recompute=recompute, overrun=True)
        if fallback:
            pm.hint(fallback)
        solver, status = pm.solve(max(1.0, time_limit - (time.perf_counter() - start)), workers)
        proven = status == cp_model.OPTIMAL
        if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            path = pm.path(solver)
            if fallback and not proven and short < overflow(cands, path):
                path = fallback
        elif fallback:
            path = fallback
        else:
            return InfeasibleError("no plan fits the devices' memory (and the search for the smallest memory "
                                   "that would work did not finish: raise --time-limit)")
    pred = predict(cands, path)
    over = [(m - d.memory_bytes, r) for r, (m, d) in enumerate(zip(pred.memory, devices))]
    extra, worst = max(over)
    extra = max(0, extra)
    if extra == 0:  # the search for the least overflow found a plan that fits after all
        err = InfeasibleError("a plan fits (found while explaining)")
        err.fitting_path = path
        return err
    proven = proven or extra <= max(-f for f in free) + 1024
    dev, parts = devices[worst], pred.breakdown[worst]
    held = []
    chosen = [(cands.groups[gi], rec) for gi, rec in path if worst in cands.groups[gi].members]
    for what, groups in (("tiles of groups", [(g, rec) for g, rec in chosen if not g.is_tail]),
                         ("tail groups", [(g, rec) for g, rec in chosen if g.is_tail])):
        if groups:
            spans = ", ".join(f"{g.first}-{g.last}{' (recomputed)' if rec else ''}"
                              f"{' split over ' + str(len(g.members)) if getattr(g, 'mode', '') == 'channels' else ''}"
                              for g, rec in groups)
            held.append(f"{what} {spans}: parameters, gradients and momentum "
                        f"{_mb(sum(g.state[worst] for g, _ in groups))}, activations "
                        f"{_mb(sum((g.kept_recompute if rec else g.kept)[worst] for g, rec in groups))}")
    # CP-SAT rounds every group's bytes up to KiB: leave room for that, in whole MB
    rounding = (len(path) + 2) * 1024
    needs = [int(-(-(d.memory_bytes + extra + rounding) // MB) * MB) for d in devices]
    if len({d.memory_bytes for d in devices}) == 1:
        smallest = f"{_mb(needs[0])} per device"
    else:
        smallest = ", ".join(f"{d.name} {_mb(m)}" for d, m in zip(devices, needs))
    err = InfeasibleError(
        f"no plan fits the devices' memory: even the plan that needs least, device {dev.name!r} (rank {worst}) "
        f"needs {_mb(pred.memory[worst])} but has {_mb(dev.memory_bytes)}; it holds "
        f"{'; '.join(held) or 'nothing but the process'} (process {_mb(parts['overhead'])}, workspace "
        f"and the tail's activations {_mb(parts['workspace'])}). The smallest memory that would work: {smallest}"
        f"{'' if proven else ' (or less: the search stopped at the time limit)'}.")
    err.device, err.needed_bytes, err.smallest_bytes = dev.name, pred.memory[worst], needs
    return err
