"""The plan file: versioned, hashed JSON, read with the standard library.

The planner writes it (``tilec.plan``); every device reads and validates it
before allocating anything. Two devices work together only if their plan
hashes agree. The hash is the SHA-256 of the canonical JSON (sorted keys,
no spaces) of the plan without its ``hash`` field.
"""
import hashlib
import json
import os

from tilec_runtime.errors import ProgramError
from tilec_runtime.files import atomic_json
from tilec_runtime.program import tensor_shape, validate as validate_program

FORMAT = "tilec-plan"
VERSION = 6  # 2: the per-rank schedule, gradient buckets, device threads, the cluster; 3: input ops;
#             4: reorg reverse, local_avgpool; 5: an A layer's backward in parts around an overlapped
#             all-reduce (chan_bwd part, chan_reduce overlap, chan_wait); a B layer's sums in slices; relay messages;
#             6: scratch_release and tail_free (the scratch's pages given back while the tail runs)
DTYPES = ("float32", "float64")


def canonical(plan):
    body = {k: v for k, v in plan.items() if k != "hash"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def plan_hash(plan):
    return hashlib.sha256(canonical(plan).encode()).hexdigest()


def seal(plan):
    """Return ``plan`` with its hash filled in."""
    plan = dict(plan)
    plan["hash"] = plan_hash(plan)
    return plan


def write_plan(plan, directory):
    """Write ``directory/plan.json`` atomically, once it passes the checks
    every device makes of it (``validate``: nothing is written that the
    runtime would refuse); returns the path."""
    validate(plan)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "plan.json")
    atomic_json(path, plan, indent=1, sort_keys=True)
    return path


def _range(value, n, where):
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)
            and 0 <= value[0] <= value[1] < n):
        raise ProgramError(f"{where}: bad range {value!r} (map size {n})")


def validate(plan):
    """Check structure, version and hash of a plan dict; raise ProgramError."""
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise ProgramError("not a tilec plan (missing format 'tilec-plan')")
    if plan.get("version") != VERSION:
        raise ProgramError(f"plan version {plan.get('version')!r} is not supported (this runtime reads {VERSION}): "
                           "compile it again with this tilec")
    if plan.get("hash") != plan_hash(plan):
        raise ProgramError("plan hash does not match its contents (edited or corrupted)")
    if plan.get("dtype") not in DTYPES:
        raise ProgramError(f"plan dtype {plan.get('dtype')!r} must be one of {DTYPES}")
    if not isinstance(plan.get("batch"), int) or plan["batch"] < 1:
        raise ProgramError(f"plan batch {plan.get('batch')!r} must be a positive integer")
    program = validate_program(plan.get("program"))
    ndev = len(plan.get("devices", []))
    if ndev < 1:
        raise ProgramError("plan has no devices")
    covered = 0
    for g, group in enumerate(plan.get("groups", [])):
        first, last = group["layers"]
        if first != covered or last < first or last >= len(program):
            raise ProgramError(f"group {g}: layers {group['layers']} do not continue at layer {covered}")
        covered = last + 1
        seen = set()
        for t, tile in enumerate(group["tiles"]):
            d = tile.get("device")
            if not isinstance(d, int) or not 0 <= d < ndev or d in seen:
                raise ProgramError(f"group {g} tile {t}: bad or repeated device {d!r}")
            seen.add(d)
            if group["kind"] == "tiled":
                out = program[last]["out_shape"]
                _range(tile["rows"], out[1], f"group {g} tile {t} rows")
                _range(tile["cols"], out[2], f"group {g} tile {t} cols")
        if group["kind"] == "tail":
            _check_tail(program, g, group)
        elif group["kind"] != "tiled":
            raise ProgramError(f"group {g}: unknown kind {group['kind']!r}")
    if covered != len(program):
        raise ProgramError(f"groups cover layers 0..{covered - 1} of {len(program)}")
    for r, device in enumerate(plan["devices"]):
        if device.get("rank") != r or not isinstance(device.get("threads"), int) or device["threads"] < 1:
            raise ProgramError(f"device {r}: bad rank or threads in {device!r}")
    if not isinstance(plan.get("ring_min_bytes"), int) or plan["ring_min_bytes"] < 0:
        raise ProgramError("plan ring_min_bytes must be a non-negative integer")
    _check_messages(plan)
    _check_buckets(plan)
    _check_schedule(plan)
    return plan


