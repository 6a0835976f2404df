"""The in-process backend: every device of a plan as a thread of this process.

Each device keeps its own copy of the parameters it computes with, its own
optimiser state and its own running statistics, and talks to the others
only through the plan's messages, exactly as it would over sockets. Each
takes the whole batch (and cuts its pieces of the image), and its part of
the targets where it computes the loss or a part of it.
"""
import threading

from tilec_runtime.comm import InProcessHub, PeerLost
from tilec_runtime.executor import RankExecutor, cut, holdings, place
from tilec_runtime.program import buffer_shapes, param_shapes
from tilec_runtime.shards import cut_target, target_part, total_loss


def make_executors(plan, comms, module, params, buffers, momentum=None, threads=None, trace=False):
    """A ``RankExecutor`` per rank, each with its own copies of what it holds
    (its slices of the layers split by channels)."""
    out = []
    for r, comm in enumerate(comms):
        pieces, bpieces = holdings(plan, r)
        out.append(RankExecutor(plan, r, comm, module, {k: cut(params[k], p).copy() for k, p in pieces.items()},
                                {k: cut(buffers[k], p).copy() for k, p in bpieces.items()},
                                {k: cut(momentum[k], p).copy() for k, p in pieces.items() if k in momentum}
                                if momentum else None,
                                threads=threads, trace=trace))
    return out


def gather_state(executors):
    """Parameters, buffers and momentum of the whole model: whole arrays
    from the lowest rank that holds them (replicas are bit-identical), and
    the layers split by channels from their members' slices."""
    plan = executors[0].plan
    shapes = {k: s for layer in plan["program"] for k, s in param_shapes(layer).items()}
    shapes.update({k: s for layer in plan["program"] for k, s in buffer_shapes(layer).items()})
    params, buffers, momentum = {}, {}, {}
    for ex in reversed(executors):
        for out, arrays, held in ((params, ex.params, ex.pieces), (buffers, ex.buffers, ex.buffer_pieces),
                                  (momentum, ex.velocity, ex.pieces)):
            for key, array in arrays.items():
                place(out, key, array, held[key], shapes[key])
    return params, buffers, momentum


class _Shared:
    """``batches.get(step)`` fetched once and handed to every rank's thread
    (each cuts its own pieces of the image from it)."""

    def __init__(self, batches, n):
        self.batches, self.n = batches, n
        self.lock = threading.Lock()
        self.held = {}  # step: [(images, target), ranks that have not taken it]

    def get(self, step):
        with self.lock:
            entry = self.held.get(step)
            if entry is None:
                entry = self.held[step] = [self.batches.get(step), self.n]
            entry[1] -= 1
            if entry[1] == 0:
                del self.held[step]
            return entry[0]


def run_ranks(executors, hub, batches, first_step, steps):
    """Run ``steps`` steps on every executor, one thread each. Returns the
    losses (each step's: its parts on every rank that computes one, added up)."""
    n = len(executors)
    parts, errors = [[] for _ in range(n)], [None] * n
    shared = _Shared(batches, n)

    def run(rank):
        ex = executors[rank]
        ex.comm.stepping_thread = threading.get_ident()
        mine = target_part(ex.plan, rank)
        try:
            for step in range(first_step, first_step + steps):
                images, target = shared.get(step)
                parts[rank].append(ex.step(images, cut_target(target, mine)))
        except BaseException as exc:  # noqa: BLE001 - reported below, after join
            errors[rank] = exc
            hub.fail(rank, exc)

    threads = [threading.Thread(target=run, args=(r,), name=f"tilec-device-{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ex in executors:
        ex.close()
    first_error = next((e for e in errors if e is not None and not isinstance(e, PeerLost)), None) or next(
        (e for e in errors if e is not None), None)
    if first_error is not None:
        raise first_error
    return [total_loss(step) for step in zip(*parts)]


def train(plan, params, buffers, batches, steps, module, timeout=120.0, first_step=0, momentum=None, threads=None):
    """Train ``steps`` steps with every device a thread. Returns
    (losses, params, buffers, momentum). ``module``: the kernel module of
    the plan's dtype."""
    hub = InProcessHub(len(plan["devices"]), timeout)
    executors = make_executors(plan, [hub.comm(r) for r in range(len(plan["devices"]))], module, params, buffers,
                               momentum, threads)
    losses = run_ranks(executors, hub, batches, first_step, steps)
    p, b, m = gather_state(executors)
    return losses, p, b, m
