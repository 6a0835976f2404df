"""`tilec train [MODEL]`: train (default: the bundled 'tiny' on a generated batch)."""


def add_parser(sub, common):
    p = sub.add_parser("train", help="train a model (default: the bundled 'tiny' on a generated batch)")
    common.model(p, required=False)
    common.plan_flags(p)
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


def run(args):
    from tilec.frontend.models import load_model
    from tilec.train import train
    from tilec_runtime.planfile import read_plan
    graph = load_model(args.model)
    plan = read_plan(args.plan) if args.plan else None
    losses, _, _ = train(graph, steps=args.steps, batch=args.batch, lr=args.lr, momentum=args.momentum,
                         decay=args.decay, seed=args.seed, dtype=args.dtype, data=args.data,
                         init_weights=args.init_weights, save_weights=args.save_weights,
                         metrics=args.metrics, devices=args.devices, plan=plan, grid=args.grid,
                         groups=args.groups)
    print(f"trained {len(losses)} steps: loss {losses[0]:.6f} -> {losses[-1]:.6f}")
    return 0
