"""The layers after the tiled prefix as the planner sees them: runs, choices, messages.

The tail is cut into *runs*: maximal stretches of layers that can be split
by channels (conv, connected and pooling layers and a sum-of-squares cost,
each reading the one before: ``tilec_runtime.shards``), and the layers
between them that need the assembled map (route, reorg, the other losses),
which run whole on one device (a loss on one device on rank 0, to which
the launcher sends the batch's targets). Each run becomes one
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
The plan builder (``tilec.plan.tail``) and the cost model
(``tilec.cost.tail``) both read these, so messages and prices agree.
"""
from dataclasses import dataclass

from tilec_runtime import shards


@dataclass
class TailChoice:
    """A tail group over program[first..last]: ``mode`` "one" (``devices``
    one rank) or "channels" (``devices`` the members, sorted)."""
    first: int
    last: int
    mode: str
    devices: list


def readers_of(program):
    """{layer: the set of layers that read its output} (-1: the image)."""
    readers = {}
    for layer in program:
        for j in layer["inputs"]:
            readers.setdefault(j, set()).add(layer["index"])
    return readers


def runs(program, prefix):
    """[(first, last, splittable)] covering program[prefix:]; a route
    starts a splittable one. A layer whose output a later layer
    reads too (YOLOv2's 16, read by the pool after it and by route 25) stays
    inside its run: a group split by channels hands on any output it holds
    (each member its channels, ``flows``), so the pool after it may join it
    and the next group takes the pooled map, a quarter of the bytes."""
    out = []
    for layer in program[prefix:]:
        i = layer["index"]
        ok = layer["kind"] in shards.SPLITTABLE and layer["inputs"] == [i - 1]
        if layer["kind"] == "route":
            # a route starts a run: a group of it and the layers after it on one device holds a route of
            # one map once (no copy, no second group's input buffer for it); split by channels, every
            # member assembles the route's map from its inputs (``shards.check``: only as the first layer)
            out.append((i, i, True))
            continue
        if out and out[-1][2] == ok:
            first, _, _ = out[-1]
            out[-1] = (first, i, ok)
        else:
            out.append((i, i, ok))
    return out


def is_identity(layer):
    """A route of one map: its output is that map."""
    return layer["kind"] == "route" and len(layer["inputs"]) == 1


def one_device_tail(program, prefix):
    """The whole tail on rank 0, a run by group; a sum-of-squares cost that
    ends a run of other layers in a group of its own (where the kernels'
    allocation-free ``sse`` runs it: ``tilec_runtime.tailstep.native_cost``)."""
    out = []
    for first, last, _ in runs(program, prefix):
        if last > first and program[last]["kind"] == "cost":
            out.append(TailChoice(first, last - 1, "one", [0]))
            first = last
        out.append(TailChoice(first, last, "one", [0]))
    return out


RELAY_MIN = 3  # receivers from which a map held whole by one device goes out through them


def relayed(sources, replicated, receivers):
    """Whether a tensor held whole by one device reaches ``receivers`` (a
    channel group's members, each needing all of it) through them: the
    holder sends each receiver one slice of channels, and each passes its
    slice on to the others (a scatter, then an all-gather). The holder's
    link carries the map about once instead of once per receiver (YOLOv2's
    route 28, 1.8 MB an image, to 4 Pis: 0.44 s on a 100 Mbit/s link
    becomes about 0.25 s); backward, the partial gradients are summed slice
    by slice by the receivers, and each slice's sum goes back. With two
    receivers the holder's link carries the same either way."""
    return not replicated and len(sources) == 1 and len(receivers) >= RELAY_MIN


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
