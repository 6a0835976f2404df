"""The plan optimiser: a CP-SAT model over the precomputed candidates.

Problem: choose a chain of groups over the whole program: layer groups of
the tiled prefix, each with a layout (split lines and the device of every
tile) and keep-or-recompute, up to a cut, then tail groups, each on one
device or split by channels over several, so that every device's peak
memory fits and the predicted step time is least.

Data (:mod:`tilec.cost.candidates`, all priced outside the solver): groups
and tail groups with their seconds, per-device state/kept/workspace bytes,
and the recompute variant's extra seconds and smaller kept bytes;
transitions between layouts (and tail holdings) at each boundary with
their seconds.

Variables:
- ``use[g]``: group g is in the plan;
- ``rec[g]``: group g recomputes its activations in backward (implies use);
- ``move[t]``: transition t is taken at its boundary;
- ``work[d][pool]``: device d's largest workspace of each pool (the tiles
  share one scratch; the tail groups' temporaries come and go apart from it).

Constraints:
- flow: one group starts at layer 0; at each boundary, the groups that
  arrive in a layout equal the transitions out of it, and the transitions
  into a layout equal the groups that leave from it; one group ends at the
  program's last layer;
- memory: per device, overhead + images (rank 0) + sum of the chosen
  groups' state and kept bytes (less what recomputing saves) + the tiles'
  scratch and what the tail holds while it runs (its groups' activations,
  ``phase``, and its largest temporary) is at most its memory;
  ``work[d][pool]`` is at least the workspace of the group of that pool
  covering each layer (exactly one group covers each layer, so one linear
  constraint per layer and device gives the maximum). Where the scratch
  and the tail's part are each at least ``RELEASE_MIN_BYTES`` (a boolean
  per device), the device gives the scratch back during the tail and holds
  the larger of them, else both (``tilec_runtime.footprint.transient``);
  the boolean asks for a chosen tile group with that much workspace and
  for that much of the tail's activations alone (its temporaries aside),
  so the count is never below the cost model's but for one part: the
  tail's inputs that the tiles hand on before the scratch is given back
  (``tilec_runtime.footprint.early_bytes``) depend on where the tiles end,
  which no group knows alone; a term for them cost seconds of the time
  limit on YOLOv2's candidates, so the plan's own count, which has them,
  is checked after (``tilec.compile``: a plan that does not fit is asked
  for again with that much less memory). The tail's part is then
  what its groups hold at once as each lets go after its backward
  (``_freed``), else all of it.

Objective: the sum of the chosen groups' and transitions' seconds, in
microseconds.

Scaling: seconds are integer microseconds, bytes integer KiB (rounded up).
"""
import math
import sys
import time

from ortools.sat.python import cp_model

from tilec_runtime.footprint import RELEASE_MIN_BYTES
from tilec.cost.model import workspace_pool
from tilec.solve import solution_from_path

US = 1e6
KIB = 1024
DEFAULT_WORKERS = 8
FIRST_FIT_SHARE = 0.4  # of the time limit, to find a first plan that fits when the Lagrangian search did not
MIN_IMPROVE = 1.0  # seconds CP-SAT has at least to improve a plan found before it
LAGRANGE_STEPS = {False: 40, True: 12}  # multiplier steps, without and with a plan from the beam search
BEAM_SHARE = 3.0  # of the time limit: when the beam search stops (YOLOv2 at batch 8 on 5 Pi 3s: its plan at about 8 s)


def _kib(nbytes):
    return int(math.ceil(nbytes / KIB))


def _us(seconds):
    return int(round(seconds * US))


