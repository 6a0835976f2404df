"""Build a plan: groups, tiles, devices, and every message between them.

Input: a program (``Graph.to_program()``), the layer groups over its spatial
prefix, and for each group the split lines and the device of each tile. The
layers after the prefix form the *tail* groups (``tilec.plan.tail``: each on
one device or split by channels; by default all on rank 0), the loss among
them. Output: the plan dict of
``tilec_runtime.planfile`` (sealed with its hash).

Messages are explicit so that any backend can put them on a wire unchanged
and so that the bytes each device sends per step are known:

- forward, at a group's input: every owner of part of the input map sends
  each tile the intersection of what it owns with what the tile reads;
- forward, into the tail: owners send their owned cells of each prefix
  layer the tail reads;
- backward: the same regions in the other direction, carrying partial
  gradients that the receiver adds (overlap-add).
"""
from dataclasses import dataclass

import numpy as np

from tilec.analysis.regions import area_of, even_splits, intersect, length
from tilec.analysis.tail import flows, one_device_tail, relayed
from tilec.analysis.tiles import group_tiles, spatial_prefix
from tilec.errors import PlanError
from tilec.plan.schedule import build_schedule, make_buckets
from tilec.plan.tail import check_choices, holders, tail_group
from tilec_runtime import shards
from tilec_runtime.collectives import RING_MIN_BYTES
from tilec_runtime.planfile import FORMAT, VERSION, seal
from tilec_runtime.program import tensor_shape


@dataclass
class GroupChoice:
    """A group over program[first..last] with its split lines and devices.

    ``devices[t]`` is the device of tile t, tiles in row-major grid order.
    ``recompute``: keep only the group's input in forward and recompute its
    activations in backward (less memory, more compute).
    """
    first: int
    last: int
    row_splits: list
    col_splits: list
    devices: list
    recompute: bool = False


def releasing(plan, min_bytes=None):
    """Ranks that give their tiles' scratch back while their tail groups run
    (``scratch_release``, ``tail_free``): where the scratch and the tail's
    activations and temporaries are each at least ``min_bytes`` (default:
    ``tilec_runtime.footprint.releases``)."""
    from tilec_runtime.footprint import releases, tail_bytes, tile_bytes
    out = set()
    for r in range(len(plan["devices"])):
        phase = tail_bytes(plan, r)[2]  # (freed as it goes: ``tail_free`` comes with the release)
        # (the tiles are lowered only where the tail alone passes)
        if releases(phase, phase, min_bytes) and releases(tile_bytes(plan, r)[1], phase, min_bytes):
            out.add(r)
    return out


def parse_groups(spec, prefix):
    """Group boundaries over a spatial prefix of ``prefix`` layers.

    ``spec``: ``"all"`` (one group), ``"each"`` (one per layer), or ranges
    such as ``"0-3,4-7,8"`` that must cover 0..prefix-1 in order.
    """
    if prefix == 0:
        return []
    if spec == "all":
        return [(0, prefix - 1)]
    if spec == "each":
        return [(i, i) for i in range(prefix)]
    groups, expect = [], 0
    for part in spec.split(","):
        try:
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise PlanError(f"--groups: cannot read {part!r} (expected 'all', 'each' or ranges like 0-3,4-7)") from None
        if first != expect or last < first:
            raise PlanError(f"--groups: range {part.strip()!r} must start at layer {expect}")
        groups.append((first, last))
        expect = last + 1
    if expect != prefix:
        raise PlanError(f"--groups: ranges end at layer {expect - 1}, the spatial prefix is layers 0..{prefix - 1}")
    return groups


def parse_grid(spec):
    try:
        r, c = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise PlanError(f"--grid: cannot read {spec!r} (expected RxC, e.g. 2x3)") from None
    if r < 1 or c < 1:
        raise PlanError(f"--grid: {spec!r} must be at least 1x1")
    return r, c


def default_grid(n_devices):
    """The most square R x C = n grid, more rows than columns."""
    c = max(d for d in range(1, int(n_devices ** 0.5) + 1) if n_devices % d == 0)
    return n_devices // c, c


def even_choices(program, groups, grid, n_devices):
    """GroupChoice per group: the grid (shrunk where a map is too small), even splits."""
    rows, cols = grid
    if rows * cols > n_devices:
        raise PlanError(f"grid {rows}x{cols} has {rows * cols} tiles for {n_devices} devices")
    choices = []
    for first, last in groups:
        _, h, w = program[last]["out_shape"]
        r, c = min(rows, h), min(cols, w)
        choices.append(GroupChoice(first, last, even_splits(h, r), even_splits(w, c), list(range(r * c))))
    return choices


