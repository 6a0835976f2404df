"""The launcher's side of a job, and the local backend.

``run_job`` sends a plan and each rank's state to workers that are already
listening (``tilec worker`` on each device of a cluster, or processes this
machine starts with ``LocalWorkers``), streams every device its pieces of
each batch's image (and the ranks that compute the loss their part of
the labels/targets), collects per-step
metrics from every device and the model state at checkpoint steps, and
returns the final state. The first fault anywhere
ends the job with one line naming the device and the step.
"""
import contextlib
import json
import os
import secrets
import select
import subprocess
import sys
import tempfile
import time

import numpy as np

from tilec_runtime.auth import handshake
from tilec_runtime.comm import PeerLost
from tilec_runtime.errors import RuntimeFault
from tilec_runtime.executor import BATCHES_AHEAD, cut, input_messages, input_piece, place
from tilec_runtime.imagefile import ImageRing
from tilec_runtime.shards import cut_target, target_part, total_loss
from tilec_runtime.transport import (EMPTY, FrameError, Kind, Link, Lost, Mailbox, Silent, as_bytes, await_frame,
                                     connect, heartbeat_interval, kind_name, read_expected, send_frame, text_spec,
                                     yielding_cores)
from tilec_runtime.worker import (BUILD_TIMEOUT, FIRST_PIECE, LISTENING, MAX_METRICS_BYTES,
                                  SETUP_TIMEOUT, TARGET, has_momentum, holdings, owned, pieces, state_spec,
                                  state_steps, state_table)


class JobFailed(PeerLost):
    """A job ended early; the message is the one-line report of the fault."""


def run_job(plan, addresses, key, params, buffers, batches, *, steps, kernel_source, first_step=0, momentum=None,
            timeout=120.0, state_every=0, on_step=None, on_metrics=None, on_state=None, connect_timeout=30.0,
            threads=None, trace=False, lr=None, data_dir=None):
    """Train ``steps`` steps from ``first_step`` on workers at ``addresses``
    (rank order). Returns (losses, params, buffers, momentum).

    ``kernel_source``: ``{"module": name, "source": C text}`` of the generated
    kernels (``tilec.codegen.generate``), which every worker builds (once:
    they are cached) and runs. ``threads``: the kernel threads of every
    worker (default: the plan's per device). ``trace``: every record of
    ``on_metrics`` carries its step's ops (``tilec_runtime.trace``).
    ``lr``: [[step, learning rate]] changes of a schedule. ``data_dir``: a
    directory on the workers' machine (local workers) where the launcher
    leaves the images for them to read (``local_data``).

    ``on_step(step, loss, seconds)`` after each step, ``on_metrics(records)``
    with every device's record of the step, ``on_state(done, params,
    buffers, momentum)`` after steps ``first_step + k * state_every``.
    """
    job = Job(plan, addresses, key, timeout)
    try:
        job.start(params, buffers, momentum, first_step, steps, state_every, connect_timeout, kernel_source, threads,
                  trace, lr, local_data(plan, data_dir))
        losses = []
        for step, records, state in job.steps(batches):
            loss = total_loss([r["loss"] for r in records])
            losses.append(loss)
            if on_metrics:
                on_metrics(records)
            if on_step:
                on_step(step, loss, records[0]["step_s"])
            if state is not None and on_state:
                on_state(step + 1, *state)
        return (losses, *job.final_state)
    except BaseException as exc:
        job.abort(str(exc) if isinstance(exc, RuntimeFault) else f"the launcher stopped: {type(exc).__name__}")
        raise


def local_data(plan, directory):
    """Where the workers read each step's images from ``directory`` (local
    workers: ``imagefile.ImageRing``); None: they are sent."""
    if directory is None:
        return None
    return ImageRing(directory, plan["program"][0]["in_shape"], plan["dtype"], plan["batch"])


