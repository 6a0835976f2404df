"""Convolution forward + backward on small maps: one image per GEMM against
several, and PyTorch single-thread, side by side in this one process.

Each conv layer of the bundled tiny416 at a small input size (default 96x96,
batch 16: maps of 96 down to 3) runs the generated kernels' conv_forward and
conv_backward (weight and input gradient) twice: with the band of
``band_rows(..., batch=1)`` (one image per GEMM, what the kernels did before
whole images were grouped) and with ``band_rows(..., batch)`` (several whole
images per GEMM where the map is small), on ``--threads`` threads; and
PyTorch's conv2d forward + backward on the same tensors
(``torch.set_num_threads(threads)``). The contenders run round-robin, one
call each per round, so that machine noise hits all of them alike; the table
reports medians over rounds.

Unset OpenBLAS's kernel overrides for this command only:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/conv_images.py \\
        [--size 96] [--batch 16] [--threads 1] [--rounds 9] [--json conv_images.json] [--no-torch]
"""
import argparse
import json
import sys

import numpy as np


def conv_call(module, kernels, layer, x, w, dy, batch_for_band):
    """forward then backward of one conv with the band chosen for ``batch_for_band`` images."""
    from tilec_runtime.kernel_set import band_rows
    f, c, k, _ = w.shape
    ho, wo = dy.shape[2:]
    pads = (layer["pad"],) * 4
    band = band_rows(c, k, ho, wo, batch_for_band)
    ws = np.empty(module.workspace_size(c, k, band, ho, wo, True, 0, f), x.dtype)  # (backward's is the larger)
    z, dw, dx = np.empty(dy.shape, x.dtype), np.empty(w.shape, x.dtype), np.empty(x.shape, x.dtype)

    def run():
        kernels.conv_forward(x, w, layer["stride"], pads, z, ws, band)
        dx.fill(0)
        kernels.conv_backward(x, w, layer["stride"], pads, dy, ws, band, dw, dx)
    return run, band


def torch_call(layer, x, w, dy):
    import torch
    tx, tw, tdy = (torch.tensor(a) for a in (x, w, dy))
    tx.requires_grad_(True)
    tw.requires_grad_(True)

    def run():
        tx.grad = tw.grad = None
        torch.nn.functional.conv2d(tx, tw, stride=layer["stride"], padding=layer["pad"]).backward(tdy)
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--json", default="conv_images.json")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    import threadpoolctl
    from kernels import blas_info, conv_layers, openblas_overrides, round_robin
    from tilec.codegen import build_modules
    from tilec.profile_calibrate import reference_stack
    from tilec_runtime.kernel_set import Kernels

    overrides = openblas_overrides()
    (module, _, _), = build_modules([(args.dtype,)], progress=lambda m: print(m, file=sys.stderr))
    limiter = threadpoolctl.threadpool_limits(1)  # the kernels' threads are their own; BLAS runs inside each
    module.set_threads(args.threads)
    kernels = Kernels(module, args.dtype)
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.threads)
    program = reference_stack(args.size).to_program()
    rng = np.random.default_rng(0)
    rows = []
    for layer, x, w, dy in conv_layers(program, rng, args.batch, args.dtype):
        f, ho, wo = layer["out_shape"]
        calls = {}
        calls["one image"], _ = conv_call(module, kernels, layer, x, w, dy, 1)
        calls["several"], band = conv_call(module, kernels, layer, x, w, dy, args.batch)
        if not args.no_torch:
            calls["torch"] = torch_call(layer, x, w, dy)
        times, med = round_robin(calls, args.rounds)
        row = {"layer": layer["index"], "in": layer["in_shape"], "filters": f, "size": layer["size"],
               "out": [ho, wo], "images_per_gemm": max(1, band // ho), "median_s": med, "times_s": times,
               "several_over_one": med["one image"] / med["several"]}
        if "torch" in med:
            row["several_vs_torch"] = med["torch"] / med["several"]
            row["one_vs_torch"] = med["torch"] / med["one image"]
        rows.append(row)
    blas = blas_info()  # (as the rounds ran: one BLAS thread)
    limiter.restore_original_limits()
    total = {who: sum(r["median_s"][who] for r in rows) for who in rows[0]["median_s"]}
    print(f"tiny416 conv layers at {args.size}x{args.size}, batch {args.batch}, {args.dtype}, "
          f"{args.threads} thread(s), forward + backward, median of {args.rounds} rounds")
    print("BLAS: " + "; ".join(f"{b['library']} {b['version']} kernel {b['kernel']}" for b in blas))
    head = f"{'layer':>5} {'in':>14} {'F':>5} {'out':>7} {'imgs/GEMM':>9} {'one image ms':>12} {'several ms':>10} " \
           f"{'gain':>5}" + ("" if args.no_torch else f" {'torch ms':>8} {'vs torch':>8}")
    print(head)
    for r in rows:
        m = r["median_s"]
        line = (f"{r['layer']:>5} {'x'.join(map(str, r['in'])):>14} {r['filters']:>5} {'x'.join(map(str, r['out'])):>7} "
                f"{r['images_per_gemm']:>9} {m['one image'] * 1e3:>12.2f} {m['several'] * 1e3:>10.2f} "
                f"{r['several_over_one']:>5.2f}")
        if "torch" in m:
            line += f" {m['torch'] * 1e3:>8.2f} {r['several_vs_torch']:>8.2f}"
        print(line)
    summary = f"all layers (sum of their medians): one image {total['one image'] * 1e3:.1f} ms, several {total['several'] * 1e3:.1f} ms " \
              f"({total['one image'] / total['several']:.2f}x)"
    if "torch" in total:
        summary += f", torch {total['torch'] * 1e3:.1f} ms (tilec {total['torch'] / total['several']:.2f}x torch's speed)"
    print(summary)
    with open(args.json, "w") as fh:
        json.dump({"size": args.size, "batch": args.batch, "threads": args.threads, "dtype": args.dtype,
                   "blas": blas, "openblas_overrides": overrides, "layers": rows, "total_s": total}, fh,
                  indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