def _rng(r):
    return [int(r[0]), int(r[1])]


def _message(group, tensor, sender, receiver, rows, cols, channels, batch, itemsize, chans=None):
    """A forward message; ``chans``: a channel range (inclusive), else every channel."""
    m = {"phase": "forward", "group": group, "tensor": tensor, "sender": sender, "receiver": receiver,
         "rows": _rng(rows), "cols": _rng(cols)}
    if chans is not None:
        m["channels"] = _rng(chans)
        channels = chans[1] - chans[0] + 1
    m["bytes"] = 0 if sender == receiver else batch * channels * area_of(rows, cols) * itemsize
    return m


def _relay_messages(g, tensor, source, receivers, shape, batch, itemsize):
    """The forward messages of a map held whole by one device to every
    member of channel group ``g`` (``tilec.analysis.tail.relayed``): member
    j's slice of channels from the holder, then from member j to each other
    member (``relay``: sent from what it received)."""
    holder, (rows, cols, _) = source
    bounds = shards.part_bounds(shape[0], len(receivers))
    out = []
    for j, r in enumerate(receivers):
        if bounds[j + 1] == bounds[j]:
            continue
        chans = (bounds[j], bounds[j + 1] - 1)
        out.append(_message(g, tensor, holder, r, rows, cols, shape[0], batch, itemsize, chans))
        out += [dict(_message(g, tensor, r, other, rows, cols, shape[0], batch, itemsize, chans), relay=True)
                for other in receivers if other != r]
    return out


