"""Lowering: a rank's tiles of a plan -> kernel specs, with a static memory plan.

A kernel spec is plain data that ``tilec_runtime.fused.TileStep`` runs with
the generated kernels: for each *unit* of the tile (a conv with its batch
norm or bias and activation, fused with the max-pool that follows it when
nothing else reads the conv's output, or a max-pool alone) the shapes,
stride, padding at real map borders only (as the plan gives it), the owned
cells whose batch-norm statistics the tile contributes, and the offset of
every buffer in one arena.

The units are the granularity of a plan's schedule too (the planner's
``tilec.plan.schedule`` names them by position), so both sides call
:func:`units` and agree by construction. Lowering is deterministic from the
plan, so each device lowers its own tiles and the planner lowers every
rank's to predict memory: one memory plan, computed in one place.
"""
from tilec_runtime import memplan
from tilec_runtime.errors import ProgramError
from tilec_runtime.kernel_set import band_rows, filter_split
from tilec_runtime.program import pads_of


def units(program, first, last, outside):
    """[(conv layer or None, max-pool layer or None)] of ``program[first..last]``.

    ``outside``: layers whose output is read outside the group or by a
    message (a conv producing one keeps its output and is not fused)."""
    out, i = [], first
    while i <= last:
        kind = program[i]["kind"]
        if kind == "conv":
            fuse = i + 1 <= last and program[i + 1]["kind"] == "maxpool" and i not in outside
            out.append((i, i + 1) if fuse else (i, None))
            i += 2 if fuse else 1
        elif kind == "maxpool":
            out.append((None, i))
            i += 1
        else:
            raise ProgramError(f"layer {i} ({kind}): no kernel for it in a tiled group")
    return out


def outside_tensors(plan):
    """Layers whose output a forward message carries (read by another group or device)."""
    return {m["tensor"] for m in plan["messages"] if m["phase"] == "forward"}


def produced_by(unit):
    """The layer whose output a unit hands on."""
    conv, pool = unit
    return pool if pool is not None else conv


def _len(r):
    return r[1] - r[0] + 1


def _window(src, base):
    """[row offset, col offset, rows, cols] of range pair ``src`` inside a buffer covering ``base``."""
    return [src[0][0] - base[0][0], src[1][0] - base[1][0], _len(src[0]), _len(src[1])]


def _conv_op(layer, tl, base, batch):
    _, h, w = layer["out_shape"]
    region, owned = tl["region"], tl["owned"]
    c, k = layer["in_shape"][0], layer["size"]
    ho, wo = _len(region[0]), _len(region[1])
    return {
        "kind": "conv", "layer": layer["index"], "src": _window(tl["src"], base), "channels": c,
        "filters": layer["filters"], "size": k, "stride": layer["stride"], "pads": list(tl["pads"]),
        "out": [ho, wo], "pre": "bn" if layer["bn"] else "bias", "act": layer["act"],
        # owned cells relative to the region, half-open
        "owned": [owned[0][0] - region[0][0], owned[0][1] - region[0][0] + 1,
                  owned[1][0] - region[1][0], owned[1][1] - region[1][0] + 1],
        "count": batch * h * w, "band": band_rows(c, k, ho, wo, batch), "pool": None,
    }


def _pool_op(layer, tl, base):
    return {"kind": "maxpool", "layer": layer["index"], "src": _window(tl["src"], base),
            "channels": layer["in_shape"][0], "size": layer["size"], "stride": layer["stride"],
            "pads": list(tl["pads"]), "out": [_len(tl["region"][0]), _len(tl["region"][1])]}


def lower_tile(program, group, tile, batch, outside, threads=1, regen=True, hold=False):
    """The kernel spec of one tile on a device running ``threads`` threads
    (``regen`` False: no conv makes its gradient again, see ``regenerates``;
    for timing the kernels as every other layer runs them; ``hold``: the
    outputs read outside the group stay to the end of the step, as in a
    group that recomputes: a channel group's layers after it read them in
    their backward)."""
    first, last = group["layers"]
    by_layer = {tl["layer"]: tl for tl in tile["layers"]}
    base = tile["input"]
    ops = []
    for conv, pool in units(program, first, last, outside):
        if conv is not None:
            tl = by_layer[conv]
            op = _conv_op(program[conv], tl, base, batch)
            base = tl["region"]
            if pool is not None:
                op["pool"] = _pool_op(program[pool], by_layer[pool], base)
                base = by_layer[pool]["region"]
        else:
            tl = by_layer[pool]
            op = _pool_op(program[pool], tl, base)
            base = tl["region"]
        ops.append(op)
    c_in = program[first]["in_shape"][0]
    spec = {"layers": [first, last], "batch": batch, "threads": threads,
            "input": [c_in, _len(tile["input"][0]), _len(tile["input"][1])],
            "input_grad": first > 0,  # the network input needs no gradient
            # outputs read outside the group: kept to the end of the step
            # (a message to the device itself is copied when received)
            "kept": sorted(produced_by(u) for u in units(program, first, last, outside) if produced_by(u) in outside),
            "ops": ops}
    if hold:
        spec["hold"] = True
    _plan_memory(spec, bool(group.get("recompute")), regen=regen)
    return spec


