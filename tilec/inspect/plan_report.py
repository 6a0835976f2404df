"""What a plan costs each device: activation memory, halo work, bytes sent.

Pure functions of the plan dict (the same numbers for any backend).
Activation memory counts every array a device keeps from forward for
backward: each layer's output region (and the group input region), the
normalised values of batch-norm layers, and max-pool argmax indices (int16).
"""
import numpy as np

from tilec.analysis.tiles import area, group_flops
from tilec.ir.stats import forward_flops_per_position


def _layer_bytes(layer, positions, batch, itemsize):
    c = layer["out_shape"][0]
    values = batch * c * positions
    if layer["kind"] == "conv":
        return values * itemsize * (2 if layer["bn"] else 1)
    if layer["kind"] == "maxpool":
        return values * (itemsize + 2)
    return values * itemsize


def activation_bytes(plan):
    """Peak bytes of activations each device holds for backward, by rank.

    A group that recomputes keeps only its input region; its activations
    exist again only while its own backward runs, so the peak adds the
    largest such group once.
    """
    program, batch = plan["program"], plan["batch"]
    itemsize = np.dtype(plan["dtype"]).itemsize
    out = [0] * len(plan["devices"])
    workspace = [0] * len(plan["devices"])
    for g, group in enumerate(plan["groups"]):
        first, last = group["layers"]
        for tile in group["tiles"]:
            d = tile["device"]
            if group["kind"] == "tail":
                read = {m["tensor"] for m in plan["messages"] if m["phase"] == "forward" and m["receiver"] == d
                        and m["group"] == g}
                for t in read:
                    c, h, w = program[t]["out_shape"] if t >= 0 else program[0]["in_shape"]
                    out[d] += batch * c * h * w * itemsize
                for layer in program[first:last + 1]:
                    _, h, w = layer["out_shape"]
                    out[d] += _layer_bytes(layer, h * w, batch, itemsize)
                continue
            out[d] += batch * program[first]["in_shape"][0] * area(tile["input"]) * itemsize
            acts = sum(_layer_bytes(program[tl["layer"]], area(tl["region"]), batch, itemsize) for tl in tile["layers"])
            if group.get("recompute"):
                workspace[d] = max(workspace[d], acts)
            else:
                out[d] += acts
    return [a + w for a, w in zip(out, workspace)]


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
    """Text: groups, and per device activation memory (vs ``baseline`` bytes,
    the one-device figure), halo overhead and bytes sent per step."""
    from tilec.cost.traffic import bytes_sent
    mem = activation_bytes(plan)
    msgs, coll = bytes_sent(plan)
    lines = [f"plan {plan['hash'][:12]}  model {plan['model']}  batch {plan['batch']}  {plan['dtype']}  "
             f"{len(plan['devices'])} device(s)"]
    for g, group in enumerate(plan["groups"]):
        first, last = group["layers"]
        if group["kind"] == "tiled":
            grid = f"{len(group['row_splits']) - 1}x{len(group['col_splits']) - 1}"
            lines.append(f"  group {g}: layers {first}-{last}  grid {grid}  rows {group['row_splits']}  "
                         f"cols {group['col_splits']}  devices {[t['device'] for t in group['tiles']]}")
        else:
            lines.append(f"  group {g}: layers {first}-{last}  tail on device 0")
    lines.append(f"  halo overhead (redundant forward FLOPs): {100 * halo_overhead(plan):.1f}%")
    lines.append(f"  {'device':<10}{'activations MB':>16}{'vs 1 device':>13}{'sent MB/step':>14}{'(tiles':>9}{' + all-reduce)':>15}")
    for d, dev in enumerate(plan["devices"]):
        ratio = f"{mem[d] / baseline:.2f}x" if baseline else "-"
        lines.append(f"  {dev['name']:<10}{mem[d] / 1e6:>16.2f}{ratio:>13}{(msgs[d] + coll[d]) / 1e6:>14.2f}"
                     f"{msgs[d] / 1e6:>9.2f}{coll[d] / 1e6:>15.2f}")
    return "\n".join(lines)


def _rect(rows, cols):
    return f"rows {rows[0]}-{rows[1]} cols {cols[0]}-{cols[1]}"


def regions_text(plan):
    """Text: per tiled group and tile, the region each layer computes (halo
    included), the cells it owns and its padding at the map's border
    (top, bottom, left, right); the tail's rank."""
    lines = []
    for g, group in enumerate(plan["groups"]):
        first, last = group["layers"]
        if group["kind"] != "tiled":
            lines.append(f"group {g}: layers {first}-{last}, {group['kind']} on rank {group['tiles'][0]['device']}")
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
            lines.append(f"  {i:>4} {op['op']} {args}".rstrip())
    return "\n".join(lines)
