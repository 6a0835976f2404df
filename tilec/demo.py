"""`tilec train` with no arguments: object detection end to end, on this machine.

1. data: the synthetic dataset (``tilec.data.synth``), made once and cached
   in tilec's cache directory (``$TILEC_CACHE``, else ``~/.cache/tilec``);
2. plan: the small detector (``detector-small``) planned for a local
   cluster of 2 workers by the cost model and CP-SAT (``tilec.compile``):
   ``plan.json``, ``plan.dot``;
3. prediction: the plan replayed against this machine's profile
   (``tilec.inspect.simulate``): ``timeline.png``;
4. training: one worker process per device over loopback
   (``tilec_runtime.launch``), with a progress bar (loss, images/s, ETA),
   ``metrics.jsonl`` and a checkpoint every few steps, so that Ctrl-C
   leaves a run that ``resume`` continues;
5. evaluation: mAP@0.5 on the validation split (``tilec.eval``);
6. outputs: ``weights.npz`` and darknet's ``weights.weights``,
   ``loss.png``, ``eval.txt`` and ``summary.txt``/``summary.json``: the
   measured step time and memory of each device next to the predictions.

"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from tilec.errors import TilecError
from tilec.progress import StepProgress, clock
from tilec.train import MetricsLog

DEMO_FILE = "demo.json"


@dataclass
class DemoConfig:
    model: str = "detector-small"
    devices: int = 2
    steps: int = 800
    images: int = 1500          # synthetic images (train + val)
    seed: int = 0
    dtype: str = "float32"
    backend: str = "local"      # local (worker processes) | inprocess (threads)
    kernels: str = "generated"  # generated (tilec.codegen, compiled once and cached) | reference (numpy)
    checkpoint_every: int = 20
    lr_steps: tuple = (0.7, 0.9)  # fractions of the run after which the learning rate drops
    lr_scale: float = 0.1
    data: str = None            # a YOLO-layout dataset; default: the cached synthetic one
    batch: int = None           # default: the model's [net] batch
    lr: float = None            # default: the model's [net] learning_rate
    evaluate: bool = True


def cache_dir():
    """Where the synthetic dataset is kept: tilec's cache (``$TILEC_CACHE``, else ``~/.cache/tilec``)."""
    from tilec_runtime.build_cache import cache_dir as tilec_cache
    return tilec_cache()


def synthetic_dataset(images, seed, out):
    """The cached synthetic dataset (made now if missing); its directory."""
    from tilec.data.synth import VERSION, make_dataset
    from tilec_runtime.files import atomic_path

    path = os.path.join(cache_dir(), f"synth-v{VERSION}-n{images}-seed{seed}")
    if os.path.exists(os.path.join(path, "dataset.json")):
        out.write(f"data: {path} (cached)\n")
        return path
    out.write(f"data: making {images} synthetic images in {path} ...\n")
    out.flush()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:  # complete or absent: an interrupted run makes it again
        make_dataset(tmp, n=images, seed=seed)
    return path


# -- stages ------------------------------------------------------------------------

def make_plan(graph, cfg, batch, optimizer, run_dir, out):
    """The optimiser's plan, written with its report (plan.txt) and DOT graph to ``run_dir``."""
    from tilec.compile import plan_with_solution, prediction_report
    from tilec.inspect.dot import plan_dot
    from tilec_runtime.planfile import write_plan
    plan, solution, _ = plan_with_solution(graph, devices=cfg.devices, batch=batch, dtype=cfg.dtype,
                                           optimizer=optimizer)
    write_plan(plan, run_dir)
    groups = [g for g in plan["groups"] if g["kind"] == "tiled"]
    desc = ", ".join(f"layers {g['layers'][0]}-{g['layers'][1]} on "
                     f"{len(g['row_splits']) - 1}x{len(g['col_splits']) - 1}" for g in groups)
    out.write(f"plan: {plan['model']} on {cfg.devices} devices: {desc}; tail on rank 0 "
              f"({run_dir}/plan.json)\n")
    with open(os.path.join(run_dir, "plan.txt"), "w") as f:
        f.write(prediction_report(plan, solution) + "\n")
    with open(os.path.join(run_dir, "plan.dot"), "w") as f:
        f.write(plan_dot(plan))
    return plan


