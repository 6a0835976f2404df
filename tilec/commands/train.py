"""`tilec train [MODEL]`: train a model; without MODEL, the detection demo."""
import sys


def add_parser(sub, common):
    p = sub.add_parser("train", help="train a model; without MODEL, the detection demo (synthetic data, 2 local workers, evaluation)")
    common.model(p, required=False)
    p.set_defaults(model=None)  # no MODEL: the detection demo (tilec.demo)
    common.plan_flags(p)
    add_defaults(p)
    p.add_argument("--backend", choices=("local", "inprocess"),
                   help="how several devices run on this machine: local = one worker process each, over "
                        "loopback (default); inprocess = threads of this process")
    p.add_argument("--cluster", metavar="FILE", help="train on the devices of this cluster file (each running "
                   "`tilec worker`)")
    p.add_argument("--key-file", metavar="FILE", help="the cluster key (default: $TILEC_KEY)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a device waits for a peer before it declares it lost (default 120)")
    p.add_argument("--checkpoint", metavar="DIR", help="write the training state to DIR/checkpoint.npz")
    p.add_argument("--checkpoint-every", type=int, metavar="K", help="every K steps (default: at the end)")
    p.add_argument("--resume", metavar="DIR", help="continue from DIR's checkpoint (--steps counts from the "
                   "start; the devices may differ)")
    p.add_argument("--plan", metavar="DIR", help="train with this plan (from `tilec compile`)")
    p.add_argument("--kernels", choices=("generated", "reference"), default="generated",
                   help="generated: kernels compiled from templates for this model (built once, then cached; "
                        "needs a C compiler); reference: the numpy kernels (default: generated)")
    p.add_argument("--data", metavar="PATH", help="a batch .npz (images + labels/targets) or a YOLO-layout "
                   "dataset directory (region models); default: generated")
    p.add_argument("--steps", type=int, help="training steps (default 10; the demo: its own)")
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--decay", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-weights", metavar="FILE", help="weights .npz, darknet .weights, or an .onnx model's "
                   "initializers (default for an .onnx MODEL: its own)")
    p.add_argument("--save-weights", metavar="FILE")
    p.add_argument("--metrics", metavar="FILE.jsonl",
                   help="one JSON line per step (loss), and with several devices one per device and step "
                        "(compute, wait, bytes sent, peak memory)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="kernel threads per device (default: its cores; local workers share this machine's)")
    p.add_argument("--trace", metavar="FILE.json",
                   help="write every device's measured ops of every step as a Chrome trace (ui.perfetto.dev)")


def add_defaults(p):
    # --devices is shared with `compile` (default 1); here None tells the
    # demo that the user did not choose
    p.set_defaults(devices=None)


# flags that only a MODEL's training reads (the demo chooses its own): given without one, they would
# be silently ignored
MODEL_FLAGS = ("batch", "grid", "groups", "tile_layers", "loss", "cluster", "key_file", "checkpoint_every", "data",
               "lr", "momentum", "decay", "init_weights", "save_weights", "metrics", "threads", "trace")


def plan_model(plan, path):
    """The bundled model ``plan`` (read from ``path``) was compiled for
    (``tilec train --plan DIR`` without MODEL)."""
    from tilec.errors import TilecError
    from tilec.frontend.models import bundled_names
    name = plan["model"]
    if name not in bundled_names():
        raise TilecError(f"--plan {path}: give the model it was compiled for ({name!r}): "
                         f"tilec train MODEL --plan {path}")
    print(f"train: {name} (the model {path} was compiled for)", file=sys.stderr)
    return name


def demo_only(args):
    given = [f"--{name.replace('_', '-')}" for name in MODEL_FLAGS if getattr(args, name, None) is not None]
    if given:
        from tilec.errors import TilecError
        raise TilecError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} a MODEL (without one, "
                         f"`tilec train` runs the demo, which chooses its own)")


def run(args):
    import warnings
    # a diverging loss ends training with one line naming the step
    # (tilec_runtime.errors.check_loss); numpy's warnings on the way are noise
    warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered", RuntimeWarning)
    from tilec_runtime.planfile import read_plan
    plan = read_plan(args.plan) if args.plan else None
    if args.model is None and plan is not None:
        args.model = plan_model(plan, args.plan)
    if args.model is None:
        demo_only(args)
        from tilec.demo import run_from_args
        return run_from_args(args)
    from tilec.commands import load_model_arg
    from tilec.errors import TilecError
    from tilec.frontend.models import is_onnx, model_path
    from tilec.train import TrainOptions, train
    graph = load_model_arg(args)
    if args.threads is not None and args.threads < 1:
        raise TilecError(f"--threads must be at least 1, got {args.threads}")
    # an ONNX model's initializers are its weights: train from them unless told otherwise
    init_weights = args.init_weights or (str(model_path(args.model)) if is_onnx(args.model) else None)
    options = TrainOptions(
        steps=args.steps or 10, batch=args.batch, lr=args.lr, momentum=args.momentum, decay=args.decay,
        seed=args.seed, dtype=args.dtype, data=args.data, init_weights=init_weights,
        save_weights=args.save_weights, metrics=args.metrics, devices=args.devices or 1, plan=plan, grid=args.grid,
        groups=args.groups, tile_layers=args.tile_layers, tail=args.tail, backend=args.backend, cluster=args.cluster,
        key_file=args.key_file,
        checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every, resume=args.resume, timeout=args.timeout,
        kernels=args.kernels, threads=args.threads, trace=args.trace)
    losses, _, _ = train(graph, options)
    if losses:
        print(f"trained {len(losses)} steps: loss {losses[0]:.6f} -> {losses[-1]:.6f}")
    return 0
