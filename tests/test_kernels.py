"""Every generated kernel equals the numpy reference (tilec_runtime.ops).

Kernels are compared with ``ops`` on the same inputs, in float32 and
float64, over random shapes, strides, band sizes and independent (top,
bottom, left, right) border pads as tiles have them, with inputs and
gradients that are strided views into larger arrays (as a tile's source
window is). Tolerances: 1e-12 relative in float64, 1e-5 in float32; for
sums of products the bound is elementwise, relative to the same operation
on absolute values (the forward-error bound of a sum), so that an output
that is a difference of large terms is held to what floating point allows.

Every kernel runs on 1 to 3 threads (drawn), which split its work: the
result may differ from one thread's by rounding only.

Then the compositions: a tile of a fused group (``TileStep``) on border
tiles of random plans equals the crop of the whole-map reference, one
device trains like the reference executor, and a training step allocates
no arrays after the first.
"""
import contextlib
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from alloc_counter import count_allocations
from built import module
from programs import ProgramBuilder, random_stacks
from test_tiled import OPT, one_device, well_conditioned
from tilec.analysis.tiles import spatial_prefix
from tilec.plan.build import GroupChoice, build_plan
from tilec_runtime import data, inprocess, ops, reference, weights
from tilec_runtime.comm import InProcessHub
from tilec_runtime.executor import RankExecutor
from tilec_runtime.fused import TileStep
from tilec_runtime.genops import GeneratedOps
from tilec_runtime.kernel_set import FILTER_SPLIT_MIN, Kernels, band_rows, filter_split
from tilec_runtime.lower import lower_rank, strided_workspace, workspace
from tilec_runtime.optim import SGD
from tilec_runtime.program import param_shapes

RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
DTYPES = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])
SEEDS = st.integers(0, 2**32 - 1)
THREADS = st.integers(1, 3)
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def kern(dtype):
    return Kernels(module(dtype), dtype)


@contextlib.contextmanager
def threads(dtype, n):
    """The module's kernels on ``n`` threads (process-wide), one again after."""
    module(dtype).set_threads(n)
    try:
        yield
    finally:
        module(dtype).set_threads(1)


def check(actual, expected, dtype, mag=None):
    """|actual - expected| <= rtol * mag elementwise (default mag: max |expected|)."""
    actual, expected = np.asarray(actual), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == dtype, (actual.dtype, dtype)
    mag = np.abs(expected).max(initial=0.0) if mag is None else np.asarray(mag, dtype=np.float64)
    bound = RTOL[np.dtype(dtype)] * mag + 1e-300
    err = np.abs(actual.astype(np.float64) - expected)
    assert np.all(err <= bound), f"max error / bound = {np.max(err / bound):.3g}"


def embedded(rng, shape, dtype, draw_offsets):
    """A random array of ``shape`` that is a strided window of a larger one."""
    r0, c0, extra_r, extra_c = draw_offsets
    b, c, h, w = shape
    big = rng.standard_normal((b, c, h + r0 + extra_r, w + c0 + extra_c)).astype(dtype)
    return big[:, :, r0:r0 + h, c0:c0 + w]


@st.composite
def conv_case(draw, max_hw=12):
    """(dtype, x shape, F, k, stride, pads, band, offsets, seed) with a valid output; a
    band of more rows than the map puts several images in one GEMM."""
    k = draw(st.sampled_from((1, 2, 3, 5)))
    pads = tuple(draw(st.integers(0, k - 1)) for _ in range(4))
    h = draw(st.integers(max(1, k - pads[0] - pads[1]), max_hw))
    w = draw(st.integers(max(1, k - pads[2] - pads[3]), max_hw))
    stride = draw(st.integers(1, 3))
    ho = ops.out_size(h, k, stride, pads[0], pads[1])
    return dict(dtype=draw(DTYPES), shape=(draw(st.integers(1, 5)), draw(st.integers(1, 4)), h, w),
                f=draw(st.integers(1, 5)), k=k, stride=stride, pads=pads, band=draw(st.integers(1, 3 * ho)),
                offsets=tuple(draw(st.integers(0, 2)) for _ in range(4)), seed=draw(SEEDS), threads=draw(THREADS))


def conv_setup(case):
    rng = np.random.default_rng(case["seed"])
    dt, (_, c, h, w), k = case["dtype"], case["shape"], case["k"]
    x = embedded(rng, case["shape"], dt, case["offsets"])
    wt = rng.standard_normal((case["f"], c, k, k)).astype(dt)
    ho = ops.out_size(h, k, case["stride"], case["pads"][0], case["pads"][1])
    wo = ops.out_size(w, k, case["stride"], case["pads"][2], case["pads"][3])
    size = module(dt).workspace_size
    ws = np.empty(max(size(c, k, case["band"], ho, wo, False, case["threads"], case["f"]),
                      size(c, k, case["band"], ho, wo, True, case["threads"], case["f"])), dt)
    return rng, x, wt, ho, wo, ws


def abs_conv(x, w, stride, pads):
    """The error scale of a convolution: the same sums over absolute values, float64."""
    return ops.conv2d_forward(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), stride, pads)


# -- GEMM ----------------------------------------------------------------------

@FAST
@given(DTYPES, st.booleans(), st.booleans(), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9),
       st.sampled_from([0.0, 1.0]), SEEDS)
def test_gemm_is_row_major_with_transposes(dtype, ta, tb, m, n, k, beta, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    a64, b64 = (a.T if ta else a).astype(np.float64), (b.T if tb else b).astype(np.float64)
    want = 0.5 * a64 @ b64 + beta * c
    mag = 0.5 * np.abs(a64) @ np.abs(b64) + beta * np.abs(c)
    getattr(module(dtype), f"gemm_{'f32' if dtype == np.float32 else 'f64'}")(ta, tb, a, b, c, 0.5, beta)
    check(c, want, dtype, mag)


# -- convolution -----------------------------------------------------------------

@FAST
@given(conv_case(), st.data())
def test_conv_forward_and_its_batch_norm_statistics(case, data_):
    """Also in two calls of some rows each (a tile's interior, then its
    border), merging the statistics of both."""
    rng, x, w, ho, wo, ws = conv_setup(case)
    dt = case["dtype"]
    z = np.empty((x.shape[0], case["f"], ho, wo), dt)
    r0 = data_.draw(st.integers(0, ho - 1))
    c0 = data_.draw(st.integers(0, wo - 1))
    owned = (r0, data_.draw(st.integers(r0 + 1, ho)), c0, data_.draw(st.integers(c0 + 1, wo)))
    n, mean, m2 = np.zeros(1), np.zeros(case["f"]), np.zeros(case["f"])
    cut = data_.draw(st.integers(0, ho))
    with threads(dt, case["threads"]):
        if data_.draw(st.booleans()):
            kern(dt).conv_forward(x, w, case["stride"], case["pads"], z, ws, case["band"], owned, n, mean, m2)
        else:
            for rows in ((cut, ho), (0, cut)):
                kern(dt).conv_forward(x, w, case["stride"], case["pads"], z, ws, case["band"], owned, n, mean, m2,
                                      rows=rows)
    want = ops.conv2d_forward(x, w, case["stride"], case["pads"])
    check(z, want, dt, abs_conv(x, w, case["stride"], case["pads"]))
    wn, wmean, wm2 = ops.bn_stats(z[:, :, owned[0]:owned[1], owned[2]:owned[3]])
    # statistics of our own z (float64 accumulation, only the order differs)
    assert n[0] == wn
    zmax = np.abs(z).max()
    np.testing.assert_allclose(mean, wmean, rtol=1e-10, atol=1e-12 * zmax)
    np.testing.assert_allclose(m2, wm2, rtol=1e-10, atol=1e-12 * wn * zmax ** 2)


@FAST
@given(conv_case(), st.booleans(), st.booleans())
def test_conv_backward_adds_the_input_gradient_and_sets_or_adds_the_weight_gradient(case, with_dx, accumulate):
    rng, x, w, ho, wo, ws = conv_setup(case)
    dt = case["dtype"]
    dy = rng.standard_normal((x.shape[0], case["f"], ho, wo)).astype(dt)
    dw = np.full(w.shape, 7.0, dt)  # overwritten, or added to with ``accumulate``
    dx = embedded(rng, x.shape, dt, case["offsets"][::-1]) if with_dx else None
    before = None if dx is None else dx.copy()
    with threads(dt, case["threads"]):
        kern(dt).conv_backward(x, w, case["stride"], case["pads"], dy, ws, case["band"], dw, dx,
                               accumulate=accumulate)
    want_dx, want_dw = ops.conv2d_backward(x, w, case["stride"], case["pads"], dy)
    ax, aw, ady = np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), np.abs(dy).astype(np.float64)
    mag_dx, mag_dw = ops.conv2d_backward(ax, aw, case["stride"], case["pads"], ady)
    check(dw, want_dw + (7.0 if accumulate else 0.0), dt, mag_dw + 7.0)
    if with_dx:
        check(dx, before + want_dx, dt, mag_dx + np.abs(before))


