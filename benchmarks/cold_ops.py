"""A kernel call right after a sleep against the same call back to back.

``benchmarks/emulated_cluster.py`` slows a device by sleeping after each of
its compute ops (``tilec worker --emulate-speed``), so every op of an
emulated device starts after a sleep, its caches, TLB and branch history
cold from whatever ran meanwhile; a slow board computing without pause
does not pay that. This measures how much longer a generated conv forward
takes when each call follows a sleep of ``--stretch`` times its own length
(the sleep of a device emulated at speed 1 / (1 + stretch)), against the
same calls back to back, side by side in one process: the medians of
``--calls`` calls each, on tiny416-like tiles of three sizes.

    python benchmarks/cold_ops.py [--stretch 11.5] [--calls 50] [--json cold_ops.json]
"""
import argparse
import json
import statistics
import time

import numpy as np

SHAPES = [(16, 32, 32), (64, 64, 16), (32, 64, 104)]  # (C_in, filters, map size): small to large calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stretch", type=float, default=11.5, help="sleep after a call, in multiples of its length")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json", default="cold_ops.json")
    args = ap.parse_args()

    import threadpoolctl
    from tilec.codegen import compile_kernels
    from tilec_runtime.genops import GeneratedOps
    ops = GeneratedOps(compile_kernels("float32").module_obj)
    threadpoolctl.threadpool_limits(1)
    rng = np.random.default_rng(0)
    rows = []
    print(f"conv forward, float32, one thread; a sleep of {args.stretch:g}x the call after each 'after sleeps' call")
    print(f"{'conv':>12} {'map':>8} {'back to back us':>16} {'after sleeps us':>16} {'ratio':>6}")
    for c, f, hw in SHAPES:
        x = rng.standard_normal((1, c, hw, hw)).astype("float32")
        w = rng.standard_normal((f, c, 3, 3)).astype("float32")

        def call():
            t = time.perf_counter()
            ops.conv2d_forward(x, w, 1, (1, 1, 1, 1))
            return time.perf_counter() - t
        for _ in range(20):
            call()
        hot, cold = [], []
        time.sleep(args.stretch * call())
        for _ in range(args.calls):  # interleaved: one call after a sleep, then two right behind it
            d = call()
            cold.append(d)
            hot.append(call())
            hot.append(call())
            time.sleep(args.stretch * d)
        h, k = statistics.median(hot), statistics.median(cold)
        rows.append({"in": c, "filters": f, "map": hw, "back_to_back_s": h, "after_sleep_s": k, "ratio": k / h})
        print(f"{f'{c}->{f}':>12} {f'{hw}x{hw}':>8} {h * 1e6:>16.1f} {k * 1e6:>16.1f} {k / h:>6.2f}")
    with open(args.json, "w") as fh:
        json.dump({"stretch": args.stretch, "calls": args.calls, "rows": rows}, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
