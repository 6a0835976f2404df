"""Lowering: plan -> kernel specs, one per (group, tile shape).

A kernel spec is plain JSON-able data that the runtime's executor
(``tilec_runtime.fused``) runs with the generated kernels: for each op of
the tile (a conv with its batch norm or bias and activation, optionally
fused with the max-pool that follows it, or a max-pool alone), the shapes,
stride, padding at real map borders only (as the plan gives it), the owned
cells whose batch-norm statistics this tile contributes, and the offsets of
every buffer in one arena from a static memory plan (``memplan``).

A conv is fused with the following max-pool when the conv's output is read
by nothing else (no message of the plan carries it): then the activation
map in front of the pool is never stored, and backward recomputes what it
needs from the conv's raw output.
"""
import json

from tilec.codegen import memplan
from tilec.codegen.errors import CodegenError
from tilec_runtime.kernel_set import band_rows

FORMAT = "tilec-kernels"
VERSION = 1
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
        "count": batch * h * w, "band": band_rows(c, k, ho, wo), "pool": None,
    }


def _pool_op(layer, tl, base):
    return {"kind": "maxpool", "layer": layer["index"], "src": _window(tl["src"], base),
            "channels": layer["in_shape"][0], "size": layer["size"], "stride": layer["stride"],
            "pads": list(tl["pads"]), "out": [_len(tl["region"][0]), _len(tl["region"][1])]}


def lower_tile(program, group, tile, batch, outside):
    """The kernel spec of one tile. ``outside``: layers whose output the
    plan sends somewhere (so a conv producing one cannot hide it in a pool)."""
    first, last = group["layers"]
    base = tile["input"]
    ops, layers, j = [], tile["layers"], 0
    while j < len(layers):
        tl = layers[j]
        layer = program[tl["layer"]]
        if layer["kind"] == "conv":
            op = _conv_op(layer, tl, base, batch)
            nxt = layers[j + 1] if j + 1 < len(layers) else None
            if nxt is not None and program[nxt["layer"]]["kind"] == "maxpool" and layer["index"] not in outside:
                op["pool"] = _pool_op(program[nxt["layer"]], nxt, tl["region"])
                base, j = nxt["region"], j + 2
            else:
                base, j = tl["region"], j + 1
        elif layer["kind"] == "maxpool":
            op = _pool_op(layer, tl, base)
            base, j = tl["region"], j + 1
        else:
            raise CodegenError(f"layer {layer['index']} ({layer['kind']}): no kernel for it in a tiled group")
        ops.append(op)
    c_in = program[first]["in_shape"][0]
    spec = {"layers": [first, last], "batch": batch,
            "input": [c_in, _len(tile["input"][0]), _len(tile["input"][1])],
            "input_grad": first > 0,  # the network input needs no gradient
            "ops": ops}
    _plan_memory(spec)
    return spec


def out_channels(op):
    return op["filters"] if op["kind"] == "conv" else op["channels"]


def out_shape(op):
    """[C, h, w] of what an op hands to the next one (a fused pool's output)."""
    last = (op["pool"] or op) if op["kind"] == "conv" else op
    return [out_channels(op), *last["out"]]


def _plan_memory(spec):
    """Buffer offsets: float arena, int16 arena (argmax), and the im2col workspace."""
    ops, b = spec["ops"], spec["batch"]
    n = len(ops)
    end = 2 * n  # after the step: the group output stays for the next group / the loss
    bwd = [2 * n - 1 - j for j in range(n)]
    floats, ints = {}, {}
    for j, op in enumerate(ops):
        c, h, w = out_shape(op)
        size = b * c * h * w
        reads_input_backward = j + 1 < n and ops[j + 1]["kind"] == "conv"
        floats[f"out{j}"] = (size, j, end if j == n - 1 else (bwd[j + 1] if reads_input_backward else j + 1))
        floats[f"d{j}"] = (size, bwd[j + 1] if j + 1 < n else n, bwd[j])
        if op["kind"] == "conv":
            zsize = b * op["filters"] * op["out"][0] * op["out"][1]
            floats[f"z{j}"] = (zsize, j, bwd[j])
            if op["pool"]:
                floats[f"da{j}"] = (zsize, bwd[j], bwd[j])
                ints[f"arg{j}"] = (size, j, bwd[j])
        else:
            ints[f"arg{j}"] = (size, j, bwd[j])
    if spec["input_grad"]:
        c, h, w = spec["input"]
        floats["din"] = (b * c * h * w, bwd[0], end)
    offsets, total = memplan.plan_offsets(floats)
    memplan.check(floats, offsets, total)
    arg_offsets, arg_total = memplan.plan_offsets(ints)
    spec["buffers"] = {name: [offsets[name], floats[name][0]] for name in sorted(floats)}
    spec["arg_buffers"] = {name: [arg_offsets[name], ints[name][0]] for name in sorted(ints)}
    spec["arena"], spec["arg_arena"] = total, arg_total
    spec["workspace"] = max((op["channels"] * op["size"] ** 2 * op["band"] * op["out"][1]
                             for op in ops if op["kind"] == "conv"), default=0)


def lower_plan(plan):
    """The kernel plan: specs, deduplicated by tile shape, and which spec
    each (group, device) runs."""
    program, batch = plan["program"], plan["batch"]
    outside = {m["tensor"] for m in plan["messages"] if m["phase"] == "forward"}
    specs, index, tiles = [], {}, []
    for g, group in enumerate(plan["groups"]):
        if group["kind"] != "tiled":
            continue
        for tile in group["tiles"]:
            spec = lower_tile(program, group, tile, batch, outside)
            key = json.dumps(spec, sort_keys=True)
            if key not in index:
                index[key] = len(specs)
                specs.append(spec)
            tiles.append({"group": g, "device": tile["device"], "spec": index[key]})
    return {"format": FORMAT, "version": VERSION, "plan": plan["hash"], "dtype": plan["dtype"], "batch": batch,
            "specs": specs, "tiles": tiles}