class PlanModel:
    """The CP-SAT model of one :class:`Candidates`; ``overrun=True`` lets
    every device exceed its memory by a common slack, minimised (used to
    explain an infeasible cluster)."""

    def __init__(self, cands, recompute=True, overrun=False, forced=()):
        self.cands = cands
        model = self.model = cp_model.CpModel()
        groups = cands.groups
        devices = cands.model.devices

        # variables
        self.use = [model.new_bool_var(f"use_{g.first}_{g.last}_{li}") for g, li in zip(groups, cands.group_layout)]
        self.rec = {}
        if recompute:
            for gi, g in enumerate(groups):
                if any(g.kept[d] > g.kept_recompute[d] for d in g.members):
                    self.rec[gi] = model.new_bool_var(f"rec_{gi}")
                    if gi in forced:  # fits its devices only if it recomputes
                        model.add(self.rec[gi] == self.use[gi])
                    else:
                        model.add_implication(self.rec[gi], self.use[gi])
        self.move = [model.new_bool_var(f"move_{b}_{li}_{lj}") for b, li, lj, _ in cands.transitions]

        # flow along the chain
        end = cands.end
        model.add(sum(self.use[gi] for gi, g in enumerate(groups) if g.first == 0) == 1)
        model.add(sum(self.use[gi] for gi, g in enumerate(groups) if g.last + 1 == end) == 1)
        arrive, leave, moves_out, moves_in = {}, {}, {}, {}
        for gi, g in enumerate(groups):
            if g.last + 1 < end:
                arrive.setdefault((g.last + 1, cands.group_out[gi]), []).append(self.use[gi])
            if g.first > 0:
                leave.setdefault((g.first, cands.group_layout[gi]), []).append(self.use[gi])
        for t, (b, li, lj, _) in enumerate(cands.transitions):
            moves_out.setdefault((b, li), []).append(self.move[t])
            moves_in.setdefault((b, lj), []).append(self.move[t])
        for node in set(arrive) | set(moves_out):
            model.add(sum(arrive.get(node, [])) == sum(moves_out.get(node, [])))
        for node in set(leave) | set(moves_in):
            model.add(sum(moves_in.get(node, [])) == sum(leave.get(node, [])))

        # memory per device
        self.slack = model.new_int_var(0, _kib(sum(d.memory_bytes for d in devices)) * 4, "slack") if overrun else 0
        # two workspaces per device: the tiles' shared scratch, and the tail groups' temporaries
        pools = sorted({workspace_pool(g) for g in groups})
        self.work = []
        self.memory = []  # per device: its peak in KiB, as the constraint counts it
        for d, dev in enumerate(devices):
            const = dev.profile.process_overhead_bytes
            cap = dev.memory_bytes // KIB
            work, ws_cap = {}, 0
            for pool in pools:
                ws_max = max([0] + [max(g.workspace.get(d, 0), g.workspace_recompute.get(d, 0)) for g in groups
                                    if workspace_pool(g) == pool])
                work[pool] = model.new_int_var(0, _kib(ws_max), f"work_{d}_{pool}")
                ws_cap += ws_max
            self.work.append(work)
            terms = []
            for gi, g in enumerate(groups):
                if d not in g.state:
                    continue
                terms.append(_kib(g.state[d] + g.kept[d]) * self.use[gi])
                if gi in self.rec:
                    terms.append(-(_kib(g.state[d] + g.kept[d]) - _kib(g.state[d] + g.kept_recompute[d])) * self.rec[gi])
            # the staging buffers of the messages a transition moves
            terms += [_kib(stage[d]) * self.move[t] for t, stage in enumerate(cands.transition_bytes) if d in stage]
            # what its tail groups hold while the tail runs, with their temporaries
            phase = sum(_kib(g.phase[d]) * self.use[gi] for gi, g in enumerate(groups) if g.phase.get(d))
            tail = phase + work.get("tail", 0)
            scratch = work.get("tiles", 0)
            if isinstance(scratch, int) or isinstance(tail, int):
                both = scratch + tail
            else:  # one at a time where each is large enough for the scratch to be given back
                both = model.new_int_var(0, _kib(ws_cap) + _kib(sum(g.phase.get(d, 0) for g in groups)),
                                         f"transient_{d}")
                apart = model.new_bool_var(f"release_{d}")
                model.add(both >= scratch + tail).only_enforce_if(~apart)
                model.add(both >= scratch).only_enforce_if(apart)
                model.add(both >= self._freed(d, ws_cap)).only_enforce_if(apart)
                # (on what the chosen groups hold, not on the maxima, which the solver may set higher:
                # a tile group whose workspace is that large, the tail's activations alone)
                large = [self.use[gi] for gi, g in enumerate(groups) if not g.is_tail
                         and g.workspace.get(d, 0) >= RELEASE_MIN_BYTES]
                large += [self.rec[gi] for gi, g in enumerate(groups) if not g.is_tail and gi in self.rec
                          and g.workspace.get(d, 0) < RELEASE_MIN_BYTES <= g.workspace_recompute.get(d, 0)]
                model.add(sum(large) >= 1).only_enforce_if(apart)
                acts = sum(_kib(g.phase[d] - g.grads.get(d, 0)) * self.use[gi] for gi, g in enumerate(groups)
                           if g.phase.get(d))  # (what the tail holds at once is at least all of its activations)
                model.add(acts >= _kib(RELEASE_MIN_BYTES)).only_enforce_if(apart)
            self.memory.append(sum(terms) + both + _kib(const))
            model.add(self.memory[-1] <= cap + self.slack)
            # one pass over the groups (not layers x groups: seconds on large
            # candidate sets), emitted per layer as before so the model is the same
            cover = {}  # layer -> pool -> terms, in group order
            for gi, g in enumerate(groups):
                if d not in g.workspace:
                    continue
                pool = workspace_pool(g)
                use_t = _kib(g.workspace[d]) * self.use[gi]
                rec_t = (_kib(g.workspace_recompute[d]) - _kib(g.workspace[d])) * self.rec[gi] if gi in self.rec else None
                for p in range(g.first, g.last + 1):
                    terms = cover.setdefault(p, {}).setdefault(pool, [])
                    terms.append(use_t)
                    if rec_t is not None:
                        terms.append(rec_t)
            for p in range(end):
                for pool, terms in cover.get(p, {}).items():
                    model.add(work[pool] >= sum(terms))

        # objective
        time_terms = [_us(cands.group_seconds(gi)) * self.use[gi] for gi in range(len(groups))]
        time_terms += [_us(groups[gi].recompute_seconds) * r for gi, r in self.rec.items()]
        time_terms += [_us(secs) * self.move[t] for t, (_, _, _, secs) in enumerate(cands.transitions) if secs > 0]
        self.time_expr = sum(time_terms)
        if overrun:
            model.minimize(self.slack)
        else:
            model.minimize(self.time_expr)

    def _freed(self, d, cap):
        """A variable at least what device ``d``'s tail groups hold at once
        when each lets go after its backward
        (``tilec_runtime.footprint.tail_peak``): for each tail group, the
        activations of the chosen groups that end before it, its own phase
        and temporaries. (A group not chosen adds nothing, and what ends
        before it is no more than what the last chosen group sees.)"""
        model, groups = self.model, self.cands.groups
        tails = [(gi, g) for gi, g in enumerate(groups) if g.is_tail and d in g.workspace]
        total = sum(_kib(g.phase.get(d, 0)) for _, g in tails) + _kib(cap)
        freed = model.new_int_var(0, total, f"freed_{d}")
        before = {}
        for b in sorted({g.first for _, g in tails}):
            terms = [_kib(g.phase[d] - g.grads.get(d, 0)) * self.use[gi] for gi, g in tails
                     if g.last < b and g.phase.get(d)]
            before[b] = model.new_int_var(0, total, f"acts_{d}_{b}")
            model.add(before[b] == sum(terms))
        for gi, g in tails:
            model.add(freed >= before[g.first] + _kib(g.phase.get(d, 0) + g.workspace[d]) * self.use[gi])
        return freed

    @property
    def booleans(self):
        return len(self.use) + len(self.rec) + len(self.move)

    def hint(self, path):
        """Seed the search with ``path`` (e.g. the shortest path without memory limits)."""
        chosen = dict(path)
        for gi, var in enumerate(self.use):
            self.model.add_hint(var, gi in chosen)
        for gi, var in self.rec.items():
            self.model.add_hint(var, bool(chosen.get(gi, False)))
        chosen_groups = [(self.cands.groups[gi], rec) for gi, rec in path]
        pred = self.cands.model.evaluate(chosen_groups)
        for d, work in enumerate(self.work):
            for pool, var in work.items():
                self.model.add_hint(var, max([0] + [_kib((g.workspace_recompute if rec else g.workspace).get(d, 0))
                                                    for g, rec in chosen_groups if workspace_pool(g) == pool]))
        if not isinstance(self.slack, int):
            over = max(m - dev.memory_bytes for m, dev in zip(pred.memory, self.cands.model.devices))
            self.model.add_hint(self.slack, max(0, _kib(over) + 1))
        taken = set()
        for (gi, _), (gj, _) in zip(path, path[1:]):
            taken.add((self.cands.groups[gj].first, self.cands.group_out[gi], self.cands.group_layout[gj]))
        for t, (b, li, lj, _) in enumerate(self.cands.transitions):
            self.model.add_hint(self.move[t], (b, li, lj) in taken)

    def solve(self, time_limit=10.0, workers=0, log=False):
        solver = cp_model.CpSolver()
        p = solver.parameters
        p.max_time_in_seconds = float(time_limit)
        # a portfolio of 8 pays even on 2 cores (measured: infeasibility
        # proven in 3 s instead of not within 15 s)
        p.num_workers = int(workers) if workers else DEFAULT_WORKERS
        p.log_search_progress = bool(log)
        if log:  # on stderr with the rest of TILEC_DEBUG's output, not on stdout
            p.log_to_stdout = False
            solver.log_callback = lambda line: print(line, file=sys.stderr)
        # Measured on YOLOv2-tiny, 4 devices: presolve probing spent seconds
        # deriving ~1e6 binary clauses from the flow constraints for no gain;
        # with every constraint in the LP from the start (not lazily) and
        # enough LP iterations at the root, the flow's LP bound is tight and
        # optimality was proven in 2.2 s instead of 12 s.
        p.cp_model_probing_level = 0
        p.add_lp_constraints_lazily = False
        p.root_lp_iterations = 100_000
        status = solver.solve(self.model)
        return solver, status

    def path(self, solver):
        """The chosen groups in layer order, with their recompute flags."""
        chosen = sorted((self.cands.groups[gi].first, gi) for gi, v in enumerate(self.use) if solver.value(v))
        return [(gi, bool(gi in self.rec and solver.value(self.rec[gi]))) for _, gi in chosen]

    def settle(self, solver, time_limit, workers=0):
        """The path of ``solver``'s solution to this model (its time
        objective just minimised), or, among the plans as fast, the one
        whose chosen candidates come first in the candidate list.

        Plans can be exactly as fast (a square map split into rows or
        into columns), and CP-SAT's parallel workers then return whichever
        of them one finds first: with a memory layout tried and not kept,
        under which both splits of detector-small on two Pi 3s also took
        the same memory, one compile in five chose the other split, and a
        resumed demo trained on another plan than the run it continued.
        Fixing the time and minimising the candidates' positions makes the
        plan one of them, always the same where the search proves it
        optimal. The model keeps that bound and objective: it is spent."""
        path = self.path(solver)
        model = self.model
        model.clear_hints()
        self.hint(path)
        model.add(self.time_expr <= solver.value(self.time_expr))
        model.minimize(sum(gi * v for gi, v in enumerate(self.use)))
        solver, status = self.solve(time_limit, workers)
        return self.path(solver) if status in (cp_model.OPTIMAL, cp_model.FEASIBLE) else path


