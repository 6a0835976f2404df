"""A device slower than this machine, for checking the simulator
(``benchmarks/emulated_cluster.py``): ``tilec worker --emulate-speed R``.

Each compute stage of the schedule, and each SGD update, is followed by a
sleep ``1/R - 1`` times as long as the stage took, so the worker computes
like a device ``R`` times this machine's speed. A sleeping worker gives its
core away and goes on the moment its stage's time is up, as a slow board
computes on without stopping. A CFS quota, the other way to slow a process,
stops it for the rest of its period whenever it has used its share: at a
tenth of a core, 9 ms in every 10, which a peer waiting for a halo or a
batch-norm sum then waits out too (the emulated-cluster benchmark measured
it). Only compute is slowed: the runtime's own work between stages (framing,
copies, the Python that dispatches them) runs at this machine's speed.
"""
import argparse
import time


class Stretch:
    """Sleeps after compute as a device of ``speed`` times this machine's would take longer."""

    def __init__(self, speed):
        speed = float(speed)
        if not 0.0 < speed <= 1.0:
            raise ValueError(f"an emulated speed is a fraction of this machine's, in (0, 1], not {speed}")
        self.factor = 1.0 / speed - 1.0

    def after(self, seconds):
        """The stage just run took ``seconds`` here: wait out the rest of its emulated time."""
        if seconds > 0.0:
            time.sleep(seconds * self.factor)

    def run(self, fn, *args):
        """``fn(*args)``, then the rest of its emulated time."""
        t0 = time.perf_counter()
        out = fn(*args)
        self.after(time.perf_counter() - t0)
        return out


def emulated_speed(text):
    """``--emulate-speed``'s :class:`Stretch`."""
    try:
        return Stretch(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_emulate_argument(p):
    """``--emulate-speed R`` on a worker's parser (here, not in the worker: `tilec --help` loads no runtime)."""
    p.add_argument("--emulate-speed", dest="stretch", type=emulated_speed, metavar="R",
                   help="compute as a device R (0 < R <= 1) times this machine's speed: a sleep after every "
                        "compute stage (for checking the simulator, benchmarks/emulated_cluster.py)")
