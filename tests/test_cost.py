"""The cost model: kernel times from profiles, the profiler's fit and link
test, exchanges checked against the plan's own messages, memory, and the
additivity the solvers rely on."""
import copy
import dataclasses
import random
import socket
import threading

import numpy as np
import pytest

from tilec.analysis.tiles import spatial_prefix
from tilec.cluster import uniform_cluster
from tilec.cost.candidates import enumerate_candidates
from tilec.cost.comm import allgather_seconds, exchange_seconds, gradient_allreduce_seconds
from tilec.compile import compile_plan
from tilec.cost.compute import features, layer_seconds, unit_seconds, update_seconds
from tilec.cost.layouts import even_layout, layouts
from tilec.cost.memory import plan_memory
from tilec_runtime.footprint import STATE_COPIES, param_count, state_bytes
from tilec.cost.model import CostModel
from tilec.frontend.models import load_model
from tilec.cost.traffic import bytes_sent
from tilec.plan.build import GroupChoice, build_plan
from tilec.profile_measure import LinkError, fit_kernel, measure_link, parse_peer, start_loopback_server
from tilec.profiles import load_profile, profile_from_dict
from tilec_runtime.collectives import RING_MIN_BYTES

RPI3 = load_profile("rpi3b")


def model_for(name, n, batch=1, prefix=None, profile=RPI3, **device_changes):
    program = load_model(name).to_program()
    cl = uniform_cluster(profile, n)
    if device_changes:
        cl = dataclasses.replace(cl, devices=tuple(dataclasses.replace(d, **device_changes) for d in cl.devices))
    return CostModel(program, cl, batch, 4, prefix=prefix), program


