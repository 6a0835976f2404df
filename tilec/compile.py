"""The composition of the planner's stages: model -> program -> plan.

By default the optimiser chooses the layer groups, split lines, tile
devices and keep-or-recompute (cost model + CP-SAT, ``tilec.solve``) for a
cluster: a cluster file, or N copies of this machine's profile. With
``grid`` or ``groups`` the old rules apply instead: the given groups (or
greedy groups that keep the halo small) on an even grid.
"""
from pathlib import Path

from tilec import debug
from tilec.analysis.regions import even_splits
from tilec.analysis.tiles import group_flops, group_tiles, spatial_prefix, tile_flops
from tilec.errors import PlanError
from tilec.inspect.plan_report import regions_text, schedule_text
from tilec.plan.build import GroupChoice, build_plan, default_grid, even_choices, parse_grid, parse_groups
from tilec.analysis.tail import one_device_tail

DEFAULT_HALO_LIMIT = 0.15
DEFAULT_TIME_LIMIT = 3.0
# Plans within the cost model's error of the fastest can hold half again as much memory; of those at most
# this much slower (predicted), the optimiser takes the one of least memory (tilec.solve.cpsat.least_memory).
# 3%: below what side-by-side runs here tell apart (5 rounds: +-5%); at 1%, a profile measured on a busy
# machine had tiny416 at batch 8 on one device hold 619 MB where a plan 1.9% slower holds 409 MB.
DEFAULT_TIME_SLACK = 0.03
FIT_ATTEMPTS = 3  # solves, each leaving the room a plan's message buffers took


def auto_groups(program, grid, limit=DEFAULT_HALO_LIMIT, prefix=None):
    """Greedy groups over the spatial prefix (or its first ``prefix`` layers):
    extend a group by the next layer while the redundant (halo) FLOPs of an
    even ``grid`` split stay within ``limit`` of the group's own FLOPs."""
    prefix = spatial_prefix(program) if prefix is None else min(prefix, spatial_prefix(program))
    groups, first = [], 0
    for last in range(prefix):
        if last == first:
            continue
        if halo_overhead(program, first, last, grid) > limit:
            groups.append((first, last - 1))
            first = last
    if prefix:
        groups.append((first, prefix - 1))
    return groups


def halo_overhead(program, first, last, grid):
    """Redundant FLOPs of an even grid split of a group, as a fraction."""
    _, h, w = program[last]["out_shape"]
    tiles = group_tiles(program, first, last, even_splits(h, min(grid[0], h)), even_splits(w, min(grid[1], w)))
    return sum(tile_flops(program, t) for t in tiles) / group_flops(program, first, last) - 1


def resolve_cluster(devices, cluster):
    """A Cluster from a cluster (object or YAML path) or a device count (copies of this machine)."""
    from tilec.cluster import Cluster, load_cluster, local_cluster
    if isinstance(cluster, Cluster):
        return cluster
    if cluster is not None:
        return load_cluster(Path(cluster))
    return local_cluster([f"dev{r}" for r in range(devices)] if isinstance(devices, int) else list(devices))


TAILS = ("auto", "one", "channels", "data")


def compile_plan(graph, *, devices=1, batch=None, dtype="float32", grid=None, groups=None, optimizer=None,
                 cluster=None, tiled_prefix=None, time_limit=DEFAULT_TIME_LIMIT, workers=0, recompute=True,
                 tail="auto", time_slack=DEFAULT_TIME_SLACK, spread=False):
    """A sealed plan for ``graph`` on ``devices`` (a count or a list of names)
    or on ``cluster`` (a :class:`tilec.cluster.Cluster` or a YAML path)."""
    return plan_with_solution(graph, devices=devices, batch=batch, dtype=dtype, grid=grid, groups=groups,
                              optimizer=optimizer, cluster=cluster, tiled_prefix=tiled_prefix,
                              time_limit=time_limit, workers=workers, recompute=recompute, tail=tail,
                              time_slack=time_slack, spread=spread)[0]


