"""Candidate groups priced by forked processes are the groups one process
prices: same values, same order, and in the model's cache."""
import dataclasses

import numpy as np
import pytest

import tilec.cost.parallel as parallel
from tilec.cluster import uniform_cluster
from tilec.cost.candidates import enumerate_candidates
from tilec.cost.layouts import layouts
from tilec.cost.model import CostModel
from tilec.frontend.models import load_model
from tilec.profiles import load_profile


def _jobs(model, cl):
    program = model.program
    out = []
    for first in range(model.prefix):
        for last in range(first, min(model.prefix, first + 4)):
            _, h, w = program[last]["out_shape"]
            for lay in layouts(cl):
                splits = lay.splits(h, w)
                if splits is not None:
                    out.append((first, last, splits[0], splits[1], lay.devices, lay))
    return out


def _model(n=3, batch=2):
    cl = uniform_cluster(load_profile("rpi3b"), n)
    return CostModel(load_model("tiny").to_program(), cl, batch, 4), cl


def _same(a, b):
    if a is None or b is None:
        return a is None and b is None
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "layout":
            assert x is y  # the parent's own Layout object, not a copy
        elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert (x is None) == (y is None) and (x is None or np.array_equal(x, y)), f.name
        else:
            assert x == y, f.name
    return True


@pytest.mark.parametrize("workers", [2, 3])
def test_forked_pricing_equals_one_process(workers):
    serial, cl = _model()
    forked, _ = _model()
    jobs = _jobs(serial, cl)
    assert len(jobs) > 20
    one = parallel.price_candidates(serial, jobs, n_workers=1)[0]
    many = parallel.price_candidates(forked, jobs, n_workers=workers, min_jobs=0)[0]
    assert sum(g is not None for g in one) > 20
    assert all(_same(a, b) for a, b in zip(one, many))
    # the children's groups are in the parent's cache: asking again returns the same object
    for job, g in zip(jobs, many):
        if g is not None:
            assert forked.group(*job[:5], layout=job[5]) is g


def test_the_tail_groups_priced_by_a_child_equal_one_process():
    from tilec.cost.candidates import tail_options
    serial, cl = _model()
    forked, _ = _model()
    jobs = _jobs(serial, cl)
    tails = list(tail_options(serial.program, 1, 3, serial.tail_pricer.members))
    assert len(tails) > 5
    one = parallel.price_candidates(serial, jobs, tails, n_workers=1)
    many = parallel.price_candidates(forked, jobs, tails, n_workers=2, min_jobs=0)
    assert all(_same(a, b) for a, b in zip(one[0], many[0]))
    assert one[1] == many[1]
    for t, arc in zip(tails, many[1]):
        assert forked.tail_pricer.arc(*t) is arc  # cached in the parent


def test_a_failed_child_leaves_its_share_to_the_parent(monkeypatch):
    def failing(model, jobs, tails, conn):
        conn.send(("failed", "RuntimeError('boom')"))
        conn.close()
    monkeypatch.setattr(parallel, "_child", failing)
    serial, cl = _model()
    forked, _ = _model()
    jobs = _jobs(serial, cl)
    from tilec.cost.candidates import tail_options
    tails = list(tail_options(serial.program, 1, 3, serial.tail_pricer.members))
    one = parallel.price_candidates(serial, jobs, tails, n_workers=1)
    many = parallel.price_candidates(forked, jobs, tails, n_workers=2, min_jobs=0)
    assert all(_same(a, b) for a, b in zip(one[0], many[0])) and one[1] == many[1]


def test_shares_cover_every_job_once_and_keep_spans_whole():
    model, cl = _model()
    jobs = _jobs(model, cl)
    for n, tail in ((1, 0.0), (2, 0.0), (3, 50.0), (5, 1e9)):
        shares = parallel._shares(jobs, n, tail)
        assert sorted(k for s in shares for k in s) == list(range(len(jobs)))
        owner = {}
        for w, s in enumerate(shares):
            for k in s:
                assert owner.setdefault(jobs[k][:2], w) == w


def test_candidates_do_not_depend_on_the_worker_count(monkeypatch):
    results = []
    for workers in ("1", "2"):
        monkeypatch.setenv(parallel.WORKERS_ENV, workers)
        monkeypatch.setattr(parallel, "MIN_JOBS", 0)
        model, cl = _model(n=2, batch=1)
        cands = enumerate_candidates(model, layouts(cl))
        results.append(([(g.first, g.last, g.seconds, g.recompute_seconds, g.kept, g.kept_recompute, g.workspace,
                          g.workspace_recompute, g.state) for g in cands.groups],
                        cands.group_layout, cands.transitions, cands.transition_bytes))
    assert results[0] == results[1]


def test_the_worker_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(parallel.WORKERS_ENV, "3")
    assert parallel.workers() == 3
    monkeypatch.setenv(parallel.WORKERS_ENV, "two")
    with pytest.raises(ValueError, match="TILEC_COST_WORKERS"):
        parallel.workers()
    monkeypatch.delenv(parallel.WORKERS_ENV)
    assert 1 <= parallel.workers() <= parallel.MAX_WORKERS


def test_a_child_that_hangs_is_stopped_and_its_share_priced(monkeypatch):
    import time as _time

    def hanging(model, jobs, tails, conn):
        _time.sleep(60)
    monkeypatch.setattr(parallel, "_child", hanging)
    monkeypatch.setattr(parallel, "CHILD_GRACE_S", 0.5)
    serial, cl = _model()
    forked, _ = _model()
    jobs = _jobs(serial, cl)
    t0 = _time.perf_counter()
    many = parallel.price_candidates(forked, jobs, n_workers=2, min_jobs=0)[0]
    assert _time.perf_counter() - t0 < 30
    one = parallel.price_candidates(serial, jobs, n_workers=1)[0]
    assert all(_same(a, b) for a, b in zip(one, many))
