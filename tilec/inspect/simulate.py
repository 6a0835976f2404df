"""Replay a plan's schedule against device profiles: a discrete-event simulation.

Every rank runs the ops of its schedule (``plan["schedule"]``, the list the
runtime executes) in order, on a main thread, and its gradient buckets on a
communication thread, as the runtime does (``tilec_runtime.executor``):

- compute ops take the time of :mod:`tilec.cost.compute` for the tile's
  regions, on the device's threads (the profile's measured speed-up);
- a send does not block: it goes on the connection from sender to
  receiver (first in, first out), sharing the sender's outgoing and the
  receiver's incoming link fairly with the other connections sending at
  once (full duplex, each device on a switch port), and arrives one
  latency after its last byte; a message to the device itself is a memory
  copy, and so is an ``input`` (local workers read their pieces of the
  images from a file the launcher wrote, ``tilec_runtime.imagefile``);
- a receive blocks until its message has arrived (that wait is idle time);
- the batch-norm all-gathers send every member's contribution to every
  other member and wait for theirs; a channel group's all-reduces (the
  partial sums of a layer split by input channels, the partial input
  gradients of one split by output channels) go round a ring or are
  all-gathered, as the runtime runs them, on the main thread;
- ``grad_start`` hands a bucket to the communication thread, which runs its
  ring or all-gather rounds (the same bytes as the runtime's, from
  :mod:`tilec.cost.traffic`) and then its update; ``grad_wait`` waits for
  all of them;
- where a device's kernel threads take every core (``Device.message_cpu``),
  each message it sends or receives takes its CPU time (framing, MAC,
  copies) on the thread that sends or receives it, before the send and
  after the receive; the communication thread's is taken from the main
  thread's next compute op too (one core runs both).

Devices that compute side by side do not take a kernel's price every time:
a call runs faster or slower from one step to the next (a profile's
``jitter``, its standard deviation over its mean), and at every barrier
between devices (a batch-norm all-gather, a halo, an all-reduce) the faster
waits for the slower. Where the devices' profiles give a jitter and there
are several devices, the step time is the mean over ``JITTER_SAMPLES``
replays whose compute ops (the kernels, and the copies and updates beside
them, at the spread measured on the kernels) each take their price times a
lognormal draw of mean 1 and that spread (independent per op, in
antithetic pairs, seeded: the same plan gives the same prediction), scaled
to the op's length where the profile says how long the calls it was
measured on take (``jitter_call_ms``): times (that length / the op's) **
``JITTER_EXPONENT``, at most ``JITTER_SCALE_MAX`` times; busy
seconds and the timeline are those of the replay at the prices themselves
(``priced_s``). What the mean adds to that is mostly the waits at
barriers; where several messages would start on one link at the same
instant at the prices (the replay then takes them in device order), the
order the draws give them moves it too, either way (on plans whose links
bind, the mean can come out shorter than the step at the prices).

The result: the step time, every device's busy and idle seconds and bytes
sent, and the events of a timeline (a Gantt chart, or a Chrome trace in the
format ``tilec train --trace`` writes). Nothing here derives a schedule.
"""
from dataclasses import dataclass, field

import numpy as np

from tilec.cost import compute
from tilec.cost.compute import (RECOMPUTE_EXTRA, copy_seconds, layer_seconds, share_seconds, unit_seconds,
                                update_seconds, zero_seconds)
from tilec.cost.traffic import bn_bytes, param_shape_table
from tilec.errors import TilecError
from tilec_runtime import shards
from tilec_runtime.collectives import ring_chunks
from tilec_runtime.geometry import Region
from tilec_runtime.lower import outside_tensors, units
from tilec_runtime.program import members_of, message_shape


class SimulationError(TilecError):
    """The plan's schedule cannot complete (a receive with no matching send)."""


@dataclass
class Event:
    device: int
    start: float
    end: float
    kind: str  # forward | backward | tail | update | wait | send | transport
    label: str
    thread: int = 0  # 0: the schedule, 1: the communication thread


# replays whose mean prices the waits of jitter: tiny416 at batch 1 on two local workers whose calls vary by
# 12%, 4 ms of waits a step, the mean of 32 moves by 0.24% of the step from one seed to another
JITTER_SAMPLES = 32