@FAST
@given(conv_case(), st.integers(0, 40), st.booleans())
def test_a_thread_stride_moves_the_bands_and_changes_no_result(case, extra, with_dx):
    """``tstride`` (a tile's convs each thread's band in one place): forward
    and backward in a workspace whose thread bands lie ``tstride`` apart,
    the lowering's layout (``lower.strided_workspace``),
    give what bands ``per`` apart give; shorter than a band is refused."""
    rng, x, w, ho, wo, ws = conv_setup(case)
    dt, nt = case["dtype"], case["threads"]
    op = {"kind": "conv", "channels": x.shape[1], "size": case["k"], "filters": case["f"], "out": [ho, wo],
          "band": case["band"]}
    stride, need = strided_workspace([op], nt)
    stride += extra
    big = np.full(need + extra * nt, np.nan, dt)
    dy = rng.standard_normal((x.shape[0], case["f"], ho, wo)).astype(dt)
    got = []
    with threads(dt, nt):
        for use, tstride in ((ws, 0), (big, stride)):
            z = np.empty((x.shape[0], case["f"], ho, wo), dt)
            kern(dt).conv_forward(x, w, case["stride"], case["pads"], z, use, case["band"], tstride=tstride)
            dw = np.zeros(w.shape, dt)
            dx = np.zeros(x.shape, dt) if with_dx else None
            kern(dt).conv_backward(x, w, case["stride"], case["pads"], dy, use, case["band"], dw, dx, tstride=tstride)
            got.append((z, dw, dx))
        if x.shape[1] * case["k"] ** 2 * min(case["band"], ho) * wo > 1:  # (a band of more than 1 element)
            with pytest.raises(ValueError, match="thread stride"):
                kern(dt).conv_backward(x, w, case["stride"], case["pads"], dy, big, case["band"], np.zeros(w.shape, dt),
                                       None, tstride=1)
    for a, b in zip(*got):
        if a is not None:
            np.testing.assert_array_equal(b, a)


@FAST
@given(conv_case(), st.integers(1, 3))
def test_conv_backward_without_dw_adds_the_input_gradient_alone(case, images):
    """``dw`` None (a split layer's input gradient, sent off before its
    weight gradient): dx as the reference has it, on bands of rows or of
    ``images`` whole maps (images > 1), on any number of threads; no bn."""
    rng, x, w, ho, wo, ws = conv_setup(case)
    dt = case["dtype"]
    band = case["band"] if images == 1 else images * ho
    if images > 1:
        ws = np.empty(module(dt).workspace_size(x.shape[1], w.shape[2], band, ho, wo, True, 3, case["f"]), dt)
    dy = rng.standard_normal((x.shape[0], case["f"], ho, wo)).astype(dt)
    dx = embedded(rng, x.shape, dt, case["offsets"][::-1])
    before = dx.copy()
    with threads(dt, case["threads"]):
        kern(dt).conv_backward(x, w, case["stride"], case["pads"], dy, ws, band, None, dx)
    want_dx, _ = ops.conv2d_backward(x, w, case["stride"], case["pads"], dy, weight_grad=False)
    ax, aw, ady = np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), np.abs(dy).astype(np.float64)
    mag_dx, _ = ops.conv2d_backward(ax, aw, case["stride"], case["pads"], ady)
    check(dx, before + want_dx, dt, mag_dx + np.abs(before))
    with pytest.raises(ValueError, match="only an input gradient"):
        kern(dt).conv_backward(x, w, case["stride"], case["pads"], dy, ws, band, None, None)


