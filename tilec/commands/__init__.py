"""One module per `tilec` subcommand: ``add_parser(sub, common)`` and ``run(args)``.

Subcommand modules import their stages inside ``run`` so that `tilec --help`
and an unrelated subcommand stay fast.
"""
import sys

COMMANDS = ("info", "compile", "train", "worker", "profile", "dot", "simulate", "data", "eval", "detect", "forward",
            "export")


def load_model_arg(args, default_loss=None):
    """The graph of ``args.model`` with ``args.loss``; ``default_loss`` for an
    .onnx file that names none (commands that do not train), said on stderr."""
    from tilec import debug
    from tilec.frontend.models import load_model
    with debug.stage("frontend") as st:
        graph = load_model(args.model, args.loss, default_loss, note=lambda line: print(line, file=sys.stderr))
        st.detail = f"{graph.name}: {len(graph)} layers from {args.model}"
    return graph
