"""tilec computes what darknet computes: layer outputs, the [region] gradient,
.weights files and the [reorg] permutation, against fixtures made by
darknet's own C code (shared/darknet-parity/README.md says how).

The fixtures live outside the repository, in ``../shared/darknet-parity``
(or ``$TILEC_PARITY_DIR``). Without them these tests fail rather than skip:
a skipped parity test reads as a passing one.

Tolerances: darknet's batch norm divides by ``sqrt(var) + 1e-6``, tilec's by
``sqrt(var + 1e-5)``; with the fixtures' variances the outputs then agree to
about 1e-5 relative, hence 1e-4. Folding darknet's epsilon into the running
variance leaves float32 rounding alone (about 1e-6). A wrong reorg order is
an O(1) error from layer 7 of ``passthrough`` on.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torch_oracle
from programs import ProgramBuilder
from test_tiled import FLOOR, assert_same, run_case
from tilec.cli import main
from tilec.plan.build import GroupChoice
from tilec_runtime import ops, region

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from darknet_parity import (BATCH, MODELS, darknet_layers, darknet_truths, default_dir,  # noqa: E402
                            matched_epsilon_weights, missing_files, program_of,
                            region_grad_error, rel_err, weights_round_trip, write_input)

FORWARD_RTOL = 1e-4
MATCHED_EPS_RTOL = 1e-5
REGION_RTOL = 1e-6


@pytest.fixture(scope="module")
def parity():
    """The fixture directory; a clear failure when it is not there."""
    where = default_dir()
    missing = missing_files(where)
    if missing:
        pytest.fail(f"darknet parity fixtures missing in {where} (first: {missing[0]}); they ship in "
                    "../shared/darknet-parity beside the repository, or set TILEC_PARITY_DIR", pytrace=False)
    return where


def assert_layers_close(got, layers, tol):
    """Every layer within ``tol``; the message names the first that is not."""
    for i, kind, want in layers:
        err = rel_err(got[i], want)
        assert err < tol, f"layer {i} ({kind}): relative error {err:.3g} > {tol:g}"


def tilec_forward(parity, name, tmp_path, weights, *extra):
    """Every layer's output from `tilec forward` itself, {index: (BATCH, -1)}."""
    out = tmp_path / "out.npz"
    images = write_input(parity, name, tmp_path / "input.npy")
    assert main(["forward", str(parity / f"{name}.cfg"), "--weights", str(weights), "--input", str(images),
                 "-o", str(out), *extra]) == 0
    with np.load(out) as z:
        return {int(k): z[k].reshape(BATCH, -1) for k in z.files}


# -- forward: every layer -----------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_every_layer_matches_darknet(parity, tmp_path, name):
    got = tilec_forward(parity, name, tmp_path, parity / f"{name}.weights")
    layers = darknet_layers(parity, name)
    assert sorted(got) == [index for index, _, _ in layers]
    for i, kind, want in layers:
        assert got[i].shape == want.shape, f"layer {i} ({kind}): {got[i].shape} values, darknet {want.shape}"
    assert_layers_close(got, layers, FORWARD_RTOL)


@pytest.mark.parametrize("name", MODELS)
def test_every_layer_matches_darknet_with_its_batch_norm_epsilon(parity, tmp_path, name):
    """Running variance v' with sqrt(v' + 1e-5) = sqrt(v) + 1e-6 makes tilec's
    normalisation darknet's; float64 then differs by darknet's float32 rounding."""
    matched_epsilon_weights(parity, name, tmp_path / "matched.npz")
    got = tilec_forward(parity, name, tmp_path, tmp_path / "matched.npz", "--dtype", "float64")
    assert_layers_close(got, darknet_layers(parity, name), MATCHED_EPS_RTOL)


# -- the [region] gradient ----------------------------------------------------

@pytest.mark.parametrize("source", ["darknet", "tilec"])
def test_region_gradient_matches_darknet_delta(parity, tmp_path, source):
    """On darknet's own region input, and on the one `tilec forward` computes.
    darknet ran with seen = 20000, past the 12800-image prior term that
    tilec's training leaves out, so both have no prior term."""
    layer = program_of(parity, "region-train")[-1]
    j = layer["inputs"][0]
    if source == "darknet":
        x = dict((i, out) for i, _, out in darknet_layers(parity, "region-train"))[j]
    else:
        x = tilec_forward(parity, "region-train", tmp_path, parity / "region-train.weights")[j]
    assert region_grad_error(parity, x) < REGION_RTOL
    x = x.reshape(BATCH, *layer["in_shape"]).astype(np.float64)
    truth = darknet_truths(parity)
    assert np.array_equal(region.forward(x, truth, layer, seen=20000)[1], region.forward(x, truth, layer)[1])


# -- .weights -----------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_weights_round_trip_is_byte_identical(parity, tmp_path, name):
    assert weights_round_trip(parity, name, tmp_path / "out.weights")


# -- [reorg] --------------------------------------------------------------------

def darknet_reorg_indices(c, h, w, s):
    """For each flat output position of one image, the flat input position
    darknet's reorg_cpu(forward=0) reads: its loops, written out."""
    source = np.empty(c * h * w, dtype=np.int64)
    out_c = c // (s * s)
    for k in range(c):
        for j in range(h):
            for i in range(w):
                c2, offset = k % out_c, k // out_c
                w2, h2 = i * s + offset % s, j * s + offset // s
                source[i + w * (j + h * k)] = w2 + w * s * (h2 + h * s * c2)
    return source


