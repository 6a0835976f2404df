"""The in-process backend: every device of a plan as a thread of this process.

Each device keeps its own copy of the parameters it computes with, its own
optimiser state and its own running statistics, and talks to the others
only through the plan's messages, exactly as it would over sockets. Rank 0
reads the data and reports the loss.
"""
import threading
import time

from tilec_runtime.comm import InProcessHub, PeerLost
from tilec_runtime.optim import SGD
from tilec_runtime.tiled import DeviceStep


class Device:
    """One device's state: its schedule, parameters, buffers, optimiser."""

    def __init__(self, plan, comm, params, buffers, optimizer, kernels=None):
        self.exec = DeviceStep(plan, comm, kernels)
        keys = set(self.exec.param_keys())  # the tail's too, on the rank that runs it
        self.params = {k: params[k].copy() for k in params if k in keys}
        layers = {k.split(".")[0] for k in keys}
        self.buffers = {k: v.copy() for k, v in buffers.items() if k.split(".")[0] in layers}
        self.opt = SGD(**optimizer)

    def train_step(self, images=None, target=None):
        loss, grads = self.exec.step(self.params, self.buffers, images, target)
        self.opt.step(self.params, grads)
        return loss


def gather_state(devices):
    """Parameters, buffers and momentum of the whole model, each taken from
    the lowest rank that holds it (replicas are bit-identical)."""
    params, buffers, momentum = {}, {}, {}
    for dev in reversed(devices):
        params.update(dev.params)
        buffers.update(dev.buffers)
        momentum.update(dev.opt.velocity)
    return params, buffers, momentum


def train(plan, params, buffers, batches, steps, on_step=None, timeout=120.0, first_step=0, momentum=None,
          kernels=None):
    """Train ``steps`` steps with every device a thread. Returns
    (losses, params, buffers, momentum). ``on_step(step, loss, seconds)`` is
    called by rank 0 after each step. ``kernels``: see ``DeviceStep``."""
    n = len(plan["devices"])
    hub = InProcessHub(n, timeout)
    devices = [Device(plan, hub.comm(r), params, buffers, plan["optimizer"], kernels) for r in range(n)]
    if momentum:
        for dev in devices:
            dev.opt.velocity = {k: momentum[k].copy() for k in dev.params if k in momentum}
    losses, errors = [], [None] * n

    def run(rank):
        dev = devices[rank]
        try:
            for step in range(first_step, first_step + steps):
                t0 = time.perf_counter()
                if rank == 0:
                    images, target = batches.get(step)
                    loss = dev.train_step(images, target)
                    losses.append(loss)
                    if on_step:
                        on_step(step, loss, time.perf_counter() - t0)
                else:
                    dev.train_step()
        except BaseException as exc:  # noqa: BLE001 - reported below, after join
            errors[rank] = exc
            hub.fail(rank, exc)

    threads = [threading.Thread(target=run, args=(r,), name=f"tilec-device-{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first_error = next((e for e in errors if e is not None and not _is_echo(e)), None) or next(
        (e for e in errors if e is not None), None)
    if first_error is not None:
        raise first_error
    p, b, m = gather_state(devices)
    return losses, p, b, m


def _is_echo(exc):
    """A PeerLost raised because another device failed first."""
    return isinstance(exc, PeerLost)
