"""Faults: a worker killed or stopped mid-training stops every device with
one line naming it and the step, within the receive timeout; the last
checkpoint stays loadable and resuming from it (on as many or fewer
devices) ends with the weights of an uninterrupted run; a checkpoint write
that dies leaves the previous checkpoint; no worker outlives its launcher;
garbage from a peer mid-step is a fault, not a crash."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from built import kernel_source
from test_socket_training import setup
from test_tiled import FLOOR, assert_same, one_device
from test_transport import OPT, make_plan, small_program
from tilec_runtime import checkpoint, launch
from tilec_runtime.auth import new_key
from tilec_runtime.comm import PeerLost
from tilec_runtime.optim import SGD
from tilec_runtime.reference import train_step
from tilec_runtime.socketcomm import SocketComm
from tilec_runtime.transport import HEADER, MAGIC, VERSION, Kind

TOTAL = 6
# OpenBLAS threads spin-wait: on a busy 2-core machine a small model runs
# many times slower with two of them than with one
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1")
LINE = re.compile(r"device 2 \(dev2\) (lost at step \d+ \(.+\)|sent nothing for \d+ s at step \d+ \(.+\))")


def error_lines(log):
    return [line for line in log.splitlines() if "error" in line]


def run_with(n, action, tmp_path, timeout=60.0, at=2):
    """Train ``small_program`` on ``n`` local workers, checkpointing every
    step, and call ``action(workers)`` after step ``at``. Returns (the
    exception, seconds from the action to it, workers, program, data)."""
    program = small_program()
    params, buffers, batches = setup(program)
    key = new_key()
    hit = {}

    def on_metrics(records):
        if records[0]["step"] == at:
            hit["t"] = time.monotonic()
            action(workers)

    def on_state(done, p, b, m):
        checkpoint.save(tmp_path / "ck", done, p, b, m, program=checkpoint.program_hash(program))

    with launch.LocalWorkers(n, key, log_dir=tmp_path / "logs") as workers:
        try:
            with pytest.raises(launch.JobFailed) as err:
                launch.run_job(make_plan(program, n, ((0, 3),)), workers.addresses, key.encode(), params, buffers,
                               batches, steps=1000, timeout=timeout, state_every=1, on_metrics=on_metrics,
                               on_state=on_state, kernel_source=kernel_source("float64"))
            seconds = time.monotonic() - hit["t"]
        finally:
            if workers.procs[2].poll() is None:
                workers.procs[2].kill()  # the stopped one
            codes = workers.stop(timeout=20)
    return err.value, seconds, workers, codes, (program, params, buffers, batches)


def test_killed_worker_stops_all_and_resume_on_fewer_devices_is_exact(tmp_path):
    exc, seconds, workers, codes, (program, params, buffers, batches) = run_with(
        3, lambda w: os.kill(w.procs[2].pid, signal.SIGKILL), tmp_path)
    message = str(exc)
    assert LINE.fullmatch(message) and "\n" not in message, message
    assert seconds < 60  # detected from the closed connection, long before the receive timeout
    assert codes[2] == -signal.SIGKILL and codes[0] == 1 and codes[1] == 1
    for r in (0, 1):  # each survivor printed one line naming the device and the step
        lines = error_lines(workers.log(r))
        assert len(lines) == 1 and LINE.search(lines[0]), workers.log(r)
    # the last checkpoint is whole and loadable
    ck = checkpoint.load(tmp_path / "ck", program)
    assert 2 <= ck.step <= 4 and set(ck.momentum) == set(ck.params)

    uninterrupted = one_device(program, params, buffers, batches, TOTAL)
    # resume on 2 devices (re-planned)
    losses, p, b, _ = launch.train_local(make_plan(program, 2), ck.params, ck.buffers, batches, steps=TOTAL - ck.step,
                                         first_step=ck.step, momentum=ck.momentum, timeout=30,
                                         kernel_source=kernel_source("float64"))
    assert_same((losses, p, b), (uninterrupted[0][ck.step:], *uninterrupted[1:]), 1e-10, FLOOR)
    # and on one device
    p, b, opt = dict(ck.params), dict(ck.buffers), SGD(**OPT)
    opt.velocity = dict(ck.momentum)
    for step in range(ck.step, TOTAL):
        _, grads = train_step(program, p, b, *batches.get(step))
        opt.step(p, grads)
    assert_same(([], p, b), ([], *uninterrupted[1:]), 1e-10, FLOOR)


def test_stopped_worker_is_named_within_the_receive_timeout(tmp_path):
    """SIGSTOP: the process is there, its sockets stay open, it just goes
    silent (a cut-off device looks the same). Heartbeats tell it from the
    devices that are merely waiting for it."""
    exc, seconds, workers, codes, _ = run_with(3, lambda w: os.kill(w.procs[2].pid, signal.SIGSTOP), tmp_path,
                                               timeout=2.0)
    message = str(exc)
    assert re.fullmatch(r"device 2 \(dev2\) sent nothing for \d+ s at step \d+ \(stopped, hung or cut off.*\)",
                        message), message
    assert seconds < 2 * 2.0 + 5  # the timeout, plus a heartbeat interval, plus slack for a busy machine
    assert codes[0] == 1 and codes[1] == 1
    for r in (0, 1):
        lines = error_lines(workers.log(r))
        assert len(lines) == 1 and "device 2 (dev2) sent nothing" in lines[0], workers.log(r)


def children(pid):
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return sorted(found)


def alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_cli_kill_then_resume_on_fewer_devices(tmp_path):
    """The whole path through `tilec train`: kill a worker of a 3-device run,
    get one line and status 1, then resume on 2 devices and on 1."""
    # --groups all: a fixed plan, no optimiser run (this tests the runtime, not the planner)
    common = ["--steps", "60", "--batch", "2", "--dtype", "float64", "--lr", "0.005", "--groups", "all"]
    ck_dir = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-m", "tilec.cli", "train", "tiny", "--devices", "3", "--timeout", "60",
                             "--checkpoint", str(ck_dir), "--checkpoint-every", "1", *common],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if checkpoint.load(ck_dir).step >= 1:
                    break
            except checkpoint.CheckpointError:
                pass
            time.sleep(0.01)
        workers = children(proc.pid)
        assert len(workers) == 3
        os.kill(workers[2], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1
    assert len(err.strip().splitlines()) == 1, err
    assert re.fullmatch(r"tilec: error: device 2 \(dev2\) lost at step \d+ \(.+\)", err.strip()), err
    time.sleep(0.5)
    assert not any(alive(pid) for pid in workers)  # no worker outlives the run
    done = checkpoint.load(ck_dir).step
    assert done < 60

    def run(*args):
        got = subprocess.run([sys.executable, "-m", "tilec.cli", "train", "tiny", *common, *args],
                             capture_output=True, text=True, timeout=120, env=ENV)
        assert got.returncode == 0, got.stderr
        return got.stdout
    run("--save-weights", str(tmp_path / "uninterrupted.npz"))
    assert f"resuming after step {done}" in run("--devices", "2", "--resume", str(ck_dir),
                                                "--save-weights", str(tmp_path / "two.npz"))
    run("--resume", str(ck_dir), "--save-weights", str(tmp_path / "one.npz"))
    with np.load(tmp_path / "uninterrupted.npz") as want:
        for name in ("two.npz", "one.npz"):
            with np.load(tmp_path / name) as got:
                for key in want.files:
                    scale = max(np.abs(want[key]).max(), 1.0)
                    assert np.abs(got[key] - want[key]).max() / scale < 1e-10, (name, key)


def test_workers_die_with_their_launcher(tmp_path):
    code = ("import sys, time; from tilec_runtime.launch import LocalWorkers; "
            "w = LocalWorkers(2, 'k' * 32).__enter__(); "
            "print(' '.join(str(p.pid) for p in w.procs), flush=True); time.sleep(60)")
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in launcher.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        launcher.kill()
        launcher.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids)
    finally:
        launcher.kill()
        launcher.stdout.close()


def test_garbage_from_a_peer_mid_step_is_a_fault_not_a_crash():
    plan = make_plan(small_program(), 2)
    for garbage in (b"\xff" * 100, HEADER.pack(MAGIC, VERSION, Kind.BN, 0, 1, 1, 0, 1 << 30, 0, 0, 0, 1 << 33)):
        mine, theirs = socket.socketpair()
        comm = SocketComm(plan, 0, {1: mine}, timeout=10.0)
        comm.step = 1
        try:
            theirs.sendall(garbage)
            with pytest.raises(PeerLost, match=r"device 1 \(dev1\) lost at step 1 \(sent an invalid frame"):
                comm.recv(1, (1, "bn", 0))
        finally:
            comm.close(error="test over")
            theirs.close()


def test_a_checkpoint_write_that_dies_leaves_the_previous_one(tmp_path, monkeypatch):
    program = small_program()
    params, buffers, _ = setup(program)
    meta = {"program": checkpoint.program_hash(program)}
    checkpoint.save(tmp_path, 3, params, buffers, {}, **meta)

    def dies(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")
    monkeypatch.setattr(np, "savez", dies)
    bigger = {k: v + 1 for k, v in params.items()}
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(tmp_path, 4, bigger, buffers, {}, **meta)
    monkeypatch.undo()
    ck = checkpoint.load(tmp_path, program)
    assert ck.step == 3 and all(np.array_equal(ck.params[k], params[k]) for k in params)
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # no temporary file left behind
    other = [dict(layer) for layer in program]
    other[0]["act"] = "relu"  # same shapes, another model
    with pytest.raises(checkpoint.CheckpointError, match="another model"):
        checkpoint.load(tmp_path, other)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this system")
@pytest.mark.parametrize("n", [2, 3])
def test_local_workers_get_their_own_share_of_the_cores(tmp_path, n):
    """Local workers stand for devices: each on its own cores
    (``launch.pin_cores``), the same number each; more workers than cores
    are left to the scheduler, each free to run on any."""
    cores = set(os.sched_getaffinity(0))
    workers = launch.LocalWorkers(n, new_key(), log_dir=tmp_path / "logs")
    try:
        workers.start()
        sets = [os.sched_getaffinity(p.pid) for p in workers.procs]
    finally:
        workers.stop(timeout=0)  # (they wait for a job that will not come)
    share = len(cores) // n
    if share:
        assert all(len(s) == share and s <= cores for s in sets)
        assert len(set().union(*sets)) == share * n  # (no two share a core)
    else:
        assert all(s == cores for s in sets)
