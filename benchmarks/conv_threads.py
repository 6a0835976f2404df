"""Convolution forward + backward on one thread and on two, side by side in
this one process, and the two ways two threads share a conv: by output rows
or by filters (``kernel_set.filter_split``).

Each conv layer of the models (default the bundled tiny416 and yolov2-tiny,
at their own input size and ``--batch``) runs the generated kernels'
conv_forward and conv_backward (weight and input gradient, with the weight
gradient added to) on one thread, and on ``--threads`` threads as the
kernels choose; where they choose to split the filters, also with that split
turned off (``allow_filter_split(False)``: by rows, with a private weight
gradient per thread). The contenders run round-robin, one call each per
round, so that machine noise hits all of them alike; the table reports
medians over rounds and the speed-ups over one thread.

Unset OpenBLAS's kernel overrides for this command only:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/conv_threads.py \\
        [--models tiny416,yolov2-tiny] [--batch 1] [--threads 2] [--rounds 9] [--json conv_threads.json]
"""
import argparse
import json
import sys
import tempfile

import numpy as np


def conv_call(module, kernels, layer, x, w, dy, threads, split):
    """forward then backward of one conv on ``threads`` threads, filter split allowed or not."""
    from tilec_runtime.kernel_set import band_rows
    f, c, k, _ = w.shape
    ho, wo = dy.shape[2:]
    pads = (layer["pad"],) * 4
    band = band_rows(c, k, ho, wo, x.shape[0])
    module.allow_filter_split(split)
    ws = np.empty(module.workspace_size(c, k, band, ho, wo, True, threads, f), x.dtype)
    module.allow_filter_split(True)
    z, dw, dx = np.empty(dy.shape, x.dtype), np.zeros(w.shape, x.dtype), np.empty(x.shape, x.dtype)

    def run():
        module.set_threads(threads)
        module.allow_filter_split(split)
        try:
            kernels.conv_forward(x, w, layer["stride"], pads, z, ws, band)
            dx.fill(0)
            kernels.conv_backward(x, w, layer["stride"], pads, dy, ws, band, dw, dx, accumulate=True)
        finally:
            module.allow_filter_split(True)
            module.set_threads(1)
    return run, band


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny416,yolov2-tiny")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--json", default="conv_threads.json")
    args = ap.parse_args()

    import threadpoolctl
    from kernels import blas_info, conv_layers, load_graph, openblas_overrides, round_robin
    from tilec.codegen import build_modules
    from tilec_runtime.kernel_set import Kernels

    overrides = openblas_overrides()
    (module, _, _), = build_modules([(args.dtype,)], progress=lambda m: print(m, file=sys.stderr))
    limiter = threadpoolctl.threadpool_limits(1)  # the kernels' threads are their own; BLAS runs inside each
    kernels = Kernels(module, args.dtype)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:  # (the .cfg of a model's first N layers)
        programs = {model: load_graph(model, folder).to_program() for model in args.models.split(",")}
    for model, program in programs.items():
        for layer, x, w, dy in conv_layers(program, rng, args.batch, args.dtype):
            f, ho, wo = layer["out_shape"]
            calls = {}
            calls["1 thread"], band = conv_call(module, kernels, layer, x, w, dy, 1, True)
            calls["chosen"], _ = conv_call(module, kernels, layer, x, w, dy, args.threads, True)
            split = bool(module.splits_filters(ho, wo, band, f, args.threads))
            if split:
                calls["by rows"], _ = conv_call(module, kernels, layer, x, w, dy, args.threads, False)
            times, med = round_robin(calls, args.rounds)
            rows.append({"model": model, "layer": layer["index"], "in": layer["in_shape"], "filters": f,
                         "size": layer["size"], "out": [ho, wo], "band_rows": band,
                         "split": "filters" if split else "rows", "median_s": med, "times_s": times,
                         "speedup": med["1 thread"] / med["chosen"],
                         "speedup_by_rows": med["1 thread"] / med["by rows"] if split else None})
    blas = blas_info()  # (as the rounds ran: one BLAS thread)
    limiter.restore_original_limits()
    print(f"conv layers, batch {args.batch}, {args.dtype}, forward + backward on 1 and {args.threads} threads, "
          f"median of {args.rounds} rounds")
    print("BLAS: " + "; ".join(f"{b['library']} {b['version']} kernel {b['kernel']}" for b in blas))
    print(f"{'model':>12} {'layer':>5} {'in':>13} {'F':>5} {'out':>7} {'split':>7} {'1 thread ms':>11} "
          f"{args.threads} threads ms  speed-up  (by rows)")
    for r in rows:
        m = r["median_s"]
        by_rows = f"  ({r['speedup_by_rows']:.2f}x)" if r["speedup_by_rows"] else ""
        print(f"{r['model']:>12} {r['layer']:>5} {'x'.join(map(str, r['in'])):>13} {r['filters']:>5} "
              f"{'x'.join(map(str, r['out'])):>7} {r['split']:>7} {m['1 thread'] * 1e3:>11.2f} "
              f"{m['chosen'] * 1e3:>13.2f}  {r['speedup']:>7.2f}x{by_rows}")
    for model in args.models.split(","):
        mine = [r for r in rows if r["model"] == model]
        one, chosen = (sum(r["median_s"][k] for r in mine) for k in ("1 thread", "chosen"))
        rows_only = sum(r["median_s"]["by rows" if r["split"] == "filters" else "chosen"] for r in mine)
        print(f"{model}: all conv layers {one * 1e3:.1f} ms on 1 thread, {chosen * 1e3:.1f} ms on {args.threads} "
              f"({one / chosen:.2f}x; splitting every layer by rows {one / rows_only:.2f}x)")
    with open(args.json, "w") as fh:
        json.dump({"batch": args.batch, "threads": args.threads, "dtype": args.dtype, "blas": blas,
                   "openblas_overrides": overrides, "layers": rows}, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
