"""Layers after the tiled prefix split by channels over several devices
train exactly as on one device.

Random stacks end in a random run of conv, pooling and connected layers;
the tiled prefix is cut at a random layer, and each stretch of the tail
that can be split by channels goes to one random device or is split over a
random set of them. After several SGD steps with momentum, weights and
running statistics equal one-device training (float64, 1e-10 relative).
"""
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from programs import ProgramBuilder, ShapeError, conv_args, local_avgpool_args
from test_socket_training import train_socketpairs
from test_tiled import FLOOR, OPT, assert_same, converges, one_device, rel_err, splits, well_conditioned
from tilec.analysis.tiles import spatial_prefix
from tilec.errors import PlanError
from tilec.cost.memory import plan_memory
from tilec.inspect.dot import plan_dot
from tilec.plan.build import GroupChoice, build_plan
from tilec.analysis.tail import TailChoice, one_device_tail, runs
from tilec_runtime import data, inprocess, planfile, shards, tailstep, weights
from tilec_runtime.comm import InProcessHub
from tilec_runtime.errors import ProgramError
from tilec_runtime.executor import RankExecutor, holdings
from tilec_runtime.footprint import tile_bytes
from tilec_runtime.lower import scratch_bytes
from tilec_runtime.program import ACTIVATIONS, param_shapes
from built import module


@st.composite
def tail_stacks(draw):
    """A conv prefix, then 1-5 conv/maxpool/local_avgpool/depth-to-space/
    connected layers, then a loss (or a global avgpool, a connected layer
    and a softmax)."""
    b = ProgramBuilder(draw(st.integers(1, 3)), draw(st.integers(4, 11)), draw(st.integers(4, 11)))
    for _ in range(draw(st.integers(1, 2))):
        b.conv(**draw(conv_args(*b.shape(b.last))))
    flat = False
    for _ in range(draw(st.integers(1, 5))):
        c, h, w = b.shape(b.last)
        kind = draw(st.sampled_from(["conv", "conv", "maxpool", "local_avgpool", "depth_to_space", "connected"]
                                    if not flat else ["connected"]))
        try:
            if kind == "conv":
                b.conv(draw(st.integers(1, 7)), draw(st.sampled_from([1, 3])), draw(st.integers(1, 2)), "same",
                       bn=draw(st.booleans()), act=draw(st.sampled_from(ACTIVATIONS)))
            elif kind == "maxpool":
                b.maxpool(2, draw(st.integers(1, 2)))
            elif kind == "local_avgpool":
                pool = draw(local_avgpool_args(h, w))
                if pool is not None:
                    b.local_avgpool(**pool)
            elif kind == "depth_to_space":
                if c % 4:
                    b.conv(draw(st.sampled_from([4, 8])), 1, 1, 0, bn=draw(st.booleans()), act="leaky")
                b.reorg(2, order=draw(st.sampled_from(["onnx", "space_to_depth"])), reverse=True)
            else:
                b.connected(draw(st.integers(1, 9)), act=draw(st.sampled_from(ACTIVATIONS)))
                flat = True
        except ShapeError:
            pass
    if not flat and draw(st.booleans()):
        b.avgpool()
        b.connected(draw(st.integers(2, 5)))
        b.softmax()
    else:
        b.cost()
    return b.build()


@st.composite
def channel_cases(draw, max_devices=4):
    program = draw(tail_stacks())
    n_dev = draw(st.integers(2, max_devices))
    prefix = draw(st.integers(1, spatial_prefix(program)))
    choices = []
    bounds = sorted(draw(st.sets(st.integers(1, prefix - 1), max_size=2))) if prefix > 1 else []
    for first, last in zip([0, *bounds], [*(x - 1 for x in bounds), prefix - 1]):
        _, h, w = program[last]["out_shape"]
        rows, cols = draw(splits(h, n_dev)), draw(splits(w, 1))
        devices = draw(st.permutations(range(n_dev)))[:len(rows) - 1]
        choices.append(GroupChoice(first, last, rows, cols, list(devices)))
    tail = []
    for run_first, run_last, ok in runs(program, prefix):
        # a run may be cut into several groups, each on its own devices
        cuts = sorted(draw(st.sets(st.integers(run_first + 1, run_last), max_size=2))) if ok and run_last > run_first \
            else []
        for first, last in zip([run_first, *cuts], [*(c - 1 for c in cuts), run_last]):
            k = draw(st.integers(1, n_dev)) if ok else 1
            # whole maps (route, reorg) on any device, a loss on one device on rank 0; a sum-of-squares cost
            # split by channels on any of them
            members = sorted(draw(st.permutations(range(n_dev)))[:k])
            if k > 1 and shards.check(program, first, last, k) is None:
                tail.append(TailChoice(first, last, "channels", members))
            else:
                tail.append(TailChoice(first, last, "one", [0] if last == len(program) - 1 else members[:1]))
    return program, prefix, choices, tail, n_dev, draw(st.integers(1, 3))


def plan_of(program, prefix, choices, tail, n_dev, batch, ring_min_bytes=0, release_min_bytes=None):
    return build_plan(program, choices, model="random", batch=batch, dtype="float64",
                      devices=[f"d{i}" for i in range(n_dev)], optimizer=OPT, prefix=prefix, tail=tail,
                      ring_min_bytes=ring_min_bytes, release_min_bytes=release_min_bytes)


def releasing_ranks(plan):
    return {r for r, ops in enumerate(plan["schedule"]) if any(op["op"] == "scratch_release" for op in ops)}


