"""`tilec train`: load a model, make or read a plan, train, report.

The composition module of training: it may import every stage. The step
itself is the runtime's (one device: the reference executor; N devices:
the plan's schedule on the chosen backend).
"""
import json
import sys
import time

import numpy as np

from tilec.errors import PlanError
from tilec_runtime import data as rdata
from tilec_runtime import inprocess, reference
from tilec_runtime import weights as rweights
from tilec_runtime.optim import SGD


class MetricsLog:
    """One JSON object per line, flushed per step so a crash loses nothing."""

    def __init__(self, path):
        self.f = open(path, "w") if path else None

    def write(self, record):
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


def _progress(total, metrics, out):
    def on_step(step, loss, seconds):
        metrics.write({"step": step, "loss": loss, "step_s": seconds})
        out.write(f"step {step + 1:>4}/{total}  loss {loss:.6f}  {seconds:.3f} s\n")
        out.flush()
    return on_step


def train(graph, *, steps=10, batch=None, lr=None, momentum=None, decay=None, seed=0, dtype="float32",
          data=None, init_weights=None, save_weights=None, metrics=None, devices=1, plan=None,
          grid=None, groups=None, out=sys.stdout):
    """Train ``graph``; returns (losses, params, buffers)."""
    from tilec.compile import compile_plan

    net = graph.net
    if plan is not None:
        if plan["program"] != graph.to_program():
            raise PlanError("the plan was made for another model (its program differs); recompile it")
        if batch is not None and batch != plan["batch"]:
            raise PlanError(f"--batch {batch} differs from the plan's batch {plan['batch']}")
        batch, dtype = plan["batch"], plan["dtype"]
        optimizer = dict(plan["optimizer"])
    else:
        batch = batch or net["batch"]
        optimizer = {"lr": net["learning_rate"], "momentum": net["momentum"], "decay": net["decay"]}
    for key, value in (("lr", lr), ("momentum", momentum), ("decay", decay)):
        if value is not None:
            optimizer[key] = value
    program = graph.to_program()
    if init_weights:
        params, buffers = rweights.load_weights(init_weights, program, dtype)
    else:
        params, buffers = rweights.init_params(program, seed, dtype)
    if data:
        batches = rdata.load_batches(data, program, batch, dtype)
    else:
        batches = rdata.generated_batches(program, batch, seed, dtype)

    log = MetricsLog(metrics)
    on_step = _progress(steps, log, out)
    try:
        if plan is None and devices > 1:
            plan = compile_plan(graph, devices=devices, batch=batch, dtype=dtype, grid=grid, groups=groups,
                                optimizer=optimizer)
        if plan is not None:
            plan = dict(plan, optimizer=optimizer) if plan["optimizer"] != optimizer else plan
            losses, params, buffers, _ = inprocess.train(plan, params, buffers, batches, steps, on_step=on_step)
        else:
            losses = _train_one_device(program, params, buffers, batches, steps, optimizer, on_step)
    finally:
        log.close()
    if save_weights:
        rweights.save_weights(save_weights, params, buffers)
    return losses, params, buffers


def _train_one_device(program, params, buffers, batches, steps, optimizer, on_step):
    opt = SGD(**optimizer)
    losses = []
    for step in range(steps):
        t0 = time.perf_counter()
        images, target = batches.get(step)
        loss, grads = reference.train_step(program, params, buffers, images, target)
        opt.step(params, grads)
        losses.append(loss)
        on_step(step, loss, time.perf_counter() - t0)
    if not np.isfinite(losses[-1] if losses else 0.0):
        raise FloatingPointError("the loss diverged (not finite): lower --lr")
    return losses
