"""`tilec train`: load a model, make or read a plan, train, report.

The composition module of training: it may import every stage. The step
itself is the runtime's (one device: the reference executor; N devices:
the plan's schedule on the chosen backend).
"""
import json
import os
import sys
import time

import numpy as np

from tilec.errors import PlanError
from tilec_runtime import checkpoint as rcheckpoint
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


BACKENDS = ("local", "inprocess")


def train(graph, *, steps=10, batch=None, lr=None, momentum=None, decay=None, seed=0, dtype="float32",
          data=None, init_weights=None, save_weights=None, metrics=None, devices=1, plan=None,
          grid=None, groups=None, out=None, backend=None, cluster=None, key_file=None,
          checkpoint=None, checkpoint_every=None, resume=None, timeout=120.0, kernels="generated"):
    """Train ``graph``; returns (losses, params, buffers).

    ``steps`` counts from the start of training: with ``resume`` (a
    checkpoint directory) the run continues at the checkpoint's step, on
    whatever devices this call has (re-planned). ``backend``: ``local``
    (default for several devices: one worker process per device over
    loopback) or ``inprocess`` (threads). ``cluster``: a cluster file whose
    devices run ``tilec worker``; ``key_file`` holds their shared key.
    ``checkpoint``: a directory to write the state to every
    ``checkpoint_every`` steps and at the end. ``kernels``: ``generated``
    (compiled from the templates on first use, then cached; one device runs
    them fused with a static buffer plan, in-process devices as drop-in
    kernels) or ``reference`` (the numpy kernels).
    """
    if kernels not in KERNELS:
        raise PlanError(f"--kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    out = out or sys.stdout  # looked up per call: tests and callers swap sys.stdout
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
    addresses = None
    if cluster:
        names, addresses = _cluster_devices(cluster)
        if plan is not None and len(plan["devices"]) != len(names):
            raise PlanError(f"the plan has {len(plan['devices'])} devices, the cluster file {len(names)}")
        devices = names
    if init_weights:
        # .npz (every key required) or darknet .weights (a backbone may cover a prefix)
        from tilec.frontend.darknet_weights import load_any
        params, buffers = load_any(init_weights, program, dtype, seed)
    else:
        params, buffers = rweights.init_params(program, seed, dtype)
    if data and os.path.isdir(data):
        # a YOLO-layout detection dataset, loaded and augmented on a prefetch thread
        from tilec.data.batches import for_model
        batches = for_model(program, data, batch, seed=seed, dtype=dtype)
    elif data:
        batches = rdata.load_batches(data, program, batch, dtype)
    else:
        batches = rdata.generated_batches(program, batch, seed, dtype)
    identity = {"data": os.path.abspath(data) if data else None, "seed": None if data else seed, "batch": batch}
    velocity, start = None, 0
    if resume:
        ck = rcheckpoint.load(resume, program, dtype)
        saved = {k: ck.meta.get(k) for k in identity}
        if saved != identity:
            raise PlanError(f"{resume}: the checkpoint was made with data {saved}, this run has {identity}")
        params, buffers, velocity, start = ck.params, ck.buffers, ck.momentum, ck.step
        out.write(f"resuming after step {start} from {resume}\n")

    def save_state(done, p, b, m):
        rcheckpoint.save(checkpoint, done, p, b, m, model=graph.name, program=rcheckpoint.program_hash(program),
                         dtype=str(dtype), optimizer=optimizer, devices=ndev, **identity)

    every = checkpoint_every or steps if checkpoint else 0
    on_state = save_state if checkpoint else None
    log = MetricsLog(metrics)
    on_step = _progress(steps, log, out or sys.stdout)
    losses, workers = [], None
    try:
        ndev = len(devices) if isinstance(devices, list) else len(plan["devices"]) if plan else devices
        if addresses is None and (backend or "local") == "local" and ndev > 1 and start < steps:
            from tilec_runtime import launch
            from tilec_runtime.auth import new_key
            # starting N processes takes a while on a small machine: overlap it with planning
            workers = launch.LocalWorkers(ndev, new_key())
            workers.start()
        if plan is None and (ndev > 1 or addresses):
            plan = compile_plan(graph, devices=devices, batch=batch, dtype=dtype, grid=grid, groups=groups,
                                optimizer=optimizer)
        if plan is not None:
            plan = dict(plan, optimizer=optimizer) if plan["optimizer"] != optimizer else plan
            ndev = len(plan["devices"])
        if start >= steps:
            out.write(f"the checkpoint is already at step {start} of {steps}\n")
        elif plan is None:
            trainer = None
            if kernels == "generated":
                trainer = _generated_trainer(graph, params, buffers, batch, dtype, optimizer, out)
            losses, params, buffers = _train_one_device(program, params, buffers, batches, start, steps, optimizer,
                                                        on_step, velocity, every, on_state, trainer)
        elif workers is None and addresses is None:
            losses = []
            for first in range(start, steps, every or steps):
                n = min(every or steps, steps - first)
                got, params, buffers, velocity = inprocess.train(plan, params, buffers, batches, n, on_step=on_step,
                                                                 timeout=timeout, first_step=first, momentum=velocity,
                                                                 kernels=_generated_ops(plan["dtype"], out)
                                                                 if kernels == "generated" else None)
                losses += got
                if on_state:
                    on_state(first + n, params, buffers, velocity)
        else:
            from tilec_runtime import launch
            from tilec_runtime.auth import load_key

            def on_metrics(records):
                for r in records:
                    log.write({k: r[k] for k in ("step", "device", "name", "step_s", "compute_s", "wait_s", "cpu_s",
                                                 "bytes_sent", "peak_bytes")})
            if workers is not None:
                addresses, key = workers.addresses, workers.key.encode()
            else:
                key = load_key(key_file)
            losses, params, buffers, _ = launch.run_job(
                plan, addresses, key, params, buffers, batches, steps=steps - start, first_step=start,
                momentum=velocity, timeout=timeout, state_every=every, on_step=on_step,
                on_metrics=on_metrics if metrics else None, on_state=on_state,
                kernels=_kernel_source(plan["dtype"], out) if kernels == "generated" else None)
    finally:
        if workers is not None:
            workers.stop(timeout=10.0 if losses else 0.0)  # (a job that never started: kill them now)
        log.close()
    if losses and not np.isfinite(losses[-1]):
        raise FloatingPointError("the loss diverged (not finite): lower --lr")
    if save_weights:
        rweights.save_weights(save_weights, params, buffers)
    return losses, params, buffers


def _cluster_devices(path):
    """(names, addresses) of the devices of a cluster file (``tilec.cluster``)."""
    from tilec.cluster import load_cluster
    found = load_cluster(path)
    for d in found.devices:
        if d.host is None or d.port is None:
            raise PlanError(f"{path}: device {d.name!r} needs a host and a port (where `tilec worker` listens)")
    return found.names, [(d.host, d.port) for d in found.devices]


def _train_one_device(program, params, buffers, batches, start, steps, optimizer, on_step, velocity=None,
                      every=0, on_state=None, trainer=None):
    """``trainer``: a tilec_runtime.fused.OneDeviceTrainer over these params
    and buffers (generated kernels), or None for the reference executor."""
    opt = SGD(**optimizer)
    if velocity:
        if trainer is not None:
            for k, v in velocity.items():
                trainer.velocity[k][...] = v
        else:
            opt.velocity = {k: v.copy() for k, v in velocity.items()}
    losses = []
    for step in range(start, steps):
        t0 = time.perf_counter()
        images, target = batches.get(step)
        if trainer is not None:
            loss = trainer.step(images, target)  # updates params, buffers and momentum in place
        else:
            loss, grads = reference.train_step(program, params, buffers, images, target)
            opt.step(params, grads)
        losses.append(loss)
        on_step(step, loss, time.perf_counter() - t0)
        if on_state and ((step + 1 - start) % every == 0 or step + 1 == steps):
            on_state(step + 1, params, buffers, trainer.velocity if trainer is not None else opt.velocity)
    return losses, params, buffers


KERNELS = ("generated", "reference")


def _generated_trainer(graph, params, buffers, batch, dtype, optimizer, out):
    """The fused one-device trainer: a one-group plan lowered to kernel
    specs, the kernel module built (or found in the cache)."""
    from tilec.codegen import compile_kernels
    from tilec.compile import compile_plan
    from tilec_runtime.fused import OneDeviceTrainer

    plan = compile_plan(graph, devices=1, batch=batch, dtype=dtype, grid="1x1", groups="all", optimizer=optimizer)
    bundle = compile_kernels(plan, progress=lambda msg: out.write(msg + "\n"))
    return OneDeviceTrainer(plan, bundle.kernel_plan, bundle.module_obj, params, buffers)


def _kernel_source(dtype, out):
    """The generated kernels as C, for workers to build on their device."""
    from tilec.codegen import generate
    out.write(f"generating kernels ({dtype}) ...\n")
    out.flush()
    source = generate((str(dtype),))
    return {"module": source.module, "source": source.text}


def _generated_ops(dtype, out):
    """ops-compatible generated kernels for the executors of several devices."""
    from tilec.codegen import build_modules
    from tilec_runtime.genops import GeneratedOps

    (module, _, _), = build_modules([(str(dtype),)], progress=lambda msg: out.write(msg + "\n"))
    return GeneratedOps(module)
