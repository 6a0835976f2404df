"""The one executor: a rank runs its ops of the plan's schedule, in order.

The same class runs a one-device plan and every rank of an N-device plan.
Each of the rank's tiles is a ``TileStep`` (fused generated kernels, a static
arena: nothing is allocated after the first step but what arrives from
peers); the ops in between move data (``send``/``recv``), combine batch-norm
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
written that buffer. (The source of a send may live in the arena that the
groups which recompute share, so it must not wait.) Messages to peers are
copied to a staging buffer per message and posted at once.
"""
import time

import numpy as np

from tilec_runtime import ops, reference
from tilec_runtime.blas_threads import limit_blas_threads
from tilec_runtime.collectives import GradientReducer
from tilec_runtime.fused import TileStep
from tilec_runtime.geometry import Region
from tilec_runtime.kernel_set import Kernels
from tilec_runtime.lower import lower_rank
from tilec_runtime.program import buffer_shapes, decays, param_shapes


def rank_keys(plan, rank):
    """(parameter keys, buffer keys) of the layers ``rank`` computes."""
    layers = set()
    for group in plan["groups"]:
        if any(t["device"] == rank for t in group["tiles"]):
            first, last = group["layers"]
            layers.update(range(first, last + 1))
    program = plan["program"]
    params = sorted(k for i in layers for k in param_shapes(program[i]))
    buffers = sorted(k for i in layers for k in buffer_shapes(program[i]))
    return params, buffers


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
    the plan's for this device). ``trace``: record every op's start and end
    (``events``) for ``tilec train --trace``.
    """

    def __init__(self, plan, rank, comm, module, params, buffers, momentum=None, threads=None, trace=False):
        self.plan, self.rank, self.comm = plan, rank, comm
        program = self.program = plan["program"]
        self.batch = plan["batch"]
        dt = self.dtype = np.dtype(plan["dtype"])
        self.threads = threads or plan["devices"][rank]["threads"]
        self.k = Kernels(module, dt)
        self.k.set_threads(self.threads)
        limit_blas_threads(1)
        self.module = module
        self.ops = plan["schedule"][rank]
        keys, buffer_keys = rank_keys(plan, rank)
        missing = [k for k in keys if k not in params] + [k for k in buffer_keys if k not in buffers]
        if missing:
            raise KeyError(f"device {rank} lacks {missing[0]!r} (and {len(missing) - 1} more)" if len(missing) > 1
                           else f"device {rank} lacks {missing[0]!r}")
        self.params = {k: np.ascontiguousarray(params[k], dt) for k in keys}
        self.buffers = {k: np.ascontiguousarray(buffers[k], dt) for k in buffer_keys}
        self.acc = {k: (np.array(momentum[k], dt) if momentum and k in momentum else np.zeros_like(p))
                    for k, p in self.params.items()}
        self.holds_momentum = set(momentum_holders(plan, rank))
        opt = plan["optimizer"]
        # (``lr`` may be changed between steps: a learning-rate schedule)
        self.lr, self.momentum = float(opt["lr"]), float(opt.get("momentum", 0.0))
        self.decay = float(opt.get("decay", 0.0))
        self._momentum = np.array(self.momentum, self.dtype)
        self._tiles(plan, rank, threads=self.threads)
        self._tail(plan, rank)
        self._messages(plan, rank)
        self.events = [] if trace else None
        self.reducer = GradientReducer(comm, self._apply, [] if trace else None)
        self.step_no = 0

    # -- set-up ------------------------------------------------------------------

    def _tiles(self, plan, rank, threads):
        """TileSteps of this rank's tiles, their input buffers, and where each tensor lives."""
        specs = lower_rank(plan, rank, threads)
        shared = max((s["arena"] for g, s in specs.items() if plan["groups"][g].get("recompute")), default=0)
        shared_args = max((s["arg_arena"] for g, s in specs.items() if plan["groups"][g].get("recompute")), default=0)
        # groups that recompute keep only their input: their activations share one arena
        self.transient = np.zeros(shared, self.dtype) if shared else None
        self.transient_args = np.zeros(shared_args, np.int16) if shared else None
        self.tiles, self.regions, self.producer, self.grad_out = {}, {}, {}, {}
        for g, spec in specs.items():
            group = plan["groups"][g]
            tile = next(t for t in group["tiles"] if t["device"] == rank)
            x = np.zeros((self.batch, *spec["input"]), self.dtype)
            recompute = bool(group.get("recompute"))
            step = TileStep(spec, self.k, self.dtype, x, self.transient if recompute else None,
                            self.transient_args if recompute else None)
            self.tiles[g] = step
            self.regions[g] = {tl["layer"]: Region.of(tl["region"]) for tl in tile["layers"]}
            self.regions[g]["input"] = Region.of(tile["input"])
            for layer in step.produces:
                self.producer[layer] = g
            if recompute:
                # gradients arriving before the recompute must not live in the shared arena
                self.grad_out[g] = np.zeros_like(step.grad_output)

    def _tail(self, plan, rank):
        tail = next((g for g, group in enumerate(plan["groups"])
                     if group["kind"] == "tail" and any(t["device"] == rank for t in group["tiles"])), None)
        self.tail_group = tail
        self.tail_inputs, self.tail_grads, self.tail_state = {}, {}, None
        if tail is None:
            return
        first, last = plan["groups"][tail]["layers"]
        self.tail_layers = self.program[first:last + 1]
        reads = sorted({j for layer in self.tail_layers for j in layer["inputs"] if j < first})
        for t in reads:
            shape = self.program[t]["out_shape"] if t >= 0 else self.program[0]["in_shape"]
            self.tail_inputs[t] = np.zeros((self.batch, *shape), self.dtype)
        only = self.tail_layers[0] if len(self.tail_layers) == 1 else None
        # a sum-of-squares cost on the last tiled layer: the kernels' own, allocation-free
        self.native_cost = (only is not None and only["kind"] == "cost" and only["inputs"] == [first - 1]
                            and first > 0)
        if self.native_cost:
            self.tail_grads[first - 1] = np.zeros_like(self.tail_inputs[first - 1])
        from tilec_runtime.genops import GeneratedOps
        self.tail_ops = GeneratedOps(self.module)

    def _messages(self, plan, rank):
        """Staging buffers of the messages to peers, and when each message to
        this rank itself is copied."""
        self.staging, self.sent, self.copy_at_recv = {}, {}, set()
        for k, m in enumerate(plan["messages"]):
            if rank not in (m["sender"], m["receiver"]):
                continue
            if m["sender"] == m["receiver"]:
                t = m["tensor"]
                if m["phase"] == "backward" and t != plan["groups"][self.producer[t]]["layers"][1]:
                    self.copy_at_recv.add(k)
            elif m["sender"] == rank:
                t = m["tensor"]
                c = (self.program[t]["out_shape"] if t >= 0 else self.program[0]["in_shape"])[0]
                box = Region.of((m["rows"], m["cols"]))
                self.staging[k] = np.empty((self.batch, c, box.height, box.width), self.dtype)

    def _source(self, m, images):
        """(array, the region it covers) that message ``m`` is cut from on its sender."""
        t, g = m["tensor"], m["group"]
        if m["phase"] == "forward":
            if t == -1:
                return images, Region.whole(*images.shape[2:])
            p = self.producer[t]
            return self.tiles[p].output_of(t), self.regions[p][t]
        if g == self.tail_group:
            grad = self.tail_grads[t]
            return grad, Region.whole(*grad.shape[2:])
        return self.tiles[g].grad_input, self.regions[g]["input"]

    def _destination(self, m):
        """(array, region it covers, add) where message ``m`` lands on its receiver."""
        t, g = m["tensor"], m["group"]
        if m["phase"] == "forward":
            if g == self.tail_group:
                buf = self.tail_inputs[t]
                return buf, Region.whole(*buf.shape[2:]), False
            return self.tiles[g].x, self.regions[g]["input"], False
        p = self.producer[t]
        step = self.tiles[p]
        last = t == self.plan["groups"][p]["layers"][1]
        buf = self.grad_out[p] if last and p in self.grad_out else step.grad_of(t)
        return buf, self.regions[p][t], True

    # -- a step --------------------------------------------------------------------

    def step(self, images=None, target=None):
        """One training step (``images``/``target`` on rank 0). Returns the
        loss on the rank that runs the tail, else None."""
        self.step_no += 1
        if images is not None:
            images = np.ascontiguousarray(images, self.dtype)
        self.images, self.target, self.loss = images, target, None
        run = {"send": self._send, "recv": self._recv, "conv_fwd": self._conv_fwd, "bn_stats": self._bn_stats,
               "epi_fwd": self._epi_fwd, "pool_fwd": self._pool_fwd, "recompute": self._recompute,
               "grad_zero": self._grad_zero, "epi_bwd": self._epi_bwd, "bn_grad": self._bn_grad,
               "conv_bwd": self._conv_bwd, "pool_bwd": self._pool_bwd, "tail_fwd": self._tail_fwd,
               "tail_bwd": self._tail_bwd, "grad_start": self._grad_start, "grad_wait": self._grad_wait}
        events = self.events
        for op in self.ops:
            if events is None:
                run[op["op"]](op)
            else:
                t0 = time.perf_counter()
                run[op["op"]](op)
                events.append((op, t0, time.perf_counter()))
        self.images = self.target = None
        return self.loss

    def _send(self, op):
        m = self.plan["messages"][op["msg"]]
        if m["receiver"] == self.rank:
            if op["msg"] not in self.copy_at_recv:
                self._local(m)
            return
        src, base = self._source(m, self.images)
        stage = self.staging[op["msg"]]
        previous = self.sent.get(op["msg"])
        if previous is not None:
            previous.wait(self.comm.timeout)  # last step's copy has left
        np.copyto(stage, Region.of((m["rows"], m["cols"])).view(src, base))
        self.sent[op["msg"]] = self.comm.send(m["receiver"], (self.step_no, "m", op["msg"]), stage)

    def _recv(self, op):
        m = self.plan["messages"][op["msg"]]
        if m["sender"] == self.rank:
            if op["msg"] in self.copy_at_recv:
                self._local(m)
            return
        self._land(m, self.comm.recv(m["sender"], (self.step_no, "m", op["msg"])))

    def _local(self, m):
        src, base = self._source(m, self.images)
        self._land(m, Region.of((m["rows"], m["cols"])).view(src, base))

    def _land(self, m, piece):
        dst, base, add = self._destination(m)
        view = Region.of((m["rows"], m["cols"])).view(dst, base)
        if add:
            view += piece
        else:
            np.copyto(view, piece)

    def _members(self, g):
        return sorted(t["device"] for t in self.plan["groups"][g]["tiles"])

    def _conv_fwd(self, op):
        rows = tuple(op["rows"]) if "rows" in op else None
        self.tiles[op["group"]].conv_fwd(op["unit"], self.params, rows)

    def _bn_stats(self, op):
        n, mean, m2 = self.tiles[op["group"]].stats(op["unit"])
        packed = np.concatenate([n, mean, m2])
        parts = self.comm.allgather((self.step_no, "bn", op["layer"]), packed, self._members(op["group"]))
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
        np.copyto(self.tiles[g].grad_output, self.grad_out[g])

    def _grad_zero(self, op):
        # the accumulators start the backward holding momentum * v (here, not
        # at the step's start: a step abandoned in its forward changes nothing)
        for k, a in self.acc.items():
            if k in self.holds_momentum:
                np.multiply(a, self._momentum, out=a)  # (an array factor: no temporary)
            else:
                a.fill(0)
        for g, step in self.tiles.items():
            (self.grad_out[g] if g in self.grad_out else step.grad_output).fill(0)

    def _epi_bwd(self, op):
        self.tiles[op["group"]].epi_bwd(op["unit"], self.params)

    def _bn_grad(self, op):
        s1, s2 = self.tiles[op["group"]].sums(op["unit"])
        total = self.comm.allreduce_sum((self.step_no, "bng", op["layer"]), np.concatenate([s1, s2]),
                                        self._members(op["group"]))
        c = s1.shape[0]
        s1[...], s2[...] = total[:c], total[c:]

    def _conv_bwd(self, op):
        self.tiles[op["group"]].conv_bwd(op["unit"], self.params, self.acc)

    def _pool_bwd(self, op):
        self.tiles[op["group"]].pool_bwd(op["unit"])

    def _tail_fwd(self, op):
        first = self.tail_layers[0]["index"]
        if self.native_cost:
            x = self.tail_inputs[first - 1]
            t = np.ascontiguousarray(self.target, self.dtype)
            self.loss = self.k.sse(x.reshape(-1), t.reshape(-1), self.tail_grads[first - 1].reshape(-1), self.batch)
            return
        acts = dict(self.tail_inputs)
        self.loss, cache = reference.forward_layers(self.tail_layers, self.params, self.buffers, acts, self.target,
                                                    train=True, impl=self.tail_ops)
        self.tail_state = (acts, cache)

    def _tail_bwd(self, op):
        if self.native_cost:
            return  # sse wrote the gradient with the loss
        acts, cache = self.tail_state
        grads, dout = reference.backward_layers(self.tail_layers, self.params, acts, cache, impl=self.tail_ops)
        for key, g in grads.items():
            self.acc[key] += g
        for t in self.tail_inputs:
            if t < 0:
                continue
            grad = dout.get(t)
            if grad is not None:
                self.tail_grads[t] = grad
            elif t not in self.tail_grads:
                self.tail_grads[t] = np.zeros_like(self.tail_inputs[t])
        self.tail_state = None

    def _grad_start(self, op):
        bucket = self.plan["buckets"][op["bucket"]]
        if bucket["reduce"]:
            self.reducer.start(self.step_no, bucket, self.acc)
        else:
            self._apply(bucket)

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