def setup(program, batch, seed=5):
    params, buffers = weights.init_params(program, seed, "float64")
    return params, buffers, data.generated_batches(program, batch, seed, "float64")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(channel_cases(), st.sampled_from([0, 1 << 30]), st.sampled_from([1, shards.SLICE_MIN_BYTES]),
       st.sampled_from([None, 0]))
def test_channel_split_tail_equals_one_device(case, ring_min_bytes, slice_min_bytes, release_min_bytes):
    """(``slice_min_bytes`` 1: every B layer's sums in slices, each all-reduced while the next is computed;
    ``release_min_bytes`` 0: every device with tiles and a tail gives its scratch back while the tail runs,
    and its tail groups let go of their activations after their backward)"""
    program, prefix, choices, tail, n_dev, batch = case
    assume(any(t.mode == "channels" for t in tail))
    params, buffers, batches = setup(program, batch)
    with mock.patch.object(shards, "SLICE_MIN_BYTES", slice_min_bytes):
        plan = plan_of(program, prefix, choices, tail, n_dev, batch, ring_min_bytes, release_min_bytes)
    if release_min_bytes == 0:
        tiled = {t["device"] for g in plan["groups"] if g["kind"] == "tiled" for t in g["tiles"]}
        in_tail = {t["device"] for g in plan["groups"] if g["kind"] == "tail" for t in g["tiles"]}
        assert releasing_ranks(plan) <= tiled & in_tail
    planfile.validate(plan)
    want = one_device(program, params, buffers, batches, 3)
    assume(converges(want[0]) and well_conditioned(program, params, buffers, batches, 3))
    losses, p, b, _ = inprocess.train(plan, params, buffers, batches, 3, module("float64"), timeout=30)
    assert_same((losses, p, b), want, 1e-10, FLOOR)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(channel_cases(max_devices=3))
def test_channel_split_tail_over_sockets_equals_one_device(case):
    program, prefix, choices, tail, n_dev, batch = case
    assume(any(t.mode == "channels" for t in tail))
    params, buffers, batches = setup(program, batch)
    want = one_device(program, params, buffers, batches, 3)
    assume(converges(want[0]) and well_conditioned(program, params, buffers, batches, 3))
    with mock.patch.object(shards, "SLICE_MIN_BYTES", 1):  # B's sums in slices: their frames validated too
        plan = plan_of(program, prefix, choices, tail, n_dev, batch, release_min_bytes=0)
    got = train_socketpairs(plan, params, buffers, batches, 3)
    assert_same(got, want, 1e-10, FLOOR)


def assert_trains_as_one_device(program, plan, sockets, batch=2, steps=3):
    """3 steps of ``plan`` (in process, or over sockets) equal one device (float64 1e-10)."""
    params, buffers, batches = setup(program, batch)
    want = one_device(program, params, buffers, batches, steps)
    if sockets:
        got = train_socketpairs(plan, params, buffers, batches, steps)
    else:
        losses, p, b, _ = inprocess.train(plan, params, buffers, batches, steps, module("float64"), timeout=30)
        got = (losses, p, b)
    assert_same(got, want, 1e-10, FLOOR)


def dense_tail():
    """A spatial conv, then conv / pool / conv / conv / connected / connected (A B . A B A)."""
    b = ProgramBuilder(3, 12, 10)
    b.conv(4, 3, 1, "same", bn=True, act="leaky")
    b.conv(6, 3, 1, "same", bn=True, act="leaky")
    b.maxpool(2, 2)
    b.conv(5, 3, 1, "same", bn=False, act="leaky")
    b.conv(7, 1, 1, 0, bn=True, act="leaky")
    b.connected(9, act="leaky")
    b.connected(4)
    b.cost()
    return b.build()


TILED = [GroupChoice(0, 0, [0, 6, 12], [0, 10], [0, 1])]


def test_roles_and_layouts_alternate():
    program = dense_tail()
    assert runs(program, 1) == [(1, 7, True)]  # (a sum-of-squares cost ending the program can be split too)
    assert shards.roles(program, 1, 6) == {1: "A", 2: "local", 3: "B", 4: "A", 5: "B", 6: "A"}
    held = shards.layouts(program, 1, 6, 3)
    assert held[1] == held[2] == [0, 2, 4, 6] and held[3] is None and held[5] is None
    assert held[6] == [0, 1, 2, 4]


def test_members_hold_disjoint_slices_that_make_every_weight():
    """Each split weight is cut into the members' slices, which tile it
    exactly; the rest (a B layer's bias or batch norm) is whole on each."""
    program = dense_tail()
    plan = plan_of(program, 1, TILED, [TailChoice(1, 6, "channels", [0, 1, 2]), TailChoice(7, 7, "one", [0])], 3, 2)
    held = [holdings(plan, r)[0] for r in range(3)]
    for i in range(1, 7):
        for key, shape in param_shapes(program[i]).items():
            cover = np.zeros(shape, int)
            for r in range(3):
                piece = held[r][key]
                if piece is None:
                    cover += 1
                else:
                    axis, start, stop = piece
                    index = [slice(None)] * len(shape)
                    index[axis] = slice(start, stop)
                    cover[tuple(index)] += 1
            assert (cover == 3).all() if held[0][key] is None else (cover == 1).all(), key
    # the connected layer reads conv 4's channels 2..3 on rank 1: 6x5 positions each
    assert held[1]["4.conv.weight"] == (0, 2, 4) and held[1]["5.fc.weight"] == (1, 2 * 30, 4 * 30)


