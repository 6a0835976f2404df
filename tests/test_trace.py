"""``tilec train --trace``: every op of every rank's schedule, every step, in order."""
import json
from collections import defaultdict

from tilec.cli import main
from tilec_runtime.planfile import read_plan
from tilec_runtime.trace import op_name


def test_the_trace_holds_every_scheduled_op_of_every_rank(tmp_path, capsys):
    plan_dir, trace = tmp_path / "plan", tmp_path / "trace.json"
    # a tiled prefix and a tail split by channels: every kind of op the schedule has
    assert main(["compile", "tiny", "--devices", "2", "--tile-layers", "4", "--tail", "channels", "--batch", "2",
                 "-o", str(plan_dir)]) == 0
    plan = read_plan(plan_dir)
    kinds = {op["op"] for ops in plan["schedule"] for op in ops}
    assert {"conv_fwd", "bn_stats", "send", "recv", "chan_fwd", "chan_reduce", "grad_start"} <= kinds
    assert main(["train", "tiny", "--plan", str(plan_dir), "--steps", "3", "--trace", str(trace)]) == 0
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    schedule = defaultdict(list)
    for e in sorted(events, key=lambda e: e["ts"]):
        if e["tid"] == 0:
            schedule[(e["pid"], e["args"]["step"])].append(e["name"])
    assert {step for _, step in schedule} == {0, 1, 2}  # (steps counted from 0, as in the metrics)
    for (rank, step), names in schedule.items():
        assert names == [op_name(op, plan["messages"]) for op in plan["schedule"][rank]], (rank, step)
    # each op's thread clock: its thread's CPU time in it, never longer than the op (0.1 us rounding aside)
    assert all(0 <= e["tdur"] <= e["dur"] * 1.01 + 20 and e["tts"] >= 0 for e in events)
    # the gradient buckets that are all-reduced run on each rank's communication thread
    reduced = [b for b, bucket in enumerate(plan["buckets"]) if bucket["reduce"]]
    assert reduced and all(any(e["tid"] == 1 and e["pid"] == r for e in events) for r in (0, 1))
