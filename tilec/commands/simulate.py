"""`tilec simulate DIR [--cluster FILE] [--timeline FILE.png] [--trace FILE.json] [--json]`:
replay a plan's schedule against device profiles."""
import json


def add_parser(sub, common):
    p = sub.add_parser("simulate", help="predict a plan's step time and memory per device from device profiles")
    p.add_argument("plan", metavar="DIR", help="a plan directory (or plan.json) written by `tilec compile`")
    p.add_argument("--cluster", metavar="FILE",
                   help="cluster file (YAML); default: the devices and profiles the plan was compiled for")
    p.add_argument("--timeline", metavar="FILE.png", help="draw a Gantt chart of the step")
    p.add_argument("--trace", metavar="FILE.json", help="write the predicted step as a Chrome trace (ui.perfetto.dev)")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON: step seconds (and at "
                   "every op's price, without jitter), one core's seconds, and per device its busy seconds, bytes "
                   "sent and peak memory")


def _spread(profile):
    """A profile's jitter in words."""
    if not profile.jitter_call_s:
        return f"{profile.jitter:.0%}"
    return f"{profile.jitter:.0%} on calls of {profile.jitter_call_s * 1e3:.0f} ms, longer ones less"


def prediction(plan, cluster, result):
    """The JSON of ``tilec simulate --json``."""
    from tilec.cost.memory import plan_memory
    from tilec.inspect.simulate import one_core_seconds
    one_core = one_core_seconds(plan, cluster)
    devices = []
    for r, (dev, busy, sent) in enumerate(zip(cluster.devices, result.busy_s, result.sent_bytes)):
        memory = plan_memory(plan, r, dev.profile)
        devices.append({"name": dev.name, "profile": dev.profile.name, "threads": plan["devices"][r]["threads"],
                        "busy_s": round(busy, 6), "idle_s": round(result.step_s - busy, 6), "sent_bytes": int(sent),
                        "peak_bytes": sum(memory.values()), "memory": memory,
                        "memory_limit_bytes": dev.memory_bytes, "fits": sum(memory.values()) <= dev.memory_bytes})
    return {"model": plan["model"], "batch": plan["batch"], "dtype": plan["dtype"], "step_s": round(result.step_s, 6),
            "priced_step_s": round(result.priced_s, 6),
            "one_core_s": round(one_core, 6), "speedup_over_one_core": round(one_core / result.step_s, 3),
            "devices": devices}


def run(args):
    from tilec.cluster import plan_cluster
    from tilec.compile import resolve_cluster
    from tilec.errors import PlanError
    from tilec.inspect.simulate import simulate, timeline_png, trace_steps
    from tilec_runtime.planfile import read_plan
    from tilec_runtime.trace import write_trace
    plan = read_plan(args.plan)
    names = [d["name"] for d in plan["devices"]]
    cluster = resolve_cluster(names, args.cluster) if args.cluster else plan_cluster(plan)
    if len(cluster.devices) != len(names):
        raise PlanError(f"{args.cluster}: {len(cluster.devices)} devices, the plan has {len(names)}")
    if cluster.names != names:  # rank r of the plan is device r of the file: the names must say so
        raise PlanError(f"{args.cluster}: devices {cluster.names} in that order, the plan's are {names}")
    result = simulate(plan, cluster, keep_events=bool(args.timeline or args.trace))
    data = prediction(plan, cluster, result)
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(f"simulated step: {result.step_s:.3f} s  ({plan['model']}, batch {plan['batch']}, {len(names)} "
              f"device(s), {cluster.source})")
        if result.step_s != result.priced_s:
            spread = ", ".join(sorted({_spread(d.profile) for d in cluster.devices}))
            print(f"  the mean of steps whose kernel calls vary by {spread} (the profile's jitter: the devices "
                  f"wait for each other at every barrier); every op at its price: {result.priced_s:.3f} s")
        if plan.get("predicted"):
            print(f"cost model's prediction in the plan: {plan['predicted']['step_s']:.3f} s")
        print(f"speedup over one core of {cluster.devices[0].profile.name} ({data['one_core_s']:.3f} s): "
              f"{data['speedup_over_one_core']:.2f}x")
        print(f"  {'device':<10}{'threads':>8}{'busy s':>10}{'idle s':>10}{'busy %':>8}{'sent MB':>10}{'peak MB':>10}"
              f"{'limit MB':>10}")
        for d in data["devices"]:
            print(f"  {d['name']:<10}{d['threads']:>8}{d['busy_s']:>10.3f}{d['idle_s']:>10.3f}"
                  f"{100 * d['busy_s'] / max(result.step_s, 1e-12):>7.0f}%{d['sent_bytes'] / 1e6:>10.2f}"
                  f"{d['peak_bytes'] / 1e6:>10.1f}{d['memory_limit_bytes'] / 1e6:>10.0f}"
                  f"{'' if d['fits'] else '  does not fit'}")
    if args.timeline:
        timeline_png(result, names, args.timeline, f"{plan['model']} batch {plan['batch']}: "
                                                   f"{result.step_s:.3f} s per step")
        if not args.json:
            print(f"wrote {args.timeline}")
    if args.trace:
        write_trace(args.trace, trace_steps(result, names), names)
        if not args.json:
            print(f"wrote {args.trace}")
    return 0