def _check_tail(program, g, group):
    mode = group.get("mode")
    if mode == "one":
        if len(group["tiles"]) != 1:
            raise ProgramError(f"group {g}: a tail group on one device has {len(group['tiles'])} devices")
    elif mode == "channels":
        from tilec_runtime import shards
        problem = shards.check(program, *group["layers"], len(group["tiles"]))
        if problem:
            raise ProgramError(f"group {g}: cannot be split by channels: {problem}")
    else:
        raise ProgramError(f"group {g}: bad tail mode {mode!r}")


def _check_messages(plan):
    program, groups, ndev = plan["program"], plan["groups"], len(plan["devices"])
    for k, m in enumerate(plan["messages"]):
        where = f"message {k}"
        if m.get("phase") not in ("forward", "backward"):
            raise ProgramError(f"{where}: bad phase {m.get('phase')!r}")
        for key in ("sender", "receiver"):
            if not isinstance(m.get(key), int) or not 0 <= m[key] < ndev:
                raise ProgramError(f"{where}: bad {key} {m.get(key)!r}")
        if not isinstance(m.get("group"), int) or not 0 <= m["group"] < len(groups):
            raise ProgramError(f"{where}: bad group {m.get('group')!r}")
        t = m.get("tensor")
        if not isinstance(t, int) or not -1 <= t < len(program) or (t == -1 and m["phase"] != "forward"):
            raise ProgramError(f"{where}: bad tensor {t!r}")
        c, h, w = tensor_shape(program, t)
        if "channels" in m:
            _range(m["channels"], c, f"{where} channels")
        _range(m.get("rows"), h, f"{where} rows")
        _range(m.get("cols"), w, f"{where} cols")
        if m.get("relay"):
            group = groups[m["group"]]
            members = [tile["device"] for tile in group["tiles"]]
            first, last = group["layers"]
            reads = {j for layer in program[first:last + 1] for j in layer["inputs"] if j < first}
            if (group.get("mode") != "channels" or t not in reads or m["sender"] == m["receiver"]
                    or m["sender"] not in members or m["receiver"] not in members):
                raise ProgramError(f"{where}: a relayed message passes a channel group's input between two of "
                                   f"its members")


def _check_buckets(plan):
    from tilec_runtime.program import param_shapes
    program, ndev = plan["program"], len(plan["devices"])
    keys = {k for layer in program for k in param_shapes(layer)}
    for b, bucket in enumerate(plan["buckets"]):
        members = bucket.get("members")
        if not (isinstance(members, list) and members and members == sorted(set(members))
                and all(isinstance(d, int) and 0 <= d < ndev for d in members)):
            raise ProgramError(f"bucket {b}: bad members {members!r}")
        if not (isinstance(bucket.get("keys"), list) and set(bucket["keys"]) <= keys):
            raise ProgramError(f"bucket {b}: unknown parameter keys")
        reduce = bucket.get("reduce")
        if not (isinstance(reduce, dict) and set(reduce) <= set(bucket["keys"])
                and all(a in ("ring", "gather") for a in reduce.values())):
            raise ProgramError(f"bucket {b}: bad reduce {reduce!r}")


OPS = {"send": ("msg",), "recv": ("msg",), "input": ("msg",), "conv_fwd": ("group", "unit"),
       "epi_fwd": ("group", "unit"), "pool_fwd": ("group", "unit"), "bn_stats": ("group", "unit", "layer"),
       "recompute": ("group",), "grad_zero": (), "epi_bwd": ("group", "unit"), "bn_grad": ("group", "unit", "layer"),
       "conv_bwd": ("group", "unit"), "pool_bwd": ("group", "unit"), "tail_fwd": ("group",),
       "tail_bwd": ("group",), "grad_start": ("bucket",), "grad_wait": (), "chan_fwd": ("group", "layer"),
       "chan_reduce": ("group", "layer"), "chan_post": ("group", "layer"), "chan_post_bwd": ("group", "layer"),
       "chan_bwd": ("group", "layer"), "chan_wait": ("group", "layer"), "scratch_release": (),
       "tail_free": ("group",)}
