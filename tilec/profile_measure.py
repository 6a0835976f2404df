"""``tilec profile``: measure this machine with the kernels tilec runs.

The generated kernels (``tilec.codegen``) are built here and timed the way
the runtime's schedule calls them: every stage of a tile (``TileStep``: the
convolution, its epilogue, a max-pool; forward and backward) on a set of
shapes that span small and large, thin and deep (the arithmetic intensity
varies by two orders of magnitude), plus the layers the tail runs whole and
the optimiser update. The three coefficients of
:class:`tilec.profiles.KernelCost` are fitted per kind and direction by
non-negative least squares on *relative* error, against the features of
:mod:`tilec.cost.compute`, so that the prediction for a shape that was not
measured follows its FLOPs and bytes. Every timing is the best of several
runs; the spread between the best and the median is reported as noise.

Threads: each kind is timed again on 1, 2, ... up to all cores (the kernels
split their work over them), which gives the profile's speed-ups.

The profile records what it was measured with (machine, CPU, Python, numpy,
the kernels' source): ``tilec.cluster.local_profile`` measures again when
any of them changes.

The link test: latency and bandwidth to a peer over TCP. A peer runs ``tilec profile --serve PORT``: a tiny server that answers two
requests, each a 9-byte header (one op byte, an 8-byte big-endian length)
followed by that many raw bytes:

- ``E`` (echo): the payload comes back unchanged; a small echo gives the
  round-trip time, half of which is the one-way latency;
- ``S`` (sink): the payload is read and discarded, and the 8-byte count
  comes back; a large sink gives the bandwidth, after the round trip.

Only raw bytes travel (nothing is unpickled), and a request may not exceed
``MAX_PAYLOAD``, so a stray client cannot make the server allocate much.
"""
import datetime
import functools
import itertools
import os
import platform
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np

from tilec.cost.compute import conv_features, epilogue_features, features, pool_features
from tilec.errors import TilecError
from tilec.profile_calibrate import BESIDE_ROUNDS, SMALL, beside_others, in_step_costs
from tilec.profiles import FORMAT, KERNEL_KINDS, VERSION
from tilec_runtime.files import atomic_json

# (C_in, filters, kernel, output size, batch, with a 2x2 max-pool fused): the
# layers of YOLO-like stacks at their real sizes (in and out of cache), and
# thin, deep, 1x1 and small ones; a size (rows, cols) is a tile narrowed by a
# column split, as many rows as the whole map but short ones (what tells a
# kernel's cost per row from its cost per byte)
CONV_SHAPES = [(3, 16, 3, 208, 1, True), (16, 32, 3, 104, 1, True), (32, 64, 3, 52, 2, True),
               (64, 128, 3, 26, 1, True), (128, 256, 3, 13, 2, True), (256, 512, 3, 13, 1, False),
               (512, 512, 3, 13, 1, False), (512, 64, 1, 26, 1, False), (128, 64, 1, 52, 1, False),
               (16, 16, 3, 24, 1, False), (8, 8, 3, 6, 1, False), (32, 32, 3, 96, 2, False),
               (16, 32, 3, (96, 12), 4, True), (64, 128, 3, (24, 6), 8, True), (32, 32, 3, (64, 8), 2, False)]
CONV_QUICK = [(3, 16, 3, 160, 1, True), (32, 64, 3, 40, 1, False), (128, 256, 3, 13, 1, True),
              (512, 64, 1, 20, 1, False), (8, 8, 3, 6, 1, False), (32, 32, 3, (48, 8), 4, True)]
POOL_SHAPES = [(16, 2, 104, 1), (64, 2, 26, 2), (256, 2, 13, 1), (8, 2, 8, 1), (32, 3, 40, 1), (512, 2, 13, 1),
               (32, 2, (48, 6), 4)]
