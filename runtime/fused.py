"""Run kernel specs with the generated kernels: a tile's forward and
backward with every buffer planned once.

A kernel spec (made by ``tilec.codegen.lower``, plain data) lists the ops of
one tile of a layer group and where each buffer lives in one arena.
``TileStep`` allocates the arena once and then runs steps without
allocating: convolution with batch-norm statistics taken band by band,
normalisation and activation fused into the following max-pool (or written
out when no pool follows), and backward with the activation and batch-norm
gradients fused into the convolution's backward bands.

Batch-norm statistics and gradient sums of a tile are partial when the
group is split over devices; ``forward``/``backward`` take hooks that
all-reduce them in place (None on one device). Weight gradients are the
tile's partial sums, as in ``tilec_runtime.tiled``.

``OneDeviceTrainer`` chains the tiles of a one-device plan, runs the tail
(natively when it is a sum-of-squares cost, else with the reference
executor) and updates the parameters in place.
"""
import numpy as np

from tilec_runtime import reference
from tilec_runtime.genops import GeneratedOps
from tilec_runtime.kernel_set import Kernels
from tilec_runtime.program import decays


class _Op:
    """One op's views into the arena, its small vectors and parameter keys."""


def _window(src):
    r0, c0, h, w = src
    return slice(r0, r0 + h), slice(c0, c0 + w)


