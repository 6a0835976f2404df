"""Single-thread training-step time: generated kernels vs the numpy
reference vs PyTorch, side by side in this one process.

Models (float32, one device, forward + backward + SGD update):

- ``tiny416``: the bundled reference stack (six 3x3 conv + batch norm +
  leaky layers with 2x2 max-pools, a 1x1 conv, a sum-of-squares cost);
  416x416, batch 1 and 4
- ``yolov2-16``: YOLOv2's first 16 layers (0-15 of yolov2.cfg) and a
  sum-of-squares cost; 608x608, batch 1 (any bundled model with ``-N``:
  its first N layers)

Contenders: ``generated`` (tilec_runtime.fused with the generated kernels,
what ``tilec train --devices 1`` runs), ``reference`` (the numpy executor,
``--kernels reference``) and ``torch`` (PyTorch with
``torch.set_num_threads(1)``: nn.Conv2d/BatchNorm2d/LeakyReLU/MaxPool2d,
torch.optim.SGD). Every BLAS is limited to one thread with threadpoolctl.
The contenders run round-robin, one step each per round, so that machine
noise hits all of them alike; the table reports the median over rounds
(and the minimum). GFLOP/s count the convolutions' multiply-adds of a step
(forward, weight gradient, input gradient but for the first layer), the
same number for every contender. The sgemm peak is measured in the same
rounds (one 2048^3 sgemm per round, with the BLAS the generated kernels
call: scipy's), so that a busy machine slows it as it slows the steps; the
fraction of peak is the median step's GFLOP/s over the median sgemm's.

Unset OpenBLAS's kernel overrides for this command only, so that every
library picks its best kernel for the CPU (the table names the kernel):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/kernels.py \
        [--models tiny416:1,tiny416:4,yolov2-16:1] [--rounds 7] [--json kernels.json] [--profile]

``--profile`` adds, per model, where the generated step's time goes (per
kernel function and layer shape), measured over separate steps.
"""
import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def prefix_cfg(program, net, n):
    """A .cfg of the first ``n`` layers of a conv/max-pool chain, then a cost."""
    text = "[net]\nbatch=1\nwidth={w}\nheight={h}\nchannels={c}\nmomentum={momentum}\ndecay={decay}\n" \
           "learning_rate={learning_rate}\n".format(c=program[0]["in_shape"][0], h=program[0]["in_shape"][1],
                                                    w=program[0]["in_shape"][2], **net)
    for layer in program[:n]:
        if layer["kind"] == "conv":
            pad = 1 if layer["pad"] == layer["size"] // 2 else 0
            text += (f"\n[convolutional]\nbatch_normalize={int(layer['bn'])}\nfilters={layer['filters']}\n"
                     f"size={layer['size']}\nstride={layer['stride']}\npad={pad}\nactivation={layer['act']}\n")
        elif layer["kind"] == "maxpool":
            text += f"\n[maxpool]\nsize={layer['size']}\nstride={layer['stride']}\n"
        else:
            raise ValueError(f"layer {layer['index']} is not conv/maxpool")
    return text + "\n[cost]\ntype=sse\n"


def load_graph(name, folder):
    """A bundled model, or the first N layers of one with a sum-of-squares
    cost: ``yolov2-tiny-12``, ``yolov2-16``."""
    from tilec.frontend.models import bundled_names, load_model
    if name in bundled_names():
        return load_model(name)
    base, _, n = name.rpartition("-")
    if base not in bundled_names() or not n.isdigit():
        raise SystemExit(f"unknown model {name!r} (a bundled one, or one of them with -N: its first N layers)")
    g = load_model(base)
    path = Path(folder) / f"{name}.cfg"
    path.write_text(prefix_cfg(g.to_program(), g.net, int(n)))
    return load_model(path)


def conv_flops(program, batch):
    """Multiply-adds x 2 of a training step's convolutions."""
    total = 0
    for layer in program:
        if layer["kind"] == "conv":
            c, (f, h, w) = layer["in_shape"][0], layer["out_shape"]
            fwd = 2 * batch * c * layer["size"] ** 2 * f * h * w
            total += fwd * (3 if layer["inputs"] != [-1] else 2)
    return total


# -- contenders --------------------------------------------------------------

