"""The simulator: one device is exactly its compute; bytes match the plan's
own accounting; waits and links behave; a broken schedule is caught."""
import dataclasses
import json

import pytest

from tilec.cli import main
from tilec.cluster import uniform_cluster
from tilec.compile import compile_plan
from tilec.cost.compute import layer_seconds, update_seconds
from tilec_runtime.footprint import param_count
from tilec.frontend.models import load_model
from tilec.cost.traffic import bytes_sent
from tilec.inspect.simulate import SimulationError, simulate, timeline_png
from tilec.plan.build import GroupChoice, build_plan
from tilec.profiles import load_profile

RPI3 = load_profile("rpi3b")
OPT = {"lr": 0.1, "momentum": 0.9, "decay": 0.0}


def tiny_plan(choices, n, batch=2):
    program = load_model("tiny").to_program()
    return build_plan(program, choices, model="tiny", batch=batch, dtype="float32",
                      devices=[f"dev{r}" for r in range(n)], optimizer=OPT)


def with_link(cl, bandwidth=None, latency=None):
    devs = tuple(dataclasses.replace(d, **{k: v for k, v in (("bandwidth_bps", bandwidth), ("latency_s", latency))
                                           if v is not None}) for d in cl.devices)
    return dataclasses.replace(cl, devices=devs)


def test_one_device_takes_exactly_its_compute():
    """No waits and nothing sent; the step is its ops, which add up to the
    layers priced whole within what fusing a pool into a conv changes."""
    plan = tiny_plan([GroupChoice(0, 6, [0, 4], [0, 4], [0])], 1, batch=4)
    res = simulate(plan, uniform_cluster(RPI3, 1, threads=1))
    program = plan["program"]
    whole = sum(layer_seconds(RPI3, l, l["out_shape"][1] * l["out_shape"][2], 4, 4, d)
                for l in program for d in ("forward", "backward"))
    whole += update_seconds(RPI3, param_count(program), 4)
    assert res.idle_s[0] == pytest.approx(0, abs=1e-12) and res.sent_bytes == [0]
    assert res.busy_s[0] == pytest.approx(res.step_s)
    assert res.step_s == pytest.approx(whole, rel=0.25)


@pytest.mark.parametrize("choices, n", [
    ([GroupChoice(0, 2, [0, 8, 16], [0, 16], [0, 1]), GroupChoice(3, 6, [0, 2, 4], [0, 2, 4], [0, 1, 2, 3])], 4),
    ([GroupChoice(0, 6, [0, 4], [0, 1, 2, 4], [2, 0, 1])], 3),
])
def test_bytes_sent_match_the_plan_and_busy_plus_idle_is_the_step(choices, n):
    """The simulator's rounds (its own replay of the ring and the all-gathers)
    send what the plan's accounting says, per device."""
    plan = tiny_plan(choices, n)
    res = simulate(plan, uniform_cluster(RPI3, n))
    msgs, coll = bytes_sent(plan)
    assert any(algo == "ring" for b in plan["buckets"] for algo in b["reduce"].values())
    assert res.sent_bytes == [m + c for m, c in zip(msgs, coll)]
    for b, i in zip(res.busy_s, res.idle_s):
        assert b + i == pytest.approx(res.step_s) and i >= -1e-12


def test_latency_and_bandwidth_slow_the_step_down_and_waits_appear():
    plan = tiny_plan([GroupChoice(0, 6, [0, 2, 4], [0, 4], [0, 1])], 2, batch=8)
    base = uniform_cluster(RPI3, 2)
    ideal = simulate(plan, with_link(base, bandwidth=1e15, latency=0.0))
    slow = simulate(plan, with_link(base, bandwidth=1e6, latency=0.0))
    laggy = simulate(plan, with_link(base, bandwidth=1e15, latency=0.01))
    assert ideal.step_s < slow.step_s and ideal.step_s < laggy.step_s
    # every message and all-gather round crosses at least one latency on the critical path
    assert laggy.step_s - ideal.step_s >= 0.01 * 3
    assert any(e.kind == "wait" for e in slow.events)


def with_jitter(cl, jitter, call_s=0.0):
    return dataclasses.replace(cl, devices=tuple(
        dataclasses.replace(d, profile=dataclasses.replace(d.profile, jitter=jitter, jitter_call_s=call_s))
        for d in cl.devices))


