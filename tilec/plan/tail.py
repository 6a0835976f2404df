"""The layers after the tiled prefix: their groups, devices and messages.

The tail is cut into *runs*: maximal stretches of layers that can be split
by channels (conv, connected and pooling layers, each reading the one
before: ``tilec_runtime.shards``), and the layers between them that need
the assembled map (route, reorg, the loss), which run whole on one device
(the loss on rank 0, which has the batch's targets). Each run becomes one
or more tail groups, on one device (``mode: "one"``) or split by channels
over a set of devices (``mode: "channels"``).

Messages carry every tensor a group reads from where it is (``flows``): a
tile's owned cells (the tiled prefix), a whole map (a group on one device),
the replicated map of a channel group, or each member's channels. A
channel group's input is replicated on all its members, so in backward
each member returns its partial gradient and the producer adds them up. A
channel group whose output is replicated needs that output's gradient on
every member (each applies the last batch norm to all channels): its
consumers send it to every member, backward messages with no forward twin.
"""
from dataclasses import dataclass

from tilec.errors import PlanError
from tilec_runtime import shards


@dataclass
class TailChoice:
    """A tail group over program[first..last]: ``mode`` "one" (``devices``
    one rank) or "channels" (``devices`` the members, sorted)."""
    first: int
    last: int
    mode: str
    devices: list


def runs(program, prefix):
    """[(first, last, splittable)] covering program[prefix:]. A splittable
    run ends where a layer's output is read by anything but the next layer
    (a group split by channels hands on its last output only)."""
    readers = {}
    for layer in program:
        for j in layer["inputs"]:
            readers.setdefault(j, set()).add(layer["index"])
    out = []
    for layer in program[prefix:]:
        i = layer["index"]
        ok = layer["kind"] in shards.SPLITTABLE and layer["inputs"] == [i - 1]
        if out and out[-1][2] == ok and (not ok or readers.get(i - 1, set()) <= {i}):
            first, _, _ = out[-1]
            out[-1] = (first, i, ok)
        else:
            out.append((i, i, ok))
    return out


def one_device_tail(program, prefix, device=0):
    """The whole tail on one device (rank 0 unless told)."""
    return [TailChoice(first, last, "one", [device if ok else 0]) for first, last, ok in runs(program, prefix)]


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
    members = sorted(t["device"] for t in group["tiles"])
    if group["mode"] == "one":
        return [(members[0], None)], False
    first, last = group["layers"]
    held = shards.layouts(program, first, last, len(members))[tensor]
    if held is None:
        return [(d, None) for d in members], True
    return [(d, (held[m], held[m + 1] - 1)) for m, d in enumerate(members) if held[m + 1] > held[m]], False


def flows(sources, replicated, receivers):
    """Who sends what so that every receiver holds a tensor, and its gradient comes back.

    ``sources``: [(device, part)], the parts that make the tensor, or with
    ``replicated`` the devices that each hold all of it (``part`` the
    whole). Returns (forward [(sender, receiver, part)], extra backward
    [(sender, receiver, part)]): backward, every forward message returns
    in reverse (partial gradients, summed by its sender); a replicated
    tensor's holders each need the whole gradient, so each receiver also
    sends it to the holders it did not take the tensor from. A receiver that
    holds a replicated tensor takes its own copy; the others take it from
    the holders in turn, so that no one holder sends every copy.
    """
    forward, extra = [], []
    if not replicated:
        for r in receivers:
            forward += [(d, r, part) for d, part in sources]
        return forward, extra
    held = [d for d, _ in sources]
    part = sources[0][1]
    turn = 0
    for r in receivers:
        if r in held:
            src = r
        else:
            src, turn = held[turn % len(held)], turn + 1
        forward.append((src, r, part))
        extra += [(r, d, part) for d in held if d != src]
    return forward, extra


