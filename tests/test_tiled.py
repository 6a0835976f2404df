"""N-device fused-tile training equals one-device training.

Random stacks (tests/programs.py), random group boundaries, random uneven
split lines, 1-6 devices in random placement: after several SGD steps with
momentum, weights and batch-norm running statistics equal those of the
one-device reference executor, float64 to 1e-10 relative, float32 to 1e-4.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from built import module
from programs import ProgramBuilder, random_stacks
from tilec.analysis.tiles import spatial_prefix
from tilec.plan.build import GroupChoice, build_plan
from tilec_runtime import data, fused, inprocess, lower, reference, weights
from tilec_runtime.comm import InProcessHub
from tilec_runtime.executor import RankExecutor
from tilec_runtime.optim import SGD

OPT = {"lr": 0.01, "momentum": 0.9, "decay": 5e-4}


def one_device(program, params, buffers, batches, steps, optimizer=OPT):
    p = {k: v.copy() for k, v in params.items()}
    b = {k: v.copy() for k, v in buffers.items()}
    opt, losses = SGD(**optimizer), []
    for step in range(steps):
        images, target = batches.get(step)
        loss, grads = reference.train_step(program, p, b, images, target)
        opt.step(p, grads)
        losses.append(loss)
    return losses, p, b


def rel_err(a, b, floor=1e-30):
    """Max error relative to the largest magnitude of ``b`` (at least ``floor``)."""
    scale = max(np.abs(b).max(), floor)
    return float(np.abs(a - b).max() / scale)


# Errors are relative to max(|value|, 1): parameters start at O(1) (He
# init, gamma 1). A parameter whose true gradient is zero (a conv feeding
# batch norm through one channel is scale-invariant; a bias in front of batch
# norm) moves only by rounding noise, amplified by 1/|w| through the
# normalisation, so a relative error on its own tiny magnitude says nothing.
# A tiling error is of the order of lr * gradient, many orders above.
FLOOR = 1.0


def assert_same(got, want, tol, floor):
    losses, params, buffers = got
    wl, wp, wb = want
    assert set(params) == set(wp) and set(buffers) == set(wb)
    np.testing.assert_allclose(losses, wl, rtol=tol)
    for key in wp:
        assert rel_err(params[key], wp[key], floor) < tol, key
    for key in wb:
        assert rel_err(buffers[key], wb[key], floor) < tol, key


@st.composite
def splits(draw, n, most):
    """Strictly increasing split lines over n positions, 1..most parts."""
    parts = draw(st.integers(1, min(n, most)))
    cuts = draw(st.lists(st.integers(1, n - 1), min_size=parts - 1, max_size=parts - 1, unique=True)) if n > 1 else []
    return [0, *sorted(cuts), n]


@st.composite
def tiled_cases(draw, max_devices=6):
    """(program, choices, n_devices, batch): random groups, splits, placement."""
    program = draw(random_stacks(max_prefix=5))
    prefix = spatial_prefix(program)
    n_dev = draw(st.integers(1, max_devices))
    bounds = sorted(draw(st.sets(st.integers(1, prefix - 1), max_size=prefix - 1))) if prefix > 1 else []
    choices = []
    for first, last in zip([0, *bounds], [*(b - 1 for b in bounds), prefix - 1]):
        _, h, w = program[last]["out_shape"]
        rows = draw(splits(h, n_dev))
        cols = draw(splits(w, max(1, n_dev // (len(rows) - 1))))
        ntiles = (len(rows) - 1) * (len(cols) - 1)
        devices = draw(st.permutations(range(n_dev)))[:ntiles]
        choices.append(GroupChoice(first, last, rows, cols, list(devices)))
    # Batch norm straight into global average pooling gives, at batch 1, a
    # map whose mean is exactly beta: the next activation then sits on its
    # kink at 0, where rounding decides the branch. Not a tiling question.
    # (also through a [route] of it)
    last = program[prefix - 1]
    degenerate = (any(layer["kind"] == "avgpool" for layer in program[prefix:])
                  and last["kind"] == "conv" and last["bn"])
    recompute = draw(st.lists(st.booleans(), min_size=len(choices), max_size=len(choices)))
    return program, choices, n_dev, draw(st.integers(2 if degenerate else 1, 3)), recompute


def converges(losses):
    """Diverging training amplifies rounding without bound, which says
    nothing about tiling: such random examples are discarded."""
    return max(losses) < 10 * losses[0]


def well_conditioned(program, params, buffers, batches, steps, tol=1e-11, nudges=((1e-15, 1e-16, 1e-11),
                                                                                (1e-9, 1e-12, 1e-6)),
                     optimizer=OPT):
    """Whether the reference itself gives the same training from parameters
    changed a little: for each (relative, absolute, tolerance) of ``nudges``,
    every parameter moved by a random relative and absolute amount (the
    absolute one for what starts at zero, biases) changes losses and
    parameters by less than the tolerance.

    Some random stacks are ill-conditioned in exact arithmetic: a ReLU that
    kills a layer leaves the next batch norm a constant map, which it
    divides by sqrt(eps), and a kink decides the branch (a bias whose true
    gradient is zero, left by rounding at +-1e-19, may decide it); there,
    any two correct implementations differ by far more than their rounding,
    and the example says nothing about either. A smooth example moves in
    proportion to the nudge; one at a kink jumps, whatever its size, so the
    larger nudge finds the kinks the smaller one misses. Such examples are
    discarded."""
    a = one_device(program, params, buffers, batches, steps, optimizer)
    rng = np.random.default_rng(0)
    for rel, absolute, limit in nudges:
        nudged = {k: v * (1 + rel * rng.standard_normal(v.shape)) + absolute * rng.standard_normal(v.shape)
                  for k, v in params.items()}
        b = one_device(program, nudged, buffers, batches, steps, optimizer)
        limit = max(limit, tol)
        if not np.allclose(a[0], b[0], rtol=limit, atol=0) or any(rel_err(a[1][k], b[1][k], FLOOR) >= limit
                                                                  for k in a[1]):
            return False
    return True


def well_conditioned_case(case, steps=3, seed=7):
    program, _, _, batch, _ = case
    params, buffers = weights.init_params(program, seed, "float64")
    return well_conditioned(program, params, buffers, data.generated_batches(program, batch, seed, "float64"), steps)


def run_case(program, choices, n_dev, batch, recompute=(), *, dtype, steps=3, seed=7, threads=None):
    """Train with the plan and on one device; ``recompute[g]`` makes group g
    keep only its input and recompute its activations in backward
    (``threads``: each device's kernel threads)."""
    params, buffers = weights.init_params(program, seed, dtype)
    batches = data.generated_batches(program, batch, seed, dtype)
    choices = [GroupChoice(c.first, c.last, c.row_splits, c.col_splits, c.devices, bool(flag))
               for c, flag in zip(choices, list(recompute) + [False] * len(choices))]
    plan = build_plan(program, choices, model="random", batch=batch, dtype=dtype,
                      devices=[f"d{i}" for i in range(n_dev)], optimizer=OPT)
    losses, p, b, _ = inprocess.train(plan, params, buffers, batches, steps, module(dtype), timeout=30,
                                      threads=threads)
    return (losses, p, b), one_device(program, params, buffers, batches, steps)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiled_cases())
