"""Every kernel of runtime/ops.py against PyTorch (forward, and backward via
autograd), in float32 and float64, on random shapes, strides and
independent (top, bottom, left, right) border pads as used for tiles.

The oracle is always torch in float64 on the *same* input values (float32
inputs are upcast exactly), so a float32 result is compared with the exact
answer for its inputs. Tolerances: 1e-12 relative for float64, 1e-5 for
float32. For the linear kernels (conv, pooling, connected) the bound is
elementwise, relative to the same operation applied to absolute values
(|x| * |w|): the standard forward-error bound of a sum, so a small output
that is the difference of large terms is not held to an impossible bound.
Batch norm likewise: relative to the magnitudes of the terms it cancels
(see ``xhat_scale`` and ``bn_backward_scale``).
"""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from programs import ProgramBuilder
from tilec_runtime import ops, reference

RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
DTYPES = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])
SEEDS = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=40, deadline=None)


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


def check(actual, expected, dtype, mag=None, rtol=None):
    """|actual - expected| <= rtol * mag elementwise (mag: an array of error
    scales, or by default the largest |expected|), and actual has ``dtype``."""
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    if isinstance(mag, torch.Tensor):
        mag = mag.detach().numpy()
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    rtol = RTOL[np.dtype(dtype)] if rtol is None else rtol
    if mag is None:
        mag = np.abs(expected).max(initial=0.0)
    bound = rtol * np.asarray(mag, dtype=np.float64) + 1e-300
    err = np.abs(actual.astype(np.float64) - expected)
    assert np.all(err <= bound), f"max error / bound = {np.max(err / bound):.3g} (rtol {rtol:g})"


@st.composite
def spatial_case(draw, sizes=(1, 2, 3, 4, 5), max_stride=3, max_hw=12):
    """(dtype, B, C, H, W, k, stride, pads, seed) with a valid output size."""
    k = draw(st.sampled_from(sizes))
    pads = tuple(draw(st.integers(0, k - 1)) for _ in range(4))
    h = draw(st.integers(max(1, k - pads[0] - pads[1]), max_hw))
    w = draw(st.integers(max(1, k - pads[2] - pads[3]), max_hw))
    return dict(dtype=draw(DTYPES), b=draw(st.integers(1, 3)), c=draw(st.integers(1, 4)), h=h, w=w, k=k,
                stride=draw(st.integers(1, max_stride)), pads=pads, seed=draw(SEEDS))


def torch_pad(x, pads, value=0.0):
    pt, pb, pl, pr = pads
    return F.pad(x, (pl, pr, pt, pb), value=value)


# -- convolution ------------------------------------------------------------

def torch_conv(x, w, stride, pads, dy):
    """(y, dx, dw) in float64 by autograd, and their |.| error scales."""
    out = []
    for xs, ws, dys in ((x, w, dy), (np.abs(x), np.abs(w), np.abs(dy))):
        tx, tw = t64(xs, True), t64(ws, True)
        y = F.conv2d(torch_pad(tx, pads), tw, stride=stride)
        y.backward(t64(dys))
        out.append((y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy()))
    return out


@FAST
@given(spatial_case(), st.integers(1, 4))
def test_conv_matches_torch(case, filters):
    rng = np.random.default_rng(case["seed"])
    dt, k, s, pads = case["dtype"], case["k"], case["stride"], case["pads"]
    x = rng.standard_normal((case["b"], case["c"], case["h"], case["w"])).astype(dt)
    w = rng.standard_normal((filters, case["c"], k, k)).astype(dt)
    y = ops.conv2d_forward(x, w, s, pads)
    ho = ops.out_size(case["h"], k, s, pads[0], pads[1])
    wo = ops.out_size(case["w"], k, s, pads[2], pads[3])
    assert y.shape == (case["b"], filters, ho, wo)
    dy = rng.standard_normal(y.shape).astype(dt)
    (ty, tdx, tdw), (my, mdx, mdw) = torch_conv(x, w, s, pads, dy)
    check(y, ty, dt, my)
    dx, dw = ops.conv2d_backward(x, w, s, pads, dy)
    check(dx, tdx, dt, mdx)
    check(dw, tdw, dt, mdw)


