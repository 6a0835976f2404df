"""`tilec train`: one training loop for every way the devices run.

The composition module of training: it may import every stage. It prepares
a run (model, optimiser settings, weights or a checkpoint, data, plan),
picks a backend (``tilec.backends``: the reference executor, threads of
this process, local worker processes or a cluster's workers) and drives it
with :func:`run_loop`, which is also the demo's loop: progress (tqdm on a
terminal), metrics.jsonl, checkpoints, a trace, and Ctrl-C, which ends the
run after the step under way and leaves a checkpoint.
"""
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields

from tilec.errors import PlanError, TilecError
from tilec.progress import StepProgress
from tilec_runtime import checkpoint as rcheckpoint
from tilec_runtime import data as rdata
from tilec_runtime import weights as rweights
from tilec_runtime.errors import check_loss

BACKENDS = ("local", "inprocess")
KERNELS = ("generated", "reference")


@dataclass
class TrainOptions:
    """What `tilec train MODEL` takes (each field is the flag of the same name)."""
    steps: int = 10
    batch: int = None
    lr: float = None
    momentum: float = None
    decay: float = None
    seed: int = 0
    dtype: str = "float32"
    data: str = None
    init_weights: str = None
    save_weights: str = None
    metrics: str = None
    devices: object = 1  # a count or device names
    plan: dict = None
    grid: str = None
    groups: str = None
    tile_layers: int = None  # tile exactly this many layers (default: the optimiser chooses)
    tail: str = "auto"  # the layers after the tiled prefix: auto, one, channels
    cluster: str = None
    key_file: str = None
    backend: str = None  # local (default for several devices) | inprocess
    checkpoint: str = None
    checkpoint_every: int = None
    resume: str = None
    timeout: float = 120.0
    kernels: str = "generated"
    threads: int = None  # kernel threads per device (default: its cores; local workers share this machine's)
    trace: str = None  # a Chrome trace of every step


class MetricsLog:
    """One JSON object per line, flushed per record so a crash loses nothing."""

    def __init__(self, path, append=False):
        self.f = open(path, "a" if append else "w") if path else None

    def write(self, record):
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


DEVICE_FIELDS = ("step", "device", "name", "step_s", "compute_s", "wait_s", "cpu_s", "bytes_sent", "peak_bytes",
                 "threads")


def run_loop(backend, batches, first, last, *, batch, lr, every=0, on_state=None, metrics=None, progress=None,
             trace=None):
    """Drive ``backend`` through steps ``first .. last-1``. Returns (losses,
    interrupted). ``lr(step)``: the learning rate; ``on_state(done, params,
    buffers, momentum)`` at every ``every`` steps, the last and an
    interrupted run's last; ``metrics``: a MetricsLog; ``trace``: a list
    that receives (step, rank, start, events) of every device's step.

    Ctrl-C (SIGINT) asks the backend to stop after the steps under way (a
    checkpoint of them goes to ``on_state``); a second Ctrl-C interrupts at
    once (KeyboardInterrupt).
    """
    interrupted = []
    previous = None

    def on_sigint(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(True)
        backend.request_stop()
        getattr(progress, "note", print)("\nstopping after the steps under way (Ctrl-C again to abort) ...")

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_sigint)
    losses, saved = [], None
    try:
        for res in backend.steps(batches, first, last, lr, every):
            losses.append(res.loss)
            if metrics is not None:
                metrics.write({"step": res.step, "loss": res.loss, "step_s": res.seconds,
                               "images_per_s": batch / max(res.seconds, 1e-12), "lr": lr(res.step)})
                for r in res.records:
                    if len(res.records) > 1 and "device" in r:
                        metrics.write({k: (res.step if k == "step" else r[k]) for k in DEVICE_FIELDS
                                       if k in r or k == "step"})
            if trace is not None:
                trace += [(res.step, r["device"], r["start"], r["trace"]) for r in res.records if "trace" in r]
            if progress is not None:
                progress(res.step, res.loss, res.seconds)
            if res.state is not None and on_state is not None:
                on_state(res.step + 1, *res.state)
                saved = res.step + 1
            check_loss(res.step, res.loss)
        done = first + len(losses)
        if interrupted and on_state is not None and losses and saved != done:
            on_state(done, *backend.final_state())  # what the steps that ran left
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return losses, bool(interrupted)


