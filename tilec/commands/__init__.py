"""One module per `tilec` subcommand: ``add_parser(sub, common)`` and ``run(args)``.

Subcommand modules import their stages inside ``run`` so that `tilec --help`
and an unrelated subcommand stay fast.
"""
COMMANDS = ("info", "compile", "train", "worker", "profile", "dot", "simulate", "data", "eval", "detect", "forward")
