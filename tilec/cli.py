"""The `tilec` command line; each subcommand lives in ``tilec/commands/``.

Errors a user can fix (a bad .cfg, an impossible plan, a weights file that
does not fit) print one line and exit with status 1; no traceback.
"""
import argparse
import importlib
import os
import sys

from tilec.commands import COMMANDS
from tilec.errors import TilecError


class Common:
    """Flags shared by several subcommands."""

    @staticmethod
    def model(p, required=True):
        p.add_argument("model", nargs=None if required else "?", default=None if required else "tiny",
                       help="a .cfg or .onnx file or a bundled model name (tiny, yolov2-tiny, yolov2, small-cnn)")
        p.add_argument("--loss", metavar="LOSS", help="the loss of an .onnx model, which carries none: softmax "
                       "(cross-entropy, integer labels), sse, or region:FILE (the [region] section of FILE)")

    @staticmethod
    def plan_flags(p):
        p.add_argument("--devices", type=int, default=1, help="number of devices (default 1)")
        p.add_argument("--batch", type=int, help="batch size (default: the model's [net] batch)")
        p.add_argument("--grid", help="tile grid RxC of every group (default: chosen by the optimiser)")
        p.add_argument("--groups", help="layer groups: 'auto' (greedy halo rule), 'all', 'each' or ranges like 0-3,4-7 (default: chosen by the optimiser)")
        p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
        p.add_argument("--tile-layers", type=int, metavar="N", dest="tile_layers",
                       help="tile exactly the first N layers (default: the optimiser chooses where tiling ends)")
        p.add_argument("--tail", choices=("auto", "one", "channels", "data"), default="auto",
                       help="the layers after the tiled prefix: auto (the optimiser chooses), one (each group on one "
                       "device), channels (split by channels wherever a layer can be), data (not implemented)")


def build_parser():
    parser = argparse.ArgumentParser(prog="tilec", description="Fused-tile CNN training on edge clusters.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        modules[name] = importlib.import_module(f"tilec.commands.{name}")
        modules[name].add_parser(sub, Common)
    return parser, modules


def main(argv=None):
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    for name in ("devices", "batch", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    from tilec_runtime.errors import RuntimeFault
    from tilec.train import TrainingInterrupted
    try:
        return modules[args.command].run(args)
    except TrainingInterrupted as exc:
        print(f"tilec: {exc}", file=sys.stderr)
        return 130
    except (TilecError, RuntimeFault) as exc:
        print(f"tilec: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tilec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`tilec simulate --json | head`): not an error of
        # tilec's; stdout goes to /dev/null so that exit's flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