# A call k times longer varies about k ** -0.25 as much: traced here (tiny416, two local workers, 25 steps),
# the log-log slope of the spread over the call's length was -0.15 to -0.23 within a step's kernels (0.5 to
# 50 ms) and -0.28 between batch 1 and 4 (14.2% on calls of 8 ms, 10.0% on 28 ms), not the -0.5 of noise
# independent from one instant to the next: the machine stays slow or fast for a while.
JITTER_EXPONENT = 0.25
JITTER_SCALE_MAX = 2.0  # (a call 16 times shorter than the measured ones: the dispatch's spread, not the kernel's)


@dataclass
class SimResult:
    step_s: float  # the expected step, jitter's waits included
    busy_s: list
    idle_s: list
    sent_bytes: list
    events: list = field(default_factory=list)
    priced_s: float = None  # the step with every op at its price (no jitter; the timeline's)


FORWARD = {"conv_fwd", "epi_fwd", "pool_fwd", "recompute"}


class OpPricer:
    """Seconds of the compute ops of a plan's schedule on its cluster."""

    def __init__(self, plan, cluster):
        self.plan, self.cluster = plan, cluster
        self.program, self.batch = plan["program"], plan["batch"]
        self.item = np.dtype(plan["dtype"]).itemsize
        self.outside = outside_tensors(plan)
        self._units = {}

    def device(self, rank):
        d = self.cluster.devices[rank]
        return d.profile, d.compute_scale, self.plan["devices"][rank]["threads"]

    def tile_units(self, g, rank):
        """[{op: seconds}] per unit of ``rank``'s tile of group ``g``."""
        key = (g, rank)
        if key not in self._units:
            group = self.plan["groups"][g]
            first, last = group["layers"]
            tile = next(t for t in group["tiles"] if t["device"] == rank)
            regions = {tl["layer"]: Region.of(tl["region"]) for tl in tile["layers"]}
            sizes = {layer: (r.height, r.width) for layer, r in regions.items()}
            profile, scale, threads = self.device(rank)
            self._units[key] = [
                unit_seconds(profile, self.program, u, sizes, j > 0 or first > 0, self.batch, self.item, threads,
                             scale)
                for j, u in enumerate(units(self.program, first, last, self.outside))]
        return self._units[key]

    def op(self, rank, op):
        """(seconds, event kind, label) of a compute op."""
        kind = op["op"]
        if kind in ("tail_fwd", "tail_bwd"):
            first, last = self.plan["groups"][op["group"]]["layers"]
            profile, scale, threads = self.device(rank)
            direction = "forward" if kind == "tail_fwd" else "backward"
            secs = sum(layer_seconds(profile, layer, layer["out_shape"][1] * layer["out_shape"][2], self.batch,
                                     self.item, direction, scale, threads) for layer in self.program[first:last + 1])
            return secs, "tail", f"tail {first}-{last} {direction}"
        if kind.startswith("chan_"):
            return self.channel_op(rank, op)
        if kind == "recompute":
            secs = sum(sec for unit in self.tile_units(op["group"], rank) for name, sec in unit.items()
                       if name in FORWARD or name == RECOMPUTE_EXTRA)
            return secs, "forward", f"group {op['group']} recompute"
        secs = self.tile_units(op["group"], rank)[op["unit"]][kind]
        if kind == "conv_fwd" and "rows" in op:
            tile = next(t for t in self.plan["groups"][op["group"]]["tiles"] if t["device"] == rank)
            first = self.plan["groups"][op["group"]]["layers"][0]
            conv = units(self.program, first, self.plan["groups"][op["group"]]["layers"][1], self.outside)[op["unit"]][0]
            height = Region.of(next(tl for tl in tile["layers"] if tl["layer"] == conv)["region"]).height
            secs *= (op["rows"][1] - op["rows"][0]) / height
        return secs, "forward" if kind in FORWARD else "backward", f"{kind} g{op['group']} u{op['unit']}"

    def channel_op(self, rank, op):
        """(seconds, kind, label) of a channel group's compute op on ``rank``."""
        group, i = self.plan["groups"][op["group"]], op["layer"]
        members = members_of(group)
        first, last = group["layers"]
        share = shards.share(self.program, first, last, len(members), members.index(rank), i)
        role = shards.roles(self.program, first, last)[i]
        profile, scale, threads = self.device(rank)
        kind = op["op"]
        direction = "backward" if kind in ("chan_bwd", "chan_post_bwd") else "forward"
        if kind in ("chan_post", "chan_post_bwd"):
            part = "post"
        elif kind == "chan_bwd" and "part" in op:  # an A layer's backward in parts: "input", "weight"
            part = op["part"]
        else:  # a B layer's sums (or a slice of them, or an A layer's over a slice of its input): no post
            part = "partial" if role == "B" or "slice" in op else "all"
        secs = share_seconds(profile, self.program[i], share, role, self.batch, self.item, direction, scale, threads,
                             part)
        if "slice" in op and kind == "chan_fwd":
            secs /= op["slices"]
        label = f"{op['op']} g{op['group']} layer {i}" + (f" {op['part']}" if "part" in op else "") + (
            f" slice {op['slice']}" if "slice" in op else "")
        return secs, "tail", label

    def update(self, rank, keys, shapes):
        profile, scale, threads = self.device(rank)
        n = sum(int(np.prod(shapes[k])) for k in keys)
        return update_seconds(profile, n, self.item, scale, threads)

    def zero(self, rank, keys, shapes):
        profile, scale, threads = self.device(rank)
        n = sum(int(np.prod(shapes[k])) for k in keys)
        return zero_seconds(profile, n, self.item, scale, threads)

    def copy(self, rank, nbytes):
        profile, scale, _ = self.device(rank)
        return copy_seconds(profile, nbytes, scale)