def train(graph, options=None, out=None, **changes):
    """Train ``graph`` (``TrainOptions``, or its fields as keywords);
    returns (losses, params, buffers).

    ``steps`` counts from the start of training: with ``resume`` (a
    checkpoint directory) the run continues at the checkpoint's step, on
    whatever devices this call has (re-planned).
    """
    opts = options or TrainOptions()
    unknown = set(changes) - {f.name for f in fields(TrainOptions)}
    if unknown:
        raise TypeError(f"train() got unknown options {sorted(unknown)}")
    opts = TrainOptions(**{**opts.__dict__, **changes})
    out = out or sys.stdout  # looked up per call: tests and callers swap sys.stdout
    run = _prepare(graph, opts, out)
    backend, workers = None, None
    try:
        backend, workers = _backend(graph, run, opts, out)
        if run.start >= opts.steps:
            out.write(f"the checkpoint is already at step {run.start} of {opts.steps}\n")
            losses, interrupted = [], False
        else:
            losses, interrupted = _loop(backend, run, opts, out)
        params, buffers, _ = backend.final_state() if losses else (run.params, run.buffers, None)
    finally:
        if backend is not None:
            backend.close()
        if workers is not None:
            workers.stop(timeout=10.0)
        run.batches_close()
    if opts.save_weights and not interrupted:
        rweights.save_weights(opts.save_weights, params, buffers)
    if interrupted:
        raise TrainingInterrupted(run.checkpoint_dir, run.saved_step)
    return losses, params, buffers


class TrainingInterrupted(TilecError):
    """Ctrl-C: the run stopped cleanly; the message says where its checkpoint is."""

    def __init__(self, directory, step):
        self.directory, self.step = directory, step
        super().__init__(f"interrupted after step {step}; the checkpoint is in {directory}: continue with "
                         f"--resume {directory}" if step else "interrupted before the first step")


class _Run:
    """What a run starts from: optimiser, weights, data, plan."""


def _prepare(graph, opts, out):
    if opts.kernels not in KERNELS:
        raise PlanError(f"--kernels must be one of {', '.join(KERNELS)}, not {opts.kernels!r}")
    run = _Run()
    net, program, plan = graph.net, graph.to_program(), opts.plan
    if plan is not None:
        if plan["program"] != program:
            raise PlanError("the plan was made for another model (its program differs); recompile it")
        if opts.batch is not None and opts.batch != plan["batch"]:
            raise PlanError(f"--batch {opts.batch} differs from the plan's batch {plan['batch']}")
        run.batch, run.dtype, optimizer = plan["batch"], plan["dtype"], dict(plan["optimizer"])
    else:
        run.batch, run.dtype = opts.batch or net["batch"], opts.dtype
        optimizer = {"lr": net["learning_rate"], "momentum": net["momentum"], "decay": net["decay"]}
    for key, value in (("lr", opts.lr), ("momentum", opts.momentum), ("decay", opts.decay)):
        if value is not None:
            optimizer[key] = value
    run.optimizer, run.program, run.plan = optimizer, program, plan
    if opts.init_weights:
        # .npz (every key required) or darknet .weights (a backbone may cover a prefix)
        from tilec.frontend.darknet_weights import load_any
        run.params, run.buffers = load_any(opts.init_weights, program, run.dtype, opts.seed)
    else:
        run.params, run.buffers = rweights.init_params(program, opts.seed, run.dtype)
    if opts.data and os.path.isdir(opts.data):
        # a YOLO-layout detection dataset, loaded and augmented on a prefetch thread
        from tilec.data.batches import for_model
        run.batches = for_model(program, opts.data, run.batch, seed=opts.seed, dtype=run.dtype)
    elif opts.data:
        run.batches = rdata.load_batches(opts.data, program, run.batch, run.dtype)
    else:
        run.batches = rdata.generated_batches(program, run.batch, opts.seed, run.dtype)
    run.batches_close = getattr(run.batches, "close", lambda: None)
    run.identity = {"data": os.path.abspath(opts.data) if opts.data else None,
                    "seed": None if opts.data else opts.seed, "batch": run.batch}
    run.momentum, run.start = None, 0
    if opts.resume:
        ck = rcheckpoint.load(opts.resume, program, run.dtype)
        saved = {k: ck.meta.get(k) for k in run.identity}
        if saved != run.identity:
            raise PlanError(f"{opts.resume}: the checkpoint was made with data {saved}, this run has {run.identity}")
        run.params, run.buffers, run.momentum, run.start = ck.params, ck.buffers, ck.momentum, ck.step
        out.write(f"resuming after step {run.start} from {opts.resume}\n")
    run.checkpoint_dir = opts.checkpoint
    run.saved_step = None
    run.model = graph.name
    return run