def simulate_plan(plan, run_dir, out):
    """The plan's step simulated against this machine's profile (a SimResult); draws timeline.png."""
    from tilec.cluster import plan_cluster
    from tilec.inspect.simulate import simulate, timeline_png
    names = [d["name"] for d in plan["devices"]]
    result = simulate(plan, plan_cluster(plan), keep_events=True)
    path = os.path.join(run_dir, "timeline.png")
    timeline_png(result, names, path, f"{plan['model']} batch {plan['batch']}: simulated {result.step_s:.3f} s "
                                      f"per step on this machine's profile")
    out.write(f"simulate: {result.step_s:.3f} s per step predicted ({path})\n")
    return result


def lr_schedule(cfg, base_lr):
    """darknet's ``steps`` policy: ``base_lr`` times ``cfg.lr_scale`` after each
    fraction of the run in ``cfg.lr_steps``. Returns (lr of a step, change points)."""
    points = [int(round(f * cfg.steps)) for f in cfg.lr_steps]

    def lr(step):
        return base_lr * cfg.lr_scale ** sum(step >= p for p in points)
    return lr, points


def run_training(plan, program, params, buffers, batches, first, steps, lr, momentum, cfg, run_dir, on_step,
                 on_metrics, on_state, out):
    """Train steps ``first .. steps-1`` on the plan's devices with the one
    training loop (``tilec.train.run_loop``), the learning rate ``lr(step)``;
    returns (params, buffers, interrupted)."""
    from tilec import backends
    from tilec.train import make_backend, run_loop, start_local_workers
    workers = None
    if cfg.kernels == "reference":
        if len(plan["devices"]) > 1:
            raise TilecError("--kernels reference runs on one device (the oracle)")
        out.write("train: 1 device, the reference executor\n")
        optimizer = dict(plan["optimizer"])
        backend = backends.ReferenceBackend(program, params, buffers, momentum, optimizer)
    else:
        kind = cfg.backend if len(plan["devices"]) > 1 else "inprocess"
        if kind == "local":
            workers = start_local_workers(len(plan["devices"]), log_dir=os.path.join(run_dir, "logs"))
        backend = make_backend(plan, kind, params, buffers, momentum, _Prefixed(out, "train: "), workers=workers)
    try:
        progress = _Hooks(on_step, on_metrics)
        losses, interrupted = run_loop(backend, batches, first, steps, batch=plan["batch"], lr=lr,
                                       every=cfg.checkpoint_every, on_state=on_state, metrics=progress,
                                       progress=progress.step)
        params, buffers, _ = backend.final_state() if losses else (params, buffers, None)
    finally:
        backend.close()
        if workers is not None:
            workers.stop(timeout=10.0)
    return params, buffers, interrupted


class _Hooks:
    """run_loop's metrics and progress, handed to the demo's callbacks."""

    def __init__(self, on_step, on_metrics):
        self.on_step, self.on_metrics = on_step, on_metrics

    def write(self, record):
        if "device" in record and self.on_metrics:
            self.on_metrics([record])

    def step(self, step, loss, seconds):
        self.on_step(step, loss, seconds)

    def note(self, text):
        print(text)


class _Prefixed:
    def __init__(self, out, prefix):
        self.out, self.prefix = out, prefix

    def write(self, text):
        self.out.write(self.prefix + text if text.strip() else text)


def evaluate(program, params, buffers, data_dir, out):
    """(mAP, per-class results, table text) on the val split."""
    from tilec.data.yolo import load_split
    from tilec.eval.detect import detect_dataset
    from tilec.eval.map import evaluate as voc_map
    from tilec.eval.map import format_table
    val = load_split(data_dir, "val")
    dets, truths = detect_dataset(program, params, buffers, val)
    mean_ap, per_class = voc_map(dets, truths, val.classes)
    table = format_table(mean_ap, per_class)
    out.write(f"eval: {len(val.items)} validation images\n{table}\n")
    return mean_ap, per_class, table


