"""The tail groups of a plan: choices checked against the program, their
group dicts, and who holds each of their outputs (the runs, choices and
messages themselves: ``tilec.analysis.tail``)."""
from tilec.errors import PlanError
from tilec_runtime import shards
from tilec_runtime.program import members_of


def check_choices(program, prefix, choices, n_devices):
    expect = prefix
    for ch in choices:
        where = f"tail group {ch.first}-{ch.last}"
        if ch.first != expect or ch.last < ch.first:
            raise PlanError(f"{where} must start at layer {expect}")
        expect = ch.last + 1
        if not ch.devices or any(not 0 <= d < n_devices for d in ch.devices) or len(set(ch.devices)) != len(
                ch.devices):
            raise PlanError(f"{where}: bad devices {ch.devices}")
        if ch.mode == "one":
            if len(ch.devices) != 1:
                raise PlanError(f"{where}: mode 'one' takes one device, got {ch.devices}")
            if ch.last == len(program) - 1 and ch.devices != [0]:
                raise PlanError(f"{where}: the loss runs on rank 0, which has the batch's targets")
        elif ch.mode == "channels":
            problem = shards.check(program, ch.first, ch.last, len(ch.devices))
            if problem:
                raise PlanError(f"{where}: cannot split by channels over {len(ch.devices)} devices: {problem}")
        else:
            raise PlanError(f"{where}: unknown mode {ch.mode!r}")
    if expect != len(program):
        raise PlanError(f"the tail groups end at layer {expect - 1}, the program at {len(program) - 1}")


def tail_group(program, ch):
    _, h, w = program[ch.last]["out_shape"]
    group = {"kind": "tail", "layers": [ch.first, ch.last], "mode": ch.mode,
             "tiles": [{"device": d, "rows": [0, h - 1], "cols": [0, w - 1]} for d in sorted(ch.devices)]}
    return group


def holders(program, group, tensor):
    """([(device, channel range or None)], replicated) of who holds ``tensor``
    (an output of ``group``, a tail group) and how: the whole map on one
    device, the whole map on every member (``replicated``), or channels."""
    members = members_of(group)
    if group["mode"] == "one":
        return [(members[0], None)], False
    first, last = group["layers"]
    held = shards.layouts(program, first, last, len(members))[tensor]
    if held is None:
        return [(d, None) for d in members], True
    return [(d, (held[m], held[m + 1] - 1)) for m, d in enumerate(members) if held[m + 1] > held[m]], False