def test_without_the_all_reduce_the_result_is_wrong(monkeypatch):
    """The check is sensitive to the channel all-reduce: skipping it leaves
    each member's partial sums, far from the one-device result."""
    program = dense_tail()
    params, buffers, batches = setup(program, 2)
    plan = plan_of(program, 1, TILED, [TailChoice(1, 6, "channels", [0, 1]), TailChoice(7, 7, "one", [0])], 2, 2)
    want = one_device(program, params, buffers, batches, 2)
    got = inprocess.train(plan, params, buffers, batches, 2, module("float64"), timeout=30)
    assert_same(got[:3], want, 1e-10, FLOOR)
    def skipped(self, op):
        if not op.get("overlap"):  # (an overlapped one joins at its chan_wait)
            self.tails[op["group"]].reduced_done(op["layer"], op["phase"])

    def joined(self, op):
        self.tails[op["group"]].reduced_done(op["layer"], op["phase"])
    monkeypatch.setattr(RankExecutor, "_chan_reduce", skipped)
    monkeypatch.setattr(RankExecutor, "_chan_wait", joined)
    got = inprocess.train(plan, params, buffers, batches, 2, module("float64"), timeout=30)
    assert max(rel_err(got[1][k], want[1][k], FLOOR) for k in want[1]) > 1e-3


@pytest.mark.parametrize("n_dev", [2, 3])
def test_a_group_opening_with_a_convolution_runs_it_as_a_fused_tile(monkeypatch, n_dev):
    """A channel group's first layer, a conv with batch norm and the
    max-pool after it, runs on each member's share of the filters as one
    whole-map tile of the fused path (``FusedShare``; 3 members: 2 of 6
    filters each), in the device's scratch; 3 steps equal one device
    (float64 1e-10), over sockets too."""
    program = dense_tail()
    plan = plan_of(program, 1, TILED, [TailChoice(1, 6, "channels", list(range(n_dev))),
                                       TailChoice(7, 7, "one", [0])], n_dev, 2)
    g = next(j for j, group in enumerate(plan["groups"]) if group["layers"] == [1, 6])
    for r in range(n_dev):
        share = tailstep.fused_shares(plan, r, 1)[g]
        assert (share.first, share.last, share.input) == (1, 2, 0)
        assert share.spec["ops"][0]["filters"] == 6 // n_dev and share.spec["ops"][0]["pool"]
        # the device's scratch holds the share's workspace and backward buffers
        assert tile_bytes(plan, r)[1] >= scratch_bytes(share.spec, 8)
    runs_ = []
    fused_forward = tailstep.ChannelGroup._fused_forward
    monkeypatch.setattr(tailstep.ChannelGroup, "_fused_forward",
                        lambda self, i, *a: runs_.append(i) or fused_forward(self, i, *a))
    assert_trains_as_one_device(program, plan, sockets=False)
    assert runs_.count(1) == 3 * n_dev and runs_.count(2) == 3 * n_dev
    assert_trains_as_one_device(program, plan, sockets=True)


def test_a_group_that_lets_go_of_its_arrays_has_no_fused_share():
    """Where a device gives its memory back during the tail (``tail_free``),
    its channel groups run every layer on the allocating path: a fused
    share's arena is held all step, which the memory model counts as freed."""
    program = dense_tail()
    plan = plan_of(program, 1, TILED, [TailChoice(1, 6, "channels", [0, 1]), TailChoice(7, 7, "one", [0])], 2, 2,
                   release_min_bytes=0)
    freed = {op["group"] for op in plan["schedule"][0] if op["op"] == "tail_free"}
    assert freed and not set(tailstep.fused_shares(plan, 0, 1)) & freed
    assert_trains_as_one_device(program, plan, sockets=False)


def test_a_replicated_map_passes_between_groups_on_the_same_devices_without_messages():
    """A channel group whose input is the replicated output of one on the same
    devices takes its own copy, and its members all-reduce the input's
    gradient (each needs all of it), instead of sending it to one another."""
    program = dense_tail()
    params, buffers, batches = setup(program, 2)
    tail = [TailChoice(1, 3, "channels", [0, 1, 2]), TailChoice(4, 6, "channels", [0, 1, 2]),
            TailChoice(7, 7, "one", [0])]
    plan = plan_of(program, 1, TILED, tail, 3, 2)
    second = plan["groups"][2]
    assert second["layers"] == [4, 6] and second.get("reduce_input")
    between = [m for m in plan["messages"] if m["tensor"] == 3]
    assert between and all(m["sender"] == m["receiver"] for m in between)
    assert any(op["op"] == "chan_reduce" and op["phase"] == "input" for op in plan["schedule"][1])
    got = inprocess.train(plan, params, buffers, batches, 3, module("float64"), timeout=30)
    assert_same(got[:3], one_device(program, params, buffers, batches, 3), 1e-10, FLOOR)