REORG_SHAPES = [(2, 4, 16, 16, 2), (3, 8, 4, 6, 2), (1, 12, 2, 10, 2), (2, 16, 6, 4, 2), (1, 18, 3, 6, 3)]


@pytest.mark.parametrize("b, c, h, w, s", REORG_SHAPES)
def test_darknet_reorg_is_darknets_permutation_and_backward_its_inverse(b, c, h, w, s):
    rng = np.random.default_rng(c * h + w)
    x = rng.standard_normal((b, c, h, w))
    y = ops.reorg_forward(x, s, "darknet")
    source = darknet_reorg_indices(c, h, w, s)
    assert sorted(source) == list(range(c * h * w))  # a permutation
    assert y.shape == (b, c * s * s, h // s, w // s)
    assert np.array_equal(y.reshape(b, -1), x.reshape(b, -1)[:, source])
    dy = rng.standard_normal(y.shape)
    dx = ops.reorg_backward(dy, s, "darknet")
    assert np.array_equal(ops.reorg_backward(y, s, "darknet"), x)   # inverse
    assert np.array_equal(ops.reorg_forward(dx, s, "darknet"), dy)
    # adjoint: <R x, dy> = <x, R^T dy>, and R^T is the gradient torch's autograd finds
    assert np.isclose(np.vdot(y, dy), np.vdot(x, dx), rtol=1e-13)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch_oracle.darknet_reorg(tx, s)
    ty.backward(torch.tensor(dy))
    assert np.array_equal(ty.detach().numpy(), y) and np.array_equal(tx.grad.numpy(), dx)


@pytest.mark.parametrize("b, c, h, w, s", REORG_SHAPES)
def test_darknet_reverse_reorg_is_depth_to_space_dcr(tmp_path, b, c, h, w, s):
    """darknet's ``[reorg] reverse=1``: forward ``reorg_cpu(forward=1)`` on
    the layer's own (c, h, w), out[source[p]] = x[p]; backward
    ``reorg_cpu(forward=0)``, dx[p] = dy[source[p]]. A .cfg's reverse=1 is
    order onnx reversed, DepthToSpace DCR (checked against onnxruntime in
    test_onnx)."""
    rng = np.random.default_rng(c * h + w + 1)
    x = rng.standard_normal((b, c, h, w))
    source = darknet_reorg_indices(c, h, w, s)
    want = np.empty((b, c * h * w))
    want[:, source] = x.reshape(b, -1)
    y = ops.reorg_forward(x, s, "onnx", reverse=True)
    assert y.shape == (b, c // (s * s), h * s, w * s) and np.array_equal(y.reshape(b, -1), want)
    dy = rng.standard_normal(y.shape)
    assert np.array_equal(ops.reorg_backward(dy, s, "onnx", reverse=True).reshape(b, -1), dy.reshape(b, -1)[:, source])
    if s == 2:
        cfg = tmp_path / "r.cfg"
        cfg.write_text(f"[net]\nheight={h}\nwidth={w}\nchannels={c}\n[reorg]\nstride=2\nreverse=1\n[cost]\n")
        layer = program_of(tmp_path, "r")[0]
        assert (layer["order"], layer["reverse"], layer["out_shape"]) == ("onnx", True, [c // 4, h * 2, w * 2])


def test_darknet_reorg_is_not_space_to_depth():
    x = np.arange(2 * 8 * 4 * 4, dtype=np.float64).reshape(2, 8, 4, 4)
    assert not np.array_equal(ops.reorg_forward(x, 2, "darknet"), ops.reorg_forward(x, 2, "space_to_depth"))


def test_reorg_layer_of_the_fixture_is_exact(parity):
    """passthrough's layer 7 is a reorg of layer 6: a permutation, so exact."""
    outs = {i: out for i, _, out in darknet_layers(parity, "passthrough")}
    program = program_of(parity, "passthrough")
    layer = program[7]
    assert layer["kind"] == "reorg" and layer["order"] == "darknet" and layer["inputs"] == [6]
    x = outs[6].reshape(BATCH, *layer["in_shape"])
    assert np.array_equal(ops.reorg_forward(x, 2, "darknet").reshape(BATCH, -1), outs[7])
    assert np.array_equal(torch_oracle.darknet_reorg(torch.tensor(x), 2).numpy().reshape(BATCH, -1), outs[7])


def passthrough_program():
    """YOLOv2's passthrough in small: a tiled prefix, then a 1x1 conv of an
    early map, darknet's reorg, a route, a conv and the loss."""
    b = ProgramBuilder(3, 16, 12)
    b.conv(8, 3, 1, "same", bn=True, act="leaky")     # 0: 8x16x12
    b.maxpool(2, 2)                                    # 1: 8x8x6
    b.conv(6, 3, 1, "same", bn=True, act="leaky")      # 2: 6x8x6
    b.conv(4, 1, 1, 0, bn=True, act="leaky", src=0)    # 3: 4x16x12
    b.reorg(2, order="darknet")                        # 4: 16x8x6
    b.route(4, 2)                                      # 5: 22x8x6
    b.conv(3, 3, 1, "same", bn=False, act="linear")    # 6: 3x8x6
    b.cost()
    return b.build()


CHOICES = [GroupChoice(0, 1, [0, 3, 8], [0, 2, 6], [2, 0, 1, 3]), GroupChoice(2, 2, [0, 5, 8], [0, 6], [1, 3])]


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_n_devices_equal_one_device_with_darknet_reorg(dtype, tol):
    got, want = run_case(passthrough_program(), CHOICES, 4, 2, dtype=dtype)
    assert_same(got, want, tol, FLOOR)
