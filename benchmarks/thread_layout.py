"""What the layout of a map costs two threads of one device: the generated
epilogue kernels on each conv output of a model, with the threads' rows
interleaved as tilec lays a map out today, against the same elements laid
out thread by thread.

A device's threads split a map by rows (``splits_rows``): in a (C, H, W)
map, thread 0 owns the top rows of every channel plane and thread 1 the
bottom ones, so their parts alternate every half plane (86.5 KB of float32
at 208 x 208, 1.35 KB at 26 x 26). Contenders, on two kernel threads, one
image:

- ``rows``: ``bn_act`` (forward: batch norm, leaky) and ``act_grad``
  (backward: the activation's gradient and the batch-norm sums) on the
  (1, C, H, W) map with ``by_rows``, as ``tilec_runtime.fused`` calls them;
- ``blocks``: the same kernels on the same number of elements laid out
  (2, C, H/2, W) and viewed as (1, 2C, H/2, W), the threads splitting the
  channels: each thread's rows of every channel in one block of its own.

Both do the same arithmetic on runs of the same length, and each thread
touches only what it owns, so the difference is where each thread's bytes
lie. A second table says why, with a probe in C (``EDGE_PROBE``): two
pinned threads over two 8 MB arrays (y = 0.5 x + y), the arrays cut into
parts of the sizes above that alternate between the threads, either
adjacent, as a map's are, or each followed by a 4 KB gap; nanoseconds per
KB a thread moves. On this project's VM the adjacent parts of 21 KB and
less cost 1.4-2.3x as much on two vCPUs that share no cache as on two
that do, and the gapped ones the same on both: the hardware reaches past
the end of a thread's part into the other's, whose writes then cross
between the cores. A device laid out thread by thread would need its halo
rows twice, as devices do.

The contenders alternate call by call, so that machine noise (and the VM
moving its vCPUs) hits both alike; the table reports medians over rounds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/thread_layout.py \\
        [--model tiny416] [--rounds 9] [--calls 20] [--json thread_layout.json]
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np


# two pinned threads over two arrays cut into parts of `part` bytes, alternating between them (thread t
# takes parts t, t + 2, ...), each part followed by `gap` bytes no one touches; prints the larger of the
# two threads' nanoseconds per KB of y = 0.5 x + y
EDGE_PROBE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <sys/mman.h>
static long bytes, part, gap, passes; static int cores[2]; static float *x, *y;
static _Alignas(4096) double spent[2][512]; static _Alignas(4096) double moved[2][512];
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static void *run(void *arg) {
    int t = (int)(long)arg; cpu_set_t s; CPU_ZERO(&s); CPU_SET(cores[t], &s);
    pthread_setaffinity_np(pthread_self(), sizeof s, &s);
    long n = bytes / 4, p = part / 4, step = (part + gap) / 4;
    for (long k = 0; k < passes; k++) {
        double t0 = now();
        for (long c = t * step; c < n; c += 2 * step) {
            long e = c + p < n ? c + p : n;
            for (long i = c; i < e; i++) y[i] = 0.5f * x[i] + y[i];
            moved[t][0] += (e - c) * 4.0;
        }
        spent[t][0] += now() - t0;
    }
    return 0;
}
int main(int argc, char **argv) {
    bytes = atol(argv[1]); part = atol(argv[2]); gap = atol(argv[3]); passes = atol(argv[4]);
    cores[0] = atoi(argv[5]); cores[1] = atoi(argv[6]);
    x = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    y = mmap(0, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (long i = 0; i < bytes / 4; i++) { x[i] = 1; y[i] = 0; }
    pthread_t th[2];
    for (long t = 0; t < 2; t++) pthread_create(&th[t], 0, run, (void *)t);
    for (int t = 0; t < 2; t++) pthread_join(th[t], 0);
    double a = spent[0][0] / moved[0][0] * 1e9 * 1024, b = spent[1][0] / moved[1][0] * 1e9 * 1024;
    printf("%.2f\n", a > b ? a : b);
    return 0;
}
"""
EDGE_BYTES = 8 << 20
EDGE_GAP = 4096