def summary(plan, records, sim, step_seconds, evaluation):
    """Measured vs predicted step time and memory per device (JSON-able)."""
    names = [d["name"] for d in plan["devices"]]
    pred = plan.get("predicted") or {}
    per_pred = {d["name"]: d for d in pred.get("per_device", [])}
    start = min((r["step"] for r in records), default=0)
    steady = [r for r in records if r["step"] >= start + 3] or records  # the first steps warm up
    devices = []
    for rank, name in enumerate(names):
        mine = [r for r in steady if r["device"] == rank]
        p = per_pred.get(name, {})
        devices.append({
            "name": name,
            "measured_step_s": float(np.median([r["step_s"] for r in mine])) if mine else None,
            "measured_compute_s": float(np.median([r["compute_s"] for r in mine])) if mine else None,
            "measured_wait_s": float(np.median([r["wait_s"] for r in mine])) if mine else None,
            # (threads of one process have no memory of their own to measure)
            "measured_peak_rss_bytes": int(max(r["peak_bytes"] for r in mine)) if mine and "peak_bytes" in mine[0]
            else None,
            "measured_sent_bytes_per_step": float(np.median([r["bytes_sent"] for r in mine])) if mine else None,
            "predicted_compute_s": p.get("compute_s"),
            "predicted_memory_bytes": p.get("memory_bytes"),
            "simulated_busy_s": sim.busy_s[rank],
            "simulated_sent_bytes": sim.sent_bytes[rank],
        })
    return {"model": plan["model"], "batch": plan["batch"], "dtype": plan["dtype"], "devices": devices,
            "measured_step_s": float(np.median(step_seconds[3:] or step_seconds)) if step_seconds else None,
            "predicted_step_s": pred.get("step_s"), "simulated_step_s": sim.step_s,
            "map50": evaluation[0] if evaluation else None,
            "ap50": {r.name: r.ap for r in evaluation[1]} if evaluation else None}


def summary_text(s):
    def sec(v):
        return "      -" if v is None else f"{v:7.3f}"

    def mb(v):
        return "      -" if v is None else f"{v / 1e6:7.1f}"

    lines = [f"{s['model']}, batch {s['batch']}, {s['dtype']}, {len(s['devices'])} device(s)",
             f"step time: measured {sec(s['measured_step_s'])} s   cost model {sec(s['predicted_step_s'])} s   "
             f"simulated {sec(s['simulated_step_s'])} s",
             "",
             f"{'device':<8} {'step s':>7} {'compute':>7} {'wait':>7} | {'predicted':>9} {'simulated':>9} |"
             f" {'peak RSS MB':>11} {'predicted MB':>12} | {'sent MB/step':>12}",
             f"{'':<8} {'measured':^23} | {'compute s':^19} | {'memory':^25} |"]
    for d in s["devices"]:
        sent = "           -" if d["measured_sent_bytes_per_step"] is None else \
            f"{d['measured_sent_bytes_per_step'] / 1e6:12.2f}"
        lines.append(f"{d['name']:<8} {sec(d['measured_step_s'])} {sec(d['measured_compute_s'])} "
                     f"{sec(d['measured_wait_s'])} | {sec(d['predicted_compute_s'])}   {sec(d['simulated_busy_s'])}   |"
                     f" {mb(d['measured_peak_rss_bytes'])}     {mb(d['predicted_memory_bytes'])}      | {sent}")
    lines.append("peak RSS is the whole worker process (Python and numpy included); the prediction counts the "
                 "model's state, kept activations and workspace only")
    if s.get("map50") is not None:
        lines.append(f"validation mAP@0.5: {s['map50']:.4f}")
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------