def whole_map_tile(program, first, last):
    """A tile of program[first..last] that covers every map whole, padded
    at every border: what a member of a channel-split group computes of its
    share (``program`` holding the layers as the member computes them,
    ``tilec_runtime.shards.share``), lowered as any tile is."""
    layers = []
    for layer in program[first:last + 1]:
        (_, hi, wi), (_, h, w) = layer["in_shape"], layer["out_shape"]
        whole = [[0, h - 1], [0, w - 1]]
        layers.append({"layer": layer["index"], "region": whole, "owned": whole,
                       "src": [[0, hi - 1], [0, wi - 1]], "pads": list(pads_of(layer))})
    _, h, w = program[first]["in_shape"]
    return {"input": [[0, h - 1], [0, w - 1]], "layers": layers}


def tile_memory(program, first, last, outside, sizes, in_size, batch, threads):
    """The memory plans of a tile from its layers' output sizes alone:
    ``sizes[layer]`` = (rows, cols), ``in_size`` the input region's; the
    memory plan ``lower_tile`` makes, without the tile's geometry (for the
    planner's candidates), for the group kept and recomputed. Returns
    {recompute: the spec's sizes {"arena", "arg_arena", "scratch",
    "scratch_args", "workspace", "input"}} for recompute False and True."""
    ops = []
    for conv, pool in units(program, first, last, outside):
        if conv is not None:
            layer = program[conv]
            c, k = layer["in_shape"][0], layer["size"]
            ho, wo = sizes[conv]
            op = {"kind": "conv", "layer": conv, "channels": c, "filters": layer["filters"], "size": k,
                  "out": [ho, wo], "band": band_rows(c, k, ho, wo, batch), "pool": None}
            if pool is not None:
                op["pool"] = {"layer": pool, "out": list(sizes[pool]), "size": program[pool]["size"],
                              "stride": program[pool]["stride"], "pads": [0, 0, 0, 0]}
        else:
            op = {"kind": "maxpool", "layer": pool, "channels": program[pool]["in_shape"][0],
                  "out": list(sizes[pool])}
        ops.append(op)
    spec = {"batch": batch, "threads": threads, "input": [program[first]["in_shape"][0], *in_size],
            "input_grad": first > 0, "ops": ops,
            "kept": sorted(produced_by(u) for u in units(program, first, last, outside) if produced_by(u) in outside)}
    # a streamed conv's bands start where its pool's windows do: on the top tile each pool pads its
    # top (by its own padding), on the others none (as ``ops`` has it); both layouts priced, the larger kept
    tops = {j: program[op["pool"]["layer"]]["padding"] // 2 for j, op in enumerate(ops)
            if op["kind"] == "conv" and op["pool"]}
    layouts = [ops]
    if any(tops.values()):
        layouts.append([dict(op, pool=dict(op["pool"], pads=[tops[j], 0, 0, 0])) if j in tops else op
                        for j, op in enumerate(ops)])
    out = {}
    for recompute in (False, True):
        sizes_at = []
        for layout in layouts:
            plan = {**spec, "ops": [dict(op) for op in layout]}  # (its memory plan marks the ops)
            _plan_memory(plan, recompute, check=False)
            sizes_at.append(plan)
        out[recompute] = {k: max(plan[k] for plan in sizes_at)
                          for k in ("arena", "arg_arena", "scratch", "scratch_args", "workspace", "input")}
    return out


def out_channels(op):
    return op["filters"] if op["kind"] == "conv" else op["channels"]


def out_shape(op):
    """[C, h, w] of what an op hands to the next one (a fused pool's output)."""
    last = (op["pool"] or op) if op["kind"] == "conv" else op
    return [out_channels(op), *last["out"]]