def generated_step(plan, params, buffers, images, target):
    """The one executor on a one-device plan, one kernel thread (what
    ``tilec train --devices 1 --threads 1`` runs)."""
    from tilec.codegen import build_modules
    from tilec_runtime.comm import InProcessHub
    from tilec_runtime.executor import RankExecutor
    (module, _, _), = build_modules([("float32",)])
    hub = InProcessHub(1, 600.0)
    ex = RankExecutor(plan, 0, hub.comm(0), module, params, buffers, threads=1)
    ex.comm.stepping_thread = threading.get_ident()
    return (lambda: ex.step(images, target)), ex


def reference_step(plan, params, buffers, images, target):
    from tilec_runtime import reference
    from tilec_runtime.optim import SGD
    opt = SGD(**plan["optimizer"])
    program = plan["program"]

    def step():
        loss, grads = reference.train_step(program, params, buffers, images, target)
        opt.step(params, grads)
        return loss
    return step


def torch_model(program, params, buffers):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class PadPool(nn.Module):
        """darknet's max-pool padding (-inf) where it changes the output size."""

        def __init__(self, size, stride, pads):
            super().__init__()
            self.pool, self.pads = nn.MaxPool2d(size, stride), pads

        def forward(self, x):
            return self.pool(F.pad(x, self.pads, value=-float("inf")))

    mods = []
    for layer in program:
        i = layer["index"]
        if layer["kind"] == "conv":
            conv = nn.Conv2d(layer["in_shape"][0], layer["filters"], layer["size"], layer["stride"], layer["pad"],
                             bias=not layer["bn"])
            conv.weight.data = torch.tensor(params[f"{i}.conv.weight"])
            mods.append(conv)
            if layer["bn"]:
                bn = nn.BatchNorm2d(layer["filters"], eps=1e-5, momentum=0.1)
                bn.weight.data = torch.tensor(params[f"{i}.bn.weight"])
                bn.bias.data = torch.tensor(params[f"{i}.bn.bias"])
                bn.running_mean.data = torch.tensor(buffers[f"{i}.bn.running_mean"])
                bn.running_var.data = torch.tensor(buffers[f"{i}.bn.running_var"])
                mods.append(bn)
            else:
                conv.bias.data = torch.tensor(params[f"{i}.conv.bias"])
            mods.append({"leaky": nn.LeakyReLU(0.1), "relu": nn.ReLU(), "linear": nn.Identity()}[layer["act"]])
        elif layer["kind"] == "maxpool":
            size, stride, total = layer["size"], layer["stride"], layer["padding"]
            top = total // 2
            _, h, w = layer["in_shape"]
            unpadded = [(h - size) // stride + 1, (w - size) // stride + 1]
            if top == 0 and unpadded == layer["out_shape"][1:]:
                mods.append(nn.MaxPool2d(size, stride))  # the padding is never read: plain pooling
            else:
                mods.append(PadPool(size, stride, (top, total - top, top, total - top)))
    return nn.Sequential(*mods)


def torch_step(plan, params, buffers, images, target):
    import torch
    model = torch_model([l for l in plan["program"] if l["kind"] in ("conv", "maxpool")], params, buffers)
    decayed = [p for n, p in model.named_parameters() if p.dim() == 4]
    rest = [p for n, p in model.named_parameters() if p.dim() != 4]
    opt = plan["optimizer"]
    sgd = torch.optim.SGD([{"params": decayed, "weight_decay": opt["decay"]}, {"params": rest, "weight_decay": 0.0}],
                          lr=opt["lr"], momentum=opt["momentum"])
    x, t = torch.tensor(images), torch.tensor(target)
    b = images.shape[0]

    def step():
        sgd.zero_grad(set_to_none=False)
        y = model(x)
        loss = 0.5 * ((y - t) ** 2).sum() / b
        loss.backward()
        sgd.step()
        return loss.item()
    return step


# -- measurement -------------------------------------------------------------

def sgemm(module, n=2048):
    """A step-like callable: one n^3 sgemm through the kernels' BLAS (scipy's),
    and its FLOPs; plus numpy's BLAS for comparison."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    module.gemm_f32(0, 0, a, b, c)
    return (lambda: module.gemm_f32(0, 0, a, b, c)), (lambda: np.matmul(a, b, out=c)), 2 * n ** 3


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def conv_layers(program, rng, batch, dtype):
    """(layer, input, weights, output gradient) of each conv layer of
    ``program`` on ``batch`` images, the tensors random."""
    for layer in program:
        if layer["kind"] != "conv":
            continue
        c, (f, ho, wo), k = layer["in_shape"][0], layer["out_shape"], layer["size"]
        x = rng.standard_normal((batch, *layer["in_shape"])).astype(dtype)
        w = (rng.standard_normal((f, c, k, k)) * 0.1).astype(dtype)
        yield layer, x, w, rng.standard_normal((batch, f, ho, wo)).astype(dtype)


def round_robin(calls, rounds):
    """({name: [seconds per round]}, {name: median}) of ``calls`` ({name:
    function}), after one warm-up call each, run one call each per round so
    that machine noise hits all of them alike."""
    for fn in calls.values():
        fn()
    times = {who: [] for who in calls}
    for _ in range(rounds):
        for who, fn in calls.items():
            times[who].append(_timed(fn))
    return times, {who: statistics.median(t) for who, t in times.items()}


def profile_generated(trainer, images, target, steps=3):
    """Seconds per step by (kernel function, first argument's shape), and the rest."""
    acc = collections.defaultdict(float)

    def wrap(name, fn):
        def timed(*args, **kw):
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            shape = tuple(getattr(args[0], "shape", ())) if args else ()
            acc[(name, shape)] += time.perf_counter() - t0
            return out
        return timed

    from tilec_runtime.kernel_set import FUNCTIONS as _FUNCTIONS
    kernel_sets = [s.k for s in trainer.tiles.values()] + [trainer.k]
    saved = [{fn: getattr(k, fn) for fn in _FUNCTIONS} for k in kernel_sets]
    for k in kernel_sets:
        for fn in _FUNCTIONS:
            setattr(k, fn, wrap(fn, getattr(k, fn)))
    total = 0.0
    try:
        for _ in range(steps):
            total += _timed(lambda: trainer.step(images, target))
    finally:
        for k, fns in zip(kernel_sets, saved):
            for fn, f in fns.items():
                setattr(k, fn, f)
    rows = sorted(((v / steps, name, shape) for (name, shape), v in acc.items()), reverse=True)
    return total / steps, rows


def openblas_overrides():
    """OpenBLAS's kernel overrides set in the environment ({name: value}), with a warning when any are."""
    overrides = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    if overrides:
        print(f"warning: {overrides} set: OpenBLAS runs a forced kernel; unset them for this command", file=sys.stderr)
    return overrides


def blas_info():
    import threadpoolctl
    return [{"library": os.path.basename(i.get("filepath", "")), "api": i.get("internal_api"),
             "kernel": i.get("architecture"), "version": i.get("version"), "threads": i.get("num_threads")}
            for i in threadpoolctl.threadpool_info()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny416:1,tiny416:4,yolov2-16:1", help="name:batch,...")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--contenders", default="generated,reference,torch")
    ap.add_argument("--json", default="kernels.json")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    import threadpoolctl
    import torch
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    from tilec.codegen import build_modules
    from tilec.compile import compile_plan
    from tilec_runtime import weights

    overrides = openblas_overrides()
    (module, _, _), = build_modules([("float32",)], progress=lambda m: print(m, file=sys.stderr))
    # scipy's BLAS is loaded with the kernel module: limit threads after that
    limiter = threadpoolctl.threadpool_limits(1)
    gemm, np_gemm, gemm_flops = sgemm(module)
    peak = gemm_flops / min(_timed(gemm) for _ in range(5)) / 1e9
    np_peak = gemm_flops / min(_timed(np_gemm) for _ in range(5)) / 1e9
    contenders = args.contenders.split(",")
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpus": os.cpu_count(), "python": sys.version.split()[0], "numpy": np.__version__,
                           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "blas": blas_info(), "openblas_overrides": overrides},
               "sgemm_gflops": peak, "numpy_sgemm_gflops": np_peak, "runs": []}
    print(f"sgemm, 1 thread, 2048^3, best of 5 at the start: {peak:.1f} GFLOP/s (scipy's BLAS, used by the "
          f"generated kernels), {np_peak:.1f} GFLOP/s (numpy's BLAS)")
    print("BLAS: " + "; ".join(f"{b['library']} {b['version']} kernel {b['kernel']} threads {b['threads']}"
                               for b in results["machine"]["blas"]))
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models.split(","):
            name, batch = spec.split(":")
            batch = int(batch)
            graph = load_graph(name, tmp)
            plan = compile_plan(graph, devices=1, batch=batch, dtype="float32")
            program = plan["program"]
            rng = np.random.default_rng(0)
            images = rng.standard_normal((batch, *program[0]["in_shape"]), dtype=np.float32)
            target = rng.standard_normal((batch, *program[-1]["out_shape"]), dtype=np.float32)
            steps, losses, trainer = {}, {}, None
            for who in contenders:
                params, buffers = weights.init_params(program, 0, "float32")
                if who == "generated":
                    steps[who], trainer = generated_step(plan, params, buffers, images, target)
                elif who == "reference":
                    steps[who] = reference_step(plan, params, buffers, images, target)
                elif who == "torch":
                    steps[who] = torch_step(plan, params, buffers, images, target)
                else:
                    raise SystemExit(f"unknown contender {who!r}")
                losses[who] = [steps[who]() for _ in range(args.warmup)]
            times = {who: [] for who in contenders + ["sgemm"]}
            for _ in range(args.rounds):
                for who in contenders:
                    times[who].append(_timed(steps[who]))
                times["sgemm"].append(_timed(gemm))
            flops = conv_flops(program, batch)
            run_peak = gemm_flops / statistics.median(times["sgemm"]) / 1e9
            run = {"model": name, "batch": batch, "conv_gflop_per_step": flops / 1e9, "first_losses": losses,
                   "sgemm_gflops_median": run_peak, "sgemm_times_s": times["sgemm"], "contenders": {}}
            for who in contenders:
                med, best = statistics.median(times[who]), min(times[who])
                run["contenders"][who] = {"median_s": med, "min_s": best, "times_s": times[who],
                                          "gflops": flops / med / 1e9, "peak_fraction": flops / med / 1e9 / run_peak}
            if "torch" in contenders:
                for who in contenders:
                    c = run["contenders"][who]
                    c["speedup_vs_torch"] = run["contenders"]["torch"]["median_s"] / c["median_s"]
            if args.profile and trainer is not None:
                total, rows = profile_generated(trainer, images, target)
                run["profile"] = {"step_s": total, "kernels": [{"function": n, "shape": list(s), "s": t}
                                                                for t, n, s in rows]}
            results["runs"].append(run)
            _print_run(run)
    limiter.restore_original_limits()
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {args.json}")


