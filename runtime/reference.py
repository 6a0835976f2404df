"""The one-device reference executor: whole maps, numpy kernels.

This is the oracle every other execution path is compared with (tiled
execution, generated kernels, sockets), and it is itself compared with
PyTorch autograd and finite differences in the tests.
"""
import numpy as np

from tilec_runtime import ops, region
from tilec_runtime.program import LOSSES, pads_of


def forward(program, params, buffers, images, target, train=True, impl=None):
    """Run the program; returns (loss, state). Updates running statistics
    in ``buffers`` when ``train`` (as torch's batch_norm(training=True)).
    ``impl``: an implementation of the functions of ``ops`` (default ``ops``
    itself; ``tilec_runtime.genops.GeneratedOps`` runs the generated kernels)."""
    acts = {-1: images}
    loss, cache = forward_layers(program, params, buffers, acts, target, train, impl)
    return loss, (acts, cache)


def forward_layers(layers, params, buffers, acts, target, train=True, impl=None):
    """Forward through ``layers`` (a slice of a program), reading inputs from
    and writing outputs to ``acts`` (``acts[-1]`` is the image batch).
    Returns (loss or None, cache for ``backward_layers``)."""
    cache = {}
    loss = None
    k = impl or ops
    for layer in layers:
        i, kind = layer["index"], layer["kind"]
        x = acts[layer["inputs"][0]]
        if kind == "conv":
            z = k.conv2d_forward(x, params[f"{i}.conv.weight"], layer["stride"], pads_of(layer))
            acts[i], bn = conv_epilogue(layer, z, params, buffers, train, k)
            if bn is not None:
                cache[i] = bn
        elif kind == "maxpool":
            acts[i], cache[i] = k.maxpool_forward(x, layer["size"], layer["stride"], pads_of(layer))
        elif kind == "avgpool":
            acts[i] = ops.avgpool_forward(x)
        elif kind == "local_avgpool":
            acts[i] = ops.local_avgpool_forward(x, layer["size"], layer["stride"], pads_of(layer), layer["count_pad"])
        elif kind == "connected":
            y = ops.connected_forward(x, params[f"{i}.fc.weight"], params[f"{i}.fc.bias"])
            acts[i] = ops.act_forward(y, layer["act"]).reshape(y.shape[0], -1, 1, 1)
        elif kind == "route":
            # one input: the same map (no copy; backward hands on its gradient as a view too)
            srcs = [acts[j] for j in layer["inputs"]]
            acts[i] = srcs[0] if len(srcs) == 1 else np.concatenate(srcs, axis=1)
        elif kind == "reorg":
            acts[i] = ops.reorg_forward(x, layer["stride"], layer["order"], layer["reverse"])
        elif kind == "softmax":
            loss, cache[i] = ops.softmax_xent(x.reshape(x.shape[0], -1), target)
            acts[i] = x
        elif kind == "cost":
            loss, cache[i] = ops.sse(x, target.reshape(x.shape))
            acts[i] = x
        elif kind == "region":
            loss, cache[i] = region.forward(x, target, layer)
            acts[i] = x
    return loss, cache


def infer(program, params, buffers, images):
    """Inference (batch-norm running statistics): every layer's output,
    ``{index: array}``. The loss layer outputs what darknet's does at
    inference: softmax the probabilities, region its activated entries
    (``region.activate``), cost its input."""
    acts = {-1: images}
    forward_layers(program[:-1], params, buffers, acts, None, train=False)
    last = program[-1]
    x = acts[last["inputs"][0]]
    if last["kind"] == "softmax":
        x = np.exp(ops.log_softmax(x))
    elif last["kind"] == "region":
        x = region.activate(x, last)
    acts[last["index"]] = x
    del acts[-1]
    return acts


def backward(program, params, images, state, impl=None):
    """Gradients of the loss w.r.t. every parameter, from ``forward``'s state."""
    acts, cache = state
    return backward_layers(program, params, acts, cache, impl=impl)[0]


def conv_epilogue(layer, z, params, buffers, train=True, impl=None, chans=slice(None)):
    """(activation, batch-norm cache (normalised values, 1 / std) or None) of
    conv ``layer`` from its sums ``z``, on channels ``chans`` of its
    parameters: batch norm (training: this batch's statistics, the running
    ones updated; else the running ones) or bias, then the activation."""
    k, i = impl or ops, layer["index"]
    if not layer["bn"]:
        return k.act_forward(z + params[f"{i}.conv.bias"][chans][None, :, None, None], layer["act"]), None
    running_mean, running_var = buffers[f"{i}.bn.running_mean"][chans], buffers[f"{i}.bn.running_var"][chans]
    if train:
        n, mean, m2 = k.bn_stats(z)
        var = m2 / n
        ops.bn_update_running(running_mean, running_var, n, mean, m2)
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    z, xhat, inv_std = k.bn_normalize(z, mean, var, params[f"{i}.bn.weight"][chans], params[f"{i}.bn.bias"][chans])
    return k.act_forward(z, layer["act"]), (xhat, inv_std)


