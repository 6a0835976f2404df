"""The paper's table: speedup over one core and memory per device for YOLOv2
(608x608) and YOLOv2-tiny (416x416), batch 1/2/4/8, next to the ranges
Rama et al. (2024) report: 2x-15x speedup, up to 8x less memory per device,
up to 1.5x from layer grouping.

Two sources, side by side:

- **simulated**: 1-6 Raspberry Pi 3 (the shipped ``rpi3b`` profile) on
  100 Mbit/s Ethernet. For each (model, batch, N) the optimiser's plan
  (``tilec.compile.plan_with_solution``: cost model + CP-SAT, the Pi's memory
  as the limit; it chooses where tiling ends and how each tail layer runs)
  is replayed by the simulator (``tilec.inspect.simulate``). Speedup = one
  Pi core running the whole step on whole maps (the cost model's
  ``one_core_seconds``) / the simulated step, and one whole Pi (all its
  cores, its memory unlimited) / the simulated step. Memory per device =
  the largest per-device peak as ``tilec simulate --json`` reports it (the
  runtime's own memory plan); the reduction is one device's (its memory
  unlimited) over it. Grouping = the simulated step of the same devices
  with every tiled layer its own group on an even grid (the same cut and
  tail) / the optimiser's. A plan that fits no Pi's memory is shown as
  "does not fit" with the memory its leanest plan needs; grouping is
  compared only where the layer-by-layer plan fits as well.
- **measured**: this machine, 1 and 2 local worker processes (one BLAS
  thread each, over loopback: ``tilec_runtime.launch.train_local``), the
  plan ``tilec compile --devices N`` makes (this machine's profile), the
  generated kernels (or ``--kernels reference``: numpy), a generated batch,
  float32.
  Step time is rank 0's median over the steps after the first; memory is
  each worker's peak resident set during a step (the whole process,
  Python and numpy included), next to the cost model's prediction. The
  machine's usable parallelism (two single-threaded matmul loops side by
  side / one alone, ``benchmarks/cluster.py``) is measured in the same run:
  read the 2-worker speedup against it.

    python benchmarks/paper_table.py [--out paper_table] [--batches 1,2,4,8]
        [--measure-batches 1,2] [--steps 3] [--max-devices 6] [--profile rpi3b] [--kernels generated]
        [--time-limit 6] [--no-measure] [--from-json OUT.json]

Writes OUT.md (the tables), OUT.png (speedup and memory against devices)
and OUT.json (every number).
"""
import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODELS = (("yolov2", "YOLOv2 608"), ("yolov2-tiny", "YOLOv2-tiny 416"))
PAPER = {"speedup": (2.0, 15.0), "memory": 8.0, "grouping": 1.5}


# -- simulated Raspberry Pi 3 clusters ------------------------------------------------------


def tail_of(plan):
    """[(first, last, "one" | "channels", devices)] of a plan's tail groups."""
    from tilec_runtime.program import members_of
    return [(g["layers"][0], g["layers"][1], g["mode"], members_of(g)) for g in plan["groups"] if g["kind"] == "tail"]


def layer_by_layer(plan, graph, cluster):
    """The same plan with every tiled layer its own group on an even grid (same cut, same tail)."""
    from tilec.analysis.tail import TailChoice
    from tilec.plan.build import build_plan, default_grid, even_choices
    cut = next(g["layers"][0] for g in plan["groups"] if g["kind"] == "tail")
    choices = even_choices(plan["program"], [(i, i) for i in range(cut)], default_grid(len(cluster.devices)),
                           len(cluster.devices))
    tail = [TailChoice(f, l, mode, devs) for f, l, mode, devs in tail_of(plan)]
    return build_plan(plan["program"], choices, model=graph.name, batch=plan["batch"], dtype=plan["dtype"],
                      devices=cluster.names, optimizer=plan["optimizer"], prefix=cut, tail=tail,
                      threads=cluster.threads)


