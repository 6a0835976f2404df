"""The planner on Raspberry Pi 3 clusters: simulated speedup, memory, and
what the optimiser gains over fixed grouping, side by side in one run.

Models: YOLOv2 at 608x608 with its first 16 layers tiled and the rest (the
"tail") on rank 0, and YOLOv2-tiny at 416x416 (its whole spatial prefix,
15 layers, tiled); float32; 1-6 devices with the shipped ``rpi3b``
profile (4x Cortex-A53, 750 MB usable, 94 Mbit/s Ethernet); batch 1, 2, 4, 8.

For each configuration:

- ``optimiser``: ``tilec compile`` (cost model + CP-SAT); its compile time
  is the wall time of the whole compile (candidates, solve, plan), or of
  the compile that ends with the explained error when nothing fits;
- ``each layer`` / ``one group``: one group per layer, or one group for the
  whole tiled prefix, on the default (most square) even grid of all the
  devices, the paper's fixed-grid baselines;
- every plan is replayed by the simulator (``tilec simulate``) on the
  same profiles: speedup = one Pi 3 core running the whole step on whole
  maps (the profile's 4-core time x its multicore speedup) / the simulated
  step; the gains are simulated baseline step / simulated optimiser step.
- tiled layers' speedup: the same for the tiled layers alone (the cost
  model's step less the tail), the part the paper distributes;
- memory: the cost model's peak per device (MB): rank 0 (which also holds
  the tail) and the largest other device. Where no plan fits 750 MB the
  optimiser's error (the smallest memory that would work) is recorded and
  the plan is made again with memory unlimited, marked ``*``.

The paper (Rama et al., 2024) reports 2x-15x for YOLOv2's first 16 layers
over one core, up to 8x for YOLOv2-tiny, and up to 1.5x from grouping.

    python benchmarks/planner.py [--json planner.json] [--devices 1-6] [--batches 1,2,4,8] [--time-limit 3]
"""
import argparse
import dataclasses
import json
import platform
import time

from tilec.cluster import uniform_cluster
from tilec.compile import DEFAULT_TIME_LIMIT, plan_with_solution
from tilec.cost.model import CostModel
from tilec.frontend.models import load_model
from tilec.inspect.simulate import simulate
from tilec.plan.build import default_grid
from tilec.profiles import load_profile
from tilec.solve import InfeasibleError

MODELS = (("yolov2", 16, "YOLOv2 608, 16 layers tiled + tail"), ("yolov2-tiny", None, "YOLOv2-tiny 416"))


def unlimited(cl):
    return dataclasses.replace(cl, devices=tuple(dataclasses.replace(d, memory_bytes=10 ** 13) for d in cl.devices))


