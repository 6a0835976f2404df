"""The price of the layers after the tiled prefix: tail groups on one
device or split by channels, and the moves of maps between them.

A tail group (``tilec.plan.tail``) over program[first..last] runs on one
device, or split by channels over a set of members (the k fastest devices,
k = 2..n: ``tilec_runtime.shards``). Between groups a map is *held* in one
of three ways (:class:`Holding`): on one device, whole on every member of
a channel group, or split by channels over them. A group needs its input
whole on one device, or whole on each of its members; moving a map from
how it is held to how the next group needs it, forward and its gradient
backward, is a *transition* with the same messages the plan builder makes
(``tilec.plan.tail.flows``).

A group's time is, layer by layer, its slowest member forward and
backward (a channel group's all-reduces make every layer a barrier), plus
its all-reduces (an A layer's backward one overlapping its weight
gradient: the longer of the two; a B layer's forward one slice by slice,
each overlapping the next slice's sums), its SGD update, and sending rank 0 what a later layer
other than the next reads (route, reorg and the losses other than a sum-of-squares cost run on
rank 0; such a cost may be split by channels with the layers before it).
Memory per member: ``tilec_runtime.footprint.tail_member_bytes``.
"""
from dataclasses import dataclass, field
from math import prod

import numpy as np

from tilec.cost.comm import exchange_seconds, gradient_allreduce_seconds
from tilec.cost.compute import share_seconds, update_seconds
from tilec_runtime.footprint import image_bytes, tail_member_bytes
from tilec.analysis.tail import TailChoice, flows, readers_of, relayed
from tilec_runtime import shards
from tilec_runtime.program import tensor_shape

DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True)
class Holding:
    """How a map is held: ``kind`` "one" (on ``devices[0]``), "whole" (on
    every member of ``devices``) or "split" (by channels over them)."""
    kind: str
    devices: tuple


def holdings(n, order):
    """Every holding the planner considers on ``n`` devices: one device
    each, and whole or split over the k first of ``order`` (fastest first)."""
    out = [Holding("one", (d,)) for d in range(n)]
    for k in range(2, n + 1):
        members = tuple(sorted(order[:k]))
        out += [Holding("whole", members), Holding("split", members)]
    return out


@dataclass
class TailArc:
    """A tail group as the solver sees it (the fields of
    :class:`tilec.cost.model.Group` it reads)."""
    is_tail = True  # (not a field)
    entry_s = 0.0  # (not a field) a tail group's input is its predecessor's output: the image costs no time
    first: int
    last: int
    mode: str  # "one" | "channels"
    devices: tuple  # members, sorted
    seconds: float
    state: dict
    kept: dict  # held all step
    workspace: dict
    busy: dict
    layout_in: Holding
    layout_out: Holding
    recompute_seconds: float = 0.0
    phase: dict = field(default_factory=dict)  # held from its forward to the end of its backward (``tail_member_bytes``)
    grads: dict = field(default_factory=dict)  # the part of ``phase`` that its backward makes (output gradients)
    reads: dict = field(default_factory=dict)  # device -> {tensor: bytes} of its inputs (part of ``phase``)

    @property
    def members(self):
        return list(self.devices)

    @property
    def kept_recompute(self):  # a tail group never recomputes
        return self.kept

    @property
    def workspace_recompute(self):
        return self.workspace

    @property
    def busy_recompute(self):
        return dict.fromkeys(self.devices, 0.0)

    def choice(self):
        return TailChoice(self.first, self.last, self.mode, list(self.devices))


def pipeline(pieces, partial, reduce, after):
    """Seconds of sums computed in ``pieces`` slices (``partial`` seconds in
    all), each all-reduced in ``reduce`` seconds on the communication thread
    (one at a time, each once its slice is computed), each then followed on
    the computing thread by ``after`` / ``pieces`` seconds of work on it."""
    t = comm = 0.0
    ready = []
    for _ in range(pieces):
        t += partial / pieces
        comm = max(comm, t) + reduce
        ready.append(comm)
    for r in ready:
        t = max(t, r) + after / pieces
    return t