def simulated_cell(graph, batch, n, profile, time_limit):
    """Speedup (over one core and over one board), memory and grouping gain of ``n`` copies of ``profile``."""
    from tilec.cluster import uniform_cluster
    from tilec.compile import plan_with_solution
    from tilec.cost.memory import plan_peaks
    from tilec.errors import PlanError
    from tilec.inspect.simulate import simulate

    cluster = uniform_cluster(profile, n)
    t0 = time.perf_counter()
    try:
        plan, _, model = plan_with_solution(graph, devices=n, cluster=cluster, batch=batch, time_limit=time_limit)
    except PlanError as exc:
        needed = getattr(exc, "needed_bytes", None)
        return {"devices": n, "fits": False, "why": str(exc).splitlines()[0], "needed_bytes": needed,
                "compile_s": time.perf_counter() - t0}
    compile_s = time.perf_counter() - t0
    step = simulate(plan, cluster, keep_events=False).step_s
    one_core = model.one_core_seconds()
    peaks = plan_peaks(plan, cluster)
    # layer by layer, the same cut and tail: compared only where it fits too (else the optimiser's
    # plan may be slower because it recomputes to fit, and the comparison says nothing about grouping)
    each = layer_by_layer(plan, graph, cluster)
    each_fits = all(p <= d.memory_bytes for p, d in zip(plan_peaks(each, cluster), cluster.devices))
    step_each = simulate(each, cluster, keep_events=False).step_s
    # plan_with_solution raised PlanError above unless every device's peak_bytes fits its memory
    return {"devices": n, "fits": True, "step_s": step, "one_core_s": one_core,
            "speedup": one_core / step, "memory_bytes": max(peaks), "peak_bytes": peaks, "compile_s": compile_s,
            "step_each_s": step_each, "each_fits": each_fits, "grouping": step_each / step if each_fits else None,
            "groups": [g["layers"] for g in plan["groups"] if g["kind"] == "tiled"], "tail": tail_of(plan)}


def one_board(graph, batch, profile, time_limit):
    """One whole board (all its cores), its memory unlimited: the step and its peak."""
    from tilec.cluster import uniform_cluster
    from tilec.compile import plan_with_solution
    from tilec.cost.memory import plan_peaks
    from tilec.inspect.simulate import simulate
    roomy = uniform_cluster(dataclasses.replace(profile, memory_bytes=1 << 50), 1)
    plan, _, _ = plan_with_solution(graph, devices=1, cluster=roomy, batch=batch, time_limit=time_limit)
    return simulate(plan, roomy, keep_events=False).step_s, plan_peaks(plan, roomy)[0]


def simulate_all(batches, max_devices, profile_name, time_limit, log):
    from tilec.frontend.models import load_model
    from tilec.profiles import load_profile
    profile = load_profile(profile_name)
    rows = []
    for name, label in MODELS:
        graph = load_model(name)
        for batch in batches:
            t0 = time.perf_counter()
            board_s, base = one_board(graph, batch, profile, time_limit)
            cells = [simulated_cell(graph, batch, n, profile, time_limit) for n in range(1, max_devices + 1)]
            for c in cells:
                if c["fits"]:
                    c["memory_reduction"] = base / c["memory_bytes"]
                    c["speedup_board"] = board_s / c["step_s"]
            rows.append({"model": name, "label": label, "batch": batch, "one_device_memory_bytes": base,
                         "one_board_s": board_s, "cells": cells})
            log(f"simulated {label} batch {batch}: {time.perf_counter() - t0:.1f} s")
    return {"profile": profile.name, "rows": rows}


# -- measured on this machine --------------------------------------------------------------


def measurable(name):
    """The model to measure, with its own loss (the workers take a [region]
    loss's box targets): (graph, note or None)."""
    from tilec.frontend.models import load_model
    return load_model(name), None