def split_inputs(rng, data_, nb, f, ho, wo, dt):
    """What a test of a conv's thread split feeds both passes: the owned
    rectangle, the row where the forward is cut in two calls, z and dz, the
    batch-norm vectors (mean, inv, gamma, m1, m2), and which gradients to
    make (weight, input)."""
    owned = (ho // 3, ho, 0, max(1, wo // 2))
    cut = data_.draw(st.integers(0, ho))
    z = rng.standard_normal((nb, f, ho, wo)).astype(dt)
    dz = rng.standard_normal((nb, f, ho, wo)).astype(dt)
    vectors = tuple(rng.standard_normal(f).astype(dt) for _ in range(5))
    return owned, cut, z, dz, vectors, data_.draw(st.sampled_from([(True, True), (True, False), (False, True)]))


@st.composite
def image_split_case(draw):
    """A conv whose threads split its images one at a time: an image or
    more per thread, shared out evenly enough, a band of the map's rows at
    most, too few filters to split them, 2 or 3 threads."""
    k = draw(st.sampled_from((1, 3)))
    pads = tuple(draw(st.integers(0, k - 1)) for _ in range(4))
    h = draw(st.integers(max(3, k + 1 - pads[0] - pads[1]), 9))
    w = draw(st.integers(max(1, k - pads[2] - pads[3]), 9))
    ho = ops.out_size(h, k, 1, pads[0], pads[1])
    nt = draw(st.integers(2, min(3, ho)))
    nb = draw(st.sampled_from([nt, 2 * nt, 4 * nt + 1]))
    return dict(dtype=draw(DTYPES), shape=(nb, draw(st.integers(1, 4)), h, w), f=draw(st.integers(1, 6)), k=k,
                stride=1, pads=pads, band=draw(st.integers(1, ho)),
                offsets=tuple(draw(st.integers(0, 2)) for _ in range(4)), seed=draw(SEEDS), threads=nt)


@FAST
@given(image_split_case(), st.data())
def test_threads_that_split_the_images_compute_what_one_thread_does(case, data_):
    """Forward (in two calls of some rows each) with its statistics, and
    backward with the batch-norm finish on an owned rectangle, with and
    without either gradient: on threads that split the images (each its
    own images, every row, a private weight gradient but the first), as
    one thread does, and by rows, the split turned off
    (``allow_image_split``), as one thread does too; the epilogue kernels
    split the same images (``splits_images``) only where it is on."""
    rng, x, w, ho, wo, ws = conv_setup(case)
    dt, f, nb, nt, band = case["dtype"], case["f"], x.shape[0], case["threads"], case["band"]
    owned, cut, z, dz, (mean, inv, gamma, m1, m2), (with_dw, with_dx) = split_inputs(rng, data_, nb, f, ho, wo, dt)
    got = {}
    for threads_, split in ((1, True), (nt, True), (nt, False)):
        out, n, mu, var = np.empty((nb, f, ho, wo), dt), np.zeros(1), np.zeros(f), np.zeros(f)
        d, dw, dx = dz.copy(), np.ones(w.shape, dt), np.zeros(x.shape, dt)
        module(dt).allow_image_split(split)
        try:
            with threads(dt, threads_):
                assert bool(module(dt).splits_images(ho, wo, band, f, nb)) == (split and threads_ > 1)
                # (not where a thread would get no image: rows keep every thread busy)
                assert threads_ < 3 or not module(dt).splits_images(ho, wo, band, f, 2)
                assert not module(dt).splits_rows(ho, wo, band, f, nb) or not split
                for rows in ((cut, ho), (0, cut)):
                    kern(dt).conv_forward(x, w, 1, case["pads"], out, ws, band, owned, n, mu, var, rows=rows)
                kern(dt).conv_backward(x, w, 1, case["pads"], d, ws, band, dw if with_dw else None,
                                       dx if with_dx else None,
                                       (z, mean, inv, gamma, m1, m2) if with_dw else None, owned, accumulate=True)
        finally:
            module(dt).allow_image_split(True)
        got[threads_, split] = (out, n, mu, var, d, dw, dx)
    check(got[nt, True][0], ops.conv2d_forward(x, w, 1, case["pads"]), dt, abs_conv(x, w, 1, case["pads"]))
    tol = 1e-4 if dt == np.float32 else 1e-11
    for key in ((nt, True), (nt, False)):
        for one, several in zip(got[1, True], got[key]):
            np.testing.assert_allclose(several, one, rtol=tol, atol=tol * (1 + np.abs(one).max()))


@st.composite
def filter_split_case(draw):
    """A conv whose threads split its filters: a band (of one or all of a
    small map's rows) of fewer positions than filters, 2 or 3 threads."""
    k = draw(st.sampled_from((1, 3)))
    pads = tuple(draw(st.integers(0, k - 1)) for _ in range(4))
    h = draw(st.integers(max(1, k - pads[0] - pads[1]), 8))
    w = draw(st.integers(max(1, k - pads[2] - pads[3]), 8))
    stride = draw(st.integers(1, 2))
    ho = ops.out_size(h, k, stride, pads[0], pads[1])
    wo = ops.out_size(w, k, stride, pads[2], pads[3])
    nt = draw(st.integers(2, 3))
    band = draw(st.integers(1, ho))
    least = max(FILTER_SPLIT_MIN * nt, band * wo)
    return dict(dtype=draw(DTYPES), shape=(draw(st.integers(1, 3)), draw(st.integers(1, 5)), h, w),
                f=draw(st.integers(least, least + 8)), k=k, stride=stride, pads=pads, band=band,
                offsets=tuple(draw(st.integers(0, 2)) for _ in range(4)), seed=draw(SEEDS), threads=nt)


@FAST
@given(filter_split_case(), st.data())
def test_threads_that_split_the_filters_compute_what_one_thread_does(case, data_):
    """Forward (in two calls of some rows each) with its statistics, and
    backward with the batch-norm finish on an owned rectangle, with and
    without the weight or the input gradient, the weight gradient set or
    added to: on threads that split the filters (and the input channels),
    as the reference has it and as one thread does, in a workspace of a
    band per thread (each thread's filters' part of the input gradient; no
    private weight gradients); and by rows, the split turned off
    (``allow_filter_split``), as one thread does too."""
    rng, x, w, ho, wo, _ = conv_setup(case)
    dt, f, nb, nt = case["dtype"], case["f"], x.shape[0], case["threads"]
    assert module(dt).splits_filters(ho, wo, case["band"], f, nt)
    size = module(dt).workspace_size(x.shape[1], case["k"], case["band"], ho, wo, True, nt, f)
    assert size == x.shape[1] * case["k"] ** 2 * case["band"] * wo * nt
    ws = np.empty(size, dt)
    owned, cut, z, dz, (mean, inv, gamma, m1, m2), (with_dw, with_dx) = split_inputs(rng, data_, nb, f, ho, wo, dt)
    accumulate = data_.draw(st.booleans())
    got = {}
    for threads_, split in ((1, True), (nt, True), (nt, False)):  # (False: by rows, as the split turned off has it)
        out, n, mu, var = np.empty((nb, f, ho, wo), dt), np.zeros(1), np.zeros(f), np.zeros(f)
        d, dw, dx = dz.copy(), np.ones(w.shape, dt), np.zeros(x.shape, dt)
        module(dt).allow_filter_split(split)
        try:
            assert bool(module(dt).splits_filters(ho, wo, case["band"], f, nt)) == split
            use = ws
            if not split:  # by rows: a band per thread and a private weight gradient per thread but the first
                use = np.empty(module(dt).workspace_size(x.shape[1], case["k"], case["band"], ho, wo, True, nt,
                                                         f), dt)
            with threads(dt, threads_):
                for rows in ((cut, ho), (0, cut)):
                    kern(dt).conv_forward(x, w, case["stride"], case["pads"], out, use, case["band"], owned, n, mu,
                                          var, rows=rows)
                kern(dt).conv_backward(x, w, case["stride"], case["pads"], d, use, case["band"],
                                       dw if with_dw else None, dx if with_dx else None,
                                       (z, mean, inv, gamma, m1, m2) if with_dw else None, owned,
                                       accumulate=accumulate)
        finally:
            module(dt).allow_filter_split(True)
        got[threads_, split] = (out, n, mu, var, d, dw, dx)
    check(got[nt, True][0], ops.conv2d_forward(x, w, case["stride"], case["pads"]), dt,
          abs_conv(x, w, case["stride"], case["pads"]))
    tol = 1e-4 if dt == np.float32 else 1e-11
    for key in ((nt, True), (nt, False)):
        for one, several in zip(got[1, True], got[key]):
            np.testing.assert_allclose(several, one, rtol=tol, atol=tol * (1 + np.abs(one).max()))
    if not with_dw:  # the input gradient alone, of dz as it is
        want_dx, _ = ops.conv2d_backward(x, w, case["stride"], case["pads"], dz, weight_grad=False)
        mag_dx, _ = ops.conv2d_backward(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64),
                                        case["stride"], case["pads"], np.abs(dz).astype(np.float64))
        check(got[nt, True][6], want_dx, dt, mag_dx)