def _ndevices(opts, addresses):
    if addresses is not None:
        return len(addresses)
    if opts.plan is not None:
        return len(opts.plan["devices"])
    return len(opts.devices) if isinstance(opts.devices, list) else opts.devices


def _backend(graph, run, opts, out):
    """(backend, local workers or None), planning first if there is no plan."""
    from tilec import backends
    names = addresses = None
    if opts.cluster:
        names, addresses = _cluster_devices(opts.cluster)
        if run.plan is not None and len(run.plan["devices"]) != len(names):
            raise PlanError(f"the plan has {len(run.plan['devices'])} devices, the cluster file {len(names)}")
    n = _ndevices(opts, addresses)
    if opts.kernels == "reference":
        if n > 1 or run.plan is not None and len(run.plan["devices"]) > 1:
            raise PlanError("--kernels reference runs on one device (it is the oracle); several devices run the "
                            "generated kernels")
        out.write("training on 1 device with the reference executor (numpy kernels)\n")
        return backends.ReferenceBackend(run.program, run.params, run.buffers, run.momentum, run.optimizer), None
    kind = "cluster" if addresses is not None else ("local" if n > 1 and (opts.backend or "local") == "local"
                                                    else "inprocess")
    workers = None
    if kind == "local" and run.start < opts.steps:
        # starting N processes takes a while on a small machine: overlap it with planning
        workers = start_local_workers(n)
    try:
        if run.plan is None:
            from tilec.compile import compile_plan
            run.plan = compile_plan(graph, devices=names or (opts.devices if isinstance(opts.devices, list) else n),
                                    cluster=opts.cluster, batch=run.batch, dtype=run.dtype, grid=opts.grid,
                                    groups=opts.groups, optimizer=run.optimizer, tiled_prefix=opts.tile_layers,
                                    tail=opts.tail)
        elif run.plan["optimizer"] != run.optimizer:
            from tilec_runtime.planfile import seal
            run.plan = seal(dict(run.plan, optimizer=run.optimizer))
        _say_idle(run.plan, out)
        key = None
        if kind == "cluster":
            from tilec_runtime.auth import load_key
            key = load_key(opts.key_file)
        backend = make_backend(run.plan, kind, run.params, run.buffers, run.momentum, out, threads=opts.threads,
                               timeout=opts.timeout, trace=bool(opts.trace), workers=workers, addresses=addresses,
                               key=key, where=opts.cluster)
        return backend, workers
    except BaseException:
        if workers is not None:
            workers.stop(0)
        raise


def start_local_workers(n, log_dir=None):
    from tilec_runtime import launch
    from tilec_runtime.auth import new_key
    workers = launch.LocalWorkers(n, new_key(), log_dir=log_dir)
    workers.start()
    return workers


