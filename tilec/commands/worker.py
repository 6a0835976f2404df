"""`tilec worker --listen HOST:PORT --key-file K`: serve training jobs on this device."""


def add_parser(sub, common):
    p = sub.add_parser("worker", help="serve training jobs from `tilec train --cluster` on this device")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="the address to bind (default: loopback, a free port); 0.0.0.0:PORT for every interface")
    p.add_argument("--key-file", metavar="FILE", help="the cluster key (default: $TILEC_KEY)")
    p.add_argument("--once", action="store_true", help="exit after one job (status 1 if it failed)")
    from tilec_runtime.emulate import add_emulate_argument
    add_emulate_argument(p)


def run(args):
    from tilec_runtime.worker import run as serve
    args.parent = None
    return serve(args)
