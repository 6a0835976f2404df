"""`tilec dot DIR [-o FILE] [--format dot|svg|png]`: draw a plan."""


def add_parser(sub, common):
    p = sub.add_parser("dot", help="draw a plan: groups, tiles by device, bytes exchanged")
    p.add_argument("plan", metavar="DIR", help="a plan directory (or plan.json) written by `tilec compile`")
    p.add_argument("-o", "--output", metavar="FILE", help="output file (default: DIR/plan.FORMAT)")
    p.add_argument("--format", choices=("dot", "svg", "png"), default=None,
                   help="default: from the output's extension, else dot")


def run(args):
    import os

    from tilec.inspect.dot import FORMATS, plan_dot, render
    from tilec_runtime.planfile import read_plan
    plan = read_plan(args.plan)
    fmt = args.format
    if fmt is None:
        ext = os.path.splitext(args.output or "")[1].lstrip(".").lower()
        fmt = ext if ext in FORMATS else "dot"
    out = args.output
    if out is None:
        base = args.plan if os.path.isdir(args.plan) else os.path.dirname(args.plan) or "."
        out = os.path.join(base, f"plan.{fmt}")
    render(plan_dot(plan), fmt, out)
    print(f"wrote {out}")
    return 0
