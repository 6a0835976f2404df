"""The predicted time and memory of a training step, group by group.

A step runs the tiled groups forward in order, then the tail groups (on
one device or split by channels: :mod:`tilec.cost.tail`), then everything
backward in reverse. Inside a group every batch-norm layer is a
barrier (its statistics are all-reduced), so a group takes, per layer, its
slowest device, forward and backward:

    group = sum_layers max_dev fwd + sum_layers max_dev bwd
          + batch-norm all-gathers + weight-gradient all-reduces
          + the slowest member's SGD update
          (+ sum_layers max_dev fwd again when it recomputes)

A group is charged for *receiving its input* (forward, and the partial
gradients going back), in two stages that keep the model additive: a
*transition* moves the previous group's output tiles to this group's
layout on the same map (nothing moves when consecutive groups share a
layout, the usual case), then the group's *entry* brings each tile the halo
around its part from its neighbours. The entry depends on the group alone,
the transition on the two layouts at the boundary alone (see
:mod:`tilec.cost.candidates`). A group without a layout is charged the
exact direct exchange instead. A group that computes a layer the tail reads
is charged for sending its owned cells to rank 0.

Step = sum of group times and entries + the tail groups' times and the
moves between them. Per-device memory: see :mod:`tilec.cost.memory` and :mod:`tilec_runtime.footprint`.
"""
from dataclasses import dataclass, field

import numpy as np

from tilec.analysis.regions import axis_regions, length, window_of
from tilec.analysis.tiles import spatial_prefix
from tilec.cost.comm import allgather_seconds, exchange_seconds, gradient_allreduce_seconds
from tilec.cost.compute import RECOMPUTE_EXTRA, one_core_seconds, unit_seconds, update_seconds
from tilec.cost.traffic import bn_bytes
from tilec_runtime.footprint import (early_bytes, image_bytes, param_count, state_bytes, tail_early, tail_peak,
                                     tile_own_bytes, tiles_and_tail)
from tilec_runtime.lower import scratch_bytes, tile_memory, units
from tilec_runtime.program import param_shapes

FORWARD_OPS = ("conv_fwd", "epi_fwd", "pool_fwd")


@dataclass
class Group:
    """One way of running program[first..last]: split lines and tile devices."""
    is_tail = False  # (not a field) tiled groups and tail groups share the solver's lists
    first: int
    last: int
    row_splits: list
    col_splits: list
    devices: tuple  # device of each tile, row-major
    seconds: float  # keep: compute + collectives + update + sends to the tail
    recompute_seconds: float  # extra when it recomputes
    state: dict  # device -> bytes
    kept: dict  # device -> bytes kept for backward (keep)
    kept_recompute: dict  # device -> bytes kept (recompute: the input region)
    workspace: dict  # device -> bytes (keep)
    workspace_recompute: dict
    busy: dict  # device -> compute seconds (keep)
    busy_recompute: dict  # device -> extra compute seconds
    input_rects: np.ndarray  # (tiles, 4): r0, r1, c0, c1 of each tile's input region
    out_rects: np.ndarray  # (tiles, 4): each tile's output rows and columns
    parts: dict = field(default_factory=dict)  # seconds by kind, for reports
    layout: object = None  # the Layout it came from, if any
    home_rects: np.ndarray = None  # its layout's tiles on the input map (None: no layout, or first group)
    entry_s: float = 0.0  # receiving the halo from its home tiles (none for the image: streamed ahead)

    @property
    def members(self):
        return sorted(self.devices)

    @property
    def phase(self):  # (a tail group's bytes held only while the tail runs: a tile has none)
        return {}

    @property
    def grads(self):
        return {}


@dataclass
class Prediction:
    step_s: float
    busy_s: list  # per device: compute seconds
    memory: list  # per device: peak bytes
    breakdown: list  # per device: {"overhead", "state", "kept", "workspace"} bytes
    group_s: list  # per tiled group: seconds including its entry
    tail_s: float  # the tail groups, their inputs included
    tail: list = field(default_factory=list)  # per tail group: {"layers", "mode", "devices", "seconds"}

    def to_json(self, names):
        return {"step_s": round(self.step_s, 6), "tail_s": round(self.tail_s, 6),
                "group_s": [round(t, 6) for t in self.group_s],
                "tail": [dict(t, seconds=round(t["seconds"], 6)) for t in self.tail],
                "per_device": [{"name": n, "compute_s": round(b, 6), "memory_bytes": int(m),
                                **{k: int(v) for k, v in parts.items()}}
                               for n, b, m, parts in zip(names, self.busy_s, self.memory, self.breakdown)]}


