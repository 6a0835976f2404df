"""Gradients of the reference executor, layer kind by layer kind, against
central finite differences (float64) and against torch autograd.

Input gradients are checked with a one-hot trick: layer 0 is a 1x1 linear
conv reading B*H*W one-hot channels (image n has channel n*H*W + i*W + j set
at (i, j)), so its output at (n, f, i, j) is the single weight
``W0[f, n*H*W + i*W + j]``. Setting W0 makes that output any map x we like,
and the gradient of W0 *is* the gradient of the loss w.r.t. the input of
layer 1: through it, the backward of every parameter-free layer (max-pool,
avgpool, route, reorg, the losses) is checked too.
"""
import itertools

import numpy as np
import pytest

import torch_oracle
from programs import ProgramBuilder
from tilec_runtime import reference, weights

EPS = 1e-6        # central-difference step (parameters are O(1))
FD_RTOL = 1e-6    # truncation ~EPS^2, rounding ~1e-16 * |L| / EPS ~ 1e-10
TORCH_RTOL = 1e-9
FD_MAX_ENTRIES = 48  # per parameter tensor; a random subset beyond that


def onehot_images(b, h, w):
    images = np.zeros((b, b * h * w, h, w))
    for n, i, j in itertools.product(range(b), range(h), range(w)):
        images[n, n * h * w + i * w + j, i, j] = 1.0
    return images


def set_input(params, x):
    """Make layer 0's output equal to ``x`` (B, C, H, W)."""
    c = x.shape[1]
    params["0.conv.weight"][:, :, 0, 0] = x.transpose(1, 0, 2, 3).reshape(c, -1)
    params["0.conv.bias"][:] = 0.0


def distinct_values(shape, rng, spacing=0.05):
    """A random arrangement of values >= ``spacing`` apart: no near-ties."""
    n = int(np.prod(shape))
    return (rng.permutation(n) * spacing - n * spacing / 2).reshape(shape)


# -- the tiny programs: (name, batch, input C/H/W, layers after the trick) --

def _conv(**kw):
    return lambda p: p.conv(**kw)


CASES = {
    "conv-leaky": (2, (2, 5, 6), [_conv(filters=3, size=3, act="leaky")], "cost"),
    "conv-relu-stride2-pad0": (2, (2, 7, 6), [_conv(filters=2, size=3, stride=2, pad=0, act="relu")], "cost"),
    "conv-linear-k5-pad1": (1, (3, 6, 7), [_conv(filters=2, size=5, pad=1)], "cost"),
    "conv-bn-linear": (2, (2, 5, 4), [_conv(filters=3, size=3, bn=True)], "cost"),
    "conv-bn-leaky-stride2": (2, (2, 7, 8), [_conv(filters=2, size=5, stride=2, pad=1, bn=True, act="leaky")], "cost"),
    "conv-bn-relu-1x1": (3, (3, 3, 3), [_conv(filters=2, size=1, pad=0, bn=True, act="relu")], "cost"),
    "maxpool-2-2": (2, (2, 6, 7), [lambda p: p.maxpool(2, 2)], "cost"),
    "maxpool-2-1-asym": (2, (2, 5, 5), [lambda p: p.maxpool(2, 1)], "cost"),
    "maxpool-3-2": (1, (2, 7, 6), [lambda p: p.maxpool(3, 2)], "cost"),
    "maxpool-3-2-explicit-pad0": (2, (1, 7, 8), [lambda p: p.maxpool(3, 2, padding=0)], "cost"),
    "avgpool-connected-softmax": (3, (3, 4, 5), [lambda p: p.avgpool(), lambda p: p.connected(4, act="leaky")],
                                  "softmax"),
    "connected-relu-on-map": (2, (2, 3, 4), [lambda p: p.connected(5, act="relu")], "cost"),
    "softmax-on-map": (2, (2, 3, 3), [], "softmax"),
    "cost-on-map": (2, (2, 4, 3), [], "cost"),
    "route-fanout": (2, (2, 5, 6), [_conv(filters=3, size=3, act="leaky"), lambda p: p.route(1, 0),
                                    _conv(filters=2, size=1, pad=0)], "cost"),
    "route-self": (2, (1, 4, 4), [lambda p: p.route(0, 0), _conv(filters=2, size=3, bn=True)], "cost"),
    "reorg": (2, (8, 4, 6), [lambda p: p.reorg(2), _conv(filters=2, size=1, pad=0)], "cost"),
    "reorg-space-to-depth": (2, (2, 4, 6), [lambda p: p.reorg(2, order="space_to_depth"),
                                            _conv(filters=2, size=1, pad=0)], "cost"),
    "reorg-passthrough": (2, (4, 6, 4), [_conv(filters=2, size=3, stride=2, act="leaky"), lambda p: p.reorg(2, src=0),
                                         lambda p: p.route(2, 1), _conv(filters=2, size=3, bn=True)], "softmax"),
    "dead-branch": (2, (2, 5, 5), [_conv(filters=2, size=3), _conv(filters=2, size=3, src=0)], "cost"),
    "depth-to-space-dcr": (2, (8, 3, 2), [lambda p: p.reorg(2, order="onnx", reverse=True),
                                          _conv(filters=2, size=3, act="leaky")], "cost"),
    "depth-to-space-crd": (2, (8, 2, 3), [lambda p: p.reorg(2, order="space_to_depth", reverse=True),
                                          _conv(filters=2, size=1, pad=0)], "softmax"),
    "local-avgpool-3-2-pad": (2, (2, 7, 6), [lambda p: p.local_avgpool(3, 2, padding=2)], "cost"),
    "local-avgpool-3-1-count-pad": (2, (2, 5, 6), [lambda p: p.local_avgpool(3, 1, padding=3, count_pad=True),
                                                   _conv(filters=2, size=3, bn=True)], "cost"),
    "local-avgpool-2-2-odd": (2, (3, 5, 7), [lambda p: p.local_avgpool(2, 2, padding=0),
                                             lambda p: p.connected(3, act="relu")], "softmax"),
}


