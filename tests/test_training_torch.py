"""Training with the reference executor equals training in PyTorch; the
optimiser, data, and weights-file helpers behave as documented."""
import os

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

import torch_oracle
from programs import ProgramBuilder, random_stacks
from test_tiled import well_conditioned
from tilec_runtime import data, optim, reference, weights
from tilec_runtime.errors import WeightsError
from tilec_runtime.program import decays

RTOL = {"float64": 1e-9, "float32": 1e-4}
LR, MOMENTUM, DECAY = 0.05, 0.9, 1e-2


def train_reference(program, params, buffers, batches, steps, lr, momentum, decay):
    opt = optim.SGD(lr, momentum, decay)
    losses = []
    for step in range(steps):
        images, target = batches.get(step)
        loss, grads = reference.train_step(program, params, buffers, images, target)
        opt.step(params, grads)
        losses.append(loss)
    return losses


def assert_state_close(ours, theirs, rtol, what, start=None, exact=None):
    """Same keys, dtypes and shapes; each tensor within rtol of its own scale,
    or of the largest change of any tensor since ``start``: a parameter whose
    gradient is 0 analytically (the bias of a conv feeding a batch norm) has
    a rounding-level gradient, relative to the others' not its own.

    With ``exact`` (the float64 run from the same float32 values), float32 is
    judged against its own conditioning: ``ours`` may also differ from
    ``theirs`` by up to 3 times ``theirs``' own distance to the exact result
    (a scale-invariant weight feeding a batch norm over a few values crosses
    zero and amplifies float32 rounding a thousandfold in torch too)."""
    assert set(ours) == set(theirs), what
    floor = 1e-300
    if start is not None:
        floor = max((np.abs(theirs[k].astype(np.float64) - start[k]).max() for k in theirs), default=floor)
    for key, t in theirs.items():
        a = ours[key]
        assert a.dtype == t.dtype and a.shape == t.shape, key
        scale = max(np.abs(t).max(), floor)
        err = np.abs(a.astype(np.float64) - t).max()
        allowed = rtol * scale
        if exact is not None:
            allowed = max(allowed, 3 * np.abs(t.astype(np.float64) - exact[key]).max())
        assert err <= allowed, f"{what} {key}: max error {err:.3g}, scale {scale:.3g}, allowed {allowed:.3g}"


def stable_lr(program, params, buffers, batches):
    """LR scaled so that a first step moves no weight by more than ~LR of the
    largest weight: random deep linear stacks without batch norm can have
    gradients of 1e3 and would diverge (and compare chaotic numbers)."""
    images, target = batches.get(0)
    _, grads = reference.train_step(program, {k: v.astype(np.float64) for k, v in params.items()},
                                    {k: v.astype(np.float64) for k, v in buffers.items()},
                                    images.astype(np.float64), target)
    g = max(np.abs(v).max() for v in grads.values())
    p = max(np.abs(v).max() for v in params.values())
    return LR * min(1.0, p / g) if g > 0 else LR  # g == 0: every unit dead (relu)


def _scale_invariant_bn():
    """Found by hypothesis: a 1x1 single-filter conv into a batch norm over
    14 values; the conv weight starts at -0.028 and crosses zero, where the
    loss is scale-invariant in it: float32 rounding is amplified ~1000x (in
    torch too), so float32 is judged against its own conditioning."""
    b = ProgramBuilder(1, 5, 15)
    b.maxpool(2, 2, 0)
    b.conv(1, 1, 1, 0, bn=True, act="linear")
    b.cost()
    return b.build()


