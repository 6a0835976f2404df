"""The kernels as a training step runs them: a correction on the fitted costs.

``tilec profile`` fits each kernel kind's cost on calls repeated on one
tile, its data warm in cache from the call before. A training step runs
each stage once, on data other stages have pushed out of cache, on maps
larger than the fitted tiles, with the executor's dispatch around it. The
fitted costs therefore predict less than a step takes: on this project's
2-core x86 machine a traced one-device step of tiny416 ran its convolutions
5-10% and its batch-norm epilogues 1.2-3.8x slower than priced.

So after the fit the profile trains a reference stack on one device for a
few steps with the runtime's own executor, traced; prices the same schedule
ops with the fitted costs (the simulator's pricing, ``tilec.inspect
.simulate``), and keeps, per kernel kind and direction, what a step adds to
each call (``dispatch_us``, from the stack at 64x64, where the kernels cost
little) and the rest of the measured time over the priced (``in_step``, at
full size), which :class:`tilec.profiles.KernelCost` applies. Kinds a
one-device step of the stack does not run (connected, the element-wise
tail) keep none.
"""
import re
import statistics
import time

import numpy as np

# schedule op -> (kernel kind, direction) whose cost prices it
OP_KIND = {"conv_fwd": ("conv", "forward"), "conv_bwd": ("conv", "backward"),
           "epi_fwd": ("epilogue", "forward"), "epi_bwd": ("epilogue", "backward"),
           "pool_fwd": ("maxpool", "forward"), "pool_bwd": ("maxpool", "backward")}
# a factor outside this is a broken measurement (a machine busy for a moment), not a cache effect
LIMITS = (0.5, 8.0)
BESIDE_ROUNDS = 2  # rounds of steps alone, then side by side, that ``beside_others`` alternates
SMALL = 64  # the stack's image size where its kernels cost little beside the executor's dispatch


def reference_stack(size):
    """The bundled tiny416 (the reference stack for speed) on a ``size`` x ``size`` image."""
    from tilec.frontend.cfg import parse_cfg
    from tilec.frontend.models import model_path
    text = model_path("tiny416").read_text()
    return parse_cfg(re.sub(r"(?m)^(height|width)\s*=\s*\d+", rf"\g<1>={size}", text), path="tiny416")


def measured_ops(plan, module, steps):
    """{op index: median seconds} of the schedule's ops on one device over ``steps`` steps (the first dropped)."""
    return _medians(op_series(plan, module, steps))


def _medians(series):
    return {i: statistics.median(v) for i, v in series.items()}


def op_series(plan, module, steps, threads=1):
    """{op index: [seconds, step by step]} of the schedule's ops on one device
    (in this process, on ``threads`` kernel threads) over ``steps`` steps, the
    first (which touches the arenas) left out."""
    from tilec_runtime import data, weights
    from tilec_runtime.comm import InProcessHub
    from tilec_runtime.inprocess import make_executors
    program = plan["program"]
    params, buffers = weights.init_params(program, 0, plan["dtype"])
    batches = data.generated_batches(program, plan["batch"], 0, plan["dtype"])
    ex, = make_executors(plan, [InProcessHub(1).comm(0)], module, params, buffers, threads=threads, trace=True)
    ex.lr = 0.0  # the numbers stay those of the first step: no drift into denormals or overflow
    per = {}
    try:
        for step in range(steps):
            ex.events.clear()
            images, target = batches.get(step)
            ex.step(images=images, target=target)
            if step == 0:
                continue  # first touches of the arenas
            for i, (_, a, b, *_) in enumerate(ex.events):
                per.setdefault(i, []).append(b - a)
    finally:
        ex.close()
    return per


def _pairs(plan, cluster, measured):
    """{(kind, direction): [(measured s, priced s)]} of the plan's kernel ops;
    ``measured``: {rank: {op index: median seconds}}. A conv's forward in
    row pieces is left out (its price is a share of the whole call's)."""
    from tilec.inspect.simulate import OpPricer
    pricer = OpPricer(plan, cluster)
    out = {}
    for rank, times in measured.items():
        for i, op in enumerate(plan["schedule"][rank]):
            key = OP_KIND.get(op["op"])
            if key is not None and i in times and "rows" not in op:
                out.setdefault(key, []).append((times[i], pricer.op(rank, op)[0]))
    return out


def _factor(measured, priced):
    return round(float(np.clip(measured / priced, *LIMITS)), 3)


def _priced_and_measured(profile, module, dtype, size, steps):
    """{(kind, direction): [(measured s, priced s)]} of the stack's ops at ``size`` on one device."""
    from tilec.cluster import uniform_cluster
    from tilec.compile import compile_plan
    cluster = uniform_cluster(profile, 1, threads=1)
    plan = compile_plan(reference_stack(size), cluster=cluster, batch=1, dtype=dtype)
    return _pairs(plan, cluster, {0: measured_ops(plan, module, steps)})


