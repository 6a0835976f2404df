"""What a plan costs each device: memory, halo work, bytes sent.

Pure functions of the plan dict (the same numbers for any backend). Memory
is what the runtime allocates (``device_bytes``).
"""
from tilec.analysis.tiles import area, group_flops
from tilec.ir.stats import forward_flops_per_position
from tilec_runtime.program import members_of


def device_bytes(plan):
    """Bytes each device allocates for a step, by rank: its parameters and
    accumulators, tile arenas and scratch, message buffers and tail groups
    (``tilec.cost.memory.plan_memory``, the runtime's own memory plan), the
    process itself not included."""
    from tilec.cost.memory import plan_memory
    return [sum(v for k, v in plan_memory(plan, r).items() if k != "overhead") for r in range(len(plan["devices"]))]


def halo_overhead(plan):
    """Redundant forward FLOPs of the tiled groups, as a fraction of their own."""
    program = plan["program"]
    done = needed = 0
    for group in plan["groups"]:
        if group["kind"] != "tiled":
            continue
        needed += group_flops(program, *group["layers"])
        for tile in group["tiles"]:
            for tl in tile["layers"]:
                done += forward_flops_per_position(program[tl["layer"]]) * area(tl["region"])
    return done / needed - 1 if needed else 0.0


def plan_summary(plan, baseline=None):
    """Text: groups, and per device memory (vs ``baseline`` bytes,
    the one-device figure), halo overhead and bytes sent per step."""
    from tilec.cost.traffic import bytes_sent
    mem = device_bytes(plan)
    msgs, coll = bytes_sent(plan)
    lines = [f"plan {plan['hash'][:12]}  model {plan['model']}  batch {plan['batch']}  {plan['dtype']}  "
             f"{len(plan['devices'])} device(s)"]
    for g, group in enumerate(plan["groups"]):
        first, last = group["layers"]
        if group["kind"] == "tiled":
            grid = f"{len(group['row_splits']) - 1}x{len(group['col_splits']) - 1}"
            lines.append(f"  group {g}: layers {first}-{last}  grid {grid}  rows {group['row_splits']}  "
                         f"cols {group['col_splits']}  devices {[t['device'] for t in group['tiles']]}"
                         f"{'  recomputed' if group.get('recompute') else ''}")
        elif group["mode"] == "channels":
            lines.append(f"  group {g}: layers {first}-{last}  split by channels over devices "
                         f"{members_of(group)}")
        else:
            lines.append(f"  group {g}: layers {first}-{last}  on device {group['tiles'][0]['device']}")
    lines.append(f"  halo overhead (redundant forward FLOPs): {100 * halo_overhead(plan):.1f}%")
    lines.append(f"  {'device':<10}{'memory MB':>16}{'vs 1 device':>13}{'sent MB/step':>14}{'(tiles':>9}{' + all-reduce)':>15}")
    for d, dev in enumerate(plan["devices"]):
        ratio = f"{mem[d] / baseline:.2f}x" if baseline else "-"
        lines.append(f"  {dev['name']:<10}{mem[d] / 1e6:>16.2f}{ratio:>13}{(msgs[d] + coll[d]) / 1e6:>14.2f}"
                     f"{msgs[d] / 1e6:>9.2f}{coll[d] / 1e6:>15.2f}")
    streamed = streamed_layers(plan)
    if streamed:
        lines.append(f"  streamed convs (their output a band of rows at a time): layers "
                     f"{', '.join(map(str, streamed))}")
    released = [dev["name"] for dev, ops in zip(plan["devices"], plan["schedule"])
                if any(op["op"] == "scratch_release" for op in ops)]
    if released:
        lines.append(f"  scratch given back while the tail runs (its peak: the larger of the two): "
                     f"{', '.join(released)}")
    return "\n".join(lines)


def streamed_layers(plan):
    """Conv layers some tile computes a band of rows at a time
    (``tilec_runtime.lower.streams``), from every rank's lowered tiles."""
    from tilec_runtime.lower import lower_rank
    return sorted({op["layer"] for r in range(len(plan["devices"])) for spec in lower_rank(plan, r).values()
                   for op in spec["ops"] if op.get("stream")})


def _rect(rows, cols):
    return f"rows {rows[0]}-{rows[1]} cols {cols[0]}-{cols[1]}"


def regions_text(plan):
    """Text: per tiled group and tile, the region each layer computes (halo
    included), the cells it owns and its padding at the map's border
    (top, bottom, left, right); each tail group's ranks."""
    lines = []
    for g, group in enumerate(plan["groups"]):
        first, last = group["layers"]
        if group["kind"] != "tiled":
            members = members_of(group)  # a channel-split tail group runs on all of them
            ranks = f"rank {members[0]}" if len(members) == 1 else f"ranks {', '.join(map(str, members))}"
            lines.append(f"group {g}: layers {first}-{last}, {group['kind']} on {ranks}")
            continue
        grid = f"{len(group['row_splits']) - 1}x{len(group['col_splits']) - 1}"
        lines.append(f"group {g}: layers {first}-{last}, grid {grid}{', recompute' if group.get('recompute') else ''}")
        for t, tile in enumerate(group["tiles"]):
            lines.append(f"  tile {t} on rank {tile['device']}: output {_rect(tile['rows'], tile['cols'])}, "
                         f"input {_rect(*tile['input'])}")
            lines += [f"    layer {tl['layer']}: region {_rect(*tl['region'])}, owned {_rect(*tl['owned'])}, "
                      f"pads {tuple(tl['pads'])}" for tl in tile["layers"]]
    return "\n".join(lines)


def schedule_text(plan):
    """Text: every rank's ops of one step in order (the plan's schedule), a
    message spelled out (tensor, rectangle, peer, phase)."""
    lines = []
    for r, ops in enumerate(plan["schedule"]):
        lines.append(f"rank {r} ({plan['devices'][r]['name']}): {len(ops)} ops")
        for i, op in enumerate(ops):
            args = " ".join(f"{k} {v}" for k, v in op.items() if k != "op")
            if op["op"] in ("send", "recv"):
                m = plan["messages"][op["msg"]]
                peer = f"to rank {m['receiver']}" if op["op"] == "send" else f"from rank {m['sender']}"
                args += f": tensor {m['tensor']} {_rect(m['rows'], m['cols'])} {peer} ({m['phase']})"
            elif op["op"] == "input":
                m = plan["messages"][op["msg"]]
                args += f": the image {_rect(m['rows'], m['cols'])}, from the data source"
            lines.append(f"  {i:>4} {op['op']} {args}".rstrip())
    return "\n".join(lines)
