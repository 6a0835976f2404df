"""The groups after the tiled prefix, on one device or split by channels.

A *whole* group runs its layers on whole maps with the reference executor
(on the generated kernels): route, reorg, the losses, and whatever the plan
leaves on one device; a sum-of-squares cost straight on the tiled prefix's
output runs with the kernels' own allocation-free ``sse``.

A *channel* group (``tilec_runtime.shards``) runs each layer on the
member's share: an A layer on its output channels, a B layer's partial sum
over its input channels, all-reduced by the executor (``reduce``) before
``post`` applies the bias or batch norm and the activation, and pooling on
what the member holds. Backward mirrors it; an A layer's partial input
gradient is all-reduced by the executor when its input comes from inside
the group, else returned to the group's producer, which adds them up.

Both keep, per tensor, the output (``output``), the gradient the group
receives for it (``grad_in``) and the gradient it returns for its inputs
(``grad_out``), each with the first channel it starts at.
"""
from typing import NamedTuple

import numpy as np

from tilec_runtime import ops, reference, shards
from tilec_runtime.fused import TileStep
from tilec_runtime.lower import lower_tile, outside_tensors, whole_map_tile
from tilec_runtime.program import members_of, pads_of, tensor_shape


def own(array):
    """``array`` where it is contiguous and all of its memory, else a copy:
    a gradient a group returns outlives the step's other arrays (``free``),
    and a route's slice of its gradient would keep all of it (and some are
    all-reduced in place)."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    return array if root.nbytes <= array.nbytes and array.flags.c_contiguous else np.array(array, order="C")


class Inputs(dict):
    """The maps a tail group reads from before it, {tensor: array}, each
    allocated (zeroed) when first asked for: where the device gives memory
    back during its tail, ``free`` lets go of them after the group's
    backward and the next step's forward messages land in new ones."""

    def __init__(self, program, reads, batch, dtype):
        super().__init__()
        self.reads = reads
        self.shapes = {t: (batch, *tensor_shape(program, t)) for t in reads}
        self.dtype = dtype
        for t in reads:
            self[t]

    def __missing__(self, t):
        array = self[t] = np.zeros(self.shapes[t], self.dtype)
        return array

    def all(self):
        """{tensor: array} of every map read, allocated where let go of."""
        return {t: self[t] for t in self.reads}


def native_cost(program, first, last):
    """Whether program[first..last] is a sum-of-squares cost straight on the
    tiled prefix, which runs allocation-free on the kernels' ``sse``."""
    only = program[first]
    return first == last and first > 0 and only["kind"] == "cost" and only["inputs"] == [first - 1]


class WholeGroup:
    """program[first..last] on one device."""

    def __init__(self, program, first, last, batch, dtype, impl, native_kernels):
        self.program, self.first, self.last = program, first, last
        self.layers = program[first:last + 1]
        self.batch, self.dtype, self.k = batch, dtype, impl
        reads = sorted({j for layer in self.layers for j in layer["inputs"] if j < first})
        self.inputs = Inputs(program, reads, batch, dtype)
        self.native = native_kernels if native_cost(program, first, last) else None
        self.acts, self.cache, self.loss = {}, None, None
        self.grads_in, self.grads_out, self.no_grad = {}, {}, {}
        if self.native is not None:
            self.grads_out[first - 1] = np.zeros_like(self.inputs[first - 1])

    def output(self, t):
        return self.acts[t], 0

    def grad_in(self, t):
        if t not in self.grads_in:
            self.grads_in[t] = np.zeros((self.batch, *tensor_shape(self.program, t)), self.dtype)
        return self.grads_in[t], 0

    def grad_out(self, t):
        return self.grads_out[t], 0

    def start_backward(self):
        for g in self.grads_in.values():
            g.fill(0)

    def free(self):
        """Let go of this step's activations, of its inputs and of the
        gradients of its outputs (``tail_free``, after its backward); the
        gradients of its inputs stay, the sends of them may copy them later."""
        if self.native is None:
            self.acts, self.cache, self.grads_in = {}, None, {}
            self.grads_out = {t: own(g) for t, g in self.grads_out.items()}
            self.inputs.clear()

    def forward(self, params, buffers, target):
        if self.native is not None:
            x = self.inputs[self.first - 1]
            t = np.ascontiguousarray(target, self.dtype)
            self.loss = self.native.sse(x.reshape(-1), t.reshape(-1), self.grads_out[self.first - 1].reshape(-1),
                                        self.batch)
            return self.loss
        self.acts = self.inputs.all()
        self.loss, self.cache = reference.forward_layers(self.layers, params, buffers, self.acts, target,
                                                         train=True, impl=self.k)
        return self.loss

    def backward(self, params, acc):
        if self.native is not None:
            return  # sse wrote the gradient with the loss
        _, dout = reference.backward_layers(self.layers, params, self.acts, self.cache, self.grads_in,
                                            impl=self.k, acc=acc)
        for t in self.inputs.reads:
            if t >= 0:
                if t not in dout and t not in self.no_grad:
                    # an input the loss does not reach returns zeros: read only, so one array serves every step
                    self.no_grad[t] = np.zeros_like(self.inputs[t])
                self.grads_out[t] = dout[t] if t in dout else self.no_grad[t]
        self.cache = None