class TailPricer:
    """Prices tail groups and transitions of ``model`` (a
    :class:`tilec.cost.model.CostModel`), cached."""

    def __init__(self, model, order):
        self.model, self.program = model, model.program
        self.devices, self.n = model.devices, model.n
        self.batch, self.item = model.batch, model.itemsize
        self.order = list(order)
        self.readers = readers_of(self.program)
        self._arcs, self._moves, self._layers = {}, {}, {}

    # -- holdings ----------------------------------------------------------------------

    def members(self, k):
        return tuple(sorted(self.order[:k]))

    def holding_of(self, first, last, mode, devices, tensor):
        """How a group over program[first..last] holds its output ``tensor``."""
        if mode == "one":
            return Holding("one", tuple(devices))
        held = shards.layouts(self.program, first, last, len(devices))[tensor]
        return Holding("whole" if held is None else "split", tuple(devices))

    def _sources(self, tensor, held):
        """([(device, bytes)], replicated) of ``tensor`` held as ``held``: a
        :class:`Holding`, or the (rects, devices) of a tiled layout's tiles."""
        c, h, w = tensor_shape(self.program, tensor)
        per_cell = self.batch * c * self.item
        if not isinstance(held, Holding):
            rects, devs = held
            areas = (rects[:, 1] - rects[:, 0] + 1) * (rects[:, 3] - rects[:, 2] + 1)
            return [(int(d), float(a) * per_cell) for d, a in zip(devs, areas) if a > 0], False
        total = per_cell * h * w
        if held.kind == "one":
            return [(held.devices[0], total)], False
        if held.kind == "whole":
            return [(d, total) for d in held.devices], True
        bounds = shards.part_bounds(c, len(held.devices))
        return [(d, total * (bounds[m + 1] - bounds[m]) / c) for m, d in enumerate(held.devices)
                if bounds[m + 1] > bounds[m]], False

    def move(self, tensor, held, need, backward_staging=True):
        """(seconds, staging bytes per device) to get ``tensor`` from ``held`` to
        every device of ``need`` (a :class:`Holding` not split: a tail group
        needs its input whole) forward, and
        its gradient back; without ``backward_staging``, only the senders'
        forward staging (the receivers count their own)."""
        key = (tensor, held if isinstance(held, Holding) else (held[0].tobytes(), tuple(held[1])), need,
               backward_staging)
        if key not in self._moves:
            sources, replicated = self._sources(tensor, held)
            if relayed(sources, replicated, list(need.devices)):
                hops = self._relay_hops(tensor, sources[0], list(need.devices))
                same = [False, True]  # the holder's slices differ; a member relays one slice to all
                extra, back_same = [], [False, False]  # backward, each hop's gradients differ
            else:
                forward, extra = flows(sources, replicated, list(need.devices))
                fwd = np.zeros((self.n, self.n))
                for s, r, nbytes in forward:
                    fwd[s, r] += nbytes
                hops, same = [fwd], [True]  # a sender's part (or whole map) goes to each receiver alike
                # backward, a receiver returns the parts it took (they differ), or a replicated map's whole
                # gradient to each holder alike (``tilec_runtime.executor.staging_key``)
                back_same = [replicated]
            for hop in hops:
                np.fill_diagonal(hop, 0.0)  # a device's own part is a copy
            secs = sum(exchange_seconds(hop, self.devices) for hop in hops)
            # forward, one staging buffer per content (``tilec_runtime.executor.staging_key``)
            sent = sum(hop.max(axis=1) if alike else hop.sum(axis=1) for hop, alike in zip(hops, same))
            if tensor >= 0:  # the gradients come back the same ways in reverse
                back = [hop.T.copy() for hop in reversed(hops)]
                for s, r, nbytes in extra:
                    if s != r:
                        back[-1][s, r] += nbytes
                secs += sum(exchange_seconds(hop, self.devices) for hop in back)
                if backward_staging:
                    sent = sent + sum(hop.max(axis=1) if alike else hop.sum(axis=1)
                                      for hop, alike in zip(back, reversed(back_same)))
            self._moves[key] = (secs, {d: float(v) for d, v in enumerate(sent) if v > 0})
        return self._moves[key]

    def _relay_hops(self, tensor, source, receivers):
        """[bytes sender x receiver] of the two rounds of a relayed map
        (``tilec.analysis.tail.relayed``): each receiver's slice of channels
        from the holder, then from each receiver to the others."""
        holder, total = source
        c = tensor_shape(self.program, tensor)[0]
        bounds = shards.part_bounds(c, len(receivers))
        scatter, gather = np.zeros((self.n, self.n)), np.zeros((self.n, self.n))
        for j, r in enumerate(receivers):
            part = total * (bounds[j + 1] - bounds[j]) / c
            scatter[holder, r] += part
            for other in receivers:
                if other != r:
                    gather[r, other] += part
        return [scatter, gather]

    def transition(self, b, held, need):
        """(seconds, staging bytes per device) for a tail group starting at
        layer ``b`` from ``need`` to get layer b-1's output from ``held``
        (nothing if layer b does not read it)."""
        if b - 1 not in self.program[b]["inputs"]:
            return 0.0, {}
        if isinstance(held, Holding) and held == need:
            if held.kind == "whole":  # the members all-reduce the input's gradient (``reduce_input``), in place
                nbytes = self.batch * prod(tensor_shape(self.program, b - 1)) * self.item
                return gradient_allreduce_seconds(nbytes, list(held.devices), self.devices), {}
            return 0.0, {}
        return self.move(b - 1, held, need)

    # -- groups ------------------------------------------------------------------------

    def _layer(self, first, last, i, d, member, k):
        """(forward, backward) seconds of layer ``i`` on device ``d``, member
        ``member`` of ``k`` (k = 1: the whole layer)."""
        return tuple(self._part(first, last, i, d, member, k, direction) for direction in DIRECTIONS)

    def _part(self, first, last, i, d, member, k, direction, part="all"):
        """Seconds of ``part`` of layer ``i``'s share in ``direction`` on
        device ``d``, member ``member`` of ``k`` (k = 1: the whole layer;
        ``tilec.cost.compute.share_seconds``): all of it, an A layer's weight
        gradient (which overlaps the all-reduce of its input gradient), or
        the sums and the post of a B layer's slices or an A layer's after it."""
        key = (first if k > 1 else None, last if k > 1 else None, i, d, member, k, direction, part)
        if key not in self._layers:
            dev, layer = self.devices[d], self.program[i]
            if k == 1:
                share, role = layer, "A"
            else:
                share = shards.share(self.program, first, last, k, member, i)
                role = shards.roles(self.program, first, last)[i]
            self._layers[key] = share_seconds(dev.profile, layer, share, role, self.batch, self.item, direction,
                                              dev.compute_scale, dev.threads, part)
        return self._layers[key]

    def _forward(self, first, last, i, devices, roles, times):
        """(compute seconds, all-reduce seconds, the A layer priced with it or
        None) of layer ``i``'s forward in a group over ``devices`` (``times``:
        each member's (forward, backward) of it): a B layer's sums and then
        their all-reduce, or slice by slice, each summed on the communication
        thread while the next is computed, and the A layer after it summing
        each slice as soon as it is final."""
        k, b, item = len(devices), self.batch, self.item
        fwd = max(t[0] for t in times)
        if k == 1 or roles[i] != "B":
            return fwd, 0.0, None
        nbytes = b * prod(self.program[i]["out_shape"]) * item
        pieces = shards.forward_slices(self.program[i], b, item)
        if pieces == 1:
            return fwd, gradient_allreduce_seconds(nbytes, devices, self.devices), None

        def slowest(j, part):
            return max(self._part(first, last, j, d, m, k, "forward", part) for m, d in enumerate(devices))
        reduce = gradient_allreduce_seconds(nbytes / pieces, devices, self.devices)
        a = shards.takes_slices(roles, last, i)
        if a is None:
            return pipeline(pieces, slowest(i, "partial"), reduce, 0.0) + slowest(i, "post"), 0.0, None
        return (pipeline(pieces, slowest(i, "partial"), reduce, slowest(i, "post") + slowest(a, "partial"))
                + slowest(a, "post"), 0.0, a)

    def adopt(self, arc):
        """Cache ``arc``, priced by a copy of this pricer in another process
        (:mod:`tilec.cost.parallel`), as :meth:`arc` would have."""
        self._arcs.setdefault((arc.first, arc.last, arc.mode, tuple(arc.devices)), arc)

    def arc(self, first, last, mode, devices):
        """The :class:`TailArc` of program[first..last] on ``devices``."""
        key = (first, last, mode, tuple(devices))
        if key not in self._arcs:
            self._arcs[key] = self._price(first, last, mode, tuple(devices))
        return self._arcs[key]

    def _price(self, first, last, mode, devices):
        k = len(devices) if mode == "channels" else 1
        program, b, item = self.program, self.batch, self.item
        busy = dict.fromkeys(devices, 0.0)
        compute = collective = 0.0
        roles = shards.roles(program, first, last) if k > 1 else {}
        chained = set()  # A layers whose forward is priced with the sliced B before them
        for i in range(first, last + 1):
            times = [self._layer(first, last, i, d, m, k) for m, d in enumerate(devices)]
            for d, t in zip(devices, times):
                busy[d] += t[0] + t[1]
            if i not in chained:
                seconds, reduce, a = self._forward(first, last, i, devices, roles, times)
                compute, collective = compute + seconds, collective + reduce
                chained.add(a)  # (None when no A layer comes with it)
            if k > 1 and shards.reduces_input_grad(roles, first, i):
                # backward: the partial input gradient, then its all-reduce while the weight gradient is computed
                weights = [self._part(first, last, i, d, m, k, "backward", "weight") for m, d in enumerate(devices)]
                reduce = gradient_allreduce_seconds(b * prod(program[i]["in_shape"]) * item, devices, self.devices)
                compute += max(t[1] - w for t, w in zip(times, weights))
                collective += max(reduce, max(weights))
            else:
                compute += max(t[1] for t in times)
        state, kept, phase, grads, work, reads = {}, {}, {}, {}, {}, {}
        update = 0.0
        for m, d in enumerate(devices):
            dev = self.devices[d]
            part = tail_member_bytes(program, first, last, mode, k, m, b, item, dev.threads)
            state[d], kept[d], phase[d], work[d] = part["state"], part["kept"], part["phase"], part["workspace"]
            grads[d], reads[d] = part["grads"], part["reads"]
            update = max(update, update_seconds(dev.profile, part["params"], item, dev.compute_scale, dev.threads))
        # what a later layer other than the next reads (a route) goes to where it runs, priced here as if
        # to rank 0; its senders' staging counted as if to another device, since the chain does not know
        # where the reader runs (the receiver counts the gradients it sends back)
        to_rank0 = 0.0
        for t in range(first, last + 1):
            if self.readers.get(t, set()) - {t + 1}:
                held = self.holding_of(first, last, mode, devices, t)
                to_rank0 += self.move(t, held, Holding("one", (0,)), backward_staging=False)[0]
                sources, replicated = self._sources(t, held)
                for d, nbytes in sources[:1] if replicated else sources:
                    if d in kept:
                        kept[d] += nbytes
        # the gradients of what it reads from earlier than the layer before go back (staged by each
        # member: a channel group's leading route returns its inputs' partial gradients from every member)
        far = {j for layer in program[first:last + 1] for j in layer["inputs"] if 0 <= j < first - 1}
        for d in devices:
            kept[d] += sum(b * prod(tensor_shape(self.program, j)) * item for j in far)
        if first == 0:  # every member takes the whole image: those the launcher streams ahead (none if local)
            for d in devices:
                kept[d] += image_bytes(b * prod(tensor_shape(self.program, -1)), item, self.devices[d].shared)
        need = Holding("one" if mode == "one" else "whole", devices)
        seconds = compute + collective + update + to_rank0
        return TailArc(first, last, mode, devices, seconds, state, kept, work, busy, need,
                       self.holding_of(first, last, mode, devices, last), phase=phase, grads=grads, reads=reads)
