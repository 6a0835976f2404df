"""Training on worker processes over loopback sockets: 2 workers vs 1,
threads, and tilec vs PyTorch DistributedDataParallel, side by side in one run.

Models (float32, SGD with momentum, a generated batch):

- ``tiny416``: the bundled reference stack (416x416, six 3x3 conv + batch
  norm + leaky layers with max-pools, a 1x1 conv, a sum-of-squares cost);
- ``yolov2-tiny-12``: yolov2-tiny's first 12 layers and a sum-of-squares cost
  on layer 11's output (416x416);
- ``yolov2-tiny``: all of it, with its region loss (the 13x13 layers that
  hold 70% of its FLOPs: issue 11).

Runs, each device one worker process (`tilec train --backend local`'s
machinery, ``tilec_runtime.launch``) with the plan `tilec compile` makes for
as many copies of this machine's profile (``tilec profile``) with that many
kernel threads each:

- ``1 dev t1`` / ``1 dev t2``: one device, one or two kernel threads;
- ``1 dev t1 train`` / ``1 dev t2 train``: the same plan as one user runs one
  device, ``tilec train MODEL --plan DIR --threads N`` (one process, the
  rank a thread of it: no worker, no launcher beside it), its step times
  from ``--metrics``;
- ``2 dev t1``: two devices of one thread each (on this 2-core machine, two
  single-core devices);
- ``1 dev t1 x2``: two ``1 dev t1`` jobs at once, each (and its worker)
  on the cores each of the two workers of ``2 dev t1`` gets, started
  together, the steps both ran at once: what this
  machine leaves of two cores to this very work when both run it, the
  memory and the caches shared and the neighbours as they are. Two workers
  that split the job can gain about ``2 x`` (one alone / side by side) here,
  the *ceiling* the table gives beside ``2 dev t1`` (not a strict bound: a
  half-sized tile fits the caches better than the whole map);
- ``torch DDP 2x4``: nn.Conv2d/BatchNorm2d/LeakyReLU/MaxPool2d under
  DistributedDataParallel (gloo, 2 processes, ``torch.set_num_threads(1)``),
  global batch 8, against ``2 dev t1`` at batch 8.

Step time is rank 0's wall time per step (the launcher's view), memory
each worker's peak resident set during a step (VmHWM, reset at every step
start), wait the largest fraction of a step a rank spent waiting for
peers. The runs alternate round by round, so that load from other
processes hits them alike; tables give the median over all measured steps
(the first step of every job is a warm-up and is dropped) and the minimum.
The machine's usable parallelism (two single-threaded matmul loops side by
side / one alone; 2.00 = two free cores) is measured in the same run: read
the 2-vs-1 speedups against it; so is that of two loops streaming through
memory, which two workers on one machine share where two devices would
not (the memory-bound layers: a 3-channel conv's output, the epilogues,
the pools); both are measured again (for a second each) at every round's
start, and printed beside that round's speed-ups. So is, before and after
every job, how far apart the two cores are (a cache line handed there and
back between two threads, ``CORE_PROBE``): this project's VM has its two
vCPUs sometimes on cores that share a cache (about 60 ns) and sometimes
apart (about 350 ns), where two threads of one device that share their maps
run much slower and two processes barely notice; the round-by-round
speed-ups are summarised by that too. Next to each run, the simulator's
prediction for its plan (``tilec simulate``) and its error.

    python benchmarks/cluster.py [--rounds 3] [--steps 5] [--only tiny416,...] [--json cluster.json]
        [--kernels generated|reference] [--no-torch]
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

# streaming, as the memory-bound layers are (a 3-channel conv's output, the epilogues, the pools): two
# workers on one machine share its memory bandwidth, which two devices do not
BANDWIDTH = """
import time, numpy as np
a, b = np.ones(16 << 20, np.float32), np.ones(16 << 20, np.float32)
c = np.empty_like(a)
t0, n = time.perf_counter(), 0
while time.perf_counter() - t0 < {seconds}:
    np.add(a, b, out=c)
    n += 1