def _actions(plan, rank, pricer, shapes):
    """(main thread actions, communication thread actions) of ``rank``.

    Actions: ("compute", seconds, kind, label), ("send", key, dst, bytes),
    ("recv", key, src), ("post", bucket) / ("await", bucket) between the
    threads, ("done", bucket) / ("join", buckets) for ``grad_wait``."""
    main, comm = [], []
    messages, item = plan["messages"], np.dtype(plan["dtype"]).itemsize
    posted = []
    for i, op in enumerate(plan["schedule"][rank]):
        kind = op["op"]
        if kind in ("send", "recv"):
            m = messages[op["msg"]]
            if m["sender"] == m["receiver"]:
                if kind == "send":
                    main.append(("compute", pricer.copy(rank, _message_bytes(plan, m)), "update",
                                 f"copy message {op['msg']}"))
            elif kind == "send":
                main.append(("compute", pricer.copy(rank, m["bytes"]), "update", f"stage message {op['msg']}"))
                main.append(("send", ("m", op["msg"]), m["receiver"], m["bytes"]))
            else:
                main.append(("recv", ("m", op["msg"]), m["sender"]))
        elif kind == "input":  # its piece of the image, streamed ahead by the data source: landed
            m = messages[op["msg"]]
            main.append(("compute", pricer.copy(rank, _message_bytes(plan, m)), "update",
                         f"input message {op['msg']}"))
        elif kind in ("bn_stats", "bn_grad"):
            members = members_of(plan["groups"][op["group"]])
            nbytes = bn_bytes(kind, plan["program"][op["layer"]]["filters"])
            for other in members:
                if other != rank:
                    main.append(("send", ("c", kind, op["layer"], rank, other), other, nbytes))
            for other in members:
                if other != rank:
                    main.append(("recv", ("c", kind, op["layer"], other, rank), other))
        elif kind == "chan_reduce" and op.get("overlap"):  # on the communication thread, after what it has
            main.append(("post", _reduce_key(op)))
            comm += [("await", _reduce_key(op)), *_channel_reduce_actions(plan, op, rank, item),
                     ("done", _reduce_key(op))]
        elif kind == "chan_reduce":
            main += _channel_reduce_actions(plan, op, rank, item)
        elif kind == "chan_wait":
            main.append(("join", (_reduce_key(op),)))
        elif kind == "grad_start":
            bucket = plan["buckets"][op["bucket"]]
            update = pricer.update(rank, bucket["keys"], shapes)
            if not bucket["reduce"]:
                main.append(("compute", update, "update", f"update bucket {op['bucket']}"))
                continue
            main.append(("post", op["bucket"]))
            posted.append(op["bucket"])
            comm.append(("await", op["bucket"]))
            comm += _reduce_actions(bucket, op["bucket"], rank, shapes, item)
            comm.append(("compute", update, "update", f"update bucket {op['bucket']}"))
            comm.append(("done", op["bucket"]))
        elif kind == "grad_wait":
            main.append(("join", tuple(posted)))
        elif kind in ("scratch_release", "tail_free"):
            continue  # (the pages' next touch is not priced: 0.1% of such a step, ``tilec_runtime.pages``)
        elif kind == "grad_zero":  # the accumulators start at momentum * v: a pass over them
            keys = [k for b in plan["buckets"] if rank in b["members"] for k in b["keys"]]
            main.append(("compute", pricer.zero(rank, keys, shapes), "backward", "grad_zero"))
        else:
            main.append(("compute", *pricer.op(rank, op)))
    return main, comm