@settings(max_examples=25, deadline=None)
@given(random_stacks(), st.sampled_from(["float64", "float32"]), st.integers(2, 3), st.integers(0, 2**16))
@example(_scale_invariant_bn(), "float32", 2, 58926)
def test_sgd_training_matches_torch(program, dtype, batch, seed):
    """Three SGD steps with momentum and weight decay: losses, weights and
    batch-norm running statistics equal torch's (float64: 1e-9; float32:
    1e-4, or as close as float32's own conditioning allows)."""
    # A batch norm over 2 values passes back an input gradient that is zero but for eps (both of its
    # mean terms remove all of dy): in float32 it is rounding noise, which every weight before it then
    # follows, and two correct implementations round it apart (found: layer 2's weights 8.3e-5 apart,
    # allowed 5.9e-5, batch 2 over a 1x1 map).
    assume(dtype == "float64" or all(batch * layer["out_shape"][1] * layer["out_shape"][2] > 2
                                     for layer in program if layer["kind"] == "conv" and layer["bn"]))
    params, buffers = weights.init_params(program, seed, dtype)
    p0 = {k: v.copy() for k, v in params.items()}
    b0 = {k: v.copy() for k, v in buffers.items()}
    batches = data.generated_batches(program, batch, seed, dtype)
    lr = stable_lr(program, params, buffers, batches)
    up = lambda d: {k: v.astype(np.float64) for k, v in d.items()}  # noqa: E731
    target = batches.target if batches.target.dtype.kind in "iu" else batches.target.astype(np.float64)
    exact = data.BatchSource(batches.images.astype(np.float64), target, batch)
    # where a kink decides a branch (a ReLU that kills a batch norm's input), any two correct
    # implementations part by far more than rounding: nothing to compare (test_tiled.well_conditioned)
    assume(well_conditioned(program, up(p0), up(b0), exact, 3,
                            optimizer={"lr": lr, "momentum": MOMENTUM, "decay": DECAY}))
    losses = train_reference(program, params, buffers, batches, 3, lr, MOMENTUM, DECAY)
    tlosses, tparams, tbuffers = torch_oracle.train(program, p0, b0, batches, 3, lr, MOMENTUM, DECAY)
    rtol = RTOL[dtype]
    assert np.all(np.isfinite(losses))
    allowed = rtol * np.abs(tlosses)
    xparams = xbuffers = None
    if dtype == "float32":
        xlosses, xparams, xbuffers = torch_oracle.train(program, up(p0), up(b0), exact, 3, lr, MOMENTUM, DECAY)
        allowed = np.maximum(allowed, 3 * np.abs(np.subtract(tlosses, xlosses)))
    assert np.all(np.abs(np.subtract(losses, tlosses)) <= allowed), (losses, tlosses)
    assert_state_close(params, tparams, rtol, "param", p0, xparams)
    assert_state_close(buffers, tbuffers, rtol, "buffer", b0, xbuffers)
    # the test has teeth: the weights moved by much more than the tolerance
    moved = max(np.abs(params[k].astype(np.float64) - p0[k]).max() for k in params)
    assert moved > 10 * rtol * max(np.abs(v).max() for v in p0.values())


# -- the optimiser -----------------------------------------------------------

KEYS = {"0.conv.weight": (3, 2, 3, 3), "0.bn.weight": (3,), "0.bn.bias": (3,), "2.conv.weight": (2, 3, 1, 1),
        "2.conv.bias": (2,), "4.fc.weight": (5, 8), "4.fc.bias": (5,)}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("momentum,decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.1), (0.9, 0.1)])
def test_sgd_matches_torch_optim(momentum, decay, dtype):
    """Our SGD against torch.optim.SGD, decay on conv/fc weights only."""
    rng = np.random.default_rng(5)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in KEYS.items()}
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    topt = torch.optim.SGD([{"params": [v for k, v in tparams.items() if decays(k)], "weight_decay": decay},
                            {"params": [v for k, v in tparams.items() if not decays(k)], "weight_decay": 0.0}],
                           lr=0.1, momentum=momentum)
    opt = optim.SGD(0.1, momentum, decay)
    for _ in range(4):
        grads = {k: rng.standard_normal(s).astype(dtype) for k, s in KEYS.items()}
        for k, v in tparams.items():
            v.grad = torch.tensor(grads[k].copy())
        topt.step()
        opt.step(params, grads)
    rtol = 1e-15 if dtype == "float64" else 1e-6
    assert_state_close(params, {k: v.detach().numpy() for k, v in tparams.items()}, rtol, "param")


def test_weight_decay_only_on_conv_and_fc_weights():
    """With zero gradients one step is p -= lr * decay * p for conv/fc
    weights (d = g + decay * p), and leaves biases and batch norm alone."""
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s) for k, s in KEYS.items()}
    before = {k: v.copy() for k, v in params.items()}
    optim.SGD(0.5, 0.9, 0.1).step(params, {k: np.zeros(s) for k, s in KEYS.items()})
    for k, v in params.items():
        if k.endswith((".conv.weight", ".fc.weight")):
            np.testing.assert_allclose(v, before[k] * (1 - 0.5 * 0.1), rtol=1e-15)
        else:
            assert np.array_equal(v, before[k]), k


def test_sgd_state_round_trip():
    """Resuming from state() continues exactly as an uninterrupted run."""
    rng = np.random.default_rng(1)
    grads = [{k: rng.standard_normal(s) for k, s in KEYS.items()} for _ in range(4)]
    start = {k: rng.standard_normal(s) for k, s in KEYS.items()}
    a = {k: v.copy() for k, v in start.items()}
    opt = optim.SGD(0.1, 0.9, 0.01)
    for g in grads:
        opt.step(a, g)
    b = {k: v.copy() for k, v in start.items()}
    first = optim.SGD(0.1, 0.9, 0.01)
    for g in grads[:2]:
        first.step(b, g)
    second = optim.SGD(0.1, 0.9, 0.01)
    second.load_state({k: v.copy() for k, v in first.state().items()})
    for g in grads[2:]:
        second.step(b, g)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