def test_tiled_float64_equals_one_device(case):
    got, want = run_case(*case, dtype="float64")
    assume(converges(want[0]) and well_conditioned_case(case))
    assert_same(got, want, 1e-10, FLOOR)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiled_cases(), st.integers(2, 3))
def test_tiled_float64_on_several_kernel_threads_equals_one_device(case, threads):
    """Each device's kernels on 2 or 3 threads, which split a conv's rows,
    filters or (from two images) its images, and the epilogues the same:
    still the one-device result."""
    got, want = run_case(*case, dtype="float64", threads=threads)
    assume(converges(want[0]) and well_conditioned_case(case))
    assert_same(got, want, 1e-10, FLOOR)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiled_cases(max_devices=4))
def test_tiled_float32_equals_one_device(case):
    """Float32: within 1e-4 of one-device float32, or, where float32 itself
    is ill-conditioned (batch norm over a few values, scale-invariant
    weights), no further from the exact (float64) result than one-device
    float32 is, within a factor of 3. Examples where a kink decides a branch
    (``well_conditioned``) are discarded, as in float64: there float32's
    rounding, different in any two correct orders of summation, picks it."""
    got, want = run_case(*case, dtype="float32")
    assume(converges(want[0]) and well_conditioned_case(case))
    _, exact = run_case(*case, dtype="float64")
    for tiled32, one32, one64 in [(got[1], want[1], exact[1]), (got[2], want[2], exact[2])]:
        for key in one32:
            own = rel_err(one32[key], one64[key], FLOOR)
            assert rel_err(tiled32[key], one32[key], FLOOR) < max(1e-4, 3 * own) or \
                rel_err(tiled32[key], one64[key], FLOOR) < 3 * own, key