def run_demo(cfg=None, run_dir=None, resume=None, out=None):
    """Run (or, with ``resume`` a run directory, continue) the demo; returns its summary dict."""
    out = out or sys.stdout
    from tilec.data.batches import for_model
    from tilec.frontend.darknet_weights import write_darknet
    from tilec.frontend.models import load_model
    from tilec_runtime import checkpoint as rcheckpoint
    from tilec_runtime import weights as rweights

    t_start = time.perf_counter()
    if resume:
        run_dir = resume
        try:
            with open(os.path.join(run_dir, DEMO_FILE)) as f:
                cfg = DemoConfig(**json.load(f))
        except (OSError, ValueError, TypeError) as exc:
            raise TilecError(f"{run_dir}: not a demo run directory ({DEMO_FILE}: {exc})") from None
    cfg = cfg or DemoConfig()
    run_dir = run_dir or os.path.join("runs", time.strftime("demo-%Y%m%d-%H%M%S"))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, DEMO_FILE), "w") as f:
        json.dump(asdict(cfg), f, indent=1)
    out.write(f"run directory: {run_dir}\n")

    data_dir = cfg.data or synthetic_dataset(cfg.images, cfg.seed, out)
    graph = load_model(cfg.model)
    program = graph.to_program()
    region = program[-1]
    if region["kind"] != "region":
        raise TilecError(f"the demo trains a detector; {cfg.model} ends in [{region['kind']}]")
    net = graph.net
    batch = cfg.batch or net["batch"]
    optimizer = {"lr": cfg.lr or net["learning_rate"], "momentum": net["momentum"], "decay": net["decay"]}

    plan = make_plan(graph, cfg, batch, optimizer, run_dir, out)
    sim = simulate_plan(plan, run_dir, out)

    params, buffers = rweights.init_params(program, cfg.seed, cfg.dtype)
    first, momentum = 0, None
    if resume and os.path.exists(os.path.join(run_dir, rcheckpoint.FILENAME)):
        ck = rcheckpoint.load(run_dir, program, cfg.dtype)
        params, buffers, momentum, first = ck.params, ck.buffers, ck.momentum, ck.step
        out.write(f"resuming after step {first}\n")
    metrics = MetricsLog(os.path.join(run_dir, "metrics.jsonl"), append=True)
    records, step_seconds, losses = [], [], []
    progress = StepProgress(cfg.steps, batch, out, first, every=1 if out.isatty() else 10)

    def on_step(step, loss, seconds):
        metrics.write({"step": step, "loss": loss, "step_s": seconds, "images_per_s": batch / max(seconds, 1e-12),
                       "lr": lr(step)})
        losses.append(loss)
        step_seconds.append(seconds)
        progress(step, loss, seconds)

    def on_metrics(recs):
        for r in recs:
            record = {k: r[k] for k in ("step", "device", "name", "step_s", "compute_s", "wait_s", "bytes_sent",
                                        "peak_bytes") if k in r}
            records.append(record)
            metrics.write(record)

    def on_state(done, p, b, m):
        rcheckpoint.save(run_dir, done, p, b, m, model=graph.name, program=rcheckpoint.program_hash(program),
                         dtype=cfg.dtype, optimizer=optimizer, devices=len(plan["devices"]), demo=True)

    batches = for_model(program, data_dir, batch, seed=cfg.seed, dtype=cfg.dtype)
    out.write(f"train: {len(batches)} images, batch {batch}, {cfg.steps} steps, lr {optimizer['lr']:g} "
              f"(x{cfg.lr_scale:g} after steps {', '.join(str(p) for p in lr_schedule(cfg, 1)[1])})\n")
    lr, _ = lr_schedule(cfg, optimizer["lr"])
    interrupted = False
    try:
        if first < cfg.steps:
            params, buffers, interrupted = run_training(plan, program, params, buffers, batches, first, cfg.steps, lr,
                                                        momentum, cfg, run_dir, on_step, on_metrics, on_state, out)
    finally:
        progress.close()
        batches.close()
        metrics.close()
    if interrupted:
        done = _checkpoint_step(run_dir)
        out.write(f"\ninterrupted. {'The checkpoint after step ' + str(done) if done else 'No checkpoint yet'} "
                  f"is in {run_dir}; continue with: tilec train --resume {run_dir}\n")
        from tilec.train import TrainingInterrupted
        raise TrainingInterrupted(run_dir, done)
    loss_file = _all_losses(run_dir)
    rweights.save_weights(os.path.join(run_dir, "weights.npz"), params, buffers)
    write_darknet(os.path.join(run_dir, "weights.weights"), program, params, buffers, seen=cfg.steps * batch)
    evaluation = None
    if cfg.evaluate:
        evaluation = evaluate(program, params, buffers, data_dir, out)
        with open(os.path.join(run_dir, "eval.txt"), "w") as f:
            f.write(evaluation[2] + "\n")
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"event": "eval", "step": cfg.steps, "map50": evaluation[0],
                                "ap50": {r.name: r.ap for r in evaluation[1]}}) + "\n")
    from tilec.eval.curve import loss_curve_png
    loss_curve_png([v for _, v in loss_file], os.path.join(run_dir, "loss.png"),
                   title=f"{graph.name}: training loss on {len(plan['devices'])} device(s), batch {batch}",
                   first_step=loss_file[0][0] if loss_file else 0,
                   markers=[(cfg.steps - 1, evaluation[0])] if evaluation else None)
    result = summary(plan, records, sim, step_seconds, evaluation)
    result["wall_s"] = time.perf_counter() - t_start
    result["run_dir"] = run_dir
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = summary_text(result)
    with open(os.path.join(run_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    out.write("\n" + text + f"\n\nwall time {clock(result['wall_s'])}; outputs in {run_dir}: plan.json, plan.dot, "
              f"timeline.png, loss.png, metrics.jsonl, weights.npz, weights.weights, eval.txt, summary.txt\n")
    return result


def _checkpoint_step(run_dir):
    from tilec_runtime import checkpoint as rcheckpoint
    try:
        return rcheckpoint.load(run_dir).step
    except rcheckpoint.CheckpointError:
        return None


def _all_losses(run_dir):
    """(step, loss) of every step in metrics.jsonl (a resumed run's earlier steps too), the last record per step."""
    losses = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r and "device" not in r and r.get("loss") is not None:
                losses[r["step"]] = r["loss"]
    return sorted(losses.items())


def same_weights(steps=20, devices=2, batch=None, backend="local", images=1500, seed=0, data=None,
                 kernels="generated", out=None):
    """Train the demo's model ``steps`` steps in float64 from one initialisation
    on the same batches, on 1 device (the reference executor) and on
    ``devices`` (the plan, with ``kernels``), and return the largest relative
    difference of any parameter or buffer, ``max |a - b| / max |a|`` per array."""
    from tilec.compile import compile_plan
    from tilec.data.batches import for_model
    from tilec.frontend.models import load_model
    from tilec_runtime import weights as rweights

    out = out or sys.stdout
    cfg = DemoConfig(devices=devices, steps=steps, images=images, seed=seed, dtype="float64", backend=backend,
                     checkpoint_every=steps, data=data, batch=batch, kernels=kernels)
    data_dir = cfg.data or synthetic_dataset(images, seed, out)
    graph = load_model(cfg.model)
    program = graph.to_program()
    net = graph.net
    batch = batch or net["batch"]
    optimizer = {"lr": net["learning_rate"], "momentum": net["momentum"], "decay": net["decay"]}
    source = for_model(program, data_dir, batch, seed=seed, dtype="float64", prefetch=0)
    lr, _ = lr_schedule(cfg, optimizer["lr"])
    results = []
    for n, k in ((1, "reference"), (devices, kernels)):
        plan = compile_plan(graph, devices=n, batch=batch, dtype="float64", optimizer=optimizer)
        params, buffers = rweights.init_params(program, seed, "float64")
        params, buffers, _ = run_training(plan, program, params, buffers, source, 0, steps, lr, None,
                                          replace(cfg, kernels=k), cache_dir(), lambda *a: None, None,
                                          lambda *a: None, out)
        results.append({**params, **buffers})
    one, many = results
    return max(float(np.max(np.abs(one[k] - many[k])) / max(float(np.max(np.abs(one[k]))), 1e-300)) for k in one)


def run_from_args(args):
    """`tilec train` without a MODEL: the demo (``--resume RUN`` continues one,
    ``--checkpoint DIR`` names the run directory, ``--backend`` and
    ``--kernels`` say how the devices run, ``--steps`` and ``--devices``
    override the demo's 800 steps on 2 devices); the other training flags
    apply when a MODEL is given."""
    if args.resume:
        run_demo(resume=args.resume)
    else:
        chosen = {k: v for k, v in (("steps", args.steps), ("devices", args.devices)) if v is not None}
        run_demo(DemoConfig(backend=args.backend or "local", kernels=args.kernels, **chosen), run_dir=args.checkpoint)
    return 0