def plan_with_solution(graph, *, devices=1, batch=None, dtype="float32", grid=None, groups=None, optimizer=None,
                       cluster=None, tiled_prefix=None, time_limit=DEFAULT_TIME_LIMIT, workers=0, recompute=True,
                       tail="auto", time_slack=DEFAULT_TIME_SLACK, spread=False):
    """(plan, Solution or None, CostModel or None): the plan and how it was chosen.

    The optimiser runs unless ``grid`` or ``groups`` (other than "auto") is
    given; then the tail runs on rank 0 and the model's prediction is
    attached only if a ``cluster`` is. ``tiled_prefix``: tile exactly that
    many layers (default: the optimiser chooses where the tiled prefix
    ends); ``tail``: which tail groups the optimiser may choose (``TAILS``:
    any, one device each, split by channels wherever a layer can be);
    ``time_slack``: of the plans at most that fraction slower than the
    fastest (predicted), the optimiser takes the one of least memory;
    ``spread``: every tiled group over every device, however the optimiser
    prices one device alone (what measures devices computing side by side
    needs: ``tilec.profile_calibrate.beside_others``).
    """
    import numpy as np
    if tail not in TAILS:
        raise PlanError(f"--tail must be one of {', '.join(TAILS)}, got {tail!r}")
    if tail == "data":
        raise PlanError("--tail data (data parallelism after the tiled prefix) is not implemented yet: "
                        "use --tail channels to spread the tail's weights and work over the devices")
    if cluster is None and not isinstance(devices, int):
        devices = list(devices)
        if not devices:
            raise PlanError("at least one device is needed")
    if isinstance(devices, int) and devices < 1:
        raise PlanError("at least one device is needed")
    if not 0 <= time_slack < 1:
        raise PlanError(f"--time-slack must be a fraction in [0, 1), got {time_slack}")
    if tiled_prefix is not None and tiled_prefix < 0:
        raise PlanError(f"--tile-layers must be >= 0, got {tiled_prefix}")
    with debug.stage("ir") as st:
        program = graph.to_program()
        st.detail = f"{graph.name}: {len(program)} layers, verified, shapes inferred"
    net = graph.net
    batch = batch or net["batch"]
    opt = optimizer or {"lr": net["learning_rate"], "momentum": net["momentum"], "decay": net["decay"]}
    with debug.stage("analysis") as st:
        prefix = spatial_prefix(program) if tiled_prefix is None else min(tiled_prefix, spatial_prefix(program))
        st.detail = f"tiled prefix: layers 0-{prefix - 1} at most" if prefix else "no tiled prefix"
    itemsize = np.dtype(dtype).itemsize
    use_optimizer = grid is None and groups in (None, "auto")
    clus = resolve_cluster(devices, cluster) if (use_optimizer or cluster is not None) else None
    names = clus.names if clus is not None else (
        [f"dev{r}" for r in range(devices)] if isinstance(devices, int) else list(devices))
    model = solution = None
    if use_optimizer:
        from tilec.cost.candidates import enumerate_candidates
        from tilec.cost.layouts import layouts
        from tilec.cost.model import CostModel
        from tilec.solve.cpsat import MEMORY_SHARE, least_memory, solve
        with debug.stage("cost") as st:
            model = CostModel(program, clus, batch, itemsize, prefix=prefix)
            lays = [lay for lay in layouts(clus) if not spread or len(set(lay.devices)) == len(names)]
            cands = enumerate_candidates(model, lays, tail=tail,
                                         cuts=None if tiled_prefix is None else (prefix,))
            st.detail = (f"{len(cands.groups)} candidate groups, {len(cands.transitions)} transitions "
                         f"for {len(names)} device(s)")
        from tilec.cost.memory import plan_peaks
        from tilec.solve import InfeasibleError
        from tilec.solve.bounds import with_memory
        limits = [d.memory_bytes for d in clus.devices]
        for attempt in range(FIT_ATTEMPTS):
            with debug.stage("solver") as st:
                fitted = with_memory(cands, limits)
                solution = solve(fitted, time_limit=time_limit, workers=workers, recompute=recompute,
                                 log=debug.level() >= 2)
                solution = least_memory(fitted, solution, time_slack, time_limit=MEMORY_SHARE * time_limit,
                                        workers=workers, recompute=recompute)
                stats = solution.stats()
                st.detail = (f"{stats['solver']}: {stats['status']}, predicted step {stats['objective_s']:.4f} s, "
                             f"gap {100 * stats['gap']:.2f}%")
            choices = [GroupChoice(g.first, g.last, list(g.row_splits), list(g.col_splits), list(g.devices), rec)
                       for g, rec in solution.choices if not g.is_tail]
            tail_choices = [g.choice() for g, _ in solution.choices if g.is_tail]
            plan = build_plan(program, choices, model=graph.name, batch=batch, dtype=dtype, devices=names,
                              optimizer=opt, prefix=tail_choices[0].first, threads=clus.threads, tail=tail_choices)
            # The plan's own memory (tilec.cost.memory.plan_memory, what the runtime allocates) must fit, not
            # only the model's sum: where it does not, ask again for a plan that leaves that much more room.
            over = [peak - d.memory_bytes for peak, d in zip(plan_peaks(plan, clus), clus.devices)]
            if max(over) <= 0:
                break
            # (on every device: the plan's own part of it can move to whichever device has room)
            limits = [m - max(over) - (1 << 20) for m in limits]
        else:
            worst = max(range(len(over)), key=over.__getitem__)
            raise InfeasibleError(f"no plan fits the devices' memory: the best plan found needs "
                                  f"{over[worst] / 1e6:,.0f} MB more than device {names[worst]!r} has, with its "
                                  f"message buffers (raise the devices' memory, lower --batch, or add devices)")
        prefix = tail_choices[0].first
        prediction = solution.prediction
    else:
        if clus is not None:
            from tilec.cost.model import CostModel
            with debug.stage("cost"):
                model = CostModel(program, clus, batch, itemsize, prefix=prefix)
        grid = parse_grid(grid) if isinstance(grid, str) else (grid or default_grid(len(names)))
        with debug.stage("analysis groups") as st:
            if groups is None or groups == "auto":
                spans = auto_groups(program, grid, prefix=prefix)
            else:
                spans = parse_groups(groups, prefix)
            choices = even_choices(program, spans, grid, len(names))
            st.detail = f"groups {spans} on an even {grid[0]}x{grid[1]} grid"
        tail_choices = one_device_tail(program, prefix)
        prediction = predict_choices(model, choices, tail_choices) if model is not None else None
    predicted = prediction.to_json(names) if prediction is not None else None
    with debug.stage("plan") as st:
        plan = build_plan(program, choices, model=graph.name, batch=batch, dtype=dtype, devices=names,
                          optimizer=opt, prefix=prefix, predicted=predicted,
                          threads=clus.threads if clus is not None else None,
                          cluster=clus.to_json() if clus is not None else None, tail=tail_choices)
        st.detail = (f"{len(plan['groups'])} groups, {len(plan['messages'])} messages, "
                     f"{sum(map(len, plan['schedule']))} ops on {len(names)} rank(s), hash {plan['hash'][:12]}")
    debug.dump(2, lambda: "regions (per group, per tile):\n" + regions_text(plan))
    debug.dump(2, lambda: "schedule (per rank, one step):\n" + schedule_text(plan))
    return plan, solution, model