def build_case(name, seed=0):
    """(program, params, buffers, images, target, x): float64, all parameters
    random (non-trivial biases and batch-norm gamma/beta)."""
    b, (c, h, w), layers, loss = CASES[name]
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    p = ProgramBuilder(b * h * w, h, w)
    p.conv(c, 1, 1, 0, bn=False, act="linear")
    for add in layers:
        add(p)
    (p.softmax if loss == "softmax" else p.cost)()
    program = p.build()
    params, buffers = weights.init_params(program, seed, "float64")
    for key, v in params.items():
        if key.endswith(".bn.weight"):
            v[:] = rng.uniform(0.5, 1.5, v.shape)
        elif key.endswith("bias"):
            v[:] = rng.standard_normal(v.shape) * 0.5
    pooled = program[1]["kind"] == "maxpool"
    x = distinct_values((b, c, h, w), rng) if pooled else rng.standard_normal((b, c, h, w))
    set_input(params, x)
    out = program[-1]["in_shape"]
    target = rng.integers(0, int(np.prod(out)), b) if loss == "softmax" else rng.standard_normal((b, *out))
    return program, params, buffers, onehot_images(b, h, w), target, x


def loss_of(program, params, buffers, images, target):
    return reference.forward(program, params, {k: v.copy() for k, v in buffers.items()}, images, target)[0]


def test_onehot_trick_reproduces_the_input():
    program, params, buffers, images, target, x = build_case("conv-leaky")
    _, (acts, _) = reference.forward(program, params, buffers, images, target)
    assert np.array_equal(acts[0], x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_finite_differences(name):
    program, params, buffers, images, target, _ = build_case(name)
    loss, grads = reference.train_step(program, params, {k: v.copy() for k, v in buffers.items()}, images, target)
    assert loss == loss_of(program, params, buffers, images, target)
    scale = max(np.abs(g).max() for g in grads.values())
    assert scale > 0
    rng = np.random.default_rng(1)
    for key, p in params.items():
        g = grads.get(key, np.zeros_like(p))  # a parameter that feeds no loss gets none
        assert g.shape == p.shape and g.dtype == p.dtype, key
        flat = p.reshape(-1)
        idx = np.arange(flat.size)
        if flat.size > FD_MAX_ENTRIES:
            idx = rng.choice(flat.size, FD_MAX_ENTRIES, replace=False)
        for i in idx:
            old = flat[i]
            flat[i] = old + EPS
            up = loss_of(program, params, buffers, images, target)
            flat[i] = old - EPS
            down = loss_of(program, params, buffers, images, target)
            flat[i] = old
            fd = (up - down) / (2 * EPS)
            gi = g.reshape(-1)[i]
            assert abs(fd - gi) <= FD_RTOL * (abs(gi) + scale), f"{key}[{i}]: fd {fd!r} vs backward {gi!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_torch(name):
    program, params, buffers, images, target, _ = build_case(name)
    loss, grads = reference.train_step(program, params, {k: v.copy() for k, v in buffers.items()}, images, target)
    tloss, tgrads = torch_oracle.grads(program, params, buffers, images, target)
    assert abs(loss - tloss) <= TORCH_RTOL * abs(tloss)
    assert set(grads) == set(tgrads)
    scale = max(np.abs(g).max() for g in tgrads.values())
    for key, tg in tgrads.items():
        err = np.abs(grads[key] - tg)
        assert np.all(err <= TORCH_RTOL * (np.abs(tg) + scale)), f"{key}: max error {err.max():.3g}"


def test_dead_branch_gets_no_gradient():
    """A layer that feeds nothing reaching the loss has no gradient entry
    (as torch leaves .grad None), and its FD gradient is 0 (checked above)."""
    program, params, buffers, images, target, _ = build_case("dead-branch")
    _, grads = reference.train_step(program, params, buffers, images, target)
    assert "1.conv.weight" not in grads and "1.conv.bias" not in grads
    assert "2.conv.weight" in grads and "0.conv.weight" in grads