def measured_job(graph, devices, batch, steps, kernels):
    """(median step s, peak RSS per worker, predicted memory per device) of one local job."""
    from tilec.compile import compile_plan
    from tilec_runtime import data, launch, weights
    program = graph.to_program()
    plan = compile_plan(graph, devices=devices, batch=batch, dtype="float32")
    params, buffers = weights.init_params(program, 0, "float32")
    batches = data.generated_batches(program, batch, 0, "float32")
    records = []
    source = None
    if kernels == "generated":
        from tilec.codegen import generate
        generated = generate(("float32",))
        source = {"module": generated.module, "source": generated.text}
    launch.train_local(plan, params, buffers, batches, steps=steps, threads=1, on_metrics=records.append,
                       kernel_source=source)
    steady = records[1:] or records
    predicted = [d["memory_bytes"] for d in (plan.get("predicted") or {}).get("per_device", [])]
    return {"step_s": statistics.median(r[0]["step_s"] for r in steady),
            "peak_bytes": [max(r[d]["peak_bytes"] for r in steady) for d in range(devices)],
            "predicted_bytes": predicted}


def measure_all(batches, steps, kernels, log):
    from cluster import parallel_capacity
    capacity = parallel_capacity()
    log(f"usable parallelism of this machine: {capacity:.2f} (2.0 = two free cores)")
    rows = []
    for name, label in MODELS:
        graph, note = measurable(name)
        if note:
            log(f"{label}: measured with {note}")
        for batch in batches:
            row = {"model": name, "label": label, "batch": batch, "note": note}
            for n in (1, 2):
                t0 = time.perf_counter()
                row[f"w{n}"] = measured_job(graph, n, batch, steps, kernels)
                log(f"measured {label} batch {batch} on {n} worker(s): {row[f'w{n}']['step_s']:.2f} s/step "
                    f"({time.perf_counter() - t0:.0f} s)")
            row["speedup"] = row["w1"]["step_s"] / row["w2"]["step_s"]
            rows.append(row)
    return {"capacity": capacity, "kernels": kernels, "steps": steps, "rows": rows}


# -- output ----------------------------------------------------------------------------------


def _mb(v):
    return f"{v / 1e6:,.0f}"  # MB as tilec prints them (10^6 bytes)