def idle_note(plan):
    """A line naming the devices ``plan`` leaves without work, and why (None if it uses them all)."""
    busy = {t["device"] for g in plan["groups"] for t in g["tiles"]}
    idle = [d["name"] for d in plan["devices"] if d["rank"] not in busy]
    if not idle:
        return None
    used = len(plan["devices"]) - len(idle)
    why = "the optimiser found the step faster" if plan.get("predicted") else "the plan puts work"
    return (f"note: {', '.join(idle)} idle: {why} on {used} device(s) (the report of `tilec compile ... -o DIR` "
            f"gives the predicted times)")


def predict_choices(model, choices, tail):
    """The cost model's prediction for GroupChoices and TailChoices made without it (an even grid, given groups)."""
    tiled = [(model.group(c.first, c.last, c.row_splits, c.col_splits, c.devices), c.recompute) for c in choices]
    return model.evaluate(tiled + [(arc, False) for arc in model.tail_arcs(tail)])


def prediction_report(plan, solution=None):
    """Text: per group and device the predicted seconds and memory, and the solver's statistics."""
    pred = plan.get("predicted")
    if not pred:
        return "  (no prediction: give --cluster, or let the optimiser choose)"
    lines = [f"  predicted step: {pred['step_s']:.3f} s  (tail: {pred['tail_s']:.3f} s)"]
    tiled = [g for g in plan["groups"] if g["kind"] == "tiled"]
    for g, secs in zip(tiled, pred["group_s"]):
        first, last = g["layers"]
        grid = f"{len(g['row_splits']) - 1}x{len(g['col_splits']) - 1}"
        lines.append(f"    group {first}-{last}: {grid} on {[t['device'] for t in g['tiles']]}"
                     f"{'  recompute' if g.get('recompute') else ''}: {secs:.3f} s")
    for t in pred.get("tail", []):
        first, last = t["layers"]
        how = f"on {t['devices']}" if t["mode"] == "one" else f"split by channels over {t['devices']}"
        lines.append(f"    tail {first}-{last}: {how}: {t['seconds']:.3f} s")
    lines.append(f"  {'device':<10}{'compute s':>11}{'memory MB':>11}{'state':>9}{'kept':>9}{'workspace':>11}")
    for d in pred["per_device"]:
        lines.append(f"  {d['name']:<10}{d['compute_s']:>11.3f}{d['memory_bytes'] / 1e6:>11.1f}"
                     f"{d['state'] / 1e6:>9.1f}{d['kept'] / 1e6:>9.1f}{d['workspace'] / 1e6:>11.1f}")
    if solution is not None:
        st = solution.stats()
        lines.append(f"  solver: {st['solver']}  status {st['status']}  objective {st['objective_s']:.4f} s  "
                     f"bound {st['bound_s']:.4f} s  gap {100 * st['gap']:.2f}%  {st['booleans']} booleans  "
                     f"{st['wall_s']:.2f} s")
        if "fastest_s" in st:
            lines.append(f"  (the fastest plan: {st['fastest_s']:.4f} s, {st['fastest_bytes'] / 1e6:.1f} MB on its fullest "
                         f"device; this one holds less for at most --time-slack more time; --time-slack 0 takes "
                         f"the fastest)")
    return "\n".join(lines)