def bn_stack():
    """Batch norm after a stride-2 conv and a k > s pool on an odd map."""
    b = ProgramBuilder(2, 17, 13)
    b.conv(4, 3, 2, "same", bn=True, act="leaky")
    b.maxpool(3, 2)
    b.conv(3, 3, 1, 1, bn=True, act="relu")
    b.conv(2, 1, 1, 0, bn=False)
    b.cost()
    return b.build()


BN_CHOICES = [GroupChoice(0, 1, [0, 3, 5], [0, 2, 4], [3, 0, 2, 1]), GroupChoice(2, 3, [0, 1, 5], [0, 4], [1, 2])]


def test_batch_norm_statistics_are_synchronised(monkeypatch):
    """The exactness check is sensitive to batch norm: per-tile statistics
    (no all-reduce) change the result far beyond the tolerance."""
    program = bn_stack()
    got, want = run_case(program, BN_CHOICES, 4, 2, dtype="float64")
    assert_same(got, want, 1e-10, FLOOR)
    monkeypatch.setattr(RankExecutor, "_bn_stats", lambda self, op: None)  # each tile its own statistics
    got, want = run_case(program, BN_CHOICES, 4, 2, dtype="float64")
    worst = max(rel_err(got[1][k], want[1][k]) for k in want[1])
    assert worst > 1e-3


def test_owner_applies_batch_norm_mean_terms_once(monkeypatch):
    """Applying the batch-norm mean terms on every computed position instead
    of on owned cells only double-counts them where regions overlap."""
    program = bn_stack()
    real = fused.TileStep.conv_bwd

    def everywhere(self, j, params, acc):
        u = self.units[j]
        owned, u.owned = u.owned, (0, u.z.shape[2], 0, u.z.shape[3])
        try:
            real(self, j, params, acc)
        finally:
            u.owned = owned
    monkeypatch.setattr(fused.TileStep, "conv_bwd", everywhere)
    got, want = run_case(program, BN_CHOICES, 4, 2, dtype="float64")
    assert max(rel_err(got[1][k], want[1][k]) for k in want[1]) > 1e-6


def executors(plan, params, buffers):
    hub = InProcessHub(len(plan["devices"]), 30)
    return hub, inprocess.make_executors(plan, [hub.comm(r) for r in range(len(plan["devices"]))],
                                         module(plan["dtype"]), params, buffers)


def test_recomputing_groups_train_the_same_and_share_one_scratch():
    """A group that recomputes keeps only its input (and its output's
    gradient): what it recomputes lives in the device's scratch, which every
    tile shares, so the scratch is the largest tile's need, not their sum."""
    program = bn_stack()
    got, want = run_case(program, BN_CHOICES, 4, 2, [True, True], dtype="float64")
    assert_same(got, want, 1e-10, FLOOR)
    choices = [GroupChoice(0, 1, [0, 5], [0, 4], [0], True), GroupChoice(2, 3, [0, 5], [0, 4], [0], True)]
    plan = build_plan(program, choices, model="m", batch=2, dtype="float64", devices=["a"], optimizer=OPT)
    params, buffers = weights.init_params(program, 1, "float64")
    _, (ex,) = executors(plan, params, buffers)
    steps = list(ex.tiles.values())
    assert len(steps) == 2 and all(np.shares_memory(s.scratch, ex.scratch) for s in steps)
    assert ex.scratch.nbytes == max(lower.scratch_bytes(s.spec, 8) for s in steps)
    for s in steps:  # nothing but the output's gradient (and the input gradient) in its own arena
        assert set(s.spec["buffers"]) <= {f"d{len(s.spec['ops']) - 1}", "din"}


def test_gradients_inside_a_group_live_in_the_scratch():
    """A group that keeps its activations holds them in its own arena; the
    gradients inside it, needed only during its backward, are in the scratch."""
    program = bn_stack()
    plan = build_plan(program, BN_CHOICES[:1] + [GroupChoice(2, 3, [0, 5], [0, 4], [0])], model="m", batch=2,
                      dtype="float64", devices=["a", "b", "c", "d"], optimizer=OPT)
    spec = lower.lower_rank(plan, 0)[0]
    n = len(spec["ops"])
    assert {f"d{j}" for j in range(n - 1)} <= set(spec["scratch_buffers"])
    assert f"z{n - 1}" in spec["buffers"] and f"d{n - 1}" in spec["buffers"]


