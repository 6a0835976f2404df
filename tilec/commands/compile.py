"""`tilec compile MODEL -o DIR`: make a plan (DIR/plan.json)."""


def add_parser(sub, common):
    p = sub.add_parser("compile", help="make a plan (DIR/plan.json)")
    common.model(p)
    common.plan_flags(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR")


def run(args):
    from tilec.compile import compile_plan
    from tilec.frontend.models import load_model
    from tilec.inspect.plan_report import plan_summary
    from tilec_runtime.planfile import write_plan
    graph = load_model(args.model)
    plan = compile_plan(graph, devices=args.devices, batch=args.batch, dtype=args.dtype,
                        grid=args.grid, groups=args.groups)
    path = write_plan(plan, args.output)
    print(plan_summary(plan))
    print(f"wrote {path}")
    return 0
