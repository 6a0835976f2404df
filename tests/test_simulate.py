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