@pytest.mark.parametrize("pads", [(2, 0, 1, 0), (0, 2, 0, 1), (1, 0, 0, 2), (0, 1, 2, 0)])
def test_conv_one_sided_pads(pads):
    """Tile-like pads on one side only, always run (the random test draws
    them too, but not necessarily every one-sided combination): forward
    and backward equal torch."""
    rng = np.random.default_rng(sum(pads))
    x = rng.standard_normal((1, 2, 6, 7))
    w = rng.standard_normal((3, 2, 3, 3))
    y = ops.conv2d_forward(x, w, 2, pads)
    dy = rng.standard_normal(y.shape)
    (ty, tdx, tdw), (my, mdx, mdw) = torch_conv(x, w, 2, pads, dy)
    check(y, ty, x.dtype, my)
    dx, dw = ops.conv2d_backward(x, w, 2, pads, dy)
    check(dx, tdx, x.dtype, mdx)
    check(dw, tdw, x.dtype, mdw)


# -- max-pooling --------------------------------------------------------------

def loop_maxpool(x, size, stride, pads, dy=None):
    """Hand-written specification: -inf padding, the FIRST maximum of each
    window in row-major order wins (strict >), its gradient goes there."""
    pt, pb, pl, pr = pads
    b, c, h, w = x.shape
    ho = (h + pt + pb - size) // stride + 1
    wo = (w + pl + pr - size) // stride + 1
    y = np.empty((b, c, ho, wo), x.dtype)
    arg = np.empty((b, c, ho, wo), np.int64)
    dx = np.zeros(x.shape, np.float64)
    for n, ch, i, j in itertools.product(range(b), range(c), range(ho), range(wo)):
        best, where, pos = -np.inf, None, None
        for di in range(size):
            for dj in range(size):
                r, q = i * stride - pt + di, j * stride - pl + dj
                v = x[n, ch, r, q] if 0 <= r < h and 0 <= q < w else -np.inf
                if v > best:
                    best, where, pos = v, (r, q), di * size + dj
        assert where is not None, "a window with no real element"
        y[n, ch, i, j], arg[n, ch, i, j] = best, pos
        if dy is not None:
            dx[n, ch, where[0], where[1]] += dy[n, ch, i, j]
    return y, arg, dx


@st.composite
def pool_case(draw):
    case = draw(spatial_case(sizes=(1, 2, 3, 4), max_hw=10))
    case["ties"] = draw(st.booleans())
    return case


@settings(max_examples=60, deadline=None)
@given(pool_case())
def test_maxpool_matches_loop_and_torch(case):
    """With ties (integer values from a range of 3) the first max wins, in
    our kernel, in the loop specification and in torch."""
    rng = np.random.default_rng(case["seed"])
    dt, k, s, pads = case["dtype"], case["k"], case["stride"], case["pads"]
    shape = (case["b"], case["c"], case["h"], case["w"])
    x = (rng.integers(-1, 2, shape) if case["ties"] else rng.standard_normal(shape)).astype(dt)
    y, arg = ops.maxpool_forward(x, k, s, pads)
    dy = rng.standard_normal(y.shape).astype(dt)
    dx = ops.maxpool_backward(x.shape, k, s, pads, arg, dy)

    ly, larg, ldx = loop_maxpool(x, k, s, pads, dy)
    assert y.dtype == dt and np.array_equal(y, ly)
    assert np.array_equal(arg, larg)
    _, _, mag = loop_maxpool(x, k, s, pads, np.abs(dy))
    check(dx, ldx, dt, mag)

    tx = t64(x, True)
    ty = F.max_pool2d(torch_pad(tx, pads, -np.inf), k, s)
    ty.backward(t64(dy))
    assert np.array_equal(y, ty.detach().numpy())
    check(dx, tx.grad, dt, mag)


def test_torch_maxpool_takes_first_max():
    """The premise of comparing tie-breaking with torch: on a constant map
    torch's indices are each window's top-left element, and the gradient of
    a window of equal values lands on its first element."""
    for dt in (torch.float32, torch.float64):
        x = torch.zeros(1, 1, 5, 5, dtype=dt)
        _, idx = F.max_pool2d(x, 3, 1, return_indices=True)
        expect = torch.tensor([[r * 5 + c for c in range(3)] for r in range(3)])
        assert torch.equal(idx[0, 0], expect)
        x = torch.tensor([[[[0.0, 2, 2], [2, 2, 2], [1, 1, 1]]]], dtype=dt, requires_grad=True)
        F.max_pool2d(x, 3, 1).sum().backward()
        assert x.grad[0, 0, 0, 1] == 1 and x.grad.sum() == 1