def _rects(pairs):
    return np.array([[r[0], r[1], c[0], c[1]] for r, c in pairs], dtype=np.int64).reshape(-1, 4)


def overlap_areas(src, dst):
    """(len(src), len(dst)) areas of the intersections of two lists of rects."""
    r = np.minimum(src[:, None, 1], dst[None, :, 1]) - np.maximum(src[:, None, 0], dst[None, :, 0]) + 1
    c = np.minimum(src[:, None, 3], dst[None, :, 3]) - np.maximum(src[:, None, 2], dst[None, :, 2]) + 1
    return np.clip(r, 0, None) * np.clip(c, 0, None)


class CostModel:
    """Prices groups and whole steps of ``program`` on ``cluster``.

    ``prefix``: the number of leading layers that are tiled (default: the
    whole spatial prefix); the rest is the tail on rank 0.
    """

    def __init__(self, program, cluster, batch, itemsize, prefix=None):
        self.program, self.cluster, self.batch, self.itemsize = program, cluster, batch, itemsize
        self.devices = cluster.devices
        self.n = len(self.devices)
        full = spatial_prefix(program)
        self.prefix = full if prefix is None else max(0, min(prefix, full))
        # what the tail reads of the tiled prefix other than its last layer goes to rank 0
        # (route, reorg and the losses run there); a conv whose output it reads keeps it: no fused max-pool
        self.tail_reads = sorted({j for layer in program[self.prefix:] for j in layer["inputs"]
                                  if j < self.prefix and j != layer["index"] - 1})
        self.outside = set(self.tail_reads) | ({self.prefix - 1} if self.prefix else set())
        self._tail_pricer = None
        self._groups, self._axes, self._memory, self._units, self._sync = {}, {}, {}, {}, {}

    # -- units of a tile, priced as the schedule runs them ----------------------

    def unit_times(self, first, last, d, sizes):
        """[{op: seconds}] of the units of program[first..last] on device ``d``
        for a tile with a (rows, cols) output ``sizes[layer]``
        (:func:`tilec.cost.compute.unit_seconds`, as the simulator prices them)."""
        dev = self.devices[d]
        out = []
        for j, u in enumerate(units(self.program, first, last, self.outside)):
            # many candidate groups share a unit of the same size on the same kind of device
            key = (u, tuple(sizes[t] for t in u if t is not None), j > 0 or first > 0, id(dev.profile),
                   dev.threads, dev.compute_scale)
            if key not in self._units:
                self._units[key] = unit_seconds(dev.profile, self.program, u, sizes, key[2], self.batch,
                                                self.itemsize, dev.threads, dev.compute_scale)
            out.append(self._units[key])
        return out

    # -- the tail ------------------------------------------------------------------

    @property
    def tail_pricer(self):
        """The :class:`tilec.cost.tail.TailPricer` of this model (channel groups over the fastest devices)."""
        if self._tail_pricer is None:
            from tilec.cost.layouts import device_speeds
            from tilec.cost.tail import TailPricer
            speed = device_speeds(self.cluster)
            self._tail_pricer = TailPricer(self, sorted(range(self.n), key=lambda d: (-speed[d], d)))
        return self._tail_pricer

    def tail_arcs(self, choices):
        """The priced tail groups of ``choices`` (:class:`tilec.plan.tail.TailChoice`)."""
        return [self.tail_pricer.arc(c.first, c.last, c.mode, tuple(sorted(c.devices))) for c in choices]

    def tail_transition(self, prev, arc):
        """(seconds, staging bytes per device) for tail group ``arc`` to get its
        input from ``prev`` (a tiled :class:`Group`, a
        :class:`tilec.cost.tail.TailArc`, or None: the image)."""
        if prev is None:
            return arc.entry_s, {}
        held = prev.layout_out if prev.is_tail else (prev.out_rects, prev.devices)
        return self.tail_pricer.transition(arc.first, held, arc.layout_in)

    # -- one group -----------------------------------------------------------------

    def group(self, first, last, row_splits, col_splits, devices, layout=None):
        """The :class:`Group` of program[first..last] split as given (cached)."""
        key = (first, last, tuple(row_splits), tuple(col_splits), tuple(devices))
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = self._price(first, last, list(row_splits), list(col_splits), tuple(devices))
            g.layout = layout
            if first == 0:
                # each tile's pieces of the image the launcher streams ahead (none where it reads them)
                channels = self.program[0]["in_shape"][0]
                for (r0, r1, c0, c1), d in zip(g.input_rects.tolist(), g.devices):
                    piece = image_bytes(self.batch * channels * (r1 - r0 + 1) * (c1 - c0 + 1), self.itemsize,
                                        self.devices[d].shared)
                    g.kept[d] += piece
                    g.kept_recompute[d] += piece
            elif layout is not None:
                g.home_rects = self.layout_rects(layout, first - 1)
                if g.home_rects is not None:
                    # the halo, and its staging buffers on the devices of this layout
                    g.entry_s, stage = self.redistribute(first, g.home_rects, layout.devices, g.input_rects, g.devices)
                    for d, nbytes in stage.items():
                        if d in g.kept:
                            g.kept[d] += nbytes
                            g.kept_recompute[d] += nbytes
        return g

    def adopt(self, g):
        """Cache group ``g``, priced by a copy of this model in another process
        (:mod:`tilec.cost.parallel`), as :meth:`group` would have."""
        self._groups.setdefault((g.first, g.last, tuple(g.row_splits), tuple(g.col_splits), tuple(g.devices)), g)

    def layout_rects(self, layout, tensor):
        """(tiles, 4) rects of ``layout`` on the output map of layer ``tensor``, or None if it does not fit."""
        _, h, w = self.program[tensor]["out_shape"]
        splits = layout.splits(h, w)
        if splits is None:
            return None
        rows, cols = splits
        return _rects(((rows[i], rows[i + 1] - 1), (cols[j], cols[j + 1] - 1))
                      for i in range(len(rows) - 1) for j in range(len(cols) - 1))

    def _axis(self, first, last, splits, axis):
        """Per-tile, per-layer ranges of a group along one axis (cached: many
        layouts share their row or column split lines)."""
        key = (first, last, tuple(splits), axis)
        if key not in self._axes:
            windows = [window_of(layer, axis) for layer in self.program[first:last + 1]]
            self._axes[key] = axis_regions(windows, list(splits))
        return self._axes[key]

    def _tile_memory(self, first, last, sizes, in_size, d):
        """{recompute: (bytes a tile keeps all step, bytes of the device's
        scratch it needs)}: the runtime's own memory plan
        (``tilec_runtime.lower.tile_memory``)."""
        threads = self.devices[d].threads
        key = (first, last, tuple(sorted(sizes.items())), in_size, threads)
        if key not in self._memory:
            item = self.itemsize
            self._memory[key] = {rec: (tile_own_bytes(m, self.batch, item), scratch_bytes(m, item))
                                 for rec, m in tile_memory(self.program, first, last, self.outside, sizes, in_size,
                                                           self.batch, threads).items()}
        return self._memory[key]

    def _price(self, first, last, row_splits, col_splits, devices):
        program = self.program
        rows, row_in = self._axis(first, last, row_splits, 1)
        cols, col_in = self._axis(first, last, col_splits, 2)
        cells = [(i, j) for i in range(len(rows)) for j in range(len(cols))]  # tiles, row-major
        if len(cells) != len(devices):
            raise ValueError(f"{len(cells)} tiles for {len(devices)} devices")
        members = sorted(set(devices))
        busy = dict.fromkeys(members, 0.0)
        busy_rec = dict.fromkeys(members, 0.0)
        fwd_s = bwd_s = rec_s = 0.0
        kept, kept_rec, ws, ws_rec = {}, {}, {}, {}
        # per tile: its units' op times (the schedule's stages), and the runtime's memory plan of it
        tile_units = []
        for (i, j), d in zip(cells, devices):
            sizes = {layer["index"]: (length(rows[i][k].region), length(cols[j][k].region))
                     for k, layer in enumerate(program[first:last + 1])}
            tile_units.append(self.unit_times(first, last, d, sizes))
            in_size = (length(row_in[i]), length(col_in[j]))
            memory = self._tile_memory(first, last, sizes, in_size, d)
            kept[d], ws[d] = memory[False]
            kept_rec[d], ws_rec[d] = memory[True]
        # a split group synchronises every batch-norm layer: each unit takes its slowest tile
        for u in range(len(tile_units[0])):
            f = [sum(t for op, t in tu[u].items() if op in FORWARD_OPS) for tu in tile_units]
            bw = [sum(t for op, t in tu[u].items() if op not in FORWARD_OPS and op != RECOMPUTE_EXTRA)
                  for tu in tile_units]
            extra = [tu[u].get(RECOMPUTE_EXTRA, 0.0) for tu in tile_units]
            fwd_s += max(f)
            bwd_s += max(bw)
            rec_s += max(a + b for a, b in zip(f, extra))
            for d, tf, tb, te in zip(devices, f, bw, extra):
                busy[d] += tf + tb
                busy_rec[d] += tf + te
        bn_s, grad_s, upd, state = self._collectives(first, last, tuple(members))
        tail_send, stage = self._tail_sends(first, last, rows, cols, cells, devices)
        for d, nbytes in stage.items():
            if d in kept:
                kept[d] += nbytes
                kept_rec[d] += nbytes
        seconds = fwd_s + bwd_s + bn_s + grad_s + upd + tail_send
        return Group(
            first, last, row_splits, col_splits, devices, seconds, rec_s,
            state={d: state for d in members},
            kept=kept, kept_recompute=kept_rec, workspace=ws, workspace_recompute=ws_rec,
            busy=busy, busy_recompute=busy_rec,
            input_rects=_rects((row_in[i], col_in[j]) for i, j in cells),
            out_rects=_rects((rows[i][-1].region, cols[j][-1].region) for i, j in cells),
            parts={"forward": fwd_s, "backward": bwd_s, "batchnorm": bn_s, "gradients": grad_s, "update": upd,
                   "to_tail": tail_send})

    def _collectives(self, first, last, members):
        """(batch-norm seconds, weight-gradient seconds, update seconds, state
        bytes) of program[first..last] on ``members``: the same for every
        layout over the same devices (cached)."""
        key = (first, last, members)
        if key not in self._sync:
            item, bn_s, grad_s = self.itemsize, 0.0, 0.0
            if len(members) > 1:
                for layer in self.program[first:last + 1]:
                    if layer["kind"] == "conv" and layer["bn"]:
                        c = layer["filters"]
                        bn_s += allgather_seconds(bn_bytes("bn_stats", c), members, self.devices)
                        bn_s += allgather_seconds(bn_bytes("bn_grad", c), members, self.devices)
                    for k, shape in param_shapes(layer).items():
                        if ".bn." not in k:
                            grad_s += gradient_allreduce_seconds(int(np.prod(shape)) * item, members, self.devices)
            layers = self.program[first:last + 1]
            n_params = param_count(layers)
            upd = max(update_seconds(self.devices[d].profile, n_params, item, self.devices[d].compute_scale,
                                     self.devices[d].threads) for d in members)
            self._sync[key] = (bn_s, grad_s, upd, state_bytes(layers, item))
        return self._sync[key]

    def _tail_sends(self, first, last, rows, cols, cells, devices):
        """(seconds, staging bytes per device) to send the owned cells of the
        layers the tail reads to rank 0, and their gradients back."""
        total, stage = 0.0, {}
        for t in self.tail_reads:
            if not first <= t <= last:
                continue
            k = t - first
            c = self.program[t]["out_shape"][0]
            m = np.zeros((self.n, self.n))
            for (i, j), d in zip(cells, devices):
                m[d, 0] += length(rows[i][k].owned) * length(cols[j][k].owned) * c * self.batch * self.itemsize
            total += 2 * exchange_seconds(m, self.devices)
            # every tile stages its part, rank 0's included: the reader (a route, a loss) may run on any
            # device, which the chain does not know here (the reader counts the gradients it returns)
            for d, nbytes in enumerate(m.sum(axis=1)):
                if nbytes:
                    stage[d] = stage.get(d, 0) + float(nbytes)
        return total, stage

    # -- boundaries ------------------------------------------------------------------

    def redistribute_bytes(self, b, src_rects, src_devices, dst_rects, dst_devices):
        """(devices, devices) bytes each device sends each other one to move the
        input map of layer ``b`` from tiles ``src`` to regions ``dst`` (forward)."""
        unit = self.program[b]["in_shape"][0] * self.batch * self.itemsize
        areas = overlap_areas(src_rects, dst_rects) * unit
        pairs = np.add.outer(np.asarray(src_devices) * self.n, np.asarray(dst_devices))
        return np.bincount(pairs.ravel(), weights=areas.ravel(), minlength=self.n * self.n).reshape(self.n, self.n)

    def redistribute(self, b, src_rects, src_devices, dst_rects, dst_devices):
        """(seconds, {device: staging bytes}) of :meth:`redistribute_bytes`,
        forward and the gradients back: the image (b = 0) is never
        redistributed, the launcher streams each device its pieces ahead."""
        m = self.redistribute_bytes(b, src_rects, src_devices, dst_rects, dst_devices)
        return 2 * exchange_seconds(m, self.devices), staging(m)

    def boundary(self, prev, g):
        """(seconds, {device: staging bytes}) tiled group ``g`` pays at the
        boundary after ``prev`` (None: the image): the transition to its
        layout, and its entry (its halo's staging is counted in ``g``)."""
        if prev is None:
            return g.entry_s, {}
        if g.home_rects is None:
            secs, stage = self.redistribute(g.first, prev.out_rects, prev.devices, g.input_rects, g.devices)
        else:
            secs, stage = self.redistribute(g.first, prev.out_rects, prev.devices, g.home_rects, g.layout.devices)
            secs += g.entry_s
        return secs, stage

    # -- a whole step ----------------------------------------------------------------

    def evaluate(self, choices):
        """:class:`Prediction` of a step: ``choices`` is [(Group or TailArc,
        recompute)] in layer order, from layer 0; where they end before the
        program does, the rest runs on rank 0 (``one_device_tail``)."""
        from tilec.analysis.tail import one_device_tail
        end = choices[-1][0].last + 1 if choices else 0
        if end < len(self.program):
            choices = list(choices) + [(arc, False) for arc in self.tail_arcs(one_device_tail(self.program, end))]
        n = self.n
        busy = [0.0] * n
        state, kept, ws = [0] * n, [0] * n, [0] * n
        parts = [[] for _ in range(n)]  # per device, its tail groups' (phase, grads, workspace) in order
        group_s, tail = [], []
        prev = None
        cut = next((g.first for g, _ in choices if g.is_tail), len(self.program))  # where the tiles end
        for g, rec in choices:
            if g.is_tail:
                entry, stage = self.tail_transition(prev, g)
                tail.append({"layers": [g.first, g.last], "mode": g.mode, "devices": list(g.devices),
                             "seconds": entry + g.seconds})
            else:
                entry, stage = self.boundary(prev, g)
                group_s.append(entry + g.seconds + (g.recompute_seconds if rec else 0.0))
            for d, nbytes in stage.items():
                kept[d] += nbytes
            for d in g.members:
                busy[d] += g.busy[d] + (g.busy_recompute[d] if rec else 0.0)
                state[d] += g.state[d]
                kept[d] += (g.kept_recompute if rec else g.kept)[d]
                if g.is_tail:
                    parts[d].append((g.phase.get(d, 0), g.grads.get(d, 0), g.workspace[d],
                                     early_bytes(g.reads.get(d, {}), cut)))
                else:
                    ws[d] = max(ws[d], (g.workspace_recompute if rec else g.workspace)[d])
            prev = g
        # the tiles' scratch and what the tail holds while it runs: one at a time where the device gives the
        # scratch back (``tilec.plan.build.releasing``), else both
        breakdown = [{"overhead": dev.profile.process_overhead_bytes, "state": s, "kept": k,
                      "workspace": tiles_and_tail(w, tail_peak(p), tail_early(p))}
                     for dev, s, k, w, p in zip(self.devices, state, kept, ws, parts)]
        memory = [sum(p.values()) for p in breakdown]
        tail_s = sum(t["seconds"] for t in tail)
        return Prediction(sum(group_s) + tail_s, busy, memory, breakdown, group_s, tail_s, tail)

    def one_core_seconds(self, device=0, layers=None):
        """One core of ``device`` running the whole step (or only ``layers``,
        a slice of the program) on whole maps, no communication: the paper's
        baseline."""
        return one_core_seconds(self.devices[device].profile, self.program if layers is None else layers,
                                self.batch, self.itemsize)


def workspace_pool(group):
    """Which workspace a group's transients come from: the tiles' shared
    scratch, or the tail's temporaries (they come and go apart from it)."""
    return "tail" if group.is_tail else "tiles"


def staging(m, backward=True):
    """{device: bytes} of staging buffers for the messages of ``m`` (bytes
    from device i to j) and (``backward``) their gradients back (a message
    to the device itself needs none): what each device sends."""
    m = np.array(m, dtype=float)
    np.fill_diagonal(m, 0.0)
    out = m.sum(axis=1) + (m.sum(axis=0) if backward else 0.0)
    return {d: float(v) for d, v in enumerate(out) if v > 0}


def _area(region):
    (r0, r1), (c0, c1) = region
    return (r1 - r0 + 1) * (c1 - c0 + 1)
