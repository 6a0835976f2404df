"""Training on worker processes over loopback sockets: 2 workers vs 1, and
tilec vs PyTorch DistributedDataParallel, side by side in one run.

Model: the YOLOv2-tiny-shaped ``tiny416`` of ``benchmarks/kernels.py`` (six
3x3 conv + batch norm + leaky layers, 16..512 filters, max-pools, a
sum-of-squares cost), 416x416, float32, SGD with momentum.

Runs (every process limited to one BLAS thread, as one device would be):

- ``tilec 1 worker`` / ``tilec 2 workers``: `tilec train --backend local`'s
  machinery (``tilec_runtime.launch``) with the plan `tilec compile
  --devices N` makes, batch 1 and batch 2, the generated kernels (or with
  ``--kernels reference`` the numpy ones). Step time is rank 0's wall time
  per step (the launcher's view of a step); memory is each worker's peak
  resident set during a step (VmHWM, reset at every step start).
- ``torch DDP 2 procs``: nn.Conv2d/BatchNorm2d/LeakyReLU/MaxPool2d under
  DistributedDataParallel (gloo, 2 processes, ``torch.set_num_threads(1)``),
  global batch 2 (one image per process). Step time per process (from a
  barrier to after ``optimizer.step()``); memory per process as above.

The runs alternate round by round (1 worker, 2 workers, DDP, ...), so that
load from other processes on the machine hits them alike; tables give the
median over all measured steps (the first step of every job is a warm-up
and is dropped) and the minimum. The machine's usable parallelism is
measured in the same run: the throughput of two single-threaded processes
running a matmul loop side by side, relative to one alone (2.0 = two free
cores). On a shared machine, read the 2-vs-1 speedup against that number.

    python benchmarks/cluster.py [--rounds 3] [--steps 4] [--kernels generated|reference] \
        [--json cluster.json] [--no-torch]

Next to each tilec run: the simulator's prediction (``tilec simulate``: the
plan replayed against copies of this machine's profile, ``tilec profile``)
and its error relative to the measured median.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# -- the machine ---------------------------------------------------------------------

CAPACITY = """
import time, numpy as np
a = np.random.default_rng(0).standard_normal((500, 500)).astype(np.float32)
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < {seconds}:
    a @ a
    n += 1
