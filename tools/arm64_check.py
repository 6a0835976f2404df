"""Helper of tools/arm64-check.sh: compare the arm64 run with the x86 run.

``python tools/arm64_check.py compare --x86 x86.npz --arm64 arm64.npz
[--x86-metrics m.jsonl --arm64-metrics m.jsonl] [--tol 1e-10]``

Weights are the ``--save-weights`` files of ``tilec train`` (every parameter
and batch-norm buffer); the error of a tensor is max |arm64 - x86| relative
to max(max |x86|, 1), as in the tests (``tests/test_tiled.py``). Losses come
from the ``--metrics`` files (full precision; the progress lines round to 6
digits). Prints a table and PASS/FAIL; exit status 0 on PASS, 1 on FAIL.
Needs numpy only.
"""
import argparse
import json
import sys

import numpy as np

FLOOR = 1.0


def rel_err(a, b, floor=FLOOR):
    """Max |a - b| relative to the largest magnitude of ``b`` (at least ``floor``)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), floor))


def read_metrics(path):
    """(losses by step, {device: [step_s, ...]}, {device: [compute_s, ...]}) of a --metrics file."""
    losses, steps, compute = {}, {}, {}
    if not path:
        return losses, steps, compute
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "device" in r:
                steps.setdefault(r["device"], []).append(r["step_s"])
                compute.setdefault(r["device"], []).append(r["compute_s"])
            elif "loss" in r:
                losses[r["step"]] = r["loss"]
    return losses, steps, compute


def describe_times(label, path):
    _, steps, compute = read_metrics(path)
    for device in sorted(steps):
        times = ", ".join(f"{s:.2f}" for s in steps[device])
        busy = ", ".join(f"{s:.2f}" for s in compute[device])
        print(f"  {label} device {device}: step s [{times}]  compute s [{busy}]")


def compare(args):
    x86, arm = np.load(args.x86), np.load(args.arm64)
    ok = True
    if set(x86.files) != set(arm.files):
        print(f"  tensors differ: only x86 {sorted(set(x86.files) - set(arm.files))}, "
              f"only arm64 {sorted(set(arm.files) - set(x86.files))}")
        ok = False
    keys = sorted(set(x86.files) & set(arm.files))
    errors = {}
    for key in keys:
        a, b = arm[key], x86[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            print(f"  {key}: arm64 {a.dtype}{a.shape} vs x86 {b.dtype}{b.shape}")
            ok = False
            continue
        errors[key] = rel_err(a, b)
    dtypes = sorted({str(x86[k].dtype) for k in keys})
    identical = sum(1 for k in keys if np.array_equal(arm[k], x86[k]))
    print(f"  {len(keys)} tensors ({', '.join(dtypes)}; {sum(x86[k].size for k in keys)} values), "
          f"{identical} bit-identical")
    worst = sorted(errors, key=errors.get, reverse=True)[:5]
    for key in worst:
        print(f"    {key:<24} max |arm64 - x86| / max(|x86|, 1) = {errors[key]:.3e}")
    moved = max((rel_err(x86[k], np.zeros_like(x86[k])) for k in keys), default=0.0)

    lx, _, _ = read_metrics(args.x86_metrics)
    la, _, _ = read_metrics(args.arm64_metrics)
    loss_err = 0.0
    if lx or la:
        if sorted(lx) != sorted(la):
            print(f"  losses for steps {sorted(la)} (arm64) vs {sorted(lx)} (x86)")
            ok = False
        for step in sorted(set(lx) & set(la)):
            e = abs(la[step] - lx[step]) / max(abs(lx[step]), FLOOR)
            loss_err = max(loss_err, e)
            print(f"  step {step + 1} loss: arm64 {la[step]!r}  x86 {lx[step]!r}  (difference {e:.3e})")
    describe_times("arm64", args.arm64_metrics)
    describe_times("x86  ", args.x86_metrics)

    max_err = max(errors.values(), default=float("inf"))
    ok = ok and bool(errors) and max_err <= args.tol and loss_err <= args.tol
    if "float64" not in dtypes:
        print("  the weights are not float64")
        ok = False
    print(f"max difference over every parameter and buffer: {max_err:.3e} (losses: {loss_err:.3e}; "
          f"tolerance {args.tol:g}; largest |x86| value {moved:.3g})")
    print(f"compare: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="compare two --save-weights files (and --metrics losses)")
    p.add_argument("--x86", required=True)
    p.add_argument("--arm64", required=True)
    p.add_argument("--x86-metrics")
    p.add_argument("--arm64-metrics")
    p.add_argument("--tol", type=float, default=1e-10)
    args = parser.parse_args(argv)
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