def _message_bytes(plan, m):
    """Bytes of message ``m``: what the plan says it sends, or, for a message
    to its own sender (which sends nothing), what it copies."""
    return m["bytes"] or int(np.prod(message_shape(plan["program"], m, plan["batch"]))) * np.dtype(plan["dtype"]).itemsize


def _reduce_key(op):
    """The key of a channel group's all-reduce (its ``chan_reduce`` and ``chan_wait``)."""
    return ("cr", op["group"], op["layer"], op["phase"], op.get("slice"))


def _channel_reduce_actions(plan, op, rank, item):
    """The rounds of a channel group's all-reduce (``RankExecutor._chan_reduce``)."""
    _, shape, members, ring = shards.op_reduce(plan, op)
    return _allreduce_actions(_reduce_key(op), shape, members, rank, item, ring)


def _allreduce_actions(key, shape, members, rank, item, ring):
    """Send and receive actions of one all-reduce of an array of ``shape``:
    round a ring (``ring``) or all-gathered (``tilec_runtime.collectives``)."""
    n, p = len(members), members.index(rank)
    succ, pred = members[(p + 1) % n], members[(p - 1) % n]
    out = []
    if ring:
        chunks = [length * item for length in ring_chunks(shape, n)]
        for phase, start in (("rs", p), ("ag", p + 1)):
            for s in range(n - 1):
                sent, got = (start - s) % n, (start - s - 1) % n
                out.append(("send", (*key, phase, sent, rank), succ, chunks[sent]))
                out.append(("recv", (*key, phase, got, pred), pred))
        return out
    nbytes = int(np.prod(shape)) * item
    for other in members:
        if other != rank:
            out.append(("send", (*key, rank, other), other, nbytes))
    for other in members:
        if other != rank:
            out.append(("recv", (*key, other, rank), other))
    return out


def _reduce_actions(bucket, b, rank, shapes, item):
    """The rounds ``tilec_runtime.collectives`` runs for a bucket's reduced keys."""
    out = []
    for key, algorithm in sorted(bucket["reduce"].items()):
        out += _allreduce_actions(("r", key), shapes[key], bucket["members"], rank, item, algorithm == "ring")
    return out


class _Links:
    """Messages on the wire, as TCP carries them: one connection per pair of
    devices, first in first out; each device's uplink and downlink shared
    fairly by the connections sending on them at once.

    A message joining a link where k others are under way gets 1/(k+1) of
    it while they last (it takes (k+1) times as long as alone, to first
    order), and delays each of them, and what waits behind them on their
    connections, by its own time alone. Messages are posted in time order
    (the simulation's event order), so no arrival already used is moved."""

    def __init__(self, devices, arrived):
        self.devices, self.arrived = devices, arrived
        self.flows = []  # [start, end, src, dst, key], in posting order

    def send(self, src, dst, nbytes, now, key):
        """(start, end) on the wire of ``nbytes`` from ``src`` to ``dst``
        posted at ``now``; its arrival (and those it delays) in ``arrived``."""
        d = self.devices
        latency = max(d[src].latency_s, d[dst].latency_s)
        self.flows = [f for f in self.flows if f[1] > now]
        queued = [f[1] for f in self.flows if (f[2], f[3]) == (src, dst)]
        begin = max([now] + queued)
        sharing = [f for f in self.flows if f[0] <= begin < f[1] and (f[2] == src or f[3] == dst)]
        k = max(sum(f[2] == src for f in sharing), sum(f[3] == dst for f in sharing))
        alone = nbytes / min(d[src].bandwidth_bps, d[dst].bandwidth_bps)
        end = begin + alone * (k + 1)
        delayed = {(f[2], f[3]) for f in sharing}
        for f in self.flows:
            if (f[2], f[3]) in delayed and f[1] > begin:
                f[1] += alone
                if f[0] > begin:
                    f[0] += alone
                if f[4] in self.arrived:  # (not yet received: see above)
                    self.arrived[f[4]] += alone
        self.flows.append([begin, end, src, dst, key])
        self.arrived[key] = end + latency
        return begin, end