class FusedShare(NamedTuple):
    """A channel group's first layer (and the max-pool after it) as a tile
    of the fused path (``fused_share``): ``spec`` its kernel spec,
    ``first``..``last`` its layers, ``input`` the map it reads."""
    spec: dict
    first: int
    last: int
    input: int


def fused_share(program, first, last, k, member, batch, threads, outside):
    """The ``FusedShare`` of a channel group's first layer as ``member`` of
    ``k`` computes it, or None where that is not an A convolution of one
    map; with the max-pool after it where only that pool reads its output
    (``outside``: the layers whose output a message carries)."""
    i, layer = first, program[first]
    if shards.roles(program, first, last)[i] != "A" or layer["kind"] != "conv" or len(layer["inputs"]) != 1:
        return None
    end = i
    if i < last and program[i + 1]["kind"] == "maxpool" and i not in outside and not any(
            i in other["inputs"] for other in program[i + 2:last + 1]):
        end = i + 1
    shares = list(program)
    for j in range(i, end + 1):
        shares[j] = shards.share(program, first, last, k, member, j)
    # its output stays to the end of the step (``hold``): the group's later layers read it in their backward
    spec = lower_tile(shares, {"layers": [i, end]}, whole_map_tile(shares, i, end), batch, {end}, threads,
                      hold=True)
    return FusedShare(spec, i, end, layer["inputs"][0])


def fused_shares(plan, rank, threads):
    """{group: ``FusedShare``} of the channel groups ``rank`` is a member of
    that it runs so: all but those that let go of their arrays after their
    backward (``tail_free``; the fused share's arena is held all step, as
    a tile's is, and the memory model counts such a group's as freed). A
    plan being built, before its schedule: none (which groups let go is
    decided from the tiles' scratch alone, ``tilec.plan.build``)."""
    if "schedule" not in plan:
        return {}
    freed = {op["group"] for op in plan["schedule"][rank] if op["op"] == "tail_free"}
    outside = outside_tensors(plan)
    out = {}
    for g, group in enumerate(plan["groups"]):
        members = members_of(group)
        if group.get("mode") != "channels" or rank not in members or g in freed:
            continue
        share = fused_share(plan["program"], *group["layers"], len(members), members.index(rank), plan["batch"],
                            threads, outside)
        if share is not None:
            out[g] = share
    return out