def in_step_costs(profile_data, module, dtype="float32", size=416, steps=5):
    """({kind: {direction: {"in_step", "dispatch_us"}}}, seconds it took) for
    ``profile_data`` (fitted, uncorrected): per op, what the executor adds
    (``dispatch_us``: measured less priced on a stack so small that its
    kernels cost next to nothing) and how much slower its kernels run
    (``in_step``: the rest of the measured time over the priced, on the stack
    at ``size``)."""
    from tilec.profiles import profile_from_dict
    t0 = time.perf_counter()
    profile = profile_from_dict(profile_data, "<being measured>")
    small = _priced_and_measured(profile, module, dtype, SMALL, steps)
    large = _priced_and_measured(profile, module, dtype, size, steps)
    out = {}
    for key, pairs in large.items():
        dispatch = max(0.0, statistics.median(m - p for m, p in small[key])) if key in small else 0.0
        measured = sum(max(m - dispatch, 0.0) for m, _ in pairs)
        priced = sum(p for _, p in pairs)
        if priced > 0:
            kind, direction = key
            out.setdefault(kind, {})[direction] = {"in_step": _factor(measured, priced),
                                                   "dispatch_us": round(dispatch * 1e6, 2)}
    return out, time.perf_counter() - t0


def beside_others(profile_data, kernel_source, module, dtype="float32", size=416, steps=6, workers=2,
                  rounds=BESIDE_ROUNDS):
    """({kind: {direction: factor}}, jitter, seconds it took): how much
    slower each kernel kind runs in local workers computing side by side
    than on one device alone, the executor's dispatch aside (the factor
    multiplies ``in_step``), measured on ``workers`` local worker processes
    of the generated kernels ``kernel_source`` ({"module", "source"}) that
    take every core between them training the reference stack, traced
    ({}, None where there are fewer cores than workers). Processes share
    caches and memory bandwidth: on this project's 2-core machine two
    workers' epilogues, which stream through memory, ran 1.5-2.2x their
    price alone, their convolutions 1.1-1.3x.

    The side-by-side steps (``steps`` in all) come in ``rounds``, each after
    as many steps of the stack on one device alone (``module``, in this
    process, on as many threads as a worker has), and each kind's factor is
    its time side by side over its price, over the same alone: a machine
    shared with others whose speed drifts (this project's swung by a third
    within minutes) drifts both alike, where against the fitted price alone,
    timed a minute before, a slow minute counted as contention (two
    workers' convolutions at 1.6-1.7x in a profile taken while another
    tenant held a core, and the simulator priced two workers at 1.1x one
    device where they ran 1.4-1.6x).

    ``jitter``: a pair, the spread of a kernel call's time from step to
    step, from the same traces (``step_jitter``), and the length of call it
    holds for (``jitter_call_seconds``); ({}, (None, None), 0.0) where there
    are fewer cores than workers."""
    from tilec.cluster import uniform_cluster
    from tilec.compile import compile_plan
    from tilec.profiles import profile_from_dict
    from tilec_runtime import data, launch, weights
    t0 = time.perf_counter()
    profile = profile_from_dict(profile_data, "<being measured>")
    if profile.cores < workers:
        return {}, (None, None), 0.0
    threads = profile.cores // workers
    cluster = uniform_cluster(profile, workers, threads=threads)  # priced as if each were alone
    stack = reference_stack(size)
    # every group on every worker: priced by a profile still being measured, the optimiser at times put the
    # whole tiled prefix on one of them (the CI's quick profile, 4 of 40 times here), and then nothing ran
    # side by side to measure
    plan = compile_plan(stack, cluster=cluster, batch=1, dtype=dtype, spread=True, tail="channels")
    one = uniform_cluster(profile, 1, threads=threads)
    alone_plan = compile_plan(stack, cluster=one, batch=1, dtype=dtype)
    program = plan["program"]
    params, buffers = weights.init_params(program, 0, dtype)
    series = {rank: {} for rank in range(workers)}  # rank -> {op index: [seconds, step by step]}
    alone = {}  # op index -> [seconds, step by step] on one device
    per_round = max(3, -(-steps // rounds))
    for _ in range(rounds):
        for i, v in op_series(alone_plan, module, per_round + 1, threads).items():
            alone.setdefault(i, []).extend(v)
        records = []
        # (a learning rate of next to nothing: every step computes the numbers of the first)
        launch.train_local(plan, params, buffers, data.generated_batches(program, 1, 0, dtype), steps=per_round + 1,
                           kernel_source=kernel_source, threads=threads, trace=True, lr=[[0, 1e-30]],
                           on_metrics=records.append, timeout=300)
        for rank in range(workers):
            for step in records[1:]:  # (the first touches the arenas)
                timed = [e for e in step[rank]["trace"] if e[4] == 0]  # the schedule's thread: its ops in order
                for i, event in enumerate(timed):
                    series[rank].setdefault(i, []).append(event[3] * 1e-6)
    measured = {rank: _medians(per) for rank, per in series.items()}
    by_itself = _pairs(alone_plan, one, {0: _medians(alone)})
    out = {}
    for key, pairs in _pairs(plan, cluster, measured).items():
        factor = contention(pairs, by_itself.get(key, []), profile.cost(*key).dispatch_s)
        if factor is not None:
            out.setdefault(key[0], {})[key[1]] = factor
    terms = _jitter_terms(plan, series)
    return out, (_spread(terms), _call_seconds(terms)), time.perf_counter() - t0


def contention(beside, alone, dispatch):
    """The factor of one kernel kind side by side: ``beside`` and ``alone``
    [(measured s, priced s)] of its ops, each kind's measured time over its
    price (``dispatch`` aside) side by side over the same alone; None where
    either has nothing to price or measure."""
    sums = [(sum(max(m - dispatch, 0.0) for m, _ in ps), sum(p - dispatch for _, p in ps)) for ps in (beside, alone)]
    if min(x for pair in sums for x in pair) <= 0:
        return None
    (bm, bp), (am, ap) = sums
    return _factor(bm / bp, am / ap)


# kernel calls shorter than this are left out of the jitter: the executor's dispatch and the clock's
# resolution, not the kernel, make their spread
JITTER_MIN_S = 5e-4


def step_jitter(plan, series):
    """The spread of a kernel call's time (its standard deviation over its
    mean) from step to step on devices computing side by side, from
    ``series`` ({rank: {schedule op index: [seconds per step]}}) of ranks 0
    and 1 of ``plan``: for each kernel op both ranks run (the same group
    and unit: the same work, up to the split), the log of the ratio of
    their times step by step; its variance over the steps (about its mean:
    what one tile costs more than the other every step is not jitter, nor,
    in a ratio's log, how much more) pooled over the ops weighted by their
    time is twice the spread's square (lognormal: what the simulator
    draws). Two devices whose calls vary by s apart differ by about
    s * sqrt(2): what a barrier between them makes the faster wait. None
    without two ranks or three steps of a common op."""
    return _spread(_jitter_terms(plan, series))


def _spread(terms):
    if not terms:
        return None
    sigma2 = sum(m * v for m, v in terms) / sum(m for m, _ in terms) / 2  # of the log of one call's time
    return round(float(np.sqrt(np.expm1(sigma2))), 4)  # that lognormal's standard deviation over its mean


def jitter_call_seconds(plan, series):
    """The length of call the spread ``step_jitter`` pools holds for: where
    a call's variance falls as its length to the -2 ``JITTER_EXPONENT``
    (what the simulator scales the spread to every op's length by,
    ``tilec.inspect.simulate``), the pool of calls of lengths m weighted by
    m has the variance of one call of (sum m / sum m^(1 - 2e))^(1 / 2e):
    with e = 1/4, (sum m / sum sqrt(m))^2, shorter than the calls' mean
    unless they are all alike. None where ``step_jitter`` is."""
    return _call_seconds(_jitter_terms(plan, series))


def _call_seconds(terms):
    from tilec.inspect.simulate import JITTER_EXPONENT
    if not terms:
        return None
    e2 = 2 * JITTER_EXPONENT
    return round((sum(m for m, _ in terms) / sum(m ** (1 - e2) for m, _ in terms)) ** (1 / e2), 6)


def _jitter_terms(plan, series):
    """[(a kernel op's mean seconds, the variance over the steps of the log
    of its two ranks' ratio)] of every kernel op both ranks run
    (``step_jitter``), those of at least ``JITTER_MIN_S`` or, where none
    is that long, of at least half the longest's; [] without two ranks or
    three steps of a common op."""
    if len(series) < 2:
        return []
    keyed = []
    for rank in (0, 1):
        ops, seen = {}, {}
        for i, times in sorted(series[rank].items()):
            op = plan["schedule"][rank][i] if i < len(plan["schedule"][rank]) else None
            if op is not None and op["op"] in OP_KIND and "rows" not in op:
                key = (op["op"], op["group"], op.get("unit"))
                seen[key] = seen.get(key, -1) + 1  # (a second call of the same op, its own)
                ops[key + (seen[key],)] = times
        keyed.append(ops)
    terms = []
    for key in keyed[0].keys() & keyed[1].keys():
        a, b = keyed[0][key], keyed[1][key]
        n = min(len(a), len(b))
        if n < 3 or min(a[:n] + b[:n]) <= 0:
            continue
        logs = [float(np.log(x / y)) for x, y in zip(a[:n], b[:n])]
        terms.append(((sum(a[:n]) + sum(b[:n])) / (2 * n), statistics.variance(logs)))
    # a fast machine at the quick profile's small map (or a plan of many small units) may have no call of
    # JITTER_MIN_S: then the longer half of them, the spread's length going with it (jitter_call_seconds)
    shortest = min(JITTER_MIN_S, max((m for m, _ in terms), default=0.0) / 2)
    return [(m, v) for m, v in terms if m >= shortest]