def conv(c, f, k=3, hw=16):
    return {"kind": "conv", "index": 0, "inputs": [-1], "in_shape": [c, hw, hw], "out_shape": [f, hw, hw],
            "filters": f, "size": k, "stride": 1, "pad": k // 2, "bn": True, "act": "leaky"}


def test_kernel_rate_depends_on_shape_not_a_single_constant():
    rate = {}
    for name, layer in {"thin": conv(3, 16), "deep": conv(256, 256), "1x1": conv(256, 128, k=1)}.items():
        flops, _ = features(layer, 16 * 16, 1, 4, "forward")
        rate[name] = flops / layer_seconds(RPI3, layer, 16 * 16, 1, 4, "forward")
    assert rate["thin"] < rate["1x1"] < rate["deep"]
    # linear in the region (one call per layer and region), with a fixed overhead
    t = [layer_seconds(RPI3, conv(64, 64), p, 2, 4, "backward") for p in (10, 20, 30)]
    assert t[2] - t[1] == pytest.approx(t[1] - t[0]) and t[0] > t[1] - t[0] - 1e-12


def test_fit_recovers_known_coefficients():
    rng = np.random.default_rng(1)
    rows = [(1.0, f, b) for f, b in zip(rng.uniform(1e5, 1e9, 12), rng.uniform(1e4, 1e8, 12))]
    for truth in ([2e-5, 3e-10, 1e-9], [0.0, 5e-10, 2e-9], [1e-4, 0.0, 3e-9]):
        secs = [float(np.dot(truth, r)) for r in rows]
        coef, worst = fit_kernel(rows, secs)
        assert coef == pytest.approx(truth, rel=1e-6, abs=1e-15) and worst < 1e-6
    # with a cost per row walked
    rows = [r + (n,) for r, n in zip(rows, rng.uniform(1e2, 1e6, 12))]
    for truth in ([2e-5, 3e-10, 1e-9, 2e-8], [0.0, 5e-10, 0.0, 5e-8]):
        secs = [float(np.dot(truth, r)) for r in rows]
        coef, worst = fit_kernel(rows, secs)
        assert coef == pytest.approx(truth, rel=1e-6, abs=1e-15) and worst < 1e-6


def test_a_cost_per_row_prices_a_narrow_tile_above_a_wide_one_and_the_optimiser_splits_rows():
    """A tile split by columns keeps every row of the map, narrowed; with
    a cost per row (``ns_per_row``, what ``tilec profile`` fits) it costs
    more than the same area split by rows, and the optimiser splits a
    square map's rows. Without one (the shipped Pi profiles) the two are
    priced alike."""
    program = load_model("detector-small").to_program()
    tall, wide = {0: (96, 48), 1: (48, 24)}, {0: (48, 96), 1: (24, 48)}  # conv 0 and its fused pool

    def priced(profile, sizes):
        return sum(unit_seconds(profile, program, (0, 1), sizes, False, 4, 4).values())

    assert priced(RPI3, tall) == pytest.approx(priced(RPI3, wide))
    raw = copy.deepcopy(RPI3.raw)
    for kind in ("conv", "epilogue", "maxpool"):
        for cost in raw["kernels"][kind].values():
            cost["ns_per_row"] = 300
    rowed = profile_from_dict(raw, "with a cost per row")
    assert priced(rowed, tall) > priced(rowed, wide)
    plan = compile_plan(load_model("detector-small"), cluster=uniform_cluster(rowed, 2), batch=4, dtype="float32")
    tiled = [g for g in plan["groups"] if g.get("row_splits")]
    assert tiled and all(len(g["row_splits"]) == 3 and len(g["col_splits"]) == 2 for g in tiled)


def test_quick_profile_of_this_machine_is_a_valid_profile():
    from tilec.profile_measure import measure_profile
    from tilec.profiles import profile_from_dict
    data = measure_profile(quick=True)
    prof = profile_from_dict(data, "measured")
    assert prof.cores >= 1 and prof.memory_bytes > 0
    assert all(prof.speedup(kind, 1) == 1.0 and len(prof.threads[kind]) in (1, prof.cores) for kind in prof.threads)
    assert "loopback" in data["sources"]["link"]
    # what a message's framing, MAC and copies cost each end (taken from the kernels where they take every core)
    assert prof.message_cpu_s == pytest.approx(data["link"]["cpu_us_per_message"] * 1e-6) and prof.message_cpu_s > 0
    assert 0 < prof.message_cpu_s_per_byte < 1e-7 and "halved" in data["sources"]["link.cpu"]
    assert layer_seconds(prof, conv(64, 64), 256, 1, 4, "forward") > 0
    # corrected by traced training steps (tilec.profile_calibrate): the kinds a tiled step runs
    for kind in ("conv", "epilogue"):
        for direction in ("forward", "backward"):
            cost = prof.cost(kind, direction)
            assert cost.in_step == data["kernels"][kind][direction]["in_step"] > 0 and cost.dispatch_s >= 0
    assert "in_step" in data["sources"]
    # and local workers side by side (tilec.profile_calibrate.beside_others): what prices them
    if prof.cores >= 2:
        for kind in ("conv", "epilogue"):
            for direction in ("forward", "backward"):
                assert 0.5 <= data["kernels"][kind][direction]["beside_others"] <= 8.0
        assert prof.measured_beside_others and "two local workers" in data["sources"]["beside_others"]
        # and from the same traces how a kernel call's time varies step to step (the simulator's jitter)
        assert data.get("jitter") is not None, data["sources"]  # (which steps it came from, were it missing)
        assert 0 < prof.jitter == data["jitter"] < 1 and "lognormal" in data["sources"]["jitter"]
        assert data["jitter_call_ms"] > 0 and prof.jitter_call_s == pytest.approx(data["jitter_call_ms"] * 1e-3)
        view = uniform_cluster(prof, 2, threads=prof.cores // 2, shared=True).devices[0].profile
        assert view.cost("epilogue", "backward").in_step == pytest.approx(
            prof.cost("epilogue", "backward").in_step * data["kernels"]["epilogue"]["backward"]["beside_others"])
    # a detector's region loss, timed on its own: priced by it, not as an element-wise pass
    region = load_model("detector-small").to_program()[-1]
    assert prof.cost("region", "forward") != prof.cost("elementwise", "forward")
    assert prof.cost("region", "backward") == prof.cost("elementwise", "backward")
    assert layer_seconds(prof, region, 36, 16, 4, "forward") > 5 * layer_seconds(
        dataclasses.replace(prof, costs={k: v for k, v in prof.costs.items() if k != "region"}), region, 36, 16, 4,
        "forward")


def test_contention_is_side_by_side_over_alone_timed_beside_it():
    """A machine that runs slower in a minute slows the steps alone and side
    by side alike (they come in alternate rounds): its slowness is no
    contention. What two workers lose to each other is."""
    from tilec.profile_calibrate import contention
    priced = [(None, 0.010), (None, 0.030)]
    slow_minute = 1.7  # every call 1.7x its price, alone or not
    alone = [(slow_minute * p, p) for _, p in priced]
    assert contention([(slow_minute * p, p) for _, p in priced], alone, 0.0) == 1.0
    assert contention([(slow_minute * 1.25 * p, p) for _, p in priced], alone, 0.0) == 1.25
    # the dispatch is left out of both; nothing priced or measured: no factor
    assert contention([(0.0125 + 0.001, 0.011)], [(0.010 + 0.001, 0.011)], 0.001) == 1.25
    assert contention([(0.01, 0.01)], [], 0.0) is None
    assert contention([(0.0, 0.01)], [(0.01, 0.01)], 0.0) is None


def test_link_test_on_loopback():
    port = start_loopback_server()
    link = measure_link("127.0.0.1", port, pings=5, payload=1 << 20)
    assert link["bandwidth_mbps"] > 0 and link["latency_ms"] >= 0


def test_link_test_refuses_a_server_that_does_not_speak_it():
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def answer():
        conn, _ = srv.accept()
        with conn:
            conn.recv(64)
            conn.sendall(b"HTTP/1.0 400 no\r\n")
    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(LinkError, match="not a tilec link-test server"):
        measure_link("127.0.0.1", port, pings=1)
    srv.close()
    with pytest.raises(LinkError, match="cannot connect"):
        measure_link("127.0.0.1", port, pings=1, timeout=2)
    for bad in ("host", "host:", ":80", "host:99999", "host:x"):
        with pytest.raises(LinkError, match="HOST:PORT"):
            parse_peer(bad)
    assert parse_peer("pi-a.local:7700") == ("pi-a.local", 7700)


def test_exchange_and_allgather_formulas():
    devs = uniform_cluster(RPI3, 3).devices
    bw, lat = RPI3.bandwidth_bps, RPI3.latency_s
    m = [[5, 1000, 0], [0, 0, 3000], [2000, 0, 0]]  # the diagonal is local: free
    assert exchange_seconds(m, devs) == pytest.approx(3000 / bw + lat)
    m = [[0, 1000, 1000], [0, 0, 0], [0, 0, 0]]  # one sender, two messages
    assert exchange_seconds(m, devs) == pytest.approx(2000 / bw + 2 * lat)
    assert allgather_seconds(800, [0, 2], devs) == pytest.approx(800 / bw + lat)
    assert allgather_seconds(800, [0, 1, 2], devs) == pytest.approx(2 * (800 / bw + lat))
    assert allgather_seconds(800, [1], devs) == 0
    big = 8 * RING_MIN_BYTES  # the socket runtime's ring: 2 (k-1) rounds of a 1/k chunk
    assert gradient_allreduce_seconds(big, [0, 1, 2], devs) == pytest.approx(4 * (big / 3 / bw + lat))
    assert gradient_allreduce_seconds(800, [0, 1, 2], devs) == allgather_seconds(800, [0, 1, 2], devs)


def test_one_device_step_is_the_sum_of_its_layers():
    """On one thread, the units as the schedule runs them add up to the
    layers priced whole, within what fusing a pool into a conv changes; on
    the board's cores the step is faster by the profile's speed-ups."""
    model, program = model_for("tiny", 1, batch=4, threads=1)
    prefix = spatial_prefix(program)
    _, h, w = program[prefix - 1]["out_shape"]
    g = model.group(0, prefix - 1, [0, h], [0, w], (0,))
    pred = model.evaluate([(g, False)])
    expect = sum(layer_seconds(RPI3, l, l["out_shape"][1] * l["out_shape"][2], 4, 4, d)
                 for l in program for d in ("forward", "backward"))
    expect += update_seconds(RPI3, param_count(program[:prefix]), 4) + update_seconds(RPI3, param_count(program[prefix:]), 4)
    assert pred.step_s == pytest.approx(expect, rel=0.25)
    board, _ = model_for("tiny", 1, batch=4)
    g = board.group(0, prefix - 1, [0, h], [0, w], (0,))
    assert pred.step_s / board.evaluate([(g, False)]).step_s > 1.3
    assert pred.busy_s[0] == pytest.approx(expect - sum(
        update_seconds(RPI3, param_count(p), 4) for p in (program[:prefix], program[prefix:])), rel=0.25)
    parts = pred.breakdown[0]
    assert parts["state"] == state_bytes(program, 4) > STATE_COPIES * param_count(program) * 4  # (and BN statistics)
    assert pred.memory[0] == sum(parts.values())


def _groups_of(model, program, spans, grids):
    out = []
    for (first, last), (r, c) in zip(spans, grids):
        _, h, w = program[last]["out_shape"]
        rows, cols = even_layout(r, c).splits(h, w)
        out.append(model.group(first, last, rows, cols, tuple(range(r * c))))
    return out


@pytest.mark.parametrize("spans, grids", [
    ([(0, 1), (2, 3), (4, 6)], [(2, 2), (2, 2), (2, 2)]),
    ([(0, 0), (1, 4), (5, 6)], [(2, 2), (1, 4), (1, 2)]),  # layouts change: whole maps move
    ([(0, 6)], [(4, 1)]),
])
def test_exchange_bytes_and_memory_match_the_plan(spans, grids):
    """The bytes the cost model charges at each boundary are exactly the
    plan builder's messages, and its memory per device is what the runtime
    allocates for the plan (its own memory plan), but for the staging
    buffers of messages, which the model counts forward and backward apart
    and the runtime packs into the same bytes."""
    model, program = model_for("tiny", 4, batch=2)
    groups = _groups_of(model, program, spans, grids)
    choices = [GroupChoice(g.first, g.last, g.row_splits, g.col_splits, list(g.devices)) for g in groups]
    plan = build_plan(program, choices, model="tiny", batch=2, dtype="float32", devices=["a", "b", "c", "d"],
                      optimizer={"lr": 0.1, "momentum": 0.9, "decay": 0.0}, threads=model.cluster.threads)
    h, w = program[0]["in_shape"][1:]
    prev_rects, prev_devs = np.array([[0, h - 1, 0, w - 1]]), [0]
    for gi, g in enumerate(groups):
        want = model.redistribute_bytes(g.first, prev_rects, prev_devs, g.input_rects, g.devices)
        got = np.zeros_like(want)
        for m in plan["messages"]:
            if m["phase"] == "forward" and m["group"] == gi:
                got[m["sender"], m["receiver"]] += m["bytes"]
        np.fill_diagonal(want, 0)
        assert (got == want).all(), f"group {gi}"
        prev_rects, prev_devs = g.out_rects, g.devices
    pred = model.evaluate([(g, False) for g in groups])
    from tilec_runtime.executor import staging_layout
    for d in range(4):  # (each its pieces of the image too)
        held = plan_memory(plan, d, model.devices[d].profile)
        # the model counts the forward and the backward staging buffers apart; they share their bytes
        layout = staging_layout(plan, d)[0]
        forward, backward = (sum(np.prod(shape) * 4 for p, _, shape in layout.values() if p == phase)
                             for phase in ("forward", "backward"))
        assert held["messages"] >= max(forward, backward)
        assert pred.memory[d] == sum(held.values()) - held["messages"] + forward + backward


def test_recompute_keeps_only_the_input_and_costs_a_forward():
    """A recomputing group keeps its input (and its output's gradient); what
    it recomputes lives in the device's scratch, packed with the rest, and
    costs its forward again and the gradients it makes again. (On
    its own the group may then need more in all: kept, its first conv's
    gradient is made again band by band and never stored, while recomputed
    it fitted in the space of what was dead by then anyway; recomputing
    pays where its activations would be kept through other groups' steps.)"""
    model, program = model_for("yolov2-tiny", 2, batch=2)
    for span in ((0, 3), (0, 5)):
        g = _groups_of(model, program, [span], [(2, 1)])[0]
        for d in (0, 1):
            assert g.kept_recompute[d] < g.kept[d]
            assert g.workspace_recompute[d] > g.workspace[d]
        keep = model.evaluate([(g, False)])
        rec = model.evaluate([(g, True)])
        assert rec.step_s - keep.step_s == pytest.approx(g.recompute_seconds)
        # the forward again, and its pooled convs (layer 2 on) make their gradients again band by band
        assert g.recompute_seconds > g.parts["forward"] * 1.01
    # a longer group saves more than its recomputing scratch costs
    assert all(g.kept_recompute[d] + g.workspace_recompute[d] <= g.kept[d] + g.workspace[d] for d in (0, 1))
    assert max(rec.memory) <= max(keep.memory)


def test_the_solvers_additive_view_equals_evaluate():
    """Any path through the candidates, tiled groups then tail groups, costs
    the sum of its arcs and transitions, and holds on each device the sum of
    their bytes and the largest workspace of each pool: exactly what
    CostModel.evaluate computes for the same groups."""
    model, program = model_for("tiny", 3, batch=2)
    cands = enumerate_candidates(model, layouts(model.cluster))
    moves = {(b, li, lj): t for t, (b, li, lj, _) in enumerate(cands.transitions)}
    rng = random.Random(3)
    for _ in range(25):
        path, b, secs = [], 0, 0.0
        kept = [0, 0, 0]
        while b < cands.end:
            options = [gi for gi, g in enumerate(cands.groups) if g.first == b and (
                not path or (b, cands.group_out[path[-1][0]], cands.group_layout[gi]) in moves)]
            gi = rng.choice(options)
            rec = rng.random() < 0.3 and not cands.groups[gi].is_tail
            if path:
                t = moves[(b, cands.group_out[path[-1][0]], cands.group_layout[gi])]
                secs += cands.transitions[t][3]
                for d, nbytes in cands.transition_bytes[t].items():
                    kept[d] += nbytes
            secs += cands.group_seconds(gi, rec)
            path.append((gi, rec))
            b = cands.groups[gi].last + 1
        pred = model.evaluate([(cands.groups[gi], rec) for gi, rec in path])
        assert pred.step_s == pytest.approx(secs)
        for d in range(3):
            mine = [(cands.groups[gi], rec) for gi, rec in path if d in cands.groups[gi].members]
            kept[d] += sum((g.kept_recompute if rec else g.kept)[d] for g, rec in mine)
            assert pred.breakdown[d]["kept"] == pytest.approx(kept[d])


def test_weighted_layouts_give_a_faster_device_a_larger_tile():
    model, _ = model_for("tiny", 2)
    fast = dataclasses.replace(model.cluster.devices[1], compute_scale=3.0)
    cl = dataclasses.replace(model.cluster, devices=(model.cluster.devices[0], fast))
    lays = [lay for lay in layouts(cl) if lay.rows * lay.cols == 2 and lay.weighted]
    assert lays and all(lay.devices == (1, 0) for lay in lays)
    rows, cols = next(l for l in lays if l.rows == 2).splits(400, 400)
    assert (rows[1] - rows[0]) / (rows[2] - rows[1]) == pytest.approx(3.0)
    assert any(not lay.weighted and lay.rows * lay.cols == 2 for lay in layouts(cl))  # even grids stay available


def test_only_groups_holding_what_the_tail_reads_pay_to_send_it():
    """A layer the tail reads other than through its first layer (a route)
    goes to rank 0 from the tiles that own it; the tiled prefix's last
    layer goes to the first tail group by a transition instead."""
    model, program = model_for("yolov2", 2, batch=1, prefix=18)  # the tail's route reads layer 16
    assert model.tail_reads == [16]
    inside = _groups_of(model, program, [(15, 16)], [(2, 1)])[0]
    outside = _groups_of(model, program, [(13, 14)], [(2, 1)])[0]
    assert inside.parts["to_tail"] > 0 and outside.parts["to_tail"] == 0
    alone = _groups_of(model, program, [(15, 16)], [(1, 1)])[0]
    assert alone.parts["to_tail"] == 0  # rank 0 already holds it


def test_faster_links_never_cost_more():
    slow, program = model_for("tiny", 4, batch=2)
    fast, _ = model_for("tiny", 4, batch=2, bandwidth_bps=RPI3.bandwidth_bps * 10)
    spans, grids = [(0, 1), (2, 6)], [(2, 2), (1, 4)]
    a = slow.evaluate([(g, False) for g in _groups_of(slow, program, spans, grids)])
    b = fast.evaluate([(g, False) for g in _groups_of(fast, program, spans, grids)])
    assert b.step_s < a.step_s and b.memory == a.memory
    msgs, coll = bytes_sent(build_plan(program, [GroupChoice(0, 6, [0, 2, 4], [0, 2, 4], [0, 1, 2, 3])],
                                       model="tiny", batch=2, dtype="float32", devices=list("abcd"),
                                       optimizer={"lr": 0.1, "momentum": 0, "decay": 0}))
    assert sum(msgs) > 0 and sum(coll) > 0


def test_cli_profile_measures_kernels_and_the_link_to_a_peer(tmp_path, capsys):
    from tilec.cli import main
    from tilec.profiles import load_profile as load
    port = start_loopback_server()  # stands in for `tilec profile --serve PORT` on the peer
    out = tmp_path / "me.json"
    assert main(["profile", "--quick", "--peer", f"127.0.0.1:{port}", "-o", str(out), "--name", "me"]) == 0
    prof = load(out)
    assert prof.name == "me" and prof.bandwidth_bps > 0
    assert "measured to 127.0.0.1" in prof.raw["sources"]["link"]
    assert "wrote" in capsys.readouterr().out
    assert main(["profile", "--quick", "--peer", "nohost", "-o", str(out)]) == 1
    assert "HOST:PORT" in capsys.readouterr().err


def skip_model():
    """A route reading the map before the one before it (layer 2, beside layer 3)."""
    from tilec.frontend.builder import Model
    return (Model(16, 16, 3, batch=2).conv(8, bn=True, act="leaky").maxpool(2, 2)
            .conv(16, bn=True, act="leaky").conv(16, bn=True, act="leaky").route(-1, -2).conv(4, 1).sse())


@pytest.mark.parametrize("reader", [0, 1])
def test_memory_of_a_skip_read_wherever_its_reader_runs(reader):
    """A route reads a map from a group that is not the one before it: the
    sender stages it for the route's device, which the chain of groups does
    not know when it prices the sender, so the model counts that staging
    whether the route runs there or elsewhere (it counted none when the
    sender was rank 0 and the route ran on another device: a plan the model
    said fits then did not)."""
    from tilec.analysis.tail import TailChoice
    program = skip_model().build().to_program()
    model = CostModel(program, uniform_cluster(RPI3, 2), 2, 4, prefix=2)
    tiled = [model.group(0, 1, [0, 4, 8], [0, 8], (0, 1))]
    tail = [TailChoice(2, 2, "one", [0]), TailChoice(3, 3, "one", [0]), TailChoice(4, 5, "one", [reader]),
            TailChoice(6, 6, "one", [0])]
    plan = build_plan(program, [GroupChoice(0, 1, [0, 4, 8], [0, 8], [0, 1])], model="skip", batch=2,
                      dtype="float32", devices=["a", "b"], optimizer={"lr": 0.1, "momentum": 0.9, "decay": 0.0},
                      prefix=2, threads=model.cluster.threads, tail=tail)
    pred = model.evaluate([(g, False) for g in tiled] + [(arc, False) for arc in model.tail_arcs(tail)])
    skip = 2 * 16 * 8 * 8 * 4  # layer 2's map, batch 2, float32
    for d in range(2):
        held = sum(plan_memory(plan, d, model.devices[d].profile).values())
        # (over by at most the map's staging and its gradient's, which a device sending to itself does without)
        assert held <= pred.memory[d] <= held + 2 * skip


def test_what_a_tail_holds_at_once_kept_or_freed_as_it_goes():
    """``tail_peak`` of three groups (phase, of it output gradients, temporaries), MB: kept to the end,
    all phases and the largest temporary; let go after each backward, the most over the groups of the
    activations up to it, its gradients and its temporaries."""
    from tilec_runtime.footprint import tail_peak
    from tilec_runtime.footprint import tail_early, tiles_and_tail
    parts = [(10, 4, 3), (20, 5, 2), (6, 0, 9)]
    assert tail_peak(parts) == (36 + 9, max(10 + 3, 6 + 20 + 2, 6 + 15 + 6 + 9))
    assert tail_peak([]) == (0, 0)
    # inputs from the tiles (a fourth entry) land beside the scratch before it goes: 40 + 7 against 36
    early = [(10, 4, 3, 7), (20, 5, 2, 0), (6, 0, 9, 0)]
    assert tail_peak(early) == tail_peak(parts) and tail_early(early) == 7
    assert tiles_and_tail(40 << 20, tail_peak([(p << 20, g << 20, w << 20) for p, g, w in parts]), 7 << 20) \
        == max(47, 36) << 20


def test_a_device_holds_its_scratch_or_its_tail_not_both(monkeypatch):
    """Where the tiles' scratch and the tail's activations are both large, a
    device gives the scratch back while the tail runs: the plan says so
    (``scratch_release``), its memory holds the larger of the two, and the
    cost model (CP-SAT's and the beam's count) saves exactly as much.
    YOLOv2 at batch 2 on 2 Pi 3s, against the same plan with the threshold
    out of reach."""
    from tilec.analysis.tail import TailChoice
    from tilec_runtime import footprint as memory
    from tilec.solve.beam import _transient
    model, program = model_for("yolov2", 2, batch=2)
    tiled = [model.group(0, 7, [0, 38, 76], [0, 76], (0, 1)), model.group(8, 17, [0, 10, 19], [0, 19], (0, 1))]
    tail = [TailChoice(18, 24, "channels", [0, 1]), TailChoice(25, 27, "one", [1]),
            TailChoice(28, 30, "channels", [0, 1]), TailChoice(31, 31, "one", [0])]
    choices = [GroupChoice(g.first, g.last, list(g.row_splits), list(g.col_splits), list(g.devices)) for g in tiled]
    path = [(g, False) for g in tiled] + [(arc, False) for arc in model.tail_arcs(tail)]

    def both():
        plan = build_plan(program, choices, model="yolov2", batch=2, dtype="float32", devices=["a", "b"], prefix=18,
                          optimizer={"lr": 0.1, "momentum": 0.9, "decay": 0.0}, threads=model.cluster.threads,
                          tail=tail)
        return plan, model.evaluate(path)
    monkeypatch.setattr(memory, "RELEASE_MIN_BYTES", 1 << 40)
    apart, apart_pred = both()
    monkeypatch.setattr(memory, "RELEASE_MIN_BYTES", 1 << 20)
    released, released_pred = both()
    from tilec.inspect.plan_report import plan_summary
    assert "scratch given back while the tail runs" in plan_summary(released)
    assert "scratch given back" not in plan_summary(apart)
    assert "streamed" not in plan_summary(released)  # (nothing recomputes here)
    for d in range(2):
        assert [op["op"] for op in apart["schedule"][d]].count("scratch_release") == 0
        ops = [op["op"] for op in released["schedule"][d]]
        # once, before its first tail group; each of its tail groups lets go after its backward
        assert ops.count("scratch_release") == 1 and ops.index("scratch_release") < ops.index("grad_zero")
        assert ops.count("tail_free") == sum(d in t.devices for t in tail)
        scratch, (_, held, freed, early) = memory.tile_bytes(released, d)[1], memory.tail_bytes(released, d)
        # (letting go after each group's backward, the tail holds less at once than all of it)
        assert min(scratch, freed) > 16 << 20 and freed < held
        # the first tail group's input, layer 17's output, lands from the tiles before the scratch goes, and
        # on rank 1 the route 25's, layer 16's
        assert early == 2 * 512 * 19 * 19 * 4 + (2 * 512 * 38 * 38 * 4 if d == 1 else 0)
        was, now = plan_memory(apart, d), plan_memory(released, d)
        assert was["transient"] == scratch + held and now["transient"] == max(scratch + early, freed)
        assert {k: v for k, v in was.items() if k != "transient"} == {k: v for k, v in now.items() if k != "transient"}
        saved = was["transient"] - now["transient"]
        assert apart_pred.memory[d] - released_pred.memory[d] == saved
        # the beam counts it as the model does
        work = {"tiles": [scratch] * 2, "parts": [memory.tail_parts(released, r)[1] for r in range(2)]}
        assert _transient(work, d) == now["transient"]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("first, last", [(18, 24), (25, 25), (25, 26), (26, 26), (27, 28), (29, 30)])
def test_tail_memory_model_covers_what_a_whole_group_allocates(first, last, threads):
    """A tail group on one device (YOLOv2's, batch 2) whose kernels run on
    ``threads`` threads: numpy's own account of what the group's step
    allocates at its peak (tracemalloc), with the inputs it holds, is
    within the model's kept, phase and workspace bytes, and not far below
    (where the model once said half, and elsewhere twice; its workspace is
    the one of the kernels' threads: 25-26's 1x1 conv splits its rows,
    with an im2col band and a weight gradient per thread); once
    it lets go of its activations, it holds no more than the model's kept
    bytes (the gradients of its inputs: the inputs go too)."""
    import tracemalloc

    from built import module
    from tilec_runtime.footprint import tail_member_bytes
    from tilec_runtime.genops import GeneratedOps
    from tilec_runtime.kernel_set import Kernels
    from tilec_runtime.tailstep import WholeGroup
    from tilec_runtime.weights import init_params
    batch, program = 2, load_model("yolov2").to_program()
    params, buffers = init_params(program, 0, "float32")
    mod = module("float32")
    group = WholeGroup(program, first, last, batch, np.float32, GeneratedOps(mod), Kernels(mod, "float32"))
    rng = np.random.default_rng(0)
    for x in group.inputs.values():
        x[...] = rng.standard_normal(x.shape)
    acc = {k: np.zeros_like(v) for k, v in params.items() if first <= int(k.split(".")[0]) <= last}
    inputs = sum(x.nbytes for x in group.inputs.values())  # (allocated before tracemalloc starts)
    tracemalloc.start()
    mod.set_threads(threads)
    try:
        group.forward(params, buffers, None)
        group.start_backward()
        group.grad_in(last)[0][...] = 1e-3
        group.backward(params, acc)
        peak = tracemalloc.get_traced_memory()[1]
        group.free()  # (``tail_free``) what stays is the gradient of its inputs; the inputs go too
        after = tracemalloc.get_traced_memory()[0]
    finally:
        mod.set_threads(1)
        tracemalloc.stop()
    assert not group.inputs
    held = peak + inputs
    model = tail_member_bytes(program, first, last, "one", 1, 0, batch, 4, threads)
    need = model["kept"] + model["phase"] + model["workspace"]
    assert held <= 1.05 * need and need <= 1.5 * held
    assert after <= 1.05 * model["kept"]


@pytest.mark.parametrize("bn, act", [(True, "leaky"), (False, "relu"), (True, "linear")])
def test_tail_memory_model_covers_what_a_channel_member_allocates(bn, act):
    """A member of a tail group split by channels over two devices, run op
    by op as its plan's schedule has them (its all-reduces left out: they
    work in place): numpy's account of its peak (tracemalloc) is within the
    model's kept, phase and workspace bytes and not far below; its convs'
    output gradients are made in place (``ChannelGroup._output_grad``), which
    the model counts, and a member that made them apart would hold more."""
    import tracemalloc
    from unittest import mock

    from built import module
    from programs import ProgramBuilder
    from tilec.analysis.tail import TailChoice
    from tilec_runtime import reference
    from tilec_runtime.footprint import tail_member_bytes
    from tilec_runtime.executor import holdings
    from tilec_runtime.genops import GeneratedOps
    from tilec_runtime.tailstep import ChannelGroup
    from tilec_runtime.weights import init_params
    b = ProgramBuilder(4, 24, 24)
    b.conv(8, 3, bn=True, act="leaky")
    for filters, size in ((48, 3), (48, 3), (16, 1)):
        b.conv(filters, size, bn=bn, act=act)
    b.cost()
    program, batch = b.build(), 4
    first, last = 1, 3
    plan = build_plan(program, [GroupChoice(0, 0, [0, 12, 24], [0, 24], [0, 1])], model="chan", batch=batch,
                      dtype="float32", devices=["a", "b"], optimizer={"lr": 1e-3, "momentum": 0.9, "decay": 0},
                      prefix=first, tail=[TailChoice(first, last, "channels", [0, 1]), TailChoice(4, 4, "one", [0])])
    g = next(j for j, grp in enumerate(plan["groups"]) if grp["layers"] == [first, last])
    whole, whole_buffers = init_params(program, 0, "float32")
    held = {}

    def run(member, conv_output_grad=reference.conv_output_grad):
        # the member's own slices of the parameters, as its executor holds them (``holdings``)
        cuts = holdings(plan, member)
        params, buffers = ({k: v if cuts[n].get(k) is None else np.ascontiguousarray(
            np.take(v, range(cuts[n][k][1], cuts[n][k][2]), axis=cuts[n][k][0])) for k, v in src.items() if k in cuts[n]}
            for n, src in enumerate((whole, whole_buffers)))
        acc = {k: np.zeros_like(v) for k, v in params.items() if first <= int(k.split(".")[0]) <= last}
        group = ChannelGroup(program, first, last, batch, np.float32, GeneratedOps(module("float32")), member, 2)
        rng = np.random.default_rng(member)
        for x in group.inputs.values():
            x[...] = rng.standard_normal(x.shape)
        inputs = sum(x.nbytes for x in group.inputs.values())  # (allocated before tracemalloc starts)
        with mock.patch.object(reference, "conv_output_grad", conv_output_grad):
            tracemalloc.start()
            try:
                backward = False
                for op in plan["schedule"][member]:
                    if op.get("group") != g:
                        continue
                    i, kind = op.get("layer"), op["op"]
                    if not backward and kind in ("chan_post_bwd", "chan_bwd"):  # (the loss's gradient arrives)
                        backward = True
                        group.start_backward()
                        group.grad_in(last)[0][...] = 1e-3
                    if kind == "chan_fwd":
                        group.forward(i, params, buffers, op.get("slice"), op.get("slices", 1))
                    elif kind == "chan_post":
                        group.post(i, params, buffers, op.get("slice"), op.get("slices", 1))
                    elif kind == "chan_post_bwd":
                        group.post_backward(i, params, acc)
                    elif kind == "chan_bwd":
                        group.backward(i, params, acc, op.get("part", "all"))
                    elif kind == "chan_reduce" and not op.get("overlap") or kind == "chan_wait":
                        group.reduced_done(i, op["phase"])
                assert backward
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        return peak + inputs

    for member in (0, 1):
        held[member] = run(member)
        model = tail_member_bytes(program, first, last, "channels", 2, member, batch, 4)
        need = model["kept"] + model["phase"] + model["workspace"]
        assert held[member] <= 1.05 * need and need <= 1.5 * held[member]
    # made apart (``inplace`` ignored), a member holds more
    original = reference.conv_output_grad
    assert run(0, lambda *args, inplace=False, **kwargs: original(*args, **kwargs)) > held[0]


def test_a_spread_plan_puts_every_group_on_every_device():
    """``compile_plan(spread=True)`` (what ``tilec profile`` measures two
    workers side by side with): on a link so slow that the optimiser keeps
    the tiled prefix on one device, every tiled group still goes over both,
    and a channel-split tail over both too."""
    from tilec.profile_calibrate import reference_stack
    stack = reference_stack(208)
    cl = uniform_cluster(RPI3, 2)
    slow = dataclasses.replace(cl, devices=tuple(dataclasses.replace(d, bandwidth_bps=1e4, latency_s=0.05)
                                                 for d in cl.devices))
    alone = compile_plan(stack, cluster=slow, batch=1)
    assert any({t["device"] for t in g["tiles"]} == {0} for g in alone["groups"] if g["kind"] == "tiled")
    spread = compile_plan(stack, cluster=slow, batch=1, spread=True, tail="channels")
    tiled = [g for g in spread["groups"] if g["kind"] == "tiled"]
    assert tiled and all({t["device"] for t in g["tiles"]} == {0, 1} for g in tiled)
    assert any(g.get("mode") == "channels" and {t["device"] for t in g["tiles"]} == {0, 1}
               for g in spread["groups"] if g["kind"] == "tail")
    assert all(any(op["op"] in ("conv_fwd", "chan_fwd") for op in ops) for ops in spread["schedule"])