def test_the_planner_sizes_a_conv_workspace_as_the_kernels_do():
    """``lower.workspace`` (the planner's arena) against the module's
    ``workspace_size`` and ``splits_filters`` (what the kernels check and
    do), over maps, filters, bands and threads either side of the rule."""
    kernels = module(np.float32)
    for c, k, ho, wo, f in [(256, 3, 13, 13, 512), (128, 3, 26, 26, 256), (4, 3, 3, 3, 32), (16, 1, 1, 1, 48),
                            (1024, 3, 13, 13, 1024), (8, 3, 5, 5, 24), (512, 3, 26, 26, 512)]:
        for threads_ in (1, 2, 3, 4):
            for band in (max(1, ho // 2), ho):
                op = {"kind": "conv", "channels": c, "size": k, "filters": f, "out": [ho, wo], "band": band}
                assert bool(kernels.splits_filters(ho, wo, band, f, threads_)) == filter_split(ho, wo, band, f,
                                                                                                 threads_)
                assert workspace(op, threads_) == kernels.workspace_size(c, k, band, ho, wo, True,
                                                                               threads_, f)
    assert filter_split(13, 13, 13, 512, 2) and not filter_split(26, 26, 26, 256, 2)
    assert filter_split(13, 13, 8, 1024, 4) and filter_split(13, 13, 6, 512, 2)  # bands of 104 and 78 positions
    assert not filter_split(13, 13, 13, 512, 1) and not filter_split(3, 3, 3, 16, 2)


@FAST
@given(conv_case(), st.integers(2, 4))
def test_several_images_per_gemm_equal_one_image_per_gemm_with_the_batch_norm_finish(case, images):
    """A band of ``images`` whole maps (the threads split the images) against
    a band of one map (they split the rows): the same statistics forward, and
    backward the same batch-norm finish of dz in place (mean terms on the
    owned cells), weight and input gradients."""
    rng, x, w, ho, wo, _ = conv_setup(case)
    dt, f, nb = case["dtype"], case["f"], x.shape[0]
    z = rng.standard_normal((nb, f, ho, wo)).astype(dt)
    dz = rng.standard_normal((nb, f, ho, wo)).astype(dt)
    mean, inv, gamma, m1, m2 = (rng.standard_normal(f).astype(dt) for _ in range(5))
    owned = (ho // 3, ho, 0, max(1, wo // 2))
    got = []
    for band in (ho, images * ho):
        size = module(dt).workspace_size
        ws = np.empty(max(size(x.shape[1], case["k"], band, ho, wo, b, case["threads"], f) for b in (0, 1)), dt)
        d, dw, dx = dz.copy(), np.ones(w.shape, dt), np.zeros(x.shape, dt)
        out, n, mu, var = np.empty_like(z), np.zeros(1), np.zeros(f), np.zeros(f)
        with threads(dt, case["threads"]):
            kern(dt).conv_backward(x, w, case["stride"], case["pads"], d, ws, band, dw, dx,
                                   (z, mean, inv, gamma, m1, m2), owned, accumulate=True)
            kern(dt).conv_forward(x, w, case["stride"], case["pads"], out, ws, band, owned, n, mu, var)
        got.append((d, dw, dx, out, n, mu, var))
    tol = 1e-4 if dt == np.float32 else 1e-11
    for one, several in zip(*got):
        np.testing.assert_allclose(several, one, rtol=tol, atol=tol * (1 + np.abs(one).max()))


@st.composite
def bn_case(draw):
    """A map with per-channel batch-norm constants and an owned rectangle."""
    dt = draw(DTYPES)
    b, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    r0, c0 = draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))
    owned = (r0, draw(st.integers(r0 + 1, h)), c0, draw(st.integers(c0 + 1, w)))
    return dict(dtype=dt, shape=(b, c, h, w), owned=owned, pre=draw(st.sampled_from(["none", "bn", "bias"])),
                act=draw(st.sampled_from(["linear", "leaky", "relu"])), seed=draw(SEEDS), threads=draw(THREADS),
                by_rows=draw(st.booleans()), by_images=draw(st.booleans()))


def bn_setup(case):
    rng = np.random.default_rng(case["seed"])
    dt, c = case["dtype"], case["shape"][1]
    z = (rng.standard_normal(case["shape"]) * 3 + 1).astype(dt)
    mean, var = z.astype(np.float64).mean(axis=(0, 2, 3)), z.astype(np.float64).var(axis=(0, 2, 3))
    gamma, beta = rng.uniform(0.5, 2, c).astype(dt), rng.standard_normal(c).astype(dt)
    inv = (1.0 / np.sqrt(var + ops.BN_EPS)).astype(dt)
    return rng, z, mean, var, inv, gamma, beta


def reference_pre_act(z, case, mean, var, gamma, beta):
    """ops's activation input and output for pre in none / bn / bias."""
    if case["pre"] == "bn":
        u, xhat, _ = ops.bn_normalize(z, mean, var, gamma, beta)
    elif case["pre"] == "bias":
        u, xhat = z + beta[None, :, None, None], None
    else:
        u, xhat = z, None
    return u, xhat, ops.act_forward(u, case["act"])


@FAST
@given(bn_case())
def test_normalise_and_activate(case):
    _, z, mean, var, inv, gamma, beta = bn_setup(case)
    k, dt = kern(case["dtype"]), case["dtype"]
    y = np.empty(z.shape, dt)
    with threads(dt, case["threads"]):
        k.bn_act(z, y, k.pre[case["pre"]], k.act[case["act"]], mean.astype(dt), inv, gamma, beta,
                 by_rows=case["by_rows"], by_images=case["by_images"])
    check(y, reference_pre_act(z, case, mean, var, gamma, beta)[2], dt)


@FAST
@given(bn_case())
def test_activation_gradient_and_batch_norm_sums(case):
    rng, z, mean, var, inv, gamma, beta = bn_setup(case)
    k, dt = kern(case["dtype"]), case["dtype"]
    dy = rng.standard_normal(z.shape).astype(dt)
    c = z.shape[1]
    s1, s2 = np.zeros(c), np.zeros(c)
    da = dy.copy()
    with threads(dt, case["threads"]):
        k.act_grad(da, z, k.pre[case["pre"]], k.act[case["act"]], s1, s2, mean.astype(dt), inv, gamma, beta,
                   by_rows=case["by_rows"], by_images=case["by_images"])
    _, xhat, y = reference_pre_act(z, case, mean, var, gamma, beta)
    want = ops.act_backward(y, case["act"], dy)
    check(da, want, dt)
    check(s1, want.astype(np.float64).sum(axis=(0, 2, 3)), np.float64, np.abs(want).astype(np.float64).sum(axis=(0, 2, 3)))
    if case["pre"] == "bn":
        _, want_s2 = ops.bn_grad_sums(want, xhat)
        check(s2, want_s2, np.float64, np.abs(want.astype(np.float64) * xhat).sum(axis=(0, 2, 3)))


@FAST
@given(bn_case())
def test_batch_norm_backward_applies_mean_terms_on_owned_cells(case):
    rng, z, mean, var, inv, gamma, beta = bn_setup(case)
    k, dt = kern(case["dtype"]), case["dtype"]
    c = z.shape[1]
    dy = rng.standard_normal(z.shape).astype(dt)
    m1, m2 = rng.standard_normal(c) * 0.1, rng.standard_normal(c) * 0.1
    dz = dy.copy()
    r0, r1, c0, c1 = case["owned"]
    with threads(dt, case["threads"]):
        k.bn_backward(dz, z, mean.astype(dt), inv, gamma, m1.astype(dt), m2.astype(dt), case["owned"])
    xhat = (z - mean.astype(dt)[None, :, None, None]) * inv[None, :, None, None]
    want = ops.bn_backward(dy, xhat, gamma, inv, m1, m2, (slice(r0, r1), slice(c0, c1)))
    check(dz, want, dt, np.abs(gamma * inv)[None, :, None, None]
          * (np.abs(dy) + np.abs(m1)[None, :, None, None] + np.abs(xhat * m2[None, :, None, None])))


# -- max-pooling -------------------------------------------------------------------

@st.composite
def pool_case(draw):
    size = draw(st.integers(1, 3))
    pads = tuple(draw(st.integers(0, size - 1)) for _ in range(4))
    h = draw(st.integers(max(1, size - pads[0] - pads[1]), 11))
    w = draw(st.integers(max(1, size - pads[2] - pads[3]), 11))
    return dict(dtype=draw(DTYPES), shape=(draw(st.integers(1, 3)), draw(st.integers(1, 4)), h, w), size=size,
                stride=draw(st.integers(1, 3)), pads=pads, pre=draw(st.sampled_from(["none", "bn", "bias"])),
                act=draw(st.sampled_from(["linear", "leaky", "relu"])), offsets=tuple(draw(st.integers(0, 2)) for _ in range(4)),
                ties=draw(st.booleans()), seed=draw(SEEDS), threads=draw(THREADS), by_rows=draw(st.booleans()),
                by_images=draw(st.booleans()))


# YOLO's 2x2 stride-2 pool, which has cores of its own (no scratch row; on a
# contiguous map of short rows, one flat pass of the activation first), on
# an odd map inside a larger array, with ties, on rows too wide for it, and
# on contiguous maps, one tall enough for several CHUNKs of row pairs
YOLO_POOLS = [dict(dtype=np.dtype(dt), shape=(2, 3, h, w), size=2, stride=2, pads=(0, 0, 0, 0), pre=pre, act=act,
                   offsets=offsets, ties=ties, seed=7, threads=threads, by_rows=by_rows,
                   by_images=by_rows and threads == 2)
              for dt, h, w, pre, act, ties, threads, offsets, by_rows in [
                  ("float32", 9, 11, "bn", "leaky", True, 2, (1, 0, 2, 1), False),
                  ("float64", 6, 8, "bias", "relu", False, 1, (1, 0, 2, 1), True),
                  ("float32", 5, 300, "none", "linear", True, 3, (1, 0, 2, 1), True),
                  ("float32", 9, 11, "bn", "leaky", True, 2, (1, 0, 2, 0), True),
                  ("float64", 201, 12, "bn", "leaky", True, 2, (0, 0, 0, 0), False),
                  ("float64", 201, 12, "bn", "leaky", True, 3, (0, 0, 0, 0), True)]]
# the pool's gradient inside act_grad on maps of several CHUNKs of rows, with
# windows across a chunk's edge: overlapping (3 by 2, padded; 2 by 1) and not
GRAD_POOLS = [dict(dtype=np.dtype(dt), shape=(1, 2, h, w), size=size, stride=stride, pads=pads, pre="bias",
                   act="leaky", offsets=(3, 1, 2, 2), ties=True, seed=3, threads=threads, by_rows=by_rows,
                   by_images=False)
              for dt, h, w, size, stride, pads, threads, by_rows in [
                  ("float64", 150, 40, 3, 2, (1, 1, 1, 1), 2, False), ("float32", 97, 30, 2, 1, (0, 1, 0, 1), 1, False),
                  ("float64", 64, 64, 2, 2, (0, 0, 0, 0), 3, False), ("float64", 150, 40, 3, 2, (1, 1, 1, 1), 2, True),
                  ("float32", 97, 30, 2, 1, (0, 1, 0, 1), 3, True)]]


@FAST
@given(pool_case())
@example(YOLO_POOLS[0])
@example(YOLO_POOLS[1])
@example(YOLO_POOLS[2])
@example(YOLO_POOLS[3])
@example(YOLO_POOLS[4])
@example(YOLO_POOLS[5])
def test_max_pool_of_the_activation_forward_and_backward(case):
    """Pooling fused with the conv epilogue equals normalise, activate, pool;
    ties (rounded inputs) must pick the first maximum, as ops does."""
    rng = np.random.default_rng(case["seed"])
    dt, (b, c, h, w) = case["dtype"], case["shape"]
    z = embedded(rng, case["shape"], dt, case["offsets"])
    if case["ties"]:
        z[...] = np.round(z)
    mean, var = np.zeros(c), np.ones(c) - ops.BN_EPS
    gamma, beta = np.ones(c, dt), rng.standard_normal(c).astype(dt)
    inv = (1.0 / np.sqrt(var + ops.BN_EPS)).astype(dt)
    k = kern(dt)
    ho = ops.out_size(h, case["size"], case["stride"], case["pads"][0], case["pads"][1])
    wo = ops.out_size(w, case["size"], case["stride"], case["pads"][2], case["pads"][3])
    y, arg = np.empty((b, c, ho, wo), dt), np.empty((b, c, ho, wo), np.int16)
    with threads(dt, case["threads"]):
        k.pool_forward(z, case["size"], case["stride"], case["pads"], y, arg, k.pre[case["pre"]], k.act[case["act"]],
                       mean.astype(dt), inv, gamma, beta, by_rows=case["by_rows"], by_images=case["by_images"])
    a = reference_pre_act(z, case, mean, var, gamma, beta)[2]
    want_y, want_arg = ops.maxpool_forward(a, case["size"], case["stride"], case["pads"])
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(arg, want_arg)
    dy = rng.standard_normal(y.shape).astype(dt)
    dx = embedded(rng, z.shape, dt, case["offsets"])
    before = dx.copy()
    with threads(dt, case["threads"]):
        k.pool_backward(dy, arg, case["size"], case["stride"], case["pads"], dx, by_rows=case["by_rows"],
                        by_images=case["by_images"])
    want_dx = ops.maxpool_backward(z.shape, case["size"], case["stride"], case["pads"], want_arg, dy)
    check(dx, before + want_dx, dt, np.abs(before) + ops.maxpool_backward(
        z.shape, case["size"], case["stride"], case["pads"], want_arg, np.abs(dy)))


@FAST
@given(pool_case())
@example(GRAD_POOLS[0])
@example(GRAD_POOLS[1])
@example(GRAD_POOLS[2])
@example(GRAD_POOLS[3])
@example(GRAD_POOLS[4])
def test_pool_gradient_routed_inside_the_activation_gradient(case):
    """act_grad with a fused pool equals ops's max-pool backward followed by
    the activation backward, for a pool reading a window of the conv output."""
    rng = np.random.default_rng(case["seed"])
    dt, (b, c, h, w) = case["dtype"], case["shape"]
    r0, c0, extra_r, extra_c = case["offsets"]
    zbig = rng.standard_normal((b, c, h + r0 + extra_r, w + c0 + extra_c)).astype(dt)
    if case["ties"]:
        zbig[...] = np.round(zbig)
    z = zbig[:, :, r0:r0 + h, c0:c0 + w]
    bias = rng.standard_normal(c).astype(dt)
    k = kern(dt)
    pre = "bias" if case["pre"] != "none" else "none"
    u = z + bias[None, :, None, None] if pre == "bias" else z
    a = ops.act_forward(u, case["act"])
    p, arg = ops.maxpool_forward(a, case["size"], case["stride"], case["pads"])
    dp = rng.standard_normal(p.shape).astype(dt)
    da_window = ops.maxpool_backward(a.shape, case["size"], case["stride"], case["pads"], arg, dp)
    want = np.zeros(zbig.shape, dt)
    want[:, :, r0:r0 + h, c0:c0 + w] = ops.act_backward(ops.act_forward(
        zbig + bias[None, :, None, None] if pre == "bias" else zbig, case["act"])[:, :, r0:r0 + h, c0:c0 + w],
        case["act"], da_window)
    da = np.full(zbig.shape, np.nan, dt)  # ignored: act_grad writes every element
    s1 = np.zeros(c)
    with threads(dt, case["threads"]):
        k.act_grad(da, zbig, k.pre[pre], k.act[case["act"]], s1, None, None, None, None, bias,
                   (dp, arg, case["size"], case["stride"], case["pads"], (r0, c0, h, w)), by_rows=case["by_rows"],
                   by_images=case["by_images"])
    check(da, want, dt, np.abs(want) + ops.maxpool_backward(a.shape, case["size"], case["stride"], case["pads"],
                                                             arg, np.abs(dp)).max())
    # (overlapping windows add several dp into one element, in the data dtype)
    np.testing.assert_allclose(s1, want.astype(np.float64).sum(axis=(0, 2, 3)), rtol=RTOL[dt],
                               atol=RTOL[dt] * np.abs(dp).sum())


@FAST
@given(pool_case(), st.integers(1, 40), st.integers(1, 3), st.booleans())
@example(GRAD_POOLS[0], 7, 2, False)
@example(YOLO_POOLS[4], 40, 3, False)
@example(YOLO_POOLS[4], 5, 3, True)
def test_a_conv_backward_that_makes_its_gradient_again_equals_one_given_it(case, band, c_in, input_grad):
    """A conv with a fused pool stores no gradient at its output: act_grad
    makes only the sums (da None, the same sums), and conv_backward makes
    each band's gradient again from the pool's gradient and z (``regen``):
    the same batch-norm finish, weight gradient and input gradient (on
    several threads its pass makes the bands again) as from the stored
    gradient, on bands of any height and any threads, for a pool reading a
    window of the conv output."""
    rng = np.random.default_rng(case["seed"])
    dt, (b, f, h, w) = case["dtype"], case["shape"]
    r0, c0, extra_r, extra_c = case["offsets"]
    ho, wo = h + r0 + extra_r, w + c0 + extra_c
    z = rng.standard_normal((b, f, ho, wo)).astype(dt)
    if case["ties"]:
        z[...] = np.round(z)
    x = rng.standard_normal((b, c_in, ho, wo)).astype(dt)
    wt = rng.standard_normal((f, c_in, 3, 3)).astype(dt)
    mean, gamma, beta, m1, m2 = (rng.standard_normal(f).astype(dt) for _ in range(5))
    inv = (0.5 + rng.random(f)).astype(dt)
    k, pre, act = kern(dt), case["pre"], case["act"]
    u = z[:, :, r0:r0 + h, c0:c0 + w]
    if pre == "bn":
        u = (u - mean[None, :, None, None]) * inv[None, :, None, None] * gamma[None, :, None, None]
    if pre != "none":
        u = u + beta[None, :, None, None]
    p, arg = ops.maxpool_forward(ops.act_forward(u, act), case["size"], case["stride"], case["pads"])
    dp = rng.standard_normal(p.shape).astype(dt)
    pool = (dp, arg.astype(np.int16), case["size"], case["stride"], case["pads"], (r0, c0, h, w))
    bn = (z, mean, inv, gamma, m1, m2) if pre == "bn" else None
    vectors = (mean, inv, gamma, beta) if pre == "bn" else (None, None, None, beta if pre == "bias" else None)
    band = min(band, ho)
    owned = (ho // 3, ho, 0, max(1, wo // 2))
    ws = np.empty((c_in * 9 + f) * band * wo * 3 + 3 * f * c_in * 9, dt)
    got = []
    with threads(dt, case["threads"]):
        for regen in (False, True):
            da = None if regen else np.full(z.shape, np.nan, dt)
            s1, s2 = np.zeros(f), (np.zeros(f) if pre == "bn" else None)
            k.act_grad(da, z, k.pre[pre], k.act[act], s1, s2, *vectors, pool, by_rows=case["by_rows"],
                       by_images=case["by_images"])
            dw = np.ones(wt.shape, dt)
            dx = np.ones(x.shape, dt) if input_grad else None
            k.conv_backward(x, wt, 1, (1, 1, 1, 1), z if regen else da, ws, band, dw, dx, bn, owned,
                            accumulate=True, regen=(pool, k.pre[pre], k.act[act], z, vectors[3]) if regen else None)
            got.append((s1, s2, dw, dx))
    (s1a, s2a, dwa, dxa), (s1b, s2b, dwb, dxb) = got
    assert np.array_equal(s1a, s1b) and (s2a is None or np.array_equal(s2a, s2b))
    tol = 1e-5 if dt == np.float32 else 1e-12
    np.testing.assert_allclose(dwb, dwa, rtol=tol, atol=tol * (1 + np.abs(dwa).max()))
    if input_grad:
        assert not np.array_equal(dxa, np.ones(x.shape, dt))
        np.testing.assert_allclose(dxb, dxa, rtol=tol, atol=tol * (1 + np.abs(dxa).max()))


# -- per-channel steps, loss, update ----------------------------------------------------

@FAST
@given(DTYPES, st.integers(1, 6), st.integers(2, 500), SEEDS)
def test_batch_norm_constants_and_running_statistics(dtype, c, n, seed):
    rng = np.random.default_rng(seed)
    mean, m2 = rng.standard_normal(c), rng.uniform(0, 10, c)
    rm, rv = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    want_rm, want_rv = rm.copy(), rv.copy()
    mean_t, inv_t = np.empty(c, dtype), np.empty(c, dtype)
    kern(dtype).bn_constants(float(n), mean, m2, mean_t, inv_t, rm, rv)
    ops.bn_update_running(want_rm, want_rv, n, mean, m2)
    check(mean_t, mean.astype(dtype), dtype)
    check(inv_t, (1.0 / np.sqrt(m2 / n + ops.BN_EPS)).astype(dtype), dtype)
    check(rm, want_rm, dtype, np.abs(want_rm) + np.abs(mean))
    check(rv, want_rv, dtype)
    s1, s2 = rng.standard_normal(c), rng.standard_normal(c)
    m1_t, m2_t = np.empty(c, dtype), np.empty(c, dtype)
    dg, db = np.full(c, 0.5, dtype), np.full(c, -0.25, dtype)  # gradient accumulators: added to
    kern(dtype).bn_grad_constants(s1, s2, float(n), m1_t, m2_t, dg, db)
    check(m1_t, (s1 / n).astype(dtype), dtype)
    check(m2_t, (s2 / n).astype(dtype), dtype)
    check(dg, s2.astype(dtype) + 0.5, dtype, np.abs(s2) + 0.5)
    check(db, s1.astype(dtype) - 0.25, dtype, np.abs(s1) + 0.25)


@FAST
@given(DTYPES, st.integers(1, 4), st.sampled_from([1, 40, 200_000]), st.booleans(), st.booleans(), SEEDS, THREADS)
def test_sum_of_squares_loss_and_sgd_step(dtype, batch, n, momentum, decay, seed, nthreads):
    """SGD through the gradient accumulator (the momentum buffer, scaled by
    the momentum before backward adds the gradient) equals torch's SGD."""
    rng = np.random.default_rng(seed)
    k = kern(dtype)
    y, t = rng.standard_normal((batch, n)).astype(dtype), rng.standard_normal((batch, n)).astype(dtype)
    dy = np.empty_like(y)
    loss = k.sse(y.reshape(-1), t.reshape(-1), dy.reshape(-1), batch)
    want_loss, want_dy = ops.sse(y, t)
    assert abs(loss - want_loss) <= 1e-12 * want_loss + 1e-300
    check(dy, want_dy, dtype)
    opt = dict(lr=0.05, momentum=0.9 if momentum else 0.0, decay=1e-3 if decay else 0.0)
    p, a = rng.standard_normal(n).astype(dtype), np.zeros(n, dtype)
    ref = {"0.conv.weight": p.copy()}
    sgd = SGD(**opt)
    for step in range(3):
        g = rng.standard_normal(n).astype(dtype)
        with threads(dtype, nthreads):
            k.scale(a, opt["momentum"])  # (what backward starts from: momentum * v, or 0)
        a += g
        with threads(dtype, nthreads):
            k.sgd(p, a, opt["lr"], opt["decay"])
        sgd.step(ref, {"0.conv.weight": g})
    check(p, ref["0.conv.weight"], dtype, np.abs(ref["0.conv.weight"]) + 1)
    if momentum:
        check(a, sgd.velocity["0.conv.weight"], dtype, np.abs(sgd.velocity["0.conv.weight"]) + 1)


@FAST
@given(DTYPES, st.integers(1, 3), st.integers(1, 3), st.integers(1, 12), st.integers(1, 9),
       st.tuples(*[st.integers(0, 2)] * 4), SEEDS, THREADS, st.booleans())
def test_zero_rows_zeroes_a_strided_map_and_nothing_around_it(dtype, b, c, h, w, offsets, seed, nthreads, by_images):
    """zero_rows (a tile's gradient buffers, cleared on the rows or images
    each thread later adds into) clears the view and leaves the array
    around it."""
    r0, c0, extra_r, extra_c = offsets
    big = np.random.default_rng(seed).standard_normal((b, c, h + r0 + extra_r, w + c0 + extra_c)).astype(dtype) + 5
    before = big.copy()
    with threads(dtype, nthreads):
        kern(dtype).zero_rows(big[:, :, r0:r0 + h, c0:c0 + w], by_images)
    want = before.copy()
    want[:, :, r0:r0 + h, c0:c0 + w] = 0
    np.testing.assert_array_equal(big, want)


@FAST
@given(DTYPES, st.integers(1, 3), st.integers(1, 3), st.integers(1, 12), st.integers(1, 9),
       st.tuples(*[st.integers(0, 2)] * 4), st.booleans(), st.booleans(), SEEDS, THREADS, st.booleans())
def test_copy_rows_copies_or_adds_a_map_between_strided_views(dtype, b, c, h, w, offsets, add, readonly, seed,
                                                              nthreads, by_images):
    """copy_rows (a map landing in a tile's buffer: dst = src, or += src)
    equals numpy's, touches nothing around dst, and reads a read-only src
    (a frame's bytes)."""
    rng = np.random.default_rng(seed)
    r0, c0, extra_r, extra_c = offsets
    src = embedded(rng, (b, c, h, w), dtype, offsets[::-1])
    if readonly:
        src.flags.writeable = False
    big = rng.standard_normal((b, c, h + r0 + extra_r, w + c0 + extra_c)).astype(dtype)
    want = big.copy()
    if add:
        want[:, :, r0:r0 + h, c0:c0 + w] += src
    else:
        want[:, :, r0:r0 + h, c0:c0 + w] = src
    with threads(dtype, nthreads):
        kern(dtype).copy_rows(src, big[:, :, r0:r0 + h, c0:c0 + w], add, by_images)
    np.testing.assert_array_equal(big, want)


# -- the ops-compatible kernel object -------------------------------------------------

@FAST
@given(conv_case(), st.sampled_from(["linear", "leaky", "relu"]), st.data())
def test_generated_ops_is_a_drop_in_for_ops(case, act, data_):
    """GeneratedOps gives what ops gives, function by function (the chain
    of one conv layer with batch norm, activation and a max-pool)."""
    rng, x, w, ho, wo, _ = conv_setup(case)
    dt, g = case["dtype"], GeneratedOps(module(case["dtype"]))
    stride, pads = case["stride"], case["pads"]
    z = g.conv2d_forward(x, w, stride, pads)
    check(z, ops.conv2d_forward(x, w, stride, pads), dt, abs_conv(x, w, stride, pads))
    z = ops.conv2d_forward(x, w, stride, pads)  # from here on, both sides read the same z
    n, mean, m2 = g.bn_stats(z)
    wn, wmean, wm2 = ops.bn_stats(z)
    assert n == wn
    np.testing.assert_allclose(mean, wmean, rtol=1e-10, atol=1e-10 * np.abs(z).max())
    np.testing.assert_allclose(m2, wm2, rtol=1e-10, atol=1e-10 * np.abs(z).max() ** 2)
    gamma, beta = rng.uniform(0.5, 2, z.shape[1]).astype(dt), rng.standard_normal(z.shape[1]).astype(dt)
    var = wm2 / wn
    for got, want in zip(g.bn_normalize(z, wmean, var, gamma, beta), ops.bn_normalize(z, wmean, var, gamma, beta)):
        check(got, want, dt)
    u = ops.bn_normalize(z, wmean, var, gamma, beta)[0]
    y = ops.act_forward(u, act)
    check(g.act_forward(u, act), y, dt)
    size = data_.draw(st.integers(1, min(3, *y.shape[2:])))
    p, arg = g.maxpool_forward(y, size, size, (0, 0, 0, 0))
    wp, warg = ops.maxpool_forward(y, size, size, (0, 0, 0, 0))
    np.testing.assert_array_equal(p, wp)
    np.testing.assert_array_equal(arg, warg)
    dp = rng.standard_normal(p.shape).astype(dt)
    check(g.maxpool_backward(y.shape, size, size, (0, 0, 0, 0), arg, dp),
          ops.maxpool_backward(y.shape, size, size, (0, 0, 0, 0), warg, dp), dt)
    dy = rng.standard_normal(y.shape).astype(dt)
    check(g.act_backward(y, act, dy), ops.act_backward(y, act, dy), dt)
    xhat = ops.bn_normalize(z, wmean, var, gamma, beta)[1]
    for got, want in zip(g.bn_grad_sums(dy, xhat), ops.bn_grad_sums(dy, xhat)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(dy).sum())
    inv = (1.0 / np.sqrt(var + ops.BN_EPS)).astype(dt)
    m1, m2b = rng.standard_normal(z.shape[1]) * 0.1, rng.standard_normal(z.shape[1]) * 0.1
    owned = (slice(0, max(1, ho // 2)), slice(wo // 3, wo))
    check(g.bn_backward(dy, xhat, gamma, inv, m1, m2b, owned), ops.bn_backward(dy, xhat, gamma, inv, m1, m2b, owned),
          dt, np.abs(gamma * inv)[None, :, None, None] * (np.abs(dy) + 1))
    # in place (a channel-split tail's members): the same numbers as each makes apart, in dy's own memory
    for impl in (g, ops):
        apart = impl.bn_backward(impl.act_backward(y, act, dy), xhat, gamma, inv, m1, m2b, owned)
        mine = dy.copy()
        got = impl.bn_backward(impl.act_backward(y, act, mine, inplace=True), xhat, gamma, inv, m1, m2b, owned,
                               inplace=True)
        assert got is mine
        np.testing.assert_array_equal(got, apart)
    got_dx, got_dw = g.conv2d_backward(x, w, stride, pads, dy)
    want_dx, want_dw = ops.conv2d_backward(x, w, stride, pads, dy)
    mag_dx, mag_dw = ops.conv2d_backward(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), stride, pads,
                                         np.abs(dy).astype(np.float64))
    check(got_dx, want_dx, dt, mag_dx)
    check(got_dw, want_dw, dt, mag_dw)


# -- tiles of fused groups ------------------------------------------------------------

class ThreadAllReduce:
    """All-reduce between tiles running as threads (rank order, like Comm)."""

    def __init__(self, n):
        self.n, self.barrier, self.slots = n, threading.Barrier(n, timeout=60), {}

    def _gather(self, rank, key, arrays):
        self.slots[(key, rank)] = [a.copy() for a in arrays]
        self.barrier.wait()
        return [self.slots[(key, r)] for r in range(self.n)]

    def stats(self, rank):
        def hook(layer, n, mean, m2):
            parts = self._gather(rank, ("f", layer), (n, mean, m2))
            tn, tmean, tm2 = ops.bn_combine([(p[0][0], p[1], p[2]) for p in parts])
            n[0], mean[...], m2[...] = tn, tmean, tm2
        return hook

    def sums(self, rank):
        def hook(layer, s1, s2):
            parts = self._gather(rank, ("b", layer), (s1, s2))
            s1[...] = sum(p[0] for p in parts)
            s2[...] = sum(p[1] for p in parts)
        return hook


@st.composite
def group_cases(draw):
    """A random stack, a group of its spatial prefix (not the first when
    possible, so that the input gradient is needed) and a random grid."""
    program = draw(random_stacks(max_prefix=5, tails=("regress",)))
    prefix = spatial_prefix(program)
    first = draw(st.integers(0, prefix - 1))
    last = draw(st.integers(first, prefix - 1))
    _, h, w = program[last]["out_shape"]
    rows = sorted(draw(st.sets(st.integers(1, h - 1), max_size=min(2, h - 1)))) if h > 1 else []
    cols = sorted(draw(st.sets(st.integers(1, w - 1), max_size=min(2, w - 1)))) if w > 1 else []
    return program, first, last, [0, *rows, h], [0, *cols, w], draw(DTYPES), draw(st.integers(1, 2)), draw(SEEDS)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(group_cases())
def test_tiles_of_a_group_compose_to_the_whole_map(case):
    """Each tile's output is the crop of the whole-map forward; partial
    input gradients overlap-add to the whole-map input gradient and partial
    weight gradients sum to the whole-map ones (border tiles included: their
    pads are the map's, interior edges have none)."""
    program, first, last, rows, cols, dt, batch, seed = case
    prefix = spatial_prefix(program)
    groups = ([GroupChoice(0, first - 1, [0, program[first - 1]["out_shape"][1]],
                           [0, program[first - 1]["out_shape"][2]], [0])] if first > 0 else [])
    ntiles = (len(rows) - 1) * (len(cols) - 1)
    groups.append(GroupChoice(first, last, rows, cols, list(range(ntiles))))
    if last < prefix - 1:
        _, h, w = program[prefix - 1]["out_shape"]
        groups.append(GroupChoice(last + 1, prefix - 1, [0, h], [0, w], [0]))
    plan = build_plan(program, groups, model="t", batch=batch, dtype=dt.name,
                      devices=[f"d{i}" for i in range(ntiles)], optimizer=OPT)
    g = next(i for i, grp in enumerate(plan["groups"]) if grp["layers"] == [first, last])
    # the whole-map reference for this group
    rng = np.random.default_rng(seed)
    params, buffers = weights.init_params(program, seed % 1000, dt)
    x_full = rng.standard_normal((batch, *program[first]["in_shape"])).astype(dt)
    acts = {first - 1: x_full}
    ref_buffers = {k: v.copy() for k, v in buffers.items()}
    layers = program[first:last + 1]
    _, cache = reference.forward_layers(layers, params, ref_buffers, acts, None)
    # Batch norm of a nearly constant map (pooled tiny maps) amplifies
    # rounding by 1/sigma: in float32 that is noise of the size of the
    # result, whatever the summation order, so such examples are discarded.
    inv_stds = [cache[layer["index"]][1].max() for layer in layers if layer["kind"] == "conv" and layer["bn"]]
    assume(dt == np.float64 or max(inv_stds, default=0.0) < 30.0)
    dy_full = rng.standard_normal(acts[last].shape).astype(dt)
    grads, dout = reference.backward_layers(layers, params, acts, cache, {last: dy_full})
    # every tile in its own thread, all-reducing like devices do, stage by stage as the executor runs them
    plan_tiles = plan["groups"][g]["tiles"]
    reducer, results = ThreadAllReduce(len(plan_tiles)), [None] * len(plan_tiles)
    keys = [k for layer in layers for k in param_shapes(layer)]

    def run(rank):
        tile = plan_tiles[rank]
        (r0, r1), (c0, c1) = tile["input"]
        step = TileStep(lower_rank(plan, tile["device"])[g], kern(dt), dt, x_full[:, :, r0:r1 + 1, c0:c1 + 1].copy())
        own_buffers = {k: v.copy() for k, v in buffers.items()}
        for j, u in enumerate(step.units):
            if u.kind == "maxpool":
                step.pool_fwd(j)
                continue
            step.conv_fwd(j, params)
            if u.gamma is not None:
                reducer.stats(rank)(u.spec["layer"], *step.stats(j))
            step.epi_fwd(j, params, own_buffers)
        out = step.output.copy()
        (o0, o1), (q0, q1) = tile["rows"], tile["cols"]
        step.grad_output[...] = dy_full[:, :, o0:o1 + 1, q0:q1 + 1]
        acc = {k: np.zeros_like(params[k]) for k in keys}
        for j in range(len(step.units) - 1, -1, -1):
            u = step.units[j]
            if u.kind == "maxpool":
                step.pool_bwd(j)
                continue
            step.epi_bwd(j, params)
            if u.gamma is not None:
                reducer.sums(rank)(u.spec["layer"], *step.sums(j))
            step.conv_bwd(j, params, acc)
        din = None if step.grad_input is None else step.grad_input.copy()
        results[rank] = (out, acc, din, own_buffers)

    threads_ = [threading.Thread(target=run, args=(r,)) for r in range(len(plan_tiles))]
    for t in threads_:
        t.start()
    for t in threads_:
        t.join()
    assert all(r is not None for r in results), "a tile thread failed"
    tol = 1e-9 if dt == np.float64 else 2e-4
    # float32 errors relative to max(|value|, 1), as in test_tiled: batch norm
    # over two samples has an exactly zero gradient in exact arithmetic, and
    # what either side computes there is rounding noise
    floor = 1e-30 if dt == np.float64 else 1.0
    dx_sum = np.zeros_like(x_full)
    for tile, (out, tile_grads, din, own_buffers) in zip(plan_tiles, results):
        (o0, o1), (q0, q1) = tile["rows"], tile["cols"]
        want = acts[last][:, :, o0:o1 + 1, q0:q1 + 1]
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.abs(acts[last]).max())
        for key in buffers:  # running statistics: the same on every tile, from synchronised statistics
            np.testing.assert_allclose(own_buffers[key], ref_buffers[key], rtol=tol, atol=tol)
        if din is not None:
            (r0, r1), (c0, c1) = tile["input"]
            dx_sum[:, :, r0:r1 + 1, c0:c1 + 1] += din
    for key, want in grads.items():
        got = sum(r[1][key] for r in results) if ".bn." not in key else results[0][1][key]
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(np.abs(want).max(), 1.0), err_msg=key)
    if first > 0:
        want = dout[first - 1]
        np.testing.assert_allclose(dx_sum, want, rtol=tol, atol=tol * max(np.abs(want).max(), floor))


# -- the one-device trainer -----------------------------------------------------------

def one_rank(plan, params, buffers):
    """The executor of a one-device plan."""
    return RankExecutor(plan, 0, InProcessHub(1, 10).comm(0), module(plan["dtype"]), params, buffers)


def _train_both(program, dtype, batch, steps, seed=3):
    params, buffers = weights.init_params(program, seed, dtype)
    batches = data.generated_batches(program, batch, seed, dtype)
    prefix = spatial_prefix(program)
    _, h, w = program[prefix - 1]["out_shape"]
    plan = build_plan(program, [GroupChoice(0, prefix - 1, [0, h], [0, w], [0])], model="t", batch=batch,
                      dtype=np.dtype(dtype).name, devices=["d0"], optimizer=OPT)
    want = one_device(program, params, buffers, batches, steps)  # copies params and buffers
    ex = one_rank(plan, params, buffers)
    got = [ex.step(*batches.get(step)) for step in range(steps)]
    return (got, ex.params, ex.buffers), want


def assert_trained_alike(got, want, tol):
    (losses, p, b), (wl, wp, wb) = got, want
    np.testing.assert_allclose(losses, wl, rtol=tol)
    for key in wp:
        np.testing.assert_allclose(p[key], wp[key], rtol=tol, atol=tol * max(np.abs(wp[key]).max(), 1.0), err_msg=key)
    for key in wb:
        np.testing.assert_allclose(b[key], wb[key], rtol=tol, atol=tol, err_msg=key)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_stacks(max_prefix=5), st.integers(1, 2))
def test_one_device_trains_like_the_reference(program, batch):
    """Three SGD steps with momentum on random stacks, float64 (tails other
    than a cost run on the reference executor). Random stacks in float32
    would compare rounding noise: a conv feeding batch norm through one
    channel is scale-invariant, its gradient is zero in exact arithmetic
    and its weight moves by noise amplified by 1/|w|; float32 is checked
    kernel by kernel above and on a realistic stack below."""
    # Batch norm into global average pooling (directly or through a route)
    # gives, at batch 1, a map whose mean is exactly beta, and the next
    # activation sits on its kink at 0 where rounding picks the branch.
    assume(batch > 1 or not any(layer["kind"] == "avgpool" for layer in program))
    got, want = _train_both(program, np.float64, batch, steps=3)
    assume(max(want[0]) < 10 * want[0][0])  # diverging runs amplify rounding, not errors
    params, buffers = weights.init_params(program, 3, "float64")
    assume(well_conditioned(program, params, buffers, data.generated_batches(program, batch, 3, "float64"), 3))
    assert_trained_alike(got, want, 1e-9)


def test_one_device_float32_on_a_yolo_like_stack():
    got, want = _train_both(yolo_like(), np.float32, 2, steps=4)
    assert_trained_alike(got, want, 1e-4)


def yolo_like(c=3, hw=20):
    """conv+BN+leaky / max-pool pairs, a stride-1 pool, a bias conv and a cost."""
    b = ProgramBuilder(c, hw, hw)
    b.conv(4, 3, bn=True, act="leaky")
    b.maxpool(2, 2)
    b.conv(6, 3, bn=True, act="leaky")
    b.maxpool(2, 1)
    b.conv(5, 1, pad=0, bn=False, act="relu")
    b.conv(3, 3, stride=2, bn=True, act="linear")
    b.cost()
    return b.build()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_training_step_allocates_no_arrays_after_the_first(dtype):
    """numpy's data allocations are counted exactly (tests/alloc_counter.py):
    the second step of the generated path makes none, the reference path
    (the positive control) makes many."""
    program = yolo_like()
    params, buffers = weights.init_params(program, 0, dtype)
    images, target = data.generated_batches(program, 2, 0, dtype).get(0)
    plan = build_plan(program, [GroupChoice(0, 2, [0, 10], [0, 10], [0]),
                                GroupChoice(3, 5, [0, 5], [0, 5], [0])],
                      model="t", batch=2, dtype=dtype, devices=["d0"], optimizer=OPT)
    ex = one_rank(plan, params, buffers)
    ex.step(images, target)
    with count_allocations() as generated:
        ex.step(images, target)
    with count_allocations() as ref:
        loss, grads = reference.train_step(program, params, buffers, images, target)
    assert ref() > 10 and loss > 0
    assert generated() == 0


def test_the_image_pieces_are_let_go_once_they_have_landed():
    """A device streamed its pieces of the image (``inputs``) holds none of
    them after their input ops (the memory model counts only the batches
    streamed ahead), and trains as when cut from the whole batch."""
    import weakref
    from tilec_runtime.executor import input_messages, input_piece
    program = yolo_like()
    params, buffers = weights.init_params(program, 0, "float64")
    images, target = data.generated_batches(program, 2, 0, "float64").get(0)
    plan = build_plan(program, [GroupChoice(0, 2, [0, 10], [0, 10], [0]),
                                GroupChoice(3, 5, [0, 5], [0, 5], [0])],
                      model="t", batch=2, dtype="float64", devices=["d0"], optimizer=OPT)
    whole, streamed = one_rank(plan, params, buffers), one_rank(plan, params, buffers)
    inputs = {k: np.array(input_piece(images, plan["messages"][k])) for k, _ in input_messages(plan, 0)}
    assert inputs
    refs = [weakref.ref(a) for a in inputs.values()]
    got = streamed.step(target=target, inputs=inputs)
    assert inputs == {} and all(r() is None for r in refs)
    assert got == whole.step(images, target)
    for key in whole.params:
        np.testing.assert_array_equal(streamed.params[key], whole.params[key])


def test_band_rows_cover_the_map_and_bound_the_workspace():
    for c, k, ho, wo in [(3, 3, 416, 416), (512, 3, 13, 13), (1, 1, 1, 1), (64, 1, 7, 3000)]:
        rows = band_rows(c, k, ho, wo)
        assert 1 <= rows <= ho
        assert rows == 1 or c * k * k * rows * wo <= 1 << 20


def test_small_maps_take_several_whole_images_per_band():
    """tiny416's 3x3 layers at 96x96, batch 16: the band holds whole images,
    as many as the position and element bounds allow, never more than the
    batch; a 13x13 map of 512 channels does not fit two; a 1x1 conv (whose
    GEMM reads its input planes directly) keeps one image per GEMM."""
    assert band_rows(256, 3, 3, 3, 16) == 16 * 3
    assert band_rows(512, 3, 3, 3, 64) == 25 * 3  # 2**20 elements: 75 rows of 3 x 4608 columns
    assert band_rows(256, 3, 3, 3, 1) == 3
    assert band_rows(512, 3, 13, 13, 8) == 13
    assert band_rows(512, 1, 3, 3, 16) == 3
    for c, k, ho, wo, b in [(256, 3, 3, 3, 16), (64, 3, 12, 12, 16), (16, 3, 5, 7, 3), (3, 2, 1, 1, 64)]:
        rows = band_rows(c, k, ho, wo, b)
        assert rows % ho == 0 and 2 <= rows // ho <= b
        assert c * k * k * rows * wo <= 1 << 20 and rows * wo <= 1024


@pytest.mark.parametrize("devices, threads", [(1, 1), (1, 2), (2, 1)])
def test_tilec_train_with_generated_kernels_equals_the_reference(devices, threads):
    """`tilec train` end to end (the bundled 'tiny': conv/BN/pool prefix,
    average pool, connected, softmax): generated kernels on one or two
    devices, on one or two threads, equal the reference executor."""
    import io

    from tilec.frontend.models import load_model
    from tilec.train import train
    graph = load_model("tiny")
    common = dict(steps=3, batch=2, dtype="float64", out=io.StringIO())
    want, wp, wb = train(graph, kernels="reference", **common)
    got, p, b = train(graph, devices=devices, backend="inprocess", grid=f"{devices}x1", groups="all",
                      threads=threads, **common)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    for key in wp:
        np.testing.assert_allclose(p[key], wp[key], rtol=1e-9, atol=1e-12, err_msg=key)
    for key in wb:
        np.testing.assert_allclose(b[key], wb[key], rtol=1e-9, atol=1e-12, err_msg=key)
