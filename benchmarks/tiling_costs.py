"""What fused tiling costs and saves, before any optimiser: the numbers the
planner trades against each other.

For a model (default: yolov2-tiny at 416x416), batch sizes and device counts,
two extreme groupings of the spatial prefix: (a) one group over all of it,
(b) one group per layer; each with the default (most square) even grid. Per
device: memory the runtime allocates (max over devices, and vs one
device), redundant halo FLOPs, and bytes sent per step (tile exchanges and
all-reduces). Pure plan arithmetic: nothing is timed.

    python benchmarks/tiling_costs.py [--model yolov2-tiny] [--json out.json]
"""
import argparse
import json

from tilec.compile import compile_plan
from tilec.frontend.models import load_model
from tilec.cost.traffic import bytes_sent
from tilec.inspect.plan_report import device_bytes, halo_overhead


def measure(graph, devices, batch, groups):
    plan = compile_plan(graph, devices=devices, batch=batch, groups=groups)
    mem = device_bytes(plan)
    msgs, coll = bytes_sent(plan)
    return {"devices": devices, "batch": batch, "groups": groups, "n_groups": len(plan["groups"]) - 1,
            "act_mb_max": max(mem) / 1e6, "halo_pct": 100 * halo_overhead(plan),
            "sent_mb_max": max(m + c for m, c in zip(msgs, coll)) / 1e6,
            "tiles_mb_max": max(msgs) / 1e6, "allreduce_mb_max": max(coll) / 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="yolov2-tiny")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--devices", default="2,4,6")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    graph = load_model(args.model)
    rows = []
    for batch in map(int, args.batches.split(",")):
        one = max(device_bytes(compile_plan(graph, devices=1, batch=batch, groups="all")))
        for groups in ("all", "each"):
            for n in map(int, args.devices.split(",")):
                r = measure(graph, n, batch, groups)
                r["act_vs_one"] = r["act_mb_max"] * 1e6 / one
                r["one_device_act_mb"] = one / 1e6
                rows.append(r)
    print(f"{args.model}, float32, even grids; memory = activations kept for backward, max over devices\n")
    print("| batch | grouping | devices | act. MB / device | vs 1 device | halo FLOPs | sent MB/step (tiles + all-reduce) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = "(a) one group" if r["groups"] == "all" else "(b) group per layer"
        print(f"| {r['batch']} | {name} | {r['devices']} | {r['act_mb_max']:.1f} (1 dev: {r['one_device_act_mb']:.1f}) "
              f"| {r['act_vs_one']:.2f}x | +{r['halo_pct']:.1f}% | {r['sent_mb_max']:.1f} "
              f"({r['tiles_mb_max']:.1f} + {r['allreduce_mb_max']:.1f}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
