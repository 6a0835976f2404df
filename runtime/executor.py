"""The one executor: a rank runs its ops of the plan's schedule, in order.

The same class runs a one-device plan and every rank of an N-device plan.
Each of the rank's tiles is a ``TileStep`` (fused generated kernels, a static
arena, and one scratch shared by all of them for what lives only during a
tile's backward: nothing is allocated after the first step but what
arrives from peers); the ops in between move data (``send``/``recv``), combine batch-norm
statistics, and start the bucketed weight-gradient all-reduces, which a
communication thread runs while backward goes on (``GradientReducer``).

Parameters are updated in place. The optimiser state is one accumulator per
parameter: the momentum buffer doubles as the gradient accumulator, as in
darknet, so parameters cost twice their size instead of three times. At the
start of a step it holds torch's momentum buffer v; it is scaled to
``momentum * v``, backward adds the gradient, the update adds ``decay * p``
and steps (``sgd`` of the kernels), and it holds the new v again. Where a
gradient is a partial sum that the bucket's members all-reduce, only the
lowest member keeps ``momentum * v`` (the others start from zero), so the
all-reduced accumulator holds it once.

Messages to the rank itself are copies: made at the send, straight into
the destination (which is free then: a group input or a gradient buffer
zeroed at the start of backward), except a gradient for a layer inside a
group, which is added at the receive, after the next unit's backward has
written that buffer. (The source of a send may live in the device's
scratch, which the next group reuses, so it must not wait.) Messages to
peers are copied to a staging buffer per message and posted at once.

The image reaches no rank whole: each gets its pieces of it (``input``
ops), cut by the data source (the launcher streams them batches ahead;
threads in one process cut them from the shared batch), so that no rank
spends the start of a step sending the image and none waits for it.
"""
import functools
import time
from math import prod

import numpy as np

from tilec_runtime import ops, pages, shards
from tilec_runtime.blas_threads import limit_blas_threads
from tilec_runtime.collectives import GradientReducer, gather_allreduce, ring_allreduce
from tilec_runtime.errors import ProgramError
from tilec_runtime.fused import TileStep
from tilec_runtime.geometry import Region
from tilec_runtime.kernel_set import Kernels
from tilec_runtime.lower import lower_rank, scratch_bytes
from tilec_runtime.program import buffer_shapes, decays, members_of, message_shape, param_shapes
from tilec_runtime.tailstep import ChannelGroup, WholeGroup, fused_shares
from tilec_runtime.trace import category


def holdings(plan, rank):
    """({param key: slice or None}, {buffer key: slice or None}) that
    ``rank`` holds: every parameter and running statistic of the layers it
    computes, whole (None) or, in a group split by channels, its slice
    ``(axis, start, stop)`` (``tilec_runtime.shards``)."""
    program = plan["program"]
    params, buffers = {}, {}
    for group in plan["groups"]:
        members = members_of(group)
        if rank not in members:
            continue
        first, last = group["layers"]
        cut = {}
        if group.get("mode") == "channels":
            m = members.index(rank)
            cut = {key: (axis, b[m], b[m + 1])
                   for key, (axis, b) in shards.param_slices(program, first, last, len(members)).items()}
        for i in range(first, last + 1):
            for key in param_shapes(program[i]):
                params[key] = cut.get(key)
            for key in buffer_shapes(program[i]):
                buffers[key] = cut.get(key)
    return dict(sorted(params.items())), dict(sorted(buffers.items()))


def rank_keys(plan, rank):
    """(parameter keys, buffer keys) of the layers ``rank`` computes."""
    params, buffers = holdings(plan, rank)
    return list(params), list(buffers)


BATCHES_AHEAD = 2  # the data source streams this many steps' batches ahead of the one running


def staging_key(k, m, groups):
    """The staging buffer of message ``k``: one per content (a map's region
    and channels, or a relayed slice), however many devices it goes to,
    forward to a tail group and backward (a replicated map's gradient goes
    whole to each of its holders; a tile's input gradient differs from owner
    to owner anyway); one each for a tile's halo, whose cells differ from
    tile to tile."""
    if m["phase"] == "forward" and groups[m["group"]]["kind"] != "tail":
        return ("message", k)
    group = m["group"] if m.get("relay") or m["phase"] == "backward" else None
    return (m["phase"], m["tensor"], group, bool(m.get("relay")), tuple(m["rows"]), tuple(m["cols"]),
            tuple(m.get("channels") or ()))