print(n / (time.perf_counter() - t0))
"""


# two threads handing a cache line back and forth: how far apart the two cores are. This project's VM
# showed two settings, moment to moment, of its two vCPUs: about 60 ns (cores that share a last-level
# cache) and about 350 ns (apart, e.g. on two of an EPYC's dies). Two processes barely notice; two threads
# of one device that share their maps do (tiny416 at batch 1 on two threads: 52 ms a step near, 73 apart)
CORE_PROBE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <time.h>
enum { N = 100000 };
static _Alignas(64) atomic_int flag;
static void pin(int c) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(c, &s); pthread_setaffinity_np(pthread_self(), sizeof s, &s); }
static void *other(void *core) {
    pin(*(int *)core);
    for (int i = 0; i < N; i++) {
        while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 1) {}
        atomic_store_explicit(&flag, 2 * i + 2, memory_order_release);
    }
    return 0;
}
int main(int argc, char **argv) {
    int a = atoi(argv[1]), b = atoi(argv[2]);
    pthread_t t; struct timespec t0, t1;
    pin(a);
    pthread_create(&t, 0, other, &b);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < N; i++) {
        atomic_store_explicit(&flag, 2 * i + 1, memory_order_release);
        while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 2) {}
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    pthread_join(t, 0);
    printf("%.1f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / N);
    return 0;
}
"""
NEAR_NS = 150  # a round trip under this: the two cores share a cache


def two_core_probe(folder, name, source):
    """[executable, first core, second core]: the C program ``source``
    compiled in ``folder`` (the compiler the kernels are built with,
    ``native.find_compiler``), to run on the first two cores this process
    may use; None where there are fewer than two or no C compiler."""
    from tilec_runtime.native import KernelBuildError, find_compiler
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    try:
        cc = find_compiler()
    except KernelBuildError:
        return None
    if len(cores) < 2:
        return None
    src, exe = os.path.join(folder, f"{name}.c"), os.path.join(folder, name)
    with open(src, "w") as f:
        f.write(source)
    done = subprocess.run([*cc, "-O2", "-pthread", src, "-o", exe], capture_output=True)
    return [exe, str(cores[0]), str(cores[1])] if done.returncode == 0 else None


def core_probe(folder):
    """The command that runs the compiled ``CORE_PROBE`` (``two_core_probe``), or None."""
    return two_core_probe(folder, "core_probe", CORE_PROBE)


def core_round_trip(probe):
    """Nanoseconds of one hand-off of a cache line there and back between
    the first two cores (``core_probe``); None without a probe."""
    if probe is None:
        return None
    return float(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)


def parallel_capacity(seconds=2.0, code=CAPACITY):
    """Throughput of two single-threaded processes side by side / one alone
    (``code``: a matmul in cache, or ``BANDWIDTH``'s stream through memory)."""
    code = code.format(seconds=seconds)
    env = dict(os.environ, **ONE_THREAD)
    solo = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout)
    pair = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    both = sum(float(p.communicate()[0]) for p in pair)
    return both / solo


# -- tilec ---------------------------------------------------------------------------------


def tilec_plan(graph, devices, batch, threads):
    """The plan for ``devices`` local workers of ``threads`` kernel threads each."""
    from tilec.cluster import local_profile, uniform_cluster
    from tilec.compile import compile_plan
    cluster = uniform_cluster(local_profile(), devices, threads=threads, shared=True)
    return compile_plan(graph, cluster=cluster, batch=batch, dtype="float32")


def tilec_job(graph, plan, batch, steps, kernel_source, threads, lr=None, ends=None):
    """One job of ``plan`` on local workers of ``threads`` kernel threads
    each (``lr``: [(from step, learning rate)], as ``run_job`` takes it);
    returns the per-step records (``ends``, a list: also when each ended,
    ``time.time()``)."""
    from tilec_runtime import data, launch, weights
    program = graph.to_program()
    params, buffers = weights.init_params(program, 0, "float32")
    batches = data.generated_batches(program, batch, 0, "float32")
    records, stamps = [], []

    def record(r):
        records.append(r)
        stamps.append(time.time())
    launch.train_local(plan, params, buffers, batches, steps=steps, threads=threads, on_metrics=record,
                       kernel_source=kernel_source, timeout=600, lr=lr)
    if ends is not None:
        ends.extend(stamps[1:])
    return records[1:]