def test_maxpool_ties_first_in_row_major_order():
    """A window of equal values: the gradient goes to its top-left element,
    and a tie later in the window does not steal it."""
    x = np.array([[[[0.0, 3.0, 1.0], [3.0, 3.0, 2.0]]]])
    y, arg = ops.maxpool_forward(x, 2, 1, (0, 0, 0, 0))
    assert y.tolist() == [[[[3.0, 3.0]]]]
    # window 0: [0, 3; 3, 3] -> element (0, 1) = index 1; window 1: [3, 1; 3, 2] -> index 0
    assert arg.tolist() == [[[[1, 0]]]]
    dx = ops.maxpool_backward(x.shape, 2, 1, (0, 0, 0, 0), arg, np.array([[[[1.0, 10.0]]]]))
    assert dx.tolist() == [[[[0.0, 11.0, 0.0], [0.0, 0.0, 0.0]]]]


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("size,stride,pads", [(2, 1, (0, 1, 0, 1)), (3, 2, (1, 1, 1, 1)),
                                              (3, 1, (2, 0, 0, 2)), (4, 3, (3, 3, 3, 3))])
def test_maxpool_padding_never_wins(dt, size, stride, pads):
    """Very negative maps: the -inf border is never selected, every output is
    a real element, and all the gradient lands inside the map."""
    rng = np.random.default_rng(size * 10 + stride)
    finfo = np.finfo(dt)
    x = (-finfo.max * rng.uniform(0.5, 1.0, (2, 2, 7, 6))).astype(dt)
    y, arg = ops.maxpool_forward(x, size, stride, pads)
    assert np.all(np.isfinite(y))
    assert np.all(np.isin(y, x))
    dy = np.ones(y.shape, dt)
    dx = ops.maxpool_backward(x.shape, size, stride, pads, arg, dy)
    assert dx.sum(dtype=np.float64) == dy.size


