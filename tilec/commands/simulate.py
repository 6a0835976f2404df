"""`tilec simulate DIR [--cluster FILE] [--timeline FILE.png]`: replay a plan against device profiles."""


def add_parser(sub, common):
    p = sub.add_parser("simulate", help="predict a plan's step time per device from device profiles")
    p.add_argument("plan", metavar="DIR", help="a plan directory (or plan.json) written by `tilec compile`")
    p.add_argument("--cluster", metavar="FILE",
                   help="cluster file (YAML); default: copies of this machine's profile")
    p.add_argument("--timeline", metavar="FILE.png", help="draw a Gantt chart of the step")


def run(args):
    from tilec.compile import resolve_cluster
    from tilec.cost.model import CostModel
    from tilec.inspect.simulate import simulate, timeline_png
    from tilec_runtime.planfile import read_plan
    import numpy as np
    plan = read_plan(args.plan)
    names = [d["name"] for d in plan["devices"]]
    cluster = resolve_cluster(names, args.cluster)
    if len(cluster.devices) != len(names):
        from tilec.errors import PlanError
        raise PlanError(f"{args.cluster}: {len(cluster.devices)} devices, the plan has {len(names)}")
    result = simulate(plan, cluster, keep_events=bool(args.timeline))
    tail_first = plan["groups"][-1]["layers"][0]
    model = CostModel(plan["program"], cluster, plan["batch"], np.dtype(plan["dtype"]).itemsize, prefix=tail_first)
    one_core = model.one_core_seconds()
    print(f"simulated step: {result.step_s:.3f} s  ({plan['model']}, batch {plan['batch']}, {len(names)} device(s))")
    if plan.get("predicted"):
        print(f"cost model's prediction in the plan: {plan['predicted']['step_s']:.3f} s")
    print(f"speedup over one core of {cluster.devices[0].profile.name} ({one_core:.3f} s): "
          f"{one_core / result.step_s:.2f}x")
    print(f"  {'device':<10}{'busy s':>10}{'idle s':>10}{'busy %':>8}{'sent MB':>10}")
    for name, b, i, s in zip(names, result.busy_s, result.idle_s, result.sent_bytes):
        print(f"  {name:<10}{b:>10.3f}{i:>10.3f}{100 * b / max(result.step_s, 1e-12):>7.0f}%{s / 1e6:>10.2f}")
    if args.timeline:
        timeline_png(result, names, args.timeline, f"{plan['model']} batch {plan['batch']}: "
                                                   f"{result.step_s:.3f} s per step")
        print(f"wrote {args.timeline}")
    return 0
