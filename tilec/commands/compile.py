"""`tilec compile MODEL -o DIR`: make a plan (DIR/plan.json, DIR/report.txt, DIR/plan.dot)."""


def add_parser(sub, common):
    p = sub.add_parser("compile", help="make a plan (DIR/plan.json, report.txt, plan.dot)")
    common.model(p)
    common.plan_flags(p)
    p.add_argument("--cluster", metavar="FILE", help="cluster file (YAML); default: --devices copies of this machine")
    p.add_argument("--time-limit", type=float, default=None, metavar="S", dest="time_limit",
                   help="solver time limit in seconds (default 3)")
    p.add_argument("--time-slack", type=float, default=None, metavar="F", dest="time_slack",
                   help="of the plans at most this fraction slower than the fastest (predicted), take the one "
                        "of least memory (default 0.03; 0 for the fastest)")
    p.add_argument("--workers", type=int, default=0, help="CP-SAT portfolio workers (default 8, even on fewer cores)")
    p.add_argument("--no-recompute", action="store_true", dest="no_recompute",
                   help="never recompute activations in backward")
    p.add_argument("-o", "--output", required=True, metavar="DIR")


def run(args):
    from tilec.commands import load_model_arg
    import os

    from tilec.compile import DEFAULT_TIME_LIMIT, DEFAULT_TIME_SLACK, idle_note, plan_with_solution, prediction_report
    from tilec.inspect.dot import plan_dot
    from tilec.inspect.plan_report import plan_summary
    from tilec_runtime.planfile import write_plan
    graph = load_model_arg(args)
    plan, solution, _ = plan_with_solution(
        graph, devices=args.devices, batch=args.batch, dtype=args.dtype, grid=args.grid, groups=args.groups,
        cluster=args.cluster, tiled_prefix=args.tile_layers, tail=args.tail,
        time_limit=args.time_limit or DEFAULT_TIME_LIMIT, workers=args.workers, recompute=not args.no_recompute,
        time_slack=DEFAULT_TIME_SLACK if args.time_slack is None else args.time_slack)
    path = write_plan(plan, args.output)
    report = plan_summary(plan) + "\n" + prediction_report(plan, solution)
    with open(os.path.join(args.output, "report.txt"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.output, "plan.dot"), "w") as f:
        f.write(plan_dot(plan))
    print(report)
    note = idle_note(plan)
    if note:
        print(note)
    print(f"wrote {path}, report.txt and plan.dot")
    return 0
