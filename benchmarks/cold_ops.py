"""A kernel call right after a sleep against the same call back to back.

``benchmarks/emulated_cluster.py`` slows a device by sleeping after each of
its compute ops (``tilec worker --emulate-speed``), so every op of an
emulated device starts after a sleep, its caches, TLB and branch history
cold from whatever ran meanwhile; a slow board computing without pause
does not pay that. This measures how much longer a conv tile's forward
stage (``tilec_runtime.fused``'s, as a worker runs it: preallocated,
generated kernels, one thread) takes right after the sleep
``Stretch.after`` would take at speed 1 / (1 + ``--stretch``), against the
two calls that follow it back to back, interleaved in one process: the
medians of ``--calls`` calls after a sleep and of twice as many back to
back, on tiny416-like tiles of three sizes.

    python benchmarks/cold_ops.py [--stretch 11.5] [--calls 50] [--json cold_ops.json]
"""
import argparse
import json
import statistics
import time

SHAPES = [(16, 32, 32), (64, 64, 16), (32, 64, 104)]  # (C_in, filters, map size): small to large calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stretch", type=float, default=11.5, help="sleep after a call, in multiples of its length")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json", default="cold_ops.json")
    args = ap.parse_args()

    import threadpoolctl
    from tilec.profile_measure import _conv_tile
    from tilec.codegen import compile_kernels
    from tilec_runtime.emulate import Stretch
    from tilec_runtime.kernel_set import Kernels
    kernels = Kernels(compile_kernels("float32").module_obj, "float32")
    threadpoolctl.threadpool_limits(1)
    stretch = Stretch(1.0 / (1.0 + args.stretch))
    rows = []
    print(f"conv forward stage, float32, one thread; a sleep of {args.stretch:g}x the call after each "
          "'after a sleep' call")
    print(f"{'conv':>12} {'map':>8} {'back to back us':>16} {'after a sleep us':>17} {'ratio':>6}")
    for c, f, hw in SHAPES:
        step, _, _, params, _, _ = _conv_tile(kernels, "float32", c, f, 3, hw, 1, False, False)

        def call():
            t = time.perf_counter()
            step.conv_fwd(0, params)
            return time.perf_counter() - t
        for _ in range(20):
            call()
        hot, cold = [], []
        stretch.after(call())
        for _ in range(args.calls):  # interleaved: one call after a sleep, then two right behind it
            d = call()
            cold.append(d)
            hot.append(call())
            hot.append(call())
            stretch.after(d)
        h, k = statistics.median(hot), statistics.median(cold)
        rows.append({"in": c, "filters": f, "map": hw, "back_to_back_s": h, "after_sleep_s": k, "ratio": k / h})
        print(f"{f'{c}->{f}':>12} {f'{hw}x{hw}':>8} {h * 1e6:>16.1f} {k * 1e6:>17.1f} {k / h:>6.2f}")
    with open(args.json, "w") as fh:
        json.dump({"stretch": args.stretch, "calls": args.calls, "rows": rows}, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