def make_backend(plan, kind, params, buffers, momentum, out, *, threads=None, timeout=120.0, trace=False,
                 workers=None, addresses=None, key=None, where=None):
    """The backend of ``kind`` (inprocess | local | cluster) for ``plan``,
    saying on ``out`` how the devices run."""
    from tilec import backends
    n = len(plan["devices"])
    if kind == "inprocess":
        from tilec.codegen import build_modules
        (module, _, _), = build_modules([(plan["dtype"],)], progress=lambda msg: out.write(msg + "\n"))
        from tilec_runtime.launch import local_threads
        threads = threads or local_threads(n)
        out.write(f"training on {n} device(s) as threads of this process, {threads} kernel thread(s) each\n")
        return backends.ThreadsBackend(plan, module, params, buffers, momentum, threads, timeout, trace)
    kernel_source = _kernel_source(plan["dtype"], out)
    if kind == "local":
        from tilec_runtime.launch import local_threads
        threads = threads or local_threads(n)
        out.write(f"training on {n} local worker processes, {threads} kernel thread(s) each\n")
        return backends.WorkersBackend(plan, workers.addresses, workers.key.encode(), kernel_source, params, buffers,
                                       momentum, threads, timeout, trace, data_dir=workers.data_dir)
    out.write(f"training on the {n} devices of {where}\n")
    return backends.WorkersBackend(plan, addresses, key, kernel_source, params, buffers, momentum, threads, timeout,
                                   trace)


def _say_idle(plan, out):
    """Name the devices a plan leaves without work, and why."""
    from tilec.compile import idle_note
    note = idle_note(plan)
    if note:
        out.write(note + "\n")


def _loop(backend, run, opts, out):
    every = opts.checkpoint_every or opts.steps if opts.checkpoint else 0
    program = run.program
    ndev = len(run.plan["devices"]) if run.plan else 1

    def save_state(done, p, b, m):
        directory = run.checkpoint_dir or _default_checkpoint(out)
        run.checkpoint_dir = directory
        rcheckpoint.save(directory, done, p, b, m, model=run.model, program=rcheckpoint.program_hash(program),
                         dtype=str(run.dtype), optimizer=run.optimizer, devices=ndev, **run.identity)
        run.saved_step = done

    metrics = MetricsLog(opts.metrics)
    progress = StepProgress(opts.steps, run.batch, out, run.start)
    trace = [] if opts.trace else None
    lr = run.optimizer["lr"]
    interrupted = False
    try:
        # the state is always reported at the end and when interrupted; saved to a
        # checkpoint directory if there is one (an interrupted run makes one)
        losses, interrupted = run_loop(
            backend, run.batches, run.start, opts.steps, batch=run.batch, lr=lambda step: lr, every=every,
            on_state=lambda done, p, b, m: (save_state(done, p, b, m) if (opts.checkpoint or _stopping(backend))
                                            else None),
            metrics=metrics, progress=progress, trace=trace)
    finally:
        progress.close()
        metrics.close()
        if trace:
            from tilec_runtime.trace import write_trace
            write_trace(opts.trace, trace, [d["name"] for d in run.plan["devices"]] if run.plan else ["dev0"])
            out.write(f"trace: {opts.trace} ({len(trace)} device-steps; open in ui.perfetto.dev)\n")
    return losses, interrupted


def _stopping(backend):
    return getattr(backend, "stop", False)


def _default_checkpoint(out):
    path = os.path.join("runs", time.strftime("interrupted-%Y%m%d-%H%M%S"))
    out.write(f"(no --checkpoint given: saving to {path})\n")
    return path


def _cluster_devices(path):
    """(names, addresses) of the devices of a cluster file (``tilec.cluster``)."""
    from tilec.cluster import load_cluster
    found = load_cluster(path)
    for d in found.devices:
        if d.host is None or d.port is None:
            raise PlanError(f"{path}: device {d.name!r} needs a host and a port (where `tilec worker` listens)")
    return found.names, [(d.host, d.port) for d in found.devices]


def _kernel_source(dtype, out):
    """The generated kernels as C, for workers to build on their device."""
    from tilec.codegen import generate
    source = generate((str(dtype),))
    return {"module": source.module, "source": source.text}