def solve(cands, *, time_limit=10.0, workers=0, recompute=True, log=False):
    """The fastest plan that fits: a :class:`tilec.solve.Solution`.

    Steps: the fastest plan ignoring memory (a shortest path); if it fits,
    it is optimal and CP-SAT is not needed. Otherwise a Lagrangian search
    and a beam search (:mod:`tilec.solve.beam`) find plans that fit (the
    faster is an upper bound), or, failing both, CP-SAT minimising the
    overflow does; the arcs whose lower bound exceeds it
    are dropped (:mod:`tilec.solve.bounds`), and CP-SAT solves the rest,
    seeded with that plan.

    Raises :class:`InfeasibleError` (explained) when no plan fits, and
    when the time limit passes before any plan is found.
    """
    from tilec.solve import bounds
    from tilec.solve.beam import beam_fit
    from tilec.solve.explain import explain_infeasible
    t0 = time.perf_counter()
    if not recompute:
        cands = _without_recompute(cands)
    if min(bounds.free_memory(cands)) < 0:  # the process, or rank 0's images, do not fit by themselves
        raise explain_infeasible(cands, time_limit=time_limit, workers=workers, recompute=recompute)
    upper, path, tried, closest = bounds.feasible_plan(cands, steps=0)
    if path is not None:
        return solution_from_path(cands, path, solver="shortest path (memory not binding)", status="OPTIMAL",
                                  objective_s=upper, bound_s=upper, wall_s=time.perf_counter() - t0)
    dropped, forced = bounds.alone_too_big(cands)
    # memory binds: beam search often finds a plan that fits where the multipliers do not, or a faster one;
    # then the multipliers (bounds for pruning and the gap, sometimes a faster plan) take fewer steps
    found = beam_fit(cands, recompute, deadline=t0 + BEAM_SHARE * time_limit,
                     reference=bounds.lower_bound(cands, tried))  # (at zero multipliers: the fastest plan)
    # (with the beam's plan in hand, the multipliers only bound it or better it: within the time limit)
    upper, path, tried, closest = bounds.feasible_plan(cands, steps=LAGRANGE_STEPS[found is not None],
                                                       deadline=t0 + time_limit if found is not None else None)
    source = "lagrangian"
    if found is not None:
        found_s = bounds.path_seconds(cands, found)
        if path is None or found_s < upper:
            upper, path, source = found_s, found, "beam search"
    if path is None:
        # No multipliers gave a path that fits (devices alike trade the same groups back and forth):
        # first find one that fits, seeded with the one that overflowed least, then the fastest.
        path = _first_fit(cands, closest, dropped, forced, FIRST_FIT_SHARE * time_limit, workers, recompute)
        if path is None:
            err = explain_infeasible(cands, time_limit=time_limit, workers=workers, recompute=recompute,
                                     fallback=closest)
            path = getattr(err, "fitting_path", None)  # (its longer search may find one after all)
            if path is None:
                raise err
        upper = bounds.path_seconds(cands, path)
    if path is not None and time.perf_counter() - t0 >= time_limit:
        # The time is spent: on candidate sets this large CP-SAT needs seconds to build and to seed before it
        # improves anything (YOLOv2 at batch 8 on 6 Pi 3s: 2.4 s for no better plan); the plan in hand stands.
        return solution_from_path(cands, path, solver=f"{source} (no time left for cp-sat)", status="FEASIBLE",
                                  objective_s=upper, bound_s=bounds.lower_bound(cands, tried),
                                  wall_s=time.perf_counter() - t0)
    if upper is not None:
        reduced, kept = bounds.prune(cands, upper, tried)
        keep = [k for k, gi in enumerate(kept) if gi not in dropped]
        reduced, kept = bounds.subset(reduced, keep), [kept[k] for k in keep]
    else:
        kept = [gi for gi in range(len(cands.groups)) if gi not in dropped]
        reduced = bounds.subset(cands, kept)
    index = {gi: k for k, gi in enumerate(kept)}
    pm = PlanModel(reduced, recompute=recompute, forced={index[gi] for gi in forced if gi in index})
    if path is not None and all(gi in index for gi, _ in path):
        pm.hint([(index[gi], rec) for gi, rec in path])
    # (with a plan in hand CP-SAT gets a moment to improve it even if the search before took the time)
    left = max(MIN_IMPROVE if path is not None else 0.1, time_limit - (time.perf_counter() - t0))
    solver, status = pm.solve(left, workers, log)
    wall = time.perf_counter() - t0
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        lower = max(solver.best_objective_bound / US, bounds.lower_bound(cands, tried))
        if status != cp_model.INFEASIBLE and path is not None:  # the Lagrangian plan stands
            return solution_from_path(cands, path, solver=f"{source} (cp-sat timed out)", status="FEASIBLE",
                                      objective_s=upper, bound_s=lower, wall_s=wall,
                                      booleans=pm.booleans)
        # Infeasible or undecided: the least-overflow model explains why no
        # plan fits, or finds one that does (CP-SAT rounds bytes up to KiB,
        # so "infeasible" can hide a plan that fits to the byte).
        err = explain_infeasible(cands, time_limit=time_limit, workers=workers, recompute=recompute,
                                 fallback=closest)
        fitting = getattr(err, "fitting_path", None)
        if fitting is None:
            raise err
        sol = solution_from_path(cands, fitting, solver="cp-sat (least overflow)", status="FEASIBLE",
                                 objective_s=0.0, bound_s=lower, wall_s=time.perf_counter() - t0,
                                 booleans=pm.booleans)
        sol.objective_s = sol.prediction.step_s
        return sol
    lower = max(solver.best_objective_bound / US, bounds.lower_bound(cands, tried))
    objective_s = solver.objective_value / US
    if status == cp_model.OPTIMAL:
        path = pm.settle(solver, max(MIN_IMPROVE, time_limit - (time.perf_counter() - t0)), workers)
        wall = time.perf_counter() - t0
    else:
        path = pm.path(solver)
    return solution_from_path(reduced, path, solver="cp-sat", status=solver.status_name(status),
                              objective_s=objective_s, bound_s=min(lower, objective_s), wall_s=wall,
                              booleans=pm.booleans)


