"""Pricing the candidate groups on several cores.

The cost stage prices thousands of tiled groups (YOLOv2 at batch 8 on 6
devices: 4,920, over half of `tilec compile`'s time on one core), each a
pure function of the program, the cluster, its span and its layout. Forked
children price shares of them, whole spans each (the model caches a span's
tiles, so a span priced in two processes would be priced twice), and hand
the priced groups back, pickled, through a pipe; the parent prices its own
share meanwhile and puts every child's group into the model's cache, so
the candidates are the same values in the same order as priced on one
core. The tail groups (:class:`tilec.cost.tail.TailArc`) go to the last
child with a lighter share of the tiled ones. The pipe carries only what
the parent's own children computed, never anything from a network.

Where ``fork`` is missing (Windows) or a child fails, the parent prices
the rest itself.
"""
import os
import time

MIN_JOBS = 400  # fewer: forking and pickling cost more than they save
MAX_WORKERS = 4
# a tail group's layer on one member against a tiled group's layer on all its tiles (YOLOv2 on 3-6 Pi 3s:
# 0.04-0.07 ms against 0.06-0.10 ms a unit, on one core)
TAIL_WEIGHT = 0.7
CHILD_GRACE_S = 20.0  # a child's share may take this long (or 4x the parent's) before the parent prices it
WORKERS_ENV = "TILEC_COST_WORKERS"  # processes that price groups (default: this machine's cores, at most 4)


def workers():
    """How many processes price groups: ``TILEC_COST_WORKERS``, else the
    cores this process may run on (at most ``MAX_WORKERS``)."""
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"{WORKERS_ENV}={env!r}: expected a whole number of processes") from None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def _price(model, job):
    first, last, rows, cols, devices, layout = job
    try:
        return model.group(first, last, rows, cols, devices, layout=layout)
    except ValueError:
        return None  # split lines the region analysis rejects


def _arcs(model, tails):
    return [model.tail_pricer.arc(*t) for t in tails]


def _child(model, jobs, tails, conn):
    try:
        priced = [_price(model, job) for job in jobs]
        for g in priced:
            if g is not None:
                g.layout = None  # the parent puts its own Layout back
        conn.send(("ok", (priced, _arcs(model, tails))))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which prices the share itself
        conn.send(("failed", repr(exc)))
    finally:
        conn.close()


def price_candidates(model, jobs, tails=(), n_workers=None, min_jobs=None):
    """([Group, or None where the split lines are rejected] of each job
    ``(first, last, row_splits, col_splits, devices, layout)``, as
    ``model.group`` prices them; the :class:`tilec.cost.tail.TailArc` of
    each of ``tails`` ``(first, last, mode, devices)``, as
    ``model.tail_pricer.arc`` prices them), in order, and cached in the
    model. The last child prices the tail groups besides its share of the
    tiled ones."""
    tails = list(tails)
    n = workers() if n_workers is None else max(1, n_workers)
    if n == 1 or len(jobs) < (MIN_JOBS if min_jobs is None else min_jobs) or not hasattr(os, "fork"):
        return [_price(model, job) for job in jobs], _arcs(model, tails)
    import multiprocessing
    shares = _shares(jobs, n, TAIL_WEIGHT * sum(tail_work(t) for t in tails))
    ctx = multiprocessing.get_context("fork")
    children = []
    for w in range(1, n):
        recv, send = ctx.Pipe(duplex=False)
        mine = tails if w == n - 1 else []
        proc = ctx.Process(target=_child, args=(model, [jobs[k] for k in shares[w]], mine, send), daemon=True)
        proc.start()
        send.close()
        children.append((w, proc, recv, mine))
    out = [None] * len(jobs)
    arcs = []
    t0 = time.perf_counter()
    for k in shares[0]:
        out[k] = _price(model, jobs[k])
    # a child that forked into a stuck lock (another thread held it) must not hang the compile
    deadline = time.perf_counter() + max(CHILD_GRACE_S, 4 * (time.perf_counter() - t0))
    for w, proc, recv, mine in children:
        status, got = "failed", None
        try:
            if recv.poll(max(0.0, deadline - time.perf_counter())):
                status, got = recv.recv()
        except (EOFError, OSError):
            pass
        recv.close()
        if status != "ok" and proc.is_alive():
            proc.kill()
        proc.join()
        if status != "ok":
            priced, their_arcs = [_price(model, jobs[k]) for k in shares[w]], _arcs(model, mine)
        else:
            priced, their_arcs = got
            for k, g in zip(shares[w], priced):
                if g is not None:
                    g.layout = jobs[k][5]
                    model.adopt(g)
            for arc in their_arcs:
                model.tail_pricer.adopt(arc)
        for k, g in zip(shares[w], priced):
            out[k] = g
        arcs += their_arcs
    return out, arcs


def tail_work(tail):
    """A tail group's pricing work in layers x members (its layers are priced per member)."""
    first, last, mode, devices = tail
    return (last - first + 1) * (len(devices) if mode == "channels" else 1)


def _shares(jobs, n, last_load=0.0):
    """Job indexes of each of ``n`` processes: whole spans (first, last)
    dealt out in turn, longest first, to the process with the least work
    so far (the model caches a span's tiles and units: one process each),
    a span's work taken as its jobs times its length; the last process
    starts with ``last_load`` (the tail groups)."""
    spans = {}
    for k, job in enumerate(jobs):
        spans.setdefault(job[:2], []).append(k)
    load, shares = [0.0] * n, [[] for _ in range(n)]
    load[-1] = last_load
    for (first, last), ks in sorted(spans.items(), key=lambda kv: (-(kv[0][1] - kv[0][0] + 1) * len(kv[1]), kv[0])):
        w = load.index(min(load))
        shares[w] += ks
        load[w] += (last - first + 1) * len(ks)
    return [sorted(ks) for ks in shares]