def simulate(plan, cluster, keep_events=True, samples=JITTER_SAMPLES):
    """A :class:`SimResult` of one training step of ``plan`` on ``cluster``
    (``tilec.cluster.plan_cluster``: the cluster the plan carries); with
    several devices of some jitter, its step the mean of ``samples``
    replays of jittered ops, in pairs (an odd count rounded down; 0: none;
    the module's docstring)."""
    n = len(plan["devices"])
    if len(cluster.devices) != n:
        raise SimulationError(f"the plan has {n} devices, the cluster {len(cluster.devices)}")
    pricer, shapes = OpPricer(plan, cluster), param_shape_table(plan["program"])
    actors = []  # (rank, thread, actions)
    for r in range(n):
        main, comm = _actions(plan, r, pricer, shapes)
        actors += [(r, 0, main), (r, 1, comm)]
    result = _replay(actors, n, cluster, keep_events)
    result.priced_s = result.step_s
    spread = [(d.profile.jitter, d.profile.jitter_call_s) for d in cluster.devices]
    if n > 1 and samples >= 2 and any(s for s, _ in spread):
        rng, steps = np.random.default_rng(0), []
        for _ in range(samples // 2):
            # antithetic pairs: a draw and its mirror, whose ops' sums cancel to first order, so that what
            # the mean keeps is the waits (a mean of independent draws was off by as much as it measured)
            normals = [rng.standard_normal(len(actions)) for _, _, actions in actors]
            for sign in (1.0, -1.0):
                steps.append(_replay(_jittered(actors, spread, [sign * z for z in normals]), n, cluster,
                                     False).step_s)
        result.step_s = float(np.mean(steps))
        result.idle_s = [result.step_s - b for b in result.busy_s]
    return result


def op_spread(jitter, call_s, seconds):
    """The spread of an op of ``seconds`` on a device whose calls of
    ``call_s`` vary by ``jitter`` (``call_s`` 0: ``jitter`` at every length)."""
    if not call_s or seconds <= 0:
        return jitter
    return jitter * min(JITTER_SCALE_MAX, (call_s / seconds) ** JITTER_EXPONENT)


def _jittered(actors, spread, normals):
    """``actors`` with every compute op's seconds times a lognormal draw of
    mean 1 and standard deviation ``op_spread(*spread[rank], seconds)``
    (never negative), from ``normals`` (standard normal, one per action of
    each actor)."""
    out = []
    for (rank, thread, actions), z in zip(actors, normals):
        jitter, call_s = spread[rank]
        compute = [a[1] for a in actions if a[0] == "compute"]
        # the compute ops take the normals in their order, whatever lies between them (as ever: the same draws)
        sigma = np.sqrt(np.log1p(np.array([op_spread(jitter, call_s, t) for t in compute]) ** 2))
        draws = iter(np.exp(sigma * z[:len(compute)] - sigma ** 2 / 2))
        out.append((rank, thread, [(a[0], a[1] * next(draws), *a[2:]) if a[0] == "compute" else a
                                   for a in actions]))
    return out


def _replay(actors, n, cluster, keep_events):
    """The discrete-event replay of ``actors`` ((rank, thread, actions)) on ``cluster``."""
    pos, now = [0] * len(actors), [0.0] * len(actors)
    busy, sent = [0.0] * n, [0] * n
    arrived, posted, done = {}, {}, {}
    links = _Links(cluster.devices, arrived)
    events = []
    sizes = {}  # key -> bytes of a message under way
    owed = [0.0] * n  # the communication thread's transport CPU the main thread has yet to give up
    cpu = [d.message_cpu for d in cluster.devices]

    def transport(a, rank, thread, nbytes, label):
        per_message, per_byte = cpu[rank]
        secs = per_message + nbytes * per_byte
        if secs <= 0:
            return
        if keep_events:
            events.append(Event(rank, now[a], now[a] + secs, "transport", label, thread))
        now[a] += secs
        busy[rank] += secs
        if thread:
            owed[rank] += secs

    def ready_at(a):
        """When actor ``a`` can run its next action, or None if it is blocked."""
        rank, thread, actions = actors[a]
        act = actions[pos[a]]
        kind = act[0]
        if kind == "recv":
            return max(now[a], arrived[act[1]]) if act[1] in arrived else None
        if kind == "await":
            return max(now[a], posted[(rank, act[1])]) if (rank, act[1]) in posted else None
        if kind == "join":
            if all((rank, b) in done for b in act[1]):
                return max([now[a]] + [done[(rank, b)] for b in act[1]])
            return None
        return now[a]

    while True:
        ready = []
        for a, (_, _, actions) in enumerate(actors):
            if pos[a] < len(actions):
                t = ready_at(a)
                if t is not None:
                    ready.append((t, a))
        if not ready:
            stuck = [a for a, (_, _, acts) in enumerate(actors) if pos[a] < len(acts)]
            if stuck:
                rank, thread, acts = actors[stuck[0]]
                raise SimulationError(f"device {rank} waits for {acts[pos[stuck[0]]]} that never comes "
                                      f"(the plan's schedule deadlocks)")
            break
        start, a = min(ready)
        rank, thread, actions = actors[a]
        act = actions[pos[a]]
        pos[a] += 1
        kind = act[0]
        if start > now[a] and keep_events and kind in ("recv", "join"):
            events.append(Event(rank, now[a], start, "wait", f"wait ({act[1]})", thread))
        now[a] = start
        if kind == "compute":
            _, secs, what, label = act
            if thread == 0 and owed[rank]:
                if keep_events:
                    events.append(Event(rank, now[a], now[a] + owed[rank], "transport",
                                        "the communication thread's messages", thread))
                now[a] += owed[rank]
                owed[rank] = 0.0
            if keep_events and secs > 0:
                events.append(Event(rank, now[a], now[a] + secs, what, label, thread))
            now[a] += secs
            busy[rank] += secs
        elif kind == "recv":
            arrived.pop(act[1])
            transport(a, rank, thread, sizes.pop(act[1]), f"receive ({act[1]})")
        elif kind == "post":
            posted[(rank, act[1])] = now[a]
        elif kind == "done":
            done[(rank, act[1])] = now[a]
        elif kind == "send":
            _, key, dst, nbytes = act
            transport(a, rank, thread, nbytes, f"send {nbytes} B to {dst}")
            sizes[key] = nbytes
            begin, end = links.send(rank, dst, nbytes, now[a], key)
            sent[rank] += nbytes
            if keep_events:
                events.append(Event(rank, begin, end, "send", f"send {nbytes} B to {dst}", thread))
    step = max(now) if now else 0.0
    return SimResult(step, busy, [step - b for b in busy], sent, events)


def one_core_seconds(plan, cluster):
    """The whole step on one core of the first device's board (the paper's
    baseline): every layer on whole maps, one thread, no communication."""
    return compute.one_core_seconds(cluster.devices[0].profile, plan["program"], plan["batch"],
                                    np.dtype(plan["dtype"]).itemsize)


KIND_COLOURS = {"forward": "#4c72b0", "backward": "#dd8452", "tail": "#55a868", "update": "#8172b3",
                "wait": "#dddddd", "send": "#c44e52", "transport": "#937860"}


def trace_steps(result, names):
    """The simulated step as ``tilec_runtime.trace.chrome_trace`` input."""
    steps = {}
    for ev in result.events:
        steps.setdefault(ev.device, []).append([ev.label, ev.kind, round(ev.start * 1e6, 1),
                                                round((ev.end - ev.start) * 1e6, 1), ev.thread])
    return [(0, rank, 0.0, steps.get(rank, [])) for rank in range(len(names))]


def timeline_png(result, names, path, title=""):
    """Draw a Gantt chart of ``result`` (one row per device, sends on a thin lane below) to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(names)
    fig, ax = plt.subplots(figsize=(12, 0.7 * n + 1.9))
    for ev in result.events:
        y = n - 1 - ev.device
        if ev.kind == "send":
            ax.broken_barh([(ev.start, ev.end - ev.start)], (y - 0.45, 0.15), color=KIND_COLOURS["send"])
        elif ev.thread == 0:
            ax.broken_barh([(ev.start, ev.end - ev.start)], (y - 0.25, 0.65), color=KIND_COLOURS[ev.kind])
    ax.set_yticks(range(n))
    ax.set_yticklabels(list(reversed(names)))
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(result.priced_s or result.step_s, 1e-9))  # (the events are the replay at the prices)
    ax.set_title(title or f"simulated step: {result.step_s:.3f} s")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in KIND_COLOURS.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.22), ncol=len(KIND_COLOURS), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