# -- data ---------------------------------------------------------------------

@pytest.mark.parametrize("n,batch", [(5, 2), (6, 3), (3, 7), (4, 4)])
def test_batch_source_wraps_consecutively(n, batch):
    """Step k takes items k*batch .. k*batch + batch - 1, modulo n: over
    enough steps the items come in order 0, 1, ..., n-1, 0, 1, ..."""
    images = np.arange(n, dtype=np.float64)[:, None, None, None] * np.ones((1, 1, 2, 2))
    labels = np.arange(n) * 10
    source = data.BatchSource(images, labels, batch)
    steps = 2 * n  # 2 * n * batch items: a whole number of passes
    got_images = np.concatenate([source.get(s)[0][:, 0, 0, 0] for s in range(steps)])
    got_labels = np.concatenate([source.get(s)[1] for s in range(steps)])
    expect = np.tile(np.arange(n), steps * batch // n)
    assert np.array_equal(got_images, expect)
    assert np.array_equal(got_labels, expect * 10)
    assert all(source.get(s)[0].shape == (batch, 1, 2, 2) for s in range(3))


# -- weights ---------------------------------------------------------------

def small_program():
    p = ProgramBuilder(2, 6, 5)
    p.conv(3, 3, bn=True, act="leaky")
    p.maxpool(2, 2)
    p.conv(2, 1, pad=0, act="relu")
    p.avgpool()
    p.connected(4)
    p.softmax()
    return p.build()


def test_init_params_deterministic_from_seed():
    prog = small_program()
    a, ab = weights.init_params(prog, 7, "float64")
    b, bb = weights.init_params(prog, 7, "float64")
    c, _ = weights.init_params(prog, 8, "float64")
    assert set(a) == set(b) and set(ab) == set(bb)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(ab[k], bb[k]) for k in ab)
    assert not np.array_equal(a["0.conv.weight"], c["0.conv.weight"])
    f32, _ = weights.init_params(prog, 7, "float32")
    assert all(f32[k].dtype == np.float32 and np.array_equal(f32[k], a[k].astype(np.float32)) for k in a)
    assert np.all(a["0.bn.weight"] == 1) and np.all(a["0.bn.bias"] == 0) and np.all(a["2.conv.bias"] == 0)
    assert np.all(ab["0.bn.running_mean"] == 0) and np.all(ab["0.bn.running_var"] == 1)


def test_init_params_layer_streams_independent():
    """Adding a layer (at the end) does not change the others' weights."""
    prog = small_program()
    p = ProgramBuilder(2, 6, 5)
    p.conv(3, 3, bn=True, act="leaky")
    p.maxpool(2, 2)
    p.conv(2, 1, pad=0, act="relu")
    p.avgpool()
    p.connected(4)
    p.connected(3)
    p.softmax()
    longer = p.build()
    a, _ = weights.init_params(prog, 3)
    b, _ = weights.init_params(longer, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # and two layers of the same shape draw different weights
    p = ProgramBuilder(3, 5, 5)
    p.conv(3, 3)
    p.conv(3, 3)
    p.cost()
    twins, _ = weights.init_params(p.build(), 3)
    assert not np.array_equal(twins["0.conv.weight"], twins["1.conv.weight"])


def test_init_params_he_normal_scale():
    """Sample std of a 9216-entry conv weight is sqrt(2 / fan_in) within 5%
    (std error of a sample std ~ 1/sqrt(2n) = 0.7%: > 7 sigma)."""
    p = ProgramBuilder(16, 3, 3)
    p.conv(64, 3)
    p.cost()
    w = weights.init_params(p.build(), 0, "float64")[0]["0.conv.weight"]
    assert abs(w.std() / np.sqrt(2.0 / (16 * 9)) - 1) < 0.05
    assert abs(w.mean()) < 5 * np.sqrt(2.0 / (16 * 9)) / np.sqrt(w.size)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_npz_round_trip(tmp_path, dtype):
    prog = small_program()
    params, buffers = weights.init_params(prog, 1, dtype)
    buffers["0.bn.running_mean"][:] = [1.5, -2.0, 0.25]
    path = tmp_path / "w.npz"
    weights.save_weights(path, params, buffers)
    assert os.listdir(tmp_path) == ["w.npz"]  # no temporary left behind
    p2, b2 = weights.load_weights(path, prog, dtype)
    for ours, back in ((params, p2), (buffers, b2)):
        assert set(ours) == set(back)
        for k in ours:
            assert back[k].dtype == np.dtype(dtype) and np.array_equal(back[k], ours[k]), k
    p64, _ = weights.load_weights(path, prog, "float64")
    assert all(p64[k].dtype == np.float64 and np.array_equal(p64[k], params[k]) for k in params)


def _arrays(prog):
    params, buffers = weights.init_params(prog, 0)
    return {**params, **buffers}


def test_load_weights_missing_key(tmp_path):
    prog = small_program()
    arrays = _arrays(prog)
    del arrays["0.bn.running_var"]
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(WeightsError, match=r"missing .*'0\.bn\.running_var'"):
        weights.load_weights(tmp_path / "w.npz", prog)


def test_load_weights_wrong_shape(tmp_path):
    prog = small_program()
    arrays = _arrays(prog)
    arrays["4.fc.weight"] = np.zeros((4, 3))
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(WeightsError, match=r"'4\.fc\.weight' has shape \(4, 3\).*\(4, 2\)"):
        weights.load_weights(tmp_path / "w.npz", prog)


def test_load_weights_unexpected_key(tmp_path):
    prog = small_program()
    arrays = _arrays(prog)
    arrays["9.conv.weight"] = np.zeros(3)
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(WeightsError, match=r"unexpected .*'9\.conv\.weight'"):
        weights.load_weights(tmp_path / "w.npz", prog)


def _corrupt(kind, path, good):
    raw = good.read_bytes()
    if kind == "garbage":
        path.write_bytes(b"not an npz file at all" * 8)
    elif kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "bitflip":
        # flip a byte inside the first member's data: the zip CRC catches it
        flipped = bytearray(raw)
        flipped[len(raw) // 8] ^= 0xFF
        path.write_bytes(bytes(flipped))
    elif kind == "missing":
        pass
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "npy":
        with path.open("wb") as f:
            np.save(f, np.zeros(3))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "bitflip", "missing", "empty", "npy"])