def _print_run(run):
    print(f"\n{run['model']} batch {run['batch']}: {run['conv_gflop_per_step']:.2f} GFLOP of convolution per step; "
          f"sgemm in the same rounds: {run['sgemm_gflops_median']:.1f} GFLOP/s (median)")
    print("| contender | median s | min s | GFLOP/s | of sgemm peak | vs torch |")
    print("|---|---|---|---|---|---|")
    for who, c in run["contenders"].items():
        vs = f"{c['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in c else "-"
        print(f"| {who} | {c['median_s']:.4f} | {c['min_s']:.4f} | {c['gflops']:.1f} | "
              f"{100 * c['peak_fraction']:.0f}% | {vs} |")
    first = {who: l[0] for who, l in run["first_losses"].items()}
    print("first-step losses: " + ", ".join(f"{who} {l:.6g}" for who, l in first.items()))
    if "profile" in run:
        prof = run["profile"]
        kern = sum(r["s"] for r in prof["kernels"])
        print(f"generated step {prof['step_s'] * 1e3:.1f} ms: kernels {kern * 1e3:.1f} ms, "
              f"Python between them {(prof['step_s'] - kern) * 1e3:.1f} ms; by function and input shape:")
        by_fn = collections.defaultdict(float)
        for r in prof["kernels"]:
            by_fn[r["function"]] += r["s"]
        print("  " + ", ".join(f"{fn} {t * 1e3:.1f} ms" for fn, t in sorted(by_fn.items(), key=lambda kv: -kv[1])))
        for r in prof["kernels"][:12]:
            print(f"  {r['s'] * 1e3:7.2f} ms  {r['function']:<18} {tuple(r['shape'])}")


if __name__ == "__main__":
    main()