def markdown(sim, meas, paper=PAPER):
    n_max = len(sim["rows"][0]["cells"])
    lines = [f"### Simulated: 1-{n_max} Raspberry Pi 3 (`{sim['profile']}` profile)", "",
             "Each cell: speedup over one Pi core, and over one whole Pi (its memory unlimited) / largest "
             "memory per device in MB, as `tilec simulate --json` reports it (reduction against one device, "
             "its memory unlimited). Grouping: simulated step with every tiled layer its own group (the same "
             "cut and tail) / the optimiser's groups, where that plan fits the Pi's memory too. A plan that "
             "does not fit shows the memory its leanest plan needs.", "",
             "| model | batch | " + " | ".join(f"{n} Pi" for n in range(1, n_max + 1)) + " | grouping |",
             "|---|---:|" + "---:|" * n_max + "---:|"]
    for row in sim["rows"]:
        cells = []
        for c in row["cells"]:
            if c["fits"]:
                cells.append(f"{c['speedup']:.1f}x, {c['speedup_board']:.1f}x board / {_mb(c['memory_bytes'])} "
                             f"({c['memory_reduction']:.1f}x)")
            else:
                need = c["needed_bytes"]
                cells.append(f"does not fit (needs {_mb(need)})" if need else "does not fit")
        gains = [c["grouping"] for c in row["cells"] if c["fits"] and c["devices"] > 1 and c["grouping"]]
        grouping = f"{min(gains):.2f}-{max(gains):.2f}x" if gains else "-"
        lines.append(f"| {row['label']} | {row['batch']} | " + " | ".join(cells) + f" | {grouping} |")
    fits = [c for row in sim["rows"] for c in row["cells"] if c["fits"]]
    multi = [c for c in fits if c["devices"] > 1]
    lines += ["", "### Against the paper", "",
              "| | paper (Rama et al. 2024) | tilec, simulated Pi 3 |", "|---|---|---|",
              f"| speedup over one core | {paper['speedup'][0]:g}x-{paper['speedup'][1]:g}x | "
              f"{min(c['speedup'] for c in multi):.1f}x-{max(c['speedup'] for c in multi):.1f}x |",
              f"| memory per device | up to {paper['memory']:g}x less | up to "
              f"{max(c['memory_reduction'] for c in multi):.1f}x less |",
              f"| layer grouping | up to {paper['grouping']:g}x | up to "
              f"{max((c['grouping'] for c in multi if c['grouping']), default=float('nan')):.2f}x |"]
    if meas:
        lines += ["", f"### Measured: this machine, 1 and 2 local workers ({meas['kernels']} kernels, one thread "
                      f"each; usable parallelism {meas['capacity']:.2f} of 2)", "",
                  "| model | batch | 1 worker s/step | 2 workers s/step | speedup | peak RSS MB 1 worker | "
                  "peak RSS MB per worker, 2 | predicted MB 1 / 2 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in meas["rows"]:
            w1, w2 = row["w1"], row["w2"]
            pred = " / ".join(_mb(max(r["predicted_bytes"])) if r["predicted_bytes"] else "-" for r in (w1, w2))
            label = row["label"] + (" *" if row.get("note") else "")
            lines.append(f"| {label} | {row['batch']} | {w1['step_s']:.2f} | {w2['step_s']:.2f} | "
                         f"{row['speedup']:.2f}x | {_mb(w1['peak_bytes'][0])} | "
                         f"{', '.join(_mb(b) for b in w2['peak_bytes'])} | {pred} |")
        notes = {row["note"] for row in meas["rows"] if row.get("note")}
        lines += [f"\n\\* {note}" for note in sorted(notes)]
    return "\n".join(lines) + "\n"


def plot(sim, meas, path, paper=PAPER):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"yolov2": "-", "yolov2-tiny": "--"}
    for row in sim["rows"]:
        fits = [c for c in row["cells"] if c["fits"]]
        if not fits:
            continue
        label = f"{row['label']}, batch {row['batch']}"
        ax_s.plot([c["devices"] for c in fits], [c["speedup"] for c in fits], styles[row["model"]], marker="o",
                  label=label)
        ax_m.plot([c["devices"] for c in fits], [c["memory_reduction"] for c in fits], styles[row["model"]],
                  marker="o", label=label)
    ax_s.axhspan(*paper["speedup"], color="0.9", zorder=0, label="paper's range")
    ax_m.axhline(paper["memory"], color="0.5", linestyle=":", label="paper: up to 8x")
    if meas:
        for row in meas["rows"]:
            ax_s.plot([2], [row["speedup"]], "k^", markersize=8)
        ax_s.plot([], [], "k^", label="measured on this machine: 2 workers over 1")
    ax_s.set(xlabel="Raspberry Pi 3 devices (simulated)", ylabel="speedup over one core",
             title="training step speedup")
    ax_m.set(xlabel="Raspberry Pi 3 devices (simulated)", ylabel="memory reduction per device",
             title="memory per device (one device / N devices)")
    for ax in (ax_s, ax_m):
        ax.set_xticks(range(1, len(sim["rows"][0]["cells"]) + 1))
    ax_s.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="paper_table", help="path prefix of the outputs (default ./paper_table)")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--measure-batches", default="1,2")
    ap.add_argument("--steps", type=int, default=3, help="steps per measured job (the first is dropped)")
    ap.add_argument("--max-devices", type=int, default=6)
    ap.add_argument("--profile", default="rpi3b")
    ap.add_argument("--kernels", choices=("generated", "reference"), default="generated")
    ap.add_argument("--time-limit", type=float, default=6.0, help="solver seconds per plan")
    ap.add_argument("--no-measure", action="store_true")
    ap.add_argument("--from-json", metavar="FILE", help="write the table and plot again from an earlier run's JSON")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        sim, meas = earlier["simulated"], earlier["measured"]
    else:
        batches = [int(b) for b in args.batches.split(",")]
        sim = simulate_all(batches, args.max_devices, args.profile, args.time_limit, log)
        meas = None
        if not args.no_measure:
            meas = measure_all([int(b) for b in args.measure_batches.split(",")], args.steps, args.kernels, log)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(sim, meas)
    out.with_suffix(".md").write_text(text)
    plot(sim, meas, out.with_suffix(".png"))
    out.with_suffix(".json").write_text(json.dumps({"paper": PAPER, "simulated": sim, "measured": meas}, indent=1))
    print(text)
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.png')}, {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