# which groups an op works on: tiled, a tail group on one device, one split by channels
OP_GROUPS = {**{k: ("tiled",) for k in ("conv_fwd", "epi_fwd", "pool_fwd", "bn_stats", "recompute", "epi_bwd",
                                        "bn_grad", "conv_bwd", "pool_bwd")},
             "tail_fwd": ("one",), "tail_bwd": ("one",), "tail_free": ("one", "channels"),
             **{k: ("channels",) for k in ("chan_fwd", "chan_reduce", "chan_post", "chan_post_bwd", "chan_bwd",
                                           "chan_wait")}}


# the roles a channel op's layer may have (A: after a sliced B, its sums slice by slice, then its post)
CHAN_ROLES = {("chan_reduce", "forward"): "B", ("chan_reduce", "backward"): "A", ("chan_post", None): "AB",
              ("chan_post_bwd", None): "B", ("chan_reduce", "input"): "first", ("chan_wait", "backward"): "A",
              ("chan_bwd", "input"): "A", ("chan_bwd", "weight"): "A", ("chan_fwd", "slice"): "AB",
              ("chan_wait", "forward"): "B"}


def _check_role(program, group, op, where):
    """A channel all-reduce or post-op names a layer of the role it needs."""
    from tilec_runtime import shards
    kind = op["op"]
    phase = (op.get("part") if kind == "chan_bwd" else "slice" if kind == "chan_fwd"
             else op.get("phase") if kind in ("chan_reduce", "chan_wait") else None)
    want = CHAN_ROLES.get((kind, phase))
    if want is None:
        raise ProgramError(f"{where}: bad phase {phase!r}")
    if want == "first":  # the group's input gradient, named by its first layer
        if op["layer"] != group["layers"][0] or not group.get("reduce_input"):
            raise ProgramError(f"{where}: the input all-reduce names the first layer of a group that reduces its input")
        return
    roles = shards.roles(program, *group["layers"])
    role = roles[op["layer"]]
    if role not in want:
        raise ProgramError(f"{where}: {op['op']} needs a layer split as {' or '.join(want)}, "
                           f"layer {op['layer']} is {role}")
    if role == "A" and want == "AB" and (op["layer"] == group["layers"][0] or roles[op["layer"] - 1] != "B"):
        raise ProgramError(f"{where}: {op['op']} of A layer {op['layer']} slice by slice needs a B layer before it")


def _check_slice(program, group, op, where):
    """A slice of a B layer's sums (or of the input channels of the A after
    it) names one of at most MAX_SLICES, each of some channels."""
    from tilec_runtime import shards
    piece, pieces = op.get("slice"), op.get("slices")
    layer = program[op["layer"]]
    role = shards.roles(program, *group["layers"])[op["layer"]]
    channels = layer["out_shape"][0] if role == "B" else layer["in_shape"][0]
    if not (isinstance(piece, int) and isinstance(pieces, int) and 0 <= piece < pieces <= shards.MAX_SLICES
            and pieces <= channels):
        raise ProgramError(f"{where}: bad slice {piece!r} of {pieces!r}")


