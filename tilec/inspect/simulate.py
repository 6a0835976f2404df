"""Replay a plan's schedule against device profiles: a discrete-event simulation.

Each device runs the operations of ``tilec_runtime.tiled.DeviceStep`` in
its order: receive a group's input pieces, compute each layer (a batch-norm
layer all-gathers its statistics with the group's other devices), send the
pieces of each output the plan routes elsewhere; rank 0 runs the tail; then
backward in reverse (gradient pieces, batch-norm sums, weight-gradient
all-reduces in key order: a ring for large gradients, as the socket runtime
does), and the SGD update of the parameters it holds.

Time model: compute from the profiles (:mod:`tilec.cost.compute`). A send
does not block the sender; it occupies the sender's outgoing link and the
receiver's incoming link (full duplex, each device on a switch port) for
bytes / bandwidth, and arrives one latency after its last byte. A receive
blocks until its message has arrived (that wait is the device's idle time).

Unlike the cost model (one number per group, sums of slowest devices), the
simulator lets devices run ahead of each other between synchronisations
and queues messages on links, so it is the finer prediction; the two are
compared in tests and in ``tilec simulate``.
"""
from dataclasses import dataclass, field

import numpy as np

from tilec.cost.compute import layer_seconds, update_seconds
from tilec.cost.memory import param_count
from tilec.errors import TilecError
from tilec_runtime.collectives import RING_MIN_BYTES, ring_chunks, use_ring
from tilec_runtime.program import param_shapes


class SimulationError(TilecError):
    """The plan's schedule cannot complete (a receive with no matching send)."""


@dataclass
class Event:
    device: int
    start: float
    end: float
    kind: str  # forward | backward | tail | update | wait | send
    label: str


@dataclass
class SimResult:
    step_s: float
    busy_s: list
    idle_s: list
    sent_bytes: list
    events: list = field(default_factory=list)


def _area(region):
    (r0, r1), (c0, c1) = region
    return (r1 - r0 + 1) * (c1 - c0 + 1)


def device_ops(plan, rank, cluster):
    """The operations of ``rank`` in one step: ("compute", seconds, kind, label),
    ("send", key, dst, bytes) or ("recv", key, src)."""
    program, batch = plan["program"], plan["batch"]
    item = np.dtype(plan["dtype"]).itemsize
    dev = cluster.devices[rank]
    msgs = list(enumerate(plan["messages"]))
    ops = []

    def compute(layer, positions, direction):
        return layer_seconds(dev.profile, layer, positions, batch, item, direction, dev.compute_scale)

    def sends(pred):
        for k, m in msgs:
            if m["sender"] == rank and pred(m):
                ops.append(("send", ("m", k), m["receiver"], m["bytes"]))

    def recvs(pred):
        for k, m in msgs:
            if m["receiver"] == rank and pred(m):
                ops.append(("recv", ("m", k), m["sender"]))

    def allgather(tag, members, nbytes):
        for other in members:
            if other != rank:
                ops.append(("send", ("c", tag, rank, other), other, nbytes))
        for other in members:
            if other != rank:
                ops.append(("recv", ("c", tag, other, rank), other))

    def ring(tag, members, shape):
        """``tilec_runtime.collectives.ring_allreduce``: 2 (n-1) rounds, one chunk to the successor each."""
        n = len(members)
        p = members.index(rank)
        succ, pred = members[(p + 1) % n], members[(p - 1) % n]
        chunks = [length * item for length in ring_chunks(shape, n)]
        for phase, start in (("rs", p), ("ag", p + 1)):
            for s in range(n - 1):
                out, c = (start - s) % n, (start - s - 1) % n
                ops.append(("send", ("r", tag, phase, out, rank), succ, chunks[out]))
                ops.append(("recv", ("r", tag, phase, c, pred), pred))

    sends(lambda m: m["phase"] == "forward" and m["tensor"] == -1)
    held = []
    groups = plan["groups"]
    for g, group in enumerate(groups):
        first, last = group["layers"]
        members = sorted(t["device"] for t in group["tiles"])
        tile = next((t for t in group["tiles"] if t["device"] == rank), None)
        if tile is None:
            continue
        held += program[first:last + 1]
        if group["kind"] == "tail":
            recvs(lambda m, g=g: m["phase"] == "forward" and m["group"] == g)
            secs = sum(compute(l, l["out_shape"][1] * l["out_shape"][2], "forward") for l in program[first:last + 1])
            ops.append(("compute", secs, "tail", f"tail {first}-{last} forward"))
            continue
        recvs(lambda m, g=g, t=first - 1: m["phase"] == "forward" and m["group"] == g and m["tensor"] == t)
        for tl in tile["layers"]:
            layer = program[tl["layer"]]
            ops.append(("compute", compute(layer, _area(tl["region"]), "forward"), "forward",
                        f"layer {tl['layer']} forward"))
            if layer["kind"] == "conv" and layer["bn"] and len(members) > 1:
                allgather(("bn", tl["layer"]), members, 8 * (2 * layer["filters"] + 1))
            sends(lambda m, i=tl["layer"]: m["phase"] == "forward" and m["tensor"] == i)
    for g in range(len(groups) - 1, -1, -1):
        group = groups[g]
        first, last = group["layers"]
        members = sorted(t["device"] for t in group["tiles"])
        tile = next((t for t in group["tiles"] if t["device"] == rank), None)
        if tile is None:
            continue
        if group["kind"] == "tail":
            secs = sum(compute(l, l["out_shape"][1] * l["out_shape"][2], "backward") for l in program[first:last + 1])
            ops.append(("compute", secs, "tail", f"tail {first}-{last} backward"))
            sends(lambda m, g=g: m["phase"] == "backward" and m["group"] == g)
            continue
        for tl in reversed(tile["layers"]):
            layer = program[tl["layer"]]
            recvs(lambda m, i=tl["layer"]: m["phase"] == "backward" and m["tensor"] == i)
            ops.append(("compute", compute(layer, _area(tl["region"]), "backward"), "backward",
                        f"layer {tl['layer']} backward"))
            if layer["kind"] == "conv" and layer["bn"] and len(members) > 1:
                allgather(("bng", tl["layer"]), members, 8 * 2 * layer["filters"])
        sends(lambda m, g=g, t=first - 1: m["phase"] == "backward" and m["group"] == g and m["tensor"] == t)
        if len(members) > 1:
            shapes = {k: s for layer in program[first:last + 1] for k, s in param_shapes(layer).items()
                      if ".bn." not in k}
            for key in sorted(shapes):
                nbytes = int(np.prod(shapes[key])) * item
                if use_ring(nbytes, len(members), RING_MIN_BYTES):
                    ring(("g", key), members, shapes[key])
                else:
                    allgather(("g", key), members, nbytes)
    if held:
        ops.append(("compute", update_seconds(dev.profile, param_count(held), item, dev.compute_scale),
                    "update", "SGD update"))
    return ops