def test_bad_tail_choices_are_refused_with_the_reason():
    program = dense_tail()
    with pytest.raises(PlanError, match="must start at layer 1"):
        plan_of(program, 1, TILED, [TailChoice(2, 7, "one", [0])], 2, 2)
    with pytest.raises(PlanError, match="needs the whole map"):
        plan_of(passthrough_program(), 1, [GroupChoice(0, 0, [0, 6], [0, 6], [0])],
                [TailChoice(1, 5, "channels", [0, 1]), TailChoice(6, 10, "one", [0])], 2, 2)
    with pytest.raises(PlanError, match="has 4 output channels for 5 devices|output channels"):
        plan_of(program, 1, TILED, [TailChoice(1, 6, "channels", [0, 1, 2, 3, 4]), TailChoice(7, 7, "one", [0])], 5, 2)
    with pytest.raises(PlanError, match="the loss runs on rank 0"):
        plan_of(program, 1, TILED, [TailChoice(1, 6, "one", [1]), TailChoice(7, 7, "one", [1])], 2, 2)


SPLIT_COSTS = {
    # the cost after A layer 6 (connected): each member sums its own channels' errors
    "split": [TailChoice(1, 7, "channels", [0, 1, 2])],
    # after B layer 6, on devices 1 and 2: both compute the whole cost's gradient, device 1 alone counts its loss
    "replicated": [TailChoice(1, 4, "channels", [0, 1, 2]), TailChoice(5, 7, "channels", [1, 2])],
}


@pytest.mark.parametrize("case", sorted(SPLIT_COSTS))
def test_a_sum_of_squares_cost_split_by_channels_takes_its_part_of_the_targets(case):
    """The cost in a channel group: no map and no gradient goes to one device
    for the loss; each member takes its channels of the targets (where the
    cost's input is replicated, all of them), and the step's loss is the
    members' parts added up. Equals one device (float64 1e-10), in one
    process, over sockets and on local workers (the launcher sends each
    worker its part of the targets, each worker's frames checked against it)."""
    from built import kernel_source
    from tilec_runtime import launch
    program = dense_tail()
    plan = plan_of(program, 1, TILED, SPLIT_COSTS[case], 3, 2)
    planfile.validate(plan)
    cost = next(g for g in plan["groups"] if g["layers"][1] == 7)
    assert cost["mode"] == "channels"
    assert not any(m["tensor"] >= 6 for m in plan["messages"])  # nothing of layer 6 moves: the loss is where it is
    parts = [shards.target_part(plan, r) for r in range(3)]
    bounds = shards.part_bounds(4, 3)  # (layer 6's 4 outputs over 3 members)
    assert parts == ([(bounds[m], bounds[m + 1]) for m in range(3)] if case == "split" else [None, "all", "all"])
    target = np.arange(2 * 4, dtype=float).reshape(2, 4, 1, 1)
    cut = [shards.cut_target(target, part) for part in parts]
    if case == "split":
        assert np.array_equal(np.concatenate(cut, axis=1), target)
    assert_trains_as_one_device(program, plan, sockets=False)
    assert_trains_as_one_device(program, plan, sockets=True)
    params, buffers, batches = setup(program, 2)
    want = one_device(program, params, buffers, batches, 3)
    losses, p, b, _ = launch.train_local(plan, params, buffers, batches, steps=3, timeout=30,
                                         kernel_source=kernel_source("float64"))
    assert_same((losses, p, b), want, 1e-10, FLOOR)


def test_the_planner_may_split_the_cost_with_the_layers_before_it():
    """The tail groups the solver chooses from put the cost in a channel
    group with the layers before it (no map to rank 0 for the loss, no
    gradient back), or on rank 0 alone."""
    from tilec.cost.candidates import tail_options
    program = dense_tail()
    options = tail_options(program, 1, 2, lambda k: tuple(range(k)))
    assert (1, 7, "channels", (0, 1)) in options and (6, 7, "channels", (0, 1)) in options
    # a cost on one device stays on rank 0, alone (the kernels' allocation-free sse), whatever the tail mode
    assert [o for o in options if o[1] == 7 and o[2] == "one"] == [(7, 7, "one", (0,))]
    assert (7, 7, "one", (0,)) in tail_options(program, 1, 2, lambda k: tuple(range(k)), "channels")
    assert [(c.first, c.last) for c in one_device_tail(program, 1)] == [(1, 6), (7, 7)]


def test_plan_validation_checks_channel_ops():
    program = dense_tail()
    plan = plan_of(program, 1, TILED, [TailChoice(1, 6, "channels", [0, 1]), TailChoice(7, 7, "one", [0])], 2, 2)
    ops = plan["schedule"][1]
    k = next(i for i, op in enumerate(ops) if op["op"] == "chan_post")
    bad = dict(plan, schedule=[plan["schedule"][0], ops[:k] + [dict(ops[k], layer=4)] + ops[k + 1:]])
    with pytest.raises(ProgramError, match="chan_post of A layer 4 before its sums slice by slice"):
        planfile.validate(planfile.seal(bad))
    bad = dict(plan, schedule=[plan["schedule"][0], ops[:k] + [dict(ops[k], layer=2)] + ops[k + 1:]])
    with pytest.raises(ProgramError, match="needs a layer split as A or B, layer 2 is local"):
        planfile.validate(planfile.seal(bad))
    bad = dict(plan, schedule=[plan["schedule"][0], ops[:k] + [dict(ops[k], layer=1)] + ops[k + 1:]])
    with pytest.raises(ProgramError, match="A layer 1 slice by slice needs a B layer before it"):
        planfile.validate(planfile.seal(bad))
    groups = [dict(g, mode="rows") if g["kind"] == "tail" else g for g in plan["groups"]]
    with pytest.raises(ProgramError, match="bad tail mode 'rows'"):
        planfile.validate(planfile.seal(dict(plan, groups=groups)))