@pytest.mark.parametrize("size,stride,padding", [(2, 1, 1), (2, 2, 1), (3, 2, 2), (3, 1, 1), (3, 2, 0), (2, 1, 0)])
def test_maxpool_layer_padding_is_darknets(size, stride, padding):
    """A maxpool *layer* (program fields) pads as darknet's
    forward_maxpool_layer: offset -padding/2 at the top/left, out-of-map
    positions never selected, out = (n + padding - size) / stride + 1."""
    b = ProgramBuilder(2, 7, 6)
    b.maxpool(size, stride, padding)
    b.cost()
    prog = b.build()
    x = np.random.default_rng(size).standard_normal((2, 2, 7, 6))
    _, (acts, _) = reference.forward(prog, {}, {}, x, np.zeros((2, *prog[0]["out_shape"])))
    off = -(padding // 2)
    ho, wo = (7 + padding - size) // stride + 1, (6 + padding - size) // stride + 1
    expect = np.full((2, 2, ho, wo), -np.inf)
    for i, j, n, m in itertools.product(range(ho), range(wo), range(size), range(size)):
        r, c = off + i * stride + n, off + j * stride + m
        if 0 <= r < 7 and 0 <= c < 6:
            expect[:, :, i, j] = np.maximum(expect[:, :, i, j], x[:, :, r, c])
    assert acts[0].shape == expect.shape == (2, *prog[0]["out_shape"])
    assert np.array_equal(acts[0], expect)


# -- tiles: a region with border pads only where it touches the border ------

@st.composite
def cuts(draw, n):
    """A random split of range(n) into 1..4 non-empty consecutive [lo, hi) parts."""
    inner = sorted(draw(st.sets(st.integers(1, n - 1), max_size=3))) if n > 1 else []
    return list(zip([0] + inner, inner + [n]))


def _region(lo, hi, n, k, s, p):
    """Input rows [a, b) and (pad_lo, pad_hi) of output rows [lo, hi) (DESIGN.md)."""
    a, b = lo * s - p, (hi - 1) * s - p + k  # exclusive end
    return max(a, 0), min(b, n), max(0, -a), max(0, b - n)


@settings(max_examples=30, deadline=None)
@given(spatial_case(sizes=(1, 2, 3, 5)), st.data())
def test_tiles_reproduce_whole_map(case, data):
    """Forward on every tile's region equals the whole map's output on the
    tile; backward partial input gradients, overlap-added, equal the whole
    map's; weight gradients summed over tiles equal the whole one."""
    rng = np.random.default_rng(case["seed"])
    dt, k, s, pads = case["dtype"], case["k"], case["stride"], case["pads"]
    x = rng.standard_normal((case["b"], case["c"], case["h"], case["w"])).astype(dt)
    w = rng.standard_normal((2, case["c"], k, k)).astype(dt)
    y = ops.conv2d_forward(x, w, s, pads)
    py, parg = ops.maxpool_forward(x, k, s, pads)
    dy = rng.standard_normal(y.shape).astype(dt)
    pdy = rng.standard_normal(py.shape).astype(dt)
    dx, dw = ops.conv2d_backward(x, w, s, pads, dy)
    pdx = ops.maxpool_backward(x.shape, k, s, pads, parg, pdy)
    (_, _, _), (my, mdx, mdw) = torch_conv(x, w, s, pads, dy)

    sum_dx, sum_dw, sum_pdx = np.zeros(x.shape), np.zeros(w.shape), np.zeros(x.shape)
    for (r0, r1), (c0, c1) in itertools.product(data.draw(cuts(y.shape[2])), data.draw(cuts(y.shape[3]))):
        a, b, ptop, pbot = _region(r0, r1, x.shape[2], k, s, pads[0])
        c, d, pleft, pright = _region(c0, c1, x.shape[3], k, s, pads[2])
        assert ptop <= pads[0] and pbot <= pads[1] and pleft <= pads[2] and pright <= pads[3]
        tpads = (ptop, pbot, pleft, pright)
        xr = x[:, :, a:b, c:d]
        check(ops.conv2d_forward(xr, w, s, tpads), y[:, :, r0:r1, c0:c1], dt, my[:, :, r0:r1, c0:c1])
        ty, targ = ops.maxpool_forward(xr, k, s, tpads)
        assert np.array_equal(ty, py[:, :, r0:r1, c0:c1])
        tdx, tdw = ops.conv2d_backward(xr, w, s, tpads, dy[:, :, r0:r1, c0:c1])
        sum_dx[:, :, a:b, c:d] += tdx
        sum_dw += tdw
        sum_pdx[:, :, a:b, c:d] += ops.maxpool_backward(xr.shape, k, s, tpads, targ, pdy[:, :, r0:r1, c0:c1])
    # summing the tiles' partials in float64 adds rounding of its own: 2x rtol
    check(dx, sum_dx, dt, mdx, rtol=2 * RTOL[dt])
    check(dw, sum_dw, dt, mdw, rtol=2 * RTOL[dt])
    _, _, pmag = loop_maxpool(x, k, s, pads, np.abs(pdy))
    check(pdx, sum_pdx, dt, pmag, rtol=2 * RTOL[dt])


# -- activations --------------------------------------------------------------

@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["linear", "leaky", "relu"])
def test_activation_matches_torch(kind, dt):
    """Including exact zeros: at z == 0 torch's leaky gradient is the slope
    and relu's is 0, and so must ours be (computed from the output)."""
    rng = np.random.default_rng(7)
    z = rng.standard_normal((3, 2, 5, 4)).astype(dt)
    z[0, 0, 0, :] = 0.0
    z[1, 1, 2, :2] = -0.0
    dy = rng.standard_normal(z.shape).astype(dt)
    y = ops.act_forward(z, kind)
    dz = ops.act_backward(y, kind, dy)
    tz = t64(z, True)
    ty = {"linear": lambda v: v, "leaky": lambda v: F.leaky_relu(v, 0.1), "relu": F.relu}[kind](tz)
    ty.backward(t64(dy))
    check(y, ty, dt)
    check(dz, tz.grad, dt)
    if kind != "linear":
        assert np.all(dz[0, 0, 0] == (dy[0, 0, 0] * (dt(0.1) if kind == "leaky" else 0)))


def test_activation_unknown_kind():
    with pytest.raises(ValueError, match="swish"):
        ops.act_forward(np.zeros(3), "swish")
    with pytest.raises(ValueError, match="swish"):
        ops.act_backward(np.zeros(3), "swish", np.zeros(3))