class Job:
    """The launcher's side of one job: ``start``, then iterate ``steps``;
    ``request_stop`` (Ctrl-C) ends it early with the state of the last step."""

    def __init__(self, plan, addresses, key, timeout):
        self.plan, self.addresses, self.key = plan, [tuple(a) for a in addresses], key
        self.timeout = float(timeout)
        self.n = len(plan["devices"])
        if len(self.addresses) != self.n:
            raise RuntimeFault(f"{len(self.addresses)} worker addresses for a plan of {self.n} devices")
        self.names = [d["name"] for d in plan["devices"]]
        self.table = state_table(plan["program"])
        # what each rank reports: the state no lower rank holds as well
        self.owned = [owned(plan, r, has_momentum(plan)) for r in range(self.n)]
        self.held = [pieces(plan, r) for r in range(self.n)]  # (read for every STATE frame)
        self.mailbox = Mailbox()
        self.socks, self.links = [], {}
        self.step = 0  # the step in progress (0-based), for messages
        self.stop_requested = False
        self.stop_at = None  # steps the job ends after, once a stop is sent
        self.final_state = (None, None, None)
        self.data = None

    def who(self, rank):
        return f"device {rank} ({self.names[rank]})"

    # -- set-up -------------------------------------------------------------------

    def start(self, params, buffers, momentum, first_step, steps, state_every, connect_timeout, kernel_source,
              threads, trace, lr=None, data=None):
        """``data``: where the workers read their pieces of the images
        themselves (``local_data``); None: they are sent."""
        plan = self.plan
        self.data = data
        self.step = first_step
        self.first, self.last = first_step, first_step + steps
        self.reports = state_steps(first_step, self.last, state_every)
        self.done_step = self.last
        deadline = time.monotonic() + connect_timeout
        for r, address in enumerate(self.addresses):
            with self.blame(r, ""):
                sock = connect(address, deadline, what="its worker")
            sock.settimeout(SETUP_TIMEOUT)
            self.socks.append(sock)
            with self.blame(r, f" at {address[0]}:{address[1]}"):
                hello = handshake(sock, self.key, role="launcher", ident="launcher", plan=plan["hash"], initiator=True)
            self.socks[-1] = hello.channel  # every frame from here on is authenticated
        send_momentum = momentum is not None and has_momentum(plan)
        sections = {"param": params, "buffer": buffers, "momentum": momentum or {}}
        job_id = secrets.token_hex(8)
        for r, sock in enumerate(self.socks):
            with self.blame(r, " while receiving the job"):
                send_frame(sock, Kind.JOB, 0, 0, as_bytes({
                    "job": job_id, "rank": r, "peers": [list(a) for a in self.addresses],
                    "first_step": first_step, "steps": steps, "timeout": self.timeout, "state_every": state_every,
                    "momentum": send_momentum, "kernel_source": kernel_source, "threads": threads, "trace": bool(trace),
                    "lr": [[int(a), float(b)] for a, b in (lr or [])], "data": data and data.spec, "plan": plan}))
                held = self.held[r]
                for index in holdings(plan, r, send_momentum):
                    section, key, shape = self.table[index]
                    array = sections[section].get(key)
                    if array is None:  # no velocity yet: zero is the same to SGD
                        array = np.zeros(shape, plan["dtype"])
                    send_frame(sock, Kind.STATE, 0, index, np.ascontiguousarray(cut(array, held[index]), plan["dtype"]))
        for r, sock in enumerate(self.socks):
            with self.blame(r, " while getting ready"):
                sock.settimeout(BUILD_TIMEOUT)  # it may build the kernels first
                reply = read_expected(sock, {Kind.READY: EMPTY, Kind.ERROR: text_spec()})
            if reply.kind == Kind.ERROR:
                raise JobFailed(f"{self.who(r)} refused the job: {reply.text()}")
        for r, sock in enumerate(self.socks):
            with self.blame(r, " at the start"):
                send_frame(sock, Kind.GO, 0, 0)
        # workers on this machine (they read their images here: ``data``) compute on its cores, where
        # the launcher's threads run only when one is idle (``transport.yield_cores``)
        for r, sock in enumerate(self.socks):
            self.links[r] = Link(sock, r, self.mailbox, self._expect(r), on_frame=self._relay,
                                 heartbeat=heartbeat_interval(self.timeout), background=data is not None)

    @contextlib.contextmanager
    def blame(self, rank, when):
        """Errors of a set-up exchange with ``rank`` name that device."""
        try:
            yield
        except (OSError, RuntimeFault) as exc:
            if isinstance(exc, JobFailed):
                raise
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            raise JobFailed(f"{self.who(rank)}{when}: {reason}") from None

    def _relay(self, link, frame):
        """A worker's ERROR is the job's fault, in the worker's words."""
        if frame.kind == Kind.ERROR:
            self.mailbox.fail(link.peer, frame.text(), relayed=True)
            return True
        return False

    def _expect(self, rank):
        mine, held = set(self.owned[rank]), self.held[rank]
        seen = set()

        def expect(kind, step, tensor):
            if kind == Kind.METRICS and tensor == 0 and self.first <= step < self.done_step:
                spec = text_spec(MAX_METRICS_BYTES)
            elif kind == Kind.STATE and tensor in mine and step in self.reports:
                spec = state_spec(self.plan, tensor, held.get(tensor))
            elif kind == Kind.DONE and step == self.done_step and tensor == 0:
                spec = EMPTY
            elif kind == Kind.ERROR:
                return text_spec()
            else:
                raise FrameError(f"{kind_name(kind)} {tensor} for step {step} is not expected from device {rank}")
            if (kind, step, tensor) in seen:
                raise FrameError(f"second {kind_name(kind)} {tensor} for step {step}")
            seen.add((kind, step, tensor))
            return spec
        return expect

    # -- training -------------------------------------------------------------------

    def wait(self, rank, kind, step, tensor=0):
        try:
            return await_frame(self.mailbox, list(self.links.values()), (rank, kind, step, tensor), self.timeout)
        except Silent as exc:
            raise JobFailed(f"{self.who(exc.peer)} sent nothing for {exc.seconds:.0f} s at step {self.step + 1} "
                            f"(stopped, hung or cut off)") from None
        except Lost as exc:
            fault = exc.fault
            if fault.relayed:
                raise JobFailed(fault.reason) from None
            raise JobFailed(f"{self.who(fault.peer)} lost at step {self.step + 1} ({fault.reason})") from None

    def request_stop(self):
        """End the job early, after the steps whose batches have been sent
        (safe from a signal handler: the training loop acts on it)."""
        self.stop_requested = True

    def steps(self, batches):
        """Yield (step, every device's record, (params, buffers, momentum) or
        None) per step, the state at report steps; then ``final_state``
        holds the state after the last step run."""
        first, last = self.first, self.last
        dtype = np.dtype(self.plan["dtype"])
        target_dtype = np.int64 if self.plan["program"][-1]["kind"] == "softmax" else dtype
        sent = first  # batches of steps before this one are on their way
        image_pieces = [[self.plan["messages"][k] for k, _ in input_messages(self.plan, r)] for r in range(self.n)]
        target_parts = [target_part(self.plan, r) for r in range(self.n)]

        def send_batch(step):
            nonlocal sent
            if step < last and step == sent and self.stop_at is None:
                images, target = batches.get(step)
                if self.data is not None:
                    self.data.put(step, images)  # (before its go: the workers read it then)
                for r, messages in enumerate(image_pieces):
                    # its part of the targets, where it computes the loss or a part of it; else, where the
                    # workers read the images, an empty frame: its go
                    part = cut_target(target, target_parts[r])
                    if part is not None:
                        self.links[r].send(Kind.BATCH, step, TARGET, np.ascontiguousarray(part, target_dtype))
                    elif self.data is not None:
                        self.links[r].send(Kind.BATCH, step, TARGET)
                    if self.data is not None:
                        continue
                    for j, m in enumerate(messages):
                        piece = np.ascontiguousarray(input_piece(images, m), dtype)
                        self.links[r].send(Kind.BATCH, step, FIRST_PIECE + j, piece)
                sent += 1

        # batches ahead: no device waits for data while the launcher is busy
        for ahead in range(first, first + BATCHES_AHEAD):
            send_batch(ahead)
        state = None
        # workers on this machine (they read their images here) compute on all its cores: this thread's
        # work of a step, and its caller's between steps, waits for one that is idle (measured, tiny416
        # at batch 1 on two single-core workers: about 1 ms a step, which lengthened a worker's step)
        with yielding_cores() if self.data is not None else contextlib.nullcontext():
            for step in range(first, last):
                if self.stop_requested and self.stop_at is None and sent < last:
                    self._send_stop(sent)
                if self.stop_at is not None and step >= self.stop_at:
                    break
                self.step = step
                records = [self.wait(r, Kind.METRICS, step) for r in range(self.n)]
                records = [_json(a, self.who(r)) for r, a in enumerate(records)]
                send_batch(step + BATCHES_AHEAD)
                step_state = self.collect(step + 1) if step + 1 in self.reports else None
                state = step_state or state
                yield step, records, step_state
        # (a stop added its step to the reports: the loop collected that state)
        for r in range(self.n):
            self.wait(r, Kind.DONE, self.done_step)
        for link in self.links.values():
            link.send(Kind.BYE, 0, 0)
            link.close()
        self.final_state = state if state is not None else (None, None, None)
        if self.data is not None:
            self.data.close()

    def _send_stop(self, at):
        """Every worker ends after ``at`` steps (the batches sent so far) and reports its state there."""
        self.stop_at = self.done_step = at
        self.reports.add(at)
        for link in self.links.values():
            link.send(Kind.STOP, at, 0)

    def collect(self, done):
        """(params, buffers, momentum) reported after ``done`` steps."""
        out = {"param": {}, "buffer": {}, "momentum": {}}
        for r, held in enumerate(self.held):
            for index in self.owned[r]:
                section, key, shape = self.table[index]
                place(out[section], key, self.wait(r, Kind.STATE, done, index), held[index], shape)
        return out["param"], out["buffer"], out["momentum"]

    def abort(self, message):
        """Tell every worker to stop (a cluster's workers then serve again)."""
        if self.data is not None:
            self.data.close()
        for r, sock in enumerate(self.socks):
            link = self.links.get(r)
            try:
                if link is not None:
                    link.send(Kind.ABORT, 0, 0, as_bytes(message[:4000]))
                    link.close(2.0)
                else:
                    send_frame(sock, Kind.ABORT, 0, 0, as_bytes(message[:4000]))
                    sock.close()
            except OSError:
                pass


