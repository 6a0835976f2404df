"""One tile of a fused layer group, run unit by unit with the generated kernels.

A kernel spec (``tilec_runtime.lower``, plain data) lists the units of one
tile and where each buffer lives in one arena. ``TileStep`` allocates (or is
given) the arena once and then runs steps without allocating: convolution
with batch-norm statistics taken band by band, normalisation and activation
fused into the following max-pool (or written out when no pool follows), and
backward with the activation and batch-norm gradients fused into the
convolution's backward bands.

The stages are the schedule's ops (``tilec.plan.schedule``): the executor
calls them in the plan's order and does the communication in between. The
batch-norm statistics and gradient sums a stage leaves in ``stats(j)`` and
``sums(j)`` are this tile's partial ones; the executor all-reduces them in
place before the next stage reads them. Weight gradients are added into the
accumulators the executor passes (``acc``): partial sums over this tile's
regions, which the bucket all-reduce completes.
"""
import numpy as np

from tilec_runtime.lower import scratch_bytes
from tilec_runtime.memplan import round_up


class _Unit:
    """One unit's views into the arena, its small vectors and parameter keys."""


def _window(src):
    r0, c0, h, w = src
    return slice(r0, r0 + h), slice(c0, c0 + w)


class TileStep:
    """Forward and backward stages of one tile of one group, from its kernel spec.

    ``x``: the group's input region (B, C, h, w), filled by the executor
    before the forward; ``scratch``: the device's scratch bytes, shared by
    all its tiles (the im2col workspace, and what lives only during a
    tile's backward: ``tilec_runtime.lower.scratch_buffers``), else
    allocated.
    """

    def __init__(self, spec, kernels, dtype, x, scratch=None):
        self.spec = spec
        self.k = k = kernels
        dt = self.dtype = np.dtype(dtype)
        b = spec["batch"]
        # zeros, not empty: the arena is allocated once, and clean numbers
        # keep a bug from reading garbage that happens to look plausible
        self.arena = np.zeros(spec["arena"], dt)
        self.arg_arena = np.zeros(spec["arg_arena"], np.int16)
        need = scratch_bytes(spec, dt.itemsize)
        scratch = np.zeros(need, np.uint8) if scratch is None else scratch
        if scratch.nbytes < need:
            raise ValueError(f"scratch of {scratch.nbytes} bytes for a tile that needs {need}")
        split = round_up(spec["scratch"] * dt.itemsize)
        self.scratch = scratch[:spec["scratch"] * dt.itemsize].view(dt)
        self.scratch_args = scratch[split:split + 2 * spec["scratch_args"]].view(np.int16)
        self.ws = self.scratch[:max(spec["workspace"], 1)] if spec["workspace"] else np.empty(1, dt)
        self.tstride = spec.get("thread_stride", 0)  # (each thread's bands in one place from conv to conv)
        if x.shape != (b, *spec["input"]):
            raise ValueError(f"tile input {x.shape} is not the spec's {(b, *spec['input'])}")
        self.x = x
        self.grad_input = self._view("din", (b, *spec["input"])) if spec["input_grad"] else None
        self.units = []
        prev = x
        for j, op in enumerate(spec["ops"]):
            u = _Unit()
            u.spec = op
            u.kind, i = op["kind"], op["layer"]
            rs, cs = _window(op["src"])
            u.src = prev[:, :, rs, cs]
            last = (op["pool"] or op) if u.kind == "conv" else op
            c_out = op["filters"] if u.kind == "conv" else op["channels"]
            u.out = self._view(f"out{j}", (b, c_out, *last["out"]))
            u.d = self._view(f"d{j}", u.out.shape)
            if j > 0:
                u.dst = self.units[j - 1].d
            else:
                u.dst = self.grad_input
            u.dx = u.dst[:, :, rs, cs] if u.dst is not None else None
            if u.kind == "conv" and op["pool"] or u.kind == "maxpool":
                u.arg = self._view(f"arg{j}", u.out.shape)
            if u.kind == "conv":
                self._conv_unit(u, op, b, dt, j)
            self.units.append(u)
            prev = u.out
        # layer whose output a unit hands on -> unit position
        self.produces = {(u.spec["pool"] or u.spec)["layer"] if u.kind == "conv" else u.spec["layer"]: j
                         for j, u in enumerate(self.units)}
        self.output = self.units[-1].out
        self.grad_output = self.units[-1].d

    def _conv_unit(self, u, op, b, dt, j):
        f, i = op["filters"], op["layer"]
        u.bands = op.get("stream")
        if u.bands:  # its output a band at a time (``tilec_runtime.lower.streams``): flat buffers, cut per band
            u.z = None
            u.zflat = self._flat(f"z{j}")
            u.bandflat, u.bandargs = self._flat(f"band{j}"), self._flat(f"bandarg{j}")
        else:
            u.z = self._view(f"z{j}", (b, f, *op["out"]))
        u.pre, u.act = self.k.pre[op["pre"]], self.k.act[op["act"]]
        u.pads, u.owned = tuple(op["pads"]), tuple(op["owned"])
        u.w = f"{i}.conv.weight"
        if op["pre"] == "bn":
            u.gamma, u.beta = f"{i}.bn.weight", f"{i}.bn.bias"
            u.rmean, u.rvar = f"{i}.bn.running_mean", f"{i}.bn.running_var"
            u.n, u.mean, u.m2 = np.zeros(1), np.zeros(f), np.zeros(f)
            u.mean_t, u.inv_t, u.m1_t, u.m2_t = (np.zeros(f, dt) for _ in range(4))
            u.s2 = np.zeros(f)
        else:
            u.gamma = u.mean_t = u.inv_t = u.n = u.s2 = None
            u.beta = f"{i}.conv.bias"
        u.s1 = np.zeros(f)
        u.open = False  # statistics being gathered for this step
        if op["pool"]:
            p = op["pool"]
            u.prs, u.pcs = _window(p["src"])
            u.da = None if op.get("regen") else self._view(f"da{j}", u.z.shape)  # (None: made again by band)
            u.pool_grad = (u.d, u.arg, p["size"], p["stride"], p["pads"], tuple(p["src"]))

    def _view(self, name, shape):
        """A buffer's view: in the tile's own arenas or in the device's scratch."""
        return self._flat(name).reshape(shape)

    def _flat(self, name):
        spec = self.spec
        for where, array in (("buffers", self.arena), ("scratch_buffers", self.scratch),
                             ("arg_buffers", self.arg_arena), ("scratch_arg_buffers", self.scratch_args)):
            if name in spec[where]:
                off, size = spec[where][name]
                return array[off:off + size]
        raise KeyError(name)

    # -- a streamed conv: its output a band of rows at a time ---------------------

    def _band_conv(self, u, params, z0, z1, stats=None):
        """Output rows [z0, z1) of streamed unit ``u`` into its band buffer
        (returned, (B, F, z1 - z0, wo)); with ``stats`` = (r0, r1), the
        batch-norm statistics of its owned cells in rows [r0, r1) merged
        into the unit's. The band's own conv: its input rows and the
        padding of the map's borders it reaches."""
        s = u.spec
        b, f, wo = self.spec["batch"], s["filters"], s["out"][1]
        xb, pads = self._band_input(u, z0, z1)
        z = u.zflat[:b * f * (z1 - z0) * wo].reshape(b, f, z1 - z0, wo)
        if stats is None:
            self.k.conv_forward(xb, params[u.w], s["stride"], pads, z, self.ws, s["band"], tstride=self.tstride)
            return z
        or0, or1, oc0, oc1 = u.owned
        a, e = max(or0, stats[0], z0) - z0, min(or1, stats[1], z1) - z0
        owned = (a, max(a, e), oc0, oc1)
        self.k.conv_forward(xb, params[u.w], s["stride"], pads, z, self.ws, s["band"], owned, u.n, u.mean, u.m2,
                            tstride=self.tstride)
        return z

    @staticmethod
    def _band_rows(u, z0, z1):
        """(the input rows output rows [z0, z1) of ``u`` read, their pads)."""
        k, st = u.spec["size"], u.spec["stride"]
        h = u.src.shape[2]
        lo, hi = z0 * st - u.pads[0], (z1 - 1) * st - u.pads[0] + k
        return slice(max(lo, 0), min(hi, h)), (max(0, -lo), max(0, hi - h), u.pads[2], u.pads[3])

    def _band_input(self, u, z0, z1):
        rows, pads = self._band_rows(u, z0, z1)
        return u.src[:, :, rows], pads

    def _band_pool(self, u, z0, z1, p0, p1):
        """(rows of the band's output the pool reads (r0, c0, h, w), its pads)
        for pool rows [p0, p1) of a band of output rows [z0, z1)."""
        p = u.spec["pool"]
        r0, c0, h, w = p["src"]
        size, st = p["size"], p["stride"]
        lo, hi = p0 * st - p["pads"][0], (p1 - 1) * st - p["pads"][0] + size
        top, bottom = max(0, -lo), max(0, hi - h)
        lo, hi = max(lo, 0), min(hi, h)
        return (r0 + lo - z0, c0, hi - lo, w), (top, bottom, p["pads"][2], p["pads"][3])

    def _band_pool_grad(self, u, z0, z1, p0, p1):
        """The fused pool's gradient and argmax of pool rows [p0, p1), copied
        contiguous (the kernels read whole images), as ``act_grad`` takes it."""
        b, f, pw = self.spec["batch"], u.spec["filters"], u.spec["pool"]["out"][1]
        n = b * f * (p1 - p0) * pw
        dp = u.bandflat[:n].reshape(b, f, p1 - p0, pw)
        arg = u.bandargs[:n].reshape(b, f, p1 - p0, pw)
        np.copyto(dp, u.d[:, :, p0:p1])
        np.copyto(arg, u.arg[:, :, p0:p1])
        window, pads = self._band_pool(u, z0, z1, p0, p1)
        return dp, arg, u.spec["pool"]["size"], u.spec["pool"]["stride"], pads, window

    def _stream_forward(self, u, params):
        """The normalised, activated and pooled output, band by band."""
        gamma = params[u.gamma] if u.gamma is not None else None
        b, f, pw = self.spec["batch"], u.spec["filters"], u.spec["pool"]["out"][1]
        for z0, z1, p0, p1 in u.bands:
            z = self._band_conv(u, params, z0, z1)
            (r0, c0, h, w), pads = self._band_pool(u, z0, z1, p0, p1)
            n = b * f * (p1 - p0) * pw
            y = u.bandflat[:n].reshape(b, f, p1 - p0, pw)
            arg = u.bandargs[:n].reshape(b, f, p1 - p0, pw)
            self.k.pool_forward(z[:, :, r0:r0 + h, c0:c0 + w], u.spec["pool"]["size"], u.spec["pool"]["stride"],
                                pads, y, arg, u.pre, u.act, u.mean_t, u.inv_t, gamma, params[u.beta],
                                **self._split(u))
            u.out[:, :, p0:p1] = y
            u.arg[:, :, p0:p1] = arg

    def _split(self, u):
        """How unit ``u``'s epilogue and activation gradient split the map
        between the threads (the kernels' ``by_rows`` and ``by_images``): as
        its conv does (``splits_rows``, ``splits_images``), so that each
        thread keeps its own part of the map from kernel to kernel."""
        if u.kind != "conv":
            return {}
        s, m = u.spec, self.k.module
        args = (s["out"][0], s["out"][1], s["band"], s["filters"], self.spec["batch"])
        return {"by_rows": m.splits_rows(*args), "by_images": m.splits_images(*args)}

    def splits_images(self, j=0):
        """Whether the threads of unit ``j`` split its images (the maps it
        reads and writes; unit 0 reads the tile's input): who clears a
        gradient of those maps or copies one in (``zero_rows``,
        ``copy_rows``) then takes the same images."""
        return bool(self._split(self.units[j]).get("by_images"))

    def output_of(self, layer):
        """The forward output of ``layer`` (a layer some unit hands on)."""
        return self.units[self.produces[layer]].out

    def grad_of(self, layer):
        """The gradient buffer of ``layer``'s output (see ``output_of``)."""
        return self.units[self.produces[layer]].d

    # -- forward stages --------------------------------------------------------

    def conv_fwd(self, j, params, rows=None):
        """The convolution of unit ``j`` (only output ``rows``, half-open, if
        given), merging this tile's batch-norm statistics of them."""
        u, s = self.units[j], self.units[j].spec
        if u.n is None and u.bands:
            return  # (no statistics to take: its epilogue makes each band)
        if u.n is None:
            self.k.conv_forward(u.src, params[u.w], s["stride"], u.pads, u.z, self.ws, s["band"], rows=rows,
                                tstride=self.tstride)
            return
        if not u.open:
            u.n[0] = 0.0
            u.mean.fill(0.0)
            u.m2.fill(0.0)
            u.open = True
        if u.bands:  # the statistics alone, band by band (each conv at least a GEMM band of rows, counting ``rows``)
            ra, rb = rows if rows is not None else (0, s["out"][0])
            for z0, z1, _, _ in u.bands:
                a, e = max(z0, ra), min(z1, rb)
                if a < e:
                    c1 = min(s["out"][0], max(e, a + s["band"]))
                    self._band_conv(u, params, min(a, c1 - s["band"]), c1, (a, e))
            return
        self.k.conv_forward(u.src, params[u.w], s["stride"], u.pads, u.z, self.ws, s["band"], u.owned, u.n, u.mean,
                            u.m2, rows=rows, tstride=self.tstride)

    def stats(self, j):
        """(n, mean, m2) of unit ``j``: this tile's, until the executor combines them in place."""
        u = self.units[j]
        return u.n, u.mean, u.m2

    def epi_fwd(self, j, params, buffers, running=True):
        """Batch norm (from the combined statistics; ``running``: also update
        the running statistics) or bias, the activation and a fused pool."""
        u = self.units[j]
        if u.gamma is not None:
            if running:
                self.k.bn_constants(u.n[0], u.mean, u.m2, u.mean_t, u.inv_t, buffers[u.rmean], buffers[u.rvar])
            else:
                self.k.bn_constants(u.n[0], u.mean, u.m2, u.mean_t, u.inv_t)
            u.open = False
        self._epilogue(u, params)

    def _epilogue(self, u, params):
        if u.bands:
            self._stream_forward(u, params)
            return
        gamma = params[u.gamma] if u.gamma is not None else None
        beta = params[u.beta]
        if u.spec["pool"]:
            p = u.spec["pool"]
            self.k.pool_forward(u.z[:, :, u.prs, u.pcs], p["size"], p["stride"], p["pads"], u.out, u.arg,
                                u.pre, u.act, u.mean_t, u.inv_t, gamma, beta, **self._split(u))
        else:
            self.k.bn_act(u.z, u.out, u.pre, u.act, u.mean_t, u.inv_t, gamma, beta, **self._split(u))

    def pool_fwd(self, j):
        u, s = self.units[j], self.units[j].spec
        self.k.pool_forward(u.src, s["size"], s["stride"], s["pads"], u.out, u.arg)

    def recompute(self, params):
        """The forward again from the kept input, normalising with the
        constants of this step's forward (no statistics, no running update)."""
        for j, u in enumerate(self.units):
            if u.kind == "maxpool":
                self.pool_fwd(j)
                continue
            s = u.spec
            if not u.bands:  # (a streamed conv makes its bands in its epilogue)
                self.k.conv_forward(u.src, params[u.w], s["stride"], u.pads, u.z, self.ws, s["band"],
                                    tstride=self.tstride)
            self._epilogue(u, params)

    # -- backward stages -------------------------------------------------------

    def epi_bwd(self, j, params):
        """The activation's (and a fused pool's) gradient, and this tile's
        batch-norm gradient sums (or bias gradient) in ``sums(j)``."""
        u = self.units[j]
        g, pool = (u.da, u.pool_grad) if u.spec["pool"] else (u.d, None)
        u.s1.fill(0.0)
        if u.bands:
            self._stream_sums(u, params)
            return
        if u.gamma is not None:
            u.s2.fill(0.0)
            self.k.act_grad(g, u.z, u.pre, u.act, u.s1, u.s2, u.mean_t, u.inv_t, params[u.gamma], params[u.beta],
                            pool, **self._split(u))
        else:
            self.k.act_grad(g, u.z, u.pre, u.act, u.s1, None, None, None, None, params[u.beta], pool,
                            **self._split(u))

    def _stream_sums(self, u, params):
        bn = u.gamma is not None
        if bn:
            u.s2.fill(0.0)
        for z0, z1, p0, p1 in u.bands:
            z = self._band_conv(u, params, z0, z1)
            self.k.act_grad(None, z, u.pre, u.act, u.s1, u.s2 if bn else None, u.mean_t if bn else None,
                            u.inv_t if bn else None, params[u.gamma] if bn else None, params[u.beta],
                            self._band_pool_grad(u, z0, z1, p0, p1), **self._split(u))

    def sums(self, j):
        """(sum dy, sum dy*xhat) of unit ``j`` (this tile's until combined in place)."""
        u = self.units[j]
        return u.s1, u.s2

    def conv_bwd(self, j, params, acc):
        """Batch-norm backward (mean terms on owned cells), the weight
        gradient added into ``acc`` and the input gradient into the previous
        unit's (or the group input's) gradient buffer."""
        u, s = self.units[j], self.units[j].spec
        g = u.da if s["pool"] else u.d
        regen = None
        if s.get("regen"):  # the gradient at the conv output is made again band by band (z stands for its shape)
            g, regen = u.z, (u.pool_grad, u.pre, u.act, u.z, params[u.beta])
        bn = None
        if u.gamma is not None:
            self.k.bn_grad_constants(u.s1, u.s2, float(s["count"]), u.m1_t, u.m2_t, acc[u.gamma], acc[u.beta])
            bn = (u.z, u.mean_t, u.inv_t, params[u.gamma], u.m1_t, u.m2_t)
        else:
            self.k.add_sums(u.s1, acc[u.beta])
        if u.dst is not None:
            self.k.zero_rows(u.dst, self.splits_images(j))
        if u.bands:  # each band made again: its gradient, its batch norm's, its weight and input gradients' share
            for z0, z1, p0, p1 in u.bands:
                z = self._band_conv(u, params, z0, z1)
                or0, or1, oc0, oc1 = u.owned
                a, e = max(or0, z0) - z0, min(or1, z1) - z0
                pool = self._band_pool_grad(u, z0, z1, p0, p1)
                rows, pads = self._band_rows(u, z0, z1)
                dx = u.dx[:, :, rows] if u.dx is not None else None  # (rows two bands read: added by both)
                bnb = (z, *bn[1:]) if bn is not None else None
                self.k.conv_backward(u.src[:, :, rows], params[u.w], s["stride"], pads, z, self.ws, s["band"],
                                     acc[u.w], dx, bnb,
                                     (a, max(a, e), oc0, oc1), accumulate=True,
                                     regen=(pool, u.pre, u.act, z, params[u.beta]), tstride=self.tstride)
            return
        self.k.conv_backward(u.src, params[u.w], s["stride"], u.pads, g, self.ws, s["band"], acc[u.w], u.dx, bn,
                             u.owned, accumulate=True, regen=regen, tstride=self.tstride)

    def pool_bwd(self, j):
        u, s = self.units[j], self.units[j].spec
        if u.dst is not None:
            split = self._split(self.units[j - 1]) if j > 0 else {}
            self.k.zero_rows(u.dst, bool(split.get("by_images")))
            self.k.pool_backward(u.d, u.arg, s["size"], s["stride"], s["pads"], u.dx, **split)