# -- batch norm --------------------------------------------------------------

def exact_stats(z):
    """Two-pass per-channel (count, mean, m2) in float64: the truth."""
    z = np.asarray(z, np.float64)
    mean = z.mean(axis=(0, 2, 3))
    return z.shape[0] * z.shape[2] * z.shape[3], mean, ((z - mean[None, :, None, None]) ** 2).sum(axis=(0, 2, 3))


@st.composite
def random_blocks(draw, shape):
    """A random partition of a (B, C, H, W) map into blocks over B, H and W
    (cuts may coincide: empty blocks included), in random order."""
    def split(n):
        inner = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
        return list(zip([0] + inner, inner + [n]))
    blocks = list(itertools.product(split(shape[0]), split(shape[2]), split(shape[3])))
    return draw(st.permutations(blocks))


@settings(max_examples=40, deadline=None)
@given(DTYPES, st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9)),
       st.floats(-100, 100), SEEDS, st.data())
def test_bn_stats_combine_over_random_splits(dt, shape, offset, seed, data):
    rng = np.random.default_rng(seed)
    z = (offset + rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(dt)
    blocks = data.draw(random_blocks(shape))
    parts = [ops.bn_stats(z[b0:b1, :, h0:h1, w0:w1]) for (b0, b1), (h0, h1), (w0, w1) in blocks]
    n, mean, m2 = ops.bn_combine(parts)
    tn, tmean, tm2 = exact_stats(z)
    wn, wmean, wm2 = ops.bn_stats(z)
    assert n == tn == wn
    assert mean.dtype == m2.dtype == np.float64
    scale = np.abs(z.astype(np.float64)).max()
    check(mean, tmean, np.float64, scale, rtol=1e-12)
    check(wmean, tmean, np.float64, scale, rtol=1e-12)
    # m2 >= 0 is a sum of squares; its rounding scales with n * max|z - mean|^2
    dev = np.abs(z.astype(np.float64) - tmean[None, :, None, None]).max(axis=(0, 2, 3))
    check(m2, tm2, np.float64, tm2 + 1e-3 * dev**2, rtol=1e-11)
    check(wm2, tm2, np.float64, tm2 + 1e-3 * dev**2, rtol=1e-11)


def test_bn_stats_large_mean_float32():
    """A float32 map with mean 1e4 and unit noise: the combined variance is
    exact to 1e-10 relative, where the plain sum-of-squares formula loses
    everything in float32 (and 8 digits even in float64)."""
    rng = np.random.default_rng(3)
    z = (1e4 + rng.standard_normal((2, 3, 40, 37))).astype(np.float32)
    tn, tmean, tm2 = exact_stats(z)
    pieces = [z[:, :, :13], z[:, :, 13:14], z[:, :, 14:, :5], z[:, :, 14:, 5:]]
    n, mean, m2 = ops.bn_combine([ops.bn_stats(p) for p in pieces])
    assert n == tn
    assert np.max(np.abs(m2 / tm2 - 1)) < 1e-10
    assert np.max(np.abs(mean / tmean - 1)) < 1e-12
    # the test has teeth: the naive formula in float32 cancels badly
    s = z.sum(axis=(0, 2, 3), dtype=np.float32)
    q = (z * z).sum(axis=(0, 2, 3), dtype=np.float32)
    naive = q - s * s / np.float32(tn)
    assert np.max(np.abs(naive / tm2 - 1)) > 1e-2


def test_bn_combine_empty_and_single():
    z = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
    empty = ops.bn_stats(z[:, :, :0])
    assert empty[0] == 0
    n, mean, m2 = ops.bn_combine([empty, ops.bn_stats(z), empty])
    tn, tmean, tm2 = exact_stats(z)
    assert n == tn
    check(mean, tmean, np.float64)
    check(m2, tm2, np.float64)


def torch_bn(z, gamma, beta, dy, rm, rv):
    """Training-mode batch norm in float64 torch: (y, dz, dgamma, dbeta, rm, rv)."""
    tz, tg, tb = t64(z, True), t64(gamma, True), t64(beta, True)
    trm, trv = t64(rm), t64(rv)
    y = F.batch_norm(tz, trm, trv, tg, tb, training=True, momentum=0.1, eps=1e-5)  # torch's BatchNorm2d defaults
    y.backward(t64(dy))
    return y, tz.grad, tg.grad, tb.grad, trm, trv


@FAST
@given(DTYPES, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7), st.integers(1, 7)), SEEDS)
def test_bn_forward_backward_matches_torch(dt, shape, seed):
    rng = np.random.default_rng(seed)
    if shape[0] * shape[2] * shape[3] < 2:
        shape = (2,) + shape[1:]  # torch refuses a single value per channel
    c = shape[1]
    z = (rng.standard_normal(shape) * 3 + 1).astype(dt)
    gamma = rng.uniform(0.5, 2, c).astype(dt)
    beta = rng.standard_normal(c).astype(dt)
    rm, rv = rng.standard_normal(c).astype(dt), rng.uniform(0.5, 2, c).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    ty, tdz, tdg, tdb, trm, trv = torch_bn(z, gamma, beta, dy, rm, rv)

    n, mean, m2 = ops.bn_stats(z)
    y, xhat, inv_std = ops.bn_normalize(z, mean, m2 / n, gamma, beta)
    xs = xhat_scale(z, mean, inv_std)
    check(y, ty, dt, np.abs(gamma)[None, :, None, None] * xs + np.abs(beta)[None, :, None, None])
    assert xhat.dtype == inv_std.dtype == dt
    mom = ops.BN_MOMENTUM  # error scales: the two terms of each blend
    mag_rm = (1 - mom) * np.abs(rm.astype(np.float64)) + mom * np.abs(mean)
    mag_rv = (1 - mom) * np.abs(rv.astype(np.float64)) + mom * m2 / max(n - 1, 1)
    ops.bn_update_running(rm, rv, n, mean, m2)
    check(rm, trm, dt, mag_rm)
    check(rv, trv, dt, mag_rv)
    s1, s2 = ops.bn_grad_sums(dy, xhat)
    mag1, mag2 = ops.bn_grad_sums(np.abs(dy), xs)  # error scales of the sums
    check(s1.astype(dt), tdb, dt, mag1)
    check(s2.astype(dt), tdg, dt, mag2)
    dz = ops.bn_backward(dy, xhat, gamma, inv_std, s1 / n, s2 / n)
    check(dz, tdz, dt, bn_backward_scale(dy, xs, gamma, inv_std))