def staging_layout(plan, rank):
    """({staging key: (phase, byte offset, shape)}, arena bytes) of the
    staging buffers of the messages ``rank`` sends to peers: the forward
    ones packed from the start of one arena, the backward ones from the
    start too, since a phase's sends have left before the other phase's
    buffers are written (``RankExecutor._staging_for``). Each starts on a
    64-byte line."""
    item = np.dtype(plan["dtype"]).itemsize
    ends, out = {"forward": 0, "backward": 0}, {}
    for k, m in enumerate(plan["messages"]):
        if m["sender"] != rank or m["receiver"] == rank or m["tensor"] < 0:
            continue
        key = staging_key(k, m, plan["groups"])
        if key not in out:
            shape = message_shape(plan["program"], m, plan["batch"])
            out[key] = (m["phase"], ends[m["phase"]], shape)
            ends[m["phase"]] += -(-prod(shape) * item // 64) * 64
    return out, max(ends.values())


def input_messages(plan, rank):
    """[(message id, shape)] of the pieces of the image ``rank`` takes in
    (its ``input`` ops, in order)."""
    return [(op["msg"], message_shape(plan["program"], plan["messages"][op["msg"]], plan["batch"]))
            for op in plan["schedule"][rank] if op["op"] == "input"]


# an input piece the data source wrote into its tile's input region itself (``RankExecutor.input_views``)
LANDED = object()


def input_piece(images, m):
    """The view of message ``m``'s rectangle in the whole batch ``images``."""
    return Region.of((m["rows"], m["cols"])).view(images, Region.whole(*images.shape[2:]))


def cut(array, piece):
    """``array``'s slice ``piece`` = (axis, start, stop), or all of it (None)."""
    if piece is None:
        return array
    axis, start, stop = piece
    index = [slice(None)] * array.ndim
    index[axis] = slice(start, stop)
    return array[tuple(index)]


def place(out, key, array, piece, shape):
    """Put a holder's ``array`` of ``key`` into ``out``: as the whole array
    (``piece`` None), or as its slice ``piece`` of the whole, of ``shape``,
    that the members' slices fill in."""
    if piece is None:
        out[key] = array
        return
    whole = out.get(key)
    if whole is None:
        whole = out[key] = np.zeros(shape, array.dtype)
    cut(whole, piece)[...] = array


def _rows_of(a):
    """Whether ``a`` is a map of rows that the kernels take (``copy_rows``)."""
    return a.ndim == 4 and a.shape[3] > 1 and a.strides[3] == a.itemsize


def momentum_holders(plan, rank):
    """Parameter keys whose all-reduced accumulator this rank keeps the momentum of
    (every key it holds but the partial ones of which it is not the lowest member)."""
    params, _ = rank_keys(plan, rank)
    others = set()
    for bucket in plan["buckets"]:
        if rank in bucket["members"] and rank != bucket["members"][0]:
            others.update(bucket["reduce"])
    return [k for k in params if k not in others]


class RankExecutor:
    """One rank's share of every training step of ``plan``.

    ``params``, ``buffers``: this rank's parameters and batch-norm running
    statistics (``rank_keys``), updated in place; ``momentum``: torch's
    momentum buffers to start from (default zero); ``module``: the built
    kernel module of the plan's dtype; ``threads``: kernel threads (default
    the plan's for this device). ``trace``: record every op's start and end,
    and this thread's CPU clock at both (``events``), for ``tilec train
    --trace``. ``stretch``: a
    :class:`tilec_runtime.emulate.Stretch` that slows compute (an emulated
    slower device), or None.
    """

    def __init__(self, plan, rank, comm, module, params, buffers, momentum=None, threads=None, trace=False,
                 stretch=None):
        self.plan, self.rank, self.comm = plan, rank, comm
        self.program = plan["program"]
        self.batch = plan["batch"]
        dt = self.dtype = np.dtype(plan["dtype"])
        self.threads = threads or plan["devices"][rank]["threads"]
        self.k = Kernels(module, dt)
        self.k.set_threads(self.threads)
        limit_blas_threads(1)
        self.module = module
        self.ops = plan["schedule"][rank]
        self.pieces, self.buffer_pieces = holdings(plan, rank)
        missing = [k for k in self.pieces if k not in params] + [k for k in self.buffer_pieces if k not in buffers]
        if missing:
            raise KeyError(f"device {rank} lacks {missing[0]!r} (and {len(missing) - 1} more)" if len(missing) > 1
                           else f"device {rank} lacks {missing[0]!r}")
        # what it is given is what it holds: its slices of split layers, whole arrays of the rest
        self.params = {k: np.array(params[k], dt) for k in self.pieces}
        self.buffers = {k: np.array(buffers[k], dt) for k in self.buffer_pieces}
        self.acc = {k: (np.array(momentum[k], dt) if momentum and k in momentum else np.zeros_like(p))
                    for k, p in self.params.items()}
        self.holds_momentum = set(momentum_holders(plan, rank))
        opt = plan["optimizer"]
        # (``lr`` may be changed between steps: a learning-rate schedule)
        self.lr, self.momentum = float(opt["lr"]), float(opt.get("momentum", 0.0))
        self.decay = float(opt.get("decay", 0.0))
        # the image pieces this rank cuts when given the whole batch
        self.input_ids = [k for k, _ in input_messages(plan, rank)]
        self.members = [members_of(group) for group in plan["groups"]]
        self.fused = fused_shares(plan, rank, self.threads)  # (their scratch is the tiles')
        self._tiles(plan, rank, threads=self.threads)
        self._tail(plan, rank)
        self._messages(plan, rank)
        self.events = [] if trace else None
        # an emulated slower device (``stretch``) slows its compute ops and its updates, nothing else
        self.stretch = stretch
        self.update = self._apply if stretch is None else functools.partial(stretch.run, self._apply)
        self.reducer = GradientReducer(comm, self.update, [] if trace else None)
        self.overlapped = {}  # (group, layer, phase, slice) -> the reducer's ticket of an overlapped all-reduce
        self.step_no = 0

    # -- set-up ------------------------------------------------------------------

    def _tiles(self, plan, rank, threads):
        """TileSteps of this rank's tiles, their input buffers, and where each tensor lives."""
        specs = lower_rank(plan, rank, threads)
        # what a tile needs only during its own backward, and every im2col workspace, share one scratch:
        # a device runs one group's backward at a time (a channel group's fused share among them: it
        # runs between the tiles' forward and backward, and its input gradient is sent before they use it)
        need = max((scratch_bytes(s, self.dtype.itemsize)
                    for s in [*specs.values(), *(f.spec for f in self.fused.values())]), default=0)
        self.scratch_pages = pages.Scratch(need)  # (given back while the tail runs: ``scratch_release``)
        self.scratch = self.scratch_pages.array
        self.tiles, self.regions, self.producer = {}, {}, {}
        for g, spec in specs.items():
            group = plan["groups"][g]
            tile = next(t for t in group["tiles"] if t["device"] == rank)
            x = np.zeros((self.batch, *spec["input"]), self.dtype)
            step = TileStep(spec, self.k, self.dtype, x, self.scratch)
            self.tiles[g] = step
            self.regions[g] = {tl["layer"]: Region.of(tl["region"]) for tl in tile["layers"]}
            self.regions[g]["input"] = Region.of(tile["input"])
            for layer in step.produces:
                self.producer[layer] = g

    def _tail(self, plan, rank):
        """The tail groups ``rank`` is a member of: whole, or split by channels."""
        from tilec_runtime.genops import GeneratedOps
        self.tails, self.tail_of = {}, {}
        impl = GeneratedOps(self.module)
        for g, group in enumerate(plan["groups"]):
            members = members_of(group)
            if group["kind"] != "tail" or rank not in members:
                continue
            first, last = group["layers"]
            if group.get("mode") == "channels":
                step = ChannelGroup(self.program, first, last, self.batch, self.dtype, impl, members.index(rank),
                                    len(members), self.fused.get(g), self.k, self.scratch)
            else:
                step = WholeGroup(self.program, first, last, self.batch, self.dtype, impl, self.k)
            self.tails[g] = step
            for t in range(first, last + 1):
                self.tail_of[t] = g

    def _messages(self, plan, rank):
        """Staging buffers of the messages to peers (one per content:
        ``staging_key``; forward and backward ones share one arena,
        ``staging_layout``), and when each message to this rank itself is
        copied."""
        layout, total = staging_layout(plan, rank)
        self.staging_arena = np.empty(total, np.uint8)
        self.staging = {key: self.staging_arena[at:at + prod(shape) * self.dtype.itemsize].view(self.dtype)
                        .reshape(shape) for key, (_, at, shape) in layout.items()}
        self.stage_phase = {key: phase for key, (phase, _, _) in layout.items()}
        self.stage_of, self.copy_at_recv = {}, set()
        self.staged, self.sent = {}, {}  # per buffer: the step its content is of, the sends from it
        self.staging_phase = None  # (step, phase) whose staging buffers are in use
        for k, m in enumerate(plan["messages"]):
            if rank not in (m["sender"], m["receiver"]):
                continue
            if m["sender"] == m["receiver"]:
                t = m["tensor"]
                if m["phase"] == "backward" and (t in self.tail_of or
                                                 t != plan["groups"][self.producer[t]]["layers"][1]):
                    self.copy_at_recv.add(k)
            elif m["sender"] == rank and m["tensor"] >= 0:  # (the image's pieces come from the data source)
                self.stage_of[k] = staging_key(k, m, plan["groups"])

    def _source(self, m):
        """(array, the region it covers, its first channel) that message ``m`` is cut from on its sender."""
        t, g = m["tensor"], m["group"]
        if m.get("relay") and m["phase"] == "forward":  # a slice of what it received for its group
            buf = self.tails[g].inputs[t]
            return buf, Region.whole(*buf.shape[2:]), 0
        if m["phase"] == "forward":
            if t in self.tail_of:
                array, base = self.tails[self.tail_of[t]].output(t)
                return array, Region.whole(*array.shape[2:]), base
            p = self.producer[t]
            return self.tiles[p].output_of(t), self.regions[p][t], 0
        if g in self.tails:
            grad, base = self.tails[g].grad_out(t)
            return grad, Region.whole(*grad.shape[2:]), base
        return self.tiles[g].grad_input, self.regions[g]["input"], 0

    def _destination(self, m):
        """(array, region it covers, its first channel, add, whether the
        threads that use it split its images: ``TileStep.splits_images``)
        where message ``m`` lands on its receiver."""
        t, g = m["tensor"], m["group"]
        if m.get("relay") and m["phase"] == "backward":  # another member's partial gradient of its slice
            buf, base = self.tails[g].grad_out(t)
            return buf, Region.whole(*buf.shape[2:]), base, True, False
        if m["phase"] == "forward":
            if g in self.tails:
                buf = self.tails[g].inputs[t]
                return buf, Region.whole(*buf.shape[2:]), 0, False, False
            return self.tiles[g].x, self.regions[g]["input"], 0, False, self.tiles[g].splits_images()
        if t in self.tail_of:
            buf, base = self.tails[self.tail_of[t]].grad_in(t)
            return buf, Region.whole(*buf.shape[2:]), base, True, False
        step = self.tiles[self.producer[t]]
        return step.grad_of(t), self.regions[self.producer[t]][t], 0, True, step.splits_images(step.produces[t])

    @staticmethod
    def _piece(array, base, m):
        """The view of message ``m``'s rectangle (and channels) in ``array``, whose channels start at ``base``."""
        rs, cs = Region.of((m["rows"], m["cols"])).within(base[0])
        chans = m.get("channels")
        cs_ = slice(None) if chans is None else slice(chans[0] - base[1], chans[1] - base[1] + 1)
        return array[:, cs_, rs, cs]

    # -- a step --------------------------------------------------------------------

    def step(self, images=None, target=None, inputs=None):
        """One training step: ``images`` the whole batch or ``inputs`` {message
        id: array} this rank's pieces of it (``input_messages``), either on
        every rank that has input ops; ``target`` this rank's part of the
        targets (``shards.cut_target``) where it computes the loss or a part
        of it. Returns that part of the loss (``shards.total_loss`` adds them
        up), else None."""
        self.step_no += 1
        if inputs is None and images is not None:
            inputs = {k: input_piece(images, self.plan["messages"][k]) for k in self.input_ids}
        self.inputs, self.target, self.loss = inputs or {}, target, None
        events, stretch = self.events, self.stretch
        for op in self.ops:  # op "x" runs method _x (planfile.OPS lists the names a plan may use)
            run = getattr(self, "_" + op["op"])
            if stretch is not None and category(op) == "compute":
                run = functools.partial(stretch.run, run)
            if events is None:
                run(op)
            else:
                t0, c0 = time.perf_counter(), time.thread_time()
                run(op)
                c1 = time.thread_time()
                events.append((op, t0, time.perf_counter(), c0, c1))
        self.inputs = self.target = None
        return self.loss

    def _send(self, op):
        m = self.plan["messages"][op["msg"]]
        if m["receiver"] == self.rank:
            if op["msg"] not in self.copy_at_recv:
                self._local(m)
            return
        key = self.stage_of[op["msg"]]
        stage = self.staging[key]
        if self.staged.get(key) != self.step_no:  # the first message of this content in the step
            if self.staging_phase != (self.step_no, m["phase"]):
                self._staging_for(m["phase"])
            for previous in self.sent.pop(key, ()):
                previous.wait(self.comm.timeout)  # last step's copies have left
            src, region, base = self._source(m)
            np.copyto(stage, self._piece(src, (region, base), m))
            self.staged[key] = self.step_no
        self.sent.setdefault(key, []).append(self.comm.send(m["receiver"], (self.step_no, "m", op["msg"]), stage))

    def _staging_for(self, phase):
        """The other phase's messages have left (their buffers share the
        arena with this phase's: ``staging_layout``). They are long gone by
        then as a rule: the last forward send precedes the step's backward,
        the last backward one the next step's forward."""
        for key in [k for k in self.sent if self.stage_phase[k] != phase]:
            for previous in self.sent.pop(key):
                previous.wait(self.comm.timeout)
        self.staging_phase = (self.step_no, phase)

    def _recv(self, op):
        m = self.plan["messages"][op["msg"]]
        if m["sender"] == self.rank:
            if op["msg"] in self.copy_at_recv:
                self._local(m)
            return
        self._land(m, self.comm.recv(m["sender"], (self.step_no, "m", op["msg"])))

    def _input(self, op):
        # taken out: once it has landed in the tile's input, the device no longer holds the frame
        # (``tilec_runtime.footprint.image_bytes``)
        piece = self.inputs.pop(op["msg"], None)
        if piece is None:
            raise ProgramError(f"rank {self.rank} was given no input piece {op['msg']} for step {self.step_no}")
        if piece is not LANDED:
            self._land(self.plan["messages"][op["msg"]], piece)

    def input_views(self):
        """{message id: the view it lands in} of this rank's pieces of the
        image that land in a tile's input region (a buffer of the whole
        job): a data source may write a step's pieces there itself before
        the step (``imagefile.ImagePieces.read``; nothing of this region is
        read after the step's backward) and give ``LANDED`` for them. The
        device then never holds a piece beside its tile's input (at batch 8
        on one device: 17 MB, the step's peak)."""
        views = {}
        for k, _ in input_messages(self.plan, self.rank):
            m = self.plan["messages"][k]
            if m["group"] in self.tiles:
                dst, region, base, _, _ = self._destination(m)
                views[k] = self._piece(dst, (region, base), m)
        return views

    def _local(self, m):
        src, region, base = self._source(m)
        self._land(m, self._piece(src, (region, base), m))

    def _land(self, m, piece):
        dst, region, base, add, images = self._destination(m)
        view = self._piece(dst, (region, base), m)
        if piece.dtype == view.dtype and piece.shape == view.shape and _rows_of(piece) and _rows_of(view):
            self.k.copy_rows(piece, view, add, images)  # (by rows or images, on the threads that make and read them)
        elif add:
            view += piece
        else:
            np.copyto(view, piece)

    def _conv_fwd(self, op):
        rows = tuple(op["rows"]) if "rows" in op else None
        self.tiles[op["group"]].conv_fwd(op["unit"], self.params, rows)

    def _bn_stats(self, op):
        n, mean, m2 = self.tiles[op["group"]].stats(op["unit"])
        packed = np.concatenate([n, mean, m2])
        parts = self.comm.allgather((self.step_no, "bn", op["layer"]), packed, self.members[op["group"]])
        c = mean.shape[0]
        total, tmean, tm2 = ops.bn_combine([(p[0], p[1:1 + c], p[1 + c:]) for p in parts])
        n[0], mean[...], m2[...] = total, tmean, tm2

    def _epi_fwd(self, op):
        self.tiles[op["group"]].epi_fwd(op["unit"], self.params, self.buffers)

    def _pool_fwd(self, op):
        self.tiles[op["group"]].pool_fwd(op["unit"])

    def _recompute(self, op):
        g = op["group"]
        self.tiles[g].recompute(self.params)

    def _grad_zero(self, op):
        # the accumulators start the backward holding momentum * v (here, not
        # at the step's start: a step abandoned in its forward changes nothing),
        # made on the kernels' threads in sgd's parts, and the tiles' gradients
        # cleared in the rows that fill them: each stays on the core that uses it
        for k, a in self.acc.items():
            self.k.scale(a.reshape(-1), self.momentum if k in self.holds_momentum else 0.0)
        for step in self.tiles.values():
            self.k.zero_rows(step.grad_output, step.splits_images(-1))
        for tail in self.tails.values():
            tail.start_backward()

    def _epi_bwd(self, op):
        self.tiles[op["group"]].epi_bwd(op["unit"], self.params)

    def _bn_grad(self, op):
        s1, s2 = self.tiles[op["group"]].sums(op["unit"])
        total = self.comm.allreduce_sum((self.step_no, "bng", op["layer"]), np.concatenate([s1, s2]),
                                        self.members[op["group"]])
        c = s1.shape[0]
        s1[...], s2[...] = total[:c], total[c:]

    def _conv_bwd(self, op):
        self.tiles[op["group"]].conv_bwd(op["unit"], self.params, self.acc)

    def _pool_bwd(self, op):
        self.tiles[op["group"]].pool_bwd(op["unit"])

    def _tail_fwd(self, op):
        loss = self.tails[op["group"]].forward(self.params, self.buffers, self.target)
        if loss is not None:
            self.loss = loss

    def _tail_bwd(self, op):
        self.tails[op["group"]].backward(self.params, self.acc)

    def _tail_free(self, op):
        self.tails[op["group"]].free()
        pages.trim()

    def _scratch_release(self, op):
        self.scratch_pages.release()

    def _chan_fwd(self, op):
        loss = self.tails[op["group"]].forward(op["layer"], self.params, self.buffers, op.get("slice"),
                                               op.get("slices", 1), self.target)
        if loss is not None:
            self.loss = loss

    def _chan_post(self, op):
        self.tails[op["group"]].post(op["layer"], self.params, self.buffers, op.get("slice"), op.get("slices", 1))

    def _chan_post_bwd(self, op):
        self.tails[op["group"]].post_backward(op["layer"], self.params, self.acc)

    def _chan_bwd(self, op):
        self.tails[op["group"]].backward(op["layer"], self.params, self.acc, op.get("part", "all"))

    def _chan_reduce(self, op):
        """All-reduce a B layer's partial sums (forward), an A layer's partial
        input gradient (backward) or the group's input gradient (input); with
        ``overlap``, on the communication thread, while this one goes on to
        the next ops (the weight gradient) until ``chan_wait``."""
        tail, i, phase, piece = self.tails[op["group"]], op["layer"], op["phase"], op.get("slice")
        array = tail.reduced(i, phase, piece)
        ident, _, members, ring = shards.op_reduce(self.plan, op)
        tag = (self.step_no, "c", ident)

        def run():
            if ring:
                ring_allreduce(self.comm, tag, array, members, inplace=True, labels=("crs", "cag"))
            else:
                gather_allreduce(self.comm, tag, array, members)
        if op.get("overlap"):
            label = f"chan_reduce g{op['group']} L{i} {phase}" + (f" slice {piece}" if piece is not None else "")
            self.overlapped[(op["group"], i, phase, piece)] = self.reducer.call(run, label)
            return
        run()
        tail.reduced_done(i, phase)

    def _chan_wait(self, op):
        """The overlapped all-reduce of ``_chan_reduce`` is done: its sum joins the gradients."""
        g, i, phase = op["group"], op["layer"], op["phase"]
        t0 = time.perf_counter()
        self.reducer.wait_for(self.overlapped.pop((g, i, phase, op.get("slice"))), self.comm.timeout)
        self.comm.wait_s += time.perf_counter() - t0
        self.tails[g].reduced_done(i, phase)

    def _grad_start(self, op):
        bucket = self.plan["buckets"][op["bucket"]]
        if bucket["reduce"]:
            self.reducer.start(self.step_no, bucket, self.acc)
        else:
            self.update(bucket)

    def _apply(self, bucket):
        """SGD on the bucket's parameters from their (summed) accumulators."""
        for key in bucket["keys"]:
            self.k.sgd(self.params[key].reshape(-1), self.acc[key].reshape(-1), self.lr,
                       self.decay if decays(key) else 0.0)

    def _grad_wait(self, op):
        t0 = time.perf_counter()
        self.reducer.wait()
        self.comm.wait_s += time.perf_counter() - t0

    def close(self):
        self.reducer.close()

    @property
    def velocity(self):
        """torch's momentum buffers after the last step (the accumulators)."""
        return self.acc
