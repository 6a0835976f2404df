"""The `tilec` command line: info, compile, train.

Errors a user can fix (a bad .cfg, an impossible plan, a weights file that
does not fit) print one line and exit with status 1; no traceback.
"""
import argparse
import sys

from tilec.errors import TilecError


def _add_model(p, required=True):
    p.add_argument("model", nargs=None if required else "?", default=None if required else "tiny",
                   help="a .cfg file or a bundled model name (tiny, yolov2-tiny, yolov2)")


def _add_plan_flags(p):
    p.add_argument("--devices", type=int, default=1, help="number of devices (default 1)")
    p.add_argument("--batch", type=int, help="batch size (default: the model's [net] batch)")
    p.add_argument("--grid", help="tile grid RxC of every group (default: most square for --devices)")
    p.add_argument("--groups", help="layer groups: 'auto' (default), 'all', 'each' or ranges like 0-3,4-7")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")


def build_parser():
    parser = argparse.ArgumentParser(prog="tilec", description="Fused-tile CNN training on edge clusters.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="layer table of a model; with --plan, what the plan costs each device")
    _add_model(p)
    p.add_argument("--batch", type=int)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--plan", metavar="DIR", help="a plan directory written by `tilec compile`")

    p = sub.add_parser("compile", help="make a plan (DIR/plan.json)")
    _add_model(p)
    _add_plan_flags(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR")

    p = sub.add_parser("train", help="train a model (default: the bundled 'tiny' on a generated batch)")
    _add_model(p, required=False)
    _add_plan_flags(p)
    p.add_argument("--backend", choices=("inprocess",), default="inprocess",
                   help="how devices run: inprocess = threads of this process")
    p.add_argument("--plan", metavar="DIR", help="train with this plan (from `tilec compile`)")
    p.add_argument("--data", metavar="FILE", help="batch .npz (images + labels/targets); default: generated")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--decay", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-weights", metavar="FILE")
    p.add_argument("--save-weights", metavar="FILE")
    p.add_argument("--metrics", metavar="FILE.jsonl")
    return parser


def _positive(parser, name, value):
    if value is not None and value < 1:
        parser.error(f"{name} must be at least 1")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("devices", "batch", "steps"):
        _positive(parser, f"--{name}", getattr(args, name, None))
    try:
        return _run(args)
    except TilecError as exc:
        print(f"tilec: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from tilec_runtime.errors import RuntimeFault
        if isinstance(exc, RuntimeFault):
            print(f"tilec: error: {exc}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("tilec: interrupted", file=sys.stderr)
        return 130


def _run(args):
    from tilec.frontend.models import load_model

    graph = load_model(args.model)
    if args.command == "info":
        return _info(graph, args)
    if args.command == "compile":
        from tilec.compile import compile_plan
        from tilec.inspect.plan_report import plan_summary
        from tilec_runtime.planfile import write_plan
        plan = compile_plan(graph, devices=args.devices, batch=args.batch, dtype=args.dtype,
                            grid=args.grid, groups=args.groups)
        path = write_plan(plan, args.output)
        print(plan_summary(plan))
        print(f"wrote {path}")
        return 0
    if args.command == "train":
        from tilec.train import train
        from tilec_runtime.planfile import read_plan
        plan = read_plan(args.plan) if args.plan else None
        losses, _, _ = train(graph, steps=args.steps, batch=args.batch, lr=args.lr, momentum=args.momentum,
                             decay=args.decay, seed=args.seed, dtype=args.dtype, data=args.data,
                             init_weights=args.init_weights, save_weights=args.save_weights,
                             metrics=args.metrics, devices=args.devices, plan=plan, grid=args.grid,
                             groups=args.groups)
        print(f"trained {len(losses)} steps: loss {losses[0]:.6f} -> {losses[-1]:.6f}")
        return 0
    raise AssertionError(args.command)


def _info(graph, args):
    from tilec.inspect.table import layer_table
    batch = args.batch or graph.net["batch"]
    if not args.plan:
        print(layer_table(graph, batch, args.dtype))
        return 0
    from tilec.compile import compile_plan
    from tilec.inspect.plan_report import activation_bytes, plan_summary
    from tilec_runtime.planfile import read_plan
    plan = read_plan(args.plan)
    print(layer_table(graph, plan["batch"], plan["dtype"]))
    one = compile_plan(graph, devices=1, batch=plan["batch"], dtype=plan["dtype"], groups="all")
    print()
    print(plan_summary(plan, baseline=activation_bytes(one)[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