class ChannelGroup:
    """A member's share of program[first..last] split by channels over ``k`` devices.

    With ``fused`` (a ``FusedShare`` of its first layer), ``kernels`` (the
    executor's ``Kernels``) and ``scratch`` (the device's, which its tiles
    leave free while the tail runs), that layer runs as one whole-map tile
    of the fused path: its share of the filters, batch norm from its own
    channels' statistics (no other member has any of them), the activation
    and a max-pool after it fused, in a static arena, as a tiled group
    runs. Every other layer runs on the generated kernels' allocating calls
    and numpy, one by one (measured, tiny416's layers 8-9 at batch 1 on
    two devices: half of 256 filters so took 3.4 ms forward and 5.7
    backward, against 2.3 and 4.6 for half of the one-device fused kernels).
    """

    def __init__(self, program, first, last, batch, dtype, impl, member, k, fused=None, kernels=None,
                 scratch=None):
        self.program, self.first, self.last = program, first, last
        self.layers = program[first:last + 1]
        self.batch, self.dtype, self.k = batch, dtype, impl
        self.member, self.n = member, k
        self.roles = shards.roles(program, first, last)
        self.held = shards.layouts(program, first, last, k)
        # a cost ending the group: every member adds its part of the loss where the cost's input is split,
        # the first alone where it is replicated (each then computes all of it)
        self.counts_loss = member == 0 or self.held[last] is not None
        # fixed by the plan: worked out once, not at every step
        self.shares = {i: shards.share(program, first, last, k, member, i) for i in range(first, last + 1)}
        # an A layer's input gradient is partial (all-reduced) when a split layer comes before it in the group
        self.reduce_dx = {i: shards.reduces_input_grad(self.roles, first, i) for i in range(first, last + 1)}
        # what it reads from before it: the layer before, or a leading route's maps
        reads = sorted({j for layer in self.layers for j in layer["inputs"] if j < first})
        self.inputs = Inputs(program, reads, batch, dtype)
        self.acts, self.cache, self.partial, self.partial_dx = {}, {}, {}, {}
        self.pending = {}  # an A layer's gradient at its conv or connected output, between its two parts
        self.sliced = {}  # a B layer's sums by slices of its output channels, all-reduced one by one
        self.summed = {}  # an A layer's sums over the slices of its input channels so far
        self.grads_in, self.grads_out = {}, {}
        # the messages land in the tile's input: a group with a fused share never lets go of its inputs
        # (``fused_shares``), so that array stays the group's
        self.fused = fused
        self.tile = None if fused is None else TileStep(fused.spec, kernels, dtype, self.inputs[fused.input], scratch)

    def _in_fused(self, i):
        return self.fused is not None and self.fused.first <= i <= self.fused.last

    # -- where things are -----------------------------------------------------------

    def base(self, t):
        """First channel of ``t`` this member holds (0: all of them)."""
        held = self.held.get(t)
        return 0 if held is None else held[self.member]

    def output(self, t):
        return self.acts[t], self.base(t)

    def grad_in(self, t):
        if t not in self.grads_in:
            self.grads_in[t] = np.zeros_like(self.acts[t])
        return self.grads_in[t], self.base(t)

    def grad_out(self, t):
        return self.grads_out[t], 0

    def layer_share(self, layer):
        """The layer as this member computes it (``shards.share``)."""
        return self.shares[layer["index"]]

    def start_backward(self):
        for g in self.grads_in.values():
            g.fill(0)

    def free(self):
        """Let go of this step's activations, caches, inputs and the gradients
        of its outputs (``tail_free``, after its backward); the gradients of
        its inputs stay, the sends of them may copy them later."""
        self.acts, self.cache, self.grads_in = {}, {}, {}
        self.inputs.clear()

    # -- forward ------------------------------------------------------------------

    def forward(self, i, params, buffers, piece=None, pieces=1, target=None):
        """An A or pooling layer on this member's channels; a B layer's partial
        sum (``partial``), or slice ``piece`` of ``pieces`` of its output
        channels (``sliced``: each is all-reduced while the next is
        computed); an A layer after such a B, its sums over that slice of its
        input channels, added up (``summed``) until ``post`` finishes it; the
        cost on this member's channels against ``target`` (its channels of
        the targets): returns this member's part of the loss, or None."""
        layer = self.program[i]
        share = self.layer_share(layer)
        if i == self.first:
            self.acts.update(self.inputs.all())
        if self._in_fused(i):
            self._fused_forward(i, params, buffers)
            return None
        x = self.acts.get(i - 1)  # (a leading route reads its own inputs)
        if self.roles[i] == "A" and piece is not None:
            self._add_slice(i, layer, x, params, piece, pieces)
            return None
        if self.roles[i] != "B":
            loss, cache = reference.forward_layers([share], params, buffers, self.acts, target, train=True,
                                                   impl=self.k)
            self.cache[i] = cache.get(i)
            return loss if self.counts_loss else None
        w = params[f"{i}.conv.weight" if layer["kind"] == "conv" else f"{i}.fc.weight"]
        if piece is not None:
            bounds = shards.part_bounds(w.shape[0], pieces)
            w = w[bounds[piece]:bounds[piece + 1]]
        if layer["kind"] == "conv":
            z = self.k.conv2d_forward(x, w, layer["stride"], pads_of(layer))
        else:
            z = (x.reshape(x.shape[0], -1) @ w.T).reshape(x.shape[0], -1, 1, 1)
        z = np.ascontiguousarray(z)  # all-reduced in place
        if piece is None:
            self.partial[i] = z
        else:
            self.sliced.setdefault(i, [None] * pieces)[piece] = z

    def _fused_forward(self, i, params, buffers):
        if i != self.fused.first:
            return  # (the pool ran with the convolution)
        self.tile.conv_fwd(0, params)
        self.tile.epi_fwd(0, params, buffers)
        self.acts[self.fused.last] = self.tile.output
        self.grads_in[self.fused.last] = self.tile.grad_output  # (zeroed by ``start_backward``, then added to)

    def _add_slice(self, i, layer, x, params, piece, pieces):
        """A layer ``i``'s sums over slice ``piece`` of its input channels
        (the slice of the B before it that is final), added to ``summed``."""
        bounds = shards.part_bounds(x.shape[1], pieces)
        c0, c1 = bounds[piece], bounds[piece + 1]
        if layer["kind"] == "conv":
            w = np.ascontiguousarray(params[f"{i}.conv.weight"][:, c0:c1])
            z = self.k.conv2d_forward(x[:, c0:c1], w, layer["stride"], pads_of(layer))
        else:  # a connected layer reads channel-major features: a channel range is a range of them
            plane = x.shape[2] * x.shape[3]
            w = params[f"{i}.fc.weight"][:, c0 * plane:c1 * plane]
            z = (x.reshape(x.shape[0], -1)[:, c0 * plane:c1 * plane] @ w.T).reshape(x.shape[0], -1, 1, 1)
        if piece == 0:
            self.summed[i] = np.array(z, order="C")
        else:
            self.summed[i] += z

    def reduced(self, i, phase, piece=None):
        """The array the executor all-reduces in place at layer ``i`` in ``phase``
        (``tilec_runtime.shards.reduce_id``; ``piece``: a slice of B's sums)."""
        if phase == "forward":
            return self.partial[i] if piece is None else self.sliced[i][piece]
        return self.partial_dx[i - 1] if phase == "backward" else self.grads_out[self.first - 1]

    def reduced_done(self, i, phase):
        """An A layer's all-reduced input gradient joins the gradient of its input."""
        if phase == "backward":
            dx = self.partial_dx.pop(i - 1)
            self.grads_in[i - 1] = dx if i - 1 not in self.grads_in else self.grads_in[i - 1] + dx

    def post(self, i, params, buffers, piece=None, pieces=1):
        """B layer ``i``'s bias or batch norm and activation, on the whole
        (all-reduced) sum, or on slice ``piece`` of ``pieces`` of its
        channels (the A layer after it then takes that slice); an A layer
        summed slice by slice (``summed``), its own."""
        layer = self.program[i]
        if self.roles[i] == "A":
            self.acts[i], self.cache[i] = self._finish(i, layer, self.summed.pop(i), params, buffers)
            return
        if piece is None:
            z = np.concatenate(self.sliced.pop(i), axis=1) if i in self.sliced else self.partial.pop(i)
            self.acts[i], self.cache[i] = self._finish(i, layer, z, params, buffers)
            return
        bounds = shards.part_bounds(layer["out_shape"][0], pieces)
        chans = slice(bounds[piece], bounds[piece + 1])
        z = self.sliced[i][piece]
        if piece == 0:  # the whole output (and batch-norm cache), filled slice by slice
            self.acts[i] = np.empty((z.shape[0], layer["out_shape"][0], *z.shape[2:]), z.dtype)
            bn = layer["kind"] == "conv" and layer["bn"]
            self.cache[i] = (np.empty_like(self.acts[i]), np.empty(layer["out_shape"][0], z.dtype)) if bn else None
        act, cache = self._finish(i, layer, z, params, buffers, chans)
        self.acts[i][:, chans] = act
        if cache is not None:
            self.cache[i][0][:, chans], self.cache[i][1][chans] = cache
        if piece == pieces - 1:
            del self.sliced[i]

    def _finish(self, i, layer, z, params, buffers, chans=slice(None)):
        """(activation, batch-norm cache or None) of layer ``i`` from its sums
        ``z`` on channels ``chans`` of its parameters (a conv's:
        ``reference.conv_epilogue``; a connected layer's bias and activation)."""
        if layer["kind"] == "conv":
            return reference.conv_epilogue(layer, z, params, buffers, True, self.k, chans)
        y = z.reshape(z.shape[0], -1) + params[f"{i}.fc.bias"][chans]
        return ops.act_forward(y, layer["act"]).reshape(y.shape[0], -1, 1, 1), None

    # -- backward -----------------------------------------------------------------

    def post_backward(self, i, params, acc):
        """B layer ``i``: the activation's and batch norm's (or bias's) gradient, on all channels."""
        self.partial[i] = self._output_grad(i, self.program[i], params, acc, self.cache.get(i))

    def _output_grad(self, i, layer, params, acc, bn_cache):
        """The gradient at layer ``i``'s conv or connected output, from the one
        at its activation's output (``reference.conv_output_grad``; a
        connected layer's activation and bias), parameter gradients added to
        ``acc`` (``bn_cache``: the layer's normalised values and 1 / std). A
        conv's is made in the buffer of the gradient at its output, which
        nothing reads after: two temporaries as large as the member's share
        of the output fewer at the step's peak (``footprint.workspace_bytes``)."""
        dy = self.grads_in[i]
        if layer["kind"] == "conv":
            def add(key, grad):
                acc[key] += grad
            return reference.conv_output_grad(layer, self.acts[i], dy, bn_cache, params, add, self.k, inplace=True)
        dz = ops.act_backward(self.acts[i].reshape(dy.shape[0], -1), layer["act"], dy.reshape(dy.shape[0], -1))
        acc[f"{i}.fc.bias"] += dz.sum(axis=0)
        return dz

    def backward(self, i, params, acc, part="all"):
        """Layer ``i``'s share of backward; an A layer's input gradient is
        partial (``reduced``). ``part`` "input" then "weight" split an A
        layer whose input gradient is all-reduced: first that gradient (its
        all-reduce can then run while the weight gradient is computed), then
        the weight gradient from the same output gradient."""
        if self._in_fused(i):
            self._fused_backward(i, params, acc)
            return
        layer = self.program[i]
        j = i - 1
        x = self.acts.get(j)  # (a leading route reads its own inputs)
        if part != "all":
            self._backward_part(i, layer, x, params, acc, part)
            return
        if self.roles[i] == "B":
            dz = self.partial.pop(i)
            if layer["kind"] == "conv":
                key = f"{i}.conv.weight"
                dx, _ = self.k.conv2d_backward(x, params[key], layer["stride"], pads_of(layer), dz, dw=acc[key])
            else:
                flat = x.reshape(x.shape[0], -1)
                acc[f"{i}.fc.weight"] += dz.T @ flat
                dx = (dz @ params[f"{i}.fc.weight"]).reshape(x.shape)
        else:
            share = self.layer_share(layer)
            cache = {i: self.cache.pop(i, None)}
            dy = {i: self.grads_in[i]} if i in self.grads_in else {}  # (the cost's is its own)
            _, dout = reference.backward_layers([share], params, self.acts, cache, dy,
                                                impl=self.k, acc=acc, inplace=True)  # (as _output_grad)
            if layer["kind"] == "route":  # (the group's first layer) its inputs' gradients go back to them
                for src in layer["inputs"]:
                    self.grads_out[src] = own(dout[src]) if src in dout else np.zeros_like(
                        self.acts[src])
                return
            dx = dout.get(j, np.zeros_like(x))
        if self.reduce_dx[i]:
            self.partial_dx[j] = np.ascontiguousarray(dx)  # a partial sum: all-reduced before it joins grads_in
        elif j >= self.first:
            self.grads_in[j] = dx if j not in self.grads_in else self.grads_in[j] + dx
        else:
            self.grads_out[j] = own(dx)  # (all-reduced in place when the group reduces its input)

    def _fused_backward(self, i, params, acc):
        if i != self.fused.first:
            return  # (the pool's gradient runs with the convolution's)
        d, g = self.tile.grad_output, self.grads_in[self.fused.last]
        if g is not d:  # (made anew by a layer after it in the group)
            np.copyto(d, g)
        self.tile.epi_bwd(0, params)
        self.tile.conv_bwd(0, params, acc)
        self.grads_out[self.fused.input] = self.tile.grad_input  # (the arena's: no other step's array takes its place)

    def _backward_part(self, i, layer, x, params, acc, part):
        """An A layer's backward in two parts (``backward``): "input" turns
        its output gradient into the one at the conv or connected output
        (activation, batch norm: their parameter gradients go to ``acc``)
        and computes the partial input gradient; "weight" adds the weight
        gradient from the gradient "input" left (``pending``)."""
        if not self.reduce_dx[i]:
            raise ValueError(f"layer {i}: only an A layer whose input gradient is all-reduced runs in parts")
        conv = layer["kind"] == "conv"
        key = f"{i}.conv.weight" if conv else f"{i}.fc.weight"
        if part == "weight":
            dz = self.pending.pop(i)
            if conv:
                self.k.conv2d_backward(x, params[key], layer["stride"], pads_of(layer), dz, dw=acc[key],
                                       input_grad=False)
            else:
                acc[key] += dz.T @ x.reshape(x.shape[0], -1)
            return
        dz = self._output_grad(i, layer, params, acc, self.cache.pop(i, None))
        if conv:
            dx, _ = self.k.conv2d_backward(x, params[key], layer["stride"], pads_of(layer), dz, weight_grad=False)
        else:
            dx = (dz @ params[key]).reshape(x.shape)
        self.pending[i] = dz
        self.partial_dx[i - 1] = np.ascontiguousarray(dx)  # all-reduced before it joins grads_in