def simulate(plan, cluster, keep_events=True):
    """A :class:`SimResult` of one training step of ``plan`` on ``cluster``."""
    n = len(plan["devices"])
    if len(cluster.devices) != n:
        raise SimulationError(f"the plan has {n} devices, the cluster {len(cluster.devices)}")
    ops = [device_ops(plan, r, cluster) for r in range(n)]
    pos, now = [0] * n, [0.0] * n
    busy, sent = [0.0] * n, [0] * n
    out_free, in_free = [0.0] * n, [0.0] * n
    arrived = {}
    events = []
    devs = cluster.devices
    while True:
        ready = []
        for r in range(n):
            if pos[r] < len(ops[r]):
                op = ops[r][pos[r]]
                if op[0] != "recv" or op[1] in arrived:
                    start = max(now[r], arrived[op[1]]) if op[0] == "recv" else now[r]
                    ready.append((start, r))
        if not ready:
            stuck = [r for r in range(n) if pos[r] < len(ops[r])]
            if stuck:
                r = stuck[0]
                raise SimulationError(f"device {r} waits for {ops[r][pos[r]][1]} that nobody sends "
                                      f"(the plan's schedule deadlocks)")
            break
        _, r = min(ready)
        op = ops[r][pos[r]]
        pos[r] += 1
        if op[0] == "compute":
            _, secs, kind, label = op
            if keep_events and secs > 0:
                events.append(Event(r, now[r], now[r] + secs, kind, label))
            now[r] += secs
            busy[r] += secs
        elif op[0] == "recv":
            t = arrived.pop(op[1])
            if t > now[r]:
                if keep_events:
                    events.append(Event(r, now[r], t, "wait", f"wait for {op[2]}"))
                now[r] = t
        else:
            _, key, dst, nbytes = op
            if dst == r or nbytes == 0:
                arrived[key] = now[r]
                continue
            wire = nbytes / min(devs[r].bandwidth_bps, devs[dst].bandwidth_bps)
            start = max(now[r], out_free[r], in_free[dst])
            out_free[r] = in_free[dst] = start + wire
            arrived[key] = start + wire + max(devs[r].latency_s, devs[dst].latency_s)
            sent[r] += nbytes
            if keep_events:
                events.append(Event(r, start, start + wire, "send", f"send {nbytes} B to {dst}"))
    step = max(now) if n else 0.0
    return SimResult(step, busy, [step - b for b in busy], sent, events)


KIND_COLOURS = {"forward": "#4c72b0", "backward": "#dd8452", "tail": "#55a868", "update": "#8172b3",
                "wait": "#dddddd", "send": "#c44e52"}


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
        else:
            ax.broken_barh([(ev.start, ev.end - ev.start)], (y - 0.25, 0.65), color=KIND_COLOURS[ev.kind])
    ax.set_yticks(range(n))
    ax.set_yticklabels(list(reversed(names)))
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(result.step_s, 1e-9))
    ax.set_title(title or f"simulated step: {result.step_s:.3f} s")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in KIND_COLOURS.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.22), ncol=len(KIND_COLOURS), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