class TileStep:
    """Forward and backward of one tile of one group, from its kernel spec."""

    def __init__(self, spec, module, dtype):
        self.spec = spec
        self.k = k = Kernels(module, dtype)
        dt = self.dtype = np.dtype(dtype)
        b = spec["batch"]
        # zeros, not empty: the arena is allocated once, and clean numbers
        # keep a bug from reading garbage that happens to look plausible
        self.arena = np.zeros(spec["arena"], dt)
        self.arg_arena = np.zeros(spec["arg_arena"], np.int16)
        self.ws = np.empty(max(spec["workspace"], 1), dt)
        self.grads = {}
        self.ops = []
        for j, spec_op in enumerate(spec["ops"]):
            o = _Op()
            o.spec = spec_op
            o.kind, i = spec_op["kind"], spec_op["layer"]
            o.rs, o.cs = _window(spec_op["src"])
            last = (spec_op["pool"] or spec_op) if o.kind == "conv" else spec_op
            c_out = spec_op["filters"] if o.kind == "conv" else spec_op["channels"]
            o.out = self._view(f"out{j}", (b, c_out, *last["out"]))
            o.d = self._view(f"d{j}", o.out.shape)
            if o.kind == "conv" and spec_op["pool"] or o.kind == "maxpool":
                off, size = spec["arg_buffers"][f"arg{j}"]
                o.arg = self.arg_arena[off:off + size].reshape(o.out.shape)
            if o.kind == "conv":
                f, c, ks = spec_op["filters"], spec_op["channels"], spec_op["size"]
                o.z = self._view(f"z{j}", (b, f, *spec_op["out"]))
                o.pre, o.act = k.pre[spec_op["pre"]], k.act[spec_op["act"]]
                o.pads, o.owned = tuple(spec_op["pads"]), tuple(spec_op["owned"])
                o.w = f"{i}.conv.weight"
                self.grads[o.w] = np.zeros((f, c, ks, ks), dt)
                if spec_op["pre"] == "bn":
                    o.gamma, o.beta = f"{i}.bn.weight", f"{i}.bn.bias"
                    o.rmean, o.rvar = f"{i}.bn.running_mean", f"{i}.bn.running_var"
                    self.grads[o.gamma], self.grads[o.beta] = np.zeros(f, dt), np.zeros(f, dt)
                    o.n, o.mean, o.m2 = np.zeros(1), np.zeros(f), np.zeros(f)
                    o.mean_t, o.inv_t, o.m1_t, o.m2_t = (np.zeros(f, dt) for _ in range(4))
                    o.s2 = np.zeros(f)
                else:
                    o.gamma = o.mean_t = o.inv_t = None
                    o.beta = f"{i}.conv.bias"
                    self.grads[o.beta] = np.zeros(f, dt)
                    o.s2 = None
                o.s1 = np.zeros(f)
                if spec_op["pool"]:
                    p = spec_op["pool"]
                    o.prs, o.pcs = _window(p["src"])
                    o.da = self._view(f"da{j}", o.z.shape)
                    o.pool_grad = (o.d, o.arg, p["size"], p["stride"], p["pads"], tuple(p["src"]))
            self.ops.append(o)
        # layer index of the tensor each op hands on -> op position
        self.produces = {(o.spec["pool"] or o.spec)["layer"] if o.kind == "conv" else o.spec["layer"]: j
                         for j, o in enumerate(self.ops)}
        self.output = self.ops[-1].out
        self.grad_output = self.ops[-1].d
        self.grad_input = self._view("din", (b, *spec["input"])) if spec["input_grad"] else None
        self._inputs = [None] * len(self.ops)

    def _view(self, name, shape):
        off, size = self.spec["buffers"][name]
        return self.arena[off:off + size].reshape(shape)

    # -- forward -------------------------------------------------------------

    def forward(self, x, params, buffers, stats_allreduce=None):
        """Forward on the group input region ``x`` (B, C, h, w); returns the
        output view (valid until the next forward). ``stats_allreduce(layer,
        n, mean, m2)`` combines batch-norm statistics across devices in place."""
        k = self.k
        for j, o in enumerate(self.ops):
            src = x[:, :, o.rs, o.cs]
            self._inputs[j] = src
            if o.kind == "maxpool":
                s = o.spec
                k.pool_forward(src, s["size"], s["stride"], s["pads"], o.out, o.arg)
            else:
                self._conv_forward(o, src, params, buffers, stats_allreduce)
            x = o.out
        return self.output

    def _conv_forward(self, o, src, params, buffers, stats_allreduce):
        k, s = self.k, o.spec
        w = params[o.w]
        if o.gamma is not None:
            o.n[0] = 0.0
            o.mean.fill(0.0)
            o.m2.fill(0.0)
            k.conv_forward(src, w, s["stride"], o.pads, o.z, self.ws, s["band"], o.owned, o.n, o.mean, o.m2)
            if stats_allreduce is not None:
                stats_allreduce(s["layer"], o.n, o.mean, o.m2)
            k.bn_constants(o.n[0], o.mean, o.m2, o.mean_t, o.inv_t, buffers[o.rmean], buffers[o.rvar])
            gamma, beta = params[o.gamma], params[o.beta]
        else:
            k.conv_forward(src, w, s["stride"], o.pads, o.z, self.ws, s["band"])
            gamma, beta = None, params[o.beta]
        if s["pool"]:
            p = s["pool"]
            k.pool_forward(o.z[:, :, o.prs, o.pcs], p["size"], p["stride"], p["pads"], o.out, o.arg,
                           o.pre, o.act, o.mean_t, o.inv_t, gamma, beta)
        else:
            k.bn_act(o.z, o.out, o.pre, o.act, o.mean_t, o.inv_t, gamma, beta)

    # -- backward ------------------------------------------------------------

    def output_of(self, layer):
        """The forward output of ``layer`` if an op hands it on (see ``produces``)."""
        return self.ops[self.produces[layer]].out

    def backward(self, params, sums_allreduce=None, grad_input=None, extra=None):
        """Backward from ``grad_output`` (filled by the caller). Returns the
        gradients (arrays reused every step); the input gradient goes to
        ``grad_input`` if given, else to ``self.grad_input``. ``extra``:
        {layer: gradient} from readers outside the group, added to the
        gradient of that layer's output (it must be in ``produces``).
        ``sums_allreduce(layer, s1, s2)`` sums batch-norm gradient sums
        across devices in place."""
        k = self.k
        extra_at = {self.produces[layer]: g for layer, g in (extra or {}).items()}
        for j in range(len(self.ops) - 1, -1, -1):
            o = self.ops[j]
            if j in extra_at:
                o.d += extra_at[j]
            if j > 0:
                dst = self.ops[j - 1].d
            else:
                dst = grad_input if grad_input is not None else self.grad_input
            dx = None
            if dst is not None:
                dst.fill(0)
                dx = dst[:, :, o.rs, o.cs]
            if o.kind == "maxpool":
                s = o.spec
                if dx is not None:
                    k.pool_backward(o.d, o.arg, s["size"], s["stride"], s["pads"], dx)
            else:
                self._conv_backward(o, self._inputs[j], dx, params, sums_allreduce)
        return self.grads

    def _conv_backward(self, o, src, dx, params, sums_allreduce):
        k, s = self.k, o.spec
        # with a fused pool, act_grad routes the pool's gradient into da itself
        g, pool = (o.da, o.pool_grad) if s["pool"] else (o.d, None)
        o.s1.fill(0.0)
        bn = None
        if o.gamma is not None:
            o.s2.fill(0.0)
            gamma = params[o.gamma]
            k.act_grad(g, o.z, o.pre, o.act, o.s1, o.s2, o.mean_t, o.inv_t, gamma, params[o.beta], pool)
            if sums_allreduce is not None:
                sums_allreduce(s["layer"], o.s1, o.s2)
            k.bn_grad_constants(o.s1, o.s2, float(s["count"]), o.m1_t, o.m2_t, self.grads[o.gamma],
                                self.grads[o.beta])
            bn = (o.z, o.mean_t, o.inv_t, gamma, o.m1_t, o.m2_t)
        else:
            k.act_grad(g, o.z, o.pre, o.act, o.s1, None, None, None, None, params[o.beta], pool)
            self.grads[o.beta][...] = o.s1
        k.conv_backward(src, params[o.w], s["stride"], o.pads, g, self.ws, s["band"], self.grads[o.w], dx, bn,
                        o.owned)