def test_a_groups_output_shares_its_bytes_with_its_gradient():
    """The output a group hands on is read only by forward messages, copied
    as they are sent, all before backward starts: its gradient, filled from
    then on, takes the same bytes. A group that recomputes writes its output
    again in backward, so there the two stay apart (and training is exact
    either way: ``test_recomputing_groups_train_the_same_and_share_one_scratch``)."""
    program = bn_stack()
    for flag in (False, True):
        choices = [GroupChoice(c.first, c.last, c.row_splits, c.col_splits, c.devices, flag) for c in BN_CHOICES]
        plan = build_plan(program, choices, model="m", batch=2, dtype="float64",
                          devices=["a", "b", "c", "d"], optimizer=OPT)
        for spec in lower.lower_rank(plan, 0).values():
            last = len(spec["ops"]) - 1
            where = {**spec["buffers"], **{k: [None, v[1]] for k, v in spec["scratch_buffers"].items()}}
            out, grad = where[f"out{last}"], where[f"d{last}"]
            assert (out[0] == grad[0]) != flag, (flag, out, grad)
    got, want = run_case(program, BN_CHOICES, 4, 2, dtype="float64")
    assert_same(got, want, 1e-10, FLOOR)


def test_every_device_holds_identical_replicas():
    """All-reduces combine in rank order, so replicated weights never drift."""
    program = bn_stack()
    params, buffers = weights.init_params(program, 1, "float32")
    plan = build_plan(program, BN_CHOICES, model="m", batch=2, dtype="float32",
                      devices=["a", "b", "c", "d"], optimizer=OPT)
    hub, devices = executors(plan, params, buffers)
    inprocess.run_ranks(devices, hub, data.generated_batches(program, 2, 1, "float32"), 0, 2)
    for key in devices[1].params:
        holders = [d.params[key] for d in devices if key in d.params]
        assert len(holders) >= 2
        for h in holders[1:]:
            assert np.array_equal(h, holders[0]), key


def test_a_failed_device_stops_the_others():
    program = bn_stack()
    params, buffers = weights.init_params(program, 1, "float64")
    plan = build_plan(program, BN_CHOICES, model="m", batch=2, dtype="float64",
                      devices=["a", "b", "c", "d"], optimizer=OPT)
    hub, devices = executors(plan, params, buffers)

    def broken(self, op):
        raise RuntimeError(f"device {self.rank} broke")
    devices[2]._conv_fwd = broken.__get__(devices[2])
    with pytest.raises(RuntimeError, match="device 2 broke"):
        inprocess.run_ranks(devices, hub, data.generated_batches(program, 2, 1, "float64"), 0, 1)


def pooled_stack(bn=True, h=81, w=256, pools=(2, 2)):
    """A pooled first layer, then a pooled conv reading its output with a
    gradient (``pools``: the two pools' windows, stride the same: 2 on an
    odd map, the last window padded; 3, darknet's padding also before the
    first row); wide enough for GEMM bands of a few rows
    (``kernel_set.band_rows``)."""
    b = ProgramBuilder(2, h, w)
    b.conv(4, 3, 1, "same", bn=bn, act="leaky")
    b.maxpool(pools[0], pools[0])
    b.conv(3, 3, 1, 1, bn=True, act="relu")
    b.maxpool(pools[1], pools[1])
    b.conv(2, 1, 1, 0, bn=False)
    b.cost()
    return b.build()