def regenerates(op, j, input_grad, recompute=False):
    """Whether conv op ``j`` of a tile makes its output's gradient again
    band by band in its backward (``conv_backward``'s ``regen``) instead of
    storing it whole: a conv with a fused max-pool, on bands of rows, where
    its input needs no gradient (the network's first layer) or its group
    recomputes (a plan short of memory). That gradient is as large as the
    conv's output before the pool, among the largest buffers of the step
    (YOLOv2's layer 0 at 608 x 608: 32 channels, 47 MB an image); making
    each band again costs elementwise work beside its GEMMs (twice on
    several threads where there is an input gradient: its pass makes the
    bands again), which a group that keeps its activations does not pay."""
    return (op["kind"] == "conv" and bool(op["pool"]) and op["band"] <= op["out"][0]
            and (recompute or (j == 0 and not input_grad)))


# Elements of a streamed conv's output band (``stream_bands``): 4 MB of float32, a few GEMM bands
STREAM_ELEMENTS = 1 << 20


# A streamed conv (``streams``) computes its output three times more: where it reads few channels (of 3 x 3,
# up to 64: YOLOv2's layers 0, 2 and 6), the bytes it saves cost the fewest flops. (Up to 32, YOLOv2 at
# batch 8 on two 750 MB Pi 3s needed 760 MB; up to 64 it fits, its step 4% longer.)
STREAM_MAX_READS = 64 * 9
STREAM_PASSES = 3  # its output computed this many times more than where it is held: see ``streams``


def streams(op, j, input_grad, recompute):
    """Whether conv op ``j`` of a tile never holds its whole output: in a
    group that recomputes, a conv with a fused max-pool whose windows do not
    overlap, its gradient made again (``regenerates``) and at most
    ``STREAM_MAX_READS`` values read per output. Its output before the pool
    is the largest buffer of a plan short of memory (YOLOv2's layer 0 at
    batch 8 on two devices: 189 MB a tile, layer 2 95 MB, layer 6 47 MB); streamed, it is
    computed a band of rows at a time, three times more than once: its
    batch-norm statistics, then the normalised and pooled output; in
    backward its gradient sums, then its weight and input gradients, each
    from the band made again (``tilec_runtime.fused``)."""
    pool = op.get("pool")
    return (recompute and regenerates(op, j, input_grad, recompute) and pool["size"] <= pool["stride"]
            and op["channels"] * op["size"] ** 2 <= STREAM_MAX_READS
            and len(stream_bands(op, op.get("batch", 1))) > 1)