print(n / (time.perf_counter() - t0))
"""


def parallel_capacity(seconds=2.0):
    """Throughput of two single-threaded processes side by side / one alone."""
    code = CAPACITY.format(seconds=seconds)
    env = dict(os.environ, **ONE_THREAD)
    solo = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout)
    pair = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    both = sum(float(p.communicate()[0]) for p in pair)
    return both / solo


# -- tilec ---------------------------------------------------------------------------------


def load_tiny416(folder):
    from kernels import tiny_cfg
    from tilec.frontend.models import load_model
    path = Path(folder) / "tiny416.cfg"
    path.write_text(tiny_cfg())
    return load_model(path)


def tilec_job(graph, devices, batch, steps, kernel_source):
    """One job on ``devices`` local workers; returns per-step records."""
    from tilec.compile import compile_plan
    from tilec_runtime import data, launch, weights
    program = graph.to_program()
    plan = compile_plan(graph, devices=devices, batch=batch, dtype="float32")
    params, buffers = weights.init_params(program, 0, "float32")
    batches = data.generated_batches(program, batch, 0, "float32")
    records = []
    launch.train_local(plan, params, buffers, batches, steps=steps, threads=1, on_metrics=records.append,
                       kernel_source=kernel_source)
    return plan, records[1:]


def summarise_tilec(records):
    """Step seconds (rank 0's view), per-worker peaks and waits."""
    n = len(records[0])
    return {
        "step_s": [r[0]["step_s"] for r in records],
        "peak_bytes": [max(r[d]["peak_bytes"] for r in records) for d in range(n)],
        "cpu_s": [statistics.median(r[d]["cpu_s"] for r in records) for d in range(n)],
        "wait_s": [statistics.median(r[d]["wait_s"] for r in records) for d in range(n)],
        "sent_bytes": [records[-1][d]["bytes_sent"] for d in range(n)],
    }


def predicted(plan):
    """The simulator's step time for ``plan`` on copies of this machine's
    profile (``tilec simulate``), or None where there is no simulator."""
    try:
        from tilec.compile import resolve_cluster
        from tilec.inspect.simulate import simulate
    except ImportError:
        return None
    names = [d["name"] for d in plan["devices"]]
    return simulate(plan, resolve_cluster(names, None), keep_events=False).step_s


# -- PyTorch DDP ---------------------------------------------------------------------------


def ddp_rank(args):
    """One DistributedDataParallel process (run by this script itself)."""
    import torch
    import torch.distributed as dist
    from kernels import torch_model
    from tilec_runtime import data, weights
    from tilec_runtime.worker import peak_bytes, reset_peak
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    dist.init_process_group("gloo", rank=args.ddp_rank, world_size=2)
    graph = load_tiny416(args.folder)
    program = graph.to_program()
    params, buffers = weights.init_params(program, 0, "float32")
    model = torch_model([layer for layer in program if layer["kind"] in ("conv", "maxpool")], params, buffers)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = graph.net
    decayed = [p for p in ddp.parameters() if p.dim() == 4]
    rest = [p for p in ddp.parameters() if p.dim() != 4]
    sgd = torch.optim.SGD([{"params": decayed, "weight_decay": opt["decay"]}, {"params": rest, "weight_decay": 0.0}],
                          lr=opt["learning_rate"], momentum=opt["momentum"])
    local = args.batch // 2
    batches = data.generated_batches(program, args.batch, 0, "float32")
    times, peaks = [], []
    for step in range(args.steps):
        images, target = batches.get(step)
        x = torch.tensor(images[args.ddp_rank * local:(args.ddp_rank + 1) * local])
        t = torch.tensor(target[args.ddp_rank * local:(args.ddp_rank + 1) * local])
        dist.barrier()
        reset_peak()
        t0 = time.perf_counter()
        sgd.zero_grad(set_to_none=False)
        loss = 0.5 * ((ddp(x) - t) ** 2).sum() / args.batch
        loss.backward()  # DDP all-reduces the gradients (averaged over processes) in here
        sgd.step()
        times.append(time.perf_counter() - t0)
        peaks.append(peak_bytes())
    dist.destroy_process_group()
    print(json.dumps({"step_s": times[1:], "peak_bytes": max(peaks[1:])}))


def ddp_job(folder, batch, steps, port):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **ONE_THREAD)
    procs = [subprocess.Popen([sys.executable, __file__, "--ddp-rank", str(r), "--folder", folder, "--batch",
                               str(batch), "--steps", str(steps)], stdout=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    try:
        outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return {"step_s": [max(a, b) for a, b in zip(outs[0]["step_s"], outs[1]["step_s"])],
            "peak_bytes": [o["peak_bytes"] for o in outs]}


# -- the tables ------------------------------------------------------------------------------


def merge(runs):
    out = {"step_s": [], "peak_bytes": None}
    for r in runs:
        out["step_s"] += r["step_s"]
        out["peak_bytes"] = r["peak_bytes"] if out["peak_bytes"] is None else [
            max(a, b) for a, b in zip(out["peak_bytes"], r["peak_bytes"])]
        for key in ("cpu_s", "wait_s", "sent_bytes"):
            if key in r:
                out.setdefault(key, []).append(r[key])
    for key in ("cpu_s", "wait_s", "sent_bytes"):
        if key in out:
            out[key] = [statistics.median(v) for v in zip(*out[key])]
    return out


def row(name, r, base=None, prediction=None):
    med, best = statistics.median(r["step_s"]), min(r["step_s"])
    peak = max(r["peak_bytes"])
    speed = f"{statistics.median(base['step_s']) / med:5.2f}x" if base else "     -"
    mem = f"{peak / max(base['peak_bytes']):5.2f}x" if base else "     -"
    extra = ""
    if "cpu_s" in r:
        extra = "  cpu/wait s " + " ".join(f"{c:.3f}/{w:.3f}" for c, w in zip(r["cpu_s"], r["wait_s"]))
        extra += "  sent MB " + " ".join(f"{b / 1e6:.1f}" for b in r["sent_bytes"])
    sim = "      -         " if prediction is None else f"{prediction:6.3f} ({prediction / med - 1:+4.0%})"
    return (f"{name:<22} {med:8.3f} {best:8.3f} {speed:>8} "
            f"{' '.join(f'{p / 2**20:6.0f}' for p in r['peak_bytes']):>14} {mem:>7}  {sim}{extra}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per job (the first is a warm-up)")
    ap.add_argument("--json", default="cluster.json")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--kernels", choices=("generated", "reference"), default="generated",
                    help="what the workers run (as `tilec train --kernels`; default generated)")
    ap.add_argument("--ddp-rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ddp_rank is not None:
        return ddp_rank(args)

    os.environ.update(ONE_THREAD)  # this process too (it runs nothing heavy, but be fair)
    folder = tempfile.mkdtemp(prefix="tilec-cluster-bench-")
    graph = load_tiny416(folder)
    kernel_source = None
    if args.kernels == "generated":
        from tilec.codegen import generate
        source = generate(("float32",))
        kernel_source = {"module": source.module, "source": source.text}
    capacity_before = parallel_capacity()
    runs = {}
    plans = {}
    contenders = [("tilec 1 worker b1", 1, 1), ("tilec 2 workers b1", 2, 1),
                  ("tilec 1 worker b2", 1, 2), ("tilec 2 workers b2", 2, 2)]
    for rnd in range(args.rounds):
        for name, devices, batch in contenders:
            plan, records = tilec_job(graph, devices, batch, args.steps, kernel_source)
            plans[name] = plan
            runs.setdefault(name, []).append(summarise_tilec(records))
            print(f"round {rnd + 1}: {name}: {[round(r[0]['step_s'], 3) for r in records]}", file=sys.stderr)
        if not args.no_torch:
            got = ddp_job(folder, 2, args.steps, 29500 + rnd)
            runs.setdefault("torch DDP 2 procs b2", []).append(got)
            print(f"round {rnd + 1}: torch DDP: {[round(s, 3) for s in got['step_s']]}", file=sys.stderr)
    capacity_after = parallel_capacity()
    merged = {name: merge(r) for name, r in runs.items()}

    print(f"tiny416 (YOLOv2-tiny-shaped), 416x416, float32, one BLAS thread per process, {args.kernels} "
          f"kernels; {args.rounds} rounds x {args.steps - 1} measured steps")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; usable parallelism "
          f"{capacity_before:.2f} before, {capacity_after:.2f} after (2.00 = two free cores)")
    head = (f"{'run':<22} {'median s':>8} {'min s':>8} {'speedup':>8} {'peak MB/proc':>14} {'memory':>7}  "
            f"simulated s (err)")
    print(head)
    print("-" * len(head))
    sims = {name: predicted(plan) for name, plan in plans.items()}
    for batch in (1, 2):
        base = merged[f"tilec 1 worker b{batch}"]
        print(row(f"tilec 1 worker b{batch}", base, None, sims[f"tilec 1 worker b{batch}"]))
        print(row(f"tilec 2 workers b{batch}", merged[f"tilec 2 workers b{batch}"], base,
                  sims[f"tilec 2 workers b{batch}"]))
    if "torch DDP 2 procs b2" in merged:
        print(row("torch DDP 2 procs b2", merged["torch DDP 2 procs b2"], merged["tilec 2 workers b2"]))
        print("(the DDP row's speedup and memory are relative to tilec 2 workers b2: >1x speedup = DDP faster)")
    from tilec.inspect.plan_report import plan_summary
    for name in ("tilec 2 workers b1", "tilec 2 workers b2"):
        print(f"\n{name}: {plan_summary(plans[name])}")
    result = {"model": "tiny416", "dtype": "float32", "kernels": args.kernels, "rounds": args.rounds,
              "steps": args.steps,
              "parallel_capacity": [capacity_before, capacity_after], "cpu_count": os.cpu_count(),
              "runs": merged, "simulated_s": sims, "plans": {k: v["hash"] for k, v in plans.items()}}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
