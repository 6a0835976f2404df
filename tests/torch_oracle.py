"""PyTorch as an independent oracle: a program run with torch autograd.

Used only by tests (and benchmarks), never by the product.
"""
import numpy as np
import torch
import torch.nn.functional as F

from tilec_runtime.program import pads_of

TORCH_DTYPES = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}


def _act(z, kind):
    if kind == "leaky":
        return F.leaky_relu(z, 0.1)
    if kind == "relu":
        return F.relu(z)
    return z


def _darknet_source(c, h, w, s):
    """darknet's ``reorg_cpu`` index arithmetic on a (c, h, w) input: for
    flat ``i + w*(j + h*k)``, the flat ``w2 + w*s*(h2 + h*s*c2)``."""
    k, j, i = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    out_c = c // (s * s)
    c2, offset = k % out_c, k // out_c
    w2, h2 = i * s + offset % s, j * s + offset // s
    return (w2 + w * s * (h2 + h * s * c2)).reshape(-1)


def darknet_reorg(x, s):
    """darknet's ``reorg_cpu`` (forward), written out from its index
    arithmetic as a gather, independently of ``ops.reorg_forward``'s
    transpose: output flat ``i + w*(j + h*k)`` reads input flat
    ``w2 + w*s*(h2 + h*s*c2)``."""
    b, c, h, w = x.shape
    return x.reshape(b, -1)[:, _darknet_source(c, h, w, s)].reshape(b, c * s * s, h // s, w // s)


def onnx_depth_to_space(x, s):
    """ONNX DepthToSpace DCR (channel ``(dy*s + dx)*C + c``) from torch's
    pixel_shuffle (CRD, channel ``c*s*s + dy*s + dx``) by swapping the two
    channel factors, independently of ``ops``."""
    b, c, h, w = x.shape
    return F.pixel_shuffle(x.reshape(b, s * s, c // (s * s), h, w).transpose(1, 2).reshape(b, c, h, w), s)


def reorg(x, layer):
    """A reorg layer in torch, by its order and direction."""
    s = layer["stride"]
    if layer["reverse"]:
        return {"space_to_depth": F.pixel_shuffle, "onnx": onnx_depth_to_space}[layer["order"]](x, s)
    return {"space_to_depth": F.pixel_unshuffle, "onnx": onnx_space_to_depth,
            "darknet": darknet_reorg}[layer["order"]](x, s)


def local_avgpool(x, layer):
    """Zero-padded average pooling: torch's avg_pool2d on the padded map,
    divided, without ``count_pad``, by the share of each window inside the map."""
    pt, pb, pl, pr = pads_of(layer)
    k, s = layer["size"], layer["stride"]
    y = F.avg_pool2d(F.pad(x, (pl, pr, pt, pb)), k, s)
    if layer["count_pad"]:
        return y
    inside = F.pad(torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype), (pl, pr, pt, pb))
    return y / F.avg_pool2d(inside, k, s)


def onnx_space_to_depth(x, s):
    """ONNX SpaceToDepth (blocks first: channel ``(dy*s + dx)*C + c``),
    from torch's pixel_unshuffle (channel ``c*s*s + dy*s + dx``) by
    swapping the two channel factors, independently of ``ops``."""
    b, c, h, w = x.shape
    y = F.pixel_unshuffle(x, s).reshape(b, c, s * s, h // s, w // s)
    return y.transpose(1, 2).reshape(b, c * s * s, h // s, w // s)


def forward(program, tparams, tbuffers, images, target):
    """Loss of the program in torch; updates tbuffers like batch_norm(training=True)."""
    acts = {-1: images}
    loss = None
    for layer in program:
        i, kind = layer["index"], layer["kind"]
        x = acts[layer["inputs"][0]]
        if kind == "conv":
            p = layer["pad"]
            bias = None if layer["bn"] else tparams[f"{i}.conv.bias"]
            z = F.conv2d(x, tparams[f"{i}.conv.weight"], bias, stride=layer["stride"], padding=p)
            if layer["bn"]:
                z = F.batch_norm(z, tbuffers[f"{i}.bn.running_mean"], tbuffers[f"{i}.bn.running_var"],
                                 tparams[f"{i}.bn.weight"], tparams[f"{i}.bn.bias"], training=True,
                                 momentum=0.1, eps=1e-5)
            acts[i] = _act(z, layer["act"])
        elif kind == "maxpool":
            pt, pb, pl, pr = pads_of(layer)
            xp = F.pad(x, (pl, pr, pt, pb), value=-float("inf"))
            acts[i] = F.max_pool2d(xp, layer["size"], layer["stride"])
        elif kind == "avgpool":
            acts[i] = x.mean(dim=(2, 3), keepdim=True)
        elif kind == "local_avgpool":
            acts[i] = local_avgpool(x, layer)
        elif kind == "connected":
            y = F.linear(x.reshape(x.shape[0], -1), tparams[f"{i}.fc.weight"], tparams[f"{i}.fc.bias"])
            acts[i] = _act(y, layer["act"]).reshape(y.shape[0], -1, 1, 1)
        elif kind == "route":
            acts[i] = torch.cat([acts[j] for j in layer["inputs"]], dim=1)
        elif kind == "reorg":
            acts[i] = reorg(x, layer)
        elif kind == "softmax":
            loss = F.cross_entropy(x.reshape(x.shape[0], -1), target)
        elif kind == "cost":
            loss = 0.5 * ((x - target.reshape(x.shape)) ** 2).sum() / x.shape[0]
    return loss


def to_torch(arrays, grad=False):
    return {k: torch.tensor(v, requires_grad=grad) for k, v in arrays.items()}


def train(program, params, buffers, batches, steps, lr, momentum, decay):
    """``steps`` SGD steps in torch; returns (losses, params, buffers) as numpy."""
    tparams = to_torch(params, grad=True)
    tbuffers = to_torch(buffers)
    decayed = [v for k, v in tparams.items() if k.endswith((".conv.weight", ".fc.weight"))]
    rest = [v for k, v in tparams.items() if not k.endswith((".conv.weight", ".fc.weight"))]
    opt = torch.optim.SGD([{"params": decayed, "weight_decay": decay}, {"params": rest, "weight_decay": 0.0}],
                          lr=lr, momentum=momentum)
    losses = []
    for step in range(steps):
        images, target = batches.get(step)
        opt.zero_grad()
        loss = forward(program, tparams, tbuffers, torch.tensor(images), torch.tensor(target))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    as_np = lambda d: {k: v.detach().numpy().copy() for k, v in d.items()}  # noqa: E731
    return losses, as_np(tparams), as_np(tbuffers)


def grads(program, params, buffers, images, target):
    """(loss, {key: gradient}) of one forward/backward in torch."""
    tparams = to_torch(params, grad=True)
    loss = forward(program, tparams, to_torch(buffers), torch.tensor(images), torch.tensor(target))
    loss.backward()
    return loss.item(), {k: v.grad.numpy().copy() for k, v in tparams.items() if v.grad is not None}