def side_by_side_job(model, plan, batch, steps, kernels):
    """Two one-device jobs of ``plan`` at once, each in a process of its
    own on the cores ``launch.pin_cores`` gives each of two workers (its
    worker inherits them; so does its launcher, which two workers' does
    not, a few ms a step), started together once both are set up; the
    steps that ran while the other job was running its own."""
    from tilec_runtime.launch import core_shares
    shares = core_shares(2) or [[], []]  # (none: left to the scheduler, as two workers are)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(plan, f)
    try:
        outs = two_of_this_script([["--solo-plan", f.name, "--solo-model", model, "--batch", str(batch),
                                    "--steps", str(steps + 4), "--kernels", kernels,
                                    "--cores", ",".join(map(str, shares[r]))] for r in range(2)],
                                  dict(os.environ, **ONE_THREAD), together=True)
    finally:
        os.unlink(f.name)
    first = max(end - step for o in outs for end, step in o["steps"][:1])
    last = min(o["steps"][-1][0] for o in outs)
    both = [[step for end, step in o["steps"] if end - step >= first and end <= last] for o in outs]
    if min(map(len, both)) < 2:
        raise SystemExit(f"{model} at batch {batch}: the two jobs side by side overlapped by "
                         f"{min(map(len, both))} step(s): run more --steps")
    return {"step_s": both[0] + both[1], "peak_bytes": [o["peak_bytes"] for o in outs]}


def solo_job(args):
    """One of ``side_by_side_job``'s jobs (run by this script itself): set
    up, says so, waits for a line on stdin, trains."""
    from kernels import load_graph
    if args.cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.cores.split(",")})
    with open(args.solo_plan) as f:
        plan = json.load(f)
    kernel_source = None
    if args.kernels == "generated":
        from tilec.codegen import generate
        source = generate(("float32",))
        kernel_source = {"module": source.module, "source": source.text}
    with tempfile.TemporaryDirectory(prefix="tilec-cluster-bench-") as folder:
        graph = load_graph(args.solo_model, folder)
    print("ready", flush=True)
    sys.stdin.readline()
    # four steps more than the others' jobs, of which those the other job did not overlap are left out; at a
    # rate smaller than the model's, which does not survive the generated batch (the loss overflows by step 7):
    # the same work
    ends = []
    records = tilec_job(graph, plan, args.batch, args.steps, kernel_source, 1, lr=[(0, 1e-7)], ends=ends)
    print(json.dumps({"steps": [[end, r[0]["step_s"]] for end, r in zip(ends, records)],
                      "peak_bytes": max(r[0]["peak_bytes"] for r in records)}))


def train_job(model, plan, batch, steps, threads):
    """``tilec train MODEL`` (a bundled name or a .cfg path) of ``plan`` on
    one device in one process, as a user runs it; the step seconds of its
    metrics, the first step (a warm-up) dropped."""
    from tilec_runtime.planfile import write_plan
    with tempfile.TemporaryDirectory(prefix="tilec-cluster-bench-") as folder:
        write_plan(plan, folder)
        metrics = os.path.join(folder, "metrics.jsonl")
        subprocess.run([sys.executable, "-m", "tilec.cli", "train", model, "--plan", folder, "--batch", str(batch),
                        "--threads", str(threads), "--steps", str(steps), "--metrics", metrics],
                       env=dict(os.environ, **ONE_THREAD), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600)
        with open(metrics) as f:
            lines = [json.loads(line) for line in f]
    # no peak: the one process holds the planner too, so its peak is not the device's
    return {"step_s": [r["step_s"] for r in lines if "device" not in r and r["step"] >= 1], "peak_bytes": []}


def summarise_tilec(records):
    """Step seconds (rank 0's view), per-worker peaks, waits (the largest share of a step a rank waited)."""
    n = len(records[0])
    return {
        "step_s": [r[0]["step_s"] for r in records],
        "peak_bytes": [max(r[d]["peak_bytes"] for r in records) for d in range(n)],
        "cpu_s": [statistics.median(r[d]["cpu_s"] for r in records) for d in range(n)],
        "wait_s": [statistics.median(r[d]["wait_s"] for r in records) for d in range(n)],
        "wait_share": [max(r[d]["wait_s"] / r[d]["step_s"] for d in range(n)) for r in records],
        "sent_bytes": [records[-1][d]["bytes_sent"] for d in range(n)],
    }


def predicted(plan):
    """The simulator's step time for ``plan`` on the cluster it was made for (``tilec simulate``)."""
    from tilec.cluster import plan_cluster
    from tilec.inspect.simulate import simulate
    return simulate(plan, plan_cluster(plan), keep_events=False).step_s


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
    from tilec.frontend.models import load_model
    graph = load_model("tiny416")
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