def conv_output_grad(layer, y, dy, bn_cache, params, put, impl=None, inplace=False):
    """The gradient at conv ``layer``'s sums from ``dy`` at its activation's
    output ``y``: the activation's and batch norm's (``bn_cache`` from
    ``conv_epilogue``) or bias's backward; their parameter gradients go to
    ``put(key, gradient)``. ``inplace``: made in ``dy``'s own memory, which
    the caller no longer needs (no temporaries as large as the output)."""
    k, i = impl or ops, layer["index"]
    dz = k.act_backward(y, layer["act"], dy, inplace=inplace)
    if not layer["bn"]:
        put(f"{i}.conv.bias", dz.sum(axis=(0, 2, 3)))
        return dz
    xhat, inv_std = bn_cache
    s1, s2 = k.bn_grad_sums(dz, xhat)
    count = dz.shape[0] * dz.shape[2] * dz.shape[3]
    put(f"{i}.bn.weight", s2.astype(dz.dtype))
    put(f"{i}.bn.bias", s1.astype(dz.dtype))
    return k.bn_backward(dz, xhat, params[f"{i}.bn.weight"], inv_std, s1 / count, s2 / count,
                         inplace=inplace)


def backward_layers(layers, params, acts, cache, dout=None, impl=None, acc=None, inplace=False):
    """Backward through ``layers`` from the loss (if among them) and the
    output gradients in ``dout``. Returns (grads, dout) where ``dout`` now
    holds the gradients of the tensors the layers read but did not produce.
    With ``acc``, each parameter gradient is added to ``acc[key]`` as soon
    as its layer is done (and ``grads`` stays empty): a layer's gradients
    are then all that is held at once, not every layer's (YOLOv2's layers
    18-24 on one device: 136 MB less). ``inplace``: a conv's output
    gradient is made in the array ``dout`` gives for it (``conv_output_grad``),
    which the caller no longer needs."""
    grads = {}
    dout = dict(dout or {})
    k = impl or ops

    def put(key, g):
        if acc is None:
            grads[key] = g
        else:
            acc[key] += g

    def add(j, g):
        if j == -1:
            return  # the network input needs no gradient
        dout[j] = dout[j] + g if j in dout else g

    for layer in reversed(layers):
        i, kind = layer["index"], layer["kind"]
        j = layer["inputs"][0]
        x = acts[j]
        if kind in LOSSES:
            add(j, cache[i].reshape(x.shape))
            continue
        if i not in dout:
            continue  # feeds nothing that reaches the loss
        dy = dout.pop(i)
        if kind == "conv":
            dz = conv_output_grad(layer, acts[i], dy, cache.get(i), params, put, k, inplace=inplace)
            key = f"{i}.conv.weight"
            into = None if acc is None else acc[key]  # (the kernel adds the weight gradient to it)
            dx, dw = k.conv2d_backward(x, params[key], layer["stride"], pads_of(layer), dz, dw=into)
            if into is None:
                grads[key] = dw
            add(j, dx)
        elif kind == "maxpool":
            add(j, k.maxpool_backward(x.shape, layer["size"], layer["stride"], pads_of(layer), cache[i], dy))
        elif kind == "avgpool":
            add(j, ops.avgpool_backward(x.shape, dy))
        elif kind == "local_avgpool":
            add(j, ops.local_avgpool_backward(x.shape, layer["size"], layer["stride"], pads_of(layer),
                                              layer["count_pad"], dy))
        elif kind == "connected":
            dz = ops.act_backward(acts[i].reshape(dy.shape[0], -1), layer["act"], dy.reshape(dy.shape[0], -1))
            dx, dw, db = ops.connected_backward(x, params[f"{i}.fc.weight"], dz)
            put(f"{i}.fc.weight", dw)
            put(f"{i}.fc.bias", db)
            add(j, dx)
        elif kind == "route":
            start = 0
            for src in layer["inputs"]:
                c = acts[src].shape[1]
                add(src, dy[:, start:start + c])
                start += c
        elif kind == "reorg":
            add(j, ops.reorg_backward(dy, layer["stride"], layer["order"], layer["reverse"]))
    return grads, dout


def train_step(program, params, buffers, images, target, impl=None):
    """Forward and backward; returns (loss, grads)."""
    loss, state = forward(program, params, buffers, images, target, train=True, impl=impl)
    return loss, backward(program, params, images, state, impl=impl)