SHARE = 1_000_000  # a device's peak in millionths of its memory
MEMORY_SHARE = 0.5  # of the time limit, for the least-memory pass after the fastest plan
MIN_SAVING = 0.01  # of the fastest plan's fullest device: less is not worth any time


def least_memory(cands, solution, slack, *, time_limit=1.5, workers=0, recompute=True):
    """Among the plans at most ``slack`` (a fraction) slower than
    ``solution``, predicted, that put no more memory on any device than it
    does, the one whose fullest device uses the least of its memory, and
    the fastest of those: a :class:`Solution` (``solution`` itself where
    none uses ``MIN_SAVING`` less). (Without that bound a Pi 3 beside a
    Pi 4 would be emptied into the Pi 4, which has room to spare: less of
    the fullest device's share for more memory in all and an idle device.)

    Why: plans within the cost model's error of the fastest differ by up to
    1.5x in memory (tiny416 at batch 8 on two workers: 256 or 365 MB for
    the same predicted step within 1%), and which of them is fastest moved
    with each new profile. Two CP-SAT passes over the arcs that some plan
    within the bound can use (:func:`tilec.solve.bounds.prune` on the
    bound without memory): the least share, then the least time at that
    share; the plan is taken only if the cost model agrees (its count of
    memory has what the model's constraint leaves out).
    """
    from tilec.solve import bounds
    fastest_s = solution.prediction.step_s  # (objective_s may be CP-SAT's sum of rounded microseconds)
    if slack <= 0 or fastest_s <= 0:
        return solution
    t0 = time.perf_counter()
    if not recompute:
        cands = _without_recompute(cands)
    limit = fastest_s * (1 + slack)
    _, _, tried, _ = bounds.feasible_plan(cands, steps=0)
    reduced, _ = bounds.prune(cands, limit, tried, slack=0.0)
    # (by what a group is, not by the object: without recompute ``solve`` made its own copies)
    index = {_identity(g): k for k, g in enumerate(reduced.groups)}
    if not all(_identity(g) in index for g, _ in solution.choices):
        return solution  # (cannot happen: the fastest plan's arcs are within its own time)
    fastest = [(index[_identity(g)], rec) for g, rec in solution.choices]
    # the bound per device is the fastest plan's own count in this model (which counts more than the cost
    # model where it cannot know where the tiles end, ``PlanModel``): else that plan would not be one of them
    held = _path_memory(reduced, fastest, recompute, time_limit / 4, workers)
    if held is None:
        return solution
    pm = PlanModel(reduced, recompute=recompute)
    model = pm.model
    model.add(pm.time_expr <= _us(limit))
    share = model.new_int_var(0, SHARE, "share")
    for mem, dev, cap in zip(pm.memory, reduced.model.devices, held):
        model.add(share * max(1, dev.memory_bytes // KIB) >= mem * SHARE)
        model.add(mem <= cap)
    pm.hint(fastest)
    model.minimize(share)
    solver, status = pm.solve(time_limit / 2, workers)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return solution
    first = pm.path(solver)
    model.clear_hints()
    pm.hint(first)
    model.add(share <= solver.value(share))
    model.minimize(pm.time_expr)
    solver, status = pm.solve(max(0.1, time_limit - (time.perf_counter() - t0)), workers)
    if status == cp_model.OPTIMAL:
        path = pm.settle(solver, max(0.1, time_limit - (time.perf_counter() - t0)), workers)
    else:
        path = pm.path(solver) if status == cp_model.FEASIBLE else first
    found = solution_from_path(reduced, path, solver=f"{solution.solver}, then least memory within "
                               f"{100 * slack:g}%", status=solution.status, objective_s=0.0,
                               bound_s=solution.bound_s, wall_s=solution.wall_s + time.perf_counter() - t0,
                               booleans=pm.booleans)
    found.objective_s = found.prediction.step_s
    devices = cands.model.devices
    if (found.objective_s > limit * (1 + 1e-9)
            or any(m > held for m, held in zip(found.prediction.memory, solution.prediction.memory))
            or fullest(found.prediction, devices) > fullest(solution.prediction, devices) * (1 - MIN_SAVING)):
        return solution
    found.fastest_s = fastest_s
    found.fastest_bytes = solution.prediction.memory[_fullest_device(solution.prediction, devices)]
    return found


def _identity(group):
    """What tells a candidate group from the others: its layers, its split or mode, its devices."""
    return (group.first, group.last, group.is_tail, getattr(group, "mode", None), tuple(group.devices),
            tuple(getattr(group, "row_splits", ())), tuple(getattr(group, "col_splits", ())))


def _path_memory(cands, path, recompute, time_limit, workers):
    """Per device, the KiB ``PlanModel`` counts for ``path`` (None if not found in time)."""
    pm = PlanModel(cands, recompute=recompute)
    chosen = dict(path)
    for gi, var in enumerate(pm.use):
        pm.model.add(var == int(gi in chosen))
    for gi, var in pm.rec.items():
        pm.model.add(var == int(bool(chosen.get(gi, False))))
    pm.hint(path)
    pm.model.minimize(sum(pm.memory))  # (each device's terms are its own: the sum is least where each is)
    solver, status = pm.solve(max(0.1, time_limit), workers)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return None
    return [solver.value(m) for m in pm.memory]


def _fullest_device(prediction, devices):
    """The device whose predicted peak takes the largest share of its memory."""
    return max(range(len(devices)), key=lambda d: prediction.memory[d] / max(1, devices[d].memory_bytes))


def fullest(prediction, devices):
    """The largest share of its memory a device's predicted peak takes."""
    d = _fullest_device(prediction, devices)
    return prediction.memory[d] / max(1, devices[d].memory_bytes)


def _first_fit(cands, closest, dropped, forced, time_limit, workers, recompute):
    """A path that fits, by CP-SAT minimising every device's overflow (None if
    none does, or none was found in time)."""
    from tilec.solve import bounds
    kept = [gi for gi in range(len(cands.groups)) if gi not in dropped]
    index = {gi: k for k, gi in enumerate(kept)}
    pm = PlanModel(bounds.subset(cands, kept), recompute=recompute, overrun=True,
                   forced={index[gi] for gi in forced if gi in index})
    if closest and all(gi in index for gi, _ in closest):
        pm.hint([(index[gi], rec) for gi, rec in closest])
    solver, status = pm.solve(time_limit, workers)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE) or solver.value(pm.slack) > 0:
        return None
    path = [(kept[gi], rec) for gi, rec in pm.path(solver)]
    return path if bounds.fits(cands, path)[0] else None


def _without_recompute(cands):
    from dataclasses import replace
    groups = [g if g.is_tail else  # (a tail group never recomputes)
              replace(g, kept_recompute=dict(g.kept), workspace_recompute=dict(g.workspace), recompute_seconds=0.0)
              for g in cands.groups]
    return replace(cands, groups=groups)