def run_one(graph, prefix, n, batch, profile, time_limit):
    cl = uniform_cluster(profile, n)
    rec = {"devices": n, "batch": batch}
    t0 = time.perf_counter()
    try:
        plan, sol, model = plan_with_solution(graph, cluster=cl, batch=batch, tiled_prefix=prefix,
                                              time_limit=time_limit)
        rec["fits"] = True
        rec["compile_s"] = time.perf_counter() - t0
    except InfeasibleError as err:  # the compile a user runs ends here, with the explanation
        rec["compile_s"] = time.perf_counter() - t0
        rec["fits"] = False
        rec["needs_mb"] = round(max(getattr(err, "smallest_bytes", [0])) / 1e6)
        rec["error"] = str(err)
        cl = unlimited(cl)
        plan, sol, model = plan_with_solution(graph, cluster=cl, batch=batch, tiled_prefix=prefix,
                                              time_limit=time_limit)
    rec["solver"] = sol.stats()
    rec["predicted_s"] = plan["predicted"]["step_s"]
    rec["simulated_s"] = simulate(plan, cl, keep_events=False).step_s
    mem = [d["memory_bytes"] for d in plan["predicted"]["per_device"]]
    rec["memory_mb"] = [round(m / 1e6, 1) for m in mem]
    rec["groups"] = [[g["layers"], f"{len(g['row_splits']) - 1}x{len(g['col_splits']) - 1}",
                      [t["device"] for t in g["tiles"]], g["recompute"]]
                     for g in plan["groups"] if g["kind"] == "tiled"]
    cm = CostModel(plan["program"], cl, batch, 4, prefix=prefix)
    one_core = cm.one_core_seconds()
    rec["one_core_s"] = one_core
    rec["speedup"] = one_core / rec["simulated_s"]
    # the tiled layers alone (the paper's figure): the cost model's share of the step without the tail
    tiled_s = plan["predicted"]["step_s"] - plan["predicted"]["tail_s"]
    rec["tiled_speedup"] = cm.one_core_seconds(layers=plan["program"][:cm.prefix]) / tiled_s if cm.prefix else None
    grid = default_grid(n)
    for label, groups in (("each_layer", "each"), ("one_group", "all")):
        base, _, _ = plan_with_solution(graph, cluster=cl, batch=batch, tiled_prefix=prefix,
                                        grid=f"{grid[0]}x{grid[1]}", groups=groups)
        sim = simulate(base, cl, keep_events=False).step_s
        peak = max(d["memory_bytes"] for d in base["predicted"]["per_device"])
        rec[label] = {"grid": f"{grid[0]}x{grid[1]}", "simulated_s": sim, "predicted_s": base["predicted"]["step_s"],
                      "memory_mb": round(peak / 1e6, 1), "fits": peak <= profile.memory_bytes or not rec["fits"],
                      "gain": sim / rec["simulated_s"],
                      "predicted_gain": base["predicted"]["step_s"] / rec["predicted_s"]}
    return rec


def table(title, rows):
    lines = [f"### {title}", "",
             "| devices | batch | simulated step s | speedup vs 1 core | tiled layers' speedup | MB rank 0 / max other "
             "| gain vs each layer | gain vs one group | compile s | solver |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        mem = r["memory_mb"]
        others = f"{max(mem[1:]):.0f}" if len(mem) > 1 else "-"
        star = "" if r["fits"] else f" * (needs {r['needs_mb']} MB)"
        st = r["solver"]
        solver = f"{st['status']} gap {100 * st['gap']:.1f}%"
        gains = [f"{r[k]['gain']:.2f}x{'' if r[k]['fits'] else ' †'}" for k in ("each_layer", "one_group")]
        tiled = f"{r['tiled_speedup']:.2f}x" if r["tiled_speedup"] else "-"
        lines.append(f"| {r['devices']} | {r['batch']} | {r['simulated_s']:.2f} | {r['speedup']:.2f}x | {tiled} | "
                     f"{mem[0]:.0f} / {others}{star} | {gains[0]} | {gains[1]} | {r['compile_s']:.1f} | {solver} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default="planner.json")
    ap.add_argument("--devices", default="1-6")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT)
    ap.add_argument("--profile", default="rpi3b")
    args = ap.parse_args()
    lo, _, hi = args.devices.partition("-")
    counts = list(range(int(lo), int(hi or lo) + 1))
    batches = [int(b) for b in args.batches.split(",")]
    profile = load_profile(args.profile)
    results = {"machine": platform.platform(), "profile": args.profile, "time_limit_s": args.time_limit, "models": {}}
    out = []
    for name, prefix, title in MODELS:
        graph = load_model(name)
        rows = []
        for n in counts:
            for batch in batches:
                rows.append(run_one(graph, prefix, n, batch, profile, args.time_limit))
                r = rows[-1]
                print(f"{name} n={n} b={batch}: {r['simulated_s']:.2f} s, {r['speedup']:.2f}x, "
                      f"compile {r['compile_s']:.1f} s", flush=True)
        results["models"][name] = {"title": title, "tiled_prefix": prefix, "rows": rows}
        out.append(table(f"{title} on {args.profile} (simulated)", rows))
    print()
    print("\n\n".join(out))
    print("\n`*`: no plan fits the profile's memory; the row is the plan made with memory unlimited, and in "
          "parentheses the optimiser's smallest memory per device that would work. `†`: the baseline does not fit "
          "the memory the optimiser's plan had to fit. Tiled layers' speedup: one core running the tiled layers "
          "vs the cost model's time for them (the step without the tail on rank 0).")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
