"""The composition of the planner's stages: model -> program -> plan.

(Until the optimiser lands, groups and splits come from flags or from a
simple rule: grow a group while its redundant halo work stays small.)
"""
from tilec.analysis.regions import even_splits
from tilec.analysis.tiles import group_flops, group_tiles, spatial_prefix, tile_flops
from tilec.errors import PlanError
from tilec.plan.build import build_plan, default_grid, even_choices, parse_grid, parse_groups

DEFAULT_HALO_LIMIT = 0.15


def auto_groups(program, grid, limit=DEFAULT_HALO_LIMIT):
    """Greedy groups over the spatial prefix: extend a group by the next layer
    while the redundant (halo) FLOPs of an even ``grid`` split stay within
    ``limit`` of the group's own FLOPs."""
    prefix = spatial_prefix(program)
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


def compile_plan(graph, *, devices, batch=None, dtype="float32", grid=None, groups=None, optimizer=None):
    """A sealed plan for ``graph`` on ``devices`` (a count or a list of names)."""
    names = [f"dev{r}" for r in range(devices)] if isinstance(devices, int) else list(devices)
    if not names:
        raise PlanError("at least one device is needed")
    program = graph.to_program()
    net = graph.net
    grid = parse_grid(grid) if isinstance(grid, str) else (grid or default_grid(len(names)))
    if groups is None or groups == "auto":
        spans = auto_groups(program, grid)
    else:
        spans = parse_groups(groups, spatial_prefix(program))
    choices = even_choices(program, spans, grid, len(names))
    opt = optimizer or {"lr": net["learning_rate"], "momentum": net["momentum"], "decay": net["decay"]}
    return build_plan(program, choices, model=graph.name, batch=batch or net["batch"], dtype=dtype,
                      devices=names, optimizer=opt)