def test_an_a_layer_sends_its_input_gradient_off_before_its_weight_gradient():
    """Backward, an A layer whose input gradient is all-reduced computes that
    gradient first, starts its all-reduce on the communication thread, and
    computes its weight gradient while it runs; the schedule says so, the
    validation holds the all-reduce to a later wait, and a traced step has
    the all-reduce on the communication thread, not the schedule's."""
    program = dense_tail()
    plan = plan_of(program, 1, TILED, [TailChoice(1, 6, "channels", [0, 1]), TailChoice(7, 7, "one", [0])], 2, 2)
    roles = shards.roles(program, 1, 6)
    ops = plan["schedule"][1]
    for i in (4, 6):  # the A layers after a split layer (layer 1's input gradient goes back to the tiles)
        assert roles[i] == "A"
        k = next(n for n, op in enumerate(ops) if op.get("layer") == i and op.get("part") == "input")
        assert [(op["op"], op.get("part"), op.get("phase"), op.get("overlap")) for op in ops[k:k + 4]] == [
            ("chan_bwd", "input", None, None), ("chan_reduce", None, "backward", True),
            ("chan_bwd", "weight", None, None), ("chan_wait", None, "backward", None)]
    assert not any(op.get("part") for op in ops if op.get("layer") == 1)
    wait = next(n for n, op in enumerate(ops) if op["op"] == "chan_wait")
    with pytest.raises(ProgramError, match="never waited for"):
        planfile.validate(planfile.seal(dict(plan, schedule=[plan["schedule"][0], ops[:wait] + ops[wait + 1:]])))
    start = wait - 2
    with pytest.raises(ProgramError, match="chan_wait for an all-reduce not overlapped before it"):
        planfile.validate(planfile.seal(dict(plan, schedule=[plan["schedule"][0],
                                                             ops[:start] + [dict(ops[start], overlap=False)]
                                                             + ops[start + 1:]])))
    params, buffers, batches = setup(program, 2)
    hub = InProcessHub(2, 30.0)
    executors = inprocess.make_executors(plan, [hub.comm(r) for r in range(2)], module("float64"), params, buffers,
                                         trace=True)
    inprocess.run_ranks(executors, hub, batches, 0, 1)
    g = next(n for n, group in enumerate(plan["groups"]) if group["layers"] == [1, 6])
    for ex in executors:
        assert [name for name, *_ in ex.reducer.events if name.startswith("chan_reduce")] == [
            f"chan_reduce g{g} L6 backward", f"chan_reduce g{g} L4 backward"]
        assert not any(op["op"] == "chan_reduce" and op.get("phase") == "backward" and not op.get("overlap")
                       for op, *_ in ex.events)


def test_a_b_layer_sums_slice_by_slice_each_all_reduced_while_the_next_is_computed(monkeypatch):
    """With slices, a B layer's forward is, per slice of its output channels,
    its share of those sums and their all-reduce started on the
    communication thread; then a wait for each and the batch norm and
    activation on the whole. The trace has the slices' all-reduces on the
    communication thread; training equals one device (float64 1e-10)."""
    monkeypatch.setattr(shards, "SLICE_MIN_BYTES", 1)
    program = dense_tail()
    plan = plan_of(program, 1, TILED, [TailChoice(1, 6, "channels", [0, 1, 2]), TailChoice(7, 7, "one", [0])], 3, 2)
    ops = plan["schedule"][2]
    layer = 3  # B: 5 output channels, 4 slices
    assert shards.roles(program, 1, 6)[layer] == "B"
    forward = ops[:next(n for n, op in enumerate(ops) if op["op"] == "grad_zero")]
    mine = [(op["op"], op["layer"], op.get("slice"), op.get("overlap")) for op in forward
            if op.get("layer") in (layer, layer + 1)]
    assert shards.roles(program, 1, 6)[layer + 1] == "A"
    # the slices' sums, each all-reduced while the next is computed; then per slice its batch norm and
    # activation and the next (A) layer's sums over it; then that layer's batch norm and activation
    assert mine == [("chan_fwd", 3, 0, None), ("chan_reduce", 3, 0, True), ("chan_fwd", 3, 1, None),
                    ("chan_reduce", 3, 1, True), ("chan_fwd", 3, 2, None), ("chan_reduce", 3, 2, True),
                    ("chan_fwd", 3, 3, None), ("chan_reduce", 3, 3, True),
                    *[row for p in range(4) for row in (("chan_wait", 3, p, None), ("chan_post", 3, p, None),
                                                        ("chan_fwd", 4, p, None))],
                    ("chan_post", 4, None, None)]
    k = next(n for n, op in enumerate(ops) if op["op"] == "chan_fwd" and op.get("slice") == 3)
    with pytest.raises(ProgramError, match="bad slice 3 of 9"):
        planfile.validate(planfile.seal(dict(plan, schedule=[*plan["schedule"][:2],
                                                             ops[:k] + [dict(ops[k], slices=9)] + ops[k + 1:]])))
    params, buffers, batches = setup(program, 2)
    want = one_device(program, params, buffers, batches, 3)
    hub = InProcessHub(3, 30.0)
    executors = inprocess.make_executors(plan, [hub.comm(r) for r in range(3)], module("float64"), params, buffers,
                                         trace=True)
    losses = inprocess.run_ranks(executors, hub, batches, 0, 3)
    p, b, _ = inprocess.gather_state(executors)
    assert_same((losses, p, b), want, 1e-10, FLOOR)
    g = next(n for n, group in enumerate(plan["groups"]) if group["layers"] == [1, 6])
    for ex in executors:
        names = [name for name, *_ in ex.reducer.events]
        assert [f"chan_reduce g{g} L{layer} forward slice {p}" for p in range(4)] * 3 == [
            n for n in names if n.startswith(f"chan_reduce g{g} L{layer} ")]


