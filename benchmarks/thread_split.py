"""One device's training step on one kernel thread and on two, side by side
in this one process, by how two threads share the work: a conv's images
against its rows, and their im2col bands adjacent in the workspace against
``lower.THREAD_GAP`` apart.

The model (default the bundled tiny416) is planned for one device, once per
contender, and each contender is that device's executor (``RankExecutor``,
as a local worker runs it) taking steps of one generated batch:

- ``t1``: one thread (the baseline);
- ``t2``: two threads as tilec runs them (images from batch 2, bands apart);
- ``t2 rows``: the images' split turned off (``allow_image_split``), so
  that the conv threads split rows as at batch 1 (not at batch 1: the same);
- ``t2 adjacent``: the bands adjacent (``THREAD_GAP`` 0).

Each round first measures where the VM has its two vCPUs (a cache line
there and back between them, before and after the round: the larger), then
takes ``--steps`` steps of each contender in turn, interleaved, and keeps
each one's median; the table reports the medians over rounds of the speed-up
over ``t1``, in all rounds and by where the cores were (near: they share a
cache).

Unset OpenBLAS's kernel overrides for this command only:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/thread_split.py \\
        [--model tiny416] [--batches 1,4] [--rounds 15] [--steps 3] [--json thread_split.json]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time


def executor(graph, batch, threads, module, params, buffers, gap):
    """A one-device plan's executor on ``threads`` threads, its bands ``gap`` apart."""
    from cluster import tilec_plan
    from tilec_runtime import inprocess, lower
    from tilec_runtime.comm import InProcessHub
    was = lower.THREAD_GAP
    lower.THREAD_GAP = gap
    try:
        plan = tilec_plan(graph, 1, batch, threads)
        ex, = inprocess.make_executors(plan, [InProcessHub(1, 120).comm(0)], module, params, buffers, None,
                                       threads=threads)
    finally:
        lower.THREAD_GAP = was
    # a rate too small to change the numbers much: every step the same work, no overflow
    ex.lr = 1e-9
    return ex


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny416")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default="thread_split.json")
    args = ap.parse_args()

    import threadpoolctl
    from cluster import core_probe, core_round_trip, near_apart
    from kernels import load_graph
    from tilec.codegen import build_modules
    from tilec_runtime import data, lower, weights
    (module, _, _), = build_modules([("float32",)], progress=lambda m: None)
    threadpoolctl.threadpool_limits(1)
    folder = tempfile.mkdtemp(prefix="tilec-thread-split-")
    probe = core_probe(folder)
    graph = load_graph(args.model, folder)
    program = graph.to_program()
    params, buffers = weights.init_params(program, 0, "float32")
    results = {"model": args.model, "steps": args.steps, "thread_gap": lower.THREAD_GAP, "batches": {}}
    for batch in map(int, args.batches.split(",")):
        images, target = data.generated_batches(program, batch, 0, "float32").get(0)
        contenders = [("t1", executor(graph, batch, 1, module, params, buffers, lower.THREAD_GAP), True),
                      ("t2", executor(graph, batch, 2, module, params, buffers, lower.THREAD_GAP), True),
                      ("t2 adjacent", executor(graph, batch, 2, module, params, buffers, 0), True)]
        if batch > 1:
            contenders.insert(2, ("t2 rows", contenders[1][1], False))

        def step(ex, images_split):
            module.allow_image_split(images_split)
            ex.k.set_threads(ex.threads)
            t0 = time.perf_counter()
            ex.step(images, target)
            return time.perf_counter() - t0
        for _, ex, split in contenders:  # a warm-up step each
            step(ex, split)
        rounds = []
        for rnd in range(args.rounds):
            before = core_round_trip(probe)
            times = {name: [] for name, _, _ in contenders}
            for _ in range(args.steps):
                for name, ex, split in contenders:
                    times[name].append(step(ex, split))
            after = core_round_trip(probe)
            ns = None if before is None else max(before, after)
            rounds.append({"core_ns": ns, "step_s": {n: statistics.median(v) for n, v in times.items()}})
            print(f"  batch {batch} round {rnd + 1}/{args.rounds} ({'-' if ns is None else f'{ns:.0f} ns'}): " +
                  " ".join(f"{n} {rounds[-1]['step_s']['t1'] / s:.2f}x" for n, s in rounds[-1]["step_s"].items()
                           if n != "t1"), file=sys.stderr, flush=True)
        module.allow_image_split(True)
        results["batches"][batch] = rounds
        print(f"\n{args.model}, batch {batch}: speed-up over one thread, median of rounds (rounds)\n")
        print("| contender | all | near | apart |")
        print("|---|---|---|---|")
        for name, _, _ in contenders[1:]:
            ratios = [r["step_s"]["t1"] / r["step_s"][name] for r in rounds]
            parts = near_apart(ratios, [r["core_ns"] for r in rounds])
            cell = lambda v: f"{statistics.median(v):.2f}x ({len(v)})" if v else "-"  # noqa: E731
            print(f"| {name} | {cell(ratios)} | {cell(parts['near'])} | {cell(parts['apart'])} |")
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