def test_load_weights_corrupt_file(tmp_path, kind):
    prog = small_program()
    good = tmp_path / "good.npz"
    weights.save_weights(good, *weights.init_params(prog, 0))
    path = tmp_path / "bad.npz"
    _corrupt(kind, path, good)
    with pytest.raises(WeightsError, match="bad.npz"):
        weights.load_weights(path, prog)


# -- state-dict compatibility with torch -------------------------------------

def torch_module(program):
    """An nn.Module whose state-dict keys are the program's, as
    ``nn.ModuleDict({"<index>": nn.ModuleDict({"conv"/"bn"/"fc": ...})})``."""
    layers = {}
    for layer in program:
        if layer["kind"] == "conv":
            c, f, k = layer["in_shape"][0], layer["filters"], layer["size"]
            mods = {"conv": nn.Conv2d(c, f, k, layer["stride"], layer["pad"], bias=not layer["bn"])}
            if layer["bn"]:
                mods["bn"] = nn.BatchNorm2d(f, eps=1e-5, momentum=0.1)
            layers[str(layer["index"])] = nn.ModuleDict(mods)
        elif layer["kind"] == "connected":
            layers[str(layer["index"])] = nn.ModuleDict(
                {"fc": nn.Linear(int(np.prod(layer["in_shape"])), layer["output"])})
    return nn.ModuleDict(layers).double()


def test_state_dict_keys_load_into_torch(tmp_path):
    prog = small_program()
    params, buffers = weights.init_params(prog, 4, "float64")
    params["2.conv.bias"][:] = [0.5, -0.5]
    weights.save_weights(tmp_path / "w.npz", params, buffers)
    module = torch_module(prog)
    ours = set(params) | set(buffers)
    tkeys = set(module.state_dict())
    # torch's batch norm also keeps a step counter, which tilec does not
    assert {k for k in tkeys if not k.endswith(".num_batches_tracked")} == ours
    with np.load(tmp_path / "w.npz") as z:
        state = {k: torch.from_numpy(z[k]) for k in z.files}
    module.load_state_dict(state, strict=True)  # a plain dict: a missing counter is allowed
    for k, v in module.state_dict().items():
        if k in ours:
            assert np.array_equal(v.numpy(), {**params, **buffers}[k]), k

    # and back: a torch state dict, less the counters, loads into tilec
    for v in module.parameters():
        v.data.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    back = {k: v.numpy() for k, v in module.state_dict().items() if not k.endswith(".num_batches_tracked")}
    np.savez(tmp_path / "t.npz", **back)
    p2, b2 = weights.load_weights(tmp_path / "t.npz", prog, "float64")
    assert all(np.array_equal(v, back[k]) for k, v in {**p2, **b2}.items())