@pytest.mark.parametrize("sockets, layer4", [(False, "channels"), (True, "channels"), (False, "one"),
                                              (True, "one")])
def test_a_channel_group_may_start_with_a_route_that_every_member_assembles(sockets, layer4):
    """YOLOv2's route 28 (of the reorg 27 and layer 24) before layer 29 split
    by channels, in small: the group of route 8 and conv 9 over devices
    0-2 takes layer 4 from the members that hold its channels (an
    all-gather among themselves) and the reorg from device 2 (relayed), each
    member assembles the route's map, and backward the route's gradient
    goes back to both. With layers 1-4 on device 1 alone, layer 4 too is
    relayed (a route's input other than the layer before it). Equals one
    device (float64 1e-10), in one process and over sockets."""
    program = passthrough_program()
    tiled = [GroupChoice(0, 0, [0, 3, 6], [0, 6], [0, 1])]
    tail = [TailChoice(1, 4, layer4, [0, 1, 2] if layer4 == "channels" else [1]), TailChoice(5, 6, "one", [1]),
            TailChoice(7, 7, "one", [2]), TailChoice(8, 9, "channels", [0, 1, 2]), TailChoice(10, 10, "one", [0])]
    plan = plan_of(program, 1, tiled, tail, 3, 2)
    planfile.validate(plan)
    g = next(n for n, group in enumerate(plan["groups"]) if group["layers"] == [8, 9])
    into = {(m["tensor"], m["sender"], m["receiver"], bool(m.get("relay"))) for m in plan["messages"]
            if m["group"] == g and m["phase"] == "forward" and m["sender"] != m["receiver"]}
    assert {t for t, _, _, _ in into} == {4, 7}
    assert {(7, s, r, True) for s in range(3) for r in range(3) if s != r} <= into
    if layer4 == "one":
        assert {(4, s, r, True) for s in range(3) for r in range(3) if s != r} <= into
        assert_trains_as_one_device(program, plan, sockets)
        return
    assert {(4, s, r, False) for s in range(3) for r in range(3) if s != r} <= into  # layer 4: among the members
    # a member's channels of layer 4 go to both others from one staging buffer, as the memory model counts
    params, buffers, _ = setup(program, 2)
    hub = InProcessHub(3, 30.0)
    executors = inprocess.make_executors(plan, [hub.comm(r) for r in range(3)], module("float64"), params, buffers)
    for r, ex in enumerate(executors):
        fours = [k for k, m in enumerate(plan["messages"]) if m["tensor"] == 4 and m["phase"] == "forward"
                 and m["sender"] == r and m["receiver"] != r]
        assert len(fours) == 2 and len({ex.stage_of[k] for k in fours}) == 1
        assert ex.staging_arena.nbytes == plan_memory(plan, r)["messages"]
        # the forward buffers and the backward ones share the arena's bytes
        for phase in ("forward", "backward"):
            views = sorted((a.ctypes.data, a.nbytes) for key, a in ex.staging.items() if ex.stage_phase[key] == phase)
            assert all(a + n <= b for (a, n), (b, _) in zip(views, views[1:]))  # (disjoint within a phase)
            assert not views or views[0][0] == ex.staging_arena.ctypes.data
    assert_trains_as_one_device(program, plan, sockets)


@pytest.mark.parametrize("sockets", [False, True])
def test_a_map_held_by_one_device_reaches_a_channel_group_through_its_members(sockets):
    """Layer 1 on device 1 alone, then a group split over devices 0-2: device
    1 sends each member its slice of the map's channels, each member passes
    its slice on to the others (relay), and backward each member sums its
    slice's partial gradients and returns that sum: no device sends the
    whole map twice. Equals one device (float64 1e-10), in one process and
    over sockets (whose frame tables check the relayed frames)."""
    program = dense_tail()
    tail = [TailChoice(1, 1, "one", [1]), TailChoice(2, 6, "channels", [0, 1, 2]), TailChoice(7, 7, "one", [0])]
    plan = plan_of(program, 1, TILED, tail, 3, 2)
    planfile.validate(plan)
    moves = [(m["phase"], m["sender"], m["receiver"], tuple(m["channels"]), bool(m.get("relay")))
             for m in plan["messages"] if m["tensor"] == 1]
    slices = {0: (0, 1), 1: (2, 3), 2: (4, 5)}  # 6 channels over 3 members
    want_moves = {("forward", 1, r, slices[r], False) for r in range(3)}
    want_moves |= {("forward", r, o, slices[r], True) for r in range(3) for o in range(3) if o != r}
    want_moves |= {("backward", r, 1, slices[r], False) for r in range(3)}
    want_moves |= {("backward", o, r, slices[r], True) for r in range(3) for o in range(3) if o != r}
    assert sorted(moves) == sorted(want_moves)
    sent_by_holder = sum(m["bytes"] for m in plan["messages"] if m["tensor"] == 1 and m["sender"] == 1
                         and m["phase"] == "forward")
    whole = 2 * 6 * 12 * 10 * 8  # the map: batch 2, 6 x 12 x 10, float64
    assert sent_by_holder == whole * 2 // 3 + 2 * whole // 3  # two slices out, its own slice to two: not 2 maps
    assert "g2t0 -> g2t1" in plan_dot(plan)  # (the drawing has the relayed slices inside the group)
    bad = [dict(m, receiver=m["sender"]) if m.get("relay") else m for m in plan["messages"]]
    with pytest.raises(ProgramError, match="a relayed message passes a channel group's input between two"):
        planfile.validate(planfile.seal(dict(plan, messages=bad)))
    assert_trains_as_one_device(program, plan, sockets)


