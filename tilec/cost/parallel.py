"""Pricing the candidate tiled groups on several cores.

The cost stage prices thousands of tiled groups (YOLOv2 at batch 8 on 6
devices: 4,920, over half of `tilec compile`'s time on one core), each a
pure function of the program, the cluster, its span and its layout. Forked
children price interleaved shares of them (a group's price grows with its
span, and the jobs come span by span) and hand the priced groups back,
pickled, through a pipe; the parent prices its own share meanwhile and
puts every child's group into the model's cache, so the candidates are the
same values in the same order as priced on one core. The pipe carries only
what the parent's own children computed, never anything from a network.

Where ``fork`` is missing (Windows) or a child fails, the parent prices
the rest itself.
"""
import os
import time

MIN_JOBS = 400  # fewer: forking and pickling cost more than they save
MAX_WORKERS = 4
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


def _child(model, jobs, conn):
    try:
        priced = [_price(model, job) for job in jobs]
        for g in priced:
            if g is not None:
                g.layout = None  # the parent puts its own Layout back
        conn.send(("ok", priced))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which prices the share itself
        conn.send(("failed", repr(exc)))
    finally:
        conn.close()


def price_groups(model, jobs, n_workers=None, min_jobs=None):
    """[Group, or None where the split lines are rejected] of each job
    ``(first, last, row_splits, col_splits, devices, layout)``, in order,
    as ``model.group`` prices them (and cached there)."""
    n = workers() if n_workers is None else max(1, n_workers)
    if n == 1 or len(jobs) < (MIN_JOBS if min_jobs is None else min_jobs) or not hasattr(os, "fork"):
        return [_price(model, job) for job in jobs]
    import multiprocessing
    shares = _shares(jobs, n)
    ctx = multiprocessing.get_context("fork")
    children = []
    for w in range(1, n):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(model, [jobs[k] for k in shares[w]], send), daemon=True)
        proc.start()
        send.close()
        children.append((w, proc, recv))
    out = [None] * len(jobs)
    t0 = time.perf_counter()
    for k in shares[0]:
        out[k] = _price(model, jobs[k])
    # a child that forked into a stuck lock (another thread held it) must not hang the compile
    deadline = time.perf_counter() + max(CHILD_GRACE_S, 4 * (time.perf_counter() - t0))
    for w, proc, recv in children:
        status, priced = "failed", None
        try:
            if recv.poll(max(0.0, deadline - time.perf_counter())):
                status, priced = recv.recv()
        except (EOFError, OSError):
            pass
        recv.close()
        if status != "ok" and proc.is_alive():
            proc.kill()
        proc.join()
        if status != "ok":
            priced = [_price(model, jobs[k]) for k in shares[w]]
        for k, g in zip(shares[w], priced):
            if g is not None and status == "ok":
                g.layout = jobs[k][5]
                model.adopt(g)
            out[k] = g
    return out


def _shares(jobs, n):
    """Job indexes of each of ``n`` processes: whole spans (first, last)
    dealt out in turn, longest first, to the process with the least work
    so far (the model caches a span's tiles and units: one process each),
    a span's work taken as its jobs times its length."""
    spans = {}
    for k, job in enumerate(jobs):
        spans.setdefault(job[:2], []).append(k)
    load, shares = [0] * n, [[] for _ in range(n)]
    for (first, last), ks in sorted(spans.items(), key=lambda kv: (-(kv[0][1] - kv[0][0] + 1) * len(kv[1]), kv[0])):
        w = load.index(min(load))
        shares[w] += ks
        load[w] += (last - first + 1) * len(ks)
    return [sorted(ks) for ks in shares]