def two_of_this_script(arguments, env, together=False):
    """Run this script twice at once with each of the two ``arguments``;
    the JSON each prints last. ``together``: each prints a line once it is
    set up, then waits for one on stdin, which both get when both are."""
    procs = [subprocess.Popen([sys.executable, __file__, *a], stdout=subprocess.PIPE, text=True, env=env,
                              stdin=subprocess.PIPE if together else subprocess.DEVNULL)
             for a in arguments]
    try:
        if together:
            for p in procs:
                p.stdout.readline()
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
        return [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            p.kill()


def ddp_job(batch, steps, port):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **ONE_THREAD)
    outs = two_of_this_script([["--ddp-rank", str(r), "--batch", str(batch), "--steps", str(steps)]
                               for r in range(2)], env)
    return {"step_s": [max(a, b) for a, b in zip(outs[0]["step_s"], outs[1]["step_s"])],
            "peak_bytes": [o["peak_bytes"] for o in outs]}


# -- the tables ------------------------------------------------------------------------------


def merge(runs):
    out = {"step_s": [], "peak_bytes": None}
    for r in runs:
        out["step_s"] += r["step_s"]
        if "wait_share" in r:
            out.setdefault("wait_share", []).extend(r["wait_share"])
        out["peak_bytes"] = r["peak_bytes"] if out["peak_bytes"] is None else [
            max(a, b) for a, b in zip(out["peak_bytes"], r["peak_bytes"])]
        for key in ("cpu_s", "wait_s", "sent_bytes"):
            if key in r:
                out.setdefault(key, []).append(r[key])
    for key in ("cpu_s", "wait_s", "sent_bytes"):
        if key in out:
            out[key] = [statistics.median(v) for v in zip(*out[key])]
    return out


# (label, model, batch, devices, threads): the runs, round by round
RUNS = [(f"{model} b{batch} {label}", model, batch, devices, threads)
        for model, batches in (("tiny416", (1, 4, 8)), ("yolov2-tiny-12", (1, 4)), ("yolov2-tiny", (1,)))
        for batch in batches
        for label, devices, threads in (("1 dev t1", 1, 1), ("1 dev t2", 1, 2), ("1 dev t1 train", 1, 1),
                                        ("1 dev t2 train", 1, 2), ("1 dev t1 x2", 1, 1), ("2 dev t1", 2, 1))
        if not (label.startswith(("1 dev t2", "1 dev t1 train")) and (model != "tiny416" or batch == 8))
        and not (label == "1 dev t1 x2" and (model == "yolov2-tiny" or batch == 8))]
SIDE_BY_SIDE = "1 dev t1 x2"
IN_PROCESS = " train"


def baseline(name, model, batch):
    """The run ``name``'s speed-up and memory are measured against: one
    device on one thread, run the same way (None: it is that run)."""
    base = f"{model} b{batch} 1 dev t1" + (IN_PROCESS if name.endswith(IN_PROCESS) else "")
    return None if name == base else base


def ceiling(merged, model, batch):
    """About the most two workers that split ``model`` at ``batch`` can gain
    here: 2 x (one job alone / two at once); None where not measured."""
    solo, pair = merged.get(f"{model} b{batch} 1 dev t1"), merged.get(f"{model} b{batch} {SIDE_BY_SIDE}")
    if solo is None or pair is None:
        return None
    return 2 * statistics.median(solo["step_s"]) / statistics.median(pair["step_s"])


def near_apart(values, distance):
    """{"near": [the values of rounds on cores that share a cache], "apart":
    [the others']}, by each round's round trip (``NEAR_NS``); rounds not
    measured (None) in neither."""
    return {"near": [x for x, ns in zip(values, distance) if ns is not None and ns < NEAR_NS],
            "apart": [x for x, ns in zip(values, distance) if ns is not None and ns >= NEAR_NS]}


def by_placement(runs, by_round):
    """{run: ``near_apart`` of its rounds' speed-ups} (the larger round trip
    of before and after each job); {} where none was measured."""
    out = {}
    for name, ratios in by_round.items():
        distance = [r.get("core_ns") for r in runs[name]]
        if None in distance:
            return {}
        out[name] = near_apart(ratios, distance)
    return out


def round_speedups(runs, runs_wanted):
    """{run: [speed-up of each round]} of every run with a baseline
    (``baseline``): the baseline's median step in that round over the run's."""
    out = {}
    for name, model, batch, _, _ in runs_wanted:
        base = baseline(name, model, batch)
        if base in runs and name in runs and not name.endswith(SIDE_BY_SIDE):
            out[name] = [statistics.median(b["step_s"]) / statistics.median(r["step_s"])
                         for b, r in zip(runs[base], runs[name])]
    return out