def small_yolov2_tiny(tmp_path, size=96):
    """yolov2-tiny as darknet defines it (its channels, pools and region loss),
    on a smaller input so that float64 training stays quick."""
    from tilec.frontend.models import load_model, model_path
    text = model_path("yolov2-tiny").read_text().replace("width=416", f"width={size}").replace(
        "height=416", f"height={size}")
    (tmp_path / "yt.cfg").write_text(text)
    return load_model(str(tmp_path / "yt.cfg")).to_program()


def test_yolov2_tiny_with_its_13x13_layers_split_by_channels_equals_one_device(tmp_path):
    """yolov2-tiny's weight-heavy end (512 and 1024 filters on the smallest
    map) split by channels over 3 devices after a tiled prefix, with batch
    norm and the region loss: the same training as on one device."""
    program = small_yolov2_tiny(tmp_path)
    assert [layer["kind"] for layer in program[8:]] == ["conv", "maxpool", "conv", "maxpool", "conv", "conv", "conv",
                                                        "region"]
    _, h, w = program[7]["out_shape"]
    choices = [GroupChoice(0, 7, [0, h // 3, 2 * h // 3, h], [0, w], [2, 0, 1])]
    tail = [TailChoice(8, 11, "channels", [0, 1, 2]), TailChoice(12, 14, "channels", [0, 1, 2]),
            TailChoice(15, 15, "one", [0])]
    plan = build_plan(program, choices, model="yolov2-tiny", batch=2, dtype="float64", devices=["a", "b", "c"],
                      optimizer=OPT, prefix=8, tail=tail, release_min_bytes=0)
    assert plan["groups"][2].get("reduce_input")  # 11 is a pool after a B layer: replicated on all three
    assert releasing_ranks(plan) == {0, 1, 2}  # (each gives its scratch back while the tail runs)
    params, buffers, batches = setup(program, 2)
    got = inprocess.train(plan, params, buffers, batches, 2, module("float64"), timeout=60)
    assert_same(got[:3], one_device(program, params, buffers, batches, 2), 1e-10, FLOOR)


def test_tail_flag_forces_the_choice(tmp_path, capsys):
    """--tail one keeps every tail group on one device, --tail channels splits
    what can be split; --tail data is refused with the reason."""
    import json

    from tilec.cli import main
    (tmp_path / "c.yaml").write_text("devices:\n" + "".join(f"  - {{name: p{i}, profile: rpi3b}}\n" for i in range(3)))
    modes = {}
    for tail in ("one", "channels"):
        out = tmp_path / tail
        assert main(["compile", "yolov2-tiny", "--cluster", str(tmp_path / "c.yaml"), "--tail", tail, "--tile-layers",
                     "8", "-o", str(out)]) == 0
        plan = json.loads((out / "plan.json").read_text())
        modes[tail] = [g["mode"] for g in plan["groups"] if g["kind"] == "tail"]
        assert [g["layers"] for g in plan["groups"] if g["kind"] == "tiled"][-1][1] == 7
    assert set(modes["one"]) == {"one"} and modes["channels"][:-1] == ["channels"] * (len(modes["channels"]) - 1)
    assert "split by channels" in (tmp_path / "channels" / "report.txt").read_text()
    capsys.readouterr()
    assert main(["compile", "tiny", "--devices", "2", "--tail", "data", "-o", str(tmp_path / "d")]) == 1
    assert "--tail data (data parallelism after the tiled prefix) is not implemented" in capsys.readouterr().err


@st.composite
def identity_route_cases(draw):
    """A tiled conv, a tail of convs, a route of one earlier map (an
    identity) and convs on it, a route joining both branches, a cost; the
    tail's runs cut into groups at random, each on a random device or split
    by channels where it can be."""
    b = ProgramBuilder(draw(st.integers(1, 3)), draw(st.integers(4, 9)), draw(st.integers(4, 9)))
    b.conv(draw(st.integers(2, 5)), 3, 1, "same", bn=True, act="leaky")
    skip = b.conv(draw(st.integers(2, 6)), 3, 1, "same", bn=draw(st.booleans()), act="leaky")
    for _ in range(draw(st.integers(1, 2))):
        main = b.conv(draw(st.integers(2, 6)), draw(st.sampled_from([1, 3])), 1, "same", bn=draw(st.booleans()),
                      act="leaky")
    b.route(skip)
    for _ in range(draw(st.integers(0, 2))):
        b.conv(draw(st.integers(2, 6)), draw(st.sampled_from([1, 3])), 1, "same", bn=draw(st.booleans()),
               act="leaky")
    b.route(b.last, main)
    b.conv(draw(st.integers(1, 4)), 1, 1, 0)
    b.cost()
    program = b.build()
    n_dev = draw(st.integers(2, 3))
    _, h, w = program[0]["out_shape"]
    rows = draw(splits(h, n_dev))
    choices = [GroupChoice(0, 0, rows, [0, w], draw(st.permutations(range(n_dev)))[:len(rows) - 1])]
    tail = []
    for run_first, run_last, ok in runs(program, 1):
        cuts = sorted(draw(st.sets(st.integers(run_first + 1, run_last), max_size=2))) if ok and run_last > run_first \
            else []
        for first, last in zip([run_first, *cuts], [*(c - 1 for c in cuts), run_last]):
            k = draw(st.integers(1, n_dev)) if ok else 1
            members = [0] if last == len(program) - 1 else sorted(draw(st.permutations(range(n_dev)))[:k])
            mode = "channels" if k > 1 and shards.check(program, first, last, k) is None else "one"
            tail.append(TailChoice(first, last, mode, members if mode == "channels" else members[:1]))
    return program, choices, tail, n_dev, draw(st.integers(1, 3))


def test_a_route_of_one_map_starts_a_run_and_is_that_map():
    """runs(): the route of one map (layer 4, reading layer 1) starts a
    splittable run with the conv after it; layers read by a later one too
    (1 and 2) stay inside theirs (a channel group hands those on as well); the reference's route hands on
    the very array it reads, and its gradient as a view of the one it gets."""
    from tilec_runtime import reference
    b = ProgramBuilder(2, 6, 6)
    b.conv(3, 3, 1, "same", bn=True, act="leaky")
    skip = b.conv(4, 3, 1, "same", act="leaky")
    main = b.conv(5, 3, 1, "same", bn=True, act="leaky")
    b.conv(5, 1, 1, 0, act="leaky")
    b.route(skip)
    b.conv(3, 1, 1, 0, bn=True, act="leaky")
    b.route(b.last, main)
    b.conv(2, 1, 1, 0)
    b.cost()
    program = b.build()
    assert runs(program, 1) == [(1, 3, True), (4, 5, True), (6, 8, True)]
    assert shards.check(program, 3, 5, 2) == "layer 4 (route) needs the whole map"
    assert shards.check(program, 4, 5, 2) is None  # (a route may lead a group: every member assembles it)
    assert shards.check(program, 5, 5, 2) is None
    acts = {1: np.ones((2, 4, 6, 6))}
    reference.forward_layers([program[4]], {}, {}, acts, None, train=True)
    assert acts[4] is acts[1]
    dy = np.ones((2, 4, 6, 6))
    _, dout = reference.backward_layers([program[4]], {}, acts, {}, {4: dy})
    assert np.shares_memory(dout[1], dy)


def passthrough_program():
    """YOLOv2's passthrough in small: a tiled conv; then A (layer 1, read by
    the next layer and by route 5), B, a max-pool, A (layer 4, read by
    route 8); route 5 of layer 1, a conv, a reorg, route 8 of the reorg and
    layer 4, a conv and the cost."""
    b = ProgramBuilder(2, 6, 6)
    b.conv(3, 3, 1, "same", bn=True, act="leaky")
    skip = b.conv(4, 3, 1, "same", bn=True, act="leaky")
    b.conv(6, 1, 1, 0, bn=True, act="leaky")
    b.maxpool(2, 2)
    deep = b.conv(5, 3, 1, "same", act="leaky")
    b.route(skip)
    b.conv(4, 1, 1, 0, bn=True, act="leaky")
    b.reorg(2)
    b.route(b.last, deep)
    b.conv(3, 1, 1, 0)
    b.cost()
    return b.build()


@pytest.mark.parametrize("sockets", [False, True])
def test_a_channel_group_hands_on_the_maps_a_later_route_reads(sockets):
    """YOLOv2's layer 16 (read by the pool after it and by route 25): a
    channel group holds it and sends each member's channels of it (an A
    layer's output) or the whole map (a B layer's, from every member) to
    where the route runs, and adds the gradients that come back, before its
    own backward reaches that layer. Equals one device (float64 1e-10), in
    one process and over sockets."""
    program = passthrough_program()
    assert runs(program, 1) == [(1, 4, True), (5, 6, True), (7, 7, False), (8, 10, True)]
    tiled = [GroupChoice(0, 0, [0, 3, 6], [0, 6], [0, 1])]
    tail = [TailChoice(1, 4, "channels", [0, 1, 2]), TailChoice(5, 6, "one", [1]), TailChoice(7, 8, "one", [2]),
            TailChoice(9, 9, "channels", [1, 2]), TailChoice(10, 10, "one", [0])]
    plan = plan_of(program, 1, tiled, tail, 3, 2)
    planfile.validate(plan)
    far = {(m["sender"], m["receiver"], m["phase"]) for m in plan["messages"]
           if m["tensor"] == 1 and m["sender"] != m["receiver"]}
    # each member's channels of layer 1 to route 5 on device 1, its gradient back
    assert far == {(0, 1, "forward"), (2, 1, "forward"), (1, 0, "backward"), (1, 2, "backward")}
    assert_trains_as_one_device(program, plan, sockets)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(identity_route_cases())
def test_a_route_of_one_map_in_any_tail_group_equals_one_device(case):
    program, choices, tail, n_dev, batch = case
    params, buffers, batches = setup(program, batch)
    plan = plan_of(program, 1, choices, tail, n_dev, batch)
    planfile.validate(plan)
    want = one_device(program, params, buffers, batches, 3)
    assume(converges(want[0]) and well_conditioned(program, params, buffers, batches, 3))
    losses, p, b, _ = inprocess.train(plan, params, buffers, batches, 3, module("float64"), timeout=30)
    assert_same((losses, p, b), want, 1e-10, FLOOR)