def _json(array, who):
    try:
        record = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise JobFailed(f"{who} sent unreadable metrics") from None
    if not isinstance(record, dict) or "step_s" not in record:
        raise JobFailed(f"{who} sent malformed metrics")
    return record


# -- the local backend ---------------------------------------------------------------


def usable_cores():
    """The cores this process may run on (a container or ``taskset`` may
    allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def local_threads(n):
    """Kernel threads of each of ``n`` local workers: this machine's usable cores shared out."""
    return max(1, len(usable_cores()) // n)


def core_shares(n):
    """The cores each of ``n`` local workers is pinned to (``pin_cores``):
    this machine's usable cores in ``n`` equal runs; None where they are
    left to the scheduler (fewer than two workers, or more than cores)."""
    cores = usable_cores()
    share = len(cores) // n
    if n < 2 or share < 1:
        return None
    return [cores[r * share:(r + 1) * share] for r in range(n)]


def pin_cores(procs):
    """Each of several local workers on its own share of this machine's
    cores (``local_threads``), as a device has its own: left to the
    scheduler, a worker's reader thread waits for a core that the other
    worker computes on, and every message, so every batch-norm barrier,
    waits for it (measured, tiny416 at batch 1 on two single-core workers:
    steps 8-10% shorter pinned, waits 17% of a step down to 8-12%). The
    threads a worker starts later inherit its cores. More workers than
    cores are left to the scheduler (pinned, two sharing a core would run at
    half speed while another ran alone, and every step would wait for
    them); so is everything where the system has no affinity call, or
    refuses it."""
    shares = core_shares(len(procs)) if hasattr(os, "sched_setaffinity") else None
    if shares is None:
        return
    try:
        for proc, cores in zip(procs, shares):
            os.sched_setaffinity(proc.pid, set(cores))
    except OSError:  # all or none: one left free would compute on the others' cores
        for proc in procs:
            try:
                os.sched_setaffinity(proc.pid, set(usable_cores()))
            except OSError:
                pass


class LocalWorkers:
    """``n`` one-job worker processes on 127.0.0.1 (free ports). BLAS runs
    on one thread in each (the kernels split their work over the threads a
    job gives them). A context manager: leaving it waits briefly, then kills
    what is left, so no worker outlives its launcher. Worker stderr goes to
    ``log_dir``."""

    def __init__(self, n, key, *, log_dir=None, startup_timeout=60.0, command=None, env=None):
        self.n, self.key = n, key
        self.log_dir = log_dir
        self.startup_timeout = startup_timeout
        self.command = command or [sys.executable, "-m", "tilec_runtime.worker"]
        self.extra_env = env or {}
        self.procs, self.addresses, self.logs = [], [], []
        self.returncodes = None
        self._data = self.data_dir = None  # the images the workers read (``local_data``)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        self._data = tempfile.TemporaryDirectory(prefix="tilec-data-")
        self.data_dir = self._data.name
        if self.log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tilec-workers-")
            self.log_dir = self._tmp.name
        os.makedirs(self.log_dir, exist_ok=True)
        env = dict(os.environ, TILEC_KEY=self.key, **self.extra_env)
        for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
        try:
            for r in range(self.n):
                path = os.path.join(self.log_dir, f"worker{r}.log")
                self.logs.append(path)
                with open(path, "wb") as log:
                    self.procs.append(subprocess.Popen(
                        self.command + ["--listen", "127.0.0.1:0", "--once", "--parent", str(os.getpid())],
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                        # not in the terminal's process group: Ctrl-C reaches the launcher
                        # alone, which ends the job cleanly (STOP) with a checkpoint
                        start_new_session=True))
            deadline = time.monotonic() + self.startup_timeout
            pin_cores(self.procs)
            self.addresses = [self._address(r, p, deadline) for r, p in enumerate(self.procs)]
        except BaseException:
            self.stop(0)
            raise

    def _address(self, rank, proc, deadline):
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
            chunk = os.read(proc.stdout.fileno(), 256) if ready else b""
            if not chunk:
                raise RuntimeFault(f"local worker {rank} did not start: {self.log(rank).strip()[-500:]}")
            line += chunk
        text = line.decode().strip()
        if not text.startswith(LISTENING):
            raise RuntimeFault(f"local worker {rank} said {text!r}")
        host, _, port = text[len(LISTENING):].strip().rpartition(":")
        return host, int(port)

    def log(self, rank):
        try:
            with open(self.logs[rank], errors="replace") as f:
                return f.read()
        except (OSError, IndexError):
            return ""

    def stop(self, timeout=10.0):
        """Wait up to ``timeout`` s for the workers to exit, then kill them."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        if self._data is not None:
            self._data.cleanup()
        self.returncodes = [p.returncode for p in self.procs]
        return self.returncodes


def train_local(plan, params, buffers, batches, *, steps, kernel_source, key=None, log_dir=None, **kwargs):
    """``run_job`` on ``len(plan["devices"])`` local worker processes."""
    key = key or secrets.token_hex(32)
    with LocalWorkers(len(plan["devices"]), key, log_dir=log_dir) as workers:
        return run_job(plan, workers.addresses, key.encode(), params, buffers, batches, steps=steps,
                       kernel_source=kernel_source, data_dir=workers.data_dir, **kwargs)