def xhat_scale(z, mean, inv_std):
    """Error scale of xhat = (z - mean) * inv_std in the data dtype: the
    subtraction is exact to a rounding of |z| + |mean|, which is large
    against |z - mean| when the variance is small against the mean."""
    ch = lambda v: np.abs(np.asarray(v, np.float64))[None, :, None, None]  # noqa: E731
    return (np.abs(z.astype(np.float64)) + ch(mean)) * ch(inv_std)


def bn_backward_scale(dy, xs, gamma, inv_std):
    """Error scale of dx = gamma/sigma * (dy - mean(dy) - xhat*mean(dy*xhat)):
    the terms' magnitudes, with ``xs`` the error scale of xhat. (With 2 values
    per channel xhat = +-1 and dx is ~0: pure cancellation, so |dx| itself is
    no scale.)"""
    ch = lambda v: np.abs(np.asarray(v, np.float64))[None, :, None, None]  # noqa: E731
    ady = np.abs(dy.astype(np.float64))
    return ch(gamma * inv_std) * (ady + ch(ady.mean(axis=(0, 2, 3))) + xs * ch((ady * xs).mean(axis=(0, 2, 3))))


@settings(max_examples=30, deadline=None)
@given(DTYPES, st.integers(1, 3), st.integers(1, 3), st.integers(3, 12), st.integers(3, 12), SEEDS, st.data())
def test_bn_backward_owned_partition(dt, b, c, h, w, seed, data):
    """Devices own a grid partition of the map; each holds a region (its cell
    plus a random halo) and a partial output gradient there (the partials
    sum to the whole gradient). All-reducing the grad sums and applying the
    mean terms on owned cells only, the placed partial input gradients sum
    to the whole-map gradient (and to torch's)."""
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((b, c, h, w)) * 2 - 1).astype(dt)
    gamma = rng.uniform(0.5, 2, c).astype(dt)
    dy = rng.standard_normal(z.shape).astype(dt)
    n, mean, m2 = ops.bn_stats(z)
    _, xhat, inv_std = ops.bn_normalize(z, mean, m2 / n, gamma, np.zeros(c, dt))

    rows, cols = data.draw(cuts(h)), data.draw(cuts(w))
    devices = []
    for (r0, r1), (c0, c1) in itertools.product(rows, cols):
        halo = [data.draw(st.integers(0, 2)) for _ in range(4)]
        a, bb = max(0, r0 - halo[0]), min(h, r1 + halo[1])
        cc, d = max(0, c0 - halo[2]), min(w, c1 + halo[3])
        devices.append(((a, bb, cc, d), (slice(r0 - a, r1 - a), slice(c0 - cc, c1 - cc))))
    weight = np.zeros((len(devices), h, w))
    for i, ((a, bb, cc, d), _) in enumerate(devices):
        weight[i, a:bb, cc:d] = rng.uniform(0.1, 1.0, (bb - a, d - cc))
    weight /= weight.sum(axis=0)  # every position is owned, hence covered
    partials = [(dy * weight[i]).astype(dt)[:, :, a:bb, cc:d] for i, ((a, bb, cc, d), _) in enumerate(devices)]

    sums = [ops.bn_grad_sums(p, xhat[:, :, a:bb, cc:d]) for p, ((a, bb, cc, d), _) in zip(partials, devices)]
    s1, s2 = sum(s[0] for s in sums), sum(s[1] for s in sums)
    full_s1, full_s2 = ops.bn_grad_sums(dy, xhat)
    mag = ops.bn_grad_sums(np.abs(dy), xhat_scale(z, mean, inv_std))
    check(s1, full_s1, np.float64, mag[0], rtol=10 * RTOL[dt])
    check(s2, full_s2, np.float64, mag[1], rtol=10 * RTOL[dt])

    total = np.zeros(z.shape)
    for p, ((a, bb, cc, d), owned) in zip(partials, devices):
        dx = ops.bn_backward(p, xhat[:, :, a:bb, cc:d], gamma, inv_std, s1 / n, s2 / n, owned=owned)
        assert dx.dtype == dt
        total[:, :, a:bb, cc:d] += dx
    full = ops.bn_backward(dy, xhat, gamma, inv_std, full_s1 / n, full_s2 / n)
    _, tdz, _, _, _, _ = torch_bn(z, gamma, np.zeros(c, dt), dy, np.zeros(c, dt), np.ones(c, dt))
    # the partials were split and rounded to dt before summing: a few ulps more
    mag = bn_backward_scale(dy, xhat_scale(z, mean, inv_std), gamma, inv_std)
    check(total.astype(dt), full, dt, mag, rtol=10 * RTOL[dt])
    check(total.astype(dt), tdz, dt, mag, rtol=10 * RTOL[dt])