class OneDeviceTrainer:
    """Training steps of a one-device plan with generated kernels.

    Parameters, running statistics and momentum are updated in place. After
    the first step nothing is allocated when the tail is a sum-of-squares
    cost on the spatial prefix (YOLO-style); any other tail runs with the
    reference executor.
    """

    def __init__(self, plan, kernel_plan, module, params, buffers):
        if len(plan["devices"]) != 1:
            raise ValueError("OneDeviceTrainer runs one-device plans; use the tiled executor for more")
        if kernel_plan["plan"] != plan["hash"]:
            raise ValueError("the kernel plan was lowered from another plan")
        self.program, self.batch = plan["program"], plan["batch"]
        self.dtype = np.dtype(plan["dtype"])
        self.params, self.buffers = params, buffers
        self.k = Kernels(module, self.dtype)
        self.tail_kernels = GeneratedOps(module)  # for a tail the reference executor runs
        specs = kernel_plan["specs"]
        self.steps = [TileStep(specs[t["spec"]], module, self.dtype)
                      for t in sorted(kernel_plan["tiles"], key=lambda t: t["group"])]
        tail = plan["groups"][-1]
        self.prefix = tail["layers"][0]
        self.tail = self.program[self.prefix:]
        last = self.tail[0] if len(self.tail) == 1 else None
        self.native_cost = (last is not None and last["kind"] == "cost" and last.get("type", "sse") == "sse"
                            and last["inputs"] == [self.prefix - 1] and self.prefix > 0)
        # prefix tensors the tail reads, and the group (step) that hands each on
        self.tail_reads = sorted({j for layer in self.tail for j in layer["inputs"] if 0 <= j < self.prefix})
        self.owner = {layer: g for g, s in enumerate(self.steps) for layer in s.produces}
        opt = plan["optimizer"]
        self.lr, self.momentum, self.decay = float(opt["lr"]), float(opt.get("momentum", 0.0)), float(opt.get("decay", 0.0))
        self.velocity = {key: np.zeros_like(p) for key, p in params.items()}
        self.grads = {}
        for s in self.steps:
            self.grads.update(s.grads)

    def step(self, images, target):
        """One forward, backward and update; returns the loss."""
        x = np.ascontiguousarray(images, dtype=self.dtype)
        for s in self.steps:
            x = s.forward(x, self.params, self.buffers)
        grads = self.grads
        if self.native_cost:
            t = np.ascontiguousarray(target, dtype=self.dtype)
            loss = self.k.sse(x.reshape(-1), t.reshape(-1), self.steps[-1].grad_output.reshape(-1), self.batch)
        extra = [{} for _ in self.steps]
        if not self.native_cost:
            acts = {-1: images}
            for t in self.tail_reads:
                acts[t] = self.steps[self.owner[t]].output_of(t)
            loss, cache = reference.forward_layers(self.tail, self.params, self.buffers, acts, target,
                                                   kernels=self.tail_kernels)
            tail_grads, dout = reference.backward_layers(self.tail, self.params, acts, cache, kernels=self.tail_kernels)
            grads = dict(grads, **tail_grads)
            if self.steps:
                self.steps[-1].grad_output.fill(0)
            for t, g in dout.items():
                if t >= 0:
                    extra[self.owner[t]][t] = g
        for g in range(len(self.steps) - 1, -1, -1):
            self.steps[g].backward(self.params, grad_input=self.steps[g - 1].grad_output if g > 0 else None,
                                   extra=extra[g])
        for key, grad in grads.items():
            p = self.params[key]
            self.k.sgd(p.reshape(-1), grad.reshape(-1), self.velocity[key].reshape(-1), self.lr, self.momentum,
                       self.decay if decays(key) else 0.0)
        return loss