POOL_QUICK = [(16, 2, 80, 1), (128, 2, 13, 1), (8, 2, 6, 1), (32, 2, (24, 6), 2)]
FC_SHAPES = [(1024, 64, 1), (4096, 256, 2), (8192, 512, 1), (256, 10, 4)]
FC_QUICK = [(2048, 128, 1), (256, 10, 1)]
ELT_SHAPES = [(16, 64, 1), (64, 32, 2), (256, 12, 1), (8, 6, 1), (128, 26, 4)]
ELT_QUICK = [(16, 48, 1), (8, 6, 1), (128, 16, 1)]
# (bundled detector whose region loss is timed, batch): small and YOLO-sized maps
REGION_SHAPES = [("detector-small", 1), ("detector-small", 16), ("yolov2-tiny", 1), ("yolov2-tiny", 4),
                 ("yolov2-tiny", 8)]
REGION_QUICK = [("detector-small", 4), ("yolov2-tiny", 2)]
# the shape each kind's thread speed-up is measured on (a mid-sized call of it)
THREAD_SHAPE = (32, 64, 3, 48, 1, True)
THREAD_POOL = (64, 2, 48, 1)


def _time(fn, min_time, reps=3):
    """(best, median) seconds of one call of ``fn`` over at least ``reps``
    runs lasting ``min_time``."""
    fn()  # warm-up: first touches, thread start
    times, spent = [], 0.0
    while spent < min_time or len(times) < reps:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    times.sort()
    return times[0], times[len(times) // 2]


def _module(dtype):
    """(the built kernels of ``dtype``, their generated source)."""
    from tilec.codegen import build_modules
    (module, source, _), = build_modules([(dtype,)], progress=lambda msg: print(msg, flush=True))
    return module, source


def _size(hw):
    """(rows, cols) of a shape's output size: a square ``hw`` or a (rows, cols) tile."""
    return tuple(hw) if isinstance(hw, tuple) else (hw, hw)


def _stack(c, f, k, hw, pool, dx):
    """[a cheap 1x1 conv to c channels, when dx,] a k x k conv to f (BN,
    leaky), [a 2x2 max-pool,] a sum-of-squares cost, on an ``hw`` map."""
    from tilec.frontend.builder import Model
    h, w = _size(hw)
    m = Model(height=h, width=w, channels=1 if dx else c, batch=1)
    if dx:
        m.conv(c, size=1, bn=False, act="linear")
    m.conv(f, size=k, bn=True, act="leaky")
    if pool:
        m.maxpool(2, 2)
    m.sse()
    return m.build().to_program()


def _conv_tile(kernels, dtype, c, f, k, hw, b, pool, dx, threads=1):
    """A TileStep of one conv unit (BN, leaky, optionally a fused 2x2 pool)
    whose group starts after a cheap layer when ``dx`` (so that backward
    computes the input gradient, as every group but the first does)."""
    from tilec.plan.build import GroupChoice, build_plan
    from tilec_runtime.fused import TileStep
    from tilec_runtime.lower import lower_rank
    program = _stack(c, f, k, hw, pool, dx)
    last = len(program) - 2
    first = 1 if dx else 0
    rows, cols = _size(hw)
    groups = ([GroupChoice(0, 0, [0, rows], [0, cols], [0])] if dx else [])
    _, h, w = program[last]["out_shape"]
    groups.append(GroupChoice(first, last, [0, h], [0, w], [0]))
    plan = build_plan(program, groups, model="profile", batch=b, dtype=dtype, devices=["d"],
                      optimizer={"lr": 0.0, "momentum": 0.0, "decay": 0.0})
    spec = lower_rank(plan, 0, threads, regen=False)[len(groups) - 1]  # (the cost model adds what regen costs)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, *spec["input"])).astype(dtype)
    step = TileStep(spec, kernels, dtype, x)
    layer = program[first]
    params = {f"{first}.conv.weight": rng.standard_normal((f, c, k, k)).astype(dtype) * 0.1,
              f"{first}.bn.weight": np.ones(f, dtype), f"{first}.bn.bias": np.zeros(f, dtype)}
    buffers = {f"{first}.bn.running_mean": np.zeros(f, dtype), f"{first}.bn.running_var": np.ones(f, dtype)}
    acc = {key: np.zeros_like(v) for key, v in params.items()}
    return step, layer, program, params, buffers, acc


def _samples(quick, dtype, min_time, kernels):
    """[(kind, direction, flops, bytes, rows, best s, median s)] of every measured call, on one thread."""
    from tilec.frontend.models import load_model
    from tilec_runtime import data, ops, region
    itemsize = np.dtype(dtype).itemsize
    rng = np.random.default_rng(0)
    out = []

    def record(kind, direction, fb, fn):
        best, median = _time(fn, min_time)
        out.append((kind, direction, fb[0], fb[1], fb[2] if len(fb) > 2 else 0, best, median))

    for c, f, k, hw, b, pool in (CONV_QUICK if quick else CONV_SHAPES):
        for dx in (False, True):
            step, layer, program, params, buffers, acc = _conv_tile(kernels, dtype, c, f, k, hw, b, pool, dx)
            h, w = _size(hw)
            p = h * w
            pooled = (h // 2) * (w // 2) if pool else None
            step.conv_fwd(0, params)
            step.epi_fwd(0, params, buffers)
            step.grad_output[...] = rng.standard_normal(step.grad_output.shape).astype(dtype)
            if not dx:
                record("conv", "forward", conv_features(layer, p, b, itemsize, "forward", rows=h),
                       lambda: step.conv_fwd(0, params))
                record("epilogue", "forward", epilogue_features(layer, p, pooled, b, itemsize, "forward", h),
                       lambda: (step.stats(0)[0].__setitem__(0, float(b * p)), step.epi_fwd(0, params, buffers,
                                                                                            running=False)))
                record("epilogue", "backward", epilogue_features(layer, p, pooled, b, itemsize, "backward", h),
                       lambda: step.epi_bwd(0, params))
            record("conv", "backward", conv_features(layer, p, b, itemsize, "backward", dx, h),
                   lambda: step.conv_bwd(0, params, acc))
    k_ = kernels
    for c, size, hw, b in (POOL_QUICK if quick else POOL_SHAPES):
        h, w = _size(hw)
        layer = {"kind": "maxpool", "index": 0, "inputs": [-1], "in_shape": [c, h * size, w * size],
                 "out_shape": [c, h, w], "size": size, "stride": size, "padding": 0}
        x = rng.standard_normal((b, c, h * size, w * size)).astype(dtype)
        y, arg = np.empty((b, c, h, w), dtype), np.empty((b, c, h, w), np.int16)
        dy, dx_ = rng.standard_normal(y.shape).astype(dtype), np.zeros_like(x)
        record("maxpool", "forward", pool_features(layer, h * w, b, itemsize, "forward", h),
               lambda: k_.pool_forward(x, size, size, (0, 0, 0, 0), y, arg))
        record("maxpool", "backward", pool_features(layer, h * w, b, itemsize, "backward", h),
               lambda: k_.pool_backward(dy, arg, size, size, (0, 0, 0, 0), dx_))
    for n_in, n_out, b in (FC_QUICK if quick else FC_SHAPES):
        layer = {"kind": "connected", "index": 0, "inputs": [-1], "in_shape": [n_in, 1, 1],
                 "out_shape": [n_out, 1, 1], "output": n_out, "act": "leaky"}
        x = rng.standard_normal((b, n_in, 1, 1)).astype(dtype)
        w = rng.standard_normal((n_out, n_in)).astype(dtype)
        bias = np.zeros(n_out, dtype)
        dy = rng.standard_normal((b, n_out)).astype(dtype)
        record("connected", "forward", features(layer, 1, b, itemsize, "forward"),
               lambda: ops.act_forward(ops.connected_forward(x, w, bias), "leaky"))
        record("connected", "backward", features(layer, 1, b, itemsize, "backward"),
               lambda: ops.connected_backward(x, w, ops.act_backward(dy, "leaky", dy)))
    for c, hw, b in (ELT_QUICK if quick else ELT_SHAPES):
        # reorg (a pure data movement) stands for route/reorg/avgpool/losses and the update
        layer = {"kind": "reorg", "index": 0, "inputs": [-1], "in_shape": [c, hw * 2, hw * 2],
                 "out_shape": [c * 4, hw, hw], "stride": 2, "order": "darknet", "reverse": False}
        x = rng.standard_normal((b, c, hw * 2, hw * 2)).astype(dtype)
        dy = rng.standard_normal((b, c * 4, hw, hw)).astype(dtype)
        record("elementwise", "forward", features(layer, hw * hw, b, itemsize, "forward"),
               lambda: ops.reorg_forward(x, 2, "darknet"))
        record("elementwise", "backward", features(layer, hw * hw, b, itemsize, "backward"),
               lambda: ops.reorg_backward(dy, 2, "darknet"))
    for model, b in (REGION_QUICK if quick else REGION_SHAPES):
        # the loss and its gradient, as the tail's forward computes them (its backward hands that on)
        program = load_model(model).to_program()
        layer = program[-1]
        x = rng.standard_normal((b, *layer["in_shape"])).astype(dtype)
        _, truth = data.generated_batches(program, b, 0, dtype).get(0)
        record("region", "forward", features(layer, layer["out_shape"][1] * layer["out_shape"][2], b, itemsize,
                                             "forward"), lambda: region.forward(x, truth, layer))
    return out


def thread_speedups(kernels, dtype, cores, min_time, rounds=1):
    """{kind: [speed-up on 1, 2, ... cores threads]} of the tiled kernels:
    each thread count's best over ``rounds`` rounds, the counts interleaved
    (a neighbour busy on one core for a moment would otherwise halve the
    speed-up of every count measured then)."""
    from tilec_runtime.fused import TileStep  # noqa: F401 (the kernels are what _conv_tile runs)
    step, layer, program, params, buffers, acc = _conv_tile(kernels, dtype, *THREAD_SHAPE, dx=True, threads=cores)
    step.conv_fwd(0, params)
    step.epi_fwd(0, params, buffers)
    rng = np.random.default_rng(1)
    c, size, hw, b = THREAD_POOL
    x = rng.standard_normal((b, c, hw * size, hw * size)).astype(dtype)
    y, arg = np.empty((b, c, hw, hw), dtype), np.empty((b, c, hw, hw), np.int16)
    calls = {"conv": [lambda: step.conv_fwd(0, params), lambda: step.conv_bwd(0, params, acc)],
             "epilogue": [lambda: step.epi_fwd(0, params, buffers, running=False), lambda: step.epi_bwd(0, params)],
             "maxpool": [lambda: kernels.pool_forward(x, size, size, (0, 0, 0, 0), y, arg)]}
    n = 1 << 20
    p, a = np.ones(n, dtype), np.zeros(n, dtype)
    calls["elementwise"] = [lambda: kernels.sgd(p, a, 0.0, 0.0)]
    best = {kind: [float("inf")] * cores for kind in calls}
    for _ in range(rounds):
        for kind, fns in calls.items():
            for t in range(1, cores + 1):
                kernels.set_threads(t)
                best[kind][t - 1] = min(best[kind][t - 1], sum(_time(fn, min_time)[0] for fn in fns))
    kernels.set_threads(1)
    out = {kind: [round(secs[0] / s, 3) for s in secs] for kind, secs in best.items()}
    out["connected"] = [1.0]  # numpy on one BLAS thread: the runtime keeps BLAS single-threaded
    return out


def fit_kernel(rows, seconds):
    """Non-negative coefficients (overhead, s_per_flop, s_per_byte[,
    s_per_row]) minimising the relative error of ``rows`` (each (1, flops,
    bytes[, rows])) against ``seconds``.

    Every subset of the terms is solved by least squares and the best
    solution with no negative coefficient wins (exact NNLS for so few
    unknowns). Returns (coefficients, worst relative error).
    """
    a = np.asarray(rows, float)
    t = np.asarray(seconds, float)
    n = a.shape[1]
    aw, tw = a / t[:, None], np.ones_like(t)  # divide by t: relative error
    best = (np.inf, np.zeros(n))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            sol, *_ = np.linalg.lstsq(aw[:, cols], tw, rcond=None)
            if (sol < 0).any():
                continue
            coef = np.zeros(n)
            coef[list(cols)] = sol
            err = float(np.sum((aw @ coef - tw) ** 2))
            if err < best[0]:
                best = (err, coef)
    coef = best[1]
    worst = float(np.max(np.abs(a @ coef - t) / t))
    return coef, worst


def fit_kernels(samples):
    """({kind: {direction: {"overhead_us", "s_per_gflop", "s_per_gb"[, "ns_per_row"]}}}, worst relative
    error, noise); a per-row cost only for the kinds whose calls walk rows."""
    kernels, errors, noise = {}, {}, {}
    groups = {}
    for kind, direction, flops, nbytes, nrows, best, median in samples:
        rows, secs, spread = groups.setdefault((kind, direction), ([], [], []))
        rows.append((1.0, flops, nbytes, nrows))
        secs.append(best)
        spread.append(median / best - 1)
    for (kind, direction), (rows, secs, spread) in sorted(groups.items()):
        walks_rows = any(r[3] for r in rows)
        coef, worst = fit_kernel([r if walks_rows else r[:3] for r in rows], secs)
        kernels.setdefault(kind, {})[direction] = {
            "overhead_us": round(coef[0] * 1e6, 3), "s_per_gflop": round(coef[1] * 1e9, 6),
            "s_per_gb": round(coef[2] * 1e9, 6), **({"ns_per_row": round(coef[3] * 1e9, 3)} if walks_rows else {})}
        errors[f"{kind}.{direction}"] = round(worst, 3)
        noise[f"{kind}.{direction}"] = round(float(np.median(spread)), 3)
    return kernels, errors, noise


def _usable_memory_mb():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1000
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6)


CALIBRATION = 5  # what a profile measures and how (in-step factors, row costs, a message's CPU): a change measures again


def fingerprint(dtype="float32"):
    """What a profile of this machine was measured with; a change means measuring again."""
    from tilec.codegen.render import templates_dir
    # rendering every template takes 60-100 ms, and only the templates folder
    # (TILEC_TEMPLATES) can change within a process; a copy, so callers
    # cannot alter the cached dict
    return dict(_fingerprint(dtype, templates_dir()))


@functools.lru_cache(maxsize=None)
def _fingerprint(dtype, folder):
    from tilec.codegen.render import render_module
    from tilec_runtime.native import cpu_id
    import hashlib
    return {"machine": platform.machine(), "cpu": hashlib.sha256(cpu_id().encode()).hexdigest()[:16],
            "cores": os.cpu_count() or 1, "python": platform.python_version(), "numpy": np.__version__,
            "kernels": render_module((dtype,))[0], "calibration": CALIBRATION}


def measure_profile(quick=False, peer=None, dtype="float32", name=None, rounds=None):
    """A profile dict of this machine. ``peer``: (host, port) of a machine
    running ``tilec profile --serve``; without it the link is loopback.
    ``rounds``: whole measurements whose best per call is kept (default 2,
    quick 1): a machine busy with something else for a moment is caught."""
    from tilec_runtime.kernel_set import Kernels
    from tilec_runtime.blas_threads import limit_blas_threads
    module, source = _module(dtype)
    kernels = Kernels(module, dtype)
    limit_blas_threads(1)
    kernels.set_threads(1)
    rounds = rounds or (1 if quick else 2)
    min_time = 0.02 if quick else 0.1
    samples = None
    for _ in range(rounds):
        got = _samples(quick, dtype, min_time, kernels)
        samples = got if samples is None else [
            (k, d, f, b, r, min(t, t2), max(m, m2))
            for (k, d, f, b, r, t, m), (*_, t2, m2) in zip(samples, got)]
    fitted, errors, noise = fit_kernels(samples)
    cores = os.cpu_count() or 1
    thread_rounds = 1 if quick else 3
    speedups = thread_speedups(kernels, dtype, cores, min_time, thread_rounds)
    if peer is None:
        link = measure_transport()
        link_source = ("loopback through tilec's own transport (framing, MAC, sender and reader threads): "
                       "what local workers pay per message; give --peer for a real network")
    else:
        link = measure_link(*peer)
        link_source = f"measured to {peer[0]}:{peer[1]} with the tilec link test"
    link.update(measure_message_cpu())
    host = platform.node() or "this machine"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = {
        "format": FORMAT, "version": VERSION, "name": name or f"local-{host}",
        "cores": cores, "memory_mb": _usable_memory_mb(), "process_overhead_mb": 60,
        "link": {"bandwidth_mbps": round(link["bandwidth_mbps"], 3), "latency_ms": round(link["latency_ms"], 4),
                 "cpu_us_per_message": round(link["cpu_us_per_message"], 2),
                 "cpu_ns_per_byte": round(link["cpu_ns_per_byte"], 4)},
        "kernels": fitted,
        "threads": {kind: speedups.get(kind, [1.0]) for kind in KERNEL_KINDS},
        "sustained": 1.0,
        "measured_with": fingerprint(dtype),
        "sources": {
            "kernels": f"measured by `tilec profile{' --quick' if quick else ''}` on {host} ({platform.machine()}, "
                       f"{platform.python_version()}, numpy {np.__version__}) at {when}: {len(samples)} timed calls "
                       f"of the generated kernels ({source.module}, {dtype}, one thread), best of {rounds} round(s), "
                       f"fitted per kind and direction",
            "fit_worst_relative_error": errors,
            "noise_median_over_best": noise,
            "threads": f"each kind timed on 1 to {cores} threads on one mid-sized call, best of "
                       f"{thread_rounds} interleaved round(s)",
            "sustained": "not measured: a short run; a board that throttles under sustained load needs its own",
            "memory_mb": "MemAvailable at measurement time",
            "link": link_source,
            "link.cpu": "the CPU time (user and system, both ends in one process) of frames of two sizes through "
                        "tilec's own transport on a loopback socket pair, cores idle, halved and fitted to a cost "
                        "per message and per byte",
        },
    }
    # the fitted costs, as they stand, price the calibration steps
    size, steps = (208, 4) if quick else (416, 6)
    # the jitter is a variance over steps: over 5 (of 6, the first left out) it came out anywhere from 0.10
    # to 0.22 in windows of one trace here (tiny416, batch 1, two workers); over 12, 0.12-0.16
    beside_steps = steps if quick else 16
    in_step, calibration_s = in_step_costs(data, module, dtype, size=size, steps=steps)
    for kind, per in in_step.items():
        for direction, extra in per.items():
            fitted[kind][direction].update(extra)
    data["sources"]["in_step"] = (
        f"one-device training steps of tiny416's layers ({steps} each, the runtime's executor, traced; "
        f"{calibration_s:.1f} s): dispatch_us, each kind's measured less fitted time per op at {SMALL}x{SMALL}; "
        f"in_step, the rest over the fitted at {size}x{size}; kinds these steps do not run keep none")
    if peer is None:  # the machine local workers share: how they slow each other down
        beside, (jitter, jitter_call), beside_s = beside_others(
            data, {"module": source.module, "source": source.text}, module, dtype, size=size, steps=beside_steps)
        for kind, per in beside.items():
            for direction, factor in per.items():
                fitted[kind][direction]["beside_others"] = factor
        data["sources"]["beside_others"] = (
            f"training steps of tiny416's layers at {size}x{size} on two local workers side by side, each of "
            f"half the cores ({beside_steps} steps in {BESIDE_ROUNDS} rounds, traced; {beside_s:.1f} s): each kind's measured "
            f"time over its price, over the same on one device alone in steps before each round; what prices "
            f"local workers that take every core" if beside else
            "not measured: fewer than two cores")
        if jitter is not None:
            data["jitter"] = jitter
            data["jitter_call_ms"] = round(jitter_call * 1e3, 3)
            data["sources"]["jitter"] = (
                "the same steps: the log of the ratio of the two workers' times of each kernel call, its "
                "variance over the steps pooled over the calls weighted by their time, over 2 (one worker's; "
                "their difference is sqrt(2) times one's), as a lognormal's spread; what the simulator draws "
                "every call's time around its price with; jitter_call_ms: the length of call that spread holds for "
                "(the pool's, where a call's spread falls as its length to the -1/4: the simulator scales it to "
                "each op's from there)")
    return data


def write_profile(data, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_json(path, data, indent=1)
    return path


# -- the link test ------------------------------------------------------------
HEADER = struct.Struct(">cQ")
MAX_PAYLOAD = 256 << 20
CHUNK = 1 << 20


class LinkError(TilecError):
    """The link test could not reach or talk to its peer."""


def _recv_exact(sock, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, CHUNK))
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return bytes(buf)


def _drain(sock, n):
    buf = bytearray(min(n, CHUNK))
    left = n
    while left:
        k = sock.recv_into(buf, min(left, len(buf)))
        if k == 0:
            raise ConnectionError("peer closed the connection")
        left -= k


def _serve_one(conn):
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                head = _recv_exact(conn, HEADER.size)
            except ConnectionError:
                return
            op, n = HEADER.unpack(head)
            if n > MAX_PAYLOAD or op not in (b"E", b"S"):
                return  # not our protocol: hang up
            if op == b"E":
                conn.sendall(_recv_exact(conn, n))
            else:
                _drain(conn, n)
                conn.sendall(struct.pack(">Q", n))


def serve(port, host="0.0.0.0", ready=None, connections=None):
    """Answer link tests on ``host:port`` (``connections``: stop after that
    many, None = forever). ``ready`` (a threading.Event) is set once
    listening; returns the bound port."""
    with socket.create_server((host, port)) as srv:
        if ready is not None:
            ready.port = srv.getsockname()[1]
            ready.set()
        served = 0
        while connections is None or served < connections:
            conn, _ = srv.accept()
            _serve_one(conn)
            served += 1
    return port


def start_loopback_server():
    """A one-connection server on a free loopback port, in a thread; returns the port."""
    ready = threading.Event()
    threading.Thread(target=serve, args=(0, "127.0.0.1", ready, 1), daemon=True, name="tilec-linktest").start()
    if not ready.wait(10):
        raise LinkError("the loopback link-test server did not start")
    return ready.port


def _busy(stop):
    """Keep one core busy as a worker's kernels do: GIL-free calls of about
    a millisecond with a little Python between them."""
    x = np.ones(1 << 18, np.float32)
    while not stop.is_set():
        for _ in range(8):
            np.multiply(x, 1.0, out=x)


def _loopback_links(arrays):
    """((link 0 -> 1, link 1 -> 0), (mailbox 0, mailbox 1)): the two ends of
    a loopback socket pair in this process, each a ``tilec_runtime``
    ``Link`` over an authenticated ``Channel`` (the MAC both ends would
    choose), whose frame ``tensor`` t carries an array shaped as ``arrays[t]``."""
    from tilec_runtime.auth import choose_mac, mac_speeds
    from tilec_runtime.transport import Channel, Link, Mailbox, Spec
    speeds = mac_speeds()
    mac = choose_mac(speeds, speeds)
    keys = (os.urandom(32), os.urandom(32))
    a, b = socket.socketpair()

    def expect(kind, step, tensor):
        return Spec(np.dtype(np.float32), arrays[tensor].shape)
    boxes = (Mailbox(), Mailbox())
    links = (Link(Channel(a, keys[0], keys[1], mac), 1, boxes[0], expect),
             Link(Channel(b, keys[1], keys[0], mac), 0, boxes[1], expect))
    return links, boxes


def measure_transport(pings=100, payload=4 << 20, rounds=5, busy=None):
    """{"latency_ms", "bandwidth_mbps"} of a message through the runtime's own
    stack on this machine (``tilec_runtime.transport``: the frame, its MAC,
    the sending and reading threads and the mailbox), over a loopback socket
    pair: the link local worker processes see. Latency: half the median
    round trip of a small frame; bandwidth: a ``payload``-byte frame's,
    median of ``rounds``, less one latency.

    Local workers exchange messages while every core computes, so the
    sending and reading threads wait for a core, and their MAC and copies
    take one from compute: measured with ``busy`` threads (default: one per
    core) computing throughout. Idle, this machine's loopback measured 3-5x
    faster than what workers then met in their traces."""
    from tilec_runtime.transport import Kind
    small, big = np.zeros(64, np.float32), np.zeros(payload // 4, np.float32)
    links, boxes = _loopback_links((small, big))
    stop = threading.Event()
    load = [threading.Thread(target=_busy, args=(stop,), daemon=True, name="tilec-busy")
            for _ in range((os.cpu_count() or 1) if busy is None else busy)]
    for thread in load:
        thread.start()
    try:
        rtts = []
        for i in range(pings):
            t0 = time.perf_counter()
            links[0].send(Kind.FWD, i, 0, small)
            boxes[1].get((0, Kind.FWD, i, 0), 10)
            links[1].send(Kind.FWD, i, 0, small)
            boxes[0].get((1, Kind.FWD, i, 0), 10)
            rtts.append(time.perf_counter() - t0)
        latency = sorted(rtts)[len(rtts) // 2] / 2
        times = []
        for i in range(rounds):
            t0 = time.perf_counter()
            links[0].send(Kind.FWD, pings + i, 1, big)
            boxes[1].get((0, Kind.FWD, pings + i, 1), 30)
            times.append(time.perf_counter() - t0)
        typical = sorted(times)[len(times) // 2]
    finally:
        stop.set()
        for link in links:
            link.close(1.0)
        for thread in load:
            thread.join()
    return {"latency_ms": latency * 1e3, "bandwidth_mbps": payload * 8 / max(typical - latency, 1e-9) / 1e6}


def parse_peer(text):
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LinkError(f"--peer: expected HOST:PORT, got {text!r}")
    return host, int(port)


def measure_message_cpu(sizes=(16 << 10, 1 << 20), megabytes=48):
    """{"cpu_us_per_message", "cpu_ns_per_byte"}: the CPU one end of a frame
    spends on it (``tilec_runtime.transport``: framing, MAC, copies, system
    calls; the sender's or the reader's side alike), from the process's CPU
    time (user and system) over frames of two ``sizes`` sent between the two
    ends of a loopback socket pair in this process, halved. Where a device's
    kernel threads take every core, that is what a message takes from them."""
    from tilec_runtime.transport import Kind
    arrays = [np.zeros(size // 4, np.float32) for size in sizes]
    links, (_, inbox) = _loopback_links(arrays)
    per_frame, step = [], 0
    try:
        for tensor, array in enumerate(arrays):
            count = max(8, (megabytes << 20) // array.nbytes)
            best = None
            for _ in range(3):  # (the least of three: this process alone, as the devices' cores are)
                c0 = time.process_time()
                for _ in range(count):
                    links[0].send(Kind.FWD, step, tensor, array)
                    inbox.get((0, Kind.FWD, step, tensor), 30)
                    step += 1
                spent = (time.process_time() - c0) / count / 2
                best = spent if best is None else min(best, spent)
            per_frame.append(best)
    finally:
        for link in links:
            link.close(1.0)
    (small, big), (t_small, t_big) = sizes, per_frame
    per_byte = max(0.0, (t_big - t_small) / (big - small))
    return {"cpu_us_per_message": max(0.0, t_small - per_byte * small) * 1e6, "cpu_ns_per_byte": per_byte * 1e9}


def measure_link(host, port, pings=20, payload=16 << 20, timeout=30.0):
    """{"latency_ms", "bandwidth_mbps"} of the link to a serving peer.

    Latency: half the median round trip of small echoes. Bandwidth: a
    ``payload``-byte sink, less one round trip, best of three.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise LinkError(f"cannot connect to {host}:{port}: {exc}") from None
    try:
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(pings):
                t0 = time.perf_counter()
                sock.sendall(HEADER.pack(b"E", 8) + b"tilecpin")
                if _recv_exact(sock, 8) != b"tilecpin":
                    raise LinkError(f"{host}:{port} answered the echo with other bytes: not a tilec link-test server")
                rtts.append(time.perf_counter() - t0)
            rtt = sorted(rtts)[len(rtts) // 2]
            data = bytes(payload)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                sock.sendall(HEADER.pack(b"S", payload))
                sock.sendall(data)
                if struct.unpack(">Q", _recv_exact(sock, 8))[0] != payload:
                    raise LinkError(f"{host}:{port} acknowledged a different byte count")
                best = min(best, time.perf_counter() - t0)
    except (OSError, ConnectionError) as exc:
        raise LinkError(f"link test to {host}:{port} failed: {exc}") from None
    seconds = max(best - rtt, 1e-9)
    return {"latency_ms": rtt / 2 * 1e3, "bandwidth_mbps": payload * 8 / seconds / 1e6}