# -- the layers after the spatial prefix -------------------------------------

@FAST
@given(DTYPES, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)), SEEDS)
def test_avgpool_matches_torch(dt, shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dt)
    y = ops.avgpool_forward(x)
    dy = rng.standard_normal(y.shape).astype(dt)
    dx = ops.avgpool_backward(x.shape, dy)
    tx = t64(x, True)
    ty = tx.mean(dim=(2, 3), keepdim=True)
    ty.backward(t64(dy))
    check(y, ty, dt, t64(np.abs(x)).mean(dim=(2, 3), keepdim=True))
    check(dx, tx.grad, dt)


@FAST
@given(DTYPES, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)),
       st.integers(1, 6), SEEDS)
def test_connected_matches_torch(dt, shape, out, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dt)
    k = int(np.prod(shape[1:]))
    w = rng.standard_normal((out, k)).astype(dt)
    bias = rng.standard_normal(out).astype(dt)
    dy = rng.standard_normal((shape[0], out)).astype(dt)
    y = ops.connected_forward(x, w, bias)
    dx, dw, db = ops.connected_backward(x, w, dy)
    mags = []
    for xs, ws, bs, dys in ((x, w, bias, dy), (np.abs(x), np.abs(w), np.abs(bias), np.abs(dy))):
        tx, tw, tb = t64(xs, True), t64(ws, True), t64(bs, True)
        ty = F.linear(tx.reshape(shape[0], -1), tw, tb)
        ty.backward(t64(dys))
        mags.append((ty, tx.grad, tw.grad, tb.grad))
    (ty, tdx, tdw, tdb), (my, mdx, mdw, mdb) = mags
    check(y, ty, dt, my)
    check(dx, tdx, dt, mdx)
    check(dw, tdw, dt, mdw)
    check(db, tdb, dt, mdb)