def row(name, r, base=None, prediction=None):
    med, best = statistics.median(r["step_s"]), min(r["step_s"])
    speed = f"{statistics.median(base['step_s']) / med:5.2f}x" if base else "     -"
    mem = f"{max(r['peak_bytes']) / max(base['peak_bytes']):5.2f}x" if base and r["peak_bytes"] else "     -"
    wait = f"{statistics.median(r['wait_share']):4.0%}" if "wait_share" in r else "   -"
    sim = "      -         " if prediction is None else f"{prediction:6.3f} ({prediction / med - 1:+4.0%})"
    return (f"| {name:<26} | {med:8.3f} | {best:8.3f} | {speed:>8} | "
            f"{' '.join(f'{p / 1e6:5.0f}' for p in r['peak_bytes']):>12} | {mem:>7} | {wait:>5} | {sim} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="steps per job (the first is a warm-up)")
    ap.add_argument("--only", help="models to run (comma-separated; default all)")
    ap.add_argument("--json", default="cluster.json")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--kernels", choices=("generated", "reference"), default="generated",
                    help="what the workers run (as `tilec train --kernels`; default generated)")
    ap.add_argument("--ddp-rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--solo-plan", help=argparse.SUPPRESS)
    ap.add_argument("--solo-model", help=argparse.SUPPRESS)
    ap.add_argument("--cores", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ddp_rank is not None:
        return ddp_rank(args)
    if args.solo_plan is not None:
        return solo_job(args)

    from kernels import load_graph
    from tilec.frontend.models import bundled_names
    os.environ.update(ONE_THREAD)  # this process too (it runs nothing heavy, but be fair)
    folder = tempfile.mkdtemp(prefix="tilec-cluster-bench-")
    kernel_source = None
    if args.kernels == "generated":
        from tilec.codegen import generate
        source = generate(("float32",))
        kernel_source = {"module": source.module, "source": source.text}
    only = set(args.only.split(",")) if args.only else None
    runs_wanted = [r for r in RUNS if only is None or r[1] in only]
    graphs = {model: load_graph(model, folder) for _, model, _, _, _ in runs_wanted}
    # what `tilec train` reads: a bundled model's name, or the .cfg load_graph wrote for a prefix of one
    cli_models = {model: model if model in bundled_names() else os.path.join(folder, f"{model}.cfg")
                  for model in graphs}
    # compiled once, before the rounds: the solver's answer may differ between
    # calls, and every round and the simulation should see the same plan
    plans = {name: tilec_plan(graphs[model], devices, batch, threads)
             for name, model, batch, devices, threads in runs_wanted
             if not name.endswith((SIDE_BY_SIDE, IN_PROCESS))}
    plans.update({name: plans[f"{model} b{batch} 1 dev t1"]  # the very job of 1 dev t1, twice
                  for name, model, batch, _, _ in runs_wanted if name.endswith(SIDE_BY_SIDE)})
    plans.update({name: plans[name[:-len(IN_PROCESS)]]  # the very plan the worker ran
                  for name, _, _, _, _ in runs_wanted if name.endswith(IN_PROCESS)})
    capacity_before = parallel_capacity()
    probe = core_probe(folder)
    runs = {}
    round_capacity = []
    for rnd in range(args.rounds):
        # the machine's moment, beside this round's speed-ups: two matmuls in cache, two streams through memory
        round_capacity.append((parallel_capacity(1.0), parallel_capacity(1.0, BANDWIDTH)))
        for name, model, batch, devices, threads in runs_wanted:
            before = core_round_trip(probe)
            if name.endswith(SIDE_BY_SIDE):
                got = side_by_side_job(model, plans[name], batch, args.steps, args.kernels)
            elif name.endswith(IN_PROCESS):
                got = train_job(cli_models[model], plans[name], batch, args.steps, threads)
            else:
                got = summarise_tilec(tilec_job(graphs[model], plans[name], batch, args.steps, kernel_source, threads))
            got["core_ns"] = None if probe is None else max(before, core_round_trip(probe))
            runs.setdefault(name, []).append(got)
            apart = "" if got["core_ns"] is None else f" (cores {got['core_ns']:.0f} ns apart)"
            print(f"round {rnd + 1}: {name}: {[round(s, 3) for s in got['step_s']]}{apart}", file=sys.stderr)
        if not args.no_torch and (only is None or "tiny416" in only):
            got = ddp_job(8, args.steps, 29500 + rnd)
            runs.setdefault("tiny416 b8 torch DDP 2x4", []).append(got)
            print(f"round {rnd + 1}: torch DDP: {[round(s, 3) for s in got['step_s']]}", file=sys.stderr)
    capacity_after = parallel_capacity()
    bandwidth = statistics.median(parallel_capacity(1.0, BANDWIDTH) for _ in range(3))  # (a noisy figure)
    merged = {name: merge(r) for name, r in runs.items()}
    sims = {name: None if name.endswith((SIDE_BY_SIDE, IN_PROCESS)) else predicted(plan)
            for name, plan in plans.items()}

    print(f"float32, one BLAS thread per process, {args.kernels} kernels; {args.rounds} rounds x "
          f"{args.steps - 1} measured steps")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; usable parallelism "
          f"{capacity_before:.2f} before, {capacity_after:.2f} after (2.00 = two free cores); for streaming "
          f"through memory {bandwidth:.2f} (what memory-bound layers of two workers here can gain)")
    print()
    print(f"| {'run':<26} | {'median s':>8} | {'min s':>8} | {'speedup':>8} | {'peak MB/proc':>12} | {'memory':>7} | "
          f"{'wait':>5} | simulated s (err) |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 14}|{'-' * 9}|{'-' * 7}|{'-' * 19}|")
    for name, model, batch, devices, threads in runs_wanted:
        base = baseline(name, model, batch)
        print(row(name, merged[name], base and merged.get(base), sims[name]))
    if "tiny416 b8 torch DDP 2x4" in merged:
        print(row("tiny416 b8 torch DDP 2x4", merged["tiny416 b8 torch DDP 2x4"], merged["tiny416 b8 2 dev t1"]))
        print("\n(speedup and memory are relative to the same model and batch on 1 dev t1; the DDP row's to "
              "tilec 2 dev t1 at batch 8: >1x speedup = DDP faster, <1x memory = DDP lighter)")
    ceilings = {}
    for name, model, batch, devices, threads in runs_wanted:
        top = ceiling(merged, model, batch) if devices == 2 else None
        if top is not None:
            solo = statistics.median(merged[f"{model} b{batch} 1 dev t1"]["step_s"])
            ceilings[name] = {"ceiling": top, "speedup": solo / statistics.median(merged[name]["step_s"])}
    if ceilings:
        print("\ntwo one-device jobs at once (1 dev t1 x2) against one alone: about the most two workers here can "
              "gain on that work")
        for name, c in ceilings.items():
            print(f"  {name}: {c['speedup']:.2f}x of a ceiling of {c['ceiling']:.2f}x ({c['speedup'] / c['ceiling']:.0%})")
    by_round = round_speedups(runs, runs_wanted)
    if by_round:
        print("\nspeed-up round by round (each round's median step of the one-thread run over the run's own; "
              "how far the machine's moments move them)")
        print(f"  (usable parallelism at each round's start, in cache / through memory: "
              f"{' '.join(f'{a:.2f}/{b:.2f}' for a, b in round_capacity)})")
        for name, ratios in by_round.items():
            print(f"  {name}: {' '.join(f'{r:.2f}' for r in ratios)}  (median {statistics.median(ratios):.2f}x)")
    placement = by_placement(runs, by_round)
    if placement:
        print(f"\nthe same by where the machine had its two cores during the run (a cache line there and back "
              f"under {NEAR_NS} ns: near, sharing a cache; otherwise apart), medians of the rounds' speed-ups")
        for name, split in placement.items():
            print(f"  {name}: " + ", ".join(f"{where} {statistics.median(v):.2f}x ({len(v)})" if v else f"{where} -"
                                           for where, v in split.items()))
    result = {"dtype": "float32", "kernels": args.kernels, "rounds": args.rounds, "steps": args.steps,
              "round_speedups": by_round, "round_capacity": round_capacity, "by_placement": placement,
              "core_round_trip_ns": {name: [r.get("core_ns") for r in rs] for name, rs in runs.items()},
              "parallel_capacity": [capacity_before, capacity_after], "memory_parallelism": bandwidth,
              "cpu_count": os.cpu_count(),
              "runs": merged, "simulated_s": sims, "ceilings": ceilings, "plans": {k: v["hash"] for k, v in plans.items()},
              "tails": {k: [(g["layers"], g["mode"], len(g["tiles"])) for g in v["groups"] if g["kind"] == "tail"]
                        for k, v in plans.items()}}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