@pytest.mark.parametrize("bn, threads, pool", [(True, 1, 2), (False, 1, 2), (True, 2, 2), (True, 1, 3), (False, 2, 3)])
def test_streamed_convs_train_the_same(monkeypatch, bn, threads, pool):
    """A recomputing group's pooled convs, streamed a band of rows at a time
    (their outputs never whole: ``lower.streams``; the second with an input
    gradient, its bands' rows overlapping), train as one device does, on
    uneven tiles, on one thread and on two, with the first pool padding its
    top or not (a first band shorter than a GEMM band is joined to the
    next: the kernels make gradients again on bands of rows only); a
    streamed conv's buffer holds one band, not its map."""
    monkeypatch.setattr(lower, "STREAM_ELEMENTS", 1)  # bands of a GEMM band: many of them on a small map
    bands = []
    band_conv = fused.TileStep._band_conv

    def spy(self, u, params, z0, z1, stats=None):
        bands.append((z1 - z0, u.spec["band"]))
        return band_conv(self, u, params, z0, z1, stats)
    monkeypatch.setattr(fused.TileStep, "_band_conv", spy)
    # 3 x 3 windows: a first band of a pool row (two conv rows, the padding one) is short of a GEMM band
    program = pooled_stack(bn, pools=(pool, 2), **({} if pool == 2 else {"h": 120, "w": 340}))
    h3, w3 = program[3]["out_shape"][1:]
    h4, w4 = program[4]["out_shape"][1:]
    choices = [GroupChoice(0, 3, [0, h3 * 2 // 5, h3], [0, w3], [2, 0], True),
               GroupChoice(4, 4, [0, h4], [0, w4 * 4 // 9, w4], [1, 2])]
    got, want = run_case(program, choices, 3, 2, [True, False], dtype="float64", threads=threads)
    assert_same(got, want, 1e-10, FLOOR)
    # streamed: bands, each at least a GEMM band of rows
    assert len(bands) > 20 and all(rows >= gemm for rows, gemm in bands)
    plan = build_plan(program, choices, model="random", batch=2, dtype="float64",
                      devices=["d0", "d1", "d2"], optimizer=OPT)
    from tilec.inspect.plan_report import plan_summary
    assert "streamed convs (their output a band of rows at a time): layers 0, 2" in plan_summary(plan)
    assert "group 0: layers 0-3" in plan_summary(plan) and "recomputed" in plan_summary(plan)
    for rank in (0, 2):
        spec = lower.lower_rank(plan, rank)[0]
        for j, op in enumerate(spec["ops"][:2]):
            assert len(op["stream"]) >= 2 and op["regen"] and f"da{j}" not in spec["scratch_buffers"]
            assert all(z1 - z0 >= op["band"] for z0, z1, _, _ in op["stream"])
            band = max(z1 - z0 for z0, z1, _, _ in op["stream"])
            assert spec["scratch_buffers"][f"z{j}"][1] == 2 * op["filters"] * band * op["out"][1] < \
                2 * op["filters"] * op["out"][0] * op["out"][1]


@pytest.mark.parametrize("pools, h, w, batch", [((2, 2), 81, 256, 2), ((3, 2), 120, 340, 2), ((3, 2), 60, 256, 1),
                                                 ((3, 3), 64, 256, 2), ((3, 2), 164, 256, 1), ((3, 3), 138, 256, 2)])
def test_planner_memory_of_streamed_tiles_covers_the_lowered(monkeypatch, pools, h, w, batch):
    """The planner's memory of a recomputing tile (``lower.tile_memory``,
    from sizes alone) is at least what ``lower_tile`` plans from the tile's
    geometry, for the top tile, whose pools pad their first rows, each by
    its own padding (its streamed bands start a row earlier), and for the
    others; without that padding, exactly that. (The maps are ones where
    pricing without the padding, or with one pool's for both, fell short.)"""
    monkeypatch.setattr(lower, "STREAM_ELEMENTS", 1)
    program = pooled_stack(True, h, w, pools)
    h3, w3 = program[3]["out_shape"][1:]
    plan = build_plan(program, [GroupChoice(0, 3, [0, h3 * 2 // 5, h3], [0, w3], [0, 1], True),
                                GroupChoice(4, 4, [0, program[4]["out_shape"][1]], [0, program[4]["out_shape"][2]], [0])],
                      model="random", batch=batch, dtype="float64", devices=["d0", "d1"], optimizer=OPT)
    outside = lower.outside_tensors(plan)
    for rank in (0, 1):
        tile = next(t for t in plan["groups"][0]["tiles"] if t["device"] == rank)
        spec = lower.lower_rank(plan, rank)[0]
        assert any(op.get("stream") for op in spec["ops"])
        sizes = {tl["layer"]: tuple(r[1] - r[0] + 1 for r in tl["region"]) for tl in tile["layers"]}
        in_size = tuple(r[1] - r[0] + 1 for r in tile["input"])
        planned = lower.tile_memory(program, 0, 3, outside, sizes, in_size, batch, 1)[True]
        for key in ("arena", "arg_arena", "scratch", "scratch_args", "workspace"):
            assert planned[key] >= spec[key], (rank, key)
            if pools == (2, 2):  # no padding before the first row: the same bands, the same plan
                assert planned[key] == spec[key], (rank, key)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiled_cases(max_devices=4))
def test_tiled_recomputed_and_streamed_float64_equals_one_device(case):
    """Random stacks with every group recomputing, on GEMM bands of one row:
    every pooled conv makes its gradient again band by band, and those whose
    pool's windows do not overlap are streamed in bands of a pool row."""
    from tilec_runtime import kernel_set
    program, choices, n_dev, batch, _ = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lower, "STREAM_ELEMENTS", 1)
        mp.setattr(kernel_set, "BAND_POSITIONS", 1)
        got, want = run_case(program, choices, n_dev, batch, [True] * len(choices), dtype="float64")
    assume(converges(want[0]) and well_conditioned_case(case))
    assert_same(got, want, 1e-10, FLOOR)