@FAST
@given(DTYPES, st.integers(1, 4), st.integers(2, 7), st.floats(-1e3, 1e3), SEEDS)
def test_softmax_xent_matches_torch(dt, b, k, offset, seed):
    """Including large logits (offset up to 1e3): the log-sum-exp is stable."""
    rng = np.random.default_rng(seed)
    logits = (offset + 3 * rng.standard_normal((b, k))).astype(dt)
    labels = rng.integers(0, k, b)
    loss, grad = ops.softmax_xent(logits, labels)
    assert isinstance(loss, float) and np.isfinite(loss)
    tz = t64(logits, True)
    tl = F.cross_entropy(tz, torch.tensor(labels))
    tl.backward()
    # float32: the logits are shifted by their max in float32, exact (Sterbenz)
    # only near the max; the loss is relative to the spread of the logits.
    spread = float(np.abs(logits - logits.max(axis=1, keepdims=True)).max()) + 1.0
    assert abs(loss - tl.item()) <= RTOL[np.dtype(dt)] * max(abs(tl.item()), spread)
    check(grad, tz.grad, dt, 1.0 / b)


@FAST
@given(DTYPES, st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)), SEEDS)
def test_sse_matches_torch(dt, shape, seed):
    rng = np.random.default_rng(seed)
    y, t = rng.standard_normal(shape).astype(dt), rng.standard_normal(shape).astype(dt)
    loss, grad = ops.sse(y, t)
    ty = t64(y, True)
    tl = 0.5 * ((ty - t64(t)) ** 2).sum() / shape[0]
    tl.backward()
    assert isinstance(loss, float)
    assert abs(loss - tl.item()) <= RTOL[np.dtype(dt)] * tl.item()
    check(grad, ty.grad, dt, np.abs(ty.grad.numpy()))


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("s,shape", [(2, (2, 3, 4, 6)), (3, (1, 2, 6, 9)), (2, (1, 1, 2, 2)), (1, (2, 2, 3, 3))])
def test_space_to_depth_reorg_matches_pixel_unshuffle(dt, s, shape):
    """A permutation: forward and backward exactly equal torch's. (darknet's
    order: tests/test_darknet_parity.py.)"""
    rng = np.random.default_rng(s)
    x = rng.standard_normal(shape).astype(dt)
    y = ops.reorg_forward(x, s, "space_to_depth")
    tx = torch.tensor(x, requires_grad=True)
    ty = F.pixel_unshuffle(tx, s)
    assert y.dtype == dt and np.array_equal(y, ty.detach().numpy())
    dy = rng.standard_normal(y.shape).astype(dt)
    ty.backward(torch.tensor(dy))
    dx = ops.reorg_backward(dy, s, "space_to_depth")
    assert dx.dtype == dt and np.array_equal(dx, tx.grad.numpy())


@pytest.mark.parametrize("dt", [np.float32, np.float64])
@pytest.mark.parametrize("s,shape", [(2, (2, 3, 4, 6)), (3, (1, 2, 6, 9)), (2, (1, 1, 2, 2))])
def test_onnx_reorg_is_blocks_first_space_to_depth(dt, s, shape):
    """order="onnx" is ONNX SpaceToDepth, written out from its definition:
    output channel ``(dy*s + dx)*C + c`` at (i, j) is input (c, i*s + dy,
    j*s + dx); backward is the inverse permutation. (onnxruntime itself:
    tests/test_onnx.py.)"""
    rng = np.random.default_rng(s)
    x = rng.standard_normal(shape).astype(dt)
    b, c, h, w = shape
    expect = np.empty((b, c * s * s, h // s, w // s), dt)
    for dy in range(s):
        for dx in range(s):
            for ch in range(c):
                expect[:, (dy * s + dx) * c + ch] = x[:, ch, dy::s, dx::s]
    y = ops.reorg_forward(x, s, "onnx")
    assert y.dtype == dt and np.array_equal(y, expect)
    assert np.array_equal(ops.reorg_backward(y, s, "onnx"), x)
    if c > 1:
        assert not np.array_equal(y, ops.reorg_forward(x, s, "space_to_depth"))