def edge_probe(folder):
    """[executable, first core, second core] of the compiled ``EDGE_PROBE``, or None (``two_core_probe``)."""
    from cluster import two_core_probe
    return two_core_probe(folder, "edge_probe", EDGE_PROBE)


def edge_cost(probe, part, gap, passes=100):
    """Nanoseconds per KB of the slower thread (``EDGE_PROBE``)."""
    exe, a, b = probe
    out = subprocess.run([exe, str(EDGE_BYTES), str(part), str(gap), str(passes), a, b], capture_output=True,
                         text=True, check=True)
    return float(out.stdout)


def medians(split):
    """({where: median or None}, {where: rounds}) of a ``near_apart`` split."""
    return ({k: float(np.median(v)) if v else None for k, v in split.items()},
            {k: len(v) for k, v in split.items()})


def maps_of(program):
    """(layer index, channels, rows, columns) of every batch-normalised conv output."""
    return [(layer["index"], *layer["out_shape"]) for layer in program if layer["kind"] == "conv" and layer["bn"]]


def contenders(kernels, c, h, w, rng):
    """{name: call} for one map: rows (the product's layout) and blocks (thread by thread)."""
    pre, act = kernels.pre["bn"], kernels.act["leaky"]
    calls = {}
    for name, shape, by_rows in (("rows", (1, c, h, w), True), ("blocks", (1, 2 * c, h // 2, w), False)):
        # z > 0: the activation's gradient leaves da as it is, call after call (its arithmetic the same)
        z = np.abs(rng.standard_normal(shape)).astype(np.float32) + 0.1
        y, da = np.zeros_like(z), rng.standard_normal(shape).astype(np.float32)
        n = shape[1]
        mean, inv = np.zeros(n, np.float32), np.ones(n, np.float32)
        gamma, beta = np.ones(n, np.float32), np.zeros(n, np.float32)
        s1, s2 = np.zeros(n), np.zeros(n)

        def call(z=z, y=y, da=da, mean=mean, inv=inv, gamma=gamma, beta=beta, s1=s1, s2=s2, by_rows=by_rows):
            kernels.bn_act(z, y, pre, act, mean, inv, gamma, beta, by_rows=by_rows)
            kernels.act_grad(da, z, pre, act, s1, s2, mean, inv, gamma, beta, None, by_rows=by_rows)
        calls[name] = call
    return calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny416")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=20, help="calls of each contender per round (their median counts)")
    ap.add_argument("--json", default="thread_layout.json")
    args = ap.parse_args()

    import threadpoolctl
    from cluster import NEAR_NS, core_probe, core_round_trip, near_apart
    from kernels import blas_info, load_graph, openblas_overrides
    from tilec.codegen import build_modules
    from tilec_runtime.kernel_set import Kernels

    overrides = openblas_overrides()
    (module, _, _), = build_modules([("float32",)], progress=lambda m: print(m, file=sys.stderr))
    limiter = threadpoolctl.threadpool_limits(1)
    kernels = Kernels(module, "float32")
    module.set_threads(2)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        program = load_graph(args.model, folder).to_program()
    maps = [(index, c, h, w, (h // 2) * w * 4, contenders(kernels, c, h, w, rng))
            for index, c, h, w in maps_of(program) if h % 2 == 0]  # (blocks of equal rows only)
    times = {index: {"rows": [], "blocks": []} for index, *_ in maps}
    parts = sorted({part for *_, part, _ in maps})
    edges = {(p, g): [] for p in parts for g in (0, EDGE_GAP)}
    with tempfile.TemporaryDirectory() as folder:
        probe, edge = core_probe(folder), edge_probe(folder)
        distance = []
        for rnd in range(args.rounds):
            before = core_round_trip(probe)
            for key in edges if edge is not None else ():
                edges[key].append(edge_cost(edge, *key))
            for index, *_, calls in maps:
                per = {name: [] for name in calls}
                for _ in range(args.calls):
                    for name, call in calls.items():
                        t0 = time.perf_counter()
                        call()
                        per[name].append(time.perf_counter() - t0)
                for name in calls:
                    times[index][name].append(float(np.median(per[name])))
            distance.append(None if probe is None else max(before, core_round_trip(probe)))
            print(f"round {rnd + 1}: cores {distance[-1]} ns apart", file=sys.stderr)
    rows = []
    for index, c, h, w, part, _ in maps:
        t = times[index]
        med = {name: float(np.median(v)) for name, v in t.items()}
        placed, rounds = medians(near_apart([a / b for a, b in zip(t["rows"], t["blocks"])], distance))
        rows.append({"layer": index, "map": [c, h, w], "part_bytes": part, "median_s": med, "times_s": t,
                     "rows_over_blocks": med["rows"] / med["blocks"], "by_placement": placed,
                     "rounds_by_placement": rounds})
    module.set_threads(1)
    blas = blas_info()
    limiter.restore_original_limits()
    print(f"{args.model}: bn_act + act_grad on 2 threads, one image, float32, median of {args.rounds} rounds "
          f"(each the median of {args.calls} calls)")
    print(f"{'layer':>5} {'map':>13} {'thread part':>11} {'rows ms':>8} {'blocks ms':>9} {'rows/blocks':>11}"
          f" {'near':>13} {'apart':>13}")

    def by(r, where):
        x, n = r["by_placement"][where], r["rounds_by_placement"][where]
        return f"{x:.2f}x ({n})" if x is not None else "-"
    for r in rows:
        m = r["median_s"]
        print(f"{r['layer']:>5} {'x'.join(map(str, r['map'])):>13} {r['part_bytes'] / 1024:>8.1f} KB "
              f"{m['rows'] * 1e3:>8.3f} {m['blocks'] * 1e3:>9.3f} {r['rows_over_blocks']:>10.2f}x"
              f" {by(r, 'near'):>13} {by(r, 'apart'):>13}")
    print(f"(near / apart: the rounds' rows/blocks by where the two cores were, a cache line there and back "
          f"under {NEAR_NS} ns or not; in brackets the rounds)")
    probe_rows = []
    if edge is not None:
        print(f"\nEDGE_PROBE: two threads over two {EDGE_BYTES >> 20} MB arrays in alternating parts, ns per KB "
              f"of the slower thread, medians of the rounds near / apart (rounds)")
        print(f"{'part':>9} {'adjacent near':>14} {'apart':>8} {f'{EDGE_GAP} B gap near':>16} {'apart':>8}")

        def cell(v):
            return f"{v:.1f}" if v is not None else "-"
        for p in parts:
            row = {"part_bytes": p}
            for g in (0, EDGE_GAP):
                placed, rounds = medians(near_apart(edges[(p, g)], distance))
                row[f"gap{g}"] = {"ns_per_kb": edges[(p, g)], "by_placement": placed, "rounds_by_placement": rounds}
            probe_rows.append(row)
            print(f"{p / 1024:>6.1f} KB {cell(row['gap0']['by_placement']['near']):>14} "
                  f"{cell(row['gap0']['by_placement']['apart']):>8} "
                  f"{cell(row[f'gap{EDGE_GAP}']['by_placement']['near']):>16} "
                  f"{cell(row[f'gap{EDGE_GAP}']['by_placement']['apart']):>8}")
    with open(args.json, "w") as fh:
        json.dump({"model": args.model, "rounds": args.rounds, "calls": args.calls, "blas": blas,
                   "openblas_overrides": overrides, "core_round_trip_ns": distance, "maps": rows,
                   "edge_probe": probe_rows}, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