def _check_schedule(plan):
    """Every op names what exists and concerns its rank; every message is
    sent once by its sender and received once by its receiver."""
    from tilec_runtime import shards
    from tilec_runtime.lower import outside_tensors, units
    program, groups, messages = plan["program"], plan["groups"], plan["messages"]
    schedule = plan.get("schedule")
    if not isinstance(schedule, list) or len(schedule) != len(plan["devices"]):
        raise ProgramError("plan schedule must list the ops of every device")
    outside = outside_tensors(plan)
    n_units = {g: len(units(program, *group["layers"], outside))
               for g, group in enumerate(groups) if group["kind"] == "tiled"}
    sent, received = [0] * len(messages), [0] * len(messages)
    for r, ops in enumerate(schedule):
        if not isinstance(ops, list):
            raise ProgramError(f"schedule of device {r} is not a list")
        overlapped = set()  # (group, layer, phase, slice) of overlapped all-reduces not yet waited for
        summed = set()  # (group, layer) of A layers that summed slices of their input
        for i, op in enumerate(ops):
            where = f"device {r} op {i}"
            kind = op.get("op") if isinstance(op, dict) else None
            if kind not in OPS:
                raise ProgramError(f"{where}: unknown op {kind!r}")
            for field in OPS[kind]:
                if not isinstance(op.get(field), int):
                    raise ProgramError(f"{where} ({kind}): field {field!r} must be an integer")
            if "msg" in OPS[kind]:
                k = op["msg"]
                if not 0 <= k < len(messages) or messages[k]["sender" if kind == "send" else "receiver"] != r:
                    raise ProgramError(f"{where}: message {k} is not this device's to {kind}")
                if (kind == "input") != (messages[k]["tensor"] == -1):
                    raise ProgramError(f"{where}: the image's pieces are input ops, nothing else is ({kind} {k})")
                (sent if kind == "send" else received)[k] += 1
                sent[k] += kind == "input"  # (by the data source)
            if "group" in OPS[kind]:
                g = op["group"]
                if not 0 <= g < len(groups) or all(t["device"] != r for t in groups[g]["tiles"]):
                    raise ProgramError(f"{where}: device {r} has no tile in group {g}")
                if groups[g].get("mode", groups[g]["kind"]) not in OP_GROUPS[kind]:
                    raise ProgramError(f"{where}: {kind} on a {groups[g].get('mode', groups[g]['kind'])} group")
                if "layer" in OPS[kind] and not groups[g]["layers"][0] <= op["layer"] <= groups[g]["layers"][1]:
                    raise ProgramError(f"{where}: layer {op['layer']} is not in group {g}")
                if kind in ("chan_reduce", "chan_post", "chan_post_bwd", "chan_wait") or (
                        kind == "chan_bwd" and "part" in op) or (kind == "chan_fwd" and "slice" in op):
                    _check_role(program, groups[g], op, where)
                if "slice" in op and kind != "chan_wait":
                    _check_slice(program, groups[g], op, where)
                if kind == "chan_fwd" and "slice" in op:
                    summed.add((g, op["layer"]))
                if kind == "chan_post" and shards.roles(program, *groups[g]["layers"])[op["layer"]] == "A" and (
                        g, op["layer"]) not in summed:
                    raise ProgramError(f"{where}: chan_post of A layer {op['layer']} before its sums slice by slice")
                key = (g, op.get("layer"), op.get("phase"), op.get("slice"))
                if kind == "chan_reduce" and op.get("overlap"):
                    if (op["phase"] == "forward") != ("slice" in op) or op["phase"] == "input":
                        raise ProgramError(f"{where}: only a slice of B's sums or an A layer's input gradient "
                                           f"is all-reduced while compute goes on")
                    overlapped.add(key)
                if kind == "chan_wait":
                    if key not in overlapped:
                        raise ProgramError(f"{where}: chan_wait for an all-reduce not overlapped before it")
                    overlapped.discard(key)
                if "unit" in OPS[kind] and not 0 <= op["unit"] < n_units[g]:
                    raise ProgramError(f"{where}: group {g} has no unit {op['unit']}")
                rows = op.get("rows")
                if rows is not None and not (isinstance(rows, list) and len(rows) == 2
                                             and all(isinstance(v, int) and v >= 0 for v in rows)
                                             and rows[0] <= rows[1]):
                    raise ProgramError(f"{where}: bad rows {rows!r}")
            if kind == "grad_start":
                b = op["bucket"]
                if not 0 <= b < len(plan["buckets"]) or r not in plan["buckets"][b]["members"]:
                    raise ProgramError(f"{where}: device {r} is not a member of bucket {b}")
        if overlapped:
            g, layer, phase, _ = min(overlapped, key=str)
            raise ProgramError(f"device {r}: the overlapped {phase} all-reduce of group {g} layer {layer} "
                               f"is never waited for (chan_wait)")
    for k in range(len(messages)):
        if sent[k] != 1 or received[k] != 1:
            raise ProgramError(f"message {k} is sent {sent[k]} and received {received[k]} times (once each)")


def read_plan(path):
    """Load and validate a plan from a file or a directory holding plan.json."""
    if os.path.isdir(path):
        path = os.path.join(path, "plan.json")
    try:
        with open(path) as f:
            plan = json.load(f)
    except OSError as exc:
        raise ProgramError(f"{path}: cannot read plan: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ProgramError(f"{path}: not a plan (the plan.json that `tilec compile -o DIR` writes): {exc}") from None
    try:
        return validate(plan)
    except (KeyError, TypeError) as exc:
        raise ProgramError(f"{path}: malformed plan ({exc!r})") from None
    except ProgramError as exc:
        raise ProgramError(f"{path}: {exc}") from None