def stream_bands(op, batch):
    """[[z0, z1, p0, p1]]: the bands of a streamed conv op, its output rows
    [z0, z1) and its pool's output rows [p0, p1) read from them; together
    they cover both maps, each band at least the conv's GEMM band and about
    ``STREAM_ELEMENTS`` of output."""
    pool = op["pool"]
    ho, wo = op["out"]
    s, pho = pool["stride"], pool["out"][0]
    r0 = pool["src"][0] if "src" in pool else 0
    target = max(op["band"], -(-STREAM_ELEMENTS // max(1, batch * op["filters"] * wo)))
    per = max(1, -(-target // s))  # pool rows a band
    bands = []
    for p0 in range(0, pho, per):
        p1 = min(pho, p0 + per)
        z0 = 0 if p0 == 0 else r0 + p0 * s - pool["pads"][0]
        z1 = ho if p1 == pho else r0 + p1 * s - pool["pads"][0]
        if bands and bands[-1][1] - bands[-1][0] < op["band"]:
            # a band shorter than the GEMM band (the first, where the pool pads the top) runs on
            # whole images in the kernels, which cannot make its gradient again: joined to the next
            bands[-1][1], bands[-1][3] = z1, p1
        else:
            bands.append([z0, z1, p0, p1])
    if len(bands) > 1 and bands[-1][1] - bands[-1][0] < op["band"]:
        last = bands.pop()
        bands[-1][1], bands[-1][3] = last[1], last[3]
    return bands


def _splits_filters(op, threads):
    """Whether a conv op's threads split its filters (``kernel_set.filter_split``,
    at any batch, not with a regenerated gradient): a band per thread, no
    private weight gradients."""
    ho, wo = op["out"]
    return not op.get("regen") and filter_split(ho, wo, op["band"], op["filters"], threads)


def workspace(op, threads):
    """Elements of workspace a conv op needs on ``threads`` threads (the
    kernels' ``workspace_size``): an im2col band per thread, and backward a
    private weight gradient for every thread but the first; a band of
    several images also holds their GEMM output; an op that regenerates its
    gradient, that gradient's band per thread; where the threads split the
    filters (``_splits_filters``), a band per thread and no private weight
    gradients."""
    if op["kind"] != "conv":
        return 0
    ho, wo = op["out"]
    ckk, f, band = op["channels"] * op["size"] ** 2, op["filters"], op["band"]
    nt = max(1, min(threads, ho))
    if _splits_filters(op, threads):
        return ckk * min(band, ho) * wo * threads
    need = (ckk + (f if op.get("regen") else 0)) * min(band, ho) * wo * nt + (nt - 1) * f * ckk
    if band > ho:
        need = max(need, (ckk + f) * band * wo * threads + (threads - 1) * f * ckk)
    return need


def thread_band(op, threads):
    """Elements of one thread's band in a conv op's workspace (what the
    kernels call ``per``: its columns, a band of several images' GEMM
    output, a regenerated gradient's band)."""
    if op["kind"] != "conv":
        return 0
    ho, wo = op["out"]
    ckk, f, band = op["channels"] * op["size"] ** 2, op["filters"], op["band"]
    one = (ckk + (f if op.get("regen") else 0)) * min(band, ho) * wo
    if band > ho and not _splits_filters(op, threads):
        return max(one, (ckk + f) * band * wo)
    return one


# Elements between one thread's im2col band and the next's (1 MB of
# float32). Two vCPUs that share no cache lose at the edge between buffers
# their threads write, and the loss shrinks with the distance only slowly:
# tiny416's layer 2 at batch 4 on two threads split by images, forward +
# backward, 46.3 ms with the bands adjacent, 44.8 ms 16 KB apart, 40.6 ms
# 64 KB apart, 39.6 ms 1 MB apart; on cores that share a cache 39.5 ms
# adjacent, 38.8 ms 1 MB apart (and layer 0, 416 x 416: 16.7 against
# 15.2 ms, near).
THREAD_GAP = 1 << 18


def strided_workspace(ops, threads):
    """(thread stride, elements) of the workspace a tile's convs share on
    ``threads`` threads: each thread's band ``thread stride`` apart, the
    largest band of any of them and ``THREAD_GAP``, so that a thread finds
    its band in the same place in every conv (on its own core: bands the
    other thread last wrote cost a VM's vCPUs that share no cache 5 ms of a
    52 ms step), away from the others'; after them the private weight
    gradients (``workspace`` says which)."""
    convs = [op for op in ops if op["kind"] == "conv"]
    stride = memplan.round_up(max((thread_band(op, threads) for op in convs), default=0))
    if threads > 1 and stride:
        stride += THREAD_GAP
    need = max((stride * threads + (0 if _splits_filters(op, threads) else
                                    (threads - 1) * op["filters"] * op["channels"] * op["size"] ** 2)
                for op in convs), default=0)
    return stride, memplan.round_up(need)


def _buffers(spec, recompute=False):
    """({name: (size, first, last)} float buffers, the same for int16) of a
    tile's step: forward op j at time j, backward op j at 2n-1-j.

    An output read outside the group is read only by forward messages, all
    sent (copied) before the step's backward starts (``grad_zero``), so it
    lives no longer than the group itself needs it: the last unit's output
    and its gradient, which fills only from then on, share their bytes. A
    group that recomputes writes its forward again during backward, so
    there the outputs it hands on stay to the end of the step."""
    ops, b = spec["ops"], spec["batch"]
    n = len(ops)
    end = 2 * n
    bwd = [2 * n - 1 - j for j in range(n)]
    floats, ints = {}, {}
    for j, op in enumerate(ops):
        c, h, w = out_shape(op)
        size = b * c * h * w
        reads_input_backward = j + 1 < n and ops[j + 1]["kind"] == "conv"
        kept = j == n - 1 or (op["pool"] or op if op["kind"] == "conv" else op)["layer"] in spec["kept"]
        own = bwd[j + 1] if reads_input_backward else (j + 1 if j + 1 < n else j)
        floats[f"out{j}"] = (size, j, end if kept and (recompute or spec.get("hold")) else own)
        floats[f"d{j}"] = (size, bwd[j + 1] if j + 1 < n else n, bwd[j])
        if op["kind"] == "conv":
            zrows = max(z1 - z0 for z0, z1, _, _ in op["stream"]) if op.get("stream") else op["out"][0]
            zsize = b * op["filters"] * zrows * op["out"][1]
            floats[f"z{j}"] = (zsize, j, bwd[j])
            if op.get("stream"):  # a band of the pool's output and of its gradient; of its argmax
                prows = max(p1 - p0 for _, _, p0, p1 in op["stream"])
                floats[f"band{j}"] = ints[f"bandarg{j}"] = (b * op["filters"] * prows * op["pool"]["out"][1],
                                                           j, bwd[j])
            if op["pool"]:
                if not op.get("regen"):
                    floats[f"da{j}"] = (zsize, bwd[j], bwd[j])
                ints[f"arg{j}"] = (size, j, bwd[j])
        else:
            ints[f"arg{j}"] = (size, j, bwd[j])
    if spec["input_grad"]:
        c, h, w = spec["input"]
        floats["din"] = (b * c * h * w, bwd[0], end)
    return floats, ints


def scratch_buffers(floats, ints, n, recompute):
    """Names of the buffers that live only during the tile's own backward
    and so go to the device's scratch (backward phases of groups never
    overlap on a device): the gradients inside the group and of its input
    (its output's gradient receives messages before its backward starts,
    so it stays), or, for a group that recomputes, everything it
    recomputes. The input's gradient is only read by the group's last ops,
    the sends that return it (``tilec.plan.schedule.group_backward``): each
    copies it out, to a staging buffer or straight into the producer's
    gradient on the same device, before the next group's backward (its
    recompute first) writes the scratch again. ``floats``, ``ints``: the
    tile's buffers (``_buffers``), ``n`` its units."""
    if recompute:
        return set(floats) - {f"d{n - 1}"}, set(ints)
    inside = {f"d{j}" for j in range(n - 1)} | {f"da{j}" for j in range(n) if f"da{j}" in floats}
    return inside | ({"din"} & set(floats)), set()


def _pack(buffers, names, start=0, check=True):
    """({name: [offset, size]}, end) of ``names`` packed from ``start``."""
    offsets, total = memplan.plan_offsets({k: buffers[k] for k in names})
    if check:
        memplan.check({k: buffers[k] for k in names}, offsets, total)
    return {k: [start + offsets[k], buffers[k][0]] for k in sorted(names)}, start + total


def _plan_memory(spec, recompute=False, check=True, regen=True):
    """Buffer offsets: the tile's own float and int16 arenas (what lives
    across the step), and its share of the device's scratch: the im2col
    workspace, then the backward-only buffers (``scratch_buffers``)."""
    for j, op in enumerate(spec["ops"]):
        if regen and regenerates(op, j, spec["input_grad"], recompute):
            op["regen"] = True
            if streams(dict(op, batch=spec["batch"]), j, spec["input_grad"], recompute):
                op["stream"] = stream_bands(op, spec["batch"])
    floats, ints = _buffers(spec, recompute)
    spill, spill_args = scratch_buffers(floats, ints, len(spec["ops"]), recompute)
    spec["buffers"], spec["arena"] = _pack(floats, set(floats) - spill, check=check)
    spec["arg_buffers"], spec["arg_arena"] = _pack(ints, set(ints) - spill_args, check=check)
    spec["thread_stride"], spec["workspace"] = strided_workspace(spec["ops"], spec["threads"])
    spec["scratch_buffers"], spec["scratch"] = _pack(floats, spill, spec["workspace"], check)
    spec["scratch_arg_buffers"], spec["scratch_args"] = _pack(ints, spill_args, check=check)


def scratch_bytes(spec, itemsize):
    """Bytes of device scratch a tile needs: its float part, then its int16 part."""
    return memplan.round_up(spec["scratch"] * itemsize) + 2 * spec["scratch_args"]


def lower_rank(plan, rank, threads=1, regen=True):
    """{group index: kernel spec} of the tiles ``rank`` computes (``regen``: see ``lower_tile``)."""
    program, batch = plan["program"], plan["batch"]
    outside = outside_tensors(plan)
    specs = {}
    for g, group in enumerate(plan["groups"]):
        if group["kind"] != "tiled":
            continue
        for tile in group["tiles"]:
            if tile["device"] == rank:
                specs[g] = lower_tile(program, group, tile, batch, outside, threads, regen)
    return specs
