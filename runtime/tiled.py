"""One device's share of a training step, following the plan.

For each tiled group the device computes every layer on its tile's regions
(halo included), from an input region assembled out of the pieces its peers
send. Backward it propagates the gradient of its own tile through its own
regions: at positions that several devices compute, each holds a partial
gradient, and the true gradient is their sum. So weight gradients are summed
across the group's devices, partial input gradients are summed by their
owners (overlap-add), and batch-norm mean terms are applied by owners only.
Rank 0 also runs the tail group (the layers after the spatial prefix) and
the loss.
"""
import numpy as np

from tilec_runtime import ops, reference
from tilec_runtime.program import param_shapes


def _sl(rng, base):
    """Slice of inclusive range ``rng`` inside an array starting at ``base``."""
    return slice(rng[0] - base, rng[1] - base + 1)


def _rows_cols(region):
    return region[0][1] - region[0][0] + 1, region[1][1] - region[1][0] + 1


class DeviceStep:
    """Executes the plan's schedule for one rank over a ``Comm``."""

    def __init__(self, plan, comm, impl=None):
        self.plan, self.comm, self.rank = plan, comm, comm.rank
        # the functions of ``ops`` (default), or generated ones (tilec_runtime.genops)
        self.ops = impl or ops
        self.program = plan["program"]
        self.batch = plan["batch"]
        self.dtype = np.dtype(plan["dtype"])
        self.groups = []  # (group, my tile or None, members)
        for group in plan["groups"]:
            mine = [t for t in group["tiles"] if t["device"] == self.rank]
            members = sorted(t["device"] for t in group["tiles"])
            self.groups.append((group, mine[0] if mine else None, members))
        self.fwd_in, self.fwd_out, self.bwd_in, self.bwd_out = {}, {}, {}, {}
        # A message's group is the one that consumes the tensor forward (and
        # so sends its gradient backward): a tensor can feed both the next
        # group and the tail, so the consumer side is keyed by group too.
        for m in plan["messages"]:
            forward = m["phase"] == "forward"
            if m["receiver"] == self.rank:
                box, key = (self.fwd_in, (m["group"], m["tensor"])) if forward else (self.bwd_in, m["tensor"])
                box.setdefault(key, []).append(m)
            if m["sender"] == self.rank:
                box, key = (self.fwd_out, m["tensor"]) if forward else (self.bwd_out, (m["group"], m["tensor"]))
                box.setdefault(key, []).append(m)
        self.step_no = 0

    def param_keys(self):
        """The parameters this device holds: those of the groups it computes."""
        keys = []
        for group, tile, _ in self.groups:
            if tile is not None:
                first, last = group["layers"]
                for layer in self.program[first:last + 1]:
                    keys += list(param_shapes(layer))
        return keys

    # -- helpers -------------------------------------------------------------

    def _tag(self, *parts):
        return (self.step_no,) + parts

    def _send_pieces(self, msgs, phase, source, region):
        """Send each message's range, cut out of ``source`` covering ``region``."""
        for m in msgs:
            piece = source[:, :, _sl(m["rows"], region[0][0]), _sl(m["cols"], region[1][0])]
            self.comm.send(m["receiver"], self._tag(phase, m["group"], m["tensor"]), piece)

    def _recv_pieces(self, msgs, phase, target, region, add):
        for m in msgs:
            piece = self.comm.recv(m["sender"], self._tag(phase, m["group"], m["tensor"]))
            view = target[:, :, _sl(m["rows"], region[0][0]), _sl(m["cols"], region[1][0])]
            if piece.shape != view.shape:
                raise ValueError(f"message {m} has shape {piece.shape}, expected {view.shape}")
            if add:
                view += piece
            else:
                view[...] = piece

    # -- the step ------------------------------------------------------------

    def step(self, params, buffers, images=None, target=None):
        """Forward and backward of one step. Returns (loss or None, grads)
        with ``grads`` summed over the devices of each group."""
        self.step_no += 1
        if self.rank == 0 and -1 in self.fwd_out:
            full = ((0, images.shape[2] - 1), (0, images.shape[3] - 1))
            self._send_pieces(self.fwd_out[-1], "f", images.astype(self.dtype, copy=False), full)
        saved, loss, tail_state = [], None, None
        for g, (group, tile, members) in enumerate(self.groups):
            if group["kind"] == "tiled":
                saved.append(self._forward_group(g, group, tile, members, params, buffers) if tile else None)
            elif tile is not None:
                loss, tail_state = self._forward_tail(g, group, params, buffers, target)
        grads = {}
        states = saved + [tail_state]
        for g in range(len(self.groups) - 1, -1, -1):
            group, tile, members = self.groups[g]
            state = states[g]
            if group["kind"] == "tail":
                if tile is not None:
                    grads.update(self._backward_tail(g, params, state))
            elif tile is not None:
                grads.update(self._backward_group(g, group, tile, members, params, state))
        return loss, grads

    # -- tiled groups ----------------------------------------------------------

    def _forward_group(self, g, group, tile, members, params, buffers):
        """Compute the tile's regions; returns what backward needs: every
        activation, or (for a group that recomputes) only its input and the
        batch-norm statistics, which backward must reuse, not recompute."""
        first, _ = group["layers"]
        in_region = tile["input"]
        c_in = self.program[first]["in_shape"][0]
        x = np.zeros((self.batch, c_in, *_rows_cols(in_region)), self.dtype)
        self._recv_pieces(self.fwd_in.get((g, first - 1), []), "f", x, in_region, add=False)
        stats = {}

        def synced_stats(i, owned):
            n, mean, m2 = stats[i] = self._bn_allreduce(i, self.ops.bn_stats(owned), members)
            ops.bn_update_running(buffers[f"{i}.bn.running_mean"], buffers[f"{i}.bn.running_var"], n, mean, m2)
            return n, mean, m2

        acts, caches = self._run_layers(tile, params, x, in_region, synced_stats, send=True)
        if group.get("recompute"):
            return None, None, in_region, (x, stats)
        return acts, caches, in_region, None

    def _run_layers(self, tile, params, x, in_region, bn_stats, send):
        prev, prev_region = x, in_region
        acts, caches = [], []
        for tl in tile["layers"]:
            layer = self.program[tl["layer"]]
            i = layer["index"]
            src = prev[:, :, _sl(tl["src"][0], prev_region[0][0]), _sl(tl["src"][1], prev_region[1][0])]
            if layer["kind"] == "conv":
                z = self.ops.conv2d_forward(src, params[f"{i}.conv.weight"], layer["stride"], tl["pads"])
                if layer["bn"]:
                    owned = z[:, :, _sl(tl["owned"][0], tl["region"][0][0]), _sl(tl["owned"][1], tl["region"][1][0])]
                    n, mean, m2 = bn_stats(i, owned)
                    z, xhat, inv_std = self.ops.bn_normalize(z, mean, m2 / n, params[f"{i}.bn.weight"], params[f"{i}.bn.bias"])
                    cache = (src, xhat, inv_std)
                else:
                    z = z + params[f"{i}.conv.bias"][None, :, None, None]
                    cache = (src,)
                y = self.ops.act_forward(z, layer["act"])
            else:
                y, arg = self.ops.maxpool_forward(src, layer["size"], layer["stride"], tl["pads"])
                cache = (src.shape, arg)
            if y.shape[2:] != _rows_cols(tl["region"]):
                raise AssertionError(f"layer {i}: computed {y.shape[2:]} for region {tl['region']}")
            acts.append(y)
            caches.append(cache)
            if send:
                self._send_pieces(self.fwd_out.get(i, []), "f", y, tl["region"])
            prev, prev_region = y, tl["region"]
        return acts, caches

    def _bn_allreduce(self, i, stats, members):
        n, mean, m2 = stats
        packed = np.concatenate([[float(n)], mean, m2])
        parts = self.comm.allgather(self._tag("bn", i), packed, members)
        c = mean.shape[0]
        return ops.bn_combine([(int(p[0]), p[1:1 + c], p[1 + c:]) for p in parts])

    def _backward_group(self, g, group, tile, members, params, state):
        acts, caches, in_region, kept = state
        if kept is not None:
            x, stats = kept
            acts, caches = self._run_layers(tile, params, x, in_region, lambda i, owned: stats[i], send=False)
        first, _ = group["layers"]
        grads = {}
        layers = tile["layers"]
        dy = np.zeros_like(acts[-1])
        for j in range(len(layers) - 1, -1, -1):
            tl, layer = layers[j], self.program[layers[j]["layer"]]
            i = layer["index"]
            self._recv_pieces(self.bwd_in.get(i, []), "b", dy, tl["region"], add=True)
            prev_region = layers[j - 1]["region"] if j > 0 else in_region
            dprev = np.zeros((self.batch, layer["in_shape"][0], *_rows_cols(prev_region)), self.dtype)
            dsrc = dprev[:, :, _sl(tl["src"][0], prev_region[0][0]), _sl(tl["src"][1], prev_region[1][0])]
            if layer["kind"] == "conv":
                src = caches[j][0]
                dz = self.ops.act_backward(acts[j], layer["act"], dy)
                if layer["bn"]:
                    _, xhat, inv_std = caches[j]
                    s = self.comm.allreduce_sum(self._tag("bng", i), np.concatenate(self.ops.bn_grad_sums(dz, xhat)), members)
                    c = layer["filters"]
                    count = self.batch * layer["out_shape"][1] * layer["out_shape"][2]
                    grads[f"{i}.bn.weight"] = s[c:].astype(self.dtype)
                    grads[f"{i}.bn.bias"] = s[:c].astype(self.dtype)
                    owned = (_sl(tl["owned"][0], tl["region"][0][0]), _sl(tl["owned"][1], tl["region"][1][0]))
                    dz = self.ops.bn_backward(dz, xhat, params[f"{i}.bn.weight"], inv_std, s[:c] / count, s[c:] / count, owned)
                else:
                    grads[f"{i}.conv.bias"] = dz.sum(axis=(0, 2, 3))
                dx, grads[f"{i}.conv.weight"] = self.ops.conv2d_backward(src, params[f"{i}.conv.weight"], layer["stride"], tl["pads"], dz)
            else:
                src_shape, arg = caches[j]
                dx = self.ops.maxpool_backward(src_shape, layer["size"], layer["stride"], tl["pads"], arg, dy)
            dsrc += dx
            dy = dprev
        self._send_pieces(self.bwd_out.get((g, first - 1), []), "b", dy, in_region)
        # weight gradients are partial sums: add them up over the group
        for key in sorted(grads):
            if ".bn." not in key:
                grads[key] = self.comm.allreduce_sum(self._tag("g", key), grads[key], members)
        return grads

    # -- the tail (rank 0) -------------------------------------------------------

    def _forward_tail(self, g, group, params, buffers, target):
        first, last = group["layers"]
        acts = {}
        for (consumer, tensor), msgs in self.fwd_in.items():
            if consumer != g:
                continue
            shape = self.program[tensor]["out_shape"] if tensor >= 0 else self.program[0]["in_shape"]
            acts[tensor] = np.zeros((self.batch, *shape), self.dtype)
            full = ((0, shape[1] - 1), (0, shape[2] - 1))
            self._recv_pieces(msgs, "f", acts[tensor], full, add=False)
        layers = self.program[first:last + 1]
        loss, cache = reference.forward_layers(layers, params, buffers, acts, target, train=True, impl=self.ops)
        return loss, (layers, acts, cache)

    def _backward_tail(self, g, params, state):
        layers, acts, cache = state
        grads, dout = reference.backward_layers(layers, params, acts, cache, impl=self.ops)
        for (consumer, tensor), msgs in self.bwd_out.items():
            if consumer != g:
                continue
            shape = self.program[tensor]["out_shape"]
            grad = dout.get(tensor)
            if grad is None:
                grad = np.zeros((self.batch, *shape), self.dtype)
            self._send_pieces(msgs, "b", grad, ((0, shape[1] - 1), (0, shape[2] - 1)))
        return grads
