"""`tilec info MODEL [--plan DIR]`: the layer table; with a plan, what it costs each device."""


def add_parser(sub, common):
    p = sub.add_parser("info", help="layer table of a model; with --plan, what the plan costs each device")
    common.model(p)
    p.add_argument("--batch", type=int)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--plan", metavar="DIR", help="a plan directory written by `tilec compile`")


def run(args):
    from tilec.commands import load_model_arg
    from tilec.inspect.table import layer_table
    graph = load_model_arg(args, default_loss="sse")
    batch = args.batch or graph.net["batch"]
    if not args.plan:
        print(layer_table(graph, batch, args.dtype))
        return 0
    from tilec.compile import compile_plan
    from tilec.inspect.plan_report import device_bytes, plan_summary
    from tilec_runtime.planfile import read_plan
    plan = read_plan(args.plan)
    print(layer_table(graph, plan["batch"], plan["dtype"]))
    one = compile_plan(graph, devices=1, batch=plan["batch"], dtype=plan["dtype"], groups="all")
    print()
    print(plan_summary(plan, baseline=device_bytes(one)[0]))
    return 0