def test_jitter_prices_the_waits_at_barriers_between_devices():
    """Devices whose calls vary wait for each other at every barrier (a
    batch-norm all-gather, a halo): on a plan whose two devices compute in
    step between barriers, the expected step is longer than at the prices,
    the more the more they vary, and the same every time (seeded); one
    device waits for nobody, and keeps its priced step; busy seconds and
    the timeline stay those at the prices; on a plan whose links bind
    (where the order of messages that start together moves the step either
    way) the prices' step stays the replay without jitter."""
    two = tiny_plan([GroupChoice(0, 6, [0, 2, 4], [0, 4], [0, 1])], 2, batch=8)
    base = uniform_cluster(RPI3, 2)
    priced = simulate(two, base)
    assert priced.priced_s == priced.step_s
    steps = {}
    for jitter in (0.05, 0.1, 0.2):
        res = simulate(two, with_jitter(base, jitter))
        assert res.priced_s == pytest.approx(priced.step_s) and res.busy_s == pytest.approx(priced.busy_s)
        assert [e.end for e in res.events] == pytest.approx([e.end for e in priced.events])
        assert res.step_s == simulate(two, with_jitter(base, jitter)).step_s
        steps[jitter] = res.step_s - priced.step_s
        assert steps[jitter] > 0, jitter
        assert all(i == pytest.approx(res.step_s - b) for b, i in zip(res.busy_s, res.idle_s))
    assert steps[0.05] < steps[0.1] < steps[0.2]
    assert simulate(two, with_jitter(base, 0.2), samples=0).step_s == priced.step_s
    # measured on calls far shorter than this plan's ops, the spread shrinks on them, and the waits with it;
    # on far longer ones it grows (to twice at most)
    ops = sorted(e.end - e.start for e in priced.events if e.kind in ("forward", "backward"))
    typical = ops[len(ops) // 2]
    shorter, same, longer = (simulate(two, with_jitter(base, 0.1, call_s=typical * k)).step_s - priced.step_s
                             for k in (1 / 256, 1, 256))
    assert 0 < shorter < steps[0.05] * 1.5 and shorter < same < longer and steps[0.1] < longer <= steps[0.2] * 1.05
    four = tiny_plan([GroupChoice(0, 2, [0, 8, 16], [0, 16], [0, 1]), GroupChoice(3, 6, [0, 2, 4], [0, 2, 4],
                                                                                [0, 1, 2, 3])], 4)
    bound = simulate(four, uniform_cluster(RPI3, 4))
    jittered = simulate(four, with_jitter(uniform_cluster(RPI3, 4), 0.12))
    assert jittered.priced_s == bound.step_s and jittered.busy_s == bound.busy_s
    assert jittered.step_s == simulate(four, with_jitter(uniform_cluster(RPI3, 4), 0.12)).step_s > 0
    one = tiny_plan([GroupChoice(0, 6, [0, 4], [0, 4], [0])], 1, batch=8)
    assert simulate(one, with_jitter(uniform_cluster(RPI3, 1), 0.2)).step_s == simulate(one, uniform_cluster(
        RPI3, 1)).step_s


def test_jittered_ops_keep_their_price_on_average():
    """The draws around each op's price have mean 1 and the profile's spread
    (lognormal: never negative); only compute ops are drawn."""
    import numpy as np
    from tilec.inspect.simulate import _jittered
    actions = [("compute", 2.0, "forward", "op")] * 20000 + [("recv", "key")]
    (rank, thread, drawn), = _jittered([(0, 0, actions)], [(0.15, 0.0)],
                                       [np.random.default_rng(1).standard_normal(len(actions))])
    factors = np.array([a[1] / 2.0 for a in drawn[:-1]])
    assert (rank, thread, drawn[-1]) == (0, 0, ("recv", "key"))
    assert factors.min() > 0 and factors.mean() == pytest.approx(1.0, abs=0.005)
    assert factors.std() == pytest.approx(0.15, rel=0.02)
    # the compute ops take the normals in their order, whatever lies between them
    z = np.random.default_rng(2).standard_normal(5)
    mixed = [("compute", 1.0, "forward", "a"), ("send", "k1"), ("compute", 2.0, "forward", "b"), ("recv", "k2"),
             ("compute", 3.0, "backward", "c")]
    (_, _, drawn), = _jittered([(0, 0, mixed)], [(0.15, 0.0)], [z])
    sigma = np.sqrt(np.log1p(0.15 ** 2))
    assert [a[1] for a in drawn if a[0] == "compute"] == pytest.approx(
        [t * np.exp(sigma * z[k] - sigma ** 2 / 2) for k, t in enumerate((1.0, 2.0, 3.0))], rel=1e-12)
    assert [a for a in drawn if a[0] != "compute"] == [("send", "k1"), ("recv", "k2")]
    # measured on calls 16 times shorter than these: half the spread (16 ** -0.25)
    (_, _, drawn), = _jittered([(0, 0, actions)], [(0.15, 2.0 / 16)],
                               [np.random.default_rng(1).standard_normal(len(actions))])
    factors = np.array([a[1] / 2.0 for a in drawn[:-1]])
    assert factors.mean() == pytest.approx(1.0, abs=0.003) and factors.std() == pytest.approx(0.075, rel=0.02)


def test_an_ops_spread_follows_its_length():
    """A call k times longer than those the jitter was measured on varies
    k ** -0.25 as much (at most twice the measured spread, for the
    shortest); without the measured calls' length, every op takes the
    spread as it is."""
    from tilec.inspect.simulate import JITTER_EXPONENT, JITTER_SCALE_MAX, op_spread
    assert JITTER_EXPONENT == 0.25 and JITTER_SCALE_MAX == 2.0
    assert op_spread(0.12, 8e-3, 8e-3) == pytest.approx(0.12)
    assert op_spread(0.12, 8e-3, 8e-3 * 16) == pytest.approx(0.06)
    assert op_spread(0.12, 8e-3, 8e-3 / 16) == pytest.approx(0.24)
    assert op_spread(0.12, 8e-3, 8e-3 / 1000) == pytest.approx(0.24)
    assert op_spread(0.12, 0.0, 5.0) == op_spread(0.12, 0.0, 1e-6) == 0.12
    assert op_spread(0.0, 8e-3, 1e-3) == 0.0


def test_step_jitter_is_what_varies_step_to_step_not_between_tiles():
    """``tilec profile``'s jitter from two workers' traced steps: the spread
    of each kernel call's time step to step, whatever one rank's tile costs
    more than the other's every step (twice as much here), pooled over the
    kernel calls long enough to time (neither sends nor a conv's forward in
    row pieces)."""
    import numpy as np
    from tilec.profile_calibrate import JITTER_MIN_S, jitter_call_seconds, step_jitter
    ops = [{"op": "conv_fwd", "group": 0, "unit": 0}, {"op": "epi_fwd", "group": 0, "unit": 0},
           {"op": "send", "msg": 3}, {"op": "conv_fwd", "group": 1, "unit": 0, "rows": [0, 4]},
           {"op": "conv_bwd", "group": 0, "unit": 0}, {"op": "epi_bwd", "group": 0, "unit": 0}]
    plan = {"schedule": [ops, ops]}
    rng = np.random.default_rng(0)
    price = {0: 5e-3, 1: 1e-3, 2: 3e-3, 3: 4e-3, 4: 9e-3, 5: JITTER_MIN_S / 2}

    def series(spread, slower, steps=400, noisy=(0, 1, 4), scale=1.0):
        sigma = np.sqrt(np.log1p(spread ** 2))  # a lognormal of that spread, as the simulator draws
        out = {}
        for rank in (0, 1):
            out[rank] = {i: list(scale * p * (slower if rank else 1.0) * (np.exp(
                sigma * rng.standard_normal(steps) - sigma ** 2 / 2) if i in noisy else np.ones(steps)))
                for i, p in price.items()}
            # what is left out varies wildly: the send, the conv in row pieces, the call too short to time
            for i, (low, high) in ((2, (0.2, 5.0)), (3, (0.2, 5.0)), (5, (0.5, 1.5))):
                out[rank][i] = list(scale * price[i] * rng.uniform(low, high, steps))
        return out

    for spread in (0.05, 0.12):
        assert step_jitter(plan, series(spread, 1.0)) == pytest.approx(spread, rel=0.08)
        assert step_jitter(plan, series(spread, 2.0)) == pytest.approx(spread, rel=0.08)  # rank 1's tile is larger
    assert step_jitter(plan, series(0.0, 1.3)) == pytest.approx(0.0, abs=1e-9)
    # a machine so fast (or a map so small) that no call lasts JITTER_MIN_S: the longer half of them (0 and 4,
    # both noisy) still give it, where the CI's quick profile once found none and no jitter at all
    fast = series(0.1, 1.0, scale=1 / 25)
    assert max(np.mean(times) for times in fast[0].values()) < JITTER_MIN_S
    assert step_jitter(plan, fast) == pytest.approx(0.1, rel=0.1)
    assert jitter_call_seconds(plan, fast) == pytest.approx(
        (sum(price[i] for i in (0, 4)) / sum(price[i] ** 0.5 for i in (0, 4))) ** 2 / 25, rel=0.02)
    assert step_jitter(plan, {0: series(0.1, 1.0)[0]}) is None
    assert step_jitter(plan, series(0.1, 1.0, steps=2)) is None
    # the length of call it holds for: the one whose spread, falling as a call's length to the -1/4, is the
    # pool's of the calls it pooled (0, 1 and 4; each weighted by its time)
    weighted = (sum(price[i] for i in (0, 1, 4)) / sum(price[i] ** 0.5 for i in (0, 1, 4))) ** 2
    assert price[1] < weighted < sum(price[i] ** 2 for i in (0, 1, 4)) / sum(price[i] for i in (0, 1, 4))
    assert jitter_call_seconds(plan, series(0.1, 1.0)) == pytest.approx(weighted, rel=0.02)
    assert jitter_call_seconds(plan, series(0.1, 2.0)) == pytest.approx(1.5 * weighted, rel=0.02)
    assert jitter_call_seconds(plan, series(0.1, 1.0, steps=2)) is None


def test_local_workers_carry_shared_in_the_plans_cluster():
    """Whether devices are local workers sharing one machine (``shared``,
    which prices their compute at the machine's all-cores-busy speed) goes
    with the plan: ``tilec simulate`` reads the cluster back from it."""
    from tilec.cluster import cluster_from_json
    apart, shared = uniform_cluster(RPI3, 2, threads=2), uniform_cluster(RPI3, 2, threads=2, shared=True)
    assert shared.devices[0].to_json()["shared"] and not apart.devices[0].to_json()["shared"]
    for cluster in (apart, shared):
        back = cluster_from_json(json.loads(json.dumps(cluster.to_json())))
        assert [d.shared for d in back.devices] == [d.shared for d in cluster.devices]
        assert [d.compute_scale for d in back.devices] == [d.compute_scale for d in cluster.devices]
        assert [d.cores_taken for d in back.devices] == [d.cores_taken for d in cluster.devices]
    # whether their kernel threads take every core: then a message's CPU is the kernels'
    assert shared.devices[0].cores_taken and not uniform_cluster(RPI3, 2, threads=1, shared=True).devices[0].cores_taken
    assert apart.devices[0].cores_taken is False and uniform_cluster(RPI3, 2).devices[0].cores_taken


def with_message_cpu(cl, per_message, per_byte, cores_taken=True):
    return dataclasses.replace(cl, devices=tuple(
        dataclasses.replace(d, cores_taken=cores_taken, profile=dataclasses.replace(
            d.profile, message_cpu_s=per_message, message_cpu_s_per_byte=per_byte)) for d in cl.devices))


def test_messages_take_cpu_from_the_kernels_only_where_they_take_every_core():
    """Each message sent or received costs its end ``per_message + bytes *
    per_byte`` of CPU where the kernel threads take every core: the busy
    seconds grow by exactly that over all messages, the step with them; the
    communication thread's share is taken from the main thread too."""
    plan = tiny_plan([GroupChoice(0, 6, [0, 2, 4], [0, 4], [0, 1])], 2, batch=2)
    base = with_jitter(uniform_cluster(RPI3, 2), 0.0)
    free = simulate(plan, with_message_cpu(base, 1e-4, 1e-8, cores_taken=False))
    assert free.step_s == simulate(plan, base).step_s and not any(e.kind == "transport" for e in free.events)
    taken = simulate(plan, with_message_cpu(base, 1e-4, 1e-8))
    for rank in range(2):
        sends = [e for e in taken.events if e.device == rank and e.kind == "transport" and e.label.startswith("send")]
        recvs = [e for e in taken.events if e.device == rank and e.kind == "transport"
                 and e.label.startswith("receive")]
        assert len(sends) == len(recvs) > 0  # two devices: every message one way has its twin the other way
        expected = len(sends + recvs) * 1e-4 + 2 * taken.sent_bytes[rank] * 1e-8
        assert taken.busy_s[rank] - free.busy_s[rank] == pytest.approx(expected, rel=1e-9)
        # the gradient buckets' messages (the communication thread's) are taken from the main thread's next
        # compute op, those after its last none (it waits for them on a free core)
        comm = sum(e.end - e.start for e in sends + recvs if e.thread == 1)
        stolen = sum(e.end - e.start for e in taken.events if e.device == rank and e.thread == 0
                     and e.label == "the communication thread's messages")
        assert 0 < stolen <= comm + 1e-12
    assert taken.step_s > free.step_s


def test_the_cost_model_charges_a_messages_cpu_at_each_end():
    from tilec.cost.comm import allgather_seconds, exchange_seconds, ring_seconds
    base = with_link(uniform_cluster(RPI3, 3), bandwidth=1e9, latency=1e-4)
    taken = with_message_cpu(base, 2e-5, 3e-9)
    m = [[0, 1000, 0], [4000, 0, 2000], [0, 0, 0]]
    # device 1 sends two messages of 6000 bytes and receives one of 1000: the busiest end
    assert exchange_seconds(m, taken.devices) == pytest.approx(
        exchange_seconds(m, base.devices) + 3 * 2e-5 + 7000 * 3e-9)
    members = [0, 1, 2]
    assert allgather_seconds(900, members, taken.devices) == pytest.approx(
        allgather_seconds(900, members, base.devices) + 2 * 2 * (2e-5 + 900 * 3e-9))
    assert ring_seconds(900, members, taken.devices) == pytest.approx(
        ring_seconds(900, members, base.devices) + 4 * 2 * (2e-5 + 300 * 3e-9))


def test_simulator_and_cost_model_agree_on_optimised_plans():
    graph = load_model("yolov2-tiny")
    for n, batch in ((1, 1), (3, 2), (4, 4)):
        cl = uniform_cluster(RPI3, n)
        plan = compile_plan(graph, cluster=cl, batch=batch)
        res = simulate(plan, cl)
        assert res.step_s == pytest.approx(plan["predicted"]["step_s"], rel=0.25), (n, batch)


def test_a_missing_message_is_reported_as_a_deadlock():
    plan = tiny_plan([GroupChoice(0, 2, [0, 8, 16], [0, 16], [0, 1]), GroupChoice(3, 6, [0, 4], [0, 4], [1])], 2)
    plan = dict(plan)
    # device 1 waits for a gradient of layer 5 that device 0's schedule never sends
    k = len(plan["messages"])
    plan["messages"] = plan["messages"] + [{"phase": "backward", "group": 0, "tensor": 5, "sender": 0,
                                            "receiver": 1, "rows": [0, 1], "cols": [0, 1], "bytes": 64}]
    plan["schedule"] = [list(ops) for ops in plan["schedule"]]
    plan["schedule"][1].insert(len(plan["schedule"][1]) - 1, {"op": "recv", "msg": k})
    with pytest.raises(SimulationError, match="device 1 waits for .* that never comes"):
        simulate(plan, uniform_cluster(RPI3, 2))


def test_timeline_png(tmp_path):
    plan = tiny_plan([GroupChoice(0, 6, [0, 2, 4], [0, 4], [0, 1])], 2)
    res = simulate(plan, uniform_cluster(RPI3, 2))
    path = timeline_png(res, ["a", "b"], tmp_path / "t.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_compile_then_simulate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TILEC_PROFILE", "rpi3b")
    (tmp_path / "c.yaml").write_text("devices:\n  - {name: a, profile: rpi3b}\n  - {name: b, profile: rpi4}\n")
    out = tmp_path / "plan"
    assert main(["compile", "yolov2-tiny", "--cluster", str(tmp_path / "c.yaml"), "--batch", "2", "-o", str(out)]) == 0
    assert {"plan.json", "report.txt", "plan.dot"} <= {p.name for p in out.iterdir()}
    report = (out / "report.txt").read_text()
    assert "predicted step" in report and "solver:" in report and "status OPTIMAL" in report
    capsys.readouterr()
    assert main(["simulate", str(out), "--cluster", str(tmp_path / "c.yaml"),
                 "--timeline", str(tmp_path / "t.png")]) == 0
    text = capsys.readouterr().out
    assert "simulated step" in text and "speedup over one core of rpi3b" in text and (tmp_path / "t.png").exists()
    assert main(["simulate", str(out)]) == 0  # default: the plan's own cluster
    assert "simulated step" in capsys.readouterr().out
    assert main(["simulate", str(out), "--json", "--trace", str(tmp_path / "t.json")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["step_s"] > 0 and data["one_core_s"] > data["step_s"] > 0
    assert [d["profile"] for d in data["devices"]] == ["rpi3b", "rpi4"]
    assert all(d["peak_bytes"] > d["memory"]["state"] > 0 for d in data["devices"])
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1}
    # a cluster file naming the devices in another order would pair them with the wrong ranks
    (tmp_path / "swapped.yaml").write_text("devices:\n  - {name: b, profile: rpi4}\n  - {name: a, profile: rpi3b}\n")
    assert main(["simulate", str(out), "--cluster", str(tmp_path / "swapped.yaml")]) == 1
    assert "devices ['b', 'a'] in that order, the plan's are ['a', 'b']" in capsys.readouterr().err


def test_cli_reports_a_bad_cluster_in_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("devices:\n  - {name: a, profile: rpi3b, memory_mb: lots}\n")
    assert main(["compile", "tiny", "--cluster", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "device 0 (a): memory_mb must be a positive number" in err
