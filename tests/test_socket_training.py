"""Training over sockets gives the numbers of one device.

- N = 2, 3, 4 worker processes on loopback (ring all-reduce forced on every
  gradient) equal one device in float64 to 1e-10, and for N = 2 equal the
  in-process backend bit for bit;
- random stacks, groups and splits over an in-process socket-pair mesh
  (the same framing, validation and collectives, no processes);
- `tilec train` uses the local backend by default and prints what
  `--backend inprocess` prints; `--metrics` has a record per device;
- `tilec worker` processes named in a cluster file serve one job after
  another.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings

from built import kernel_source, module
from test_tiled import FLOOR, assert_same, converges, one_device, tiled_cases, well_conditioned
from test_transport import OPT, make_plan, run_ranks, small_program
from tilec.plan.build import build_plan
from tilec_runtime import inprocess, launch, shards, transport, weights
from tilec_runtime.data import generated_batches
from tilec_runtime.socketcomm import socketpair_mesh

STEPS = 3


def setup(program, dtype="float64", batch=2, seed=3):
    params, buffers = weights.init_params(program, seed, dtype)
    return params, buffers, generated_batches(program, batch, seed, dtype)


def train_socketpairs(plan, params, buffers, batches, steps):
    """Every rank as a thread of this process, over real sockets."""
    comms = socketpair_mesh(plan, 30.0)
    devices = inprocess.make_executors(plan, comms, module(plan["dtype"]), params, buffers)

    def run(comm):
        try:
            out = []
            part = shards.target_part(plan, comm.rank)
            for step in range(steps):
                comm.step = step + 1
                images, target = batches.get(step)  # every rank cuts its pieces of the image
                out.append(devices[comm.rank].step(images, shards.cut_target(target, part)))
            comm.close()
            return out
        except BaseException as exc:
            comm.close(error=str(exc))  # wake the others
            raise
        finally:
            devices[comm.rank].close()
    losses = [shards.total_loss(parts) for parts in zip(*run_ranks(comms, run))]
    p, b, _ = inprocess.gather_state(devices)
    return losses, p, b


@pytest.mark.parametrize("n, spans", [(2, ((0, 1), (2, 3))), (3, ((0, 3),)), (4, ((0, 0), (1, 2), (3, 3)))])
def test_local_workers_equal_one_device(n, spans):
    program = small_program()
    plan = make_plan(program, n, spans, ring_min_bytes=0)
    params, buffers, batches = setup(program)
    records, policies = [], []
    before = os.sched_getscheduler(0)

    def on_metrics(recs):
        records.append(recs)
        policies.append(os.sched_getscheduler(0))
    losses, p, b, m = launch.train_local(plan, params, buffers, batches, steps=STEPS, timeout=30,
                                         on_metrics=on_metrics, kernel_source=kernel_source("float64"))
    # between its steps the launcher ran only where a worker left a core idle, and then got its policy back
    assert policies == [os.SCHED_IDLE if transport._may_leave_idle() else before] * STEPS
    assert os.sched_getscheduler(0) == before
    want = one_device(program, params, buffers, batches, STEPS)
    assert_same((losses, p, b), want, 1e-10, FLOOR)
    assert set(m) == set(p)  # momentum for every parameter comes back too
    # every device reported every step
    assert [[r["device"] for r in recs] for recs in records] == [list(range(n))] * STEPS
    for recs in records:
        for r in recs:
            assert r["peak_bytes"] > 0 and r["bytes_sent"] > 0 and r["wait_s"] >= 0
            assert abs(r["compute_s"] + r["wait_s"] - r["step_s"]) < 1e-6
    if n == 2:  # a two-member ring adds a + b: what the in-process all-reduce does
        got = inprocess.train(plan, params, buffers, batches, STEPS, module("float64"), timeout=30)
        for key in p:
            np.testing.assert_array_equal(p[key], got[1][key])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiled_cases(max_devices=4))
def test_random_plans_over_sockets_equal_one_device(case):
    program, choices, n_dev, batch, recompute = case
    params, buffers, batches = setup(program, batch=batch, seed=7)
    plan = build_plan(program, choices, model="random", batch=batch, dtype="float64",
                      devices=[f"d{i}" for i in range(n_dev)], optimizer=OPT, ring_min_bytes=0)
    want = one_device(program, params, buffers, batches, STEPS)
    assume(converges(want[0]) and well_conditioned(program, params, buffers, batches, STEPS))
    got = train_socketpairs(plan, params, buffers, batches, STEPS)
    assert_same(got, want, 1e-10, FLOOR)


def tilec(*args, timeout=120):
    # one BLAS thread: two spin-waiting OpenBLAS threads make a small model
    # many times slower on a busy 2-core machine
    return subprocess.run([sys.executable, "-m", "tilec.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))


def test_cli_local_backend_is_the_default_and_matches_inprocess(tmp_path):
    metrics = tmp_path / "m.jsonl"
    # a fixed plan on all three (the optimiser may leave a device idle on a model this small)
    fixed = ("--grid", "3x1", "--groups", "all")
    local = tilec("train", "tiny", "--devices", "3", "--steps", "2", "--batch", "4", "--dtype", "float64", *fixed,
                  "--metrics", str(metrics), "--save-weights", str(tmp_path / "local.npz"))
    assert local.returncode == 0, local.stderr
    threads = tilec("train", "tiny", "--devices", "3", "--steps", "2", "--batch", "4", "--dtype", "float64", *fixed,
                    "--backend", "inprocess", "--save-weights", str(tmp_path / "threads.npz"))
    assert threads.returncode == 0, threads.stderr
    strip = lambda text: [line.split("  ")[:2] for line in text.splitlines() if line.startswith("step")]  # noqa: E731
    assert strip(local.stdout) == strip(threads.stdout)  # the same losses to 6 decimals
    with np.load(tmp_path / "local.npz") as a, np.load(tmp_path / "threads.npz") as b:
        for key in a.files:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-12)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    per_device = [r for r in records if "device" in r]
    assert sorted((r["step"], r["device"]) for r in per_device) == [(s, d) for s in range(2) for d in range(3)]
    assert all(r["bytes_sent"] > 0 and r["peak_bytes"] > 0 and "compute_s" in r for r in per_device)
    assert [r["step"] for r in records if "loss" in r] == [0, 1]


@pytest.fixture
def served_workers(tmp_path):
    """Two `tilec worker` processes serving jobs on loopback, and their key file."""
    key_file = tmp_path / "cluster.key"
    key_file.write_text("a-cluster-key-of-enough-bytes\n")
    procs = []
    try:
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tilec.cli", "worker", "--listen", "127.0.0.1:0", "--key-file", str(key_file)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env=dict(os.environ, OPENBLAS_NUM_THREADS="1")))
        addresses = [p.stdout.readline().split()[-1] for p in procs]
        yield procs, addresses, key_file
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
            p.stdout.close()
            p.stderr.close()


def test_cluster_file_workers_serve_job_after_job(served_workers, tmp_path):
    procs, addresses, key_file = served_workers
    lines = ["devices:"]
    for i, address in enumerate(addresses):
        host, port = address.rsplit(":", 1)
        lines.append(f"  - {{name: pi-{i}, host: {host}, port: {port}, profile: rpi3b}}")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("\n".join(lines) + "\n")
    one = tilec("train", "tiny", "--steps", "2", "--batch", "4", "--dtype", "float64", "--save-weights",
                str(tmp_path / "one.npz"))
    assert one.returncode == 0, one.stderr
    for run in range(2):  # the workers go back to serving after a job
        got = tilec("train", "tiny", "--steps", "2", "--batch", "4", "--dtype", "float64", "--cluster", str(cluster),
                    "--key-file", str(key_file), "--groups", "all",
                    "--save-weights", str(tmp_path / f"cluster{run}.npz"))
        assert got.returncode == 0, got.stderr
        with np.load(tmp_path / f"cluster{run}.npz") as a, np.load(tmp_path / "one.npz") as b:
            for key in b.files:
                np.testing.assert_allclose(a[key], b[key], rtol=1e-10, atol=1e-10, err_msg=key)
    wrong = tmp_path / "wrong.key"
    wrong.write_text("not-the-cluster-key-at-all\n")
    refused = tilec("train", "tiny", "--steps", "1", "--cluster", str(cluster), "--key-file", str(wrong), "--groups", "all")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"tilec: error: device 0 (pi-0) at {addresses[0]}: refused: wrong cluster key"]
    assert all(p.poll() is None for p in procs)