def build_plan(program, choices, *, model, batch, dtype, devices, optimizer, prefix=None, predicted=None,
               threads=None, cluster=None, ring_min_bytes=RING_MIN_BYTES, interior=True, tail=None,
               release_min_bytes=None):
    """The sealed plan dict. ``devices``: list of device names (rank order).

    ``prefix``: tile only the first ``prefix`` layers of the spatial prefix
    (the rest joins the tail); ``predicted``: the cost model's prediction,
    stored as the plan's ``predicted`` field; ``threads``: each device's
    thread count (default 1 each); ``cluster``: the devices' profiles and
    links as JSON (``tilec.cluster.Cluster.to_json``), so that the plan can
    be simulated for the devices it was made for; ``ring_min_bytes``: the
    smallest gradient summed with a ring (smaller ones are all-gathered);
    ``interior``: let a tile compute its interior while its halo arrives;
    ``tail``: the groups after the prefix (:class:`tilec.plan.tail.TailChoice`;
    default: all of it on rank 0); ``release_min_bytes``: a device gives its
    tiles' scratch back while its tail groups run where that saves this
    much (default ``tilec_runtime.footprint.RELEASE_MIN_BYTES``).
    """
    prefix = spatial_prefix(program) if prefix is None else min(prefix, spatial_prefix(program))
    itemsize = np.dtype(dtype).itemsize
    expect = 0
    for ch in choices:
        if ch.first != expect or ch.last < ch.first or ch.last >= prefix:
            raise PlanError(f"group {ch.first}-{ch.last} must start at layer {expect} and lie in the spatial prefix 0..{prefix - 1}")
        expect = ch.last + 1
        ntiles = (len(ch.row_splits) - 1) * (len(ch.col_splits) - 1)
        if len(ch.devices) != ntiles or len(set(ch.devices)) != ntiles:
            raise PlanError(f"group {ch.first}-{ch.last}: {ntiles} tiles need {ntiles} distinct devices, got {ch.devices}")
        if any(not 0 <= d < len(devices) for d in ch.devices):
            raise PlanError(f"group {ch.first}-{ch.last}: device out of range in {ch.devices}")
    if expect != prefix:
        raise PlanError(f"groups end at layer {expect - 1}, the spatial prefix is layers 0..{prefix - 1}")

    groups, messages, owners = [], [], {}  # owners[layer] = [(device, owned region)]
    for ch in choices:
        try:
            tiles = group_tiles(program, ch.first, ch.last, ch.row_splits, ch.col_splits)
        except ValueError as exc:
            raise PlanError(f"group {ch.first}-{ch.last}: {exc}") from None
        in_tensor = ch.first - 1
        channels = program[ch.first]["in_shape"][0]
        tile_dicts = []
        for tile, dev in zip(tiles, ch.devices):
            tile_dicts.append({
                "device": dev, "rows": _rng(tile.rows), "cols": _rng(tile.cols),
                "input": [_rng(tile.input[0]), _rng(tile.input[1])],
                "layers": [{"layer": tl.layer, "region": [_rng(r) for r in tl.region],
                            "owned": [_rng(r) for r in tl.owned], "src": [_rng(r) for r in tl.src],
                            "pads": list(tl.pads)} for tl in tile.layers]})
            # the group input: the image from rank 0, or the previous group's owners
            sources = owners[in_tensor] if in_tensor >= 0 else [(0, tile.input)]
            for src_dev, src_region in sources:
                rows = intersect(src_region[0], tile.input[0])
                cols = intersect(src_region[1], tile.input[1])
                if rows and cols:
                    messages.append(_message(len(groups), in_tensor, src_dev, dev, rows, cols, channels, batch, itemsize))
        for tl_index, layer in enumerate(program[ch.first:ch.last + 1]):
            owners[layer["index"]] = [(dev, tile.layers[tl_index].owned) for tile, dev in zip(tiles, ch.devices)]
        groups.append({"kind": "tiled", "layers": [ch.first, ch.last], "row_splits": list(ch.row_splits),
                       "col_splits": list(ch.col_splits), "recompute": bool(ch.recompute), "tiles": tile_dicts})

    tail = tail if tail is not None else one_device_tail(program, prefix)
    check_choices(program, prefix, tail, len(devices))
    extra_backward = []
    for ch in tail:
        g, group = len(groups), tail_group(program, ch)
        for tensor in sorted({j for layer in program[ch.first:ch.last + 1] for j in layer["inputs"] if j < ch.first}):
            shape = tensor_shape(program, tensor)
            whole = (0, shape[1] - 1), (0, shape[2] - 1)
            producer = next((p for p in groups if p["layers"][0] <= tensor <= p["layers"][1]), None)
            replicated = False
            if tensor < 0:
                sources = [(0, (*whole, None))]
            elif producer["kind"] == "tiled":
                sources = [(d, (r, c, None)) for d, (r, c) in owners[tensor] if length(r) > 0 and length(c) > 0]
            else:
                held, replicated = holders(program, producer, tensor)
                sources = [(d, (*whole, chans)) for d, chans in held]
            if replicated and ch.mode == "channels" and sorted(ch.devices) == [d for d, _ in sources] and (
                    tensor == ch.first - 1):
                # whole on every member already: each takes its own copy, and the members all-reduce
                # the input's gradient (each needs all of it), instead of sending it to one another
                forward, extra = [(d, d, part) for d, part in sources], []
                group["reduce_input"] = True
            elif relayed(sources, replicated, sorted(ch.devices)):
                messages += _relay_messages(g, tensor, sources[0], sorted(ch.devices), shape, batch, itemsize)
                forward, extra = [], []
            else:
                forward, extra = flows(sources, replicated, sorted(ch.devices))
            messages += [_message(g, tensor, s, r, *part[:2], shape[0], batch, itemsize, part[2])
                         for s, r, part in forward]
            extra_backward += [dict(_message(g, tensor, s, r, *part[:2], shape[0], batch, itemsize, part[2]),
                                    phase="backward") for s, r, part in extra]
        groups.append(group)

    # backward: partial gradients travel the forward messages in reverse
    messages += [dict(m, phase="backward", sender=m["receiver"], receiver=m["sender"])
                 for m in messages if m["tensor"] >= 0] + extra_backward
    threads = list(threads) if threads is not None else [1] * len(devices)
    if len(threads) != len(devices) or any(not isinstance(t, int) or t < 1 for t in threads):
        raise PlanError(f"threads {threads} must be a positive count for each of the {len(devices)} devices")
    buckets = make_buckets(program, groups, itemsize, ring_min_bytes)
    plan = {
        "format": FORMAT, "version": VERSION, "model": model, "batch": batch, "dtype": str(np.dtype(dtype)),
        "optimizer": dict(optimizer),
        "devices": [{"rank": r, "name": name, "threads": t} for r, (name, t) in enumerate(zip(devices, threads))],
        "program": program, "groups": groups, "messages": messages, "buckets": buckets,
        "ring_min_bytes": int(ring_min_bytes),
    }
    plan["schedule"] = build_schedule(program, groups, messages, len(devices), buckets, interior, batch, itemsize,
                                      release=releasing(plan, release_min_bytes))
    if cluster is not None:
        plan["cluster"] = cluster
    if predicted is not None:
        plan["predicted"] = predicted
    return seal(plan)
